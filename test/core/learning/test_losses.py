"""Loss terms of the coarse network on constructed cases: zero at the truth, positive away
from it and decreasing toward it; and the cross-view transform algebra."""

import math

import pytest
import torch

from mvreg_ros.core.data.simulate import DetectorConfig
from mvreg_ros.core.geometry.pose_sampling import sample_view_sets
from mvreg_ros.core.geometry.transforms import invert, make_T, scale_intrinsics, se3_exp
from mvreg_ros.core.imaging.volume import load_example_ct
from mvreg_ros.core.learning.losses import (
    cross_view_image_loss,
    cross_view_pose_loss,
    geodesic_angle,
    image_loss,
    pose_loss,
    transfer,
    view_pairs,
)
from mvreg_ros.core.rendering.renderer import Renderer


@pytest.fixture(scope="module")
def volume():
    return load_example_ct(downsample=8)


@pytest.fixture(scope="module")
def scene(volume):
    g = torch.Generator().manual_seed(3)
    c = volume.bone_centre_ct()
    geo = sample_view_sets(2, 3, centre_ct=c, generator=g)
    return geo, c


def _perturb_cam(T_cam_from_ct, scale, seed=0):
    """Each view's pose moved by ``scale`` times a fixed twist (about the camera origin)."""
    g = torch.Generator().manual_seed(seed)
    xi = torch.randn(*T_cam_from_ct.shape[:-2], 6, generator=g, dtype=torch.float64)
    xi[..., :3] *= math.radians(8)
    xi[..., 3:] *= 15.0
    return se3_exp(scale * xi) @ T_cam_from_ct


def _perturb_ref(T_cam_from_ct, T_ref_from_cam, view, scale, seed=1):
    """Only ``view`` moved, by a twist in the reference frame."""
    g = torch.Generator().manual_seed(seed)
    xi = torch.randn(6, generator=g, dtype=torch.float64)
    xi[:3] *= math.radians(10)
    xi[3:] *= 20.0
    T = T_cam_from_ct.clone()
    T_ref = T_ref_from_cam[:, view] @ T[:, view]
    T[:, view] = invert(T_ref_from_cam[:, view]) @ (se3_exp(scale * xi) @ T_ref)
    return T


def _check_decreasing(values):
    assert values[0] == pytest.approx(0.0, abs=1e-3), values
    for a, b in zip(values, values[1:]):
        assert b > a, values


def test_geodesic_angle_matches_rotation_and_has_finite_gradient_at_zero():
    w = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    R = se3_exp(torch.cat([w, torch.zeros(3, dtype=torch.float64)]))[:3, :3]
    assert float(geodesic_angle(torch.eye(3, dtype=torch.float64), R)) == pytest.approx(float(w.norm()), rel=1e-9)
    x = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    a = geodesic_angle(torch.eye(3, dtype=torch.float64), se3_exp(x)[:3, :3])
    a.backward()
    assert torch.isfinite(x.grad).all()


def test_pose_loss_zero_at_truth_and_decreasing_toward_it(scene):
    geo, c = scene
    T = geo.T_cam_from_ct
    values = [float(pose_loss(_perturb_cam(T, s), T, c).mean()) for s in (0.0, 0.25, 0.5, 1.0)]
    _check_decreasing(values)


def test_pose_loss_depth_weight_discounts_depth_only(scene):
    geo, c = scene
    T = geo.T_cam_from_ct
    shift = make_T(torch.eye(3, dtype=torch.float64), torch.tensor([0, 0, 30.0], dtype=torch.float64))
    Tz = shift @ T
    full = float(pose_loss(Tz, T, c, depth_weight=1.0).mean())
    half = float(pose_loss(Tz, T, c, depth_weight=0.5).mean())
    assert full == pytest.approx(0.30, rel=1e-4) and half == pytest.approx(0.15, rel=1e-4)


def test_cross_view_transfer_algebra(scene):
    geo, _ = scene
    T, T_rc = geo.T_cam_from_ct, geo.T_ref_from_cam
    assert view_pairs(3) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    for i, j in view_pairs(3):
        # at the truth, view i's pose carried to camera j is camera j's true pose
        assert torch.allclose(transfer(T, T_rc, i, j), T[:, j], atol=1e-8)
    # transfer i -> j -> i is the identity on any prediction
    P = _perturb_cam(T, 1.0)
    back = torch.stack([transfer(torch.stack([transfer(P, T_rc, 0, 1), P[:, 1]], 1), T_rc[:, [1, 0]], 0, 1)], 1)[:, 0]
    assert torch.allclose(back, P[:, 0], atol=1e-8)


def test_cross_view_pose_loss(scene):
    geo, c = scene
    T, T_rc = geo.T_cam_from_ct, geo.T_ref_from_cam
    values = [float(cross_view_pose_loss(_perturb_ref(T, T_rc, 1, s), T_rc, c).mean()) for s in (0.0, 0.25, 0.5, 1.0)]
    _check_decreasing(values)
    # consistent but wrong predictions (the whole set moved together) cost nothing here ...
    g = torch.Generator().manual_seed(5)
    D = se3_exp(
        torch.randn(6, generator=g, dtype=torch.float64) * torch.tensor([0.1] * 3 + [10.0] * 3, dtype=torch.float64)
    )
    moved = invert(T_rc) @ D @ T_rc @ T
    assert float(cross_view_pose_loss(moved, T_rc, c).max()) < 1e-6
    # ... but the pose loss sees them
    assert float(pose_loss(moved, T, c).min()) > 0.01
    assert float(cross_view_pose_loss(T[:, :1], T_rc[:, :1], c).abs().max()) == 0.0


def _images(volume, geo, size=32):
    renderer = Renderer(volume, n_samples=48)
    K = scale_intrinsics(DetectorConfig().K(), size / 256)
    B, V = geo.T_cam_from_ct.shape[:2]
    Ks = K.expand(B, V, 3, 3).clone()
    with torch.no_grad():
        images = renderer(geo.T_cam_from_ct.reshape(-1, 4, 4), Ks.reshape(-1, 3, 3), size, size).reshape(
            B, V, size, size
        )
    return renderer, Ks, images, torch.ones_like(images)


def test_image_loss_zero_at_truth_and_decreasing_toward_it(volume, scene):
    geo, _ = scene
    renderer, K, images, masks = _images(volume, geo)
    T = geo.T_cam_from_ct
    values = [float(image_loss(renderer, _perturb_cam(T, s), K, images, masks).mean()) for s in (0.0, 0.25, 0.5, 1.0)]
    _check_decreasing(values)


def test_cross_view_image_loss_zero_at_truth_and_decreasing_toward_it(volume, scene):
    geo, _ = scene
    renderer, K, images, masks = _images(volume, geo)
    T, T_rc = geo.T_cam_from_ct, geo.T_ref_from_cam
    values = [
        float(cross_view_image_loss(renderer, _perturb_ref(T, T_rc, 0, s), T_rc, K, images, masks).mean())
        for s in (0.0, 0.25, 0.5, 1.0)
    ]
    _check_decreasing(values)


def test_image_losses_have_pose_gradients(volume, scene):
    geo, _ = scene
    renderer, K, images, masks = _images(volume, geo)
    x = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    T = se3_exp(x) @ _perturb_cam(geo.T_cam_from_ct, 0.5)
    loss = (
        image_loss(renderer, T, K, images, masks).sum()
        + cross_view_image_loss(renderer, T, geo.T_ref_from_cam, K, images, masks).sum()
    )
    loss.backward()
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
