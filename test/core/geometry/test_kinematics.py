"""C-arm plane kinematics: known views, mounting, prismatic joints, round trips."""

import math

import pytest
import torch

from mvreg_ros.core.geometry import carm
from mvreg_ros.core.geometry.kinematics import PlaneConfig, T_from_xyz_rpy, rotation_from_rpy, view_angle_deg
from mvreg_ros.core.geometry.transforms import invert, make_T, project, so3_exp, transform_points

SID = 700.0


def plane(**kw) -> PlaneConfig:
    args = dict(name="main", orbital_joint="carm_orbital", angular_joint="carm_angular", sid_mm=SID)
    args.update(kw)
    return PlaneConfig(**args)


def q(orbital=0.0, angular=0.0, **extra):
    return {"carm_orbital": orbital, "carm_angular": angular, **extra}


def source_and_axis(T_ref_from_cam):
    return T_ref_from_cam[:3, 3], T_ref_from_cam[:3, 2]


def test_zero_angles_is_ap_view():
    T = plane().T_ref_from_cam(q())
    src, z = source_and_axis(T)
    # source below the table, beam pointing up (posterior -> anterior for a supine patient)
    torch.testing.assert_close(src, torch.tensor([0.0, 0.0, -SID], dtype=torch.float64))
    torch.testing.assert_close(z, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    # image columns run toward the patient's right (+y), rows toward the feet (-x)
    torch.testing.assert_close(T[:3, 0], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(T[:3, 1], torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64))
    # the isocentre projects onto the principal point
    K = torch.tensor([[1000.0, 0, 31.5], [0, 1000.0, 31.5], [0, 0, 1]], dtype=torch.float64)
    uv = project(K, invert(T), torch.zeros(1, 3, dtype=torch.float64))[0]
    torch.testing.assert_close(uv, torch.tensor([31.5, 31.5], dtype=torch.float64))


def test_orbital_90_is_lateral_and_equals_a_lateral_mounting():
    T = plane().T_ref_from_cam(q(orbital=math.pi / 2))
    src, z = source_and_axis(T)
    # LAO 90: the beam runs from the patient's right (source) to the left (detector), level with the table
    torch.testing.assert_close(z, torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(src, torch.tensor([0.0, SID, 0.0], dtype=torch.float64))
    assert view_angle_deg(T, plane().T_ref_from_cam(q())) == pytest.approx(90.0, abs=1e-9)
    torch.testing.assert_close(src.norm(), torch.tensor(SID, dtype=torch.float64))
    # a lateral plane mounted rotated by 90 deg about the table axis, at zero joints, is the same camera
    lateral = plane(name="lateral", T_ref_from_iso=T_from_xyz_rpy([0, 0, 0], [math.pi / 2, 0, 0]))
    torch.testing.assert_close(lateral.T_ref_from_cam(q()), T)


def test_positive_angular_is_cranial():
    T = plane().T_ref_from_cam(q(angular=math.radians(30)))
    src, z = source_and_axis(T)
    # CRAN 30: the detector tilts toward the head (+x), the source toward the feet; the beam stays
    # in the x-z plane, 30 deg from vertical
    s, c = math.sin(math.radians(30)), math.cos(math.radians(30))
    torch.testing.assert_close(z, torch.tensor([s, 0.0, c], dtype=torch.float64))
    torch.testing.assert_close(src, torch.tensor([-SID * s, 0.0, -SID * c], dtype=torch.float64))


def test_matches_carm_module_and_signs():
    o, a = 0.3, -0.2
    torch.testing.assert_close(plane().T_ref_from_cam(q(o, a)), carm.T_iso_from_cam(o, a, sid_mm=SID))
    flipped = plane(orbital_sign=-1.0, angular_sign=-1.0)
    torch.testing.assert_close(flipped.T_ref_from_cam(q(o, a)), carm.T_iso_from_cam(-o, -a, sid_mm=SID))


def test_mounting_round_trip_and_isocentre_fixed_point():
    mount = T_from_xyz_rpy([0.1, -0.25, 1.1], [0.1, -0.2, 0.7])
    p = plane(T_ref_from_iso=mount)
    for o, a in [(0.0, 0.0), (0.5, 0.2), (-1.2, 0.4)]:
        T = p.T_ref_from_cam(q(o, a))
        # the isocentre stays on the principal ray at sid from the source, wherever the C turns
        iso_cam = transform_points(invert(T), mount[:3, 3][None])[0]
        torch.testing.assert_close(iso_cam, torch.tensor([0.0, 0.0, SID], dtype=torch.float64))
        # ref <- iso <- cam composes back
        torch.testing.assert_close(invert(mount) @ T, carm.T_iso_from_cam(o, a, sid_mm=SID))


def test_prismatic_offsets_in_metres():
    p = plane(
        prismatic_joints=("carm_lift", "carm_long"),
        prismatic_axes=((0.0, 0.0, 1.0), (1.0, 0.0, 0.0)),
        T_ref_from_iso=T_from_xyz_rpy([0.0, 0.0, 0.0], [0.0, 0.0, math.pi / 2]),
    )
    base = p.T_ref_from_cam(q(0.2, 0.1, carm_lift=0.0, carm_long=0.0))
    moved = p.T_ref_from_cam(q(0.2, 0.1, carm_lift=0.05, carm_long=-0.12))
    # pure translation of the whole C: 50 mm up, and -120 mm along the mount's x (= ref y after the yaw)
    torch.testing.assert_close(moved[:3, :3], base[:3, :3])
    torch.testing.assert_close(moved[:3, 3] - base[:3, 3], torch.tensor([0.0, -120.0, 50.0], dtype=torch.float64))
    torch.testing.assert_close(
        p.isocentre_ref(q(carm_lift=0.05, carm_long=-0.12)), torch.tensor([0.0, -120.0, 50.0], dtype=torch.float64)
    )
    assert p.joint_names == ("carm_orbital", "carm_angular", "carm_lift", "carm_long")


def test_rpy_convention():
    # URDF: R = Rz(yaw) Ry(pitch) Rx(roll)
    r, pch, y = 0.3, -0.4, 1.1
    e = torch.eye(3, dtype=torch.float64)
    R = so3_exp(e[2] * y) @ so3_exp(e[1] * pch) @ so3_exp(e[0] * r)
    torch.testing.assert_close(rotation_from_rpy(r, pch, y), R)
    T = T_from_xyz_rpy([1.0, 2.0, 3.0], [r, pch, y])
    torch.testing.assert_close(T, make_T(R, torch.tensor([1000.0, 2000.0, 3000.0], dtype=torch.float64)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sid_mm=0.0), "sid_mm"),
        (dict(angular_joint="carm_orbital"), "must differ"),
        (dict(orbital_sign=2.0), "orbital_sign"),
        (dict(prismatic_joints=("lift",), prismatic_axes=()), "prismatic"),
        (dict(prismatic_joints=("lift",), prismatic_axes=((0.0, 0.0, 2.0),)), "unit vector"),
        (dict(prismatic_joints=("carm_orbital",), prismatic_axes=((0.0, 0.0, 1.0),)), "distinct"),
        (dict(T_ref_from_iso=torch.diag(torch.tensor([1.0, 1.0, -1.0, 1.0], dtype=torch.float64))), "rigid"),
    ],
)
def test_rejects_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plane(**kwargs)


def test_missing_or_bad_joint_values():
    with pytest.raises(KeyError, match="carm_angular"):
        plane().T_ref_from_cam({"carm_orbital": 0.0})
    with pytest.raises(ValueError, match="nan"):
        plane().T_ref_from_cam(q(orbital=float("nan")))
