"""Load and save Medical SAM3 weights from local files, in every format the model is released in.

Formats understood (all loaded with ``weights_only=True`` onto the CPU first):

* SAM3 (``sam3.pt``): ``detector.*`` and ``tracker.*`` keys;
* Medical SAM3 (``checkpoint.pt``): detector keys with or without the ``detector.`` prefix, possibly wrapped as
  ``{"model": state_dict}``; usually detector-only, so click prompts need the tracker of a SAM3 checkpoint, given
  as ``tracker_path``;
* this project's own checkpoints (:func:`save_checkpoint`): ``{"format": "medsam3", "model_size", "state_dict"}``.

Nothing loads silently: keys the model needs but no file provides stop the load with a message naming the
missing groups, unexpected keys are reported, shapes must match and every tensor must be finite.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import ADAPTATION_ATTRIBUTE, configure_adaptation, is_adaptation_key, load_adaptation

__all__ = [
    "CheckpointError",
    "LoadReport",
    "load_adaptation_file",
    "load_checkpoint",
    "load_network",
    "read_adaptation_file",
    "read_state_dict",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

PROJECT_FORMAT = "medsam3"
RANDOM_WEIGHTS = "random"  # ckpt_path value that keeps random weights, for tests and benchmarks
# Keys the tracker (click prompts, propagation across slices) needs; the detector alone serves text and boxes.
TRACKER_PREFIXES = ("tracker.", "detector.backbone.vision_backbone.sam2_convs.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, wrong format, missing or non-finite weights."""


