"""Compare the backends with the reference, then measure SPEC section 5's CPU target.

    python benchmarks/compare_backends.py            # agreement + CPU target (about 1-2 minutes)
    python benchmarks/compare_backends.py --quick    # smaller CPU shape, for a smoke test

1. Agreement: akl_loss on the torch backend and on the Triton kernel (run by Triton's
   interpreter on the CPU, or for real on a GPU) against the float64 reference, on a small batch.
2. CPU target: forward + backward of akl_loss (torch backend, float32, N=1024 rows, V=32000)
   against the sort-based eager reference on the same float32 inputs: median times and their
   ratio (target: at least 8x), and the peak extra resident memory of each, measured in a fresh
   subprocess with every large allocation mapped on its own, over the size of the gradient
   (target: at most 1.25).
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
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels on CPU tensors

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from akl_kernels import akl_loss  # noqa: E402
from reference import reference_loss  # noqa: E402


def realistic_logits(rows, vocab, generator, dtype=torch.float32):
    """Language-model-like logits: a Zipf-like distribution over a random order of the vocabulary.

    Row i has p proportional to (1 + rank)^-alpha_i times log-normal noise, alpha_i uniform in
    [0.8, 2.0]: at V = 32000 the median entropy is about 3.6 nats and the median top probability
    about 0.3, and about a quarter of the rows have a head (mu = 0.5) of more than 32 tokens.
    """
    alpha = torch.empty(rows, 1).uniform_(0.8, 2.0, generator=generator)
    rank = torch.argsort(torch.rand(rows, vocab, generator=generator), dim=1).float()
    x = -alpha * torch.log1p(rank) + 0.3 * torch.randn(rows, vocab, generator=generator)
    return x.to(dtype)


def agreement(device):
    generator = torch.Generator().manual_seed(0)
    student = realistic_logits(8, 3000, generator).to(device)
    teacher = realistic_logits(8, 3000, generator).to(device)
    s64 = student.double().requires_grad_(True)
    ref = reference_loss(s64, teacher.double())[0]
    ref.backward()
    print(f"agreement with the float64 reference on 8 x 3000 logits ({device}):")
    for backend in ("torch", "triton"):
        s = student.clone().requires_grad_(True)
        start = time.perf_counter()
        loss = akl_loss(s, teacher, backend=backend)
        loss.backward()
        elapsed = time.perf_counter() - start
        loss_err = abs(float(loss) - float(ref))
        grad_err = float((s.grad.double() - s64.grad).abs().max())
        note = " (Triton interpreter)" if backend == "triton" and device == "cpu" else ""
        print(f"  {backend:6s}{note}: loss {float(loss):.6f} (reference {float(ref):.6f}, |diff| {loss_err:.1e}), "
              f"max |grad diff| {grad_err:.1e}, {elapsed:.2f} s")


def _fwd_bwd(which, student, teacher):
    s = student.detach().requires_grad_(True)
    if which == "akl_loss":
        loss = akl_loss(s, teacher, backend="torch")
    else:
        loss = reference_loss(s, teacher)[0]
    loss.backward()
    return s.grad


def _memory_probe(which, rows, vocab):
    """Run in a subprocess: peak resident memory added by one forward + backward, in bytes."""
    generator = torch.Generator().manual_seed(0)
    student, teacher = realistic_logits(rows, vocab, generator), realistic_logits(rows, vocab, generator)
    _fwd_bwd(which, student[:4], teacher[:4])  # load lazily initialised code first
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size (VmHWM) to the current one
    grad = _fwd_bwd(which, student, teacher)
    peak = _status_kib("VmHWM")
    print(json.dumps({"extra_bytes": (peak - before) * 1024, "grad_bytes": grad.numel() * grad.element_size()}))


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_memory(which, rows, vocab):
    # glibc serves allocations of up to 32 MiB from its heap, where freed pages stay resident and
    # are reused unseen by the peak resident size; mapping every allocation of 64 KiB or more
    # on its own (and unmapping it when freed) makes that size track the live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(
        [sys.executable, __file__, "--memory-probe", which, str(rows), str(vocab)],
        capture_output=True, text=True, check=True, env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_target(rows, vocab, repeats):
    generator = torch.Generator().manual_seed(0)
    student, teacher = realistic_logits(rows, vocab, generator), realistic_logits(rows, vocab, generator)
    times = {"akl_loss": [], "reference": []}
    _fwd_bwd("akl_loss", student[:4], teacher[:4])
    for _ in range(repeats):  # interleaved, so both see the same machine load
        for which in times:
            start = time.perf_counter()
            _fwd_bwd(which, student, teacher)
            times[which].append(time.perf_counter() - start)
    ours, ref = statistics.median(times["akl_loss"]), statistics.median(times["reference"])
    memory = {which: peak_extra_memory(which, rows, vocab) for which in times}
    print(f"\nCPU target (SPEC section 5): akl_loss forward+backward, torch backend, float32, "
          f"N={rows}, V={vocab}, {torch.get_num_threads()} threads, median of {repeats}:")
    print(f"  {'':28s}{'time (s)':>10s}{'peak extra memory / gradient size':>36s}")
    for which, label in (("akl_loss", "akl_loss (torch backend)"), ("reference", "sort-based eager reference")):
        m = memory[which]
        print(f"  {label:28s}{statistics.median(times[which]):10.3f}{m['extra_bytes'] / m['grad_bytes']:36.2f}")
    ratio = ref / ours
    mem_ratio = memory["akl_loss"]["extra_bytes"] / memory["akl_loss"]["grad_bytes"]
    print(f"  speed-up over the reference: {ratio:.1f}x (target >= 8x: {'met' if ratio >= 8 else 'NOT met'}); "
          f"peak extra memory {mem_ratio:.2f}x the gradient (target <= 1.25x: {'met' if mem_ratio <= 1.25 else 'NOT met'})")
    return {"rows": rows, "vocab": vocab, "akl_loss_s": ours, "reference_s": ref, "speedup": ratio,
            "akl_loss_memory_ratio": mem_ratio,
            "reference_memory_ratio": memory["reference"]["extra_bytes"] / memory["reference"]["grad_bytes"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N=256, V=8000 for the CPU target (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-probe", nargs=3, metavar=("WHICH", "ROWS", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        which, rows, vocab = args.memory_probe
        _memory_probe(which, int(rows), int(vocab))
        return
    agreement("cuda" if torch.cuda.is_available() else "cpu")
    rows, vocab = (256, 8000) if args.quick else (1024, 32000)
    cpu_target(rows, vocab, args.repeats)


if __name__ == "__main__":
    main()
