"""Reading and writing with exact geometry, and the model's slice views of any stored orientation."""

from __future__ import annotations

import gzip
import logging
import shutil
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from PIL import Image

from scripts.image_io import ImageVolume, read_image
from scripts.image_writing import output_path_for, write_image, write_label
from scripts.orientation import PLANES, SliceView
from scripts.phantom import make_ct_phantom, phantom_affine, write_phantom

SHAPE = (24, 20, 12)
SPACING = (1.2, 1.5, 3.0)


def _rotation(degrees: float, axis: int) -> np.ndarray:
    angle = np.deg2rad(degrees)
    a, b = [i for i in range(3) if i != axis]
    rotation = np.eye(3)
    rotation[[a, a, b, b], [a, b, a, b]] = np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)
    return rotation


def _stored(code: str, rotation: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The RAS phantom stored in the axis order ``code``: (image, label, affine), the same physical content."""
    image, label = make_ct_phantom(SHAPE, SPACING, seed=3)
    affine = phantom_affine(SHAPE, SPACING)
    if rotation is not None:
        affine[:3] = rotation @ affine[:3]
    ornt = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(code)))
    stored_affine = affine @ inv_ornt_aff(ornt, SHAPE)
    return apply_orientation(image, ornt), apply_orientation(label, ornt), stored_affine


AFFINES = {  # storage order -> (rotation of the world): plain, permuted, and oblique grids
    "RAS": None,
    "LPS": None,
    "LAS": None,
    "PSR": None,
    "ILA": None,
    "LPS-oblique": _rotation(12.0, 2) @ _rotation(-8.0, 0),
    "PSR-oblique": _rotation(20.0, 1),
}


def _save(tmp_path: Path, name: str, array: np.ndarray, affine: np.ndarray) -> Path:
    path = tmp_path / name
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array), affine), path)
    return path


# ------------------------------------------------------------------------------------------------ NIfTI


@pytest.mark.parametrize("key", list(AFFINES))
def test_nifti_label_keeps_the_input_affine(tmp_path: Path, key: str) -> None:
    image, label, affine = _stored(key[:3], AFFINES[key])
    source = _save(tmp_path, "image.nii.gz", image, affine)
    volume = read_image(source)
    np.testing.assert_array_equal(volume.array, image)
    np.testing.assert_allclose(volume.affine_ras, nib.load(source).affine, atol=1e-5)
    for suffix in (".nii.gz", ".nii"):
        out = write_label(label, volume, tmp_path / f"label{suffix}")
        written = nib.load(out)
        np.testing.assert_allclose(written.affine, nib.load(source).affine, atol=1e-4)
        assert written.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(written.dataobj), label)


def test_nifti_header_codes_survive(tmp_path: Path) -> None:
    """A qform-only file stays qform-only, so every reader finds the same affine in the label."""
    image, label, affine = _stored("LAS")
    nifti = nib.Nifti1Image(image, None)
    nifti.set_qform(affine, code=1)
    nifti.set_sform(np.eye(4), code=0)
    nib.save(nifti, tmp_path / "qform.nii.gz")
    volume = read_image(tmp_path / "qform.nii.gz")
    np.testing.assert_allclose(volume.affine_ras, affine, atol=1e-4)
    written = nib.load(write_label(label, volume, tmp_path / "label.nii.gz")).header
    assert int(written["qform_code"]) == 1 and int(written["sform_code"]) == 0
    np.testing.assert_allclose(written.get_best_affine(), affine, atol=1e-4)


def test_trailing_singleton_axes(tmp_path: Path) -> None:
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    volume = read_image(_save(tmp_path, "t.nii.gz", data[..., None], np.eye(4)))
    assert volume.array.shape == (4, 5, 6) and not volume.is_2d
    flat = read_image(_save(tmp_path, "flat.nii.gz", data[:, :, :1], np.eye(4)))
    assert flat.array.shape == (4, 5, 1) and not flat.is_2d  # one slice of a volume stays a volume
    header = "NRRD0004\ntype: short\ndimension: 4\nsizes: 6 5 4 1\nencoding: raw\nendian: little\n\n"
    (tmp_path / "t.nrrd").write_bytes(header.encode() + data.astype("<i2").tobytes())  # ITK-read, one 4D volume
    nrrd = read_image(tmp_path / "t.nrrd")
    assert nrrd.array.shape == (6, 5, 4) and nrrd.direction.shape == (3, 3) and len(nrrd.origin) == 3
    np.testing.assert_array_equal(nrrd.array, data.transpose(2, 1, 0))


def test_2d_nifti_is_rows_by_columns(tmp_path: Path) -> None:
    """A 2D NIfTI's axis 0 runs along the columns, as ITK and every other picture format have it."""
    data = np.arange(7 * 5, dtype=np.float32).reshape(7, 5)
    affine = np.diag([0.5, 0.8, 1.0, 1.0])
    volume = read_image(_save(tmp_path, "slice.nii.gz", data, affine))
    assert volume.is_2d and volume.array.shape == (5, 7) and volume.spacing == pytest.approx((0.8, 0.5))
    np.testing.assert_array_equal(volume.array, data.T)
    label = (volume.array > 10).astype(np.uint8)
    written = nib.load(write_label(label, volume, tmp_path / "label.nii.gz"))
    np.testing.assert_array_equal(np.asarray(written.dataobj), label.T)
    np.testing.assert_allclose(written.affine, affine)


def test_non_finite_values_are_read(tmp_path: Path) -> None:
    data = np.zeros((4, 5, 6), dtype=np.float32)
    data[0, 0, 0], data[1, 1, 1] = np.nan, np.inf
    volume = read_image(_save(tmp_path, "nan.nii.gz", data, np.eye(4)))
    assert np.isnan(volume.array[0, 0, 0]) and np.isinf(volume.array[1, 1, 1])


# ------------------------------------------------------------------------------------------------ other formats


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("series")
    return {
        "nrrd": write_phantom(root, "nrrd", fmt="nrrd", orientation="PSR", shape=SHAPE, spacing=SPACING, tilt_deg=7),
        "dicom": write_phantom(root, "dicom", fmt="dicom", orientation="LPS", shape=SHAPE, spacing=SPACING, tilt_deg=7),
    }


@pytest.mark.parametrize("fmt", ["nrrd", "dicom"])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_labels_for_itk_inputs_keep_the_grid(tmp_path: Path, series, fmt: str, suffix: str) -> None:
    volume = read_image(series[fmt][0])
    label = (volume.array > 100).astype(np.uint8)
    out = write_label(label, volume, tmp_path / f"label{suffix}")
    back = read_image(out)
    np.testing.assert_array_equal(back.array, label)
    np.testing.assert_allclose(back.affine_ras, volume.affine_ras, atol=1e-4)
    if suffix == ".nii.gz":
        np.testing.assert_allclose(nib.load(out).affine, volume.affine_ras, atol=1e-4)


def test_nrrd_output_of_a_nifti_input(tmp_path: Path) -> None:
    image, label, affine = _stored("PSR", AFFINES["PSR-oblique"])
    volume = read_image(_save(tmp_path, "image.nii.gz", image, affine))
    back = read_image(write_label(label, volume, tmp_path / "label.nrrd"))
    np.testing.assert_array_equal(back.array, label)
    np.testing.assert_allclose(back.affine_ras, affine, atol=1e-4)


def test_dicom_folder_with_two_series_reads_the_largest(tmp_path: Path, caplog) -> None:
    big, _ = write_phantom(tmp_path, "big", fmt="dicom", shape=(16, 16, 6))
    small, _ = write_phantom(tmp_path, "small", fmt="dicom", shape=(16, 16, 3), seed=1)
    for path in small.iterdir():
        shutil.copy(path, big / f"other_{path.name}")
    with caplog.at_level(logging.WARNING, logger="scripts.image_io"):
        volume = read_image(big)
    assert volume.array.shape == (16, 16, 6) and "holds 2 DICOM series" in caplog.text


@pytest.mark.parametrize(
    ("mode", "shape", "rgb"),
    [("L", (12, 9), False), ("RGB", (12, 9, 3), True), ("RGBA", (12, 9, 4), True), ("I;16", (12, 9), False)],
)
def test_pictures(tmp_path: Path, mode: str, shape: tuple[int, ...], rgb: bool) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 60000 if mode == "I;16" else 255, shape).astype(np.uint16 if mode == "I;16" else np.uint8)
    Image.fromarray(data).save(tmp_path / "picture.png")
    volume = read_image(tmp_path / "picture.png")
    assert volume.is_2d and volume.is_rgb == rgb
    np.testing.assert_array_equal(volume.array, data[..., :3] if rgb else data)
    label = (volume.array[..., 0] if rgb else volume.array) > 100
    for suffix in (".png", ".nii.gz", ".nrrd"):
        back = read_image(write_label(label, volume, tmp_path / f"label{suffix}"))
        assert back.is_2d
        np.testing.assert_array_equal(back.array, label.astype(np.uint8))


