"""The distillation losses from hidden states and lm_head weights, without the (N, V) logits.

At a 128k vocabulary the logits of 8k tokens take 4 GB in float32 for the student alone, plus
the teacher's and their gradient. Here rows (tokens) are processed a chunk at a time:

  1. the chunk's student and teacher logits, h @ W^T + b, as matrix products with float32
     output (float64 for float64 inputs), never rounded to 16 bits before the loss;
  2. the loss backend (Triton or torch, as for akl_loss) gives the chunk's per-row losses,
     statistics and the gradient g = d loss / d logits;
  3. grad_hidden[chunk] = g @ W_s, and grad_W += g^T @ h_s, grad_b += sum over rows of g,
     accumulated in float32 (float64) across chunks.

Peak extra memory is a few chunk-sized buffers (chunk rows x V) plus the weight-sized
accumulator, O(chunk x V + V x H), never O(N x V). Rows whose label is ignore_index are not
gathered at all: they cost no matrix product, and get zero loss and zero gradient whatever
their hidden states hold. As in akl_loss, gradients are computed in the forward pass (for
reductions "mean" and "sum") and the backward pass only scales them (float16 gradients are held
in float32 until then, so that grad_output, the loss scale of float16 training, enters before
they are rounded); for reduction "none" the backward recomputes the chunks with each row's
grad_output folded into g.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from ._dispatch import (
    STATS_MU,
    keep_mask,
    reduction_grad_scale,
    refuse_double_backward,
    row_config,
    select_backend,
    shape_result,
)
from ._ops import config_args, op_config, row_backend_named, scale_forward_gradient
from ._rows import STATS_FIELDS, RowBackend, RowLossConfig, compute_dtype
from .divergences import DIVERGENCES, divergence, resolve_parameter
from ._validation import (
    check_floating,
    check_has_data,
    check_labels,
    check_options,
    check_teacher_topk,
    check_temperature_range,
)
from .teacher_topk import TeacherTopK

HALF_DTYPES = (torch.float16, torch.bfloat16)

# A chunk's logits hold max(V * H / 4, 2^20) elements: its two buffers (student logits, which
# the loss backend overwrites with their gradient, and teacher logits) take half the float32
# weight's size, and a chunk has enough rows (H / 4) for efficient matrix products on a GPU.
# On a 2-core CPU at H = 512, V = 32000 larger chunks are faster but cost memory: 128 rows
# (the default) took 1.1-1.2x the time of materialised logits at 1/6.9 of their peak memory,
# 256 rows 1.05x at 1/5.3 (chunk_size chooses).
MIN_CHUNK_ELEMENTS = 1 << 20


def default_chunk_rows(vocab: int, hidden: int) -> int:
    """Rows per chunk for vocabulary size V and hidden size H (the larger of student and teacher)."""
    return max(1, hidden // 4, MIN_CHUNK_ELEMENTS // vocab)


def fused_linear_distillation_loss(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    *,
    student_bias=None,
    teacher_bias=None,
    loss="akl",
    mu=STATS_MU,
    beta=None,
    alpha=None,
    temperature=1.0,
    labels=None,
    ignore_index=-100,
    reduction="mean",
    chunk_size=None,
    return_stats=False,
    backend="auto",
):
    """distillation_loss(student_hidden @ student_weight.T + student_bias, teacher_hidden @ teacher_weight.T + teacher_bias, loss=loss).

    Same value, statistics and gradients as distillation_loss on float32 logits computed from
    these inputs, without materialising the logits (see the module docstring).

    Args:
        student_hidden: (..., H_s) float16/bfloat16/float32/float64, the student's last hidden
            states; receives a gradient of its shape and dtype.
        student_weight: (V, H_s) the student's lm_head weight (as nn.Linear stores it); receives
            a gradient. Hidden states and weight may differ in dtype (bf16 hidden states of an
            autocast model beside a float32 weight): they are multiplied in the promoted dtype.
        teacher_hidden: (..., H_t) with the same leading shape; no gradient.
        teacher_weight: (V, H_t); no gradient.
        student_bias, teacher_bias: optional (V,) biases; the student's receives a gradient.
        loss, mu, beta, alpha, temperature, labels, ignore_index, reduction, return_stats,
            backend: as distillation_loss; labels have the hidden states' leading shape.
        chunk_size: rows per chunk; None picks max(1, H / 4, 2^20 / V) (H the larger hidden size).

    Returns:
        The loss (float32, or float64 when a hidden state or weight is float64), or (loss, AKLStats).
    """
    family = divergence(loss)
    parameter = resolve_parameter(family, beta=beta, alpha=alpha)
    return _fused_linear_loss(
        family, parameter, student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
        teacher_bias, mu, temperature, labels, ignore_index, reduction, chunk_size, return_stats, backend,
    )


def fused_linear_akl_loss(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    student_bias=None,
    teacher_bias=None,
    *,
    mu=0.5,
    temperature=1.0,
    labels=None,
    ignore_index=-100,
    reduction="mean",
    chunk_size=None,
    return_stats=False,
    backend="auto",
):
    """akl_loss from hidden states: fused_linear_distillation_loss(..., loss="akl"), with the
    biases also accepted by position; arguments and returns as there."""
    return _fused_linear_loss(
        DIVERGENCES["akl"], 0.0, student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
        teacher_bias, mu, temperature, labels, ignore_index, reduction, chunk_size, return_stats, backend,
    )


def fused_linear_fkl_loss(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    student_bias=None,
    teacher_bias=None,
    *,
    temperature=1.0,
    labels=None,
    ignore_index=-100,
    reduction="mean",
    chunk_size=None,
    return_stats=False,
    backend="auto",
):
    """Forward KL from hidden states; arguments and returns as fused_linear_akl_loss (statistics at mu = 0.5)."""
    return _fused_linear_loss(
        DIVERGENCES["fkl"], 0.0, student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
        teacher_bias, STATS_MU, temperature, labels, ignore_index, reduction, chunk_size, return_stats, backend,
    )


def fused_linear_rkl_loss(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    student_bias=None,
    teacher_bias=None,
    *,
    temperature=1.0,
    labels=None,
    ignore_index=-100,
    reduction="mean",
    chunk_size=None,
    return_stats=False,
    backend="auto",
):
    """Reverse KL from hidden states; arguments and returns as fused_linear_akl_loss (statistics at mu = 0.5)."""
    return _fused_linear_loss(
        DIVERGENCES["rkl"], 0.0, student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
        teacher_bias, STATS_MU, temperature, labels, ignore_index, reduction, chunk_size, return_stats, backend,
    )


def fused_linear_cross_entropy(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                               chunk_size=None):
    """The language-model loss cross_entropy(hidden @ weight.T + bias, labels) without the (N, V)
    logits: a chunk of rows at a time, each chunk's logits (float32) dropped after its forward and
    recomputed in backward (torch.utils.checkpoint), so at most one chunk of logits exists at once.

    Args:
        hidden: (..., H) floating hidden states. weight: (V, H) lm_head weight. bias: optional (V,).
        labels: (...) integer targets; ignore_index marks rows that do not count.
        reduction: "mean" (over counted rows; 0 when none counts) or "sum".
        chunk_size: rows per chunk; None picks default_chunk_rows(V, H), as the distillation losses.

    Returns:
        0-dim float32 loss (float64 for float64 inputs).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    _check_chunk_size(chunk_size)
    rows = hidden.reshape(-1, hidden.shape[-1])
    targets = labels.reshape(-1)
    if not torch.compiler.is_compiling():  # only counted rows are multiplied (compiled: all, no data-dependent shape)
        counted = targets.ne(ignore_index).nonzero().squeeze(1)
        rows, targets = rows.index_select(0, counted), targets.index_select(0, counted)
    chunk_size = chunk_size or default_chunk_rows(*weight.shape)
    total = rows.new_zeros((), dtype=compute_dtype(hidden.dtype, weight.dtype))
    for start in range(0, rows.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        total = total + checkpoint(
            _cross_entropy_sum, rows[part], weight, bias, targets[part], ignore_index, use_reentrant=False
        )
    if reduction == "sum":
        return total
    return total / labels.ne(ignore_index).sum().clamp(min=1)


def _cross_entropy_sum(hidden, weight, bias, targets, ignore_index):
    logits = torch.nn.functional.linear(hidden, weight, bias)
    logits = logits.to(compute_dtype(logits.dtype))  # float32, or float64 for float64 inputs
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


class FusedLinearAKLLoss(torch.nn.Module):
    """nn.Module form of fused_linear_distillation_loss: holds the keyword arguments.

    loss selects the divergence ("akl" by default; beta and alpha as distillation_loss).
    forward(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=None,
    teacher_bias=None, labels=None) returns what fused_linear_distillation_loss returns. The
    weights are passed in, not held, since they belong to the models' lm_heads.
    """

    def __init__(
        self,
        *,
        loss="akl",
        mu=0.5,
        beta=None,
        alpha=None,
        temperature=1.0,
        ignore_index=-100,
        reduction="mean",
        chunk_size=None,
        return_stats=False,
        backend="auto",
    ):
        super().__init__()
        self.loss = loss
        self.parameter = resolve_parameter(divergence(loss), beta=beta, alpha=alpha)
        check_options(mu, temperature, ignore_index, reduction, return_stats, backend)
        _check_chunk_size(chunk_size)
        self.mu = mu
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.return_stats = return_stats
        self.backend = backend

    def forward(
        self, student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=None,
        teacher_bias=None, labels=None,
    ):
        return _fused_linear_loss(
            DIVERGENCES[self.loss], self.parameter, student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
            teacher_bias, self.mu, self.temperature, labels, self.ignore_index, self.reduction,
            self.chunk_size, self.return_stats, self.backend,
        )

    def extra_repr(self):
        family = DIVERGENCES[self.loss]
        parameter = f", {family.parameter}={self.parameter}" if family.parameter else ""
        return (
            f"loss={self.loss!r}{parameter}, mu={self.mu}, temperature={self.temperature}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"chunk_size={self.chunk_size}, return_stats={self.return_stats}, backend={self.backend!r}"
        )


def _fused_linear_loss(
    family, parameter, student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
    mu, temperature, labels, ignore_index, reduction, chunk_size, return_stats, backend,
):
    sparse = isinstance(teacher_hidden, TeacherTopK)
    if sparse:
        if teacher_weight is not None or teacher_bias is not None:
            raise ValueError(
                "with a TeacherTopK in place of teacher_hidden, teacher_weight and teacher_bias must be None "
                "(the stored teacher has no lm_head)"
            )
        _check_student_side(student_hidden, student_weight, student_bias)
        check_labels(labels, student_hidden.shape[:-1], student_hidden.device, "hidden states")
        check_has_data(student_hidden.device, "hidden states")
        teacher_dtypes = (teacher_hidden.logprobs.dtype,)
    else:
        _check_tensors(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels)
        teacher_dtypes = (teacher_hidden.dtype, teacher_weight.dtype)
    check_options(mu, temperature, ignore_index, reduction, return_stats, backend)
    _check_chunk_size(chunk_size)
    dtype = compute_dtype(student_hidden.dtype, student_weight.dtype, *teacher_dtypes)
    check_temperature_range(temperature, dtype)
    row_backend = select_backend(backend, student_hidden.device, sparse=sparse)

    leading_shape = student_hidden.shape[:-1]
    device = student_hidden.device
    keep = keep_mask(labels, ignore_index)
    if sparse:
        check_teacher_topk(teacher_hidden, leading_shape, student_weight.shape[0], device, keep)
        # The stored pairs travel in the teacher's two tensor slots.
        teacher_hidden, teacher_weight = teacher_hidden
    kept_rows = math.prod(leading_shape) if keep is None else keep.sum()  # (math.prod: no guard on sizes)
    grad_scale = reduction_grad_scale(reduction, kept_rows, dtype, device)
    vocab = student_weight.shape[0]
    hidden = student_weight.shape[1] if sparse else max(student_weight.shape[1], teacher_weight.shape[1])
    wanted = [
        torch.is_grad_enabled() and x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias)
    ]
    config = row_config(family, parameter, mu, temperature, return_stats)
    loss, stats, head_size, *_grads = torch.ops.akl_kernels.fused_linear_rows(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, keep, grad_scale,
        None, *config_args(config), row_backend.name, sparse, int(chunk_size or default_chunk_rows(vocab, hidden)),
        reduction, wanted if reduction != "none" else [False] * 3,
    )
    return shape_result(loss, stats, head_size, leading_shape, reduction, return_stats)


