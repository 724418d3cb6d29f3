"""CPU products on AMX tiles (lcq/kernels/cpu_amx.c) against the register tiles (lcq/kernels/cpu_panels.c):
int8 products of LCQ layers at SmolLM2-135M's or Llama 3.2 1B's linear shapes, W4 r2 g64 with their int8 rows
kept (the engine's default where it fits), at 16 to 1024 rows (prefill, decode steps of many sequences), which
must give the same values bit for bit, and at 64 to 1024 rows the same weights on bf16 tiles (byte_pair_rows:
the int8 form's weight values and the activations rounded to bf16) against the int8 tiles, and those bf16 tiles
with all rows through one panel of weights at a time against groups of panels a block of rows at a time
(paired_group_kb; gate/up also with SwiGLU), bit for bit; and bf16 products of
the fp16 head with its panels kept, at 3 to 256
rows, which sum in another order (within 1e-5); and bf16 products of the same shapes' fp16 weights
expanded per call (a full-precision model's layers) at 10 to 256 rows. The two forms alternate in one
process, weights cycled so that they come from memory.

    python bench/cpu_amx.py [--threads 2] [--shapes smollm2 | llama32-1b]
"""
from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.cpu_index import MODELS, best_ms  # noqa: E402
from bench.records import cpu_arguments, cpu_record, write_record  # noqa: E402
from lcq.kernels import cpu_half, cpu_index  # noqa: E402
from lcq.kernels.cpu_matmul import (amx_active, amx_tiles, byte_pair_rows, cpu_products,  # noqa: E402
                                    paired_group_kb, products_available)
from tests.test_kernels import random_layer  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "cpu-amx.json"
ROWS = (16, 32, 64, 256, 1024)
PAIR_ROWS = (64, 128, 256, 1024)  # int8 weights on bf16 tiles (byte_pair_rows) against the int8 tiles
GROUP_ROWS = (1024,)  # those bf16 tiles a panel at a time against groups of panels (paired_group_kb)
HALF_ROWS = (10, 64, 256)  # bf16 blocked products of fp16 weights expanded per call (full-precision layers)
HEADS = {"smollm2": (49152, 576), "llama32-1b": (128256, 2048)}  # vocabulary x hidden
HEAD_ROWS = (3, 4, 5, 8, 16, 64, 256)  # bf16 products of kept panels: the register tiles below 5 rows
POOL_BYTES = 128 << 20  # of kept int8 rows per shape
ROUNDS = 2


def options(parser) -> None:
    parser.add_argument("--shapes", choices=MODELS, default="smollm2")


FORMS = {  # name: the context in which products take that form
    "registers": lambda: amx_tiles(False),
    "AMX": lambda: amx_tiles(True),
    "int8 tiles": lambda: _nested(amx_tiles(True), byte_pair_rows(1 << 30)),
    "bf16 tiles": lambda: _nested(amx_tiles(True), byte_pair_rows(1)),
    "bf16 tiles, a panel at a time": lambda: _nested(amx_tiles(True), byte_pair_rows(1), paired_group_kb(0)),
}


@contextlib.contextmanager
def _nested(*contexts):
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


def compare(name: str, products: list, x: torch.Tensor, dtype: torch.dtype, forms: tuple[str, str],
            tolerance: float) -> dict:
    """One row: each product (a callable of x) timed in two forms (FORMS), alternating; their outputs must
    be equal (tolerance 0) or within `tolerance` of each other, relative."""
    m, n, k = x.shape[0], products[0](x).shape[1], x.shape[1]
    with cpu_products(dtype):
        outputs = []
        for form in forms:
            with FORMS[form]():
                outputs.append(products[0](x))
        difference = ((outputs[1] - outputs[0]).norm() / outputs[0].norm()).item()
        if (tolerance == 0 and not torch.equal(*outputs)) or difference > max(tolerance, 1e-12):
            raise SystemExit(f"{name} at {m} rows: {forms[0]} and {forms[1]} differ ({difference:.1e})")
        times = {form: float("inf") for form in forms}
        for _ in range(ROUNDS):
            for form in forms:
                with FORMS[form]():
                    times[form] = min(times[form], best_ms(lambda product: product(x), products, repeats=4))
    gflops = {form: 2 * m * n * k / (ms * 1e6) for form, ms in times.items()}
    row = dict(shape=name, operands=str(dtype).removeprefix("torch."), m=m, before=forms[0], after=forms[1],
               before_ms=round(times[forms[0]], 4), after_ms=round(times[forms[1]], 4),
               before_GFLOPs=round(gflops[forms[0]]), after_GFLOPs=round(gflops[forms[1]]),
               speedup=round(times[forms[0]] / times[forms[1]], 2), relative_difference=float(f"{difference:.2g}"))
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
        rows += [compare(name, products, torch.randn(m, k), torch.int8, ("registers", "int8 tiles"), 0)
                 for m in ROWS]
        rows += [compare(name, products, torch.randn(m, k), torch.int8, ("int8 tiles", "bf16 tiles"), 2e-2)
                 for m in PAIR_ROWS]
        rows += [compare(name, products, torch.randn(m, k), torch.int8, ("bf16 tiles, a panel at a time",
                                                                         "bf16 tiles"), 0)
                 for m in GROUP_ROWS]
        if name.startswith("gate/up"):  # the MLP's product as the engine takes it: silu(gate) * up
            swiglu = [functools.partial(weight.linear, swiglu=True) for weight in weights]
            rows += [compare(f"{name} SwiGLU", swiglu, torch.randn(m, k), torch.int8,
                             ("bf16 tiles, a panel at a time", "bf16 tiles"), 0) for m in GROUP_ROWS]
        halves = [torch.randn(n, k).half() for _ in range(max(2, POOL_BYTES // (2 * n * k)))]
        products = [functools.partial(cpu_half.half_linear, weight=weight) for weight in halves]
        rows += [compare(f"{name} fp16", products, torch.randn(m, k), torch.bfloat16, ("registers", "AMX"), 1e-5)
                 for m in HALF_ROWS]
    n, k = HEADS[args.shapes]
    weights = [torch.randn(n, k).half() for _ in range(max(2, POOL_BYTES // (2 * n * k)))]
    products = [functools.partial(cpu_half.half_linear, weight=weight, panels=cpu_half.pair_panels(weight))
                for weight in weights]
    rows += [compare(f"head {n}x{k}", products, torch.randn(m, k), torch.bfloat16, ("registers", "AMX"), 1e-5)
             for m in HEAD_ROWS]
    write_record(args.output, cpu_record(" ".join(["python", *sys.argv]), args.threads, shapes=args.shapes,
                                         format="LCQ layers W4 r2 g64, int8 rows kept; fp16 layers "
                                                "expanded per call; the head fp16, bf16 panels kept", rows=rows))
    print("| shape | operands | rows | forms | ms | GFLOP/s | speedup |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['operands']} | {r['m']} | {r['before']} -> {r['after']} | {r['before_ms']} -> "
              f"{r['after_ms']} | {r['before_GFLOPs']} -> {r['after_GFLOPs']} | {r['speedup']}x |")


if __name__ == "__main__":
    main()
