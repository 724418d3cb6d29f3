"""The autotuner's timings a GPU session brought back, as a table: for each kernel and tuning key, the config it
chose and its time, the runner-up's time, and how many of the configs it timed came within 5% of the best. The
files are Triton's `cache_results` entries, which bench/gpu_session.sh copies into gpu-session/autotune/: the data
for trimming the autotuner's lists (lcq/kernels/triton_configs.py), and, with --pretuned, the GPU's table of
pre-tuned configs that engines on that GPU kind then take instead of tuning (lcq/kernels/tuned_configs.py).

    python bench/autotune_table.py gpu-session/autotune [--out bench/results/autotune-<gpu>.json]
    python bench/autotune_table.py gpu-session/autotune --pretuned lcq/kernels/tuned/nvidia-h100-80gb-hbm3.json

The Triton release a table was tuned with comes from the session's device.txt beside the folder (--triton sets it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEAR = 1.05  # "within 5% of the best"
CONFIG_FIELDS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def key_names(kernel: str) -> list[str]:
    """The names of a kernel's tuning key values (its autotuner's `key`), where lcq's autotuners say; the key's
    last values are its tensors' dtypes."""
    sys.path.insert(0, str(ROOT))
    try:
        from lcq.kernels import triton_linear
    except ImportError:  # no Triton here: the key's values are shown unnamed
        return []
    tuners = {"_decode_kernel": triton_linear._decode_tuned, "_gemm_kernel": triton_linear._gemm_tuned}
    return list(tuners[kernel].keys) if kernel in tuners else []


def _median(timing) -> float:
    """The median of a config's timing: graph_time's quantiles (0.5, 0.2, 0.8) or one number; inf if it failed."""
    value = timing[0] if isinstance(timing, list) else timing
    return float("inf") if value is None else float(value)


def _config(fields: dict) -> str:
    """A config as the autotuner lists it: its kwargs, then warps and stages."""
    kwargs = ", ".join(f"{name}: {value}" for name, value in fields.get("kwargs", {}).items())
    launch = ", ".join(f"{name}: {fields[name]}" for name in CONFIG_FIELDS if fields.get(name) is not None)
    return f"{kwargs}, {launch}" if kwargs else launch


def table(folder: Path) -> list[dict]:
    """One row per autotune file under folder (each one kernel's key), sorted by kernel and key."""
    rows = []
    for path in sorted(folder.rglob("*.autotune.json")):
        kernel = path.name.removesuffix(".autotune.json").split("-", 1)[-1]
        entry = json.loads(path.read_text())
        timed = sorted(((_median(timing), fields) for fields, timing in entry["configs_timings"]),
                       key=lambda pair: pair[0])
        best, fields = timed[0]
        names = key_names(kernel)
        key = entry["key"]
        rows.append(dict(kernel=kernel, key=dict(zip(names, key)) if len(names) <= len(key) and names else key,
                         dtypes=key[len(names):] if names else [], config=_config(fields), ms=best,
                         runner_up_ms=timed[1][0] if len(timed) > 1 else None, configs=len(timed),
                         failed=sum(math.isinf(ms) for ms, _ in timed),
                         near_best=sum(ms <= best * NEAR for ms, _ in timed)))
    return sorted(rows, key=lambda row: (row["kernel"], json.dumps(row["key"], sort_keys=True)))


def pretuned(folder: Path, triton_version: str) -> dict:
    """The table of pre-tuned configs (lcq/kernels/tuned_configs.py) from the autotune files under folder: each
    kernel's tuning keys with the config timed fastest for each (of a key tuned twice, the faster choice)."""
    chosen: dict[tuple[str, str], tuple[float, dict]] = {}
    for path in sorted(folder.rglob("*.autotune.json")):
        entry = json.loads(path.read_text())
        best, fields = min(((_median(timing), fields) for fields, timing in entry["configs_timings"]),
                           key=lambda pair: pair[0])
        kernel = path.name.removesuffix(".autotune.json").split("-", 1)[-1]
        mark = (kernel, json.dumps(entry["key"]))
        if not math.isinf(best) and (mark not in chosen or best < chosen[mark][0]):
            config = {"kwargs": fields.get("kwargs", {}),
                      **{name: fields[name] for name in CONFIG_FIELDS if fields.get(name) is not None}}
            chosen[mark] = best, dict(kernel=kernel, key=entry["key"], config=config)
    entries = [entry for _, (_, entry) in sorted(chosen.items())]
    return dict(triton=triton_version, source=str(folder), date=datetime.date.today().isoformat(), entries=entries)


def session_triton(folder: Path) -> str | None:
    """The Triton version a GPU session's device.txt (beside its autotune folder) names."""
    device = folder.parent / "device.txt"
    found = re.search(r"\btriton ([0-9][\w.+]*)", device.read_text()) if device.is_file() else None
    return found.group(1) if found else None


def markdown(rows: list[dict]) -> str:
    lines = ["| kernel | key | chosen config | us | runner-up us | timed (failed) | within 5% |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        key = ", ".join(f"{k}={v}" for k, v in row["key"].items()) if isinstance(row["key"], dict) else row["key"]
        runner_up = "" if row["runner_up_ms"] is None else f"{row['runner_up_ms'] * 1000:.1f}"
        lines.append(f"| {row['kernel']} | {key} | {row['config']} | {row['ms'] * 1000:.1f} | {runner_up} "
                     f"| {row['configs']} ({row['failed']}) | {row['near_best']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where the autotune files are (gpu-session/autotune)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--pretuned", type=Path, help="also write the GPU's pre-tuned configs here "
                        "(lcq/kernels/tuned/<device>.json)")
    parser.add_argument("--triton", help="--pretuned: the Triton version the session ran (default: its device.txt)")
    args = parser.parse_args()
    rows = table(args.folder)
    print(markdown(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(source=str(args.folder), rows=rows), indent=1) + "\n")
    if args.pretuned:
        version = args.triton or session_triton(args.folder)
        if version is None:
            sys.exit(print(f"autotune_table: no device.txt beside {args.folder} names its Triton: give --triton",
                           file=sys.stderr) or 2)
        written = pretuned(args.folder, version)
        args.pretuned.parent.mkdir(parents=True, exist_ok=True)
        args.pretuned.write_text(json.dumps(written, indent=1) + "\n")
        print(f"wrote {len(written['entries'])} pre-tuned configs (Triton {version}) to {args.pretuned}")


if __name__ == "__main__":
    main()
