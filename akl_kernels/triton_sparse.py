"""The Triton backend's two passes over the student for a sparse teacher (TeacherTopK).

The maths over the K listed tokens is shared with the torch backend (``_sparse_rows.py``); here
are the only vocabulary-long parts, each one read of the student row (and, for the gradient, one
write), with nothing vocabulary-sized made for the teacher:

  _unlisted_logsumexp_kernel  online maximum and sum of exp2 over the student's support tokens
           that are not listed, and NaN/+inf detection;
  _sparse_gradient_kernel  the gradient: exp((s_j - shift) / T - lse) times the row's bucket factor at
           unlisted tokens, the listed tokens' own values at theirs, rounded once.

Each row's listed indices arrive sorted ascending, so the listed tokens of a block
[start, start + BLOCK) are a contiguous run of them: each block compares its columns with that
run only, K comparisons per column in the worst case and about K * BLOCK / V on average. A row
costs 3 units of traffic (student twice, gradient once) plus the K pairs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._sparse_rows import StudentPasses, sparse_backend
from .triton_backend import (
    _is_kept,
    _load,
    _program_slots,
    _vocabulary_contiguous,
    block_size,
    launch_options,
    row_alignment,
    row_offsets,
    split_path_name,
)

# Columns of the first pass's per-row output.
OUT_LOG2_SUM, OUT_BAD, OUT_COLUMNS = 0, 1, 2


@triton.jit
def _student_row(student_ptr, student_row_offsets_ptr, row, STUDENT_ALIGN: tl.constexpr):
    """The row's first student logit, with the alignment the host checked."""
    offset = tl.load(student_row_offsets_ptr + row)
    if STUDENT_ALIGN > 1:
        offset = tl.multiple_of(offset, STUDENT_ALIGN)
    return student_ptr + offset


@triton.jit
def _listed_in_block(sorted_indices, start, BLOCK: tl.constexpr):
    """(first, last): the run of the row's sorted indices that falls in [start, start + BLOCK)."""
    first = tl.sum((sorted_indices < start).to(tl.int32))
    last = tl.sum((sorted_indices < start + BLOCK).to(tl.int32))
    return first, last


@triton.jit
def _unlisted_logsumexp_kernel(
    student_ptr,  # *{fp16,bf16,fp32,fp64} student logits; row i starts at student_row_offsets_ptr[i]
    student_row_offsets_ptr,  # *int64 [N]
    keep_ptr,  # *bool [N] rows that count (read only when HAS_KEEP)
    indices_ptr,  # *int64 [N, K] listed tokens, each row ascending (padding -1 first)
    out_ptr,  # *compute dtype [N, 2]: log2 sum 2^((s - m) c); NaN/+inf
    max_ptr,  # *compute dtype [N] the unlisted support's largest student logit m
    c,  # log2(e) / T
    n_rows,
    V,
    K,
    HAS_KEEP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    STUDENT_ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
    K_BLOCK: tl.constexpr,
):
    """One read of each kept student row: over its support tokens that are not listed, the
    maximum m and log2 sum 2^((s - m) c) (-inf when there are none), and whether the row holds
    NaN or +inf anywhere. Ignored rows are not read."""
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    row = program.to(tl.int64)
    while row < n_rows:
        out = out_ptr + row * 2
        log2_sum = tl.full([], float("-inf"), COMPUTE_DTYPE)
        row_max = tl.full([], float("-inf"), COMPUTE_DTYPE)
        bad = tl.zeros([], tl.int32)
        if _is_kept(keep_ptr, row, HAS_KEEP):
            student_row = _student_row(student_ptr, student_row_offsets_ptr, row, STUDENT_ALIGN)
            indices_row = indices_ptr + row * K
            k = tl.arange(0, K_BLOCK)
            sorted_indices = tl.load(indices_row + k, mask=k < K, other=V + BLOCK)  # past every block
            # Per-lane running maximum and sum of 2^((s - max) c), merged at the end of the row.
            lane_max = tl.full([BLOCK], float("-inf"), COMPUTE_DTYPE)
            lane_sum = tl.zeros([BLOCK], COMPUTE_DTYPE)
            lane_bad = tl.zeros([BLOCK], tl.int32)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                s = _load(student_row, cols, V, COMPUTE_DTYPE)
                lane_bad |= ((s != s) | (s == float("inf"))).to(tl.int32)
                listed = cols < 0
                first, last = _listed_in_block(sorted_indices, start, BLOCK)
                for j in range(first, last):
                    listed |= cols == tl.load(indices_row + j)
                unlisted = (s > float("-inf")) & ~listed
                x = tl.where(unlisted, s, float("-inf"))
                new_max = tl.maximum(lane_max, x)
                # Shift before scaling, so that finite logits never overflow; -inf - -inf is kept out.
                safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
                lane_sum = lane_sum * tl.exp2((lane_max - safe_max) * c) + tl.exp2((x - safe_max) * c)
                lane_max = new_max
            row_max = tl.max(lane_max, 0)
            safe_row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
            total = tl.sum(lane_sum * tl.exp2((lane_max - safe_row_max) * c), 0)
            log2_sum = tl.log2(total)  # -inf when no unlisted support token
            bad = tl.max(lane_bad, 0)
        tl.store(out + 0, log2_sum)
        tl.store(out + 1, bad.to(COMPUTE_DTYPE))
        tl.store(max_ptr + row, row_max)
        row += programs


