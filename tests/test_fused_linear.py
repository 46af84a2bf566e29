"""fused_linear_*_loss against akl_loss / fkl_loss / rkl_loss on materialised logits, both backends.

The materialised side is what a user would write without us: float32 logits from the same
hidden states and weights (F.linear on float32 copies), our logits loss on them, and autograd
through the linear layer. Loss, every statistic, and the gradients with respect to the
student's hidden states, weight and bias must agree. Shapes are small for Triton's interpreter.
"""

import pytest
import torch
import torch.nn.functional as F

from akl_kernels import (
    AKLLoss,
    FusedLinearAKLLoss,
    akl_loss,
    fkl_loss,
    fused_linear_akl_loss,
    fused_linear_cross_entropy,
    fused_linear_fkl_loss,
    fused_linear_rkl_loss,
    rkl_loss,
)
from akl_kernels.fused_linear import _mm_has_float32_output, default_chunk_rows
from reference.compare import STATS_NAMES

FUSED = {"akl": fused_linear_akl_loss, "fkl": fused_linear_fkl_loss, "rkl": fused_linear_rkl_loss}
MATERIALISED = {"akl": akl_loss, "fkl": fkl_loss, "rkl": rkl_loss}
STUDENT_GRADS = ("hidden", "weight", "bias")


def make_inputs(leading=(2, 4), hidden=(8, 6), vocab=300, dtype=torch.float32, bias=True):
    """Student and teacher hidden states, lm_head weights and biases giving logits of spread ~2."""
    (h_s, h_t), n = hidden, torch.Size(leading).numel()
    inputs = dict(
        student_hidden=torch.randn(*leading, h_s, dtype=torch.float64),
        student_weight=torch.randn(vocab, h_s, dtype=torch.float64) * (2.0 / h_s**0.5),
        teacher_hidden=torch.randn(*leading, h_t, dtype=torch.float64),
        teacher_weight=torch.randn(vocab, h_t, dtype=torch.float64) * (2.5 / h_t**0.5),
        student_bias=torch.randn(vocab, dtype=torch.float64) * 0.5 if bias else None,
        teacher_bias=torch.randn(vocab, dtype=torch.float64) * 0.5 if bias else None,
    )
    assert n > 0
    return {k: None if v is None else v.to(dtype) for k, v in inputs.items()}


def _leaves(inputs):
    """Copies of the inputs; the student's tensors require grad."""
    leaves = {k: None if v is None else v.detach().clone() for k, v in inputs.items()}
    for name in ("student_hidden", "student_weight", "student_bias"):
        if leaves[name] is not None:
            leaves[name].requires_grad_(True)
    return leaves


def _grads(loss, leaves, grad_output):
    loss.backward(grad_output)
    return {g: leaves[f"student_{g}"].grad if leaves[f"student_{g}"] is not None else None for g in STUDENT_GRADS}


def run_fused(mode, inputs, grad_output=None, **kwargs):
    leaves = _leaves(inputs)
    if mode != "akl":
        kwargs.pop("mu", None)
    loss, stats = FUSED[mode](**leaves, return_stats=True, **kwargs)
    grad_output = torch.ones_like(loss) if grad_output is None else grad_output
    return loss.detach(), stats, _grads(loss, leaves, grad_output)


def run_materialised(mode, inputs, grad_output=None, logits_dtype=torch.float32, **kwargs):
    """The same loss through (N, V) logits: F.linear in logits_dtype, then our logits loss."""
    kwargs.pop("chunk_size", None)
    if mode != "akl":
        kwargs.pop("mu", None)
    leaves = _leaves(inputs)

    def logits(side):
        bias = leaves[f"{side}_bias"]
        return F.linear(leaves[f"{side}_hidden"].to(logits_dtype), leaves[f"{side}_weight"].to(logits_dtype),
                        None if bias is None else bias.to(logits_dtype))

    with torch.no_grad():
        teacher_logits = logits("teacher")
    loss, stats = MATERIALISED[mode](logits("student"), teacher_logits, return_stats=True, **kwargs)
    grad_output = torch.ones_like(loss) if grad_output is None else grad_output
    return loss.detach(), stats, _grads(loss, leaves, grad_output)


