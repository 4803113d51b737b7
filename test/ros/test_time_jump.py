"""Backward time jumps without DDS (mvreg_ros/ros/time_jump.py): the ROS clock going back at
all, a joint state far before the newest; what is a jump and what is not."""

import pytest

from mvreg_ros.ros.time_jump import TimeJumpDetector

S = 1_000_000_000


def test_the_clock_going_back_is_a_jump():
    d = TimeJumpDetector(joint_jump_s=2.0)
    assert d.clock(100 * S) is None
    assert d.clock(100 * S) is None  # a stopped clock is not a jump
    assert d.clock(101 * S) is None
    reason = d.clock(101 * S - 1)
    assert reason is not None and "went back" in reason
    assert d.clock(101 * S) is None  # the new time line goes on from there


def test_a_bag_loop_restarting_sim_time_is_a_jump():
    d = TimeJumpDetector(joint_jump_s=2.0)
    for t in range(1000, 1060):
        assert d.clock(t * S) is None
    assert "to 1000.000 s" in d.clock(1000 * S)


def test_a_joint_state_far_before_the_newest_is_a_jump_a_late_one_is_not():
    d = TimeJumpDetector(joint_jump_s=2.0)
    assert d.joint_stamp(50 * S) is None
    assert d.joint_stamp(49 * S) is None  # late (out of order): the buffer rejects it, no jump
    assert d.joint_stamp(48 * S) is None  # exactly joint_jump_s back: not yet
    reason = d.joint_stamp(48 * S - 1)
    assert reason is not None and "before the newest" in reason
    assert d.joint_stamp(48 * S) is None  # the new time line: its own newest is 48 s


def test_restart_forgets_what_was_seen():
    d = TimeJumpDetector(joint_jump_s=1.0)
    d.clock(10 * S)
    d.joint_stamp(10 * S)
    d.restart()
    assert d.clock(1 * S) is None and d.joint_stamp(1 * S) is None
    d.restart(now_ns=5 * S)
    assert d.clock(4 * S) is not None


@pytest.mark.parametrize("bad", [0, -1.0, "2", True])
def test_bad_threshold(bad):
    with pytest.raises(ValueError, match="joint_jump_s"):
        TimeJumpDetector(joint_jump_s=bad)


@pytest.mark.parametrize("bad", [1.0, "1", None, False])
def test_bad_stamps(bad):
    d = TimeJumpDetector(joint_jump_s=1.0)
    with pytest.raises(TypeError, match="now_ns"):
        d.clock(bad)
    with pytest.raises(TypeError, match="stamp_ns"):
        d.joint_stamp(bad)
