"""Raw detector images to line integrals: log, field of view, checks, downsampling."""

import math

import pytest
import torch

from mvreg_ros.core.geometry.transforms import intrinsics, project
from mvreg_ros.core.imaging.xray import (
    DEEPFLUORO_I0,
    _quantile,
    check_image,
    detect_fov,
    downsample,
    log_linearize,
    prepare,
    quantile_reference,
    resize_to,
)

F64 = torch.float64


def _disc(H, W, cu, cv, radius):
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    return ((u - cu) ** 2 + (v - cv) ** 2) <= radius**2


def _textured(H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(H, W, generator=g) * 2.0 + 0.2  # line integrals


def test_log_linearize_inverts_beer_lambert():
    P = _textured(40, 50)
    raw = DEEPFLUORO_I0 * torch.exp(-P)
    torch.testing.assert_close(log_linearize(raw, i0=DEEPFLUORO_I0), P, rtol=0, atol=1e-5)
    # intensities below 1 count are clamped (no log of 0)
    raw[0, 0] = 0.0
    out = log_linearize(raw, i0=DEEPFLUORO_I0)
    assert torch.isfinite(out).all()
    assert float(out[0, 0]) == pytest.approx(math.log(DEEPFLUORO_I0), rel=1e-6)
    with pytest.raises(ValueError, match="i0"):
        log_linearize(raw, i0=0.0)


def test_log_linearize_estimates_i0_and_masks():
    P = _textured(60, 60)
    P[:5, :5] = 0.0  # some unattenuated pixels: the estimated I0 is the true one
    mask = _disc(60, 60, 29.5, 29.5, 40).float()
    raw = 30000.0 * torch.exp(-P)
    out = log_linearize(raw, mask=mask)
    torch.testing.assert_close(out, P * mask, rtol=0, atol=1e-4)
    assert torch.equal(out[mask == 0], torch.zeros_like(out[mask == 0]))


def test_detect_fov_circle():
    H, W = 128, 120
    cu, cv, r = 61.0, 63.5, 50.0
    lit = _disc(H, W, cu, cv, r)
    raw = torch.where(lit, 20000.0 * torch.exp(-_textured(H, W)), torch.full((H, W), 30.0))
    mask = detect_fov(raw, margin_px=2.0)
    assert mask.dtype == torch.float32 and mask.shape == (H, W)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # the mask is the circle, shrunk by the margin; it never reaches outside the lit disc
    assert float((mask * (~lit).float()).sum()) == 0.0
    inner = _disc(H, W, cu, cv, r - 4.0)
    assert bool((mask[inner] == 1).all())
    outer_ring = lit & ~_disc(H, W, cu, cv, r - 0.5)
    assert float(mask[outer_ring].sum()) == 0.0  # the margin is taken off


def test_detect_fov_full_field_and_empty():
    raw = 20000.0 * torch.exp(-_textured(64, 64))
    assert torch.equal(detect_fov(raw), torch.ones(64, 64))
    dark = torch.zeros(64, 64)
    dark[:3, :3] = 1000.0  # a few lit pixels only
    with pytest.raises(ValueError, match="empty field of view"):
        detect_fov(dark)


def test_detect_fov_non_round_region_falls_back_to_lit_pixels():
    raw = torch.full((64, 64), 5.0)
    raw[:, :40] = 20000.0  # a collimated rectangle: not a circle
    mask = detect_fov(raw)
    assert torch.equal(mask, (raw > 100).float())


def test_detect_fov_keeps_thick_anatomy_inside_a_collimated_flat_panel():
    """Thick anatomy (a spine, metal) can be darker than the 'no signal' threshold on a flat
    panel that also sees the direct beam; enclosed by signal, it is still in the field of view.
    The collimator shutters (whole rows or columns without signal) stay out, and a rectangle is
    not mistaken for an image intensifier's circle."""
    H, W = 96, 128
    raw = 20000.0 * torch.exp(-_textured(H, W))
    raw[:, 50:70] = 200.0  # a spine: 1 % of the direct beam, from the top edge to the bottom
    raw[30:40, 90:100] = 50.0  # a metal tool
    raw[:12, :] = 100.0  # shutter at the top
    raw[:, 115:] = 100.0  # shutter at the right
    mask = detect_fov(raw)
    inside = torch.zeros(H, W, dtype=torch.bool)
    inside[12:, :115] = True
    assert torch.equal(mask, inside.float())


def test_detect_fov_keeps_thick_anatomy_beside_a_shutter_that_no_signal_encloses():
    """A lateral chest on a flat panel: the thick part lies against the shutter and runs to the
    image's bottom edge, so no lit pixel encloses it; at 1 % of the direct beam it is below the
    'no signal' threshold, but 20 times the shutter's own level: it is in, the shutter is out."""
    H, W = 96, 128
    gen = torch.Generator().manual_seed(3)
    raw = 20000.0 * torch.exp(-_textured(H, W))
    raw[40:, 20:70] = 200.0 * (1 + 0.2 * torch.rand(H - 40, 50, generator=gen))  # thick anatomy: about 1 %
    raw[:, :20] = 10.0 * (1 + torch.rand(H, 20, generator=gen))  # shutter on the left: about 0.05 %, noisy
    mask = detect_fov(raw)
    inside = torch.zeros(H, W, dtype=torch.bool)
    inside[:, 20:] = True
    assert torch.equal(mask, inside.float())
    # without the shutter the same anatomy is enclosed by signal along its rows: the whole image
    no_shutter = raw.clone()
    no_shutter[:, :20] = 20000.0 * torch.exp(-_textured(H, W))[:, :20]
    assert bool((detect_fov(no_shutter) == 1).all())


def test_detect_fov_circle_with_dark_anatomy_is_still_the_circle():
    H, W = 128, 128
    lit = _disc(H, W, 64.0, 64.0, 55.0)
    raw = torch.where(lit, 20000.0 * torch.exp(-_textured(H, W)), torch.full((H, W), 30.0))
    raw[40:90, 58:70] = torch.where(lit[40:90, 58:70], 300.0, 30.0)  # dark spine inside the circle
    mask = detect_fov(raw, margin_px=2.0)
    assert float((mask * (~lit).float()).sum()) == 0.0
    assert bool((mask[_disc(H, W, 64.0, 64.0, 50.0)] == 1).all())  # the spine included
    assert float(mask[lit & ~_disc(H, W, 64.0, 64.0, 54.0)].sum()) == 0.0  # the circle, shrunk by the margin
    # a burned-in label in a corner (outside the circle) does not make it a rectangle
    raw[2:8, 2:40] = 20000.0
    labelled = detect_fov(raw, margin_px=2.0)
    assert float(labelled[:12, :45].sum()) == 0.0 and bool((labelled[_disc(H, W, 64.0, 64.0, 50.0)] == 1).all())


def test_check_image_messages():
    good = _textured(16, 16)
    assert check_image(good) is good
    with pytest.raises(TypeError, match="torch.Tensor"):
        check_image(good.numpy())
    with pytest.raises(ValueError, match="2D"):
        check_image(torch.rand(64))
    with pytest.raises(ValueError, match="2D"):
        check_image(torch.rand(2, 16, 16))
    with pytest.raises(ValueError, match="too small"):
        check_image(torch.rand(4, 64))
    bad = good.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        check_image(bad, "view 2")
    bad[3, 3] = float("inf")
    with pytest.raises(ValueError, match="infinite"):
        check_image(bad)
    with pytest.raises(ValueError, match="constant"):
        check_image(torch.full((16, 16), 7.0))
    with pytest.raises(ValueError, match="view 2"):
        check_image(torch.full((16, 16), 7.0), "view 2")


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_downsample_pools_and_rescales_K(factor):
    H, W = 50, 62  # not multiples of 3 or 4: the remainder is cropped at the bottom/right
    img = _textured(H, W)
    K = intrinsics(sdd_mm=1000.0, pixel_spacing_mm=0.5, height=H, width=W, principal_point_px=(30.2, 24.7))
    small, Ks = downsample(img, K, factor)
    assert small.shape == (H // factor, W // factor)
    torch.testing.assert_close(small[1, 2], img[factor : 2 * factor, 2 * factor : 3 * factor].mean())
    # a 3D point projecting to the centre of the full-res block (a, b) projects to pooled pixel (a, b)
    T = torch.eye(4, dtype=F64)
    for a, b in [(0, 0), (2, 1), (W // factor - 1, H // factor - 1)]:
        u, v = factor * a + (factor - 1) / 2, factor * b + (factor - 1) / 2
        p = torch.tensor([[(u - K[0, 2]) / K[0, 0] * 800.0, (v - K[1, 2]) / K[1, 1] * 800.0, 800.0]], dtype=F64)
        torch.testing.assert_close(project(Ks, T, p)[0], torch.tensor([float(a), float(b)], dtype=F64))


def test_downsample_batched_and_identity():
    img = torch.rand(3, 2, 16, 16)
    K = intrinsics(sdd_mm=1000.0, pixel_spacing_mm=1.0, height=16, width=16)
    out, _ = downsample(img, K, 4)
    assert out.shape == (3, 2, 4, 4)
    torch.testing.assert_close(out[2, 1], downsample(img[2, 1], K, 4)[0])
    same, K1 = downsample(img, K, 1)
    assert same is img and K1 is K
    with pytest.raises(ValueError, match="factor"):
        downsample(img, K, 0)
    with pytest.raises(ValueError, match="factor"):
        downsample(img, K, 2.0)


def test_resize_to():
    img = torch.rand(100, 70)
    K = intrinsics(sdd_mm=1000.0, pixel_spacing_mm=1.0, height=100, width=70)
    out, _ = resize_to(img, K, 32)
    assert out.shape == (25, 17)  # factor ceil(100 / 32) = 4


def test_prepare_raw_and_line_integral():
    H = W = 64
    P = _textured(H, W)
    lit = _disc(H, W, 31.5, 31.5, 28)
    raw = torch.where(lit, DEEPFLUORO_I0 * torch.exp(-P), torch.zeros(H, W))
    K = intrinsics(sdd_mm=1000.0, pixel_spacing_mm=1.0, height=H, width=W)
    out = prepare(raw, K, i0=DEEPFLUORO_I0)
    assert out.K is K
    inside = out.mask > 0
    torch.testing.assert_close(out.image[inside], P[inside], rtol=0, atol=1e-4)
    assert float(out.image[~inside].abs().sum()) == 0.0
    li = prepare(P, K, raw_is_line_integral=True)
    assert torch.equal(li.mask, torch.ones(H, W)) and torch.equal(li.image, P)
    with pytest.raises(ValueError, match="NaN"):
        prepare(torch.full((H, W), float("nan")), K)


@pytest.mark.parametrize("size", [1, 2, 7, 1000, 65536, 65537, 3 * 256 * 256])
@pytest.mark.parametrize("kind", ["uniform", "ties", "constant"])
def test_quantile_by_selection_is_torch_quantile_bit_for_bit(size, kind):
    g = torch.Generator().manual_seed(size)
    if kind == "uniform":
        x = torch.rand(size, generator=g) * 1000
    elif kind == "ties":  # many equal values: the two selections straddle runs of ties
        x = torch.randint(0, 50, (size,), generator=g).float()
    else:
        x = torch.full((size,), 3.0)
    for dtype in (torch.float32, F64):
        for q in (0.0, 0.001, 0.25, 0.5, 0.99, 0.999, 1.0):
            fast, ref = _quantile(x.to(dtype), q), quantile_reference(x.to(dtype), q)
            assert fast.dtype == ref.dtype and fast.shape == ref.shape
            assert torch.equal(fast, ref), (size, kind, dtype, q, fast, ref)


def test_quantile_edge_cases():
    x = torch.rand(100)
    assert float(_quantile(x, 0.0)) == float(x.min()) and float(_quantile(x, 1.0)) == float(x.max())
    x[5] = float("nan")  # torch.quantile's answer: NaN
    assert torch.isnan(_quantile(x, 0.5)) and torch.isnan(quantile_reference(x, 0.5))
    with pytest.raises(ValueError, match="q must be in"):
        _quantile(torch.rand(10), 1.5)
    with pytest.raises(RuntimeError):  # as torch.quantile: float or double only
        _quantile(torch.arange(10), 0.5)
