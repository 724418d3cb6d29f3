"""Speculative decoding with a draft model: a smaller model of the same tokenizer proposes the tokens
the target verifies (speculative.verify).

At batch 1 the target's decode step reads all its weights for one token; verifying 1 + k tokens reads
them once too. A draft model a tenth the size (Llama 3.2 1B for Llama 3.1 8B), or the target's own
2-bit LCQ form for its fp16 one, proposes k tokens for k of its own cheap steps; the target keeps
those it agrees with plus one of its own, so each target pass yields 1 to k + 1 tokens, distributed
exactly as without drafts.

For a greedy request the draft proposes its own argmax; for a sampled one it draws from its
distribution under the request's settings and keeps that distribution q, so that verification can
accept each draft with probability min(1, p/q) and replace a rejected one from max(0, p - q)
(speculative sampling): about the share of the two distributions' overlap, where a fixed token would
be accepted only with probability p.

The draft runs on its own ModelRunner and KV cache, whose block ids are the target's: it
reads the block table of one of the target's full-attention layer groups, so the block manager,
prefix caching and preemption serve both models with no bookkeeping of the draft's own (the target's
pool is sized to leave room for the draft's K/V of every block). Each sequence has a DraftSequence:
the tokens the draft has read and, in num_computed_tokens, how many of them are in its cache. The
engine appends placeholder drafts before scheduling (the scheduler counts their rows and grows their
blocks) to the sequences the draft is ready for (`ready`: it has read all but their last few
tokens); `propose` then runs the draft over what it has not read (the tokens accepted since its last
pass) and k - 1 more single-token passes, and writes its tokens over the placeholders. Prompt
chunks are read by the draft in the steps that prefill them, so that a sequence's first drafts do
not wait for its whole prompt; what it lags by otherwise (after preemption, a prefix-cache hit, or
steps at a batch size that drafts nothing) is read in later steps, max_num_batched_tokens a step at
most, before that sequence drafts again. A draft token the target rejects leaves the draft's cache
past the agreed tokens, which the next pass overwrites.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch

from lcq.errors import UserError
from lcq.kernels import cpu_ops
from lcq.models import ModelConfig

from .config import EngineConfig
from .model_runner import ModelRunner
from .sampler import apply_biases, argmax, biased, draw, filtered_probs
from .sampling_params import SamplingParams
from .sequence import Sequence
from .speculative import may_draft

logger = logging.getLogger("lcq.engine")

PLACEHOLDER = 0  # the token a draft holds between scheduling and `propose` (any id the target may take)
DRAFT_PARAMS = SamplingParams(max_tokens=1)  # what the draft runner sees of a request: no logprobs, no adapter


class DraftSequence(Sequence):
    """A sequence as the draft model holds it: the target's tokens it has read, then its own drafts."""

    def __init__(self, seq: Sequence):
        super().__init__(seq.request_id, [], DRAFT_PARAMS, detokenizer=None, max_tokens=0)
        self.num_agreed = 0  # leading token_ids known equal to the target sequence's (which never change)
        self.draft_rows: list[torch.Tensor] = []  # this step's sampled drafts' distributions (speculative.verify)


def draft_engine_config(config: EngineConfig, max_model_len: int) -> EngineConfig:
    """The settings the draft model runs with: the target's, on the draft's folder, serving the target's
    context, with one layer group (it reads one table) and no adapters."""
    return dataclasses.replace(
        config, model=config.speculative_model, served_model_name=None, max_model_len=max_model_len,
        hybrid_kv_cache=False, lora_modules=None, allow_runtime_lora_updating=False, max_loras=0,
        max_lora_rank=None, speculative_model=None, num_speculative_tokens=0, chat_template=None)


def draft_footprint(config: EngineConfig) -> tuple[int, int]:
    """The draft model's K/V bytes per block and its weights' bytes (its safetensors files), read before
    it loads, so that the target's pool is sized first."""
    draft = dataclasses.replace(config, model=config.speculative_model)
    c = ModelConfig.from_folder(draft.model)
    dtype = draft.resolved_kv_cache_dtype()
    elements = math.prod(cpu_ops.cache_shape(1, config.block_size, c.num_kv_heads, c.head_dim, dtype))
    block_bytes = (1 if c.values_in_keys else 2) * c.num_layers * elements * torch.empty(0, dtype=dtype).element_size()
    return block_bytes, sum(f.stat().st_size for f in Path(draft.model).glob("*.safetensors"))


