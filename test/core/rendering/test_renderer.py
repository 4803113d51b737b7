"""DRR renderers: analytic line integrals, projection geometry, agreement with DiffDRR's
Siddon, gradients, batching.

These tests use the ``grid_sample`` backend, the reference of the default compiled gather
kernel (each new shape costs the compiled backend seconds of ``torch.compile``);
test_render_backends.py checks that the two backends agree in values and gradients."""

import functools
import math

import numpy as np
import pytest
import torch

from mvreg_ros.core.data.simulate import DetectorConfig, make_scene
from mvreg_ros.core.geometry.transforms import (
    about_point,
    intrinsics,
    invert,
    make_T,
    project,
    scale_intrinsics,
    se3_exp,
    so3_exp,
    translation,
)
from mvreg_ros.core.imaging.volume import Volume
from mvreg_ros.core.rendering.reference import ReferenceRenderer
from mvreg_ros.core.rendering.renderer import Renderer, pixel_grid

F64 = torch.float64
Fast = functools.partial(Renderer, backend="grid_sample")
RENDERERS = {"fast": Fast, "reference": ReferenceRenderer}
MU = 0.01  # 1/mm


def _centred_affine(n: int, spacing: float = 1.0) -> torch.Tensor:
    A = torch.eye(4, dtype=F64)
    A[:3, :3] *= spacing
    A[:3, 3] = -spacing * (n - 1) / 2  # the grid centre at the CT origin
    return A


@functools.cache
def _cube_volume() -> Volume:
    """A 60 mm cube of MU in an 80 mm grid of 1 mm voxels, centred at the CT origin."""
    data = torch.zeros(80, 80, 80)
    data[10:70, 10:70, 10:70] = MU
    return Volume(data=data, T_ct_from_index=_centred_affine(80))


@functools.cache
def _smooth_volume() -> Volume:
    """Smooth random-ish blobs on an anisotropic, offset grid."""
    n = 32
    A = torch.eye(4, dtype=F64)
    A[:3, :3] = torch.diag(torch.tensor([3.0, 3.6, 2.4], dtype=F64))
    A[:3, 3] = torch.tensor([5.0, -3.0, 10.0], dtype=F64)
    k, j, i = torch.meshgrid(*[torch.linspace(-1, 1, n)] * 3, indexing="ij")
    g = torch.Generator().manual_seed(0)
    data = torch.zeros(n, n, n)
    for _ in range(5):
        c = torch.rand(3, generator=g) * 0.6 - 0.3
        r = 0.25 + 0.1 * torch.rand(1, generator=g)
        amp = 0.01 * (0.5 + torch.rand(1, generator=g))
        data += amp * torch.exp(-((i - c[0]) ** 2 + (j - c[1]) ** 2 + (k - c[2]) ** 2) / (2 * r**2))
    return Volume(data=data, T_ct_from_index=A)


