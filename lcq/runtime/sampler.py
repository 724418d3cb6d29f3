"""Next-token choice for a batch: allowed tokens, logit bias, penalties, min_tokens, bad words, grammars,
temperature, top-k, top-p, min-p, seeds, logprobs.

Everything is batched on the logits' device (on CPU the sampled rows in one C call, cpu_ops.sample_rows);
each sampled row takes one uniform number, and seeded requests draw theirs from their own generator,
so a seed gives the same numbers whatever else is in the batch (and the same tokens wherever the logits are
the same: docs/configuration.md, --seed).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Collection

import torch

from lcq.kernels import cpu_ops

from .sequence import Sequence
from .step_inputs import host_tensor

CANDIDATES = (32, 256, 4096)  # keep_top's candidate widths, before a whole row


def argmax(values: torch.Tensor) -> torch.Tensor:
    """The index of each row's largest value: the C kernel for fp32 CPU rows, where torch's argmax
    took 4% of a decode step of 64 sequences (cpu_ops.argmax), else torch's."""
    return cpu_ops.argmax(values) if cpu_ops.usable(values) else values.argmax(dim=-1)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's most likely token, or -1 where a row has no finite logit (every token ruled out by
    allowed_token_ids, bad words, min_tokens or a grammar): checked_tokens then fails that row's
    sequence, where argmax would emit token 0 as if it were allowed."""
    chosen = argmax(logits)
    best = logits.gather(1, chosen.to(logits.device).unsqueeze(1)).squeeze(1).to(chosen.device)
    return torch.where(best.isfinite(), chosen, -1)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition (prompt and output tokens, as in vLLM/HF), presence and frequency (output tokens), in
    place, touching only each row's tokens (whole-vocabulary passes per row took 0.1 ms a row), whose
    ids go to torch as one flat list (nested ones cost more than the penalties)."""
    device = logits.device

    def entries(lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, token) index pairs of every token of every row's list."""
        rows = torch.repeat_interleave(torch.arange(len(lists)), torch.tensor([len(row) for row in lists]))
        return host_tensor(rows, device), host_tensor(list(itertools.chain.from_iterable(lists)), device, torch.int64)

    def values(setting: str) -> torch.Tensor:
        return host_tensor([getattr(s.params, setting) for s in seqs], device, logits.dtype)

    if any(s.params.repetition_penalty != 1.0 for s in seqs):
        index = entries([list(set(s.token_ids)) if s.params.repetition_penalty != 1.0 else [] for s in seqs])
        seen, penalty = logits[index], values("repetition_penalty")[index[0]]
        logits[index] = torch.where(seen > 0, seen / penalty, seen * penalty)
    if any(s.params.presence_penalty or s.params.frequency_penalty for s in seqs):
        for setting, lists in (("frequency_penalty", [s.output_ids for s in seqs]),  # once per occurrence
                               ("presence_penalty", [list(set(s.output_ids)) for s in seqs])):  # once per token
            index = entries(lists)
            logits.index_put_(index, -values(setting)[index[0]], accumulate=True)
    return logits


def biased(seqs: list[Sequence]) -> bool:
    """Whether any row asks for apply_biases' changes."""
    return any(s.params.logit_bias or s.params.allowed_token_ids is not None for s in seqs)


