"""C-arm kinematics in the isocentre frame (x cranial, y patient right, z up)."""

import math

import pytest
import torch

from mvreg_ros.core.geometry.carm import T_iso_from_cam, T_iso_from_ct_supine
from mvreg_ros.core.geometry.transforms import intrinsics, invert, project, transform_points

F64 = torch.float64
SID = 700.0


def _source(T):
    return T[..., :3, 3]


def _z_cam(T):
    return T[..., :3, 2]


def test_zero_angles_is_the_ap_view():
    T = T_iso_from_cam(0.0, 0.0, sid_mm=SID)
    assert T.shape == (4, 4) and T.dtype == F64
    torch.testing.assert_close(_source(T), torch.tensor([0.0, 0.0, -SID], dtype=F64))
    torch.testing.assert_close(_z_cam(T), torch.tensor([0.0, 0.0, 1.0], dtype=F64))  # looking up
    torch.testing.assert_close(T[:3, 0], torch.tensor([0.0, 1.0, 0.0], dtype=F64))  # columns: patient right
    torch.testing.assert_close(T[:3, 1], torch.tensor([-1.0, 0.0, 0.0], dtype=F64))  # rows: toward the feet


def test_orbital_90_is_lao_lateral():
    # positive orbital = LAO: the detector swings to the patient's left (-y), the source to the right (+y)
    T = T_iso_from_cam(math.pi / 2, 0.0, sid_mm=SID)
    torch.testing.assert_close(_source(T), torch.tensor([0.0, SID, 0.0], dtype=F64), atol=1e-9, rtol=0)
    torch.testing.assert_close(_z_cam(T), torch.tensor([0.0, -1.0, 0.0], dtype=F64), atol=1e-12, rtol=0)
    # the image's long axis stays along the patient
    torch.testing.assert_close(T[:3, 1], torch.tensor([-1.0, 0.0, 0.0], dtype=F64), atol=1e-12, rtol=0)
    T_small = T_iso_from_cam(math.radians(30.0), 0.0, sid_mm=SID)
    assert float(_source(T_small)[1]) > 0 and float(_source(T_small)[2]) < 0  # right posterior source


def test_positive_angular_is_cranial():
    T = T_iso_from_cam(0.0, math.radians(30.0), sid_mm=SID)
    detector_dir = _z_cam(T)  # from the isocentre toward the detector
    assert float(detector_dir[0]) > 0.4  # toward the head (+x)
    assert float(_source(T)[0]) < 0  # the source toward the feet


