"""CUDA graphs of the decode forward pass, one per padded batch size.

A decode step launches hundreds of small kernels; replaying a captured graph removes their launch
cost. The graphs read their inputs from static views of one device buffer, which each step fills in
one copy from a pinned host buffer (step_inputs.py). The attention kernels take their loop bounds from
context_lens in memory, so one graph serves any context length up to max_model_len. Padding rows write
nowhere (slot -1) and read one token of block 0, so they cannot disturb real rows; with recurrent layers
(Qwen3.5) they advance a scratch state slot past the sequences' own.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from lcq.kernels.compile_ahead import compiling_ahead
from lcq.models import ForwardContext
from lcq.models.lora import AdapterStack, LoRABatch

from .step_inputs import StepInputs, StepLayout, pack, pad

logger = logging.getLogger("lcq.engine")

MAX_GRAPH_BATCH = 256


def graph_batch_sizes(max_num_seqs: int, wanted: list[int] | None = None) -> list[int]:
    """The decode batch sizes to capture: `wanted` (EngineConfig.cuda_graph_sizes), or else 1, 2, 4, 8, then
    multiples of 16; none past the engine's batch limit (capped at MAX_GRAPH_BATCH), which stands in for larger
    ones (no batch is larger), and the limit itself where the default's sizes stop short of it."""
    top = min(max_num_seqs, MAX_GRAPH_BATCH)
    if wanted:
        return sorted({min(size, top) for size in wanted})
    sizes = [s for s in (1, 2, 4, 8) if s < top] + list(range(16, top, 16))
    return sorted(set(sizes + [top]))


class DecodeGraphs:
    def __init__(self, model, max_num_seqs: int, max_blocks_per_seq: int, block_size: int, device: torch.device,
                 adapters: AdapterStack | None = None, num_groups: int = 1, scratch_state: int | None = None,
                 sizes: list[int] | None = None):
        """adapters: the LoRA adapter slots, whose products the graphs then hold for every row (each row's
        slot in a static buffer, -1 for the base model and padding). Loading and unloading adapters
        rewrites the slots in place, so the graphs stay valid. num_groups: layer groups (kv_groups.py),
        each with its own slots and block tables. scratch_state: with recurrent layers, the state slot that
        padding rows use (one past the sequences'), else None. sizes: the batch sizes asked for
        (graph_batch_sizes)."""
        self.model = model
        self.adapters = adapters
        self.sizes = graph_batch_sizes(max_num_seqs, sizes)
        top = self.sizes[-1]
        self.scratch_state = scratch_state
        self.max_context_len = max_blocks_per_seq * block_size
        # The static inputs: views of one device buffer, which each step fills from a pinned one of the same
        # layout in one copy, once the copy before it is done (`copied`)
        self.layout = StepLayout(top, top, num_groups, max_blocks_per_seq, scratch_state is not None)
        self.staging = torch.zeros(self.layout.numel, dtype=torch.int64, pin_memory=True)
        self.staged = self.layout.views(self.staging).map(torch.Tensor.numpy)
        pad(self.staged, 0, top, max_blocks_per_seq, scratch_state)
        self.buffer = self.staging.to(device)
        self.inputs = self.layout.views(self.buffer)
        self.copied = torch.cuda.Event()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture()

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _context(self, size: int) -> ForwardContext:
        inputs = self.inputs
        lora = None if self.adapters is None else \
            LoRABatch(self.adapters, inputs.adapter_slots[:size], every_layer=True)
        return ForwardContext(is_prefill=False, slot_mapping=inputs.slot_mapping[:, :size],
                              query_start=inputs.query_start[:size + 1], context_lens=inputs.context_lens[:size],
                              block_tables=inputs.block_tables[:, :size], max_query_len=1,
                              max_context_len=self.max_context_len, lora=lora,
                              state_slots=None if inputs.state_slots is None else inputs.state_slots[:size])

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        started = time.perf_counter()
        logger.info("capturing CUDA graphs for decode batch sizes %s; a first start also tunes and compiles the "
                    "products' kernels for each (up to minutes; kept in Triton's cache for the next start)", self.sizes)
        for size in reversed(self.sizes):  # largest first, so the smaller ones fit in its memory pool
            args = (self.inputs.input_ids[:size], self.inputs.positions[:size], self._context(size))
            with compiling_ahead():  # the autotuner's builds side by side
                self.model(*args)  # compiles (and tunes) the kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.model(*args)
            pool = graph.pool()
            self.graphs[size] = (graph, hidden)
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s in %.1f s", self.sizes,
                    time.perf_counter() - started)

    def run(self, step: StepInputs[np.ndarray], next_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (n, hidden) of a decode step of n <= max_batch sequences (one token each); next_tokens:
        their token ids on the device, in place of step's (a step launched ahead of its tokens)."""
        n = step.num_seqs
        size = next(s for s in self.sizes if s >= n)
        self.copied.synchronize()  # the last step's copy has read the pinned buffer
        pack(self.staged, step)
        pad(self.staged, n, size, step.block_tables.shape[2], self.scratch_state)
        count = self.layout.prefix(size)
        self.buffer[:count].copy_(self.staging[:count], non_blocking=True)
        self.copied.record()
        if next_tokens is not None:
            self.inputs.input_ids[:n].copy_(next_tokens)
        graph, hidden = self.graphs[size]
        graph.replay()
        return hidden[:n]
