"""Interactive segmentation from 3D Slicer's clicks: one structure, refined by foreground/background points."""

from __future__ import annotations

from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferType

from scripts.inference import SegmentationResult
from scripts.prompts import PromptSet

from ..model_service import ModelService
from .base import Medsam3InferTask
from .request_fields import as_list, free_text


class InteractiveSegmentation(Medsam3InferTask):
    """Slicer's payload: ``label`` (segment name), ``foreground``/``background`` IJK points, optional ``roi``.

    The segment name becomes the text prompt when it names a vocabulary structure (the clicks then refine the
    text result); the task's ``text`` option overrides it with free text. Returns a binary mask (0/1).
    """

    def __init__(self, service: ModelService, label_names: dict[str, int]) -> None:
        super().__init__(
            service,
            type=InferType.DEEPGROW,
            labels=label_names,
            description="Medical SAM3: click inside (foreground) or outside (background) a structure; 3D propagation",
            config={"text": ""},
        )

    def prompts(self, request: dict[str, Any]) -> PromptSet:
        roi = roi_numbers(request)  # malformed: refused before the model runs (outside the image: once it is read)
        if roi and len(roi) not in (4, 6):
            raise ValueError(f"roi must have 6 numbers [i0, i1, j0, j1, k0, k1] (4 on a picture), got {roi}")
        foreground = as_list(request.get("foreground"), "foreground")
        background = as_list(request.get("background"), "background")
        texts = free_text(request)  # clicks segment one structure: more than one text is refused below
        if not texts and request.get("label"):
            resolved = self.service.vocabulary.resolve(str(request["label"]))
            texts = [resolved.name] if resolved.known else []  # "Segment_1" is not a prompt
        if not foreground and not background and not texts:
            raise ValueError("No clicks: add a foreground point (or name the segment after a structure)")
        points = [*foreground, *background]
        labels = [1] * len(foreground) + [0] * len(background)
        return PromptSet.create(texts=texts, points=points or None, point_labels=labels or None)

    def output(self, result: SegmentationResult, request: dict[str, Any]) -> tuple[np.ndarray, dict[str, int]]:
        """A 0/1 mask (Slicer puts voxels equal to 1 in the current segment), cut to the ``roi`` box if given."""
        mask = (result.label > 0).astype(np.uint8)
        if request.get("roi"):
            mask *= roi_mask(roi_numbers(request), mask.shape)
        return mask, {str(request.get("label") or "object"): 1}


def roi_numbers(request: dict[str, Any]) -> list[float]:
    """Slicer's ``roi`` as finite numbers ([] when absent)."""
    roi = as_list(request.get("roi"), "roi")
    try:
        numbers = [float(v) for v in roi]
    except (TypeError, ValueError) as error:
        raise ValueError(f"roi must be numbers [i0, i1, j0, j1, k0, k1], got {roi!r:.200}") from error
    if not all(np.isfinite(numbers)):
        raise ValueError(f"roi must be finite numbers, got {roi!r:.200}")
    return numbers


def roi_mask(roi: list[float], shape: tuple[int, ...]) -> np.ndarray:
    """Slicer's ROI ``[i_a, i_b, j_a, j_b, k_a, k_b]`` (each pair in either order) as a mask of ``shape``."""
    if len(roi) != 2 * len(shape):
        raise ValueError(f"roi must have {2 * len(shape)} numbers [i0, i1, j0, j1, k0, k1], got {roi}")
    inside = np.zeros(shape, dtype=np.uint8)
    bounds = []
    for axis, size in enumerate(shape):
        low, high = sorted(round(v) for v in roi[2 * axis : 2 * axis + 2])
        if high < 0 or low >= size:
            raise ValueError(f"roi {roi} lies outside the image (shape {shape})")
        bounds.append(slice(max(low, 0), min(high, size - 1) + 1))
    inside[tuple(bounds)] = 1
    return inside
