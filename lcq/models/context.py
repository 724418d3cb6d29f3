"""What one forward pass needs to read and write the paged KV cache.

The runtime builds it for every step; attention layers read it. KV cache per layer:
two tensors (num_blocks, block_size, num_kv_heads, head_dim). Token t of a sequence lives in
slot block_table[t // block_size] * block_size + t % block_size. Where the layers are in groups with
block tables of their own (lcq/runtime/kv_groups.py), slot_mapping and block_tables have a leading
group dimension, and group(g) is what group g's layers read.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .lora import LoRABatch


@dataclass
class ForwardContext:
    """Flattened batch of `num_tokens` new tokens from `num_seqs` sequences.

    is_prefill   True when any sequence contributes more than one token (chunked prefill,
                 possibly after a cached prefix); False for pure decode (one token each).
    slot_mapping int64 (num_tokens,) or (groups, num_tokens): cache slot for each new token's K and V
                 (-1: do not write).
    query_start  int32 (num_seqs + 1,): cumulative new-token counts, query_start[-1] == num_tokens.
    context_lens int32 (num_seqs,): tokens in cache after this step (cached prefix + new ones).
    block_tables int32 (num_seqs, max_blocks) or (groups, num_seqs, max_blocks): cache blocks of each
                 sequence, padded with -1 (and -1 where a sliding window has handed a block back).
    max_query_len, max_context_len: python ints for kernel launch sizes.
    lora         the step's LoRA adapters and their rows, or None when no sequence uses one.
    state_slots  int64 (num_seqs,): each query's slot of the recurrent layers' states (Qwen3.5, Granite
                 4.0-H, LFM2), or None for a model without them; a sequence verifying drafts has one query per
                 token, all in its slot.
    drafting_slots the slots of the sequences verifying drafts: their recurrent layers advance one token at a
                 time and keep each token's state until the engine says how many were accepted (keep_states).
    batch_invariant every query attends through the prefill kernel's tiles, decode steps too, so that its values
                 do not depend on the step (EngineConfig.batch_invariant).
    """

    is_prefill: bool
    slot_mapping: torch.Tensor
    query_start: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    max_context_len: int
    lora: LoRABatch | None = None
    state_slots: torch.Tensor | None = None
    drafting_slots: frozenset[int] = frozenset()
    batch_invariant: bool = False

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @property
    def num_groups(self) -> int:
        return 1 if self.block_tables.dim() == 2 else self.block_tables.shape[0]

    def group(self, index: int) -> ForwardContext:
        """The context of layer group `index`: its slots and block tables."""
        if self.block_tables.dim() == 2:
            return self
        return dataclasses.replace(self, slot_mapping=self.slot_mapping[index], block_tables=self.block_tables[index])
