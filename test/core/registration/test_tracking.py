"""The tracking update: a tracking start (the last accepted pose) is refined with the fast budget
(TrackingConfig: the finest level only, fewer iterations, Newton steps on one curvature), judged by
the same acceptance test, and falls back to the full registration when it does not converge or
is rejected. Scripted tests check the policy; tests on the shipped CT pooled by 4 check that a
small motion is recovered by the fast path, that it agrees with the normal refinement, and that
a start far off falls back."""

import dataclasses

import pytest
import torch
from ct_fixtures import REFINE  # the pyramid of the fixtures ct, registrar and biplane
from test_pipeline_scripted import gates, pose, result, views

from mvreg_ros.core.evaluation.landmarks import ct_landmarks
from mvreg_ros.core.evaluation.metrics import mtre_mm, pose_distance
from mvreg_ros.core.geometry import transforms as geometry
from mvreg_ros.core.registration.global_search import GlobalConfig
from mvreg_ros.core.registration.initialisers import AcceptedPose, LastAcceptedPose, PoseTracker, Start
from mvreg_ros.core.registration.pipeline import PipelineConfig, RegistrationPipeline
from mvreg_ros.core.registration.refine import Objective, RefineConfig, Registrar, Schedule, TrackingConfig

GLOBAL = GlobalConfig(candidates=64, keep=6, iterations=40)


# ---------------------------------------------------------------------------------------
# The budget
# ---------------------------------------------------------------------------------------


def test_the_best_round_pass_is_the_fast_schedules_second_round_with_more_steps():
    refine = RefineConfig(sizes=(32, 64), iterations=(60, 40), n_samples=(64, 96), patches=(8, 6))
    t = TrackingConfig(best_round_iterations=13)
    s = t.best_round_schedule(refine)
    assert s == dataclasses.replace(t, iterations=13).schedule(refine, held=False, round=1)
    assert [(lv.size, lv.iterations, lv.n_samples) for lv in s.levels] == [(64, 13, 96)]
    assert s.lr_scale == pytest.approx(0.5 * t.step_scale) and s.held_max_rot_deg == 0.0
    assert TrackingConfig().best_round_iterations == 20


def test_tracking_schedule_skips_the_coarse_levels():
    refine = RefineConfig(sizes=(32, 64), iterations=(60, 40), n_samples=(64, 96), patches=(8, 6))
    s = TrackingConfig().schedule(refine)
    assert isinstance(s, Schedule) and len(s.levels) == 1
    fine = s.levels[0]
    assert (fine.size, fine.patch) == (64, 6)  # the finest level's image size and patch
    assert fine.iterations == TrackingConfig().iterations < 40
    assert fine.n_samples == 96  # by default the level's own samples: the renders the full path compiled
    assert TrackingConfig(n_samples=48).schedule(refine).levels[0].n_samples == 48
    assert s.lr_scale == TrackingConfig().step_scale == 0.35  # steps sized to small motion
    s0 = TrackingConfig(step_scale=0.0).schedule(refine)
    assert s0.lr_scale == pytest.approx(refine.level_lr_decay)  # 0: the step sizes the full pyramid uses there
    assert s.newton_steps == 3 and s.chord and not s.fresh_curvature
    assert not refine.schedule().chord  # the full refinement measures the curvature at each Newton step
    # more levels than the pyramid has: all of them
    s2 = TrackingConfig(levels=5, iterations=7, step_scale=0.0).schedule(refine)
    assert [lv.size for lv in s2.levels] == [32, 64] and [lv.n_samples for lv in s2.levels] == [64, 96]
    assert s2.lr_scale == 1.0 and {lv.iterations for lv in s2.levels} == {7}
    # the full schedule is the configured pyramid
    full = refine.schedule()
    assert full.levels == refine.levels() and full.newton_steps == refine.newton_steps and full.fresh_curvature


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(levels=0), ValueError, "levels must be >= 1, got 0"),
        (dict(iterations=0), ValueError, "iterations must be >= 1"),
        (dict(n_samples=-1), ValueError, "n_samples must be >= 0"),
        (dict(newton_steps=-1), ValueError, "newton_steps"),
        (dict(iterations=2.5), TypeError, "iterations"),  # (beartype's check in the tests, ours elsewhere)
        (dict(step_scale=-0.1), ValueError, r"step_scale must be a number in \[0, 1\], got -0.1"),
        (dict(step_scale=1.5), ValueError, "step_scale"),
        (dict(chord=1), TypeError, "chord"),
        (dict(best_round="always"), ValueError, "best_round must be one of"),
        (dict(best_round_iterations=0), ValueError, "best_round_iterations must be >= 1"),
    ],
)
def test_tracking_config_rejects_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        TrackingConfig(**kwargs)


def test_schedule_rejects_a_chord_that_is_not_a_bool():
    with pytest.raises(TypeError, match="chord"):
        Schedule(levels=REFINE.levels(), chord="yes")


