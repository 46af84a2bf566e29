"""Forward, backward and forward+backward time, peak memory and bandwidth of every contender.

One case per (workload, contender), logits losses and the fused-linear loss against materialised
logits alike; see benchmarks/conftest.py for the
options and the results file, benchmarks/contenders.py for what is measured,
benchmarks/measure.py for how.
"""

from __future__ import annotations

import math

import torch

from benchmarks.contenders import Unavailable, loss_fn, with_temperature
from benchmarks.measure import (
    SLOW_CALL_S,
    SLOW_ROUNDS,
    cuda_peak_extra_bytes,
    first_rows,
    forward_backward,
    grad_bytes,
    phase_medians,
    reference_fits,
    release_cuda_memory,
    split_path_shares,
)


def _value_tolerance(dtype) -> float:
    # Contenders compute in float32 from the same inputs; peers also round log-probabilities to
    # the input dtype, which for bf16 moves the mean KL by up to a few parts in a thousand.
    return 1e-4 if dtype == torch.float32 else 2e-2


def test_loss(case, benchmark, bench, request):
    """One contender on one workload (benchmarks/workloads.py shapes_for gives the order)."""
    _measure(*case, benchmark, bench, request)


def _measure(shape, contender, benchmark, bench, request):
    device = bench.device
    if bench.over_budget():
        bench.skip(shape, contender, f"the run's time budget of {bench.time_budget:.0f} s was spent")
    try:
        fn = with_temperature(loss_fn(contender, device), shape)
    except Unavailable as reason:
        bench.skip(shape, contender, str(reason))
    if contender.role == "reference" and shape.hidden is None:
        fits, reason = reference_fits(shape.rows, shape.vocab, device)
        if not fits:
            bench.skip(shape, contender, reason)
    try:
        inputs = bench.inputs(shape)
    except FileNotFoundError as missing:  # the real rows live outside the repository
        bench.skip(shape, contender, str(missing))
    differentiated = shape.differentiated
    benchmark.group = shape.label
    benchmark.extra_info.update(contender=contender.name, rows=shape.rows, hidden=shape.hidden, vocab=shape.vocab,
                                dtype=shape.dtype_name)

    phase_times = []
    failure = None
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
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        failure = f"failed with {type(error).__name__}: {message[:200]}"
    if failure is not None:  # outside the except block, the exception and its frames are gone
        release_cuda_memory(device)
        bench.skip(shape, contender, failure)

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
    if contender.name == "akl_loss" and not shape.topk:
        figures["split_paths"] = split_path_shares(*inputs, shape.temperature, device)
    if device.type == "cuda" and shape.hidden is None:
        student, teacher = inputs
        # read the student and the teacher (its K pairs when stored) once, write the gradient once
        teacher_bytes = sum(x.numel() * x.element_size() for x in teacher) if shape.topk else teacher.numel() * teacher.element_size()
        minimal = student.numel() * (student.element_size() + grads[0].element_size()) + teacher_bytes
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
        if params is not None and "case" in params.params:
            shapes.append(params.params["case"][0])
    return shapes
