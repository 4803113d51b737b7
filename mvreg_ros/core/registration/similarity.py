"""Image similarities, batched over views, restricted to a mask (the field of view).

All return one value per view in [-1, 1] (1 = identical up to an affine intensity change).
"""

from __future__ import annotations

import typing

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

_EPS = 1e-8


def _moments(x: Tensor, y: Tensor, w: Tensor, patch: int | None):
    """Weighted local means/variances over non-overlapping patches (whole image if None)."""
    if patch is None:
        pool = lambda t: t.sum((-2, -1), keepdim=True)
    else:
        pool = lambda t: F.avg_pool2d(t, patch, stride=patch) * patch * patch
    sw = pool(w)
    swc = sw.clamp_min(_EPS)
    mx, my = pool(w * x) / swc, pool(w * y) / swc
    sxx = (pool(w * x * x) / swc - mx * mx).clamp_min(0)
    syy = (pool(w * y * y) / swc - my * my).clamp_min(0)
    sxy = pool(w * x * y) / swc - mx * my
    return sw, sxx, syy, sxy


def _standardise(x: Tensor, w: Tensor) -> Tensor:
    """Masked z-score per view, so local moments are computed at unit scale (no float32 cancellation)."""
    sw = w.sum((-2, -1), keepdim=True).clamp_min(_EPS)
    m = (w * x).sum((-2, -1), keepdim=True) / sw
    var = (w * (x - m) ** 2).sum((-2, -1), keepdim=True) / sw
    return (x - m) / torch.sqrt(var + 1e-12)


_VAR_FLOOR = 1e-4  # of a standardised image: a patch flatter than this carries no information


@typing.no_type_check  # validates its own inputs (tests check its errors); no jaxtyping/beartype wrapper
def ncc(
    x: Float[Tensor, "V H W"],
    y: Float[Tensor, "V H W"],
    w: Float[Tensor, "V H W"] | None = None,
    *,
    patch: int | None = None,
) -> Float[Tensor, "V"]:  # noqa: F821
    """Normalised cross-correlation, global (``patch=None``) or the weighted mean over
    non-overlapping ``patch x patch`` windows. Patches less than half inside the mask, or flat in
    the target ``y``, do not count; each patch's correlation is bounded to [-1, 1]."""
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    w = torch.ones_like(x) if w is None else w.to(x)
    x, y = _standardise(x, w), _standardise(y, w)
    x, y, w = x[:, None], y[:, None], w[:, None]
    sw, sxx, syy, sxy = _moments(x, y, w, patch)
    r = (sxy / torch.sqrt((sxx + 1e-6) * (syy + 1e-6))).clamp(-1, 1)
    informative = syy > _VAR_FLOOR
    if patch is not None:
        informative = informative & (sw >= 0.5 * patch * patch)
    weight = sw * informative
    return (r * weight).sum((1, 2, 3)) / weight.sum((1, 2, 3)).clamp_min(_EPS)


_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8


def gradients(x: Float[Tensor, "V H W"]) -> tuple[Tensor, Tensor]:
    k = _SOBEL.to(x)
    xx = F.pad(x[:, None], (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(xx, k[None, None])[:, 0]
    gy = F.conv2d(xx, k.T[None, None])[:, 0]
    return gx, gy


def erode(mask: Float[Tensor, "V H W"], px: int = 1) -> Float[Tensor, "V H W"]:
    if px <= 0:
        return mask
    return -F.max_pool2d(-mask[:, None], 2 * px + 1, stride=1, padding=px)[:, 0]


def gradient_ncc(x: Tensor, y: Tensor, w: Tensor | None = None, *, patch: int | None = None) -> Tensor:
    """Mean of the NCCs of the horizontal and vertical Sobel gradients (mask eroded by 2 px so
    the field-of-view border is not an edge)."""
    w = torch.ones_like(x) if w is None else erode(w.to(x), 2)
    gx1, gy1 = gradients(x)
    gx2, gy2 = gradients(y)
    return 0.5 * (ncc(gx1, gx2, w, patch=patch) + ncc(gy1, gy2, w, patch=patch))


def image_similarity(drr: Tensor, target: Tensor, mask: Tensor, *, patch: int = 9, grad_weight: float = 0.5) -> Tensor:
    """The refinement's similarity per view: (1 - g) * patch NCC + g * patch gradient NCC."""
    s = (1 - grad_weight) * ncc(drr, target, mask, patch=patch)
    if grad_weight > 0:
        s = s + grad_weight * gradient_ncc(drr, target, mask, patch=patch)
    return s


def multiscale_ncc(drr: Tensor, target: Tensor, mask: Tensor | None = None, *, patches: tuple = (None, 9)) -> Tensor:
    """Mean of NCCs at several patch sizes (None = global); the training image loss."""
    return torch.stack([ncc(drr, target, mask, patch=p) for p in patches]).mean(0)