def test_refine_rejects_a_schedule_of_the_wrong_type():
    reg = Registrar.__new__(Registrar)  # the check comes before any work
    reg.config = RefineConfig()
    with pytest.raises(TypeError, match="schedule"):
        reg.refine(views(), pose(0), schedule=TrackingConfig())


# ---------------------------------------------------------------------------------------
# The policy, with a scripted refinement
# ---------------------------------------------------------------------------------------


class Scripted(Registrar):
    """refine() returns the scripted results in order and records its starts and schedules."""

    def __init__(self, results):
        self.results = list(results)
        self.calls = []
        self.curvatures = []
        self.centre_ct = torch.zeros(3, dtype=torch.float64)
        self.config = REFINE

    def refine(self, views, T_init, *, schedule=None, curvature=None):
        self.calls.append((T_init.clone(), schedule))
        self.curvatures.append(curvature)
        return self.results.pop(0)


def _pipeline(results, tracking=TrackingConfig()):
    tracker = PoseTracker()
    tracker.accept(AcceptedPose(T_ref_from_ct=pose(1), stamp_ns=1))
    reg = Scripted(results)
    config = PipelineConfig(global_search=GlobalConfig(enabled=False), acceptance=gates(), tracking=tracking)
    return RegistrationPipeline(reg, initialisers=[LastAcceptedPose(tracker)], config=config, tracker=tracker), reg


def test_a_converged_accepted_fast_result_is_the_update():
    p, reg = _pipeline([result(pose(2))])
    o = p.register(views(), stamp_ns=5)
    assert o.accepted and o.stages == ("tracking",)
    ((T_start, schedule),) = reg.calls
    torch.testing.assert_close(T_start, pose(1))
    assert schedule == TrackingConfig().schedule(REFINE)
    torch.testing.assert_close(p.tracker.latest().T_ref_from_ct, pose(2))


@pytest.mark.parametrize(
    "fast",
    [
        result(pose(2), converged=False),  # not converged: falls back without the acceptance test
        result(pose(2), sims=(0.9, 0.05)),  # converged but rejected
        result(pose(2), success=False, reason="refinement failed: boom"),
    ],
)
def test_a_fast_result_that_does_not_converge_or_is_rejected_falls_back(fast):
    p, reg = _pipeline([fast, result(pose(3))], tracking=TrackingConfig(rounds=1))
    o = p.register(views(), stamp_ns=5)
    assert o.accepted and o.stages == ("tracking", "local")
    (T_fast, s_fast), (T_local, s_local) = reg.calls
    assert s_fast is not None and s_local is None  # then the normal refinement, from the same start
    torch.testing.assert_close(T_local, T_fast)
    torch.testing.assert_close(p.tracker.latest().T_ref_from_ct, pose(3))


def test_an_unconverged_fast_round_goes_on_from_where_it_ended_in_smaller_steps():
    p, reg = _pipeline([result(pose(2), converged=False), result(pose(3))])
    o = p.register(views(), stamp_ns=5)
    assert o.accepted and o.stages == ("tracking", "tracking") and o.fast
    (T1, s1), (T2, s2) = reg.calls
    torch.testing.assert_close(T1, pose(1))
    torch.testing.assert_close(T2, pose(2))  # from the first round's end
    assert s2.lr_scale == pytest.approx(0.5 * s1.lr_scale) and s2.levels == s1.levels
    torch.testing.assert_close(p.tracker.latest().T_ref_from_ct, pose(3))


def test_default_budget_allows_a_third_round_in_smaller_steps_still():
    """The default ``TrackingConfig`` (3 rounds): two unconverged rounds, then a third from where the
    second ended, with half its step sizes; converged, it is a fast update."""
    assert TrackingConfig().rounds == 3
    p, reg = _pipeline([result(pose(2), converged=False), result(pose(3), converged=False), result(pose(4))])
    o = p.register(views(), stamp_ns=5)
    assert o.accepted and o.stages == ("tracking", "tracking", "tracking") and o.fast
    (_, s1), (_, s2), (T3, s3) = reg.calls
    torch.testing.assert_close(T3, pose(3))  # from the second round's end
    assert s3.lr_scale == pytest.approx(0.5 * s2.lr_scale) and s2.lr_scale == pytest.approx(0.5 * s1.lr_scale)
    torch.testing.assert_close(p.tracker.latest().T_ref_from_ct, pose(4))


def test_fast_rounds_that_never_converge_fall_back_to_the_full_registration():
    p, reg = _pipeline(
        [result(pose(2), converged=False), result(pose(3), converged=False), result(pose(4))],
        tracking=TrackingConfig(rounds=2),
    )
    o = p.register(views(), stamp_ns=5)
    assert o.accepted and o.stages == ("tracking", "tracking", "local") and not o.fast
    (_, s1), (_, s2), (T_local, s_local) = reg.calls
    assert s1 is not None and s2 is not None and s_local is None
    torch.testing.assert_close(T_local, pose(1))  # the full registration starts from the tracking start again
    torch.testing.assert_close(p.tracker.latest().T_ref_from_ct, pose(4))