class DraftModel:
    def __init__(self, config: EngineConfig, target: ModelRunner, tokenizer):
        if 0 not in target.kv_groups.windows:
            raise UserError("a draft model reads the block table of the target's full-attention layers, and every "
                            "layer of this model slides over a window: add --disable-hybrid-kv-cache-manager")
        self.group = target.kv_groups.windows.index(0)
        self.num_tokens = config.num_speculative_tokens
        _check_tokenizer(config.speculative_model, tokenizer)
        if ModelConfig.from_folder(config.speculative_model).recurrent:
            raise UserError(f"draft model {config.speculative_model}: its recurrent layers' states cannot take back "
                            "the drafts the target rejects; draft with a model of attention layers")
        try:
            self.runner = ModelRunner(draft_engine_config(config, target.max_model_len), num_blocks=target.num_blocks,
                                      role="draft model: ")
        except UserError as e:
            raise UserError(f"draft model {config.speculative_model}: {e}") from None
        # A draft vocabulary padded past the target's must not propose ids the target cannot embed; one
        # short of the tokenizer could not read every prompt.
        draft_vocab, target_vocab = self.runner.model_config.vocab_size, target.model_config.vocab_size
        if draft_vocab < len(tokenizer):
            raise UserError(f"draft model {config.speculative_model}: its {draft_vocab} embeddings are fewer than "
                            f"the tokenizer's {len(tokenizer)} tokens")
        self.vocab_limit = target_vocab if draft_vocab > target_vocab else None
        self.target_vocab = target_vocab
        self.read_budget = config.max_num_batched_tokens
        logger.info("speculative decoding: %d tokens a step drafted by %s", self.num_tokens, config.speculative_model)

    def ready(self, seq: Sequence) -> bool:
        """Whether the draft has read all but the last few of seq's tokens (at most the last drafts and
        the target's own), so that it can draft this step; else it catches up first (`propose`)."""
        return seq.draft is not None and len(seq) - seq.draft.num_computed_tokens <= self.num_tokens + 1

    def propose(self, scheduled: list[tuple[Sequence, int]], behind: list[Sequence]) -> None:
        """Write the draft's tokens over the placeholders of the scheduled sequences drafting by model; let
        it read the prompt chunks the target prefills and the tokens of `behind` (sequences that would
        draft but whose view is not ready), at most max_num_batched_tokens a step, so that a long prompt
        (or one the prefix cache served) is read over several steps as the target reads it."""
        reading, drafting = [], []
        budget = self.read_budget
        for seq, _ in scheduled:
            if seq.num_draft_tokens and not seq.draft_from_prediction:
                view = self._view(seq, len(seq) - seq.num_draft_tokens)
                view.draft_rows = []
                drafting.append((seq, view))
                reading.append((view, len(view) - view.num_computed_tokens))
                budget -= reading[-1][1]
        catching_up = set(map(id, behind))
        for seq, count in scheduled:
            if budget <= 0 or seq.num_draft_tokens or not may_draft(seq) or (count == 1 and id(seq) not in catching_up):
                continue
            view = self._view(seq, seq.num_computed_tokens + count)  # a prompt chunk, or the tokens it lags by
            if len(view) - view.num_computed_tokens > budget:
                follow(view, seq.token_ids, view.num_computed_tokens + budget)
            if len(view) > view.num_computed_tokens:
                reading.append((view, len(view) - view.num_computed_tokens))
                budget -= reading[-1][1]
        if not drafting:
            if reading:
                self._run(reading, [])
            return
        self._run(reading, drafting)
        for step in range(1, max(seq.num_draft_tokens for seq, _ in drafting)):
            more = [(seq, view) for seq, view in drafting if seq.num_draft_tokens > step]
            self._run([(view, 1) for _, view in more], more)
        for seq, view in drafting:
            n = seq.num_draft_tokens
            seq.token_ids[len(seq) - n:] = view.token_ids[len(view) - n:]
            seq.draft_probs = torch.stack(view.draft_rows[-n:]) if view.draft_rows else None
            view.draft_rows = []

    def _run(self, items: list[tuple[DraftSequence, int]], drafting: list[tuple[Sequence, DraftSequence]]) -> None:
        """One draft pass over `items` (view, tokens to read); each view of `drafting` gains its next token:
        the argmax for a greedy request, else one drawn from the draft's distribution filtered by the
        request's settings (temperature, top-k, top-p, min-p), whose row it keeps for verification.

        A drafting view's few tokens (the last drafts, all accepted, and the target's own) are laid out as
        the target lays out drafts to verify, one decode row each, so that the pass stays a decode step
        (the one-call C step on CPU, a graph on a GPU) rather than a prefill of two tokens, which took
        twice a decode pass on CPU. Longer reads (a view behind after preemption, or after steps without
        drafts) are prefills."""
        drafting_ids = {id(view) for _, view in drafting}
        rows = {id(view): count if id(view) in drafting_ids and count <= self.num_tokens + 1 else 1
                for view, count in items}
        for view, _ in items:
            view.num_draft_tokens = rows[id(view)] - 1
        try:
            _, logits, _, _ = self.runner.run(items)  # every view read to its end: each has rows in item order
        finally:
            for view, _ in items:
                view.num_draft_tokens = 0
        last, row = {}, -1
        for view, count in items:
            view.num_computed_tokens += count
            row += rows[id(view)]
            last[id(view)] = row
        if not drafting:
            return
        logits = logits[[last[id(view)] for _, view in drafting]]
        if self.vocab_limit is not None:
            logits = logits[:, :self.vocab_limit].contiguous()
        for (_, view), token, q in zip(drafting, *draw_drafts(logits, [seq for seq, _ in drafting], self.target_vocab)):
            view.token_ids.append(token)
            if q is not None:
                view.draft_rows.append(q)

    def _view(self, seq: Sequence, end: int) -> DraftSequence:
        """seq's draft view holding its first `end` tokens, over the target's full-attention block table."""
        if seq.draft is None:
            seq.draft = DraftSequence(seq)
        follow(seq.draft, seq.token_ids, end)
        seq.draft.block_tables = [seq.block_tables[self.group]]
        seq.draft.tables_version = seq.tables_version
        return seq.draft


