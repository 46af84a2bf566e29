"""The head/tail split's price, timed so that a shared machine's drift cancels out.

docs/semantics.md section 5 asks akl_loss's forward + backward to cost at most 1.5x fkl_loss's.
The pytest-benchmark suite times all rounds of one contender, then all of the next; on a shared
machine whose speed drifts over seconds that can move a ratio by 30%. Here each round runs
akl_loss then fkl_loss on the same inputs, one after the other, and the ratio of the medians is
reported with the share of rows that took each path of the split.

    python -m benchmarks.split_price                  # the CPU split-price workloads
    python -m benchmarks.split_price --rounds 9 float32-1024x32000 float32-1024x49152-real-T2
"""

from __future__ import annotations

import argparse
import statistics

import torch

from akl_kernels import akl_loss, fkl_loss

from benchmarks.contenders import with_temperature
from benchmarks.measure import forward_backward, split_path_shares
from benchmarks.workloads import CPU_SHAPES, CPU_SPLIT_SHAPES, Shape, make_inputs, shape_from_label


def default_shapes() -> list[Shape]:
    """The CPU matrix's logits shapes and its split-price workloads."""
    return [Shape(n, v, torch.float32) for n, v in CPU_SHAPES] + [
        Shape(n, v, torch.float32, t, source) for source, n, v, t in CPU_SPLIT_SHAPES]


def alternating_medians(shape: Shape, inputs: tuple, rounds: int, device: torch.device) -> dict[str, float]:
    """Median forward+backward seconds of akl_loss and fkl_loss on the workload's (student,
    teacher) inputs, alternating within each round after one warm-up call each."""
    losses = {"akl_loss": with_temperature(akl_loss, shape), "fkl_loss": with_temperature(fkl_loss, shape)}
    times = {name: [] for name in losses}
    for round_ in range(rounds + 1):
        for name, fn in losses.items():
            phases = []
            forward_backward(fn, inputs, 1, device, phases)
            if round_:  # the first round warms up
                times[name].append(sum(phases[0]))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="*", help="shape labels (default: the CPU split-price workloads)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    shapes = [shape_from_label(label) for label in args.shapes] or default_shapes()
    print("| shape | akl_loss ms | fkl_loss ms | akl / fkl | split paths |")
    print("|---|---:|---:|---:|---|")
    for shape in shapes:
        try:
            inputs = make_inputs(shape, device)
        except FileNotFoundError as missing:  # real rows without the shared folder, SmolLM2 without the extra
            print(f"| {shape.label} | skipped: {missing} | | | |")
            continue
        medians = alternating_medians(shape, inputs, args.rounds, device)
        paths = split_path_shares(*inputs, shape.temperature, device)
        shares = ", ".join(f"{name} {share:.0%}" for name, share in paths.items())
        akl, fkl = medians["akl_loss"] * 1e3, medians["fkl_loss"] * 1e3
        print(f"| {shape.label} | {akl:.1f} | {fkl:.1f} | {akl / fkl:.2f}x | {shares} |", flush=True)


if __name__ == "__main__":
    main()
