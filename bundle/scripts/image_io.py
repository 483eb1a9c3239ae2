"""Read medical images with their geometry and write label maps in exactly that geometry.

Volumes (NIfTI, NRRD, DICOM series folders) are read with ITK, so every format gives the same convention:
``array[i, j, k]`` is the voxel 3D Slicer calls IJK, ``direction``/``origin`` are ITK's LPS values. Pictures
(PNG/JPEG, single-frame DICOM, 2D NIfTI) are 2D arrays of rows x columns (x 3 for colour).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import itk
import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageVolume", "output_path_for", "read_image", "write_label"]

logger = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class ImageVolume:
    """An image array in the file's own index order, with the geometry needed to write results back."""

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: np.ndarray  # LPS direction cosines, one column per index axis (ITK convention)
    path: Path
    is_2d: bool = False
    is_rgb: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def affine_ras(self) -> np.ndarray:
        """4 x 4 matrix from voxel index (i, j, k) to RAS millimetres; for 2D pictures, rows/columns as i/j."""
        direction = np.eye(3)
        spacing = np.ones(3)
        origin = np.zeros(3)
        n = len(self.spacing)
        direction[:n, :n] = self.direction
        spacing[:n] = self.spacing
        origin[:n] = self.origin
        affine = np.eye(4)
        affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(spacing)
        affine[:3, 3] = _LPS_TO_RAS @ origin
        return affine


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def read_image(path: str | Path) -> ImageVolume:
    """Read a volume, a DICOM series folder or a 2D picture; any problem raises ``ValueError`` naming the file."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"Image not found: {path}")
    if path.is_dir():
        volume = _read_dicom_series(path)
    else:
        suffix = _suffix(path)
        if suffix in PICTURE_SUFFIXES:
            volume = _read_picture(path)
        elif suffix in VOLUME_SUFFIXES or suffix == ".dcm":
            volume = _read_itk(path, path)
        else:
            raise ValueError(
                f"Unsupported image format {suffix!r} for {path}: use NIfTI, NRRD, a DICOM folder or file, PNG or JPEG"
            )
    _check_array(volume)
    return volume


def _read_itk(source: Path | list[str], path: Path) -> ImageVolume:
    try:
        if isinstance(source, list):
            reader = itk.ImageSeriesReader.New(FileNames=source, ForceOrthogonalDirection=False)
            reader.Update()
            image = reader.GetOutput()
        else:
            image = itk.imread(str(source))
    except (RuntimeError, ValueError, OSError) as error:
        raise ValueError(f"Cannot read image {path}: {_first_line(error)}") from error
    if image.GetNumberOfComponentsPerPixel() > 1 and image.GetImageDimension() == 2:
        array = np.asarray(itk.array_view_from_image(image)).copy()  # rows x columns x channels
        return ImageVolume(array[..., :3], tuple(image.GetSpacing())[::-1], (0.0, 0.0), np.eye(2), path, True, True)
    array = np.asarray(itk.array_view_from_image(image)).copy()
    ndim = image.GetImageDimension()
    array = array.transpose(tuple(range(array.ndim - 1, -1, -1)))  # ITK's numpy view is (k, j, i)
    direction = np.asarray(itk.array_from_matrix(image.GetDirection()), dtype=np.float64)
    spacing = tuple(float(s) for s in image.GetSpacing())
    origin = tuple(float(o) for o in image.GetOrigin())
    if ndim == 3 and array.shape[2] == 1 and _suffix(path) == ".dcm":
        array = array[:, :, 0].T  # a single DICOM frame: a picture of rows x columns
        return ImageVolume(array, spacing[1::-1], origin[:2], np.eye(2), path, is_2d=True)
    if ndim == 2:
        return ImageVolume(array.T, spacing[::-1], origin[::-1], np.eye(2), path, is_2d=True)
    return ImageVolume(array, spacing, origin, direction, path)


def _read_dicom_series(folder: Path) -> ImageVolume:
    files = [p for p in folder.iterdir() if p.is_file()]
    if not files:
        raise ValueError(f"DICOM folder {folder} is empty")
    names = itk.GDCMSeriesFileNames.New(Directory=str(folder))
    series = list(names.GetSeriesUIDs())
    if not series:
        raise ValueError(f"No DICOM series found in {folder}")
    chosen = max(series, key=lambda uid: len(names.GetFileNames(uid)))
    if len(series) > 1:
        logger.warning("%s holds %d DICOM series; reading the largest, %s", folder, len(series), chosen)
    return _read_itk(list(names.GetFileNames(chosen)), folder)


def _read_picture(path: Path) -> ImageVolume:
    try:
        with Image.open(path) as picture:
            picture.load()
            rgb = picture.mode not in ("L", "I", "I;16", "F", "1")
            array = np.asarray(picture.convert("RGB") if rgb else picture)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"Cannot read image {path}: {_first_line(error)}") from error
    if rgb and np.ptp(array.astype(np.int16), axis=-1).max() == 0:
        array, rgb = array[..., 0], False  # a grey picture stored as RGB
    return ImageVolume(np.ascontiguousarray(array), (1.0, 1.0), (0.0, 0.0), np.eye(2), path, True, rgb)


def _check_array(volume: ImageVolume) -> None:
    spatial = volume.array.shape[:2] if volume.is_rgb else volume.array.shape
    if len(spatial) > 3 or (len(spatial) == 3 and volume.is_2d):
        raise ValueError(
            f"{len(spatial)}D images are not supported: {volume.path} has shape {volume.array.shape}; "
            "give a 2D picture or a 3D volume (one time point / channel)"
        )
    if len(spatial) < 2:
        raise ValueError(f"{volume.path} has shape {volume.array.shape}: a 1D array is not an image")
    if 0 in spatial:
        raise ValueError(f"{volume.path} has an empty axis (shape {volume.array.shape})")
    if volume.array.dtype.kind not in "uifb":
        raise ValueError(f"{volume.path} has unsupported pixel type {volume.array.dtype}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


def write_label(label: np.ndarray, reference: ImageVolume, output_path: str | Path) -> Path:
    """Write an integer label map in ``reference``'s exact grid; the format follows the file suffix."""
    output_path = Path(output_path)
    expected = reference.array.shape[:2] if reference.is_2d else reference.array.shape
    if label.shape != expected:
        raise ValueError(f"Label shape {label.shape} does not match the image shape {expected}")
    dtype = np.uint8 if label.max(initial=0) < 256 else np.uint16
    label = label.astype(dtype)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    suffix = _suffix(output_path)
    if suffix == ".png":
        if not reference.is_2d:
            raise ValueError("PNG output is only for 2D images")
        Image.fromarray(label).save(output_path)
        return output_path
    if suffix not in VOLUME_SUFFIXES:
        raise ValueError(f"Unsupported output format {suffix!r}: use .nii.gz, .nii or .nrrd")
    image = itk.image_from_array(np.ascontiguousarray(label.T))  # back to ITK's (k, j, i) numpy order
    image.SetSpacing([float(s) for s in reference.spacing])
    image.SetOrigin([float(o) for o in reference.origin])
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(reference.direction, dtype=np.float64)))
    itk.imwrite(image, str(output_path), compression=True)
    return output_path


def output_path_for(input_path: str | Path, output_dir: str | Path, suffix: str = ".nii.gz", postfix: str = "") -> Path:
    """``output_dir/<input name without extension><postfix><suffix>``; a DICOM folder uses its own name."""
    path = Path(input_path)
    name = path.name
    for ext in (*VOLUME_SUFFIXES, *PICTURE_SUFFIXES, ".dcm"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return Path(output_dir) / f"{name}{postfix}{suffix}"
