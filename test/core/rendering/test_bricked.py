"""The native kernel's bricked volume (native.Bricked): the layout round-trips, and a render from it is
the plain volume's bit for bit, values and pose gradients, in every instruction-set build."""

import platform

import pytest
import torch

from mvreg_ros.core.geometry import transforms as geometry
from mvreg_ros.core.imaging.volume import load_example_ct
from mvreg_ros.core.rendering import native as render_native
from mvreg_ros.core.rendering import renderer as renderer_module
from mvreg_ros.core.rendering.renderer import Renderer, pad_volume, pixel_grid, ray_directions
from mvreg_ros.core.rendering.subset import RaySubset

needs_native = pytest.mark.skipif(render_native.load() is None, reason="the native kernel cannot be built here")


def _scene(h: int = 23, w: int = 19, spacing_mm: float = 6.0):
    ct = load_example_ct(downsample=8)
    K = geometry.intrinsics(sdd_mm=1000, pixel_spacing_mm=spacing_mm, height=h, width=w).expand(2, 3, 3)
    R = geometry.so3_exp(torch.tensor([[0.2, -0.1, 0.3], [0.0, 1.4, 0.1]], dtype=torch.float64))
    T = geometry.make_T(R, torch.tensor([[5.0, -3.0, 650.0], [-8.0, 2.0, 700.0]], dtype=torch.float64))
    return ct, K, T @ geometry.translation(-ct.centre_ct())


