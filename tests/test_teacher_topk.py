"""The sparse (top-k) teacher, docs/semantics.md rules 31-38: every loss of the family on both
backends against the float64 reference of reference/akl_reference.py, which is itself anchored on
the dense reference when every token is listed (rule 37)."""

from __future__ import annotations

import pytest
import torch

from akl_kernels import (
    LOSSES,
    AKLLoss,
    TeacherTopK,
    akl_loss,
    distillation_loss,
    fkl_loss,
    fused_linear_distillation_loss,
    rkl_loss,
    teacher_topk,
    teacher_topk_from_hidden,
)
from reference import reference_loss

BACKENDS = ("torch", "triton")
KL = ("akl", "fkl", "rkl")
assert KL == LOSSES[:3]  # the KL losses first, then the divergences made of terms


def _case(n_rows=6, vocab=40, k=6, *, seed=0, scale=3.0, pad_rows=(), student_inf=(), dtype=torch.float64):
    """Random student logits and a TeacherTopK of a random teacher (float64 log-probabilities);
    pad_rows list only half their K tokens (the rest -1), student_inf puts -inf in the student at
    the second listed token of those rows."""
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n_rows, vocab, generator=g, dtype=torch.float64) * 2).to(dtype)
    teacher = torch.randn(n_rows, vocab, generator=g, dtype=torch.float64) * scale
    logprobs, indices = teacher_topk(teacher, k)
    logprobs = torch.log_softmax(teacher, -1).gather(-1, indices)  # float64 values for an exact oracle
    for row in pad_rows:
        indices[row, k // 2:] = -1
    for row in student_inf:
        student[row, indices[row, 1]] = float("-inf")
    # Shuffle each row's pairs: the order of the listed tokens must not matter.
    order = torch.rand(n_rows, k, generator=g).argsort(-1)
    return student, TeacherTopK(logprobs.gather(-1, order), indices.gather(-1, order))


def _compare(student, teacher, *, backend, loss="akl", mu=0.5, temperature=1.0, labels=None, reduction="mean"):
    """Loss, statistics and gradient of distillation_loss against reference_loss in float64."""
    s = student.detach().clone().requires_grad_(True)
    ours, stats = distillation_loss(
        s, teacher, loss=loss, mu=mu, temperature=temperature, labels=labels, reduction=reduction,
        return_stats=True, backend=backend,
    )
    ours.sum().backward()
    s_ref = student.detach().double().requires_grad_(True)
    ref, ref_stats = reference_loss(
        s_ref, tuple(teacher), mu=mu, temperature=temperature, labels=labels, reduction=reduction, mode=loss
    )
    torch.where(ref.isnan(), 0.0, ref).sum().backward()
    exact = student.dtype == torch.float64 and teacher.logprobs.dtype == torch.float64
    rtol, atol = (1e-9, 1e-11) if exact else (2e-4, 2e-5)
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=rtol, atol=atol, equal_nan=True)
    for name, value in ref_stats.items():
        ours_value = getattr(stats, name)
        ours_value = ours_value if name == "head_size" else ours_value.double()
        torch.testing.assert_close(ours_value, value, rtol=rtol, atol=atol * 10, equal_nan=True, msg=name)
    grad_tol = dict(rtol=rtol, atol=atol) if student.dtype in (torch.float32, torch.float64) else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(s.grad.double(), s_ref.grad, **grad_tol, equal_nan=True)
    return ours, stats


