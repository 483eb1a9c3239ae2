"""Fine-tuning pieces the train config wires into MONAI's ``SupervisedTrainer``.

* :class:`PromptStep`: one iteration (forward of every clip slice against every label prompt, with simulated
  box/click rounds for the tracker, loss, backward, step), as the trainer's ``iteration_update``;
* :func:`param_groups`: the Medical SAM3 recipe's optimiser groups (layer-wise decay over the ViT blocks,
  separate backbone and decoder learning rates, no weight decay on norms and biases);
* :class:`TrainableCheckpoint`: saves what is trained (:func:`trained_state_dict`); :class:`TrainingState`: what
  ``--resume`` needs to continue a run exactly;
Validation (:class:`scripts.validation.TextPromptValidation`) scores runs through the inference path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys

from .adapters import (
    ADAPTATION_ATTRIBUTE,
    adaptation_state_dict,
    configure_adaptation,
    freeze_for_mode,
    load_adaptation,
)
from .checkpoint import TRACKER_PREFIXES, load_network, save_checkpoint
from .click_training import ClickPromptLoss, ClickSimulation
from .cpu_compat import device_fallbacks, keep_activations, precision
from .losses import TextPromptLoss
from .network import MedSam3
from .prompts import parse_flag
from .training_data import batch_prompts, per_query

__all__ = [
    "PromptStep",
    "TrainableCheckpoint",
    "TrainingState",
    "param_groups",
    "prepare_network",
    "trained_state_dict",
    "is_main_process",
    "unwrap",
]

logger = logging.getLogger(__name__)

TRAIN_STATE_FORMAT = "medsam3-train-state"


class PromptStep:
    """``iteration_update`` for :class:`monai.engines.SupervisedTrainer` on :class:`SlicePromptDataset` batches.

    Every label's text prompt on every slice trains the detector (:class:`TextPromptLoss`); with ``clicks``, the
    tracker also learns, over the same clips, to answer boxes and corrective clicks and to carry the mask through
    the clip's other slices (:mod:`scripts.click_training`), weighted by ``click_weight``. One forward serves both,
    so DDP sees one graph. ``activation_checkpointing`` false keeps sam3's activations for the backward pass
    instead of recomputing them (the same gradients; faster where memory allows, e.g. ``tiny`` on a CPU).
    """

    def __init__(
        self,
        prompts: Sequence[str],
        loss: TextPromptLoss | None = None,
        clicks: ClickSimulation | None = None,
        click_weight: float = 1.0,
        amp: bool = True,
        absent_prompts: Sequence[str] = (),
        activation_checkpointing: bool | str = True,
    ) -> None:
        if not prompts:
            raise ValueError("No label prompts to train on")
        self.prompts = list(prompts)
        self.absent_prompts = list(absent_prompts)
        self.loss = loss or TextPromptLoss()
        self.clicks, self.click_weight = clicks, click_weight
        self.click_loss = ClickPromptLoss()
        self.amp = amp
        self.activation_checkpointing = parse_flag(activation_checkpointing, "activation_checkpointing")

    def __call__(self, engine: Engine, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        model = engine.network  # MedSam3, or MedSam3 wrapped in DistributedDataParallel
        device = engine.state.device
        model.train()
        images = batch["image"].to(device)  # B x clip x 3 x S x S
        clicks = self.clicks if unwrap(model).interactive else None  # a tracker loaded without weights: not trained
        prompts, targets, flags = batch_prompts(batch, self.prompts, self.absent_prompts, clicks=clicks is not None)
        slices = images.flatten(0, 1)
        # query n = prompt p on slice i, n = p * num + i (the order the detector indexes text and image ids)
        target = targets.to(device).flatten(0, 1).transpose(0, 1).flatten(0, 1)
        valid = per_query(flags["valid"].to(device), images.shape[1])
        annotated = per_query(flags["annotated"].to(device), images.shape[1])
        click_targets = target * annotated[:, None, None]  # pairs the item does not annotate: empty, never clicked
        activations = keep_activations(not self.activation_checkpointing)
        with device_fallbacks(device), precision(device, self.amp), activations:
            if clicks is None:
                outputs = model(slices, prompts)  # through forward, so DDP synchronises gradients
            else:
                outputs = model(
                    slices, prompts, click_targets=click_targets, click_simulation=clicks, clip=images.shape[1]
                )
            terms = self.loss(outputs, target, valid)
            if clicks is not None:
                click_terms = self.click_loss(outputs, click_targets)
                terms.update({k: v for k, v in click_terms.items() if k != "loss"})
                terms["loss"] = terms["loss"] + self.click_weight * click_terms["loss"]
        engine.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        engine.optimizer.step()
        engine.state.metrics.update({f"loss_{k}": float(v.detach()) for k, v in terms.items() if k != "loss"})
        # One "decollated" item with the batch loss, as MONAI handlers read it: from_engine(["loss"], first=True)
        return [{CommonKeys.LOSS: terms["loss"].detach()}]


def param_groups(
    model: MedSam3,
    lr_backbone: float = 5e-5,
    lr_decoder: float = 3e-4,
    layer_decay: float = 0.85,
    weight_decay: float = 0.05,
    lr_tracker: float | None = None,
) -> list[dict[str, Any]]:
    """Optimiser groups: ViT block i gets ``lr_backbone * layer_decay ** (depth + 1 - layer_id)``; the tracker
    ``lr_tracker`` (default ``lr_decoder``); the rest (text encoder, DETR, heads) ``lr_decoder``; norms, biases and
    embeddings no weight decay. Frozen parameters are left out.
    """
    trunk = model.detector.backbone.vision_backbone.trunk
    depth = trunk.get_num_layers()
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        prefix = "detector.backbone.vision_backbone.trunk."
        if name.startswith(prefix):
            layer = trunk.get_layer_id(name[len(prefix) :])
            lr = lr_backbone * layer_decay ** (depth + 1 - layer)
        elif name.startswith("tracker.") and lr_tracker is not None:
            lr = lr_tracker
        else:
            lr = lr_decoder
        decay = 0.0 if parameter.ndim <= 1 or "pos_embed" in name or "embedding" in name else weight_decay
        groups.setdefault((lr, decay), []).append(parameter)
    if not groups:
        raise ValueError("No trainable parameters: check the adaptation mode")
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]


class TrainableCheckpoint:
    """Save the trained weights every ``every`` iterations and at the end, in the project's checkpoint format."""

    def __init__(self, output_dir: str, mode: str, every: int = 0, name: str = "model_final.pt") -> None:
        self.output = Path(output_dir) / name
        self.mode = mode
        self.every = every

    def attach(self, engine: Engine) -> None:
        if self.every > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self._save)
        engine.add_event_handler(Events.COMPLETED, self._save)

    def _save(self, engine: Engine) -> None:
        if not is_main_process():
            return
        model = unwrap(engine.network)
        save_checkpoint(
            model,
            self.output,
            state_dict=trained_state_dict(model, self.mode),
            mode=self.mode,
            adaptation=getattr(model, ADAPTATION_ATTRIBUTE),
            iteration=engine.state.iteration,
        )
        logger.info("Saved %s weights to %s (iteration %d)", self.mode, self.output, engine.state.iteration)


