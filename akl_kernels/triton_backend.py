"""The Triton backend: one kernel family for every loss of divergences.py, in six kernels over a row.

The streaming kernels run a persistent grid whose programs take rows in turn and stream them
block by block; a small per-row record carries each kernel's results to the next (docs/kernel.md
has the design, the traffic and the compiled code; README's "What it computes" the maths):

  _row_statistics_kernel  pass 1 (teacher and student): online max and sum of exp2 of the logits
           over T in base-2 units, FKL and RKL summed online against the running maxima,
           NaN/+inf and -inf detection, the row's smallest logit and, when the head/tail split
           is needed, the TOPK largest teacher logits;
  _split_kernel  the crossing of mu among those TOPK (the usual case) or, for rows whose head
           is larger, bracket passes over the teacher alone (NUM_CANDIDATES thresholds with exact
           masses each) until the bracket around the crossing holds at most CAPACITY tokens or
           one value;
  _gap_kernel  pass 2 (teacher and student, AKL or statistics only): the gaps |p - q| over head
           and tail; ties of the crossing value take the head in index order by a running rank,
           and a bracket's tokens are kept (value, gap) in a per-program buffer and placed once
           the pass has the mass above the bracket;
  _terms_kernel  pass 2' (teacher and student; JSD, TVD, SKL, SRKL only): their divergence D and
           the row constant H of their gradient, from the per-element terms of _divergence_terms;
  _loss_kernel  the weights, the loss and the statistics of each row (no row-long work);
  _gradient_kernel  pass 3 (teacher and student, write): the gradient with respect to the
           student logits, each row times its factor (grad_output and the reduction's), run by
           triton_row_gradient in akl_loss's backward pass.

So a row costs 7 units of memory traffic (a unit is one row of one tensor): 2 + 2 + 3, or 5 for
FKL and RKL without statistics (no pass 2), plus one teacher-only unit per bracket pass for
rows whose head holds at least TOPK tokens; the divergences made of terms add their pass 2'
(7 units without statistics). Nothing vocabulary-sized is written except the
gradient. Offsets are int64; inputs are read in their own dtype (16-byte loads where rows are
aligned) and upcast in registers to float32, or float64 for float64 inputs. The head/tail
order is taken on the teacher's logits themselves (t, not t/T), so ties are exact ties. Logits
are shifted by their row's maximum before T scales them, and a term whose probability is 0 is
0 whatever its log-ratio, so that finite logits never give NaN. The loss mode and the passes
are compile-time switches; mu and the temperature are runtime values.

Every launch goes through torch.library.wrap_triton: inside the akl_kernels::triton_* operators
(_ops.py, torch.library.triton_op) torch.compile then sees the kernels themselves; in eager, and
under TRITON_INTERPRET=1, it is the plain launch.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._rows import TOPK, RowBackend, RowLossConfig, RowLosses, STATS_FIELDS, compute_dtype, is_traced
from .divergences import BY_MODE, LossMode

MODE_AKL: tl.constexpr = tl.constexpr(int(LossMode.AKL))
MODE_FKL: tl.constexpr = tl.constexpr(int(LossMode.FKL))
MODE_RKL: tl.constexpr = tl.constexpr(int(LossMode.RKL))
MODE_JSD: tl.constexpr = tl.constexpr(int(LossMode.JSD))
MODE_TVD: tl.constexpr = tl.constexpr(int(LossMode.TVD))
MODE_SKL: tl.constexpr = tl.constexpr(int(LossMode.SKL))
MODE_SRKL: tl.constexpr = tl.constexpr(int(LossMode.SRKL))
# The divergences made of terms are the modes from FIRST_TERMS_MODE to LAST_MODE (divergences.py
# numbers them last); each has a branch in _divergence_terms.
FIRST_TERMS_MODE: tl.constexpr = tl.constexpr(min(int(m) for m, d in BY_MODE.items() if d.has_terms))
LAST_MODE: tl.constexpr = tl.constexpr(max(map(int, LossMode)))
assert all(d.has_terms == (int(m) >= FIRST_TERMS_MODE.value) for m, d in BY_MODE.items()), (
    "divergences.py must number the divergences made of terms after the KL losses"
)

LN2: tl.constexpr = tl.constexpr(math.log(2.0))

# How each row's head/tail split was found (the kernel's split_path output, as
# SPLIT_PATHS[code % 8] plus 8 x the number of bracket passes).
PATH_NONE: tl.constexpr = tl.constexpr(0)  # no split computed (FKL/RKL without stats, ignored or invalid row)
PATH_TOP: tl.constexpr = tl.constexpr(1)  # the crossing lies among the TOPK largest teacher logits
PATH_ALL: tl.constexpr = tl.constexpr(2)  # mu = 1: the whole support is head
PATH_BUFFER: tl.constexpr = tl.constexpr(3)  # bracket passes, then the bracket's tokens placed after pass 2
PATH_TIES: tl.constexpr = tl.constexpr(4)  # bracket passes down to one tied value, placed by rank in pass 2
PATH_SEARCHING: tl.constexpr = tl.constexpr(7)
SPLIT_PATHS = {0: "none", 1: "top", 2: "all head", 3: "bracket+buffer", 4: "bracket+ties"}


def split_path_name(code: int) -> str:
    """The name of a split_path code: how the split was found, and the bracket passes it took."""
    passes = code // 8
    return SPLIT_PATHS[code % 8] + (f" ({passes} pass{'es' if passes > 1 else ''})" if passes else "")

# Thresholds per bracket pass: each pass narrows the bracket about 16x.
NUM_CANDIDATES = 16
# Tokens a bracket may hold to be placed from the buffer after pass 2 (per program: CAPACITY x
# (value, gap), 64 KiB in float32).
CAPACITY = 8192
# Columns per block of the streaming passes, and of the bracket passes (whose C thresholds per
# column need lane accumulators: C x SEARCH_BLOCK / threads registers each).
MAX_BLOCK = 2048
MAX_SEARCH_BLOCK = 256
SCAN_BLOCK = 512
# Programs per streaming multiprocessor in the persistent grid: with at most MAX_REGISTERS per
# thread (ptxas's .maxnreg), two programs of 256 threads fit in one SM's 65536 registers.
PROGRAMS_PER_SM = 2
MAX_REGISTERS = 128
# Rows per program of the loss kernel (which reads no row of logits).
LOSS_ROWS = 256


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _load(row, cols, V, COMPUTE_DTYPE: tl.constexpr):
    """One block of a row in the compute dtype; -inf past the row's end."""
    return tl.load(row + cols, mask=cols < V, other=float("-inf")).to(COMPUTE_DTYPE)


