"""Benchmark results: the machine-readable file, and its rendering as a markdown table and a plot.

    python -m benchmarks.results benchmarks/results/cpu.json   # writes cpu.md and cpu.png beside it

The file holds one "environment" object (device, versions, date, command, copy bandwidth) and
one record per (contender, shape): times per phase, peak extra memory, bandwidth, the loss
value, or the reason the contender was skipped. Records of the fused-linear workloads (those
with a hidden size) get their own table, with time and memory against materialised logits.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from benchmarks.contenders import FUSED_LINEAR, MATERIALISED_LINEAR
from benchmarks.workloads import FUSED_LINEAR_MEMORY_TARGET, CPU_TARGET, SOURCES, SPLIT_PRICE_TARGET

OURS = "akl_loss"
KL_LOSSES = ("akl", "fkl", "rkl")
MIB = 2**20
GPU_BANDWIDTH_TARGET = 0.7
GPU_TARGET_MIN_ELEMENTS = 2**30


def add_ratios(records):
    """Every measured logits record's forward+backward time over akl_loss's at the same shape;
    every fused-linear record's time and peak memory over the materialised logits' ones."""
    measured = [r for r in records if r["status"] == "measured"]
    ours = {_shape_key(r): r for r in measured if r["contender"] == OURS}
    materialised = {_shape_key(r): r for r in measured if r["contender"] == MATERIALISED_LINEAR}
    for r in records:
        key, is_measured = _shape_key(r), r["status"] == "measured"
        if r.get("hidden") is None:
            r["time_ratio_to_akl_loss"] = _ratio(r, ours.get(key), "fwd_bwd_s") if is_measured else None
            continue
        base = materialised.get(key) if is_measured else None
        r["time_ratio_to_materialised"] = _ratio(r, base, "fwd_bwd_s")
        r["memory_ratio_to_materialised"] = _ratio(r, base, "peak_extra_bytes")


def _ratio(record, base, field):
    if base is None or record[field] is None or not base[field]:
        return None
    return record[field] / base[field]


def write(path: Path, environment: dict, records: list[dict], plot: bool = True) -> None:
    """Write the results file and its markdown (and, with plot, the PNG) beside it."""
    add_ratios(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment, "results": records}, indent=1) + "\n")
    render(path, plot)


def render(path: Path, plot: bool = True) -> tuple[Path, Path]:
    data = json.loads(path.read_text())
    markdown, plot_path = path.with_suffix(".md"), path.with_suffix(".png")
    markdown.write_text(markdown_report(data, plot_name=plot_path.name if plot else None))
    if plot:
        _plot(data, plot_path)
    return markdown, plot_path


def _shape_key(r):
    # results written before the split-price workloads have no temperature or source: T = 1, LM-like;
    # before the stored teacher, no topk: a dense teacher (0)
    return (r["dtype"], r["rows"], r.get("hidden"), r["vocab"], r.get("temperature") or 1.0, r.get("source") or "lm",
            r.get("topk") or 0)


def _shape_text(r):
    sizes = (r["rows"], r["vocab"]) if r.get("hidden") is None else (r["rows"], r["hidden"], r["vocab"])
    text = f"{r['dtype']} " + " x ".join(str(n) for n in sizes)
    if SOURCES.get(r.get("source") or "lm"):
        text += " " + SOURCES[r["source"]]
    if r.get("temperature") not in (None, 1.0):
        text += f" T={r['temperature']:g}"
    if r.get("topk"):
        text += f" stored top-{r['topk']}"
    return text


def _fmt(value, scale=1.0, digits=1, unit=""):
    return "" if value is None else f"{value * scale:.{digits}f}{unit}"


def markdown_report(data, plot_name=None) -> str:
    env, records = data["environment"], data["results"]
    gpu = env["device_type"] == "cuda"
    lines = [
        f"# Benchmark results: {env['device']}",
        "",
        f"{env['date']}; torch {env['torch']}, triton {env['triton']}, liger_kernel {env['liger_kernel'] or 'not installed'}; "
        f"command: `{env['command']}`.",
        "",
        _method(env),
        "",
    ]
    header = ["shape (dtype, N x V)", "contender", "forward ms", "backward ms", "fwd+bwd ms", "x akl_loss",
              "peak extra MiB", "/ gradient"]
    if gpu:
        header += ["GB/s", "of copy"]
    logits_records = [r for r in records if r["status"] == "measured" and r.get("hidden") is None]
    if logits_records:
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    skipped = [r for r in records if r["status"] != "measured"]
    for r in logits_records:
        row = [_shape_text(r), r["contender"], _fmt(r["forward_s"], 1e3),
               _fmt(r["backward_s"], 1e3), _fmt(r["fwd_bwd_s"], 1e3), _fmt(r["time_ratio_to_akl_loss"], digits=2),
               _fmt(r["peak_extra_bytes"], 1 / MIB, 0) if r["peak_extra_bytes"] is not None else r["memory_note"] or "",
               _fmt(r["memory_ratio"], digits=2)]
        if gpu:
            row += [_fmt(r["bandwidth_bytes_per_s"], 1e-9, 0), _fmt(r["copy_bandwidth_fraction"], 100, 0, "%")]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", *spec_summary(data)]
    lines += split_price_summary(data)
    lines += family_summary(data)
    lines += stored_teacher_summary(data)
    lines += _fused_linear_report(records)
    if skipped:
        lines += ["", "Skipped (contender, shape: reason):", ""]
        lines += [f"- {r['contender']}, {_shape_text(r)}: {r['reason']}" for r in skipped]
    if plot_name:
        lines += ["", f"![time and memory against vocabulary size]({plot_name})"]
    return "\n".join(lines) + "\n"


def _fused_linear_report(records) -> list[str]:
    """The fused-linear table and, per shape, the memory saving against its target."""
    linear = [r for r in records if r["status"] == "measured" and r.get("hidden") is not None]
    if not linear:
        return []
    lines = ["", "## Fused linear: from hidden states and lm_head weights", "",
             f"{FUSED_LINEAR} against `F.linear` logits (in the inputs' dtype) followed by akl_loss; gradients for "
             "the student's hidden states and weight. Peak extra memory includes both gradients.", "",
             "| shape (dtype, N x H x V) | contender | forward ms | backward ms | fwd+bwd ms | x materialised "
             "| peak extra MiB | x materialised |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in linear:
        peak = _fmt(r["peak_extra_bytes"], 1 / MIB, 0) if r["peak_extra_bytes"] is not None else r["memory_note"] or ""
        lines.append("| " + " | ".join([
            _shape_text(r), r["contender"], _fmt(r["forward_s"], 1e3), _fmt(r["backward_s"], 1e3),
            _fmt(r["fwd_bwd_s"], 1e3), _fmt(r["time_ratio_to_materialised"], digits=2), peak,
            _fmt(r["memory_ratio_to_materialised"], digits=3)]) + " |")
    lines.append("")
    for r in linear:
        if r["contender"] != FUSED_LINEAR:
            continue
        memory, time_ratio = r["memory_ratio_to_materialised"], r["time_ratio_to_materialised"]
        if memory is None or time_ratio is None:
            lines.append(f"- {_shape_text(r)}: no materialised figure to compare with in this run.")
            continue
        saving = 1 / memory
        lines.append(
            f"- {_shape_text(r)}: {FUSED_LINEAR} needs **{saving:.1f}x less** peak extra memory than materialised "
            f"logits (target at least {FUSED_LINEAR_MEMORY_TARGET:.0f}x: "
            f"{'met' if saving >= FUSED_LINEAR_MEMORY_TARGET else 'NOT met'}) and takes **{time_ratio:.2f}x** their "
            "forward+backward time."
        )
    return lines


def _method(env) -> str:
    """One paragraph saying how the figures were taken."""
    gpu = env["device_type"] == "cuda"
    parts = ["Forward and backward of each loss on the same inputs (language-model-like logits, teacher and student "
             f"drawn independently), median of {env['rounds']} rounds"]
    if gpu:
        parts.append(f"after a full-size warm-up call ({env['slow_rounds']} rounds when that call took over "
                     f"{env['slow_call_s']:g} s).")
    else:
        parts.append("after a warm-up call on 8 rows (none for the eager reference, which has nothing to compile or "
                     "initialise).")
    parts.append("`x akl_loss`: forward+backward time over akl_loss's (above 1: slower than ours). Memory: the peak "
                 "that one forward+backward adds to its inputs, gradient included, and that peak over the gradient's "
                 "size.")
    if gpu:
        copy = env.get("copy_bandwidth_bytes_per_s")
        parts.append("Bandwidth: minimal bytes (read student and teacher once, write the gradient once) over the "
                     "forward+backward time, and its fraction of a device-to-device copy measured in the same run "
                     + (f"({copy / 1e9:.0f} GB/s)." if copy else "(not measured in this run)."))
    return " ".join(parts)


def spec_summary(data) -> list[str]:
    """docs/semantics.md section 5's targets, met or not, in plain numbers."""
    env, records = data["environment"], data["results"]
    measured = {(r["contender"], *_shape_key(r)): r for r in records if r["status"] == "measured"}
    if env["device_type"] != "cuda":
        t = CPU_TARGET
        key = (t["dtype"], t["rows"], None, t["vocab"], 1.0, "lm", 0)
        ours, ref = measured.get((OURS, *key)), measured.get(("reference (eager)", *key))
        if not (ours and ref):
            return [f"docs/semantics.md section 5 CPU target ({t['dtype']}, N={t['rows']}, V={t['vocab']}): not measured in this run."]
        speedup = ref["fwd_bwd_s"] / ours["fwd_bwd_s"]
        memory = ours["memory_ratio"]
        return [
            f"docs/semantics.md section 5 CPU target ({t['dtype']}, N={t['rows']}, V={t['vocab']}, forward+backward): "
            f"akl_loss is **{speedup:.1f}x** faster than the eager reference (target at least {t['speedup']:.0f}x: "
            f"{'met' if speedup >= t['speedup'] else 'NOT met'}); its peak extra memory is "
            f"**{_fmt(memory, digits=2)}x** the gradient (target at most {t['memory_ratio']}x: "
            f"{'met' if memory is not None and memory <= t['memory_ratio'] else 'NOT met'})."
        ]
    lines = [f"docs/semantics.md section 5 GPU targets (N x V >= 2^30, forward+backward): at least "
             f"{GPU_BANDWIDTH_TARGET:.0%} of copy bandwidth, faster than the best peer and than torch.compile "
             "of the reference.", ""]
    for (name, *key), r in measured.items():
        if name != OURS or r["rows"] * r["vocab"] < GPU_TARGET_MIN_ELEMENTS:
            continue
        # peers of the KL losses (those of the other divergences are in family_summary)
        peers = [p for (_, *k), p in measured.items()
                 if p["role"] == "peer" and k == key and p.get("computes", "akl") in KL_LOSSES]
        best = min(peers, key=lambda p: p["fwd_bwd_s"], default=None)
        fraction = r["copy_bandwidth_fraction"]
        bandwidth = ("copy bandwidth not measured" if fraction is None else
                     f"{fraction:.0%} of copy bandwidth ({'met' if fraction >= GPU_BANDWIDTH_TARGET else 'NOT met'})")
        lines.append(
            f"- {_shape_text(r)}: {bandwidth}; "
            + (f"fastest peer {best['contender']} takes {best['time_ratio_to_akl_loss']:.2f}x our time "
               f"({'met' if best['time_ratio_to_akl_loss'] > 1 else 'NOT met'})" if best else "no peer measured")
        )
    return lines


