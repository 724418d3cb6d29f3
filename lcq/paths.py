"""Where lcq keeps what it fetches or builds once per machine."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """$LCQ_CACHE, else ~/.cache/lcq."""
    folder = Path(override or os.environ.get("LCQ_CACHE") or Path.home() / ".cache" / "lcq")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{folder}: cannot be the cache folder ({e.strerror})") from None
    return folder
