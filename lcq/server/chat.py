"""POST /v1/chat/completions: messages rendered with the tokenizer's chat template, n choices, logprobs,
tool calls, and a reasoning model's thinking apart from its answer."""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import APIRouter, Request

from lcq.runtime.outputs import RequestOutput, TokenLogprob

from .content_format import resolved_content_format
from .errors import APIError, generation_responses, invalid_value
from .generation import Choice, Generation, check_room
from .protocol import AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, \
    ChatCompletionResponse, ChatLogprobs, ChatMessage, ChatTemplateOptions, ChatTokenLogprob, \
    CompletionTokensDetails, DeltaMessage, ToolCall, ToolCallDelta, TopLogprob, UsageInfo, dump, prompt_logprob_entries, \
    token_name
from .reasoning import HARMONY, THINK_END, THINK_START, ReasoningParser, ReasoningStream, reasoning_parser
from .sse import sse_events, sse_response
from .state import ServerState, get_state, request_id_of
from .settings import TOOL_CALL_PARSERS
from .tool_calls import KEEPS_SPECIAL_TOKENS, ReplyReader, read_reply

logger = logging.getLogger("lcq.server")

router = APIRouter()
STREAM_RESPONSE = {"description": "with `stream: true`: server-sent events of ChatCompletionChunk, then [DONE]",
                   "content": {"text/event-stream": {}}}


# The parts a message's text may come in (OpenAI's, and the Responses API's names), and where each holds it;
# joined by newlines, as vLLM joins them
TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}


def message_dicts(messages: list[ChatMessage], parts: bool = False) -> list[dict]:
    """Messages as the chat template expects them: role and content, plain text or (`parts`, for templates
    that loop over it) a list of text parts, as vLLM gives each (and an assistant turn's thinking as
    `reasoning_content`, which templates such as Qwen3's render where they keep it, and as `thinking`, which
    gpt-oss's renders as an analysis message)."""
    out = []
    for i, message in enumerate(messages):
        texts = message_texts(message, i)
        # a tool's result is one string whatever the format, as vLLM gives it (Mistral's templates write it
        # with `|string`: a list of parts became its Python repr in the prompt)
        content = [{"type": "text", "text": text} for text in texts] if parts and message.role != "tool" \
            else "\n".join(text for text in texts if text)
        entry = {"role": message.role, "content": content}
        for key in ("name", "tool_call_id"):  # tool conversations, for templates that render them
            if getattr(message, key):
                entry[key] = getattr(message, key)
        if message.tool_calls:
            entry["tool_calls"] = [template_tool_call(call, f"messages.{i}.tool_calls.{j}")
                                   for j, call in enumerate(message.tool_calls)]
        reasoning = message.reasoning_content or message.reasoning
        if reasoning:
            entry["reasoning_content"] = entry["reasoning"] = entry["thinking"] = reasoning
        out.append(entry)
    return out


def message_texts(message: ChatMessage, index: int) -> list[str]:
    """A message's text parts (its content where that is a string; none where it is null)."""
    content = message.content
    if not isinstance(content, list):
        return [] if content is None else [content]
    kinds = {part.type for part in content} - set(TEXT_PARTS)
    if kinds:
        raise APIError(400, f"messages[{index}].content: only text parts are supported, got {sorted(kinds)}",
                       param=f"messages.{index}.content", code="invalid_value")
    return [text for part in content if (text := getattr(part, TEXT_PARTS[part.type], None)) is not None]


