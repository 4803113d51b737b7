"""X-ray views from DICOM objects (XA, XRF, Enhanced XA/XRF, DX, CR): raw intensities, ``K``
and the C-arm joint values of the engine's kinematic model (pure: pydicom, numpy, torch).

What is read, and how (keywords are DICOM keywords; mm inside, radians and metres for joints):

- **image**: ``PixelData`` with ``BitsStored`` (higher bits masked), ``PixelRepresentation``,
  the Modality LUT (``RescaleSlope``/``RescaleIntercept``, or the Enhanced objects'
  ``PixelValueTransformationSequence``) and ``PixelIntensityRelationship``:

  * ``LIN``: values proportional to the beam intensity. ``PixelIntensityRelationshipSign``
    ``+1`` (lower values, less intensity) is used as is; ``-1`` is reflected within the stored
    range (``v_max - v``). Without a sign, ``MONOCHROME2`` means ``+1`` (XA allows only
    MONOCHROME2, whose LIN pixels are the detector intensity) and ``MONOCHROME1`` is refused:
    the photometric interpretation is a display choice, the sign is the physics.
  * ``LOG``: after the Modality LUT a value is ``sign * ln(intensity)`` plus a constant (so
    ``RescaleSlope`` is the natural-log unit per stored value); the result is
    ``65535 * exp(sign * v - max)``, i.e. the intensity up to a constant factor, which the
    preprocessing (``log(I0 / I)`` with I0 estimated from the image) cancels. A LOG object
    without a Modality LUT is refused unless :attr:`DicomConfig.log_units_per_neper` says how
    many stored units make one natural-log unit. An Enhanced object's
    ``PixelIntensityRelationshipLUTSequence`` with ``LUTFunction`` ``TO_LINEAR`` is applied
    instead when present (stored value -> intensity).
  * ``DISP`` and ``PresentationIntentType`` ``FOR PRESENTATION``: refused (display-processed
    pixels are not line integrals).

- **K** (pixels, OpenCV, cam convention): ``fx = SDD / column spacing``, ``fy = SDD / row
  spacing`` with ``DistanceSourceToDetector`` and ``ImagerPixelSpacing`` (row, column; at the
  detector). Without it, XA/XRF ``PixelSpacing`` is at the isocentre and becomes detector
  spacing times ``EstimatedRadiographicMagnificationFactor`` (refused without one; if both are
  present they must agree within 1 %). The principal point is the image centre (the XA object
  assumes the isocentre projects to the middle of the field of view) unless
  ``DetectorActiveOrigin`` and ``DetectorActiveDimensions`` are present: then the central ray
  hits the centre of the active detector area, placed in the stored image with
  ``DetectorElementSpacing`` and ``FieldOfViewOrigin`` (all four needed together).
- **image orientation**: ``FieldOfViewRotation`` (0, 90, 180, 270: clockwise, stored pixels
  relative to the physical detector) and ``FieldOfViewHorizontalFlip`` (after the rotation) are
  undone, so the returned image is the physical detector as seen from the X-ray source: the
  engine's camera (columns = +x_cam, rows = +y_cam). Other rotation values are refused.
- **joints** (the kinematic model of :mod:`mvreg_ros.core.geometry.kinematics`): orbital =
  ``PositionerPrimaryAngle`` (+ is LAO), angular = ``PositionerSecondaryAngle`` (+ is CRA),
  radians; ``sid_mm`` = ``DistanceSourceToPatient`` (XA/XRF: source to isocentre) or, in Enhanced
  objects, ``DistanceSourceToIsocenter`` of the ``XRayGeometrySequence`` (with its
  ``DistanceSourceToDetector``). DX/CR: ``DistanceSourceToPatient`` is the distance to the
  patient's skin, so the isocentre distance must come from :attr:`DicomConfig.sid_mm`.
  Enhanced objects' ``TablePositionSequence`` (``TableTopLongitudinalPosition`` + toward the
  head end, ``TableTopLateralPosition`` + toward the LAO side, ``TableTopVerticalPosition`` +
  up, mm) becomes three prismatic joints with the opposite sign (metres): moving the table
  moves the patient, i.e. the isocentre moves the other way relative to the table-top frame.
  Legacy XA has no absolute table position: the table is at 0. An Enhanced frame flagged
  ``GeometricalProperties`` ``NON_UNIFORM`` (uncorrected image-intensifier distortion) is
  refused, or read with a warning under :attr:`DicomConfig.allow_distortion`.
- **patient position**: DICOM defines the positioner angles relative to the patient (LAO = the
  detector toward the patient's left, CRA = toward the head), so the angles place the camera in
  the patient frame ``pat`` (x toward the head, y toward the patient's right, z anterior: the
  model's isocentre frame of a head-first supine patient). ``PatientPosition`` turns ``pat`` into
  the equipment isocentre frame ``iso`` of the kinematic model (x toward the head end of the
  table, y, z up), ``R_iso_from_pat``::

      HFS  head +x, right +y, anterior +z   (identity)       FFS  head -x, right -y, anterior +z
      HFP  head +x, right -y, anterior -z                     FFP  head -x, right +y, anterior -z
      HFDR head +x, right -z, anterior +y                     HFDL head +x, right +z, anterior -y
      FFDR head -x, right -z, anterior -y                     FFDL head -x, right +z, anterior +y

  and the default start (:func:`default_start`) is that patient with its anatomy centre at the
  isocentre: ``T_iso_from_ct = R_iso_from_pat @ carm.T_iso_from_ct_supine(centre)``. Without
  ``PatientPosition`` (optional in XA), :attr:`DicomConfig.patient_position` is used; other
  values (LFP, AFDR, ...) are refused.

- **X-Ray Isocenter Reference System** (Enhanced, per frame, PS3.3 C.8.19.6.13): where present,
  ``PositionerIsocenterPrimaryAngle``/``SecondaryAngle`` (relative to the equipment: X toward
  the table's left, Y down, Z toward its head end; ``x_iso = Z, y_iso = -X, z_iso = -Y``) are
  the orbital and angular joints with the plane mounted in ``iso`` itself, and
  ``TableX/Y/ZPositionToIsocenter`` the table joints (longitudinal Z, lateral X, vertical -Y,
  opposite sign). The patient-relative angles, when present too, must give the same beam for
  the patient position (within :data:`ISOCENTER_AGREEMENT_DEG`).
  ``PositionerIsocenterDetectorRotationAngle`` and the table angles
  (``TableHorizontalRotationAngle``, ``TableHeadTiltAngle``, ``TableCradleTiltAngle``, wherever
  present) must be exactly 0: the model has neither.

Every view's camera: ``T_iso_from_cam = Trans(-table) @ R_iso_from_pat @
carm.T_iso_from_cam(orbital, angular, sid)`` (with the isocentre angles without ``R_iso_from_pat``) (:meth:`DicomView.plane` gives the matching
:class:`~mvreg_ros.core.geometry.kinematics.PlaneConfig`). A missing or inconsistent attribute
raises ValueError naming its keyword; nothing falls back silently to a default.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.geometry import carm
from mvreg_ros.core.geometry.kinematics import PlaneConfig
from mvreg_ros.core.geometry.transforms import make_T

XA_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"
ENHANCED_XA_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.1.1"
XRF_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.2"
ENHANCED_XRF_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.2.1"
ENHANCED_SOP_CLASSES = (ENHANCED_XA_SOP_CLASS, ENHANCED_XRF_SOP_CLASS)
MODALITIES = ("XA", "RF", "DX", "CR")
SKIN_DISTANCE_MODALITIES = ("DX", "CR")  # DistanceSourceToPatient is to the patient's surface

LOG_FULL_SCALE = 65535.0  # LOG images: the brightest pixel's intensity after conversion
ORBITAL_JOINT, ANGULAR_JOINT = "orbital", "angular"
TABLE_JOINTS = ("table_longitudinal", "table_lateral", "table_vertical")
# table motion directions in the equipment isocentre frame: toward the head end, the LAO side
# (the patient's left for HFS: -y), up
TABLE_AXES_ISO = ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0))

# columns: the patient frame's axes (head, right, anterior) in the equipment isocentre frame
_PATIENT_AXES = {
    "HFS": ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
    "FFS": ((-1, 0, 0), (0, -1, 0), (0, 0, 1)),
    "HFP": ((1, 0, 0), (0, -1, 0), (0, 0, -1)),
    "FFP": ((-1, 0, 0), (0, 1, 0), (0, 0, -1)),
    "HFDR": ((1, 0, 0), (0, 0, -1), (0, 1, 0)),
    "HFDL": ((1, 0, 0), (0, 0, 1), (0, -1, 0)),
    "FFDR": ((-1, 0, 0), (0, 0, -1), (0, -1, 0)),
    "FFDL": ((-1, 0, 0), (0, 0, 1), (0, 1, 0)),
}
PATIENT_POSITIONS = tuple(_PATIENT_AXES)

# X-Ray Isocenter Reference System (PS3.3 C.8.19.6.13): the equipment's isocentre frame (X toward
# the table's left, Y down, Z toward the table's head end; the table's own frame at zero table
# angles) expressed in ``iso`` (x head end, y the table's right, z up): X = -y, Y = -z, Z = +x
ISOCENTER_ANGLE_KEYWORDS = ("PositionerIsocenterPrimaryAngle", "PositionerIsocenterSecondaryAngle")
ISOCENTER_TABLE_KEYWORDS = ("TableXPositionToIsocenter", "TableYPositionToIsocenter", "TableZPositionToIsocenter")
# angles the kinematic model does not have: refused unless exactly zero
DETECTOR_ROTATION_KEYWORD = "PositionerIsocenterDetectorRotationAngle"
TABLE_ANGLE_KEYWORDS = ("TableHorizontalRotationAngle", "TableHeadTiltAngle", "TableCradleTiltAngle")
# largest angle (degrees) between the beam of the patient-relative positioner angles and that of
# the isocentre ones (both in ``iso``) accepted as agreement
ISOCENTER_AGREEMENT_DEG = 0.5
PATIENT_ANGLES, ISOCENTER_ANGLES = "patient", "isocenter"


def R_iso_from_pat(patient_position: str) -> Float[Tensor, "3 3"]:
    """Rotation from the patient frame of the positioner angles to the equipment isocentre frame."""
    if patient_position not in _PATIENT_AXES:
        raise ValueError(
            f"PatientPosition {patient_position!r} is not supported; use one of {', '.join(PATIENT_POSITIONS)}"
        )
    return torch.tensor(_PATIENT_AXES[patient_position], dtype=torch.float64).T


@dataclasses.dataclass(frozen=True)
class DicomConfig:
    """What a vendor may omit, configured instead (never guessed)."""

    sid_mm: float | None = None  # source to isocentre when the object has none (required for DX/CR)
    patient_position: str | None = "HFS"  # when PatientPosition is absent or empty; None: refuse such objects
    log_units_per_neper: float | None = None  # LOG objects without a Modality LUT: stored units per ln unit
    allow_distortion: bool = False  # read NON_UNIFORM (uncorrected image-intensifier) frames with a warning

    def __post_init__(self):
        if self.sid_mm is not None and not (math.isfinite(self.sid_mm) and self.sid_mm > 0):
            raise ValueError(f"sid_mm must be a positive number or None, got {self.sid_mm!r}")
        if self.patient_position is not None and self.patient_position not in PATIENT_POSITIONS:
            raise ValueError(
                f"patient_position must be one of {', '.join(PATIENT_POSITIONS)} or None, got {self.patient_position!r}"
            )
        if self.log_units_per_neper is not None and not (
            math.isfinite(self.log_units_per_neper) and self.log_units_per_neper != 0
        ):
            raise ValueError(f"log_units_per_neper must be a finite non-zero number, got {self.log_units_per_neper!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class DicomView:
    """One X-ray view read from DICOM, in the engine's conventions."""

    source: str  # file name (and frame)
    frame: int | None  # 0-based frame of a multi-frame object, None for a single frame
    image: Float[Tensor, "H W"]  # raw intensities (bone dark), as seen from the source
    K: Float[Tensor, "3 3"]
    orbital_deg: float  # PositionerPrimaryAngle, + LAO
    angular_deg: float  # PositionerSecondaryAngle, + CRA
    sid_mm: float
    sdd_mm: float
    pixel_spacing_mm: tuple[float, float]  # (row, column) at the detector, camera image
    table_mm: tuple[float, float, float]  # longitudinal, lateral, vertical (0 without a table position)
    patient_position: str
    modality: str
    # which angles orbital_deg/angular_deg are: "patient" (PositionerPrimaryAngle/SecondaryAngle,
    # relative to the patient, placed by PatientPosition) or "isocenter" (the X-Ray Isocenter
    # Reference System's PositionerIsocenter*Angle, relative to the equipment)
    angle_reference: str = PATIENT_ANGLES
    # the patient-relative angles (primary, secondary) when the object has them, else None
    patient_angles_deg: tuple[float, float] | None = None

    def __post_init__(self):
        if self.angle_reference not in (PATIENT_ANGLES, ISOCENTER_ANGLES):
            raise ValueError(f"angle_reference must be 'patient' or 'isocenter', got {self.angle_reference!r}")

    @property
    def joint_positions(self) -> dict[str, float]:
        """Joint values of the kinematic model, ROS units (radians, metres; table with the opposite sign)."""
        out = {ORBITAL_JOINT: math.radians(self.orbital_deg), ANGULAR_JOINT: math.radians(self.angular_deg)}
        for name, v in zip(TABLE_JOINTS, self.table_mm):
            out[name] = -v / 1000.0
        return out

    def plane(self) -> PlaneConfig:
        """The kinematic model of this view's C-arm: with patient-relative angles the plane's
        isocentre frame is the patient frame ``pat``, mounted in the equipment isocentre frame by
        the patient position; with the isocentre angles it is the equipment frame itself."""
        if self.angle_reference == ISOCENTER_ANGLES:
            R = torch.eye(3, dtype=torch.float64)
        else:
            R = R_iso_from_pat(self.patient_position)
        axes = tuple(tuple(float(v) for v in R.T @ torch.tensor(a, dtype=torch.float64)) for a in TABLE_AXES_ISO)
        return PlaneConfig(
            name="dicom",
            orbital_joint=ORBITAL_JOINT,
            angular_joint=ANGULAR_JOINT,
            sid_mm=self.sid_mm,
            T_ref_from_iso=make_T(R, torch.zeros(3, dtype=torch.float64)),
            prismatic_joints=TABLE_JOINTS,
            prismatic_axes=axes,
        )

    @property
    def T_iso_from_cam(self) -> Float[Tensor, "4 4"]:
        """The camera in the equipment isocentre frame with the table at 0 (the table-top frame), mm."""
        return self.plane().T_ref_from_cam(self.joint_positions)


