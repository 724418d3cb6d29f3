"""CPU products on AMX tiles (lcq/kernels/cpu_amx.c) against the register tiles (lcq/kernels/cpu_gemm.c):
int8 products of LCQ layers at SmolLM2-135M's or Llama 3.2 1B's linear shapes, W4 r2 g64 with their int8 rows
kept (the engine's default where it fits), at 16 to 1024 rows (prefill, decode steps of many sequences), which
must give the same values bit for bit; and bf16 products of the fp16 head with its panels kept, at 3 to 256
rows, which sum in another order (within 1e-5); and bf16 products of the same shapes' fp16 weights
expanded per call (a full-precision model's layers) at 10 to 256 rows. The two forms alternate in one
process, weights cycled so that they come from memory.

    python bench/cpu_amx.py [--threads 2] [--shapes smollm2 | llama32-1b]
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.cpu_index import MODELS, best_ms  # noqa: E402
from bench.records import cpu_arguments, cpu_record, write_record  # noqa: E402
from lcq.kernels import cpu_half, cpu_index  # noqa: E402
from lcq.kernels.cpu_matmul import amx_active, amx_tiles, cpu_products, products_available  # noqa: E402
from tests.test_kernels import random_layer  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "cpu-amx.json"
ROWS = (16, 32, 64, 256, 1024)
HALF_ROWS = (10, 64, 256)  # bf16 blocked products of fp16 weights expanded per call (full-precision layers)
HEADS = {"smollm2": (49152, 576), "llama32-1b": (128256, 2048)}  # vocabulary x hidden
HEAD_ROWS = (3, 4, 5, 8, 16, 64, 256)  # bf16 products of kept panels: the register tiles below 5 rows
POOL_BYTES = 128 << 20  # of kept int8 rows per shape
ROUNDS = 2


def options(parser) -> None:
    parser.add_argument("--shapes", choices=MODELS, default="smollm2")


def compare(name: str, products: list, x: torch.Tensor, dtype: torch.dtype, exact: bool) -> dict:
    """One row: each product (a callable of x) timed with AMX tiles off and on, alternating; with `exact`
    the two forms' outputs must be equal, else within 1e-5 of each other (other fp32 sums)."""
    m, n, k = x.shape[0], products[0](x).shape[1], x.shape[1]
    with cpu_products(dtype):
        with amx_tiles(False):
            registers = products[0](x)
        with amx_tiles(True):
            tiles = products[0](x)
        difference = ((tiles - registers).norm() / registers.norm()).item()
        if (exact and not torch.equal(tiles, registers)) or difference > 1e-5:
            raise SystemExit(f"{name} at {m} rows: AMX tiles and register tiles differ ({difference:.1e})")
        times = {False: float("inf"), True: float("inf")}
        for _ in range(ROUNDS):
            for amx in times:
                with amx_tiles(amx):
                    times[amx] = min(times[amx], best_ms(lambda product: product(x), products, repeats=4))
    gflops = {amx: 2 * m * n * k / (ms * 1e6) for amx, ms in times.items()}
    row = dict(shape=name, operands=str(dtype).removeprefix("torch."), m=m, registers_ms=round(times[False], 4),
               amx_ms=round(times[True], 4), registers_GFLOPs=round(gflops[False]), amx_GFLOPs=round(gflops[True]),
               speedup=round(times[False] / times[True], 2), relative_difference=float(f"{difference:.2g}"))
    print(row, flush=True)
    return row


def main() -> None:
    args = cpu_arguments(__doc__, RESULTS, options)
    if not (products_available(torch.int8) and amx_active()):
        raise SystemExit("this CPU has no AMX-INT8 and AMX-BF16 (or int8 products, or LCQ_CPU_AMX=0)")
    rows = []
    shapes = MODELS[args.shapes][0]
    for name, (n, k) in shapes.items():
        weights = [cpu_index.IndexWeight(random_layer(n, k, 4, 2, 64, seed=i), wide=True)
                   for i in range(max(2, POOL_BYTES // (n * k)))]
        for weight in weights:
            weight.keep_byte_rows()
        products = [weight.linear for weight in weights]
        rows += [compare(name, products, torch.randn(m, k), torch.int8, exact=True) for m in ROWS]
        halves = [torch.randn(n, k).half() for _ in range(max(2, POOL_BYTES // (2 * n * k)))]
        products = [functools.partial(cpu_half.half_linear, weight=weight) for weight in halves]
        rows += [compare(f"{name} fp16", products, torch.randn(m, k), torch.bfloat16, exact=False)
                 for m in HALF_ROWS]
    n, k = HEADS[args.shapes]
    weights = [torch.randn(n, k).half() for _ in range(max(2, POOL_BYTES // (2 * n * k)))]
    products = [functools.partial(cpu_half.half_linear, weight=weight, panels=cpu_half.pair_panels(weight))
                for weight in weights]
    rows += [compare(f"head {n}x{k}", products, torch.randn(m, k), torch.bfloat16, exact=False)
             for m in HEAD_ROWS]
    write_record(args.output, cpu_record(" ".join(["python", *sys.argv]), args.threads, shapes=args.shapes,
                                         format="LCQ layers W4 r2 g64, int8 rows kept; fp16 layers "
                                                "expanded per call; the head fp16, bf16 panels kept", rows=rows))
    print("| shape | operands | rows | register tiles ms | AMX tiles ms | GFLOP/s | speedup |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['operands']} | {r['m']} | {r['registers_ms']} | {r['amx_ms']} | "
              f"{r['registers_GFLOPs']} -> {r['amx_GFLOPs']} | {r['speedup']}x |")


if __name__ == "__main__":
    main()