@pytest.mark.parametrize(
    "fallback, stages", [("local", ("tracking", "local")), ("global", ("tracking", "global", "local"))]
)
def test_a_fast_path_without_an_accepted_result_falls_back_as_configured(fallback, stages, monkeypatch):
    """TrackingConfig.fallback: "local" refines from the same start first (the global stage only if that is
    rejected too); "global" takes the full registration's own path at once (global stage, refinement, check 6)."""
    from mvreg_ros.core.registration import pipeline as pipeline_module
    from mvreg_ros.core.registration.global_search import GlobalResult

    searched = []

    def scripted_search(registrar, views, T, *, hypotheses, config):
        searched.append(T.clone())
        return GlobalResult(T_ref_from_ct=pose(4)[None], similarity=torch.ones(1), scored=1, time_s=0.0)

    monkeypatch.setattr(pipeline_module, "global_search", scripted_search)
    tracker = PoseTracker()
    tracker.accept(AcceptedPose(T_ref_from_ct=pose(1), stamp_ns=1))
    reg = Scripted([result(pose(2), converged=False), result(pose(3))])
    config = PipelineConfig(acceptance=gates(confirm=False), tracking=TrackingConfig(rounds=1, fallback=fallback))
    p = RegistrationPipeline(reg, initialisers=[LastAcceptedPose(tracker)], config=config, tracker=tracker)
    o = p.register(views(), stamp_ns=5)
    assert o.accepted and o.stages == stages
    (_, s_fast), (T_fallback, s_fallback) = reg.calls
    assert s_fast is not None and s_fallback is None
    if fallback == "global":  # the global stage around the tracking start, the refinement from its best candidate
        torch.testing.assert_close(searched[0], pose(1))
        torch.testing.assert_close(T_fallback, pose(4))
    else:
        assert not searched
        torch.testing.assert_close(T_fallback, pose(1))


@pytest.mark.parametrize("fallback", ["local", "global"])
def test_a_fallback_is_judged_with_the_fast_paths_best_round(fallback, monkeypatch):
    """Check 7's input: the fast round of the highest similarity (the second here, 0.695, not the last,
    0.69), given to the fallback's acceptance test (either way of falling back), not to the fast path's own;
    Outcome.fast_result keeps it."""
    from mvreg_ros.core.registration import pipeline as pipeline_module
    from mvreg_ros.core.registration.global_search import GlobalResult

    monkeypatch.setattr(
        pipeline_module,
        "global_search",
        lambda *a, **kw: GlobalResult(T_ref_from_ct=pose(4)[None], similarity=torch.ones(1), scored=1, time_s=0.0),
    )
    judged = []
    real = pipeline_module.acceptance_test
    monkeypatch.setattr(
        pipeline_module, "acceptance_test", lambda result, **kw: judged.append(kw["fast"]) or real(result, **kw)
    )
    tracker = PoseTracker()
    tracker.accept(AcceptedPose(T_ref_from_ct=pose(1), stamp_ns=1))
    rounds = [
        result(pose(2), converged=False, sims=(0.68, 0.68)),
        result(pose(2), converged=False, sims=(0.695, 0.695)),
        result(pose(3), sims=(0.69, 0.69), unc=99.0),  # converged, rejected
    ]
    reg = Scripted(rounds + [result(pose(5), sims=(0.70, 0.70))])
    config = PipelineConfig(acceptance=gates(confirm=False), tracking=TrackingConfig(rounds=3, fallback=fallback))
    p = RegistrationPipeline(reg, initialisers=[LastAcceptedPose(tracker)], config=config, tracker=tracker)
    o = p.register(views(), stamp_ns=5)
    assert o.accepted and not reg.results
    assert judged[0] is None  # the fast path's own verdict (its third round converged, rejected: uncertainty)
    assert judged[1] is o.fast_result and o.fast_result.similarity == pytest.approx(0.695)
    assert o.verdict.fallback_drop == pytest.approx(0.695 - 0.70)  # the result scored higher: check 7 not run
    assert o.verdict.cross_shift_mm is None


