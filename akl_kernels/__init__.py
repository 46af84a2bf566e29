"""Fused knowledge-distillation losses for LLM logits: Adaptive KL, forward and reverse KL,
Jensen-Shannon, total variation and the skew KLs, on logits or on hidden states.

    from akl_kernels import akl_loss, distillation_loss
    loss = akl_loss(student_logits, teacher_logits, labels=labels)
    loss = distillation_loss(student_logits, teacher_logits, loss="jsd", beta=0.5, labels=labels)
    loss.backward()

    # from hidden states and lm_head weights, without materialising the (N, V) logits:
    from akl_kernels import fused_linear_distillation_loss
    loss = fused_linear_distillation_loss(student_hidden, student_lm_head.weight, teacher_hidden, teacher_lm_head.weight)
"""

from ._dispatch import AKLStats
from .divergences import DIVERGENCES
from .fused_linear import (
    FusedLinearAKLLoss,
    fused_linear_akl_loss,
    fused_linear_distillation_loss,
    fused_linear_fkl_loss,
    fused_linear_rkl_loss,
)
from .loss import AKLLoss, DistillationLoss, akl_loss, distillation_loss, fkl_loss, rkl_loss

# The names distillation_loss takes as loss=, in the order of the family's table.
LOSSES = tuple(DIVERGENCES)

__all__ = [
    "AKLLoss",
    "AKLStats",
    "DistillationLoss",
    "FusedLinearAKLLoss",
    "LOSSES",
    "akl_loss",
    "distillation_loss",
    "fkl_loss",
    "fused_linear_akl_loss",
    "fused_linear_distillation_loss",
    "fused_linear_fkl_loss",
    "fused_linear_rkl_loss",
    "rkl_loss",
]
__version__ = "0.1.0"
