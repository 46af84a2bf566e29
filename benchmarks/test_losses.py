"""Forward, backward and forward+backward time, peak memory and bandwidth of every contender.

One case per (shape, contender), for the logits losses (test_loss) and for the fused-linear
loss against materialised logits (test_fused_linear_loss); see benchmarks/conftest.py for the
options and the results file, benchmarks/contenders.py for what is measured,
benchmarks/measure.py for how.
"""

from __future__ import annotations

import math

import torch

from benchmarks.contenders import Unavailable, loss_fn
from benchmarks.measure import (
    SLOW_CALL_S,
    SLOW_ROUNDS,
    cuda_peak_extra_bytes,
    first_rows,
    forward_backward,
    grad_bytes,
    phase_medians,
)


def _value_tolerance(dtype) -> float:
    # Contenders compute in float32 from the same inputs; peers also round log-probabilities to
    # the input dtype, which for bf16 moves the mean KL by up to a few parts in a thousand.
    return 1e-4 if dtype == torch.float32 else 2e-2


# The fused-linear cases come first: on a GPU, a --akl-time-budget then cuts logits cases only.
def test_fused_linear_loss(linear_case, benchmark, bench, request):
    _measure(*linear_case, benchmark, bench, request)


def test_loss(case, benchmark, bench, request):
    _measure(*case, benchmark, bench, request)


def _measure(shape, contender, benchmark, bench, request):
    device = bench.device
    if bench.over_budget():
        bench.skip(shape, contender, f"the run's time budget of {bench.time_budget:.0f} s was spent")
    try:
        fn = loss_fn(contender, device)
    except Unavailable as reason:
        bench.skip(shape, contender, str(reason))
    inputs = bench.inputs(shape)
    differentiated = shape.differentiated
    benchmark.group = shape.label
    benchmark.extra_info.update(contender=contender.name, rows=shape.rows, hidden=shape.hidden, vocab=shape.vocab,
                                dtype=shape.dtype_name)

    phase_times = []
    try:
        rounds = bench.rounds
        if device.type == "cuda":
            # compile, JIT, autotune and allocator growth happen here, not in a timed round
            warm_up = []
            forward_backward(fn, inputs, differentiated, device, warm_up)
            if sum(warm_up[0]) > SLOW_CALL_S:
                rounds = min(rounds, SLOW_ROUNDS)
        elif not contender.stateless:
            # on a CPU, compilation and lazy initialisation need only a few rows (compiled
            # contenders are dynamic in N), and a full-size call would only cost time
            forward_backward(fn, first_rows(inputs, differentiated), differentiated, device)
        loss, grads = benchmark.pedantic(
            forward_backward, args=(fn, inputs, differentiated, device, phase_times), rounds=rounds, iterations=1
        )
        peak = cuda_peak_extra_bytes(fn, inputs, differentiated, device) if device.type == "cuda" else None
    except Exception as error:  # a peer that fails here is skipped with the reason; ours must not fail
        if contender.ours:
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        bench.skip(shape, contender, f"failed with {type(error).__name__}: {message[:200]}")

    memory_note = None
    if device.type == "cpu":
        probe = bench.cpu_memory(shape, _selected_shapes(request.session)).get(contender.name, {"error": "not probed"})
        peak = probe.get("extra_bytes")
        memory_note = probe.get("error")
    gradient_bytes = grad_bytes(grads)
    forward_s, backward_s, fwd_bwd_s = phase_medians(phase_times)
    figures = dict(rounds=len(phase_times), forward_s=forward_s, backward_s=backward_s, fwd_bwd_s=fwd_bwd_s,
                   grad_bytes=gradient_bytes, peak_extra_bytes=peak, memory_note=memory_note,
                   memory_ratio=None if peak is None else peak / gradient_bytes,
                   loss_value=float(loss),
                   expected_loss_value=None if contender.ours else bench.expected_loss(shape, contender.computes))
    if device.type == "cuda" and shape.hidden is None:
        student, teacher = inputs
        minimal = student.numel() * (student.element_size() + teacher.element_size() + grads[0].element_size())
        figures.update(minimal_bytes=minimal, bandwidth_bytes_per_s=minimal / fwd_bwd_s,
                       copy_bandwidth_fraction=minimal / fwd_bwd_s / bench.copy_bandwidth())
    bench.record(shape, contender, **figures)
    benchmark.extra_info.update({k: v for k, v in figures.items() if v is not None})
    del loss, grads

    # A peer must compute what it is compared with (ours are checked against the reference in tests/).
    assert contender.ours or math.isclose(figures["loss_value"], figures["expected_loss_value"], rel_tol=_value_tolerance(shape.dtype)), (
        f"{contender.name} gives {figures['loss_value']}, our {contender.computes} loss gives "
        f"{figures['expected_loss_value']}"
    )


def _selected_shapes(session):
    """The shapes of every case this session runs (the CPU memory probe measures them in one go)."""
    shapes = []
    for item in session.items:
        params = getattr(item, "callspec", None)
        for key in ("case", "linear_case"):
            if params is not None and key in params.params:
                shapes.append(params.params[key][0])
    return shapes
