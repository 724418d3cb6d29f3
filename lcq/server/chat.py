"""POST /v1/chat/completions: messages rendered with the tokenizer's chat template, n choices, logprobs."""
from __future__ import annotations

import inspect
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Request

from lcq.runtime.outputs import RequestOutput, TokenLogprob

from .errors import APIError, generation_responses, invalid_value
from .generation import Choice, Generation
from .protocol import AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, \
    ChatCompletionResponse, ChatLogprobs, ChatMessage, ChatTemplateOptions, ChatTokenLogprob, DeltaMessage, ToolCall, \
    ToolCallDelta, TopLogprob, dump
from .sse import sse_events, sse_response
from .state import ServerState, get_state
from .tool_calls import ReplyReader, read_reply

router = APIRouter()
STREAM_RESPONSE = {"description": "with `stream: true`: server-sent events of ChatCompletionChunk, then [DONE]",
                   "content": {"text/event-stream": {}}}


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat template expects them: role and plain-text content."""
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            kinds = {part.type for part in content} - {"text"}
            if kinds:
                raise APIError(400, f"messages[{i}].content: only text parts are supported, got {sorted(kinds)}",
                               param=f"messages.{i}.content", code="invalid_value")
            content = "".join(part.text or "" for part in content)
        entry = {"role": message.role, "content": content or ""}
        for key in ("name", "tool_calls", "tool_call_id"):  # tool conversations, for templates that render them
            if getattr(message, key):
                entry[key] = getattr(message, key)
        out.append(entry)
    return out


def render_chat(tokenizer, messages: list[ChatMessage], options: ChatTemplateOptions,
                tools: list[dict] | None = None) -> list[int]:
    """Token ids of the conversation plus the assistant turn's opening (or the last message continued),
    per the model's own template (which describes `tools` to the model where it knows how)."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", code="no_chat_template")
    if options.add_generation_prompt and options.continue_final_message:
        raise APIError(400, "continue_final_message needs add_generation_prompt false", code="invalid_value",
                       param="continue_final_message")
    variables = options.chat_template_kwargs or {}
    reserved = sorted(set(variables) & set(inspect.signature(tokenizer.apply_chat_template).parameters))
    if reserved:
        raise APIError(400, f"chat_template_kwargs cannot set {', '.join(reserved)}", code="invalid_value",
                       param="chat_template_kwargs")
    try:
        text = tokenizer.apply_chat_template(message_dicts(messages), tools=tools,
                                             add_generation_prompt=options.add_generation_prompt,
                                             continue_final_message=options.continue_final_message, tokenize=False,
                                             **variables)
    except APIError:
        raise
    except Exception as e:  # jinja raises for conversations the template forbids (e.g. roles not alternating)
        raise APIError(400, f"the chat template rejected these messages: {e}", param="messages",
                       code="invalid_value") from None
    return tokenizer.encode(text, add_special_tokens=False)


def chat_logprobs(entries: list[TokenLogprob], top: int) -> ChatLogprobs:
    def top_entry(text: str, logprob: float) -> TopLogprob:
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    return ChatLogprobs(content=[
        ChatTokenLogprob(token=e.token, logprob=e.logprob, bytes=list(e.token.encode("utf-8")),
                         top_logprobs=[top_entry(text, lp) for _, text, lp in e.top[:top]])
        for e in entries])


@dataclass
class ChatTurn:
    """A chat request submitted to the engine, and how its replies are read: a forced tool call, calls
    in the model's own syntax (`parser`), or text. The Responses API runs its requests through it too."""

    generation: Generation
    forced: str | None
    parser: str | None
    logprobs: bool
    top: int  # alternatives per token in logprobs
    parallel: bool  # parallel_tool_calls: false keeps a reply's first call only

    def reader(self) -> ReplyReader:
        return ReplyReader(self.forced, self.parser, self.parallel)

    def reply(self, choice: Choice) -> tuple[str | None, list[ToolCall] | None, str | None]:
        """(content, tool calls, finish reason) of a finished choice."""
        return read_reply(choice.text, self.forced, self.parser, choice.finish_reason, self.parallel)

    def logprobs_of(self, entries: list[TokenLogprob]) -> ChatLogprobs | None:
        return chat_logprobs(entries, self.top) if self.logprobs else None


