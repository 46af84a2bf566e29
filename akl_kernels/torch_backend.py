"""The PyTorch backend: vectorised over chunks of rows, with an analytic gradient.

This is the default on machines without a GPU. Rows are processed a chunk at a time so that the
working memory stays at a few chunk-sized buffers besides the gradient itself, and the gradient
is computed from its formula (docs/semantics.md section 2, rule 12) directly (no autograd graph
over vocabulary-sized intermediates). The head/tail split puts each row's tokens in buckets of
logits, sums the teacher's mass per bucket and orders exactly only the bucket that crosses mu;
no row is sorted. CPU rows are split row by row by numba-compiled code (_row_split.py), other
rows (a GPU's, or where numba is missing) by torch ops on the whole chunk (_find_split).

Logits are read as they are and shifted by their row's maximum before the temperature divides
them, (x - max) / T, so that neither large logits nor a small T overflow a finite row.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ._rows import (
    TERMS, RowBackend, RowLossConfig, RowLosses, STATS_FIELDS, compute_dtype, is_nan_or_inf, loss_weights,
)
from ._sparse_rows import StudentPasses, sparse_backend
from .divergences import BY_MODE

NEG_INF = float("-inf")
INF = float("inf")

# How the split was found, per row (RowLosses.split_path).
# "rows": CPU rows, each split by the numba-compiled code of _row_split.py (two passes over the
# row while it sits in cache). Elsewhere (a GPU's rows, or where numba is not installed) the
# split runs on the chunk with torch ops: "listed": the head (small) was listed token by token;
# "buckets": the head's buckets were summed by a scatter and only the crossing bucket listed;
# "head blocks": the head (small) was listed from the few blocks of the rows that can hold it
# (_tokens_near_head).
SPLIT_PATH_CODES = {"none": 0, "all head": 1, "listed": 2, "buckets": 3, "head blocks": 4, "rows": 5}
SPLIT_PATHS = {code: name for name, code in SPLIT_PATH_CODES.items()}


@functools.cache
def compiled_row_split():
    """_row_split.row_split_gaps, or None where numba is not installed (the split then runs on
    torch ops, as it does for a GPU's rows). Imported on first use: numba takes a second."""
    try:
        from ._row_split import row_split_gaps
    except ImportError:
        return None
    return row_split_gaps


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

# The head-blocks path (_tokens_near_head): blocks of KEY_BLOCK tokens, taken when the blocks
# that can hold a head are at most KEY_BLOCK_SHARE of a chunk's, for chunks of at least
# HEAD_BLOCKS_MIN_ELEMENTS (in smaller ones its ~30 small ops cost more than the passes they
# save; measured alternately at 256 x 32000 and 1024 x 32000). The blocks it keeps hold mu
# plus NEAR_MARGIN of a row's mass by the floors of their buckets: far more than the float32
# sums' rounding.
KEY_BLOCK = 32
KEY_BLOCK_SHARE = 0.25
HEAD_BLOCKS_MIN_ELEMENTS = 1 << 19
NEAR_MARGIN = 1e-3

# Largest rows per chunk times vocabulary size: 4 MiB per float32 buffer.
CHUNK_ELEMENTS = 1 << 20
# Fewest rows per chunk (when the vocabulary allows): below 8, the per-chunk overhead of the
# ops outweighs their work (measured at V = 32000: 2 rows per chunk take 1.5x as long as 8).
MIN_CHUNK_ROWS = 8


# State kept per row for torch_row_gradient (RowLosses.state, (N, len(STATE_FIELDS))): the
# logits' maxima over the support, the sums of exp((x - max) / T), RKL, the two weights, 1
# where a log-ratio or divergence is beyond MODERATE (see _student_gradient), and H, the sum of
# the h_j of a divergence made of terms (TERMS). With them the recomputed gradient equals the
# forward's bit for bit.
STATE_FIELDS = ("max_t", "max_s", "sum_a", "sum_b", "rkl", "head_weight", "tail_weight", "extreme", "h_sum")
# The statistics (STATS_FIELDS rows) that the state copies: RKL and the weights.
STATE_STATS = [1, 4, 5]

# A row whose FKL and RKL stay below this in magnitude has only finite log-ratios d (an
# infinite one makes a sum NaN), and d + RKL cannot overflow float32 (its largest value plus
# 1e30 rounds back to it); rows beyond it take the slower form that follows the limits.
MODERATE = 1e30


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
    n_rows = student.numel() // vocab
    dtype = compute_dtype(student.dtype, teacher.dtype)
    device = student.device

    loss = torch.zeros(n_rows, dtype=dtype, device=device)
    stats = torch.zeros(len(STATS_FIELDS), n_rows, dtype=dtype, device=device)
    head_size = torch.zeros(n_rows, dtype=torch.int64, device=device)
    split_path = torch.zeros(n_rows, dtype=torch.int32, device=device)
    state = torch.zeros(n_rows, len(STATE_FIELDS), dtype=dtype, device=device)
    grad = _gradient_buffer(student, keep, grad_out) if compute_grad else None
    grad_scale = grad_scale.to(dtype) if compute_grad else None

    for rows, chunk, a, b in _chunks(student, teacher, keep, dtype):
        result = _chunk_losses(a, b, chunk, config, grad_scale)
        loss[rows] = result.loss
        stats[:, rows] = result.stats
        head_size[rows] = result.head_size
        split_path[rows] = result.path
        state[rows] = result.state
        if compute_grad:
            grad.view(n_rows, vocab).index_copy_(0, rows, result.grad.to(grad.dtype))
    return RowLosses(loss, stats, head_size, grad, split_path, state)


def torch_row_gradient(
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None,
    row_scale: torch.Tensor,
    state: torch.Tensor,
    config: RowLossConfig,
    grad_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """d(sum_i row_scale_i * loss_i) / d student, from the inputs and torch_row_losses' state.

    Args:
        student, teacher, keep, config: as given to torch_row_losses.
        row_scale: (N,) compute dtype, each row's factor (grad_output times the reduction's);
            ignored rows get a zero gradient whatever it holds.
        state: RowLosses.state of that call.
        grad_out: as for torch_row_losses.

    Returns:
        Student-shaped, the student's dtype, contiguous. Each entry is computed in the compute
        dtype with row_scale already applied and rounded once (a float16 gradient under loss
        scaling keeps what float32 holds).
    """
    vocab = student.shape[-1]
    n_rows = student.numel() // vocab
    dtype = compute_dtype(student.dtype, teacher.dtype)
    grad = _gradient_buffer(student, keep, grad_out)
    inv_t = 1.0 / config.temperature
    row_scale = row_scale.to(dtype)
    # The weights are at most 1: with the row's factor over T finite, no factor overflows.
    factors_finite = bool((row_scale * inv_t).isfinite().all())
    terms = _terms_of(config.mode)
    for rows, chunk, a, b in _chunks(student, teacher, keep, dtype):
        max_a, max_b, sum_a, sum_b, rkl, head_weight, tail_weight, extreme, h_sum = state[rows].split(1, dim=1)
        a, b, outside = _restrict_to_support(a, b)
        p, q, d, _ = _probabilities(a, b, max_a, max_b, inv_t, chunk, outside, (sum_a, sum_b))
        if terms is not None:
            log_p, log_q = _log_probabilities(a, b, max_a, max_b, sum_a, sum_b, inv_t, chunk)
            _, h = terms(p, q, log_p, log_q, config.mixture)
            chunk_grad = _terms_gradient(h, q, h_sum.squeeze(1), row_scale[rows], inv_t, out=d)
        else:
            weights = torch.cat((head_weight, tail_weight), 1).mul_(row_scale[rows, None])
            careful = not factors_finite or bool(extreme.any())
            chunk_grad = _student_gradient(d, q, torch.sub(q, p, out=p), rkl.squeeze(1), weights, inv_t, careful)
        chunk_grad[head_weight.squeeze(1).isnan()] = float("nan")  # invalid rows
        grad.view(n_rows, vocab).index_copy_(0, rows, chunk_grad.to(grad.dtype))
    return grad


TORCH_BACKEND = RowBackend(
    name="torch",
    row_losses=torch_row_losses,
    row_gradient=torch_row_gradient,
    # The forward pass has p, q and log p - log q at hand: the gradient costs four more
    # elementwise passes there, against eight when recomputed. A float16 gradient waits for
    # backward, where grad_output (the loss scale) enters before the rounding to float16.
    forward_gradient_dtypes=(torch.bfloat16, torch.float32, torch.float64),
    split_path_name=split_path_name,
    state_columns=lambda teacher: len(STATE_FIELDS),
)


def torch_unlisted_logsumexp(student, indices, keep, temperature, dtype):
    """A sparse teacher's pass over the student (_sparse_rows.StudentPasses): per row, the largest
    logit m among the support tokens not in `indices` (N, K), the log-sum-exp of (s - m) / T
    over them (both -inf if there are none) and whether the row holds NaN or +inf. Ignored rows
    are not read (-inf, -inf, False)."""
    vocab = student.shape[-1]
    n_rows = student.numel() // vocab
    unlisted_max = torch.full((n_rows,), NEG_INF, dtype=dtype, device=student.device)
    lse = torch.full((n_rows,), NEG_INF, dtype=dtype, device=student.device)
    has_nan_or_inf = torch.zeros(n_rows, dtype=torch.bool, device=student.device)
    for rows, chunk, _, s in _chunks(student, None, keep, dtype):
        listed = indices[rows]
        # The logits with the listed tokens at -inf (so are -inf logits: outside the support).
        wide = _with_padding_column(chunk)
        wide[:, :vocab].copy_(s)
        wide.scatter_(1, _padding_at_end(listed, vocab), NEG_INF)
        x = wide[:, :vocab]
        top = x.amax(1, keepdim=True)  # NaN or +inf when an unlisted token is
        has_nan_or_inf[rows] = is_nan_or_inf(s.gather(1, listed.clamp(min=0))).logical_and_(listed >= 0).any(1)
        if not bool((top < INF).all()):  # NaN or +inf among the unlisted tokens: look at the logits themselves
            has_nan_or_inf[rows] |= is_nan_or_inf(s).any(1)
        unlisted_max[rows] = top.squeeze(1)
        top = torch.where(top.isfinite(), top, 0.0)
        x = torch.sub(x, top, out=x)  # shifted before T divides (docs/semantics.md rule 21)
        if temperature != 1.0:
            x.div_(temperature)
        lse[rows] = x.exp_().sum(1).log_()
    return unlisted_max, lse, has_nan_or_inf


def torch_sparse_gradient(student, indices, keep, temperature, shift, lse, listed_grad, unlisted_factor, grad_out=None):
    """A sparse teacher's gradient pass (_sparse_rows.StudentPasses): listed_grad (N, K) at the
    tokens of `indices`, exp((s - shift) / T - lse) * unlisted_factor at the others (0 off the
    support)."""
    vocab = student.shape[-1]
    n_rows = student.numel() // vocab
    grad = _gradient_buffer(student, keep, grad_out)
    for rows, chunk, _, s in _chunks(student, None, keep, lse.dtype):
        chunk_grad = _with_padding_column(chunk)
        x = torch.sub(s, shift[rows, None], out=chunk_grad[:, :vocab])
        if temperature != 1.0:
            x.div_(temperature)
        x.sub_(lse[rows, None]).exp_().mul_(unlisted_factor[rows, None])
        chunk_grad.scatter_(1, _padding_at_end(indices[rows], vocab), listed_grad[rows])
        grad.view(n_rows, vocab).index_copy_(0, rows, x.to(grad.dtype))
    return grad


def _with_padding_column(chunk):
    """The chunk's (R, V + 1) workspace buffer: a row and one column past it, where writes for
    padding (-1) indices land (_padding_at_end)."""
    rows, vocab = chunk.workspace.shape
    return chunk.workspace.buffer("wide", shape=(rows, vocab + 1))[: chunk.count]


def _padding_at_end(indices, vocab):
    """(R, K) indices with padding (-1) moved to column V, one past the row."""
    return torch.where(indices >= 0, indices, vocab)


TORCH_SPARSE_BACKEND = sparse_backend(
    "torch_sparse", StudentPasses(torch_unlisted_logsumexp, torch_sparse_gradient), split_path_name
)


def _gradient_buffer(student, keep, grad_out):
    """The gradient's tensor (grad_out, or a new one), zero at ignored rows."""
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device) if grad_out is None else grad_out
    if keep is not None:
        grad.view(-1, student.shape[-1]).index_fill_(0, (~keep).nonzero().squeeze(1), 0.0)
    return grad


def _chunks(student, teacher, keep, dtype):
    """The kept rows in chunks: yields (rows (R,) int64, the chunk's workspace buffers, teacher
    rows (R, V) (None when teacher is None), student rows (R, V)), the logits in the compute
    dtype, never written to.

    The workspace holds 16 bytes per chunk element in float32 with the compiled row split, 25
    with the torch-ops split (8 more when the inputs are copied for their dtype or layout):
    chunks of at most CHUNK_ELEMENTS and 1/24 of the rows keep it near a quarter of a float32
    gradient or less; fewer rows still get chunks of MIN_CHUNK_ROWS.
    """
    vocab = student.shape[-1]
    n_rows = student.numel() // vocab
    kept = torch.arange(n_rows, device=student.device) if keep is None else keep.nonzero().squeeze(1)
    if kept.numel() == 0:
        return
    rows_per_chunk = max(1, min(CHUNK_ELEMENTS // vocab, max(n_rows // 24, MIN_CHUNK_ROWS), kept.numel()))
    workspace = _Workspace(rows_per_chunk, vocab, dtype, student.device)
    read_teacher = None if teacher is None else _chunk_reader(teacher, keep, dtype)
    read_student = _chunk_reader(student, keep, dtype)
    for rows in kept.split(rows_per_chunk):
        chunk = workspace.rows(rows.numel())
        # Views of the inputs where possible, else copies in the workspace.
        a = None if teacher is None else read_teacher(rows, lambda: chunk.a)
        yield rows, chunk, a, read_student(rows, lambda: chunk.b)


class _Workspace:
    """Chunk-sized buffers, allocated on first use and reused by every chunk of a call.

    Ops write into them with out=: allocating, and page-faulting in, several
    vocabulary-sized tensors per chunk instead costs about as much as the arithmetic.
    `a` and `b` are only needed when the inputs cannot be read as views.
    """

    def __init__(self, rows, vocab, dtype, device):
        self.shape, self.dtype, self.device = (rows, vocab), dtype, device
        self.buffers = {}
        self.head_blocks_tries = [0, 0]  # taken, in vain

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

    def head_blocks_pay(self):
        """Whether to try the head-blocks path: while it has been taken at least as often as
        it was tried in vain in this call (a flat teacher pays for one try, not one a chunk)."""
        taken, in_vain = self.head_blocks_tries
        return taken >= in_vain

    def head_blocks_tried(self, taken):
        """Count a try of the head-blocks path."""
        self.head_blocks_tries[0 if taken else 1] += 1

    def keys_then_mask(self, count):
        """(keys, mask), each (count, V): the int64 bucket keys' buffer, and a view of the same
        memory in the compute dtype for a 0/1 mask once the keys are spent (a comparison
        written as floats is about 6x faster than one written as bools, and a float mask turns
        into bools or into a masked sum in one cheap pass)."""
        rows, vocab = self.shape
        keys = self.buffer("keys", torch.int64)
        mask = keys.view(-1).view(self.dtype)[: count * vocab].view(count, vocab)
        return keys[:count], mask

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

    def buffer(self, name, dtype=None, shape=None):
        """The buffer NAME, (rows, V) and of the compute dtype unless dtype and shape say otherwise."""
        if name not in self.buffers:
            self.buffers[name] = torch.empty(shape or self.shape, dtype=dtype or self.dtype, device=self.device)
        return self.buffers[name]


class _ChunkBuffers:
    """A chunk's view of the workspace: chunk.NAME is the (count, V) start of buffer NAME."""

    def __init__(self, workspace, count):
        self._workspace, self._count = workspace, count

    @property
    def workspace(self):
        return self._workspace

    @property
    def count(self):
        return self._count

    def __getattr__(self, name):
        return self._workspace.buffer(name)[: self._count]


def _chunk_reader(x, keep, dtype):
    """A function (rows, out) -> x[rows] as an (R, V) tensor of the compute dtype.

    The result is a view of x when every row is kept, the rows of x form one strided 2-D
    view and the dtype already matches; otherwise it is written into out(), a function that
    returns the workspace buffer (so that the buffer is only allocated when needed).
    """
    vocab = x.shape[-1]
    try:
        rows_2d = x.view(-1, vocab)
    except RuntimeError:  # leading dimensions that no single stride describes
        rows_2d = None

    def read(rows, out):
        if keep is None and rows_2d is not None:
            source = rows_2d[int(rows[0]) : int(rows[-1]) + 1]  # consecutive rows: a view
            return source if source.dtype == dtype else out().copy_(source)
        if rows_2d is not None and x.dtype == dtype:
            return torch.index_select(rows_2d, 0, rows, out=out())
        return out().copy_(x[torch.unravel_index(rows, x.shape[:-1])])

    return read


class _ChunkResult(NamedTuple):
    """_chunk_losses' results for R rows: loss (R,), stats (6, R), head_size (R,), grad (R, V)
    in a workspace buffer or None, path (R,) split path codes, state (R, 8) as STATE_FIELDS."""

    loss: torch.Tensor
    stats: torch.Tensor
    head_size: torch.Tensor
    grad: Optional[torch.Tensor]
    path: torch.Tensor
    state: torch.Tensor


def _chunk_losses(a, b, chunk, config, grad_scale) -> _ChunkResult:
    """docs/semantics.md section 2 for a chunk of R rows of teacher logits a and student
    logits b, both (R, V).

    a and b are not written to; `chunk` holds the workspace buffers cut to R rows. grad_scale
    (0-dim, at most 1) is the gradient's factor, or None when no gradient is wanted.
    """
    inv_t = 1.0 / config.temperature
    # Step 1: rows with NaN or +inf logits (their max is NaN or +inf) must give NaN; positions
    # where either logit is -inf are outside the support.
    max_a, max_b = a.amax(1, keepdim=True), b.amax(1, keepdim=True)
    min_a = a.amin(1, keepdim=True)
    invalid = ~(max_a.squeeze(1) < INF) | ~(max_b.squeeze(1) < INF)
    a, b, outside = _restrict_to_support(a, b, min_a)
    if outside is not None:  # the extremes over the support
        max_a, max_b, min_a = a.amax(1, keepdim=True), b.amax(1, keepdim=True), a.amin(1, keepdim=True)

    # Step 2: p = softmax(a / T), q = softmax(b / T) over the support, d = log p - log q.
    p, q, d, (sum_a, sum_b) = _probabilities(a, b, max_a, max_b, inv_t, chunk, outside)
    invalid |= max_a.squeeze(1) == NEG_INF  # empty support
    scratch = chunk.shifted_b

    # Step 5: FKL = sum p (log p - log q), RKL = sum q (log q - log p). A term whose
    # probability is 0 is 0 (the limit of p log p), even where its log-ratio is infinite
    # because the logits span more than float32 holds: rows where that happens (and only
    # they give NaN, or sums beyond MODERATE) are summed again with those terms set to 0.
    fkl = torch.mul(p, d, out=scratch).sum(1)
    rkl = torch.mul(q, d, out=scratch).sum(1).neg_()
    # Invalid rows give NaN sums too: one check of the chunk's total tells that no row needs a
    # closer look (the common case).
    total = float((fkl + rkl).sum())
    any_invalid = extreme = False
    extreme_rows = None
    if not (math.isfinite(total) and abs(total) < MODERATE):
        any_invalid = bool(invalid.any())
        extreme_rows = ~(torch.maximum(fkl.abs(), rkl.abs()) < MODERATE) & ~invalid
        extreme = bool(extreme_rows.any())
    if extreme:
        fkl = torch.where(p > 0, p * d, 0.0).sum(1)
        rkl = torch.where(q > 0, q * d, 0.0).sum(1).neg_()

    # A divergence made of terms (TERMS): D = sum l_j, and h_j = q_j dD/dq_j for the gradient.
    terms = _terms_of(config.mode)
    divergence = h_sum = torch.zeros_like(fkl)
    if terms is not None:
        log_p, log_q = _log_probabilities(a, b, max_a, max_b, sum_a, sum_b, inv_t, chunk)
        term, h = terms(p, q, log_p, log_q, config.mixture)
        divergence, h_sum = term.sum(1), h.sum(1)
        del term, log_p, log_q

    # Steps 3 and 4: the head/tail split and the gaps |p - q| over head and tail; weights from
    # them (AKL) or fixed. Both splits read p whole: CPU rows (below mu = 1) are split, gaps
    # included, by the compiled code; the torch-ops split orders the teacher's mass here, then
    # q - p (for the gradient) takes p's buffer and |q - p| the scratch buffer.
    split = row_split = None
    if config.split and config.mu < 1.0 and a.device.type == "cpu":
        row_split = compiled_row_split()
    if row_split is not None:
        scale = BUCKETS_PER_UNIT / config.temperature
        head_gap, tail_gap, head_size = row_split(a, p, q, max_a, min_a, config.mu, scale, SPLIT_BUCKETS)
        path = torch.full_like(head_size, SPLIT_PATH_CODES["rows"], dtype=torch.int32)
    elif config.split:
        split = _find_split(a, max_a, min_a, sum_a.log(), p, invalid, config, chunk)
    q_minus_p = torch.sub(q, p, out=p)
    if split is not None:
        gap = torch.abs(q_minus_p, out=scratch)
        head_gap, tail_gap, head_size = _head_gaps(split, gap, config.stats)
        path = torch.full_like(head_size, split.path, dtype=torch.int32)
    elif not config.split:
        head_gap = tail_gap = torch.zeros_like(fkl)
        head_size = torch.zeros(fkl.shape, dtype=torch.int64, device=fkl.device)
        path = torch.zeros(fkl.shape, dtype=torch.int32, device=fkl.device)
    del p
    head_weight, tail_weight = loss_weights(BY_MODE[config.mode].kl_weights, head_gap, tail_gap)

    # Step 6: the loss, w_head FKL + w_tail RKL + D; a divergence with weight 0 adds nothing,
    # even when it is +inf.
    if extreme:
        loss = _weighted(head_weight, fkl) + _weighted(tail_weight, rkl) + divergence
    else:
        loss = head_weight * fkl + tail_weight * rkl + divergence
    stats = torch.stack((fkl, rkl, head_gap, tail_gap, head_weight, tail_weight))
    if any_invalid:  # NaN loss and statistics, head size 0 and no split path (as the Triton backend)
        loss[invalid] = float("nan")
        stats[:, invalid] = float("nan")
        head_size = head_size.masked_fill(invalid, 0)
        path = path.masked_fill(invalid, 0)
    extreme_flags = fkl.new_zeros(fkl.shape[0], 1) if extreme_rows is None else extreme_rows[:, None].to(fkl.dtype)
    state = torch.cat((max_a, max_b, sum_a, sum_b, stats[STATE_STATS].T, extreme_flags, h_sum[:, None]), 1)

    # Step 7, built in d's buffer.
    grad = None
    if grad_scale is not None and terms is not None:
        grad = _terms_gradient(h, q, h_sum, grad_scale, inv_t, out=d)
    elif grad_scale is not None:
        weights = torch.stack((head_weight, tail_weight), 1).mul_(grad_scale)
        grad = _student_gradient(d, q, q_minus_p, rkl, weights, inv_t, extreme)
    if grad is not None and any_invalid:
        grad[invalid] = float("nan")
    return _ChunkResult(loss, stats, head_size, grad, path, state)


def _restrict_to_support(a, b, min_a=None):
    """(a, b, outside): the (R, V) logits with -inf wherever either is -inf (new tensors then,
    the inputs untouched), and that (R, V) bool mask, or the inputs themselves and None when
    no position of the chunk is -inf. min_a: a's row minima when already known."""
    if not bool(((a if min_a is None else min_a).amin() == NEG_INF) | (b.amin() == NEG_INF)):
        return a, b, None
    outside = (a == NEG_INF) | (b == NEG_INF)
    return a.masked_fill(outside, NEG_INF), b.masked_fill(outside, NEG_INF), outside


def _shift(x, row_max, inv_t, out):
    """(x - max) / T into out: the shift first, so that neither large logits nor a small T
    overflow (a logit more than float32's range below the max gives -inf)."""
    shifted = torch.sub(x, row_max, out=out)
    return shifted.mul_(inv_t) if inv_t != 1.0 else shifted


def _probabilities(a, b, max_a, max_b, inv_t, chunk, outside, sums=None):
    """p = softmax(a / T), q = softmax(b / T) and d = log p - log q, each (R, V), for logits
    that are -inf outside the support (`outside`, or None when nothing is).

    max_a, max_b: (R, 1) the rows' largest logits. With sum_a the sum of exp((a - max_a) / T),
    log p = (a - max_a) / T - log sum_a; the exponentials are taken once. d is 0 outside the
    support. The sums are computed unless given: the gradient's recomputation passes the
    forward's, and so gets the forward's numbers exactly. Returns (p, q, d, (sum_a, sum_b)),
    p, q and d in the chunk's p, q and shifted_a buffers. Rows without support give NaN (they
    are invalid anyway).
    """
    shifted_a = _shift(a, max_a, inv_t, chunk.shifted_a)
    shifted_b = _shift(b, max_b, inv_t, chunk.shifted_b)
    p = torch.exp(shifted_a, out=chunk.p)
    q = torch.exp(shifted_b, out=chunk.q)
    sum_a, sum_b = (p.sum(1, keepdim=True), q.sum(1, keepdim=True)) if sums is None else sums
    p.div_(sum_a)
    q.div_(sum_b)
    d = shifted_a.sub_(shifted_b).sub_(sum_a.log() - sum_b.log())
    if outside is not None:
        d.masked_fill_(outside, 0.0)
    return p, q, d, (sum_a, sum_b)


def _weighted(weight, divergence):
    """weight * divergence, and 0 where the weight is 0 (even for an infinite divergence)."""
    return torch.where(weight == 0, 0.0, weight * divergence)


def _log_probabilities(a, b, max_a, max_b, sum_a, sum_b, inv_t, chunk):
    """(log p, log q), each (R, V) in the chunk's log_p and log_q buffers: (x - max) / T - log
    sum, -inf outside the support (where a and b are -inf)."""
    log_p = _shift(a, max_a, inv_t, chunk.log_p).sub_(sum_a.log())
    log_q = _shift(b, max_b, inv_t, chunk.log_q).sub_(sum_b.log())
    return log_p, log_q


def _terms_of(mode):
    """TERMS[mode] for a divergence made of terms, None for the KL losses; NotImplementedError
    for a mode this backend does not compute."""
    family = BY_MODE.get(mode)
    if family is None or (family.has_terms and mode not in TERMS):
        raise NotImplementedError(f"the torch backend does not compute loss mode {mode!r}")
    return TERMS[mode] if family.has_terms else None


def _terms_gradient(h, q, h_sum, factor, inv_t, out):
    """d(factor_i * D_i) / d s = factor_i (h - q H) / T (the softmax's Jacobian applied to
    dD/dq), written into out and returned. h, q (R, V); h_sum (R,) H = sum_j h_j; factor a
    0-dim tensor or (R,)."""
    factor = (factor * inv_t).expand(h_sum.shape)[:, None]
    grad = torch.mul(q, h_sum[:, None], out=out)
    return torch.sub(h, grad, out=out).mul_(factor)


def _student_gradient(d, q, q_minus_p, rkl, weights, inv_t, careful):
    """The gradient (docs/semantics.md section 2, rule 12), times each row's factor, written
    into d's buffer and returned.

    d = log p - log q (R, V), 0 outside the support; q and q - p (R, V); rkl (R,); weights
    (R, 2): w_head and w_tail times the row's factor; inv_t = 1 / T. With f_h, f_t those
    factors over T: d loss / d s_j = f_h (q_j - p_j) - f_t q_j (d_j + RKL).

    Unless `careful` (a row's divergence beyond MODERATE, or factors over T that may overflow),
    nothing can overflow into a NaN: d + RKL is finite, and its products with q and the finite
    factors may at most overflow to an infinity. Careful, the terms follow their limits: q_j = 0
    gives 0 whatever d_j is, and d_j + RKL = inf - inf (a ratio as infinite as the divergence it
    is part of) gives 0; 1 / T multiplies last.
    """
    if not careful:
        factors = weights * inv_t
        head_factor, tail_factor = factors[:, :1], factors[:, 1:]
        grad = d.add_(rkl[:, None]).mul_(q).mul_(-tail_factor)
        return grad.addcmul_(q_minus_p, head_factor)
    head_factor, tail_factor = weights[:, :1], weights[:, 1:]
    rkl = rkl[:, None]
    infinite_pair = d == -rkl
    ratio_plus_divergence = d.add_(rkl).masked_fill_(infinite_pair, 0.0)
    weighted_q = q * tail_factor
    tail = torch.where(weighted_q == 0, 0.0, weighted_q * ratio_plus_divergence)
    grad = torch.sub(q_minus_p * head_factor, tail, out=d)
    return grad.mul_(inv_t) if inv_t != 1.0 else grad


class _Split(NamedTuple):
    """How the rows of a chunk split into head and tail, as _find_split found it from the teacher.

    before_crossing: (R, V) 1 for the tokens of the buckets before each row's crossing bucket
        (all head), 0 elsewhere, in the compute dtype (a workspace buffer, free to overwrite);
        None when the head was listed whole or the whole support is head.
    head_positions: flat positions (row * V + column) of head tokens: those of the crossing
        buckets, or, when listed_whole_head, every head token.
    support_size: (R,) the support's size when it is all head (mu = 1), else None.
    path: the split_path code of the chunk's rows.
    """

    before_crossing: Optional[torch.Tensor]
    head_positions: Optional[torch.Tensor]
    listed_whole_head: bool
    support_size: Optional[torch.Tensor]
    path: int


def _find_split(a, max_a, min_a, log_z_a, p, invalid, config, chunk) -> _Split:
    """The head/tail rule (docs/semantics.md section 2, rules 4-6) for a chunk: which tokens
    are head, from the teacher's logits and mass.

    a, p: (R, V) teacher logits and probabilities (-inf and 0 outside the support);
    max_a, min_a, log_z_a: (R, 1) the rows' largest and smallest logit and log normaliser (of
    (a - max) / T); invalid: (R,) rows whose results are NaN anyway. The head is the longest
    prefix of the teacher's order (p descending, ties by lower index) whose running mass stays
    <= mu, at least one token. Token j goes to bucket floor((max - a_j) / T * BUCKETS_PER_UNIT),
    the last bucket taking every lower logit and -inf: equal logits share a bucket, and a lower
    bucket holds only larger logits than a higher one. The running mass over buckets tells the
    bucket that crosses mu; only its tokens are ordered.
    """
    mu = config.mu
    if mu >= 1.0:  # no running sum can move a token to the tail
        support_size = torch.count_nonzero(a > NEG_INF, dim=1)
        return _Split(None, None, False, support_size, SPLIT_PATH_CODES["all head"])
    n_rows, vocab = a.shape
    workspace = chunk.workspace
    # The crossing token has p >= (1 - mu) / V (the tail, at least 1 - mu, has fewer than V
    # tokens, none above it), so it lies within ln(V / (1 - mu)) of the max: only the buckets up
    # to there need a running sum, unless rounding left a row's mass there within mu.
    searched = min(SPLIT_BUCKETS, int(BUCKETS_PER_UNIT * math.log(vocab / (1.0 - mu))) + 2)
    near = None
    if vocab >= KEY_BLOCK and n_rows * vocab >= HEAD_BLOCKS_MIN_ELEMENTS and workspace.head_blocks_pay():
        near = _tokens_near_head(a, p, max_a, min_a, invalid, log_z_a, config, searched)
        workspace.head_blocks_tried(near is not None)
    if near is not None:  # the head's blocks only (one more bucket takes the columns in no window)
        flat_keys = near.keys.long().add_((near.rows * SPLIT_BUCKETS)[:, None])
        mass = p.new_zeros(n_rows * SPLIT_BUCKETS + 1).scatter_add_(0, flat_keys.view(-1), near.p.view(-1))
        mass = mass[:-1].view(n_rows, SPLIT_BUCKETS)
    else:  # every token (the scratch buffer is free here: the gaps take it afterwards)
        key = _bucket_keys(a, max_a, min_a, invalid, config.temperature, out=chunk.shifted_b)
        keys, key_mask = workspace.keys_then_mask(n_rows)
        keys.copy_(key)  # truncation = floor here; the float keys stay for the comparisons below
        mass = torch.zeros(n_rows, SPLIT_BUCKETS, dtype=p.dtype, device=p.device).scatter_add_(1, keys, p)

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
    listed_bucket = bucket.masked_fill(invalid, -1)
    before_crossing = None
    if near is not None:
        listed_whole_head = True
        limit = (listed_bucket + 1).to(near.keys.dtype)[near.rows, None]  # bucket <= b: key < b + 1
        taken = _true_positions(torch.lt(near.keys, limit, out=torch.empty_like(near.keys)).bool().view(-1))
        window, column = taken // KEY_BLOCK, taken % KEY_BLOCK
        positions, rows = near.starts[window] + column, near.rows[window]
        in_bucket = near.keys.view(-1)[taken] >= bucket[rows]
    else:
        reach = (mass[:, :searched] * workspace.inverse_bucket_floor(searched)).cumsum_(1).gather(1, bucket[:, None])
        listed_whole_head = float((reach.squeeze(1) * log_z_a.squeeze(1).exp()).nansum()) <= n_rows * vocab / LISTED_SHARE
        # The keys' floors are the buckets: bucket <= b where key < b + 1, bucket == b where
        # floor(key) == b (compared as floats, then copied to bools: see keys_then_mask).
        listed_bucket = listed_bucket[:, None].to(key.dtype)
        if listed_whole_head:
            torch.lt(key, listed_bucket + 1, out=key_mask)
        else:
            torch.eq(key.floor_(), listed_bucket, out=key_mask)
        padded, mask = workspace.mask(n_rows)
        mask.copy_(key_mask)
        positions = _true_positions(padded)
        rows = positions // vocab
        if listed_whole_head:
            in_bucket = torch.take(key, positions) >= bucket[rows]
        else:  # the buckets before the crossing one: summed by _head_gaps
            before_crossing = torch.lt(key, bucket[:, None].to(key.dtype), out=key_mask)
    crossing = positions
    if listed_whole_head:
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
    path = SPLIT_PATH_CODES["head blocks" if near is not None else "listed" if listed_whole_head else "buckets"]
    return _Split(before_crossing, head, listed_whole_head, None, path)


def _bucket_keys(values, max_a, min_a, invalid, temperature, out=None):
    """Float keys (max - value) / T * BUCKETS_PER_UNIT, capped at the last bucket (their floors,
    taken when they become integers, are the buckets), for teacher logits `values` (R, W) of
    rows whose largest and smallest logits are max_a and min_a (R, 1); the rows of invalid (R,)
    get the last bucket. Written into out when given."""
    # max k - a k with k = S / T: one pass, and rounding keeps the order (exact products when
    # k is a power of two, at T = 1 and 2); (max - a) k where max k would overflow. Otherwise
    # max k is rounded up: the add may fuse a k into one rounding, and a key below 0 (the max
    # token's, by max k's rounding error) would be no bucket at all.
    k = BUCKETS_PER_UNIT / temperature
    if bool((max_a.abs() * k < 1e38).all()):
        max_k = max_a * k
        if math.frexp(k)[0] != 0.5:
            max_k = torch.nextafter(max_k, torch.tensor(INF, dtype=max_k.dtype, device=max_k.device))
        key = torch.add(max_k, values, alpha=-k, out=out)
    else:  # k itself may overflow at small T: the 1 / T first
        key = torch.sub(max_a, values, out=out).mul_(1.0 / temperature).mul_(BUCKETS_PER_UNIT)
    if not bool(((max_a - min_a) * k < SPLIT_BUCKETS - 1).all()):  # -inf, NaN or a wide row
        key.clamp_(max=SPLIT_BUCKETS - 1)
        key[invalid] = SPLIT_BUCKETS - 1  # NaN keys: any bucket will do for rows that give NaN
    return key


class _NearHead(NamedTuple):
    """The windows of KEY_BLOCK tokens of a chunk that hold its rows' heads and crossing
    tokens: starts (C,) the flat position (row * V + column) of each window's first token, rows
    (C,), keys (C, KEY_BLOCK) the float bucket keys (_bucket_keys) and p (C, KEY_BLOCK).
    Windows come in position order within a row; a column that another window holds has key
    SPLIT_BUCKETS (past the last bucket) and p 0 in this one."""

    starts: torch.Tensor
    rows: torch.Tensor
    keys: torch.Tensor
    p: torch.Tensor


def _tokens_near_head(a, p, max_a, min_a, invalid, log_z_a, config, searched):
    """_NearHead for the chunk when the blocks of KEY_BLOCK tokens that can hold a head or
    crossing token are at most KEY_BLOCK_SHARE of its blocks, else None.

    a, p: (R, V) teacher logits and probabilities, V >= KEY_BLOCK; max_a, min_a, log_z_a:
    (R, 1) and invalid (R,) as for _find_split; searched: how many buckets a running mass may
    need. A block's smallest key k (that of its largest logit) means a token of
    p >= e^-((k + 2) / S) / Z: the floor of bucket k, and one bucket more for rounding. When the
    blocks whose smallest key is at most beta hold more than mu + NEAR_MARGIN by these bounds,
    every token of a bucket after beta is tail (the running mass passed mu before it), and so
    is every token of a block whose smallest key is after beta + 1 (one bucket for rounding). A
    row with no such beta keeps all its blocks. The columns after the last whole block (V not a
    multiple of KEY_BLOCK) are always kept, as a window that ends the row. Rows whose logits
    reach 2^22 / k in magnitude (k = BUCKETS_PER_UNIT / T) get None: there a key's rounding
    may exceed the one bucket that the bound allows.
    """
    n_rows, vocab = a.shape
    scaled_max = (max_a.abs() * (BUCKETS_PER_UNIT / config.temperature)).masked_fill(invalid[:, None], 0)
    if not bool((scaled_max < 2.0**22).all()):
        return None
    blocks = vocab // KEY_BLOCK

    def by_block(x):  # (R, blocks, KEY_BLOCK): the whole blocks of each row
        return x[:, : blocks * KEY_BLOCK].unflatten(1, (blocks, KEY_BLOCK))

    block_max = by_block(a).amax(2)
    block_keys = _bucket_keys(block_max, max_a, min_a, invalid, config.temperature).long()
    floors = torch.zeros(n_rows, SPLIT_BUCKETS, dtype=p.dtype, device=p.device)
    floors.scatter_add_(1, block_keys, block_keys.add(2).to(p.dtype).div_(-BUCKETS_PER_UNIT).exp_())
    beta = (floors[:, :searched].cumsum_(1) <= (config.mu + NEAR_MARGIN) * log_z_a.exp()).sum(1, keepdim=True)
    beta[beta == searched] = SPLIT_BUCKETS  # no bound within the buckets searched: every block
    near_blocks = (block_keys <= beta + 1).view(-1).nonzero().squeeze(1)  # row * blocks + block
    if near_blocks.numel() > n_rows * blocks * KEY_BLOCK_SHARE:
        return None
    rows, block = near_blocks // blocks, near_blocks % blocks
    starts = rows * vocab + block * KEY_BLOCK
    window_a, window_p = by_block(a)[rows, block], by_block(p)[rows, block]
    rest = vocab - blocks * KEY_BLOCK
    if rest:  # each row's last KEY_BLOCK columns, of which the first KEY_BLOCK - rest are another window's
        every_row = torch.arange(n_rows, device=p.device)
        rows, starts = torch.cat((rows, every_row)), torch.cat((starts, (every_row + 1) * vocab - KEY_BLOCK))
        window_a, window_p = torch.cat((window_a, a[:, -KEY_BLOCK:])), torch.cat((window_p, p[:, -KEY_BLOCK:]))
    window_keys = _bucket_keys(window_a, max_a[rows], min_a[rows], invalid[rows], config.temperature)
    if rest:
        window_keys[-n_rows:, : KEY_BLOCK - rest] = SPLIT_BUCKETS
        window_p[-n_rows:, : KEY_BLOCK - rest] = 0.0
    return _NearHead(starts, rows, window_keys, window_p)


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
    """The gaps (docs/semantics.md section 2, rule 7): (head gap, tail gap, head size), each
    (R,), from the split and gap = |p - q| (R, V). The head size is counted only when count_head (it is a statistic
    only) or when it comes for free; otherwise it is 0. Overwrites split.before_crossing."""
    n_rows, vocab = gap.shape
    if split.support_size is not None:  # the whole support is head
        return gap.sum(1), gap.new_zeros(n_rows), split.support_size
    head_rows = split.head_positions // vocab
    # Summed in float64: index_add_ adds one token at a time, and a head of thousands summed so
    # in float32 drifts by ~1e-4 of its gap, which the tail gap (the total less the head's)
    # inherits, relative to itself, many times over when the tail is small.
    listed = torch.zeros(n_rows, dtype=torch.float64, device=gap.device)
    head_gap = listed.index_add_(0, head_rows, gap.view(-1)[split.head_positions].double()).to(gap.dtype)
    if split.listed_whole_head:
        return head_gap, gap.sum(1) - head_gap, torch.bincount(head_rows, minlength=n_rows)

    # The buckets before the crossing one: a masked sum (the mask's buffer takes the products).
    before = split.before_crossing
    head_size = torch.zeros(n_rows, dtype=torch.int64, device=gap.device)
    if count_head:
        head_size = before.sum(1).round_().to(torch.int64) + torch.bincount(head_rows, minlength=n_rows)
    head_gap += before.mul_(gap).sum(1)
    return head_gap, gap.sum(1) - head_gap, head_size


def _before_bucket(running, bucket):
    """(R,) each row's running sum (R, K) just before its bucket: 0 for bucket 0."""
    return F.pad(running, (1, 0)).gather(1, bucket[:, None]).squeeze(1)
