"""pytest-benchmark configuration: device, rounds, time budget, and the results file.

    pytest benchmarks/ --benchmark-only                       # CPU matrix, or GPU matrix if CUDA is present
    pytest benchmarks/ --benchmark-only --akl-device cpu      # force the CPU matrix
    pytest benchmarks/ --benchmark-only --akl-results PATH    # results file (default benchmarks/results/<device>.json)

The results file (and its markdown) is rewritten after every case, so that a run cut short keeps
what it measured; a run that selects part of the matrix (-k, -m or test ids) without
--akl-results writes <device>-subset.json, never the whole matrix's file. At the end of the
session the results are also rendered to PNG, and the markdown table is printed last. On a GPU,
the compiled reference runs after everything else (its compilation is the slowest step).
"""

from __future__ import annotations

import datetime
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
import torch

from benchmarks import results
from benchmarks.contenders import (
    COMPILED_REFERENCE,
    CONTENDERS,
    FAMILY,
    LINEAR_CONTENDERS,
    Contender,
    Unavailable,
    contenders_for,
    loss_fn,
    with_temperature,
)
from benchmarks.measure import (
    SLOW_CALL_S,
    SLOW_ROUNDS,
    cpu_peak_extra_bytes,
    cuda_copy_bandwidth,
)
from benchmarks.workloads import LinearShape, Shape, make_inputs, shapes_for

RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_ROUNDS = {"cpu": 3, "cuda": 10}


