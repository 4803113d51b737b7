"""The node process and this process's side of it over real DDS, for the tests that drive one
node (test_node_inputs.py, test_lifecycle.py): publishers of a biplane C-arm (images,
CameraInfo, joint states), listeners of ~/status, /tf, ~/pose, ~/pose_valid and ~/overlay,
clients of the node's services and of its lifecycle. Deadlines scale with
MVREG_TEST_TIMEOUT_SCALE (ros_harness.wait_until)."""

import itertools
import sys
import threading
import time

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseWithCovarianceStamped
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from ros_harness import RosProcess, deadline, node_args, wait_until
from ros_scenario import CONFIG, make_scenario, write_params
from sensor_msgs.msg import CameraInfo, Image, JointState
from std_msgs.msg import Bool
from std_srvs.srv import Trigger
from tf2_msgs.msg import TFMessage
from visualization_msgs.msg import Marker

from mvreg_ros.ros.conversions import (
    K_to_camera_info,
    T_from_transform,
    ns_to_stamp,
    stamp_to_ns,
    tensor_to_image,
)

LONG_HOLD_S = 600.0  # pose_hold_s of the nodes that must not let a pose go stale during a test
JOINTS = {
    "frontal_orbital": 0.1,
    "frontal_angular": 0.0,
    "lateral_orbital": 0.0,
    "lateral_angular": -0.05,
    "lateral_longitudinal": 0.0,
}
TRANSITIONS = {
    "configure": Transition.TRANSITION_CONFIGURE,
    "activate": Transition.TRANSITION_ACTIVATE,
    "deactivate": Transition.TRANSITION_DEACTIVATE,
    "cleanup": Transition.TRANSITION_CLEANUP,
    "shutdown": Transition.TRANSITION_ACTIVE_SHUTDOWN,  # from active
}


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
        self.tf_arrivals: list[tuple[int, int]] = []  # (TF stamp, this node's clock when it arrived), ns
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
        self.pose_valid = []  # every ~/pose_valid value received (latched: the current one first)
        latched = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        n.create_subscription(Bool, "/register_node/pose_valid", self._on_pose_valid, latched)
        self.markers = []  # ~/anatomy_marker (transient local: published once, on activate)
        self.marker_sub = n.create_subscription(
            Marker, "/register_node/anatomy_marker", lambda m: self._append("markers", m), latched
        )
        self.initial_pose_pub = n.create_publisher(PoseWithCovarianceStamped, "/register_node/initial_pose", 10)
        self.clients = {
            "reset": n.create_client(Trigger, "/register_node/reset"),
            "register_now": n.create_client(Trigger, "/register_node/register_now"),
            "change_state": n.create_client(ChangeState, "/register_node/change_state"),
            "get_state": n.create_client(GetState, "/register_node/get_state"),
        }
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
        wait_until(
            lambda: (
                (
                    all(p.get_subscription_count() > 0 for p in self.image_pubs + self.info_pubs + [self.joint_pub])
                    and self.status_sub.get_publisher_count() > 0
                )
                or (not proc.alive() and "dead")
            ),
            120,
            what="the node's subscriptions and status publisher",
        )
        assert proc.alive(), proc.tail()

    def clear(self):
        with self.lock:
            for records in (self.statuses, self.tfs, self.poses, self.overlays):
                records.clear()  # not pose_valid: the last value is the node's current one

    # listeners
    def _on_status(self, msg):
        for s in msg.status:
            with self.lock:
                self.statuses.append(
                    dict(
                        {kv.key: kv.value for kv in s.values},
                        message=s.message,
                        level=s.level,
                        header_ns=stamp_to_ns(msg.header.stamp),
                    )
                )

    def _on_tf(self, msg):
        arrived = self.node.get_clock().now().nanoseconds
        with self.lock:
            mine = [t for t in msg.transforms if t.header.frame_id == "carm_base" and t.child_frame_id == "anatomy"]
            self.tfs += [(stamp_to_ns(t.header.stamp), T_from_transform(t.transform)) for t in mine]
            self.tf_arrivals += [(stamp_to_ns(t.header.stamp), arrived) for t in mine]

    def _on_pose(self, msg):
        with self.lock:
            self.poses.append(msg)

    def _append(self, name: str, msg):
        with self.lock:
            getattr(self, name).append(msg)

    def _on_pose_valid(self, msg):
        with self.lock:
            self.pose_valid.append(msg.data)

    def valid(self) -> bool | None:
        """The last ~/pose_valid value received (None: none yet)."""
        with self.lock:
            return self.pose_valid[-1] if self.pose_valid else None

    # services and lifecycle
    def call(self, name: str, request=None, *, timeout: float = 60.0):
        """Call one of ``self.clients`` (waiting for the service first); the response."""
        client = self.clients[name]
        wait_until(lambda: client.service_is_ready(), 60, what=f"service {client.srv_name}")
        future = client.call_async(request if request is not None else client.srv_type.Request())
        return wait_until(lambda: future.result() if future.done() else None, timeout, what=f"{name} response")

    def trigger(self, name: str, *, timeout: float = 60.0):
        return self.call(name, Trigger.Request(), timeout=timeout)

    def transition(self, name: str, *, timeout: float = 120.0) -> bool:
        req = ChangeState.Request()
        req.transition.id = TRANSITIONS[name]
        return self.call("change_state", req, timeout=timeout).success

    def lifecycle_state(self) -> str:
        return self.call("get_state", GetState.Request()).current_state.label

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
            self.info_pubs[topic].publish(
                K_to_camera_info(self.scenario.K, height=h, width=w, stamp=ns_to_stamp(stamp_ns))
            )
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

        return wait_until(
            check,
            timeout,
            what=f"status {event!r} with {contains!r}; got "
            f"{[(s.get('event'), s.get('reason')) for s in self.statuses[start:]]}",
        )


