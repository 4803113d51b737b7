#!/usr/bin/env python3
"""Tracking updates on images the engine did not render, with and without the held curvature (README *Speed*).

For every consecutive view pair of the given DeepFluoro-layout files (the stress files: DiffDRR's
Siddon per material, a polychromatic beam, scatter, noise, a detector, and for ``mismatch`` a
deformed patient and a CT slab; ``mvreg_ros/core/data/stress.py``):

1. the held registration: the pipeline from the true pose (refinement and acceptance test; the
   global stage if rejected). A pair whose result is not accepted holds nothing and is skipped;
2. tracking updates from starts moved ``--motion`` (deg / mm, default 1/2, 1.5/3 and 3/6) from the truth
   (the anatomy moved that much since the held pose), each through the pipeline once per arm (``--arms``),
   in turn: ``held`` (the start carries the held registration's curvature,
   ``TrackingConfig.held_curvature``; a stalled Newton step not taken as converged and the fallback to
   the local refinement, the rules before), ``measured`` (the same start without it: first-order steps
   and a curvature measured; the engine before), ``stalled`` (the held curvature, and a Newton step that
   lowers the loss neither at full length nor at half taken as converged,
   ``RefineConfig.stalled_converged``; the local fallback), ``stalled_global`` (the same with the fallback
   through the full registration's path, ``TrackingConfig.fallback="global"``) and ``global`` (this
   edition's defaults: the held curvature, a stalled Newton step not converged, the fallback through the
   full registration's path).

Prints per arm and motion: the update's median time, the median mTRE, how many took the fast path,
how many used the held curvature, accepted, false acceptances (mTRE > 2 mm accepted) and false
rejections; writes every case to OUT.json with its verdict's signals (per-view similarity, shift and gain;
check 6's shift and gain where it ran, a fallback's drop below its fast path's best round and check 7's
shift and gain where it ran; with ``--cross-check`` check 7 off and its measurement on every fallback; with
``--second-pass`` check 6's on every accepted fast update; with ``--other-scale`` the other scale's probe on
every accepted update; with ``--finest-from-fast`` the finest level alone
from the fast path's best round on every fallback, judged by the whole acceptance test; the verdict
unchanged). Usage:

    .venv/bin/python scripts/tracking_study.py OUT.json FILE.h5 [FILE.h5 ...] [--motion 1/2 3/6] [--starts 2]
        [--arms held measured stalled global] [--seed 11] [--second-pass] [--probe-scales 1 0.3 0.1]
        [--cross-check] [--finest-from-fast]
"""

import argparse
import dataclasses
import json
import time

import torch

from mvreg_ros.core.data.deepfluoro import DeepFluoroFile, views_from_projections
from mvreg_ros.core.evaluation import stats
from mvreg_ros.core.evaluation.evaluate import default_view_sets
from mvreg_ros.core.evaluation.landmarks import file_landmarks
from mvreg_ros.core.evaluation.metrics import mtre_mm
from mvreg_ros.core.geometry.transforms import perturb
from mvreg_ros.core.registration.acceptance import acceptance_test, other_scale_probe, probe_views, second_pass
from mvreg_ros.core.registration.initialisers import Start
from mvreg_ros.core.registration.pipeline import PipelineConfig, RegistrationPipeline
from mvreg_ros.core.registration.refine import RefineConfig, Registrar, TrackingConfig

SUCCESS_MM = 2.0
_BEFORE = dataclasses.replace(RefineConfig(), stalled_converged=False)  # a stalled Newton step not converged
_STALLED = dataclasses.replace(RefineConfig(), stalled_converged=True)  # a stalled Newton step converged
_LOCAL = dataclasses.replace(TrackingConfig(), fallback="local")  # the fallback before: the local refinement first
# each arm: (engine, pipeline)
ARMS = {
    # the held curvature alone (the rules before for a stalled Newton step and for the fallback)
    "held": (_BEFORE, PipelineConfig(tracking=_LOCAL)),
    # the engine before: a curvature measured at each update, a stalled Newton step not converged, the local fallback
    "measured": (_BEFORE, PipelineConfig(tracking=dataclasses.replace(_LOCAL, held_curvature=False))),
    # the held curvature and a stalled Newton step converged, the local fallback
    "stalled": (_STALLED, PipelineConfig(tracking=_LOCAL)),
    # ... and the fallback through the full registration's path (global stage, refinement, check 6)
    "stalled_global": (_STALLED, PipelineConfig()),
    # this edition's defaults: the held curvature, a stalled Newton step not converged, the fallback through the
    # full registration's path
    "global": (RefineConfig(), PipelineConfig()),
}


def _motion(text: str) -> tuple[float, float]:
    rot, trans = text.split("/")
    return float(rot), float(trans)


