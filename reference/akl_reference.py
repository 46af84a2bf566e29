"""Readable, sort-based PyTorch transcription of docs/semantics.md section 2: the oracle for
tests and benchmarks.

Everything here follows docs/semantics.md rule by rule and favours clarity over speed: a full stable sort
per row finds the head, and autograd (not a hand-written formula) gives the gradient, so that the
library's analytic gradient is checked against an independent derivation.

Computation runs in float32 for 16- and 32-bit inputs and in float64 when either input is
float64; tests pass float64 copies of their inputs to get the exact oracle.
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")
KL_MODES = ("akl", "fkl", "rkl")
MODES = KL_MODES + ("jsd", "tvd", "skl", "srkl")


def reference_row_losses(
    student_logits, teacher_logits, *, mu=0.5, temperature=1.0, mode="akl", beta=0.5, alpha=0.1, head_size=None
):
    """Per-row loss and diagnostics for 2-D logits.

    Args:
        student_logits: (N, V) floating tensor; gradients flow to it.
        teacher_logits: (N, V) floating tensor; treated as a constant.
        mu: head mass, 0 < mu <= 1 (used for the head/tail statistics in every mode).
        temperature: T > 0; logits are divided by it.
        mode: "akl" (gap-weighted), "fkl" (weights fixed to (1, 0)), "rkl" ((0, 1)), or one of
            the divergences of section 2, rules 26-29: "jsd" (beta), "tvd", "skl", "srkl" (alpha).
        beta, alpha: their parameters (the others ignore them).
        head_size: optional (N,) integer tensor that replaces the mu rule by "the first
            head_size tokens of the order are the head"; tests use it to evaluate the other
            decision that docs/semantics.md allows where a running mass lies within rounding of mu.

    Returns:
        (loss, stats): loss is an (N,) tensor, NaN for rows with NaN or +inf logits or an empty
        support; stats is a dict of detached (N,) tensors with keys fkl, rkl, head_gap, tail_gap,
        head_weight, tail_weight and head_size (int64).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    compute_dtype = (
        torch.float64
        if torch.float64 in (student_logits.dtype, teacher_logits.dtype)
        else torch.float32
    )

    # Step 1: temperature, and the support where both logits are > -inf.
    a = teacher_logits.detach().to(compute_dtype) / temperature
    b = student_logits.to(compute_dtype) / temperature
    support = (a > NEG_INF) & (b > NEG_INF)
    has_nan_or_inf = (a.isnan() | b.isnan() | (a == float("inf")) | (b == float("inf"))).any(-1)
    invalid = has_nan_or_inf | ~support.any(-1)

    # Step 2: both softmaxes over the support, in log space. Positions outside the support get
    # log-probability 0 and probability 0 so that no inf * 0 reaches the sums or the gradient.
    log_p = torch.log_softmax(a.masked_fill(~support, NEG_INF), dim=-1)
    log_q = torch.log_softmax(b.masked_fill(~support, NEG_INF), dim=-1)
    log_p = torch.where(support, log_p, 0.0)
    log_q = torch.where(support, log_q, 0.0)
    p = torch.where(support, log_p.exp(), 0.0)
    q = torch.where(support, log_q.exp(), 0.0)

    # Step 3: head/tail split. Stable sort of the teacher by probability, descending (ties keep
    # the lower vocabulary index first); a token is in the tail iff the running mass up to and
    # including it exceeds mu; the first token is always in the head.
    order, running_mass = _order_and_running_mass(a, support, p)
    if head_size is None:
        # mu = 1 is the whole support, whatever the rounding of the running mass above 1.
        head_in_order = running_mass <= mu if mu < 1 else torch.ones_like(running_mass, dtype=torch.bool)
        head_in_order[:, 0] = True
    else:
        head_in_order = torch.arange(a.shape[-1], device=a.device) < head_size[:, None]
    head = torch.zeros_like(head_in_order).scatter(-1, order, head_in_order) & support

    # Step 4: gaps and weights, constants for autograd.
    gap = (p - q.detach()).abs()
    head_gap = torch.where(head, gap, 0.0).sum(-1)
    tail_gap = torch.where(head, 0.0, gap).sum(-1)
    head_weight, tail_weight = _weights(mode, head_gap, tail_gap)

    # Step 5: true KL divergences.
    fkl = (p * (log_p - log_q)).sum(-1)
    rkl = (q * (log_q - log_p)).sum(-1)

    # Step 6: the per-row loss.
    if mode in KL_MODES:
        loss = head_weight * fkl + tail_weight * rkl
    else:
        loss = _other_divergence(mode, p, q, log_p, log_q, beta, alpha)
    loss = torch.where(invalid, float("nan"), loss)

    return loss, _statistics(invalid, fkl, rkl, head_gap, tail_gap, head_weight, tail_weight, head)


