"""What the GPU's products of bytes cost in quality: perplexity of an LCQ checkpoint with every packed
layer's products computed as the decode kernel's INT8 form computes them (the inputs of each index word and each
column's codebook of a group rounded to bytes; lcq.kernels.byte_products, which the kernel's tests hold it to), against
the same checkpoint's exact products, on held-out Shakespeare.

Every product of every token takes the bytes here, prefill included, where a served sequence takes them only in
decode steps of one or two sequences under LCQ_INT8_DECODE=1: an upper bound on the cost.

    python bench/byte_products_quality.py --checkpoint FOLDER [--max-tokens 4096] [--threads 2]

Each run's two rows replace those of a checkpoint of the same name in the results file and keep the others,
so that checkpoints of several widths are compared in one file.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.records import cpu_arguments, cpu_record, write_record  # noqa: E402
from lcq.format import CheckpointReader, PackedLinear  # noqa: E402
from lcq.kernels.byte_products import byte_products_reference  # noqa: E402
from lcq.quantizer.evaluate import perplexity  # noqa: E402
from lcq.quantizer.reference import load_reference_model  # noqa: E402
from lcq.quantizer.texts import evaluation_text  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "byte-products-quality-cpu.json"


def in_bytes(module: torch.nn.Module, layer: PackedLinear) -> None:
    """The module's forward becomes the products of bytes of its packed layer."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return byte_products_reference(rows, layer).to(x.dtype).reshape(*x.shape[:-1], layer.out_features)
    module.forward = forward


def main() -> None:
    def more(parser):
        parser.add_argument("--checkpoint", required=True, help="an LCQ checkpoint folder")
        parser.add_argument("--max-tokens", type=int, default=4096, help="evaluated tokens (windows of 512)")
    args = cpu_arguments(__doc__, RESULTS, more)
    text = evaluation_text()
    reader = CheckpointReader(args.checkpoint)
    name = Path(args.checkpoint).name
    settings = json.loads((Path(args.checkpoint) / "config.json").read_text()).get("quantization_config", {})
    earlier = json.loads(args.output.read_text())["rows"] if args.output.is_file() else []
    rows = [row for row in earlier if row.get("checkpoint") != name]
    command = "python bench/byte_products_quality.py " + " ".join(sys.argv[1:])
    for products in ("exact", "bytes"):
        model = load_reference_model(args.checkpoint)
        if products == "bytes":
            for prefix in reader.quantized_prefixes():
                in_bytes(model.get_submodule(prefix), reader.linear(prefix))
        start = time.perf_counter()
        value = perplexity(args.checkpoint, text, max_tokens=args.max_tokens, model=model)
        rows.append({"checkpoint": name, "command": command, "quantization": settings, "max_tokens": args.max_tokens,
                     "products": products, "perplexity": round(value, 4),
                     "seconds": round(time.perf_counter() - start, 1)})
        print({key: rows[-1][key] for key in ("checkpoint", "products", "perplexity", "seconds")}, flush=True)
    rows[-1]["relative_to_exact"] = round(rows[-1]["perplexity"] / rows[-2]["perplexity"], 5)
    write_record(args.output, cpu_record(command, args.threads, rows=rows))


if __name__ == "__main__":
    main()
