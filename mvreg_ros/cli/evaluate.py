"""``mvreg eval FILE.h5``: registration benchmark on a DeepFluoro-layout file (real or
written by ``mvreg simulate``); prints a table and optionally writes JSON."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE.h5", help="DeepFluoro-layout HDF5 file")
    p.add_argument("--specimen", action="append", metavar="NAME",
                   help="specimen to evaluate (repeatable; default: every specimen in the file)")
    p.add_argument("--views", metavar="SETS", help="view sets, e.g. '0,1;2,5,7' (default: every consecutive pair)")
    p.add_argument("--max-sets", type=int, default=None, metavar="N", help="evaluate at most N view sets per specimen")
    p.add_argument("--init", choices=("perturb", "network"), default="perturb",
                   help="initialisation: the truth perturbed by an exact error, or the coarse network (default: %(default)s)")
    p.add_argument("--model", metavar="PATH", help="coarse network checkpoint (for --init network)")
    p.add_argument("--perturb-rot-deg", type=float, default=10.0, help="initial rotation error, deg (default: %(default)s)")
    p.add_argument("--perturb-trans-mm", type=float, default=20.0, help="initial translation error, mm (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the perturbations (default: %(default)s)")
    p.add_argument("--geometry-noise-deg", type=float, default=0.0,
                   help="rotation error of each non-first known camera pose, deg (default: %(default)s)")
    p.add_argument("--geometry-noise-mm", type=float, default=0.0,
                   help="translation error of each non-first known camera pose, mm (default: %(default)s)")
    p.add_argument("--success-mm", type=float, default=2.0, help="success threshold on mTRE, mm (default: %(default)s)")
    p.add_argument("--json", metavar="OUT", help="write the per-case results and the summary as JSON")
    p.add_argument("--quick", action="store_true",
                   help="one short 32 px refinement level (smoke tests; not for reported figures)")
    p.add_argument("--device", default="cpu", help="torch device for refinement (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    import torch

    from mvreg_ros.core import evaluation
    from mvreg_ros.core.refine import RefineConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    refine = RefineConfig(device=args.device)
    if args.quick:
        refine = RefineConfig(sizes=(32,), iterations=(60,), n_samples=(48,), patches=(8,), device=args.device)
    try:
        config = evaluation.EvalConfig(
            specimens=tuple(args.specimen) if args.specimen else None,
            view_sets=evaluation.parse_view_sets(args.views) if args.views else None,
            max_sets=args.max_sets, init=args.init, model=args.model, perturb_rot_deg=args.perturb_rot_deg,
            perturb_trans_mm=args.perturb_trans_mm, seed=args.seed, geometry_noise_deg=args.geometry_noise_deg,
            geometry_noise_mm=args.geometry_noise_mm, success_mm=args.success_mm, refine=refine)
        print(evaluation.TABLE_HEADER, flush=True)
        report = evaluation.run(args.file, config, progress=lambda c: print(evaluation.format_case(c), flush=True))
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"mvreg eval: error: {e}", file=sys.stderr)
        return 2
    print()
    print(evaluation.format_summary(report["summary"], config.success_mm))
    if args.json:
        evaluation.write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0
