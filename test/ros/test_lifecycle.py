"""The managed node over real DDS, one node process per test (no test relies on another):
autostart=false leaves it unconfigured for a supervisor; configure (with the warm-up),
activate, deactivate (no TF afterwards, ~/pose_valid false at once), activate again (the old
pose is not published again), cleanup; a configure that fails leaves it unconfigured and alive;
~/reset, ~/register_now, ~/initial_pose (a wrong frame is rejected) and a backward time jump.
Every wait is on a condition with a deadline scaled by MVREG_TEST_TIMEOUT_SCALE."""

import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("tf2_msgs.msg")
pytest.importorskip("lifecycle_msgs.srv")
pytest.importorskip("std_srvs.srv")

from geometry_msgs.msg import PoseWithCovarianceStamped
from node_harness import register_good_set, stamp_ns_of, start_node, tf_at
from ros_harness import wait_until
from ros_scenario import mtre_mm

from mvreg_ros.ros.conversions import ns_to_stamp, pose_from_T


@pytest.fixture
def node(ros_env, ros_context, tmp_path):
    """``node(extra=..., wait=...)``: a node process of this test's own and this process's side."""
    started = []

    def start(**kwargs):
        h = start_node(ros_context, ros_env, tmp_path / f"node{len(started)}", **kwargs)
        started.append(h)
        return h

    yield start
    for h in started:
        h.close()


def status(h, event: str, contains: str = "", timeout: float = 60.0) -> dict:
    """The first status with ``event`` (and ``contains`` in its message) since the records were cleared."""

    def find():
        if not h.proc.alive():
            raise AssertionError(f"the node died:\n{h.proc.tail()}")
        found = [s for s in h.statuses_since(0, event) if contains in s["message"]]
        return found[0] if found else None

    return wait_until(find, timeout, what=f"status {event!r}; node log:\n{h.proc.tail()}")


def quiet_for(h, seconds: float) -> None:
    """Let about ``seconds`` pass, measured by this process's own joint-state stream (50 Hz)."""
    h.streaming = True
    n = h.joint_count
    wait_until(lambda: h.joint_count > n + int(50 * seconds), 30 + seconds, what="time to pass")


def inputs_subscribed(h) -> bool:
    return all(p.get_subscription_count() > 0 for p in h.image_pubs + h.info_pubs + [h.joint_pub])


def test_managed_node_without_autostart(node):
    h = node(extra={"autostart": False}, wait=False)
    assert h.lifecycle_state() == "unconfigured"
    wait_until(lambda: h.valid() is False, 30, what="the latched pose_valid false")
    assert not inputs_subscribed(h)
    assert not h.trigger("register_now").success  # nothing to register while unconfigured
    assert not h.trigger("reset").success

    # configure: CT, checks, warm-up (reported); inactive: still no subscriptions
    assert h.transition("configure", timeout=300)
    st = status(h, "configured")
    assert st["lifecycle"] == "inactive" and st["pose_valid"] == "False"
    assert float(st["warmup_s"]) > 0 and st["warmup_image_size"] == "64x64" and st["warmup_views"] == "2", st
    assert h.lifecycle_state() == "inactive" and not inputs_subscribed(h)
    assert not h.trigger("register_now").success
    assert h.count("markers") == 0  # ~/anatomy_marker is published on activate, not before

    # activate: registers and publishes
    assert h.transition("activate")
    h.wait_matched()
    marker = wait_until(lambda: h.markers and h.markers[-1], 30, what="~/anatomy_marker after activate")
    assert marker.header.frame_id == "anatomy" and 0 < len(marker.points) <= 3 * 50_000
    stamp, st = register_good_set(h)
    assert mtre_mm(tf_at(h, stamp), h.scenario.truth) < 2.0
    wait_until(lambda: h.valid() is True, 30, what="pose_valid true")
    wait_until(lambda: h.count("tfs") > 3, 30, what="the held pose republished")

    # deactivate: TF stops at once, pose_valid false, the status says so
    assert h.transition("deactivate")
    n_tf = h.count("tfs")
    st = status(h, "deactivated")
    assert (
        st["lifecycle"] == "inactive" and st["pose_valid"] == "False" and "TF is no longer published" in st["message"]
    )
    wait_until(lambda: h.valid() is False, 30, what="pose_valid false")
    quiet_for(h, 1.0)  # ten republishing periods
    assert h.count("tfs") == n_tf, "TF published after deactivate"

    # activate again: the state is kept, but the old pose is not published again by itself
    assert h.transition("activate")
    h.wait_matched()
    quiet_for(h, 1.0)
    assert h.count("tfs") == n_tf and h.valid() is False
    _, st = register_good_set(h)
    assert st["init_source"] == "last_accepted"  # the kept state: tracking from the last pose
    wait_until(lambda: h.valid() is True, 30, what="pose_valid true again")

    # deactivate and cleanup: back to unconfigured, alive
    assert h.transition("deactivate") and h.transition("cleanup")
    status(h, "cleaned_up")
    assert h.lifecycle_state() == "unconfigured" and h.proc.alive()
    assert h.valid() is False
    assert h.proc.interrupt() == 0, h.proc.tail()


