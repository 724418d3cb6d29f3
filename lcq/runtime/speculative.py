"""Speculative decoding by prompt lookup: draft tokens copied from earlier in the sequence, verified in
one step.

At batch 1 a decode step reads every weight for one token; reading them for 1 + k tokens costs little
more (the products are bound by memory, not arithmetic). Where the output repeats its context
(quoting, summarizing, editing code, structured data), the tokens that followed the latest earlier
occurrence of the sequence's last n tokens are often the next ones too: PromptLookup proposes up to
k of them, the model scores the last token and the k drafts together as 1 + k rows, and `verify`
keeps the drafts the model agrees with plus one token of its own, so a step yields 1 to k + 1 tokens.
Where nothing matches, nothing is drafted and the step is an ordinary one.

A request may bring a prediction of its output (OpenAI's Predicted Outputs: the file an edit rewrites).
Its drafts come from there first: the prediction is followed token by token while the output agrees
with it, and where they part, found again at the next place (at or after the last one) where the
output's last n tokens occur in it. Such requests draft even with prompt lookup off, up to
PREDICTION_DRAFT_TOKENS a step.

Verification keeps the output distribution exact: greedy rows keep a draft while it is the argmax;
sampled rows keep draft d with probability p(d), and on rejection draw from p without d (the
residual of speculative sampling when the draft distribution is a single token), so every emitted
token is distributed as plain sampling would give it (tested). A draft model's sampled drafts come
with the distribution q they were drawn from: kept with probability min(1, p(d)/q(d)), replaced from
max(0, p - q) (draft_model.py). Sequences with repetition, presence
or frequency penalties, a grammar, or min_tokens still to reach do not draft: their rows would need
per-row states. Drafts are rows of the products, so on CPU the product form may change with the row
count, as it does with batching (docs/kernels.md); tokens equal plain decoding's with
cpu_matmul_dtype float32.
"""
from __future__ import annotations

import torch

from .sampler import apply_biases, biased, checked_tokens, draw, filtered_probs, greedy_tokens
from .sequence import Sequence

PREDICTION_DRAFT_TOKENS = 8  # drafts a step from a prediction where prompt lookup drafts fewer (or none)


class PromptLookup:
    """Drafts from n-gram matches, longest n first (vLLM's ngram method: prompt_lookup_max/min)."""

    def __init__(self, num_tokens: int, max_n: int, min_n: int):
        self.num_tokens = num_tokens
        self.sizes = range(max_n, min_n - 1, -1)

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        """Up to min(k, limit, seq.draft_room) tokens: the prediction's next ones where the request has one
        and it is found, else those that followed the latest earlier occurrence of seq's last n tokens.
        draft_room (one more than the last verification accepted) keeps a sequence whose drafts keep
        failing to one draft row a step, where k rows would cost k times as much for nothing."""
        draft = self._from_prediction(seq, limit) if seq.params.prediction else []
        seq.draft_from_prediction = bool(draft)
        if draft or not self.num_tokens:
            return draft
        tokens = seq.token_ids
        index = seq.ngram_index
        # Index every n-gram that has a following token (it ends before the last token); each step adds
        # only the n-grams ending at the tokens appended since, so a lookup costs O(n), not O(length).
        for end in range(seq.ngram_indexed_until, len(tokens)):
            for n in self.sizes:
                if end >= n:
                    index[tuple(tokens[end - n:end])] = end
        seq.ngram_indexed_until = len(tokens)
        count = min(self.num_tokens, limit, self.num_tokens if seq.draft_room is None else seq.draft_room)
        for n in self.sizes:
            if count > 0 and len(tokens) > n:
                end = index.get(tuple(tokens[-n:]))
                if end is not None:
                    return tokens[end:end + count]
        return []

    def _from_prediction(self, seq: Sequence, limit: int) -> list[int]:
        prediction, output = seq.params.prediction, seq.token_ids[seq.num_prompt_tokens:]
        cursor = seq.prediction_cursor
        for token in output[seq.prediction_checked:]:  # follow the prediction while the output agrees
            if cursor is not None and cursor < len(prediction) and prediction[cursor] == token:
                cursor += 1
            elif cursor is not None:
                seq.prediction_resume, cursor = cursor, None
        seq.prediction_checked = len(output)
        if cursor is None:
            cursor = self._find_in_prediction(seq, output)
        seq.prediction_cursor = cursor
        if cursor is None:
            return []
        room = PREDICTION_DRAFT_TOKENS if seq.draft_room is None else seq.draft_room
        return prediction[cursor:cursor + min(max(self.num_tokens, PREDICTION_DRAFT_TOKENS), limit, room)]

    def _find_in_prediction(self, seq: Sequence, output: list[int]) -> int | None:
        """Where the prediction goes on after the output's last n tokens (longest n first; the first such
        place at or after the last one followed), or None."""
        prediction = seq.params.prediction
        if seq.prediction_index is None:
            seq.prediction_index = {}
            for end in range(1, len(prediction) + 1):
                for n in self.sizes:
                    if end >= n:
                        seq.prediction_index.setdefault(tuple(prediction[end - n:end]), []).append(end)
        for n in self.sizes:
            ends = seq.prediction_index.get(tuple(output[-n:])) if len(output) >= n else None
            if ends:
                return next((end for end in ends if end >= seq.prediction_resume), ends[-1])
        return None


