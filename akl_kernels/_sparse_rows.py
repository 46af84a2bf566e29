"""Rows against a sparse teacher (TeacherTopK): the maths over the K listed tokens, shared by both
backends, around two vocabulary-long passes over the student that each backend provides.

A backend's part (:class:`StudentPasses`):

- ``unlisted_logsumexp(student, indices, keep, temperature, dtype)`` reads each kept student row
  once and returns three (N,) tensors: m, the largest student logit s among the support tokens
  that are not listed (-inf exactly when there are none), the log-sum-exp of (s - m) / T over
  those tokens (in dtype; computed from them alone, never as a difference; -inf when there are
  none), and whether the row holds NaN or +inf (bool);
- ``gradient(student, indices, keep, temperature, shift, lse, listed_grad, unlisted_factor,
  grad_out)`` writes the gradient once: ``listed_grad`` (N, K) at listed tokens,
  ``exp((s_j - shift) / T - lse) * unlisted_factor`` at the other support tokens, 0 off the
  support and on ignored rows, rounded once to the student's dtype (into grad_out when given).

Logits are shifted by a row's largest before T divides them (docs/semantics.md rule 21), so
that no finite logit overflows at a small T: q_j = exp((s_j - shift) / T - lse) with shift the
row's largest support logit and lse the log-sum-exp of (s - shift) / T.

Everything else (the listed student logits, the normaliser, the bucket, FKL and RKL, the head
among the listed tokens, the gaps, weights, loss and the gradient's coefficients) is computed
here on (N, K) tensors: nothing vocabulary-sized is made for the teacher. The rules are those of
docs/semantics.md, rules 31-38. ``indices`` are sorted ascending per row (padding -1 first), and
the listed values travel in that order, so that a pass can find the listed tokens of each block
of the row as a contiguous run of them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

from ._rows import (
    TERMS, RowBackend, RowLossConfig, RowLosses, compute_dtype, is_nan_or_inf, loss_weights, times_log_ratio,
)
from .divergences import BY_MODE

# The floor of the bucket's teacher mass (rule 33): keeps RKL finite when the stored
# log-probabilities leave no missing mass after rounding.
BUCKET_FLOOR = 2.0**-24

# Leading columns of the per-row state that row_gradient reads; the K listed coefficients follow.
STATE_SHIFT, STATE_LSE, STATE_UNLISTED, STATE_COLUMNS = 0, 1, 2, 3


class StudentPasses(NamedTuple):
    """A backend's two vocabulary-long passes over the student (module docstring)."""

    unlisted_logsumexp: Callable[..., tuple]
    gradient: Callable[..., torch.Tensor]


def sparse_backend(name, passes: StudentPasses, split_path_name) -> RowBackend:
    """The RowBackend of a backend for TeacherTopK teachers, built on its two passes."""
    return RowBackend(
        name=name,
        row_losses=functools.partial(sparse_row_losses, passes),
        row_gradient=functools.partial(sparse_row_gradient, passes),
        # The gradient pass reads the student again either way; in backward it also takes
        # grad_output in before the one rounding to the student's dtype.
        forward_gradient_dtypes=(),
        split_path_name=split_path_name,
        state_columns=lambda teacher: STATE_COLUMNS + teacher.indices.shape[-1],
    )


def sorted_by_index(teacher):
    """(indices, logprobs) of a TeacherTopK as (N, K) tensors, each row sorted by index (-1 first)."""
    listed = teacher.indices.shape[-1]
    indices, order = teacher.indices.reshape(-1, listed).to(torch.int64).sort(dim=-1)
    logprobs = teacher.logprobs.reshape(-1, listed).gather(-1, order)
    return indices, logprobs


class _Listed(NamedTuple):
    """The (N, K) and (N,) values of the listed tokens and the bucket that loss and gradient use."""

    valid: torch.Tensor  # (N, K) bool: listed, on the student's support, teacher log-prob > -inf
    log_p: torch.Tensor  # (N, K) 0 where not valid
    p: torch.Tensor
    log_q: torch.Tensor
    q: torch.Tensor
    bucket: torch.Tensor  # (N,) bool: some support token is not listed
    log_p_bucket: torch.Tensor
    p_bucket: torch.Tensor
    log_q_bucket: torch.Tensor
    q_bucket: torch.Tensor
    shift: torch.Tensor  # (N,) the largest student logit of the support (0 where there is none)
    lse: torch.Tensor  # (N,) log-sum-exp of (s - shift) / T over the whole support
    invalid: torch.Tensor  # (N,) bool: NaN/+inf in the row, or an empty support


