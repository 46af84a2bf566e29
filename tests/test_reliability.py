"""Reliability at the edges (issue 12): float16 loss scaling, double backward, empty batches,
label dtypes, mu = 1, invalid rows, extreme finite logits and smaller input checks.

Each section is one item of the issue. Triton cases run in Triton's interpreter, so their
shapes are small; the float16 underflow of section 1, which the issue shows on thousands of
rows, is reached on a few rows with wider logits.
"""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from akl_kernels import (
    AKLLoss,
    FusedLinearAKLLoss,
    akl_loss,
    fkl_loss,
    fused_linear_akl_loss,
    fused_linear_fkl_loss,
)
from reference import reference_loss, reference_row_losses
from tests.compare import LOSS_FUNCTIONS as LOSSES

MODES = tuple(LOSSES)  # every loss of the family
REDUCTIONS = ("none", "mean", "sum")
FLOAT_STATS = ("fkl", "rkl", "head_gap", "tail_gap", "head_weight", "tail_weight")
FLOAT32_MAX = torch.finfo(torch.float32).max
NEG_INF = float("-inf")
INF = float("inf")


# --- 1. float16 loss scaling -------------------------------------------------------------------
# (loss * S).backward() on a float16 student must give the float16 rounding of S times the
# float32 gradient: what autograd gives when the logits are upcast to float32 in the graph.
# Rounding the gradient to float16 before S is applied flushes its small entries to zero.

# Rows and vocabulary per backend (few rows for Triton's interpreter). Logits randn * 4 give
# many gradient entries near float16's smallest subnormal, so that a gradient stored in float16
# before the scale (with the 1/N of "mean" in it, or without, for "sum" and "none") loses them
# even on 16 rows.
HALF_SIZES = {"torch": (512, 1000), "triton": (16, 256)}
# Loss scale per reduction. "none": each row's grad_output is scale / N (what "mean" gives).
# "sum" has no 1/N: a scale below 1 (2^-8) cannot fail today (rounding twice to float16 moves
# a few subnormal entries by one unit), and 2^16 overflows float16 in both results; 2^10 lifts
# entries that float16 flushes to zero before the scale is applied.
HALF_SCALES = {"mean": 2.0**16, "sum": 2.0**10, "none": 2.0**16}


def half_pair(rows, vocab, spread):
    return (torch.randn(rows, vocab) * spread).half(), (torch.randn(rows, vocab) * spread).half()


def scaled_backward(loss, reduction, scale, rows):
    """(loss * scale).backward(), or for "none" loss.backward(scale / rows for every row)."""
    if reduction == "none":
        loss.backward(torch.full((rows,), scale / rows))
    else:
        (loss * scale).backward()


def assert_half_gradient_matches(ours, oracle, tolerance, name="gradient"):
    """No more exact zeros than the oracle (+0.1 %), and L1 relative error below tolerance."""
    ours, oracle = ours.float(), oracle.float()
    assert oracle.isfinite().all(), "the loss scale overflows float16 in the oracle itself"
    zeros, oracle_zeros = float((ours == 0).float().mean()), float((oracle == 0).float().mean())
    assert zeros <= oracle_zeros + 1e-3, f"{name}: {zeros:.2%} exact zeros, the oracle has {oracle_zeros:.2%}"
    error = float((ours - oracle).abs().sum() / oracle.abs().sum())
    assert error < tolerance, f"{name}: L1 relative error {error:.3g}"


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_half_loss_scaling(backend, mode, reduction):
    """A scaled float16 gradient equals autograd's through float32 logits, for every reduction."""
    rows, vocab = HALF_SIZES[backend]
    student, teacher = half_pair(rows, vocab, spread=4.0)
    scale = HALF_SCALES[reduction]

    s = student.clone().requires_grad_(True)
    scaled_backward(LOSSES[mode](s, teacher, reduction=reduction, backend=backend), reduction, scale, rows)
    oracle = student.clone().requires_grad_(True)
    ref, _ = reference_loss(oracle.float(), teacher.float(), mode=mode, reduction=reduction)
    scaled_backward(ref, reduction, scale, rows)
    assert_half_gradient_matches(s.grad, oracle.grad, 2e-3)


