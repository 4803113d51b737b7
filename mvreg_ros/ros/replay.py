"""Replay a bag to a running node over DDS and score its TF against the bag's ground truth.

:class:`GroundTruthEvaluator` (no DDS: feed it TF messages) compares every anatomy transform
the node publishes at a ground-truth stamp with the truth (mTRE over CT landmarks) and times it
from the publication of the set's last image. :func:`replay` plays a bag's messages with rclpy
at their recorded relative timing (``rate`` times faster), publishes ``/clock`` with the
recorded time (1 ns back where it would equal an image stamp), and feeds the node's ``/tf``
to the evaluator, and the node's ``~/status`` counters (its dropped inputs) too. See docs/bag.md.

Beyond the registrations the evaluator scores every anatomy TF it sees (republished copies
included) against the truth in effect at its stamp, counts TFs stamped with a bad input's stamp
(``tf_from_rejected_inputs``: must be 0) and, where the truth changes (the anatomy moved), how
long the node took to publish a correct pose again. :func:`write_plots` draws the error over
time and the latency histogram.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.evaluation import stats
from mvreg_ros.core.evaluation.metrics import mtre_mm
from mvreg_ros.ros.bag_io import (
    CAMERA_INFO_TYPE,
    IMAGE_TYPE,
    JOINT_STATE_TYPE,
    BagMessage,
    corrupt_inputs,
    deserialize,
    ground_truth,
    message_class,
)
from mvreg_ros.ros.conversions import T_from_transform, ns_to_stamp, stamp_to_ns

SUCCESS_MM = 2.0
STATUS_TOPIC = "/register_node/status"
STATUS_COUNTERS = ("images", "inputs_rejected", "sets_dropped_busy", "registrations_rejected", "motions_detected")
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
        corrupt: dict[int, str] | None = None,
    ):
        if not truth:
            raise ValueError("no ground-truth poses")
        self.truth = truth
        self.corrupt = dict(corrupt or {})  # stamp -> kind of each bad input the bag holds
        self._stamps = sorted(truth)
        self.changes = [
            b for a, b in zip(self._stamps, self._stamps[1:]) if not torch.allclose(truth[a], truth[b], atol=1e-6)
        ]  # the first stamp of each new truth (the anatomy moved)
        self.tfs: list[tuple[int, float | None, float]] = []  # every TF: (stamp, error vs the truth in effect, t)
        self.status: dict[str, int] = {}  # the node's status counters (their largest values)
        self.landmarks_ct = torch.as_tensor(landmarks_ct, dtype=torch.float64)
        self.parent, self.child = parent.lstrip("/"), child.lstrip("/")
        self.success_mm = success_mm
        self.published: dict[int, float] = {}  # image stamp -> monotonic time its last image went out
        self.registrations: list[Registration] = []
        self.tf_count = 0

    def image_published(self, stamp_ns: int, t: float) -> None:
        self.published[stamp_ns] = max(t, self.published.get(stamp_ns, t))

    def truth_at(self, stamp_ns: int) -> Tensor | None:
        """The truth in effect at ``stamp_ns``: that of the newest ground-truth stamp at or before it."""
        i = bisect.bisect_right(self._stamps, stamp_ns)
        return self.truth[self._stamps[i - 1]] if i else None

    def on_status(self, values: dict[str, str]) -> None:
        """The key/values of one of the node's ``~/status`` messages (its counters only grow)."""
        for key in STATUS_COUNTERS:
            try:
                self.status[key] = max(self.status.get(key, 0), int(values[key]))
            except (KeyError, ValueError):
                continue

    def on_tf(self, msg, t: float) -> None:
        """A ``tf2_msgs/TFMessage`` received at monotonic time ``t``."""
        for tf in msg.transforms:
            if tf.header.frame_id.lstrip("/") != self.parent or tf.child_frame_id.lstrip("/") != self.child:
                continue
            self.tf_count += 1
            stamp = stamp_to_ns(tf.header.stamp)
            T = T_from_transform(tf.transform)
            truth = self.truth_at(stamp)
            self.tfs.append((stamp, None if truth is None else mtre_mm(T, truth, self.landmarks_ct), t))
            if stamp not in self.truth or any(r.stamp_ns == stamp for r in self.registrations):
                continue
            error = mtre_mm(T, self.truth[stamp], self.landmarks_ct)
            sent = self.published.get(stamp)
            self.registrations.append(Registration(stamp, error, None if sent is None else t - sent))

    def summary(self) -> dict:
        errors = sorted(r.mtre_mm for r in self.registrations)
        latencies = [r.latency_s for r in self.registrations if r.latency_s is not None]
        n = len(errors)
        dropped = None
        if "inputs_rejected" in self.status or "sets_dropped_busy" in self.status:
            dropped = self.status.get("inputs_rejected", 0) + self.status.get("sets_dropped_busy", 0)
        out = {
            "ground_truth_stamps": len(self.truth),
            "n": n,
            "tf_messages": self.tf_count,
            "success_mm": self.success_mm,
            "mtre_mean_mm": None,
            "mtre_median_mm": None,
            "mtre_p95_mm": None,
            "success_rate": None,
            "latency_median_s": stats.median(latencies),
            "latency_max_s": max(latencies) if latencies else None,
            "rejected_inputs": len(self.corrupt),
            "tf_from_rejected_inputs": sum(s in self.corrupt for s, _, _ in self.tfs),
            "tf_over_success_mm": sum(e is not None and e > self.success_mm for _, e, _ in self.tfs),
            "dropped_inputs": dropped,
            **{f"node_{k}": v for k, v in sorted(self.status.items())},
            "truth_changes": len(self.changes),
            "recoveries": self.recoveries(),
            "recovery_s": None,
        }
        done = [r["recovery_s"] for r in out["recoveries"]]
        if done and all(v is not None for v in done):
            out["recovery_s"] = max(done)
        if n:
            p95 = stats.percentile(errors, 95)
            out.update(
                mtre_mean_mm=stats.summary(errors)["mean"],
                mtre_median_mm=stats.median(errors),
                mtre_p95_mm=p95,
                success_rate=sum(e <= self.success_mm for e in errors) / n,
            )
        return out

    def recoveries(self) -> list[dict]:
        """Per truth change: when the node published a correct pose again. ``recovery_s``: from
        the first image of the new truth to the stamp of the first registration within
        ``success_mm`` of it (None: none came); ``recovery_latency_s``: from the player's
        publication of that first image to the arrival of that TF (wall clock); ``images``: image
        stamps with a truth from the change up to that registration; ``wrong_tfs``: TFs stamped at
        or after the change, before the recovery, more than ``success_mm`` from the new truth."""
        out = []
        for i, change in enumerate(self.changes):
            end = self.changes[i + 1] if i + 1 < len(self.changes) else None
            good = sorted(
                (r for r in self.registrations if r.stamp_ns >= change and (end is None or r.stamp_ns < end)),
                key=lambda r: r.stamp_ns,
            )
            good = [r for r in good if r.mtre_mm <= self.success_mm]
            first = good[0] if good else None
            sent = self.published.get(change)
            arrival = None
            if first is not None:
                arrival = next(t for s, e, t in self.tfs if s == first.stamp_ns)
            stop = first.stamp_ns if first is not None else (end if end is not None else float("inf"))
            out.append(
                {
                    "change_stamp_ns": change,
                    "recovery_s": None if first is None else (first.stamp_ns - change) * 1e-9,
                    "recovery_latency_s": None if first is None or sent is None else arrival - sent,
                    "images": None if first is None else sum(change <= s <= first.stamp_ns for s in self._stamps),
                    "wrong_tfs": sum(
                        change <= s < stop and e is not None and e > self.success_mm for s, e, _ in self.tfs
                    ),
                }
            )
        return out


