"""Training the patient-specific coarse network on DRRs of the patient's own CT.

Training samples are view sets (2 or 3 views with known relative camera poses) drawn by
:mod:`pose_sampling`, rendered at the working resolution from a pooled copy of the CT as two
channels (soft tissue and the bone excess above the bone threshold) into a pool that is
refreshed every step. Each time a set is used it is re-degraded: random bone attenuation and
beam energy, scatter-like smooth background, Poisson-like noise, a random circular field of
view; then log-linearised and masked like real images (``xray``), so the network sees what
``ViewSet.from_raw(...)`` gives at inference.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from mvreg_ros.core.evaluation import stats
from mvreg_ros.core.evaluation.landmarks import ct_landmarks
from mvreg_ros.core.evaluation.metrics import mtre_mm
from mvreg_ros.core.imaging.footprint import continued
from mvreg_ros.core.imaging.volume import Volume
from mvreg_ros.core.imaging.xray import downsample
from mvreg_ros.core.learning.coarse import (
    CoarseModel,
    FusionConfig,
    check_aspect,
    trained_detector_shape,
)
from mvreg_ros.core.learning.losses import cross_view_image_loss, cross_view_pose_loss, image_loss, pose_loss
from mvreg_ros.core.learning.network import (
    PoseGeometry,
    PoseNet,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from mvreg_ros.core.learning.train_config import TrainConfig
from mvreg_ros.core.learning.training_data import ViewPool, degrade, make_geometry, pool_factor

# Loss of a batch
# ---------------------------------------------------------------------------------------


def batch_loss(
    net: PoseNet,
    batch: dict,
    *,
    config: TrainConfig,
    geometry: PoseGeometry,
    loss_renderer=None,
    image_terms: bool = True,
) -> tuple[Tensor, dict]:
    from mvreg_ros.core.learning.network import decode

    images, masks, K = batch["images"], batch["masks"], batch["K"]
    B, V, s, _ = images.shape
    dev = next(net.parameters()).device
    out = net(images.reshape(B * V, s, s).to(dev), masks.reshape(B * V, s, s).to(dev))
    T_pred = decode(out, K.reshape(B * V, 3, 3).to(dev), arch=net.arch, geometry=geometry).reshape(B, V, 4, 4)
    c = torch.tensor(geometry.centre_ct, dtype=torch.float64, device=dev)
    T_rc = batch["T_ref_from_cam"].to(dev)
    terms = {}
    total = torch.zeros((), dtype=torch.float64, device=dev)
    if config.w_pose > 0:
        terms["pose"] = pose_loss(
            T_pred,
            batch["T_cam_from_ct"].to(dev),
            c,
            radius_mm=config.pose_radius_mm,
            scale_mm=config.pose_scale_mm,
            depth_weight=config.depth_weight,
        ).mean()
        total = total + config.w_pose * terms["pose"]
    if config.w_cross_pose > 0 and V > 1:
        terms["xpose"] = cross_view_pose_loss(
            T_pred, T_rc, c, radius_mm=config.pose_radius_mm, scale_mm=config.pose_scale_mm
        ).mean()
        total = total + config.w_cross_pose * terms["xpose"]
    want_img = (
        image_terms and loss_renderer is not None and (config.w_image > 0 or (config.w_cross_image > 0 and V > 1))
    )
    if want_img:
        m = min(B, config.image_sets)
        f = s // config.image_size
        img, Ks = downsample(images[:m].to(dev), K[:m].to(dev), f)
        msk, _ = downsample(masks[:m].to(dev), K[:m].to(dev), f)
        msk = (msk > 0.999).float()
        if config.w_image > 0:
            terms["image"] = image_loss(
                loss_renderer, T_pred[:m], Ks, img, msk, patches=config.image_patches, n_samples=config.image_samples
            ).mean()
            total = total + config.w_image * terms["image"]
        if config.w_cross_image > 0 and V > 1:
            terms["ximage"] = cross_view_image_loss(
                loss_renderer,
                T_pred[:m],
                T_rc[:m],
                Ks,
                img,
                msk,
                patches=config.image_patches,
                n_samples=config.image_samples,
            ).mean()
            total = total + config.w_cross_image * terms["ximage"]
    return total, {k: float(v.detach()) for k, v in terms.items()}


# ---------------------------------------------------------------------------------------
# Optimiser state (safetensors, no pickle)
# ---------------------------------------------------------------------------------------


def _save_optimizer(path: Path, opt: torch.optim.Optimizer) -> None:
    from safetensors.torch import save_file

    flat = {}
    for k, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            flat[f"{k}.{name}"] = torch.as_tensor(v).detach().cpu().contiguous()
    save_file(flat, str(path))


def _load_optimizer(path: Path, opt: torch.optim.Optimizer) -> None:
    from safetensors.torch import load_file

    flat = load_file(str(path))
    state: dict = {}
    for key, v in flat.items():
        k, name = key.split(".", 1)
        state.setdefault(int(k), {})[name] = v
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)


# ---------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    path: Path
    steps: int
    seconds: float
    history: list  # dicts: step, time_s, loss terms, val_median_mtre_mm
    views_rendered: int


def validation_sets(
    volume: Volume,
    config: TrainConfig,
    geometry: PoseGeometry,
    *,
    n_sets: int,
    seed: int,
    n_views: int = 2,
    device="cpu",
) -> list[dict]:
    """Held-out simulated view sets at the working size (same pipeline as training)."""
    g = torch.Generator().manual_seed(seed)
    pool = ViewPool(
        volume, config.replace(pool_sets=n_sets), centre_ct=torch.tensor(geometry.centre_ct), generator=g, device=device
    )
    pool.add(n_sets)
    out = []
    for b in range(n_sets):
        ch = pool.channels[b, :n_views].float()
        images, masks = degrade(
            ch,
            config=config,
            generator=g,
            detector_px_per_pixel=config.detector_px_per_pixel,
            detector_mask=pool.detector_mask,
        )
        out.append(
            {
                "images": images,
                "masks": masks,
                "K": pool.K.expand(n_views, 3, 3).clone(),
                "T_ref_from_cam": pool.T_ref_from_cam[b, :n_views],
                "T_ref_from_ct": pool.T_ref_from_ct[b],
            }
        )
    return out


def validate(model: CoarseModel, sets: list[dict], landmarks: Tensor) -> dict:
    from mvreg_ros.core.imaging.views import ViewSet

    errs, ms = [], []
    for s in sets:
        views = ViewSet(images=s["images"], masks=s["masks"], K=s["K"], T_ref_from_cam=s["T_ref_from_cam"])
        est = model.predict(views)
        errs.append(mtre_mm(est.T_ref_from_ct, s["T_ref_from_ct"], landmarks))
        ms.append(est.ms)
    e = stats.summary(errs)
    return {
        "median_mtre_mm": e["median"],
        "mean_mtre_mm": e["mean"],
        "under_10mm": sum(x < 10 for x in errs) / len(errs),
        "ms": stats.median(ms),
    }


def _lr_factor(frac: float, warmup: float) -> float:
    if frac < warmup:
        return max(frac / max(warmup, 1e-9), 0.02)
    p = (frac - warmup) / max(1 - warmup, 1e-9)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


def train(
    volume: Volume,
    config: TrainConfig,
    out: str | Path,
    *,
    device="cpu",
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train (or continue training) a coarse network for ``volume``; checkpoints go to ``out``
    (plus ``out.json`` and the optimiser state ``*.optim.safetensors``)."""
    # denormals in Adam states slow CPUs down many times; the setting is process-wide, so it is
    # restored afterwards (it would change float semantics for everything else in the process)
    torch.set_flush_denormal(True)
    try:
        return _train(volume, config, out, device=device, resume=resume, progress=progress, log=log)
    finally:
        torch.set_flush_denormal(False)


