"""The synthetic phantoms: plausible anatomy and intensities, seed variation, and every file format read back
with the same geometry and the same physical content."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from scripts.image_io import read_image
from scripts.orientation import SliceView
from scripts.phantom import (
    PHANTOM_LABELS,
    main,
    make_2d_phantom,
    make_ct_phantom,
    make_mr_phantom,
    to_display,
    write_phantom,
)
from scripts.vocabulary import load_vocabulary

SHAPE = (48, 48, 24)
SPACING = (1.5, 1.5, 2.5)
STORED = [
    "nifti-RAS",
    "nifti-LPS",
    "nifti-PSR",
    "nifti-ILA",
    "nrrd-LPS",
    "nrrd-ASL",
    "dicom-LPS",
    "dicom-LAS",
    "dicom-SRA",
]


@pytest.fixture(scope="module")
def ct() -> tuple[np.ndarray, np.ndarray]:
    return make_ct_phantom(SHAPE, SPACING, seed=0)


def _centre(label: np.ndarray, value: int) -> np.ndarray:
    return np.argwhere(label == value).mean(axis=0)


def test_label_values_are_vocabulary_indices(ct) -> None:
    """A phantom's label file uses the vocabulary's indices, so its references need no renumbering."""
    vocabulary = load_vocabulary()
    assert {value: vocabulary.by_index[value].name for value in PHANTOM_LABELS} == PHANTOM_LABELS
    assert set(np.unique(ct[1])) == {0, *PHANTOM_LABELS}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ct_intensities_and_anatomy(seed: int) -> None:
    image, label = make_ct_phantom(SHAPE, SPACING, seed=seed)
    assert image.shape == label.shape == SHAPE and image.dtype == np.float32 and label.dtype == np.uint8
    assert set(np.unique(label)) == {0, *PHANTOM_LABELS}
    expected_hu = {1: (50, 70), 2: (40, 60), 3: (15, 40), 4: (15, 40), 5: (650, 750), 6: (135, 165)}
    for value, (low, high) in expected_hu.items():
        assert low < np.median(image[label == value]) < high, PHANTOM_LABELS[value]
    assert np.median(image[0, 0, :]) < -950 and image.min() >= -1024  # air outside the body, clipped as on scanners
    assert (image < -50).sum() > (image < -900).sum()  # a fat layer under the skin
    # RAS index order: axis 0 towards the patient's right, axis 1 anterior, axis 2 superior
    liver, spleen, spine, aorta = (_centre(label, v) for v in (1, 2, 5, 6))
    right, left = _centre(label, 3), _centre(label, 4)
    middle = (np.asarray(SHAPE) - 1) / 2
    assert liver[0] > middle[0] > spleen[0] and right[0] > middle[0] > left[0]
    assert liver[1] > spine[1] and aorta[1] > spine[1] and spleen[1] > spine[1]  # spine is the most posterior
    assert aorta[0] < spine[0]  # the aorta runs left of the midline
    assert liver[2] > right[2]  # the liver sits above the kidneys


@pytest.mark.parametrize("make", [make_ct_phantom, make_mr_phantom])
def test_fat_outlines_the_kidneys(make) -> None:
    """Perirenal fat: the background voxels touching a kidney are mostly fat (CT: below -50 HU; MR T1: brighter than
    the kidney), as in patients, where the kidneys' own values are within the noise of the muscle round them."""
    for seed in range(4):
        image, label = make(SHAPE, SPACING, seed=seed)
        for value in (3, 4):
            kidney = label == value
            rim = ndimage.binary_dilation(kidney) & ~kidney & (label == 0)
            fat = image[rim] < -50 if make is make_ct_phantom else image[rim] > np.median(image[kidney]) + 200
            assert fat.mean() > 0.6, (seed, value, fat.mean())


def test_seeds_vary_shapes_and_repeat() -> None:
    first, second = make_ct_phantom(SHAPE, SPACING, seed=0), make_ct_phantom(SHAPE, SPACING, seed=1)
    again = make_ct_phantom(SHAPE, SPACING, seed=0)
    np.testing.assert_array_equal(first[0], again[0])
    for value in PHANTOM_LABELS:
        overlap = ((first[1] == value) & (second[1] == value)).sum()
        union = ((first[1] == value) | (second[1] == value)).sum()
        assert overlap / union < 0.97, PHANTOM_LABELS[value]


def test_anatomy_keeps_its_shape_with_anisotropic_voxels() -> None:
    """The same field of view sampled twice as finely along j holds the same anatomy."""
    _, coarse = make_ct_phantom((32, 16, 8), (2.0, 4.0, 5.0), seed=4, noise=0.0)
    _, fine = make_ct_phantom((32, 32, 8), (2.0, 2.0, 5.0), seed=4, noise=0.0)
    for value in PHANTOM_LABELS:
        ratio = (fine == value).sum() / max((coarse == value).sum() * 2, 1)
        assert 0.7 < ratio < 1.4, PHANTOM_LABELS[value]


