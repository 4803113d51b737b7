"""Training data of the coarse network: view sets rendered from a pooled copy of the CT as two
channels (soft tissue, bone excess) into a refreshed pool, re-degraded each time they are used."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.geometry.pose_sampling import canonical_rotation, sample_view_sets
from mvreg_ros.core.geometry.transforms import invert
from mvreg_ros.core.imaging.volume import BONE_HU, Volume, hu_to_mu
from mvreg_ros.core.imaging.xray import DEEPFLUORO_I0
from mvreg_ros.core.learning.augment import column_gain, deform_soft_tissue, metal_tools, shutter_masks
from mvreg_ros.core.learning.network import (
    PoseGeometry,
)
from mvreg_ros.core.learning.train_config import TrainConfig
from mvreg_ros.core.rendering.renderer import integrate, make_rays, pixel_grid


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


def degrade(
    channels: Float[Tensor, "N 2 H W"],
    *,
    config: TrainConfig,
    generator: torch.Generator,
    detector_px_per_pixel: float,
    detector_mask: Float[Tensor, "H W"] | None = None,
) -> tuple[Tensor, Tensor]:
    """Random contrast, scatter, noise and field of view, and the theatre's randomisations of
    ``config.augment`` (soft-tissue deformation, metal, collimator shutters, column gain;
    :mod:`mvreg_ros.core.learning.augment`), then the log and mask of ``xray``.

    Returns line-integral images and field-of-view masks ``(N, H, W)``; ``detector_mask``
    (the detector's area in a letterboxed input, :meth:`TrainConfig.working_geometry`) is
    multiplied into the masks."""
    g = generator
    N, _, H, W = channels.shape
    ch = channels.float()

    def u(lo_hi, shape=(N, 1, 1)):
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    aug = config.augment
    ch = deform_soft_tissue(ch, config=aug, generator=g)
    P = u(config.energy_scale) * (ch[:, 0] + u(config.bone_scale) * ch[:, 1])
    P = P + metal_tools(N, H, W, config=aug, generator=g)
    i0 = DEEPFLUORO_I0
    primary = i0 * torch.exp(-P)
    coarse = torch.rand(N, 1, 4, 4, generator=g)
    blob = F.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=False)[:, 0].clamp_min(0)
    blob = blob / blob.mean((-2, -1), keepdim=True).clamp_min(1e-6)
    signal = primary + u(config.scatter_fraction) * primary.mean((-2, -1), keepdim=True) * blob
    signal = signal * column_gain(N, W, config=aug, generator=g)
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
    mask = mask * shutter_masks(N, H, W, config=aug, generator=g)
    if detector_mask is not None:
        if detector_mask.shape != (H, W):
            raise ValueError(f"detector_mask must be ({H}, {W}), got {tuple(detector_mask.shape)}")
        mask = mask * detector_mask.to(mask)
    images = (math.log(i0) - torch.log(noisy.clamp_min(1.0))) * mask
    return images, mask


class ViewPool:
    """Ring buffer of rendered view sets (3 views, 2 channels, float16)."""

    def __init__(
        self, volume: Volume, config: TrainConfig, *, centre_ct: Tensor, generator: torch.Generator, device="cpu"
    ):
        self.config = config
        self.g = generator
        self.centre_ct = centre_ct
        self.renderer = ChannelRenderer(
            volume.resampled(pool_factor(volume, config.voxel_mm)), n_samples=config.n_samples, device=device
        )
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
        images, masks = degrade(
            ch,
            config=self.config,
            generator=self.g,
            detector_px_per_pixel=self.config.detector_px_per_pixel,
            detector_mask=self.detector_mask,
        )
        s = self.config.size
        T_ref_from_cam = self.T_ref_from_cam[idx, :n_views]
        T_ref_from_ct = self.T_ref_from_ct[idx]
        return {
            "images": images.reshape(n_sets, n_views, s, s),
            "masks": masks.reshape(n_sets, n_views, s, s),
            "K": self.K.expand(n_sets, n_views, 3, 3).clone(),
            "T_ref_from_cam": T_ref_from_cam,
            "T_ref_from_ct": T_ref_from_ct,
            "T_cam_from_ct": invert(T_ref_from_cam) @ T_ref_from_ct[:, None],
        }


def make_geometry(volume: Volume, config: TrainConfig) -> PoseGeometry:
    c = volume.bone_centre_ct().to(torch.float64)
    return PoseGeometry(
        centre_ct=tuple(float(x) for x in c),
        R0_cam_from_ct=tuple(tuple(float(x) for x in r) for r in canonical_rotation()),
        sid_mm=config.sid_mm,
    )


# ---------------------------------------------------------------------------------------
