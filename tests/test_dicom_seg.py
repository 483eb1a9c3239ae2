"""Label maps to DICOM SEG and back: references, names, codes, geometry, and the refusals."""

from __future__ import annotations

from pathlib import Path

import bad_dicom
import numpy as np
import pydicom
import pytest

from scripts.dicom_seg import GENERIC, read_seg, segments_by_value, segments_for, write_seg
from scripts.image_io import read_image
from scripts.phantom import write_phantom
from scripts.vocabulary import load_vocabulary

VALUES = {"liver": 1, "spleen": 2, "right kidney": 3, "left kidney": 4, "vertebrae": 5, "aorta": 6}


@pytest.mark.parametrize("geometry", [{"orientation": "PSR"}, {"tilt_deg": 20.0}, {"orientation": "LPS"}])
def test_round_trip_in_the_series_grid(tmp_path: Path, geometry: dict) -> None:
    folder, label_path = write_phantom(tmp_path, "ct", fmt="dicom", shape=(24, 20, 6), seed=3, **geometry)
    reference, label = read_image(folder), read_image(label_path).array.astype(np.uint16)
    segments = segments_for(VALUES, load_vocabulary())
    seg_path = write_seg(label, reference, folder, segments, tmp_path / "seg.dcm")
    seg = pydicom.dcmread(str(seg_path))
    source = pydicom.dcmread(str(sorted(folder.iterdir())[0]))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == source.PatientID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    np.testing.assert_array_equal(read_seg(seg, reference, VALUES), label)


def test_segments_carry_names_and_snomed_codes(tmp_path: Path) -> None:
    folder, label_path = write_phantom(tmp_path, "ct", fmt="dicom", shape=(24, 20, 6), seed=3)
    reference, label = read_image(folder), read_image(label_path).array.astype(np.uint16)
    label[label == 5] = 7  # a value named with free text
    named = {**{k: v for k, v in VALUES.items() if v != 5}, "odd blob": 7}
    seg = pydicom.dcmread(
        str(write_seg(label, reference, folder, segments_for(named, load_vocabulary()), tmp_path / "s.dcm"))
    )
    segments = {s.SegmentLabel: s for s in seg.SegmentSequence}
    assert sorted(segments) == sorted(named)
    kidney = segments["left kidney"].SegmentedPropertyTypeCodeSequence[0]
    assert (kidney.CodeValue, kidney.CodingSchemeDesignator, kidney.CodeMeaning) == ("64033007", "SCT", "Kidney")
    assert kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Left"
    assert segments["spleen"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "78961009"  # not six spleens
    assert segments["liver"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    blob = segments["odd blob"].SegmentedPropertyTypeCodeSequence[0]
    assert (blob.CodeValue, blob.CodeMeaning) == GENERIC.type  # free text: the generic "Tissue"


def test_refusals(tmp_path: Path) -> None:
    folder, label_path = write_phantom(tmp_path, "ct", fmt="dicom", shape=(24, 20, 6), seed=3)
    reference, label = read_image(folder), read_image(label_path).array.astype(np.uint16)
    segments = segments_for(VALUES, load_vocabulary())
    with pytest.raises(ValueError, match="The label is empty"):
        write_seg(np.zeros_like(label), reference, folder, segments, tmp_path / "a.dcm")
    with pytest.raises(ValueError, match=r"Label values \[6\] have no segment name"):
        write_seg(label, reference, folder, segments[:5], tmp_path / "b.dcm")
    enhanced = bad_dicom.enhanced_ct(folder, tmp_path / "enhanced")
    with pytest.raises(ValueError, match="enhanced multi-frame object"):
        write_seg(label, read_image(enhanced), enhanced, segments, tmp_path / "c.dcm")
    seg = pydicom.dcmread(str(write_seg(label, reference, folder, segments, tmp_path / "d.dcm")))
    with pytest.raises(ValueError, match=r"Segment 'aorta' is not one of the labels"):
        read_seg(seg, reference, {k: v for k, v in VALUES.items() if k != "aorta"})
    other, _ = write_phantom(tmp_path, "other", fmt="dicom", shape=(24, 20, 6), spacing=(1.0, 1.0, 2.5))
    with pytest.raises(ValueError, match="do not have the series' pixel grid"):
        read_seg(seg, read_image(other), VALUES)
    shifted, _ = write_phantom(tmp_path, "shifted", fmt="dicom", shape=(24, 20, 6), orientation="PSR")
    with pytest.raises(ValueError, match="not in the series' orientation|pixel grid"):
        read_seg(seg, read_image(shifted), VALUES)
    with pytest.raises(ValueError, match="Not a DICOM SEG"):
        read_seg(sorted(folder.iterdir())[0], reference, VALUES)


def test_segments_may_share_a_name_or_have_none(tmp_path: Path) -> None:
    """Slicer may submit two segments called "liver", or one left unnamed: the SEG keeps every value (one name mapped
    to two values lost one, and the save was refused as unnamed; an empty name was an error)."""
    folder, label_path = write_phantom(tmp_path, "ct", fmt="dicom", shape=(24, 20, 6), seed=3)
    reference, label = read_image(folder), read_image(label_path).array.astype(np.uint16)
    label[label > 3] = 0
    segments = segments_by_value({1: "liver", 2: "liver", 3: " "}, load_vocabulary())
    seg = pydicom.dcmread(str(write_seg(label, reference, folder, segments, tmp_path / "s.dcm")))
    written = [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence]
    assert written == [(1, "liver"), (2, "liver"), (3, "Segment 3")]
    codes = [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence]
    assert codes[:2] == ["10200004", "10200004"] and codes[2] == GENERIC.type[0]
