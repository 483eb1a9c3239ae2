"""Slices as the model sees them: the image in its slice view, scaled by the prompted label's intensity preset.

Training (:mod:`scripts.training_data`) and inference (:mod:`scripts.inference`) prepare slices with these two
functions only, so every label is learnt on the intensities it is later segmented on: its own CT window or MR
normalisation, and display scaling for 8-bit and RGB pictures.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .image_io import ImageVolume
from .intensity import apply_preset
from .orientation import SliceView
from .vocabulary import ResolvedPrompt, Vocabulary

__all__ = ["DISPLAY_PRESET", "prepare_slices", "preset_for"]

DISPLAY_PRESET = {"type": "display"}  # 8-bit and RGB pictures are already display-ready: scaled as displayed


def preset_for(image: ImageVolume, vocabulary: Vocabulary, entry: ResolvedPrompt | None, modality: str) -> dict:
    """The intensity preset a prompt is answered on: display scaling for pictures, else the label's preset for
    ``modality`` (the modality's default for free text and unnamed objects)."""
    if image.is_rgb or image.array.dtype == np.uint8:
        return dict(DISPLAY_PRESET)
    if entry is not None and entry.known:
        return vocabulary.preset_for(entry.name, modality)
    return vocabulary.default_preset(modality)


def prepare_slices(image: ImageVolume, view: SliceView, preset: dict[str, Any]) -> np.ndarray:
    """D x H x W (D x H x W x 3 for RGB) float32 in [0, 1]: ``image`` in ``view``, scaled by ``preset``."""
    array = view.to_view(image.array)
    if preset.get("type") == DISPLAY_PRESET["type"]:
        return _display(array)
    return np.ascontiguousarray(apply_preset(array, preset), dtype=np.float32)


def _display(array: np.ndarray) -> np.ndarray:
    """Pictures as displayed: unsigned integers (8-bit, 16-bit) over their type's range, anything else (float RGB,
    say) from its smallest to its largest value, NaN and Inf replaced as in the presets."""
    if np.issubdtype(array.dtype, np.unsignedinteger):
        return np.ascontiguousarray(array, dtype=np.float32) / np.float32(np.iinfo(array.dtype).max)
    return apply_preset(array, {"type": "percentile", "lower": 0, "upper": 100})