def start_chat(body: ChatCompletionRequest, state: ServerState, route: str, request_id: str) -> ChatTurn:
    """Check the request, render its prompt and submit it (every choice, or none with an error)."""
    state.check_request(body, route)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs", code="invalid_value")
    top = body.top_logprobs or 0
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    try:
        params = body.sampling_params(max_tokens, top if body.logprobs else None, state.engine.sampling_defaults)
    except ValueError as e:
        raise invalid_value(str(e), body) from None
    params.lora = state.adapter_for(body)
    state.check_token_ids(params.stop_token_ids, "stop_token_ids")
    state.check_token_ids(list(params.logit_bias), "logit_bias")
    forced = body.forced_tool()
    parsed = body.auto_tools  # the model may call tools in its own syntax: read with the server's parser
    if parsed and state.settings.tool_call_parser is None:
        raise APIError(400, "tool_choice \"auto\" needs `lcq serve --tool-call-parser` (hermes, llama3_json); or use "
                       "\"required\", a named function, or \"none\"", param="tool_choice", code="unsupported_value")
    prompt = body.truncated(render_chat(state.engine.tokenizer, body.messages, body,
                                        body.tools if forced or parsed else None))
    generation = Generation(state, request_id, [prompt], params)
    generation.submit()
    return ChatTurn(generation, forced, state.settings.tool_call_parser if parsed else None, body.logprobs, top,
                    body.parallel_tool_calls)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses=generation_responses(STREAM_RESPONSE))
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    state = get_state(request)
    turn = start_chat(body, state, "/v1/chat/completions", f"chatcmpl-{uuid.uuid4().hex}")
    generation = turn.generation

    def chunk(choices: list[ChatChunkChoice], usage=None) -> dict:
        return dump(ChatCompletionChunk(id=generation.id, created=generation.created, model=generation.model, choices=choices, usage=usage))

    if body.stream:
        readers = {choice.index: turn.reader() for choice in generation.choices}

        def start():
            for choice in generation.choices:
                yield chunk([ChatChunkChoice(index=choice.index, delta=DeltaMessage(role="assistant", content=""))])

        def on_delta(choice: Choice, out: RequestOutput):
            if turn.forced or turn.parser:  # text until a call may start; calls once the reply is complete
                text = readers[choice.index].feed(out.text)
                if text:
                    yield chunk([ChatChunkChoice(index=choice.index, delta=DeltaMessage(content=text))])
                if out.finish_reason:  # with the logprobs of all the reply's tokens
                    content, calls, reason = readers[choice.index].finish(out.finish_reason)
                    delta = DeltaMessage(content=content, tool_calls=None if not calls else
                                         [ToolCallDelta(index=i, **call.model_dump()) for i, call in enumerate(calls)])
                    yield chunk([ChatChunkChoice(index=choice.index, delta=delta, finish_reason=reason,
                                                 logprobs=turn.logprobs_of(choice.logprobs))])
            elif out.text or out.finish_reason or (turn.logprobs and out.logprobs):
                yield chunk([ChatChunkChoice(index=choice.index, delta=DeltaMessage(content=out.text or None),
                                             logprobs=turn.logprobs_of(out.logprobs or []),
                                             finish_reason=out.finish_reason, stop_reason=out.stop_reason)])

        def finish():
            if body.include_usage:
                yield chunk([], usage=generation.usage())

        return sse_response(sse_events(generation, state.settings.keepalive_interval, start, on_delta, finish))

    await generation.run(request)
    failure = generation.failure()
    if failure:
        raise failure
    choices = []
    for c in generation.choices:
        content, calls, reason = turn.reply(c)
        choices.append(ChatChoice(index=c.index, message=AssistantMessage(content=content, tool_calls=calls),
                                  logprobs=turn.logprobs_of(c.logprobs), finish_reason=reason,
                                  stop_reason=c.stop_reason))
    return ChatCompletionResponse(id=generation.id, created=generation.created, model=generation.model, choices=choices,
                                  usage=generation.usage())
