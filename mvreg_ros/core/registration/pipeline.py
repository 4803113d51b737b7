"""From a view set to an accepted or rejected pose: start, global stage, local refinement,
acceptance test.

- a tracking start (the last accepted pose) is refined with the fast tracking budget first
  (:class:`TrackingConfig`: the finest pyramid level only, fewer iterations, chord Newton steps; when the
  start carries the curvature the last registration measured on the same views,
  :class:`~mvreg_ros.core.registration.curvature.HeldCurvature`, Newton steps alone on it in the first
  round); when that does not converge or fails the acceptance test, the full registration follows
  (``TrackingConfig.fallback``): by default its own path, the global stage around the start, the
  refinement and check 6, the path the acceptance test was calibrated on; "local": the local refinement
  from the same start first, then the global stage only when that fails too (the rule before); the
  fallback's result is judged with the fast path's best round beside it (check 7: the local pyramid from
  that round's pose must not end elsewhere, better; by default on every fallback);
  ``TrackingConfig.best_round`` adds the finest level alone from that round, judged by the whole acceptance
  test with check 6: "before" the full registration (accepted, it is the update) or "after" it (in place of
  a result that scores below the round); with ``AcceptanceConfig.other_scale`` every fallback's result (and
  that pass's) must also pass check 8, a probe under another scale of the similarity;
- any other start (configured, coarse network, perturbed truth) goes through the global stage
  (around the start and the network's hypotheses), then the local refinement from its best
  candidate.

Only a result that passes the acceptance test reaches the tracker (and so the node's TF).
``Outcome.stages`` lists what ran: ``("tracking",)`` for a fast update (``("tracking", "tracking")``
when its first round did not converge and a second, from where it ended, did; up to
``TrackingConfig.rounds`` of them, 3 by default, each with half the previous round's step sizes; after a
first round of Newton steps alone, first-order steps before them), ``("tracking", "global", "local")`` for
a fallback (with ``fallback="local"``: ``("tracking", "local")`` or ``("tracking", "local", "global",
"local")``), with ``"best_round"`` where that pass ran (``("tracking", "best_round")`` when "before" it was
accepted, ``("tracking", "global", "local", "best_round")`` when "after" it replaced the result). An
accepted result's curvature goes to the tracker with its pose, for the next update.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from mvreg_ros.core.evaluation.metrics import pose_distance
from mvreg_ros.core.imaging.views import ViewSet
from mvreg_ros.core.registration.acceptance import AcceptanceConfig, Verdict, acceptance_test
from mvreg_ros.core.registration.global_search import GlobalConfig, GlobalResult, global_search
from mvreg_ros.core.registration.initialisers import (
    AcceptedPose,
    Initialiser,
    PoseTracker,
    Start,
    StartRequest,
    first_start,
)
from mvreg_ros.core.registration.refine import Registrar, RegistrationResult, TrackingConfig


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    global_search: GlobalConfig = GlobalConfig()
    acceptance: AcceptanceConfig = AcceptanceConfig()
    tracking: TrackingConfig = TrackingConfig()  # the fast update of a tracking start (enabled=False: off)


@dataclasses.dataclass(frozen=True, eq=False)
class Outcome:
    accepted: bool
    reason: str  # '' when accepted
    start: Start | None = None
    result: RegistrationResult | None = None
    verdict: Verdict | None = None
    global_result: GlobalResult | None = None
    stages: tuple[str, ...] = ()  # what ran, in order: "tracking" (the fast update), "local", "global"
    time_s: float = 0.0
    stamp_ns: int = 0
    fast_result: RegistrationResult | None = None  # the fast path's best round (highest similarity), where it ran

    @property
    def fast(self) -> bool:
        """Whether the fast tracking path alone gave this outcome (no fallback)."""
        return bool(self.stages) and all(s == "tracking" for s in self.stages)

    @property
    def init_source(self) -> str:
        return self.start.source if self.start is not None else ""


def _margin(g: GlobalResult, centre_ct: Tensor, cfg: GlobalConfig) -> float | None:
    """The winner's similarity minus that of the best candidate that is a distinct pose."""
    if len(g.similarity) < 2:
        return None
    deg, mm = pose_distance(g.T_ref_from_ct[1:], g.best.expand(len(g.similarity) - 1, 4, 4), centre_ct)
    distinct = (deg >= cfg.distinct_deg) | (mm >= cfg.distinct_mm)
    if not bool(distinct.any()):
        return None
    return float(g.similarity[0] - g.similarity[1:][distinct].max())


def _better(
    best: RegistrationResult | None, result: RegistrationResult, tracking: TrackingConfig, registrar: Registrar
) -> RegistrationResult | None:
    """The fast round of the highest similarity so far, ``result`` or ``best`` (None while none is finite, or when
    the fast path's finest level renders otherwise than the full registration's, whose results check 7 compares
    it with)."""
    if tracking.n_samples not in (0, registrar.config.levels()[-1].n_samples):
        return None
    if not (math.isfinite(result.similarity) and bool(torch.isfinite(result.T_ref_from_ct).all())):
        return best
    return result if best is None or result.similarity > best.similarity else best


