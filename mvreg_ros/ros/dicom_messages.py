"""A DICOM view as the registration node's input messages (pure: message objects, no DDS).

One shot = ``JointState`` (the plane's joints), ``CameraInfo`` (``DicomView.K``) and ``Image``
(the raw detector intensities, ``DicomView.image``: the detector as seen from the source, the
engine's camera), all with one stamp. Joint values follow the node's plane model
(``plane.NAME.*`` of register_node): ``orbital_joint = orbital_sign * radians(PositionerPrimaryAngle)``
(+ LAO), ``angular_joint = angular_sign * radians(PositionerSecondaryAngle)`` (+ CRA), the table
joints (``DicomView.joint_positions``, metres) on ``table_joints``. The node computes the camera
from these joints with its own ``sid_m`` and mounting, so a view whose source-to-isocentre
distance differs from the plane's ``sid_m`` by more than the tolerance, or whose table position is
not zero without ``table_joints``, is refused (the node would put the camera elsewhere).

Enhanced objects read with the X-Ray Isocenter Reference System (``DicomView.angle_reference``
``isocenter``) carry the equipment angles: the same joint values as the patient-relative ones for
HFS, the frame the node's plane mounting assumes for ``patient_position`` HFS. For another patient
position the node mounts the plane in that patient's frame, so the patient-relative angles (which
the reader checked against the isocentre ones) are published instead; without them the object is
refused.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from sensor_msgs.msg import CameraInfo, Image, JointState

from mvreg_ros.core.data.dicom import (
    ANGULAR_JOINT,
    ISOCENTER_ANGLES,
    ORBITAL_JOINT,
    PATIENT_ANGLES,
    TABLE_JOINTS,
    DicomView,
)
from mvreg_ros.ros.conversions import K_to_camera_info, tensor_to_image

ENCODINGS = ("auto", "mono16", "32FC1")
MONO16_MAX = 65535


@dataclasses.dataclass(frozen=True)
class PlaneOutput:
    """Where and how one plane's shots are published."""

    name: str
    image_topic: str
    camera_info_topic: str
    frame_id: str
    orbital_joint: str
    angular_joint: str
    orbital_sign: float = 1.0
    angular_sign: float = 1.0
    sid_m: float = 0.7
    table_joints: tuple[str, ...] = ()  # (), or longitudinal, lateral, vertical

    def __post_init__(self):
        for f in ("image_topic", "camera_info_topic", "orbital_joint", "angular_joint"):
            if not str(getattr(self, f)).strip():
                raise ValueError(f"plane.{self.name}.{f} must not be empty")
        for f in ("orbital_sign", "angular_sign"):
            if getattr(self, f) not in (1.0, -1.0):
                raise ValueError(f"plane.{self.name}.{f} must be +1 or -1, got {getattr(self, f)!r}")
        if not (math.isfinite(self.sid_m) and 0.05 <= self.sid_m <= 5.0):
            raise ValueError(f"plane.{self.name}.sid_m must be within [0.05, 5] m, got {self.sid_m!r}")
        if len(self.table_joints) not in (0, 3) or any(not str(j).strip() for j in self.table_joints):
            raise ValueError(
                f"plane.{self.name}.table_joints must be empty or name 3 joints "
                f"(longitudinal, lateral, vertical), got {list(self.table_joints)}"
            )
        names = [self.orbital_joint, self.angular_joint, *self.table_joints]
        if len(set(names)) != len(names):
            raise ValueError(f"plane.{self.name}: joint names must differ, got {names}")

    @property
    def joint_names(self) -> tuple[str, ...]:
        return (self.orbital_joint, self.angular_joint, *self.table_joints)