def split_price_summary(data) -> list[str]:
    """docs/semantics.md section 5's split price: akl_loss forward+backward over fkl_loss's on the same inputs,
    per logits workload, with the share of rows that took each path of the split."""
    measured = {(r["contender"], *_shape_key(r)): r for r in data["results"] if r["status"] == "measured"}
    lines = []
    for (name, *key), akl in measured.items():
        fkl = measured.get(("fkl_loss", *key))
        if name != OURS or fkl is None or akl.get("topk"):
            continue
        price = akl["fwd_bwd_s"] / fkl["fwd_bwd_s"]
        paths = ", ".join(f"{path} {share:.0%}" if share >= 0.01 else f"{path} <1%"
                          for path, share in sorted((akl.get("split_paths") or {}).items()))
        lines.append(f"| {_shape_text(akl)} | {_fmt(akl['fwd_bwd_s'], 1e3)} | {_fmt(fkl['fwd_bwd_s'], 1e3)} | "
                     f"**{price:.2f}x** ({'met' if price <= SPLIT_PRICE_TARGET else 'NOT met'}) | {paths} |")
    if not lines:
        return []
    return ["", f"Split price (docs/semantics.md section 5: akl_loss forward+backward at most {SPLIT_PRICE_TARGET}x fkl_loss's), "
            "with the share of rows that took each path of the head/tail split:", "",
            "| shape | akl_loss ms | fkl_loss ms | akl / fkl | split paths |", "|---|---:|---:|---:|---|", *lines]


