"""The benchmark results file, its ratios and its rendering (benchmarks/results.py)."""

import json

from benchmarks import results


ROLES = {"akl_loss": "ours", "fkl_loss": "ours", "rkl_loss": "ours", "reference (eager)": "reference"}


def record(contender, rows, vocab, dtype, fwd_bwd_s, hidden=None, **figures):
    base = {"contender": contender, "role": ROLES.get(contender, "peer"), "rows": rows, "hidden": hidden, "vocab": vocab,
            "dtype": dtype, "status": "measured",
            "reason": None, "rounds": 3, "forward_s": fwd_bwd_s * 0.9, "backward_s": fwd_bwd_s * 0.1,
            "fwd_bwd_s": fwd_bwd_s, "peak_extra_bytes": None, "memory_note": None, "grad_bytes": 4 * rows * vocab,
            "memory_ratio": None, "minimal_bytes": None, "bandwidth_bytes_per_s": None,
            "copy_bandwidth_fraction": None, "loss_value": 1.0, "expected_loss_value": 1.0}
    base.update(figures)
    return base


def environment(device_type, copy_bandwidth=None):
    return {"device": "test device", "device_type": device_type, "date": "2026-12-01 00:00 UTC",
            "command": "pytest benchmarks/ --benchmark-only", "python": "3.11", "torch": "2.13.0",
            "triton": "3.9.0", "liger_kernel": None, "rounds": 3, "slow_call_s": 1.0, "slow_rounds": 3,
            "copy_bandwidth_bytes_per_s": copy_bandwidth}


def test_cpu_results_give_ratios_and_the_spec_verdicts(tmp_path):
    grad = 4 * 1024 * 32000
    records = [
        record("akl_loss", 1024, 32000, "float32", 0.5, peak_extra_bytes=1.2 * grad, memory_ratio=1.2),
        record("reference (eager)", 1024, 32000, "float32", 4.5, peak_extra_bytes=18 * grad, memory_ratio=18.0),
        record("akl_loss", 256, 32000, "float32", 0.2, peak_extra_bytes=None, memory_note="probe failed"),
        {**record("liger KLDiv (FKL)", 256, 32000, "float32", 0.0), "status": "skipped", "reason": "GPU only"},
    ]
    path = tmp_path / "cpu.json"
    results.write(path, environment("cpu"), records)

    data = json.loads(path.read_text())
    ratios = {(r["contender"], r["rows"]): r["time_ratio_to_akl_loss"] for r in data["results"]}
    assert ratios == {("akl_loss", 1024): 1.0, ("reference (eager)", 1024): 9.0, ("akl_loss", 256): 1.0,
                      ("liger KLDiv (FKL)", 256): None}
    markdown = path.with_suffix(".md").read_text()
    assert "**9.0x** faster than the eager reference (target at least 8x: met)" in markdown
    assert "**1.20x** the gradient (target at most 1.25x: met)" in markdown
    assert "| float32 256 x 32000 | akl_loss | 180.0 | 20.0 | 200.0 | 1.00 | probe failed |  |" in markdown
    assert "- liger KLDiv (FKL), float32 256 x 32000: GPU only" in markdown
    assert path.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_cpu_target_not_met_is_said_so(tmp_path):
    records = [record("akl_loss", 1024, 32000, "float32", 1.0, memory_ratio=1.5, peak_extra_bytes=1),
               record("reference (eager)", 1024, 32000, "float32", 7.0)]
    text = results.markdown_report({"environment": environment("cpu"), "results": _with_ratios(records)})
    assert "**7.0x** faster than the eager reference (target at least 8x: NOT met)" in text
    assert "**1.50x** the gradient (target at most 1.25x: NOT met)" in text


def test_gpu_summary_checks_bandwidth_and_the_best_peer():
    n, v = 16384, 128256  # above 2^30 elements
    copy = 4e12
    records = [
        record("akl_loss", n, v, "bfloat16", 0.010, copy_bandwidth_fraction=0.75, bandwidth_bytes_per_s=3e12),
        record("fkl_loss", n, v, "bfloat16", 0.008, copy_bandwidth_fraction=0.9, bandwidth_bytes_per_s=3.6e12),
        record("reference (eager)", n, v, "bfloat16", 0.005),  # not a peer: faster, yet not counted
        record("reference (torch.compile)", n, v, "bfloat16", 0.030),
        record("liger JSD beta=0 (FKL)", n, v, "bfloat16", 0.012),
        record("akl_loss", 4096, 32000, "bfloat16", 0.001, copy_bandwidth_fraction=0.2, bandwidth_bytes_per_s=1e12),
    ]
    text = results.markdown_report({"environment": environment("cuda", copy), "results": _with_ratios(records)})
    assert "- bfloat16 16384 x 128256: 75% of copy bandwidth (met); fastest peer liger JSD beta=0 (FKL) " \
           "takes 1.20x our time (met)" in text
    assert "4096 x 32000: 20%" not in text  # below 2^30 elements: not a target shape
    assert "(4000 GB/s)" in text


