"""Speculative decoding by prompt lookup on CPU: the demo model (SmolLM2-135M-Instruct, LCQ W4) answering
chat requests with num_speculative_tokens off and on, one engine per setting in this process,
their runs alternating (this VM's speed drifts within minutes).

Three tasks: quoting a passage back (the output repeats the prompt), editing code (it repeats most of
it), and an open question (it repeats only what the model repeats of itself); and the edit again with
the code as the request's prediction (OpenAI's Predicted Outputs, as an editor sends the file it asks
to rewrite), which drafts with num_speculative_tokens 0 too. One sequence decodes
greedily, then sampled; several run the same request sampled (temperature 0.7, top-p 0.95, a seed
each), so that their outputs differ. Sampled runs go to MAX_TOKENS (ignore_eos: every run does the
same work at the same batch size). Each row: output tokens/s over the whole requests (prefill
included), the drafts verified and accepted, and, for greedy rows, whether the tokens equal those of
the engine without drafts (verification steps of one sequence keep the plain steps' fp32 products, so
they should). Sampled rows draw differently with drafts (each token is still distributed as without
them).

With --draft-model the drafts come from that model instead of prompt lookup (--model the target,
default the demo model; `--model fp16 --draft-model demo` serves the demo model's full-precision form
drafted by its LCQ W4 form). With --mtp the model's own multi-token-prediction layer drafts (--model a
DeepSeek-V3, GLM-4.5, Qwen3-Next or Qwen3.5 folder, full precision or quantized).

    python bench/speculative.py [--threads 2] [--settings 0,2,4,8] [--concurrency 1,2,4,8] [--rounds 3]
                                [--model FOLDER|fp16] [--draft-model FOLDER|demo]
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.records import cpu_arguments, cpu_record, write_record  # noqa: E402
from lcq.quantizer.demo import ensure_demo_model, fetch_demo  # noqa: E402
from lcq.runtime import LLM, SamplingParams  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "speculative-cpu.json"
PASSAGE = ("The river rose in the night and by morning it had covered the lower fields. The farmers moved "
           "their animals to the hill behind the village, where the old chapel stood, and waited. Nobody "
           "spoke much. Around noon the rain stopped, the clouds broke apart, and the water began to fall "
           "back as quickly as it had come, leaving mud, broken fences and a smell of wet earth.")
CODE = ("def mean(values):\n    total = 0\n    for value in values:\n        total += value\n"
        "    return total / len(values)\n\n\ndef spread(values):\n    center = mean(values)\n"
        "    return max(values) - center, center - min(values)\n")
TASKS = {
    "quote": "Repeat the following text exactly, word for word:\n\n" + PASSAGE,
    "edit": "Rename the function mean to average everywhere in this code and show the whole code:\n\n" + CODE,
    "open": "Give three tips for learning to play the piano.",
}
PREDICTED = {"edit-predicted": ("edit", CODE)}  # task: (the task whose prompt it sends, its prediction)
MAX_TOKENS = 256


def options(parser) -> None:
    parser.add_argument("--settings", default="0,2,4,8", help="comma-separated num_speculative_tokens")
    parser.add_argument("--concurrency", default="1,2,4,8", help="comma-separated copies of each request run together")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", help="the target's folder; fp16: the demo model's full-precision form "
                        "(default: the demo model, LCQ W4)")
    parser.add_argument("--draft-model", help="a draft model's folder, drafting instead of prompt lookup; demo: the "
                        "demo model (LCQ W4)")
    parser.add_argument("--mtp", action="store_true", help="draft with the model's own multi-token-prediction layer "
                        "(DeepSeek-V3, GLM-4.5, Qwen3-Next, Qwen3.5 folders) instead of prompt lookup")


def _folder(name: str | None) -> str | None:
    """A folder named on the command line, the demo model's ("demo") or its full-precision source's ("fp16")."""
    if name == "demo":
        return str(ensure_demo_model())
    return str(fetch_demo()) if name == "fp16" else name


def main() -> None:
    args = cpu_arguments(__doc__, RESULTS, options)
    settings = [int(k) for k in args.settings.split(",")]
    # Drafts at every batch size here (the server's default, speculative_disable_by_batch_size 2, drafts
    # at batch 1 only): the rows of several sequences are what that default is measured by.
    model, draft = _folder(args.model) or str(ensure_demo_model()), _folder(args.draft_model)
    engines = {k: LLM(model, kv_cache_memory_gb=0.5, num_speculative_tokens=k, speculative_disable_by_batch_size=64,
                      speculative_model=draft if k else None, speculative_method="mtp" if args.mtp and k else None)
               for k in settings}
    tokenizer = engines[settings[0]].engine.tokenizer
    prompts = {name: tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]
               for name, text in TASKS.items()}
    predictions = {name: tokenizer.encode(text, add_special_tokens=False) for name, (_, text) in PREDICTED.items()}
    prompts.update({name: prompts[task] for name, (task, _) in PREDICTED.items()})
    rows = []
    runs = [(c, sampled) for c in (int(c) for c in args.concurrency.split(",")) for sampled in
            ((False, True) if c == 1 else (True,))]
    for concurrency, sampled in runs:
        params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.7, top_p=0.95, seed=i, ignore_eos=True)
                  for i in range(concurrency)] if sampled else [SamplingParams(max_tokens=MAX_TOKENS, temperature=0)]
        for name, prompt in prompts.items():
            batch = [prompt] * concurrency
            task_params = [dataclasses.replace(p, prediction=predictions[name]) for p in params] \
                if name in predictions else params
            for llm in engines.values():  # warm-up: the prefix cache holds the prompt in every timed round
                llm.generate(batch, task_params)
            timings = {k: [] for k in settings}
            outputs, drafts = {}, {}
            for round_ in range(args.rounds):
                for k, llm in engines.items() if round_ % 2 == 0 else reversed(engines.items()):
                    before = llm.engine.stats()
                    start = time.perf_counter()
                    outs = llm.generate(batch, task_params)
                    elapsed = time.perf_counter() - start
                    after = llm.engine.stats()
                    timings[k].append(sum(len(o.token_ids) for o in outs) / elapsed)
                    outputs[k] = [o.token_ids for o in outs]
                    drafts[k] = (after.num_draft_tokens_total - before.num_draft_tokens_total,
                                 after.num_accepted_tokens_total - before.num_accepted_tokens_total)
            base = statistics.median(timings[settings[0]])
            for k in settings:
                speed = statistics.median(timings[k])
                row = {"task": name, "concurrency": concurrency, "sampled": sampled, "num_speculative_tokens": k,
                       "output_tokens": sum(len(t) for t in outputs[k]), "output_tok_s": round(speed, 1),
                       "output_tok_s_rounds": [round(t, 1) for t in timings[k]],
                       "speedup": round(speed / base, 2), "draft_tokens": drafts[k][0],
                       "prediction": name in predictions,
                       "accepted_tokens": drafts[k][1],
                       "same_tokens": None if sampled else outputs[k] == outputs[settings[0]]}
                rows.append(row)
                print(f"{name:6s} x{concurrency:<3d} {'sampled' if sampled else 'greedy'} k={k}: {speed:7.1f} tok/s "
                      f"({speed / base:.2f}x), "
                      f"{row['output_tokens']} tokens, drafts {drafts[k][0]} accepted {drafts[k][1]}, "
                      f"same tokens: {row['same_tokens']}", flush=True)
    print()
    print("| task | sequences | sampled | k | output tok/s | speedup | drafts accepted | same tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        accepted = f"{r['accepted_tokens']} / {r['draft_tokens']}" if r["draft_tokens"] else "-"
        same = {None: "-", True: "yes", False: "no"}[r["same_tokens"]]
        sampled = "yes" if r["sampled"] else "no"
        print(f"| {r['task']} | {r['concurrency']} | {sampled} | {r['num_speculative_tokens']} | {r['output_tok_s']} | "
              f"{r['speedup']}x | {accepted} | {same} |")
    command = "bench/speculative.py " + " ".join(sys.argv[1:])
    write_record(args.output, cpu_record(command, args.threads, model=Path(model).name,
                                         draft_model=draft and Path(draft).name, mtp=args.mtp, max_tokens=MAX_TOKENS,
                                         rounds=args.rounds, rows=rows))


if __name__ == "__main__":
    main()