def template_tool_call(call: dict, param: str) -> dict:
    """An assistant turn's call as chat templates take it (vLLM's, per transformers' docs): its arguments a
    mapping, which templates iterate (`arguments|items`, Qwen3-Coder's) or write as JSON (`arguments|tojson`,
    Llama 3.1's and Qwen2.5's), where OpenAI's API sends JSON text; `{}` where they are empty or not an object.
    A copy: the request keeps what the client sent. Arguments that are not JSON are `{}`, with a warning, as
    vLLM takes them: such a call stays in the conversation, and a 400 would refuse every later turn of it."""
    function = call.get("function")
    if not isinstance(function, dict):
        return call  # the template says what it makes of it
    arguments = function.get("arguments")
    if isinstance(arguments, str) and arguments:
        try:
            arguments = json.loads(arguments)
        except ValueError:
            logger.warning("%s.function.arguments is not JSON; the template gets {}", param)
            arguments = {}
    return {**call, "function": {**function, "arguments": arguments if isinstance(arguments, dict) else {}}}


def chat_prompt(tokenizer, messages: list[ChatMessage], options: ChatTemplateOptions,
                tools: list[dict] | None = None, content_format: str = "auto") -> str:
    """The conversation plus the assistant turn's opening (or the last message continued), per the
    model's own template (which describes `tools` to the model where it knows how), each message's content
    in the form the template reads (`content_format`: auto, string or openai)."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", code="no_chat_template")
    if options.add_generation_prompt and options.continue_final_message:
        raise APIError(400, "continue_final_message needs add_generation_prompt false", code="invalid_value",
                       param="continue_final_message")
    variables = options.template_variables()
    reserved = sorted(set(variables) & set(inspect.signature(tokenizer.apply_chat_template).parameters))
    if reserved:
        raise APIError(400, f"chat_template_kwargs cannot set {', '.join(reserved)}", code="invalid_value",
                       param="chat_template_kwargs")
    template = tokenizer.get_chat_template(tools=tools) if hasattr(tokenizer, "get_chat_template") \
        else tokenizer.chat_template
    conversation = message_dicts(messages, parts=resolved_content_format(content_format, template) == "openai")
    if "developer" not in str(tokenizer.chat_template):  # OpenAI's newer name of the system role, which a template
        for message in conversation:                     # that does not know it may drop (Qwen's) or refuse
            if message["role"] == "developer":
                message["role"] = "system"
    try:
        text = tokenizer.apply_chat_template(conversation, tools=tools,
                                             add_generation_prompt=options.add_generation_prompt,
                                             continue_final_message=options.continue_final_message, tokenize=False,
                                             documents=options.documents, **variables)
    except APIError:
        raise
    except Exception as e:  # jinja raises for conversations the template forbids (e.g. roles not alternating)
        raise APIError(400, f"the chat template rejected these messages: {e}", param="messages",
                       code="invalid_value") from None
    return text


def reply_opening(tokenizer, messages: list[ChatMessage], options: ChatTemplateOptions, tools: list[dict] | None,
                  text: str, content_format: str = "auto") -> str:
    """What opens the reply in the rendered chat prompt `text`: the final message where it is continued, else
    what the generation prompt adds after the conversation. A reply starts inside reasoning where this opens
    it, not where a message merely mentions the tag."""
    if THINK_START not in text:
        return ""
    if options.continue_final_message:
        return message_dicts(messages[-1:])[0]["content"]
    if not options.add_generation_prompt:
        return ""
    conversation = chat_prompt(tokenizer, messages, options.model_copy(update={"add_generation_prompt": False}), tools,
                               content_format)
    return text[len(conversation):] if text.startswith(conversation) else text


def render_chat(tokenizer, messages: list[ChatMessage], options: ChatTemplateOptions,
                add_special_tokens: bool = False, tools: list[dict] | None = None,
                content_format: str = "auto") -> list[int]:
    """Token ids of chat_prompt; the tokenizer's special tokens only where asked (the template writes its own)."""
    return tokenizer.encode(chat_prompt(tokenizer, messages, options, tools, content_format),
                            add_special_tokens=add_special_tokens)


