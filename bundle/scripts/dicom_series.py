"""Check a DICOM series from its headers before ITK reads its pixels, so a bad series is refused with the reason.

ITK stacks whatever files it is given: a gap, uneven spacing or a second stack under the same series UID gives a
volume with wrong geometry and no error, and a report, a SEG or an undecodable transfer syntax gives errors that
do not say what is wrong. Only headers are read here (pydicom, no pixels). Enhanced multi-frame files are read by
ITK with the right geometry when their frames are evenly spaced in file order along the slice normal, so they are
checked frame by frame instead of refused.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

__all__ = ["NOT_IMAGES", "check_series", "series_in_folder"]

logger = logging.getLogger(__name__)

# Transfer syntaxes ITK's GDCM (3.2.5 in ITK 5.4.7) decodes, each read back here; HTJ2K goes to the same
# OpenJPEG, built with its high-throughput block decoder. Others (private, video, JPEG XL) fail in ITK.
DECODABLE_SYNTAXES = frozenset(
    {
        uid.ImplicitVRLittleEndian,
        uid.ExplicitVRLittleEndian,
        uid.ExplicitVRBigEndian,
        uid.DeflatedExplicitVRLittleEndian,
        uid.JPEGBaseline8Bit,
        uid.JPEGExtended12Bit,
        uid.JPEGLosslessP14,
        uid.JPEGLosslessSV1,
        uid.JPEGLSLossless,
        uid.JPEGLSNearLossless,
        uid.JPEG2000Lossless,
        uid.JPEG2000,
        uid.JPEG2000MCLossless,
        uid.JPEG2000MC,
        uid.RLELossless,
        "1.2.840.10008.1.2.4.201",  # HTJ2K lossless, lossless RPCL, lossy
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
    }
)
# Objects that are not images, by modality; SOP classes that say the same when the modality is wrong or missing.
NOT_IMAGES = {
    "SEG": "a DICOM SEG (segmentation)",
    "SR": "a DICOM SR (structured report)",
    "KO": "a DICOM KO (key object selection)",
    "PR": "a DICOM PR (presentation state)",
    "RTSTRUCT": "a DICOM RTSTRUCT (RT structure set)",
    "REG": "a DICOM REG (registration)",
    "DOC": "an encapsulated document",
    "RTPLAN": "a DICOM RT plan",
    "RTDOSE": "a DICOM RT dose grid",
    "RTRECORD": "a DICOM RT treatment record",
    "PLAN": "a DICOM plan",
}
_CLASS_PREFIXES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
    "1.2.840.10008.5.1.4.1.1.88.59": "KO",
    "1.2.840.10008.5.1.4.1.1.88.": "SR",
    "1.2.840.10008.5.1.4.1.1.481.3": "RTSTRUCT",
    "1.2.840.10008.5.1.4.1.1.11.": "PR",
}
_READ_ERRORS = (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, struct.error)
_COSINE_TOLERANCE = 1e-3  # direction cosines that differ by less are the same orientation (about 0.06 degrees)
_CONVERT = "convert it to NIfTI (e.g. dcm2niix) or export the series again from the scanner or PACS"


@dataclass(frozen=True)
class _Plane:
    """Where one slice (a file, or a frame of a multi-frame file) lies; LPS millimetres."""

    name: str
    position: np.ndarray | None  # ImagePositionPatient: the centre of the first pixel
    orientation: np.ndarray | None  # ImageOrientationPatient: row direction, then column direction
    spacing: np.ndarray | None  # PixelSpacing: between rows, between columns


def series_in_folder(folder: Path) -> list[Path]:
    """The files of the folder's image series (the largest if several), checked, in the order ITK must stack them."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"DICOM folder {folder} is empty")
    headers, unreadable = {}, []
    for path in files:
        try:
            headers[path] = _header(path)
        except ValueError as error:
            unreadable.append(str(error))
    if unreadable:
        start = f"No DICOM series found in {folder}" if not headers else f"{folder} holds files that are not DICOM"
        raise ValueError(f"{start}: {unreadable[0]}; give a folder that holds only the DICOM files of one series")
    series: dict[str, list[Path]] = {}
    for path, ds in headers.items():
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(path)
    chosen = max(series, key=lambda key: ("Rows" in headers[series[key][0]], len(series[key])))
    if len(series) > 1:
        logger.warning(
            "%s holds %d DICOM series; reading the largest image series, %s (%d files)",
            folder,
            len(series),
            chosen,
            len(series[chosen]),
        )
    return _check({path: headers[path] for path in series[chosen]}, folder)


def check_series(files: list[Path]) -> list[Path]:
    """Refuse a series ITK would misread or fail on, with the reason (``ValueError``); else its files in stacking
    order: sorted along the slice normal (the cross product of the row and column directions)."""
    headers = {}
    for path in map(Path, files):
        try:
            headers[path] = _header(path)
        except ValueError as error:
            raise ValueError(f"Cannot read image {path}: {error}") from error
    return _check(headers, next(iter(headers)).parent if len(headers) > 1 else None)