class TrainingState:
    """Resumable training: saves and restores everything a run needs to continue exactly where it stopped.

    ``train_state.pt`` in ``output_dir`` holds the trained weights, the optimiser state, the iteration, the RNG
    states and the validation's best score; it is written with the weights (every ``every`` iterations and at the
    end). Given a ``resume`` file, :meth:`attach` restores it into the trainer before it runs: the iteration count
    continues (``--max_steps`` is the total, so raise it to train longer) and the dataset starts at
    :meth:`first_sample` (its samples depend only on their index). The config's DataLoader draws from its own
    generator, so the restored global RNG (dropout, click simulation) matches an uninterrupted run.
    """

    def __init__(
        self,
        output_dir: str,
        mode: str,
        max_steps: int,
        every: int = 0,
        resume: str = "",
        validation: Any = None,  # scripts.validation.TextPromptValidation: its best score is saved and restored
        name: str = "train_state.pt",
    ) -> None:
        self.path = Path(output_dir) / name
        self.mode, self.every, self.validation, self.max_steps = mode, every, validation, max_steps
        if isinstance(max_steps, bool) or int(max_steps) < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps!r}")
        self.saved: dict[str, Any] | None = _read_training_state(resume, mode) if resume else None
        self.iteration = int(self.saved["iteration"]) if self.saved else 0
        if self.iteration >= max_steps:
            raise ValueError(
                f"{resume} is already at iteration {self.iteration}: --max_steps is the total number of steps, "
                f"give more than {self.iteration} to train further"
            )

    def first_sample(self, batch_size: int, world_size: int = 1) -> int:
        """Index of the first dataset sample still to train on (all ranks together)."""
        return self.iteration * batch_size * world_size

    def samples_left(self, batch_size: int, world_size: int = 1) -> int:
        """Dataset samples the remaining iterations draw (all ranks together)."""
        return (self.max_steps - self.iteration) * batch_size * world_size

    def attach(self, engine: Engine) -> None:
        if self.saved is not None:
            self._restore(engine, self.saved)
        if self.every > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def _restore(self, engine: Engine, saved: dict[str, Any]) -> None:
        model = unwrap(engine.network)
        if self.mode == "full":
            model.load_state_dict(saved["weights"])
        else:
            load_adaptation(model, saved["weights"])
        try:
            engine.optimizer.load_state_dict(saved["optimizer"])
        except ValueError as error:
            raise ValueError(f"Cannot resume the optimiser (changed learning-rate settings?): {error}") from error
        torch.set_rng_state(saved["rng"]["torch"])
        states = saved["rng"]["cuda"] if torch.cuda.is_available() else []
        if states:  # this process's device's stream only: the machine may see fewer GPUs than the one that saved
            device = torch.cuda.current_device()
            torch.cuda.set_rng_state(states[device] if device < len(states) else states[0])
        if self.validation is not None:
            self.validation.best = float(saved["best_dice"])
        # ignite continues an epoch from state.iteration (modulo epoch_length, which the config sets to max_steps)
        engine.state.iteration = self.iteration
        logger.info("Resumed at iteration %d", self.iteration)

    def save(self, engine: Engine) -> None:
        if not is_main_process():
            return
        model = unwrap(engine.network)
        payload = {
            "format": TRAIN_STATE_FORMAT,
            "mode": self.mode,
            "iteration": engine.state.iteration,
            "weights": {k: v.detach().cpu() for k, v in trained_state_dict(model, self.mode).items()},
            "optimizer": engine.optimizer.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            "best_dice": self.validation.best if self.validation is not None else -1.0,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(payload, tmp)
        tmp.replace(self.path)
        logger.info("Saved the training state to %s (iteration %d)", self.path, engine.state.iteration)


def _read_training_state(path: str, mode: str) -> dict[str, Any]:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise ValueError(f"Cannot read the training state {path}: {error}") from error
    if not isinstance(saved, dict) or saved.get("format") != TRAIN_STATE_FORMAT:
        raise ValueError(f"{path} is not a training state (train_state.pt written by train.json)")
    if saved["mode"] != mode:
        raise ValueError(f"{path} was trained in {saved['mode']} mode: resume it with --mode {saved['mode']}")
    return saved


def trained_state_dict(model: MedSam3, mode: str) -> dict[str, torch.Tensor]:
    """What ``mode`` trains: every weight in ``full`` mode, the LoRA/adapter tensors otherwise (small files). A
    model started without tracker weights saves none: its random tracker would load as one that follows clicks."""
    if mode != "full":
        return adaptation_state_dict(model)
    interactive = getattr(model, "interactive", True)  # MedSam3's flag; other modules have no tracker to drop
    return {k: v for k, v in model.state_dict().items() if interactive or not k.startswith(TRACKER_PREFIXES)}


def prepare_network(
    network: MedSam3,
    ckpt_path: str,
    tracker_ckpt_path: str,
    mode: str,
    adapter_path: str = "",
    heads: bool | str = True,
    text_encoder_ckpt_path: str = "",
) -> MedSam3:
    """Load the starting weights, then add and unfreeze what ``mode`` trains (``full``, ``lora``, ``adapter3d``).

    ``heads``: adapter modes also train the decoder and heads (MA-SAM trains SAM's mask decoder too).
    ``adapter_path`` continues from earlier adapter weights (same mode and heads) instead of identity ones.
    """
    heads = parse_flag(heads, "train_heads")
    network = load_network(network, ckpt_path, tracker_ckpt_path, adapter_path or None, text_encoder_ckpt_path or None)
    if heads and mode != "full" and not network.interactive:
        raise ValueError(
            "train_heads trains the tracker's click heads too, but the checkpoint has no tracker weights: give SAM3's "
            "sam3.pt as --tracker_ckpt_path, or pass --train_heads false"
        )
    if adapter_path:
        config = getattr(network, ADAPTATION_ATTRIBUTE)
        if config["mode"] != mode:
            raise ValueError(
                f"{adapter_path} holds {config['mode']} weights: continue them with --mode {config['mode']}"
            )
        if config["heads"] != heads:
            raise ValueError(f"{adapter_path} was trained with train_heads={config['heads']}: continue it with that")
        trainable = freeze_for_mode(network, mode)
    else:
        trainable = configure_adaptation(network, mode, heads=heads)
    count = sum(p.numel() for p in network.parameters() if p.requires_grad)
    logger.info("Mode %s: %d trainable tensors, %.2fM parameters", mode, len(trainable), count / 1e6)
    return network


def unwrap(network: torch.nn.Module) -> MedSam3:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(network, "module", network)


def is_main_process() -> bool:
    """Only rank 0 validates and writes checkpoints in multi-GPU runs."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