def test_check_7_has_no_fast_round_to_start_from_without_a_finite_one_at_the_same_level(monkeypatch):
    """No fast path (a full registration), a fast path of other samples per ray than the finest level's
    (its similarity is not comparable), or fast rounds that all ended non-finite: no best round. With one
    that scored higher than the fallback's result, check 7 runs from its pose."""
    from mvreg_ros.core.registration import acceptance as acceptance_module

    starts = []

    def stable_pass(registrar, views, T, *, start=None):
        starts.append(start)
        return acceptance_module.SecondPass(shift_mm=0.1, gain=0.0, T_ref_from_ct=T)

    monkeypatch.setattr(acceptance_module, "second_pass", stable_pass)
    fast = result(pose(2), converged=False, sims=(0.9, 0.9))
    low = result(pose(3), sims=(0.5, 0.5))
    p, _ = _pipeline([low])
    o = p.register_from(views(), Start(T_ref_from_ct=pose(0), source="configured"))
    assert o.fast_result is None and o.verdict.fallback_drop is None
    other = TrackingConfig(rounds=1, n_samples=REFINE.levels()[-1].n_samples + 8)
    p, _ = _pipeline([fast, low], tracking=other)
    o = p.register(views(), stamp_ns=5)
    assert o.accepted and o.fast_result is None
    nan = result(torch.full((4, 4), float("nan"), dtype=torch.float64), converged=False, sims=(0.9, 0.9))
    p, _ = _pipeline([nan, low], tracking=TrackingConfig(rounds=1))
    o = p.register(views(), stamp_ns=5)
    assert o.accepted and o.fast_result is None
    p, _ = _pipeline([fast, low], tracking=TrackingConfig(rounds=1))
    o = p.register(views(), stamp_ns=5)
    assert o.accepted and o.fast_result is fast and o.verdict.fallback_drop == pytest.approx(0.4)
    assert len(starts) == 1 and o.verdict.cross_shift_mm == 0.1
    torch.testing.assert_close(starts[0], pose(2))


def _stable_check_6(monkeypatch, shift_mm=0.1, gain=0.0):
    """Check 6's second pass scripted: ``shift_mm`` / ``gain`` from wherever it is asked; records the poses."""
    from mvreg_ros.core.registration import acceptance as acceptance_module

    judged = []

    def scripted_pass(registrar, views, T, *, start=None):
        judged.append(T.clone())
        return acceptance_module.SecondPass(shift_mm=shift_mm, gain=gain, T_ref_from_ct=T)

    monkeypatch.setattr(acceptance_module, "second_pass", scripted_pass)
    return judged


@pytest.mark.parametrize("pass_unc, accepted", [(1.0, True), (99.0, False)])
def test_best_round_before_refines_the_finest_level_from_the_best_fast_round_first(pass_unc, accepted, monkeypatch):
    """TrackingConfig.best_round "before": on a fallback, the finest level alone from the fast round of the highest
    similarity (the first here), with best_round_schedule, judged with check 6; accepted, it is the update (no
    full registration); rejected, the fallback follows as configured and is judged with the fast round beside it."""
    judged = _stable_check_6(monkeypatch)
    rounds = [result(pose(2), converged=False, sims=(0.8, 0.8)), result(pose(3), converged=False, sims=(0.7, 0.7))]
    tracking = TrackingConfig(rounds=2, best_round="before")
    p, reg = _pipeline(rounds + [result(pose(4), unc=pass_unc), result(pose(5))], tracking=tracking)
    o = p.register(views(), stamp_ns=5)
    T_pass, s_pass = reg.calls[2]
    torch.testing.assert_close(T_pass, pose(2))  # from the best round, not the last
    assert s_pass == tracking.best_round_schedule(REFINE)
    assert o.accepted and o.fast_result is rounds[0]
    if accepted:
        torch.testing.assert_close(judged[0], pose(4))  # check 6 on the pass's result
        assert o.stages == ("tracking", "tracking", "best_round") and not o.fast and len(reg.calls) == 3
        torch.testing.assert_close(p.tracker.latest().T_ref_from_ct, pose(4))
    else:  # the local fallback (global stage off here) from the tracking start, judged beside the best round
        assert o.stages == ("tracking", "tracking", "best_round", "local")
        torch.testing.assert_close(reg.calls[3][0], pose(1))
        assert o.verdict.fallback_drop == pytest.approx(0.8 - 0.85)
        torch.testing.assert_close(p.tracker.latest().T_ref_from_ct, pose(5))


@pytest.mark.parametrize(
    "fallback_sims, pass_unc, replaced",
    [
        ((0.75, 0.75), 1.0, True),
        ((0.75, 0.75), 99.0, True),
        ((float("nan"), 0.9), 1.0, True),
        ((0.85, 0.85), 1.0, False),
    ],
)
def test_best_round_after_replaces_a_fallback_that_scores_below_the_fast_round(
    fallback_sims, pass_unc, replaced, monkeypatch
):
    """TrackingConfig.best_round "after": a fallback's result scoring below the fast path's best round (0.8), or
    not at all, gives way to the finest level's pass from that round, whose verdict (check 6 included) is the
    update's; one scoring higher is judged as before."""
    judged = _stable_check_6(monkeypatch)
    fast = result(pose(2), converged=False, sims=(0.8, 0.8))
    tracking = TrackingConfig(rounds=1, best_round="after")
    p, reg = _pipeline([fast, result(pose(3), sims=fallback_sims), result(pose(4), unc=pass_unc)], tracking=tracking)
    o = p.register(views(), stamp_ns=5)
    if not replaced:
        assert o.stages == ("tracking", "local") and o.accepted and len(reg.calls) == 2
        torch.testing.assert_close(o.result.T_ref_from_ct, pose(3))
        return
    assert o.stages == ("tracking", "local", "best_round")
    T_pass, s_pass = reg.calls[2]
    torch.testing.assert_close(T_pass, pose(2))
    assert s_pass == tracking.best_round_schedule(REFINE)
    torch.testing.assert_close(o.result.T_ref_from_ct, pose(4))
    if pass_unc < 5:  # accepted, check 6 run on it
        assert o.accepted and len(judged) == 1
        torch.testing.assert_close(judged[0], pose(4))
        torch.testing.assert_close(p.tracker.latest().T_ref_from_ct, pose(4))
    else:  # the pass's verdict, not the fallback's (which the gates would have accepted)
        assert not o.accepted and "uncertainty" in o.reason
        torch.testing.assert_close(p.tracker.latest().T_ref_from_ct, pose(1))


