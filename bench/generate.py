"""Generation speed: our engine against transformers' generate (and llama.cpp when installed).

CPU (default): SmolLM2-135M-Instruct, our engine on the LCQ demo checkpoint (default products, and
bf16 ones where the CPU has AVX512_BF16: lcq-bf16, which on CPUs with AVX512_VNNI is what int8 adds to;
lcq-lora: every request with a random rank-16 LoRA adapter over all linear layers; lcq-h4: the demo's
settings with lm_head packed at 4 bits too; lcq-kv8: the opt-in int8 KV cache, --kv-cache-dtype int8;
lcq-invariant and lcq-fp32-products, only where --engines names them: --batch-invariant, --cpu-matmul-dtype
float32) and on full precision, transformers on
full precision, llama.cpp on the original Q4_1 GGUF. Measures batch-1 decode
tokens/s, time to first token, and throughput for 64 requests of mixed prompt and output lengths.

CPU (--curve): our engine on the LCQ demo checkpoint, the throughput curve over 1..64 concurrent
sequences (128-token prompts, 128 tokens out each), where decode steps of a few sequences take other
kernels than one sequence or many (docs/kernels.md).

GPU (--gpu-7b): a random-weight model with Llama-2-7B shapes at W2 r2 g128 and fp16: batch-1
tokens/s and the throughput curve over 1..256 concurrent sequences, with peak memory split into
weights, KV cache and activations.

GPU (--gpu-moe): a random-weight mixture with Qwen3-30B-A3B's layer shapes (128 experts, 8 a token;
or --moe-shape deepseek-v2-lite: latent attention, 64 experts, 6 a token beside 2 shared; or
qwen3-next-80b-a3b: linear attention in three layers of four, 512 experts, 10 a token) at W2 r2
g128, --moe-layers of its layers: the same curve with decode in CUDA graphs (lcq) and eagerly
(lcq-eager), which is what routing the experts on the device buys.

    python bench/generate.py                 # CPU study, writes bench/results/generate-cpu.json
    python bench/generate.py --rounds 3      # every engine three times, in alternating order: medians
    python bench/generate.py --quick         # fewer tokens and requests (a smoke run)
    python bench/generate.py --curve         # CPU curve, writes bench/results/generate-cpu-curve.json
    python bench/generate.py --gpu-7b        # on a CUDA machine, writes bench/results/generate-gpu-<gpu>.json
    python bench/generate.py --gpu-moe --quick
    python bench/generate.py --gpu-moe --quick --moe-shape deepseek-v2-lite
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lcq.runtime import LLM, SamplingParams  # noqa: E402
from bench.random_model import SHAPES  # noqa: E402

# --gpu-moe --moe-shape
MOE_SHAPES = {name: SHAPES[name] for name in ("qwen3-30b-a3b", "deepseek-v2-lite", "qwen3-next-80b-a3b")}


def rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def mixed_workload(count: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) pairs: prompts 16-256 tokens, outputs 16-128 tokens."""
    rng = random.Random(seed)
    return [([rng.randrange(100, vocab - 100) for _ in range(rng.randint(16, 256))], rng.randint(16, 128))
            for _ in range(count)]


def random_adapter(model_dir: str, rank: int) -> str:
    """A random PEFT LoRA folder of `rank` over all seven linear layers of every decoder layer (cached)."""
    from lcq.paths import cache_dir
    from tests.tiny_model import make_tiny_adapter

    folder = cache_dir() / "bench-adapters" / f"{Path(model_dir).name}-r{rank}"
    if not (folder / "adapter_config.json").is_file():
        make_tiny_adapter(folder, model_dir, rank=rank, alpha=2.0 * rank, targets=LORA_ALL_LINEARS)
    return str(folder)


LORA_ALL_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LORA_RANK = 16


