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

from mvreg_ros.core.imaging.views import ViewSet
from mvreg_ros.core.registration.acceptance import ViewProbe
from mvreg_ros.core.registration.acceptance import probe_view as engine_probe_view
from mvreg_ros.core.registration.pipeline import Outcome, RegistrationPipeline
from mvreg_ros.core.registration.refine import Registrar, RegistrationResult
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


def probe_view(
    registrar: Registrar,
    frame: Frame,
    T_ref_from_ct: Tensor,
    *,
    iterations: int,
    i0: float | None = None,
    raw_is_line_integral: bool = False,
) -> ViewProbe:
    """The new view ``frame`` against the pose ``T_ref_from_ct`` (mm): the engine's per-view probe
    (:func:`mvreg_ros.core.registration.acceptance.probe_view`). ValueError when the frame cannot
    form a view."""
    views = views_from_frames([frame], i0=i0, raw_is_line_integral=raw_is_line_integral)
    return engine_probe_view(registrar, views, T_ref_from_ct, iterations=iterations)
