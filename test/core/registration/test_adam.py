"""TwistAdam against its reference, torch.optim.Adam's single-tensor path: the same values bit for bit."""

import math

import pytest
import torch

from mvreg_ros.core.registration.adam import TwistAdam


def _loss(w, t, k):  # a bumpy function of both tensors, different at every step
    return ((w * (1.0 + 0.1 * k)).sin().sum() + (t**2 * 0.3).sum() + (w[..., :1] * t[..., 1:2]).exp().sum()) * 1.7


@pytest.mark.parametrize("K", [1, 3])
def test_twist_adam_matches_torch_adam_bit_for_bit(K):
    gen = torch.Generator().manual_seed(K)
    w0, t0 = (
        torch.randn(K, 3, generator=gen, dtype=torch.float64),
        torch.randn(K, 3, generator=gen, dtype=torch.float64),
    )
    w, t = w0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
    w_ref, t_ref = w0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
    ours = TwistAdam([w, t])
    ref = torch.optim.Adam([{"params": [w_ref], "lr": 1.0}, {"params": [t_ref], "lr": 1.0}], foreach=False)
    for k in range(40):
        decay = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * k / 39))  # the refinement's cosine decay
        lrs = (0.026 * decay, 3.0 * decay)
        _loss(w, t, k).backward()
        ours.step(lrs)
        ref.zero_grad(set_to_none=True)
        _loss(w_ref, t_ref, k).backward()
        for group, lr in zip(ref.param_groups, lrs):
            group["lr"] = lr
        ref.step()
        assert torch.equal(w, w_ref) and torch.equal(t, t_ref), f"step {k + 1}"
        assert w.grad is None and t.grad is None  # cleared, as zero_grad(set_to_none=True)
    assert ours.steps == [40, 40]


def test_twist_adam_leaves_a_tensor_without_gradient_as_torch_does():
    a, b = torch.ones(2, 3, dtype=torch.float64, requires_grad=True), torch.ones(2, 3, requires_grad=True)
    a_ref, b_ref = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    ours = TwistAdam([a, b])
    ref = torch.optim.Adam([a_ref, b_ref], lr=0.1, foreach=False)
    for k in range(3):
        (a * (k + 1.0)).sum().backward()  # b gets no gradient
        ours.step([0.1, 0.1])
        ref.zero_grad(set_to_none=True)
        (a_ref * (k + 1.0)).sum().backward()
        ref.step()
    assert torch.equal(a, a_ref) and torch.equal(b, b_ref) and bool((b == 1).all())
    assert ours.steps == [3, 0]


def test_twist_adam_rejects_bad_inputs():
    with pytest.raises(ValueError, match="at least one"):
        TwistAdam([])
    with pytest.raises(TypeError, match="leaf"):
        TwistAdam([torch.zeros(3, dtype=torch.long)])
    with pytest.raises(ValueError, match="betas"):
        TwistAdam([torch.zeros(3, requires_grad=True)], betas=(1.0, 0.9))
    opt = TwistAdam([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match="one step size per tensor"):
        opt.step([0.1, 0.2])