def evaluator_for_bag(messages: list[BagMessage], landmarks_ct: Tensor, **kwargs) -> GroundTruthEvaluator:
    gt = ground_truth(messages)
    return GroundTruthEvaluator(
        gt["poses"], landmarks_ct, parent=gt["parent"], child=gt["child"], corrupt=corrupt_inputs(messages), **kwargs
    )


def write_plots(evaluator: GroundTruthEvaluator, stem: str | Path) -> list[Path]:
    """``<stem>_error.png`` (every TF's error against the truth in effect over the stamp time, the
    registrations marked, the truth's changes and the bad inputs drawn) and ``<stem>_latency.png``
    (histogram of the registrations' latencies). matplotlib with the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = Path(stem)
    t0 = min(evaluator.truth)
    paths = [stem.with_name(stem.name + "_error.png"), stem.with_name(stem.name + "_latency.png")]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    copies = [((s - t0) * 1e-9, e) for s, e, _ in evaluator.tfs if e is not None]
    if copies:
        ax.plot(*zip(*copies), ".", ms=3, color="0.6", label="every TF (republished copies included)")
    regs = [((r.stamp_ns - t0) * 1e-9, r.mtre_mm) for r in evaluator.registrations]
    if regs:
        ax.plot(*zip(*regs), "o", color="tab:blue", label="registrations (TF at an image stamp)")
    for i, c in enumerate(evaluator.changes):
        ax.axvline((c - t0) * 1e-9, color="tab:red", ls="--", label="truth changes (anatomy moved)" if i == 0 else None)
    for i, s in enumerate(sorted(evaluator.corrupt)):
        ax.axvline((s - t0) * 1e-9, color="tab:orange", lw=0.8, alpha=0.6, label="bad inputs" if i == 0 else None)
    ax.axhline(evaluator.success_mm, color="k", ls=":", lw=1, label=f"{evaluator.success_mm:g} mm")
    ax.set_xlabel("stamp (s from the first ground-truth image)")
    ax.set_ylabel("mTRE against the truth in effect (mm)")
    worst = max([e for _, e in copies] + [r for _, r in regs] + [0.0])
    ax.set_ylim(0.0, max(2.5 * evaluator.success_mm, 1.15 * worst))
    ax.set_xlim(left=min([0.0, *((s - t0) * 1e-9 for s in evaluator.corrupt)]) - 0.2)  # (a bag without bad inputs too)
    ax.set_title("anatomy TF error over time")
    ax.legend(fontsize=8, loc="upper left", framealpha=0.8)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    latencies = [r.latency_s for r in evaluator.registrations if r.latency_s is not None]
    ax.hist(latencies, bins=max(5, min(40, len(latencies))), color="tab:blue")
    ax.set_xlabel("latency: last image published -> its TF received (s)")
    ax.set_ylabel("registrations")
    ax.set_title(f"registration latency (n = {len(latencies)})")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


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
    status_topic: str = STATUS_TOPIC,
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
            node.create_subscription(
                message_class("diagnostic_msgs/msg/DiagnosticArray"),
                status_topic,
                lambda msg: [evaluator.on_status({kv.key: kv.value for kv in s.values}) for s in msg.status],
                QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE),
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
            settle = time.monotonic() + 1.0  # the status that follows the last TF, and its copies
            while time.monotonic() < settle:
                executor.spin_once(timeout_sec=0.05)
        return evaluator
    finally:
        executor.remove_node(node)
        executor.shutdown()
        node.destroy_node()
