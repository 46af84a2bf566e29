"""What every backend computes: per-row losses, statistics and the gradient, for one loss mode.

A backend is a function ``row_losses(student, teacher, keep, grad_scale, config, compute_grad,
grad_out=None)`` returning :class:`RowLosses`. ``grad_out``, when given, is where the gradient
is written (student-shaped, the student's dtype, contiguous); it may be the student tensor
itself, since each row is read before its gradient is written. The dispatcher in ``loss.py`` validates inputs, picks a backend and
applies the reduction; backends only do the per-row work of SPEC section 2.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

# How many of the teacher's largest logits the Triton kernel keeps per row in its first pass.
# When the crossing of mu happens among them (the usual case at T = 1), the split is exact
# without looking further; otherwise bracket passes run for that row only.
TOPK = 32

# Order of the floating statistics in RowLosses.stats.
STATS_FIELDS = ("fkl", "rkl", "head_gap", "tail_gap", "head_weight", "tail_weight")


class LossMode(enum.IntEnum):
    """Which weights combine FKL and RKL: gap-weighted (AKL) or fixed to (1, 0) / (0, 1)."""

    AKL = 0
    FKL = 1
    RKL = 2


@dataclass(frozen=True)
class RowLossConfig:
    """Runtime parameters of one loss call.

    mode: LossMode.
    mu: head mass in (0, 1].
    temperature: T > 0.
    split: compute the head/tail split (always for AKL; for FKL/RKL only when statistics are
        requested, since their weights do not depend on it).
    stats: the statistics will be returned. The head size is one of them only, so a backend
        for which counting it costs a pass may leave it 0 when stats is False.
    """

    mode: LossMode
    mu: float
    temperature: float
    split: bool
    stats: bool = True


class RowLosses(NamedTuple):
    """Output of a backend for N rows of vocabulary size V.

    loss: (N,) compute dtype; 0 at ignored rows, NaN at kept rows with NaN/+inf logits or an
        empty support.
    stats: (6, N) compute dtype, rows ordered as STATS_FIELDS; 0 at ignored rows.
    head_size: (N,) int64.
    grad: student-shaped, student dtype, contiguous: d(sum_i grad_scale * loss_i)/d student,
        0 at ignored rows; None when no gradient was asked for.
    split_path: (N,) int32 code of how each row's head/tail split was found, for diagnostics
        (the backend's split_path_name names them), or None.
    """

    loss: torch.Tensor
    stats: torch.Tensor
    head_size: torch.Tensor
    grad: Optional[torch.Tensor]
    split_path: Optional[torch.Tensor] = None


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any of the inputs' dtypes is float64, else float32 (SPEC section 2, step 2)."""
    if torch.float64 in dtypes:
        return torch.float64
    return torch.float32
