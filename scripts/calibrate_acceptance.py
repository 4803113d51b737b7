#!/usr/bin/env python3
"""Calibration data for the acceptance test (docs/acceptance.md).

Registers every consecutive view pair of the given DeepFluoro-layout files from 10/20, 15/30,
20/40 and 30/60 degrees / mm (the last for more wrong results) through the engine's pipeline with
every acceptance check disabled except the curvature (measured with up to two fallbacks, steps 2
and 4 times the default; each case records the scale that was positive definite), so that each
case records all the signals (per-view similarity, uncertainty, per-view shift and gain, margin; check 6's
shift and gain where the other checks pass, as the acceptance test runs it last),
and prints, for the correct (mTRE <= 2 mm) and wrong cases, the ranges of those signals. Usage:

    .venv/bin/python scripts/calibrate_acceptance.py OUT.json FILE.h5 [FILE.h5 ...]
"""

import sys

from mvreg_ros.core.evaluation import evaluate as ev
from mvreg_ros.core.registration.acceptance import AcceptanceConfig
from mvreg_ros.core.registration.pipeline import PipelineConfig
from mvreg_ros.core.registration.refine import RefineConfig

OFFSETS = ((10, 20), (15, 30), (20, 40), (30, 60))


def main(out: str, files: list[str]) -> None:
    cases = []
    permissive = PipelineConfig(acceptance=AcceptanceConfig(min_view_similarity=-1.0, max_uncertainty_mm=1e6))
    for path in files:
        for rot, trans in OFFSETS:
            cfg = ev.EvalConfig(
                perturb_rot_deg=rot,
                perturb_trans_mm=trans,
                seed=7,
                # curvature measured up to steps 4 times the default, so that the ROC can judge each fallback
                refine=RefineConfig(min_similarity=-1.0, curvature_fallback_tries=2),
                pipeline=permissive,
            )
            for c in ev.run(path, cfg)["cases"]:
                c["file"], c["offset"] = path, [rot, trans]
                cases.append(c)
                print(ev.format_case(c), flush=True)
            ev.write_json({"cases": cases}, out)
    for ok in (True, False):
        group = [c for c in cases if c["success"] == ok]
        if not group:
            continue
        scales = sorted({c.get("curvature_scale", 0.0) for c in group})
        counts = ", ".join(f"{sum(c.get('curvature_scale', 0.0) == s for c in group)} at {s:g}" for s in scales)
        print(f"{'correct' if ok else 'wrong'}: curvature positive definite at step scale {counts} (0: none)")

        def span(key, f):
            vals = [f(c) for c in group if f(c) is not None]
            return f"{min(vals):.3f}..{max(vals):.3f}" if vals else "-"

        print(
            f"{'correct' if ok else 'wrong'} ({len(group)}): smallest view similarity "
            f"{span('s', lambda c: min(c['view_similarity'] or [None]) if c['view_similarity'] else None)}, "
            f"uncertainty {span('u', lambda c: c['uncertainty_mm'])} mm, largest view shift "
            f"{span('d', lambda c: max(c['view_shift_mm']) if c['view_shift_mm'] else None)} mm, largest gain "
            f"{span('g', lambda c: max(c['view_gain']) if c['view_gain'] else None)}"
        )


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
