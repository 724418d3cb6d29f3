"""Kernel benchmark: LCQ products against fp16 cuBLAS, unfused dequantize-then-matmul and the
GPU's measured copy bandwidth, on the linear layers of Llama-2-7B and Llama-3-8B.

    python bench/kernels.py                   # the full sweep; results merge into the JSON row by row
    python bench/kernels.py --quick           # a few shapes, M and formats
    python bench/kernels.py --quick --warm 14 # first compile the builds it will tune, 14 processes at once
    python bench/kernels.py --shapes 4096x11008 --bits 2 --ms 1,16
    python bench/kernels.py --explore 200     # time decode tile variants (width, split, depth, warps,
                                              # stages) for 200 s: where the autotuner's configs come from
    python bench/kernels.py --cpu-smoke       # one tiny shape through the Triton interpreter (no GPU)
    python bench/kernels.py --sass            # compile for sm_90 here (no GPU): registers, spills and
                                              # instructions per weight in the inner loop

Shapes are [N, K] (outputs x inputs). Effective bandwidth counts the bytes the product must move:
packed indices, S, B, their scales, V and v_index, the activations read and the outputs written. The
copy bandwidth it is compared with is the faster of a memcpy and a copy kernel (copy_bandwidths).
Every product (ours and cuBLAS) is timed as the engine runs it: replayed from a CUDA graph, L2
flushed before each replay, median of 30 (lcq.kernels.gpu_timing). Each row has the dispatched
path's time (`us`), the fused kernel's (`fused_us`: decode, or the tiled GEMM above 64 rows) with
the config the autotuner chose for it (`fused_config`), and the unfused one's (`unfused_us`: the
dequantize kernel writing fp16 W, then cuBLAS, as dense_product takes it: the whole W below DENSE_SLAB_MIN_M rows,
else a slab of columns at a time; from 65 rows also `whole_us`, the whole W at once, and `slab_us`, slabs of
`slab_columns`: replayed from graphs, neither pays the host's launches, which the engine's eager prompts do). One-row
2-bit rows also time both decode forms, each autotuned: the pair table with its table's kernel (`pair_table_us`) and the FMA form (`direct_us`), and
say which one the dispatch chose (`pair_table`). `fused_us` is the exact form's. Rows of 1-2 rows also time
the products of bytes (`bytes_us`, `bytes_config`, `bytes_frac_of_copy`; lcq.kernels.byte_products), and rows
of up to 32 rows the weights from byte codebooks (`book_us`, `book_config`, `book_speedup` over fp16); where the
dispatch takes one of them (triton_linear.INT8_DEFAULT, BYTE_BOOK_DEFAULT) the row's `kernel` is
`decode-bytes` or `decode-book` and its `us` that form's time.
Writes bench/results/kernels-<gpu>.json (device, date, copy_GBps, versions, rows) and prints a
markdown table. Rows already in the file for other settings are kept, so a sweep can be split
over several runs.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096), (6144, 4096)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024]
BITS = [2, 3, 4]
GROUPS = [128, 64]
RANKS = [1, 2, 4]
QUICK = dict(shapes=[(4096, 11008), (11008, 4096)], ms=[1, 4, 16, 64, 256, 1024], bits=[2, 4], groups=[128],
             ranks=[1, 2])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a subset: 2 shapes, M 1-1024, W2/W4 g128 r1/r2")
    parser.add_argument("--shapes", help="comma-separated NxK, e.g. 4096x11008")
    parser.add_argument("--ms", help="comma-separated M values")
    parser.add_argument("--bits", help="comma-separated bit widths")
    parser.add_argument("--groups", help="comma-separated group sizes")
    parser.add_argument("--ranks", help="comma-separated ranks")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/kernels-<gpu>.json)")
    parser.add_argument("--explore", type=float, metavar="SECONDS", help="time decode variants for this long")
    parser.add_argument("--warm", type=int, metavar="PROCESSES",
                        help="first compile every kernel config the sweep's settings autotune, in this many "
                             "processes at once (the autotuner compiles one at a time)")
    parser.add_argument("--warm-only", action="store_true", help="stop after --warm (for another script's shapes)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="--warm: activations")
    parser.add_argument("--cpu-smoke", action="store_true", help="one tiny shape in the Triton interpreter")
    parser.add_argument("--sass", action="store_true", help="compile for sm_90 without a GPU and count instructions")
    return parser.parse_args()


def ints(text: str | None, default: list[int]) -> list[int]:
    return default if text is None else [int(t) for t in text.split(",")]


def sweep(args: argparse.Namespace) -> dict:
    base = QUICK if args.quick else dict(shapes=SHAPES, ms=MS, bits=BITS, groups=GROUPS, ranks=RANKS)
    shapes = base["shapes"] if args.shapes is None else [tuple(int(v) for v in s.split("x")) for s in
                                                          args.shapes.split(",")]
    return dict(shapes=shapes, ms=ints(args.ms, base["ms"]), bits=ints(args.bits, base["bits"]),
                groups=ints(args.groups, base["groups"]), ranks=ints(args.ranks, base["ranks"]))


def random_layer(n: int, k: int, bits: int, rank: int, group: int, device: str):
    """A packed layer with random indices and codebooks, built on `device`."""
    import torch
    from lcq.format import dual_quantize, encode_linear
    g = torch.Generator(device=device).manual_seed(n * 7 + k + bits * 131 + rank * 17 + group)
    groups = -(-k // group)
    s = torch.rand(n, groups, rank, generator=g, device=device) + 0.1
    b = torch.randn(n, groups, generator=g, device=device)
    v = torch.randn(rank, 1 << bits, generator=g, device=device)
    indices = torch.randint(0, 1 << bits, (n, k), generator=g, device=device)
    return encode_linear(indices, *dual_quantize(s, b), v, in_features=k, bits=bits, group_size=group)


def copy_bandwidths() -> dict[str, float]:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read plus bytes written, two ways: a memcpy
    (in a CUDA graph a memcpy node, which may run on a copy engine) and an elementwise kernel on the
    SMs (torch.neg into another buffer), as the LCQ kernels read memory. The faster is the measured
    bandwidth that products are compared with."""
    import torch
    from lcq.kernels.gpu_timing import graph_time
    src = torch.randn(256 * 1024 * 1024, device="cuda")
    dst = torch.empty_like(src)
    moved = 2 * src.numel() * src.element_size()
    return {"memcpy": moved / (graph_time(lambda: dst.copy_(src)) * 1e-3) / 1e9,
            "kernel": moved / (graph_time(lambda: torch.neg(src, out=dst)) * 1e-3) / 1e9}


