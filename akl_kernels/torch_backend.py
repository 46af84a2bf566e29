"""The PyTorch backend: vectorised over chunks of rows, with an analytic gradient.

This is the default on machines without a GPU. Rows are processed a chunk at a time so that the
working memory stays at a few chunk-sized buffers besides the gradient itself, and the gradient
is computed from SPEC section 2 step 7 directly (no autograd graph over vocabulary-sized
intermediates). The head/tail split looks at the teacher's TOPK largest logits; only rows whose
crossing of mu lies beyond them, or falls inside a group of tied logits, are sorted.
"""

from __future__ import annotations

import torch

from ._rows import TOPK, LossMode, RowLossConfig, RowLosses, STATS_FIELDS, compute_dtype

NEG_INF = float("-inf")

# Rows per chunk times vocabulary size: about 2 MiB per float32 buffer.
CHUNK_ELEMENTS = 1 << 19


def torch_row_losses(
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None,
    grad_scale: torch.Tensor,
    config: RowLossConfig,
    compute_grad: bool,
) -> RowLosses:
    """Per-row losses for logits of shape (..., V), any strides.

    Args:
        student, teacher: (..., V) float16/bfloat16/float32/float64 logits, same shape and device.
        keep: (N,) bool, True where the row counts; None keeps every row. N = numel // V.
        grad_scale: 0-dim tensor folded into the gradient (1 / kept rows for "mean").
        config: mode, mu, temperature and whether to compute the head/tail split.
        compute_grad: also return d(grad_scale * loss_i)/d student.
    """
    vocab = student.shape[-1]
    leading_shape = student.shape[:-1]
    n_rows = leading_shape.numel()
    dtype = compute_dtype(student, teacher)
    device = student.device

    loss = torch.zeros(n_rows, dtype=dtype, device=device)
    stats = torch.zeros(len(STATS_FIELDS), n_rows, dtype=dtype, device=device)
    head_size = torch.zeros(n_rows, dtype=torch.int64, device=device)
    grad = torch.zeros(student.shape, dtype=student.dtype, device=device) if compute_grad else None

    kept = torch.arange(n_rows, device=device) if keep is None else keep.nonzero().squeeze(1)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // vocab)
    grad_factor = grad_scale.to(dtype) / config.temperature
    for rows in kept.split(rows_per_chunk):
        index = torch.unravel_index(rows, leading_shape)
        # a = t / T and b = s / T, as fresh compute-dtype copies of the chunk's rows.
        a = _divided(teacher[index].to(dtype), config.temperature)
        b = _divided(student[index].to(dtype), config.temperature)
        chunk_loss, chunk_stats, chunk_head_size, chunk_grad = _chunk_losses(
            a, b, config, grad_factor if compute_grad else None
        )
        loss[rows] = chunk_loss
        stats[:, rows] = chunk_stats
        head_size[rows] = chunk_head_size
        if compute_grad:
            grad.view(n_rows, vocab).index_copy_(0, rows, chunk_grad.to(grad.dtype))
    return RowLosses(loss, stats, head_size, grad)


def _divided(x: torch.Tensor, temperature: float) -> torch.Tensor:
    return x if temperature == 1.0 else x.div_(temperature)


