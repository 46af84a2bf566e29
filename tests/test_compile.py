"""torch.compile (docs/semantics.md section 7): every public loss form inside a compiled training
step has no graph break (fullgraph=True), equals eager in loss and gradients, and does not
recompile when the number of rows changes; torch.library.opcheck passes on every operator.

The steps compile with the "aot_eager" backend (dynamo and AOTAutograd trace the whole step,
forward and backward, through the operators' shape functions and registered autograd, without
inductor's C++ compilation, which costs minutes on a CPU); test_inductor_step compiles one with
the default backend. The Triton operators run here in Triton's interpreter, where they are
opaque custom_ops; test_triton_ops_trace_for_inductor traces their triton_op bodies (the form
they take on a GPU) with fake tensors.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import akl_kernels as ak
from akl_kernels import TeacherTopK

VOCAB, HIDDEN, K = 48, 8, 6


class Models(torch.nn.Module):
    """A student and a teacher lm_head over shared hidden states (float64 for tight checks)."""

    def __init__(self):
        super().__init__()
        self.student = torch.nn.Linear(HIDDEN, VOCAB, dtype=torch.float64)
        self.teacher = torch.nn.Linear(HIDDEN, VOCAB, dtype=torch.float64).requires_grad_(False)


def steps(backend):
    """A training step's loss for every public form, on `backend`: step(models, hidden, labels,
    stored), stored the teacher's TeacherTopK as (logprobs, indices), made outside the step as
    in offline distillation (read from a cache)."""

    def logits(loss_fn, **kwargs):
        return lambda models, hidden, labels, stored: loss_fn(
            models.student(hidden), models.teacher(hidden), labels=labels, backend=backend, **kwargs
        )

    def with_stats(models, hidden, labels, stored):
        loss, stats = ak.akl_loss(
            models.student(hidden), models.teacher(hidden), labels=labels, return_stats=True, backend=backend
        )
        return loss + stats.head_weight.sum() + stats.head_size.sum()  # statistics are outputs too

    return {
        "akl": logits(ak.akl_loss),
        "fkl": logits(ak.fkl_loss),
        "rkl": logits(ak.rkl_loss),
        "jsd-none": lambda *args: logits(ak.distillation_loss, loss="jsd", reduction="none")(*args).sum(),
        "tvd-sum": logits(ak.distillation_loss, loss="tvd", reduction="sum"),
        "stats": with_stats,
        "hidden": lambda models, hidden, labels, stored: ak.fused_linear_akl_loss(
            hidden, models.student.weight, hidden, models.teacher.weight, student_bias=models.student.bias,
            teacher_bias=models.teacher.bias, labels=labels, chunk_size=4, backend=backend,
        ),
        "sparse": lambda models, hidden, labels, stored: ak.akl_loss(
            models.student(hidden), TeacherTopK(*stored), labels=labels, backend=backend
        ),
        "sparse-hidden": lambda models, hidden, labels, stored: ak.fused_linear_rkl_loss(
            hidden, models.student.weight, TeacherTopK(*stored), None, student_bias=models.student.bias,
            labels=labels, backend=backend,
        ),
    }


FORMS = list(steps("torch"))


def _inputs(rows, seed):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    hidden = torch.randn(rows, 3, HIDDEN, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, VOCAB, (rows, 3), generator=g)
    labels[0, 1] = -100
    return hidden, labels


def _run(step, models, hidden, labels):
    """Loss and the gradients of the student's weight, bias and the hidden states."""
    models.zero_grad(set_to_none=True)
    stored = tuple(ak.teacher_topk(models.teacher(hidden).detach(), K))
    hidden = hidden.detach().requires_grad_(True)
    loss = step(models, hidden, labels, stored)
    loss.backward()
    return loss.detach(), models.student.weight.grad, models.student.bias.grad, hidden.grad


# The Triton operators in the interpreter are slow: two forms cover both of their pairs (the
# hidden-state operator takes either backend's rows the same way).
CASES = [(form, "torch") for form in FORMS] + [(form, "triton") for form in ("akl", "sparse")]


@pytest.mark.parametrize("form,backend", CASES)
def test_compiled_step_equals_eager_without_breaks_or_recompiles(form, backend):
    step = steps(backend)[form]
    torch._dynamo.reset()
    models = Models()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    compilations = []
    for rows, seed in ((5, 1), (9, 2)):
        hidden, labels = _inputs(rows, seed)
        expected = _run(step, models, hidden, labels)
        got = _run(compiled, models, hidden, labels)
        for name, want, have in zip(("loss", "weight grad", "bias grad", "hidden grad"), expected, got):
            torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-12, msg=f"{form}: {name}")
        compilations.append(counter.frame_count)
    # (The first call may count twice: dynamo restarts once to specialise the Python floats mu and T.)
    assert compilations[1] == compilations[0], f"{form}: recompiled for a new number of rows"


def test_explain_counts_no_graph_break():
    models = Models()
    hidden, labels = _inputs(4, 0)
    for form in ("akl", "hidden", "sparse"):
        stored = tuple(ak.teacher_topk(models.teacher(hidden).detach(), K))
        explanation = torch._dynamo.explain(steps("torch")[form])(models, hidden, labels, stored)
        assert explanation.graph_break_count == 0, (form, explanation.break_reasons)
        assert explanation.graph_count == 1


