"""Simulated C-arm acquisitions written as DICOM: single-frame XA objects and one Enhanced XA
multi-frame object, with the geometry in the standard attributes (read back by
:mod:`mvreg_ros.core.data.dicom`).

Each XA object carries every Type 1 attribute of the XA IOD (:data:`XA_TYPE1`), the Type 2
attributes of its modules (empty where unknown), ``PositionerPrimaryAngle`` (+ LAO),
``PositionerSecondaryAngle`` (+ CRA), ``DistanceSourceToPatient`` (source to isocentre),
``DistanceSourceToDetector``, ``ImagerPixelSpacing`` (at the detector) with ``PixelSpacing`` at
the isocentre and ``EstimatedRadiographicMagnificationFactor`` = SDD / SID, and
``PatientPosition``. The Enhanced XA object holds the same per frame in its functional groups
(``PositionerPositionSequence``, ``XRayGeometrySequence``, ``TablePositionSequence``,
``FramePixelDataPropertiesSequence``, ``FieldOfViewSequence``) and, for head-first patient
positions, the X-Ray Isocenter Reference System (``IsocenterReferenceSystemSequence``: the
equipment angles of the same camera, detector rotation 0, table positions to the isocentre, table
angles 0). Pixels are raw detector
intensities (``LIN``, sign +1, MONOCHROME2, 16 bits) in the engine's camera orientation (the
detector as seen from the source; ``FieldOfViewRotation`` 0, no flip). ``variant`` writes the
same image as ``MONOCHROME1`` (inverted values, sign -1) or ``LOG`` (natural-log units through
the Modality LUT) for tests of the reader.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.data.dicom import (
    ENHANCED_XA_SOP_CLASS,
    PATIENT_POSITIONS,
    XA_SOP_CLASS,
    R_iso_from_pat,
    default_start,
)
from mvreg_ros.core.data.simulate import AcquisitionConfig, DetectorConfig, acquire
from mvreg_ros.core.geometry import carm
from mvreg_ros.core.geometry.transforms import invert

# Type 1 attributes of the XA IOD (modules: SOP Common, General Study, General Series, Image
# Pixel, X-Ray Image, X-Ray Acquisition) and of the DICOM file meta information
XA_TYPE1 = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "ImageType",
    "PixelIntensityRelationship",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PixelData",
    "RadiationSetting",
)
# Type 2 attributes written (empty where unknown)
XA_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "SeriesNumber",
    "Manufacturer",
    "InstanceNumber",
    "PatientOrientation",
    "KVP",
    "PositionerPrimaryAngle",
    "PositionerSecondaryAngle",
)
FILE_META_TYPE1 = (
    "MediaStorageSOPClassUID",
    "MediaStorageSOPInstanceUID",
    "TransferSyntaxUID",
    "ImplementationClassUID",
)
# Type 1 attributes of the Enhanced XA IOD written here (top level)
ENHANCED_XA_TYPE1 = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "ImageType",
    "InstanceNumber",
    "ContentDate",
    "ContentTime",
    "AcquisitionDateTime",
    "NumberOfFrames",
    "PixelIntensityRelationship",
    "PixelIntensityRelationshipSign",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PixelData",
    "LossyImageCompression",
    "XRayReceptorType",
    "PositionerType",
    "CArmPositionerTabletopRelationship",
    "ContentQualification",
    "PerFrameFunctionalGroupsSequence",
    "SharedFunctionalGroupsSequence",
    "DimensionOrganizationSequence",
    "DimensionIndexSequence",
    "RadiationSetting",
)
VARIANTS = ("LIN", "MONOCHROME1", "LOG")
LOG_UNITS_PER_NEPER = 5000.0  # LOG variant: stored = 5000 * ln(intensity), RescaleSlope = 1 / 5000
MAX_STORED = 65535


def _ds(x: float):
    from pydicom.valuerep import DSfloat

    return DSfloat(float(x), auto_format=True)


@dataclasses.dataclass(frozen=True)
class StudyInfo:
    """What ties the objects of one simulated acquisition together."""

    study_uid: str
    series_uid: str
    enhanced_series_uid: str
    patient_position: str = "HFS"
    patient_id: str = "SIM-0001"
    when: datetime.datetime = datetime.datetime(2025, 1, 1, 12, 0, 0)

    @classmethod
    def new(cls, *, patient_position: str = "HFS", seed: int = 0) -> StudyInfo:
        from pydicom.uid import generate_uid

        if patient_position not in PATIENT_POSITIONS:
            raise ValueError(f"patient_position must be one of {PATIENT_POSITIONS}, got {patient_position!r}")
        entropy = [f"mvreg-sim-{seed}"]
        return cls(
            study_uid=generate_uid(entropy_srcs=entropy + ["study"]),
            series_uid=generate_uid(entropy_srcs=entropy + ["series"]),
            enhanced_series_uid=generate_uid(entropy_srcs=entropy + ["enhanced"]),
            patient_position=patient_position,
        )


def _stored(raw: np.ndarray, variant: str) -> np.ndarray:
    """uint16 pixels of one raw intensity image in the chosen encoding."""
    raw = np.clip(np.round(raw), 0, MAX_STORED)
    if variant == "LIN":
        return raw.astype(np.uint16)
    if variant == "MONOCHROME1":
        return (MAX_STORED - raw).astype(np.uint16)
    if variant == "LOG":
        return np.clip(np.round(LOG_UNITS_PER_NEPER * np.log(np.maximum(raw, 1.0))), 0, MAX_STORED).astype(np.uint16)
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def _base(sop_class: str, study: StudyInfo, series_uid: str, instance: int):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    sop_uid = generate_uid(entropy_srcs=[study.study_uid, series_uid, str(instance)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    date, time = study.when.strftime("%Y%m%d"), study.when.strftime("%H%M%S")
    # Patient, General Study, General Series, General Equipment
    ds.PatientName = "Simulated^Phantom"
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate, ds.StudyTime = date, time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.Modality = "XA"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1 if series_uid == study.series_uid else 2
    ds.PatientPosition = study.patient_position
    ds.Manufacturer = "mvreg_ros simulator"
    ds.InstanceNumber = instance
    ds.ContentDate, ds.ContentTime = date, time
    ds.KVP = _ds(80)
    ds.RadiationSetting = "GR"
    return ds


def _pixels(ds, stored: np.ndarray, variant: str) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if variant == "MONOCHROME1" else "MONOCHROME2"
    ds.Rows, ds.Columns = int(stored.shape[-2]), int(stored.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(stored.astype("<u2")).tobytes()


def _intensity_relationship(target, variant: str) -> None:
    target.PixelIntensityRelationship = "LOG" if variant == "LOG" else "LIN"
    target.PixelIntensityRelationshipSign = -1 if variant == "MONOCHROME1" else 1


def _rescale(target, variant: str) -> None:
    if variant == "LOG":
        target.RescaleSlope = _ds(1.0 / LOG_UNITS_PER_NEPER)
        target.RescaleIntercept = _ds(0)
        target.RescaleType = "US"


def xa_dataset(
    raw: Float[Tensor, "H W"],
    *,
    orbital_deg: float,
    angular_deg: float,
    detector: DetectorConfig,
    study: StudyInfo,
    instance: int = 1,
    variant: str = "LIN",
):
    """A single-frame XA object of one raw intensity image (camera orientation)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    for name, a in (("orbital_deg", orbital_deg), ("angular_deg", angular_deg)):
        if not (math.isfinite(a) and -180 <= a <= 180):
            raise ValueError(f"{name} must be within -180..180 degrees, got {a}")
    image = torch.as_tensor(raw).detach().cpu().numpy().astype(np.float64)
    if image.shape != (detector.height, detector.width):
        raise ValueError(f"raw image {image.shape} differs from the detector ({detector.height}, {detector.width})")
    ds = _base(XA_SOP_CLASS, study, study.series_uid, instance)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
    ds.PatientOrientation = ""
    _intensity_relationship(ds, variant)
    _rescale(ds, variant)
    magnification = detector.sdd_mm / detector.sid_mm
    ds.ImagerPixelSpacing = [_ds(detector.pixel_mm), _ds(detector.pixel_mm)]
    ds.PixelSpacing = [_ds(detector.pixel_mm / magnification), _ds(detector.pixel_mm / magnification)]
    ds.EstimatedRadiographicMagnificationFactor = _ds(magnification)
    ds.DistanceSourceToDetector = _ds(detector.sdd_mm)
    ds.DistanceSourceToPatient = _ds(detector.sid_mm)
    ds.PositionerMotion = "STATIC"
    ds.PositionerPrimaryAngle = _ds(orbital_deg)
    ds.PositionerSecondaryAngle = _ds(angular_deg)
    ds.FieldOfViewShape = "RECTANGLE"
    ds.FieldOfViewRotation = "0"
    ds.FieldOfViewHorizontalFlip = "NO"
    _pixels(ds, _stored(image, variant), variant)
    return ds


