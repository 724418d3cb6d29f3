#!/usr/bin/env bash
# Every GPU check of the project in one call of at most 9.5 minutes, in order of value, each step under
# its own time limit so that a slow one cannot take the others' time. For a GPU machine lent for a
# short while: run it once, then commit the results it brings back.
#
#     bash bench/gpu_session.sh [OUTPUT_DIR]     # default: $OUT, else bench/results/gpu-session
#
# It writes OUTPUT_DIR/gpu-session.tgz: each step's log and every results file the steps wrote
# (bench/results/kernels-<gpu>.json, generate-gpu-quick.json, quantize-memory-gpu.json and, where the
# others left time, generate-gpu-moe-quick.json, generate-gpu-deepseek-v2-lite-quick.json and
# generate-gpu-qwen3-next-80b-a3b-quick.json). Unpack it in
# the repository root to put the results files in place; the logs land in gpu-session/.
set -u
out=${1:-${OUT:-bench/results/gpu-session}}
logs=gpu-session
mkdir -p "$out" "$logs"
export PYTHONPATH=. PYTHONUNBUFFERED=1
py=${PYTHON:-python3}  # the GPU image's python3 holds torch and triton
started=$(date +%s)

step() {  # step SECONDS NAME COMMAND...: run with a time limit, log to gpu-session/NAME.log
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s, $(($(date +%s) - started))s into the session)"
    timeout --kill-after=10 "$limit" "$@" >"$logs/$name.log" 2>&1
    echo "   exit $? after $(($(date +%s) - started))s; last lines:"
    tail -n 4 "$logs/$name.log" | sed 's/^/   /'
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} >"$logs/device.txt" 2>&1
cat "$logs/device.txt"

step 170 test-gpu "$py" -m pytest -q -m gpu tests/test_quantizer.py tests/test_kernels.py tests/test_models.py \
    tests/test_runtime.py tests/test_speculative.py tests/test_kv_groups.py
step 150 kernels-quick "$py" bench/kernels.py --quick
step 120 generate-7b "$py" bench/generate.py --gpu-7b --quick --gpu-weights lcq-w2r2g128
step 90 quantize-memory "$py" bench/quantize_memory.py --device cuda --layers 1 --epochs 1 --nsamples 16 \
    --finetune-epochs 1
left=$((570 - ($(date +%s) - started)))  # what the steps above left of the call's 10 minutes
if [ "$left" -ge 45 ]; then
    step "$left" generate-moe "$py" bench/generate.py --gpu-moe --quick --moe-layers 8
fi
left=$((570 - ($(date +%s) - started)))
if [ "$left" -ge 45 ]; then
    step "$left" generate-mla "$py" bench/generate.py --gpu-moe --quick --moe-layers 8 --moe-shape deepseek-v2-lite
fi
left=$((570 - ($(date +%s) - started)))
if [ "$left" -ge 45 ]; then
    step "$left" generate-linear "$py" bench/generate.py --gpu-moe --quick --moe-layers 4 --moe-shape qwen3-next-80b-a3b
fi

tar -czf "$out/gpu-session.tgz" "$logs" $(ls bench/results/kernels-*.json bench/results/generate-gpu*.json \
    bench/results/quantize-memory-gpu.json 2>/dev/null)
echo "wrote $out/gpu-session.tgz after $(($(date +%s) - started))s"
