"""``mvreg bench``: renderer throughput, refinement speed against the reference baseline, full
registrations, tracking updates (the fast path of a tracking start), where one refinement spends
its time, coarse-network inference time and peak memory, on the shipped CT; ``--big-ct``: a
512 x 512 x 1000 CT from file to a warm engine (time and resident memory)."""

from __future__ import annotations

import argparse

# benchmark.SECTIONS, spelled out so that building the parser imports no torch (a test keeps them equal)
SECTION_NAMES = ("renderer", "refine", "reference", "pipeline", "tracking", "profile", "coarse", "big_ct", "train")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--cases", type=int, default=5, help="2-view refinements with the engine")
    p.add_argument("--reference-cases", type=int, default=2, help="... with the reference baseline (slow)")
    p.add_argument("--reference-iterations", type=int, default=150)
    p.add_argument(
        "--tracking-cases",
        type=int,
        default=5,
        help="tracking updates: view sets moved 1 deg / 2 mm from the held pose, registered from a tracking "
        "start (the fast path), and again without the fast path (0: skip)",
    )
    p.add_argument(
        "--big-ct",
        action="store_true",
        help="also load a 512 x 512 x 1000 CT (the shipped one resampled, written as NIfTI to a temporary "
        "folder) and warm the engine up on it: ready time and resident memory (about a minute, 1-3 GB)",
    )
    p.add_argument(
        "--train-minutes",
        type=float,
        default=None,
        metavar="M",
        help="also train a coarse network on the shipped CT for M minutes (into a temporary folder) and report "
        "its held-out error against training minutes (train_curve)",
    )
    p.add_argument(
        "--only",
        default=None,
        metavar="SECTION[,SECTION]",
        help=f"measure only these sections, from {', '.join(SECTION_NAMES)}",
    )
    p.add_argument("--model", default=None, help="coarse network checkpoint to time")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "native", "compiled", "grid_sample"),
        help="the engine's renderer backend (default: native on a CPU, compiled on a GPU)",
    )
    p.add_argument("--seed", type=int, default=0)


def _sections(args) -> tuple[str, ...]:
    from mvreg_ros.core.evaluation.benchmark import DEFAULT_SECTIONS, SECTIONS

    train_minutes = getattr(args, "train_minutes", None)
    extra = (("big_ct",) if args.big_ct else ()) + (("train",) if train_minutes is not None else ())
    if args.only is None:
        return DEFAULT_SECTIONS + extra
    chosen = tuple(dict.fromkeys(s.strip().replace("-", "_") for s in args.only.split(",") if s.strip()))
    bad = [s for s in chosen if s not in SECTIONS]
    if bad or not chosen:
        raise ValueError(f"--only must name sections from {', '.join(SECTIONS)}, got {args.only!r}")
    if "reference" in chosen and "refine" not in chosen:
        raise ValueError(f"--only {args.only!r}: 'reference' is compared against 'refine': give both")
    if "train" in chosen and train_minutes is None:
        raise ValueError(f"--only {args.only!r}: the 'train' section needs --train-minutes")
    return chosen + tuple(s for s in extra if s not in chosen)