def bench_ours(folder: str, weights: str, variant: str, batch1_tokens: int, workload, lora: bool = False,
               **engine) -> list[dict]:
    """lora: every request runs with a random rank-16 adapter over all linear layers (LoRA steps take
    the Python layers: no one-call CPU decode step)."""
    if lora:
        engine["lora_modules"] = f"bench={random_adapter(folder, LORA_RANK)}"
    llm = LLM(folder, **engine)

    def greedy(max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, lora="bench" if lora else None)

    prompt = workload[0][0][:32]
    llm.generate([prompt], greedy(8))  # warm-up
    start = time.perf_counter()
    ttft_out = llm.generate([workload[1][0][:128]], greedy(1))
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    out = llm.generate([prompt], greedy(batch1_tokens))
    elapsed = time.perf_counter() - start
    batch1 = len(out[0].token_ids) / elapsed
    params = [greedy(n) for _, n in workload]
    start = time.perf_counter()
    outs = llm.generate([p for p, _ in workload], params)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.token_ids) for o in outs)
    assert ttft_out[0].token_ids
    device = llm.engine.runner.device
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else rss_gb()
    common = dict(model=Path(folder).name, weights=weights, engine="lcq", variant=variant, peak_mem_GB=round(peak, 3),
                  products=str(llm.engine.runner.products).removeprefix("torch."),
                  kv_cache=str(llm.engine.config.resolved_kv_cache_dtype()).removeprefix("torch."),
                  int8_weights_MB=round(llm.engine.runner.int8_weight_bytes / 2**20, 1))
    return [dict(common, concurrency=1, output_tok_s=round(batch1, 2), ttft_ms=round(ttft * 1000, 1)),
            dict(common, concurrency=len(workload), output_tok_s=round(produced / elapsed, 2), ttft_ms=None)]


def without_amx(bench, *args, **kwargs) -> list[dict]:
    """bench(*args, **kwargs) with int8 products kept off AMX tiles (the rows of CPUs without them), or no
    rows where they would not take them anyway."""
    from lcq.kernels.cpu_matmul import amx_active, amx_tiles

    if not amx_active():
        return []
    with amx_tiles(False):
        return bench(*args, **kwargs)


def with_bf16_products(bench, *args, **kwargs) -> list[dict]:
    """bench(*args, **kwargs) with bf16 operands for the large products, or no rows on a CPU without AVX512_BF16."""
    from lcq.kernels.cpu_matmul import products_available

    if not products_available(torch.bfloat16):
        return []
    return bench(*args, cpu_matmul_dtype="bfloat16", **kwargs)


def bench_transformers(folder: str, batch1_tokens: int, workload) -> list[dict]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.tensor([workload[0][0][:32]])
    kwargs = dict(do_sample=False, pad_token_id=0)
    model.generate(prompt, max_new_tokens=8, min_new_tokens=8, **kwargs)
    start = time.perf_counter()
    model.generate(torch.tensor([workload[1][0][:128]]), max_new_tokens=1, min_new_tokens=1, **kwargs)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=batch1_tokens, min_new_tokens=batch1_tokens, **kwargs)
    batch1 = batch1_tokens / (time.perf_counter() - start)
    # 64 requests as one left-padded batch run to the longest output: what a generate() user would do.
    width = max(len(p) for p, _ in workload)
    ids = torch.zeros(len(workload), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (p, _) in enumerate(workload):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    longest = max(n for _, n in workload)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, **kwargs)
    elapsed = time.perf_counter() - start
    useful = sum(n for _, n in workload)  # tokens the requests asked for
    common = dict(model=Path(folder).name, weights="fp32", engine="transformers", peak_mem_GB=round(rss_gb(), 3))
    return [dict(common, concurrency=1, output_tok_s=round(batch1, 2), ttft_ms=round(ttft * 1000, 1)),
            dict(common, concurrency=len(workload), output_tok_s=round(useful / elapsed, 2), ttft_ms=None)]


