"""The refinement's twist parametrisation: the fast path against the reference, values and gradients."""

import math

import pytest
import torch

from mvreg_ros.core.geometry.transforms import se3_exp, so3_exp
from mvreg_ros.core.geometry.twist import pose_about, pose_about_reference, pose_about_written, so3_exp_vjp
from mvreg_ros.core.rendering import native, pose_chain

needs_native = pytest.mark.skipif(native.load() is None, reason="the native extension cannot be built here")

F64 = torch.float64
# zero, tiny, both sides of the series branch (angle 1e-2), generic, near and at 180 degrees
ANGLES = (0.0, 1e-9, 1e-4, 0.0099999, 0.0100001, 0.3, 2.0, math.pi - 1e-6, math.pi)


def _rotation_vectors(angle: float, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, 3, generator=g, dtype=F64)
    return w / w.norm(dim=-1, keepdim=True) * angle


def _poses(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return se3_exp(torch.randn(n, 6, generator=g, dtype=F64) * torch.tensor([1, 1, 1, 50, 50, 50], dtype=F64))


def _grads(fn, T0, c, w, t, weights):
    w = w.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    T = fn(T0, c, w, t)
    (T * weights).sum().backward()
    return T.detach(), w.grad, t.grad


@pytest.mark.parametrize("angle", ANGLES)
def test_so3_exp_vjp_is_autograds_gradient(angle):
    w = _rotation_vectors(angle, 5, seed=1)
    grad_R = torch.randn(5, 3, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    w_ref = w.clone().requires_grad_(True)
    (so3_exp(w_ref) * grad_R).sum().backward()
    got = so3_exp_vjp(w, so3_exp(w), grad_R)
    torch.testing.assert_close(got, w_ref.grad, rtol=1e-9, atol=1e-12)


def test_so3_exp_vjp_against_finite_differences_at_a_generic_angle():
    """Independent of autograd: central differences of <grad_R, exp(w)>."""
    w = _rotation_vectors(1.1, 1, seed=3)[0]
    grad_R = torch.randn(3, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    h = 1e-6
    fd = torch.stack(
        [
            ((so3_exp(w + h * e) * grad_R).sum() - (so3_exp(w - h * e) * grad_R).sum()) / (2 * h)
            for e in torch.eye(3, dtype=F64)
        ]
    )
    torch.testing.assert_close(so3_exp_vjp(w, so3_exp(w), grad_R), fd, rtol=1e-7, atol=1e-9)


def test_so3_exp_vjp_at_zero_is_the_axial_vector():
    """At w = 0, exp(d) = I + [d]x: the gradient is the axial vector of grad_R."""
    G = torch.randn(3, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    expected = torch.stack([G[2, 1] - G[1, 2], G[0, 2] - G[2, 0], G[1, 0] - G[0, 1]])
    assert torch.equal(so3_exp_vjp(torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64), G), expected)


def _native_pose_about(T0, c, w, t):
    """pose_about on the native path (the test fails rather than fall back to another path)."""
    T = pose_chain.pose_about(T0, c, w, t)
    assert T is not None, "the native pose chain did not take these inputs"
    return T


# the fast paths against the reference: written (ATen operations, the same forward bit for bit; the
# GPU's path) and native (the extension, the CPU's: the same arithmetic, values to rounding)
FAST = [
    pytest.param(pose_about_written, True, id="written"),
    pytest.param(_native_pose_about, False, id="native", marks=needs_native),
]


def _assert_values(T, T_ref, exact: bool):
    if exact:
        assert torch.equal(T, T_ref)  # the same forward operations
    else:
        torch.testing.assert_close(T, T_ref, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("fast,exact", FAST)
@pytest.mark.parametrize("angle", ANGLES)
def test_pose_about_equals_the_reference_in_values_and_gradients(angle, fast, exact):
    T0, c = _poses(4, seed=6), torch.tensor([12.0, -40.0, 85.0], dtype=F64)
    w = _rotation_vectors(angle, 4, seed=7)
    t = torch.randn(4, 3, generator=torch.Generator().manual_seed(8), dtype=F64) * 5
    weights = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(9), dtype=F64)
    T_ref, gw_ref, gt_ref = _grads(pose_about_reference, T0, c, w, t, weights)
    T, gw, gt = _grads(fast, T0, c, w, t, weights)
    _assert_values(T, T_ref, exact)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gt, gt_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fast,exact", FAST)
def test_pose_about_broadcasts_one_start_over_a_batch_of_twists(fast, exact):
    """The curvature's layout: one start (1, 4, 4), 13 twists; and a single twist (3,) on one start;
    one start (4, 4) for a batch of twists (the gradients' layout)."""
    T0, c = _poses(1, seed=10), torch.tensor([0.5, 3.0, -7.0], dtype=F64)
    w = _rotation_vectors(0.004, 13, seed=11)
    t = torch.randn(13, 3, generator=torch.Generator().manual_seed(12), dtype=F64)
    weights = torch.randn(13, 4, 4, generator=torch.Generator().manual_seed(13), dtype=F64)
    for args, wts in (((T0, c, w, t), weights), ((T0[0], c, w[0], t[0]), weights[0]), ((T0[0], c, w, t), weights)):
        T_ref, gw_ref, gt_ref = _grads(pose_about_reference, *args, wts)
        T, gw, gt = _grads(fast, *args, wts)
        _assert_values(T, T_ref, exact)
        assert gw.shape == args[2].shape and gt.shape == args[3].shape
        torch.testing.assert_close(gw, gw_ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(gt, gt_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fast,exact", FAST)
def test_pose_about_gradcheck(fast, exact):
    T0, c = _poses(2, seed=14), torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    w = _rotation_vectors(0.7, 2, seed=15).requires_grad_(True)
    t = torch.randn(2, 3, generator=torch.Generator().manual_seed(16), dtype=F64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w, t: fast(T0, c, w, t), (w, t))


@needs_native
@pytest.mark.parametrize("batched", [False, True])
def test_native_pose_about_is_exactly_the_start_at_a_zero_twist(batched):
    """Every level starts, and every Newton step takes its gradient, at twist zero: the pose is the start
    itself, as the reference's, bit for bit."""
    T0, c = _poses(3, seed=21), torch.tensor([31.0, -7.5, 120.25], dtype=F64)
    w = torch.zeros(3, 3, dtype=F64, requires_grad=True)
    if not batched:
        T0, w = T0[0], w[0].detach().requires_grad_(True)
    T = pose_about(T0, c, w, w)
    assert torch.equal(T, T0) and torch.equal(T, pose_about_reference(T0, c, w, w))


@needs_native
def test_pose_about_takes_the_native_path_on_a_cpu_and_the_written_one_without_it(monkeypatch):
    T0, c = _poses(2, seed=22), torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    w, t = _rotation_vectors(0.9, 2, seed=23), torch.ones(2, 3, dtype=F64)
    assert torch.equal(pose_about(T0, c, w, t), pose_chain.pose_about(T0, c, w, t))
    monkeypatch.setitem(native._STATE, "module", None)  # as where the extension cannot be built
    assert pose_chain.pose_about(T0, c, w, t) is None
    assert torch.equal(pose_about(T0, c, w, t), pose_about_reference(T0, c, w, t))


@needs_native
def test_native_pose_about_declines_what_it_does_not_compute():
    """float32, a start or centre needing gradients, starts that do not match the twists: None (the
    callers then compute the reference's operations)."""
    T0, c = _poses(2, seed=24), torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    w, t = _rotation_vectors(0.3, 2, seed=25), torch.zeros(2, 3, dtype=F64)
    assert pose_chain.pose_about(T0.float(), c.float(), w.float(), t.float()) is None
    assert pose_chain.pose_about(T0.clone().requires_grad_(True), c, w, t) is None
    assert pose_chain.pose_about(T0, c.clone().requires_grad_(True), w, t) is None
    assert pose_chain.pose_about(_poses(3, seed=26), c, w, t) is None
    assert pose_chain.pose_about(T0, c, w, t[0]) is None


def test_gradients_of_the_start_and_centre_go_through_the_reference():
    """T0 or c that need gradients (not the refinement's case) get them, from the reference path."""
    T0 = _poses(1, seed=17).requires_grad_(True)
    c = torch.tensor([4.0, 5.0, 6.0], dtype=F64, requires_grad=True)
    w = _rotation_vectors(0.2, 1, seed=18).requires_grad_(True)
    t = torch.zeros(1, 3, dtype=F64, requires_grad=True)
    pose_about(T0, c, w, t).sum().backward()
    T0_ref, c_ref = T0.detach().clone().requires_grad_(True), c.detach().clone().requires_grad_(True)
    pose_about_reference(T0_ref, c_ref, w.detach(), t.detach()).sum().backward()
    assert torch.equal(T0.grad, T0_ref.grad) and torch.equal(c.grad, c_ref.grad)


def test_without_gradients_the_values_are_the_references():
    T0, c = _poses(3, seed=19), torch.tensor([1.0, -1.0, 2.0], dtype=F64)
    w, t = _rotation_vectors(1.3, 3, seed=20), torch.ones(3, 3, dtype=F64)
    with torch.no_grad():
        assert torch.equal(pose_about_written(T0, c, w, t), pose_about_reference(T0, c, w, t))
        torch.testing.assert_close(pose_about(T0, c, w, t), pose_about_reference(T0, c, w, t), rtol=1e-13, atol=1e-12)
    assert torch.equal(pose_about_written(T0, c, w, t), pose_about_reference(T0, c, w, t))
    # with and without gradients the same path: the same values
    assert torch.equal(pose_about(T0, c, w, t), pose_about(T0, c, w.clone().requires_grad_(True), t))
