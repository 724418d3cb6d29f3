"""Tool calls in chat replies: forced calls generated as JSON, and calls a model chose to make, parsed
from its own syntax.

A forced call (tool_choice "required" or a named function) is generated under a JSON constraint
(ChatCompletionRequest.tool_call_schema), so its text is the call. With tool_choice "auto" the model
writes free text in which it may call tools in the syntax its chat template taught it; `lcq serve
--tool-call-parser hermes` reads the Hermes form that Qwen2.5 and Hermes models use,
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, as vLLM's parser of that name does.
"""
from __future__ import annotations

import json
import re
import uuid

from .protocol import FunctionCall, ToolCall

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
_HERMES_CALL = re.compile(re.escape(HERMES_START) + r"\s*(.*?)\s*(?:" + re.escape(HERMES_END) + r"|$)", re.DOTALL)


def _call(name: str, arguments) -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=text))


def forced_call(text: str, forced: str, finish_reason: str | None) -> tuple[list[ToolCall] | None, str | None]:
    """(tool calls, finish reason) of a forced call's generated JSON: the named function's arguments, or
    {"name", "arguments"} for "required". A call cut short by max_tokens keeps its text, unparsed,
    as the arguments of a named function, or comes back as content (no tool call) for "required"."""
    if forced != "required":
        return [_call(forced, text)], finish_reason
    try:
        value = json.loads(text)
        call = _call(value["name"], value["arguments"])
    except (ValueError, KeyError, TypeError):
        return None, finish_reason
    return [call], "tool_calls" if finish_reason == "stop" else finish_reason


def parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    """(the text outside the calls, or None when nothing else was said; the calls), from a reply in the
    Hermes form. A block whose JSON does not parse stays in the text; the last block may lack its
    closing tag (generation ended at EOS right after the JSON)."""
    calls, kept, end = [], [], 0
    for match in _HERMES_CALL.finditer(text):
        try:
            value = json.loads(match.group(1))
            call = _call(value["name"], value.get("arguments", {}))
        except (ValueError, KeyError, TypeError):
            continue
        kept.append(text[end:match.start()])
        end = match.end()
        calls.append(call)
    kept.append(text[end:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


class HermesStream:
    """Streams a reply's text, holding it back from the first tool-call tag on (and any tail that could
    be the start of one), so that calls go out parsed, once the reply is complete."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0

    def feed(self, delta: str) -> str:
        """The part of the text so far that can be sent as content now."""
        self.text += delta
        start = self.text.find(HERMES_START, self.sent)
        if start >= 0:
            end = start
        else:
            end = len(self.text)
            for size in range(min(len(HERMES_START) - 1, len(self.text) - self.sent), 0, -1):
                if HERMES_START.startswith(self.text[-size:]):
                    end -= size
                    break
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def finish(self) -> tuple[str | None, list[ToolCall]]:
        """(the content not sent yet, the calls) once the reply is complete."""
        rest = self.text[self.sent:]
        if HERMES_START not in rest:
            return rest or None, []
        content, calls = parse_hermes(rest)
        return content, calls
