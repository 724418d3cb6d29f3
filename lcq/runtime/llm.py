"""Offline generation for scripts and benchmarks: LLM(path).generate(prompts, params), and embeddings:
LLM(path).embed(prompts)."""
from __future__ import annotations

import itertools
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, field

from .config import EngineConfig
from .engine import LLMEngine
from .outputs import RequestOutput, TokenLogprob, Usage
from .sampling_params import SamplingParams


@dataclass
class Completion:
    """One prompt's reply (one of n). It also reads as vLLM's RequestOutput of a single output: `prompt`,
    `prompt_token_ids` and `outputs[0]` (this same object, with text, token_ids, finish_reason and logprobs), so
    that scripts written for vLLM's LLM run; with n above 1 a prompt has n Completions, not one of n outputs."""

    prompt_ids: list[int]
    prompt: str | None = None  # the prompt's text, where it was given as text (or rendered from chat messages)
    index: int = 0  # which of the prompt's n replies
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with SamplingParams.prompt_logprobs
    usage: Usage | None = None
    error: str | None = None  # why the request failed (finish_reason "error"), as the engine logged it

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.prompt_ids

    @property
    def outputs(self) -> list["Completion"]:
        """vLLM's RequestOutput.outputs: this reply, as its one CompletionOutput."""
        return [self]


