#!/usr/bin/env bash
# Every GPU check of the project in one call of at most 10 minutes, in order of value, each step under
# its own time limit so that a slow one cannot take the others' time. For a GPU machine lent for a
# short while: run it once, then commit the results it brings back.
#
#     bash bench/gpu_session.sh [OUTPUT_DIR] [SECONDS]   # default: $OUT, else bench/results/gpu-session; 580
#
# Order: the CPU path's C kernels built once (the tests import them); the GPU tests of the decode step (its kernels through the model, graphed and eager); a kernel
# boundary with and without dependent launch (bench/dependent_launch.py); the 7B model's W2 rows, its batch-1
# decode and host profiles, then each step waiting for the last one's tokens (async scheduling off) at batch 1 and
# at 8 sequences, with 128-token prompts' products in slabs of W^T, not the whole (its TTFT), with the attention
# kernels' tiles loaded one at a time, with the inputs of products of bytes rounded by a kernel of their own, without
# dependent launch, and with the exact decode products (neither products of bytes nor byte codebooks, timed against
# them on 2026-12-05) at 8 sequences and at batch 1 (--variants
# no-async,no-async-8,slab-dense,attention-unpipelined,prepared-inputs,no-pdl,exact-8,exact, in that order: a variant
# the step's time limit cuts off is lost, the ones before it are saved); the 2-bit products of 1, 2, 4 and 16
# rows in each form (pair table, fp32, bytes; tl.dot, byte codebooks), what of the one-row product's time is a fixed
# cost (bench/product_floor.py), the server's GPU test and the server on the 7B loaded by 1 and 32 streaming clients
# (bench/serve.py; the server's packages from .wheels/gpu-server, `make gpu-wheels`, carried), and with NCU=1 Nsight
# Compute on one launch of each form (bench/profile_one_row.py) where ncu is installed; the other GPU tests (the CUDA cases of the elementwise kernels
# and of the Triton attention with windows, chunks, softcap and sinks among them); the 7B fp16 rows (a 13.5 GB random
# checkpoint written first) and the quick kernel sweep in the time left. The autotuner compiles
# its configs one at a time (~1-2 s each), so every build a benchmark will ask for is compiled first in
# parallel processes (bench/kernels.py --warm); the benchmarks then only time them. The kernel sweeps
# check every product they time against the dequantized weight. GPU tests run in parallel, stopped with
# SIGINT at their time limit so that pytest still prints its summary of failures (and the slowest tests).
#
# ONLY=NAME,NAME... runs those steps alone (each step's name is its log's), e.g. in a second lease the steps the
# first one had no time left for: ONLY=build-native,serve-7b bash bench/gpu_session.sh
#
# SECONDS caps the whole session, whatever the steps do: each step's limit is cut to what is left of it, less the
# 15 s a step stopped with SIGINT has before KILL and the time of the last archive, and a step is skipped when
# less than it needs is left (a step's worst case is its limit plus those 15 s).
#
# With the logs it keeps the autotuner's timings of every config it tried (gpu-session/autotune/), from which a table
# of configs per GPU can be drawn (python bench/autotune_table.py gpu-session/autotune), and the GPU's pre-tuned
# configs that engines then take instead of tuning (--pretuned lcq/kernels/tuned/<gpu>.json; commit it). It writes OUTPUT_DIR/gpu-session.tgz, and writes it again after every step, so that a command killed at the
# machine's limit still brings back what had finished: each step's log and every results file the steps wrote
# (bench/results/generate-gpu-quick-<gpu>.json, dependent-launch-<gpu>.json, kernels-decode-forms-<gpu>.json,
# product-floor-<gpu>.json, serve-gpu-<gpu>.json and,
# in the time left, generate-gpu-quick-fp16-<gpu>.json, kernels-<gpu>.json, quantize-memory-gpu.json and
# generate-gpu-{moe,deepseek-v2-lite,qwen3-next-80b-a3b}-quick-<gpu>.json). Unpack it in the repository root
# to put the results files in place; the logs land in gpu-session/, and each test step's failures in
# gpu-session/NAME-failures.txt as they happen (a step stopped at its limit prints no summary). What changed against
# the committed results of the same GPU: python bench/compare.py <(git show HEAD:bench/results/F.json) bench/results/F.json
set -u
out=${1:-${OUT:-bench/results/gpu-session}}
budget=${2:-580}
grace=15   # a step's SIGINT-to-KILL time
closing=10  # kept for the last archive
logs=gpu-session
mkdir -p "$out" "$logs"
export PYTHONPATH=. PYTHONUNBUFFERED=1
export LCQ_PRETUNED=0  # the session tunes every key afresh: its timings are what a table of pre-tuned configs is made of
py=${PYTHON:-python3}  # the GPU image's python3 holds torch and triton
workers=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
started=$(date +%s)
stamp=$(mktemp)  # the results files written after it are this session's
trap 'rm -f "$stamp"' EXIT

