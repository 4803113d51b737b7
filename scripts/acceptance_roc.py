#!/usr/bin/env python3
"""The acceptance test's ROC on recorded cases (docs/acceptance.md).

Reads the JSON written by scripts/calibrate_acceptance.py (every signal recorded, thresholds off)
and prints each file's cases at the defaults, then, for each threshold of AcceptanceConfig swept
alone (the others at their defaults, the curvature judged as RefineConfig's default fallbacks
would; the last table moves those), how many correct results are accepted (true acceptance) and
how many wrong ones (false acceptances). Usage:

    .venv/bin/python scripts/acceptance_roc.py CALIB.json [CALIB.json ...]
"""

import json
import statistics
import sys

from mvreg_ros.core.evaluation.roc import accepts, default_curvature_scale, markdown, sweep
from mvreg_ros.core.registration.acceptance import AcceptanceConfig

GRID = {
    "min_view_similarity": (0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7),
    "max_uncertainty_mm": (0.5, 0.7, 0.9, 1.1, 1.5, 2.0, 3.0),
    "max_view_shift_mm": (0.25, 0.5, 1.0, 1.5, 3.0),
    "max_view_gain": (0.0025, 0.005, 0.0085, 0.01, 0.02),
    "max_curvature_scale": (1.0, 2.0, 4.0),  # 1, 2, 4: RefineConfig.curvature_fallback_tries 0, 1, 2
    # check 6, on cases that record it (scripts/second_pass_acceptance.py merge)
    "max_confirm_shift_mm": (0.5, 0.75, 1.0, 1.25, 1.5, 2.0),
    "max_confirm_gain": (0.001, 0.002, 0.004, 0.006, 0.01),
    "max_confirm_gain_alone": (0.004, 0.006, 0.008, 0.01, 0.015, 0.02),
}


def at_defaults(name: str, cases: list[dict], scale: float) -> str:
    """One line: the cases, the correct ones (their median mTRE), the wrong ones, and what the
    acceptance test at its defaults accepts of them."""
    correct = [c["mtre_mm"] for c in cases if c["success"]]
    accepted = [c for c in cases if accepts(c, AcceptanceConfig(), max_curvature_scale=scale)]
    false = sorted(round(c["mtre_mm"], 2) for c in accepted if not c["success"])
    median = f"{statistics.median(correct):.2f} mm" if correct else "-"
    return (
        f"{name}: {len(cases)} cases, {len(correct)} correct (median {median}), {len(cases) - len(correct)} wrong; "
        f"at the defaults {len(accepted)} accepted, {len(accepted) - len(false)} of them correct, "
        f"{len(false)} false acceptances {false if false else ''}".rstrip()
    )


def main(paths: list[str]) -> int:
    per_file = {p: json.loads(open(p).read())["cases"] for p in paths}
    cases = [c for file_cases in per_file.values() for c in file_cases]
    print(
        f"{len(cases)} cases: {sum(c['success'] for c in cases)} correct, {sum(not c['success'] for c in cases)} wrong\n"
    )
    scale = default_curvature_scale()  # the engine's curvature fallbacks, for the other thresholds' sweeps
    for p, file_cases in per_file.items():  # each file's cases at the defaults (check 6 included where recorded)
        print(at_defaults(p, file_cases, scale))
    print()
    for name, grid in GRID.items():
        base = AcceptanceConfig()  # the defaults, check 6 included where a case records it
        try:
            print(markdown(name, sweep(cases, name, grid, base, max_curvature_scale=scale)) + "\n")
        except ValueError as e:  # records made before the curvature's scale was recorded
            print(f"no `{name}` table: {e}\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1:]))
