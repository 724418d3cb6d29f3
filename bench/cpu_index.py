"""CPU decode products from an LCQ layer's indices (lcq/kernels/cpu_index.c, AVX2 and AVX-512 forms, and the
int8 decode forms, which read each group's codebook in bytes: the AVX-512 one where the CPU has int8 products,
else at 2 and 4 bits the AVX2 shuffle form, cpu_index_shuffles.c, which LCQ_CPU_AVX512=0 measures on a CPU with
AVX-512) against the fp16 copy the engine kept before (lcq/kernels/cpu_half.c), on SmolLM2-135M's linear shapes
at W4 r2, W2 r2 and W4 r4 (g64), or Llama 3.2 1B's at W4 r2 g64, W3 r2 g128 and W2 r2 g128 (--shapes
llama32-1b), weights cycled so that they come from memory.

    python bench/cpu_index.py [--threads 2] [--shapes smollm2 | llama32-1b]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.records import cpu_arguments, cpu_record, write_record  # noqa: E402
from lcq.format import dequantize  # noqa: E402
from lcq.kernels import cpu_half, cpu_index, native  # noqa: E402
from lcq.kernels.cpu_matmul import cpu_products  # noqa: E402
from tests.test_kernels import random_layer  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "cpu-index.json"
# name -> (linear shapes (N, K), formats (bits, rank, group size))
MODELS = {"smollm2": ({"qkv 960x576": (960, 576), "o 576x576": (576, 576), "gate/up 3072x576": (3072, 576),
                       "down 576x1536": (576, 1536)}, ((4, 2, 64), (2, 2, 64), (4, 4, 64))),
          "llama32-1b": ({"qkv 3072x2048": (3072, 2048), "o 2048x2048": (2048, 2048),
                          "gate/up 16384x2048": (16384, 2048), "down 2048x8192": (2048, 8192)},
                         ((4, 2, 64), (3, 2, 128), (2, 2, 128)))}
ROWS = (1, 2, 4)
POOL_BYTES = 256 << 20  # of fp16 weights per shape


def options(parser) -> None:
    parser.add_argument("--shapes", choices=MODELS, default="smollm2")


def best_ms(product, weights: list, repeats: int = 8) -> float:
    """The fastest of `repeats` passes over all weights, per product."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for weight in weights:
            product(weight)
        best = min(best, (time.perf_counter() - start) / len(weights))
    return best * 1e3


def main() -> None:
    args = cpu_arguments(__doc__, RESULTS, options)
    if not cpu_index.enabled():
        raise SystemExit("the index kernel does not run here (see lcq/kernels/cpu_index.py)")
    forms = {"avx2": False} | ({"avx512": True} if cpu_index.wide_available() else {})
    shapes, formats = MODELS[args.shapes]
    rows = []
    for name, (n, k) in shapes.items():
        for bits, rank, group in formats:
            layers = [random_layer(n, k, bits, rank, group, seed=i) for i in range(max(2, POOL_BYTES // (n * k * 2)))]
            halves = [dequantize(layer).half() for layer in layers]
            indexed = {form: [cpu_index.IndexWeight(layer, wide=wide) for layer in layers] for form, wide in forms.items()}
            # read by int8 products only: the AVX-512 form's with VNNI, else the AVX2 shuffle form's at 2 and 4 bits
            books = {form: all(weight.keep_books() for weight in weights) for form, weights in indexed.items()}
            for m in ROWS:
                x = torch.randn(m, k)
                row = {"shape": name, "bits": bits, "rank": rank, "group_size": group, "m": m,
                       "fp16_kernel_ms": round(best_ms(lambda w: cpu_half.half_linear(x, w), halves), 4)}
                for form, weights in indexed.items():
                    row[f"index_{form}_ms"] = round(best_ms(lambda w: w.linear(x), weights), 4)
                for form, key in (("avx512", "index_int8_decode_ms"), ("avx2", "index_shuffle_decode_ms")):
                    if books.get(form):
                        with cpu_products(torch.int8):
                            row[key] = round(best_ms(lambda w: w.linear(x), indexed[form]), 4)
                rows.append(row)
                print(" ".join(f"{key}={value}" for key, value in row.items()), flush=True)
    one = cpu_index.IndexWeight(random_layer(3072, 576, 4, 2, 64, seed=0))
    write_record(args.output, cpu_record(
        f"python bench/cpu_index.py --threads {args.threads} --shapes {args.shapes}", args.threads,
        avx512="avx512" in forms,
        bytes_per_weight={"index_w4r2g64": round(one.nbytes / (3072 * 576), 3), "fp16": 2},
        cpu_flags_avx=sorted(f for f in native.cpu_flags() if f.startswith("avx")), rows=rows))

if __name__ == "__main__":
    main()
