"""akl_loss, fkl_loss and rkl_loss (and, where cheap, every loss of the family) on both backends
against the float64 reference.

Triton cases run in Triton's interpreter (about 0.1 s per row and block), so shapes are small;
one vocabulary is larger than the kernel's block (4096) to exercise the streaming passes.
"""

import pytest
import torch

from akl_kernels import LOSSES, AKLLoss, akl_loss, fkl_loss, rkl_loss
from reference import reference_loss
from tests.compare import assert_matches_reference, run_loss

NEG_INF = float("-inf")


def logits(*shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("vocab", [1, 2, 17, 3001])
@pytest.mark.parametrize("mode", LOSSES)
def test_random_logits(backend, mode, vocab):
    assert_matches_reference(mode, logits(2, 3, vocab, scale=2.0), logits(2, 3, vocab, scale=2.0), backend)


@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0, 30.0])
def test_logit_scales(backend, scale):
    assert_matches_reference("akl", logits(3, 257, scale=scale), logits(3, 257, scale=scale), backend)


def test_vocabulary_larger_than_block(backend):
    # 5000 > 4096, the kernel's block: every pass streams two blocks.
    student, teacher = logits(2, 5000, scale=3.0), logits(2, 5000, scale=3.0)
    teacher[0, 4500] += 12.0  # the head sits in the second block for row 0
    assert_matches_reference("akl", student, teacher, backend)


def test_peaked_teacher(backend):
    teacher = logits(4, 300, scale=1.0)
    teacher[torch.arange(4), torch.tensor([0, 77, 150, 299])] += 15.0  # top-1 mass above mu
    _, stats, _ = run_loss("akl", logits(4, 300), teacher, backend)
    assert (stats.head_size == 1).all()
    assert_matches_reference("akl", logits(4, 300), teacher, backend)


def test_flat_teacher_head_of_thousands(backend):
    # The head holds about half of 3000 tokens: far beyond the fast path's top 32.
    teacher = logits(2, 3000, scale=0.01)
    _, stats, _ = run_loss("akl", logits(2, 3000), teacher, backend)
    assert (stats.head_size > 1000).all()
    assert_matches_reference("akl", logits(2, 3000), teacher, backend)


def test_uniform_teacher_ties_everywhere(backend):
    # Every teacher logit is equal: the head is the lowest indices, in index order.
    teacher = torch.zeros(2, 1000)
    teacher[1, 500:] = NEG_INF  # the second row's support is the first 500 tokens
    assert_matches_reference("akl", logits(2, 1000), teacher, backend, mu=0.3)


@pytest.mark.parametrize("mu", [0.3, 0.5, 0.62])
def test_integer_logits_tied_at_the_boundary(backend, mu):
    # Few distinct values: groups of ties straddle the mu boundary, in scattered positions.
    teacher = torch.randint(-3, 3, (4, 200)).float()
    teacher[:, torch.randperm(200)[:5]] = 4.0
    assert_matches_reference("akl", logits(4, 200), teacher, backend, mu=mu)


def test_split_tie_group_takes_lowest_indices(backend):
    # Values: one token at 2, four ties at 1 (indices 1, 4, 6, 8), the rest at 0. With these
    # masses the crossing of mu = 0.5 falls inside the tie group: the head is the top token
    # plus the ties of lowest index that keep the running mass <= mu.
    teacher = torch.zeros(1, 10)
    teacher[0, 3] = 2.0
    teacher[0, [1, 4, 6, 8]] = 1.0
    p = torch.softmax(teacher.double(), -1)[0]
    expected_head = 1 + int(((0.5 - p[3]) / p[1]).floor())
    assert 1 < expected_head < 5
    _, stats, _ = run_loss("akl", logits(1, 10), teacher, backend)
    assert int(stats.head_size) == expected_head
    assert_matches_reference("akl", logits(1, 10), teacher, backend)


def test_bf16_rounded_logits(backend):
    # float32 logits that hold bfloat16 values: many exact ties.
    student = logits(4, 600, scale=3.0).bfloat16().float()
    teacher = logits(4, 600, scale=3.0).bfloat16().float()
    assert_matches_reference("akl", student, teacher, backend)


@pytest.mark.parametrize("where", ["teacher", "student", "both"])
def test_minus_inf_padding_and_scattered(backend, where):
    student, teacher = logits(3, 400, scale=2.0), logits(3, 400, scale=2.0)
    scattered = torch.randperm(400)[:60]
    for name, x in (("teacher", teacher), ("student", student)):
        if where in (name, "both"):
            x[:, 350:] = NEG_INF  # padded vocabulary
            x[:, scattered if name == "teacher" else scattered.flip(0)[:30]] = NEG_INF
    teacher[2, :] = teacher[2, :].clamp(max=0)
    teacher[2, 10] = 30.0  # a peaked row too
    assert_matches_reference("akl", student, teacher, backend)