def test_angular_90_is_cranial_lateral_and_minus_90_caudal():
    # README "C-arm kinematic model": CRAN + puts the detector toward the head (+x_iso), the source toward the
    # feet; the C turns about the patient-right axis, so the source never leaves the y = 0 plane
    T = T_iso_from_cam(0.0, math.pi / 2, sid_mm=SID)
    torch.testing.assert_close(_source(T), torch.tensor([-SID, 0.0, 0.0], dtype=F64), atol=1e-9, rtol=0)
    torch.testing.assert_close(_z_cam(T), torch.tensor([1.0, 0.0, 0.0], dtype=F64), atol=1e-12, rtol=0)
    # the image columns still run toward the patient's right (the tilt axis)
    torch.testing.assert_close(T[:3, 0], torch.tensor([0.0, 1.0, 0.0], dtype=F64), atol=1e-12, rtol=0)
    T_caud = T_iso_from_cam(0.0, -math.pi / 2, sid_mm=SID)
    torch.testing.assert_close(_source(T_caud), torch.tensor([SID, 0.0, 0.0], dtype=F64), atol=1e-9, rtol=0)
    torch.testing.assert_close(_z_cam(T_caud), torch.tensor([-1.0, 0.0, 0.0], dtype=F64), atol=1e-12, rtol=0)
    # after LAO 90 (source on the patient's right, detector on the left) CRAN 30 still tilts the detector
    # toward the head, and the beam stays in the plane of x_iso and the orbital beam direction (-y)
    T_lao_cran = T_iso_from_cam(math.pi / 2, math.radians(30.0), sid_mm=SID)
    s, c = math.sin(math.radians(30.0)), math.cos(math.radians(30.0))
    torch.testing.assert_close(_z_cam(T_lao_cran), torch.tensor([s, -c, 0.0], dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        _source(T_lao_cran), torch.tensor([-SID * s, SID * c, 0.0], dtype=F64), atol=1e-9, rtol=0
    )


def test_rotations_are_proper_for_any_angles():
    g = torch.Generator().manual_seed(0)
    orb = (torch.rand(50, generator=g, dtype=F64) - 0.5) * 2 * math.pi
    ang = (torch.rand(50, generator=g, dtype=F64) - 0.5) * math.pi
    T = T_iso_from_cam(orb, ang, sid_mm=SID)
    assert T.shape == (50, 4, 4)
    R = T[:, :3, :3]
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3, dtype=F64).expand(50, 3, 3))
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(50, dtype=F64))
    torch.testing.assert_close(_source(T).norm(dim=-1), torch.full((50,), SID, dtype=F64))
    # broadcasting a scalar against a batch
    torch.testing.assert_close(
        T_iso_from_cam(orb, 0.3, sid_mm=SID), T_iso_from_cam(orb, torch.full_like(orb, 0.3), sid_mm=SID)
    )
    # the isocentre lies on every camera's optical axis, at depth sid, hence projects to the principal point
    K = intrinsics(sdd_mm=1020.0, pixel_spacing_mm=1.164, height=256, width=200)
    iso_in_cam = transform_points(invert(T), torch.zeros(1, 3, dtype=F64))
    torch.testing.assert_close(
        iso_in_cam[:, 0], torch.tensor([0.0, 0.0, SID], dtype=F64).expand(50, 3), atol=1e-9, rtol=0
    )
    uv = project(K, invert(T), torch.zeros(1, 3, dtype=F64))[:, 0]
    torch.testing.assert_close(uv, torch.tensor([99.5, 127.5], dtype=F64).expand(50, 2), atol=1e-9, rtol=0)


def test_orbital_and_angular_compose_in_order():
    o, a = 0.4, -0.7
    T = T_iso_from_cam(o, a, sid_mm=SID)
    # orbital acts last, about the fixed table axis x: undoing it leaves the pure-angular camera
    Rx = T_iso_from_cam(o, 0.0, sid_mm=SID)[:3, :3] @ T_iso_from_cam(0.0, 0.0, sid_mm=SID)[:3, :3].T
    torch.testing.assert_close(Rx.T @ T[:3, :3], T_iso_from_cam(0.0, a, sid_mm=SID)[:3, :3])
    torch.testing.assert_close(Rx[0], torch.tensor([1.0, 0.0, 0.0], dtype=F64))


def test_supine_patient_axes_and_centre():
    c = torch.tensor([13.6, 7.9, -171.25], dtype=F64)
    T = T_iso_from_ct_supine(c)
    R = T[:3, :3]
    torch.testing.assert_close(
        R @ torch.tensor([1.0, 0, 0], dtype=F64), torch.tensor([0.0, -1, 0], dtype=F64)
    )  # L -> -y
    torch.testing.assert_close(
        R @ torch.tensor([0, 1.0, 0], dtype=F64), torch.tensor([0.0, 0, -1], dtype=F64)
    )  # P -> -z
    torch.testing.assert_close(
        R @ torch.tensor([0, 0, 1.0], dtype=F64), torch.tensor([1.0, 0, 0], dtype=F64)
    )  # S -> +x
    torch.testing.assert_close(torch.linalg.det(R), torch.tensor(1.0, dtype=F64))
    torch.testing.assert_close(transform_points(T, c[None])[0], torch.zeros(3, dtype=F64))
    off = torch.tensor([5.0, -10.0, 20.0], dtype=F64)
    torch.testing.assert_close(transform_points(T_iso_from_ct_supine(c, off), c[None])[0], off)
    # an anterior point (-P) is above the isocentre
    anterior = c - torch.tensor([0.0, 50.0, 0.0], dtype=F64)
    assert float(transform_points(T, anterior[None])[0, 2]) == pytest.approx(50.0)