@dataclass(frozen=True)
class _Options:
    """What _chunked_pass takes besides tensors.

    sparse_teacher: the teacher's slots (teacher_hidden, teacher_weight) hold a TeacherTopK's
    (logprobs, indices) instead of hidden states and lm_head. config: the loss backend's
    RowLossConfig. row_backend: the backend. chunk_rows: rows per chunk.
    """

    sparse_teacher: bool
    config: RowLossConfig
    row_backend: RowBackend
    chunk_rows: int


@torch.library.custom_op("akl_kernels::fused_linear_rows", mutates_args=())
def _fused_linear_rows(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, student_bias: Optional[torch.Tensor],
    teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, teacher_bias: Optional[torch.Tensor],
    keep: Optional[torch.Tensor], grad_scale: torch.Tensor, row_scale: Optional[torch.Tensor],
    mode: int, mu: float, temperature: float, split: bool, stats: bool, w_p: float, w_q: float,
    backend: str, sparse_teacher: bool, chunk_rows: int, reduction: str, wanted: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss over chunks of rows (reduced as `reduction` says), its statistics, and the wanted
    gradients of (student_hidden, student_weight, student_bias) in their held dtypes, already
    scaled by grad_scale and, when given, row i's by row_scale[i] (empty where not wanted).
    Torch's operator akl_kernels::fused_linear_rows (a custom_op: the chunks are the kept rows,
    a data-dependent count); the arguments after row_scale are _ops.config_args, the
    RowBackend's name and _Options."""
    n_rows = student_hidden.shape[:-1].numel()
    kept = torch.arange(n_rows, device=student_hidden.device) if keep is None else keep.nonzero().squeeze(1)
    options = _Options(
        sparse_teacher=sparse_teacher,
        config=op_config(mode, mu, temperature, split, stats, w_p, w_q),
        row_backend=row_backend_named(backend),
        chunk_rows=chunk_rows,
    )
    inputs = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
    loss, stats, head_size, grads = _chunked_pass(inputs, kept, grad_scale, row_scale, options, tuple(wanted))
    if reduction != "none":
        # grad_scale is 1 / kept rows for "mean" and 1 for "sum".
        loss = loss.sum() * grad_scale
    return loss, stats, head_size, *(student_hidden.new_empty(0) if g is None else g for g in grads)


