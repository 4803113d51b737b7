#!/usr/bin/env python3
"""Where recorded registration errors lie against the view pair's geometry (docs/acceptance.md,
*Native set-up and similarity*).

For each recorded `mvreg eval` case (e.g. of ``scripts/calibrate_acceptance.py``): the angle
between the rays from the two sources to the target's landmark centroid, and the part of the
error (the mean landmark displacement) along the direction those rays constrain least (the
eigenvector of sum_v (I - r_v r_v^T) with the smallest eigenvalue). Prints, for the correct
results, the error by angle, the results between 1.5 and 3 mm, and how many correct results a
minimum angle of ``--min-angle`` degrees would reject. Usage:

    .venv/bin/python scripts/pair_geometry_errors.py [--min-angle DEG] OUT.json [OUT.json ...]
"""

import argparse
import json
import math
import statistics

import torch

from mvreg_ros.core.data.deepfluoro import DeepFluoroFile, views_from_projections
from mvreg_ros.core.geometry.transforms import T_cam_from_ct_deepfluoro, transform_points


def pair_geometry(f: DeepFluoroFile, case: dict, landmarks: torch.Tensor) -> dict:
    views, _ = views_from_projections([f.projection(case["specimen"], k) for k in case["views"]])
    T_est = T_cam_from_ct_deepfluoro(f.extrinsic, torch.tensor(case["pose_est"], dtype=torch.float64))
    T_true = T_cam_from_ct_deepfluoro(f.extrinsic, torch.tensor(case["pose_true"], dtype=torch.float64))
    x = transform_points(T_true, landmarks).mean(0)
    error = (transform_points(T_est, landmarks) - transform_points(T_true, landmarks)).mean(0)
    P = torch.zeros(3, 3, dtype=torch.float64)
    rays = []
    for T_ref_from_cam in views.T_ref_from_cam.to(torch.float64):
        r = x - T_ref_from_cam[:3, 3]
        r = r / r.norm()
        rays.append(r)
        P += torch.eye(3, dtype=torch.float64) - torch.outer(r, r)
    weak = torch.linalg.eigh(P)[1][:, 0]
    cos = max(-1.0, min(1.0, float(rays[0] @ rays[1])))
    return {
        "angle_deg": math.degrees(math.acos(cos)),
        "weak_fraction": float((error @ weak).abs() / error.norm().clamp_min(1e-9)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", nargs="+")
    parser.add_argument("--min-angle", type=float, default=42.0)
    args = parser.parse_args()
    cases = [c for path in args.records for c in json.load(open(path))["cases"] if len(c["views"]) == 2]
    files: dict = {}
    rows = []
    for c in cases:
        key = (c["file"], c["specimen"])
        if key not in files:
            f = DeepFluoroFile(c["file"])
            files[key] = (f, f.landmarks(c["specimen"])[1].to(torch.float64))
        f, landmarks = files[key]
        rows.append({**pair_geometry(f, c, landmarks), "case": c})
    ok = [r for r in rows if r["case"]["success"] and r["case"]["registration_success"]]
    print(f"{len(ok)} correct results with a finished refinement")
    for lo, hi in ((0, 20), (20, 30), (30, 40), (40, 60), (60, 180)):
        group = [r for r in ok if lo <= r["angle_deg"] < hi]
        if group:
            errs = [r["case"]["mtre_mm"] for r in group]
            print(
                f"pairs {lo:3d} to {hi:3d} deg apart: {len(group):4d}, median mTRE {statistics.median(errs):.2f} mm, "
                f"max {max(errs):.2f} mm, median share of the error along the least-constrained direction "
                f"{statistics.median(r['weak_fraction'] for r in group):.2f}"
            )
    print("results 1.5 to 3 mm:")
    for r in sorted(
        (r for r in rows if r["case"]["registration_success"] and 1.5 < r["case"]["mtre_mm"] < 3.0),
        key=lambda r: r["case"]["mtre_mm"],
    ):
        c = r["case"]
        print(
            f"  {c['file']} views {c['views']} from {c['offset']}: mTRE {c['mtre_mm']:.2f} mm, "
            f"{r['angle_deg']:.1f} deg apart, share {r['weak_fraction']:.2f}, uncertainty {c['uncertainty_mm']:.2f} mm"
        )
    below = sum(r["angle_deg"] < args.min_angle for r in ok)
    print(f"a minimum angle of {args.min_angle:g} deg would reject {below} of {len(ok)} correct results")
    for f, _ in files.values():
        f.close()


if __name__ == "__main__":
    main()
