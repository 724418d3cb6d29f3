"""What a request asks of generation. Validated once here so the server and the engine agree."""
from __future__ import annotations

import dataclasses
import json as json_module
import math
import re
from dataclasses import dataclass, field


MAX_LOGIT_BIAS = 300  # tokens in one request's logit_bias, as OpenAI allows
MAX_BAD_WORDS = 128  # strings in one request's bad_words, as vLLM allows
MAX_N = 128  # choices of one request, as OpenAI allows (vLLM sets no limit)
# stop strings of one request (vLLM sets no limit; OpenAI 4, which editors' templates pass: Continue's for
# Qwen2.5-Coder sends 9)
MAX_STOP = 128
# characters of one request's stop strings in all, and of its bad_words: each sequence of it matches or tokenizes
# them (vLLM sets no limit; 128 strings of 30,000 characters at n = 64 held the engine 24 s and 2 GB)
MAX_STRING_CHARS = 16384
SEED_MODULUS = 2**63  # the seeds of a request's n samples wrap here


@dataclass(frozen=True)
class StructuredOutput:
    """Output constrained (structured_output.py) to a regular expression, or a context-free grammar, or a
    structural tag, or else to JSON: one that follows a schema, or any JSON object."""

    json_schema: str | None = None  # the schema as JSON text (hashable: grammars are cached by it)
    regex: str | None = None
    grammar: str | None = None  # EBNF (GBNF's syntax: `root ::= ...`), as vLLM's guided_grammar
    # xgrammar's structural tag as JSON text: {"type": "structural_tag", "format": ...}, or vLLM's older
    # {"structures": [{"begin", "schema", "end"}, ...], "triggers": [...]} (free text, each tag's content constrained)
    structural_tag: str | None = None
    source: str = field(default="", compare=False)  # the request field it came from, for errors (not the grammar)


def choice_regex(choices: list[str]) -> str:
    """The regular expression of exactly one of `choices` (vLLM's guided_choice), metacharacters escaped."""
    if not choices or not all(isinstance(choice, str) for choice in choices):
        raise ValueError("guided_choice needs at least one string, and only strings")
    literal = [re.sub(r"([\\.^$*+?{}\[\]|()])", r"\\\1", choice) for choice in choices]
    return "|".join(f"({text})" for text in literal)


