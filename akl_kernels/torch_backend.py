"""The PyTorch backend: vectorised over chunks of rows, with an analytic gradient.

This is the default on machines without a GPU. Rows are processed a chunk at a time so that the
working memory stays at a few chunk-sized buffers besides the gradient itself, and the gradient
is computed from SPEC section 2 step 7 directly (no autograd graph over vocabulary-sized
intermediates). The head/tail split puts each row's tokens in buckets of logits (one scatter of
the teacher's mass, one of the gaps, and one of counts when statistics are asked for) and
orders exactly only the bucket that crosses mu; no row is sorted.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ._rows import LossMode, RowLossConfig, RowLosses, STATS_FIELDS, compute_dtype

NEG_INF = float("-inf")
INF = float("inf")

# How the split was found, per row (RowLosses.split_path).
# "listed": the head (small) was listed token by token; "buckets": the head's buckets were summed
# by a scatter and only the crossing bucket listed.
SPLIT_PATH_CODES = {"none": 0, "all head": 1, "listed": 2, "buckets": 3}
SPLIT_PATHS = {code: name for name, code in SPLIT_PATH_CODES.items()}


def split_path_name(code: int) -> str:
    """The name of a split_path code."""
    return SPLIT_PATHS[code]


# The split's buckets of logits: BUCKETS_PER_UNIT per unit of a = t / T below the row's max,
# SPLIT_BUCKETS in all (64 units, a factor of 6e27 in probability); the last bucket takes every
# lower logit. 64 per unit: coarser buckets put more tokens in the crossing bucket (measured at
# 16, 64 and 1024 a unit on the benchmark's workloads). 64 units: with 16, most of a real row's
# tokens fell in the last bucket, and adds into one bucket are serial (the scatter took 2x).
BUCKETS_PER_UNIT = 64
SPLIT_BUCKETS = 64 * BUCKETS_PER_UNIT
# Heads listed token by token (no scatter of the gaps) when a bound on the tokens of the head and
# the crossing bucket is at most V / LISTED_SHARE a row: a listed token costs about as much as
# a hundred scattered ones.
LISTED_SHARE = 128

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
    # The workspace holds 25 bytes per chunk element in float32 (33 when the inputs are copied
    # for T or their dtype): chunks of at most CHUNK_ELEMENTS and 1/24 of the rows keep it near
    # a quarter of a float32 gradient or less; fewer rows still get chunks of MIN_CHUNK_ROWS.
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

    def rows(self, count):
        """The buffers cut to their first `count` rows."""
        return _ChunkBuffers(self, count)

    def inverse_bucket_floor(self, count):
        """(count,) e^((k + 1) / BUCKETS_PER_UNIT) for buckets k = 0..count-1: Z over it bounds
        the p of bucket k's tokens from below."""
        if "inverse_bucket_floor" not in self.buffers:
            k = torch.arange(1, SPLIT_BUCKETS + 1, dtype=self.dtype, device=self.device)
            self.buffers["inverse_bucket_floor"] = torch.exp(k / BUCKETS_PER_UNIT)
        return self.buffers["inverse_bucket_floor"][:count]

    def mask(self, count):
        """A bool buffer for `count` rows: (the buffer padded with False to whole 8-byte words,
        its (count, V) start)."""
        rows, vocab = self.shape
        if "mask" not in self.buffers:
            self.buffers["mask"] = torch.zeros(-(-rows * vocab // 8) * 8, dtype=torch.bool, device=self.device)
        size = count * vocab
        padded = self.buffers["mask"][: -(-size // 8) * 8]
        padded[size:] = False
        return padded, padded[:size].view(count, vocab)

    def buffer(self, name, dtype=None):
        """The (rows, V) buffer NAME, of the compute dtype unless dtype says otherwise."""
        if name not in self.buffers:
            self.buffers[name] = torch.empty(self.shape, dtype=dtype or self.dtype, device=self.device)
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
    max_a, max_b = a.amax(1, keepdim=True), b.amax(1, keepdim=True)
    min_a = a.amin(1, keepdim=True)
    invalid = ~(max_a.squeeze(1) < INF) | ~(max_b.squeeze(1) < INF)
    outside = None
    if bool((min_a.min() == NEG_INF) | (b.amin() == NEG_INF)):
        outside = (a == NEG_INF) | (b == NEG_INF)
        a = a.masked_fill(outside, NEG_INF)
        b = b.masked_fill(outside, NEG_INF)

    # Step 2: p = softmax(a), q = softmax(b) over the support.
    if outside is not None:  # the extremes over the support
        max_a, max_b, min_a = a.amax(1, keepdim=True), b.amax(1, keepdim=True), a.amin(1, keepdim=True)
    p, shifted_a, log_z_a = _softmax(a, max_a, chunk.p, chunk.shifted_a)
    q, shifted_b, log_z_b = _softmax(b, max_b, chunk.q, chunk.shifted_b)
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
    # them (AKL) or fixed. The split orders the teacher's mass while p is whole; then q - p
    # (for the gradient) takes p's buffer and |q - p| the scratch buffer.
    split = _find_split(a, max_a, min_a, log_z_a, p, invalid, config.mu, chunk) if config.split else None
    q_minus_p = torch.sub(q, p, out=p)
    if config.split:
        gap = torch.abs(q_minus_p, out=scratch)
        head_gap, tail_gap, head_size = _head_gaps(split, gap, config.stats)
        path = torch.full_like(head_size, split.path, dtype=torch.int32)
    else:
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


def _softmax(x, row_max, out, out_shifted):
    """Row softmax of (R, V) x (-inf outside the support), in the pieces log softmax needs.

    row_max: (R, 1) the rows' largest value. Returns (softmax in out, x - max in out_shifted,
    log_z (R, 1)) with log softmax = (x - max) - log_z, the exponentials taken once. Rows
    without support give NaN (they are invalid anyway).
    """
    shifted = torch.sub(x, row_max, out=out_shifted)
    e = torch.exp(shifted, out=out)
    total = e.sum(1, keepdim=True)
    return e.div_(total), shifted, total.log_()


class _Split(NamedTuple):
    """How the rows of a chunk split into head and tail, as _find_split found it from the teacher.

    keys: (R, V) int64 bucket of every token, or None when the whole support is head (mu = 1;
        then support_size (R,) counts it).
    bucket: (R,) the bucket that crosses mu: every bucket before it is head, every one after
        it tail.
    head_positions: flat positions (row * V + column) of head tokens: those of the crossing
        buckets, or, when listed_whole_head, every head token.
    path: the split_path code of the chunk's rows.
    """

    keys: Optional[torch.Tensor]
    bucket: Optional[torch.Tensor]
    head_positions: Optional[torch.Tensor]
    listed_whole_head: bool
    support_size: Optional[torch.Tensor]
    path: int


def _find_split(a, max_a, min_a, log_z_a, p, invalid, mu, chunk) -> _Split:
    """SPEC section 2 step 3 for a chunk: which tokens are head, from the teacher's logits and mass.

    a, p: (R, V) logits over T and teacher probabilities (-inf and 0 outside the support);
    max_a, min_a, log_z_a: (R, 1) the rows' largest and smallest logit and log normaliser;
    invalid: (R,) rows whose results are NaN anyway. The head is the longest prefix of the
    teacher's order (p descending, ties by lower index) whose running mass stays <= mu, at least
    one token. Token j goes to bucket floor((max - a_j) * BUCKETS_PER_UNIT), the last bucket
    taking every lower logit and -inf: equal logits share a bucket, and a lower bucket holds
    only larger logits than a higher one. The running mass over buckets tells the bucket that
    crosses mu; only its tokens are ordered.
    """
    if mu >= 1.0:  # no running sum can move a token to the tail
        support_size = torch.count_nonzero(a > NEG_INF, dim=1)
        return _Split(None, None, None, False, support_size, SPLIT_PATH_CODES["all head"])
    n_rows, vocab = a.shape
    workspace = chunk.workspace
    # max * S - a * S: exact products (S is a power of two), one rounding, order kept. The
    # scratch buffer is free here (the gaps take it afterwards).
    key = torch.add(max_a * BUCKETS_PER_UNIT, a, alpha=-BUCKETS_PER_UNIT, out=chunk.shifted_b)
    if not bool(((max_a - min_a) * BUCKETS_PER_UNIT < SPLIT_BUCKETS - 1).all()):  # -inf, NaN or a wide row
        key.clamp_(max=SPLIT_BUCKETS - 1)
        key[invalid] = SPLIT_BUCKETS - 1  # NaN keys: any bucket will do for rows that give NaN
    keys = workspace.buffer("keys", torch.int64)[:n_rows].copy_(key)  # truncation = floor here
    mass = torch.zeros(n_rows, SPLIT_BUCKETS, dtype=p.dtype, device=p.device).scatter_add_(1, keys, p)

    # The crossing token has p >= (1 - mu) / V (the tail, at least 1 - mu, has fewer than V
    # tokens, none above it), so it lies within ln(V / (1 - mu)) of the max: only the buckets up
    # to there need a running sum, unless rounding left a row's mass there within mu.
    searched = min(SPLIT_BUCKETS, int(BUCKETS_PER_UNIT * math.log(vocab / (1.0 - mu))) + 2)
    # (Rows that give NaN get bucket 0, and no token is listed for them.)
    running = mass[:, :searched].cumsum(1)
    bucket = (running <= mu).sum(1).masked_fill_(invalid, 0)  # the first bucket whose running mass exceeds mu
    last = int(bucket.max())
    if searched < SPLIT_BUCKETS and last == searched:
        searched = SPLIT_BUCKETS
        running = mass.cumsum(1)
        bucket = (running <= mu).sum(1).masked_fill_(invalid, 0)
        last = int(bucket.max())
    everything = bucket == SPLIT_BUCKETS  # rounding left the whole support within mu
    bucket.clamp_(max=SPLIT_BUCKETS - 1)
    mass_before = _before_bucket(running, bucket)

    # Small heads (T = 1 mostly) are listed whole; larger ones by their crossing bucket only, the
    # buckets before it summed by _head_gaps. Bucket k's tokens have p >= e^-((k + 1) / S) / Z,
    # which bounds how many tokens the head and the crossing bucket hold.
    reach = (mass[:, :searched] * workspace.inverse_bucket_floor(searched)).cumsum_(1).gather(1, bucket[:, None])
    listed_whole_head = float((reach.squeeze(1) * log_z_a.squeeze(1).exp()).nansum()) <= n_rows * vocab / LISTED_SHARE
    padded, mask = workspace.mask(n_rows)
    (torch.le if listed_whole_head else torch.eq)(keys, bucket.masked_fill(invalid, -1)[:, None], out=mask)
    positions = _true_positions(padded)
    rows = positions // vocab
    crossing = positions
    if listed_whole_head:
        in_bucket = keys.view(-1)[positions] == bucket[rows]
        crossing, rows, definite = positions[in_bucket], rows[in_bucket], positions[~in_bucket]

    # The crossing buckets' tokens in the teacher's order within each row: value descending,
    # index ascending (they come in index order; outside the support: never head).
    values = torch.take(a, crossing)
    order = _teacher_order(rows, values)
    crossing, rows, values = crossing[order], rows[order], values[order]
    counts = torch.bincount(rows, minlength=n_rows)
    starts = counts.cumsum(0) - counts  # where each row's tokens start
    # The running mass of each row's tokens, from the mass of the buckets before, in float64:
    # one cumsum over every row's tokens keeps each row's part exact.
    running = F.pad(p.view(-1)[crossing].double().cumsum(0), (1, 0))
    base = (mass_before.double() - running[starts])[rows]
    # Head while the running mass stays <= mu, and the row's first token (no mass before it).
    in_head = (running[1:] + base <= mu) | (running[:-1] + base == 0)
    if last >= SPLIT_BUCKETS - 1:  # the last bucket: -inf (never head) and rows whose mass stays within mu
        in_head |= everything[rows]
        in_head &= values > NEG_INF
    head = crossing[in_head]
    if listed_whole_head:
        head = torch.cat((definite, head))
    path = SPLIT_PATH_CODES["listed" if listed_whole_head else "buckets"]
    return _Split(keys, bucket, head, listed_whole_head, None, path)


def _true_positions(padded):
    """Flat positions of the True entries of a bool tensor whose length is a whole number of
    8-byte words, ascending. nonzero() scans the words first: a few Trues in a large mask cost
    an eighth of a scan of the entries."""
    words = padded.view(torch.int64).nonzero().squeeze(1)
    word, byte = padded.view(-1, 8)[words].nonzero().unbind(1)
    return words[word] * 8 + byte


def _teacher_order(rows, values):
    """The permutation that orders tokens listed in index order by row, then value descending
    (then index, kept by a stable sort): one sort of integers for float32 values, whose bits
    read as int32 sort like the floats once the negative ones have their other bits flipped."""
    if values.dtype == torch.float32:
        bits = (values + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0, its tie
        ascending = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        return ((rows << 32) - ascending).argsort(stable=True)
    order = values.argsort(descending=True, stable=True)
    return order[rows[order].argsort(stable=True)]


def _head_gaps(split, gap, count_head):
    """SPEC section 2 step 4: (head gap, tail gap, head size), each (R,), from the split and
    gap = |p - q| (R, V). The head size is counted only when count_head (it is a statistic
    only) or when it comes for free; otherwise it is 0."""
    n_rows, vocab = gap.shape
    if split.keys is None:  # the whole support is head
        return gap.sum(1), gap.new_zeros(n_rows), split.support_size
    head_rows = split.head_positions // vocab
    head_gap = gap.new_zeros(n_rows).index_add_(0, head_rows, gap.view(-1)[split.head_positions])
    if split.listed_whole_head:
        return head_gap, gap.sum(1) - head_gap, torch.bincount(head_rows, minlength=n_rows)

    # The buckets before the crossing one, by a scatter of the gaps (and of ones for the size).
    searched = int(split.bucket.max())  # no row needs a running sum past its own bucket
    gaps_before, total = _sums_by_bucket(split.keys, gap, split.bucket, searched)
    head_gap += gaps_before
    head_size = torch.zeros(n_rows, dtype=torch.int64, device=gap.device)
    if count_head:
        ones = torch.ones((), dtype=gap.dtype, device=gap.device).expand(gap.shape)
        head_size = _sums_by_bucket(split.keys, ones, split.bucket, searched)[0].round().to(torch.int64)
        head_size += torch.bincount(head_rows, minlength=n_rows)
    return head_gap, total - head_gap, head_size


def _sums_by_bucket(keys, values, bucket, searched):
    """(R,) each row's sum of values over the buckets before its bucket (all below `searched`),
    and (R,) over all buckets."""
    sums = torch.zeros(keys.shape[0], SPLIT_BUCKETS, dtype=values.dtype, device=values.device)
    sums.scatter_add_(1, keys, values)
    return _before_bucket(sums[:, :searched].cumsum(1), bucket), sums.sum(1)


def _before_bucket(running, bucket):
    """(R,) each row's running sum (R, K) just before its bucket: 0 for bucket 0."""
    return F.pad(running, (1, 0)).gather(1, bucket[:, None]).squeeze(1)
