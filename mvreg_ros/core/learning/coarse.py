"""Coarse pose from a view set: the trained network per view, fused through the known
camera geometry into one ``T_ref_from_ct`` for the refinement.

Fusion: each view's prediction ``T_cam_i_from_ct`` becomes ``T_ref_from_cam_i @ T_cam_i_from_ct``.
Rotations are averaged by the chordal L2 mean; the anatomy centre is triangulated from the
rays through each view's predicted centre pixel (depth ambiguity of single views removed),
weakly pulled toward the predicted depths. A view whose prediction disagrees with the others
(rotation or ray distance above the thresholds) is dropped; with two disagreeing views the
candidates are scored by the NCC of their DRRs against all views and the best one is kept.
"""

from __future__ import annotations

import dataclasses
import time
import typing
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.geometry.transforms import invert, make_T, rotation_angle_deg, scale_intrinsics, transform_points
from mvreg_ros.core.imaging.views import ViewSet
from mvreg_ros.core.imaging.volume import Volume
from mvreg_ros.core.imaging.xray import downsample
from mvreg_ros.core.learning.network import ArchConfig, PoseGeometry, PoseNet, decode, load_checkpoint
from mvreg_ros.core.registration.similarity import multiscale_ncc
from mvreg_ros.core.rendering.renderer import Renderer


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    rot_threshold_deg: float = 20.0  # a view disagreeing by more is an outlier
    ray_threshold_mm: float = 40.0  # distance of the centre from a view's ray
    depth_prior_weight: float = 0.01  # pull of the triangulated centre toward the predicted depths
    score_size: int = 32  # DRR size used to arbitrate between disagreeing views (0 = never render)
    score_samples: int = 48


@dataclasses.dataclass(frozen=True)
class CoarseEstimate:
    T_ref_from_ct: Float[Tensor, "4 4"]  # fused, float64 mm
    T_cam_from_ct: Float[Tensor, "V 4 4"]  # per-view predictions
    T_ref_from_ct_views: Float[Tensor, "V 4 4"]
    inliers: Tensor  # bool (V,)
    ms: float  # wall time of predict(), milliseconds
    scores: Tensor | None = None  # image scores of the candidates, when arbitration was needed


def chordal_mean(R: Float[Tensor, "N 3 3"], weights: Tensor | None = None) -> Float[Tensor, "3 3"]:
    """Rotation closest (Frobenius) to the weighted mean of the matrices."""
    w = torch.ones(len(R), dtype=R.dtype) if weights is None else weights.to(R)
    M = (w[:, None, None] * R).sum(0)
    U, _, Vh = torch.linalg.svd(M)
    D = torch.eye(3, dtype=R.dtype)
    D[2, 2] = torch.sign(torch.linalg.det(U @ Vh))
    return U @ D @ Vh


def triangulate(
    origins: Float[Tensor, "N 3"], points: Float[Tensor, "N 3"], *, prior_weight: float = 0.01
) -> Float[Tensor, "3"]:
    """Point closest to the rays ``origins -> points``, pulled by ``prior_weight`` toward the
    mean of ``points`` (so a single ray or parallel rays give a finite answer)."""
    d = F.normalize(points - origins, dim=-1)
    eye = torch.eye(3, dtype=origins.dtype)
    P = eye - d[:, :, None] * d[:, None, :]
    A = P.sum(0) + prior_weight * len(points) * eye
    b = (P @ origins[:, :, None])[..., 0].sum(0) + prior_weight * points.sum(0)
    return torch.linalg.solve(A, b)


def ray_distance(origin: Tensor, through: Tensor, p: Tensor) -> Tensor:
    d = F.normalize(through - origin, dim=-1)
    v = p - origin
    return (v - (v * d).sum(-1, keepdim=True) * d).norm(dim=-1)


def _line_distance(o1, p1, o2, p2) -> Tensor:
    d1, d2 = F.normalize(p1 - o1, dim=-1), F.normalize(p2 - o2, dim=-1)
    n = torch.linalg.cross(d1, d2, dim=-1)
    if float(n.norm()) < 1e-9:
        return ray_distance(o1, p1, o2)
    return ((o2 - o1) * F.normalize(n, dim=-1)).sum(-1).abs()


