"""``mvreg train CT``: train the patient-specific coarse pose network on DRRs of one CT,
or (``--eval-only``) benchmark a trained one on held-out simulated view sets."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "ct",
        metavar="CT_OR_DEEPFLUORO_H5",
        help="CT volume (NIfTI, NRRD, MHA, DICOM folder), a DeepFluoro-layout .h5 file "
        "(only its 'vol' and detector geometry are read), or 'example' (the shipped chest CT)",
    )
    p.add_argument("--specimen", metavar="NAME", help="specimen of a DeepFluoro-layout file (default: the first)")
    p.add_argument("--out", required=True, metavar="MODEL.safetensors", help="checkpoint to write (and resume)")
    p.add_argument(
        "--sid-mm",
        type=float,
        default=None,
        metavar="MM",
        help="the C-arm's source-to-isocentre distance (the network's depth prior; default: the file's "
        "proj-params/source-to-isocenter when it has one, else --config's sid_mm, 700 by default)",
    )
    p.add_argument("--config", metavar="FILE", help="training settings (YAML, see config/train.yaml)")
    p.add_argument("--minutes", type=float, default=None, help="training budget in wall-clock minutes")
    p.add_argument("--steps", type=int, default=None, help="training budget in steps (overrides the time schedule)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", help="continue from --out if it exists (weights, optimiser, time)")
    p.add_argument(
        "--eval-only",
        type=int,
        default=None,
        metavar="N",
        help="do not train: evaluate --out on N held-out simulated 2-view sets (coarse, then refinement)",
    )
    p.add_argument("--no-refine", action="store_true", help="with --eval-only: coarse pose only")
    p.add_argument(
        "--seed", type=int, default=1234, help="seed of the held-out sets for --eval-only (default: %(default)s)"
    )
    p.add_argument("--json", metavar="OUT", help="with --eval-only: write per-set results and the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar (log lines at each validation instead)")


def load_training_volume(source: str, specimen: str | None):
    """Volume and detector overrides from a CT path, a DeepFluoro-layout file or 'example'
    (a DeepFluoro-layout file's source-to-isocentre distance too, when it records one)."""
    from mvreg_ros.core.imaging.volume import load_example_ct, load_volume

    if source == "example":
        return load_example_ct(), {}
    path = Path(source)
    if path.suffix.lower() in (".h5", ".hdf5"):
        from mvreg_ros.core.data.deepfluoro import DeepFluoroFile  # lazily: only for HDF5 inputs

        with DeepFluoroFile(path) as f:
            names = f.specimens()
            if not names:
                raise ValueError(f"{path}: no specimen group in the file")
            name = specimen or names[0]
            if name not in names:
                raise ValueError(f"{path}: no specimen {name!r}; the file has {names}")
            volume = f.volume(name)
            pp = f.proj_params()
        rows, cols = pp["num_rows"], pp["num_cols"]
        pixel = float(pp["pixel_spacing_mm"][1])
        sdd = abs(float(pp["K_df"][0, 0])) * pixel
        # any detector shape: a rectangular one is letterboxed into the square working size
        detector = {"sdd_mm": sdd, "pixel_mm": pixel, "detector_px": int(cols), "detector_rows": int(rows)}
        if pp["sid_mm"] is not None:
            detector["sid_mm"] = float(pp["sid_mm"])
        return volume, detector
    return load_volume(path), {}


def run(args: argparse.Namespace) -> int:
    from mvreg_ros.cli.options import options_ok

    if not options_ok("train", args, at_least={"steps": 1, "eval_only": 1}, above={"minutes": 0, "sid_mm": 0}):
        return 2
    import torch

    from mvreg_ros.core.learning import heldout, training
    from mvreg_ros.core.learning.coarse import CoarseModel
    from mvreg_ros.core.learning.network import CheckpointError
    from mvreg_ros.core.learning.train_config import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        volume, detector = load_training_volume(args.ct, args.specimen)
        if args.eval_only is not None:
            if args.eval_only < 1:
                raise ValueError(f"--eval-only needs a positive number of sets, got {args.eval_only}")
            model = CoarseModel.load(args.out, volume, device=args.device)
            report = heldout.evaluate_heldout(
                model, volume, n_sets=args.eval_only, seed=args.seed, refine=not args.no_refine
            )
            print(json.dumps(report["summary"], indent=1))
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
            return 0
        if args.sid_mm is not None:
            detector["sid_mm"] = args.sid_mm
        elif detector and "sid_mm" not in detector:  # a DeepFluoro-layout file without the distance
            print(
                f"mvreg train: {args.ct} records no source-to-isocentre distance: the network's depth prior is "
                "--config's sid_mm (700 mm by default); give --sid-mm if the C-arm's differs",
                file=sys.stderr,
            )
        config = TrainConfig.from_yaml(args.config, minutes=args.minutes, max_steps=args.steps, **detector)
        training.train(volume, config, args.out, device=args.device, resume=args.resume, progress=not args.quiet)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"mvreg train: error: {e}", file=sys.stderr)
        return 2
    return 0
