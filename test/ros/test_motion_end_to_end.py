"""Motion safety end to end over real DDS (sequential mode, docs/node.md *Motion safety*): a
simulated mobile C-arm process takes alternating shots of the small CT; between two shots the
anatomy moves 10 mm / 5 degrees. The node (its own process, config/mobile_carm.yaml with the quick
test budget) must

- never publish a TF stamped at or after the first post-motion image more than 2 mm from the new
  truth (republished copies of the old pose included),
- publish a correct TF again within two shots (at the stamp of the second post-motion image at
  the latest),
- turn ``~/pose_valid`` false within one image of the motion (before the next image is taken).

This process listens to /tf, ~/pose_valid and ~/status."""

import json
import math
import threading
import time

import numpy as np
import pytest
import torch

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("tf2_msgs.msg")

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from ros_harness import deadline, node_args, publisher_args, wait_until
from ros_scenario import CONFIG, make_scenario, mtre_mm, volume, write_params
from std_msgs.msg import Bool
from tf2_msgs.msg import TFMessage

from mvreg_ros.core.geometry.transforms import perturb
from mvreg_ros.ros.conversions import T_from_transform, stamp_to_ns

A = {"carm_orbital": 0.0, "carm_angular": 0.0, "carm_lift": 0.02, "carm_horizontal": 0.0}
B = {"carm_orbital": math.radians(55), "carm_angular": 0.12, "carm_lift": 0.02, "carm_horizontal": 0.01}
PRE, POST = 4, 3  # shots before and after the motion (alternating A, B)
SHOT_PERIOD_S = 2.0  # move_s + hold_s: longer than a registration, so no set waits behind another


class Listener:
    def __init__(self, ctx):
        self.node = rclpy.create_node("motion_listener", context=ctx)
        self.lock = threading.Lock()
        self.tfs, self.valid, self.statuses = [], [], []
        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
        latched = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        self.node.create_subscription(TFMessage, "/tf", self._on_tf, reliable)
        self.node.create_subscription(Bool, "/register_node/pose_valid", self._on_valid, latched)
        self.node.create_subscription(DiagnosticArray, "/register_node/status", self._on_status, reliable)
        self.executor = SingleThreadedExecutor(context=ctx)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def now_ns(self) -> int:
        return self.node.get_clock().now().nanoseconds

    def _on_tf(self, msg):
        with self.lock:
            self.tfs += [
                (stamp_to_ns(t.header.stamp), T_from_transform(t.transform))
                for t in msg.transforms
                if t.header.frame_id == "carm_base" and t.child_frame_id == "anatomy"
            ]

    def _on_valid(self, msg):
        with self.lock:
            self.valid.append((self.now_ns(), msg.data))

    def _on_status(self, msg):
        with self.lock:
            self.statuses += [{kv.key: kv.value for kv in s.values} for s in msg.status]

    def close(self):
        self.executor.shutdown()
        self.thread.join(deadline(30))
        self.node.destroy_node()


def write_inputs(scenario, truths: list, directory):
    """Publisher spec and images: shot k alternates A, B and shows the CT at ``truths[k]``."""
    arrays, shots = {}, []
    for k, truth in enumerate(truths):
        joints = A if k % 2 == 0 else B
        scenario.truth = truth
        arrays[f"shot{k}"] = scenario.image(0, joints, seed=100 + k)
        shots.append({"joints": scenario.joints_vector(joints), "images": {"0": f"shot{k}"}})
    cfg = scenario.cfg
    spec = {
        "image_topics": list(cfg.image_topics),
        "camera_info_topics": list(cfg.camera_info_topics),
        "joint_states_topic": cfg.joint_states_topic,
        "joint_names": list(cfg.joint_names),
        "K": {"0": [float(v) for v in scenario.K.reshape(-1)]},
        "rate_hz": 50.0,
        "move_s": SHOT_PERIOD_S - 0.5,
        "hold_s": 0.5,
        "image_delay_s": 0.1,
        "rounds": 1,
        "stamp_offsets_s": {},
        "shots": shots,
        "tail_s": 1.0,
    }
    (directory / "spec.json").write_text(json.dumps(spec))
    np.savez(directory / "images.npz", **arrays)
    return directory / "spec.json", directory / "images.npz"