def test_reference_with_every_token_listed_equals_the_dense_reference():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(5, 30, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(5, 30, generator=g, dtype=torch.float64) * 3
    teacher[0, :4] = float("-inf")  # outside the support on the teacher's side
    student[1, 5:9] = teacher[1, 5:9] = float("-inf")  # and on both sides (where the student alone
    # has -inf, the stored p are not renormalised over the support, unlike the dense loss's)
    temperature = 2.0
    logprobs = torch.log_softmax(teacher / temperature, -1)
    indices = torch.arange(30).expand(5, 30)
    for mode in LOSSES:
        for mu in (0.1, 0.5, 1.0):
            sparse, sparse_stats = reference_loss(
                student, (logprobs, indices), mu=mu, temperature=temperature, mode=mode, reduction="none"
            )
            dense, dense_stats = reference_loss(student, teacher, mu=mu, temperature=temperature, mode=mode, reduction="none")
            torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)
            for name in dense_stats:
                torch.testing.assert_close(sparse_stats[name], dense_stats[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("mu", [0.1, 0.5, 1.0])
def test_matches_the_reference(backend, loss, mu):
    student, teacher = _case(seed=2, pad_rows=(1,), student_inf=(2,))
    _compare(student, teacher, backend=backend, loss=loss, mu=mu, temperature=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_longer_than_a_block(backend):
    # V = 5000 spans three of the Triton kernels' 2048-column blocks: listed tokens on both sides
    # of a block boundary, all in one block, or spread over the row.
    student, teacher = _case(n_rows=3, vocab=5000, k=16, seed=14, scale=6.0)
    indices = teacher.indices.clone()
    indices[0, :4] = torch.tensor([2046, 2047, 2048, 2049])
    indices[1] = torch.arange(4100, 4116)
    teacher = TeacherTopK(teacher.logprobs, indices)
    _compare(student, teacher, backend=backend, reduction="none", mu=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_every_token_listed_equals_the_dense_loss(backend, loss):
    g = torch.Generator().manual_seed(3)
    student = torch.randn(4, 33, generator=g, dtype=torch.float64)
    teacher = torch.randn(4, 33, generator=g, dtype=torch.float64) * 2
    logprobs = torch.log_softmax(teacher, -1)
    dense_s, sparse_s = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    kwargs = dict(loss=loss, reduction="none", return_stats=True, backend=backend)
    dense, dense_stats = distillation_loss(dense_s, teacher, **kwargs)
    indices = torch.arange(33).flip(0).expand(4, 33)
    sparse, sparse_stats = distillation_loss(sparse_s, TeacherTopK(logprobs.gather(-1, indices), indices), **kwargs)
    dense.sum().backward()
    sparse.sum().backward()
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sparse_s.grad, dense_s.grad, rtol=1e-10, atol=1e-12)
    for name, value in dense_stats._asdict().items():
        torch.testing.assert_close(getattr(sparse_stats, name), value, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_temperature_and_large_logits_shift_before_dividing(backend):
    """Rule 21: the student's logits are shifted by the row's largest before T divides them, so
    s / T beyond float32's range gives no NaN and no overflow: with every token listed the
    stored teacher equals the dense loss at T = 1e-3 on logits of +-100, and T = 1e-38 gives no
    NaN in the loss, the statistics or the gradient."""
    g = torch.Generator().manual_seed(4)
    student = torch.randn(3, 33, generator=g) * 100
    teacher = torch.randn(3, 33, generator=g) * 2
    temperature = 1e-3
    indices = torch.arange(33).flip(0).expand(3, 33)
    logprobs = torch.log_softmax(teacher.double() / temperature, -1).gather(-1, indices).float()
    dense_s, sparse_s = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    dense = akl_loss(dense_s, teacher, temperature=temperature, reduction="none", backend=backend)
    sparse = akl_loss(sparse_s, TeacherTopK(logprobs, indices), temperature=temperature, reduction="none",
                      backend=backend)
    dense.sum().backward()
    sparse.sum().backward()
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_s.grad, dense_s.grad, rtol=1e-5, atol=1e-5)

    student, teacher = _case(n_rows=4, vocab=24, k=4, seed=12, dtype=torch.float32)
    s = (student * 30).requires_grad_(True)
    teacher = TeacherTopK(teacher.logprobs.float(), teacher.indices)  # float32 arithmetic: s / T overflows
    loss, stats = akl_loss(s, teacher, temperature=1e-38, reduction="none", return_stats=True, backend=backend)
    loss.sum().backward()
    assert not loss.isnan().any() and not s.grad.isnan().any()
    assert not any(value.isnan().any() for value in stats)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_mass_that_rounds_to_zero_gets_the_floor(backend):
    student, teacher = _case(n_rows=3, vocab=24, k=23, seed=4)
    # Renormalise the 23 listed log-probabilities over themselves: 1 - sum p rounds to about 0,
    # and the bucket (one unlisted token) takes the floor 2^-24.
    logprobs = teacher.logprobs - torch.logsumexp(teacher.logprobs, -1, keepdim=True)
    loss, stats = _compare(student, TeacherTopK(logprobs, teacher.indices), backend=backend, reduction="none")
    assert torch.isfinite(loss).all() and (stats.rkl > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_at_mu_take_the_head_in_index_order(backend):
    # Four listed tokens tied at p = 0.15 after one at 0.3: at mu = 0.65 the head is the first
    # token and the two tied tokens of lowest index.
    vocab = 16
    logprobs = torch.log(torch.tensor([[0.15, 0.3, 0.15, 0.15, 0.15]], dtype=torch.float64))
    indices = torch.tensor([[9, 2, 4, 11, 7]])
    student = torch.linspace(-1.0, 2.0, vocab, dtype=torch.float64)[None]
    _, stats = _compare(student, TeacherTopK(logprobs, indices), backend=backend, mu=0.65, reduction="none")
    assert stats.head_size.tolist() == [3]
    q = torch.softmax(student[0], -1)
    expected_head_gap = sum(abs(p - float(q[j])) for p, j in ((0.3, 2), (0.15, 4), (0.15, 7)))
    assert float(stats.head_gap[0]) == pytest.approx(expected_head_gap, rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_labels_reductions_and_three_dimensional_inputs(backend, reduction):
    student, teacher = _case(n_rows=6, vocab=36, k=5, seed=5, pad_rows=(3,))
    labels = torch.tensor([1, -100, 2, 3, -100, 0])
    student[1] = float("nan")  # ignored rows contribute 0 whatever they hold
    teacher.logprobs[4] = float("nan")
    shape = (2, 3)
    student = student.reshape(*shape, 36).transpose(0, 1)  # non-contiguous leading dimensions
    teacher = TeacherTopK(*(x.reshape(*shape, 5).transpose(0, 1) for x in teacher))
    labels = labels.reshape(shape).transpose(0, 1)
    _compare(student, teacher, backend=backend, labels=labels, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("logprob_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_dtypes(backend, logprob_dtype, index_dtype):
    student, teacher = _case(n_rows=4, vocab=40, k=8, seed=6, dtype=torch.float32)
    teacher = TeacherTopK(teacher.logprobs.to(logprob_dtype), teacher.indices.to(index_dtype))
    _compare(student, teacher, backend=backend, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("student_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_students(backend, student_dtype):
    student, teacher = _case(n_rows=4, vocab=40, k=8, seed=7, dtype=student_dtype)
    _compare(student, TeacherTopK(teacher.logprobs.float(), teacher.indices), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_gradcheck(backend, loss):
    # AKL's weights are constants for autograd (rule 36): as in test_gradcheck.py, the checked
    # function adds (w(s0) - w(s)) * KL(s), zero at s0, so that finite differences see them frozen.
    student, teacher = _case(n_rows=3, vocab=12, k=4, seed=8, pad_rows=(0,))
    student.requires_grad_(True)
    kwargs = dict(loss=loss, temperature=1.5, reduction="sum", return_stats=True, backend=backend)
    _, base = distillation_loss(student.detach(), teacher, **kwargs)

    def frozen_weight_loss(s):
        value, stats = distillation_loss(s, teacher, **kwargs)
        drift = (base.head_weight - stats.head_weight) * stats.fkl + (base.tail_weight - stats.tail_weight) * stats.rkl
        return value + drift.sum()

    assert torch.autograd.gradcheck(frozen_weight_loss, (student,), eps=1e-6, atol=1e-7, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_rows_give_nan(backend):
    """NaN or +inf in the student at a listed or at an unlisted token, or NaN among the stored
    log-probabilities, makes the row's results NaN; the other rows are untouched."""
    student, teacher = _case(n_rows=6, vocab=24, k=4, seed=9)
    listed = lambda row: int(teacher.indices[row, 0])  # noqa: E731
    unlisted = lambda row: next(j for j in range(24) if j not in teacher.indices[row].tolist())  # noqa: E731
    student[0, unlisted(0)] = float("nan")
    student[1, unlisted(1)] = float("inf")
    student[2, listed(2)] = float("nan")
    student[3, listed(3)] = float("inf")
    teacher.logprobs[4, 1] = float("nan")
    loss, stats = akl_loss(student, teacher, reduction="none", return_stats=True, backend=backend)
    assert loss[:5].isnan().all() and loss[5].isfinite()
    assert stats.head_size[:5].tolist() == [0] * 5 and stats.fkl[:5].isnan().all()
    valid = akl_loss(student[5:], TeacherTopK(teacher.logprobs[5:], teacher.indices[5:]), reduction="none", backend=backend)
    assert torch.equal(loss[5:], valid)


def test_named_losses_and_module_take_a_sparse_teacher():
    student, teacher = _case(seed=10)
    for name, function in (("akl", akl_loss), ("fkl", fkl_loss), ("rkl", rkl_loss)):
        expected = distillation_loss(student, teacher, loss=name)
        torch.testing.assert_close(function(student, teacher), expected, rtol=0, atol=0)
    torch.testing.assert_close(AKLLoss(mu=0.3)(student, teacher), akl_loss(student, teacher, mu=0.3), rtol=0, atol=0)


def test_teacher_topk_orders_by_probability_with_ties_by_index():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.0, 2.0]])
    logprobs, indices = teacher_topk(logits, 4, temperature=2.0)
    assert indices.tolist() == [[1, 3, 2, 5]]
    torch.testing.assert_close(logprobs, torch.log_softmax(logits / 2.0, -1)[:, [1, 3, 2, 5]])
    assert logprobs.dtype == torch.float32 and indices.dtype == torch.int64


def test_teacher_topk_from_hidden_states_matches_the_logits_form():
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(2, 5, 8, generator=g)
    weight = torch.randn(50, 8, generator=g)
    bias = torch.randn(50, generator=g)
    from_hidden = teacher_topk_from_hidden(hidden, weight, 7, teacher_bias=bias, temperature=1.5, chunk_size=3)
    from_logits = teacher_topk(hidden @ weight.T + bias, 7, temperature=1.5)
    assert torch.equal(from_hidden.indices, from_logits.indices)
    torch.testing.assert_close(from_hidden.logprobs, from_logits.logprobs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["akl", "srkl"])
def test_hidden_state_loss_matches_the_logits_loss(backend, loss):
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 6, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = teacher_topk(torch.randn(7, 30, generator=g, dtype=torch.float64) * 2, 5)
    labels = torch.tensor([0, 1, -100, 2, 3, 4, 5])
    fused = fused_linear_distillation_loss(hidden, weight, teacher, None, loss=loss, labels=labels, chunk_size=3,
                                           backend=backend)
    grads = torch.autograd.grad(fused, (hidden, weight))
    plain = distillation_loss(hidden @ weight.T, teacher, loss=loss, labels=labels, backend=backend)
    plain_grads = torch.autograd.grad(plain, (hidden, weight))
    torch.testing.assert_close(fused, plain)
    for ours, expected in zip(grads, plain_grads):
        torch.testing.assert_close(ours, expected)


def _bad(student, teacher, **kwargs):
    return lambda: akl_loss(student, teacher, backend="torch", **kwargs)


def test_bad_inputs_get_clear_errors():
    student, teacher = _case(n_rows=3, vocab=10, k=4, seed=13)
    lp, idx = teacher
    cases = [
        (TypeError, "int32 or int64", TeacherTopK(lp, idx.double())),
        (ValueError, "same shape", TeacherTopK(lp[:, :3], idx)),
        (ValueError, "leading shape", TeacherTopK(lp[:2], idx[:2])),
        (ValueError, r"\[-1, V\)", TeacherTopK(lp, torch.where(idx == idx[0, 0], 10, idx))),
        (ValueError, r"\[-1, V\)", TeacherTopK(lp, torch.where(idx == idx[0, 0], -2, idx))),
        (ValueError, "twice", TeacherTopK(lp, torch.cat((idx[:, :1], idx[:, :3]), 1))),
        (ValueError, "look like logits", TeacherTopK(lp + 3.0, idx)),
    ]
    for error, message, bad in cases:
        with pytest.raises(error, match=message):
            _bad(student, bad)()
    wide = torch.zeros(3, 11)
    with pytest.raises(ValueError, match="K must be in"):
        akl_loss(student, TeacherTopK(torch.full((3, 11), -5.0), torch.arange(11).expand(3, 11)))
    with pytest.raises(TypeError, match="must hold float16, bfloat16, float32 or float64"):
        akl_loss(student, TeacherTopK(wide.long(), idx))
    # The mass check looks at kept rows only.
    labels = torch.tensor([-100, 0, 1])
    shifted = TeacherTopK(torch.cat((lp[:1] + 3.0, lp[1:])), idx)
    assert torch.isfinite(akl_loss(student, shifted, labels=labels))
