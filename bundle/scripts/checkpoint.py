"""Load and save Medical SAM3 weights from local files, in every format the model is released in.

Formats understood (all loaded with ``weights_only=True`` onto the CPU first):

* SAM3 (``sam3.pt``): ``detector.*`` and ``tracker.*`` keys;
* Medical SAM3: its trainer's ``{"model": detector.* + tracker.*, "optimizer", "epoch", ...}`` (about 10 GB with the
  optimizer state), or detector keys with or without the ``detector.`` prefix; a file without tracker keys needs the
  tracker of a SAM3 checkpoint (``tracker_path``) for clicks;
* this project's own checkpoints (:func:`save_checkpoint`): ``{"format": "medsam3", "model_size", "state_dict"}``.

Files are memory-mapped, so only the model's tensors are read (an optimizer state never is). ``freqs_cis`` tables
are recomputed for the model's input size, never loaded, so files saved at 504 or 1008 pixels load into either.
Nothing loads silently: keys the model needs but no file provides stop the load with a message naming the
missing groups, unexpected keys are reported, shapes must match and every tensor must be finite, except that
non-finite text-encoder tensors (a language backbone that training corrupted) are taken from ``text_encoder_path``
or the tracker checkpoint, with a warning naming them.
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
TEXT_ENCODER_PREFIX = "detector.backbone.language_backbone."
RECOMPUTED_SUFFIX = "freqs_cis"  # RoPE tables of the ViT: a function of the input size, recomputed by the model
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, wrong format, missing or non-finite weights."""


@dataclass
class LoadReport:
    """What a load did: where each key came from, what was left out and why."""

    sources: dict[str, int] = field(default_factory=dict)  # file -> number of keys taken from it
    unexpected: list[str] = field(default_factory=list)
    interactive: bool = True  # False when the tracker weights were absent (text and box prompts only)
    text_encoder_replaced: list[str] = field(default_factory=list)  # non-finite tensors taken from another file

    def summary(self) -> str:
        parts = [f"{count} keys from {name}" for name, count in self.sources.items()]
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected keys ignored (e.g. {self.unexpected[:3]})")
        if not self.interactive:
            parts.append("no tracker weights: click prompts unavailable")
        if self.text_encoder_replaced:
            parts.append(f"{len(self.text_encoder_replaced)} corrupted text-encoder tensors replaced")
        return "; ".join(parts)


