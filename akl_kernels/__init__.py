"""Fused knowledge-distillation losses (Adaptive KL, forward KL, reverse KL) for LLM logits.

    from akl_kernels import akl_loss
    loss = akl_loss(student_logits, teacher_logits, labels=labels)
    loss.backward()

    # from hidden states and lm_head weights, without materialising the (N, V) logits:
    from akl_kernels import fused_linear_akl_loss
    loss = fused_linear_akl_loss(student_hidden, student_lm_head.weight, teacher_hidden, teacher_lm_head.weight)
"""

from ._dispatch import AKLStats
from .fused_linear import FusedLinearAKLLoss, fused_linear_akl_loss, fused_linear_fkl_loss, fused_linear_rkl_loss
from .loss import AKLLoss, akl_loss, fkl_loss, rkl_loss

__all__ = [
    "AKLLoss",
    "AKLStats",
    "FusedLinearAKLLoss",
    "akl_loss",
    "fkl_loss",
    "fused_linear_akl_loss",
    "fused_linear_fkl_loss",
    "fused_linear_rkl_loss",
    "rkl_loss",
]
__version__ = "0.1.0"