def _weights(mode, head_gap, tail_gap):
    """Step 4's weights, constants for autograd: the gaps' shares for AKL (0.5 each where both
    gaps are 0); fixed (1, 0) for FKL, (0, 1) for RKL, (0, 0) for the divergences that are neither."""
    if mode == "akl":
        total_gap = head_gap + tail_gap
        tied = total_gap == 0
        head_weight = torch.where(tied, 0.5, head_gap / torch.where(tied, 1.0, total_gap))
        tail_weight = torch.where(tied, 0.5, tail_gap / torch.where(tied, 1.0, total_gap))
        return head_weight, tail_weight
    return torch.full_like(head_gap, 1.0 if mode == "fkl" else 0.0), torch.full_like(head_gap, 1.0 if mode == "rkl" else 0.0)


def _statistics(invalid, fkl, rkl, head_gap, tail_gap, head_weight, tail_weight, head):
    """The stats dict of a row function: detached, NaN for invalid rows, and head size 0 there."""
    stats = {
        "fkl": fkl.detach(),
        "rkl": rkl.detach(),
        "head_gap": head_gap,
        "tail_gap": tail_gap,
        "head_weight": head_weight,
        "tail_weight": tail_weight,
    }
    stats = {name: torch.where(invalid, float("nan"), value) for name, value in stats.items()}
    stats["head_size"] = torch.where(invalid, 0, head.sum(-1))
    return stats


def _times_log_ratio(x, log_x, log_y):
    """x (log x - log y), 0 where x is 0 (a term of probability 0 is 0, section 2 rule 21)."""
    return torch.where(x > 0, x * (log_x - log_y), 0.0)


def _other_divergence(mode, p, q, log_p, log_q, beta, alpha):
    """(N,) the divergences of section 2, rules 26-29, from p, q and their logs (0 off the support)."""
    if mode == "tvd":  # rule 27; autograd's derivative of |x| at 0 is 0, as the rule asks
        return 0.5 * (p - q).abs().sum(-1)
    if mode == "jsd":  # rule 26: beta KL(p||M) + (1 - beta) KL(q||M), M = beta p + (1 - beta) q
        w_p, w_q = beta, 1.0 - beta
    elif mode == "skl":  # rule 28: KL(p||M), M = alpha p + (1 - alpha) q
        w_p, w_q = alpha, 1.0 - alpha
    elif mode == "srkl":  # rule 29: KL(q||M), M = (1 - alpha) p + alpha q
        w_p, w_q = 1.0 - alpha, alpha
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    # log M as the log-sum-exp of the two weighted log-probabilities (a weight of 0 drops its term).
    log_m = torch.logsumexp(torch.stack((log_p + _log(w_p), log_q + _log(w_q))), 0)
    kl_p_m = _times_log_ratio(p, log_p, log_m).sum(-1)
    kl_q_m = _times_log_ratio(q, log_q, log_m).sum(-1)
    if mode == "jsd":
        return beta * kl_p_m + (1.0 - beta) * kl_q_m
    return kl_p_m if mode == "skl" else kl_q_m


def _log(weight):
    return float("-inf") if weight == 0 else math.log(weight)


def _order_and_running_mass(a, support, p):
    """Stable descending order of the teacher's (masked) logits and cum_k along it."""
    order = torch.sort(a.masked_fill(~support, NEG_INF), dim=-1, descending=True, stable=True).indices
    return order, p.gather(-1, order).cumsum(-1)


