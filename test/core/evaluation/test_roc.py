"""The acceptance test's ROC on recorded cases: the same rules as acceptance_test, one threshold swept."""

import dataclasses

import pytest

from mvreg_ros.core.evaluation.roc import accepts, markdown, sweep
from mvreg_ros.core.registration.acceptance import AcceptanceConfig


def _case(success, sims=(0.8, 0.7), unc=0.5, shifts=(0.1, 0.2), gains=(0.0, 0.001), ok=True):
    return {
        "success": success,
        "registration_success": ok,
        "similarity": sum(sims) / len(sims),
        "view_similarity": list(sims),
        "uncertainty_mm": unc,
        "view_shift_mm": list(shifts),
        "view_gain": list(gains),
    }


def test_accepts_follows_each_check():
    cfg = AcceptanceConfig()
    assert accepts(_case(True), cfg)
    assert not accepts(_case(True, ok=False), cfg)  # the refinement failed (curvature)
    assert not accepts(_case(True, sims=(0.8,)), cfg)  # one view
    low = cfg.min_view_similarity
    assert not accepts(_case(True, sims=(0.8, low - 0.01)), cfg)
    assert accepts(_case(True, sims=(0.8, low)), cfg)
    assert not accepts(_case(True, unc=2.5), cfg)
    assert not accepts(_case(True, shifts=(0.1, 2.0), gains=(0.0, 0.02)), cfg)  # both exceeded
    assert accepts(_case(True, shifts=(0.1, 2.0), gains=(0.0, 0.005)), cfg)  # shift alone is not enough
    # the mean below the refinement's floor (RefineConfig.min_similarity), each view above the acceptance test's
    assert not accepts(_case(True, sims=(0.4, 0.45)), AcceptanceConfig(min_view_similarity=0.4), min_similarity=0.45)
    assert accepts(_case(True, sims=(0.4, 0.5)), AcceptanceConfig(min_view_similarity=0.4), min_similarity=0.45)
    unconverged = {**_case(True), "converged": False, "margin": 0.01}
    assert accepts(unconverged, cfg) and not accepts(unconverged, AcceptanceConfig(require_converged=True))
    assert not accepts(unconverged, AcceptanceConfig(min_margin=0.02))
    with pytest.raises(ValueError, match="per-view agreement"):
        accepts(_case(True, shifts=()), cfg)


def test_accepts_judges_check_6_where_the_case_records_it():
    cfg = AcceptanceConfig(confirm=True)
    rec = lambda shift, gain: {**_case(True), "confirm_shift_mm": shift, "confirm_gain": gain}
    assert accepts(_case(True), cfg)  # recorded without it (a tracking update, an older record)
    assert not accepts(rec(1.5, 0.01), cfg)  # moved and gained: an unstable optimum
    assert accepts(rec(1.5, 0.001), cfg) and accepts(rec(0.5, 0.01), cfg)  # one of the two is not enough
    assert not accepts(rec(float("nan"), 0.0), cfg)
    assert not accepts(rec(1.5, 0.003), AcceptanceConfig())  # on by default, a gain over 0.002 with the move
    # the tracking fallback's near-miss (docs/acceptance.md): 2.51 mm off, moved 0.85 mm and gained 0.0197
    assert not accepts(rec(0.85, 0.0197), AcceptanceConfig())
    before = AcceptanceConfig(max_confirm_shift_mm=1.0, max_confirm_gain_alone=2.0)  # 2: off (NCC gains <= 2)
    assert accepts(rec(0.85, 0.0197), before)  # the thresholds before let it pass
    # the next seed's near-miss, 2.43 mm off: moved 0.747 mm (under 0.75) and gained 0.0198: the gain alone rejects it
    assert not accepts(rec(0.747, 0.0198), AcceptanceConfig())
    assert accepts(rec(0.747, 0.0198), dataclasses.replace(AcceptanceConfig(), max_confirm_gain_alone=0.02))
    assert accepts(rec(0.44, 0.0095), AcceptanceConfig())  # the largest gain of a correct result measured (v24)
    assert accepts(rec(0.3, 0.01), AcceptanceConfig()) and not accepts(rec(0.3, 0.0101), AcceptanceConfig())
    assert accepts(rec(1.5, 0.01), AcceptanceConfig(confirm=False))
    assert accepts(rec(1.5, 0.01), AcceptanceConfig(confirm=True, max_confirm_shift_mm=2.0))
    points = sweep([rec(1.5, 0.01), rec(0.2, 0.0)], "max_confirm_gain", (0.005, 0.02), cfg)
    assert [p.accepted for p in points] == [1, 2]


def test_sweep_counts_true_and_false_acceptances():
    cases = [_case(True, sims=(0.9, 0.6)), _case(True, sims=(0.9, 0.8)), _case(False, sims=(0.7, 0.65))]
    points = sweep(cases, "min_view_similarity", (0.5, 0.62, 0.7))
    assert [(p.accepted, p.false_acceptances) for p in points] == [(3, 1), (2, 1), (1, 0)]
    assert [p.true_acceptance for p in points] == [1.0, 0.5, 0.5]
    assert points[0].correct == 2 and points[0].wrong == 1
    table = markdown("min_view_similarity", points)
    assert "| 0.62 | 2 | 50.0 % | 1 |" in table
    with pytest.raises(ValueError, match="can sweep"):
        sweep(cases, "min_views", (1,))


def test_curvature_scale_sweep_rejects_cases_that_needed_larger_steps():
    """A case records the finite-difference scale its curvature was positive definite at; a smaller
    ``max_curvature_scale`` (fewer fallbacks) judges it failed, as the refinement would have."""
    at = lambda scale, success: {**_case(success), "curvature_scale": scale}
    cases = [at(1.0, True), at(2.0, True), at(4.0, True), at(4.0, False)]
    assert accepts(at(4.0, True), AcceptanceConfig()) and not accepts(
        at(4.0, True), AcceptanceConfig(), max_curvature_scale=2
    )
    assert accepts(_case(True), AcceptanceConfig(), max_curvature_scale=1)  # older records: judged as their engine did
    with pytest.raises(ValueError, match="curvature_scale"):  # ... but they cannot be swept on it
        sweep([_case(True)], "max_curvature_scale", (1,))
    points = sweep(cases, "max_curvature_scale", (1, 2, 4))
    assert [(p.accepted, p.false_acceptances) for p in points] == [(1, 0), (2, 0), (4, 1)]


def test_other_sweeps_judge_the_curvature_as_the_engine_default():
    """The other thresholds' sweeps count a case measured beyond the engine's fallbacks as failed."""
    from mvreg_ros.core.evaluation.roc import default_curvature_scale
    from mvreg_ros.core.registration.refine import RefineConfig

    assert default_curvature_scale() == 4.0  # two fallbacks, steps twice and four times the default
    assert default_curvature_scale(RefineConfig(curvature_fallback_tries=1)) == 2.0
    assert default_curvature_scale(RefineConfig(curvature_fallback_tries=2)) == 4.0
    assert default_curvature_scale(RefineConfig(curvature_fallback_scale=0.0)) == 1.0
    cases = [{**_case(True), "curvature_scale": 4.0}, {**_case(True), "curvature_scale": 2.0}]
    one_fallback = default_curvature_scale(RefineConfig(curvature_fallback_tries=1))
    (point,) = sweep(cases, "min_view_similarity", (0.5,), max_curvature_scale=one_fallback)
    assert point.accepted == 1
