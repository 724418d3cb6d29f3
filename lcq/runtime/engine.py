"""The synchronous engine: requests in, one step at a time, deltas out.

A step drafts tokens where speculative decoding is on (prompt lookup, speculative.py, or placeholders
that a draft model or the model's multi-token-prediction layer fills once the step is scheduled,
draft_model.py, mtp.py), schedules, runs the model once
for every scheduled sequence, samples (or verifies drafts), detokenizes and checks stop conditions. A
request that fails (even inside a batched forward) is finished with finish_reason "error"; the others
go on.

With async scheduling (on by default on a GPU; vLLM's --async-scheduling) a decode step's forward pass is
launched from the tokens of the one before while they are still on the device, before the host reads them:
the device then computes it while the host detokenizes, checks stop conditions and streams the tokens,
rather than waiting for the host between steps. Its draw is queued at the start of the next step, once the
host holds those tokens, so it reads what a step read one at a time would (penalties, bad words, grammars).
Only steps the host would have scheduled alike go ahead (_go_ahead); a sequence that the earlier token ended
has its row dropped before the draw, its K/V written past its end into a block that it frees (the device runs
queued work in order, so whatever takes the block next writes it after). The host reads a step's tokens from
copies queued right after its draw (read_back.py), not through the stream, which would wait for the step
queued ahead too.
"""
from __future__ import annotations

import itertools
import json
import logging
import numbers
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lcq.inputs import load_tokenizer
from lcq.models.config import ModelConfig
from lcq.models.lora import LoRAAdapter

from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer, TokenBytes
from .draft_model import PLACEHOLDER, DraftModel, draft_footprint
from .errors import AdapterNotFoundError, ContextLengthError
from .generation_config import eos_token_ids, sampling_defaults
from .host_memory import freeze_loaded_objects
from .model_runner import ModelRunner, PromptLogprobs
from .mtp import MtpDrafter
from .outputs import RequestOutput, TokenLogprob, Usage
from .read_back import DrawnLogprobs, ReadBack
from .sampler import NoTokenLeft, checked_tokens, choose, sample
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .speculative import PromptLookup, can_draft, verify
from .step_inputs import host_tensor
from .structured_output import StructuredOutputs

logger = logging.getLogger("lcq.engine")


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    num_preemptions_total: int
    num_drafts_total: int = 0  # sequence steps that verified drafts (speculative decoding)
    num_draft_tokens_total: int = 0  # drafts verified
    num_accepted_tokens_total: int = 0  # drafts the model agreed with


@dataclass
class Launched:
    """A step whose forward pass (and, where no row verifies drafts, its draw) is queued on the device and not
    yet read back (_complete reads it)."""
    scheduled: list[tuple[Sequence, int]]
    to_sample: list[Sequence]  # those that take a token, a row of logits each (and one per draft)
    logits: torch.Tensor
    prompt_logprobs: list[PromptLogprobs]
    embeddings: list[tuple[Sequence, torch.Tensor]]
    before: tuple = ()  # seeded generators' states and the draft counters before the draw, to draw again from
    chosen: torch.Tensor | None = None  # each row's token, on the device (sampler.choose), where no row drafted
    read: ReadBack | None = None  # those tokens and the log-probability rows asked for, on their way to the host


def processor_chat_template(folder: str) -> str | None:
    """The chat template a multimodal folder keeps for its processor (chat_template.json), which the
    tokenizer does not read; None where there is none."""
    path = Path(folder) / "chat_template.json"
    try:
        template = json.loads(path.read_text()).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    return template if isinstance(template, str) else None


def bad_word_token_ids(tokenizer, words: list[str]) -> list[tuple[int, ...]]:
    """Each bad word as the tokenizer spells it alone and after a space (a word inside a text). vLLM bans
    the second spelling only where it has as many tokens as the first, which lets " castle" through where
    "castle" takes two; a word is banned in both here."""
    spellings = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if ids and ids not in spellings:
                spellings.append(ids)
    return spellings


