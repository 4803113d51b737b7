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
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.learning.coarse import CoarseModel, FusionConfig, check_aspect, trained_detector_shape, working_geometry
from mvreg_ros.core.geometry.transforms import invert
from mvreg_ros.core.learning.losses import cross_view_image_loss, cross_view_pose_loss, image_loss, pose_loss
from mvreg_ros.core.evaluation.metrics import mtre_mm, structure_landmarks
from mvreg_ros.core.learning.network import ArchConfig, PoseGeometry, PoseNet, load_checkpoint, read_metadata, save_checkpoint
from mvreg_ros.core.geometry.pose_sampling import PoseRange, canonical_rotation, sample_view_sets
from mvreg_ros.core.rendering.renderer import integrate, make_rays, pixel_grid
from mvreg_ros.core.data.simulate import DetectorConfig
from mvreg_ros.core.imaging.volume import BONE_HU, Volume, hu_to_mu
from mvreg_ros.core.imaging.xray import DEEPFLUORO_I0, downsample


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every training setting; ``config/train.yaml`` holds the same defaults."""

    # pose range (degrees, mm) and detector geometry
    orbital_deg: float = 75.0
    angular_deg: float = 35.0
    inplane_deg: float = 10.0
    iso_mm: float = 40.0
    step_orbital_deg: tuple[float, float] = (30.0, 90.0)
    step_angular_deg: float = 20.0
    sdd_mm: float = 1020.0
    sid_mm: float = 700.0
    detector_px: int = 256  # detector columns (and rows unless detector_rows is set)
    detector_rows: int = 0  # detector rows; 0 = detector_px (square)
    pixel_mm: float = 1.164
    # data
    size: int = 64  # working image size
    n_samples: int = 48  # ray samples when rendering training views
    voxel_mm: float = 2.5  # CT pooled to about this voxel size for training renders
    pool_sets: int = 6000  # view sets kept in the pool (3 views each)
    initial_sets: int = 192  # rendered before the first step
    refresh_sets: int = 4  # new sets rendered per step
    p_three_views: float = 0.3  # probability that a batch uses 3 views instead of 2
    bone_scale: tuple[float, float] = (0.6, 1.6)
    energy_scale: tuple[float, float] = (0.85, 1.15)
    scatter_fraction: tuple[float, float] = (0.0, 0.3)
    photons_per_count: tuple[float, float] = (0.05, 1.0)  # log-uniform, per detector pixel
    p_fov: float = 0.8  # probability of a circular field of view
    fov_radius: tuple[float, float] = (0.40, 0.5)  # fraction of the width
    # network
    width: int = 16
    fc: int = 256
    # losses (weights; 0 switches a term off)
    w_pose: float = 1.0
    w_image: float = 0.5
    w_cross_pose: float = 0.5
    w_cross_image: float = 0.5
    pose_radius_mm: float = 100.0
    pose_scale_mm: float = 100.0
    depth_weight: float = 0.5
    image_size: int = 32  # DRR size of the image losses
    image_samples: int = 48
    image_sets: int = 8  # view sets of each batch that get the image losses
    image_start: float = 0.25  # fraction of the budget before the image losses switch on
    image_patches: tuple = (None, 8)
    # optimisation
    batch_sets: int = 24
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: float = 0.03
    minutes: float = 30.0
    max_steps: int = 0  # 0 = limited by minutes only
    val_sets: int = 32
    val_every_s: float = 120.0
    seed: int = 0
    threads: int = 0  # torch threads (0 = leave as is)

    def __post_init__(self):
        if self.detector_px < 1 or self.detector_rows < 0:
            raise ValueError(f"detector_px must be >= 1 and detector_rows >= 0 (0 = square), got "
                             f"{self.detector_px} and {self.detector_rows}")
        if self.size % 16 or self.image_size < 8 or self.size % self.image_size:
            raise ValueError(f"size ({self.size}) must be a multiple of 16 and of image_size ({self.image_size})")
        for name in ("w_pose", "w_image", "w_cross_pose", "w_cross_image", "minutes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.w_pose + self.w_image + self.w_cross_pose + self.w_cross_image <= 0:
            raise ValueError("at least one loss term must have a positive weight")
        if self.batch_sets < 1 or self.initial_sets < self.batch_sets:
            raise ValueError(f"initial_sets ({self.initial_sets}) must be >= batch_sets ({self.batch_sets}) >= 1")

    @property
    def pose_range(self) -> PoseRange:
        return PoseRange(orbital_deg=self.orbital_deg, angular_deg=self.angular_deg, inplane_deg=self.inplane_deg,
                         iso_mm=self.iso_mm, step_orbital_deg=tuple(self.step_orbital_deg),
                         step_angular_deg=self.step_angular_deg, sid_mm=self.sid_mm)

    @property
    def detector_shape(self) -> tuple[int, int]:
        """Detector (rows, columns)."""
        return (self.detector_rows or self.detector_px, self.detector_px)

    @property
    def detector(self) -> DetectorConfig:
        rows, cols = self.detector_shape
        return DetectorConfig(sdd_mm=self.sdd_mm, sid_mm=self.sid_mm, height=rows, width=cols, pixel_mm=self.pixel_mm)

    @property
    def detector_px_per_pixel(self) -> float:
        """Detector pixels per working pixel (along each axis; the letterbox scale is isotropic)."""
        return max(self.detector_shape) / self.size

    @property
    def arch(self) -> ArchConfig:
        return ArchConfig(size=self.size, width=self.width, fc=self.fc)

    def working_geometry(self) -> tuple[Float[Tensor, "3 3"], Float[Tensor, "S S"]]:
        """``K_work`` and the detector's area in the ``size x size`` network input, by the one
        preprocessing of training and inference (:func:`coarse.to_working_size`, letterbox)."""
        rows, cols = self.detector_shape
        return working_geometry(self.detector.K(), rows, cols, self.size)

    def K_work(self) -> Float[Tensor, "3 3"]:
        return self.working_geometry()[0]

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        clean = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**clean)

    @classmethod
    def from_yaml(cls, path: str | Path | None, **overrides) -> "TrainConfig":
        import yaml

        d = {}
        if path is not None:
            text = Path(path).read_text()
            d = yaml.safe_load(text) or {}
            if not isinstance(d, dict):
                raise ValueError(f"{path}: expected a mapping of training settings")
            d = d.get("train", d)
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(d)


# ---------------------------------------------------------------------------------------
# Training data
# ---------------------------------------------------------------------------------------


def pool_factor(volume: Volume, voxel_mm: float) -> int:
    return max(1, int(round(voxel_mm / float(volume.spacing.min()))))


class ChannelRenderer:
    """Renders soft tissue and bone excess of a volume as two channels in one pass."""

    def __init__(self, volume: Volume, *, n_samples: int, device="cpu"):
        self.device = torch.device(device)
        mu_bone = float(hu_to_mu(torch.tensor(BONE_HU)))
        d = volume.data
        self.data = torch.stack([d.clamp(max=mu_bone), (d - mu_bone).clamp_min(0)]).to(self.device, torch.float32)
        self.T_index_from_ct = torch.linalg.inv(volume.T_ct_from_index.to(self.device, torch.float64))
        self.shape_ijk = volume.shape_ijk
        self.n_samples = n_samples

    @torch.no_grad()
    def __call__(self, T_cam_from_ct: Tensor, K: Tensor, height: int, width: int) -> Float[Tensor, "N 2 H W"]:
        T = T_cam_from_ct.to(self.device, torch.float64)
        px = pixel_grid(height, width, dtype=torch.float64, device=self.device)
        rays = make_rays(self.T_index_from_ct, self.shape_ijk, T, K.to(self.device, torch.float64), px)
        C = self.data.shape[0]
        out = integrate(self.data, rays, self.n_samples, padding_mode="zeros")  # C V R
        return out.permute(1, 0, 2).reshape(len(T), C, height, width)


def degrade(channels: Float[Tensor, "N 2 H W"], *, config: TrainConfig, generator: torch.Generator,
            detector_px_per_pixel: float, detector_mask: Float[Tensor, "H W"] | None = None) -> tuple[Tensor, Tensor]:
    """Random contrast, scatter, noise and field of view, then the log and mask of ``xray``.

    Returns line-integral images and field-of-view masks ``(N, H, W)``; ``detector_mask``
    (the detector's area in a letterboxed input, :meth:`TrainConfig.working_geometry`) is
    multiplied into the masks."""
    g = generator
    N, _, H, W = channels.shape
    ch = channels.float()

    def u(lo_hi, shape=(N, 1, 1)):
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    P = u(config.energy_scale) * (ch[:, 0] + u(config.bone_scale) * ch[:, 1])
    i0 = DEEPFLUORO_I0
    primary = i0 * torch.exp(-P)
    coarse = torch.rand(N, 1, 4, 4, generator=g)
    blob = F.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=False)[:, 0].clamp_min(0)
    blob = blob / blob.mean((-2, -1), keepdim=True).clamp_min(1e-6)
    signal = primary + u(config.scatter_fraction) * primary.mean((-2, -1), keepdim=True) * blob
    lo, hi = config.photons_per_count
    ppc = torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand(N, 1, 1, generator=g))
    ppc = ppc * detector_px_per_pixel**2  # a working pixel averages this many detector pixels
    noisy = signal + (signal / ppc).sqrt() * torch.randn(signal.shape, generator=g)
    v, uu = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    centre_u = (W - 1) / 2 + u((-1.5, 1.5))
    centre_v = (H - 1) / 2 + u((-1.5, 1.5))
    r = torch.sqrt((uu - centre_u) ** 2 + (v - centre_v) ** 2)
    radius = u(config.fov_radius) * W
    has_fov = torch.rand(N, 1, 1, generator=g) < config.p_fov
    inside = torch.where(has_fov, torch.sigmoid((radius - r) / 0.5), torch.ones_like(r))
    noisy = noisy * inside
    mask = torch.where(has_fov, (r <= radius - 1.0).float(), torch.ones_like(r))
    if detector_mask is not None:
        if detector_mask.shape != (H, W):
            raise ValueError(f"detector_mask must be ({H}, {W}), got {tuple(detector_mask.shape)}")
        mask = mask * detector_mask.to(mask)
    images = (math.log(i0) - torch.log(noisy.clamp_min(1.0))) * mask
    return images, mask


class ViewPool:
    """Ring buffer of rendered view sets (3 views, 2 channels, float16)."""

    def __init__(self, volume: Volume, config: TrainConfig, *, centre_ct: Tensor, generator: torch.Generator, device="cpu"):
        self.config = config
        self.g = generator
        self.centre_ct = centre_ct
        self.renderer = ChannelRenderer(volume.resampled(pool_factor(volume, config.voxel_mm)), n_samples=config.n_samples,
                                        device=device)
        s = config.size
        n = config.pool_sets
        self.channels = torch.zeros(n, 3, 2, s, s, dtype=torch.float16)
        self.T_ref_from_cam = torch.zeros(n, 3, 4, 4, dtype=torch.float64)
        self.T_ref_from_ct = torch.zeros(n, 4, 4, dtype=torch.float64)
        self.filled = 0
        self.next = 0
        self.K, self.detector_mask = config.working_geometry()
        self.rendered_views = 0
        self.render_s = 0.0

    def add(self, n: int, *, chunk: int = 16) -> None:
        while n > chunk:  # bounded memory for the ray samples
            self.add(chunk)
            n -= chunk
        if n <= 0:
            return
        t0 = time.perf_counter()
        geo = sample_view_sets(n, 3, centre_ct=self.centre_ct, pose_range=self.config.pose_range, generator=self.g)
        T = geo.T_cam_from_ct.reshape(n * 3, 4, 4)
        ch = self.renderer(T, self.K.expand(n * 3, 3, 3), self.config.size, self.config.size).cpu()
        idx = (self.next + torch.arange(n)) % len(self.channels)
        self.channels[idx] = ch.reshape(n, 3, 2, self.config.size, self.config.size).to(torch.float16)
        self.T_ref_from_cam[idx] = geo.T_ref_from_cam
        self.T_ref_from_ct[idx] = geo.T_ref_from_ct
        self.next = int((self.next + n) % len(self.channels))
        self.filled = min(len(self.channels), self.filled + n)
        self.rendered_views += n * 3
        self.render_s += time.perf_counter() - t0

    def batch(self, n_sets: int, n_views: int) -> dict:
        idx = torch.randint(0, self.filled, (n_sets,), generator=self.g)
        ch = self.channels[idx, :n_views].float().reshape(n_sets * n_views, 2, self.config.size, self.config.size)
        images, masks = degrade(ch, config=self.config, generator=self.g,
                                detector_px_per_pixel=self.config.detector_px_per_pixel, detector_mask=self.detector_mask)
        s = self.config.size
        T_ref_from_cam = self.T_ref_from_cam[idx, :n_views]
        T_ref_from_ct = self.T_ref_from_ct[idx]
        return {
            "images": images.reshape(n_sets, n_views, s, s), "masks": masks.reshape(n_sets, n_views, s, s),
            "K": self.K.expand(n_sets, n_views, 3, 3).clone(), "T_ref_from_cam": T_ref_from_cam,
            "T_ref_from_ct": T_ref_from_ct, "T_cam_from_ct": invert(T_ref_from_cam) @ T_ref_from_ct[:, None],
        }


def make_geometry(volume: Volume, config: TrainConfig) -> PoseGeometry:
    c = volume.bone_centre_ct().to(torch.float64)
    return PoseGeometry(centre_ct=tuple(float(x) for x in c), R0_cam_from_ct=tuple(tuple(float(x) for x in r) for r in canonical_rotation()),
                        sid_mm=config.sid_mm)


def landmarks_ct(volume: Volume, *, max_points: int = 200) -> Float[Tensor, "N 3"]:
    """Evaluation landmarks: centroids of every labelled structure of the CT's mask (e.g.
    TotalSegmentator vertebrae, ribs, scapulae of the shipped CT) with at least 5 voxels; with
    fewer than 4 such structures, bone voxels."""
    return structure_landmarks(volume, max_points=max_points, min_voxels=5, min_structures=4)


# ---------------------------------------------------------------------------------------
# Loss of a batch
# ---------------------------------------------------------------------------------------


def batch_loss(net: PoseNet, batch: dict, *, config: TrainConfig, geometry: PoseGeometry, loss_renderer=None,
               image_terms: bool = True) -> tuple[Tensor, dict]:
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
        terms["pose"] = pose_loss(T_pred, batch["T_cam_from_ct"].to(dev), c, radius_mm=config.pose_radius_mm,
                                  scale_mm=config.pose_scale_mm, depth_weight=config.depth_weight).mean()
        total = total + config.w_pose * terms["pose"]
    if config.w_cross_pose > 0 and V > 1:
        terms["xpose"] = cross_view_pose_loss(T_pred, T_rc, c, radius_mm=config.pose_radius_mm,
                                              scale_mm=config.pose_scale_mm).mean()
        total = total + config.w_cross_pose * terms["xpose"]
    want_img = image_terms and loss_renderer is not None and (config.w_image > 0 or (config.w_cross_image > 0 and V > 1))
    if want_img:
        m = min(B, config.image_sets)
        f = s // config.image_size
        img, Ks = downsample(images[:m].to(dev), K[:m].to(dev), f)
        msk, _ = downsample(masks[:m].to(dev), K[:m].to(dev), f)
        msk = (msk > 0.999).float()
        if config.w_image > 0:
            terms["image"] = image_loss(loss_renderer, T_pred[:m], Ks, img, msk, patches=config.image_patches,
                                        n_samples=config.image_samples).mean()
            total = total + config.w_image * terms["image"]
        if config.w_cross_image > 0 and V > 1:
            terms["ximage"] = cross_view_image_loss(loss_renderer, T_pred[:m], T_rc[:m], Ks, img, msk,
                                                    patches=config.image_patches, n_samples=config.image_samples).mean()
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


def validation_sets(volume: Volume, config: TrainConfig, geometry: PoseGeometry, *, n_sets: int, seed: int,
                    n_views: int = 2, device="cpu") -> list[dict]:
    """Held-out simulated view sets at the working size (same pipeline as training)."""
    g = torch.Generator().manual_seed(seed)
    pool = ViewPool(volume, config.replace(pool_sets=n_sets), centre_ct=torch.tensor(geometry.centre_ct), generator=g,
                    device=device)
    pool.add(n_sets)
    out = []
    for b in range(n_sets):
        ch = pool.channels[b, :n_views].float()
        images, masks = degrade(ch, config=config, generator=g, detector_px_per_pixel=config.detector_px_per_pixel,
                                detector_mask=pool.detector_mask)
        out.append({"images": images, "masks": masks, "K": pool.K.expand(n_views, 3, 3).clone(),
                    "T_ref_from_cam": pool.T_ref_from_cam[b, :n_views], "T_ref_from_ct": pool.T_ref_from_ct[b]})
    return out


def validate(model: CoarseModel, sets: list[dict], landmarks: Tensor) -> dict:
    from mvreg_ros.core.imaging.views import ViewSet

    errs, ms = [], []
    for s in sets:
        views = ViewSet(images=s["images"], masks=s["masks"], K=s["K"], T_ref_from_cam=s["T_ref_from_cam"])
        est = model.predict(views)
        errs.append(mtre_mm(est.T_ref_from_ct, s["T_ref_from_ct"], landmarks))
        ms.append(est.ms)
    e = torch.tensor(errs)
    return {"median_mtre_mm": float(e.median()), "mean_mtre_mm": float(e.mean()),
            "under_10mm": float((e < 10).float().mean()), "ms": float(torch.tensor(ms).median())}


def _lr_factor(frac: float, warmup: float) -> float:
    if frac < warmup:
        return max(frac / max(warmup, 1e-9), 0.02)
    p = (frac - warmup) / max(1 - warmup, 1e-9)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


def train(volume: Volume, config: TrainConfig, out: str | Path, *, device="cpu", resume: bool = False,
          progress: bool = True, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train (or continue training) a coarse network for ``volume``; checkpoints go to ``out``
    (plus ``out.json`` and the optimiser state ``*.optim.safetensors``)."""
    out = Path(out)
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    torch.set_flush_denormal(True)  # denormals in Adam states slow CPUs down many times
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
    landmarks = landmarks_ct(volume)
    log(f"preparing: pooled volume for training renders, {config.val_sets} validation sets, {config.initial_sets} training sets")
    val = validation_sets(volume, config, geometry, n_sets=config.val_sets, seed=10_000 + config.seed, device=device)
    pool = ViewPool(volume, config, centre_ct=torch.tensor(geometry.centre_ct), generator=g, device=device)
    from mvreg_ros.core.rendering.renderer import Renderer

    loss_renderer = Renderer(volume.resampled(pool_factor(volume, 2 * config.voxel_mm)), n_samples=config.image_samples,
                             device=device)
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
        bar = tqdm(total=int(budget), unit="s", initial=int(elapsed0), desc="train", file=sys.stderr,
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}s {postfix}")
    val_text = "-"

    def checkpoint(val_stats: dict | None):
        elapsed = time.perf_counter() - start
        rec = {"step": step, "time_s": round(elapsed, 1), "views_rendered": pool.rendered_views}
        if val_stats:
            rec.update({k: round(v, 3) for k, v in val_stats.items()})
        history.append(rec)
        net.eval()
        save_checkpoint(out, net, geometry=geometry, volume_identity=identity, config=config.to_dict(),
                        extra={"step": step, "seconds": elapsed, "history": history},
                        detector_shape=config.detector_shape)
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
        loss, terms = batch_loss(net, batch, config=config, geometry=geometry, loss_renderer=loss_renderer,
                                 image_terms=frac >= config.image_start)
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
                log(f"step {step} t={time.perf_counter() - start:.0f}s loss={float(loss.detach()):.4f} {terms} val median mTRE {val_text}")
        if bar is not None:
            bar.n = min(int(time.perf_counter() - start), int(budget))
            bar.set_postfix_str(f"step {step} loss {float(loss.detach()):.3f} val mTRE {val_text}", refresh=False)
            bar.refresh()
    stats = run_validation()
    checkpoint(stats)
    if bar is not None:
        bar.close()
    total = time.perf_counter() - start
    log(f"done: {step} steps in {total / 60:.1f} min, {pool.rendered_views} views rendered "
        f"({pool.render_s:.0f} s rendering); validation median mTRE {stats['median_mtre_mm']:.2f} mm; saved {out}")
    return TrainResult(path=out, steps=step, seconds=total, history=history, views_rendered=pool.rendered_views)