def product_bytes(layer, m: int) -> int:
    return layer.nbytes() + 2 * m * (layer.in_features + layer.out_features)


def device_facts() -> dict:
    import torch
    import triton
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        driver = "unknown"
    return {"device": torch.cuda.get_device_name(), "driver": driver,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                         "python": sys.version.split()[0]}}


def row_key(row: dict) -> tuple:
    return (tuple(row["shape"]), row["M"], row["bits"], row["rank"], row["group_size"])


def write_results(path: Path, header: dict, rows: list[dict]) -> None:
    """Merge rows into the file (new rows replace old ones with the same settings), atomically."""
    previous = json.loads(path.read_text())["rows"] if path.exists() else []
    merged = {row_key(r): r for r in previous}
    merged.update({row_key(r): r for r in rows})
    ordered = sorted(merged.values(), key=row_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps({**header, "rows": ordered}, indent=1) + "\n")
    os.replace(temporary, path)


def markdown(rows: list[dict]) -> str:
    lines = ["| shape [N, K] | M | W | g | r | path | us | fused us | unfused us | whole W us | fp16 us | speedup "
             "| GB/s | of copy | bytes us (of copy) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        in_bytes = f"{r['bytes_us']:.1f} ({r['bytes_frac_of_copy']:.2f})" if "bytes_us" in r else "-"
        whole = f"{r['whole_us']:.1f}" if "whole_us" in r else "-"
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['M']} | {r['bits']} | {r['group_size']} | {r['rank']} "
                     f"| {r['kernel']} | {r['us']:.1f} | {r['fused_us']:.1f} | {r['unfused_us']:.1f} | {whole} "
                     f"| {r['fp16_us']:.1f} | {r['speedup']:.2f} | {r['effective_GBps']:.0f} "
                     f"| {r['frac_of_copy']:.2f} | {in_bytes} |")
    return "\n".join(lines)


def check(product, x, dense, tolerance: float = 1e-2) -> None:
    """Refuse to time a path that computes the wrong thing."""
    y = product(x).float()
    ref = (x @ dense.t()).float()
    error = ((y - ref).norm() / ref.norm()).item()
    if not error < tolerance:
        raise RuntimeError(f"{product.__name__} mismatch: relative error {error:.2e} for {tuple(dense.shape)} "
                         f"M={x.shape[0]}")


