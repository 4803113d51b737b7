"""Pictures for visual checks: target X-ray, DRR at the estimate, DRR edges over the target
(``mvreg demo``), and the node's colour fusion of every view (``~/overlay``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.geometry.transforms import invert, transform_points
from mvreg_ros.core.imaging.views import ViewSet
from mvreg_ros.core.registration.refine import pooling_factor
from mvreg_ros.core.registration.similarity import gradients

if TYPE_CHECKING:
    from mvreg_ros.core.registration.refine import Registrar


def normalise_for_display(x: Tensor, mask: Tensor | None) -> Tensor:
    """To [0, 1] between the 1st and 99th percentiles inside the mask (the whole image without one)."""
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
    t = normalise_for_display(target.detach().float().cpu(), mask)
    d = normalise_for_display(drr.detach().float().cpu(), mask)
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


def fusion_rgb(
    registrar: Registrar, views: ViewSet, T_ref_from_ct: Float[Tensor, "4 4"], *, max_size: int = 256
) -> np.ndarray:
    """Views side by side, (H, V*W, 3) uint8, at most ``max_size`` pixels a side: the X-ray in
    magenta, the DRR at the pose in green (grey where they agree), black outside the field of view."""
    factor = max(1, math.ceil(max(views.height, views.width) / max_size))
    v = views.downsampled(factor)
    T_cam_from_ct = invert(v.T_ref_from_cam.to(torch.float64)) @ T_ref_from_ct.to(torch.float64)
    # pool the volume so a voxel is about a pixel at the anatomy
    c_cam = transform_points(T_cam_from_ct, registrar.centre_ct.to(T_cam_from_ct)[None].expand(len(v), 1, 3))[:, 0]
    pixel_mm = float((c_cam[:, 2].abs() / v.K[:, 0, 0]).mean())
    vfactor = pooling_factor(pixel_mm / float(registrar.volume.spacing.min()), nearest=False)
    with torch.no_grad():
        drr = registrar.renderer(vfactor)(T_cam_from_ct, v.K, v.height, v.width).float().cpu()
    panels = []
    for i in range(len(v)):
        m = (v.masks[i].float().cpu() > 0).float()
        a = normalise_for_display(v.images[i].float().cpu(), m) * m
        b = normalise_for_display(drr[i], m) * m
        panels.append(torch.stack([a, b, a], -1))
    return (torch.cat(panels, 1) * 255).round().to(torch.uint8).numpy()
