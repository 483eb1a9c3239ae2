"""Fine-tuning pieces the train config wires into MONAI's ``SupervisedTrainer``.

* :class:`TextPromptStep`: one iteration (forward of every clip slice against every label prompt, loss,
  backward, step), as the trainer's ``iteration_update``;
* :func:`param_groups`: the Medical SAM3 recipe's optimiser groups (layer-wise decay over the ViT blocks,
  separate backbone and decoder learning rates, no weight decay on norms and biases);
* :class:`TrainableCheckpoint`: saves what is trained (all weights in ``full`` mode, only LoRA/adapter weights
  otherwise, which keeps those files small).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys

from .checkpoint import load_network, save_checkpoint
from .cpu_compat import device_fallbacks
from .losses import TextPromptLoss
from .model_builder import MedSam3
from .predictor import precision

__all__ = ["TextPromptStep", "TextPromptValidation", "TrainableCheckpoint", "param_groups", "prepare_network", "unwrap"]

logger = logging.getLogger(__name__)


class TextPromptStep:
    """``iteration_update`` for :class:`monai.engines.SupervisedTrainer` on :class:`SlicePromptDataset` batches."""

    def __init__(self, prompts: Sequence[str], loss: TextPromptLoss | None = None, amp: bool = True) -> None:
        if not prompts:
            raise ValueError("No label prompts to train on")
        self.prompts = list(prompts)
        self.loss = loss or TextPromptLoss()
        self.amp = amp

    def __call__(self, engine: Engine, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        model = engine.network  # MedSam3, or MedSam3 wrapped in DistributedDataParallel
        device = engine.state.device
        model.train()
        images = batch["image"].to(device)  # B x clip x 3 x S x S
        targets = batch["target"].to(device)  # B x clip x P x S x S
        slices = images.flatten(0, 1)
        # query n = prompt p on slice i, n = p * num + i (the order the detector indexes text and image ids)
        target = targets.flatten(0, 1).transpose(0, 1).flatten(0, 1)
        with device_fallbacks(device), precision(device, self.amp):
            outputs = model(slices, self.prompts)  # through forward, so DDP synchronises gradients
            terms = self.loss(outputs, target)
        engine.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        engine.optimizer.step()
        engine.state.metrics.update({f"loss_{k}": float(v.detach()) for k, v in terms.items() if k != "loss"})
        return {CommonKeys.LOSS: terms["loss"].detach(), CommonKeys.IMAGE: images, CommonKeys.LABEL: targets}


def param_groups(
    model: MedSam3,
    lr_backbone: float = 5e-5,
    lr_decoder: float = 3e-4,
    layer_decay: float = 0.85,
    weight_decay: float = 0.05,
) -> list[dict[str, Any]]:
    """Optimiser groups: ViT block i gets ``lr_backbone * layer_decay ** (depth + 1 - layer_id)``; the rest of
    the model (text encoder, DETR, heads, tracker) ``lr_decoder``; norms, biases and embeddings no weight decay.
    Frozen parameters are left out.
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
        if not _is_main_process():
            return
        model = unwrap(engine.network)
        state = None
        if self.mode != "full":
            from .adapters import adaptation_state_dict

            state = adaptation_state_dict(model)
        save_checkpoint(model, self.output, state_dict=state, mode=self.mode, iteration=engine.state.iteration)
        logger.info("Saved %s weights to %s (iteration %d)", self.mode, self.output, engine.state.iteration)


def prepare_network(network: MedSam3, ckpt_path: str, tracker_ckpt_path: str, mode: str) -> MedSam3:
    """Load the starting weights, then add and unfreeze what ``mode`` trains (``full``, ``lora``, ``adapter3d``)."""
    from .adapters import configure_adaptation

    network = load_network(network, ckpt_path, tracker_ckpt_path)
    trainable = configure_adaptation(network, mode)
    count = sum(p.numel() for p in network.parameters() if p.requires_grad)
    logger.info("Mode %s: %d trainable tensors, %.2fM parameters", mode, len(trainable), count / 1e6)
    return network


class TextPromptValidation:
    """Every ``every`` iterations: text-prompt each validation volume, log mean Dice, keep the best weights.

    Uses the same inference path as the bundle (:class:`scripts.inference.VolumeSegmenter`), so the number is
    what users will get; ``model_best.pt`` holds what :class:`TrainableCheckpoint` would save at that point.
    """

    def __init__(
        self,
        items: Sequence[dict[str, Any]],
        labels: dict[int, str],
        vocabulary: Any,
        output_dir: str,
        mode: str,
        every: int,
        score_threshold: float = 0.5,
    ) -> None:
        self.items, self.labels, self.vocabulary = list(items), dict(labels), vocabulary
        self.best_path = Path(output_dir) / "model_best.pt"
        self.mode, self.every, self.score_threshold = mode, every, score_threshold
        self.best = -1.0
        self.history: list[tuple[int, float]] = []

    def attach(self, engine: Engine) -> None:
        if self.every > 0 and self.items:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self)

    def __call__(self, engine: Engine) -> float:
        from .image_io import read_image
        from .inference import VolumeSegmenter
        from .metrics import dice
        from .predictor import Medsam3Predictor
        from .prompts import PromptSet

        if not _is_main_process():
            return self.best
        model = unwrap(engine.network)
        segmenter = VolumeSegmenter(Medsam3Predictor(model, score_threshold=self.score_threshold), self.vocabulary)
        prompts = PromptSet.create(texts=list(self.labels.values()))
        scores = []
        for item in self.items:
            result = segmenter.segment(read_image(item["image"]), prompts)
            reference = read_image(item["label"]).array
            for (value, _), row in zip(self.labels.items(), result.labels, strict=True):
                scores.append(dice(result.label == row["index"], reference == value))
        model.train()
        mean = float(sum(scores) / len(scores))
        self.history.append((engine.state.iteration, mean))
        engine.state.metrics["val_mean_dice"] = mean
        logger.info("Validation mean Dice %.4f at iteration %d (best %.4f)", mean, engine.state.iteration, self.best)
        if mean > self.best:
            self.best = mean
            TrainableCheckpoint(str(self.best_path.parent), self.mode, name=self.best_path.name)._save(engine)
        return mean


def unwrap(network: torch.nn.Module) -> MedSam3:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(network, "module", network)


def _is_main_process() -> bool:
    """Only rank 0 validates and writes checkpoints in multi-GPU runs."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
