#!/usr/bin/env python3
"""Tracking updates re-judged at other check-6 shift thresholds, and their per-view agreement (check 4)
at other probe step scales and thresholds, from the signals that scripts/tracking_study.py recorded
(docs/acceptance.md, *The defaults on three seeds of starts*, *Probes of smaller steps*).

Check 6 runs last, once every other check has passed, so a recorded update whose check 6 ran is
accepted at another threshold exactly when :func:`unstable_optimum` says its recorded shift and gain are
stable there; one without it (the fast path, or rejected earlier) keeps its verdict. Check 7 (on a
fallback, the pyramid from the fast path's best round) runs after check 6, so an update recorded with it
off and its measurement on every fallback (``tracking_study.py --cross-check``) is accepted at a
``--cross-drops`` value when it is accepted without it and, where its drop exceeds that value, the recorded
shift and gain pass check 6's thresholds. ``-v`` lists every such fallback. Prints, per
threshold, the updates accepted, false acceptances (mTRE > 2 mm accepted) and false rejections.

With ``--best-round`` (a study run with ``--cross-check --finest-from-fast``, the finest level's pass from the
fast path's best round recorded on every fallback): the updates at the defaults beside ``TrackingConfig.best_round``
"before" (the pass first: accepted, its result; rejected, the fallback's verdict) and "after" (where the
fallback's result scores below that round, the pass's verdict and result replace it), with their false
acceptances and rejections.

With ``--other-scale-gains G [G ...]`` (a study run with ``--other-scale``, check 8's probe recorded on every
accepted update): the updates at the defaults with check 8 on the fallbacks (the pipeline's rule) and, for
comparison, on every update, each at the thresholds G, with their false acceptances and rejections; ``-v``
lists every accepted update's probe gain over the smallest G.

With ``--probe-scale S`` (a study run with ``--probe-scales`` including S): for each pair of
``--view-shifts`` and ``--view-gains``, how many of the accepted updates' results check 4 would flag
from the probes recorded at S, wrong (mTRE > 2 mm) and correct ones. A flagged result is not the update's
final verdict (the pipeline would fall back to the full registration's path, which a new run measures);
it says what the check tells apart. Usage:

    .venv/bin/python scripts/tracking_rejudge.py STUDY.json [STUDY.json ...] [--arm global]
        [--shifts 0.5 0.75 1.0] [--gains-alone 0.01 2] [--cross-drops -2 0 0.005] [-v] [--best-round] [--other-scale-gains 0.007] [--probe-scale 0.3 --view-shifts 0.5 1.0 --view-gains 0.004 0.0085]
"""

import argparse
import dataclasses
import itertools
import json

from mvreg_ros.core.registration.acceptance import AcceptanceConfig, disagreeing_views, unstable_optimum

SUCCESS_MM = 2.0


def accepted_at(update: dict, config: AcceptanceConfig) -> bool:
    shift, gain = update["confirm_shift_mm"], update["confirm_gain"]
    if shift is None or gain is None:  # check 6 did not run: the verdict as recorded
        accepted = update["accepted"]
    else:
        accepted = not unstable_optimum(shift, gain, config)
    # check 7, from its measurement on every fallback (a study run with --cross-check, check 7 off)
    drop, cross_shift, cross_gain = (update.get(k) for k in ("fallback_drop", "cross_shift_mm", "cross_gain"))
    measured = config.cross_check and drop is not None and cross_shift is not None
    if accepted and measured and drop > config.cross_check_drop:
        return not unstable_optimum(cross_shift, cross_gain, config)
    return accepted


def best_round_outcome(update: dict, mode: str, config: AcceptanceConfig) -> tuple[bool, float]:
    """(accepted, mTRE) of a recorded update under ``TrackingConfig.best_round`` ``mode`` ("none", "before",
    "after"), at the acceptance ``config``."""
    base = accepted_at(update, config), update["mtre_mm"]
    if mode == "none" or update["fast"] or "finest_accepted" not in update:
        return base
    finest = update["finest_accepted"], update["finest_mtre_mm"]
    if mode == "before":
        return finest if finest[0] else base
    drop = update["fallback_drop"]
    return finest if drop is not None and not drop <= 0 else base  # "after"; NaN: replaced


