"""The native kernel's bricked volume (native.Bricked): the layout round-trips, and a render from it is
the plain volume's bit for bit, values and pose gradients, in every instruction-set build."""

import dataclasses
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


SHAPES = [(2, 2, 2), (2, 3, 3), (3, 5, 4), (5, 7, 11), (6, 8, 13), (9, 4, 12), (4, 9, 16)]  # (W - 1) % 3: 0, 1, 2


def _layout_index(shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (voxel, element) pair of the layout: for each brick along x and each of its 4 x-columns
    (x = 3b .. 3b + 3, within the volume), the element offset and the plain volume's flat index."""
    D, H, W = shape
    ny, nx = -(-H // 4), -(-(W - 1) // 3)
    z, y, b, c = torch.meshgrid(torch.arange(D), torch.arange(H), torch.arange(nx), torch.arange(4), indexing="ij")
    x = 3 * b + c
    keep = x < W
    z, y, b, x, c = z[keep], y[keep], b[keep], x[keep], c[keep]
    element = (((z // 2) * ny + y // 4) * nx + b) * 32 + (z % 2) * 16 + (y % 4) * 4 + c
    return element, (z * H + y) * W + x


@pytest.mark.parametrize("shape", SHAPES)
def test_bricked_round_trip_and_layout(shape):
    """Odd and whole numbers of bricks along each axis. Brick b along x holds x = 3b .. 3b + 3 (x fastest,
    then y, then z) in 32 consecutive values, one cache line: every voxel where the layout puts it."""
    vol = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))).half()
    b = render_native.bricked(vol)
    assert b.shape == shape and b.dtype == torch.float16 and b.data.ndim == 1
    assert torch.equal(render_native.unbricked(b), vol)
    D, H, W = shape
    nz, ny, nx = -(-D // 2), -(-H // 4), -(-(W - 1) // 3)
    assert b.data.numel() == (nz * ny * nx + 1) * 32  # and one spare brick
    assert b.nbytes == b.data.numel() * 2
    element, voxel = _layout_index(shape)
    assert torch.equal(b.data[element], vol.flatten()[voxel])
    assert len(element.unique()) == len(element)  # no two voxels share an element


@needs_native
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_sums_of_a_bricked_volume_are_the_plain_sums_bit_for_bit(shape):
    """The kernel's sums and gradient sums on random volumes (no replicated border that would hide a
    read of the wrong edge voxel) from positions anywhere in and beyond the box, every face clamped,
    NaN coordinates, and rays along each axis."""
    gen = torch.Generator().manual_seed(len(shape) + sum(shape))
    vol = torch.randn(*shape, generator=gen).half()
    b = render_native.bricked(vol)
    D, H, W = shape
    size = torch.tensor([W, H, D], dtype=torch.float32)
    p0 = torch.rand(77, 3, generator=gen) * (size + 2) - 1.5
    p0[0, 1] = float("nan")
    p0[1] = size - 1  # the last corner exactly
    q = torch.randn(77, 3, generator=gen) * 0.4
    q[2:5] = torch.eye(3) * 0.7  # along x, y and z: through every cell of a line
    kernel = render_native.load()
    for n in (1, 19, 40):
        for grad in (False, True):
            want = kernel.sample_sums(vol, p0, q, n, grad)
            got = kernel.sample_sums(b.data, p0, q, n, grad, list(b.shape))
            for x, y in zip(want, got):
                assert torch.equal(x, y), (shape, n, grad)


def test_bricked_rejects_what_it_cannot_hold():
    with pytest.raises(ValueError, match="float16"):
        render_native.bricked(torch.zeros(4, 4, 4))
    with pytest.raises((ValueError, TypeError)):  # TypeError: the tests' jaxtyping check comes first
        render_native.bricked(torch.zeros(4, 4).half())
    with pytest.raises(ValueError, match="at least 2"):
        render_native.bricked(torch.zeros(1, 4, 4).half())
    with pytest.raises(ValueError, match="49,152"):
        render_native.bricked(torch.zeros(2, 2, 49153).half())
    assert render_native.fits_bricks((2, 2, 49152)) and not render_native.fits_bricks((2, 2, 49153))
    assert not render_native.fits_bricks((4096, 4096, 1024))  # 2^31 values or more: not addressable in 32 bits
    with pytest.raises(ValueError, match="plain volume"):  # the sums of a bricked volume: render_rays only
        render_native.sample_sums(
            render_native.bricked(torch.zeros(3, 3, 3).half()), torch.zeros(1, 3), torch.zeros(1, 3), 4
        )


@needs_native
@pytest.mark.parametrize("poses", [1, 3])  # 3: close poses, a block of rays of every pose in turn
def test_bricked_render_is_the_plain_render_bit_for_bit(poses):
    """Images and pose gradients, for rays that do not fill whole SIMD blocks (23 x 19 px), rays that
    miss the volume, and every cell position in a brick; with the kernel's prefetch and without."""
    ct, K, T = _scene(spacing_mm=30.0)  # a field of view wider than the CT
    plain = Renderer(ct, backend="native", storage=torch.float16, layout="plain")
    bricked = Renderer(ct, backend="native", storage=torch.float16, layout="bricked")
    unprefetched = Renderer(ct, backend="native", storage=torch.float16, layout="bricked")
    unprefetched.prefetch = False
    assert isinstance(bricked.padded, render_native.Bricked) and isinstance(plain.padded, torch.Tensor)
    assert torch.equal(render_native.unbricked(bricked.padded), plain.padded)
    steps = torch.tensor([[0.0] * 6, [0.005, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0.5, 0]], dtype=torch.float64)
    w = torch.randn(6, 23, 19, generator=torch.Generator().manual_seed(1))
    out = []
    for r in (plain, bricked, unprefetched):
        x = steps.clone().requires_grad_(True)
        T_x = (geometry.se3_exp(x)[:, None] @ T[None]).reshape(6, 4, 4)
        img = r(T_x, K.repeat(3, 1, 1), 23, 19, n_samples=29, poses=poses)
        (g,) = torch.autograd.grad((img * w).sum(), x)
        out.append((img.detach(), g))
    (a, ga), (b, gb), (c, gc) = out
    assert bool((a > 0).any()) and bool((a == 0).any()) and ga.abs().max() > 0  # rays in and out of the volume
    assert torch.equal(a, b) and torch.equal(ga, gb)
    assert torch.equal(a, c) and torch.equal(ga, gc)


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
    assert other.isa == isa
    vol = torch.randn(6, 9, 13, generator=torch.Generator().manual_seed(2)).half()  # a random volume's bricks
    p0 = torch.rand(50, 3, generator=torch.Generator().manual_seed(3)) * torch.tensor([15.0, 11.0, 8.0]) - 1
    q = torch.randn(50, 3, generator=torch.Generator().manual_seed(4)) * 0.3
    b = render_native.bricked(vol)
    for grad in (False, True):
        for x, y in zip(
            other.sample_sums(vol, p0, q, 23, grad), other.sample_sums(b.data, p0, q, 23, grad, [6, 9, 13])
        ):
            assert torch.equal(x, y), isa
    ct, K, T = _scene()
    padded = pad_volume(ct.data).half()
    b = render_native.bricked(padded)
    Ti = renderer_module.index_from_cam(torch.linalg.inv(ct.T_ct_from_index.double()), T).contiguous()
    d = ray_directions(K, pixel_grid(23, 19, dtype=torch.float64))
    for kernel in (other, render_native.load()):
        plain = kernel.render_rays(Ti, d, padded, 29, True)
        got = kernel.render_rays(Ti, d, b.data, 29, True, 1, list(b.shape))
        unprefetched = kernel.render_rays(Ti, d, b.data, 29, True, 1, list(b.shape), False)
        for x, y, z in zip(plain, got, unprefetched):
            assert torch.equal(x, y) and torch.equal(x, z), isa
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
    wide = torch.zeros((2 * 1 * 16384 + 1) * 32, dtype=torch.float16)  # bricks of a (4, 4, 49153) volume
    with pytest.raises(ValueError, match="at most 49152"):  # the kernel's x / 3 would leave 31 bits
        kernel.render_rays(Ti, d, wide, 5, False, 1, [4, 4, 49153])
    with pytest.raises(ValueError, match="plain volume"):  # a plain volume with another shape
        kernel.render_rays(Ti, d, padded, 5, False, 1, [1, 2, 3])
    with pytest.raises(TypeError, match="prefetch must be a bool"):
        render_native.render_rays(Ti[:, :3], d, b, 5, prefetch=1)


@needs_native
def test_renderer_layout_choice(monkeypatch):
    ct, _, _ = _scene()
    small = Renderer(ct, backend="native", storage=torch.float16)  # "auto": a volume that fits the caches stays plain
    assert isinstance(small.padded, torch.Tensor)
    monkeypatch.setattr(renderer_module, "BRICKED_MIN_BYTES", 0)
    assert isinstance(Renderer(ct, backend="native", storage=torch.float16).padded, render_native.Bricked)
    assert isinstance(Renderer(ct, backend="native").padded, torch.Tensor)  # float32: never bricked
    assert isinstance(Renderer(ct, backend="native", storage=torch.float16, layout="plain").padded, torch.Tensor)
    wide = dataclasses.replace(
        ct, data=torch.zeros(2, 2, 49151), mask=None
    )  # padded 49,153 wide: more than the bricks hold
    assert isinstance(Renderer(wide, backend="native", storage=torch.float16).padded, torch.Tensor)
    with pytest.raises(ValueError, match="layout"):
        Renderer(ct, backend="native", storage=torch.float16, layout="tiled")
    with pytest.raises(ValueError, match="float16 storage"):
        Renderer(ct, backend="native", layout="bricked")
    with pytest.raises(ValueError, match="native backend"):
        Renderer(ct, backend="grid_sample", storage=torch.float16, layout="bricked")