def test_grey_rgb_picture_is_grey(tmp_path: Path) -> None:
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5)
    Image.fromarray(np.dstack([grey] * 3)).save(tmp_path / "grey.jpg", quality=100)
    Image.fromarray(np.dstack([grey] * 3)).save(tmp_path / "grey.png")
    volume = read_image(tmp_path / "grey.png")
    assert not volume.is_rgb and volume.array.shape == (4, 5)
    assert read_image(tmp_path / "grey.jpg").array.shape[:2] == (4, 5)


# ------------------------------------------------------------------------------------------------ write_label rules


def test_label_types_and_bad_labels(tmp_path: Path) -> None:
    volume = ImageVolume.from_affine(np.zeros((4, 5, 6), np.float32), np.diag([1.0, 2.0, 3.0, 1.0]))
    big = np.zeros((4, 5, 6), dtype=np.int64)
    big[0, 0, 0] = 300
    assert nib.load(write_label(big, volume, tmp_path / "big.nii.gz")).get_data_dtype() == np.uint16
    assert nib.load(write_label(big > 0, volume, tmp_path / "bool.nii.gz")).get_data_dtype() == np.uint8
    with pytest.raises(ValueError, match=r"Label shape \(4, 5\) does not match the image shape \(4, 5, 6\)"):
        write_label(np.zeros((4, 5)), volume, tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match="must lie in 0..65535"):
        write_label(big - 1, volume, tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match="whole numbers"):
        write_label(np.full((4, 5, 6), 0.5), volume, tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match="PNG output holds 8- or 16-bit 2D pictures only"):
        write_label(big, volume, tmp_path / "x.png")
    with pytest.raises(ValueError, match="Unsupported output format '.tif'"):
        write_label(big, volume, tmp_path / "x.tif")
    with pytest.raises(ValueError, match="Cannot write pixel type int64"):
        write_image(big, volume, tmp_path / "x.nrrd")


