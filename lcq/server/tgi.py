"""Text Generation Inference's own routes beside OpenAI's: POST /generate, POST /generate_stream, POST / (TGI's
compat route: a list of one reply, or the stream where `stream` is true) and GET /info, so that TGI's clients
(huggingface_hub's InferenceClient.text_generation, the `text-generation` package, LangChain's HuggingFaceEndpoint)
run against lcq as they are. Replies and errors take TGI's shapes, which those clients parse: every token with its
logprob and whether it is special, `details` where asked, errors as {"error", "error_type"} (errors.tgi_error_body).
"""
from __future__ import annotations

import asyncio

import pydantic
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lcq import __version__
from lcq.runtime.detokenizer import IncrementalDetokenizer
from lcq.runtime.outputs import RequestOutput, TokenLogprob
from lcq.runtime.sampling_params import MAX_N, MAX_STOP

from .completions import special_token_ids, tokenize_prompts
from .errors import APIError, error_responses, invalid_value, speaks_tgi, tgi_route
from .generation import Choice, Generation, check_room
from .protocol import OpenAIRequest, last_tokens
from .sse import sse_events, sse_response
from .state import ServerState, get_state
from .tgi_protocol import GenerateRequest, finish_reason

router = APIRouter()
TGI_RESPONSES = {**error_responses(401, 404, 413, 429, 503), 422: {"description": "TGI's validation error: "
                                                                                  '{"error", "error_type"}'}}
STREAM_RESPONSE = {"description": "server-sent events, one per token; the last carries generated_text (and details)",
                   "content": {"text/event-stream": {}}}


class Reply:
    """One TGI request's generation and how its tokens are written: TGI's token objects, its details."""

    def __init__(self, state: ServerState, body: GenerateRequest, generation: Generation, prompt_text: str):
        self.body, self.generation = body, generation
        self.tokenizer = state.engine.tokenizer
        self.special = special_token_ids(self.tokenizer)
        self.prefix = prompt_text if body.parameters.return_full_text else ""
        self.top = body.parameters.top_n_tokens or 0
        self.sampled = body.parameters.sampling()
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}

    def token(self, token_id: int, text: str, logprob: float | None) -> dict:
        return {"id": token_id, "text": text, "logprob": logprob, "special": token_id in self.special}

    def tokens(self, choice: Choice, entries: list[TokenLogprob]) -> list[dict]:
        """The next tokens of a choice, each with the text it completes (none while a character is not whole yet,
        the character with the token that ends it; none for a special token, which the generated text leaves out,
        as TGI's clients that check `special` skip it), so that the texts of the tokens make the generated text
        (the last cut where a stop string ended the text inside it): clients that join them all, as LangChain's
        HuggingFaceEndpoint streams them, get no end-of-sequence marker. The same for /generate's details and
        /generate_stream's events."""
        if choice.index not in self.detokenizers:
            self.detokenizers[choice.index] = IncrementalDetokenizer(self.tokenizer, choice.prompt_ids, [])
        detokenizer = self.detokenizers[choice.index]
        texts = ["" if e.token_id in self.special else detokenizer.add(e.token_id) for e in entries]
        over = len(detokenizer.text) - len(choice.text)
        plain = [k for k, e in enumerate(entries) if e.token_id not in self.special]
        if choice.finish_reason is not None and plain and 0 < over <= len(texts[plain[-1]]) \
                and detokenizer.text.startswith(choice.text):
            texts[plain[-1]] = texts[plain[-1]][:-over]
        return [self.token(e.token_id, text, e.logprob) for e, text in zip(entries, texts)]

    def top_tokens(self, entry: TokenLogprob) -> list[dict]:
        return [self.token(i, text, logprob) for i, text, logprob in entry.top[:self.top]]

    def ending(self, choice: Choice) -> dict:
        """Why a sample ended, its length and seed: what every details object starts with."""
        return {"finish_reason": finish_reason(choice.finish_reason, choice.stop_reason),
                "generated_tokens": len(choice.token_ids), "seed": choice.params.seed if self.sampled else None}

    def details(self, choice: Choice) -> dict:
        """A whole sample's details: why it ended, its tokens (and their alternatives), the prompt's where asked."""
        details = {**self.ending(choice), "prefill": self.prefill(choice),
                   "tokens": self.tokens(choice, choice.logprobs)}
        if self.top:
            details["top_tokens"] = [self.top_tokens(entry) for entry in choice.logprobs]
        return details

    def prefill(self, choice: Choice) -> list[dict]:
        """With decoder_input_details, the prompt's tokens and their logprobs (none for the first, as TGI's)."""
        if not self.body.parameters.decoder_input_details:
            return []
        known = choice.prompt_logprobs or [None] * len(choice.prompt_ids)
        return [{"id": token_id, "text": self.tokenizer.decode([token_id]),
                 "logprob": None if entry is None else entry.logprob}
                for token_id, entry in zip(choice.prompt_ids, known)]

    def whole(self) -> dict:
        """/generate's reply: the likeliest sample (by its tokens' logprobs; the only one without best_of), the
        others in details.best_of_sequences."""
        choices = self.generation.choices
        best = max(choices, key=lambda c: sum(e.logprob for e in c.logprobs))
        reply = {"generated_text": self.prefix + best.text}
        if self.body.parameters.details:
            reply["details"] = self.details(best)
            if len(choices) > 1:
                reply["details"]["best_of_sequences"] = [
                    {"generated_text": self.prefix + c.text, **self.details(c)} for c in choices if c is not best]
        return reply

    def events(self, choice: Choice, out: RequestOutput) -> list[dict]:
        """The events of a delta, one per token (numbered from 1, as TGI's); the last event of the sample carries
        the generated text whole and, with details, why it ended."""
        entries = out.logprobs or []
        events = []
        for k, (entry, token) in enumerate(zip(entries, self.tokens(choice, entries))):
            last = out.finish_reason is not None and k == len(entries) - 1
            details = {**self.ending(choice), "input_length": len(choice.prompt_ids)} \
                if last and self.body.parameters.details else None
            events.append({"index": len(choice.token_ids) - len(out.token_ids) + k + 1, "token": token,
                           "top_tokens": self.top_tokens(entry),
                           "generated_text": self.prefix + choice.text if last else None, "details": details})
        return events


