"""Peak memory and time per block of `lcq quantize` on a Llama-2-7B-shaped model (random weights).

The quantizer holds one decoder block at a time plus the calibration activations (the inputs of the
fp and the quantized model and the fp block's outputs, fp32), so its peak memory does not grow with
the number of blocks: a model with a few of the 7B's 32 blocks measures what the whole one needs.
On CUDA the peak is torch's allocated device memory; on CPU the process's peak RSS.

    python bench/quantize_memory.py --device cuda                    # the tool's defaults, 2 blocks
    python bench/quantize_memory.py --nsamples 8 --epochs 1          # what a 2-core CPU can afford

Writes bench/results/quantize-memory-<device>.json (one row per run, appended).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.random_model import LLAMA2_7B, write_random_llama  # noqa: E402
from lcq.quantizer import QuantizeOptions, quantize_model  # noqa: E402
from lcq.quantizer.texts import calibration_text  # noqa: E402


def activation_gib(nsamples: int, seqlen: int, hidden: int) -> float:
    """The three fp32 activation tensors the quantizer keeps between blocks."""
    return 3 * nsamples * seqlen * hidden * 4 / 2**30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder blocks of the 7B's shape (it has 32)")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--method", default="lcq")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=0,
                        help="run the end-to-end stage too and report its peak (it holds every block)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-tf32", dest="tf32", action="store_false", help="a GPU's tuning products in fp32")
    args = parser.parse_args()

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({platform.machine()}, " \
        f"{torch.get_num_threads()} threads)"
    options = QuantizeOptions(bits=args.bits, rank=args.rank, group_size=args.group_size, method=args.method,
                              calib_text=calibration_text(), nsamples=args.nsamples, seqlen=args.seqlen,
                              epochs=args.epochs, finetune_epochs=args.finetune_epochs, device=args.device,
                              tf32=args.tf32)
    with tempfile.TemporaryDirectory() as tmp:
        source = write_random_llama(Path(tmp) / "fp16", quantized=False,
                                    shapes={**LLAMA2_7B, "num_hidden_layers": args.layers})
        started = time.time()
        summary = quantize_model(source, Path(tmp) / "lcq", options, progress=True)
        seconds = time.time() - started
    row = {"model": "llama-2-7b-shaped-random", "layers": args.layers, "method": args.method, "bits": args.bits,
           "rank": args.rank, "group_size": args.group_size, "nsamples": args.nsamples, "seqlen": args.seqlen,
           "epochs": args.epochs, "device": device_name, "tf32": args.tf32 and args.device == "cuda",
           "peak_memory_GiB": round(summary.peak_memory_bytes / 2**30, 2),
           "activations_GiB": round(activation_gib(args.nsamples, args.seqlen, LLAMA2_7B["hidden_size"]), 2),
           "seconds_per_block": round(seconds / args.layers, 1),
           "finetune_epochs": args.finetune_epochs,
           "finetune_peak_memory_GiB": (round(summary.finetune_peak_memory_bytes / 2**30, 2)
                                        if args.finetune_epochs else None),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "versions": {"python": platform.python_version(), "torch": torch.__version__},
           "command": " ".join(["python"] + sys.argv)}
    print(f"| device | blocks | W{args.bits} r{args.rank} g{args.group_size} | calibration | epochs | peak GiB "
          f"| activations GiB | s/block | end-to-end epochs | end-to-end peak GiB |\n| {device_name} | {args.layers} "
          f"| {args.method} | {args.nsamples} x {args.seqlen} | {args.epochs} | {row['peak_memory_GiB']} "
          f"| {row['activations_GiB']} | {row['seconds_per_block']} | {args.finetune_epochs} "
          f"| {row['finetune_peak_memory_GiB']} |")
    out = ROOT / "bench" / "results" / f"quantize-memory-{'gpu' if args.device == 'cuda' else 'cpu'}.json"
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps({"rows": rows + [row]}, indent=2) + "\n")
    tmp_out.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
