"""Write label maps and images in exactly the geometry of the image they belong to, and check labels read back.

NIfTI outputs of a NIfTI input reuse its header, so they carry its exact affine; NRRD and MetaImage outputs take
ITK's geometry (spacing, origin, direction); PNG holds 2D pictures only. A label map holds whole numbers in
0..65535 on its image's voxel grid, whether written here or read from a client (:func:`check_label_volume`).
"""

from __future__ import annotations

from pathlib import Path

import itk
import nibabel as nib
import numpy as np
from PIL import Image

from .image_io import (
    DICOM_SUFFIX,
    ITK_SUFFIXES,
    NIFTI_SUFFIXES,
    PICTURE_SUFFIXES,
    ImageVolume,
    file_suffix,
    read_image,
)

__all__ = ["LABEL_DTYPES", "check_label_volume", "output_path_for", "read_labelled", "write_image", "write_label"]

_ITK_WRITE_DTYPES = ("uint8", "int16", "uint16", "int32", "uint32", "float32", "float64")

LABEL_DTYPES = ("uint8", "uint16", "int16", "int32", "uint32", "float32")


def write_label(
    label: np.ndarray, reference: ImageVolume, output_path: str | Path, dtype: str | None = None, compress: bool = True
) -> Path:
    """Write an integer label map in ``reference``'s exact grid as ``dtype`` (default uint8, or uint16 above 255).

    ``compress=False`` writes raw NRRD data, for clients that read the bytes without decoding (OHIF).
    """
    label = np.asarray(label)
    _check_grid(label, reference, "Label")
    high = _check_label_values(label)
    if dtype is None:
        dtype = "uint8" if high <= 255 else "uint16"
    if dtype not in LABEL_DTYPES:
        raise ValueError(f"Unsupported label dtype {dtype!r}; use one of {', '.join(LABEL_DTYPES)}")
    if np.dtype(dtype).kind in "iu" and high > np.iinfo(dtype).max:
        raise ValueError(f"Label value {high} does not fit {dtype}")
    return write_image(label.astype(dtype), reference, output_path, compress=compress)


def write_image(array: np.ndarray, reference: ImageVolume, output_path: str | Path, compress: bool = True) -> Path:
    """Write a single-channel ``array`` in ``reference``'s grid: .nii.gz/.nii, .nrrd/.mha, or .png (2D only).

    ``array`` has the reference's spatial shape: (I, J, K) for volumes, (H, W) for pictures.
    """
    output_path = Path(output_path)
    _check_grid(array, reference, "Image")
    suffix = file_suffix(output_path)
    if suffix == ".png" and (not reference.is_2d or array.dtype not in (np.uint8, np.uint16)):
        raise ValueError(f"PNG output holds 8- or 16-bit 2D pictures only; use .nii.gz for {output_path}")
    if suffix not in (".png", ".nrrd", ".mha", *NIFTI_SUFFIXES):
        raise ValueError(f"Unsupported output format {suffix!r} for {output_path}: use .nii.gz, .nii, .nrrd or .png")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        Image.fromarray(array).save(output_path)
    elif suffix in NIFTI_SUFFIXES:
        nib.save(_nifti_image(array, reference), output_path)
    else:
        itk.imwrite(_itk_image(array, reference), str(output_path), compression=compress)
    return output_path


