"""Fused knowledge-distillation losses (Adaptive KL, forward KL, reverse KL) for LLM logits.

    from akl_kernels import akl_loss
    loss = akl_loss(student_logits, teacher_logits, labels=labels)
    loss.backward()
"""

from .loss import AKLLoss, AKLStats, akl_loss, fkl_loss, rkl_loss

__all__ = ["AKLLoss", "AKLStats", "akl_loss", "fkl_loss", "rkl_loss"]
__version__ = "0.1.0"
