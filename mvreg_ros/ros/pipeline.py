"""From a set of frames to the engine's registration pipeline (plain Python/PyTorch, no ROS).

frames -> ViewSet (checks, log, field of view) -> :class:`~mvreg_ros.core.registration.pipeline.RegistrationPipeline`
(start, global stage, refinement, acceptance test). The policy lives in the engine; this
module only turns the node's frames into views and keeps what the node reports (stamp, which
image topics took part).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from mvreg_ros.core.geometry.transforms import invert, project, transform_points
from mvreg_ros.core.imaging.views import ViewSet
from mvreg_ros.core.registration.pipeline import Outcome, RegistrationPipeline
from mvreg_ros.core.registration.refine import LevelSpec, Registrar, RegistrationResult
from mvreg_ros.ros.sync import Frame


@dataclasses.dataclass(frozen=True, eq=False)
class SetOutcome:
    """One view set's registration, as the node reports it."""

    accepted: bool
    stamp_ns: int  # newest image stamp of the set
    reason: str  # '' when accepted
    sources: tuple[int, ...] = ()  # image topic index of each view
    views: ViewSet | None = None
    outcome: Outcome | None = None  # the engine's (None when the frames could not form a view set)
    motion: str = ""  # what the motion rules did with the set (ros/motion.py; '' when nothing)

    @property
    def result(self) -> RegistrationResult | None:
        return None if self.outcome is None else self.outcome.result

    @property
    def init_source(self) -> str:
        return "" if self.outcome is None else self.outcome.init_source

    @property
    def init_values(self) -> dict:
        return {} if self.outcome is None or self.outcome.start is None else dict(self.outcome.start.values)


def views_from_frames(
    frames: Sequence[Frame], *, i0: float | None = None, raw_is_line_integral: bool = False
) -> ViewSet:
    """ValueError when the frames cannot form one view set."""
    if not frames:
        raise ValueError("empty view set")
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise ValueError(f"views differ in size {sorted(shapes)}: all views of a set must share one image size")
    return ViewSet.from_raw(
        torch.stack([f.raw for f in frames]),
        torch.stack([f.K for f in frames]),
        torch.stack([f.T_ref_from_cam for f in frames]),
        i0=i0,
        raw_is_line_integral=raw_is_line_integral,
    )


def register_frames(
    pipeline: RegistrationPipeline,
    frames: Sequence[Frame],
    *,
    i0: float | None = None,
    raw_is_line_integral: bool = False,
) -> SetOutcome:
    """Register one set of frames; a set that cannot form views is a rejection, not an exception."""
    stamp = max(f.stamp_ns for f in frames) if frames else 0
    sources = tuple(f.source for f in frames)
    try:
        views = views_from_frames(frames, i0=i0, raw_is_line_integral=raw_is_line_integral)
    except ValueError as e:
        return SetOutcome(accepted=False, stamp_ns=stamp, reason=f"bad view set: {e}", sources=sources)
    outcome = pipeline.register(views, stamp_ns=stamp)
    return SetOutcome(
        accepted=outcome.accepted, stamp_ns=stamp, reason=outcome.reason, sources=sources, views=views, outcome=outcome
    )


@dataclasses.dataclass(frozen=True)
class ViewProbe:
    """One view against a given pose: its similarity there (at the finest level, as the acceptance
    test measures it) and what a short single-view refinement from there does (the acceptance
    test's per-view agreement, applied to a new view and the held pose)."""

    similarity: float
    shift_mm: float  # how far the view alone moves the anatomy in its image plane (mm at the anatomy)
    gain: float  # the similarity it gains by doing so


def probe_view(
    registrar: Registrar,
    frame: Frame,
    T_ref_from_ct: Tensor,
    *,
    iterations: int,
    i0: float | None = None,
    raw_is_line_integral: bool = False,
) -> ViewProbe:
    """The new view ``frame`` against the pose ``T_ref_from_ct`` (mm): the computation of the engine's
    per-view agreement (``core.registration.acceptance.view_agreement``) for one view, which also
    keeps the similarity at the starting pose. ValueError when the frame cannot form a view."""
    views = views_from_frames([frame], i0=i0, raw_is_line_integral=raw_is_line_integral)
    cfg = registrar.config
    fine = cfg.levels()[-1]
    level = LevelSpec(size=fine.size, iterations=iterations, n_samples=fine.n_samples, patch=fine.patch)
    lr_scale = cfg.level_lr_decay ** (len(cfg.sizes) - 1)
    T = T_ref_from_ct.to(torch.float64).cpu()
    run = registrar.refine_level(views, T, level=level, lr_scale=lr_scale, early_stop=True)
    T_1 = run.T_ref_from_ct[0]
    c = registrar.centre_ct.to(torch.float64)
    pts = torch.cat(
        [c[None], c + 30.0 * torch.eye(3, dtype=torch.float64), c - 30.0 * torch.eye(3, dtype=torch.float64)]
    )
    T_cam_from_ref = invert(views.T_ref_from_cam[0].to(torch.float64))
    K = views.K[0].to(torch.float64)
    uv0 = project(K, T_cam_from_ref @ T, pts)
    uv1 = project(K, T_cam_from_ref @ T_1, pts)
    depth = float(transform_points(T_cam_from_ref @ T, pts[:1])[0, 2])
    shift = float((uv1 - uv0).norm(dim=-1).mean()) * abs(depth) / float(K[0, 0])
    start = float(run.start_similarity[0])
    return ViewProbe(similarity=start, shift_mm=shift, gain=float(run.similarity[0]) - start)
