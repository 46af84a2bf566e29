"""The losses' row computations as torch.library custom operators, so that torch.compile
captures a training step whole (docs/semantics.md section 7).

For each RowBackend (its ``name``) two operators in the ``akl_kernels`` namespace:

- ``{name}_rows(student, teacher, keep, grad_scale, <config>, reduction, forward_grad)`` ->
  ``(loss, stats, head_size, grad, state)``: the backend's row_losses and the reduction (loss
  () for "mean" and "sum", (N,) for "none"); ``grad`` is the gradient computed in the forward
  pass when forward_grad (RowBackend.forward_gradient_dtypes), else an empty tensor;
- ``{name}_row_gradient(student, teacher, keep, row_scale, state, <config>)`` -> ``grad``: the
  backend's row_gradient, which the first operator's registered backward calls otherwise;

``teacher`` is a list: ``[teacher_logits]``, or ``[logprobs, indices]`` for a
TeacherTopK. ``<config>`` is RowLossConfig field by field (mode, mu, temperature, split, stats,
w_p, w_q).

The Triton backends' operators are ``torch.library.triton_op``s: inductor traces their bodies
and sees the kernels, launched through ``wrap_triton``. Under TRITON_INTERPRET=1 the kernels are
Python functions that compile cannot trace, so there the same bodies are opaque
``custom_op``s, like the torch backends' (whose data-dependent chunking and host reads are
not traceable). Every operator has a shape function (``register_fake``); the first one's
autograd is registered here.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ._dispatch import refuse_double_backward
from ._rows import STATS_FIELDS, RowBackend, RowLossConfig, compute_dtype, is_traced
from .divergences import LossMode
from .teacher_topk import TeacherTopK
from .torch_backend import TORCH_BACKEND, TORCH_SPARSE_BACKEND

NAMESPACE = "akl_kernels"


def config_args(config: RowLossConfig) -> tuple:
    """RowLossConfig as the operators take it: (mode, mu, temperature, split, stats, w_p, w_q)."""
    return (int(config.mode), config.mu, config.temperature, config.split, config.stats, *config.mixture)


def op_config(mode, mu, temperature, split, stats, w_p, w_q) -> RowLossConfig:
    """The RowLossConfig of config_args' tuple."""
    return RowLossConfig(LossMode(mode), mu, temperature, split, stats, (w_p, w_q))


def row_backend_named(name: str) -> RowBackend:
    """The RowBackend whose operators are {name}_*."""
    return ROW_BACKENDS[name]


def _teacher(tensors):
    """The backends' teacher from the operators' list: logits, or a TeacherTopK."""
    return tensors[0] if len(tensors) == 1 else TeacherTopK(*tensors)


def _empty(like):
    return like.new_empty(0)


def row_losses(row_backend: RowBackend, student, teacher, keep, grad_scale, config, reduction, forward_grad):
    """(loss, stats, head_size) through row_backend's operator; differentiable in student."""
    tensors = list(teacher) if isinstance(teacher, TeacherTopK) else [teacher]
    op = getattr(torch.ops.akl_kernels, f"{row_backend.name}_rows")
    loss, stats, head_size, _grad, _state = op(
        student, tensors, keep, grad_scale, *config_args(config), reduction, forward_grad
    )
    return loss, stats, head_size


