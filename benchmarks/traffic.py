"""Memory traffic of the Triton kernel per row, counted exactly under Triton's interpreter.

    python -m benchmarks.traffic                 # every input class, sampled rows, markdown table
    python -m benchmarks.traffic --rows 64       # more rows per class (slower: ~1 s per row and pass)
    python -m benchmarks.traffic --json out.json # also write the figures

The kernel runs on CPU tensors in the interpreter (TRITON_INTERPRET=1 is set here, before triton
is imported) while every masked load and store it issues is tallied by address: bytes read from
the teacher's and the student's logits, bytes written to the gradient, and everything else
(per-row outputs, row offsets, the bracket buffer). Each row's figures are in *units*: one unit
is one vocabulary-length row of one tensor in that tensor's dtype, so reading the student and
the teacher once and writing the gradient once is 3 units, the minimum of a streaming kernel.

These are modelled figures of a GPU run: they count what the kernel asks for, not what DRAM
serves (a GPU's L2 may serve a re-read row), and they say nothing about instruction counts.
"""

from __future__ import annotations

import os

if "triton" in __import__("sys").modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("benchmarks.traffic must be imported before triton (it sets TRITON_INTERPRET=1)")
os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from akl_kernels._dispatch import row_config  # noqa: E402
from akl_kernels.divergences import BY_MODE, LossMode  # noqa: E402
from akl_kernels.triton_backend import split_path_name, triton_row_losses  # noqa: E402
from benchmarks.workloads import real_rows, realistic_logits  # noqa: E402

UNIT_NAMES = ("teacher", "student", "gradient")


