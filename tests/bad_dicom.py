"""Bad DICOM series made from a good one, for the reader's refusals and for a PACS upload.

Each helper reads a good series folder (``write_phantom(..., fmt="dicom")``) and writes one defect to a new
folder, which it returns. Every file is a valid Part-10 file a PACS stores: it keeps the source's patient and
study, and gets a new SeriesInstanceUID and SOPInstanceUIDs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixel_data_handlers.numpy_handler import pack_bits
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
# A transfer syntax no decoder knows: a UID under pydicom's root, fixed so tests can look for it.
PRIVATE_SYNTAX = generate_uid(entropy_srcs=["medsam3 private transfer syntax"])
# The attributes a derived object copies from its source: who and which study it belongs to.
_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _slices(folder: Path) -> list[Dataset]:
    """The series' datasets in stacking order (the phantom names slices in order along the normal)."""
    return [pydicom.dcmread(path) for path in sorted(Path(folder).glob("*.dcm"))]


def _write(datasets: list[Dataset], out: Path, description: str) -> Path:
    """Save ``datasets`` as one new series in ``out``: new series and instance UIDs, file meta to match."""
    out.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    for number, ds in enumerate(datasets, start=1):
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, generate_uid()
        ds.SeriesDescription, ds.InstanceNumber = description, number
        meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        meta.TransferSyntaxUID = meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)
        ds.file_meta, ds.is_little_endian, ds.is_implicit_VR = meta, True, False
        ds.save_as(out / f"{number:04d}.dcm", write_like_original=False)
    return out


def _derived(source: Dataset, sop_class: str, modality: str) -> Dataset:
    """A new instance of ``sop_class`` in the source's patient and study, dated as the study (or a fixed day)."""
    ds = Dataset()
    for keyword in _PATIENT_STUDY:
        setattr(ds, keyword, source.get(keyword, ""))
    ds.SOPClassUID, ds.Modality, ds.SeriesNumber = sop_class, modality, 99
    ds.Manufacturer, ds.SpecificCharacterSet = "medsam3 tests", "ISO_IR 100"
    ds.ContentDate, ds.ContentTime = source.get("StudyDate") or "20240101", "120000"
    return ds


def missing_slices(good: Path, out: Path) -> Path:
    """The series without its two middle slices: a gap of three spacings."""
    slices = _slices(good)
    middle = len(slices) // 2
    return _write(slices[: middle - 1] + slices[middle + 1 :], out, "missing slices")


