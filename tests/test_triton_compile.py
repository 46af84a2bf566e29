"""Ahead-of-time compilation of the Triton kernels for real GPUs, on a machine without one.

CI has no GPU, and the other tests run the kernels in Triton's interpreter, which never runs
the compiler. Here every kernel of every variant (loss mode, dtypes, labels or none, gradient
kernel or none) is compiled to a cubin for Hopper (sm_90) and Ampere (sm_80) in a subprocess without
TRITON_INTERPRET (tests/aot_compile.py), and what the compiled code does is checked: at most
128 registers per thread (two programs of 256 threads per SM), no local memory traffic (no
register spills) in the 16- and 32-bit variants, and 16-byte loads of the logits in the
streaming passes (pass 1 in the statistics kernel, passes 2 and 3 in the gap, terms and
gradient kernels; the bracket passes read one logit per thread) and 16-byte stores of the gradient.
"""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from akl_kernels.divergences import BY_MODE  # noqa: E402
from akl_kernels.triton_backend import (  # noqa: E402
    MAX_REGISTERS,
    _gap_kernel,
    _gradient_kernel,
    _row_statistics_kernel,
    _split_kernel,
    _terms_kernel,
)
from akl_kernels.triton_sparse import _sparse_gradient_kernel, _unlisted_logsumexp_kernel  # noqa: E402
from tests.aot_compile import SPARSE_VARIANTS, VARIANTS, variant_id  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STREAMING_KERNELS = ("_row_statistics_kernel", "_gap_kernel", "_gap_kernel_bracket", "_terms_kernel", "_gradient_kernel")


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return _compile()
    # Under pytest-xdist the workers share one compilation: the first writes it into the run's
    # temporary folder (shared by the workers, new for every run), the others wait and read it.
    from filelock import FileLock

    path = tmp_path_factory.getbasetemp().parent / "aot_compile.json"
    with FileLock(f"{path}.lock"):
        if not path.exists():
            path.write_text(json.dumps(_compile()))
    return json.loads(path.read_text())


def _compile():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "tests.aot_compile"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _kernels(variant):
    mode, split, compute_grad = variant[2], variant[3], variant[4]
    names = ["_row_statistics_kernel"]
    if split:
        names += ["_split_kernel", "_gap_kernel", "_gap_kernel_bracket"]
    if BY_MODE[mode].has_terms:
        names.append("_terms_kernel")
    return names + ["_loss_kernel"] + (["_gradient_kernel"] if compute_grad else [])


@pytest.mark.parametrize("capability,variant", VARIANTS, ids=[variant_id(c, v) for c, v in VARIANTS])
def test_kernels_compile_within_budget(compiled, capability, variant):
    report = compiled[variant_id(capability, variant)]
    assert sorted(report) == sorted(_kernels(variant))
    student, teacher, _mode, _split, _grad, _keep = variant
    for name, usage in report.items():
        assert usage["target"].startswith(f".target sm_{capability}"), name  # sm_90a on Hopper
        assert 0 < usage["registers"] <= MAX_REGISTERS, (name, usage)
        memory = usage["memory"]
        if "fp64" in (student, teacher):
            continue  # float64 (tests, gradcheck) may spill
        assert usage["local"] == 0 and memory.get("LDL", 0) == 0 and memory.get("STL", 0) == 0, (name, usage)
        if name in STREAMING_KERNELS:
            # teacher and student rows, 16 bytes a thread a load (fp32: two loads each)
            assert memory.get("LDG.E.128", 0) >= 2, (name, memory)
            narrow = {"fp16": "LDG.E.U16", "bf16": "LDG.E.U16", "fp32": "LDG.E"}
            if teacher == student and teacher != "fp32":
                assert memory.get(narrow[teacher], 0) == 0, (name, memory)  # no 2-byte logit loads
        if name == "_gradient_kernel":
            assert memory.get("STG.E.128", 0) >= 1, memory


@pytest.mark.parametrize("capability,variant", SPARSE_VARIANTS, ids=[variant_id(c, v) for c, v in SPARSE_VARIANTS])
def test_stored_teacher_kernels_compile_within_budget(compiled, capability, variant):
    report = compiled[variant_id(capability, variant)]
    assert sorted(report) == ["_sparse_gradient_kernel", "_unlisted_logsumexp_kernel"]
    for name, usage in report.items():
        assert usage["target"].startswith(f".target sm_{capability}"), name
        assert 0 < usage["registers"] <= MAX_REGISTERS, (name, usage)
        memory = usage["memory"]
        assert usage["local"] == 0 and memory.get("LDL", 0) == 0 and memory.get("STL", 0) == 0, (name, usage)
        assert memory.get("LDG.E.128", 0) >= 1, (name, memory)  # the student row, 16 bytes a thread a load
    assert report["_sparse_gradient_kernel"]["memory"].get("STG.E.128", 0) >= 1


def test_runtime_scalars_are_not_compile_time_constants():
    # mu, temperature and ignore_index must not trigger recompilation: none is a constexpr.
    for kernel in (_unlisted_logsumexp_kernel, _sparse_gradient_kernel):  # T arrives as c = log2(e)/T, inv_t
        annotations = {name: str(p.annotation) for name, p in inspect.signature(kernel.fn).parameters.items()}
        assert "constexpr" not in annotations.get("c", annotations.get("inv_t"))
    for kernel in (_row_statistics_kernel, _split_kernel, _gap_kernel, _terms_kernel, _gradient_kernel):
        parameters = inspect.signature(kernel.fn).parameters
        assert not {"mu", "temperature", "ignore_index", "params_ptr"} & {
            name for name, p in parameters.items() if "constexpr" in str(p.annotation)
        }
        assert "params_ptr" in parameters  # mu and T arrive at run time
