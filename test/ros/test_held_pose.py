"""The one stamp rule of the held pose, without DDS (mvreg_ros/ros/held_pose.py): an accepted
pose goes out once at its image stamp; copies are stamped with the ROS time, never while a set
is pending and never twice at one stamp (a stopped /clock); the hold ends by ROS age or steady
time, whichever comes first; withdrawals and forget (reset, time jump) with epochs."""

import pytest
import torch

from mvreg_ros.core.registration.initialisers import AcceptedPose, LastAcceptedPose, StartRequest
from mvreg_ros.ros.held_pose import HeldPose, StaleEpoch, Tick

S = 1_000_000_000


def pose(stamp_s: float) -> AcceptedPose:
    return AcceptedPose(T_ref_from_ct=torch.eye(4, dtype=torch.float64), stamp_ns=int(stamp_s * S))


def held(hold_s=30.0, **kw) -> HeldPose:
    return HeldPose(hold_s=hold_s, **kw)


def test_an_accepted_pose_goes_out_once_at_its_image_stamp():
    h = held()
    assert h.state() == "waiting" and not h.valid
    assert h.offer(pose(10), epoch=h.epoch, steady_ns=0) == 10 * S
    assert h.valid and h.state() == "tracking"
    # a second registration of the same set: no second TF at that stamp
    assert h.offer(pose(10), epoch=h.epoch, steady_ns=0) is None


def test_copies_are_stamped_now_and_never_while_a_set_is_pending():
    h = held()
    h.offer(pose(10), epoch=h.epoch, steady_ns=0)
    assert h.tick(now_ns=11 * S, steady_ns=1 * S, pending=False) == Tick(stamp_ns=11 * S)
    # a set is being registered: nothing at all, not even a copy stamped before it
    for now in (12, 13, 14):
        assert h.tick(now_ns=now * S, steady_ns=(now - 10) * S, pending=True) == Tick()
    assert h.tick(now_ns=15 * S, steady_ns=5 * S, pending=False) == Tick(stamp_ns=15 * S)


def test_a_stopped_clock_never_sends_one_stamp_twice():
    h = held()
    h.offer(pose(10), epoch=h.epoch, steady_ns=0)
    assert h.tick(now_ns=12 * S, steady_ns=1 * S, pending=False).stamp_ns == 12 * S
    for k in range(2, 20):  # /clock stopped at 12 s: the steady time goes on, nothing is sent
        assert h.tick(now_ns=12 * S, steady_ns=k * S, pending=False).stamp_ns is None
    assert h.tick(now_ns=12 * S + 1, steady_ns=20 * S, pending=False).stamp_ns == 12 * S + 1
    # nor a copy at or before the pose's own stamp
    h2 = held()
    h2.offer(pose(10), epoch=h2.epoch, steady_ns=0)
    assert h2.tick(now_ns=10 * S, steady_ns=1, pending=False).stamp_ns is None


def test_the_hold_ends_on_the_ros_clock():
    h = held(hold_s=5.0)
    h.offer(pose(10), epoch=h.epoch, steady_ns=100 * S)
    assert h.tick(now_ns=15 * S, steady_ns=101 * S, pending=False).stamp_ns == 15 * S  # 5 s: still held
    t = h.tick(now_ns=15 * S + 1, steady_ns=101 * S, pending=False)
    assert t == Tick(expired=True) and not h.valid and h.state() == "stale"
    assert h.tick(now_ns=16 * S, steady_ns=102 * S, pending=False) == Tick()  # reported once
    assert h.latest() is not None  # still the start of the next registration


def test_the_hold_ends_on_the_steady_clock_when_the_ros_clock_stops():
    """Sim time with /clock stopped: the ROS age never grows, the steady time since acceptance does."""
    h = held(hold_s=5.0)
    h.offer(pose(10), epoch=h.epoch, steady_ns=100 * S)
    h.tick(now_ns=11 * S, steady_ns=101 * S, pending=False)
    assert h.tick(now_ns=11 * S, steady_ns=105 * S, pending=False) == Tick()
    assert h.tick(now_ns=11 * S, steady_ns=105 * S + 1, pending=False) == Tick(expired=True)
    assert h.state() == "stale"


def test_the_hold_also_ends_while_a_set_is_pending():
    h = held(hold_s=1.0)
    h.offer(pose(10), epoch=h.epoch, steady_ns=0)
    assert h.tick(now_ns=12 * S, steady_ns=2 * S, pending=True).expired


def test_withdraw_stops_everything_until_the_next_accepted_pose():
    h = held()
    h.offer(pose(10), epoch=h.epoch, steady_ns=0)
    assert h.withdraw("rejected") and not h.withdraw("rejected")
    assert h.state() == "withdrawn" and h.tick(now_ns=11 * S, steady_ns=S, pending=False) == Tick()
    assert h.latest().stamp_ns == 10 * S  # kept as the tracking start
    assert h.offer(pose(12), epoch=h.epoch, steady_ns=2 * S) == 12 * S and h.valid


