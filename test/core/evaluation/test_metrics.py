"""Registration error metrics: mTRE, mean projection distance, pose errors, landmarks."""

import math

import pytest
import torch

from mvreg_ros.core.evaluation.metrics import mpd_mm, mtre_mm, pose_errors
from mvreg_ros.core.geometry.transforms import about_point, intrinsics, make_T, so3_exp, translation

F64 = torch.float64


def _pose(seed=0):
    g = torch.Generator().manual_seed(seed)
    return make_T(so3_exp(torch.randn(3, generator=g, dtype=F64)), torch.randn(3, generator=g, dtype=F64) * 100)


def _landmarks(seed=1, n=12):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=F64) * 50


def test_mtre_identical_and_translated():
    T = _pose()
    lm = _landmarks()
    assert mtre_mm(T, T, lm) == pytest.approx(0.0, abs=1e-12)
    t = torch.tensor([3.0, -4.0, 12.0], dtype=F64)
    assert mtre_mm(translation(t) @ T, T, lm) == pytest.approx(13.0)
    assert mtre_mm(T, translation(t) @ T, lm) == pytest.approx(13.0)
    assert isinstance(mtre_mm(T, T, lm), float)


def test_mtre_of_a_rotation():
    theta = math.radians(10.0)
    R = make_T(so3_exp(torch.tensor([0.0, 0.0, theta], dtype=F64)), torch.zeros(3, dtype=F64))
    # landmarks at distances 10, 20 and 0 (on the axis) from the z axis: chords 2 r sin(theta / 2)
    lm = torch.tensor([[10.0, 0.0, 5.0], [0.0, -20.0, 0.0], [0.0, 0.0, 40.0]], dtype=F64)
    expected = (2 * 10 * math.sin(theta / 2) + 2 * 20 * math.sin(theta / 2) + 0.0) / 3
    T = _pose(2)
    assert mtre_mm(T @ R, T, lm) == pytest.approx(expected, rel=1e-12)
    # about a landmark: that one does not move
    c = lm[1]
    Rc = about_point(R, c)
    expected_c = (2 * math.hypot(10, 20) * math.sin(theta / 2) + 0 + 2 * 20 * math.sin(theta / 2)) / 3
    assert mtre_mm(T @ Rc, T, lm) == pytest.approx(expected_c, rel=1e-12)


def test_mpd_of_a_lateral_translation():
    # ref = first camera; landmarks on the plane z = 700 in front of it; a 10 mm shift along x
    sdd, pixel = 1020.0, 1.164
    K1 = intrinsics(sdd_mm=sdd, pixel_spacing_mm=pixel, height=256, width=256)
    K2 = intrinsics(sdd_mm=1500.0, pixel_spacing_mm=0.5, height=512, width=512)
    lm = torch.tensor([[0.0, 0.0, 700.0], [30.0, -20.0, 700.0], [-15.0, 40.0, 700.0]], dtype=F64)
    T_true = torch.eye(4, dtype=F64)
    T_est = translation(torch.tensor([10.0, 0.0, 0.0], dtype=F64))
    one = mpd_mm(T_est, T_true, lm, K1[None], torch.eye(4, dtype=F64)[None], pixel)
    assert one == pytest.approx(10.0 * sdd / 700.0)
    # a second camera with another detector: per-view pixel sizes; same plane, same shift
    Ks = torch.stack([K1, K2])
    T_ref_from_cam = torch.eye(4, dtype=F64).expand(2, 4, 4)
    two = mpd_mm(T_est, T_true, lm, Ks, T_ref_from_cam, torch.tensor([pixel, 0.5], dtype=F64))
    assert two == pytest.approx(0.5 * (10.0 * sdd / 700.0 + 10.0 * 1500.0 / 700.0))
    # a shift along the viewing ray of the principal point moves nothing there: only the off-axis landmarks move
    along = translation(torch.tensor([0.0, 0.0, 70.0], dtype=F64))
    d = mpd_mm(along, T_true, lm[:1], K1[None], torch.eye(4, dtype=F64)[None], pixel)
    assert d == pytest.approx(0.0, abs=1e-9)
    assert mpd_mm(T_true, T_true, lm, Ks, T_ref_from_cam, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_mpd_uses_the_camera_poses():
    # the same error seen by a camera rotated 90 degrees about y: an x shift becomes a shift along its axis
    lm = torch.tensor([[0.0, 0.0, 0.0]], dtype=F64)
    K = intrinsics(sdd_mm=1000.0, pixel_spacing_mm=1.0, height=100, width=100)
    R = so3_exp(torch.tensor([0.0, math.pi / 2, 0.0], dtype=F64))
    # camera at -700 along its own z, looking at the origin; its z axis is R[:, 2] = +x
    T_ref_from_cam = make_T(R, -700.0 * R[:, 2])[None]
    T_est = translation(torch.tensor([10.0, 0.0, 0.0], dtype=F64))
    assert mpd_mm(T_est, torch.eye(4, dtype=F64), lm, K[None], T_ref_from_cam, 1.0) == pytest.approx(0.0, abs=1e-9)
    T_est = translation(torch.tensor([0.0, 7.0, 0.0], dtype=F64))
    assert mpd_mm(T_est, torch.eye(4, dtype=F64), lm, K[None], T_ref_from_cam, 1.0) == pytest.approx(7.0 * 1000 / 700)


def test_pose_errors():
    T = _pose(3)
    c = torch.tensor([10.0, 20.0, -30.0], dtype=F64)
    R = make_T(
        so3_exp(torch.tensor([0.3, -0.1, 0.2], dtype=F64) / math.sqrt(0.14) * math.radians(4.0)),
        torch.zeros(3, dtype=F64),
    )
    # a rotation about the CT centre (expressed in ref) and a 5 mm translation
    c_ref = T[:3, :3] @ c + T[:3, 3]
    T_est = translation(torch.tensor([0.0, 3.0, 4.0], dtype=F64)) @ about_point(R, c_ref) @ T
    rot, trans = pose_errors(T_est, T, c)
    assert rot == pytest.approx(4.0, abs=1e-9)
    assert trans == pytest.approx(5.0, abs=1e-9)
    assert pose_errors(T, T, c) == pytest.approx((0.0, 0.0), abs=1e-5)