def _train(
    volume: Volume,
    config: TrainConfig,
    out: str | Path,
    *,
    device="cpu",
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """The training loop of :func:`train`."""
    out = Path(out)
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = torch.device(device)
    g = torch.Generator().manual_seed(config.seed)
    geometry = make_geometry(volume, config)
    identity = volume.identity()
    net = PoseNet(config.arch).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    optim_path = out.with_name(out.stem + ".optim.safetensors")
    step, elapsed0, history = 0, 0.0, []
    if resume and out.exists():
        meta = read_metadata(out)
        if TrainConfig.from_dict(meta["config"]).arch != config.arch:
            raise ValueError(f"cannot resume {out}: its architecture differs from the config's")
        stored_shape = trained_detector_shape(meta) or TrainConfig.from_dict(meta["config"]).detector_shape
        check_aspect(stored_shape, config.detector_shape, what=f"cannot resume {out}: the config's detector images")
        net, _, meta = load_checkpoint(out, volume_identity=identity, arch=config.arch, device=device)
        net.train()
        opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        if optim_path.exists():
            _load_optimizer(optim_path, opt)
        step = int(meta["extra"].get("step", 0))
        elapsed0 = float(meta["extra"].get("seconds", 0.0))
        history = list(meta["extra"].get("history", []))
        g.manual_seed(config.seed + step)
        log(f"resuming {out} at step {step}, {elapsed0 / 60:.1f} min done")
    net.train()
    budget = config.minutes * 60.0
    landmarks = ct_landmarks(volume).points_ct
    log(
        f"preparing: pooled volume for training renders, {config.val_sets} validation sets, {config.initial_sets} training sets"
    )
    # what the training views are rendered from: the CT continued beyond any cut through the body
    seen = continued(volume, config.truncation_extend_mm)
    val = validation_sets(seen, config, geometry, n_sets=config.val_sets, seed=10_000 + config.seed, device=device)
    pool = ViewPool(seen, config, centre_ct=torch.tensor(geometry.centre_ct), generator=g, device=device)
    from mvreg_ros.core.rendering.renderer import Renderer

    loss_renderer = Renderer(
        seen.resampled(pool_factor(seen, 2 * config.voxel_mm)), n_samples=config.image_samples, device=device
    )
    del seen
    scorer_fusion = FusionConfig()
    pool.add(config.initial_sets)
    start = time.perf_counter() - elapsed0
    last_val = time.perf_counter()
    bar = None
    if progress:
        try:
            from tqdm import tqdm
        except ImportError:  # no progress bar: log lines at each validation instead
            progress = False
    if progress:
        bar = tqdm(
            total=int(budget),
            unit="s",
            initial=int(elapsed0),
            desc="train",
            file=sys.stderr,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}s {postfix}",
        )
    val_text = "-"

    def checkpoint(val_stats: dict | None):
        elapsed = time.perf_counter() - start
        rec = {"step": step, "time_s": round(elapsed, 1), "views_rendered": pool.rendered_views}
        if val_stats:
            rec.update({k: round(v, 3) for k, v in val_stats.items()})
        history.append(rec)
        net.eval()
        save_checkpoint(
            out,
            net,
            geometry=geometry,
            volume_identity=identity,
            config=config.to_dict(),
            extra={"step": step, "seconds": elapsed, "history": history},
            detector_shape=config.detector_shape,
        )
        _save_optimizer(optim_path, opt)
        net.train()

    def run_validation() -> dict:
        net.eval()
        model = CoarseModel(net, geometry, volume=None, device=device, fusion=scorer_fusion)  # views at working size
        stats = validate(model, val, landmarks)
        net.train()
        return stats

    terms = {}
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= budget or (config.max_steps and step >= config.max_steps):
            break
        # schedule by steps when a step budget is given (equal compute whatever the CPU load)
        frac = step / config.max_steps if config.max_steps else elapsed / max(budget, 1e-9)
        for group in opt.param_groups:
            group["lr"] = config.lr * _lr_factor(frac, config.warmup)
        pool.add(config.refresh_sets)
        n_views = 3 if torch.rand((), generator=g) < config.p_three_views else 2
        batch = pool.batch(config.batch_sets, n_views)
        loss, terms = batch_loss(
            net,
            batch,
            config=config,
            geometry=geometry,
            loss_renderer=loss_renderer,
            image_terms=frac >= config.image_start,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        step += 1
        if time.perf_counter() - last_val >= config.val_every_s:
            stats = run_validation()
            val_text = f"{stats['median_mtre_mm']:.1f}mm"
            checkpoint(stats)
            last_val = time.perf_counter()
            if not progress:
                log(
                    f"step {step} t={time.perf_counter() - start:.0f}s loss={float(loss.detach()):.4f} {terms} val median mTRE {val_text}"
                )
        if bar is not None:
            bar.n = min(int(time.perf_counter() - start), int(budget))
            bar.set_postfix_str(f"step {step} loss {float(loss.detach()):.3f} val mTRE {val_text}", refresh=False)
            bar.refresh()
    stats = run_validation()
    checkpoint(stats)
    if bar is not None:
        bar.close()
    total = time.perf_counter() - start
    log(
        f"done: {step} steps in {total / 60:.1f} min, {pool.rendered_views} views rendered "
        f"({pool.render_s:.0f} s rendering); validation median mTRE {stats['median_mtre_mm']:.2f} mm; saved {out}"
    )
    return TrainResult(path=out, steps=step, seconds=total, history=history, views_rendered=pool.rendered_views)
