"""``mvreg precompile``: compile the renderer's kernels once, into torch's compile cache on disk,
so that the first registration of any CT in a later process (the node's configure, ``mvreg
eval``) loads them instead of compiling them. The set-up runs it with the engine's defaults
(those of every shipped node configuration); ``--params-file`` compiles for a node parameter
file's own budgets (``refine_samples``, the global stage, the overlay) and device."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params-file", default=None, help="a node parameter file (e.g. config/biplane.yaml)")
    p.add_argument("--node-name", default="register_node", help="its node section (default register_node)")
    p.add_argument(
        "--device", default=None, help="'cpu', 'cuda', 'cuda:N' or 'auto' (default: the file's device, else cpu)"
    )
    p.add_argument("--no-overlay", action="store_true", help="skip the overlay's kernels")


def settings(args) -> dict:
    """The keyword arguments of ``precompile`` for these options: the engine's defaults, or the
    node configuration of ``--params-file`` (its ``volume_path`` need not be set here)."""
    from mvreg_ros.core.registration.refine import RefineConfig

    if args.params_file is None:
        return {"refine": RefineConfig(device=args.device or "cpu"), "overlay": not args.no_overlay}
    from mvreg_ros.ros.bag_io import read_node_params
    from mvreg_ros.ros.params import build_config

    values = read_node_params(args.params_file, args.node_name)
    if not values.get("volume_path"):
        values["volume_path"] = "example"  # required by the node, unused here: no CT is loaded
    if args.device is not None:
        values["device"] = args.device
    cfg = build_config(values)
    return {"config": cfg.pipeline, "refine": cfg.refine, "overlay": cfg.publish_overlay and not args.no_overlay}


def run(args) -> int:
    import sys

    from mvreg_ros.cli.options import options_ok

    if not options_ok("precompile", args):
        return 2
    try:
        kwargs = settings(args)
    except (OSError, ValueError) as e:
        print(f"mvreg precompile: error: {e}", file=sys.stderr)
        return 2
    from mvreg_ros.core.registration.precompile import precompile

    report = precompile(**kwargs)
    print(report.summary())
    return 0
