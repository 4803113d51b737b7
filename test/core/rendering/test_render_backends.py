"""The fast renderer backends (native C++ kernel, compiled gather kernel) against grid_sample,
their reference: values and gradients, at the integrator level and through ``Renderer``."""

import dataclasses
import platform

import pytest
import torch

from mvreg_ros.core.geometry import transforms as geometry
from mvreg_ros.core.imaging.volume import load_example_ct
from mvreg_ros.core.rendering import gather as render_gather
from mvreg_ros.core.rendering import native as render_native
from mvreg_ros.core.rendering.native import sample_sums
from mvreg_ros.core.rendering.renderer import (
    Renderer,
    integrate,
    integrate_gather,
    integrate_native,
    make_rays,
    pad_volume,
    pixel_grid,
    ray_directions,
    ray_samples,
    ray_transforms,
    rays_to_samples,
    resolve_backend,
)
from mvreg_ros.core.rendering.renderer import render_native as render_with_torch_set_up

needs_native = pytest.mark.skipif(render_native.load() is None, reason="the native kernel cannot be built here")


def _setup():
    ct = load_example_ct(downsample=8)
    K = geometry.intrinsics(sdd_mm=1000, pixel_spacing_mm=6.0, height=24, width=20).expand(2, 3, 3)
    R = geometry.so3_exp(torch.tensor([[0.2, -0.1, 0.3], [0.0, 1.4, 0.1]], dtype=torch.float64))
    T = geometry.make_T(R, torch.tensor([[5.0, -3.0, 650.0], [-8.0, 2.0, 700.0]], dtype=torch.float64))
    T = T @ geometry.translation(-ct.centre_ct())
    return ct, K, T


@pytest.mark.parametrize("integrator", [integrate_gather, pytest.param(integrate_native, marks=needs_native)])
@pytest.mark.parametrize("n_samples", [40, 37, 1])  # 37 and 1: partial SIMD blocks
def test_integrator_equals_grid_sample_values_and_gradients(integrator, n_samples):
    ct, K, T = _setup()
    r = Renderer(ct, backend="grid_sample")
    x = torch.zeros(2, 6, dtype=torch.float64, requires_grad=True)
    rays = make_rays(
        r.T_index_from_ct, r.shape_ijk, geometry.se3_exp(x) @ T, K, pixel_grid(24, 20, dtype=torch.float64)
    )
    a = integrate(r.data, rays, n_samples)
    b = integrator(pad_volume(r.data), rays, n_samples)
    assert a.abs().max() > 0.5
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # float32 sample positions
    w = torch.randn(a.shape, generator=torch.Generator().manual_seed(0), dtype=a.dtype)
    (ga,) = torch.autograd.grad((a * w).sum(), x, retain_graph=True)
    (gb,) = torch.autograd.grad((b * w).sum(), x)
    torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("backend", ["compiled", pytest.param("native", marks=needs_native)])
def test_fast_renderer_equals_grid_sample_renderer(backend):
    ct, K, T = _setup()
    x = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    outs, grads = [], []
    for b in ("grid_sample", backend):
        renderer = Renderer(ct, backend=b)
        img = renderer(geometry.se3_exp(x) @ T, K, 24, 20, n_samples=32)
        assert renderer.backend == b  # no silent fallback from the fast path
        (g,) = torch.autograd.grad(img.pow(2).sum(), x)
        outs.append(img.detach())
        grads.append(g)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-3)