def run_gpu(args: argparse.Namespace) -> None:
    import torch
    from lcq.format import dequantize
    from lcq.kernels import triton_linear
    from lcq.kernels.gpu_timing import graph_time
    from lcq.kernels.byte_products import ROUNDING_BOUND
    from lcq.kernels.triton_linear import (BYTE_BOOK_MAX_M, DECODE_MAX_M, DENSE_MIN_M, DENSE_SLAB_BYTES, decode,
                                           dense_product, gemm)

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --cpu-smoke to check the script without a GPU")
    plan = sweep(args)
    header = device_facts()
    slug = re.sub(r"[^a-z0-9]+", "-", header["device"].lower()).strip("-")
    out = args.out or Path(__file__).parent / "results" / f"kernels-{slug}.json"
    copies = copy_bandwidths()
    header["copy_GBps"], header["copy_GBps_by_way"] = max(copies.values()), copies
    header["timing"] = "CUDA graph replay, L2 flushed before each, median of 30"
    header["command"] = "python " + " ".join(sys.argv)
    header["dispatch"] = {"decode_max_M": DECODE_MAX_M, "dense_min_M": DENSE_MIN_M}
    print(f"{header['device']} driver {header['driver']}: copy {header['copy_GBps']:.0f} GB/s "
          f"(memcpy {copies['memcpy']:.0f}, kernel {copies['kernel']:.0f})", flush=True)

    def bench(fn) -> float:
        return graph_time(fn) * 1e3

    rows = []
    for n, k in plan["shapes"]:
        dense = torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
        inputs = {m: torch.randn(m, k, device="cuda", dtype=torch.float16) for m in plan["ms"]}
        fp16_us = {m: bench(lambda: torch.nn.functional.linear(inputs[m], dense)) for m in plan["ms"]}
        for bits in plan["bits"]:
            for group in plan["groups"]:
                for rank in plan["ranks"]:
                    layer = random_layer(n, k, bits, rank, group, "cuda")
                    weight = dequantize(layer, torch.float16)

                    def fused(x):  # the exact forms (the byte forms are timed on their own below)
                        return decode(x, layer, int8=False, byte_book=False) if x.shape[0] <= DECODE_MAX_M \
                            else gemm(x, layer)

                    def unfused(x):
                        return dense_product(x, layer)

                    for m in plan["ms"]:
                        x = inputs[m]
                        check(fused, x, weight)
                        check(unfused, x, weight)
                        fused_us, unfused_us = bench(lambda: fused(x)), bench(lambda: unfused(x))
                        tuner = triton_linear._decode_tuned if m <= DECODE_MAX_M else triton_linear._gemm_tuned
                        path = "decode" if m <= DECODE_MAX_M else "gemm" if m < DENSE_MIN_M else "dequant+cublas"
                        us = unfused_us if path == "dequant+cublas" else fused_us
                        gbps = product_bytes(layer, m) / (us * 1e-6) / 1e9
                        rows.append({"shape": [n, k], "M": m, "bits": bits, "rank": rank, "group_size": group,
                                     "kernel": path, "us": us, "fused_us": fused_us, "unfused_us": unfused_us,
                                     "fp16_us": fp16_us[m], "speedup": fp16_us[m] / us,
                                     "effective_GBps": gbps, "frac_of_copy": gbps / header["copy_GBps"],
                                     "bits_per_weight": layer.bits_per_weight(),
                                     "fused_config": str(tuner.best_config)})
                        if m == 1 and bits == 2:  # both one-row forms, the pair table with its own kernel
                            rows[-1].update(pair_table=triton_linear.lut_wins(x, layer),
                                            pair_table_us=bench(lambda: decode(x, layer, lut=True)),
                                            direct_us=bench(lambda: decode(x, layer, lut=False, int8=False)))
                        if m <= 2:  # products of bytes, autotuned on their own

                            def in_bytes(x):
                                return decode(x, layer, int8=True)

                            check(in_bytes, x, weight, ROUNDING_BOUND)
                            bytes_us = bench(lambda: in_bytes(x))
                            rows[-1].update(bytes_us=bytes_us, bytes_config=str(tuner.best_config),
                                            bytes_frac_of_copy=product_bytes(layer, m) / (bytes_us * 1e-6) / 1e9
                                            / header["copy_GBps"])
                        if m <= BYTE_BOOK_MAX_M:  # weights from byte codebooks, on their own

                            def from_byte_books(x):
                                return decode(x, layer, byte_book=True)

                            check(from_byte_books, x, weight, ROUNDING_BOUND)
                            book_us = bench(lambda: from_byte_books(x))
                            rows[-1].update(book_us=book_us, book_config=str(tuner.best_config),
                                            book_speedup=fp16_us[m] / book_us)
                        if m >= DENSE_MIN_M:  # W^T dequantized whole and in slabs, whichever dense_product takes
                            rows[-1].update(whole_us=bench(lambda: dense_product(x, layer, slab_bytes=0)),
                                            slab_us=bench(lambda: dense_product(x, layer, slab_bytes=DENSE_SLAB_BYTES)),
                                            slab_columns=triton_linear.dense_slab_columns(layer, x.dtype,
                                                                                          DENSE_SLAB_BYTES))
                        dispatched(rows[-1], x, bits, header["copy_GBps"], product_bytes(layer, m))
                        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
                    layer = weight = None  # the next layer's memory (not del: the closures above name them)
                    write_results(out, header, rows)
    print(f"\n{header['device']}, driver {header['driver']}, {header['date']}, copy {header['copy_GBps']:.0f} GB/s\n")
    print(markdown(rows))
    print(f"\nwrote {out}")


