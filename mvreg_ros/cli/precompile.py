"""``mvreg precompile``: compile the renderer's kernels once, into torch's compile cache on disk,
so that the first registration of any CT in a later process (the node's configure, ``mvreg
eval``) loads them instead of compiling them. The set-up runs it."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'cuda:N' or 'auto' (default cpu)")
    p.add_argument("--no-overlay", action="store_true", help="skip the overlay's kernels")


def run(args) -> int:
    from mvreg_ros.cli.options import options_ok

    if not options_ok("precompile", args):
        return 2
    from mvreg_ros.core.registration.precompile import precompile
    from mvreg_ros.core.registration.refine import RefineConfig

    report = precompile(refine=RefineConfig(device=args.device), overlay=not args.no_overlay)
    print(report.summary())
    return 0
