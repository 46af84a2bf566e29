"""The loss family (docs/semantics.md section 2, rules 26-30): distillation_loss and its module,
the divergences made of terms (jsd, tvd, skl, srkl) on both backends and in the hidden-state form
against the float64 reference, their gradient by finite differences, and their bad inputs.

The rules every loss shares (NaN and invalid rows, extreme logits, float16 loss scaling, random
logits over several vocabulary sizes) are checked for the whole family in test_reliability.py
and test_akl_loss.py, which sweep every name in akl_kernels.LOSSES.
"""

import pytest
import torch
import triton.language as tl

from akl_kernels import (
    LOSSES,
    DistillationLoss,
    FusedLinearAKLLoss,
    akl_loss,
    distillation_loss,
    fused_linear_distillation_loss,
)
from akl_kernels._rows import RowLossConfig
from akl_kernels.divergences import DIVERGENCES
from akl_kernels.torch_backend import TORCH_BACKEND
from reference import reference_loss
from tests.compare import PARAMETER_VALUES, assert_matches_reference

NEG_INF = float("-inf")
TERM_LOSSES = [name for name in LOSSES if DIVERGENCES[name].has_terms]
# Each loss at its default parameter, and the parameter sweeps.
CASES = [(name, {}) for name in TERM_LOSSES] + [
    (name, {parameter: value}) for name, values in PARAMETER_VALUES.items() for parameter, value in values
]
CASE_IDS = [name + "".join(f"-{k}{v}" for k, v in parameters.items()) for name, parameters in CASES]


def logits(*shape, scale=2.0, dtype=torch.float32):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("loss,parameters", CASES, ids=CASE_IDS)
def test_matches_reference(backend, loss, parameters):
    """Loss, gradient and every statistic of each row, at T = 1.3, with positions outside the
    support in either input and a row whose support is one token."""
    student, teacher = logits(4, 257), logits(4, 257)
    teacher[0, :50] = NEG_INF
    student[1, 7] = NEG_INF
    teacher[2, 1:] = NEG_INF
    assert_matches_reference(loss, student, teacher, backend, mu=0.3, temperature=1.3, parameters=parameters)


@pytest.mark.parametrize("loss", TERM_LOSSES)
def test_near_equal_distributions(backend, loss):
    """A student close to its teacher: every divergence near 0, with its gradient (q = p gives 0,
    and TVD's sign(0) = 0 where logits are equal)."""
    teacher = logits(3, 300)
    student = teacher + 1e-3 * logits(3, 300)
    student[2] = teacher[2]
    assert_matches_reference(loss, student, teacher, backend)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss", TERM_LOSSES)
def test_labels_reductions_3d(backend, loss, reduction):
    """(2, 3, V) logits, ignored rows holding NaN: each reduction against the reference; ignored
    rows contribute 0 and get a zero gradient."""
    student, teacher = logits(2, 3, 40), logits(2, 3, 40)
    labels = torch.tensor([[1, -100, 3], [-100, 5, 6]])
    student[0, 1] = float("nan")
    teacher[1, 0] = float("nan")
    s = student.clone().requires_grad_(True)
    ours = distillation_loss(s, teacher, loss=loss, labels=labels, reduction=reduction, backend=backend)
    grad_output = torch.rand_like(ours)
    ours.backward(grad_output)
    s_ref = student.double().requires_grad_(True)
    ref, _ = reference_loss(s_ref, teacher.double(), labels=labels, reduction=reduction, mode=loss)
    ref.backward(grad_output.double())
    assert ours.shape == ref.shape == ((2, 3) if reduction == "none" else ())
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    kept = labels != -100
    torch.testing.assert_close(s.grad[kept].double(), s_ref.grad[kept], rtol=1e-4, atol=1e-6)
    assert (s.grad[~kept] == 0).all()


@pytest.mark.parametrize(
    "student_dtype,teacher_dtype",
    [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
     (torch.float64, torch.float32)],
)
@pytest.mark.parametrize("loss", TERM_LOSSES)
def test_dtypes(backend, loss, student_dtype, teacher_dtype):
    """Every input dtype (and mixed pairs): the loss in float32 (float64 with a float64 input)
    and the gradient in the student's dtype, against the reference on the same rounded inputs."""
    student, teacher = logits(3, 100, dtype=student_dtype), logits(3, 100, dtype=teacher_dtype)
    s = student.clone().requires_grad_(True)
    loss_value = distillation_loss(s, teacher, loss=loss, backend=backend)
    loss_value.backward()
    assert loss_value.dtype == (torch.float64 if torch.float64 in (student_dtype, teacher_dtype) else torch.float32)
    assert s.grad.dtype == student_dtype
    assert_matches_reference(loss, student, teacher, backend)


