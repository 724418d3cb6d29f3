"""POST /v1/responses (OpenAI's Responses API), GET and DELETE /v1/responses/{id}.

A request runs the chat path (its input as messages, `instructions` as the system message); its output
is the model's thinking as a reasoning item (with --reasoning-parser), a message and the function calls
the model made, streamed as the API's named events: response.created, output items and their
reasoning, text or argument deltas, then response.completed (or .incomplete at max_output_tokens,
.failed after an `error` event). With `store` (on by default, as at
OpenAI) the response can be fetched and continued by `previous_response_id`; see response_store.py.
"""
from __future__ import annotations

import itertools
import uuid
from typing import Annotated, Any, AsyncIterator, Callable, Iterator, Literal

from fastapi import APIRouter, Query, Request

from lcq.runtime.outputs import RequestOutput

from .chat import ChatTurn, start_chat
from .errors import APIError, error_responses, generation_responses
from .generation import Choice
from .protocol import ToolCall, dump
from .response_store import StoredResponse
from .responses_protocol import DeletedResponse, FunctionCallItem, IncompleteDetails, InputItemList, \
    InputTokensDetails, OutputMessage, OutputText, OutputTokensDetails, ReasoningItem, ReasoningText, ResponseError, \
    ResponseObject, ResponsesRequest, ResponseUsage, input_messages, listed_input
from .sse import named_event, sse_events, sse_response
from .state import ServerState, get_state

router = APIRouter()
STREAM_RESPONSE = {"description": "with `stream: true`: server-sent events named by their `type` "
                                  "(response.created ... response.completed)", "content": {"text/event-stream": {}}}


def _not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"no stored response with id {response_id!r} (responses live in the server's memory; "
                    "see store)", param=param, code="response_not_found")


class ResponseBuilder:
    """The response object and its items; ids are fixed at the start so that streamed events and the
    final object agree."""

    def __init__(self, body: ResponsesRequest, state: ServerState, response_id: str, created: int):
        self.body = body
        self.state = state
        self.id = response_id
        self.created = created
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.reasoning_id = f"rs_{uuid.uuid4().hex}"

    def reasoning(self, text: str, status: str) -> ReasoningItem:
        return ReasoningItem(id=self.reasoning_id, status=status, content=[ReasoningText(text=text)])

    def message(self, text: str, status: str, logprobs: list | None = None) -> OutputMessage:
        return OutputMessage(id=self.message_id, status=status, content=[OutputText(text=text, logprobs=logprobs)])

    @staticmethod
    def call(call: ToolCall, status: str = "completed") -> FunctionCallItem:
        return FunctionCallItem(id=f"fc_{call.id.removeprefix('call_')}", call_id=call.id, name=call.function.name,
                                arguments=call.function.arguments if status == "completed" else "", status=status)

    def output(self, reasoning: str | None, content: str | None, calls: list[ToolCall] | None, status: str,
               logprobs: list | None) -> list[ReasoningItem | OutputMessage | FunctionCallItem]:
        """The reasoning (if read apart), a message (unless the reply is only calls, or was cut off in its
        reasoning), then the calls."""
        items: list[ReasoningItem | OutputMessage | FunctionCallItem] = []
        if reasoning is not None:
            items.append(self.reasoning(reasoning, "incomplete" if content is None else "completed"))
        if content is not None and (content or not calls):
            items.append(self.message(content, status, logprobs))
        return items + [self.call(call) for call in calls or []]

    def response(self, status: str, output: list | None = None, turn: ChatTurn | None = None,
                 error: str | None = None) -> ResponseObject:
        body = self.body
        usage = None
        if turn is not None:
            counts = turn.usage()
            prompt = counts.prompt_tokens_details
            cached = InputTokensDetails(cached_tokens=prompt.cached_tokens, cache_write_tokens=prompt.cache_write_tokens)
            details = counts.completion_tokens_details
            reasoning = OutputTokensDetails(reasoning_tokens=details.reasoning_tokens if details else 0)
            usage = ResponseUsage(input_tokens=counts.prompt_tokens, output_tokens=counts.completion_tokens,
                                  total_tokens=counts.total_tokens, input_tokens_details=cached,
                                  output_tokens_details=reasoning)
        defaults = self.state.engine.sampling_defaults  # what an unset temperature or top_p sampled with
        return ResponseObject(
            id=self.id, created_at=self.created, status=status, output=output or [],
            model=self.state.adapter_for(body) or self.state.model_name,
            usage=usage, incomplete_details=IncompleteDetails() if status == "incomplete" else None,
            error=ResponseError(code="engine_error", message=error) if error else None,
            instructions=body.instructions, max_output_tokens=body.max_output_tokens,
            temperature=defaults.get("temperature", 1.0) if body.temperature is None else body.temperature,
            top_p=defaults.get("top_p", 1.0) if body.top_p is None else body.top_p, top_logprobs=body.top_logprobs,
            tools=body.tools or [],
            tool_choice=body.tool_choice or "auto", parallel_tool_calls=body.parallel_tool_calls,
            text=body.text or {"format": {"type": "text"}}, metadata=body.metadata or {},
            previous_response_id=body.previous_response_id, store=body.store, truncation=body.truncation or "disabled",
            user=body.user)


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def _assistant_message(reasoning: str | None, content: str | None, calls: list[ToolCall] | None) -> dict[str, Any]:
    """The reply as the chat message a later turn's template renders (the thinking as reasoning_content,
    which the template keeps or drops)."""
    message: dict[str, Any] = {"role": "assistant", "content": content or ""}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [call.model_dump() for call in calls]
    return message