elapsed() { echo $(($(date +%s) - started)); }
left() { echo $((budget - grace - closing - $(elapsed))); }  # the longest limit a step may have now

tuned() {  # the autotuner's timings of every config for each key it tuned this session (Triton's cache_results files,
    # each with its key): the data for a table of configs per GPU, as gpu-session/autotune/<cache entry>-<kernel>.json
    local cache=${TRITON_CACHE_DIR:-${TRITON_HOME:-$HOME}/.triton/cache} file
    mkdir -p "$logs/autotune"
    find "$cache" -name '*.autotune.json' -newer "$stamp" 2>/dev/null | while read -r file; do
        cp "$file" "$logs/autotune/$(basename "$(dirname "$file")")-$(basename "$file")"
    done
}

pack() {  # the archive so far, written aside and then renamed, so that a kill while writing keeps the last one
    tuned
    tar -czf "$out/gpu-session.tgz.part" "$logs" \
        $(find bench/results -maxdepth 1 -name '*.json' -newer "$stamp" 2>/dev/null | sort) &&
        mv -f "$out/gpu-session.tgz.part" "$out/gpu-session.tgz"
    echo "   wrote $out/gpu-session.tgz after $(elapsed)s"
}

step() {  # step LIMIT LEAST NAME COMMAND...: run for at most LIMIT s (SIGINT, then KILL), less if less is left,
    local limit=$1 least=$2 name=$3 now  # none if under LEAST s is left; log to gpu-session/NAME.log
    shift 3
    if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then
        return 0
    fi
    now=$(left)
    if [ "$now" -lt "$least" ]; then
        echo "== $name skipped: ${now}s left, it needs ${least}s ($(elapsed)s into the session)"
        return 0
    fi
    [ "$limit" -gt "$now" ] && limit=$now
    echo "== $name (limit ${limit}s, $(elapsed)s into the session)"
    LCQ_TEST_FAILURES="$logs/$name-failures.txt" timeout -s INT --kill-after=$grace "$limit" "$@" >"$logs/$name.log" 2>&1
    echo "   exit $? after $(elapsed)s; last lines:"
    tail -n 4 "$logs/$name.log" | sed 's/^/   /'
    pack
}

{ timeout --kill-after=5 10 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  timeout --kill-after=5 30 "$py" -m lcq.cli env  # versions (torch, triton), the GPU, its pre-tuned configs
} >"$logs/device.txt" 2>&1
cat "$logs/device.txt"
slug=$(sed -n 2p "$logs/device.txt" | cut -d, -f1 | tr 'A-Z' 'a-z' | sed 's/[^a-z0-9]\+/-/g; s/^-//; s/-$//')
slug=${slug:-gpu}
pack
# The C kernels of the CPU path, which importing the tests builds: built once here (~30 s on the H100's machine), or
# each parallel test process builds them at once (there that took the first test step's 90 s before any test ran)
step 60 20 build-native "$py" -c "from lcq.kernels import native; print(native.load())"

step 60 20 warm-generate "$py" bench/kernels.py --warm "$workers" --warm-only --bits 2 --ranks 2 --groups 128 \
    --ms 1,2,4,8,16,32,48,64
# First the GPU tests that run the decode step as the engine does (the layers' kernels, graphed and eager, against
# transformers, and the byte forms' compiled tests, whose results decide where those forms serve by default): the
# numbers after them are only worth what these say. On the H100 (2026-12-05) the 69 of them took ~210 s.
check="dependent_launch or layers_dispatch or cuda_graphs or cuda_model_follows or compiled_pair_table"
check+=" or paged_attention_on_cuda or compiled_products_of_bytes or compiled_byte_codebooks or fp8 or launched_ahead"
check+=" or compiled_ahead or gated_products or rotary_and_cache_write or residual_stream"
gpu_tests=(tests/test_elementwise.py tests/test_kernels.py tests/test_models.py tests/test_runtime.py
           tests/test_quantizer.py tests/test_speculative.py tests/test_kv_groups.py tests/test_attention_window.py)
step 240 60 test-gpu-decode "$py" -m pytest -q -n "$workers" --tb=short -rfE -p no:cacheprovider -m gpu -k "$check" \
    "${gpu_tests[@]}"
step 30 15 dependent-launch "$py" bench/dependent_launch.py
step 240 60 generate-7b "$py" bench/generate.py --gpu-7b --quick --gpu-weights lcq-w2r2g128 \
    --variants no-async,no-async-8,unfused-steps,slab-dense,attention-unpipelined,prepared-inputs,no-pdl,exact-8,exact