def test_best_round_after_follows_the_global_path_too(monkeypatch):
    from mvreg_ros.core.registration import pipeline as pipeline_module
    from mvreg_ros.core.registration.global_search import GlobalResult

    monkeypatch.setattr(
        pipeline_module,
        "global_search",
        lambda *a, **kw: GlobalResult(T_ref_from_ct=pose(4)[None], similarity=torch.ones(1), scored=1, time_s=0.0),
    )
    _stable_check_6(monkeypatch)
    tracker = PoseTracker()
    tracker.accept(AcceptedPose(T_ref_from_ct=pose(1), stamp_ns=1))
    reg = Scripted([result(pose(2), converged=False), result(pose(3), sims=(0.5, 0.5)), result(pose(5))])
    config = PipelineConfig(acceptance=gates(), tracking=TrackingConfig(rounds=1, best_round="after"))
    o = RegistrationPipeline(reg, initialisers=[LastAcceptedPose(tracker)], config=config, tracker=tracker).register(
        views(), stamp_ns=5
    )
    assert o.accepted and o.stages == ("tracking", "global", "local", "best_round") and o.global_result is not None
    torch.testing.assert_close(reg.calls[2][0], pose(2))
    torch.testing.assert_close(tracker.latest().T_ref_from_ct, pose(5))


def test_no_best_round_pass_without_a_fast_round(monkeypatch):
    """A full registration (no fast path), or fast rounds that all ended non-finite: nothing to start from."""
    _stable_check_6(monkeypatch)
    for mode in ("before", "after"):
        tracking = TrackingConfig(rounds=1, best_round=mode)
        p, _ = _pipeline([result(pose(3), sims=(0.5, 0.5))], tracking=tracking)
        o = p.register_from(views(), Start(T_ref_from_ct=pose(0), source="configured"))
        assert o.accepted and o.stages == ("local",)
        nan = result(torch.full((4, 4), float("nan"), dtype=torch.float64), converged=False)
        p, _ = _pipeline([nan, result(pose(3), sims=(0.5, 0.5))], tracking=tracking)
        o = p.register(views(), stamp_ns=5)
        assert o.accepted and o.stages == ("tracking", "local")


def test_tracking_fallback_is_validated():
    with pytest.raises(ValueError, match="fallback must be one of"):
        TrackingConfig(fallback="none")


def test_tracking_rounds_are_validated():
    with pytest.raises(ValueError, match="rounds"):
        TrackingConfig(rounds=0)
    with pytest.raises(TypeError, match="rounds"):
        TrackingConfig(rounds=1.5)


def test_an_unconverged_fast_result_may_be_judged_when_asked():
    p, _ = _pipeline([result(pose(2), converged=False)], tracking=TrackingConfig(require_converged=False, rounds=1))
    assert p.register(views(), stamp_ns=5).stages == ("tracking",)


def test_the_fast_path_only_serves_tracking_starts_and_can_be_switched_off():
    p, reg = _pipeline([result(pose(2))])
    o = p.register_from(views(), Start(T_ref_from_ct=pose(0), source="configured"))
    assert o.stages == ("local",) and reg.calls[0][1] is None
    p, reg = _pipeline([result(pose(2))], tracking=TrackingConfig(enabled=False))
    assert p.register(views()).stages == ("local",) and reg.calls[0][1] is None


# ---------------------------------------------------------------------------------------
# On the shipped CT
# ---------------------------------------------------------------------------------------


# the fixtures ct, registrar (REFINE) and biplane: ct_fixtures.py, through conftest.py


def _moved(T, registrar, rot_deg, trans_mm, seed):
    gen = torch.Generator().manual_seed(seed)
    return geometry.perturb(T, rot_deg=rot_deg, trans_mm=trans_mm, centre_ct=registrar.centre_ct, generator=gen)


def _tracking_pipeline(registrar, T_held, global_search=GLOBAL):
    tracker = PoseTracker()
    tracker.accept(AcceptedPose(T_ref_from_ct=T_held, stamp_ns=1))
    pipe = RegistrationPipeline(
        registrar,
        initialisers=[LastAcceptedPose(tracker)],
        config=PipelineConfig(global_search=global_search),
        tracker=tracker,
    )
    return pipe, tracker