@pytest.mark.parametrize("loss,parameters", [c for c in CASES if not c[1]] + [("skl", {"alpha": 1.0})],
                         ids=lambda case: str(case))
def test_gradcheck(backend, loss, parameters):
    """float64 finite differences through the loss with labels (no weights to freeze: these
    losses weight neither FKL nor RKL)."""
    student = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 5, dtype=torch.float64)
    teacher[0, 3] = NEG_INF
    labels = torch.tensor([0, -100, 4])

    def fn(s):
        return distillation_loss(s, teacher, loss=loss, temperature=1.3, labels=labels, backend=backend, **parameters)

    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-7, fast_mode=backend == "triton")


# Every loss on the torch backend; one on Triton's (its chunks are the same kernels as the logits
# form's, and the interpreter runs them slowly).
HIDDEN_CASES = [("torch", name, parameters) for name, parameters in CASES[: len(TERM_LOSSES)]] + [
    ("torch", "jsd", {"beta": 0.9}), ("triton", "jsd", {"beta": 0.9})
]


@pytest.mark.parametrize("backend,loss,parameters", HIDDEN_CASES, ids=lambda c: str(c))
def test_hidden_states_equal_logits(backend, loss, parameters):
    """fused_linear_distillation_loss equals distillation_loss on the float32 logits it would
    materialise: loss, statistics and the gradients of hidden states, weight and bias."""
    rows, hidden, vocab = 10, 8, 50
    h = torch.randn(rows, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden, requires_grad=True)
    b = torch.randn(vocab, requires_grad=True)
    th, tw = torch.randn(rows, hidden), torch.randn(vocab, hidden)
    labels = torch.tensor([1, -100, 2, 3, 4, -100, 5, 6, 7, 8])
    kwargs = dict(loss=loss, labels=labels, return_stats=True, backend=backend, temperature=1.5, **parameters)
    ours, ours_stats = fused_linear_distillation_loss(h, w, th, tw, student_bias=b, chunk_size=3, **kwargs)
    ours.backward()
    grads = h.grad, w.grad, b.grad
    h.grad = w.grad = b.grad = None
    ref, ref_stats = distillation_loss(h @ w.T + b, th @ tw.T, **kwargs)
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for name in ref_stats._fields:
        torch.testing.assert_close(getattr(ours_stats, name), getattr(ref_stats, name), rtol=1e-4, atol=1e-6)
    for ours_grad, ref_grad in zip(grads, (h.grad, w.grad, b.grad)):
        torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-4, atol=1e-6)

    module = FusedLinearAKLLoss(**{k: v for k, v in kwargs.items() if k != "labels"})
    module_loss, _ = module(h, w, th, tw, student_bias=b, labels=labels)
    torch.testing.assert_close(module_loss, ours)


def test_statistics_of_losses_that_are_neither_kl(backend):
    """Every loss reports FKL, RKL, the gaps and the head size of the split at mu; the losses
    made of terms apply neither KL, so their weights are 0 and 0."""
    student, teacher = logits(3, 64), logits(3, 64)
    _, akl_stats = akl_loss(student, teacher, mu=0.4, return_stats=True, reduction="none", backend=backend)
    for name in TERM_LOSSES:
        _, stats = distillation_loss(student, teacher, loss=name, mu=0.4, return_stats=True, backend=backend)
        for field in ("fkl", "rkl", "head_gap", "tail_gap", "head_size"):
            torch.testing.assert_close(getattr(stats, field), getattr(akl_stats, field), msg=f"{name} {field}")
        assert (stats.head_weight == 0).all() and (stats.tail_weight == 0).all(), name


def test_named_functions_equal_distillation_loss():
    """akl_loss(...) is distillation_loss(loss="akl", ...), and the module its function."""
    student, teacher = logits(4, 30), logits(4, 30)
    torch.testing.assert_close(akl_loss(student, teacher, mu=0.3), distillation_loss(student, teacher, mu=0.3))
    for name in LOSSES:
        module = DistillationLoss(loss=name, temperature=2.0, reduction="sum")
        torch.testing.assert_close(
            module(student, teacher), distillation_loss(student, teacher, loss=name, temperature=2.0, reduction="sum")
        )
    assert "beta=0.25" in repr(DistillationLoss(loss="jsd", beta=0.25))
    assert "alpha=0.1" in repr(DistillationLoss(loss="srkl"))


