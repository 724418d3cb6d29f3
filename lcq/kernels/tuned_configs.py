"""Configs the autotuner chose on a GPU kind, shipped with the package, so that an engine's first start on that kind
takes them instead of timing every config of each tuning key (vLLM ships its fused-MoE kernels' configs per device
so). Without them a first start times each key's configs in its warm-up (the autotuner's choices are then kept in
Triton's cache on disk, which a fresh container does not have).

A table is `lcq/kernels/tuned/<device>.json` (`device_slug`: the GPU's name, lower case, runs of other characters
as '-'), written by `python bench/autotune_table.py gpu-session/autotune --pretuned DEVICE` from the autotuner's
timings a GPU session brought back: per kernel, each tuning key (`compile_ahead.tuning_key`: shapes, forms and the
tensors' dtypes) and the config chosen for it. A launch takes a table's config only where the table was written
by the Triton release it runs on (another release builds the same config differently) and the config is one the
autotuner would time for that launch; otherwise it is tuned as before. Looked up in the engine's warm-up, which
meets the decode products' keys before the CUDA graphs are captured. LCQ_PRETUNED=0 tunes every key.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
import triton

from .compile_ahead import tuning_key, warming_up

logger = logging.getLogger("lcq.kernels")
TABLES = Path(__file__).parent / "tuned"
LAUNCH_FIELDS = ("num_warps", "num_stages", "num_ctas", "maxnreg")  # a config's fields beside its kwargs


def device_slug(name: str) -> str:
    """A GPU's name as a table's file name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def release(version: str) -> str:
    """A Triton version's release, major.minor: '3.6.0' -> '3.6'."""
    return ".".join(version.split(".")[:2])


def _hashable(value):
    return tuple(_hashable(item) for item in value) if isinstance(value, list) else value


@functools.lru_cache(maxsize=None)
def table(slug: str, folder: Path = TABLES) -> dict[tuple[str, tuple], dict]:
    """(kernel, tuning key) -> the chosen config's fields ({"kwargs": ..., "num_warps": ..., ...}) of the table for
    this device, where one was written by this Triton's release; empty otherwise."""
    path = folder / f"{slug}.json"
    if not path.is_file():
        return {}
    written = json.loads(path.read_text())
    if release(written.get("triton", "")) != release(triton.__version__):
        logger.info("pre-tuned configs for %s are Triton %s's, this is %s: tuning instead", slug,
                    written.get("triton"), triton.__version__)
        return {}
    return {(entry["kernel"], _hashable(entry["key"])): entry["config"] for entry in written["entries"]}


def matches(config: triton.Config, fields: dict) -> bool:
    """Whether config is the one a table's fields describe (its kwargs, and each launch field the table gives)."""
    return config.kwargs == fields.get("kwargs", {}) and all(
        getattr(config, name, None) == fields[name] for name in LAUNCH_FIELDS if fields.get(name) is not None)


def take_pretuned(tuner, args: tuple, constants: dict, candidates: Callable[[], list],
                  slug: str | None = None, folder: Path = TABLES) -> bool:
    """Before a tuned launch tuner[grid](*args, **constants) in the engine's warm-up (warming_up: where the keys are
    first met, so that later launches pay nothing for the lookup): where this GPU's table holds the launch's tuning
    key and its config is among candidates() (what the autotuner would time), file it as the key's choice, so that
    the launch neither compiles nor times the others. slug: the device's (by default from args[0], a CUDA tensor).
    Whether it did."""
    if not warming_up() or os.environ.get("LCQ_PRETUNED", "1") == "0":
        return False
    if slug is None:
        first = args[0]
        if not (isinstance(first, torch.Tensor) and first.is_cuda):
            return False
        slug = device_slug(torch.cuda.get_device_name(first.device))
    key = tuning_key(tuner, args, constants)
    if key in tuner.cache:
        return False
    fields = table(slug, folder).get((tuner.fn.fn.__name__, key))
    if fields is None:
        return False
    chosen = next((config for config in candidates() if matches(config, fields)), None)
    if chosen is None:
        logger.info("the pre-tuned config %s of %s is none the autotuner times now: tuning instead", fields,
                    tuner.fn.fn.__name__)
        return False
    tuner.cache[key] = chosen
    return True
