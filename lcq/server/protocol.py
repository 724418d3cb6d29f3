"""Pydantic models of every request and response, in OpenAI's shapes (plus vLLM's common extras).

Requests accept unknown fields (tools send vendor extras) and the handlers log them; value ranges are
checked once by SamplingParams.validate so the server and the engine agree on what is valid.
"""
from __future__ import annotations

import json
import time
from typing import Annotated, Any, ClassVar, Literal, Mapping

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, StrictInt,
                      model_serializer, model_validator)

from lcq import __version__
from lcq.runtime.outputs import TokenLogprob
from lcq.runtime.sampling_params import SEED_MODULUS, SamplingParams, StructuredOutput, choice_regex

Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]
TokenId = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]  # (strict: JSON's true is no token 1)
# A flag that OpenAI's and vLLM's types declare nullable (stream, echo, chat's logprobs): null is false, the default
NullableFlag = Annotated[bool | None, AfterValidator(bool)]
# A flag on by default whose null means its default, as the SDKs send fields they were given as None
# (OpenAI types these Optional[bool]): store, parallel_tool_calls.
NullableOnFlag = Annotated[bool | None, AfterValidator(lambda flag: flag is not False)]


def _not_zero(k: int) -> int:
    if k == 0:
        raise ValueError("truncate_prompt_tokens must be -1 (the model's context) or at least 1")
    return k


# vLLM's truncate_prompt_tokens: keep a prompt's last k tokens, -1 for as many as the model's context holds
TruncateTokens = Annotated[int, Field(ge=-1, le=2**31 - 1), AfterValidator(_not_zero)]
# vLLM's request_id field: the base of the response's id where no X-Request-Id header gives one (state.request_id_of),
# fit, as that header must be, to go into ids, headers and log lines as it is
RequestId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]


def last_tokens(ids: list, k: int | None, context: int) -> list:
    """A prompt's last k tokens (truncate_prompt_tokens; -1: the model's context), for prompts that outgrew
    the context, as long chats do."""
    k = context if k == -1 else k
    return ids if k is None or len(ids) <= k else ids[-k:]


