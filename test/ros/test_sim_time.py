"""The node on sim time over real DDS (its own process): this process publishes /clock. TF stamps
follow /clock; with /clock stopped the held pose is never sent twice at one stamp and its hold
still ends on steady time (~/pose_valid false); /clock restarted earlier (a bag played with
--loop) clears the node's state with a time_jump status. Deadlines scale with
MVREG_TEST_TIMEOUT_SCALE."""

import threading
import time

import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("tf2_msgs.msg")
pytest.importorskip("rosgraph_msgs.msg")

from node_harness import register_good_set, start_node
from ros_harness import deadline, wait_until
from ros_scenario import mtre_mm
from rosgraph_msgs.msg import Clock

from mvreg_ros.ros.conversions import ns_to_stamp

HOLD_S = deadline(5.0)  # pose_hold_s, scaled with the load like every deadline (MVREG_TEST_TIMEOUT_SCALE)
SIM_START_NS = 1_000_000_000_000  # 1000 s: far from the wall clock, so a wall stamp cannot pass for it


class SimClock:
    """/clock at 100 Hz from this process: ``start_ns`` plus the steady time since :meth:`run`,
    frozen by :meth:`stop`."""

    def __init__(self, node):
        self.pub = node.create_publisher(Clock, "/clock", 10)
        self.lock = threading.Lock()
        self.base_ns, self.t0, self.running = SIM_START_NS, time.monotonic(), True
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def now_ns(self) -> int:
        with self.lock:
            if not self.running:
                return self.base_ns
            return self.base_ns + int((time.monotonic() - self.t0) * 1e9)

    def stop(self) -> None:
        with self.lock:
            self.base_ns = self.base_ns + int((time.monotonic() - self.t0) * 1e9) if self.running else self.base_ns
            self.running = False

    def run(self, from_ns: int) -> None:
        with self.lock:
            self.base_ns, self.t0, self.running = from_ns, time.monotonic(), True

    def _loop(self) -> None:
        while not self.stop_event.wait(0.01):
            with self.lock:
                running = self.running
            if running:
                self.pub.publish(Clock(clock=ns_to_stamp(self.now_ns())))

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(5)


def tf_stamps(h) -> list[int]:
    with h.lock:
        return [s for s, _ in h.tfs]


def test_sim_time_clock_stop_and_restart(ros_env, ros_context, tmp_path):
    h = start_node(ros_context, ros_env, tmp_path, hold_s=HOLD_S, extra={"use_sim_time": True})
    clock = SimClock(h.node)
    try:
        h.now_ns = clock.now_ns  # this process's stamps (joints, images) follow the sim clock too
        stamp, _ = register_good_set(h)
        with h.lock:
            T = [T for s, T in h.tfs if s == stamp][0]
        assert mtre_mm(T, h.scenario.truth) < 2.0
        wait_until(lambda: h.valid() is True, 30, what="pose_valid true")
        # republished copies carry sim-time stamps after the set's, increasing
        wait_until(lambda: len([s for s in tf_stamps(h) if s > stamp]) >= 3, 30, what="republished copies")
        copies = [s for s in tf_stamps(h) if s > stamp]
        assert copies == sorted(copies) and len(set(copies)) == len(copies)
        assert all(s - SIM_START_NS < 3_600_000_000_000 for s in copies)  # sim time, not the wall clock

        # /clock stops (a paused bag): no stamp is sent twice, and the hold ends on steady time (the
        # ROS age of the pose no longer grows, so only the steady time since acceptance can end it)
        h.streaming = False  # joint stamps would stop too
        clock.stop()
        assert h.valid() is True, "the hold ended before /clock stopped: raise HOLD_S"
        wait_until(lambda: h.valid() is False, HOLD_S + 30, what="pose_valid false with /clock stopped")
        stamps = tf_stamps(h)
        assert len(set(stamps)) == len(stamps), "one stamp sent twice while /clock was stopped"
        n_tf = len(stamps)
        time.sleep(1.0)
        assert len(tf_stamps(h)) == n_tf, "TF published after the hold ended"

        # /clock restarts 500 s earlier (a bag loop): the node clears its state and says so
        start = h.count("statuses")
        clock.run(SIM_START_NS - 500_000_000_000)
        st = wait_until(
            lambda: (h.statuses_since(start, "time_jump") or [None])[0],
            30,
            what="a time_jump status after /clock went back",
        )
        assert st["state"] == "waiting" and st["had_pose"] == "True", st
        assert h.valid() is False
        assert h.proc.interrupt() == 0, h.proc.tail()
    finally:
        clock.close()
        h.close()
