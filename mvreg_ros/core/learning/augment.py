"""Domain randomisation of the coarse network's training views: what theatres add to a DRR.

The stress simulator (:mod:`mvreg_ros.core.data.stress`) renders what the network meets in the
theatre; these are its counterparts at the network's working size, applied to the two rendered
channels (soft tissue, bone excess) and to the detector signal, each with its own probability:

* :func:`deform_soft_tissue`: the soft-tissue channel warped by a smooth random displacement and
  scaled by a smooth density change, while the bone channel stays rigid (a patient who no longer
  matches the CT around a rigid target);
* :func:`metal_tools`: straight tools (screws, rods, wires) as line integrals of cylinders;
* :func:`shutter_masks`: collimator shutters, 1 or 2 sides cut off per view (flat panels);
* :func:`column_gain`: a per-column gain error of the detector.

Every function takes a ``torch.Generator`` and works on a batch ``(N, H, W)`` or ``(N, 2, H, W)``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of each randomisation (``TrainConfig`` holds one)."""

    p_deform: float = 0.5
    deform_px: tuple[float, float] = (0.5, 2.5)  # largest soft-tissue displacement, working pixels
    density_change: tuple[float, float] = (0.0, 0.08)  # smooth relative change of soft-tissue density
    p_metal: float = 0.4
    metal_tools: tuple[int, int] = (1, 3)
    metal_radius_px: tuple[float, float] = (0.3, 1.2)
    metal_length: tuple[float, float] = (0.15, 0.6)  # fraction of the image width
    metal_mu_per_px: tuple[float, float] = (0.3, 1.0)  # attenuation per working pixel of path through metal
    p_shutter: float = 0.4
    shutter_sides: tuple[int, int] = (1, 2)
    shutter_depth: tuple[float, float] = (0.05, 0.25)  # fraction of the image's side
    p_gain: float = 0.5
    column_gain_std: tuple[float, float] = (0.0, 0.04)

    def __post_init__(self):
        for name in ("p_deform", "p_metal", "p_shutter", "p_gain"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {v}")
        for name in (
            "deform_px",
            "density_change",
            "metal_tools",
            "metal_radius_px",
            "metal_length",
            "metal_mu_per_px",
            "shutter_sides",
            "shutter_depth",
            "column_gain_std",
        ):
            lo, hi = getattr(self, name)
            if not (0 <= lo <= hi and math.isfinite(hi)):
                raise ValueError(f"{name} must be a range 0 <= low <= high, got {getattr(self, name)}")
        if self.shutter_sides[1] > 4 or self.shutter_depth[1] >= 0.5:
            raise ValueError(
                f"shutter_sides must be at most 4 and shutter_depth below 0.5, got {self.shutter_sides} and "
                f"{self.shutter_depth}"
            )


def _u(lo_hi, shape, g: torch.Generator) -> Tensor:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def _chosen(n: int, p: float, g: torch.Generator) -> Tensor:
    return torch.rand(n, generator=g) < p


def smooth_field(n: int, channels: int, h: int, w: int, g: torch.Generator, *, knots: int = 4) -> Tensor:
    """Smooth random fields in [-1, 1] (bicubic from a ``knots x knots`` grid), ``(n, channels, h, w)``."""
    coarse = 2 * torch.rand(n, channels, knots, knots, generator=g) - 1
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).clamp(-1, 1)