def dispatched(row: dict, x, bits: int, copy_gbps: float, nbytes: int) -> None:
    """Where lcq_linear takes a byte form for x (products of bytes at 1-2 rows, byte codebooks up to 32, unless
    turned off), the row's path, time and speed are that form's."""
    from lcq.kernels.triton_linear import byte_book_block_m, byte_book_decode, decode_block_m, int8_decode
    m = x.shape[0]
    form = "bytes" if "bytes_us" in row and int8_decode(x, decode_block_m(m), bits) else \
        "book" if "book_us" in row and byte_book_decode(x, byte_book_block_m(m), bits) else None
    if form is not None:
        us = row[f"{form}_us"]
        row.update(kernel=f"decode-{form}", us=us, speedup=row["fp16_us"] / us, effective_GBps=nbytes / us / 1e3,
                   frac_of_copy=nbytes / us / 1e3 / copy_gbps)


def warm_rows(m: int) -> int:
    """A row count that gets the same builds as m: builds depend on the M bucket and on how Triton
    specializes the row count (1, a multiple of 16, or another), not on m itself."""
    from lcq.kernels.triton_linear import DECODE_MAX_M, decode_block_m
    if m <= 2:
        return m
    bucket = decode_block_m(m) if m <= DECODE_MAX_M else 256
    return bucket if m % 16 == 0 else bucket - 1


def warm_jobs(plan: dict, dtype: str) -> list[tuple]:
    """One launch per build the autotuner will ask for: builds depend on the bits, rank, group, dtype,
    config and row count class (warm_rows), not on N and K (the 7B shapes are all multiples of 16, as
    the warm-up's are)."""
    from lcq.kernels import triton_linear as kernels
    jobs = set()
    for bits, rank, group, rows in itertools.product(plan["bits"], plan["ranks"], plan["groups"],
                                                     {warm_rows(m) for m in plan["ms"]}):
        decode = rows <= kernels.DECODE_MAX_M
        configs = kernels._decode_configs_for(kernels.DECODE_CONFIGS, {}, BLOCK_M=kernels.decode_block_m(rows),
                                              GROUPED=False, GROUP=group, SELECT=kernels.uses_select(bits)) \
            if decode else kernels.GEMM_CONFIGS
        configs = [(c, "") for c in configs]
        for form in ("lut",) * (rows == 1 and bits == 2) + ("int8",) * (rows <= 2) \
                + ("byte_book",) * (rows <= kernels.BYTE_BOOK_MAX_M):
            block_m = kernels.byte_book_block_m(rows) if form == "byte_book" else kernels.decode_block_m(rows)
            configs += [(c, form) for c in kernels._decode_configs_for(
                kernels.DECODE_CONFIGS, {}, BLOCK_M=block_m, GROUP=group, SELECT=bits == 2, **{form.upper(): True})]
        for config, form in configs:
            launch = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
            if decode:
                launch["SPLIT_K"] = 2  # a run-time argument: every split runs the same build
            jobs.add((bits, rank, group, rows, dtype, form, tuple(sorted(launch.items()))))
    return sorted(jobs)


