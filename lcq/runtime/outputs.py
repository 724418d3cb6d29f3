"""What the engine streams back for a request, one delta per step."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    token: str  # decoded text of this token alone
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (token_id, text, logprob), best first
    rank: int | None = None  # 1 + how many tokens were likelier (a prompt token's; vLLM's prompt_logprobs give it)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    cache_written_tokens: int = 0  # prompt tokens added to the prefix cache (blocks no other request had)
    accepted_prediction_tokens: int = 0  # drafts from the request's prediction the model agreed with

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RequestOutput:
    """One step's new text for one request; the last one has finish_reason set and usage.

    finish_reason: "stop" (EOS, stop string or stop token), "length" (max_tokens or context),
    "abort" (aborted), or "error" (the request failed; `error` says why).
    """

    request_id: str
    text: str  # new text since the previous delta; stop strings are never included
    token_ids: list[int]  # new token ids since the previous delta
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    usage: Usage | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first delta, when asked for
    error: str | None = None
    bad_request: bool = False  # with finish_reason "error": what the request asked for caused it (a 400, not a 500)
    embedding: list[float] | None = None  # an embedding request's vector (SamplingParams.embed), when it finishes
    # Timing, for metrics: seconds since the request arrived, as the engine saw them (not when a client
    # read the delta).
    elapsed: float | None = None  # when this delta was made (set on every delta the engine makes)
    queue_time: float | None = None  # when it was first scheduled; set on the first delta
    first_token_time: float | None = None  # set on the first delta

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