@_fused_linear_rows.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, keep, grad_scale,
      row_scale, mode, mu, temperature, split, stats, w_p, w_q, backend, sparse_teacher, chunk_rows, reduction, wanted):
    n_rows = math.prod(student_hidden.shape[:-1])
    teacher_dtypes = (teacher_hidden.dtype,) if sparse_teacher else (teacher_hidden.dtype, teacher_weight.dtype)
    dtype = compute_dtype(student_hidden.dtype, student_weight.dtype, *teacher_dtypes)
    grads = [
        x.new_empty(x.shape, dtype=_held_dtype(x.dtype)) if want else student_hidden.new_empty(0)
        for x, want in zip((student_hidden, student_weight, student_bias), wanted)
    ]
    return (
        student_hidden.new_empty(() if reduction != "none" else (n_rows,), dtype=dtype),
        student_hidden.new_empty((len(STATS_FIELDS), n_rows), dtype=dtype),
        student_hidden.new_empty((n_rows,), dtype=torch.int64),
        *grads,
    )


def _fused_linear_setup_context(ctx, inputs, output):
    *tensors, keep, grad_scale, _row_scale = inputs[:9]
    *options, reduction, wanted = inputs[9:]
    # Only the loss is differentiable: backward gets no zeros the size of the gradient outputs.
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.grads = output[3:] if any(wanted) else None  # computed in forward ("mean", "sum")
    ctx.options = options
    ctx.wanted = list(ctx.needs_input_grad[:3])
    ctx.save_for_backward(*tensors, keep, grad_scale)