# The node processes alive now: at most one, since all nodes use the same topics
# and TF frames on this session's domain (a shared node holding a pose would republish it into
# another test's /tf, and would register that test's images too).
LIVE: list[Harness] = []


def start_node(ctx, env, directory, *, hold_s: float = LONG_HOLD_S, extra: dict | None = None, wait=True) -> Harness:
    """A node process and this process's side of it, matched over DDS; any other node of this
    module is stopped first (a stopped shared node is started again by its next reset)."""
    for other in list(LIVE):
        other.close()
    scenario = make_scenario(
        "biplane.yaml",
        seed=11,
        extra={"pose_hold_s": hold_s, "publish_overlay": True, "tf_republish_hz": 10.0, **(extra or {})},
    )
    directory.mkdir(parents=True, exist_ok=True)
    overrides = write_params(directory / "overrides.yaml", scenario.overrides)
    proc = RosProcess([sys.executable, *node_args(CONFIG / "biplane.yaml", overrides)], env, directory / "node.log")
    h = Harness(ctx, scenario, proc)
    LIVE.append(h)
    if wait:  # until it subscribes to every input: it is active
        try:
            h.wait_matched()
        except BaseException:
            h.close()
            raise
    return h


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


def noise_set(h: Harness) -> list[Image]:
    rng = np.random.default_rng(7)
    return [tensor_to_image(rng.uniform(1000, 60000, (64, 64)), encoding="mono16") for _ in range(2)]


def register_good_set(h: Harness, *, info=True) -> tuple[int, dict]:
    """Publish a good set (again every 30 s) until one registers; its stamp and status."""
    if not h.streaming:
        h.streaming = True
        n = h.joint_count
        wait_until(lambda: h.joint_count > n + 5, 30, what="joint states streaming")
    st = h.until_status(
        lambda: h.publish_set([h.good(0), h.good(1)], h.now_ns() - 50_000_000, info=info),
        "registered",
        timeout=90,
        period=30,
    )
    stamp = stamp_ns_of(h, st)
    wait_until(lambda: not no_tf_at(h, stamp), 30, what="the TF of the registered set")
    return stamp, st


def tf_at(h: Harness, stamp_ns: int):
    with h.lock:
        return [T for s, T in h.tfs if s == stamp_ns][0]
