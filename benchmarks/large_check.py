"""GPU check: akl_loss on more than 2^31 logits (bf16), against the reference on a sample of rows.

    python -m benchmarks.large_check            # default: 16800 x 128256 = 2.15e9 elements

Element offsets above 2^31 - 1 overflow int32 arithmetic; the kernel addresses rows with int64
offsets. This runs the Triton path on the whole tensor (reduction "none", statistics, gradient)
and compares rows at the start, the middle, on both sides of the 2^31 boundary and at the end
with the float64 reference, through the same row checker as the tests.
"""

from __future__ import annotations

import argparse
import time

import torch

from akl_kernels import akl_loss
from benchmarks.workloads import Shape, make_inputs
from reference.compare import assert_rows_match_reference


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16800)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    student, teacher = make_inputs(Shape(args.rows, args.vocab, torch.bfloat16), device)
    elements = student.numel()

    def forward_backward():
        leaf = student.detach().requires_grad_(True)
        loss, stats = akl_loss(leaf, teacher, reduction="none", return_stats=True)
        loss.backward(torch.ones_like(loss))
        return leaf, loss, stats

    start = time.perf_counter()
    forward_backward()  # compiles the kernels for this dtype and vocabulary
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - start
    release = time.perf_counter()
    leaf, loss, stats = forward_backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - release

    boundary = (2**31 - 1) // args.vocab  # the row holding element 2^31 - 1
    picked = {0, 1, args.rows // 2, boundary - 1, boundary, boundary + 1, args.rows - 2, args.rows - 1}
    generator = torch.Generator().manual_seed(0)
    picked |= set(torch.randint(0, args.rows, (24,), generator=generator).tolist())
    rows = torch.tensor(sorted(r for r in picked if 0 <= r < args.rows), device=device)
    sample_stats = type(stats)(*(field[rows] for field in stats))
    assert_rows_match_reference("akl", student[rows], teacher[rows], loss.detach()[rows], sample_stats, leaf.grad[rows])
    print(f"large check passed: akl_loss on {args.rows} x {args.vocab} = {elements:.3e} elements "
          f"(2^31 = {2**31:.3e}) in bf16, forward+backward {elapsed * 1e3:.0f} ms ({first:.1f} s with compilation); "
          f"{rows.numel()} rows, {int((rows > boundary).sum())} of them past element 2^31, match the reference")


if __name__ == "__main__":
    main()
