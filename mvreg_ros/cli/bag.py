"""``mvreg bag``: rosbag2 bags of simulated C-arm acquisitions, and the node's evaluation by
replaying them (docs/bag.md).

``mvreg bag simulate OUT`` writes raw images, CameraInfo, joint states and the ground-truth
anatomy transform (``--scenario``: static, motion, corrupt, fluoro); ``mvreg bag replay BAG``
plays a bag to a running ``register_node`` over DDS, scores every anatomy TF it publishes against
the ground truth and, with ``--json``, writes the report and its plots; ``mvreg bag soak --sets N``
starts the node itself, drives N simulated view sets through it live and reports its memory over
time, TF latency percentiles and the counts of registrations, rejections, drops and crashes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_CONFIG = {"synchronized": "biplane.yaml", "sequential": "mobile_carm.yaml"}
DETECTOR_MM = 256 * 1.164  # the simulated detector's width whatever its pixel count


def config_dir() -> Path:
    """The package's ``config/`` (source tree, or ``share/mvreg_ros/config`` of an install)."""
    src = Path(__file__).resolve().parents[2] / "config"
    if src.is_dir():
        return src
    return Path(sys.prefix) / "share" / "mvreg_ros" / "config"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("simulate", help="write a bag of a simulated acquisition of a CT with its ground truth")
    s.add_argument("out", metavar="OUT", help="bag directory to create (must not exist)")
    s.add_argument("--mode", choices=sorted(DEFAULT_CONFIG), help="acquisition mode (default: the config's)")
    s.add_argument(
        "--config",
        help="node parameter file whose topics, planes and joints are simulated "
        "(default: config/biplane.yaml for synchronized, config/mobile_carm.yaml for sequential)",
    )
    s.add_argument("--sets", type=int, default=3, help="view sets the node can register (default: %(default)s)")
    s.add_argument("--volume", default="example:8", help="CT as the node's volume_path (default: %(default)s)")
    s.add_argument(
        "--size",
        type=int,
        default=64,
        help="detector pixels; the detector stays %.0f mm wide (default: %%(default)s)" % DETECTOR_MM,
    )
    s.add_argument("--period-s", type=float, default=1.5, help="time between shots (default: %(default)s)")
    s.add_argument(
        "--offset-deg",
        type=float,
        default=3.0,
        help="truth = the node's default start pose turned by this (default: %(default)s)",
    )
    s.add_argument("--offset-mm", type=float, default=5.0, help="... and moved by this (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="seed of the offset and the noise (default: %(default)s)")
    s.add_argument(
        "--scenario",
        choices=["static", "motion", "corrupt", "fluoro"],
        default="static",
        help="static: the anatomy stays put; motion: it moves --motion-mm / --motion-deg between two shots "
        "(the ground truth follows); corrupt: bad frames interleaved (wrong encoding, truncated buffers, missing "
        "CameraInfo, stale joints); fluoro: every shot a burst at --fluoro-hz (default: %(default)s)",
    )
    s.add_argument("--motion-mm", type=float, default=10.0, help="motion: translation (default: %(default)s)")
    s.add_argument("--motion-deg", type=float, default=5.0, help="motion: rotation (default: %(default)s)")
    s.add_argument(
        "--motion-shot",
        type=int,
        default=None,
        help="motion: the first shot after it, counted from 0 (default: the middle shot, at least 1)",
    )
    s.add_argument("--fluoro-hz", type=float, default=30.0, help="fluoro: image rate (default: %(default)s)")
    s.add_argument("--storage", choices=["mcap", "sqlite3"], default="mcap", help="(default: %(default)s)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    r = sub.add_parser("replay", help="play a bag to a running register_node and score its TF against the truth")
    r.add_argument("bag", metavar="BAG", help="rosbag2 directory (MCAP or sqlite3) with ground truth")
    r.add_argument(
        "--volume",
        default="example:8",
        help="the node's volume_path: its landmarks score the mTRE (default: %(default)s)",
    )
    r.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default: %(default)s)")
    r.add_argument("--no-clock", action="store_true", help="do not publish /clock")
    r.add_argument(
        "--match-timeout-s",
        type=float,
        default=30.0,
        help="wait this long for the node's subscriptions (default: %(default)s)",
    )
    r.add_argument(
        "--wait-s",
        type=float,
        default=60.0,
        help="after playing, wait this long for the last set's TF (default: %(default)s)",
    )
    r.add_argument(
        "--exclude",
        nargs="*",
        default=["/tf"],
        metavar="TOPIC",
        help="topics not to play (default: %(default)s: a recorded /tf would mix with the node's)",
    )
    r.add_argument(
        "--status-topic",
        default="/register_node/status",
        help="the node's status topic: its counters give dropped_inputs (default: %(default)s)",
    )
    r.add_argument(
        "--json",
        metavar="OUT",
        help="also write the registrations, every TF and the summary as JSON, and beside it the plots "
        "OUT_error.png (error over time, truth changes marked) and OUT_latency.png (latency histogram)",
    )
    r.add_argument("--no-plots", action="store_true", help="with --json: do not write the plots")

    k = sub.add_parser(
        "soak",
        help="start register_node (one refinement level at the image size, sim time), drive N simulated view sets through it live and "
        "report memory, TF latency and counts",
    )
    k.add_argument("--sets", type=int, default=100, help="view sets to simulate and play (default: %(default)s)")
    k.add_argument("--config", help="node parameter file (default: config/biplane.yaml)")
    k.add_argument("--volume", default="example:8", help="CT as the node's volume_path (default: %(default)s)")
    k.add_argument("--size", type=int, default=64, help="detector pixels (default: %(default)s)")
    k.add_argument("--period-s", type=float, default=1.0, help="time between shots (default: %(default)s)")
    k.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default: %(default)s)")
    k.add_argument(
        "--scenario",
        choices=["static", "corrupt"],
        default="corrupt",
        help="corrupt: bad frames interleaved, which must never become a TF (default: %(default)s)",
    )
    k.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    k.add_argument("--sample-s", type=float, default=1.0, help="memory sampling period (default: %(default)s)")
    k.add_argument("--json", metavar="OUT", help="also write the report, the memory samples and the latencies")