class LLM:
    def __init__(self, model: str, **config):
        self.engine = LLMEngine(EngineConfig(model=str(model), **config))
        self.tokenizer = self.engine.tokenizer
        self._request_ids = itertools.count()  # never reused: a call that was interrupted leaves no clash

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults (vLLM's name)."""
        return self.engine.default_params()

    def load_lora_adapter(self, name: str, folder: str, load_inplace: bool = False) -> None:
        """Serve a PEFT LoRA folder as `name` (SamplingParams.lora): one of max_cpu_loras adapters, each run
        in one of max_loras slots; load_inplace (vLLM's): in place of the adapter served under that name."""
        self.engine.load_lora_adapter(name, self.engine.read_lora_adapter(name, str(folder), load_inplace),
                                      load_inplace)

    def unload_lora_adapter(self, name: str) -> None:
        """Stop serving `name`: requests may no longer name it, and its slot is freed once none runs with it."""
        self.engine.unload_lora_adapter(name)

    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = False
                 ) -> list[Completion]:
        """One Completion per prompt, or with params.n > 1 that prompt's n in turn (seeded: seed, seed + 1, ...);
        text is tokenized with the tokenizer's special tokens (a BOS where it adds one), as vLLM's LLM does.
        A prompt is a string, token ids, or vLLM's {"prompt": text} or {"prompt_token_ids": ids}; one may be
        given alone. sampling_params (vLLM's name) default to get_default_sampling_params(); a list gives each
        prompt its own. use_tqdm: a progress bar of finished requests (vLLM shows one by default)."""
        prompts = _listed(prompts)
        params = self.engine.default_params() if sampling_params is None else sampling_params
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts: give one, or one each")
        requests, texts = [], []
        for prompt, p in zip(prompts, per_prompt):
            p.validate(self.engine.max_logprobs)  # (n among the rest) before it is fanned out
            samples = p.samples()
            requests += [(self._ids(prompt), sample) for sample in samples]
            texts += [(prompt if isinstance(prompt, str) else None, index) for index in range(len(samples))]
        request_ids = self._add(requests)
        results = {request_id: Completion(prompt_ids=list(ids), prompt=text, index=index,
                                          logprobs=[] if sample.logprobs is not None else None)
                   for request_id, (ids, sample), (text, index) in zip(request_ids, requests, texts)}
        for out in self._steps(request_ids, use_tqdm):
            done = results[out.request_id]
            done.token_ids += out.token_ids
            done.text += out.text
            if out.logprobs:
                done.logprobs += out.logprobs
            if out.prompt_logprobs is not None:
                done.prompt_logprobs = out.prompt_logprobs
            if out.finished:
                done.finish_reason, done.stop_reason, done.usage = out.finish_reason, out.stop_reason, out.usage
                done.error = out.error
        return list(results.values())

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = False, chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None,
             tools: list[dict] | None = None) -> list[Completion]:
        """vLLM's LLM.chat: each conversation (a list of {"role", "content"} messages; one given alone) rendered by
        the chat template (the model's, or `chat_template`), then generated as generate() does, its text as the
        Completion's prompt. continue_final_message: the last message is the reply's beginning, not a turn."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        rendered = [self.tokenizer.apply_chat_template(
            conversation, tokenize=False, chat_template=chat_template, tools=tools,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message, **(chat_template_kwargs or {}))
            for conversation in conversations]
        ids = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]  # (the template's BOS)
        params = self.engine.default_params() if sampling_params is None else sampling_params
        outputs = self.generate(ids, params, use_tqdm)
        counts = [p.n for p in params] if isinstance(params, (list, tuple)) else [params.n] * len(rendered)
        for output, text in zip(outputs, [text for text, count in zip(rendered, counts) for _ in range(count)]):
            output.prompt = text
        return outputs

    def embed(self, prompts: str | list[int] | list[str] | list[list[int]], use_tqdm: bool = False
              ) -> list[list[float]]:
        """Each prompt's embedding (SamplingParams.embed: the last token's final hidden state, L2-normalized);
        text is tokenized with the tokenizer's special tokens, as embedding models expect."""
        requests = [(self._ids(prompt), SamplingParams(max_tokens=1, embed=True)) for prompt in _listed(prompts)]
        request_ids = self._add(requests)
        vectors: dict[str, list[float]] = {}
        for out in self._steps(request_ids, use_tqdm):
            if out.finished:
                if out.embedding is None:
                    raise RuntimeError(f"embedding request {out.request_id} failed: {out.error}")
                vectors[out.request_id] = out.embedding
        return [vectors[request_id] for request_id in request_ids]

    def _ids(self, prompt: str | list[int]) -> list[int]:
        return self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else prompt

    def _add(self, requests: list[tuple[list[int], SamplingParams]]) -> list[str]:
        """Add the requests, all or none, under ids no earlier call used; their ids, in order."""
        request_ids = [str(next(self._request_ids)) for _ in requests]
        try:
            for request_id, (ids, params) in zip(request_ids, requests):
                self.engine.add_request(request_id, ids, params)
        except Exception:  # all or nothing: what was added is taken back, so the engine stays usable
            self._abort(request_ids)
            raise
        return request_ids

    def _steps(self, request_ids: list[str], use_tqdm: bool) -> Iterator[RequestOutput]:
        """The engine's outputs until it has no work left. Interrupted (Ctrl-C, or an error), it aborts the
        requests, so that they hold no blocks and the next call starts clean."""
        progress = _progress_bar(len(request_ids)) if use_tqdm else None
        try:
            while self.engine.has_work():
                for out in self.engine.step():
                    if out.finished and progress is not None:
                        progress.update()
                    yield out
        except BaseException:
            self._abort(request_ids)
            raise
        finally:
            if progress is not None:
                progress.close()

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.engine.abort(request_id)


def _listed(prompts) -> list[str | list[int]]:
    """The prompts, each text or token ids: one given alone (a string, token ids, or a dict) as a list of one, and
    vLLM's {"prompt": text} and {"prompt_token_ids": ids} as what they hold, as vLLM's LLM takes them (a dict was
    read as the text of its keys)."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts
                                            and isinstance(prompts[0], numbers.Integral)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts are a list, or one prompt, not {type(prompts).__name__}")
    return [_prompt(prompt) for prompt in prompts]


def _prompt(prompt) -> str | list[int]:
    if isinstance(prompt, dict):
        for key, kinds in (("prompt", str), ("prompt_token_ids", (list, tuple))):
            if set(prompt) == {key} and isinstance(prompt[key], kinds):
                return _prompt(prompt[key])
        raise TypeError(f"a prompt dict is {{'prompt': text}} or {{'prompt_token_ids': ids}}, not one with "
                        f"{sorted(prompt)}")
    if not isinstance(prompt, (str, list, tuple)):
        raise TypeError(f"a prompt is text, token ids or a dict, not {type(prompt).__name__}")
    return list(prompt) if isinstance(prompt, tuple) else prompt


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="Requests", unit="req")
