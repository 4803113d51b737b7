"""Replay chosen tracking updates of a ``tracking_study.py`` record and measure a finer-level probe on each.

A study's starts come from one generator in case order (each case one ``perturb`` draw, a skipped pair none),
so case ``k`` of a record made with ``--seed S`` is replayed exactly: its file, view pair and motion from the
record, its start the k-th draw of seed ``S``, its held registration run again from the truth. The update goes
through the pipeline with the present defaults (the record's ``global`` arm; the replayed mTRE is printed beside
the recorded one: the engine gives the same values bit for bit, so they agree).

The probe (what docs/acceptance.md, *A finer level's probe*, measured): from the update's pose, a refinement at
a finer level than the refinement's finest (``--size`` px, ``--samples`` samples per ray, patch a tenth of the
image): ``--probe newton``, 3 Newton steps alone on a curvature measured there, or ``adam``, check 8's probe
(``acceptance.other_scale_probe``: 30 first-order steps at the finest level's image size, which ``--size`` 192
also gives on the 192 x 256 stress images, with its first step sizes, the best iterate kept); its shift (mean displacement of points on a 50 mm
sphere about the anatomy centre, as check 6's) and the update's mTRE. Usage:

    .venv/bin/python scripts/tracking_replay.py OUT.json RECORD.json --seed 23 [--wrong] [--sample 20]
        [--size 192] [--samples 96] [--probe newton|adam]

``--wrong``: every update the record accepted over 2 mm; ``--sample N``: N accepted updates under 2 mm chosen
evenly over the record (the same ones each run).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mvreg_ros.core.data.deepfluoro import DeepFluoroFile, views_from_projections
from mvreg_ros.core.evaluation.landmarks import file_landmarks
from mvreg_ros.core.evaluation.metrics import mtre_mm
from mvreg_ros.core.geometry.transforms import perturb
from mvreg_ros.core.registration.acceptance import anatomy_shift_mm, other_scale_probe
from mvreg_ros.core.registration.initialisers import Start
from mvreg_ros.core.registration.pipeline import RegistrationPipeline
from mvreg_ros.core.registration.refine import LevelSpec, RefineConfig, Registrar, Schedule

SUCCESS_MM = 2.0


def start_of(case_index: int, seed: int, T_true: torch.Tensor, motion: list[float], centre: torch.Tensor):
    """The start of case ``case_index`` of a study run with ``seed``: the generator advanced by the draws of
    the cases before it (``perturb``'s draws do not depend on its pose)."""
    gen = torch.Generator().manual_seed(seed)
    eye = torch.eye(4, dtype=torch.float64)
    for _ in range(case_index):
        perturb(eye, rot_deg=1.0, trans_mm=1.0, centre_ct=torch.zeros(3, dtype=torch.float64), generator=gen)
    return perturb(T_true, rot_deg=motion[0], trans_mm=motion[1], centre_ct=centre, generator=gen)


def finer_probe(registrar: Registrar, views, T: torch.Tensor, size: int, samples: int, kind: str) -> dict:
    """``kind`` "newton": 3 Newton steps alone at the finer level; "adam": check 8's probe
    (:func:`other_scale_probe`: 30 first-order steps at the finest level's image size with the finest level's first
    step sizes, the best iterate kept: no shift where the pose is that level's optimum)."""
    patch = max(4, round(size / 10))
    t = time.perf_counter()
    if kind == "newton":
        level = LevelSpec(size=size, iterations=0, n_samples=samples, patch=patch)
        schedule = Schedule(levels=(level,), lr_scale=1.0, newton_steps=3, fresh_curvature=True)
        r = registrar.refine(views, T, schedule=schedule)
        T_probe, gain, converged, reason = r.T_ref_from_ct, None, bool(r.converged), r.reason
    else:  # check 8's probe (at the finest level's image size, which --size also gives on the stress images)
        p = other_scale_probe(registrar, views, T, n_samples=samples, patch=patch, iterations=30)
        T_probe, gain, converged, reason = p.T_ref_from_ct, p.gain, None, ""
    return {
        "probe_shift_mm": anatomy_shift_mm(registrar, T, T_probe),
        "probe_gain": gain,
        "probe_converged": converged,
        "probe_reason": reason,
        "probe_time_s": time.perf_counter() - t,
        "T_probe": T_probe.tolist(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("record")
    ap.add_argument("--seed", type=int, required=True, help="the seed the record was made with")
    ap.add_argument("--arm", default="global")
    ap.add_argument("--wrong", action="store_true", help="every accepted update over 2 mm")
    ap.add_argument("--sample", type=int, default=0, help="this many accepted updates under 2 mm, evenly spread")
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--probe", choices=("newton", "adam"), default="newton")
    args = ap.parse_args()
    cases = json.load(open(args.record))["cases"]
    chosen = []
    if args.wrong:
        chosen += [k for k, c in enumerate(cases) if c[args.arm]["accepted"] and c[args.arm]["mtre_mm"] > SUCCESS_MM]
    if args.sample:
        right = [k for k, c in enumerate(cases) if c[args.arm]["accepted"] and c[args.arm]["mtre_mm"] <= SUCCESS_MM]
        step = max(1, len(right) // args.sample)
        chosen += right[::step][: args.sample]
    out = []
    pipelines: dict[str, tuple] = {}
    for k in sorted(set(chosen)):
        c = cases[k]
        with DeepFluoroFile(c["file"]) as f:
            specimen = c["specimen"]
            if c["file"] not in pipelines:
                pipelines.clear()
                registrar = Registrar(f.volume(specimen), RefineConfig())
                landmarks = file_landmarks(*f.landmarks(specimen)).points_ct
                pipelines[c["file"]] = (registrar, RegistrationPipeline(registrar, initialisers=[]), landmarks)
            registrar, pipeline, landmarks = pipelines[c["file"]]
            views, T_true = views_from_projections([f.projection(specimen, i) for i in c["views"]])
        held = pipeline.register_from(views, Start(T_ref_from_ct=T_true.clone(), source="truth"))
        T_start = start_of(k, args.seed, T_true, c["motion"], registrar.centre_ct)
        start = Start(T_ref_from_ct=T_start, source="last_accepted", tracking=True, curvature=held.result.curvature)
        upd = pipeline.register_from(views, start)
        T_est = upd.result.T_ref_from_ct
        row = {
            "case": k,
            "file": c["file"],
            "views": c["views"],
            "motion": c["motion"],
            "recorded_mtre_mm": c[args.arm]["mtre_mm"],
            "mtre_mm": mtre_mm(T_est, T_true, landmarks),
            "accepted": bool(upd.accepted),
            "fast": bool(upd.fast),
            **finer_probe(registrar, views, T_est, args.size, args.samples, args.probe),
        }
        row["probe_mtre_mm"] = mtre_mm(torch.tensor(row.pop("T_probe"), dtype=torch.float64), T_true, landmarks)
        out.append(row)
        print(
            f"case {k} {c['file']} {c['views']} {c['motion']}: mTRE {row['mtre_mm']:.2f} (recorded "
            f"{row['recorded_mtre_mm']:.2f}) {'acc' if row['accepted'] else 'rej'} "
            f"{'fast' if row['fast'] else 'fallback'}; probe shift {row['probe_shift_mm']:.3f} mm -> mTRE "
            f"{row['probe_mtre_mm']:.2f}",
            flush=True,
        )
        with open(args.out, "w") as fh:
            json.dump({"rows": out, "size": args.size, "samples": args.samples, "probe": args.probe}, fh, indent=1)


if __name__ == "__main__":
    main()