def unencodable_text(value: Any, where: str = "") -> str | None:
    """Where in a parsed JSON body a string holds a lone UTF-16 surrogate (JSON's "\\ud83d" without its
    pair), which is no Unicode text: tokenizers and UTF-8 encoders fail on it; None where there is none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "the body"
    elif isinstance(value, dict):
        for key, item in value.items():
            found = unencodable_text(key, where or "the body") or unencodable_text(item, f"{where}.{key}".lstrip("."))
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if found := unencodable_text(item, f"{where}.{i}".lstrip(".")):
                return found
    return None


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    # Engine and sampling fields under this request's own names where they differ (a request built from
    # another API's, as a Responses request's chat request, names that API's fields)
    _renamed: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _unicode_text(cls, data: Any) -> Any:
        """A 400 for text that is not Unicode before any of it reaches the tokenizer or an error message."""
        if (where := unencodable_text(data)) is not None:
            raise ValueError(f"{where} holds a lone UTF-16 surrogate, which is not valid Unicode text")
        return data

    def field_name(self, name: str) -> str:
        """The request field an engine or sampling field `name` (SamplingParams') comes from."""
        return self._renamed.get(name, name)

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})

    def invalid(self) -> tuple[str, str] | None:
        """(field, message) for a value no valid request has beyond what the field types check (a 400);
        None otherwise."""
        return None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) when the request asks for what this server cannot do and ignoring it
        would return something else than asked (a 400); None otherwise."""
        return None


# TGI's grammar types, {"type", "value"}: its /generate's `grammar` and its chat's `response_format`
TGI_GRAMMARS = ("json", "json_object", "json_schema", "regex")


def tgi_grammar(kind: str, value: Any, source: str) -> StructuredOutput:
    """The constraint of TGI's grammar: a regular expression (regex), or a JSON schema (json and its alias
    json_object: the schema itself, or its JSON text; json_schema: under `schema`, as TGI's, else itself).
    huggingface_hub sends a chat's json_schema response_format to TGI as {"type": "json_object", "value": schema}.
    ValueError, naming `source`, for a value of the wrong form."""
    if kind == "regex":
        if not isinstance(value, str):
            raise ValueError(f"{source}: a regex grammar's value must be a string")
        return StructuredOutput(regex=value, source=source)
    schema = value.get("schema", value) if kind == "json_schema" and isinstance(value, dict) else value
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise ValueError(f"{source}: the JSON schema's text is not valid JSON") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{source}: a {kind} grammar's value must be a JSON schema (an object)")
    return StructuredOutput(json.dumps(schema), source=source)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False  # a last chunk with the usage of the whole request
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk with its choice's usage so far


TOOL_CHOICES = ("none", "auto", "required")


def tool_choice_problem(choice: str | dict[str, Any] | None, tools: list[Any] | None) -> str | None:
    """What is wrong with a tool_choice, chat's or the Responses API's, as OpenAI's API and vLLM check it:
    one of TOOL_CHOICES (or a named tool, whose form each API checks), and only with tools; None if nothing."""
    if choice is None:
        return None
    if tools is None:
        return "tool_choice is only allowed when tools are specified"
    if isinstance(choice, str) and choice not in TOOL_CHOICES:
        return f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or a named function (got {choice!r})"
    if choice == "required" and not tools:
        return "tool_choice 'required' needs at least one tool (tools is empty)"
    return None
GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")  # vLLM's guided decoding fields
# structured_outputs' keys of a constraint (guided_* without "guided_"): the types of those fields, as errors say them
STRUCTURED_OUTPUTS = {"json": ((dict, str), "a JSON schema: an object, or its JSON text"), "regex": (str, "a string"),
                      "choice": (list, "a list of strings"), "grammar": (str, "a string"),
                      "structural_tag": (str, "a structural tag's JSON text")}


class SamplingRequest(OpenAIRequest):
    """Fields shared by /v1/completions and /v1/chat/completions. None means the default."""

    model: str | None = None
    use_beam_search: NullableFlag = False  # vLLM's; refused (unsupported)
    max_tokens: Count | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int64 | None = None
    min_p: float | None = None
    n: Int64 | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    seed: Int64 | None = None
    priority: Int64 = 0  # vLLM's: with --scheduling-policy priority, lower values are scheduled first
    cache_salt: Annotated[str, Field(min_length=1)] | None = None  # vLLM's: cache hits only within one salt
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI sends it) -> bias
    allowed_token_ids: list[TokenId] | None = None  # vLLM's: only these tokens are sampled
    bad_words: list[str] | None = None  # vLLM's: words never generated
    min_tokens: Count | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # vLLM's: false keeps special tokens (tool-call tags, markers) in the text
    truncate_prompt_tokens: TruncateTokens | None = None
    # vLLM's: whether text is tokenized with the tokenizer's special tokens (a BOS); each endpoint has its default
    add_special_tokens: bool | None = None
    # vLLM's: logprobs name tokens "token_id:{id}" rather than by their text; unset, --return-tokens-as-token-ids
    return_tokens_as_token_ids: bool | None = None
    # vLLM's: the reply's token ids beside its text (and the prompt's), as RL and evaluation pipelines read them
    return_token_ids: bool | None = None
    # vLLM's: each prompt token's logprob, rank and this many alternatives (not with stream, as vLLM's)
    prompt_logprobs: Annotated[int, Field(ge=0)] | None = None  # (at most the engine's max_logprobs)
    response_format: dict[str, Any] | None = None  # {"type": "text" | "json_object" | "json_schema", ...}
    guided_json: dict[str, Any] | str | None = None  # vLLM's: a JSON schema
    guided_regex: str | None = None  # vLLM's: the output matches this regular expression
    guided_choice: list[str] | None = None  # vLLM's: the output is one of these strings
    guided_grammar: str | None = None  # vLLM's: the output follows this EBNF grammar (`root ::= ...`)
    # vLLM's newer form of the same: {"json" | "regex" | "choice" | "grammar": ..., or "json_object": true}
    structured_outputs: dict[str, Any] | None = None
    ignore_eos: bool = False
    stream: NullableFlag = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        model_defaults: Mapping[str, float | int]) -> SamplingParams:
        """SamplingParams for one choice (n is fanned out by the server); raises ValueError for a 400.
        Fields left unset take the model's generation-config values (`model_defaults`, the engine's
        sampling_defaults), else the built-in ones; max_tokens None means the rest of the context."""
        defaults = SamplingParams(**model_defaults)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

        def pick(value, default):
            return default if value is None else value

        params = SamplingParams(
            max_tokens=pick(max_tokens, model_defaults.get("max_tokens")),
            temperature=pick(self.temperature, defaults.temperature),
            top_p=pick(self.top_p, defaults.top_p),
            top_k=pick(self.top_k, defaults.top_k),
            min_p=pick(self.min_p, defaults.min_p),
            presence_penalty=pick(self.presence_penalty, defaults.presence_penalty),
            frequency_penalty=pick(self.frequency_penalty, defaults.frequency_penalty),
            repetition_penalty=pick(self.repetition_penalty, defaults.repetition_penalty),
            seed=None if self.seed is None else self.seed % SEED_MODULUS,
            priority=self.priority,
            cache_salt=self.cache_salt,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            n=pick(self.n, 1),
            logit_bias=self.token_biases(),
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words or [],
            min_tokens=pick(self.min_tokens, defaults.min_tokens),
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            prompt_logprobs=self.prompt_logprobs,
            structured_output=self.structured_output(),
        )
        params.validate(max_logprobs=None)  # (the engine holds their limit: its max_logprobs)
        return params

    def guided(self) -> dict[str, Any]:
        """The guided constraints asked for, by vLLM's guided_* name: from those fields, or from
        structured_outputs (whose keys are the names without "guided_"; json_object: true is a
        response_format json_object)."""
        guided = {name: getattr(self, name) for name in GUIDED if getattr(self, name) is not None}
        if guided and self.structured_outputs:
            raise ValueError(f"structured_outputs cannot be combined with {next(iter(guided))}")
        for key, value in (self.structured_outputs or {}).items():
            if key == "json_object":
                if value:
                    guided["json_object"] = True
            elif key in STRUCTURED_OUTPUTS and value is not None:
                kinds, form = STRUCTURED_OUTPUTS[key]
                if not isinstance(value, kinds) or (key == "choice" and not all(isinstance(c, str) for c in value)):
                    raise ValueError(f"structured_outputs {key} must be {form}")
                guided[f"guided_{key}"] = value
            else:
                raise ValueError(f"structured_outputs has {key!r}, which is not supported (json, regex, choice, "
                                 "grammar, structural_tag, json_object)")
        return guided

    def structured_output(self) -> StructuredOutput | None:
        """response_format, or one of vLLM's guided_json / guided_regex / guided_choice / guided_grammar
        (or structured_outputs), as the engine's constraint (None for free text); ValueError when
        malformed or when more than one is given."""
        kind = (self.response_format or {}).get("type", "text")
        guided = self.guided()
        if len(guided) + (kind != "text") > 1:
            names = [*(["response_format"] if kind != "text" else []), *guided]
            raise ValueError(f"{names[1]} cannot be combined with {names[0]}")
        if "json_object" in guided:
            return StructuredOutput()
        if "guided_json" in guided:
            value = guided["guided_json"]
            try:
                schema = json.loads(value) if isinstance(value, str) else value
            except ValueError:
                raise ValueError("guided_json is not valid JSON") from None
            return StructuredOutput(json.dumps(schema), source="guided_json")
        if "guided_regex" in guided:
            return StructuredOutput(regex=guided["guided_regex"])
        if "guided_grammar" in guided:
            return StructuredOutput(grammar=guided["guided_grammar"])
        if "guided_structural_tag" in guided:
            try:
                tag = json.loads(guided["guided_structural_tag"])
            except ValueError:
                raise ValueError("structured_outputs structural_tag is not valid JSON") from None
            if not isinstance(tag, dict):
                raise ValueError("structured_outputs structural_tag must be a JSON object")
            return StructuredOutput(structural_tag=json.dumps(tag), source="structured_outputs structural_tag")
        if "guided_choice" in guided:
            return StructuredOutput(regex=choice_regex(guided["guided_choice"]))  # metacharacters escaped
        if kind == "text":
            return None
        if kind in TGI_GRAMMARS and "value" in self.response_format:  # (TGI's form, as huggingface_hub sends it)
            return tgi_grammar(kind, self.response_format["value"], "response_format")
        if kind == "json_object":
            return StructuredOutput()
        if kind == "json_schema":
            json_schema = self.response_format.get("json_schema")
            schema = json_schema.get("schema") if isinstance(json_schema, dict) else None
            if not isinstance(schema, dict):
                raise ValueError("response_format json_schema needs json_schema.schema, a JSON schema object")
            # (key order kept: the JSON follows the properties in order)
            return StructuredOutput(json.dumps(schema), source="response_format json_schema")
        if kind == "structural_tag":  # vLLM's: xgrammar's structural tag (the whole object), or its older form
            tag = self.response_format if "format" in self.response_format else {
                key: value for key, value in self.response_format.items() if key != "type"}
            return StructuredOutput(structural_tag=json.dumps(tag), source="response_format structural_tag")
        raise ValueError(f"response_format type {kind!r} is not supported: text, json_object, json_schema, "
                         "structural_tag, or TGI's json and regex with a value")

    def adds_special_tokens(self, default: bool) -> bool:
        """add_special_tokens as asked, else the endpoint's `default`: completions add them (the prompt is raw
        text), chat does not (the template writes the special tokens it wants, a BOS among them)."""
        return default if self.add_special_tokens is None else self.add_special_tokens

    def truncated(self, ids: list[int], context: int, max_tokens: int | None) -> list[int]:
        """The prompt cut to its last truncate_prompt_tokens; -1 keeps what the context leaves beside the reply
        (max_tokens, at least one token), as vLLM's does: a prompt cut to the whole context had no room."""
        return last_tokens(ids, self.truncate_prompt_tokens, max(1, context - (max_tokens or 1)))

    def token_biases(self) -> dict[int, float]:
        """logit_bias with integer token ids; raises ValueError for a key that is not one."""
        biases = {}
        for key, value in (self.logit_bias or {}).items():
            # ("²" and "٣" are digits too; past 4,300 digits int() refused them with a hint to raise Python's limit)
            if not (key.strip().isascii() and key.strip().isdigit() and len(key.strip()) <= 12):
                raise ValueError(f"logit_bias keys must be token ids, got {key[:32]!r}")
            biases[int(key)] = value
        return biases

    def invalid(self) -> tuple[str, str] | None:
        """stream_options only with stream, as OpenAI's API and vLLM refuse it otherwise."""
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        if self.prompt_logprobs is not None and self.stream:
            return "prompt_logprobs", "prompt_logprobs is not available when stream is true"
        return None

    def include_usage(self, forced: bool = False) -> bool:
        """Whether a stream ends with a usage chunk: stream_options asks for it, or the server does for every stream
        (`forced`: --enable-force-include-usage)."""
        return bool(self.stream and (forced or (self.stream_options and self.stream_options.include_usage)))

    def continuous_usage(self, forced: bool = False) -> bool:
        """vLLM's continuous usage stats, which count only with include_usage (as vLLM's do)."""
        return self.include_usage(forced) and bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def unsupported(self) -> tuple[str, str] | None:
        """vLLM's beam search is not implemented (sampled choices would come back as if they were beams)."""
        if (refused := super().unsupported()) is not None:
            return refused
        if self.use_beam_search:
            return "use_beam_search", ("use_beam_search is not supported: ask for n choices and rank them by their "
                                       "logprobs")
        return None