@triton.jit
def _sparse_gradient_kernel(
    student_ptr,  # *{fp16,bf16,fp32,fp64} student logits, as for _unlisted_logsumexp_kernel
    student_row_offsets_ptr,  # *int64 [N]
    keep_ptr,  # *bool [N] rows that count (read only when HAS_KEEP)
    indices_ptr,  # *int64 [N, K] listed tokens, each row ascending (padding -1 first)
    listed_grad_ptr,  # *compute dtype [N, K] the gradient at each listed token, in that order
    shift_ptr,  # *compute dtype [N] the row's largest support logit
    lse_ptr,  # *compute dtype [N] the row's log-sum-exp of (s - shift) / T over the support (NaN: invalid row)
    unlisted_factor_ptr,  # *compute dtype [N] the gradient at an unlisted token is q_j times this
    grad_ptr,  # *student dtype [N, V] contiguous gradient
    inv_t,  # 1 / T
    n_rows,
    V,
    K,
    HAS_KEEP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    STUDENT_ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
    K_BLOCK: tl.constexpr,
):
    """One read of each kept student row and one write of its gradient; ignored rows get 0
    without being read."""
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    row = program.to(tl.int64)
    while row < n_rows:
        grad_row = grad_ptr + row * V
        if _is_kept(keep_ptr, row, HAS_KEEP):
            student_row = _student_row(student_ptr, student_row_offsets_ptr, row, STUDENT_ALIGN)
            indices_row = indices_ptr + row * K
            listed_grad_row = listed_grad_ptr + row * K
            k = tl.arange(0, K_BLOCK)
            sorted_indices = tl.load(indices_row + k, mask=k < K, other=V + BLOCK)  # past every block
            shift = tl.load(shift_ptr + row)
            lse = tl.load(lse_ptr + row)
            factor = tl.load(unlisted_factor_ptr + row)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                s = _load(student_row, cols, V, COMPUTE_DTYPE)
                # q_j = exp((s_j - shift) / T - lse); 0 off the support (s = -inf); NaN for an invalid row.
                g = tl.where(s > float("-inf"), tl.exp((s - shift) * inv_t - lse) * factor, 0.0)
                g = tl.where(lse != lse, float("nan"), g)
                first, last = _listed_in_block(sorted_indices, start, BLOCK)
                for j in range(first, last):
                    g = tl.where(cols == tl.load(indices_row + j), tl.load(listed_grad_row + j), g)
                tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < V)
        else:
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                tl.store(grad_row + cols, tl.zeros([BLOCK], grad_ptr.dtype.element_ty), mask=cols < V)
        row += programs


def _plan(student, indices, keep, dtype):
    """The launch arguments both kernels share: grid, block and compile-time switches."""
    vocab = student.shape[-1]
    n_rows = student.numel() // vocab
    block = block_size(vocab)
    return n_rows, min(n_rows, _program_slots(student.device)), dict(
        HAS_KEEP=keep is not None, COMPUTE_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
        STUDENT_ALIGN=row_alignment(student), BLOCK=block, K_BLOCK=triton.next_power_of_2(indices.shape[1]),
        **launch_options(student, block),
    )


def triton_unlisted_logsumexp(student, indices, keep, temperature, dtype):
    """_sparse_rows.StudentPasses.unlisted_logsumexp through _unlisted_logsumexp_kernel."""
    student = _vocabulary_contiguous(student)
    indices = indices.contiguous()
    n_rows, programs, common = _plan(student, indices, keep, dtype)
    out = torch.empty(n_rows, OUT_COLUMNS, dtype=dtype, device=student.device)
    row_max = torch.empty(n_rows, dtype=dtype, device=student.device)
    if n_rows:
        wrap_triton(_unlisted_logsumexp_kernel)[(programs,)](
            student, row_offsets(student), keep, indices, out, row_max, math.log2(math.e) / temperature,
            n_rows, student.shape[-1], indices.shape[1], **common,
        )
    # The log-sum-exp of (s - m) / T in natural units: ln(sum) = log2(sum) ln 2.
    return row_max, out[:, OUT_LOG2_SUM] * math.log(2.0), out[:, OUT_BAD] != 0


def triton_sparse_gradient(student, indices, keep, temperature, shift, lse, listed_grad, unlisted_factor,
                           grad_out=None):
    """_sparse_rows.StudentPasses.gradient through _sparse_gradient_kernel."""
    student = _vocabulary_contiguous(student)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device) if grad_out is None else grad_out
    n_rows, programs, common = _plan(student, indices, keep, lse.dtype)
    if n_rows:
        wrap_triton(_sparse_gradient_kernel)[(programs,)](
            student, row_offsets(student), keep, indices.contiguous(), listed_grad.contiguous(), shift.contiguous(),
            lse.contiguous(), unlisted_factor.contiguous(), grad, 1.0 / temperature, n_rows, student.shape[-1],
            indices.shape[1],
            **common,
        )
    return grad


TRITON_SPARSE_BACKEND = sparse_backend(
    "triton_sparse", StudentPasses(triton_unlisted_logsumexp, triton_sparse_gradient), split_path_name
)
