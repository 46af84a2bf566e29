"""PyTorch reference for the distillation losses of docs/semantics.md section 2 (not shipped
in the wheel)."""

from .akl_reference import head_size_bounds, reference_loss, reference_row_losses, reference_topk_row_losses

__all__ = ["head_size_bounds", "reference_loss", "reference_row_losses", "reference_topk_row_losses"]
