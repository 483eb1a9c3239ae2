"""Synthetic CT/MR abdominal phantoms with labelled organs, written to real NIfTI, NRRD, DICOM and PNG files.

Volumes are built in RAS index order: axis 0 increases towards the patient's Right, axis 1 towards Anterior,
axis 2 towards Superior, so the liver lies at high i and the spine at low j. Shapes are laid out in
millimetres around the centre of the field of view (anisotropic voxels do not distort the anatomy) and vary
with the seed. Used by the tests and for demos: ``python -m scripts.phantom --output_dir demo`` (from
``bundle/``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from .image_io import ImageVolume
from .image_writing import write_image, write_label
from .phantom_dicom import dicom_slices

__all__ = [
    "PHANTOM_LABELS",
    "make_2d_phantom",
    "make_ct_phantom",
    "make_mr_phantom",
    "phantom_affine",
    "to_display",
    "write_phantom",
]

PHANTOM_LABELS = {1: "liver", 2: "spleen", 3: "right kidney", 4: "left kidney", 5: "vertebrae", 6: "aorta"}
FORMATS = ("nifti", "nrrd", "dicom", "png")
_DEFAULT_ORIENTATION = {"nifti": "RAS", "nrrd": "LPS", "dicom": "LPS"}
_SLICE_LEVEL = 0.12  # height of the 2D phantom's slice, in half fields of view above the centre: all organs show


@dataclass(frozen=True)
class _Ellipsoid:
    """An organ in normalised RAS coordinates (x towards Right, y Anterior, z Superior; 1 = half the field)."""

    label: int
    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    angle: float = 0.0  # rotation about the superior axis, radians
    lobulation: float = 0.0  # relative amplitude of the surface's bumps
    phase: float = 0.0  # where the bumps lie around the superior axis


_ORGANS = (  # drawn in this order: later organs cover earlier ones
    _Ellipsoid(1, (0.40, 0.08, 0.30), (0.38, 0.36, 0.45), 0.2),  # liver: right upper abdomen
    _Ellipsoid(2, (-0.50, -0.18, 0.30), (0.15, 0.22, 0.28), -0.5),  # spleen: left, posterior
    _Ellipsoid(3, (0.34, -0.30, -0.12), (0.11, 0.16, 0.30), 0.35),  # right kidney sits lower than the left
    _Ellipsoid(4, (-0.34, -0.30, -0.02), (0.11, 0.16, 0.30), -0.35),
)


@dataclass(frozen=True)
class _Contrast:
    """Tissue intensities: CT in HU, MR (T1-weighted: fat bright, flowing blood dark) in arbitrary units."""

    air: float
    fat: float
    tissue: float  # muscle and other unlabelled soft tissue
    disc: float  # intervertebral discs
    sinus: float  # renal sinus fat, inside the kidney labels
    organs: dict[int, float]


_CT = _Contrast(-1000.0, -100.0, 40.0, 80.0, -30.0, {1: 60.0, 2: 50.0, 3: 30.0, 4: 30.0, 5: 700.0, 6: 150.0})
_MR = _Contrast(0.0, 900.0, 320.0, 250.0, 850.0, {1: 560.0, 2: 400.0, 3: 440.0, 4: 440.0, 5: 520.0, 6: 60.0})


@dataclass
class _Anatomy:
    """Label map plus the unlabelled structures that shape the intensities, all the same 3D shape."""

    label: np.ndarray
    body: np.ndarray
    fat: np.ndarray
    sinus: np.ndarray
    discs: np.ndarray


def _coordinates(shape: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-centre coordinates as broadcastable x, y, z; x and y share one millimetre scale."""
    half = [n * s / 2 for n, s in zip(shape, spacing, strict=True)]
    in_plane = min(half[0], half[1])
    scales = (in_plane, in_plane, half[2])
    axes = [((np.arange(n) + 0.5) * s - h) / c for n, s, h, c in zip(shape, spacing, half, scales, strict=True)]
    return axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]


def _ellipsoid(x: np.ndarray, y: np.ndarray, z: np.ndarray, organ: _Ellipsoid) -> np.ndarray:
    dx, dy, dz = x - organ.centre[0], y - organ.centre[1], z - organ.centre[2]
    cos, sin = np.cos(organ.angle), np.sin(organ.angle)
    u, v, w = (cos * dx + sin * dy) / organ.radii[0], (cos * dy - sin * dx) / organ.radii[1], dz / organ.radii[2]
    # Lobulation: the surface's radius varies smoothly with direction, so organs are not plain ellipsoids.
    lobes = organ.lobulation * np.sin(2.0 * np.arctan2(v, u) + organ.phase) * np.cos(np.pi * np.clip(w, -1, 1))
    return u**2 + v**2 + w**2 <= (1.0 + lobes) ** 2


