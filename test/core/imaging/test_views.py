"""ViewSet: validation, preprocessing of raw images, downsampling, selection."""

import pytest
import torch

from mvreg_ros.core.data.simulate import AcquisitionConfig, DetectorConfig, acquire, make_scene
from mvreg_ros.core.geometry.transforms import invert, project
from mvreg_ros.core.imaging.views import ViewSet
from mvreg_ros.core.registration.similarity import erode, ncc
from mvreg_ros.core.rendering.renderer import Renderer

F64 = torch.float64
H = W = 64


def _valid(V=2, H=32, W=32):
    g = torch.Generator().manual_seed(0)
    return dict(
        images=torch.rand(V, H, W, generator=g),
        masks=torch.ones(V, H, W),
        K=torch.eye(3, dtype=F64).expand(V, 3, 3).clone(),
        T_ref_from_cam=torch.eye(4, dtype=F64).expand(V, 4, 4).clone(),
    )


def test_viewset_accepts_valid_input():
    vs = ViewSet(**_valid(3, 24, 40))
    assert len(vs) == 3 and vs.height == 24 and vs.width == 40


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda d: d.update(images=d["images"][0]), "images must be"),
        (
            lambda d: d.update(
                images=d["images"][:0], masks=d["masks"][:0], K=d["K"][:0], T_ref_from_cam=d["T_ref_from_cam"][:0]
            ),
            "V >= 1",
        ),
        (lambda d: d.update(masks=d["masks"][:, :-1]), "masks"),
        (lambda d: d.update(K=d["K"][:1]), "K must be"),
        (lambda d: d.update(K=torch.eye(4, dtype=F64).expand(2, 4, 4)), "K must be"),
        (lambda d: d.update(T_ref_from_cam=d["T_ref_from_cam"][:1]), "T_ref_from_cam"),
        (lambda d: d.update(T_ref_from_cam=torch.eye(3, dtype=F64).expand(2, 3, 3)), "T_ref_from_cam"),
        (lambda d: d["images"].__setitem__((1, 3, 3), float("nan")), "view 1 image contains NaN"),
        (lambda d: d["images"].__setitem__(0, 2.0), "view 0 image is constant"),
        (
            lambda d: d.update(masks=torch.stack([torch.ones(32, 32), torch.zeros(32, 32)])),
            "view 1: empty field of view",
        ),
    ],
)
def test_viewset_validation(change, match):
    d = _valid()
    change(d)
    with pytest.raises(ValueError, match=match):
        ViewSet(**d)


@pytest.fixture(scope="module")
def simulated(tiny_ct):
    det = DetectorConfig(height=H, width=W, pixel_mm=1.164 * 256 / W)
    scene = make_scene(tiny_ct.centre_ct(), [(0.0, 0.0), (60.0, -10.0)], detector=det)
    renderer = Renderer(tiny_ct, n_samples=96, backend="grid_sample")
    raw = acquire(
        renderer,
        scene.T_cam_from_ct,
        scene.K,
        H,
        W,
        config=AcquisitionConfig(n_samples=96),
        generator=torch.Generator().manual_seed(0),
    )
    clean = renderer(scene.T_cam_from_ct, scene.K, H, W, n_samples=96)
    return scene, raw, clean


def _radius_px():
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    return torch.sqrt((u - (W - 1) / 2) ** 2 + (v - (H - 1) / 2) ** 2)


def test_from_raw_recovers_the_line_integrals(simulated):
    scene, raw, clean = simulated
    vs = ViewSet.from_raw(raw, scene.K, scene.T_ref_from_cam)
    assert vs.images.shape == (2, H, W) and vs.K.dtype == F64 and vs.T_ref_from_cam.dtype == F64
    r = _radius_px()
    # the mask is the intensifier's circle (nominal radius 0.47 W): it covers the inside, nothing far outside
    assert bool((vs.masks[:, r < 0.47 * W - 5] == 1).all())
    assert float(vs.masks[:, r > 0.47 * W + 3].sum()) == 0.0
    # log-linearised images correlate with the noise-free DRR away from the field-of-view edge
    s = ncc(vs.images, clean, erode(vs.masks, 3))
    assert (s > 0.95).all(), s
    assert float(vs.images[vs.masks == 0].abs().sum()) == 0.0
    # with the true I0 they are line integrals in the DRR's units where scatter does not dominate (thin regions);
    # without it the brightest pixel stands for I0, so only differences count
    known = ViewSet.from_raw(raw, scene.K, scene.T_ref_from_cam, i0=AcquisitionConfig().i0)
    thin = (erode(vs.masks, 3) > 0) & (clean < 2.5)
    assert int(thin.sum()) > 20
    assert float((known.images[thin] - clean[thin]).abs().median()) < 0.15