def chat_logprobs(entries: list[TokenLogprob], top: int, tokens_as_ids: bool,
                  token_bytes: Callable[[int], bytes]) -> ChatLogprobs:
    """Chat's logprobs, each token named by its text, its `bytes` those it stands for (so that the parts of a
    character split over tokens, U+FFFD each as text, can be put together), or by id (`tokens_as_ids`), its
    `bytes` those of the name."""
    def named(token_id: int, text: str) -> dict:
        if tokens_as_ids:
            name = token_name(token_id, text, tokens_as_ids)
            return {"token": name, "bytes": list(name.encode("utf-8"))}
        return {"token": text, "bytes": list(token_bytes(token_id))}

    return ChatLogprobs(content=[
        ChatTokenLogprob(**named(e.token_id, e.token), logprob=e.logprob,
                         top_logprobs=[TopLogprob(**named(i, text), logprob=lp) for i, text, lp in e.top[:top]])
        for e in entries])


@dataclass
class ChatTurn:
    """A chat request submitted to the engine, and how its replies are read: the thinking apart
    (`reasoning`, with --reasoning-parser), then a forced tool call, calls in the model's own syntax
    (`parser`), or text. The Responses API runs its requests through it too."""

    generation: Generation
    forced: str | None
    parser: str | None
    logprobs: bool
    top: int  # alternatives per token in logprobs
    parallel: bool  # parallel_tool_calls: false keeps a reply's first call only
    reasoning: ReasoningParser | None = None
    schemas: dict[str, dict] | None = None  # each tool's parameters by name (parsers that type values by them)
    tokens_as_ids: bool = False  # logprobs name tokens "token_id:{id}" (vLLM's return_tokens_as_token_ids)

    def reader(self) -> TurnReader:
        return TurnReader(self.reasoning.stream() if self.reasoning else None,
                          ReplyReader(self.forced, self.parser, self.parallel, self.schemas))

    def reply(self, choice: Choice) -> tuple[str | None, str | None, list[ToolCall] | None, str | None]:
        """(reasoning, content, tool calls, finish reason) of a finished choice; content None when the
        reply ended inside its reasoning."""
        reasoning, content = self.reasoning.split(choice.text) if self.reasoning else (None, choice.text)
        if content is None:
            return reasoning, None, None, choice.finish_reason
        return (reasoning, *read_reply(content, self.forced, self.parser, choice.finish_reason, self.parallel,
                                       self.schemas))

    def usage(self) -> UsageInfo:
        """The generation's usage, and the replies' reasoning tokens where thinking is read apart, and how
        much of a prediction was accepted where the request brought one."""
        usage = self.generation.usage()
        choices = self.generation.choices
        prediction = choices[0].params.prediction
        if self.reasoning is None and prediction is None:
            return usage
        details = CompletionTokensDetails()
        if self.reasoning is not None:
            decode = self.generation.state.engine.tokenizer.decode
            details.reasoning_tokens = sum(self.reasoning.reasoning_tokens(c.text, c.token_ids, decode) for c in choices)
        if prediction is not None:
            details.accepted_prediction_tokens = sum(c.accepted_prediction_tokens for c in choices)
            details.rejected_prediction_tokens = len(prediction) * len(choices) - details.accepted_prediction_tokens
        usage.completion_tokens_details = details
        return usage

    def content_logprobs(self, choice: Choice) -> list[TokenLogprob]:
        """The logprobs of a reply's content tokens: those after its reasoning's (the Responses API's message
        text has only these)."""
        if self.reasoning is None:
            return choice.logprobs
        decode = self.generation.state.engine.tokenizer.decode
        return choice.logprobs[self.reasoning.reasoning_tokens(choice.text, choice.token_ids, decode):]

    def logprobs_of(self, entries: list[TokenLogprob]) -> ChatLogprobs | None:
        return chat_logprobs(entries, self.top, self.tokens_as_ids,
                             self.generation.state.engine.token_bytes) if self.logprobs else None


