"""The node against bad input, over real DDS: each bad input gives a status message with its
reason and no TF, the node keeps running and registers the next good set; a failed update
never replaces a good pose and a stale pose stops being published.

A node process (biplane config, synchronized mode) and this process playing the C-arm (images,
CameraInfo, joint states) and the listeners. The bad-input tests share one node (start-up
loads the CT) that never holds a pose; before each test it is reset to a known state (alive,
no pose, joint states streaming, records cleared) and replaced by a fresh one if a test left
it dead or holding a pose. Tests that need a node that has received nothing, or that follow a
pose (register, keep it through a failed update, let it go stale), each get a node of their
own. No test relies on another having run or passed.
"""

import itertools
import sys
import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("tf2_msgs.msg")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from geometry_msgs.msg import PoseWithCovarianceStamped  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, JointState  # noqa: E402
from tf2_msgs.msg import TFMessage  # noqa: E402

from ros_harness import RosProcess, deadline, node_args, wait_until  # noqa: E402
from mvreg_ros.ros.conversions import (K_to_camera_info, T_from_pose, T_from_transform, ns_to_stamp,  # noqa: E402
                                       stamp_to_ns, tensor_to_image)
from ros_scenario import CONFIG, make_scenario, mtre_mm, write_params  # noqa: E402

HOLD_S = 4.0  # pose_hold_s of the stale-pose test; the other nodes hold a pose for LONG_HOLD_S
LONG_HOLD_S = 600.0
JOINTS = {"frontal_orbital": 0.1, "frontal_angular": 0.0, "lateral_orbital": 0.0, "lateral_angular": -0.05,
          "lateral_longitudinal": 0.0}


