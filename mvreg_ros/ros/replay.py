"""Replay a bag to a running node over DDS and score its TF against the bag's ground truth.

:class:`GroundTruthEvaluator` (no DDS: feed it TF messages) compares every anatomy transform
the node publishes at a ground-truth stamp with the truth (mTRE over CT landmarks) and times it
from the publication of the set's last image. :func:`replay` plays a bag's messages with rclpy
at their recorded relative timing (``rate`` times faster), publishes ``/clock`` with the
recorded time (1 ns back where it would equal an image stamp), and feeds the node's ``/tf``
to the evaluator. See docs/bag.md.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.evaluation.metrics import mtre_mm
from mvreg_ros.ros.bag_io import (
    CAMERA_INFO_TYPE,
    IMAGE_TYPE,
    JOINT_STATE_TYPE,
    BagMessage,
    deserialize,
    ground_truth,
    message_class,
)
from mvreg_ros.ros.conversions import T_from_transform, ns_to_stamp, stamp_to_ns

SUCCESS_MM = 2.0
SENSOR_TYPES = (IMAGE_TYPE, CAMERA_INFO_TYPE, JOINT_STATE_TYPE)  # replay waits for the node to subscribe to these


@dataclasses.dataclass(frozen=True)
class Registration:
    stamp_ns: int
    mtre_mm: float
    latency_s: float | None  # None: the set's last image was not published by this player

    def as_dict(self) -> dict:
        return {"stamp_ns": self.stamp_ns, "mtre_mm": self.mtre_mm, "latency_s": self.latency_s}


class GroundTruthEvaluator:
    """Scores the node's ``parent -> child`` TF: the first transform at each ground-truth stamp
    (the registration; republished copies of the held pose carry other stamps and are counted only)."""

    def __init__(
        self,
        truth: dict[int, Float[Tensor, "4 4"]],
        landmarks_ct: Float[Tensor, "N 3"],
        *,
        parent: str,
        child: str,
        success_mm: float = SUCCESS_MM,
    ):
        if not truth:
            raise ValueError("no ground-truth poses")
        self.truth = truth
        self.landmarks_ct = torch.as_tensor(landmarks_ct, dtype=torch.float64)
        self.parent, self.child = parent.lstrip("/"), child.lstrip("/")
        self.success_mm = success_mm
        self.published: dict[int, float] = {}  # image stamp -> monotonic time its last image went out
        self.registrations: list[Registration] = []
        self.tf_count = 0

    def image_published(self, stamp_ns: int, t: float) -> None:
        self.published[stamp_ns] = max(t, self.published.get(stamp_ns, t))

    def on_tf(self, msg, t: float) -> None:
        """A ``tf2_msgs/TFMessage`` received at monotonic time ``t``."""
        for tf in msg.transforms:
            if tf.header.frame_id.lstrip("/") != self.parent or tf.child_frame_id.lstrip("/") != self.child:
                continue
            self.tf_count += 1
            stamp = stamp_to_ns(tf.header.stamp)
            if stamp not in self.truth or any(r.stamp_ns == stamp for r in self.registrations):
                continue
            error = mtre_mm(T_from_transform(tf.transform), self.truth[stamp], self.landmarks_ct)
            sent = self.published.get(stamp)
            self.registrations.append(Registration(stamp, error, None if sent is None else t - sent))

    def summary(self) -> dict:
        errors = sorted(r.mtre_mm for r in self.registrations)
        latencies = [r.latency_s for r in self.registrations if r.latency_s is not None]
        n = len(errors)
        out = {
            "ground_truth_stamps": len(self.truth),
            "n": n,
            "tf_messages": self.tf_count,
            "success_mm": self.success_mm,
            "mtre_mean_mm": None,
            "mtre_median_mm": None,
            "mtre_p95_mm": None,
            "success_rate": None,
            "latency_median_s": statistics.median(latencies) if latencies else None,
        }
        if n:
            p95 = float(torch.quantile(torch.tensor(errors, dtype=torch.float64), 0.95))
            out.update(
                mtre_mean_mm=statistics.fmean(errors),
                mtre_median_mm=statistics.median(errors),
                mtre_p95_mm=p95,
                success_rate=sum(e <= self.success_mm for e in errors) / n,
            )
        return out


def evaluator_for_bag(messages: list[BagMessage], landmarks_ct: Tensor, **kwargs) -> GroundTruthEvaluator:
    gt = ground_truth(messages)
    return GroundTruthEvaluator(gt["poses"], landmarks_ct, parent=gt["parent"], child=gt["child"], **kwargs)


def replay(
    messages: list[BagMessage],
    evaluator: GroundTruthEvaluator | None = None,
    *,
    context=None,
    rate: float = 1.0,
    clock: bool = True,
    match_timeout_s: float = 30.0,
    wait_s: float = 30.0,
    exclude_topics: tuple[str, ...] = ("/tf",),
    node_name: str = "mvreg_bag_player",
    log=None,
) -> GroundTruthEvaluator | None:
    """Publish ``messages`` (log-time order) at their recorded relative timing divided by ``rate``.

    Topics in ``exclude_topics`` are not played (a recorded ``/tf`` would mix with the node's).
    Waits (up to ``match_timeout_s``) until every image, CameraInfo and JointState topic has a
    subscriber and, with an evaluator, until ``/tf`` has a publisher; then plays, then waits up to
    ``wait_s`` for the TF at the last ground-truth stamp. ``context``: an initialised rclpy
    context (None: the default one). TimeoutError when nothing subscribes."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from rosgraph_msgs.msg import Clock

    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    messages = [m for m in messages if m.topic not in exclude_topics]
    if not messages:
        raise ValueError("the bag holds no messages to play")
    log = log or (lambda text: None)
    node = rclpy.create_node(node_name, context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    try:
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)  # matches best-effort readers too
        pubs, types = {}, {}
        for m in messages:
            types[m.topic] = m.msgtype
            if m.topic not in pubs:
                pubs[m.topic] = node.create_publisher(message_class(m.msgtype), m.topic, qos)
        clock_pub = node.create_publisher(Clock, "/clock", QoSProfile(depth=10)) if clock else None
        if evaluator is not None:
            tf_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
            node.create_subscription(
                message_class("tf2_msgs/msg/TFMessage"),
                "/tf",
                lambda msg: evaluator.on_tf(msg, time.monotonic()),
                tf_qos,
            )

        def unmatched() -> list[str]:
            topics = [t for t, p in pubs.items() if types[t] in SENSOR_TYPES and p.get_subscription_count() == 0]
            if evaluator is not None and node.count_publishers("/tf") == 0:
                topics.append("/tf (no publisher)")
            return topics

        deadline = time.monotonic() + match_timeout_s
        while unmatched():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no subscriber matched within {match_timeout_s:g} s on: {unmatched()}")
            executor.spin_once(timeout_sec=0.05)
        log(f"matched; playing {len(messages)} messages at rate {rate:g}")

        # /clock steps 1 ns back where it would equal an image stamp, so that a TF the node
        # republishes at the current (sim) time never carries one and passes for its registration
        header_stamps = {
            i: stamp_to_ns(deserialize(m).header.stamp) for i, m in enumerate(messages) if m.msgtype == IMAGE_TYPE
        }
        image_stamps = set(header_stamps.values())
        t_first = messages[0].log_time_ns
        t0 = time.monotonic()
        for i, m in enumerate(messages):
            target = t0 + (m.log_time_ns - t_first) * 1e-9 / rate
            while (remaining := target - time.monotonic()) > 0:
                executor.spin_once(timeout_sec=min(remaining, 0.01))
            if clock_pub is not None:
                clock_pub.publish(Clock(clock=ns_to_stamp(m.log_time_ns - (m.log_time_ns in image_stamps))))
            pubs[m.topic].publish(m.data)  # the stored CDR bytes, as they were recorded
            if evaluator is not None and m.msgtype == IMAGE_TYPE:
                evaluator.image_published(header_stamps[i], time.monotonic())
        log(f"played in {time.monotonic() - t0:.1f} s")
        if evaluator is not None:
            last = max(evaluator.truth)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and not any(r.stamp_ns >= last for r in evaluator.registrations):
                executor.spin_once(timeout_sec=0.05)
        return evaluator
    finally:
        executor.remove_node(node)
        executor.shutdown()
        node.destroy_node()
