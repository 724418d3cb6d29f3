"""bench/compare.py: two results files of one benchmark, rows matched by what they measured."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "compare.py"


def kernel_row(shape, M, us, frac, **more) -> dict:
    return dict(shape=shape, M=M, bits=2, rank=2, group_size=128, us=us, fp16_us=40.0, frac_of_copy=frac, **more)


def write(path: Path, device: str, rows: list[dict]) -> Path:
    path.write_text(json.dumps({"device": device, "date": "2026-12-07", "rows": rows}))
    return path


def test_rows_are_matched_by_what_they_measured(tmp_path):
    from bench.compare import compare

    before = {"rows": [kernel_row([4096, 4096], 1, 12.0, 0.2), kernel_row([4096, 4096], 2, 14.0, 0.18),
                       kernel_row([4096, 11008], 1, 17.0, 0.25)]}
    after = {"rows": [kernel_row([4096, 11008], 1, 8.5, 0.5, kernel="decode"),
                      kernel_row([4096, 4096], 1, 12.1, 0.2), kernel_row([11008, 4096], 1, 9.0, 0.45)]}
    rows, only_before, only_after = compare(before, after)
    assert (only_before, only_after) == (1, 1)
    by = {(r["what"], r["metric"]): r for r in rows}
    faster = by[("shape=4096x11008, M=1, bits=2, rank=2, group_size=128", "us")]
    assert (faster["before"], faster["after"], faster["ratio"], faster["better"]) == (17.0, 8.5, 0.5, "after")
    assert by[("shape=4096x11008, M=1, bits=2, rank=2, group_size=128", "frac_of_copy")]["better"] == "after"
    assert by[("shape=4096x4096, M=1, bits=2, rank=2, group_size=128", "us")]["better"] == "even"


def test_generation_rows_and_failed_ones(tmp_path):
    from bench.compare import compare

    common = dict(model="7b", weights="lcq-w2r2g128", engine="lcq")
    before = {"rows": [dict(common, concurrency=1, output_tok_s=327.4, ttft_ms=22.8),
                       dict(common, concurrency=1, variant="unfused-steps", output_tok_s=320.0, ttft_ms=22.0)]}
    after = {"rows": [dict(common, concurrency=1, output_tok_s=300.0, ttft_ms=20.0),
                      dict(common, concurrency=1, variant="unfused-steps", error="CompilationError: out of resources")]}
    rows, _, _ = compare(before, after)
    plain = {r["metric"]: r for r in rows if "variant" not in r["what"]}
    assert plain["output_tok_s"]["better"] == "before" and plain["ttft_ms"]["better"] == "after"
    failed = [r for r in rows if "variant=unfused-steps" in r["what"]]
    assert [(r["metric"], r["after"]) for r in failed] == [("error", "CompilationError: out of resources")]


def test_the_command_line_prints_a_table_and_refuses_other_files(tmp_path):
    before = write(tmp_path / "a.json", "NVIDIA H100 80GB HBM3", [kernel_row([4096, 4096], 1, 12.0, 0.2)])
    after = write(tmp_path / "b.json", "NVIDIA H200", [kernel_row([4096, 4096], 1, 9.0, 0.3)])
    done = subprocess.run([sys.executable, str(SCRIPT), str(before), str(after), "--metrics", "us"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "| shape=4096x4096, M=1, bits=2, rank=2, group_size=128 | us | 12 | 9 | 0.750 | after |" in done.stdout
    assert "NVIDIA H200" in done.stdout and "1 rows in both; 0 only before, 0 only after" in done.stdout
    done = subprocess.run([sys.executable, str(SCRIPT), str(before), str(ROOT / "README.md")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "README.md" in done.stderr
