"""A phantom volume as a classic CT or MR DICOM series with every attribute its IOD requires.

PACS, viewers and converters (Orthanc, OHIF, dcmqi, Slicer) rely on the patient, study, series, equipment and
acquisition attributes real scanners write, not only on pixels and geometry; ``dciodvfy`` (dicom3tools) finds none
missing in these files (tests/test_phantom.py).
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

__all__ = ["dicom_slices"]

_STUDY = {  # a fixed, obviously synthetic patient and study
    "PatientName": "Phantom^Medsam3",
    "PatientID": "PHANTOM",
    "PatientBirthDate": "19700101",
    "PatientSex": "O",
    "StudyDate": "20260101",
    "StudyTime": "120000",
    "ReferringPhysicianName": "",
    "StudyID": "1",
    "AccessionNumber": "",
    "BodyPartExamined": "ABDOMEN",
    "Manufacturer": "medsam3 synthetic phantom",
    "PositionReferenceIndicator": "",
    "PatientPosition": "HFS",
    "AcquisitionNumber": 1,
    "SpecificCharacterSet": "ISO_IR 100",
}
_CT = {"ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "KVP": 120}
_MR = {
    "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"],
    "ScanningSequence": "SE",
    "SequenceVariant": "NONE",
    "ScanOptions": "",
    "MRAcquisitionType": "3D",
    "RepetitionTime": 500.0,
    "EchoTime": 15.0,
    "EchoTrainLength": 1,
    "MagneticFieldStrength": 1.5,
}


def _ds(value: float) -> float:
    """A decimal string DICOM accepts (at most 16 characters)."""
    return round(float(value), 6)


def dicom_slices(
    array: np.ndarray, spacing: tuple[float, ...], origin: tuple[float, ...], direction: np.ndarray, kind: str
) -> list[Dataset]:
    """One dataset per k index of a right-handed (I, J, K) volume in LPS geometry: frame rows follow j, columns i.

    CT is stored as unsigned HU + 1024 with a rescale intercept, as scanners do; MR as the values themselves.
    """
    storage = CTImageStorage if kind == "ct" else MRImageStorage
    intercept = -1024 if kind == "ct" else 0
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    datasets = []
    for k in range(array.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = storage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta, ds.is_little_endian, ds.is_implicit_VR = meta, True, False
        ds.SOPClassUID, ds.SOPInstanceUID = storage, meta.MediaStorageSOPInstanceUID
        for keyword, value in {**_STUDY, **(_CT if kind == "ct" else _MR)}.items():
            setattr(ds, keyword, value)
        ds.Modality = kind.upper()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = 1, k + 1, f"medsam3 {kind.upper()} phantom"
        position = np.asarray(origin) + k * spacing[2] * direction[:, 2]
        ds.ImagePositionPatient = [_ds(p) for p in position]
        ds.ImageOrientationPatient = [round(float(c), 8) for c in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # between rows (along j), between columns (i)
        ds.SliceThickness = _ds(spacing[2])
        ds.SliceLocation = _ds(position @ direction[:, 2])
        pixels = array[:, :, k].T.astype(np.int32) - intercept  # rows x columns
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        if kind == "ct":
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, 1, "HU"
        ds.PixelData = np.clip(pixels, 0, 65535).astype("<u2").tobytes()
        datasets.append(ds)
    return datasets
