"""``mvreg eval FILE.h5``: registration benchmark on a DeepFluoro-layout file (real or
written by ``mvreg simulate``); prints a table and optionally writes JSON."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE.h5", help="DeepFluoro-layout HDF5 file")
    p.add_argument(
        "--specimen",
        action="append",
        metavar="NAME",
        help="specimen to evaluate (repeatable; default: every specimen in the file)",
    )
    p.add_argument("--views", metavar="SETS", help="view sets, e.g. '0,1;2,5,7' (default: every consecutive pair)")
    p.add_argument("--max-sets", type=int, default=None, metavar="N", help="evaluate at most N view sets per specimen")
    p.add_argument(
        "--init",
        choices=("perturb", "network"),
        default="perturb",
        help="initialisation: the truth perturbed by an exact error, or the coarse network (default: %(default)s)",
    )
    p.add_argument("--model", metavar="PATH", help="coarse network checkpoint (for --init network)")
    p.add_argument(
        "--perturb-rot-deg", type=float, default=10.0, help="initial rotation error, deg (default: %(default)s)"
    )
    p.add_argument(
        "--perturb-trans-mm", type=float, default=20.0, help="initial translation error, mm (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the perturbations (default: %(default)s)")
    p.add_argument(
        "--geometry-noise-deg",
        type=float,
        default=0.0,
        help="rotation error of each non-first known camera pose, deg (default: %(default)s)",
    )
    p.add_argument(
        "--geometry-noise-mm",
        type=float,
        default=0.0,
        help="translation error of each non-first known camera pose, mm (default: %(default)s)",
    )
    p.add_argument("--success-mm", type=float, default=2.0, help="success threshold on mTRE, mm (default: %(default)s)")
    p.add_argument("--json", metavar="OUT", help="write the per-case results and the summary as JSON")
    p.add_argument(
        "--capture-range",
        action="store_true",
        help="evaluate from every starting offset 5/10, 10/20, 15/30, 20/40, 30/60 deg/mm (perturbed truth): "
        "success and false acceptances against the offset, a table, and a plot with --plot",
    )
    p.add_argument("--plot", metavar="PNG", help="with --capture-range: write the success/false-acceptance plot")
    p.add_argument(
        "--target",
        metavar="PREFIX",
        help="register the rigid target: the vol-seg structures whose names start with PREFIX (e.g. "
        "'vertebrae'); the similarity weights their projection (default: the whole CT)",
    )
    p.add_argument(
        "--mask-truncated",
        choices=("footprint", "complete", "off"),
        default="footprint",
        help="pixels left out where the CT is cut through the body: 'footprint' (rays that miss it), "
        "'complete' (also rays that leave it through a cut face: for a CT shorter than what the "
        "X-rays see) or 'off' (default: %(default)s)",
    )
    p.add_argument(
        "--truncation-extend-mm",
        type=float,
        default=150.0,  # RefineConfig.truncation_extend_mm (test_eval_cli checks they agree)
        metavar="MM",
        help="render a CT that is cut through the body continued this far beyond each cut (its end "
        "slices repeated: the patient goes on beyond the CT); 0: render it as cut (default: %(default)s)",
    )
    p.add_argument(
        "--no-global",
        action="store_true",
        help="local refinement only, no global stage (the acceptance test still runs)",
    )
    p.add_argument(
        "--confirm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="acceptance check 6: after the global stage, run the local refinement again from the result and reject "
        "an unstable optimum (docs/acceptance.md, 'A second pass'; default: the engine's, on; --no-confirm: without it)",
    )
    p.add_argument(
        "--quick", action="store_true", help="one short 32 px refinement level (smoke tests; not for reported figures)"
    )
    p.add_argument("--device", default="cpu", help="torch device for refinement (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    from mvreg_ros.cli.options import options_ok

    if not options_ok(
        "eval",
        args,
        at_least={
            "max_sets": 1,
            "perturb_rot_deg": 0,
            "perturb_trans_mm": 0,
            "geometry_noise_deg": 0,
            "geometry_noise_mm": 0,
            "truncation_extend_mm": 0,
        },
        above={"success_mm": 0},
    ):
        return 2
    import torch

    from mvreg_ros.core.evaluation import evaluate as evaluation
    from mvreg_ros.core.registration.acceptance import AcceptanceConfig
    from mvreg_ros.core.registration.global_search import GlobalConfig
    from mvreg_ros.core.registration.pipeline import PipelineConfig
    from mvreg_ros.core.registration.refine import RefineConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    truncation = dict(mask_truncated=args.mask_truncated, truncation_extend_mm=args.truncation_extend_mm)
    refine = RefineConfig(device=args.device, **truncation)
    if args.quick:
        refine = RefineConfig(
            sizes=(32,),
            iterations=(60,),
            n_samples=(48,),
            patches=(8,),
            device=args.device,
            **truncation,
        )
    try:
        config = evaluation.EvalConfig(
            specimens=tuple(args.specimen) if args.specimen else None,
            view_sets=evaluation.parse_view_sets(args.views) if args.views else None,
            max_sets=args.max_sets,
            init=args.init,
            model=args.model,
            perturb_rot_deg=args.perturb_rot_deg,
            perturb_trans_mm=args.perturb_trans_mm,
            seed=args.seed,
            geometry_noise_deg=args.geometry_noise_deg,
            geometry_noise_mm=args.geometry_noise_mm,
            success_mm=args.success_mm,
            refine=refine,
            pipeline=PipelineConfig(
                global_search=GlobalConfig(enabled=not args.no_global),
                acceptance=AcceptanceConfig() if args.confirm is None else AcceptanceConfig(confirm=args.confirm),
            ),
            target=args.target,
        )
        if args.plot and not args.capture_range:
            raise ValueError("--plot goes with --capture-range")
        print(evaluation.TABLE_HEADER, flush=True)
        progress = lambda c: print(evaluation.format_case(c), flush=True)
        if args.capture_range:
            capture = evaluation.capture_range(args.file, config, progress=progress)
        else:
            report = evaluation.run(args.file, config, progress=progress)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"mvreg eval: error: {e}", file=sys.stderr)
        return 2
    print()
    if args.capture_range:
        print(evaluation.format_capture_range(capture))
        if args.json:
            evaluation.write_json(capture, args.json)
            print(f"wrote {args.json}")
        if args.plot:
            evaluation.plot_capture_range(capture, args.plot)
            print(f"wrote {args.plot}")
        return 0
    print(evaluation.format_summary(report["summary"], config.success_mm))
    if args.json:
        evaluation.write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0
