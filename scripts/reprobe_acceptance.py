#!/usr/bin/env python3
"""Recompute the per-view agreement probes of recorded cases at their final poses (docs/acceptance.md,
*Shorter probes*): judges another probe length without registering again.

Reads JSON written by scripts/calibrate_acceptance.py (or `mvreg eval --json`), probes every case
that has probes again with ITERATIONS steps at its recorded final pose (the engine's default
RefineConfig, as the calibration registers), writes the cases with the new `view_shift_mm` /
`view_gain` to OUT.json (scripts/acceptance_roc.py reads it), and prints how many wrong and correct
results the agreement flags by itself and how many the whole test accepts. Usage:

    .venv/bin/python scripts/reprobe_acceptance.py OUT.json ITERATIONS CALIB.json [CALIB.json ...] [--step-scale S]

``--step-scale``: the probes' first steps relative to the finest level's (``AcceptanceConfig.agreement_step_scale``;
1 by default).
"""

import argparse
import json
import sys

from mvreg_ros.core.evaluation.evaluate import write_json
from mvreg_ros.core.evaluation.reprobe import agreement_flags, reprobe
from mvreg_ros.core.evaluation.roc import accepts, default_curvature_scale
from mvreg_ros.core.registration.acceptance import AcceptanceConfig


def summary(tag: str, cases: list[dict]) -> str:
    flags = agreement_flags(cases)
    config, scale = AcceptanceConfig(), default_curvature_scale()
    accepted = [accepts(c, config, max_curvature_scale=scale) for c in cases]
    correct = sum(c["success"] for c in cases)
    true_acc = sum(a and c["success"] for a, c in zip(accepted, cases))
    false_acc = sorted(round(c["mtre_mm"], 2) for a, c in zip(accepted, cases) if a and not c["success"])
    return (
        f"{tag}: the agreement flags {flags['wrong_flagged']} of {flags['wrong']} wrong and "
        f"{flags['correct_flagged']} of {flags['correct']} correct results with probes; the test accepts "
        f"{true_acc} of {correct} correct results and {len(false_acc)} wrong ones {false_acc}"
    )


def main(out: str, iterations: int, paths: list[str], step_scale: float = 1.0) -> int:
    cases = [c for p in paths for c in json.loads(open(p).read())["cases"]]
    print(summary("recorded", cases), flush=True)
    again = reprobe(cases, iterations=int(iterations), step_scale=step_scale)
    write_json(
        {"cases": again, "probe_iterations": int(iterations), "probe_step_scale": step_scale, "from": paths}, out
    )
    print(summary(f"{iterations} steps at step scale {step_scale:g}", again))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("iterations", type=int)
    ap.add_argument("calib", nargs="+")
    ap.add_argument("--step-scale", type=float, default=1.0)
    a = ap.parse_args()
    sys.exit(main(a.out, a.iterations, a.calib, step_scale=a.step_scale))
