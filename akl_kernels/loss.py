"""Public loss functions: validation, backend dispatch, reductions and the autograd Function.

Every backend computes per-row losses and the gradient in the forward pass (see ``_rows.py``);
this module is the one place that checks inputs, chooses the backend and reduces over rows.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import NamedTuple

import torch

from ._rows import LossMode, RowBackend, RowLossConfig, compute_dtype
from .torch_backend import TORCH_BACKEND

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")

# fkl_loss and rkl_loss have no mu; their head/tail statistics use the paper's value.
STATS_MU = 0.5


class AKLStats(NamedTuple):
    """Detached per-row diagnostics, each of the logits' leading shape (0 at ignored rows).

    fkl, rkl: KL(p||q) and KL(q||p). head_gap, tail_gap: sum of |p - q| over the teacher's head
    and tail at mu. head_weight, tail_weight: the weights applied to FKL and RKL. head_size:
    number of head tokens (int64). For fkl_loss / rkl_loss the split uses mu = 0.5.
    """

    fkl: torch.Tensor
    rkl: torch.Tensor
    head_gap: torch.Tensor
    tail_gap: torch.Tensor
    head_weight: torch.Tensor
    tail_weight: torch.Tensor
    head_size: torch.Tensor


def akl_loss(
    student_logits,
    teacher_logits,
    *,
    mu=0.5,
    temperature=1.0,
    labels=None,
    ignore_index=-100,
    reduction="mean",
    return_stats=False,
    backend="auto",
):
    """Adaptive KL (Wu et al., arXiv 2404.02657) between teacher and student next-token distributions.

    Per row: p = softmax(teacher / T), q = softmax(student / T); the teacher's vocabulary is split
    into a head (the longest prefix, in descending-probability order, whose mass stays <= mu) and
    a tail; loss = w_head * KL(p||q) + w_tail * KL(q||p) with weights proportional to the
    student's gap sum|p - q| in each part. See SPEC.md section 2 for the exact rules.

    Args:
        student_logits: (..., V) float16/bfloat16/float32/float64; receives the gradient.
        teacher_logits: (..., V), same shape and device; any of the same dtypes; no gradient.
        mu: head mass, 0 < mu <= 1.
        temperature: T > 0 and finite; no T^2 factor is applied.
        labels: optional integer tensor of the leading shape; rows with labels == ignore_index
            contribute 0 and get a zero gradient.
        ignore_index: label value of ignored rows.
        reduction: "mean" (over kept rows; 0 when none is kept), "sum" or "none".
        return_stats: also return an AKLStats of detached per-row diagnostics.
        backend: "auto" (Triton for CUDA tensors, else "torch"), "triton" or "torch".

    Returns:
        The loss (float32, or float64 for float64 inputs), or (loss, AKLStats).
    """
    return _distillation_loss(
        LossMode.AKL, student_logits, teacher_logits, mu, temperature, labels, ignore_index,
        reduction, return_stats, backend,
    )


def fkl_loss(
    student_logits,
    teacher_logits,
    *,
    temperature=1.0,
    labels=None,
    ignore_index=-100,
    reduction="mean",
    return_stats=False,
    backend="auto",
):
    """Forward KL, KL(p||q) per row; arguments and returns as akl_loss (statistics at mu = 0.5)."""
    return _distillation_loss(
        LossMode.FKL, student_logits, teacher_logits, STATS_MU, temperature, labels,
        ignore_index, reduction, return_stats, backend,
    )


def rkl_loss(
    student_logits,
    teacher_logits,
    *,
    temperature=1.0,
    labels=None,
    ignore_index=-100,
    reduction="mean",
    return_stats=False,
    backend="auto",
):
    """Reverse KL, KL(q||p) per row; arguments and returns as akl_loss (statistics at mu = 0.5)."""
    return _distillation_loss(
        LossMode.RKL, student_logits, teacher_logits, STATS_MU, temperature, labels,
        ignore_index, reduction, return_stats, backend,
    )


class AKLLoss(torch.nn.Module):
    """nn.Module form of akl_loss: holds its keyword arguments, checked when constructed.

    forward(student_logits, teacher_logits, labels=None) returns what akl_loss returns.
    """

    def __init__(
        self,
        *,
        mu=0.5,
        temperature=1.0,
        ignore_index=-100,
        reduction="mean",
        return_stats=False,
        backend="auto",
    ):
        super().__init__()
        check_options(mu, temperature, ignore_index, reduction, return_stats, backend)
        self.mu = mu
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.return_stats = return_stats
        self.backend = backend

    def forward(self, student_logits, teacher_logits, labels=None):
        return akl_loss(
            student_logits,
            teacher_logits,
            mu=self.mu,
            temperature=self.temperature,
            labels=labels,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            return_stats=self.return_stats,
            backend=self.backend,
        )

    def extra_repr(self):
        return (
            f"mu={self.mu}, temperature={self.temperature}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}, return_stats={self.return_stats}, backend={self.backend!r}"
        )


def _distillation_loss(
    mode, student, teacher, mu, temperature, labels, ignore_index, reduction, return_stats, backend
):
    _check_tensors(student, teacher, labels)
    check_options(mu, temperature, ignore_index, reduction, return_stats, backend)
    dtype = compute_dtype(student.dtype, teacher.dtype)
    check_temperature_range(temperature, dtype)
    row_backend = select_backend(backend, student.device)

    leading_shape = student.shape[:-1]
    if student.dim() == 1:  # a single row
        student, teacher = student.unsqueeze(0), teacher.unsqueeze(0)
    keep = keep_mask(labels, ignore_index)
    kept_rows = leading_shape.numel() if keep is None else keep.sum()
    grad_scale = reduction_grad_scale(reduction, kept_rows, dtype, student.device)
    config = row_config(mode, mu, temperature, return_stats)
    compute_grad = torch.is_grad_enabled() and student.requires_grad
    loss, stats, head_size = _DistillationLoss.apply(
        student, teacher, keep, grad_scale, config, reduction, row_backend, compute_grad
    )
    return shape_result(loss, stats, head_size, leading_shape, reduction, return_stats)


def row_config(mode, mu, temperature, return_stats) -> RowLossConfig:
    """The backends' configuration of one call (the head/tail split for AKL or for statistics)."""
    return RowLossConfig(
        mode=LossMode(mode),
        mu=float(mu),
        temperature=float(temperature),
        split=mode == LossMode.AKL or bool(return_stats),
        stats=bool(return_stats),
    )


