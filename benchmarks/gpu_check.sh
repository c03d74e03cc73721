#!/usr/bin/env bash
# The one script to run on a GPU machine (H200, no network): build, GPU tests, benchmarks.
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default benchmarks/results/gpu/)
# Uses the machine's own python3 (torch + triton + nvcc + pytest preinstalled), installs
# nothing, builds elra_fused._C in place for sm_90, writes every log and JSON into OUT_DIR
# and prints a short summary last. Each part has its own time limit; together they stay
# under 8 minutes (build 150 + tests 120 + kernels 45 + step 100 + memory 60 s). The
# first CUDA step of each control config compiles the law (seconds) in each process.
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
run() {  # run NAME LIMIT CMD...: log to $OUT/NAME.log, remember failures, never abort
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc ($((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
}
: >"$OUT/summary.txt"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >"$OUT/machine.txt" 2>&1
run build 150 $PY setup.py build_ext --inplace
run ext_status 30 $PY -c "import elra_fused.ops as o; print(o.cpp_extension_status())"
run gpu_tests 120 $PY -m pytest -q -m cuda python_tests
run bench_kernels 45 $PY benchmarks/bench_kernels.py --device cuda --json "$OUT/kernels_cuda.json"
run bench_step 100 $PY benchmarks/bench_step.py --device cuda --sizes 16M,128M,1024M \
  --repeats 5 --no-install --json "$OUT/step_cuda.json"
run bench_memory 60 $PY benchmarks/bench_memory.py --device cuda --params 50M \
  --json "$OUT/memory_cuda.json"
echo "==== summary ($OUT) ===="
cat "$OUT/machine.txt" "$OUT/summary.txt"
tail -n 15 "$OUT/gpu_tests.log" "$OUT/bench_kernels.log" "$OUT/bench_step.log" \
  "$OUT/bench_memory.log" 2>/dev/null
exit $status
