"""One request's state inside the engine."""
from __future__ import annotations

import enum
import time

import torch

from .adapters import ServedAdapter
from .detokenizer import IncrementalDetokenizer
from .sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Tokens so far (prompt + generated), how many of them are in the KV cache, and its blocks."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 detokenizer: IncrementalDetokenizer, max_tokens: int, arrival_time: float | None = None):
        self.request_id = request_id
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.adapter: ServedAdapter | None = None  # the LoRA adapter it runs with (params.lora, as loaded)
        self.adapter_slot: int | None = None  # the adapter stack's slot holding it, while it runs
        self.max_tokens = max_tokens  # resolved: never past the context length
        self.detokenizer = detokenizer
        self.status = Status.WAITING
        self.block_tables: list[list[int]] = []  # per layer group (kv_groups.py); -1 where handed back
        self.num_released: list[int] = []  # per group: leading table entries handed back (sliding windows)
        self.tables_version = 0  # counts changes to block_tables, so that the runner's array of them is reused
        self.tables_array = None  # block_tables as the runner last copied them (numpy, groups x blocks)
        self.tables_array_version = -1
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.state_slot: int | None = None  # its slot of recurrent layers' states, while it holds one
        self.state_restore: int | None = None  # a kept state its slot takes before its next step (a cached prefix's)
        self.rolling_snapshot: bytes | None = None  # the chain hash its reply's last kept state is known by
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache
        self.num_cache_written_tokens = 0  # prompt tokens it added to the prefix cache
        self.block_hashes: list[bytes] = []  # chain hashes of its leading full blocks, as registered for prefix caching
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.pending_ids: list[int] = []  # generated tokens not yet streamed
        self.pending_logprobs: list = []
        # Prompt logprobs (prompt_logprobs set): one entry per prompt token, None for the first; sent
        # with the first delta.
        self.prompt_logprobs: list | None = [None] * len(prompt_ids) if params.prompt_logprobs is not None else None
        self.prompt_logprobs_sent = False
        self.grammar = None  # the grammar matcher of a constrained output (structured_output.py)
        self.may_open = False  # its first token may be the params' structured_output_opening instead
        self.bad_word_ids: list[tuple[int, ...]] = []  # params.bad_words as token ids (engine.bad_word_token_ids)
        self.stop_ids = frozenset(params.stop_token_ids)  # looked up at every token
        self.allowed_ids: torch.Tensor | None = None  # params.allowed_token_ids on the device, once (sampler.py)
        # Speculative decoding (speculative.py): during a step, the last num_draft_tokens of token_ids are
        # drafts to verify; the n-gram index of prompt lookup covers token_ids[:ngram_indexed_until].
        self.num_draft_tokens = 0
        self.draft: Sequence | None = None  # as a draft model holds it (draft_model.DraftSequence)
        self.draft_probs: torch.Tensor | None = None  # the distributions a draft model drew the drafts from
        self.draft_room: int | None = None  # the next drafts' most: one past what the last verification accepted
        self.ngram_index: dict[tuple[int, ...], int] = {}
        self.ngram_indexed_until = 0
        # Drafting from params.prediction: where in it the next output token is expected (None: lost, found
        # again by n-gram search from prediction_resume on), the output tokens compared so far, whether this
        # step's drafts came from it, the places of those accepted, and the places of its accepted drafts
        # that the output took (OpenAI's accepted_prediction_tokens: each place once, none after a stop).
        self.prediction_cursor: int | None = 0
        self.prediction_resume = 0
        self.prediction_checked = 0
        self.prediction_index: dict[tuple[int, ...], list[int]] | None = None
        self.draft_from_prediction = False
        self.prediction_drafted: list[int] = []
        self.prediction_taken: set[int] = set()

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens
