"""Stamped joint-state buffer: interpolation, hold tolerance, out-of-order and missing data."""

import threading

import pytest

from mvreg_ros.ros.joint_buffer import JointStateBuffer, JointStateError

S = 1_000_000_000


def test_linear_interpolation_at_the_stamp():
    b = JointStateBuffer(window_s=10, tolerance_s=0.0, max_gap_s=5.0)
    b.add(1 * S, ["a", "b"], [0.0, 1.0])
    b.add(2 * S, ["a", "b"], [1.0, 3.0])
    b.add(4 * S, ["a", "b"], [1.0, -1.0])
    assert b.positions_at(1 * S + S // 4, ["a", "b"]) == pytest.approx({"a": 0.25, "b": 1.5})
    assert b.positions_at(3 * S, ["b"]) == pytest.approx({"b": 1.0})
    assert b.positions_at(1 * S, ["a"]) == {"a": 0.0}  # exactly at the ends
    assert b.positions_at(4 * S, ["a"]) == {"a": 1.0}


def test_outside_the_buffer():
    b = JointStateBuffer(window_s=10, tolerance_s=0.1, max_gap_s=5.0)
    with pytest.raises(JointStateError, match="no joint state received for joint 'a'"):
        b.positions_at(S, ["a"])
    b.add(1 * S, ["a"], [0.5])
    b.add(2 * S, ["a"], [0.7])
    with pytest.raises(JointStateError, match="before the joint-state buffer"):
        b.positions_at(S - 1, ["a"])
    # newer than the newest sample: held within the tolerance, stale beyond it
    assert b.positions_at(2 * S + S // 20, ["a"]) == {"a": 0.7}
    with pytest.raises(JointStateError, match="stale joint states"):
        b.positions_at(2 * S + S // 5, ["a"])
    with pytest.raises(JointStateError, match="no joint state received for joint 'zz'"):
        b.positions_at(S, ["a", "zz"])


def test_gap_limit_applies_only_to_a_moving_joint():
    b = JointStateBuffer(window_s=10, tolerance_s=0.0, max_gap_s=0.5)
    b.add(0, ["moving", "still"], [0.0, 2.0])
    b.add(S // 4, ["moving", "still"], [0.1, 2.0])
    b.add(2 * S, ["moving", "still"], [0.9, 2.0])  # 1.75 s without a message
    assert b.positions_at(S // 8, ["moving"]) == pytest.approx({"moving": 0.05})  # within 0.25 s: interpolated
    assert b.positions_at(S, ["still"]) == {"still": 2.0}  # long gap, but the joint did not move
    with pytest.raises(
        JointStateError, match="joint-state gap: 'moving' moved from 0.1 to 0.9 between samples 1.750 s"
    ):
        b.positions_at(S, ["moving"])
    assert b.positions_at(2 * S, ["moving"]) == {"moving": 0.9}  # at a sample: no interpolation
    assert b.positions_at(S // 4, ["moving"]) == {"moving": 0.1}  # on the sample before the gap


@pytest.mark.parametrize("kwargs", [{"max_gap_s": 0.0}, {"max_gap_s": float("inf")}, {"still_tolerance": -1.0}])
def test_gap_settings_are_checked(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        JointStateBuffer(**kwargs)


def test_out_of_order_rejection():
    b = JointStateBuffer(max_gap_s=5.0)
    b.add(2 * S, ["a", "b"], [1.0, 2.0])
    with pytest.raises(JointStateError, match="out-of-order"):
        b.add(2 * S, ["a"], [5.0])
    with pytest.raises(JointStateError, match="out-of-order"):
        b.add(1 * S, ["c", "b"], [0.0, 0.0])
    assert b.newest_ns("c") is None  # nothing of a rejected message is stored
    with pytest.raises(JointStateError, match="names"):
        b.add(3 * S, ["a", "b"], [1.0])
    with pytest.raises(JointStateError, match="non-finite"):
        b.add(3 * S, ["a"], [float("nan")])
    with pytest.raises(JointStateError, match="twice"):
        b.add(3 * S, ["a", "a"], [1.0, 2.0])
    # joints published separately by two sources mix
    b.add(3 * S, ["c"], [4.0])
    b.add(4 * S, ["a"], [3.0])
    assert b.positions_at(3 * S, ["a", "c"]) == pytest.approx({"a": 2.0, "c": 4.0})


def test_only_listed_joints_are_kept_and_window_trims():
    b = JointStateBuffer(window_s=2.0, max_gap_s=5.0, joints=["a"])
    b.add(1 * S, ["robot_joint", "a"], [9.0, 0.0])
    assert b.newest_ns("robot_joint") is None
    for k in range(2, 11):
        b.add(k * S, ["a"], [float(k)])
    with pytest.raises(JointStateError, match="before the joint-state buffer"):
        b.positions_at(7 * S, ["a"])
    assert b.positions_at(8 * S + S // 2, ["a"]) == pytest.approx({"a": 8.5})


def test_thread_safe_under_concurrent_add_and_lookup():
    b = JointStateBuffer(window_s=1000)
    b.add(1, ["a"], [0.0])
    errors = []

    def writer():
        for k in range(2, 3000):
            b.add(k, ["a"], [float(k)])

    def reader():
        for _ in range(3000):
            try:
                v = b.positions_at(1, ["a"])["a"]
                assert v == 0.0
            except Exception as e:  # pragma: no cover - shows up as a failure
                errors.append(e)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