MAX_PROMPTS = 2048  # texts or token lists in one completions or embeddings request (OpenAI's limit for embeddings)


def _at_most_max_prompts(value: Any) -> Any:
    """A list of more than MAX_PROMPTS prompts refused before the forms are told apart (a few KB of [[5]] made
    100,000s of engine requests, admitted whole: gigabytes, the server unanswering for seconds); a list of token
    ids is one prompt (past the cap on the list of texts alone, texts of digits were read as one of token ids)."""
    if isinstance(value, list) and len(value) > MAX_PROMPTS and \
            not all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
    return value


Prompts = Annotated[str | list[str] | list[TokenId] | list[list[TokenId]], BeforeValidator(_at_most_max_prompts)]


class CompletionRequest(SamplingRequest):
    prompt: Prompts
    request_id: RequestId | None = None
    echo: NullableFlag = False
    logprobs: Int64 | None = None
    best_of: Int64 | None = None
    suffix: str | None = None

    def invalid(self) -> tuple[str, str] | None:
        """best_of below n, in vLLM's words."""
        if (wrong := super().invalid()) is not None:
            return wrong
        n = self.n or 1
        if self.best_of is not None and self.best_of < n:
            return "best_of", f"best_of must be greater than or equal to n, got n={n} and best_of={self.best_of}."
        return None

    def unsupported(self) -> tuple[str, str] | None:
        """best_of (ranking more samples than returned) and suffix (insertion) are not implemented."""
        if (refused := super().unsupported()) is not None:
            return refused
        if self.best_of is not None and self.best_of != (self.n or 1):
            return "best_of", "best_of is not supported: ask for n choices and rank them by their logprobs"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported"
        return None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    # any role: templates render such as Llama 3.1's ipython and the legacy function, as vLLM passes them on
    role: Annotated[str, Field(min_length=1)]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls, passed to the template
    tool_call_id: str | None = None  # which call a tool message answers
    reasoning: str | None = None  # an assistant turn's thinking, as this server returned it (vLLM's name)
    reasoning_content: str | None = None  # the same, as DeepSeek's API names it


