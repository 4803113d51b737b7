"""Overload over real DDS: a biplane C-arm publishing both image topics at 30 Hz (synchronized
mode) while each registration takes a second or more. The node (its own process) stays alive,
its input buffers stay bounded (newest wins: a waiting set is replaced, counted as
``sets_dropped_busy``), every TF it publishes is the true pose within 2 mm, and its resident
memory grows by less than 5 % from the first registration to the end. Also: ~/anatomy_marker
arrives after activate, to a subscriber that was there and to one that joins late (transient
local). Deadlines scale with MVREG_TEST_TIMEOUT_SCALE; the flood itself lasts OVERLOAD_S."""

import bisect
import os
import threading
import time

import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("tf2_msgs.msg")
pytest.importorskip("visualization_msgs.msg")

from node_harness import start_node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from ros_harness import wait_until
from ros_scenario import mtre_mm
from visualization_msgs.msg import Marker

from mvreg_ros.core.registration.refine import RefineConfig
from mvreg_ros.ros.soak import rss_kib

RATE_HZ = 30.0
OVERLOAD_S = float(os.environ.get("MVREG_OVERLOAD_S", "40"))
QUEUE = 10  # sync_queue_size of config/biplane.yaml
# MVREG_OVERLOAD_BUDGET=default: the engine's default refinement budget (two levels, 32 and 96 px)
# instead of the tests' quick one (a measurement, not CI; docs/node.md: its tracking updates still
# take well under a second); =slow: the default pyramid with 1024 samples per ray, so that every
# registration takes seconds (a measurement of the overload case the issue names)
DEFAULT_BUDGET = {
    "refine_sizes": list(RefineConfig.sizes),
    "refine_iterations": list(RefineConfig.iterations),
    "refine_samples": list(RefineConfig.n_samples),
    "refine_patches": list(RefineConfig.patches),
}
BUDGETS = {
    "quick": {},
    "default": DEFAULT_BUDGET,
    "slow": {**DEFAULT_BUDGET, "refine_samples": [1024] * len(RefineConfig.sizes)},
}
BUDGET = os.environ.get("MVREG_OVERLOAD_BUDGET", "quick")
if BUDGET not in BUDGETS:
    raise ValueError(f"MVREG_OVERLOAD_BUDGET must be one of {sorted(BUDGETS)}, got {BUDGET!r}")


def check_marker(m: Marker) -> None:
    assert m.header.frame_id == "anatomy" and m.type == Marker.TRIANGLE_LIST
    assert len(m.points) % 3 == 0 and 0 < len(m.points) // 3 <= 50_000


def test_overload_30hz_stays_bounded_correct_and_flat(ros_env, ros_context, tmp_path):
    h = start_node(ros_context, ros_env, tmp_path / "node", extra={"sync_queue_size": QUEUE, **BUDGETS[BUDGET]})
    try:
        # the marker: to the subscriber that waited for the activation, and to a late one
        check_marker(wait_until(lambda: h.markers and h.markers[-1], 30, what="~/anatomy_marker after activate"))
        late = []
        latched = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        h.node.create_subscription(Marker, "/register_node/anatomy_marker", late.append, latched)
        check_marker(wait_until(lambda: late and late[-1], 30, what="~/anatomy_marker for a late subscriber"))

        h.streaming = True
        n = h.joint_count
        wait_until(lambda: h.joint_count > n + 5, 30, what="joint states streaming")
        images = [h.good(0), h.good(1)]
        stop = threading.Event()
        published = [0]

        def flood():
            t_next = time.monotonic()
            while not stop.is_set():
                h.publish_set(images, h.now_ns() - 20_000_000)
                published[0] += 1
                t_next += 1.0 / RATE_HZ
                time.sleep(max(0.0, t_next - time.monotonic()))

        pump = threading.Thread(target=flood, daemon=True)
        pump.start()
        pid = h.proc.proc.pid
        try:
            first = wait_until(
                lambda: [s for s in h.statuses_since(0, "registered")] or (not h.proc.alive() and "dead"),
                120,
                what="the first registration under load",
            )
            assert h.proc.alive(), h.proc.tail()
            rss0 = rss_kib(pid)
            t0 = time.monotonic()
            samples = [(0.0, rss0)]
            while time.monotonic() - t0 < OVERLOAD_S:
                time.sleep(1.0)
                assert h.proc.alive(), h.proc.tail()
                samples.append((time.monotonic() - t0, rss_kib(pid)))
        finally:
            stop.set()
            pump.join(5)
        time.sleep(2.0)
        assert h.proc.alive(), h.proc.tail()
        rss_end = rss_kib(pid)
        with h.lock:
            statuses = list(h.statuses)
            tfs = list(h.tfs)
            arrivals = list(h.tf_arrivals)
        last = statuses[-1]
        accepted = int(last["registrations_accepted"])
        dropped = int(last["sets_dropped_busy"])
        queued = max(int(s["frames_queued"]) for s in statuses if "frames_queued" in s)
        errors = [mtre_mm(T, h.scenario.truth) for _, T in tfs]
        reg_times = sorted(float(s["time_s"]) for s in statuses if s.get("event") == "registered" and "time_s" in s)
        growth = rss_end / rss0 - 1.0
        # TF latency: from a registered set's stamp (its images, published 20 ms after it) to the first TF at
        # that stamp; the republished copies of the held pose carry later stamps and are not counted
        first_at: dict[int, int] = {}
        for stamp, t in arrivals:
            first_at.setdefault(stamp, t)
        set_stamps = sorted(h.set_stamps)

        def of_a_set(stamp: int) -> bool:  # a TF stamped with a published set's stamp (sets are 33 ms apart)
            i = bisect.bisect_left(set_stamps, stamp)
            return any(abs(set_stamps[j] - stamp) <= 5_000_000 for j in (i - 1, i) if 0 <= j < len(set_stamps))

        latency = sorted((t - stamp) / 1e9 for stamp, t in first_at.items() if of_a_set(stamp))
        print(
            f"\noverload ({BUDGET} budget): {published[0]} sets published at {RATE_HZ:g} Hz over {OVERLOAD_S:g}+ s; "
            f"{accepted} accepted, {last['registrations_rejected']} rejected, {dropped} sets dropped busy, "
            f"{last['frames_dropped_sync']} frames dropped by the sync, most frames queued {queued}; "
            f"{len(tfs)} TFs, worst mTRE {max(errors):.3f} mm; first registration time_s {first[0].get('time_s')}, "
            f"registration time_s median {reg_times[len(reg_times) // 2] if reg_times else None} max "
            f"{reg_times[-1] if reg_times else None}; "
            f"RSS {rss0 / 1024:.1f} MiB at the first registration, {rss_end / 1024:.1f} MiB at the end "
            f"({100 * growth:+.2f} %), max {max(r for _, r in samples) / 1024:.1f} MiB; TF latency (set stamp to TF) "
            + (
                f"p50 {latency[len(latency) // 2]:.2f} s, p95 {latency[int(0.95 * (len(latency) - 1))]:.2f} s, "
                f"max {latency[-1]:.2f} s over {len(latency)} registrations"
                if latency
                else "not measured (no TF at a set's stamp)"
            )
        )
        assert latency, "no TF at the stamp of a published set"
        assert accepted >= 3, last
        assert dropped > 0, "30 Hz sets while registering must replace waiting ones"
        assert queued <= 2 * QUEUE
        assert not [s for s in statuses if s["level"] == b"\x02"], "no ERROR status"
        assert tfs and max(errors) < 2.0, max(errors)
        assert growth < 0.05, samples
    finally:
        h.close()
