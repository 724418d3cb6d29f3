"""How the process treats its memory: what the garbage collector walks, what the heap keeps, and
how much the machine has left.

Once an engine is loaded, everything alive is frozen out of the garbage collector: Python's full
collections, which the objects requests leave behind trigger now and then (once in the first
64-request workload on SmolLM2-135M's CPU engine), each walked the 300,000 objects of torch,
transformers and the model, a 0.15 s pause for every stream.

The heap is glibc's (elsewhere the heap functions do nothing). Between steps of a CPU engine, freed
memory stays in it: by default glibc hands large freed blocks straight back to the kernel (each one
a private mapping, and the heap's top trimmed past a few tens of MB), so every prefill step's
activations, tens of MB, came back as fresh zero-filled pages: 120,000-260,000 page faults per
prefill of 64 prompts on SmolLM2-135M and 3-6% of its CPU time in the kernel. When an engine goes
idle, it is given back (malloc_trim), so memory after a burst of requests returns to where it was.
"""
from __future__ import annotations

import atexit
import ctypes
import gc
import logging
import math
import mmap
from pathlib import Path

import torch

logger = logging.getLogger("lcq.engine")

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # the largest glibc accepts on 64-bit; blocks above it are mapped
TRIM_THRESHOLD_BYTES = 256 << 20  # above a prefill step's activations (tens of MB)


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (both exist in glibc only)
        return libc
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return None


_LIBC = _glibc()


def keep_freed_memory() -> bool:
    """Let freed blocks up to 32 MB stay in the heap for the next step; True if the heap now does.
    The mapping threshold is set first: setting either one fixes both (glibc stops adapting them),
    and a fixed 128 KB mapping threshold alone would map every activation."""
    if _LIBC is None or not _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES):
        return False
    return bool(_LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def return_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc malloc_trim); a no-op elsewhere."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def zeroed_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of zeros on fresh anonymous pages, which the kernel fills with zeros as each is first
    touched: a KV pool costs nothing at start-up (torch.zeros wrote every byte, about 0.4 s a GB, twice
    for K and V) and takes memory only as its blocks are used. Private pages: Python's default mapping is
    shared, whose pages the kernel keeps as shared memory, and first touches of those took 1.45x as long
    (256 MB a page at a time on a 2-core guest: 1.46 against 2.1 GB/s), the time a prefill step's KV
    writes wait on."""
    count = math.prod(shape)
    pages = mmap.mmap(-1, max(1, count * torch.empty(0, dtype=dtype).element_size()), flags=mmap.MAP_PRIVATE)
    return torch.frombuffer(pages, dtype=dtype, count=count).view(shape)  # the tensor keeps the mapping


def available_memory_bytes(root: Path = Path("/")) -> int | None:
    """What can still be allocated without swapping or hitting a container's limit: the kernel's
    MemAvailable, or less where the process's memory cgroup (v2 memory.max, v1 limit_in_bytes) leaves
    less above its usage (a container limited to 16 GB on a 256 GB host sees the host's
    MemAvailable); None where /proc/meminfo does not say. `root`: where /proc and /sys are (tests)."""
    meminfo = _read(root / "proc/meminfo")
    line = next((entry for entry in (meminfo or "").splitlines() if entry.startswith("MemAvailable:")), None)
    if line is None:
        return None
    available = int(line.split()[1]) * 1024
    headroom = _cgroup_headroom(root)
    return available if headroom is None else min(available, headroom)


def _cgroup_headroom(root: Path) -> int | None:
    """The memory cgroup's limit minus its usage, or None without a limit. Where the cgroup's own
    folder is not mounted (a container sees its cgroup at the mount's top), the top's files."""
    for entry in (_read(root / "proc/self/cgroup") or "").splitlines():
        _, controllers, path = entry.split(":", 2)
        if controllers == "":  # v2: the unified hierarchy
            folders, files, cache = [root / "sys/fs/cgroup"], ("memory.max", "memory.current"), "inactive_file"
        elif "memory" in controllers.split(","):
            folders, files = [root / "sys/fs/cgroup/memory"], ("memory.limit_in_bytes", "memory.usage_in_bytes")
            cache = "total_inactive_file"
        else:
            continue
        folders.insert(0, folders[0] / path.lstrip("/"))
        for folder in folders:
            limit, usage = (_read(folder / name) for name in files)
            if limit is None or usage is None:
                continue
            limit = limit.strip()
            if limit == "max" or int(limit) >= 1 << 60:  # no limit here (v1 writes a huge number)
                break
            return max(0, int(limit) - int(usage) + _stat(folder, cache))
    return None


def _stat(folder: Path, name: str) -> int:
    """A field of the cgroup's memory.stat (0 if absent): here the file cache not touched lately (inactive_file),
    which the kernel reclaims before it kills anything and which the usage counts (the model's safetensors read at
    load: counted again, a pool that fits was refused), as docker stats and the kubelet leave it out."""
    for line in (_read(folder / "memory.stat") or "").splitlines():
        key, _, value = line.partition(" ")
        if key == name and value.strip().isdigit():
            return int(value)
    return 0


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, ValueError):
        return None


def freeze_loaded_objects() -> None:
    """Leave every object alive now out of later collections (gc.freeze), until exit: then they are
    released, so the final collection still frees them (native bindings report what it does not as
    leaks). Objects frozen this way that later become unreachable through reference cycles are not
    freed, so the model breaks no cycle it is part of (cpu_decode.py keeps no reference to it)."""
    gc.collect()  # what is garbage already is freed, not frozen
    gc.freeze()
    logger.info("froze %d objects out of the garbage collector", gc.get_freeze_count())
    atexit.unregister(gc.unfreeze)
    atexit.register(gc.unfreeze)
