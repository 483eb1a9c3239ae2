"""Intensity presets: CT windows and MR percentile normalisation, mapping any volume to float32 in [0, 1].

The model sees every image as [0, 1] grey levels, so each modality and structure needs its own mapping: a CT
window keeps the Hounsfield range where the structure has contrast, a percentile normalisation copes with MR's
arbitrary units. Presets are plain dicts (as written in ``configs/vocabulary.json``):

* ``{"type": "ct_window", "center": 40, "width": 400}``: clip to [center - width/2, center + width/2], scale.
* ``{"type": "percentile", "lower": 0.5, "upper": 99.5, "nonzero": true}``: map the lower and upper percentiles
  (of the non-zero voxels when ``nonzero``, else of all voxels) to 0 and 1, clipping what lies outside.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from monai.transforms import ScaleIntensityRange

__all__ = ["PRESET_KEYS", "apply_preset", "check_preset", "guess_modality"]

logger = logging.getLogger(__name__)

# The numeric keys each preset type needs.
PRESET_KEYS = {"ct_window": ("center", "width"), "percentile": ("lower", "upper")}
# Air is about -1000 HU and CT volumes nearly always contain some; MR intensities are never this negative.
AIR_THRESHOLD_HU = -500.0
# Stored Hounsfield units fit in int16 (padding values such as -3024 and metal up to 30000 included).
HU_LIMITS = (-32768.0, 32767.0)


def check_preset(preset: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for a preset :func:`apply_preset` cannot use, so a bad vocabulary fails when loaded."""
    if not isinstance(preset, Mapping):
        raise ValueError(f"An intensity preset is a mapping with a 'type', got {preset!r}")
    kind = preset.get("type")
    if kind not in PRESET_KEYS:
        raise ValueError(f"Unknown intensity preset type {kind!r} in {dict(preset)}; use 'ct_window' or 'percentile'")
    for key in PRESET_KEYS[kind]:
        value = preset.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"Intensity preset {dict(preset)} needs a finite number {key!r}")
    if kind == "ct_window" and preset["width"] <= 0:
        raise ValueError(f"CT window width must be positive, got {preset['width']} in {dict(preset)}")
    if kind == "percentile" and not 0 <= preset["lower"] < preset["upper"] <= 100:
        raise ValueError(f"Percentiles must satisfy 0 <= lower < upper <= 100, got {dict(preset)}")
    if not isinstance(preset.get("nonzero", False), bool):
        raise ValueError(f"'nonzero' must be true or false, got {preset['nonzero']!r} in {dict(preset)}")


def apply_preset(array: np.ndarray | torch.Tensor, preset: Mapping[str, Any]) -> np.ndarray:
    """``array`` scaled to float32 in [0, 1] by ``preset``; NaN and Inf are replaced first (with a warning)."""
    check_preset(preset)
    values = _finite(_as_float32(array))
    if preset["type"] == "ct_window":
        low = float(preset["center"]) - float(preset["width"]) / 2
        return _scale(values, low, low + float(preset["width"]))
    sample = values[values != 0] if preset.get("nonzero", False) else values
    if sample.size == 0:  # an all-zero image: nothing to normalise against
        sample = values
    low, high = np.percentile(sample, [preset["lower"], preset["upper"]])
    return _scale(values, float(low), float(high))


def guess_modality(array: np.ndarray | torch.Tensor) -> Literal["CT", "MR"]:
    """ "CT" when the values look like Hounsfield units, else "MR".

    Heuristic: CT when the smallest finite value is at most -500 (air, about -1000 HU, surrounds the body in
    nearly every CT) but not below the int16 range, and the largest is within it; MR intensities are non-negative
    or only slightly negative after filtering. CT stored without its rescale intercept (raw 0..4095) reads as MR:
    give the modality explicitly for such files.
    """
    values = _as_float32(array)
    finite = np.isfinite(values)
    if not finite.any():
        raise ValueError("Cannot guess the modality of an image without finite values")
    low = float(np.min(values, where=finite, initial=np.inf))
    high = float(np.max(values, where=finite, initial=-np.inf))
    is_ct = HU_LIMITS[0] <= low <= AIR_THRESHOLD_HU and high <= HU_LIMITS[1]
    logger.debug("Intensity range [%g, %g] looks like %s", low, high, "CT" if is_ct else "MR")
    return "CT" if is_ct else "MR"


def _as_float32(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    values = np.asarray(array, dtype=np.float32)
    if values.size == 0:
        raise ValueError(f"The image is empty (shape {values.shape})")
    return values


def _finite(values: np.ndarray) -> np.ndarray:
    """NaN and Inf become the smallest finite value (background-like), or 0 when there is none."""
    bad = ~np.isfinite(values)
    if not bad.any():
        return values
    fill = float(np.min(values, where=~bad, initial=np.inf)) if not bad.all() else 0.0
    logger.warning("Replacing %d non-finite voxels (NaN or Inf) with %g", int(bad.sum()), fill)
    return np.where(bad, np.float32(fill), values)


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:  # a constant image (or percentile range): no contrast to keep
        logger.debug("Intensity range [%g, %g] is empty: the image maps to zeros", low, high)
        return np.zeros(values.shape, dtype=np.float32)
    transform = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32)
    return np.asarray(transform(values), dtype=np.float32)
