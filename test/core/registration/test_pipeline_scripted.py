"""Start pose -> refinement -> acceptance test -> tracker, with a scripted refinement (no global stage,
no per-view agreement: those need a real renderer and are tested in test_registration.py)."""

import math

import pytest
import torch

from mvreg_ros.core.geometry.kinematics import PlaneConfig
from mvreg_ros.core.geometry.transforms import make_T, so3_exp
from mvreg_ros.core.imaging.views import ViewSet
from mvreg_ros.core.registration.acceptance import AcceptanceConfig, acceptance_test
from mvreg_ros.core.registration.global_search import GlobalConfig
from mvreg_ros.core.registration.initialisers import (
    ConfiguredPose,
    Initialiser,
    LastAcceptedPose,
    PoseTracker,
    StartRequest,
    default_initialisers,
    first_start,
    supine_at_isocentre,
)
from mvreg_ros.core.registration.pipeline import PipelineConfig, RegistrationPipeline
from mvreg_ros.core.registration.refine import RefineConfig, Registrar, RegistrationResult, TrackingConfig

PLANE = PlaneConfig(name="main", orbital_joint="o", angular_joint="a", sid_mm=700.0)


def pose(k: float) -> torch.Tensor:
    return make_T(
        so3_exp(torch.tensor([0.0, 0.0, 0.1 * k], dtype=torch.float64)),
        torch.tensor([k, 2 * k, 3 * k], dtype=torch.float64),
    )


def result(T, *, success=True, sims=(0.9, 0.8), unc=1.0, converged=True, reason=""):
    return RegistrationResult(
        T_ref_from_ct=T,
        success=success,
        converged=converged,
        similarity=sum(sims) / 2,
        view_similarity=tuple(sims),
        iterations=10,
        time_s=0.1,
        reason=reason,
        covariance=torch.eye(6, dtype=torch.float64) * 1e-4,
        uncertainty_mm=unc,
        centre_ct=torch.zeros(3, dtype=torch.float64),
    )


class ScriptedRegistrar(Registrar):  # the refine() of a Registrar, scripted (no volume)
    """Returns the scripted results in order and records the start poses it was given."""

    def __init__(self, results):
        self.results = list(results)
        self.starts = []
        self.schedules = []
        self.centre_ct = torch.zeros(3, dtype=torch.float64)
        self.config = RefineConfig()

    def refine(self, views, T_init, *, schedule=None, curvature=None):
        self.starts.append(T_init.clone())
        self.schedules.append(schedule)
        return self.results.pop(0)


def views(n=2, size=(16, 16)) -> ViewSet:
    g = torch.Generator().manual_seed(0)
    T = torch.stack([PLANE.T_ref_from_cam({"o": math.radians(60 * i), "a": 0.0}) for i in range(n)])
    raw = 1000 + 5000 * torch.rand(n, *size, generator=g)
    K = torch.tensor([[200.0, 0, 7.5], [0, 200.0, 7.5], [0, 0, 1]], dtype=torch.float64).expand(n, 3, 3)
    return ViewSet.from_raw(raw, K, T)


def gates(**kw) -> AcceptanceConfig:
    """No per-view agreement; check 7 only below the fast round (the scripted tests say where it runs)."""
    return AcceptanceConfig(**{"view_agreement": False, "cross_check_drop": 0.0, **kw})


def make(results, acceptance=None, tracking=TrackingConfig(enabled=False)):
    """Without the tracking fast path unless ``tracking`` says (test_tracking.py tests it)."""
    tracker = PoseTracker()
    reg = ScriptedRegistrar(results)
    config = PipelineConfig(
        global_search=GlobalConfig(enabled=False), acceptance=acceptance or gates(), tracking=tracking
    )
    p = RegistrationPipeline(
        reg, initialisers=default_initialisers(configured=pose(0), tracker=tracker), config=config, tracker=tracker
    )
    return p, reg, tracker