def reference_topk_row_losses(
    student_logits, logprobs, indices, *, mu=0.5, temperature=1.0, mode="akl", beta=0.5, alpha=0.1
):
    """docs/semantics.md rules 31-38: per-row loss against a sparse teacher, for 2-D inputs.

    Args:
        student_logits: (N, V) floating tensor; gradients flow to it.
        logprobs: (N, K) the teacher's stored log-probabilities (full-vocabulary normalised).
        indices: (N, K) integer vocabulary indices; -1 is padding.
        mu, temperature: as reference_row_losses (T divides the student's logits only).
        mode, beta, alpha: as reference_row_losses; every divergence is taken over the outcomes
            of rule 32, the valid listed tokens and the bucket.

    Returns:
        (loss, stats) as reference_row_losses.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    compute_dtype = torch.float64 if torch.float64 in (student_logits.dtype, logprobs.dtype) else torch.float32
    b = student_logits.to(compute_dtype) / temperature
    n_rows, vocab = b.shape

    # Rule 31: the listed tokens, written out position by position (a dense mask is fine in an
    # oracle; the library never builds one for the teacher).
    listed = torch.zeros(n_rows, vocab, dtype=torch.bool)
    teacher_log_p = torch.zeros(n_rows, vocab, dtype=compute_dtype)
    for row in range(n_rows):
        for index, value in zip(indices[row].tolist(), logprobs[row].to(compute_dtype).tolist()):
            if index >= 0:  # -1 is padding
                listed[row, index] = True
                teacher_log_p[row, index] = value
    listed_nan_or_inf = (listed & (teacher_log_p.isnan() | (teacher_log_p == float("inf")))).any(-1)
    # Rule 32: a listed token counts where the student has it and the teacher gives it mass.
    valid = listed & (b > NEG_INF) & (teacher_log_p > NEG_INF)
    unlisted = ~listed & (b > NEG_INF)
    support = valid | unlisted
    has_nan_or_inf = b.isnan().any(-1) | (b == float("inf")).any(-1) | listed_nan_or_inf
    invalid = has_nan_or_inf | ~support.any(-1)

    # The student over the support; the teacher on the valid listed tokens.
    log_q = torch.log_softmax(b.masked_fill(~support, NEG_INF), dim=-1)
    q = torch.where(support, log_q.exp(), 0.0)
    log_p = torch.where(valid, teacher_log_p, 0.0)
    p = torch.where(valid, log_p.exp(), 0.0)

    # Rule 33: the bucket of the unlisted support tokens.
    bucket = unlisted.any(-1)
    p_bucket = torch.where(bucket, (1.0 - p.sum(-1)).clamp(min=2.0**-24), 0.0)
    log_p_bucket = torch.where(bucket, p_bucket.log(), 0.0)
    log_q_bucket = torch.where(bucket, torch.logsumexp(log_q.masked_fill(~unlisted, NEG_INF), dim=-1), 0.0)
    q_bucket = torch.where(bucket, log_q_bucket.exp(), 0.0)

    # Rule 32: FKL and RKL over the listed tokens and the bucket (0 log 0 = 0).
    fkl = _times_log_ratio(p, log_p, log_q).sum(-1) + _times_log_ratio(p_bucket, log_p_bucket, log_q_bucket)
    rkl = _times_log_ratio(q, log_q, log_p).masked_fill(~valid, 0.0).sum(-1) + _times_log_ratio(
        q_bucket, log_q_bucket, log_p_bucket
    )

    # Rule 34: the head among the valid listed tokens, in stable descending order of log p.
    order = torch.sort(teacher_log_p.masked_fill(~valid, NEG_INF), dim=-1, descending=True, stable=True).indices
    running_mass = p.gather(-1, order).cumsum(-1)
    head_in_order = running_mass <= mu if mu < 1 else torch.ones_like(running_mass, dtype=torch.bool)
    head_in_order[:, 0] = True
    head = torch.zeros_like(head_in_order).scatter(-1, order, head_in_order) & valid

    # Rule 35: gaps (the bucket in the tail), weights as constants, the loss.
    gap = (p - q.detach()).abs()
    head_gap = torch.where(head, gap, 0.0).sum(-1)
    tail_gap = torch.where(valid & ~head, gap, 0.0).sum(-1) + (p_bucket - q_bucket.detach()).abs()
    head_weight, tail_weight = _weights(mode, head_gap, tail_gap)
    if mode in KL_MODES:
        loss = head_weight * fkl + tail_weight * rkl
    else:  # rule 32: the divergence over the outcomes, the valid listed tokens and then the bucket
        def outcomes(listed_value, bucket_value):
            return torch.cat((torch.where(valid, listed_value, 0.0), bucket_value[:, None]), -1)

        loss = _other_divergence(
            mode, outcomes(p, p_bucket), outcomes(q, q_bucket), outcomes(log_p, log_p_bucket),
            outcomes(log_q, log_q_bucket), beta, alpha,
        )
    loss = torch.where(invalid, float("nan"), loss)

    return loss, _statistics(invalid, fkl, rkl, head_gap, tail_gap, head_weight, tail_weight, head)


def head_size_bounds(student_logits, teacher_logits, *, mu, temperature=1.0, tolerance):
    """Smallest and largest head sizes docs/semantics.md allows when cum_k is only known within
    tolerance (section 2, rule 25).

    Returns two (N,) int64 tensors: the head sizes under mu - tolerance and mu + tolerance
    (at least 1, at most the support size), computed in float64.
    """
    a = teacher_logits.detach().double() / temperature
    b = student_logits.detach().double() / temperature
    support = (a > NEG_INF) & (b > NEG_INF)
    p = torch.where(support, torch.softmax(a.masked_fill(~support, NEG_INF), dim=-1), 0.0)
    _, running_mass = _order_and_running_mass(a, support, p)
    support_size = support.sum(-1)
    bounds = []
    for limit in (mu - tolerance, mu + tolerance):
        size = (running_mass <= limit).sum(-1).clamp(min=1)
        bounds.append(torch.minimum(size, support_size.clamp(min=1)))
    return tuple(bounds)


def reference_loss(
    student_logits,
    teacher_logits,
    *,
    mu=0.5,
    temperature=1.0,
    labels=None,
    ignore_index=-100,
    reduction="mean",
    mode="akl",
    beta=0.5,
    alpha=0.1,
):
    """docs/semantics.md section 2 with reductions, for logits of shape (..., V).

    teacher_logits may also be a sparse teacher, a (logprobs, indices) pair of shape (..., K)
    (a TeacherTopK is one): rules 31-38 then give each row.

    Ignored rows (labels == ignore_index, compared as Python integers, so that no label dtype
    wraps ignore_index around) are never computed, so whatever they hold (NaN included)
    contributes exactly 0 to the loss and gets a zero gradient.

    Returns:
        (loss, stats): loss reduced as `reduction` says ("none" gives the leading shape);
        stats is a dict of detached tensors of the leading shape (0 at ignored rows).
    """
    vocab = student_logits.shape[-1]
    leading_shape = student_logits.shape[:-1]
    student_rows = student_logits.reshape(-1, vocab)
    sparse = isinstance(teacher_logits, tuple)  # (logprobs, indices): a sparse teacher
    if sparse:
        listed = teacher_logits[0].shape[-1]
        teacher_rows = tuple(x.reshape(-1, listed) for x in teacher_logits)
    else:
        teacher_rows = teacher_logits.reshape(-1, vocab)
    if labels is None:
        kept = torch.arange(student_rows.shape[0], device=student_rows.device)
    else:
        kept_list = [i for i, label in enumerate(labels.reshape(-1).tolist()) if label != ignore_index]
        kept = torch.tensor(kept_list, dtype=torch.int64, device=student_rows.device)

    if sparse:
        kept_loss, kept_stats = reference_topk_row_losses(
            student_rows[kept], *(x[kept] for x in teacher_rows), mu=mu, temperature=temperature, mode=mode,
            beta=beta, alpha=alpha,
        )
    else:
        kept_loss, kept_stats = reference_row_losses(
            student_rows[kept], teacher_rows[kept], mu=mu, temperature=temperature, mode=mode, beta=beta, alpha=alpha
        )
    row_loss = kept_loss.new_zeros(student_rows.shape[0]).index_put((kept,), kept_loss)
    stats = {
        name: value.new_zeros(student_rows.shape[0]).index_put((kept,), value).reshape(leading_shape)
        for name, value in kept_stats.items()
    }

    if reduction == "none":
        loss = row_loss.reshape(leading_shape)
    elif reduction == "sum":
        loss = row_loss.sum()
    elif reduction == "mean":
        loss = row_loss.sum() / max(kept.numel(), 1)
    else:
        raise ValueError(f"unknown reduction {reduction!r}")
    return loss, stats
