"""Where the CPU engine's time goes, by C entry point: bench/generate.py's 64-request workload (a fresh
engine's first run, as that benchmark measures it) and its batch-1 generation (128 tokens after a 32-token
prompt), on the LCQ demo model, with every function of the C library that Python calls timed around its
calls. What no C call covers is Python's (scheduling, sampling, detokenizing, torch glue) while the other
threads wait; a second table splits it by the engine's phases (PHASES: each one's wall time less the C calls
inside it). A decode step is one call (`lcq_decode_layers`): perf tells its layers' kernels apart.

    python bench/cpu_profile.py [--threads 2]     # writes bench/results/cpu-profile.json
"""
from __future__ import annotations

import ctypes
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.generate import mixed_workload  # noqa: E402
from bench.records import cpu_arguments, cpu_record, write_record  # noqa: E402
from lcq.kernels import native  # noqa: E402
from lcq.models.llama import LlamaModel  # noqa: E402
from lcq.quantizer.demo import ensure_demo_model  # noqa: E402
from lcq.runtime import LLM, SamplingParams  # noqa: E402
from lcq.runtime.engine import LLMEngine  # noqa: E402
from lcq.runtime.model_runner import ModelRunner  # noqa: E402
from lcq.runtime.scheduler import Scheduler  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "cpu-profile.json"
SHOWN = 12  # entry points per workload in the printed table
# The engine's Python phases, none called inside another: (class, method) by name, in a step's order
PHASES = {"scheduling": (Scheduler, "schedule"), "step inputs": (ModelRunner, "_prepare"),
          "inputs as tensors": (ModelRunner, "_on_device"), "model forward": (LlamaModel, "forward"),
          "logits": (LlamaModel, "compute_logits"), "sampling": (LLMEngine, "_sample"),
          "tokens to outputs": (LLMEngine, "_append")}


C_SECONDS = [0.0]  # every timed C call's seconds so far, for the phases' own Python time


class TimedFunction:
    """A C function that adds its calls and their time to `totals`; its argtypes and restype are the
    wrapped function's (the modules set them after loading the library)."""

    def __init__(self, function, totals: dict):
        object.__setattr__(self, "function", function)
        object.__setattr__(self, "totals", totals)

    def __call__(self, *args):
        start = time.perf_counter()
        try:
            return self.function(*args)
        finally:
            seconds = time.perf_counter() - start
            entry = self.totals[self.function.__name__]
            entry[0] += 1
            entry[1] += seconds
            C_SECONDS[0] += seconds

    def __getattr__(self, name):
        return getattr(self.function, name)

    def __setattr__(self, name, value):
        setattr(self.function, name, value)


def time_calls(lib: ctypes.CDLL) -> dict:
    """Time every function of lib from now on, those looked up already and those looked up later;
    returns the totals, name: [calls, seconds]."""
    totals: dict = defaultdict(lambda: [0, 0.0])
    for name, value in list(vars(lib).items()):
        if isinstance(value, ctypes._CFuncPtr):
            setattr(lib, name, TimedFunction(value, totals))

    class TimedLibrary(type(lib)):
        def __getattr__(self, name):
            function = TimedFunction(super().__getattr__(name), totals)
            setattr(self, name, function)
            return function

    lib.__class__ = TimedLibrary
    return totals


def time_phases(phases: dict) -> None:
    """Wrap each phase's method to add its calls and its own Python time (wall less the timed C calls within)
    to phases[name]."""
    for name, (owner, method) in PHASES.items():
        def timed(*args, _function=getattr(owner, method), _name=name, **kwargs):
            start, c_before = time.perf_counter(), C_SECONDS[0]
            try:
                return _function(*args, **kwargs)
            finally:
                entry = phases[_name]
                entry[0] += 1
                entry[1] += time.perf_counter() - start - (C_SECONDS[0] - c_before)
        setattr(owner, method, timed)


def profile(run, totals: dict, phases: dict) -> tuple[float, list[dict], list[dict]]:
    """run()'s wall time, the C entry points it called (longest first) and the Python time of each phase,
    the rest of what lies outside C calls last."""
    totals.clear()
    phases.clear()
    start = time.perf_counter()
    run()
    wall = time.perf_counter() - start
    rows = [dict(function=name, calls=calls, seconds=round(seconds, 4), share=round(seconds / wall, 4))
            for name, (calls, seconds) in sorted(totals.items(), key=lambda item: -item[1][1])]
    outside = wall - sum(seconds for _, seconds in totals.values())
    rows.append(dict(function="(outside C calls)", calls=None, seconds=round(outside, 4),
                     share=round(outside / wall, 4)))
    python = [dict(phase=name, calls=phases[name][0], seconds=round(phases[name][1], 4),
                   share=round(phases[name][1] / wall, 4)) for name in PHASES if name in phases]
    rest = outside - sum(phase[1] for phase in phases.values())
    python.append(dict(phase="(the rest)", calls=None, seconds=round(rest, 4), share=round(rest / wall, 4)))
    return wall, rows, python


def main() -> None:
    args = cpu_arguments(__doc__, RESULTS)
    lib = native.load()
    if lib is None:
        raise SystemExit("the C kernels do not run here (lcq/kernels/native.py)")
    totals = time_calls(lib)
    phases: dict = defaultdict(lambda: [0, 0.0])
    time_phases(phases)
    model = str(ensure_demo_model())
    workload = mixed_workload(64, vocab=49152)
    prompt = workload[0][0][:32]

    def greedy(max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    llm = LLM(model, kv_cache_memory_gb=2.0)
    llm.generate([prompt], greedy(8))  # warm-up, as bench/generate.py's
    workloads = {}
    outputs = []
    workloads["64 requests"] = profile(
        lambda: outputs.extend(llm.generate([p for p, _ in workload], [greedy(n) for _, n in workload])), totals,
        phases)
    produced = {"64 requests": sum(len(o.token_ids) for o in outputs)}
    outputs.clear()
    workloads["batch 1"] = profile(lambda: outputs.extend(llm.generate([prompt], greedy(128))), totals, phases)
    produced["batch 1"] = len(outputs[0].token_ids)
    record = cpu_record(" ".join(["python", *sys.argv]), args.threads, model="smollm2-135m-instruct lcq-w4r2g64",
                        workloads=[dict(workload=name, wall_s=round(wall, 3), output_tokens=produced[name],
                                        output_tok_s=round(produced[name] / wall, 1), rows=rows, python=python)
                                   for name, (wall, rows, python) in workloads.items()])
    write_record(args.output, record)
    for entry in record["workloads"]:
        print(f"\n{entry['workload']}: {entry['wall_s']} s, {entry['output_tok_s']} output tokens/s")
        print("| function | calls | s | share |\n|---|---|---|---|")
        for row in entry["rows"][:-1][:SHOWN] + entry["rows"][-1:]:
            print(f"| {row['function']} | {row['calls'] or '-'} | {row['seconds']} | {100 * row['share']:.1f}% |")
        tokens = entry["output_tokens"]
        print("\n| Python outside C calls, by phase | calls | s | share | us a token |\n|---|---|---|---|---|")
        for row in entry["python"]:
            print(f"| {row['phase']} | {row['calls'] or '-'} | {row['seconds']} | {100 * row['share']:.1f}% | "
                  f"{row['seconds'] * 1e6 / tokens:.0f} |")


if __name__ == "__main__":
    main()
