"""The paged KV cache's blocks: allocation, reference counts and prefix caching.

Every layer group (kv_groups.py) has its own block table per sequence, all drawing on one pool. A
sliding-window group (or a group attending within chunks: Llama 4's) keeps only the blocks a step may
still read: as the sequence grows, the blocks before its window or chunk (less the attention kernels'
read margin) go back to the pool and their table entries become -1, which no kernel reads.

A full block is known by the hash of its tokens chained with its predecessor's hash (SHA-256: block_key), so
equal prompt prefixes map to equal blocks (one per group). Freed blocks keep their hash until reused, so a
later request with the same prefix skips recomputing it; a sliding-window group needs only the blocks
its window reaches at the end of that prefix. Empty free blocks are handed out before any cached one is
given up (those least recently freed first): a table's next block is the one after its last where that is
empty, else the empty block of lowest id. So a sequence's blocks tend to lie one after another in memory,
and those in use at the pool's start, however long the server has run. On a 2-core Zen 4 the CPU's decode
attention read contiguous tables 1.12-1.26x faster than scattered ones (64 sequences of 16-400 tokens, 16 of
1,500); with the free list in the order blocks were freed (before), the 64-request benchmark ran 1.02x
slower from a shuffled pool, what a long-running server's becomes, than from a fresh one.

A model with recurrent layers (Qwen3.5's linear attention, Granite 4.0-H's Mamba-2, LFM2's short
convolutions) keeps a state per sequence instead of blocks in those layers: each running sequence holds one
of `state_slots` slots, from its first step until its blocks go back. Such a state cannot be rebuilt from cached blocks, so its prefix caching keeps states too: a prompt's
chunks stop at the end of its last full block before its last token (the longest prefix a later request can
reuse), where its state is copied into one of the `snapshot_slots`, known by that block's chain hash (the
least recently used kept state gives way); while it decodes, its state at the end of each block its reply
fills takes the place of the one before, so that the reply so far is kept too (the next turn of a
conversation sends it back). A later prompt reuses the longest cached prefix whose end has a kept state,
which its slot takes before its first step; without one, nothing is reused.
"""
from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
from collections.abc import Sequence as Tokens
from dataclasses import dataclass

from .sequence import Sequence

# The attention kernels read a window's keys in tiles of this many from the tile where it begins
# (cpu_prefill_attention.c's KEYS, paged_attention.py's BLOCK_N): the blocks under that tile are kept too.
KEY_TILE = 32
RELEASED = -1  # a sliding-window table's entry for a block handed back


