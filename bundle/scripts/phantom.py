"""Synthetic CT/MR phantoms with labelled organs, written to real NIfTI, NRRD, DICOM and PNG files.

Arrays are built in RAS index order (axis 0 towards the patient's Right, 1 Anterior, 2 Superior), so the
patient's liver lies at high i and the spine at low j. Used by the tests, the benchmarks and for demos:
``python -m scripts.phantom --output_dir demo`` (from ``bundle/``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

__all__ = ["PHANTOM_LABELS", "make_2d_phantom", "make_ct_phantom", "make_mr_phantom", "write_phantom"]

PHANTOM_LABELS = {1: "liver", 2: "spleen", 3: "right kidney", 4: "left kidney", 5: "vertebrae", 6: "aorta"}
# (centre as a fraction of the body box in RAS index order, radii as fractions, CT HU, MR T1 intensity)
_ORGANS = {
    1: ((0.68, 0.55, 0.65), (0.22, 0.25, 0.22), 60.0, 420.0),
    2: ((0.25, 0.40, 0.65), (0.10, 0.12, 0.14), 50.0, 300.0),
    3: ((0.68, 0.32, 0.45), (0.07, 0.08, 0.13), 30.0, 380.0),
    4: ((0.32, 0.32, 0.45), (0.07, 0.08, 0.13), 30.0, 380.0),
    5: ((0.50, 0.22, 0.50), (0.06, 0.07, 0.60), 700.0, 250.0),
    6: ((0.44, 0.38, 0.50), (0.03, 0.03, 0.60), 150.0, 120.0),
}


def _grid(shape: tuple[int, int, int]) -> list[np.ndarray]:
    return np.meshgrid(*[np.linspace(0.0, 1.0, n) for n in shape], indexing="ij")


def make_ct_phantom(
    shape: tuple[int, int, int] = (96, 96, 64), seed: int = 0, noise_hu: float = 20.0
) -> tuple[np.ndarray, np.ndarray]:
    """CT-like float32 HU volume and its uint8 label map (values of :data:`PHANTOM_LABELS`)."""
    return _make(shape, seed, noise_hu, modality="CT")


def make_mr_phantom(shape: tuple[int, int, int] = (96, 96, 64), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """MR T1-like volume (positive intensities, smooth bias field) with the same labels."""
    return _make(shape, seed, 15.0, modality="MR")


def _make(shape: tuple[int, int, int], seed: int, noise: float, modality: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x, y, z = _grid(shape)
    body = ((x - 0.5) / 0.45) ** 2 + ((y - 0.45) / 0.35) ** 2 <= 1.0
    inner = ((x - 0.5) / 0.42) ** 2 + ((y - 0.45) / 0.32) ** 2 <= 1.0
    ct = modality == "CT"
    image = np.where(body, -100.0 if ct else 600.0, -1000.0 if ct else 0.0)  # fat under the skin
    image[inner] = 40.0 if ct else 200.0
    label = np.zeros(shape, dtype=np.uint8)
    for value, (centre, radii, hu, t1) in _ORGANS.items():
        c = np.asarray(centre) + rng.normal(0.0, 0.015, 3)
        r = np.asarray(radii) * rng.uniform(0.85, 1.15, 3)
        wobble = 1.0 + 0.08 * np.sin(2 * np.pi * (z * rng.uniform(1, 2) + rng.uniform()))
        inside = ((x - c[0]) / (r[0] * wobble)) ** 2 + ((y - c[1]) / (r[1] * wobble)) ** 2 + ((z - c[2]) / r[2]) ** 2
        mask = (inside <= 1.0) & inner
        label[mask] = value
        image[mask] = hu if ct else t1
    if not ct:
        image *= 0.8 + 0.4 * x * y  # receive-coil bias field
    image += rng.normal(0.0, noise, shape) * body
    return image.astype(np.float32), label


def make_2d_phantom(shape: tuple[int, int] = (128, 128), seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An axial CT slice: HU image, label, and an 8-bit abdominal-window picture, all rows x columns."""
    image, label = make_ct_phantom((*shape, 9), seed=seed)
    hu, lab = image[:, :, 5].T[::-1, ::-1], label[:, :, 5].T[::-1, ::-1]  # radiological display orientation
    picture = (np.clip((hu + 160.0) / 400.0, 0.0, 1.0) * 255).astype(np.uint8)
    return np.ascontiguousarray(hu), np.ascontiguousarray(lab), np.ascontiguousarray(picture)


