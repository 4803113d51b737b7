"""Soak benchmark of ``register_node`` (``mvreg bag soak``, docs/node.md "Soak").

Simulates ``sets`` view sets of a CT (``bag_io.simulate_messages``; scenario ``corrupt`` by
default: bad frames interleaved), starts the node as a separate process with the soak's
refinement budget (:func:`soak_budget`) and sim time, plays the messages to it live (``replay.replay``) while sampling
the node's resident memory (VmRSS of /proc/<pid>/status), and reports: memory over time, TF
latency percentiles (image publication to TF arrival, p50/p95/max), registrations, rejections,
drops, TFs stamped with a rejected input's stamp (must be 0), errors of the TFs against the
ground truth, and crashes (the node gone before the end, a non-zero exit at Ctrl-C, or a
registration that raised). :func:`soak_summary` and :func:`rss_kib` are plain Python.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import typing
from pathlib import Path

from mvreg_ros.core.evaluation import stats


def soak_budget(size: int) -> dict[str, str]:
    """The node's refinement budget in the soak: one level at the image size (at most 96 px, the
    default pyramid's finest), 60 iterations, 64 samples, 8 px patches. Not the tests' quick 32 px
    level: on 64 px images its registrations scatter about 1.4 mm (median) around the truth, across
    the 2 mm the acceptance test stands for, so a quarter of its accepted TFs were over 2 mm."""
    if size < 8:
        raise ValueError(f"size must be >= 8 px, got {size}")
    return {
        "refine_sizes": f"[{min(size, 96)}]",
        "refine_iterations": "[60]",
        "refine_samples": "[64]",
        "refine_patches": "[8]",
        "device": "cpu",
    }


@typing.no_type_check  # validates its own inputs (tests check its errors)
def rss_kib(pid: int) -> int:
    """Resident memory of process ``pid`` (VmRSS of /proc/<pid>/status), KiB."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise ValueError(f"pid must be a positive integer, got {pid!r}")
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise ValueError(f"no VmRSS line in /proc/{pid}/status")


@dataclasses.dataclass
class SoakRecord:
    """What a soak run observed (filled while it runs)."""

    rss: list[tuple[float, int]] = dataclasses.field(default_factory=list)  # (s since start, KiB)
    first_registration_s: float | None = None  # when the first registration's TF arrived (s since start)
    node_alive_at_end: bool = True
    exit_code: int | None = None
    raised: int = 0  # registrations that raised (node log)


@typing.no_type_check
def soak_summary(summary: dict, latencies_s: list[float], record: SoakRecord, *, sets: int) -> dict:
    """The soak report from the evaluator's summary, the registrations' latencies and the record."""
    if sets < 1:
        raise ValueError(f"sets must be >= 1, got {sets}")
    rss = record.rss
    after = [r for t, r in rss if record.first_registration_s is not None and t >= record.first_registration_s]
    rss_first = after[0] if after else None
    rss_end = rss[-1][1] if rss else None
    crashes = int(not record.node_alive_at_end) + int(record.exit_code not in (0, None)) + record.raised
    return {
        "sets": sets,
        "registrations": summary.get("n", 0),
        "registrations_accepted": summary.get("node_registrations_accepted"),
        "registrations_rejected": summary.get("node_registrations_rejected", 0),
        "inputs_rejected": summary.get("node_inputs_rejected", 0),
        "sets_dropped_busy": summary.get("node_sets_dropped_busy", 0),
        "tf_from_rejected_inputs": summary.get("tf_from_rejected_inputs"),
        "tf_messages": summary.get("tf_messages"),
        "tf_over_success_mm": summary.get("tf_over_success_mm"),
        "mtre_median_mm": summary.get("mtre_median_mm"),
        "mtre_p95_mm": summary.get("mtre_p95_mm"),
        "success_rate": summary.get("success_rate"),
        "latency_p50_s": stats.percentile(latencies_s, 50),
        "latency_p95_s": stats.percentile(latencies_s, 95),
        "latency_max_s": max(latencies_s) if latencies_s else None,
        "rss_first_registration_mib": None if rss_first is None else rss_first / 1024,
        "rss_end_mib": None if rss_end is None else rss_end / 1024,
        "rss_max_mib": max(r for _, r in rss) / 1024 if rss else None,
        "rss_growth_pct": None if not rss_first or rss_end is None else 100.0 * (rss_end / rss_first - 1.0),
        "crashes": crashes,
        "node_exit_code": record.exit_code,
    }


