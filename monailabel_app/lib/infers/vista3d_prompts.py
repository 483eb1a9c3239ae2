"""OHIF v3's MONAI Label extension drives tasks of type ``vista3d``: class indices plus optional points."""

from __future__ import annotations

from typing import Any

from scripts.prompts import PromptSet

from ..model_service import ModelService
from .base import Medsam3InferTask
from .request_fields import as_list

VISTA3D_TYPE = "vista3d"


class Vista3dPrompts(Medsam3InferTask):
    """``label_prompt`` (the task's label values), ``points`` (voxel indices) and ``point_labels`` (1 fg, 0 bg)."""

    def __init__(self, service: ModelService, label_names: dict[str, int]) -> None:
        super().__init__(
            service,
            type=VISTA3D_TYPE,
            labels=label_names,
            description="Medical SAM3 with VISTA3D-style prompts (OHIF): label indices and points",
            config={},
        )

    def prompts(self, request: dict[str, Any]) -> PromptSet:
        indices = as_list(request.get("label_prompt"), "label_prompt")
        points = as_list(request.get("points"), "points")
        labels = as_list(request.get("point_labels"), "point_labels")
        # nothing named and no points (OHIF's Auto; its Class tab with nothing ticked): the series' default set
        texts = self.names_for(indices) or (self.default_labels(request) if not points else [])
        return PromptSet.create(texts=texts, points=points or None, point_labels=labels or None)
