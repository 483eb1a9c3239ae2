"""Read medical images with their geometry (:mod:`scripts.image_writing` writes label maps in exactly that geometry).

Every volume format gives the same convention, ITK's: ``array[i, j, k]`` is the voxel 3D Slicer calls IJK
(the file's own index order), ``spacing`` is per index axis, ``origin`` and ``direction`` (columns = index
axes) are LPS world values. NIfTI is read with nibabel (ITK silently zero-fills truncated NIfTI files) and its
header is kept, so labels written back to NIfTI carry the input's exact affine; NRRD, MetaImage and DICOM
are read with ITK, DICOM once ``dicom_series`` has checked its headers (ITK misreads a gappy or mixed series).
2D pictures (PNG/JPEG, single-frame DICOM, 2D NIfTI/NRRD) are rows x columns (x 3 for colour), with ITK's
picture convention: columns run along ITK index i, rows along j; they keep only spacing.
"""

from __future__ import annotations

import logging
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from PIL import Image

from .dicom_series import check_series, series_in_folder

__all__ = [
    "DICOM_SUFFIX",
    "ITK_SUFFIXES",
    "NIFTI_SUFFIXES",
    "PICTURE_SUFFIXES",
    "ImageVolume",
    "file_suffix",
    "read_image",
]

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIX = ".dcm"
_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])  # its own inverse
_PICTURE_DIRECTION = np.array([[0.0, 1.0], [1.0, 0.0]])  # rows run along LPS y, columns along LPS x
# Errors the readers raise for damaged or foreign files; reported as ValueError with the reason.
_READ_ERRORS = (OSError, EOFError, ValueError, RuntimeError, zlib.error, struct.error, ImageFileError, HeaderDataError)
# ITK component type -> the wrapped ITK Python pixel type that holds it; anything else is read as double.
_ITK_PIXEL_TYPES = {
    "unsigned_char": "UC",
    "char": "SS",  # signed char is not wrapped in ITK Python
    "short": "SS",
    "unsigned_short": "US",
    "int": "SI",
    "unsigned_int": "UI",
    "float": "F",
}


@dataclass
class ImageVolume:
    """An image array in the file's own index order, with the geometry needed to write results back.

    Attributes:
        array: volumes (I, J, K) in file index order; pictures (H, W) or (H, W, 3) rows x columns.
        spacing: millimetres per array axis.
        origin: LPS position (mm) of voxel (0, 0, 0); zeros for pictures.
        direction: LPS direction cosines, one column per array axis.
        nifti_header: the header of a NIfTI input, reused so written labels keep its exact affine.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: np.ndarray
    path: Path
    is_2d: bool = False
    is_rgb: bool = False
    nifti_header: nib.Nifti1Header | None = field(default=None, repr=False)

    @classmethod
    def from_affine(cls, array: np.ndarray, affine_ras: np.ndarray, path: str | Path = "") -> ImageVolume:
        """A 3D volume whose 4 x 4 ``affine_ras`` maps voxel index (i, j, k) to RAS millimetres."""
        linear = _RAS_FROM_LPS @ np.asarray(affine_ras, dtype=np.float64)[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        if not (spacing > 0).all():
            raise ValueError(f"{path}: the affine has a zero-length axis:\n{affine_ras}")
        origin = _RAS_FROM_LPS @ np.asarray(affine_ras, dtype=np.float64)[:3, 3]
        return cls(
            array, tuple(spacing.tolist()), tuple(origin.tolist()), _independent(linear / spacing, path), Path(path)
        )

    @classmethod
    def from_picture(
        cls, array: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0), path: str | Path = ""
    ) -> ImageVolume:
        """A rows x columns (x 3) picture that keeps only its pixel spacing (row spacing, column spacing)."""
        array = np.ascontiguousarray(array)
        return cls(array, tuple(spacing), (0.0, 0.0), _PICTURE_DIRECTION.copy(), Path(path), True, array.ndim == 3)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def affine_ras(self) -> np.ndarray:
        """4 x 4 matrix from array index (i, j, k) to RAS millimetres; pictures map (row, column, 0)."""
        n = len(self.spacing)
        linear, origin = np.eye(3), np.zeros(3)
        linear[:n, :n] = np.asarray(self.direction, dtype=np.float64) * np.asarray(self.spacing)
        origin[:n] = self.origin
        affine = np.eye(4)
        affine[:3, :3] = _RAS_FROM_LPS @ linear
        affine[:3, 3] = _RAS_FROM_LPS @ origin
        return affine


def file_suffix(path: Path) -> str:
    """The file's extension, lower case; ``.nii.gz`` counts as one."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def read_image(path: str | Path, max_voxels: int | None = None) -> ImageVolume:
    """Read a volume, a DICOM series folder or a 2D picture; any problem raises ``ValueError`` naming the file.

    ``max_voxels`` refuses larger images from their header, before any voxel is decompressed (a server's guard
    against a small file that claims a huge grid).
    """
    if not str(path).strip():  # Path("") is the working directory, which would be read as a DICOM folder
        raise ValueError("No image path given")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"Image not found: {path}")
    suffix = file_suffix(path)
    if path.is_dir():
        volume = _read_dicom_series(path, max_voxels)
    elif suffix in NIFTI_SUFFIXES:
        volume = _read_nifti(path, max_voxels)
    elif suffix in PICTURE_SUFFIXES:
        volume = _read_picture(path, max_voxels)
    elif suffix in (*ITK_SUFFIXES, DICOM_SUFFIX):
        if suffix == DICOM_SUFFIX:
            check_series([path])
        volume = _read_itk(str(path), path, max_voxels)
    else:
        raise ValueError(
            f"Unsupported image format {suffix!r} for {path}: use NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), "
            "MetaImage (.mha, .mhd), a DICOM file or series folder, PNG or JPEG"
        )
    if volume.array.dtype.kind not in "biuf":
        raise ValueError(f"{path} has unsupported pixel type {volume.array.dtype}")
    logger.debug("Read %s: shape %s, spacing %s", path, volume.array.shape, volume.spacing)
    return volume


