"""CPU decode products from an LCQ layer's indices (lcq/kernels/cpu_index.c, AVX2 and AVX-512 forms)
against the fp16 copy the engine kept before (lcq/kernels/cpu_half.c), on SmolLM2-135M's linear
shapes at W4 r2, W2 r2 and W4 r4 (g64), weights cycled so that they come from memory.

    python bench/cpu_index.py [--threads 2]
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
from tests.test_kernels import random_layer  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "cpu-index.json"
SHAPES = {"qkv 960x576": (960, 576), "o 576x576": (576, 576), "gate/up 3072x576": (3072, 576),
          "down 576x1536": (576, 1536)}
FORMATS = ((4, 2, 64), (2, 2, 64), (4, 4, 64))  # bits, rank, group size
ROWS = (1, 4)
POOL_BYTES = 256 << 20  # of fp16 weights per shape


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
    args = cpu_arguments(__doc__, RESULTS)
    if not cpu_index.enabled():
        raise SystemExit("the index kernel does not run here (see lcq/kernels/cpu_index.py)")
    forms = {"avx2": False} | ({"avx512": True} if cpu_index.wide_available() else {})
    rows = []
    for name, (n, k) in SHAPES.items():
        for bits, rank, group in FORMATS:
            layers = [random_layer(n, k, bits, rank, group, seed=i) for i in range(max(2, POOL_BYTES // (n * k * 2)))]
            halves = [dequantize(layer).half() for layer in layers]
            indexed = {form: [cpu_index.IndexWeight(layer, wide=wide) for layer in layers] for form, wide in forms.items()}
            for m in ROWS:
                x = torch.randn(m, k)
                row = {"shape": name, "bits": bits, "rank": rank, "group_size": group, "m": m,
                       "fp16_kernel_ms": round(best_ms(lambda w: cpu_half.half_linear(x, w), halves), 4)}
                for form, weights in indexed.items():
                    row[f"index_{form}_ms"] = round(best_ms(lambda w: w.linear(x), weights), 4)
                rows.append(row)
                print(" ".join(f"{key}={value}" for key, value in row.items()), flush=True)
    one = cpu_index.IndexWeight(random_layer(3072, 576, 4, 2, 64, seed=0))
    write_record(args.output, cpu_record(
        f"python bench/cpu_index.py --threads {args.threads}", args.threads, avx512="avx512" in forms,
        bytes_per_weight={"index_w4r2g64": round(one.nbytes / (3072 * 576), 3), "fp16": 2},
        cpu_flags_avx=sorted(f for f in native.cpu_flags() if f.startswith("avx")), rows=rows))

if __name__ == "__main__":
    main()