def deform_soft_tissue(
    channels: Float[Tensor, "N C H W"], *, config: AugmentConfig, generator: torch.Generator
) -> Float[Tensor, "N C H W"]:
    """Warp the soft-tissue channel (0) of randomly chosen views by a smooth displacement of at
    most ``deform_px`` pixels and scale it by a smooth density change; the bone channel (1) is
    returned unchanged."""
    N, C, H, W = channels.shape
    if C != 2:
        raise ValueError(f"channels must be (N, 2, H, W) (soft tissue, bone excess), got {tuple(channels.shape)}")
    g = generator
    pick = _chosen(N, config.p_deform, g)
    amp = _u(config.deform_px, (N, 1, 1, 1), g)
    disp = smooth_field(N, 2, H, W, g) * amp  # pixels, (dx, dy)
    density = 1 + smooth_field(N, 1, H, W, g)[:, 0] * _u(config.density_change, (N, 1, 1), g)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    gx = (xs + disp[:, 0]) * (2 / max(W - 1, 1)) - 1
    gy = (ys + disp[:, 1]) * (2 / max(H - 1, 1)) - 1
    soft = channels[:, :1].float()
    warped = F.grid_sample(soft, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="border", align_corners=True)
    warped = warped[:, 0] * density
    out = channels.clone()
    out[:, 0] = torch.where(pick[:, None, None], warped.to(channels.dtype), channels[:, 0])
    return out


def metal_tools(n: int, h: int, w: int, *, config: AugmentConfig, generator: torch.Generator) -> Float[Tensor, "N H W"]:
    """Line integrals of straight cylindrical tools, ``metal_tools`` (min, max) of them in each view
    chosen with ``p_metal`` (none in the others): ``mu * chord`` across each tool's axis, to be
    added to the body's line integral."""
    g = generator
    out = torch.zeros(n, h, w)
    pick = _chosen(n, config.p_metal, g)
    lo, hi = config.metal_tools
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    p = torch.stack([xs, ys], -1)
    for i in torch.nonzero(pick).flatten().tolist():
        for _ in range(int(torch.randint(lo, hi + 1, (1,), generator=g))):
            centre = torch.tensor([w, h], dtype=torch.float32) * (0.2 + 0.6 * torch.rand(2, generator=g))
            angle = float(torch.rand(1, generator=g)) * math.pi
            d = torch.tensor([math.cos(angle), math.sin(angle)])
            half = float(_u(config.metal_length, (), g)) * w / 2
            r = float(_u(config.metal_radius_px, (), g))
            mu = float(_u(config.metal_mu_per_px, (), g))
            rel = p - centre
            along = (rel @ d).clamp(-half, half)
            dist = (rel - along[..., None] * d).norm(dim=-1)
            r_eff = max(r, 0.5)  # thinner than a pixel: spread over one, same integral across it
            chord = 2 * (r_eff**2 - dist**2).clamp_min(0).sqrt() * (r / r_eff) ** 2
            out[i] += mu * chord
    return out


def shutter_masks(
    n: int, h: int, w: int, *, config: AugmentConfig, generator: torch.Generator
) -> Float[Tensor, "N H W"]:
    """1 where the beam is open, 0 behind ``shutter_sides`` collimator shutters (chosen with
    ``p_shutter``; random sides, each cutting ``shutter_depth`` of the image's side)."""
    g = generator
    out = torch.ones(n, h, w)
    lo, hi = config.shutter_sides
    for i in torch.nonzero(_chosen(n, config.p_shutter, g)).flatten().tolist():
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        for side in torch.randperm(4, generator=g)[:k].tolist():
            depth = float(_u(config.shutter_depth, (), g))
            if side == 0:
                out[i, : int(round(depth * h))] = 0
            elif side == 1:
                out[i, h - int(round(depth * h)) :] = 0
            elif side == 2:
                out[i, :, : int(round(depth * w))] = 0
            else:
                out[i, :, w - int(round(depth * w)) :] = 0
    return out


def column_gain(n: int, w: int, *, config: AugmentConfig, generator: torch.Generator) -> Float[Tensor, "N 1 W"]:
    """A multiplicative gain per detector column (1 where not chosen with ``p_gain``)."""
    g = generator
    std = _u(config.column_gain_std, (n, 1, 1), g) * _chosen(n, config.p_gain, g)[:, None, None]
    return (1 + std * torch.randn(n, 1, w, generator=g)).clamp_min(0.5)