def test_a_small_motion_is_recovered_by_the_fast_path(ct, registrar, biplane):
    T_true, v = biplane
    lm = ct_landmarks(ct).points_ct
    pipe, tracker = _tracking_pipeline(registrar, _moved(T_true, registrar, 1.0, 2.0, seed=0))
    out = pipe.register(v, stamp_ns=5)
    assert out.accepted, out.reason
    assert out.stages == ("tracking",) and out.init_source == "last_accepted"
    assert len(out.result.level_iterations) == 1  # the coarse level was skipped
    assert mtre_mm(out.result.T_ref_from_ct, T_true, lm) < 1.0
    assert tracker.latest().stamp_ns == 5


def test_the_best_round_pass_recovers_what_a_too_short_fast_path_left(ct, registrar, biplane):
    """best_round "before" on the shipped CT: a fast path of one step cannot converge from 1 deg / 2 mm; the finest
    level from its round, judged by the whole acceptance test (check 6 included), is the update."""
    T_true, v = biplane
    lm = ct_landmarks(ct).points_ct
    tracker = PoseTracker()
    tracker.accept(AcceptedPose(T_ref_from_ct=_moved(T_true, registrar, 1.0, 2.0, seed=0), stamp_ns=1))
    tracking = TrackingConfig(rounds=1, iterations=1, newton_steps=0, best_round="before")
    config = PipelineConfig(global_search=GLOBAL, tracking=tracking)
    pipe = RegistrationPipeline(registrar, initialisers=[LastAcceptedPose(tracker)], config=config, tracker=tracker)
    out = pipe.register(v, stamp_ns=5)
    assert out.stages == ("tracking", "best_round") and out.accepted, (out.stages, out.reason)
    assert out.verdict.confirm_shift_mm is not None  # check 6 ran
    assert mtre_mm(out.result.T_ref_from_ct, T_true, lm) < 1.0
    assert mtre_mm(out.result.T_ref_from_ct, T_true, lm) < mtre_mm(out.fast_result.T_ref_from_ct, T_true, lm)


def test_the_fast_path_agrees_with_the_normal_refinement(ct, registrar, biplane):
    """The reference path: where both converge, the fast budget and the full pyramid end at the same
    pose (well within the error either has against the truth)."""
    T_true, v = biplane
    lm = ct_landmarks(ct).points_ct
    T_start = _moved(T_true, registrar, 1.0, 2.0, seed=1)
    fast = registrar.refine(v, T_start, schedule=TrackingConfig().schedule(registrar.config))
    full = registrar.refine(v, T_start)
    assert fast.converged and full.converged and fast.success and full.success
    deg, mm = pose_distance(fast.T_ref_from_ct, full.T_ref_from_ct, registrar.centre_ct)
    assert float(deg) < 0.3 and float(mm) < 0.3
    assert mtre_mm(fast.T_ref_from_ct, full.T_ref_from_ct, lm) < 0.4
    assert fast.uncertainty_mm == pytest.approx(full.uncertainty_mm, rel=0.3)
    assert fast.iterations < full.iterations


# three Adam steps at the finest level, then up to three Newton steps on one curvature
CHORD = Schedule(
    levels=(dataclasses.replace(REFINE.levels()[-1], iterations=3),),
    lr_scale=0.35,
    newton_steps=3,
    fresh_curvature=False,
    chord=True,
)


def _count_curvatures(monkeypatch) -> list[int]:
    calls = []
    grad_hessian = Objective.grad_hessian

    def counted(self, *args, **kwargs):
        calls.append(1)
        return grad_hessian(self, *args, **kwargs)

    monkeypatch.setattr(Objective, "grad_hessian", counted)
    return calls


def test_chord_steps_measure_the_curvature_once_and_end_where_newton_steps_do(ct, registrar, biplane, monkeypatch):
    """Chord steps (Schedule.chord) reuse the first Newton step's curvature: one measurement (13
    gradients) instead of one per step, and the same optimum as Newton steps that measure it each time."""
    T_true, v = biplane
    lm = ct_landmarks(ct).points_ct
    T_start = _moved(T_true, registrar, 1.0, 2.0, seed=2)
    calls = _count_curvatures(monkeypatch)
    a = registrar.refine(v, T_start, schedule=CHORD)
    assert len(calls) == 1 and a.success
    calls.clear()
    b = registrar.refine(v, T_start, schedule=dataclasses.replace(CHORD, chord=False))
    assert len(calls) >= 2 and b.success  # a new curvature for each step beyond curvature_reuse
    assert mtre_mm(a.T_ref_from_ct, T_true, lm) < 1.0
    assert mtre_mm(a.T_ref_from_ct, b.T_ref_from_ct, lm) < 0.3
    assert a.uncertainty_mm == pytest.approx(b.uncertainty_mm, rel=0.3)


