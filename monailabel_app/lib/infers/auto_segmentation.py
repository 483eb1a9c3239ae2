"""Automatic segmentation (Slicer's auto tab): the vocabulary labels the client asks for, by text."""

from __future__ import annotations

from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferType

from scripts.prompts import PromptSet

from ..model_service import ModelService
from .base import Medsam3InferTask
from .request_fields import as_list, free_text


class AutoSegmentation(Medsam3InferTask):
    """Segments ``labels`` (names), ``label_prompt`` (indices) or free ``text``; by default (nothing named, or an
    empty ``label_prompt`` as OHIF's Class tab sends) the series' default set (:meth:`default_labels`)."""

    def __init__(self, service: ModelService, label_names: dict[str, int]) -> None:
        super().__init__(
            service,
            type=InferType.SEGMENTATION,
            labels=label_names,
            description="Medical SAM3: segments structures by name (text prompts); one multi-label map",
            config={"text": "", "labels": ""},
        )

    def prompts(self, request: dict[str, Any]) -> PromptSet:
        indices = as_list(request.get("label_prompt"), "label_prompt")
        texts = self.names_for(indices) + [str(n) for n in as_list(request.get("labels"), "labels")]
        texts += free_text(request)
        return PromptSet.create(texts=list(dict.fromkeys(texts)) or self.default_labels(request))