def _load_file(path: Path, what: str = "checkpoint") -> object:
    """``torch.load`` memory-mapped: tensors are read from disk when used, so unused parts (an optimizer state) never
    are; files in the legacy (pre-zip) format cannot be mapped and are read whole."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"Cannot read {what} {path}: {error}") from error


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat state dict with this model's key names (``detector.*``/``tracker.*``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file not found: {path}")
    raw = _load_file(path)
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
    text_encoder_path: str | Path | None = None,
) -> LoadReport:
    """Load weights into ``model`` in place; raise :class:`CheckpointError` rather than load a partial model.

    Args:
        model: a :class:`scripts.network.MedSam3` of the size the checkpoint was made for.
        path: the main checkpoint (any format above).
        tracker_path: optional SAM3 checkpoint providing the tracker (and its neck) when ``path`` lacks it.
        require_tracker: fail instead of serving text/box prompts only when no tracker weights are found.
        text_encoder_path: where non-finite text-encoder tensors of ``path`` are taken from (default: the tracker
            checkpoint, SAM3's ``sam3.pt``, which holds the original text encoder).
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

    recomputed = [k for k in merged if k.endswith(RECOMPUTED_SUFFIX)]
    for key in recomputed:
        merged.pop(key)
    report.unexpected = sorted(k for k in merged if k not in expected)
    for key in report.unexpected:
        merged.pop(key)
    _check_shapes(merged, expected, model)
    missing = sorted(k for k in expected if k not in merged)
    # LoRA / 3D-adapter parameters (scripts.adapters) are not in base checkpoints: they keep their current values.
    kept = [k for k in missing if is_adaptation_key(k) or k.endswith(RECOMPUTED_SUFFIX)]
    missing = [k for k in missing if k not in kept]
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
    report.text_encoder_replaced = _replace_corrupted_text_encoder(merged, path, text_encoder_path or tracker_path)
    _check_finite(merged, path)
    # Every expected key is accounted for above: the tracker's keys are either all present or all kept at
    # their initial values with click prompts disabled, so strict loading is not possible but nothing is silent.
    model.load_state_dict(merged, strict=not (missing_tracker or kept))
    if kept:
        logger.info("Kept %d adaptation parameters and position tables at their current values", len(kept))
    if report.unexpected:
        logger.warning("Ignored %d unexpected checkpoint keys, e.g. %s", len(report.unexpected), report.unexpected[:5])
    logger.info("Loaded checkpoint: %s", report.summary())
    return report


def _replace_corrupted_text_encoder(
    state: dict[str, torch.Tensor], path: str | Path, fallback: str | Path | None
) -> list[str]:
    """Swap non-finite text-encoder tensors of ``state`` for ``fallback``'s (Medical SAM3's NaN fallback)."""
    corrupted = [k for k, v in state.items() if k.startswith(TEXT_ENCODER_PREFIX) and not _finite(v)]
    if not corrupted:
        return []
    if fallback is None:
        raise CheckpointError(
            f"Checkpoint {path} has NaN/Inf values in {len(corrupted)} text-encoder tensors, e.g. {corrupted[:3]}: "
            "give SAM3's sam3.pt as --text_encoder_ckpt_path (or --tracker_ckpt_path) to take them from there"
        )
    source = read_state_dict(fallback)
    unusable = [k for k in corrupted if k not in source or source[k].shape != state[k].shape or not _finite(source[k])]
    if unusable:
        raise CheckpointError(f"{fallback} cannot replace the corrupted text-encoder tensors {unusable[:3]}")
    for key in corrupted:
        state[key] = source[key]
    logger.warning(
        "Replaced %d non-finite text-encoder tensors of %s by %s's: %s", len(corrupted), path, fallback, corrupted
    )
    return corrupted


def _check_shapes(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        key, got, want = wrong[0]
        raise CheckpointError(
            f"{len(wrong)} checkpoint tensors do not fit model_size {_size_name(model)!r}: e.g. {key} has shape "
            f"{got}, the model expects {want}. Choose the model_size the checkpoint was trained with."
        )


def _finite(tensor: torch.Tensor) -> bool:
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


def _check_finite(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    bad = [k for k, v in state.items() if not _finite(v)]
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
        "meta": {"image_size": getattr(model, "image_size", None), **meta},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint where a reader may load it
    return path


def read_adaptation_file(path: str | Path) -> tuple[dict[str, object], str, dict[str, torch.Tensor]]:
    """``(adaptation config, model size, tensors)`` of a LoRA / 3D-adapter file, refusing anything else."""
    raw = _load_file(Path(path), "adapter weights")
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
    network: nn.Module,
    ckpt_path: str | None,
    tracker_ckpt_path: str | None = None,
    adapter_path: str | None = None,
    text_encoder_ckpt_path: str | None = None,
) -> nn.Module:
    """Load weights into ``network``, then the fine-tuned ``adapter_path`` on top when given.

    ``ckpt_path="random"`` keeps the random initialisation (tests, benchmarks).
    """
    network = _load_base(network, ckpt_path, tracker_ckpt_path, text_encoder_ckpt_path)
    if adapter_path:
        load_adaptation_file(network, adapter_path)
    return network


def _load_base(
    network: nn.Module, ckpt_path: str | None, tracker_ckpt_path: str | None, text_encoder_ckpt_path: str | None
) -> nn.Module:
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
    for option, extra in (("tracker_ckpt_path", tracker_ckpt_path), ("text_encoder_ckpt_path", text_encoder_ckpt_path)):
        if extra and not Path(extra).is_file():
            raise FileNotFoundError(f"{option} not found at {extra!r} (SAM3's sam3.pt)")
    report = load_checkpoint(
        network, ckpt_path, tracker_path=tracker_ckpt_path or None, text_encoder_path=text_encoder_ckpt_path or None
    )
    if not report.interactive:
        logger.warning("No tracker weights: text prompts only. Put SAM3's sam3.pt at models/sam3.pt for clicks/boxes")
    network.interactive = report.interactive
    return network


def checkpoint_image_size(path: str | Path, patch_size: int = 14) -> int | None:
    """The input size a checkpoint was trained at: recorded by :func:`save_checkpoint`, else read off the size of its
    global-attention RoPE tables (1296 rows: 36 x 36 patches, 504 px; 5184: 1008 px); None when it does not say."""
    if not path or path == RANDOM_WEIGHTS or not Path(path).is_file():
        return None
    raw = _load_file(Path(path))
    if isinstance(raw, Mapping) and raw.get("format") == PROJECT_FORMAT and raw.get("meta", {}).get("image_size"):
        return int(raw["meta"]["image_size"])
    rows = [v.shape[0] for k, v in read_state_dict(path).items() if k.endswith(RECOMPUTED_SUFFIX) and v.ndim == 2]
    if not rows:
        return None
    side = int(round(max(rows) ** 0.5))
    return side * patch_size if side * side == max(rows) else None


def file_if_present(path: str | Path) -> str:
    """``path`` when the file exists, else "" (the default tracker checkpoint is optional)."""
    return str(path) if Path(path).is_file() else ""