def joint_values(view: DicomView, plane: PlaneOutput, *, sid_tolerance_mm: float) -> dict[str, float]:
    """The plane's joint values of a view (radians, metres); ValueError when the node's plane
    model cannot represent the view."""
    sid_plane_mm = plane.sid_m * 1000.0
    if abs(view.sid_mm - sid_plane_mm) > sid_tolerance_mm:
        raise ValueError(
            f"source-to-isocentre distance {view.sid_mm:g} mm differs from plane.{plane.name}.sid_m "
            f"({sid_plane_mm:g} mm) by more than sid_tolerance_mm ({sid_tolerance_mm:g})"
        )
    if view.angle_reference == ISOCENTER_ANGLES and view.patient_position != "HFS":
        if view.patient_angles_deg is None:
            raise ValueError(
                f"PositionerPrimaryAngle is missing: the object has only the X-Ray Isocenter Reference System's "
                f"equipment angles, and the node mounts the plane in the patient frame of {view.patient_position}"
            )
        primary, secondary = view.patient_angles_deg
        view = dataclasses.replace(view, orbital_deg=primary, angular_deg=secondary, angle_reference=PATIENT_ANGLES)
    j = view.joint_positions
    out = {
        plane.orbital_joint: plane.orbital_sign * j[ORBITAL_JOINT],
        plane.angular_joint: plane.angular_sign * j[ANGULAR_JOINT],
    }
    table = [j[n] for n in TABLE_JOINTS]
    if plane.table_joints:
        out.update(zip(plane.table_joints, table))
    elif any(v != 0.0 for v in table):
        raise ValueError(
            f"the object has a table position {list(view.table_mm)} mm but plane.{plane.name}.table_joints is empty"
        )
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"non-finite joint values for {bad}")
    return out


def image_pixels(view: DicomView, encoding: str) -> tuple[np.ndarray, str]:
    """The pixels and the encoding they are published in. ``auto``: ``mono16`` when every value
    is an integer in 0..65535 (LIN objects), else ``32FC1`` (rescaled or LOG objects)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"image_encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    img = view.image.detach().cpu().numpy().astype(np.float64)
    if img.ndim != 2 or img.size == 0:
        raise ValueError(f"the image must be 2D and not empty, got shape {img.shape}")
    if not np.isfinite(img).all():
        raise ValueError("the image has non-finite values")
    if float(img.max()) == float(img.min()):
        raise ValueError("the image is constant")
    fits16 = bool(img.min() >= 0 and img.max() <= MONO16_MAX and np.all(img == np.round(img)))
    if encoding == "mono16" and not fits16:
        raise ValueError(
            f"image_encoding mono16, but the values ({img.min():g}..{img.max():g}) are not integers in 0..65535"
        )
    if encoding == "mono16" or (encoding == "auto" and fits16):
        return img.astype(np.uint16), "mono16"
    if np.abs(img).max() > np.finfo(np.float32).max:
        raise ValueError("the image values do not fit 32FC1")
    return img.astype(np.float32), "32FC1"


@dataclasses.dataclass(frozen=True, eq=False)
class ShotMessages:
    joint_state: JointState
    camera_info: CameraInfo
    image: Image

    def set_stamp(self, stamp) -> None:
        for m in (self.joint_state, self.camera_info, self.image):
            m.header.stamp = stamp


def shot_messages(
    view: DicomView, plane: PlaneOutput, *, encoding: str = "auto", sid_tolerance_mm: float = 5.0
) -> ShotMessages:
    """The three messages of one view (unstamped: :meth:`ShotMessages.set_stamp`)."""
    joints = joint_values(view, plane, sid_tolerance_mm=sid_tolerance_mm)
    pixels, enc = image_pixels(view, encoding)
    H, W = pixels.shape
    K = view.K
    if not bool(np.isfinite(K.numpy()).all()) or float(K[0, 0]) <= 0 or float(K[1, 1]) <= 0:
        raise ValueError(f"K must be finite with positive focal lengths, got {K.tolist()}")
    js = JointState()
    js.name = list(joints)
    js.position = [float(v) for v in joints.values()]
    return ShotMessages(
        joint_state=js,
        camera_info=K_to_camera_info(K, height=H, width=W, frame_id=plane.frame_id),
        image=tensor_to_image(pixels, encoding=enc, frame_id=plane.frame_id),
    )
