"""What the GPU's byte forms cost in quality: perplexity of an LCQ checkpoint with every packed layer's
products computed as a form of the decode kernel computes them, against the same checkpoint's exact products, on
held-out Shakespeare (lcq.kernels.byte_products, which the kernel's tests hold it to):
- products of bytes (INT8, 1-2 rows): the inputs of each run and each column's codebook of a group rounded to
  bytes; a run is one index word's inputs (16, 8 at 4 bits) in the kernel, longer runs are measured to show
  what sharing a scale over more inputs would cost;
- byte codebooks (BYTE_BOOK, 1-32 rows): the codebooks alone rounded, to 127 levels either side of their
  midrange;
- with --fp8, what a prefill through fp8 tensor cores would cost (not a kernel of this project: measured to
  decide against it): weights and inputs in float8 e4m3, a scale per output column and one per input row.

Every product of every token takes the form here, prefill included, where a served sequence takes it only in
the decode steps it serves, with LCQ_INT8_DECODE=1 or LCQ_BYTE_BOOK=1: an upper bound on the cost.

    python bench/byte_products_quality.py --checkpoint FOLDER [--input-runs word,128] [--fp8] [--max-tokens 4096]
        [--threads 2]

Each row replaces the results file's row of the same checkpoint (by name) and form and keeps the others, so that
checkpoints of several widths and forms measured in several runs are compared in one file.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.records import cpu_arguments, cpu_record, write_record  # noqa: E402
from lcq.format import CheckpointReader, PackedLinear, dequantize  # noqa: E402
from lcq.kernels.byte_products import byte_book_weights, byte_products_reference  # noqa: E402
from lcq.quantizer.evaluate import perplexity  # noqa: E402
from lcq.quantizer.reference import load_reference_model  # noqa: E402
from lcq.quantizer.texts import evaluation_text  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "byte-products-quality-cpu.json"


def in_bytes(module: torch.nn.Module, layer: PackedLinear, run: int | None) -> None:
    """The module's forward becomes the products of bytes of its packed layer."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return byte_products_reference(rows, layer, run).to(x.dtype).reshape(*x.shape[:-1], layer.out_features)
    module.forward = forward


def with_byte_book(module: torch.nn.Module, layer: PackedLinear) -> None:
    """The module's forward multiplies by its packed layer's weights from byte codebooks."""
    weight = byte_book_weights(layer).float()
    bias = None if layer.bias is None else layer.bias.float()
    module.forward = lambda x: torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def in_fp8_rows(module: torch.nn.Module, layer: PackedLinear) -> None:
    """The module's forward takes the product a prefill through fp8 tensor cores would (torch._scaled_mm's rowwise
    form): the exact weights and the inputs rounded to float8 e4m3, with one scale per output column and one per
    input row, fp32 sums."""
    def to_e4m3(values: torch.Tensor) -> torch.Tensor:
        scale = values.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / torch.finfo(torch.float8_e4m3fn).max
        return (values / scale).to(torch.float8_e4m3fn).float() * scale

    weight = to_e4m3(dequantize(layer).float())
    bias = None if layer.bias is None else layer.bias.float()
    module.forward = lambda x: torch.nn.functional.linear(to_e4m3(x.float()), weight, bias).to(x.dtype)


def form_of(row: dict) -> tuple:
    """What a row measured: a later row of the same replaces it."""
    return row["checkpoint"], row["products"], row.get("input_run", "word" if row["products"] == "bytes" else None)


def main() -> None:
    def more(parser):
        parser.add_argument("--checkpoint", required=True, help="an LCQ checkpoint folder")
        parser.add_argument("--max-tokens", type=int, default=4096, help="evaluated tokens (windows of 512)")
        parser.add_argument("--input-runs", default="word",
                            help="comma-separated: inputs sharing one scale, 'word' for one index word's (16, 8 at "
                                 "4 bits, the one- and two-row kernel's) or a count dividing the group")
        parser.add_argument("--fp8", action="store_true",
                            help="also the fp8 tensor cores' rowwise form (weights and inputs in e4m3), for prefill")
    args = cpu_arguments(__doc__, RESULTS, more)
    text = evaluation_text()
    reader = CheckpointReader(args.checkpoint)
    name = Path(args.checkpoint).name
    settings = json.loads((Path(args.checkpoint) / "config.json").read_text()).get("quantization_config", {})
    rows = json.loads(args.output.read_text())["rows"] if args.output.is_file() else []
    command = "python bench/byte_products_quality.py " + " ".join(sys.argv[1:])
    runs = [None if run == "word" else int(run) for run in args.input_runs.split(",") if run]
    forms = [("exact", None)] + [("bytes", run) for run in runs] + [("byte-book", None)] \
        + [("fp8-rowwise", None)] * args.fp8
    for products, setting in forms:
        model = load_reference_model(args.checkpoint)
        for prefix in reader.quantized_prefixes() if products != "exact" else ():
            module, layer = model.get_submodule(prefix), reader.linear(prefix)
            if products == "bytes":
                in_bytes(module, layer, setting)
            elif products == "byte-book":
                with_byte_book(module, layer)
            else:
                in_fp8_rows(module, layer)
        start = time.perf_counter()
        value = perplexity(args.checkpoint, text, max_tokens=args.max_tokens, model=model)
        rows.append({"checkpoint": name, "command": command, "quantization": settings, "max_tokens": args.max_tokens,
                     "products": products, "perplexity": round(value, 4),
                     "seconds": round(time.perf_counter() - start, 1)})
        if products == "bytes":
            rows[-1]["input_run"] = setting or "word"
        if products == "exact":
            exact = value
        else:
            rows[-1]["relative_to_exact"] = round(value / exact, 5)
        print({key: rows[-1].get(key) for key in ("checkpoint", "products", "input_run", "perplexity", "seconds")},
              flush=True)
        rows = [row for row in rows[:-1] if form_of(row) != form_of(rows[-1])] + rows[-1:]
    write_record(args.output, cpu_record(command, args.threads, rows=rows))

if __name__ == "__main__":
    main()
