"""akl_kernels.transformers.DistillationTrainer with tiny GPT-2 and LLaMA models built here
(offline): its loss against the reference, logging, a falling KD loss, gradient accumulation,
torch_compile=True, fused_linear=True and the errors at construction."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from akl_kernels.transformers import DistillationTrainer
from reference import reference_loss

VOCAB, LENGTH = 96, 12


def tiny_model(family, seed, width=32):
    torch.manual_seed(seed)
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=32, n_embd=width, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


def dataset(n_rows=8, seed=0):
    """Token sequences whose first tokens (a prompt) and a ragged tail are not trained on."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n_rows):
        ids = torch.randint(0, VOCAB, (LENGTH,), generator=g)
        labels = ids.clone()
        labels[:3] = -100
        labels[LENGTH - (i % 4):] = -100  # rows differ in how many tokens count
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return rows


def arguments(tmp_path, **overrides):
    options = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=3, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, data_seed=0,
        dataloader_drop_last=True,
    )
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def trainer(tmp_path, family="gpt2", *, args=None, train_dataset=None, **options):
    return DistillationTrainer(
        model=tiny_model(family, 1), teacher_model=tiny_model(family, 2, width=48), args=args or arguments(tmp_path),
        train_dataset=train_dataset or dataset(), **options,
    )


def batch(rows):
    return transformers.default_data_collator(rows)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("loss", ["akl", "rkl"])
def test_loss_is_the_mixture_of_lm_and_the_reference_divergence(tmp_path, family, loss):
    t = trainer(tmp_path, family, loss=loss, kd_ratio=0.3, mu=0.4, temperature=1.5)
    inputs = batch(dataset()[:4])
    got = t.compute_loss(t.model, inputs)
    with torch.no_grad():
        student = t.model(input_ids=inputs["input_ids"]).logits[:, :-1].double()
        teacher = t.teacher_model(input_ids=inputs["input_ids"]).logits[:, :-1].double()
    targets = inputs["labels"][:, 1:]
    lm = torch.nn.functional.cross_entropy(student.flatten(0, 1), targets.flatten(), ignore_index=-100)
    kd, _ = reference_loss(student, teacher, mode=loss, mu=0.4, temperature=1.5, labels=targets)
    assert math.isclose(float(got), 0.7 * float(lm) + 0.3 * float(kd), rel_tol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_steps_log_lm_kd_and_statistics(tmp_path, family):
    t = trainer(tmp_path, family)
    t.train()
    logged = [entry for entry in t.state.log_history if "kd_loss" in entry]
    assert len(logged) == 3
    for entry in logged:
        for name in ("lm_loss", "kd_loss", "kd_fkl", "kd_rkl", "kd_head_gap", "kd_tail_gap", "kd_head_weight",
                     "kd_tail_weight", "kd_head_size"):
            assert math.isfinite(entry[name]), (name, entry)
        # AKL's weights are the gaps' shares; the logged loss is their mixture.
        assert math.isclose(entry["kd_head_weight"] + entry["kd_tail_weight"], 1.0, rel_tol=1e-5)
        assert math.isclose(entry["loss"], 0.5 * entry["lm_loss"] + 0.5 * entry["kd_loss"], rel_tol=1e-3)
        assert entry["kd_head_size"] >= 1


def test_kd_loss_falls(tmp_path):
    args = arguments(tmp_path, max_steps=30, learning_rate=3e-3, per_device_train_batch_size=8)
    t = trainer(tmp_path, args=args, train_dataset=dataset(8), kd_ratio=1.0)
    t.train()
    kd = [entry["kd_loss"] for entry in t.state.log_history if "kd_loss" in entry]
    assert len(kd) == 30
    assert sum(kd[-5:]) / 5 < 0.6 * sum(kd[:5]) / 5, kd


def _trained_weights(tmp_path, batch_size, accumulation, **options):
    args = arguments(tmp_path, max_steps=1, per_device_train_batch_size=batch_size,
                     gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant")
    t = trainer(tmp_path, args=args, train_dataset=dataset(4), **options)
    t.train()
    return {name: p.detach().clone() for name, p in t.model.named_parameters()}


@pytest.mark.parametrize("fused_linear", [False, True])
def test_one_batch_equals_its_two_accumulated_halves(tmp_path, fused_linear):
    # The halves hold different numbers of trained tokens, so a mean per micro-batch would differ.
    whole = _trained_weights(tmp_path, 4, 1, fused_linear=fused_linear)
    halves = _trained_weights(tmp_path, 2, 2, fused_linear=fused_linear)
    start = dict(tiny_model("gpt2", 1).named_parameters())
    for name in whole:
        assert not torch.equal(whole[name], start[name].detach()) or "wpe" in name or "bias" in name
        torch.testing.assert_close(halves[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fused_linear_equals_the_logits_path(tmp_path, family):
    inputs = batch(dataset()[:4])
    results = []
    for fused_linear in (False, True):
        t = trainer(tmp_path, family, fused_linear=fused_linear, chunk_size=7, loss="jsd", beta=0.3)
        loss = t.compute_loss(t.model, inputs)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in t.model.parameters() if p.grad is not None]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert len(grads_a) == len(grads_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_torch_compile_true(tmp_path):
    # aot_eager: the Trainer's compile path (dynamo and AOTAutograd over models and loss) without
    # inductor's C++ build, minutes on a CPU; tests/test_compile.py::test_inductor_step has inductor.
    eager = trainer(tmp_path)
    eager.train()
    args = arguments(tmp_path, torch_compile=True, torch_compile_backend="aot_eager")
    compiled = trainer(tmp_path, args=args)
    compiled.train()
    for a, b in zip(eager.state.log_history, compiled.state.log_history):
        if "kd_loss" in a:
            for name in ("loss", "lm_loss", "kd_loss", "kd_head_weight"):
                assert math.isclose(a[name], b[name], rel_tol=1e-4), (name, a, b)


def test_construction_errors(tmp_path):
    student = tiny_model("gpt2", 1)
    common = dict(model=student, args=arguments(tmp_path), train_dataset=dataset())
    with pytest.raises(ValueError, match="needs teacher_model"):
        DistillationTrainer(**common)
    with pytest.raises(ValueError, match="kd_ratio must be a number in"):
        DistillationTrainer(teacher_model=tiny_model("gpt2", 2), kd_ratio=1.5, **common)
    with pytest.raises(ValueError, match="loss must be one of"):
        DistillationTrainer(teacher_model=tiny_model("gpt2", 2), loss="kl", **common)
    other = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB + 1, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    )
    with pytest.raises(ValueError, match="one vocabulary"):
        DistillationTrainer(teacher_model=other, **common)
    with pytest.raises(ValueError, match="takes neither beta nor alpha"):
        DistillationTrainer(teacher_model=tiny_model("gpt2", 2), loss="fkl", beta=0.5, **common)


def test_batches_without_labels_are_refused(tmp_path):
    t = trainer(tmp_path)
    inputs = batch(dataset()[:2])
    del inputs["labels"]
    with pytest.raises(ValueError, match="needs labels"):
        t.compute_loss(t.model, inputs)
