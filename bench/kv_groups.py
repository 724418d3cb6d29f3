"""KV cache layer groups on CPU: how many long sequences one KV pool serves when sliding-window layers hand
back the blocks their window has passed (the default), against every layer keeping every block
(--disable-hybrid-kv-cache-manager).

A model with sliding-window layers (default: Gemma-3-270M, 15 of its 18 layers over 512 tokens; an fp16
folder) generates for several sequences of long prompts through one engine per layout, with the same
KV pool. Recorded per layout: the context the pool allows one sequence, the most sequences running at
once, preemptions (recomputed sequences), the pool's peak use, wall time and output tokens/s. Greedy
outputs are compared across the layouts (they must be equal: only where blocks live differs).

    python bench/kv_groups.py MODEL [--threads 2] [--sequences 8] [--context 3000] [--tokens 32]
                                    [--kv-cache-gb 0.125] [--max-num-batched-tokens 512]
"""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.records import cpu_arguments, cpu_record, write_record  # noqa: E402
from lcq.runtime import LLM, SamplingParams  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "kv-groups-cpu.json"


def options(parser) -> None:
    parser.add_argument("model", help="a folder of a model with sliding-window layers")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--context", type=int, default=3000, help="prompt tokens per sequence")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per sequence")
    parser.add_argument("--kv-cache-gb", type=float, default=0.125)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[dict, list[list[int]]]:
    """Generate by engine steps, watching the running sequences and the pool between steps."""
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    outputs: dict[str, list[int]] = {}
    most_running, peak_usage, start = 0, 0.0, time.perf_counter()
    while engine.has_work():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
        stats = engine.stats()
        most_running = max(most_running, stats.num_running)
        peak_usage = max(peak_usage, stats.kv_cache_usage)
    elapsed = time.perf_counter() - start
    tokens = [outputs[f"r{i}"] for i in range(len(prompts))]
    return {"max_model_len": engine.max_model_len, "kv_blocks": engine.blocks.num_total_blocks,
            "layer_groups": engine.runner.kv_groups.num_groups, "most_running": most_running,
            "preemptions": engine.stats().num_preemptions_total, "peak_kv_usage": round(peak_usage, 3),
            "seconds": round(elapsed, 1), "output_tok_s": round(sum(map(len, tokens)) / elapsed, 1)}, tokens


def main() -> None:
    args = cpu_arguments(__doc__, RESULTS, options)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 30000) for _ in range(args.context)] for _ in range(args.sequences)]
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    rows, outputs = [], {}
    for layout, hybrid in (("layer groups", True), ("every block kept", False)):
        llm = LLM(args.model, kv_cache_memory_gb=args.kv_cache_gb, hybrid_kv_cache=hybrid,
                  max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False)
        row, outputs[layout] = run(llm, prompts, params)
        rows.append({"layout": layout, **row})
        del llm
        print(f"{layout}: " + ", ".join(f"{key} {value}" for key, value in row.items()), flush=True)
    same = outputs["layer groups"] == outputs["every block kept"]
    print(f"greedy outputs equal across layouts: {same}")
    print("| layout | groups | blocks | context allowed | most running | preemptions | peak KV use | s | tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['layer_groups']} | {r['kv_blocks']} | {r['max_model_len']} | {r['most_running']} "
              f"| {r['preemptions']} | {r['peak_kv_usage']:.0%} | {r['seconds']} | {r['output_tok_s']} |")
    write_record(args.output, cpu_record(
        f"python bench/kv_groups.py {Path(args.model).name} --threads {args.threads} --sequences {args.sequences} "
        f"--context {args.context} --tokens {args.tokens} --kv-cache-gb {args.kv_cache_gb} "
        f"--max-num-batched-tokens {args.max_num_batched_tokens}", args.threads, model=Path(args.model).name,
        sequences=args.sequences, context=args.context, tokens=args.tokens, kv_cache_gb=args.kv_cache_gb,
        max_num_batched_tokens=args.max_num_batched_tokens, outputs_equal=same,
        load_average_1m=os.getloadavg()[0], rows=rows))


if __name__ == "__main__":
    main()
