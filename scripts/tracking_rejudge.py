#!/usr/bin/env python3
"""Tracking updates re-judged at other check-6 shift thresholds, from the signals that
scripts/tracking_study.py recorded (docs/acceptance.md, *The defaults on three seeds of starts*).

Check 6 runs last, once every other check has passed, so a recorded update whose check 6 ran is
accepted at another threshold exactly when :func:`unstable_optimum` says its recorded shift and gain are
stable there; one without it (the fast path, or rejected earlier) keeps its verdict. Prints, per
threshold, the updates accepted, false acceptances (mTRE > 2 mm accepted) and false rejections. Usage:

    .venv/bin/python scripts/tracking_rejudge.py STUDY.json [STUDY.json ...] [--arm global]
        [--shifts 0.5 0.75 1.0]
"""

import argparse
import dataclasses
import json

from mvreg_ros.core.registration.acceptance import AcceptanceConfig, unstable_optimum

SUCCESS_MM = 2.0


def accepted_at(update: dict, config: AcceptanceConfig) -> bool:
    shift, gain = update["confirm_shift_mm"], update["confirm_gain"]
    if shift is None or gain is None:  # check 6 did not run: the verdict as recorded
        return update["accepted"]
    return not unstable_optimum(shift, gain, config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("studies", nargs="+")
    ap.add_argument("--arm", default="global")
    ap.add_argument("--shifts", nargs="+", type=float, default=[0.5, 0.75, 1.0])
    args = ap.parse_args()
    updates = [c[args.arm] for p in args.studies for c in json.load(open(p))["cases"] if args.arm in c]
    ok = [u["mtre_mm"] <= SUCCESS_MM for u in updates]
    print(f"{len(updates)} updates, {sum(ok)} correct")
    for s in args.shifts:
        config = dataclasses.replace(AcceptanceConfig(), max_confirm_shift_mm=s)
        acc = [accepted_at(u, config) for u in updates]
        fa = sorted(round(u["mtre_mm"], 2) for u, a, o in zip(updates, acc, ok) if a and not o)
        fr = sum(o and not a for a, o in zip(acc, ok))
        print(
            f"check 6 at {s:g} mm: accepted {sum(acc)}, false acceptances {len(fa)}{f' {fa}' if fa else ''}, "
            f"false rejections {fr}"
        )


if __name__ == "__main__":
    main()