def token_ids_in(ids, vocab: int) -> bool:
    """Whether ids are all integers (Python's or numpy's, not bools: a float was read as the token below it, and
    the reply then failed to decode) in [0, vocab)."""
    return all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and 0 <= t < vocab for t in ids)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        config = config.fetched()
        config.validate()
        torch.manual_seed(config.seed)
        device = config.resolved_device()
        if device.type == "cuda" and device.index is not None:  # (the thread that loads also steps: AsyncEngine)
            torch.cuda.set_device(device)  # kernels, events and copies on cuda:N's streams, not cuda:0's
        self.config = config
        ModelConfig.from_folder(config.model)  # a config.json missing or broken: said so, not as a tokenizer's error
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        self.token_bytes = TokenBytes(self.tokenizer)  # logprobs' tokens, as text and bytes
        template = config.resolved_chat_template() or (None if self.tokenizer.chat_template else
                                                        processor_chat_template(config.tokenizer or config.model))
        if template:
            self.tokenizer.chat_template = template
        draft_block_bytes, draft_weight_bytes = draft_footprint(config) if config.speculative_model else (0, 0)
        self.runner = ModelRunner(config, draft_block_bytes=draft_block_bytes, draft_weight_bytes=draft_weight_bytes)
        if self.runner.state_slots:
            logger.info("recurrent layers: %d state slots and %d for prefixes' states (%.2f GiB)",
                        self.runner.state_slots, len(self.runner.snapshot_slots), self.runner.state_bytes / 2**30)
        self.drafter = DraftModel(config, self.runner, self.tokenizer) if config.speculative_model else \
            MtpDrafter(config, self.runner) if config.speculative_method == "mtp" else None
        self.max_model_len = self.runner.max_model_len
        self.eos_ids = eos_token_ids(config.model, self.tokenizer)
        self.sampling_defaults = sampling_defaults(config.generation_config, config.model,
                                                   config.override_generation_config)
        if self.sampling_defaults:
            logger.info("requests that leave them unset sample with the model's generation config: %s "
                        "(--generation-config vllm for the built-in defaults)",
                        ", ".join(f"{k}={v}" for k, v in self.sampling_defaults.items()))
        self.blocks = self.runner.new_block_manager(config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                   by_priority=config.scheduling_policy == "priority", adapters=self.runner.adapters)
        self.sequences: dict[str, Sequence] = {}
        self.structured = StructuredOutputs(self.tokenizer, self.runner.model_config.vocab_size, self.eos_ids)
        # the most alternatives a request's logprobs may ask for (vLLM's max_logprobs; -1: the whole vocabulary)
        self.max_logprobs = self.runner.model_config.vocab_size if config.max_logprobs == -1 else config.max_logprobs
        self.lookup = PromptLookup(0 if self.drafter else config.num_speculative_tokens, config.prompt_lookup_max,
                                   config.prompt_lookup_min)
        self.draft_batch_limit = config.speculative_disable_by_batch_size
        self.drafts_total = self.draft_tokens_total = self.accepted_tokens_total = 0
        self.async_scheduling = config.resolved_async_scheduling()
        self.ahead: Launched | None = None  # the decode step launched before the last one's tokens were read
        freeze_loaded_objects()

    def default_params(self, **changes) -> SamplingParams:
        """SamplingParams with the model's defaults (sampling_defaults) under the given fields."""
        return SamplingParams(**{**self.sampling_defaults, **changes})

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (a client mistake) before anything is queued."""
        params.validate(self.max_logprobs)
        if params.priority != 0 and not self.scheduler.by_priority:  # (vLLM's words; gateways read this 400)
            raise ValueError(f"Got priority {params.priority} but Priority scheduling is not enabled "
                             "(lcq serve --scheduling-policy priority; offline LLM(..., scheduling_policy='priority')).")
        if not prompt_ids:
            raise ValueError("prompt is empty")
        vocab = self.runner.model_config.vocab_size
        if not token_ids_in(prompt_ids, vocab):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.allowed_token_ids or ()):
            raise ValueError(f"allowed_token_ids must be in [0, {vocab})")
        if not token_ids_in(params.prediction or (), vocab):  # (a tokenizer with more tokens than the model)
            raise ValueError(f"prediction token ids must be integers in [0, {vocab})")
        if params.prediction is not None and len(params.prediction) > self.max_model_len:  # (indexed in a step)
            raise ValueError(f"prediction has {len(params.prediction)} tokens, more than max_model_len "
                             f"{self.max_model_len}: no reply can repeat more of it")
        if params.allowed_token_ids and params.bad_words:
            banned = {ids[0] for ids in bad_word_token_ids(self.tokenizer, params.bad_words) if len(ids) == 1}
            if banned.issuperset(params.allowed_token_ids):  # (else every step's row has no token to draw)
                raise ValueError("allowed_token_ids holds only tokens that bad_words ban, so no token could be "
                                 "generated")
        if params.structured_output is not None:
            self.structured.check(params.structured_output)
        if params.lora is not None and params.lora not in self.runner.adapters.served:  # (unloaded, or never loaded)
            raise AdapterNotFoundError(f"the model `{params.lora}` does not exist: no LoRA adapter of that name is "
                                       "loaded")
        if len(prompt_ids) > self.max_model_len - (0 if params.embed else 1):  # (room for a token, where one is made)
            room = ", which leaves no room for the completion" if len(prompt_ids) == self.max_model_len else ""
            raise ContextLengthError(f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                     f"your request has {len(prompt_ids)} input tokens{room}. Please reduce the "
                                     "length of the input.")

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        """Queue a request; arrival_time: its time.monotonic() on arrival (default: now), which its latency
        metrics and the priority policy's order count from."""
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_request(prompt_ids, params)
        room = self.max_model_len - len(prompt_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop, params.skip_special_tokens,
                                             params.min_tokens)
        seq = Sequence(request_id, prompt_ids, params, detokenizer, max_tokens, arrival_time)
        seq.bad_word_ids = bad_word_token_ids(self.tokenizer, params.bad_words)
        if params.structured_output is not None and (params.structured_output_after is None
                                                     or params.structured_output_opening is not None):
            self.structured.start(seq, params.structured_output_opening)
        if params.lora is not None:
            seq.adapter = self.runner.adapters.served[params.lora]
        self.sequences[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.sequences.get(request_id)
        if seq is None:
            return None
        seq.finish_reason = "abort"
        return self._finish(seq)

    @property
    def lora_adapters(self) -> dict[str, str]:
        """LoRA adapters served now, by name: their folders."""
        return {name: served.folder for name, served in self.runner.adapters.served.items()}

    def read_lora_adapter(self, name: str, folder: str, replacing: bool = False) -> LoRAAdapter:
        """Check the name and read the PEFT folder, or a Hub id's (fetched into download_dir or the Hub's cache, as
        vLLM's lora_path; ValueError, or UserError for the folder); touches no engine state, so the server runs it
        off the engine's thread. replacing: `name` may be the adapter's served now (vLLM's load_inplace)."""
        from lcq.hub import model_folder

        self.runner.adapters.check_name(name, replacing)
        return self.runner.adapters.read(name, model_folder(folder, download_dir=self.config.download_dir,
                                                            kind="LoRA adapter"), replacing)

    def load_lora_adapter(self, name: str, adapter: LoRAAdapter, replacing: bool = False) -> None:
        """Serve a read adapter under `name` (ValueError: the name is taken, unless `replacing` the adapter served
        under it, whose running requests finish with it; or no slot is free)."""
        self.runner.adapters.load(name, adapter, replacing)
        logger.info("LoRA adapter %s loaded from %s", name, adapter.folder)

    def unload_lora_adapter(self, name: str) -> None:
        """Refuse new requests for `name` (AdapterNotFoundError if it is not loaded); those running finish
        with it, and its slot is freed when the last one does."""
        self.runner.adapters.unload(name)
        logger.info("LoRA adapter %s unloaded", name)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                           kv_cache_usage=self.blocks.usage(), num_free_blocks=self.blocks.num_free_blocks,
                           num_total_blocks=self.blocks.num_total_blocks,
                           num_preemptions_total=self.scheduler.num_preemptions,
                           num_drafts_total=self.drafts_total, num_draft_tokens_total=self.draft_tokens_total,
                           num_accepted_tokens_total=self.accepted_tokens_total)

    def step(self) -> list[RequestOutput]:
        launched = self._take_ahead()
        if launched is None:
            drafted, behind = self._draft()
            scheduled = self.scheduler.schedule()
            counts = {seq: count for seq, count in scheduled}
            for seq in drafted:  # keep the drafts that were scheduled (a budget or block shortage cuts them)
                self._keep_drafts(seq, counts.get(seq, 1) - 1)
            if not scheduled:
                return []
            if self.drafter is not None:
                self._propose(scheduled, behind)
            now = time.monotonic()
            for seq, _ in scheduled:
                if seq.first_scheduled_time is None:
                    seq.first_scheduled_time = now
            launched = self._launch(scheduled)
            if not isinstance(launched, Launched):  # its forward pass failed: the outputs that say so
                return launched
        self.ahead = self._go_ahead(launched)
        try:
            return self._complete(launched)
        except BaseException:
            self.ahead = None  # (launched from tokens the sequences may not have taken)
            raise

    def _take_ahead(self) -> Launched | None:
        """The forward pass launched ahead by the last step, without the rows of sequences that have finished
        since, and drawn now that the host holds every token before it (so its penalties, bad words, grammars
        and min_tokens are those of steps read one at a time); None where there is none, or none of its
        sequences runs."""
        launched, self.ahead = self.ahead, None
        if launched is None:
            return None
        alive = [row for row, seq in enumerate(launched.to_sample) if not seq.is_finished]
        if not alive:
            return None
        if len(alive) < len(launched.to_sample):
            seqs = [launched.to_sample[row] for row in alive]
            launched = Launched([(seq, 1) for seq in seqs], seqs,
                                launched.logits[host_tensor(alive, launched.logits.device)], [], [])
        self._draw(launched)
        return launched

    def _go_ahead(self, launched: Launched) -> Launched | None:
        """With async scheduling, the forward pass of the next decode step of launched's sequences, launched
        from its tokens on the device before the host reads them (its draw waits for them: _take_ahead);
        None where that step might not be the one the host would schedule once it has them: drafts (or
        sequences that could draft), a prompt's chunks or embeddings in this step, requests waiting that could
        start, running sequences that this step left out (a token budget a prompt's chunk filled), recurrent
        layers' states (a prefix's state is kept at the step its block fills), or too few free blocks."""
        running = self.scheduler.running
        if not self.async_scheduling or launched.chosen is None or launched.embeddings or self.runner.state_slots \
                or self.drafter is not None or len(launched.to_sample) != len(launched.scheduled) \
                or len(launched.scheduled) != len(running):
            return None  # (every running sequence in the step: else those the budget left out would wait on)
        # Those that go on, in the running order (the priority policy's: the order a scheduled step takes and draws
        # them in); one that this token ends by length takes no part, one that a stop ends drops its row before
        # the draw.
        place = {seq: i for i, seq in enumerate(running)}
        rows = sorted((row for row, seq in enumerate(launched.to_sample) if seq.num_output_tokens + 1 < seq.max_tokens),
                      key=lambda row: place[launched.to_sample[row]])
        seqs = [launched.to_sample[row] for row in rows]
        if not seqs or (self.scheduler.waiting and len(seqs) < self.scheduler.max_num_seqs):
            return None  # (a waiting request could start)
        if len(seqs) < self.draft_batch_limit and \
                (self.lookup.num_tokens or any(seq.params.prediction for seq in seqs)):
            return None  # (_draft would draft for them)
        try:
            for seq in seqs:
                if not self.blocks.can_grow(seq, len(seq) + 1):
                    return None
                self.blocks.grow(seq, len(seq) + 1)
            tokens = launched.chosen if rows == list(range(len(launched.to_sample))) else \
                launched.chosen[host_tensor(rows, launched.chosen.device)]
            # (a row with no token to draw has -1 or the vocabulary's size, which the embedding must not read:
            # read back, it fails its sequence and this step is dropped)
            tokens = tokens.clamp(0, self.runner.model_config.vocab_size - 1)
            scheduled = [(seq, 1) for seq in seqs]
            to_sample, logits, _, _ = self.runner.run(scheduled, next_tokens=tokens)
        except Exception:
            logger.exception("a step launched ahead of its tokens failed; it runs again once they are read")
            return None
        return Launched(scheduled, to_sample, logits, [], [])

    def _draft(self) -> tuple[list[Sequence], list[Sequence]]:
        """Append drafts (prompt lookup, a request's prediction, or a draft model's placeholders) to the
        running sequences that can take them; returns those, and the ones a draft model is not ready for."""
        drafted, behind = [], []
        if len(self.scheduler.running) >= self.draft_batch_limit:
            return drafted, behind
        for seq in self.scheduler.running:
            if (self.lookup.num_tokens or self.drafter or seq.params.prediction) and can_draft(seq):
                # The step emits up to len(draft) + 1 tokens: never past max_tokens (nor the context).
                limit = seq.max_tokens - seq.num_output_tokens - 1
                draft = self.lookup.propose(seq, limit)
                if not draft and self.drafter is not None:
                    if self.drafter.ready(seq):
                        draft = [PLACEHOLDER] * min(self.drafter.num_tokens, limit)
                    else:
                        behind.append(seq)
                if draft:
                    seq.token_ids.extend(draft)
                    seq.num_draft_tokens = len(draft)
                    drafted.append(seq)
        return drafted, behind

    def _propose(self, scheduled: list[tuple[Sequence, int]], behind: list[Sequence]) -> None:
        """The draft model's (or multi-token-prediction layer's) tokens in place of the placeholders. Should it fail, the placeholders are
        verified as they are (the target's tokens stay exact) and the draft starts its sequences afresh."""
        try:
            self.drafter.propose(scheduled, behind)
        except Exception:
            logger.exception("the draft model failed; this step verifies placeholder drafts")
            for seq, _ in scheduled:
                seq.draft = None

    def _observe(self, scheduled: list[tuple[Sequence, int]]) -> None:
        """Hand the step's final hidden states to the multi-token-prediction layer. Should that fail, its
        sequences start afresh (they draft again once it has read their next positions)."""
        try:
            self.drafter.observe(scheduled, self.runner.last_hidden)
        except Exception:
            logger.exception("the multi-token-prediction layer could not keep this step's hidden states")
            for seq, _ in scheduled:
                seq.draft = None
        self.runner.last_hidden = None

    def _keep_drafts(self, seq: Sequence, count: int) -> None:
        """Keep the first `count` of seq's drafts (all of them when count is larger), drop the rest."""
        dropped = max(seq.num_draft_tokens - max(count, 0), 0)
        if dropped:
            del seq.token_ids[len(seq) - dropped:]
            seq.num_draft_tokens -= dropped
            seq.draft_probs = seq.draft_probs[:seq.num_draft_tokens] if seq.draft_probs is not None and \
                seq.num_draft_tokens else None

    def _run(self, scheduled: list[tuple[Sequence, int]]) -> list[RequestOutput]:
        """Run one step and read it back."""
        launched = self._launch(scheduled)
        return self._complete(launched) if isinstance(launched, Launched) else launched

    def _launch(self, scheduled: list[tuple[Sequence, int]]) -> Launched | list[RequestOutput]:
        """Queue the step's forward pass and, where no row verifies drafts, its draw. A failed forward pass is
        run again one sequence at a time to find the culprit (returning the step's outputs), but where recurrent
        layers' states may have advanced part way (they cannot be run again: every sequence of the step fails)."""
        try:
            self.runner.copy_states(self.blocks.take_state_copies([seq for seq, _ in scheduled]))
            to_sample, logits, prompt_logprobs, embeddings = self.runner.run(scheduled)
        except Exception:
            if len(scheduled) > 1 and not self.runner.state_slots:  # find the culprit: rerun one at a time
                return [out for item in scheduled for out in self._run([item])]
            logger.exception("a model step of %s failed", ", ".join(seq.request_id for seq, _ in scheduled))
            return [self._fail(seq, "internal error in the model step") for seq, _ in scheduled]
        if self.runner.last_hidden is not None:
            self._observe(scheduled)
        launched = Launched(scheduled, to_sample, logits, prompt_logprobs, embeddings)
        self._draw(launched)
        return launched

    def _draw(self, launched: Launched) -> None:
        """Queue the step's draw where no row verifies drafts (else _complete samples them), first keeping the
        state it draws from."""
        to_sample = launched.to_sample
        launched.before = self._draw_state(to_sample)
        if to_sample and not any(seq.num_draft_tokens for seq in to_sample):
            asked = {row: seq.params.logprobs for row, seq in enumerate(to_sample) if seq.params.logprobs is not None}
            try:
                chosen, logprobs = choose(launched.logits, to_sample, self.eos_ids, self.structured.constrain)
                launched.chosen, launched.read = chosen, ReadBack(chosen, logprobs, asked)
            except Exception:  # (_complete draws again, each sequence alone where the batch fails again)
                launched.chosen = launched.read = None
                self._restore_draw_state(launched.before)

    def _draw_state(self, seqs: list[Sequence]) -> tuple:
        """Seeded generators' states and the draft counters, to draw again from where they were if the batched
        draw fails: a seed gives the same tokens whatever else is in the batch."""
        return ([(seq.generator, seq.generator.get_state()) for seq in seqs if seq.generator is not None],
                self.drafts_total, self.accepted_tokens_total)

    def _restore_draw_state(self, before: tuple) -> None:
        generators, self.drafts_total, self.accepted_tokens_total = before
        for generator, state in generators:
            generator.set_state(state)

    def _complete(self, launched: Launched) -> list[RequestOutput]:
        """Read a launched step back: its tokens (a failed batched draw samples each sequence alone from its own
        rows), then the sequences' outputs."""
        scheduled, to_sample, logits = launched.scheduled, launched.to_sample, launched.logits
        prompt_logprobs, embeddings = launched.prompt_logprobs, launched.embeddings
        problems: list[str | None] = [None] * len(to_sample)  # why a sequence's sampling failed, where it did
        try:
            if launched.read is not None:
                tokens = [[token] for token in checked_tokens(launched.read.tokens(), logits.shape[1])]
                logprobs = [[launched.read.logprobs(row)] for row in range(len(tokens))]
            else:
                tokens, logprobs = self._sample(logits, to_sample) if to_sample else ([], [])
        except Exception:
            self.ahead = None  # (launched from the tokens read here: the sequences go on from those drawn again)
            self._restore_draw_state(launched.before)
            tokens, logprobs, problems = self._sample_each(logits, to_sample)
        # Recurrent layers' states back to the tokens each drafting sequence kept (its last one and the accepted),
        # and its reply's state kept at a block's end those passed
        verified = [(seq, len(emitted)) for seq, emitted in zip(to_sample, tokens)
                    if seq.num_draft_tokens and emitted is not None and self.runner.state_slots]
        passed = {seq.state_slot: at for seq, kept in verified if (at := self.blocks.passed_snapshot(seq, kept))}
        self.runner.keep_states({seq.state_slot: kept for seq, kept in verified}, passed)
        for part in prompt_logprobs:
            self._keep_prompt_logprobs(part)
        for seq, count in scheduled:
            if seq.num_draft_tokens:  # the drafts leave token_ids; the accepted ones come back as tokens, and
                # _append registers its blocks (here its count is the last step's, but its recurrent state, kept
                # above, already the accepted tokens': kept under the last step's block, a later hit on that
                # block restored a state a token ahead and went on with other tokens)
                self.draft_tokens_total += seq.num_draft_tokens
                self._keep_drafts(seq, 0)
                continue
            seq.num_computed_tokens += count
            self.blocks.register_full_blocks(seq)
        outputs = []
        for seq, hidden in embeddings:  # an embedding request ends with its prompt
            if not bool(torch.isfinite(hidden).all()):  # (as a generation whose logits are not finite fails)
                outputs.append(self._fail(seq, "the embedding is not finite (the model's activations overflowed)"))
                continue
            seq.finish_reason = "stop"
            outputs.append(self._finish(seq, embedding=torch.nn.functional.normalize(hidden, dim=0).tolist()))
        for seq, emitted, rows, problem in zip(to_sample, tokens, logprobs, problems):
            if emitted is None:  # its sampling failed: the request's own constraints, or the engine
                outputs.append(self._fail(seq, problem or "internal error in sampling", bad_request=bool(problem)))
                continue
            try:
                output = self._append(seq, emitted, rows)
            except Exception:
                logger.exception("request %s failed", seq.request_id)
                output = self._fail(seq, "the output could not be decoded")
            if output is not None:
                outputs.append(output)
        return outputs

    def _sample_each(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list, list, list[str | None]]:
        """_sample's tokens and logprobs, each sequence sampled alone from its rows; None where that fails, with
        (third) what in the request left no token to draw where its rows had finite logits: its
        allowed_token_ids, bad_words, min_tokens or grammar masked every one (a client's mistake, not the
        engine's; a row with none is a model gone NaN)."""
        starts = list(itertools.accumulate((1 + seq.num_draft_tokens for seq in seqs), initial=0))
        tokens, logprobs, problems = [], [], []
        for seq, begin, end in zip(seqs, starts, starts[1:]):
            problem = None
            try:
                (emitted,), (rows,) = self._sample(logits[begin:end], [seq])
            except NoTokenLeft:
                emitted = rows = None
                if bool(torch.isfinite(logits[begin:end]).any(dim=-1).all()):
                    problem = ("the request's constraints (allowed_token_ids, bad_words, logit_bias, min_tokens with "
                               "its stop tokens, or its grammar) leave no token to generate")
                    logger.warning("request %s: %s", seq.request_id, problem)
                else:
                    logger.error("request %s: the model's logits are not finite", seq.request_id)
            except Exception:
                logger.exception("sampling request %s failed", seq.request_id)
                emitted = rows = None
            tokens.append(emitted)
            logprobs.append(rows)
            problems.append(problem)
        return tokens, logprobs, problems

    def fail_all(self, what: str) -> list[RequestOutput]:
        """Finish every request with an error (`what` went wrong in steps that keep failing), freeing its blocks."""
        return [self._fail(seq, what) for seq in list(self.sequences.values())]

    def _fail(self, seq: Sequence, what: str, bad_request: bool = False) -> RequestOutput:
        """Finish a sequence whose step failed (`what` went wrong; `bad_request`: because of what the request
        asked), its drafts dropped."""
        self._keep_drafts(seq, 0)
        seq.finish_reason = "error"
        output = self._finish(seq, error=f"generation failed: {what}")
        output.bad_request = bad_request
        return output

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[list[int]], list[list]]:
        """Each sequence's new tokens (one, or its accepted drafts plus one) and, per token, the raw
        log-probabilities of the row that chose it (None where no request of its kind asked for them)."""
        starts = list(itertools.accumulate((1 + seq.num_draft_tokens for seq in seqs), initial=0))
        tokens: list[list[int]] = [[] for _ in seqs]
        logprob_rows: list[list] = [[] for _ in seqs]
        plain = [i for i, seq in enumerate(seqs) if not seq.num_draft_tokens]
        drafted = [i for i, seq in enumerate(seqs) if seq.num_draft_tokens]
        if plain:
            rows = logits if not drafted else logits[[starts[i] for i in plain]]
            chosen, logprobs = sample(rows, [seqs[i] for i in plain], self.eos_ids, self.structured.constrain)
            for k, (i, token) in enumerate(zip(plain, chosen)):
                tokens[i], logprob_rows[i] = [token], [None if logprobs is None else logprobs[k]]
        if drafted:
            rows = logits[[row for i in drafted for row in range(starts[i], starts[i + 1])]]
            group = [seqs[i] for i in drafted]
            self.drafts_total += len(group)
            logprobs = torch.log_softmax(rows, dim=-1) if any(s.params.logprobs is not None for s in group) else None
            drafts = [seq.token_ids[len(seq) - seq.num_draft_tokens:] for seq in group]
            first = 0
            for i, seq, emitted in zip(drafted, group, verify(rows, group, drafts, [s.draft_probs for s in group])):
                tokens[i] = emitted
                logprob_rows[i] = [None if logprobs is None else logprobs[first + j] for j in range(len(emitted))]
                first += 1 + seq.num_draft_tokens
                self.accepted_tokens_total += len(emitted) - 1
                if seq.draft_from_prediction:  # the prediction's places of the drafts accepted, counted as taken
                    start = seq.prediction_cursor
                    seq.prediction_drafted = list(range(start, start + len(emitted) - 1))
                seq.draft_room = len(emitted)
        return tokens, logprob_rows

    def _append(self, seq: Sequence, tokens: list[int], logprobs: list[torch.Tensor | DrawnLogprobs | None]
                ) -> RequestOutput | None:
        """Take the step's new tokens in order until one ends the sequence; the text they make final."""
        text = ""
        for token, row in zip(tokens, logprobs):
            text += self._take(seq, token, row)
            if seq.finish_reason is not None:
                if seq.detokenizer.stop_string is None:
                    text += seq.detokenizer.flush()
                return self._finish(seq, text)
        # Accepted drafts are in the cache already; the last token is not (it is the next step's input).
        seq.num_computed_tokens = len(seq) - 1
        self.blocks.register_full_blocks(seq)
        return self._delta(seq, text)

    def _take(self, seq: Sequence, token: int, logprobs: torch.Tensor | DrawnLogprobs | None) -> str:
        """Append one token; returns the text it makes final, and sets finish_reason if it ends seq."""
        seq.token_ids.append(token)
        if seq.prediction_drafted:
            seq.prediction_taken.add(seq.prediction_drafted.pop(0))
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        seq.pending_ids.append(token)
        if seq.params.logprobs is not None:
            seq.pending_logprobs.append(self._logprob(token, logprobs, seq.params.logprobs))
        searched_from = len(seq.detokenizer.text)
        p = seq.params
        grammar_ended = seq.grammar is not None and self.structured.accept(seq, token, p.structured_output_opening)
        # (with ignore_eos, the end-of-sequence token a finished grammar leaves as the only one still ends it)
        ends = token in self.eos_ids and (not p.ignore_eos or grammar_ended)
        stop_token = not ends and token in seq.stop_ids
        # The end-of-sequence token is never text, a stop token only with include_stop_str_in_output (vLLM's)
        text = "" if ends or (stop_token and not p.include_stop_str_in_output) else seq.detokenizer.add(token)
        if seq.grammar is None and p.structured_output_after is not None:  # the grammar starts after a marker
            self.structured.start_after(seq, searched_from)
        if ends or grammar_ended:
            seq.finish_reason, seq.stop_reason = "stop", None
        elif stop_token:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif seq.detokenizer.stop_string is not None:
            seq.finish_reason, seq.stop_reason = "stop", seq.detokenizer.stop_string
            if p.include_stop_str_in_output:
                text += seq.detokenizer.stop_string
        elif seq.num_output_tokens >= seq.max_tokens:
            seq.finish_reason = "length"
        return text

    def _logprob(self, token: int, logprobs: torch.Tensor | DrawnLogprobs, top: int) -> TokenLogprob:
        """The token's logprob and the `top` likeliest, from its row (or from what a draw read back of it)."""
        if isinstance(logprobs, DrawnLogprobs):
            return self._token_logprob(token, logprobs.chosen, logprobs.top_values[:top], logprobs.top_ids[:top])
        values, ids = logprobs.topk(top) if top else (torch.empty(0), torch.empty(0))
        return self._token_logprob(token, float(logprobs[token]), values, ids)

    def _token_logprob(self, token: int, logprob: float, top_values: torch.Tensor, top_ids: torch.Tensor,
                       rank: int | None = None) -> TokenLogprob:
        text = self.token_bytes.text
        best = [(int(i), text(int(i)), float(v)) for v, i in zip(top_values, top_ids)]
        return TokenLogprob(token_id=token, token=text(token), logprob=logprob, top=best, rank=rank)

    def _keep_prompt_logprobs(self, part: PromptLogprobs) -> None:
        seq = part.seq
        for i, (logprob, rank) in enumerate(zip(part.logprobs.tolist(), part.ranks.tolist())):
            position = part.first + i
            seq.prompt_logprobs[position] = self._token_logprob(seq.token_ids[position], logprob, part.top_values[i],
                                                                part.top_ids[i], rank)

    def _delta(self, seq: Sequence, text: str, **extra) -> RequestOutput:
        first = seq.num_output_tokens == len(seq.pending_ids) and seq.first_token_time is not None
        output = RequestOutput(
            request_id=seq.request_id, text=text, token_ids=seq.pending_ids,
            logprobs=seq.pending_logprobs if seq.params.logprobs is not None else None, **extra)
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            output.prompt_logprobs, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
        output.elapsed = time.monotonic() - seq.arrival_time
        if first:
            output.queue_time = (seq.first_scheduled_time or seq.arrival_time) - seq.arrival_time
            output.first_token_time = seq.first_token_time - seq.arrival_time
        seq.pending_ids, seq.pending_logprobs = [], []
        return output

    def _finish(self, seq: Sequence, text: str = "", error: str | None = None,
                embedding: list[float] | None = None) -> RequestOutput:
        self.scheduler.finish(seq)
        if not self.scheduler.running:  # (a step launched ahead for sequences all ended: its memory back now)
            self.ahead = None
        self.sequences.pop(seq.request_id, None)
        usage = Usage(prompt_tokens=seq.num_prompt_tokens, completion_tokens=seq.num_output_tokens,
                      cached_tokens=seq.num_cached_tokens, cache_written_tokens=seq.num_cache_written_tokens,
                      accepted_prediction_tokens=len(seq.prediction_taken))
        return self._delta(seq, text, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason, usage=usage,
                           error=error, embedding=embedding)
