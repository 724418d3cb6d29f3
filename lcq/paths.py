"""Where lcq keeps what it fetches or builds once per machine."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UserError


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """$LCQ_CACHE, else ~/.cache/lcq."""
    return made_folder(Path(override or os.environ.get("LCQ_CACHE") or Path.home() / ".cache" / "lcq"),
                       "the cache folder")


def made_folder(folder: Path, role: str) -> Path:
    """folder, made where missing and found writable (a file made and removed in it); else one line naming
    its role, before anything is fetched or built into it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UserError(f"{folder}: cannot be {role} ({e.strerror or e})") from None
    return folder
