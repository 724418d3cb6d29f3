"""CUDA graphs of the decode forward pass, one per padded batch size.

A decode step launches hundreds of small kernels; replaying a captured graph removes their launch
cost. The graphs read their inputs from static buffers that each step fills in place. The
attention kernels take their loop bounds from context_lens in memory, so one graph serves any
context length up to max_model_len. Padding rows write nowhere (slot -1) and read one token of
block 0, so they cannot disturb real rows; with recurrent layers (Qwen3.5) they advance a scratch state
slot past the sequences' own.
"""
from __future__ import annotations

import logging

import torch

from lcq.models import ForwardContext
from lcq.models.lora import AdapterStack, LoRABatch

logger = logging.getLogger("lcq.engine")

MAX_GRAPH_BATCH = 256


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16 up to the engine's batch limit (capped at MAX_GRAPH_BATCH)."""
    top = min(max_num_seqs, MAX_GRAPH_BATCH)
    sizes = [s for s in (1, 2, 4, 8) if s < top] + list(range(16, top, 16))
    return sorted(set(sizes + [top]))


class DecodeGraphs:
    def __init__(self, model, max_num_seqs: int, max_blocks_per_seq: int, block_size: int, device: torch.device,
                 adapters: AdapterStack | None = None, num_groups: int = 1, scratch_state: int | None = None):
        """adapters: the LoRA adapter slots, whose products the graphs then hold for every row (each row's
        slot in a static buffer, -1 for the base model and padding). Loading and unloading adapters
        rewrites the slots in place, so the graphs stay valid. num_groups: layer groups (kv_groups.py),
        each with its own slots and block tables. scratch_state: with recurrent layers, the state slot that
        padding rows use (one past the sequences'), else None."""
        self.model = model
        self.adapters = adapters
        self.sizes = graph_batch_sizes(max_num_seqs)
        top = self.sizes[-1]
        self.input_ids = torch.zeros(top, dtype=torch.int64, device=device)
        self.positions = torch.zeros(top, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((num_groups, top), -1, dtype=torch.int64, device=device)
        self.query_start = torch.arange(top + 1, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(top, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(num_groups, top, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.adapter_slots = torch.full((top,), -1, dtype=torch.int64, device=device)
        self.scratch_state = scratch_state
        self.state_slots = None if scratch_state is None else \
            torch.full((top,), scratch_state, dtype=torch.int64, device=device)
        self.max_context_len = max_blocks_per_seq * block_size
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture()

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _context(self, size: int) -> ForwardContext:
        lora = None if self.adapters is None else \
            LoRABatch(self.adapters, self.adapter_slots[:size], every_layer=True)
        return ForwardContext(is_prefill=False, slot_mapping=self.slot_mapping[:, :size],
                              query_start=self.query_start[:size + 1], context_lens=self.context_lens[:size],
                              block_tables=self.block_tables[:, :size], max_query_len=1,
                              max_context_len=self.max_context_len, lora=lora,
                              state_slots=None if self.state_slots is None else self.state_slots[:size])

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for size in reversed(self.sizes):  # largest first, so the smaller ones fit in its memory pool
            args = (self.input_ids[:size], self.positions[:size], self._context(size))
            self.model(*args)  # compiles the kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.model(*args)
            pool = graph.pool()
            self.graphs[size] = (graph, hidden)
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        """Hidden states (n, hidden) of a decode step of n <= max_batch sequences."""
        n = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= n)
        width = context.block_tables.shape[-1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:, :n].copy_(context.slot_mapping)
        self.context_lens[:n].copy_(context.context_lens)
        self.block_tables[:, :n, :width].copy_(context.block_tables)
        if context.lora is not None:
            self.adapter_slots[:n].copy_(context.lora.slots)
        else:
            self.adapter_slots[:n].fill_(-1)
        if self.state_slots is not None:
            self.state_slots[:n].copy_(context.state_slots)
            self.state_slots[n:size].fill_(self.scratch_state)
        if size > n:
            self.input_ids[n:size].zero_()
            self.positions[n:size].zero_()
            self.slot_mapping[:, n:size].fill_(-1)
            self.context_lens[n:size].fill_(1)
            self.block_tables[:, n:size].zero_()
            self.adapter_slots[n:size].fill_(-1)
        graph, hidden = self.graphs[size]
        graph.replay()
        return hidden[:n]
