"""Compile the Triton kernel's variants for real GPUs and report what the compiled code does.

Run as ``python -m tests.aot_compile`` (TRITON_INTERPRET must be unset: the interpreter replaces
the compiler). Prints one JSON object mapping each variant's id to its target's PTX header line,
the registers, stack, shared and local (spill) bytes that triton's bundled cuobjdump reports for
the cubin, and the global loads and stores of its SASS by width. tests/test_triton_compile.py
runs it in a subprocess and checks the numbers; `--sass DIR` also writes each variant's SASS.

Arguments are specialised as a launch on aligned tensors would be: every pointer 16-byte
aligned and the vocabulary size a multiple of 16 (128256), so that row starts are known to
allow 16-byte loads.
"""

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from akl_kernels._rows import TOPK
from akl_kernels.divergences import BY_MODE, LossMode
from akl_kernels.triton_sparse import _sparse_gradient_kernel, _unlisted_logsumexp_kernel
from akl_kernels.triton_backend import (
    CAPACITY,
    LOSS_ROWS,
    MAX_REGISTERS,
    NUM_CANDIDATES,
    SCAN_BLOCK,
    _gap_kernel,
    _gradient_kernel,
    _loss_kernel,
    _row_statistics_kernel,
    _split_kernel,
    _terms_kernel,
    block_size,
    num_warps,
    search_block_size,
)

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
LARGE_VOCAB = 128256
ELEMENTS_PER_16_BYTES = {"fp16": 8, "bf16": 8, "fp32": 4, "fp64": 2}

# (student dtype, teacher dtype, mode, split, compute_grad, has_keep)
HOPPER_VARIANTS = [
    (dtype, dtype, mode, mode == LossMode.AKL, True, True)
    for dtype in ("fp16", "bf16", "fp32")
    for mode in LossMode
] + [
    ("bf16", "bf16", LossMode.AKL, True, True, False),  # no labels
    ("fp32", "fp32", LossMode.FKL, False, True, False),  # no labels, FKL
    ("fp32", "fp32", LossMode.FKL, True, True, True),  # fkl_loss with return_stats
    ("fp32", "bf16", LossMode.AKL, True, True, True),  # bf16 teacher beside an fp32 student
    ("bf16", "bf16", LossMode.AKL, True, False, True),  # evaluation, or forward of akl_loss: no gradient
    ("fp64", "fp64", LossMode.AKL, True, True, True),
]
AMPERE_VARIANTS = [
    ("bf16", "bf16", LossMode.AKL, True, True, True),
    ("bf16", "bf16", LossMode.AKL, True, True, False),
    ("fp32", "fp32", LossMode.AKL, True, True, True),
    ("fp16", "fp16", LossMode.FKL, False, True, True),
    ("bf16", "bf16", LossMode.RKL, False, True, True),
    ("bf16", "bf16", LossMode.JSD, False, True, True),
]
VARIANTS = [(90, v) for v in HOPPER_VARIANTS] + [(80, v) for v in AMPERE_VARIANTS]


def compile_kernels(student, teacher, mode, split, compute_grad, has_keep, capability):
    """{kernel name: compiled kernel} for the kernels of one variant (split and gap kernels only
    when split, the terms kernel only for a divergence made of terms, the gradient kernel only
    with compute_grad)."""
    compute = "fp64" if "fp64" in (student, teacher) else "fp32"
    block = block_size(LARGE_VOCAB)
    rows = {
        "student_ptr": f"*{student}",
        "teacher_ptr": f"*{teacher}",
        "student_row_offsets_ptr": "*i64",
        "teacher_row_offsets_ptr": "*i64",
        "keep_ptr": "*i1",
    }
    common = {
        "HAS_KEEP": has_keep,
        "COMPUTE_DTYPE": tl.float64 if compute == "fp64" else tl.float32,
        "STUDENT_ALIGN": ELEMENTS_PER_16_BYTES[student],
        "TEACHER_ALIGN": ELEMENTS_PER_16_BYTES[teacher],
    }
    record = {"params_ptr": f"*{compute}", "row_values_ptr": f"*{compute}", "row_codes_ptr": "*i32"}
    streaming = num_warps(block)
    kernels = [(
        _row_statistics_kernel,
        {**rows, **record, "row_top_ptr": f"*{compute}", "n_rows": "i32", "V": "i32"},
        {**common, "SPLIT": split, "BLOCK": block, "TOPK": TOPK},
        streaming,
    )]
    if split:
        kernels.append((
            _split_kernel,
            {**rows, **record, "row_top_ptr": f"*{compute}", "n_rows": "i32", "V": "i32"},
            {**common, "SEARCH_BLOCK": search_block_size(block), "TOPK": TOPK, "NUM_CANDIDATES": NUM_CANDIDATES,
             "CAPACITY": CAPACITY},
            streaming,
        ))
        for bracket in (False, True):
            kernels.append((
                _gap_kernel,
                {**rows, **record, "buffer_ptr": f"*{compute}", "n_rows": "i32", "V": "i32"},
                {**common, "BRACKET": bracket, "BLOCK": block, "SCAN_BLOCK": SCAN_BLOCK, "CAPACITY": CAPACITY},
                streaming,
            ))
    if BY_MODE[mode].has_terms:
        kernels.append((
            _terms_kernel,
            {**rows, **record, "n_rows": "i32", "V": "i32"},
            {**common, "MODE": int(mode), "BLOCK": block},
            streaming,
        ))
    kernels.append((
        _loss_kernel,
        {"keep_ptr": "*i1", "row_values_ptr": f"*{compute}", "row_codes_ptr": "*i32", "loss_ptr": f"*{compute}",
         "stats_ptr": f"*{compute}", "head_size_ptr": "*i64", "split_path_ptr": "*i32", "n_rows": "i32"},
        {"MODE": int(mode), "SPLIT": split, "HAS_KEEP": has_keep, "COMPUTE_DTYPE": common["COMPUTE_DTYPE"],
         "BLOCK": LOSS_ROWS},
        4,  # triton's default
    ))
    if compute_grad:
        kernels.append((
            _gradient_kernel,
            {**rows, "grad_ptr": f"*{student}", "params_ptr": f"*{compute}", "row_values_ptr": f"*{compute}",
             "row_scale_ptr": f"*{compute}", "row_scale_stride": "i32", "n_rows": "i32", "V": "i32"},
            {**common, "MODE": int(mode), "BLOCK": block},
            streaming,
        ))
    return _compile_all(kernels, capability)