@dataclass
class StructuredOutputsParams:
    """vLLM's offline form of a constraint, SamplingParams(structured_outputs=...): exactly one of a JSON schema (a
    dict or its JSON text), a regular expression, a choice of strings, an EBNF grammar, any JSON object, or a
    structural tag (its JSON text). SamplingParams keeps it as the StructuredOutput it stands for."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: str | None = None

    def constraint(self) -> StructuredOutput:
        """The StructuredOutput it stands for; ValueError for none or several, or JSON that does not parse."""
        given = [name for name in ("json", "regex", "choice", "grammar", "structural_tag")
                 if getattr(self, name) is not None] + (["json_object"] if self.json_object else [])
        if len(given) != 1:
            raise ValueError(f"structured_outputs takes one constraint, got {', '.join(given) or 'none'}")
        source = f"structured_outputs {given[0]}"
        try:
            if self.json is not None:
                schema = json_module.loads(self.json) if isinstance(self.json, str) else self.json
                return StructuredOutput(json_module.dumps(schema), source=source)
            if self.structural_tag is not None:
                return StructuredOutput(structural_tag=json_module.dumps(json_module.loads(self.structural_tag)),
                                        source=source)
        except ValueError:
            raise ValueError(f"{source} is not valid JSON") from None
        if self.regex is not None:
            return StructuredOutput(regex=self.regex, source=source)
        if self.choice is not None:
            return StructuredOutput(regex=choice_regex(self.choice), source=source)
        if self.grammar is not None:
            return StructuredOutput(grammar=self.grammar, source=source)
        return StructuredOutput(source=source)


@dataclass
class SamplingParams:
    """Per-request sampling and stopping settings (OpenAI fields plus vLLM's common extras)."""

    max_tokens: int | None = 16  # None: up to the context length
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    typical_p: float = 1.0  # locally typical sampling (TGI's and transformers'); 1: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    priority: int = 0  # vLLM's: with --scheduling-policy priority, lower values are scheduled first
    lora: str | None = None  # the LoRA adapter (EngineConfig.lora_modules) to run with; None: the base model
    # vLLM's: prefix caching shares KV blocks only between requests of the same salt, so that a tenant cannot
    # learn from the time to its first token whether another's prompt began as its own does
    cache_salt: str | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob plus k alternatives
    n: int = 1  # the server fans n out into n engine requests
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit before sampling
    allowed_token_ids: list[int] | None = None  # vLLM's: only these tokens are sampled; None: all
    # vLLM's: words never generated. Each is banned as the tokenizer spells it alone and after a space; a
    # word of several tokens by its last token, where the output ends with the others.
    bad_words: list[str] = field(default_factory=list)
    # EOS and stop_token_ids are not sampled before this many output tokens, nor stop strings looked for (vLLM's)
    min_tokens: int = 0
    include_stop_str_in_output: bool = False  # a matched stop string ends the text instead of being cut (vLLM's)
    skip_special_tokens: bool = True  # special tokens (chat markers, tool-call tags) left out of the text (vLLM's)
    prompt_logprobs: int | None = None  # None: none; k >= 0: each prompt token's logprob plus k alternatives
    structured_output: StructuredOutput | None = None  # JSON output (OpenAI's response_format)
    structured_outputs: StructuredOutputsParams | None = None  # vLLM's offline form: becomes structured_output
    # The grammar starts once the output's text holds this string (a reasoning model's "</think>": the
    # answer is constrained, not the thinking before it); None: from the first token.
    structured_output_after: str | None = None
    # With structured_output_after: a reply may open with this text in one token (a reasoning model's "<think>",
    # where the prompt did not open it), and is then free until the marker; a reply that opens otherwise is
    # constrained from its first token. None: free until the marker whatever it opens with.
    structured_output_opening: str | None = None
    # OpenAI's Predicted Outputs: token ids the output is expected to repeat (a file being edited). They are
    # drafted and verified like prompt lookup (speculative.py), so the output is what it would be without.
    prediction: list[int] | None = None
    # An embedding request (/v1/embeddings): no tokens are generated; the request ends after its prompt with
    # the last prompt token's final hidden state, L2-normalized (the pooling of Qwen3-Embedding, e5-mistral).
    embed: bool = False

    def __post_init__(self) -> None:
        """stop, stop_token_ids, logit_bias and bad_words as vLLM takes them: one stop string alone, None for
        none."""
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = self.logit_bias or {}
        self.bad_words = [self.bad_words] if isinstance(self.bad_words, str) else list(self.bad_words or [])
        if self.structured_outputs is not None:  # (kept as the constraint alone, so that replace() sees one)
            if self.structured_output is not None:
                raise ValueError("structured_outputs cannot be combined with structured_output")
            self.structured_output, self.structured_outputs = self.structured_outputs.constraint(), None

    def validate(self, max_logprobs: int | None = 20) -> None:
        """Raise ValueError with a message fit for a 400 response. max_logprobs: the most alternatives logprobs and
        prompt_logprobs may ask for (the engine's max_logprobs; None: any, the engine checks later)."""
        if (problem := self._type_problem()) is not None:
            raise ValueError(problem)
        checks = [
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1"),
            (0.0 <= self.temperature <= 2.0, "temperature must be between 0 and 2"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.top_k >= -1, "top_k must be -1, 0 or positive"),
            (0.0 <= self.min_p <= 1.0, "min_p must be between 0 and 1"),
            (0.0 < self.typical_p <= 1.0, "typical_p must be in (0, 1]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be between -2 and 2"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be between -2 and 2"),
            (0.0 < self.repetition_penalty <= 2.0, "repetition_penalty must be in (0, 2]"),
            *[(value is None or 0 <= value <= (math.inf if max_logprobs is None else max_logprobs),
               f"{name} must be " + ("at least 0" if max_logprobs is None else f"between 0 and {max_logprobs}"))
              for name, value in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs))],
            (1 <= self.n <= MAX_N, f"n must be between 1 and {MAX_N}"),
            (0 <= self.min_tokens and (self.max_tokens is None or self.min_tokens <= self.max_tokens),
             "min_tokens must be between 0 and max_tokens"),
            (not (self.min_tokens and self.structured_output), "min_tokens cannot be combined with JSON output, "
                                                                "which ends where its grammar does"),
            (self.structured_output_after is None or (self.structured_output is not None
                                                       and self.structured_output_after != ""),
             "structured_output_after needs structured_output and a non-empty string"),
            (self.structured_output_opening is None or (self.structured_output_after is not None
                                                         and self.structured_output_opening != ""),
             "structured_output_opening needs structured_output_after and a non-empty string"),
            (len(self.stop) <= MAX_STOP and all(self.stop), f"stop takes at most {MAX_STOP} non-empty strings"),
            (sum(map(len, self.stop)) <= MAX_STRING_CHARS,
             f"stop strings may hold at most {MAX_STRING_CHARS} characters in all"),
            (len(self.logit_bias) <= MAX_LOGIT_BIAS, f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens"),
            (all(-100.0 <= v <= 100.0 for v in self.logit_bias.values()), "logit_bias values must be between -100 "
                                                                           "and 100"),
            (self.allowed_token_ids is None or len(self.allowed_token_ids) > 0, "allowed_token_ids must not be empty"),
            (self.cache_salt is None or (isinstance(self.cache_salt, str) and self.cache_salt != ""),
             "cache_salt must be a non-empty string"),
            (len(self.bad_words) <= MAX_BAD_WORDS and all(word.strip() for word in self.bad_words),
             f"bad_words takes at most {MAX_BAD_WORDS} strings that are not blank"),
            (sum(map(len, self.bad_words)) <= MAX_STRING_CHARS,
             f"bad_words may hold at most {MAX_STRING_CHARS} characters in all"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        # Sets of tokens, each id once: a request repeating ids (a million in 3 MB) held every step of the engine
        # while they were matched or masked; once each, they are at most the vocabulary.
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(dict.fromkeys(self.allowed_token_ids))

    def samples(self) -> list[SamplingParams]:
        """The n engine requests these params stand for, n = 1 each; seeded, the i-th with seed + i, so that
        each is reproducible and they differ."""
        return [dataclasses.replace(self, n=1, seed=None if self.seed is None else (self.seed + i) % SEED_MODULUS)
                for i in range(self.n)]

    def _type_problem(self) -> str | None:
        """What has the wrong type (an offline caller's value; the server's request models check theirs)."""
        def whole(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        optional = ("max_tokens", "seed", "logprobs", "prompt_logprobs")
        for name in ("top_k", "n", "min_tokens", "priority", *optional):
            value = getattr(self, name)
            if not whole(value) and not (value is None and name in optional):
                return f"{name} must be an integer (got {value!r})"
        for name in ("temperature", "top_p", "min_p", "typical_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            if not number(getattr(self, name)):
                return f"{name} must be a number (got {getattr(self, name)!r})"
        if not all(isinstance(text, str) for text in self.stop):
            return "stop must be a string or a list of strings"
        if not all(whole(token) for token in self.stop_token_ids):
            return "stop_token_ids must be a list of token ids"
        if self.allowed_token_ids is not None and (not isinstance(self.allowed_token_ids, list)
                                                   or not all(whole(token) for token in self.allowed_token_ids)):
            return "allowed_token_ids must be a list of token ids"
        if not all(isinstance(word, str) for word in self.bad_words):
            return "bad_words must be a list of strings"
        if not isinstance(self.logit_bias, dict) or not all(whole(token) and number(bias)
                                                             for token, bias in self.logit_bias.items()):
            return "logit_bias must map token ids to numbers"
        if self.seed is not None and not -2**63 <= self.seed < 2**64:
            return "seed must fit in 64 bits"
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
