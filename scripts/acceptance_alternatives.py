#!/usr/bin/env python3
"""Two checks beyond the result, judged on recorded results (docs/acceptance.md, *Restarts*):

- ``restarts``: the recorded final pose and two starts 1.5 deg / 3 mm from it (seeded by the case's
  index in its file) refined together for 15 steps at the finest level: does a restart end more than
  ``d`` mm away (at the anatomy centre) with a similarity within ``eps`` of the result's own?
- ``target``: 15 steps at the finest level from the recorded pose with the similarity restricted to
  the vertebrae's footprint (``target_labels``, ``target_weight=1``), against the same probe with the
  whole-image similarity: how far does each move, and what does it gain?

Only the cases the acceptance test accepts at its defaults are judged (the question: which of
them would the check reject?). Usage:

    .venv/bin/python scripts/acceptance_alternatives.py restarts|target CALIB.json [CALIB.json ...]
"""

import itertools
import json
import statistics
import sys

import torch

from mvreg_ros.core.evaluation.metrics import pose_distance
from mvreg_ros.core.evaluation.reprobe import at_recorded_poses, default_registrar
from mvreg_ros.core.evaluation.roc import accepts, default_curvature_scale
from mvreg_ros.core.geometry.transforms import perturb
from mvreg_ros.core.imaging.footprint import target_labels
from mvreg_ros.core.registration.acceptance import AcceptanceConfig, refine_at_finest
from mvreg_ros.core.registration.refine import RefineConfig, Registrar

STEPS = 15


def finest_run(registrar: Registrar, views, starts: torch.Tensor):
    """``STEPS`` steps at the finest level from each start, as the probes take them; the end poses'
    distances from the first start (mm at the anatomy centre)."""
    run = refine_at_finest(registrar, views, starts, iterations=STEPS)
    _, mm = pose_distance(starts[:1].expand(len(starts), 4, 4), run.T_ref_from_ct, registrar.centre_ct)
    return run, mm.tolist()


def restarts(cases: list[dict]) -> list[dict]:
    rows = []
    for i, registrar, views, T in at_recorded_poses(cases, make_registrar=default_registrar(RefineConfig())):
        g = torch.Generator().manual_seed(cases[i]["_index"])
        moved = [perturb(T, rot_deg=1.5, trans_mm=3.0, centre_ct=registrar.centre_ct, generator=g) for _ in range(2)]
        run, mm = finest_run(registrar, views, torch.stack([T, *moved]))
        rows.append({"case": cases[i], "sim": run.similarity.tolist(), "mm": mm})
    return rows


def report_restarts(rows: list[dict]) -> None:
    ok = [r for r in rows if r["case"]["success"]]
    bad = [r for r in rows if not r["case"]["success"]]
    for r in bad:
        print(f"wrong {r['case']['mtre_mm']:.2f} mm: similarity {r['sim']}, restart ends {r['mm'][1:]} mm away")
    ends = sorted(m for r in ok for m in r["mm"][1:])
    print(
        f"correct: restart end median {statistics.median(ends):.2f} mm, 95th percentile {ends[int(0.95 * len(ends))]:.2f}"
    )
    print("| d | eps | correct results flagged | wrong results flagged |\n|---|---|---|---|")
    for d, eps in itertools.product((0.5, 1.0, 1.5, 2.0), (0.0, 0.002, 0.005, 0.01)):

        def flag(r):
            return any(m > d and s >= r["sim"][0] - eps for m, s in zip(r["mm"][1:], r["sim"][1:]))

        print(f"| {d} mm | {eps} | {sum(map(flag, ok))} of {len(ok)} | {sum(map(flag, bad))} of {len(bad)} |")


def target(cases: list[dict]) -> list[dict]:
    whole: dict[str, Registrar] = {}  # the specimen's whole-image registrar, beside its target one

    def target_registrar(f, specimen):
        volume = f.volume(specimen, with_mask=True)
        labels = target_labels(f.label_names(specimen), "vertebrae", mask=volume.mask)
        whole["current"] = default_registrar(RefineConfig())(f, specimen)
        return Registrar(volume, RefineConfig(target_labels=labels, target_weight=1.0))

    rows = []
    for i, registrar, views, T in at_recorded_poses(cases, make_registrar=target_registrar):
        row = {"case": cases[i]}
        for name, reg in (("whole", whole["current"]), ("target", registrar)):
            run, mm = finest_run(reg, views, T[None])
            row[name] = {"mm": mm[0], "gain": float(run.similarity[0] - run.start_similarity[0])}
        rows.append(row)
    return rows


def report_target(rows: list[dict]) -> None:
    ok = [r for r in rows if r["case"]["success"]]
    for r in (r for r in rows if not r["case"]["success"]):
        print(f"wrong {r['case']['mtre_mm']:.2f} mm: whole {r['whole']}, target {r['target']}")
    for name in ("whole", "target"):
        mm = sorted(r[name]["mm"] for r in ok)
        gain = sorted(r[name]["gain"] for r in ok)
        q = lambda v, p: v[min(len(v) - 1, int(p * len(v)))]
        print(
            f"{name}, correct: moves median {statistics.median(mm):.2f} mm, 90th percentile {q(mm, 0.9):.2f}, "
            f"99th {q(mm, 0.99):.2f}, largest {mm[-1]:.2f}; gains up to {gain[-1]:.4f}"
        )
    for d, gain in itertools.product((0.5, 1.0, 1.5), (0.0, 0.005, 0.01)):
        flagged = [r for r in rows if r["target"]["mm"] > d and r["target"]["gain"] > gain]
        print(
            f"target moves > {d} mm and gains > {gain}: {sum(r['case']['success'] for r in flagged)} correct, "
            f"{sum(not r['case']['success'] for r in flagged)} wrong flagged"
        )


def main(what: str, paths: list[str]) -> int:
    cases = []
    for p in paths:
        for k, c in enumerate(json.loads(open(p).read())["cases"]):
            if accepts(c, AcceptanceConfig(), max_curvature_scale=default_curvature_scale()):
                cases.append(dict(c, _index=k))
    print(f"{len(cases)} accepted cases: {sum(c['success'] for c in cases)} correct", flush=True)
    if what == "restarts":
        report_restarts(restarts(cases))
    elif what == "target":
        report_target(target(cases))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2:]))
