"""The acceptance test's ROC: true and false acceptance as one threshold moves.

Works on evaluation records that hold every signal of the acceptance test (``mvreg eval`` JSON
cases, e.g. from ``scripts/calibrate_acceptance.py``, which registers with the thresholds
disabled). A case whose refinement failed (curvature not positive definite, similarity below the
refinement's floor) is rejected at every threshold, as is one whose curvature was positive definite
only at larger finite-difference steps than the judged ``max_curvature_scale``; the others are judged with
:class:`AcceptanceConfig` where only the swept threshold changes. The same order and rules as
``acceptance_test``, on the recorded signals (no registration is run again).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

from mvreg_ros.core.registration.acceptance import AcceptanceConfig, disagreeing_views, unstable_optimum
from mvreg_ros.core.registration.refine import RefineConfig

SWEEPS = (
    "min_view_similarity",
    "max_uncertainty_mm",
    "max_view_shift_mm",
    "max_view_gain",
    "max_curvature_scale",
    "max_confirm_shift_mm",
    "max_confirm_gain",
    "max_confirm_gain_alone",
)


def accepts(
    case: dict,
    config: AcceptanceConfig,
    *,
    min_similarity: float = RefineConfig().min_similarity,
    max_curvature_scale: float = math.inf,
) -> bool:
    """Would ``config`` accept this recorded case? ``min_similarity``: the refinement's own floor
    on the mean similarity (``RefineConfig.min_similarity``). ``max_curvature_scale``: a case whose
    curvature was positive definite only with larger finite-difference steps than this (its
    recorded ``curvature_scale``; ``RefineConfig.curvature_fallback_tries``) counts as failed. A record
    without ``curvature_scale`` (made before it was recorded) is judged as its engine judged it."""
    sims = case.get("view_similarity") or []
    if len(sims) < config.min_views or not case.get("registration_success", False):
        return False
    if case.get("curvature_scale", 0.0) > max_curvature_scale:
        return False
    mean = case.get("similarity")
    if mean is None or not math.isfinite(mean) or mean < min_similarity:
        return False
    if config.require_converged and not case.get("converged", False):
        return False
    if any(s is None or not math.isfinite(s) for s in sims) or min(sims) < config.min_view_similarity:
        return False
    unc = case.get("uncertainty_mm")
    if unc is None or not math.isfinite(unc) or unc > config.max_uncertainty_mm:
        return False
    margin = case.get("margin")
    if margin is not None and config.min_margin > 0 and margin < config.min_margin:
        return False
    if config.view_agreement and len(sims) >= 2:
        shifts, gains = case.get("view_shift_mm") or [], case.get("view_gain") or []
        if len(shifts) != len(sims) or len(gains) != len(sims):
            raise ValueError(
                f"case {case.get('specimen')} {case.get('views')} has no per-view agreement signals: "
                "record it with view_agreement on"
            )
        if disagreeing_views(shifts, gains, config):
            return False
    # check 6, where the case records it (the global stage's path; records made before it existed: as judged)
    shift, gain = case.get("confirm_shift_mm"), case.get("confirm_gain")
    return not config.confirm or shift is None or gain is None or not unstable_optimum(shift, gain, config)


@dataclasses.dataclass(frozen=True)
class RocPoint:
    threshold: float
    true_acceptance: float | None  # accepted correct / correct
    false_acceptances: int  # accepted wrong (mTRE above the success threshold)
    accepted: int
    correct: int
    wrong: int


def default_curvature_scale(refine: RefineConfig = RefineConfig()) -> float:
    """The largest finite-difference scale at which ``refine`` measures the curvature (its last fallback)."""
    return refine.curvature_scales()[-1]


def sweep(
    cases: Sequence[dict],
    name: str,
    thresholds: Iterable[float],
    base: AcceptanceConfig = AcceptanceConfig(),
    *,
    max_curvature_scale: float = math.inf,
) -> list[RocPoint]:
    """One :class:`RocPoint` per value of the threshold ``name`` (the other checks as in ``base``,
    and the curvature judged up to ``max_curvature_scale``, see :func:`accepts`; sweeping
    ``max_curvature_scale`` itself moves that one)."""
    if name not in SWEEPS:
        raise ValueError(f"can sweep one of {SWEEPS}, got {name!r}")
    if name == "max_curvature_scale":
        unknown = [c for c in cases if c.get("registration_success") and "curvature_scale" not in c]
        if unknown:
            raise ValueError(
                f"{len(unknown)} case(s) (e.g. {unknown[0].get('specimen')} {unknown[0].get('views')}) record no "
                "curvature_scale: record them with this version to sweep max_curvature_scale"
            )
    correct = [c for c in cases if c["success"]]
    wrong = [c for c in cases if not c["success"]]
    points = []
    for t in thresholds:
        cfg = base if name == "max_curvature_scale" else dataclasses.replace(base, **{name: float(t)})
        limit = float(t) if name == "max_curvature_scale" else max_curvature_scale
        ok = sum(accepts(c, cfg, max_curvature_scale=limit) for c in correct)
        fa = sum(accepts(c, cfg, max_curvature_scale=limit) for c in wrong)
        points.append(
            RocPoint(
                threshold=float(t),
                true_acceptance=ok / len(correct) if correct else None,
                false_acceptances=fa,
                accepted=ok + fa,
                correct=len(correct),
                wrong=len(wrong),
            )
        )
    return points


def markdown(name: str, points: Sequence[RocPoint]) -> str:
    rows = [
        f"| `{name}` | accepted | true acceptance | false acceptances (of {points[0].wrong} wrong) |",
        "|---|---|---|---|",
    ]
    for p in points:
        ta = "-" if p.true_acceptance is None else f"{100 * p.true_acceptance:.1f} %"
        rows.append(f"| {p.threshold:g} | {p.accepted} | {ta} | {p.false_acceptances} |")
    return "\n".join(rows)
