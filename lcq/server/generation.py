"""One API request as several engine requests (prompts x n), merged into one stream of deltas.

Every engine request is submitted before the first byte is sent, so a full queue or a too-long prompt
becomes a plain 429/400 instead of an error in the middle of a stream. Whatever ends the consumer
(client gone, cancellation, an error) aborts the engine requests still running, which frees their
KV blocks at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Request

from lcq.runtime.errors import AdapterNotFoundError, EngineNotReadyError, QueueFullError
from lcq.runtime.outputs import RequestOutput, TokenLogprob
from lcq.runtime.sampling_params import SamplingParams

from .errors import APIError, engine_error
from .metrics import RequestTracker
from .protocol import OpenAIRequest, PromptTokensDetails, UsageInfo
from .state import ServerState

logger = logging.getLogger("lcq.server")
# Numbers each Generation's engine requests apart: response ids come from the client's X-Request-Id, which two
# requests may share, while the engine's ids must be unique
GENERATION_NUMBERS = itertools.count()


@dataclass
class Choice:
    """One engine request: its place in the response and what it has produced so far."""

    index: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    tracker: RequestTracker | None = None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    cached_tokens: int = 0
    cache_written_tokens: int = 0
    accepted_prediction_tokens: int = 0
    embedding: list[float] | None = None  # an embedding request's vector
    error: str | None = None
    bad_request: bool = False  # its error came of what the request asked (RequestOutput.bad_request)
    streamed_ids: int | None = None  # with return_token_ids: how many token ids its stream has sent (None: nor the prompt's)

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finish_reason is not None:
            self.finish_reason, self.stop_reason, self.error = out.finish_reason, out.stop_reason, out.error
            self.bad_request = out.bad_request
            if out.usage is not None:
                self.cached_tokens, self.cache_written_tokens = out.usage.cached_tokens, out.usage.cache_written_tokens
                self.accepted_prediction_tokens = out.usage.accepted_prediction_tokens
            self.embedding = out.embedding


    def unsent_ids(self) -> tuple[list[int] | None, list[int]]:
        """(the prompt's token ids where its stream has not sent them yet, else None; the reply's token ids
        it has not sent), now marked sent: what a streamed chunk carries with return_token_ids, as vLLM's."""
        prompt = self.prompt_ids if self.streamed_ids is None else None
        sent = self.streamed_ids or 0
        self.streamed_ids = len(self.token_ids)
        return prompt, self.token_ids[sent:]


def check_room(state: ServerState, prompts: list[list[int]], asked: int | None, field: str) -> None:
    """A 400 for a prompt longer than --max-input-tokens, and for a completion length the context cannot hold
    after a prompt, as OpenAI and vLLM answer (rather than a request that silently gets less, and holds a
    sequence's blocks for the whole context); left unset, it is what the model's defaults give, at most the rest of
    the context (LLMEngine.add_request)."""
    context = state.engine.max_model_len
    longest = max(map(len, prompts))
    limit = state.settings.max_input_tokens
    if limit is not None and longest > limit:
        raise APIError(400, f"the prompt has {longest} tokens, more than this server takes ({limit}, "
                       "--max-input-tokens)", code="context_length_exceeded")
    if asked is not None and longest < context and longest + asked > context:  # (vLLM's words)
        raise APIError(400, f"'{field}' is too large: {asked}. This model's maximum context length is {context} "
                       f"tokens and your request has {longest} input tokens ({asked} > {context} - {longest}).",
                       param=field, code="context_length_exceeded")


