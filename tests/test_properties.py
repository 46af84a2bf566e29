"""Property-based comparison of both backends with the reference (hypothesis).

Losses of the family (and their beta / alpha), shapes, mu, temperature, logit distributions (Gaussian at several scales, or integers with many
ties), a common offset of the logits (up to 1e6, where float32 spaces them 1/16 apart and the
torch backend's bucket keys round) and -inf masks in either input are drawn at random; every row must match the reference
(up to the head/tail ambiguity that docs/semantics.md allows within rounding of mu, see tests/compare.py).
"""

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from akl_kernels import LOSSES
from akl_kernels.divergences import DIVERGENCES
from tests.compare import assert_matches_reference, torch_ops_split

cases = st.fixed_dictionaries(
    {
        "rows": st.integers(1, 3),
        "vocab": st.one_of(st.integers(1, 70), st.sampled_from([257, 1000])),
        "mu": st.one_of(st.floats(0.01, 1.0), st.sampled_from([0.5, 1.0])),
        "temperature": st.sampled_from([0.5, 1.0, 1.7, 4.0]),
        "kind": st.sampled_from(["gauss", "integers", "peaked", "flat"]),
        "scale": st.sampled_from([0.3, 1.0, 5.0]),
        "offset": st.sampled_from([0.0, 0.0, 1e3, 1e6]),
        "teacher_mask": st.floats(0.0, 0.6),
        "student_mask": st.floats(0.0, 0.3),
        "mode": st.sampled_from(["akl", "akl", *LOSSES]),
        "parameter": st.floats(0.05, 0.95),  # beta or alpha, for the losses that take one
        "seed": st.integers(0, 2**31 - 1),
    }
)


def build(case):
    generator = torch.Generator(torch.get_default_device()).manual_seed(case["seed"])
    shape = (case["rows"], case["vocab"])

    def draw():
        if case["kind"] == "integers":
            return torch.randint(-3, 4, shape, generator=generator).float()
        x = torch.randn(shape, generator=generator) * case["scale"]
        if case["kind"] == "peaked":
            x[:, torch.randint(0, case["vocab"], (1,), generator=generator)] += 10.0
        if case["kind"] == "flat":
            x *= 0.01
        return x

    student, teacher = draw() + case["offset"], draw() + case["offset"]
    teacher[torch.rand(shape, generator=generator) < case["teacher_mask"]] = float("-inf")
    student[torch.rand(shape, generator=generator) < case["student_mask"]] = float("-inf")
    return student, teacher


def check(case, backend):
    student, teacher = build(case)
    parameter = DIVERGENCES[case["mode"]].parameter
    assert_matches_reference(
        case["mode"], student, teacher, backend, mu=case["mu"], temperature=case["temperature"],
        parameters={parameter: case["parameter"]} if parameter else None,
    )


@pytest.mark.parametrize("split", ["rows", "ops"])
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases)
def test_torch_backend_matches_reference(split, case):
    # Both ways the torch backend splits CPU rows: compiled row by row, and on torch ops.
    with torch_ops_split() if split == "ops" else contextlib.nullcontext():
        check(case, "torch")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases)
def test_triton_backend_matches_reference(case):
    check(case, "triton")
