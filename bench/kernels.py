"""Kernel benchmark: fused LCQ kernels against fp16 cuBLAS, unfused dequantize-then-matmul and the
GPU's measured copy bandwidth, on the linear layers of Llama-2-7B and Llama-3-8B.

    python bench/kernels.py                   # the full sweep; results merge into the JSON row by row
    python bench/kernels.py --quick           # a few shapes, M and formats
    python bench/kernels.py --shapes 4096x11008 --bits 2 --ms 1,16
    python bench/kernels.py --cpu-smoke       # one tiny shape through the Triton interpreter (no GPU)
    python bench/kernels.py --sass            # compile for sm_90 here (no GPU): registers, spills and
                                              # instructions per weight in the inner loop

Shapes are [N, K] (outputs x inputs). Effective bandwidth counts the bytes the product must move:
packed indices, S, B, their scales, V and v_index, the activations read and the outputs written.
Times are medians of triton.testing.do_bench, which clears the L2 cache before every repetition.
Writes bench/results/kernels-<gpu>.json (device, date, copy_GBps, versions, rows) and prints a
markdown table. Rows already in the file for other settings are kept, so a sweep can be split
over several runs.
"""
from __future__ import annotations

import argparse
import datetime
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
QUICK = dict(shapes=[(4096, 11008), (11008, 4096)], ms=[1, 16, 256], bits=[2, 4], groups=[128], ranks=[1, 2])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a subset: 2 shapes, M 1/16/256, W2/W4 g128 r1/r2")
    parser.add_argument("--shapes", help="comma-separated NxK, e.g. 4096x11008")
    parser.add_argument("--ms", help="comma-separated M values")
    parser.add_argument("--bits", help="comma-separated bit widths")
    parser.add_argument("--groups", help="comma-separated group sizes")
    parser.add_argument("--ranks", help="comma-separated ranks")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/kernels-<gpu>.json)")
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


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read plus bytes written."""
    import torch
    import triton
    src = torch.randn(256 * 1024 * 1024, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


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
    lines = ["| shape [N, K] | M | W | g | r | kernel | us | fp16 us | unfused us | speedup | GB/s | of copy |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['M']} | {r['bits']} | {r['group_size']} | {r['rank']} "
                     f"| {r['kernel']} | {r['us']:.1f} | {r['fp16_us']:.1f} | {r['unfused_us']:.1f} "
                     f"| {r['speedup']:.2f} | {r['effective_GBps']:.0f} | {r['frac_of_copy']:.2f} |")
    return "\n".join(lines)


def check(layer, dense, x) -> None:
    """Refuse to time a kernel that computes the wrong thing."""
    from lcq.kernels import lcq_linear
    y = lcq_linear(x, layer).float()
    ref = (x @ dense.t()).float()
    error = ((y - ref).norm() / ref.norm()).item()
    if not error < 1e-2:
        raise SystemExit(f"kernel mismatch: relative error {error:.2e} for {tuple(dense.shape)} M={x.shape[0]}")


def run_gpu(args: argparse.Namespace) -> None:
    import torch
    import triton
    from lcq.format import dequantize
    from lcq.kernels import lcq_linear
    from lcq.kernels.triton_linear import DECODE_MAX_M

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --cpu-smoke to check the script without a GPU")
    plan = sweep(args)
    header = device_facts()
    slug = re.sub(r"[^a-z0-9]+", "-", header["device"].lower()).strip("-")
    out = args.out or Path(__file__).parent / "results" / f"kernels-{slug}.json"
    header["copy_GBps"] = copy_bandwidth()
    print(f"{header['device']} driver {header['driver']}: copy {header['copy_GBps']:.0f} GB/s", flush=True)

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3

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
                    for m in {plan["ms"][0], plan["ms"][-1]}:  # the decode and the GEMM kernel
                        check(layer, weight, inputs[m])
                    for m in plan["ms"]:
                        x = inputs[m]
                        us = bench(lambda: lcq_linear(x, layer))
                        unfused = bench(lambda: torch.nn.functional.linear(x, dequantize(layer, torch.float16)))
                        gbps = product_bytes(layer, m) / (us * 1e-6) / 1e9
                        rows.append({"shape": [n, k], "M": m, "bits": bits, "rank": rank, "group_size": group,
                                     "kernel": "decode" if m <= DECODE_MAX_M else "gemm", "us": us,
                                     "fp16_us": fp16_us[m], "unfused_us": unfused, "speedup": fp16_us[m] / us,
                                     "effective_GBps": gbps, "frac_of_copy": gbps / header["copy_GBps"],
                                     "bits_per_weight": layer.bits_per_weight()})
                        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
                    del layer, weight
            write_results(out, header, rows)
    print(f"\n{header['device']}, driver {header['driver']}, {header['date']}, copy {header['copy_GBps']:.0f} GB/s\n")
    print(markdown(rows))
    print(f"\nwrote {out}")


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


SASS_CASES = [  # kernel, bits, rank, group, BLOCK_M, BLOCK_N, num_warps
    ("decode", 2, 1, 128, 1, 64, 4), ("decode", 2, 1, 128, 1, 128, 4), ("decode", 2, 4, 128, 1, 128, 4),
    ("decode", 2, 2, 128, 2, 128, 4), ("decode", 3, 1, 128, 1, 128, 4), ("decode", 4, 1, 128, 1, 128, 4),
    ("decode", 4, 4, 128, 1, 128, 4), ("decode", 2, 2, 128, 16, 128, 4), ("decode", 4, 1, 128, 16, 128, 4),
    ("gemm", 2, 2, 128, 64, 128, 4), ("gemm", 4, 1, 128, 128, 128, 8),
]


def compile_sm90(kernel: str, bits: int, rank: int, group: int, block_m: int, block_n: int, warps: int):
    """Compile one kernel variant for an H100 (sm_90) with triton's bundled ptxas; no device needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from lcq.kernels import triton_linear as kernels
    fn = kernels._decode_kernel if kernel == "decode" else kernels._gemm_kernel
    pointers = {"x_ptr": "*fp16", "qw_ptr": "*i32", "sq_ptr": "*i8", "ss_ptr": "*fp16", "bq_ptr": "*i8",
                "bs_ptr": "*fp16", "v_ptr": "*fp16", "vi_ptr": "*i32", "bias_ptr": "*fp16", "out_ptr": "*fp16",
                "ws_ptr": "*fp32", "counter_ptr": "*i32"}
    constants = dict(BITS=bits, RANK=rank, GROUP=group, HAS_BIAS=False, SELECT=kernels.uses_select(bits),
                     DOT_IN_FP32=False, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=kernels.block_k(group))
    constants.update(SPLIT_K=8) if kernel == "decode" else constants.update(GROUP_M=8)
    names = fn.arg_names
    signature = {n: pointers.get(n, "constexpr" if n in constants else "i32") for n in names}
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n not in constants and n != "M"}
    source = ASTSource(fn=fn, signature=signature, attrs=aligned,
                       constexprs={(names.index(k),): v for k, v in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 2})


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


