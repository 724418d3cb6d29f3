"""Tool calls in chat replies: forced calls generated as JSON, and calls a model chose to make, parsed
from its own syntax.

A forced call (tool_choice "required" or a named function) is generated under a JSON constraint
(ChatCompletionRequest.tool_call_schema), so its text is the call. With tool_choice "auto" the model
writes free text in which it may call tools in the syntax its chat template taught it, and `lcq serve
--tool-call-parser NAME` reads it as vLLM's parser of that name does:
- hermes (Qwen2.5, Hermes models): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks
  anywhere in the reply;
- llama3_json (Llama 3.1-3.3 with their tool templates): a reply that is JSON calls
  `{"name": ..., "parameters": {...}}`, several separated by ";" (the `<|python_tag|>` before them is a
  special token the detokenizer drops);
- granite (Granite 3 with its template): a reply that is one JSON array of `{"name": ..., "arguments":
  {...}}` calls (after `<|tool_call|>`, a special token the detokenizer drops);
- mistral (Mistral 7B v0.3, Mistral Small 3.x, Magistral, Devstral): text, then `[TOOL_CALLS]` and either a
  JSON array of `{"name", "arguments"}` calls or, from Mistral's v11 tokenizers on, `name[ARGS]{...}`, one
  `[TOOL_CALLS]` per call. Those tags are special tokens, so such requests are detokenized with them kept
  (skip_special_tokens false: KEEPS_SPECIAL_TOKENS);
- pythonic (Llama 3.2 1B/3B, Llama 4 with their tool templates): a reply that is a Python list of calls
  with keyword arguments, `[get_weather(city="Paris"), f()]`, read with Python's parser (never run), each
  argument a literal (Llama 4's `<|python_start|>` around it is a special token the detokenizer drops);
- phi4_mini_json (Phi-4-mini): `functools[{"name": ..., "arguments": {...}}, ...]` after any text;
- llama_nemotron_json (Llama-Nemotron) and nemotron_json (NVIDIA-Nemotron-Nano-9B-v2 and 12B-v2, the name of
  NVIDIA's plugin for them): text, then `<TOOLCALL>[{"name": ..., "arguments": {...}}, ...]</TOOLCALL>`, the
  tags kept where they are special tokens (KEEPS_SPECIAL_TOKENS); Nemotron 3 writes qwen3_coder's calls;
- olmo3 (OLMo 3): `<function_calls>` then one pythonic call per line, its literals Python's or JSON's
  (null, true, false);
- ernie45 (ERNIE 4.5): hermes's blocks;
- internlm (InternLM2/3): text, then `<|action_start|><|plugin|>` and a JSON call
  `{"name": ..., "parameters": {...}}` up to `<|action_end|>`; those tags are special tokens
  (KEEPS_SPECIAL_TOKENS);
- seed_oss (Seed-OSS) and qwen3_coder (Qwen3-Coder): text, then calls in XML,
  `<function=name><parameter=key>value</parameter>...</function>` inside `<seed:tool_call>` or
  `<tool_call>`; each value is text, typed by the request's tool schema (integer, number, boolean,
  object, array; "null" is null), as vLLM reads them. Seed-OSS's tags are tokens of its own, kept as
  text (KEEPS_SPECIAL_TOKENS).
- minimax_m2 (MiniMax-M2, M2.1, M2.5): text, then calls `<invoke name="NAME"><parameter name="key">value
  </parameter>...</invoke>` inside `<minimax:tool_call>`, the values typed as seed_oss's (tags of its
  tokenizer's own, kept as text: KEEPS_SPECIAL_TOKENS).
- openai (gpt-oss, with `--reasoning-parser openai_gptoss`): harmony messages to a function,
  `<|channel|>commentary to=functions.NAME<|message|>{...}<|call|>`, the arguments as written; the
  reasoning parser passes those messages on whole and drops the rest of the markup (special tokens:
  KEEPS_SPECIAL_TOKENS).
- glm45 and glm47 (GLM-4.5, GLM-4.6, GLM-4.7, GLM-4.7-Flash): `<tool_call>NAME` then pairs
  `<arg_key>key</arg_key><arg_value>value</arg_value>` up to `</tool_call>` (GLM-4.5 puts a newline after
  the name, GLM-4.7 none: both read either); a value is text where the request's tool schema says string,
  else JSON or a Python literal where it reads as one (as vLLM reads them);
- deepseek_v3 (DeepSeek-V3, R1): after `<｜tool▁calls▁begin｜>`, calls
  `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME` and their JSON arguments in a ```json block, each up to
  `<｜tool▁call▁end｜>`; deepseek_v31 (DeepSeek-V3.1): `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>`.
  Those tags are special tokens (KEEPS_SPECIAL_TOKENS).
"""
from __future__ import annotations