def run(args) -> int:
    import sys

    from mvreg_ros.cli.options import options_ok

    if not options_ok(
        "bench",
        args,
        at_least={"cases": 1, "reference_cases": 1, "reference_iterations": 1, "tracking_cases": 0},
        above={"train_minutes": 0},
    ):
        return 2
    try:
        sections = _sections(args)
    except ValueError as e:
        print(f"mvreg bench: error: {e}", file=sys.stderr)
        return 2
    import json

    from mvreg_ros.core.evaluation.benchmark import BenchConfig
    from mvreg_ros.core.evaluation.benchmark import run as bench
    from mvreg_ros.core.imaging.volume import load_example_ct
    from mvreg_ros.core.registration.refine import RefineConfig

    cfg = BenchConfig(
        cases=args.cases,
        reference_cases=args.reference_cases,
        reference_iterations=args.reference_iterations,
        tracking_cases=args.tracking_cases,
        model_path=args.model,
        device=args.device,
        seed=args.seed,
        refine=RefineConfig(render_backend=args.backend),
        **({"train_minutes": args.train_minutes} if args.train_minutes is not None else {}),
        sections=sections,
    )
    r = bench(load_example_ct(), cfg)
    print(f"device {r['device']}, {r['torch_threads']} threads, torch {r['versions']['torch']}")
    rr = r.get("renderer")
    if rr is not None:
        isa = f", {rr['engine_native_isa']}" if "engine_native_isa" in rr else ""
        print(f"engine renderer backend: {rr['engine_backend']}{isa}")
        for name in ("engine", "engine_compiled", "reference"):
            if name not in rr:
                continue
            x = rr[name]
            print(
                f"renderer {name:15s}: {x['forward_samples_per_s'] / 1e6:8.1f} M samples/s forward, "
                f"{x['forward_backward_samples_per_s'] / 1e6:8.1f} M samples/s forward+backward "
                f"({x['rays']} rays x {x['samples_per_ray']} samples)"
            )
        print(
            f"memory bandwidth {rr['memory_bandwidth_gbs']:.1f} GB/s (copy, read + write) -> bound "
            f"{rr['bandwidth_bound_samples_per_s'] / 1e6:.0f} M trilinear samples/s (32 B each); engine forward at "
            f"{rr['engine_forward_fraction_of_bound']:.2f} of the bound ({1 / rr['engine_forward_fraction_of_bound']:.1f}x from it)"
        )
        print(
            f"read-only bandwidth {rr['memory_read_bandwidth_gbs']:.1f} GB/s -> bound "
            f"{rr['read_bandwidth_bound_samples_per_s'] / 1e6:.0f} M samples/s; engine forward "
            f"{1 / rr['engine_forward_fraction_of_read_bound']:.1f}x from it"
        )
        print(f"engine forward: {rr['engine_forward_times_from_bound']:.1f}x from the larger bound")
        speed = rr["engine"]["forward_samples_per_s"] / rr["reference"]["forward_samples_per_s"]
        print(f"engine renderer {speed:.0f}x the reference's samples/s forward")
    e = r.get("refine", {})
    if "time_s" in e:
        print(
            f"2-view refinement, engine   : median {e['time_s']:.2f} s, median mTRE {e['median_mtre_mm']:.3f} mm ({e['n']} cases)"
        )
    if "reference_refine" in r:
        ref = r["reference_refine"]
        print(
            f"2-view refinement, reference: median {ref['time_s']:.2f} s, median mTRE {ref['median_mtre_mm']:.3f} mm ({ref['n']} cases)"
        )
        print(f"speed-up {r['refine_speedup']:.1f}x")
    if "profile" in e:
        p = e["profile"]
        print(
            f"one refinement ({p['iterations']} iterations, {p['total_s']:.2f} s): renderer forward+backward "
            f"{p['render_forward_backward_s']:.2f} s, similarity {p['similarity_s']:.2f} s, optimiser step "
            f"{p['optimiser_step_s']:.2f} s, Newton polish {p['newton_polish_s']:.2f} s, everything else {p['other_s']:.2f} s"
        )
    if "pipeline" in r:
        g = r["pipeline"]
        print(
            f"full 2-view registration (global stage + refinement + acceptance test) from "
            f"{cfg.global_rot_deg:g} deg / {cfg.global_trans_mm:g} mm: median {g['time_s']:.2f} s, median mTRE "
            f"{g['median_mtre_mm']:.3f} mm, success {100 * g['success_rate']:.0f} %, accepted {g['accepted']}/{g['n']}, "
            f"false acceptances {g['false_acceptances']}, false rejections {g['false_rejections']}"
        )
    for key, what in (("tracking", "fast path"), ("tracking_without_fast_path", "without the fast path")):
        if key in r:
            t = r[key]
            print(
                f"tracking update, {what} ({cfg.tracking_rot_deg:g} deg / {cfg.tracking_trans_mm:g} mm moved, "
                f"acceptance test included): median {t['time_s']:.2f} s (refinement {t['refine_time_s']:.2f} s), "
                f"median mTRE {t['median_mtre_mm']:.3f} mm, "
                f"fast {t['fast']}/{t['n']}, fallbacks {t['fallbacks']}, held curvature {t['held_curvature']}/{t['n']}, "
                f"accepted {t['accepted']}/{t['n']}, "
                f"false acceptances {t['false_acceptances']}, false rejections {t['false_rejections']}"
            )
    if "profile" in r.get("tracking", {}):
        p = r["tracking"]["profile"]
        print(
            f"one fast tracking refinement ({p['iterations']} iterations, {p['total_s']:.2f} s): renderer "
            f"forward+backward {p['render_forward_backward_s']:.2f} s, similarity {p['similarity_s']:.2f} s, "
            f"optimiser step {p['optimiser_step_s']:.2f} s, Newton polish {p['newton_polish_s']:.2f} s, everything "
            f"else {p['other_s']:.2f} s"
        )
    if "tracking_speedup" in r:
        print(f"tracking update speed-up from the fast path {r['tracking_speedup']:.1f}x")
    if r["coarse_ms_per_set"] is not None:
        print(f"coarse network: {r['coarse_ms_per_set']:.1f} ms per 2-view set")
    print(f"peak memory {r['peak_memory_mb']:.0f} MB")
    if "big_ct" in r:
        b = r["big_ct"]
        peak = "" if b["peak_rss_mb"] is None else f", peak {b['peak_rss_mb']:.0f} MB"
        print(
            f"big CT {'x'.join(str(n) for n in b['shape_ijk'])} ({b['file_mb']:.0f} MB NIfTI): ready in "
            f"{b['ready_s']:.1f} s (load {b['load_s']:.1f} s, crop + pool {b['prepare_s']:.1f} s, warm-up "
            f"{b['warmup_s']:.1f} s, {b['warmup_graphs_compiled']} kernel graph(s) compiled and "
            f"{b['warmup_graphs_loaded']} loaded from the compile cache; simulating the X-rays {b['views_s']:.1f} s "
            f"not counted); resident {b['rss_mb']:.0f} MB ({b['rss_delta_mb']:+.0f} MB over the "
            f"{b['rss_before_mb']:.0f} MB before loading{peak}); the full-resolution CT is {b['full_resolution_mb']:.0f} MB, "
            f"the engine keeps {'x'.join(str(n) for n in b['engine_volume_shape_ijk'])} voxels (pooled by "
            f"{b['base_factor']}, {b['engine_volume_mb']:.0f} MB with its renderers); warm refinement "
            f"{b['warm_refine_s']:.2f} s, mTRE {b['warm_refine_mtre_mm']:.3f} mm"
        )
    if "train_curve" in r:
        t = r["train_curve"]
        points = ", ".join(f"{q['minutes']:.1f} min {q['val_median_mtre_mm']:.1f} mm" for q in t["points"])
        print(
            f"coarse network trained {t['minutes']:g} min ({t['steps']} steps): held-out median mTRE of the network "
            f"alone on {t['val_sets']} sets: {points}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0