def run(args: argparse.Namespace) -> int:
    from mvreg_ros.cli.options import options_ok

    if not options_ok(
        f"bag {args.action}",
        args,
        at_least={
            "sets": 1,
            "size": 8,
            "offset_deg": 0,
            "offset_mm": 0,
            "wait_s": 0,
            "motion_mm": 0,
            "motion_deg": 0,
            "motion_shot": 1,
        },
        above={"period_s": 0, "rate": 0, "match_timeout_s": 0, "fluoro_hz": 0, "sample_s": 0},
    ):
        return 2
    try:
        if args.action == "simulate":
            return _simulate(args)
        if args.action == "soak":
            return _soak(args)
        return _replay(args)
    except (ValueError, TimeoutError) as e:
        print(f"mvreg bag {args.action}: {e}", file=sys.stderr)
        return 2


def _simulate(args: argparse.Namespace) -> int:
    import torch

    from mvreg_ros.core.data.simulate import DetectorConfig
    from mvreg_ros.ros import bag_io
    from mvreg_ros.ros.params import ConfigError, build_config
    from mvreg_ros.ros.volume_source import load_ct

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.size < 8:
        raise ValueError(f"--size must be >= 8, got {args.size}")
    config = Path(args.config) if args.config else config_dir() / DEFAULT_CONFIG[args.mode or "synchronized"]
    values = bag_io.read_node_params(config)
    values["volume_path"] = args.volume
    try:
        cfg = build_config(values, resolve=False)
    except ConfigError as e:
        raise ValueError(f"{config}: {e}") from e
    if args.mode and args.mode != cfg.acquisition_mode:
        raise ValueError(f"--mode {args.mode} but {config} is configured for {cfg.acquisition_mode} acquisition")
    detector = DetectorConfig(height=args.size, width=args.size, pixel_mm=DETECTOR_MM / args.size)
    sim = bag_io.BagSimConfig(
        sets=args.sets,
        period_s=args.period_s,
        offset_deg=args.offset_deg,
        offset_mm=args.offset_mm,
        seed=args.seed,
        detector=detector,
        scenario=args.scenario,
        motion_mm=args.motion_mm,
        motion_deg=args.motion_deg,
        motion_shot=args.motion_shot,
        fluoro_hz=args.fluoro_hz,
    )
    messages, _ = bag_io.simulate_messages(cfg, load_ct(args.volume), sim)
    bag_io.write_bag(args.out, messages, storage=args.storage)
    topics: dict[str, int] = {}
    for m in messages:
        topics[m.topic] = topics.get(m.topic, 0) + 1
    span = (messages[-1].log_time_ns - messages[0].log_time_ns) * 1e-9
    print(
        f"wrote {args.out} ({args.storage}): {len(messages)} messages over {span:.1f} s, "
        f"{cfg.acquisition_mode} from {config.name}, scenario {args.scenario}: "
        + ", ".join(f"{t} {n}" for t, n in topics.items())
    )
    if args.scenario == "motion":
        k = bag_io.motion_shot(cfg, sim)
        print(
            f"motion: {args.motion_mm:g} mm / {args.motion_deg:g} deg before shot {k} "
            f"(t = {sim.lead_s + k * sim.period_s:.1f} s); the ground truth follows"
        )
    print(f"node: register_node --ros-args --params-file {config} -p volume_path:={args.volume} -p use_sim_time:=true")
    return 0