def test_gpu_backends_on_cuda_equal_the_cpu_reference_in_values_and_gradients(cuda_device):
    """The GPU's default path (``compiled`` on CUDA, the backend ``auto`` picks there) and the ATen
    reference on CUDA render the images, and give the pose gradients, of the reference on the CPU."""
    ct, K, T = _setup()
    imgs, grads = [], []
    for backend, device in (("grid_sample", torch.device("cpu")), ("auto", cuda_device), ("grid_sample", cuda_device)):
        x = torch.zeros(6, dtype=torch.float64, device=device, requires_grad=True)
        renderer = Renderer(ct, backend=backend, device=device)
        img = renderer(geometry.se3_exp(x) @ T.to(device), K.to(device), 24, 20, n_samples=32)
        assert img.device.type == device.type
        assert renderer.backend == ("compiled" if backend == "auto" else backend)  # auto on CUDA: compiled
        (g,) = torch.autograd.grad(img.pow(2).sum(), x)
        imgs.append(img.detach().cpu())
        grads.append(g.cpu())
    assert imgs[0].abs().max() > 0.5
    for img, g in zip(imgs[1:], grads[1:]):
        torch.testing.assert_close(img, imgs[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(g, grads[0], rtol=1e-3, atol=1e-3)


SUMS = [render_gather.sample_sums, pytest.param(sample_sums, marks=needs_native)]


@pytest.mark.parametrize("sums", SUMS)
def test_sums_analytic_on_a_linear_volume(sums):
    """f(x, y, z) = 2x + 3y - z is reproduced exactly by trilinear interpolation: the sum and
    both gradient sums have closed forms."""
    z, y, x = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), torch.arange(8.0), indexing="ij")
    vol = (2 * x + 3 * y - z).contiguous()
    p0 = torch.tensor([[1.2, 1.5, 1.1], [6.4, 5.0, 4.2]], requires_grad=True)
    q = torch.tensor([[0.05, 0.08, 0.06], [-0.1, -0.07, -0.05]], requires_grad=True)
    S = 37
    k = torch.arange(S, dtype=torch.float32)
    pts = p0.detach()[:, None] + k[:, None] * q.detach()[:, None]
    expected = (2 * pts[..., 0] + 3 * pts[..., 1] - pts[..., 2]).sum(-1)
    f = sums(vol, p0, q, S)
    torch.testing.assert_close(f, expected, rtol=1e-5, atol=1e-3)
    gp, gq = torch.autograd.grad(f.sum(), (p0, q))
    grad_f = torch.tensor([2.0, 3.0, -1.0])
    torch.testing.assert_close(gp, (S * grad_f).expand(2, 3))
    torch.testing.assert_close(gq, (k.sum() * grad_f).expand(2, 3))


@pytest.mark.parametrize("sums", SUMS)
def test_sums_clamp_like_border_padding_with_zero_gradient_outside(sums):
    vol = torch.arange(27.0).reshape(3, 3, 3)
    p0 = torch.tensor([[-5.0, 1.0, 1.0]], requires_grad=True)  # x below the box: clamped to x = 0
    q = torch.zeros(1, 3, requires_grad=True)
    f = sums(vol, p0, q, 4)
    torch.testing.assert_close(f, 4 * torch.tensor([vol[1, 1, 0]]))
    (gp,) = torch.autograd.grad(f.sum(), p0)
    assert gp[0, 0] == 0 and gp[0, 1] == 4 * 3.0 and gp[0, 2] == 4 * 9.0


@needs_native
def test_native_and_gather_sums_agree_with_their_gradient_sums():
    gen = torch.Generator().manual_seed(2)
    vol = torch.rand(7, 9, 12, generator=gen)
    p0 = torch.rand(40, 3, generator=gen) * torch.tensor([12.0, 9.0, 7.0]) - 0.5
    q = torch.randn(40, 3, generator=gen) * 0.15
    for n in (1, 23):
        want = render_gather.gather_sums(vol, p0, q, n, True)
        got = render_native.load().sample_sums(vol, p0, q, n, True)
        for a, b in zip(want, got):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("sums", SUMS)
