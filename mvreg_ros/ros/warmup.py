"""Warm-up at configure time (plain Python/PyTorch, no rclpy).

The engine compiles its renderer kernels (or loads them from the compile cache on disk that
``mvreg precompile`` fills: ``core/registration/precompile.py``) for each sample count, with
and without gradients, for one view and for several, the first time it meets them, and the
coarse network pays a first-call cost too. :func:`warm_up` pays all of that before the node is
activated: it renders synthetic views
of the loaded CT with the configured view count and detector size (``warmup_image_size``) at the
configured start pose, and runs on them what a real set runs: the coarse network, the global
stage from its start (with its hypotheses) and from a plain start, the refinement at every
pyramid level, the acceptance test with per-view agreement (single-view refinements) and the
overlay. Nothing it computes is kept: it uses a pipeline of its own without a tracker, so no
pose is accepted.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from mvreg_ros.core.data.simulate import AcquisitionConfig, acquire
from mvreg_ros.core.geometry.transforms import invert
from mvreg_ros.core.imaging.views import ViewSet
from mvreg_ros.core.registration.initialisers import CoarseNetworkPose, Start, StartRequest
from mvreg_ros.core.registration.precompile import exercise
from mvreg_ros.core.rendering.renderer import Renderer

FIELD_MM = 250.0  # without warmup_focal_px: the field of view at the isocentre of the synthetic views
MAX_RENDER_PX = 128  # the synthetic images are rendered at most this size, then scaled up


@dataclasses.dataclass(frozen=True)
class WarmupReport:
    time_s: float
    image_size: tuple[int, int]
    views: int
    parts: dict  # part -> seconds

    def values(self) -> dict[str, str]:
        """Status key/values."""
        return {
            "warmup_s": f"{self.time_s:.2f}",
            "warmup_image_size": f"{self.image_size[0]}x{self.image_size[1]}",
            "warmup_views": str(self.views),
            **{f"warmup_{k}_s": f"{v:.2f}" for k, v in self.parts.items()},
        }


def views_per_set(cfg) -> int:
    return len(cfg.image_topics) if cfg.acquisition_mode == "synchronized" else cfg.num_views


def warmup_image_size(cfg, model=None) -> tuple[int, int]:
    """(height, width): ``warmup_image_size``, else the network's detector, else square at the
    largest refine size."""
    if cfg.warmup_image_size:
        return int(cfg.warmup_image_size[0]), int(cfg.warmup_image_size[1])
    shape = getattr(model, "detector_shape", None)
    if shape is not None:
        return int(shape[0]), int(shape[1])
    size = max(cfg.refine.sizes)
    return size, size


def _K(focal_px: float, height: int, width: int) -> torch.Tensor:
    return torch.tensor(
        [[focal_px, 0.0, (width - 1) / 2], [0.0, focal_px, (height - 1) / 2], [0.0, 0.0, 1.0]], dtype=torch.float64
    )


def synthetic_views(registrar, cfg, T_ref_from_ct, height: int, width: int) -> ViewSet:
    """``views_per_set(cfg)`` raw views of the CT at ``T_ref_from_ct`` (mm), through ``ViewSet.from_raw``
    like real images, with the focal length ``warmup_focal_px`` (0: a 250 mm field of view at the
    isocentre), which sets how far the engine pools the CT at each level: each topic's plane at zero joints (synchronized), or the one plane at
    orbital angles spread wider than ``min_view_separation_deg`` (sequential)."""
    V = views_per_set(cfg)
    T_cams = []
    for i in range(V):
        if cfg.acquisition_mode == "synchronized":
            plane, orbital = cfg.planes[i], 0.0
        else:
            plane, orbital = cfg.planes[0], math.radians(max(cfg.min_view_separation_deg + 5.0, 30.0)) * i
        joints = {name: 0.0 for name in plane.joint_names}
        joints[plane.orbital_joint] = orbital
        T_cams.append(plane.T_ref_from_cam(joints).to(torch.float64))
    T_ref_from_cam = torch.stack(T_cams)
    sid = float(cfg.planes[0].sid_mm)
    focal = cfg.warmup_focal_px if cfg.warmup_focal_px > 0 else sid * max(height, width) / FIELD_MM
    K = _K(focal, height, width).expand(V, 3, 3).clone()
    # render small (grid_sample: no compilation of its own), then scale up to the detector size
    s = max(1, math.ceil(max(height, width) / MAX_RENDER_PX))
    h, w = max(1, height // s), max(1, width // s)
    K_small = _K(focal / s, h, w).expand(V, 3, 3).clone()
    renderer = Renderer(registrar.volume.resampled(2), backend="grid_sample")
    T_cam_from_ct = invert(T_ref_from_cam) @ torch.as_tensor(T_ref_from_ct, dtype=torch.float64)[None]
    raw = acquire(renderer, T_cam_from_ct, K_small, h, w, config=AcquisitionConfig(n_samples=64))
    if (h, w) != (height, width):
        raw = F.interpolate(raw[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    raw = raw.clamp_min(1.0)
    if cfg.images_are_line_integrals:
        raw = torch.log(raw.max() / raw) + 1e-3
    return ViewSet.from_raw(raw, K, T_ref_from_cam, i0=cfg.i0, raw_is_line_integral=cfg.images_are_line_integrals)


def warm_up(registrar, cfg, T_start, *, model=None, overlay: bool = False) -> WarmupReport:
    """Run the engine once on synthetic views (see the module doc); ValueError naming
    ``warmup_image_size`` when the coarse network cannot take images of that size."""
    t0 = time.perf_counter()
    parts: dict[str, float] = {}
    height, width = warmup_image_size(cfg, model)
    t = time.perf_counter()
    views = synthetic_views(registrar, cfg, T_start, height, width)
    parts["views"] = time.perf_counter() - t
    starts = [Start(T_ref_from_ct=torch.as_tensor(T_start, dtype=torch.float64).clone(), source="warmup")]
    if model is not None:
        t = time.perf_counter()
        try:
            start = CoarseNetworkPose(model).start(StartRequest(views=views, centre_ct=registrar.centre_ct))
        except ValueError as e:
            raise ValueError(
                f"warmup_image_size {height}x{width}: the coarse network cannot take these images: {e}"
            ) from e
        parts["network"] = time.perf_counter() - t
        starts.insert(0, start)  # its hypotheses widen the global stage's batch
    _, run_parts = exercise(registrar, views, starts, cfg.pipeline, overlay=overlay)
    parts.update(run_parts)
    return WarmupReport(time_s=time.perf_counter() - t0, image_size=(height, width), views=len(views), parts=parts)