import ast
import functools
import json
import logging
import re
import uuid
from collections.abc import Callable
from typing import Any

from .protocol import FunctionCall, ToolCall

logger = logging.getLogger("lcq.server")

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
MISTRAL_CALLS, MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"
PHI4_CALLS = "functools["
NEMOTRON_START, NEMOTRON_END = "<TOOLCALL>", "</TOOLCALL>"
OLMO3_START, OLMO3_END = "<function_calls>", "</function_calls>"
INTERNLM_START, INTERNLM_END = "<|action_start|><|plugin|>", "<|action_end|>"
GLM_START, GLM_END = "<tool_call>", "</tool_call>"
DEEPSEEK_CALLS = "<｜tool▁calls▁begin｜>"
# parsers whose tags are (or may be) special tokens the text must keep
KEEPS_SPECIAL_TOKENS = ("mistral", "internlm", "seed_oss", "openai", "glm45", "glm47", "deepseek_v3", "deepseek_v31",
                        "minimax_m2", "llama_nemotron_json", "nemotron_json")
HARMONY_CALL, HARMONY_MESSAGE, CALL_END = "<|channel|>commentary to=functions.", "<|message|>", "<|call|>"
# Calls are read with str.find and partition within one call's text (a reply split at their openings), not with
# patterns searched across the reply: from each of n openings to its end that took O(n^2) (8,000 openings of a
# forced reply: seconds to minutes, on the event loop), and lazy groups between runs of whitespace backtracked to
# O(n^3) (a call's JSON fence followed by 4,000 spaces: a minute), as vLLM's tool-parser advisories found of theirs.
_NAME = re.compile(r"[^\s<]+")
_LEADING_SPACE = re.compile(r"\s*")
JSON_NAMES = {"null": None, "true": True, "false": False}  # literals OLMo 3 writes in its pythonic calls
_XML_FUNCTION = re.compile(r"<function=([^<>\n]+)>(.*?)(?:</function>|$)", re.DOTALL)  # (names stop at a tag)
# a parameter ends at its closing tag or, where the model left that out, at the next parameter or the function's end
_XML_PARAMETER = re.compile(r"<parameter=([^<>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|(?=</function>)|$)",
                            re.DOTALL)
XML_FUNCTION = "<function="
_INVOKE = re.compile(r'<invoke name="?([^<">\n]+)"?>(.*?)(?:</invoke>|$)', re.DOTALL)
_INVOKE_PARAMETER = re.compile(r'<parameter name="?([^<">\n]+)"?>(.*?)(?:</parameter>|$)', re.DOTALL)
# Calls in XML: the block's opening and closing tags, then a function's and a parameter's syntax (name, body)
XML_CALLS = {"seed_oss": ("<seed:tool_call>", "</seed:tool_call>", _XML_FUNCTION, _XML_PARAMETER),
             "qwen3_coder": (HERMES_START, HERMES_END, _XML_FUNCTION, _XML_PARAMETER),
             "minimax_m2": ("<minimax:tool_call>", "</minimax:tool_call>", _INVOKE, _INVOKE_PARAMETER)}