@dataclass
class LoadReport:
    """What a load did: where each key came from, what was left out and why."""

    sources: dict[str, int] = field(default_factory=dict)  # file -> number of keys taken from it
    unexpected: list[str] = field(default_factory=list)
    interactive: bool = True  # False when the tracker weights were absent (text and box prompts only)

    def summary(self) -> str:
        parts = [f"{count} keys from {name}" for name, count in self.sources.items()]
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected keys ignored (e.g. {self.unexpected[:3]})")
        if not self.interactive:
            parts.append("no tracker weights: click prompts unavailable")
        return "; ".join(parts)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat state dict with this model's key names (``detector.*``/``tracker.*``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"Cannot read checkpoint {path}: {error}") from error
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"Checkpoint {path} holds a {type(raw).__name__}, not a state dict")
    if raw.get("format") == PROJECT_FORMAT:
        state = raw.get("state_dict")
    elif isinstance(raw.get("model"), Mapping):
        state = raw["model"]
    elif isinstance(raw.get("state_dict"), Mapping):
        state = raw["state_dict"]
    else:
        state = raw
    tensors = {_strip_wrappers(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"Checkpoint {path} contains no tensors")
    if not any(k.startswith(("detector.", "tracker.")) for k in tensors):
        # Medical SAM3 detector checkpoints drop the "detector." prefix.
        tensors = {f"detector.{k}": v for k, v in tensors.items()}
    return tensors


def _strip_wrappers(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def load_checkpoint(
    model: nn.Module,
    path: str | Path,
    tracker_path: str | Path | None = None,
    require_tracker: bool = False,
) -> LoadReport:
    """Load weights into ``model`` in place; raise :class:`CheckpointError` rather than load a partial model.

    Args:
        model: a :class:`scripts.model_builder.MedSam3` of the size the checkpoint was made for.
        path: the main checkpoint (any format above).
        tracker_path: optional SAM3 checkpoint providing the tracker (and its neck) when ``path`` lacks it.
        require_tracker: fail instead of serving text/box prompts only when no tracker weights are found.
    """
    expected = model.state_dict()
    report = LoadReport()
    merged: dict[str, torch.Tensor] = {}
    for source in (path, tracker_path):
        if source is None:
            continue
        state = read_state_dict(source)
        if source is tracker_path:  # only fill what the main checkpoint lacks, and only the tracker's part
            state = {k: v for k, v in state.items() if k.startswith(TRACKER_PREFIXES) and k not in merged}
        report.sources[str(source)] = len(state)
        merged.update(state)

    report.unexpected = sorted(k for k in merged if k not in expected)
    for key in report.unexpected:
        merged.pop(key)
    _check_shapes(merged, expected, model)
    missing = sorted(k for k in expected if k not in merged)
    # LoRA / 3D-adapter parameters (scripts.adapters) are not in base checkpoints: they keep their current values.
    kept = [k for k in missing if is_adaptation_key(k)]
    missing = [k for k in missing if not is_adaptation_key(k)]
    missing_tracker = [k for k in missing if k.startswith(TRACKER_PREFIXES)]
    missing_required = [k for k in missing if not k.startswith(TRACKER_PREFIXES)]
    if missing_required:
        raise CheckpointError(
            f"Checkpoint {path} lacks {len(missing_required)} detector weights "
            f"({_group(missing_required)}); is it a SAM3 / Medical SAM3 checkpoint for model_size "
            f"{_size_name(model)!r}?"
        )
    if missing_tracker:
        if require_tracker or len(missing_tracker) != sum(k.startswith(TRACKER_PREFIXES) for k in expected):
            raise CheckpointError(
                f"Tracker weights are missing or incomplete ({len(missing_tracker)} keys: {_group(missing_tracker)}); "
                "give the SAM3 checkpoint (sam3.pt) as the tracker checkpoint for click prompts"
            )
        report.interactive = False
    _check_finite(merged, path)
    # Every expected key is accounted for above: the tracker's keys are either all present or all kept at
    # their initial values with click prompts disabled, so strict loading is not possible but nothing is silent.
    model.load_state_dict(merged, strict=not (missing_tracker or kept))
    if kept:
        logger.info("Kept %d adaptation parameters at their current values (not in the checkpoint)", len(kept))
    if report.unexpected:
        logger.warning("Ignored %d unexpected checkpoint keys, e.g. %s", len(report.unexpected), report.unexpected[:5])
    logger.info("Loaded checkpoint: %s", report.summary())
    return report


def _check_shapes(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        key, got, want = wrong[0]
        raise CheckpointError(
            f"{len(wrong)} checkpoint tensors do not fit model_size {_size_name(model)!r}: e.g. {key} has shape "
            f"{got}, the model expects {want}. Choose the model_size the checkpoint was trained with."
        )


def _check_finite(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"Checkpoint {path} has NaN/Inf values in {len(bad)} tensors, e.g. {bad[:3]}")


def _group(keys: list[str], depth: int = 3) -> str:
    groups = sorted({".".join(k.split(".")[:depth]) for k in keys})
    return ", ".join(groups[:6]) + (", ..." if len(groups) > 6 else "")


def _size_name(model: nn.Module) -> str:
    size = getattr(model, "size", None)
    return getattr(size, "name", type(model).__name__)


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    **meta: object,
) -> Path:
    """Save the project's format; ``state_dict`` narrows what is saved (e.g. adapter weights only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": PROJECT_FORMAT,
        "model_size": _size_name(model),
        "state_dict": {k: v.detach().cpu() for k, v in (state_dict or model.state_dict()).items()},
        "meta": meta,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint where a reader may load it
    return path


def read_adaptation_file(path: str | Path) -> tuple[dict[str, object], str, dict[str, torch.Tensor]]:
    """``(adaptation config, model size, tensors)`` of a LoRA / 3D-adapter file, refusing anything else."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for missing, truncated or foreign files
        raise CheckpointError(f"Cannot read adapter weights {path}: {error}") from error
    meta = raw.get("meta", {}) if isinstance(raw, Mapping) and raw.get("format") == PROJECT_FORMAT else {}
    config = meta.get(ADAPTATION_ATTRIBUTE) or {}
    if config.get("mode") not in ("lora", "adapter3d"):
        raise CheckpointError(
            f"{path} holds no LoRA/3D-adapter weights (saved by train.json in lora or adapter3d mode); a full "
            "fine-tuned checkpoint is given as ckpt_path instead"
        )
    _check_finite(raw["state_dict"], path)
    return dict(config), str(raw.get("model_size")), raw["state_dict"]


def load_adaptation_file(model: nn.Module, path: str | Path) -> dict[str, object]:
    """Load a LoRA / 3D-adapter file (an adapter-mode ``model_final.pt``/``model_best.pt``) on top of the base weights.

    The file records how it was adapted (:func:`scripts.adapters.configure_adaptation` arguments); an unadapted model
    gets that adaptation first, an adapted one must match it. Returns the adaptation config.
    """
    config, size, state = read_adaptation_file(path)
    if size != _size_name(model):
        raise CheckpointError(f"{path} was trained on model_size {size!r}, not {_size_name(model)!r}")
    current = getattr(model, ADAPTATION_ATTRIBUTE, None)
    if current is None:
        configure_adaptation(model, **config)
    elif current != config:
        raise CheckpointError(f"{path} was trained with adaptation {config}, the model has {current}")
    try:
        load_adaptation(model, state)
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from error
    logger.info("Loaded %s adaptation (%d tensors) from %s", config["mode"], len(state), path)
    return config


def load_network(
    network: nn.Module, ckpt_path: str | None, tracker_ckpt_path: str | None = None, adapter_path: str | None = None
) -> nn.Module:
    """Load weights into ``network``, then the fine-tuned ``adapter_path`` on top when given.

    ``ckpt_path="random"`` keeps the random initialisation (tests, benchmarks).
    """
    network = _load_base(network, ckpt_path, tracker_ckpt_path)
    if adapter_path:
        load_adaptation_file(network, adapter_path)
    return network


def _load_base(network: nn.Module, ckpt_path: str | None, tracker_ckpt_path: str | None) -> nn.Module:
    if ckpt_path == RANDOM_WEIGHTS:
        logger.warning("Using RANDOM weights (ckpt_path=random): masks are meaningless; for tests and benchmarks only")
        network.interactive = True
        return network
    if not ckpt_path or not Path(ckpt_path).is_file():
        raise FileNotFoundError(
            f"Model weights not found at {ckpt_path!r}. Download the Medical SAM3 checkpoint (or SAM3's sam3.pt) as "
            "listed in bundle/large_files.yml and put it at bundle/models/model.pt, or pass --ckpt_path <file>; "
            "for click prompts with a detector-only Medical SAM3 checkpoint also pass --tracker_ckpt_path sam3.pt. "
            "See bundle/docs/README.md."
        )
    if tracker_ckpt_path and not Path(tracker_ckpt_path).is_file():
        raise FileNotFoundError(f"Tracker checkpoint not found at {tracker_ckpt_path!r} (SAM3's sam3.pt, for clicks)")
    report = load_checkpoint(network, ckpt_path, tracker_path=tracker_ckpt_path or None)
    if not report.interactive:
        logger.warning("No tracker weights: text prompts only. Put SAM3's sam3.pt at models/sam3.pt for clicks/boxes")
    network.interactive = report.interactive
    return network


def file_if_present(path: str | Path) -> str:
    """``path`` when the file exists, else "" (the default tracker checkpoint is optional)."""
    return str(path) if Path(path).is_file() else ""
