#!/usr/bin/env python3
"""Shorter refinement schedules against the default one (README *Speed*, *shorter schedules, measured
and not kept*), and the finest level's volume pooled otherwise (``pool-finest-2``: every axis by 2;
``finest-smallest``: the rule before each axis was pooled on its own).

For each named schedule (SCHEDULES):
1. the local 2-view refinement on the bench's cases, as `mvreg bench` times it (views of the shipped
   CT rendered by the engine, starts 10 deg / 20 mm off): median time and mTRE;
2. full registrations (global stage, refinement, the acceptance test at its defaults, check 6
   included) of every consecutive view pair of the given DeepFluoro-layout files from 10/20, 15/30,
   20/40 and 30/60 deg / mm (scripts/calibrate_acceptance.py's offsets and seed): correct results
   (mTRE <= 2 mm), accepted ones, false acceptances, median mTRE of the correct ones, median time.

The three-level schedules shrink the step by 1/sqrt(2) per level instead of 1/2, so that their finest
level starts with the step of the default pyramid's finest level (half the first level's), and so
do the acceptance test's per-view probes, which take that step: the test stays the one calibrated
in docs/acceptance.md, and only the schedule differs. Usage:

    .venv/bin/python scripts/schedule_study.py OUT.json FILE.h5 [FILE.h5 ...] [--only NAME,NAME] [--bench-cases N]
"""

import argparse
import json
import statistics
from types import SimpleNamespace

from mvreg_ros.core.evaluation import evaluate as ev
from mvreg_ros.core.evaluation.benchmark import BenchConfig, _cases, refine_runs
from mvreg_ros.core.evaluation.landmarks import ct_landmarks
from mvreg_ros.core.imaging.volume import load_example_ct
from mvreg_ros.core.registration.acceptance import finest_probe_level
from mvreg_ros.core.registration.refine import RefineConfig, Registrar

OFFSETS = ((10, 20), (15, 30), (20, 40), (30, 60))
THREE = dict(sizes=(32, 64, 128), n_samples=(64, 64, 64), patches=(8, 10, 13), level_lr_decay=0.5**0.5)
SCHEDULES = {  # name: RefineConfig fields that differ from the defaults (32 and 128 px, 60 and 40 iterations)
    "default": {},
    "coarse-40": dict(iterations=(40, 40)),
    "fine-20": dict(iterations=(40, 20)),
    "mid64-fine-10": dict(iterations=(30, 25, 10), **THREE),
    "mid64-fine-4": dict(iterations=(30, 25, 4), **THREE),
    "mid64-newton-only": dict(iterations=(30, 20, 0), **THREE),  # 128 px for the Newton polish alone
    # the default schedule with the finest level's CT pooled by 2 (a voxel per working pixel; the 32 px level's
    # pooling grows too): fewer bytes per render of a CT far larger than the caches
    "pool-finest-2": dict(voxel_per_pixel=1.0, finest_pooling="smallest"),
    # the rule before the finest level pooled each axis on its own: every axis by the nearest integer to half a
    # working pixel over the smallest voxel side (the shipped CT by (1, 1, 1) at 128 px, README *Speed*)
    "finest-smallest": dict(finest_pooling="smallest"),
}


def bench_cases(volume, config: RefineConfig, n: int) -> dict:
    """:func:`benchmark.refine_runs` on the bench's views after one warm-up refinement."""
    scene, views, inits = _cases(volume, 2, BenchConfig(), n + 1)
    registrar = Registrar(volume, config)
    registrar.refine(views, inits[0])  # warm
    return refine_runs(registrar, scene, views, inits[1:], ct_landmarks(volume).points_ct, warm_up=False)


def file_cases(config: RefineConfig, files: list[str]) -> dict:
    cases = []
    for path in files:
        for rot, trans in OFFSETS:
            cfg = ev.EvalConfig(perturb_rot_deg=rot, perturb_trans_mm=trans, seed=7, refine=config)
            for c in ev.run(path, cfg)["cases"]:
                cases.append(
                    {
                        "file": path,
                        "offset": [rot, trans],
                        **{k: c[k] for k in ("mtre_mm", "success", "accepted", "time_s")},
                    }
                )
    return {
        "n": len(cases),
        "correct": sum(c["success"] for c in cases),
        **ev.acceptance_counts(cases),
        "median_mtre_correct_mm": statistics.median(c["mtre_mm"] for c in cases if c["success"]),
        "median_time_s": statistics.median(c["time_s"] for c in cases),
        "cases": cases,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("files", nargs="+")
    p.add_argument("--only", default=None, help="comma-separated schedule names")
    p.add_argument("--bench-cases", type=int, default=12)
    args = p.parse_args()
    names = list(SCHEDULES) if args.only is None else args.only.split(",")
    bad = [n for n in names if n not in SCHEDULES]
    if bad:
        raise SystemExit(f"unknown schedules {bad}; choose from {list(SCHEDULES)}")
    volume = load_example_ct()
    out = {"files": args.files, "offsets": OFFSETS, "schedules": {}}
    for name in names:
        config = RefineConfig(**SCHEDULES[name])
        _, probe_step = finest_probe_level(SimpleNamespace(config=config), iterations=1)
        row = {
            "fields": SCHEDULES[name],
            "probe_step_scale": probe_step,
            "bench": bench_cases(volume, config, args.bench_cases),
            "files": file_cases(config, args.files),
        }
        out["schedules"][name] = row
        b, f = row["bench"], row["files"]
        print(
            f"{name:18s} (probes' first step x{probe_step:.4f}) bench refine {b['time_s']:.3f} s, mTRE {b['median_mtre_mm']:.3f} mm | files: "
            f"{f['correct']}/{f['n']} correct, {f['accepted']} accepted, {f['false_acceptances']} false acceptances, "
            f"mTRE {f['median_mtre_correct_mm']:.3f} mm, {f['median_time_s']:.2f} s",
            flush=True,
        )
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