def _jitter(organ: _Ellipsoid, rng: np.random.Generator) -> _Ellipsoid:
    """The organ of one seed: moved, resized, turned and lobulated at random (anatomy stays plausible)."""
    centre = tuple(np.asarray(organ.centre) + rng.normal(0.0, 0.03, 3))
    radii = tuple(np.asarray(organ.radii) * rng.uniform(0.85, 1.15, 3))
    angle = organ.angle + rng.normal(0.0, 0.1)
    return _Ellipsoid(organ.label, centre, radii, angle, rng.uniform(0.0, 0.1), rng.uniform(0.0, 2 * np.pi))


def _anatomy(x: np.ndarray, y: np.ndarray, z: np.ndarray, rng: np.random.Generator) -> _Anatomy:
    """Body, fat layer, organs, spine and aorta on the coordinate grid; shapes drawn from ``rng``."""
    phase, amplitude = rng.uniform(0, 2 * np.pi, 2), rng.uniform(0.0, 0.03, 2)
    x = x + amplitude[0] * np.sin(np.pi * z + phase[0])  # a smooth sideways and front-back sway along the body
    y = y + amplitude[1] * np.sin(np.pi * z + phase[1])
    axes = np.array([0.90, 0.66]) * rng.uniform(0.95, 1.05, 2)
    body = (x / axes[0]) ** 2 + ((y + 0.05) / axes[1]) ** 2 <= 1.0  # 3D: the swayed x and y depend on z
    inner = (x / (axes[0] - 0.08)) ** 2 + ((y + 0.05) / (axes[1] - 0.08)) ** 2 <= 1.0
    label = np.zeros(body.shape, dtype=np.uint8)
    sinus = np.zeros(body.shape, dtype=bool)
    organs = [_jitter(organ, rng) for organ in _ORGANS]
    for organ in organs:
        label[_ellipsoid(x, y, z, organ) & inner] = organ.label
        if organ.label in (3, 4):  # renal sinus fat, towards the hilum (the midline)
            hilum = _Ellipsoid(0, (organ.centre[0] * 0.85, *organ.centre[1:]), tuple(np.multiply(organ.radii, 0.45)))
            sinus |= _ellipsoid(x, y, z, hilum) & (label == organ.label)
    spine_x, spine_y = rng.normal(0.0, 0.015, 2)
    period, offset = 0.3 * rng.uniform(0.9, 1.1), rng.uniform(0.0, 0.3)
    discs = ((z - offset) % period) < 0.2 * period
    vertebral_body = (x - spine_x) ** 2 + (y - spine_y + 0.40) ** 2 <= 0.11**2
    spinous = ((x - spine_x) / 0.035) ** 2 + ((y - spine_y + 0.54) / 0.07) ** 2 <= 1.0
    label[(vertebral_body & ~discs) | (spinous & ~discs & inner)] = 5
    aorta_radius = 0.065 * rng.uniform(0.9, 1.1)
    label[(x + 0.08 - spine_x) ** 2 + (y + 0.17 - spine_y) ** 2 <= aorta_radius**2] = 6
    visceral_fat = _visceral_fat(x, y, z, organs, rng) & inner & (label == 0)
    return _Anatomy(label, body, (body & ~inner) | visceral_fat, sinus, vertebral_body & discs)


def _visceral_fat(x: np.ndarray, y: np.ndarray, z: np.ndarray, organs: list[_Ellipsoid], rng: np.random.Generator):
    """Perirenal fat round each kidney and a thinner, sometimes absent, rim round the spleen.

    In unenhanced CT the kidneys and spleen are within a noise level of the muscle around them; in patients it is
    the fat round them that outlines them, and without it their CT boundaries could not be seen at all.
    """
    margins = {2: (0.0, 0.05), 3: (0.04, 0.12), 4: (0.04, 0.12)}  # grown radii, in half fields of view
    fat = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=bool)
    for organ in organs:
        if organ.label in margins:
            grown = tuple(np.add(organ.radii, rng.uniform(*margins[organ.label])))
            fat |= _ellipsoid(x, y, z, replace(organ, radii=grown))
    return fat


