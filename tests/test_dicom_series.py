"""Bad DICOM series are refused before ITK reads them, with what is wrong and what to do; good ones read as before."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import bad_dicom
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from scripts.dicom_series import check_series
from scripts.image_io import read_image
from scripts.phantom import write_phantom

SHAPE = (32, 32, 12)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder, _ = write_phantom(tmp_path_factory.mktemp("good"), "good", fmt="dicom", shape=SHAPE)
    return folder


def _refusal(folder: Path) -> str:
    with pytest.raises(ValueError) as error:
        read_image(folder)
    return str(error.value)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (bad_dicom.missing_slices, ["2 slices missing between positions -3.75 and 3.75 mm", "complete series"]),
        (bad_dicom.uneven_spacing, ["inconsistent slice spacing (values 1.5, 2.5, 3.5 mm", "dcm2niix"]),
        (bad_dicom.private_transfer_syntax, [f"transfer syntax {bad_dicom.PRIVATE_SYNTAX} (private or unknown)"]),
        (bad_dicom.sr_document, ["is a DICOM SR", "Basic Text SR Storage", "not an image series", "pick the image"]),
        (bad_dicom.segmentation, ["is a DICOM SEG", "Segmentation Storage", "not an image series", "pick the image"]),
        (lambda good, out: bad_dicom.enhanced_ct(good, out, drop=(5, 6)), ["2 slices missing between positions"]),
        (bad_dicom.gantry_tilt, ["the slices are sheared", "gantry-tilted", "dcm2niix"]),
    ],
    ids=["missing", "uneven", "syntax", "sr", "seg", "enhanced-gap", "gantry-tilt"],
)
def test_bad_variants_are_refused(good: Path, tmp_path: Path, make: Callable, words: list[str]) -> None:
    folder = make(good, tmp_path / "bad")
    message = _refusal(folder)
    assert message.startswith(f"DICOM series in {folder}: ")
    for word in words:
        assert word in message


def test_a_file_given_alone_is_checked_too(good: Path, tmp_path: Path) -> None:
    report = next(bad_dicom.sr_document(good, tmp_path / "sr").iterdir())
    assert _refusal(report).startswith(f"DICOM file {report} is a DICOM SR (structured report)")


def test_enhanced_ct_reads_with_the_geometry_of_its_slices(good: Path, tmp_path: Path) -> None:
    """ITK reads an evenly spaced multi-frame file right, so it is accepted (frames in order either way)."""
    slices, enhanced = read_image(good), read_image(bad_dicom.enhanced_ct(good, tmp_path / "enhanced"))
    np.testing.assert_array_equal(enhanced.array, slices.array)
    np.testing.assert_allclose(enhanced.affine_ras, slices.affine_ras, atol=1e-4)
    path = next((tmp_path / "enhanced").iterdir())
    ds = pydicom.dcmread(path)
    frames = ds.PerFrameFunctionalGroupsSequence
    frames[0], frames[1] = frames[1], frames[0]
    ds.save_as(path)
    assert "frames are not stored in order along the slice normal (0001.dcm frame 2" in _refusal(path.parent)


@pytest.mark.parametrize("variant", [{}, {"orientation": "PSR"}, {"tilt_deg": 20.0}], ids=["axial", "PSR", "tilted"])
def test_good_series_read_in_the_phantom_grid(tmp_path: Path, variant: dict) -> None:
    """The phantom's label map is written in its own grid, independently of the DICOM reader."""
    folder, label = write_phantom(tmp_path, "good", fmt="dicom", shape=(20, 16, 6), spacing=(1.2, 1.5, 3.0), **variant)
    volume, expected = read_image(folder), nib.load(label)
    assert volume.array.shape == expected.shape
    np.testing.assert_allclose(volume.affine_ras, expected.affine, atol=1e-4)


def test_a_single_slice_stays_a_picture(good: Path, tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    shutil.copy(sorted(good.iterdir())[3], tmp_path / "one")
    picture = read_image(tmp_path / "one")
    assert picture.is_2d and picture.array.shape == (SHAPE[1], SHAPE[0])


def _edited(good: Path, out: Path, **values: object) -> Path:
    """A copy of the series with some attributes of its sixth slice changed (None deletes one)."""
    shutil.copytree(good, out)
    path = sorted(out.glob("*.dcm"))[5]
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)
    return out


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]}, "mixed orientations ([1, 0, 0, 0, 1, 0] in slice_0000"),
        ({"Rows": 16}, "slices differ in size (32x32 in slice_0000.dcm, 16x32 in slice_0005.dcm)"),
        ({"PixelSpacing": [1.0, 2.0]}, "mixed pixel spacing ([1.5, 1.5] mm in slice_0000.dcm, [1, 2] mm"),
        ({"ImagePositionPatient": None}, "1 of its 12 slices (e.g. slice_0005.dcm) lack ImagePositionPatient"),
    ],
    ids=["orientation", "rows", "spacing", "position"],
)
def test_mixed_or_missing_geometry_is_refused(good: Path, tmp_path: Path, values: dict, words: str) -> None:
    assert words in _refusal(_edited(good, tmp_path / "edited", **values))


def test_duplicated_positions_and_foreign_files_are_refused(good: Path, tmp_path: Path) -> None:
    folder = _edited(good, tmp_path / "twice")
    ds = pydicom.dcmread(folder / "slice_0005.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(folder / "again.dcm")
    assert "duplicated slice positions (1 repeated, e.g. two slices at" in _refusal(folder)
    assert "(again.dcm and slice_0005.dcm)" in _refusal(folder) or "(slice_0005.dcm and again.dcm)" in _refusal(folder)
    (folder / "again.dcm").unlink()
    (folder / "notes.txt").write_text("not DICOM")
    assert "holds files that are not DICOM: notes.txt is not a readable DICOM file" in _refusal(folder)
    assert check_series(sorted(good.glob("*.dcm"))[::-1]) == sorted(good.glob("*.dcm"))  # stacking order