@triton.jit
def _lane_sum(x, BLOCK: tl.constexpr):
    """x [BLOCK] summed over groups of 4 neighbours, [BLOCK // 4]: the adds stay inside each thread
    (a thread holds at least 4 neighbouring columns), so per-lane accumulators built from it cost
    a quarter of the registers and no cross-thread reduction until the end of the row."""
    return tl.sum(tl.reshape(x, [BLOCK // 4, 4]), 1)


@triton.jit
def _running_count(mask, BLOCK: tl.constexpr):
    """Inclusive prefix count of a bool block ([BLOCK] int32): a scan of the per-thread counts of
    4 neighbours, then within each 4 (this form needs fewer registers than a scan of all BLOCK)."""
    fours = tl.reshape(mask.to(tl.int32), [BLOCK // 4, 4])
    four_counts = tl.sum(fours, 1)
    before = tl.cumsum(four_counts, 0) - four_counts
    return tl.reshape(before[:, None] + tl.cumsum(fours, 1), [BLOCK])


@triton.jit
def _log2_prob(x, row_max, c, log2_z):
    """log2 of the softmax of x / T from c = log2(e) / T, the row's max(x) and log2 sum 2^((x - max) c).

    The shift comes first and the small normaliser after it, which keeps log2 p exact for
    logits of large magnitude.
    """
    return (x - row_max) * c - log2_z


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
    while tl.max(tl.max(x, 1), 0) > tl.min(top, 0):
        group_max = tl.max(x, 1)
        first = tl.min(tl.where(x == group_max[:, None], cols, GROUP), 1)
        x = tl.where(cols == first[:, None], float("-inf"), x)
        # Keep the TOPK largest of top and group_max (in that order for ties): rank each among all
        # 2 TOPK in TOPK x TOPK blocks, and the value of rank r < TOPK goes to slot r.
        rank_top = tl.sum(_precedes(top, TOPK).to(tl.int32), 0) + tl.sum(
            (group_max[:, None] > top[None, :]).to(tl.int32), 0)
        rank_new = tl.sum(_precedes(group_max, TOPK).to(tl.int32), 0) + tl.sum(
            (top[:, None] >= group_max[None, :]).to(tl.int32), 0)
        slots = tl.arange(0, TOPK)[None, :]
        top = tl.sum(tl.where(rank_top[:, None] == slots, top[:, None], 0.0), 0) + tl.sum(
            tl.where(rank_new[:, None] == slots, group_max[:, None], 0.0), 0)
    return top


@triton.jit
def _crossing_in_top(top, top_mass, mu, TOPK: tl.constexpr):
    """Head size and crossing value as far as the TOPK largest teacher logits tell.

    Orders the (unordered) top values descending, ties by slot, without sorting. cum_j is the
    mass of j and the values before it; the head is the tokens with cum_j <= mu, at least one;
    the crossing token is the first tail token, at rank head_count, and its value is -inf when
    it lies past the TOPK.
    """
    precedes = _precedes(top, TOPK)
    running_mass = tl.sum(tl.where(precedes, top_mass[:, None], 0.0), 0) + top_mass  # cum_j
    rank = tl.sum(precedes.to(tl.int32), 0)
    head_count = tl.maximum(tl.sum((running_mass <= mu).to(tl.int32), 0), 1)
    crossing = tl.max(tl.where(rank == head_count, top, float("-inf")), 0)
    return head_count, crossing


@triton.jit
def _bracket_candidates(lo, hi, C: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """C ascending thresholds in [lo, hi), the last one the largest value below hi.

    Evenly spaced in value while the bracket is wide, in the order image once it is narrow (so
    that every representable value is reached and the bracket always shrinks).
    """
    k = (tl.arange(0, C) + 1).to(tl.uint64)
    lo_image = _order_image(lo)
    width = _order_image(hi) - lo_image
    below_hi = _image_value(lo_image + width - 1, COMPUTE_DTYPE)
    by_image = _image_value(lo_image + ((width - 1) * k) // C, COMPUTE_DTYPE)
    f = k.to(COMPUTE_DTYPE) / C
    # lo (1 - f) + below_hi f: no overflow for any finite ends; exactly below_hi at f = 1.
    by_value = tl.where(k == C, below_hi, lo * (1.0 - f) + below_hi * f)
    return tl.where(width <= 64 * (C + 1), by_image, by_value)


@triton.jit
def _bracket_pass(
    teacher_row, student_row, V, row_max, c, log2_z, lo, hi, read_student,
    COMPUTE_DTYPE: tl.constexpr, C: tl.constexpr, SEARCH_BLOCK: tl.constexpr,
):
    """One pass over the teacher (and the student only where it has -inf inside the teacher's
    support): the exact mass G(x) of the tokens >= x for C thresholds x in [lo, hi), and the
    smallest and largest values present in [lo, hi).
    """
    thresholds = _bracket_candidates(lo, hi, C, COMPUTE_DTYPE)
    mass = tl.zeros([C, SEARCH_BLOCK], COMPUTE_DTYPE)  # lane accumulators, reduced once at the end
    smallest = tl.full([SEARCH_BLOCK], float("inf"), COMPUTE_DTYPE)
    largest = tl.full([SEARCH_BLOCK], float("-inf"), COMPUTE_DTYPE)
    for start in range(0, V, SEARCH_BLOCK):
        cols = start + tl.arange(0, SEARCH_BLOCK)
        t = _load(teacher_row, cols, V, COMPUTE_DTYPE)
        if read_student:
            t = tl.where(_load(student_row, cols, V, COMPUTE_DTYPE) > float("-inf"), t, float("-inf"))
        p = tl.exp2(_log2_prob(t, row_max, c, log2_z))  # 0 outside the support
        inside = (t >= lo) & (t < hi)
        smallest = tl.minimum(smallest, tl.where(inside, t, float("inf")))
        largest = tl.maximum(largest, tl.where(inside, t, float("-inf")))
        mass += tl.where(t[None, :] >= thresholds[:, None], p[None, :], 0.0)
    return thresholds, tl.sum(mass, 1), tl.min(smallest, 0), tl.max(largest, 0)


@triton.jit
def _ties_in_head(mu, mass_above, tie_mass, limit):
    """How many tokens of a tied value enter the head after mass_above: the running mass stays <= mu."""
    count = tl.floor((mu - mass_above) / tie_mass)
    return tl.minimum(tl.maximum(count, 0.0), limit).to(tl.int32)


@triton.jit
def _scan_buffer(buffer, n, x, row_max, c, log2_z, COMPUTE_DTYPE: tl.constexpr, SCAN_BLOCK: tl.constexpr):
    """Over the n buffered tokens: the teacher mass of those with value >= x, the smallest value
    >= x (+inf if none) and the largest value < x (-inf if none)."""
    mass = tl.zeros([SCAN_BLOCK], COMPUTE_DTYPE)
    smallest_at_or_above = tl.full([SCAN_BLOCK], float("inf"), COMPUTE_DTYPE)
    largest_below = tl.full([SCAN_BLOCK], float("-inf"), COMPUTE_DTYPE)
    for start in range(0, n, SCAN_BLOCK):
        i = start + tl.arange(0, SCAN_BLOCK)
        v = tl.load(buffer + 2 * i, mask=i < n, other=float("-inf"))  # -inf is below any x
        at_or_above = v >= x
        mass += tl.where(at_or_above, tl.exp2(_log2_prob(v, row_max, c, log2_z)), 0.0)
        smallest_at_or_above = tl.minimum(smallest_at_or_above, tl.where(at_or_above, v, float("inf")))
        largest_below = tl.maximum(largest_below, tl.where(at_or_above, float("-inf"), v))
    return tl.sum(mass, 0), tl.min(smallest_at_or_above, 0), tl.max(largest_below, 0)


@triton.jit
def _place_buffer(
    buffer, n, lo, hi, mass_above, mu, row_max, c, log2_z,
    COMPUTE_DTYPE: tl.constexpr, SCAN_BLOCK: tl.constexpr,
):
    """Head gap and head size among the n buffered tokens of the bracket [lo, hi).

    The tokens >= hi (mass mass_above) are head. With M(x) the mass of the buffered tokens >= x,
    the crossing value is the largest buffered value v with mass_above + M(v) > mu. It is kept
    in [low, high) by scans of the buffer that test points between, alternately where M would
    cross if it were linear and at the middle of the order image, each moving an end onto a
    buffered value; its ties, buffered in index order, enter the head while the running mass
    stays <= mu.
    """
    target = mu - mass_above  # the crossing value v: M(v) > target >= M(next buffered value)
    total, low, _ = _scan_buffer(buffer, n, lo, row_max, c, log2_z, COMPUTE_DTYPE, SCAN_BLOCK)
    crossing = tl.full([], float("-inf"), COMPUTE_DTYPE)  # everything buffered is head ...
    mass_gt = total  # M(> crossing)
    if target < 0:  # ... or, by rounding at mu, nothing is
        crossing = tl.full([], float("inf"), COMPUTE_DTYPE)
        mass_gt = total * 0
    elif total > target:
        mass_low = total  # M(low), low the smallest buffered value
        high = hi
        mass_high = total * 0  # M(high)
        step = tl.zeros([], tl.int32)
        searching = True
        while searching:
            low_image = _order_image(low)
            high_image = _order_image(high)
            if high_image - low_image <= 1:
                searching = False
            else:
                x = low + (high - low) * ((mass_low - target) / (mass_low - mass_high))
                if (step % 2 == 1) | ~((x > low) & (x < high)):
                    x = _image_value(low_image + (high_image - low_image) // 2, COMPUTE_DTYPE)
                mass, smallest_at_or_above, largest_below = _scan_buffer(
                    buffer, n, x, row_max, c, log2_z, COMPUTE_DTYPE, SCAN_BLOCK)
                if mass > target:
                    low = smallest_at_or_above  # M(low) = mass
                    mass_low = mass
                else:
                    high = x
                    mass_high = mass
                    if largest_below == low:  # no buffered value in (low, x): low is the crossing
                        searching = False
                step += 1
        crossing = low
        mass_gt = mass_high
    tie_mass = tl.exp2(_log2_prob(crossing, row_max, c, log2_z))
    ties_in_head = _ties_in_head(mu, mass_above + mass_gt, tie_mass, n)
    head_gap = tl.zeros([SCAN_BLOCK], COMPUTE_DTYPE)
    head_size = tl.zeros([SCAN_BLOCK], tl.int32)
    seen = tl.zeros([], tl.int32)
    for start in range(0, n, SCAN_BLOCK):
        i = start + tl.arange(0, SCAN_BLOCK)
        v = tl.load(buffer + 2 * i, mask=i < n, other=float("-inf"))
        gap = tl.load(buffer + 2 * i + 1, mask=i < n, other=0.0)
        tie = (v == crossing) & (i < n)
        rank = seen + tl.cumsum(tie.to(tl.int32), 0)  # the buffer is in index order
        head = (v > crossing) | (tie & (rank <= ties_in_head))
        head_gap += tl.where(head, gap, 0.0)
        head_size += head.to(tl.int32)
        seen += tl.sum(tie.to(tl.int32), 0)
    return tl.sum(head_gap, 0), tl.sum(head_size, 0)


@triton.jit
def _block_probabilities(teacher_row, student_row, cols, V, max_t, max_s, c, log2_z_a, log2_z_b,
                         COMPUTE_DTYPE: tl.constexpr):
    """t (-inf outside the support), p and q for one block once the normalisers are known."""
    t, _, log2_p, log2_q = _block_log_probabilities(
        teacher_row, student_row, cols, V, max_t, max_s, c, log2_z_a, log2_z_b, COMPUTE_DTYPE
    )
    return t, tl.exp2(log2_p), tl.exp2(log2_q)  # 0 outside the support


@triton.jit
def _block_log_probabilities(teacher_row, student_row, cols, V, max_t, max_s, c, log2_z_a, log2_z_b,
                             COMPUTE_DTYPE: tl.constexpr):
    """t (-inf outside the support), s (as loaded), log2 p and log2 q (-inf outside the support)
    for one block once the normalisers are known."""
    t = _load(teacher_row, cols, V, COMPUTE_DTYPE)
    s = _load(student_row, cols, V, COMPUTE_DTYPE)
    support = (t > float("-inf")) & (s > float("-inf"))
    log2_p = tl.where(support, _log2_prob(t, max_t, c, log2_z_a), float("-inf"))
    log2_q = tl.where(support, _log2_prob(s, max_s, c, log2_z_b), float("-inf"))
    return tl.where(support, t, float("-inf")), s, log2_p, log2_q


@triton.jit
def _gap_pass_ranked(
    teacher_row, student_row, V, max_t, max_s, c, log2_z_a, log2_z_b, crossing, ties_in_head,
    COMPUTE_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Pass 2 when the crossing value is known: the head is {t > crossing} and the first
    ties_in_head tokens (in index order) of t == crossing. Returns (total gap, head gap, head size)."""
    total_gap = tl.zeros([BLOCK // 4], COMPUTE_DTYPE)
    head_gap = tl.zeros([BLOCK // 4], COMPUTE_DTYPE)
    head_size = tl.zeros([BLOCK // 4], tl.int32)
    ties_seen = tl.zeros([], tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        t, p, q = _block_probabilities(teacher_row, student_row, cols, V, max_t, max_s, c, log2_z_a, log2_z_b,
                                       COMPUTE_DTYPE)
        gap = tl.abs(p - q)
        head = t > crossing
        if ties_seen < ties_in_head:
            tie = t == crossing
            n_ties = tl.sum(tie.to(tl.int32), 0)
            if n_ties > 0:
                rank = ties_seen + _running_count(tie, BLOCK)  # 1-based, in index order
                head = head | (tie & (rank <= ties_in_head))
                ties_seen += n_ties
        total_gap += _lane_sum(gap, BLOCK)
        head_gap += _lane_sum(tl.where(head, gap, 0.0), BLOCK)
        head_size += _lane_sum(head.to(tl.int32), BLOCK)
    return tl.sum(total_gap, 0), tl.sum(head_gap, 0), tl.sum(head_size, 0)


@triton.jit
def _gap_pass_with_bracket(
    teacher_row, student_row, V, max_t, max_s, c, log2_z_a, log2_z_b, lo, hi, buffer,
    COMPUTE_DTYPE: tl.constexpr, BLOCK: tl.constexpr, CAPACITY: tl.constexpr,
):
    """Pass 2 around a bracket: the tokens t >= hi are head, those of [lo, hi) go to the buffer
    (value and gap, in index order) to be placed after the pass. Returns (total gap, head gap and
    head size of t >= hi, their teacher mass, the number of tokens in the bracket)."""
    total_gap = tl.zeros([BLOCK // 4], COMPUTE_DTYPE)
    head_gap = tl.zeros([BLOCK // 4], COMPUTE_DTYPE)
    head_size = tl.zeros([BLOCK // 4], tl.int32)
    head_mass = tl.zeros([BLOCK // 4], COMPUTE_DTYPE)
    buffered = tl.zeros([], tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        t, p, q = _block_probabilities(teacher_row, student_row, cols, V, max_t, max_s, c, log2_z_a, log2_z_b,
                                       COMPUTE_DTYPE)
        gap = tl.abs(p - q)
        head = t >= hi
        inside = (t >= lo) & (t < hi)
        n_inside = tl.sum(inside.to(tl.int32), 0)
        if n_inside > 0:
            slot = buffered + _running_count(inside, BLOCK) - 1
            store = inside & (slot < CAPACITY)
            entry = buffer + 2 * slot
            tl.store(entry, t, mask=store)
            tl.store(entry + 1, gap, mask=store)
            buffered += n_inside
        total_gap += _lane_sum(gap, BLOCK)
        head_gap += _lane_sum(tl.where(head, gap, 0.0), BLOCK)
        head_size += _lane_sum(head.to(tl.int32), BLOCK)
        head_mass += _lane_sum(tl.where(head, p, 0.0), BLOCK)
    return tl.sum(total_gap, 0), tl.sum(head_gap, 0), tl.sum(head_size, 0), tl.sum(head_mass, 0), buffered


# The per-row record that each kernel leaves for the next.
# compute dtype: max t, max s, log2 Z_a, log2 Z_b, FKL, RKL, crossing (or the bracket's lo), hi,
# head gap, tail gap, min t, head weight, tail weight, and for a divergence made of terms D and
# H (_terms_kernel). It is RowLosses.state: the gradient kernel reads it in backward.
ROW_VALUES: tl.constexpr = tl.constexpr(15)
# int32: split path (PATH_* + 8 x bracket passes; -1 for an invalid row), ties in head, head size
ROW_CODES: tl.constexpr = tl.constexpr(3)


@triton.jit
def _row_statistics_kernel(
    student_ptr,  # *{fp16,bf16,fp32,fp64} student logits; row i starts at student_row_offsets[i]
    teacher_ptr,  # *{fp16,bf16,fp32,fp64} teacher logits; row i starts at teacher_row_offsets[i]
    student_row_offsets_ptr,  # *int64 [N] element offset of each student row
    teacher_row_offsets_ptr,  # *int64 [N] element offset of each teacher row
    keep_ptr,  # *bool [N] rows that count (read only when HAS_KEEP)
    params_ptr,  # *compute dtype [PARAMS]: mu, 1 / T, log2(e) / T, w_p, w_q, log2 w_p, log2 w_q
    row_values_ptr,  # *compute dtype [N, ROW_VALUES] written for kept rows: 0-5
    row_codes_ptr,  # *int32 [N, ROW_CODES] written for kept rows: (-1 if invalid else 0, student has -inf)
    row_top_ptr,  # *compute dtype [N, TOPK] written for kept rows when SPLIT
    n_rows,
    V,
    SPLIT: tl.constexpr,  # keep the TOPK largest teacher logits (for the head/tail split)
    HAS_KEEP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,  # tl.float32 or tl.float64
    STUDENT_ALIGN: tl.constexpr,  # every student row offset is a multiple of this (16 bytes, or 1)
    TEACHER_ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
    TOPK: tl.constexpr,
):
    """Pass 1 of each kept row: normalisers, FKL, RKL, invalid input and the top TOPK."""
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    row = program.to(tl.int64)  # this program's rows: program, program + programs, ...
    while row < n_rows:
        keep = _is_kept(keep_ptr, row, HAS_KEEP)
        if keep:
            c = tl.load(params_ptr + 2)  # log2(e) / T: a in base-2 units is t * c
            student_row, teacher_row = _row_pointers(
                student_ptr, teacher_ptr, student_row_offsets_ptr, teacher_row_offsets_ptr, row,
                STUDENT_ALIGN, TEACHER_ALIGN,
            )
            # ---- pass 1: base-2 logsumexp of a and b, FKL and RKL, invalid input, the top TOPK ----
            # With x_a = (t - max t) log2(e) / T and x_b likewise, d = x_a - x_b, S_p = sum 2^x_a d
            # and S_q = sum 2^x_b d (lane by lane, rescaled when a maximum moves):
            # FKL = ln2 (S_p / Z_a - L), RKL = ln2 (L - S_q / Z_b), L = log2 Z_a - log2 Z_b.
            max_t = tl.full([], float("-inf"), COMPUTE_DTYPE)
            max_s = tl.full([], float("-inf"), COMPUTE_DTYPE)
            min_t = tl.full([], float("inf"), COMPUTE_DTYPE)  # over the support (a floor for the split's bracket)
            z_a = tl.zeros([BLOCK // 4], COMPUTE_DTYPE)
            z_b = tl.zeros([BLOCK // 4], COMPUTE_DTYPE)
            s_p = tl.zeros([BLOCK // 4], COMPUTE_DTYPE)
            s_q = tl.zeros([BLOCK // 4], COMPUTE_DTYPE)
            flags = tl.zeros([BLOCK // 4], tl.int32)  # bit 0: NaN or +inf; bit 1: student -inf where the teacher is not
            top = tl.full([TOPK], float("-inf"), COMPUTE_DTYPE)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                t = _load(teacher_row, cols, V, COMPUTE_DTYPE)
                s = _load(student_row, cols, V, COMPUTE_DTYPE)
                bad = (~(t < float("inf")) | ~(s < float("inf"))).to(tl.int32)
                student_only_minus_inf = ((s == float("-inf")) & (t > float("-inf"))).to(tl.int32)
                flags |= tl.reduce(tl.reshape(bad | (student_only_minus_inf << 1), [BLOCK // 4, 4]), 1, _or)
                support = (t > float("-inf")) & (s > float("-inf"))
                t = tl.where(support, t, float("-inf"))
                s = tl.where(support, s, float("-inf"))
                block_max_t = tl.max(t, 0)
                if SPLIT:
                    min_t = tl.minimum(min_t, tl.min(tl.where(support, t, float("inf")), 0))
                new_max_t = tl.maximum(max_t, block_max_t)
                new_max_s = tl.maximum(max_s, tl.max(s, 0))
                if (new_max_t != max_t) | (new_max_s != max_s):
                    if max_t > float("-inf"):
                        # Earlier terms: weights scale by 2^(old - new), d shifts by the change.
                        # A weight that drops to 0 takes its terms with it (even where the
                        # shift, across more than float32's range, is infinite).
                        scale_a = tl.exp2((max_t - new_max_t) * c)
                        scale_b = tl.exp2((max_s - new_max_s) * c)
                        shift = ((max_t - new_max_t) - (max_s - new_max_s)) * c
                        s_p = tl.where(scale_a > 0, scale_a * (s_p + shift * z_a), 0.0)
                        s_q = tl.where(scale_b > 0, scale_b * (s_q + shift * z_b), 0.0)
                        z_a = scale_a * z_a
                        z_b = scale_b * z_b
                    max_t = new_max_t
                    max_s = new_max_s
                # Before any support is seen the maxima are -inf and so is every t and s here.
                x_a = (t - tl.where(max_t > float("-inf"), max_t, 0.0)) * c
                x_b = (s - tl.where(max_s > float("-inf"), max_s, 0.0)) * c
                e_a = tl.exp2(x_a)  # 0 outside the support
                e_b = tl.exp2(x_b)
                d = x_a - x_b
                z_a += _lane_sum(e_a, BLOCK)
                z_b += _lane_sum(e_b, BLOCK)
                # A term whose probability is 0 is 0 (the limit of p log p), also where d is
                # infinite: a logit more than float32's range below its row's max.
                s_p += _lane_sum(tl.where(e_a > 0, e_a * d, 0.0), BLOCK)
                s_q += _lane_sum(tl.where(e_b > 0, e_b * d, 0.0), BLOCK)
                if SPLIT:
                    if block_max_t > tl.min(top, 0):
                        top = _merge_top(top, t, BLOCK, TOPK)
            row_flags = tl.reduce(flags, 0, _or)
            sum_a = tl.sum(z_a, 0)
            sum_b = tl.sum(z_b, 0)
            log2_z_a = tl.log2(sum_a)
            log2_z_b = tl.log2(sum_b)
            log2_ratio = log2_z_a - log2_z_b
            fkl = LN2 * (tl.sum(s_p, 0) / sum_a - log2_ratio)
            rkl = LN2 * (log2_ratio - tl.sum(s_q, 0) / sum_b)
            values = row_values_ptr + row * ROW_VALUES
            tl.store(values + 0, max_t)
            tl.store(values + 1, max_s)
            tl.store(values + 2, log2_z_a)
            tl.store(values + 3, log2_z_b)
            tl.store(values + 4, fkl)
            tl.store(values + 5, rkl)
            tl.store(values + 10, min_t)
            invalid = ((row_flags & 1) != 0) | (max_t == float("-inf"))
            tl.store(row_codes_ptr + row * ROW_CODES, tl.where(invalid, -1, PATH_NONE))
            tl.store(row_codes_ptr + row * ROW_CODES + 1, (row_flags >> 1) & 1)  # the split kernel reads the student too
            if SPLIT:
                tl.store(row_top_ptr + row * TOPK + tl.arange(0, TOPK), top)
        row += programs


@triton.jit
def _split_kernel(
    student_ptr,  # *{fp16,bf16,fp32,fp64} student logits, as for _row_statistics_kernel
    teacher_ptr,  # *{fp16,bf16,fp32,fp64} teacher logits
    student_row_offsets_ptr,  # *int64 [N]
    teacher_row_offsets_ptr,  # *int64 [N]
    keep_ptr,  # *bool [N] rows that count (read only when HAS_KEEP)
    params_ptr,  # *compute dtype [PARAMS]: mu, 1 / T, log2(e) / T, w_p, w_q, log2 w_p, log2 w_q
    row_values_ptr,  # *compute dtype [N, ROW_VALUES]: reads 0-3, writes 6-7
    row_codes_ptr,  # *int32 [N, ROW_CODES]: reads (invalid, student has -inf), writes (path, ties in head)
    row_top_ptr,  # *compute dtype [N, TOPK] the largest teacher logits of each row
    n_rows,
    V,
    HAS_KEEP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    STUDENT_ALIGN: tl.constexpr,
    TEACHER_ALIGN: tl.constexpr,
    SEARCH_BLOCK: tl.constexpr,
    TOPK: tl.constexpr,
    NUM_CANDIDATES: tl.constexpr,
    CAPACITY: tl.constexpr,
):
    """The head/tail split of each kept, valid row: head = {t > crossing} plus the first
    ties_in_head tokens of t == crossing (index order), or the tokens >= hi plus those of the
    bracket [lo, hi) that the gradient kernel places after pass 2."""
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    row = program.to(tl.int64)
    while row < n_rows:
        keep = _is_kept(keep_ptr, row, HAS_KEEP)
        codes = row_codes_ptr + row * ROW_CODES
        if keep:
            keep = tl.load(codes) >= 0  # a valid row
        if keep:
            mu = tl.load(params_ptr + 0)
            c = tl.load(params_ptr + 2)
            values = row_values_ptr + row * ROW_VALUES
            max_t = tl.load(values + 0)
            log2_z_a = tl.load(values + 2)
            crossing = tl.full([], float("-inf"), COMPUTE_DTYPE)  # or the bracket's lo
            hi = tl.zeros([], COMPUTE_DTYPE)
            ties_in_head = tl.zeros([], tl.int32)
            passes = tl.zeros([], tl.int32)
            if mu >= 1.0:
                path = tl.full([], PATH_ALL, tl.int32)  # crossing -inf: every support token is head
            else:
                top = tl.load(row_top_ptr + row * TOPK + tl.arange(0, TOPK))
                top_mass = tl.exp2(_log2_prob(top, max_t, c, log2_z_a))
                head_count, top_crossing = _crossing_in_top(top, top_mass, mu, TOPK)
                smallest_top = tl.min(top, 0)
                if (head_count < TOPK) | (smallest_top == float("-inf")):
                    path = tl.full([], PATH_TOP, tl.int32)
                    crossing = top_crossing
                    ties_in_head = tl.where(
                        crossing == float("-inf"), 0, head_count - tl.sum((top > crossing).to(tl.int32), 0)
                    )
                else:
                    # The head holds at least TOPK tokens, so the crossing c* is <= the smallest top
                    # value, and since the tail (mass >= 1 - mu) has fewer than V tokens, each at
                    # most p(c*): p(c*) >= (1 - mu) / V.
                    student_row, teacher_row = _row_pointers(
                        student_ptr, teacher_ptr, student_row_offsets_ptr, teacher_row_offsets_ptr, row,
                        STUDENT_ALIGN, TEACHER_ALIGN,
                    )
                    lo = max_t + (log2_z_a + tl.log2((1.0 - mu) / V) - 2.0) / c
                    lo = tl.maximum(lo, tl.load(values + 10))  # no token lies below the row's smallest
                    hi = _image_value(_order_image(smallest_top) + 1, COMPUTE_DTYPE)
                    mass_hi = tl.sum(tl.where(top > smallest_top, top_mass, 0.0), 0)  # G(hi), exact
                    path, crossing, hi, mass_hi, passes = _search_bracket(
                        teacher_row, student_row, V, max_t, c, log2_z_a, mu, lo, hi, mass_hi,
                        tl.load(codes + 1) != 0, COMPUTE_DTYPE, NUM_CANDIDATES, SEARCH_BLOCK, CAPACITY,
                    )
                    if path == PATH_TIES:
                        tie_mass = tl.exp2(_log2_prob(crossing, max_t, c, log2_z_a))
                        ties_in_head = _ties_in_head(mu, mass_hi, tie_mass, V)
            tl.store(values + 6, crossing)
            tl.store(values + 7, hi)
            tl.store(codes, path + 8 * passes)
            tl.store(codes + 1, ties_in_head)
        row += programs


@triton.jit
def _search_bracket(
    teacher_row, student_row, V, max_t, c, log2_z_a, mu, lo, hi, mass_hi, read_student,
    COMPUTE_DTYPE: tl.constexpr, NUM_CANDIDATES: tl.constexpr, SEARCH_BLOCK: tl.constexpr, CAPACITY: tl.constexpr,
):
    """Bracket passes over [lo, hi), G(lo) > mu >= G(hi) = mass_hi, until the bracket holds at
    most CAPACITY tokens (PATH_BUFFER) or a single value (PATH_TIES, that value the crossing).

    Returns (path, crossing value for PATH_TIES or lo for PATH_BUFFER, hi, G(hi), passes).
    """
    path = tl.full([], PATH_SEARCHING, tl.int32)
    crossing = lo
    mass_lo = tl.zeros([], COMPUTE_DTYPE) + 1.0  # G(lo): only its bound 1 is known
    passes = tl.zeros([], tl.int32)
    while path == PATH_SEARCHING:
        thresholds, mass, smallest, largest = _bracket_pass(
            teacher_row, student_row, V, max_t, c, log2_z_a, lo, hi, read_student,
            COMPUTE_DTYPE, NUM_CANDIDATES, SEARCH_BLOCK,
        )
        passes += 1
        if smallest == largest:
            # [lo, hi) holds one value: it is the crossing, and G(> it) = G(hi).
            path = tl.full([], PATH_TIES, tl.int32)
            crossing = smallest
        else:
            above = mass > mu
            lo = tl.max(tl.where(above, thresholds, lo), 0)
            mass_lo = tl.min(tl.where(above, mass, mass_lo), 0)
            hi = tl.min(tl.where(above, hi, thresholds), 0)
            mass_hi = tl.max(tl.where(above, mass_hi, mass), 0)
            crossing = lo
            # Every token of [lo, hi) has mass >= p(lo): a bound on their count.
            p_lo = tl.exp2(_log2_prob(lo, max_t, c, log2_z_a))
            if (mass_lo - mass_hi) <= 0.99 * CAPACITY * p_lo:
                path = tl.full([], PATH_BUFFER, tl.int32)
            elif _order_image(hi) - _order_image(lo) <= 1:
                path = tl.full([], PATH_TIES, tl.int32)
    return path, crossing, hi, mass_hi, passes


@triton.jit
def _normalisers(values):
    """A row's record -> (max t, max s, log2 Z_a, log2 Z_b), what p and q of its logits need."""
    return tl.load(values + 0), tl.load(values + 1), tl.load(values + 2), tl.load(values + 3)


@triton.jit
def _is_kept(keep_ptr, row, HAS_KEEP: tl.constexpr):
    """Whether the row counts: keep_ptr[row] with labels, every row without."""
    if HAS_KEEP:
        return tl.load(keep_ptr + row).to(tl.int1)
    else:
        return row >= 0


@triton.jit
def _row_pointers(student_ptr, teacher_ptr, student_row_offsets_ptr, teacher_row_offsets_ptr, row,
                  STUDENT_ALIGN: tl.constexpr, TEACHER_ALIGN: tl.constexpr):
    """The row's first student and teacher logits, with the alignment the host checked."""
    student_offset = tl.load(student_row_offsets_ptr + row)
    teacher_offset = tl.load(teacher_row_offsets_ptr + row)
    if STUDENT_ALIGN > 1:
        student_offset = tl.multiple_of(student_offset, STUDENT_ALIGN)
    if TEACHER_ALIGN > 1:
        teacher_offset = tl.multiple_of(teacher_offset, TEACHER_ALIGN)
    return student_ptr + student_offset, teacher_ptr + teacher_offset


@triton.jit
def _gap_kernel(
    student_ptr,  # *{fp16,bf16,fp32,fp64} student logits, as for _row_statistics_kernel
    teacher_ptr,  # *{fp16,bf16,fp32,fp64} teacher logits
    student_row_offsets_ptr,  # *int64 [N]
    teacher_row_offsets_ptr,  # *int64 [N]
    keep_ptr,  # *bool [N] rows that count (read only when HAS_KEEP)
    params_ptr,  # *compute dtype [PARAMS]: mu, 1 / T, log2(e) / T, w_p, w_q, log2 w_p, log2 w_q
    row_values_ptr,  # *compute dtype [N, ROW_VALUES]: reads 0-3 and 6-7, writes 8-9
    row_codes_ptr,  # *int32 [N, ROW_CODES]: reads (path, ties in head), writes the head size
    buffer_ptr,  # *compute dtype [programs, CAPACITY, 2] a bracket's (teacher logit, |p - q|), in index order (scratch)
    n_rows,
    V,
    HAS_KEEP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    STUDENT_ALIGN: tl.constexpr,
    TEACHER_ALIGN: tl.constexpr,
    BRACKET: tl.constexpr,  # this launch takes the rows of PATH_BUFFER; the other launch, all other rows
    BLOCK: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
    CAPACITY: tl.constexpr,
):
    """Pass 2 of each kept, valid row: the gaps |p - q| over the head and the tail, and the head size.

    Launched twice, for the rows with a bracket to place and for the others: apart, each variant
    keeps within the register budget.
    """
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    buffer = buffer_ptr + program.to(tl.int64) * (2 * CAPACITY)
    row = program.to(tl.int64)
    while row < n_rows:
        keep = _is_kept(keep_ptr, row, HAS_KEEP)
        codes = row_codes_ptr + row * ROW_CODES
        if keep:
            path = tl.load(codes)
            keep = (path >= 0) & ((path % 8 == PATH_BUFFER) == BRACKET)  # a valid row of this launch
        if keep:
            mu = tl.load(params_ptr + 0)
            c = tl.load(params_ptr + 2)
            student_row, teacher_row = _row_pointers(
                student_ptr, teacher_ptr, student_row_offsets_ptr, teacher_row_offsets_ptr, row,
                STUDENT_ALIGN, TEACHER_ALIGN,
            )
            values = row_values_ptr + row * ROW_VALUES
            max_t, max_s, log2_z_a, log2_z_b = _normalisers(values)
            crossing = tl.load(values + 6)
            hi = tl.load(values + 7)
            if BRACKET:
                lo = crossing
                total_gap, head_gap, head_size, mass_hi, buffered = _gap_pass_with_bracket(
                    teacher_row, student_row, V, max_t, max_s, c, log2_z_a, log2_z_b, lo, hi,
                    buffer, COMPUTE_DTYPE, BLOCK, CAPACITY,
                )
                bracket_gap, bracket_head = _place_buffer(
                    buffer, tl.minimum(buffered, CAPACITY), lo, hi, mass_hi, mu,
                    max_t, c, log2_z_a, COMPUTE_DTYPE, SCAN_BLOCK,
                )
                head_gap += bracket_gap
                head_size += bracket_head
            else:
                total_gap, head_gap, head_size = _gap_pass_ranked(
                    teacher_row, student_row, V, max_t, max_s, c, log2_z_a, log2_z_b, crossing,
                    tl.load(codes + 1), COMPUTE_DTYPE, BLOCK,
                )
            tl.store(values + 8, head_gap)
            tl.store(values + 9, total_gap - head_gap)
            tl.store(codes + 2, head_size)
        row += programs


@triton.jit
def _check_mode(MODE: tl.constexpr):
    """A compile-time error for a loss mode that the kernels' branches do not compute."""
    tl.static_assert((MODE >= MODE_AKL) & (MODE <= LAST_MODE), "unknown loss mode")


@triton.jit
def _divergence_terms(log2_p, log2_q, params_ptr, MODE: tl.constexpr):
    """The divergences made of terms (akl_kernels/divergences.py), per element: (l, h), l the
    term whose row sum is the divergence D, h = q dD/dq, from which the gradient is
    (h - q sum h) / T. log2 p and log2 q are -inf outside the support, where l = h = 0.

    M = w_p p + w_q q (params 3-6: w_p, w_q and their log2) is taken as a log-sum-exp of the
    weighted log-probabilities, and a term whose probability is 0 is 0 (its limit).
    """
    p = tl.exp2(log2_p)
    q = tl.exp2(log2_q)
    if MODE == MODE_TVD:
        # l = |p - q| / 2; dl/dq = sign(q - p) / 2 with sign(0) = 0.
        sign = tl.where(q > p, 1.0, tl.where(q < p, -1.0, 0.0))
        return 0.5 * tl.abs(p - q), 0.5 * q * sign
    else:
        w_p = tl.load(params_ptr + 3)
        w_q = tl.load(params_ptr + 4)
        x = tl.load(params_ptr + 5) + log2_p
        y = tl.load(params_ptr + 6) + log2_q
        top = tl.maximum(x, y)
        safe_top = tl.where(top > float("-inf"), top, 0.0)
        log2_m = safe_top + tl.log2(tl.exp2(x - safe_top) + tl.exp2(y - safe_top))
        # p ln(p / M) and q ln(q / M), bounded (M >= w p): 0 where the probability is 0.
        p_part = tl.where(p > 0, p * (LN2 * (log2_p - log2_m)), 0.0)
        q_part = tl.where(q > 0, q * (LN2 * (log2_q - log2_m)), 0.0)
        if MODE == MODE_JSD:
            # l = w_p p ln(p/M) + w_q q ln(q/M); dl/dq = w_q ln(q/M) (the M terms cancel).
            return w_p * p_part + w_q * q_part, w_q * q_part
        elif MODE == MODE_SKL:
            # l = p ln(p/M); dl/dq = -w_q p / M.
            return p_part, -w_q * q * tl.where(p > 0, tl.exp2(log2_p - log2_m), 0.0)
        else:
            tl.static_assert(MODE == MODE_SRKL, "not a divergence made of terms")
            # l = q ln(q/M); dl/dq = ln(q/M) + 1 - w_q q / M (the 1 cancels in the gradient).
            return q_part, q_part - w_q * q * tl.where(q > 0, tl.exp2(log2_q - log2_m), 0.0)


@triton.jit
def _terms_kernel(
    student_ptr,  # *{fp16,bf16,fp32,fp64} student logits, as for _row_statistics_kernel
    teacher_ptr,  # *{fp16,bf16,fp32,fp64} teacher logits
    student_row_offsets_ptr,  # *int64 [N]
    teacher_row_offsets_ptr,  # *int64 [N]
    keep_ptr,  # *bool [N] rows that count (read only when HAS_KEEP)
    params_ptr,  # *compute dtype [PARAMS]: mu, 1 / T, log2(e) / T, w_p, w_q, log2 w_p, log2 w_q
    row_values_ptr,  # *compute dtype [N, ROW_VALUES]: reads 0-3, writes 13-14
    row_codes_ptr,  # *int32 [N, ROW_CODES]: reads the path (-1: invalid)
    n_rows,
    V,
    MODE: tl.constexpr,  # a divergence made of terms (FIRST_TERMS_MODE and after)
    HAS_KEEP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    STUDENT_ALIGN: tl.constexpr,
    TEACHER_ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Pass 2' of each kept, valid row, for the divergences made of terms: D = sum l and
    H = sum h (_divergence_terms), once pass 1 has the normalisers."""
    _check_mode(MODE)
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    row = program.to(tl.int64)
    while row < n_rows:
        keep = _is_kept(keep_ptr, row, HAS_KEEP)
        if keep:
            keep = tl.load(row_codes_ptr + row * ROW_CODES) >= 0
        if keep:
            c = tl.load(params_ptr + 2)
            student_row, teacher_row = _row_pointers(
                student_ptr, teacher_ptr, student_row_offsets_ptr, teacher_row_offsets_ptr, row,
                STUDENT_ALIGN, TEACHER_ALIGN,
            )
            values = row_values_ptr + row * ROW_VALUES
            max_t, max_s, log2_z_a, log2_z_b = _normalisers(values)
            divergence = tl.zeros([BLOCK // 4], COMPUTE_DTYPE)
            h_sum = tl.zeros([BLOCK // 4], COMPUTE_DTYPE)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                _, _, log2_p, log2_q = _block_log_probabilities(
                    teacher_row, student_row, cols, V, max_t, max_s, c, log2_z_a, log2_z_b, COMPUTE_DTYPE
                )
                term, h = _divergence_terms(log2_p, log2_q, params_ptr, MODE)
                divergence += _lane_sum(term, BLOCK)
                h_sum += _lane_sum(h, BLOCK)
            tl.store(values + 13, tl.sum(divergence, 0))
            tl.store(values + 14, tl.sum(h_sum, 0))
        row += programs


@triton.jit
def _weighted(weight, divergence):
    """weight * divergence, and 0 where the weight is 0 (even for an infinite divergence)."""
    return tl.where(weight == 0, 0.0, weight * divergence)


@triton.jit
def _loss_kernel(
    keep_ptr,  # *bool [N] rows that count (read only when HAS_KEEP)
    row_values_ptr,  # *compute dtype [N, ROW_VALUES]: reads 4-5, 8-9 when SPLIT, 13 for FIRST_TERMS_MODE and after; writes 11-12
    row_codes_ptr,  # *int32 [N, ROW_CODES]: reads the path (-1: invalid), and the head size when SPLIT
    loss_ptr,  # *compute dtype [N] per-row loss
    stats_ptr,  # *compute dtype [6, N] fkl, rkl, head_gap, tail_gap, head_weight, tail_weight
    head_size_ptr,  # *int64 [N] number of head tokens
    split_path_ptr,  # *int32 [N] how the split was found: PATH_* + 8 x bracket passes
    n_rows,
    MODE: tl.constexpr,  # a LossMode
    SPLIT: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,  # rows per program
):
    """The weights, the loss and the statistics of BLOCK rows per program (nothing row-long)."""
    _check_mode(MODE)
    row = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = row < n_rows
    keep = in_range
    if HAS_KEEP:
        keep = keep & tl.load(keep_ptr + row, mask=in_range, other=0).to(tl.int1)
    values = row_values_ptr + row * ROW_VALUES
    codes = row_codes_ptr + row * ROW_CODES
    fkl = tl.load(values + 4, mask=keep, other=0.0)
    rkl = tl.load(values + 5, mask=keep, other=0.0)
    path = tl.load(codes, mask=keep, other=0)
    invalid = path < 0
    zero = tl.zeros([BLOCK], COMPUTE_DTYPE)
    head_gap = zero
    tail_gap = zero
    head_size = tl.zeros([BLOCK], tl.int32)
    if SPLIT:
        valid = keep & ~invalid
        head_gap = tl.load(values + 8, mask=valid, other=0.0)
        tail_gap = tl.load(values + 9, mask=valid, other=0.0)
        head_size = tl.load(codes + 2, mask=valid, other=0)
    if MODE == MODE_AKL:
        # w = gap / (head_gap + tail_gap); 0.5 each when q == p on the support.
        total_gap = head_gap + tail_gap
        tied = total_gap == 0
        total_gap = tl.where(tied, 1.0, total_gap)
        head_weight = tl.where(tied, 0.5, head_gap / total_gap)
        tail_weight = tl.where(tied, 0.5, tail_gap / total_gap)
    elif MODE == MODE_FKL:
        head_weight = zero + 1.0
        tail_weight = zero
    elif MODE == MODE_RKL:
        head_weight = zero
        tail_weight = zero + 1.0
    else:  # a divergence made of terms weights neither
        head_weight = zero
        tail_weight = zero
    # w_head FKL + w_tail RKL + D: a divergence with weight 0 adds nothing, even when it is +inf.
    loss = _weighted(head_weight, fkl) + _weighted(tail_weight, rkl)
    if MODE >= FIRST_TERMS_MODE:
        loss += tl.load(values + 13, mask=keep & ~invalid, other=0.0)
    # Invalid rows (NaN, +inf, empty support): NaN loss and statistics, head size 0, no path.
    # Ignored rows: all 0.
    nan = zero + float("nan")
    loss = tl.where(keep, tl.where(invalid, nan, loss), 0.0)
    fkl = tl.where(invalid, nan, fkl)
    rkl = tl.where(invalid, nan, rkl)
    head_gap = tl.where(invalid, nan, head_gap)
    tail_gap = tl.where(invalid, nan, tail_gap)
    head_weight = tl.where(keep, tl.where(invalid, nan, head_weight), 0.0)
    tail_weight = tl.where(keep, tl.where(invalid, nan, tail_weight), 0.0)
    head_size = tl.where(invalid, 0, head_size)
    path = tl.where(invalid, 0, path)
    tl.store(values + 11, head_weight, mask=keep)  # for the gradient kernel
    tl.store(values + 12, tail_weight, mask=keep)
    tl.store(loss_ptr + row, loss, mask=in_range)
    tl.store(stats_ptr + 0 * n_rows + row, fkl, mask=in_range)
    tl.store(stats_ptr + 1 * n_rows + row, rkl, mask=in_range)
    tl.store(stats_ptr + 2 * n_rows + row, head_gap, mask=in_range)
    tl.store(stats_ptr + 3 * n_rows + row, tail_gap, mask=in_range)
    tl.store(stats_ptr + 4 * n_rows + row, head_weight, mask=in_range)
    tl.store(stats_ptr + 5 * n_rows + row, tail_weight, mask=in_range)
    tl.store(head_size_ptr + row, head_size.to(tl.int64), mask=in_range)
    tl.store(split_path_ptr + row, path, mask=in_range)


@triton.jit
def _gradient_kernel(
    student_ptr,  # *{fp16,bf16,fp32,fp64} student logits, as for _row_statistics_kernel
    teacher_ptr,  # *{fp16,bf16,fp32,fp64} teacher logits
    student_row_offsets_ptr,  # *int64 [N]
    teacher_row_offsets_ptr,  # *int64 [N]
    keep_ptr,  # *bool [N] rows that count (read only when HAS_KEEP)
    grad_ptr,  # *student dtype [N, V] contiguous gradient
    params_ptr,  # *compute dtype [PARAMS]: mu, 1 / T, log2(e) / T, w_p, w_q, log2 w_p, log2 w_q
    row_values_ptr,  # *compute dtype [N, ROW_VALUES]: reads 0-3, 5, 11-12, and 14 for FIRST_TERMS_MODE and after
    row_scale_ptr,  # *compute dtype: row i's factor (grad_output times the reduction's) at i * row_scale_stride
    row_scale_stride,  # 0 when every row has the same factor
    n_rows,
    V,
    MODE: tl.constexpr,  # a LossMode
    HAS_KEEP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    STUDENT_ALIGN: tl.constexpr,
    TEACHER_ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Pass 3 of each row: the gradient with respect to the student logits, times the row's factor,
    rounded once to the student's dtype. Ignored rows get 0 without being read."""
    _check_mode(MODE)
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    row = program.to(tl.int64)
    while row < n_rows:
        grad_row = grad_ptr + row * V
        if _is_kept(keep_ptr, row, HAS_KEEP):
            student_row, teacher_row = _row_pointers(
                student_ptr, teacher_ptr, student_row_offsets_ptr, teacher_row_offsets_ptr, row,
                STUDENT_ALIGN, TEACHER_ALIGN,
            )
            values = row_values_ptr + row * ROW_VALUES
            max_t, max_s, log2_z_a, log2_z_b = _normalisers(values)
            rkl = tl.load(values + 5)
            head_weight = tl.load(values + 11)  # NaN for an invalid row
            tail_weight = tl.load(values + 12)
            c = tl.load(params_ptr + 2)
            inv_t = tl.load(params_ptr + 1)
            row_scale = tl.load(row_scale_ptr + row * row_scale_stride)
            head_factor = head_weight * row_scale
            tail_factor = tail_weight * row_scale
            invalid = head_weight != head_weight
            h_sum = tl.zeros([], COMPUTE_DTYPE)
            if MODE >= FIRST_TERMS_MODE:
                h_sum = tl.load(values + 14)  # H
            # ---- d loss / d s_j = (1/T) [w_h (q - p) + w_t q (log q - log p - RKL)] ----
            # ---- or, for a divergence made of terms, (1/T) (h_j - q_j H) ----
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                t = _load(teacher_row, cols, V, COMPUTE_DTYPE)
                s = _load(student_row, cols, V, COMPUTE_DTYPE)
                log2_p = _log2_prob(t, max_t, c, log2_z_a)
                log2_q = _log2_prob(s, max_s, c, log2_z_b)
                q = tl.exp2(log2_q)
                g = tl.zeros([BLOCK], COMPUTE_DTYPE)
                if MODE >= FIRST_TERMS_MODE:
                    support = (t > float("-inf")) & (s > float("-inf"))
                    log2_q = tl.where(support, log2_q, float("-inf"))
                    _, h = _divergence_terms(tl.where(support, log2_p, float("-inf")), log2_q, params_ptr, MODE)
                    g = row_scale * (h - tl.exp2(log2_q) * h_sum)
                elif MODE != MODE_FKL:
                    # q (log q - log p - RKL) = -q (d + RKL) with d = log p - log q. Its limits:
                    # 0 where q (times the factor) is 0, whatever d; 0 for d + RKL = -inf + inf
                    # (a ratio as infinite as the divergence it belongs to).
                    d = LN2 * (log2_p - log2_q)
                    d_plus_rkl = tl.where(d == -rkl, 0.0, d + rkl)
                    weighted_q = tail_factor * q
                    g = -tl.where(weighted_q == 0, 0.0, weighted_q * d_plus_rkl)
                if (MODE == MODE_AKL) | (MODE == MODE_FKL):
                    g += head_factor * (q - tl.exp2(log2_p))
                # 1/T last (no factor overflows before); 0 outside the support; NaN for invalid rows.
                g = tl.where((t > float("-inf")) & (s > float("-inf")), g * inv_t, 0.0)
                g = tl.where(invalid, float("nan"), g)
                tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < V)
        else:
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                tl.store(grad_row + cols, tl.zeros([BLOCK], grad_ptr.dtype.element_ty), mask=cols < V)
        row += programs


def block_size(vocab: int) -> int:
    """Columns per block of the streaming passes: the row rounded up to a power of two, from 256
    (fewer sizes, fewer kernels to compile) to MAX_BLOCK."""
    return min(MAX_BLOCK, max(256, triton.next_power_of_2(vocab)))


def search_block_size(block: int) -> int:
    return min(block, MAX_SEARCH_BLOCK)


def num_warps(block: int) -> int:
    """8 columns per thread (16-byte loads of 16-bit logits), from 1 to 8 warps."""
    return max(1, min(8, block // 256))


def row_offsets(x: torch.Tensor) -> torch.Tensor:
    """(N,) int64 element offset of each row of x (..., V), for any strides of the leading dims."""
    offsets = torch.zeros((), dtype=torch.int64, device=x.device)
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        offsets = offsets[..., None] + torch.arange(size, device=x.device) * stride
    return offsets.reshape(-1)


def row_alignment(x: torch.Tensor) -> int:
    """Elements in 16 bytes if every row of x starts on a 16-byte boundary (vector loads), else 1."""
    per_vector = 16 // x.element_size()
    aligned = _start_address(x) % 16 == 0 and all(
        (stride * x.element_size()) % 16 == 0 for size, stride in zip(x.shape[:-1], x.stride()[:-1]) if size > 1
    )
    return per_vector if aligned and per_vector > 1 else 1


def launch_options(x: torch.Tensor, block: int) -> dict:
    """The launch's num_warps, and the register cap (maxnreg) in eager. While torch.compile
    traces, inductor launches the kernels itself and takes num_warps and num_stages only, so the
    cap is left out there (the kernels then may use more registers: fewer programs per SM)."""
    if is_traced(x):
        return {"num_warps": num_warps(block)}
    return {"num_warps": num_warps(block), "maxnreg": MAX_REGISTERS}


def _start_address(x: torch.Tensor) -> int:
    """x's data pointer; while torch.compile traces, the byte offset of x in its storage, the
    storage itself taken as 16-byte aligned (CUDA's caching allocator aligns to 512 bytes, and so
    do inductor's buffers)."""
    if is_traced(x):
        return x.storage_offset() * x.element_size()
    return x.data_ptr()


@functools.cache
def _program_slots(device: torch.device) -> int:
    """How many programs the persistent grid runs at once on `device`."""
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter runs programs one after another; several still exercise the row loop


def _params(config, dtype, device):
    """The kernels' runtime scalars (mu, 1 / T, log2(e) / T, and the mixture's w_p, w_q, log2 w_p,
    log2 w_q) as one tensor of the compute dtype, each rounded once from float64."""
    w_p, w_q = config.mixture
    log2_weights = [math.log2(w) if w > 0 else float("-inf") for w in (w_p, w_q)]
    return torch.tensor(
        [config.mu, 1.0 / config.temperature, math.log2(math.e) / config.temperature, w_p, w_q, *log2_weights],
        dtype=dtype, device=device,
    )


class _Launch(NamedTuple):
    """What every kernel of one call takes: the rows' tensors (student, teacher, their row
    offsets, keep), the runtime scalars, the grid, the block and the compile-time switches."""

    rows: tuple
    params: torch.Tensor
    programs: int
    block: int
    common: dict


def _launch(student, teacher, keep, config) -> _Launch:
    """The launch plan of a call on (N, V) rows (N >= 1), whose vocabulary dimension is contiguous."""
    vocab = student.shape[-1]
    n_rows = student.numel() // vocab
    dtype = compute_dtype(student.dtype, teacher.dtype)
    block = block_size(vocab)
    return _Launch(
        rows=(student, teacher, row_offsets(student), row_offsets(teacher), keep),
        params=_params(config, dtype, student.device),
        programs=min(n_rows, _program_slots(student.device)),
        block=block,
        common=dict(
            HAS_KEEP=keep is not None, COMPUTE_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
            STUDENT_ALIGN=row_alignment(student), TEACHER_ALIGN=row_alignment(teacher),
            **launch_options(student, block),
        ),
    )


def _family(mode):
    """The Divergence of a loss mode; NotImplementedError for a mode the kernels do not compute
    (which _check_mode would also refuse at compile time)."""
    if mode not in BY_MODE:
        raise NotImplementedError(f"the Triton backend does not compute loss mode {mode!r}")
    return BY_MODE[mode]


def _vocabulary_contiguous(x):
    """x itself when its vocabulary dimension is contiguous, else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def triton_row_losses(
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None,
    grad_scale: torch.Tensor,
    config: RowLossConfig,
    compute_grad: bool,
    grad_out: torch.Tensor | None = None,
) -> RowLosses:
    """Per-row losses through the fused kernels; arguments as torch_backend.torch_row_losses.

    Inputs whose vocabulary dimension is not contiguous are copied; any other strides are read
    in place through per-row offsets. With compute_grad the gradient follows as
    triton_row_gradient computes it, every row scaled by grad_scale.
    """
    student, teacher = _vocabulary_contiguous(student), _vocabulary_contiguous(teacher)
    vocab = student.shape[-1]
    n_rows = student.numel() // vocab
    dtype = compute_dtype(student.dtype, teacher.dtype)
    device = student.device

    loss = torch.empty(n_rows, dtype=dtype, device=device)
    stats = torch.empty(len(STATS_FIELDS), n_rows, dtype=dtype, device=device)
    head_size = torch.empty(n_rows, dtype=torch.int64, device=device)
    split_path = torch.empty(n_rows, dtype=torch.int32, device=device)
    row_values = torch.zeros(n_rows, ROW_VALUES, dtype=dtype, device=device)  # ignored rows: 0, not stale memory
    grad = None
    if compute_grad:
        grad = torch.empty(student.shape, dtype=student.dtype, device=device) if grad_out is None else grad_out
    if n_rows == 0:
        return RowLosses(loss, stats, head_size, grad, split_path, row_values)

    plan = _launch(student, teacher, keep, config)
    programs, block, common = plan.programs, plan.block, plan.common
    row_codes = torch.empty(n_rows, ROW_CODES, dtype=torch.int32, device=device)
    row_top = torch.empty(n_rows if config.split else 0, TOPK, dtype=dtype, device=device)
    # The bracket buffer: scratch for the rows of each program (never read before written).
    buffer = torch.empty(programs if config.split else 0, CAPACITY, 2, dtype=dtype, device=device)
    wrap_triton(_row_statistics_kernel)[(programs,)](
        *plan.rows, plan.params, row_values, row_codes, row_top, n_rows, vocab, SPLIT=config.split, BLOCK=block,
        TOPK=TOPK, **common,
    )
    if config.split:
        wrap_triton(_split_kernel)[(programs,)](
            *plan.rows, plan.params, row_values, row_codes, row_top, n_rows, vocab,
            SEARCH_BLOCK=search_block_size(block), TOPK=TOPK, NUM_CANDIDATES=NUM_CANDIDATES, CAPACITY=CAPACITY,
            **common,
        )
        for bracket in (False, True):
            wrap_triton(_gap_kernel)[(programs,)](
                *plan.rows, plan.params, row_values, row_codes, buffer, n_rows, vocab, BRACKET=bracket, BLOCK=block,
                SCAN_BLOCK=SCAN_BLOCK, CAPACITY=CAPACITY, **common,
            )
    if _family(config.mode).has_terms:
        wrap_triton(_terms_kernel)[(programs,)](
            *plan.rows, plan.params, row_values, row_codes, n_rows, vocab, MODE=int(config.mode), BLOCK=block,
            **common,
        )
    wrap_triton(_loss_kernel)[(triton.cdiv(n_rows, LOSS_ROWS),)](
        keep, row_values, row_codes, loss, stats, head_size, split_path, n_rows,
        MODE=int(config.mode), SPLIT=config.split, HAS_KEEP=keep is not None, COMPUTE_DTYPE=common["COMPUTE_DTYPE"],
        BLOCK=LOSS_ROWS,
    )
    if compute_grad:
        _gradient(plan, grad, row_values, grad_scale.to(dtype).reshape(1), 0, config)
    return RowLosses(loss, stats, head_size, grad, split_path, row_values)


def triton_row_gradient(
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None,
    row_scale: torch.Tensor,
    state: torch.Tensor,
    config: RowLossConfig,
    grad_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """d(sum_i row_scale_i * loss_i) / d student from the inputs and triton_row_losses' state
    (its per-row record); arguments and result as torch_backend.torch_row_gradient.

    One pass over each kept row (teacher and student read, gradient written), the factor
    applied in the compute dtype before the one rounding to the student's dtype.
    """
    student, teacher = _vocabulary_contiguous(student), _vocabulary_contiguous(teacher)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device) if grad_out is None else grad_out
    if student.numel() == 0:
        return grad
    row_scale = row_scale.to(state.dtype)
    _gradient(_launch(student, teacher, keep, config), grad, state, row_scale, row_scale.stride(0), config)
    return grad


TRITON_BACKEND = RowBackend(
    name="triton",
    row_losses=triton_row_losses,
    row_gradient=triton_row_gradient,
    # The gradient pass reads teacher and student whether it runs in forward or in backward; in
    # backward it also takes grad_output in, where forward's gradient would need another pass
    # (read and write) to be scaled, and rounds a float16 gradient after the loss scale.
    forward_gradient_dtypes=(),
    split_path_name=split_path_name,
    state_columns=lambda teacher: ROW_VALUES.value,
)


def _gradient(plan, grad, row_values, row_scale, row_scale_stride, config):
    """Launch the gradient kernel: grad (N, V) from the rows of `plan` and their record."""
    vocab = grad.shape[-1]
    wrap_triton(_gradient_kernel)[(plan.programs,)](
        *plan.rows, grad, plan.params, row_values, row_scale, row_scale_stride, grad.numel() // vocab, vocab,
        MODE=int(config.mode), BLOCK=plan.block, **plan.common,
    )