def _warm_one(job: tuple) -> str:
    """Compile (and run once) one kernel build in this worker process."""
    import torch
    from lcq.kernels.triton_linear import DECODE_MAX_M, decode, gemm
    bits, rank, group, rows, dtype, form, launch = job
    try:
        layer = random_layer(256, 1024, bits, rank, group, "cuda")
        x = torch.randn(rows, 1024, device="cuda", dtype=getattr(torch, dtype))
        if rows <= DECODE_MAX_M:
            decode(x, layer, dict(launch), lut=form == "lut", int8=form == "int8", byte_book=form == "byte_book")
        else:
            gemm(x, layer, dict(launch))
        torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001 - out of resources: the autotuner skips it too
        return f"W{bits} r{rank} g{group} {rows} rows {form} {dict(launch)}: {type(error).__name__}"
    return ""


def warm_builds(plan: dict, dtype: str, processes: int) -> None:
    """Every build of warm_jobs compiled in `processes` spawned processes, each with its own CUDA context;
    Triton's on-disk cache then hands them to the autotuner."""
    import concurrent.futures
    import multiprocessing
    jobs = warm_jobs(plan, dtype)
    start = time.monotonic()
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        failed = [f for f in pool.map(_warm_one, jobs) if f]
    print(f"warmed {len(jobs) - len(failed)} of {len(jobs)} kernel builds in {processes} processes in "
          f"{time.monotonic() - start:.0f} s" + ("; failed: " + "; ".join(failed) if failed else ""), flush=True)


def explore_variants() -> list[tuple[int, int, int, dict]]:
    """(M, bits, rank, config) in the order to try them: the questions the autotuner's list does not
    answer. At one row, whether tiles 128 deep (which block_k does not choose) or 32 columns per warp
    (more programs still) beat the listed tiles once K is split finely (16-64 ways: ncu on an H200 saw
    the 8-way split run 0.4-0.65 waves); at 16 rows of W4, whether one stage (no cp.async of the V
    gather) is what the tl.dot form needed."""
    variants = []
    for bits, rank in ((2, 2), (2, 1), (4, 1)):
        for (block_n, warps, depth), split in itertools.product(
                ((128, 4, 128), (64, 2, 128), (32, 1, 64), (64, 2, 64), (128, 4, 64)), (16, 32, 64)):
            variants.append((1, bits, rank, dict(BLOCK_N=block_n, SPLIT_K=split, BLOCK_K=depth, num_warps=warps,
                                                 num_stages=2, REDUCE_K=True, PREFETCH=True)))
    for stages, block_n in itertools.product((1, 2), (64, 128)):
        variants.append((16, 4, 1, dict(BLOCK_M=16, BLOCK_N=block_n, SPLIT_K=8, BLOCK_K=64, num_warps=4,
                                        num_stages=stages, PREFETCH=True)))
    return variants


