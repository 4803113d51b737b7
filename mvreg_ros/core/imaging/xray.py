"""From raw detector images to what the similarity compares: line-integral images,
a field-of-view mask and intrinsics at the working resolution."""

from __future__ import annotations

import dataclasses
import math
import typing

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.geometry.transforms import scale_intrinsics

DEEPFLUORO_I0 = 65487.0


@dataclasses.dataclass(frozen=True)
class PreparedImage:
    image: Float[Tensor, "H W"]  # line integrals (bone bright)
    mask: Float[Tensor, "H W"]  # 1 inside the field of view, 0 outside
    K: Float[Tensor, "3 3"]


def check_image(image: Tensor, name: str = "image") -> Tensor:
    """Reject what cannot be registered: wrong rank, NaN/inf, constant images."""
    if not isinstance(image, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(image).__name__}")
    if image.ndim != 2:
        raise ValueError(f"{name} must be 2D (H, W), got shape {tuple(image.shape)}")
    if min(image.shape) < 8:
        raise ValueError(f"{name} is too small: {tuple(image.shape)}")
    if not torch.isfinite(image).all():
        raise ValueError(f"{name} contains NaN or infinite pixels")
    if float(image.max() - image.min()) <= 0:
        raise ValueError(f"{name} is constant ({float(image.min())}): nothing to register")
    return image


