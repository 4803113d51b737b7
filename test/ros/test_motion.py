"""The motion rules of sequential sets (mvreg_ros.ros.motion), with constructed verdicts and
probe values: no engine, no DDS."""

import math

import pytest

from mvreg_ros.core.registration.acceptance import AcceptanceConfig, Verdict
from mvreg_ros.ros.motion import MotionConfig, MotionState, SetDecision, held_pose_contradicted, judge_set

CFG = MotionConfig(similarity_drop=0.2, min_similarity=0.5, max_shift_mm=3.0, min_gain=0.05)
GATES = AcceptanceConfig()


def verdict(shifts, gains, cfg=GATES) -> Verdict:
    """A verdict as the engine's acceptance test builds it from per-view shifts and gains."""
    bad = tuple(i for i, (s, g) in enumerate(zip(shifts, gains)) if s > cfg.max_view_shift_mm and g > cfg.max_view_gain)
    return Verdict(
        accepted=not bad,
        reason="views disagree" if bad else "",
        view_similarity=tuple(0.9 for _ in shifts),
        view_shift_mm=tuple(shifts),
        view_gain=tuple(gains),
        disagreeing_views=bad,
    )


# ------------------------------------------------------------------------- judge_set


def test_agreeing_views_keep_the_engines_verdict():
    s = GATES.max_view_shift_mm
    v = verdict([s + 2.0, 0.8 * s], [0.001, 0.02])  # a shift without a gain, a gain without a shift: agreement
    assert v.accepted and judge_set([1, 2], v.disagreeing_views) == SetDecision("accept")


def test_two_views_that_disagree_are_rejected_whichever_moved():
    # the newest view contradicts the joint result
    v = verdict([0.5, 7.0], [0.0, 0.2])
    d = judge_set([100, 200], v.disagreeing_views)
    assert d.action == "reject" and d.pre_motion_ns == 100
    assert "newest view (view 1)" in d.reason and "motion between shots" in d.reason
    # the older view contradicts it: the newest alone is not enough either
    v = verdict([7.0, 0.5], [0.2, 0.0])
    d = judge_set([100, 200], v.disagreeing_views)
    assert d.action == "reject" and d.pre_motion_ns == 100 and "1 view(s)" in d.reason
    # both disagree
    d = judge_set([100, 200], verdict([7.0, 2.5], [0.03, 0.02]).disagreeing_views)
    assert d.action == "reject" and d.pre_motion_ns == 100


def test_views_on_the_newest_side_are_registered_again():
    # 3 views, the oldest moved away from the two newer ones (which carry the joint result)
    v = verdict([6.0, 0.3, 0.2], [0.1, 0.0, 0.0])
    d = judge_set([10, 20, 30], v.disagreeing_views)
    assert (
        d == SetDecision("reregister", views=(1, 2), reason=d.reason, pre_motion_ns=10)
        and "registering again from views [1, 2]" in d.reason
    )
    # the order of the views does not matter: the newest is the largest stamp
    d = judge_set([30, 10, 20], verdict([0.2, 6.0, 0.3], [0.0, 0.1, 0.0]).disagreeing_views)
    assert d.action == "reregister" and d.views == (0, 2) and d.pre_motion_ns == 10
    # a re-registration that disagrees again is rejected
    d = judge_set([20, 30], (0,), subset=True)
    assert d.action == "reject" and "again" in d.reason and d.pre_motion_ns == 20


def test_the_newest_view_against_older_ones_that_agree_with_each_other():
    # 3 views; the joint result follows the two older ones, the newest wants elsewhere: the newest
    # alone is not enough, and the older views are the pre-motion ones
    d = judge_set([10, 20, 30], verdict([0.2, 0.3, 8.0], [0.0, 0.0, 0.2]).disagreeing_views)
    assert d.action == "reject" and d.pre_motion_ns == 20
    # with min_views 1 (a single-view configuration) the newest alone is registered again
    d = judge_set([10, 20, 30], (2,), min_views=1)
    assert d.action == "reregister" and d.views == (2,)


