"""The node against bad input, over real DDS: each bad input gives a status message with its
reason and no TF, the node keeps running and registers the next good set; a failed update
never replaces a good pose and a stale pose stops being published.

One node process (biplane config, synchronized mode) serves the whole module; this process
plays the C-arm (images, CameraInfo, joint states) and the listeners. The tests run in order.
"""

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

from ros_harness import RosProcess, node_args, wait_until  # noqa: E402
from mvreg_ros.ros.conversions import (K_to_camera_info, T_from_pose, T_from_transform, ns_to_stamp,  # noqa: E402
                                       stamp_to_ns, tensor_to_image)
from ros_scenario import CONFIG, make_scenario, mtre_mm, write_params  # noqa: E402

HOLD_S = 4.0
JOINTS = {"frontal_orbital": 0.1, "frontal_angular": 0.0, "lateral_orbital": 0.0, "lateral_angular": -0.05,
          "lateral_longitudinal": 0.0}


class Harness:
    """This process's side: publishers of a biplane C-arm, listeners of status, TF, pose, overlay."""

    def __init__(self, ctx, scenario):
        self.cfg = cfg = scenario.cfg
        self.scenario = scenario
        self.node = rclpy.create_node("bad_input_harness", context=ctx)
        n = self.node
        self.image_pubs = [n.create_publisher(Image, t, qos_profile_sensor_data) for t in cfg.image_topics]
        self.info_pubs = [n.create_publisher(CameraInfo, t, qos_profile_sensor_data) for t in cfg.camera_info_topics]
        self.joint_pub = n.create_publisher(JointState, cfg.joint_states_topic, 10)
        self.lock = threading.Lock()
        self.statuses, self.tfs, self.poses, self.overlays = [], [], [], []
        self.joint_count = 0
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
        self.executor.shutdown()
        self.thread.join(5)
        self.node.destroy_node()

    # listeners
    def _on_status(self, msg):
        for s in msg.status:
            with self.lock:
                self.statuses.append(dict({kv.key: kv.value for kv in s.values}, message=s.message, level=s.level))

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
        return stamp_ns + (len(images) - 1) * 3_000_000

    # waiting
    def count(self, what: str) -> int:
        with self.lock:
            return len(getattr(self, what))

    def statuses_since(self, start: int, event: str, contains: str = "") -> list[dict]:
        with self.lock:
            return [s for s in self.statuses[start:] if s.get("event") == event and contains in s.get("reason", "")]

    def until_status(self, action, event: str, contains: str = "", *, timeout: float = 20.0, period: float = 0.5):
        """Do ``action()`` (again every ``period`` s, for races between topics) until a status with
        ``event`` and ``contains`` in its reason arrives; returns that status."""
        start = self.count("statuses")
        last = [-1e9]

        def check():
            if not NODE["proc"].alive():
                raise AssertionError(f"the node died:\n{NODE['proc'].tail()}")
            found = self.statuses_since(start, event, contains)
            if found:
                return found[0]
            if time.monotonic() - last[0] >= period:
                last[0] = time.monotonic()
                action()
            return None

        return wait_until(check, timeout, what=f"status {event!r} with {contains!r}; got "
                                               f"{[(s.get('event'), s.get('reason')) for s in self.statuses[start:]]}")


NODE: dict = {}


@pytest.fixture(scope="module")
def harness(ros_env, ros_context, tmp_path_factory):
    d = tmp_path_factory.mktemp("node_inputs")
    scenario = make_scenario("biplane.yaml", seed=11, extra={"pose_hold_s": HOLD_S, "publish_overlay": True,
                                                               "tf_republish_hz": 10.0})
    overrides = write_params(d / "overrides.yaml", scenario.overrides)
    proc = RosProcess([sys.executable, *node_args(CONFIG / "biplane.yaml", overrides)], ros_env, d / "node.log")
    NODE["proc"] = proc
    h = Harness(ros_context, scenario)
    try:
        wait_until(lambda: (all(p.get_subscription_count() > 0 for p in h.image_pubs + h.info_pubs + [h.joint_pub])
                            and h.status_sub.get_publisher_count() > 0) or (not proc.alive() and "dead"),
                   60, what="the node's subscriptions and status publisher")
        assert proc.alive(), proc.tail()
        yield h
    finally:
        h.close()
        proc.kill()


def no_tf_at(h: Harness, stamp_ns: int) -> bool:
    with h.lock:
        return all(s != stamp_ns for s, _ in h.tfs)


def test_missing_camera_info(harness):
    h = harness
    st = h.until_status(lambda: [h.publish_image(i, h.good(i), h.now_ns(), info=False) for i in range(2)],
                        "input_rejected", "no CameraInfo received")
    assert st["level"] == b"\x01" and st["state"] == "waiting"
    assert h.count("tfs") == 0


