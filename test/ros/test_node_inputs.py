"""The node against bad input, over real DDS: each bad input gives a status message with its
reason and no TF, the node keeps running and registers the next good set; a failed update
never replaces a good pose (it withdraws it from TF and ~/pose_valid) and a stale pose stops
being published.

A node process (biplane config, synchronized mode) and this process playing the C-arm (images,
CameraInfo, joint states) and the listeners. The bad-input tests share one node (start-up
loads the CT) that never holds a pose; before each test it is reset to a known state (alive,
no pose, joint states streaming, records cleared) and replaced by a fresh one if a test left
it dead or holding a pose. Tests that need a node that has received nothing, or that follow a
pose (register, keep it through a failed update, let it go stale), each get a node of their
own. No test relies on another having run or passed.
"""

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("tf2_msgs.msg")

from node_harness import (
    Harness,
    no_tf_at,
    noise_set,
    register_good_set,
    stamp_ns_of,
    start_node,
    tf_at,
)
from ros_harness import wait_until
from ros_scenario import mtre_mm
from sensor_msgs.msg import Image

from mvreg_ros.ros.conversions import T_from_pose, stamp_to_ns, tensor_to_image

HOLD_S = 4.0  # pose_hold_s of the stale-pose test; the other nodes hold a pose for LONG_HOLD_S


class SharedNode:
    """One node for the bad-input tests, reset to a known state before each test."""

    def __init__(self, ctx, env, directory):
        self.ctx, self.env, self.directory = ctx, env, directory
        self.starts = 0
        self.h = self._start()

    def _start(self) -> Harness:
        self.starts += 1
        return start_node(self.ctx, self.env, self.directory / f"node{self.starts}")

    def reset(self) -> Harness:
        """Alive, holding no pose (never a TF), joint states streaming, records cleared; a node
        that a test left dead or holding a pose is replaced."""
        h = self.h
        if h.closed or not h.proc.alive() or h.count("tfs") > 0 or h.count("poses") > 0:
            h.close()
            h = self.h = self._start()
        h.clear()
        h.streaming = True
        n = h.joint_count
        wait_until(lambda: h.joint_count > n + 5, 30, what="joint states streaming")
        return h

    def close(self):
        self.h.close()


@pytest.fixture(scope="module")
def shared_node(ros_env, ros_context, tmp_path_factory):
    node = SharedNode(ros_context, ros_env, tmp_path_factory.mktemp("node_inputs"))
    try:
        yield node
    finally:
        node.close()


@pytest.fixture
def harness(shared_node):
    """The shared node, reset (see SharedNode.reset)."""
    return shared_node.reset()


@pytest.fixture
def fresh(ros_env, ros_context, tmp_path):
    """``fresh(hold_s=...)``: a node of this test's own that has received nothing yet."""
    started = []

    def start(**kwargs) -> Harness:
        h = start_node(ros_context, ros_env, tmp_path / f"node{len(started)}", **kwargs)
        started.append(h)
        return h

    yield start
    for h in started:
        h.close()


def test_missing_camera_info(fresh):
    h = fresh()
    st = h.until_status(
        lambda: [h.publish_image(i, h.good(i), h.now_ns(), info=False) for i in range(2)],
        "input_rejected",
        "no CameraInfo received",
    )
    assert st["level"] == b"\x01" and st["state"] == "waiting"
    assert h.count("tfs") == 0


def test_missing_joint_states(fresh):
    h = fresh()
    h.until_status(
        lambda: h.publish_set([h.good(0), h.good(1)], h.now_ns()), "input_rejected", "no joint state received"
    )
    assert h.count("tfs") == 0


def test_image_stamp_outside_joint_state_buffer(harness):
    h = harness
    h.until_status(
        lambda: h.publish_image(0, h.good(0), h.now_ns() - 20_000_000_000),
        "input_rejected",
        "before the joint-state buffer",
    )
    assert h.count("tfs") == 0


@pytest.mark.parametrize(
    "case, contains",
    [
        ("rgb8", "unsupported image encoding"),
        ("size", "does not match CameraInfo"),
        ("nan", "NaN"),
        ("constant", "constant"),
    ],
)
def test_bad_images(harness, case, contains):
    h = harness
    good = h.good(0)
    if case == "rgb8":
        img = Image(height=64, width=64, encoding="rgb8", step=192)
        img.data = np.random.default_rng(0).integers(0, 255, 64 * 64 * 3, dtype=np.uint8).tobytes()
        action = lambda: h.publish_image(0, img, h.now_ns())
    elif case == "size":
        action = lambda: h.publish_image(0, good, h.now_ns(), info_size=(128, 128))
    elif case == "nan":
        a = np.random.default_rng(1).uniform(100, 1000, (64, 64)).astype(np.float32)
        a[10, 10] = np.nan
        img = tensor_to_image(a, encoding="32FC1")
        action = lambda: h.publish_image(0, img, h.now_ns())
    else:
        img = tensor_to_image(np.full((64, 64), 1000.0), encoding="mono16")
        action = lambda: h.publish_image(0, img, h.now_ns())
    h.until_status(action, "input_rejected", contains)
    assert h.count("tfs") == 0


def test_stale_joint_states(harness):
    h = harness
    h.streaming = False
    # an exposure half a second after the last joint state (tolerance 0.1 s)
    h.until_status(
        lambda: h.publish_image(0, h.good(0), h.last_joint_ns + 500_000_000), "input_rejected", "stale joint states"
    )
    assert h.count("tfs") == 0


