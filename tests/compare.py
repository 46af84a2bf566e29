"""Runs of the library's losses for the tests, checked row by row with reference/compare.py."""

from __future__ import annotations

import torch

from akl_kernels import akl_loss, fkl_loss, rkl_loss
from reference.compare import assert_rows_match_reference

LOSS_FUNCTIONS = {"akl": akl_loss, "fkl": fkl_loss, "rkl": rkl_loss}


def run_loss(mode, student, teacher, backend, *, mu=0.5, temperature=1.0, labels=None):
    """Per-row loss, statistics and gradient of one of the library's losses (reduction "none")."""
    s = student.detach().clone().requires_grad_(True)
    kwargs = dict(temperature=temperature, labels=labels, reduction="none", return_stats=True, backend=backend)
    if mode == "akl":
        kwargs["mu"] = mu
    loss, stats = LOSS_FUNCTIONS[mode](s, teacher, **kwargs)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), stats, s.grad


def assert_matches_reference(
    mode, student, teacher, backend, *, mu=0.5, temperature=1.0, labels=None, ignore_index=-100
):
    """Check loss, gradient and every statistic of each row against the reference."""
    loss, stats, grad = run_loss(mode, student, teacher, backend, mu=mu, temperature=temperature, labels=labels)
    assert_rows_match_reference(
        mode, student, teacher, loss, stats, grad, mu=mu, temperature=temperature, labels=labels,
        ignore_index=ignore_index,
    )
