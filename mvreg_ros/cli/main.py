"""``mvreg``: the command-line entry point. Each subcommand lives in its own module with
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when used."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("mvreg_ros.cli.demo", "simulate views of the shipped CT, register them, save overlays"),
    "eval": ("mvreg_ros.cli.evaluate", "evaluate registration on a DeepFluoro-layout HDF5 file"),
    "simulate": ("mvreg_ros.cli.simulate", "write a DeepFluoro-layout HDF5 file of simulated acquisitions of a CT"),
    "bench": ("mvreg_ros.cli.bench", "measure renderer, refinement and coarse-network speed"),
    "train": ("mvreg_ros.cli.train", "train the patient-specific coarse pose network"),
    "register": ("mvreg_ros.cli.register", "register a CT to X-ray views sent as DICOM (XA, XRF, Enhanced XA, DX/CR)"),
    "bag": ("mvreg_ros.cli.bag", "simulate rosbags of C-arm acquisitions and evaluate the node by replaying them"),
    "precompile": (
        "mvreg_ros.cli.precompile",
        "compile the renderer's kernels once into the compile cache on disk (the set-up runs it)",
    ),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="mvreg", description="Multi-view 2D/3D CT to X-ray registration")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                continue  # subcommand not available in this build
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