def stored_teacher_summary(data) -> list[str]:
    """Each of our losses from a stored top-K teacher (a TeacherTopK) against the same loss from
    the dense teacher logits of the same shape: forward+backward time and peak extra memory."""
    measured = {(r["contender"], *_shape_key(r)): r for r in data["results"] if r["status"] == "measured"}
    lines = []
    for (name, *key), sparse in measured.items():
        dense = measured.get((name, *key[:-1], 0))
        if sparse.get("role") != "ours" or not sparse.get("topk") or dense is None:
            continue
        memory = _ratio(sparse, dense, "peak_extra_bytes")
        lines.append(f"| {_shape_text(dense)} | {name} | {sparse['topk']} | {_fmt(sparse['fwd_bwd_s'], 1e3)} | "
                     f"{_fmt(dense['fwd_bwd_s'], 1e3)} | **{sparse['fwd_bwd_s'] / dense['fwd_bwd_s']:.2f}x** | "
                     f"{_fmt(memory, digits=2)} |")
    if not lines:
        return []
    return ["", "The stored (top-K) teacher: each loss from a TeacherTopK (float16 log-probabilities, int32 "
            "indices) against the same loss from the dense teacher logits (forward+backward):", "",
            "| shape | loss | K | stored ms | dense ms | stored / dense time | stored / dense peak memory |",
            "|---|---|---:|---:|---:|---:|---:|", *lines]


