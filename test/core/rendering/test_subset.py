"""RaySubset: rendering only the pixels a comparison reads gives the full render's values there, and
(native backend) the full render's pose gradient bit for bit when the pixels left out carry none."""

import pytest
import torch

from mvreg_ros.core.geometry import transforms as geometry
from mvreg_ros.core.imaging.volume import load_example_ct
from mvreg_ros.core.rendering import native as render_native
from mvreg_ros.core.rendering.renderer import Renderer, pixel_grid, ray_directions
from mvreg_ros.core.rendering.subset import RaySubset

needs_native = pytest.mark.skipif(render_native.load() is None, reason="the native kernel cannot be built here")

H, W = 48, 56  # 2688 pixels per view: more than one of the native backward's runs of 2048 rays


def _scene(h: int = H, w: int = W):
    ct = load_example_ct(downsample=8)
    K = geometry.intrinsics(sdd_mm=1000, pixel_spacing_mm=3.0, height=h, width=w).expand(2, 3, 3)
    R = geometry.so3_exp(torch.tensor([[0.2, -0.1, 0.3], [0.0, 1.4, 0.1]], dtype=torch.float64))
    T = geometry.make_T(R, torch.tensor([[5.0, -3.0, 650.0], [-8.0, 2.0, 700.0]], dtype=torch.float64))
    return ct, K, T @ geometry.translation(-ct.centre_ct())


def _support(H: int = H, W: int = W) -> torch.Tensor:
    """A disc in view 0 and a ring with a hole and a stripe in view 1 (different counts: padding)."""
    v, u = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    r2 = (u - W / 2) ** 2 + (v - H / 2) ** 2
    disc = r2 < (0.45 * H) ** 2
    ring = (r2 < (0.5 * H) ** 2) & (r2 > (0.2 * H) ** 2) | (u < 3)
    return torch.stack([disc, ring])


def test_from_support_round_trip_and_padding():
    support = _support()
    s = RaySubset.from_support(support)
    assert torch.equal(s.support(), support)
    counts = support.flatten(1).sum(1)
    assert s.index.shape == (2, int(counts.max())) and s.pixels.shape == (2, int(counts.max()), 2)
    assert s.fraction == pytest.approx(float(support.float().mean()))
    for v in range(2):
        idx = s.index[v]
        assert bool((idx[1:] >= idx[:-1]).all())  # ascending, the padding last
        real = idx[idx < H * W]
        assert len(real) == counts[v]
        assert torch.equal(s.pixels[v, : len(real)], pixel_grid(H, W, dtype=torch.float64)[real])
    assert int((s.index == H * W).sum()) == int(counts.max() - counts.min())
    with pytest.raises(ValueError, match="no pixel"):
        RaySubset.from_support(torch.zeros(2, 3, 4, dtype=torch.bool))
    with pytest.raises((ValueError, TypeError)):  # TypeError: the tests' jaxtyping check comes first
        RaySubset.from_support(support.float())


@pytest.mark.parametrize("backend", ["grid_sample", "compiled", pytest.param("native", marks=needs_native)])
@pytest.mark.parametrize("copies", [1, 3])  # one pose, or three poses close together (a curvature's batch)
@pytest.mark.parametrize("H,W", [(H, W), (64, 64)])  # 64 x 64: whole runs of 2048 pixels, and padding rays
def test_subset_render_is_the_full_render_where_read(backend, copies, H, W):
    ct, K, T = _scene(H, W)
    r = Renderer(ct, backend=backend)
    support = _support(H, W).repeat(copies, 1, 1)
    s = RaySubset.from_support(_support(H, W))
    steps = torch.tensor([[0.0] * 6, [0.005, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0.5, 0]], dtype=torch.float64)[:copies]
    x = steps.clone().requires_grad_(True)
    Kx = K.repeat(copies, 1, 1)
    weights = torch.randn(2 * copies, H, W, generator=torch.Generator().manual_seed(3)) * support

    def poses_x():
        return (geometry.se3_exp(x)[:, None] @ T[None]).reshape(2 * copies, 4, 4)

    full = r(poses_x(), Kx, H, W, n_samples=31, poses=copies)
    (g_full,) = torch.autograd.grad((full * weights).sum(), x)
    part = s.render(r, poses_x(), Kx, n_samples=31, poses=copies)
    (g_part,) = torch.autograd.grad((part * weights).sum(), x)
    assert part.shape == full.shape and bool((full[support] > 0).any())
    assert bool((part[~support] == 0).all())
    if backend == "native":  # the same rays, traced independently; the gradient summed in the same order
        assert torch.equal(part[support], full[support]) and torch.equal(g_part, g_full)
    else:  # ATen's reductions run over other shapes: the same to rounding
        torch.testing.assert_close(part[support], full[support], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g_part, g_full, rtol=1e-5, atol=1e-7)