def default_start(patient_position: str, centre_ct: Float[Tensor, "3"]) -> Float[Tensor, "4 4"]:
    """The default ``T_iso_from_ct``: the patient lying as ``patient_position`` says, its CT point
    ``centre_ct`` at the isocentre."""
    R = make_T(R_iso_from_pat(patient_position), torch.zeros(3, dtype=torch.float64))
    return R @ carm.T_iso_from_ct_supine(torch.as_tensor(centre_ct, dtype=torch.float64))


# ---------------------------------------------------------------------------------------
# attribute access
# ---------------------------------------------------------------------------------------


def _present(ds, keyword: str) -> bool:
    return keyword in ds and ds[keyword].value is not None and ds[keyword].value != ""


class _Frame:
    """Attribute lookup for one frame: the per-frame functional group, the shared one, then the
    top level (each functional group's macros are one sequence item deep)."""

    def __init__(self, ds, frame: int | None, where: str):
        self.ds, self.where = ds, where
        self.groups = []
        if frame is not None and "PerFrameFunctionalGroupsSequence" in ds:
            self.groups.append(ds.PerFrameFunctionalGroupsSequence[frame])
        if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
            self.groups.append(ds.SharedFunctionalGroupsSequence[0])

    def item_with(self, keyword: str):
        for group in self.groups:
            for elem in group:
                if elem.VR == "SQ":
                    for item in elem.value:
                        if _present(item, keyword):
                            return item
        return self.ds if _present(self.ds, keyword) else None

    def has(self, keyword: str) -> bool:
        return self.item_with(keyword) is not None

    def items_with(self, keyword: str) -> list:
        """Every item (per-frame group, shared group, top level) that holds ``keyword``."""
        found = []
        for group in self.groups:
            for elem in group:
                if elem.VR == "SQ":
                    found += [item for item in elem.value if _present(item, keyword)]
        if _present(self.ds, keyword):
            found.append(self.ds)
        return found

    def get(self, keyword: str, default=...):
        item = self.item_with(keyword)
        if item is None:
            if default is ...:
                raise ValueError(f"{self.where}: {keyword} is missing")
            return default
        return item[keyword].value

    def number(self, keyword: str, default=..., *, positive: bool = False) -> float | None:
        v = self.get(keyword, default)
        if v is None:
            return v
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{self.where}: {keyword} must be a number, got {v!r}") from None
        if not math.isfinite(x) or (positive and x <= 0):
            raise ValueError(
                f"{self.where}: {keyword} must be a {'positive' if positive else 'finite'} number, got {v!r}"
            )
        return x

    def pair(self, keyword: str, default=..., *, positive: bool = True) -> tuple[float, float] | None:
        v = self.get(keyword, default)
        if v is None:
            return None
        try:
            values = [float(x) for x in (v if isinstance(v, (list, tuple)) or hasattr(v, "__iter__") else [v])]
        except (TypeError, ValueError):
            raise ValueError(f"{self.where}: {keyword} must hold 2 numbers, got {v!r}") from None
        if len(values) != 2 or not all(math.isfinite(x) and (x > 0 or not positive) for x in values):
            raise ValueError(
                f"{self.where}: {keyword} must hold 2 {'positive ' if positive else ''}numbers (row, column), got {v!r}"
            )
        return values[0], values[1]


