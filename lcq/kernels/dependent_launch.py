"""Programmatic dependent launch (Hopper and later) for the kernels of a decode step.

A decode step is a chain of ~10 kernels a layer, each short (a 2-bit product at one row takes ~10-25 us on
an H200) and each waiting for the one before it: at every boundary the GPU drains one grid, then launches
and ramps up the next. With dependent launch a kernel may start while the one before it still runs, and
waits (griddepcontrol.wait) only where it first reads what earlier kernels wrote; it lets the next one start
as soon as it has passed that point itself. A product issues its first tiles' weight loads before its wait,
so their latency overlaps the end of the norm or activation before it. In a CUDA graph the launches are
captured as programmatic edges (docs/kernels.md has what it saved on an H200).

Every kernel launched with it must wait, in every program, before it reads any earlier kernel's output or
writes anything, and before it ends: a kernel that passed its wait knows the kernel before it has finished,
and so, transitively, every kernel before that. LCQ_PDL=0 turns it off (bench/generate.py --variants no-pdl
measures both).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@functools.cache
def _supported(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def dependent_launch(tensor: torch.Tensor) -> dict:
    """The launch arguments of a kernel that takes PDL (wait_for_earlier_kernels) for data on tensor's device:
    dependent launch on CUDA devices of compute capability 9.0 or more unless LCQ_PDL=0, else none."""
    on = tensor.is_cuda and os.environ.get("LCQ_PDL", "1") != "0" and \
        _supported(tensor.device.index if tensor.device.index is not None else torch.cuda.current_device())
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def wait_for_earlier_kernels(PDL: tl.constexpr):
    """Where a kernel launched with dependent launch first needs earlier kernels' results: wait for them, then
    let the next kernel start (it will wait for this one in turn). Nothing without PDL."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