def fuse_subset(
    T_views: Float[Tensor, "V 4 4"],
    cam_origins: Float[Tensor, "V 3"],
    centre_ct: Tensor,
    idx: list[int],
    *,
    prior_weight: float,
) -> Float[Tensor, "4 4"]:
    """Chordal mean rotation + triangulated centre of the views ``idx``."""
    T = T_views[idx]
    if len(idx) == 1:
        return T[0].clone()
    R = chordal_mean(T[:, :3, :3])
    centres = transform_points(T, centre_ct.to(T)[None].expand(len(idx), 1, 3))[:, 0]
    c_ref = triangulate(cam_origins[idx], centres, prior_weight=prior_weight)
    return make_T(R, c_ref - R @ centre_ct.to(T))


def fuse(
    T_ref_from_ct_views: Float[Tensor, "V 4 4"],
    T_ref_from_cam: Float[Tensor, "V 4 4"],
    centre_ct: Float[Tensor, "3"],
    *,
    config: FusionConfig = FusionConfig(),
    scorer: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Robust fused ``T_ref_from_ct``, the inlier mask and candidate scores (if scored).

    Two views agree when their rotations differ by at most ``rot_threshold_deg`` and the rays
    through their predicted centres pass within ``ray_threshold_mm`` (depth-free). The largest
    group of views that agree with one view is fused; when no two views agree, the
    candidates (all views fused, each view alone) are scored by ``scorer`` (higher = better)."""
    T = T_ref_from_ct_views.to(torch.float64)
    V = len(T)
    origins = T_ref_from_cam[:, :3, 3].to(T)
    c = centre_ct.to(T)
    allv = list(range(V))
    fused_all = fuse_subset(T, origins, c, allv, prior_weight=config.depth_prior_weight)
    if V == 1:
        return fused_all, torch.ones(1, dtype=torch.bool), None
    centres = transform_points(T, c[None].expand(V, 1, 3))[:, 0]
    agree = torch.eye(V, dtype=torch.bool)
    for i in allv:
        for j in range(i + 1, V):
            rot = float(rotation_angle_deg(T[i, :3, :3].T @ T[j, :3, :3]))
            dist = float(_line_distance(origins[i], centres[i], origins[j], centres[j]))
            agree[i, j] = agree[j, i] = rot <= config.rot_threshold_deg and dist <= config.ray_threshold_mm
    counts = agree.sum(1)
    best = int(counts.argmax())
    inliers = agree[best].clone()
    if bool(inliers.all()):
        return fused_all, inliers, None
    if int(inliers.sum()) >= 2:
        idx = inliers.nonzero()[:, 0].tolist()
        return fuse_subset(T, origins, c, idx, prior_weight=config.depth_prior_weight), inliers, None
    if scorer is None:
        return fused_all, torch.ones(V, dtype=torch.bool), None
    candidates = [(allv, fused_all)] + [([i], T[i].clone()) for i in allv]
    scores = scorer(torch.stack([Tc for _, Tc in candidates]))
    k = int(scores.argmax())
    inl = torch.zeros(V, dtype=torch.bool)
    inl[candidates[k][0]] = True
    return candidates[k][1], inl, scores


ASPECT_TOLERANCE = 0.02  # relative difference of aspect ratios (rows / columns) accepted by predict


@typing.no_type_check  # validates its own inputs (tests check its errors); no jaxtyping/beartype wrapper
def to_working_size(
    images: Float[Tensor, "V H W"], masks: Float[Tensor, "V H W"], K: Float[Tensor, "V 3 3"], size: int
) -> tuple[Float[Tensor, "V S S"], Float[Tensor, "V S S"], Float[Tensor, "V 3 3"]]:
    """The network input (``size x size``) and its intrinsics ``K_work`` of views of any shape.

    The one preprocessing of the coarse network, used by training (working intrinsics and
    detector mask of the training renders) and by :meth:`CoarseModel.predict`. Letterbox
    convention, one isotropic scale (the anatomy keeps its proportions):

    1. average-pool by the integer factor ``f = max(1, max(H, W) // size)`` (the last
       ``H % f`` rows and ``W % f`` columns are dropped);
    2. zero-pad the shorter side of the pooled ``h x w`` image to a square of side
       ``m = max(h, w)``, ``(m - h) // 2`` rows before and the rest after (columns alike);
       the mask is 0 in the padding;
    3. resample bilinearly to ``size x size`` (scale ``size / m``, pixel centres kept).

    ``K`` follows every step (:func:`geometry.scale_intrinsics`, a shift of the principal point
    by the padding), so a 3D point projects through ``K_work`` to where it lies in the network
    input. Masks are kept where fully inside (> 0.999 after resampling). For square images
    nothing is padded: integer pooling, then resampling to the working size."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise TypeError(f"size must be a positive int, got {size!r}")
    if images.ndim != 3 or masks.shape != images.shape:
        raise ValueError(
            f"images and masks must be (V, H, W) of one shape, got {tuple(images.shape)} and {tuple(masks.shape)}"
        )
    if K.shape != (images.shape[0], 3, 3):
        raise ValueError(f"K must be ({images.shape[0]}, 3, 3), got {tuple(K.shape)}")
    H, W = images.shape[-2:]
    factor = max(1, max(H, W) // size)
    Kd = K.to(torch.float64)
    images, K_work = downsample(images.float(), Kd, factor)
    masks, _ = downsample(masks.float(), Kd, factor)
    h, w = images.shape[-2:]
    m = max(h, w)
    if (h, w) != (m, m):
        top, left = (m - h) // 2, (m - w) // 2
        pad = (left, m - w - left, top, m - h - top)
        images, masks = F.pad(images, pad), F.pad(masks, pad)
        shift = torch.eye(3, dtype=K_work.dtype, device=K_work.device)
        shift[0, 2], shift[1, 2] = float(left), float(top)
        K_work = shift @ K_work
    if m != size:
        images = F.interpolate(images[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        masks = F.interpolate(masks[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        K_work = scale_intrinsics(K_work, size / m)
    return images, (masks > 0.999).float(), K_work


def working_geometry(
    K: Float[Tensor, "3 3"], height: int, width: int, size: int
) -> tuple[Float[Tensor, "3 3"], Float[Tensor, "S S"]]:
    """``K_work`` and the detector's area (mask) in the network input of a ``height x width``
    detector with intrinsics ``K`` (:func:`to_working_size` of a blank detector image)."""
    if height < 1 or width < 1:
        raise ValueError(f"detector height and width must be positive, got {height}x{width}")
    ones = torch.ones(1, int(height), int(width), device=K.device)
    _, mask, K_work = to_working_size(ones, ones, K[None], size)
    return K_work[0], mask[0]


def check_aspect(trained_shape: tuple[int, int], shape: tuple[int, int], *, what: str = "the views") -> None:
    """Raise a ValueError when ``shape`` (rows, columns) has another aspect ratio than the
    detector ``trained_shape`` the network was trained for (beyond :data:`ASPECT_TOLERANCE`):
    by the letterbox convention the anatomy would then sit in another part of the input."""
    H0, W0 = (int(x) for x in trained_shape)
    H, W = (int(x) for x in shape)
    if abs((H / W) / (H0 / W0) - 1.0) > ASPECT_TOLERANCE:
        raise ValueError(
            f"{what} are {H}x{W} px (rows x columns), but the coarse network was trained for a "
            f"{H0}x{W0} detector (aspect ratio {H / W:.3f} vs {H0 / W0:.3f}); train a model for this "
            f"detector shape (TrainConfig detector_rows/detector_px, or `mvreg train` on its file)"
        )


def trained_detector_shape(metadata: dict) -> tuple[int, int] | None:
    """The detector shape (rows, columns) a checkpoint's network was trained for: recorded in
    its metadata, or (older checkpoints, square detectors only) its training config."""
    shape = metadata.get("detector_shape")
    if shape is not None:
        return int(shape[0]), int(shape[1])
    config = metadata.get("config") or {}
    if config.get("detector_px"):
        cols = int(config["detector_px"])
        return int(config.get("detector_rows") or cols), cols
    return None


def resize_views(views: ViewSet, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Images, masks and K of the views at ``size x size`` (:func:`to_working_size`)."""
    return to_working_size(views.images, views.masks, views.K, size)


class CoarseModel:
    """A trained coarse network for one CT. ``predict(views)`` gives the fused pose."""

    def __init__(
        self,
        net: PoseNet,
        geometry: PoseGeometry,
        *,
        volume: Volume | None = None,
        device="cpu",
        fusion: FusionConfig = FusionConfig(),
        metadata: dict | None = None,
        detector_shape: tuple[int, int] | None = None,
    ):
        """``detector_shape`` (rows, columns): the detector the network was trained for; views
        of another aspect ratio are refused by :meth:`predict` (None: not checked; taken from
        the checkpoint by :meth:`load`)."""
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.arch: ArchConfig = net.arch
        self.geometry = geometry
        self.fusion = fusion
        self.metadata = metadata or {}
        if detector_shape is not None:
            if len(detector_shape) != 2 or min(int(x) for x in detector_shape) < 1:
                raise ValueError(f"detector_shape must be (rows, columns) > 0, got {detector_shape}")
            detector_shape = (int(detector_shape[0]), int(detector_shape[1]))
        self.detector_shape = detector_shape
        self.centre_ct = torch.tensor(geometry.centre_ct, dtype=torch.float64)
        self._scorer_renderer = None
        if volume is not None and fusion.score_size > 0:
            vox = float(volume.spacing.min())
            factor = max(1, int(round(4.0 / vox)))  # about 4 mm voxels for 32 px scoring DRRs
            self._scorer_renderer = Renderer(
                volume.resampled(factor), n_samples=fusion.score_samples, device=self.device
            )

    @classmethod
    def load(
        cls, path: str | Path, volume: Volume, device="cpu", *, fusion: FusionConfig = FusionConfig()
    ) -> "CoarseModel":
        """Load a checkpoint trained for ``volume``; refuses one made for another CT."""
        net, geometry, meta = load_checkpoint(path, volume_identity=volume.identity(), device=device)
        return cls(
            net,
            geometry,
            volume=volume,
            device=device,
            fusion=fusion,
            metadata=meta,
            detector_shape=trained_detector_shape(meta),
        )

    @torch.no_grad()
    def predict_views(self, images: Tensor, masks: Tensor, K: Tensor) -> Float[Tensor, "V 4 4"]:
        """Per-view ``T_cam_from_ct`` of images already at the working size."""
        out = self.net(images.to(self.device), masks.to(self.device))
        return decode(out, K.to(self.device), arch=self.arch, geometry=self.geometry).cpu()

    def _scorer(self, views_small: tuple[Tensor, Tensor, Tensor], T_ref_from_cam: Tensor):
        if self._scorer_renderer is None:
            return None
        images, masks, K = views_small
        s = self.fusion.score_size
        f = max(1, images.shape[-1] // s)
        img, Ks = downsample(images, K, f)
        msk, _ = downsample(masks, K, f)
        msk = (msk > 0.999).float()
        H, W = img.shape[-2:]
        T_cam_from_ref = invert(T_ref_from_cam.to(torch.float64))

        def score(candidates: Tensor) -> Tensor:
            C, V = len(candidates), len(T_cam_from_ref)
            T = (T_cam_from_ref[None] @ candidates[:, None]).reshape(C * V, 4, 4)
            with torch.no_grad():
                drr = self._scorer_renderer(T.to(self.device), Ks.repeat(C, 1, 1).to(self.device), H, W).cpu()
            ncc = multiscale_ncc(drr, img.repeat(C, 1, 1), msk.repeat(C, 1, 1), patches=(None, 8))
            return ncc.reshape(C, V).mean(-1)

        return score

    def predict(self, views: ViewSet) -> CoarseEstimate:
        start = time.perf_counter()
        if self.detector_shape is not None:
            check_aspect(self.detector_shape, (views.height, views.width))
        small = resize_views(views, self.arch.size)
        T_cam = self.predict_views(*small)
        T_ref_from_cam = views.T_ref_from_cam.to(torch.float64).cpu()
        T_views = T_ref_from_cam @ T_cam
        T, inliers, scores = fuse(
            T_views, T_ref_from_cam, self.centre_ct, config=self.fusion, scorer=self._scorer(small, T_ref_from_cam)
        )
        ms = (time.perf_counter() - start) * 1000
        return CoarseEstimate(
            T_ref_from_ct=T, T_cam_from_ct=T_cam, T_ref_from_ct_views=T_views, inliers=inliers, ms=ms, scores=scores
        )
