"""Benchmark inputs: language-model-like logits, and the shapes each device is measured at."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Issue 3's matrix. CPU: small enough that the whole suite runs in minutes on 2 cores; it
# contains SPEC section 5's CPU target (float32, N=1024, V=32000). GPU: realistic training
# shapes, bf16 and fp32, up to N*V = 2^31 elements.
CPU_ROWS, CPU_VOCABS, CPU_DTYPES = (256, 1024), (32000, 50257), (torch.float32,)
GPU_ROWS, GPU_VOCABS, GPU_DTYPES = (4096, 16384), (32000, 50257, 128256), (torch.bfloat16, torch.float32)
SPEC_CPU_TARGET = {"rows": 1024, "vocab": 32000, "dtype": "float32", "speedup": 8.0, "memory_ratio": 1.25}


@dataclass(frozen=True)
class Shape:
    rows: int
    vocab: int
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def label(self) -> str:
        return f"{self.dtype_name}-{self.rows}x{self.vocab}"

    @classmethod
    def from_label(cls, label: str) -> Shape:
        dtype, size = label.split("-")
        rows, vocab = size.split("x")
        return cls(int(rows), int(vocab), getattr(torch, dtype))


def shapes_for(device: torch.device) -> list[Shape]:
    """The benchmark matrix of a device type, ordered so that equal inputs are adjacent."""
    if device.type == "cuda":
        rows, vocabs, dtypes = GPU_ROWS, GPU_VOCABS, GPU_DTYPES
    else:
        rows, vocabs, dtypes = CPU_ROWS, CPU_VOCABS, CPU_DTYPES
    return [Shape(n, v, d) for d in dtypes for n in rows for v in vocabs]


def realistic_logits(rows, vocab, *, generator, dtype=torch.float32, device="cpu"):
    """(rows, vocab) logits shaped like a language model's: Zipf-like with per-row noise.

    Token j of row i gets -alpha_i * log(1 + r_ij) + 0.3 * noise, with r_ij uniform on
    [0, vocab) (a random rank, drawn independently so that no sort is needed) and alpha_i
    uniform in [0.8, 2.0]: a peaked top and a long tail, the head at mu = 0.5 ranging from one
    token to hundreds. `generator` must live on `device`.
    """
    alpha = torch.empty(rows, 1, device=device).uniform_(0.8, 2.0, generator=generator)
    rank = torch.rand(rows, vocab, generator=generator, device=device).mul_(vocab)
    noise = torch.randn(rows, vocab, generator=generator, device=device).mul_(0.3)
    return rank.log1p_().mul_(-alpha).add_(noise).to(dtype)


def make_inputs(shape: Shape, device: torch.device, seed: int = 0):
    """Student and teacher logits for one benchmark shape (independent draws, same recipe)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    student = realistic_logits(shape.rows, shape.vocab, generator=generator, dtype=shape.dtype, device=device)
    teacher = realistic_logits(shape.rows, shape.vocab, generator=generator, dtype=shape.dtype, device=device)
    return student, teacher
