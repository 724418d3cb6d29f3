"""What the head's int8 rows (cpu_half.byte_rows, kept with int8 products; their AVX2 form where the AVX-512 int8
products do not run, which LCQ_CPU_AVX512=0 measures on a CPU with them) buy at batch 1: one engine per model,
its decode steps timed with the rows on and off in turn (the same process, so the host's drift, 20-40% between
processes minutes apart, falls on both alike). Models: the demo (SmolLM2-135M-Instruct, LCQ W4 r2 g64, its
49152 x 576 head tied to the table) and random checkpoints of Llama 3.2 1B's shapes (a 128256 x 2048 head) at
W4 r2 g64 and W2 r2 g128. Each pass: one sequence, a 32-token prompt, --tokens greedy tokens; --pairs pairs, the
order within a pair alternating.

    python bench/head_rows.py [--threads 2] [--pairs 8] [--tokens 128] [--demo-only]
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.random_model import LLAMA32_1B, write_random_llama  # noqa: E402
from bench.records import cpu_arguments, cpu_record, write_record  # noqa: E402
from lcq.kernels import native  # noqa: E402
from lcq.kernels.cpu_matmul import products_available  # noqa: E402
from lcq.quantizer.demo import ensure_demo_model  # noqa: E402
from lcq.runtime import LLM, SamplingParams  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "head-rows-cpu.json"
PROMPT_TOKENS = 32


def options(parser) -> None:
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--demo-only", action="store_true", help="the demo model alone (no Llama 3.2 1B shapes)")


def alternate(folder: Path, pairs: int, tokens: int) -> dict:
    """Tokens/s of one sequence with the head's int8 rows on and off in turn, in one engine."""
    llm = LLM(str(folder), kv_cache_memory_gb=0.5, max_num_seqs=8, max_model_len=1024)
    model = llm.engine.runner.model
    rows = model.lm_head_rows
    if rows is None:
        raise SystemExit(f"{folder.name}: the engine kept no int8 rows of the head")
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.generate([[1000] * PROMPT_TOKENS], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    rates: dict[str, list[float]] = {"rows": [], "fp16": []}
    for pair in range(pairs):
        for label in ("rows", "fp16") if pair % 2 == 0 else ("fp16", "rows"):
            model.lm_head_rows = rows if label == "rows" else None
            start = time.perf_counter()
            out = llm.generate([[1000 + pair + j for j in range(PROMPT_TOKENS)]], params)[0]
            rates[label].append(round(len(out.token_ids) / (time.perf_counter() - start), 2))
    ratios = [round(a / b, 3) for a, b in zip(rates["rows"], rates["fp16"])]
    return dict(head_shape=list(model.lm_head_half.shape), head_rows_MB=round(rows.numel() / 2**20, 1),
                tok_s_rows=statistics.median(rates["rows"]), tok_s_fp16=statistics.median(rates["fp16"]),
                ratio_median=statistics.median(ratios), ratios=ratios, rounds=rates)


def main() -> None:
    args = cpu_arguments(__doc__, RESULTS, options)
    if native.load() is None:
        raise SystemExit("the head's int8 rows need the C kernels")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        models = {"demo (SmolLM2-135M, lcq-w4r2g64)": ensure_demo_model()}
        for bits, group in () if args.demo_only else ((4, 64), (2, 128)):
            models[f"llama32-1b shapes, lcq-w{bits}r2g{group}"] = write_random_llama(
                Path(scratch) / f"w{bits}", quantized=True, shapes=LLAMA32_1B, bits=bits, rank=2, group_size=group)
        for name, folder in models.items():
            rows.append(dict(model=name, **alternate(Path(folder), args.pairs, args.tokens)))
            r = rows[-1]
            print(f"{name:36s} head {r['head_shape']}: int8 rows {r['tok_s_rows']:.1f} tok/s, "
                  f"fp16 {r['tok_s_fp16']:.1f} (per pair {min(r['ratios']):.2f}-{max(r['ratios']):.2f}x, median {r['ratio_median']:.2f}x)",
                  flush=True)
    write_record(args.output, cpu_record(f"python bench/head_rows.py --threads {args.threads} --pairs {args.pairs} "
                                         f"--tokens {args.tokens}{' --demo-only' if args.demo_only else ''}",
                                         args.threads, int8_form="avx512" if products_available(torch.int8) else "avx2",
                                         prompt_tokens=PROMPT_TOKENS,
                                         load_average_1m=os.getloadavg()[0], rows=rows))


if __name__ == "__main__":
    main()