def _listed_values(passes, student, indices, logprobs, keep, temperature, dtype) -> _Listed:
    """Rules 31-33: the two distributions on the listed tokens and the bucket."""
    safe = indices.clamp(min=0).reshape(*student.shape[:-1], indices.shape[-1])
    listed_s = student.gather(-1, safe).reshape(indices.shape).to(dtype)  # (N, K)
    log_p = logprobs.to(dtype)
    listed = indices >= 0
    valid = listed & (listed_s > float("-inf")) & (log_p > float("-inf"))
    unlisted_max, unlisted_lse, has_nan_or_inf = passes.unlisted_logsumexp(student, indices, keep, temperature, dtype)
    bad_logprobs = (listed & is_nan_or_inf(log_p)).any(-1)

    # The row's shift: its largest support logit, over the unlisted tokens (from the pass) and
    # the listed ones; x = (s - shift) / T <= 0 cannot overflow.
    shift = torch.maximum(unlisted_max, torch.where(valid, listed_s, float("-inf")).amax(-1))
    shift = torch.where(shift.isfinite(), shift, 0.0)  # no support, or an invalid row
    x = torch.where(valid, (listed_s - shift[:, None]) / temperature, float("-inf"))
    # The unlisted tokens' log-sum-exp of x: -inf when there are none (or when their distance
    # to the shift over T is beyond the dtype's range).
    bucket = unlisted_lse > float("-inf")
    x_unlisted = torch.where(bucket, unlisted_lse + (unlisted_max - shift) / temperature, float("-inf"))

    # log-sum-exp of x over the support: the unlisted part from the pass, the listed part here.
    top = torch.maximum(x_unlisted, x.amax(-1))
    top = torch.where(top.isfinite(), top, 0.0)
    lse = top + torch.log(torch.exp(x_unlisted - top) + torch.exp(x - top[:, None]).sum(-1))
    invalid = has_nan_or_inf | bad_logprobs | ~(bucket | valid.any(-1))

    log_q = torch.where(valid, x - lse[:, None], 0.0)
    q = torch.where(valid, log_q.exp(), 0.0)
    log_p = torch.where(valid, log_p, 0.0)
    p = torch.where(valid, log_p.exp(), 0.0)
    # The bucket: teacher mass 1 - sum p, at least BUCKET_FLOOR; student mass from its own
    # log-sum-exp (exact where q_B is tiny, unlike 1 - sum q).
    p_bucket = torch.where(bucket, (1.0 - p.sum(-1)).clamp(min=BUCKET_FLOOR), 0.0)
    log_p_bucket = torch.where(bucket, p_bucket.log(), 0.0)
    log_q_bucket = torch.where(bucket, x_unlisted - lse, 0.0)
    q_bucket = torch.where(bucket, log_q_bucket.exp(), 0.0)
    return _Listed(valid, log_p, p, log_q, q, bucket, log_p_bucket, p_bucket, log_q_bucket, q_bucket, shift, lse,
                   invalid)