forms=(--bits 2 --ms 1,2,4,16 --ranks 2 --groups 128 --shapes 4096x4096,4096x11008,11008x4096)
step 45 20 warm-decode-forms "$py" bench/kernels.py --warm "$workers" --warm-only "${forms[@]}"
step 100 30 kernels-decode-forms "$py" bench/kernels.py "${forms[@]}" --out "bench/results/kernels-decode-forms-$slug.json"
# What of a one-row product's time is a fixed cost: the single-replay timing against an empty kernel, a plain read
# of its bytes, the L2 flushed by writing and by reading, and the product in a chain of products (the same builds)
step 60 25 product-floor "$py" bench/product_floor.py
# The server on the GPU end to end (HTTP, the async engine, CUDA graphs, SSE), which no other step runs: its GPU test
# (a tiny model served as its engine generates), then the 7B W2 model written afresh with a tokenizer of its
# vocabulary, served by `lcq serve`, loaded by one streaming client (the batch-1 speed a user sees, beside
# generate-7b's) and then by 32 (bench/serve.py). The GPU image lacks the server's packages: `make gpu-wheels` on the
# machine that starts the session, and carry .wheels/gpu-server; their wheels are unpacked into a folder of their own,
# on PYTHONPATH for these steps only.
packages=/tmp/lcq-server-packages
served=/tmp/lcq-serve-llama2-7b-w2r2g128
unpack="import glob, sys, zipfile
for wheel in glob.glob('.wheels/gpu-server/*.whl'): zipfile.ZipFile(wheel).extractall(sys.argv[1])"
if [ -d .wheels/gpu-server ]; then
    step 90 40 test-server-gpu bash -c '"$1" -c "$2" "$3" && PYTHONPATH=".:$3" "$1" -m pytest -q --tb=short -rfE \
        -p no:cacheprovider -m gpu tests/test_server.py' test-server-gpu "$py" "$unpack" "$packages"
    step 180 100 serve-7b bash -c '"$1" -c "$2" "$3" && "$1" bench/random_model.py "$4" &&
        PYTHONPATH=".:$3" "$1" bench/serve.py --launch "$4" --clients 1 32 --duration 20 --grace 20 --idle-timeout 20' \
        serve-7b "$py" "$unpack" "$packages" "$served"
    pkill -f "lcq.cli serve $served"  # one that outlived a KILL would hold the GPU's memory in the steps after
else
    echo "== test-server-gpu and serve-7b skipped: no .wheels/gpu-server (make gpu-wheels, and carry it)"
fi
if [ "${NCU:-0}" = 1 ] && command -v ncu >/dev/null; then  # where a one-row tile waits: one launch of each form
    for form in "" --lut; do
        step 40 20 "ncu-one-row${form}" ncu --profile-from-start off --section SpeedOfLight --section Occupancy \
            --section WarpStateStats --section SchedulerStats "$py" bench/profile_one_row.py --rank 1 $form
    done
fi
step 240 30 test-gpu "$py" -m pytest -q -n "$workers" --tb=short -rfE --durations=15 -p no:cacheprovider \
    -m gpu -k "not ($check)" "${gpu_tests[@]}"
step "$budget" 100 generate-7b-fp16 "$py" bench/generate.py --gpu-7b --quick --gpu-weights fp16 \
    --out "bench/results/generate-gpu-quick-fp16-$slug.json"
if [ "$(left)" -ge 150 ]; then  # the kernel sweep, its builds compiled first
    step 60 30 warm-kernels "$py" bench/kernels.py --quick --warm "$workers" --warm-only
    step "$budget" 60 kernels-quick "$py" bench/kernels.py --quick
fi
# How long and how much memory `lcq quantize` takes on the GPU for a 7B (2 of its 32 blocks, the tool's defaults:
# W2 r2 g64, 128 windows of 512 tokens, 10 epochs), never yet measured there, with its tuning products in TF32 (the
# default on a GPU), then in fp32 (--no-tf32) (ONLY=quantize-7b in a lease of its own)
step 300 90 quantize-7b bash -c '"$1" bench/quantize_memory.py --device cuda && "$1" bench/quantize_memory.py --device cuda --no-tf32' \
    quantize-7b "$py"
# The mixtures, never yet run on a GPU: Qwen3-30B-A3B's shapes (12 of its layers), then DeepSeek-V2-Lite's (latent
# attention, shared experts) and Qwen3-Next's (linear attention) (ONLY=generate-moe in a lease of its own)
step 300 120 generate-moe bash -c 'for shape in qwen3-30b-a3b deepseek-v2-lite qwen3-next-80b-a3b; do
    "$1" bench/generate.py --gpu-moe --quick --moe-shape "$shape"; done' generate-moe "$py"
echo "done after $(elapsed)s"