def test_large_magnitude_logits(backend):
    student = 1e4 + logits(2, 300, scale=3.0)
    teacher = -1e4 + logits(2, 300, scale=3.0)
    assert_matches_reference("akl", student, teacher, backend)
    assert_matches_reference("akl", logits(2, 300) * 1e3, logits(2, 300) * 1e3, backend)


def test_student_equals_teacher(backend):
    teacher = logits(2, 3, 500, scale=3.0)
    loss, stats, grad = run_loss("akl", teacher.clone(), teacher, backend)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))
    assert (stats.head_weight == 0.5).all() and (stats.tail_weight == 0.5).all()


# 1 - 1e-9: the running mass of the whole support rounds to within mu (the whole support is head)
@pytest.mark.parametrize("mu", [0.05, 0.5, 0.9, 1 - 1e-9, 1.0])
def test_mu_values(backend, mu):
    assert_matches_reference("akl", logits(3, 700, scale=2.0), logits(3, 700, scale=2.0), backend, mu=mu)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("mode", ["akl", "fkl", "rkl"])
def test_temperatures(backend, mode, temperature):
    assert_matches_reference(
        mode, logits(2, 300, scale=3.0), logits(2, 300, scale=3.0), backend, temperature=temperature
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(backend, dtype):
    student, teacher = logits(2, 2, 300, scale=3.0, dtype=dtype), logits(2, 2, 300, scale=3.0, dtype=dtype)
    assert_matches_reference("akl", student, teacher, backend)
    s = student.clone().requires_grad_(True)
    loss = akl_loss(s, teacher, backend=backend)
    loss.backward()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert s.grad.dtype == dtype


def test_mixed_dtypes(backend):
    # A bfloat16 teacher beside a float32 student.
    student, teacher = logits(2, 300, scale=3.0), logits(2, 300, scale=3.0, dtype=torch.bfloat16)
    assert_matches_reference("akl", student, teacher, backend)


def test_labels_and_ignore_index(backend):
    student, teacher = logits(2, 4, 200, scale=2.0), logits(2, 4, 200, scale=2.0)
    labels = torch.tensor([[1, -100, 3, 4], [-100, -100, 7, 8]])
    student[0, 1] = float("nan")  # an ignored row's NaN must not leak
    teacher[1, 0] = float("inf")
    assert_matches_reference("akl", student, teacher, backend, labels=labels)
    s = student.clone().requires_grad_(True)
    loss = akl_loss(s, teacher, labels=labels, backend=backend)
    loss.backward()
    assert loss.isfinite() and s.grad.isfinite().all()
    assert (s.grad[labels == -100] == 0).all()


def test_custom_ignore_index(backend):
    student, teacher = logits(4, 100), logits(4, 100)
    labels = torch.tensor([5, 0, 5, 2])
    loss = akl_loss(student, teacher, labels=labels, ignore_index=5, reduction="none", backend=backend)
    ref, _ = reference_loss(student.double(), teacher.double(), labels=labels, ignore_index=5, reduction="none")
    torch.testing.assert_close(loss.double(), ref, rtol=2e-4, atol=1e-6)
    assert loss[0] == 0 and loss[2] == 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored(backend, reduction):
    student = logits(2, 3, 50).requires_grad_(True)
    labels = torch.full((2, 3), -100)
    loss = akl_loss(student, logits(2, 3, 50), labels=labels, reduction=reduction, backend=backend)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", ["akl", "fkl", "rkl"])
def test_reductions(backend, mode, reduction):
    student, teacher = logits(2, 3, 150, scale=2.0), logits(2, 3, 150, scale=2.0)
    labels = torch.tensor([[0, -100, 2], [3, 4, -100]])
    fn = {"akl": akl_loss, "fkl": fkl_loss, "rkl": rkl_loss}[mode]
    s = student.clone().requires_grad_(True)
    loss = fn(s, teacher, labels=labels, reduction=reduction, backend=backend)
    grad_output = torch.rand_like(loss) + 0.5
    loss.backward(grad_output)

    s_ref = student.double().requires_grad_(True)
    ref, _ = reference_loss(s_ref, teacher.double(), labels=labels, reduction=reduction, mode=mode)
    ref.backward(grad_output.double())
    assert loss.shape == ref.shape
    torch.testing.assert_close(loss.double(), ref, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), s_ref.grad, rtol=2e-4, atol=2e-7)