def test_parameters_change_the_loss():
    """beta and alpha reach the backends: other values give other losses (and alpha = 1 makes
    the skew KLs 0, their mixture being the distribution they compare)."""
    student, teacher = logits(4, 30), logits(4, 30)
    for backend in ("torch", "triton"):
        values = [float(distillation_loss(student, teacher, loss="jsd", beta=b, backend=backend)) for b in (0.1, 0.5)]
        assert values[0] != values[1]
        for name in ("skl", "srkl"):
            assert float(distillation_loss(student, teacher, loss=name, alpha=1.0, backend=backend)) == pytest.approx(0, abs=1e-7)


BAD_PARAMETERS = [
    (dict(loss="jsd", beta=0.0), ValueError, "loss='fkl'.*loss='rkl'"),
    (dict(loss="jsd", beta=1.0), ValueError, "beta must be a Python number in \\(0, 1\\)"),
    (dict(loss="jsd", beta=float("nan")), ValueError, "beta"),
    (dict(loss="jsd", beta=torch.tensor(0.5)), TypeError, "pass float\\(beta\\)"),
    (dict(loss="skl", alpha=0.0), ValueError, "use loss='fkl'"),
    (dict(loss="srkl", alpha=0.0), ValueError, "use loss='rkl'"),
    (dict(loss="skl", alpha=1.5), ValueError, "alpha must be a Python number in \\(0, 1\\]"),
    (dict(loss="akl", beta=0.5), ValueError, "beta is a parameter of loss='jsd', not of loss='akl'"),
    (dict(loss="jsd", alpha=0.5), ValueError, "alpha is a parameter of loss='skl' / 'srkl'"),
    (dict(loss="tvd", alpha=0.5), ValueError, "not of loss='tvd'"),
    (dict(loss="kl"), ValueError, "loss must be one of \\('akl', 'fkl', 'rkl', 'jsd', 'tvd', 'skl', 'srkl'\\)"),
    (dict(loss=None), ValueError, "loss must be one of"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_PARAMETERS, ids=lambda x: str(x)[:40])
def test_bad_parameters(kwargs, error, message):
    """Each bad loss name or parameter gets its error, from the function, the modules and the
    hidden-state form alike (the modules when constructed)."""
    student, teacher = logits(2, 10), logits(2, 10)
    with pytest.raises(error, match=message):
        distillation_loss(student, teacher, **kwargs)
    with pytest.raises(error, match=message):
        DistillationLoss(**kwargs)
    with pytest.raises(error, match=message):
        FusedLinearAKLLoss(**kwargs)
    with pytest.raises(error, match=message):
        fused_linear_distillation_loss(torch.randn(2, 4), torch.randn(10, 4), torch.randn(2, 4), torch.randn(10, 4),
                                       **kwargs)


def test_unknown_mode_fails_loudly():
    """A mode no backend computes is an error on both backends, never a silent other loss."""
    student, teacher = logits(2, 10), logits(2, 10)
    config = RowLossConfig(mode=len(DIVERGENCES), mu=0.5, temperature=1.0, split=False)
    with pytest.raises(NotImplementedError, match="does not compute loss mode"):
        TORCH_BACKEND.row_losses(student, teacher, None, torch.ones(()), config, False)
    from akl_kernels.triton_backend import TRITON_BACKEND, _loss_kernel

    with pytest.raises(NotImplementedError, match="does not compute loss mode"):
        TRITON_BACKEND.row_losses(student, teacher, None, torch.ones(()), config, False)
    # and the kernels themselves refuse it at compile time
    n_rows = 2
    values = torch.zeros(n_rows, 15, dtype=torch.float32)
    codes = torch.zeros(n_rows, 3, dtype=torch.int32)
    with pytest.raises(Exception, match="unknown loss mode"):
        _loss_kernel[(1,)](
            None, values, codes, torch.empty(n_rows), torch.empty(6, n_rows), torch.empty(n_rows, dtype=torch.int64),
            torch.empty(n_rows, dtype=torch.int32), n_rows, MODE=len(DIVERGENCES), SPLIT=False, HAS_KEEP=False,
            COMPUTE_DTYPE=tl.float32, BLOCK=16,
        )