class Harness:
    """This process's side: publishers of a biplane C-arm, listeners of status, TF, pose, overlay."""

    _names = itertools.count()

    def __init__(self, ctx, scenario, proc: RosProcess):
        self.cfg = cfg = scenario.cfg
        self.scenario = scenario
        self.proc = proc
        self.node = rclpy.create_node(f"bad_input_harness_{next(self._names)}", context=ctx)
        n = self.node
        self.image_pubs = [n.create_publisher(Image, t, qos_profile_sensor_data) for t in cfg.image_topics]
        self.info_pubs = [n.create_publisher(CameraInfo, t, qos_profile_sensor_data) for t in cfg.camera_info_topics]
        self.joint_pub = n.create_publisher(JointState, cfg.joint_states_topic, 10)
        self.lock = threading.Lock()
        self.statuses, self.tfs, self.poses, self.overlays = [], [], [], []
        self.joint_count = 0
        self.set_stamps = []  # the stamp of each published set (its newest image)
        self.closed = False
        self.last_joint_ns = 0
        self.streaming = False
        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
        self.status_sub = n.create_subscription(DiagnosticArray, "/register_node/status", self._on_status, reliable)
        n.create_subscription(TFMessage, "/tf", self._on_tf, reliable)
        n.create_subscription(PoseWithCovarianceStamped, "/register_node/pose", self._on_pose, reliable)
        n.create_subscription(Image, "/register_node/overlay", self._on_overlay, reliable)
        n.create_timer(0.02, self._stream_joints)
        self.executor = SingleThreadedExecutor(context=ctx)
        self.executor.add_node(n)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self):
        """Stop listening and kill the node process (idempotent)."""
        if self in LIVE:
            LIVE.remove(self)
        if self.closed:
            return
        self.closed = True
        self.streaming = False
        self.executor.shutdown()
        self.thread.join(deadline(30))
        self.node.destroy_node()
        self.proc.kill()

    def wait_matched(self):
        """Until the node (its own process) subscribes to every input and publishes its status."""
        proc = self.proc
        wait_until(lambda: (all(p.get_subscription_count() > 0 for p in self.image_pubs + self.info_pubs
                                + [self.joint_pub]) and self.status_sub.get_publisher_count() > 0)
                   or (not proc.alive() and "dead"),
                   120, what="the node's subscriptions and status publisher")
        assert proc.alive(), proc.tail()

    def clear(self):
        with self.lock:
            for records in (self.statuses, self.tfs, self.poses, self.overlays):
                records.clear()

    # listeners
    def _on_status(self, msg):
        for s in msg.status:
            with self.lock:
                self.statuses.append(dict({kv.key: kv.value for kv in s.values}, message=s.message, level=s.level,
                                          header_ns=stamp_to_ns(msg.header.stamp)))

    def _on_tf(self, msg):
        with self.lock:
            self.tfs += [(stamp_to_ns(t.header.stamp), T_from_transform(t.transform)) for t in msg.transforms
                         if t.header.frame_id == "carm_base" and t.child_frame_id == "anatomy"]

    def _on_pose(self, msg):
        with self.lock:
            self.poses.append(msg)

    def _on_overlay(self, msg):
        with self.lock:
            self.overlays.append(msg)

    # publishers
    def now_ns(self) -> int:
        return self.node.get_clock().now().nanoseconds

    def _stream_joints(self):
        if not self.streaming:
            return
        self.publish_joints(self.now_ns())

    def publish_joints(self, stamp_ns: int, joints: dict | None = None):
        js = JointState(name=list((joints or JOINTS).keys()), position=[float(v) for v in (joints or JOINTS).values()])
        js.header.stamp = ns_to_stamp(stamp_ns)
        self.joint_pub.publish(js)
        with self.lock:
            self.joint_count += 1
            self.last_joint_ns = max(self.last_joint_ns, stamp_ns)

    def publish_image(self, topic: int, image: Image, stamp_ns: int, *, info_size: tuple | None = None, info=True):
        image.header.stamp = ns_to_stamp(stamp_ns)
        if info:
            h, w = info_size or (image.height, image.width)
            self.info_pubs[topic].publish(K_to_camera_info(self.scenario.K, height=h, width=w, stamp=ns_to_stamp(stamp_ns)))
        self.image_pubs[topic].publish(image)

    def good(self, topic: int) -> Image:
        return tensor_to_image(self.scenario.image(topic, JOINTS, seed=topic), encoding="mono16")

    def publish_set(self, images: list[Image], stamp_ns: int, *, info=True):
        for i, img in enumerate(images):
            self.publish_image(i, img, stamp_ns + i * 3_000_000, info=info)  # the lateral pulse 3 ms later
        with self.lock:
            self.set_stamps.append(stamp_ns + (len(images) - 1) * 3_000_000)
        return self.set_stamps[-1]

    # waiting
    def count(self, what: str) -> int:
        with self.lock:
            return len(getattr(self, what))

    def statuses_since(self, start: int, event: str, contains: str = "") -> list[dict]:
        with self.lock:
            return [s for s in self.statuses[start:] if s.get("event") == event and contains in s.get("reason", "")]

    def until_status(self, action, event: str, contains: str = "", *, timeout: float = 30.0, period: float = 0.5):
        """Do ``action()`` (again every ``period`` s, for races between topics) until a status with
        ``event`` and ``contains`` in its reason arrives; returns that status. ``timeout`` is
        scaled by MVREG_TEST_TIMEOUT_SCALE (wait_until)."""
        start = self.count("statuses")
        last = [-1e9]

        def check():
            if not self.proc.alive():
                raise AssertionError(f"the node died:\n{self.proc.tail()}")
            found = self.statuses_since(start, event, contains)
            if found:
                return found[0]
            if time.monotonic() - last[0] >= period:
                last[0] = time.monotonic()
                action()
            return None

        return wait_until(check, timeout, what=f"status {event!r} with {contains!r}; got "
                                               f"{[(s.get('event'), s.get('reason')) for s in self.statuses[start:]]}")


# The node processes of this module alive now: at most one, since all nodes use the same topics
# and TF frames on this session's domain (a shared node holding a pose would republish it into
# another test's /tf, and would register that test's images too).
LIVE: list[Harness] = []