def _intensities(anatomy: _Anatomy, contrast: _Contrast, rng: np.random.Generator) -> np.ndarray:
    """Piecewise-constant image; each organ's value varies by about 5 % with the seed."""
    image = np.where(anatomy.body, contrast.tissue, contrast.air).astype(np.float32)
    image[anatomy.fat] = contrast.fat
    for value, intensity in contrast.organs.items():
        image[anatomy.label == value] = intensity * (1.0 + rng.normal(0.0, 0.05))
    image[anatomy.sinus] = contrast.sinus
    image[anatomy.discs] = contrast.disc
    return image


def _ct_image(anatomy: _Anatomy, rng: np.random.Generator, noise_hu: float) -> np.ndarray:
    """HU with Gaussian noise, clipped at -1024 HU as scanners store it."""
    image = _intensities(anatomy, _CT, rng) + rng.normal(0.0, noise_hu, anatomy.label.shape)
    return np.maximum(image, -1024.0).astype(np.float32)


def _mr_image(
    anatomy: _Anatomy, coords: tuple[np.ndarray, ...], rng: np.random.Generator, noise: float, bias: float
) -> np.ndarray:
    """T1-like signal times a smooth coil bias field, with Rician noise (magnitude of complex Gaussian noise)."""
    x, y, z = coords
    gradient = rng.normal(0.0, 1.0, 3)
    field = 1.0 + bias * np.tanh((gradient[0] * x + gradient[1] * y + gradient[2] * z) / 2 + 0.3 * (x**2 - y**2))
    signal = _intensities(anatomy, _MR, rng) * field
    real, imaginary = rng.normal(0.0, noise, (2, *anatomy.label.shape))
    return np.hypot(signal + real, imaginary).astype(np.float32)


def make_ct_phantom(
    shape: tuple[int, int, int] = (96, 96, 64),
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.5),
    seed: int = 0,
    noise: float = 20.0,
) -> tuple[np.ndarray, np.ndarray]:
    """CT-like float32 HU volume (``noise`` in HU) and its uint8 label map (:data:`PHANTOM_LABELS`), RAS order."""
    rng = np.random.default_rng(seed)
    anatomy = _anatomy(*_coordinates(shape, spacing), rng)
    return _ct_image(anatomy, rng, noise), anatomy.label


def make_mr_phantom(
    shape: tuple[int, int, int] = (96, 96, 64),
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.5),
    seed: int = 0,
    noise: float = 15.0,
    bias: float = 0.3,
) -> tuple[np.ndarray, np.ndarray]:
    """T1-weighted-like float32 volume (positive, fat bright, aorta dark, bias field) and its labels, RAS order."""
    rng = np.random.default_rng(seed)
    coords = _coordinates(shape, spacing)
    anatomy = _anatomy(*coords, rng)
    return _mr_image(anatomy, coords, rng, noise, bias), anatomy.label