def apply_biases(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The changes a request asks for that hold at every position, in place and in vLLM's order: only
    allowed_token_ids left finite, then OpenAI's logit_bias added (both before the penalties)."""
    for row, seq in enumerate(seqs):
        if seq.params.allowed_token_ids is not None:
            if seq.allowed_ids is None or seq.allowed_ids.device != logits.device:
                seq.allowed_ids = host_tensor(seq.params.allowed_token_ids, logits.device)
            ids = seq.allowed_ids
            allowed = logits[row, ids]
            logits[row] = float("-inf")
            logits[row, ids] = allowed
        if seq.params.logit_bias:
            ids = host_tensor(list(seq.params.logit_bias), logits.device)
            logits[row, ids] += host_tensor(list(seq.params.logit_bias.values()), logits.device, logits.dtype)
    return logits


def banned_now(seq: Sequence, eos_ids: Collection[int]) -> list[int]:
    """The tokens seq may not sample next: those that would end it before min_tokens, and each bad word's
    last token where the output ends with the word's other tokens (vLLM's bad_words)."""
    banned = []
    if seq.num_output_tokens < seq.params.min_tokens:
        banned += seq.stop_ids | (set() if seq.params.ignore_eos else set(eos_ids))
    for word in seq.bad_word_ids:
        start = len(seq.token_ids) - (len(word) - 1)
        if len(word) - 1 <= seq.num_output_tokens and tuple(seq.token_ids[start:]) == word[:-1]:
            banned.append(word[-1])
    return banned


def filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Temperature, then min-p, top-k and top-p as masks; returns probabilities."""
    device = logits.device
    temperature = host_tensor([s.params.temperature for s in seqs], device).clamp_min(1e-5)
    probs = torch.softmax(logits / temperature.unsqueeze(1), dim=-1)
    if any(s.params.min_p > 0 for s in seqs):  # (decided from the params: a device tensor's any() waits for it)
        min_p = host_tensor([s.params.min_p for s in seqs], device)
        probs = torch.where(probs < min_p.unsqueeze(1) * probs.amax(-1, keepdim=True), 0.0, probs)
    vocab = probs.shape[1]
    if any(0 < s.params.top_k < vocab or s.params.top_p < 1 for s in seqs):
        top_k = host_tensor([s.params.top_k if s.params.top_k > 0 else vocab for s in seqs], device)
        probs = keep_top(probs, top_k, host_tensor([s.params.top_p for s in seqs], device))
    if any(s.params.typical_p < 1 for s in seqs):  # after top-k and top-p, as TGI and transformers apply it
        typical_p = host_tensor([s.params.typical_p for s in seqs], device)
        probs = keep_typical(probs / probs.sum(-1, keepdim=True), typical_p)
    return probs / probs.sum(-1, keepdim=True)


def keep_typical(probs: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """probs (rows summing to 1) with each row's tokens zeroed outside the fewest that hold typical_p of its mass,
    taken in order of how close their surprise (-log p) lies to the row's entropy: locally typical sampling, as
    transformers' TypicalLogitsWarper keeps them (the token at the cut kept, ties with it too; the closest always)."""
    logs = torch.where(probs > 0, probs.log(), float("-inf"))
    entropy = -(probs * logs).nan_to_num().sum(-1, keepdim=True)
    distance = (-logs - entropy).abs()  # (inf for zeroed tokens: last)
    distances, order = distance.sort(dim=-1, stable=True)
    cut = ((probs.gather(1, order).cumsum(-1) < typical_p.unsqueeze(1)).sum(-1, keepdim=True)).clamp(
        max=probs.shape[1] - 1)
    keep = distance <= distances.gather(1, cut)
    return torch.where(keep, probs, 0.0)


def keep_top(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """probs with each row's tokens zeroed outside its top_k most likely and outside the fewest most likely
    that hold top_p of their mass. A row's cut is looked for among its CANDIDATES[0] most likely tokens
    (torch.topk: 0.03 ms for a 49k-token row, where sorting the row took 3 ms), among more where those
    hold too little of the mass, and only then in the sorted row. SmolLM2 sampled at temperature 0.7
    keeps a median of 2 tokens at top-p 0.95 (at most 59 of 64 rows), at 1.0 a median of 11 (1,008).
    On a GPU the rows are sorted whole instead (keep_top_sorted): looking for the cut reads device values
    back, which would hold the host until a step launched ahead had run (async scheduling)."""
    if probs.is_cuda:
        return keep_top_sorted(probs, top_k, top_p)
    vocab = probs.shape[1]
    total = probs.sum(-1)
    both = (top_k < vocab) & (top_p < 1)
    if bool(both.any()):  # top-p of what top-k keeps (renormalised, as vLLM and transformers apply them)
        limited = both.nonzero().squeeze(1)
        part = probs[limited]
        kth = part.topk(int(top_k[limited].max()), dim=-1).values.gather(1, (top_k[limited] - 1).unsqueeze(1))
        total[limited] = torch.where(part >= kth, part, 0.0).sum(-1)  # (ties with the k-th kept too)
    kept, rows = None, None  # rows: those still unsettled (None: all)
    for width in (*(w for w in CANDIDATES if w < vocab), vocab):
        part = probs if rows is None else probs[rows]
        limit_k, limit_p = (top_k, top_p * total) if rows is None else (top_k[rows], top_p[rows] * total[rows])
        values, order = part.topk(width, dim=-1)  # most likely first
        kth = values.gather(1, (limit_k.clamp(max=width) - 1).unsqueeze(1))
        # top-k keeps the tokens tied with its k-th too, as vLLM and transformers do (a fp16 head ties often)
        keep = ((torch.arange(width, device=probs.device) < limit_k.unsqueeze(1)) | (values >= kth)) & \
            ((values.cumsum(-1) - values) < limit_p.unsqueeze(1))
        keep[:, 0] = True  # the likeliest always, even where top_p was so small that its limit rounded to 0
        cut = torch.zeros_like(part).scatter_(1, order, values * keep)
        if rows is None:
            kept, rows = cut, torch.arange(probs.shape[0], device=probs.device)
        else:
            kept[rows] = cut
        # Rows whose cut may lie past these candidates: all kept (top_k allows more, or the last is a tie with
        # its k-th), and top_p is not reached.
        unsettled = keep[:, -1] & (values.sum(-1) < limit_p)  # (top-k's k-th, or a tie with it, may lie past)
        if not bool(unsettled.any()):
            break
        rows = rows[unsettled]
    return kept


def keep_top_sorted(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """keep_top's cut from each row sorted whole: nothing is read back to the host (vLLM's GPU sampler sorts
    so too)."""
    values, order = probs.sort(dim=-1, descending=True, stable=True)  # (ties at a top-p cut: lower ids kept)
    kth = values.gather(1, (top_k.clamp(max=probs.shape[1]) - 1).unsqueeze(1))
    in_top_k = values >= kth  # (the k most likely and any tied with the k-th)
    limit_p = top_p * (values * in_top_k).sum(-1)  # top-p of what top-k keeps
    keep = in_top_k & ((values.cumsum(-1) - values) < limit_p.unsqueeze(1))
    keep[:, 0] = True
    return torch.zeros_like(probs).scatter_(1, order, values * keep)


def uniforms(seqs: list[Sequence]) -> torch.Tensor:
    """A uniform number in [0, 1) per row: from the sequence's own generator where it has a seed, so
    that a seed gives the same numbers whatever else is in the batch."""
    numbers = torch.rand(len(seqs))
    for row, seq in enumerate(seqs):
        if seq.generator is not None:
            numbers[row] = torch.rand(1, generator=seq.generator)[0]
    return numbers


def draw(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One token per row, distributed as the row's probabilities (which need not sum to 1): the inverse
    of its cumulative sum at a uniform number (uniforms). One random number per row, where a race of
    exponentials (argmax p / E) drew one per vocabulary entry: 0.7 ms a row."""
    cdf = probs.float().cumsum(-1)
    total = cdf[:, -1:]
    target = (host_tensor(uniforms(seqs), probs.device).unsqueeze(1) * total).contiguous()
    chosen = torch.searchsorted(cdf, target, right=True)
    # u * total may round up to the total: never past the last token that still adds to the sum.
    return torch.minimum(chosen, torch.searchsorted(cdf, total.contiguous())).squeeze(1)


def sample_rows(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """draw(filtered_probs(logits, seqs), seqs), in one C call for fp32 CPU logits (cpu_ops.sample_rows:
    1-2 ms for 64 rows of 49,152 where the torch ops took 3-7)."""
    if not cpu_ops.usable(logits) or any(s.params.typical_p < 1 for s in seqs):  # (the C call has no typical_p)
        return draw(filtered_probs(logits, seqs), seqs)
    vocab = logits.shape[1]
    settings = [[s.params.temperature for s in seqs], [s.params.min_p for s in seqs],
                [s.params.top_k if s.params.top_k > 0 else vocab for s in seqs], [s.params.top_p for s in seqs]]
    temperature, min_p, top_k, top_p = (torch.tensor(values) for values in settings)
    return cpu_ops.sample_rows(logits, temperature, min_p, top_k, top_p, uniforms(seqs))


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: Collection[int] = (),
           constrain: Callable[[torch.Tensor, list[Sequence]], None] | None = None
           ) -> tuple[list[int], torch.Tensor | None]:
    """Tokens for each row, and the raw log-probabilities (before allowed_token_ids, logit bias, penalties,
    min_tokens, bad words, grammars and temperature, as OpenAI reports them) when any row asked for logprobs. eos_ids: the
    tokens that end a sequence, which min_tokens holds back; constrain: masks the rows of sequences
    with a grammar (StructuredOutputs.constrain)."""
    chosen, logprobs = choose(logits, seqs, eos_ids, constrain)
    return checked_tokens(chosen.tolist(), logits.shape[1]), logprobs


def choose(logits: torch.Tensor, seqs: list[Sequence], eos_ids: Collection[int] = (),
           constrain: Callable[[torch.Tensor, list[Sequence]], None] | None = None
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sample's tokens as a tensor on the logits' device, not yet read back (nor checked: checked_tokens), so
    that a next step can be launched from them before the host waits for them (async scheduling)."""
    logprobs = torch.log_softmax(logits, dim=-1) if any(s.params.logprobs is not None for s in seqs) else None
    needs_penalty = any(s.params.repetition_penalty != 1.0 or s.params.presence_penalty or s.params.frequency_penalty
                        for s in seqs)
    needs_bias = biased(seqs)
    banned = [banned_now(s, eos_ids) for s in seqs]
    constrained = constrain is not None and any(s.grammar is not None for s in seqs)
    if needs_penalty or needs_bias or any(banned) or constrained:
        logits = logits.clone()
    if needs_bias:  # before the penalties, as vLLM applies them
        logits = apply_biases(logits, seqs)
    if needs_penalty:
        logits = apply_penalties(logits, seqs)
    for row, ids in enumerate(banned):
        if ids:
            logits[row, host_tensor(ids, logits.device)] = float("-inf")
    if constrained:
        constrain(logits, seqs)
    sampled = [row for row, seq in enumerate(seqs) if not seq.params.greedy]
    if len(sampled) == len(seqs):
        return sample_rows(logits, seqs), logprobs
    chosen = greedy_tokens(logits)
    if sampled:
        rows = host_tensor(sampled, logits.device)
        chosen[rows] = sample_rows(logits[rows], [seqs[row] for row in sampled]).to(chosen.device, chosen.dtype)
    return chosen, logprobs


class NoTokenLeft(ValueError):
    """A row of logits had no token to draw from."""


def checked_tokens(tokens: list[int], vocab: int) -> list[int]:
    """The tokens, unless a row had none to draw from (every logit -inf or NaN, where the draw gives -1 or
    the vocabulary size): then an error, which fails that row's sequence alone (LLMEngine._sample_each)."""
    if any(not 0 <= token < vocab for token in tokens):
        raise NoTokenLeft("a row of logits has no token with a finite probability")
    return tokens