def test_chord_steps_measure_the_curvature_again_beyond_the_trust_region(ct, registrar, biplane, monkeypatch):
    """The covariance reuses the chord steps' curvature only while the result lies within one Newton
    step's trust region of where it was measured; beyond it the curvature is measured at the result."""
    T_true, v = biplane
    T_start = _moved(T_true, registrar, 1.0, 2.0, seed=2)
    calls = _count_curvatures(monkeypatch)
    monkeypatch.setattr(Registrar, "_within_trust_region", lambda self, T_measured, T: False)
    res = registrar.refine(v, T_start, schedule=CHORD)
    assert len(calls) == 2 and res.success and res.covariance is not None
    c = registrar.centre_ct
    near = geometry.perturb(T_true, rot_deg=0.9, trans_mm=1.9, centre_ct=c, generator=torch.Generator().manual_seed(0))
    far = geometry.perturb(T_true, rot_deg=1.1, trans_mm=0.5, centre_ct=c, generator=torch.Generator().manual_seed(0))
    monkeypatch.undo()
    assert registrar._within_trust_region(T_true, near) and not registrar._within_trust_region(T_true, far)


def test_grad_here_is_grad_and_view_similarity_in_one_render(ct, registrar, biplane):
    """A Newton step's new pose is evaluated once with gradients: its loss, gradient and per-view
    similarity are those of grad() and view_similarity() apart, bit for bit."""
    T_true, v = biplane
    level = REFINE.levels()[-1]
    for seed in range(3):
        T = _moved(T_true, registrar, 1.0, 2.0, seed=seed)
        a = registrar.objective(v, level.size, T[None], n_samples=level.n_samples, patch=level.patch, finest=True)
        b = registrar.objective(v, level.size, T[None], n_samples=level.n_samples, patch=level.patch, finest=True)
        g, L = a.grad_here(T)
        g_ref, L_ref = b.grad(T, torch.zeros(6, dtype=torch.float64))
        assert L == L_ref == b.loss(T) and torch.equal(g, g_ref)
        assert torch.equal(a.view_similarity(T), b.view_similarity(T))  # a's from the kept values


@pytest.mark.parametrize("schedule", ["chord", "full"])
def test_newton_steps_that_reuse_a_new_poses_render_end_as_the_unfused_ones(
    ct, registrar, biplane, monkeypatch, schedule
):
    """The reference path of the Newton polish: each new pose's loss by a render without gradients,
    each gradient by a render of its own. Same poses, similarities and covariance, bit for bit."""
    T_true, v = biplane
    sched = CHORD if schedule == "chord" else registrar.config.schedule()
    for seed in (2, 3):
        T_start = _moved(T_true, registrar, 2.0, 4.0, seed=seed)
        fused = registrar.refine(v, T_start, schedule=sched)
        with monkeypatch.context() as m:
            m.setattr(
                Objective,
                "grad_here",
                lambda self, T: (self.view_similarity(T), self.grad(T, torch.zeros(6, dtype=torch.float64)))[1],
            )
            ref = registrar.refine(v, T_start, schedule=sched)
        assert torch.equal(fused.T_ref_from_ct, ref.T_ref_from_ct)
        assert fused.view_similarity == ref.view_similarity and fused.converged == ref.converged
        assert torch.equal(fused.covariance, ref.covariance)


def test_a_start_far_off_falls_back_to_the_full_registration(ct, registrar, biplane):
    T_true, v = biplane
    lm = ct_landmarks(ct).points_ct
    # 5 deg / 10 mm: beyond the fast budget; the normal local refinement recovers it
    pipe, tracker = _tracking_pipeline(registrar, _moved(T_true, registrar, 5.0, 10.0, seed=0))
    out = pipe.register(v, stamp_ns=5)
    assert out.stages[0] == "tracking" and out.accepted, (out.stages, out.reason)
    assert mtre_mm(out.result.T_ref_from_ct, T_true, lm) < 1.0
    # 30 deg / 30 mm, no global stage allowed: the fallback is rejected and the tracker keeps its pose
    T_far = _moved(T_true, registrar, 30.0, 30.0, seed=4)
    pipe, tracker = _tracking_pipeline(registrar, T_far, global_search=dataclasses.replace(GLOBAL, enabled=False))
    out = pipe.register(v, stamp_ns=9)
    assert out.stages[0] == "tracking" and out.stages[-1] == "local" and not out.accepted and out.reason
    torch.testing.assert_close(tracker.latest().T_ref_from_ct, T_far)
    assert tracker.latest().stamp_ns == 1


# ---------------------------------------------------------------------------------------
# Check 8: another scale of the similarity, on a fallback
# ---------------------------------------------------------------------------------------


def _scripted_probe(monkeypatch, gain):
    """Check 8's probe scripted: gains ``gain`` from wherever it is asked; records the poses."""
    from mvreg_ros.core.registration import acceptance as acceptance_module

    asked = []

    def probe(registrar, views, T, **kw):
        asked.append((T.clone(), kw))
        return acceptance_module.SecondPass(shift_mm=0.4, gain=gain, T_ref_from_ct=T)

    monkeypatch.setattr(acceptance_module, "other_scale_probe", probe)
    return asked