def family_summary(data) -> list[str]:
    """The loss family per logits workload: each of our losses' forward+backward time over
    fkl_loss's, and where a peer computes the same divergence (Liger's JSD and TVD, on a GPU),
    the peer's time over ours."""
    measured = [r for r in data["results"] if r["status"] == "measured" and r.get("hidden") is None]
    by_key = {(r["contender"], *_shape_key(r)): r for r in measured}
    lines = []
    for r in measured:
        fkl = by_key.get(("fkl_loss", *_shape_key(r)))
        if r["role"] != "ours" or r.get("computes") in (None, *KL_LOSSES) or fkl is None:
            continue
        peers = [p for p in measured if p["role"] == "peer" and p.get("computes") == r["computes"]
                 and _shape_key(p) == _shape_key(r)]
        best = min(peers, key=lambda p: p["fwd_bwd_s"], default=None)
        peer = (f"{best['contender']} | {_fmt(best['fwd_bwd_s'], 1e3)} | {best['fwd_bwd_s'] / r['fwd_bwd_s']:.2f}x"
                if best else "none measured | | ")
        lines.append(f"| {_shape_text(r)} | {r['computes']} | {_fmt(r['fwd_bwd_s'], 1e3)} | "
                     f"{r['fwd_bwd_s'] / fkl['fwd_bwd_s']:.2f}x | {peer} |")
    if not lines:
        return []
    return ["", "The rest of the loss family (distillation_loss; forward+backward):", "",
            "| shape | loss | ours ms | ours / fkl_loss | peer | peer ms | peer / ours |",
            "|---|---|---:|---:|---|---:|---:|", *lines]


def _plot(data, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in data["results"] if r["status"] == "measured" and r.get("hidden") is None
               and _shape_key(r)[4:] == (1.0, "lm", 0)]  # the main matrix
    panels = sorted({(r["dtype"], r["rows"]) for r in records})
    fig, axes = plt.subplots(len(panels) or 1, 2, figsize=(11, 3.2 * max(1, len(panels))), squeeze=False)
    for (dtype, rows), (time_ax, memory_ax) in zip(panels, axes):
        series = defaultdict(list)
        for r in records:
            if (r["dtype"], r["rows"]) == (dtype, rows):
                series[r["contender"]].append(r)
        for name, rs in series.items():
            rs.sort(key=lambda r: r["vocab"])
            style = dict(marker="o", linewidth=2.5 if name == OURS else 1.2, label=name)
            time_ax.plot([r["vocab"] for r in rs], [r["fwd_bwd_s"] * 1e3 for r in rs], **style)
            mem = [(r["vocab"], r["peak_extra_bytes"] / MIB) for r in rs if r["peak_extra_bytes"] is not None]
            if mem:
                memory_ax.plot(*zip(*mem), **style)
        time_ax.set(title=f"{dtype}, N={rows}: forward+backward", xlabel="vocabulary size", ylabel="ms", yscale="log")
        memory_ax.set(title=f"{dtype}, N={rows}: peak extra memory", xlabel="vocabulary size", ylabel="MiB",
                      yscale="log")
        for ax in (time_ax, memory_ax):
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{data['environment']['device']} ({data['environment']['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description="Render a benchmark results file as markdown and PNG")
    parser.add_argument("results", type=Path, nargs="+")
    for path in parser.parse_args().results:
        print(*render(path))


if __name__ == "__main__":
    main()