def _define_row_ops(row_backend: RowBackend, traceable: bool):
    """Define, give shapes to, and register the autograd of row_backend's two operators."""
    name = row_backend.name
    define = (
        (lambda qualname, fn: torch.library.triton_op(qualname, fn, mutates_args=()))
        if traceable
        else (lambda qualname, fn: torch.library.custom_op(qualname, fn, mutates_args=()))
    )

    def rows(
        student: torch.Tensor, teacher: list[torch.Tensor], keep: Optional[torch.Tensor], grad_scale: torch.Tensor,
        mode: int, mu: float, temperature: float, split: bool, stats: bool, w_p: float, w_q: float,
        reduction: str, forward_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        config = op_config(mode, mu, temperature, split, stats, w_p, w_q)
        result = row_backend.row_losses(student, _teacher(teacher), keep, grad_scale, config, forward_grad)
        # grad_scale is 1 / kept rows for "mean" and 1 for "sum".
        loss = result.loss if reduction == "none" else result.loss.sum() * grad_scale
        grad = result.grad if forward_grad else _empty(student)
        return loss, result.stats, result.head_size, grad, result.state

    def row_gradient(
        student: torch.Tensor, teacher: list[torch.Tensor], keep: Optional[torch.Tensor], row_scale: torch.Tensor,
        state: torch.Tensor, mode: int, mu: float, temperature: float, split: bool, stats: bool, w_p: float,
        w_q: float,
    ) -> torch.Tensor:
        config = op_config(mode, mu, temperature, split, stats, w_p, w_q)
        return row_backend.row_gradient(student, _teacher(teacher), keep, row_scale, state, config)

    rows_op = define(f"{NAMESPACE}::{name}_rows", rows)
    gradient_op = define(f"{NAMESPACE}::{name}_row_gradient", row_gradient)
    if traceable:
        return  # triton_op's shapes come from tracing its body; its autograd follows below

    @rows_op.register_fake
    def _(student, teacher, keep, grad_scale, mode, mu, temperature, split, stats, w_p, w_q, reduction, forward_grad):
        n_rows = student.numel() // student.shape[-1]
        dtype = compute_dtype(student.dtype, teacher[0].dtype)
        return (
            student.new_empty(() if reduction != "none" else (n_rows,), dtype=dtype),
            student.new_empty((len(STATS_FIELDS), n_rows), dtype=dtype),
            student.new_empty((n_rows,), dtype=torch.int64),
            student.new_empty(student.shape) if forward_grad else _empty(student),
            student.new_empty((n_rows, row_backend.state_columns(_teacher(teacher))), dtype=dtype),
        )

    @gradient_op.register_fake
    def _(student, teacher, keep, row_scale, state, *config):
        return student.new_empty(student.shape)


def _register_row_autograd(row_backend: RowBackend):
    """Autograd of {name}_rows: the saved forward gradient scaled by grad_output, or
    {name}_row_gradient with grad_output folded into each row's factor before the one rounding
    to the student's dtype (what keeps float16 gradients under loss scaling). A further
    backward through a retained graph takes the second way. Double backward is refused."""
    gradient_op = getattr(torch.ops.akl_kernels, f"{row_backend.name}_row_gradient")

    def setup_context(ctx, inputs, output):
        student, teacher, keep, grad_scale, *config, reduction, forward_grad = inputs
        _loss, stats, head_size, grad, state = output
        # Only the loss is differentiable: no vocabulary-sized zeros are made for the gradient
        # of the forward-gradient output (or of the others) in backward.
        ctx.mark_non_differentiable(stats, head_size, grad, state)
        ctx.set_materialize_grads(False)
        ctx.grad = grad if forward_grad else None
        ctx.config = config
        ctx.save_for_backward(student, keep, grad_scale, state, *teacher)

    def backward(ctx, grad_loss, _stats, _head_size, _grad, _state):
        refuse_double_backward()
        student, keep, grad_scale, state, *teacher = ctx.saved_tensors
        no_grads = [None] * len(teacher)
        if grad_loss is None:  # undefined: a zero gradient
            return None, no_grads, None, None, *[None] * 7, None, None
        grad, ctx.grad = ctx.grad, None
        n_rows = student.numel() // student.shape[-1]
        if grad is not None:
            grad = scale_forward_gradient(grad, grad_loss, keep)
        else:
            # d loss / d loss_i = grad_output (per row for "none") times the reduction's factor.
            if grad_loss.dim() == 0:
                row_scale = (grad_loss.to(grad_scale.dtype) * grad_scale).expand(n_rows)
            else:
                row_scale = grad_loss.reshape(-1).to(grad_scale.dtype)
            grad = gradient_op(student, teacher, keep, row_scale, state, *ctx.config)
        return grad, no_grads, None, None, *[None] * 7, None, None

    torch.library.register_autograd(
        f"{NAMESPACE}::{row_backend.name}_rows", backward, setup_context=setup_context
    )


def scale_forward_gradient(grad, grad_loss, keep):
    """grad * grad_loss for a gradient computed in forward (already scaled for the reduction):
    grad_loss 0-dim (reductions "mean", "sum") or (N,), one factor per row of grad (..., V)
    (reduction "none"; ignored rows stay exactly 0 whatever their factor holds, no 0 * NaN).

    In eager, in place, and skipped when a 0-dim grad_loss is 1 (the usual loss.backward()), so
    that no second vocabulary-sized tensor is made. While torch.compile (or opcheck) traces the
    backward, grad_loss is a fake or functional tensor with no value to read: the product is then
    written functionally, for inductor to fuse.
    """
    traced = is_traced(grad_loss)
    if grad_loss.dim() == 0:
        if traced:
            return grad * grad_loss.to(grad.dtype)
        factor = float(grad_loss)  # one host sync; a Python scalar keeps full precision
        if factor != 1.0:
            grad.mul_(factor)
        return grad
    rows = grad.view(-1, grad.shape[-1])  # (N, V)
    row_scale = grad_loss.reshape(-1, 1)
    if keep is not None:
        row_scale = torch.where(keep[:, None], row_scale, 0.0)
    if traced:
        if grad.dtype in (torch.float16, torch.bfloat16):
            return (rows.float() * row_scale.float()).to(grad.dtype).view(grad.shape)
        return (rows * row_scale.to(grad.dtype)).view(grad.shape)
    if rows.dtype in (torch.float32, torch.float64):
        rows.mul_(row_scale.to(rows.dtype))
        return grad
    # bfloat16: multiply in float32, a chunk of rows at a time, and round once.
    rows_per_chunk = max(1, (1 << 20) // max(rows.shape[1], 1))
    for part, scale in zip(rows.split(rows_per_chunk), row_scale.split(rows_per_chunk)):
        part.copy_(part.float().mul_(scale.float()))
    return grad


def _triton_backends():
    """The Triton RowBackends, or () without the triton package."""
    try:
        from .triton_backend import TRITON_BACKEND
        from .triton_sparse import TRITON_SPARSE_BACKEND
    except ImportError:
        return ()
    return TRITON_BACKEND, TRITON_SPARSE_BACKEND


def _define_all():
    """Define every backend's operators; {name: RowBackend}."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    backends = {TORCH_BACKEND: False, TORCH_SPARSE_BACKEND: False}
    backends.update((backend, not interpreted) for backend in _triton_backends())
    for backend, traceable in backends.items():
        _define_row_ops(backend, traceable)
        _register_row_autograd(backend)
    return {backend.name: backend for backend in backends}


# Every RowBackend by name, its operators defined.
ROW_BACKENDS = _define_all()
