"""C-arm plane kinematics: the X-ray camera pose in the reference frame from joint values.

A *plane* is one C-arm (a biplane system has two). Its joints, in ROS units (radians,
metres), are an orbital and an angular rotation about the isocentre and optional
prismatic joints that move the whole C (isocentre included) relative to its mount.
The mount is a fixed transform ``T_ref_from_iso`` from the plane's isocentre frame at zero
prismatic displacement to the reference frame (``carm_base`` in the ROS node)::

    T_ref_from_cam(q) = T_ref_from_iso
                        @ Trans(sum_k 1000 * q_k * a_k)                       prismatic, mm
                        @ carm.T_iso_from_cam(s_o * q_orbital, s_a * q_angular, sid_mm)

with ``a_k`` the unit axis of prismatic joint ``k`` in the isocentre frame and ``s_o, s_a``
(+1 or -1) the sign conventions of the two rotary joints. See :mod:`.carm` for the
isocentre frame (x cranial, y patient right, z up) and the AP view at zero angles.

Everything here is mm inside (like the rest of the engine); joint values come in ROS units.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.geometry import carm
from mvreg_ros.core.geometry.transforms import axis_rotation, make_T, translation

M_TO_MM = 1000.0


def rotation_from_rpy(roll: float, pitch: float, yaw: float, *, dtype=torch.float64) -> Float[Tensor, "3 3"]:
    """URDF / REP 103 fixed-axis roll-pitch-yaw (radians): ``Rz(yaw) @ Ry(pitch) @ Rx(roll)``."""
    return (
        axis_rotation(2, torch.tensor(yaw, dtype=dtype))
        @ axis_rotation(1, torch.tensor(pitch, dtype=dtype))
        @ axis_rotation(0, torch.tensor(roll, dtype=dtype))
    )


def T_from_xyz_rpy(xyz_m, rpy_rad, *, dtype=torch.float64) -> Float[Tensor, "4 4"]:
    """Homogeneous transform (mm) from a URDF-style origin: translation in metres, rpy in radians."""
    xyz = [float(v) for v in xyz_m]
    rpy = [float(v) for v in rpy_rad]
    if len(xyz) != 3 or len(rpy) != 3:
        raise ValueError(f"xyz_m and rpy_rad need 3 values each, got {xyz_m!r} and {rpy_rad!r}")
    if not all(math.isfinite(v) for v in xyz + rpy):
        raise ValueError(f"xyz_m {xyz_m!r} and rpy_rad {rpy_rad!r} must be finite")
    return make_T(rotation_from_rpy(*rpy, dtype=dtype), torch.tensor(xyz, dtype=dtype) * M_TO_MM)


def check_rigid(T: Tensor, name: str, *, tol: float = 1e-6) -> Tensor:
    """``T`` as float64 if it is a 4x4 rigid transform; ValueError/TypeError naming it otherwise."""
    if not isinstance(T, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(T).__name__}")
    if T.shape != (4, 4):
        raise ValueError(f"{name} must be 4x4, got {tuple(T.shape)}")
    T = T.to(torch.float64)
    if not torch.isfinite(T).all():
        raise ValueError(f"{name} has non-finite entries")
    R = T[:3, :3]
    err = float((R.T @ R - torch.eye(3, dtype=torch.float64)).abs().max())
    if (
        err > tol
        or float(torch.linalg.det(R)) < 0
        or float((T[3] - torch.tensor([0, 0, 0, 1.0], dtype=torch.float64)).abs().max()) > 1e-9
    ):
        raise ValueError(f"{name} is not a rigid transform (rotation error {err:.2e})")
    return T


@dataclasses.dataclass(frozen=True, eq=False)
class PlaneConfig:
    """One C-arm plane: joint names, geometry and mounting (mm inside)."""

    name: str
    orbital_joint: str
    angular_joint: str
    sid_mm: float  # source to isocentre
    T_ref_from_iso: Float[Tensor, "4 4"] = dataclasses.field(default_factory=lambda: torch.eye(4, dtype=torch.float64))
    orbital_sign: float = 1.0  # +1: positive joint value = LAO (see carm.py); -1: the opposite
    angular_sign: float = 1.0  # +1: positive joint value = cranial
    prismatic_joints: tuple[str, ...] = ()
    prismatic_axes: tuple[tuple[float, float, float], ...] = ()  # unit axes in the isocentre frame

    def __post_init__(self):
        if not self.name:
            raise ValueError("a plane needs a name")
        for field in ("orbital_joint", "angular_joint"):
            if not isinstance(getattr(self, field), str) or not getattr(self, field):
                raise ValueError(f"plane {self.name!r}: {field} must be a non-empty joint name")
        if self.orbital_joint == self.angular_joint:
            raise ValueError(
                f"plane {self.name!r}: orbital and angular joints must differ, both are {self.orbital_joint!r}"
            )
        if not (math.isfinite(self.sid_mm) and self.sid_mm > 0):
            raise ValueError(f"plane {self.name!r}: sid_mm must be positive, got {self.sid_mm}")
        for field in ("orbital_sign", "angular_sign"):
            if getattr(self, field) not in (1.0, -1.0):
                raise ValueError(f"plane {self.name!r}: {field} must be +1 or -1, got {getattr(self, field)}")
        object.__setattr__(
            self, "T_ref_from_iso", check_rigid(self.T_ref_from_iso, f"plane {self.name!r} T_ref_from_iso")
        )
        joints = tuple(self.prismatic_joints)
        axes = tuple(tuple(float(v) for v in a) for a in self.prismatic_axes)
        if len(joints) != len(axes):
            raise ValueError(f"plane {self.name!r}: {len(joints)} prismatic joints but {len(axes)} axes")
        for j, a in zip(joints, axes):
            if len(a) != 3:
                raise ValueError(f"plane {self.name!r}: axis of prismatic joint {j!r} needs 3 values, got {a}")
            n = math.sqrt(sum(v * v for v in a))
            if not abs(n - 1.0) < 1e-6:
                raise ValueError(
                    f"plane {self.name!r}: axis of prismatic joint {j!r} must be a unit vector, got {a} (norm {n:.6g})"
                )
        names = (self.orbital_joint, self.angular_joint) + joints
        if len(set(names)) != len(names):
            raise ValueError(f"plane {self.name!r}: joint names must be distinct, got {names}")
        object.__setattr__(self, "prismatic_joints", joints)
        object.__setattr__(self, "prismatic_axes", axes)

    @property
    def joint_names(self) -> tuple[str, ...]:
        """Every joint this plane reads from the joint states."""
        return (self.orbital_joint, self.angular_joint) + self.prismatic_joints

    def _value(self, joint_positions: Mapping[str, float], joint: str) -> float:
        if joint not in joint_positions:
            raise KeyError(f"plane {self.name!r}: joint {joint!r} missing (have {sorted(joint_positions)})")
        v = float(joint_positions[joint])
        if not math.isfinite(v):
            raise ValueError(f"plane {self.name!r}: joint {joint!r} is {v}")
        return v

    def T_ref_from_iso_at(self, joint_positions: Mapping[str, float]) -> Float[Tensor, "4 4"]:
        """The isocentre frame after the prismatic joints moved it (mm)."""
        shift = torch.zeros(3, dtype=torch.float64)
        for joint, axis in zip(self.prismatic_joints, self.prismatic_axes):
            shift = shift + M_TO_MM * self._value(joint_positions, joint) * torch.tensor(axis, dtype=torch.float64)
        return self.T_ref_from_iso @ translation(shift)

    def T_ref_from_cam(self, joint_positions: Mapping[str, float]) -> Float[Tensor, "4 4"]:
        """Pose of the X-ray camera (ROS optical frame at the source, mm) in the reference frame,
        from joint values in ROS units (radians, metres)."""
        orbital = self.orbital_sign * self._value(joint_positions, self.orbital_joint)
        angular = self.angular_sign * self._value(joint_positions, self.angular_joint)
        return self.T_ref_from_iso_at(joint_positions) @ carm.T_iso_from_cam(orbital, angular, sid_mm=self.sid_mm)

    def isocentre_ref(self, joint_positions: Mapping[str, float]) -> Float[Tensor, "3"]:
        return self.T_ref_from_iso_at(joint_positions)[:3, 3]


def view_angle_deg(T_ref_from_cam_a: Float[Tensor, "4 4"], T_ref_from_cam_b: Float[Tensor, "4 4"]) -> float:
    """Angle between the principal rays (camera z axes) of two views, degrees."""
    za = T_ref_from_cam_a[..., :3, 2].to(torch.float64)
    zb = T_ref_from_cam_b[..., :3, 2].to(torch.float64)
    cos = float((za * zb).sum() / (za.norm() * zb.norm()))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))