def test_output_path_for(tmp_path: Path) -> None:
    assert output_path_for("/data/case_01.nii.gz", tmp_path) == tmp_path / "case_01.nii.gz"
    assert output_path_for("/data/CT.NRRD", tmp_path, ".nrrd", "_seg") == tmp_path / "CT_seg.nrrd"
    assert output_path_for("/data/xray.png", tmp_path, ".png") == tmp_path / "xray.png"
    assert output_path_for("/data/series_7/", tmp_path) == tmp_path / "series_7.nii.gz"
    assert output_path_for("/data/scan.v2.nii", tmp_path, postfix="_label") == tmp_path / "scan.v2_label.nii.gz"


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_files(tmp_path: Path) -> None:
    data = np.zeros((16, 16, 16), dtype=np.float32)
    good = _save(tmp_path, "good.nii.gz", data, np.eye(4))
    cases = {
        "truncated.nii.gz": good.read_bytes()[: len(good.read_bytes()) // 2],
        "random.nii.gz": np.random.default_rng(0).bytes(3000),
        "notnifti.nii.gz": gzip.compress(b"not a nifti file at all" * 20),
        "random.nrrd": np.random.default_rng(1).bytes(3000),
        "random.dcm": np.random.default_rng(2).bytes(3000),
        "broken.png": b"\x89PNG\r\n\x1a\n" + bytes(40),
    }
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "plain.nii")
    cases["truncated.nii"] = (tmp_path / "plain.nii").read_bytes()[:5000]
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"Cannot read image .*{name}: ."):
            read_image(tmp_path / name)


