"""The DICOM series an image came from: a series folder, or the PACS cache's folder beside its converted NIfTI."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom

logger = logging.getLogger(__name__)


def source_series(image_path: str) -> Path | None:
    """The folder of DICOM files behind ``image_path``, or None for an image that is not from a DICOM series."""
    if not image_path:
        return None
    path = Path(image_path)
    folder = path if path.is_dir() else path.parent / path.name.removesuffix(".nii.gz")
    if folder.is_dir() and any(f.is_file() for f in folder.iterdir()):
        return folder
    return None


def dicom_tags(image_path: str) -> tuple[str, str]:
    """``(Modality, BodyPartExamined)`` of the series behind ``image_path``; ``("", "")`` when there is none."""
    folder = source_series(image_path)
    if folder is None:
        return "", ""
    first = next(f for f in sorted(folder.iterdir()) if f.is_file())
    try:
        header = pydicom.dcmread(str(first), stop_before_pixels=True)
    except (pydicom.errors.InvalidDicomError, OSError) as error:
        logger.warning("Cannot read the DICOM tags of %s: %s", first, error)
        return "", ""
    return str(header.get("Modality", "")), str(header.get("BodyPartExamined", ""))