def test_inductor_step():
    torch._dynamo.reset()
    models = Models()
    step = steps("torch")["akl"]
    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for rows, seed in ((5, 1), (7, 2)):
        hidden, labels = _inputs(rows, seed)
        for want, have in zip(_run(step, models, hidden, labels), _run(compiled, models, hidden, labels)):
            torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-12)


def test_compiled_step_skips_host_checks_but_eager_keeps_them():
    # The TeacherTopK value checks read the tensors on the host: eager runs them, a compiled
    # step skips them (documented in docs/semantics.md section 7) rather than breaking the graph.
    models = Models()
    hidden, labels = _inputs(3, 0)
    logprobs, indices = ak.teacher_topk(models.teacher(hidden), K)
    bad = TeacherTopK(logprobs, indices.clone().fill_(VOCAB - 1))  # a token listed K times
    student = models.student(hidden)
    with pytest.raises(ValueError, match="lists a token twice"):
        ak.akl_loss(student, bad)
    torch._dynamo.reset()
    compiled = torch.compile(lambda s, t: ak.akl_loss(s, t), backend="aot_eager", fullgraph=True, dynamic=True)
    compiled(student.detach(), bad)  # no check, no graph break


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck on every operator


def _row_samples(backend_name):
    g = torch.Generator(torch.get_default_device()).manual_seed(0)
    student = torch.randn(4, 40, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 40, generator=g, dtype=torch.float64) * 2
    keep = torch.tensor([True, False, True, True])
    if backend_name.endswith("sparse"):
        teacher = list(ak.teacher_topk(teacher, 5))
    else:
        teacher = [teacher]
    grad_scale = torch.tensor(1 / 3, dtype=torch.float64)
    config = (0, 0.5, 1.3, True, True, 0.0, 0.0)  # AKL, mu, T, split, stats, mixture
    return student, teacher, keep, grad_scale, config


@pytest.mark.parametrize("backend_name", ["torch", "torch_sparse", "triton", "triton_sparse"])
def test_opcheck_row_operators(backend_name):
    student, teacher, keep, grad_scale, config = _row_samples(backend_name)
    rows = getattr(torch.ops.akl_kernels, f"{backend_name}_rows")
    for reduction, forward_grad in (("mean", backend_name == "torch"), ("none", False)):
        torch.library.opcheck(rows, (student, teacher, keep, grad_scale, *config, reduction, forward_grad))
    state = rows(student.detach(), teacher, keep, grad_scale, *config, "none", False)[4]
    gradient = getattr(torch.ops.akl_kernels, f"{backend_name}_row_gradient")
    row_scale = torch.rand(4, dtype=torch.float64)
    torch.library.opcheck(gradient, (student.detach(), teacher, keep, row_scale, state, *config))


@pytest.mark.parametrize("sparse", [False, True])
def test_opcheck_fused_linear_operator(sparse):
    g = torch.Generator(torch.get_default_device()).manual_seed(0)
    hidden = torch.randn(5, HIDDEN, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(VOCAB, generator=g, dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([True, True, False, True, True])
    if sparse:
        teacher = (*ak.teacher_topk(torch.randn(5, VOCAB, generator=g, dtype=torch.float64), K), None)
        backend_name = "torch_sparse"
    else:
        teacher = (torch.randn(5, HIDDEN, generator=g, dtype=torch.float64),
                   torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64), None)
        backend_name = "torch"
    config = (0, 0.5, 1.0, True, False, 0.0, 0.0)
    for reduction, wanted in (("mean", [True, True, True]), ("none", [False, False, False])):
        args = (hidden, weight, bias, *teacher, keep, torch.tensor(0.25, dtype=torch.float64), None, *config,
                backend_name, sparse, 2, reduction, wanted)
        torch.library.opcheck(torch.ops.akl_kernels.fused_linear_rows, args)


TRACE_TRITON_OPS = r"""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from akl_kernels._ops import ROW_BACKENDS

config = (0, 0.5, 1.0, True, True, 0.0, 0.0)
DEVICE = "cpu"  # fake tensors: nothing runs, the kernels are only recorded (a CPU build of torch fakes no CUDA)
with FakeTensorMode():
    s = torch.empty(6, 300, device=DEVICE)
    stored = [torch.empty(6, 7, device=DEVICE), torch.empty(6, 7, dtype=torch.int64, device=DEVICE)]
    for name, t in (("triton", [torch.empty(6, 300, device=DEVICE)]), ("triton_sparse", stored)):
        op = getattr(torch.ops.akl_kernels, name + "_rows")
        loss, stats, head_size, grad, state = op(s, t, None, torch.ones((), device=DEVICE), *config, "none", False)
        columns = ROW_BACKENDS[name].state_columns(t[0] if len(t) == 1 else type("T", (), {"indices": t[1]}))
        assert loss.shape == (6,) and stats.shape == (6, 6) and head_size.dtype == torch.int64, name
        assert state.shape == (6, columns) and grad.numel() == 0, (name, state.shape)
        g = getattr(torch.ops.akl_kernels, name + "_row_gradient")(s, t, None, torch.ones(6, device=DEVICE), state, *config)
        assert g.shape == s.shape and g.dtype == s.dtype, name
print("traced")
"""


def test_triton_ops_trace_for_inductor():
    # Without the interpreter the Triton operators are triton_ops: under fake tensors their bodies
    # run with every kernel launch recorded by wrap_triton (what inductor traces on a GPU).
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", TRACE_TRITON_OPS], env=env, capture_output=True, text=True,
                            timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0 and "traced" in result.stdout, result.stderr[-3000:]
