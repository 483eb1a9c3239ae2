"""What every Medical SAM3 infer task shares: readiness in /info, error mapping, writing the result."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from abc import abstractmethod
from typing import Any

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask

from scripts.image_io import ImageVolume
from scripts.inference import SegmentationResult
from scripts.prompts import PromptSet

from ..model_service import ModelNotReady, ModelService, write_result

logger = logging.getLogger(__name__)


class Medsam3InferTask(InferTask):
    """Turns a client's request into a :class:`PromptSet`, runs the shared model and answers in the client's format.

    Bad requests become HTTP 400 with the reason; a model without weights answers 503 with what to do.
    """

    def __init__(self, service: ModelService, type: str, labels: Any, description: str, config: dict[str, Any]) -> None:
        super().__init__(type=type, labels=labels, dimension=3, description=description, config=config)
        self.service = service

    def is_valid(self) -> bool:
        return True  # listed even when not ready, so /info can say why

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["ready"] = self.service.ready
        info["status"] = self.service.status
        return info

    @abstractmethod
    def prompts(self, request: dict[str, Any]) -> PromptSet:
        """The request's prompts, in the original image's voxel indices."""

    def output(self, result: SegmentationResult) -> np.ndarray:
        """The label map to send back (the multi-label map by default)."""
        return result.label

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        start = time.perf_counter()
        image = str(request.get("image") or "")
        if not image or not Path(image).exists():
            raise HTTPException(status_code=404, detail="Image not found in the datastore (check the image id)")
        try:
            prompts = self.prompts(request)
            volume, result, summary = self.service.segment(image, prompts)
            path = self._write(self.output(result), volume, request)
        except ModelNotReady as error:
            raise HTTPException(status_code=503, detail=str(error)) from error
        except (ValueError, FileNotFoundError, KeyError) as error:
            logger.warning("Rejected %s request: %s", self.type, error)
            raise HTTPException(status_code=400, detail=_message(error)) from error
        summary["timings"]["server_total"] = round(time.perf_counter() - start, 4)
        summary["label_names"] = {row["name"]: row["index"] for row in result.labels}
        return path, summary

    def _write(self, label: np.ndarray, volume: ImageVolume, request: dict[str, Any]) -> str:
        extension = request.get("result_extension") or ".nii.gz"
        return write_result(label, volume, extension, request.get("result_dtype"))


def _message(error: Exception) -> str:
    if isinstance(error, KeyError):
        return f"Missing request field {error}"
    return str(error)