def test_half_loss_scaling_issue_batch():
    """The issue's case: FKL on 4096 x 2000 logits randn * 2, scale 2^16, "mean" (46 % of the
    gradient was exactly 0). Torch only: at this spread the underflow needs thousands of rows,
    too many for the interpreter."""
    student, teacher = half_pair(4096, 2000, spread=2.0)
    s = student.clone().requires_grad_(True)
    (fkl_loss(s, teacher, backend="torch") * 2.0**16).backward()
    oracle = student.clone().requires_grad_(True)
    (reference_loss(oracle.float(), teacher.float(), mode="fkl")[0] * 2.0**16).backward()
    assert_half_gradient_matches(s.grad, oracle.grad, 2e-3)


# (rows, hidden size, vocabulary) of the hidden-state form per backend.
HIDDEN_HALF_SIZES = {"torch": (1024, 16, 512), "triton": (16, 16, 256)}


def test_half_loss_scaling_hidden_states(backend):
    """float16 hidden states and weight: scaled gradients equal autograd's through float32 logits."""
    rows, hidden, vocab = HIDDEN_HALF_SIZES[backend]
    student_hidden = torch.randn(rows, hidden).half()
    student_weight = (torch.randn(vocab, hidden) * (2.0 / hidden**0.5)).half()
    # A student close to its teacher (late in distillation): its gradient is small even before
    # the 1/N of "mean".
    teacher_hidden = student_hidden.float()
    teacher_weight = student_weight.float() + 1e-3 * torch.randn(vocab, hidden)

    h, w = student_hidden.clone().requires_grad_(True), student_weight.clone().requires_grad_(True)
    (fused_linear_fkl_loss(h, w, teacher_hidden, teacher_weight, backend=backend) * 2.0**16).backward()
    h_ref, w_ref = student_hidden.clone().requires_grad_(True), student_weight.clone().requires_grad_(True)
    ref, _ = reference_loss(h_ref.float() @ w_ref.float().T, teacher_hidden @ teacher_weight.T, mode="fkl")
    (ref * 2.0**16).backward()
    assert_half_gradient_matches(h.grad, h_ref.grad, 5e-3, "student_hidden")
    assert_half_gradient_matches(w.grad, w_ref.grad, 5e-3, "student_weight")


# --- 2. double backward ------------------------------------------------------------------------
# The gradient is computed without a graph: asking for one (create_graph=True) must raise at
# once instead of returning a gradient that silently has no second derivative.


def float64_pair(*shape):
    return torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)


def test_double_backward_raises_logits(backend):
    """create_graph=True raises for a reduced loss and for per-row losses with grad_outputs."""
    student, teacher = float64_pair(2, 6)
    s = student.requires_grad_(True)
    with pytest.raises(RuntimeError, match="(?i)double backward"):
        torch.autograd.grad(fkl_loss(s, teacher, reduction="sum", backend=backend), s, create_graph=True)
    loss = akl_loss(s, teacher, reduction="none", backend=backend)
    with pytest.raises(RuntimeError, match="(?i)double backward"):
        torch.autograd.grad(loss, s, grad_outputs=torch.ones(2, dtype=torch.float64), create_graph=True)


def test_double_backward_raises_hidden_states(backend):
    """create_graph=True raises for the hidden-state form (gradient w.r.t. student_hidden)."""
    hidden, teacher_hidden = float64_pair(2, 4)
    weight, teacher_weight = float64_pair(6, 4)
    hidden.requires_grad_(True)
    loss = fused_linear_akl_loss(hidden, weight, teacher_hidden, teacher_weight, backend=backend)
    with pytest.raises(RuntimeError, match="(?i)double backward"):
        torch.autograd.grad(loss, hidden, create_graph=True)