def enhanced_xa_dataset(
    raw: Float[Tensor, "V H W"],
    *,
    angles_deg: Sequence[tuple[float, float]],
    detector: DetectorConfig,
    study: StudyInfo,
    table_mm: Sequence[tuple[float, float, float]] | None = None,
    instance: int = 1,
    variant: str = "LIN",
    uncorrected_distortion: bool = False,
    isocenter_reference: bool | None = None,
):
    """An Enhanced XA multi-frame object: one frame per view, geometry per frame.

    ``isocenter_reference``: also write each frame's X-Ray Isocenter Reference System
    (``IsocenterReferenceSystemSequence``: :func:`isocenter_angles` of the frame's angles for
    ``study.patient_position``, detector rotation 0, the table positions to the isocentre, table
    angles 0). ``None``: where the equipment angles give the simulated camera exactly, i.e. for
    head-first patient positions (feet-first ones would need a detector rotation of 180 degrees,
    which the reader refuses); ``True``: always (ValueError where it cannot); ``False``: never."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    images = torch.as_tensor(raw).detach().cpu().numpy().astype(np.float64)
    if images.ndim != 3 or len(images) != len(angles_deg) or len(images) == 0:
        raise ValueError(f"raw must be (V, H, W) with one (orbital, angular) pair per view, got {images.shape}")
    tables = [(0.0, 0.0, 0.0)] * len(images) if table_mm is None else [tuple(map(float, t)) for t in table_mm]
    if len(tables) != len(images) or any(len(t) != 3 for t in tables):
        raise ValueError("table_mm needs one (longitudinal, lateral, vertical) triple per view")
    isocenter = [None] * len(images)
    if isocenter_reference is not False:
        try:
            isocenter = [isocenter_angles(o, a, study.patient_position) for o, a in angles_deg]
        except ValueError:
            if isocenter_reference:
                raise
    ds = _base(ENHANCED_XA_SOP_CLASS, study, study.enhanced_series_uid, instance)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE", "NONE"]
    ds.AcquisitionDateTime = study.when.strftime("%Y%m%d%H%M%S")
    ds.NumberOfFrames = len(images)
    _intensity_relationship(ds, variant)
    ds.LossyImageCompression = "00"
    ds.XRayReceptorType = "DIGITAL_DETECTOR"
    ds.PositionerType = "CARM"
    ds.CArmPositionerTabletopRelationship = "YES"
    ds.ContentQualification = "RESEARCH"
    ds.AcquisitionContextSequence = DicomSequence([])
    from pydicom.uid import generate_uid

    dim_uid = generate_uid(entropy_srcs=[study.enhanced_series_uid, "dimensions"])
    org = Dataset()
    org.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = DicomSequence([org])
    idx = Dataset()
    idx.DimensionOrganizationUID = dim_uid
    idx.DimensionIndexPointer = 0x00189074  # Frame Acquisition DateTime
    idx.FunctionalGroupPointer = 0x00209111  # Frame Content Sequence
    ds.DimensionIndexSequence = DicomSequence([idx])

    shared = Dataset()
    geometry = Dataset()
    geometry.DistanceSourceToIsocenter = _ds(detector.sid_mm)
    geometry.DistanceSourceToDetector = _ds(detector.sdd_mm)
    shared.XRayGeometrySequence = DicomSequence([geometry])
    fov = Dataset()
    fov.FieldOfViewShape = "RECTANGLE"
    fov.FieldOfViewDimensionsInFloat = [
        float(detector.height * detector.pixel_mm),
        float(detector.width * detector.pixel_mm),
    ]
    fov.FieldOfViewOrigin = [_ds(0), _ds(0)]
    fov.FieldOfViewRotation = "0"
    fov.FieldOfViewHorizontalFlip = "NO"
    shared.FieldOfViewSequence = DicomSequence([fov])
    props = Dataset()
    props.FrameType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE", "NONE"]
    props.PixelIntensityRelationship = ds.PixelIntensityRelationship
    props.PixelIntensityRelationshipSign = ds.PixelIntensityRelationshipSign
    props.ImagerPixelSpacing = [_ds(detector.pixel_mm), _ds(detector.pixel_mm)]
    props.GeometricalProperties = "NON_UNIFORM" if uncorrected_distortion else "UNIFORM"
    props.GeometricMaximumDistortion = None if uncorrected_distortion else _ds(0)
    props.ImageProcessingApplied = "NONE"
    shared.FramePixelDataPropertiesSequence = DicomSequence([props])
    if variant == "LOG":
        transform = Dataset()
        _rescale(transform, variant)
        shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    frames = []
    for k, ((orbital, angular), (lon, lat, vert)) in enumerate(zip(angles_deg, tables)):
        for name, a in (("orbital", orbital), ("angular", angular)):
            if not (math.isfinite(a) and -180 <= a <= 180):
                raise ValueError(f"frame {k}: {name} angle must be within -180..180 degrees, got {a}")
        item = Dataset()
        content = Dataset()
        content.FrameAcquisitionDateTime = (study.when + datetime.timedelta(seconds=k)).strftime("%Y%m%d%H%M%S")
        content.FrameAcquisitionNumber = k + 1
        content.DimensionIndexValues = [k + 1]
        item.FrameContentSequence = DicomSequence([content])
        pos = Dataset()
        pos.PositionerPrimaryAngle = _ds(orbital)
        pos.PositionerSecondaryAngle = _ds(angular)
        item.PositionerPositionSequence = DicomSequence([pos])
        table = Dataset()
        table.TableTopVerticalPosition = _ds(vert)
        table.TableTopLongitudinalPosition = _ds(lon)
        table.TableTopLateralPosition = _ds(lat)
        item.TablePositionSequence = DicomSequence([table])
        if isocenter[k] is not None:
            iso = Dataset()
            iso.PositionerIsocenterPrimaryAngle = isocenter[k][0]
            iso.PositionerIsocenterSecondaryAngle = isocenter[k][1]
            iso.PositionerIsocenterDetectorRotationAngle = 0.0
            # the table reference point is at the isocentre at table-top position 0: X toward the
            # table's left (the lateral position's + side), Y down, Z toward the head end
            iso.TableXPositionToIsocenter = float(lat)
            iso.TableYPositionToIsocenter = float(-vert)
            iso.TableZPositionToIsocenter = float(lon)
            iso.TableHorizontalRotationAngle = 0.0
            iso.TableHeadTiltAngle = 0.0
            iso.TableCradleTiltAngle = 0.0
            item.IsocenterReferenceSystemSequence = DicomSequence([iso])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    _pixels(ds, np.stack([_stored(im, variant) for im in images]), variant)
    return ds


def isocenter_angles(orbital_deg: float, angular_deg: float, patient_position: str) -> tuple[float, float]:
    """The X-Ray Isocenter Reference System's (PositionerIsocenterPrimaryAngle,
    PositionerIsocenterSecondaryAngle) of the camera that the patient-relative angles give for
    ``patient_position`` (``R_iso_from_pat @ carm.T_iso_from_cam(orbital, angular)``), with the
    detector rotation 0; ValueError where that camera needs a detector rotation (feet-first
    positions turn the image 180 degrees about the beam)."""
    R = (
        R_iso_from_pat(patient_position)
        @ carm.T_iso_from_cam(math.radians(orbital_deg), math.radians(angular_deg), sid_mm=1.0)[:3, :3]
    )
    beam = R[:, 2]  # (sin a, -sin o cos a, cos o cos a) of the equipment angles
    angular = math.degrees(math.asin(max(-1.0, min(1.0, float(beam[0])))))
    orbital = math.degrees(math.atan2(-float(beam[1]), float(beam[2])))
    if abs(abs(angular) - 90.0) < 1e-6:
        raise ValueError(f"angular {angular_deg} deg: the beam is along the table, the primary angle is undefined")
    R_eq = carm.T_iso_from_cam(math.radians(orbital), math.radians(angular), sid_mm=1.0)[:3, :3]
    if not torch.allclose(R_eq, R, atol=1e-9):
        raise ValueError(
            f"patient_position {patient_position}: the simulated camera at ({orbital_deg}, {angular_deg}) deg is "
            "turned about the beam relative to the equipment's detector (a non-zero detector rotation)"
        )
    return round(orbital, 9) + 0.0, round(angular, 9) + 0.0


def save(ds, path: str | Path) -> Path:
    """Write a dataset as a DICOM Part 10 file (preamble, file meta)."""
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path


@dataclasses.dataclass(frozen=True, eq=False)
class SimulatedDicom:
    """What :func:`write_simulated_dicom` wrote, with the truth in the isocentre frame."""

    files: tuple[Path, ...]  # one XA file per view
    enhanced: Path | None  # the Enhanced XA multi-frame object (all views)
    T_iso_from_ct: Float[Tensor, "4 4"]
    T_iso_from_cam: Float[Tensor, "V 4 4"]
    K: Float[Tensor, "3 3"]
    raw: Float[Tensor, "V H W"]
    angles_deg: tuple[tuple[float, float], ...]


def simulate_views(
    volume,
    angles_deg: Sequence[tuple[float, float]],
    *,
    detector: DetectorConfig = DetectorConfig(),
    patient_position: str = "HFS",
    offset_mm: Sequence[float] | None = None,
    acquisition: AcquisitionConfig = AcquisitionConfig(),
    seed: int = 0,
    device: str = "cpu",
    renderer=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Raw images of ``volume`` lying as ``patient_position`` says, its bone centre at the
    isocentre (+ ``offset_mm`` in the isocentre frame), seen at (orbital, angular) degrees:
    ``(raw (V, H, W), T_iso_from_ct, T_iso_from_cam (V, 4, 4))``. The cameras come from the
    DICOM reading of the angles (:class:`~mvreg_ros.core.data.dicom.DicomView`)."""
    from mvreg_ros.core.data.dicom import R_iso_from_pat
    from mvreg_ros.core.geometry.transforms import make_T, translation
    from mvreg_ros.core.rendering.renderer import Renderer

    if len(angles_deg) == 0:
        raise ValueError("angles_deg needs at least one (orbital, angular) pair")
    T_iso_from_ct = default_start(patient_position, volume.bone_centre_ct())
    if offset_mm is not None:
        T_iso_from_ct = translation(torch.as_tensor(offset_mm, dtype=torch.float64)) @ T_iso_from_ct
    R = make_T(R_iso_from_pat(patient_position), torch.zeros(3, dtype=torch.float64))
    orb = torch.tensor([math.radians(o) for o, _ in angles_deg], dtype=torch.float64)
    ang = torch.tensor([math.radians(a) for _, a in angles_deg], dtype=torch.float64)
    T_iso_from_cam = R @ carm.T_iso_from_cam(orb, ang, sid_mm=detector.sid_mm)
    K = detector.K().expand(len(angles_deg), 3, 3).clone()
    raw = acquire(
        renderer if renderer is not None else Renderer(volume, device=device),
        invert(T_iso_from_cam) @ T_iso_from_ct,
        K,
        detector.height,
        detector.width,
        config=acquisition,
        generator=torch.Generator().manual_seed(int(seed)),
    )
    return raw, T_iso_from_ct, T_iso_from_cam


