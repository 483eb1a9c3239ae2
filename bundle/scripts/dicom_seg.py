"""Label maps as DICOM SEG objects that reference their source series, and back.

Writing uses dcmqi's ``itkimage2segimage`` (the ``dcmqi`` wheel ships it), the converter 3D Slicer and MONAI Label
use, with segment names and SNOMED CT codes from the vocabulary, so a PACS or viewer reading the codes sees the
structure each segment names. Reading decodes the frames by their patient positions onto the source series' grid
and maps segments back to label values by their names, so a SEG written by any tool lands voxel for voxel where
the series is, or is refused when it does not fit that grid.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from .image_io import ImageVolume
from .image_writing import write_label
from .vocabulary import SnomedCoding, Vocabulary

__all__ = ["SegmentInfo", "read_seg", "segments_by_value", "segments_for", "write_seg"]

logger = logging.getLogger(__name__)

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
# A label without a code is "Tissue", the generic concept 3D Slicer gives a new segment.
GENERIC = SnomedCoding(category=("85756007", "Tissue"), type=("85756007", "Tissue"))
_TOOL = "itkimage2segimage"


@dataclass(frozen=True)
class SegmentInfo:
    """One segment: the label value it holds in the map, its name and its coded concept."""

    value: int
    name: str
    snomed: SnomedCoding
    color: tuple[int, int, int] = (128, 174, 128)


# Distinct display colours, by label value, so the segments of one SEG can be told apart in a viewer.
PALETTE = [(216, 101, 79), (157, 108, 162), (185, 102, 83), (221, 130, 101), (241, 214, 145), (177, 122, 101)]
PALETTE += [(111, 184, 210), (244, 214, 49), (0, 151, 206), (183, 156, 220), (183, 214, 211), (152, 189, 207)]


def segments_for(values: dict[str, int], vocabulary: Vocabulary) -> list[SegmentInfo]:
    """Segments for ``{name: label value}`` (a result's label names): see :func:`segments_by_value`."""
    return segments_by_value({value: name for name, value in values.items()}, vocabulary)


def segments_by_value(names: dict[int, str], vocabulary: Vocabulary) -> list[SegmentInfo]:
    """Segments for ``{label value: name}``: vocabulary codes where the name is a known label, else generic. Two
    values may share a name (two Slicer segments called "liver"); a value without a name is "Segment <value>"."""
    segments = []
    for value, name in sorted(names.items()):
        name = str(name).strip() or f"Segment {value}"
        resolved = vocabulary.resolve(name)
        entry = vocabulary.by_index.get(resolved.index) if resolved.known else None
        color = PALETTE[(int(value) - 1) % len(PALETTE)]
        segments.append(SegmentInfo(int(value), name, (entry.snomed if entry else None) or GENERIC, color))
    return segments


def write_seg(
    label: np.ndarray,
    reference: ImageVolume,
    series_dir: str | Path,
    segments: list[SegmentInfo],
    output: str | Path,
    series_description: str = "Medical SAM3",
) -> Path:
    """Write ``label`` (in ``reference``'s grid, read from ``series_dir``) as a SEG referencing that series.

    Only values present in ``label`` become segments; an empty label is refused (a SEG needs a segment).
    """
    present = {int(v) for v in np.unique(label)} - {0}
    wanted = [s for s in segments if s.value in present]
    unnamed = sorted(present - {s.value for s in wanted})
    if unnamed:
        raise ValueError(f"Label values {unnamed} have no segment name: give their names in label_info")
    if not wanted:
        raise ValueError("The label is empty: a DICOM SEG needs at least one segment")
    _check_single_frames(Path(series_dir))
    tool = _tool()
    with tempfile.TemporaryDirectory(prefix="medsam3_seg_") as work:
        image = write_label(label.astype(np.uint16), reference, Path(work) / "label.nrrd")
        meta = Path(work) / "meta.json"
        meta.write_text(json.dumps(_metadata(wanted, series_description)))
        command = [tool, "--inputImageList", str(image), "--inputDICOMDirectory", str(series_dir)]
        command += ["--outputDICOM", str(output), "--inputMetadata", str(meta)]  # empty slices are not stored
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not Path(output).is_file() or Path(output).stat().st_size == 0:
        detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ValueError(f"Could not write a DICOM SEG for {series_dir}: {' '.join(detail)}")
    logger.info("Wrote DICOM SEG %s (%d segments)", output, len(wanted))
    return Path(output)


def _check_single_frames(series_dir: Path) -> None:
    """dcmqi references classic single-frame slices only; say so instead of passing on its "Tag not found"."""
    for path in sorted(p for p in series_dir.iterdir() if p.is_file()):
        header = pydicom.dcmread(str(path), stop_before_pixels=True)
        if int(header.get("NumberOfFrames", 1) or 1) > 1:
            raise ValueError(
                "A DICOM SEG can reference only a series of single-frame slices, and this one is an enhanced "
                "multi-frame object: ask for .nii.gz or .nrrd, or convert the series to single frames"
            )


def _tool() -> str:
    """dcmqi's converter: on PATH, or beside this Python (a venv's bin folder is often not on PATH)."""
    found = shutil.which(_TOOL) or shutil.which(_TOOL, path=sysconfig.get_path("scripts"))
    if not found:
        raise RuntimeError(f"{_TOOL} not found: install the pinned requirements (the dcmqi package ships it)")
    return found


def _code(pair: tuple[str, str]) -> dict[str, str]:
    return {"CodeValue": pair[0], "CodingSchemeDesignator": "SCT", "CodeMeaning": pair[1]}


def _metadata(segments: list[SegmentInfo], description: str) -> dict:
    """dcmqi's metadata JSON: one segment per label value, named and coded."""
    attributes = []
    for segment in segments:
        attribute = {
            "labelID": segment.value,
            "SegmentLabel": segment.name[:64],
            "SegmentDescription": segment.name[:64],
            "SegmentAlgorithmType": "SEMIAUTOMATIC",
            "SegmentAlgorithmName": "Medical SAM3",
            "SegmentedPropertyCategoryCodeSequence": _code(segment.snomed.category),
            "SegmentedPropertyTypeCodeSequence": _code(segment.snomed.type),
            "recommendedDisplayRGBValue": list(segment.color),
        }
        if segment.snomed.modifier:
            attribute["SegmentedPropertyTypeModifierCodeSequence"] = _code(segment.snomed.modifier)
        attributes.append(attribute)
    return {
        "ContentCreatorName": "MedicalSAM3",
        "ClinicalTrialSeriesID": "1",
        "ClinicalTrialTimePointID": "1",
        "SeriesDescription": description[:64],
        "SeriesNumber": "300",
        "InstanceNumber": "1",
        "segmentAttributes": [attributes],
        "ContentLabel": "SEGMENTATION",
        "ContentDescription": "Medical SAM3 segmentation",
        "ClinicalTrialCoordinatingCenterName": "medsam3",
        "BodyPartExamined": "",
    }


def read_seg(seg: pydicom.Dataset | str | Path, reference: ImageVolume, values: dict[str, int]) -> np.ndarray:
    """Decode a SEG onto ``reference``'s grid; each segment gets ``values[its SegmentLabel]``.

    Frames are placed by their ImagePositionPatient; a frame off the grid, a different orientation or pixel size,
    or a segment name not in ``values`` raises ``ValueError`` naming it.
    """
    ds = seg if isinstance(seg, pydicom.Dataset) else pydicom.dcmread(str(seg))
    if ds.get("SOPClassUID") != SEG_SOP_CLASS:
        raise ValueError(f"Not a DICOM SEG (SOP class {ds.get('SOPClassUID')})")
    by_number = {}
    for item in ds.SegmentSequence:
        name = str(item.SegmentLabel)
        if name not in values:
            raise ValueError(f"Segment {name!r} is not one of the labels {sorted(values)}")
        by_number[int(item.SegmentNumber)] = values[name]
    direction, spacing, origin = reference.direction, np.asarray(reference.spacing), np.asarray(reference.origin)
    shared = ds.SharedFunctionalGroupsSequence[0]
    orientation = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    if not np.allclose(orientation, np.r_[direction[:, 0], direction[:, 1]], atol=1e-4):
        raise ValueError("The SEG's frames are not in the series' orientation")
    pixel = np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, dtype=float)  # row spacing, column spacing
    if not np.allclose(pixel, spacing[[1, 0]], rtol=1e-4) or (ds.Rows, ds.Columns) != reference.shape[1::-1]:
        raise ValueError("The SEG's frames do not have the series' pixel grid")
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    label = np.zeros(reference.shape, dtype=np.uint16)
    for frame, item in zip(frames, ds.PerFrameFunctionalGroupsSequence, strict=True):
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        index = np.linalg.solve(direction * spacing, position - origin)  # voxel index of the frame's first pixel
        k = int(round(index[2]))
        if not (np.allclose(index[:2], 0, atol=1e-3) and abs(index[2] - k) < 1e-3 and 0 <= k < label.shape[2]):
            raise ValueError(f"A SEG frame at {position.round(3).tolist()} mm is not a slice of the series")
        value = by_number[int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]
        label[:, :, k][frame.T > 0] = value
    return label
