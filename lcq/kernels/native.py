"""Build and load the C kernels of the CPU path (cpu_half.c, cpu_ops.c).

Each source is compiled on first use with the system C compiler into the lcq cache (no build step
at install; images without a compiler build them into the package: build(source, source.parent)).
Without x86-64 Linux, AVX2/FMA/F16C or a compiler a kernel is not used (one log line) and its
callers take their torch path.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from lcq.paths import cache_dir

logger = logging.getLogger("lcq.kernels")

FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_half.c", "cpu_ops.c"))


@functools.cache
def load(source: Path) -> ctypes.CDLL | None:
    """The compiled source, built into the cache on first use; None where it cannot run here."""
    reason = unsupported()
    if reason is None:
        try:
            return ctypes.CDLL(str(_library_path(source)))
        except (OSError, subprocess.CalledProcessError) as e:
            reason = f"could not build it: {getattr(e, 'stderr', '') or e}"
    logger.info("%s not used (%s); the torch path runs instead", source.name, reason)
    return None


@functools.cache
def unsupported() -> str | None:
    """Why the C kernels cannot run on this machine, or None."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"{platform.system()} {platform.machine()} is not x86-64 Linux"
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    if missing := [f for f in ("avx2", "fma", "f16c") if f not in flags]:
        return f"the CPU lacks {', '.join(missing)}"
    if _compiler() is None:
        return "no C compiler (cc, gcc or clang) on PATH"
    return None


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)


def _library_path(source: Path) -> Path:
    """A copy built into the installed package (the CPU Docker image does this), else one built
    into the cache on first use."""
    prebuilt = source.with_name(library_name(source))
    return prebuilt if prebuilt.is_file() else build(source, cache_dir() / "native")


def library_name(source: Path) -> str:
    digest = hashlib.sha256(source.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    return f"{source.stem}_{digest}.so"


def build(source: Path, folder: Path) -> Path:
    """Compile into folder/<stem>_<hash of source and flags>.so unless it is there; building in a
    temporary folder and renaming makes concurrent first uses safe."""
    target = folder / library_name(source)
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([_compiler(), *FLAGS, str(source), "-o", str(built)], check=True, capture_output=True,
                       text=True)
        os.replace(built, target)
    return target


def build_all(folder: Path) -> list[Path]:
    """Every C kernel into folder (the package folder, in images built without a compiler at run time)."""
    return [build(source, folder) for source in SOURCES]