def finest_from_fast(pipeline, registrar, views, fast, T_true, landmarks) -> dict:
    """The finest level alone from the fast path's best round (``TrackingConfig.best_round_schedule``: the
    tracking schedule with 20 iterations, its second round's step sizes), judged by the whole acceptance test with
    check 6: what ``TrackingConfig.best_round`` would have given."""
    schedule = pipeline.config.tracking.best_round_schedule(registrar.config)
    t = time.perf_counter()
    r = registrar.refine(views, fast.T_ref_from_ct, schedule=schedule)
    v = acceptance_test(r, registrar=registrar, views=views, config=pipeline.config.acceptance, confirm=True)
    return {
        "finest_mtre_mm": mtre_mm(r.T_ref_from_ct, T_true, landmarks),
        "finest_accepted": bool(v.accepted),
        "finest_reason": v.reason,
        "finest_similarity": r.similarity,
        "finest_converged": bool(r.converged),
        "finest_time_s": time.perf_counter() - t,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("files", nargs="+")
    ap.add_argument("--motion", nargs="+", type=_motion, default=[(1.0, 2.0), (1.5, 3.0), (3.0, 6.0)])
    ap.add_argument("--starts", type=int, default=2, help="starts per pair and motion")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument(
        "--second-pass",
        action="store_true",
        help="also run check 6's second pass on every accepted fast update and record its shift and gain (the "
        "verdict is not changed): what check 6 would say on the tracking path",
    )
    ap.add_argument(
        "--probe-scales",
        nargs="+",
        type=float,
        default=[],
        help="also probe every view of each update's final pose with first steps these times the finest level's "
        "(AcceptanceConfig.agreement_step_scale) and record each scale's per-view shifts and gains (the verdict is "
        "not changed): what check 4 would measure with smaller probe steps",
    )
    ap.add_argument(
        "--arms",
        nargs="+",
        choices=ARMS,
        default=["held", "measured"],
        help="which ways to register each start, in turn (default: held measured)",
    )
    ap.add_argument(
        "--finest-from-fast",
        action="store_true",
        help="judge every arm without TrackingConfig.best_round and, on every fallback with a fast round, refine "
        "the finest level alone from that round (best_round_schedule: the tracking budget with 20 iterations) and "
        "judge it by the whole acceptance test, check 6 included; record its mTRE and verdict beside the update's",
    )
    ap.add_argument(
        "--cross-check",
        action="store_true",
        help="judge every arm without check 7 (AcceptanceConfig.cross_check off) and record its measurement on every "
        "fallback whose fast path reached a finite similarity: the local pyramid from the fast path's best round, how "
        "far it ends from the result and what it gains there (for tracking_rejudge.py --cross-drops)",
    )
    ap.add_argument(
        "--other-scale",
        action="store_true",
        help="also run the other scale's probe (acceptance.other_scale_probe: the finest image size, NCC patch 19 px, "
        "96 samples, 30 steps) on every accepted update and record its shift, gain and mTRE (the verdict is not "
        "changed): what a check on it would say",
    )
    args = ap.parse_args()
    arms = {name: ARMS[name] for name in args.arms}
    if args.cross_check:
        arms = {
            name: (engine, dataclasses.replace(p, acceptance=dataclasses.replace(p.acceptance, cross_check=False)))
            for name, (engine, p) in arms.items()
        }
    if args.finest_from_fast:  # the update without the pass (TrackingConfig.best_round "none"), the pass beside it
        arms = {
            name: (engine, dataclasses.replace(p, tracking=dataclasses.replace(p.tracking, best_round="none")))
            for name, (engine, p) in arms.items()
        }
    cases = []
    gen = torch.Generator().manual_seed(args.seed)
    for path in args.files:
        with DeepFluoroFile(path) as f:
            for specimen in f.specimens():
                landmarks = file_landmarks(*f.landmarks(specimen)).points_ct
                volume = f.volume(specimen)
                # the held registration: always the "held" arm's engine and pipeline, so that every run of the
                # script holds the same curvatures and skips the same pairs, whichever arms it registers
                registrar = Registrar(volume, ARMS["held"][0])
                reference = RegistrationPipeline(registrar, initialisers=[], config=ARMS["held"][1])
                registrars = {name: Registrar(volume, engine) for name, (engine, _) in arms.items()}
                del volume
                pipelines = {
                    name: RegistrationPipeline(registrars[name], initialisers=[], config=pipeline)
                    for name, (_, pipeline) in arms.items()
                }
                for vs in default_view_sets(len(f.projection_indices(specimen))):
                    views, T_true = views_from_projections([f.projection(specimen, i) for i in vs])
                    held = reference.register_from(views, Start(T_ref_from_ct=T_true.clone(), source="truth"))
                    if not held.accepted or held.result.curvature is None:
                        print(f"{path} {specimen} {vs}: held registration not accepted ({held.reason}); skipped")
                        continue
                    held_mtre = mtre_mm(held.result.T_ref_from_ct, T_true, landmarks)
                    for rot, trans in args.motion:
                        for _ in range(args.starts):
                            T_start = perturb(
                                T_true, rot_deg=rot, trans_mm=trans, centre_ct=registrar.centre_ct, generator=gen
                            )
                            start = Start(
                                T_ref_from_ct=T_start,
                                source="last_accepted",
                                tracking=True,
                                curvature=held.result.curvature,
                            )
                            case = {"file": str(path), "specimen": specimen, "views": list(vs), "motion": [rot, trans]}
                            for name, pipeline in pipelines.items():
                                t = time.perf_counter()
                                out = pipeline.register_from(views, start)
                                elapsed = time.perf_counter() - t
                                mtre = mtre_mm(out.result.T_ref_from_ct, T_true, landmarks)
                                c = out.result.curvature
                                v = out.verdict
                                case[name] = {
                                    "time_s": elapsed,
                                    "mtre_mm": mtre,
                                    "accepted": bool(out.accepted),
                                    "fast": bool(out.fast),
                                    "stages": list(out.stages),
                                    "held_curvature": c is not None and c.age > 0,
                                    "uncertainty_mm": out.result.uncertainty_mm,
                                    "reason": out.reason,
                                    "view_similarity": list(v.view_similarity),
                                    "view_shift_mm": list(v.view_shift_mm),
                                    "view_gain": list(v.view_gain),
                                    "confirm_shift_mm": v.confirm_shift_mm,
                                    "confirm_gain": v.confirm_gain,
                                    "fallback_drop": v.fallback_drop,
                                    "cross_shift_mm": v.cross_shift_mm,
                                    "cross_gain": v.cross_gain,
                                    "held_mtre_mm": held_mtre,
                                }
                                T_est = out.result.T_ref_from_ct
                                if args.probe_scales and bool(torch.isfinite(T_est).all()):
                                    iterations = pipeline.config.acceptance.agreement_iterations
                                    case[name]["probes"] = {
                                        f"{scale:g}": [
                                            dataclasses.asdict(p)
                                            for p in probe_views(
                                                registrars[name], views, T_est, iterations=iterations, step_scale=scale
                                            )
                                        ]
                                        for scale in args.probe_scales
                                    }
                                fast = out.fast_result
                                if (
                                    args.cross_check
                                    and not out.fast
                                    and fast is not None
                                    and torch.isfinite(T_est).all()
                                ):
                                    t = time.perf_counter()
                                    p = second_pass(registrars[name], views, T_est, start=fast.T_ref_from_ct)
                                    case[name].update(
                                        cross_shift_mm=p.shift_mm,
                                        cross_gain=p.gain,
                                        cross_time_s=time.perf_counter() - t,
                                        cross_mtre_mm=mtre_mm(p.T_ref_from_ct, T_true, landmarks),
                                        fast_mtre_mm=mtre_mm(fast.T_ref_from_ct, T_true, landmarks),
                                        fast_similarity=fast.similarity,
                                    )
                                if args.finest_from_fast and not out.fast and fast is not None:
                                    case[name].update(
                                        finest_from_fast(pipeline, registrars[name], views, fast, T_true, landmarks)
                                    )
                                if args.other_scale and out.accepted:
                                    t = time.perf_counter()
                                    p = other_scale_probe(registrars[name], views, T_est)
                                    case[name].update(
                                        other_shift_mm=p.shift_mm,
                                        other_gain=p.gain,
                                        other_time_s=time.perf_counter() - t,
                                        other_mtre_mm=mtre_mm(p.T_ref_from_ct, T_true, landmarks),
                                    )
                                if args.second_pass and out.accepted and out.fast:
                                    t = time.perf_counter()
                                    p = second_pass(registrars[name], views, T_est)
                                    case[name].update(
                                        probe_confirm_shift_mm=p.shift_mm,
                                        probe_confirm_gain=p.gain,
                                        probe_time_s=time.perf_counter() - t,
                                        probe_mtre_mm=mtre_mm(p.T_ref_from_ct, T_true, landmarks),
                                    )
                            cases.append(case)
                            print(
                                f"{path} {vs} {rot:g}/{trans:g}: "
                                + "  ".join(
                                    f"{n} {case[n]['time_s']:.3f} s {case[n]['mtre_mm']:.2f} mm "
                                    f"{'acc' if case[n]['accepted'] else 'rej'} {'+'.join(case[n]['stages'])}"
                                    f"{' held' if case[n]['held_curvature'] else ''}"
                                    for n in arms
                                ),
                                flush=True,
                            )
                with open(args.out, "w") as fh:
                    json.dump({"cases": cases}, fh, indent=1)
    print(f"{len(cases)} tracking updates")
    for rot, trans in args.motion:
        group = [c for c in cases if c["motion"] == [rot, trans]]
        for name in arms:
            x = [c[name] for c in group]
            if not x:
                continue
            ok = [r["mtre_mm"] <= SUCCESS_MM for r in x]
            acc = [r["accepted"] for r in x]
            print(
                f"{rot:g} deg / {trans:g} mm, {name}: median {stats.median([r['time_s'] for r in x]):.3f} s, "
                f"median mTRE {stats.median([r['mtre_mm'] for r in x]):.3f} mm, fast {sum(r['fast'] for r in x)}/"
                f"{len(x)}, held curvature {sum(r['held_curvature'] for r in x)}, accepted {sum(acc)}, correct "
                f"{sum(ok)}, false acceptances {sum(a and not o for a, o in zip(acc, ok))}, false rejections "
                f"{sum(o and not a for a, o in zip(acc, ok))}"
            )


if __name__ == "__main__":
    main()
