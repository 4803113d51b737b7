#!/usr/bin/env python3
"""Two settings of one RefineConfig field (or Renderer attribute), engine against engine (README *Speed*).

Two engines on the shipped CT in one process, differing only in ``--field`` (``--values A B``): a
``RefineConfig`` field, or ``renderer.NAME`` for an attribute of the engine's renderers. They run
case by case in turn (the order alternating, so a load that changes during the run weighs on both
alike) on the bench's cases (`mvreg bench`'s views and seeds):
1. local 2-view refinements from 10 deg / 20 mm;
2. tracking updates (sets moved 1 deg / 2 mm from the held pose, a tracking start; the acceptance test);
3. full registrations (global stage, refinement, acceptance test) from 15 deg / 30 mm.
Prints and writes the median times, whether every result (pose, covariance, verdict) is the same
bit for bit (``torch.equal``), as it must be for the settings that change only how the work is done,
and the largest difference between the two arms' poses of one case (mTRE on the bench's landmarks):

    # every ray against the read pixels' rays only (RefineConfig.render_read_only)
    .venv/bin/python scripts/engine_ab.py OUT.json --field render_read_only --values false true
    # the plain volume layout against bricks for volumes larger than the caches (RefineConfig.volume_layout)
    .venv/bin/python scripts/engine_ab.py OUT.json --field volume_layout --values plain auto
    # the native kernel without and with its prefetch in bricked volumes (Renderer.prefetch)
    .venv/bin/python scripts/engine_ab.py OUT.json --field renderer.prefetch --values false true
    # the twist's gradient by autograd through its operations against written out (geometry/twist.py);
    # the gradients differ by rounding, so the results are not the same bit for bit: see same_verdicts
    .venv/bin/python scripts/engine_ab.py OUT.json --field pose_about --values reference written
    # the pose chain (twist to pose to T_index_from_cam) as ATen operations against the native extension's
    # (rendering/pose_chain.py); values differ by rounding: see same_verdicts
    .venv/bin/python scripts/engine_ab.py OUT.json --field pose_chain --values aten native

Options: ``--cases 6`` (refinements and full registrations), ``--tracking-cases 16``.
"""

import argparse
import json
import time

import torch

from mvreg_ros.core.evaluation import benchmark, stats
from mvreg_ros.core.evaluation.landmarks import ct_landmarks
from mvreg_ros.core.evaluation.metrics import mtre_mm
from mvreg_ros.core.geometry import twist
from mvreg_ros.core.imaging.volume import example_ct_path, load_volume
from mvreg_ros.core.registration import global_search, refine
from mvreg_ros.core.registration.initialisers import Start
from mvreg_ros.core.registration.pipeline import RegistrationPipeline
from mvreg_ros.core.registration.refine import RefineConfig, Registrar
from mvreg_ros.core.rendering import renderer as renderer_module
from mvreg_ros.core.rendering.renderer import Renderer

RENDERER = "renderer."  # --field renderer.NAME: an attribute of the engine's renderers
# --field pose_about | pose_chain: the engine's functions of the pose chain, (twist, T_index_from_cam)
CHAIN = {
    "pose_about": {
        "reference": (twist.pose_about_reference, renderer_module.index_from_cam_reference),
        "written": (twist.pose_about_written, renderer_module.index_from_cam_reference),
    },
    "pose_chain": {
        "aten": (twist.pose_about_written, renderer_module.index_from_cam_reference),
        "native": (twist.pose_about, renderer_module.index_from_cam),
    },
}


def _value(field: str, text: str):
    """``text`` as the type of RefineConfig's ``field`` (bool, int, float or str); a renderer attribute's
    as a bool (true / false) or else a number."""
    if field in CHAIN:
        if text not in CHAIN[field]:
            raise SystemExit(f"{field} takes one of {sorted(CHAIN[field])}, got {text!r}")
        return text
    if field.startswith(RENDERER):
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        return float(text) if "." in text else int(text)
    default = getattr(RefineConfig(), field)
    if isinstance(default, bool):
        if text.lower() not in ("true", "false"):
            raise SystemExit(f"{field} takes true or false, got {text!r}")
        return text.lower() == "true"
    return type(default)(text)