def test_non_contiguous_inputs(backend):
    base_s, base_t = logits(4, 3, 300, scale=2.0), logits(4, 3, 300, scale=2.0)
    views = [
        (base_s.transpose(0, 1), base_t.transpose(0, 1)),  # leading dims permuted
        (base_s[::2, 1:], base_t[1::2, :2]),  # strided rows, not collapsible to one stride
        (base_s.transpose(0, 2)[:100].transpose(0, 2), base_t[..., ::3]),  # vocabulary not contiguous
    ]
    for student, teacher in views:
        assert not student.is_contiguous()
        assert_matches_reference("akl", student, teacher, backend)
        dense, _, dense_grad = run_loss("akl", student.contiguous(), teacher.contiguous(), backend)
        strided, _, strided_grad = run_loss("akl", student, teacher, backend)
        torch.testing.assert_close(strided, dense, rtol=0, atol=0)
        torch.testing.assert_close(strided_grad, dense_grad, rtol=0, atol=0)


def test_triton_reads_strided_rows_without_copy(monkeypatch):
    # Rows addressed by offsets: no .contiguous() when the vocabulary dimension is contiguous.
    student, teacher = logits(6, 4, 64)[::2, 1:], logits(4, 6, 64).transpose(0, 1)[:3, 1:]
    expected = akl_loss(student.contiguous(), teacher.contiguous(), backend="triton")

    def no_copy(self, *args, **kwargs):
        raise AssertionError("the Triton backend copied a strided input")

    monkeypatch.setattr(torch.Tensor, "contiguous", no_copy)
    assert torch.equal(akl_loss(student, teacher, backend="triton"), expected)


def test_grad_output_and_larger_graph(backend):
    student, teacher = logits(2, 3, 200, scale=2.0), logits(2, 3, 200, scale=2.0)
    weight = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    s = student.clone().requires_grad_(True)
    loss = akl_loss(s, teacher, backend=backend)
    total = weight * loss + 0.25 * (s.float() ** 2).mean()
    total.backward()

    s_ref = student.double().requires_grad_(True)
    w_ref = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    ref, _ = reference_loss(s_ref, teacher.double())
    (w_ref * ref + 0.25 * (s_ref ** 2).mean()).backward()
    torch.testing.assert_close(s.grad.double(), s_ref.grad, rtol=2e-4, atol=2e-7)
    torch.testing.assert_close(weight.grad, w_ref.grad, rtol=2e-4, atol=1e-6)


def test_scaled_loss_backward(backend):
    student, teacher = logits(4, 300, scale=2.0), logits(4, 300, scale=2.0)
    s1 = student.clone().requires_grad_(True)
    akl_loss(s1, teacher, backend=backend).backward()
    s3 = student.clone().requires_grad_(True)
    (3.0 * akl_loss(s3, teacher, backend=backend)).backward()
    torch.testing.assert_close(s3.grad, 3.0 * s1.grad, rtol=1e-6, atol=1e-9)


def test_second_backward_through_retained_graph(backend):
    # The second backward recomputes the gradient from the saved inputs (the first may take the
    # forward's): the same values, up to float32 rounding of the recomputation.
    student, teacher = logits(3, 200, scale=2.0).requires_grad_(True), logits(3, 200, scale=2.0)
    loss = akl_loss(student, teacher, reduction="none", backend=backend)
    (first,) = torch.autograd.grad(loss, student, torch.full_like(loss, 2.0), retain_graph=True)
    (second,) = torch.autograd.grad(loss, student, torch.full_like(loss, 2.0))
    torch.testing.assert_close(second, first, rtol=1e-5, atol=1e-8)
    assert first.abs().amax() > 1e-3


def test_no_gradient_in_evaluation(backend, monkeypatch):
    student, teacher = logits(3, 200).requires_grad_(True), logits(3, 200)
    with torch.no_grad():
        loss = akl_loss(student, teacher, backend=backend)
    assert loss.grad_fn is None
    assert akl_loss(student.detach(), teacher, backend=backend).grad_fn is None
    # The backend's operator is not asked for a gradient (its last argument, forward_grad).
    import akl_kernels.loss as loss_module

    seen = []
    original = loss_module.row_losses

    def spy(*args):
        seen.append(args[-1])
        return original(*args)

    monkeypatch.setattr(loss_module, "row_losses", spy)
    with torch.no_grad():
        akl_loss(student, teacher, backend=backend)
    assert seen == [False]