def test_tracking_starts_from_the_last_accepted_pose_and_failures_never_replace_it():
    p, reg, tracker = make(
        [
            result(pose(1)),
            result(pose(2), sims=(0.9, 0.05)),
            result(pose(3), unc=50.0),
            result(pose(4), success=False, reason="refinement failed: boom"),
            result(pose(5)),
        ]
    )
    o = p.register(views(), stamp_ns=101)
    assert o.accepted and o.init_source == "configured" and o.stamp_ns == 101 and o.stages == ("local",)
    torch.testing.assert_close(reg.starts[0], pose(0))
    for stamp in (200, 300, 400):  # similarity gate, uncertainty gate, engine failure
        o = p.register(views(), stamp_ns=stamp)
        assert not o.accepted and o.reason
        torch.testing.assert_close(tracker.latest().T_ref_from_ct, pose(1))
        assert tracker.latest().stamp_ns == 101
    assert o.init_source == "last_accepted"
    for start in reg.starts[1:]:
        torch.testing.assert_close(start, pose(1))
    o = p.register(views(), stamp_ns=500)
    assert o.accepted
    torch.testing.assert_close(tracker.latest().T_ref_from_ct, pose(5))
    assert tracker.latest().covariance_ref is not None


@pytest.mark.parametrize(
    "kwargs, config, match",
    [
        (dict(sims=(0.9, 0.1)), gates(min_view_similarity=0.2), "view similarity 0.100 below"),
        (dict(sims=(0.9, float("nan"))), gates(), "view similarity nan"),
        (dict(unc=6.0), gates(max_uncertainty_mm=5.0), "uncertainty 6.00 mm above"),
        (dict(unc=float("inf")), gates(), "uncertainty inf"),
        (dict(converged=False), gates(require_converged=True), "did not converge"),
        (dict(success=False, reason="loss curvature is not positive definite"), gates(), "curvature"),
    ],
)
def test_acceptance_checks(kwargs, config, match):
    verdict = acceptance_test(result(pose(1), **kwargs), config=config)
    assert not verdict.accepted and match in verdict.reason


def test_acceptance_passes_and_validates():
    assert acceptance_test(result(pose(1), converged=False), config=gates()).accepted
    with pytest.raises(ValueError, match="max_uncertainty_mm"):
        gates(max_uncertainty_mm=0.0)
    with pytest.raises(ValueError, match="min_view_similarity"):
        gates(min_view_similarity=2.0)
    with pytest.raises(ValueError, match="registrar"):  # per-view agreement needs the views
        acceptance_test(result(pose(1)), config=AcceptanceConfig())
    # one view does not fix the depth: never accepted by default, whatever else it reports
    one = acceptance_test(result(pose(1), sims=(0.99,)), views=views(n=1), config=AcceptanceConfig())
    assert not one.accepted and "min_views 2" in one.reason
    with pytest.raises(ValueError, match="min_views"):
        AcceptanceConfig(min_views=0)
    # allowed by the user: one view cannot disagree with itself, so no single-view refinement runs
    one = acceptance_test(result(pose(1), sims=(0.9,)), views=views(n=1), config=AcceptanceConfig(min_views=1))
    assert one.accepted and one.view_shift_mm == ()