def test_double_backward_guard_keeps_retained_graph(backend):
    """A plain backward still gives the reference gradient, and a second one through a retained
    graph gives it again, for both forms."""
    student, teacher = float64_pair(2, 6)
    s = student.clone().requires_grad_(True)
    loss = akl_loss(s, teacher, reduction="none", backend=backend)
    grad_output = torch.tensor([1.0, 2.0], dtype=torch.float64)
    (first,) = torch.autograd.grad(loss, s, grad_output, retain_graph=True)
    (second,) = torch.autograd.grad(loss, s, grad_output)
    s_ref = student.clone().requires_grad_(True)
    reference_loss(s_ref, teacher, reduction="none")[0].backward(grad_output)
    torch.testing.assert_close(first, s_ref.grad, rtol=1e-9, atol=1e-11)
    assert torch.equal(second, first)

    hidden, teacher_hidden = float64_pair(2, 4)
    weight, teacher_weight = float64_pair(6, 4)
    hidden.requires_grad_(True)
    loss = fused_linear_akl_loss(hidden, weight, teacher_hidden, teacher_weight, backend=backend)
    (first,) = torch.autograd.grad(loss, hidden, retain_graph=True)
    (second,) = torch.autograd.grad(loss, hidden)
    h_ref = hidden.detach().clone().requires_grad_(True)
    reference_loss(h_ref @ weight.T, teacher_hidden @ teacher_weight.T)[0].backward()
    torch.testing.assert_close(first, h_ref.grad, rtol=1e-9, atol=1e-11)
    assert torch.equal(second, first)


class _NewLargeTensors(TorchDispatchMode):
    """Records every operator result of at least `size` elements that does not share storage
    with an argument (a new allocation, not a view or an in-place result)."""

    def __init__(self, size):
        super().__init__()
        self.size, self.seen = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.numel() >= self.size and o.untyped_storage().data_ptr() not in inputs:
                self.seen.append((str(func), tuple(o.shape)))
        return out


def test_backward_allocates_nothing_gradient_sized_when_forward_computed_it(backend):
    """Where the forward pass computed the gradient (torch backend logits, both backends' hidden
    states with "mean"), backward only scales it: no new tensor of the gradient's size, such as
    zeros for the gradients of the statistics and gradient outputs, which autograd would
    otherwise materialise (a whole extra student-sized, or weight-sized, buffer)."""
    student, teacher = torch.randn(8, 300), torch.randn(8, 300)
    if backend == "torch":
        s = student.requires_grad_(True)
        loss = akl_loss(s, teacher, backend=backend)
        with _NewLargeTensors(s.numel()) as seen:
            loss.backward()
        assert seen.seen == []
    hidden, weight = torch.randn(8, 16, requires_grad=True), torch.randn(300, 16, requires_grad=True)
    loss = fused_linear_akl_loss(hidden, weight, torch.randn(8, 16), torch.randn(300, 16), backend=backend)
    with _NewLargeTensors(weight.numel()) as seen:
        loss.backward()
    assert seen.seen == []


# --- 3. empty batches --------------------------------------------------------------------------
# No rows: "none" gives an empty loss of the leading shape, "mean" and "sum" give 0; every
# gradient has its input's shape and is zero.


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(0, 50), (2, 0, 50)], ids=["0x50", "2x0x50"])
def test_empty_batch_logits(backend, shape, reduction):
    """Logits without rows give a zero (or empty) loss and an empty zero gradient."""
    s = torch.randn(shape, requires_grad=True)
    loss = akl_loss(s, torch.randn(shape), reduction=reduction, backend=backend)
    expected_shape = shape[:-1] if reduction == "none" else ()
    assert loss.shape == expected_shape
    assert torch.equal(loss, torch.zeros(expected_shape))
    loss.sum().backward()
    assert s.grad.shape == s.shape and not s.grad.any()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("leading", [(0,), (2, 0)], ids=["0", "2x0"])