def run_explore(args: argparse.Namespace) -> None:
    """Decode variants on two 7B shapes (g128) until the time is up; the best per case last."""
    import torch
    from lcq.format import dequantize
    from lcq.kernels.gpu_timing import graph_time
    from lcq.kernels.triton_linear import decode

    deadline = time.monotonic() + args.explore
    header = device_facts()
    copies = copy_bandwidths()
    header["copy_GBps"], header["copy_GBps_by_way"] = max(copies.values()), copies
    print(f"copy {header['copy_GBps']:.0f} GB/s (memcpy {copies['memcpy']:.0f}, kernel {copies['kernel']:.0f})")
    shapes = [(4096, 11008), (11008, 4096)]
    layers: dict[tuple, object] = {}
    rows = []
    print("| shape | M | W | r | BLOCK_M | BLOCK_N | SPLIT_K | BLOCK_K | warps | stages | REDUCE_K "
          "| PREFETCH | us | of copy |")
    for m, bits, rank, config in explore_variants():
        for n, k in shapes:
            if time.monotonic() > deadline:
                break
            key = (n, k, bits, rank)
            if key not in layers:
                layer = random_layer(n, k, bits, rank, 128, "cuda")
                layers[key] = (layer, dequantize(layer, torch.float16))
            layer, weight = layers[key]
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            try:
                check(lambda x: decode(x, layer, config), x, weight)
                us = graph_time(lambda: decode(x, layer, config)) * 1e3
            except Exception as error:  # noqa: BLE001 - an out-of-resources variant is a result too
                print(f"| {n}x{k} | {m} | {bits} | {rank} | {config} failed: {type(error).__name__}")
                continue
            frac = product_bytes(layer, m) / (us * 1e-6) / 1e9 / header["copy_GBps"]
            rows.append(dict(shape=[n, k], M=m, bits=bits, rank=rank, config=config, us=us, frac_of_copy=frac))
            c = {"BLOCK_M": m, **config}
            print(f"| {n}x{k} | {m} | {bits} | {rank} | {c['BLOCK_M']} | {c['BLOCK_N']} | {c['SPLIT_K']} "
                  f"| {c['BLOCK_K']} | {c['num_warps']} | {c['num_stages']} "
                  f"| {c.get('REDUCE_K', False)} | {c.get('PREFETCH', False)} | {us:.1f} "
                  f"| {frac:.2f} |", flush=True)
    out = args.out or Path(__file__).parent / "results" / "kernels-explore.json"
    out.write_text(json.dumps({**header, "rows": rows}, indent=1) + "\n")
    print("\nbest per case:")
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (tuple(r["shape"]), r["M"], r["bits"], r["rank"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    for key, r in sorted(best.items()):
        print(f"{key}: {r['us']:.1f} us, {r['frac_of_copy']:.2f} of copy, {r['config']}")


def run_cpu_smoke() -> None:
    """The kernels on one tiny shape in the interpreter: checks the script and kernels, times nothing useful."""
    import torch
    from lcq.format import dequantize
    from lcq.kernels.triton_linear import triton_linear
    layer = random_layer(96, 128, 2, 2, 64, "cpu")
    for m in (1, 33):
        x = torch.randn(m, 128, dtype=torch.float16)
        start = time.perf_counter()
        y = triton_linear(x, layer)
        seconds = time.perf_counter() - start
        ref = x.float() @ dequantize(layer).t()
        error = ((y.float() - ref).norm() / ref.norm()).item()
        print(f"cpu smoke M={m}: relative error {error:.1e}, {seconds:.2f} s in the interpreter")
        if not error < 3e-3:
            raise SystemExit("cpu smoke failed")


SASS_CASES = [  # kernel, bits, rank, group, BLOCK_M, BLOCK_N, num_warps, REDUCE_K, PREFETCH[, compile_kernel's others]
    ("decode", 2, 1, 128, 1, 64, 4, False, False), ("decode", 2, 1, 128, 1, 128, 4, False, False),
    ("decode", 2, 1, 128, 1, 128, 4, False, True), ("decode", 2, 1, 128, 1, 128, 4, True, False),
    ("decode", 2, 1, 128, 1, 128, 4, True, True), ("decode", 2, 4, 128, 1, 128, 4, False, False),
    ("decode", 2, 2, 128, 2, 128, 4, False, False), ("decode", 2, 2, 128, 2, 128, 4, True, False),
    ("decode", 2, 2, 128, 2, 128, 4, True, True), ("decode", 3, 1, 128, 1, 128, 4, False, False),
    ("decode", 3, 1, 128, 1, 128, 4, False, True), ("decode", 4, 1, 128, 1, 128, 4, False, False),
    ("decode", 4, 1, 128, 1, 128, 4, False, True), ("decode", 4, 1, 128, 1, 128, 4, True, False),
    ("decode", 4, 1, 128, 1, 128, 4, True, True), ("decode", 4, 2, 128, 1, 128, 4, False, False),
    ("decode", 4, 2, 128, 1, 128, 4, True, False), ("decode", 4, 2, 128, 1, 128, 4, True, True),
    ("decode", 4, 4, 128, 1, 128, 4, False, False), ("decode", 2, 2, 128, 16, 128, 4, False, False),
    ("decode", 2, 2, 128, 16, 128, 4, False, True), ("decode", 4, 1, 128, 16, 128, 4, False, False),
    ("decode", 4, 1, 128, 16, 128, 4, False, True),
    ("gemm", 2, 2, 128, 64, 128, 4, False, False), ("gemm", 4, 1, 128, 128, 128, 8, False, False),
    ("decode", 2, 1, 128, 1, 64, 2, True, True, {"depth": 128}), ("decode", 2, 2, 128, 1, 64, 2, True, True,
                                                                  {"depth": 128}),
    ("decode", 2, 1, 128, 1, 64, 2, False, True, {"depth": 128, "lut": True}),
    ("decode", 2, 2, 128, 1, 128, 4, False, True, {"depth": 128, "lut": True}),
    ("decode", 2, 4, 128, 1, 64, 2, False, True, {"depth": 128, "lut": True}),
    *[("decode", bits, rank, 128, m, 64, warps, m == 1, True, {"stages": stages, "book": book})
      for bits, rank in ((3, 1), (4, 1), (4, 2), (4, 4)) for m, warps, stages in ((1, 2, 2), (16, 4, 1))
      for book in (False, True)],
    *[("decode", 2, 2, 128, 16, 128, 4, False, True, {"stages": 1, "book": book}) for book in (False, True)],
    *[("decode", bits, rank, 128, m, block_n, warps, True, prefetch, {"depth": 128, "int8": True})
      for bits, rank, m, block_n, warps, prefetch in (
          (2, 2, 1, 128, 4, True), (2, 2, 1, 256, 2, True), (2, 1, 1, 512, 4, True), (2, 2, 1, 512, 4, True),
          (2, 2, 1, 512, 4, False), (2, 4, 1, 512, 4, True), (2, 2, 2, 256, 2, True), (3, 1, 1, 128, 4, True),
          (3, 2, 1, 128, 4, True), (4, 1, 1, 128, 4, True),
          (4, 2, 1, 128, 4, True), (4, 2, 1, 64, 2, True), (4, 2, 2, 128, 4, True))],
    *[("decode", bits, rank, 128, m, block_n, warps, True, prefetch, {"depth": 128, "int8": True, "loop_stages": 3})
      for bits, rank, m, block_n, warps, prefetch in (
          (2, 2, 1, 128, 4, False), (2, 2, 1, 128, 4, True), (2, 2, 1, 256, 2, False), (2, 2, 1, 512, 4, False),
          (2, 2, 2, 256, 2, True), (3, 2, 1, 128, 4, True), (4, 2, 1, 128, 4, True))],
    *[("decode", 2, 2, 128, 1, block_n, warps, True, True, {"depth": 128, "int8": True, "prepared": True})
      for block_n, warps in ((64, 1), (64, 2), (128, 1), (128, 2), (128, 4), (256, 2), (512, 4))],
    *[("decode", bits, rank, 128, m, block_n, warps, False, prefetch, {"depth": 128, "stages": 1, "byte_book": True})
      for bits, rank, m, block_n, warps, prefetch in (
          (2, 2, 16, 128, 4, False), (2, 2, 16, 128, 4, True), (2, 2, 16, 256, 8, True), (2, 2, 64, 128, 4, True),
          (2, 1, 16, 64, 4, True), (3, 2, 16, 128, 4, True), (4, 2, 16, 128, 4, True), (2, 2, 32, 128, 4, True))],
    *[("decode", bits, 2, 128, 16, 128, 4, False, True, {"depth": 128, "stages": 1, "byte_book": True,
                                                         "dtype": "bf16"}) for bits in (2, 4)],
    *[("dequant", bits, 2, 128, 1, 128, 4, False, False) for bits in (2, 3, 4)],
]


def compile_kernel(kernel: str, bits: int, rank: int, group: int, block_m: int, block_n: int, warps: int,
                   reduce_k: bool = False, prefetch: bool = False, stages: int = 2, depth: int | None = None,
                   lut: bool = False, book: bool = False, int8: bool = False, byte_book: bool = False,
                   dtype: str = "fp16", prepared: bool = False, loop_stages: int | None = None,
                   partial_group: bool = False, arch: int = 90, gated: int = 0, normed: bool = False,
                   residual: bool = False):
    """Compile one kernel variant for an NVIDIA GPU of compute capability arch / 10 (sm_90: H100) with triton's
    bundled ptxas; no device needed. dtype: the activations' (fp16, bf16 or fp32); prepared: products of bytes of
    inputs input_bytes() prepared; partial_group: K not a multiple of the group (the tl.dot forms' tiles zero past
    K); gated: the MLP's activation computed from [gate, up] inputs (elementwise.GATED_CODES); normed: the inputs the
    RMSNorm of the residual stream (K = 4096); residual: the output added to the stream. The decode kernel waits on
    dependent launch where the runtime launches it so (from sm_90)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from lcq.kernels import triton_linear as kernels
    fn = {"decode": kernels._decode_kernel, "gemm": kernels._gemm_kernel, "dequant": kernels._dequant_kernel}[kernel]
    pointers = {"x_ptr": "*i32" if prepared else f"*{dtype}", "qw_ptr": "*i32", "sq_ptr": "*i8", "ss_ptr": "*fp16", "bq_ptr": "*i8",
                "bs_ptr": "*fp16", "v_ptr": "*fp32", "vi_ptr": "*i32", "bias_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
                "ws_ptr": "*fp32", "counter_ptr": "*i32", "rows_ptr": "*i32", "experts_ptr": "*i32", "lut_ptr": "*fp32",
                "slots_ptr": "*i32", "norm_ptr": f"*{dtype}", "res_ptr": f"*{dtype}", "partials_ptr": "*fp32",
                "eps": "fp32"}
    constants = dict(BITS=bits, RANK=rank, RANKS=triton.next_power_of_2(rank), GROUP=group, HAS_BIAS=False,
                     SELECT=kernels.uses_select(bits),
                     DOT_IN_FP32=False, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=depth or kernels.block_k(group),
                     PARTIAL_GROUP=partial_group)
    if kernel == "decode":
        constants.update(REDUCE_K=reduce_k, PREFETCH=prefetch, LUT=lut, GROUPED=False, PDL=arch >= 90, BOOK=book,
                         INT8=int8, BYTE_BOOK=byte_book, ASM=True, PREPARED=prepared, STAGES=loop_stages,
                         GATED=gated, NORMED=normed, NORM_PARTS=256 if normed else 1, RESIDUAL=residual)
    elif kernel == "gemm":
        constants.update(GROUP_M=8)
    names = fn.arg_names
    constants = {name: value for name, value in constants.items() if name in names}
    signature = {n: pointers.get(n, "constexpr" if n in constants else "i32") for n in names}
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in names
               if n not in constants and n not in ("M", "SPLIT_K", "eps", "PARTIALS")}
    source = ASTSource(fn=fn, signature=signature, attrs=aligned,
                       constexprs={(names.index(k),): v for k, v in constants.items()})
    options = {"num_warps": warps, "num_stages": stages, **({"launch_pdl": True} if kernel == "decode" and arch >= 90
                                                            else {})}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def inner_loop(sass: str) -> list[str]:
    """Instructions of the longest loop (a backward branch) in a SASS listing."""
    lines = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    address = [int(re.match(r"\s+/\*([0-9a-f]{4})\*/", line).group(1), 16) for line in lines]
    best: list[str] = []
    for here, line in zip(address, lines):
        target = re.search(r"BRA\W.*?0x([0-9a-f]+)", line)
        if target and int(target.group(1), 16) < here:
            body = [x for a, x in zip(address, lines) if int(target.group(1), 16) <= a <= here]
            best = body if len(body) > len(best) else best
    return best


def compile_block_k(group: int) -> int:
    from lcq.kernels.triton_linear import block_k
    return block_k(group)


def sass_of(compiled) -> tuple[str, str]:
    """The SASS listing and the resource usage (registers, stack) of a compiled kernel, by cuobjdump from
    triton's own tools."""
    import tempfile
    import triton
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([tools / "cuobjdump", "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True).stdout
        sass = subprocess.run([tools / "cuobjdump", "-sass", cubin.name], capture_output=True, text=True).stdout
    return sass, usage


def run_sass() -> None:
    """Registers, stack and inner-loop instructions per weight of the sm_90 build of each case (the dequantize
    kernel, one tile a program and no loop: all its instructions)."""
    import collections
    import triton
    print(f"sm_90 builds by Triton {triton.__version__} (layouts differ between versions: docs/kernels.md)")
    print("| kernel | W | r | g | BLOCK_M | BLOCK_N | REDUCE_K | PREFETCH | regs | stack | loop instr / weight "
          "| top opcodes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for case in SASS_CASES:
        kernel, bits, rank, group, block_m, block_n, warps, reduce_k, prefetch = case[:9]
        others = case[9] if len(case) > 9 else {}
        sass, usage = sass_of(compile_kernel(*case[:9], **others))
        regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
        loop = inner_loop(sass) if kernel != "dequant" else \
            [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
        opcodes = collections.Counter(re.sub(r"^\s+/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?", "", line).split()[0]
                                      for line in loop)
        depth = others.get("depth") or compile_block_k(group)
        weights_per_thread = block_n * depth // (32 * warps)  # one K tile per iteration
        top = ", ".join(f"{op} {n}" for op, n in opcodes.most_common(6))
        name = kernel + "".join(f" {key}={value}" for key, value in others.items())
        print(f"| {name} | {bits} | {rank} | {group} | {block_m} | {block_n} | {reduce_k} | {prefetch} | {regs} "
              f"| {stack} | {len(loop) / weights_per_thread:.1f} | {top} |", flush=True)


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    if args.sass:
        run_sass()
    elif args.explore:
        run_explore(args)
    elif args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        run_cpu_smoke()
    else:
        if args.warm:
            warm_builds(sweep(args), args.dtype, args.warm)
        if not args.warm_only:
            run_gpu(args)


if __name__ == "__main__":
    main()
