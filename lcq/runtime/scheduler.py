"""Continuous batching: which sequences run this step, and how many of their tokens.

Each step has a token budget (max_num_batched_tokens). Running sequences go first (decodes take
one token, or one plus their drafts, unfinished prompts take a chunk); then waiting ones are
admitted while the budget, max_num_seqs and free blocks allow. When blocks run out, the newest
running sequence is preempted: its blocks are freed and it is recomputed later (its tokens are
kept); drafts that do not fit are dropped instead.

With the priority policy (vLLM's --scheduling-policy priority) both queues are kept in order of
(params.priority, arrival): lower values are admitted first and run first within a step's budget, and
the last of the running, the least urgent, is the one preempted. A waiting sequence does not preempt
running ones (vLLM's V1 engine neither).

A sequence with a LoRA adapter runs only while it holds one of the adapter stack's slots (adapters.py):
one that cannot get one waits, and later ones pass it, except those with adapters of their own, which
would keep the slots busy; base-model sequences need none. A sequence whose prompt's blocks a running one is
still computing waits too (BlockManager.waits_for_prefix), and then takes them from the cache.
"""
from __future__ import annotations

import bisect
from collections import deque

from .adapters import AdapterRegistry
from .block_manager import BlockManager
from .sequence import Sequence, Status


def urgency(seq: Sequence) -> tuple[int, float]:
    """The priority policy's order: lower priority values first, then earlier arrivals."""
    return seq.params.priority, seq.arrival_time


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 by_priority: bool = False, adapters: AdapterRegistry | None = None):
        self.blocks = block_manager
        self.adapters = adapters
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.by_priority = by_priority
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self._queue(self.waiting, seq)

    def _queue(self, queue: deque[Sequence] | list[Sequence], seq: Sequence) -> None:
        """seq at the end of queue, or with the priority policy after those as urgent or more."""
        if self.by_priority:
            queue.insert(bisect.bisect_right(queue, urgency(seq), key=urgency), seq)
        else:
            queue.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != Status.RUNNING:  # preempted earlier in this loop
                continue
            count = self.blocks.chunk(seq, min(seq.num_uncomputed, budget))
            if seq.num_draft_tokens and not self.blocks.can_grow(seq, seq.num_computed_tokens + count):
                count = 1  # no preemption for drafts: they are dropped (the engine keeps the scheduled ones)
            while not self.blocks.can_grow(seq, seq.num_computed_tokens + count):
                preempted = True
                self.preempt(self.running[-1])
                if seq.status != Status.RUNNING:
                    break
            if seq.status != Status.RUNNING:
                continue
            self.blocks.grow(seq, seq.num_computed_tokens + count)
            scheduled.append((seq, count))
            budget -= count
        passed: list[Sequence] = []  # waiting for an adapter slot, in their order
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            if self.blocks.waits_for_prefix(seq, self.running) or \
                    (seq.adapter is not None and (passed or not self.adapters.bind(seq))):
                passed.append(self.waiting.popleft())
                continue
            self.blocks.reuse_cached_prefix(seq)
            count = self.blocks.chunk(seq, min(seq.num_uncomputed, budget))
            if not self.blocks.can_grow(seq, seq.num_computed_tokens + count):
                self.blocks.release(seq)
                self._unbind(seq)
                if seq.first_scheduled_time is None:
                    seq.num_cached_tokens = 0
                break
            self.blocks.grow(seq, seq.num_computed_tokens + count)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self._queue(self.running, seq)
            scheduled.append((seq, count))
            budget -= count
        self.waiting.extendleft(reversed(passed))
        return scheduled

    def _unbind(self, seq: Sequence) -> None:
        if seq.adapter is not None:
            self.adapters.unbind(seq)

    def preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        self._unbind(seq)
        seq.status = Status.WAITING
        self.running.remove(seq)
        if self.by_priority:  # back by its urgency (its arrival is kept)
            self._queue(self.waiting, seq)
        else:
            self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Free a finished or aborted sequence wherever it is."""
        self.blocks.release(seq)
        self._unbind(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
