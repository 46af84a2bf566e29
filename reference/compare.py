"""Comparison of a backend's per-row results with the float64 reference, row by row.

docs/semantics.md section 2 allows either head/tail decision where a running mass cum_k lies
within rounding of mu. So a row's head size must lie between the reference's head sizes at
mu - eps and mu + eps (eps a little above the backend's rounding of cum), and everything else
(loss, gradient, statistics) must match the reference evaluated with that same head size.
Rows whose running masses are all far from mu have a single allowed head size. Used by the
tests and by benchmarks/large_check.py; the results come in, nothing here runs the library.
"""

from __future__ import annotations

import torch

from .akl_reference import head_size_bounds, reference_row_losses

STATS_NAMES = ("fkl", "rkl", "head_gap", "tail_gap", "head_weight", "tail_weight", "head_size")


def tolerances(student_dtype, compute_dtype, temperature=1.0):
    """(rtol, atol) for values computed in compute_dtype and gradients stored in student_dtype.

    Gradient entries carry the rounding of p and q (about 1e-7 in float32) times 1/T.
    """
    if compute_dtype == torch.float64:
        value, grad_atol = (1e-9, 1e-11), 1e-11
    else:
        value, grad_atol = (2e-4, 2e-6), 5e-7
    grad_atol *= max(1.0, 1.0 / temperature)
    grad = {
        torch.float64: (value[0], grad_atol),
        torch.float32: (2e-4, grad_atol),
        torch.bfloat16: (1.6e-2, max(grad_atol, 1e-5)),
        torch.float16: (2e-3, max(grad_atol, 1e-6)),
    }[student_dtype]
    return value, grad


def reference_rows(mode, student, teacher, *, mu, temperature, head_size=None, parameters=None):
    """Float64 reference for every row (no labels): loss (N,), stats dict, gradient (N, V).
    parameters: the loss's beta or alpha as a dict ({} or None for its default)."""
    vocab = student.shape[-1]
    s = student.detach().double().reshape(-1, vocab).requires_grad_(True)
    t = teacher.detach().double().reshape(-1, vocab)
    loss, stats = reference_row_losses(
        s, t, mu=mu, temperature=temperature, mode=mode, head_size=head_size, **(parameters or {})
    )
    finite = torch.where(loss.isfinite(), loss, 0.0)
    (grad,) = torch.autograd.grad(finite.sum(), s)
    return loss.detach(), stats, grad


def assert_rows_match_reference(
    mode, student, teacher, loss, stats, grad, *, mu=0.5, temperature=1.0, labels=None, ignore_index=-100,
    parameters=None,
):
    """Check given per-row results (loss, AKLStats, gradient of the row sum) against the reference.

    mu: the split of the statistics (and of AKL); parameters: the loss's beta or alpha, as a dict."""
    vocab = student.shape[-1]
    loss = loss.reshape(-1)
    grad = grad.reshape(-1, vocab)
    ours_stats = {name: getattr(stats, name).reshape(-1) for name in STATS_NAMES}
    kept = torch.ones(loss.shape, dtype=torch.bool)
    if labels is not None:  # compared as Python integers, as reference_loss does
        kept = torch.tensor([label != ignore_index for label in labels.reshape(-1).tolist()], dtype=torch.bool)

    compute = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    (value_rtol, value_atol), (grad_rtol, grad_atol) = tolerances(student.dtype, compute, temperature)
    eps = 1e-9 if compute == torch.float64 else 1e-4
    lowest, highest = head_size_bounds(
        student.reshape(-1, vocab), teacher.reshape(-1, vocab), mu=mu, temperature=temperature, tolerance=eps
    )
    head_size = torch.minimum(torch.maximum(ours_stats["head_size"], lowest), highest)
    ref_loss, ref_stats, ref_grad = reference_rows(
        mode, student, teacher, mu=mu, temperature=temperature, head_size=head_size, parameters=parameters
    )

    sign_eps = 1e-13 if compute == torch.float64 else 1e-6  # a few roundings of q_j and p_j
    sign_slack = _tvd_sign_slack(mode, student.reshape(-1, vocab), teacher.reshape(-1, vocab), temperature, sign_eps)

    for row in range(loss.numel()):
        if not kept[row]:
            assert loss[row] == 0 and (grad[row] == 0).all(), f"ignored row {row} is not zero"
            for name in STATS_NAMES:
                assert ours_stats[name][row] == 0, f"ignored row {row}: {name} is not zero"
            continue
        problems = _row_problems(
            row, loss, grad, ours_stats, ref_loss, ref_grad, ref_stats,
            value_rtol, value_atol, grad_rtol, grad_atol, float(sign_slack[row]),
        )
        if not ref_loss[row].isnan() and not lowest[row] <= ours_stats["head_size"][row] <= highest[row]:
            problems = (problems or []) + [
                f"head_size {int(ours_stats['head_size'][row])} outside the allowed "
                f"[{int(lowest[row])}, {int(highest[row])}]"
            ]
        assert not problems, f"row {row} differs from the reference: {problems}"


