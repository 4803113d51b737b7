"""Bag scenarios (``mvreg bag simulate --scenario``: motion, corrupt, fluoro) and the replay report's
motion and bad-input fields (mvreg_ros.ros.bag_io, .replay, mvreg bag replay)."""

import functools
import json

import pytest
import torch

pytest.importorskip("rclpy")
pytest.importorskip("tf2_msgs.msg")
pytest.importorskip("rosbags")

from ros_harness import deadline, node_args
from ros_scenario import CONFIG, DETECTOR, QUICK, write_params

from mvreg_ros.core.evaluation.landmarks import ct_landmarks
from mvreg_ros.core.evaluation.metrics import mtre_mm
from mvreg_ros.ros import bag_io
from mvreg_ros.ros.conversions import image_to_tensor, ns_to_stamp, stamp_to_ns, transform_stamped_from_T
from mvreg_ros.ros.params import build_config
from mvreg_ros.ros.replay import GroundTruthEvaluator, evaluator_for_bag, replay, write_plots
from mvreg_ros.ros.volume_source import load_ct


@functools.cache
def simulated(config_name: str, scenario: str, sets: int = 3):
    values = bag_io.read_node_params(CONFIG / config_name)
    values.update(QUICK)
    cfg = build_config(values, resolve=False)
    sim = bag_io.BagSimConfig(sets=sets, detector=DETECTOR, seed=1, scenario=scenario)
    messages, truth = bag_io.simulate_messages(cfg, load_ct("example:8"), sim)
    return cfg, sim, messages, truth


def test_motion_bag_changes_the_truth_between_two_shots():
    cfg, sim, messages, truth = simulated("mobile_carm.yaml", "motion", sets=4)
    gt = bag_io.ground_truth(messages)["poses"]
    stamps = sorted(gt)
    assert len(stamps) == 5 and bag_io.motion_shot(cfg, sim) == 2
    landmarks = ct_landmarks(load_ct("example:8")).points_ct
    assert torch.allclose(gt[stamps[0]], truth, atol=1e-9) and torch.equal(gt[stamps[1]], gt[stamps[0]])
    moved = gt[stamps[2]]
    assert all(torch.equal(gt[s], moved) for s in stamps[2:])
    assert mtre_mm(moved, truth, landmarks) > 8.0
    ev = evaluator_for_bag(messages, landmarks)
    assert ev.changes == [stamps[2]] and ev.corrupt == {}
    with pytest.raises(ValueError, match="motion"):
        bag_io.motion_shot(cfg, bag_io.BagSimConfig(sets=1, scenario="motion", motion_shot=5))


def test_corrupt_bag_records_each_kind_of_bad_input():
    from sensor_msgs.msg import Image

    cfg, _, messages, _ = simulated("biplane.yaml", "corrupt")
    bad = bag_io.corrupt_inputs(messages)
    assert sorted(set(bad.values())) == sorted(bag_io.CORRUPT_KINDS)
    gt = bag_io.ground_truth(messages)["poses"]
    assert not set(bad) & set(gt)  # no truth at a bad input's stamp
    images = {
        stamp_to_ns(img.header.stamp): img
        for img in (bag_io.deserialize(m) for m in messages if m.topic == cfg.image_topics[0])
    }
    infos = {stamp_to_ns(bag_io.deserialize(m).header.stamp) for m in messages if m.topic == cfg.camera_info_topics[0]}
    joints = sorted(m.log_time_ns for m in messages if m.topic == cfg.joint_states_topic)
    for stamp, kind in bad.items():
        img: Image = images[stamp]
        if kind == "wrong_encoding":
            with pytest.raises(ValueError, match="encoding"):
                image_to_tensor(img)
        elif kind == "truncated":
            with pytest.raises(ValueError, match="bytes"):
                image_to_tensor(img)
        elif kind == "missing_camera_info":
            assert stamp not in infos and (img.height, img.width) != (DETECTOR.height, DETECTOR.width)
        else:  # stale joints: no joint state within the node's tolerance before the stamp
            newest = max(t for t in joints if t <= stamp)
            assert stamp - newest > cfg.joint_state_tolerance_s * 1e9
            assert image_to_tensor(img).shape == (DETECTOR.height, DETECTOR.width)
    # the first bad input comes before any CameraInfo
    first = min(bad)
    assert bad[first] == "missing_camera_info" and all(s > first for s in infos)


