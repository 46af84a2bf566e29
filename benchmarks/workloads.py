"""Benchmark inputs: language-model-like logits or hidden states, and the shapes each device is measured at."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

# Issue 3's matrix. CPU, float32 (N, V) pairs: small enough that the whole suite, the
# fused-linear case included, runs within 5 minutes on 2 cores; it contains SPEC section 5's CPU
# target (N=1024, V=32000). (1024, 50257) was dropped for issue 6's case: its eager reference
# alone took 45 s. GPU: realistic training shapes, bf16 and fp32, up to N*V = 2^31 elements.
CPU_SHAPES = ((256, 32000), (256, 50257), (1024, 32000))
GPU_ROWS, GPU_VOCABS, GPU_DTYPES = (4096, 16384), (32000, 50257, 128256), (torch.bfloat16, torch.float32)
SPEC_CPU_TARGET = {"rows": 1024, "vocab": 32000, "dtype": "float32", "speedup": 8.0, "memory_ratio": 1.25}
# Issue 6's fused-linear shapes (N tokens, hidden size H, vocabulary V) and its CPU memory target:
# fused_linear_akl_loss needs at least 5x less peak memory than materialised logits.
CPU_LINEAR = ((2048, 512, 32000, "float32"),)
GPU_LINEAR = ((8192, 4096, 128256, "bfloat16"),)
FUSED_LINEAR_MEMORY_TARGET = 5.0


@dataclass(frozen=True)
class Shape:
    """Logits workloads: N rows of V student and teacher logits; the student's get a gradient."""

    rows: int
    vocab: int
    dtype: torch.dtype
    hidden: ClassVar[None] = None
    differentiated: ClassVar[int] = 1  # leading inputs that receive a gradient

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def label(self) -> str:
        return f"{self.dtype_name}-{self.rows}x{self.vocab}"



@dataclass(frozen=True)
class LinearShape:
    """Hidden-state workloads: N rows of hidden size H and (V, H) lm_head weights, student and
    teacher; the student's hidden states and weight get a gradient."""

    rows: int
    hidden: int
    vocab: int
    dtype: torch.dtype
    differentiated: ClassVar[int] = 2

    dtype_name = Shape.dtype_name

    @property
    def label(self) -> str:
        return f"{self.dtype_name}-{self.rows}x{self.hidden}x{self.vocab}"


def shape_from_label(label: str) -> Shape | LinearShape:
    """The Shape ("float32-1024x32000") or LinearShape ("float32-2048x512x32000") of a label."""
    dtype, size = label.split("-")
    sizes = [int(n) for n in size.split("x")]
    return (Shape if len(sizes) == 2 else LinearShape)(*sizes, getattr(torch, dtype))


def linear_shapes_for(device: torch.device) -> list[LinearShape]:
    """The fused-linear benchmark shapes of a device type."""
    shapes = GPU_LINEAR if device.type == "cuda" else CPU_LINEAR
    return [LinearShape(n, h, v, getattr(torch, d)) for n, h, v, d in shapes]


def shapes_for(device: torch.device) -> list[Shape]:
    """The benchmark matrix of a device type, ordered so that equal inputs are adjacent."""
    if device.type == "cuda":
        return [Shape(n, v, d) for d in GPU_DTYPES for n in GPU_ROWS for v in GPU_VOCABS]
    return [Shape(n, v, torch.float32) for n, v in CPU_SHAPES]


# Real next-token logits (SmolLM2-135M-Instruct, 129 rows x 49152, bf16), shipped in the project's
# shared folder beside the repository; AKL_REAL_ROWS overrides the path.
REAL_ROWS_PATH = Path(os.environ.get(
    "AKL_REAL_ROWS", Path(__file__).resolve().parents[2] / "shared" / "data" / "smollm2_rows_bf16.pt"))


@functools.cache
def real_rows() -> torch.Tensor:
    """The real rows as a (129, 49152) bfloat16 CPU tensor; row i + 1 serves as the student of row i."""
    if not REAL_ROWS_PATH.exists():
        raise FileNotFoundError(
            f"real logits not found at {REAL_ROWS_PATH}: the project's shared/data folder must sit beside "
            "the repository, or set AKL_REAL_ROWS to the file")
    return torch.load(REAL_ROWS_PATH, weights_only=True)


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


def make_inputs(shape: Shape | LinearShape, device: torch.device, seed: int = 0) -> tuple:
    """A benchmark shape's inputs: (student, teacher) logits for a Shape, (student_hidden,
    student_weight, teacher_hidden, teacher_weight) for a LinearShape."""
    generator = torch.Generator(device=device).manual_seed(seed)
    if isinstance(shape, LinearShape):
        return linear_inputs(shape, generator, device)
    student = realistic_logits(shape.rows, shape.vocab, generator=generator, dtype=shape.dtype, device=device)
    teacher = realistic_logits(shape.rows, shape.vocab, generator=generator, dtype=shape.dtype, device=device)
    return student, teacher


def linear_inputs(shape: LinearShape, generator, device) -> tuple:
    """Gaussian hidden states and lm_head weights scaled so that the logits' spread is about 3
    (student) and 4 (teacher): the teacher's head at mu = 0.5 holds tens of tokens."""
    def draw(*size, std=1.0):
        return torch.randn(*size, generator=generator, device=device).mul_(std).to(shape.dtype)

    n, h, v = shape.rows, shape.hidden, shape.vocab
    return draw(n, h), draw(v, h, std=3.0 / h**0.5), draw(n, h), draw(v, h, std=4.0 / h**0.5)