def _fused_linear_backward(ctx, grad_loss, _stats, _head_size, *_grads):
    """For "mean" and "sum" the gradients computed in forward (already scaled for the reduction)
    times grad_output, in place (skipped when it is 1; a float16 input's gradient, held in
    float32, is rounded after). For "none", and for a further backward through a retained
    graph, the chunks again with each row's grad_output folded into g. Double backward is
    refused."""
    refuse_double_backward()
    if grad_loss is None:  # undefined: a zero gradient
        return (None,) * 21
    grads, ctx.grads = ctx.grads, None
    *inputs, keep, grad_scale = ctx.saved_tensors
    if grad_loss.dim() == 0 and grads is not None:
        grads = [scale_forward_gradient(grad, grad_loss, None) if want else grad for grad, want in zip(grads, ctx.wanted)]
    else:
        # Row i's gradient times its grad_output (one for every row of "mean" and "sum") before the products.
        row_scale = grad_loss.reshape(-1).expand(math.prod(inputs[0].shape[:-1]))
        grads = torch.ops.akl_kernels.fused_linear_rows(
            *inputs, keep, grad_scale, row_scale, *ctx.options, "none", ctx.wanted
        )[3:]
    # Each gradient in its input's dtype, rounded once (float16 ones were held in float32).
    grads = [grad.to(x.dtype) if want else None for grad, x, want in zip(grads, inputs, ctx.wanted)]
    return (*grads, *[None] * 18)