def _replay(args: argparse.Namespace) -> int:
    import rclpy

    from mvreg_ros.core.evaluation.landmarks import ct_landmarks
    from mvreg_ros.ros import bag_io
    from mvreg_ros.ros.replay import evaluator_for_bag, replay
    from mvreg_ros.ros.volume_source import load_ct

    messages = bag_io.read_bag(args.bag)
    evaluator = evaluator_for_bag(messages, ct_landmarks(load_ct(args.volume)).points_ct)
    context = rclpy.context.Context()
    rclpy.init(context=context)
    try:
        replay(
            messages,
            evaluator,
            context=context,
            rate=args.rate,
            clock=not args.no_clock,
            match_timeout_s=args.match_timeout_s,
            wait_s=args.wait_s,
            exclude_topics=tuple(args.exclude),
            status_topic=args.status_topic,
            log=lambda t: print(t, flush=True),
        )
    finally:
        rclpy.try_shutdown(context=context)
    for r in sorted(evaluator.registrations, key=lambda r: r.stamp_ns):
        latency = "?" if r.latency_s is None else f"{r.latency_s:.2f} s"
        print(f"TF at {r.stamp_ns * 1e-9:.3f}: mTRE {r.mtre_mm:.2f} mm, latency {latency}")
    summary = evaluator.summary()
    for r in summary["recoveries"]:
        late = "never" if r["recovery_s"] is None else f"{r['recovery_s']:.2f} s of stamps ({r['images']} images)"
        wall = "" if r["recovery_latency_s"] is None else f", {r['recovery_latency_s']:.2f} s wall clock"
        print(
            f"truth changed at {r['change_stamp_ns'] * 1e-9:.3f}: correct again after {late}{wall}; "
            f"{r['wrong_tfs']} wrong TFs in between"
        )
    print("summary: " + json.dumps(summary))
    if args.json:
        out = Path(args.json)
        out.write_text(
            json.dumps(
                {
                    "registrations": [r.as_dict() for r in evaluator.registrations],
                    "tfs": [{"stamp_ns": s, "mtre_mm": e} for s, e, _ in evaluator.tfs],
                    "truth_changes_ns": evaluator.changes,
                    "rejected_inputs": {str(k): v for k, v in sorted(evaluator.corrupt.items())},
                    "summary": summary,
                },
                indent=2,
            )
        )
        if not args.no_plots:
            from mvreg_ros.ros.replay import write_plots

            for p in write_plots(evaluator, out.with_suffix("")):
                print(f"wrote {p}")
    return 0 if summary["n"] > 0 else 1


def _soak(args: argparse.Namespace) -> int:
    from mvreg_ros.ros.soak import run_soak

    if args.sets < 1 or args.size < 8 or not args.period_s > 0 or not args.rate > 0 or not args.sample_s > 0:
        raise ValueError(
            f"--sets >= 1, --size >= 8, --period-s, --rate and --sample-s > 0 needed, got {args.sets}, "
            f"{args.size}, {args.period_s}, {args.rate}, {args.sample_s}"
        )
    config = Path(args.config) if args.config else config_dir() / DEFAULT_CONFIG["synchronized"]
    report, record, latencies = run_soak(
        sets=args.sets,
        config=config,
        volume=args.volume,
        period_s=args.period_s,
        rate=args.rate,
        scenario=args.scenario,
        size=args.size,
        seed=args.seed,
        sample_s=args.sample_s,
        log=lambda t: print(t, flush=True),
    )
    step = max(1, len(record.rss) // 10)
    print("memory (s, MiB): " + ", ".join(f"{t:.0f}: {r / 1024:.1f}" for t, r in record.rss[::step]))
    print("soak: " + json.dumps(report))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"report": report, "rss_kib": record.rss, "latencies_s": latencies}, indent=2)
        )
    ok = report["crashes"] == 0 and report["tf_from_rejected_inputs"] == 0 and report["registrations"] > 0
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mvreg bag", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
