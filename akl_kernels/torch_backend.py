"""The PyTorch backend: vectorised over chunks of rows, with an analytic gradient.

This is the default on machines without a GPU. Rows are processed a chunk at a time so that the
working memory stays at a few chunk-sized buffers besides the gradient itself, and the gradient
is computed from SPEC section 2 step 7 directly (no autograd graph over vocabulary-sized
intermediates). The head/tail split looks at the teacher's TOPK largest logits, and, for the
rows whose crossing of mu lies further down, puts the row's tokens in buckets of logits (one
scatter each of mass, gap and count) and orders exactly only the bucket that crosses mu; no
row is fully sorted.
"""

from __future__ import annotations

import torch

from ._rows import TOPK, LossMode, RowLossConfig, RowLosses, STATS_FIELDS, compute_dtype

NEG_INF = float("-inf")
INF = float("inf")

# How the split was found, per row (RowLosses.split_path).
SPLIT_PATH_CODES = {"none": 0, "top": 1, "all head": 2, "buckets": 3}
SPLIT_PATHS = {code: name for name, code in SPLIT_PATH_CODES.items()}


def split_path_name(code: int) -> str:
    """The name of a split_path code."""
    return SPLIT_PATHS[code]


# Rows whose crossing of mu lies beyond their TOPK largest logits are split by buckets of logits:
# BUCKETS_PER_UNIT per unit of a = t / T below the row's max, SPLIT_BUCKETS in all (16 units, a
# factor of 9e6 in probability); the last bucket takes every lower logit. 64 per unit: finer
# buckets make the scatters' accumulators spill out of cache, coarser ones put more tokens in the
# crossing bucket (measured at 16, 64 and 1024 on the benchmark's workloads).
BUCKETS_PER_UNIT = 64
SPLIT_BUCKETS = 16 * BUCKETS_PER_UNIT

# Largest rows per chunk times vocabulary size: 4 MiB per float32 buffer.
CHUNK_ELEMENTS = 1 << 20
# Fewest rows per chunk (when the vocabulary allows): below 8, the per-chunk overhead of the
# ops outweighs their work (measured at V = 32000: 2 rows per chunk take 1.5x as long as 8).
MIN_CHUNK_ROWS = 8


