"""Time to first token of long prompts on CPU: the demo model (SmolLM2-135M-Instruct, LCQ W4) answering one
prompt of 1,024 to 8,000 random tokens with one token, prefix caching off, the engine's own chunked prefill
(1,024 tokens a step). Each length runs `--runs` times after a warm-up; the table gives the median and, from
the C entry points timed around their calls (bench/cpu_profile.py's time_calls), how much of it went to
prefill attention (quadratic in the prompt) and to the linear layers' products.

    python bench/long_prompt.py [--threads 2] [--lengths 1024,2048,4096,8000] [--runs 3]
"""
from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.cpu_profile import time_calls  # noqa: E402
from bench.records import cpu_arguments, cpu_record, write_record  # noqa: E402
from lcq.kernels import native  # noqa: E402
from lcq.quantizer.demo import ensure_demo_model  # noqa: E402
from lcq.runtime import LLM, SamplingParams  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "long-prompt-cpu.json"
ATTENTION, PRODUCTS = "lcq_prefill_attention", "lcq_index_matmul"


def options(parser) -> None:
    parser.add_argument("--lengths", default="1024,2048,4096,8000", help="comma-separated prompt lengths")
    parser.add_argument("--runs", type=int, default=3)


def main() -> None:
    args = cpu_arguments(__doc__, RESULTS, options)
    lib = native.load()
    if lib is None:
        raise SystemExit("the C kernels do not run here (lcq/kernels/native.py)")
    totals = time_calls(lib)
    lengths = [int(n) for n in args.lengths.split(",")]
    llm = LLM(str(ensure_demo_model()), enable_prefix_caching=False, max_model_len=max(lengths) + 1)
    rng = random.Random(0)
    one_token = SamplingParams(max_tokens=1, temperature=0)
    llm.generate([[rng.randrange(100, 40000) for _ in range(64)]], one_token)  # warm-up
    rows = []
    print("| prompt tokens | TTFT (s) | prefill attention (s) | products (s) | runs (s) |\n|---|---|---|---|---|")
    for length in lengths:
        prompt = [rng.randrange(100, 40000) for _ in range(length)]
        runs = []
        for _ in range(args.runs):
            totals.clear()
            start = time.perf_counter()
            llm.generate([prompt], one_token)
            runs.append((time.perf_counter() - start, totals[ATTENTION][1], totals[PRODUCTS][1]))
        ttft, attention, products = (statistics.median(run[i] for run in runs) for i in range(3))
        rows.append(dict(prompt_tokens=length, ttft_s=round(ttft, 3), prefill_attention_s=round(attention, 3),
                         products_s=round(products, 3), runs_s=[round(run[0], 3) for run in runs]))
        print(f"| {length} | {ttft:.3f} | {attention:.3f} | {products:.3f} | "
              f"{', '.join(f'{run[0]:.3f}' for run in runs)} |", flush=True)
    write_record(args.output, cpu_record(" ".join(["python"] + sys.argv), args.threads, runs=args.runs, rows=rows))


if __name__ == "__main__":
    main()
