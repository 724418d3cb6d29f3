"""Where lcq keeps what it fetches or builds once per machine."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import IO

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


def exclusive(lock_path: Path, busy: str | None = None) -> IO[str]:
    """lock_path (made where missing), locked for this process while the returned file is open; the system
    lets go of it if the process dies. Held by another process: `busy`, as one line (UserError), or where
    busy is None, a wait until it is let go, after which the caller checks again for what that process made."""
    import fcntl

    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(lock_path, "a")  # (not "w": a file that is there already is never truncated)
    except OSError as e:
        raise UserError(f"{lock_path}: cannot be created ({e.strerror})") from None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if busy is not None:
                raise UserError(busy) from None
            print(f"lcq: waiting for another lcq process, which holds {lock_path}", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError as e:
        lock.close()
        raise UserError(f"{lock_path}: cannot be locked ({e.strerror})") from None
    except BaseException:
        lock.close()
        raise
    return lock
