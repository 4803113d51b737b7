"""The initialiser chain (tracking, coarse network, configured) with a fake model, and the
network's estimate seeding the refinement without ever being the output."""

import types

import pytest
import torch
from test_pipeline_scripted import ScriptedRegistrar, pose, result, views

from mvreg_ros.core.registration.acceptance import AcceptanceConfig
from mvreg_ros.core.registration.global_search import GlobalConfig
from mvreg_ros.core.registration.initialisers import (
    AcceptedPose,
    CoarseNetworkPose,
    PoseTracker,
    StartRequest,
    default_initialisers,
    first_start,
)
from mvreg_ros.core.registration.pipeline import PipelineConfig, RegistrationPipeline

S = 1_000_000_000  # ns per s
VIEWS = views()
CONFIG = PipelineConfig(
    global_search=GlobalConfig(enabled=False),
    acceptance=AcceptanceConfig(view_agreement=False, min_view_similarity=0.2),
)


class FakeModel:
    def __init__(self, T):
        self.T = T
        self.calls = 0

    def predict(self, views):
        self.calls += 1
        return types.SimpleNamespace(T_ref_from_ct=self.T.clone(), ms=12.5)


def chain(model=None, *, max_age_s=60.0, accepted_at_ns=None):
    tracker = PoseTracker()
    if accepted_at_ns is not None:
        tracker.accept(AcceptedPose(T_ref_from_ct=pose(1), stamp_ns=accepted_at_ns))
    return default_initialisers(configured=pose(0), tracker=tracker, model=model, tracking_max_age_s=max_age_s), tracker


# ------------------------------------------------------------------- the initialiser chain


def test_a_view_set_without_an_accepted_pose_starts_from_the_network():
    model = FakeModel(pose(5))
    inits, _ = chain(model)
    assert [i.name for i in inits] == ["last_accepted", "coarse_network", "configured"]
    start = first_start(inits, StartRequest(views=VIEWS, stamp_ns=10 * S))
    assert start.source == "coarse_network" and model.calls == 1 and not start.tracking
    torch.testing.assert_close(start.T_ref_from_ct, pose(5))
    assert start.values == {"coarse_ms": "12.5"}
    torch.testing.assert_close(start.T_coarse_ref_from_ct, pose(5))


def test_a_failing_network_defers_to_the_configured_pose():
    bad = FakeModel(torch.full((4, 4), float("nan"), dtype=torch.float64))
    inits, _ = chain(bad)
    start = first_start(inits, StartRequest(views=VIEWS, stamp_ns=10 * S))
    assert start.source == "configured" and bad.calls == 1 and start.values == {}
    torch.testing.assert_close(start.T_ref_from_ct, pose(0))


def test_no_initialiser_at_all_names_the_failures():
    bad = CoarseNetworkPose(FakeModel(torch.full((4, 4), float("nan"), dtype=torch.float64)))
    with pytest.raises(RuntimeError, match="coarse_network: the coarse network's estimate must be a finite"):
        first_start([bad], StartRequest(views=VIEWS))


@pytest.mark.parametrize(
    "age_s, source",
    [
        (0.0, "last_accepted"),
        (30.0, "last_accepted"),
        (60.0, "last_accepted"),
        (60.001, "coarse_network"),
        (3600.0, "coarse_network"),
    ],
)
def test_a_recent_accepted_pose_wins_over_the_network_an_old_one_yields(age_s, source):
    model = FakeModel(pose(5))
    inits, _ = chain(model, accepted_at_ns=100 * S)
    start = first_start(inits, StartRequest(views=VIEWS, stamp_ns=100 * S + round(age_s * S)))
    assert start.source == source and start.tracking == (source == "last_accepted")
    torch.testing.assert_close(start.T_ref_from_ct, pose(1) if source == "last_accepted" else pose(5))
    assert model.calls == (source == "coarse_network")  # the network runs only when needed


def test_without_a_network_the_old_accepted_pose_is_still_used():
    inits, _ = chain(None, accepted_at_ns=100 * S)
    assert [i.name for i in inits] == ["last_accepted", "configured"]
    start = first_start(inits, StartRequest(views=VIEWS, stamp_ns=100 * S + 3600 * S))
    assert start.source == "last_accepted"
    torch.testing.assert_close(start.T_ref_from_ct, pose(1))


def test_bad_models_and_ages_are_refused():
    with pytest.raises(TypeError, match="predict|PoseModel"):
        CoarseNetworkPose(object())
    with pytest.raises(ValueError, match="tracking_max_age_s"):
        chain(FakeModel(pose(5)), max_age_s=-1.0)
    bad = CoarseNetworkPose(FakeModel(torch.full((4, 4), float("nan"))))
    with pytest.raises(ValueError, match="finite"):
        bad.start(StartRequest(views=VIEWS))


@pytest.mark.parametrize("passes", [False, True])
def test_only_a_refined_pose_that_passes_the_gates_is_kept(passes):
    """The network's estimate seeds the refinement; the tracker (what the node publishes) gets the
    refined pose only when it passes the acceptance test, never the estimate."""
    tracker = PoseTracker()
    reg = ScriptedRegistrar([result(pose(2), sims=(0.9, 0.8) if passes else (0.9, 0.05))])
    p = RegistrationPipeline(
        reg,
        initialisers=default_initialisers(
            configured=pose(0), tracker=tracker, model=FakeModel(pose(5)), tracking_max_age_s=60.0
        ),
        config=CONFIG,
        tracker=tracker,
    )
    o = p.register(VIEWS, stamp_ns=101)
    torch.testing.assert_close(reg.starts[0], pose(5))
    assert o.init_source == "coarse_network" and o.start.values == {"coarse_ms": "12.5"}
    assert o.accepted == passes and bool(o.reason) != passes
    if passes:
        torch.testing.assert_close(tracker.latest().T_ref_from_ct, pose(2))
    else:
        assert tracker.latest() is None
