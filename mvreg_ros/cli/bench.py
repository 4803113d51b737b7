"""``mvreg bench``: renderer throughput, refinement speed against the reference baseline,
coarse-network inference time and peak memory, on the shipped CT."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--cases", type=int, default=5, help="2-view refinements with the engine")
    p.add_argument("--reference-cases", type=int, default=2, help="... with the reference baseline (slow)")
    p.add_argument("--reference-iterations", type=int, default=150)
    p.add_argument("--model", default=None, help="coarse network checkpoint to time")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "native", "compiled", "grid_sample"),
        help="the engine's renderer backend (default: native on a CPU, compiled on a GPU)",
    )
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from mvreg_ros.cli.options import options_ok

    if not options_ok("bench", args, at_least={"cases": 1, "reference_cases": 1, "reference_iterations": 1}):
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
        model_path=args.model,
        device=args.device,
        seed=args.seed,
        refine=RefineConfig(render_backend=args.backend),
    )
    r = bench(load_example_ct(), cfg)
    rr = r["renderer"]
    print(f"device {r['device']}, {r['torch_threads']} threads, torch {r['versions']['torch']}")
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
    e, ref = r["refine"], r["reference_refine"]
    print(
        f"2-view refinement, engine   : median {e['time_s']:.2f} s, median mTRE {e['median_mtre_mm']:.3f} mm ({e['n']} cases)"
    )
    print(
        f"2-view refinement, reference: median {ref['time_s']:.2f} s, median mTRE {ref['median_mtre_mm']:.3f} mm ({ref['n']} cases)"
    )
    print(f"speed-up {r['refine_speedup']:.1f}x")
    g = r["pipeline"]
    print(
        f"full 2-view registration (global stage + refinement + acceptance test) from "
        f"{cfg.global_rot_deg:g} deg / {cfg.global_trans_mm:g} mm: median {g['time_s']:.2f} s, median mTRE "
        f"{g['median_mtre_mm']:.3f} mm, success {100 * g['success_rate']:.0f} %, accepted {g['accepted']}/{g['n']}, "
        f"false acceptances {g['false_acceptances']}, false rejections {g['false_rejections']}"
    )
    if r["coarse_ms_per_set"] is not None:
        print(f"coarse network: {r['coarse_ms_per_set']:.1f} ms per 2-view set")
    print(f"peak memory {r['peak_memory_mb']:.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0