def test_bad_shapes_and_paths(tmp_path: Path) -> None:
    _save(tmp_path, "four.nii.gz", np.zeros((4, 4, 4, 2), np.float32), np.eye(4))
    with pytest.raises(ValueError, match=r"4D images are not supported: .*four.nii.gz has shape \(4, 4, 4, 2\)"):
        read_image(tmp_path / "four.nii.gz")
    _save(tmp_path, "line.nii.gz", np.zeros((7,), np.float32), np.eye(4))
    with pytest.raises(ValueError, match=r"line.nii.gz has shape \(7,\): a 1D array is not an image"):
        read_image(tmp_path / "line.nii.gz")
    header = "NRRD0004\ntype: float\ndimension: 1\nsizes: 5\nencoding: raw\nendian: little\n\n"
    (tmp_path / "line.nrrd").write_bytes(header.encode() + np.zeros(5, "<f4").tobytes())
    with pytest.raises(ValueError, match="a 1D array is not an image"):
        read_image(tmp_path / "line.nrrd")
    _save(tmp_path, "empty.nii.gz", np.zeros((0, 4, 4), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="has an empty axis"):
        read_image(tmp_path / "empty.nii.gz")
    with pytest.raises(ValueError, match="No image path given"):
        read_image("")
    with pytest.raises(ValueError, match="Image not found: .*missing.nii.gz"):
        read_image(tmp_path / "missing.nii.gz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="Unsupported image format '.txt' for .*notes.txt"):
        read_image(tmp_path / "notes.txt")
    (tmp_path / "empty_dicom").mkdir()
    with pytest.raises(ValueError, match="DICOM folder .*empty_dicom is empty"):
        read_image(tmp_path / "empty_dicom")
    parallel = np.eye(4)
    parallel[:3, 1] = [1, 0, 0]  # the second axis along the first
    _save(tmp_path, "parallel.nii.gz", np.zeros((4, 4, 4), np.float32), parallel)
    with pytest.raises(ValueError, match="parallel.nii.gz: the image's axes are not independent"):
        read_image(tmp_path / "parallel.nii.gz")
    rgb16 = itk.image_from_array(np.zeros((6, 5, 3), np.uint16), is_vector=True)
    itk.imwrite(rgb16, str(tmp_path / "rgb16.mha"))
    with pytest.raises(ValueError, match="3 values per voxel of type unsigned_short in 2D are not supported"):
        read_image(tmp_path / "rgb16.mha")
    (tmp_path / "text_only").mkdir()
    (tmp_path / "text_only" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="No DICOM series found in .*text_only"):
        read_image(tmp_path / "text_only")


# ------------------------------------------------------------------------------------------------ slice views


def _volume(code: str, rotation: np.ndarray | None = None) -> tuple[ImageVolume, np.ndarray]:
    image, label, affine = _stored(code, rotation)
    return ImageVolume.from_affine(np.ascontiguousarray(image), affine), np.ascontiguousarray(label)


@pytest.mark.parametrize("key", list(AFFINES))
@pytest.mark.parametrize("plane", list(PLANES))
def test_views_round_trip_and_match_ras(key: str, plane: str) -> None:
    """Every storage order gives the same view as the RAS original, and from_view undoes to_view."""
    volume, label = _volume(key[:3], AFFINES[key])
    ras, ras_label = _volume("RAS", AFFINES[key])
    view = SliceView.for_volume(volume, plane)
    assert view.view_shape == view.to_view(volume.array).shape
    np.testing.assert_array_equal(view.from_view(view.to_view(volume.array)), volume.array)
    channels = np.stack([volume.array, -volume.array], axis=-1)
    np.testing.assert_array_equal(view.from_view(view.to_view(channels)), channels)
    reference = SliceView.for_volume(ras, plane)
    np.testing.assert_array_equal(view.to_view(volume.array), reference.to_view(ras.array))
    np.testing.assert_array_equal(view.to_view(label), reference.to_view(ras_label))
    np.testing.assert_allclose(view.view_affine, reference.view_affine, atol=1e-6)
    if AFFINES[key] is None:
        assert nib.aff2axcodes(view.view_affine) == PLANES[plane]


def test_axial_view_is_radiological() -> None:
    """Rows run anterior to posterior, columns from the patient's right to left, slices upwards."""
    volume, label = _volume("LPS")
    view = SliceView.for_volume(volume, "axial")
    labels = view.to_view(label)
    d, h, w = (np.argwhere(labels == 1).mean(axis=0) - np.argwhere(labels == 5).mean(axis=0)).tolist()
    assert h < 0 and w < 0  # the liver is anterior of the spine (higher up) and on the patient's right (left)
    assert np.argwhere(labels == 1)[:, 0].mean() > np.argwhere(labels == 3)[:, 0].mean()  # above the kidney


@pytest.mark.parametrize("code", ["RAS", "PSR", "ILA", "LAS"])
@pytest.mark.parametrize("plane", list(PLANES))
def test_points_land_in_the_same_structure(code: str, plane: str) -> None:
    volume, label = _volume(code)
    view = SliceView.for_volume(volume, plane)
    view_label = view.to_view(label)
    for value in (1, 2, 3, 4, 5, 6):
        voxels = np.argwhere(label == value)
        points = voxels[:: max(1, len(voxels) // 7)]
        mapped = view.points_to_view(points)
        assert (view_label[tuple(mapped.T)] == value).all()
        view_image = view.to_view(volume.array)
        np.testing.assert_array_equal(view_image[tuple(mapped.T)], volume.array[tuple(points.T)])


@pytest.mark.parametrize("code", ["RAS", "PSR", "ILA"])
def test_boxes_cover_the_same_voxels(code: str) -> None:
    volume, _ = _volume(code)
    view = SliceView.for_volume(volume, "axial")
    box = np.array([[2, 3, 1, 9, 10, 5]])
    low, high = box[0, :3], box[0, 3:]
    mask = np.zeros(volume.array.shape, dtype=bool)
    mask[tuple(slice(lo, hi + 1) for lo, hi in zip(low, high, strict=True))] = True
    inside = np.argwhere(view.to_view(mask))
    d0, h0, w0, d1, h1, w1 = view.boxes_to_view(box)[0]
    np.testing.assert_array_equal(inside.min(axis=0), [d0, h0, w0])
    np.testing.assert_array_equal(inside.max(axis=0), [d1, h1, w1])


def test_pictures_get_a_single_slice_view() -> None:
    grey = ImageVolume.from_picture(np.arange(12, dtype=np.uint8).reshape(3, 4))
    rgb = ImageVolume.from_picture(np.zeros((3, 4, 3), dtype=np.uint8))
    for volume in (grey, rgb):
        view = SliceView.for_volume(volume, "sagittal")  # the plane does not apply to pictures
        assert view.is_2d and view.view_shape == (1, 3, 4)
        shown = view.to_view(volume.array)
        assert shown.shape == (1, *volume.array.shape)
        np.testing.assert_array_equal(view.from_view(shown), volume.array)
    points = np.array([[0, 2, 3], [0, 0, 1]])
    np.testing.assert_array_equal(view.points_to_view(points), points)
    np.testing.assert_array_equal(view.boxes_to_view([[0, 2, 3, 0, 0, 1]]), [[0, 0, 1, 0, 2, 3]])
    with pytest.raises(ValueError, match=r"Point \[0, 3, 0\] is outside the image \(shape \(3, 4\)\)"):
        view.points_to_view([[0, 3, 0]])


def test_view_errors() -> None:
    volume, _ = _volume("PSR")
    with pytest.raises(ValueError, match="Unknown plane 'oblique'; choose one of axial, coronal, sagittal"):
        SliceView.for_volume(volume, "oblique")
    view = SliceView.for_volume(volume)
    with pytest.raises(ValueError, match=r"Point \[20, 0, 0\] is outside the image \(shape \(20, 12, 24\)\)"):
        view.points_to_view(np.array([[1, 1, 1], [20, 0, 0]]))
    with pytest.raises(ValueError, match=r"Point \[-1, 0, 0\] is outside"):
        view.points_to_view([[-1, 0, 0]])
    with pytest.raises(ValueError, match="points must be N x 3"):
        view.points_to_view([1, 2, 3])
    with pytest.raises(ValueError, match="must be integer voxel indices"):
        view.points_to_view([[1.5, 2, 3]])
    with pytest.raises(ValueError, match="boxes must be M x 6"):
        view.boxes_to_view([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"does not fit the source shape \(20, 12, 24\)"):
        view.to_view(np.zeros((24, 20, 12)))
