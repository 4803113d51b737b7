"""The held curvature: the loss curvature a registration measured, kept with its accepted pose and
used by the next tracking update on the same views (curvature.py, TrackingConfig.held_*,
Registrar.refine(curvature=...)). Unit tests of where it serves; the pipeline's policy with a scripted
refinement; on the shipped CT pooled by 4: a small motion recovered by Newton steps alone on it, with
no curvature measured, the covariance from it, and measured again where it no longer serves."""

import dataclasses
import math

import pytest
import torch
from test_pipeline_scripted import gates, pose, result, views
from test_tracking import REFINE, Scripted, _count_curvatures, _moved

from mvreg_ros.core.evaluation.landmarks import ct_landmarks
from mvreg_ros.core.evaluation.metrics import mtre_mm
from mvreg_ros.core.geometry import transforms as geometry
from mvreg_ros.core.registration.curvature import GEOMETRY_K_RTOL, HeldCurvature
from mvreg_ros.core.registration.global_search import GlobalConfig
from mvreg_ros.core.registration.initialisers import AcceptedPose, LastAcceptedPose, PoseTracker
from mvreg_ros.core.registration.pipeline import PipelineConfig, RegistrationPipeline
from mvreg_ros.core.registration.refine import Registrar, Schedule, TrackingConfig

LEVEL = (REFINE.sizes[-1], REFINE.n_samples[-1], REFINE.patches[-1])
C = torch.zeros(3, dtype=torch.float64)


def _held(v=None, *, T=None, level=LEVEL, age=0) -> HeldCurvature:
    v = views() if v is None else v
    H = torch.diag(torch.tensor([4.0, 5.0, 6.0, 1.0, 2.0, 3.0], dtype=torch.float64))
    held = HeldCurvature.measured(H, pose(0) if T is None else T, v, level)
    return dataclasses.replace(held, age=age)


def _serves(held, v, T, **kw):
    args = dict(level=LEVEL, centre_ct=C, max_rot_deg=2.0, max_trans_mm=4.0, max_age=10) | kw
    return held.serves(v, T, **args)


# ---------------------------------------------------------------------------------------
# Where a held curvature serves
# ---------------------------------------------------------------------------------------


def test_a_held_curvature_serves_the_same_views_near_where_it_was_measured():
    v = views()
    held = _held(v)
    assert held.age == 0 and held.image_size == (v.height, v.width) and held.level == LEVEL
    assert _serves(held, v, pose(0))
    T = geometry.translation(torch.tensor([3.9, 0.0, 0.0], dtype=torch.float64)) @ pose(0)
    assert _serves(held, v, T) and not _serves(held, v, T, max_trans_mm=3.8)
    w = torch.tensor([0.0, 0.0, math.radians(2.1)], dtype=torch.float64)
    R = geometry.make_T(geometry.so3_exp(w), torch.zeros(3, dtype=torch.float64))
    assert not _serves(held, v, R @ pose(0))  # 2.1 deg: beyond the reach


def test_a_held_curvature_ages_and_then_no_longer_serves():
    v = views()
    held = _held(v)
    older = held.older()
    assert older.age == 1 and held.age == 0 and older.H is held.H
    assert _serves(_held(v, age=9), v, pose(0)) and not _serves(_held(v, age=10), v, pose(0))
    assert not _serves(held, v, pose(0), max_age=0)  # 0: never held