def any_call_schema(functions: dict[str, dict]) -> dict:
    """{"name", "arguments"} of any of the functions (tool_choice "required"). Each one's definitions (`$defs`,
    `definitions`) move to the root, where its `#/$defs/...` references resolve from (as vLLM's
    get_tool_schema_defs does); ValueError where two functions define one name differently."""
    definitions: dict[str, dict[str, Any]] = {}
    calls = []
    for name, parameters in functions.items():
        parameters = dict(parameters)  # (the request's tools stay as sent)
        for key in ("$defs", "definitions"):
            if not isinstance(parameters.get(key), dict):
                continue
            for defined, schema in parameters.pop(key).items():
                if definitions.setdefault(key, {}).setdefault(defined, schema) != schema:
                    raise ValueError(f"tools define {defined!r} in {key} differently, which tool_choice \"required\" "
                                     "cannot combine into one schema")
        calls.append({"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
                      "required": ["name", "arguments"], "additionalProperties": False})
    return {"anyOf": calls, **definitions}


class ChatTemplateOptions(OpenAIRequest):
    """How messages become a prompt (vLLM's extras): the assistant turn's opening, or the last
    (assistant) message continued as it is, and variables for the template (e.g. enable_thinking)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # OpenAI's: how hard a reasoning model thinks, the template's `reasoning_effort` (gpt-oss's system
    # message says it) unless chat_template_kwargs sets that
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    # RAG templates' (Command R's, Granite's): the documents the reply may draw on, each a mapping such as
    # {"title": ..., "text": ...}, as transformers' apply_chat_template and vLLM take them
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None  # vLLM's per-request template; refused (unsupported)

    def unsupported(self) -> tuple[str, str] | None:
        """A request's own chat template is not run: the server's (--chat-template, else the model's) renders every
        conversation, as vLLM's does without --trust-request-chat-template (a template is code the server runs)."""
        if (refused := super().unsupported()) is not None:
            return refused
        if self.chat_template is not None:
            return "chat_template", ("a request's chat_template is not used: the server's (--chat-template, else the "
                                     "model's) renders every conversation")
        return None

    def template_variables(self) -> dict[str, Any]:
        """The variables the chat template gets beyond the messages and tools."""
        # vLLM's: an effort asked for also says whether to think at all (Qwen3's enable_thinking), unless the
        # kwargs say it
        effort = {"reasoning_effort": self.reasoning_effort,
                  "enable_thinking": self.reasoning_effort != "none"} if self.reasoning_effort else {}
        return {**effort, **(self.chat_template_kwargs or {})}


class Prediction(BaseModel):
    """OpenAI's Predicted Outputs: text the reply is expected to repeat (a file an edit rewrites)."""

    type: Literal["content"]
    content: str | list[ContentPart]

    def text(self) -> str:
        parts = [self.content] if isinstance(self.content, str) else \
            [part.text or "" for part in self.content if part.type == "text"]
        return "".join(parts)


class ChatCompletionRequest(SamplingRequest, ChatTemplateOptions):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    request_id: RequestId | None = None
    echo: NullableFlag = False  # vLLM's (the last message before the reply); refused (unsupported)
    prediction: Prediction | None = None
    max_completion_tokens: Count | None = None
    logprobs: NullableFlag = False
    top_logprobs: Int64 | None = None
    # Known so that they are refused rather than ignored: generation would not honour them.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: NullableOnFlag = True  # false: at most one call per reply
    functions: list[dict[str, Any]] | None = None  # the older form of tools
    function_call: str | dict[str, Any] | None = None

    def field_name(self, name: str) -> str:
        """Chat's names of the engine's fields: top_logprobs is SamplingParams.logprobs, the prompt is the
        messages, and max_tokens is max_completion_tokens where the request sent that."""
        if name in self._renamed:
            return self._renamed[name]
        if name == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return {"logprobs": "top_logprobs", "prompt": "messages"}.get(name, name)

    def invalid(self) -> tuple[str, str] | None:
        """tool_choice checked as OpenAI's API and vLLM's check it: one of its values, and only with tools; and
        each tool a function whose parameters are a JSON schema object (vLLM's types)."""
        if (wrong := super().invalid()) is not None:
            return wrong
        choice = self.tool_choice
        if (problem := tool_choice_problem(choice, self.tools)) is not None:
            return "tool_choice", problem
        try:
            self.tool_parameters()
        except ValueError as e:
            return "tools", str(e)
        function = choice.get("function") if isinstance(choice, dict) else None
        if isinstance(choice, dict) and (choice.get("type") != "function" or not isinstance(function, dict) or
                                         not isinstance(function.get("name"), str)):
            return "tool_choice", 'a named tool_choice is {"type": "function", "function": {"name": ...}}'
        return None

    @property
    def auto_tools(self) -> bool:
        """Whether the model may choose to call a tool (tool_choice "auto", the default with tools)."""
        return bool(self.tools) and self.tool_choice in (None, "auto")

    def unsupported(self) -> tuple[str, str] | None:
        """The legacy functions; tools are handled (tool_calls.py), "auto" where the server has a parser."""
        if (refused := super().unsupported()) is not None:
            return refused
        if self.functions and self.function_call != "none":
            return "functions", "functions are not supported; use tools with a forced tool_choice"
        if self.echo:
            return "echo", "echo is not supported on chat completions (continue_final_message continues a message)"
        return None

    def forced_tool(self) -> str | None:
        """\"required\" or the named function when the reply must be a tool call, else None."""
        if not self.tools or self.tool_choice == "none":
            return None
        if self.tool_choice == "required":
            return "required"
        return ((self.tool_choice or {}).get("function") or {}).get("name") if isinstance(self.tool_choice, dict) \
            else None

    def tool_call_schema(self) -> dict | None:
        """The JSON a forced call is generated as: the named function's parameters, or for "required"
        {"name": one of the functions, "arguments": its parameters}; ValueError for a malformed choice."""
        forced = self.forced_tool()
        if forced is None:
            return None
        functions = self.tool_parameters()
        if forced == "required":
            return any_call_schema(functions)
        if forced not in functions:
            raise ValueError(f"tool_choice names {forced!r}, which is not among the tools")
        return functions[forced]

    def tool_parameters(self) -> dict[str, dict]:
        """Each tool's parameters schema by its name; ValueError for a malformed tool."""
        functions = {}
        for tool in self.tools or []:
            function = tool.get("function") if tool.get("type") == "function" else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise ValueError("tools must be {\"type\": \"function\", \"function\": {\"name\": ...}} objects")
            parameters = function.get("parameters")
            if parameters is not None and not isinstance(parameters, dict):
                raise ValueError(f"tools has {function['name']!r}, whose parameters are not a JSON schema object")
            functions[function["name"]] = parameters or {"type": "object"}
        return functions

    def structured_output(self) -> StructuredOutput | None:
        schema = self.tool_call_schema()
        if schema is None:
            return super().structured_output()
        guided = self.guided()  # (a response_format is the form of a text answer, which a forced call leaves none of:
        # it takes the call's place, as vLLM's does; guided_* constrain this reply, and cannot both be)
        if guided:
            name = "structured_outputs" if self.structured_outputs else next(iter(guided))
            raise ValueError(f"{name} cannot be combined with a forced tool call")
        return StructuredOutput(json.dumps(schema), source="tools")


class TokenizeRequest(ChatTemplateOptions):
    """Either a prompt (as /v1/completions sees it) or messages (rendered with the chat template, as
    /v1/chat/completions sees them): add_special_tokens defaults as on those endpoints. (TGI's body, inputs and
    parameters, goes to tgi.tokenize.)"""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None  # described by the chat template to the model, as chat renders them
    add_special_tokens: bool | None = None
    return_token_strs: bool = False  # vLLM's: each token's vocabulary entry too (token_strs)


class DetokenizeRequest(OpenAIRequest):
    model: str | None = None
    tokens: list[TokenId]


# Responses


def now() -> int:
    return int(time.time())


class OmitsUnset(BaseModel):
    """A model whose `omitted_when_none` fields are left out of its JSON when None: fields that only a
    server option fills (--reasoning-parser), so that responses without it stay as they were."""

    omitted_when_none: ClassVar[tuple[str, ...]] = ()

    def _omitted(self) -> tuple[str, ...]:
        return self.omitted_when_none

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler):  # no return annotation: the schema stays the fields' own
        data = handler(self)
        for key in self._omitted():
            if data.get(key) is None:
                data.pop(key, None)
        return data


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = Field(0, exclude=True)  # for the Responses API's usage; chat usage has no such field


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0  # up to and including the one that ends the thinking
    accepted_prediction_tokens: int = 0  # Predicted Outputs: the prediction's tokens accepted as drafts
    rejected_prediction_tokens: int = 0  # ... and the rest of them