def _tvd_sign_slack(mode, student, teacher, temperature, eps):
    """Per-row gradient allowance (N,) for TVD's sign(q_j - p_j) where q_j is within rounding of p_j.

    Where |q_j - p_j| <= eps (q_j + p_j) a backend may see the sign flipped or zero (rule 27).
    Such a token moves h_j by up to q_j and H = sum h by as much, so any gradient entry
    (h_i - q_i H) / T by at most (max q_j + max q_i * sum q_j) / T over those tokens.
    Zero for every other loss, whose gradient is smooth in q and p."""
    if mode != "tvd":
        return torch.zeros(student.shape[0], dtype=torch.float64)
    q = torch.softmax(student.double() / temperature, dim=-1).nan_to_num(0.0)
    p = torch.softmax(teacher.double() / temperature, dim=-1).nan_to_num(0.0)
    ambiguous = torch.where((q - p).abs() <= eps * (q + p), q, 0.0)
    largest = ambiguous.amax(dim=-1) + q.amax(dim=-1) * ambiguous.sum(dim=-1)
    return largest / temperature


def _row_problems(
    row, loss, grad, stats, ref_loss, ref_grad, ref_stats, value_rtol, value_atol, grad_rtol, grad_atol, sign_slack
):
    if ref_loss[row].isnan():
        if not loss[row].isnan():
            return f"loss {float(loss[row])} where the reference is NaN"
        return None
    problems = []
    if not _close(loss[row], ref_loss[row], value_rtol, value_atol):
        problems.append(f"loss {float(loss[row])!r} vs {float(ref_loss[row])!r}")
    # Gradient entries are sums of terms as large as |g|, FKL and RKL (q (log q - log p - RKL)
    # cancels where the student is confident): their rounding scales with the largest.
    grad_scale = float(ref_grad[row].abs().max())
    term_scale = max(1.0, grad_scale, abs(float(ref_stats["fkl"][row])), abs(float(ref_stats["rkl"][row])))
    if not _close(grad[row], ref_grad[row], grad_rtol, grad_atol * term_scale + sign_slack):
        diff = (grad[row].double() - ref_grad[row]).abs().max()
        problems.append(f"gradient max abs diff {float(diff):.3g} (max |g| {grad_scale:.3g})")
    # The weights are gap ratios: rounding of the gaps (about gap_atol each) moves them by up to
    # gap_atol / (head_gap + tail_gap), which is large only when q is within rounding of p.
    gap_atol = value_atol * 10
    total_gap = float(ref_stats["head_gap"][row] + ref_stats["tail_gap"][row])
    weight_atol = gap_atol + 2 * gap_atol / max(total_gap, 1e-300)
    for name in STATS_NAMES:
        ours, ref = stats[name][row], ref_stats[name][row]
        if name == "head_size":
            continue  # checked against the allowed range by the caller
        atol = weight_atol if name.endswith("weight") else gap_atol
        if not _close(ours, ref, value_rtol, atol):
            problems.append(f"{name} {float(ours)!r} vs {float(ref)!r}")
    return problems or None


def _close(actual, expected, rtol, atol):
    actual = actual.double()
    return bool(torch.isclose(actual, expected, rtol=rtol, atol=atol).all())