async def generate(body: GenerateRequest, request: Request, stream: bool, listed: bool = False):
    """One TGI request: a stream of token events, or the reply (in a list of one: the compat route's)."""
    state = get_state(request)
    state.check_request(body, request.url.path)
    parameters = body.parameters
    settings = state.settings
    for name, asked, limit in (("best_of", parameters.best_of or 1, settings.max_best_of),
                               ("stop", len(parameters.stop), settings.max_stop_sequences),
                               ("top_n_tokens", parameters.top_n_tokens or 0, settings.max_top_n_tokens)):
        if limit is not None and asked > limit:  # (the launcher's limits, as TGI's words give them)
            raise APIError(400, f"`{name}` must be <= {limit}. Given: {asked}", param=f"parameters.{name}")
    if stream and (parameters.best_of or 1) > 1:
        raise APIError(400, "`best_of` != 1 is not supported when streaming tokens", param="parameters.best_of")
    if stream and parameters.decoder_input_details:
        raise APIError(400, "`decoder_input_details` == true is not supported when streaming tokens",
                       param="parameters.decoder_input_details")
    prompts, texts = await asyncio.to_thread(tokenize_prompts, state, body.inputs, "inputs")  # off the event loop
    prompt = last_tokens(prompts[0], parameters.truncate, state.engine.max_model_len)
    try:
        params = parameters.sampling_params()
        params.validate(max_logprobs=None)  # (the engine holds their limit: its max_logprobs)
    except ValueError as e:
        raise invalid_value(str(e), body) from None
    params.lora = state.adapter_for(body)
    check_room(state, [prompt], parameters.max_new_tokens, "parameters.max_new_tokens")
    generation = Generation(state, f"generate-{request.state.request_id}", [prompt], params)
    await generation.submit(body)
    reply = Reply(state, body, generation, texts[0])
    if stream:
        def failed(message: str, bad_request: bool):
            yield {"error": message, "error_type": "validation" if bad_request else "generation"}

        return sse_response(sse_events(generation, state.settings.keepalive_interval, lambda: (), reply.events,
                                       lambda: (), failed, end=""))
    await generation.run(request)
    headers = {"x-prompt-tokens": str(len(prompt)),
               "x-generated-tokens": str(sum(len(c.token_ids) for c in generation.choices))}
    whole = reply.whole()
    return JSONResponse([whole] if listed else whole, headers=headers)


@router.post("/generate", responses=TGI_RESPONSES)
@tgi_route
async def generate_text(body: GenerateRequest, request: Request):
    return await generate(body, request, stream=False)


@router.post("/generate_stream", responses={200: STREAM_RESPONSE, **TGI_RESPONSES})
@tgi_route
async def generate_text_stream(body: GenerateRequest, request: Request):
    return await generate(body, request, stream=True)


@router.post("/", responses={200: STREAM_RESPONSE, **TGI_RESPONSES})
@tgi_route
async def compat_generate(body: GenerateRequest, request: Request):
    """TGI's compat route, which huggingface_hub's InferenceClient posts to: /generate_stream's events where
    `stream` is true, else /generate's reply in a list of one."""
    return await generate(body, request, stream=body.stream, listed=True)


@router.get("/info")
@tgi_route
async def info(request: Request) -> dict:
    """What TGI's /info says of a server, for clients that read its limits."""
    state = get_state(request)
    config = state.engine.config
    context = state.engine.max_model_len or None
    stops = state.settings.max_stop_sequences
    device, dtype = state.engine.placement
    return {"model_id": state.model_name, "model_sha": None, "model_dtype": dtype, "model_device_type": device,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": config.max_num_seqs + config.max_queue,
            "max_best_of": state.settings.max_best_of or MAX_N,
            "max_stop_sequences": MAX_STOP if stops is None else stops,
            "max_input_tokens": state.settings.max_input_tokens or (None if context is None else context - 1),
            "max_total_tokens": context, "max_client_batch_size": 1, "validation_workers": 1,
            "router": "lcq", "version": __version__, "sha": None, "docker_label": None}


async def tokenize(vllm_shaped: OpenAIRequest, request: Request) -> JSONResponse:
    """TGI's /tokenize, which app.py's route runs for TGI's body ({"inputs", "parameters"}, where vLLM's has a prompt
    or messages): each token's id and text and the characters of the input it covers, as TGI lists them (the
    special tokens the tokenizer adds cover none)."""
    speaks_tgi(request)
    try:
        body = GenerateRequest.model_validate(vllm_shaped.model_dump(exclude_unset=True))
    except pydantic.ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    state = get_state(request)
    state.check_request(body, "/tokenize")
    encoding = await asyncio.to_thread(state.engine.tokenizer, body.inputs, return_offsets_mapping=True)
    spans = last_tokens(list(zip(encoding["input_ids"], encoding["offset_mapping"])), body.parameters.truncate,
                        state.engine.max_model_len)
    return JSONResponse([{"id": token, "text": body.inputs[start:stop], "start": start, "stop": stop}
                         for token, (start, stop) in spans])
