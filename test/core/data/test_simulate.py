"""Simulated acquisitions: raw intensity statistics, field of view, scene geometry."""

import functools
import math

import pytest
import torch

from mvreg_ros.core.data.simulate import AcquisitionConfig, DetectorConfig, acquire, make_scene
from mvreg_ros.core.geometry import carm
from mvreg_ros.core.geometry.transforms import project, transform_points
from mvreg_ros.core.rendering.renderer import Renderer

F64 = torch.float64
DET = DetectorConfig(height=48, width=48, pixel_mm=1.164 * 256 / 48)
ANGLES = [(0.0, 0.0), (75.0, 10.0)]


@functools.cache
def _setup(ct):
    scene = make_scene(ct.centre_ct(), ANGLES, detector=DET)
    renderer = Renderer(ct, n_samples=64, backend="grid_sample")
    return scene, renderer


def _acquire(ct, seed=0, **config):
    scene, renderer = _setup(ct)
    cfg = AcquisitionConfig(n_samples=64, **config)
    return acquire(
        renderer,
        scene.T_cam_from_ct,
        scene.K,
        DET.height,
        DET.width,
        config=cfg,
        generator=torch.Generator().manual_seed(seed),
    )


def _drr(ct):
    scene, renderer = _setup(ct)
    return renderer(scene.T_cam_from_ct, scene.K, DET.height, DET.width, n_samples=64)


def _fov(radius_frac, extra_px):
    v, u = torch.meshgrid(
        torch.arange(DET.height, dtype=torch.float32), torch.arange(DET.width, dtype=torch.float32), indexing="ij"
    )
    r = torch.sqrt((u - (DET.width - 1) / 2) ** 2 + (v - (DET.height - 1) / 2) ** 2)
    return r <= radius_frac * DET.width + extra_px


def test_acquire_range_shape_and_reproducibility(tiny_ct):
    raw = _acquire(tiny_ct)
    assert raw.shape == (2, DET.height, DET.width)
    assert float(raw.min()) >= 0 and float(raw.max()) <= 65535
    assert torch.equal(raw, raw.round())  # integer detector counts
    assert torch.equal(raw, _acquire(tiny_ct))
    assert not torch.equal(raw, _acquire(tiny_ct, seed=1))


def test_bone_is_dark_and_fov_is_circular(tiny_ct):
    raw = _acquire(tiny_ct)
    P = _drr(tiny_ct)
    inside = _fov(0.47, -3.0).expand_as(raw)
    outside = ~_fov(0.47, 8.0).expand_as(raw)
    for v in range(2):
        p, r = P[v][inside[v]], raw[v][inside[v]]
        thick = p > p.median()
        assert float(r[thick].mean()) < 0.7 * float(r[~thick].mean())
        # monotone on average: the darkest pixels are where the DRR is largest
        assert torch.corrcoef(torch.stack([p, r.log()]))[0, 1] < -0.9
    assert float(raw[outside].max()) < 0.01 * float(raw[inside].mean())
    # no field of view: nothing is dark only because of the collimation
    full = _acquire(tiny_ct, fov_radius=None)
    assert float(full[outside].min()) > 0.05 * float(full[inside].mean())


@pytest.mark.parametrize("photons_per_count", [0.5, 4.0])
def test_noise_is_poisson_like(tiny_ct, photons_per_count):
    i0 = 30000.0  # stays clear of the 16-bit clamp
    raw = _acquire(tiny_ct, i0=i0, scatter_fraction=0.0, fov_radius=None, photons_per_count=photons_per_count)
    expected = i0 * torch.exp(-_drr(tiny_ct))
    z = (raw - expected) / torch.sqrt(expected / photons_per_count)
    assert abs(float(z.mean())) < 0.05
    assert float(z.std()) == pytest.approx(1.0, abs=0.07)


def test_scatter_adds_the_configured_background_fraction(tiny_ct):
    base = dict(scatter_fraction=0.0, fov_radius=None, photons_per_count=1e6)  # ~noise-free
    clean = _acquire(tiny_ct, **base)
    base["scatter_fraction"] = 0.3
    scattered = _acquire(tiny_ct, **base)
    extra = scattered - clean
    assert float(extra.min()) > -2.0  # rounding only
    # on average 0.3 of the mean primary signal
    torch.testing.assert_close(extra.mean((-2, -1)), 0.3 * clean.mean((-2, -1)), rtol=0.02, atol=0)


def test_make_scene_geometry(tiny_ct):
    c = tiny_ct.centre_ct()
    scene = make_scene(c, [(0.0, 0.0), (90.0, 0.0), (-30.0, 25.0)], detector=DET)
    assert scene.height == DET.height and scene.width == DET.width
    assert scene.T_ref_from_cam.shape == (3, 4, 4) and scene.K.shape == (3, 3, 3)
    torch.testing.assert_close(scene.K, DET.K().expand(3, 3, 3))
    # the CT centre sits at the isocentre: on each principal axis, at depth sid
    c_cam = transform_points(scene.T_cam_from_ct, c[None].to(F64).expand(3, 1, 3))[:, 0]
    torch.testing.assert_close(c_cam, torch.tensor([0.0, 0.0, DET.sid_mm], dtype=F64).expand(3, 3), atol=1e-9, rtol=0)
    uv = project(scene.K, scene.T_cam_from_ct, c[None].to(F64).expand(3, 1, 3))[:, 0]
    torch.testing.assert_close(uv, torch.tensor([(DET.width - 1) / 2, (DET.height - 1) / 2], dtype=F64).expand(3, 2))
    torch.testing.assert_close(
        scene.T_ref_from_cam[2], carm.T_iso_from_cam(math.radians(-30.0), math.radians(25.0), sid_mm=DET.sid_mm)
    )
    # an offset moves the CT centre away from the isocentre by exactly that vector
    off = torch.tensor([10.0, -5.0, 3.0], dtype=F64)
    moved = make_scene(c, [(0.0, 0.0)], detector=DET, offset_mm=off)
    torch.testing.assert_close(transform_points(moved.T_ref_from_ct, c[None].to(F64))[0], off)


def test_detector_config_K():
    K = DetectorConfig(sdd_mm=1000.0, height=100, width=120, pixel_mm=0.5).K()
    torch.testing.assert_close(K, torch.tensor([[2000.0, 0, 59.5], [0, 2000.0, 49.5], [0, 0, 1]], dtype=F64))
