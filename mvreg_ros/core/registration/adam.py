"""Adam for the refinement's twist: the arithmetic of ``torch.optim.Adam`` (its single-tensor path: no
weight decay, no AMSGrad; the default on the CPU) on a few small tensors, without the optimizer's
per-step machinery (parameter groups, hooks, profiler records, state dictionaries). A refinement takes
about a hundred steps of two ``(K, 3)`` tensors, where that machinery cost more than the update itself
(0.14 against 0.04 ms a step on the bench's 2-core VM; README *Speed*). The same values bit for bit as
``torch.optim.Adam(..., foreach=False)`` (test/core/registration/test_adam.py checks, step by step
with changing step sizes), which stays the reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class TwistAdam:
    """Adam on ``params`` (leaf tensors, updated in place), one step size per tensor, set at each
    :meth:`step` (the refinement's cosine decay). ``betas`` and ``eps`` as ``torch.optim.Adam``'s."""

    def __init__(self, params: list[Tensor], *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if not params:
            raise ValueError("TwistAdam needs at least one tensor")
        for p in params:
            if not isinstance(p, Tensor) or not p.is_leaf or not p.is_floating_point():
                raise TypeError(f"TwistAdam takes floating-point leaf tensors, got {p!r}")
        beta1, beta2 = betas
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1) or not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"betas must lie in [0, 1) and eps be >= 0, got betas {betas} and eps {eps}")
        self.params = list(params)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.steps = [0] * len(self.params)  # per tensor, as torch's state["step"]

    @torch.no_grad()
    def step(self, lrs: list[float] | tuple[float, ...]) -> None:
        """One update of every tensor from its ``.grad`` with step size ``lrs[i]`` (a tensor without a
        gradient is left as it is, as torch's Adam leaves it), then the gradients are cleared (set to
        None, as ``zero_grad(set_to_none=True)``)."""
        if len(lrs) != len(self.params):
            raise ValueError(f"one step size per tensor ({len(self.params)}), got {len(lrs)}")
        beta1, beta2 = self.beta1, self.beta2
        for i, (p, m, v, lr) in enumerate(zip(self.params, self.exp_avg, self.exp_avg_sq, lrs)):
            g = p.grad
            if g is None:
                continue
            self.steps[i] += 1
            step = float(self.steps[i])
            bias_correction1 = 1 - beta1**step
            bias_correction2_sqrt = (1 - beta2**step) ** 0.5
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-(float(lr) / bias_correction1))
            p.grad = None