class EmbeddingRequest(OpenAIRequest):
    model: str | None = None
    input: Prompts
    request_id: RequestId | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None
    truncate_prompt_tokens: TruncateTokens | None = None

    def field_name(self, name: str) -> str:
        """The engine's prompt is this endpoint's input."""
        return "input" if name == "prompt" else name


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64: the float32 values' little-endian bytes, as OpenAI sends them


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class UsageInfo(OmitsUnset):
    omitted_when_none = ("completion_tokens_details",)
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


def token_name(token_id: int, text: str, as_id: bool) -> str:
    """How logprobs name a token: by its text, or with vLLM's return_tokens_as_token_ids as "token_id:{id}",
    which tells apart tokens whose texts are alike (the pieces of a character split across tokens)."""
    return f"token_id:{token_id}" if as_id else text


class PromptLogprob(BaseModel):
    """A prompt token's (or an alternative's) entry in vLLM's prompt_logprobs, keyed by token id."""

    logprob: float
    rank: int | None = None  # 1 + how many tokens were likelier
    decoded_token: str


def prompt_logprob_entries(entries: list[TokenLogprob | None], top: int, tokens_as_ids: bool
                           ) -> list[dict[str, PromptLogprob] | None]:
    """vLLM's prompt_logprobs: per prompt token (None for the first, which nothing predicts) the token and its
    `top` likeliest alternatives, by token id, each with its logprob, rank and text."""
    out: list[dict[str, PromptLogprob] | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        # the prompt token first, as vLLM's (scorers read the first value), then the alternatives
        found = {str(entry.token_id): PromptLogprob(logprob=entry.logprob, rank=entry.rank,
                                                    decoded_token=token_name(entry.token_id, entry.token, tokens_as_ids))}
        found.update({str(i): PromptLogprob(logprob=lp, rank=rank, decoded_token=token_name(i, text, tokens_as_ids))
                      for rank, (i, text, lp) in enumerate(entry.top[:top], 1)})
        out.append(found)
    return out


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(OmitsUnset):
    omitted_when_none = ("prompt_token_ids", "token_ids", "prompt_logprobs")
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # with return_token_ids, as vLLM's: the prompt's ids (a stream's first chunk of the choice) and the reply's
    # (a stream's chunk: those it adds)
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None  # with prompt_logprobs, as vLLM's


# OpenAI's name of the serving configuration (clients such as TGI's text-generation package require it)
SYSTEM_FINGERPRINT = f"lcq-{__version__}"


class CompletionResponse(BaseModel):
    """A completion, and each streamed chunk of one (OpenAI's stream sends the same object)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    system_fingerprint: str = SYSTEM_FINGERPRINT
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(ToolCall):
    index: int


class AssistantMessage(OmitsUnset):
    """A reply's message; `reasoning` and `reasoning_content` are there (null without thinking, as vLLM's) where the
    server reads thinking (`reads_thinking`: --reasoning-parser; clients then read message.reasoning_content), left
    out otherwise, as OpenAI's messages have none."""

    omitted_when_none = ("reasoning", "reasoning_content")
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning: str | None = None  # the thinking (--reasoning-parser), as vLLM names it
    reasoning_content: str | None = None  # the same, as DeepSeek's API and vLLM before 0.11 name it
    tool_calls: list[ToolCall] | None = None
    _reads_thinking: bool = PrivateAttr(default=False)

    @classmethod
    def of_reply(cls, content: str | None, reasoning: str | None, tool_calls: list[ToolCall] | None,
                 reads_thinking: bool) -> "AssistantMessage":
        message = cls(content=content, reasoning=reasoning, reasoning_content=reasoning, tool_calls=tool_calls)
        message._reads_thinking = reads_thinking
        return message

    def _omitted(self) -> tuple[str, ...]:
        return () if self._reads_thinking else self.omitted_when_none