class Generation:
    """The engine requests of one API request; iterate `deltas()` once, then read `choices` and `usage()`."""

    def __init__(self, state: ServerState, base_id: str, prompts: list[list[int]], params: SamplingParams,
                 counts_output: bool = True):
        """A 400 (TGI's routes: 422) for structured output where --disable-grammar-support refuses it."""
        if params.structured_output is not None and state.settings.disable_grammar_support:
            raise APIError(400, "structured output (a JSON schema, regex, grammar or choice, or a tool call that "
                           "tool_choice forces) is disabled on this server (--disable-grammar-support)")
        self.state = state
        self.counts_output = counts_output  # False: the reply is dropped (a scored prompt's), so not counted
        self.id = base_id
        self.created = int(time.time())
        self.model = params.lora or state.model_name  # what replies name: the adapter asked for, else the base
        engine_id = f"{base_id}-{next(GENERATION_NUMBERS)}"
        self.choices = [Choice(index=p * params.n + i, request_id=f"{engine_id}-{p * params.n + i}", prompt_ids=prompt,
                               params=sample)
                        for p, prompt in enumerate(prompts) for i, sample in enumerate(params.samples())]
        self.prompts = prompts
        self._streams: list[AsyncIterator[RequestOutput]] = []
        self._pumps: list[asyncio.Task] = []

    async def submit(self, request: OpenAIRequest | None = None) -> None:
        """Add every choice to the engine, or none: a refusal aborts those already added. Their grammar (the
        same for all) is compiled first, off the server's loop."""
        engine, metrics = self.state.engine, self.state.metrics
        arrival = time.monotonic()  # (before the grammar compiles: its time is the client's wait too, as vLLM's)
        try:
            await engine.prepare(self.choices[0].params)
            for i, choice in enumerate(self.choices):  # admitted whole where the queue has room for the first
                self._streams.append(engine.add_request(choice.request_id, choice.prompt_ids, choice.params,
                                                        check_room=i == 0, arrival_time=arrival))
                choice.tracker = metrics.track(len(choice.prompt_ids), self.counts_output)
        except Exception as e:
            for added in self.choices:  # the request is refused as a whole: its choices count as nothing else
                if added.tracker is not None:
                    added.tracker.discard()
            self.abort()
            metrics.rejected("queue_full" if isinstance(e, QueueFullError) else "not_ready"
                             if isinstance(e, EngineNotReadyError) else "model_not_found"
                             if isinstance(e, AdapterNotFoundError) else "invalid_request")
            raise engine_error(e, self.state.settings.retry_after, request) from e
        if self.state.settings.enable_log_requests:
            self._log_received()

    def _log_received(self) -> None:
        """vLLM's --enable-log-requests line for each prompt: its id, model, settings, text and token ids (at most
        --max-log-len characters of the text and ids of the prompt)."""
        cut = self.state.settings.max_log_len
        tokenizer = self.state.engine.tokenizer
        params = self.choices[0].params
        for number, prompt in enumerate(self.prompts):
            ids = prompt if cut is None else prompt[:cut]
            text = tokenizer.decode(ids) if tokenizer is not None else ""
            logger.info("received request %s prompt %d of %d, model %s: prompt %r, params %s, prompt_token_ids %s",
                        self.id, number + 1, len(self.prompts), self.model, text if cut is None else text[:cut],
                        params, ids)

    def _log_output(self, choice: Choice) -> None:
        """vLLM's --enable-log-outputs line for a choice the engine finished: its finish reason, text and token ids
        (at most --max-log-len characters of the text and ids)."""
        cut = self.state.settings.max_log_len
        text, ids = (choice.text, choice.token_ids) if cut is None else (choice.text[:cut], choice.token_ids[:cut])
        logger.info("generated for request %s choice %d (%s): output %r, output_token_ids %s", self.id, choice.index,
                    choice.finish_reason, text, ids)

    async def deltas(self, keepalive: float | None = None) -> AsyncIterator[tuple[Choice, RequestOutput] | None]:
        """Deltas of all choices as they come; None every `keepalive` seconds without one."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice, stream: AsyncIterator[RequestOutput]) -> None:
            try:
                async for out in stream:
                    await queue.put((choice, out))
            except Exception as e:  # the engine contract says this does not happen; fail the choice, not the server
                logger.exception("engine stream of %s failed", choice.request_id)
                await queue.put((choice, RequestOutput(choice.request_id, "", [], finish_reason="error",
                                                       error=f"{type(e).__name__}: {e}")))
            await queue.put((choice, None))

        self._pumps = [asyncio.create_task(pump(c, s)) for c, s in zip(self.choices, self._streams)]
        open_streams = len(self._pumps)
        try:
            while open_streams:
                try:
                    choice, out = await asyncio.wait_for(queue.get(), keepalive)
                except asyncio.TimeoutError:
                    yield None
                    continue
                if out is None:
                    open_streams -= 1
                    if self.state.settings.enable_log_outputs:
                        self._log_output(choice)
                    continue
                choice.add(out)
                choice.tracker.observe(out)
                yield choice, out
        finally:
            self.abort()

    def abort(self) -> None:
        """Abort every choice still running (idempotent); their KV blocks go back to the pool."""
        for task in self._pumps:
            task.cancel()
        for choice in self.choices:
            if choice.finish_reason is None and choice.tracker is not None:
                choice.finish_reason = "abort"
                choice.tracker.finish("abort")
                try:
                    self.state.engine.abort(choice.request_id)
                except Exception:  # already gone from the engine
                    logger.debug("abort of %s: already finished", choice.request_id, exc_info=True)

    async def run(self, request: Request | None) -> None:
        """Collect every choice to the end (non-streaming); if the client goes away meanwhile, abort at once
        (request None: a background response, which no connection holds). A choice the engine failed (not a
        client mistake) fails the whole response with a 500."""

        async def consume() -> None:
            async for _ in self.deltas():
                pass

        task = asyncio.create_task(consume())
        watched = _client_disconnect(request) if request is not None else asyncio.Event().wait()  # (never set)
        disconnected = asyncio.create_task(watched)
        try:
            await asyncio.wait({task, disconnected}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                logger.info("client disconnected; aborting %s", self.id)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise APIError(499, "the client closed the connection", code="client_closed_request")
            await task
        finally:
            task.cancel()
            disconnected.cancel()
            self.abort()
        for choice in self.choices:
            if choice.finish_reason == "error" and choice.bad_request:
                raise APIError(400, choice.error or "generation failed", code="invalid_value")
            if choice.finish_reason == "error":
                raise APIError(500, choice.error or "generation failed", code="engine_error")

    @staticmethod
    def usage_so_far(choice: Choice, count_completion: bool = True) -> UsageInfo:
        """One choice's usage up to now, its prompt and the tokens it has made (none where the response
        drops them: a scored prompt): vLLM's continuous usage stats on each streamed chunk."""
        prompt_tokens = len(choice.prompt_ids)
        completion = len(choice.token_ids) if count_completion else 0
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                         total_tokens=prompt_tokens + completion)

    def usage(self, count_completions: bool = True) -> UsageInfo:
        """Prompt tokens once per prompt (not per choice), completion tokens of every choice (none
        where the response drops them: a scored prompt)."""
        prompt_tokens = sum(len(p) for p in self.prompts)
        completion = sum(len(c.token_ids) for c in self.choices) if count_completions else 0
        n = len(self.choices) // max(1, len(self.prompts))
        firsts = [self.choices[p * n] for p in range(len(self.prompts))]
        details = PromptTokensDetails(cached_tokens=sum(c.cached_tokens for c in firsts),
                                      cache_write_tokens=sum(c.cache_written_tokens for c in firsts))
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                         total_tokens=prompt_tokens + completion, prompt_tokens_details=details)


async def _client_disconnect(request: Request) -> None:
    """Return when the client closes the connection. The body is already read, so the server's next
    message is the disconnect: waiting on it frees the engine's blocks the moment the client leaves."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