# ---------------------------------------------------------------------------------------
# Held-out evaluation (benchmark): simulated detector images -> coarse -> refinement
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HeldoutSet:
    views: "object"  # ViewSet at detector resolution, from raw simulated images
    T_ref_from_ct: Tensor  # truth (ref = isocentre frame)
    joints_deg: Tensor  # (V, 3): orbital, angular, in-plane


def heldout_sets(volume: Volume, *, centre_ct: Tensor, n_sets: int = 30, seed: int = 1234, n_views: int = 2,
                 pose_range: PoseRange = PoseRange(), detector: DetectorConfig = DetectorConfig(),
                 acquisition_downsample: int = 2) -> list[HeldoutSet]:
    """Held-out simulated view sets over the whole range (independent seed): raw detector images
    from ``simulate.acquire`` (noise, scatter, circular field of view) on a CT pooled by
    ``acquisition_downsample``, preprocessed by ``ViewSet.from_raw`` as real images are."""
    from mvreg_ros.core.rendering.renderer import Renderer
    from mvreg_ros.core.data.simulate import AcquisitionConfig, acquire
    from mvreg_ros.core.imaging.views import ViewSet

    g = torch.Generator().manual_seed(seed)
    geo = sample_view_sets(n_sets, n_views, centre_ct=centre_ct, pose_range=pose_range, generator=g)
    renderer = Renderer(volume.resampled(acquisition_downsample), n_samples=256)
    K = detector.K().expand(n_views, 3, 3).clone()
    out = []
    for b in range(n_sets):
        raw = acquire(renderer, geo.T_cam_from_ct[b], K, detector.height, detector.width, config=AcquisitionConfig(),
                      generator=g)
        out.append(HeldoutSet(views=ViewSet.from_raw(raw, K, geo.T_ref_from_cam[b]), T_ref_from_ct=geo.T_ref_from_ct[b],
                              joints_deg=geo.joints_deg[b]))
    return out