@pytest.mark.parametrize("shape", [(2, 2, 2), (3, 5, 4), (5, 7, 11), (6, 8, 13), (9, 4, 16)])
def test_bricked_round_trip_and_layout(shape):
    """Odd and whole numbers of bricks along each axis (x: (W - 1) / 3 whole or not). Brick b along x
    holds x = 3b .. 3b + 3 (x fastest, then y, then z) in 32 consecutive values, one cache line."""
    vol = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))).half()
    b = render_native.bricked(vol)
    assert b.shape == shape and b.dtype == torch.float16 and b.data.ndim == 1
    assert torch.equal(render_native.unbricked(b), vol)
    D, H, W = shape
    nz, ny, nx = -(-D // 2), -(-H // 4), -(-(W - 1) // 3)
    assert b.data.numel() == (nz * ny * nx + 1) * 32  # and one spare brick
    assert b.nbytes == b.data.numel() * 2
    for z, y, x in ((0, 0, 0), (D - 1, H - 1, W - 1), (D // 2, H // 2, W // 2), (0, 1, min(3, W - 1))):
        for bx in {max(0, (x - 1) // 3), min(x // 3, nx - 1)}:  # a voxel on a brick's edge lies in two
            if not 3 * bx <= x <= 3 * bx + 3:
                continue
            i = (((z // 2) * ny + y // 4) * nx + bx) * 32 + (z % 2) * 16 + (y % 4) * 4 + (x - 3 * bx)
            assert b.data[i] == vol[z, y, x], (z, y, x, bx)


def test_bricked_rejects_what_it_cannot_hold():
    with pytest.raises(ValueError, match="float16"):
        render_native.bricked(torch.zeros(4, 4, 4))
    with pytest.raises((ValueError, TypeError)):  # TypeError: the tests' jaxtyping check comes first
        render_native.bricked(torch.zeros(4, 4).half())
    with pytest.raises(ValueError, match="at least 2"):
        render_native.bricked(torch.zeros(1, 4, 4).half())
    with pytest.raises(ValueError, match="65,536"):
        render_native.bricked(torch.zeros(2, 2, 65537).half())


@needs_native
@pytest.mark.parametrize("poses", [1, 3])  # 3: close poses, a block of rays of every pose in turn
def test_bricked_render_is_the_plain_render_bit_for_bit(poses):
    """Images and pose gradients, for rays that do not fill whole SIMD blocks (23 x 19 px), rays that
    miss the volume, and every cell position in a brick."""
    ct, K, T = _scene(spacing_mm=30.0)  # a field of view wider than the CT
    plain = Renderer(ct, backend="native", storage=torch.float16, layout="plain")
    bricked = Renderer(ct, backend="native", storage=torch.float16, layout="bricked")
    assert isinstance(bricked.padded, render_native.Bricked) and isinstance(plain.padded, torch.Tensor)
    assert torch.equal(render_native.unbricked(bricked.padded), plain.padded)
    steps = torch.tensor([[0.0] * 6, [0.005, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0.5, 0]], dtype=torch.float64)
    w = torch.randn(6, 23, 19, generator=torch.Generator().manual_seed(1))
    out = []
    for r in (plain, bricked):
        x = steps.clone().requires_grad_(True)
        T_x = (geometry.se3_exp(x)[:, None] @ T[None]).reshape(6, 4, 4)
        img = r(T_x, K.repeat(3, 1, 1), 23, 19, n_samples=29, poses=poses)
        (g,) = torch.autograd.grad((img * w).sum(), x)
        out.append((img.detach(), g))
    (a, ga), (b, gb) = out
    assert bool((a > 0).any()) and bool((a == 0).any()) and ga.abs().max() > 0  # rays in and out of the volume
    assert torch.equal(a, b) and torch.equal(ga, gb)


@needs_native
def test_bricked_render_of_a_ray_subset_is_the_plain_render_bit_for_bit():
    ct, K, T = _scene(32, 40)
    v, u = torch.meshgrid(torch.arange(32), torch.arange(40), indexing="ij")
    subset = RaySubset.from_support(torch.stack([(u - 20) ** 2 + (v - 16) ** 2 < 200, u > 9]))
    out = []
    for layout in ("plain", "bricked"):
        r = Renderer(ct, backend="native", storage=torch.float16, layout=layout)
        x = torch.zeros(6, dtype=torch.float64, requires_grad=True)
        img = subset.render(r, geometry.se3_exp(x) @ T, K, n_samples=31)
        (g,) = torch.autograd.grad(img.pow(2).sum(), x)
        out.append((img.detach(), g))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


@needs_native
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction sets")
@pytest.mark.parametrize("march,isa", [("x86-64-v3", "avx2"), ("x86-64", "scalar")])
def test_every_instruction_set_build_renders_a_bricked_volume_as_the_plain_one(march, isa):
    """The AVX2 and scalar builds (other CPUs; the same builds as test_render_backends'): a bricked
    volume gives the plain volume's sums and gradient sums bit for bit, and this CPU's build's."""
    if isa == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    other = render_native.build(f"{render_native.extension_name()}_test_{isa}", march)
    ct, K, T = _scene()
    padded = pad_volume(ct.data).half()
    b = render_native.bricked(padded)
    Ti = renderer_module.index_from_cam(torch.linalg.inv(ct.T_ct_from_index.double()), T).contiguous()
    d = ray_directions(K, pixel_grid(23, 19, dtype=torch.float64))
    for kernel in (other, render_native.load()):
        plain = kernel.render_rays(Ti, d, padded, 29, True)
        got = kernel.render_rays(Ti, d, b.data, 29, True, 1, list(b.shape))
        for x, y in zip(plain, got):
            assert torch.equal(x, y), isa
        g = torch.randn_like(plain[0])
        assert torch.equal(
            kernel.render_rays_backward(g, Ti, d, padded, *plain[1:], 29),
            kernel.render_rays_backward(g, Ti, d, b.data, *got[1:], 29, None, 0, list(b.shape)),
        )
    torch.testing.assert_close(other.render_rays(Ti, d, b.data, 29, False, 1, list(b.shape))[0], plain[0])


@needs_native
def test_kernel_checks_a_bricked_volume_and_its_shape():
    ct, K, T = _scene()
    padded = pad_volume(ct.data).half()
    b = render_native.bricked(padded)
    Ti = renderer_module.index_from_cam(torch.linalg.inv(ct.T_ct_from_index.double()), T).contiguous()
    d = ray_directions(K, pixel_grid(4, 3, dtype=torch.float64))
    kernel = render_native.load()
    with pytest.raises(ValueError, match="shape"):  # a bricked volume without its shape
        kernel.render_rays(Ti, d, b.data, 5, False)
    with pytest.raises(ValueError, match="needs at least"):  # a shape larger than the bricks hold
        kernel.render_rays(Ti, d, b.data, 5, False, 1, [b.shape[0] + 4, *b.shape[1:]])
    with pytest.raises(ValueError, match="float16"):
        kernel.render_rays(Ti, d, b.data.float(), 5, False, 1, list(b.shape))
    with pytest.raises(ValueError, match="plain volume"):  # a plain volume with another shape
        kernel.render_rays(Ti, d, padded, 5, False, 1, [1, 2, 3])


@needs_native
def test_renderer_layout_choice(monkeypatch):
    ct, _, _ = _scene()
    small = Renderer(ct, backend="native", storage=torch.float16)  # "auto": a volume that fits the caches stays plain
    assert isinstance(small.padded, torch.Tensor)
    monkeypatch.setattr(renderer_module, "BRICKED_MIN_BYTES", 0)
    assert isinstance(Renderer(ct, backend="native", storage=torch.float16).padded, render_native.Bricked)
    assert isinstance(Renderer(ct, backend="native").padded, torch.Tensor)  # float32: never bricked
    assert isinstance(Renderer(ct, backend="native", storage=torch.float16, layout="plain").padded, torch.Tensor)
    with pytest.raises(ValueError, match="layout"):
        Renderer(ct, backend="native", storage=torch.float16, layout="tiled")
    with pytest.raises(ValueError, match="float16 storage"):
        Renderer(ct, backend="native", layout="bricked")
    with pytest.raises(ValueError, match="native backend"):
        Renderer(ct, backend="grid_sample", storage=torch.float16, layout="bricked")
