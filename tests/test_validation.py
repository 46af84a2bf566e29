"""Bad input gets a clear exception (docs/semantics.md section 3), on both backends."""

import os

import pytest
import torch

from akl_kernels import AKLLoss, akl_loss, fkl_loss, rkl_loss


def pair(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize(
    "student_shape,teacher_shape,message",
    [
        ((2, 3, 10), (2, 3, 11), "same vocabulary size"),
        ((2, 3, 10), (3, 2, 10), "same leading shape"),
        ((2, 3, 10), (6, 10), "same leading shape"),
        ((2, 0), (2, 0), "vocabulary dimension"),
    ],
)
def test_shapes(backend, student_shape, teacher_shape, message):
    with pytest.raises(ValueError, match=message):
        akl_loss(torch.randn(student_shape), torch.randn(teacher_shape), backend=backend)


def test_zero_dim_logits(backend):
    with pytest.raises(ValueError, match=r"shape \(\.\.\., V\)"):
        akl_loss(torch.tensor(1.0), torch.tensor(1.0), backend=backend)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_logits(backend, dtype):
    s, t = pair(2, 5)
    with pytest.raises(TypeError, match="student_logits must hold float16, bfloat16, float32 or float64"):
        akl_loss(s.to(dtype), t, backend=backend)
    with pytest.raises(TypeError, match="teacher_logits must hold"):
        akl_loss(s, t.to(dtype), backend=backend)


def test_not_a_tensor(backend):
    with pytest.raises(TypeError, match="student_logits must be a torch.Tensor"):
        akl_loss([[1.0, 2.0]], torch.randn(1, 2), backend=backend)


@pytest.mark.parametrize(
    "labels,error,message",
    [
        (torch.zeros(2, 4, dtype=torch.long), ValueError, "leading shape"),
        (torch.zeros(6, dtype=torch.long), ValueError, "leading shape"),
        (torch.zeros(2, 3), TypeError, "integer tensor"),
        (torch.zeros(2, 3, dtype=torch.bool), TypeError, "integer tensor"),
        ([[0, 1, 2], [0, 1, 2]], TypeError, "torch.Tensor or None"),
    ],
)
def test_bad_labels(backend, labels, error, message):
    s, t = pair(2, 3, 10)
    with pytest.raises(error, match=message):
        akl_loss(s, t, labels=labels, backend=backend)


@pytest.mark.parametrize("mu", [0.0, -0.1, 1.0001, float("nan"), float("inf"), True, "0.5", None])
def test_bad_mu(backend, mu):
    s, t = pair(2, 10)
    with pytest.raises(ValueError, match=r"mu must be a Python number in \(0, 1\]"):
        akl_loss(s, t, mu=mu, backend=backend)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan"), "1", None])
@pytest.mark.parametrize("fn", [akl_loss, fkl_loss, rkl_loss])
def test_bad_temperature(backend, fn, temperature):
    s, t = pair(2, 10)
    with pytest.raises(ValueError, match="temperature must be a Python number > 0 and finite"):
        fn(s, t, temperature=temperature, backend=backend)


def test_bad_reduction_and_backend():
    s, t = pair(2, 10)
    with pytest.raises(ValueError, match="reduction must be one of"):
        akl_loss(s, t, reduction="batchmean")
    with pytest.raises(ValueError, match="backend must be one of"):
        akl_loss(s, t, backend="cuda")
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        akl_loss(s, t, ignore_index=-100.0)


def test_module_checks_its_arguments_when_built():
    with pytest.raises(ValueError, match="mu must be"):
        AKLLoss(mu=2.0)
    with pytest.raises(ValueError, match="reduction must be"):
        AKLLoss(reduction="avg")


def test_different_devices():
    s = torch.randn(2, 10)
    t = torch.randn(2, 10, device="meta")
    with pytest.raises(ValueError, match=f"is on {s.device} but teacher_logits is on meta"):
        akl_loss(s, t)
    labels = torch.zeros(2, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="labels are on meta"):
        akl_loss(s, s.clone(), labels=labels)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    s, t = (x.cpu() for x in pair(2, 10))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        akl_loss(s, t, backend="triton")
    if os.environ.get("AKL_TEST_DEVICE", "cpu") != "cpu":
        return  # triton was imported without its interpreter: CPU tensors cannot run here
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert os.environ["TRITON_INTERPRET"] == "1"
    assert akl_loss(s, t, backend="triton").isfinite()


def test_auto_backend_on_cpu_is_torch(monkeypatch):
    from akl_kernels._dispatch import select_backend
    from akl_kernels.torch_backend import TORCH_BACKEND

    assert select_backend("auto", torch.device("cpu")) is TORCH_BACKEND
