"""Learning-rate schedule of a training run: linear warm-up, then constant or cosine decay.

Training from random weights usually wants the warm-up and the cosine decay's low final rate; fine-tuning a released
model keeps the constant rate by default. The factor is a function of the
engine's iteration alone, so a resumed run continues the schedule where it stopped.
"""

from __future__ import annotations

import math

from ignite.engine import Engine, Events

__all__ = ["SCHEDULES", "LearningRateSchedule", "lr_factor"]

SCHEDULES = ("constant", "cosine")


def lr_factor(iteration: int, max_steps: int, warmup_steps: int = 0, schedule: str = "constant") -> float:
    """Multiplier of each group's base rate before step ``iteration`` (0-based) of ``max_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown lr_schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    if iteration < warmup_steps:
        return (iteration + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (iteration - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class LearningRateSchedule:
    """Sets every optimiser group's rate to its base rate times :func:`lr_factor` before each iteration.

    The base rate is kept in the group as ``initial_lr`` (as torch's schedulers keep it), so it is saved with the
    optimiser's state and a resumed run scales the same base, whichever handler restores the state first."""

    def __init__(self, max_steps: int, warmup_steps: int = 0, schedule: str = "constant") -> None:
        if warmup_steps < 0 or warmup_steps > max_steps:
            raise ValueError(f"warmup_steps must be between 0 and max_steps ({max_steps}), got {warmup_steps}")
        lr_factor(0, max_steps, warmup_steps, schedule)  # an unknown schedule fails here, before training starts
        self.max_steps, self.warmup_steps, self.schedule = max_steps, warmup_steps, schedule

    def attach(self, engine: Engine) -> None:
        if self.schedule == "constant" and self.warmup_steps == 0:
            return  # the optimiser's own rates, untouched
        for group in engine.optimizer.param_groups:  # a restored state brings its own
            group.setdefault("initial_lr", group["lr"])
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        factor = lr_factor(engine.state.iteration - 1, self.max_steps, self.warmup_steps, self.schedule)
        for group in engine.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