@pytest.mark.parametrize(
    "change",
    ["camera turned", "camera moved", "intrinsics", "image size", "view count", "level"],
)
def test_a_held_curvature_does_not_serve_other_views_or_another_level(change):
    v = views()
    held = _held(v)
    level = LEVEL
    if change == "camera turned":  # 2.1 deg about the anatomy centre (the origin): beyond the reach
        w = torch.tensor([0.0, math.radians(2.1), 0.0], dtype=torch.float64)
        turn = geometry.make_T(geometry.so3_exp(w), torch.zeros(3, dtype=torch.float64))
        v = dataclasses.replace(v, T_ref_from_cam=turn @ v.T_ref_from_cam)
    elif change == "camera moved":  # 4.1 mm: the anatomy centre moves as far in that camera
        T = v.T_ref_from_cam.clone()
        T[0, 2, 3] += 4.1
        v = dataclasses.replace(v, T_ref_from_cam=T)
    elif change == "intrinsics":
        K = v.K.clone()
        K[:, 0, 0] *= 1 + 2 * GEOMETRY_K_RTOL
        v = dataclasses.replace(v, K=K)
    elif change == "image size":
        v = views(size=(16, 20))
    elif change == "view count":
        v = views(n=3)
    else:
        level = (LEVEL[0], LEVEL[1] + 1, LEVEL[2])
    assert not _serves(held, v, pose(0), level=level)


def test_a_c_arm_that_turned_a_little_is_within_reach():
    v = views()
    held = _held(v)
    w = torch.tensor([0.0, math.radians(1.5), 0.0], dtype=torch.float64)  # about the anatomy centre
    turn = geometry.make_T(geometry.so3_exp(w), torch.zeros(3, dtype=torch.float64))
    K = v.K.clone()
    K[:, 0, 0] *= 1 + 0.5 * GEOMETRY_K_RTOL
    assert _serves(held, dataclasses.replace(v, T_ref_from_cam=turn @ v.T_ref_from_cam, K=K), pose(0))


@pytest.mark.parametrize("rot_deg, trans_mm", [(0.5, 1.0), (1.9, 3.9), (2.5, 1.0), (0.5, 4.5)])
def test_the_anatomy_moving_and_the_c_arms_moving_back_are_the_same_to_it(rot_deg, trans_mm):
    """The curvature depends on where each camera sees the anatomy from: the anatomy moved by M before fixed
    cameras, and the cameras moved by M^-1 before the anatomy where it was, are served alike."""
    v = views()
    held = _held(v)
    M = geometry.perturb(
        pose(0), rot_deg=rot_deg, trans_mm=trans_mm, centre_ct=C, generator=torch.Generator().manual_seed(4)
    )
    moved = _serves(held, v, M @ pose(0))
    back = dataclasses.replace(v, T_ref_from_cam=geometry.invert(M) @ v.T_ref_from_cam)
    assert moved == _serves(held, back, pose(0))
    assert moved == (rot_deg <= 2.0 and trans_mm <= 4.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(H=torch.full((6, 6), math.nan, dtype=torch.float64)), "finite 6x6"),
        (dict(age=-1), "age must be an int >= 0"),
        (dict(age=True), "age must be an int >= 0"),
    ],
)
def test_a_held_curvature_checks_what_it_holds(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(_held(), **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(H=torch.eye(5, dtype=torch.float64)),
        dict(T_ref_from_ct=torch.eye(3, dtype=torch.float64)),
        dict(K=torch.eye(3, dtype=torch.float64)[None].repeat(3, 1, 1)),
    ],
)
def test_a_held_curvature_refuses_wrong_shapes(kwargs):
    # ValueError from its own checks; the tests' runtime type checker (jaxtyping) may refuse them first
    with pytest.raises((ValueError, TypeError)):
        dataclasses.replace(_held(), **kwargs)


# ---------------------------------------------------------------------------------------
# The budget and the pipeline's policy (scripted refinement)
# ---------------------------------------------------------------------------------------


