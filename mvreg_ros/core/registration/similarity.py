"""Image similarities, batched over views, restricted to a mask (the field of view).

All return one value per view in [-1, 1] (1 = identical up to an affine intensity change).
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from mvreg_ros.core.rendering import native

_EPS = 1e-8
SIMILARITY_BACKENDS = ("auto", "native", "torch")


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


class PreparedSimilarity:
    """:func:`image_similarity` against fixed targets, fast: the refinement compares many renders
    with the same X-ray images under the same weights, so everything that depends only on the
    target (its standardised intensity and gradients, their patch means and variances, the
    eroded masks) is computed once here, and each call pools the render's moments for every
    channel (intensity, horizontal and vertical gradient) and every weighting in one
    ``avg_pool2d``. The same values as the weighted sum of :func:`image_similarity` over
    ``weightings`` (the reference path; tests compare values and gradients).

    ``weightings``: ``(mask, weight)`` pairs, each mask ``(N, H, W)``; the result is
    ``sum(weight * image_similarity(drr, target, mask))``. A call with ``n * N`` renders compares
    render ``k * N + i`` with target ``i`` (the targets tiled ``n`` times, as a batch of poses).

    ``backend``: ``"native"`` computes each call in the native extension's fused kernel
    (``csrc/patch_ncc.cpp``: one pass per render, float64, the gradient in the same pass; several
    times faster on a CPU than the ATen ops, which allocate about thirty full-size images per
    channel); ``"torch"`` with ATen ops (any device; the reference the tests compare it with);
    ``"auto"``: native for targets on the CPU when the extension is built, else torch."""

    def __init__(
        self,
        target: Float[Tensor, "N H W"],
        weightings: Sequence[tuple[Tensor, float]],
        *,
        patch: int,
        grad_weight: float = 0.5,
        backend: str = "auto",
    ):
        if backend not in SIMILARITY_BACKENDS:
            raise ValueError(f"backend must be one of {SIMILARITY_BACKENDS}, got {backend!r}")
        if not weightings:
            raise ValueError("PreparedSimilarity needs at least one (mask, weight) pair")
        if not isinstance(patch, int) or isinstance(patch, bool) or patch < 1:
            raise ValueError(f"patch must be an int >= 1, got {patch!r}")
        for m, _ in weightings:
            if m.shape != target.shape:
                raise ValueError(f"mask shape {tuple(m.shape)} differs from the target's {tuple(target.shape)}")
        self.patch, self.grad_weight, self.shape = patch, float(grad_weight), tuple(target.shape)
        channels = 3 if grad_weight > 0 else 1
        # channel weights of the similarity: (1 - g) intensity, g / 2 each gradient, times the weighting's weight
        cw = [1 - self.grad_weight] + [0.5 * self.grad_weight] * (channels - 1)
        self._cw = torch.tensor([wt * c for _, wt in weightings for c in cw], dtype=target.dtype, device=target.device)
        w = []
        for m, _ in weightings:
            m = m.to(target)
            w.append(m[:, None])
            if channels == 3:
                e = erode(m, 2)[:, None]
                w += [e, e]
        self._w = torch.cat(w, 1)  # (N, C, H, W), C = channels per weighting x weightings
        self._J = len(weightings)
        self._sw_img = self._w.sum((-2, -1), keepdim=True).clamp_min(_EPS)
        y = self._standardised(self._channels(target), self._w, self._sw_img)
        sw, wy, wyy = self._pool(torch.cat([self._w, self._w * y, self._w * y * y], 1)).chunk(3, 1)
        self._sw, self._swc = sw, sw.clamp_min(_EPS)
        self._my = wy / self._swc
        self._syy = (wyy / self._swc - self._my * self._my).clamp_min(0)
        self._wy = self._w * y
        informative = (self._syy > _VAR_FLOOR) & (sw >= 0.5 * patch * patch)
        self._weight = sw * informative
        self._norm = self._weight.sum((2, 3)).clamp_min(_EPS)  # (N, C)
        self._fused = self._fused_inputs(backend, channels)

    def read_pixels(self) -> Bool[Tensor, "N H W"]:
        """Where the value reads a render's pixels (bool, per target): where a weighting weights the
        intensity, and the 3 x 3 Sobel neighbourhoods of where it weights the gradients. Elsewhere a
        render's values change nothing, and their gradient is zero (:class:`~mvreg_ros.core.rendering.
        subset.RaySubset` renders only these)."""
        K = self._w.shape[1] // self._J  # image channels per weighting: intensity (and the two gradients)
        w = self._w != 0  # any weight, not only positive ones
        read = w[:, ::K].any(1)
        if K == 3:
            g = (w[:, 1::K] | w[:, 2::K]).any(1)
            read = read | (F.max_pool2d(g[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0)
        return read

    def _fused_inputs(self, backend: str, channels: int) -> tuple | None:
        """The fused kernel's inputs (float64, contiguous; each patch's coefficient of its correlation
        in the result), or None when the torch path serves: ``backend="torch"``, a target off the
        CPU, or (``"auto"``) no native extension."""
        if backend == "torch" or self._w.device.type != "cpu":
            if backend == "native":
                raise ValueError(f"backend 'native' needs targets on the CPU, got {self._w.device}")
            return None
        if native.load() is None:
            if backend == "native":
                raise RuntimeError("backend 'native': the native extension is not available (see its build warning)")
            return None
        d = torch.float64
        coef = self._weight.to(d) / self._norm.to(d)[..., None, None] * self._cw.to(d)[None, :, None, None]
        moments = (self._sw_img.flatten(1), self._swc, self._my, self._syy)
        return (
            self._w.to(d).contiguous(),
            self._wy.to(d).contiguous(),
            *(t.to(d).contiguous() for t in moments),
            coef.contiguous(),
            channels,
            self.patch,
        )

    def _channels(self, x: Tensor) -> Tensor:
        """(N, H, W) -> (N, C, H, W): intensity and Sobel gradients, repeated for each weighting."""
        if self.grad_weight > 0:
            k = torch.stack([_SOBEL, _SOBEL.T])[:, None].to(x)
            g = F.conv2d(F.pad(x[:, None], (1, 1, 1, 1), mode="replicate"), k)
            x = torch.cat([x[:, None], g], 1)
        else:
            x = x[:, None]
        return x.repeat(1, self._J, 1, 1)

    @staticmethod
    def _standardised(x: Tensor, w: Tensor, sw: Tensor) -> Tensor:
        """``x`` standardised per channel under the weights ``w`` (zero weighted mean, unit weighted
        variance), with the weights' sums ``sw`` given."""
        m = (w * x).sum((-2, -1), keepdim=True) / sw
        xc = x - m
        var = (w * xc * xc).sum((-2, -1), keepdim=True) / sw
        return xc / torch.sqrt(var + 1e-12)

    def _pool(self, t: Tensor) -> Tensor:
        p = self.patch
        return F.avg_pool2d(t, p, stride=p) * (p * p)

    def _tile(self, t: Tensor, n: int) -> Tensor:
        return t if n == 1 else t.repeat(n, 1, 1, 1)

    @property
    def backend(self) -> str:
        """Which path the calls take: ``"native"`` (the fused kernel) or ``"torch"``."""
        return "torch" if self._fused is None else "native"

    def __call__(self, drr: Float[Tensor, "M H W"]) -> Float[Tensor, "M"]:  # noqa: F821
        self._check_tiles(drr)
        if self._fused is not None and drr.device.type == "cpu":
            return _fused_similarity(drr.contiguous(), self._fused)
        return self.reference(drr)

    def _check_tiles(self, drr: Tensor) -> None:
        if drr.shape[1:] != self.shape[1:] or len(drr) % self.shape[0]:
            raise ValueError(f"renders {tuple(drr.shape)} do not tile the targets {self.shape}")

    def value_vjp(self, drr: Float[Tensor, "M H W"]) -> tuple[Float[Tensor, "M"], Callable[[Tensor], Tensor]] | None:  # noqa: F821
        """:meth:`__call__`'s value and its pullback (the gradient of the values to that of the renders)
        without autograd, with the fused kernel: the same kernel call and product as autograd through
        ``__call__``, the same values bit for bit. None where the torch path serves (then autograd)."""
        self._check_tiles(drr)
        if self._fused is None or drr.device.type != "cpu":
            return None
        value, grad = native.load().patch_ncc(drr.detach().contiguous(), *self._fused, True)
        return value, lambda grad_value: grad_value[:, None, None] * grad  # _FusedPatchNcc.backward's product

    def reference(self, drr: Float[Tensor, "M H W"]) -> Float[Tensor, "M"]:  # noqa: F821
        """The value with ATen ops (the torch backend; the fused kernel's reference)."""
        N = self.shape[0]
        n = len(drr) // N
        w = self._tile(self._w, n)
        x = self._standardised(self._channels(drr), w, self._tile(self._sw_img, n))
        wx = w * x
        C = x.shape[1]
        pooled = self._pool(torch.cat([wx, wx * x, self._tile(self._wy, n) * x], 1))
        wxs, wxx, wxy = pooled[:, :C], pooled[:, C : 2 * C], pooled[:, 2 * C :]
        swc, my = self._tile(self._swc, n), self._tile(self._my, n)
        mx = wxs / swc
        sxx = (wxx / swc - mx * mx).clamp_min(0)
        sxy = wxy / swc - mx * my
        r = (sxy / torch.sqrt((sxx + 1e-6) * (self._tile(self._syy, n) + 1e-6))).clamp(-1, 1)
        per_channel = (r * self._tile(self._weight, n)).sum((2, 3)) / self._norm.repeat(n, 1)  # (M, C)
        return per_channel @ self._cw


class _FusedPatchNcc(torch.autograd.Function):
    """The fused kernel's value; its gradient comes from the same pass (no second derivative)."""

    @staticmethod
    def forward(ctx, drr: Tensor, inputs: tuple) -> Tensor:
        value, grad = native.load().patch_ncc(drr, *inputs, True)
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_value: Tensor):
        (grad,) = ctx.saved_tensors
        return grad_value[:, None, None] * grad, None


def _fused_similarity(drr: Tensor, inputs: tuple) -> Tensor:
    if torch.is_grad_enabled() and drr.requires_grad:
        return _FusedPatchNcc.apply(drr, inputs)
    return native.load().patch_ncc(drr, *inputs, False)[0]
