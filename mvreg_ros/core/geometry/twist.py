"""The refinement's pose parametrisation: a twist about the anatomy centre, and its fast gradient.

``pose_about(T0, c, w, t) = T0 @ Tc @ [exp(w) | t] @ Tc^-1`` with ``Tc`` the translation to the
centre ``c`` (CT axes, mm): ``w`` (radians) turns the anatomy about ``c``, ``t`` (mm) moves it; both
zero give ``T0``. Every iteration of a refinement differentiates it, so it has three paths:

- :func:`pose_about_reference`: the composition of :mod:`transforms`' functions, differentiated by
  autograd through about twenty small operations;
- :func:`pose_about_written`: the same forward operations (the same values, bit for bit) as one autograd
  node whose backward is written out (:func:`so3_exp_vjp`, the translation's chain rule). Its
  gradients agree with the reference's to rounding (a test checks, including the series branch near
  zero and 180 degrees); forward and backward it takes about 40 % less time than the reference (0.59
  against 0.97 ms per call for one pose on the 2-core VM). It is the path on a GPU;
- :func:`pose_about`, on a CPU: the same arithmetic in the native extension (``rendering/csrc/pose_chain.cpp``),
  one call forward and one backward (0.10 against 0.45 ms for :func:`pose_about_written`), values and
  gradients the reference's to rounding, exactly ``T0`` at a zero twist (README *Speed*).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.geometry.transforms import about_point, axial, make_T, so3_exp
from mvreg_ros.core.rendering import pose_chain  # the native extension's pose chain (CPU)

# below this squared angle the left Jacobian's coefficients come from their series (three terms:
# error under 1e-16 there; the closed forms lose digits to cancellation as the angle shrinks)
_SERIES_THETA2 = 1e-4


def _cross(a: Tensor, b: Tensor) -> Tensor:
    """``a x b`` broadcast (``torch.linalg.cross`` needs as many dimensions on both: one twist ``(3,)`` on a
    batch of starts gives ``(K, 3)`` gradients)."""
    a, b = torch.broadcast_tensors(a, b)
    return torch.linalg.cross(a, b)


def so3_exp_vjp(
    w: Float[Tensor, "*B 3"], R: Float[Tensor, "*B 3 3"], grad_R: Float[Tensor, "*B 3 3"]
) -> Float[Tensor, "*B 3"]:
    """The gradient with respect to ``w`` of a loss whose gradient with respect to ``R = so3_exp(w)``
    is ``grad_R``. With ``exp(w + d) = exp(J_l(w) d) R`` to first order (``J_l``, the left Jacobian
    ``I + b [w]x + c [w]x^2``, ``b = (1 - cos a) / a^2``, ``c = (a - sin a) / a^3``), the loss changes by
    ``m . J_l d``, where ``m`` is the axial vector of ``grad_R R^T``; so the gradient is ``J_l^T m =
    m - b (w x m) + c (w x (w x m))``. Exact at ``w = 0`` (``m``) and at 180 degrees."""
    m = axial(grad_R @ R.transpose(-1, -2))
    theta2 = (w * w).sum(-1, keepdim=True)
    series = theta2 < _SERIES_THETA2
    theta2_safe = torch.where(series, torch.ones_like(theta2), theta2)
    theta = theta2_safe.sqrt()
    b = torch.where(series, 0.5 - theta2 / 24 + theta2 * theta2 / 720, (1 - torch.cos(theta)) / theta2_safe)
    c = torch.where(
        series, 1.0 / 6 - theta2 / 120 + theta2 * theta2 / 5040, (theta - torch.sin(theta)) / (theta2_safe * theta)
    )
    wm = _cross(w, m)
    return m - b * wm + c * _cross(w, wm)


def _sum_to(x: Tensor, shape: torch.Size) -> Tensor:
    """``x`` summed over the dimensions that broadcasting added to or expanded in ``shape``."""
    x = x.sum(tuple(range(x.ndim - len(shape)))) if x.ndim > len(shape) else x
    expanded = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(expanded, keepdim=True) if expanded else x


def _composed(T0: Tensor, c: Tensor, R: Tensor, t: Tensor) -> Tensor:
    """``T0 @ Tc @ [R | t] @ Tc^-1``: the operations both paths compute forward."""
    return T0 @ about_point(make_T(R, t), c)


class _PoseAbout(torch.autograd.Function):
    """:func:`pose_about_reference`'s forward; the gradients of ``w`` and ``t`` written out (``T0`` and
    ``c`` constant: :func:`pose_about` sends those that need gradients to the reference)."""

    @staticmethod
    def forward(ctx, T0: Tensor, c: Tensor, w: Tensor, t: Tensor) -> Tensor:
        R = so3_exp(w)
        T = _composed(T0, c, R, t)  # pose_about_reference's operations, in its order
        ctx.save_for_backward(T0, c, w, R)
        ctx.t_shape = t.shape
        return T

    @staticmethod
    def backward(ctx, grad_T: Tensor):
        T0, c, w, R = ctx.saved_tensors
        # T = T0 @ A with A = [R | c + t - R c]: dL/dA = T0^T dL/dT (A's last row is constant)
        grad_A = T0.transpose(-1, -2) @ grad_T
        grad_t = grad_A[..., :3, 3]
        grad_R = grad_A[..., :3, :3] - grad_t[..., :, None] * c  # the - R c term: - grad_t c^T
        grad_w = so3_exp_vjp(w, R, grad_R)  # broadcast to the output's batch; summed back to w's below
        return None, None, _sum_to(grad_w, w.shape), _sum_to(grad_t, ctx.t_shape)


def pose_about_reference(
    T0: Float[Tensor, "*#K 4 4"], c: Float[Tensor, "3"], w: Float[Tensor, "*#K 3"], t: Float[Tensor, "*#K 3"]
) -> Float[Tensor, "*#K 4 4"]:
    """``T0 @ Tc @ [exp(w) | t] @ Tc^-1`` (twist about the anatomy centre ``c`` in CT axes; radians,
    mm), differentiated by autograd through its operations: the reference of :func:`pose_about`."""
    return _composed(T0, c, so3_exp(w), t)


def pose_about_written(
    T0: Float[Tensor, "*#K 4 4"], c: Float[Tensor, "3"], w: Float[Tensor, "*#K 3"], t: Float[Tensor, "*#K 3"]
) -> Float[Tensor, "*#K 4 4"]:
    """:func:`pose_about_reference`'s values bit for bit as ATen operations, with the gradients of ``w``
    and ``t`` computed in one step (module docstring): any device. When ``T0`` or ``c`` needs a gradient,
    or none is needed, the reference computes it."""
    if not torch.is_grad_enabled() or T0.requires_grad or c.requires_grad or not (w.requires_grad or t.requires_grad):
        return pose_about_reference(T0, c, w, t)
    return _PoseAbout.apply(T0, c, w, t)


def pose_about(
    T0: Float[Tensor, "*#K 4 4"], c: Float[Tensor, "3"], w: Float[Tensor, "*#K 3"], t: Float[Tensor, "*#K 3"]
) -> Float[Tensor, "*#K 4 4"]:
    """The refinement's parametrisation (module docstring): on a CPU in float64 the native extension's
    (:mod:`mvreg_ros.core.rendering.pose_chain`: one call forward, one backward; the reference's values to
    rounding, exactly at a zero twist), elsewhere :func:`pose_about_written`."""
    T = pose_chain.pose_about(T0, c, w, t)
    return pose_about_written(T0, c, w, t) if T is None else T