def assert_same(fused, materialised, *, rtol=1e-4, atol=1e-6, grad_rtol=None):
    """Loss, statistics and student gradients agree; gradients keep their inputs' dtypes."""
    loss, stats, grads = fused
    ref_loss, ref_stats, ref_grads = materialised
    assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    for name in STATS_NAMES:
        ours, ref = getattr(stats, name), getattr(ref_stats, name)
        if name == "head_size":
            assert torch.equal(ours, ref), f"head_size {ours} vs {ref}"
        else:
            torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    for name in STUDENT_GRADS:
        ours, ref = grads[name], ref_grads[name]
        if ref is None:
            assert ours is None
            continue
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, name
        scale = float(ref.abs().max().clamp(min=1e-30))
        torch.testing.assert_close(ours, ref, rtol=grad_rtol or rtol, atol=atol * max(1.0, scale),
                                   msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize(
    "mode,bias,chunk_size",
    [("akl", True, None), ("akl", False, 3), ("akl", True, 1), ("fkl", True, 3), ("rkl", False, None)],
)
def test_matches_materialised_logits(backend, mode, bias, chunk_size):
    inputs = make_inputs(bias=bias)
    kwargs = dict(mu=0.4, temperature=1.5, chunk_size=chunk_size, backend=backend)
    assert_same(run_fused(mode, inputs, **kwargs), run_materialised(mode, inputs, **kwargs))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignored_rows_and_reductions(backend, reduction):
    # Ignored rows hold NaN hidden states: they must cost no product (a product with a zero
    # gradient row would still put 0 * NaN = NaN into the weight's gradient).
    inputs = make_inputs(leading=(9,))
    labels = torch.tensor([3, -100, 5, 5, -100, -100, 1, 2, -100])
    for name in ("student_hidden", "teacher_hidden"):
        inputs[name][labels == -100] = float("nan")
    grad_output = torch.rand(9) + 0.5 if reduction == "none" else None
    kwargs = dict(labels=labels, reduction=reduction, chunk_size=2, backend=backend)
    fused = run_fused("akl", inputs, grad_output, **kwargs)
    loss, _, grads = fused
    assert loss.isfinite().all() and all(g.isfinite().all() for g in grads.values())
    assert (grads["hidden"][labels == -100] == 0).all()
    # The reference sees finite numbers at the ignored rows (its logits are all computed).
    clean = dict(inputs)
    for name in ("student_hidden", "teacher_hidden"):
        clean[name] = torch.nan_to_num(inputs[name], nan=0.25)
    assert_same(fused, run_materialised("akl", clean, grad_output, **kwargs))


def test_every_row_ignored(backend):
    inputs = make_inputs(leading=(3,))
    loss, stats, grads = run_fused("akl", inputs, labels=torch.full((3,), -100), backend=backend)
    assert loss == 0 and (stats.fkl == 0).all()
    assert all((g == 0).all() for g in grads.values())


def test_non_contiguous_hidden_states(backend):
    # As a causal LM's training step slices them: hidden[:, :-1] predicts labels[:, 1:].
    inputs = make_inputs(leading=(2, 5))
    for name in ("student_hidden", "teacher_hidden"):
        inputs[name] = inputs[name][:, :-1]
    assert not inputs["student_hidden"].is_contiguous()
    kwargs = dict(chunk_size=3, backend=backend)
    assert_same(run_fused("akl", inputs, **kwargs), run_materialised("akl", inputs, **kwargs))


# The backend only ever sees float32 logits; float16 runs on one backend to save interpreter time.
@pytest.mark.parametrize("backend,dtype", [("torch", torch.bfloat16), ("triton", torch.bfloat16), ("torch", torch.float16)])
def test_half_precision_inputs(backend, dtype):
    # The logits are float32 products of the 16-bit inputs, never rounded to 16 bits: the loss
    # equals the float32-logits one to float32 rounding, while rounding the logits to the
    # input dtype (what F.linear in 16 bits gives) moves it by far more than that tolerance.
    inputs = make_inputs(leading=(6,), vocab=500, dtype=dtype)
    kwargs = dict(chunk_size=4, reduction="none", backend=backend)
    fused = run_fused("akl", inputs, **kwargs)
    assert_same(fused, run_materialised("akl", inputs, **kwargs), rtol=1e-4, atol=1e-5, grad_rtol=2e-2)
    rounded_loss = run_materialised("akl", inputs, logits_dtype=dtype, **kwargs)[0]
    assert not torch.allclose(fused[0], rounded_loss, rtol=1e-4, atol=1e-5)


def test_float64_matches_and_mixes(backend):
    # float64 everywhere, then a float32 teacher beside a float64 student: the loss is float64.
    inputs = make_inputs(leading=(5,), dtype=torch.float64)
    kwargs = dict(chunk_size=2, backend=backend)
    assert_same(run_fused("akl", inputs, **kwargs), run_materialised("akl", inputs, torch.ones(()), torch.float64,
                                                                     **kwargs), rtol=1e-9, atol=1e-11)
    for name in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        inputs[name] = inputs[name].float()
    loss = run_fused("akl", inputs, **kwargs)[0]
    assert loss.dtype == torch.float64


def test_hidden_and_weight_dtypes_may_differ(backend):
    # bf16 hidden states (an autocast model's) beside float32 lm_head weights are multiplied in
    # float32, as F.linear on float32 copies; autocast around the call changes nothing.
    inputs = make_inputs(leading=(6,))
    for name in ("student_hidden", "teacher_hidden"):
        inputs[name] = inputs[name].bfloat16()
    kwargs = dict(chunk_size=4, backend=backend)
    fused = run_fused("akl", inputs, **kwargs)
    assert fused[2]["hidden"].dtype == torch.bfloat16 and fused[2]["weight"].dtype == torch.float32
    assert_same(fused, run_materialised("akl", inputs, **kwargs), grad_rtol=2e-2)
    with torch.autocast(inputs["student_weight"].device.type, dtype=torch.bfloat16):
        under_autocast = run_fused("akl", inputs, **kwargs)
    assert_same(under_autocast, fused, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend,mode", [("torch", "akl"), ("torch", "fkl"), ("torch", "rkl"), ("triton", "akl")])
def test_gradcheck(backend, mode):
    # float64 finite differences through the hidden states, weight and bias. AKL's weights are
    # constants for autograd (docs/semantics.md section 2): as in test_gradcheck.py, the checked function
    # adds (w(x0) - w(x)) * KL(x), zero at x0, so that its finite differences see frozen weights.
    inputs = make_inputs(leading=(3,), hidden=(2, 3), vocab=6, dtype=torch.float64)
    labels = torch.tensor([0, -100, 4])
    teacher = {k: inputs[k] for k in ("teacher_hidden", "teacher_weight", "teacher_bias")}
    kwargs = dict(temperature=1.3, labels=labels, chunk_size=1, backend=backend)
    fn = FUSED[mode]

    def frozen_weight_loss(hidden, weight, bias):
        loss, stats = fn(hidden, weight, student_bias=bias, **teacher, return_stats=True, **kwargs)
        drift = (base.head_weight - stats.head_weight) * stats.fkl + (base.tail_weight - stats.tail_weight) * stats.rkl
        return loss + drift.sum() / 2

    student = [inputs[k].clone().requires_grad_(True) for k in ("student_hidden", "student_weight", "student_bias")]
    _, base = fn(*(x.detach() for x in student[:2]), student_bias=student[2].detach(), **teacher,
                 return_stats=True, **kwargs)
    # fast_mode for Triton: the gradient along a random direction (see test_gradcheck.py)
    assert torch.autograd.gradcheck(frozen_weight_loss, student, eps=1e-6, atol=1e-7, fast_mode=backend == "triton")


def test_only_the_wanted_gradients(backend):
    # A frozen lm_head (LoRA-style): only the hidden states get a gradient; without grad mode none.
    inputs = make_inputs(leading=(4,))
    hidden = inputs["student_hidden"].clone().requires_grad_(True)
    loss = fused_linear_akl_loss(hidden, inputs["student_weight"], inputs["teacher_hidden"], inputs["teacher_weight"],
                                 backend=backend)
    loss.backward()
    leaves = _leaves(inputs)
    materialised = akl_loss(F.linear(leaves["student_hidden"], inputs["student_weight"]),
                            F.linear(inputs["teacher_hidden"], inputs["teacher_weight"]), backend=backend)
    materialised.backward()
    torch.testing.assert_close(hidden.grad, leaves["student_hidden"].grad, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        assert fused_linear_akl_loss(**_leaves(inputs), backend=backend).grad_fn is None


def test_retained_graph_backward_twice(backend):
    inputs = make_inputs(leading=(4,))
    leaves = _leaves(inputs)
    loss = fused_linear_akl_loss(**leaves, chunk_size=3, backend=backend)
    loss.backward(retain_graph=True)
    first = leaves["student_weight"].grad.clone()
    (2 * loss).backward()  # recomputed from the saved inputs, scaled by 2
    torch.testing.assert_close(leaves["student_weight"].grad, 3 * first, rtol=1e-5, atol=1e-8)


def test_module():
    inputs = make_inputs(leading=(4,))
    labels = torch.tensor([1, -1, 2, 3])
    module = FusedLinearAKLLoss(loss="rkl", temperature=2.0, ignore_index=-1, reduction="sum")
    expected = fused_linear_rkl_loss(**inputs, temperature=2.0, labels=labels, ignore_index=-1, reduction="sum")
    torch.testing.assert_close(module(**inputs, labels=labels), expected)
    assert "loss='rkl'" in repr(module)
    akl = FusedLinearAKLLoss(mu=0.3)(**inputs)
    assert akl == fused_linear_akl_loss(**inputs, mu=0.3)
    with pytest.raises(ValueError, match="loss must be one of"):
        FusedLinearAKLLoss(loss="kl")
    with pytest.raises(ValueError, match="chunk_size must be"):
        FusedLinearAKLLoss(chunk_size=0)
    assert isinstance(AKLLoss(), torch.nn.Module)


def test_default_chunk_rows():
    # The chunk's logits hold about a quarter of the weight's elements (H / 4 rows), and at
    # least 2^20 elements for small hidden sizes.
    assert default_chunk_rows(32000, 512) == 128  # the CPU benchmark shape
    assert default_chunk_rows(128256, 4096) == 1024  # the GPU benchmark shape
    assert default_chunk_rows(4000, 64) == 262
    assert default_chunk_rows(2**22, 4) == 1


def test_float32_output_probe():
    # Whether 16-bit products can have float32 output decides between 16-bit operands and a
    # float32 copy of the weight; the probe must answer both ways.
    assert not _mm_has_float32_output(torch.device("cpu"), torch.bfloat16)  # no CPU kernel
    assert _mm_has_float32_output(torch.device("meta"), torch.bfloat16)  # shape rules only


def _bad(**changes):
    inputs = make_inputs(leading=(2, 3))
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize(
    "changes,error,message",
    [
        (dict(student_hidden=torch.randn(2, 3, 7)), ValueError, "student_hidden's last dimension"),
        (dict(teacher_weight=torch.randn(300, 5)), ValueError, "teacher_hidden's last dimension"),
        (dict(teacher_weight=torch.randn(301, 6), teacher_bias=None), ValueError, "same vocabulary size"),
        (dict(teacher_hidden=torch.randn(3, 2, 6)), ValueError, "same leading shape"),
        (dict(student_weight=torch.randn(300, 8, 1)), ValueError, r"shape \(V, H\)"),
        (dict(student_bias=torch.randn(299)), ValueError, r"student_bias must have shape \(300,\)"),
        (dict(student_hidden=torch.tensor(1.0)), ValueError, "0-dim"),
        (dict(student_hidden=torch.zeros(2, 3, 8, dtype=torch.int64)), TypeError, "student_hidden must hold"),
        (dict(teacher_weight=[[1.0]]), TypeError, "teacher_weight must be a torch.Tensor"),
        (dict(student_weight=torch.randn(0, 8), student_bias=None, teacher_weight=torch.randn(0, 6),
              teacher_bias=None), ValueError, "vocabulary dimension"),
        (dict(teacher_bias=torch.randn(300, device="meta")), ValueError, "teacher_bias is on meta"),
    ],
)
def test_bad_inputs(changes, error, message):
    with pytest.raises(error, match=message):
        fused_linear_akl_loss(**_bad(**changes))


@pytest.mark.parametrize(
    "options,error,message",
    [
        (dict(labels=torch.zeros(6, dtype=torch.long)), ValueError, "hidden states' leading shape"),
        (dict(labels=torch.zeros(2, 3)), TypeError, "integer tensor"),
        (dict(mu=0.0), ValueError, "mu must be"),
        (dict(temperature=-1.0), ValueError, "temperature must be"),
        (dict(reduction="batchmean"), ValueError, "reduction must be"),
        (dict(backend="cuda"), ValueError, "backend must be"),
        (dict(chunk_size=2.5), ValueError, "chunk_size must be"),
        (dict(chunk_size=True), ValueError, "chunk_size must be"),
    ],
)
def test_bad_options(options, error, message):
    with pytest.raises(error, match=message):
        fused_linear_akl_loss(**make_inputs(leading=(2, 3)), **options)


def test_invalid_rows_give_nan(backend):
    # A kept row whose hidden state holds NaN gives a NaN loss for that row (never a number).
    inputs = make_inputs(leading=(3,))
    inputs["student_hidden"][1, 0] = float("nan")
    loss = fused_linear_akl_loss(**inputs, reduction="none", backend=backend)
    assert loss[1].isnan() and loss[[0, 2]].isfinite().all()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_linear_cross_entropy_matches_materialised_logits(reduction):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(30, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 30, (3, 5), generator=g)
    labels[0, :2] = -100
    hidden.data[0, :2] = float("nan")  # ignored rows are never multiplied
    ours = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, reduction=reduction, chunk_size=4)
    grads = torch.autograd.grad(ours, (hidden, weight, bias))
    clean = hidden.detach().nan_to_num(0.0).requires_grad_(True)
    logits = torch.nn.functional.linear(clean, weight, bias)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction=reduction)
    expected_grads = torch.autograd.grad(expected, (clean, weight, bias))
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        fused_linear_cross_entropy(hidden, weight, labels, reduction="none")