def _check_voxels(shape: tuple[int, ...], path: Path, max_voxels: int | None) -> None:
    """Refuse an image whose header claims more than ``max_voxels`` values (voxels times channels)."""
    count = int(np.prod([int(s) for s in shape], dtype=np.float64))
    if max_voxels is not None and count > max_voxels:
        raise ValueError(
            f"{path.name} claims {count:,} voxels ({' x '.join(str(int(s)) for s in shape)}), more than the "
            f"limit of {max_voxels:,}"
        )


def _cannot_read(path: Path, error: BaseException) -> ValueError:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    reason = lines[-1].strip() if lines else type(error).__name__  # ITK puts the cause on the last line
    return ValueError(f"Cannot read image {path}: {reason}")


def _spatial_shape(shape: tuple[int, ...], path: Path) -> tuple[int, ...]:
    """The image's 2 or 3 spatial sizes; trailing singleton axes beyond the third are dropped."""
    shape = tuple(int(s) for s in shape)
    spatial = shape
    while len(spatial) > 3 and spatial[-1] == 1:
        spatial = spatial[:-1]
    if len(spatial) > 3:
        raise ValueError(
            f"{len(spatial)}D images are not supported: {path} has shape {shape}; give a 2D picture or one 3D volume"
        )
    if len(spatial) < 2:
        raise ValueError(f"{path} has shape {shape}: a 1D array is not an image")
    if 0 in spatial:
        raise ValueError(f"{path} has an empty axis (shape {shape})")
    return spatial


def _read_nifti(path: Path, max_voxels: int | None) -> ImageVolume:
    try:
        image = nib.load(path, mmap=False)
    except _READ_ERRORS as error:
        raise _cannot_read(path, error) from error
    _check_voxels(image.shape, path, max_voxels)
    shape = _spatial_shape(image.shape, path)
    try:
        array = np.asanyarray(image.dataobj).reshape(shape)
    except _READ_ERRORS as error:
        raise _cannot_read(path, error) from error
    header = image.header.copy()
    if len(shape) == 2:  # NIfTI axis 0 (i) runs along the columns, as for every 2D picture
        zooms = header.get_zooms()
        volume = ImageVolume.from_picture(array.T, (float(zooms[1]), float(zooms[0])), path)
    else:
        volume = ImageVolume.from_affine(array, image.affine, path)
    volume.nifti_header = header
    return volume


