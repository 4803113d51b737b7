"""The acceptance test's ROC: true and false acceptance as one threshold moves.

Works on evaluation records that hold every signal of the acceptance test (``mvreg eval`` JSON
cases, e.g. from ``scripts/calibrate_acceptance.py``, which registers with the thresholds
disabled). A case whose refinement failed (curvature not positive definite, similarity below the
refinement's floor) is rejected at every threshold; the others are judged with
:class:`AcceptanceConfig` where only the swept threshold changes. The same order and rules as
``acceptance_test``, on the recorded signals (no registration is run again).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

from mvreg_ros.core.registration.acceptance import AcceptanceConfig, disagreeing_views

SWEEPS = ("min_view_similarity", "max_uncertainty_mm", "max_view_shift_mm", "max_view_gain")


def accepts(case: dict, config: AcceptanceConfig, *, min_similarity: float = 0.5) -> bool:
    """Would ``config`` accept this recorded case? ``min_similarity``: the refinement's own floor
    on the mean similarity (``RefineConfig.min_similarity``)."""
    sims = case.get("view_similarity") or []
    if len(sims) < config.min_views or not case.get("registration_success", False):
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
    if not config.view_agreement or len(sims) < 2:
        return True
    shifts, gains = case.get("view_shift_mm") or [], case.get("view_gain") or []
    if len(shifts) != len(sims) or len(gains) != len(sims):
        raise ValueError(
            f"case {case.get('specimen')} {case.get('views')} has no per-view agreement signals: "
            "record it with view_agreement on"
        )
    return not disagreeing_views(shifts, gains, config)


@dataclasses.dataclass(frozen=True)
class RocPoint:
    threshold: float
    true_acceptance: float | None  # accepted correct / correct
    false_acceptances: int  # accepted wrong (mTRE above the success threshold)
    accepted: int
    correct: int
    wrong: int


def sweep(
    cases: Sequence[dict], name: str, thresholds: Iterable[float], base: AcceptanceConfig = AcceptanceConfig()
) -> list[RocPoint]:
    """One :class:`RocPoint` per value of the threshold ``name`` (the other checks as in ``base``)."""
    if name not in SWEEPS:
        raise ValueError(f"can sweep one of {SWEEPS}, got {name!r}")
    correct = [c for c in cases if c["success"]]
    wrong = [c for c in cases if not c["success"]]
    points = []
    for t in thresholds:
        cfg = dataclasses.replace(base, **{name: float(t)})
        ok = sum(accepts(c, cfg) for c in correct)
        fa = sum(accepts(c, cfg) for c in wrong)
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
