"""``mvreg register CT X1.dcm [X2.dcm ...]``: register a CT to X-ray views sent as DICOM
(XA, XRF, Enhanced XA/XRF multi-frame, DX/CR) with the engine's pipeline (start, global stage,
refinement, acceptance test). The views' relative geometry comes from their positioner
attributes (:mod:`mvreg_ros.core.data.dicom`); the result is ``T_iso_from_ct`` in the isocentre
frame (table at 0). Exit status 0 only when the acceptance test accepts the result; 1 when it
rejects it (the reason on stderr); 2 for bad options or unreadable input."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "ct", metavar="CT", help="CT in HU (NIfTI, NRRD, MHA, DICOM folder), or example[:N] (the shipped CT)"
    )
    p.add_argument(
        "inputs", nargs="+", metavar="X.dcm", help="DICOM X-ray files, or folders of them (every file in the folder)"
    )
    p.add_argument("--frames", metavar="LIST", help="frames of multi-frame objects, 0-based, e.g. '0,2' (default: all)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", metavar="PATH", help="coarse network checkpoint: start from its estimate")
    g.add_argument("--init-pose", metavar="JSON", help="starting T_iso_from_ct: a JSON 4x4 nested list (mm)")
    p.add_argument("--downsample", type=int, default=1, help="average-pool the CT by this factor first (default: 1)")
    p.add_argument(
        "--sid-mm", type=float, default=None, help="source to isocentre, mm, where the objects lack it (DX/CR)"
    )
    p.add_argument(
        "--patient-position",
        default="HFS",
        help="patient position where PatientPosition is absent (HFS, FFS, HFP, FFP, HFDR, HFDL, FFDR, FFDL; "
        "default: %(default)s; 'none': refuse such objects)",
    )
    p.add_argument(
        "--log-units-per-neper",
        type=float,
        default=None,
        help="LOG images without a Modality LUT: stored units per natural-log unit",
    )
    p.add_argument(
        "--allow-distortion", action="store_true", help="read frames flagged with uncorrected distortion (warns)"
    )
    p.add_argument("--json", metavar="OUT", help="write the result as JSON")
    p.add_argument("--overlay", metavar="DIR", help="write one overlay picture per view into DIR")
    p.add_argument("--no-global", action="store_true", help="local refinement only (the acceptance test still runs)")
    p.add_argument("--quick", action="store_true", help="one short 32 px refinement level (smoke tests)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _fail(message: str, code: int = 2) -> int:
    print(f"mvreg register: error: {message}", file=sys.stderr)
    return code


def parse_frames(text: str) -> list[int]:
    try:
        frames = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--frames looks like '0,2,5', got {text!r}") from None
    if not frames or any(i < 0 for i in frames) or len(set(frames)) != len(frames):
        raise ValueError(f"--frames needs distinct frame numbers >= 0, got {text!r}")
    return frames


def read_init_pose(path: str):
    """The 4x4 rigid ``T_iso_from_ct`` in a JSON file (a nested list, or ``{"T_iso_from_ct": ...}``)."""
    import json
    from pathlib import Path

    import torch

    from mvreg_ros.core.geometry.kinematics import check_rigid

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--init-pose: no such file: {p}")
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--init-pose {p}: not JSON ({e})") from None
    if isinstance(data, dict):
        if "T_iso_from_ct" not in data:
            raise ValueError(f"--init-pose {p}: a JSON object needs the key 'T_iso_from_ct'")
        data = data["T_iso_from_ct"]
    try:
        T = torch.tensor(data, dtype=torch.float64)
    except (TypeError, ValueError):
        raise ValueError(f"--init-pose {p}: must be a 4x4 nested list of numbers") from None
    try:
        return check_rigid(T, f"--init-pose {p}")
    except (TypeError, ValueError) as e:
        raise ValueError(str(e)) from None


def input_files(inputs: list[str]) -> list:
    """Files named, and every file of each folder named (sorted), skipping DICOMDIR."""
    from pathlib import Path

    files = []
    for text in inputs:
        p = Path(text)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.name.upper() != "DICOMDIR")
            if not found:
                raise ValueError(f"{p}: folder holds no file")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"{p}: no such file or folder")
    return files


def _pose_list(T) -> list[list[float]]:
    return [[float(v) for v in row] for row in T.to("cpu").double()]


def run(args: argparse.Namespace) -> int:
    from mvreg_ros.cli.options import options_ok

    if not options_ok("register", args, at_least={"downsample": 1}, above={"sid_mm": 0}):
        return 2
    import math
    import time
    from pathlib import Path

    import torch

    from mvreg_ros.core.data import dicom

    if args.threads:
        torch.set_num_threads(args.threads)
    # everything that can be checked without the CT, first
    try:
        frames = parse_frames(args.frames) if args.frames else None
        position = None if args.patient_position.lower() == "none" else args.patient_position.upper()
        if args.log_units_per_neper is not None and not (
            math.isfinite(args.log_units_per_neper) and args.log_units_per_neper != 0
        ):
            raise ValueError(f"--log-units-per-neper must be a finite non-zero number, got {args.log_units_per_neper}")
        config = dicom.DicomConfig(
            sid_mm=args.sid_mm,
            patient_position=position,
            log_units_per_neper=args.log_units_per_neper,
            allow_distortion=args.allow_distortion,
        )
        T_init = read_init_pose(args.init_pose) if args.init_pose else None
        if args.model and not Path(args.model).is_file():
            raise ValueError(f"--model: coarse network checkpoint not found: {args.model}")
        files = input_files(args.inputs)
        views = []
        for f in files:
            views.extend(dicom.read_views(f, frames=frames, config=config))
    except ValueError as e:
        return _fail(str(e).replace("patient_position", "--patient-position").replace("sid_mm", "--sid-mm"))
    positions = sorted({v.patient_position for v in views})
    if len(positions) > 1:
        return _fail(f"PatientPosition differs between the views ({', '.join(positions)}): one patient, one position")
    sizes = sorted({tuple(v.image.shape) for v in views})
    if len(sizes) > 1:
        return _fail(f"the views must share one image size (Rows, Columns), got {sizes}")

    from mvreg_ros.core.imaging.views import ViewSet
    from mvreg_ros.core.registration.global_search import GlobalConfig
    from mvreg_ros.core.registration.initialisers import (
        CoarseNetworkPose,
        ConfiguredPose,
        ModelError,
        load_coarse_model,
    )
    from mvreg_ros.core.registration.pipeline import PipelineConfig, RegistrationPipeline
    from mvreg_ros.core.registration.refine import RefineConfig, Registrar
    from mvreg_ros.ros.volume_source import load_ct

    try:
        view_set = ViewSet.from_raw(
            torch.stack([v.image for v in views]),
            torch.stack([v.K for v in views]),
            torch.stack([v.T_iso_from_cam for v in views]),
        )
    except ValueError as e:
        return _fail(f"the images cannot be registered: {e}")

    t0 = time.perf_counter()
    try:
        volume = load_ct(args.ct)
        if args.downsample > 1:
            volume = volume.resampled(args.downsample)
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    print(f"CT {args.ct}: {tuple(volume.data.shape)} voxels ({time.perf_counter() - t0:.1f} s to load)")
    for v in views:
        print(
            f"view {v.source}: {v.modality}, orbital {v.orbital_deg:g} deg (+LAO), angular {v.angular_deg:g} deg (+CRA), "
            f"SID {v.sid_mm:g} mm, SDD {v.sdd_mm:g} mm, {v.image.shape[1]}x{v.image.shape[0]} px, {v.patient_position}"
        )

    if args.quick:
        refine = RefineConfig(sizes=(32,), iterations=(60,), n_samples=(48,), patches=(8,), device=args.device)
    else:
        refine = RefineConfig(device=args.device)
    registrar = Registrar(volume, refine)
    default = dicom.default_start(positions[0], registrar.centre_ct)
    if T_init is not None:
        chain, start_name = [ConfiguredPose(T_init)], f"--init-pose {args.init_pose}"
    elif args.model:
        try:
            sids = {f"view {v.source}": v.sid_mm for v in views}
            model = load_coarse_model(args.model, volume, device=args.device, sids_mm=sids)
        except ModelError as e:
            return _fail(str(e).replace("model_path", "--model"))
        chain, start_name = [CoarseNetworkPose(model), ConfiguredPose(default)], f"coarse network {args.model}"
    else:
        chain, start_name = [ConfiguredPose(default)], f"default start ({positions[0]}, anatomy at the isocentre)"
    pipeline = RegistrationPipeline(
        registrar, initialisers=chain, config=PipelineConfig(global_search=GlobalConfig(enabled=not args.no_global))
    )
    outcome = pipeline.register(view_set)
    result, verdict = outcome.result, outcome.verdict
    T = result.T_ref_from_ct.detach().to(torch.float64).cpu()
    print(f"start: {start_name} (used: {outcome.init_source}); stages {', '.join(outcome.stages)}")
    print(
        f"registration: {outcome.time_s:.2f} s, similarity {result.similarity:.3f}, per view "
        f"{[round(s, 3) for s in result.view_similarity]}, uncertainty {result.uncertainty_mm:.2f} mm (1 sigma)"
    )
    print(f"acceptance test: {'accepted' if outcome.accepted else 'REJECTED: ' + outcome.reason}")
    print("T_iso_from_ct (mm):")
    for row in _pose_list(T):
        print("  [" + ", ".join(f"{x:10.4f}" for x in row) + "]")

    if args.json:
        from mvreg_ros.core.evaluation.evaluate import write_json

        report = {
            "ct": args.ct,
            "T_iso_from_ct": _pose_list(T),
            "start": {"source": outcome.init_source, "T_iso_from_ct": _pose_list(outcome.start.T_ref_from_ct)},
            "views": [
                {
                    "file": v.source,
                    "frame": v.frame,
                    "joint_positions": v.joint_positions,
                    "orbital_deg": v.orbital_deg,
                    "angular_deg": v.angular_deg,
                    "table_mm": list(v.table_mm),
                    "sid_mm": v.sid_mm,
                    "sdd_mm": v.sdd_mm,
                    "patient_position": v.patient_position,
                    "K": _pose_list(v.K),
                    "T_iso_from_cam": _pose_list(v.T_iso_from_cam),
                    "similarity": float(s),
                }
                for v, s in zip(views, result.view_similarity)
            ],
            "similarity": float(result.similarity),
            "uncertainty_mm": float(result.uncertainty_mm),
            "stages": list(outcome.stages),
            "time_s": outcome.time_s,
            "accepted": bool(outcome.accepted),
            "reason": outcome.reason,
            "verdict": verdict.to_dict() if verdict is not None else None,
        }
        write_json(report, args.json)
        print(f"wrote {args.json}")

    if args.overlay:
        from mvreg_ros.core.geometry.transforms import invert
        from mvreg_ros.core.imaging.overlay import save_overlay
        from mvreg_ros.core.rendering.renderer import Renderer

        out = Path(args.overlay)
        out.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            T_cam = invert(view_set.T_ref_from_cam) @ T
            drr = Renderer(volume, device=args.device)(T_cam, view_set.K, view_set.height, view_set.width)
        for i in range(len(view_set)):
            path = out / f"overlay_view{i}.png"
            save_overlay(path, view_set.images[i], drr[i].float().cpu(), view_set.masks[i])
            print(f"saved {path} (target | DRR at the estimate | DRR edges on the target)")
    if not outcome.accepted:
        print(f"mvreg register: rejected: {outcome.reason}", file=sys.stderr)
        return 1
    return 0