def may_draft(seq: Sequence) -> bool:
    """Sampled without per-row state (penalties, bad words, grammars, also one that starts later): it may
    draft once it decodes."""
    p = seq.params
    return (p.structured_output is None and p.repetition_penalty == 1.0 and not p.presence_penalty
            and not p.frequency_penalty and not p.bad_words and not p.embed)


def can_draft(seq: Sequence) -> bool:
    """Decoding one token, and sampled without per-row state (may_draft) or held-back stops."""
    return seq.num_uncomputed == 1 and may_draft(seq) and seq.num_output_tokens >= seq.params.min_tokens


def verify(logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]],
           draft_probs: list[torch.Tensor | None] | None = None) -> list[list[int]]:
    """The tokens each drafted sequence emits: the drafts its rows accept, then one of its own.

    logits: 1 + len(drafts[i]) rows per sequence, in order; row j scores the token after draft j (row
    0: after the sequence's last token). allowed_token_ids and logit bias apply per row (they do not
    depend on position).
    draft_probs: per sequence, the distributions its drafts were drawn from (one row each, a draft
    model's), or None where they are fixed tokens (prompt lookup, a prediction, greedy drafts).
    """
    rows = [seq for seq, draft in zip(seqs, drafts) for _ in range(len(draft) + 1)]
    if biased(seqs):
        logits = apply_biases(logits.clone(), rows)
    best = greedy_tokens(logits).tolist()
    probs = filtered_probs(logits, rows) if any(not seq.params.greedy for seq in seqs) else None
    emitted, row = [], 0
    for i, (seq, draft) in enumerate(zip(seqs, drafts)):
        q = draft_probs[i] if draft_probs is not None else None
        tokens = []
        for j in range(len(draft) + 1):
            token = best[row + j] if seq.params.greedy else \
                _draw(probs[row + j], draft[j:j + 1], seq, None if q is None or j == len(draft) else q[j])
            tokens.append(token)
            if j == len(draft) or token != draft[j]:
                break
        emitted.append(checked_tokens(tokens, logits.shape[1]))
        row += len(draft) + 1
    return emitted


def _draw(probs: torch.Tensor, draft: list[int], seq: Sequence, q: torch.Tensor | None = None) -> int:
    """A token distributed as probs (p): speculative sampling's rule for a draft d drawn from q, d itself with
    probability min(1, p(d) / q(d)), else one drawn from the residual max(0, p - q). A fixed draft (q None:
    prompt lookup, predictions) needs no rule: the token drawn from p, which the caller compares with d, is d
    with probability p(d), and it takes the one uniform number a step without drafts takes, so a seed gives
    the same tokens whether a step drafted or not."""
    if draft and q is not None:
        d = draft[0]
        if float(torch.rand(1, generator=seq.generator)) < min(1.0, float(probs[d]) / max(float(q[d]), 1e-30)):
            return d
        residual = (probs - q).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p = q up to rounding: the rejection had no mass
            return d
        probs = residual
    return int(draw(probs.unsqueeze(0), [seq])[0])