def test_sums_never_read_past_the_volume(sums):
    """Float32 cannot hold N - 1 - eps for N > 2048: the cell index itself is clamped. The volume is
    a view followed by NaN memory, so a read past its end would show."""
    storage = torch.full((2100 * 9 + 64,), float("nan"))
    vol = storage[: 2100 * 9].view(2100, 3, 3)
    vol.copy_(torch.rand(2100, 3, 3, generator=torch.Generator().manual_seed(0)))
    p0 = torch.tensor([[1.0, 1.0, 5000.0], [2.0, 2.0, 2099.0], [0.5, 0.5, float("nan")]], requires_grad=True)
    q = torch.zeros(3, 3)
    f = sums(vol, p0, q, 4)
    torch.testing.assert_close(f.detach(), 4 * torch.stack([vol[2099, 1, 1], vol[2099, 2, 2], vol[0, 0:2, 0:2].mean()]))
    (g,) = torch.autograd.grad(f.sum(), p0)
    assert bool(torch.isfinite(g).all())


@pytest.mark.parametrize("sums", SUMS)
def test_sums_refuse_volume_gradients_and_second_derivatives(sums):
    vol = torch.rand(4, 4, 4)
    p0 = torch.rand(3, 3, requires_grad=True)
    q = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="volume"):
        sums(vol.requires_grad_(), p0, q, 4)
    (g,) = torch.autograd.grad(sums(vol.detach(), p0, q, 4).sum(), p0, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), p0)


def _planar(x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., 3) stored coordinate after coordinate, as the renderer's set-up makes it."""
    return x.movedim(-1, 0).contiguous().movedim(0, -1)


@needs_native
@pytest.mark.parametrize("layout", ["contiguous", "planar"])
def test_native_custom_ops_pass_opcheck(layout):
    vol = torch.rand(5, 6, 7)
    p0, q = torch.rand(2, 4, 3) * 4, torch.rand(2, 4, 3) * 0.1
    if layout == "planar":
        p0, q = _planar(p0), _planar(q)
    torch.library.opcheck(torch.ops.mvreg.trilinear_sums.default, (vol, p0, q, 5))
    torch.library.opcheck(torch.ops.mvreg.trilinear_sums_with_grad.default, (vol, p0.requires_grad_(), q, 5))


@needs_native
def test_native_sums_are_the_same_for_every_input_layout():
    """Contiguous, planar and strided rays give the same sums and gradient sums; G and H come back
    planar (coordinate after coordinate), the layout the compiled set-up's backward reads."""
    gen = torch.Generator().manual_seed(5)
    vol = torch.rand(9, 10, 11, generator=gen)
    p0 = torch.rand(2, 37, 3, generator=gen) * 9  # 37 rays per view: a partial SIMD block
    q = torch.randn(2, 37, 3, generator=gen) * 0.2
    kernel = render_native.load().sample_sums
    want = kernel(vol, p0, q, 19, True)
    wide = torch.zeros(2, 74, 3)
    wide[:, ::2] = p0
    for a, b in ((_planar(p0), _planar(q)), (wide[:, ::2], q)):
        got = kernel(vol, a, b, 19, True)
        for x, y in zip(want, got):
            assert torch.equal(x, y)
    f, g, h = want
    assert f.shape == (2, 37) and g.shape == h.shape == (2, 37, 3)
    assert g.stride() == h.stride() == (37, 1, 74)  # planar


@needs_native
def test_native_rejects_bad_inputs():
    vol = torch.zeros(4, 4, 4)
    p = torch.zeros(5, 3)
    with pytest.raises(ValueError, match="float32"):
        sample_sums(vol.double(), p, p, 8)
    with pytest.raises(ValueError, match="same shape"):
        sample_sums(vol, p, torch.zeros(4, 3), 8)
    with pytest.raises(ValueError, match="n_samples"):
        sample_sums(vol, p, p, 0)


def test_auto_backend_choice():
    native = render_native.load() is not None
    assert resolve_backend("auto", "cpu", torch.float32) == ("native" if native else "compiled")
    assert resolve_backend("native", "cpu", torch.float64) == "compiled"  # the kernel is float32
    assert resolve_backend("native", "meta", torch.float32) == "compiled"  # CPU only
    assert resolve_backend("grid_sample", "cpu", torch.float32) == "grid_sample"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("warp-drive", "cpu", torch.float32)