def check_label_volume(label: ImageVolume, reference: ImageVolume, dataset: bool = False) -> None:
    """A label map read from a file must lie on its image's voxel grid (shape, spacing, origin and axes, to 1 um and
    a relative 1e-5) and hold whole numbers in 0..65535: what training and DICOM SEG take as the image's label.

    ``dataset`` labels (training and evaluation datalists, whose headers often differ from their image's by float
    noise) may differ by 0.1 % in spacing and axes and by half a voxel in origin: a label stored flipped or with
    its axes in another order is still refused."""
    expected_shape = reference.array.shape[:2] if reference.is_2d else reference.array.shape
    half_voxel = 0.5 * min(reference.spacing)
    geometry = zip(
        ("shape", "spacing", "origin", "axes"),
        (label.array.shape, label.spacing, label.origin, label.direction),
        (expected_shape, reference.spacing, reference.origin, reference.direction),
        ((0, 0), (1e-3, 0), (0, half_voxel), (0, 1e-3)) if dataset else ((1e-5, 1e-3),) * 4,
        strict=True,
    )
    for what, found, expected, (rtol, atol) in geometry:
        if np.shape(found) != np.shape(expected) or not np.allclose(found, expected, rtol=rtol, atol=atol):
            raise ValueError(
                f"The label is not on its image's grid: its {what} {np.round(found, 4).tolist()} differs from the "
                f"image's {np.round(expected, 4).tolist()}"
            )
    _check_label_values(label.array)


def read_labelled(image_path: str | Path, label_path: str | Path) -> tuple[ImageVolume, ImageVolume]:
    """A dataset item's image and label map, the label checked against the image (:func:`check_label_volume`)."""
    image, label = read_image(image_path), read_image(label_path)
    try:
        check_label_volume(label, image, dataset=True)
    except ValueError as error:
        raise ValueError(f"{label_path}: {error}") from None
    return image, label


def _check_label_values(label: np.ndarray) -> int:
    """The highest value of an integer label map, after checking its values are whole numbers in 0..65535."""
    if label.dtype.kind not in "biuf":
        raise ValueError(f"Label pixel type {label.dtype} is not a number type")
    if label.dtype.kind == "f" and not (np.isfinite(label).all() and (label == np.round(label)).all()):
        raise ValueError("Label values must be whole numbers")
    low, high = (label.min(), label.max()) if label.size else (0, 0)
    if low < 0 or high > np.iinfo(np.uint16).max:
        raise ValueError(f"Label values must lie in 0..65535, got {low}..{high}")
    return int(high)


def _check_grid(array: np.ndarray, reference: ImageVolume, what: str) -> None:
    expected = reference.array.shape[:2] if reference.is_2d else reference.array.shape
    if array.shape != expected:
        raise ValueError(f"{what} shape {array.shape} does not match the image shape {expected}")


def _nifti_image(array: np.ndarray, reference: ImageVolume) -> nib.Nifti1Image:
    data = array.T if reference.is_2d else array  # pictures are rows x columns, NIfTI axis 0 runs along columns
    header = reference.nifti_header
    if header is not None:
        header = header.copy()
        header.set_data_dtype(array.dtype)
        header.set_slope_inter(None, None)
        header["cal_min"], header["cal_max"] = 0, 0
        image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        return image_class(data, None, header)  # no affine: the header's qform and sform stay as they were
    affine = reference.affine_ras
    if reference.is_2d:
        affine = affine[:, [1, 0, 2, 3]]
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return image


def _itk_image(array: np.ndarray, reference: ImageVolume) -> itk.Image:
    if array.dtype.name not in _ITK_WRITE_DTYPES:
        raise ValueError(f"Cannot write pixel type {array.dtype} with ITK; use one of {', '.join(_ITK_WRITE_DTYPES)}")
    if reference.is_2d:
        image = itk.image_from_array(np.ascontiguousarray(array))  # rows x columns is ITK's (j, i) order
        image.SetSpacing([float(reference.spacing[1]), float(reference.spacing[0])])
        return image
    image = itk.image_from_array(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in reference.spacing])
    image.SetOrigin([float(o) for o in reference.origin])
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(reference.direction, dtype=np.float64)))
    return image


def output_path_for(input_path: str | Path, output_dir: str | Path, suffix: str = ".nii.gz", postfix: str = "") -> Path:
    """``output_dir/<input name without its extension><postfix><suffix>``; a DICOM folder gives its own name."""
    name = Path(input_path).name
    for ext in (*NIFTI_SUFFIXES, *ITK_SUFFIXES, *PICTURE_SUFFIXES, DICOM_SUFFIX):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return Path(output_dir) / f"{name}{postfix}{suffix}"