@router.post("/v1/responses", response_model=ResponseObject,
             responses=generation_responses(STREAM_RESPONSE))
async def create_response(body: ResponsesRequest, request: Request):
    state = get_state(request)
    state.check_request(body, "/v1/responses")
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = state.responses.get(body.previous_response_id)
        if previous is None:
            raise _not_found(body.previous_response_id, "previous_response_id")
        history = previous.conversation
    conversation = history + input_messages(body.input, keep_reasoning=state.settings.reasoning_parser is not None)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    builder = ResponseBuilder(body, state, f"resp_{uuid.uuid4().hex}", 0)
    turn = start_chat(body.chat_request(system + conversation), state, "/v1/responses", builder.id)
    builder.created = turn.generation.created

    def keep(response: ResponseObject, reasoning: str | None, content: str | None,
             calls: list[ToolCall] | None) -> ResponseObject:
        if body.store:
            state.responses.put(StoredResponse(response, conversation + [_assistant_message(reasoning, content,
                                                                                             calls)],
                                               listed_input(body.input)))
        return response

    if body.stream:
        return sse_response(_stream(state, turn, builder, keep))

    await turn.generation.run(request)
    choice = turn.generation.choices[0]
    reasoning, content, calls, _ = turn.reply(choice)
    status = _status(choice.finish_reason)
    logprobs = turn.logprobs_of(choice.logprobs).content if turn.logprobs else None
    output = builder.output(reasoning, content, calls, status, logprobs)
    return keep(builder.response(status, output, turn), reasoning, content, calls)