def reduction_grad_scale(reduction, kept_rows, dtype, device) -> torch.Tensor:
    """0-dim factor folded into the gradient: 1 / kept rows (at least 1) for "mean", else 1.

    kept_rows: an int or a 0-dim tensor (left on the device, so no host sync).
    """
    if reduction != "mean":
        return torch.ones((), dtype=dtype, device=device)
    return 1.0 / torch.as_tensor(kept_rows, device=device).to(dtype).clamp(min=1)


def shape_result(loss, stats, head_size, leading_shape, reduction, return_stats):
    """What the public losses return: the loss (per row in the leading shape for "none"), and
    with return_stats an AKLStats of per-row tensors of the leading shape."""
    if reduction == "none":
        loss = loss.reshape(leading_shape)
    if not return_stats:
        return loss
    per_row = [value.reshape(leading_shape) for value in stats]
    return loss, AKLStats(*per_row, head_size.reshape(leading_shape))


class _DistillationLoss(torch.autograd.Function):
    """Reduced loss of the backend's per-row losses, with the backend's analytic gradient.

    The gradient comes from one of two places (RowBackend.forward_gradient_dtypes says which):
    computed in forward, already scaled for the reduction, and multiplied by grad_output in
    place in backward (skipped when it is 1), so that no second vocabulary-sized tensor is
    made; or computed in backward by row_gradient, with grad_output folded into each row's
    factor before the one rounding to the student's dtype (what keeps float16 gradients under
    loss scaling), from the saved inputs and per-row state. A further backward through a
    retained graph takes the second way. Double backward is refused.
    """

    @staticmethod
    def forward(ctx, student, teacher, keep, grad_scale, config, reduction, row_backend, compute_grad):
        in_forward = compute_grad and student.dtype in row_backend.forward_gradient_dtypes
        rows = row_backend.row_losses(student, teacher, keep, grad_scale, config, in_forward)
        if reduction == "none":
            loss = rows.loss
        else:
            # grad_scale is 1 / kept rows for "mean" and 1 for "sum".
            loss = rows.loss.sum() * grad_scale
        ctx.grad = rows.grad
        ctx.config = config
        ctx.row_backend = row_backend
        ctx.save_for_backward(student, teacher, keep, grad_scale, rows.state)
        ctx.mark_non_differentiable(rows.stats, rows.head_size)
        return loss, rows.stats, rows.head_size

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats, _grad_head_size):
        refuse_double_backward()
        grad, ctx.grad = ctx.grad, None
        student, teacher, keep, grad_scale, state = ctx.saved_tensors
        vocab = student.shape[-1]
        n_rows = student.numel() // vocab
        if grad is None:
            # d loss / d loss_i = grad_output (per row for "none") times the reduction's factor.
            row_scale = (grad_loss.to(grad_scale.dtype) * grad_scale).expand(n_rows) if grad_loss.dim() == 0 \
                else grad_loss.reshape(-1).to(grad_scale.dtype)
            grad = ctx.row_backend.row_gradient(student, teacher, keep, row_scale, state, ctx.config)
        elif grad_loss.dim() == 0:
            factor = float(grad_loss)  # one host sync; a Python scalar keeps full precision
            if factor != 1.0:
                grad.mul_(factor)
        else:
            _scale_rows_(grad.view(n_rows, vocab), grad_loss.reshape(-1), keep)
        return grad, None, None, None, None, None, None, None


