"""CPU matrix products: the fp16 kernel (lcq/kernels/cpu_half.c) against the fp32 weight packed for
oneDNN, on SmolLM2-135M's linear shapes, from decode (1-8 rows) to prefill sizes (16-256 rows); on
CPUs with AVX512_BF16 also the fp16 kernel with bf16 products (cpu_matmul.cpu_products), which
changes products from 3 rows, and with the weight's bf16 panels kept (cpu_half.pair_panels, which the
engine keeps for the head), read from 3 rows; with AVX512_VNNI, at 1-2 rows, the weight's int8 rows
(cpu_half.byte_rows, which the engine keeps for the head) in int8 products. Then, with AVX512_VNNI, LCQ W4 r2 g64 weights
(lcq/kernels/cpu_index.c) with bf16 against int8 products (which only LCQ weights take), and int8
products of weights that keep their int8 rows (IndexWeight.keep_byte_rows, the engine's
cpu_int8_weights), which take the blocked int8 product from 3 rows instead of 10.

Each timing cycles through enough distinct weights (at least 256 MiB of fp32; for LCQ weights, 128
MiB of kept int8 rows) that they come from memory, not cache, as in a decode step of a whole model.

    python bench/cpu_products.py [--threads 2]
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.records import cpu_arguments, cpu_record, write_record  # noqa: E402
from lcq.kernels import cpu_half, cpu_index  # noqa: E402
from lcq.kernels.cpu_matmul import cpu_products, dense_linear, pack_weight, products_available  # noqa: E402

from tests.test_kernels import random_layer  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "cpu-products.json"
SHAPES = {"qkv 960x576": (960, 576), "o 576x576": (576, 576), "gate/up 3072x576": (3072, 576),
          "down 576x1536": (576, 1536), "head 49152x576": (49152, 576)}
ROWS = (1, 2, 4, 8, 16, 64, 256)
POOL_BYTES = 256 << 20
KEPT_POOL_BYTES = 128 << 20  # of LCQ weights' kept int8 rows (1.125 bytes per weight beside 0.7 of indices)


def time_ms(product, x: torch.Tensor, weights: list, repeats: int = 3) -> float:
    for w in weights:  # warm-up
        product(x, w)
    start = time.perf_counter()
    for _ in range(repeats):
        for w in weights:
            product(x, w)
    return (time.perf_counter() - start) / (repeats * len(weights)) * 1e3


def main() -> None:
    args = cpu_arguments(__doc__, RESULTS)
    if not cpu_half.enabled():
        raise SystemExit("the fp16 CPU kernel does not run here (see lcq/kernels/cpu_half.py)")
    rows = []
    for name, (n, k) in SHAPES.items():
        count = max(2, POOL_BYTES // (n * k * 4))
        fp32 = [torch.randn(n, k) / k ** 0.5 for _ in range(count)]
        packed, half = [pack_weight(w) for w in fp32], [w.half() for w in fp32]
        del fp32
        panels = [cpu_half.pair_panels(w) for w in half] if products_available(torch.bfloat16) else []
        byte_rows = [cpu_half.byte_rows(w) for w in half] if products_available(torch.int8) else []
        for m in ROWS:
            x = torch.randn(m, k)
            fp16_ms, fp32_ms = time_ms(cpu_half.half_linear, x, half), time_ms(dense_linear, x, packed)
            row = {"shape": name, "m": m, "fp16_kernel_ms": round(fp16_ms, 3), "onednn_fp32_ms": round(fp32_ms, 3),
                   "speedup": round(fp32_ms / fp16_ms, 2)}
            line = f"{name:<18} M={m:<4} fp16 {fp16_ms:7.3f} ms  oneDNN fp32 {fp32_ms:7.3f} ms  x{fp32_ms / fp16_ms:.2f}"
            if products_available(torch.bfloat16):
                with cpu_products(torch.bfloat16):
                    bf16_ms = time_ms(cpu_half.half_linear, x, half)
                    kept_ms = time_ms(lambda x, pair: cpu_half.half_linear(x, pair[0], panels=pair[1]), x,
                                      list(zip(half, panels)))
                row.update(fp16_kernel_bf16_ms=round(bf16_ms, 3), bf16_speedup=round(fp32_ms / bf16_ms, 2),
                           bf16_panels_ms=round(kept_ms, 3), panels_over_bf16=round(bf16_ms / kept_ms, 2))
                line += (f"  with bf16 products {bf16_ms:7.3f} ms  x{fp32_ms / bf16_ms:.2f}"
                         f"  panels kept {kept_ms:7.3f} ms  x{bf16_ms / kept_ms:.2f}")
            if byte_rows and m <= 2:  # where int8 products read them
                with cpu_products(torch.int8):
                    rows_ms = time_ms(lambda x, pair: cpu_half.half_linear(x, pair[0], byte_rows=pair[1]), x,
                                      list(zip(half, byte_rows)))
                row.update(int8_rows_ms=round(rows_ms, 3), int8_rows_over_fp16=round(fp16_ms / rows_ms, 2))
                line += f"  int8 rows {rows_ms:7.3f} ms  x{fp16_ms / rows_ms:.2f}"
            rows.append(row)
            print(line, flush=True)
    if products_available(torch.int8) and cpu_index.enabled():
        rows += index_rows()
    write_record(args.output, cpu_record(f"python bench/cpu_products.py --threads {args.threads}", args.threads,
                                         load_average_1m=os.getloadavg()[0], rows=rows))


def index_rows() -> list[dict]:
    """LCQ W4 r2 g64 weights: bf16 products, int8 products, and int8 products of weights that keep
    their int8 rows (the same weights, so the last two agree bit for bit from 10 rows)."""
    rows = []
    for name, (n, k) in SHAPES.items():
        if name.startswith("head"):
            continue  # the head is full precision
        layer = random_layer(n, k, 4, 2, 64, seed=0)
        expanding = [cpu_index.IndexWeight(layer) for _ in range(max(2, KEPT_POOL_BYTES // int(n * k * 1.8)))]
        kept = [cpu_index.IndexWeight(layer) for _ in expanding]
        for weight in kept:
            weight.keep_byte_rows()
        for m in (1, 2, 3, 4, 8, 10, 16, 32, 64, 256):
            x = torch.randn(m, k)
            times = {}
            for label, dtype, weights in (("bf16", torch.bfloat16, expanding), ("int8", torch.int8, expanding),
                                          ("int8_kept", torch.int8, kept)):
                with cpu_products(dtype):
                    times[label] = time_ms(lambda x, w: w.linear(x), x, weights)
            rows.append({"shape": name, "m": m, "weights": "lcq-w4r2g64", "bf16_ms": round(times["bf16"], 3),
                         "int8_ms": round(times["int8"], 3), "int8_over_bf16": round(times["bf16"] / times["int8"], 2),
                         "int8_kept_ms": round(times["int8_kept"], 3),
                         "kept_over_int8": round(times["int8"] / times["int8_kept"], 2)})
            print(f"{name:<18} M={m:<4} LCQ W4 r2 g64  bf16 products {times['bf16']:7.3f} ms  int8 {times['int8']:7.3f} ms"
                  f"  x{times['bf16'] / times['int8']:.2f}  int8, rows kept {times['int8_kept']:7.3f} ms"
                  f"  x{times['int8'] / times['int8_kept']:.2f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
