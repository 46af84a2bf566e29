"""How the benchmarks measure: time per phase, peak extra memory, copy bandwidth.

Memory is the peak that one forward + backward adds on top of its inputs, gradients included,
reported against the gradients' size (docs/semantics.md section 5). On a GPU it is read from the caching
allocator (`max_memory_allocated` after a reset). On a CPU there is no allocator statistic, so a
fresh subprocess (`python -m benchmarks.measure SHAPES CONTENDER...`) runs each contender once and
reads the peak resident size: glibc serves allocations below 32 MiB from its heap, where freed
pages stay resident and are reused unseen, so the subprocess maps every allocation of 64 KiB or
more on its own (MALLOC_MMAP_THRESHOLD_) and unmaps it when freed, which makes the resident size
track the live tensors; the peak (VmHWM) is reset before each contender via /proc/self/clear_refs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from akl_kernels import TeacherTopK

from benchmarks.contenders import BY_NAME, LossFn, contenders_for, loss_fn, with_temperature
from benchmarks.workloads import LinearShape, Shape, make_inputs, shape_from_label

# A contender whose warm-up call takes longer than SLOW_CALL_S seconds is timed over at most
# SLOW_ROUNDS rounds (the eager reference at the largest GPU shapes), to bound the run's length.
SLOW_CALL_S, SLOW_ROUNDS = 1.0, 3
REFERENCE_FLOAT32_COPIES = 18


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward(fn: LossFn, inputs: tuple, differentiated: int, device, phase_times=None):
    """One forward + backward of fn(*inputs), the first `differentiated` inputs as fresh leaves.

    Appends (forward_s, backward_s) to phase_times (on a GPU timed with CUDA events around each
    phase, on a CPU with the host clock); returns the loss and the leaves' gradients.
    """
    leaves = [x.detach().requires_grad_(True) for x in inputs[:differentiated]]
    if device.type == "cuda":
        start, middle, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        loss = fn(*leaves, *inputs[differentiated:])
        middle.record()
        loss.backward()
        end.record()
        end.synchronize()
        times = (start.elapsed_time(middle) / 1e3, middle.elapsed_time(end) / 1e3)
    else:
        start = time.perf_counter()
        loss = fn(*leaves, *inputs[differentiated:])
        middle = time.perf_counter()
        loss.backward()
        times = (middle - start, time.perf_counter() - middle)
    if phase_times is not None:
        phase_times.append(times)
    return loss.detach(), [leaf.grad for leaf in leaves]


def release_cuda_memory(device) -> None:
    """Return cached blocks to the device once nothing refers to them (collect first: a caught
    exception's traceback keeps its frames' tensors alive until it is dropped)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reference_fits(rows: int, vocab: int, device) -> tuple[bool, str]:
    """Whether the eager reference can run at (rows, vocab) on `device`: it holds about
    REFERENCE_FLOAT32_COPIES float32 copies of the logits at once (its sort, softmaxes and
    autograd graph; measured 18x the gradient on a CPU)."""
    if device.type != "cuda":
        return True, ""
    needed = REFERENCE_FLOAT32_COPIES * rows * vocab * 4
    free, _ = torch.cuda.mem_get_info(device)
    if needed <= 0.9 * free:
        return True, ""
    return False, (f"needs about {needed / 2**30:.0f} GiB ({REFERENCE_FLOAT32_COPIES} float32 copies of the logits); "
                   f"{free / 2**30:.0f} GiB free on the device")


def first_rows(inputs: tuple, differentiated: int, rows: int = 8) -> tuple:
    """The inputs cut to their first rows (hidden states or logits; weights stay whole)."""
    if differentiated == 1:  # logits, and the teacher's logits or stored pairs
        return tuple(TeacherTopK(*(y[:rows] for y in x)) if isinstance(x, TeacherTopK) else x[:rows] for x in inputs)
    student_hidden, student_weight, teacher_hidden, teacher_weight = inputs
    return student_hidden[:rows], student_weight, teacher_hidden[:rows], teacher_weight