def test_an_inactive_node_keeps_the_pose_as_a_start_without_publishing_it():
    h = held()
    assert h.offer(pose(10), epoch=h.epoch, steady_ns=0, publish=False) is None
    assert not h.valid and h.state() == "withdrawn" and h.latest() is not None
    assert h.tick(now_ns=11 * S, steady_ns=S, pending=False) == Tick()


def test_forget_starts_a_new_epoch_and_a_pose_of_the_old_one_is_refused():
    h = held()
    e0 = h.epoch
    h.offer(pose(10), epoch=e0, steady_ns=0)
    assert h.forget() and h.latest() is None and h.state() == "waiting" and h.epoch == e0 + 1
    with pytest.raises(StaleEpoch, match="epoch"):
        h.offer(pose(11), epoch=e0, steady_ns=0)  # a registration that began before the reset
    assert h.latest() is None
    assert h.offer(pose(9), epoch=h.epoch, steady_ns=0) == 9 * S  # after a time jump: an earlier stamp is fine


def test_the_tracking_initialiser_reads_the_held_pose():
    h = held()
    init = LastAcceptedPose(h)
    assert init.start(StartRequest(views=None, stamp_ns=20 * S)) is None
    h.offer(pose(10), epoch=h.epoch, steady_ns=0)
    start = init.start(StartRequest(views=None, stamp_ns=20 * S))
    assert start.tracking and start.source == "last_accepted"
    h.forget()
    assert init.start(StartRequest(views=None, stamp_ns=20 * S)) is None


def test_no_republishing_when_disabled():
    h = held(republish=False)
    assert h.offer(pose(10), epoch=h.epoch, steady_ns=0) == 10 * S
    assert h.tick(now_ns=11 * S, steady_ns=S, pending=False) == Tick()


@pytest.mark.parametrize("hold", [-1.0, "30", True, float("nan")])
def test_bad_hold(hold):
    with pytest.raises(ValueError, match="hold_s"):
        HeldPose(hold_s=hold)


@pytest.mark.parametrize("bad", [1.5, "1", True, None])
def test_bad_times(bad):
    h = held()
    with pytest.raises(TypeError, match="now_ns"):
        h.tick(now_ns=bad, steady_ns=0, pending=False)
    with pytest.raises(TypeError, match="steady_ns"):
        h.offer(pose(1), epoch=0, steady_ns=bad)


def test_copies_are_stamped_the_image_latency_before_now():
    """A copy must not claim a time the node has no images of yet: it is stamped lag_ns before now."""
    h = HeldPose(hold_s=100.0)
    h.offer(pose(10), epoch=0, steady_ns=0)
    assert h.tick(now_ns=10 * S + 300_000_000, steady_ns=1, pending=False, lag_ns=400_000_000) == Tick()
    assert h.tick(now_ns=11 * S, steady_ns=1, pending=False, lag_ns=400_000_000) == Tick(stamp_ns=10_600_000_000)
    # a shorter lag later never sends a stamp again or goes back
    assert h.tick(now_ns=11 * S, steady_ns=2, pending=False, lag_ns=0) == Tick(stamp_ns=11 * S)
    assert h.tick(now_ns=11 * S + 1, steady_ns=3, pending=False, lag_ns=500_000_000) == Tick()
    with pytest.raises(ValueError, match="lag_ns"):
        h.tick(now_ns=12 * S, steady_ns=4, pending=False, lag_ns=-1)
    with pytest.raises(TypeError, match="lag_ns"):
        h.tick(now_ns=12 * S, steady_ns=4, pending=False, lag_ns=0.5)


def test_image_lag_is_the_recent_worst_capped():
    from mvreg_ros.ros.held_pose import ImageLag

    lag = ImageLag(window=3, margin_ns=10, max_ns=1000)
    assert lag.lag_ns() == 0
    lag.arrived(stamp_ns=100, now_ns=150)
    lag.arrived(stamp_ns=200, now_ns=190)  # stamped in the future: 0
    assert lag.lag_ns() == 60
    lag.arrived(stamp_ns=300, now_ns=100_000)  # a stale image: capped
    assert lag.lag_ns() == 1000
    for k in range(3):  # the window forgets it
        lag.arrived(stamp_ns=1000 + k, now_ns=1005 + k)
    assert lag.lag_ns() == 15
    lag.clear()
    assert lag.lag_ns() == 0
    with pytest.raises(ValueError, match="window"):
        ImageLag(window=0)
    with pytest.raises(TypeError, match="stamp_ns"):
        lag.arrived(stamp_ns=1.0, now_ns=2)