def test_missing_joint_states(harness):
    h = harness
    h.until_status(lambda: h.publish_set([h.good(0), h.good(1)], h.now_ns()), "input_rejected",
                   "no joint state received")
    assert h.count("tfs") == 0


def test_image_stamp_outside_joint_state_buffer(harness):
    h = harness
    h.streaming = True
    wait_until(lambda: h.joint_count > 5, 10, what="joint states")
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
    h.streaming = True
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
    stamp = [0]
    st = h.until_status(lambda: stamp.__setitem__(0, h.publish_set(noise_set(h), h.now_ns() - 50_000_000)),
                        "registration_rejected", timeout=60, period=30)
    # the engine's or a gate's reason: not converged, curvature, similarity or uncertainty
    assert st["reason"] and st["level"] == b"\x01", st
    assert st["init_source"] == "configured"
    assert h.count("tfs") == 0 and h.count("poses") == 0


def register_good_set(h: Harness, *, info=True) -> tuple[int, dict]:
    stamp = [0]
    st = h.until_status(lambda: stamp.__setitem__(0, h.publish_set([h.good(0), h.good(1)], h.now_ns() - 50_000_000,
                                                                   info=info)),
                        "registered", timeout=60, period=30)
    wait_until(lambda: not no_tf_at(h, stamp[0]), 10, what="the TF of the registered set")
    return stamp[0], st


def test_good_set_registers_after_bad_input(harness):
    h = harness
    stamp, st = register_good_set(h)
    with h.lock:
        T = [T for s, T in h.tfs if s == stamp][0]
    err = mtre_mm(T, h.scenario.truth)
    assert err < 2.0, err
    assert float(st["stamp"]) == pytest.approx(stamp * 1e-9, abs=1e-6)
    assert len(st["view_similarity"].split(",")) == 2 and st["init_source"] == "configured"
    assert float(st["uncertainty_mm"]) < 5.0
    # ~/pose: same pose in metres, the engine's covariance
    pose = wait_until(lambda: [p for p in h.poses if stamp_to_ns(p.header.stamp) == stamp], 10, what="~/pose")[0]
    assert pose.header.frame_id == "carm_base"
    assert float((T_from_pose(pose.pose.pose) - T).abs().max()) < 1e-6
    cov = np.asarray(pose.pose.covariance).reshape(6, 6)
    assert (np.diag(cov) > 0).all() and np.diag(cov)[:3].max() < 1e-4  # metres^2: under 10 mm sigma
    overlay = wait_until(lambda: h.overlays, 10, what="~/overlay")[-1]
    assert (overlay.encoding, overlay.height, overlay.width) == ("rgb8", 64, 128)
    h.accepted = (stamp, T)


def test_failed_update_keeps_the_good_pose(harness):
    h = harness
    good_stamp, T_good = h.accepted
    start = h.count("tfs")
    stamp = [0]
    h.until_status(lambda: stamp.__setitem__(0, h.publish_set(noise_set(h), h.now_ns() - 50_000_000)),
                   "registration_rejected", timeout=60, period=30)
    assert no_tf_at(h, stamp[0])
    wait_until(lambda: h.count("tfs") > start + 2, 5, what="republished TF")
    with h.lock:
        later = [T for _, T in h.tfs[start:]]
    assert all(float((T - T_good).abs().max()) < 1e-6 for T in later)
    # the next good set registers, tracking from the last accepted pose; its images come without
    # a CameraInfo of their own stamp (a latched CameraInfo): after camera_info_wait_s the latest is used
    stamp2, st = register_good_set(h, info=False)
    assert st["init_source"] == "last_accepted" and stamp2 > good_stamp
    h.accepted = (stamp2, [T for s, T in h.tfs if s == stamp2][0])


def test_stale_pose_is_not_republished(harness):
    h = harness
    stamp, _ = h.accepted
    st = wait_until(lambda: [s for s in h.statuses_since(0, "pose_stale")
                             if float(s["pose_stamp"]) == pytest.approx(stamp * 1e-9, abs=1e-6)],
                    HOLD_S + 20, what="pose_stale status of the last accepted pose")[-1]
    assert st["state"] == "stale"
    n = h.joint_count
    wait_until(lambda: h.joint_count > n + 15, 10, what="time to pass (joint states)")
    limit = stamp + int((HOLD_S + 0.2) * 1e9)
    with h.lock:
        assert all(s <= limit for s, _ in h.tfs), "TF republished after pose_hold_s"


def test_node_survived_and_stops_on_ctrl_c(harness):
    proc = NODE["proc"]
    assert proc.alive(), proc.tail()
    assert proc.interrupt() == 0, proc.tail()