# The stored-teacher kernels (akl_kernels/triton_sparse.py): (student dtype, has_keep); K = 32.
SPARSE_VARIANTS = [(90, ("bf16", True)), (90, ("fp32", True)), (90, ("bf16", False)), (80, ("bf16", True))]


def compile_sparse_kernels(student, has_keep, capability):
    """{kernel name: compiled kernel} for the two passes over the student of a stored teacher."""
    block = block_size(LARGE_VOCAB)
    common = {"HAS_KEEP": has_keep, "COMPUTE_DTYPE": tl.float32, "STUDENT_ALIGN": ELEMENTS_PER_16_BYTES[student],
              "BLOCK": block, "K_BLOCK": 32}
    rows = {"student_ptr": f"*{student}", "student_row_offsets_ptr": "*i64", "keep_ptr": "*i1", "indices_ptr": "*i64"}
    sizes = {"n_rows": "i32", "V": "i32", "K": "i32"}
    kernels = [
        (_unlisted_logsumexp_kernel, {**rows, "out_ptr": "*fp32", "max_ptr": "*fp32", "c": "fp32", **sizes}, common,
         num_warps(block)),
        (_sparse_gradient_kernel, {**rows, "listed_grad_ptr": "*fp32", "shift_ptr": "*fp32", "lse_ptr": "*fp32", "unlisted_factor_ptr": "*fp32",
                                   "grad_ptr": f"*{student}", "inv_t": "fp32", **sizes}, common, num_warps(block)),
    ]
    return _compile_all(kernels, capability)


def _compile_all(kernels, capability):
    """{name: compiled} for (kernel, signature, constants, num_warps) tuples."""
    compiled = {}
    for kernel, signature, constants, warps in kernels:
        names = list(signature)
        # What a launch on 16-byte aligned tensors with V % 16 == 0 specialises: pointers and V.
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if name.endswith("_ptr") or name == "V"}
        signature = {**signature, **{name: "constexpr" for name in constants}}
        source = ASTSource(kernel, signature, constants, attrs)
        name = kernel.__name__ + ("_bracket" if constants.get("BRACKET") else "")
        compiled[name] = triton.compile(
            source, target=GPUTarget("cuda", capability, 32), options={"num_warps": warps, "maxnreg": MAX_REGISTERS}
        )
    return compiled


def variant_id(capability, variant):
    if len(variant) == 2:  # a stored-teacher variant
        student, has_keep = variant
        return f"sm{capability}-sparse-{student}-keep{int(has_keep)}"
    student, teacher, mode, split, compute_grad, has_keep = variant
    return (f"sm{capability}-{student}-{teacher}-{LossMode(mode).name}-split{int(split)}-grad{int(compute_grad)}"
            f"-keep{int(has_keep)}")


def memory_instructions(sass: str) -> dict:
    """Global loads and stores of a SASS listing by opcode (LDG.E.128 is a 16-byte load), and its
    local-memory loads and stores (LDL, STL: register spills)."""
    opcodes = re.findall(r"\b((?:LDG|STG)\.E[.A-Z0-9]*|LDL|STL)\b", sass)
    return dict(sorted(collections.Counter(opcodes).items()))


def compile_and_measure(capability, variant, sass_dir=None):
    """{kernel name: target, resources and memory instructions} of one variant."""
    report = {}
    compile_variant = compile_sparse_kernels if len(variant) == 2 else compile_kernels
    for name, kernel in compile_variant(*variant, capability).items():
        target = next(line for line in kernel.asm["ptx"].splitlines() if line.startswith(".target"))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(kernel.asm["cubin"])
            usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True, check=True)
            sass = subprocess.run([CUOBJDUMP, "-sass", path], capture_output=True, text=True, check=True).stdout
        match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage.stdout)
        if not match:
            raise RuntimeError(f"no resource usage in cuobjdump output:\n{usage.stdout}{usage.stderr}")
        if sass_dir:
            with open(os.path.join(sass_dir, f"{variant_id(capability, variant)}{name}.sass"), "w") as f:
                f.write(sass)
        resources = dict(zip(("registers", "stack", "shared", "local"), map(int, match.groups())))
        report[name] = {"target": target.strip(), **resources, "memory": memory_instructions(sass)}
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sass", default=None, help="directory to write each variant's SASS to")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    if args.sass:
        os.makedirs(args.sass, exist_ok=True)
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = {variant_id(c, v): pool.submit(compile_and_measure, c, v, args.sass)
                   for c, v in VARIANTS + SPARSE_VARIANTS}
        print(json.dumps({name: future.result() for name, future in futures.items()}))


if __name__ == "__main__":
    main()
