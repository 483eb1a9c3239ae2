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
        foreground = as_list(request.get("foreground"), "foreground")
        background = as_list(request.get("background"), "background")
        texts = free_text(request)[:1]
        if not texts and request.get("label"):
            resolved = self.service.vocabulary.resolve(str(request["label"]))
            texts = [resolved.name] if resolved.known else []  # "Segment_1" is not a prompt
        if not foreground and not background and not texts:
            raise ValueError("No clicks: add a foreground point (or name the segment after a structure)")
        points = [*foreground, *background]
        labels = [1] * len(foreground) + [0] * len(background)
        return PromptSet.create(texts=texts, points=points or None, point_labels=labels or None)

    def output(self, result: SegmentationResult) -> np.ndarray:
        return (result.label > 0).astype(np.uint8)