def test_native_build_failure_falls_back_to_compiled(monkeypatch):
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        assert render_native._build() is None
    monkeypatch.setitem(render_native._STATE, "module", None)
    assert resolve_backend("auto", "cpu", torch.float32) == "compiled"
    assert Renderer(load_example_ct(downsample=8)).backend == "compiled"


def test_more_shape_variants_than_dynamos_default_limit_all_compile():
    """A long-running process renders many compiled variants (sample counts are static); past
    Dynamo's default recompile limit (8) they would silently run uncompiled. Nine variants: nine
    compiled graphs, none left eager."""
    from torch._dynamo.utils import counters

    from mvreg_ros.core.rendering.renderer import RECOMPILE_LIMIT

    ct, K, T = _setup()
    torch._dynamo.reset()  # graphs compiled by earlier tests would be reused and not counted
    r = Renderer(ct, backend="compiled")
    before = counters["stats"]["unique_graphs"]
    for n in range(9):
        with torch.no_grad():
            img = r(T[:1], K[:1], 6, 5, n_samples=4 + n)
        assert img.shape == (1, 6, 5)
    assert counters["stats"]["unique_graphs"] - before == 9
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT


@pytest.mark.parametrize("backend", [pytest.param("native", marks=needs_native), "compiled"])
def test_image_sizes_and_view_counts_share_one_compiled_graph(backend):
    """The view count and the ray count are sizes of the compiled kernels (mark_batch_dynamic):
    every image size and view count above one renders through one graph, as the reference does.
    The native backend compiles nothing (its set-up is C++)."""
    from torch._dynamo.utils import counters

    ct, K, T = _setup()
    T3, K3 = T.repeat(2, 1, 1)[:3], K.repeat(2, 1, 1)[:3]
    torch._dynamo.reset()
    r = Renderer(ct, backend=backend)
    ref = Renderer(ct, backend="grid_sample")
    before = counters["stats"]["unique_graphs"]
    for views, (h, w) in ((2, (6, 5)), (3, (9, 7)), (2, (12, 4)), (3, (5, 11))):
        with torch.no_grad():
            img = r(T3[:views], K3[:views], h, w, n_samples=5)
        assert img.shape == (views, h, w)
        torch.testing.assert_close(img, ref(T3[:views], K3[:views], h, w, n_samples=5), rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] - before == (1 if backend == "compiled" else 0)


@pytest.mark.parametrize("backend", [pytest.param("native", marks=needs_native), "compiled"])
def test_a_volume_of_another_size_compiles_nothing(backend):
    """The compiled kernels take the volume's size as data (a new patient's CT, a big CT pooled
    differently): a second volume of another shape reuses the graph, and renders what the
    grid_sample reference renders (the native backend compiles nothing at all)."""
    from torch._dynamo.utils import counters

    ct, K, T = _setup()
    other = ct.resampled(2)
    assert other.shape_ijk != ct.shape_ijk
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        Renderer(ct, backend=backend)(T, K, 7, 6, n_samples=5)
        img = Renderer(other, backend=backend)(T, K, 7, 6, n_samples=5)
    assert counters["stats"]["unique_graphs"] - before == (1 if backend == "compiled" else 0)
    ref = Renderer(other, backend="grid_sample")(T, K, 7, 6, n_samples=5)
    torch.testing.assert_close(img, ref, rtol=1e-4, atol=1e-4)