def refuse_double_backward():
    """RuntimeError when a backward pass runs with create_graph=True (grad mode on inside it):
    the gradient comes from a kernel, so it has no graph of its own to differentiate."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "akl_kernels losses do not support double backward (create_graph=True): their "
            "gradient is computed by a kernel, not by differentiable operations, so a "
            "gradient penalty or Hessian through them would silently be wrong"
        )


def _scale_rows_(grad, row_scale, keep):
    """grad[i, :] *= row_scale[i] in place, for (N, V) grad and (N,) row_scale.

    Ignored rows stay exactly 0 whatever their scale holds (no 0 * NaN).
    """
    if keep is not None:
        row_scale = torch.where(keep, row_scale, 0.0)
    row_scale = row_scale[:, None]
    if grad.dtype in (torch.float32, torch.float64):
        grad.mul_(row_scale.to(grad.dtype))
        return
    # bfloat16: multiply in float32, a chunk of rows at a time, and round once.
    rows_per_chunk = max(1, (1 << 20) // max(grad.shape[1], 1))
    for rows, scale in zip(grad.split(rows_per_chunk), row_scale.split(rows_per_chunk)):
        rows.copy_(rows.float().mul_(scale.float()))


def select_backend(backend, device) -> RowBackend:
    """The RowBackend for `backend` on `device` (README "Use": backend)."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend == "torch":
        return TORCH_BACKEND
    if not _triton_available():
        raise ImportError("backend='triton' needs the triton package (pip install triton)")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' got CPU tensors: move them to a CUDA device, or set "
            "TRITON_INTERPRET=1 before triton is imported to run the kernels in Triton's "
            "interpreter (slow; for tests), or use backend='torch'"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend='triton' runs on CUDA tensors, got a tensor on {device}")
    from .triton_backend import TRITON_BACKEND

    return TRITON_BACKEND


