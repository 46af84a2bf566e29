"""What the logits and hidden-state losses share past validation: the backend for a device, the
rows' configuration, which rows count, the reduction's gradient factor, the shape of results,
and the refusal of double backward.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from ._rows import RowBackend, RowLossConfig
from .divergences import Divergence, LossMode
from .torch_backend import TORCH_BACKEND, TORCH_SPARSE_BACKEND

# fkl_loss and rkl_loss have no mu; their head/tail statistics use the paper's value, and so
# does distillation_loss unless mu is given.
STATS_MU = 0.5


class AKLStats(NamedTuple):
    """Detached per-row diagnostics, each of the logits' leading shape (0 at ignored rows).

    fkl, rkl: KL(p||q) and KL(q||p), whatever the loss. head_gap, tail_gap: sum of |p - q| over
    the teacher's head and tail at mu. head_weight, tail_weight: the weights the loss applies to
    FKL and RKL ((1, 0) for "fkl", (0, 1) for "rkl", (0, 0) for the losses that are neither).
    head_size: number of head tokens (int64). For fkl_loss / rkl_loss the split uses mu = 0.5.
    """

    fkl: torch.Tensor
    rkl: torch.Tensor
    head_gap: torch.Tensor
    tail_gap: torch.Tensor
    head_weight: torch.Tensor
    tail_weight: torch.Tensor
    head_size: torch.Tensor


def row_config(loss: Divergence, parameter, mu, temperature, return_stats) -> RowLossConfig:
    """The backends' configuration of one call (the head/tail split for AKL or for statistics);
    parameter: the loss's beta or alpha (divergences.resolve_parameter)."""
    return RowLossConfig(
        mode=loss.mode,
        mu=float(mu),
        temperature=float(temperature),
        split=loss.mode == LossMode.AKL or bool(return_stats),
        stats=bool(return_stats),
        mixture=loss.mixture(parameter) if loss.mixture else (0.0, 0.0),
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


def refuse_double_backward():
    """RuntimeError when a backward pass runs with create_graph=True (grad mode on inside it):
    the gradient comes from a kernel, so it has no graph of its own to differentiate."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "akl_kernels losses do not support double backward (create_graph=True): their "
            "gradient is computed by a kernel, not by differentiable operations, so a "
            "gradient penalty or Hessian through them would silently be wrong"
        )


def select_backend(backend, device, sparse=False) -> RowBackend:
    """The RowBackend for `backend` on `device` (README "Use": backend); sparse: the one for a
    TeacherTopK teacher."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend == "torch":
        return TORCH_SPARSE_BACKEND if sparse else TORCH_BACKEND
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
    if sparse:
        from .triton_sparse import TRITON_SPARSE_BACKEND

        return TRITON_SPARSE_BACKEND
    from .triton_backend import TRITON_BACKEND

    return TRITON_BACKEND


def _triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