def _with_ratios(records):
    results.add_ratios(records)
    return records


def test_fused_linear_records_get_their_own_table_and_verdict(tmp_path):
    shape = dict(rows=2048, hidden=512, vocab=32000, dtype="float32")
    records = [
        record("akl_loss", 1024, 32000, "float32", 0.5),
        {**record("fused_linear_akl_loss", fwd_bwd_s=4.6, peak_extra_bytes=100 * 2**20, **shape), "role": "ours"},
        {**record("F.linear + akl_loss", fwd_bwd_s=4.0, peak_extra_bytes=800 * 2**20, **shape), "role": "baseline"},
    ]
    path = tmp_path / "cpu.json"
    results.write(path, environment("cpu"), records)
    data = json.loads(path.read_text())
    fused = next(r for r in data["results"] if r["contender"] == "fused_linear_akl_loss")
    assert fused["time_ratio_to_materialised"] == 4.6 / 4.0 and fused["memory_ratio_to_materialised"] == 0.125
    markdown = path.with_suffix(".md").read_text()
    assert "| float32 2048 x 512 x 32000 | fused_linear_akl_loss | 4140.0 | 460.0 | 4600.0 | 1.15 | 100 | 0.125 |" in markdown
    assert "needs **8.0x less** peak extra memory than materialised logits (target at least 5x: met) and takes " \
           "**1.15x** their forward+backward time" in markdown
    assert "2048 x 32000" not in markdown  # not in the logits table
    records[1]["peak_extra_bytes"] = 200 * 2**20
    text = results.markdown_report({"environment": environment("cpu"), "results": _with_ratios(records)})
    assert "**4.0x less** peak extra memory than materialised logits (target at least 5x: NOT met)" in text


def test_split_price_per_workload_with_path_shares(tmp_path):
    paths = {"top": 0.75, "buckets": 0.25}
    records = [
        record("akl_loss", 1024, 32000, "float32", 0.30, split_paths=paths),
        record("fkl_loss", 1024, 32000, "float32", 0.20),
        record("akl_loss", 1024, 49152, "float32", 0.50, temperature=2.0, source="real", split_paths={"buckets": 1.0}),
        record("fkl_loss", 1024, 49152, "float32", 0.25, temperature=2.0, source="real"),
    ]
    path = tmp_path / "cpu.json"
    results.write(path, environment("cpu"), records, plot=False)
    markdown = path.with_suffix(".md").read_text()
    assert not path.with_suffix(".png").exists()  # the PNG only at the end of a run
    assert "| float32 1024 x 32000 | 300.0 | 200.0 | **1.50x** (met) | buckets 25%, top 75% |" in markdown
    assert "| float32 1024 x 49152 real rows T=2 | 500.0 | 250.0 | **2.00x** (NOT met) | buckets 100% |" in markdown
    # each workload's ratios are against akl_loss of the same workload, not of another temperature
    ratios = {(r["contender"], r["vocab"]): r["time_ratio_to_akl_loss"] for r in json.loads(path.read_text())["results"]}
    assert ratios[("fkl_loss", 49152)] == 0.5 and ratios[("fkl_loss", 32000)] == 0.2 / 0.3


def test_gpu_results_without_copy_bandwidth_still_render():
    records = [record("akl_loss", 16384, 128256, "bfloat16", 0.010)]
    text = results.markdown_report({"environment": environment("cuda", None), "results": _with_ratios(records)})
    assert "(not measured in this run)" in text
    assert "- bfloat16 16384 x 128256: copy bandwidth not measured; no peer measured" in text


def test_stored_teacher_against_the_dense_teacher_of_the_same_shape(tmp_path):
    records = [
        record("akl_loss", 1024, 32000, "float32", 0.40, peak_extra_bytes=200),
        record("fkl_loss", 1024, 32000, "float32", 0.30),
        record("akl_loss", 1024, 32000, "float32", 0.20, topk=32, peak_extra_bytes=100),
        record("fkl_loss", 1024, 32000, "float32", 0.10, topk=32),
    ]
    path = tmp_path / "cpu.json"
    results.write(path, environment("cpu"), records, plot=False)
    markdown = path.with_suffix(".md").read_text()
    assert "| float32 1024 x 32000 | akl_loss | 32 | 200.0 | 400.0 | **0.50x** | 0.50 |" in markdown
    assert "| float32 1024 x 32000 | fkl_loss | 32 | 100.0 | 300.0 | **0.33x** |" in markdown
    # the stored teacher's records are neither the dense workload's nor a split price
    assert "float32 1024 x 32000 stored top-32 | 200.0 | 100.0" not in markdown
    ratios = {(r["contender"], r.get("topk")): r["time_ratio_to_akl_loss"] for r in json.loads(path.read_text())["results"]}
    assert ratios[("fkl_loss", 32)] == 0.5 and ratios[("fkl_loss", None)] == 0.30 / 0.40