def best_round_rows(updates: list[dict], ok: list[bool]) -> None:
    config = AcceptanceConfig()
    recorded = sum("finest_accepted" in u for u in updates)
    print(f"best_round, {recorded} fallbacks with the pass recorded:")
    for mode in ("none", "before", "after"):
        out = [best_round_outcome(u, mode, config) for u in updates]
        fa = sorted(round(m, 2) for a, m in out if a and m > SUCCESS_MM)
        fr = sum(not a and m <= SUCCESS_MM for a, m in out)  # a correct result rejected (its own result's error)
        lost = sum(o and not a for (a, _), o in zip(out, ok))  # correct as recorded, not accepted here
        print(
            f"  {mode}: accepted {sum(a for a, _ in out)}, false acceptances {len(fa)}{f' {fa}' if fa else ''}, "
            f"false rejections {fr} (of the recorded correct results not accepted: {lost})"
        )


def other_scale_rows(updates: list[dict], ok: list[bool], gains: list[float], verbose: bool) -> None:
    """Check 8 re-judged from the recorded probe: an update accepted at the defaults stays accepted where it
    does not apply (the fast path, for "fallbacks") or its recorded gain is at most the threshold."""
    acc0 = [accepted_at(u, AcceptanceConfig()) for u in updates]
    missing = sum(a and u.get("other_gain") is None for a, u in zip(acc0, updates))
    print(f"check 8 (another scale), {sum(acc0)} accepted at the defaults ({missing} without a recorded probe):")
    for scope, g in itertools.product(("fallbacks", "every update"), gains):
        acc = [
            a and (u.get("other_gain") is None or (scope == "fallbacks" and u["fast"]) or u["other_gain"] <= g)
            for a, u in zip(acc0, updates)
        ]
        fa = sorted(round(u["mtre_mm"], 2) for u, a, o in zip(updates, acc, ok) if a and not o)
        fr = sum(o and not a for a, o in zip(acc, ok))
        newly = sum(a0 and not a and o for a0, a, o in zip(acc0, acc, ok))
        print(
            f"  on {scope} at {g:g}: accepted {sum(acc)}, false acceptances {len(fa)}{f' {fa}' if fa else ''}, "
            f"false rejections {fr} ({newly} correct ones newly rejected by check 8)"
        )
    for u, a in zip(updates, acc0) if verbose else ():
        if a and u.get("other_gain") is not None and u["other_gain"] > min(gains):
            print(
                f"  {'fast' if u['fast'] else 'fallback'} {u['mtre_mm']:.2f} mm: check 8 gain {u['other_gain']:.4f}, "
                f"shift {u['other_shift_mm']:.2f} mm"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("studies", nargs="+")
    ap.add_argument("--arm", default="global")
    ap.add_argument("--shifts", nargs="+", type=float, default=[0.5, 0.75, 1.0])
    ap.add_argument(
        "--gains-alone",
        nargs="+",
        type=float,
        default=[AcceptanceConfig().max_confirm_gain_alone],
        help="check 6's max_confirm_gain_alone values to judge at (2: off, no NCC gain exceeds it)",
    )
    ap.add_argument(
        "--cross-drops",
        nargs="+",
        type=float,
        default=[AcceptanceConfig().cross_check_drop],
        help="check 7's cross_check_drop values to judge at (2: off, -2: on every fallback), from a study run with "
        "--cross-check",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="list every fallback's check 7 measurement")
    ap.add_argument(
        "--best-round",
        action="store_true",
        help="also judge TrackingConfig.best_round none / before / after (a study run with --finest-from-fast)",
    )
    ap.add_argument(
        "--other-scale-gains",
        nargs="+",
        type=float,
        default=[],
        help="judge check 8 at these max_other_scale_gain values (a study run with --other-scale)",
    )
    ap.add_argument("--probe-scale", type=float, default=None)
    ap.add_argument("--view-shifts", nargs="+", type=float, default=[AcceptanceConfig().max_view_shift_mm])
    ap.add_argument("--view-gains", nargs="+", type=float, default=[AcceptanceConfig().max_view_gain])
    args = ap.parse_args()
    updates = [c[args.arm] for p in args.studies for c in json.load(open(p))["cases"] if args.arm in c]
    ok = [u["mtre_mm"] <= SUCCESS_MM for u in updates]
    print(f"{len(updates)} updates, {sum(ok)} correct")
    for s, g, d in itertools.product(args.shifts, args.gains_alone, args.cross_drops):
        config = dataclasses.replace(
            AcceptanceConfig(), max_confirm_shift_mm=s, max_confirm_gain_alone=g, cross_check_drop=d
        )
        acc = [accepted_at(u, config) for u in updates]
        fa = sorted(round(u["mtre_mm"], 2) for u, a, o in zip(updates, acc, ok) if a and not o)
        fr = sum(o and not a for a, o in zip(acc, ok))
        print(
            f"check 6 at {s:g} mm (a gain alone over {g:g}), check 7 at {d:g}: accepted {sum(acc)}, false "
            f"acceptances {len(fa)}{f' {fa}' if fa else ''}, false rejections {fr}"
        )
    for u in updates if args.verbose else ():
        if u.get("cross_shift_mm") is not None:
            print(
                f"  fallback {u['mtre_mm']:.2f} mm {'accepted' if u['accepted'] else 'rejected'} without check 7: "
                f"drop {u['fallback_drop']:.4f}, check 7 {u['cross_shift_mm']:.2f} mm / {u['cross_gain']:.4f}"
            )
    if args.best_round:
        best_round_rows(updates, ok)
    if args.other_scale_gains:
        other_scale_rows(updates, ok, args.other_scale_gains, args.verbose)
    if args.probe_scale is not None:
        agreement_rows(updates, ok, scale=args.probe_scale, shifts=args.view_shifts, gains=args.view_gains)


def agreement_rows(updates: list[dict], ok: list[bool], *, scale: float, shifts: list[float], gains: list[float]):
    """What check 4 flags among the accepted updates from their probes recorded at ``scale``."""
    key = f"{scale:g}"
    rows = [(u, o) for u, o in zip(updates, ok) if u["accepted"] and key in u.get("probes", {})]
    if not rows:
        raise SystemExit(f"no accepted update has probes recorded at step scale {key} (tracking_study --probe-scales)")
    wrong = [u for u, o in rows if not o]
    print(f"probes at step scale {key}: {len(rows)} accepted updates, {len(wrong)} of them wrong")
    for u in wrong:
        p = u["probes"][key]
        print(f"  wrong {u['mtre_mm']:.2f} mm: " + ", ".join(f"{q['shift_mm']:.2f} mm / {q['gain']:.4f}" for q in p))
    for shift in shifts:
        for gain in gains:
            config = dataclasses.replace(AcceptanceConfig(), max_view_shift_mm=shift, max_view_gain=gain)
            flagged = [
                bool(disagreeing_views([q["shift_mm"] for q in p], [q["gain"] for q in p], config))
                for p in (u["probes"][key] for u, _ in rows)
            ]
            fw = sum(f and not o for f, (_, o) in zip(flagged, rows))
            fc = sum(f and o for f, (_, o) in zip(flagged, rows))
            print(
                f"check 4 at {shift:g} mm / {gain:g}: flags {fw} of {len(wrong)} wrong and {fc} of "
                f"{len(rows) - len(wrong)} correct accepted results"
            )


if __name__ == "__main__":
    main()