_GLM_CALL = re.compile(re.escape(GLM_START) + r"([^<\n]*)(.*?)(?:" + re.escape(GLM_END) + r"|$)", re.DOTALL)
_GLM_ARGUMENT = re.compile(r"<arg_key>([^<]*)</arg_key>\s*<arg_value>(.*?)(?:</arg_value>|$)", re.DOTALL)
# DeepSeek-V3's call (a kind, "function", then the name; JSON arguments in a ```json block) and V3.1's
DEEPSEEK_CALL, DEEPSEEK_SEP, DEEPSEEK_CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"


def _call(name: str, arguments: str) -> ToolCall:
    """A call whose arguments are text as written (a forced call's JSON, gpt-oss's message)."""
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=arguments))


def _json_call(value: Any, *keys: str) -> ToolCall:
    """The call a JSON object of the reply states: its "name" and the first of `keys` it holds, its arguments.
    KeyError where it holds none of them, as vLLM's parsers read it, so that an answer in JSON with a "name"
    field (a person's, say, asked for by response_format beside the tools) stays the answer, not a call."""
    if not isinstance(value, dict):
        raise TypeError(f"a call is a JSON object, not {type(value).__name__}")
    arguments = next((value[key] for key in keys if key in value), _NO_ARGUMENTS)
    if arguments is _NO_ARGUMENTS:
        raise KeyError(keys[0])
    return _call_of(value["name"], arguments)


_NO_ARGUMENTS = object()


def _call_of(name: str, arguments: Any) -> ToolCall:
    """A call whose arguments are a value read from the reply, written as JSON: a string is the JSON it holds
    where it is JSON text, else a JSON string (as vLLM's parsers write it); ValueError where JSON cannot hold
    the value (NaN and Infinity, which JSON has not), which parsers read as the reply being text."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return _call(name, json.dumps(arguments, allow_nan=False, ensure_ascii=False))  # (the model's text, as vLLM's)


def _json_value(value: Any, text: str) -> Any:
    """`value`, read from `text`, where JSON can hold it; else the text (NaN, Infinity, a Python set or bytes)."""
    try:
        json.dumps(value, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        return text
    return value


def _properties(schemas: dict[str, dict], name: str) -> dict:
    """The properties of a tool's parameters schema (none where it has no such object)."""
    properties = schemas.get(name, {}).get("properties")
    return properties if isinstance(properties, dict) else {}


# The start of a "required" call up to its arguments: its name whole (a JSON string), as the schema orders them
CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


def forced_call(text: str, forced: str, finish_reason: str | None) -> tuple[list[ToolCall] | None, str | None]:
    """(tool calls, finish reason) of a forced call's generated JSON: the named function's arguments, or
    {"name", "arguments"} for "required". A call cut short by max_tokens keeps its arguments' text so far,
    unparsed, where its name is whole, as a named function's does; cut before that it is no call (None), and
    its text no content either: the wrapper is the server's, not the model's answer."""
    if forced != "required":
        return [_call(forced, text)], finish_reason
    try:
        value = json.loads(text)
        call = _call_of(value["name"], value["arguments"])
    except (ValueError, KeyError, TypeError, RecursionError):
        head = CALL_HEAD.match(text)
        return (None if head is None else [_call(json.loads(head.group(1)), text[head.end():])]), finish_reason
    return [call], calls_finish(finish_reason)


def read_reply(text: str, forced: str | None, parser: str | None, finish_reason: str | None,
               parallel: bool = True, schemas: dict[str, dict] | None = None
               ) -> tuple[str | None, list[ToolCall] | None, str | None]:
    """(content, tool calls or None, finish reason) of a complete reply: a forced call's JSON, calls the
    model made in its own syntax (read by `parser`, with the request's tools' parameter `schemas` by
    name; only the first call unless `parallel`), or plain text. A parser's reply is read as it is streamed
    (ReplyReader), so that its content is the same whole or streamed: the text sent before a call may start,
    then what the parser leaves of the rest."""
    if forced:
        return None, *forced_call(text, forced, finish_reason)
    if parser:
        reader = ReplyReader(None, parser, parallel, schemas)
        content = reader.feed(text)
        rest, calls, reason = reader.finish(finish_reason)
        content += rest or ""
        return (content or None) if calls else content, calls, reason
    return text, None, finish_reason