def _header(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=False)
    except _READ_ERRORS as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path.name} is not a readable DICOM file ({reason})") from error


def _check(headers: dict[Path, Dataset], folder: Path | None) -> list[Path]:
    """``folder``: where the series was found, for messages; None for a file given alone."""
    files = list(headers)
    where = f"DICOM series in {folder}" if folder else f"DICOM file {files[0]}"
    for path, ds in headers.items():
        _check_object(ds, f"{where}: {path.name}" if folder else where)
    sizes: dict[tuple, str] = {}
    for path, ds in headers.items():
        sizes.setdefault((ds.Rows, ds.Columns), path.name)
    if len(sizes) > 1:
        shown = ", ".join(f"{rows}x{columns} in {name}" for (rows, columns), name in sizes.items())
        raise ValueError(f"{where}: slices differ in size ({shown}); keep the slices of one stack in the folder")
    multi_frame = [path for path, ds in headers.items() if _frames(ds) > 1]
    if multi_frame and len(files) > 1:
        raise ValueError(
            f"{where}: {len(multi_frame)} of its {len(files)} files are multi-frame; a series is read either as "
            f"one multi-frame file or as single-frame slices: {_CONVERT}"
        )
    planes = _frame_planes(files[0], headers[files[0]]) if multi_frame else [_file_plane(p, headers[p]) for p in files]
    if len(planes) == 1:
        return files  # one 2D picture: no stacking, no geometry to check
    heights = _heights(planes, where)
    if multi_frame:
        _check_spacing(np.sort(heights), where)
        _check_frame_order(heights, planes, where)
        return files
    order = np.argsort(heights, kind="stable")
    _check_spacing(heights[order], where, [planes[i].name for i in order])
    return [files[i] for i in order]


def _check_object(ds: Dataset, subject: str) -> None:
    """Refuse objects that are not images and transfer syntaxes ITK cannot decode; ``subject`` names the file."""
    meta = getattr(ds, "file_meta", Dataset())
    sop_class = str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", ""))
    modality = str(ds.get("Modality", "")).upper()
    kind = modality if modality in NOT_IMAGES else None
    kind = kind or next((k for prefix, k in _CLASS_PREFIXES.items() if sop_class.startswith(prefix)), None)
    if kind or "Rows" not in ds or "Columns" not in ds:
        what = NOT_IMAGES[kind] if kind else "an object without pixel data"
        raise ValueError(
            f"{subject} is {what} ({_uid_name(sop_class, 'no SOP class')}), not an image "
            "series; pick the image series it refers to (the CT or MR series of the same study)"
        )
    syntax = meta.get("TransferSyntaxUID")
    if syntax not in DECODABLE_SYNTAXES:
        name = "missing" if syntax is None else f"{syntax} ({_uid_name(syntax, '')})"
        raise ValueError(
            f"{subject} has transfer syntax {name}, which this reader cannot decode; export the series "
            "in a standard transfer syntax such as Explicit VR Little Endian (from the PACS or scanner, or with "
            "the vendor's tools)"
        )


def _uid_name(value: str, missing: str) -> str:
    """The standard name of a UID, 'private or unknown' for others, ``missing`` for none."""
    if not value:
        return missing
    name = uid.UID(value).name
    return name if name != value else "private or unknown"


def _frames(ds: Dataset) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _numbers(source: Dataset | None, keyword: str, count: int) -> np.ndarray | None:
    """``count`` numbers of ``keyword`` in ``source``, or None where missing or malformed."""
    try:
        values = np.asarray([float(v) for v in source.get(keyword)], dtype=np.float64)
    except (AttributeError, TypeError, ValueError):
        return None
    return values if values.size == count and np.isfinite(values).all() else None


def _file_plane(path: Path, ds: Dataset) -> _Plane:
    return _Plane(
        path.name,
        _numbers(ds, "ImagePositionPatient", 3),
        _numbers(ds, "ImageOrientationPatient", 6),
        _numbers(ds, "PixelSpacing", 2),
    )


def _frame_planes(path: Path, ds: Dataset) -> list[_Plane]:
    """One plane per frame of a multi-frame file, from its per-frame and shared functional groups."""
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or [None] * _frames(ds)
    return [
        _Plane(
            f"{path.name} frame {number}",
            _group_value(frame, shared, "PlanePositionSequence", "ImagePositionPatient", 3),
            _group_value(frame, shared, "PlaneOrientationSequence", "ImageOrientationPatient", 6),
            _group_value(frame, shared, "PixelMeasuresSequence", "PixelSpacing", 2),
        )
        for number, frame in enumerate(per_frame, start=1)
    ]


def _group_value(
    frame: Dataset | None, shared: Dataset | None, sequence: str, keyword: str, count: int
) -> np.ndarray | None:
    """A functional group's value for one frame: its own, else the shared one."""
    found = _numbers(_item(frame, sequence), keyword, count)
    return found if found is not None else _numbers(_item(shared, sequence), keyword, count)


