"""CPU paged attention: the C kernels (lcq/kernels/cpu_decode_attention.c and cpu_prefill_attention.c) against
the torch path of lcq/models/attention.py (SDPA on K/V rows gathered from the cache), for prefill and decode steps with
SmolLM2-135M's heads (9 query and 3 kv heads of 64), fp32 and fp16 caches; on CPUs with AVX512_BF16
also the C kernels with bf16 products (bf16 operands in prefill tiles; decode stays fp32), and on CPUs
with AMX those on AMX tiles (the default there) against the register tiles.

The two are timed alternately in one process (this VM's speed drifts within minutes); each row is
the median of the rounds.

    python bench/cpu_attention.py [--threads 2]
"""
from __future__ import annotations

import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.records import cpu_arguments, cpu_record, write_record  # noqa: E402
from lcq.kernels import cpu_ops  # noqa: E402
from lcq.kernels.cpu_matmul import amx_active, amx_tiles, cpu_products, products_available  # noqa: E402
from lcq.models.attention import PagedAttention  # noqa: E402
from lcq.models.context import ForwardContext  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "cpu-attention.json"
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
_rng = random.Random(0)
CASES = {  # name: (new tokens, cached tokens) per sequence
    "prefill 16 seqs x 16-256": ([_rng.randint(16, 256) for _ in range(16)], [0] * 16),
    "prefill 8 x 16": ([16] * 8, [0] * 8),
    "prefill 4 x 256": ([256] * 4, [0] * 4),
    "prefill 1 x 2048": ([2048], [0]),
    "prefill 4 x 64 after 512 cached": ([64] * 4, [512] * 4),
    "decode 8 seqs x 300": ([1] * 8, [299] * 8),
    "decode 64 seqs x 16-300": ([1] * 64, [_rng.randint(15, 299) for _ in range(64)]),
}
ROUNDS, CALLS = 6, 3


