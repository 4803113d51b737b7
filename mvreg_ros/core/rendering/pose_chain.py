"""The refinement's pose chain in the native extension (``csrc/pose_chain.cpp``): the twist about the
anatomy centre to the pose (:func:`mvreg_ros.core.geometry.twist.pose_about`), and the pose to what the
native renderer reads (:func:`mvreg_ros.core.rendering.renderer.index_from_cam`), forward and backward
in one call each. Every refinement iteration runs both; as ATen operations on tiny tensors they were
about forty calls (0.8 ms per iteration forward and backward on the 2-core VM), here two each way.

Used where it applies (a CPU, float64, the extension built, the shapes below); elsewhere (a GPU, other
shapes, gradients with respect to the start pose or the centre) the callers compute the reference's
operations. Values agree with the references to rounding (the same formulas in the same order; the
compiler may fuse multiply-adds and ATen may sum in another order), exactly at a zero twist; tests
compare values and gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mvreg_ros.core.rendering import native


def _native_ready(*tensors: Tensor) -> bool:
    """All on the CPU in float64, and the extension available (:func:`native.load`: built once, then
    cached; None where it cannot be built, and the callers take the ATen path)."""
    if any(x.device.type != "cpu" or x.dtype != torch.float64 for x in tensors):
        return False
    return native.load() is not None


class _NativePoseAbout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, T0: Tensor, c: Tensor, w: Tensor, t: Tensor) -> Tensor:
        T, R = native._module().pose_about_forward(T0, c, w, t)
        ctx.save_for_backward(T0, c, w, R)
        return T

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_T: Tensor):
        T0, c, w, R = ctx.saved_tensors
        gw, gt = native._module().pose_about_backward(T0, c, w, R, grad_T.contiguous())
        return None, None, gw, gt


def pose_about(T0: Tensor, c: Tensor, w: Tensor, t: Tensor) -> Tensor | None:
    """:func:`~mvreg_ros.core.geometry.twist.pose_about` in the extension, differentiable in ``w`` and
    ``t``; None where it does not apply: ``T0`` ``(4, 4)`` or ``(B, 4, 4)``, ``w`` and ``t`` both ``(3,)``
    or both ``(B, 3)`` (``B`` = ``T0``'s, or any with a ``T0`` of ``(4, 4)`` or ``(1, 4, 4)``), ``c`` ``(3,)``, no gradient
    asked of ``T0`` or ``c``, float64 on the CPU."""
    prepared = _pose_about_args(T0, c, w, t)
    if prepared is None:
        return None
    args, lead = prepared
    if torch.is_grad_enabled() and (w.requires_grad or t.requires_grad):
        T = _NativePoseAbout.apply(*args)
    else:
        T = native._module().pose_about_forward(*args)[0]
    return T.reshape(*lead, 4, 4)


def pose_about_vjp(
    T0: Tensor, c: Tensor, w: Tensor, t: Tensor
) -> tuple[Tensor, Callable[[Tensor], tuple[Tensor, Tensor]]] | None:
    """:func:`pose_about`'s pose (no gradient) and its pullback (the gradient of the pose to those of ``w``
    and ``t``, in their shapes) without autograd: the same kernel calls as its forward and backward, the same
    values bit for bit. None where :func:`pose_about` would not run in the extension."""
    prepared = _pose_about_args(T0, c, w.detach(), t.detach())
    if prepared is None:
        return None
    (T0_, c_, w_, t_), lead = prepared
    T, R = native._module().pose_about_forward(T0_, c_, w_, t_)

    def pullback(grad_T: Tensor) -> tuple[Tensor, Tensor]:
        gw, gt = native._module().pose_about_backward(T0_, c_, w_, R, grad_T.reshape(T.shape).contiguous())
        return gw.reshape(w.shape), gt.reshape(t.shape)

    return T.reshape(*lead, 4, 4), pullback


def _pose_about_args(T0: Tensor, c: Tensor, w: Tensor, t: Tensor) -> tuple[list[Tensor], tuple[int, ...]] | None:
    """The kernel's inputs ``(T0, c, w, t)`` as ``(B, 4, 4)``, ``(1, 3)``, ``(B, 3)``, ``(B, 3)`` and the
    pose's leading shape, or None where it does not apply (:func:`pose_about`)."""
    if not _native_ready(T0, c, w, t) or w.shape != t.shape or c.shape != (3,) or w.shape[-1:] != (3,):
        return None
    if T0.requires_grad or c.requires_grad:
        return None
    if w.ndim == 1 and T0.shape == (4, 4):
        lead: tuple[int, ...] = ()
    elif w.ndim == 2 and T0.shape in ((4, 4), (1, 4, 4), (len(w), 4, 4)):
        lead = (len(w),)
    else:
        return None
    args = [x.reshape(-1, *shape).contiguous() for x, shape in ((T0, (4, 4)), (c, (3,)), (w, (3,)), (t, (3,)))]
    return args, lead


def _index_from_cam_args(T_index_from_ct: Tensor, T_cam_from_ct: Tensor) -> tuple[Tensor, Tensor] | None:
    """The kernel's ``(1, 4, 4)`` and ``(V, 4, 4)`` inputs, or None where it does not apply."""
    if not _native_ready(T_index_from_ct, T_cam_from_ct) or T_index_from_ct.requires_grad:
        return None
    if T_index_from_ct.shape != (4, 4) or T_cam_from_ct.ndim != 3 or T_cam_from_ct.shape[1:] != (4, 4):
        return None
    return T_index_from_ct.reshape(1, 4, 4).contiguous(), T_cam_from_ct.contiguous()


class _NativeIndexFromCam(torch.autograd.Function):
    @staticmethod
    def forward(ctx, T_index_from_ct: Tensor, T_cam_from_ct: Tensor) -> Tensor:
        ctx.save_for_backward(T_index_from_ct, T_cam_from_ct)
        return native._module().index_from_cam_forward(T_index_from_ct, T_cam_from_ct)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        T_index_from_ct, T_cam_from_ct = ctx.saved_tensors
        return None, native._module().index_from_cam_backward(T_index_from_ct, T_cam_from_ct, grad.contiguous())


def index_from_cam(T_index_from_ct: Tensor, T_cam_from_ct: Tensor) -> Tensor | None:
    """:func:`~mvreg_ros.core.rendering.renderer.index_from_cam` in the extension, differentiable in
    ``T_cam_from_ct`` ``(V, 4, 4)``; None where it does not apply (``T_index_from_ct`` needing a gradient,
    other shapes, not float64 on the CPU)."""
    args = _index_from_cam_args(T_index_from_ct, T_cam_from_ct)
    if args is None:
        return None
    A, T = args
    if torch.is_grad_enabled() and T.requires_grad:
        return _NativeIndexFromCam.apply(A, T)
    return native._module().index_from_cam_forward(A, T)


def index_from_cam_vjp(
    T_index_from_ct: Tensor, T_cam_from_ct: Tensor
) -> tuple[Tensor, Callable[[Tensor], Tensor]] | None:
    """:func:`index_from_cam`'s value and its pullback (the gradient of ``T_index_from_cam`` to that of
    ``T_cam_from_ct``) without autograd: the same kernel calls as its forward and backward, the same values
    bit for bit. None where :func:`index_from_cam` would not run in the extension."""
    args = _index_from_cam_args(T_index_from_ct, T_cam_from_ct.detach())
    if args is None:
        return None
    A, T = args

    def pullback(grad: Tensor) -> Tensor:
        return native._module().index_from_cam_backward(A, T, grad.contiguous())

    return native._module().index_from_cam_forward(A, T), pullback