def uneven_spacing(good: Path, out: Path) -> Path:
    """One slice moved 40% of the spacing along the normal, so the gaps around it differ."""
    slices = _slices(good)
    normal, spacing = _normal(slices[0]), float(slices[0].SliceThickness)
    moved = slices[len(slices) // 3]
    position = np.asarray(moved.ImagePositionPatient, dtype=float) + 0.4 * spacing * normal
    moved.ImagePositionPatient = [round(float(p), 6) for p in position]
    moved.SliceLocation = round(float(position @ normal), 6)
    return _write(slices, out, "uneven spacing")


def gantry_tilt(good: Path, out: Path) -> Path:
    """Each slice shifted along the column direction in proportion to its height: a CT tilted by 20 degrees."""
    slices = _slices(good)
    for ds in slices:
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
        position = np.asarray(ds.ImagePositionPatient, dtype=float)
        shifted = position + orientation[3:] * (position @ _normal(ds)) * np.tan(np.deg2rad(20))
        ds.ImagePositionPatient = [round(float(p), 6) for p in shifted]
    return _write(slices, out, "gantry tilt")


def private_transfer_syntax(good: Path, out: Path) -> Path:
    """Every file labelled with a private transfer syntax (``PRIVATE_SYNTAX``); the pixels are left as they are."""
    slices = _slices(good)
    for ds in slices:
        ds.file_meta.TransferSyntaxUID = PRIVATE_SYNTAX
    return _write(slices, out, "private transfer syntax")


def enhanced_ct(good: Path, out: Path, drop: tuple[int, ...] = ()) -> Path:
    """The series as one Enhanced CT multi-frame file, geometry in the functional groups as scanners write it.

    ``drop``: slice indices left out, for a multi-frame file with a gap.
    """
    slices = [ds for k, ds in enumerate(_slices(good)) if k not in drop]
    first = slices[0]
    ds = _derived(first, ENHANCED_CT, "CT")
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = first.FrameOfReferenceUID, ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.AcquisitionNumber, ds.AcquisitionDateTime = 1, f"{ds.ContentDate}120000"
    ds.ContentQualification, ds.BurnedInAnnotation, ds.PresentationLUTShape = "PRODUCT", "NO", "IDENTITY"
    ds.ImageComments = "medsam3 test: enhanced multi-frame CT"
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated"):
        setattr(ds, keyword, first[keyword].value)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = first.BitsStored, first.HighBit, first.PixelRepresentation
    ds.NumberOfFrames = len(slices)
    dimension = generate_uid()
    ds.DimensionOrganizationSequence = Sequence([Dataset()])
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = dimension
    ds.DimensionIndexSequence = Sequence(
        [_dimension(dimension, 0x00209056, "Stack ID"), _dimension(dimension, 0x00209057, "In-Stack Position")]
    )
    ds.SharedFunctionalGroupsSequence = Sequence([_shared_groups(first)])
    ds.PerFrameFunctionalGroupsSequence = Sequence(
        [_frame_groups(frame, number) for number, frame in enumerate(slices, start=1)]
    )
    ds.PixelData = b"".join(frame.PixelData for frame in slices)
    return _write([ds], out, "enhanced multi-frame CT")


def _dimension(organization: str, pointer: int, label: str) -> Dataset:
    item = Dataset()
    item.DimensionOrganizationUID, item.DimensionIndexPointer = organization, pointer
    item.FunctionalGroupPointer, item.DimensionDescriptionLabel = 0x00209111, label  # Frame Content Sequence
    return item


def _shared_groups(first: Dataset) -> Dataset:
    """Pixel measures and the HU rescale, the same for every frame."""
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = first.PixelSpacing, first.SliceThickness
    measures.SpacingBetweenSlices = first.SliceThickness
    rescale = Dataset()
    rescale.RescaleIntercept, rescale.RescaleSlope, rescale.RescaleType = first.RescaleIntercept, 1, "HU"
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([rescale])
    shared.CTImageFrameTypeSequence = Sequence([frame_type])
    return shared


def _frame_groups(frame: Dataset, number: int) -> Dataset:
    """Where one frame lies: its position, orientation and place in the stack."""
    position, orientation, content = Dataset(), Dataset(), Dataset()
    position.ImagePositionPatient = frame.ImagePositionPatient
    orientation.ImageOrientationPatient = frame.ImageOrientationPatient
    content.StackID, content.InStackPositionNumber, content.DimensionIndexValues = "1", number, [1, number]
    groups = Dataset()
    groups.PlanePositionSequence = Sequence([position])
    groups.PlaneOrientationSequence = Sequence([orientation])
    groups.FrameContentSequence = Sequence([content])
    return groups


def sr_document(good: Path, out: Path) -> Path:
    """A Basic Text SR about the series: a report, no pixels."""
    source = _slices(good)[0]
    ds = _derived(source, BASIC_TEXT_SR, "SR")
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic Imaging Report")])
    ds.ReferencedPerformedProcedureStepSequence, ds.PerformedProcedureCodeSequence = Sequence(), Sequence()
    finding = Dataset()
    finding.RelationshipType, finding.ValueType = "CONTAINS", "TEXT"
    finding.ConceptNameCodeSequence = Sequence([_code("121071", "DCM", "Finding")])
    finding.TextValue = "Synthetic phantom; no findings."
    ds.ContentSequence = Sequence([finding])
    return _write([ds], out, "report")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def segmentation(good: Path, out: Path) -> Path:
    """A one-segment binary DICOM SEG of the series' middle slice (pixels present: refused for what it is)."""
    slices = _slices(good)
    source = slices[len(slices) // 2]
    ds = _derived(source, SEGMENTATION, "SEG")
    ds.FrameOfReferenceUID, ds.ImageType = source.FrameOfReferenceUID, ["DERIVED", "PRIMARY"]
    ds.ContentLabel, ds.ContentCreatorName, ds.SegmentationType = "MEDSAM3", "medsam3^tests", "BINARY"
    ds.Rows, ds.Columns, ds.NumberOfFrames = source.Rows, source.Columns, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.LossyImageCompression = "00"
    segment = Dataset()
    segment.SegmentNumber, segment.SegmentLabel, segment.SegmentAlgorithmType = 1, "liver", "MANUAL"
    segment.SegmentedPropertyCategoryCodeSequence = Sequence([_code("91723000", "SCT", "Anatomical Structure")])
    segment.SegmentedPropertyTypeCodeSequence = Sequence([_code("10200004", "SCT", "Liver")])
    ds.SegmentSequence = Sequence([segment])
    referenced = Dataset()
    referenced.SeriesInstanceUID = source.SeriesInstanceUID
    referenced.ReferencedInstanceSequence = Sequence([Dataset()])
    referenced.ReferencedInstanceSequence[0].ReferencedSOPClassUID = source.SOPClassUID
    referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID = source.SOPInstanceUID
    ds.ReferencedSeriesSequence = Sequence([referenced])
    shared, frame = Dataset(), Dataset()
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = source.PixelSpacing
    shared.PixelMeasuresSequence[0].SliceThickness = source.SliceThickness
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = source.ImageOrientationPatient
    frame.PlanePositionSequence = Sequence([Dataset()])
    frame.PlanePositionSequence[0].ImagePositionPatient = source.ImagePositionPatient
    frame.SegmentIdentificationSequence = Sequence([Dataset()])
    frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber = 1
    ds.SharedFunctionalGroupsSequence, ds.PerFrameFunctionalGroupsSequence = Sequence([shared]), Sequence([frame])
    mask = np.zeros((source.Rows, source.Columns), dtype=np.uint8)
    mask[source.Rows // 4 : source.Rows // 2, source.Columns // 4 : source.Columns // 2] = 1
    ds.PixelData = pack_bits(mask)
    return _write([ds], out, "segmentation")


def _normal(ds: Dataset) -> np.ndarray:
    """The slice normal: the cross product of the row and column directions."""
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
    return np.cross(orientation[:3], orientation[3:])