def write_simulated_dicom(
    out_dir: str | Path,
    volume,
    angles_deg: Sequence[tuple[float, float]],
    *,
    detector: DetectorConfig = DetectorConfig(),
    patient_position: str = "HFS",
    offset_mm: Sequence[float] | None = None,
    acquisition: AcquisitionConfig = AcquisitionConfig(),
    seed: int = 0,
    device: str = "cpu",
    enhanced: bool = True,
    renderer=None,
) -> SimulatedDicom:
    """Simulate views of ``volume`` and write ``view_NNN.dcm`` (XA, one per view) and, with
    ``enhanced``, ``enhanced_xa.dcm`` (all views as frames) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw, T_iso_from_ct, T_iso_from_cam = simulate_views(
        volume,
        angles_deg,
        detector=detector,
        patient_position=patient_position,
        offset_mm=offset_mm,
        acquisition=acquisition,
        seed=seed,
        device=device,
        renderer=renderer,
    )
    study = StudyInfo.new(patient_position=patient_position, seed=seed)
    files = []
    for k, (o, a) in enumerate(angles_deg):
        ds = xa_dataset(raw[k], orbital_deg=o, angular_deg=a, detector=detector, study=study, instance=k + 1)
        files.append(save(ds, out / f"view_{k:03d}.dcm"))
    multi = None
    if enhanced:
        multi = save(
            enhanced_xa_dataset(raw, angles_deg=angles_deg, detector=detector, study=study), out / "enhanced_xa.dcm"
        )
    return SimulatedDicom(
        files=tuple(files),
        enhanced=multi,
        T_iso_from_ct=T_iso_from_ct,
        T_iso_from_cam=T_iso_from_cam,
        K=detector.K(),
        raw=raw,
        angles_deg=tuple((float(o), float(a)) for o, a in angles_deg),
    )
