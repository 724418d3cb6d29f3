"""Decode-sized CPU products with fp16 weights (cpu_half.c): build once per machine, then call.

A batch-1 decode step on a CPU streams every weight from memory once, so the bytes per weight set
the speed: fp16 halves them against the fp32 weight oneDNN multiplies. The weights are rounded to
fp16 exactly as the GPU kernels round them before tl.dot; activations and sums stay fp32. On a
2-core AMD EPYC (Zen 1) a 3072x576 product from memory took 0.22 ms at M=1 against 0.39 ms through
oneDNN fp32, and 0.43 against 0.70 ms at M=8 (bench/cpu_products.py).

The kernel is compiled on first use with the system C compiler into the lcq cache (no build
step at install; images without a compiler build it into the package: build(SOURCE.parent)).
Without x86-64 Linux, AVX2/FMA/F16C or a compiler it is not used (one log line) and products
stay fp32; LCQ_CPU_HALF=0 turns it off for bit-exact fp32 products.
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

import torch

from lcq.paths import cache_dir

logger = logging.getLogger("lcq.kernels")

SOURCE = Path(__file__).with_name("cpu_half.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
MAX_ROWS = 8  # the kernel keeps one accumulator per activation row in registers


def enabled() -> bool:
    """True where the kernel runs here and LCQ_CPU_HALF is not 0."""
    return os.environ.get("LCQ_CPU_HALF", "1") != "0" and library() is not None


def half_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32 with 1 <= M <= MAX_ROWS, weight (N, K) float16 -> (M, N) float32."""
    x = x.contiguous()
    if x.dtype != torch.float32 or weight.dtype != torch.float16 or not weight.is_contiguous():
        raise TypeError("half_linear takes float32 activations and a contiguous float16 weight")
    y = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    status = library().lcq_half_matmul(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), weight.shape[0],
                                       y.data_ptr())
    if status != 0:
        raise ValueError(f"half_linear takes 1 to {MAX_ROWS} rows, got {x.shape[0]}")
    return y


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, built into the cache on first use; None where it cannot run."""
    reason = _unsupported()
    if reason is None:
        try:
            lib = ctypes.CDLL(str(_library_path()))
        except (OSError, subprocess.CalledProcessError) as e:
            reason = f"could not build it: {getattr(e, 'stderr', '') or e}"
    if reason is not None:
        logger.info("fp16 CPU kernel not used (%s); CPU products stay fp32", reason)
        return None
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    lib.lcq_half_matmul.argtypes = [pointer, integer, integer, pointer, integer, pointer]
    lib.lcq_half_matmul.restype = integer
    return lib


def _unsupported() -> str | None:
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


def _library_path() -> Path:
    """A copy built into the installed package (the CPU Docker image does this), else one built
    into the cache on first use."""
    prebuilt = SOURCE.with_name(_library_name())
    return prebuilt if prebuilt.is_file() else build(cache_dir() / "native")


def _library_name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    return f"cpu_half_{digest}.so"


def build(folder: Path) -> Path:
    """Compile into folder/cpu_half_<hash of source and flags>.so unless it is there; building in
    a temporary folder and renaming makes concurrent first uses safe."""
    target = folder / _library_name()
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([_compiler(), *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True,
                       text=True)
        os.replace(built, target)
    return target