def test_fluoro_bag_bursts_at_30_hz():
    cfg, sim, messages, _ = simulated("mobile_carm.yaml", "fluoro", sets=2)
    stamps = sorted(m.log_time_ns for m in messages if m.topic == cfg.image_topics[0])
    per_shot = int(2 * sim.hold_s * sim.fluoro_hz) + 1
    assert len(stamps) == 3 * per_shot
    steps = [b - a for a, b in zip(stamps, stamps[1:]) if b - a < 0.5e9]
    assert steps and all(abs(d - 1e9 / 30) < 1e3 for d in steps)
    assert len(bag_io.ground_truth(messages)["poses"]) == len(stamps)
    with pytest.raises(ValueError, match="scenario"):
        bag_io.BagSimConfig(scenario="earthquake")


def _tf(T, ns):
    from tf2_msgs.msg import TFMessage

    return TFMessage(
        transforms=[transform_stamped_from_T(T, parent_frame="carm_base", child_frame="anatomy", stamp=ns_to_stamp(ns))]
    )


def test_evaluator_reports_recovery_wrong_tfs_and_tfs_of_bad_inputs(tmp_path):
    S = 1_000_000_000
    a = torch.eye(4, dtype=torch.float64)
    b = a.clone()
    b[:3, 3] = torch.tensor([10.0, 0.0, 0.0], dtype=torch.float64)
    lm = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 50
    ev = GroundTruthEvaluator(
        {1 * S: a, 2 * S: a, 3 * S: b, 4 * S: b, 5 * S: b},
        lm,
        parent="carm_base",
        child="anatomy",
        corrupt={int(2.5 * S): "truncated"},
    )
    for k in range(1, 6):
        ev.image_published(k * S, float(k))
    ev.on_tf(_tf(a, 2 * S), 2.5)  # registration of the old truth
    ev.on_tf(_tf(a, int(2.2 * S)), 2.6)  # a copy: fine, the old truth is in effect
    ev.on_tf(_tf(a, int(3.1 * S)), 3.2)  # a copy after the motion: wrong
    ev.on_tf(_tf(b, int(2.5 * S)), 3.3)  # a TF at a bad input's stamp
    ev.on_tf(_tf(a, 3 * S), 3.5)  # the mixed set, wrong
    ev.on_tf(_tf(b, 4 * S), 4.75)  # recovered
    ev.on_status({"inputs_rejected": "3", "sets_dropped_busy": "1", "images": "9"})
    ev.on_status({"inputs_rejected": "2", "event": "x"})  # counters only grow: the largest counts
    s = ev.summary()
    assert ev.changes == [3 * S]
    assert s["tf_from_rejected_inputs"] == 1 and s["rejected_inputs"] == 1
    assert s["dropped_inputs"] == 4 and s["node_images"] == 9
    (r,) = s["recoveries"]
    assert r["recovery_s"] == pytest.approx(1.0) and r["images"] == 2 and r["wrong_tfs"] == 2
    assert r["recovery_latency_s"] == pytest.approx(4.75 - 3.0)
    assert s["recovery_s"] == pytest.approx(1.0) and s["tf_over_success_mm"] == 3
    paths = write_plots(ev, tmp_path / "report")
    assert [p.name for p in paths] == ["report_error.png", "report_latency.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_plots_of_a_bag_without_bad_inputs(tmp_path):
    """A static bag has no bad inputs to mark (the plots once failed on it at the end of a replay)."""
    S = 1_000_000_000
    a = torch.eye(4, dtype=torch.float64)
    lm = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 50
    ev = GroundTruthEvaluator({1 * S: a, 2 * S: a}, lm, parent="carm_base", child="anatomy")
    for k in (1, 2):
        ev.image_published(k * S, float(k))
        ev.on_tf(_tf(a, k * S), k + 0.4)
    assert not ev.corrupt and ev.summary()["n"] == 2
    paths = write_plots(ev, tmp_path / "static")
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def replayed_to_node(spawn, tmp_path, ros_context, scenario: str, *, sets: int = 3):
    """A sequential mobile C-arm bag of ``scenario`` replayed (rate 1) to a node of its own (quick
    budget, sim time); the node process, the played messages, the evaluator and its summary. The
    last set may be rejected (its views disagree): the replay waits for it only briefly."""
    _, sim, messages, _ = simulated("mobile_carm.yaml", scenario, sets=sets)
    bag = bag_io.write_bag(tmp_path / "bag", messages)
    overrides = write_params(tmp_path / "overrides.yaml", dict(QUICK, use_sim_time=True))
    node = spawn("node", node_args(CONFIG / "mobile_carm.yaml", overrides))
    played = bag_io.read_bag(bag)
    evaluator = evaluator_for_bag(played, ct_landmarks(load_ct(QUICK["volume_path"])).points_ct)
    replay(played, evaluator, context=ros_context, rate=1.0, match_timeout_s=deadline(120), wait_s=deadline(20))
    summary = evaluator.summary()
    print(json.dumps({k: v for k, v in summary.items() if k != "recoveries"}))
    assert node.alive(), node.tail()
    return node, sim, played, evaluator, summary


def test_corrupt_bag_replayed_to_the_node(spawn, tmp_path, ros_context):
    """The node (its own process, sequential mobile C-arm, quick budget, sim time) rejects every bad
    input of a corrupt bag, never publishes a TF at one's stamp, and registers the good shots."""
    node, _, _, evaluator, summary = replayed_to_node(spawn, tmp_path, ros_context, "corrupt")
    assert summary["tf_from_rejected_inputs"] == 0
    assert summary["node_inputs_rejected"] >= len(evaluator.corrupt) == summary["rejected_inputs"] > 0
    assert summary["dropped_inputs"] >= summary["node_inputs_rejected"]
    assert summary["n"] >= 1 and summary["success_rate"] == 1.0, (summary, node.tail())
    assert summary["tf_over_success_mm"] == 0
    log = node.output()
    for reason in ("unsupported image encoding", "bytes", "stale joint states", "CameraInfo"):
        assert reason in log, (reason, log[-3000:])
    assert node.interrupt() == 0


def test_fluoro_bag_replayed_to_the_node(spawn, tmp_path, ros_context):
    """30 Hz bursts (sequential mobile C-arm, quick budget, sim time): every image completes a set,
    far more than the node can register; it stays alive, drops the excess (counted), never
    publishes a TF at a rejected input's stamp, and its registrations stay within the quick
    budget's accuracy on the test CT (5.6 x 5.6 x 20 mm voxels, one 32 px level: accepted results
    up to about 3.4 mm, docs/node.md, *Overload and soak*), far from a wrong pose. Which sets the
    node registers depends on timing, and with two of them the median is their mean: its bound is
    that p95 (3.4 mm), not the budget's 1.4 mm median (2.5 mm failed once in CI at 2.59 mm)."""
    node, sim, played, _, summary = replayed_to_node(spawn, tmp_path, ros_context, "fluoro", sets=2)
    images = sum(1 for m in played if m.topic.endswith("image_raw"))
    assert images >= 2 * int(2 * sim.hold_s * sim.fluoro_hz)  # bursts, not single shots
    assert summary["node_images"] >= images // 2, summary  # the node saw the burst (sensor QoS may drop a few)
    assert summary["n"] >= 2, (summary, node.tail())
    assert summary["mtre_p95_mm"] <= 5.0 and summary["mtre_median_mm"] <= 3.4, summary
    assert summary["node_sets_dropped_busy"] > 0  # newest wins, drops counted
    assert summary["tf_from_rejected_inputs"] == 0
    assert node.interrupt() == 0
