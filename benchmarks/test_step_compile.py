"""One distillation training step under torch.compile against the same step in eager.

The step: a GPT-2 student and a wider GPT-2 teacher (built from configs, nothing downloaded)
over a batch of token ids, the teacher under no_grad, then

    loss = 0.5 * cross_entropy + 0.5 * akl_loss(student_logits, teacher_logits, labels)

and its backward (the optimizer is left out: it is the same in both). Compiled with
torch.compile(step, dynamic=True) and the default backend (inductor). Eager and compiled steps
alternate, `--akl-rounds` each after two warm-up calls; the first compiled call's time (tracing
and code generation) is reported apart. Results: benchmarks/results/step_compile_<device>.json
and a line in the terminal summary. benchmarks/device_check.sh runs it on a GPU as its own stage.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from akl_kernels import akl_loss
from benchmarks.conftest import RESULTS_DIR

# (batch, tokens, vocabulary, student width, teacher width, layers) per device
SIZES = {"cpu": (8, 128, 8192, 128, 256, 2), "cuda": (16, 512, 32000, 512, 1024, 4)}


def _models(vocab, student_width, teacher_width, layers, device):
    import transformers

    def build(width, seed):
        torch.manual_seed(seed)
        config = transformers.GPT2Config(vocab_size=vocab, n_positions=1024, n_embd=width, n_layer=layers,
                                         n_head=width // 64, bos_token_id=0, eos_token_id=0,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # equal losses to compare
        return transformers.GPT2LMHeadModel(config).to(device)

    return build(student_width, 1), build(teacher_width, 2).eval().requires_grad_(False)


def step(student, teacher, ids, labels):
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits[:, :-1]
    student_logits = student(input_ids=ids).logits[:, :-1]
    targets = labels[:, 1:]
    lm = torch.nn.functional.cross_entropy(student_logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
    return 0.5 * lm + 0.5 * akl_loss(student_logits, teacher_logits, labels=targets)


def _timed(fn, student, teacher, ids, labels):
    """Seconds of one forward and backward of fn's step, and its loss."""
    if ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    student.zero_grad(set_to_none=True)
    loss = fn(student, teacher, ids, labels)
    loss.backward()
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, float(loss)


def test_compiled_step_against_eager(bench, benchmark):
    device = bench.device
    batch, tokens, vocab, student_width, teacher_width, layers = SIZES[device.type]
    student, teacher = _models(vocab, student_width, teacher_width, layers, device)
    g = torch.Generator(device).manual_seed(0)
    ids = torch.randint(0, vocab, (batch, tokens), generator=g, device=device)
    labels = ids.clone()
    labels[:, : tokens // 4] = -100  # a prompt that is not trained on

    torch._dynamo.reset()
    breaks = torch._dynamo.explain(step)(student, teacher, ids, labels).graph_break_count
    torch._dynamo.reset()
    compiled = torch.compile(step, dynamic=True)
    first_compiled_s, compiled_loss = _timed(compiled, student, teacher, ids, labels)
    eager_loss = _timed(step, student, teacher, ids, labels)[1]
    _timed(compiled, student, teacher, ids, labels)  # warm-up (a second specialisation may compile)
    times = {"eager": [], "compiled": []}

    def alternate():
        for _ in range(bench.rounds + 2):
            times["eager"].append(_timed(step, student, teacher, ids, labels)[0])
            times["compiled"].append(_timed(compiled, student, teacher, ids, labels)[0])

    benchmark.group = "step compile"
    benchmark.pedantic(alternate, rounds=1, iterations=1)  # pytest-benchmark's figure: all rounds of both
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "batch": batch, "tokens": tokens, "vocab": vocab, "student_width": student_width,
        "teacher_width": teacher_width, "layers": layers, "rounds": len(times["eager"]),
        "eager_s": medians["eager"], "compiled_s": medians["compiled"],
        "speedup": medians["eager"] / medians["compiled"], "first_compiled_call_s": first_compiled_s,
        "graph_breaks_in_step": breaks, "eager_loss": eager_loss, "compiled_loss": compiled_loss,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    path = bench.results_path.parent / f"step_compile_{device.type}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nstep compile ({result['device']}): eager {medians['eager'] * 1e3:.1f} ms, compiled "
          f"{medians['compiled'] * 1e3:.1f} ms (x{result['speedup']:.2f}), first compiled call "
          f"{first_compiled_s:.1f} s, graph breaks {breaks}")
    assert abs(compiled_loss - eager_loss) <= 1e-4 * abs(eager_loss)