def test_the_held_schedule_is_the_finest_level_with_its_own_steps_and_reach():
    t = TrackingConfig(levels=2, iterations=6, held_iterations=0, held_max_rot_deg=1.5, held_max_trans_mm=3.0)
    s = t.schedule(REFINE, held=True)
    assert len(s.levels) == 1 and s.levels[0].size == REFINE.sizes[-1] and s.levels[0].iterations == 0
    assert (s.held_max_rot_deg, s.held_max_trans_mm) == (1.5, 3.0) and s.chord
    plain = t.schedule(REFINE)
    assert len(plain.levels) == 2 and plain.levels[-1].iterations == 6
    assert (plain.held_max_rot_deg, plain.held_max_trans_mm) == (0.0, 0.0)
    assert TrackingConfig(held_iterations=2).schedule(REFINE, held=True).levels[0].iterations == 2
    later = t.schedule(REFINE, held=True, round=2)  # later rounds: first-order steps, smaller
    assert later.levels[0].iterations == 6 and later.lr_scale == pytest.approx(0.25 * s.lr_scale)
    with pytest.raises(ValueError, match="round must be an int >= 0"):
        t.schedule(REFINE, round=-1)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(held_iterations=-1), ValueError, "held_iterations must be >= 0"),
        (dict(held_max_age=-1), ValueError, "held_max_age must be >= 0"),
        (dict(held_max_rot_deg=0.0), ValueError, "held_max_rot_deg must be a finite number > 0"),
        (dict(held_max_trans_mm=math.inf), ValueError, "held_max_trans_mm must be a finite number > 0"),
        (dict(held_curvature=1), TypeError, "held_curvature"),  # (beartype's check in the tests, ours elsewhere)
    ],
)
def test_tracking_config_checks_the_held_fields(kwargs, error, match):
    with pytest.raises(error, match=match):
        TrackingConfig(**kwargs)


def test_schedule_checks_the_held_reach():
    with pytest.raises(ValueError, match="held_max_rot_deg must be a finite number >= 0"):
        Schedule(levels=REFINE.levels(), held_max_rot_deg=-1.0)


def _pipeline(results, curvature, tracking=TrackingConfig()):
    tracker = PoseTracker()
    tracker.accept(AcceptedPose(T_ref_from_ct=pose(1), stamp_ns=1, curvature=curvature))
    reg = Scripted(results)
    config = PipelineConfig(global_search=GlobalConfig(enabled=False), acceptance=gates(), tracking=tracking)
    return RegistrationPipeline(reg, initialisers=[LastAcceptedPose(tracker)], config=config, tracker=tracker), reg


def test_a_tracking_start_carries_the_held_curvature_to_the_refinement_and_the_tracker_keeps_the_new_one():
    held = _held(T=pose(1))
    new = _held(T=pose(2)).older()
    p, reg = _pipeline([dataclasses.replace(result(pose(2)), curvature=new)], held)
    o = p.register(views(), stamp_ns=5)
    assert o.accepted and o.stages == ("tracking",)
    (_, schedule), (curvature,) = reg.calls[0], reg.curvatures
    assert curvature is held and schedule == TrackingConfig().schedule(REFINE, held=True)
    assert p.tracker.latest().curvature is new  # the next update's


@pytest.mark.parametrize("why", ["other views", "too old", "switched off"])
def test_a_held_curvature_that_does_not_serve_is_not_passed_on(why):
    held, tracking = _held(T=pose(1)), TrackingConfig()
    if why == "other views":
        held = _held(views(size=(16, 20)), T=pose(1))
    elif why == "too old":
        held = dataclasses.replace(held, age=tracking.held_max_age)
    else:
        tracking = TrackingConfig(held_curvature=False)
    p, reg = _pipeline([result(pose(2))], held, tracking=tracking)
    assert p.register(views(), stamp_ns=5).accepted
    assert reg.curvatures == [None] and reg.calls[0][1] == tracking.schedule(REFINE)