def _look(direction, *, distance: float = 500.0, centre=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """T_cam_from_ct of a camera at ``distance`` from ``centre`` whose optical axis is ``direction``."""
    d = np.asarray(direction, dtype=float)
    d = d / np.linalg.norm(d)
    x = np.cross([0.1, 1.0, 0.3], d)
    x /= np.linalg.norm(x)
    R = np.stack([x, np.cross(d, x), d], 1)
    T_ct_from_cam = make_T(torch.tensor(R), torch.tensor(np.asarray(centre) - distance * d))
    return invert(T_ct_from_cam)


def _slab_chord(origin: np.ndarray, d: np.ndarray, half: float = 30.0) -> float:
    """Exact chord length of the ray origin + t d (t >= 0, |d| = 1) through the cube [-half, half]^3."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t0, t1 = (-half - origin) / d, (half - origin) / d
    t_near = max(np.nanmax(np.minimum(t0, t1)), 0.0)
    t_far = np.nanmin(np.maximum(t0, t1))
    return max(t_far - t_near, 0.0)


def _expected_cube_image(T_cam_from_ct: torch.Tensor, K: torch.Tensor, H: int, W: int) -> np.ndarray:
    T_ct_from_cam = np.linalg.inv(T_cam_from_ct.numpy())
    Kinv = np.linalg.inv(K.numpy())
    out = np.zeros((H, W))
    for v in range(H):
        for u in range(W):
            d = T_ct_from_cam[:3, :3] @ Kinv @ np.array([u, v, 1.0])
            out[v, u] = MU * _slab_chord(T_ct_from_cam[:3, 3], d / np.linalg.norm(d))
    return out


# ---------------------------------------------------------------------------------------
# Golden analytic line integrals
# ---------------------------------------------------------------------------------------

CUBE_DIRECTIONS = {
    "axis": [0, 0, 1],
    "oblique_face": [0.3, 0.2, 1.0],
    "edge_diagonal": [1, 1, 0],
    "body_diagonal": [1, 1, 1],
}


@pytest.mark.parametrize("name", list(RENDERERS))
def test_cube_central_ray_is_mu_times_chord(name):
    vol = _cube_volume()
    H = W = 9
    K = intrinsics(sdd_mm=1000.0, pixel_spacing_mm=8.0, height=H, width=W)
    Ts = torch.stack([_look(d) for d in CUBE_DIRECTIONS.values()])
    img = RENDERERS[name](vol, n_samples=256)(Ts, K.expand(len(Ts), 3, 3), H, W)
    d = np.array(list(CUBE_DIRECTIONS.values()), dtype=float)
    chord = 60.0 * np.linalg.norm(d, axis=1) / np.abs(d).max(1)  # through the centre
    np.testing.assert_allclose(chord[:2], [60.0, 60.0 * math.sqrt(1.13)])
    # the principal ray goes through pixel ((W-1)/2, (H-1)/2) = (4, 4)
    got = img[:, 4, 4].double().numpy()
    if name == "reference":  # Siddon is exact for a piecewise-constant volume
        np.testing.assert_allclose(got, MU * chord, rtol=1e-5)
    else:  # trilinear: exact where the ray crosses faces, smoothed where it enters through an edge or corner
        np.testing.assert_allclose(got[:2], MU * chord[:2], rtol=1e-5)
        np.testing.assert_allclose(got[2:], MU * chord[2:], rtol=1.5e-2)


@pytest.mark.parametrize("name", list(RENDERERS))
def test_cube_whole_image_matches_exact_chords(name):
    vol = _cube_volume()
    H, W = 11, 13
    K = intrinsics(sdd_mm=1000.0, pixel_spacing_mm=15.0, height=H, width=W, principal_point_px=(5.3, 6.1))
    T = _look([0.2, -0.25, 1.0], centre=(3.0, -2.0, 1.0))
    expected = _expected_cube_image(T, K, H, W)
    assert (expected == 0).any() and (expected > 0.55).any()  # some rays miss, some cross the cube fully
    img = RENDERERS[name](vol, n_samples=256)(T[None], K[None], H, W)[0].double().numpy()
    if name == "reference":
        np.testing.assert_allclose(img, expected, atol=1e-6)
    else:
        np.testing.assert_allclose(img, expected, atol=0.02 * MU * 60)
        # rays far from the cube's edges are exact
        np.testing.assert_allclose(img[4:7, 5:8], expected[4:7, 5:8], rtol=1e-4)


@pytest.mark.parametrize("name", list(RENDERERS))
def test_ray_missing_the_volume_is_zero(name):
    vol = _cube_volume()
    K = intrinsics(sdd_mm=1000.0, pixel_spacing_mm=1.0, height=4, width=4)
    # camera looking away from the volume, and one looking past it
    away = _look([0, 0, -1], distance=-500.0)
    past = translation(torch.tensor([200.0, 0.0, 0.0], dtype=F64)) @ _look([0, 0, 1])
    img = RENDERERS[name](vol, n_samples=64)(torch.stack([away, past]), K.expand(2, 3, 3), 4, 4)
    assert torch.equal(img, torch.zeros_like(img))


def test_reference_unit_volume_integrates_to_its_length():
    n, s = 10, 2.0
    vol = Volume(data=torch.ones(n, n, n), T_ct_from_index=_centred_affine(n, s))
    K = intrinsics(sdd_mm=1000.0, pixel_spacing_mm=1.0, height=5, width=5)
    img = ReferenceRenderer(vol)(_look([0, 0, 1])[None], K[None], 5, 5)
    assert float(img[0, 2, 2]) == pytest.approx(n * s, rel=1e-6)


@pytest.mark.parametrize("backend", ["grid_sample"])
def test_fast_unit_volume_integrates_to_its_length(backend):
    n, s = 10, 2.0
    vol = Volume(data=torch.ones(n, n, n), T_ct_from_index=_centred_affine(n, s))
    K = intrinsics(sdd_mm=1000.0, pixel_spacing_mm=1.0, height=5, width=5)
    Ts = torch.stack([_look([0, 0, 1]), _look([0.2, 0.1, 1.0])])
    img = Renderer(vol, n_samples=200, backend=backend)(Ts, K.expand(2, 3, 3), 5, 5)
    assert float(img[0, 2, 2]) == pytest.approx(n * s, rel=1e-3)
    assert float(img[1, 2, 2]) == pytest.approx(n * s * math.sqrt(1.05), rel=1e-3)


@pytest.mark.parametrize("name", list(RENDERERS))
def test_small_ball_projects_where_geometry_says(name):
    n = 48
    k, j, i = torch.meshgrid(*[torch.arange(n, dtype=torch.float32)] * 3, indexing="ij")
    c_idx = (30.0, 17.0, 22.0)  # (i, j, k) of the ball centre
    data = 0.05 * torch.exp(-((i - c_idx[0]) ** 2 + (j - c_idx[1]) ** 2 + (k - c_idx[2]) ** 2) / (2 * 1.5**2))
    A = make_T(so3_exp(torch.tensor([0.1, 0.2, -0.3], dtype=F64)), torch.tensor([10.0, 20.0, -30.0], dtype=F64))
    vol = Volume(data=data, T_ct_from_index=A)
    p_ball = (A[:3, :3] @ torch.tensor(c_idx, dtype=F64) + A[:3, 3])[None]
    T = _look([0.3, -0.4, 1.0], distance=600.0, centre=vol.centre_ct().numpy())
    H = W = 40
    K = intrinsics(sdd_mm=1000.0, pixel_spacing_mm=0.8, height=H, width=W)
    uv = project(K, T, p_ball)[0]
    # shift the principal point so that the ball lands exactly on the centre of pixel (23, 14)
    K[0, 2] += 23 - float(uv[0])
    K[1, 2] += 14 - float(uv[1])
    torch.testing.assert_close(project(K, T, p_ball)[0], torch.tensor([23.0, 14.0], dtype=F64))
    img = RENDERERS[name](vol, n_samples=256)(T[None], K[None], H, W)[0].double()
    v_peak, u_peak = divmod(int(img.argmax()), W)
    assert (u_peak, v_peak) == (23, 14)
    win = img[14 - 5 : 14 + 6, 23 - 5 : 23 + 6]
    vv, uu = torch.meshgrid(torch.arange(-5.0, 6.0, dtype=F64), torch.arange(-5.0, 6.0, dtype=F64), indexing="ij")
    centroid = torch.stack([(win * uu).sum(), (win * vv).sum()]) / win.sum()
    assert centroid.abs().max() < 0.1, f"blob centroid off by {centroid.tolist()} px"


def test_low_resolution_drr_equals_pooled_full_resolution_drr():
    """Pixel-centre convention end to end: rendering with scale_intrinsics(K, 1/4) gives the 4x4
    average-pooled full-resolution DRR (a half coarse pixel off would differ by ~8% of the peak)."""
    vol = _smooth_volume()
    T, K = _oblique_views(vol, 48, 48, 1.5)
    r = Fast(vol, n_samples=128)
    pooled = torch.nn.functional.avg_pool2d(r(T, K, 48, 48)[:, None], 4)[:, 0]
    low = r(T, scale_intrinsics(K, 0.25), 12, 12)
    assert float((low - pooled).abs().max()) < 0.01 * float(pooled.max())


# ---------------------------------------------------------------------------------------
# Fast renderer vs DiffDRR Siddon
# ---------------------------------------------------------------------------------------


def _oblique_views(vol: Volume, H: int, W: int, pixel_mm: float):
    c = vol.centre_ct()
    Rs = [[0.3, -0.5, 0.2], [1.2, 0.4, -0.3], [-0.7, 0.9, 0.5]]
    T = torch.stack(
        [make_T(so3_exp(torch.tensor(w, dtype=F64)), torch.tensor([0.0, 0.0, 600.0], dtype=F64)) for w in Rs]
    ) @ translation(-c)
    K = intrinsics(sdd_mm=1000.0, pixel_spacing_mm=pixel_mm, height=H, width=W).expand(len(Rs), 3, 3)
    return T, K


def test_fast_matches_siddon_on_smooth_volume():
    # Oblique views only: along an axis Siddon looks up one voxel column per ray (nearest) while
    # trilinear interpolates across columns, a first-order difference of a few % on any volume.
    vol = _smooth_volume()
    T, K = _oblique_views(vol, 32, 32, 2.0)
    a = Fast(vol, n_samples=128)(T, K, 32, 32)
    b = ReferenceRenderer(vol)(T, K, 32, 32)
    assert float(b.amin()) > 0.05  # every ray crosses the blobs
    rel_max = (a - b).abs().amax((1, 2)) / b.abs().amax((1, 2))
    assert (rel_max < 0.02).all(), rel_max


def test_fast_matches_siddon_on_tiny_ct(tiny_ct):
    det = DetectorConfig(height=48, width=48, pixel_mm=1.164 * 256 / 48)
    scene = make_scene(tiny_ct.centre_ct(), [(0.0, 0.0), (90.0, 0.0), (30.0, 20.0)], detector=det)
    a = Fast(tiny_ct, n_samples=128)(scene.T_cam_from_ct, scene.K, 48, 48)
    b = ReferenceRenderer(tiny_ct)(scene.T_cam_from_ct, scene.K, 48, 48)
    na, nb = a.flatten(1).norm(dim=1), b.flatten(1).norm(dim=1)
    assert ((na / nb - 1).abs() < 0.02).all(), na / nb
    # pixelwise they differ by how 20 mm slices are interpolated (trilinear vs nearest), not more
    assert (((a - b).flatten(1).norm(dim=1) / nb) < 0.06).all()


# ---------------------------------------------------------------------------------------
# Gradients w.r.t. the pose
# ---------------------------------------------------------------------------------------


def _weighted_loss(renderer, T0, K, H, W, weight, centre, xi):
    T = T0 @ about_point(se3_exp(xi), centre)
    return (renderer(T, K, H, W).to(F64) * weight).sum()


def _autograd(renderer, *args):
    xi = torch.zeros(6, dtype=F64, requires_grad=True)
    _weighted_loss(renderer, *args, xi).backward()
    return xi.grad


def _finite_difference(renderer, *args, h_rot=1e-3, h_mm=0.05):
    out = []
    for k in range(6):
        e = torch.zeros(6, dtype=F64)
        e[k] = h_rot if k < 3 else h_mm
        with torch.no_grad():
            out.append((_weighted_loss(renderer, *args, e) - _weighted_loss(renderer, *args, -e)) / (2 * e[k]))
    return torch.stack(out)


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_fast_gradient_matches_finite_differences(tiny_ct):
    det = DetectorConfig(height=24, width=24, pixel_mm=1.164 * 256 / 24)
    scene = make_scene(tiny_ct.centre_ct(), [(20.0, 10.0), (100.0, -15.0)], detector=det)
    weight = torch.rand(2, 24, 24, generator=torch.Generator().manual_seed(0), dtype=F64)
    args = (scene.T_cam_from_ct, scene.K, 24, 24, weight, tiny_ct.centre_ct())
    r = Fast(tiny_ct, n_samples=96, dtype=F64)
    g, fd = _autograd(r, *args), _finite_difference(r, *args)
    assert _cos(g[:3], fd[:3]) > 0.999 and _cos(g[3:], fd[3:]) > 0.999
    torch.testing.assert_close(g, fd, rtol=0.02, atol=0.02 * float(fd[3:].abs().max()))


def test_fast_and_reference_gradients_agree_on_smooth_volume():
    vol = _smooth_volume()
    T, K = _oblique_views(vol, 24, 24, 3.0)
    T, K = T[:2], K[:2]
    v, u = torch.meshgrid(torch.arange(24.0, dtype=F64), torch.arange(24.0, dtype=F64), indexing="ij")
    weight = torch.stack(
        [torch.exp(-((u - 8) ** 2 + (v - 14) ** 2) / 50), torch.exp(-((u - 15) ** 2 + (v - 9) ** 2) / 60)]
    )
    args = (T, K, 24, 24, weight, vol.centre_ct())
    g_fast = _autograd(Fast(vol, n_samples=128, dtype=F64), *args)
    ref = ReferenceRenderer(vol, dtype=F64)
    g_ref, fd_ref = _autograd(ref, *args), _finite_difference(ref, *args)
    for other in (g_ref, fd_ref):
        assert _cos(g_fast[:3], other[:3]) > 0.99 and _cos(g_fast[3:], other[3:]) > 0.99
        torch.testing.assert_close(g_fast, other, rtol=0.03, atol=0.0)


# ---------------------------------------------------------------------------------------
# Batching, pixel subsets, dtype and argument checks
# ---------------------------------------------------------------------------------------


def test_batched_views_equal_single_views(tiny_ct):
    det = DetectorConfig(height=20, width=24, pixel_mm=10.0)
    scene = make_scene(tiny_ct.centre_ct(), [(0.0, 0.0), (60.0, 10.0), (-45.0, -20.0)], detector=det)
    K = scene.K.clone()
    K[1, 0, 0] *= 1.1  # views need not share intrinsics
    r = Fast(tiny_ct, n_samples=64)
    batch = r(scene.T_cam_from_ct, K, 20, 24)
    assert batch.shape == (3, 20, 24)
    for v in range(3):
        torch.testing.assert_close(batch[v], r(scene.T_cam_from_ct[v : v + 1], K[v : v + 1], 20, 24)[0])
    assert not torch.allclose(batch[0], batch[1])


def test_pixel_subset_equals_full_image_entries(tiny_ct):
    det = DetectorConfig(height=16, width=20, pixel_mm=12.0)
    scene = make_scene(tiny_ct.centre_ct(), [(10.0, 5.0), (80.0, 0.0)], detector=det)
    r = Fast(tiny_ct, n_samples=64)
    full = r(scene.T_cam_from_ct, scene.K, 16, 20)
    idx = torch.tensor([0, 5, 37, 150, 319])
    pix = pixel_grid(16, 20, dtype=F64)[idx]
    torch.testing.assert_close(pix[2], torch.tensor([17.0, 1.0], dtype=F64))  # row-major (u, v)
    sub = r(scene.T_cam_from_ct, scene.K, 16, 20, pixels=pix)
    assert sub.shape == (2, len(idx))
    torch.testing.assert_close(sub, full.flatten(1)[:, idx])
    # per-view pixel lists
    per_view = torch.stack([pix, pix.flip(0)])
    sub2 = r(scene.T_cam_from_ct, scene.K, 16, 20, pixels=per_view)
    torch.testing.assert_close(sub2[1], full[1].flatten()[idx.flip(0)])


@pytest.mark.parametrize("name", list(RENDERERS))
def test_float64_rendering(name, tiny_ct):
    det = DetectorConfig(height=12, width=12, pixel_mm=20.0)
    scene = make_scene(tiny_ct.centre_ct(), [(30.0, 0.0)], detector=det)
    r64 = RENDERERS[name](tiny_ct, dtype=F64)
    r32 = RENDERERS[name](tiny_ct)
    a = r64(scene.T_cam_from_ct, scene.K, 12, 12)
    b = r32(scene.T_cam_from_ct, scene.K, 12, 12)
    assert a.dtype == F64 and b.dtype == torch.float32
    assert a.device == torch.device("cpu")
    torch.testing.assert_close(a.float(), b, rtol=1e-4, atol=1e-5)
    assert float(a.max()) > 1.0


def test_more_samples_converge(tiny_ct):
    det = DetectorConfig(height=12, width=12, pixel_mm=20.0)
    scene = make_scene(tiny_ct.centre_ct(), [(30.0, 10.0)], detector=det)
    r = Fast(tiny_ct, n_samples=16, dtype=F64)
    img = {n: r(scene.T_cam_from_ct, scene.K, 12, 12, n_samples=n) for n in (16, 64, 256, 1024)}
    err = [float((img[n] - img[1024]).abs().max()) for n in (16, 64, 256)]
    assert err[0] > err[1] > err[2]
    # without n_samples the constructor's value is used
    torch.testing.assert_close(r(scene.T_cam_from_ct, scene.K, 12, 12), img[16])


def test_renderer_argument_errors(tiny_ct):
    r = Fast(tiny_ct, n_samples=8)
    K = torch.eye(3, dtype=F64)[None]
    T = torch.eye(4, dtype=F64)[None]
    with pytest.raises(ValueError, match="T_cam_from_ct"):
        r(T[0], K, 4, 4)
    with pytest.raises(ValueError, match="K must be"):
        r(T, K.expand(2, 3, 3), 4, 4)
    with pytest.raises(ValueError, match="n_samples"):
        Fast(tiny_ct, n_samples=0)(T, K, 8, 8)
    with pytest.raises(ValueError, match="backend"):
        Renderer(tiny_ct, backend="cuda-magic")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_renders_on_cuda(tiny_ct):
    det = DetectorConfig(height=16, width=16, pixel_mm=15.0)
    scene = make_scene(tiny_ct.centre_ct(), [(0.0, 0.0)], detector=det)
    a = Fast(tiny_ct, device="cuda")(scene.T_cam_from_ct, scene.K, 16, 16)
    assert a.device.type == "cuda"
    torch.testing.assert_close(a.cpu(), Fast(tiny_ct)(scene.T_cam_from_ct, scene.K, 16, 16), rtol=1e-4, atol=1e-4)
