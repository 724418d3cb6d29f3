"""Decode throughput at long contexts on CPU: the demo model (SmolLM2-135M-Instruct, LCQ W4) generating
for several sequences of about 1,500 tokens each, where decode attention reads far more cache than
the weights the products read.

The prompts run twice: the first run fills the prefix cache, so the timed second run is almost all
decode (its prefill is the last prompt token of each sequence). The pool holds every sequence at
once (no preemption). With several KV cache dtypes, one engine per dtype in this process, their
timed runs alternating (this VM's speed drifts within minutes).

    python bench/long_context.py [--threads 2] [--sequences 16] [--context 1500] [--tokens 64]
                                 [--kv-cache-dtypes auto,int8]
"""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.records import cpu_arguments, cpu_record, write_record  # noqa: E402
from lcq.quantizer.demo import ensure_demo_model  # noqa: E402
from lcq.runtime import LLM, SamplingParams  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "long-context-cpu.json"
KV_CACHE_GB = 1.0  # fp16: about 45,000 tokens of the demo model


def options(parser) -> None:
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--context", type=int, default=1500, help="prompt tokens per sequence")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per sequence")
    parser.add_argument("--runs", type=int, default=2, help="timed runs (each after the cache-filling one)")
    parser.add_argument("--kv-cache-dtypes", default="auto", help="comma-separated kv_cache_dtype settings")


def main() -> None:
    args = cpu_arguments(__doc__, RESULTS, options)
    engines = {dtype: LLM(str(ensure_demo_model()), kv_cache_memory_gb=KV_CACHE_GB, kv_cache_dtype=dtype)
               for dtype in args.kv_cache_dtypes.split(",")}
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 49000) for _ in range(args.context)] for _ in range(args.sequences)]
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    for llm in engines.values():
        llm.generate(prompts, params)
    rows = []
    for run in range(args.runs):
        for setting, llm in engines.items() if run % 2 == 0 else reversed(engines.items()):
            start = time.perf_counter()
            outs = llm.generate(prompts, params)
            elapsed = time.perf_counter() - start
            produced = sum(len(o.token_ids) for o in outs)
            preempted = llm.engine.stats().num_preemptions_total
            cache = str(llm.engine.runner.k_caches[0].dtype).removeprefix("torch.")
            rows.append({"run": run + 1, "kv_cache_dtype": cache, "output_tok_s": round(produced / elapsed, 1),
                         "seconds": round(elapsed, 2), "preemptions_total": preempted})
            print(f"run {run + 1}, {cache} cache: {produced / elapsed:.1f} output tokens/s ({args.sequences} "
                  f"sequences at {args.context}-{args.context + args.tokens} tokens of context), preemptions so far "
                  f"{preempted}", flush=True)
    write_record(args.output, cpu_record(
        f"python bench/long_context.py --threads {args.threads} --sequences {args.sequences} --context "
        f"{args.context} --tokens {args.tokens} --runs {args.runs} --kv-cache-dtypes {args.kv_cache_dtypes}",
        args.threads, sequences=args.sequences, context=args.context, tokens=args.tokens, runs=args.runs,
        kv_cache_gb=KV_CACHE_GB, load_average_1m=os.getloadavg()[0], rows=rows))


if __name__ == "__main__":
    main()
