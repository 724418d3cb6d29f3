"""Text Generation Inference's request body (`inputs` and `parameters`), as TGI's clients send it to /generate,
/generate_stream and /: huggingface_hub's InferenceClient.text_generation, the `text-generation` package, LangChain's
HuggingFaceEndpoint. Its checks say what TGI's say; what lcq cannot do (watermark) is refused, not ignored."""
from __future__ import annotations

import random
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lcq.runtime.sampling_params import SEED_MODULUS, SamplingParams, StructuredOutput

from .protocol import TGI_GRAMMARS, OpenAIRequest, tgi_grammar

DEFAULT_MAX_NEW_TOKENS = 100  # TGI's
# TGI's field of each SamplingParams field the engine's errors may name
TGI_FIELDS = {"max_tokens": "max_new_tokens", "logprobs": "top_n_tokens", "n": "best_of", "stop": "stop",
              "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "typical_p": "typical_p",
              "seed": "seed", "repetition_penalty": "repetition_penalty", "frequency_penalty": "frequency_penalty",
              "prompt": "inputs", "structured_output": "grammar"}


class Grammar(BaseModel):
    """TGI's grammar: a JSON schema or a regular expression (protocol.tgi_grammar)."""

    type: Literal[TGI_GRAMMARS]
    value: Any

    def constraint(self) -> StructuredOutput:
        return tgi_grammar(self.type, self.value, "grammar")


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    adapter_id: str | None = None  # a LoRA adapter served beside the base model (--lora-modules)
    best_of: int | None = None  # samples, of which the likeliest (sum of logprobs) is returned
    decoder_input_details: bool = False  # the prompt's tokens and their logprobs in `details.prefill`
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: Grammar | None = None
    max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS  # TGI's default where unset; null: up to the context
    repetition_penalty: float | None = None
    return_full_text: bool | None = None  # the prompt before the generated text
    seed: int | None = Field(default=None, ge=0)
    stop: list[str] = Field(default_factory=list)  # generation ends after one of these, which stays in the text
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None  # each token's likeliest alternatives
    top_p: float | None = None
    truncate: int | None = None  # keep the prompt's last tokens
    typical_p: float | None = None
    watermark: bool = False

    def sampling(self) -> bool:
        """Whether tokens are sampled, as TGI decides it: do_sample, or a warper that changes the distribution."""
        return self.do_sample or self.temperature not in (None, 1.0) or self.top_k not in (None, 0) \
            or self.top_p not in (None, 1.0) or self.typical_p not in (None, 1.0)

    def problem(self) -> str | None:
        """TGI's check of a value no valid request has, in its words; None if none."""
        positive = {"temperature": self.temperature, "repetition_penalty": self.repetition_penalty,
                    "top_k": self.top_k, "max_new_tokens": self.max_new_tokens, "best_of": self.best_of,
                    "truncate": self.truncate}
        for name, value in positive.items():
            if value is not None and value <= 0:
                return f"`{name}` must be strictly positive"
        if self.frequency_penalty is not None and not -2.0 <= self.frequency_penalty <= 2.0:
            return "`frequency_penalty` must be >= -2.0 and <= 2.0"
        for name, value in (("top_p", self.top_p), ("typical_p", self.typical_p)):
            if value is not None and not 0.0 < value <= 1.0:
                return f"`{name}` must be > 0.0 and <= 1.0"
        if self.top_n_tokens is not None and self.top_n_tokens < 0:
            return "`top_n_tokens` must be >= 0"
        if (self.best_of or 1) > 1 and not self.sampling():
            return "you must use sampling when `best_of` is > 1"
        if (self.best_of or 1) > 1 and self.decoder_input_details:
            return "`decoder_input_details` == true is not supported with `best_of` > 1"
        return None

    def sampling_params(self) -> SamplingParams:
        """SamplingParams for one sample (best_of is fanned out by the server): greedy unless sampling, then
        seeded (a seed drawn here where none was given, which details report, as TGI's), every token's logprob
        (TGI's tokens carry theirs), stop strings kept in the text, as TGI's are."""
        sampled = self.sampling()
        seed = self.seed if self.seed is not None or not sampled else random.randrange(SEED_MODULUS)
        return SamplingParams(
            max_tokens=self.max_new_tokens,
            temperature=(self.temperature or 1.0) if sampled else 0.0,
            top_p=self.top_p or 1.0, top_k=self.top_k or 0, typical_p=self.typical_p or 1.0,
            frequency_penalty=self.frequency_penalty or 0.0, repetition_penalty=self.repetition_penalty or 1.0,
            seed=None if seed is None else seed % SEED_MODULUS,
            stop=list(self.stop), include_stop_str_in_output=True,
            logprobs=self.top_n_tokens or 0, n=self.best_of or 1,
            prompt_logprobs=0 if self.decoder_input_details else None,
            structured_output=None if self.grammar is None else self.grammar.constraint(),
        )


class GenerateRequest(OpenAIRequest):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False  # the compat route's choice (/ streams as /generate_stream where true)

    def field_name(self, name: str) -> str:
        field = TGI_FIELDS.get(name)
        return name if field is None else field if field == "inputs" else f"parameters.{field}"

    @property
    def model(self) -> str | None:
        """The model a request names, as check_request and adapter_for read it: its adapter, else the base."""
        return self.parameters.adapter_id

    def unknown_fields(self) -> list[str]:
        return super().unknown_fields() + [f"parameters.{name}" for name in sorted(self.parameters.model_extra or {})]

    def invalid(self) -> tuple[str, str] | None:
        if not self.inputs:
            return "inputs", "`inputs` cannot be empty"
        if (problem := self.parameters.problem()) is not None:
            return f"parameters.{problem.split('`')[1]}", problem
        return None

    def unsupported(self) -> tuple[str, str] | None:
        if self.parameters.watermark:
            return "parameters.watermark", "`watermark` is not supported by this server"
        return None


TGIFinishReason = Literal["length", "eos_token", "stop_sequence"]


def finish_reason(reason: str | None, stop_reason: str | int | None) -> TGIFinishReason:
    """TGI's name of why a sample ended: a stop string is its stop_sequence, EOS and stop tokens its eos_token."""
    if reason == "length":
        return "length"
    return "stop_sequence" if isinstance(stop_reason, str) else "eos_token"
