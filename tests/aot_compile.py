"""Compile the Triton kernel's variants for real GPUs and report their resource usage.

Run as ``python -m tests.aot_compile`` (TRITON_INTERPRET must be unset: the interpreter replaces
the compiler). Prints one JSON object mapping each variant's id to its target's PTX header line
and the registers, stack, shared and local (spill) bytes that triton's bundled cuobjdump reports
for the cubin. tests/test_triton_compile.py runs it in a subprocess and checks the numbers.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from akl_kernels._rows import TOPK, LossMode
from akl_kernels.triton_backend import NUM_CANDIDATES, _distill_rows_kernel, block_size, num_warps

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
LARGE_VOCAB = 128256

# (student dtype, teacher dtype, mode, split, compute_grad)
HOPPER_VARIANTS = [
    (dtype, dtype, mode, mode == LossMode.AKL, True)
    for dtype in ("fp16", "bf16", "fp32")
    for mode in LossMode
] + [
    ("fp32", "fp32", LossMode.FKL, True, True),  # fkl_loss with return_stats
    ("fp32", "bf16", LossMode.AKL, True, True),  # bf16 teacher beside an fp32 student
    ("bf16", "bf16", LossMode.AKL, True, False),  # evaluation: no gradient
    ("fp64", "fp64", LossMode.AKL, True, True),
]
AMPERE_VARIANTS = [
    ("bf16", "bf16", LossMode.AKL, True, True),
    ("fp32", "fp32", LossMode.AKL, True, True),
    ("fp16", "fp16", LossMode.FKL, False, True),
    ("bf16", "bf16", LossMode.RKL, False, True),
]


def compile_kernel(student, teacher, mode, split, compute_grad, capability):
    compute = "fp64" if "fp64" in (student, teacher) else "fp32"
    block = block_size(LARGE_VOCAB, torch.float64 if compute == "fp64" else torch.float32)
    signature = {
        "student_ptr": f"*{student}",
        "teacher_ptr": f"*{teacher}",
        "student_row_offsets_ptr": "*i64",
        "teacher_row_offsets_ptr": "*i64",
        "keep_ptr": "*i1",
        "grad_ptr": f"*{student}",
        "params_ptr": f"*{compute}",
        "loss_ptr": f"*{compute}",
        "stats_ptr": f"*{compute}",
        "head_size_ptr": "*i64",
        "n_rows": "i32",
        "V": "i32",
    }
    constants = {
        "MODE": int(mode),
        "SPLIT": split,
        "HAS_KEEP": True,
        "COMPUTE_GRAD": compute_grad,
        "COMPUTE_DTYPE": tl.float64 if compute == "fp64" else tl.float32,
        "BLOCK": block,
        "TOPK": TOPK,
        "NUM_CANDIDATES": NUM_CANDIDATES,
    }
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(_distill_rows_kernel, signature, constants)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps(block)})


VARIANTS = [(90, v) for v in HOPPER_VARIANTS] + [(80, v) for v in AMPERE_VARIANTS]


def variant_id(capability, variant):
    student, teacher, mode, split, compute_grad = variant
    return f"sm{capability}-{student}-{teacher}-{LossMode(mode).name}-split{int(split)}-grad{int(compute_grad)}"


def compile_and_measure(capability, variant):
    kernel = compile_kernel(*variant, capability)
    target = next(line for line in kernel.asm["ptx"].splitlines() if line.startswith(".target"))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True, check=True)
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out.stdout)
    if not match:
        raise RuntimeError(f"no resource usage in cuobjdump output:\n{out.stdout}{out.stderr}")
    usage = dict(zip(("registers", "stack", "shared", "local"), map(int, match.groups())))
    return {"target": target.strip(), **usage}


def main():
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = {variant_id(c, v): pool.submit(compile_and_measure, c, v) for c, v in VARIANTS}
        print(json.dumps({name: future.result() for name, future in futures.items()}))


if __name__ == "__main__":
    main()
