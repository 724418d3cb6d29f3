"""Where a one-row product's time goes beside its bytes: how the kernel benchmark's timing compares with
the floor any kernel has at that size and with the product's time inside a chain of products.

    python bench/product_floor.py                      # W2 r2 g128, M = 1, three Llama-2-7B shapes
    python bench/product_floor.py --shapes 4096x11008 --bits 2,4 --ms 1,2

On the H100 the one-row 2-bit products took 12.4 us at 4096x4096 and 16.4 us at 11008x4096 (bench/kernels.py),
so a line through them gives ~10 us a product whatever its size, and fp16 cuBLAS's times ~9 us: most of the
gap to the copy bandwidth is a fixed cost, in the kernels or in the timing. Per shape this times, each a
CUDA graph replay, median of 30:
- `empty_us`: a graph of one empty kernel (the floor of a single replay between two events);
- `read_us`, `read_clean_us`: the fastest of a few plain streaming-read kernels over as many bytes as the packed
  layer, after the L2 is flushed by writing (as the autotuner times, lcq.kernels.gpu_timing) and by reading;
- `us`, `clean_us`: the product as lcq_linear dispatches it (its kernel and form), flushed either way;
- `chained_us`: per product, a graph of CHAIN products back to back, each with its own layer (CHAIN x the bytes,
  more than the L2 holds), flushed by reading: a product as a decode step runs it;
- `prepared_us`, `prepared_chained_us`: where the dispatch takes products of bytes, the same with the inputs rounded
  to bytes by a kernel of their own first (LCQ_INT8_INPUTS=1, triton_linear.input_bytes), its launch included;
- `fp16_us`, `fp16_chained_us`: torch's fp16 product, single and chained alike.
Writes bench/results/product-floor-<gpu>.json (device, date, versions, copy_GBps, rows).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.kernels import copy_bandwidths, device_facts, ints, product_bytes, random_layer  # noqa: E402
from bench.records import write_record  # noqa: E402
from lcq.kernels.gpu_timing import graph_time  # noqa: E402

CHAIN = 8
# (int32 words a program reads, words a load step, warps): 16 to 256 KB a program, 8 to 16 words a thread a step
READ_CONFIGS = [(4096, 1024, 4), (16384, 2048, 4), (16384, 4096, 8), (65536, 4096, 8)]


@triton.jit
def _empty_kernel(out_ptr):
    pass


@triton.jit
def _read_kernel(src_ptr, out_ptr, n, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Sums CHUNK words a program, its loads unrolled so that they are in flight together."""
    start = tl.program_id(0).to(tl.int64) * CHUNK
    total = tl.zeros((BLOCK,), dtype=tl.int32)
    for step in tl.static_range(CHUNK // BLOCK):
        offs = start + step * BLOCK + tl.arange(0, BLOCK)
        total += tl.load(src_ptr + offs, mask=offs < n, other=0, eviction_policy="evict_first")
    tl.store(out_ptr + tl.program_id(0), tl.sum(total))


def read_us(nbytes: int, flush: str) -> float:
    """The fastest READ_CONFIGS kernel reading nbytes, microseconds."""
    words = torch.ones(triton.cdiv(nbytes, 256) * 64, dtype=torch.int32, device="cuda")  # whole 16-byte loads
    best = float("inf")
    for chunk, block, warps in READ_CONFIGS:
        programs = triton.cdiv(words.numel(), chunk)
        out = torch.empty(programs, dtype=torch.int32, device="cuda")

        def read() -> None:
            _read_kernel[(programs,)](words, out, words.numel(), CHUNK=chunk, BLOCK=block, num_warps=warps)

        best = min(best, graph_time(read, flush=flush) * 1e3)
        if out.sum().item() != words.numel():
            raise RuntimeError(f"the read kernel {chunk, block, warps} summed {out.sum().item()} words of "
                               f"{words.numel()}")
    return best


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096", help="comma-separated NxK")
    parser.add_argument("--bits", default="2", help="comma-separated bit widths")
    parser.add_argument("--ms", default="1", help="comma-separated row counts")
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/product-floor-<gpu>.json)")
    return parser.parse_args()


def main() -> None:
    from lcq.kernels.linear import lcq_linear
    from lcq.kernels.triton_linear import decode, decode_block_m, int8_decode

    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    header = device_facts()
    slug = re.sub(r"[^a-z0-9]+", "-", header["device"].lower()).strip("-")
    out = args.out or ROOT / "bench" / "results" / f"product-floor-{slug}.json"
    header["copy_GBps"] = max(copy_bandwidths().values())
    header["command"] = "python " + " ".join(sys.argv)
    empty = torch.empty(1, device="cuda")
    empty_us = graph_time(lambda: _empty_kernel[(1,)](empty), flush="read") * 1e3
    print(f"{header['device']}: copy {header['copy_GBps']:.0f} GB/s, an empty kernel's replay {empty_us:.1f} us")
    print("| [N, K] | M | bits | MB | empty | read | read, clean L2 | product | clean L2 | chained | prepared, chained "
          "| fp16 | fp16 chained |\n|" + " --- |" * 13, flush=True)
    rows = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5 for _ in range(CHAIN)]
        for bits in ints(args.bits, []):
            layers = [random_layer(n, k, bits, args.rank, args.group_size, "cuda") for _ in range(CHAIN)]
            for m in ints(args.ms, []):
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                nbytes = product_bytes(layers[0], m)

                def chain() -> None:
                    for layer in layers:
                        lcq_linear(x, layer)

                def fp16_chain() -> None:
                    for weight in dense:
                        torch.nn.functional.linear(x, weight)

                def prepared_chain() -> None:
                    for layer in layers:
                        decode(x, layer, int8=True, prepared=True)

                row = {"shape": [n, k], "M": m, "bits": bits, "rank": args.rank, "group_size": args.group_size,
                       "bytes": nbytes, "empty_us": empty_us,
                       "read_us": read_us(nbytes, "write"), "read_clean_us": read_us(nbytes, "read"),
                       "us": graph_time(lambda: lcq_linear(x, layers[0])) * 1e3,
                       "clean_us": graph_time(lambda: lcq_linear(x, layers[0]), flush="read") * 1e3,
                       "chained_us": graph_time(chain, flush="read") * 1e3 / CHAIN,
                       "fp16_us": graph_time(lambda: torch.nn.functional.linear(x, dense[0])) * 1e3,
                       "fp16_chained_us": graph_time(fp16_chain, flush="read") * 1e3 / CHAIN}
                if int8_decode(x, decode_block_m(m), bits):
                    row["prepared_us"] = graph_time(lambda: decode(x, layers[0], int8=True, prepared=True),
                                                    flush="read") * 1e3
                    row["prepared_chained_us"] = graph_time(prepared_chain, flush="read") * 1e3 / CHAIN
                row["chained_frac_of_copy"] = nbytes / row["chained_us"] / 1e3 / header["copy_GBps"]
                rows.append(row)
                print(f"| {n}x{k} | {m} | {bits} | {nbytes / 1e6:.1f} | {empty_us:.1f} | {row['read_us']:.1f} "
                      f"| {row['read_clean_us']:.1f} | {row['us']:.1f} | {row['clean_us']:.1f} "
                      f"| {row['chained_us']:.1f} ({row['chained_frac_of_copy']:.2f} of copy) "
                      f"| {row.get('prepared_chained_us', float('nan')):.1f} | {row['fp16_us']:.1f} "
                      f"| {row['fp16_chained_us']:.1f} |", flush=True)
        write_record(out, {**header, "rows": rows})


if __name__ == "__main__":
    main()