torch.library.register_autograd(
    "akl_kernels::fused_linear_rows", _fused_linear_backward, setup_context=_fused_linear_setup_context
)


def _without_autocast(pass_fn):
    """Run pass_fn with autocast off: the products' dtypes are chosen by _LMHead, not by autocast."""

    @functools.wraps(pass_fn)
    def run(inputs, *args):
        with torch.autocast(inputs[0].device.type, enabled=False):
            return pass_fn(inputs, *args)

    return run


@_without_autocast
def _chunked_pass(inputs, kept, grad_scale, row_scale, options, wanted):
    """Losses of every row, and the wanted gradients, one chunk of kept rows at a time.

    Args:
        inputs: (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
            teacher_bias) as given to the public function (biases may be None).
        kept: (K,) int64 indices of the rows that count, ascending.
        grad_scale: 0-dim tensor folded into the gradient (1 / kept rows for "mean").
        row_scale: None, or (N,) per-row factors of the gradient (grad_output of "none").
        wanted: which of (hidden, weight, bias) gradients to compute.

    Returns:
        loss (N,), stats (6, N) and head_size (N,), 0 at ignored rows, and the gradients
        (hidden, weight, bias) in their inputs' shapes and held dtypes (None where not wanted).
    """
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = inputs
    n_rows, device = student_hidden.shape[:-1].numel(), student_hidden.device
    student_rows = student_hidden.reshape(n_rows, student_hidden.shape[-1])
    student_head = _LMHead(student_hidden.dtype, student_weight, student_bias)
    if options.sparse_teacher:
        teacher = _StoredTeacher(teacher_hidden, teacher_weight)
    else:
        teacher = _TeacherHead(teacher_hidden, teacher_weight, teacher_bias, min(options.chunk_rows, kept.numel()))
    dtype = compute_dtype(student_head.dtype, teacher.dtype)

    loss = torch.zeros(n_rows, dtype=dtype, device=device)
    stats = torch.zeros(len(STATS_FIELDS), n_rows, dtype=dtype, device=device)
    head_size = torch.zeros(n_rows, dtype=torch.int64, device=device)
    want_hidden, want_weight, want_bias = wanted
    compute_grad = any(wanted)
    # Gradients: the hidden states' in their held dtype (each row written once), the weight's
    # and bias's accumulated in the logits' dtype (float32 or float64) over chunks.
    grad_hidden = None
    if want_hidden:  # (..., H_s), written through its (N, H_s) view
        grad_hidden = torch.zeros(student_hidden.shape, dtype=_held_dtype(student_rows.dtype), device=device)
    grad_weight = torch.zeros(student_weight.shape, dtype=student_head.dtype, device=device) if want_weight else None
    grad_bias = torch.zeros(student_bias.shape, dtype=student_head.dtype, device=device) if want_bias else None

    # The chunk's logits live in two buffers reused by every chunk; the loss backend writes the
    # gradient over the student's logits (each row is read before its gradient is written).
    chunk_rows = min(options.chunk_rows, kept.numel())
    student_buffer = torch.empty(chunk_rows, student_weight.shape[0], dtype=student_head.dtype, device=device)
    for rows in kept.split(chunk_rows) if kept.numel() else ():
        # (R, H) operands, converted once: only kept rows are multiplied
        hidden = student_head.operands(student_rows.index_select(0, rows))
        student_logits = student_head.logits(hidden, student_buffer[: rows.numel()])  # (R, V)
        chunk = options.row_backend.row_losses(
            student_logits, teacher.rows(rows), None, grad_scale, options.config, compute_grad, grad_out=student_logits
        )
        loss.index_copy_(0, rows, chunk.loss)
        stats.index_copy_(1, rows, chunk.stats)
        head_size.index_copy_(0, rows, chunk.head_size)
        if not compute_grad:
            continue
        g = chunk.grad  # (R, V) d(sum_i grad_scale * loss_i) / d student logits
        if row_scale is not None:
            g.mul_(row_scale.index_select(0, rows).to(g.dtype)[:, None])
        if want_hidden:
            grad_hidden.view(student_rows.shape).index_copy_(0, rows, student_head.input_grad(g).to(grad_hidden.dtype))  # g @ W_s
        if want_weight:
            student_head.add_weight_grad_(grad_weight, g, hidden)  # += g^T @ h_s
        if want_bias:
            grad_bias.add_(g.sum(0))

    grads = (
        grad_hidden,
        None if grad_weight is None else grad_weight.to(_held_dtype(student_weight.dtype)),
        None if grad_bias is None else grad_bias.to(_held_dtype(student_bias.dtype)),
    )
    return loss, stats, head_size, grads


