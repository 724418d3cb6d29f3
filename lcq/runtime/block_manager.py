"""The paged KV cache's blocks: allocation, reference counts and prefix caching.

A full block is known by the hash of its tokens chained with its predecessor's hash, so equal
prompt prefixes map to equal blocks. Freed blocks keep their hash until reused (least recently
freed first), so a later request with the same prefix skips recomputing it.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: int | None = None
    tokens: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.by_hash: dict[int, int] = {}
        self.enable_prefix_caching = enable_prefix_caching

    @property
    def num_total_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def reuse_cached_prefix(self, seq: Sequence) -> None:
        """For a sequence with nothing computed: take the cached blocks of its longest cached prefix of
        full blocks. The last prompt token is always recomputed so the step has logits to sample from;
        a sequence asking for prompt logprobs computes every prompt token."""
        if not self.enable_prefix_caching or seq.block_table or seq.params.prompt_logprobs is not None:
            return
        parent = _seed(seq)
        for start in range(0, len(seq) - 1 - (len(seq) - 1) % self.block_size, self.block_size):
            tokens = tuple(seq.token_ids[start:start + self.block_size])
            key = hash((parent, tokens))
            block_id = self.by_hash.get(key)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            parent = key
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * self.block_size

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give the sequence blocks for its first num_tokens tokens."""
        while len(seq.block_table) < self.blocks_needed(num_tokens):
            block_id = next(iter(self.free))
            block = self.blocks[block_id]
            if block.hash is not None and self.by_hash.get(block.hash) == block_id:
                del self.by_hash[block.hash]
            block.hash, block.tokens = None, ()
            self._take(block_id)
            seq.block_table.append(block_id)

    def register_full_blocks(self, seq: Sequence) -> None:
        """Hash the sequence's blocks that are now full of computed tokens, for later reuse."""
        if not self.enable_prefix_caching:
            return
        first = seq.num_hashed_blocks  # blocks before it are hashed already: each step hashes only new ones
        parent = self.blocks[seq.block_table[first - 1]].hash if first else _seed(seq)
        for index in range(first, seq.num_computed_tokens // self.block_size):
            block = self.blocks[seq.block_table[index]]
            if block.hash is None:
                block.tokens = tuple(seq.token_ids[index * self.block_size:(index + 1) * self.block_size])
                block.hash = hash((parent, block.tokens))
                written = self.by_hash.setdefault(block.hash, block.id) == block.id
                if written and (index + 1) * self.block_size <= seq.num_prompt_tokens:
                    seq.num_cache_written_tokens += self.block_size
            parent = block.hash
            seq.num_hashed_blocks = index + 1

    def release(self, seq: Sequence) -> None:
        """Return the sequence's blocks; the last ones are reused first (they are least likely shared)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = seq.num_hashed_blocks = 0

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1


def _seed(seq: Sequence) -> str | None:
    """What a sequence's first block hash is chained to: the load of its LoRA adapter (a load's KV differs
    from the base model's, and from another load's under the same name, for the same tokens), or None."""
    return None if seq.adapter is None else seq.adapter.load_id