@pytest.mark.parametrize(
    "fast_sims, shift_mm, gain, accepted, ran",
    [
        ((0.58, 0.58), 0.3, 0.0005, True, False),  # the fast path's best round scored lower: nothing to check
        ((0.61, 0.61), 0.3, 0.0005, True, True),  # higher, and the pass from it ends near the result: accepted
        ((0.61, 0.61), 0.9, 0.003, False, True),  # ... ends 0.9 mm away, better: a better optimum beside it
        ((0.61, 0.61), 0.2, 0.015, False, True),  # ... gains more than check 6's gain alone: rejected too
    ],
)
def test_check_7_runs_the_pyramid_from_the_fast_paths_best_round(fast_sims, shift_mm, gain, accepted, ran, monkeypatch):
    """Check 7 on a tracking update's fallback: where its result (0.6) scores below the fast path's best round,
    the local pyramid from that round's pose must not end elsewhere, better, by check 6's thresholds."""
    from mvreg_ros.core.registration import acceptance as acceptance_module

    calls = []

    def scripted_pass(registrar, views, T, *, start=None):
        calls.append((T, start))
        return acceptance_module.SecondPass(shift_mm=shift_mm, gain=gain, T_ref_from_ct=T)

    monkeypatch.setattr(acceptance_module, "second_pass", scripted_pass)
    r, fast = result(pose(1), sims=(0.6, 0.6)), result(pose(2), sims=fast_sims, converged=False)
    v = acceptance_test(r, registrar=ScriptedRegistrar([]), views=views(), config=gates(), fast=fast)
    assert v.accepted == accepted and v.fallback_drop == pytest.approx(fast_sims[0] - 0.6)
    assert bool(calls) == ran and (v.cross_shift_mm, v.cross_gain) == ((shift_mm, gain) if ran else (None, None))
    if ran:  # from the fast path's pose, measured against the result
        torch.testing.assert_close(calls[0][0], pose(1))
        torch.testing.assert_close(calls[0][1], pose(2))
    if not accepted:
        assert "fast tracking path's best round" in v.reason
    # by default on every fallback, the result scoring above the round included
    calls.clear()
    every = AcceptanceConfig(view_agreement=False)
    v = acceptance_test(r, registrar=ScriptedRegistrar([]), views=views(), config=every, fast=fast)
    assert len(calls) == 1 and v.cross_shift_mm == shift_mm and v.accepted == ((shift_mm, gain) == (0.3, 0.0005))
    torch.testing.assert_close(calls[0][1], pose(2))
    # not a fallback, or check 7 switched off: nothing runs
    calls.clear()
    assert acceptance_test(r, registrar=ScriptedRegistrar([]), views=views(), config=gates()).cross_shift_mm is None
    off = gates(cross_check=False)
    assert (
        acceptance_test(r, registrar=ScriptedRegistrar([]), views=views(), config=off, fast=fast).accepted and not calls
    )
    if ran:
        with pytest.raises(ValueError, match="checks 6 to 8 need the registrar"):
            acceptance_test(r, config=gates(), fast=fast)


def test_check_7_is_validated():
    assert AcceptanceConfig().cross_check and AcceptanceConfig().cross_check_drop == -2.0
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cross_check_drop"):
            AcceptanceConfig(cross_check_drop=bad)
    with pytest.raises(TypeError, match="cross_check"):
        AcceptanceConfig(cross_check="yes")


def test_initialiser_chain_and_default_pose():
    tracker = PoseTracker()
    chain = default_initialisers(configured=pose(7), tracker=tracker)
    assert [i.name for i in chain] == ["last_accepted", "configured"]
    assert all(isinstance(i, Initialiser) for i in chain)
    start = first_start(chain, StartRequest(views=None))
    assert start.source == "configured" and not start.tracking
    torch.testing.assert_close(start.T_ref_from_ct, pose(7))
    assert LastAcceptedPose(tracker).start(StartRequest(views=None)) is None
    with pytest.raises(RuntimeError, match="no initialiser"):
        first_start([LastAcceptedPose(tracker)], StartRequest(views=None))
    with pytest.raises((ValueError, TypeError)):  # TypeError from the shape check when it is on
        ConfiguredPose(torch.eye(3))
    # supine default: the CT centre lands on the isocentre, head (LPS +S) toward +x
    mounted = PlaneConfig(
        name="m",
        orbital_joint="o",
        angular_joint="a",
        sid_mm=700.0,
        T_ref_from_iso=make_T(torch.eye(3, dtype=torch.float64), torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)),
    )
    c = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    T = supine_at_isocentre(mounted, c)
    torch.testing.assert_close(T[:3, :3] @ c + T[:3, 3], torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64))
    torch.testing.assert_close(T[:3, 2], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