def start_node(ctx, env, directory, *, hold_s: float = LONG_HOLD_S) -> Harness:
    """A node process and this process's side of it, matched over DDS; any other node of this
    module is stopped first (a stopped shared node is started again by its next reset)."""
    for other in list(LIVE):
        other.close()
    scenario = make_scenario("biplane.yaml", seed=11, extra={"pose_hold_s": hold_s, "publish_overlay": True,
                                                               "tf_republish_hz": 10.0})
    directory.mkdir(parents=True, exist_ok=True)
    overrides = write_params(directory / "overrides.yaml", scenario.overrides)
    proc = RosProcess([sys.executable, *node_args(CONFIG / "biplane.yaml", overrides)], env, directory / "node.log")
    h = Harness(ctx, scenario, proc)
    LIVE.append(h)
    try:
        h.wait_matched()
    except BaseException:
        h.close()
        raise
    return h


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


def stamp_ns_of(h: Harness, status: dict) -> int:
    """The stamp (ns) of the published set a status is about: its ``stamp`` value is seconds
    printed from a float, exact to about a microsecond only."""
    s = float(status["stamp"])
    with h.lock:
        near = [t for t in h.set_stamps if abs(t * 1e-9 - s) < 1e-5]
    assert len(near) == 1, (status["stamp"], h.set_stamps)
    return near[0]


def no_tf_at(h: Harness, stamp_ns: int) -> bool:
    with h.lock:
        return all(s != stamp_ns for s, _ in h.tfs)


def test_missing_camera_info(fresh):
    h = fresh()
    st = h.until_status(lambda: [h.publish_image(i, h.good(i), h.now_ns(), info=False) for i in range(2)],
                        "input_rejected", "no CameraInfo received")
    assert st["level"] == b"\x01" and st["state"] == "waiting"
    assert h.count("tfs") == 0


def test_missing_joint_states(fresh):
    h = fresh()
    h.until_status(lambda: h.publish_set([h.good(0), h.good(1)], h.now_ns()), "input_rejected",
                   "no joint state received")
    assert h.count("tfs") == 0


def test_image_stamp_outside_joint_state_buffer(harness):
    h = harness
    h.until_status(lambda: h.publish_image(0, h.good(0), h.now_ns() - 20_000_000_000), "input_rejected",
                   "before the joint-state buffer")
    assert h.count("tfs") == 0


@pytest.mark.parametrize("case, contains", [
    ("rgb8", "unsupported image encoding"),
    ("size", "does not match CameraInfo"),
    ("nan", "NaN"),
    ("constant", "constant"),
])
def test_bad_images(harness, case, contains):
    h = harness
    good = h.good(0)
    if case == "rgb8":
        img = Image(height=64, width=64, encoding="rgb8", step=192)
        img.data = np.random.default_rng(0).integers(0, 255, 64 * 64 * 3, dtype=np.uint8).tobytes()
        action = lambda: h.publish_image(0, img, h.now_ns())  # noqa: E731
    elif case == "size":
        action = lambda: h.publish_image(0, good, h.now_ns(), info_size=(128, 128))  # noqa: E731
    elif case == "nan":
        a = np.random.default_rng(1).uniform(100, 1000, (64, 64)).astype(np.float32)
        a[10, 10] = np.nan
        img = tensor_to_image(a, encoding="32FC1")
        action = lambda: h.publish_image(0, img, h.now_ns())  # noqa: E731
    else:
        img = tensor_to_image(np.full((64, 64), 1000.0), encoding="mono16")
        action = lambda: h.publish_image(0, img, h.now_ns())  # noqa: E731
    h.until_status(action, "input_rejected", contains)
    assert h.count("tfs") == 0


def test_stale_joint_states(harness):
    h = harness
    h.streaming = False
    # an exposure half a second after the last joint state (tolerance 0.1 s)
    h.until_status(lambda: h.publish_image(0, h.good(0), h.last_joint_ns + 500_000_000), "input_rejected",
                   "stale joint states")
    assert h.count("tfs") == 0