@needs_native
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction sets")
@pytest.mark.parametrize("march,isa", [("x86-64-v3", "avx2"), ("x86-64", "scalar")])
def test_every_instruction_set_build_gives_the_same_sums(march, isa):
    """The AVX2 and scalar builds (other CPUs) against this CPU's build: sums and gradient sums."""
    if isa == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    other = render_native.build(f"{render_native.extension_name()}_test_{isa}", march)
    assert other.isa == isa
    gen = torch.Generator().manual_seed(5)
    vol = torch.rand(9, 11, 13, generator=gen)
    p0 = (torch.rand(50, 3, generator=gen) * torch.tensor([13.0, 11.0, 9.0]) - 1).contiguous()  # some outside the box
    p0[0, 1] = float("nan")  # NaN coordinates clamp to 0 in every build (undefined behaviour if not handled)
    p0[1] = torch.tensor([1e6, -1e6, 1e9])
    q = (torch.randn(50, 3, generator=gen) * 0.2).contiguous()
    for n in (1, 19, 64):
        want = render_native.load().sample_sums(vol, p0, q, n, True)
        for v in (vol, vol.half()):  # a float16 volume: the same sums as float32 of its values, in every build
            got = other.sample_sums(v, p0, q, n, True)
            for a, b in zip(want if v is vol else render_native.load().sample_sums(v.float(), p0, q, n, True), got):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@needs_native
def test_native_float16_volume_gives_the_sums_of_its_float32_values():
    """A float16 volume is read as the float32 of its values: the same sums and gradient sums, bit
    for bit, as the float32 copy of the rounded volume."""
    gen = torch.Generator().manual_seed(7)
    half = (torch.rand(12, 15, 17, generator=gen) * 0.05).half()
    p0 = torch.rand(2, 45, 3, generator=gen) * torch.tensor([17.0, 15.0, 12.0]) - 1
    q = torch.randn(2, 45, 3, generator=gen) * 0.3
    kernel = render_native.load().sample_sums
    for grad in (False, True):
        for a, b in zip(kernel(half.float(), p0, q, 23, grad), kernel(half, p0, q, 23, grad)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="float32 or float16"):
        kernel(half.double(), p0, q, 23, False)


@pytest.mark.parametrize("integrator", [integrate_gather, pytest.param(integrate_native, marks=needs_native)])
def test_integrators_reject_no_samples(integrator):
    ct, K, T = _setup()
    r = Renderer(ct, backend="grid_sample")
    rays = make_rays(r.T_index_from_ct, r.shape_ijk, T, K, pixel_grid(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="n_samples"):
        integrator(pad_volume(r.data), rays, 0)


@pytest.mark.parametrize("pose", ["oblique", "axis_aligned"])
def test_ray_samples_equal_the_make_rays_reference_in_values_and_gradients(pose):
    """The compiled set-up (:func:`ray_samples`, one coordinate at a time, pointwise in the rays) and
    its reference (:func:`make_rays`): the same first samples, steps and spacings, and the same
    gradients with respect to the pose, for rays through the box, rays that miss it, and rays
    parallel to the volume's axes (the division guard of the clipping)."""
    ct, K, T = _setup()
    r = Renderer(ct, backend="grid_sample")
    if pose == "axis_aligned":  # the principal rays along the volume's axes: direction components exactly 0
        T = geometry.translation(torch.tensor([0.0, 0.0, 700.0], dtype=torch.float64)) @ geometry.translation(
            -ct.centre_ct()
        )
        T = T.expand(2, 4, 4)
    K = K.clone()
    K[1, 0, 2] += 400.0  # the second view looks past the volume: some rays miss the box
    pixels = pixel_grid(24, 20, dtype=torch.float64)
    x = torch.zeros(2, 6, dtype=torch.float64, requires_grad=True)
    T_x = geometry.se3_exp(x) @ T
    want = rays_to_samples(make_rays(r.T_index_from_ct, r.shape_ijk, T_x, K, pixels), 17)
    got = ray_samples(ray_transforms(r.T_index_from_ct, T_x, len(pixels)), ray_directions(K, pixels), r.shape_ijk, 17)
    assert bool((want[2] == 0).any()) and bool((want[2] > 0).any())  # some rays miss, some cross
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-9)
    w = [torch.randn(a.shape, generator=torch.Generator().manual_seed(i), dtype=a.dtype) for i, a in enumerate(want)]
    (ga,) = torch.autograd.grad(sum((a * wi).sum() for a, wi in zip(want, w)), x, retain_graph=True)
    (gb,) = torch.autograd.grad(sum((b * wi).sum() for b, wi in zip(got, w)), x)
    torch.testing.assert_close(gb, ga, rtol=1e-10, atol=1e-8)


