"""The Responses API's models (POST /v1/responses), in OpenAI's shapes, and how a request becomes a chat
request: input items as chat messages, function tools and the text format in chat's form. One path
(chat.start_chat) then checks, renders and submits both kinds of request.
"""
from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lcq.runtime.schema_limits import nesting_depth

from .errors import APIError
from .protocol import (ChatCompletionRequest, ChatTemplateOptions, ChatTokenLogprob, Count, NullableOnFlag,
                       SamplingRequest, tool_choice_problem)

LOGPROBS_INCLUDE = "message.output_text.logprobs"  # what `include` names to get the output's logprobs
# OpenAI's values of `include`: the others name outputs of tools and inputs this server does not have, so
# there is nothing to add for them; a value outside the list is a 400, as OpenAI's is, not silently ignored
Includable = Literal["file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
                     "message.input_image.image_url", "computer_call_output.output.image_url",
                     "code_interpreter_call.outputs", "reasoning.encrypted_content", LOGPROBS_INCLUDE]
TEXT_PARTS = ("input_text", "output_text", "text")


# OpenAI's limits on a response's metadata (stored with it: a 4 MB map was kept whole, 1,000 of them 22 GB)
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512
# How deep the fields a response echoes may nest: JSON 400 deep passed the parser and then failed the reply's
# serialization, a 500 after the generation (a cut stream, a background response never answered)
ECHO_DEPTH = 64


class InputPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class InputItem(BaseModel):
    """A message (`role`, `content`), a function call the model made, or a call's output, as OpenAI
    sends them; `type` defaults to a message, as the easy input form leaves it out."""

    model_config = ConfigDict(extra="allow")
    type: str = "message"
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: str | list[InputPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputPart] | None = None


def _text(value: str | list[InputPart] | None, param: str) -> str:
    if not isinstance(value, list):
        return value or ""
    kinds = sorted({part.type for part in value} - set(TEXT_PARTS))
    if kinds:
        raise APIError(400, f"{param}: only text parts are supported, got {kinds}", param=param, code="invalid_value")
    return "".join(part.text or "" for part in value)


def _reasoning_text(item: InputItem) -> str:
    """The text of a reasoning item's reasoning_text parts (one from another server may have none)."""
    parts = item.content if isinstance(item.content, list) else []
    return "".join(part.text or "" for part in parts if part.type == "reasoning_text")


def json_arguments(arguments: str) -> bool:
    """Whether a call's arguments are JSON (or nothing), as chat's must be to reach the template."""
    try:
        json.loads(arguments or "{}")
    except ValueError:
        return False
    return True


