"""The GPU kernels' builds for each NVIDIA architecture a user may serve on, compiled here by the installed Triton
and its ptxas (no GPU needed): whether each form the runtime launches by default assembles, with its registers,
stack (spilled registers) and shared memory against what the architecture gives a block. Only sm_90 has run on a
GPU (an H100 and an H200); for the others this is what can be checked without one.

    python bench/gpu_builds.py                # every architecture in ARCHS
    python bench/gpu_builds.py --archs 75,120

Prints a markdown table and writes bench/results/gpu-builds.json (versions, date, rows).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.kernels import compile_kernel, sass_of  # noqa: E402

# compute capability x 10 -> (cards, the most shared memory a block may have, in bytes)
ARCHS = {75: ("T4, RTX 20", 65536), 80: ("A100", 166912), 86: ("A10, RTX 30", 101376),
         89: ("L4, L40S, RTX 40", 101376), 90: ("H100, H200", 232448), 100: ("B200", 232448),
         120: ("RTX 50", 101376)}
HEAD_DIMS = (64, 128, 256)
FP8_ARCH = 89  # an fp8 KV cache (float8 e4m3) from compute capability 8.9 (runtime/config.py)

# The linear forms a decode step or a prompt launches by default (triton_linear.py). The autotuned ones with the
# narrowest config of their lists (triton_configs.py), which the autotuner always has to fall back on: it skips a
# config whose build the GPU cannot hold (OutOfResources) or ptxas refuses. name -> compile_kernel's arguments.
LINEAR_FORMS = {
    "products of bytes, 1 row, W2 r2": (("decode", 2, 2, 128, 1, 64, 2, True, False), dict(depth=128, int8=True)),
    "products of bytes, 2 rows, W3 r2": (("decode", 3, 2, 128, 2, 64, 2, True, False), dict(depth=128, int8=True)),
    # a decode step's of 1-2 rows on the residual stream: QKV and gate/up reading its norm, the down product
    # SiLU(gate) x up and adding to it (o_proj adds alike)
    "products of bytes of the stream's norm, 1 row, W2 r2": (("decode", 2, 2, 128, 1, 64, 2, True, False),
                                                            dict(depth=128, int8=True, normed=True)),
    "products of bytes of SiLU(gate) x up to the stream, 1 row, W2 r2": (("decode", 2, 2, 128, 1, 64, 2, True, False),
                                                                         dict(depth=128, int8=True, gated=1,
                                                                              residual=True)),
    "byte codebooks, 32 rows, W2 r2": (("decode", 2, 2, 128, 32, 64, 4, False, False),
                                       dict(depth=128, stages=1, byte_book=True)),
    "FMA rows, 1 row, W4 r2": (("decode", 4, 2, 128, 1, 64, 2, False, False), dict(stages=2)),
    "tl.dot rows, 64 rows, W3 r2": (("decode", 3, 2, 128, 64, 64, 4, False, False), dict(stages=1)),
    "tiled GEMM, W4 r2": (("gemm", 4, 2, 128, 32, 64, 4), dict(stages=3)),
    "dequantize, W2 r2 (fixed tile)": (("dequant", 2, 2, 128, 1, 128, 4), {}),
    "dequantize, W4 r2 (fixed tile)": (("dequant", 4, 2, 128, 1, 128, 4), {}),
}
ATTENTION_STAGES = (3, 2, 1)  # the runtime's, then fewer where a build does not fit (_launch_within_shared_memory)


def compile_attention(kind: str, head_dim: int, dtype: str, arch: int, stages: int = 3, group: int = 8,
                      cache: str | None = None):
    """The decode or prefill attention kernel (paged_attention.py) as the runtime launches it for queries of dtype
    and heads of head_dim, with `group` query heads per kv head, over a cache of dtype or of `cache` (fp8e4nv)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from lcq.kernels import paged_attention
    fn = {"decode": paged_attention._decode_attention_kernel,
          "prefill": paged_attention._prefill_attention_kernel}[kind]
    constants = dict(GROUP=group, GROUP_ROWS=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
                     BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=16,
                     BLOCK_N=paged_attention.BLOCK_N, BLOCK_M=paged_attention.BLOCK_M,
                     PRECISION="ieee" if dtype == "fp32" else "tf32", WINDOW=0, SOFTCAP=0.0, HAS_SINKS=False,
                     PDL=arch >= 90, SPLIT=True, STAGES=stages)
    names = fn.arg_names
    constants = {name: value for name, value in constants.items() if name in names}
    cache = cache or dtype
    pointers = {"q_ptr": f"*{dtype}", "k_cache_ptr": f"*{cache}", "v_cache_ptr": f"*{cache}", "out_ptr": f"*{dtype}",
                "table_ptr": "*i32", "lens_ptr": "*i32", "starts_ptr": "*i32", "sinks_ptr": "*fp32",
                "ws_ptr": "*fp32", "counter_ptr": "*i32", "scale": "fp32"}
    signature = {n: pointers.get(n, "constexpr" if n in constants else "i32") for n in names}
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in names
               if n not in constants and n not in ("scale", "partition_len", "stride_table")}
    source = ASTSource(fn=fn, signature=signature, attrs=aligned,
                       constexprs={(names.index(k),): v for k, v in constants.items()})
    options = {"num_warps": 4, **({"launch_pdl": True} if kind == "decode" and arch >= 90 else {})}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def compile_rotary_store(head_dim: int, dtype: str, arch: int, cache: str | None = None, heads: int = 32,
                         kv_heads: int = 8):
    """The rotation of queries and keys with the cache write (paged_attention._rotary_store_kv_kernel) as the runtime
    launches it for heads of head_dim, over a cache of dtype or of `cache` (fp8e4nv)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from lcq.kernels import paged_attention
    from lcq.kernels.elementwise import rotary_launch
    fn = paged_attention._rotary_store_kv_kernel
    rotation = rotary_launch(heads + kv_heads, head_dim // 2)
    warps = max(rotation.pop("num_warps"), 4)
    store = dict(ROW=kv_heads * head_dim, BLOCK=triton.next_power_of_2(kv_heads * head_dim),
                 LIMIT=448.0 if cache else 0.0)
    constants = dict(KEYS_AT=heads * head_dim, HEAD_DIM=head_dim, PAIRS=head_dim // 2, INTERLEAVED=False,
                     PDL=arch >= 90, **rotation, **store)
    names = fn.arg_names
    cache = cache or dtype
    pointers = {"qkv_ptr": f"*{dtype}", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "k_cache_ptr": f"*{cache}",
                "v_cache_ptr": f"*{cache}", "slot_ptr": "*i64"}
    signature = {n: pointers.get(n, "constexpr" if n in constants else "i32") for n in names}
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constants.items()})
    options = {"num_warps": warps, **({"launch_pdl": True} if arch >= 90 else {})}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _row(arch: int, kernel: str, dtype: str, build, stages: tuple[int, ...] = (None,)) -> dict:
    """What a build takes: registers, stack (spilled registers) and shared memory (from the cubin, by cuobjdump:
    n_regs and n_spills come only with a loaded kernel), and whether it fits the architecture; with stages, the
    first of them whose build fits (the row then describes that build)."""
    limit = ARCHS[arch][1]
    row = dict(arch=arch, kernel=kernel, dtype=dtype, shared_limit=limit)
    for count in stages:
        try:
            compiled = build(count)
        except Exception as error:  # ptxas or Triton refused the build: the message's last error line
            lines = [line.strip() for line in str(error).splitlines() if "error" in line.lower()]
            return dict(row, built=False, fits=False, error=(lines or [str(error).strip().splitlines()[-1]])[-1][:300])
        registers, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", sass_of(compiled)[1]).groups())
        shared = compiled.metadata.shared
        row = dict(row, built=True, registers=registers, stack=stack, shared=shared, fits=shared <= limit,
                   **({"stages": count} if count else {}))
        if row["fits"]:
            break
    return row


def builds(archs: list[int], dtypes: tuple[str, ...] = ("fp16", "bf16", "fp32"),
           head_dims: tuple[int, ...] = HEAD_DIMS) -> list[dict]:
    """Every default linear form, both attention kernels and the rotation with the cache write, for each architecture
    and activation dtype (not byte
    codebooks for fp32, which the runtime never takes for them, nor for bf16 before sm_80:
    triton_linear._byte_book_dtype); from FP8_ARCH the attention kernels over an fp8 cache too, at head 128."""
    rows = []
    for arch in archs:
        for dtype in dtypes:
            for name, (args, options) in LINEAR_FORMS.items():
                if not (options.get("byte_book") and (dtype == "fp32" or dtype == "bf16" and arch < 80)):
                    rows.append(_row(arch, name, dtype,
                                     lambda _: compile_kernel(*args, **options, dtype=dtype, arch=arch)))
            for kind in ("decode", "prefill"):
                for head_dim in head_dims:
                    rows.append(_row(arch, f"{kind} attention, head {head_dim}", dtype,
                                     lambda count: compile_attention(kind, head_dim, dtype, arch, count),
                                     ATTENTION_STAGES))
                if arch >= FP8_ARCH and dtype != "fp32" and 128 in head_dims:
                    rows.append(_row(arch, f"{kind} attention, head 128, fp8 cache", dtype,
                                     lambda count: compile_attention(kind, 128, dtype, arch, count, cache="fp8e4nv"),
                                     ATTENTION_STAGES))
            for head_dim in head_dims:
                rows.append(_row(arch, f"rotation and cache write, head {head_dim}", dtype,
                                 lambda _: compile_rotary_store(head_dim, dtype, arch)))
            if arch >= FP8_ARCH and dtype != "fp32" and 128 in head_dims:
                rows.append(_row(arch, "rotation and cache write, head 128, fp8 cache", dtype,
                                 lambda _: compile_rotary_store(128, dtype, arch, cache="fp8e4nv")))
    return rows


def _cell(row: dict) -> str:
    if not row["built"]:
        return "refused"
    spilled = f" +{row['stack']} B stack" if row["stack"] else ""
    fits = "" if row["fits"] else " OVER"
    stages = f", {row['stages']} stage{'s' if row['stages'] > 1 else ''}" if "stages" in row else ""
    return f"{row['registers']} regs{spilled}, {row['shared'] / 1024:.0f} KB{stages}{fits}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(map(str, ARCHS)), help="comma-separated, e.g. 75,86,120")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu-builds.json")
    args = parser.parse_args()
    import torch
    import triton
    archs = [int(a) for a in args.archs.split(",")]
    rows = builds(archs)
    print(f"Builds by Triton {triton.__version__}: registers, stack, shared memory (OVER: more than the "
          f"architecture gives a block)\n")
    print("| kernel | dtype | " + " | ".join(f"sm_{a} ({ARCHS[a][0]})" for a in archs) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in archs) + " |")
    cells = {(r["kernel"], r["dtype"], r["arch"]): r for r in rows}
    for kernel, dtype in dict.fromkeys((r["kernel"], r["dtype"]) for r in rows):
        line = [_cell(cells[kernel, dtype, a]) if (kernel, dtype, a) in cells else "-" for a in archs]
        print(f"| {kernel} | {dtype} | " + " | ".join(line) + " |")
    for row in rows:
        if not row["built"]:
            print(f"sm_{row['arch']} {row['kernel']} {row['dtype']}: {row['error']}")
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command=" ".join(["python", "bench/gpu_builds.py", *sys.argv[1:]]),
                  versions=dict(triton=triton.__version__, torch=torch.__version__, python=platform.python_version()),
                  machine=platform.machine(), rows=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
