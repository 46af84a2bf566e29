"""What every backend computes: per-row losses, statistics and the gradient, for one loss mode.

A backend (:class:`RowBackend`) has two functions:

- ``row_losses(student, teacher, keep, grad_scale, config, compute_grad, grad_out=None)``
  returns :class:`RowLosses`: per-row losses, statistics, a per-row state, and the gradient of
  ``sum_i grad_scale * loss_i`` when compute_grad (the hidden-state losses need it then);
- ``row_gradient(student, teacher, keep, row_scale, state, config, grad_out=None)`` returns the
  gradient of ``sum_i row_scale_i * loss_i`` later, from the inputs and that state: the
  backward pass of ``akl_loss`` folds grad_output into row_scale, so that the gradient is
  rounded to the student's dtype once, after the loss scale (float16 training) has entered.

``grad_out``, when given, is where the gradient is written (student-shaped, the student's dtype,
contiguous); it may be the student tensor itself, since each row is read before its gradient is
written. The dispatcher in ``loss.py`` validates inputs, picks a backend and applies the
reduction; backends only do the per-row work (README "What it computes").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .divergences import LossMode

# How many of the teacher's largest logits the Triton kernel keeps per row in its first pass.
# When the crossing of mu happens among them (the usual case at T = 1), the split is exact
# without looking further; otherwise bracket passes run for that row only.
TOPK = 32

# Order of the floating statistics in RowLosses.stats.
STATS_FIELDS = ("fkl", "rkl", "head_gap", "tail_gap", "head_weight", "tail_weight")


@dataclass(frozen=True)
class RowLossConfig:
    """Runtime parameters of one loss call.

    mode: LossMode (divergences.py).
    mu: head mass in (0, 1].
    temperature: T > 0.
    split: compute the head/tail split (always for AKL; for the other losses only when
        statistics are requested, since nothing else of theirs depends on it).
    stats: the statistics will be returned. The head size is one of them only, so a backend
        for which counting it costs a pass may leave it 0 when stats is False.
    mixture: (w_p, w_q), the weights of M = w_p p + w_q q for the divergences that mix p and q
        (divergences.py), from their parameter; unused by the others.
    """

    mode: LossMode
    mu: float
    temperature: float
    split: bool
    stats: bool = True
    mixture: tuple[float, float] = (0.0, 0.0)


class RowLosses(NamedTuple):
    """Output of a backend for N rows of vocabulary size V.

    loss: (N,) compute dtype; 0 at ignored rows, NaN at kept rows with NaN/+inf logits or an
        empty support.
    stats: (6, N) compute dtype, rows ordered as STATS_FIELDS; 0 at ignored rows.
    head_size: (N,) int64.
    grad: student-shaped, student dtype, contiguous: d(sum_i grad_scale * loss_i)/d student,
        0 at ignored rows; None when no gradient was asked for.
    split_path: (N,) int32 code of how each row's head/tail split was found, for diagnostics
        (the backend's split_path_name names them).
    state: (N, k) compute dtype, k = RowBackend.state_columns(teacher): what the backend's
        row_gradient reads per row.
    """

    loss: torch.Tensor
    stats: torch.Tensor
    head_size: torch.Tensor
    grad: Optional[torch.Tensor]
    split_path: torch.Tensor
    state: torch.Tensor


class RowBackend(NamedTuple):
    """One backend: its name (that of its custom operators, _ops.py), its two functions (module
    docstring), the student dtypes for which akl_loss takes the gradient from row_losses in the
    forward pass (where it costs least) rather than from row_gradient in backward, the names of
    its split_path codes, and the number of columns of its (N, columns) state for a teacher (a
    tensor or a TeacherTopK; what the operators' shape functions need)."""

    name: str
    row_losses: Callable[..., RowLosses]
    row_gradient: Callable[..., torch.Tensor]
    forward_gradient_dtypes: tuple[torch.dtype, ...]
    split_path_name: Callable[[int], str]
    state_columns: Callable[..., int]


def times_log_ratio(x, log_x, log_y):
    """x (log x - log y), and 0 where x is 0 (docs/semantics.md rule 21: a term of probability 0
    is 0, whatever its log-ratio)."""
    return torch.where(x > 0, x * (log_x - log_y), 0.0)


# The divergences made of terms (divergences.py): mode -> function (p, q, log p, log q, (w_p, w_q))
# -> (l, h), both (R, V): the term l_j whose row sum is the divergence and h_j = q_j dD/dq_j,
# from which the backends make the gradient, (h_j - q_j sum h) / T. p, q are 0 and their logs
# -inf outside the support (and wherever a log-probability is beyond float32's range); every term
# is 0 there. The torch backend applies them to chunks of rows, _sparse_rows.py to the outcomes
# of a stored teacher (the listed tokens and the bucket).


def _mixture_log(log_p, log_q, mixture):
    """log M, M = w_p p + w_q q, as the log-sum-exp of the two weighted log-probabilities."""
    w_p, w_q = mixture
    return torch.logaddexp(log_p + _log_weight(w_p), log_q + _log_weight(w_q))


def _log_weight(weight):
    return float("-inf") if weight == 0 else math.log(weight)


def _ratio(x, log_x, log_m):
    """x / M, and 0 where x is 0."""
    return torch.where(x > 0, (log_x - log_m).exp(), 0.0)


def _jsd_terms(p, q, log_p, log_q, mixture):
    # l = w_p p log(p / M) + w_q q log(q / M); dl/dq_j = w_q log(q_j / M_j) (the M terms cancel).
    w_p, w_q = mixture
    log_m = _mixture_log(log_p, log_q, mixture)
    q_part = times_log_ratio(q, log_q, log_m)
    return times_log_ratio(p, log_p, log_m).mul_(w_p).add_(q_part, alpha=w_q), q_part.mul_(w_q)


def _tvd_terms(p, q, log_p, log_q, mixture):
    # l = |p - q| / 2; dl/dq_j = sign(q_j - p_j) / 2, sign(0) = 0.
    q_minus_p = q - p
    return q_minus_p.abs().mul_(0.5), q_minus_p.sign_().mul_(q).mul_(0.5)


def _skl_terms(p, q, log_p, log_q, mixture):
    # l = p log(p / M); dl/dq_j = -w_q p_j / M_j.
    log_m = _mixture_log(log_p, log_q, mixture)
    return times_log_ratio(p, log_p, log_m), _ratio(p, log_p, log_m).mul_(q).mul_(-mixture[1])


def _srkl_terms(p, q, log_p, log_q, mixture):
    # l = q log(q / M); dl/dq_j = log(q_j / M_j) + 1 - w_q q_j / M_j (the 1 cancels in the gradient).
    log_m = _mixture_log(log_p, log_q, mixture)
    term = times_log_ratio(q, log_q, log_m)
    return term, term - _ratio(q, log_q, log_m).mul_(q).mul_(mixture[1])


TERMS = {LossMode.JSD: _jsd_terms, LossMode.TVD: _tvd_terms, LossMode.SKL: _skl_terms, LossMode.SRKL: _srkl_terms}


def loss_weights(kl_weights, head_gap, tail_gap):
    """(head_weight, tail_weight) per row: the loss's fixed kl_weights (divergences.py), or for
    AKL (kl_weights None) the gaps' shares, 0.5 each where both gaps are 0 (rule 9)."""
    if kl_weights is not None:
        return tuple(torch.full_like(head_gap, w) for w in kl_weights)
    total_gap = head_gap + tail_gap
    tied = total_gap == 0
    total_gap = torch.where(tied, 1.0, total_gap)
    return torch.where(tied, 0.5, head_gap / total_gap), torch.where(tied, 0.5, tail_gap / total_gap)


def is_nan_or_inf(x: torch.Tensor) -> torch.Tensor:
    """Elementwise: x is NaN or +inf (what makes a row invalid, docs/semantics.md rule 20)."""
    return x.isnan() | (x == float("inf"))


def is_traced(x: torch.Tensor) -> bool:
    """Whether x is one of torch.compile's (or opcheck's) fake or functional tensors, which hold no
    values and have no data pointer: code that reads values or pointers must take another way."""
    try:
        x.data_ptr()
    except RuntimeError:
        return True
    return False


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any of the inputs' dtypes is float64, else float32 (docs/semantics.md
    section 2, rule 3)."""
    if torch.float64 in dtypes:
        return torch.float64
    return torch.float32