def evaluate_heldout(model: CoarseModel, volume: Volume, *, n_sets: int = 30, seed: int = 1234, n_views: int = 2,
                     sets: list[HeldoutSet] | None = None, refine: bool = True, refine_config=None,
                     success_mm: float = 2.0, log: Callable[[str], None] | None = None) -> dict:
    """Coarse mTRE on held-out simulated view sets (:func:`heldout_sets`, drawn with the
    model's training range and detector), then refinement from the coarse pose (no starting
    pose given) and the success rate (refined mTRE <= ``success_mm``)."""
    from mvreg_ros.core.registration.refine import RefineConfig, Registrar

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    cfg = TrainConfig.from_dict(model.metadata["config"]) if model.metadata.get("config") else TrainConfig()
    if sets is None:
        sets = heldout_sets(volume, centre_ct=torch.tensor(model.geometry.centre_ct), n_sets=n_sets, seed=seed,
                            n_views=n_views, pose_range=cfg.pose_range, detector=cfg.detector)
    landmarks = landmarks_ct(volume)
    registrar = Registrar(volume, refine_config or RefineConfig()) if refine else None
    rows = []
    for b, hs in enumerate(sets):
        est = model.predict(hs.views)
        row = {"set": b, "joints_deg": [[round(float(x), 1) for x in j] for j in hs.joints_deg],
               "coarse_mtre_mm": mtre_mm(est.T_ref_from_ct, hs.T_ref_from_ct, landmarks), "coarse_ms": est.ms,
               "inliers": [bool(x) for x in est.inliers]}
        if registrar is not None:
            res = registrar.refine(hs.views, est.T_ref_from_ct)
            row.update({"refined_mtre_mm": mtre_mm(res.T_ref_from_ct, hs.T_ref_from_ct, landmarks),
                        "refine_s": res.time_s, "refine_reason": res.reason})
            row["success"] = row["refined_mtre_mm"] <= success_mm
        rows.append(row)
        log(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))
    coarse = torch.tensor([r["coarse_mtre_mm"] for r in rows])
    summary = {"n_sets": len(rows), "n_views": len(sets[0].views), "seed": seed,
               "coarse_median_mtre_mm": float(coarse.median()), "coarse_mean_mtre_mm": float(coarse.mean()),
               "coarse_under_10mm": float((coarse < 10).float().mean()),
               "coarse_under_20mm": float((coarse < 20).float().mean()),
               "coarse_median_ms": float(torch.tensor([r["coarse_ms"] for r in rows]).median()),
               "landmarks": len(landmarks)}
    if registrar is not None:
        refined = torch.tensor([r["refined_mtre_mm"] for r in rows])
        summary.update({"refined_median_mtre_mm": float(refined.median()),
                        "success_rate": float((refined <= success_mm).float().mean()), "success_mm": success_mm,
                        "refine_median_s": float(torch.tensor([r["refine_s"] for r in rows]).median())})
    return {"summary": summary, "rows": rows}
