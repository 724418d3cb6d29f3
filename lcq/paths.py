"""Where lcq keeps what it fetches or builds once per machine."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """$LCQ_CACHE, else ~/.cache/lcq."""
    folder = Path(override or os.environ.get("LCQ_CACHE") or Path.home() / ".cache" / "lcq")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
