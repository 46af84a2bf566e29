"""Forward, backward and forward+backward time, peak memory and bandwidth of every contender.

One case per (shape, contender); see benchmarks/conftest.py for the options and the results
file, benchmarks/contenders.py for what is measured, benchmarks/measure.py for how.
"""

from __future__ import annotations

import math

import torch

from benchmarks.contenders import Unavailable, loss_fn
from benchmarks.measure import (
    SLOW_CALL_S,
    SLOW_ROUNDS,
    cuda_peak_extra_bytes,
    forward_backward,
    phase_medians,
)


def _value_tolerance(dtype) -> float:
    # Contenders compute in float32 from the same inputs; peers also round log-probabilities to
    # the input dtype, which for bf16 moves the mean KL by up to a few parts in a thousand.
    return 1e-4 if dtype == torch.float32 else 2e-2


def test_loss(case, benchmark, bench, request):
    shape, contender = case
    device = bench.device
    if bench.over_budget():
        bench.skip(shape, contender, f"the run's time budget of {bench.time_budget:.0f} s was spent")
    try:
        fn = loss_fn(contender, device)
    except Unavailable as reason:
        bench.skip(shape, contender, str(reason))
    student, teacher = bench.inputs(shape)
    benchmark.group = shape.label
    benchmark.extra_info.update(contender=contender.name, rows=shape.rows, vocab=shape.vocab, dtype=shape.dtype_name)

    phase_times = []
    try:
        rounds = bench.rounds
        if device.type == "cuda":
            # compile, JIT, autotune and allocator growth happen here, not in a timed round
            warm_up = []
            forward_backward(fn, student, teacher, device, warm_up)
            if sum(warm_up[0]) > SLOW_CALL_S:
                rounds = min(rounds, SLOW_ROUNDS)
        elif not contender.stateless:
            # on a CPU, compilation and lazy initialisation need only a few rows (compiled
            # contenders are dynamic in N), and a full-size call would only cost time
            forward_backward(fn, student[:8], teacher[:8], device)
        loss, grad = benchmark.pedantic(
            forward_backward, args=(fn, student, teacher, device, phase_times), rounds=rounds, iterations=1
        )
        peak = cuda_peak_extra_bytes(fn, student, teacher, device) if device.type == "cuda" else None
    except Exception as error:  # a peer that fails here is skipped with the reason; ours must not fail
        if contender.ours:
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        bench.skip(shape, contender, f"failed with {type(error).__name__}: {message[:200]}")

    memory_note = None
    if device.type == "cpu":
        selected = [item.callspec.params["case"][0] for item in request.session.items if hasattr(item, "callspec")]
        probe = bench.cpu_memory(shape, selected).get(contender.name, {"error": "not probed"})
        peak = probe.get("extra_bytes")
        memory_note = probe.get("error")
    grad_bytes = grad.numel() * grad.element_size()
    forward_s, backward_s, fwd_bwd_s = phase_medians(phase_times)
    figures = dict(rounds=len(phase_times), forward_s=forward_s, backward_s=backward_s, fwd_bwd_s=fwd_bwd_s,
                   grad_bytes=grad_bytes, peak_extra_bytes=peak, memory_note=memory_note,
                   memory_ratio=None if peak is None else peak / grad_bytes,
                   loss_value=float(loss),
                   expected_loss_value=None if contender.ours else bench.expected_loss(shape, contender.computes))
    if device.type == "cuda":
        minimal = student.numel() * (student.element_size() + teacher.element_size() + grad.element_size())
        figures.update(minimal_bytes=minimal, bandwidth_bytes_per_s=minimal / fwd_bwd_s,
                       copy_bandwidth_fraction=minimal / fwd_bwd_s / bench.copy_bandwidth())
    bench.record(shape, contender, **figures)
    benchmark.extra_info.update({k: v for k, v in figures.items() if v is not None})
    del loss, grad

    # A peer must compute what it is compared with (ours are checked against the reference in tests/).
    assert contender.ours or math.isclose(figures["loss_value"], figures["expected_loss_value"], rel_tol=_value_tolerance(shape.dtype)), (
        f"{contender.name} gives {figures['loss_value']}, our {contender.computes} loss gives "
        f"{figures['expected_loss_value']}"
    )
