"""The losses the benchmarks time, each as `fn(student_logits, teacher_logits, temperature) -> scalar
loss`, or for the fused-linear workloads `fn(student_hidden, student_weight, teacher_hidden, teacher_weight)`.

Ours (`akl_loss`, `fkl_loss`, `rkl_loss`, and the rest of the family as `distillation_loss`
with loss="jsd" (beta 0.5), "tvd", "skl", "srkl" (alpha 0.1); backend "auto": Triton on a GPU, the
torch backend on a CPU), the sort-based reference in eager mode and under `torch.compile`, and,
where `liger_kernel` is importable and a GPU is present, Liger-Kernel's JSD at beta 0 and 1 (its
forward and reverse KL), its KL-divergence loss, and its JSD at beta 0.5 and TVD as the peers of
our "jsd" and "tvd". Peers get log-softmaxed inputs (of the logits
over T), as they require; the log-softmax is part of their time, since a user holding logits must
pay it. The split-price workloads (T = 2, real rows) run our KL losses and, on a GPU, their peers;
the reference, its compiled form and the rest of the family stay with the main matrix.

Fused-linear workloads compare fused_linear_akl_loss with what a user writes without it: the
lm_head's logits materialised by F.linear (in the inputs' dtype), then akl_loss on them.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from akl_kernels import LOSSES, akl_loss, distillation_loss, fkl_loss, fused_linear_akl_loss, rkl_loss
from reference import reference_loss

LossFn = Callable[..., torch.Tensor]


class Unavailable(Exception):
    """A contender cannot run here; the message says why (it becomes the skip reason)."""


@dataclass(frozen=True)
class Contender:
    name: str
    computes: str  # a name of akl_kernels.LOSSES: which of our losses its value must equal
    build: Callable[[torch.device], LossFn]  # raises Unavailable; call loss_fn() instead
    # "ours" (failures fail the benchmark), "reference" (the eager oracle the CPU target is
    # measured against), "peer" (what the GPU target must beat) or "baseline" (the
    # materialised logits a fused-linear loss is compared with); all but ours skip on failure
    role: str = "peer"
    stateless: bool = False  # nothing compiled, cached or tuned on a first call

    @property
    def ours(self) -> bool:
        return self.role == "ours"


@functools.cache
def loss_fn(contender: Contender, device: torch.device) -> LossFn:
    """The contender's loss function on `device`, built once per process (a compiled one keeps its cache)."""
    return contender.build(device)


def _reference_akl(student, teacher, temperature=1.0):
    return reference_loss(student, teacher, temperature=temperature)[0]


def _ours(loss_fn) -> Callable[[torch.device], LossFn]:
    return lambda device: lambda student, teacher, temperature=1.0: loss_fn(student, teacher, temperature=temperature)


def _reference_compiled(device: torch.device) -> LossFn:
    if device.type == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None:
        raise Unavailable("torch.compile on a CPU needs a C++ compiler, and none is on PATH")
    # dynamic=True: one graph for every row count and vocabulary size instead of one per shape
    return torch.compile(_reference_akl, dynamic=True)


def _liger(kind: str) -> Callable[[torch.device], LossFn]:
    def build(device: torch.device) -> LossFn:
        if device.type != "cuda":
            raise Unavailable("Liger-Kernel's kernels run on a GPU only")
        try:
            from liger_kernel.transformers.functional import liger_jsd, liger_kl_div
            from liger_kernel.transformers.tvd import LigerTVDLoss
        except ImportError as error:
            raise Unavailable(f"liger_kernel is not importable ({error})") from None

        def loss(student, teacher, temperature=1.0):
            if kind == "tvd":  # 0.5 sum |p - q| over probabilities, mean over rows
                q = torch.softmax(student / temperature, dim=-1)
                return LigerTVDLoss(reduction="batchmean")(q, torch.softmax(teacher / temperature, dim=-1))
            log_q = torch.log_softmax(student / temperature, dim=-1)
            log_p = torch.log_softmax(teacher / temperature, dim=-1)
            if kind == "jsd-beta0":  # beta = 0: KL(p || q), mean over rows
                return liger_jsd(log_q, log_p, beta=0.0)
            if kind == "jsd-beta1":  # beta = 1: KL(q || p), mean over rows
                return liger_jsd(log_q, log_p, beta=1.0)
            if kind == "jsd":  # beta = 0.5, symmetric: our "jsd" at its default
                return liger_jsd(log_q, log_p, beta=0.5)
            # sum_j p_j (log p_j - log q_j), divided by the number of rows
            return liger_kl_div(log_q, log_p, reduction="batchmean", log_target=True)

        return loss

    return build


