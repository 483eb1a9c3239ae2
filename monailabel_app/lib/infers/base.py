"""What every Medical SAM3 infer task shares: readiness in /info, error mapping, label numbering, the result file."""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from typing import Any

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.utils.app import app_instance

from scripts.cancellation import Cancelled
from scripts.dicom_seg import segments_for
from scripts.inference import SegmentationResult
from scripts.label_numbering import renumber, to_client_values
from scripts.prompts import PromptSet, parse_flag

from ..auto_labels import AutoLabels
from ..datastore import readable_image
from ..dicom_source import dicom_tags, source_series
from ..model_service import ModelNotReady, ModelService, write_result
from ..safe_paths import check_name

logger = logging.getLogger(__name__)


class Medsam3InferTask(InferTask):
    """Turns a client's request into a :class:`PromptSet`, runs the shared model and answers in the client's format.

    Result voxels carry the task's label values (``labels``: name -> 1..N, as Slicer and OHIF read them; see
    :mod:`scripts.label_numbering`); free text gets the next values. Bad requests become HTTP 400 with the
    reason, a model without weights 503.
    """

    def __init__(
        self, service: ModelService, type: str, labels: dict[str, int], description: str, config: dict[str, Any]
    ) -> None:
        super().__init__(type=type, labels=labels, dimension=3, description=description, config=config)
        self.service = service
        self.auto_labels = AutoLabels.load()

    def is_valid(self) -> bool:
        return True  # listed even when not ready, so /info can say why

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["ready"] = self.service.ready
        info["status"] = self.service.status
        # labels are numbered 1..N for clients; the bundle's label maps (and the vocabulary) use these indices
        info["vocabulary_index"] = {name: self.service.vocabulary.resolve(name).index for name in self.labels}
        return info

    @abstractmethod
    def prompts(self, request: dict[str, Any]) -> PromptSet:
        """The request's prompts, in the original image's voxel indices."""

    def default_labels(self, request: dict[str, Any]) -> list[str]:
        """What to segment when the client names nothing (OHIF's Auto, an empty ``label_prompt``): the set for the
        series' modality and body part (:mod:`lib.auto_labels`), or every label the site chose with ``--conf
        labels``. Without DICOM tags the modality is guessed from the intensities."""
        image = str(request.get("image") or "")
        modality, body_part = dicom_tags(image)
        if not modality:
            modality = self.service.modality(image)
        return self.auto_labels.choose(list(self.labels), modality, body_part, bool(self.service.settings.labels))

    def names_for(self, indices: list) -> list[str]:
        """The task's label names for label values sent by a client (OHIF's ``label_prompt``)."""
        by_value = {value: name for name, value in self.labels.items()}
        names = []
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, (int, str)) or int(index) not in by_value:
                raise ValueError(f"Label index {index!r} is not one of this model's labels (1..{len(by_value)})")
            names.append(by_value[int(index)])
        return names

    def output(self, result: SegmentationResult, request: dict[str, Any]) -> tuple[np.ndarray, dict[str, int]]:
        """The label map to send back and its ``{name: value}``, renumbered to the task's label values."""
        mapping, names = to_client_values(result.labels, self.labels)
        return renumber(result.label, mapping), names

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        start = time.perf_counter()
        image = str(request.get("image") or "")
        app = app_instance()  # only a datastore, session or uploaded image: never any file the server can read
        if not readable_image(image, app.datastore(), app.sessions()):
            raise HTTPException(status_code=404, detail="Image not found in the datastore (check the image id)")
        try:
            extension, compress = self._result_options(request)  # bad options refused before the model runs
            prompts = self.prompts(request)
            volume, result, summary = self.service.segment(image, prompts)
            label, label_names = self.output(result, request)
            write_start = time.perf_counter()
            # a DICOM SEG result needs the source series and the segments' codes; other formats need neither
            seg = (
                (source_series(image), segments_for(label_names, self.service.vocabulary))
                if extension == ".dcm"
                else (None, [])
            )
            path = write_result(label, volume, extension, request.get("result_dtype"), compress, seg)
        except ModelNotReady as error:
            raise HTTPException(status_code=503, detail=str(error)) from error
        except Cancelled as error:
            logger.info("Stopped a %s request: %s", self.type, error)
            raise HTTPException(status_code=499, detail=str(error)) from error
        except (ValueError, FileNotFoundError) as error:
            logger.warning("Rejected %s request: %s", self.type, error)
            raise HTTPException(status_code=400, detail=str(error)) from error
        summary["timings"]["io_write"] = round(time.perf_counter() - write_start, 4)
        summary["timings"]["server_total"] = round(time.perf_counter() - start, 4)
        summary["label_names"] = label_names
        return path, summary

    @staticmethod
    def _result_options(request: dict[str, Any]) -> tuple[str, bool]:
        """The result's extension and compression. ``save_label`` is normalised in place: MONAI Label saves the
        result after the task returns, reading the same request, and would take any non-empty string ("false") as
        yes, overwriting the image's label."""
        request["save_label"] = parse_flag(request.get("save_label", False), "save_label")
        extension = request.get("result_extension") or ".nii.gz"
        if request["save_label"]:
            check_name(request.get("label_tag", DefaultLabelTag.ORIGINAL.value), "label_tag")
            if extension == ".dcm":
                raise ValueError(
                    "save_label keeps the result in the datastore, which stores labels as NIfTI or NRRD (a PACS gets "
                    "its DICOM SEG from those): ask for result_extension .nii.gz or .nrrd"
                )
        return extension, parse_flag(request.get("result_compress", True), "result_compress")
