"""Two results files of one benchmark side by side: each row of the first matched with the row of the second that
measured the same thing, and what changed.

    python bench/compare.py BEFORE.json AFTER.json                  # e.g. kernels-nvidia-h100-80gb-hbm3.json twice
    python bench/compare.py BEFORE.json AFTER.json --metrics us,bytes_us

Rows are matched by the fields that say what a row measured (IDENTITY: a product's shape, rows, bits, rank and group
size; a generation row's model, weights, engine, variant, concurrency and prompt length), so runs of different
commits, GPUs or subsets of shapes compare wherever they overlap. Each metric is printed before and after with
their ratio (after / before), and `better` says which way that went: less time, more tokens or bandwidth. The
default metrics are those of the issue's JSON schemas (kernels: `us`, `fp16_us`, `frac_of_copy`; generation:
`output_tok_s`, `ttft_ms`, `peak_mem_GB`) that both files hold; a row that failed (`error`) shows its error.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

IDENTITY = ("shape", "M", "bits", "rank", "group_size", "model", "weights", "engine", "variant", "concurrency",
            "prompt_tokens")
DEFAULT_METRICS = ("us", "fp16_us", "frac_of_copy", "output_tok_s", "ttft_ms", "peak_mem_GB")
HIGHER_IS_BETTER = ("tok_s", "GBps", "frac_of_copy", "speedup")  # metric names ending so; the rest: times, sizes


def identity(row: dict) -> tuple:
    """What a row measured: its IDENTITY fields, lists made tuples so that the key hashes."""
    return tuple((name, tuple(row[name]) if isinstance(row.get(name), list) else row.get(name))
                 for name in IDENTITY if name in row)


def load(path: Path) -> dict:
    """A results file's header and rows; one line and exit 2 for a file that is not one."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        sys.exit(print(f"compare: cannot read {path}: {error}", file=sys.stderr) or 2)
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list):
        sys.exit(print(f"compare: {path} has no list of rows: not a results file of bench/", file=sys.stderr) or 2)
    return result


def better(metric: str, before: float, after: float) -> str:
    """Which way the change went, within 2% called even."""
    if before == 0 or math.isclose(after, before, rel_tol=0.02):
        return "even"
    higher = metric.endswith(HIGHER_IS_BETTER)
    return "after" if (after > before) == higher else "before"


def compare(before: dict, after: dict, metrics: list[str] | None = None) -> tuple[list[dict], int, int]:
    """Per metric of each row both files hold: {what, metric, before, after, ratio, better} (errors as text);
    and how many rows only the first and only the second file has."""
    later = {identity(row): row for row in after["rows"]}
    matched, only_before = [], 0
    for row in before["rows"]:
        key = identity(row)
        other = later.pop(key, None)
        if other is None:
            only_before += 1
            continue
        what = ", ".join(f"{name}={'x'.join(map(str, value)) if isinstance(value, tuple) else value}"
                         for name, value in key if value is not None)
        if "error" in row or "error" in other:
            matched.append(dict(what=what, metric="error", before=row.get("error", ""), after=other.get("error", ""),
                                ratio=None, better=""))
            continue
        for metric in metrics or DEFAULT_METRICS:
            old, new = row.get(metric), other.get(metric)
            if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool):
                matched.append(dict(what=what, metric=metric, before=old, after=new,
                                    ratio=new / old if old else None, better=better(metric, old, new)))
    return matched, only_before, len(later)


def number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--metrics", help="comma-separated row fields to compare (default: the schemas' own)")
    args = parser.parse_args()
    before, after = load(args.before), load(args.after)
    metrics = [m for m in args.metrics.split(",") if m] if args.metrics else None
    rows, only_before, only_after = compare(before, after, metrics)
    for label, result, path in (("before", before, args.before), ("after", after, args.after)):
        print(f"{label}: {path} ({result.get('device', 'device not recorded')}, {result.get('date', 'no date')})")
    print("\n| row | metric | before | after | after / before | better |\n|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else ""
        print(f"| {r['what']} | {r['metric']} | {number(r['before'])} | {number(r['after'])} | {ratio} | "
              f"{r['better']} |")
    print(f"\n{len({r['what'] for r in rows})} rows in both; {only_before} only before, {only_after} only after")


if __name__ == "__main__":
    main()