class RegistrationPipeline:
    def __init__(
        self,
        registrar: Registrar,
        *,
        initialisers: Sequence[Initialiser],
        config: PipelineConfig = PipelineConfig(),
        tracker: PoseTracker | None = None,
    ):
        self.registrar = registrar
        self.initialisers = list(initialisers)
        self.config = config
        self.tracker = tracker

    def _judge(
        self,
        views: ViewSet,
        result: RegistrationResult,
        margin: float | None,
        *,
        confirm: bool = False,
        fast: RegistrationResult | None = None,
        fallback: bool = False,
    ) -> Verdict:
        return acceptance_test(
            result,
            registrar=self.registrar,
            views=views,
            config=self.config.acceptance,
            margin=margin,
            confirm=confirm,
            fast=fast,
            fallback=fallback,
        )

    def register_from(self, views: ViewSet, start: Start, *, stamp_ns: int = 0) -> Outcome:
        t0 = time.perf_counter()
        stages: list[str] = []
        tracking = self.config.tracking
        fast: RegistrationResult | None = None  # the fast path's best round, for check 7 on its fallback
        if start.tracking and tracking.enabled:
            T = start.T_ref_from_ct
            # the curvature the held pose's registration measured, where it serves (same views, near, young)
            held = tracking.held_curvature_for(start.curvature, views, T, self.registrar)
            for k in range(tracking.rounds):  # an unconverged round goes on from where it ended, in smaller steps
                schedule = tracking.schedule(self.registrar.config, held=held is not None, round=k)
                result = self.registrar.refine(views, T, schedule=schedule, curvature=held)
                stages.append("tracking")
                fast = _better(fast, result, tracking, self.registrar)
                if result.converged or not torch.isfinite(result.T_ref_from_ct).all():
                    break
                T = result.T_ref_from_ct
                if held is not None:  # the next round's Newton steps on the curvature this one ended with
                    held = tracking.held_curvature_for(result.curvature, views, T, self.registrar)
            if result.converged or not tracking.require_converged:
                verdict = self._judge(views, result, None)
                if verdict.accepted:
                    return self._finish(views, start, result, verdict, None, stages, t0, stamp_ns, fast=fast)
        if fast is not None and tracking.best_round == "before":  # the finest level from the fast path's best round
            result, verdict = self._best_round(views, fast, stages)
            if verdict.accepted:
                return self._finish(views, start, result, verdict, None, stages, t0, stamp_ns, fast=fast)
        # a tracking start is refined locally first, unless its fast path already ran and falls back to the full
        # registration's own path (TrackingConfig.fallback "global": the global stage, then check 6)
        local_first = start.tracking and not (tracking.enabled and tracking.fallback == "global")
        if local_first or not self.config.global_search.enabled:
            result = self.registrar.refine(views, start.T_ref_from_ct)
            stages.append("local")
            if not self.config.global_search.enabled:
                return self._conclude(views, start, result, None, stages, t0, stamp_ns, fast=fast)
            verdict = self._judge(views, result, None, fast=fast, fallback="tracking" in stages)
            if verdict.accepted:
                return self._finish(views, start, result, verdict, None, stages, t0, stamp_ns, fast=fast)
        g = global_search(
            self.registrar, views, start.T_ref_from_ct, hypotheses=start.hypotheses, config=self.config.global_search
        )
        stages.append("global")
        result = self.registrar.refine(views, g.best)
        stages.append("local")
        return self._conclude(views, start, result, g, stages, t0, stamp_ns, fast=fast)

    def _best_round(
        self, views: ViewSet, fast: RegistrationResult, stages: list[str]
    ) -> tuple[RegistrationResult, Verdict]:
        """The finest level alone from the fast path's best round (``TrackingConfig.best_round``), judged by the
        whole acceptance test, check 6 included."""
        schedule = self.config.tracking.best_round_schedule(self.registrar.config)
        result = self.registrar.refine(views, fast.T_ref_from_ct, schedule=schedule)
        stages.append("best_round")
        return result, self._judge(views, result, None, confirm=True, fallback=True)

    def _conclude(self, views, start, result, g, stages, t0, stamp_ns, *, fast) -> Outcome:
        """The last result of a registration judged: after the global stage (``g``) a far start, so it must also
        be a stable optimum (check 6); with ``TrackingConfig.best_round`` "after", a fallback's result that scores
        below the fast path's best round (or not at all) gives way to the finest level's pass from that round."""
        if fast is not None and self.config.tracking.best_round == "after" and not result.similarity >= fast.similarity:
            result, verdict = self._best_round(views, fast, stages)
        else:
            margin = None if g is None else _margin(g, self.registrar.centre_ct, self.config.global_search)
            verdict = self._judge(
                views, result, margin, confirm=g is not None, fast=fast, fallback="tracking" in stages
            )
        return self._finish(views, start, result, verdict, g, stages, t0, stamp_ns, fast=fast)

    def _finish(self, views, start, result, verdict, g, stages, t0, stamp_ns, *, fast) -> Outcome:
        if verdict.accepted and self.tracker is not None:
            self.tracker.accept(
                AcceptedPose(
                    T_ref_from_ct=result.T_ref_from_ct.detach().to(torch.float64).cpu(),
                    stamp_ns=stamp_ns,
                    covariance_ref=result.covariance_ref(),
                    curvature=result.curvature,
                )
            )
        return Outcome(
            accepted=verdict.accepted,
            reason=verdict.reason,
            start=start,
            result=result,
            verdict=verdict,
            global_result=g,
            stages=tuple(stages),
            time_s=time.perf_counter() - t0,
            stamp_ns=stamp_ns,
            fast_result=fast,
        )

    def register(self, views: ViewSet, *, stamp_ns: int = 0, T_true_ref_from_ct: Tensor | None = None) -> Outcome:
        """Start from the first initialiser that gives a pose, then :meth:`register_from`."""
        request = StartRequest(
            views=views, stamp_ns=stamp_ns, T_true_ref_from_ct=T_true_ref_from_ct, centre_ct=self.registrar.centre_ct
        )
        return self.register_from(views, first_start(self.initialisers, request), stamp_ns=stamp_ns)