class TurnReader:
    """One reply read as it streams: the (reasoning, content) that can be sent now, and at the end the
    rest, the tool calls and the finish reason. Tool calls are read from the content only."""

    def __init__(self, reasoning: ReasoningStream | None, reply: ReplyReader):
        self.reasoning = reasoning
        self.reply = reply

    @property
    def reasoned(self) -> bool:
        """Whether the reply has a reasoning part (so far)."""
        return self.reasoning is not None and self.reasoning.entered

    def feed(self, delta: str) -> tuple[str, str]:
        reasoning, content = self.reasoning.feed(delta) if self.reasoning else ("", delta)
        return reasoning, self.reply.feed(content)

    def finish(self, finish_reason: str | None) -> tuple[str, str | None, list[ToolCall] | None, str | None]:
        """(reasoning not sent yet, content not sent yet, tool calls or None, finish reason); content
        None when the reply ended inside its reasoning."""
        reasoning, content = self.reasoning.finish() if self.reasoning else ("", "")
        if self.reasoning is not None and self.reasoning.thinking:
            return reasoning, None, None, finish_reason
        content = self.reply.feed(content)
        rest, calls, reason = self.reply.finish(finish_reason)
        return reasoning, content + (rest or ""), calls, reason


async def start_chat(body: ChatCompletionRequest, state: ServerState, route: str, request_id: str) -> ChatTurn:
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
    state.check_token_ids(params.allowed_token_ids or [], "allowed_token_ids")
    forced = body.forced_tool()
    parsed = body.auto_tools  # the model may call tools in its own syntax: read with the server's parser
    if parsed and state.settings.tool_call_parser is None:
        raise APIError(400, "tool_choice \"auto\" needs `lcq serve --tool-call-parser` "
                       f"({', '.join(TOOL_CALL_PARSERS)}); or use \"required\", a named function, or \"none\"",
                       param="tool_choice", code="unsupported_value")
    if parsed and state.settings.tool_call_parser in KEEPS_SPECIAL_TOKENS:
        params.skip_special_tokens = False  # the parser reads tags that are special tokens
    schemas = body.tool_parameters() if parsed else None  # (checked with the request)
    tokenizer = state.engine.tokenizer
    content_format = state.settings.chat_template_content_format

    def render() -> tuple[list[int], ReasoningParser | None, list[int] | None]:
        """The prompt's ids, the reply's reasoning parser and the prediction's ids: off the event loop, where a
        long conversation's rendering and tokenizing held every other request (seconds for megabytes)."""
        text = chat_prompt(tokenizer, body.messages, body, body.tools, content_format)
        reasoning = reasoning_parser(state.settings.reasoning_parser, reply_opening(
            tokenizer, body.messages, body, body.tools, text, content_format),
            reads_calls=parsed and state.settings.tool_call_parser == "openai") \
            if state.settings.reasoning_parser else None
        prediction = tokenizer.encode(body.prediction.text(), add_special_tokens=False) \
            if body.prediction is not None else None
        return tokenizer.encode(text, add_special_tokens=body.adds_special_tokens(default=False)), reasoning, prediction

    ids, reasoning, params.prediction = await asyncio.to_thread(render)
    if state.settings.reasoning_parser == HARMONY:
        params.skip_special_tokens = False  # harmony's markup, special tokens all, tells reasoning from answer
    if reasoning is not None and params.structured_output is not None and state.settings.reasoning_parser != HARMONY:
        # The grammar is for the answer, not the thinking: after "</think>" where the prompt opened the thinking;
        # else after it where the reply opens "<think>" itself (Qwen3's stock template, thinking on), and from
        # the first token where the reply opens otherwise.
        params.structured_output_after = THINK_END
        params.structured_output_opening = None if reasoning.inside else THINK_START
    prompt = body.truncated(ids, state.engine.max_model_len, max_tokens)
    check_room(state, [prompt], max_tokens, body.field_name("max_tokens"))
    generation = Generation(state, request_id, [prompt], params)
    await generation.submit(body)
    return ChatTurn(generation, forced, state.settings.tool_call_parser if parsed else None, body.logprobs, top,
                    body.parallel_tool_calls, reasoning, schemas, state.tokens_as_ids(body))


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses=generation_responses(STREAM_RESPONSE))
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    state = get_state(request)
    turn = await start_chat(body, state, "/v1/chat/completions", f"chatcmpl-{request_id_of(request, body)}")
    generation = turn.generation

    def chunk(choices: list[ChatChunkChoice], usage=None, prompt_token_ids: list[int] | None = None) -> dict:
        return dump(ChatCompletionChunk(id=generation.id, created=generation.created, model=generation.model,
                                        choices=choices, usage=usage, prompt_token_ids=prompt_token_ids))

    if body.stream:
        forced_usage = state.settings.enable_force_include_usage  # every stream ends with its usage
        readers = {choice.index: turn.reader() for choice in generation.choices}
        whole = turn.forced or turn.parser  # calls are read from the complete reply, sent with all its logprobs

        def choice_chunk(choice: Choice, **fields) -> dict:
            """A chunk of one choice, with that choice's usage so far where continuous usage stats are asked for
            (none generated yet on the first, as vLLM's), and with return_token_ids the token ids it adds (the
            prompt's on the choice's first)."""
            usage = generation.usage_so_far(choice) if body.continuous_usage(forced_usage) else None
            prompt_ids, fields["token_ids"] = choice.unsent_ids() if body.return_token_ids else (None, None)
            return chunk([ChatChunkChoice(index=choice.index, **fields)], usage=usage, prompt_token_ids=prompt_ids)

        def start():  # (a forced call's reply has no content: null, as OpenAI's)
            for choice in generation.choices:
                yield choice_chunk(choice, delta=DeltaMessage(role="assistant", content=None if turn.forced else ""))

        def on_delta(choice: Choice, out: RequestOutput):
            reader = readers[choice.index]
            reasoning, content = reader.feed(out.text)
            calls, reason = None, None
            if out.finish_reason:
                more_reasoning, more_content, calls, reason = reader.finish(out.finish_reason)
                reasoning, content = reasoning + more_reasoning, content + (more_content or "")
            if whole:
                logprobs = turn.logprobs_of(choice.logprobs) if out.finish_reason else None
            else:
                logprobs = turn.logprobs_of(out.logprobs or [])
            if reasoning or content or calls or (logprobs and logprobs.content):
                delta = DeltaMessage(content=content or None, reasoning=reasoning or None,
                                     reasoning_content=reasoning or None, tool_calls=None if not calls else
                                     [ToolCallDelta(index=i, **call.model_dump()) for i, call in enumerate(calls)])
                yield choice_chunk(choice, delta=delta, logprobs=logprobs)
            if out.finish_reason:  # in a chunk of its own, as OpenAI's: the SDK's stream helper ends the calls then
                yield choice_chunk(choice, delta=DeltaMessage(), finish_reason=reason, stop_reason=out.stop_reason)

        def finish():
            if body.include_usage(forced_usage):
                yield chunk([], usage=turn.usage())

        return sse_response(sse_events(generation, state.settings.keepalive_interval, start, on_delta, finish))

    await generation.run(request)
    choices = []
    for c in generation.choices:
        reasoning, content, calls, reason = turn.reply(c)
        message = AssistantMessage.of_reply(content, reasoning, calls, state.settings.reasoning_parser is not None)
        choices.append(ChatChoice(index=c.index, message=message, logprobs=turn.logprobs_of(c.logprobs),
                                  finish_reason=reason, stop_reason=c.stop_reason,
                                  token_ids=c.token_ids if body.return_token_ids else None))
    first = generation.choices[0]
    prompt_logprobs = None if body.prompt_logprobs is None else prompt_logprob_entries(
        first.prompt_logprobs or [None] * len(first.prompt_ids), body.prompt_logprobs, turn.tokens_as_ids)
    return ChatCompletionResponse(id=generation.id, created=generation.created, model=generation.model, choices=choices,
                                  usage=turn.usage(),
                                  prompt_token_ids=generation.prompts[0] if body.return_token_ids else None,
                                  prompt_logprobs=prompt_logprobs)
