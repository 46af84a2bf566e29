"""The losses on logits: distillation_loss, DistillationLoss, the named akl_loss, fkl_loss,
rkl_loss and AKLLoss.

Arguments are checked by ``_validation.py``; ``_dispatch.py`` picks the backend (``_rows.py``
says what a backend computes) and shapes the results; ``_ops.py`` runs the backend's rows as a
custom operator with its registered autograd (what torch.compile captures).
"""

from __future__ import annotations

import math

import torch

from ._dispatch import (
    STATS_MU,
    keep_mask,
    reduction_grad_scale,
    row_config,
    select_backend,
    shape_result,
)
from ._ops import row_losses
from ._rows import compute_dtype
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


def distillation_loss(
    student_logits,
    teacher_logits,
    *,
    loss="akl",
    mu=STATS_MU,
    beta=None,
    alpha=None,
    temperature=1.0,
    labels=None,
    ignore_index=-100,
    reduction="mean",
    return_stats=False,
    backend="auto",
):
    """One of the family's divergences between teacher and student next-token distributions.

    Per row: p = softmax(teacher / T), q = softmax(student / T), and the divergence named by
    `loss` (README "The loss family"; docs/semantics.md section 2 has the exact rules):
    "akl" Adaptive KL (Wu et al., arXiv 2404.02657), "fkl" KL(p||q), "rkl" KL(q||p), "jsd"
    generalised Jensen-Shannon (beta), "tvd" total variation, "skl" / "srkl" the skew KLs of
    DistiLLM (alpha).

    Args:
        student_logits: (..., V) float16/bfloat16/float32/float64; receives the gradient.
        teacher_logits: (..., V), same shape and device; any of the same dtypes; no gradient.
        loss: the divergence's name.
        mu: head mass, 0 < mu <= 1: AKL's split, and the split of every loss's statistics.
        beta: "jsd" only, in (0, 1), default 0.5. alpha: "skl" / "srkl" only, in (0, 1],
            default 0.1. Passing either to another loss is an error.
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
    family = divergence(loss)
    parameter = resolve_parameter(family, beta=beta, alpha=alpha)
    return _distillation_loss(
        family, parameter, student_logits, teacher_logits, mu, temperature, labels, ignore_index,
        reduction, return_stats, backend,
    )


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
    """Adaptive KL (Wu et al., arXiv 2404.02657): distillation_loss(..., loss="akl").

    Per row: p = softmax(teacher / T), q = softmax(student / T); the teacher's vocabulary is split
    into a head (the longest prefix, in descending-probability order, whose mass stays <= mu) and
    a tail; loss = w_head * KL(p||q) + w_tail * KL(q||p) with weights proportional to the
    student's gap sum|p - q| in each part. Arguments and returns as distillation_loss.
    """
    return _distillation_loss(
        DIVERGENCES["akl"], 0.0, student_logits, teacher_logits, mu, temperature, labels, ignore_index,
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
        DIVERGENCES["fkl"], 0.0, student_logits, teacher_logits, STATS_MU, temperature, labels,
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
        DIVERGENCES["rkl"], 0.0, student_logits, teacher_logits, STATS_MU, temperature, labels,
        ignore_index, reduction, return_stats, backend,
    )


class DistillationLoss(torch.nn.Module):
    """nn.Module form of distillation_loss: holds its keyword arguments, checked when constructed.

    forward(student_logits, teacher_logits, labels=None) returns what distillation_loss returns.
    """

    def __init__(
        self,
        *,
        loss="akl",
        mu=STATS_MU,
        beta=None,
        alpha=None,
        temperature=1.0,
        ignore_index=-100,
        reduction="mean",
        return_stats=False,
        backend="auto",
    ):
        super().__init__()
        self.loss = loss
        self.parameter = resolve_parameter(divergence(loss), beta=beta, alpha=alpha)
        check_options(mu, temperature, ignore_index, reduction, return_stats, backend)
        self.mu = mu
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.return_stats = return_stats
        self.backend = backend

    def forward(self, student_logits, teacher_logits, labels=None):
        return _distillation_loss(
            DIVERGENCES[self.loss], self.parameter, student_logits, teacher_logits, self.mu, self.temperature,
            labels, self.ignore_index, self.reduction, self.return_stats, self.backend,
        )

    def extra_repr(self):
        family = DIVERGENCES[self.loss]
        parameter = f", {family.parameter}={self.parameter}" if family.parameter else ""
        return (
            f"loss={self.loss!r}{parameter}, mu={self.mu}, temperature={self.temperature}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"return_stats={self.return_stats}, backend={self.backend!r}"
        )


class AKLLoss(DistillationLoss):
    """nn.Module form of akl_loss: DistillationLoss(loss="akl", ...)."""

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
        super().__init__(
            loss="akl", mu=mu, temperature=temperature, ignore_index=ignore_index, reduction=reduction,
            return_stats=return_stats, backend=backend,
        )


def _distillation_loss(
    family, parameter, student, teacher, mu, temperature, labels, ignore_index, reduction, return_stats, backend
):
    sparse = isinstance(teacher, TeacherTopK)
    if sparse:
        _check_student(student, labels)
    else:
        _check_tensors(student, teacher, labels)
    check_options(mu, temperature, ignore_index, reduction, return_stats, backend)
    dtype = compute_dtype(student.dtype, teacher.logprobs.dtype if sparse else teacher.dtype)
    check_temperature_range(temperature, dtype)
    row_backend = select_backend(backend, student.device, sparse=sparse)

    leading_shape = student.shape[:-1]
    keep = keep_mask(labels, ignore_index)
    if sparse:
        check_teacher_topk(teacher, leading_shape, student.shape[-1], student.device, keep)
    if student.dim() == 1:  # a single row
        student = student.unsqueeze(0)
        teacher = TeacherTopK(*(x.unsqueeze(0) for x in teacher)) if sparse else teacher.unsqueeze(0)
    kept_rows = math.prod(leading_shape) if keep is None else keep.sum()  # (math.prod: no guard on sizes)
    grad_scale = reduction_grad_scale(reduction, kept_rows, dtype, student.device)
    config = row_config(family, parameter, mu, temperature, return_stats)
    # The gradient in the forward pass where the backend computes it cheapest there (_rows.py).
    forward_grad = (
        torch.is_grad_enabled() and student.requires_grad and student.dtype in row_backend.forward_gradient_dtypes
    )
    loss, stats, head_size = row_losses(row_backend, student, teacher, keep, grad_scale, config, reduction, forward_grad)
    return shape_result(loss, stats, head_size, leading_shape, reduction, return_stats)


def _check_student(student, labels):
    """The checks of the student logits alone (a TeacherTopK teacher is checked on its own)."""
    check_floating("student_logits", student, "logits")
    if student.dim() == 0:
        raise ValueError("student_logits must have shape (..., V), got a 0-dim tensor")
    if student.shape[-1] == 0:
        raise ValueError("the vocabulary dimension (last) of the logits is empty")
    check_labels(labels, student.shape[:-1], student.device, "logits")
    check_has_data(student.device, "logits")


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