def run_sass() -> None:
    """Registers, stack and inner-loop instructions per weight of the sm_90 build of each case."""
    import collections
    import tempfile
    import triton
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    print("| kernel | W | r | g | BLOCK_M | BLOCK_N | regs | stack | loop instr / weight | top opcodes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for case in SASS_CASES:
        kernel, bits, rank, group, block_m, block_n, warps = case
        compiled = compile_sm90(*case)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([tools / "cuobjdump", "--dump-resource-usage", cubin.name],
                                   capture_output=True, text=True).stdout
            sass = subprocess.run([tools / "cuobjdump", "-sass", cubin.name], capture_output=True, text=True).stdout
        regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
        loop = inner_loop(sass)
        opcodes = collections.Counter(re.sub(r"^\s+/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?", "", line).split()[0]
                                      for line in loop)
        weights_per_thread = block_n * compile_block_k(group) // (32 * warps)  # one K tile per iteration
        top = ", ".join(f"{op} {n}" for op, n in opcodes.most_common(6))
        print(f"| {kernel} | {bits} | {rank} | {group} | {block_m} | {block_n} | {regs} | {stack} "
              f"| {len(loop) / weights_per_thread:.1f} | {top} |", flush=True)


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    if args.sass:
        run_sass()
    elif args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        run_cpu_smoke()
    else:
        run_gpu(args)


if __name__ == "__main__":
    main()
