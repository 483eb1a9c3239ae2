"""Dice and normalised surface distance (NSD) per label, with MONAI's metric implementations.

Conventions for empty masks: both empty -> 1.0 (nothing to find, nothing found); one empty -> 0.0.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_surface_dice

__all__ = ["dice", "evaluate_label_maps", "summarise", "surface_dice", "write_metrics_csv"]


def _one_hot(pred: np.ndarray, ref: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != ref.shape:
        raise ValueError(f"Prediction shape {pred.shape} does not match reference shape {ref.shape}")
    p = torch.as_tensor(np.asarray(pred, dtype=bool))
    r = torch.as_tensor(np.asarray(ref, dtype=bool))
    return torch.stack([~p, p])[None].float(), torch.stack([~r, r])[None].float()


def _empty_case(pred: np.ndarray, ref: np.ndarray) -> float | None:
    has_pred, has_ref = bool(np.any(pred)), bool(np.any(ref))
    if not has_pred and not has_ref:
        return 1.0
    if not has_pred or not has_ref:
        return 0.0
    return None


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two binary masks (2D or 3D)."""
    empty = _empty_case(pred, ref)
    if empty is not None:
        return empty
    p, r = _one_hot(pred, ref)
    return float(compute_dice(p, r, include_background=False)[0, 0])


def surface_dice(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 2.0) -> float:
    """Fraction of both surfaces within ``tolerance_mm`` of the other (NSD), in physical units."""
    empty = _empty_case(pred, ref)
    if empty is not None:
        return empty
    if len(spacing) != np.ndim(pred):
        raise ValueError(f"spacing {tuple(spacing)} does not match a {np.ndim(pred)}D mask")
    p, r = _one_hot(pred, ref)
    value = compute_surface_dice(p, r, class_thresholds=[tolerance_mm], include_background=False, spacing=list(spacing))
    return float(value[0, 0])


def evaluate_label_maps(
    pred: np.ndarray, ref: np.ndarray, labels: dict[int, str], spacing: Sequence[float], tolerance_mm: float = 2.0
) -> list[dict[str, Any]]:
    """One row per label value: ``{label, name, dice, nsd}``."""
    return [
        {
            "label": value,
            "name": name,
            "dice": dice(pred == value, ref == value),
            "nsd": surface_dice(pred == value, ref == value, spacing, tolerance_mm),
        }
        for value, name in labels.items()
    ]


def write_metrics_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    if not rows:
        raise ValueError("No metric rows to write")
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, median and standard deviation of Dice and NSD per label name over cases."""
    summary: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(row["name"] for row in rows):
        cases = [row for row in rows if row["name"] == name]
        entry: dict[str, float] = {"cases": len(cases)}
        for metric in ("dice", "nsd"):
            values = [row[metric] for row in cases]
            entry[f"{metric}_mean"] = statistics.fmean(values)
            entry[f"{metric}_median"] = statistics.median(values)
            entry[f"{metric}_std"] = statistics.pstdev(values)
        summary[name] = entry
    return summary
