"""Per-stage wall-clock timing, reported by inference responses and benchmarks.

Every stage's start is also where cancelled work stops (:mod:`scripts.cancellation`).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch

from .cancellation import raise_if_cancelled


class StageTimer:
    """Accumulates seconds per named stage; synchronises CUDA so GPU work is charged to the right stage."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        raise_if_cancelled()
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def as_dict(self, digits: int = 4) -> dict[str, float]:
        return {name: round(value, digits) for name, value in self.seconds.items()}

    def reset(self) -> None:
        self.seconds.clear()