def bench_llama_cpp(gguf: Path, batch1_tokens: int, workload) -> list[dict]:
    try:
        from llama_cpp import Llama
    except ImportError:
        return []
    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=torch.get_num_threads(), verbose=False)
    prompt = workload[0][0][:32]
    for i, _ in enumerate(llm.generate(prompt, temp=0.0)):  # warm-up, as for the other engines
        if i + 1 == 8:
            break
    llm.reset()
    start = time.perf_counter()
    produced = 0
    for _ in llm.generate(prompt, temp=0.0):
        produced += 1
        if produced == batch1_tokens:
            break
    batch1 = produced / (time.perf_counter() - start)
    start = time.perf_counter()
    produced = 0
    for prompt, n in workload:  # llama-cpp-python serves one sequence at a time
        llm.reset()
        for i, _ in enumerate(llm.generate(prompt, temp=0.0)):
            if i + 1 == n:
                break
        produced += n
    elapsed = time.perf_counter() - start
    common = dict(model="SmolLM2-135M-Instruct.Q4_1.gguf", weights="q4_1", engine="llama.cpp",
                  peak_mem_GB=round(rss_gb(), 3))
    return [dict(common, concurrency=1, output_tok_s=round(batch1, 2), ttft_ms=None),
            dict(common, concurrency=len(workload), output_tok_s=round(produced / elapsed, 2), ttft_ms=None)]


def row_engine(row: dict) -> str:
    """The --engines name of a CPU row."""
    if row["engine"] != "lcq":
        return row["engine"]
    return row.get("variant") or ("fp32" if row["weights"] == "fp32" else "lcq")


def median_rows(rounds: list[list[dict]], name: str) -> list[dict]:
    """One row per concurrency of engine `name`: its median over the rounds (TTFT too), every round's
    output tokens/s in `output_tok_s_rounds`, and the first round's memory (later rounds start from the
    heap the earlier engines of the process left)."""
    by_concurrency: dict[int, list[dict]] = {}
    for measured in rounds:
        for row in measured:
            if row_engine(row) == name:
                by_concurrency.setdefault(row["concurrency"], []).append(row)
    merged = []
    for concurrency, runs in by_concurrency.items():
        ttfts = [r["ttft_ms"] for r in runs if r["ttft_ms"] is not None]
        merged.append(dict(runs[0], output_tok_s=round(statistics.median(r["output_tok_s"] for r in runs), 2),
                           ttft_ms=round(statistics.median(ttfts), 1) if ttfts else None,
                           output_tok_s_rounds=[r["output_tok_s"] for r in runs]))
    return merged


def round_ratios(rounds: list[list[dict]]) -> dict[str, list[float]]:
    """Our default engine's output tokens/s over each other engine's, per round and concurrency: rows of
    one round ran minutes apart, so their ratio holds up where this VM's speed drifts between rounds."""
    ratios: dict[str, list[float]] = {}
    for measured in rounds:
        speed = {(row_engine(r), r["concurrency"]): r["output_tok_s"] for r in measured}
        for (engine, concurrency), ours in speed.items():
            if engine != "lcq":
                continue
            for other in ("transformers", "llama.cpp", "lcq-h4", "lcq-lora", "lcq-no-amx", "lcq-kv8", "lcq-invariant"):
                if speed.get((other, concurrency)):
                    key = f"lcq / {other} at concurrency {concurrency}"
                    ratios.setdefault(key, []).append(round(ours / speed[(other, concurrency)], 2))
    return ratios