def test_anatomy_moving_between_shots(spawn, tmp_path, ros_context):
    scenario = make_scenario("mobile_carm.yaml", seed=5, extra={"pose_hold_s": 600.0})
    truth1 = scenario.truth
    centre = volume().bone_centre_ct().to(torch.float64)
    truth2 = perturb(truth1, rot_deg=5.0, trans_mm=10.0, centre_ct=centre, generator=torch.Generator().manual_seed(2))
    moved_mm = mtre_mm(truth1, truth2)
    spec, data = write_inputs(scenario, [truth1] * PRE + [truth2] * POST, tmp_path)
    overrides = write_params(tmp_path / "overrides.yaml", scenario.overrides)
    listener = Listener(ros_context)
    try:
        node = spawn("node", node_args(CONFIG / "mobile_carm.yaml", overrides))
        publisher = spawn(
            "publisher",
            publisher_args(spec, data),
        )

        def done():
            if not node.alive():
                raise AssertionError(f"the node exited:\n{node.tail()}")
            return any(e.get("event") == "done" for e in publisher.json_lines())

        wait_until(done, 120 + (PRE + POST) * SHOT_PERIOD_S, step=0.2, what=f"the shots; node:\n{node.tail()}")
        stamps = [int(e["stamps_ns"]["0"]) for e in publisher.json_lines() if e.get("event") == "images"]
        assert len(stamps) == PRE + POST
        first_post, second_post = stamps[PRE], stamps[PRE + 1]

        def recovered():
            with listener.lock:
                return [(s, T) for s, T in listener.tfs if s in stamps[PRE:] and mtre_mm(T, truth2) < 2.0]

        wait_until(recovered, 90, step=0.2, what=f"a correct TF after the motion; node:\n{node.tail(60)}")
        time.sleep(0.5)  # republished copies of the new pose
        with listener.lock:
            tfs, valid, statuses = list(listener.tfs), list(listener.valid), list(listener.statuses)
        rc = node.interrupt()
    finally:
        listener.close()
    log = node.output()
    before = [(s, mtre_mm(T, truth1)) for s, T in tfs if s in stamps[:PRE]]
    after = [(s, mtre_mm(T, truth2)) for s, T in tfs if s >= first_post]
    good = sorted(s for s, e in after if s in stamps[PRE:] and e < 2.0)
    motion = [st for st in statuses if st.get("event") == "motion_detected"]
    false_at = [t for t, v in valid if not v and t > stamps[PRE - 1]]
    print(
        f"\nmotion {moved_mm:.1f} mm (landmarks); pre-motion registrations {[round(e, 2) for _, e in before]} mm; "
        f"TFs at/after the first post-motion image: {len(after)}, worst {max((e for _, e in after), default=0):.2f} mm; "
        f"first correct TF at shot {stamps.index(good[0]) - PRE + 1 if good else None} after the motion; "
        f"pose_valid false {f'{(false_at[0] - first_post) * 1e-9:.2f} s' if false_at else 'never'} after the first "
        f"post-motion stamp; motion_detected: {[(m.get('view_shift_mm'), m.get('view_gain')) for m in motion]}"
    )
    assert moved_mm > 8.0
    assert before and all(e < 2.0 for _, e in before), (before, log[-3000:])
    # nothing the new truth contradicts, at or after the first post-motion image
    assert after and all(e <= 2.0 for _, e in after), [(s - first_post, round(e, 2)) for s, e in after]
    # a correct TF again within two shots
    assert good and good[0] <= second_post, (good, stamps, log[-3000:])
    # pose_valid false within one image: before the next image was taken (its stamp is 0.1 s after
    # its publication)
    assert false_at and false_at[0] < second_post - 100_000_000, (valid, stamps)
    assert motion or "motion between shots" in log, log[-3000:]
    assert rc == 0
