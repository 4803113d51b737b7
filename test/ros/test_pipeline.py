"""Frames -> view set -> the engine's pipeline, with a scripted refinement (no ROS)."""

import math

import torch

from mvreg_ros.core.geometry.kinematics import PlaneConfig
from mvreg_ros.core.geometry.transforms import make_T
from mvreg_ros.core.registration.acceptance import AcceptanceConfig
from mvreg_ros.core.registration.global_search import GlobalConfig
from mvreg_ros.core.registration.initialisers import ConfiguredPose, PoseTracker
from mvreg_ros.core.registration.pipeline import PipelineConfig, RegistrationPipeline
from mvreg_ros.core.registration.refine import Registrar, RegistrationResult
from mvreg_ros.ros.pipeline import register_frames
from mvreg_ros.ros.sync import Frame

PLANE = PlaneConfig(name="main", orbital_joint="o", angular_joint="a", sid_mm=700.0)
T0 = make_T(torch.eye(3, dtype=torch.float64), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


class ScriptedRegistrar(Registrar):  # the refine() of a Registrar, scripted (no volume)
    def __init__(self):
        self.starts = []
        self.centre_ct = torch.zeros(3, dtype=torch.float64)

    def refine(self, views, T_init):
        self.starts.append(T_init.clone())
        return RegistrationResult(
            T_ref_from_ct=T_init,
            success=True,
            converged=True,
            similarity=0.9,
            view_similarity=(0.9,) * len(views),
            iterations=1,
            time_s=0.01,
            covariance=torch.eye(6, dtype=torch.float64) * 1e-4,
            uncertainty_mm=0.1,
            centre_ct=self.centre_ct,
        )


def frames(n=2, stamp0=1000, size=(16, 16)):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        T = PLANE.T_ref_from_cam({"o": math.radians(60 * i), "a": 0.0})
        raw = 1000 + 5000 * torch.rand(size, generator=g)
        K = torch.tensor([[200.0, 0, 7.5], [0, 200.0, 7.5], [0, 0, 1]], dtype=torch.float64)
        out.append(Frame(source=i, stamp_ns=stamp0 + i, raw=raw, K=K, T_ref_from_cam=T))
    return out


def make():
    reg = ScriptedRegistrar()
    tracker = PoseTracker()
    config = PipelineConfig(
        global_search=GlobalConfig(enabled=False), acceptance=AcceptanceConfig(view_agreement=False)
    )
    return RegistrationPipeline(reg, initialisers=[ConfiguredPose(T0)], config=config, tracker=tracker), reg, tracker


def test_a_set_is_stamped_with_its_newest_image_and_keeps_its_sources():
    p, _reg, tracker = make()
    o = register_frames(p, frames(stamp0=100))
    assert o.accepted and o.stamp_ns == 101 and o.sources == (0, 1) and o.init_source == "configured"
    assert tracker.latest().stamp_ns == 101 and len(o.views) == 2 and o.result is not None


def test_views_of_different_sizes_are_a_bad_set_not_a_crash():
    p, reg, tracker = make()
    f = frames()
    f[1] = Frame(source=1, stamp_ns=5, raw=torch.rand(20, 16) + 1, K=f[1].K, T_ref_from_cam=f[1].T_ref_from_cam)
    o = register_frames(p, f)
    assert not o.accepted and "differ in size" in o.reason and reg.starts == [] and tracker.latest() is None
    assert o.result is None and o.init_source == "" and o.init_values == {}
