"""Image similarities: NCC identities, masks, patches, gradient NCC."""

import pytest
import torch
import torch.nn.functional as F

from mvreg_ros.core.registration.similarity import (
    SIMILARITY_BACKENDS,
    PreparedSimilarity,
    erode,
    gradient_ncc,
    gradients,
    image_similarity,
    multiscale_ncc,
    ncc,
)
from mvreg_ros.core.rendering import native as render_native

BACKENDS = [
    "torch",
    pytest.param(
        "native",
        marks=pytest.mark.skipif(render_native.load() is None, reason="the native kernel cannot be built here"),
    ),
]


def _smooth_images(V=2, H=48, W=48, seed=0, pad=0):
    """Smooth random images (blurred noise), optionally with ``pad`` extra pixels per side."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(V, 1, H + 2 * pad + 8, W + 2 * pad + 8, generator=g)
    k = torch.ones(1, 1, 5, 5) / 25
    x = F.conv2d(F.conv2d(x, k), k)[:, 0]
    x = (x - x.mean()) / x.std()  # well-conditioned values: these tests are about the formulas
    return x[:, : H + 2 * pad, : W + 2 * pad].contiguous()


@pytest.mark.parametrize("patch", [None, 8])
def test_ncc_identities(patch):
    x = _smooth_images()
    ones = torch.ones(2)
    torch.testing.assert_close(ncc(x, x, patch=patch), ones, atol=1e-4, rtol=0)
    torch.testing.assert_close(ncc(x, 3.5 * x + 7.0, patch=patch), ones, atol=1e-4, rtol=0)
    torch.testing.assert_close(ncc(x, -x, patch=patch), -ones, atol=1e-4, rtol=0)
    torch.testing.assert_close(ncc(x, -0.2 * x + 1.0, patch=patch), -ones, atol=1e-4, rtol=0)
    y = _smooth_images(seed=1)
    s = ncc(x, y, patch=patch)
    assert s.shape == (2,) and (s.abs() < 0.9).all()
    torch.testing.assert_close(ncc(x, y, patch=patch), ncc(y, x, patch=patch), atol=1e-5, rtol=0)


def test_ncc_matches_pearson_correlation():
    x = _smooth_images(V=1)
    y = 0.5 * x + 0.3 * _smooth_images(V=1, seed=3)
    expected = torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1]
    torch.testing.assert_close(ncc(x, y)[0], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("patch", [None, 8])
def test_ncc_ignores_values_outside_the_mask(patch):
    x = _smooth_images()
    y = 2 * x + 0.1 * _smooth_images(seed=2)
    v, u = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    mask = (((u - 23.5) ** 2 + (v - 23.5) ** 2) < 20**2).float().expand(2, 48, 48)
    base = ncc(x, y, mask, patch=patch)
    x2, y2 = x.clone(), y.clone()
    outside = mask == 0
    x2[outside] = torch.rand(int(outside.sum()), generator=torch.Generator().manual_seed(5)) * 100
    y2[outside] = -50.0
    torch.testing.assert_close(ncc(x2, y2, mask, patch=patch), base, atol=1e-5, rtol=0)
    # and the mask matters: without it the corrupted pixels dominate
    assert (ncc(x2, y2, patch=patch) - base).abs().max() > 0.1


def test_patch_ncc_is_local():
    x = _smooth_images(V=1, H=32, W=32)
    y = x.clone()
    y[:, :16, :16] = 5 - 2 * x[:, :16, :16]  # one quadrant (four 8x8 patches) anti-correlated
    # global NCC mixes the quadrants; patch NCC averages 12 patches at +1 and 4 at -1 (equal weights)
    assert float(ncc(x, y, patch=8)) == pytest.approx((12 - 4) / 16, abs=1e-3)


def test_ncc_shape_check():
    with pytest.raises(ValueError, match="shapes differ"):
        ncc(torch.rand(1, 8, 8), torch.rand(1, 8, 9))


def test_ncc_numerically_robust():
    """Regression: one-pass float32 moments gave |r| >> 1 for a flat x (2.9e3 for x = 3.7) and
    ncc(x + 200, x) = 1.0027."""
    y = 100 + torch.rand(1, 36, 36, generator=torch.Generator().manual_seed(0))
    for c in (3.7, 123.456, 1000.0):
        x = torch.full_like(y, c)
        for patch in (None, 9):
            s = ncc(x, y, patch=patch)
            assert float(s.abs().max()) <= 1.0, (c, patch, s)
            assert float(s.abs().max()) < 1e-3  # no correlation with a flat image
    x = _smooth_images(V=1, H=36, W=36)
    for patch in (None, 9):
        s = float(ncc(x + 200.0, x, patch=patch))
        assert s <= 1.0 + 1e-6 and s == pytest.approx(1.0, abs=1e-4)


def test_gradients_of_a_ramp():
    v, u = torch.meshgrid(torch.arange(10.0), torch.arange(12.0), indexing="ij")
    gx, gy = gradients((2 * u + 3 * v)[None])
    # the scaled Sobel gives the derivative per pixel on interior pixels (replicate padding changes the border)
    torch.testing.assert_close(gx[0, 1:-1, 1:-1], torch.full((8, 10), 2.0))
    torch.testing.assert_close(gy[0, 1:-1, 1:-1], torch.full((8, 10), 3.0))


def test_erode():
    m = torch.zeros(1, 10, 10)
    m[0, 2:8, 3:9] = 1
    e = erode(m, 2)
    expected = torch.zeros(1, 10, 10)
    expected[0, 4:6, 5:7] = 1
    assert torch.equal(e, expected)
    assert erode(m, 0) is m


def test_gradient_ncc_decreases_with_shift():
    big = _smooth_images(V=1, H=48, W=48, pad=4, seed=7)
    ref = big[:, 4:52, 4:52]
    scores = []
    for s in (0, 1, 2, 4):
        shifted = big[:, 4:52, 4 + s : 52 + s]
        scores.append(float(gradient_ncc(ref, shifted)))
    assert scores[0] == pytest.approx(1.0, abs=1e-4)
    assert scores[0] > scores[1] > scores[2] > scores[3]
    assert scores[1] < 0.99
    # the patch version too, and the masked version ignores what is outside the (eroded) mask
    assert float(gradient_ncc(ref, big[:, 4:52, 6:54], patch=8)) < float(gradient_ncc(ref, ref, patch=8))
    mask = torch.zeros(1, 48, 48)
    mask[:, 8:40, 8:40] = 1
    y = ref.clone()
    y[:, :6] = 10.0  # garbage 2+ px outside the mask
    torch.testing.assert_close(gradient_ncc(ref, y, mask), gradient_ncc(ref, ref, mask), atol=1e-5, rtol=0)


def test_image_similarity_and_multiscale_shapes_and_values():
    x = _smooth_images(V=3, H=36, W=36)
    mask = torch.ones(3, 36, 36)
    s = image_similarity(x, x, mask, patch=9)
    assert s.shape == (3,)
    torch.testing.assert_close(s, torch.ones(3), atol=1e-4, rtol=0)
    y = _smooth_images(V=3, H=36, W=36, seed=4)
    mixed = image_similarity(x, y, mask, patch=9, grad_weight=0.3)
    expected = 0.7 * ncc(x, y, mask, patch=9) + 0.3 * gradient_ncc(x, y, mask, patch=9)
    torch.testing.assert_close(mixed, expected)
    torch.testing.assert_close(image_similarity(x, y, mask, patch=9, grad_weight=0.0), ncc(x, y, mask, patch=9))
    ms = multiscale_ncc(x, y, mask, patches=(None, 9))
    torch.testing.assert_close(ms, 0.5 * (ncc(x, y, mask) + ncc(x, y, mask, patch=9)))
    assert multiscale_ncc(x, x).shape == (3,)


def test_ncc_is_differentiable():
    x = _smooth_images(V=1).requires_grad_()
    y = _smooth_images(V=1, seed=9)
    (1 - image_similarity(x, y, torch.ones_like(y), patch=8)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0


def _masks(V, H, W, seed):
    """A field-of-view mask with a dark border and a smaller 'target footprint' inside it."""
    g = torch.Generator().manual_seed(seed)
    fov = torch.ones(V, H, W)
    fov[:, :3], fov[:, :, -5:] = 0, 0
    blobs = (torch.rand(V, 1, 8, 8, generator=g) > 0.4).float()
    target = fov * F.interpolate(blobs, size=(H, W), mode="nearest")[:, 0]
    return fov, target


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_weight", [0.5, 0.0, 1.0])
@pytest.mark.parametrize("tiles", [1, 3])
def test_prepared_similarity_equals_the_reference_in_values_and_gradients(grad_weight, tiles, backend):
    """The fast path of the refinement (ATen ops, and the fused native kernel) against
    image_similarity (the reference): one weighting and two, targets tiled over a batch of poses,
    gradients with respect to the render."""
    V, H, W, patch = 2, 48, 42, 10  # not a multiple of the patch: the remainder rows and columns drop out alike
    y = _smooth_images(V, H, W, seed=2)
    fov, target = _masks(V, H, W, seed=3)
    drr = _smooth_images(V * tiles, H, W, seed=5) + 0.3 * y.repeat(tiles, 1, 1)
    for weightings in ([(fov, 1.0)], [(fov, 0.4), (target, 0.6)]):
        x_ref = drr.clone().requires_grad_()
        ref = sum(
            wt
            * image_similarity(
                x_ref, y.repeat(tiles, 1, 1), m.repeat(tiles, 1, 1), patch=patch, grad_weight=grad_weight
            )
            for m, wt in weightings
        )
        ref.sum().backward()
        x_fast = drr.clone().requires_grad_()
        prepared = PreparedSimilarity(y, weightings, patch=patch, grad_weight=grad_weight, backend=backend)
        assert prepared.backend == backend
        fast = prepared(x_fast)
        fast.sum().backward()
        assert fast.shape == (V * tiles,)
        torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(x_fast.grad, x_ref.grad, atol=1e-7, rtol=1e-4)
        assert x_fast.grad.abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_fused_similarity_matches_the_aten_path_where_the_formulas_have_corners(backend, dtype):
    """The fused kernel against the ATen path on renders with the cases the formulas treat apart:
    flat patches (the render's patch variance clamped at 0; float64 only, where both paths round
    alike), patches flat in the target (not
    informative), patches outside the masks, a border not covered by whole patches, correlations
    near +-1 (clamped), no gradient asked; float32 and float64 renders."""
    V, H, W, patch = 3, 37, 45, 6
    y = _smooth_images(V, H, W, seed=11).to(dtype)
    y[0, :12, :12] = 0.5  # flat in the target: not informative
    fov, target = _masks(V, H, W, seed=12)
    fov[1, :, :9] = 0  # a strip outside the field of view
    drr = (_smooth_images(2 * V, H, W, seed=13) + 0.5 * y.repeat(2, 1, 1)).to(dtype)
    if dtype == torch.float64:  # in float32 a flat patch's variance is rounding noise, and so is its gradient
        drr[1, 6:18, 6:24] = 2.0  # flat in the render: its variance clamped at 0 (or not) by rounding alike
    drr[2] = 3.0 * y[2] - 1.0  # correlation 1 up to rounding everywhere
    drr[5] = -y[2]  # ... and -1
    weightings = [(fov, 0.3), (target, 0.7)]
    ref = PreparedSimilarity(y, weightings, patch=patch, grad_weight=0.75, backend="torch")
    fused = PreparedSimilarity(y, weightings, patch=patch, grad_weight=0.75, backend=backend)
    x_ref, x_fused = drr.clone().requires_grad_(), drr.clone().requires_grad_()
    a, b = ref(x_ref), fused(x_fused)
    assert b.dtype == dtype and b.shape == (2 * V,)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-11, "rtol": 1e-9}
    torch.testing.assert_close(b, a, **tol)
    (a * torch.arange(1.0, 2 * V + 1, dtype=dtype)).sum().backward()  # a different weight per render
    (b * torch.arange(1.0, 2 * V + 1, dtype=dtype)).sum().backward()
    gtol = {"atol": 1e-7, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-8}
    torch.testing.assert_close(x_fused.grad, x_ref.grad, **gtol)
    assert x_fused.grad[1].abs().max() > 0
    with torch.no_grad():
        torch.testing.assert_close(fused(drr), a.detach(), **tol)


def test_prepared_similarity_backends_are_checked():
    y = _smooth_images(2, 24, 24, seed=1)
    fov, _ = _masks(2, 24, 24, seed=2)
    with pytest.raises(ValueError, match="backend"):
        PreparedSimilarity(y, [(fov, 1.0)], patch=8, backend="fast")
    assert set(SIMILARITY_BACKENDS) == {"auto", "native", "torch"}
    assert PreparedSimilarity(y, [(fov, 1.0)], patch=8, backend="torch").backend == "torch"
    expected = "torch" if render_native.load() is None else "native"
    assert PreparedSimilarity(y, [(fov, 1.0)], patch=8).backend == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_prepared_similarity_is_one_on_its_target_and_checks_inputs(backend):
    y = _smooth_images(2, 40, 40, seed=7)
    fov, target = _masks(2, 40, 40, seed=8)
    sim = PreparedSimilarity(y, [(fov, 0.5), (target, 0.5)], patch=8, backend=backend)
    torch.testing.assert_close(sim(2.0 * y + 1.0), torch.ones(2), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="do not tile"):
        sim(y[:1])
    with pytest.raises(ValueError, match="mask shape"):
        PreparedSimilarity(y, [(fov[:1], 1.0)], patch=8)
    with pytest.raises(ValueError, match="at least one"):
        PreparedSimilarity(y, [], patch=8)
    with pytest.raises(ValueError, match="patch"):
        PreparedSimilarity(y, [(fov, 1.0)], patch=0)


def test_similarity_without_the_native_extension_uses_aten(monkeypatch):
    """Where the extension cannot be built, "auto" takes the ATen path and "native" says why it cannot."""
    y = _smooth_images(2, 24, 24, seed=4)
    fov, _ = _masks(2, 24, 24, seed=5)
    monkeypatch.setitem(render_native._STATE, "module", None)
    sim = PreparedSimilarity(y, [(fov, 1.0)], patch=8)
    assert sim.backend == "torch"
    torch.testing.assert_close(sim(2.0 * y + 1.0), torch.ones(2), atol=1e-4, rtol=0)
    with pytest.raises(RuntimeError, match="not available"):
        PreparedSimilarity(y, [(fov, 1.0)], patch=8, backend="native")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_weight", [0.5, 0.0])
def test_prepared_similarity_reads_only_its_read_pixels(grad_weight, backend):
    """read_pixels holds every pixel whose render value enters the similarity: a render changed
    anywhere else gives the same value and gradient, bit for bit, and the gradient there is zero
    (what lets the refinement trace only those rays, RaySubset). The intensity's mask and, with
    gradient NCC, the Sobel neighbourhoods of the eroded mask; not the masks' zero border."""
    V, H, W, patch = 2, 48, 42, 10
    y = _smooth_images(V, H, W, seed=2)
    fov, target = _masks(V, H, W, seed=3)
    prepared = PreparedSimilarity(y, [(fov, 0.4), (target, 0.6)], patch=patch, grad_weight=grad_weight, backend=backend)
    read = prepared.read_pixels()
    assert read.dtype == torch.bool and read.shape == (V, H, W)
    assert bool(read[fov > 0].all()) and not bool(read.all())
    drr = _smooth_images(V, H, W, seed=5) + 0.3 * y
    other = torch.where(read, drr, 5 * torch.randn(V, H, W, generator=torch.Generator().manual_seed(9)))
    values, grads = [], []
    for x in (drr, other):
        x = x.clone().requires_grad_()
        s = prepared(x)
        s.sum().backward()
        values.append(s.detach())
        grads.append(x.grad)
    assert torch.equal(values[0], values[1]) and torch.equal(grads[0], grads[1])
    assert bool((grads[0][~read] == 0).all()) and grads[0][read].abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_vjp_is_autograd_through_the_fused_similarity_bit_for_bit(backend):
    """PreparedSimilarity.value_vjp (the refinement iteration's similarity without autograd): the fused
    kernel's value and the gradient autograd gives through ``__call__``, bit for bit; None on the torch path."""
    V, H, W = 2, 40, 44
    y = _smooth_images(V, H, W, seed=21)
    fov, target = _masks(V, H, W, seed=22)
    sim = PreparedSimilarity(y, [(fov, 0.5), (target, 0.5)], patch=8, grad_weight=0.75, backend=backend)
    drr = _smooth_images(3 * V, H, W, seed=23) + 0.4 * y.repeat(3, 1, 1)  # three poses' renders
    got = sim.value_vjp(drr)
    if backend == "torch":
        assert got is None
        return
    x = drr.clone().requires_grad_()
    ref = sim(x)
    weights = -torch.arange(1.0, 3 * V + 1, dtype=ref.dtype) / 3  # a seed as the refinement's, -1/V per view
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), x)
    value, pullback = got
    assert torch.equal(value, ref.detach()) and torch.equal(pullback(weights), grad_ref)
    with pytest.raises(ValueError, match="do not tile"):
        sim.value_vjp(drr[:, :-1])