@dataclass
class Block:
    id: int
    ref_count: int = 0
    key: tuple[int, bytes] | None = None  # (group, chain hash) while it holds a registered full block
    tokens: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool, windows: tuple[int, ...] = (0,),
                 state_slots: int = 0, snapshot_slots: range = range(0)):
        """windows: each group's sliding window in tokens, -size for chunks, 0 for full attention
        (KVGroups.windows); state_slots: recurrent layers' running sequences' slots (0: a model without);
        snapshot_slots: the slots that keep prefixes' states (none: no prefix caching for such a model)."""
        self.block_size = block_size
        self.windows = windows
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # free blocks holding a cached block
        self.empty: set[int] = set(range(num_blocks))  # the other free blocks
        self.empty_heap = list(range(num_blocks))  # the empty ones' ids, and some no longer empty (skipped)
        self.by_hash: dict[tuple[int, bytes], int] = {}
        self.enable_prefix_caching = enable_prefix_caching and (not state_slots or len(snapshot_slots) > 0)
        self.keeps_states = bool(state_slots) and self.enable_prefix_caching
        self.free_states = list(range(state_slots))[::-1]
        self.snapshots: OrderedDict[bytes, int] = OrderedDict()  # chain hash -> slot, least recently used first
        self.free_snapshots = list(snapshot_slots)[::-1]
        self.state_copies: list[tuple[int | None, int]] = []  # (from slot or None: zeros, to slot) before the next step
        self.restoring: set[int] = set()  # kept states' slots that sequences take up before their next step

    @property
    def num_total_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.empty) + len(self.cached_free)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def first_kept(self, group: int, position: int) -> int:
        """The first block of `group` that a step computing tokens from `position` on may read: 0, or with
        a sliding window (attention chunks) the one under the key tile where the window (chunk) of
        `position` begins."""
        window = self.windows[group]
        if not window:
            return 0
        first = max(0, position - window + 1) if window > 0 else position // -window * -window
        return first // KEY_TILE * KEY_TILE // self.block_size

    def most_blocks_held(self, num_tokens: int, max_step_tokens: int) -> int:
        """The most blocks one sequence of num_tokens tokens holds over all groups, its steps computing at
        most max_step_tokens tokens each: what it takes to serve it alone."""
        whole = self.blocks_needed(num_tokens)
        reach = self.blocks_needed(KEY_TILE + max_step_tokens) + 1
        return sum(min(whole, self.blocks_needed(abs(window)) + reach) if window else whole for window in self.windows)

    def waits_for_prefix(self, seq: Sequence, running: list[Sequence]) -> bool:
        """Whether seq, nothing of it computed, should wait for a running sequence still computing the whole blocks
        its prompt would take from the cache (n choices of one prompt, or a prompt sent twice at once), rather than
        compute them again beside it (vLLM caches blocks as they are allocated; here they are kept once computed).
        Not where a hit needs a recurrent state kept at its end, which the other may not keep there."""
        if not self.enable_prefix_caching or self.keeps_states or seq.block_tables or seq.num_computed_tokens \
                or seq.params.prompt_logprobs is not None:
            return False
        whole = (len(seq) - 1) // self.block_size * self.block_size  # (reuse_cached_prefix's: the last recomputed)
        if not whole:
            return False
        seed, prefix = _seed(seq), seq.token_ids[:whole]
        return any(other.num_computed_tokens < whole and _seed(other) == seed and other.token_ids[:whole] == prefix
                   for other in running)

    def reuse_cached_prefix(self, seq: Sequence) -> None:
        """For a sequence with nothing computed: take the cached blocks of its longest cached prefix of
        full blocks that every group can go on from (a sliding group needs only the blocks its window
        reaches at the prefix's end). The last prompt token is always recomputed so the step has logits
        to sample from; a sequence asking for prompt logprobs computes every prompt token."""
        if not self.enable_prefix_caching or seq.block_tables or seq.params.prompt_logprobs is not None:
            return
        keys, parent = [], _seed(seq)
        for start in range(0, len(seq) - 1 - (len(seq) - 1) % self.block_size, self.block_size):
            parent = block_key(parent, seq.token_ids[start:start + self.block_size])
            keys.append(parent)
        cached = [[self._cached(group, index, key, seq) for index, key in enumerate(keys)]
                  for group in range(len(self.windows))]
        count = len(keys)
        for held, window in zip(cached, self.windows):  # a full group: its leading run of cached blocks
            if not window:
                count = min(count, next((i for i, block_id in enumerate(held) if block_id is None), len(held)))
        while count and not (all(None not in held[self.first_kept(group, count * self.block_size):count]
                                 for group, held in enumerate(cached) if self.windows[group]) and
                             (not self.keeps_states or keys[count - 1] in self.snapshots)):
            count -= 1
        if self.keeps_states and count:  # its state at the prefix's end, taken before its first step
            seq.state_restore = self.snapshots[keys[count - 1]]
            self.restoring.add(seq.state_restore)
            self.snapshots.move_to_end(keys[count - 1])
        for group in range(len(self.windows)):
            first = self.first_kept(group, count * self.block_size)
            table = [RELEASED] * first
            for index in range(first, count):
                table.append(cached[group][index])
                self._take(table[-1])
            seq.block_tables.append(table)
        seq.num_computed_tokens = count * self.block_size
        if seq.first_scheduled_time is None:  # prompt tokens served from the cache, not a preempted one's recompute
            seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
        seq.tables_version += 1

    def _cached(self, group: int, index: int, key: bytes, seq: Sequence) -> int | None:
        """The block of `group` registered for the sequence's full block `index`, whose chain hash is `key`."""
        block_id = self.by_hash.get((group, key))
        if block_id is None:
            return None
        tokens = tuple(seq.token_ids[index * self.block_size:(index + 1) * self.block_size])
        return block_id if self.blocks[block_id].tokens == tokens else None

    def snapshot_point(self, seq: Sequence) -> int:
        """Where a sequence's state is kept for its prompt's prefix: the end of the last full block before its
        last prompt token (0: none, or no states kept)."""
        return (seq.num_prompt_tokens - 1) // self.block_size * self.block_size if self.keeps_states else 0

    def chunk(self, seq: Sequence, count: int) -> int:
        """`count` tokens to compute for seq this step, fewer where they would pass its snapshot point."""
        begin, point = seq.num_computed_tokens, self.snapshot_point(seq)
        return point - begin if begin < point < begin + count else count

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self._growth(seq, num_tokens) <= self.num_free_blocks

    def _growth(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks that grow() takes from the pool, less those it hands back."""
        needed = self.blocks_needed(num_tokens)
        tables = seq.block_tables or [[] for _ in self.windows]
        growth = 0
        for group, table in enumerate(tables):
            growth += max(0, needed - len(table))
            growth -= sum(1 for index in self._passed(seq, group)
                          if table[index] != RELEASED and self.blocks[table[index]].ref_count == 1)
        return growth

    def _passed(self, seq: Sequence, group: int) -> range:
        """Indices of the group's table entries that its window has passed and are not yet handed back."""
        start = seq.num_released[group] if seq.num_released else 0
        return range(start, self.first_kept(group, seq.num_computed_tokens))

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give the sequence blocks for its first num_tokens tokens, and hand back those that its sliding
        windows have passed; a sequence's first step takes a state slot where the model has them."""
        if not seq.block_tables:
            seq.block_tables = [[] for _ in self.windows]
        if self.free_states and seq.state_slot is None:
            seq.state_slot = self.free_states.pop()
            self.state_copies.append((None, seq.state_slot))  # zeros: it holds the last sequence's states
        before = len(seq.block_tables[0]), seq.num_released
        for group, table in enumerate(seq.block_tables):  # every group's first: can_grow counted them as free
            for index in self._passed(seq, group):
                if table[index] != RELEASED:
                    self._give_back(table[index])
                    table[index] = RELEASED
        for table in seq.block_tables:
            while len(table) < self.blocks_needed(num_tokens):
                block_id = self._next_free(table)
                block = self.blocks[block_id]
                if block.key is not None and self.by_hash.get(block.key) == block_id:
                    del self.by_hash[block.key]
                block.key, block.tokens = None, ()
                self._take(block_id)
                table.append(block_id)
        seq.num_released = [self.first_kept(group, seq.num_computed_tokens) for group in range(len(self.windows))]
        if (len(seq.block_tables[0]), seq.num_released) != before:
            seq.tables_version += 1

    def register_full_blocks(self, seq: Sequence) -> None:
        """Hash the sequence's blocks that are now full of computed tokens, for later reuse."""
        if not self.enable_prefix_caching:
            return
        for index in range(len(seq.block_hashes), seq.num_computed_tokens // self.block_size):
            tokens = tuple(seq.token_ids[index * self.block_size:(index + 1) * self.block_size])
            key = block_key(seq.block_hashes[-1] if seq.block_hashes else _seed(seq), tokens)
            seq.block_hashes.append(key)
            for group, table in enumerate(seq.block_tables):
                block = self.blocks[table[index]] if table[index] != RELEASED else None
                if block is None or block.key is not None:
                    continue
                block.key, block.tokens = (group, key), tokens
                written = self.by_hash.setdefault(block.key, block.id) == block.id
                if group == 0 and written and (index + 1) * self.block_size <= seq.num_prompt_tokens:
                    seq.num_cache_written_tokens += self.block_size
        point, computed = self.snapshot_point(seq), seq.num_computed_tokens
        if not self.keeps_states or seq.state_slot is None or not computed or computed % self.block_size:
            return
        if computed == point:
            self._keep_state(seq, seq.block_hashes[point // self.block_size - 1])
        elif computed > max(point, seq.num_prompt_tokens - 1):  # the reply so far, at a block's end
            self._keep_state(seq, seq.block_hashes[computed // self.block_size - 1], rolling=True)

    def passed_snapshot(self, seq: Sequence, tokens: int) -> tuple[int, int] | None:
        """Where a sequence verifying drafts, whose step kept `tokens` of its tokens (those from
        num_computed_tokens on), passed a block's end inside the step: (its tokens up to that end, the snapshot
        slot its reply's state there goes to, keyed by that block's chain hash), or None. A step that ends at
        a block's end keeps its state as any step does (register_full_blocks). The model writes that state at
        once, not before the next step as the others are copied: with copies still due (they could read or
        write the slot taken after it) none is kept."""
        if self.state_copies or self.restoring:
            return None
        computed, size = seq.num_computed_tokens, self.block_size
        end = (computed + tokens) // size * size
        if not self.keeps_states or seq.state_slot is None or not computed < end < computed + tokens \
                or end <= max(self.snapshot_point(seq), seq.num_prompt_tokens - 1) \
                or end // size - 1 != len(seq.block_hashes):  # (its block the first not yet hashed)
            return None
        key = block_key(seq.block_hashes[-1] if seq.block_hashes else _seed(seq),
                        tuple(seq.token_ids[end - size:end]))
        slot = self._snapshot_slot(seq, key, rolling=True)
        return None if slot is None else (end - computed, slot)

    def _keep_state(self, seq: Sequence, key: bytes, rolling: bool = False) -> None:
        """Copy the sequence's state (at the end of the block with chain hash `key`) into a snapshot slot."""
        slot = self._snapshot_slot(seq, key, rolling)
        if slot is not None:
            self.state_copies.append((seq.state_slot, slot))

    def _snapshot_slot(self, seq: Sequence, key: bytes, rolling: bool) -> int | None:
        """The snapshot slot for the state at the end of the block with chain hash `key`, or None where one is
        kept already. rolling: a state of its reply so far, which takes the place of its last one (unless a
        sequence is about to take that one up), so that a long reply keeps one slot, not one per block."""
        if key in self.snapshots:
            self.snapshots.move_to_end(key)
            return None
        last = seq.rolling_snapshot
        if rolling and last in self.snapshots and self.snapshots[last] not in self.restoring:
            slot = self.snapshots.pop(last)
        else:
            slot = self.free_snapshots.pop() if self.free_snapshots else self.snapshots.popitem(last=False)[1]
        self.snapshots[key] = slot
        if rolling:
            seq.rolling_snapshot = key
        return slot

    def take_state_copies(self, seqs: list[Sequence]) -> list[tuple[int | None, int]]:
        """The state copies (from, to) due before a step of `seqs`, in order: the states kept since the last step
        and the slots taken since (from None: zeroed), then the kept states those sequences take up."""
        copies, self.state_copies = self.state_copies, []
        for seq in seqs:
            if seq.state_restore is not None:
                copies.append((seq.state_restore, seq.state_slot))
                self.restoring.discard(seq.state_restore)
                seq.state_restore = None
        return copies

    def release(self, seq: Sequence) -> None:
        """Return the sequence's blocks (and state slot); the last ones are reused first (they are least likely
        shared)."""
        if seq.state_slot is not None:
            self.free_states.append(seq.state_slot)
            seq.state_slot = None
        self.restoring.discard(seq.state_restore)
        seq.state_restore, seq.rolling_snapshot = None, None
        for table in seq.block_tables:
            for block_id in reversed(table):
                if block_id != RELEASED:
                    self._give_back(block_id)
        seq.block_tables, seq.block_hashes, seq.num_released = [], [], []
        seq.num_computed_tokens = 0
        if seq.draft is not None:  # a draft model's cache of it was in these blocks too (draft_model.py)
            seq.draft.num_computed_tokens = 0
        seq.tables_version += 1

    def _next_free(self, table: list[int]) -> int:
        """The free block a table grows by: the one after its last where that is empty, else the empty one of
        lowest id, else the cached one freed longest ago."""
        after = table[-1] + 1 if table and table[-1] != RELEASED else -1
        if after in self.empty:
            return after
        while self.empty_heap:
            if self.empty_heap[0] in self.empty:
                return self.empty_heap[0]
            heapq.heappop(self.empty_heap)
        return next(iter(self.cached_free))

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            if block_id in self.empty:
                self.empty.remove(block_id)
            else:
                del self.cached_free[block_id]
        block.ref_count += 1

    def _give_back(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0 and block.key is not None and self.by_hash.get(block.key) == block_id:
            self.cached_free[block_id] = None
        elif block.ref_count == 0:
            block.key, block.tokens = None, ()  # (a copy of a block registered before it, which no lookup finds)
            self.empty.add(block_id)
            heapq.heappush(self.empty_heap, block_id)
            if len(self.empty_heap) > 2 * len(self.empty) + 1024:  # mostly ids taken since: start again
                self.empty_heap = sorted(self.empty)


def block_key(parent: bytes, tokens: Tokens[int]) -> bytes:
    """A full block's chain hash: SHA-256 of its predecessor's (or the sequence's _seed) and its tokens. A
    cryptographic digest, as vLLM's since CVE-2025-25183: Python's hash of a tuple of ints is the same in every
    process and cheap to collide on purpose, and a prompt made to collide with another's blocks would be
    served, or serve, KV computed for other tokens."""
    digest = hashlib.sha256(parent)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


def _seed(seq: Sequence) -> bytes:
    """What a sequence's first block hash is chained to: the load of its LoRA adapter (a load's KV differs
    from the base model's, and from another load's under the same name, for the same tokens) and its cache
    salt (blocks are shared only within a salt); empty for neither."""
    adapter = None if seq.adapter is None else seq.adapter.load_id
    if adapter is None and seq.params.cache_salt is None:
        return b""
    return hashlib.sha256(repr((adapter, seq.params.cache_salt)).encode()).digest()