@needs_native
def test_native_ray_index_is_checked():
    ct, K, T = _scene()
    r = Renderer(ct, backend="native")
    s = RaySubset.from_support(_support())
    with pytest.raises(ValueError, match="ray_index"):  # the pixels' shape, not the index's
        r(T, K, H, W, pixels=s.pixels, ray_index=s.index[:, :-1])
    with pytest.raises(ValueError, match="ray_index"):  # no pixels given
        r(T, K, H, W, ray_index=s.index)
    Ti, d = r.T_index_from_ct.expand(2, 4, 4)[:, :3].contiguous(), ray_directions(K, s.pixels)
    with pytest.raises(ValueError, match="int64"):
        render_native.render_rays(Ti, d, r.padded, 5, ray_index=s.index.int(), image_pixels=H * W)
    with pytest.raises(ValueError, match="image_pixels"):  # the full image's size is needed with it
        render_native.render_rays(Ti, d, r.padded, 5, ray_index=s.index)
    for bad in (s.index.flip(1).contiguous(), s.index + 1):  # descending; beyond the image (not its padding)
        out = r(T.clone().requires_grad_(True), K, H, W, pixels=s.pixels, n_samples=5, ray_index=bad)
        with pytest.raises(ValueError, match="ascending"):  # the kernel's backward refuses it
            out.sum().backward()


@pytest.mark.parametrize("backend", ["compiled", pytest.param("native", marks=needs_native)])
def test_pixels_changed_in_place_are_not_served_kept_directions(backend):
    """A subset's pixels are recognised by identity, and by their version counter: pixels changed in place
    (against the RaySubset contract) are traced anew, as a fresh renderer would."""
    ct, K, T = _scene()
    r = Renderer(ct, backend=backend)
    s = RaySubset.from_support(_support())
    pixels = s.pixels.clone()
    before = r(T, K, H, W, pixels=pixels, ray_index=s.index, n_samples=9)
    pixels[..., 0] += 3.0
    after = r(T, K, H, W, pixels=pixels, ray_index=s.index, n_samples=9)
    fresh = Renderer(ct, backend=backend)(T, K, H, W, pixels=pixels, ray_index=s.index, n_samples=9)
    assert torch.equal(after, fresh) and not torch.equal(after, before)


@pytest.mark.parametrize("backend", ["compiled", pytest.param("native", marks=needs_native)])
def test_kept_ray_directions_serve_only_their_own_pixels_and_intrinsics(backend):
    """The renderer keeps the last few sets of ray directions (a subset's pixels by identity, the full grid,
    other pixels by value): renders taking turns between more sets than it keeps, and with other
    intrinsics, are each a fresh renderer's, bit for bit."""
    ct, K, T = _scene()
    r = Renderer(ct, backend=backend)
    s = RaySubset.from_support(_support())
    K2 = K.clone()
    K2[:, 0, 0] *= 1.1
    calls = [
        lambda r, K: s.render(r, T, K, n_samples=9),
        lambda r, K: s.render(r, T.repeat(3, 1, 1), K.repeat(3, 1, 1), n_samples=9, poses=3),
        lambda r, K: s.render(r, T.repeat(2, 1, 1), K.repeat(2, 1, 1), n_samples=9),
        lambda r, K: r(T, K, H, W, n_samples=9),
        lambda r, K: r(T, K, H, W, pixels=pixel_grid(H, W, dtype=torch.float64)[::7], n_samples=9),
    ]
    for round_ in range(2):
        for i, call in enumerate(calls):
            for k in (K, K2):
                assert torch.equal(call(r, k), call(Renderer(ct, backend=backend), k)), (round_, i)


@needs_native
def test_subset_directions_are_gathered_from_the_whole_images_bit_for_bit():
    """The native renderer takes a RaySubset's ray directions from those of the whole image (kept per
    intrinsics and image size): the same values as computing them for its pixels, for every copy and
    the padding rays; a new subset of the same views computes none, other intrinsics or another image
    size do."""
    ct, K, _ = _scene()
    r = Renderer(ct, backend="native")
    s = RaySubset.from_support(_support())
    index, pixels = s._copies(3, "cpu")
    K3 = K.repeat(3, 1, 1)
    got = r._subset_directions(K3, pixels, index, H, W)
    assert torch.equal(got, ray_directions(K3, pixels))
    assert len(r._grid_directions) == 1
    other = RaySubset.from_support(_support().flip(-1))
    assert torch.equal(
        r._subset_directions(K3, other.pixels.repeat(3, 1, 1), other.index.repeat(3, 1), H, W),
        ray_directions(K3, other.pixels.repeat(3, 1, 1)),
    )
    assert len(r._grid_directions) == 1  # kept: nothing computed for the new subset
    K_other = K3.clone()
    K_other[:, 0, 0] *= 1.01
    assert torch.equal(r._subset_directions(K_other, pixels, index, H, W), ray_directions(K_other, pixels))
    small = RaySubset.from_support(_support(H - 8, W))
    assert torch.equal(
        r._subset_directions(K[:2], small.pixels, small.index, H - 8, W), ray_directions(K[:2], small.pixels)
    )
    assert len(r._grid_directions) == 3
    assert r._subset_directions(K3, pixels + 1.0, index, H, W) is None  # not the index's pixels: computed