def test_a_second_round_goes_on_with_the_curvature_the_first_ended_with():
    held = _held(T=pose(1))
    near = geometry.translation(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)) @ pose(1)  # within reach
    first = dataclasses.replace(result(near, converged=False), curvature=held.older())
    p, reg = _pipeline([first, result(pose(3))], held)
    o = p.register(views(), stamp_ns=5)
    assert o.stages == ("tracking", "tracking") and o.accepted
    assert reg.curvatures[0] is held and reg.curvatures[1] is first.curvature
    (_, s1), (_, s2) = reg.calls
    # Newton steps alone first; then first-order steps before them (stalled Newton steps would only repeat)
    assert s1.levels[0].iterations == 0 and s2.levels[0].iterations == TrackingConfig().iterations
    assert s2 == TrackingConfig().schedule(REFINE, held=True, round=1)
    assert s2.lr_scale == pytest.approx(0.5 * s1.lr_scale) and s2.held_max_rot_deg == s1.held_max_rot_deg > 0
    # the first round's curvature gone (none measured): the next round takes the plain budget, in smaller steps
    p, reg = _pipeline([result(pose(2), converged=False), result(pose(3))], held)
    assert p.register(views(), stamp_ns=5).stages == ("tracking", "tracking")
    assert reg.curvatures == [held, None]
    (_, s1), (_, s2) = reg.calls
    assert s2 == TrackingConfig().schedule(REFINE, round=1) and s2.lr_scale == pytest.approx(0.5 * s1.lr_scale)


# ---------------------------------------------------------------------------------------
# On the shipped CT
# ---------------------------------------------------------------------------------------


def test_a_registration_returns_the_curvature_behind_its_covariance(registrar, biplane):
    T_true, v = biplane
    res = registrar.refine(v, _moved(T_true, registrar, 2.0, 4.0, seed=0))
    c = res.curvature
    assert res.success and c is not None and c.age == 0 and c.scale == res.curvature_scale
    assert c.level == LEVEL and c.same_detectors(v)
    # measured at the result, or within curvature_reuse of it (0.25 of the 0.3 deg / 0.5 mm steps)
    assert c.reaches(v.T_ref_from_cam, c.T_ref_from_ct, registrar.centre_ct, max_rot_deg=1e-5, max_trans_mm=1e-6)
    assert c.reaches(v.T_ref_from_cam, res.T_ref_from_ct, registrar.centre_ct, max_rot_deg=0.075, max_trans_mm=0.125)
    assert torch.linalg.eigvalsh(c.H).min() > 0
    # the covariance is the Laplace approximation with this curvature
    obj = registrar.objective(v, LEVEL[0], res.T_ref_from_ct, n_samples=LEVEL[1], patch=LEVEL[2], finest=True)
    torch.testing.assert_close(obj.covariance(c.H, res.T_ref_from_ct), res.covariance)


def test_a_small_motion_is_recovered_by_newton_steps_on_the_held_curvature(ct, registrar, biplane, monkeypatch):
    """The tracking update with a held curvature takes Newton steps alone (no first-order step) and measures
    no curvature: the same accuracy as the update that measures one, and the covariance from the held one."""
    T_true, v = biplane
    lm = ct_landmarks(ct).points_ct
    T_held = _moved(T_true, registrar, 1.0, 2.0, seed=5)
    held = registrar.refine(v, T_true).curvature  # the held registration's: its views, at its pose
    tracking = TrackingConfig()
    assert tracking.held_curvature_for(held, v, T_held, registrar) is held
    calls = _count_curvatures(monkeypatch)
    fast = registrar.refine(v, T_held, schedule=tracking.schedule(REFINE, held=True), curvature=held)
    assert len(calls) == 0 and fast.level_iterations == (0,) and fast.success and fast.converged
    assert fast.curvature.age == 1 and fast.curvature.H is held.H  # the held one served the covariance
    measured = registrar.refine(v, T_held, schedule=tracking.schedule(REFINE))
    assert len(calls) == 1
    assert mtre_mm(fast.T_ref_from_ct, T_true, lm) < 1.0
    assert mtre_mm(fast.T_ref_from_ct, measured.T_ref_from_ct, lm) < 0.3
    assert fast.uncertainty_mm == pytest.approx(measured.uncertainty_mm, rel=0.3)


