"""Which Adam step the block-wise stage should take at each bit width, judged on held-out text.

For the first decoder blocks of SmolLM2-135M-Instruct at group 64, rank 2: the block error
(blockwise.block_error) of the importance-weighted init and after 10 epochs at each step size, on
the calibration windows it trained on, on other windows of the same text (King James Bible), and on
windows of the second half of the Shakespeare plays (the quality study evaluates on the first
tokens). Codebooks are dual-quantized before every measurement, as they are stored. Each block sees
the previous blocks quantized with their init codebooks, so every step size faces the same inputs.
The defaults in lcq/quantizer/pipeline.py (DEFAULT_LR) come from this table.

    python bench/block_lr.py                       # bits 2, 3, 4; steps 1e-2, 3e-3, 1e-3; blocks 0-2
    python bench/block_lr.py --bits 4 --blocks 6 --lrs 3e-3,1e-3,3e-4
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402,F401  (takes bench/ itself off sys.path: bench/__init__.py)

import torch  # noqa: E402

from lcq.paths import cache_dir  # noqa: E402
from lcq.quantizer.blockwise import LayerFit, block_call, block_error, optimize_block, run_block  # noqa: E402
from lcq.quantizer.demo import fetch_demo  # noqa: E402
from lcq.quantizer.fit import Codebook, grouped, grouped_importance, lcq_init, stored_codebook  # noqa: E402
from lcq.quantizer.pipeline import _input_stats, block_linears  # noqa: E402
from lcq.quantizer.source import SourceModel, calibration_batch  # noqa: E402
from lcq.quantizer.texts import book_text, evaluation_text  # noqa: E402

GROUP_SIZE, RANK, WINDOWS, SEQLEN, BATCH = 64, 2, 16, 256, 4


def copy_fits(fits: list[LayerFit], stored: bool) -> list[LayerFit]:
    book = (lambda f: stored_codebook(f.book)) if stored else \
        (lambda f: Codebook(f.book.s.clone(), f.book.v.clone(), f.book.b.clone()))
    return [LayerFit(f.name, f.wg, f.in_features, book(f)) for f in fits]


def study(bits: int, blocks: int, lrs: list[float], epochs: int, source: SourceModel, windows: dict) -> list[dict]:
    embed = source.reader.tensor("model.embed_tokens.weight").float()
    fp = {name: torch.nn.functional.embedding(ids, embed) for name, ids in windows.items()}
    quantized = {name: x.clone() for name, x in fp.items()}
    rows = []
    for index in range(blocks):
        block = source.block(index)
        call = block_call(block, source.block_inputs(index))
        targets = {name: run_block(call, {}, x, BATCH) for name, x in fp.items()}

        def errors(fits: list[LayerFit]) -> dict[str, float]:
            weights = {f"{f.name}.weight": f.weight() for f in fits}
            return {name: round(float(block_error(run_block(call, weights, x, BATCH), targets[name])), 6)
                    for name, x in quantized.items()}

        stats = _input_stats(call, block, quantized["train"], BATCH, full=False)
        init = []
        for name in block_linears(block):
            w = block.get_submodule(name).weight.detach().float()
            wg = grouped(w, GROUP_SIZE)
            h = grouped_importance(stats[name], w.shape[1], GROUP_SIZE, w.device)
            init.append(LayerFit(name, wg, w.shape[1], lcq_init(wg, h, bits, RANK, "kmeans")))
        init_stored = copy_fits(init, stored=True)
        rows.append({"bits": bits, "block": index, "lr": None, "epochs": 0, **errors(init_stored)})
        for lr in lrs:
            fits = copy_fits(init, stored=False)
            started = time.time()
            optimize_block(call, fits, quantized["train"], targets["train"], epochs, lr, BATCH, seed=0)
            rows.append({"bits": bits, "block": index, "lr": lr, "epochs": epochs,
                         **errors(copy_fits(fits, stored=True)), "seconds": round(time.time() - started, 1)})
        for row in rows[-1 - len(lrs):]:
            print(f"W{bits} block {index} lr {row['lr'] or '-':>6}: " +
                  "  ".join(f"{name} {row[name]:.5f}" for name in windows), flush=True)
        weights = {f"{f.name}.weight": f.weight() for f in init_stored}
        quantized = {name: run_block(call, weights, x, BATCH) for name, x in quantized.items()}
        fp = targets
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--lrs", default="1e-2,3e-3,1e-3")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--results", default=str(ROOT / "bench" / "results" / "block-lr-cpu.json"))
    args = parser.parse_args()
    cache = cache_dir()
    folder = fetch_demo(cache)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    calib, shakespeare = book_text(cache), evaluation_text(cache)
    windows = {"train": calibration_batch(tokenizer, calib, WINDOWS, SEQLEN, seed=0),
               "kjv_held_out": calibration_batch(tokenizer, calib, WINDOWS, SEQLEN, seed=1),
               "shakespeare_2nd_half": calibration_batch(tokenizer, shakespeare[len(shakespeare) // 2:],
                                                         WINDOWS, SEQLEN, seed=2)}
    source = SourceModel(folder, torch.device("cpu"))
    lrs = [float(x) for x in args.lrs.split(",")]
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        rows += study(bits, args.blocks, lrs, args.epochs, source, windows)
    result = {"device": f"cpu ({platform.machine()}, torch threads {torch.get_num_threads()})",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": {"python": platform.python_version(), "torch": torch.__version__},
              "model": "SmolLM2-135M-Instruct", "group_size": GROUP_SIZE, "rank": RANK,
              "windows": f"{WINDOWS} x {SEQLEN} tokens per set", "command": " ".join(["python"] + sys.argv),
              "rows": rows}
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
