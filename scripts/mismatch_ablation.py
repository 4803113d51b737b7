"""Which part of the `mismatch` stress profile moves the registration's optimum away from the truth?

Simulates the profile with one factor removed at a time (seed 0, 4 shots, rendered from the CT
pooled by 2), then registers the first 3 consecutive pairs starting AT the truth (no offset, local
refinement only, acceptance test as usual) and prints where the optimum lies (mTRE, mm) and the
similarity reached. A correct similarity model keeps the truth (mTRE well under 2 mm).

    .venv/bin/python scripts/mismatch_ablation.py [VARIANT ...]     (default: all; about 3 min each on 2 cores)
    variants: full, no_slab, no_deform, no_tools, ii_detector, fp_no_shutter_no_gain, full_complete, full_off,
              full_cut, full_64, full_cut_64
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from mvreg_ros.core.data import stress
from mvreg_ros.core.evaluation.evaluate import EvalConfig, run
from mvreg_ros.core.registration.global_search import GlobalConfig
from mvreg_ros.core.registration.pipeline import PipelineConfig
from mvreg_ros.core.registration.refine import RefineConfig

OUT = Path("out/mismatch_ablation")
# an image intensifier instead of the flat panel: the `clean` profile's detector
II_DETECTOR = dict(
    height=256, width=256, pixel_mm=1.164, sdd_mm=1020.0, sid_mm=700.0, fov_radius=0.47,
    shutter_sides=(0, 0), column_gain_std=0.0,
)  # fmt: skip
VARIANTS = {  # name: (profile changes, RefineConfig changes, file reused)
    "full": ({}, {}, None),
    "no_slab": ({"slab_mm": None}, {}, None),
    "no_deform": ({"deform_max_mm": 0.0, "density_change": 0.0, "gas_pockets": 0}, {}, None),
    "no_tools": ({"tools": ()}, {}, None),
    "ii_detector": (II_DETECTOR, {}, None),
    "fp_no_shutter_no_gain": ({"shutter_sides": (0, 0), "column_gain_std": 0.0}, {}, None),
    "full_complete": ({}, {"mask_truncated": "complete"}, "full"),
    "full_off": ({}, {"mask_truncated": "off"}, "full"),
    "full_cut": ({}, {"truncation_extend_mm": 0.0}, "full"),  # the CT rendered as cut, not continued
    "full_64": ({}, {"sizes": (32, 64), "patches": (8, 8)}, "full"),  # the previous finest level
    "full_cut_64": ({}, {"truncation_extend_mm": 0.0, "sizes": (32, 64), "patches": (8, 8)}, "full"),
}


def main(names: list[str]) -> int:
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    ct = stress.load_shipped_ct()
    base = stress.get_profile("mismatch")
    for name in names or list(VARIANTS):
        changes, refine, reuse = VARIANTS[name]
        path = OUT / f"{reuse or name}.h5"
        if not path.exists():
            profile = dataclasses.replace(base, **changes)
            stress.write_profile(path, profile, views=4, seed=0, render_downsample=2, specimen="s0", ct=ct)
        config = EvalConfig(
            max_sets=3,
            perturb_rot_deg=0.0,
            perturb_trans_mm=0.0,
            refine=RefineConfig(**refine),
            pipeline=PipelineConfig(global_search=GlobalConfig(enabled=False)),
        )
        cases = run(path, config)["cases"]
        print(
            f"{name:>22}: optimum mTRE {[round(c['mtre_mm'], 2) for c in cases]} mm, "
            f"similarity {[round(c['similarity'], 3) for c in cases]}, accepted {[c['accepted'] for c in cases]}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