def _chunk_losses(a, b, config, grad_factor):
    """SPEC section 2 for a chunk of R rows; a and b are (R, V) and are overwritten.

    Returns (loss (R,), stats (6, R), head_size (R,), grad (R, V) or None). grad_factor is
    grad_scale / T, or None when no gradient is wanted.
    """
    # Step 1: the support, and rows that must give NaN (NaN/+inf logits, empty support).
    outside = ~((a > NEG_INF) & (b > NEG_INF))
    bad = a.isnan()
    bad |= a.isposinf()
    bad |= b.isnan()
    bad |= b.isposinf()
    invalid = bad.any(1) | outside.all(1)
    del bad
    a.masked_fill_(outside, NEG_INF)
    b.masked_fill_(outside, NEG_INF)

    # Step 2: p = softmax(a), q = softmax(b) over the support, with each row's max and the log
    # of its normaliser: log p = (a - max) - log_z.
    p, max_a, log_z_a = _softmax(a)
    q, max_b, log_z_b = _softmax(b)

    # Step 3: the head mask, from the teacher's logits before they become log-probabilities.
    head = _head_mask(a, max_a, log_z_a, config.mu) if config.split else None

    # d = log p - log q on the support, 0 outside it.
    log_p = a.sub_(max_a).sub_(log_z_a)
    log_q = b.sub_(max_b).sub_(log_z_b)
    d = torch.sub(log_p, log_q).masked_fill_(outside, 0.0)
    del a, b, log_p, log_q

    # Step 5: FKL = sum p (log p - log q), RKL = sum q (log q - log p).
    fkl = torch.einsum("rv,rv->r", p, d)
    rkl = -torch.einsum("rv,rv->r", q, d)

    # Step 4: gaps |p - q| over head and tail; weights from them (AKL) or fixed.
    if head is not None:
        diff = torch.sub(p, q).abs_()
        head_gap = torch.where(head, diff, 0.0).sum(1)
        tail_gap = diff.masked_fill_(head, 0.0).sum(1)
        head_size = head.sum(1)
        del diff
    else:
        head_gap = tail_gap = torch.zeros_like(fkl)
        head_size = torch.zeros(fkl.shape, dtype=torch.int64, device=fkl.device)
    if config.mode == LossMode.AKL:
        total_gap = head_gap + tail_gap
        tied = total_gap == 0
        total_gap = torch.where(tied, 1.0, total_gap)
        head_weight = torch.where(tied, 0.5, head_gap / total_gap)
        tail_weight = torch.where(tied, 0.5, tail_gap / total_gap)
    else:
        head_weight = torch.full_like(fkl, 1.0 if config.mode == LossMode.FKL else 0.0)
        tail_weight = 1.0 - head_weight

    # Step 6: the loss.
    if config.mode == LossMode.FKL:
        loss = fkl.clone()
    elif config.mode == LossMode.RKL:
        loss = rkl.clone()
    else:
        loss = head_weight * fkl + tail_weight * rkl
    loss[invalid] = float("nan")
    stats = torch.stack((fkl, rkl, head_gap, tail_gap, head_weight, tail_weight))

    # Step 7: d loss / d b_j = w_head (q_j - p_j) + w_tail q_j (log q_j - log p_j - RKL), times 1/T
    # and the reduction's scale (both in grad_factor); 0 outside the support since p = q = 0 there.
    grad = None
    if grad_factor is not None:
        if config.mode == LossMode.FKL:
            grad = q.sub_(p).mul_(grad_factor)
        else:
            # q (log q - log p - RKL) = q (-d - RKL), built in d's buffer.
            grad = d.neg_().sub_(rkl[:, None]).mul_(q).mul_((tail_weight * grad_factor)[:, None])
            if config.mode == LossMode.AKL:
                grad.add_(q.sub_(p).mul_((head_weight * grad_factor)[:, None]))
        grad[invalid] = float("nan")
    return loss, stats, head_size, grad


def _softmax(x):
    """Row softmax of (R, V) x (-inf outside the support), its (R, 1) max and log normaliser.

    The exponentials are taken once: e = exp(x - max), softmax = e / sum(e), and
    log softmax = (x - max) - log(sum(e)). Rows without support give NaN (they are invalid).
    """
    row_max = x.amax(1, keepdim=True)
    e = torch.sub(x, row_max).exp_()
    total = e.sum(1, keepdim=True)
    return e.div_(total), row_max, total.log_()


def _prob(x, row_max, log_z):
    """softmax values for (R, k) logits x from their rows' (R, 1) max and log normaliser."""
    return torch.sub(x, row_max).sub_(log_z).exp_()


def _head_mask(a, max_a, log_z_a, mu):
    """(R, V) bool: the teacher's head at mass mu (SPEC section 2 step 3), for masked logits a.

    Fast path: the TOPK largest logits of each row, their running mass in descending order,
    and the first token whose running mass exceeds mu (the crossing token, rank h). If it lies
    among the TOPK and no logit equal to it is in the head, the head is exactly {a > a_crossing}.
    Rows where the crossing lies beyond the TOPK, or inside a group of tied logits (the head
    then takes the ties of lowest index), are resolved by a stable sort of that row.
    """
    k = min(TOPK, a.shape[1])
    top = a.topk(k, dim=1).values  # (R, k), descending
    running = _prob(top, max_a, log_z_a).cumsum_(1)
    head_count = (running <= mu).sum(1).clamp_(min=1)
    crossing_in_top = head_count < k
    crossing = torch.where(
        crossing_in_top,
        top.gather(1, head_count.clamp(max=k - 1)[:, None]).squeeze(1),
        NEG_INF,
    )
    ties_in_head = torch.where(
        crossing == NEG_INF, 0, head_count - (top > crossing[:, None]).sum(1)
    )
    saw_every_token = (top[:, -1] == NEG_INF) | (k == a.shape[1])
    needs_sort = (~crossing_in_top & ~saw_every_token) | (ties_in_head > 0)

    head = a > crossing[:, None]
    rows = needs_sort.nonzero().squeeze(1)
    if rows.numel():
        head[rows] = _sorted_head(a[rows], max_a[rows], log_z_a[rows], mu)
    return head


def _sorted_head(a, max_a, log_z_a, mu):
    """Exact head mask by a stable descending sort: the fallback for the rows that need it."""
    order = torch.sort(a, dim=1, descending=True, stable=True).indices
    running = _prob(a.gather(1, order), max_a, log_z_a).cumsum_(1)
    head_in_order = running <= mu
    head_in_order[:, 0] = True
    head = torch.zeros_like(head_in_order).scatter_(1, order, head_in_order)
    return head & (a > NEG_INF)