def test_from_raw_mask_excludes_the_fov_edge(simulated):
    scene, raw, clean = simulated
    vs = ViewSet.from_raw(raw, scene.K, scene.T_ref_from_cam)
    assert float(vs.masks[:, _radius_px() > 0.47 * W].sum()) == 0.0
    s = ncc(vs.images, clean, vs.masks)
    assert (s > 0.95).all(), s


def test_from_raw_line_integral_input_and_errors(simulated):
    scene, _, clean = simulated
    vs = ViewSet.from_raw(clean, scene.K, scene.T_ref_from_cam, raw_is_line_integral=True)
    torch.testing.assert_close(vs.images, clean)
    assert torch.equal(vs.masks, torch.ones_like(clean))
    with pytest.raises(ValueError, match="V, H, W"):
        ViewSet.from_raw(clean[0], scene.K, scene.T_ref_from_cam)
    bad = clean.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ViewSet.from_raw(bad, scene.K, scene.T_ref_from_cam, raw_is_line_integral=True)


def test_downsampled_keeps_geometry(simulated, tiny_ct):
    scene, raw, _ = simulated
    vs = ViewSet.from_raw(raw, scene.K, scene.T_ref_from_cam)
    small = vs.downsampled(4)
    assert small.images.shape == (2, H // 4, W // 4) and small.height == H // 4
    torch.testing.assert_close(small.images[1, 3, 5], vs.images[1, 12:16, 20:24].mean())
    # a pooled pixel is inside only if its whole block was
    assert torch.equal(small.masks[0, 0, 0], torch.tensor(0.0)) and float(small.masks[:, 8, 8].min()) == 1.0
    assert set(small.masks.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(small.T_ref_from_cam, vs.T_ref_from_cam)
    # a CT point lands on the same spot at both resolutions
    T_cam_from_ct = invert(vs.T_ref_from_cam) @ scene.T_ref_from_ct
    p = tiny_ct.bone_centre_ct()[None].to(F64).expand(2, 1, 3)
    uv_full, uv_small = project(vs.K, T_cam_from_ct, p), project(small.K, T_cam_from_ct, p)
    torch.testing.assert_close(uv_small, (uv_full + 0.5) / 4 - 0.5)


def test_downsampled_k_puts_a_point_where_the_pooled_image_shows_it():
    """A bright blob drawn at a 3D point's full-resolution pixel (pixel centres at integer coordinates) and
    average-pooled by 4 has its centroid at (u + 0.5) / 4 - 0.5: the downsampled K must project the point there."""
    Hs, Ws, f = 48, 64, 4  # not square, principal point off-centre, fx != fy: swapped axes or offsets show
    K = torch.tensor([[300.0, 0.0, 29.3], [0.0, 280.0, 21.7], [0.0, 0.0, 1.0]], dtype=F64)
    p_cam = torch.tensor([[0.85, -0.4, 10.0]], dtype=F64)
    u, v = 29.3 + 300.0 * 0.85 / 10.0, 21.7 - 280.0 * 0.4 / 10.0  # 54.8, 10.5
    rows, cols = torch.meshgrid(torch.arange(Hs, dtype=F64), torch.arange(Ws, dtype=F64), indexing="ij")
    blob = torch.exp(-((cols - u) ** 2 + (rows - v) ** 2) / (2 * 2.5**2))
    vs = ViewSet(
        images=blob[None].float(), masks=torch.ones(1, Hs, Ws), K=K[None], T_ref_from_cam=torch.eye(4, dtype=F64)[None]
    )
    small = vs.downsampled(f)
    assert small.images.shape == (1, Hs // f, Ws // f)
    img = small.images[0].to(F64)
    r, c = torch.meshgrid(torch.arange(Hs // f, dtype=F64), torch.arange(Ws // f, dtype=F64), indexing="ij")
    centroid = torch.stack([(img * c).sum() / img.sum(), (img * r).sum() / img.sum()])
    expected = torch.tensor([(u + 0.5) / f - 0.5, (v + 0.5) / f - 0.5], dtype=F64)  # 13.325, 2.25
    torch.testing.assert_close(centroid, expected, atol=0.02, rtol=0)  # the pooling geometry itself
    uv_small = project(small.K[0], torch.eye(4, dtype=F64), p_cam)[0]
    torch.testing.assert_close(uv_small, expected, atol=1e-9, rtol=0)
    # the brightest pooled pixel is the one the projection falls in
    brightest = divmod(int(img.argmax()), Ws // f)
    assert brightest == (round(float(uv_small[1])), round(float(uv_small[0])))


def test_select(simulated):
    scene, raw, _ = simulated
    vs = ViewSet.from_raw(raw, scene.K, scene.T_ref_from_cam)
    one = vs.select([1])
    assert len(one) == 1
    torch.testing.assert_close(one.images[0], vs.images[1])
    torch.testing.assert_close(one.T_ref_from_cam[0], vs.T_ref_from_cam[1])
    swapped = vs.select([1, 0])
    torch.testing.assert_close(swapped.K, vs.K.flip(0))
    assert vs.to("cpu").images.device.type == "cpu"