def grad_bytes(grads) -> int:
    return sum(g.numel() * g.element_size() for g in grads)


def phase_medians(phase_times):
    forward = statistics.median(f for f, _ in phase_times)
    backward = statistics.median(b for _, b in phase_times)
    total = statistics.median(f + b for f, b in phase_times)
    return forward, backward, total


def cuda_peak_extra_bytes(fn: LossFn, inputs: tuple, differentiated: int, device) -> int:
    """Peak bytes one forward + backward adds to what was allocated before it (gradients included)."""
    release_cuda_memory(device)
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    forward_backward(fn, inputs, differentiated, device)
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def split_path_shares(student, teacher, temperature: float, device) -> dict[str, float]:
    """Share of rows whose head/tail split takes each path of akl_loss's backend on `device`
    (the backend's split_path codes, by name)."""
    from akl_kernels._rows import LossMode, RowLossConfig
    from akl_kernels._dispatch import select_backend

    row_backend = select_backend("auto", device)
    config = RowLossConfig(mode=LossMode.AKL, mu=0.5, temperature=temperature, split=True)
    with torch.no_grad():
        codes = row_backend.row_losses(student, teacher, None, torch.ones((), device=device), config, False).split_path
    names = row_backend.split_path_name
    counts = torch.bincount(codes.reshape(-1).long().cpu())
    total = int(counts.sum())
    return {names(code): int(n) / total for code, n in enumerate(counts.tolist()) if n}


def cuda_copy_bandwidth(device, nbytes=2 << 30, repeats=20) -> float:
    """Device-to-device copy bandwidth in bytes/s (each copy reads and writes nbytes): median of repeats."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


def cpu_peak_extra_bytes(shapes: list[Shape | LinearShape], names: list[str]) -> dict[str, dict[str, dict]]:
    """Run the CPU memory probe for several shapes and contenders in one fresh subprocess.

    Each shape is probed with those of `names` that belong to its workload (contenders_for).
    Returns {shape.label: {name: {"extra_bytes": int} or {"error": str}}}.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    command = [sys.executable, "-m", "benchmarks.measure", ",".join(s.label for s in shapes), *names]
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=_repo_root())
    if out.returncode != 0:
        reason = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {s.label: {name: {"error": f"memory probe failed: {reason}"} for name in names} for s in shapes}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _probe(shape: Shape | LinearShape, names: list[str]) -> dict[str, dict]:
    device = torch.device("cpu")
    inputs = make_inputs(shape, device)
    gc.collect()
    results = {}
    for name in names:
        if BY_NAME[name] not in contenders_for(shape):
            continue
        try:
            fn = with_temperature(loss_fn(BY_NAME[name], device), shape)
            # first call on a few rows of the same vocabulary: lazy imports and compilation
            # happen here, not inside the measured call (compiled contenders are dynamic in N)
            forward_backward(fn, first_rows(inputs, shape.differentiated), shape.differentiated, device)
        except Exception as error:  # reported as the contender's memory figure, not hidden
            results[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
            continue
        gc.collect()
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident size (VmHWM) to the current resident size
        loss, grads = forward_backward(fn, inputs, shape.differentiated, device)
        results[name] = {"extra_bytes": (_status_kib("VmHWM") - before) * 1024}
        del loss, grads, fn
        gc.collect()
    return results


def main():
    parser = argparse.ArgumentParser(description="CPU memory probe (run by the benchmarks in a subprocess)")
    parser.add_argument("shapes", help="comma-separated shape labels, e.g. float32-256x32000,float32-2048x512x32000")
    parser.add_argument("contenders", nargs="+")
    args = parser.parse_args()
    print(json.dumps({label: _probe(shape_from_label(label), args.contenders) for label in args.shapes.split(",")}))


if __name__ == "__main__":
    main()