def paged_step(new: list[int], cached: list[int], cache_dtype: torch.dtype):
    """Random caches whose sequences' blocks are scattered over the pool, queries, and the step's context."""
    lengths = [n + c for n, c in zip(new, cached)]
    counts = [-(-length // BLOCK) for length in lengths]
    pool = torch.randperm(sum(counts)).tolist()
    tables, slots = [], []
    for length, count, n in zip(lengths, counts, new):
        table, pool = pool[:count], pool[count:]
        tables.append(table + [-1] * (max(counts) - count))
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(length - n, length)]
    shape = (sum(counts), BLOCK, KV_HEADS, HEAD_DIM)
    caches = torch.randn(shape).to(cache_dtype), torch.randn(shape).to(cache_dtype)
    starts = [0]
    for n in new:
        starts.append(starts[-1] + n)
    context = ForwardContext(
        is_prefill=max(new) > 1, slot_mapping=torch.tensor(slots), query_start=torch.tensor(starts, dtype=torch.int32),
        context_lens=torch.tensor(lengths, dtype=torch.int32), block_tables=torch.tensor(tables, dtype=torch.int32),
        max_query_len=max(new), max_context_len=max(lengths))
    return torch.randn(starts[-1], HEADS, HEAD_DIM), caches, context


def attend(variant: str, q, caches, context, cache_dtype) -> torch.Tensor:
    """One step's attention as the model runs it, the layout worked out per step included: variant
    "c", "c_bf16" (the C kernels with bf16 products, on AMX tiles where the CPU has them),
    "c_bf16_registers" (bf16 products on register tiles) or "torch"."""
    cpu_ops.ENABLED = variant != "torch"
    try:
        with cpu_products(torch.bfloat16 if variant.startswith("c_bf16") else torch.float32), \
                amx_tiles(variant != "c_bf16_registers"):
            paged = PagedAttention(context, BLOCK, torch.device("cpu"), torch.float32, cache_dtype)
            return paged.attend(q, *caches, HEAD_DIM ** -0.5)
    finally:
        cpu_ops.ENABLED = True


def attention_gflop(new: list[int], cached: list[int]) -> float:
    """Scores and weighted sums: 4 FLOP per head dimension, query head and visible key."""
    visible = sum(sum(c + j + 1 for j in range(n)) for n, c in zip(new, cached))
    return 4 * visible * HEADS * HEAD_DIM / 1e9


def main() -> None:
    args = cpu_arguments(__doc__, RESULTS)
    if not cpu_ops.usable():
        raise SystemExit("the C kernels do not run here (see lcq/kernels/native.py)")
    rows = []
    variants = ["c", "torch"] + (["c_bf16"] if products_available(torch.bfloat16) else []) + \
        (["c_bf16_registers"] if amx_active() else [])
    print(f"{'case':<34} {'cache':<8} {'C ms':>8} {'torch ms':>9} {'speedup':>8} {'C GFLOP/s':>10}"
          + (f" {'C bf16 ms':>10} {'vs C':>6}" if "c_bf16" in variants else "")
          + (f" {'registers':>10} {'AMX x':>6}" if "c_bf16_registers" in variants else ""))
    for name, (new, cached) in CASES.items():
        for cache_dtype in (torch.float32, torch.float16):
            q, caches, context = paged_step(new, cached, cache_dtype)
            outputs = {variant: attend(variant, q, caches, context, cache_dtype) for variant in variants}
            times: dict[str, list[float]] = {variant: [] for variant in variants}
            for round_ in range(ROUNDS):  # every other round reversed: what ran before changes what is in cache
                for variant in variants if round_ % 2 == 0 else variants[::-1]:
                    start = time.perf_counter()
                    for _ in range(CALLS):
                        attend(variant, q, caches, context, cache_dtype)
                    times[variant].append((time.perf_counter() - start) / CALLS * 1e3)
            c_ms, torch_ms = statistics.median(times["c"]), statistics.median(times["torch"])
            gflop = attention_gflop(new, cached)
            row = {"case": name, "cache_dtype": str(cache_dtype).removeprefix("torch."), "c_ms": round(c_ms, 3),
                   "torch_ms": round(torch_ms, 3), "speedup": round(torch_ms / c_ms, 2),
                   "c_gflops": round(gflop / c_ms * 1e3, 1),
                   "max_abs_difference": float(f"{(outputs['c'] - outputs['torch']).abs().max().item():.2g}")}
            line = (f"{name:<34} {row['cache_dtype']:<8} {c_ms:8.3f} {torch_ms:9.3f} {row['speedup']:7.2f}x "
                    f"{row['c_gflops']:10.1f}")
            if "c_bf16" in variants:
                bf16_ms = statistics.median(times["c_bf16"])
                row.update(c_bf16_ms=round(bf16_ms, 3), bf16_speedup=round(c_ms / bf16_ms, 2),
                           bf16_max_abs_difference=float(f"{(outputs['c_bf16'] - outputs['c']).abs().max().item():.2g}"))
                line += f" {bf16_ms:10.3f} {row['bf16_speedup']:5.2f}x"
            if "c_bf16_registers" in variants:  # AMX tiles against the register tiles, both bf16
                registers_ms = statistics.median(times["c_bf16_registers"])
                row.update(c_bf16_registers_ms=round(registers_ms, 3), amx_speedup=round(registers_ms / bf16_ms, 2))
                line += f" {registers_ms:10.3f} {row['amx_speedup']:5.2f}x"
            rows.append(row)
            print(line, flush=True)
    write_record(args.output, cpu_record(f"python bench/cpu_attention.py --threads {args.threads}", args.threads,
                                         heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, block_size=BLOCK,
                                         rounds=ROUNDS, calls_per_round=CALLS,
                                         load_average_1m=os.getloadavg()[0], rows=rows))


if __name__ == "__main__":
    main()
