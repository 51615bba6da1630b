#!/usr/bin/env bash
# Every GPU check of the project in one run, for a CUDA box with torch, triton and transformers
# but no vLLM: the CUDA kernel tests (compiled Triton at real shapes, CUDA-graph replay, the op
# in a compiled 8B-width decoder stack, sync-free table writes), then the kernel benchmark with
# its decode-step proxy.
#
#   bash bench/gpu_session.sh [RESULTS_DIR]     (default: $OUT if set, else bench/results)
#
# Writes gpu-env.txt, gpu-tests.log, gpu-bench.log and gpu-<device>.json/.md into RESULTS_DIR;
# exits non-zero if a test failed (the benchmark still runs).
set -uo pipefail
cd "$(dirname "$0")/.."
results="${1:-${OUT:-bench/results}}"
mkdir -p "$results"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$results/gpu-env.txt"

python3 -m pytest -q -p no:cacheprovider -m gpu -o addopts="-ra" \
    tests/test_kernels_gpu.py tests/test_compiled_stack.py tests/test_staging_gpu.py 2>&1 | tee "$results/gpu-tests.log"
tests_status=${PIPESTATUS[0]}

device=$(python3 -c "import torch; from bench.kernels import device_slug; \
print(device_slug(torch.cuda.get_device_name()))")
python3 -m bench kernels --out "$results/gpu-$device.json" 2>&1 | tee "$results/gpu-bench.log"
bench_status=${PIPESTATUS[0]}

echo "tests exit $tests_status, benchmark exit $bench_status"
exit $((tests_status || bench_status))
