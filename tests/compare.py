"""Runs of the library's losses for the tests, checked row by row with reference/compare.py."""

from __future__ import annotations

import contextlib
import functools
from unittest import mock

import torch

from akl_kernels import LOSSES, akl_loss, distillation_loss, fkl_loss, rkl_loss, torch_backend
from reference.compare import assert_rows_match_reference

# Every loss of the family by name: the named functions where they exist (fkl_loss and rkl_loss
# take no mu), distillation_loss(loss=name) for the others.
LOSS_FUNCTIONS = {
    **{name: functools.partial(distillation_loss, loss=name) for name in LOSSES},
    "akl": akl_loss,
    "fkl": fkl_loss,
    "rkl": rkl_loss,
}
# The losses without mu (their statistics split at 0.5).
WITHOUT_MU = ("fkl", "rkl")
# Parameter values the tests sweep, per loss that has one.
PARAMETER_VALUES = {"jsd": [("beta", 0.1), ("beta", 0.5), ("beta", 0.9)],
                    "skl": [("alpha", 0.1), ("alpha", 0.5), ("alpha", 1.0)],
                    "srkl": [("alpha", 0.1), ("alpha", 0.5), ("alpha", 1.0)]}


def run_loss(mode, student, teacher, backend, *, mu=0.5, temperature=1.0, labels=None, parameters=None):
    """Per-row loss, statistics and gradient of one of the library's losses (reduction "none")."""
    s = student.detach().clone().requires_grad_(True)
    kwargs = dict(temperature=temperature, labels=labels, reduction="none", return_stats=True, backend=backend)
    if mode not in WITHOUT_MU:
        kwargs["mu"] = mu
    loss, stats = LOSS_FUNCTIONS[mode](s, teacher, **kwargs, **(parameters or {}))
    loss.backward(torch.ones_like(loss))
    return loss.detach(), stats, s.grad


@contextlib.contextmanager
def torch_ops_split():
    """Within it the torch backend splits CPU rows with torch ops (as it does a GPU's rows, or
    without numba) instead of its compiled row split."""
    with mock.patch.object(torch_backend, "compiled_row_split", lambda: None):
        yield


def assert_matches_reference(
    mode, student, teacher, backend, *, mu=0.5, temperature=1.0, labels=None, ignore_index=-100, parameters=None
):
    """Check loss, gradient and every statistic of each row against the reference."""
    loss, stats, grad = run_loss(
        mode, student, teacher, backend, mu=mu, temperature=temperature, labels=labels, parameters=parameters
    )
    assert_rows_match_reference(
        mode, student, teacher, loss, stats, grad, mu=mu if mode not in WITHOUT_MU else 0.5,
        temperature=temperature, labels=labels, ignore_index=ignore_index, parameters=parameters,
    )