def torch_row_losses(
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None,
    grad_scale: torch.Tensor,
    config: RowLossConfig,
    compute_grad: bool,
    grad_out: torch.Tensor | None = None,
) -> RowLosses:
    """Per-row losses for logits of shape (..., V), any strides.

    Args:
        student, teacher: (..., V) float16/bfloat16/float32/float64 logits, same shape and device.
        keep: (N,) bool, True where the row counts; None keeps every row. N = numel // V.
        grad_scale: 0-dim tensor folded into the gradient (1 / kept rows for "mean").
        config: mode, mu, temperature and whether to compute the head/tail split.
        compute_grad: also return d(grad_scale * loss_i)/d student.
        grad_out: where to write that gradient (student-shaped, student dtype, contiguous; may
            be student itself); None allocates it.
    """
    vocab = student.shape[-1]
    leading_shape = student.shape[:-1]
    n_rows = leading_shape.numel()
    dtype = compute_dtype(student.dtype, teacher.dtype)
    device = student.device

    loss = torch.zeros(n_rows, dtype=dtype, device=device)
    stats = torch.zeros(len(STATS_FIELDS), n_rows, dtype=dtype, device=device)
    head_size = torch.zeros(n_rows, dtype=torch.int64, device=device)
    split_path = torch.zeros(n_rows, dtype=torch.int32, device=device)
    grad = None
    if compute_grad:
        grad = torch.empty(student.shape, dtype=student.dtype, device=device) if grad_out is None else grad_out
        if keep is not None:
            grad.view(n_rows, vocab).index_fill_(0, (~keep).nonzero().squeeze(1), 0.0)

    kept = torch.arange(n_rows, device=device) if keep is None else keep.nonzero().squeeze(1)
    # The workspace (about 21 bytes per chunk element) stays within a fifth of the gradient
    # from 192 rows on; fewer rows still get chunks of MIN_CHUNK_ROWS.
    rows_per_chunk = max(1, min(CHUNK_ELEMENTS // vocab, max(n_rows // 24, MIN_CHUNK_ROWS), kept.numel()))
    grad_factor = grad_scale.to(dtype) / config.temperature
    workspace = _Workspace(rows_per_chunk, vocab, dtype, device)
    read_teacher = _chunk_reader(teacher, keep, dtype, config.temperature)
    read_student = _chunk_reader(student, keep, dtype, config.temperature)
    for rows in kept.split(rows_per_chunk) if kept.numel() else ():
        chunk = workspace.rows(rows.numel())
        # a = t / T and b = s / T: views of the inputs where possible (never written), else
        # copies in the workspace.
        a = read_teacher(rows, lambda: chunk.a)
        b = read_student(rows, lambda: chunk.b)
        chunk_loss, chunk_stats, chunk_head_size, chunk_grad, chunk_path = _chunk_losses(
            a, b, chunk, config, grad_factor if compute_grad else None
        )
        loss[rows] = chunk_loss
        stats[:, rows] = chunk_stats
        head_size[rows] = chunk_head_size
        split_path[rows] = chunk_path
        if compute_grad:
            grad.view(n_rows, vocab).index_copy_(0, rows, chunk_grad.to(grad.dtype))
    return RowLosses(loss, stats, head_size, grad, split_path)


class _Workspace:
    """Chunk-sized buffers, allocated on first use and reused by every chunk of a call.

    Ops write into them with out=: allocating, and page-faulting in, several
    vocabulary-sized tensors per chunk instead costs about as much as the arithmetic.
    `a` and `b` are only needed when the inputs cannot be read as views.
    """

    def __init__(self, rows, vocab, dtype, device):
        self.shape, self.dtype, self.device = (rows, vocab), dtype, device
        self.buffers = {}
        self.try_top = True  # whether the next chunk's split starts from the top-k (_split_gaps)

    def rows(self, count):
        """The buffers cut to their first `count` rows."""
        return _ChunkBuffers(self, count)

    def buffer(self, name):
        if name not in self.buffers:
            dtype = self.dtype
            self.buffers[name] = torch.empty(self.shape, dtype=dtype, device=self.device)
        return self.buffers[name]


class _ChunkBuffers:
    """A chunk's view of the workspace: chunk.NAME is the (count, V) start of buffer NAME."""

    def __init__(self, workspace, count):
        self._workspace, self._count = workspace, count

    @property
    def workspace(self):
        return self._workspace

    def __getattr__(self, name):
        return self._workspace.buffer(name)[: self._count]


def _chunk_reader(x, keep, dtype, temperature):
    """A function (rows, out) -> x[rows] / T as an (R, V) tensor of the compute dtype.

    The result is a view of x when every row is kept, the rows of x form one strided 2-D
    view, the dtype already matches and T = 1; otherwise it is written into out(), a function
    that returns the workspace buffer (so that the buffer is only allocated when needed).
    """
    vocab = x.shape[-1]
    try:
        rows_2d = x.view(-1, vocab)
    except RuntimeError:  # leading dimensions that no single stride describes
        rows_2d = None

    def read(rows, out):
        if keep is None and rows_2d is not None:
            source = rows_2d[int(rows[0]) : int(rows[-1]) + 1]  # consecutive rows: a view
            if source.dtype == dtype and temperature == 1.0:
                return source
            target = out().copy_(source)
        elif rows_2d is not None and x.dtype == dtype:
            target = torch.index_select(rows_2d, 0, rows, out=out())
        else:
            target = out().copy_(x[torch.unravel_index(rows, x.shape[:-1])])
        return target.div_(temperature) if temperature != 1.0 else target

    return read


def _chunk_losses(a, b, chunk, config, grad_factor):
    """SPEC section 2 for a chunk of R rows of a = t / T and b = s / T, both (R, V).

    a and b are not written to; `chunk` holds the workspace buffers cut to R rows. Returns
    (loss (R,), stats (6, R), head_size (R,), grad (R, V) in a workspace buffer, or None).
    grad_factor is grad_scale / T, or None when no gradient is wanted.
    """
    # Step 1: rows with NaN or +inf logits (their max is NaN or +inf) must give NaN; positions
    # where either logit is -inf are outside the support.
    invalid = ~(a.amax(1) < INF) | ~(b.amax(1) < INF)
    outside = None
    if bool((a.amin() == NEG_INF) | (b.amin() == NEG_INF)):
        outside = (a == NEG_INF) | (b == NEG_INF)
        a = a.masked_fill(outside, NEG_INF)
        b = b.masked_fill(outside, NEG_INF)

    # Step 2: p = softmax(a), q = softmax(b) over the support.
    p, shifted_a, max_a, log_z_a = _softmax(a, chunk.p, chunk.shifted_a)
    q, shifted_b, _, log_z_b = _softmax(b, chunk.q, chunk.shifted_b)
    invalid |= max_a.squeeze(1) == NEG_INF  # empty support

    # d = log p - log q on the support (0 outside), with log p = (a - max_a) - log_z_a.
    d = shifted_a.sub_(shifted_b).sub_(log_z_a - log_z_b)
    if outside is not None:
        d.masked_fill_(outside, 0.0)
    scratch = shifted_b

    # Step 5: FKL = sum p (log p - log q), RKL = sum q (log q - log p).
    fkl = torch.mul(p, d, out=scratch).sum(1)
    rkl = torch.mul(q, d, out=scratch).sum(1).neg_()

    # Steps 3 and 4: the head/tail split and the gaps |p - q| over head and tail; weights from
    # them (AKL) or fixed. p is needed by the split, then q - p takes its buffer.
    if config.split:
        gap = torch.sub(q, p, out=scratch).abs_()
        head_gap, tail_gap, head_size, path = _split_gaps(a, max_a, p, gap, invalid, config.mu, chunk.workspace)
        q_minus_p = torch.sub(q, p, out=p)
    else:
        q_minus_p = torch.sub(q, p, out=p)
        head_gap = tail_gap = torch.zeros_like(fkl)
        head_size = torch.zeros(fkl.shape, dtype=torch.int64, device=fkl.device)
        path = torch.zeros(fkl.shape, dtype=torch.int32, device=fkl.device)
    del p
    if config.mode == LossMode.AKL:
        total_gap = head_gap + tail_gap
        tied = total_gap == 0
        total_gap = torch.where(tied, 1.0, total_gap)
        head_weight = torch.where(tied, 0.5, head_gap / total_gap)
        tail_weight = torch.where(tied, 0.5, tail_gap / total_gap)
    else:
        head_weight = torch.full_like(fkl, 1.0 if config.mode == LossMode.FKL else 0.0)
        tail_weight = 1.0 - head_weight

    # Step 6: the loss (w_tail = 0 for FKL, w_head = 0 for RKL).
    loss = head_weight * fkl + tail_weight * rkl
    stats = torch.stack((fkl, rkl, head_gap, tail_gap, head_weight, tail_weight))
    any_invalid = bool(invalid.any())
    if any_invalid:  # NaN loss and statistics, head size 0 and no split path (as the Triton backend)
        loss[invalid] = float("nan")
        stats[:, invalid] = float("nan")
        head_size = head_size.masked_fill(invalid, 0)
        path = path.masked_fill(invalid, 0)

    # Step 7: d loss / d b_j = w_head (q_j - p_j) + w_tail q_j (log q_j - log p_j - RKL), times
    # f = grad_scale / T, built in d's buffer as q_j (-f w_tail) (d_j + RKL) + f w_head (q_j - p_j).
    # It is 0 outside the support, where p = q = 0 and d = 0.
    grad = None
    if grad_factor is not None:
        head_factor = (head_weight * grad_factor)[:, None]
        tail_factor = (tail_weight * grad_factor)[:, None]
        grad = d.add_(rkl[:, None]).mul_(q).mul_(-tail_factor)
        grad.addcmul_(q_minus_p, head_factor)
        if any_invalid:
            grad[invalid] = float("nan")
    return loss, stats, head_size, grad, path


def _softmax(x, out, out_shifted):
    """Row softmax of (R, V) x (-inf outside the support), in the pieces log softmax needs.

    Returns (softmax in out, x - max in out_shifted, max (R, 1), log_z (R, 1)) with
    log softmax = (x - max) - log_z, the exponentials taken once. Rows without support give
    NaN (they are invalid anyway).
    """
    row_max = x.amax(1, keepdim=True)
    shifted = torch.sub(x, row_max, out=out_shifted)
    e = torch.exp(shifted, out=out)
    total = e.sum(1, keepdim=True)
    return e.div_(total), shifted, row_max, total.log_()


def _split_gaps(a, max_a, p, gap, invalid, mu, workspace):
    """SPEC section 2 steps 3 and 4 for a chunk: (head_gap, tail_gap, head_size, split path), each (R,).

    a, p: (R, V) logits over T and teacher probabilities (-inf and 0 outside the support);
    max_a: (R, 1) the rows' largest logit; gap: |p - q|; invalid: (R,) rows whose results are
    NaN anyway. The head is the longest prefix of the teacher's order (p descending, ties by
    lower index) whose running mass stays <= mu, at least one token. Where the crossing of mu
    lies among the TOPK largest logits (most rows at T = 1), those tell the head. Otherwise the
    row's tokens are put in buckets of logits below its max: the masses and gaps per bucket
    make every bucket before the one that crosses mu head, and that bucket's few tokens are
    ordered exactly.
    """
    n_rows = a.shape[0]
    head_gap = torch.zeros(n_rows, dtype=p.dtype, device=a.device)
    head_size = torch.zeros(n_rows, dtype=torch.int64, device=a.device)
    path = torch.full((n_rows,), SPLIT_PATH_CODES["buckets"], dtype=torch.int32, device=a.device)
    if mu >= 1.0:
        path.fill_(SPLIT_PATH_CODES["all head"])
        total_gap = gap.sum(1)
        return total_gap, head_gap, torch.count_nonzero(a > NEG_INF, dim=1), path

    pending = (~invalid).nonzero().squeeze(1)
    if workspace.try_top and pending.numel():
        resolved, top_gap, top_size = _split_in_top(a, p, gap, mu)
        resolved &= ~invalid
        head_gap[resolved] = top_gap[resolved]
        head_size[resolved] = top_size[resolved]
        path[resolved] = SPLIT_PATH_CODES["top"]
        pending = (~resolved & ~invalid).nonzero().squeeze(1)
        # A chunk whose rows mostly needed buckets suggests the next one will too (flat
        # teachers, high temperatures): skip the top-k there.
        workspace.try_top = 2 * pending.numel() <= n_rows
    if pending.numel():
        rows = (lambda x: x) if pending.numel() == n_rows else (lambda x: x[pending])
        bucket_gap, bucket_size = _split_in_buckets(rows(a), rows(max_a), rows(p), rows(gap), mu)
        head_gap[pending] = bucket_gap
        head_size[pending] = bucket_size
    return head_gap, gap.sum(1) - head_gap, head_size, path


def _in_order(values, indices):
    """(R, k) values and their indices re-ordered as the teacher's order: value descending, then
    index ascending (topk's order among equal values is unspecified)."""
    by_index = indices.argsort(dim=1)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    by_value = values.argsort(dim=1, descending=True, stable=True)
    return values.gather(1, by_value), indices.gather(1, by_value)


def _split_in_top(a, p, gap, mu):
    """The split from each row's TOPK largest logits: (resolved (R,) bool, head gap, head size).

    A row is resolved when the crossing token lies among them and no token outside them shares
    its value (or the whole support is among them).
    """
    k = min(TOPK, a.shape[1])
    values, indices = _in_order(*a.topk(k, dim=1))
    support = values > NEG_INF
    running = p.gather(1, indices).cumsum(1)
    head_count = torch.minimum((running <= mu).sum(1).clamp_(min=1), support.sum(1))
    crossing = values.gather(1, head_count.clamp(max=k - 1)[:, None]).squeeze(1)
    everything_seen = ~support[:, -1] | (k == a.shape[1])
    resolved = everything_seen | ((head_count < k) & (crossing > values[:, -1]))
    in_head = torch.arange(k, device=a.device)[None, :] < head_count[:, None]
    head_gap = torch.where(in_head, gap.gather(1, indices), 0.0).sum(1)
    return resolved, head_gap, head_count


def _split_in_buckets(a, max_a, p, gap, mu):
    """The split from buckets of logits: (head gap, head size), each (R,).

    Token j goes to bucket floor((max - a_j) * BUCKETS_PER_UNIT), the last bucket taking every
    lower logit and -inf: equal logits share a bucket, and a lower bucket holds only larger
    logits than a higher one.
    """
    n_rows = a.shape[0]
    # max * S - a * S: exact products (S is a power of two), one rounding, order kept
    key = torch.add(max_a * BUCKETS_PER_UNIT, a, alpha=-BUCKETS_PER_UNIT).clamp_(max=SPLIT_BUCKETS - 1)
    key = key.to(torch.int64)
    buckets = torch.zeros(3, n_rows, SPLIT_BUCKETS, dtype=p.dtype, device=a.device)
    buckets[0].scatter_add_(1, key, p)  # mass
    buckets[1].scatter_add_(1, key, gap)  # gap
    buckets[2].scatter_add_(1, key, torch.ones((), dtype=p.dtype, device=a.device).expand(key.shape))  # tokens
    running_mass, running_gap, running_count = buckets.cumsum_(2)
    crossing = (running_mass <= mu).sum(1)  # the first bucket whose running mass exceeds mu
    everything = crossing == SPLIT_BUCKETS  # rounding left the whole support within mu
    crossing.clamp_(max=SPLIT_BUCKETS - 1)
    first = crossing == 0
    before = (crossing - 1).clamp(min=0)[:, None]
    mass_before = torch.where(first, 0.0, running_mass.gather(1, before).squeeze(1))
    gap_before = torch.where(first, 0.0, running_gap.gather(1, before).squeeze(1))
    size_before = torch.where(first, 0.0, running_count.gather(1, before).squeeze(1)).round().to(torch.int64)

    # The crossing bucket's tokens as (row, column) in index order, then in the teacher's order
    # within each row: value descending, index ascending (outside the support: not head).
    row, col = torch.argwhere(key == crossing[:, None]).unbind(1)
    values = a[row, col]
    order = values.argsort(descending=True, stable=True)
    order = order[row[order].argsort(stable=True)]
    row, col, values = row[order], col[order], values[order]
    counts = torch.bincount(row, minlength=n_rows)
    start = torch.cumsum(counts, 0) - counts  # each row's first position
    running = p[row, col].double().cumsum(0)  # over every row's tokens: float64 keeps each row's part exact
    base = torch.cat((running.new_zeros(1), running))[start[row]]
    in_head = mass_before[row].double() + (running - base) <= mu
    in_head |= (torch.arange(row.numel(), device=a.device) == start[row]) & first[row]  # the first token is head
    in_head |= everything[row]
    in_head &= values > NEG_INF
    head_gap = gap_before.index_add_(0, row, torch.where(in_head, gap[row, col], 0.0))
    return head_gap, size_before + torch.bincount(row[in_head], minlength=n_rows)