def _triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check_tensors(student, teacher, labels):
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        check_floating(name, x, "logits")
        if x.dim() == 0:
            raise ValueError(f"{name} must have shape (..., V), got a 0-dim tensor")
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            "student_logits and teacher_logits must have the same vocabulary size (last "
            f"dimension), got {student.shape[-1]} and {teacher.shape[-1]}"
        )
    if student.shape != teacher.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same leading shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.shape[-1] == 0:
        raise ValueError("the vocabulary dimension (last) of the logits is empty")
    if student.device != teacher.device:
        raise ValueError(
            f"student_logits is on {student.device} but teacher_logits is on {teacher.device}"
        )
    check_labels(labels, student.shape[:-1], student.device, "logits")
    check_has_data(student.device, "logits")


def check_floating(name, x, what):
    """TypeError unless x is a dense (strided) tensor of one of the supported floating dtypes."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(
            f"{name} must be a dense tensor, got layout {x.layout}: sparse {what} are not "
            "supported (x.to_dense() makes a dense copy)"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must hold float16, bfloat16, float32 or float64 {what}, got {x.dtype}")


def check_has_data(device, inputs):
    """ValueError for meta tensors (shapes without values): the losses read every value."""
    if device.type == "meta":
        raise ValueError(
            f"the {inputs} are meta tensors (device 'meta'), which hold no values to compute a "
            "loss from: materialise them on a real device first"
        )


def check_labels(labels, leading_shape, device, inputs):
    """Errors unless labels is None or an integer tensor of `leading_shape` on `device`.

    `inputs` names the tensors whose leading shape that is ("logits", "hidden states").
    """
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != leading_shape:
        raise ValueError(
            f"labels must have the {inputs}' leading shape {tuple(leading_shape)}, got {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the {inputs} are on {device}")


def keep_mask(labels, ignore_index):
    """(N,) bool, labels != ignore_index compared as integers, or None without labels.

    A label dtype that cannot hold ignore_index (uint8 labels and -100, int32 labels and
    2**32) never matches it: every row is kept, where a comparison in the labels' own dtype
    would wrap ignore_index around to one of their values.
    """
    if labels is None:
        return None
    info = torch.iinfo(labels.dtype)
    if not info.min <= ignore_index <= info.max:
        return torch.ones(labels.numel(), dtype=torch.bool, device=labels.device)
    return (labels != ignore_index).reshape(-1)


def check_options(mu, temperature, ignore_index, reduction, return_stats, backend):
    """Errors for keyword arguments outside their domains (README "Use": keyword arguments)."""
    _check_number("mu", mu, "in (0, 1]", lambda x: 0.0 < x <= 1.0)
    _check_number("temperature", temperature, "> 0 and finite", lambda x: math.isfinite(x) and x > 0)
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not INT64_MIN <= ignore_index <= INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64 (labels are integers), got {ignore_index}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be True or False, got {return_stats!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_temperature_range(temperature, dtype):
    """ValueError when 2 / T overflows the compute dtype (T below about 5.9e-39 in float32): the
    kernels scale logits by log2(e) / T."""
    if float(temperature) * torch.finfo(dtype).max < 2.0:
        raise ValueError(
            f"temperature {temperature!r} is too small for {dtype} arithmetic: 2 / T must be "
            f"finite (T >= {2.0 / torch.finfo(dtype).max:.3g})"
        )


def _check_number(name, value, domain, holds):
    """TypeError for a tensor (a Python number is needed: no host sync, no gradient to it),
    ValueError for anything else that is not a real number in the domain."""
    if isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name} must be a Python number {domain}, got a tensor ({value!r}); pass float({name})"
        )
    if not _is_real(value) or not holds(float(value)):
        raise ValueError(f"{name} must be a Python number {domain}, got {value!r}")


def _is_real(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)
