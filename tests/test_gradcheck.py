"""torch.autograd.gradcheck in float64 against finite differences, for both backends.

docs/semantics.md section 2 makes the AKL weights constants for autograd (as the paper's code does), so the
AKL gradient is that of w_head(s0) * FKL(s) + w_tail(s0) * RKL(s) with the weights frozen at
the point s0 where it is taken. The checked function adds, with detached statistics,
(w(s0) - w(s)) * KL(s) to the loss: at s0 this is zero and has no gradient, and its value near
s0 is the frozen-weight loss whose finite differences gradcheck compares with our backward.
For FKL and RKL the weights are fixed and the added terms vanish.
"""

import pytest
import torch

from akl_kernels import akl_loss, fkl_loss, rkl_loss


CASES = [("akl", "mean"), ("akl", "sum"), ("akl", "none"), ("fkl", "mean"), ("rkl", "none")]
LOSSES = {"akl": akl_loss, "fkl": fkl_loss, "rkl": rkl_loss}


@pytest.mark.parametrize("mode,reduction", CASES)
def test_gradcheck(backend, mode, reduction):
    # Distinct, well-separated teacher logits keep the head/tail split away from the mu
    # boundary, where the (piecewise constant) split would make finite differences jump.
    # (Small: the Triton interpreter runs the kernel twice per input element.)
    fn = LOSSES[mode]
    student = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([2.5, 1.0, -0.25, -1.0, -2.0, -3.5], dtype=torch.float64).expand(3, 6).clone()
    teacher[2] = teacher[2].flip(0)
    teacher[0, 3] = float("-inf")
    labels = torch.tensor([0, -100, 5])
    kwargs = dict(temperature=1.3, labels=labels, backend=backend)
    _, base = fn(student.detach(), teacher, reduction="none", return_stats=True, **kwargs)
    kept = (labels != -100).sum()

    def frozen_weight_loss(s):
        loss, stats = fn(s, teacher, reduction=reduction, return_stats=True, **kwargs)
        drift = (base.head_weight - stats.head_weight) * stats.fkl + (base.tail_weight - stats.tail_weight) * stats.rkl
        if reduction == "none":
            return loss + drift
        return loss + (drift.sum() / kept if reduction == "mean" else drift.sum())

    # Under the Triton interpreter each evaluation costs seconds: fast mode checks the gradient
    # along a random direction (two evaluations) instead of one column per input element.
    assert torch.autograd.gradcheck(frozen_weight_loss, (student,), eps=1e-6, atol=1e-7, fast_mode=backend == "triton")


def test_akl_weights_are_constants_for_autograd(backend):
    # Without the frozen weights, finite differences see the weights move: gradcheck must fail,
    # which shows the check above is sensitive to what it claims to test.
    student = torch.randn(1, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[2.5, 1.0, -0.25, -1.0, -2.0, -3.5]], dtype=torch.float64)
    assert not torch.autograd.gradcheck(
        lambda s: akl_loss(s, teacher, backend=backend), (student,), eps=1e-6, atol=1e-7, raise_exception=False
    )