@pytest.mark.parametrize("bad", ["nan", "inf", "empty"])
def test_invalid_rows_give_nan(backend, bad):
    student, teacher = logits(3, 100), logits(3, 100)
    if bad == "nan":
        student[1, 7] = float("nan")
    elif bad == "inf":
        teacher[1, 7] = float("inf")
    else:
        teacher[1, :50] = NEG_INF
        student[1, 50:] = NEG_INF
    loss, stats, grad = run_loss("akl", student, teacher, backend)
    assert loss[1].isnan() and loss[[0, 2]].isfinite().all()
    assert grad[1].isnan().all() and grad[[0, 2]].isfinite().all()
    assert akl_loss(student, teacher, backend=backend).isnan()
    # statistics of the invalid row: NaN, head size 0, on both backends alike
    for name in ("fkl", "rkl", "head_gap", "tail_gap", "head_weight", "tail_weight"):
        assert getattr(stats, name)[1].isnan() and getattr(stats, name)[[0, 2]].isfinite().all(), name
    assert stats.head_size[1] == 0 and (stats.head_size[[0, 2]] > 0).all()


def test_return_stats_fields(backend):
    student, teacher = logits(2, 3, 120, scale=2.0), logits(2, 3, 120, scale=2.0)
    loss, stats = akl_loss(student, teacher, return_stats=True, reduction="none", backend=backend)
    assert stats._fields == ("fkl", "rkl", "head_gap", "tail_gap", "head_weight", "tail_weight", "head_size")
    for value in stats:
        assert value.shape == (2, 3) and not value.requires_grad
    assert stats.head_size.dtype == torch.int64
    torch.testing.assert_close(loss, stats.head_weight * stats.fkl + stats.tail_weight * stats.rkl)
    torch.testing.assert_close(stats.head_weight + stats.tail_weight, torch.ones(2, 3))
    # fkl_loss / rkl_loss report the same diagnostics (split at mu = 0.5) with fixed weights.
    fkl, fkl_stats = fkl_loss(student, teacher, return_stats=True, reduction="none", backend=backend)
    torch.testing.assert_close(fkl, stats.fkl)
    assert torch.equal(fkl_stats.head_size, stats.head_size)
    assert (fkl_stats.head_weight == 1).all() and (fkl_stats.tail_weight == 0).all()
    rkl, rkl_stats = rkl_loss(student, teacher, return_stats=True, reduction="none", backend=backend)
    torch.testing.assert_close(rkl, stats.rkl)
    assert (rkl_stats.head_weight == 0).all() and (rkl_stats.tail_weight == 1).all()


def test_single_row_1d(backend):
    student, teacher = logits(50, scale=2.0), logits(50, scale=2.0)
    loss = akl_loss(student, teacher, reduction="none", backend=backend)
    assert loss.shape == ()
    assert_matches_reference("akl", student, teacher, backend)


def test_module(backend):
    student, teacher = logits(2, 3, 80), logits(2, 3, 80)
    labels = torch.tensor([[1, 2, -1], [-1, 4, 5]])
    module = AKLLoss(mu=0.4, temperature=2.0, ignore_index=-1, backend=backend)
    expected = akl_loss(student, teacher, mu=0.4, temperature=2.0, labels=labels, ignore_index=-1, backend=backend)
    assert torch.equal(module(student, teacher, labels), expected)
    assert "mu=0.4" in repr(module)


@pytest.mark.parametrize("mode", ["fkl", "rkl"])
def test_fkl_rkl_match_kl_div(backend, mode):
    student, teacher = logits(4, 6, 300, scale=2.0), logits(4, 6, 300, scale=2.0)
    log_q = torch.log_softmax(student.double() / 2.0, -1)
    log_p = torch.log_softmax(teacher.double() / 2.0, -1)
    if mode == "fkl":
        expected = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="sum") / 24
        loss = fkl_loss(student, teacher, temperature=2.0, backend=backend)
    else:
        expected = torch.nn.functional.kl_div(log_p, log_q, log_target=True, reduction="sum") / 24
        loss = rkl_loss(student, teacher, temperature=2.0, backend=backend)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)


def test_backends_agree_on_a_batch():
    student, teacher = logits(2, 8, 1500, scale=3.0), logits(2, 8, 1500, scale=3.0)
    labels = torch.randint(0, 5, (2, 8))
    labels[0, :3] = -100
    out = {}
    for name in ("torch", "triton"):
        s = student.clone().requires_grad_(True)
        loss, stats = akl_loss(s, teacher, labels=labels, return_stats=True, backend=name)
        loss.backward()
        out[name] = (loss, stats, s.grad)
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["triton"][2], out["torch"][2], rtol=1e-4, atol=2e-7)
    assert torch.equal(out["triton"][1].head_size, out["torch"][1].head_size)


def test_teacher_gets_no_gradient(backend):
    student, teacher = logits(2, 50).requires_grad_(True), logits(2, 50).requires_grad_(True)
    akl_loss(student, teacher, backend=backend).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
