"""Intensity presets: CT windows and MR percentile normalisation, mapping any volume to [0, 1]."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from monai.transforms import ScaleIntensityRange, ScaleIntensityRangePercentiles

__all__ = ["apply_preset", "guess_modality"]

logger = logging.getLogger(__name__)


def apply_preset(array: np.ndarray, preset: dict[str, Any]) -> np.ndarray:
    """Scale ``array`` to float32 in [0, 1] with a ``ct_window`` or ``percentile`` preset; NaN/Inf are replaced."""
    array = _finite(np.asarray(array, dtype=np.float32))
    kind = preset.get("type")
    if kind == "ct_window":
        low = preset["center"] - preset["width"] / 2
        transform = ScaleIntensityRange(a_min=low, a_max=low + preset["width"], b_min=0.0, b_max=1.0, clip=True)
    elif kind == "percentile":
        transform = ScaleIntensityRangePercentiles(
            lower=preset["lower"], upper=preset["upper"], b_min=0.0, b_max=1.0, clip=True
        )
    else:
        raise ValueError(f"Unknown intensity preset type {kind!r} in {preset}; use 'ct_window' or 'percentile'")
    return np.asarray(transform(array), dtype=np.float32)


def guess_modality(array: np.ndarray) -> str:
    """CT when values look like Hounsfield units (air near -1000 present), else MR.

    CT volumes contain air (about -1000 HU) outside the body; MR intensities are non-negative.
    """
    finite = np.asarray(array)[np.isfinite(array)] if np.issubdtype(np.asarray(array).dtype, np.floating) else array
    if finite.size == 0:
        return "MR"
    return "CT" if float(np.min(finite)) <= -500 else "MR"


def _finite(array: np.ndarray) -> np.ndarray:
    bad = ~np.isfinite(array)
    if not bad.any():
        return array
    finite = array[~bad]
    fill = float(finite.min()) if finite.size else 0.0
    logger.warning("Replacing %d non-finite voxels with %g", int(bad.sum()), fill)
    return np.where(bad, fill, array).astype(np.float32)
