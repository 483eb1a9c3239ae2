"""Dice and normalised surface distance (NSD) per label, computed with MONAI's metric implementations.

Conventions, chosen so every case gives a number and per-label means stay comparable:

* masks are 2D or 3D; any non-zero value is foreground;
* both masks empty -> 1.0 (nothing to find, nothing found); exactly one empty -> 0.0, for Dice and NSD alike;
* NSD is the fraction of both surfaces (weighted by surface area, ``use_subvoxels``) lying within ``tolerance_mm``
  of the other surface, in physical units given by ``spacing``; the image border counts as surface for a mask
  that touches it.
"""

from __future__ import annotations

import csv
import logging
import math
import statistics
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_surface_dice

__all__ = ["dice", "evaluate_label_maps", "summarise", "surface_dice", "write_metrics_csv"]

logger = logging.getLogger(__name__)

METRICS = ("dice", "nsd")


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient of two binary masks (2D or 3D)."""
    pred, ref = _masks(pred, ref)
    empty = _empty_case(pred, ref)
    if empty is not None:
        return empty
    return float(compute_dice(_one_hot(pred), _one_hot(ref), include_background=False)[0, 0])


def surface_dice(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 2.0) -> float:
    """Normalised surface distance of two binary masks with voxel ``spacing`` (mm per axis) at ``tolerance_mm``."""
    pred, ref = _masks(pred, ref)
    spacing = _spacing(spacing, pred.ndim)
    if isinstance(tolerance_mm, bool) or not isinstance(tolerance_mm, int | float) or not tolerance_mm >= 0:
        raise ValueError(f"tolerance_mm must be a number >= 0, got {tolerance_mm!r}")
    empty = _empty_case(pred, ref)
    if empty is not None:
        return empty
    with warnings.catch_warnings():
        # MONAI 1.5+ passes its own deprecated `always_return_as_numpy` argument internally.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        value = compute_surface_dice(
            _one_hot(pred),
            _one_hot(ref),
            class_thresholds=[float(tolerance_mm)],
            include_background=False,
            spacing=spacing,
            use_subvoxels=True,
        )
    return float(value[0, 0])


def evaluate_label_maps(
    pred: np.ndarray,
    ref: np.ndarray,
    labels: dict[int, str],
    spacing: Sequence[float],
    tolerance_mm: float = 2.0,
) -> list[dict[str, Any]]:
    """One row ``{label, name, dice, nsd}`` per entry of ``labels`` (label value -> name) in two label maps."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"Prediction shape {pred.shape} does not match reference shape {ref.shape}")
    if not labels:
        raise ValueError("No labels to evaluate: give a {value: name} map")
    rows = []
    for value, name in labels.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"Label values must be integers >= 1 (0 is background), got {value!r} for {name!r}")
        p, r = pred == value, ref == value
        rows.append(
            {"label": int(value), "name": name, "dice": dice(p, r), "nsd": surface_dice(p, r, spacing, tolerance_mm)}
        )
    return rows


def write_metrics_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write metric rows (columns in first-seen order over all rows) to a CSV file; returns its path."""
    if not rows:
        raise ValueError("No metric rows to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fieldnames = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    logger.info("Wrote %d metric rows to %s", len(rows), path)
    return path


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | int]]:
    """Per label name over cases: count, and mean, median and population standard deviation of Dice and NSD."""
    summary: dict[str, dict[str, float | int]] = {}
    for name in dict.fromkeys(row["name"] for row in rows):
        cases = [row for row in rows if row["name"] == name]
        entry: dict[str, float | int] = {"label": cases[0]["label"], "cases": len(cases)}
        for metric in METRICS:
            values = [float(row[metric]) for row in cases]
            entry[f"{metric}_mean"] = statistics.fmean(values)
            entry[f"{metric}_median"] = statistics.median(values)
            entry[f"{metric}_std"] = statistics.pstdev(values)
        summary[name] = entry
    return summary


def _masks(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"Prediction shape {pred.shape} does not match reference shape {ref.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"Masks must be 2D or 3D, got shape {pred.shape}")
    return pred.astype(bool), ref.astype(bool)


def _spacing(spacing: Sequence[float], ndim: int) -> list[float]:
    try:
        values = [float(s) for s in spacing]
    except (TypeError, ValueError) as error:
        raise ValueError(f"spacing must be a sequence of {ndim} numbers (mm per axis), got {spacing!r}") from error
    if len(values) != ndim:
        raise ValueError(f"spacing {spacing!r} has {len(values)} values for a {ndim}D mask")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be positive and finite, got {spacing!r}")
    return values


def _empty_case(pred: np.ndarray, ref: np.ndarray) -> float | None:
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if has_pred and has_ref:
        return None
    return 1.0 if has_pred == has_ref else 0.0


def _one_hot(mask: np.ndarray) -> torch.Tensor:
    """1 x 2 x spatial float tensor (background, foreground), the layout MONAI's metrics expect."""
    foreground = torch.from_numpy(np.ascontiguousarray(mask))
    return torch.stack([~foreground, foreground])[None].float()