def test_empty_batch_hidden_states(backend, leading, reduction):
    """Hidden states without rows give a zero (or empty) loss and zero gradients."""
    hidden = torch.randn(*leading, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    loss = fused_linear_akl_loss(
        hidden, weight, torch.randn(*leading, 8), torch.randn(50, 8), reduction=reduction, backend=backend
    )
    expected_shape = leading if reduction == "none" else ()
    assert loss.shape == expected_shape
    assert torch.equal(loss, torch.zeros(expected_shape))
    loss.sum().backward()
    assert hidden.grad.shape == hidden.shape and not hidden.grad.any()
    assert weight.grad.shape == weight.shape and not weight.grad.any()


# --- 4. labels against ignore_index ------------------------------------------------------------
# labels == ignore_index compares integers: an ignore_index outside the labels' dtype never
# matches (no wrap-around into the dtype), one inside matches exactly.


@pytest.mark.parametrize(
    "dtype,labels,ignore_index,kept",
    [
        (torch.uint8, [156, 5], -100, [True, True]),  # -100 wraps to 156 in uint8
        (torch.int32, [0, 7], 2**32, [True, True]),  # 2^32 wraps to 0 in int32
        (torch.int16, [-25536, 7], 40000, [True, True]),  # 40000 wraps to -25536 in int16
        (torch.uint8, [200, 5], 200, [False, True]),  # in range: an exact match
    ],
    ids=["uint8-minus100", "int32-2pow32", "int16-40000", "uint8-200"],
)
def test_labels_compare_without_wrap_around(backend, dtype, labels, ignore_index, kept):
    """Rows are ignored exactly where the label equals ignore_index as integers."""
    student, teacher = torch.randn(2, 256), torch.randn(2, 256)
    labels, kept = torch.tensor(labels, dtype=dtype), torch.tensor(kept)
    loss = akl_loss(student, teacher, labels=labels, ignore_index=ignore_index, reduction="none", backend=backend)
    unlabelled = akl_loss(student, teacher, reduction="none", backend=backend)
    torch.testing.assert_close(loss[kept], unlabelled[kept], msg=lambda m: f"a kept row differs: {loss.tolist()}")
    assert (loss[~kept] == 0).all()


@pytest.mark.parametrize("ignore_index", [2**70, -(2**63) - 1], ids=["2pow70", "below-int64"])
def test_labels_ignore_index_outside_int64(backend, ignore_index):
    """An ignore_index no integer tensor can hold is refused."""
    student, teacher = torch.randn(2, 20), torch.randn(2, 20)
    with pytest.raises(ValueError, match="ignore_index"):
        akl_loss(student, teacher, labels=torch.tensor([1, 2]), ignore_index=ignore_index, backend=backend)


def test_labels_reference_uint8():
    """The reference keeps uint8 labels 156 (the uint8 image of -100) too."""
    student, teacher = float64_pair(2, 256)
    labels = torch.tensor([156, 5], dtype=torch.uint8)
    loss, _ = reference_loss(student, teacher, labels=labels, reduction="none")
    unlabelled, _ = reference_loss(student, teacher, reduction="none")
    assert torch.equal(loss, unlabelled), f"{loss.tolist()} vs {unlabelled.tolist()}"


def test_labels_hidden_states_uint8(backend):
    """The hidden-state form keeps a uint8 label 156 as well."""
    inputs = (torch.randn(2, 8), torch.randn(60, 8), torch.randn(2, 8), torch.randn(60, 8))
    labels = torch.tensor([156, 5], dtype=torch.uint8)
    loss = fused_linear_akl_loss(*inputs, labels=labels, reduction="none", backend=backend)
    unlabelled = fused_linear_akl_loss(*inputs, reduction="none", backend=backend)
    torch.testing.assert_close(loss, unlabelled, msg=lambda m: f"{loss.tolist()} vs {unlabelled.tolist()}")


# --- 5. mu = 1 ---------------------------------------------------------------------------------
# With mu = 1 no token can be in the tail, whatever the rounding of the running mass: the head
# is the whole support (positions where both logits are > -inf).

# Rows per backend (few for the interpreter).
MU_ONE_ROWS = {"torch": 64, "triton": 8}


def mu_one_logits(rows, vocab):
    """Logits randn * 3 with -inf in some teacher rows and some student rows; row 0 has the
    student equal to the teacher (both gaps 0)."""
    student, teacher = torch.randn(rows, vocab) * 3, torch.randn(rows, vocab) * 3
    teacher[1::5, : vocab // 4] = NEG_INF
    student[2::7, vocab // 2 : vocab // 2 + vocab // 8] = NEG_INF
    student[0] = teacher[0]
    support = ((student > NEG_INF) & (teacher > NEG_INF)).sum(-1)
    return student, teacher, support


@pytest.mark.parametrize("vocab", [40, 1000])
def test_mu_one_whole_support_in_head(backend, vocab):
    """AKL at mu = 1 is FKL; its head is the support, the tail gap 0 and the head weight 1."""
    student, teacher, support = mu_one_logits(MU_ONE_ROWS[backend], vocab)
    loss, stats = akl_loss(student, teacher, mu=1.0, return_stats=True, reduction="none", backend=backend)
    torch.testing.assert_close(loss, fkl_loss(student, teacher, reduction="none", backend=backend), rtol=1e-6,
                               atol=1e-7)
    assert torch.equal(stats.head_size, support), f"{stats.head_size.tolist()} vs {support.tolist()}"
    assert (stats.tail_gap == 0).all()
    tied = stats.head_gap == 0  # both gaps 0: the weights are 0.5 each
    assert tied[0] and not tied[1:].any()
    assert torch.equal(stats.head_weight, torch.where(tied, 0.5, 1.0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_mu_one_reference_whole_support_in_head(dtype):
    """The reference's head at mu = 1 is the support too, also where its float32 running mass
    rounds above 1."""
    student, teacher, support = mu_one_logits(64, 1000)
    _, stats = reference_row_losses(student.to(dtype), teacher.to(dtype), mu=1.0)
    wrong = (stats["head_size"] != support).nonzero().flatten()
    assert not wrong.numel(), (
        f"rows {wrong.tolist()}: head sizes {stats['head_size'][wrong].tolist()}, supports {support[wrong].tolist()}"
    )


# --- 6. invalid rows ---------------------------------------------------------------------------
# A row with a NaN, a +inf or an empty support gives NaN loss and NaN statistics with head
# size 0, on every backend and in the reference; ignored by labels, it gives zeros.


def invalid_rows():
    """4 x 49 logits: row 0 valid; row 1 NaN in the student; row 2 +inf in the teacher; row 3
    -inf everywhere in the teacher (empty support)."""
    student, teacher = torch.randn(4, 49) * 2, torch.randn(4, 49) * 2
    student[1, 3] = float("nan")
    teacher[2, 5] = INF
    teacher[3] = NEG_INF
    return student, teacher


def run_rows(mode, student, teacher, backend, labels=None):
    """Per-row loss, statistics and gradient of the row sum."""
    s = student.clone().requires_grad_(True)
    kwargs = dict(mu=0.5) if mode == "akl" else {}
    loss, stats = LOSSES[mode](s, teacher, labels=labels, return_stats=True, reduction="none", backend=backend,
                               **kwargs)
    loss.sum().backward()
    return loss.detach(), stats, s.grad


@pytest.mark.parametrize("mode", MODES)
def test_invalid_rows_nan_statistics(backend, mode):
    """Rows 1-3 give NaN loss and statistics, head size 0; row 0 matches the reference."""
    student, teacher = invalid_rows()
    loss, stats, _ = run_rows(mode, student, teacher, backend)
    assert loss[1:].isnan().all()
    for name in FLOAT_STATS:
        assert getattr(stats, name)[1:].isnan().all(), name
        assert getattr(stats, name)[0].isfinite(), name
    assert (stats.head_size[1:] == 0).all() and stats.head_size[0] > 0
    ref, _ = reference_row_losses(student[:1].double(), teacher[:1].double(), mode=mode)
    torch.testing.assert_close(loss[:1].double(), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_invalid_rows_ignored_by_labels(backend, mode):
    """Invalid rows ignored by labels give loss 0, statistics 0 and a zero gradient."""
    student, teacher = invalid_rows()
    loss, stats, grad = run_rows(mode, student, teacher, backend, labels=torch.tensor([1, -100, -100, -100]))
    assert (loss[1:] == 0).all() and loss[0].isfinite()
    for name, value in stats._asdict().items():
        assert (value[1:] == 0).all(), name
    assert (grad[1:] == 0).all() and grad[0].isfinite().all()


def test_invalid_rows_reference_nan_statistics():
    """The reference gives NaN statistics and head size 0 for invalid rows too."""
    student, teacher = invalid_rows()
    loss, stats = reference_row_losses(student.double(), teacher.double())
    assert loss[1:].isnan().all()
    for name in FLOAT_STATS:
        assert stats[name][1:].isnan().all(), name
    assert (stats["head_size"][1:] == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_invalid_rows_backends_agree(mode):
    """Both backends give the same head sizes and the same NaN pattern in loss and statistics."""
    student, teacher = invalid_rows()
    (torch_loss, torch_stats, _), (triton_loss, triton_stats, _) = (
        run_rows(mode, student, teacher, backend) for backend in ("torch", "triton")
    )
    assert torch.equal(torch_stats.head_size, triton_stats.head_size)
    assert torch.equal(torch_loss.isnan(), triton_loss.isnan())
    for name in FLOAT_STATS:
        assert torch.equal(getattr(torch_stats, name).isnan(), getattr(triton_stats, name).isnan()), name


# --- 7. extreme finite logits ------------------------------------------------------------------
# Finite logits never give NaN. A row whose true loss exceeds float32's range gives +inf, and so
# does a row with a log-probability beyond float32's range (a logit more than float32's largest
# value times min(1, T) below its row's maximum, where the other distribution has mass: README
# "What it computes"); every finite loss matches the float64 reference.

BIG = 3e38


def log_probability_beyond_float32(student, teacher, temperature):
    """(N,) bool: rows where x - max or (x - max) / T of some logit of either input, in float64,
    lies below -float32's largest value (the shift comes first: at T > 1 it overflows first)."""
    def beyond(x):
        x = x.double()
        return ((x - x.amax(-1, keepdim=True)) / min(1.0, temperature) < -FLOAT32_MAX).any(-1)

    return beyond(student) | beyond(teacher)


def assert_extreme_rows_match(loss, ref, student, teacher, temperature=1.0):
    """No NaN; +inf where the reference exceeds float32's largest value; +inf elsewhere only in
    rows with a log-probability beyond float32's range; finite values within rtol 1e-3 of the
    reference."""
    assert not loss.isnan().any(), f"NaN loss: {loss.tolist()}"
    beyond = ref > FLOAT32_MAX
    assert (loss[beyond] == INF).all(), f"rows beyond float32's range: {loss[beyond].tolist()}"
    finite = loss.isfinite()
    assert (loss[~finite] == INF).all()
    allowed = beyond | log_probability_beyond_float32(student, teacher, temperature)
    assert allowed[~finite].all(), f"+inf where the reference is {ref[~finite & ~allowed].tolist()}"
    torch.testing.assert_close(loss[finite].double(), ref[finite], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_extreme_finite_logits(backend, mode):
    """Logits of +-3e38 in the teacher, the student or both: no NaN in loss or gradient."""
    student, teacher = torch.randn(8, 64), torch.randn(8, 64)
    teacher[0, 3], teacher[0, 7] = BIG, -BIG  # the teacher's extremes, a moderate student
    student[1, 2], student[1, 9] = BIG, -BIG  # the student's extremes, a moderate teacher
    teacher[2, 4], teacher[2, 5], student[2, 4], student[2, 5] = BIG, -BIG, -BIG, BIG  # opposed
    teacher[3, 10], student[3, 10], teacher[3, 11], student[3, 12] = BIG, BIG, -BIG, -BIG  # agreeing
    s = student.clone().requires_grad_(True)
    loss = LOSSES[mode](s, teacher, reduction="none", backend=backend)
    loss.sum().backward()
    assert not s.grad.isnan().any(), f"NaN gradient in rows {s.grad.isnan().any(-1).nonzero().flatten().tolist()}"
    ref, _ = reference_loss(student.double(), teacher.double(), reduction="none", mode=mode)
    torch.testing.assert_close(loss[4:].double(), ref[4:], rtol=1e-4, atol=1e-6)
    assert_extreme_rows_match(loss.detach(), ref, student, teacher)


@pytest.mark.parametrize("mode", MODES)
def test_extreme_tiny_temperature(backend, mode):
    """temperature 1e-38 (1/T finite in float32) on moderate logits: no NaN in loss or gradient."""
    student, teacher = torch.randn(4, 32), torch.randn(4, 32)
    s = student.clone().requires_grad_(True)
    loss = LOSSES[mode](s, teacher, temperature=1e-38, reduction="none", backend=backend)
    loss.sum().backward()
    assert not s.grad.isnan().any(), f"NaN gradient in rows {s.grad.isnan().any(-1).nonzero().flatten().tolist()}"
    ref, _ = reference_loss(student.double(), teacher.double(), temperature=1e-38, reduction="none", mode=mode)
    assert_extreme_rows_match(loss.detach(), ref, student, teacher, temperature=1e-38)


def test_extreme_temperature_beyond_float32(backend):
    """temperature 1e-39: 1/T overflows float32, so float32 inputs are refused; float64 inputs
    compute it and give no NaN."""
    student, teacher = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match="temperature"):
        akl_loss(student, teacher, temperature=1e-39, backend=backend)
    s = student.double().requires_grad_(True)
    loss = akl_loss(s, teacher.double(), temperature=1e-39, reduction="none", backend=backend)
    loss.sum().backward()
    assert not loss.isnan().any() and not s.grad.isnan().any(), f"loss {loss.tolist()}"


# --- 8. smaller input checks -------------------------------------------------------------------
# Checked before any backend runs, so mostly on the torch backend only.


def test_inputs_tensor_options_rejected():
    """temperature and mu must be Python numbers, not tensors."""
    student, teacher = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(TypeError, match="Python number"):
        akl_loss(student, teacher, temperature=torch.tensor(2.0), backend="torch")
    with pytest.raises(TypeError, match="Python number"):
        akl_loss(student, teacher, mu=torch.tensor(0.5), backend="torch")


def test_inputs_meta_tensors_rejected():
    """Meta tensors (no data) get a clear ValueError, not a failure deep inside."""
    with pytest.raises(ValueError, match="meta"):
        akl_loss(torch.randn(2, 5, device="meta"), torch.randn(2, 5, device="meta"))


def test_inputs_sparse_rejected():
    """Sparse student or teacher logits get a TypeError that says so."""
    student, teacher = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(TypeError, match="(?i)sparse"):
        akl_loss(student.to_sparse(), teacher, backend="torch")
    with pytest.raises(TypeError, match="(?i)sparse"):
        akl_loss(student, teacher.to_sparse(), backend="torch")


def test_inputs_hidden_size_zero(backend):
    """Hidden size 0: the logits are the biases (uniform without them); gradients keep shapes."""
    student_bias, teacher_bias = torch.randn(10, requires_grad=True), torch.randn(10)
    hidden, weight = torch.randn(4, 0, requires_grad=True), torch.randn(10, 0, requires_grad=True)
    loss = fused_linear_akl_loss(hidden, weight, torch.randn(4, 0), torch.randn(10, 0), student_bias, teacher_bias,
                                 backend=backend)
    loss.backward()
    expected = akl_loss(student_bias.detach().expand(4, 10), teacher_bias.expand(4, 10), backend=backend)
    torch.testing.assert_close(loss.detach(), expected)
    bias_ref = student_bias.detach().double().requires_grad_(True)
    reference_loss(bias_ref.expand(4, 10), teacher_bias.double().expand(4, 10))[0].backward()
    torch.testing.assert_close(student_bias.grad.double(), bias_ref.grad, rtol=2e-4, atol=1e-7)
    assert hidden.grad.shape == (4, 0) and weight.grad.shape == (10, 0)

    hidden, weight = torch.randn(4, 0, requires_grad=True), torch.randn(10, 0, requires_grad=True)
    loss = fused_linear_akl_loss(hidden, weight, torch.randn(4, 0), torch.randn(10, 0), backend=backend)
    loss.backward()
    assert loss == 0
    assert hidden.grad.shape == (4, 0) and weight.grad.shape == (10, 0)


def test_inputs_numpy_chunk_size():
    """A NumPy integer chunk_size is accepted like an int; zero is refused."""
    inputs = (torch.randn(6, 8), torch.randn(10, 8), torch.randn(6, 8), torch.randn(10, 8))
    loss = fused_linear_akl_loss(*inputs, chunk_size=np.int64(4), backend="torch")
    assert torch.equal(loss, fused_linear_akl_loss(*inputs, chunk_size=4, backend="torch"))
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_akl_loss(*inputs, chunk_size=np.int64(0), backend="torch")


def test_inputs_return_stats_must_be_bool():
    """return_stats="yes" is refused by the function and by both modules."""
    with pytest.raises(TypeError, match="return_stats"):
        akl_loss(torch.randn(2, 5), torch.randn(2, 5), return_stats="yes", backend="torch")
    with pytest.raises(TypeError, match="return_stats"):
        AKLLoss(return_stats="yes")
    with pytest.raises(TypeError, match="return_stats"):
        FusedLinearAKLLoss(return_stats="yes")


def test_inputs_repr_shows_return_stats():
    """The modules' repr shows return_stats."""
    assert "return_stats=True" in repr(AKLLoss(return_stats=True))
    assert "return_stats=True" in repr(FusedLinearAKLLoss(return_stats=True))