@needs_native
@pytest.mark.parametrize("storage", [torch.float32, torch.float16])
@pytest.mark.parametrize("pose", ["oblique", "axis_aligned"])
def test_native_set_up_in_cpp_equals_the_compiled_set_up_in_values_and_gradients(pose, storage):
    """The native backend's render (the ray set-up and its backward in C++, ``csrc/ray_setup.cpp``)
    against :func:`render_native` (the set-up of :func:`ray_samples` in torch, the kernel's sums:
    what the backend compiled before): the same images and the same gradients with respect to the
    pose, for rays through the volume, rays that miss it and rays parallel to its axes."""
    ct, K, T = _setup()
    if pose == "axis_aligned":
        T = geometry.translation(torch.tensor([0.0, 0.0, 700.0], dtype=torch.float64)) @ geometry.translation(
            -ct.centre_ct()
        )
        T = T.expand(2, 4, 4)
    K = K.clone()
    K[1, 0, 2] += 400.0  # the second view looks past the volume: some rays miss it
    r = Renderer(ct, backend="native", storage=storage)
    pixels = pixel_grid(24, 20, dtype=torch.float64)
    x = torch.zeros(2, 6, dtype=torch.float64, requires_grad=True)
    T_x = geometry.se3_exp(x) @ T
    got = r(T_x, K, 24, 20, n_samples=29).reshape(2, -1)
    want = render_with_torch_set_up(
        ray_transforms(r.T_index_from_ct, T_x, len(pixels)), ray_directions(K, pixels), r.padded, 29
    )
    assert bool((want == 0).any()) and bool((want > 0).any())  # some rays miss, some cross
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    w = torch.randn(want.shape, generator=torch.Generator().manual_seed(3), dtype=want.dtype)
    (ga,) = torch.autograd.grad((want * w).sum(), x, retain_graph=True)
    (gb,) = torch.autograd.grad((got * w).sum(), x)
    assert ga.abs().max() > 0
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6 * float(ga.abs().max()))