def _engine(volume, field: str, value) -> Registrar:
    """A Registrar with RefineConfig's ``field`` set to ``value``, or with renderers whose attribute is
    (``pose_about``, ``pose_chain``: the default engine; :func:`_use` sets the functions before each call)."""
    if field in CHAIN:
        return Registrar(volume, RefineConfig())
    if not field.startswith(RENDERER):
        return Registrar(volume, RefineConfig(**{field: value}))
    name = field[len(RENDERER) :]

    class Set(Renderer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            setattr(self, name, value)

    return Registrar(volume, RefineConfig(), renderer_cls=Set)


def _use(field: str, value) -> None:
    """``--field pose_about | pose_chain``: the engine's pose chain (refinement and global stage) for the next call."""
    if field in CHAIN:
        refine.pose_about = global_search.pose_about = CHAIN[field][value][0]
        renderer_module.index_from_cam = CHAIN[field][value][1]


def _same(a, b) -> bool:
    """The same pose, covariance and verdict, bit for bit."""
    ra, rb = getattr(a, "result", a), getattr(b, "result", b)
    cov_same = (ra.covariance is None and rb.covariance is None) or (
        ra.covariance is not None and rb.covariance is not None and torch.equal(ra.covariance, rb.covariance)
    )
    return (
        torch.equal(ra.T_ref_from_ct, rb.T_ref_from_ct)
        and cov_same
        and getattr(a, "accepted", None) == getattr(b, "accepted", None)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="JSON to write")
    ap.add_argument("--field", required=True, help="a RefineConfig field, or renderer.NAME (a Renderer attribute)")
    ap.add_argument("--values", nargs=2, required=True, metavar=("A", "B"), help="its two settings")
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--tracking-cases", type=int, default=16)
    args = ap.parse_args()
    if not (args.field in CHAIN or args.field.startswith(RENDERER) or hasattr(RefineConfig(), args.field)):
        raise SystemExit(f"RefineConfig has no field {args.field!r}")
    ARMS = {f"{args.field}={v}": _value(args.field, v) for v in args.values}
    cfg = benchmark.BenchConfig(cases=args.cases, tracking_cases=args.tracking_cases)
    volume = load_volume(example_ct_path())
    scene, views, inits = benchmark._cases(volume, 2, cfg, args.cases)
    sets = benchmark.tracking_sets(volume, scene, cfg, args.tracking_cases)
    far = benchmark.far_starts(volume, scene, cfg, args.cases)
    engines = {arm: _engine(volume, args.field, v) for arm, v in ARMS.items()}
    pipelines = {arm: RegistrationPipeline(e, initialisers=[]) for arm, e in engines.items()}

    def tracking_start() -> Start:
        return Start(T_ref_from_ct=scene.T_ref_from_ct.clone(), source="last_accepted", tracking=True)

    runs = {
        "refine": (inits, lambda arm, T: engines[arm].refine(views, T)),
        "tracking": (sets, lambda arm, s: pipelines[arm].register_from(s[1], tracking_start())),
        "full": (far, lambda arm, T: pipelines[arm].register_from(views, Start(T_ref_from_ct=T, source="perturb"))),
    }
    for arm in ARMS:  # warm: the shapes of each kind compiled and cached
        _use(args.field, ARMS[arm])
        runs["refine"][1](arm, inits[0])
        runs["tracking"][1](arm, sets[0])
    out = {"field": args.field, "values": list(ARMS.values()), "times_s": {}, "median_s": {}, "identical": {}}
    out["same_verdicts"] = {}  # the acceptance test's verdicts (tracking and full; a refinement has none)
    out["max_difference_mm"] = {}  # the largest mTRE between the two arms' results of one case (benchmark landmarks)
    landmarks = ct_landmarks(volume).points_ct
    for kind, (cases, call) in runs.items():
        times = {arm: [] for arm in ARMS}
        identical, verdicts, differences = True, True, []
        for i, case in enumerate(cases):
            results = {}
            for arm in list(ARMS) if i % 2 == 0 else list(ARMS)[::-1]:
                _use(args.field, ARMS[arm])
                t = time.perf_counter()
                results[arm] = call(arm, case)
                times[arm].append(time.perf_counter() - t)
            identical &= _same(*results.values())
            poses = [getattr(r, "result", r).T_ref_from_ct for r in results.values()]
            differences.append(mtre_mm(poses[0], poses[1], landmarks))
            verdicts &= len({getattr(r, "accepted", None) for r in results.values()}) == 1
        out["times_s"][kind] = times
        out["median_s"][kind] = {arm: stats.median(t) for arm, t in times.items()}
        out["identical"][kind] = identical
        out["same_verdicts"][kind] = verdicts
        out["max_difference_mm"][kind] = max(differences)
        medians = {arm: round(m, 3) for arm, m in out["median_s"][kind].items()}
        print(
            kind,
            medians,
            "identical:",
            identical,
            "same verdicts:",
            verdicts,
            f"largest difference {max(differences):.2g} mm",
            flush=True,
        )
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