# ---------------------------------------------------------------------------------------
# pixels
# ---------------------------------------------------------------------------------------


def _stored_values(ds, frame: int | None, where: str) -> np.ndarray:
    """The stored pixel values of one frame as float64, higher bits beyond BitsStored masked."""
    for kw in ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "PhotometricInterpretation"):
        if not _present(ds, kw):
            raise ValueError(f"{where}: {kw} is missing")
    if "PixelData" not in ds:
        raise ValueError(f"{where}: PixelData is missing")
    if int(getattr(ds, "SamplesPerPixel", 1)) != 1:
        raise ValueError(f"{where}: SamplesPerPixel must be 1 (greyscale), got {ds.SamplesPerPixel}")
    bits_stored, bits_alloc = int(ds.BitsStored), int(ds.BitsAllocated)
    if not 1 <= bits_stored <= bits_alloc:
        raise ValueError(f"{where}: BitsStored {bits_stored} must be within 1..BitsAllocated ({bits_alloc})")
    try:
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises many types for undecodable pixel data
        raise ValueError(f"{where}: PixelData cannot be decoded: {type(e).__name__}: {e}") from e
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if n_frames > 1:
        if frame is None or not 0 <= frame < n_frames:
            raise ValueError(f"{where}: frame {frame} out of range (NumberOfFrames {n_frames})")
        arr = arr[frame]
    elif frame not in (None, 0):
        raise ValueError(f"{where}: frame {frame} out of range (NumberOfFrames 1)")
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ValueError(f"{where}: expected one greyscale frame, got pixel array shape {arr.shape}")
    if int(ds.PixelRepresentation) == 0 and bits_stored < arr.dtype.itemsize * 8:
        arr = arr & ((1 << bits_stored) - 1)
    return arr.astype(np.float64)


