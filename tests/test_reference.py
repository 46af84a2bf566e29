"""The oracle itself, against values worked out by hand and a plain-Python head/tail rule."""

import math

import pytest
import torch

from akl_kernels import akl_loss
from reference import reference_loss, reference_row_losses


def python_head(p, mu):
    """The head/tail rule (docs/semantics.md section 2, rules 4-5) in plain Python: stable
    order by p descending, ties by index."""
    order = sorted(range(len(p)), key=lambda j: (-p[j], j))
    head, running = set(), 0.0
    for rank, j in enumerate(order):
        running += p[j]
        if rank == 0 or running <= mu:
            head.add(j)
        else:
            break
    return head


@pytest.mark.parametrize(
    "probabilities,mu,expected_head",
    [
        ([0.4, 0.3, 0.2, 0.1], 0.5, {0}),  # 0.4 + 0.3 crosses 0.5: the crossing token is tail
        ([0.4, 0.3, 0.2, 0.1], 0.35, {0}),  # the first token is head even above mu
        ([0.4, 0.3, 0.2, 0.1], 0.75, {0, 1}),
        ([0.1, 0.2, 0.3, 0.4], 0.75, {3, 2}),
        ([0.1, 0.3, 0.3, 0.3], 0.5, {1}),  # ties: the lower index first
        ([0.1, 0.3, 0.3, 0.3], 0.65, {1, 2}),
        ([0.25, 0.25, 0.25, 0.25], 1.0, {0, 1, 2, 3}),
    ],
)
def test_head_by_hand(probabilities, mu, expected_head):
    assert python_head(probabilities, mu) == expected_head
    teacher = torch.tensor([probabilities], dtype=torch.float64).log()
    _, stats = reference_row_losses(torch.zeros_like(teacher), teacher, mu=mu)
    assert int(stats["head_size"]) == len(expected_head)


def test_head_matches_plain_python_on_ties():
    torch.manual_seed(1)
    for _ in range(50):
        teacher = torch.randint(-2, 3, (1, 12)).double()
        mu = float(torch.rand(()) * 0.9 + 0.05)
        p = torch.softmax(teacher, -1)[0].tolist()
        expected = python_head(p, mu)
        student = torch.randn(1, 12, dtype=torch.float64)
        _, stats = reference_row_losses(student, teacher, mu=mu)
        assert int(stats["head_size"]) == len(expected)
        q = torch.softmax(student, -1)[0].tolist()
        head_gap = sum(abs(p[j] - q[j]) for j in expected)
        assert math.isclose(float(stats["head_gap"]), head_gap, rel_tol=1e-12, abs_tol=1e-15)


def test_two_token_values_by_hand(backend):
    # p = (0.75, 0.25), q = (0.5, 0.5); head at mu = 0.5 is {0}; both gaps are 0.25.
    fkl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    rkl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    teacher = torch.tensor([[math.log(0.75), math.log(0.25)]], dtype=torch.float64)
    student = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    ref, stats = reference_loss(student, teacher, reduction="none")
    assert math.isclose(float(ref), 0.5 * fkl + 0.5 * rkl, rel_tol=1e-12)
    assert float(stats["head_gap"]) == pytest.approx(0.25) and float(stats["tail_gap"]) == pytest.approx(0.25)
    ours = akl_loss(student, teacher, backend=backend)
    assert math.isclose(float(ours), 0.5 * fkl + 0.5 * rkl, rel_tol=1e-12)
    # d/ds_j = 0.5 (q - p) + 0.5 q (log q - log p - RKL)
    ours.backward()
    p, q = [0.75, 0.25], [0.5, 0.5]
    expected = [0.5 * (q[j] - p[j]) + 0.5 * q[j] * (math.log(q[j] / p[j]) - rkl) for j in range(2)]
    torch.testing.assert_close(student.grad[0], torch.tensor(expected, dtype=torch.float64))