def test_out_of_order_joint_states(harness):
    h = harness
    h.until_status(
        lambda: h.publish_joints(h.last_joint_ns - 1_000_000_000), "input_rejected", "out-of-order joint state"
    )
    assert h.count("tfs") == 0


def test_out_of_order_images(harness):
    h = harness

    def action():
        t = h.now_ns() - 50_000_000
        h.publish_image(0, h.good(0), t)
        h.publish_image(0, h.good(0), t - 30_000_000)

    h.until_status(action, "input_rejected", "out-of-order image")
    assert h.count("tfs") == 0


def test_registration_failing_a_gate_publishes_no_tf(harness):
    h = harness
    st = h.until_status(
        lambda: h.publish_set(noise_set(h), h.now_ns() - 50_000_000), "registration_rejected", timeout=60, period=30
    )
    # the engine's or a gate's reason: not converged, curvature, similarity or uncertainty
    assert st["reason"] and st["level"] == b"\x01", st
    assert st["init_source"] == "configured"
    assert h.count("tfs") == 0 and h.count("poses") == 0


def test_good_set_registers_after_bad_input(harness):
    """The shared node, after the bad inputs of the other tests (or none: it does not matter)."""
    h = harness
    stamp, st = register_good_set(h)
    T = tf_at(h, stamp)
    err = mtre_mm(T, h.scenario.truth)
    assert err < 2.0, err
    assert len(st["view_similarity"].split(",")) == 2 and st["init_source"] == "configured"
    assert float(st["uncertainty_mm"]) < 5.0
    # ~/pose: same pose in metres, the engine's covariance
    pose = wait_until(lambda: [p for p in h.poses if stamp_to_ns(p.header.stamp) == stamp], 30, what="~/pose")[0]
    assert pose.header.frame_id == "carm_base"
    assert float((T_from_pose(pose.pose.pose) - T).abs().max()) < 1e-6
    cov = np.asarray(pose.pose.covariance).reshape(6, 6)
    assert (np.diag(cov) > 0).all() and np.diag(cov)[:3].max() < 1e-4  # metres^2: under 10 mm sigma
    overlay = wait_until(lambda: h.overlays, 30, what="~/overlay")[-1]
    assert (overlay.encoding, overlay.height, overlay.width) == ("rgb8", 64, 128)


def test_failed_update_withdraws_the_pose_and_tracking_goes_on(fresh):
    """A newer set that fails the acceptance test withdraws the held pose at once (pose_valid
    false, no more TF) but it stays the start of the next registration, which brings it back."""
    h = fresh()  # holds a pose for LONG_HOLD_S: however slow the machine, it is not stale here
    good_stamp, _ = register_good_set(h)
    T_good = tf_at(h, good_stamp)
    wait_until(lambda: h.valid() is True, 30, what="pose_valid true")
    st = h.until_status(
        lambda: h.publish_set(noise_set(h), h.now_ns() - 50_000_000), "registration_rejected", timeout=90, period=30
    )
    assert st["withdrawn"] == "True" and st["state"] == "withdrawn" and st["pose_valid"] == "False", st
    assert no_tf_at(h, stamp_ns_of(h, st))
    wait_until(lambda: h.valid() is False, 30, what="pose_valid false")
    start = h.count("tfs")
    n = h.joint_count
    wait_until(lambda: h.joint_count > n + 50, 60, what="time to pass (joint states)")  # 1 s at 50 Hz: 10 timer periods
    assert h.count("tfs") == start, "TF republished after the pose was withdrawn"
    with h.lock:
        assert all(float((T - T_good).abs().max()) < 1e-6 for _, T in h.tfs)
    # the next good set registers, tracking from the last accepted pose; its images come without
    # a CameraInfo of their own stamp (a latched CameraInfo): after camera_info_wait_s the latest is used
    stamp2, st = register_good_set(h, info=False)
    assert st["init_source"] == "last_accepted" and stamp2 > good_stamp
    wait_until(lambda: h.valid() is True, 30, what="pose_valid true again")


def test_stale_pose_is_not_republished(fresh):
    h = fresh(hold_s=HOLD_S)
    stamp, registered = register_good_set(h)
    st = wait_until(
        lambda: [
            s
            for s in h.statuses_since(0, "pose_stale")
            if float(s["pose_stamp"]) == pytest.approx(stamp * 1e-9, abs=1e-6)
        ],
        HOLD_S + 30,
        what="pose_stale status of the last accepted pose",
    )[-1]
    assert st["state"] == "stale"
    n = h.joint_count
    wait_until(lambda: h.joint_count > n + 15, 30, what="time to pass (joint states)")  # 0.3 s at 50 Hz
    limit = stamp + int((HOLD_S + 0.2) * 1e9)
    with h.lock:
        late = [s for s, _ in h.tfs if s > limit]
    # the republishing timer never stamps past pose_hold_s; the one TF that announces a new pose
    # right after its registration (stamped then) is late only when the registration itself
    # took about pose_hold_s (a crowded machine): allow that one, nothing more
    slow = (registered["header_ns"] - stamp) * 1e-9 > HOLD_S - 0.5
    assert len(late) <= (1 if slow else 0), ("TF republished after pose_hold_s", late, registered)
    wait_until(lambda: h.valid() is False, 30, what="pose_valid false once the pose is stale")


def test_node_survives_bad_input_and_stops_on_ctrl_c(harness):
    h = harness
    h.until_status(
        lambda: h.publish_image(0, tensor_to_image(np.full((64, 64), 1000.0), encoding="mono16"), h.now_ns()),
        "input_rejected",
        "constant",
    )
    assert h.proc.alive(), h.proc.tail()
    assert h.proc.interrupt() == 0, h.proc.tail()