def _held_dtype(dtype):
    """The dtype a gradient for a `dtype` input is kept in until backward: float32 for float16,
    whose range would otherwise lose small gradients before the loss scale multiplies them."""
    return torch.float32 if dtype == torch.float16 else dtype


class _TeacherHead:
    """The teacher's side from hidden states and lm_head: rows(rows) gives those rows' (R, V)
    logits, in one buffer reused by every chunk."""

    def __init__(self, hidden, weight, bias, chunk_rows):
        self.hidden_rows = hidden.reshape(hidden.shape[:-1].numel(), hidden.shape[-1])
        self.head = _LMHead(hidden.dtype, weight, bias)
        self.dtype = self.head.dtype
        self.buffer = torch.empty(chunk_rows, weight.shape[0], dtype=self.dtype, device=hidden.device)

    def rows(self, rows):
        operands = self.head.operands(self.hidden_rows.index_select(0, rows))  # (R, H), converted once
        return self.head.logits(operands, self.buffer[: rows.numel()])


class _StoredTeacher:
    """The teacher's side from a TeacherTopK's (logprobs, indices): rows(rows) gives those rows'."""

    def __init__(self, logprobs, indices):
        listed = logprobs.shape[-1]
        self.logprobs, self.indices = logprobs.reshape(-1, listed), indices.reshape(-1, listed)
        self.dtype = compute_dtype(logprobs.dtype)

    def rows(self, rows):
        return TeacherTopK(self.logprobs.index_select(0, rows), self.indices.index_select(0, rows))