def test_all_views_on_the_newest_side_is_not_a_reregistration():
    # every view disagrees and the newest is one of them: only the newest is known to be on its side
    d = judge_set([10, 20, 30], (0, 1, 2))
    assert d.action == "reject" and d.pre_motion_ns == 20


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        (([], ()), {}, ValueError, "empty"),
        (([1, 1], ()), {}, ValueError, "twice"),
        (([1, 2], (2,)), {}, ValueError, "outside"),
        (([1, 2], (-1,)), {}, ValueError, "outside"),
        (([1, 2], ("0",)), {}, TypeError, "view indices"),
        (([1, 2], (True,)), {}, TypeError, "view indices"),
        (([1, 2], "0"), {}, TypeError, "disagreeing_views"),
        (("12", ()), {}, TypeError, "stamps_ns"),
        (([1.5, 2], ()), {}, TypeError, "stamps_ns"),
        (([-1, 2], ()), {}, ValueError, "stamps_ns"),
        (([1, 2], ()), {"min_views": 0}, ValueError, "min_views"),
    ],
)
def test_judge_set_refuses_bad_inputs(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        judge_set(*args, **kwargs)


# ------------------------------------------------------------- held_pose_contradicted


def test_a_view_that_confirms_the_held_pose():
    # measured on the simulated mobile C-arm (example:8, 64 px): a new view of an unmoved anatomy
    # reaches 0.84..0.98 at the held pose, moves it up to 5.5 mm alone but gains at most 0.022
    assert held_pose_contradicted(0.84, 5.5, 0.022, accepted_level=0.94, config=CFG) == ""
    assert held_pose_contradicted(0.96, 0.8, 0.0004, accepted_level=0.90, config=CFG) == ""
    assert held_pose_contradicted(0.75, 0.0, 0.0, accepted_level=0.95, config=CFG) == ""  # exactly at the floor


def test_a_view_of_moved_anatomy_contradicts_the_held_pose():
    # the same views after a 10 mm / 5 degree motion: similarity 0.62..0.88, shift 6..14 mm, gain 0.1..0.25
    why = held_pose_contradicted(0.66, 9.0, 0.23, accepted_level=0.90, config=CFG)
    assert "more than motion_similarity_drop 0.2 below the 0.900" in why
    why = held_pose_contradicted(0.88, 6.2, 0.10, accepted_level=0.91, config=CFG)
    assert "moves the anatomy 6.2 mm" in why and "gains 0.100" in why
    why = held_pose_contradicted(0.45, 0.0, 0.0, accepted_level=0.5, config=CFG)
    assert "below min_similarity 0.5" in why


def test_shift_and_gain_must_both_exceed():
    assert held_pose_contradicted(0.9, 10.0, 0.05, accepted_level=0.9, config=CFG) == ""  # gain not above
    assert held_pose_contradicted(0.9, 3.0, 0.5, accepted_level=0.9, config=CFG) == ""  # shift not above
    assert held_pose_contradicted(0.9, 3.01, 0.051, accepted_level=0.9, config=CFG) != ""


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_an_unchecked_view_counts_as_a_contradiction(bad):
    assert "could not be checked" in held_pose_contradicted(bad, 0.0, 0.0, accepted_level=0.9, config=CFG)
    assert "could not be checked" in held_pose_contradicted(0.9, bad, 0.0, accepted_level=0.9, config=CFG)
    assert "could not be checked" in held_pose_contradicted(0.9, 0.0, bad, accepted_level=0.9, config=CFG)


def test_held_pose_contradicted_refuses_bad_inputs():
    with pytest.raises(TypeError, match="similarity"):
        held_pose_contradicted("0.9", 0.0, 0.0, accepted_level=0.9, config=CFG)
    with pytest.raises(TypeError, match="gain"):
        held_pose_contradicted(0.9, 0.0, None, accepted_level=0.9, config=CFG)
    with pytest.raises(ValueError, match="accepted_level"):
        held_pose_contradicted(0.9, 0.0, 0.0, accepted_level=math.nan, config=CFG)
    with pytest.raises(TypeError, match="accepted_level"):
        held_pose_contradicted(0.9, 0.0, 0.0, accepted_level=True, config=CFG)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"similarity_drop": -0.1}, ValueError),
        ({"max_shift_mm": math.inf}, ValueError),
        ({"min_gain": "0.1"}, TypeError),
        ({"min_similarity": math.nan}, ValueError),
    ],
)
def test_motion_config_refuses_bad_values(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        MotionConfig(**kwargs)


# ----------------------------------------------------------------------- MotionState


def test_motion_state_keeps_pre_motion_views_out():
    m = MotionState()
    assert m.after_motion([5, 10, 15]) == [0, 1, 2] and m.pre_motion_ns is None
    m.moved(10)
    assert m.after_motion([5, 10, 15]) == [2]
    m.moved(7)  # an older motion does not bring views back
    assert m.pre_motion_ns == 10
    m.accepted([0.93, 0.88])
    assert m.accepted_level == pytest.approx(0.88)
    m.forget()
    assert m.pre_motion_ns is None and m.accepted_level is None and m.after_motion([5]) == [0]


def test_motion_state_refuses_bad_inputs():
    m = MotionState()
    with pytest.raises(TypeError, match="pre_motion_ns"):
        m.moved(1.0)
    with pytest.raises(ValueError, match="pre_motion_ns"):
        m.moved(-5)
    with pytest.raises(ValueError, match="empty"):
        m.accepted([])
    with pytest.raises(ValueError, match="view_similarity"):
        m.accepted([0.9, math.nan])
    with pytest.raises(TypeError, match="stamps_ns"):
        m.after_motion([1, "2"])
