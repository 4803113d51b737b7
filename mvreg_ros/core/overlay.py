"""Pictures for visual checks: target X-ray, DRR at the estimate, and DRR edges over the target."""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .similarity import gradients


def _normalise(x: Tensor, mask: Tensor | None) -> Tensor:
    inside = x[mask > 0] if mask is not None and bool((mask > 0).any()) else x.reshape(-1)
    lo, hi = torch.quantile(inside, 0.01), torch.quantile(inside, 0.99)
    return ((x - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)


def edges(drr: Float[Tensor, "H W"], quantile: float = 0.9) -> Float[Tensor, "H W"]:
    """Binary map of the strongest DRR gradients."""
    gx, gy = gradients(drr[None])
    mag = torch.sqrt(gx**2 + gy**2)[0]
    return (mag > torch.quantile(mag.reshape(-1), quantile)).float()


def overlay_rgb(target: Float[Tensor, "H W"], drr: Float[Tensor, "H W"], mask: Tensor | None = None) -> np.ndarray:
    """H x 3W x 3 uint8: target | DRR | target (grey) with DRR edges (green)."""
    t = _normalise(target.detach().float().cpu(), mask)
    d = _normalise(drr.detach().float().cpu(), mask)
    e = edges(drr.detach().float().cpu())
    if mask is not None:
        e = e * (mask.detach().float().cpu() > 0)
    grey = torch.stack([t, t, t], -1)
    over = grey.clone()
    over[e > 0] = torch.tensor([0.1, 1.0, 0.2])
    panel = torch.cat([grey, torch.stack([d, d, d], -1), over], 1)
    return (panel.numpy() * 255).round().astype(np.uint8)


def save_overlay(path, target: Tensor, drr: Tensor, mask: Tensor | None = None, *, scale: int = 1) -> None:
    from PIL import Image

    img = Image.fromarray(overlay_rgb(target, drr, mask))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