class _LMHead:
    """One model's output layer, logits = hidden @ weight^T + bias, with float32 (float64) results.

    Hidden states and weight are multiplied in their promoted dtype. When that is float16 or
    bfloat16 on CUDA, the operands stay 16-bit and the product has float32 output (torch.mm's
    out_dtype); elsewhere (a CPU has no such kernel, nor have older torch builds) the weight is
    copied to float32 once per pass. The logits are never rounded to 16 bits.
    """

    def __init__(self, hidden_dtype, weight, bias):
        operand = torch.promote_types(hidden_dtype, weight.dtype)
        self.dtype = compute_dtype(hidden_dtype, weight.dtype)  # the logits' dtype
        self.half_on_cuda = (
            operand in HALF_DTYPES and weight.is_cuda and _mm_has_float32_output(weight.device, operand)
        )
        self.operand = operand if self.half_on_cuda else self.dtype
        self.weight = weight.to(self.operand)
        self.bias = None if bias is None else bias.to(self.dtype)

    def operands(self, hidden):
        """(R, H) hidden states in the dtype the products take them (self.operand)."""
        return hidden.to(self.operand)

    def logits(self, hidden, out):
        """(R, H) operands -> (R, V) logits in self.dtype, written to out and returned."""
        if self.half_on_cuda:
            torch.mm(hidden, self.weight.T, out_dtype=torch.float32, out=out)
        else:
            torch.mm(hidden, self.weight.T, out=out)
        return out if self.bias is None else out.add_(self.bias)

    def input_grad(self, grad_logits):
        """(R, V) gradient of the logits -> (R, H) gradient of the hidden states, g @ W."""
        # With 16-bit operands the product accumulates in float32 inside.
        return torch.mm(grad_logits.to(self.operand), self.weight)

    def add_weight_grad_(self, grad_weight, grad_logits, hidden):
        """grad_weight (V, H) += g^T @ h for the chunk's (R, V) g and (R, H) operands."""
        if not self.half_on_cuda:
            grad_weight.addmm_(grad_logits.T, hidden)
            return
        # 16-bit operands, float32 product added to the float32 accumulator a slice of the
        # vocabulary at a time, so that the product's buffer stays within the chunk's size.
        grad_t = grad_logits.T.to(self.operand)  # (V, R)
        vocab_slice = max(1, grad_logits.numel() // hidden.shape[1])
        for start in range(0, grad_weight.shape[0], vocab_slice):
            part = slice(start, start + vocab_slice)
            grad_weight[part].add_(torch.mm(grad_t[part], hidden, out_dtype=torch.float32))


@functools.cache
def _mm_has_float32_output(device, dtype):
    """Whether torch.mm takes out_dtype=torch.float32 for `dtype` operands on `device`, in both
    forms _LMHead uses (into a float32 out= with a transposed operand, and returning a new
    tensor); older torch builds lack them, and the float32 copy of the weight is then used, as
    on a CPU."""
    try:
        x = torch.ones(2, 3, dtype=dtype, device=device)
        out = torch.empty(2, 2, dtype=torch.float32, device=device)
        torch.mm(x, x.T, out_dtype=torch.float32, out=out)
        product = torch.mm(x.T, x, out_dtype=torch.float32)
        if device.type == "meta":  # shapes and dtypes only
            return product.dtype == torch.float32
        return product.dtype == torch.float32 and bool((out == 3).all()) and bool((product == 2).all())
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _check_student_side(student_hidden, student_weight, student_bias):
    """The student's tensors when the teacher is a TeacherTopK (checked on its own)."""
    _check_side("student", student_hidden, student_weight, student_bias)
    if student_weight.shape[0] == 0:
        raise ValueError("the vocabulary dimension (first) of the weights is empty")
    for name, x in (("student_weight", student_weight), ("student_bias", student_bias)):
        if x is not None and x.device != student_hidden.device:
            raise ValueError(f"{name} is on {x.device} but student_hidden is on {student_hidden.device}")


def _check_side(side, hidden, weight, bias):
    """One model's hidden states, lm_head weight and bias: dtypes and shapes."""
    check_floating(f"{side}_hidden", hidden, "hidden states")
    check_floating(f"{side}_weight", weight, "weights")
    if hidden.dim() == 0:
        raise ValueError(f"{side}_hidden must have shape (..., H), got a 0-dim tensor")
    if weight.dim() != 2:
        raise ValueError(f"{side}_weight must have shape (V, H), got {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{side}_hidden's last dimension ({hidden.shape[-1]}) must equal {side}_weight's "
            f"second ({weight.shape[1]}): the weight is (V, H) as nn.Linear stores it"
        )
    if bias is not None:
        check_floating(f"{side}_bias", bias, "biases")
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{side}_bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def _check_tensors(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels):
    for side, hidden, weight, bias in (
        ("student", student_hidden, student_weight, student_bias),
        ("teacher", teacher_hidden, teacher_weight, teacher_bias),
    ):
        _check_side(side, hidden, weight, bias)
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            "student_weight and teacher_weight must have the same vocabulary size (first "
            f"dimension), got {student_weight.shape[0]} and {teacher_weight.shape[0]}"
        )
    if student_weight.shape[0] == 0:
        raise ValueError("the vocabulary dimension (first) of the weights is empty")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            "student_hidden and teacher_hidden must have the same leading shape, got "
            f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}"
        )
    tensors = {"student_hidden": student_hidden, "student_weight": student_weight, "student_bias": student_bias,
               "teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight, "teacher_bias": teacher_bias}
    for name, x in tensors.items():
        if x is not None and x.device != student_hidden.device:
            raise ValueError(f"{name} is on {x.device} but student_hidden is on {student_hidden.device}")
    check_labels(labels, student_hidden.shape[:-1], student_hidden.device, "hidden states")
    check_has_data(student_hidden.device, "hidden states")


def _check_chunk_size(chunk_size):
    if chunk_size is None:
        return
    if not isinstance(chunk_size, numbers.Integral) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
