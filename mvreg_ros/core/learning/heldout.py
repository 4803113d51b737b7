"""Held-out evaluation of a trained coarse network: simulated detector images -> the network -> the
engine's whole registration (global stage, refinement, acceptance test), scored against the truth."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable

import torch
from torch import Tensor

from mvreg_ros.core.data.simulate import DetectorConfig
from mvreg_ros.core.evaluation import stats
from mvreg_ros.core.evaluation.landmarks import ct_landmarks
from mvreg_ros.core.evaluation.metrics import mtre_mm
from mvreg_ros.core.geometry.pose_sampling import PoseRange, sample_view_sets
from mvreg_ros.core.imaging.volume import Volume
from mvreg_ros.core.learning.train_config import TrainConfig
from mvreg_ros.core.registration.initialisers import CoarseNetworkPose, PoseModel


@dataclasses.dataclass(frozen=True)
class HeldoutSet:
    views: "object"  # ViewSet at detector resolution, from raw simulated images
    T_ref_from_ct: Tensor  # truth (ref = isocentre frame)
    joints_deg: Tensor  # (V, 3): orbital, angular, in-plane


def heldout_sets(
    volume: Volume,
    *,
    centre_ct: Tensor,
    n_sets: int = 30,
    seed: int = 1234,
    n_views: int = 2,
    pose_range: PoseRange = PoseRange(),
    detector: DetectorConfig = DetectorConfig(),
    acquisition_downsample: int = 2,
) -> list[HeldoutSet]:
    """Held-out simulated view sets over the whole range (independent seed): raw detector images
    from ``simulate.acquire`` (noise, scatter, circular field of view) on a CT pooled by
    ``acquisition_downsample``, preprocessed by ``ViewSet.from_raw`` as real images are."""
    from mvreg_ros.core.data.simulate import AcquisitionConfig, acquire
    from mvreg_ros.core.imaging.views import ViewSet
    from mvreg_ros.core.rendering.renderer import Renderer

    g = torch.Generator().manual_seed(seed)
    geo = sample_view_sets(n_sets, n_views, centre_ct=centre_ct, pose_range=pose_range, generator=g)
    renderer = Renderer(volume.resampled(acquisition_downsample), n_samples=256)
    K = detector.K().expand(n_views, 3, 3).clone()
    out = []
    for b in range(n_sets):
        raw = acquire(
            renderer, geo.T_cam_from_ct[b], K, detector.height, detector.width, config=AcquisitionConfig(), generator=g
        )
        out.append(
            HeldoutSet(
                views=ViewSet.from_raw(raw, K, geo.T_ref_from_cam[b]),
                T_ref_from_ct=geo.T_ref_from_ct[b],
                joints_deg=geo.joints_deg[b],
            )
        )
    return out


def evaluate_heldout(
    model: PoseModel,  # a CoarseModel; anything with its predict(), metadata and geometry
    volume: Volume,
    *,
    n_sets: int = 30,
    seed: int = 1234,
    n_views: int = 2,
    sets: list[HeldoutSet] | None = None,
    refine: bool = True,
    refine_config=None,
    pipeline_config=None,
    success_mm: float = 2.0,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Coarse mTRE on held-out simulated view sets (:func:`heldout_sets`, drawn with the
    model's training range and detector), then the engine's whole registration from the coarse
    network alone (no starting pose given: :class:`RegistrationPipeline` with the network as its only
    initialiser, the global stage, refinement and the acceptance test), with success (refined mTRE
    <= ``success_mm``), acceptance and false acceptances (accepted above ``success_mm``)."""
    from mvreg_ros.core.evaluation.evaluate import acceptance_counts
    from mvreg_ros.core.registration.pipeline import PipelineConfig, RegistrationPipeline
    from mvreg_ros.core.registration.refine import RefineConfig, Registrar

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    cfg = TrainConfig.from_dict(model.metadata["config"]) if model.metadata.get("config") else TrainConfig()
    if sets is None:
        sets = heldout_sets(
            volume,
            centre_ct=torch.tensor(model.geometry.centre_ct),
            n_sets=n_sets,
            seed=seed,
            n_views=n_views,
            pose_range=cfg.pose_range,
            detector=cfg.detector,
        )
    chosen = ct_landmarks(volume)
    landmarks = chosen.points_ct
    network = CoarseNetworkPose(model)
    pipeline = None
    if refine:
        registrar = Registrar(volume, refine_config or RefineConfig())
        pipeline = RegistrationPipeline(registrar, initialisers=[network], config=pipeline_config or PipelineConfig())
    rows = []
    for b, hs in enumerate(sets):
        est = model.predict(hs.views)
        row = {
            "set": b,
            "joints_deg": [[round(float(x), 1) for x in j] for j in hs.joints_deg],
            "coarse_mtre_mm": mtre_mm(est.T_ref_from_ct, hs.T_ref_from_ct, landmarks),
            "coarse_ms": est.ms,
            "inliers": [bool(x) for x in est.inliers],
        }
        if pipeline is not None:
            out = pipeline.register(hs.views)
            row["mtre_mm"] = mtre_mm(out.result.T_ref_from_ct, hs.T_ref_from_ct, landmarks)
            row["success"] = row["mtre_mm"] <= success_mm
            row.update(
                {
                    "accepted": bool(out.accepted),
                    "false_acceptance": bool(out.accepted and not row["success"]),
                    "time_s": out.time_s,
                    "stages": list(out.stages),
                    "reason": out.reason,
                }
            )
        rows.append(row)
        log(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))
    coarse = [r["coarse_mtre_mm"] for r in rows]
    summary = {
        "n_sets": len(rows),
        "n_views": len(sets[0].views),
        "seed": seed,
        "landmarks": chosen.describe(),
        "coarse_median_mtre_mm": stats.median(coarse),
        "coarse_mean_mtre_mm": stats.summary(coarse)["mean"],
        "coarse_under_10mm": sum(x < 10 for x in coarse) / len(coarse),
        "coarse_under_20mm": sum(x < 20 for x in coarse) / len(coarse),
        "coarse_median_ms": stats.median(r["coarse_ms"] for r in rows),
    }
    if pipeline is not None:
        refined = [r["mtre_mm"] for r in rows]
        summary.update(
            {
                "refined_median_mtre_mm": stats.median(refined),
                "success_rate": sum(r["success"] for r in rows) / len(rows),
                "success_mm": success_mm,
                "median_time_s": stats.median(r["time_s"] for r in rows),
                **acceptance_counts(rows),
            }
        )
    return {"summary": summary, "rows": rows}