@pytest.mark.parametrize("gain, accepted", [(0.001, True), (0.0071, False)])
def test_check_8_judges_a_fallback_under_another_scale(gain, accepted, monkeypatch):
    """With other_scale on, a fallback's result (here the local fallback: the global stage is off) passes only
    if the probe under another scale gains at most max_other_scale_gain; the probe gets the configured patch,
    samples and steps, and its figures go into the verdict; a rejected fallback leaves the held pose."""
    asked = _scripted_probe(monkeypatch, gain)
    tracker = PoseTracker()
    tracker.accept(AcceptedPose(T_ref_from_ct=pose(1), stamp_ns=1))
    acceptance = gates(other_scale=True, other_scale_patch=17, other_scale_samples=80, other_scale_iterations=9)
    config = PipelineConfig(
        global_search=GlobalConfig(enabled=False), acceptance=acceptance, tracking=TrackingConfig(rounds=1)
    )
    reg = Scripted([result(pose(2), converged=False, sims=(0.7, 0.7)), result(pose(3))])
    p = RegistrationPipeline(reg, initialisers=[LastAcceptedPose(tracker)], config=config, tracker=tracker)
    o = p.register(views(), stamp_ns=5)
    assert o.stages == ("tracking", "local") and o.accepted == accepted
    ((T, kw),) = asked
    torch.testing.assert_close(T, pose(3))
    assert kw == dict(n_samples=80, patch=17, iterations=9)
    assert o.verdict.other_gain == gain and o.verdict.other_shift_mm == 0.4
    if not accepted:
        assert "another scale" in o.reason and "0.0071" in o.reason
    torch.testing.assert_close(tracker.latest().T_ref_from_ct, pose(3) if accepted else pose(1))


def test_check_8_runs_on_fallbacks_only_and_only_when_on(monkeypatch):
    """Not on the fast path's own result, not on a full registration (no tracking start), not when off."""
    asked = _scripted_probe(monkeypatch, 0.05)

    def pipeline(results, other_scale=True, tracking=TrackingConfig(rounds=1)):
        tracker = PoseTracker()
        tracker.accept(AcceptedPose(T_ref_from_ct=pose(1), stamp_ns=1))
        config = PipelineConfig(
            global_search=GlobalConfig(enabled=False), acceptance=gates(other_scale=other_scale), tracking=tracking
        )
        return RegistrationPipeline(Scripted(results), initialisers=[LastAcceptedPose(tracker)], config=config)

    o = pipeline([result(pose(2))]).register(views(), stamp_ns=5)  # the fast path
    assert o.accepted and o.fast and not asked and o.verdict.other_gain is None
    o = pipeline([result(pose(2), converged=False), result(pose(3))], other_scale=False).register(views(), stamp_ns=5)
    assert o.accepted and not o.fast and not asked  # a fallback, check 8 off
    p = pipeline([result(pose(3))], tracking=TrackingConfig(enabled=False))  # no fast path: not a fallback
    o = p.register_from(views(), Start(T_ref_from_ct=pose(0), source="configured"))
    assert o.accepted and not asked


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(other_scale_patch=0), "other_scale_patch must be an int >= 1"),
        (dict(other_scale_samples=2.5), "other_scale_samples"),
        (dict(other_scale_iterations=True), "other_scale_iterations"),
        (dict(max_other_scale_gain=-0.1), "max_other_scale_gain"),
        (dict(other_scale=1), "other_scale"),
    ],
)
def test_check_8_settings_are_checked(kwargs, match):
    from mvreg_ros.core.registration.acceptance import AcceptanceConfig

    with pytest.raises((ValueError, TypeError), match=match):
        AcceptanceConfig(**kwargs)


def test_the_other_scale_probe_stays_at_its_optimum_and_leaves_a_pose_beside_it(registrar, biplane):
    """On the shipped CT: from a registered pose the probe under another scale (patch 11 px at the fixtures'
    48 px finest level) gains little and moves the anatomy little; from a pose 3 deg / 6 mm beside it, it gains
    and moves; a batch of poses is refused."""
    from mvreg_ros.core.registration.acceptance import other_scale_probe

    T_true, v = biplane
    res = registrar.refine(v, T_true)
    at = other_scale_probe(registrar, v, res.T_ref_from_ct, patch=11, n_samples=64, iterations=20)
    assert 0.0 <= at.gain < 0.007 and at.shift_mm < 1.0
    moved = geometry.perturb(
        res.T_ref_from_ct, rot_deg=3.0, trans_mm=6.0, centre_ct=registrar.centre_ct, generator=torch.Generator()
    )
    beside = other_scale_probe(registrar, v, moved, patch=11, n_samples=64, iterations=20)
    assert beside.gain > 0.007 and beside.shift_mm > 1.0
    with pytest.raises((ValueError, TypeError)):  # TypeError: the tests' jaxtyping check comes first
        other_scale_probe(registrar, v, moved[None].expand(2, 4, 4))