class ChatChoice(OmitsUnset):
    omitted_when_none = ("token_ids",)
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    token_ids: list[int] | None = None  # with return_token_ids, as vLLM's


class ChatCompletionResponse(OmitsUnset):
    omitted_when_none = ("prompt_token_ids", "prompt_logprobs")
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    system_fingerprint: str = SYSTEM_FINGERPRINT
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids, as vLLM's
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None  # with prompt_logprobs, as vLLM's


class DeltaMessage(BaseModel):
    """Only what changed: `{"role": "assistant", "content": ""}` first, then `{"content": ...}`, `{}` at the end."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _only_set(self, handler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(OmitsUnset):
    omitted_when_none = ("token_ids",)
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    token_ids: list[int] | None = None  # with return_token_ids: the ids this chunk adds, as vLLM's


class ChatCompletionChunk(OmitsUnset):
    omitted_when_none = ("prompt_token_ids",)
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    system_fingerprint: str = SYSTEM_FINGERPRINT
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids: on the first chunk, as vLLM's


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "lcq"
    root: str | None = None  # vLLM's: the folder served (the model's, or a LoRA adapter's)
    parent: str | None = None  # a LoRA adapter's base model
    max_model_len: int | None = None
    permission: list[dict[str, Any]] = Field(default_factory=list)  # vLLM's (OpenAI's former field): none here


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's body of POST /v1/load_lora_adapter: serve the PEFT folder at lora_path as model lora_name."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False  # vLLM's: replace the adapter served under lora_name (its running requests finish)


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class VersionResponse(BaseModel):
    version: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
