"""POST /v1/completions: text or token prompts (one or many), n choices each, echo, integer logprobs."""
from __future__ import annotations

import asyncio
import codecs
import functools
from collections.abc import Callable

from fastapi import APIRouter, Request

from lcq.runtime.detokenizer import IncrementalDetokenizer
from lcq.runtime.outputs import RequestOutput, TokenLogprob

from .errors import APIError, generation_responses, invalid_value
from .generation import Choice, Generation, check_room
from .protocol import MAX_PROMPTS, CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, \
    dump, prompt_logprob_entries, token_name
from .sse import sse_events, sse_response
from .state import ServerState, get_state, request_id_of

router = APIRouter()
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint
STREAM_RESPONSE = {"description": "with `stream: true`: server-sent events of CompletionResponse chunks, then [DONE]",
                   "content": {"text/event-stream": {}}}


def tokenize_prompts(state: ServerState, prompt, param: str = "prompt",
                     add_special_tokens: bool = True) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of every prompt, whether it came as text, texts, ids or lists of ids (`param`: the
    field's name in errors); text gets the tokenizer's special tokens with `add_special_tokens`, ids stay as
    sent. Called in a thread (asyncio.to_thread): megabytes of text took seconds, during which the event loop
    answered no one."""
    tokenizer = state.engine.tokenizer
    items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    ids, texts = [], []
    for item in items:
        if isinstance(item, str):
            ids.append(tokenizer.encode(item, add_special_tokens=add_special_tokens))
            texts.append(item)
        else:
            state.check_token_ids(item, param)
            ids.append(list(item))
            texts.append(tokenizer.decode(item))
    if not ids or any(len(p) == 0 for p in ids):
        raise APIError(400, f"{param} must not be empty", param=param, code="invalid_value")
    return ids, texts


def special_token_ids(tokenizer) -> set[int]:
    """Every special token's id (what decoding with skip_special_tokens skips): the special tokens the tokenizer names,
    and the added tokens marked special (chat markers)."""
    return {token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special} \
        | set(tokenizer.all_special_ids)


class TextOffsets:
    """Where each token of a text starts in it (OpenAI's text_offset): the length of the whole characters of
    the tokens before it, as the detokenizer emits them. The pieces of a character split over tokens all
    start where the character does, every other token's text starts at its offset, and a special token the
    text skips adds nothing."""

    def __init__(self, tokenizer, context: list[int], skip_special_tokens: bool, token_bytes: Callable[[int], bytes],
                 start: int = 0):
        self.detokenizer = IncrementalDetokenizer(tokenizer, context, [], skip_special_tokens)
        self.decode = functools.partial(tokenizer.decode, skip_special_tokens=skip_special_tokens,
                                        clean_up_tokenization_spaces=False)
        self.token_bytes = token_bytes
        self.skipped = special_token_ids(tokenizer) if skip_special_tokens else set()
        self.start = start  # where the text begins in what is returned (after an echoed prompt)
        self.held = 0  # whole characters the detokenizer holds back with a character not whole yet
        self.unfinished = b""  # the bytes of that character so far

    def __call__(self, token_id: int) -> int:
        text = self.detokenizer
        offset = self.start + len(text.text) + self.held + self._broken_before(token_id)
        text.add(token_id)
        pending = text.ids[text.prefix_offset:]  # the tokens not released, after those it decodes them after
        released = pending[:text.read_offset - text.prefix_offset]
        self.held, self.unfinished = 0, b""
        if len(pending) != len(released):  # less the character not whole yet at the end: a byte that is no
            # character's stays one (U+FFFD)
            held = self.decode(pending)[len(self.decode(released)):]
            data = b"".join(self.token_bytes(t) for t in pending[len(released):] if t not in self.skipped)
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            whole = decoder.decode(data)
            self.unfinished = decoder.getstate()[0]
            self.held = max(0, len(held) - (len(data.decode("utf-8", errors="replace")) - len(whole)))
        return offset

    def _broken_before(self, token_id: int) -> int:
        """The characters (U+FFFD) an unfinished character becomes before this token's text where the token does not
        go on with it (its bytes start no continuation of it): the token's text starts after them."""
        if not self.unfinished or token_id in self.skipped:
            return 0
        tail, data = self.unfinished, self.token_bytes(token_id)
        alone = tail.decode("utf-8", errors="replace")
        together = (tail + data).decode("utf-8", errors="replace")
        return len(alone) if together == alone + data.decode("utf-8", errors="replace") else 0


class EchoOffsets:
    """text_offset of an echoed text prompt, whose text is as sent: TextOffsets over the tokens of that text (its
    special tokens too, written in it: skipped, they put every later offset short by their length), and the
    tokens the tokenizer added around them (a BOS) at its start or end."""

    def __init__(self, tokenizer, token_bytes: Callable[[int], bytes], before: int, inner: int, length: int):
        self.offsets = TextOffsets(tokenizer, [], False, token_bytes)
        self.before, self.inner, self.length = before, inner, length
        self.seen = 0

    def __call__(self, token_id: int) -> int:
        at, self.seen = self.seen, self.seen + 1
        if at < self.before:
            return 0
        return self.offsets(token_id) if at < self.before + self.inner else self.length


def added_around(tokenizer, text: str, ids: list[int]) -> tuple[int, int] | None:
    """How many of ids (text tokenized with special tokens) the tokenizer added before and after the text's own,
    or None if they are not found whole among them."""
    inner = tokenizer.encode(text, add_special_tokens=False)
    for before in range(len(ids) - len(inner) + 1):
        if ids[before:before + len(inner)] == inner:
            return before, len(ids) - before - len(inner)
    return None


class LogprobFormatter:
    """OpenAI's legacy logprobs shape; tokens named by their text, or by id (`tokens_as_ids`)."""

    def __init__(self, top: int, tokens_as_ids: bool, token_bytes: Callable[[int], bytes]):
        self.top = top
        self.tokens_as_ids = tokens_as_ids
        self.token_bytes = token_bytes

    def name(self, token_id: int, text: str) -> str:
        """The token's text; a part of a character (U+FFFD as text) by its bytes, "bytes:\\xe2\\x80" as OpenAI
        names them, where the texts of such alternatives would be one key of top_logprobs."""
        if "\ufffd" in text and not self.tokens_as_ids:
            return "bytes:" + "".join(f"\\x{byte:02x}" for byte in self.token_bytes(token_id))
        return token_name(token_id, text, self.tokens_as_ids)

    def format(self, *parts: tuple[list[TokenLogprob | tuple[int, str]], TextOffsets]) -> CompletionLogprobs:
        """Each part's entries (the echoed prompt's, the reply's), their offsets from its TextOffsets. Entries
        are the tokens' logprobs, or (id, text) for the echoed prompt's first token, which has none."""
        out = CompletionLogprobs()
        for entries, offsets in parts:
            for entry in entries:
                if isinstance(entry, TokenLogprob):
                    token_id, text, logprob = entry.token_id, entry.token, entry.logprob
                    top = {self.name(i, alternative): lp for i, alternative, lp in entry.top[:self.top]}
                    top[self.name(token_id, text)] = logprob  # the chosen one too: up to logprobs + 1, as OpenAI's
                else:
                    (token_id, text), logprob, top = entry, None, None
                out.tokens.append(self.name(token_id, text))
                out.token_logprobs.append(logprob)
                out.top_logprobs.append(top)
                out.text_offset.append(offsets(token_id))
        return out


@router.post("/v1/completions", response_model=CompletionResponse,
             responses=generation_responses(STREAM_RESPONSE))
async def create_completion(body: CompletionRequest, request: Request):
    state = get_state(request)
    state.check_request(body, "/v1/completions")
    prompts, prompt_texts = await asyncio.to_thread(tokenize_prompts, state, body.prompt,  # off the event loop
                                                    add_special_tokens=body.adds_special_tokens(default=True))
    defaults = state.engine.sampling_defaults
    max_tokens = defaults.get("max_tokens", DEFAULT_MAX_TOKENS) if body.max_tokens is None else body.max_tokens
    kept = [body.truncated(ids, state.engine.max_model_len, max_tokens) for ids in prompts]
    prompt_texts = [text if len(ids) == len(cut) else state.engine.tokenizer.decode(cut)
                    for text, ids, cut in zip(prompt_texts, prompts, kept)]  # echo shows what was kept
    # an echoed prompt shows its special tokens (a BOS) where it is decoded: sent as ids, or cut; sent as text, the
    # text as sent, without those the tokenizer added
    as_sent = isinstance(body.prompt, str) or isinstance(body.prompt[0], str)
    echo_skips_special = [as_sent and len(ids) == len(cut) for ids, cut in zip(prompts, kept)]
    echo_added = [added_around(state.engine.tokenizer, text, ids) if skips and body.echo and body.logprobs is not None
                  else None for text, ids, skips in zip(prompt_texts, prompts, echo_skips_special)]
    prompts = kept
    # max_tokens 0 with echo: OpenAI's legacy scoring of a prompt (its text and logprobs, nothing
    # generated); the engine still samples one token to finish the prompt's step, which is dropped.
    scoring = body.echo and max_tokens == 0
    try:
        params = body.sampling_params(1 if scoring else max_tokens, body.logprobs, defaults)
    except ValueError as e:
        raise invalid_value(str(e), body) from None
    if len(prompts) * params.n > MAX_PROMPTS:  # (each an engine request, admitted whole: 2,048 prompts at n = 128 made
        # 262,144, 2.5 GB, the server unanswering for 14 s)
        raise invalid_value(f"n of {params.n} for {len(prompts)} prompts makes {len(prompts) * params.n} choices; a "
                            f"request makes at most {MAX_PROMPTS}", body)
    params.lora = state.adapter_for(body)
    if body.echo and body.logprobs is not None:  # the echoed prompt comes with its logprobs, as OpenAI's did
        params.prompt_logprobs = max(body.logprobs, body.prompt_logprobs or 0)
    state.check_token_ids(params.stop_token_ids, "stop_token_ids")
    state.check_token_ids(list(params.logit_bias), "logit_bias")
    state.check_token_ids(params.allowed_token_ids or [], "allowed_token_ids")
    check_room(state, prompts, None if scoring else body.max_tokens, "max_tokens")
    generation = Generation(state, f"cmpl-{request_id_of(request, body)}", prompts, params, counts_output=not scoring)
    await generation.submit(body)
    tokenizer = state.engine.tokenizer
    logprobs = LogprobFormatter(body.logprobs or 0, state.tokens_as_ids(body), state.engine.token_bytes) \
        if body.logprobs is not None else None
    reply_offsets: dict[int, TextOffsets] = {}  # each choice's, continued across its streamed chunks

    def parts(choice: Choice, echo: list, generated: list) -> tuple[tuple[list, TextOffsets], ...]:
        """LogprobFormatter.format's parts of a choice: its echoed prompt's entries, then its generated ones,
        whose text follows the echoed prompt's (decoded as the engine decodes it, after the prompt)."""
        prompt = choice.index // params.n
        token_bytes = state.engine.token_bytes
        if choice.index not in reply_offsets:
            reply_offsets[choice.index] = TextOffsets(tokenizer, prompts[prompt], params.skip_special_tokens,
                                                      token_bytes, len(prompt_texts[prompt]) if body.echo else 0)
        added = echo_added[prompt]
        echoed = TextOffsets(tokenizer, [], echo_skips_special[prompt], token_bytes) if added is None else \
            EchoOffsets(tokenizer, token_bytes, added[0], len(prompts[prompt]) - sum(added), len(prompt_texts[prompt]))
        return (echo, echoed), (generated, reply_offsets[choice.index])

    def echoed(choice: Choice, prompt_logprobs: list[TokenLogprob | None] | None) -> tuple[str, list]:
        """The prompt text and its logprob entries that `echo` puts before the completion (the first
        token has no logprob)."""
        if not body.echo:
            return "", []
        prompt = choice.index // params.n
        known = prompt_logprobs or [None] * len(prompts[prompt])  # none if the request failed before
        entries = [entry or (t, tokenizer.decode([t])) for t, entry in zip(prompts[prompt], known)] \
            if logprobs else []
        return prompt_texts[prompt], entries

    def ending(reason: str | None) -> str | None:
        """The finish reason to report: "length" for a scored prompt, which asked for no tokens."""
        return "length" if scoring and reason in ("stop", "length") else reason

    def chunk(choices: list[CompletionChoice], usage=None) -> dict:
        return dump(CompletionResponse(id=generation.id, created=generation.created, model=generation.model,
                                       choices=choices, usage=usage))

    if body.stream:
        forced_usage = state.settings.enable_force_include_usage  # every stream ends with its usage

        def choice_chunk(choice: Choice, **fields) -> dict:
            """A chunk of one choice, with that choice's usage so far where continuous usage stats are asked for,
            and with return_token_ids the token ids it adds (the prompt's on the choice's first; a scored
            prompt's reply has none)."""
            usage = (generation.usage_so_far(choice, count_completion=not scoring) if body.continuous_usage(forced_usage)
                     else None)
            if body.return_token_ids:
                fields["prompt_token_ids"], added = choice.unsent_ids()
                fields["token_ids"] = [] if scoring else added
            return chunk([CompletionChoice(index=choice.index, **fields)], usage=usage)

        def start():  # with logprobs the echo waits for the prompt's logprobs: the first delta brings them
            for choice in generation.choices if body.echo and not logprobs else []:
                yield choice_chunk(choice, text=echoed(choice, None)[0])

        def on_delta(choice: Choice, out: RequestOutput):
            if out.prompt_logprobs is not None and body.echo:
                text, entries = echoed(choice, out.prompt_logprobs)
                yield choice_chunk(choice, text=text, logprobs=logprobs.format(*parts(choice, entries, [])))
            if scoring:
                if out.finish_reason:
                    yield choice_chunk(choice, text="", finish_reason=ending(out.finish_reason))
            elif out.text or out.finish_reason or (logprobs and out.logprobs):
                lp = logprobs.format(*parts(choice, [], out.logprobs or [])) if logprobs else None
                yield choice_chunk(choice, text=out.text, logprobs=lp, finish_reason=out.finish_reason,
                                   stop_reason=out.stop_reason)

        def finish():
            if body.include_usage(forced_usage):
                yield chunk([], usage=generation.usage(count_completions=not scoring))

        return sse_response(sse_events(generation, state.settings.keepalive_interval, start, on_delta, finish))

    await generation.run(request)
    choices = []
    for choice in generation.choices:
        text, entries = echoed(choice, choice.prompt_logprobs)
        generated, generated_text = ([], "") if scoring else (choice.logprobs, choice.text)
        lp = logprobs.format(*parts(choice, entries, generated)) if logprobs else None
        ids = body.return_token_ids
        prompt_lp = None if body.prompt_logprobs is None else prompt_logprob_entries(
            choice.prompt_logprobs or [None] * len(choice.prompt_ids), body.prompt_logprobs, state.tokens_as_ids(body))
        choices.append(CompletionChoice(index=choice.index, text=text + generated_text, logprobs=lp,
                                        finish_reason=ending(choice.finish_reason),
                                        stop_reason=None if scoring else choice.stop_reason,
                                        prompt_token_ids=choice.prompt_ids if ids else None,
                                        token_ids=([] if scoring else choice.token_ids) if ids else None,
                                        prompt_logprobs=prompt_lp))
    return CompletionResponse(id=generation.id, created=generation.created, model=generation.model, choices=choices,
                              usage=generation.usage(count_completions=not scoring))