def seven_b_weight_gb(bits: int, rank: int, group_size: int) -> float:
    """Llama-2-7B weight bytes from the format: PackedLinear.nbytes of one layer's seven packed
    linears times 32 layers, plus the fp16 embeddings, head and norms."""
    from bench.random_model import LLAMA2_7B, random_packed

    h, i, vocab, layers = (LLAMA2_7B[k] for k in ("hidden_size", "intermediate_size", "vocab_size",
                                                   "num_hidden_layers"))
    shapes = [(h, h)] * 4 + [(i, h)] * 2 + [(h, i)]
    per_layer = sum(random_packed(n, k, bits, rank, group_size).nbytes() for n, k in shapes)
    return (layers * per_layer + 2 * (2 * vocab * h + h * (2 * layers + 1))) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gpu-7b", action="store_true")
    parser.add_argument("--gpu-moe", action="store_true")
    parser.add_argument("--moe-layers", type=int, default=12, help="--gpu-moe: layers of the model's (time to write)")
    parser.add_argument("--moe-shape", choices=MOE_SHAPES, default="qwen3-30b-a3b", help="--gpu-moe: whose shapes")
    parser.add_argument("--curve", action="store_true", help="CPU: our engine's throughput over 1..64 sequences")
    parser.add_argument("--gpu-weights", default="lcq-w2r2g128,fp16", help="--gpu-7b: which checkpoints")
    parser.add_argument("--variants", default="", help="--gpu-7b: batch 1 again in each of these variants "
                        f"(comma-separated): {', '.join(GPU_VARIANTS)}")
    parser.add_argument("--engines",
                        default="lcq,lcq-bf16,lcq-h4,lcq-lora,lcq-no-amx,lcq-kv8,fp32,transformers,llama.cpp",
                        help="CPU: which rows to measure; rows of the others are kept from the results file")
    parser.add_argument("--rounds", type=int, default=1,
                        help="CPU: measure every engine this many times, in alternating order, and report "
                             "medians and per-round ratios (this VM's speed drifts over minutes)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/generate-<run>.json; a GPU "
                        "run's name ends in the GPU's, as bench/kernels.py's do: generate-gpu-quick-nvidia-h200.json)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch CPU threads for every engine (use fewer when the machine is shared: "
                             "spinning OpenMP threads on busy cores are many times slower)")
    args = parser.parse_args()
    from lcq.quantizer.demo import GGUF_NAME, ensure_demo_model, fetch_demo
    from bench.records import cpu_name, with_settings
    from lcq.paths import cache_dir

    on_gpu = args.gpu_7b or args.gpu_moe
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and on_gpu else \
        f"CPU ({cpu_name()}, {os.cpu_count()} cores)"
    rows: list[dict] = []
    result = {
        "device": device, "date": datetime.date.today().isoformat(), "command": with_settings(" ".join(sys.argv)),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "threads": torch.get_num_threads(),
        "llama2_7b_weight_GB": {"lcq-w2r2g128": round(seven_b_weight_gb(2, 2, 128), 3),
                                "fp16": round(2 * 6.74e9 / 1e9, 2)},
        "rows": rows,
    }
    moe = "gpu-moe" if args.moe_shape == "qwen3-30b-a3b" else f"gpu-{args.moe_shape}"
    name = "gpu" if args.gpu_7b else moe if args.gpu_moe else "cpu-curve" if args.curve else "cpu"
    name += "-quick" if args.quick else ""
    if on_gpu:  # one file per GPU, so that a run on one does not overwrite another's results
        name += "-" + re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    out = Path(args.out or ROOT / "bench" / "results" / f"generate-{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        """Written after every GPU row too, so that a run stopped by a time limit keeps what it measured."""
        result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        out.write_text(json.dumps(result, indent=2) + "\n")

    if args.gpu_7b:
        result["decode_profile"], result["startup_s"] = {}, {}
        bench_gpu_7b(args.quick, args.gpu_weights.split(","), rows, save, result["decode_profile"],
                     [v for v in args.variants.split(",") if v], result["startup_s"])
    elif args.gpu_moe:
        bench_gpu_moe(args.quick, args.moe_shape, args.moe_layers, rows, save)
    elif args.curve:
        torch.set_num_threads(args.threads)
        result["threads"] = args.threads
        llm = LLM(str(ensure_demo_model()), kv_cache_memory_gb=2.0)
        concurrencies = [1, 8] if args.quick else [1, 2, 3, 4, 8, 16, 32, 64]
        throughput_curve(llm, "smollm2-135m-instruct", "lcq-w4r2g64", concurrencies, rows, save)
    else:
        torch.set_num_threads(args.threads)
        result["threads"] = args.threads
        engines = args.engines.split(",")
        fp = str(fetch_demo())
        lcq = str(ensure_demo_model())
        count, batch1_tokens = (8, 32) if args.quick else (64, 128)
        workload = mixed_workload(count, vocab=49152)
        measured = {
            "lcq": lambda: bench_ours(lcq, "lcq-w4r2g64", "lcq", batch1_tokens, workload, kv_cache_memory_gb=2.0),
            "lcq-bf16": lambda: with_bf16_products(bench_ours, lcq, "lcq-w4r2g64", "lcq-bf16", batch1_tokens,
                                                   workload, kv_cache_memory_gb=2.0),
            "lcq-h4": lambda: bench_ours(str(ensure_demo_model(head_bits=4)), "lcq-w4r2g64-h4", "lcq-h4",
                                         batch1_tokens, workload, kv_cache_memory_gb=2.0),
            "lcq-lora": lambda: bench_ours(lcq, "lcq-w4r2g64", "lcq-lora", batch1_tokens, workload, lora=True,
                                           kv_cache_memory_gb=2.0),
            "lcq-no-amx": lambda: without_amx(bench_ours, lcq, "lcq-w4r2g64", "lcq-no-amx", batch1_tokens, workload,
                                              kv_cache_memory_gb=2.0),
            "lcq-kv8": lambda: bench_ours(lcq, "lcq-w4r2g64", "lcq-kv8", batch1_tokens, workload,
                                          kv_cache_memory_gb=2.0, kv_cache_dtype="int8"),
            "lcq-invariant": lambda: bench_ours(lcq, "lcq-w4r2g64", "lcq-invariant", batch1_tokens, workload,
                                                kv_cache_memory_gb=2.0, batch_invariant=True),
            "lcq-fp32-products": lambda: bench_ours(lcq, "lcq-w4r2g64", "lcq-fp32-products", batch1_tokens, workload,
                                                    kv_cache_memory_gb=2.0, cpu_matmul_dtype="float32"),
            "fp32": lambda: bench_ours(fp, "fp32", "fp32", batch1_tokens, workload, kv_cache_memory_gb=2.0),
            "transformers": lambda: bench_transformers(fp, batch1_tokens, workload),
            "llama.cpp": lambda: bench_llama_cpp(cache_dir() / "gguf" / GGUF_NAME, batch1_tokens, workload)}
        kept = json.loads(out.read_text())["rows"] if out.exists() else []
        rounds: list[list[dict]] = []
        for index in range(args.rounds):  # forward, then backward: no engine always runs first
            order = list(measured) if index % 2 == 0 else list(reversed(measured))
            rounds.append([])
            for name in order:
                if name in engines:
                    gc.collect()  # the previous engine's cycles, so that each row's RSS is its own engine's
                    rounds[-1] += measured[name]()
        for name in measured:
            rows += median_rows(rounds, name) if name in engines else [r for r in kept if row_engine(r) == name]
        result["rounds"] = args.rounds
        result["ratios_per_round"] = round_ratios(rounds)
        kept_names = {row_engine(r) for r in kept} & set(measured) - set(engines)
        if kept_names:
            result["rows_kept_from_the_previous_run"] = sorted(kept_names)
    save()
    print(f"device: {device}")
    print("| engine | weights | products | concurrency | output tok/s | TTFT ms | peak mem GB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        measured = f"{r['output_tok_s']} | {r['ttft_ms']} | {r['peak_mem_GB']}" if "error" not in r else \
            f"failed: {r['error'][:120]} | | "
        print(f"| {row_engine(r)} | {r['weights']} | {r.get('products', '')} | {r.get('concurrency', '')} | "
              f"{measured} |")
    for pair, ratios in result.get("ratios_per_round", {}).items():
        print(f"{pair}: " + ", ".join(f"{x}x" for x in ratios))
    print(f"Llama-2-7B weights: W2 r2 g128 {result['llama2_7b_weight_GB']['lcq-w2r2g128']} GB "
          f"vs fp16 {result['llama2_7b_weight_GB']['fp16']} GB; wrote {out}")


def throughput_curve(llm: LLM, model: str, weights: str, concurrencies: list[int], rows: list[dict], save,
                     engine: str = "lcq", prompt_tokens: int = 128) -> None:
    """Output tokens/s of each number of sequences (prompts of prompt_tokens tokens, distinct, 128 tokens out
    each) generated together; TTFT as the time until every one of that many new prompts has its first token
    (one batched prefill; at one sequence the usual TTFT); peak memory as the GPU's allocator or the
    process's RSS reports it. Every prompt is new to the engine (no prefix-cache hits). Each row is
    appended to rows and saved as soon as it is measured; rows of other than 128-token prompts say so."""
    cuda = llm.engine.runner.device.type == "cuda"
    weights_gb = llm.engine.runner.weight_bytes / 2**30
    kv_gb = llm.engine.runner.kv_cache_bytes / 2**30
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    # one token id per prompt, repeated: never a prompt the cache holds
    fresh = itertools.count(llm.engine.runner.model_config.vocab_size // 4)

    def new_prompts(count: int) -> list[list[int]]:
        return [[next(fresh)] * prompt_tokens for _ in range(count)]

    def timed(prompts: list[list[int]], sampling: SamplingParams) -> tuple[list, float]:
        start = time.perf_counter()
        outs = llm.generate(prompts, sampling)
        if cuda:
            torch.cuda.synchronize()
        return outs, time.perf_counter() - start

    for concurrency in concurrencies:
        llm.generate(new_prompts(1), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        outs, elapsed = timed(new_prompts(concurrency), params)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else rss_gb()
        _, first_token = timed(new_prompts(concurrency), SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        row = dict(model=model, weights=weights, engine=engine, concurrency=concurrency,
                   output_tok_s=round(sum(len(o.token_ids) for o in outs) / elapsed, 1),
                   ttft_ms=round(first_token * 1000, 1), peak_mem_GB=round(peak, 2), kv_cache_GB=round(kv_gb, 2),
                   **({} if prompt_tokens == 128 else {"prompt_tokens": prompt_tokens}))
        if cuda:  # the allocator splits the peak; a CPU process's RSS has no such split
            row.update(weights_GB=round(weights_gb, 2), activations_GB=round(max(0.0, peak - weights_gb - kv_gb), 2))
        rows.append(row)
        print(rows[-1], flush=True)
        save()


def decode_profile(llm: LLM, tokens: int = 64, top: int = 12) -> dict:
    """Where a batch-1 decode step's time goes on the GPU: the kernels torch's profiler sees in one
    generation of `tokens` tokens (decode steps replayed from CUDA graphs, plus one 128-token prefill),
    per generated token: their count and busy time, and the kernels that took the most time. The step's
    wall time less the busy time is what launches and gaps cost."""
    from torch.profiler import ProfilerActivity, profile

    prompt = [[llm.engine.runner.model_config.vocab_size // 3] * 128]
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    cuda = llm.engine.runner.device.type == "cuda"
    llm.generate(prompt, params)  # once unprofiled: every graph and kernel is ready
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        llm.generate(prompt, params)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA and e.count]
    busy_us = sum(e.self_device_time_total for e in kernels)
    ranked = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    return {"tokens": tokens, "wall_ms_per_token": round(wall * 1000 / tokens, 3),
            "kernels_per_token": round(sum(e.count for e in kernels) / tokens, 1),
            "kernel_us_per_token": round(busy_us / tokens, 1),
            "top": [{"kernel": e.key[:120], "us_per_token": round(e.self_device_time_total / tokens, 1),
                     "per_token": round(e.count / tokens, 2)} for e in ranked]}


def host_profile(llm: LLM, tokens: int = 64, top: int = 15) -> dict:
    """Where the host's time goes at batch 1 (cProfile): in one 128-token prefill (a max_tokens=1 request: its
    time is the TTFT) and in a generation of `tokens` tokens, the functions that took the most time themselves,
    per call of the first and per generated token of the second. With the GPU busy for most of a decode step,
    the host's time is what a step waits for it; in a prefill, where kernels are launched one by one, it is
    the launches' Python."""
    import cProfile
    import pstats

    fresh = itertools.count(llm.engine.runner.model_config.vocab_size // 5)  # prompts the prefix cache lacks
    result = {}
    for name, count in (("prefill", 1), ("decode", tokens)):
        params = SamplingParams(max_tokens=count, temperature=0, ignore_eos=True)
        llm.generate([[next(fresh)] * 128], params)  # warm
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.runcall(llm.generate, [[next(fresh)] * 128], params)
        wall = time.perf_counter() - start
        stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive calls, tottime, cumtime, ..)
        ranked = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
        result[name] = {"wall_ms_per_token": round(wall * 1000 / count, 3),
                        "top": [{"function": f"{Path(file).name}:{line}({function})",
                                 "self_ms_per_token": round(entry[2] * 1000 / count, 3),
                                 "calls_per_token": round(entry[0] / count, 1)}
                                for (file, line, function), entry in ranked]}
    return result