def test_shutdown_from_active_withdraws_the_pose_and_ends_the_process(node):
    h = node()  # autostart: active
    register_good_set(h)
    wait_until(lambda: h.valid() is True, 30, what="pose_valid true")
    wait_until(lambda: h.count("tfs") > 3, 30, what="the held pose republished")
    h.clear()
    assert h.transition("shutdown")
    # the process ends by itself, cleanly, without a signal, after its last status and pose_valid
    wait_until(lambda: not h.proc.alive(), 60, what="the node process to exit after shutdown")
    assert h.proc.proc.returncode == 0, h.proc.tail()
    wait_until(lambda: h.statuses_since(0, "shutdown"), 30, what="the shutdown status")
    assert "TF withdrawn" in h.statuses_since(0, "shutdown")[0]["message"]
    wait_until(lambda: h.valid() is False, 30, what="pose_valid false at shutdown")


def test_failed_configure_without_autostart_stays_unconfigured(node, tmp_path):
    missing = tmp_path / "missing_ct.nii.gz"
    h = node(extra={"autostart": False, "volume_path": str(missing)}, wait=False)
    assert not h.transition("configure")
    st = status(h, "configure_failed")
    assert str(missing) in st["reason"] and st["level"] == b"\x02", st
    assert h.lifecycle_state() == "unconfigured" and h.proc.alive()
    assert h.proc.interrupt() == 0, h.proc.tail()


def initial_pose(h, T_mm, frame_id: str) -> PoseWithCovarianceStamped:
    msg = PoseWithCovarianceStamped()
    msg.header.frame_id = frame_id
    msg.header.stamp = ns_to_stamp(h.now_ns())
    msg.pose.pose = pose_from_T(T_mm)
    return msg


def test_services_initial_pose_and_time_jump(node):
    h = node()  # autostart: active
    stamp, _ = register_good_set(h)
    wait_until(lambda: h.valid() is True, 30, what="pose_valid true")

    # ~/reset: the pose is forgotten at once, nothing is republished
    h.clear()
    response = h.trigger("reset")
    assert response.success, response.message
    st = status(h, "reset")
    assert st["state"] == "waiting" and st["had_pose"] == "True"
    wait_until(lambda: h.valid() is False, 30, what="pose_valid false after reset")
    n_tf = h.count("tfs")
    quiet_for(h, 1.0)
    assert h.count("tfs") == n_tf, "TF published after reset"

    # ~/initial_pose in another frame: rejected with a status; in reference_frame: the next start
    h.clear()
    h.until_status(
        lambda: h.initial_pose_pub.publish(initial_pose(h, h.scenario.initial, "map")),
        "input_rejected",
        "reference_frame 'carm_base'",
    )
    h.until_status(lambda: h.initial_pose_pub.publish(initial_pose(h, h.scenario.initial, "carm_base")), "initial_pose")

    # ~/register_now: a full registration of the newest set, from the seed
    h.clear()
    response = h.trigger("register_now")
    assert response.success, response.message
    st = status(h, "registered", timeout=120)
    assert st["init_source"] == "initial_pose" and st["full"] == "True", st
    assert stamp_ns_of(h, st) == stamp  # the newest complete set
    wait_until(lambda: h.valid() is True, 30, what="pose_valid true")
    # again, while tracking: still not from the last accepted pose (the seed is used up)
    h.clear()
    assert h.trigger("register_now").success
    st = status(h, "registered", timeout=120)
    assert st["init_source"] == "configured" and st["full"] == "True", st

    # a backward time jump (joint states from 10 s back): everything is cleared
    h.clear()
    h.until_status(lambda: h.publish_joints(h.now_ns() - 10_000_000_000), "time_jump")
    st = h.statuses_since(0, "time_jump")[0]
    assert st["state"] == "waiting" and st["had_pose"] == "True", st
    wait_until(lambda: h.valid() is False, 30, what="pose_valid false after the time jump")
    assert not h.trigger("register_now").success  # the buffers are empty
    assert h.proc.interrupt() == 0, h.proc.tail()