def _stream(state: ServerState, turn: ChatTurn, builder: ResponseBuilder,
            keep: Callable[[ResponseObject, str | None, str | None, list[ToolCall] | None], ResponseObject]
            ) -> AsyncIterator[str]:
    """The named events of one response, in the order the official client's stream helper checks; `keep`
    stores the finished response."""
    reader = turn.reader()
    sequence = itertools.count()
    thought: list[str] = []  # the reasoning item's text so far
    sent: list[str] = []  # the message's text so far
    pending: list[dict] = []  # logprobs of tokens whose text the detokenizer still holds (a split character)
    output: list[ReasoningItem | OutputMessage | FunctionCallItem] = []
    opened: dict[str, int] = {}  # "reasoning", "message": the item's output_index once it is added
    closed: set[str] = set()
    final: dict[str, Any] = {}

    def render(payload: dict) -> str:
        return named_event({**payload, "sequence_number": next(sequence)})

    def lifecycle(kind: str, response: ResponseObject) -> dict:
        return {"type": f"response.{kind}", "response": dump(response)}

    def open_item(kind: str, item: ReasoningItem | OutputMessage, part: ReasoningText | OutputText) -> Iterator[dict]:
        """The reasoning or message item added at the next output index, with its one content part."""
        opened[kind] = index = len(output)
        output.append(item)
        yield {"type": "response.output_item.added", "output_index": index, "item": {**dump(item), "content": []}}
        yield {"type": "response.content_part.added", "item_id": item.id, "output_index": index, "content_index": 0,
               "part": dump(part)}

    def reasoning_events(text: str) -> Iterator[dict]:
        if "reasoning" not in opened:  # the item opens with the reasoning, before its first text
            yield from open_item("reasoning", builder.reasoning("", "in_progress"), ReasoningText(text=""))
        if text:
            thought.append(text)
            yield {"type": "response.reasoning_text.delta", "item_id": builder.reasoning_id,
                   "output_index": opened["reasoning"], "content_index": 0, "delta": text}

    def reasoning_done(status: str) -> Iterator[dict]:
        if "reasoning" not in opened or "reasoning" in closed:
            return
        closed.add("reasoning")
        index = opened["reasoning"]
        output[index] = item = builder.reasoning("".join(thought), status)
        part = item.content[0]
        yield {"type": "response.reasoning_text.done", "item_id": item.id, "output_index": index,
               "content_index": 0, "text": part.text}
        yield {"type": "response.content_part.done", "item_id": item.id, "output_index": index, "content_index": 0,
               "part": dump(part)}
        yield {"type": "response.output_item.done", "output_index": index, "item": dump(item)}

    def text_events(text: str, logprobs: list) -> Iterator[dict]:
        if "message" not in opened:  # the message opens with its first text, once the reasoning is complete
            yield from reasoning_done("completed")
            yield from open_item("message", builder.message("", "in_progress"), OutputText(text=""))
        if text or logprobs:
            sent.append(text)
            yield {"type": "response.output_text.delta", "item_id": builder.message_id,
                   "output_index": opened["message"], "content_index": 0, "delta": text, "logprobs": logprobs}

    def start() -> Iterator[dict]:
        yield lifecycle("created", builder.response("in_progress"))
        yield lifecycle("in_progress", builder.response("in_progress"))

    def on_delta(choice: Choice, out: RequestOutput) -> Iterator[dict]:
        reasoning, text = reader.feed(out.text)
        if reader.reasoned:
            yield from reasoning_events(reasoning)
        if turn.logprobs and not (turn.forced or turn.parser):  # a token's logprob goes out with its text
            pending.extend(dump(turn.logprobs_of(out.logprobs or []))["content"])
        if text:
            yield from text_events(text, pending.copy())
            pending.clear()
        if out.finish_reason is None:
            return
        reasoning, rest, calls, _ = reader.finish(out.finish_reason)
        if reader.reasoned:
            yield from reasoning_events(reasoning)
        yield from reasoning_done("incomplete" if rest is None else "completed")
        status = _status(out.finish_reason)
        if rest is not None and (rest or pending or not calls):
            yield from text_events(rest, pending)
        if "message" in opened:
            index = opened["message"]
            all_logprobs = turn.logprobs_of(choice.logprobs).content if turn.logprobs else None
            output[index] = builder.message("".join(sent), status, all_logprobs)
            part = output[index].content[0]
            yield {"type": "response.output_text.done", "item_id": builder.message_id, "output_index": index,
                   "content_index": 0, "text": part.text, "logprobs": dump(part)["logprobs"] or []}
            yield {"type": "response.content_part.done", "item_id": builder.message_id, "output_index": index,
                   "content_index": 0, "part": dump(part)}
            yield {"type": "response.output_item.done", "output_index": index, "item": dump(output[index])}
        for call in calls or []:  # each call goes out whole: its arguments are complete only now
            index, item = len(output), builder.call(call)
            output.append(item)
            yield {"type": "response.output_item.added", "output_index": index,
                   "item": dump(builder.call(call, "in_progress"))}
            yield {"type": "response.function_call_arguments.delta", "item_id": item.id, "output_index": index,
                   "delta": item.arguments}
            yield {"type": "response.function_call_arguments.done", "item_id": item.id, "output_index": index,
                   "name": item.name, "arguments": item.arguments}
            yield {"type": "response.output_item.done", "output_index": index, "item": dump(item)}
        final.update(status=status, reasoning="".join(thought) if reader.reasoned else None,
                     content="".join(sent) or None, calls=calls)

    def finish() -> Iterator[dict]:
        response = builder.response(final["status"], output, turn)
        keep(response, final["reasoning"], final["content"], final["calls"])
        yield lifecycle("completed" if final["status"] == "completed" else "incomplete", response)

    def failed(message: str) -> Iterator[dict]:
        yield {"type": "error", "code": "engine_error", "message": message, "param": None}
        yield lifecycle("failed", builder.response("failed", output, error=message))

    return sse_events(turn.generation, state.settings.keepalive_interval, start, on_delta, finish, failed,
                      render=render, end="")


@router.get("/v1/responses/{response_id}", response_model=ResponseObject, responses=error_responses(401, 404))
async def get_response(response_id: str, request: Request) -> ResponseObject:
    stored = get_state(request).responses.get(response_id)
    if stored is None:
        raise _not_found(response_id)
    return stored.response


@router.get("/v1/responses/{response_id}/input_items", response_model=InputItemList,
            responses=error_responses(400, 401, 404))
async def list_input_items(response_id: str, request: Request, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                           order: Literal["asc", "desc"] = "desc", after: str | None = None) -> InputItemList:
    """The input items a stored response was created with (not its earlier turns), newest first unless
    order is asc; pages of `limit` items, the next one `after` the last id."""
    stored = get_state(request).responses.get(response_id)
    if stored is None:
        raise _not_found(response_id)
    items = stored.input_items if order == "asc" else stored.input_items[::-1]
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise APIError(400, f"no input item {after!r} in response {response_id!r}", param="after",
                           code="invalid_value")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return InputItemList(data=page, first_id=page[0]["id"] if page else None,
                         last_id=page[-1]["id"] if page else None, has_more=len(items) > limit)


@router.delete("/v1/responses/{response_id}", response_model=DeletedResponse, responses=error_responses(401, 404))
async def delete_response(response_id: str, request: Request) -> DeletedResponse:
    if not get_state(request).responses.delete(response_id):
        raise _not_found(response_id)
    return DeletedResponse(id=response_id)