def test_mr_contrast(ct) -> None:
    image, label = make_mr_phantom(SHAPE, SPACING, seed=0)
    np.testing.assert_array_equal(label, ct[1])  # the same anatomy as the CT of the same seed
    assert image.dtype == np.float32 and image.min() >= 0
    median = {value: np.median(image[label == value]) for value in PHANTOM_LABELS}
    fat = np.percentile(image, 99)
    assert fat > median[1] > median[2] and median[6] < 0.3 * median[1]  # T1: fat bright, liver > spleen, flow void
    assert median[5] > median[2]  # fatty marrow brighter than spleen, unlike CT ordering of soft tissue
    flat, _ = make_mr_phantom(SHAPE, SPACING, seed=0, bias=0.0)
    assert image[label == 1].std() > 1.5 * flat[label == 1].std()  # the bias field spreads one tissue beyond noise


def test_2d_phantom_is_in_display_orientation() -> None:
    image, label, picture = make_2d_phantom((64, 80), seed=0)
    assert image.shape == label.shape == picture.shape == (64, 80)
    assert picture.dtype == np.uint8 and set(np.unique(label)) == {0, *PHANTOM_LABELS}
    liver, spleen, spine = (_centre(label, v) for v in (1, 2, 5))
    assert liver[1] < 40 < spleen[1]  # the patient's right is on the image's left
    assert spine[0] > liver[0] and spine[0] > 32  # posterior at the bottom
    np.testing.assert_array_equal(picture, to_display(image))
    mr_image, mr_label, mr_picture = make_2d_phantom((64, 80), seed=0, kind="mr")
    np.testing.assert_array_equal(mr_label, label)
    assert mr_image.min() >= 0 and mr_picture.max() == 255


# ------------------------------------------------------------------------------------------------ files


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("phantoms")
    written = {}
    for key in STORED:
        fmt, code = key.split("-")
        written[key] = write_phantom(root, f"{fmt}_{code}", fmt=fmt, orientation=code, shape=SHAPE)
    for fmt in ("nifti", "nrrd", "dicom"):
        tilted = write_phantom(root, f"{fmt}_tilted", fmt=fmt, orientation="LPS", shape=SHAPE, tilt_deg=15.0)
        written[f"{fmt}-tilted"] = tilted
    return written


@pytest.mark.parametrize("key", STORED)
def test_every_format_holds_the_same_image(files, key: str) -> None:
    """Resampling-free check: every file's axial view equals the RAS NIfTI's, image and label, on the same grid."""
    reference, reference_label = (read_image(path) for path in files["nifti-RAS"])
    volume, label = (read_image(path) for path in files[key])
    assert not volume.is_2d and volume.array.shape == label.array.shape
    ras_image, ras_label = make_ct_phantom(SHAPE, SPACING, seed=0)
    np.testing.assert_array_equal(reference.array, np.round(ras_image))
    np.testing.assert_array_equal(reference_label.array, ras_label)
    view, expected = SliceView.for_volume(volume), SliceView.for_volume(reference)
    np.testing.assert_array_equal(view.to_view(volume.array), expected.to_view(reference.array))
    np.testing.assert_array_equal(view.to_view(label.array), expected.to_view(reference_label.array))
    np.testing.assert_allclose(view.view_affine, expected.view_affine, atol=1e-4)
    np.testing.assert_allclose(label.affine_ras, volume.affine_ras, atol=1e-4)


def test_formats_share_geometry(files) -> None:
    """The same storage order in NIfTI, NRRD and DICOM gives the same origin, spacing and direction, tilted too."""
    for suffix in ("LPS", "tilted"):
        volumes = [read_image(files[f"{fmt}-{suffix}"][0]) for fmt in ("nifti", "nrrd", "dicom")]
        for volume in volumes[1:]:
            np.testing.assert_array_equal(volume.array, volumes[0].array)
            np.testing.assert_allclose(volume.origin, volumes[0].origin, atol=1e-4)
            np.testing.assert_allclose(volume.spacing, volumes[0].spacing, atol=1e-5)
            np.testing.assert_allclose(volume.direction, volumes[0].direction, atol=1e-6)
    tilted = read_image(files["dicom-tilted"][0]).direction
    assert abs(tilted[0, 0] - np.cos(np.deg2rad(15.0))) < 1e-6


def test_nifti_affine_follows_the_orientation_code(files) -> None:
    for code in ("RAS", "LPS", "PSR", "ILA"):
        image = nib.load(files[f"nifti-{code}"][0])
        assert nib.aff2axcodes(image.affine) == tuple(code)
        np.testing.assert_allclose(nib.load(files[f"nifti-{code}"][1]).affine, image.affine)


