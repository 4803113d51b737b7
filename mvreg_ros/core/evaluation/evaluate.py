"""Registration benchmark on DeepFluoro-layout files.

Each case is a set of projections of one specimen. The reference frame is the first view's
camera, so the truth is ``T_ref_from_ct = T_cam0_from_ct`` and the other cameras are known
relative to it (optionally corrupted by a geometry error). An :class:`Initialiser` gives the
starting pose, :class:`~.refine.Registrar` refines it, and the case reports the 3D mTRE over
the specimen's ``vol-landmarks``, the mean projection distance at the detector, the time,
and the estimates as the first view's ``cam-to-pelvis-vol`` in the file's own convention, so
any tool can recompute the errors from the file."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.data.deepfluoro import DeepFluoroFile, Projection, views_from_projections
from mvreg_ros.core.evaluation import stats
from mvreg_ros.core.evaluation.landmarks import file_landmarks
from mvreg_ros.core.evaluation.metrics import mpd_mm, mtre_mm, pose_errors
from mvreg_ros.core.geometry.transforms import cam_to_pelvis_vol_from_T, perturb, transform_points
from mvreg_ros.core.imaging.footprint import target_labels
from mvreg_ros.core.imaging.volume import Volume
from mvreg_ros.core.registration.initialisers import CoarseNetworkPose, Initialiser, PerturbedTruth, check_model_sid
from mvreg_ros.core.registration.pipeline import PipelineConfig, RegistrationPipeline
from mvreg_ros.core.registration.refine import RefineConfig, Registrar

INITIALISERS = ("perturb", "network")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how. ``view_sets=None``: every pair of consecutive projections;
    ``max_sets`` caps the sets per specimen; ``specimens=None``: every specimen in the file."""

    specimens: tuple[str, ...] | None = None
    view_sets: tuple[tuple[int, ...], ...] | None = None
    max_sets: int | None = None
    init: str = "perturb"  # "perturb" (truth + exact error) or "network" (coarse model, later issue)
    model: str | None = None  # the coarse network's checkpoint, for init="network"
    perturb_rot_deg: float = 10.0
    perturb_trans_mm: float = 20.0
    seed: int = 0
    geometry_noise_deg: float = 0.0  # error of each non-first camera pose, exact, random axis
    geometry_noise_mm: float = 0.0  # ... and exact translation, random direction
    success_mm: float = 2.0  # a case succeeds when its mTRE is at most this
    i0: float | None = None  # unattenuated intensity; None: estimated per image
    bone_only: bool = False
    refine: RefineConfig = RefineConfig()
    pipeline: PipelineConfig = PipelineConfig()  # global stage and acceptance test
    target: str | None = None  # register the structures of vol-seg whose names start with this (None: the whole CT)

    def __post_init__(self):
        if self.init not in INITIALISERS:
            raise ValueError(f"init must be one of {INITIALISERS}, got {self.init!r}")
        for name in ("perturb_rot_deg", "perturb_trans_mm", "geometry_noise_deg", "geometry_noise_mm"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.success_mm <= 0:
            raise ValueError(f"success_mm must be positive, got {self.success_mm}")
        if self.max_sets is not None and self.max_sets < 1:
            raise ValueError(f"max_sets must be >= 1, got {self.max_sets}")
        if self.view_sets is not None:
            if len(self.view_sets) == 0:
                raise ValueError("view_sets is empty")
            for vs in self.view_sets:
                if len(vs) == 0 or len(set(vs)) != len(vs) or any(not isinstance(i, int) or i < 0 for i in vs):
                    raise ValueError(f"a view set must hold distinct non-negative projection indices, got {vs}")


def parse_view_sets(text: str) -> tuple[tuple[int, ...], ...]:
    """``"0,1;2,5,7"`` -> ``((0, 1), (2, 5, 7))``."""
    sets = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        try:
            sets.append(tuple(int(x) for x in part.split(",")))
        except ValueError:
            raise ValueError(f"view sets look like '0,1;2,5,7', got {text!r}") from None
    if not sets:
        raise ValueError(f"no view set in {text!r}")
    return tuple(sets)


def make_initialiser(config: EvalConfig, volume: Volume, *, sid_mm: float | None = None) -> Initialiser:
    """The initialiser named by ``config.init`` for one specimen's CT (the engine's own
    initialisers: :mod:`.registration.initialisers`); ``sid_mm``, the file's source-to-isocentre
    distance when it records one, is checked against the network's."""
    if config.init == "perturb":
        return PerturbedTruth(rot_deg=config.perturb_rot_deg, trans_mm=config.perturb_trans_mm, seed=config.seed)
    if config.init == "network":
        if config.model is None:
            raise ValueError("network initialisation needs --model PATH (a trained coarse pose network)")
        if not Path(config.model).exists():
            raise FileNotFoundError(f"coarse model not found: {config.model}")
        from mvreg_ros.core.learning.coarse import CoarseModel

        # refuses a checkpoint trained for another CT, or for another source-to-isocentre distance
        model = CoarseModel.load(config.model, volume=volume, device=config.refine.device)
        if sid_mm is not None:
            check_model_sid(
                model.geometry.sid_mm, {"the file's C-arm": sid_mm}, what=f"the coarse network {config.model}"
            )
        return CoarseNetworkPose(model)
    raise ValueError(f"unknown initialiser {config.init!r}")


# ---------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------


def perturb_cameras(
    T_ref_from_cam: Float[Tensor, "V 4 4"],
    T_ref_from_ct: Float[Tensor, "4 4"],
    centre_ct: Float[Tensor, "3"],
    *,
    rot_deg: float,
    trans_mm: float,
    generator: torch.Generator,
) -> Float[Tensor, "V 4 4"]:
    """Known camera poses with a calibration error: every non-first camera is rotated by
    exactly ``rot_deg`` about a random axis through the anatomy centre, then moved by exactly
    ``trans_mm`` in a random direction. The first camera is the reference and stays exact."""
    out = T_ref_from_cam.clone()
    if rot_deg == 0 and trans_mm == 0:
        return out
    c_ref = transform_points(T_ref_from_ct, centre_ct.to(T_ref_from_ct)[None])[0]
    for k in range(1, len(out)):
        c_cam = transform_points(torch.linalg.inv(out[k]), c_ref[None])[0]
        out[k] = perturb(out[k], rot_deg=rot_deg, trans_mm=trans_mm, centre_ct=c_cam, generator=generator)
    return out


def default_view_sets(n_projections: int) -> tuple[tuple[int, ...], ...]:
    """Every pair of consecutive projections."""
    if n_projections < 2:
        return ((0,),) if n_projections == 1 else ()
    return tuple((i, i + 1) for i in range(n_projections - 1))


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _pose_list(T: Tensor) -> list[list[float]]:
    return [[float(v) for v in row] for row in T.to(torch.float64).cpu()]


def evaluate_case(
    pipeline: RegistrationPipeline,
    projections: Sequence[Projection],
    *,
    extrinsic: Tensor,
    landmarks_ct: Tensor,
    centre_ct: Tensor,
    config: EvalConfig,
    noise_generator: torch.Generator,
) -> dict:
    """Register one view set through the engine's pipeline (start, global stage, refinement,
    acceptance test) and measure it; returns the case's JSON record."""
    views, T_true = views_from_projections(projections, i0=config.i0)
    T_true_ref_from_cam = views.T_ref_from_cam
    known = perturb_cameras(
        T_true_ref_from_cam,
        T_true,
        centre_ct,
        rot_deg=config.geometry_noise_deg,
        trans_mm=config.geometry_noise_mm,
        generator=noise_generator,
    )
    views = dataclasses.replace(views, T_ref_from_cam=known)
    specimen, indices = projections[0].specimen, tuple(p.index for p in projections)
    outcome = pipeline.register(views, T_true_ref_from_ct=T_true)
    result, start, verdict = outcome.result, outcome.start, outcome.verdict
    T_est = result.T_ref_from_ct.to(torch.float64)
    pixel_mm = torch.tensor([p.pixel_mm for p in projections], dtype=torch.float64)

    def mpd(T: Tensor) -> float:  # at the true detectors
        return mpd_mm(T, T_true, landmarks_ct, views.K, T_true_ref_from_cam, pixel_mm)

    mtre = mtre_mm(T_est, T_true, landmarks_ct)
    rot_err, trans_err = pose_errors(T_est, T_true, centre_ct)
    success = bool(mtre <= config.success_mm)
    record = {
        "specimen": specimen,
        "views": list(indices),
        "mtre_mm": mtre,
        "mpd_mm": mpd(T_est),
        "success": success,
        "success_mm": config.success_mm,
        "accepted": bool(outcome.accepted),
        "false_acceptance": bool(outcome.accepted and not success),
        "time_s": outcome.time_s,
        "stages": list(outcome.stages),
        "init_mtre_mm": mtre_mm(start.T_ref_from_ct, T_true, landmarks_ct),
        "init_mpd_mm": mpd(start.T_ref_from_ct),
        "rot_err_deg": rot_err,
        "trans_err_mm": trans_err,
        "pose_true": _pose_list(projections[0].cam_to_pelvis_vol),
        "pose_init": _pose_list(cam_to_pelvis_vol_from_T(extrinsic, start.T_ref_from_ct)),
        "pose_est": _pose_list(cam_to_pelvis_vol_from_T(extrinsic, T_est)),
        "registration_success": bool(result.success),
        "reason": outcome.reason,
        "converged": bool(result.converged),
        "similarity": _finite(result.similarity),
        "view_similarity": [_finite(s) for s in result.view_similarity],
        "uncertainty_mm": _finite(result.uncertainty_mm),
        "curvature_scale": float(result.curvature_scale),
        "view_shift_mm": [_finite(s) for s in verdict.view_shift_mm],
        "view_gain": [_finite(s) for s in verdict.view_gain],
        "margin": None if verdict.margin is None else _finite(verdict.margin),
        "confirm_shift_mm": None if verdict.confirm_shift_mm is None else _finite(verdict.confirm_shift_mm),
        "confirm_gain": None if verdict.confirm_gain is None else _finite(verdict.confirm_gain),
        "iterations": int(result.iterations),
    }
    if outcome.global_result is not None:
        record["global_mtre_mm"] = mtre_mm(outcome.global_result.best, T_true, landmarks_ct)
        record["global_time_s"] = outcome.global_result.time_s
    if start.T_coarse_ref_from_ct is not None:
        record["pose_coarse"] = _pose_list(cam_to_pelvis_vol_from_T(extrinsic, start.T_coarse_ref_from_ct))
        record["coarse_mtre_mm"] = mtre_mm(start.T_coarse_ref_from_ct, T_true, landmarks_ct)
    return record


def _stats(values: Sequence[float | None]) -> dict:
    """mean, median and p95 of the values that exist (:func:`stats.summary`)."""
    s = stats.summary(v for v in values if v is not None)
    return {k: s[k] for k in ("mean", "median", "p95")}


def acceptance_counts(cases: Sequence[dict]) -> dict:
    """How the acceptance test did: ``false_acceptances`` (accepted, yet mTRE above the success
    threshold: the count that must be 0), ``false_rejections`` (rejected successes), and the
    true acceptance rate among the successes."""
    ok = [c for c in cases if c["success"]]
    accepted = sum(c["accepted"] for c in cases)
    return {
        "accepted": accepted,
        "false_acceptances": sum(c["accepted"] and not c["success"] for c in cases),
        "false_rejections": sum(c["success"] and not c["accepted"] for c in cases),
        "true_acceptance_rate": (sum(c["accepted"] for c in ok) / len(ok)) if ok else None,
    }


def summarise(cases: Sequence[dict]) -> dict:
    n = len(cases)
    times = [c["time_s"] for c in cases]
    return {
        "n": n,
        "mtre_mm": _stats([c["mtre_mm"] for c in cases]),
        "mpd_mm": _stats([c["mpd_mm"] for c in cases]),
        "init_mtre_mm": _stats([c["init_mtre_mm"] for c in cases]),
        **(
            {
                "coarse_mtre_mm": _stats([c["coarse_mtre_mm"] for c in cases]),
                "coarse_success_rate": sum(c["coarse_mtre_mm"] <= c["success_mm"] for c in cases) / n,
            }
            if n and all("coarse_mtre_mm" in c for c in cases)
            else {}
        ),
        "success_rate": (sum(c["success"] for c in cases) / n) if n else None,
        **acceptance_counts(cases),
        "time_s": {"median": stats.median(times), "mean": stats.summary(times)["mean"]},
    }


def run(path: str | Path, config: EvalConfig = EvalConfig(), *, progress: Callable[[dict], None] | None = None) -> dict:
    """Evaluate every selected view set of every selected specimen; returns
    ``{"file", "config", "render_backends", "cases": [...], "summary": {...}}``."""
    path = Path(path)
    cases: list[dict] = []
    landmark_sets: dict[str, dict] = {}
    backends: set[str] = set()
    with DeepFluoroFile(path) as f:
        specimens = list(config.specimens) if config.specimens else f.specimens()
        if not specimens:
            raise ValueError(f"{path}: holds no specimen")
        E = f.extrinsic
        for specimen in specimens:
            indices = f.projection_indices(specimen)
            sets = config.view_sets if config.view_sets is not None else default_view_sets(len(indices))
            known = set(indices)
            for vs in sets:
                missing = [i for i in vs if i not in known]
                if missing:
                    raise ValueError(
                        f"{path}: specimen {specimen} has no projection {missing} "
                        f"(it has {len(indices)}: {indices[0]}..{indices[-1]})"
                    )
            if config.max_sets is not None:
                sets = sets[: config.max_sets]
            if not sets:
                continue
            landmarks = file_landmarks(*f.landmarks(specimen))
            landmark_sets[specimen] = landmarks.describe()
            landmarks_ct = landmarks.points_ct
            volume = f.volume(specimen, bone_only=config.bone_only, with_mask=config.target is not None)
            centre_ct = volume.centre_ct().to(torch.float64)
            refine = config.refine
            if config.target is not None:
                try:
                    labels = target_labels(f.label_names(specimen), config.target, mask=volume.mask)
                except ValueError as e:
                    raise ValueError(f"{path}: specimen {specimen}: --target: {e}") from None
                refine = dataclasses.replace(refine, target_labels=labels)
            registrar = Registrar(volume, refine)
            pipeline = RegistrationPipeline(
                registrar,
                initialisers=[make_initialiser(config, volume, sid_mm=f.proj_params()["sid_mm"])],
                config=config.pipeline,
            )
            noise_generator = torch.Generator().manual_seed(int(config.seed) + 1)
            for vs in sets:
                record = evaluate_case(
                    pipeline,
                    [f.projection(specimen, i) for i in vs],
                    extrinsic=E,
                    landmarks_ct=landmarks_ct,
                    centre_ct=centre_ct,
                    config=config,
                    noise_generator=noise_generator,
                )
                cases.append(record)
                if progress is not None:
                    progress(record)
            backends.update(registrar.render_backends)
    return {
        "file": str(path),
        "config": config_dict(config),
        "render_backends": sorted(backends),
        "landmarks": landmark_sets,  # per specimen: the landmark policy and count behind every mTRE
        "cases": cases,
        "summary": summarise(cases),
    }


def config_dict(config: EvalConfig) -> dict:
    d = dataclasses.asdict(config)
    d["refine"] = dataclasses.asdict(config.refine)
    d["pipeline"] = dataclasses.asdict(config.pipeline)
    return d


def write_json(report: dict, path: str | Path) -> None:
    """Strict JSON (non-finite numbers become null)."""

    def clean(x):
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    Path(path).write_text(json.dumps(clean(report), indent=1, allow_nan=False) + "\n")


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def format_case(c: dict) -> str:
    views = ",".join(str(i) for i in c["views"])
    ok = "yes" if c["success"] else "no"
    acc = ("FALSE" if c["false_acceptance"] else "yes") if c["accepted"] else "no"
    return (
        f"{c['specimen']:>10} {views:>9} {_fmt(c['init_mtre_mm']):>9} {_fmt(c['mtre_mm']):>9} {_fmt(c['mpd_mm']):>8} "
        f"{_fmt(c['similarity'], '.3f'):>6} {_fmt(c['uncertainty_mm']):>7} {_fmt(c['time_s'], '.1f'):>7} {ok:>4} {acc:>5}"
        + (f"  {c['reason']}" if c["reason"] else "")
    )


TABLE_HEADER = (
    f"{'specimen':>10} {'views':>9} {'init mTRE':>9} {'mTRE mm':>9} {'mPD mm':>8} {'sim':>6} "
    f"{'unc mm':>7} {'time s':>7} {'ok':>4} {'acc':>5}"
)


def format_summary(summary: dict, success_mm: float = 2.0) -> str:
    m, p, i = summary["mtre_mm"], summary["mpd_mm"], summary["init_mtre_mm"]
    rate = summary["success_rate"]
    return "\n".join(
        [
            f"cases: {summary['n']}",
            f"mTRE mm   mean {_fmt(m['mean'])}  median {_fmt(m['median'])}  p95 {_fmt(m['p95'])}"
            f"   (initial: mean {_fmt(i['mean'])}  median {_fmt(i['median'])})",
            f"mPD mm    mean {_fmt(p['mean'])}  median {_fmt(p['median'])}  p95 {_fmt(p['p95'])}",
            f"success (mTRE <= {success_mm:g} mm): {_fmt(None if rate is None else 100 * rate, '.1f')} %",
            f"accepted {summary['accepted']}/{summary['n']}: false acceptances (accepted, mTRE > {success_mm:g} mm) "
            f"{summary['false_acceptances']}, false rejections {summary['false_rejections']}, true acceptance "
            f"{_fmt(None if summary['true_acceptance_rate'] is None else 100 * summary['true_acceptance_rate'], '.1f')} %",
            f"time s    median {_fmt(summary['time_s']['median'], '.1f')}  mean {_fmt(summary['time_s']['mean'], '.1f')}",
        ]
        + (
            [
                f"coarse network alone: mTRE mm mean {_fmt(summary['coarse_mtre_mm']['mean'])}  median "
                f"{_fmt(summary['coarse_mtre_mm']['median'])}  p95 {_fmt(summary['coarse_mtre_mm']['p95'])}, "
                f"success {_fmt(100 * summary['coarse_success_rate'], '.1f')} %"
            ]
            if "coarse_mtre_mm" in summary
            else []
        )
    )


def format_table(report: dict) -> str:
    lines = [TABLE_HEADER] + [format_case(c) for c in report["cases"]]
    return "\n".join(lines) + "\n\n" + format_summary(report["summary"], report["config"]["success_mm"])


CAPTURE_OFFSETS = ((5.0, 10.0), (10.0, 20.0), (15.0, 30.0), (20.0, 40.0), (30.0, 60.0))


def capture_range(
    path: str | Path,
    config: EvalConfig = EvalConfig(),
    *,
    offsets: Sequence[tuple[float, float]] = CAPTURE_OFFSETS,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Success and false acceptances against the starting offset: one :func:`run` per
    (degrees, mm) offset, same view sets and seed. Returns ``{"offsets": [{"rot_deg",
    "trans_mm", "summary"}, ...], "reports": [...]}``."""
    rows, reports = [], []
    for rot, trans in offsets:
        cfg = dataclasses.replace(config, init="perturb", perturb_rot_deg=float(rot), perturb_trans_mm=float(trans))
        report = run(path, cfg, progress=progress)
        reports.append(report)
        rows.append({"rot_deg": float(rot), "trans_mm": float(trans), "summary": report["summary"]})
    return {"file": str(path), "offsets": rows, "reports": reports}


def format_capture_range(capture: dict) -> str:
    lines = [
        f"{'start offset':>16} {'n':>4} {'success':>8} {'median mTRE':>12} {'accepted':>9} {'false acc':>10} "
        f"{'false rej':>10} {'median s':>9}"
    ]
    for row in capture["offsets"]:
        s = row["summary"]
        lines.append(
            f"{row['rot_deg']:>6g} deg/{row['trans_mm']:>4g} mm {s['n']:>4} "
            f"{_fmt(None if s['success_rate'] is None else 100 * s['success_rate'], '.1f'):>7}% "
            f"{_fmt(s['mtre_mm']['median']):>9} mm {s['accepted']:>9} {s['false_acceptances']:>10} "
            f"{s['false_rejections']:>10} {_fmt(s['time_s']['median']):>9}"
        )
    return "\n".join(lines)


def plot_capture_range(capture: dict, path: str | Path) -> None:
    """Success rate and false acceptances against the starting offset (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = capture["offsets"]
    x = list(range(len(rows)))
    labels = [f"{r['rot_deg']:g}/{r['trans_mm']:g}" for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(x, [100 * (r["summary"]["success_rate"] or 0) for r in rows], "o-", label="success (mTRE <= 2 mm)")
    ax.plot(x, [100 * r["summary"]["accepted"] / max(r["summary"]["n"], 1) for r in rows], "s--", label="accepted")
    ax.bar(
        x,
        [100 * r["summary"]["false_acceptances"] / max(r["summary"]["n"], 1) for r in rows],
        color="red",
        alpha=0.6,
        label="false acceptances",
    )
    ax.set_xticks(x, labels)
    ax.set_xlabel("starting offset (deg / mm)")
    ax.set_ylabel("% of view sets")
    ax.set_ylim(0, 105)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(Path(capture["file"]).name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