def pytest_addoption(parser):
    group = parser.getgroup("akl-kernels benchmarks")
    group.addoption("--akl-device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="device whose matrix runs (auto: cuda when available)")
    group.addoption("--akl-rounds", type=int, default=None, help="timed rounds per case (default: cpu 3, cuda 10)")
    group.addoption("--akl-results", type=Path, default=None,
                    help="results file (default benchmarks/results/<device type>.json)")
    group.addoption("--akl-time-budget", type=float, default=None,
                    help="seconds; cases that would start later are skipped with that reason")


def _device(config) -> torch.device:
    choice = config.getoption("--akl-device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--akl-device cuda: CUDA is not available")
    return torch.device(choice)


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        device = _device(metafunc.config)
        cases = [(shape, c) for shape in shapes_for(device) for c in contenders_for(shape)]
        if device.type == "cuda":
            # the KL losses and their peers first, then the rest of the family and its peers, the
            # compiled reference last (stable: the shapes keep their order within each group)
            cases.sort(key=lambda case: (case[1].name == COMPILED_REFERENCE, case[1].computes in FAMILY))
        metafunc.parametrize("case", cases, ids=[f"{s.label}-{c.name}" for s, c in cases])


@dataclass
class BenchSession:
    """What the benchmark cases share: the device, cached inputs and figures, and the records."""

    device: torch.device
    rounds: int
    time_budget: float | None
    results_path: Path
    started: float = field(default_factory=time.monotonic)
    records: list = field(default_factory=list)
    _inputs: tuple = (None, None)  # (shape, (student, teacher)): one shape at a time, to bound memory
    _cpu_memory: dict = field(default_factory=dict)
    _copy_bandwidth: float | None = None

    def inputs(self, shape: Shape | LinearShape) -> tuple:
        if self._inputs[0] != shape:
            self._inputs = (None, None)  # free the previous shape's tensors before drawing new ones
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._inputs = (shape, make_inputs(shape, self.device))
        return self._inputs[1]

    def expected_loss(self, shape: Shape | LinearShape, computes: str) -> float:
        """Our loss of kind `computes` on this shape's inputs: a peer's value must equal it.

        Taken from our contender's record at this shape when it ran first (as it does), else computed.
        """
        ours = next(c for c in contenders_for(shape) if c.ours and c.computes == computes)
        for r in self.records:
            if (r["contender"], r["label"]) == (ours.name, shape.label) and r["loss_value"] is not None:
                return r["loss_value"]
        with torch.no_grad():
            return float(with_temperature(loss_fn(ours, self.device), shape)(*self.inputs(shape)))

    def cpu_memory(self, shape: Shape | LinearShape, selected_shapes) -> dict:
        """Peak extra bytes of every contender that runs on a CPU at `shape`.

        The first call probes every selected shape in one subprocess (its compilation is shared).
        """
        if shape not in self._cpu_memory:
            names = []
            for c in CONTENDERS + LINEAR_CONTENDERS:
                try:
                    loss_fn(c, self.device)
                    names.append(c.name)
                except Unavailable:
                    pass
            shapes = list(dict.fromkeys([shape, *selected_shapes]))
            probed = cpu_peak_extra_bytes(shapes, names)
            self._cpu_memory.update({s: probed[s.label] for s in shapes})
        return self._cpu_memory[shape]

    def copy_bandwidth(self) -> float:
        if self._copy_bandwidth is None:
            self._copy_bandwidth = cuda_copy_bandwidth(self.device)
        return self._copy_bandwidth

    def over_budget(self) -> bool:
        return self.time_budget is not None and time.monotonic() - self.started > self.time_budget

    def record(self, shape: Shape | LinearShape, contender: Contender, **figures):
        entry = {"contender": contender.name, "role": contender.role, "computes": contender.computes,
                 "label": shape.label, "rows": shape.rows,
                 "hidden": shape.hidden, "vocab": shape.vocab, "dtype": shape.dtype_name,
                 "temperature": getattr(shape, "temperature", None), "source": getattr(shape, "source", None),
                 "topk": getattr(shape, "topk", 0),
                 "split_paths": None,
                 "status": "measured", "reason": None, "rounds": None, "forward_s": None, "backward_s": None,
                 "fwd_bwd_s": None, "peak_extra_bytes": None, "memory_note": None, "grad_bytes": None,
                 "memory_ratio": None, "minimal_bytes": None, "bandwidth_bytes_per_s": None,
                 "copy_bandwidth_fraction": None, "loss_value": None, "expected_loss_value": None}
        entry.update(figures)
        self.records.append(entry)
        results.write(self.results_path, _environment(self), self.records, plot=False)  # kept if the run is cut

    def skip(self, shape: Shape | LinearShape, contender: Contender, reason: str):
        self.record(shape, contender, status="skipped", reason=reason)
        pytest.skip(f"{contender.name} at {shape.label}: {reason}")


_SESSION = pytest.StashKey[BenchSession]()


def default_results_path(device_type: str, whole_matrix: bool) -> Path:
    """benchmarks/results/<device type>.json for a run of the whole matrix, <device type>-subset.json
    for a run of part of it (which must not overwrite the whole matrix's results)."""
    return RESULTS_DIR / f"{device_type}{'' if whole_matrix else '-subset'}.json"


def pytest_configure(config):
    device = _device(config)
    rounds = config.getoption("--akl-rounds") or DEFAULT_ROUNDS[device.type]
    path = config.getoption("--akl-results") or default_results_path(device.type, whole_matrix=True)
    config.stash[_SESSION] = BenchSession(device, rounds, config.getoption("--akl-time-budget"), path)


_PART = pytest.StashKey[bool]()


def pytest_deselected(items):
    if items:
        items[0].config.stash[_PART] = True


def pytest_collection_finish(session):
    """A run of part of the matrix (cases deselected by -k or -m, or test ids given) writes the
    subset's file unless --akl-results names one."""
    config = session.config
    part = config.stash.get(_PART, False) or any("::" in arg for arg in config.args)
    if part and config.getoption("--akl-results") is None:
        bench = config.stash[_SESSION]
        bench.results_path = default_results_path(bench.device.type, whole_matrix=False)


@pytest.fixture(scope="session")
def bench(pytestconfig) -> BenchSession:
    return pytestconfig.stash[_SESSION]


def _environment(session: BenchSession) -> dict:
    if session.device.type == "cuda":
        name = torch.cuda.get_device_name(session.device)
    else:
        name = f"{_cpu_model()}, {torch.get_num_threads()} threads"
    versions = {}
    for package in ("triton", "liger_kernel"):
        try:
            versions[package] = metadata.version(package.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "device": name,
        "device_type": session.device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "pytest " + " ".join(sys.argv[1:]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **versions,
        "rounds": session.rounds,
        "slow_call_s": SLOW_CALL_S,
        "slow_rounds": SLOW_ROUNDS,
        "copy_bandwidth_bytes_per_s": session._copy_bandwidth,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def pytest_sessionfinish(session, exitstatus):
    bench = session.config.stash.get(_SESSION, None)
    if bench is None or not bench.records:
        return
    results.write(bench.results_path, _environment(bench), bench.records)
    session.config.stash[_REPORT] = bench.results_path


_REPORT = pytest.StashKey[Path]()


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    path = config.stash.get(_REPORT, None)
    if path is None:
        return
    terminalreporter.section("akl-kernels benchmark results")
    terminalreporter.write_line(f"results: {path} (rendered: {path.with_suffix('.md')}, {path.with_suffix('.png')})")
    terminalreporter.write(path.with_suffix(".md").read_text())