def _modality_lut(f: _Frame, values: np.ndarray, bits_stored: int, signed: bool) -> tuple[np.ndarray, float, bool]:
    """Values after the Modality LUT (rescale), the largest value the stored range maps to, and
    whether a Modality LUT was present."""
    slope = f.number("RescaleSlope", None)
    intercept = f.number("RescaleIntercept", None)
    if (slope is None) != (intercept is None):
        raise ValueError(f"{f.where}: {'RescaleIntercept' if intercept is None else 'RescaleSlope'} is missing")
    vmax_stored = (1 << (bits_stored - 1)) - 1 if signed else (1 << bits_stored) - 1
    if slope is None:
        return values, float(vmax_stored), False
    if slope == 0:
        raise ValueError(f"{f.where}: RescaleSlope must be non-zero, got {slope}")
    return values * slope + intercept, max(vmax_stored * slope + intercept, intercept), True


def _intensity_lut(f: _Frame, stored: np.ndarray) -> np.ndarray | None:
    """Apply an Enhanced object's Pixel Intensity Relationship LUT with LUTFunction TO_LINEAR."""
    item = f.item_with("LUTFunction")
    if item is None:
        return None
    function = str(item.LUTFunction).strip()
    if function != "TO_LINEAR":
        return None  # TO_LOG serves subtraction; the intensity comes from the relationship itself
    for kw in ("LUTDescriptor", "LUTData"):
        if not _present(item, kw):
            raise ValueError(f"{f.where}: {kw} of the PixelIntensityRelationshipLUTSequence is missing")
    desc = [int(x) for x in item.LUTDescriptor]
    if len(desc) != 3:
        raise ValueError(f"{f.where}: LUTDescriptor must hold 3 values, got {desc}")
    n, first = (desc[0] or 65536), desc[1]
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        table = np.frombuffer(data, dtype="<u2").astype(np.float64)
    else:
        table = np.asarray(list(data) if not isinstance(data, (int, float)) else [data], dtype=np.float64)
    if len(table) != n:
        raise ValueError(f"{f.where}: LUTData holds {len(table)} entries, LUTDescriptor says {n}")
    idx = np.clip(stored - first, 0, n - 1).astype(np.int64)
    return table[idx]


