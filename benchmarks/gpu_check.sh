#!/usr/bin/env bash
# The one script to run on a GPU machine (H200, no network): build, GPU tests, benchmarks.
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default benchmarks/results/gpu/)
# Uses the machine's own python3 (torch + triton + nvcc + pytest preinstalled), installs
# nothing, builds elra_fused._C in place for sm_90, writes every log and JSON into OUT_DIR
# and prints a short summary last. Each part has its own time limit (prereqs 15 + build
# 100 + extension 20 + tests 150 + report 10 + kernels 40 + step 65 + step on the
# ~200-tensor blocks model 45 + memory 35 = 480 s, at most 8 minutes; the most valuable
# parts first: build, GPU tests, then figures; ~720 CUDA tests, ~430 of which took 51 s
# on the first H200 run, before the multi-tensor list tests and their Triton compiles). The first CUDA step of each control
# config compiles the law (seconds) in each process.
# Fails loudly (non-zero exit, FAILED lines in the summary) unless the CUDA kernels were
# really tested: missing prerequisites (numpy, ninja, pytest, triton, torch with CUDA, a
# GPU, nvcc of torch's CUDA major version; ELRA_SKIP_CUDA_BUILD set) stop it before the
# build; _C without its CUDA kernels, or any CUDA test failed or skipped, fails it
# (benchmarks/gpu_preflight.py; ELRA_REQUIRE_CUDA=1 turns a missing CUDA backend in the
# tests into a failure).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$NVCC")")}
export MAX_JOBS=${MAX_JOBS:-16}
status=0
failed=""
run() {  # run NAME LIMIT CMD...: log to $OUT/NAME.log, remember failures, never abort
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc ($((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt"
  if [ $rc -ne 0 ]; then
    status=1
    failed="$failed $name"
  fi
  return $rc
}
: >"$OUT/summary.txt"
rm -f "$OUT/gpu_tests.xml"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >"$OUT/machine.txt" 2>&1
if ! run prereqs 15 $PY benchmarks/gpu_preflight.py prereqs; then
  cat "$OUT/prereqs.log"
  echo "gpu_check: FAILED: prerequisites missing (above); nothing was built or run" |
    tee -a "$OUT/summary.txt"
  exit 2
fi
run build 100 $PY setup.py build_ext --inplace
run extension 20 $PY benchmarks/gpu_preflight.py extension
export ELRA_REQUIRE_CUDA=1
run gpu_tests 150 $PY -m pytest -q -rfEs -m cuda python_tests --junitxml="$OUT/gpu_tests.xml"
run gpu_tests_report 10 $PY benchmarks/gpu_preflight.py tests "$OUT/gpu_tests.xml"
run bench_kernels 40 $PY benchmarks/bench_kernels.py --device cuda --json "$OUT/kernels_cuda.json"
run bench_step 65 $PY benchmarks/bench_step.py --device cuda --sizes 16M,128M,1024M \
  --repeats 5 --no-install --one-at-a-time 1024M --json "$OUT/step_cuda.json"
run bench_step_blocks 45 $PY benchmarks/bench_step.py --device cuda --models blocks \
  --sizes 16M,128M --repeats 5 --no-install --json "$OUT/step_blocks_cuda.json"
run bench_memory 35 $PY benchmarks/bench_memory.py --device cuda --params 50M \
  --json "$OUT/memory_cuda.json"
echo "==== summary ($OUT) ===="
cat "$OUT/machine.txt" "$OUT/summary.txt"
tail -n 15 "$OUT/gpu_tests.log" "$OUT/bench_kernels.log" "$OUT/bench_step.log" \
  "$OUT/bench_step_blocks.log" "$OUT/bench_memory.log" 2>/dev/null
if [ $status -ne 0 ]; then
  echo "==== gpu_check: FAILED:$failed ===="
  grep -h -E "^(MISSING|MISMATCH|FAILED)" "$OUT/extension.log" "$OUT/gpu_tests_report.log" \
    2>/dev/null | head -n 40
else
  echo "==== gpu_check: ok (CUDA kernels compiled, every CUDA test ran and passed) ===="
fi
exit $status
