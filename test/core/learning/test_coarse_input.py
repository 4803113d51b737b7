"""The coarse network's input convention (letterbox into the square working size) for square
and rectangular detectors: train and test preprocessing, K_work, predict on any view shape."""

import math

import pytest
import torch
import torch.nn.functional as F

from mvreg_ros.core.geometry.pose_sampling import canonical_rotation
from mvreg_ros.core.geometry.transforms import intrinsics, make_T, scale_intrinsics, so3_exp
from mvreg_ros.core.imaging.views import ViewSet
from mvreg_ros.core.imaging.xray import downsample
from mvreg_ros.core.learning.coarse import (
    CoarseModel,
    FusionConfig,
    check_aspect,
    resize_views,
    to_working_size,
    trained_detector_shape,
    working_geometry,
)
from mvreg_ros.core.learning.network import ArchConfig, PoseGeometry, PoseNet, encode_targets

GEOM = PoseGeometry(
    centre_ct=(10.0, -20.0, -150.0),
    R0_cam_from_ct=tuple(tuple(float(x) for x in r) for r in canonical_rotation()),
    sid_mm=700.0,
)
SHAPES = [(256, 256), (200, 200), (48, 64), (64, 48), (320, 416), (417, 300), (160, 200)]


def _former_resize(images, masks, K, size):
    """``resize_views`` before rectangular detectors were supported (reference for squares)."""
    factor = max(1, min(images.shape[-2:]) // size)
    img, K2 = downsample(images.float(), K.to(torch.float64), factor)
    msk, _ = downsample(masks.float(), K.to(torch.float64), factor)
    H, W = img.shape[-2:]
    if (size, size) != (H, W):
        img = F.interpolate(img[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        msk = F.interpolate(msk[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        sx, sy = size / W, size / H
        S = torch.tensor([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]], dtype=K2.dtype)
        K2 = S @ K2
    return img, (msk > 0.999).float(), K2


def _K(H, W, pixel_mm=1.0):
    return intrinsics(sdd_mm=1020.0, pixel_spacing_mm=pixel_mm, height=H, width=W)


@pytest.mark.parametrize("n,size", [(256, 64), (200, 64), (128, 32), (48, 64), (1536, 64)])
def test_square_images_are_preprocessed_exactly_as_before(n, size):
    g = torch.Generator().manual_seed(n)
    images = torch.rand(2, n, n, generator=g)
    masks = (torch.rand(2, n, n, generator=g) > 0.01).float()
    K = _K(n, n).expand(2, 3, 3).clone()
    new = to_working_size(images, masks, K, size)
    old = _former_resize(images, masks, K, size)
    for a, b in zip(new, old):
        assert torch.equal(a, b)
    # and the working K of a square detector is the plain scaling when the size divides it
    if n % size == 0:
        assert torch.equal(working_geometry(_K(n, n), n, n, size)[0], scale_intrinsics(_K(n, n), size / n))


def _blob(H, W, uv, sigma):
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    return torch.exp(-((u - uv[0]) ** 2 + (v - uv[1]) ** 2) / (2 * sigma**2))


def _centroid(img):
    H, W = img.shape
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    w = img.to(torch.float64)
    return torch.stack([(w * u).sum() / w.sum(), (w * v).sum() / w.sum()])


@pytest.mark.parametrize("H,W", SHAPES)
def test_a_projected_point_lands_where_k_work_projects_it(H, W):
    """Image and K stay consistent: a blob drawn on the detector where a 3D point projects
    ends up, in the network input, where the point projects through ``K_work``."""
    size = 32
    pixel_mm = 256.0 / max(H, W)  # the same field of view for every shape
    K = _K(H, W, pixel_mm)
    for p in ([10.0, -5.0, 700.0], [-15.0, 12.0, 650.0], [0.0, 0.0, 720.0]):  # blobs inside the detector
        p = torch.tensor(p, dtype=torch.float64)
        uv = (K @ p)[:2] / p[2]
        sigma = 1.5 * max(H, W) / size  # 1.5 working pixels
        image = _blob(H, W, uv, sigma).float()[None]
        img, msk, K_work = to_working_size(image, torch.ones_like(image), K[None], size)
        assert img.shape == msk.shape == (1, size, size) and K_work.shape == (1, 3, 3)
        uv_work = (K_work[0] @ p)[:2] / p[2]
        assert torch.allclose(_centroid(img[0]), uv_work, atol=0.05), (H, W, _centroid(img[0]), uv_work)
        # the working geometry used for the training renders is the same K
        assert torch.equal(working_geometry(K, H, W, size)[0], K_work[0])


@pytest.mark.parametrize("H,W", SHAPES)
def test_letterbox_keeps_the_aspect_ratio_and_masks_the_padding(H, W):
    size = 32
    K = _K(H, W)
    K_work, mask = working_geometry(K, H, W, size)
    # one isotropic scale, the longer side fills the working size
    fx, fy = float(K_work[0, 0]), float(K_work[1, 1])
    assert math.isclose(fx, fy, rel_tol=1e-12)
    f = max(1, max(H, W) // size)
    assert math.isclose(fx, float(K[0, 0]) / f * size / max(H // f, W // f), rel_tol=1e-12)
    # the mask covers exactly the detector's area, in a band centred in the input
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    ext_v, ext_u = (H // f) * size / max(H // f, W // f), (W // f) * size / max(H // f, W // f)
    assert abs(len(rows) - ext_v) <= 2 and abs(len(cols) - ext_u) <= 2
    assert bool(mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all())
    assert (
        abs(float(rows.float().mean()) - (size - 1) / 2) <= 1 and abs(float(cols.float().mean()) - (size - 1) / 2) <= 1
    )
    # the corner pixel centres of the pooled area (the last H % f rows, W % f columns are dropped) project inside
    u1, v1 = (W // f) * f - 1.0, (H // f) * f - 1.0
    corners = torch.tensor([[0.0, 0.0], [u1, 0.0], [0.0, v1], [u1, v1]], dtype=torch.float64)
    Kinv = torch.linalg.inv(K)
    rays = (Kinv @ torch.cat([corners, torch.ones(4, 1, dtype=torch.float64)], 1).T).T
    uv = (K_work @ rays.T).T[:, :2]
    assert bool((uv >= -0.5).all() and (uv <= size - 0.5).all())


def test_input_checks_name_the_bad_value():
    x = torch.rand(1, 40, 50)
    K = _K(40, 50)[None]
    with pytest.raises(TypeError, match="2.5"):
        to_working_size(x, x, K, 2.5)
    with pytest.raises(ValueError, match=r"\(1, 40, 49\)"):
        to_working_size(x, x[..., :49], K, 16)
    with pytest.raises(ValueError, match=r"\(2, 3, 3\)"):
        to_working_size(x, x, K.expand(2, 3, 3), 16)
    with pytest.raises(ValueError, match="0x50"):
        working_geometry(K[0], 0, 50, 16)


def _views(H, W, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = _K(H, W, 256.0 / max(H, W)).expand(n, 3, 3).clone()
    T = torch.eye(4, dtype=torch.float64).expand(n, 4, 4).clone()
    T[1, :3, :3] = so3_exp(torch.tensor([0.0, 0.6, 0.0], dtype=torch.float64))
    return ViewSet(images=torch.rand(n, H, W, generator=g), masks=torch.ones(n, H, W), K=K, T_ref_from_cam=T)


@pytest.mark.parametrize("H,W", [(48, 64), (480, 640), (320, 416)])
def test_predict_on_rectangular_views_decodes_through_the_letterboxed_k(H, W):
    arch = ArchConfig(size=32, width=8, fc=16)
    model = CoarseModel(PoseNet(arch), GEOM, fusion=FusionConfig(score_size=0), detector_shape=(H, W))
    views = _views(H, W)
    est = model.predict(views)  # a real (untrained) network on rectangular views
    assert est.T_ref_from_ct.shape == (4, 4) and bool(torch.isfinite(est.T_cam_from_ct).all())
    # a network that outputs the true pose (encoded with the letterboxed K) gives it back
    c = torch.tensor(GEOM.centre_ct, dtype=torch.float64)
    R = so3_exp(torch.tensor([[0.1, -0.2, 0.05], [0.0, 0.3, 0.1]], dtype=torch.float64)) @ canonical_rotation()
    p_cam = torch.tensor([[12.0, -8.0, 690.0], [-5.0, 15.0, 720.0]], dtype=torch.float64)
    T_true = make_T(R, p_cam - (R @ c[:, None])[..., 0])
    _, _, K_work = resize_views(views, arch.size)
    seen = {}

    def oracle(images, masks):
        seen["shape"] = tuple(images.shape)
        return encode_targets(T_true, K_work, arch=arch, geometry=GEOM).float()

    model.net = oracle
    est = model.predict(views)
    assert seen["shape"] == (2, 32, 32)
    assert torch.allclose(est.T_cam_from_ct, T_true, atol=1e-3)


def test_predict_refuses_views_of_another_aspect_ratio_and_accepts_the_same_one():
    arch = ArchConfig(size=32, width=8, fc=16)
    model = CoarseModel(PoseNet(arch), GEOM, fusion=FusionConfig(score_size=0), detector_shape=(48, 64))
    with pytest.raises(ValueError, match=r"64x64.*48x64"):
        model.predict(_views(64, 64))
    model.predict(_views(96, 128))  # same aspect ratio (e.g. a finer detector binning): works by the convention
    square = CoarseModel(PoseNet(arch), GEOM, fusion=FusionConfig(score_size=0), detector_shape=(256, 256))
    with pytest.raises(ValueError, match=r"48x64.*256x256"):
        square.predict(_views(48, 64))
    with pytest.raises(ValueError, match="detector_shape"):
        CoarseModel(PoseNet(arch), GEOM, detector_shape=(0, 64))
    check_aspect((320, 416), (321, 416))  # within the tolerance


def test_trained_detector_shape_from_metadata():
    assert trained_detector_shape({"detector_shape": [48, 64]}) == (48, 64)
    assert trained_detector_shape({"config": {"detector_px": 256}}) == (256, 256)  # older checkpoints
    assert trained_detector_shape({"config": {"detector_px": 64, "detector_rows": 48}}) == (48, 64)
    assert trained_detector_shape({}) is None