def make_2d_phantom(
    shape: tuple[int, int] = (128, 128),
    spacing: tuple[float, float] = (1.0, 1.0),
    seed: int = 0,
    kind: str = "ct",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One axial slice, rows x columns in radiological display (top = anterior, left = the patient's right).

    Returns the float32 image (HU, or MR units), its uint8 labels and an 8-bit picture (:func:`to_display`).
    ``spacing`` is (row spacing, column spacing) in mm.
    """
    _check_kind(kind)
    rng = np.random.default_rng(seed)
    x, y, _ = _coordinates((shape[1], shape[0], 1), (spacing[1], spacing[0], 1.0))
    coords = (x, y, np.full((1, 1, 1), _SLICE_LEVEL))
    anatomy = _anatomy(*coords, rng)
    image = _ct_image(anatomy, rng, 20.0) if kind == "ct" else _mr_image(anatomy, coords, rng, 15.0, 0.3)
    display = (slice(None, None, -1), slice(None, None, -1), 0)  # RAS (x, y) -> rows posterior, columns left
    image, label = image[display].T, anatomy.label[display].T
    return np.ascontiguousarray(image), np.ascontiguousarray(label), to_display(image, kind)


def to_display(image: np.ndarray, kind: str = "ct") -> np.ndarray:
    """8-bit picture: CT in the abdominal window (centre 40, width 400 HU), MR up to its 99.5th percentile."""
    _check_kind(kind)
    low, high = (-160.0, 240.0) if kind == "ct" else (0.0, float(np.percentile(image, 99.5)) or 1.0)
    return np.round(np.clip((image - low) / (high - low), 0.0, 1.0) * 255).astype(np.uint8)


def phantom_affine(shape: tuple[int, ...], spacing: tuple[float, ...], tilt_deg: float = 0.0) -> np.ndarray:
    """4 x 4 voxel -> RAS affine of an RAS-ordered phantom: centred on the origin, tilted about the S axis."""
    angle = np.deg2rad(tilt_deg)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


def write_phantom(
    output_dir: str | Path,
    name: str = "phantom",
    kind: str = "ct",
    fmt: str = "nifti",
    orientation: str | None = None,
    shape: tuple[int, ...] | None = None,
    spacing: tuple[float, ...] | None = None,
    seed: int = 0,
    ndim: int | None = None,
    tilt_deg: float = 0.0,
    noise: float | None = None,
) -> tuple[Path, Path]:
    """Write a phantom image and its label map as real files; returns ``(image_path, label_path)``.

    3D (``ndim`` 3, the default except for PNG): ``orientation`` (nibabel axis codes such as ``LPS``, ``PSR``;
    default RAS for NIfTI, LPS otherwise) permutes and flips the stored array and its affine together, so
    every code holds the same physical image. ``fmt``: ``nifti`` (.nii.gz), ``nrrd``, ``dicom`` (a folder with
    one file per slice; labels go to NIfTI). CT is stored as whole HU (int16), MR as whole numbers (uint16).
    2D (``ndim`` 2, always for ``png``): one axial slice in display orientation as ``png`` (8-bit windowed),
    ``dicom`` (one frame) or ``nifti``; labels go to PNG (NIfTI for ``nifti``). ``noise``: the 3D phantom's noise
    (HU for CT, signal units for MR), default that of :func:`make_ct_phantom` / :func:`make_mr_phantom`.
    """
    _check_kind(kind)
    if fmt not in FORMATS:
        raise ValueError(f"Unknown phantom format {fmt!r}; choose one of {', '.join(FORMATS)}")
    ndim = ndim if ndim is not None else (2 if fmt == "png" else 3)
    if ndim not in (2, 3) or (fmt == "png" and ndim != 2):
        raise ValueError(f"ndim must be 2 or 3 (PNG holds 2D pictures only), got ndim={ndim} for {fmt}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if ndim == 2:
        if orientation is not None:
            raise ValueError("orientation applies to 3D phantoms; 2D ones are stored in display orientation")
        shape2d = _sizes(shape, (128, 128), "shape", int)
        return _write_2d(out, name, kind, fmt, shape2d, _sizes(spacing, (1.0, 1.0), "spacing", float), seed)
    shape, spacing = _sizes(shape, (96, 96, 64), "shape", int), _sizes(spacing, (1.5, 1.5, 2.5), "spacing", float)
    make = make_ct_phantom if kind == "ct" else make_mr_phantom
    image, label = make(shape, spacing, seed=seed, **({} if noise is None else {"noise": noise}))
    image = np.round(image).astype(np.int16 if kind == "ct" else np.uint16)
    volume, label = _reorient(
        image, label, phantom_affine(shape, spacing, tilt_deg), orientation or _DEFAULT_ORIENTATION[fmt]
    )
    if fmt == "dicom":
        volume, label = _right_handed(volume, label)
        folder = out / name
        folder.mkdir(exist_ok=True)
        for stale in folder.glob("slice_*.dcm"):  # an earlier phantom's slices would form a second series
            stale.unlink()
        for k, dataset in enumerate(dicom_slices(volume.array, volume.spacing, volume.origin, volume.direction, kind)):
            dataset.save_as(folder / f"slice_{k:04d}.dcm", write_like_original=False)
        return folder, write_label(label, volume, out / f"{name}_label.nii.gz")
    suffix = ".nii.gz" if fmt == "nifti" else ".nrrd"
    image_path = write_image(volume.array, volume, out / f"{name}{suffix}")
    return image_path, write_label(label, volume, out / f"{name}_label{suffix}")


def _sizes(values: tuple | None, default: tuple, name: str, kind: type) -> tuple:
    """``values`` (a 2D phantom takes the first two of three), checked positive, or the default."""
    if values is None:
        return default
    values = tuple(kind(v) for v in values)
    if len(default) == 2 and len(values) == 3:
        values = values[:2]
    if len(values) != len(default) or min(values) <= 0:
        raise ValueError(f"{name} must be {len(default)} positive numbers for a {len(default)}D phantom, got {values}")
    return values


def _check_kind(kind: str) -> None:
    if kind not in ("ct", "mr"):
        raise ValueError(f"kind must be 'ct' or 'mr', got {kind!r}")


def _reorient(image: np.ndarray, label: np.ndarray, affine: np.ndarray, code: str) -> tuple[ImageVolume, np.ndarray]:
    """Store RAS-ordered arrays in the axis order ``code`` names, with the affine that keeps them in place."""
    letters = tuple(code.upper())
    axes = sorted(axis for letter in letters for axis, pair in enumerate(("LR", "AP", "SI")) if letter in pair)
    if len(letters) != 3 or axes != [0, 1, 2]:
        raise ValueError(f"orientation must be 3 letters, one each of L/R, A/P and S/I (e.g. RAS, LPS), got {code!r}")
    ornt = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(letters))
    stored = ImageVolume.from_affine(apply_orientation(image, ornt), affine @ inv_ornt_aff(ornt, image.shape))
    stored.array = np.ascontiguousarray(stored.array)
    return stored, np.ascontiguousarray(apply_orientation(label, ornt))


def _right_handed(volume: ImageVolume, label: np.ndarray) -> tuple[ImageVolume, np.ndarray]:
    """Flip the slice axis of a left-handed grid: DICOM readers stack slices along the row x column normal."""
    if np.linalg.det(volume.direction) > 0:
        return volume, label
    direction = volume.direction.copy()
    direction[:, 2] *= -1
    first = np.asarray(volume.origin) - direction[:, 2] * volume.spacing[2] * (volume.array.shape[2] - 1)
    array = np.ascontiguousarray(volume.array[:, :, ::-1])
    return ImageVolume(array, volume.spacing, tuple(first), direction, volume.path), label[:, :, ::-1].copy()


def _write_2d(
    out: Path, name: str, kind: str, fmt: str, shape: tuple[int, int], spacing: tuple[float, float], seed: int
) -> tuple[Path, Path]:
    image, label, picture = make_2d_phantom(shape, spacing, seed, kind)
    reference = ImageVolume.from_picture(picture, spacing)
    stored = np.round(image).astype(np.int16 if kind == "ct" else np.uint16)
    suffixes = {"png": (".png", ".png"), "nifti": (".nii.gz", ".nii.gz"), "dicom": (".dcm", ".png")}[fmt]
    image_path, label_path = out / f"{name}{suffixes[0]}", out / f"{name}_label{suffixes[1]}"
    if fmt == "dicom":  # one frame: ITK index i runs along the columns (the patient's left, LPS x), j down the rows
        frame = ImageVolume(stored.T[..., None], (spacing[1], spacing[0], 1.0), (0.0, 0.0, 0.0), np.eye(3), image_path)
        dicom_slices(frame.array, frame.spacing, frame.origin, frame.direction, kind)[0].save_as(
            image_path, write_like_original=False
        )
    else:
        write_image(picture if fmt == "png" else stored, reference, image_path)
    return image_path, write_label(label, reference, label_path)


def main(argv: list[str] | None = None) -> None:
    """Command line: write one phantom and print where its image and label went."""
    parser = argparse.ArgumentParser(description="Write a synthetic CT/MR abdominal phantom with organ labels")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--name", default="phantom")
    parser.add_argument("--kind", choices=("ct", "mr"), default="ct")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="nifti")
    parser.add_argument("--orientation", default=None, help="nibabel axis codes, e.g. RAS, LPS, PSR (3D only)")
    parser.add_argument("--shape", type=int, nargs="+", default=None, help="3 sizes (3D) or rows columns (2D)")
    parser.add_argument("--spacing", type=float, nargs="+", default=None, help="mm per axis")
    parser.add_argument("--ndim", type=int, choices=(2, 3), default=None, help="2 for one slice (PNG is always 2D)")
    parser.add_argument("--tilt_deg", type=float, default=0.0, help="rotate the grid about the S axis (oblique)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        image, label = write_phantom(**vars(args))
    except ValueError as error:
        parser.error(str(error))
    print(f"image: {image}\nlabel: {label}")


if __name__ == "__main__":
    main()
