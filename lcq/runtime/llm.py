"""Offline generation for scripts and benchmarks: LLM(path).generate(prompts, params), and embeddings:
LLM(path).embed(prompts)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .config import EngineConfig
from .engine import LLMEngine
from .outputs import TokenLogprob, Usage
from .sampling_params import SamplingParams


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with SamplingParams.prompt_logprobs
    usage: Usage | None = None


class LLM:
    def __init__(self, model: str, **config):
        self.engine = LLMEngine(EngineConfig(model=str(model), **config))
        self.tokenizer = self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults (vLLM's name)."""
        return self.engine.default_params()

    def load_lora_adapter(self, name: str, folder: str) -> None:
        """Serve a PEFT LoRA folder as `name` (SamplingParams.lora): one of max_cpu_loras adapters, each run
        in one of max_loras slots."""
        self.engine.load_lora_adapter(name, self.engine.read_lora_adapter(name, str(folder)))

    def unload_lora_adapter(self, name: str) -> None:
        """Stop serving `name`: requests may no longer name it, and its slot is freed once none runs with it."""
        self.engine.unload_lora_adapter(name)

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Completion]:
        """One Completion per prompt, or with params.n > 1 that prompt's n in turn (seeded: seed, seed + 1, ...);
        text is tokenized with the tokenizer's special tokens (a BOS where it adds one), as vLLM's LLM does.
        params default to get_default_sampling_params(); a list gives each prompt its own."""
        params = params or self.engine.default_params()
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts: give one, or one each")
        results: dict[str, Completion] = {}
        try:
            for prompt, p in zip(prompts, per_prompt):
                ids = self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else prompt
                p.validate()  # (n among the rest) before it is fanned out
                for sample in p.samples():
                    request_id = str(len(results))
                    self.engine.add_request(request_id, ids, sample)
                    results[request_id] = Completion(prompt_ids=list(ids),
                                                     logprobs=[] if p.logprobs is not None else None)
        except Exception:  # all or nothing: what was added is taken back, so the engine stays usable
            for request_id in results:
                self.engine.abort(request_id)
            raise
        while self.engine.has_work():
            for out in self.engine.step():
                done = results[out.request_id]
                done.token_ids += out.token_ids
                done.text += out.text
                if out.logprobs:
                    done.logprobs += out.logprobs
                if out.prompt_logprobs is not None:
                    done.prompt_logprobs = out.prompt_logprobs
                if out.finished:
                    done.finish_reason, done.stop_reason, done.usage = out.finish_reason, out.stop_reason, out.usage
        return list(results.values())

    def embed(self, prompts: list[str] | list[list[int]]) -> list[list[float]]:
        """Each prompt's embedding (SamplingParams.embed: the last token's final hidden state, L2-normalized);
        text is tokenized with the tokenizer's special tokens, as embedding models expect."""
        try:
            for i, prompt in enumerate(prompts):
                ids = self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else prompt
                self.engine.add_request(str(i), ids, SamplingParams(max_tokens=1, embed=True))
        except Exception:  # as generate: none stays behind
            for i in range(len(prompts)):
                self.engine.abort(str(i))
            raise
        vectors: dict[str, list[float]] = {}
        while self.engine.has_work():
            for out in self.engine.step():
                if out.finished:
                    if out.embedding is None:
                        raise RuntimeError(f"embedding request {out.request_id} failed: {out.error}")
                    vectors[out.request_id] = out.embedding
        return [vectors[str(i)] for i in range(len(prompts))]

