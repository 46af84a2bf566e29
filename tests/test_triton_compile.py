"""Ahead-of-time compilation of the Triton kernel for real GPUs, on a machine without one.

CI has no GPU, and the other tests run the kernels in Triton's interpreter, which never runs
the compiler. Here every kernel variant is compiled to a cubin for Hopper (sm_90) and Ampere
(sm_80) in a subprocess without TRITON_INTERPRET (tests/aot_compile.py), and the resource
usage that triton's bundled cuobjdump reports is checked: every variant compiles, and the 16-
and 32-bit ones use no local memory (no register spills).
"""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from akl_kernels.triton_backend import _distill_rows_kernel  # noqa: E402
from tests.aot_compile import VARIANTS, variant_id  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "tests.aot_compile"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("capability,variant", VARIANTS, ids=[variant_id(c, v) for c, v in VARIANTS])
def test_kernel_compiles_without_spills(compiled, capability, variant):
    usage = compiled[variant_id(capability, variant)]
    assert usage["target"].startswith(f".target sm_{capability}")  # sm_90a on Hopper
    assert usage["registers"] > 0
    student, teacher = variant[:2]
    if "fp64" not in (student, teacher):
        assert usage["local"] == 0, f"register spills: {usage}"


def test_runtime_scalars_are_not_compile_time_constants():
    # mu, temperature and ignore_index must not trigger recompilation: none is a constexpr.
    parameters = inspect.signature(_distill_rows_kernel.fn).parameters.values()
    constexprs = {p.name for p in parameters if "constexpr" in str(p.annotation)}
    assert constexprs == {"MODE", "SPLIT", "HAS_KEEP", "COMPUTE_GRAD", "COMPUTE_DTYPE", "BLOCK", "TOPK", "NUM_CANDIDATES"}