def test_out_of_order_joint_states(harness):
    h = harness
    h.until_status(lambda: h.publish_joints(h.last_joint_ns - 1_000_000_000), "input_rejected",
                   "out-of-order joint state")
    assert h.count("tfs") == 0


def test_out_of_order_images(harness):
    h = harness

    def action():
        t = h.now_ns() - 50_000_000
        h.publish_image(0, h.good(0), t)
        h.publish_image(0, h.good(0), t - 30_000_000)

    h.until_status(action, "input_rejected", "out-of-order image")
    assert h.count("tfs") == 0


def noise_set(h: Harness) -> list[Image]:
    rng = np.random.default_rng(7)
    return [tensor_to_image(rng.uniform(1000, 60000, (64, 64)), encoding="mono16") for _ in range(2)]


def test_registration_failing_a_gate_publishes_no_tf(harness):
    h = harness
    st = h.until_status(lambda: h.publish_set(noise_set(h), h.now_ns() - 50_000_000),
                        "registration_rejected", timeout=60, period=30)
    # the engine's or a gate's reason: not converged, curvature, similarity or uncertainty
    assert st["reason"] and st["level"] == b"\x01", st
    assert st["init_source"] == "configured"
    assert h.count("tfs") == 0 and h.count("poses") == 0


def register_good_set(h: Harness, *, info=True) -> tuple[int, dict]:
    """Publish a good set (again every 30 s) until one registers; its stamp and status."""
    if not h.streaming:
        h.streaming = True
        n = h.joint_count
        wait_until(lambda: h.joint_count > n + 5, 30, what="joint states streaming")
    st = h.until_status(lambda: h.publish_set([h.good(0), h.good(1)], h.now_ns() - 50_000_000, info=info),
                        "registered", timeout=90, period=30)
    stamp = stamp_ns_of(h, st)
    wait_until(lambda: not no_tf_at(h, stamp), 30, what="the TF of the registered set")
    return stamp, st


def tf_at(h: Harness, stamp_ns: int):
    with h.lock:
        return [T for s, T in h.tfs if s == stamp_ns][0]


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


def test_failed_update_keeps_the_good_pose(fresh):
    h = fresh()  # holds a pose for LONG_HOLD_S: however slow the machine, it is not stale here
    good_stamp, _ = register_good_set(h)
    T_good = tf_at(h, good_stamp)
    start = h.count("tfs")
    st = h.until_status(lambda: h.publish_set(noise_set(h), h.now_ns() - 50_000_000),
                        "registration_rejected", timeout=90, period=30)
    assert no_tf_at(h, stamp_ns_of(h, st))
    wait_until(lambda: h.count("tfs") > start + 2, 30, what="republished TF")
    with h.lock:
        later = [T for _, T in h.tfs[start:]]
    assert all(float((T - T_good).abs().max()) < 1e-6 for T in later)
    # the next good set registers, tracking from the last accepted pose; its images come without
    # a CameraInfo of their own stamp (a latched CameraInfo): after camera_info_wait_s the latest is used
    stamp2, st = register_good_set(h, info=False)
    assert st["init_source"] == "last_accepted" and stamp2 > good_stamp


def test_stale_pose_is_not_republished(fresh):
    h = fresh(hold_s=HOLD_S)
    stamp, registered = register_good_set(h)
    st = wait_until(lambda: [s for s in h.statuses_since(0, "pose_stale")
                             if float(s["pose_stamp"]) == pytest.approx(stamp * 1e-9, abs=1e-6)],
                    HOLD_S + 30, what="pose_stale status of the last accepted pose")[-1]
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


def test_node_survives_bad_input_and_stops_on_ctrl_c(harness):
    h = harness
    h.until_status(lambda: h.publish_image(0, tensor_to_image(np.full((64, 64), 1000.0), encoding="mono16"),
                                           h.now_ns()), "input_rejected", "constant")
    assert h.proc.alive(), h.proc.tail()
    assert h.proc.interrupt() == 0, h.proc.tail()
