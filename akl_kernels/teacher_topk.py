"""A stored sparse teacher: TeacherTopK, and the two ways to make one (from logits, from hidden states).

Offline distillation runs the teacher once, keeps its k most probable tokens per position as
(log-probability, vocabulary index) pairs, and distils later from those pairs alone. Every
token the teacher did not list becomes one outcome, the bucket, holding the teacher's missing
mass (docs/semantics.md rules 31-38).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Rows per chunk of teacher_topk: a chunk's float32 log-probabilities and their stable sort take
# a few times CHUNK_ELEMENTS elements, whatever N is.
CHUNK_ELEMENTS = 1 << 22


class TeacherTopK(NamedTuple):
    """The teacher's k listed tokens per row, accepted as the teacher argument of every KL loss.

    logprobs: (..., K) float16/bfloat16/float32/float64 log-probabilities normalised over the
        teacher's whole vocabulary (log_softmax at the temperature chosen when they were
        stored); the loss's temperature then applies to the student only.
    indices: (..., K) int32/int64 vocabulary indices of those tokens, each listed once per row;
        -1 marks padding (a row may list fewer than K tokens).
    """

    logprobs: torch.Tensor
    indices: torch.Tensor


def teacher_topk(teacher_logits, k, *, temperature=1.0):
    """The k most probable tokens of each row of teacher logits as a TeacherTopK.

    Args:
        teacher_logits: (..., V) floating logits.
        k: tokens per row, 1 <= k <= V.
        temperature: T > 0; the log-probabilities are log_softmax(teacher_logits / T) in float32.

    Returns:
        TeacherTopK with (..., k) float32 logprobs in descending order (ties by lower vocabulary
        index, the head/tail order of the losses) and (..., k) int64 indices.
    """
    if not isinstance(teacher_logits, torch.Tensor) or not teacher_logits.dtype.is_floating_point:
        raise TypeError("teacher_logits must be a floating torch.Tensor of shape (..., V)")
    vocab = teacher_logits.shape[-1] if teacher_logits.dim() else 0
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, V] = [1, {vocab}], got {k!r}")
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    rows = teacher_logits.reshape(-1, vocab)
    logprobs = torch.empty(rows.shape[0], k, dtype=torch.float32, device=rows.device)
    indices = torch.empty(rows.shape[0], k, dtype=torch.int64, device=rows.device)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // vocab)
    for start in range(0, rows.shape[0], rows_per_chunk):
        chunk = torch.log_softmax(rows[start:start + rows_per_chunk].float() / temperature, dim=-1)
        # A stable sort keeps the lower index first among equal log-probabilities.
        values, order = torch.sort(chunk, dim=-1, descending=True, stable=True)
        logprobs[start:start + rows_per_chunk] = values[:, :k]
        indices[start:start + rows_per_chunk] = order[:, :k]
    leading = teacher_logits.shape[:-1]
    return TeacherTopK(logprobs.reshape(*leading, k), indices.reshape(*leading, k))


def teacher_topk_from_hidden(teacher_hidden, teacher_weight, k, *, teacher_bias=None, temperature=1.0, chunk_size=None):
    """teacher_topk of teacher_hidden @ teacher_weight.T + teacher_bias, a chunk of rows at a time.

    Only one chunk's logits exist at once (chunk_size rows, float32), never the (N, V) logits.

    Args:
        teacher_hidden: (..., H) floating hidden states. teacher_weight: (V, H) lm_head weight.
        k, temperature: as teacher_topk. teacher_bias: optional (V,).
        chunk_size: rows per chunk; None picks about 2^22 / V rows.

    Returns:
        TeacherTopK of shape (..., k), as teacher_topk.
    """
    if teacher_hidden.shape[-1] != teacher_weight.shape[-1]:
        raise ValueError(
            f"teacher_hidden has hidden size {teacher_hidden.shape[-1]} but teacher_weight is "
            f"{tuple(teacher_weight.shape)} (expected (V, {teacher_hidden.shape[-1]}))"
        )
    vocab = teacher_weight.shape[0]
    rows = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    chunk_size = chunk_size or max(1, CHUNK_ELEMENTS // max(vocab, 1))
    weight = teacher_weight.float()
    bias = None if teacher_bias is None else teacher_bias.float()
    parts = []
    with torch.no_grad():
        for start in range(0, rows.shape[0], chunk_size):
            logits = torch.nn.functional.linear(rows[start:start + chunk_size].float(), weight, bias)
            parts.append(teacher_topk(logits, k, temperature=temperature))
    leading = teacher_hidden.shape[:-1]
    if not parts:
        return TeacherTopK(
            torch.empty(*leading, k, dtype=torch.float32, device=rows.device),
            torch.empty(*leading, k, dtype=torch.int64, device=rows.device),
        )
    return TeacherTopK(
        torch.cat([part.logprobs for part in parts]).reshape(*leading, k),
        torch.cat([part.indices for part in parts]).reshape(*leading, k),
    )
