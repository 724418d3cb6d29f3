"""What every CPU benchmark records beside its rows: the machine and versions, written atomically.
torch is imported where it is used: the serving load generator (serve.py) records the machine too."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

from lcq.environment import cpu_name


def cpu_arguments(doc: str, default_output: Path,
                  more: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """--threads (also set for torch) and --output, the options of every CPU benchmark, and those that
    `more` adds."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--output", type=Path, default=default_output)
    if more is not None:
        more(parser)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    return args


def cpu_record(command: str, threads: int, **fields) -> dict:
    """device, threads, date, versions and command (with_settings), then `fields`."""
    import torch

    return {"device": f"cpu: {cpu_name()}, {os.cpu_count()} cores", "threads": threads,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": {"python": platform.python_version(), "torch": torch.__version__},
            "command": with_settings(command), **fields}


def with_settings(command: str) -> str:
    """The command after the LCQ_* variables set (LCQ_CPU_AVX512=0 ...), which choose kernels."""
    settings = " ".join(f"{name}={value}" for name, value in sorted(os.environ.items()) if name.startswith("LCQ_"))
    return f"{settings} {command}".strip()


def write_record(path: Path, record: dict) -> None:
    """Write JSON through a temporary file and a rename, so a stopped run leaves the old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    print(f"written {path}")
