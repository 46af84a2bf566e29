"""The head/tail split and the gaps of CPU rows, compiled by numba: each row is read about twice
while it sits in cache, where the torch ops take some nine passes over a chunk and ~100 small
operations (docs/kernel.md, "The torch backend's split").

The rule is docs/semantics.md section 2, rules 4-7. Token j of a row goes to bucket
floor((max - a_j) * scale), capped at the last bucket (which also takes -inf and NaN): any
rounding of that keeps the order, so equal logits share a bucket and a lower bucket holds only
larger logits than a higher one. The teacher's mass per bucket (summed in float64) tells the
bucket whose running mass crosses mu; the gaps |p - q| of the buckets before it are head, and
only the crossing bucket's tokens are put in the teacher's order (value descending, index
ascending) to enter the head while the running mass stays <= mu (the row's first token always).
"""

from __future__ import annotations

import os
import threading

import numba
import numpy as np
import torch

_LAUNCH = threading.Lock()
_IMPORTED_BY = os.getpid()
# Crossing buckets of at most this many tokens are sorted; larger ones bucketed again.
SORTED_TOKENS = 64
# Crossing buckets holding more than 1 / BRANCH_SHARE of a row are listed without branches.
BRANCH_SHARE = 16


@numba.njit(cache=True, nogil=True, inline="always")
def _gap(p, q, j):
    """|p_j - q_j| in float64."""
    return abs(np.float64(q[j]) - np.float64(p[j]))


@numba.njit(cache=True, nogil=True)
def _token_buckets(a, row_max, scale, last, buckets):
    """buckets[j] = the bucket of logit a[j] (V,) in a row whose largest logit is row_max."""
    scale, last = a.dtype.type(scale), a.dtype.type(last)
    for j in range(a.shape[0]):
        key = (row_max - a[j]) * scale
        buckets[j] = np.int16(key if key < last else last)  # NaN and +inf: the last bucket


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _gap_sums(p, q, buckets, crossing):
    """(the row's gap, the gap of the buckets before `crossing`, their tokens, the tokens of
    bucket `crossing`): float64 sums of |p_j - q_j| and counts, reassociated so that they
    vectorise."""
    total, head, count, inside = 0.0, 0.0, 0, 0
    for j in range(p.shape[0]):
        gap = _gap(p, q, j)
        before = buckets[j] < crossing
        total += gap
        head += gap if before else 0.0
        count += before
        inside += buckets[j] == crossing
    return total, head, count, inside


@numba.njit(cache=True, nogil=True)
def _crossing_bucket(mass, limit, before, mu):
    """(the first bucket below `limit` whose running mass, from `before`, exceeds mu, or limit;
    the running mass before it)."""
    crossing = 0
    while crossing < limit and before + mass[crossing] <= mu:
        before += mass[crossing]
        crossing += 1
    return crossing, before


@numba.njit(cache=True, nogil=True)
def _row_split(a, p, q, row_max, row_min, mu, scale, mass, buckets, listed):
    """(head gap, tail gap, head size) of one row: a, p, q (V,) teacher logits (-inf outside
    the support), teacher and student probabilities, row_max and row_min a's largest and
    smallest values; mass (n_buckets,), buckets (V,) int16 and listed (V,) int64 are scratch."""
    if not -np.inf < row_max < np.inf:  # NaN, +inf or an empty support: the row gives NaN
        return np.nan, np.nan, 0
    n_buckets = mass.shape[0]
    last = n_buckets - 1
    # A narrow row is spread over all the buckets (any scale keeps the order): near-uniform
    # rows would otherwise fill a few buckets, with serial adds into each.
    if -np.inf < row_min < row_max:
        scale = max(scale, last / (np.float64(row_max) - np.float64(row_min)))
    _token_buckets(a, row_max, scale, last, buckets)
    mass[:] = 0.0
    for j in range(a.shape[0]):
        mass[buckets[j]] += p[j]
    # The crossing bucket: the first whose running mass exceeds mu. When rounding keeps the
    # whole support within mu, every support token of the last bucket is head too (no mass
    # bound stops them: mu is taken as infinite there).
    crossing, before = _crossing_bucket(mass, n_buckets, 0.0, mu)
    if crossing == n_buckets:
        crossing, mu = last, np.inf
    total, head, count, inside = _gap_sums(p, q, buckets, crossing)
    # The crossing bucket's support tokens (-inf: never head); a branch per token where they
    # are few, else every token written and the position advanced only for theirs (a branch
    # that goes either way at random costs more than the writes).
    n_listed = 0
    if inside * BRANCH_SHARE < a.shape[0]:
        for j in range(a.shape[0]):
            if buckets[j] == crossing and a[j] > -np.inf:
                listed[n_listed] = j
                n_listed += 1
    else:
        for j in range(a.shape[0]):
            listed[n_listed] = j
            n_listed += (buckets[j] == crossing) & (a[j] > -np.inf)
    crossing_head, crossing_count = _crossing_head(a, p, q, listed[:n_listed], before, mu, mass, buckets)
    head += crossing_head
    return head, total - head, count + crossing_count


