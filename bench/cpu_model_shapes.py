"""Decode speed and memory on CPU at a real model's shapes: Llama 3.2 1B's (16 layers of hidden 2048, MLP 8192, 32
query and 8 key/value heads; its 128,256-token table tied to the head), with random weights, in full precision (fp16
files: the engine's fp16 copies) and LCQ at 4, 3 and 2 bits (rank 2; the head in fp16, and at 2 bits also with the
head packed at 4 bits, which a tied table is then looked up from), each variant loaded in a process of its own.
On CPUs with int8 products LCQ layers also keep an int8 form of their weights for steps of several rows where it
fits (--cpu-int8-weights auto: 1.125 bytes a weight), which the -lean variant turns off, as a server short of
memory would, and their codebooks in bytes for int8 decode products of 1-4 rows (4 + 2^b bytes a group); the -fp32
variants take fp32 products (--cpu-matmul-dtype float32), at batch 1 the products every step took before int8
decode products (2026-12-03).

Recorded per variant and round: the checkpoint's size on disk, the process's resident memory before loading
(Python, torch and lcq imported), once loaded and at its peak (the KV pool, --kv-cache-memory-gb, is mapped and
filled as used), the int8 weight copies', codebooks' and head rows' sizes, and output tokens/s at 1 and 8 sequences
(128 tokens each after 32-token prompts, greedy); medians of --rounds rounds, the variants alternating. Random
weights give meaningless tokens but the same work per token as trained ones. With --baseline DIR, each variant also
runs on another checkout's engine (its own bench/cpu_model_shapes.py, e.g. a git worktree of the commit before a
change), alternating with this one's: rows VARIANT@baseline.

    python bench/cpu_model_shapes.py [--threads 2] [--rounds 3] [--variants fp16,lcq-w4r2g64,...] [--baseline DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.random_model import LLAMA32_1B, write_random_llama  # noqa: E402
from bench.records import cpu_arguments, cpu_record, write_record  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "cpu-model-shapes.json"
# variant -> (write_random_llama's arguments, None for fp16 weights; the engine's settings)
VARIANTS = {"fp16": (None, {}),
            "lcq-w4r2g64": (dict(bits=4, rank=2, group_size=64), {}),
            "lcq-w3r2g128": (dict(bits=3, rank=2, group_size=128), {}),
            "lcq-w2r2g128": (dict(bits=2, rank=2, group_size=128), {}),
            "lcq-w2r2g128-h4": (dict(bits=2, rank=2, group_size=128, head_bits=4), {}),
            "lcq-w2r2g128-h4-lean": (dict(bits=2, rank=2, group_size=128, head_bits=4), {"cpu_int8_weights": "off"}),
            "lcq-w4r2g64-fp32": (dict(bits=4, rank=2, group_size=64), {"cpu_matmul_dtype": "float32"}),
            "lcq-w2r2g128-fp32": (dict(bits=2, rank=2, group_size=128), {"cpu_matmul_dtype": "float32"}),
            "lcq-w2r2g128-h4-fp32": (dict(bits=2, rank=2, group_size=128, head_bits=4),
                                     {"cpu_matmul_dtype": "float32"})}
PROMPT_TOKENS, OUTPUT_TOKENS = 32, 128


def options(parser) -> None:
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="the variants to run, comma-separated")
    parser.add_argument("--kv-cache-memory-gb", type=float, default=0.5)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another checkout whose engine also runs each variant (rows VARIANT@baseline)")
    # in a child: a variant's folder and engine settings (JSON), measured in-process
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)


def memory_gb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (its peak) of this process, in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(folder: str, settings: dict, kv_cache_gb: float) -> dict:
    """In this process: load the folder with the engine settings, then time 1 and 8 sequences."""
    from lcq.runtime import LLM, SamplingParams

    base = memory_gb("VmRSS")
    start = time.perf_counter()
    llm = LLM(folder, kv_cache_memory_gb=kv_cache_gb, max_num_seqs=8, max_model_len=1024, **settings)
    load_s = time.perf_counter() - start
    loaded = memory_gb("VmRSS")
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0, ignore_eos=True)
    llm.generate([[1000] * PROMPT_TOKENS], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    rates = {}
    for sequences in (1, 8):
        prompts = [[1000 + i + j for j in range(PROMPT_TOKENS)] for i in range(sequences)]
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        rates[sequences] = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)
    return dict(load_s=round(load_s, 1), rss_base_GB=round(base, 3), rss_loaded_GB=round(loaded, 3),
                int8_weights_GB=round(llm.engine.runner.int8_weight_bytes / 2**30, 3),
                int8_books_GB=round(llm.engine.runner.int8_book_bytes / 2**30, 3),
                head_rows_GB=round(llm.engine.runner.head_row_bytes / 2**30, 3),
                rss_peak_GB=round(memory_gb("VmHWM"), 3),
                tok_s_1=round(rates[1], 2), tok_s_8=round(rates[8], 2))


def folder_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors") / 2**30


def main() -> None:
    args = cpu_arguments(__doc__, RESULTS, options)
    if args.child:
        print(json.dumps(measure(args.child[0], json.loads(args.child[1]), args.kv_cache_memory_gb)))
        return
    names = args.variants.split(",")
    labels = [label for name in names for label in ([name, f"{name}@baseline"] if args.baseline else [name])]
    runs: dict[str, list[dict]] = {label: [] for label in labels}
    with tempfile.TemporaryDirectory() as scratch:
        folders = {}
        for name in names:
            spec = VARIANTS[name][0]
            folders[name] = write_random_llama(Path(scratch) / name, quantized=spec is not None, shapes=LLAMA32_1B,
                                               **(spec or {}))
        for round_index in range(args.rounds):
            for label in labels:
                name, baseline = label.removesuffix("@baseline"), label.endswith("@baseline")
                script = args.baseline / "bench" / Path(__file__).name if baseline else Path(__file__)
                child = subprocess.run([sys.executable, str(script), "--threads", str(args.threads), "--child",
                                        str(folders[name]), json.dumps(VARIANTS[name][1]),
                                        "--kv-cache-memory-gb", str(args.kv_cache_memory_gb)],
                                       capture_output=True, text=True, check=True)
                runs[label].append(json.loads(child.stdout.strip().splitlines()[-1]))
                print(f"round {round_index + 1} {label:25s} {runs[label][-1]}", flush=True)
        rows = []
        for label in labels:
            name, first = label.removesuffix("@baseline"), runs[label][0]
            median = {key: statistics.median(run[key] for run in runs[label])
                      for key in ("tok_s_1", "tok_s_8", "rss_base_GB", "rss_loaded_GB", "rss_peak_GB", "load_s")}
            sizes = {key: first.get(key, 0.0) for key in ("int8_weights_GB", "int8_books_GB", "head_rows_GB")}
            rows.append(dict(variant=label, settings=VARIANTS[name][1],
                             checkpoint_GB=round(folder_gb(folders[name]), 3), **sizes, **median, runs=runs[label]))
    print("| variant | checkpoint GB | RSS before load GB | RSS loaded GB | of it int8 copies GB | int8 books GB | "
          "head rows GB | RSS peak GB | tok/s x1 | tok/s x8 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['checkpoint_GB']} | {r['rss_base_GB']} | {r['rss_loaded_GB']} | "
              f"{r['int8_weights_GB']} | {r['int8_books_GB']} | {r['head_rows_GB']} | {r['rss_peak_GB']} | "
              f"{r['tok_s_1']} | {r['tok_s_8']} |")
    baseline = {} if args.baseline is None else {"baseline": subprocess.run(
        ["git", "-C", str(args.baseline), "rev-parse", "--short", "HEAD"], capture_output=True,
        text=True).stdout.strip()}
    write_record(args.output, cpu_record(" ".join(["python", *sys.argv]), args.threads, shapes=LLAMA32_1B,
                                         prompt_tokens=PROMPT_TOKENS, output_tokens=OUTPUT_TOKENS,
                                         kv_cache_memory_gb=args.kv_cache_memory_gb, **baseline, rows=rows))


if __name__ == "__main__":
    main()