@needs_native
@pytest.mark.parametrize("storage", [torch.float32, torch.float16])
def test_native_render_of_close_poses_block_by_block_is_the_same_bit_for_bit(storage):
    """Renders of poses close together (a curvature's finite differences) given as (poses, views):
    the kernel runs each block of rays for every pose in turn (the same voxels, read once), and each
    image and each pose's gradient is the same, bit for bit, as in the plain order; also for an
    image whose rays do not fill whole SIMD blocks (23 x 19 px) and for any grouping that divides
    the renders."""
    ct, K, T = _setup()
    H, W = 23, 19
    K = geometry.intrinsics(sdd_mm=1000, pixel_spacing_mm=6.0, height=H, width=W).expand(2, 3, 3)
    r = Renderer(ct, backend="native", storage=storage)
    steps = torch.tensor([[0.0] * 6, [0.005, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0.5, 0]], dtype=torch.float64)
    x = steps.clone().requires_grad_(True)  # 3 poses, one twist each
    T_x = (geometry.se3_exp(x)[:, None] @ T[None]).reshape(6, 4, 4)  # (poses, views) flattened
    w = torch.randn(6, H, W, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    plain = r(T_x, K.repeat(3, 1, 1), H, W, n_samples=29)
    (g_plain,) = torch.autograd.grad((plain * w).sum(), x, retain_graph=True)
    assert bool((plain > 0).any()) and g_plain.abs().max() > 0
    for poses in (3, 2, 6):
        got = r(T_x, K.repeat(3, 1, 1), H, W, n_samples=29, poses=poses)
        (g,) = torch.autograd.grad((got * w).sum(), x, retain_graph=True)
        assert torch.equal(got, plain) and torch.equal(g, g_plain), poses
    for bad in (4, 0, True, 1.0):
        with pytest.raises(ValueError, match="poses"):
            r(T_x, K.repeat(3, 1, 1), H, W, poses=bad)
    Ti = r.T_index_from_ct.expand(6, 4, 4)[:, :3].contiguous()
    d = ray_directions(K.repeat(3, 1, 1), pixel_grid(H, W, dtype=torch.float64))
    with pytest.raises(ValueError, match="poses"):  # the kernel's own check
        render_native.load().render_rays(Ti, d, r.padded, 5, False, 4)


@needs_native
def test_native_render_rejects_bad_inputs():
    ct, K, _ = _setup()
    r = Renderer(ct, backend="native")
    d = ray_directions(K, pixel_grid(4, 3, dtype=torch.float64))
    Ti = r.T_index_from_ct.expand(2, 4, 4)[:, :3].contiguous()
    with pytest.raises(ValueError, match="float64"):
        render_native.render_rays(Ti.float(), d, r.padded, 5)
    with pytest.raises(ValueError, match="d_cam"):
        render_native.render_rays(Ti, d[:, :1], r.padded, 5)
    with pytest.raises(ValueError, match="n_samples"):
        render_native.render_rays(Ti, d, r.padded, 0)


@pytest.mark.parametrize("backend", ["compiled", pytest.param("native", marks=needs_native)])
def test_renderer_follows_new_intrinsics_and_pixels(backend):
    """The renderer keeps the rays' directions while the intrinsics and pixels stay the same: a
    render with other intrinsics or other pixels after it is that of a fresh renderer."""
    ct, K, T = _setup()
    renderer = Renderer(ct, backend=backend)
    K2 = K.clone()
    K2[:, 0, 0] *= 1.1
    px = pixel_grid(24, 20, dtype=torch.float64)[::7]
    renderer(T, K, 24, 20, n_samples=16)
    for kw in ({"K": K2}, {"K": K, "pixels": px}, {"K": K2, "pixels": px}):
        got = renderer(T, kw["K"], 24, 20, pixels=kw.get("pixels"), n_samples=16)
        want = Renderer(ct, backend=backend)(T, kw["K"], 24, 20, pixels=kw.get("pixels"), n_samples=16)
        assert torch.equal(got, want)


@needs_native
def test_renderer_with_float16_storage_renders_the_rounded_volume():
    """``storage=torch.float16`` (the refinement's default, ``RefineConfig.volume_storage``): the
    native backend renders the volume rounded to float16 once, with float32 arithmetic; the same
    images and gradients as a float32 renderer of the rounded volume, and close to the float32
    volume's (the rounding is about 5e-4 relative)."""
    ct, K, T = _setup()
    rounded = dataclasses.replace(ct, data=ct.data.half().float())
    x = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    imgs, grads = [], []
    for volume, storage in ((ct, torch.float16), (rounded, None), (ct, None)):
        r = Renderer(volume, backend="native", storage=storage)
        assert r.padded.dtype == (storage or torch.float32)
        img = r(geometry.se3_exp(x) @ T, K, 24, 20, n_samples=32)
        (g,) = torch.autograd.grad(img.pow(2).sum(), x)
        imgs.append(img.detach())
        grads.append(g)
    assert torch.equal(imgs[0], imgs[1]) and torch.equal(grads[0], grads[1])
    torch.testing.assert_close(imgs[0], imgs[2], rtol=2e-3, atol=1e-4)
    assert not torch.equal(imgs[0], imgs[2])  # the rounding is there
    # other backends keep float32 (the storage applies to the native kernel only)
    assert Renderer(ct, backend="compiled", storage=torch.float16).padded.dtype == torch.float32
    with pytest.raises(ValueError, match="storage"):
        Renderer(ct, backend="native", storage=torch.bfloat16)