def test_beyond_the_reach_the_covariance_measures_the_curvature_again(registrar, biplane, monkeypatch):
    T_true, v = biplane
    held = registrar.refine(v, T_true).curvature
    T_held = _moved(T_true, registrar, 1.0, 2.0, seed=6)
    schedule = dataclasses.replace(
        TrackingConfig().schedule(REFINE, held=True), held_max_rot_deg=1e-6, held_max_trans_mm=1e-6
    )
    calls = _count_curvatures(monkeypatch)
    res = registrar.refine(v, T_held, schedule=schedule, curvature=held)
    assert len(calls) == 1 and res.success
    assert res.curvature.age == 0 and res.curvature.H is not held.H
    torch.testing.assert_close(res.curvature.T_ref_from_ct, res.T_ref_from_ct)  # measured at the result


def test_refine_rejects_a_curvature_of_the_wrong_type(registrar, biplane):
    T_true, v = biplane
    with pytest.raises(TypeError, match="curvature"):  # (beartype's check in the tests, ours elsewhere)
        registrar.refine(v, T_true, curvature=torch.eye(6))


def test_a_tracking_chain_holds_the_curvature_from_update_to_update(ct, registrar, biplane):
    """Through the pipeline and its tracker: the first update measures a curvature (none held yet), the
    next ones use it (its age counts them), each accepted near the truth."""
    T_true, v = biplane
    lm = ct_landmarks(ct).points_ct
    tracker = PoseTracker()
    tracker.accept(AcceptedPose(T_ref_from_ct=_moved(T_true, registrar, 1.0, 2.0, seed=7), stamp_ns=1))
    pipe = RegistrationPipeline(
        registrar, initialisers=[LastAcceptedPose(tracker)], config=PipelineConfig(), tracker=tracker
    )
    ages = []
    for k in range(3):
        out = pipe.register(v, stamp_ns=2 + k)
        assert out.accepted and out.stages[0] == "tracking", (out.stages, out.reason)
        assert mtre_mm(out.result.T_ref_from_ct, T_true, lm) < 1.0
        ages.append(tracker.latest().curvature.age)
    assert ages[0] == 0 and ages[1:] == [1, 2]


# ---------------------------------------------------------------------------------------
# A Newton step that lowers the loss neither at full length nor at half
# ---------------------------------------------------------------------------------------


class _Stalled:
    """A Newton objective whose loss is lowest at the start: every step along the Newton direction raises it."""

    def __init__(self):
        self.g = torch.tensor([0, 0, 0, 0.5, 0, 0], dtype=torch.float64)  # a Newton step of 0.5 mm: not settled

    def grad(self, T, x):
        return self.g.clone(), 0.5

    def grad_hessian(self, T0, *a, **k):
        return self.g.clone(), torch.eye(6, dtype=torch.float64), 0.5

    def grad_here(self, T):
        return self.g.clone(), 0.6

    def loss(self, T):
        return 0.6

    def view_similarity(self, T):
        return torch.tensor([0.5, 0.5], dtype=torch.float64)

    def covariance(self, H, T0):
        return 1e-4 * torch.linalg.inv(H)


@pytest.mark.parametrize("stalled_converged", [True, False])
def test_a_stalled_newton_step_ends_the_polish_converged_when_asked(stalled_converged):
    reg = Registrar.__new__(Registrar)  # _polish needs only the configuration and the centre
    reg.config = dataclasses.replace(REFINE, stalled_converged=stalled_converged)
    reg.centre_ct, reg.device = C, torch.device("cpu")
    schedule = Schedule(levels=REFINE.levels(), newton_steps=3, fresh_curvature=False, chord=True)
    p = reg._polish(_Stalled(), pose(0), False, schedule)
    assert p.converged is stalled_converged
    assert torch.equal(p.T, pose(0))  # no step was taken
