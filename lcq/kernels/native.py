"""Build and load the C kernels of the CPU path: cpu_amx.c, cpu_decode_attention.c, cpu_decode_step.c, cpu_gemm.c,
cpu_half.c, cpu_index.c, cpu_index_bytes.c, cpu_index_pairs.c, cpu_index_shuffles.c, cpu_latent.c, cpu_mixture.c, cpu_ops.c,
cpu_panels.c, cpu_prefill_attention.c, cpu_recurrent.c and cpu_sample.c, one shared library.

The library is compiled on first use with the system C compiler into the lcq cache (no build step
at install; images without a compiler build it into the package: build(FOLDER)). Without x86-64
Linux, AVX2/FMA/F16C, or both a compiler and a copy in the package, it is not used (one log line) and
callers take their torch path.
It runs on any CPU with AVX2 (AVX-512, AVX512_BF16, AVX512_VNNI, AVX512_VBMI and AMX code is chosen at
run time), but its bf16 code needs GCC 10 or clang 9 to compile; with an older compiler the build fails
(logged) and the torch path runs. Its AMX code needs GCC 11 or clang 12; older ones leave AMX off.
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

# (an undeclared function is an error, as GCC 14 makes it by default: an older compiler's warning must not hide
# a source that newer ones refuse to build)
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-Werror=implicit-function-declaration"]
FOLDER = Path(__file__).parent
SOURCES = tuple(FOLDER / f"cpu_{name}.c"
                for name in ("amx", "decode_attention", "decode_step", "gemm", "half", "index", "index_bytes",
                             "index_pairs", "index_shuffles", "latent", "mixture", "ops", "panels", "prefill_attention",
                             "recurrent", "sample"))
HEADERS = tuple(FOLDER / f"cpu_{name}.h"
                for name in ("attention", "cache", "constant", "exp", "gemm", "index", "latent", "ops"))


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled library, built into the cache on first use; None where it cannot run here."""
    reason = unsupported()
    if reason is None:
        try:
            lib = ctypes.CDLL(str(_library_path()))
            lib.lcq_use_amx(int(amx_allowed()))
            return lib
        except (OSError, subprocess.CalledProcessError) as e:
            reason = f"could not build it: {getattr(e, 'stderr', '') or e}"
    logger.info("C kernels not used (%s); the torch path runs instead", reason)
    return None


@functools.cache
def unsupported() -> str | None:
    """Why the C kernels cannot run on this machine, or None."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"{platform.system()} {platform.machine()} is not x86-64 Linux"
    if missing := [f for f in ("avx2", "fma", "f16c") if f not in cpu_flags()]:
        return f"the CPU lacks {', '.join(missing)}"
    if _compiler() is None and not (FOLDER / library_name()).is_file():  # a prebuilt copy needs none
        return "no C compiler (cc, gcc or clang) on PATH"
    return None


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this x86-64 Linux machine's CPU (empty elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return frozenset(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


def has_avx512(feature: str) -> bool:
    """Whether the CPU has this AVX-512 feature flag ("avx512f", "avx512_bf16") and LCQ_CPU_AVX512 is
    not 0, which keeps every kernel on its AVX2 form (as on a CPU without AVX-512)."""
    return os.environ.get("LCQ_CPU_AVX512", "1") != "0" and feature in cpu_flags()


def amx_allowed() -> bool:
    """Whether int8 and bf16 products may take AMX tiles (cpu_amx.c): the CPU has AMX-INT8, AMX-BF16 and
    AVX-512 VNNI, and LCQ_CPU_AMX and LCQ_CPU_AVX512 are not 0. The library also asks Linux for tile
    state, and keeps AMX off where it is refused."""
    return (os.environ.get("LCQ_CPU_AMX", "1") != "0" and {"amx_int8", "amx_bf16"} <= cpu_flags()
            and has_avx512("avx512_vnni"))


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)


def _library_path() -> Path:
    """A copy built into the installed package (the CPU Docker image does this), else one built
    into the cache on first use."""
    prebuilt = FOLDER / library_name()
    return prebuilt if prebuilt.is_file() else build(cache_dir() / "native")


def library_name() -> str:
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in SOURCES + HEADERS) + " ".join(FLAGS).encode())
    return f"lcq_cpu_{digest.hexdigest()[:16]}.so"


def build(folder: Path) -> Path:
    """Compile into folder/lcq_cpu_<hash of sources and flags>.so unless it is there; building in a
    temporary folder and renaming makes concurrent first uses safe. The sources compile at once, one
    compiler each (cpu_index.c, a decode product per bit width and rank, takes most of the
    time), then link."""
    target = folder / library_name()
    if target.is_file():
        return target
    logger.info("compiling the C kernels into %s (once per version: about a minute on 2 cores)", folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        objects = [str(Path(tmp) / f"{source.stem}.o") for source in SOURCES]
        compiles = [subprocess.Popen([_compiler(), *FLAGS, "-c", str(source), "-o", obj], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for source, obj in zip(SOURCES, objects)]
        outputs = [compile_.communicate() for compile_ in compiles]  # all finish before any failure is raised
        for compile_, (stdout, stderr) in zip(compiles, outputs):
            if compile_.returncode:
                raise subprocess.CalledProcessError(compile_.returncode, compile_.args, stdout, stderr)
        built = Path(tmp) / target.name
        subprocess.run([_compiler(), *FLAGS, *objects, "-o", str(built), "-lm"], check=True, capture_output=True,
                       text=True)
        os.replace(built, target)
    return target