def draw_drafts(logits: torch.Tensor, seqs: list[Sequence], vocab: int) -> tuple[list[int], list[torch.Tensor | None]]:
    """Each sequence's next draft from its row of logits: the argmax for a greedy or seeded request, else one
    drawn from the distribution the request's settings filter (temperature, top-k, top-p, min-p), which comes
    with it, padded to the target's `vocab`, for verification (None for the others). A seeded request's drafts
    are verified as fixed tokens, which takes its generator's one number a token as a step without drafts
    does: its tokens are then the same whether a step drafted or not (drafting depends on the batch)."""
    if biased(seqs):  # as the target's rows are, so that drafts stay within allowed_token_ids and logit_bias
        if logits.shape[1] < vocab:  # a draft vocabulary short of the target's: the rest never drafted
            logits = torch.nn.functional.pad(logits, (0, vocab - logits.shape[1]), value=float("-inf"))
        logits = apply_biases(logits.clone(), seqs)
    tokens, rows = argmax(logits).tolist(), [None] * len(seqs)
    sampled = [i for i, seq in enumerate(seqs) if not seq.params.greedy and seq.generator is None]
    if sampled:
        chosen = [seqs[i] for i in sampled]
        probs = filtered_probs(logits[sampled].float(), chosen)
        if probs.shape[1] < vocab:  # a draft vocabulary short of the target's: the rest is 0
            probs = torch.nn.functional.pad(probs, (0, vocab - probs.shape[1]))
        for i, token, q in zip(sampled, draw(probs, chosen).tolist(), probs):
            tokens[i], rows[i] = token, q
    return tokens, rows


def follow(view: DraftSequence, tokens: list[int], end: int) -> None:
    """Make `view` hold tokens[:end] (the target's tokens, which never change below `end`): its tokens
    past the first that differs (rejected drafts) or past `end` (a preempted sequence recomputed in
    chunks) are replaced, and its cache is counted only up to the tokens it keeps."""
    same = min(view.num_agreed, end)
    while same < min(len(view.token_ids), end) and view.token_ids[same] == tokens[same]:
        same += 1
    del view.token_ids[same:]
    view.token_ids.extend(tokens[same:end])
    view.num_agreed = end
    view.num_computed_tokens = min(view.num_computed_tokens, same)


def _check_tokenizer(folder: str, tokenizer) -> None:
    """A draft whose tokenizer maps tokens to other ids would propose tokens the target never takes."""
    from transformers import AutoTokenizer

    try:
        draft = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        logger.warning("draft model %s has no tokenizer to compare with the target's; its ids are taken as the "
                       "target's", folder)
        return
    if draft.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"draft model {folder}: its tokenizer differs from the target's (a draft must share the "
                        "target's vocabulary)")