def calls_finish(finish_reason: str | None) -> str | None:
    """The finish reason of a reply with tool calls: "tool_calls" where the model ended it, "length" still
    where max_tokens cut it (the calls may be fewer than it meant: clients such as the SDK's parse() raise)."""
    return "tool_calls" if finish_reason == "stop" else finish_reason


def parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    """(the text outside the calls, or None when nothing else was said; the calls), from a reply in the
    Hermes form. A block whose JSON does not parse stays in the text; the last block may lack its
    closing tag (generation ended at EOS right after the JSON)."""
    calls, kept, end = [], [], 0
    start = text.find(HERMES_START)
    while start >= 0:
        close = text.find(HERMES_END, start + len(HERMES_START))
        block_end = len(text) if close < 0 else close + len(HERMES_END)
        try:
            value = json.loads(text[start + len(HERMES_START):close if close >= 0 else len(text)])
            call = _json_call(value, "arguments")
        except (ValueError, KeyError, TypeError, RecursionError):  # (JSON nested past the limit)
            start = text.find(HERMES_START, block_end)
            continue
        kept.append(text[end:start])
        end = block_end
        calls.append(call)
        start = text.find(HERMES_START, block_end)
    kept.append(text[end:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


def parse_openai(text: str) -> tuple[str | None, list[ToolCall]]:
    """(the text outside the calls, or None when nothing else was said; the calls) from a gpt-oss reply
    whose function messages HarmonyStream passed on; the last may lack its `<|call|>` (the end token)."""
    head, *rest = text.split(HARMONY_CALL)
    calls, kept = [], [head]
    for call in rest:  # the function's name, then (after any more of the header) its arguments
        name, message = _NAME.match(call), call.find(HARMONY_MESSAGE)
        if name is None or message < name.end():
            kept.append(HARMONY_CALL + call)
            continue
        arguments, _, after = call[message + len(HARMONY_MESSAGE):].partition(CALL_END)
        calls.append(_call(name.group(), arguments.strip()))
        kept.append(after)
    content = "".join(kept).strip()
    return ((content or None) if calls else text), calls


def without_open_call(start: str, end: str) -> Callable[[str], str]:
    """What a reply cut by max_tokens keeps: all but a last call opened by `start` and not closed by `end`.
    gpt-oss's calls end at a stop token, `<|call|>` (HarmonyStream writes a call without it), so only the finish
    reason tells a cut one from a whole one; GLM's last call may lack its `</tool_call>`, and cut, its name may be
    cut too (a call named "ge"). vLLM reads only completed calls of either."""

    def without(text: str) -> str:
        at = text.rfind(start)
        return text[:at] if at >= 0 and end not in text[at:] else text

    return without


def tag_held_from(*tags: str):
    """held_from of a syntax whose calls start with one of `tags`: the text is held back from the first
    tag, or from a tail that could begin one."""

    def held_from(text: str, sent: int) -> int:
        return min(_held_from(text, sent, tag) for tag in tags)

    return held_from


def _held_from(text: str, sent: int, tag: str) -> int:
    start = text.find(tag, sent)
    if start >= 0:
        return start
    for size in range(min(len(tag) - 1, len(text) - sent), 0, -1):
        if tag.startswith(text[-size:]):
            return len(text) - size
    return len(text)


def parse_llama3_json(text: str) -> tuple[str | None, list[ToolCall]]:
    """(None, the calls) for a reply made of JSON calls separated by ";", else (the text, [])."""
    decoder, calls, at = json.JSONDecoder(), [], 0
    body = text.strip()
    try:
        while at < len(body):
            value, at = decoder.raw_decode(body, at)
            calls.append(_json_call(value, "arguments", "parameters"))
            while at < len(body) and body[at] in "; \t\n":
                at += 1
    except (ValueError, KeyError, TypeError, AttributeError):
        return text, []
    return (None, calls) if calls else (text, [])


def whole_reply_held_from(opening: str):
    """held_from of a syntax whose calls are the whole reply: a reply that opens with `opening` (after any
    whitespace), or with a part of it so far, is calls, held back whole; others are text."""

    def held_from(text: str, sent: int) -> int:
        at = _LEADING_SPACE.match(text).end()  # (text.lstrip() copied the whole reply at each token)
        head = text[at:at + len(opening) + 1]
        return sent if head.startswith(opening) or opening.startswith(head) else len(text)

    return held_from


def parse_granite(text: str) -> tuple[str | None, list[ToolCall]]:
    """(None, the calls) for a reply that is one JSON array of calls, else (the text, [])."""
    try:
        values = json.loads(text)
        calls = [_json_call(value, "arguments") for value in values] if isinstance(values, list) \
            else []
    except (ValueError, KeyError, TypeError, AttributeError):
        return text, []
    return (None, calls) if calls else (text, [])


def parse_mistral(text: str) -> tuple[str | None, list[ToolCall]]:
    """(the text before the first [TOOL_CALLS], or None when empty; the calls) from a reply in Mistral's
    form; (the text, []) when a call after the tag does not parse."""
    content, *parts = text.split(MISTRAL_CALLS)
    calls = []
    try:
        for part in (part.strip() for part in parts):
            if part.startswith("["):
                calls += [_json_call(value, "arguments") for value in json.loads(part)]
            else:
                name, arguments = part.split(MISTRAL_ARGS, 1)
                calls.append(_call_of(name.strip(), json.loads(arguments)))
    except (ValueError, KeyError, TypeError, AttributeError):
        return text, []
    return (content.strip() or None, calls) if calls else (text, [])


def parse_pythonic(text: str) -> tuple[str | None, list[ToolCall]]:
    """(None, the calls) for a reply that is a Python list of calls by name with keyword arguments whose
    values are literals, else (the text, []). The text is parsed, never evaluated."""
    calls = _pythonic_calls(text.strip())
    return (None, calls) if calls else (text, [])


def parse_olmo3(text: str) -> tuple[str | None, list[ToolCall]]:
    """(None, the calls) for a reply of OLMo 3's `<function_calls>` block (one pythonic call per line),
    else (the text, [])."""
    body = text.strip()
    if not body.startswith(OLMO3_START):
        return text, []
    lines = body[len(OLMO3_START):].split(OLMO3_END, 1)[0].splitlines()
    calls = _pythonic_calls("[" + ", ".join(line.strip() for line in lines if line.strip()) + "]")
    return (None, calls) if calls else (text, [])


def _pythonic_calls(source: str) -> list[ToolCall]:
    """The calls of `source`, a Python list of calls by name with literal keyword arguments; [] where it is
    anything else."""
    try:
        tree = ast.parse(source, mode="eval").body
        if not isinstance(tree, ast.List):
            return []
        calls = []
        for node in tree.elts:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args or \
                    any(keyword.arg is None for keyword in node.keywords):
                return []
            calls.append(_call_of(node.func.id, {keyword.arg: _literal(keyword.value) for keyword in node.keywords}))
        return calls
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return []


def _literal(node: ast.expr):
    """A literal's value (what ast.literal_eval reads, and JSON's null, true and false); ValueError for
    anything else."""
    if isinstance(node, ast.Name) and node.id in JSON_NAMES:
        return JSON_NAMES[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(key): _literal(value) for key, value in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def parse_internlm(text: str) -> tuple[str | None, list[ToolCall]]:
    """(the text before the first call, or None when empty; the calls) from a reply in InternLM's form;
    (the text, []) when there is none or a call's JSON does not parse."""
    content, *actions = text.split(INTERNLM_START)
    try:
        calls = []
        for action in actions:
            body = action.split(INTERNLM_END, 1)[0]
            value = json.loads(body[body.index("{"):])
            calls.append(_call_of(value["name"], value.get("parameters", value.get("arguments", {}))))
    except (ValueError, KeyError, TypeError, AttributeError):
        return text, []
    return (content.strip() or None, calls) if calls else (text, [])


def parse_json_list(text: str, opening: str, closing: str = "") -> tuple[str | None, list[ToolCall]]:
    """(the text around the calls, or None when empty; the calls) from a reply whose calls are a JSON list of
    {"name", "arguments"} after `opening` (Phi-4-mini's `functools[`, whose last character opens the list;
    Nemotron's `<TOOLCALL>`), up to `closing` where the syntax has one (missing where generation ended first);
    (the text, []) when there is none or its JSON does not parse."""
    start = text.find(opening)
    if start < 0:
        return text, []
    at = start + len(opening) - (1 if opening.endswith("[") else 0)
    at += len(text[at:]) - len(text[at:].lstrip())
    try:
        values, end = json.JSONDecoder().raw_decode(text, at)
        values = [values] if isinstance(values, dict) else values  # (one call without its list)
        calls = [_json_call(value, "arguments", "parameters") for value in values]
    except (ValueError, KeyError, TypeError, AttributeError):
        return text, []
    rest = text[end:].lstrip()
    if closing and rest.startswith(closing):
        end = len(text) - len(rest) + len(closing)
    content = (text[:start] + text[end:]).strip()
    return (content or None, calls) if calls else (text, [])


def parse_xml_calls(text: str, syntax: tuple[str, str, re.Pattern, re.Pattern], schemas: dict[str, dict]
                    ) -> tuple[str | None, list[ToolCall]]:
    """(the text before the first call block, or None when empty; the calls) from a reply whose calls are
    XML functions inside the blocks of `syntax` (XML_CALLS); (the text, []) when it has none."""
    start, end, function, parameter = syntax
    content, *blocks = text.split(start)
    if not blocks and start == HERMES_START and XML_FUNCTION in text:  # Qwen3-Coder's may leave out <tool_call>:
        # its functions are read from the first, as vLLM's qwen3_coder parser backs off to, and a lone
        # </tool_call> after them dropped
        at = text.index(XML_FUNCTION)
        content, blocks = text[:at], [text[at:]]
    calls = []
    for block in blocks:
        for name, body in function.findall(block.split(end, 1)[0]):
            properties = _properties(schemas, name.strip())
            arguments = {key.strip(): _typed(value.removeprefix("\n").removesuffix("\n"), properties.get(key.strip()))
                         for key, value in parameter.findall(body)}
            calls.append(_call_of(name.strip(), arguments))
    return (content.strip() or None, calls) if calls else (text, [])


def parse_glm(text: str, schemas: dict[str, dict]) -> tuple[str | None, list[ToolCall]]:
    """(the text outside the calls, or None when nothing else was said; the calls) from a reply in GLM's
    syntax; the last call may lack its closing tag."""
    calls, kept, end = [], [], 0
    for match in _GLM_CALL.finditer(text):
        name = match.group(1).strip()
        if not name:
            continue
        properties = _properties(schemas, name)
        arguments = {key.strip(): _written_value(value.strip(), properties.get(key.strip()))
                     for key, value in _GLM_ARGUMENT.findall(match.group(2))}
        kept.append(text[end:match.start()])
        end = match.end()
        calls.append(_call_of(name, arguments))
    kept.append(text[end:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


def _written_value(value: str, schema: Any) -> Any:
    """A GLM argument: its text where the tool schema says string, else the JSON value or Python literal it
    reads as where JSON can hold that, else its text."""
    if isinstance(schema, dict) and schema.get("type") == "string":
        return value
    try:
        return _json_value(json.loads(value), value)
    except (ValueError, RecursionError):
        pass
    try:
        return _json_value(ast.literal_eval(value), value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return value


def parse_deepseek(text: str, read_call: Callable[[str], tuple[str, str] | None]
                   ) -> tuple[str | None, list[ToolCall]]:
    """(the text before the calls, or None when empty; the calls) from a DeepSeek reply whose calls follow
    `<｜tool▁calls▁begin｜>`; a call whose arguments are not JSON stays unread, and with no call read the
    whole reply is text."""
    content, found, block = text.partition(DEEPSEEK_CALLS)
    calls = []
    read = (read_call(call) for call in block.split(DEEPSEEK_CALL)[1:]) if found else ()
    for name, arguments in (call for call in read if call is not None):
        try:
            calls.append(_call_of(name.strip(), json.loads(arguments)))
        except ValueError:
            continue
    return (content.strip() or None, calls) if calls else (text, [])


def _deepseek_v3_call(call: str) -> tuple[str, str] | None:
    """(name, arguments) of one DeepSeek-V3 call's text (after its opening): a kind, the separator, the name, then
    the JSON arguments in a ```json block, up to the call's end; None if it is not whole."""
    body, ended, _ = call.partition(DEEPSEEK_CALL_END)
    _, separated, rest = body.partition(DEEPSEEK_SEP)
    name, fenced, arguments = rest.partition("```json")
    arguments = arguments.rstrip()
    if not (ended and separated and fenced and arguments.endswith("```")):
        return None
    return name, arguments[:-3].strip()


def _deepseek_v31_call(call: str) -> tuple[str, str] | None:
    """(name, arguments) of one DeepSeek-V3.1 call's text (after its opening): the name, the separator, the JSON
    arguments up to the call's end; None if it is not whole."""
    body, ended, _ = call.partition(DEEPSEEK_CALL_END)
    name, separated, arguments = body.partition(DEEPSEEK_SEP)
    return (name, arguments) if ended and separated else None


def _typed(value: str, schema: Any) -> Any:
    """An XML parameter's text as its JSON schema's type says: text where the schema is a string's, or
    gives none, or the text does not read as that type (nan and inf are not JSON numbers)."""
    if value.lower() == "null":
        return None
    kinds = schema.get("type", "string") if isinstance(schema, dict) else "string"
    kind = next((k for k in (kinds if isinstance(kinds, list) else [kinds]) if k != "null"), "string")
    try:
        if kind == "integer":
            return int(value)
        if kind == "number":
            number = float(value)
            return int(number) if number.is_integer() else _json_value(number, value)
        if kind == "boolean":
            return value.strip().lower() == "true"
        if kind in ("object", "array"):
            return _json_value(json.loads(value), value)
    except ValueError:
        pass
    return value


def reply_parser(parser: str, schemas: dict[str, dict] | None) -> Callable[[str], tuple[str | None, list[ToolCall]]]:
    """The function that reads a complete reply in `parser`'s syntax (the XML ones with the request's
    tool schemas). Where the parser fails the reply is text, as vLLM's parsers return it: a finished
    generation is never lost to a parser's bug (a 500, or a stream cut short)."""
    parse = PARSERS[parser][0]
    parse = functools.partial(parse, schemas=schemas or {}) if parser in SCHEMA_TYPED else parse

    def read(text: str) -> tuple[str | None, list[ToolCall]]:
        try:
            return parse(text)
        except Exception:
            logger.exception("the %s tool-call parser failed; the reply is returned as text", parser)
            return text, []

    return read


# name: (parse a complete reply, where a partial reply starts to be held back)
PARSERS = {"hermes": (parse_hermes, tag_held_from(HERMES_START)),
           "llama3_json": (parse_llama3_json, whole_reply_held_from("{")),
           "granite": (parse_granite, whole_reply_held_from("[")),
           "mistral": (parse_mistral, tag_held_from(MISTRAL_CALLS)),
           "pythonic": (parse_pythonic, whole_reply_held_from("[")),
           "phi4_mini_json": (functools.partial(parse_json_list, opening=PHI4_CALLS), tag_held_from(PHI4_CALLS)),
           **dict.fromkeys(("llama_nemotron_json", "nemotron_json"), (functools.partial(
               parse_json_list, opening=NEMOTRON_START, closing=NEMOTRON_END), tag_held_from(NEMOTRON_START))),
           "olmo3": (parse_olmo3, whole_reply_held_from(OLMO3_START)),
           "ernie45": (parse_hermes, tag_held_from(HERMES_START)),
           "internlm": (parse_internlm, tag_held_from(INTERNLM_START)),
           "openai": (parse_openai, tag_held_from(HARMONY_CALL)),
           **{name: (functools.partial(parse_xml_calls, syntax=syntax),  # + schemas
                     tag_held_from(syntax[0], *([XML_FUNCTION] if syntax[0] == HERMES_START else [])))
              for name, syntax in XML_CALLS.items()},
           **dict.fromkeys(("glm45", "glm47"), (parse_glm, tag_held_from(GLM_START))),  # + schemas: reply_parser
           **{name: (functools.partial(parse_deepseek, read_call=read), tag_held_from(DEEPSEEK_CALLS))
              for name, read in (("deepseek_v3", _deepseek_v3_call), ("deepseek_v31", _deepseek_v31_call))}}
# what a reply cut by max_tokens loses first (ToolCallStream)
CUT_CALLS = {"openai": without_open_call(HARMONY_CALL, CALL_END),
             **dict.fromkeys(("glm45", "glm47"), without_open_call(GLM_START, GLM_END))}
SCHEMA_TYPED = (*XML_CALLS, "glm45", "glm47")  # parsers that type the arguments by the request's tool schemas


class ToolCallStream:
    """Streams a reply's text, holding it back from where a tool call may start (per the parser), so
    that calls go out parsed once the reply is complete."""

    def __init__(self, parser: str, schemas: dict[str, dict] | None = None):
        self.parser = parser
        self.parse, self.held_from = reply_parser(parser, schemas), PARSERS[parser][1]
        self.text = ""
        self.sent = 0

    def feed(self, delta: str) -> str:
        """The part of the text so far that can be sent as content now."""
        self.text += delta
        end = max(self.sent, self.held_from(self.text, self.sent))
        out, self.sent = self.text[self.sent:end], end
        return out

    def finish(self, cut: bool = False) -> tuple[str | None, list[ToolCall]]:
        """(the content not sent yet, the calls) once the reply is complete; cut: by max_tokens, where a
        syntax whose calls end at a stop token leaves out a last call still open (CUT_CALLS)."""
        rest = self.text[self.sent:]
        if cut and self.parser in CUT_CALLS:
            rest = CUT_CALLS[self.parser](rest)
        content, calls = self.parse(rest)
        return (content or None) if calls else (rest or None), calls


class ReplyReader:
    """One reply read as it streams: what can be sent as content now, and at the end the rest, the tool
    calls and the finish reason. Plain text passes through; a forced call is held back whole; with a
    parser, text is held from where a call may start."""

    def __init__(self, forced: str | None, parser: str | None, parallel: bool = True,
                 schemas: dict[str, dict] | None = None):
        self.forced = forced
        self.calls = ToolCallStream(parser, schemas) if parser and not forced else None
        self.parallel = parallel
        self.text = ""

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.forced:
            return ""
        return self.calls.feed(delta) if self.calls else delta

    def finish(self, finish_reason: str | None) -> tuple[str | None, list[ToolCall] | None, str | None]:
        """(content not sent yet, tool calls or None, finish reason)."""
        if self.forced:
            return read_reply(self.text, self.forced, None, finish_reason)
        if self.calls is None:
            return None, None, finish_reason
        content, calls = self.calls.finish(cut=finish_reason == "length")
        return (content, calls if self.parallel else calls[:1], calls_finish(finish_reason)) if calls else \
            (content, None, finish_reason)