LONG_PROMPT_TOKENS = 1900  # with its 128 new tokens, within the 7B runs' max_model_len of 2,048
# What a variant of one of the 7B's rows changes, to measure what it costs or saves, and the row's concurrency:
# the decoder's norms, rotary embedding and activation as torch expressions instead of their CUDA kernels
# (lcq.kernels.elementwise), the kernels launched without programmatic dependent launch
# (lcq.kernels.dependent_launch), or the exact decode products instead of the default products of bytes at 1-2
# rows and weights from byte codebooks at up to 32 (LCQ_INT8_DECODE=0, LCQ_BYTE_BOOK=0; lcq.kernels.byte_products),
# at batch 1 and at 8 sequences, or the products of bytes of inputs rounded once by a kernel of their own
# (LCQ_INT8_INPUTS=1, triton_linear.input_bytes) at batch 1, or each step waiting for the last one's tokens before
# it is launched (async_scheduling off: the host's work between steps then leaves the GPU idle) at batch 1 and 8, or
# the prompts' products from slabs of W^T at every row count (LCQ_DENSE_SLAB_MB set; triton_linear.DENSE_SLAB_MIN_M)
# at batch 1, for its TTFT, or the norms, residual adds, MLP activation and rotation with the cache write each a
# kernel of their own, not inside the products (LCQ_FUSED_STEPS=0; lcq.kernels.elementwise.fusing_steps) at batch 1;
# and the engine settings the variant's engine is loaded with.
EXACT = {"LCQ_INT8_DECODE": "0", "LCQ_BYTE_BOOK": "0"}
GPU_VARIANTS = {"torch-steps": (lambda: mock.patch("lcq.models.layers._on_gpu", return_value=False), 1, {}),
                "no-pdl": (lambda: mock.patch.dict(os.environ, {"LCQ_PDL": "0"}), 1, {}),
                "prepared-inputs": (lambda: mock.patch.dict(os.environ, {"LCQ_INT8_INPUTS": "1"}), 1, {}),
                "exact": (lambda: mock.patch.dict(os.environ, EXACT), 1, {}),
                "exact-8": (lambda: mock.patch.dict(os.environ, EXACT), 8, {}),
                "no-async": (contextlib.nullcontext, 1, {"async_scheduling": False}),
                "no-async-8": (contextlib.nullcontext, 8, {"async_scheduling": False}),
                "slab-dense": (lambda: mock.patch.dict(os.environ, {"LCQ_DENSE_SLAB_MB": "16"}), 1, {}),
                "attention-unpipelined": (lambda: mock.patch.dict(os.environ, {"LCQ_ATTENTION_STAGES": "1"}), 1, {}),
                "unfused-steps": (lambda: mock.patch.dict(os.environ, {"LCQ_FUSED_STEPS": "0"}), 1, {})}


