"""The native pose chain's T_index_from_cam against the reference (renderer.index_from_cam_reference):
values, gradients, the singular rotations, and what it declines. Its twist (pose_about) is tested with
the other paths of geometry/twist.py (test/core/geometry/test_twist.py)."""

import math

import pytest
import torch

from mvreg_ros.core.geometry.transforms import make_T, se3_exp, so3_exp
from mvreg_ros.core.rendering import native, pose_chain
from mvreg_ros.core.rendering.renderer import index_from_cam, index_from_cam_reference

F64 = torch.float64
pytestmark = pytest.mark.skipif(native.load() is None, reason="the native extension cannot be built here")


def _index_from_ct() -> torch.Tensor:
    """A volume's T_index_from_ct: anisotropic spacing (1 / 0.7, 1 / 0.7, 1 / 2.5 voxels per mm), an offset."""
    A = torch.diag(torch.tensor([1 / 0.7, 1 / 0.7, 1 / 2.5, 1.0], dtype=F64))
    A[:3, 3] = torch.tensor([256.0, 240.0, 66.5], dtype=F64)
    return A


def _cams(n: int, seed: int, angle: float | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xi = torch.randn(n, 6, generator=g, dtype=F64) * torch.tensor([1, 1, 1, 300, 300, 300], dtype=F64)
    T = se3_exp(xi)
    if angle is not None:  # rotations of exactly this angle
        axis = torch.randn(n, 3, generator=g, dtype=F64)
        T = make_T(so3_exp(axis / axis.norm(dim=-1, keepdim=True) * angle), T[:, :3, 3])
    return T


def _value_and_grad(fn, A, T, weights):
    T = T.clone().requires_grad_(True)
    out = fn(A, T)
    (out * weights).sum().backward()
    return out.detach(), T.grad


@pytest.mark.parametrize("angle", [None, 0.0, math.pi / 2, math.pi])
def test_index_from_cam_equals_the_reference_in_values_and_gradients(angle):
    A, T = _index_from_ct(), _cams(6, seed=1, angle=angle)
    weights = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    out, grad = _value_and_grad(index_from_cam, A, T, weights)
    out_ref, grad_ref = _value_and_grad(index_from_cam_reference, A, T, weights)
    assert out.shape == (6, 3, 4)
    torch.testing.assert_close(out, out_ref, rtol=1e-13, atol=1e-11)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-11)
    assert torch.equal(grad[:, 3], torch.zeros(6, 4, dtype=F64))  # the constant last row gets none


def test_index_from_cam_of_the_identity_is_t_index_from_ct():
    A = _index_from_ct()
    assert torch.equal(index_from_cam(A, torch.eye(4, dtype=F64)[None]), A[None, :3])


def test_index_from_cam_gradcheck():
    A = _index_from_ct()
    T = _cams(2, seed=3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda T: pose_chain.index_from_cam(A, T), (T,))


def test_index_from_cam_takes_the_reference_where_the_native_path_does_not_apply(monkeypatch):
    A, T = _index_from_ct(), _cams(2, seed=4)
    assert pose_chain.index_from_cam(A.float(), T.float()) is None
    assert pose_chain.index_from_cam(A.clone().requires_grad_(True), T) is None
    assert pose_chain.index_from_cam(A, T[0]) is None
    torch.testing.assert_close(index_from_cam(A.float(), T.float()), index_from_cam_reference(A.float(), T.float()))
    monkeypatch.setitem(native._STATE, "module", None)  # as where the extension cannot be built
    assert torch.equal(index_from_cam(A, T), index_from_cam_reference(A, T))


def test_the_kernels_name_bad_inputs():
    kernel = native.load()
    with pytest.raises(ValueError, match="T_cam_from_ct must be a contiguous float64"):
        kernel.index_from_cam_forward(_index_from_ct()[None], _cams(2, seed=5).float())
    with pytest.raises(ValueError, match="T0 .* do not match"):
        z = torch.zeros(2, 3, dtype=F64)
        kernel.pose_about_forward(torch.eye(4, dtype=F64).repeat(3, 1, 1), torch.zeros(1, 3, dtype=F64), z, z)