class TrafficCounter:
    """Tallies the interpreter's loads and stores by address while active.

    `regions` maps a name to a contiguous 2-D tensor (rows x V): bytes that touch it are counted
    per row of it. Everything else goes to "other" (one total).
    """

    def __init__(self, regions: dict[str, torch.Tensor]):
        self.regions = {}
        for name, x in regions.items():
            assert x.is_contiguous() and x.dim() == 2
            row_bytes = x.shape[1] * x.element_size()
            self.regions[name] = (x.data_ptr(), x.shape[0], row_bytes)
        self.read = {name: np.zeros(rows) for name, (_, rows, _) in self.regions.items()}
        self.written = {name: np.zeros(rows) for name, (_, rows, _) in self.regions.items()}
        self.other_read = 0
        self.other_written = 0

    def _tally(self, ptrs, mask, into, other_attr):
        addresses = np.asarray(ptrs.data, dtype=np.uint64).reshape(-1)
        active = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.asarray(ptrs.data).shape).reshape(-1)
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        addresses = addresses[active]
        claimed = np.zeros(addresses.shape, dtype=bool)
        for name, (base, rows, row_bytes) in self.regions.items():
            inside = (addresses >= base) & (addresses < base + rows * row_bytes)
            if inside.any():
                row = ((addresses[inside] - base) // row_bytes).astype(np.int64)
                into[name] += np.bincount(row, minlength=rows) * size
                claimed |= inside
        setattr(self, other_attr, getattr(self, other_attr) + int((~claimed).sum()) * size)

    @contextlib.contextmanager
    def active(self):
        builder = interpreter.interpreter_builder
        load, store = builder.create_masked_load, builder.create_masked_store

        def counted_load(ptrs, mask, *args, **kwargs):
            self._tally(ptrs, mask, self.read, "other_read")
            return load(ptrs, mask, *args, **kwargs)

        def counted_store(ptrs, value, mask, *args, **kwargs):
            self._tally(ptrs, mask, self.written, "other_written")
            return store(ptrs, value, mask, *args, **kwargs)

        builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
        try:
            yield self
        finally:
            builder.create_masked_load, builder.create_masked_store = load, store


@dataclass
class RowTraffic:
    """Per-row units of one call: reads of teacher and student, gradient writes, and the rest."""

    teacher: np.ndarray
    student: np.ndarray
    gradient: np.ndarray
    other_units: float  # all other bytes of the call, over rows x (one student row's bytes)
    kept: np.ndarray  # bool per row
    split_path: list  # per row, the kernel's name for its head/tail path

    @property
    def total(self) -> np.ndarray:
        return self.teacher + self.student + self.gradient


def count_rows(student, teacher, *, mode=LossMode.AKL, mu=0.5, temperature=1.0, keep=None) -> RowTraffic:
    """Run the Triton backend once (loss and gradient, no statistics but AKL's split; a loss's
    parameter at its default) on 2-D CPU logits and count its traffic."""
    n_rows, vocab = student.shape
    grad = torch.empty_like(student)
    family = BY_MODE[mode]
    config = row_config(family, family.default or 0.0, mu, temperature, return_stats=False)
    counter = TrafficCounter({"teacher": teacher, "student": student, "gradient": grad})
    with counter.active():
        rows = triton_row_losses(student, teacher, keep, torch.ones((), dtype=torch.float32), config, True, grad)
    units = {}
    for name, x in (("teacher", teacher), ("student", student), ("gradient", grad)):
        row_bytes = vocab * x.element_size()
        units[name] = (counter.read[name] + counter.written[name]) / row_bytes
    other = (counter.other_read + counter.other_written) / (n_rows * vocab * student.element_size())
    kept = np.ones(n_rows, dtype=bool) if keep is None else keep.numpy()
    return RowTraffic(units["teacher"], units["student"], units["gradient"], other, kept,
                      [split_path_name(code) for code in rows.split_path.tolist()])



# ---- input classes ------------------------------------------------------------------------------

# Units per kept row the kernels must not exceed (tests/test_traffic.py): 7 for loss, statistics
# and gradient (passes of 2 + 2 + 3 units), one teacher-only unit more where the head holds at least
# TOPK tokens (a bracket pass), 5 for FKL and RKL without statistics (no gap pass), and 7 for the
# divergences made of terms without statistics (pass 1, the terms pass, the gradient pass).
SPLIT_TARGET, BRACKET_TARGET, NO_SPLIT_TARGET = 7.0, 8.0, 5.0


@dataclass(frozen=True)
class InputClass:
    name: str
    build: Callable[[int, torch.Generator], tuple]  # (rows, generator) -> (student, teacher, keep or None)
    temperature: float = 1.0
    mode: LossMode = LossMode.AKL
    default_rows: int = 8
    target: float = BRACKET_TARGET  # units per kept row, at most


def _real(rows, generator):
    data = real_rows()
    pick = torch.randperm(data.shape[0] - 1, generator=generator)[:rows]
    return data[pick + 1].clone(), data[pick].clone(), None  # row i + 1 is the student of teacher row i


def _lm(dtype, vocab=32000):
    def build(rows, generator):
        student = realistic_logits(rows, vocab, generator=generator, dtype=dtype)
        teacher = realistic_logits(rows, vocab, generator=generator, dtype=dtype)
        return student, teacher, None
    return build


def _lm_with_labels(rows, generator):
    student, teacher, _ = _lm(torch.bfloat16)(rows, generator)
    keep = torch.arange(rows) % 4 != 0  # a quarter of the rows ignored (labels == ignore_index)
    return student, teacher, keep


def _peaked(rows, generator):
    student, teacher, _ = _lm(torch.float32)(rows, generator)
    top = torch.randint(0, teacher.shape[1], (rows,), generator=generator)
    teacher[torch.arange(rows), top] += 12.0  # one token holds more than mu
    return student, teacher, None


def _flat(rows, generator, vocab=32000):
    student = torch.randn(rows, vocab, generator=generator)
    teacher = torch.randn(rows, vocab, generator=generator) * 0.5  # heads of ~10^4 tokens
    return student, teacher, None


def _near_uniform(rows, generator, vocab=32000):
    student = torch.randn(rows, vocab, generator=generator)
    teacher = torch.randn(rows, vocab, generator=generator) * 0.01  # every value within 0.05 of the others
    return student, teacher, None


def _integer_ties(rows, generator, vocab=32000):
    student = torch.randn(rows, vocab, generator=generator)
    teacher = torch.randint(-3, 3, (rows, vocab), generator=generator).float()  # ~5000 ties per value
    return student, teacher, None


CLASSES = [
    InputClass("real SmolLM2 rows, T=1", _real),
    InputClass("real SmolLM2 rows, T=2", _real, temperature=2.0),
    InputClass("LM-like bf16 32000, T=1", _lm(torch.bfloat16)),
    InputClass("LM-like bf16 32000, T=2", _lm(torch.bfloat16), temperature=2.0),
    InputClass("LM-like bf16, 1/4 rows ignored", _lm_with_labels),
    InputClass("peaked fp32 (top-1 mass > mu)", _peaked, target=SPLIT_TARGET),
    InputClass("flat fp32 (N(0, 0.5^2) logits)", _flat),
    InputClass("near-uniform fp32 (N(0, 0.01^2) logits)", _near_uniform, default_rows=4),
    InputClass("integer ties fp32 (6 values)", _integer_ties, default_rows=4),
    InputClass("fkl_loss, LM-like bf16, T=1", _lm(torch.bfloat16), mode=LossMode.FKL, target=NO_SPLIT_TARGET),
    InputClass("rkl_loss, LM-like bf16, T=1", _lm(torch.bfloat16), mode=LossMode.RKL, target=NO_SPLIT_TARGET),
    InputClass("jsd, LM-like bf16, T=1", _lm(torch.bfloat16), mode=LossMode.JSD, target=SPLIT_TARGET),
    InputClass("tvd, LM-like bf16, T=1", _lm(torch.bfloat16), mode=LossMode.TVD, target=SPLIT_TARGET),
]


def measure_class(input_class: InputClass, rows: int | None = None, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    student, teacher, keep = input_class.build(rows or input_class.default_rows, generator)
    start = time.perf_counter()
    traffic = count_rows(student, teacher, mode=input_class.mode, temperature=input_class.temperature, keep=keep)
    elapsed = time.perf_counter() - start
    kept = traffic.kept
    result = {
        "class": input_class.name,
        "target": input_class.target,
        "rows": int(kept.size),
        "vocab": int(student.shape[1]),
        "dtype": str(teacher.dtype).removeprefix("torch."),
        "seconds": elapsed,
        "other_units": traffic.other_units,
    }
    for label, rows_mask in (("kept", kept), ("ignored", ~kept)):
        if not rows_mask.any():
            continue
        part = {name: float(getattr(traffic, name)[rows_mask].mean()) for name in UNIT_NAMES}
        part["rows"] = int(rows_mask.sum())
        total = traffic.total[rows_mask]
        part.update(total_mean=float(total.mean()), total_max=float(total.max()))
        result[label] = part
    result["split_paths"] = dict(Counter(p for p, k in zip(traffic.split_path, kept) if k))
    return result


def markdown_table(results: list[dict]) -> str:
    lines = ["| input class | rows | teacher reads | student reads | gradient writes | units per row (mean / max) | other | split paths |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        for label in ("kept", "ignored"):
            if label not in r:
                continue
            part = r[label]
            name = r["class"] + (" (ignored rows)" if label == "ignored" else "")
            rows = part["rows"]
            paths = ", ".join(f"{k} {v}" for k, v in sorted(r.get("split_paths", {}).items())) if label == "kept" else ""
            lines.append(
                f"| {name} | {rows} | {part['teacher']:.2f} | {part['student']:.2f} | {part['gradient']:.2f} | "
                f"{part['total_mean']:.2f} / {part['total_max']:.2f} | {r['other_units']:.3f} | {paths} |"
            )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=None, help="rows per class (default: each class's own)")
    parser.add_argument("--classes", default=None, help="comma-separated substrings of class names to run")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    chosen = [c for c in CLASSES if args.classes is None or any(s in c.name for s in args.classes.split(","))]
    results = []
    for input_class in chosen:
        results.append(measure_class(input_class, args.rows, args.seed))
        r = results[-1]
        print(f"{r['class']}: {r['kept']['total_mean']:.2f} units per kept row ({r['seconds']:.0f} s)", flush=True)
    print()
    print(markdown_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
