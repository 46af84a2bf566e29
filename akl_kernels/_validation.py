"""Checks of the public losses' arguments, shared by the logits and the hidden-state forms.

Each raises TypeError or ValueError with a message that says what was expected (the bad inputs
of docs/semantics.md section 3).
"""

from __future__ import annotations

import math
import numbers

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")


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


def check_options(mu, temperature, ignore_index, reduction, return_stats, backend):
    """Errors for keyword arguments outside their domains (README "Use": keyword arguments)."""
    check_number("mu", mu, "in (0, 1]", lambda x: 0.0 < x <= 1.0)
    check_number("temperature", temperature, "> 0 and finite", lambda x: 0 < x < math.inf)  # NaN fails too
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


def check_number(name, value, domain, holds, why=""):
    """TypeError for a tensor (a Python number is needed: no host sync, no gradient to it),
    ValueError for anything else that is not a real number in the domain (`why`, when given,
    is added to its message)."""
    if isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name} must be a Python number {domain}, got a tensor ({value!r}); pass float({name})"
        )
    if not _is_real(value) or not holds(float(value)):
        raise ValueError(f"{name} must be a Python number {domain}, got {value!r}" + (f": {why}" if why else ""))


def _is_real(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


# exp(logprobs) of a row may sum a little above 1 after rounding; more than this is an error.
LOGPROB_MASS_LIMIT = 1.01


def check_teacher_topk(teacher, leading_shape, vocab, device, keep):
    """Errors for a TeacherTopK that does not fit student rows of `leading_shape` and V = vocab
    (docs/semantics.md rule 38); keep (N,) bool or None says which rows' mass is checked.

    The value checks (index range, repeats, mass) read the tensors on the host; they are
    skipped while torch.compile traces, never in eager.
    """
    logprobs, indices = teacher
    check_floating("TeacherTopK.logprobs", logprobs, "log-probabilities")
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"TeacherTopK.indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"TeacherTopK.indices must be int32 or int64 vocabulary indices, got {indices.dtype}")
    if logprobs.shape != indices.shape:
        raise ValueError(
            f"TeacherTopK.logprobs {tuple(logprobs.shape)} and indices {tuple(indices.shape)} must have the same shape"
        )
    if logprobs.dim() == 0 or logprobs.shape[:-1] != leading_shape:
        raise ValueError(
            f"TeacherTopK tensors must have shape (*leading, K) with the student's leading shape "
            f"{tuple(leading_shape)}, got {tuple(logprobs.shape)}"
        )
    k = logprobs.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"TeacherTopK lists K = {k} tokens per row; K must be in [1, V] = [1, {vocab}]")
    for name, x in (("logprobs", logprobs), ("indices", indices)):
        if x.device != device:
            raise ValueError(f"TeacherTopK.{name} is on {x.device} but the student is on {device}")
    if torch.compiler.is_compiling() or logprobs.numel() == 0:
        return
    if bool(((indices < -1) | (indices >= vocab)).any()):
        raise ValueError(f"TeacherTopK.indices must lie in [-1, V) = [-1, {vocab}) (-1 marks padding)")
    ordered = indices.reshape(-1, k).sort(dim=-1).values
    if bool(((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any()):
        raise ValueError("TeacherTopK.indices lists a token twice in one row; each listed token must be distinct")
    mass = torch.where(indices >= 0, logprobs.float().exp(), 0.0).reshape(-1, k).sum(-1)
    if keep is not None:
        mass = torch.where(keep, mass, 0.0)
    if bool((mass > LOGPROB_MASS_LIMIT).any()):
        raise ValueError(
            f"TeacherTopK.logprobs of a row sum to {float(mass.max()):.4g} > {LOGPROB_MASS_LIMIT} in probability: "
            "these look like logits, not log-probabilities. Store torch.log_softmax(teacher_logits / T, dim=-1) "
            "values, or build the TeacherTopK with akl_kernels.teacher_topk(teacher_logits, k, temperature=T)"
        )
