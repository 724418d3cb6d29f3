"""The autotuner's builds compiled side by side before it times them.

Triton's autotuner compiles the configs it times one after another as it comes to them: on a GPU's first start the
engine's warm-up waits for every build of every tuning key in turn (about 1.5 s each, sm_90 builds on a 2-core Zen 4;
a 7B W2 model's decode and prompt products ask for ~70). Before a key's first launch, compile_ahead hands every
config the autotuner will time to a pool of threads instead (Triton's AsyncCompileMode, what its `warmup` compiles
into; the compiles release the GIL: 8 products-of-bytes builds took 4.8 s on 2 threads against 7.9 s on one), so
that the autotuner finds them built and only times them. Compiles already on disk (Triton's cache) load at once.
Only within compiling_ahead() (the CUDA graphs' warm-up), so that launches outside it pay nothing for it.
LCQ_COMPILE_THREADS sets the pool (default: the CPU's cores, at most 8; 0 or 1: the autotuner's own order).
Not yet run on a GPU.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

logger = logging.getLogger("lcq.kernels")
MAX_THREADS = 8  # each compile holds a few hundred MB of host memory while it runs
_active = False


@contextlib.contextmanager
def compiling_ahead() -> Iterator[None]:
    """Within it, compile_ahead compiles a tuning key's configs side by side before its first launch."""
    global _active
    previous, _active = _active, True
    try:
        yield
    finally:
        _active = previous


def warming_up() -> bool:
    """Whether launches run within compiling_ahead() (the CUDA graphs' warm-up): the launches that first meet the
    tuning keys, where the pre-tuned configs are looked up too (tuned_configs)."""
    return _active


def compile_threads() -> int:
    return int(os.environ.get("LCQ_COMPILE_THREADS", min(MAX_THREADS, os.cpu_count() or 1)))


def tuning_key(tuner, args: tuple, constants: dict) -> tuple:
    """The key the autotuner files a launch's choice under (triton.runtime.autotuner.Autotuner.run, Triton 3.6-3.9):
    the values of its key arguments, then the dtypes of the launch's tensors."""
    named = {name: value for name, value in {**dict(zip(tuner.arg_names, args)), **constants}.items()
             if name in tuner.arg_names}
    return tuple([named[name] for name in tuner.keys if name in named]
                 + [str(value.dtype) for value in named.values() if hasattr(value, "dtype")])


def compile_ahead(tuner, configs: Callable[[], list], args: tuple, constants: dict) -> None:
    """Within compiling_ahead(), compile each of configs() (the ones the autotuner will time for this launch, after
    its prune) for the launch tuner[grid](*args, **constants) on compile_threads() threads, unless the autotuner has
    chosen for its key already. A build that fails is left to the autotuner, which meets the same error and skips the
    config; anything else only costs the head start (logged)."""
    if not _active or compile_threads() <= 1 or not (isinstance(args[0], torch.Tensor) and args[0].is_cuda) \
            or tuning_key(tuner, args, constants) in tuner.cache:
        return
    try:
        from triton.runtime._async_compile import AsyncCompileMode  # (Triton's own module, 3.6-3.9)

        with ThreadPoolExecutor(compile_threads()) as pool, AsyncCompileMode(pool, ignore_errors=True):
            for config in configs():
                tuner.fn.warmup(*args, grid=(1,), **{**constants, **config.all_kwargs()})  # as the tuner merges
    except Exception as error:  # noqa: BLE001 - the autotuner compiles what is missing, as without this
        logger.warning("compiling %s's configs ahead failed (%s: %s); the autotuner compiles them as it times them",
                       tuner.fn.fn.__name__, type(error).__name__, error)