def input_messages(items: str | list[InputItem], keep_reasoning: bool = False) -> list[dict[str, Any]]:
    """The input as chat messages: a string is one user message; a model's function calls join the
    assistant turn they follow, and each call's output is a tool message answering it. With
    `keep_reasoning` (a reasoning parser), a reasoning item's text becomes the `reasoning_content` of
    the assistant turn that follows it, for the template to render or drop; else reasoning is dropped."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    reasoning = ""  # of a reasoning item not yet given to an assistant turn

    def assistant_turn(message: dict[str, Any]) -> dict[str, Any]:
        nonlocal reasoning
        if reasoning:
            message["reasoning_content"], reasoning = reasoning, ""
        return message

    for i, item in enumerate(items):
        param = f"input.{i}"
        if item.type == "message":
            if item.role is None:
                raise APIError(400, f"{param}: a message needs a role", param=param, code="invalid_value")
            message = {"role": item.role, "content": _text(item.content, f"{param}.content")}
            messages.append(assistant_turn(message) if item.role == "assistant" else message)
        elif item.type == "function_call":
            if not (item.call_id and item.name and item.arguments is not None):
                raise APIError(400, f"{param}: a function_call needs call_id, name and arguments", param=param,
                               code="invalid_value")
            if not json_arguments(item.arguments):
                raise APIError(400, f"{param}.arguments is not JSON", param=f"{param}.arguments",
                               code="invalid_value")
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if messages and messages[-1]["role"] == "assistant":
                assistant_turn(messages[-1]).setdefault("tool_calls", []).append(call)
            else:
                messages.append(assistant_turn({"role": "assistant", "content": "", "tool_calls": [call]}))
        elif item.type == "function_call_output":
            if not item.call_id:
                raise APIError(400, f"{param}: a function_call_output needs call_id", param=param, code="invalid_value")
            messages.append({"role": "tool", "tool_call_id": item.call_id,
                             "content": _text(item.output, f"{param}.output")})
        elif item.type == "reasoning":
            if keep_reasoning:
                reasoning += _reasoning_text(item)
        else:
            raise APIError(400, f"{param}: input items of type {item.type!r} are not supported (message, "
                           "function_call, function_call_output)", param=param, code="unsupported_value")
    return messages


ITEM_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def listed_input(items: str | list[InputItem]) -> list[dict[str, Any]]:
    """The input as GET /v1/responses/{id}/input_items lists it, in OpenAI's item shapes: a string as a
    user message, text content as one part, each item with its id (a new one where the client gave
    none) and status completed."""
    if isinstance(items, str):
        items = [InputItem(role="user", content=items)]
    listed = []
    for item in items:
        data = item.model_dump(exclude_none=True)
        if isinstance(item.content, str):
            kind = "output_text" if item.role == "assistant" else "input_text"
            data["content"] = [{"type": kind, "text": item.content, **({"annotations": []} if kind == "output_text"
                                                                       else {})}]
        data.setdefault("id", f"{ITEM_ID_PREFIXES.get(item.type, 'item')}_{uuid.uuid4().hex}")
        data.setdefault("status", "completed")
        listed.append(data)
    return listed


class InputItemList(BaseModel):
    """A page of a stored response's input items (OpenAI's cursor page: `after` the last id while has_more)."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


# The Responses API's names of the chat request's fields it fills (for the `param` of a 400)
RESPONSES_NAMES = {"messages": "input", "max_completion_tokens": "max_output_tokens", "reasoning_effort":
                   "reasoning.effort", "response_format": "text.format"}


