"""The renderer backend "compiled": sums of trilinear samples along rays in plain PyTorch
operations (explicit gathers and lerps), written for ``torch.compile`` to fuse sample generation,
interpolation and the sums into one loop with no per-sample tensor in memory (Triton on a GPU,
C++ on a CPU).

Like the native kernel (:mod:`mvreg_ros.core.rendering.native`), the forward pass also returns the
sums of the samples' gradients, ``G = sum_k grad f(p_k)`` and ``H = sum_k k grad f(p_k)``, which
are the derivatives with respect to each ray's first sample ``p0`` and step ``q``
(``p_k = p0 + k q``); the backward pass is then a multiplication per ray instead of autograd
through every sample.
"""

from __future__ import annotations

import typing

import torch
from jaxtyping import Float
from torch import Tensor
from torch.autograd.function import once_differentiable

from mvreg_ros.core.rendering.native import check_sums_inputs


@typing.no_type_check  # traced by torch.compile (the jaxtyping/beartype wrapper of the tests breaks tracing)
def _lerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    return a + (b - a) * t


@typing.no_type_check  # traced by torch.compile (the jaxtyping/beartype wrapper of the tests breaks tracing)
def gather_sums(
    padded: Float[Tensor, "D H W"], p0: Float[Tensor, "*B 3"], q: Float[Tensor, "*B 3"], n_samples: int, with_grad: bool
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """``F = sum_k f(p0 + k q)`` (and ``G``, ``H`` with ``with_grad``) for the trilinear
    interpolation f of ``padded`` in index coordinates (x fastest), positions clamped to
    ``[0, N - 1]`` per axis (grid_sample's border padding for a volume padded by one replicated
    voxel; NaN to 0), a clamped coordinate having zero gradient. Not differentiable itself."""
    D, H, W = padded.shape
    flat = padded.reshape(-1)
    k = torch.arange(n_samples, dtype=p0.dtype, device=p0.device)
    p = p0[..., None, :] + k[:, None] * q[..., None, :]  # (*B, S, 3), fused away by torch.compile
    rx, ry, rz = p[..., 0], p[..., 1], p[..., 2]
    hx, hy, hz = W - 1, H - 1, D - 1
    # clamp (NaN -> 0, as the native kernel), then the cell index at most N - 2 (at x = N - 1, fx = 1),
    # so every neighbour read lies inside the volume
    x, y, z = (torch.where(r >= 0, r, 0.0).clamp(max=m) for r, m in ((rx, hx), (ry, hy), (rz, hz)))
    x0, y0, z0 = x.floor().clamp(max=W - 2), y.floor().clamp(max=H - 2), z.floor().clamp(max=D - 2)
    fx, fy, fz = x - x0, y - y0, z - z0
    sy, sz = W, W * H
    i = z0.long() * sz + y0.long() * sy + x0.long()
    # a_zyx: the cell's corners
    a000, a001, a010, a011 = flat[i], flat[i + 1], flat[i + sy], flat[i + sy + 1]
    a100, a101, a110, a111 = flat[i + sz], flat[i + sz + 1], flat[i + sz + sy], flat[i + sz + sy + 1]
    e00, e01 = _lerp(a000, a001, fx), _lerp(a010, a011, fx)
    e10, e11 = _lerp(a100, a101, fx), _lerp(a110, a111, fx)
    c0, c1 = _lerp(e00, e01, fy), _lerp(e10, e11, fy)
    F = _lerp(c0, c1, fz).sum(-1)
    if not with_grad:
        return F
    dfx = _lerp(_lerp(a001 - a000, a011 - a010, fy), _lerp(a101 - a100, a111 - a110, fy), fz) * ((rx >= 0) & (rx <= hx))
    dfy = _lerp(e01 - e00, e11 - e10, fz) * ((ry >= 0) & (ry <= hy))
    dfz = (c1 - c0) * ((rz >= 0) & (rz <= hz))
    G = torch.stack([dfx.sum(-1), dfy.sum(-1), dfz.sum(-1)], -1)
    Hk = torch.stack([(dfx * k).sum(-1), (dfy * k).sum(-1), (dfz * k).sum(-1)], -1)
    return F, G, Hk


class _GatherSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, padded: Tensor, p0: Tensor, q: Tensor, n_samples: int) -> Tensor:
        F, G, H = gather_sums(padded, p0, q, n_samples, True)
        ctx.save_for_backward(G, H)
        return F

    @staticmethod
    @once_differentiable  # G and H are not differentiable: a second derivative raises instead of being wrong
    def backward(ctx, grad_f: Tensor):
        G, H = ctx.saved_tensors  # dF/dp0 and dF/dq, from the forward pass
        return None, grad_f[..., None] * G, grad_f[..., None] * H, None


@typing.no_type_check  # traced by torch.compile (the jaxtyping/beartype wrapper of the tests breaks tracing)
def sample_sums(
    padded: Float[Tensor, "D H W"], p0: Float[Tensor, "*B 3"], q: Float[Tensor, "*B 3"], n_samples: int
) -> Float[Tensor, "*B"]:
    """``sum_k f(p0 + k q)``, k = 0..n_samples-1 (see :func:`gather_sums`); differentiable in
    ``p0`` and ``q``. Same contract as :func:`mvreg_ros.core.rendering.native.sample_sums`."""
    check_sums_inputs(padded, n_samples)
    if torch.is_grad_enabled() and (p0.requires_grad or q.requires_grad):
        return _GatherSums.apply(padded, p0, q, int(n_samples))
    return gather_sums(padded, p0, q, int(n_samples), False)