def run_recording_failure(run, rows: list[dict], save, **row) -> None:
    """run(), where an exception is printed and kept as a row (`error`, beside `row`'s fields) instead of ending
    the benchmark, so that one engine's failure on a GPU (a build Triton refuses there, a kernel's fault) leaves
    the others' rows, among them the variant that turns the failing path off. The failed engine's memory is freed
    before the next one starts (collected with its frames), or that one would size its KV cache around it."""
    import traceback

    try:
        run()
    except Exception as error:  # noqa: BLE001 - every failure is the row's to report
        traceback.print_exc()
        rows.append(dict(row, error=f"{type(error).__name__}: {error}"[:2000]))
        save()
    gc.collect()
    torch.cuda.empty_cache()


def bench_gpu_7b(quick: bool, weight_kinds: list[str], rows: list[dict], save, profiles: dict,
                 variants: list[str] = (), startups: dict | None = None) -> None:
    """Random Llama-2-7B-shaped checkpoints (W2 r2 g128 and fp16) written to a temp folder, then timed;
    a batch-1 decode profile of each goes into profiles, and into startups the seconds its engine took to start
    (loading, the warm-up's tuning and compiles, the CUDA graphs). variants (GPU_VARIANTS): then the variant's row
    again (batch 1, and its decode profile, or 8 sequences), in each. An engine that fails leaves a row with its
    error, and the next one runs (run_recording_failure)."""
    import tempfile

    from bench.random_model import write_random_llama

    concurrencies = [1, 8, 64] if quick else [1, 2, 4, 8, 16, 32, 64, 128, 256]
    model = "llama-2-7b-shaped-random"

    def plain(folder: Path, weights: str) -> None:
        started = time.perf_counter()
        llm = LLM(str(folder), max_num_seqs=max(concurrencies), max_model_len=2048)
        if startups is not None:
            startups[weights] = round(time.perf_counter() - started, 1)
        throughput_curve(llm, model, weights, concurrencies, rows, save)
        # one long context at batch 1: decode attention reads ~15x the cache of the 128-token rows
        throughput_curve(llm, model, weights, [1], rows, save, prompt_tokens=LONG_PROMPT_TOKENS)
        profiles[weights] = decode_profile(llm)
        profiles[f"{weights} host"] = host_profile(llm)
        print({weights: profiles[weights], f"{weights} host": profiles[f"{weights} host"]}, flush=True)
        save()

    def varied(folder: Path, weights: str, variant: str) -> None:
        patch, concurrency, settings = GPU_VARIANTS[variant]
        with patch():  # the graphs are captured at load: a second engine, loaded in the variant
            llm = LLM(str(folder), max_num_seqs=concurrency, max_model_len=2048, **settings)
            start = len(rows)
            throughput_curve(llm, model, weights, [concurrency], rows, save)
            rows[start]["variant"] = variant
            if concurrency == 1:  # (the profile is of one sequence)
                profiles[f"{weights} {variant}"] = decode_profile(llm)
        print({f"{weights} {variant}": profiles.get(f"{weights} {variant}", rows[start])}, flush=True)
        save()

    with tempfile.TemporaryDirectory() as tmp:
        for weights in weight_kinds:
            folder = write_random_llama(Path(tmp) / weights, quantized=weights != "fp16")
            run_recording_failure(lambda: plain(folder, weights), rows, save, model=model, weights=weights,
                                  engine="lcq")
            for variant in variants:
                run_recording_failure(lambda: varied(folder, weights, variant), rows, save, model=model,
                                      weights=weights, engine="lcq", variant=variant,
                                      concurrency=GPU_VARIANTS[variant][1])


def bench_gpu_moe(quick: bool, shape: str, layers: int, rows: list[dict], save) -> None:
    """A random W2 r2 g128 checkpoint of a mixture's shapes (`layers` of its layers), timed with decode in
    CUDA graphs and eagerly."""
    import tempfile

    from bench.random_model import write_random_llama

    concurrencies = [1, 8, 64] if quick else [1, 2, 4, 8, 16, 32, 64, 128]
    model = f"{shape}-shaped-random-{layers}-layers"
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random_llama(Path(tmp) / "moe", quantized=True,
                                    shapes=dict(MOE_SHAPES[shape], num_hidden_layers=layers))
        for engine, graphs in (("lcq", True), ("lcq-eager", False)):
            llm = LLM(str(folder), max_num_seqs=max(concurrencies), max_model_len=2048, cuda_graphs=graphs)
            throughput_curve(llm, model, "lcq-w2r2g128", concurrencies, rows, save, engine=engine)
            del llm
            torch.cuda.empty_cache()

if __name__ == "__main__":
    main()
