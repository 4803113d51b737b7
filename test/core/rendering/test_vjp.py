"""The renderer's pullbacks without autograd (native.render_rays_vjp, Renderer.render_vjp,
RaySubset.render_vjp, pose_chain's pose_about_vjp and index_from_cam_vjp): the same values and
gradients bit for bit as autograd through the same calls (their reference), and None where the path
does not apply."""

import pytest
import torch

from mvreg_ros.core.geometry import transforms as geometry
from mvreg_ros.core.imaging.volume import load_example_ct
from mvreg_ros.core.rendering import native, pose_chain
from mvreg_ros.core.rendering.renderer import Renderer
from mvreg_ros.core.rendering.subset import RaySubset

F64 = torch.float64
pytestmark = pytest.mark.skipif(native.load() is None, reason="the native extension cannot be built here")
H, W = 40, 44


def _scene(copies: int):
    """The CT pooled by 8, two views' intrinsics and ``copies`` poses close together of each."""
    ct = load_example_ct(downsample=8)
    K = geometry.intrinsics(sdd_mm=1000, pixel_spacing_mm=3.5, height=H, width=W).expand(2 * copies, 3, 3)
    R = geometry.so3_exp(torch.tensor([[0.2, -0.1, 0.3], [0.0, 1.4, 0.1]], dtype=F64))
    T = geometry.make_T(R, torch.tensor([[5.0, -3.0, 650.0], [-8.0, 2.0, 700.0]], dtype=F64))
    T = T @ geometry.translation(-ct.centre_ct())
    steps = torch.tensor([[0.0] * 6, [0.005, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0.5, 0]], dtype=F64)[:copies]
    cams = (geometry.se3_exp(steps)[:, None] @ T[None]).reshape(2 * copies, 4, 4)
    return ct, K, cams


def _support():
    v, u = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    r2 = (u - W / 2) ** 2 + (v - H / 2) ** 2
    return torch.stack([r2 < (0.45 * H) ** 2, (r2 > (0.2 * H) ** 2) | (u < 3)])  # different counts: padding


@pytest.mark.parametrize("layout", ["plain", "bricked"])
@pytest.mark.parametrize("copies", [1, 3])
@pytest.mark.parametrize("subset", [False, True])
def test_render_vjp_is_autograd_through_the_render_bit_for_bit(layout, copies, subset):
    ct, K, cams = _scene(copies)
    r = Renderer(ct, backend="native", storage=torch.float16, layout=layout)
    weights = torch.randn(2 * copies, H, W, generator=torch.Generator().manual_seed(copies))
    s = RaySubset.from_support(_support()) if subset else None

    def render(T):
        if s is None:
            return r(T, K, H, W, n_samples=29, poses=copies)
        return s.render(r, T, K, n_samples=29, poses=copies)

    T = cams.clone().requires_grad_(True)
    ref = render(T)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), T)
    if s is None:
        out, pullback = r.render_vjp(cams, K, H, W, n_samples=29, poses=copies)
    else:
        out, pullback = s.render_vjp(r, cams, K, n_samples=29, poses=copies)
    assert out.shape == (2 * copies, H, W) and not out.requires_grad
    assert torch.equal(out, ref.detach()) and bool((out > 0).any())
    assert torch.equal(pullback(weights), grad_ref)


def test_render_vjp_declines_where_the_native_path_does_not_apply():
    ct, K, cams = _scene(1)
    assert Renderer(ct, backend="grid_sample").render_vjp(cams, K, H, W, n_samples=9) is None
    s = RaySubset.from_support(_support())
    assert s.render_vjp(Renderer(ct, backend="grid_sample"), cams, K, n_samples=9) is None
    with pytest.raises(ValueError, match="K must be"):
        Renderer(ct, backend="native").render_vjp(cams, K[:1], H, W, n_samples=9)


@pytest.mark.parametrize("shape", [(3,), (1, 3), (4, 3)])
@pytest.mark.parametrize("angle", [0.0, 1.0, torch.pi])  # zero rotation and 180 degrees: the singular twists
def test_pose_about_vjp_is_the_native_autograd_pose_bit_for_bit(shape, angle):
    gen = torch.Generator().manual_seed(len(shape))
    n = shape[0] if len(shape) == 2 else 1
    T0 = geometry.se3_exp(torch.randn(n, 6, generator=gen, dtype=F64) * 0.3)
    T0 = T0[0] if len(shape) == 1 else T0
    c = torch.tensor([10.0, -20.0, 35.0], dtype=F64)
    axis = torch.randn(*shape, generator=gen, dtype=F64)
    w0 = axis / axis.norm(dim=-1, keepdim=True) * angle
    t0 = torch.randn(*shape, generator=gen, dtype=F64) * 5
    w, t = w0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
    weights = torch.randn(*shape[:-1], 4, 4, generator=gen, dtype=F64)
    ref = pose_chain.pose_about(T0, c, w, t)
    gw_ref, gt_ref = torch.autograd.grad((ref * weights).sum(), (w, t))
    T, pullback = pose_chain.pose_about_vjp(T0, c, w, t)
    assert torch.equal(T, ref.detach()) and not T.requires_grad
    gw, gt = pullback(weights)
    assert gw.shape == w.shape and torch.equal(gw, gw_ref) and torch.equal(gt, gt_ref)
    assert pose_chain.pose_about_vjp(T0.float(), c.float(), w.float(), t.float()) is None


def test_index_from_cam_vjp_is_the_native_autograd_chain_bit_for_bit():
    ct, _, cams = _scene(3)
    A = Renderer(ct, backend="native").T_index_from_ct
    weights = torch.randn(len(cams), 3, 4, generator=torch.Generator().manual_seed(4), dtype=F64)
    T = cams.clone().requires_grad_(True)
    ref = pose_chain.index_from_cam(A, T)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), T)
    out, pullback = pose_chain.index_from_cam_vjp(A, cams)
    assert torch.equal(out, ref.detach()) and torch.equal(pullback(weights), grad_ref)
    assert pose_chain.index_from_cam_vjp(A, cams[0]) is None
    assert pose_chain.index_from_cam_vjp(A.float(), cams.float()) is None
