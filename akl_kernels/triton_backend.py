"""The Triton backend: one kernel family for AKL, FKL and RKL, one program per row.

Each program streams its row of student and teacher logits block by block:

  pass 1  online max and sum-exp of a = t/T and b = s/T over the support, NaN/+inf detection,
          and (when the head/tail split is needed) the TOPK largest teacher values;
  split   the crossing of mu among those TOPK (the usual case) or, for rows whose head is
          larger, an exact search for the crossing value (several candidate thresholds per
          pass over an order-preserving integer image of the logits), then, if the crossing
          falls inside a group of tied logits, one pass that finds which ties (by index) are
          in the head;
  pass 2  FKL, RKL, the head and tail gaps, the head size, the weights and the loss;
  pass 3  the gradient with respect to the student logits, written once.

Nothing vocabulary-sized is written except the gradient. Offsets are int64; inputs are read in
their own dtype and upcast in registers to float32, or float64 for float64 inputs. The loss
mode, the split and the gradient are compile-time switches of the same kernel; mu and the
temperature are runtime arguments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rows import TOPK, LossMode, RowLossConfig, RowLosses, STATS_FIELDS, compute_dtype

MODE_AKL: tl.constexpr = tl.constexpr(int(LossMode.AKL))
MODE_FKL: tl.constexpr = tl.constexpr(int(LossMode.FKL))
MODE_RKL: tl.constexpr = tl.constexpr(int(LossMode.RKL))

# Candidate thresholds per pass of the exact fallback search (the interval shrinks 17x a pass).
NUM_CANDIDATES = 16


@triton.jit
def _load_block(
    teacher_row,  # pointer to the row's first teacher logit
    student_row,  # pointer to the row's first student logit
    cols,  # int32 [BLOCK] column indices
    V,
    temperature,
    COMPUTE_DTYPE: tl.constexpr,
):
    """a = t / T and b = s / T for one block, -inf outside the support (and past the row's end).

    Also returns the support mask and a mask of NaN or +inf inputs, which make the row invalid.
    """
    in_row = cols < V
    a = tl.load(teacher_row + cols, mask=in_row, other=float("-inf")).to(COMPUTE_DTYPE) / temperature
    b = tl.load(student_row + cols, mask=in_row, other=float("-inf")).to(COMPUTE_DTYPE) / temperature
    bad = (a != a) | (b != b) | (a == float("inf")) | (b == float("inf"))
    support = (a > float("-inf")) & (b > float("-inf"))
    a = tl.where(support, a, float("-inf"))
    b = tl.where(support, b, float("-inf"))
    return a, b, support, bad


@triton.jit
def _block_probabilities(
    teacher_row,
    student_row,
    cols,
    V,
    temperature,
    max_a,
    log_z_a,
    max_b,
    log_z_b,
    COMPUTE_DTYPE: tl.constexpr,
):
    """For one block once the normalisers are known: a, the support, p, q and d = log p - log q.

    p, q and d are 0 outside the support.
    """
    a, b, support, bad = _load_block(teacher_row, student_row, cols, V, temperature, COMPUTE_DTYPE)
    log_p = _log_prob(a, max_a, log_z_a)
    log_q = _log_prob(b, max_b, log_z_b)
    p = tl.where(support, tl.exp(log_p), 0.0)
    q = tl.where(support, tl.exp(log_q), 0.0)
    d = tl.where(support, log_p - log_q, 0.0)
    return a, support, p, q, d


@triton.jit
def _online_logsumexp(running_max, running_sum, x):
    """Fold a block x (-inf at masked positions) into (max, sum of exp(x - max))."""
    new_max = tl.maximum(running_max, tl.max(x, 0))
    # e^(m - m'), taken as 1 while nothing has been seen (m = m' = -inf).
    rescale = tl.where(new_max == running_max, 1.0, tl.exp(running_max - new_max))
    terms = tl.where(x > float("-inf"), tl.exp(x - new_max), 0.0)
    return new_max, running_sum * rescale + tl.sum(terms, 0)


@triton.jit
def _log_prob(x, row_max, log_z):
    """log softmax from the row's max and log sum exp(x - max): (x - max) - log_z."""
    return (x - row_max) - log_z


@triton.jit
def _precedes(values, SIZE: tl.constexpr):
    """[SIZE, SIZE] bool: entry (i, j) says i comes before j in descending order, ties by position."""
    position = tl.arange(0, SIZE)
    greater = values[:, None] > values[None, :]
    tied_earlier = (values[:, None] == values[None, :]) & (position[:, None] < position[None, :])
    return greater | tied_earlier


@triton.jit
def _merge_top(top, x, BLOCK: tl.constexpr, TOPK: tl.constexpr):
    """Fold a block x into top, the TOPK largest values seen so far (unordered, with multiplicity).

    Each round views x as TOPK groups, moves every group's maximum out of x and keeps the TOPK
    largest of top and those maxima; rounds go on while x still holds a value above the
    smallest kept one (for most blocks of a row, none at all).
    """
    GROUP: tl.constexpr = BLOCK // TOPK
    x = tl.reshape(x, [TOPK, GROUP])
    cols = tl.arange(0, GROUP)[None, :]
    slots = tl.arange(0, TOPK)
    while tl.max(tl.max(x, 1), 0) > tl.min(top, 0):
        group_max = tl.max(x, 1)
        first = tl.min(tl.where(x == group_max[:, None], cols, GROUP), 1)
        x = tl.where(cols == first[:, None], float("-inf"), x)
        # Keep the TOPK largest of top and group_max: the value of rank r goes to slot r.
        both = tl.reshape(tl.join(top, group_max), [2 * TOPK])
        rank = tl.sum(_precedes(both, 2 * TOPK).to(tl.int32), 0)
        top = tl.sum(tl.where(rank[:, None] == slots[None, :], both[:, None], 0.0), 0)
    return top


@triton.jit
def _crossing_in_top(top, max_a, log_z_a, mu, TOPK: tl.constexpr):
    """Head size and crossing value as far as the TOPK largest teacher logits tell.

    Orders the (unordered) top values descending, ties by slot, without sorting. cum_j is the
    mass of j and the values before it; the head is the tokens with cum_j <= mu, at least one;
    the crossing token is the first tail token, at rank head_count, and its value is -inf when
    it lies past the TOPK.
    """
    p = tl.exp(_log_prob(top, max_a, log_z_a))
    precedes = _precedes(top, TOPK)
    running_mass = tl.sum(tl.where(precedes, p[:, None], 0.0), 0) + p  # cum_j
    rank = tl.sum(precedes.to(tl.int32), 0)
    head_count = tl.maximum(tl.sum((running_mass <= mu).to(tl.int32), 0), 1)
    crossing = tl.max(tl.where(rank == head_count, top, float("-inf")), 0)
    return head_count, crossing


@triton.jit
def _order_image(x):
    """Unsigned integer image of x (as uint64) with the same order; -0.0 maps like +0.0."""
    x = tl.where(x == 0, 0.0, x).to(x.dtype)
    if x.dtype == tl.float64:
        bits = x.to(tl.uint64, bitcast=True)
        return tl.where((bits >> 63) == 1, ~bits, bits | 0x8000000000000000)
    else:
        bits = x.to(tl.uint32, bitcast=True).to(tl.uint64)
        return tl.where((bits >> 31) == 1, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def _image_value(image, COMPUTE_DTYPE: tl.constexpr):
    """Inverse of _order_image."""
    if COMPUTE_DTYPE == tl.float64:
        bits = tl.where((image >> 63) == 1, image ^ 0x8000000000000000, ~image)
        return bits.to(tl.float64, bitcast=True)
    else:
        bits = tl.where((image >> 31) == 1, image ^ 0x80000000, image ^ 0xFFFFFFFF)
        return bits.to(tl.uint32).to(tl.float32, bitcast=True)


@triton.jit
def _search_crossing(
    teacher_row,
    student_row,
    V,
    temperature,
    mu,
    max_a,  # largest teacher logit on the support
    log_z_a,  # log sum exp(a - max_a) over the support
    COMPUTE_DTYPE: tl.constexpr,
    NUM_CANDIDATES: tl.constexpr,
    SEARCH_BLOCK: tl.constexpr,
):
    """Exact crossing of mu for a row whose head holds at least TOPK tokens.

    With G(c) = mass of the tokens whose image is >= c, the crossing token's value is the
    largest c with G(c) > mu. Keep lo (G(lo) > mu, or lo = image(-inf): nothing found yet) and
    hi (G(hi) <= mu); each pass evaluates G at NUM_CANDIDATES thresholds in (lo, hi) and keeps
    the bracket around the change, until hi = lo + 1.

    Returns (crossing value, or -inf if the whole support is head; mass strictly above it).
    """
    lo = _order_image(tl.full([], float("-inf"), COMPUTE_DTYPE))
    hi = _order_image(max_a) + 1
    mass_hi = tl.zeros([], COMPUTE_DTYPE)
    steps = (tl.arange(0, NUM_CANDIDATES) + 1).to(tl.uint64)
    while hi - lo > 1:
        step = tl.maximum((hi - lo) // (NUM_CANDIDATES + 1), 1)
        candidates = tl.minimum(lo + step * steps, hi - 1)  # ascending, inside (lo, hi)
        mass = tl.zeros([NUM_CANDIDATES], COMPUTE_DTYPE)
        for start in range(0, V, SEARCH_BLOCK):
            cols = start + tl.arange(0, SEARCH_BLOCK)
            a, b, support, bad = _load_block(teacher_row, student_row, cols, V, temperature, COMPUTE_DTYPE)
            p = tl.where(support, tl.exp(_log_prob(a, max_a, log_z_a)), 0.0)
            at_or_above = _order_image(a)[None, :] >= candidates[:, None]
            mass += tl.sum(tl.where(at_or_above, p[None, :], 0.0), 1)
        above = mass > mu  # a prefix of the candidates, since G falls as c rises
        new_lo = tl.max(tl.where(above, candidates, lo), 0)
        new_hi = tl.min(tl.where(above, hi, candidates), 0)
        mass_at_new_hi = tl.max(tl.where(~above & (candidates == new_hi), mass, -1.0), 0)
        mass_hi = tl.where(new_hi == hi, mass_hi, mass_at_new_hi)
        lo = new_lo
        hi = new_hi
    crossing = _image_value(lo, COMPUTE_DTYPE)
    return crossing, mass_hi


@triton.jit
def _tie_cut(
    teacher_row,
    student_row,
    V,
    temperature,
    crossing,  # the crossing token's value
    ties_in_head,  # how many tokens of that value, lowest indices first, are in the head
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One past the index of the ties_in_head-th token (in index order) whose value is crossing."""
    seen = tl.zeros([], tl.int32)
    cut = tl.zeros([], tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        a, b, support, bad = _load_block(teacher_row, student_row, cols, V, temperature, COMPUTE_DTYPE)
        tie = (support & (a == crossing)).to(tl.int32)
        rank = seen + tl.cumsum(tie, 0)  # 1-based rank of each tie among all ties so far
        cut = tl.maximum(cut, tl.max(tl.where((tie == 1) & (rank <= ties_in_head), cols + 1, 0), 0))
        seen += tl.sum(tie, 0)
    return cut


@triton.jit
def _distill_rows_kernel(
    student_ptr,  # *{fp16,bf16,fp32,fp64} student logits; row i starts at student_row_offsets[i]
    teacher_ptr,  # *{fp16,bf16,fp32,fp64} teacher logits; row i starts at teacher_row_offsets[i]
    student_row_offsets_ptr,  # *int64 [N] element offset of each student row
    teacher_row_offsets_ptr,  # *int64 [N] element offset of each teacher row
    keep_ptr,  # *bool [N] rows that count (read only when HAS_KEEP)
    grad_ptr,  # *student dtype [N, V] contiguous gradient (written only when COMPUTE_GRAD)
    params_ptr,  # *compute dtype [3]: gradient scale (the reduction's factor), mu, temperature
    loss_ptr,  # *compute dtype [N] per-row loss
    stats_ptr,  # *compute dtype [6, N] fkl, rkl, head_gap, tail_gap, head_weight, tail_weight
    head_size_ptr,  # *int64 [N] number of head tokens
    n_rows,
    V,
    MODE: tl.constexpr,  # MODE_AKL, MODE_FKL or MODE_RKL
    SPLIT: tl.constexpr,  # compute the head/tail split (always for AKL)
    HAS_KEEP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,  # tl.float32 or tl.float64
    BLOCK: tl.constexpr,
    TOPK: tl.constexpr,
    NUM_CANDIDATES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    teacher_row = teacher_ptr + tl.load(teacher_row_offsets_ptr + row)
    student_row = student_ptr + tl.load(student_row_offsets_ptr + row)
    mu = tl.load(params_ptr + 1)
    temperature = tl.load(params_ptr + 2)
    if HAS_KEEP:
        keep = tl.load(keep_ptr + row).to(tl.int1)
    else:
        keep = row >= 0
    zero = tl.zeros([], COMPUTE_DTYPE)

    if keep:
        # ---- pass 1: logsumexp of both rows, invalid inputs, the teacher's TOPK values ----
        max_a = tl.full([], float("-inf"), COMPUTE_DTYPE)
        max_b = tl.full([], float("-inf"), COMPUTE_DTYPE)
        sum_a = zero
        sum_b = zero
        n_bad = tl.zeros([], tl.int32)
        n_support = tl.zeros([], tl.int32)
        top = tl.full([TOPK], float("-inf"), COMPUTE_DTYPE)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            a, b, support, bad = _load_block(teacher_row, student_row, cols, V, temperature, COMPUTE_DTYPE)
            n_bad += tl.sum(bad.to(tl.int32), 0)
            n_support += tl.sum(support.to(tl.int32), 0)
            max_a, sum_a = _online_logsumexp(max_a, sum_a, a)
            max_b, sum_b = _online_logsumexp(max_b, sum_b, b)
            if SPLIT:
                top = _merge_top(top, a, BLOCK, TOPK)
        # log p = (a - max_a) - log_z_a: the small normaliser is subtracted after the shift,
        # which keeps log p accurate for logits of large magnitude.
        log_z_a = tl.log(sum_a)
        log_z_b = tl.log(sum_b)
        invalid = (n_bad > 0) | (n_support == 0)

        # ---- the head/tail split: head = {a > crossing} + the first tie_cut tokens equal to it ----
        crossing = tl.full([], float("-inf"), COMPUTE_DTYPE)
        tie_cut = tl.zeros([], tl.int32)
        if SPLIT:
            if not invalid:
                head_count, crossing = _crossing_in_top(top, max_a, log_z_a, mu, TOPK)
                ties_in_head = tl.where(
                    crossing == float("-inf"), 0, head_count - tl.sum((top > crossing).to(tl.int32), 0)
                )
                if (head_count == TOPK) & (tl.min(top, 0) > float("-inf")):
                    # The head holds at least TOPK tokens: find the crossing exactly.
                    crossing, mass_above = _search_crossing(
                        teacher_row, student_row, V, temperature, mu, max_a, log_z_a,
                        COMPUTE_DTYPE, NUM_CANDIDATES, BLOCK // NUM_CANDIDATES,
                    )
                    # Ties of the crossing value enter the head while the running mass stays <= mu;
                    # the first token of the order is always in the head.
                    tie_mass = tl.exp(_log_prob(crossing, max_a, log_z_a))
                    ties_in_head = tl.floor((mu - mass_above) / tie_mass)
                    ties_in_head = tl.minimum(tl.maximum(ties_in_head, 0.0), n_support).to(tl.int32)
                    if crossing == max_a:
                        ties_in_head = tl.maximum(ties_in_head, 1)
                    if crossing == float("-inf"):
                        ties_in_head = ties_in_head * 0
                if ties_in_head > 0:
                    tie_cut = _tie_cut(
                        teacher_row, student_row, V, temperature, crossing, ties_in_head,
                        COMPUTE_DTYPE, BLOCK,
                    )

        # ---- pass 2: FKL, RKL, gaps, head size ----
        fkl = zero
        rkl = zero
        head_gap = zero
        tail_gap = zero
        head_size = tl.zeros([], tl.int32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            a, support, p, q, d = _block_probabilities(
                teacher_row, student_row, cols, V, temperature, max_a, log_z_a, max_b, log_z_b, COMPUTE_DTYPE
            )
            fkl += tl.sum(p * d, 0)  # FKL = sum p (log p - log q)
            rkl -= tl.sum(q * d, 0)  # RKL = sum q (log q - log p)
            if SPLIT:
                head = support & ((a > crossing) | ((a == crossing) & (cols < tie_cut)))
                gap = tl.abs(p - q)
                head_gap += tl.sum(tl.where(head, gap, 0.0), 0)
                tail_gap += tl.sum(tl.where(head, 0.0, gap), 0)
                head_size += tl.sum(head.to(tl.int32), 0)

        if MODE == MODE_AKL:
            # w = gap / (head_gap + tail_gap); 0.5 each when q == p on the support.
            total_gap = head_gap + tail_gap
            tied = total_gap == 0
            total_gap = tl.where(tied, 1.0, total_gap)
            head_weight = tl.where(tied, 0.5, head_gap / total_gap)
            tail_weight = tl.where(tied, 0.5, tail_gap / total_gap)
            loss = head_weight * fkl + tail_weight * rkl
        elif MODE == MODE_FKL:
            head_weight = zero + 1.0
            tail_weight = zero
            loss = fkl
        else:
            head_weight = zero
            tail_weight = zero + 1.0
            loss = rkl
        loss = tl.where(invalid, float("nan"), loss)

        # ---- pass 3: d loss / d s_j = (1/T) [w_h (q - p) + w_t q (log q - log p - RKL)] ----
        if COMPUTE_GRAD:
            grad_row = grad_ptr + row * V
            scale = tl.load(params_ptr) / temperature
            head_factor = head_weight * scale
            tail_factor = tail_weight * scale
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                a, support, p, q, d = _block_probabilities(
                    teacher_row, student_row, cols, V, temperature, max_a, log_z_a, max_b, log_z_b, COMPUTE_DTYPE
                )
                # q (log q - log p - RKL) = -q (d + RKL); 0 outside the support, where p = q = 0.
                g = head_factor * (q - p) - tail_factor * q * (d + rkl)
                g = tl.where(invalid, float("nan"), g)
                tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < V)
    else:
        # An ignored row: nothing is read; loss, statistics and gradient are exactly 0.
        loss = zero
        fkl = zero
        rkl = zero
        head_gap = zero
        tail_gap = zero
        head_weight = zero
        tail_weight = zero
        head_size = tl.zeros([], tl.int32)
        if COMPUTE_GRAD:
            grad_row = grad_ptr + row * V
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                tl.store(grad_row + cols, tl.zeros([BLOCK], grad_ptr.dtype.element_ty), mask=cols < V)

    tl.store(loss_ptr + row, loss)
    tl.store(stats_ptr + 0 * n_rows + row, fkl)
    tl.store(stats_ptr + 1 * n_rows + row, rkl)
    tl.store(stats_ptr + 2 * n_rows + row, head_gap)
    tl.store(stats_ptr + 3 * n_rows + row, tail_gap)
    tl.store(stats_ptr + 4 * n_rows + row, head_weight)
    tl.store(stats_ptr + 5 * n_rows + row, tail_weight)
    tl.store(head_size_ptr + row, head_size.to(tl.int64))


def block_size(vocab: int, dtype: torch.dtype) -> int:
    """Columns per block: the whole row when it is small, else 4096 (2048 for float64)."""
    largest = 2048 if dtype == torch.float64 else 4096
    return min(largest, max(2 * TOPK, NUM_CANDIDATES, triton.next_power_of_2(vocab)))


def num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8


def row_offsets(x: torch.Tensor) -> torch.Tensor:
    """(N,) int64 element offset of each row of x (..., V), for any strides of the leading dims."""
    offsets = torch.zeros((), dtype=torch.int64, device=x.device)
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        offsets = offsets[..., None] + torch.arange(size, device=x.device) * stride
    return offsets.reshape(-1)


def _params(grad_scale, config, dtype):
    """The kernel's runtime scalars as one tensor of the compute dtype, exact in float64."""
    mu = torch.full((), config.mu, dtype=dtype, device=grad_scale.device)
    temperature = torch.full((), config.temperature, dtype=dtype, device=grad_scale.device)
    return torch.stack((grad_scale.to(dtype), mu, temperature))


def triton_row_losses(
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None,
    grad_scale: torch.Tensor,
    config: RowLossConfig,
    compute_grad: bool,
    grad_out: torch.Tensor | None = None,
) -> RowLosses:
    """Per-row losses through the fused kernel; arguments as torch_backend.torch_row_losses.

    Inputs whose vocabulary dimension is not contiguous are copied; any other strides are read
    in place through per-row offsets. grad_out may alias the student: each program reads a
    block of its row before it writes that block's gradient.
    """
    if student.stride(-1) != 1:
        student = student.contiguous()
    if teacher.stride(-1) != 1:
        teacher = teacher.contiguous()
    vocab = student.shape[-1]
    n_rows = student.numel() // vocab
    dtype = compute_dtype(student.dtype, teacher.dtype)
    device = student.device

    loss = torch.empty(n_rows, dtype=dtype, device=device)
    stats = torch.empty(len(STATS_FIELDS), n_rows, dtype=dtype, device=device)
    head_size = torch.empty(n_rows, dtype=torch.int64, device=device)
    grad = None
    if compute_grad:
        grad = torch.empty(student.shape, dtype=student.dtype, device=device) if grad_out is None else grad_out
    if n_rows == 0:
        return RowLosses(loss, stats, head_size, grad)

    block = block_size(vocab, dtype)
    _distill_rows_kernel[(n_rows,)](
        student,
        teacher,
        row_offsets(student),
        row_offsets(teacher),
        keep,
        grad,
        _params(grad_scale, config, dtype),
        loss,
        stats,
        head_size,
        n_rows,
        vocab,
        MODE=int(config.mode),
        SPLIT=config.split,
        HAS_KEEP=keep is not None,
        COMPUTE_GRAD=compute_grad,
        COMPUTE_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
        BLOCK=block,
        TOPK=TOPK,
        NUM_CANDIDATES=NUM_CANDIDATES,
        num_warps=num_warps(block),
    )
    return RowLosses(loss, stats, head_size, grad)
