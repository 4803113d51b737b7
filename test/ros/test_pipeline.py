"""Frames -> start pose -> engine -> gates -> tracker, with a scripted engine (no ROS)."""

import math

import pytest
import torch

from mvreg_ros.core.geometry import make_T, so3_exp
from mvreg_ros.core.kinematics import PlaneConfig
from mvreg_ros.core.refine import RegistrationResult
from mvreg_ros.ros.initializer import (ConfiguredPose, Initializer, LastAcceptedPose, PoseTracker, default_initializers,
                                       initial_pose, supine_at_isocentre)
from mvreg_ros.ros.pipeline import QualityGates, RegistrationPipeline, gate_reason
from mvreg_ros.ros.sync import Frame

PLANE = PlaneConfig(name="main", orbital_joint="o", angular_joint="a", sid_mm=700.0)


def pose(k: float) -> torch.Tensor:
    return make_T(so3_exp(torch.tensor([0.0, 0.0, 0.1 * k], dtype=torch.float64)),
                  torch.tensor([k, 2 * k, 3 * k], dtype=torch.float64))


def result(T, *, success=True, sims=(0.9, 0.8), unc=1.0, converged=True, reason=""):
    return RegistrationResult(T_ref_from_ct=T, success=success, converged=converged, similarity=sum(sims) / 2,
                              view_similarity=tuple(sims), iterations=10, time_s=0.1, reason=reason,
                              covariance=torch.eye(6, dtype=torch.float64) * 1e-4, uncertainty_mm=unc,
                              centre_ct=torch.zeros(3, dtype=torch.float64))


class ScriptedRegistrar:
    """Returns the scripted results in order and records the start poses it was given."""

    def __init__(self, results):
        self.results = list(results)
        self.starts = []
        self.centre_ct = torch.zeros(3, dtype=torch.float64)

    def refine(self, views, T_init):
        self.starts.append(T_init.clone())
        return self.results.pop(0)


def frames(n=2, stamp0=1000, size=(16, 16)):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        T = PLANE.T_ref_from_cam({"o": math.radians(60 * i), "a": 0.0})
        raw = 1000 + 5000 * torch.rand(size, generator=g)
        K = torch.tensor([[200.0, 0, 7.5], [0, 200.0, 7.5], [0, 0, 1]], dtype=torch.float64)
        out.append(Frame(source=i, stamp_ns=stamp0 + i, raw=raw, K=K, T_ref_from_cam=T))
    return out


def make(results, gates=QualityGates()):
    tracker = PoseTracker()
    reg = ScriptedRegistrar(results)
    p = RegistrationPipeline(reg, initializers=default_initializers(configured=pose(0), tracker=tracker), gates=gates,
                             tracker=tracker)
    return p, reg, tracker


def test_tracking_starts_from_the_last_accepted_pose_and_failures_never_replace_it():
    p, reg, tracker = make([result(pose(1)), result(pose(2), sims=(0.9, 0.05)), result(pose(3), unc=50.0),
                            result(pose(4), success=False, reason="refinement failed: boom"), result(pose(5))])
    o = p.register(frames(stamp0=100))
    assert o.accepted and o.init_source == "configured" and o.stamp_ns == 101 and o.sources == (0, 1)
    torch.testing.assert_close(reg.starts[0], pose(0))
    for stamp in (200, 300, 400):  # similarity gate, uncertainty gate, engine failure
        o = p.register(frames(stamp0=stamp))
        assert not o.accepted and o.reason
        torch.testing.assert_close(tracker.latest().T_ref_from_ct, pose(1))
        assert tracker.latest().stamp_ns == 101
    assert o.init_source == "last_accepted"
    for start in reg.starts[1:]:
        torch.testing.assert_close(start, pose(1))
    o = p.register(frames(stamp0=500))
    assert o.accepted
    torch.testing.assert_close(tracker.latest().T_ref_from_ct, pose(5))
    assert tracker.latest().covariance_ref is not None


@pytest.mark.parametrize("kwargs, gates, match", [
    (dict(sims=(0.9, 0.1)), QualityGates(min_similarity=0.2), "view similarity 0.100 below"),
    (dict(sims=(0.9, float("nan"))), QualityGates(), "view similarity nan"),
    (dict(unc=6.0), QualityGates(max_uncertainty_mm=5.0), "uncertainty 6.00 mm above"),
    (dict(unc=float("inf")), QualityGates(), "uncertainty inf"),
    (dict(converged=False), QualityGates(require_converged=True), "did not converge"),
    (dict(success=False, reason="loss curvature is not positive definite"), QualityGates(), "curvature"),
])
def test_gates(kwargs, gates, match):
    assert match in gate_reason(result(pose(1), **kwargs), gates)


def test_gates_pass_and_validate():
    assert gate_reason(result(pose(1), converged=False), QualityGates()) == ""
    with pytest.raises(ValueError, match="max_uncertainty_mm"):
        QualityGates(max_uncertainty_mm=0.0)
    with pytest.raises(ValueError, match="min_similarity"):
        QualityGates(min_similarity=2.0)


def test_views_of_different_sizes_are_a_bad_set_not_a_crash():
    p, reg, tracker = make([])
    f = frames()
    f[1] = Frame(source=1, stamp_ns=5, raw=torch.rand(20, 16) + 1, K=f[1].K, T_ref_from_cam=f[1].T_ref_from_cam)
    o = p.register(f)
    assert not o.accepted and "differ in size" in o.reason and reg.starts == []


def test_initializer_chain_and_default_pose():
    tracker = PoseTracker()
    chain = default_initializers(configured=pose(7), tracker=tracker)
    assert [i.name for i in chain] == ["last_accepted", "configured"]
    assert all(isinstance(i, Initializer) for i in chain)
    T, name = initial_pose(chain, views=None, stamp_ns=0)
    assert name == "configured"
    torch.testing.assert_close(T, pose(7))
    assert LastAcceptedPose(tracker).initial_pose(None, 0) is None
    with pytest.raises(RuntimeError, match="no initialiser"):
        initial_pose([LastAcceptedPose(tracker)], views=None, stamp_ns=0)
    with pytest.raises(ValueError):
        ConfiguredPose(torch.eye(3))
    # supine default: the CT centre lands on the isocentre, head (LPS +S) toward +x
    mounted = PlaneConfig(name="m", orbital_joint="o", angular_joint="a", sid_mm=700.0,
                          T_ref_from_iso=make_T(torch.eye(3, dtype=torch.float64),
                                                torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)))
    c = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    T = supine_at_isocentre(mounted, c)
    torch.testing.assert_close(T[:3, :3] @ c + T[:3, 3], torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64))
    torch.testing.assert_close(T[:3, 2], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
