#!/usr/bin/env bash
# Every GPU check of akl-kernels in one run on one GPU (sized for an H200 in under 8 minutes),
# with nothing fetched from the network. Run from anywhere; logs and results go to $OUT
# (default benchmarks/results/device/), and a short table is printed last.
#
#   1. the test suite on CUDA tensors: the Triton kernels compiled for real, not interpreted
#      (train_example.py's end-to-end tests are left to CI, to stay within the time);
#   2. akl_loss on 16800 x 128256 > 2^31 bf16 logits against the reference on sampled rows;
#   3. the GPU benchmark matrix (copy bandwidth, every contender, time and memory; first the
#      fused-linear case, 8192 x 4096 x 128256 bf16 hidden states against materialised logits),
#      written to $OUT/cuda.json and rendered to $OUT/cuda.md and $OUT/cuda.png.
#
# Liger-Kernel is optional: to include it, download its wheel beside the repository first
# (it is pure Python; its requirements, torch and triton, are already on the GPU machine):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5
# and carry `.whl` with the run. Stage time limits keep the whole run inside 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/device}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/akl-site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/akl-site"
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"; } | tee "$OUT/environment.txt"

start=$SECONDS
timeout 170 env AKL_TEST_DEVICE=cuda python3 -m pytest tests -q -p no:cacheprovider \
    --ignore tests/test_train_example.py 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
tests_s=$((SECONDS - start))

start=$SECONDS
timeout 70 python3 -m benchmarks.large_check 2>&1 | tee "$OUT/large_check.log"
large_rc=${PIPESTATUS[0]}
large_s=$((SECONDS - start))

start=$SECONDS
timeout 230 python3 -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider --benchmark-columns=median,rounds \
    --akl-results "$OUT/cuda.json" --akl-time-budget 170 2>&1 | tee "$OUT/benchmarks.log"
bench_rc=${PIPESTATUS[0]}
bench_s=$((SECONDS - start))

echo
echo "== akl-kernels device check: $(head -1 "$OUT/environment.txt") =="
printf '%-34s %-8s %6s  %s\n' stage rc seconds summary
printf '%-34s %-8s %6s  %s\n' "tests on CUDA" "$tests_rc" "$tests_s" "$(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -1)"
printf '%-34s %-8s %6s  %s\n' "> 2^31 elements, bf16" "$large_rc" "$large_s" "$(tail -1 "$OUT/large_check.log" | cut -c1-90)"
printf '%-34s %-8s %6s  %s\n' "benchmark matrix" "$bench_rc" "$bench_s" "$(grep -E '(passed|failed|error)' "$OUT/benchmarks.log" | tail -1)"
if [ -f "$OUT/cuda.md" ]; then
    echo
    grep -E '^(SPEC|- (bfloat16|float32))' "$OUT/cuda.md"
fi
[ "$tests_rc" = 0 ] && [ "$large_rc" = 0 ] && [ "$bench_rc" = 0 ]
