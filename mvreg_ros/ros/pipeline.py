"""From a set of frames to an accepted or rejected pose (plain Python/PyTorch, no ROS).

frames -> ViewSet (checks, log, field of view) -> starting pose (initialisers) ->
``Registrar.refine`` -> quality gates -> the tracker keeps the pose only if every gate passes.
The starting pose (configured, tracked or the coarse network's) is never an output: only a
refined pose that passes every gate reaches the tracker, and the node publishes only the tracker's pose.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from ..core.refine import Registrar, RegistrationResult
from ..core.views import ViewSet
from .initializer import AcceptedPose, Initializer, PoseTracker, initial_pose, status_values
from .sync import Frame


@dataclasses.dataclass(frozen=True)
class QualityGates:
    """What a registration must reach to be published."""

    max_uncertainty_mm: float = 2.0  # 1-sigma RMS displacement of points on a 50 mm sphere around the anatomy centre
    min_similarity: float = 0.5  # every view's similarity (patch NCC + gradient NCC, 1 = identical)
    require_converged: bool = False  # also demand that the finest level stopped before its budget

    def __post_init__(self):
        if not self.max_uncertainty_mm > 0:
            raise ValueError(f"max_uncertainty_mm must be positive, got {self.max_uncertainty_mm}")
        if not -1 <= self.min_similarity <= 1:
            raise ValueError(f"min_similarity must be in [-1, 1], got {self.min_similarity}")


def gate_reason(result: RegistrationResult, gates: QualityGates) -> str:
    """'' when ``result`` passes every gate, else why not."""
    if not result.success:
        return result.reason or "registration failed"
    if gates.require_converged and not result.converged:
        return f"registration did not converge within {result.iterations} iterations"
    if not result.view_similarity:
        return "registration reported no per-view similarity"
    bad = [s for s in result.view_similarity if not math.isfinite(s)]  # min() skips NaN: check first
    worst = bad[0] if bad else min(result.view_similarity)
    if bad or worst < gates.min_similarity:
        return f"view similarity {worst:.3f} below min_similarity {gates.min_similarity}"
    if not math.isfinite(result.uncertainty_mm) or result.uncertainty_mm > gates.max_uncertainty_mm:
        return f"uncertainty {result.uncertainty_mm:.2f} mm above max_uncertainty_mm {gates.max_uncertainty_mm}"
    if not torch.isfinite(result.T_ref_from_ct).all():
        return "registration returned a non-finite pose"
    return ""


@dataclasses.dataclass(frozen=True, eq=False)
class Outcome:
    accepted: bool
    stamp_ns: int  # newest image stamp of the set
    reason: str  # '' when accepted
    init_source: str = ""
    result: RegistrationResult | None = None
    views: ViewSet | None = None
    sources: tuple[int, ...] = ()
    init_values: dict = dataclasses.field(default_factory=dict)  # extra status values of the initialiser


class RegistrationPipeline:
    def __init__(self, registrar: Registrar, *, initializers: Sequence[Initializer], gates: QualityGates,
                 tracker: PoseTracker, i0: float | None = None, raw_is_line_integral: bool = False):
        self.registrar = registrar
        self.initializers = list(initializers)
        self.gates = gates
        self.tracker = tracker
        self.i0 = i0
        self.raw_is_line_integral = raw_is_line_integral

    def views_from_frames(self, frames: Sequence[Frame]) -> ViewSet:
        """ValueError when the frames cannot form one view set."""
        if not frames:
            raise ValueError("empty view set")
        shapes = {f.shape for f in frames}
        if len(shapes) != 1:
            raise ValueError(f"views differ in size {sorted(shapes)}: all views of a set must share one image size")
        return ViewSet.from_raw(torch.stack([f.raw for f in frames]), torch.stack([f.K for f in frames]),
                                torch.stack([f.T_ref_from_cam for f in frames]), i0=self.i0,
                                raw_is_line_integral=self.raw_is_line_integral)

    def register(self, frames: Sequence[Frame]) -> Outcome:
        stamp = max(f.stamp_ns for f in frames) if frames else 0
        sources = tuple(f.source for f in frames)
        try:
            views = self.views_from_frames(frames)
        except ValueError as e:
            return Outcome(accepted=False, stamp_ns=stamp, reason=f"bad view set: {e}", sources=sources)
        T0, source = initial_pose(self.initializers, views, stamp)
        init_values = status_values(self.initializers, source)
        result = self.registrar.refine(views, T0)
        reason = gate_reason(result, self.gates)
        if not reason:
            self.tracker.accept(AcceptedPose(T_ref_from_ct=result.T_ref_from_ct.detach().to(torch.float64).cpu(),
                                             stamp_ns=stamp, covariance_ref=result.covariance_ref()))
        return Outcome(accepted=not reason, stamp_ns=stamp, reason=reason, init_source=source, result=result,
                       views=views, sources=sources, init_values=init_values)
