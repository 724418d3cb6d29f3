"""One launch of the decode kernel at one row, fenced for Nsight Compute: where a tile of the one-row
product waits (docs/kernels.md: on the H200 it is bound by latency chains, not issue slots).

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --section SchedulerStats python bench/profile_one_row.py [--shape 4096x11008] [--rank 2] [--lut]

The product runs with a fixed config (default: the tile the autotuner chose on the H200 for 4096x11008 W2 r2,
128 columns per 4 warps, 128 deep, REDUCE_K, PREFETCH, 8 slices) a few times to compile and warm, then once
between cudaProfilerStart and cudaProfilerStop, so that ncu replays that launch alone. Without a GPU it runs the
same steps in the Triton interpreter on a small shape and profiles nothing (a check of the script).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_CONFIG = {"BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 8, "REDUCE_K": True, "PREFETCH": True,
                  "num_warps": 4, "num_stages": 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4096x11008", help="N x K of the layer")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--config", type=json.loads, default=DEFAULT_CONFIG, help="decode config, JSON")
    parser.add_argument("--lut", action="store_true", help="the pair table's form (one row at 2 bits)")
    args = parser.parse_args()

    from bench.kernels import random_layer
    from lcq.format import dequantize
    from lcq.kernels.triton_linear import decode

    cuda = torch.cuda.is_available()
    n, k = (int(v) for v in args.shape.split("x")) if cuda else (96, 256)
    config = args.config if cuda else {**args.config, "BLOCK_N": 32, "SPLIT_K": 2}
    layer = random_layer(n, k, args.bits, args.rank, args.group, "cuda" if cuda else "cpu")
    x = torch.randn(1, k, dtype=torch.float16, device="cuda" if cuda else "cpu")
    for _ in range(3):  # compile, then warm
        y = decode(x, layer, config, lut=args.lut)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        y = decode(x, layer, config, lut=args.lut)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    expected = x.double() @ dequantize(layer).double().t()
    error = ((y.double() - expected).norm() / expected.norm()).item()
    print(f"one launch of {n}x{k} W{args.bits} r{args.rank} g{args.group} {config}"
          f"{' (pair table)' if args.lut else ''}: relative error {error:.1e} against the dequantized weight")


if __name__ == "__main__":
    main()