def test_dicom_series_files(files, tmp_path: Path) -> None:
    folder = files["dicom-LPS"][0]
    slices = sorted(folder.glob("*.dcm"))
    assert len(slices) == SHAPE[2]
    first, last = pydicom.dcmread(slices[0]), pydicom.dcmread(slices[-1])
    assert first.SeriesInstanceUID == last.SeriesInstanceUID and first.SOPInstanceUID != last.SOPInstanceUID
    assert first.Modality == "CT" and float(first.RescaleIntercept) == -1024 and first.file_meta.TransferSyntaxUID
    assert [float(v) for v in first.PixelSpacing] == [SPACING[1], SPACING[0]]
    assert float(last.ImagePositionPatient[2]) - float(first.ImagePositionPatient[2]) == pytest.approx(
        SPACING[2] * (SHAPE[2] - 1)
    )
    write_phantom(tmp_path, "again", fmt="dicom", shape=(16, 16, 6))
    folder, _ = write_phantom(tmp_path, "again", fmt="dicom", shape=(16, 16, 4))  # rewriting leaves one series
    assert read_image(folder).array.shape == (16, 16, 4)


@pytest.mark.skipif(not shutil.which("dciodvfy"), reason="dicom3tools' dciodvfy is not installed")
@pytest.mark.parametrize(("kind", "geometry"), [("ct", {"orientation": "PSR"}), ("mr", {"tilt_deg": 15.0})])
def test_dicom_files_have_every_attribute_their_iod_requires(tmp_path: Path, kind: str, geometry: dict) -> None:
    """dicom3tools' validator (the reference IOD checker) finds no error: PACS, OHIF and dcmqi get real files."""
    folder, _ = write_phantom(tmp_path, kind, kind, "dicom", shape=(16, 16, 3), **geometry)
    picture, _ = write_phantom(tmp_path, f"{kind}_2d", kind, "dicom", ndim=2)
    for path in (*sorted(folder.iterdir()), picture):
        report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert not errors, (path.name, errors)


@pytest.mark.parametrize("kind", ["ct", "mr"])
def test_2d_files(tmp_path: Path, kind: str) -> None:
    image, label, picture = make_2d_phantom((40, 56), (0.7, 0.7), seed=0, kind=kind)
    stored = np.round(image)
    for fmt, expected in (("png", picture), ("nifti", stored), ("dicom", stored)):
        image_path, label_path = write_phantom(
            tmp_path, f"{kind}_{fmt}", kind, fmt, shape=(40, 56), spacing=(0.7, 0.7), ndim=2
        )
        volume, label_volume = read_image(image_path), read_image(label_path)
        assert volume.is_2d and not volume.is_rgb
        np.testing.assert_array_equal(volume.array, expected)
        np.testing.assert_array_equal(label_volume.array, label)
        if fmt != "png":
            assert volume.spacing == pytest.approx((0.7, 0.7))


def test_mr_volume_files(tmp_path: Path) -> None:
    image, _ = make_mr_phantom(SHAPE, SPACING, seed=5)
    for fmt in ("nifti", "dicom"):
        volume = read_image(write_phantom(tmp_path, f"mr_{fmt}", "mr", fmt, "RAS", SHAPE, SPACING, seed=5)[0])
        np.testing.assert_array_equal(volume.array, np.round(image))


def test_command_line(tmp_path: Path, capsys) -> None:
    main(["--output_dir", str(tmp_path), "--name", "demo", "--shape", "24", "24", "8", "--orientation", "PSR"])
    assert "demo.nii.gz" in capsys.readouterr().out
    assert read_image(tmp_path / "demo.nii.gz").array.shape == (24, 8, 24)
    main(["--output_dir", str(tmp_path), "--format", "png", "--kind", "mr", "--shape", "30", "20"])
    assert read_image(tmp_path / "phantom.png").array.shape == (30, 20)
    with pytest.raises(SystemExit):
        main(["--output_dir", str(tmp_path), "--orientation", "XYZ"])
    assert "one each of L/R, A/P and S/I" in capsys.readouterr().err


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind must be 'ct' or 'mr', got 'pet'"):
        write_phantom(tmp_path, kind="pet")
    with pytest.raises(ValueError, match="Unknown phantom format 'jpeg'; choose one of nifti, nrrd, dicom, png"):
        write_phantom(tmp_path, fmt="jpeg")
    with pytest.raises(ValueError, match="one each of L/R, A/P and S/I .* got 'RRS'"):
        write_phantom(tmp_path, orientation="RRS", shape=(8, 8, 4))
    with pytest.raises(ValueError, match="PNG holds 2D pictures only"):
        write_phantom(tmp_path, fmt="png", ndim=3)
    with pytest.raises(ValueError, match=r"shape must be 3 positive numbers for a 3D phantom, got \(8, 8\)"):
        write_phantom(tmp_path, shape=(8, 8))
    with pytest.raises(ValueError, match="spacing must be 2 positive numbers"):
        write_phantom(tmp_path, fmt="png", spacing=(1.0, 0.0))
    with pytest.raises(ValueError, match="orientation applies to 3D phantoms"):
        write_phantom(tmp_path, fmt="png", orientation="LPS")
