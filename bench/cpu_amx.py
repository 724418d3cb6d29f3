"""int8 CPU products of LCQ layers on AMX tiles (lcq/kernels/cpu_amx.c) against the vpdpbusd register tiles
(lcq/kernels/cpu_gemm.c), on SmolLM2-135M's or Llama 3.2 1B's linear shapes at W4 r2 g64 with their int8 rows
kept (the engine's default where it fits), at 16 to 1024 rows: prefill and decode steps of many sequences.
The two forms alternate in one process, weights cycled so that they come from memory, and must give the same
values bit for bit (checked on every shape).

    python bench/cpu_amx.py [--threads 2] [--shapes smollm2 | llama32-1b]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.cpu_index import MODELS, best_ms  # noqa: E402
from bench.records import cpu_arguments, cpu_record, write_record  # noqa: E402
from lcq.kernels import cpu_index, native  # noqa: E402
from lcq.kernels.cpu_matmul import amx_tiles, cpu_products, products_available  # noqa: E402
from tests.test_kernels import random_layer  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "cpu-amx.json"
ROWS = (16, 32, 64, 256, 1024)
POOL_BYTES = 128 << 20  # of kept int8 rows per shape
ROUNDS = 2


def options(parser) -> None:
    parser.add_argument("--shapes", choices=MODELS, default="smollm2")


def main() -> None:
    args = cpu_arguments(__doc__, RESULTS, options)
    if not (products_available(torch.int8) and native.amx_allowed()):
        raise SystemExit("this CPU has no AMX-INT8 (or int8 products, or LCQ_CPU_AMX=0)")
    rows = []
    for name, (n, k) in MODELS[args.shapes][0].items():
        weights = [cpu_index.IndexWeight(random_layer(n, k, 4, 2, 64, seed=i), wide=True)
                   for i in range(max(2, POOL_BYTES // (n * k)))]
        for weight in weights:
            weight.keep_byte_rows()
        for m in ROWS:
            x = torch.randn(m, k)
            with cpu_products(torch.int8):
                with amx_tiles(False):
                    registers = weights[0].linear(x)
                with amx_tiles(True):
                    if not torch.equal(weights[0].linear(x), registers):
                        raise SystemExit(f"{name} at {m} rows: AMX tiles and register tiles differ")
                times = {False: float("inf"), True: float("inf")}
                for _ in range(ROUNDS):
                    for amx in times:
                        with amx_tiles(amx):
                            times[amx] = min(times[amx], best_ms(lambda w: w.linear(x), weights, repeats=4))
            gflops = {amx: 2 * m * n * k / (ms * 1e6) for amx, ms in times.items()}
            rows.append(dict(shape=name, m=m, registers_ms=round(times[False], 4), amx_ms=round(times[True], 4),
                             registers_GFLOPs=round(gflops[False]), amx_GFLOPs=round(gflops[True]),
                             speedup=round(times[False] / times[True], 2)))
            print(rows[-1], flush=True)
    write_record(args.output, cpu_record(" ".join(["python", *sys.argv]), args.threads, shapes=args.shapes,
                                         format="W4 r2 g64, int8 rows kept", rows=rows))
    print("| shape | rows | register tiles ms | AMX tiles ms | GFLOP/s | speedup |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['m']} | {r['registers_ms']} | {r['amx_ms']} | "
              f"{r['registers_GFLOPs']} -> {r['amx_GFLOPs']} | {r['speedup']}x |")


if __name__ == "__main__":
    main()