# The named losses, then the rest of the family through distillation_loss at their default parameters.
NAMED = {"akl": akl_loss, "fkl": fkl_loss, "rkl": rkl_loss}
FAMILY = [name for name in LOSSES if name not in NAMED]

CONTENDERS = [
    Contender("akl_loss", "akl", _ours(akl_loss), role="ours"),
    Contender("fkl_loss", "fkl", _ours(fkl_loss), role="ours"),
    Contender("rkl_loss", "rkl", _ours(rkl_loss), role="ours"),
    *(Contender(f"distillation_loss {name}", name, _ours(functools.partial(distillation_loss, loss=name)), role="ours")
      for name in FAMILY),
    Contender("reference (eager)", "akl", lambda device: _reference_akl, role="reference", stateless=True),
    Contender("reference (torch.compile)", "akl", _reference_compiled),
    Contender("liger JSD beta=0 (FKL)", "fkl", _liger("jsd-beta0")),
    Contender("liger JSD beta=1 (RKL)", "rkl", _liger("jsd-beta1")),
    Contender("liger KLDiv (FKL)", "fkl", _liger("kldiv")),
    Contender("liger JSD beta=0.5", "jsd", _liger("jsd")),
    Contender("liger TVD", "tvd", _liger("tvd")),
]


def _materialised_linear_akl(student_hidden, student_weight, teacher_hidden, teacher_weight):
    with torch.no_grad():
        teacher_logits = F.linear(teacher_hidden, teacher_weight)
    return akl_loss(F.linear(student_hidden, student_weight), teacher_logits)


LINEAR_CONTENDERS = [
    Contender("fused_linear_akl_loss", "akl", lambda device: fused_linear_akl_loss, role="ours", stateless=True),
    Contender("F.linear + akl_loss", "akl", lambda device: _materialised_linear_akl, role="baseline", stateless=True),
]
FUSED_LINEAR, MATERIALISED_LINEAR = (c.name for c in LINEAR_CONTENDERS)
BY_NAME = {c.name: c for c in CONTENDERS + LINEAR_CONTENDERS}
COMPILED_REFERENCE = "reference (torch.compile)"


def with_temperature(fn: LossFn, shape) -> LossFn:
    """fn bound to the workload's temperature (logits workloads; hidden-state ones take none)."""
    if shape.hidden is not None:
        return fn
    return functools.partial(fn, temperature=shape.temperature)


def contenders_for(shape) -> list[Contender]:
    """The contenders of a workload: LINEAR_CONTENDERS for hidden-state shapes, CONTENDERS for
    the main matrix, our losses for a stored (top-k) teacher, and the KL losses and their
    peers for the split-price workloads (temperature other than 1, or rows other than LM-like)."""
    if shape.hidden is not None:
        return LINEAR_CONTENDERS
    if shape.topk:  # a stored teacher: every loss of ours takes one
        return [c for c in CONTENDERS if c.ours]
    if shape.temperature != 1.0 or shape.source != "lm":
        return [c for c in CONTENDERS if c.role in ("ours", "peer") and c.computes in NAMED]
    return CONTENDERS