class ResponsesRequest(SamplingRequest, ChatTemplateOptions):
    """OpenAI's fields, plus the chat endpoint's sampling extras (top_k, min_p, penalties, seed, stop, ...)."""

    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: Count | None = None
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    tools: list[dict[str, Any]] | None = None  # {"type": "function", "name", "parameters", ...}
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: NullableOnFlag = True
    previous_response_id: str | None = None
    store: NullableOnFlag = True
    metadata: dict[str, str] | None = None
    top_logprobs: Annotated[int, Field(ge=0)] | None = None  # (at most the engine's max_logprobs)
    include: list[Includable] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None  # {"effort": ..., "summary": ...}: the effort reaches the template

    def invalid(self) -> tuple[str, str] | None:
        """tool_choice as chat's (ChatCompletionRequest.invalid): one of its values, and only with tools; metadata
        within OpenAI's limits, and what the response echoes nested at most ECHO_DEPTH deep, both kept with it."""
        if (wrong := super().invalid()) is not None:
            return wrong
        metadata = self.metadata or {}
        if len(metadata) > METADATA_PAIRS or any(len(key) > METADATA_KEY_CHARS or len(value) > METADATA_VALUE_CHARS
                                                 for key, value in metadata.items()):
            return "metadata", (f"metadata takes at most {METADATA_PAIRS} pairs, keys of at most {METADATA_KEY_CHARS} "
                                f"characters and values of at most {METADATA_VALUE_CHARS}")
        for name in ("text", "tools", "tool_choice", "reasoning"):
            if nesting_depth(getattr(self, name)) > ECHO_DEPTH:
                return name, f"{name} nests deeper than {ECHO_DEPTH} levels"
        if isinstance(self.text, dict) and "format" in self.text and not isinstance(self.text["format"], dict):
            return "text.format", 'text.format must be an object: {"type": "text"}, {"type": "json_object"} or ' \
                '{"type": "json_schema", "name": ..., "schema": ...}'
        problem = tool_choice_problem(self.tool_choice, self.tools)
        return None if problem is None else ("tool_choice", problem)

    def unsupported(self) -> tuple[str, str] | None:
        """What this server cannot do, refused rather than ignored."""
        if self.background and not self.store:
            return "background", "background responses need store (they are fetched by id)"
        if self.conversation is not None:
            return "conversation", "conversation objects are not supported; continue with previous_response_id"
        if self.truncation == "auto":
            return "truncation", "truncation \"auto\" is not supported; truncate_prompt_tokens keeps a prompt's end"
        if (self.n or 1) != 1:
            return "n", "a response has one output; send several requests for several samples"
        for i, tool in enumerate(self.tools or []):
            if tool.get("type") != "function" or not isinstance(tool.get("name"), str):
                return f"tools.{i}", f"only function tools with a name are supported, got type {tool.get('type')!r}"
        if isinstance(self.tool_choice, dict) and (self.tool_choice.get("type") != "function"
                                                   or not isinstance(self.tool_choice.get("name"), str)):
            return "tool_choice", "tool_choice must be auto, none, required or {\"type\": \"function\", \"name\": ...}"
        return None

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or []) or bool(self.top_logprobs)

    def chat_request(self, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
        """This request as a chat request over `messages` (the conversation so far, instructions first)."""
        shared = set(SamplingRequest.model_fields) | set(ChatTemplateOptions.model_fields)
        fields = self.model_dump(include=shared - {"n", "max_tokens", "response_format", "stream_options",
                                                   "prompt_logprobs", "return_token_ids"})
        choice = self.tool_choice
        if isinstance(choice, dict):
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        fields.update(
            messages=messages,
            max_completion_tokens=self.max_output_tokens if self.max_output_tokens is not None else self.max_tokens,
            logprobs=self.wants_logprobs,
            top_logprobs=self.top_logprobs if self.wants_logprobs else None,
            tools=[{"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}
                   for tool in self.tools] if self.tools else None,
            tool_choice=choice,
            parallel_tool_calls=self.parallel_tool_calls,
            reasoning_effort=(self.reasoning or {}).get("effort") or self.reasoning_effort,
            response_format=self.response_format_of_text())
        try:
            request = ChatCompletionRequest.model_validate(fields)
        except ValidationError as e:
            first = e.errors()[0]
            field = RESPONSES_NAMES.get(str(first["loc"][0]), str(first["loc"][0])) if first["loc"] else "input"
            raise APIError(400, f"{field}: {first['msg']}", param=field, code="invalid_value") from None
        request._renamed = {"max_tokens": "max_output_tokens" if self.max_output_tokens is not None else "max_tokens",
                            "max_completion_tokens": "max_output_tokens", "logprobs": "top_logprobs",
                            "prompt": "input"}
        return request

    def response_format_of_text(self) -> dict[str, Any] | None:
        """`text.format` in chat's response_format form (a JSON schema's fields move under json_schema)."""
        fmt = (self.text or {}).get("format")
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            return fmt if isinstance(fmt, dict) else self.response_format
        return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[ChatTokenLogprob] | None = None


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningItem(BaseModel):
    """A reasoning model's thinking (--reasoning-parser): the text itself, no summary."""

    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText]
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCallItem(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str  # what the function_call_output answering it names
    name: str
    arguments: str  # JSON text
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0  # prompt tokens added to the prefix cache


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    """A response, with the request's settings echoed as OpenAI does."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
    background: bool = False
    model: str
    output: list[ReasoningItem | OutputMessage | FunctionCallItem] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    incomplete_details: IncompleteDetails | None = None
    error: ResponseError | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    metadata: dict[str, str] = Field(default_factory=dict)
    previous_response_id: str | None = None
    store: bool = True
    truncation: Literal["auto", "disabled"] = "disabled"
    user: str | None = None


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True