def _item(ds: Dataset | None, sequence: str) -> Dataset | None:
    items = ds.get(sequence) if ds is not None else None
    return items[0] if items else None


def _heights(planes: list[_Plane], where: str) -> np.ndarray:
    """Each slice's position along the slice normal (mm), once orientation and pixel spacing agree."""
    lacking = [p.name for p in planes if p.position is None or p.orientation is None]
    if lacking:
        raise ValueError(
            f"{where}: {len(lacking)} of its {len(planes)} slices (e.g. {lacking[0]}) lack ImagePositionPatient or "
            "ImageOrientationPatient, so they cannot be stacked into a volume (a screen capture, cine or "
            "projection series?); give a CT or MR series, or read one file alone as a 2D picture"
        )
    first = planes[0]
    for plane in planes[1:]:
        if np.abs(plane.orientation - first.orientation).max() > _COSINE_TOLERANCE:
            raise ValueError(
                f"{where}: mixed orientations ({_show(first.orientation)} in {first.name}, "
                f"{_show(plane.orientation)} in {plane.name}; a localizer or a second stack?); keep the slices "
                "of one stack in the folder"
            )
        if (plane.spacing is None) != (first.spacing is None) or (
            plane.spacing is not None and not np.allclose(plane.spacing, first.spacing, rtol=1e-3, atol=1e-4)
        ):
            raise ValueError(
                f"{where}: mixed pixel spacing ({_show(first.spacing)} mm in {first.name}, "
                f"{_show(plane.spacing)} mm in {plane.name}); keep the slices of one stack in the folder"
            )
    row, column = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row, column)
    if np.linalg.norm(normal) < 0.5:
        raise ValueError(f"{where}: ImageOrientationPatient {_show(first.orientation)} has parallel axes")
    normal = normal / np.linalg.norm(normal)
    positions = np.asarray([p.position for p in planes])
    heights = positions @ normal
    # A volume stacks its slices along the normal: slices that drift sideways (a gantry-tilted CT) would be read
    # as a straight stack, millimetres away from where they are.
    drift = np.linalg.norm(positions - positions[0] - np.outer(heights - heights[0], normal), axis=1)
    allowed = 0.1 * (float(np.min(first.spacing)) if first.spacing is not None else 1.0)
    if drift.max() > allowed:
        worst = int(drift.argmax())
        raise ValueError(
            f"{where}: the slices are sheared, not stacked along their normal ({planes[worst].name} lies "
            f"{drift[worst]:.2f} mm to the side of the first slice's normal: a gantry-tilted acquisition?); "
            f"{_CONVERT}, which corrects the tilt"
        )
    return heights


def _check_frame_order(heights: np.ndarray, planes: list[_Plane], where: str) -> None:
    """ITK stacks frames in file order, so distinct evenly spaced frames must also run one way along the normal."""
    gaps = np.diff(heights)
    if (gaps > 0).any() and (gaps < 0).any():
        index = int(np.argmax(np.sign(gaps) != np.sign(heights[-1] - heights[0])))
        raise ValueError(
            f"{where}: frames are not stored in order along the slice normal ({planes[index + 1].name} at "
            f"{heights[index + 1]:.2f} mm after {heights[index]:.2f} mm), which this reader cannot stack; {_CONVERT}"
        )


def _check_spacing(heights: np.ndarray, where: str, names: list[str] | None = None) -> None:
    """Sorted positions along the normal must be distinct and evenly spaced (1% of the spacing or 0.01 mm)."""
    gaps = np.diff(heights)
    duplicated = np.flatnonzero(gaps <= 0.01)
    if duplicated.size:
        i = int(duplicated[0])
        pair = f" ({names[i]} and {names[i + 1]})" if names else ""
        raise ValueError(
            f"{where}: duplicated slice positions ({duplicated.size} repeated, e.g. two slices at {heights[i]:.2f} "
            f"mm{pair}); it holds several stacks (echoes, phases, repeats?) under one series UID: export one stack "
            "as its own series"
        )
    step = float(np.median(gaps))
    tolerance = max(0.01 * step, 0.01)
    multiples = np.maximum(np.round(gaps / step), 1)
    uneven = np.abs(gaps - multiples * step) > tolerance * multiples
    if uneven.any():
        values = ", ".join(f"{g:g}" for g in sorted({round(float(g), 3) for g in gaps})[:8])
        raise ValueError(
            f"{where}: inconsistent slice spacing (values {values} mm along the slice normal); ITK would stack "
            f"the slices as if evenly spaced: {_CONVERT}, or resample it"
        )
    missing = [
        f"{int(k) - 1} slice{'s' if k > 2 else ''} missing between positions {heights[i]:.2f} and "
        f"{heights[i + 1]:.2f} mm"
        for i, k in enumerate(multiples)
        if k >= 2
    ]
    if missing:
        raise ValueError(
            f"{where}: {'; '.join(missing[:5])} (spacing {step:g} mm); export the complete series again from the "
            "scanner or PACS"
        )


def _show(values: np.ndarray | None) -> str:
    return "none" if values is None else "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