def _quantile(x: Tensor, q: float) -> Tensor:
    """The ``q`` quantile of ``x``'s values, from at most about 65536 of them (evenly strided:
    torch.quantile refuses very large inputs, and an image's quantiles need no more): the values
    of :func:`quantile_reference` (``torch.quantile``'s linear interpolation), bit for bit, from two
    selections instead of a sort (0.4 against 4.5 ms for 65536 values on the CPU; a node preparing
    a biplane set takes several)."""
    flat = x.reshape(-1)
    flat = flat[:: max(1, flat.numel() // 65536)]
    if not 0 <= q <= 1:
        raise ValueError(f"quantile q must be in [0, 1], got {q}")
    if flat.numel() == 0 or flat.dtype not in (torch.float32, torch.float64) or bool(torch.isnan(flat).any()):
        return torch.quantile(flat, q)  # its errors and its NaN
    # as torch.quantile: rank q (n - 1) in the values' dtype, the values either side of it, lerp
    rank = torch.tensor(q, dtype=flat.dtype, device=flat.device) * (flat.numel() - 1)
    below, above = int(rank), int(torch.ceil(rank))
    lo = torch.kthvalue(flat, below + 1).values
    hi = lo if above == below else torch.kthvalue(flat, above + 1).values
    return torch.lerp(lo, hi, rank - below)


def quantile_reference(x: Tensor, q: float) -> Tensor:
    """:func:`_quantile` by ``torch.quantile`` (a sort): the tested reference."""
    flat = x.reshape(-1)
    return torch.quantile(flat[:: max(1, flat.numel() // 65536)], q)


def _span_fill(lit: Tensor, min_lit_fraction: float) -> Tensor:
    """``lit`` with every pixel that lies between two lit pixels of its row or of its column
    added; rows/columns with fewer than ``min_lit_fraction`` lit pixels add nothing."""

    def spans(x: Tensor) -> Tensor:  # along the last axis
        n = x.shape[-1]
        idx = torch.arange(n, device=x.device)
        first = torch.where(x, idx, n).amin(-1, keepdim=True)
        last = torch.where(x, idx, -1).amax(-1, keepdim=True)
        enough = x.float().mean(-1, keepdim=True) >= min_lit_fraction
        return (idx >= first) & (idx <= last) & enough

    return lit | spans(lit) | spans(lit.T).T


def _drop_specks(lit: Tensor, min_fraction: float) -> Tensor:
    """``lit`` without its connected regions smaller than ``min_fraction`` of the image (burned-in
    labels, markers); the largest region always stays."""
    from scipy import ndimage

    labels, n = ndimage.label(lit.cpu().numpy())
    if n <= 1:
        return lit
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = sizes >= min_fraction * lit.numel()
    keep[int(sizes.argmax())] = True
    keep[0] = False
    return torch.from_numpy(keep[labels]).to(lit.device)


def detect_fov(
    raw: Float[Tensor, "H W"],
    *,
    rel_threshold: float = 0.03,
    margin_px: float = 5.0,
    min_lit_fraction: float = 0.02,
    min_speck_fraction: float = 0.03,
    shutter_factor: float = 2.0,
) -> Float[Tensor, "H W"]:
    """Mask of the detector's field of view in a raw (intensity) image.

    Pixels without signal (below ``rel_threshold`` of the 99th percentile) are outside the
    field of view only where they are not enclosed by signal: thick anatomy (a lateral spine,
    the mediastinum, metal) on a flat panel that also sees the direct beam can be darker than
    that and is still inside. So the lit region is filled along rows and columns (every pixel
    between two lit pixels of its row or column; collimator shutters and the corners outside an
    image intensifier's circle stay out). If some pixels are out and the filled region is round
    (an image intensifier), the mask is the fitted circle shrunk by ``margin_px``; otherwise it
    is the filled region itself. A region that is not round is tried once more without its lit
    specks smaller than ``min_speck_fraction`` of the image (burned-in labels, which the filling
    would join to the corners). On a flat panel whose edge rows or columns hold no signal
    (collimator shutters), pixels more than ``shutter_factor`` times the shutters' own level (the
    99th percentile of those edge lines) count as signal too, so thick anatomy beside a shutter,
    which signal does not enclose (a lateral chest), stays in: it is dark against the direct beam
    but not against the shutter."""
    raw = raw.float()
    hi = _quantile(raw, 0.99)
    lit = raw > rel_threshold * hi
    frac = float(lit.float().mean())
    if frac < 0.05:
        raise ValueError(f"empty field of view: only {frac:.1%} of the image has signal")
    filled = _span_fill(lit, min_lit_fraction)
    if float(filled.float().mean()) > 0.98:
        return torch.ones_like(raw)
    circle = _fitted_circle(filled, margin_px)
    if circle is None:  # burned-in labels can join the corners to the field: try without small specks
        circle = _fitted_circle(_span_fill(_drop_specks(lit, min_speck_fraction), min_lit_fraction), margin_px)
    if circle is not None:
        return circle.float()
    floor = _shutter_level(raw, lit, min_lit_fraction)
    if floor is None:
        return filled.float()
    # a flat panel with collimator shutters: signal is what rises above the shutters' own level (thick
    # anatomy beside a shutter can be far below rel_threshold of the direct beam and still well above it)
    faint = lit | _drop_specks(raw > shutter_factor * floor, min_speck_fraction)
    return (filled | _span_fill(faint, min_lit_fraction)).float()


def _shutter_level(raw: Tensor, lit: Tensor, min_lit_fraction: float) -> float | None:
    """The no-signal level behind collimator shutters: the 99th percentile of the image's outermost
    rows and columns that have (almost) no lit pixel; None when every edge has signal."""
    edges = [(raw[0], lit[0]), (raw[-1], lit[-1]), (raw[:, 0], lit[:, 0]), (raw[:, -1], lit[:, -1])]
    dark = [r for r, m in edges if float(m.float().mean()) < min_lit_fraction]
    if not dark:
        return None
    return float(_quantile(torch.cat(dark), 0.99))


def _fitted_circle(region: Tensor, margin_px: float) -> Tensor | None:
    """The circle of ``region``'s area about its centroid, shrunk by ``margin_px``, if the region
    is round: the circle lies inside it, and hardly any of it lies outside the circle (a collimated
    rectangle holds a circle too, but has corners); else None."""
    H, W = region.shape
    v, u = torch.meshgrid(
        torch.arange(H, dtype=torch.float32, device=region.device),
        torch.arange(W, dtype=torch.float32, device=region.device),
        indexing="ij",
    )
    r2 = (u - u[region].mean()) ** 2 + (v - v[region].mean()) ** 2
    radius = math.sqrt(float(region.sum()) / math.pi)
    circle = r2 <= (radius - margin_px) ** 2
    agree = float((circle & region).sum()) / max(float(circle.sum()), 1.0)
    beyond = float((region & (r2 > (radius + 1.5) ** 2)).sum()) / max(float(region.sum()), 1.0)
    return circle if agree > 0.97 and beyond < 0.03 else None


def log_linearize(
    raw: Float[Tensor, "H W"], *, i0: float | None = None, mask: Tensor | None = None
) -> Float[Tensor, "H W"]:
    """Detector intensities to line integrals ``log(I0 / I)``; without ``i0``, the brightest
    (99.9th percentile) pixel inside the mask stands for the unattenuated beam."""
    raw = raw.float()
    if i0 is None:
        inside = raw[mask > 0] if mask is not None else raw.reshape(-1)
        i0 = float(_quantile(inside, 0.999))
    if i0 <= 0:
        raise ValueError(f"i0 must be positive, got {i0}")
    P = math.log(i0) - torch.log(raw.clamp_min(1.0))
    if mask is not None:
        P = P * mask
    return P


@typing.no_type_check  # validates its own inputs (tests check its errors); no jaxtyping/beartype wrapper
def downsample(image: Tensor, K: Tensor, factor: int) -> tuple[Tensor, Tensor]:
    """Average-pool an (..., H, W) image by an integer factor and rescale K to match."""
    if factor == 1:
        return image, K
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    lead = image.shape[:-2]
    x = image.reshape(-1, 1, *image.shape[-2:])
    H, W = x.shape[-2:]
    x = x[..., : H - H % factor, : W - W % factor]
    y = F.avg_pool2d(x, factor)
    return y.reshape(*lead, *y.shape[-2:]), scale_intrinsics(K, 1.0 / factor)


def resize_to(image: Tensor, K: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Downsample so that the longer side is at most ``size`` pixels (integer factor)."""
    factor = max(1, math.ceil(max(image.shape[-2:]) / size))
    return downsample(image, K, factor)


def prepare(
    raw: Float[Tensor, "H W"],
    K: Float[Tensor, "3 3"],
    *,
    i0: float | None = None,
    fov_mask: Tensor | None = None,
    raw_is_line_integral: bool = False,
) -> PreparedImage:
    """Check, mask and log-linearise one raw detector image (full resolution)."""
    check_image(raw)
    if raw_is_line_integral:
        mask = torch.ones_like(raw, dtype=torch.float32) if fov_mask is None else fov_mask.float()
        return PreparedImage(image=raw.float() * mask, mask=mask, K=K)
    mask = detect_fov(raw) if fov_mask is None else fov_mask.float()
    return PreparedImage(image=log_linearize(raw, i0=i0, mask=mask), mask=mask, K=K)