@numba.njit(cache=True, nogil=True)
def _crossing_head(a, p, q, tokens, before, mu, mass, keys):
    """(the gap, the number) of the head tokens among `tokens`, the crossing bucket's support
    tokens in index order, with mass `before` ahead of them; mass and keys are scratch.

    While they are many and not all tied, they are bucketed again, evenly in value between
    their largest and smallest, and only the new crossing bucket is kept (the buckets before it
    are head); the few left are sorted into the teacher's order (a stable sort of -value keeps
    ties in index order) and enter the head while the running mass stays <= mu, and one with
    no mass before it."""
    head, count = 0.0, 0
    n = tokens.shape[0]
    tied = False
    while n > SORTED_TOKENS:
        values = a[tokens[:n]]
        top, bottom = np.float64(values.max()), np.float64(values.min())
        tied = top == bottom  # then index order is the teacher's order
        if tied:
            break
        n_keys = min(n, mass.shape[0])
        mass[:n_keys] = 0.0
        # key (top - value) / (top - bottom) in [0, 1] times n_keys - 1: rounding keeps the
        # order, top gets 0 and bottom n_keys - 1. (Float64 values 9e307 apart overflow the
        # differences: 0 for a finite one over an infinite span, NaN, taken as the last key, for
        # the values far below top; still in order, and top and bottom apart.)
        span = top - bottom
        for i in range(n):
            x = (top - np.float64(values[i])) / span * (n_keys - 1)
            key = np.int64(x) if x < n_keys - 1 else n_keys - 1
            keys[i] = key
            mass[key] += p[tokens[i]]
        # (rounding may keep the running mass within mu: then the last bucket)
        crossing, before = _crossing_bucket(mass, n_keys - 1, before, mu)
        kept = 0
        for i in range(n):  # without branches (see _row_split's listing)
            j = tokens[i]
            before_crossing = keys[i] < crossing
            head += _gap(p, q, j) if before_crossing else 0.0
            count += before_crossing
            tokens[kept] = j
            kept += keys[i] == crossing
        if kept == n:  # a guard: top and bottom get different keys, so some token always leaves
            break
        n = kept
    tokens = tokens[:n]
    if not tied:
        tokens = tokens[np.argsort(-a[tokens], kind="mergesort")]
    running = before
    for j in tokens:
        if running + p[j] > mu and running != 0.0:
            break
        running += p[j]
        head += _gap(p, q, j)
        count += 1
    return head, count


@numba.njit(cache=True, nogil=True)
def _split_rows(a, p, q, row_max, row_min, mu, scale, n_buckets, head_gap, tail_gap, head_size, first, step):
    """_row_split for rows first, first + step, ... of a, p, q (R, V), row_max and row_min
    (R,), into head_gap, tail_gap and head_size (R,), with scratch of its own."""
    vocab = a.shape[1]
    mass = np.empty(n_buckets, np.float64)
    buckets = np.empty(vocab, np.int16)
    listed = np.empty(vocab, np.int64)
    for r in range(first, a.shape[0], step):
        head_gap[r], tail_gap[r], head_size[r] = _row_split(
            a[r], p[r], q[r], row_max[r], row_min[r], mu, scale, mass, buckets, listed
        )


@numba.njit(cache=True, nogil=True, parallel=True)
def _split_rows_in_threads(a, p, q, row_max, row_min, mu, scale, n_buckets, head_gap, tail_gap, head_size, workers):
    """_split_rows with the rows dealt out to `workers` threads."""
    for worker in numba.prange(workers):
        _split_rows(a, p, q, row_max, row_min, mu, scale, n_buckets, head_gap, tail_gap, head_size, worker, workers)


def row_split_gaps(a, p, q, max_a, min_a, mu, scale, n_buckets):
    """(head gap, tail gap, head size), each (R,), of CPU rows: a, p, q (R, V) float32 or
    float64 teacher logits (-inf outside the support) and teacher and student probabilities;
    max_a and min_a (R, 1) the rows' largest and smallest logits; token j's bucket is
    floor((max - a_j) scale), at most n_buckets - 1 (n_buckets <= 2^15), with a larger scale
    for rows narrower than n_buckets / scale. The gaps come in a's dtype, the size as int64.

    The rows are dealt out to min(torch's threads, numba's, R) threads, one call at a time
    (some of numba's threading layers abort on concurrent launches), except in a process forked
    from the one that imported this module: GNU OpenMP (numba's "omp" layer) aborts a forked
    child that starts threads its parent had, so there the rows are split on one thread."""
    n_rows = a.shape[0]
    gaps = torch.empty(2, n_rows, dtype=torch.float64)
    head_size = torch.empty(n_rows, dtype=torch.int64)
    args = (a.numpy(), p.numpy(), q.numpy(), max_a.view(-1).numpy(), min_a.view(-1).numpy(), float(mu),
            float(scale), int(n_buckets), gaps[0].numpy(), gaps[1].numpy(), head_size.numpy())
    workers = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, n_rows)
    if workers > 1 and os.getpid() == _IMPORTED_BY:
        with _LAUNCH:
            _split_rows_in_threads(*args, workers)
    else:
        _split_rows(*args, 0, 1)
    head_gap, tail_gap = gaps.to(a.dtype)
    return head_gap, tail_gap, head_size