def raw_intensity(ds, frame: int | None = None, *, config: DicomConfig = DicomConfig(), where: str = "") -> np.ndarray:
    """One frame's pixels as raw detector intensities (bone dark, proportional to the beam
    intensity up to a constant factor), in the stored orientation; ValueError naming the
    attribute that is missing or refused."""
    where = where or "DICOM object"
    f = _Frame(ds, _group_index(ds, frame), where)
    intent = str(f.get("PresentationIntentType", "")).strip().upper()
    if intent == "FOR PRESENTATION":
        raise ValueError(
            f"{where}: PresentationIntentType is 'FOR PRESENTATION': display-processed pixels are not line "
            "integrals; send the 'FOR PROCESSING' object"
        )
    relationship = str(f.get("PixelIntensityRelationship")).strip().upper()
    if relationship not in ("LIN", "LOG", "DISP"):
        raise ValueError(f"{where}: PixelIntensityRelationship must be LIN, LOG or DISP, got {relationship!r}")
    if relationship == "DISP":
        raise ValueError(
            f"{where}: PixelIntensityRelationship is DISP: pixels processed for display have no known relation to "
            "the X-ray intensity; send LIN or LOG images"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"{where}: PhotometricInterpretation must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    stored = _stored_values(ds, frame, where)
    linear = _intensity_lut(f, stored)
    if linear is not None:
        return np.maximum(linear, 0.0)
    if f.has("PixelIntensityRelationshipSign"):
        sign = int(f.number("PixelIntensityRelationshipSign"))
        if sign not in (1, -1):
            raise ValueError(f"{where}: PixelIntensityRelationshipSign must be +1 or -1, got {sign}")
    elif photometric == "MONOCHROME2":
        sign = 1
    else:
        raise ValueError(
            f"{where}: PixelIntensityRelationshipSign is missing: a MONOCHROME1 image needs it to say whether higher "
            "values mean more or less X-ray intensity"
        )
    values, vmax, has_lut = _modality_lut(f, stored, int(ds.BitsStored), int(ds.PixelRepresentation) == 1)
    if relationship == "LIN":
        return np.maximum(values if sign > 0 else vmax - values, 0.0)
    # LOG: natural-log units after the Modality LUT, or the configured scale
    if not has_lut:
        if config.log_units_per_neper is None:
            raise ValueError(
                f"{where}: RescaleSlope is missing: a LOG image needs its Modality LUT (natural-log units per "
                "stored value) or DicomConfig.log_units_per_neper"
            )
        values = values / config.log_units_per_neper
    log_i = sign * values
    # relative intensities, brightest pixel at the 16-bit full scale (the preprocessing counts in detector units)
    return LOG_FULL_SCALE * np.exp(log_i - log_i.max())


# ---------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------


def _orientation(f: _Frame) -> tuple[int, bool]:
    rotation = f.get("FieldOfViewRotation", None)
    flip = f.get("FieldOfViewHorizontalFlip", None)
    if rotation is None and flip is None:
        return 0, False
    try:
        rot = int(float(rotation if rotation is not None else 0))
    except (TypeError, ValueError):
        raise ValueError(f"{f.where}: FieldOfViewRotation must be 0, 90, 180 or 270, got {rotation!r}") from None
    if rot not in (0, 90, 180, 270) or (rotation is not None and float(rotation) != rot):
        raise ValueError(f"{f.where}: FieldOfViewRotation must be 0, 90, 180 or 270, got {rotation!r}")
    if flip is None:
        raise ValueError(f"{f.where}: FieldOfViewHorizontalFlip is missing (required with FieldOfViewRotation)")
    flip_text = str(flip).strip().upper()
    if flip_text not in ("YES", "NO"):
        raise ValueError(f"{f.where}: FieldOfViewHorizontalFlip must be YES or NO, got {flip!r}")
    return rot, flip_text == "YES"


def _to_detector(
    image: np.ndarray, uv: tuple[float, float], spacing_rc: tuple[float, float], rot: int, flip: bool
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Undo the stored orientation: stored = flip(rotate_clockwise(detector, rot)); also moves a
    pixel position (u = column, v = row) and swaps the (row, column) spacing for 90/270."""
    u, v = uv
    W = image.shape[1]
    if flip:
        image = image[:, ::-1]
        u = W - 1 - u
    for _ in range(rot // 90):  # one counter-clockwise quarter turn undoes one clockwise
        W = image.shape[1]
        image = np.rot90(image, 1)
        u, v = v, W - 1 - u
        spacing_rc = (spacing_rc[1], spacing_rc[0])
    return np.ascontiguousarray(image), (u, v), spacing_rc


def _detector_spacing(f: _Frame, modality: str) -> tuple[float, float]:
    """(row, column) pixel spacing at the detector, mm."""
    imager = f.pair("ImagerPixelSpacing", None)
    pixel = f.pair("PixelSpacing", None)
    if modality in ("XA", "RF") and pixel is not None:
        magnification = f.number("EstimatedRadiographicMagnificationFactor", None, positive=True)
        if magnification is None:
            if imager is None:
                raise ValueError(
                    f"{f.where}: EstimatedRadiographicMagnificationFactor is missing: PixelSpacing of XA/XRF is at "
                    "the isocentre and needs it (or ImagerPixelSpacing) to give the detector spacing"
                )
        else:
            at_detector = (pixel[0] * magnification, pixel[1] * magnification)
            if imager is None:
                return at_detector
            if any(abs(a - b) > 0.01 * b for a, b in zip(at_detector, imager)):
                raise ValueError(
                    f"{f.where}: PixelSpacing {list(pixel)} x EstimatedRadiographicMagnificationFactor {magnification} "
                    f"= {[round(x, 4) for x in at_detector]} mm disagrees with ImagerPixelSpacing {list(imager)}"
                )
    if imager is None:
        raise ValueError(f"{f.where}: ImagerPixelSpacing is missing")
    return imager


def _principal_point_stored(f: _Frame, H: int, W: int, spacing_rc: tuple[float, float]) -> tuple[float, float]:
    """Where the central ray hits the stored image (u, v), before undoing rotation and flip."""
    keys = ("DetectorActiveOrigin", "DetectorActiveDimensions", "DetectorElementSpacing", "FieldOfViewOrigin")
    present = [k for k in keys if f.has(k)]
    if not any(k in present for k in keys[:2]):
        return (W - 1) / 2.0, (H - 1) / 2.0  # XA: the isocentre projects to the middle of the field of view
    missing = [k for k in keys if k not in present]
    if missing:
        raise ValueError(
            f"{f.where}: {missing[0]} is missing (DetectorActiveOrigin and DetectorActiveDimensions need "
            "DetectorElementSpacing and FieldOfViewOrigin to place the detector centre in the image)"
        )
    origin = f.pair("DetectorActiveOrigin", positive=False)
    dims = f.pair("DetectorActiveDimensions")
    element = f.pair("DetectorElementSpacing")
    fov = f.pair("FieldOfViewOrigin", positive=False)
    centre_mm = (origin[0] + dims[0] / 2, origin[1] + dims[1] / 2)  # from the physical detector's TLHC
    fov_mm = (fov[0] * element[0], fov[1] * element[1])
    v = (centre_mm[0] - fov_mm[0]) / spacing_rc[0] - 0.5
    u = (centre_mm[1] - fov_mm[1]) / spacing_rc[1] - 0.5
    return u, v


def _patient_position(f: _Frame, config: DicomConfig) -> str:
    value = str(f.ds.get("PatientPosition", "") or "").strip().upper()
    if not value:
        if config.patient_position is None:
            raise ValueError(f"{f.where}: PatientPosition is missing and DicomConfig.patient_position is None")
        return config.patient_position
    if value not in PATIENT_POSITIONS:
        raise ValueError(
            f"{f.where}: PatientPosition {value!r} is not supported; use one of {', '.join(PATIENT_POSITIONS)}"
        )
    return value


def _angle(f: _Frame, keyword: str) -> float:
    a = f.number(keyword)
    if not -180.0 <= a <= 180.0:
        raise ValueError(f"{f.where}: {keyword} must be within -180..180 degrees, got {a}")
    return a


def _beam_iso(orbital_deg: float, angular_deg: float) -> Tensor:
    """Unit beam direction (source -> detector) of the kinematic model at these angles."""
    T = carm.T_iso_from_cam(math.radians(orbital_deg), math.radians(angular_deg), sid_mm=1.0)
    return T[:3, 2]


def _exactly_zero(f: _Frame, keyword: str, why: str) -> None:
    """Every occurrence of ``keyword`` (any functional group) must be exactly 0."""
    for item in f.items_with(keyword):
        v = item[keyword].value
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{f.where}: {keyword} must be a number, got {v!r}") from None
        if x != 0.0:
            raise ValueError(f"{f.where}: {keyword} is {x:g} degrees, not 0: {why}")


def _positioner(
    f: _Frame, patient_position: str
) -> tuple[float, float, tuple[float, float, float], str, tuple[float, float] | None]:
    """(orbital, angular, table_mm, angle_reference, patient angles) of one frame.

    Patient-relative angles: ``PositionerPrimaryAngle``/``PositionerSecondaryAngle`` with the
    ``TablePositionSequence``'s table-top positions. Where the X-Ray Isocenter Reference System is
    present (``PositionerIsocenterPrimaryAngle`` ...), its equipment angles and table positions to
    the isocentre are used instead; the patient-relative angles, when present too, must give the
    same beam for ``patient_position``. Table rotation/tilts and the detector rotation must be 0."""
    for keyword in TABLE_ANGLE_KEYWORDS:
        _exactly_zero(
            f, keyword, "the C-arm kinematic model has no table rotation or tilt (level the table, or send 0)"
        )
    has_patient = f.has("PositionerPrimaryAngle") or f.has("PositionerSecondaryAngle")
    has_iso = any(f.has(k) for k in ISOCENTER_ANGLE_KEYWORDS)
    patient_angles = None
    if has_patient or not has_iso:
        patient_angles = (_angle(f, "PositionerPrimaryAngle"), _angle(f, "PositionerSecondaryAngle"))
    if not has_iso:
        table = (0.0, 0.0, 0.0)
        keys = ("TableTopLongitudinalPosition", "TableTopLateralPosition", "TableTopVerticalPosition")
        if any(f.has(k) for k in keys):
            table = tuple(f.number(k) for k in keys)
        return patient_angles[0], patient_angles[1], table, PATIENT_ANGLES, patient_angles

    primary = _angle(f, "PositionerIsocenterPrimaryAngle")
    secondary = _angle(f, "PositionerIsocenterSecondaryAngle")
    f.number(DETECTOR_ROTATION_KEYWORD)  # Type 1 in the macro: missing or not a number is refused
    _exactly_zero(
        f,
        DETECTOR_ROTATION_KEYWORD,
        "the C-arm kinematic model has no detector rotation about the beam",
    )
    for keyword in TABLE_ANGLE_KEYWORDS:
        f.number(keyword)  # Type 1 in the macro; zero was checked above
    tx, ty, tz = (f.number(k) for k in ISOCENTER_TABLE_KEYWORDS)
    if patient_angles is not None:
        beam_patient = R_iso_from_pat(patient_position) @ _beam_iso(*patient_angles)
        beam_iso = _beam_iso(primary, secondary)
        off = math.degrees(math.acos(max(-1.0, min(1.0, float(beam_patient @ beam_iso)))))
        if off > ISOCENTER_AGREEMENT_DEG:
            raise ValueError(
                f"{f.where}: PositionerPrimaryAngle/PositionerSecondaryAngle ({patient_angles[0]:g}, "
                f"{patient_angles[1]:g}) with PatientPosition {patient_position} and "
                f"PositionerIsocenterPrimaryAngle/PositionerIsocenterSecondaryAngle ({primary:g}, {secondary:g}) "
                f"give beams {off:.2f} degrees apart (more than {ISOCENTER_AGREEMENT_DEG} degrees)"
            )
    # table reference point to the isocentre, X table left (= the LAO side for HFS), Y down, Z head end
    table = (tz, tx, -ty)
    return primary, secondary, table, ISOCENTER_ANGLES, patient_angles


def _group_index(ds, frame: int | None) -> int | None:
    """The per-frame functional group of ``frame`` (a single-frame Enhanced object has one, too)."""
    if "PerFrameFunctionalGroupsSequence" not in ds:
        return None
    return 0 if frame is None else frame


def frame_count(ds) -> int:
    """Frames in a DICOM object (1 for single-frame objects)."""
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        raise ValueError(f"NumberOfFrames must be an integer, got {ds.get('NumberOfFrames')!r}") from None


def view_from_dataset(
    ds, frame: int | None = None, *, config: DicomConfig = DicomConfig(), name: str = ""
) -> DicomView:
    """One view (one frame) of a DICOM X-ray object."""
    n = frame_count(ds)
    if n > 1 and frame is None:
        raise ValueError(f"{name or 'DICOM object'}: has {n} frames: choose one")
    where = name + (f" frame {frame}" if frame is not None and n > 1 else "")
    where = where or "DICOM object"
    modality = str(ds.get("Modality", "") or "").strip()
    if modality not in MODALITIES:
        raise ValueError(f"{where}: Modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    f = _Frame(ds, _group_index(ds, frame), where)
    enhanced = str(ds.get("SOPClassUID", "")) in ENHANCED_SOP_CLASSES

    geometric = str(f.get("GeometricalProperties", "") or "").strip().upper()
    if geometric == "NON_UNIFORM":
        message = (
            f"{where}: GeometricalProperties is NON_UNIFORM: the image-intensifier distortion is not corrected, "
            "so the pinhole model does not hold"
        )
        if not config.allow_distortion:
            raise ValueError(message + " (DicomConfig.allow_distortion reads it anyway)")
        warnings.warn(message, stacklevel=2)

    raw = raw_intensity(ds, frame if n > 1 else None, config=config, where=where)
    H, W = raw.shape

    sdd = f.number("DistanceSourceToDetector", positive=True)
    if modality in SKIN_DISTANCE_MODALITIES:
        if config.sid_mm is None:
            raise ValueError(
                f"{where}: {modality}'s DistanceSourceToPatient is the distance to the patient's skin, not the "
                "isocentre: set DicomConfig.sid_mm (source to isocentre, mm)"
            )
        sid = config.sid_mm
    else:
        keyword = (
            "DistanceSourceToIsocenter" if enhanced or f.has("DistanceSourceToIsocenter") else "DistanceSourceToPatient"
        )
        sid = f.number(keyword, None, positive=True)
        if sid is None:
            if config.sid_mm is None:
                raise ValueError(f"{where}: {keyword} is missing (or set DicomConfig.sid_mm)")
            sid = config.sid_mm
    if not sid < sdd:
        raise ValueError(
            f"{where}: the isocentre ({sid} mm) must lie between the source and the detector "
            f"(DistanceSourceToDetector {sdd} mm)"
        )

    patient_position = _patient_position(f, config)
    orbital, angular, table, reference, patient_angles = _positioner(f, patient_position)

    spacing = _detector_spacing(f, modality)
    uv = _principal_point_stored(f, H, W, spacing)
    rot, flip = _orientation(f)
    image, (cx, cy), spacing = _to_detector(raw, uv, spacing, rot, flip)
    K = torch.tensor([[sdd / spacing[1], 0.0, cx], [0.0, sdd / spacing[0], cy], [0.0, 0.0, 1.0]], dtype=torch.float64)
    return DicomView(
        source=where,
        frame=frame if n > 1 else None,
        image=torch.from_numpy(image.astype(np.float32)),
        K=K,
        orbital_deg=orbital,
        angular_deg=angular,
        sid_mm=float(sid),
        sdd_mm=float(sdd),
        pixel_spacing_mm=(float(spacing[0]), float(spacing[1])),
        table_mm=tuple(float(x) for x in table),
        patient_position=patient_position,
        modality=modality,
        angle_reference=reference,
        patient_angles_deg=patient_angles,
    )


def read_dataset(path: str | Path):
    """The DICOM object at ``path`` (pydicom); ValueError for a file that is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a DICOM file ({type(e).__name__}: {e})") from None


def read_views(
    path: str | Path, *, frames: Sequence[int] | None = None, config: DicomConfig = DicomConfig()
) -> list[DicomView]:
    """The views in one DICOM file: its single frame, or the chosen ``frames`` (0-based; default:
    every frame) of a multi-frame object."""
    ds = read_dataset(path)
    n = frame_count(ds)
    name = Path(path).name
    if n == 1:
        if frames is not None and list(frames) not in ([0], []):
            raise ValueError(f"{name}: frames {list(frames)} requested from a single-frame object")
        return [view_from_dataset(ds, None, config=config, name=name)]
    chosen = list(range(n)) if frames is None else list(frames)
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise ValueError(f"{name}: frames {bad} out of range (NumberOfFrames {n})")
    return [view_from_dataset(ds, i, config=config, name=name) for i in chosen]
