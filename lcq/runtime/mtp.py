"""Speculative decoding with the model's own multi-token-prediction layer (models/mtp.py: DeepSeek-V3,
GLM-4.5, Qwen3-Next, Qwen3.5), vLLM's method "mtp".

The layer reads, at position p, the model's final hidden state there and the token at p + 1, and predicts
the token at p + 2. It is one decoder layer beside the model's dozens, so it reads every position of
every sequence as the model computes it (its K/V sit in the model's full-attention blocks, one more
layer's worth each, so prefix caching, preemption and freeing serve it with no bookkeeping of its own):
each step's final hidden states are kept per sequence (`observe`) and read by the layer at the next
step (`propose`), once the token after each position is known. The last position read (the one before
the sequence's last token) gives the first draft; each further draft feeds the layer's own output back
as the next position's hidden state. Those chained positions are read again from the model's hidden
states at the next step, so the layer's cache holds only what the model computed.

The engine treats it as a draft model (draft_model.py): placeholders appended before scheduling, written
over by `propose`, verified exactly (greedy drafts kept while they are the argmax, sampled ones by
speculative sampling with the layer's distribution). A prefix-cache hit takes the layer's entries of
the cached blocks as the request that computed them left them (the last one read the token after it
in that request), and a sequence the layer has not caught up with drafts once it has.
"""
from __future__ import annotations

import logging

import torch

from .config import EngineConfig
from .draft_model import DraftSequence, draw_drafts
from .model_runner import ModelRunner
from .sequence import Sequence

logger = logging.getLogger("lcq.engine")


class MtpView(DraftSequence):
    """A sequence as the layer reads it: token_ids[p] is the sequence's token p + 1; its first
    num_computed_tokens positions are in the layer's cache, read with the model's hidden states, and
    `pending` holds the model's hidden states of the positions after them."""

    def __init__(self, seq: Sequence):
        super().__init__(seq)
        self.pending: torch.Tensor | None = None

    @property
    def num_pending(self) -> int:
        return 0 if self.pending is None else self.pending.shape[0]


class MtpDrafter:
    def __init__(self, config: EngineConfig, runner: ModelRunner):
        self.runner = runner
        self.num_tokens = config.num_speculative_tokens
        self.group = runner.kv_groups.windows.index(0)  # the full-attention blocks' table
        self.vocab = runner.model_config.vocab_size
        logger.info("speculative decoding: %d tokens a step drafted by the model's multi-token-prediction layer",
                    self.num_tokens)

    def ready(self, seq: Sequence) -> bool:
        """Whether the layer has (or will read this step) every position up to the one before seq's last token."""
        view = seq.draft
        return view is not None and view.num_computed_tokens + view.num_pending >= len(seq) - 1

    def observe(self, scheduled: list[tuple[Sequence, int]], hidden: torch.Tensor) -> None:
        """Keep the step's final hidden states of each sequence's positions (before its computed count moves):
        rows past a position recomputed (after preemption) or of rejected drafts are replaced, and positions
        the model skipped (a prefix-cache hit) are taken as in the layer's cache."""
        row = 0
        for seq, count in scheduled:
            rows, row = hidden[row:row + count], row + count
            if seq.params.embed:
                continue
            if seq.draft is None:
                seq.draft = MtpView(seq)
            view, start = seq.draft, seq.num_computed_tokens
            kept = start - view.num_computed_tokens
            if kept < 0 or kept > view.num_pending:
                view.num_computed_tokens, kept = start, 0
            parts = [rows] if not kept else [view.pending[:kept], rows]
            view.pending = torch.cat(parts)  # a copy: a CUDA graph's output is overwritten by the next replay

    def propose(self, scheduled: list[tuple[Sequence, int]], behind: list[Sequence]) -> None:
        """Let the layer read what it has not of the scheduled sequences (up to the position before each one's
        last token), then write its drafts over the placeholders of those drafting."""
        reading, previous = [], []
        for seq, _ in scheduled:
            view = seq.draft
            if view is None or not view.num_pending:
                continue
            last = len(seq) - seq.num_draft_tokens - 1  # the position of seq's last token
            self._follow(view, seq, last)
            count = min(view.num_pending, last - view.num_computed_tokens)
            if count > 0:
                reading.append((view, count))
                previous.append(view.pending[:count])
        if not reading:
            return
        chained, logits = self.runner.run_mtp(reading, torch.cat(previous))
        ends, row = {}, -1
        for view, count in reading:
            view.num_computed_tokens += count
            view.pending = view.pending[count:] if view.num_pending > count else None
            row += count
            ends[id(view)] = row
        drafting = [(seq, seq.draft) for seq, _ in scheduled if seq.num_draft_tokens and not seq.draft_from_prediction
                    and id(seq.draft) in ends and seq.draft.num_computed_tokens == len(seq) - seq.num_draft_tokens - 1]
        rows = [ends[id(view)] for _, view in drafting]
        if drafting:
            self._draft(drafting, chained[rows], logits[rows])

    def _draft(self, drafting: list[tuple[Sequence, MtpView]], chained: torch.Tensor, logits: torch.Tensor) -> None:
        """Each drafting sequence's drafts over its placeholders: the first from the rows read, each next one
        from a pass of the layer over the draft before it at the next position, its hidden state the layer's
        own output there. The view's count of positions read is moved for those passes only, so that the
        next step reads them again from the model's hidden states."""
        for _, view in drafting:
            view.draft_rows = []
        active, made = drafting, 0
        while active:
            tokens, rows = draw_drafts(logits, [seq for seq, _ in active], self.vocab)
            for (_, view), token, q in zip(active, tokens, rows):
                view.token_ids.append(token)
                if q is not None:
                    view.draft_rows.append(q)
            made += 1
            more = [i for i, (seq, _) in enumerate(active) if seq.num_draft_tokens > made]
            active, chained = [active[i] for i in more], chained[more]
            if not active:
                break
            for _, view in active:
                view.num_computed_tokens += made - 1  # the position of the draft just made
            try:
                chained, logits = self.runner.run_mtp([(view, 1) for _, view in active], chained)
            finally:
                for _, view in active:
                    view.num_computed_tokens -= made - 1
        for seq, view in drafting:
            n, last = seq.num_draft_tokens, view.num_computed_tokens
            seq.token_ids[len(seq) - n:] = view.token_ids[last:last + n]
            seq.draft_probs = torch.stack(view.draft_rows) if view.draft_rows else None
            view.draft_rows = []

    def _follow(self, view: MtpView, seq: Sequence, last: int) -> None:
        """Make the view hold seq's tokens 1 .. last (its own drafts of the last step, past them, dropped), over
        seq's full-attention block table."""
        del view.token_ids[view.num_agreed:]
        view.token_ids.extend(seq.token_ids[view.num_agreed + 1:last + 1])
        view.num_agreed = last
        view.block_tables = [seq.block_tables[self.group]]
        view.tables_version = seq.tables_version
        view.state_slot = seq.state_slot
