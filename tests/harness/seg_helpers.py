"""Test data for segmentations: a small CT series, a DICOM SEG of it (written by highdicom) and
an RT structure set of it (built with pydicom), with the masks they must read back to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
SPACING = (0.8, 0.7)  # row spacing, column spacing (mm)
ORIGIN = (-11.2, -13.3)  # x, y of the first pixel's centre
SLICE_GAP = 2.5


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=["fedsynth-seg-test", *map(str, parts)])


def ct_series(folder: Path, *, n: int = 4, rows: int = 32, cols: int = 32, tag: str = "a"
              ) -> list[Dataset]:
    """``n`` axial CT slices of one series (a bright disc that moves), written to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = _uid(tag, "study"), _uid(tag, "series"), _uid(tag, "for")
    out = []
    yy, xx = np.mgrid[:rows, :cols]
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CT_STORAGE
        ds.file_meta.MediaStorageSOPInstanceUID = _uid(tag, "sop", i)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SOPClassUID = CT_STORAGE
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "SEG^TEST", "S1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "090000", "1", ""
        ds.ReferringPhysicianName = ""
        ds.Manufacturer = "fedsynth-test"
        ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
        ds.SeriesDescription = "CT TEST"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [ORIGIN[0], ORIGIN[1], i * SLICE_GAP]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = list(SPACING)
        ds.SliceThickness = SLICE_GAP
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        disc = (yy - rows / 2) ** 2 + (xx - cols / 2 - i) ** 2 < (rows / 4) ** 2
        ds.PixelData = np.where(disc, 1100, 1024).astype("<u2").tobytes()
        ds.save_as(folder / f"ct_{tag}_{i}.dcm", enforce_file_format=True)
        out.append(ds)
    return out


def lesion_masks(n: int, rows: int, cols: int) -> np.ndarray:
    """(n, rows, cols, 2) bool: segment 1 "Lesion" on slices 1 and 2, segment 2 "Liver" on 2."""
    m = np.zeros((n, rows, cols, 2), dtype=bool)
    m[1, 5:12, 7:15, 0] = True
    m[2, 20:27, 3:9, 0] = True
    m[2, 14:30, 10:30, 1] = True
    return m


def write_seg(images: list[Dataset], masks: np.ndarray, path: Path) -> Dataset:
    """A binary DICOM SEG of ``images`` written by highdicom (empty frames omitted)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algo = hd.AlgorithmIdentificationSequence(name="test", version="1",
                                              family=codes.cid7162.ArtificialIntelligence)
    descs = [
        hd.seg.SegmentDescription(
            segment_number=1, segment_label="Lesion",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo),
        hd.seg.SegmentDescription(
            segment_number=2, segment_label="Liver",
            segmented_property_category=codes.SCT.Organ, segmented_property_type=codes.SCT.Liver,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo),
    ]
    seg = hd.seg.Segmentation(
        source_images=images, pixel_array=masks.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descs,
        series_instance_uid=generate_uid(), series_number=100, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer="fedsynth-test", manufacturer_model_name="test",
        software_versions="0", device_serial_number="1")
    seg.save_as(path)
    return seg


def rect_contour(ds: Dataset, r0: int, r1: int, c0: int, c1: int) -> list[float]:
    """A closed rectangle through the pixel centres (r0..r1, c0..c1) of slice ``ds``, in mm."""
    z = float(ds.ImagePositionPatient[2])
    pts = [(r0, c0), (r0, c1), (r1, c1), (r1, c0)]
    out: list[float] = []
    for r, c in pts:
        out += [ORIGIN[0] + c * SPACING[1], ORIGIN[1] + r * SPACING[0], z]
    return out


def write_rtstruct(images: list[Dataset], path: Path, *, reference: bool = True,
                   frame_of_reference: str | None = None) -> Dataset:
    """ROI 1 "GTV lesion" (rectangles on slices 1 and 3), ROI 2 "Body" (slice 0).

    ``reference`` False: contours carry no ContourImageSequence (matched by the plane)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_STORAGE, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.StudyInstanceUID = images[0].StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.StructureSetLabel = "test"
    for_uid = frame_of_reference or images[0].FrameOfReferenceUID
    roi_seq, contour_seq, obs_seq = Sequence(), Sequence(), Sequence()
    plan = {1: ("GTV lesion", [(1, (4, 10, 6, 14)), (3, (12, 20, 2, 9))]),
            2: ("Body", [(0, (1, 30, 1, 30))])}
    for number, (name, shapes) in plan.items():
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, for_uid
        roi.ROIGenerationAlgorithm = "MANUAL"
        roi_seq.append(roi)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ROIDisplayColor = [255, 0, 0]
        rc.ContourSequence = Sequence()
        for slice_index, (r0, r1, c0, c1) in shapes:
            c = Dataset()
            c.ContourGeometricType = "CLOSED_PLANAR"
            data = rect_contour(images[slice_index], r0, r1, c0, c1)
            c.NumberOfContourPoints = len(data) // 3
            c.ContourData = data
            if reference:
                ref = Dataset()
                ref.ReferencedSOPClassUID = CT_STORAGE
                ref.ReferencedSOPInstanceUID = images[slice_index].SOPInstanceUID
                c.ContourImageSequence = Sequence([ref])
            rc.ContourSequence.append(c)
        contour_seq.append(rc)
        obs = Dataset()
        obs.ObservationNumber, obs.ReferencedROINumber = number, number
        obs.RTROIInterpretedType, obs.ROIInterpreter = ("GTV" if number == 1 else "EXTERNAL"), ""
        obs_seq.append(obs)
    ds.StructureSetROISequence = roi_seq
    ds.ROIContourSequence = contour_seq
    ds.RTROIObservationsSequence = obs_seq
    ds.save_as(path, enforce_file_format=True)
    return ds


def rtstruct_expected(n: int, rows: int, cols: int) -> np.ndarray:
    """The lesion ROI's mask: every pixel whose centre is inside or on the rectangle."""
    m = np.zeros((n, rows, cols), dtype=bool)
    m[1, 4:11, 6:15] = True
    m[3, 12:21, 2:10] = True
    return m



def add_phantom_segs(hospital_dir: Path, label: str = "lesion") -> list[Path]:
    """fedsynth.mask_demo's phantom lesion SEGs (kept here under the tests' name)."""
    from fedsynth.mask_demo import add_phantom_segs as add

    return add(hospital_dir, label)