def _head(listed: _Listed, mu, indices):
    """Rule 34: the head among the valid listed tokens, (N, K) bool.

    Order by teacher log-probability descending, ties by lower index (the rows are sorted by
    index, so a stable sort keeps that); the head is the longest prefix whose running mass
    stays <= mu, at least one token; at mu = 1 every valid listed token.
    """
    key = torch.where(listed.valid, listed.log_p, float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    valid_in_order = listed.valid.gather(-1, order)
    if mu < 1:
        head_in_order = listed.p.gather(-1, order).cumsum(-1) <= mu
        head_in_order[:, 0] = True
    else:
        head_in_order = torch.ones_like(valid_in_order)
    head_in_order &= valid_in_order
    return torch.zeros_like(head_in_order).scatter(-1, order, head_in_order)


def sparse_row_losses(
    passes: StudentPasses,
    student: torch.Tensor,
    teacher,
    keep: torch.Tensor | None,
    grad_scale: torch.Tensor,
    config: RowLossConfig,
    compute_grad: bool,
    grad_out: torch.Tensor | None = None,
) -> RowLosses:
    """Per-row losses against a TeacherTopK; arguments and result as RowBackend.row_losses.

    student: (..., V); teacher: TeacherTopK of (..., K). The state is (N, 3 + K): the row's
    shift and log-sum-exp, the bucket's gradient factor and the listed tokens' gradient
    coefficients (in index order), each before the row's scale and 1/T.
    """
    family = BY_MODE[config.mode]
    vocab = student.shape[-1]
    n_rows = student.numel() // vocab
    dtype = compute_dtype(student.dtype, teacher.logprobs.dtype)
    indices, logprobs = sorted_by_index(teacher)
    v = _listed_values(passes, student, indices, logprobs, keep, config.temperature, dtype)

    # Rule 32: FKL and RKL over the listed tokens and the bucket.
    fkl = times_log_ratio(v.p, v.log_p, v.log_q).sum(-1) + times_log_ratio(v.p_bucket, v.log_p_bucket, v.log_q_bucket)
    rkl = times_log_ratio(v.q, v.log_q, v.log_p).sum(-1) + times_log_ratio(v.q_bucket, v.log_q_bucket, v.log_p_bucket)

    # Rules 34-35: the head, the gaps (the bucket always in the tail) and the weights.
    head = _head(v, config.mu, indices)
    gap = (v.p - v.q).abs()
    head_gap = torch.where(head, gap, 0.0).sum(-1)
    tail_gap = torch.where(v.valid & ~head, gap, 0.0).sum(-1) + (v.p_bucket - v.q_bucket).abs()
    head_weight, tail_weight = loss_weights(family.kl_weights, head_gap, tail_gap)
    bucket_live = v.q_bucket > 0  # a bucket whose student mass underflowed gets no gradient
    if family.has_terms:
        loss, listed_grad, unlisted_factor = _divergence_terms(v, bucket_live, config)
    else:
        loss = head_weight * fkl + tail_weight * rkl
        # Rule 36: the gradient's coefficients with the weights held constant. With P the teacher's
        # total listed + bucket mass and o(j) the outcome of token j (itself, or the bucket):
        # d loss / d b_j = w_h q_j (P - p_o / q_o) + w_t q_j (log q_o - log p_o - RKL).
        total_p = v.p.sum(-1) + v.p_bucket
        log_ratio = v.log_q - v.log_p - rkl[:, None]
        listed_grad = head_weight[:, None] * (v.q * total_p[:, None] - v.p) + tail_weight[:, None] * torch.where(
            v.q > 0, v.q * log_ratio, 0.0
        )
        unlisted_factor = torch.where(
            bucket_live,
            head_weight * (total_p - v.p_bucket / torch.where(bucket_live, v.q_bucket, 1.0))
            + tail_weight * (v.log_q_bucket - v.log_p_bucket - rkl),
            0.0,
        )
    listed_grad = torch.where(v.valid, listed_grad, 0.0)

    # Invalid rows: NaN loss, statistics and gradient, head size 0; ignored rows: all 0.
    nan = float("nan")
    stats = torch.stack((fkl, rkl, head_gap, tail_gap, head_weight, tail_weight))
    stats = torch.where(v.invalid, nan, stats)
    loss = torch.where(v.invalid, nan, loss)
    head_size = torch.where(v.invalid, 0, head.sum(-1))
    lse = torch.where(v.invalid, nan, v.lse)
    listed_grad = torch.where(v.invalid[:, None], nan, listed_grad)
    unlisted_factor = torch.where(v.invalid, nan, unlisted_factor)
    if keep is not None:
        loss = torch.where(keep, loss, 0.0)
        stats = torch.where(keep, stats, 0.0)
        head_size = torch.where(keep, head_size, 0)
    state = torch.cat((v.shift[:, None], lse[:, None], unlisted_factor[:, None], listed_grad), dim=1)

    grad = None
    if compute_grad:
        grad = _gradient(passes, student, indices, keep, grad_scale.to(dtype).expand(n_rows), state, config, grad_out)
    split_path = torch.zeros(n_rows, dtype=torch.int32, device=student.device)
    return RowLosses(loss, stats, head_size, grad, split_path, state)


def _divergence_terms(v: _Listed, bucket_live, config):
    """A divergence made of terms (JSD, TVD, SKL, SRKL; _rows.TERMS) over the outcomes of a
    stored teacher, the valid listed tokens and the bucket (rule 32): (loss (N,), the listed
    tokens' gradient coefficients (N, K), the bucket's factor (N,)). With h_o = q_o dD/dq_o and
    H = sum_o h_o, d D / d b_j = h_j - q_j H at a listed token and q_j (h_B / q_B - H) at an
    unlisted one."""
    def outcomes(listed, bucket_value, missing):  # (N, K + 1): the listed tokens, then the bucket
        return torch.cat((torch.where(v.valid, listed, missing), torch.where(v.bucket, bucket_value, missing)[:, None]), 1)

    neg_inf = float("-inf")
    p, q = outcomes(v.p, v.p_bucket, 0.0), outcomes(v.q, v.q_bucket, 0.0)
    term, h = TERMS[config.mode](p, q, outcomes(v.log_p, v.log_p_bucket, neg_inf),
                                 outcomes(v.log_q, v.log_q_bucket, neg_inf), config.mixture)
    h_sum = h.sum(-1)
    listed_grad = h[:, :-1] - v.q * h_sum[:, None]
    unlisted_factor = torch.where(bucket_live, h[:, -1] / torch.where(bucket_live, v.q_bucket, 1.0) - h_sum, 0.0)
    return term.sum(-1), listed_grad, unlisted_factor


def sparse_row_gradient(
    passes: StudentPasses,
    student: torch.Tensor,
    teacher,
    keep: torch.Tensor | None,
    row_scale: torch.Tensor,
    state: torch.Tensor,
    config: RowLossConfig,
    grad_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """d(sum_i row_scale_i * loss_i) / d student from sparse_row_losses' state, in one pass."""
    indices, _ = sorted_by_index(teacher)
    return _gradient(passes, student, indices, keep, row_scale.to(state.dtype), state, config, grad_out)


def _gradient(passes, student, indices, keep, row_scale, state, config, grad_out):
    # The row's factor and 1/T enter the coefficients before the pass, the one rounding after it.
    factor = row_scale * (1.0 / config.temperature)
    if keep is not None:
        factor = torch.where(keep, factor, 0.0)  # no 0 * NaN from ignored rows' state
    listed_grad = state[:, STATE_COLUMNS:] * factor[:, None]
    unlisted_factor = state[:, STATE_UNLISTED] * factor
    return passes.gradient(
        student, indices, keep, config.temperature, state[:, STATE_SHIFT], state[:, STATE_LSE], listed_grad,
        unlisted_factor, grad_out,
    )