def write_phantom(
    output_dir: str | Path,
    name: str = "phantom",
    kind: str = "ct",
    fmt: str = "nifti",
    orientation: str = "RAS",
    shape: tuple[int, int, int] = (96, 96, 64),
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.5),
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write a phantom image and its label; returns ``(image_path, label_path)``.

    ``orientation`` (nibabel axis codes, e.g. ``LPS``, ``PSR``) permutes/flips the stored array while keeping the
    physical content, so every orientation shows the same anatomy. ``fmt``: nifti, nrrd, dicom (series folder)
    or png (2D).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "png":
        from PIL import Image

        _, label2d, picture = make_2d_phantom(shape[:2], seed)
        Image.fromarray(picture).save(out / f"{name}.png")
        Image.fromarray(label2d).save(out / f"{name}_label.png")
        return out / f"{name}.png", out / f"{name}_label.png"
    if kind not in ("ct", "mr"):
        raise ValueError(f"kind must be 'ct' or 'mr', got {kind!r}")
    image, label = (make_ct_phantom if kind == "ct" else make_mr_phantom)(shape, seed=seed)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -np.asarray(spacing) * np.asarray(shape) / 2
    ornt = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(orientation)))
    stored_image, stored_label = apply_orientation(image, ornt), apply_orientation(label, ornt)
    stored_affine = affine @ inv_ornt_aff(ornt, shape)
    if fmt == "dicom":
        folder = out / name
        _write_dicom_series(image, affine, folder, modality=kind.upper())
        label_path = out / f"{name}_label.nii.gz"
        nib.save(nib.Nifti1Image(label, affine), label_path)
        return folder, label_path
    suffix = {"nifti": ".nii.gz", "nrrd": ".nrrd"}.get(fmt)
    if suffix is None:
        raise ValueError(f"fmt must be nifti, nrrd, dicom or png, got {fmt!r}")
    paths = out / f"{name}{suffix}", out / f"{name}_label{suffix}"
    for array, path in zip((stored_image, stored_label), paths, strict=True):
        nifti = nib.Nifti1Image(np.ascontiguousarray(array), stored_affine)
        if fmt == "nifti":
            nib.save(nifti, path)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                nib.save(nifti, Path(tmp) / "x.nii.gz")
                itk.imwrite(itk.imread(str(Path(tmp) / "x.nii.gz")), str(path), compression=True)
    return paths


def _write_dicom_series(image: np.ndarray, affine: np.ndarray, folder: Path, modality: str) -> None:
    """One file per axial slice, rows running posterior and columns towards the patient's left (LPS)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    spacing = np.abs(np.diag(affine)[:3])
    series, study = generate_uid(), generate_uid()
    storage = CTImageStorage if modality == "CT" else MRImageStorage
    ni, nj, nk = image.shape
    intercept = -1024.0 if modality == "CT" else 0.0
    for k in range(nk):
        pixels = image[::-1, ::-1, k].T  # rows = posterior, columns = left
        corner_ras = affine @ np.array([ni - 1, nj - 1, k, 1.0])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = storage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"slice_{k:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = storage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientName, ds.PatientID = modality, "Phantom^Medsam3", "PHANTOM"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = study, series, 1, k + 1
        ds.ImagePositionPatient = [float(-corner_ras[0]), float(-corner_ras[1]), float(corner_ras[2])]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = intercept, 1.0
        ds.PixelData = np.clip(np.round(pixels - intercept), 0, 65535).astype(np.uint16).tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(folder / f"slice_{k:04d}.dcm", write_like_original=False)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic CT/MR phantom with organ labels")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--name", default="phantom")
    parser.add_argument("--kind", choices=("ct", "mr"), default="ct")
    parser.add_argument("--format", dest="fmt", choices=("nifti", "nrrd", "dicom", "png"), default="nifti")
    parser.add_argument("--orientation", default="RAS")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    image, label = write_phantom(args.output_dir, args.name, args.kind, args.fmt, args.orientation, seed=args.seed)
    print(f"image: {image}\nlabel: {label}")


if __name__ == "__main__":
    main()
