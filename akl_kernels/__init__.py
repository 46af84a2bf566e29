"""Fused knowledge-distillation losses for LLM logits: Adaptive KL, forward and reverse KL,
Jensen-Shannon, total variation and the skew KLs, on logits or on hidden states.

    from akl_kernels import akl_loss, distillation_loss
    loss = akl_loss(student_logits, teacher_logits, labels=labels)
    loss = distillation_loss(student_logits, teacher_logits, loss="jsd", beta=0.5, labels=labels)
    loss.backward()

    # from hidden states and lm_head weights, without materialising the (N, V) logits:
    from akl_kernels import fused_linear_distillation_loss
    loss = fused_linear_distillation_loss(student_hidden, student_lm_head.weight, teacher_hidden, teacher_lm_head.weight)

    # offline, from the teacher's k most probable tokens, stored once:
    from akl_kernels import teacher_topk
    stored = teacher_topk(teacher_logits, 32)   # TeacherTopK(logprobs, indices), (..., 32) each
    loss = akl_loss(student_logits, stored, labels=labels)
"""

from ._dispatch import AKLStats
from .divergences import DIVERGENCES
from .fused_linear import (
    FusedLinearAKLLoss,
    fused_linear_akl_loss,
    fused_linear_cross_entropy,
    fused_linear_distillation_loss,
    fused_linear_fkl_loss,
    fused_linear_rkl_loss,
)
from .loss import AKLLoss, DistillationLoss, akl_loss, distillation_loss, fkl_loss, rkl_loss
from .teacher_topk import TeacherTopK, teacher_topk, teacher_topk_from_hidden

# The names distillation_loss takes as loss=, in the order of the family's table.
LOSSES = tuple(DIVERGENCES)

__all__ = [
    "AKLLoss",
    "AKLStats",
    "DistillationLoss",
    "FusedLinearAKLLoss",
    "LOSSES",
    "TeacherTopK",
    "akl_loss",
    "distillation_loss",
    "fkl_loss",
    "fused_linear_akl_loss",
    "fused_linear_cross_entropy",
    "fused_linear_distillation_loss",
    "fused_linear_fkl_loss",
    "fused_linear_rkl_loss",
    "rkl_loss",
    "teacher_topk",
    "teacher_topk_from_hidden",
]
__version__ = "0.1.0"