def _read_itk(source: str | list[str], path: Path, max_voxels: int | None) -> ImageVolume:
    """NRRD, MetaImage, a DICOM file, or (``source`` a list of files) a DICOM series."""
    first = source[0] if isinstance(source, list) else source
    io = itk.ImageIOFactory.CreateImageIO(first, itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise ValueError(f"Cannot read image {path}: no reader recognises the file (damaged or not an image)")
    try:
        io.SetFileName(first)
        io.ReadImageInformation()
    except _READ_ERRORS as error:
        raise _cannot_read(path, error) from error
    dimensions = tuple(io.GetDimensions(axis) for axis in range(io.GetNumberOfDimensions()))
    if not isinstance(source, list):  # refuse 1D and 4D files before ITK looks for a wrapped image type
        _spatial_shape(dimensions, path)
    components = io.GetNumberOfComponents()
    _check_voxels((*dimensions, len(source) if isinstance(source, list) else 1, components), path, max_voxels)
    kind = io.GetComponentTypeAsString(io.GetComponentType())
    try:
        image = (
            itk.imread(source, pixel_type=getattr(itk, _ITK_PIXEL_TYPES.get(kind, "D")))
            if components == 1
            else itk.imread(source)
        )
    except itk.TemplateTypeError as error:  # its message is ITK's list of the types it does wrap
        unsupported = f"{components} values per voxel of type {kind} in {len(dimensions)}D are not supported"
        raise ValueError(f"Cannot read image {path}: {unsupported}; give one channel or 8-bit RGB") from error
    except (*_READ_ERRORS, TypeError) as error:
        raise _cannot_read(path, error) from error
    return _volume_from_itk(image, components, io.GetNameOfClass() == "GDCMImageIO", path)


def _volume_from_itk(image: itk.Image, components: int, is_dicom: bool, path: Path) -> ImageVolume:
    array = itk.array_from_image(image)  # ITK's numpy order is reversed: (k, j, i) or (j, i), channels last
    ndim = image.GetImageDimension()
    spacing = tuple(float(s) for s in image.GetSpacing())
    if ndim == 3 and array.shape[0] == 1 and is_dicom:
        array, ndim, spacing = array[0], 2, spacing[:2]  # a single DICOM frame is a picture
    if components > 1:
        if ndim != 2 or components not in (3, 4):
            raise ValueError(f"{path} has {components} values per voxel: give a single-channel volume or RGB picture")
        return ImageVolume.from_picture(array[..., :3], (spacing[1], spacing[0]), path)
    if ndim == 2:
        return ImageVolume.from_picture(array, (spacing[1], spacing[0]), path)
    direction = _independent(np.asarray(itk.array_from_matrix(image.GetDirection()), dtype=np.float64)[:3, :3], path)
    if ndim > 3:  # trailing singleton axes (a 4D file holding one volume): ITK's numpy order puts them first
        array, spacing = array.reshape(array.shape[ndim - 3 :]), spacing[:3]
    origin = tuple(float(o) for o in image.GetOrigin())[:3]
    return ImageVolume(np.ascontiguousarray(array.transpose(2, 1, 0)), spacing, origin, direction, path)


def _independent(direction: np.ndarray, path: str | Path) -> np.ndarray:
    """``direction`` (unit axis columns), refused when two axes are parallel: no slice view exists for it."""
    if not np.isfinite(direction).all() or abs(np.linalg.det(direction)) < 1e-3:
        raise ValueError(f"{path}: the image's axes are not independent (direction matrix {direction.tolist()})")
    return direction


def _read_dicom_series(folder: Path, max_voxels: int | None) -> ImageVolume:
    files = series_in_folder(folder)  # refuses non-images, gaps, mixed stacks before ITK reads a pixel
    return _read_itk([str(f) for f in files] if len(files) > 1 else str(files[0]), folder, max_voxels)


def _read_picture(path: Path, max_voxels: int | None) -> ImageVolume:
    try:
        with Image.open(path) as picture:
            _check_voxels((*picture.size, len(picture.getbands())), path, max_voxels)
            picture.load()
            if picture.mode in ("L", "F", "I") or picture.mode.startswith("I;16"):
                array = np.asarray(picture)
            else:  # palette, RGBA, CMYK, 1-bit, grey + alpha: as 8-bit RGB
                array = np.asarray(picture.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as error:
        raise _cannot_read(path, error) from error
    array = array.astype(array.dtype.newbyteorder("="))  # 16-bit PNGs may come big-endian
    if array.ndim == 3 and (array == array[..., :1]).all():
        array = array[..., 0]  # a grey picture stored as RGB
    return ImageVolume.from_picture(array, (1.0, 1.0), path)