def run_soak(
    *,
    sets: int,
    config: Path,
    volume: str = "example:8",
    period_s: float = 1.0,
    rate: float = 1.0,
    scenario: str = "corrupt",
    size: int = 64,
    seed: int = 0,
    sample_s: float = 1.0,
    wait_s: float = 60.0,
    log=print,
) -> tuple[dict, SoakRecord, list[float]]:
    """Run the soak (see the module doc); returns the report, the record and the latencies."""
    import rclpy

    from mvreg_ros.core.data.simulate import DetectorConfig
    from mvreg_ros.core.evaluation.landmarks import ct_landmarks
    from mvreg_ros.ros import bag_io
    from mvreg_ros.ros.params import build_config
    from mvreg_ros.ros.replay import evaluator_for_bag, replay
    from mvreg_ros.ros.volume_source import load_ct

    if scenario not in ("static", "corrupt"):
        raise ValueError(f"scenario must be 'static' or 'corrupt', got {scenario!r}")
    values = bag_io.read_node_params(config)
    values["volume_path"] = volume
    cfg = build_config(values, resolve=False)
    ct = load_ct(volume)
    detector = DetectorConfig(height=size, width=size, pixel_mm=256 * 1.164 / size)
    sim = bag_io.BagSimConfig(sets=sets, period_s=period_s, seed=seed, detector=detector, scenario=scenario)
    t = time.monotonic()
    messages, _ = bag_io.simulate_messages(cfg, ct, sim)
    log(f"simulated {sets} sets ({len(messages)} messages, {scenario}) in {time.monotonic() - t:.1f} s")
    evaluator = evaluator_for_bag(messages, ct_landmarks(ct).points_ct)
    on_status = evaluator.on_status

    def status(v: dict) -> None:  # the replay keeps its counters; the accepted count too
        on_status(v)
        if "registrations_accepted" in v:
            evaluator.status["registrations_accepted"] = max(
                evaluator.status.get("registrations_accepted", 0), int(v["registrations_accepted"])
            )

    evaluator.on_status = status
    record = SoakRecord()
    work = Path(tempfile.mkdtemp(prefix="mvreg_soak_"))
    node_log = work / "node.log"
    args = [sys.executable, "-m", "mvreg_ros.ros.node", "--ros-args", "--params-file", str(config)]
    for k, v in {"volume_path": volume, "use_sim_time": "true", **soak_budget(size)}.items():
        args += ["-p", f"{k}:={v}"]
    env = dict(os.environ)
    env.pop("_ROS_WHEELS_BOOTSTRAP_COMPLETE", None)
    with open(node_log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    log(f"node pid {proc.pid}, log {node_log}")
    t0 = time.monotonic()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set() and proc.poll() is None:
            try:
                record.rss.append((time.monotonic() - t0, rss_kib(proc.pid)))
            except (OSError, ValueError):
                break
            if record.first_registration_s is None and evaluator.registrations:
                record.first_registration_s = time.monotonic() - t0
            stop.wait(sample_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    context = rclpy.context.Context()
    rclpy.init(context=context)
    try:
        replay(messages, evaluator, context=context, rate=rate, match_timeout_s=600.0, wait_s=wait_s, log=log)
    finally:
        rclpy.try_shutdown(context=context)
        stop.set()
        sampler.join(5)
        record.node_alive_at_end = proc.poll() is None
        if record.node_alive_at_end:
            proc.send_signal(signal.SIGINT)
            try:
                record.exit_code = proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                record.exit_code = proc.wait(5)
        else:
            record.exit_code = proc.returncode
    record.raised = node_log.read_text(errors="replace").count("registration raised")
    latencies = [r.latency_s for r in evaluator.registrations if r.latency_s is not None]
    return soak_summary(evaluator.summary(), latencies, record, sets=sets), record, latencies
