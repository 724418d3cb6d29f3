"""The runtime: token-exact generation, batching, chunked prefill, preemption, prefix caching,
stop handling, sampling and the async engine."""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import json
import gc
import os
import platform
import random
import re
import resource
import shutil
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch

from lcq.errors import UserError
from lcq.format import FormatError
from lcq.kernels import cpu_half, cpu_index, cpu_ops, native
from lcq.kernels.cpu_matmul import products_available, shuffles_only
from lcq.quantizer.reference import load_reference_model
from lcq.runtime import (LLM, AdapterNotFoundError, AsyncEngine, ContextLengthError, EngineConfig, EngineNotReadyError,
                         QueueFullError, SamplingParams)
from lcq.runtime.block_manager import BlockManager, block_key
from lcq.runtime.cuda_graphs import graph_batch_sizes
from lcq.runtime.detokenizer import IncrementalDetokenizer, TokenBytes
from lcq.runtime.engine import bad_word_token_ids
from lcq.runtime.host_memory import available_memory_bytes, return_freed_memory, zeroed_pages
from lcq.runtime.sampler import apply_penalties, draw, filtered_probs, keep_top, keep_top_sorted, sample
from lcq.runtime.sampling_params import StructuredOutput
from lcq.runtime import structured_output
from lcq.runtime.scheduler import Scheduler
from lcq.runtime.sequence import Sequence
from tests.tiny_model import cuda_llm, make_tiny_adapter, make_tiny_hf, make_tiny_lcq, make_tiny_multimodal, \
    merge_adapter, phi3_longrope

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
EOS_ID = 2  # the tiny tokenizer's <|im_end|>
# fp32 KV cache and products, as transformers runs (the CPU defaults are an fp16 cache and, with
# AVX512_BF16, bf16 operands in large products).
FP32 = dict(kv_cache_dtype="float32", cpu_matmul_dtype="float32")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [30, 31, 32], [40, 41, 42, 43, 44, 45, 46]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("runtime") / "hf", "llama")


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory):
    """The tiny Llama from fp16 weights: on CPU its decode steps run the one-call C step."""
    return make_tiny_hf(tmp_path_factory.mktemp("runtime16") / "hf", "llama", dtype=torch.float16)


@pytest.fixture(scope="module")
def llm(tiny):
    """fp32 throughout, as transformers runs."""
    return LLM(str(tiny), block_size=8, **FP32)


@pytest.fixture
def one_call_steps(monkeypatch) -> list[bool]:
    """The one-call C decode steps that run, one entry each: whether the step had LoRA adapter rows."""
    from lcq.models.cpu_decode import CpuDecoder

    steps: list[bool] = []
    decode = CpuDecoder.__call__
    monkeypatch.setattr(CpuDecoder, "__call__", lambda self, input_ids, positions, context, embed:
                        steps.append(context.lora is not None) or decode(self, input_ids, positions, context, embed))
    return steps


def _one_call_builds() -> bool:
    """Whether the one-call C decode step builds here for fp16 or LCQ weights."""
    return cpu_ops.usable() and cpu_half.enabled()


def _transformers_greedy(folder, prompt: list[int], n: int, model=None) -> list[int]:
    """transformers' greedy tokens with EOS allowed but not stopping, as our `ignore_eos=True` does
    (of `model`, else the folder's).

    `min_new_tokens` would not do: it forbids EOS, so the two differ wherever EOS is the argmax."""
    model = model or load_reference_model(folder)
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id, config.max_new_tokens, config.do_sample = [], n, False
    out = model.generate(torch.tensor([prompt]), generation_config=config)
    assert out.shape[1] == len(prompt) + n
    return out[0, len(prompt):].tolist()


def _pool_is_full(engine) -> bool:
    stats = engine.stats()
    return stats.num_free_blocks == stats.num_total_blocks and stats.num_running == stats.num_waiting == 0


@pytest.mark.parametrize("shape", ["qwen3-30b-a3b", "deepseek-v2-lite", "qwen3-next-80b-a3b"])
def test_the_benchmarks_random_mixtures_load_and_generate(tmp_path, shape):
    """bench/generate.py --gpu-moe's random checkpoints (here at tiny widths): a Qwen3-MoE one, a DeepSeek-V2
    one with latent attention, a dense first layer and shared experts, and a Qwen3.5 one with linear
    attention in three layers of four, read as such and served."""
    from bench.generate import MOE_SHAPES
    from bench.random_model import write_random_llama
    from lcq.models.config import ModelConfig

    tiny = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, vocab_size=384, max_position_embeddings=256)
    tiny.update({"qwen3-30b-a3b": dict(head_dim=32, num_experts=4, num_experts_per_tok=2),
                 "deepseek-v2-lite": dict(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                                          n_routed_experts=4, num_experts_per_tok=2),
                 "qwen3-next-80b-a3b": dict(num_hidden_layers=4, head_dim=32, num_experts=4, num_experts_per_tok=2,
                                            moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                                            linear_value_head_dim=16)}[shape])
    folder = write_random_llama(tmp_path / "m", quantized=True, bits=2, rank=2, group_size=32,
                                shapes=dict(MOE_SHAPES[shape], **tiny))
    config = ModelConfig.from_folder(folder)
    assert config.num_experts == 4 and (config.latent is not None) == (shape == "deepseek-v2-lite")
    assert config.moe_layers == {"qwen3-30b-a3b": [True] * 2, "deepseek-v2-lite": [False, True],
                                 "qwen3-next-80b-a3b": [True] * 4}[shape]
    assert config.linear_layers == ([True, True, True, False] if shape == "qwen3-next-80b-a3b" else [False] * 2)
    out = LLM(str(folder), **FP32).generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 3


@pytest.mark.parametrize("head_bits", [0, 4])
def test_the_benchmarks_random_tied_llama_loads_and_generates(tmp_path, head_bits):
    """bench/cpu_model_shapes.py's random checkpoints (Llama 3.2 1B's form at tiny widths): the head tied to the
    table, in fp16 or packed (the table then looked up from it), read as such and served."""
    from bench.random_model import LLAMA32_1B, write_random_llama
    from lcq.format import CheckpointReader

    tiny = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=32, vocab_size=384, max_position_embeddings=256)
    folder = write_random_llama(tmp_path / "m", quantized=True, bits=2, rank=2, group_size=32,
                                shapes=dict(LLAMA32_1B, **tiny), head_bits=head_bits)
    reader = CheckpointReader(folder)
    assert reader.config["tie_word_embeddings"] and not reader.has("lm_head.weight")
    assert reader.has("lm_head.qweight") == bool(head_bits) == (not reader.has("model.embed_tokens.weight"))
    llm = LLM(str(folder), **FP32)
    assert (llm.engine.runner.model.packed_head is not None) == bool(head_bits)
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 3


def test_greedy_matches_transformers_full_precision(tiny, llm):
    outs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == _transformers_greedy(tiny, prompt, 12)
        assert out.finish_reason == "length" and out.usage.completion_tokens == 12


def test_greedy_matches_transformers_lcq(tmp_path):
    """Also: the engine's CPU layers keep only their cached weights (the packed tensors dropped)."""
    from lcq.kernels import LCQLinear

    folder = make_tiny_lcq(tmp_path, "qwen2", bits=3, rank=2, group_size=32)
    llm = LLM(str(folder), block_size=8, **FP32)
    outs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == _transformers_greedy(folder, prompt, 12)
    layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, LCQLinear)]
    assert layers and all(m.layer is None for m in layers)


def test_multimodal_checkpoint_generates_with_its_wrappers_transformers_model(tmp_path):
    """A Gemma 3 4B-style folder served text-only: the engine's greedy tokens are those of transformers'
    Gemma3ForConditionalGeneration on the same folder, and the chat template is the processor's."""
    import transformers

    folder = make_tiny_multimodal(tmp_path, "gemma3", "sparse")
    llm = LLM(str(folder), block_size=8, **FP32)
    reference = transformers.Gemma3ForConditionalGeneration.from_pretrained(folder).eval()
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, GREEDY)):
        assert out.token_ids == _transformers_greedy(folder, prompt, 12, reference)
    assert llm.engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False) == \
        "<|im_start|>user\nHi<|im_end|>\n"


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "smollm3", "olmo3", "hunyuan", "bamba", "lfm2", "qwen3_5",
                                  "qwen3_moe", "gpt_oss", "llama4", "cohere2", "stablelm", "stablelm_parallel"])
def test_greedy_matches_transformers_through_the_one_call_decode_step(tmp_path, one_call_steps, arch):
    """Gemma 3 (a 7-token sliding-window layer with its own rotary base, then a full one), Gemma 2 (the
    same windows, scores and logits soft-capped), SmolLM3 (a layer with rotary embedding, then a NoPE
    one), OLMo 3 (three 7-token sliding-window layers, then a full one with YaRN), Hunyuan (q/k norms
    after the rotary embedding), hybrids with recurrent layers (Bamba's Mamba-2, LFM2's short convolutions,
    Qwen3.5's gated delta rule beside attention that gates its output) and mixtures of experts (Qwen3-MoE's;
    gpt-oss's with attention sinks, a 7-token window every other layer, biases and a clamped SwiGLU; Llama 4's with
    chunked attention and the query temperature in its NoPE layer only), LayerNorm models (Cohere 2's attention and
    MLP side by side, 7-token windows in its rotary layers; StableLM's biased norms, sequential and side by side)
    from fp16 weights:
    the engine's decode steps run the one-call C step where the C kernels build, and its greedy tokens
    are transformers'."""
    folder = make_tiny_hf(tmp_path, arch, dtype=torch.float16,
                          **({"sliding_window": 7} if arch.startswith(("gemma", "olmo", "cohere2")) else {}))
    llm = LLM(str(folder), block_size=8, **FP32)
    outs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == _transformers_greedy(folder, prompt, 12)
    assert (llm.engine.runner.model.cpu_decoder is not None) == _one_call_builds()
    assert (len(one_call_steps) >= 11) == _one_call_builds()  # every decode step: 11 per sequence, batched or not


def test_max_model_len_past_the_models_context_is_refused(tiny):
    """The rotary tables end at the model's context (vLLM refuses the same): one clear error at start,
    not an index error in a step once a sequence gets there."""
    with pytest.raises(UserError, match="max_model_len 1000 is longer than the model's context of 256 tokens"):
        LLM(str(tiny), max_model_len=1000)


def test_the_offline_api_is_imported_from_the_package_as_vllms():
    """`from lcq import LLM, SamplingParams`, as docs/api.md's offline examples write it; `import lcq` alone does
    not load torch (the CLI's start and the format's readers stay light)."""
    import subprocess
    import sys

    probe = ("import sys, lcq; light = 'torch' not in sys.modules; from lcq import LLM, SamplingParams; "
             "from lcq import runtime; print(light, LLM is runtime.LLM, SamplingParams is runtime.SamplingParams)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True
                          ).stdout.split() == ["True", "True", "True"]
    import lcq

    with pytest.raises(AttributeError, match="no attribute 'Engine'"):
        getattr(lcq, "Engine")


def test_offline_outputs_and_chat_read_as_vllms(llm):
    """vLLM's offline examples run: each output's prompt, prompt_token_ids and outputs[0] (text, token_ids,
    finish_reason), and LLM.chat rendering conversations with the chat template (one alone, or several)."""
    greedy = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    outputs = llm.generate(["Hello, my name is", [1, 2, 3]], SamplingParams(max_tokens=5, n=2, seed=1))
    assert [(o.prompt, o.index) for o in outputs] == [("Hello, my name is", 0), ("Hello, my name is", 1),
                                                      (None, 0), (None, 1)]
    first = outputs[0].outputs[0]
    assert first.text == outputs[0].text and len(first.token_ids) == 5 and first.finish_reason == "length"
    assert outputs[2].prompt_token_ids == [1, 2, 3]
    conversation = [{"role": "user", "content": "Hi"}]
    rendered = llm.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    (chat,) = llm.chat(conversation, greedy)
    assert chat.prompt == rendered and chat.prompt_ids == llm.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert chat.token_ids == llm.generate([chat.prompt_ids], greedy)[0].token_ids
    two = llm.chat([conversation, conversation + [{"role": "assistant", "content": "Hel"}]], greedy,
                   continue_final_message=True)
    assert two[0].token_ids != two[1].token_ids and two[1].prompt.rstrip().endswith("Hel")
    # vLLM's offline structured outputs: SamplingParams(structured_outputs=StructuredOutputsParams(...))
    from lcq import StructuredOutputsParams

    pytest.importorskip("xgrammar")
    words = ["so-so (meh)", "great"]
    picked = llm.generate(["Review:"] * 2, SamplingParams(max_tokens=12, temperature=0.9, seed=3,
                                                       structured_outputs=StructuredOutputsParams(choice=words)))
    assert {o.text for o in picked} <= set(words) and all(o.finish_reason == "stop" for o in picked)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    shaped = llm.generate(["JSON:"], SamplingParams(max_tokens=16, temperature=0,
                                                    structured_outputs=StructuredOutputsParams(json=schema)))
    assert isinstance(json.loads(shaped[0].text)["ok"], bool)
    with pytest.raises(ValueError, match="one constraint, got regex, choice"):
        SamplingParams(structured_outputs=StructuredOutputsParams(regex="a", choice=["b"]))


def test_offline_prompts_as_vllm_takes_them(tiny, llm, tmp_path):
    """vLLM's {"prompt": text} and {"prompt_token_ids": ids} are what they hold (they were read as the text of their
    keys); other prompt types, and ids that are not integers (5.9 ran as token 5, then the reply failed to decode
    and came back empty), are refused at once; a failed request says why; a folder that is none, or holds a broken
    config.json, is said so (the tokenizer's loader blamed the Hub)."""
    greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    ids = llm.tokenizer("Hello")["input_ids"]
    plain = llm.generate(["Hello", [5, 6, 7]], greedy)
    as_dicts = llm.generate([{"prompt": "Hello"}, {"prompt_token_ids": [5, 6, 7]}], greedy)
    assert [(c.prompt_ids, c.token_ids) for c in as_dicts] == [(c.prompt_ids, c.token_ids) for c in plain]
    assert plain[0].prompt_ids == ids and llm.generate({"prompt_token_ids": [5, 6, 7]}, greedy)[0].prompt_ids == [5, 6, 7]
    assert llm.embed({"prompt": "Hello"}) == llm.embed("Hello")
    as_tuples = llm.generate(("Hello", (5, 6, 7)), greedy)  # any sequence of prompts, and of ids, as vLLM takes them
    assert [(c.prompt_ids, c.token_ids) for c in as_tuples] == [(c.prompt_ids, c.token_ids) for c in plain]
    for prompt in ({"text": "Hello"}, {"prompt": [5]}, 5.0, torch.tensor([5, 6])):
        with pytest.raises(TypeError, match="prompt"):
            llm.generate([prompt], greedy)
    for bad in ([5.9, 6, 7], [5.0, 6.0], [True, 6]):
        with pytest.raises(ValueError, match="prompt token ids must be integers"):
            llm.generate([bad], greedy)
    with pytest.raises(ValueError, match="0 SamplingParams for 2 prompts"):
        llm.generate(["a", "b"], [])
    failed = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, allowed_token_ids=[2], min_tokens=2,
                                                      stop_token_ids=[2]))[0]
    assert failed.finish_reason == "error" and "leave no token to generate" in failed.error
    assert plain[0].error is None
    with pytest.raises(UserError, match="no such model folder"):
        LLM(str(tmp_path / "missing"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{nope")
    with pytest.raises(UserError, match="config.json: invalid JSON"):
        LLM(str(broken))


@pytest.mark.parametrize("partial", [1.0, 0.75])
def test_longrope_factors_are_those_of_the_context_served(tmp_path, partial):
    """A Phi-3.5-style model (LongRoPE over an original context of 32; with partial 0.75 Phi-4-mini's
    partial rotary embedding) from fp16 weights, through the one-call C decode step where it builds: served
    with max_model_len 32, the short factors, and its greedy tokens on prompts that stay within 32 tokens
    are transformers'; served with its whole context (256), the long ones, and on prompts past 32 tokens
    transformers' too (transformers picks the factors by each forward pass's length, we by the context
    served, as vLLM does)."""
    import transformers

    folder = make_tiny_hf(tmp_path, "phi3", dtype=torch.float16, **phi3_longrope(32, partial))
    reference = transformers.Phi3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    within = LLM(str(folder), block_size=8, max_model_len=32, **FP32)
    for prompt, out in zip(PROMPTS, within.generate(PROMPTS, GREEDY)):  # at most 18 + 12 tokens
        assert out.token_ids == _transformers_greedy(folder, prompt, 12, reference)
    past = LLM(str(folder), block_size=8, **FP32)
    assert past.engine.max_model_len == 256
    prompts = [[(5 * i + 1) % 300 + 3 for i in range(n)] for n in (33, 40)]
    for prompt, out in zip(prompts, past.generate(prompts, GREEDY)):
        assert out.token_ids == _transformers_greedy(folder, prompt, 12, reference)


@pytest.mark.parametrize("kind", ["hf", "lcq"])
def test_embeddings_are_the_last_tokens_final_hidden_state_normalized(tmp_path, kind):
    """LLM.embed: transformers' last hidden state (after the final norm) of each prompt's last token,
    L2-normalized (for LCQ, of the dequantized model); the same when batched with other lengths and with
    generation requests, and again from the prefix cache."""
    folder = make_tiny_hf(tmp_path / "hf", "qwen3") if kind == "hf" else \
        make_tiny_lcq(tmp_path, "qwen3", bits=4, rank=2, group_size=32)
    reference = load_reference_model(folder)
    llm = LLM(str(folder), block_size=8, **FP32)
    prompts = ["The capital of France is Paris.", "Hello", PROMPTS[0]]

    def expected(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.nn.functional.normalize(reference.model(torch.tensor([ids])).last_hidden_state[0, -1], dim=0)

    together = llm.embed(prompts)
    for prompt, vector in zip(prompts, together):
        ids = llm.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else prompt
        torch.testing.assert_close(torch.tensor(vector), expected(ids), atol=2e-5, rtol=1e-4)
        assert llm.embed([prompt])[0] == pytest.approx(vector, abs=1e-5)
    llm.engine.add_request("gen", PROMPTS[1], GREEDY)
    llm.engine.add_request("emb", PROMPTS[0], SamplingParams(max_tokens=1, embed=True))
    outputs = []
    while llm.engine.has_work():
        outputs += llm.engine.step()
    generated = [t for o in outputs if o.request_id == "gen" for t in o.token_ids]
    assert generated == _transformers_greedy(folder, PROMPTS[1], 12, reference)
    embedded = next(o for o in outputs if o.request_id == "emb")
    assert embedded.token_ids == [] and embedded.usage.completion_tokens == 0
    assert embedded.usage.cached_tokens > 0 and embedded.embedding == pytest.approx(together[2], abs=1e-5)
    assert _pool_is_full(llm.engine)


def test_an_embedding_that_is_not_finite_fails_its_request(tmp_path):
    """A prompt whose final hidden state overflows fails its request as a generation with no finite logit does
    (it came back 200 with null, or NaN in base64, and went on into vector indexes)."""
    llm = LLM(str(make_tiny_hf(tmp_path / "hf", "qwen3")), block_size=8, **FP32)
    final_norm = dict(llm.engine.runner.model.named_parameters())["norm.weight"]
    with torch.no_grad():
        final_norm[0] = float("inf")
    llm.engine.add_request("emb", PROMPTS[0], SamplingParams(max_tokens=1, embed=True))
    outputs = []
    while llm.engine.has_work():
        outputs += llm.engine.step()
    assert outputs[-1].finish_reason == "error" and outputs[-1].embedding is None and _pool_is_full(llm.engine)


def test_embedding_model_saved_from_the_base_model(tmp_path):
    """Qwen3-Embedding 4B / 8B files hold the base model (layers.*, embed_tokens.*, norm.*, no head, the
    config untied): they load with the head tied to the table, and embed as the CausalLM folder does."""
    from safetensors.torch import load_file, save_file

    from lcq.format import CheckpointReader

    folder = make_tiny_hf(tmp_path / "causal", "qwen3")
    base = tmp_path / "base"
    base.mkdir()
    for item in folder.iterdir():
        if item.name != "model.safetensors":
            (base / item.name).write_bytes(item.read_bytes())
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({name.removeprefix("model."): t for name, t in tensors.items() if name != "lm_head.weight"},
              str(base / "model.safetensors"))
    assert not json.loads((base / "config.json").read_text())["tie_word_embeddings"]
    reader = CheckpointReader(base)
    assert reader.config["tie_word_embeddings"] and reader.has("model.layers.0.self_attn.q_proj.weight")
    texts = ["The capital of France is Paris.", "Hello"]
    expected = LLM(str(folder), block_size=8, **FP32).embed(texts)
    for got, want in zip(LLM(str(base), block_size=8, **FP32).embed(texts), expected):
        assert got == pytest.approx(want, abs=1e-6)


def test_ignore_eos_keeps_generating_after_eos(tmp_path):
    """A model whose EOS is the greedy choice: with `ignore_eos` we emit EOS and go on, as transformers does."""
    from safetensors.torch import load_file, save_file

    folder = make_tiny_hf(tmp_path / "hf", "llama")
    model = load_reference_model(folder)
    with torch.no_grad():
        first = int(model(torch.tensor([PROMPTS[1]])).logits[0, -1].argmax())
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"][EOS_ID] = 3 * weights["lm_head.weight"][first]  # EOS now beats the old argmax
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    out = LLM(str(folder), block_size=8, **FP32).generate([PROMPTS[1]], GREEDY)[0]
    assert out.token_ids[0] == EOS_ID and out.finish_reason == "length"
    assert out.token_ids == _transformers_greedy(folder, PROMPTS[1], 12)


def test_batched_equals_alone_and_chunked_and_preempted(tiny, llm, tmp_path):
    together = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in PROMPTS]
    assert together == alone
    chunked = LLM(str(tiny), block_size=8, max_num_batched_tokens=5, **FP32)
    assert [o.token_ids for o in chunked.generate(PROMPTS, GREEDY)] == together
    # A pool of 6 blocks of 8 cannot hold all three sequences at once: someone gets preempted.
    small = LLM(str(tiny), block_size=8, kv_cache_memory_gb=6 * small_block_bytes(llm) / 2**30,
                **FP32)
    assert small.engine.blocks.num_total_blocks == 6
    assert [o.token_ids for o in small.generate(PROMPTS, GREEDY)] == together
    assert small.engine.stats().num_preemptions_total > 0
    assert _pool_is_full(small.engine)
    # the same pool set outright, in blocks (vLLM's num_gpu_blocks_override) or in tokens (TGI's
    # max_batch_total_tokens, 41-48 of them in 6 blocks of 8), whatever the memory setting says
    for pool in ({"num_gpu_blocks_override": 6}, {"max_batch_total_tokens": 41}, {"max_batch_total_tokens": 48}):
        sized = LLM(str(tiny), block_size=8, kv_cache_memory_gb=2.0, **pool, **FP32)
        assert sized.engine.blocks.num_total_blocks == 6 and sized.engine.max_model_len == 48
        assert [o.token_ids for o in sized.generate(PROMPTS, GREEDY)] == together
    with pytest.raises(ValueError, match="both size the KV cache: set one"):
        LLM(str(tiny), num_gpu_blocks_override=6, max_batch_total_tokens=48, **FP32)
    # the model's context is cut to what the pool holds for one sequence; a configured one is refused, as
    # vLLM refuses it (it was served shorter, a 400 quoting a context nobody set)
    assert small.engine.max_model_len == 48 < small.engine.runner.model_config.max_position_embeddings
    with pytest.raises(UserError, match="max_model_len 100 is longer than the KV cache .6 blocks of 8 tokens. holds "
                                        "at most 48 tokens"):
        LLM(str(tiny), block_size=8, kv_cache_memory_gb=6 * small_block_bytes(llm) / 2**30, max_model_len=100,
            **FP32)
    # a pool that holds under 2 tokens of one sequence (a model of more layer groups than blocks) is refused at start:
    # it started with a context of 0, healthy, refusing every request as too long
    gemma = make_tiny_hf(tmp_path / "gemma3", "gemma3", sliding_window=32, num_hidden_layers=6,
                         layer_types=["sliding_attention"] * 5 + ["full_attention"])  # 6 groups, 2 blocks
    with pytest.raises(UserError, match="holds at most 0 tokens of one sequence; give the cache more memory"):
        LLM(str(gemma), kv_cache_memory_gb=1e-9, **FP32)


def _scripted_run(engine, requests: dict[str, tuple[list[int], SamplingParams]], joins: dict[int, list[str]],
                  aborts: dict[int, list[str]], usages: dict | None = None
                  ) -> tuple[dict[str, tuple], list[set[str]], int]:
    """Each request's (token ids, text, finish reason, logprobs) from an engine stepped to the end, with
    requests added (joins) and aborted (aborts) after the given steps; which requests each step gave tokens;
    and how many steps were launched ahead of the tokens before them. usages: filled with each finished
    request's usage."""
    outputs: dict[str, list] = {}
    timeline: list[set[str]] = []

    def take(out) -> None:
        if usages is not None and out.usage is not None:
            usages[out.request_id] = out.usage
        ids, text, reason, logprobs = outputs.setdefault(out.request_id, [[], "", None, []])
        outputs[out.request_id] = [ids + out.token_ids, text + out.text, out.finish_reason or reason,
                                   logprobs + [(p.token_id, p.logprob, p.top) for p in out.logprobs or []]]

    steps = ahead = 0
    for request_id in joins.get(0, []):
        engine.add_request(request_id, *requests[request_id])
    while engine.has_work() or any(step > steps for step in joins):
        timeline.append(set())
        for out in engine.step():
            take(out)
            if out.token_ids:
                timeline[-1].add(out.request_id)
        steps += 1
        ahead += engine.ahead is not None
        for request_id in joins.get(steps, []):
            engine.add_request(request_id, *requests[request_id])
        for request_id in aborts.get(steps, []):
            if (out := engine.abort(request_id)) is not None:  # (None: it had finished)
                take(out)
    return {request_id: tuple(value) for request_id, value in outputs.items()}, timeline, ahead


def test_async_scheduling_gives_the_tokens_of_steps_read_one_at_a_time(tiny, llm):
    """Decode steps launched from the last one's tokens before the host reads them (async scheduling: on by
    default on a GPU, here forced on a CPU, which computes the same steps in the same order) give the tokens,
    text, logprobs and finish reasons of steps read one at a time: greedy and seeded requests, a stop token and
    a stop string that end a sequence while its next step is under way, requests that join mid-way and one
    aborted, penalties, min_tokens and bad words (each step's draw waits for the tokens before it, its forward
    pass does not). The pool is full again."""
    greedy = llm.generate([PROMPTS[1]], GREEDY)[0]
    stop_token, stop_text = greedy.token_ids[4], greedy.text[12:15]
    requests = {
        "greedy": (PROMPTS[0], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=2)),
        "seeded": (PROMPTS[2], SamplingParams(max_tokens=18, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)),
        "stop token": (PROMPTS[1], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_token])),
        "stop string": (PROMPTS[1], SamplingParams(max_tokens=12, temperature=0, stop=[stop_text])),
        "joins": ([50, 51, 52, 53], SamplingParams(max_tokens=9, temperature=0.8, seed=3, ignore_eos=True)),
        "aborted": ([60, 61], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)),
        "penalties": ([70, 71, 72], SamplingParams(max_tokens=10, temperature=0, frequency_penalty=1.0,
                                                   ignore_eos=True)),
        "repetition": ([70, 71, 72], SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.3,
                                                    presence_penalty=1.5, ignore_eos=True)),
        "min_tokens": (PROMPTS[1], SamplingParams(max_tokens=12, temperature=0, min_tokens=6,
                                                  stop_token_ids=[stop_token])),
        "bad words": ([80, 81], SamplingParams(max_tokens=8, temperature=0, bad_words=["ab"], ignore_eos=True)),
    }
    joins = {0: ["greedy", "seeded", "stop token", "stop string", "aborted"], 6: ["joins"],
             12: ["penalties", "repetition", "min_tokens", "bad words"]}
    runs = [_scripted_run(LLM(str(tiny), block_size=8, async_scheduling=flag, **FP32).engine, requests, joins,
                          {9: ["aborted"]}) for flag in (False, True)]
    (one_at_a_time, _, none_ahead), (launched_ahead, _, ahead) = runs  # (a request may join a step later)
    assert none_ahead == 0 and ahead > 10
    assert launched_ahead == one_at_a_time
    assert one_at_a_time["stop token"][2] == one_at_a_time["stop string"][2] == "stop"
    assert len(one_at_a_time["stop token"][0]) == 5 and one_at_a_time["aborted"][2] == "abort"
    assert len(one_at_a_time["penalties"][0]) == 10 and len(one_at_a_time["greedy"][3]) == 20
    assert len(one_at_a_time["min_tokens"][0]) >= 6  # (its stop token held back: the fifth token is another)
    async_engine = LLM(str(tiny), block_size=8, async_scheduling=True, **FP32)
    assert [o.token_ids for o in async_engine.generate(PROMPTS, GREEDY)] == \
        [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert _pool_is_full(async_engine.engine) and async_engine.engine.ahead is None
    stopped = async_engine.generate([PROMPTS[1]], requests["stop token"][1])[0]  # (its next step was launched)
    assert stopped.token_ids == one_at_a_time["stop token"][0] and async_engine.engine.ahead is None
    # a prompt cached by an earlier request's steps, some launched ahead: the same tokens from its cached blocks
    again = async_engine.generate([PROMPTS[0]], GREEDY)[0]
    assert again.usage.cached_tokens > 0 and again.token_ids == llm.generate([PROMPTS[0]], GREEDY)[0].token_ids
    # An urgent request's last prompt chunk fills a step's token budget, so the step leaves a running decode out:
    # no step is launched ahead of that one (its successors had left the decode out until the urgent one ended)
    urgent = {"low": ([30, 31, 32], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, priority=5)),
              "urgent": ([(i * 7) % 300 + 3 for i in range(63)], SamplingParams(max_tokens=20, temperature=0,
                                                                               ignore_eos=True))}
    runs = [_scripted_run(LLM(str(tiny), block_size=8, async_scheduling=flag, max_num_batched_tokens=32,
                              scheduling_policy="priority", **FP32).engine, urgent, {0: ["low"], 3: ["urgent"]}, {})
            for flag in (False, True)]
    assert runs[0][0] == runs[1][0] and runs[1][2] > 10
    for _, timeline, _ in runs:  # (steps 0-29 give low its 30 tokens where no step leaves it out for long)
        left_out = [len(list(run)) for taken, run in itertools.groupby("low" in step for step in timeline[:31])
                    if not taken]
        assert max(left_out) <= 2, left_out
    # Unseeded draws under the priority policy: a step launched ahead takes its rows in the running order (the
    # urgent request first), as a scheduled step does, so each takes the random numbers it would take without
    # (prompt lookup holds steps from going ahead until the urgent request has joined: the same batches)
    sampled = lambda priority: SamplingParams(max_tokens=10, temperature=0.9, ignore_eos=True, priority=priority)
    ranked = {"low": ([41, 7, 300, 12], sampled(5)), "x": ([9, 33, 102], sampled(5)), "urgent": ([70, 71], sampled(0))}
    runs = [_scripted_run(LLM(str(tiny), block_size=8, async_scheduling=flag, scheduling_policy="priority",
                              num_speculative_tokens=2, speculative_disable_by_batch_size=3, **FP32).engine, ranked,
                          {0: ["low", "x"], 2: ["urgent"]}, {}) for flag in (False, True)]
    assert runs[0][:2] == runs[1][:2] and runs[1][2] > 3
    # A request that this step ends by length frees its slot for a waiting one, which joins the next step, launched
    # ahead or not (it had waited a step longer)
    slots = {"A": (PROMPTS[0], SamplingParams(max_tokens=3, temperature=0)), "B": (PROMPTS[1], GREEDY),
             "C": (PROMPTS[2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))}
    runs = [_scripted_run(LLM(str(tiny), block_size=8, async_scheduling=flag, max_num_seqs=2, **FP32).engine, slots,
                          {0: ["A", "B", "C"]}, {}) for flag in (False, True)]
    assert runs[0][:2] == runs[1][:2] and runs[1][2] > 3


def _random_params(rng: random.Random) -> SamplingParams:
    """One request's settings, drawn among those whose tokens do not depend on the batch: greedy or seeded draws,
    penalties, stops, logprobs, logit bias and bad words, min_tokens, a grammar, n = 2."""
    most = rng.randint(1, 40)
    seed = rng.randint(0, 99)
    return rng.choice([
        SamplingParams(max_tokens=most, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=most, temperature=1.0, seed=seed, ignore_eos=True),
        SamplingParams(max_tokens=most, temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, seed=seed, ignore_eos=True),
        SamplingParams(max_tokens=most, temperature=0, repetition_penalty=1.2, frequency_penalty=0.5,
                       presence_penalty=0.3, ignore_eos=True),
        SamplingParams(max_tokens=most, temperature=0, stop=["e", "th"], ignore_eos=True),
        SamplingParams(max_tokens=most, temperature=0, stop_token_ids=[rng.randint(3, 380) for _ in range(20)]),
        SamplingParams(max_tokens=most, temperature=0.9, seed=seed, min_tokens=rng.randint(0, most),
                       stop_token_ids=list(range(3, 200))),
        SamplingParams(max_tokens=most, temperature=0, logprobs=3, ignore_eos=True),
        SamplingParams(max_tokens=most, temperature=0, logit_bias={rng.randint(3, 380): 5.0}, bad_words=["th"],
                       ignore_eos=True),
        SamplingParams(max_tokens=most, temperature=0.8, seed=seed,
                       structured_output=StructuredOutput(regex="[a-e]{3,8}( [a-e]+)*")),
        SamplingParams(max_tokens=most, temperature=0.7, seed=seed, n=2, ignore_eos=True),
        SamplingParams(max_tokens=most, temperature=0, ignore_eos=True, priority=rng.randint(0, 3)),
    ])


def _random_workload(rng: random.Random, adapters: list[str]) -> tuple[dict, dict, dict, dict]:
    """(requests by id, engine settings, joins and aborts by step) for _scripted_run: prompts that share
    prefixes, some under a LoRA adapter or a cache salt, in a pool that may force preemption, with a token budget
    that may chunk prompts, prefix caching, async scheduling and prompt-lookup drafts each on or off."""
    prefixes = [[rng.randint(3, 380) for _ in range(rng.randint(0, 30))] for _ in range(3)]
    settings = dict(block_size=8, enable_prefix_caching=rng.random() < 0.8, async_scheduling=rng.random() < 0.5,
                    max_loras=rng.choice([1, 2]), **FP32)
    for name, value, chance in (("num_gpu_blocks_override", rng.choice([10, 14, 24]), 0.75),
                                ("max_num_batched_tokens", rng.choice([5, 16, 64]), 0.75),
                                ("num_speculative_tokens", 2, 0.3), ("max_num_seqs", rng.randint(1, 4), 0.3),
                                ("scheduling_policy", "priority", 0.3)):
        if rng.random() < chance:
            settings[name] = value
    requests, joins, aborts = {}, {}, {}
    for i in range(rng.randint(3, 12)):
        prompt = rng.choice(prefixes) + [rng.randint(3, 380) for _ in range(rng.randint(1, 25))]
        params = dataclasses.replace(
            _random_params(rng), lora=rng.choice([None, *adapters]),
            cache_salt=rng.choice([None, None, None, "one", "two"]))
        if settings.get("scheduling_policy") != "priority":
            params = dataclasses.replace(params, priority=0)
        joined, aborted = rng.choice([0, 0, 1, 3, 7, 15]), rng.randint(1, 30) if rng.random() < 0.2 else None
        for j, one in enumerate(params.samples()):
            requests[f"{i}.{j}"] = (prompt, one)
            joins.setdefault(joined, []).append(f"{i}.{j}")
            if aborted is not None:
                aborts.setdefault(aborted, []).append(f"{i}.{j}")
    return requests, settings, joins, aborts


@pytest.mark.parametrize("weights", ["fp32", "lcq-w4"])
def test_random_workloads_give_each_request_its_tokens_alone(tiny, tmp_path, weights):
    """Random mixes of requests and engine settings (_random_workload: requests joining and aborted mid-way,
    shared prefixes, adapters and cache salts, preemption, chunked prefill, prefix caching, async scheduling,
    drafts, priorities) give each request the tokens, text and finish reason it gets alone in a roomy engine
    without the prefix cache (logprobs to 1e-3: rows batched differently round differently), an aborted one a
    prefix of them, one longer than the pool's context those cut there; the pool is full after each. The features
    interact where no scripted test looks: the seeds' runs preempt, hit the prefix cache and draft. LCQ_TEST_WORKLOADS
    raises the number of seeds from 12 (after a change to the scheduler, the cache or the runner, run a thousand)."""
    folder = tiny if weights == "fp32" else make_tiny_lcq(tmp_path, "llama", bits=4, rank=2, group_size=32)
    base = tiny if weights == "fp32" else tmp_path / "hf"
    adapters = {f"a{i}": str(make_tiny_adapter(tmp_path / f"adapter{i}", base, seed=i)) for i in range(2)}
    lora = dict(lora_modules=",".join(f"{name}={path}" for name, path in adapters.items()))
    alone = LLM(str(folder), block_size=8, enable_prefix_caching=False, max_loras=2, **lora, **FP32)
    preempted = cached = drafted = 0
    for seed in range(max(12, int(os.environ.get("LCQ_TEST_WORKLOADS", 12)))):
        requests, settings, joins, aborts = _random_workload(random.Random(seed), list(adapters))
        engine = LLM(str(folder), **settings, **lora).engine
        usages = {}
        outputs, _, _ = _scripted_run(engine, requests, joins, aborts, usages)
        assert _pool_is_full(engine), (seed, settings)
        stats = engine.stats()
        preempted += stats.num_preemptions_total > 0
        drafted += stats.num_drafts_total > 0
        cached += any(usage.cached_tokens for usage in usages.values())
        for request_id, (prompt, params) in requests.items():
            (expected,) = alone.generate([prompt], dataclasses.replace(params, priority=0))
            token_ids, text, reason, logprobs = outputs[request_id]
            where = (seed, request_id, params, settings)
            room = engine.max_model_len - len(prompt)
            if reason == "abort":
                assert token_ids == expected.token_ids[:len(token_ids)], where
            elif len(expected.token_ids) > room:
                assert token_ids == expected.token_ids[:room] and reason == "length", where
            else:
                assert (token_ids, text, reason) == (expected.token_ids, expected.text, expected.finish_reason), where
                assert [token for token, _, _ in logprobs] == [p.token_id for p in expected.logprobs or []], where
                assert all(abs(logprob - p.logprob) < 1e-3 for (_, logprob, _), p in
                           zip(logprobs, expected.logprobs or [])), where
    assert preempted and cached and drafted



@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe", "granite4_moe"])
def test_linear_attention_states_through_batching_chunks_and_preemption(tmp_path, arch):
    """Qwen3.5's linear attention (and Granite 4.0-H's Mamba-2) through the engine: transformers' greedy tokens
    for sequences batched together, prefilled in chunks of 5 (the state carried between them), and recomputed
    after preemption (its state slot given back with its blocks and the state started afresh); every slot free
    at the end. Memory that the states alone fill is
    refused with one line."""
    folder = make_tiny_hf(tmp_path, arch)
    prompts = [*PROMPTS, [(3 * i + 1) % 300 + 1 for i in range(70)]]
    expected = [_transformers_greedy(folder, prompt, 12) for prompt in prompts]
    chunked = LLM(str(folder), block_size=8, max_num_batched_tokens=5, max_num_seqs=4, num_speculative_tokens=3,
                  **FP32)
    assert [o.token_ids for o in chunked.generate(prompts, GREEDY)] == expected
    engine = chunked.engine
    assert sorted(engine.blocks.free_states) == [0, 1, 2, 3] and _pool_is_full(engine)
    room = engine.runner.state_bytes + 6 * small_block_bytes(chunked)  # 6 blocks of 8: someone gets preempted
    small = LLM(str(folder), block_size=8, max_num_seqs=4, kv_cache_memory_gb=room / 2**30, **FP32)
    assert small.engine.blocks.num_total_blocks == 6
    assert [o.token_ids for o in small.generate(PROMPTS, GREEDY)] == expected[:3]
    assert small.engine.stats().num_preemptions_total > 0 and _pool_is_full(small.engine)
    with pytest.raises(UserError, match="recurrent layers' states of 4 sequences .* take 0.00 GiB, more than"):
        LLM(str(folder), max_num_seqs=4, kv_cache_memory_gb=engine.runner.state_bytes / 2**30, **FP32)


def test_prefix_blocks_are_known_by_a_cryptographic_chain_hash():
    """A block's key is SHA-256 of its predecessor's and its tokens (vLLM's fix of CVE-2025-25183): Python's hash
    of a tuple of ints, used before, is the same in every process and can be collided on purpose, so that a
    crafted prompt's blocks are served for another's prefix (the tokens compared on a hit cover the block
    itself, not the chain before it)."""
    import hashlib
    from array import array

    first = block_key(b"", [1, 2, 3, 4])
    assert first == hashlib.sha256(array("q", [1, 2, 3, 4]).tobytes()).digest()
    assert block_key(first, [5, 6, 7, 8]) == hashlib.sha256(first + array("q", [5, 6, 7, 8]).tobytes()).digest()
    assert len({first, block_key(b"", [1, 2, 3, 5]), block_key(b"x", [1, 2, 3, 4]), block_key(b"", [2**40, 2])}) == 4


@pytest.mark.parametrize("arch", ["qwen3_5", "granite4_hybrid", "lfm2", "nemotron_h_moe", "falcon_h1"])
def test_linear_attention_prefix_caching_keeps_prompts_and_replies_states(tmp_path, arch):
    """Qwen3.5's (and Granite 4.0-H's, LFM2's, Nemotron-H's, Falcon-H1's) prefix caching: a prompt's chunks stop at the end of its last
    full block before its last token, where its state is kept, and its reply's state is kept at the end of
    each block it fills, in the place of the one before; a later prompt that extends the prompt and its
    reply (a conversation's next turn) reuses their blocks and takes up that state, giving transformers'
    greedy tokens, and so does a prompt prefilled in chunks of 5; the least recently used state gives way to
    a new one (a prompt whose state went is computed whole); no state slot leaks. Without kept states
    (state_snapshots 0) nothing is reused."""
    folder = make_tiny_hf(tmp_path, arch)
    first = [(3 * i + 1) % 300 + 1 for i in range(21)]  # kept at 16 tokens (blocks of 8); its reply's at 24, 32
    llm = LLM(str(folder), block_size=8, max_num_seqs=2, state_snapshots=2, **FP32)
    reference = load_reference_model(folder)
    reply = llm.generate([first], GREEDY)[0]
    assert reply.token_ids == _transformers_greedy(folder, first, 12, reference) and reply.usage.cached_tokens == 0
    assert len(llm.engine.blocks.snapshots) == 2  # the prompt's, and the reply's last (one slot for the reply)
    second = first + reply.token_ids + [9, 10, 11]  # the next turn
    for engine_llm in (llm, LLM(str(folder), block_size=8, max_num_batched_tokens=5, state_snapshots=2, **FP32)):
        if engine_llm is not llm:
            engine_llm.generate([first], GREEDY)
        out = engine_llm.generate([second], GREEDY)[0]
        assert out.usage.cached_tokens == 32 and out.token_ids == _transformers_greedy(folder, second, 12, reference)
    again = llm.generate([second], GREEDY)[0]
    assert again.usage.cached_tokens == 32 and again.token_ids == out.token_ids
    assert llm.generate([first + [5]], GREEDY)[0].usage.cached_tokens == 0  # first's prompt state went
    assert llm.generate([[(7 * i + 2) % 300 + 1 for i in range(19)]], GREEDY)[0].usage.cached_tokens == 0
    blocks = llm.engine.blocks
    assert sorted(blocks.free_states) == [0, 1] and len(blocks.snapshots) + len(blocks.free_snapshots) == 2
    assert not blocks.restoring and _pool_is_full(llm.engine)
    plain = LLM(str(folder), block_size=8, state_snapshots=0, **FP32)
    plain.generate([first], GREEDY)
    assert plain.generate([second], GREEDY)[0].usage.cached_tokens == 0 and not plain.engine.blocks.enable_prefix_caching


@pytest.mark.parametrize("arch", ["qwen3_5", "lfm2"])
def test_recurrent_states_start_from_zeros_whichever_path_takes_the_first_step(tmp_path, arch):
    """A state slot held an earlier sequence's states: a sequence whose first step is a decode-shaped one
    (a one-token prompt, alone or beside decoding requests, or a first chunk of one token) took them up,
    where only prefill steps started from zeros. Each gives transformers' greedy tokens, every time."""
    folder = make_tiny_hf(tmp_path, arch)
    reference = load_reference_model(folder)
    short, longer = [5], [7, 8, 9]
    expected = {tuple(p): _transformers_greedy(folder, p, 6, reference) for p in (short, longer)}
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    llm = LLM(str(folder), block_size=8, enable_prefix_caching=False, **FP32)
    assert [llm.generate([short], params)[0].token_ids for _ in range(2)] == [expected[(5,)]] * 2
    beside = llm.generate([longer, short], [GREEDY, params])  # the one-token prompt joins a decode step
    assert beside[1].token_ids == expected[(5,)]
    chunked = LLM(str(folder), block_size=8, enable_prefix_caching=False, max_num_batched_tokens=1, **FP32)
    assert [chunked.generate([longer], params)[0].token_ids for _ in range(2)] == [expected[(7, 8, 9)]] * 2


@pytest.mark.parametrize("arch", ["llama", "qwen3_5"])
def test_a_failing_request_fails_alone(tmp_path, monkeypatch, failing_draws, arch):
    """A request whose sampling fails finishes with an error, and the others of its steps keep their tokens:
    each is sampled alone from the step's logits, the step not run again (a recurrent layer's state advances
    once). A failed forward pass is run again a sequence at a time (the culprit fails alone), but where
    recurrent layers' states may have advanced part way, where every sequence of the step fails rather than
    going on from a wrong state. The engine serves on, its pool and state slots free again."""
    folder = make_tiny_hf(tmp_path, arch)
    llm = LLM(str(folder), block_size=8, **FP32)
    expected = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    poisoned = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, seed=666)  # (greedy: seed unused)
    params = [GREEDY, poisoned, GREEDY]
    failing_draws(lambda seq: seq.params.seed == 666)
    outs = llm.generate(PROMPTS, params)
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert [outs[0].token_ids, outs[2].token_ids] == [expected[0], expected[2]]
    monkeypatch.undo()
    run = llm.engine.runner.run

    def failing_run(scheduled, **ahead):
        out = run(scheduled, **ahead)  # (its states advanced, then the step fails)
        if any(seq.params.seed == 666 for seq, _ in scheduled):
            raise RuntimeError("a model bug")
        return out

    monkeypatch.setattr(llm.engine.runner, "run", failing_run)
    outs = llm.generate(PROMPTS, params)
    recurrent = arch == "qwen3_5"
    assert [o.finish_reason for o in outs] == ["error"] * 3 if recurrent else ["length", "error", "length"]
    if not recurrent:
        assert [outs[0].token_ids, outs[2].token_ids] == [expected[0], expected[2]]
    monkeypatch.undo()
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected and _pool_is_full(llm.engine)
    assert len(llm.engine.blocks.free_states) == llm.engine.runner.state_slots


def test_a_row_without_a_token_read_after_the_next_step_was_launched_fails_alone(tmp_path, monkeypatch):
    """With async scheduling, a row with no token to draw (-1 from the device's draw) has the next step launched
    from it before the host reads it: then that step is dropped, the step's sequences are sampled again each
    alone, the culprit fails and the others go on with their own tokens; the pool is free again."""
    import lcq.runtime.engine as engine_module
    from lcq.runtime.sampler import NoTokenLeft

    folder = make_tiny_hf(tmp_path, "llama")
    llm = LLM(str(folder), block_size=8, async_scheduling=True, **FP32)
    expected = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    poisoned = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, seed=666)  # (greedy: seed unused)
    choose, sample, launched = engine_module.choose, engine_module.sample, []

    def choose_none_at_the_fifth_token(logits, seqs, *args, **pending):
        chosen, logprobs = choose(logits, seqs, *args, **pending)
        for row, seq in enumerate(seqs):
            if seq.params.seed == 666 and seq.num_output_tokens == 4:
                chosen[row] = -1
        return chosen, logprobs

    def sample_none_for_it(logits, seqs, *args):
        if any(seq.params.seed == 666 for seq in seqs):
            raise NoTokenLeft("no token")
        return sample(logits, seqs, *args)

    go_ahead = engine_module.LLMEngine._go_ahead
    monkeypatch.setattr(engine_module, "choose", choose_none_at_the_fifth_token)
    monkeypatch.setattr(engine_module, "sample", sample_none_for_it)
    monkeypatch.setattr(engine_module.LLMEngine, "_go_ahead",
                        lambda self, step: launched.append(step.chosen.tolist() if step.chosen is not None else [])
                        or go_ahead(self, step))
    outs = llm.generate(PROMPTS, [GREEDY, poisoned, GREEDY])
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert [outs[0].token_ids, outs[2].token_ids] == [expected[0], expected[2]]
    assert len(outs[1].token_ids) == 4 and any(-1 in tokens for tokens in launched)
    assert _pool_is_full(llm.engine)


def test_recurrent_states_stored_in_half_precision(tmp_path):
    """mamba_ssm_cache_dtype bfloat16: Mamba-2's states stored in bf16 between prompt chunks of 5 (computed in
    fp32 within a step) take half the bytes and give every prompt token's logprob within 0.02 of fp32
    states'; a dtype it does not know is refused."""
    folder = make_tiny_hf(tmp_path, "granite4_hybrid")
    prompt = [(3 * i + 1) % 300 + 1 for i in range(30)]
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    logprobs, sizes = [], []
    for dtype in ("float32", "bfloat16"):
        llm = LLM(str(folder), block_size=8, max_num_batched_tokens=5, state_snapshots=0,
                  mamba_ssm_cache_dtype=dtype, **FP32)
        mixer = llm.engine.runner.model.layers[0].self_attn
        assert mixer.recurrent_states.dtype == getattr(torch, dtype)
        sizes.append(mixer.recurrent_states.nbytes)
        logprobs.append([entry.logprob for entry in llm.generate([prompt], params)[0].prompt_logprobs[1:]])
    assert sizes[1] * 2 == sizes[0]
    assert logprobs[1] == pytest.approx(logprobs[0], abs=0.02)
    with pytest.raises(ValueError, match="mamba_ssm_cache_dtype must be one of auto"):
        LLM(str(folder), mamba_ssm_cache_dtype="int4", **FP32)


def test_prompt_logprobs_and_grammars_survive_preemption(tiny, llm):
    """Recompute after preemption keeps the generated tokens, the prompt logprobs and the matcher's state."""
    pytest.importorskip("xgrammar")
    together = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    small = LLM(str(tiny), block_size=8, kv_cache_memory_gb=6 * small_block_bytes(llm) / 2**30, **FP32)
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, prompt_logprobs=1), GREEDY,
              SamplingParams(max_tokens=30, temperature=0, structured_output=StructuredOutput(regex="[a-z]{20}"))]
    out = small.generate(PROMPTS, params)
    assert small.engine.stats().num_preemptions_total > 0
    assert out[0].token_ids == together[0] and len(out[0].prompt_logprobs) == len(PROMPTS[0])
    assert all(entry is not None for entry in out[0].prompt_logprobs[1:])
    assert re.fullmatch("[a-z]{20}", out[2].text) and out[2].finish_reason == "stop"
    assert _pool_is_full(small.engine)


def test_host_memory_is_checked_for_every_pool_and_state_before_they_are_taken(tiny, tmp_path, monkeypatch):
    """On CPU the memory left after loading must hold the KV pool with a draft model's pool and weights (each pool was
    checked alone: together they could take more), and recurrent layers' states, checked before they are allocated
    (too many were a kill at load, not the refusal naming max_num_seqs)."""
    from lcq.runtime import model_runner

    pool = 64 << 20  # the budget, shared by the two pools with a draft model
    monkeypatch.setattr(model_runner, "available_memory_bytes", lambda: int(0.75 * pool))
    LLM(str(tiny), block_size=8, kv_cache_memory_gb=pool / 2 / 2**30, **FP32)  # half of it fits
    with pytest.raises(UserError, match=r"more than the 0\.05 GiB of memory left"):  # the target's half fit alone
        LLM(str(tiny), block_size=8, kv_cache_memory_gb=pool / 2**30, speculative_model=str(tiny),
            num_speculative_tokens=2, **FP32)
    folder = make_tiny_hf(tmp_path / "qwen3_5", "qwen3_5")
    monkeypatch.setattr(model_runner, "available_memory_bytes", lambda: pool)
    with pytest.raises(UserError, match="the recurrent states' .* lower kv_cache_memory_gb, max_num_seqs or "
                                        "state_snapshots"):
        LLM(str(folder), block_size=8, kv_cache_memory_gb=64.0, max_num_seqs=4096, **FP32)


def small_block_bytes(llm) -> int:
    return llm.engine.runner.model.kv_cache_bytes_per_block(8, torch.float32)


def test_fp16_kv_cache_holds_twice_the_tokens(tiny, llm):
    """The default KV cache of an fp32 CPU model is fp16: the same pool holds twice the blocks of
    fp32, a batch larger than the pool runs (with preemptions) on the C attention reading the fp16
    cache, and the pool is full after."""
    memory_gb = 6 * small_block_bytes(llm) / 2**30
    half = LLM(str(tiny), block_size=8, kv_cache_memory_gb=memory_gb)
    assert half.engine.blocks.num_total_blocks == 12
    assert half.engine.runner.k_caches[0].dtype == torch.float16
    outs = half.generate(PROMPTS * 2, GREEDY)
    assert [len(o.token_ids) for o in outs] == [GREEDY.max_tokens] * 6
    assert half.engine.stats().num_preemptions_total > 0
    assert _pool_is_full(half.engine)


def _resident_bytes() -> int:
    """The process's resident memory now (not its peak)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident memory from /proc")
def _grown(manager: BlockManager, tokens: list[int], computed: int, register: bool = True) -> Sequence:
    """A sequence of these tokens given blocks for its first `computed`, which count as computed (and
    registered for prefix caching unless register is False)."""
    seq = Sequence("r", tokens, SamplingParams(max_tokens=1), None, 1)
    manager.reuse_cached_prefix(seq)
    manager.grow(seq, computed)
    seq.num_computed_tokens = computed
    if register:
        manager.register_full_blocks(seq)
    return seq


def test_priority_policy_orders_admission_budget_and_preemption():
    """Under --scheduling-policy priority the waiting queue is ordered by (priority, arrival), running
    sequences take the step's budget in that order, and the least urgent running one is preempted; under
    fcfs arrival decides each."""
    def run(by_priority: bool) -> tuple[list[str], list[str], list[str]]:
        scheduler = Scheduler(BlockManager(5, 4, enable_prefix_caching=False), max_num_seqs=2,
                              max_num_batched_tokens=100, by_priority=by_priority)
        late, urgent, later, most = (Sequence(name, list(range(8)), SamplingParams(priority=priority), None, 10)
                                     for name, priority in (("late", 5), ("urgent", 0), ("later", 5), ("most", -1)))
        for seq in (late, urgent, later):
            scheduler.add(seq)

        def step() -> list[str]:
            scheduled = scheduler.schedule()
            for seq, count in scheduled:
                seq.num_computed_tokens += count
                if seq.num_uncomputed == 0:
                    seq.token_ids.append(0)
            return [seq.request_id for seq, _ in scheduled]

        admitted = step()  # two of three: 4 of the 5 blocks
        scheduler.add(most)
        second = step()  # it needs 2 more blocks: one running sequence goes back to the waiting ones
        return admitted, second, [seq.request_id for seq in scheduler.waiting]

    assert run(by_priority=False) == (["late", "urgent"], ["late"], ["urgent", "later", "most"])
    assert run(by_priority=True) == (["urgent", "late"], ["urgent"], ["most", "late", "later"])


@pytest.mark.parametrize("policy, order", [("fcfs", ["a", "b", "c"]), ("priority", ["b", "c", "a"])])
def test_requests_finish_in_the_policys_order_with_their_own_tokens(tiny, llm, policy, order):
    one_at_a_time = LLM(str(tiny), block_size=8, max_num_seqs=1, scheduling_policy=policy, **FP32)
    engine, finished, tokens = one_at_a_time.engine, [], {}
    if policy == "fcfs":  # a priority it would not honour is refused (vLLM's 400), not ignored
        with pytest.raises(ValueError, match="Got priority 3 but Priority scheduling is not enabled"):
            engine.add_request("x", PROMPTS[0], SamplingParams(max_tokens=6, priority=3))
    for name, prompt, priority in (("a", PROMPTS[0], 3), ("b", PROMPTS[1], 0), ("c", PROMPTS[2], 1)):
        engine.add_request(name, prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                        priority=priority if policy == "priority" else 0))
    while engine.has_work():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finished:
                finished.append(out.request_id)
    assert finished == order
    plain = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    assert [tokens[name] for name in "abc"] == [o.token_ids for o in llm.generate(PROMPTS, plain)]
    with pytest.raises(ValueError, match="scheduling_policy must be one of fcfs, priority"):
        EngineConfig(model=str(tiny), scheduling_policy="lifo").validate()


def test_blocks_are_handed_out_in_order_and_after_a_sequences_last():
    """A table grows by the block after its last where that is free, else by the free block of lowest id, so
    that whatever order sequences came and went in, a new sequence's blocks lie one after another."""
    manager = BlockManager(64, 4, enable_prefix_caching=False)
    a, b = _grown(manager, list(range(8)), 8), _grown(manager, list(range(8)), 8)
    assert a.block_tables == [[0, 1]] and b.block_tables == [[2, 3]]
    manager.grow(a, 12)
    assert a.block_tables == [[0, 1, 4]]
    manager.release(b)
    manager.grow(a, 16)
    assert a.block_tables == [[0, 1, 4, 5]]  # after its last, not the lower 2
    c = _grown(manager, list(range(8)), 8)
    assert c.block_tables == [[2, 3]]
    rng = random.Random(0)
    held = [a, c]
    for _ in range(200):  # sequences of random lengths come and go in random order
        if held and (rng.random() < 0.5 or manager.num_free_blocks < 8):
            manager.release(held.pop(rng.randrange(len(held))))
        else:
            held.append(_grown(manager, list(range(28)), rng.randint(1, 28)))
    for seq in held:
        manager.release(seq)
    assert manager.num_free_blocks == manager.num_total_blocks
    assert _grown(manager, list(range(40)), 40).block_tables == [list(range(10))]


def test_empty_blocks_are_taken_before_cached_ones_are_given_up():
    """A freed sequence's cached prefix outlives later allocations while the pool has empty blocks, whatever
    order the blocks were freed in."""
    manager = BlockManager(16, 4, enable_prefix_caching=True)
    cached = list(range(100, 112))
    manager.release(_grown(manager, cached, 12))  # three full blocks, kept for their hashes
    manager.release(_grown(manager, list(range(200, 212)), 12, register=False))  # freed after them, empty
    other = _grown(manager, list(range(300, 352)), 52, register=False)  # the 13 empty blocks
    assert manager.num_free_blocks == 3
    again = _grown(manager, cached + [1], 12)
    assert again.num_cached_tokens == 12
    manager.release(other)
    manager.release(again)
    assert manager.num_free_blocks == manager.num_total_blocks


def test_cpu_kv_pool_takes_memory_as_its_blocks_are_used(tiny, llm):
    """A CPU pool is mapped, not written, at start: a 4 GiB pool adds well under 1 GiB to the process until
    its blocks hold tokens, generates as a small one does, and a pool larger than the memory left is
    refused at start."""
    before = _resident_bytes()
    large = LLM(str(tiny), block_size=8, kv_cache_memory_gb=4, **FP32)
    assert _resident_bytes() - before < 1 << 30
    assert large.engine.runner.kv_cache_bytes > 3.9 * 2**30
    assert [o.token_ids for o in large.generate(PROMPTS, GREEDY)] == [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    available = available_memory_bytes()
    if available is not None:
        with pytest.raises(UserError, match=r"GiB of memory left after loading the model: lower kv_cache_memory_gb"):
            LLM(str(tiny), kv_cache_memory_gb=available / 2**30 + 8, **FP32)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings from /proc")
def test_cpu_kv_pages_are_private_zeros():
    """zeroed_pages maps private anonymous pages (first touches of shared ones, Python's default, took 1.45x as
    long), reads zeros and keeps what is written."""
    pool = zeroed_pages((3, 1000, 7), torch.float16)
    assert pool.shape == (3, 1000, 7) and not pool.any()
    pool[1, 999] = 2.5
    assert pool[1, 999, 6].item() == 2.5 and pool.sum().item() == 2.5 * 7
    address = pool.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        start, end = (int(part, 16) for part in line.split()[0].split("-"))
        if start <= address < end:
            assert line.split()[1] == "rw-p", line
            break
    else:
        pytest.fail("the pool's address is in no mapping")


@pytest.mark.skipif(not cpu_ops.usable(), reason="int8 caches need the C kernels")
def test_int8_kv_cache_holds_more_tokens_and_keeps_the_logprobs(tiny, llm):
    """An int8 KV cache (head rows of 24 bytes and a 4-byte scale on the tiny model, against 96 bytes in
    fp32) holds 3.4x the blocks of fp32 in the same pool, runs a batch past the pool with preemptions and leaves it
    full; the first tokens' logprobs move from an fp32 cache's by its rounding only."""
    memory_gb = 6 * small_block_bytes(llm) / 2**30
    small = LLM(str(tiny), block_size=8, kv_cache_memory_gb=memory_gb, kv_cache_dtype="int8")
    assert small.engine.blocks.num_total_blocks == 6 * 96 // 28
    outs = small.generate(PROMPTS * 4, GREEDY)
    assert [len(o.token_ids) for o in outs] == [GREEDY.max_tokens] * 12
    assert small.engine.stats().num_preemptions_total > 0 and _pool_is_full(small.engine)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, logprobs=3)
    int8, fp32 = (LLM(str(tiny), block_size=8, kv_cache_dtype=dtype) for dtype in ("int8", "float32"))
    for ours, theirs in zip(*(engine.generate([PROMPTS[0]], params)[0].logprobs for engine in (int8, fp32))):
        differences = [abs(a[2] - b[2]) for a, b in zip(ours.top, theirs.top)]
        assert max(differences) < 0.05


def test_kv_cache_dtype_is_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the settings' checks, on any machine
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, int8, fp8, fp8_e4m3, float16"):
        EngineConfig(model="m", kv_cache_dtype="int4").validate()
    with pytest.raises(ValueError, match="fp8 needs a GPU of compute capability 8.9 or later"):
        EngineConfig(model="m", device="cpu", kv_cache_dtype="fp8").validate()
    for setting in (dict(device="cuda"), dict(device="cpu", dtype="bfloat16")):
        with pytest.raises(ValueError, match="int8 needs an fp32 model on a CPU and the C kernels"):
            EngineConfig(model="m", kv_cache_dtype="int8", **setting).validate()
    if cpu_ops.usable():
        assert EngineConfig(model="m", device="cpu", kv_cache_dtype="int8").resolved_kv_cache_dtype() == torch.int8
    monkeypatch.setattr(cpu_ops, "ENABLED", False)
    with pytest.raises(ValueError, match="int8 needs an fp32 model on a CPU and the C kernels"):
        EngineConfig(model="m", device="cpu", kv_cache_dtype="int8").validate()
    with pytest.raises(ValueError, match="auto or the model dtype on a GPU"):
        EngineConfig(model="m", device="cuda", kv_cache_dtype="float32").validate()
    assert EngineConfig(model="m", device="cpu", kv_cache_dtype="float32").resolved_kv_cache_dtype() == torch.float32
    assert EngineConfig(model="m", device="cpu").resolved_kv_cache_dtype() == torch.float16
    assert EngineConfig(model="m", device="cpu", dtype="bfloat16").resolved_kv_cache_dtype() == torch.bfloat16
    assert EngineConfig(model="m", device="cuda", dtype="bfloat16").resolved_kv_cache_dtype() == torch.bfloat16


def test_cpu_matmul_dtype_is_checked():
    with pytest.raises(ValueError, match="cpu_matmul_dtype must be auto, float32, bfloat16 or int8"):
        EngineConfig(model="m", cpu_matmul_dtype="int4").validate()
    with pytest.raises(ValueError, match="bfloat16 needs an fp32 model, the C kernels and a CPU with AVX512_BF16$"):
        EngineConfig(model="m", device="cpu", dtype="bfloat16", cpu_matmul_dtype="bfloat16").validate()
    with pytest.raises(ValueError, match="int8 needs an fp32 model and the C kernels$"):
        EngineConfig(model="m", device="cpu", dtype="float16", cpu_matmul_dtype="int8").validate()
    expected = next((d for d in (torch.int8, torch.bfloat16) if products_available(d)), torch.float32)
    if expected == torch.float32 and shuffles_only() and not native.has_avx512("avx512f"):
        expected = torch.int8  # the AVX2 shuffle form of LCQ layers' decode products
    assert EngineConfig(model="m", device="cpu").resolved_cpu_matmul_dtype() == expected
    assert EngineConfig(model="m", device="cpu", cpu_matmul_dtype="float32").resolved_cpu_matmul_dtype() == torch.float32
    assert EngineConfig(model="m", device="cpu", dtype="float16").resolved_cpu_matmul_dtype() == torch.float32
    if native.load() is not None:
        assert EngineConfig(model="m", device="cpu", cpu_matmul_dtype="int8").resolved_cpu_matmul_dtype() == torch.int8


@pytest.mark.skipif(native.load() is None or not cpu_index.enabled(),
                    reason="the C kernels do not run here (or LCQ_CPU_INDEX is 0)")
def test_engine_decodes_in_shuffle_products_without_avx512(tmp_path, monkeypatch):
    """Where the CPU lacks AVX-512 (LCQ_CPU_AVX512=0 stands in for it), auto takes int8 products: the LCQ layers
    (W4 g64) keep their int8 books and decode in the AVX2 shuffle form, the head keeps its int8 rows for AVX2's
    form of their products, and nothing else is kept (no int8 weights or bf16 panels: no product reads them
    there). The first token's logprob, from an 18-token prefill in fp32 but for the head (a prefill's last row takes
    the head as a decode step does), moves from fp32's by the head's rounding alone; the decoded ones by the
    rounding, no more. cpu_int8_weights on is refused there."""
    monkeypatch.setenv("LCQ_CPU_AVX512", "0")
    folder = str(make_tiny_lcq(tmp_path, "llama", bits=4, rank=2, group_size=64))
    rounded, exact = LLM(folder, block_size=8, kv_cache_dtype="float32"), LLM(folder, block_size=8, **FP32)
    runner = rounded.engine.runner
    assert runner.products == torch.int8 and runner.int8_book_bytes > 0 and runner.head_row_bytes > 0
    assert runner.int8_weight_bytes == runner.head_panel_bytes == 0
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
    ours, theirs = (engine.generate([PROMPTS[0]], params)[0].logprobs for engine in (rounded, exact))
    first, decoded = abs(ours[0].logprob - theirs[0].logprob), [abs(a.logprob - b.logprob)
                                                                for a, b in zip(ours[1:], theirs[1:])]
    assert 0 < first < 0.01 and 0 < max(decoded) < 0.15
    with pytest.raises(ValueError, match="cpu_int8_weights on needs int8 products .* on a CPU with AVX512_VNNI"):
        EngineConfig(model="m", device="cpu", cpu_int8_weights="on").validate()


def test_cuda_graph_sizes():
    """The decode batch sizes CUDA graphs are captured for: by default 1, 2, 4, 8, then multiples of 16 and the batch
    limit; asked for (vLLM's --cuda-graph-sizes, TGI's --cuda-graphs), those, none past the limit, which stands in
    for them."""
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64] and graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(64, [8, 1, 128, 4]) == [1, 4, 8, 64] and graph_batch_sizes(300, [512]) == [256]
    for sizes in ([], [0, 4]):
        with pytest.raises(ValueError, match="cuda_graph_sizes must be batch sizes of at least 1"):
            EngineConfig(model="m", cuda_graph_sizes=sizes).validate()


def test_prefix_cache_hits_give_the_same_tokens(llm):
    prompt = list(range(50, 90))
    first = llm.generate([prompt], GREEDY)[0]
    second = llm.generate([prompt], GREEDY)[0]
    assert second.token_ids == first.token_ids
    assert first.usage.cached_tokens == 0 and second.usage.cached_tokens == 32  # 4 full blocks of 8, not the last token
    # the first wrote all 5 of its full blocks; the second recomputed the last one, already cached
    assert (first.usage.cache_written_tokens, second.usage.cache_written_tokens) == (40, 0)
    assert _pool_is_full(llm.engine)


def test_choices_of_one_prompt_compute_it_once(llm, tiny):
    """n choices of one prompt, and a prompt sent twice at once: the first computes the prompt's blocks, the others
    wait a step and take them from the cache (each had computed the whole prompt beside the first, in the same
    steps); their tokens are those of a run without the cache (found by an audit of prefix caching)."""
    prompt = list(range(100, 141))  # 41 tokens: 5 full blocks of 8
    sampled = SamplingParams(n=4, max_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
    outs = llm.generate([prompt], sampled)
    assert [o.usage.cached_tokens for o in outs] == [0, 40, 40, 40]
    cold = LLM(str(tiny), block_size=8, enable_prefix_caching=False, **FP32)
    assert [o.token_ids for o in outs] == [o.token_ids for o in cold.generate([prompt], sampled)]
    twice = llm.generate([prompt[::-1], prompt[::-1]], GREEDY)
    assert [o.usage.cached_tokens for o in twice] == [0, 40] and twice[0].token_ids == twice[1].token_ids
    assert _pool_is_full(llm.engine)


def test_stop_strings_across_tokens_are_never_shown(llm):
    base = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    text = base.text
    stop = text[3:9]  # spans several tokens in this tokenizer's output, starts mid-token as well
    assert len(stop) == 6
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == text[:text.find(stop)]
    kept = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop],
                                                     include_stop_str_in_output=True))[0]
    assert kept.stop_reason == stop and kept.text == text[:text.find(stop)] + stop


def test_stop_tails_are_the_longest_proper_prefixes_held(llm):
    """What text is held back for the stop strings, kept up to date character by character (StopTails: trying
    every tail length against every stop string each token cost O(L^2) in a stop string's length, 15 ms a token
    for one of 100,000 characters, on the engine's thread): the longest tail that is a proper prefix of one,
    against a direct search, over random texts fed in random pieces; and a stop string found where it first
    ends. A stop string of the 16,384 characters a request's stop strings may hold in all is served (held back
    until the text departs from it); one more is refused (each choice builds its own tails)."""
    from lcq.runtime.detokenizer import StopTails

    def held(text: str, stops: list[str]) -> int:
        return max((size for size in range(1, len(text) + 1) for stop in stops
                    if size < len(stop) and stop.startswith(text[-size:])), default=0)

    rng = random.Random(0)
    for _ in range(500):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
        tails, text = StopTails(stops), ""
        for _ in range(rng.randint(1, 12)):
            piece = "".join(rng.choice("abc") for _ in range(rng.randint(0, 4)))
            ended = tails.feed(piece, len(text))
            text += piece
            first = {stop: text.find(stop, max(0, len(text) - len(piece) - len(stop) + 1)) for stop in stops}
            assert set(ended) == {(i, stop) for stop, i in first.items() if i >= 0}
            assert tails.longest() == held(text, stops), (stops, text)
    base = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    long_stop = base.text[:5] + "x" * (16384 - 5)
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[long_stop]))
    assert out[0].text == base.text and out[0].finish_reason == "length"
    with pytest.raises(ValueError, match="at most 16384 characters in all"):
        llm.generate([PROMPTS[1]], SamplingParams(max_tokens=20, stop=[long_stop, "x"]))


def test_stop_token_ids_and_eos(llm):
    base = llm.generate([PROMPTS[0]], GREEDY)[0]
    stop_id = base.token_ids[4]
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                    stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[:base.token_ids.index(stop_id) + 1]


def test_seed_reproducibility(llm):
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    first = llm.generate([PROMPTS[0]], params)[0].token_ids
    with_others = llm.generate([PROMPTS[0], PROMPTS[1]], [params, SamplingParams(max_tokens=5, temperature=1.0)])
    assert with_others[0].token_ids == first
    other_seed = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=10, temperature=1.0, seed=99, ignore_eos=True))
    assert other_seed[0].token_ids != first


# LCQ layers at g32, and at g64 (int8 books: their int8 decode form where rows choose it), and an fp16 model (its
# layers' and head's bf16 forms)
@pytest.mark.skipif(not cpu_ops.usable(), reason="batch_invariant runs on the C kernels")
@pytest.mark.parametrize("weights", ["lcq-g32", "lcq-g64", "fp16"])
def test_batch_invariant_logits_do_not_depend_on_the_steps(tmp_path, weights):
    """batch_invariant, at the default CPU settings (int8 or bf16 products where the CPU has them, an fp16 cache):
    each request's tokens and logprobs, greedy and seeded, are the same bit for bit alone, from the prefix cache,
    batched with the others (in another order), prefilled in chunks of a small budget beside them, and with a
    prediction (int8 products had verified drafts in their row forms); so are embeddings. Without it the forms of products and attention follow each step's rows, and the logits move in
    their last bits."""
    folder = str(make_tiny_hf(tmp_path / "hf", "llama", dtype=torch.float16) if weights == "fp16" else
                 make_tiny_lcq(tmp_path, "llama", bits=4, rank=2, group_size=int(weights[-2:])))
    rng = random.Random(0)
    # (from the cache, those of 32 and 33 tokens compute one new token: the decode step's form without it)
    prompts = [[rng.randrange(3, 380) for _ in range(n)] for n in (40, 7, 90, 23, 150, 3, 33, 32)]

    def outputs(llm: LLM, batch: list[list[int]], params: SamplingParams) -> list[tuple]:
        return [(c.token_ids, [(lp.logprob, lp.top) for lp in c.logprobs]) for c in llm.generate(batch, params)]

    for params in (SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2),
                   SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True, logprobs=2)):
        engine = LLM(folder, batch_invariant=True, block_size=16)
        alone = [outputs(engine, [prompt], params)[0] for prompt in prompts]
        assert [outputs(engine, [prompt], params)[0] for prompt in prompts] == alone  # prefixes from the cache
        assert outputs(engine, prompts[::-1], params)[::-1] == alone  # (their uncached ends batched)
        whole = LLM(folder, batch_invariant=True, block_size=16, enable_prefix_caching=False)
        assert outputs(whole, prompts, params) == alone  # one prefill step of 378 rows
        chunked = LLM(folder, batch_invariant=True, block_size=16, max_num_batched_tokens=37, max_num_seqs=3,
                      enable_prefix_caching=False)
        assert outputs(chunked, prompts, params) == alone
        for prompt, expected in zip(prompts, alone):  # drafts verified in a step's rows, partly accepted
            tokens = expected[0]
            predicted = dataclasses.replace(params, prediction=tokens[:7] + [tokens[7] % 300 + 1] + tokens[8:])
            assert outputs(engine, [prompt], predicted)[0] == expected
    vectors = engine.embed(prompts)  # (the last prompt token's hidden state: 1-2-token inputs took other forms)
    assert [engine.embed([prompt])[0] for prompt in prompts] == vectors
    with pytest.raises(ValueError, match="without speculative decoding and LoRA"):
        LLM(folder, batch_invariant=True, num_speculative_tokens=2)


@pytest.mark.skipif(not cpu_ops.usable(), reason="batch_invariant runs on the C kernels")
def test_batch_invariant_refuses_what_it_does_not_cover(tmp_path):
    with pytest.raises(UserError, match="covers models of softmax attention and dense MLPs"):
        LLM(str(make_tiny_hf(tmp_path / "moe", "qwen3_moe")), batch_invariant=True)


def test_logprobs_match_log_softmax(tiny, llm):
    out = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=3))[0]
    model = load_reference_model(tiny)
    tokens = PROMPTS[2] + out.token_ids
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), -1)
    for i, lp in enumerate(out.logprobs):
        row = expected[len(PROMPTS[2]) - 1 + i]
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4)
        assert [t[0] for t in lp.top] == row.topk(3).indices.tolist()


def test_prompt_logprobs_match_log_softmax(tiny):
    """Every prompt token's logprob and alternatives, also when the prompt is prefilled in chunks and
    when its blocks are in the prefix cache (they are computed anyway)."""
    prompt = PROMPTS[0]
    model = load_reference_model(tiny)
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    chunked = LLM(str(tiny), block_size=8, max_num_batched_tokens=8, max_num_seqs=2, kv_cache_dtype="float32",
                  cpu_matmul_dtype="float32")
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=2)
    for _ in range(2):  # the second time the prompt's blocks are cached
        out = chunked.generate([prompt, PROMPTS[1]], [params, GREEDY])
        assert out[1].prompt_logprobs is None
        entries = out[0].prompt_logprobs
        assert len(entries) == len(prompt) and entries[0] is None
        for position, entry in enumerate(entries[1:], start=1):
            row = expected[position - 1]
            assert entry.token_id == prompt[position]
            assert entry.logprob == pytest.approx(float(row[prompt[position]]), abs=1e-4)
            assert [t[0] for t in entry.top] == row.topk(2).indices.tolist()
    assert _pool_is_full(chunked.engine)


def test_cpu_int8_weights_setting():
    """on needs int8 products; auto keeps the int8 form when it takes at most a tenth of the memory
    available (unknown: not), off never."""
    with pytest.raises(ValueError, match="cpu_int8_weights must be auto, on or off"):
        EngineConfig(model="m", cpu_int8_weights="yes").validate()
    with pytest.raises(ValueError, match="cpu_int8_weights on needs int8 products"):
        EngineConfig(model="m", device="cpu", cpu_matmul_dtype="float32", cpu_int8_weights="on").validate()
    assert not EngineConfig(model="m", device="cpu", cpu_matmul_dtype="float32").keeps_int8_weights(1, 100)
    if products_available(torch.int8):
        config = EngineConfig(model="m", device="cpu", cpu_matmul_dtype="int8")
        assert config.keeps_int8_weights(10, 100) and not config.keeps_int8_weights(11, 100)
        assert not config.keeps_int8_weights(10, None)
        config.cpu_int8_weights = "on"
        assert config.keeps_int8_weights(11, 100) and config.keeps_int8_weights(10, None)
        config.cpu_int8_weights = "off"
        assert not config.keeps_int8_weights(10, 100)


def test_available_memory_respects_a_container_limit(tmp_path):
    """available_memory_bytes: MemAvailable, or the memory cgroup's limit minus its usage (less its inactive file
    cache) where that is less (cgroup v2 and v1, the cgroup's own folder or, as a container sees it, the mount's
    top); no limit ("max", v1's huge number) leaves MemAvailable."""
    def tree(name: str, cgroup: str, files: dict[str, str]) -> Path:
        root = tmp_path / name
        (root / "proc/self").mkdir(parents=True)
        (root / "proc/meminfo").write_text("MemTotal: 67108864 kB\nMemAvailable: 50331648 kB\n")  # 48 GiB
        (root / "proc/self/cgroup").write_text(cgroup)
        for path, text in files.items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(text)
        return root

    gib = 1 << 30
    v2 = tree("v2", "0::/app\n", {"sys/fs/cgroup/app/memory.max": str(16 * gib), "sys/fs/cgroup/app/memory.current": str(4 * gib)})
    assert available_memory_bytes(v2) == 12 * gib
    v1_top = tree("v1", "4:memory:/docker/abc\n1:cpu:/\n", {"sys/fs/cgroup/memory/memory.limit_in_bytes": str(8 * gib),
                                                              "sys/fs/cgroup/memory/memory.usage_in_bytes": str(gib)})
    assert available_memory_bytes(v1_top) == 7 * gib
    unlimited = tree("none", "0::/\n", {"sys/fs/cgroup/memory.max": "max\n", "sys/fs/cgroup/memory.current": "5"})
    assert available_memory_bytes(unlimited) == 48 * gib
    huge = tree("huge", "4:memory:/x\n", {"sys/fs/cgroup/memory/x/memory.limit_in_bytes": "9223372036854771712",
                                           "sys/fs/cgroup/memory/x/memory.usage_in_bytes": "5"})
    assert available_memory_bytes(huge) == 48 * gib
    assert available_memory_bytes(tmp_path / "nothing") is None
    # file cache the kernel reclaims first (a model's safetensors read at load) is not used memory: docker stats'
    # and the kubelet's rule (a pool that fits was refused, the model counted twice)
    cached = tree("cached", "0::/app\n", {"sys/fs/cgroup/app/memory.max": str(16 * gib),
                                          "sys/fs/cgroup/app/memory.current": str(10 * gib),
                                          "sys/fs/cgroup/app/memory.stat": f"anon {4 * gib}\ninactive_file {6 * gib}\n"})
    assert available_memory_bytes(cached) == 12 * gib
    v1_cached = tree("v1c", "4:memory:/\n", {"sys/fs/cgroup/memory/memory.limit_in_bytes": str(8 * gib),
                                             "sys/fs/cgroup/memory/memory.usage_in_bytes": str(3 * gib),
                                             "sys/fs/cgroup/memory/memory.stat": f"total_inactive_file {2 * gib}\n"})
    assert available_memory_bytes(v1_cached) == 7 * gib


@pytest.mark.skipif(not products_available(torch.int8) or not cpu_index.enabled(),
                    reason="int8 products need AVX512_VNNI, AVX512_VBMI and AVX512_BF16, the C kernels, and LCQ "
                           "layers that keep their indices (LCQ_CPU_INDEX not 0)")
def test_engine_with_kept_int8_weights_prefills_the_same(tmp_path):
    """With cpu_int8_weights on, LCQ layers keep their int8 form and an 18-token prefill reads it in
    place of expanding blocks: the same logprobs bit for bit as an engine that expands."""
    folder = str(make_tiny_lcq(tmp_path, "llama", bits=4, rank=2, group_size=32))
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=3)
    kept, expanding = (LLM(folder, block_size=8, cpu_matmul_dtype="int8", cpu_int8_weights=setting)
                       for setting in ("on", "off"))
    assert kept.engine.runner.int8_weight_bytes > 0 and expanding.engine.runner.int8_weight_bytes == 0
    ours, theirs = (engine.generate([PROMPTS[0]], params)[0].logprobs[0] for engine in (kept, expanding))
    assert ours == theirs


@pytest.mark.parametrize("setting, dtype, largest", [("bfloat16", torch.bfloat16, 0.05), ("int8", torch.int8, 0.15)])
def test_engine_prefills_with_rounded_products(tmp_path, setting, dtype, largest):
    """bfloat16 rounds the operands of the C kernels' large products (an 18-token prefill of an LCQ
    model) to bf16, int8 quantizes the LCQ layers' to 8 bits per block of 64: the first token's
    logprobs move from fp32's by about that rounding, no more."""
    if not products_available(dtype):
        pytest.skip(f"{setting} products need AVX-512 extensions this CPU lacks, or the C kernels")
    folder = str(make_tiny_lcq(tmp_path, "llama", bits=4, rank=2, group_size=32))
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=3)
    rounded = LLM(folder, block_size=8, kv_cache_dtype="float32", cpu_matmul_dtype=setting)
    exact = LLM(folder, block_size=8, **FP32)
    assert rounded.engine.runner.products == dtype and exact.engine.runner.products == torch.float32
    ours, theirs = (engine.generate([PROMPTS[0]], params)[0].logprobs[0].top for engine in (rounded, exact))
    differences = [abs(a[2] - b[2]) for a, b in zip(ours, theirs)]
    assert 0 < max(differences) < largest


def _seq(params: SamplingParams, tokens=(1, 2, 3)) -> Sequence:
    return Sequence("r", list(tokens), params, detokenizer=None, max_tokens=10)


def test_sampler_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for params, allowed in [
        (SamplingParams(temperature=1.0, top_k=2), {0, 1}),
        (SamplingParams(temperature=1.0, top_p=0.7), {0, 1}),
        (SamplingParams(temperature=1.0, min_p=0.5), {0, 1}),
        (SamplingParams(temperature=0.0), {0}),
        (SamplingParams(temperature=1.0, top_k=2, top_p=0.6), {0}),  # top-p of the top-k's 0.8: 0.5 is enough
        # a top_p that float32 rounds to 0 keeps the likeliest (the C draw read before its candidates: token 0
        # whatever the row; the torch ops kept none, a 400 blaming other parameters)
        (SamplingParams(temperature=1.0, top_p=1e-300), {0}),
    ]:
        for dtype in (torch.float32, torch.float64):  # the C draw, and the torch ops
            seen = {sample(logits.to(dtype).flip(-1), [_seq(params)])[0][0] for _ in range(100)}
            assert seen == {3 - token for token in allowed}, (params, dtype)
    # top-k keeps the tokens tied with its k-th, as vLLM and transformers do (both kept exactly k, by index)
    tied = torch.log(torch.tensor([[0.1, 0.25, 0.25, 0.05, 0.25, 0.1]]))
    for params, allowed in [(SamplingParams(temperature=1.0, top_k=1), {1, 2, 4}),
                            (SamplingParams(temperature=1.0, top_k=4), {0, 1, 2, 4, 5}),
                            (SamplingParams(temperature=1.0, top_k=2, top_p=0.5), {1, 2})]:  # top-p: a prefix
        for dtype in (torch.float32, torch.float64):
            seen = {sample(tied.to(dtype), [_seq(params)])[0][0] for _ in range(300)}
            assert seen == allowed, (params, dtype, seen)


def test_a_row_without_a_finite_logit_is_an_error_not_a_token():
    """A sampled row whose logits are all -inf or NaN has nothing to draw (the C draw gave -1, the torch one
    the vocabulary size): an error, which the engine turns into a failure of that sequence alone."""
    for dtype in (torch.float32, torch.float64):  # the C draw, and the torch ops
        for bad in (float("-inf"), float("nan")):
            logits = torch.zeros(2, 16, dtype=dtype)
            logits[1] = bad
            seqs = [_seq(SamplingParams(temperature=1.0, seed=1)) for _ in range(2)]
            with pytest.raises(ValueError, match="no token with a finite probability"):
                sample(logits, seqs)
            assert 0 <= sample(logits[:1], seqs[:1])[0][0] < 16


def test_keep_top_cuts_where_sorting_each_row_does():
    """keep_top looks for each row's cut among its 256, then 4096 most likely tokens, then the whole row:
    every level gives the cut of the sorted row (peaked rows end in the first, flatter ones later). Its form
    for GPUs, which sorts every row whole (reading nothing back), cuts alike."""
    g = torch.Generator().manual_seed(0)
    vocab = 8192
    scales = torch.tensor([8.0, 3.0, 1.0, 0.01]).repeat_interleave(3).unsqueeze(1)  # no ties, even when flat
    probs = torch.softmax(torch.randn(len(scales), vocab, generator=g) * scales, -1)
    top_k = torch.tensor([vocab, 5, 300, vocab, 5000, 100, vocab, 3000, 50, vocab, 6000, 1])
    top_p = torch.tensor([0.9, 1.0, 0.95, 0.5, 0.99, 1.0, 0.8, 0.9, 1.0, 0.9, 0.7, 0.3])
    order = probs.argsort(-1, descending=True)
    ranked = probs.gather(1, order)
    mass = ranked.cumsum(-1).gather(1, top_k[:, None] - 1)  # top-p of what top-k keeps
    drop = (torch.arange(vocab) >= top_k[:, None]) | ((ranked.cumsum(-1) - ranked) >= top_p[:, None] * mass)
    expected = torch.zeros_like(probs).scatter(1, order, ranked.masked_fill(drop, 0.0))
    kept = keep_top(probs, top_k, top_p)
    for cut in (kept, keep_top_sorted(probs, top_k, top_p)):
        assert torch.equal(cut > 0, expected > 0)
        torch.testing.assert_close(cut, expected)
    # ties: top-k keeps those tied with its k-th; top-p, of tied tokens at its cut, the lower ids (as the C draw)
    tied = torch.tensor([0.1, 0.25, 0.25, 0.05, 0.25, 0.1]).repeat(4, 1)
    cuts = keep_top_sorted(tied, torch.tensor([1, 4, 2, 6]), torch.tensor([1.0, 1.0, 0.5, 0.3]))
    assert [set(row.nonzero().flatten().tolist()) for row in cuts] == [{1, 2, 4}, {0, 1, 2, 4, 5}, {1, 2}, {1, 2}]
    widths = (kept > 0).sum(-1)
    assert widths.min() <= 256 and ((widths > 256) & (widths <= 4096)).any() and widths.max() > 4096


def test_typical_p_keeps_what_transformers_keeps():
    """keep_typical (TGI's typical_p) keeps exactly the tokens transformers' TypicalLogitsWarper keeps, over rows
    from peaked to flat and masses from 0.2 to 0.99; mixed in a batch with rows without it, which stay whole, and
    sampled through the engine's sampler only from kept tokens."""
    from transformers.generation.logits_process import TypicalLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 3000, generator=g) * torch.tensor([8.0, 3.0, 1.0, 0.1]).repeat(2)[:, None]
    for mass in (0.2, 0.5, 0.95, 0.99):
        expected = TypicalLogitsWarper(mass)(None, logits.clone()) > float("-inf")
        kept = filtered_probs(logits, [_seq(SamplingParams(typical_p=mass))] * len(logits)) > 0
        assert torch.equal(kept, expected), mass
    seqs = [_seq(SamplingParams(typical_p=0.5 if row % 2 else 1.0, seed=row)) for row in range(len(logits))]
    probs = filtered_probs(logits, seqs)
    torch.testing.assert_close(probs[::2], filtered_probs(logits[::2], seqs[::2]))  # (as without typical rows)
    assert torch.equal(probs[1::2] > 0, filtered_probs(logits[1::2], seqs[1::2]) > 0)
    tokens = sample(logits.clone(), seqs)[0]
    assert all(probs[row, token] > 0 for row, token in enumerate(tokens))
    with pytest.raises(ValueError, match="typical_p"):
        SamplingParams(typical_p=0.0).validate()


def test_draw_follows_the_probabilities():
    probs = torch.tensor([0.2, 0.5, 0.0, 0.25, 0.05]) * 3  # need not sum to 1
    draws = draw(probs.repeat(20000, 1), [_seq(SamplingParams())] * 20000)
    frequencies = torch.bincount(draws, minlength=5) / 20000
    assert frequencies[2] == 0  # never a token without probability
    torch.testing.assert_close(frequencies, probs / probs.sum(), atol=0.015, rtol=0)  # > 4 standard errors
    together = draw(probs.repeat(3, 1), [_seq(SamplingParams(seed=5)), _seq(SamplingParams()), _seq(SamplingParams(seed=5))])
    assert together[[0, 2]].tolist() == draw(probs.unsqueeze(0), [_seq(SamplingParams(seed=5))]).tolist() * 2


def test_sampler_penalties():
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.0]])
    seq = _seq(SamplingParams(temperature=0.0, repetition_penalty=1.5), tokens=(0,))
    assert sample(logits.clone(), [seq])[0] == [1]  # 2.0 / 1.5 < 1.9
    # logit_bias before the penalties (vLLM's order): token 0's (2.0 + 1.0) / 1.5 = 2.0 < 2.2, where the
    # other order gave 2.0 / 1.5 + 1.0 = 2.33
    seq = _seq(SamplingParams(temperature=0.0, repetition_penalty=1.5, logit_bias={0: 1.0}), tokens=(0,))
    assert sample(torch.tensor([[2.0, 2.2, -1.0, 0.0]]), [seq])[0] == [1]
    seq = _seq(SamplingParams(temperature=0.0, presence_penalty=0.5), tokens=(3,))
    seq.num_prompt_tokens = 0  # token 3 is output
    seq.token_ids = [0, 0]
    assert sample(logits.clone(), [seq])[0] == [1]


@pytest.mark.skipif(not cpu_ops.usable(), reason="the C kernels do not build here")
@pytest.mark.usefixtures("both_cores")
def test_c_sampler_draws_where_the_torch_ops_do():
    """cpu_ops.sample_rows against filtered_probs + draw at the same uniform numbers: the token it picks
    has probability and spans the target in the cumulative sum (up to fp32 rounding), over rows from
    peaked to flat, temperature alone, min-p, top-k, top-p (cuts in the histogram's small-weight pass
    and past it), and targets near 0 and 1."""
    g = torch.Generator().manual_seed(0)
    rows, vocab = 96, 3000
    logits = torch.randn(rows, vocab, generator=g) * torch.tensor([10.0, 3.0, 1.0, 0.05]).repeat(rows // 4)[:, None]
    settings = [dict(temperature=t, top_p=p, top_k=k, min_p=m) for t, p, k, m in
                [(1.0, 1.0, 0, 0.0), (0.7, 0.95, 0, 0.0), (1.0, 0.5, 0, 0.0), (1.3, 1.0, 40, 0.0),
                 (1.0, 0.9, 200, 0.0), (0.5, 1.0, 0, 0.1), (1.0, 0.99, 2999, 0.01), (2.0, 0.3, 1, 0.0)]]
    seqs = [_seq(SamplingParams(**settings[r % len(settings)])) for r in range(rows)]
    # One token of weight 1 and 2,999 near 9e-5 (below the first pass's 1e-4) holding 0.27 of the total: the
    # top-p 0.9 (and top-k 200) cut of rows 4, 12, ... falls among those, which only the second, full pass sees.
    logits[4::8] = torch.randn(rows // 8, vocab, generator=g) * 0.01 - 9.3
    logits[4::8, 0] = 0.0
    uniform = torch.rand(rows, generator=g)
    uniform[:4], uniform[4:8] = 1e-6, 1.0 - 2**-24
    vocab_k = torch.tensor([s.params.top_k or vocab for s in seqs])
    tokens = cpu_ops.sample_rows(logits, *(torch.tensor([getattr(s.params, name) for s in seqs]) for name in
                                           ("temperature", "min_p")), vocab_k,
                                 torch.tensor([s.params.top_p for s in seqs]), uniform)
    probs = filtered_probs(logits, seqs).double()
    cdf = probs.cumsum(-1)
    for r, token in enumerate(tokens.tolist()):
        assert probs[r, token] > 0, (r, seqs[r].params)
        target = uniform[r].item() * cdf[r, -1].item()
        before = cdf[r, token - 1].item() if token else 0.0
        assert before - 1e-5 <= target <= cdf[r, token].item() + 1e-5, (r, seqs[r].params)
    # Equal weights at a top-p cut: the lower token ids are kept; at a top-k cut, all of them (vLLM's ties)
    flat = cpu_ops.sample_rows(torch.zeros(200, vocab), torch.ones(200), torch.zeros(200), torch.full((200,), vocab),
                               torch.full((200,), 9.5 / vocab), torch.rand(200, generator=g))
    assert set(flat.tolist()) == set(range(10))
    tied = cpu_ops.sample_rows(torch.zeros(200, vocab), torch.ones(200), torch.zeros(200), torch.full((200,), 10),
                               torch.ones(200), torch.rand(200, generator=g))
    assert max(tied.tolist()) > 1000


def test_penalties_of_a_batch_are_each_rows_own():
    """apply_penalties on a batch of mixed settings equals each row penalized alone, as written out here."""
    g = torch.Generator().manual_seed(0)
    settings = [dict(), dict(repetition_penalty=1.3), dict(presence_penalty=0.7), dict(frequency_penalty=-0.4,
                repetition_penalty=0.8), dict(presence_penalty=1.0, frequency_penalty=0.5)]
    seqs = []
    for i, kw in enumerate(settings * 2):
        seq = _seq(SamplingParams(**kw), tokens=torch.randint(0, 50, (5 + i,), generator=g).tolist())
        seq.token_ids += torch.randint(0, 50, (i * 3,), generator=g).tolist()  # output tokens, repeats among them
        seqs.append(seq)
    logits = torch.randn(len(seqs), 50, generator=g) * 3
    expected = logits.clone()
    for row, seq in enumerate(seqs):
        p = seq.params
        for token in set(seq.token_ids):
            value = expected[row, token]
            expected[row, token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        for token in set(seq.output_ids):
            expected[row, token] -= p.frequency_penalty * seq.output_ids.count(token) + p.presence_penalty
    torch.testing.assert_close(apply_penalties(logits.clone(), seqs), expected)


def test_sampler_logit_bias():
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.0], [2.0, 1.9, -1.0, 0.0]])
    banned = _seq(SamplingParams(temperature=0.0, logit_bias={0: -100.0}))
    forced = _seq(SamplingParams(temperature=1.0, logit_bias={2: 100.0}))
    plain = _seq(SamplingParams(temperature=0.0))
    assert sample(logits.clone(), [banned, plain])[0] == [1, 0]  # rows keep their own biases
    assert {sample(logits.clone(), [forced, plain])[0][0] for _ in range(50)} == {2}
    reported = sample(logits.clone(), [_seq(SamplingParams(temperature=0.0, logprobs=0, logit_bias={0: -100.0}))])[1]
    torch.testing.assert_close(reported[0], torch.log_softmax(logits[0], -1))  # raw, as OpenAI reports them


def test_logit_bias_steers_generation_and_is_checked(llm):
    plain = llm.generate([PROMPTS[1]], GREEDY)[0].token_ids
    banned = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                       logit_bias={plain[0]: -100}))[0].token_ids
    assert banned[0] != plain[0] and plain[0] not in banned
    forced = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=5, temperature=0.8, ignore_eos=True,
                                                       logit_bias={77: 100}))[0].token_ids
    assert forced == [77] * 5
    vocab = llm.engine.runner.model_config.vocab_size
    for bias, message in [({1: 101.0}, "between -100 and 100"), ({vocab: 1.0}, "logit_bias token ids"),
                          ({t: 1.0 for t in range(301)}, "at most 300")]:
        with pytest.raises(ValueError, match=message):
            llm.generate([PROMPTS[1]], SamplingParams(max_tokens=2, logit_bias=bias))


def test_sampler_allowed_token_ids_and_bad_words():
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.0, 0.5], [2.0, 1.9, -1.0, 0.0, 0.5]])
    allowed = _seq(SamplingParams(temperature=0.0, allowed_token_ids=[2, 3]))
    plain = _seq(SamplingParams(temperature=0.0))
    assert sample(logits.clone(), [allowed, plain])[0] == [3, 0]
    drawn = _seq(SamplingParams(temperature=1.5, allowed_token_ids=[2, 4], logit_bias={4: -100.0}))
    assert {sample(logits[:1].clone(), [drawn])[0][0] for _ in range(30)} == {2}  # the mask, then the bias
    # A one-token word is never sampled; a two-token word's last token only right after its first, and
    # only where that first token is output (tokens=(1, 2, 3) are the prompt).
    words = _seq(SamplingParams(temperature=0.0), tokens=(1, 2, 3))
    words.bad_word_ids = [(0,), (3, 1), (7, 4)]
    assert sample(logits[:1].clone(), [words])[0] == [1]
    words.token_ids.append(3)
    assert sample(logits[:1].clone(), [words])[0] == [4]
    reported = sample(logits[:1].clone(), [_seq(SamplingParams(temperature=0.0, logprobs=0,
                                                               allowed_token_ids=[3]))])[1]
    torch.testing.assert_close(reported[0], torch.log_softmax(logits[0], -1))  # raw, as OpenAI reports them


def test_allowed_token_ids_and_bad_words_steer_generation(llm):
    tokenizer = llm.engine.tokenizer
    allowed = [40, 41, 42]
    for params in (SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, allowed_token_ids=allowed),
                   SamplingParams(max_tokens=10, temperature=1.0, seed=3, ignore_eos=True, allowed_token_ids=allowed)):
        assert set(llm.generate([PROMPTS[1]], params)[0].token_ids) <= set(allowed)
    plain = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].token_ids
    # The first word of two output tokens that the tokenizer spells with those tokens
    word = next(tokenizer.decode(plain[i:i + 2]) for i in range(len(plain) - 1)
                if tuple(plain[i:i + 2]) in bad_word_token_ids(tokenizer, [tokenizer.decode(plain[i:i + 2])]))
    spellings = bad_word_token_ids(tokenizer, [word])
    banned = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                       bad_words=[word]))[0].token_ids

    def first_spelled(tokens: list[int]) -> int | None:
        """The first position that ends a spelling of the word."""
        return next((end for end in range(len(tokens)) for ids in spellings
                     if end + 1 >= len(ids) and tuple(tokens[end + 1 - len(ids):end + 1]) == ids), None)

    end = first_spelled(plain)
    assert end is not None and first_spelled(banned) is None
    assert banned[:end] == plain[:end] and banned[end] != plain[end]
    vocab = llm.engine.runner.model_config.vocab_size
    for params, message in [(dict(allowed_token_ids=[]), "must not be empty"),
                            (dict(allowed_token_ids=[vocab]), r"allowed_token_ids must be in \[0"),
                            (dict(bad_words=[" "]), "not blank"), (dict(bad_words=["x"] * 129), "at most 128")]:
        with pytest.raises(ValueError, match=message):
            llm.generate([PROMPTS[1]], SamplingParams(max_tokens=2, **params))


def _byte_fallback_tokenizer():
    """A SentencePiece-style tokenizer (Llama 2's, Mistral's): letters and "▁", other characters as byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "▁", *"abcdefghijklmnopqrstuvwxyz", *(f"<0x{b:02X}>" for b in range(256))]
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>",
                               byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_token_bytes_put_split_characters_together(tiny):
    """A character split over tokens decodes to U+FFFD token by token; the tokens' bytes, concatenated, are
    its UTF-8, for byte-level BPE and for SentencePiece's byte tokens."""
    from transformers import AutoTokenizer

    text = "naïve €5 😀 日本"
    byte_level, sentencepiece = AutoTokenizer.from_pretrained(tiny), _byte_fallback_tokenizer()
    for tokenizer in (byte_level, sentencepiece):
        ids = tokenizer.encode(text, add_special_tokens=False)
        split = [t for t in ids if "\ufffd" in tokenizer.decode([t])]
        assert len(split) >= 8  # the test means something: most of these characters are split
        token_bytes = TokenBytes(tokenizer)
        assert b"".join(token_bytes(t) for t in ids).lstrip(b" ") == text.encode("utf-8")
        assert all(token_bytes.text(t) == "\ufffd" for t in split if len(token_bytes(t)) == 1)
    whole = [t for t in range(len(byte_level)) if "\ufffd" not in byte_level.decode([t])]
    assert all(TokenBytes(byte_level)(t) == byte_level.decode([t]).encode() for t in whole)
    # SentencePiece's "▁" is the token's leading space, which the token decoded alone loses
    space = sentencepiece.convert_tokens_to_ids("▁")
    assert TokenBytes(sentencepiece).text(space) == " " and sentencepiece.decode([space]) == ""


def test_min_tokens_holds_back_eos_and_stop_token_ids(llm):
    plain = llm.generate([PROMPTS[2]], GREEDY)[0].token_ids
    stopped = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[plain[1]]))[0]
    assert stopped.token_ids == plain[:2] and stopped.finish_reason == "stop"
    held = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[plain[1]],
                                                     min_tokens=6))[0]
    assert len(held.token_ids) >= 6 and plain[1] not in held.token_ids[:6]
    # EOS forced by a bias still waits for min_tokens, then ends the output at once.
    eos_first = SamplingParams(max_tokens=12, temperature=0, logit_bias={EOS_ID: 100}, min_tokens=4)
    out = llm.generate([PROMPTS[2]], eos_first)[0]
    assert EOS_ID not in out.token_ids[:4] and out.token_ids[4] == EOS_ID and len(out.token_ids) == 5
    with pytest.raises(ValueError, match="min_tokens"):
        llm.generate([PROMPTS[2]], SamplingParams(max_tokens=3, min_tokens=4))


def test_min_tokens_holds_back_stop_strings(llm):
    """As vLLM: stop strings count only in the text after min_tokens tokens (text before is searched no more)."""
    tokenizer = llm.tokenizer
    ids = tokenizer("In the beginning God created the heaven and the earth", add_special_tokens=False)["input_ids"]

    def text(min_tokens: int) -> str:
        detok = IncrementalDetokenizer(tokenizer, [1], stop=["e"], min_tokens=min_tokens)
        streamed = ""
        for token in ids:
            streamed += detok.add(token)
            if detok.stop_string is not None:
                break
        assert streamed == detok.text  # what was handed out is what is kept
        return detok.text

    full = tokenizer.decode(ids)
    assert text(0) == "In th"
    for early in range(1, 8):  # the first "e" after the text of the first `early` tokens: none before counts
        before = len(tokenizer.decode(ids[:early]))
        assert text(early) == full[:full.index("e", before)]


def test_sampling_params_are_taken_as_vllm_takes_them_or_refused_in_one_line(llm):
    assert SamplingParams(stop="x").stop == ["x"] and SamplingParams(stop=None, stop_token_ids=None).stop == []
    bad = [dict(n=1.5), dict(max_tokens=2.5), dict(temperature="0.5"), dict(seed=2**70), dict(stop=[1]),
           dict(stop_token_ids=["a"]), dict(logit_bias={"5": 1.0}), dict(top_k=True)]
    for fields in bad:
        with pytest.raises(ValueError, match="must"):
            SamplingParams(**fields).validate()
        with pytest.raises(ValueError, match="must"):
            llm.generate([PROMPTS[1]], SamplingParams(**fields))
    # OpenAI's 128 choices; 128 stop strings (editors' templates send 9 and more: Continue's for Qwen2.5-Coder)
    for fields, refused in ((dict(n=128), dict(n=129)), (dict(stop=[f"<|{i}|>" for i in range(128)]),
                                                         dict(stop=[f"<|{i}|>" for i in range(129)]))):
        SamplingParams(**fields).validate()
        with pytest.raises(ValueError, match="at most 128|between 1 and 128"):
            SamplingParams(**refused).validate()
    # token ids as sets, each once (a million repeated ones were matched or masked at every step)
    repeated = SamplingParams(allowed_token_ids=[9, 3, 9, 3, 4], stop_token_ids=[5, 5, 6])
    repeated.validate()
    assert repeated.allowed_token_ids == [9, 3, 4] and repeated.stop_token_ids == [5, 6]


def test_offline_generate_is_all_or_nothing_and_fans_out_n(llm):
    too_long = list(range(1, llm.engine.max_model_len + 5))
    with pytest.raises(ContextLengthError, match="maximum context length"):
        llm.generate([PROMPTS[0], too_long], GREEDY)
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate([PROMPTS[0]], [GREEDY, GREEDY])
    stats = llm.engine.stats()
    assert stats.num_running == stats.num_waiting == 0  # the first prompt was taken back
    assert llm.generate([PROMPTS[0]], GREEDY)[0].token_ids  # and the engine serves on
    sampled = SamplingParams(max_tokens=8, temperature=1.0, seed=7, n=3, ignore_eos=True)
    fanned = llm.generate([PROMPTS[1], PROMPTS[2]], sampled)
    assert len(fanned) == 6 and [c.prompt_ids for c in fanned] == [PROMPTS[1]] * 3 + [PROMPTS[2]] * 3
    for i, completion in enumerate(fanned[:3]):
        alone = SamplingParams(max_tokens=8, temperature=1.0, seed=7 + i, ignore_eos=True)
        assert llm.generate([PROMPTS[1]], alone)[0].token_ids == completion.token_ids


def test_a_row_with_no_token_left_fails_its_request_alone_greedy_or_sampled(llm):
    """allowed_token_ids that hold only EOS, with min_tokens holding EOS back, leave a row nothing to emit:
    the request fails, greedy as sampled (greedy emitted token 0, which was not allowed), and the others in
    its batch go on."""
    eos = min(llm.engine.eos_ids)
    stuck = [SamplingParams(max_tokens=4, temperature=temperature, min_tokens=2, allowed_token_ids=[eos])
             for temperature in (0.0, 1.0)]
    outs = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [stuck[0], GREEDY, stuck[1]])
    assert [(o.finish_reason, o.token_ids) for o in (outs[0], outs[2])] == [("error", []), ("error", [])]
    assert outs[1].token_ids == llm.generate([PROMPTS[1]], GREEDY)[0].token_ids and len(outs[1].token_ids) == 12


def test_an_interrupted_offline_generate_leaves_the_llm_usable(llm, monkeypatch):
    """Ctrl-C in the middle of LLM.generate (a notebook's usual way out) aborts that call's requests: the
    next calls get their own tokens, where they had clashed with the ids left behind. One prompt may be
    given alone, as vLLM takes it (a string was read as one prompt per character)."""
    expected = [c.token_ids for c in llm.generate(PROMPTS, GREEDY)]
    real_step, steps = llm.engine.step, itertools.count()

    def interrupted_step():
        if next(steps) == 2:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(llm.engine, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, GREEDY)
    monkeypatch.undo()
    assert not llm.engine.has_work() and _pool_is_full(llm.engine)
    assert [c.token_ids for c in llm.generate(PROMPTS, GREEDY, use_tqdm=True)] == expected
    assert [c.token_ids for c in llm.generate(PROMPTS[0], GREEDY)] == expected[:1]
    assert len(llm.generate("Hello there", GREEDY)) == 1
    assert llm.embed("Hello there") == llm.embed(["Hello there"])


def test_grammars_kept_are_the_most_recently_used(tiny, monkeypatch):
    """A server sees ever new schemas: the compiled grammars kept are bounded (the least recently used go), and
    a sequence whose grammar went goes on with its own matcher."""
    pytest.importorskip("xgrammar")
    engine = LLM(str(tiny), block_size=8, **FP32).engine
    engine.structured.kept = 2
    specs = [StructuredOutput(regex=f"[a-c]{{{n}}}x") for n in (2, 3, 4)]
    for spec in specs[:2]:
        engine.structured.check(spec)
    engine.add_request("a", PROMPTS[0], SamplingParams(max_tokens=10, temperature=0, structured_output=specs[0]))
    engine.structured.check(specs[2])  # the first is used again by "a", so the second goes
    assert list(engine.structured._grammars) == [specs[0], specs[2]]
    engine.structured.check(specs[1])
    assert list(engine.structured._grammars) == [specs[2], specs[1]]
    # ... and so are their bytes: a grammar larger than the budget is not kept (an enum of 50,000 values is 200 MB)
    monkeypatch.setattr(structured_output, "GRAMMAR_BYTES_KEPT", engine.structured._kept_bytes() - 1)
    engine.structured.check(StructuredOutput(regex="[a-c]{5}x"))
    assert len(engine.structured._grammars) == 1
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    assert outputs[-1].finish_reason == "stop" and re.fullmatch("[a-c]{2}x", "".join(o.text for o in outputs))


def test_json_output_follows_its_schema(llm):
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}, "size": {"type": "integer"}},
              "required": ["color", "size"], "additionalProperties": False}
    constrained = SamplingParams(max_tokens=40, temperature=0.9, seed=3,
                                 structured_output=StructuredOutput(json.dumps(schema)))
    plain = llm.generate([PROMPTS[1]], GREEDY)[0].token_ids
    out = llm.generate([PROMPTS[0], PROMPTS[1]], [constrained, GREEDY])
    assert out[1].token_ids == plain  # the other row of the batch is not constrained
    assert out[0].finish_reason == "stop", out[0].text
    value = json.loads(out[0].text)
    assert value["color"] in ("red", "blue") and isinstance(value["size"], int) and set(value) == {"color", "size"}
    # any JSON object; a bias towards "}" closes it at once
    close = llm.tokenizer.encode("}", add_special_tokens=False)
    anything = SamplingParams(max_tokens=20, temperature=0, structured_output=StructuredOutput(),
                              logit_bias={close[0]: 30})
    assert json.loads(llm.generate([PROMPTS[2]], anything)[0].text) == {}
    coded = SamplingParams(max_tokens=10, temperature=1.0, seed=5, structured_output=StructuredOutput(regex="[a-c]{2}x"))
    out = llm.generate([PROMPTS[0]], coded)[0]
    assert out.finish_reason == "stop" and re.fullmatch("[a-c]{2}x", out.text)
    # with ignore_eos, the end-of-sequence token a finished grammar leaves still ends it, and is no text
    shown = llm.generate([PROMPTS[0]], dataclasses.replace(coded, ignore_eos=True, skip_special_tokens=False))[0]
    assert (shown.token_ids, shown.text, shown.finish_reason) == (out.token_ids, out.text, "stop")
    assert shown.token_ids[-1] == llm.tokenizer.eos_token_id
    with pytest.raises(ValueError, match="guided_regex"):
        llm.generate([PROMPTS[0]], SamplingParams(structured_output=StructuredOutput(regex="[a-")))
    for bad in ({"type": "no-such-type"}, {"type": "object", "properties": {"a": {"$ref": "#/missing"}}}):
        with pytest.raises(ValueError, match="json_schema"):
            llm.generate([PROMPTS[2]], SamplingParams(structured_output=StructuredOutput(json.dumps(bad))))
    deep: dict = {"type": "integer"}  # (arrays nested 900 deep, 22 KB, held a compile thread 38 s)
    for _ in range(64):
        deep = {"type": "array", "items": deep}
    with pytest.raises(ValueError, match="nests deeper than 64 levels"):
        llm.generate([PROMPTS[2]], SamplingParams(structured_output=StructuredOutput(json.dumps(deep))))
    # what xgrammar compiles but does not enforce is refused, not broken silently (its outputs broke each)
    item = {"type": "integer", "minimum": 0, "maximum": 9}
    for bad, what in [({"type": "array", "items": item, "uniqueItems": True}, "`uniqueItems` (at #)"),
                      ({"type": "object", "properties": {"v": {"not": item}}}, "`not` (at #/properties/v)"),
                      ({"type": "object", "properties": {"s": {"allOf": [{"type": "string"}, {"maxLength": 2}]}}},
                       "`allOf` of several schemas"),
                      ({"$defs": {"n": item}, "type": "object", "properties": {"v": {"$ref": "#/$defs/n", "maximum": 5}}},
                       "`maximum` beside `$ref`"),
                      ({"type": "string", "pattern": "[a-z]+", "maxLength": 3}, "length bounds beside its pattern"),
                      # (its matches go into the JSON string unescaped: {"s": "a"b"}, {"s": "\\d"})
                      ({"type": "object", "properties": {"s": {"type": "string", "pattern": '^a"b$'}}},
                       "`pattern` that can match a quote"),
                      ({"type": "string", "pattern": r"^\\d$"}, "`pattern` that can match a quote"),
                      ({"type": "string", "pattern": "^.+$"}, "`pattern` that can match a quote"),
                      ({"type": "string", "pattern": r"^\w+\s\w+$"}, "`pattern` that can match a quote"),
                      ({"type": "object", "properties": {"a": {"$ref": "http://example.com/s.json"}}},
                       "`$ref` http://example.com/s.json outside the schema"),
                      ({"type": "object", "properties": {"a": item}, "required": ["a", "zz"],
                        "additionalProperties": False}, "required `zz` that additionalProperties false leaves out"),
                      # (enforced as anyOf: 3 meets both branches of each)
                      ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "`oneOf` branches 0 and 1"),
                      ({"type": "array", "items": {"oneOf": [{"type": "null"}, item, {"type": "integer", "maximum": 3}]}},
                       "`oneOf` branches 1 and 2 that one value may meet both of (it is enforced as anyOf"),
                      ({"oneOf": [{"type": "object", "properties": {"a": item}}, {"type": "object"}]},
                       "`oneOf` branches 0 and 1")]:
        with pytest.raises(ValueError, match=re.escape(what)):
            llm.generate([PROMPTS[2]], SamplingParams(structured_output=StructuredOutput(json.dumps(bad))))
    # ... while a property named after such a keyword, one-schema allOf and annotations beside $ref are fine
    fine = {"$defs": {"n": item}, "type": "object", "required": ["not", "v"],
            "properties": {"not": {"allOf": [item]}, "v": {"$ref": "#/$defs/n", "description": "a digit"}}}
    value = json.loads(llm.generate([PROMPTS[2]], SamplingParams(max_tokens=20, temperature=0, structured_output=
                                                                 StructuredOutput(json.dumps(fine))))[0].text)
    assert set(value) == {"not", "v"} and all(0 <= v <= 9 for v in value.values())
    # oneOf branches told apart by type, bounds or a const property (pydantic's discriminated unions) are enforced
    pets = {"$defs": {kind: {"type": "object", "required": ["kind", "n"], "properties": {
        "kind": {"const": kind}, "n": {"type": "integer", "minimum": low, "maximum": low + 4}}} for kind, low in
        (("cat", 0), ("dog", 10))}, "oneOf": [{"$ref": "#/$defs/cat"}, {"$ref": "#/$defs/dog"},
                                             {"type": "integer", "minimum": 20}, {"type": "integer", "maximum": -1}]}
    brace = llm.tokenizer.encode("{", add_special_tokens=False)[0]
    for seed, bias in [(0, {}), (1, {}), (0, {brace: 30}), (1, {brace: 30})]:  # (the bias: an object's branches)
        text = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=40, temperature=1.0, seed=seed, logit_bias=bias,
                                                         structured_output=StructuredOutput(json.dumps(pets))))[0].text
        value = json.loads(text)
        assert isinstance(value, int) and (value >= 20 or value <= -1) or \
            (value["kind"], value["n"] // 10) in (("cat", 0), ("dog", 1)) and set(value) == {"kind", "n"}, text
    with pytest.raises(ValueError, match="min_tokens"):
        llm.generate([PROMPTS[2]], SamplingParams(min_tokens=2, structured_output=StructuredOutput()))


def test_length_bounded_strings_hold_no_raw_control_characters(llm):
    """xgrammar lets a string with minLength or maxLength take raw control characters, which JSON does not allow
    (json.loads and the SDKs refuse such output): a bias towards one of them must not reach the output."""
    pytest.importorskip("xgrammar")
    control = next(t for t in range(llm.tokenizer.vocab_size) if llm.tokenizer.decode([t]) == "\x17")
    for schema in ({"type": "string", "maxLength": 4}, {"type": "object", "required": ["s"],
                                                         "properties": {"s": {"type": "string", "minLength": 2,
                                                                              "maxLength": 3}}}):
        params = SamplingParams(max_tokens=20, temperature=0, logit_bias={control: 50},
                                structured_output=StructuredOutput(json.dumps(schema)))
        text = llm.generate([PROMPTS[2]], params)[0].text
        assert "\x17" not in text and json.loads(text) is not None, text


def test_a_pattern_that_leaves_out_what_json_escapes_gives_json(llm):
    """A string's pattern becomes its grammar as written: one that excludes quotes, backslashes and control
    characters (as the refusal of the others says to) compiles, and a bias towards a backslash does not break
    the JSON."""
    pytest.importorskip("xgrammar")
    backslash = next(t for t in range(llm.tokenizer.vocab_size) if llm.tokenizer.decode([t]) == "\\")
    schema = {"type": "object", "required": ["s"],
              "properties": {"s": {"type": "string", "pattern": r'^[^"\\\x00-\x1f]{1,4}$'}}}
    params = SamplingParams(max_tokens=20, temperature=0, logit_bias={backslash: 50},
                            structured_output=StructuredOutput(json.dumps(schema)))
    out = llm.generate([PROMPTS[2]], params)[0]
    value = json.loads(out.text)
    assert out.finish_reason == "stop" and re.fullmatch(r'[^"\\\x00-\x1f]{1,4}', value["s"]), out.text


def test_a_grammar_can_start_after_a_marker(llm):
    """structured_output_after: free text until the marker, the grammar from the next token on; a marker
    that never comes leaves the output free."""
    pytest.importorskip("xgrammar")
    plain = llm.generate([PROMPTS[1]], GREEDY)[0]
    marker = llm.tokenizer.decode(plain.token_ids[:3])  # the greedy output's first three tokens
    later = SamplingParams(max_tokens=12, temperature=0, structured_output=StructuredOutput(regex="[a-c]{2}x"),
                           structured_output_after=marker)
    never = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, structured_output=StructuredOutput(
        regex="[a-c]{2}x"), structured_output_after="no such text")
    out, free = llm.generate([PROMPTS[1], PROMPTS[1]], [later, never])
    assert out.token_ids[:3] == plain.token_ids[:3] and out.finish_reason == "stop"
    assert re.fullmatch(re.escape(marker) + "[a-c]{2}x", out.text), out.text
    assert free.token_ids == plain.token_ids
    with pytest.raises(ValueError, match="structured_output_after"):
        llm.generate([PROMPTS[1]], SamplingParams(structured_output_after="</think>"))


def test_detokenizer_never_emits_broken_characters(llm):
    tokenizer = llm.tokenizer
    ids = tokenizer("café 東京 🙂 ok", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [1], stop=[])
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) + detok.flush() == "café 東京 🙂 ok"
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt and malloc_trim are glibc's")
def test_cpu_engine_reuses_freed_activations_and_can_hand_them_back(llm):
    """The llm fixture's CPU engine set the heap policy: four blocks of 20 MB, a prefill step's
    activations, allocated and freed again and again fault in no fresh pages after the first rounds
    (glibc's defaults map each one anew: 20,480 faults of 4 KB pages per round)."""
    faults = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [torch.ones(5 << 20) for _ in range(4)]
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        del blocks
    assert faults[-1] < 500, faults
    return_freed_memory()


def test_a_dropped_engine_frees_its_model_at_once(tmp_path):
    """Loading freezes what is alive out of the garbage collector, which then never frees a reference
    cycle among those objects: the model (and its one-call decoder, where the C kernels run) must be
    freed by reference counts alone."""
    engine = LLM(str(make_tiny_lcq(tmp_path, "llama", bits=4, rank=2, group_size=32)), block_size=8, **FP32)
    assert gc.get_freeze_count() > 0
    # the one-call decoder needs the C ops and layers it reads (indices or fp16 copies: the fp16 kernel)
    assert (engine.engine.runner.model.cpu_decoder is not None) == (cpu_ops.usable() and cpu_half.enabled())
    model = weakref.ref(engine.engine.runner.model)
    del engine
    assert model() is None


def test_async_engine_streams_aborts_and_drains(tiny, llm):
    async def scenario():
        engine = AsyncEngine(EngineConfig(model=str(tiny), block_size=8, max_num_seqs=2, max_queue=1))
        with pytest.raises(EngineNotReadyError):
            engine.add_request("early", [1, 2], GREEDY)
        await engine.start()
        deltas = [d async for d in engine.add_request("a", PROMPTS[0], GREEDY)]
        assert "".join(d.text for d in deltas) == llm.generate([PROMPTS[0]], GREEDY)[0].text
        assert deltas[-1].finish_reason == "length" and deltas[0].first_token_time is not None
        with pytest.raises(ContextLengthError, match="maximum context length is 256 tokens. However, your request "
                                                     "has 300 input tokens"):
            engine.add_request("long", [1] * 300, GREEDY)
        # Stop consuming mid-stream: the request is aborted and its blocks are freed.
        stream = engine.add_request("b", PROMPTS[1], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(100):
            if _pool_is_full(engine.engine):
                break
            await asyncio.sleep(0.02)
        assert _pool_is_full(engine.engine)
        # Queue full: a burst takes the free batch slots (max_num_seqs=2), then max_queue=1 waits, then 429.
        with engine._lock:  # hold the worker off so that all stay in its inbox
            streams = [engine.add_request(f"q{i}", PROMPTS[2], GREEDY) for i in range(3)]
            with pytest.raises(QueueFullError):
                engine.add_request("q3", PROMPTS[2], GREEDY)
            engine.abort("q2")
            taken_back = engine.add_request("r", PROMPTS[2], GREEDY)  # an aborted request in the inbox holds no place
            with pytest.raises(QueueFullError):
                engine.add_request("q3", PROMPTS[2], GREEDY)
        assert [d async for d in streams.pop()][-1].finish_reason == "abort"
        streams.append(taken_back)
        results = [[d async for d in s] for s in streams]
        assert all(r[-1].finish_reason == "length" for r in results)
        # Loading and every step ran on the one engine thread (one malloc arena, one OpenMP team).
        assert [t.name for t in threading.enumerate() if t.name.startswith("lcq-engine")] == ["lcq-engine_0"]
        long_running = engine.add_request("c", PROMPTS[0], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
        drain = asyncio.create_task(engine.shutdown(drain_timeout=10))
        deltas = [d async for d in long_running]
        await drain
        assert deltas[-1].finish_reason == "length" and engine.is_draining
        with pytest.raises(EngineNotReadyError):
            engine.add_request("late", [1], GREEDY)

    asyncio.run(scenario())


def test_async_engine_fails_requests_of_steps_that_keep_failing_and_ends_streams_when_it_stops(tiny, llm,
                                                                                               monkeypatch):
    """An engine step that raises (a bug outside the requests' own isolation) is tried again; after
    FAILED_STEPS_LIMIT in a row its requests fail and their blocks are freed, and the engine serves the next
    ones. A loop that dies ends every stream with an error and refuses new requests (health turns 503)."""
    async def scenario():
        engine = AsyncEngine(EngineConfig(model=str(tiny), block_size=8))
        await engine.start()
        schedule = engine.engine.scheduler.schedule
        with monkeypatch.context() as patch:
            patch.setattr(engine.engine.scheduler, "schedule", lambda: 1 / 0)
            deltas = [d async for d in engine.add_request("a", PROMPTS[0], GREEDY)]
        assert deltas[-1].finish_reason == "error" and "ZeroDivisionError" in deltas[-1].error
        assert _pool_is_full(engine.engine) and engine.engine.scheduler.schedule == schedule
        deltas = [d async for d in engine.add_request("b", PROMPTS[0], GREEDY)]
        assert [t for d in deltas for t in d.token_ids] == llm.generate([PROMPTS[0]], GREEDY)[0].token_ids
        with monkeypatch.context() as patch:
            patch.setattr(engine.engine, "has_work", lambda: 1 / 0)
            deltas = [d async for d in engine.add_request("c", PROMPTS[0], GREEDY)]
        assert deltas[-1].finish_reason == "error" and not engine.is_ready
        with pytest.raises(EngineNotReadyError, match="the engine stopped: ZeroDivisionError"):
            engine.add_request("d", PROMPTS[0], GREEDY)
        await engine.shutdown(drain_timeout=1)

    asyncio.run(scenario())


def test_a_row_that_cannot_be_sampled_fails_alone_and_leaves_seeds_as_they_were(llm):
    """A row with no allowed token (allowed_token_ids holding only EOS, which min_tokens holds back) makes the
    batched draw fail; the batch is drawn again row by row from the seeded generators' states before."""
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], seeded)[0].token_ids
    stuck = SamplingParams(max_tokens=8, temperature=1.0, allowed_token_ids=[EOS_ID], min_tokens=2)
    together = llm.generate([PROMPTS[0], PROMPTS[1]], [seeded, stuck])
    assert together[0].token_ids == alone
    assert together[1].finish_reason == "error" and _pool_is_full(llm.engine)


def test_stop_tokens_text_and_cached_tokens_after_preemption(tiny, llm):
    """A stop token's text is left out unless include_stop_str_in_output (vLLM's); stop_token_ids must be
    token ids; a preempted sequence's recompute from the prefix cache is not reported as cached prompt tokens."""
    tokenizer = llm.engine.tokenizer
    stop = tokenizer.encode(" the")[-1]
    for include in (False, True):  # the stop token forced by a bias: the output is it alone
        params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop], logit_bias={stop: 100},
                                include_stop_str_in_output=include)
        out = llm.generate([PROMPTS[2]], params)[0]
        assert out.token_ids == [stop] and out.stop_reason == stop
        assert out.text == (tokenizer.decode([stop]) if include else "")
    with pytest.raises(ValueError, match=r"stop_token_ids must be in \[0"):
        llm.generate([PROMPTS[2]], SamplingParams(max_tokens=2, stop_token_ids=[10**6]))
    # Two sequences of 63 tokens in 12 blocks of 8: one is preempted, then takes its blocks back from the cache.
    small = LLM(str(tiny), block_size=8, kv_cache_memory_gb=12 * small_block_bytes(llm) / 2**30, **FP32)
    outs = small.generate([PROMPTS[1], [40, 41, 42]], SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
    assert small.engine.stats().num_preemptions_total > 0
    assert [o.usage.cached_tokens for o in outs] == [0, 0]


@pytest.mark.gpu
# gpt-oss: a mixture, its experts routed in the graph; Qwen3.5's (Granite 4.0-H's): linear attention's (Mamba-2's)
# states by slot in the graph; Nemotron 3's blocks of one part, its ungated experts; Falcon-H1's Mamba-2 beside attention
@pytest.mark.parametrize("arch", ["llama", "gpt_oss", "qwen3_5_moe", "granite4_moe", "nemotron_h_moe", "falcon_h1"])
def test_cuda_graphs_give_the_eager_tokens(tmp_path, arch):
    folder = make_tiny_lcq(tmp_path, arch, bits=2, rank=2, group_size=32)
    prompts = PROMPTS + [[60 + i for i in range(9)], [70, 71]]  # 5 sequences: a padded graph batch of 8
    graphed = cuda_llm(folder, block_size=8, max_num_seqs=8)
    assert graphed.engine.runner.graphs is not None and graphed.engine.runner.graphs.sizes == [1, 2, 4, 8]
    eager = cuda_llm(folder, block_size=8, max_num_seqs=8, cuda_graphs=False)
    assert [o.token_ids for o in graphed.generate(prompts, GREEDY)] == \
        [o.token_ids for o in eager.generate(prompts, GREEDY)]
    assert _pool_is_full(graphed.engine)


@pytest.mark.gpu
def test_cuda_steps_launched_ahead_give_the_tokens_of_steps_read_one_at_a_time(tmp_path, monkeypatch):
    """On a GPU async scheduling is on by default: graphed steps launched from the last step's tokens on the
    device give the tokens of steps read one at a time (greedy, seeded top-p and top-k, penalties, min_tokens,
    logit_bias, a stop token mid-way, logprobs). Launching a step ahead, drawing its tokens and reading a step back
    wait for nothing queued on the GPU (torch's sync debug mode raises on a stream sync there: a torch.tensor(...,
    device=cuda), a .item(), a .tolist() of a device tensor)."""
    import lcq.runtime.engine as engine_module

    folder = make_tiny_lcq(tmp_path, "llama", bits=2, rank=2, group_size=32)
    prompts = PROMPTS + [[60 + i for i in range(9)], [70, 71]]
    ahead = cuda_llm(folder, block_size=8, max_num_seqs=8)
    assert ahead.engine.async_scheduling and ahead.engine.runner.graphs is not None
    one_at_a_time = cuda_llm(folder, block_size=8, max_num_seqs=8, async_scheduling=False)
    stop = one_at_a_time.generate(prompts[2:3], GREEDY)[0].token_ids[5]  # (a stop mid-way for the third)
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=1.2,
                             presence_penalty=0.5, logit_bias={7: 3.0}),
              SamplingParams(max_tokens=14, temperature=0.9, top_p=0.9, top_k=20, seed=4, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop], min_tokens=2),
              SamplingParams(max_tokens=10, temperature=0.7, seed=1, logprobs=3, ignore_eos=True), GREEDY]
    # (the one-at-a-time run first: it autotunes the head's products for each batch, which times them)
    expected = [(o.token_ids, [p.token_id for p in o.logprobs or []]) for o in one_at_a_time.generate(prompts, params)]
    launched = []  # whether each step went ahead

    def strict(method):
        def without_syncs(self, *args):
            torch.cuda.set_sync_debug_mode("error")
            try:
                result = method(self, *args)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            if method.__name__ == "_go_ahead":
                launched.append(result is not None)
            return result
        return without_syncs

    # (reading a step back waits for its draw's copies to the host, not for the stream: the forward pass queued
    # ahead after them would be waited for too, and the host would take the tokens in with the GPU idle)
    for name in ("_take_ahead", "_go_ahead", "_complete"):
        monkeypatch.setattr(engine_module.LLMEngine, name, strict(getattr(engine_module.LLMEngine, name)))
    failed = []  # (_go_ahead logs a failure and _draw swallows one: either step then runs as before)
    monkeypatch.setattr(engine_module, "choose", _recording(engine_module.choose, failed))
    monkeypatch.setattr(engine_module.logger, "exception",
                        lambda message, *args, **kwargs: failed.append(message % args))
    tokens = [(o.token_ids, [p.token_id for p in o.logprobs or []]) for o in ahead.generate(prompts, params)]
    assert not failed and tokens == expected
    assert sum(launched) > 10 and _pool_is_full(ahead.engine) and ahead.engine.ahead is None


def _recording(function, failures: list):
    """function, appending what it raises to failures before raising it."""
    def recorded(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as e:
            failures.append(repr(e))
            raise
    return recorded


@pytest.mark.gpu
def test_cuda_graphs_give_the_eager_tokens_from_byte_codebooks(tmp_path, monkeypatch):
    """Under LCQ_BYTE_BOOK=1 every decode product of up to 32 rows takes its weights from byte codebooks (the
    byte_slots table made before capture, tiles of 16 rows for 1-2): graphed steps give the eager tokens, and the
    products are those of byte_book_weights, not the exact ones."""
    from lcq.kernels import LCQLinear, triton_linear
    from lcq.kernels.byte_products import byte_book_weights

    monkeypatch.setenv("LCQ_BYTE_BOOK", "1")
    monkeypatch.setenv("LCQ_INT8_DECODE", "0")  # (else products of bytes take the steps of 1-2 sequences)
    folder = make_tiny_lcq(tmp_path, "llama", bits=2, rank=2, group_size=32)
    prompts = PROMPTS + [[60 + i for i in range(9)], [70, 71]]
    graphed = cuda_llm(folder, block_size=8, max_num_seqs=8)
    eager = cuda_llm(folder, block_size=8, max_num_seqs=8, cuda_graphs=False)
    assert [o.token_ids for o in graphed.generate(prompts, GREEDY)] == \
        [o.token_ids for o in eager.generate(prompts, GREEDY)]
    layer = next(m.layer for m in eager.engine.runner.model.modules() if isinstance(m, LCQLinear))
    x = torch.randn(3, layer.in_features, device="cuda", dtype=torch.float16)
    assert triton_linear.byte_book_decode(x, 16, layer.bits)
    expected = x.double().cpu() @ byte_book_weights(layer.to("cpu")).t()
    assert torch.allclose(triton_linear.decode(x, layer).double().cpu(), expected, rtol=5e-3, atol=5e-3)


@pytest.mark.gpu
def test_cuda_graphs_hold_lora_adapters(tmp_path):
    """Decode graphs captured with two adapters serve steps that mix them with the base model: the
    eager engine's tokens, which differ from the base's; so do graphs captured before adapters were
    loaded into their slots, and after one was swapped for other weights."""
    folder = make_tiny_lcq(tmp_path, "qwen3", bits=2, rank=2, group_size=32)
    modules = ",".join(f"{name}={make_tiny_adapter(tmp_path / name, folder, seed=seed)}"
                       for seed, name in enumerate(("sql", "chat")))
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, lora=lora)
              for lora in ("sql", None, "chat", "sql", None)]
    prompts = PROMPTS + [[60 + i for i in range(9)], [70, 71]]
    graphed = cuda_llm(folder, block_size=8, max_num_seqs=8, lora_modules=modules)
    assert graphed.engine.runner.graphs is not None
    eager = cuda_llm(folder, block_size=8, max_num_seqs=8, cuda_graphs=False, lora_modules=modules)
    tokens = [o.token_ids for o in graphed.generate(prompts, params)]
    assert tokens == [o.token_ids for o in eager.generate(prompts, params)]
    assert tokens[0] != [o.token_ids for o in eager.generate(prompts[:1], GREEDY)][0]
    # Graphs captured before any adapter was loaded replay the slots as loads and unloads rewrite them.
    loaded = cuda_llm(folder, block_size=8, max_num_seqs=8, max_loras=2, allow_runtime_lora_updating=True)
    assert loaded.engine.runner.graphs is not None
    for name in ("chat", "sql"):
        loaded.load_lora_adapter(name, tmp_path / name)
    assert [o.token_ids for o in loaded.generate(prompts, params)] == tokens
    loaded.unload_lora_adapter("sql")
    loaded.load_lora_adapter("sql", tmp_path / "chat")  # other weights under the same name
    swapped = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, lora="chat" if lora else None)
               for lora in ("sql", None, "chat", "sql", None)]
    assert [o.token_ids for o in loaded.generate(prompts, params)] == \
        [o.token_ids for o in eager.generate(prompts, swapped)]


@pytest.mark.gpu
def test_cuda_graphs_hold_lora_adapters_over_a_mixture(tmp_path):
    """A mixture's decode graphs (its experts routed on the device) with adapters on its attention serve
    steps mixing them with the base model: the eager engine's tokens."""
    folder = make_tiny_lcq(tmp_path, "qwen3_moe", bits=2, rank=2, group_size=32)
    adapter = make_tiny_adapter(tmp_path / "attention", folder, targets=("self_attn.q_proj", "self_attn.v_proj"))
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, lora=lora)
              for lora in ("attention", None, "attention")]
    graphed = cuda_llm(folder, block_size=8, max_num_seqs=4, lora_modules=f"attention={adapter}")
    assert graphed.engine.runner.graphs is not None
    eager = cuda_llm(folder, block_size=8, max_num_seqs=4, cuda_graphs=False, lora_modules=f"attention={adapter}")
    assert [o.token_ids for o in graphed.generate(PROMPTS, params)] == \
        [o.token_ids for o in eager.generate(PROMPTS, params)]


def test_generation_bench_curve_measures_throughput_and_ttft(tiny):
    """bench/generate.py's curve (the GPU 7B rows): every row has its throughput and TTFT, and is saved
    as it is measured."""
    from bench.generate import throughput_curve

    llm = LLM(str(tiny), block_size=8, max_num_seqs=2, **FP32)
    rows, saved = [], []
    throughput_curve(llm, "tiny", "fp32", [1, 2], rows, lambda: saved.append(len(rows)))
    throughput_curve(llm, "tiny", "fp32", [1], rows, lambda: saved.append(len(rows)), prompt_tokens=200)
    assert saved == [1, 2, 3] and [r["concurrency"] for r in rows] == [1, 2, 1]
    assert all(r["output_tok_s"] > 0 and r["ttft_ms"] > 0 and r["peak_mem_GB"] > 0 for r in rows)
    assert [r.get("prompt_tokens") for r in rows] == [None, None, 200]


def test_generation_bench_decode_profile_runs_without_a_gpu(tiny):
    """bench/generate.py's decode profile (the GPU 7B runs): on CPU it times the steps and finds no GPU kernel."""
    from bench.generate import decode_profile

    profile = decode_profile(LLM(str(tiny), block_size=8, max_num_seqs=2, **FP32), tokens=4)
    assert profile["wall_ms_per_token"] > 0 and profile["kernels_per_token"] == 0 and profile["top"] == []


def test_generation_bench_host_profile_times_a_prefill_and_the_decode_steps(tiny):
    """bench/generate.py's host profile: per prefill and per decoded token, the functions that took the host's
    time, the model's forward among them."""
    from bench.generate import host_profile

    profile = host_profile(LLM(str(tiny), block_size=8, max_num_seqs=2, **FP32), tokens=4, top=40)
    for part in ("prefill", "decode"):
        assert profile[part]["wall_ms_per_token"] > 0
        assert any("forward" in entry["function"] for entry in profile[part]["top"])
        assert all(entry["self_ms_per_token"] >= 0 and entry["calls_per_token"] > 0 for entry in profile[part]["top"])


def test_generation_bench_keeps_a_failed_engines_error_and_frees_it(tiny):
    """bench/generate.py's GPU runs: an engine that fails leaves a row with its error and no reference to itself
    (the next engine sizes its KV cache from the memory then free), and the run goes on."""
    import weakref

    from bench.generate import run_recording_failure

    rows, saved, engines = [], [], []

    def failing() -> None:
        llm = LLM(str(tiny), block_size=8, max_num_seqs=2, **FP32)
        engines.append(weakref.ref(llm))
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0))
        raise RuntimeError("a kernel the GPU refused")

    run_recording_failure(failing, rows, lambda: saved.append(len(rows)), model="tiny", variant="broken")
    assert rows == [{"model": "tiny", "variant": "broken", "error": "RuntimeError: a kernel the GPU refused"}]
    assert saved == [1] and engines[0]() is None
    run_recording_failure(lambda: rows.append({"model": "tiny"}), rows, lambda: saved.append(len(rows)))
    assert rows[-1] == {"model": "tiny"} and saved == [1]


def test_generation_bench_reports_medians_and_per_round_ratios():
    from bench.generate import median_rows, round_ratios

    def row(engine, concurrency, speed, ttft=None, **extra):
        return dict(engine=engine, weights="w", concurrency=concurrency, output_tok_s=speed, ttft_ms=ttft,
                    peak_mem_GB=1.0 + speed / 1000, **extra)

    rounds = [[row("lcq", 1, 100.0, 50.0, variant="lcq"), row("lcq", 64, 400.0, variant="lcq"),
               row("transformers", 1, 10.0, 200.0), row("transformers", 64, 50.0)],
              [row("transformers", 64, 80.0), row("transformers", 1, 20.0, 100.0),
               row("lcq", 64, 480.0, variant="lcq"), row("lcq", 1, 120.0, 70.0, variant="lcq")],
              [row("lcq", 1, 90.0, 60.0, variant="lcq"), row("lcq", 64, 500.0, variant="lcq"),
               row("transformers", 1, 15.0, 300.0), row("transformers", 64, 60.0)]]
    ours = {r["concurrency"]: r for r in median_rows(rounds, "lcq")}
    assert ours[1]["output_tok_s"] == 100.0 and ours[1]["ttft_ms"] == 60.0
    assert ours[64]["output_tok_s"] == 480.0 and ours[64]["output_tok_s_rounds"] == [400.0, 480.0, 500.0]
    assert ours[64]["peak_mem_GB"] == 1.4  # the first round's
    assert round_ratios(rounds) == {"lcq / transformers at concurrency 1": [10.0, 6.0, 6.0],
                                    "lcq / transformers at concurrency 64": [8.0, 6.0, 8.33]}


def test_async_engine_that_failed_to_load_stops_its_thread(tiny, tmp_path):
    """A folder without weights fails in the loading thread, which then ends; one that is not there (nor a Hub id
    in the cache) fails before any thread starts."""
    def engine_threads() -> int:
        return sum(t.name.startswith("lcq-engine") for t in threading.enumerate())

    weightless = shutil.copytree(tiny, tmp_path / "weightless", ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(UserError, match="no such model folder"):
        AsyncEngine(EngineConfig(model=str(tmp_path / "no-such-model")))

    async def scenario(before: int):
        engine = AsyncEngine(EngineConfig(model=str(weightless)))
        with pytest.raises(FormatError, match="no model.safetensors"):
            await engine.start()
        assert engine_threads() == before + 1 and not engine.is_ready
        await engine.shutdown()

    before = engine_threads()
    asyncio.run(scenario(before))
    deadline = time.time() + 10
    while engine_threads() > before:
        assert time.time() < deadline, "the loading thread outlived shutdown"
        time.sleep(0.02)


def test_max_logprobs_bounds_the_alternatives_asked_for(tiny, llm):
    """vLLM's max_logprobs: 20 alternatives by default, as many as it says, or any (-1: up to the vocabulary)."""
    with pytest.raises(ValueError, match="logprobs must be between 0 and 20"):
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=1, logprobs=21))
    with pytest.raises(ValueError, match="prompt_logprobs must be between 0 and 20"):
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=1, prompt_logprobs=21))
    wide = LLM(str(tiny), max_logprobs=-1, **FP32)
    vocab = wide.engine.runner.model_config.vocab_size
    out = wide.generate(PROMPTS[:1], SamplingParams(max_tokens=2, temperature=0, logprobs=vocab))[0]
    assert all(len(step.top) == vocab for step in out.logprobs)
    with pytest.raises(ValueError, match="max_logprobs must be -1"):
        EngineConfig(model=str(tiny), max_logprobs=-2).validate()


def test_generation_config_sets_the_defaults_of_unset_fields(tiny, llm, tmp_path):
    """The model's generation_config.json sampling values fill what a request leaves unset (vLLM's
    `generation_config="auto"`); `vllm` keeps the built-in ones; values no request may ask are refused."""
    folder = shutil.copytree(tiny, tmp_path / "tuned")
    path = folder / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "temperature": 0.0, "top_k": 20,
                                "max_new_tokens": 7, "do_sample": True}))
    tuned = LLM(str(folder), block_size=8, **FP32)
    defaults = tuned.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.max_tokens, defaults.top_p) == (0.0, 20, 7, 1.0)
    outs = tuned.generate(PROMPTS)  # greedy and 7 tokens, where the built-in defaults sample 16
    assert [o.token_ids for o in outs] == [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=7,
                                                                                                   temperature=0))]
    assert LLM(str(folder), block_size=8, generation_config="vllm", **FP32).get_default_sampling_params() == \
        SamplingParams()
    assert LLM(str(tiny), generation_config=str(folder)).get_default_sampling_params() == defaults  # another's
    # vLLM's override_generation_config: its keys replace the file's (the others stay), or are all with vllm
    overridden = LLM(str(folder), block_size=8, override_generation_config={"top_k": 5, "temperature": 0.7}, **FP32)
    got = overridden.get_default_sampling_params()
    assert (got.temperature, got.top_k, got.max_tokens) == (0.7, 5, 7)
    only = LLM(str(folder), block_size=8, generation_config="vllm", override_generation_config={"top_k": 5}, **FP32)
    assert only.get_default_sampling_params() == SamplingParams(top_k=5)
    with pytest.raises(ValueError, match="override_generation_config: 'temprature' not read"):
        EngineConfig(model=str(folder), override_generation_config={"temprature": 0.5}).validate()
    with pytest.raises(ValueError, match="with override_generation_config: temperature must be between 0 and 2"):
        EngineConfig(model=str(folder), override_generation_config={"temperature": 3}).validate()
    path.write_text(json.dumps({"temperature": 3.0}))
    with pytest.raises(ValueError, match="generation_config.json: temperature must be between 0 and 2"):
        LLM(str(folder))
    with pytest.raises(ValueError, match="auto, vllm or a folder"):
        LLM(str(tiny), generation_config=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("arch, targets, layers", [
    ("qwen3_5", ("mlp.gate_proj", "mlp.down_proj"), None),
    ("lfm2", ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"), None),
    ("granite4_hybrid", ("shared_mlp.input_linear", "shared_mlp.output_linear"), None),
    ("nemotron_h", ("mixer.up_proj", "mixer.down_proj"), [1, 4]),  # (its MLP blocks)
    ("falcon_h1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "feed_forward.gate_proj",
                   "feed_forward.down_proj"), None),
    ("arcee", ("self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"), None)])
def test_lora_adapters_on_recurrent_models_and_ungated_mlps(tmp_path, one_call_steps, arch, targets, layers):
    """An adapter on the MLPs of a model with recurrent layers (whose attention takes none) gives the greedy
    tokens of transformers' own class with the adapter merged: LFM2's w1/w3/w2 and Granite 4.0-H's fused
    input_linear (split into gate and up, its output_linear's B scaled by the residual factor folded into
    down_proj) and Nemotron-H's MLP blocks (up_proj alone, no gate; its Mamba-2 and attention blocks' mixer
    modules take none) reach the matrices lcq reads them as; on Falcon-H1's attention and MLP, the factors folded
    into those matrices scale the adapters' products alike; Arcee's ungated MLP (up_proj alone). From fp16
    weights: the decode steps with adapter rows run the one-call C step where it builds."""
    import transformers

    folder = make_tiny_hf(tmp_path / "hf", arch, dtype=torch.float16)
    adapter = make_tiny_adapter(tmp_path / "adapter", folder, targets=targets, alpha=64.0, layers=layers)
    family = json.loads((folder / "config.json").read_text())["architectures"][0]
    merged = merge_adapter(getattr(transformers, family).from_pretrained(folder, dtype=torch.float32).eval(), adapter)
    expected = [_transformers_greedy(None, prompt, 12, merged) for prompt in PROMPTS]
    assert expected != [_transformers_greedy(folder, prompt, 12) for prompt in PROMPTS]
    llm = LLM(str(folder), block_size=8, lora_modules=f"tuned={adapter}", **FP32)
    tuned = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, lora="tuned")
    assert [o.token_ids for o in llm.generate(PROMPTS, tuned)] == expected
    folded = arch in ("granite4_hybrid", "falcon_h1")  # factors folded into the weights: no exact fp16 copies
    assert any(one_call_steps) == (_one_call_builds() and not folded)


@pytest.mark.parametrize("base", ["fp32", "fp16", "lcq"])
def test_lora_adapter_matches_transformers_with_merged_weights(tiny, tmp_path, one_call_steps, base):
    """Adapters served over the unmerged base (dense, or LCQ with Qwen2's qkv bias) give the greedy
    tokens of transformers with each adapter merged into the weights, alone and batched with each other
    (different ranks and layers) and with base-model requests; the prefix cache never hands an adapter
    the base model's KV blocks, but does its own. Over fp16 and LCQ weights the decode steps, adapters
    and all, run the one-call C step where it builds."""
    folder = tiny if base == "fp32" else make_tiny_hf(tmp_path / "hf16", "llama", dtype=torch.float16) \
        if base == "fp16" else make_tiny_lcq(tmp_path, "qwen2", bits=3, rank=2, group_size=32)
    adapter = make_tiny_adapter(tmp_path / "adapter", folder)
    other = make_tiny_adapter(tmp_path / "other", folder, rank=6, seed=1,
                              targets=("self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj"))
    llm = LLM(str(folder), block_size=8, lora_modules=f"sql={adapter},chat={other}", **FP32)
    tuned = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, lora="sql")
    merged = merge_adapter(load_reference_model(folder), adapter)
    expected = [_transformers_greedy(None, prompt, 12, merged) for prompt in PROMPTS]
    other_merged = merge_adapter(load_reference_model(folder), other)
    expected_other = [_transformers_greedy(None, prompt, 12, other_merged) for prompt in PROMPTS]
    base_tokens = [_transformers_greedy(folder, prompt, 12) for prompt in PROMPTS]
    assert expected != base_tokens and expected_other != base_tokens
    chat = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, lora="chat")
    outs = llm.generate(PROMPTS * 3, [tuned] * 3 + [GREEDY] * 3 + [chat] * 3)
    assert [o.token_ids for o in outs] == expected + base_tokens + expected_other
    prompt = list(range(60, 80))  # two full blocks, cached by the base model first
    llm.generate([prompt], GREEDY)
    first, again = (llm.generate([prompt], tuned)[0] for _ in range(2))
    assert first.usage.cached_tokens == 0 and again.usage.cached_tokens == 16
    assert first.token_ids == again.token_ids == _transformers_greedy(None, prompt, 12, merged)
    assert _pool_is_full(llm.engine)
    with pytest.raises(AdapterNotFoundError, match="`other` does not exist"):
        llm.generate(PROMPTS[:1], SamplingParams(lora="other"))
    assert any(one_call_steps) == (base != "fp32" and _one_call_builds())  # adapter rows' steps ran the C step
    scored = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, lora="sql",
                                                      logprobs=1))[0]  # each decode step's logprob, to 1e-4
    with torch.no_grad():
        expected = torch.log_softmax(merged(torch.tensor([PROMPTS[0] + scored.token_ids])).logits[0].float(), -1)
    for i, entry in enumerate(scored.logprobs):
        assert entry.logprob == pytest.approx(float(expected[len(PROMPTS[0]) - 1 + i, entry.token_id]), abs=1e-4)


def test_lora_adapters_over_a_mixture_of_experts(tmp_path, one_call_steps):
    """Over an LCQ Qwen3-MoE (its second layer dense): adapters on the attention of every layer and on the
    dense layer's MLP give the greedy tokens of transformers with them merged, batched with each other and
    with base-model requests (through the one-call C decode step where it builds); an adapter on an expert's
    matrix is refused by name."""
    from tests.tiny_model import write_lora_pair

    folder = make_tiny_lcq(tmp_path, "qwen3_moe", bits=3, rank=2, group_size=32)
    attention = make_tiny_adapter(tmp_path / "attention", folder, targets=("self_attn.q_proj", "self_attn.v_proj",
                                                                             "self_attn.o_proj"))
    dense = make_tiny_adapter(tmp_path / "dense", folder, rank=6, seed=1, layers=[1],
                              targets=("self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj"))
    llm = LLM(str(folder), block_size=8, lora_modules=f"attention={attention},dense={dense}", **FP32)
    expected = {name: [_transformers_greedy(None, prompt, 12, merge_adapter(load_reference_model(folder), adapter))
                       for prompt in PROMPTS] for name, adapter in (("attention", attention), ("dense", dense))}
    base = [_transformers_greedy(folder, prompt, 12) for prompt in PROMPTS]
    assert expected["attention"] != base and expected["dense"] != base
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, lora=lora)
              for lora in ("attention", None, "dense")]
    outs = llm.generate(PROMPTS * 3, [p for p in params for _ in PROMPTS])
    assert [o.token_ids for o in outs] == expected["attention"] + base + expected["dense"]
    assert any(one_call_steps) == _one_call_builds()
    assert _pool_is_full(llm.engine)
    expert = write_lora_pair(tmp_path / "expert", "model.layers.0.mlp.experts.0.gate_proj", 96, 64)
    with pytest.raises(UserError, match="experts.0.gate_proj is not a linear layer .*a mixture's experts"):
        LLM(str(folder), lora_modules=f"expert={expert}", **FP32)


@pytest.mark.parametrize("arch, family, targets", [
    ("phi3", "Phi3ForCausalLM", ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj")),
    ("granite", "GraniteForCausalLM", ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")),
    ("granite4", "GraniteMoeHybridForCausalLM", ("self_attn.q_proj", "shared_mlp.input_linear",
                                                 "shared_mlp.output_linear")),
    ("ernie4_5", "Ernie4_5ForCausalLM", ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj")),
    ("glm", "GlmForCausalLM", ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_up_proj")),
    ("glm4", "Glm4ForCausalLM", ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_up_proj"))])
def test_lora_adapters_of_architectures_read_as_another(tmp_path, arch, family, targets):
    """Adapters trained on a model lcq reads as another architecture, named by that model's own matrices:
    Phi-4-mini-style fused q/k/v and gate/up (with the partial rotary embedding's reordered, scaled query
    rows), Granite's folded factors (Granite 4.0's with its shared MLP's fused input split), ERNIE's
    reordered query and key rows. Served over the full-precision folder, the greedy tokens and prompt
    logprobs are those of transformers' own class with the adapter merged; over an LCQ checkpoint quantized
    from that folder (which records its config), the adapter's matrices are the same as over the folder."""
    import transformers

    from lcq.models import ModelConfig
    from lcq.models.lora import load_adapter
    from lcq.quantizer import QuantizeOptions, quantize_model
    from tests.tiny_model import CALIBRATION_TEXT

    folder = make_tiny_hf(tmp_path / "hf", arch, **(phi3_longrope(64, 0.75) if arch == "phi3" else {}))
    adapter = make_tiny_adapter(tmp_path / "adapter", folder, targets=targets)
    merged = merge_adapter(getattr(transformers, family).from_pretrained(folder, dtype=torch.float32).eval(), adapter)
    base = load_reference_model(folder)

    def scored(model, prompt: list[int]) -> torch.Tensor:  # each prompt token's logprob after the ones before
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
        return logprobs[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]

    # Served within Phi's original context: the short factors, as transformers on these lengths.
    llm = LLM(str(folder), block_size=8, max_model_len=64, lora_modules=f"tuned={adapter}", **FP32)
    tuned = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, lora="tuned", prompt_logprobs=0)
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, tuned)):
        assert out.token_ids == _transformers_greedy(None, prompt, 12, merged)
        served = torch.tensor([entry.logprob for entry in out.prompt_logprobs[1:]])
        torch.testing.assert_close(served, scored(merged, prompt), rtol=0, atol=1e-4)
        assert (served - scored(base, prompt)).abs().max() > 1e-3  # the adapter changes them (10x the tolerance)
    options = QuantizeOptions(bits=4, rank=2, group_size=32, calib_text=CALIBRATION_TEXT, nsamples=2, seqlen=16,
                              epochs=0)
    quantize_model(folder, tmp_path / "lcq", options, progress=False)
    over_folder, over_lcq = (load_adapter(adapter, ModelConfig.from_folder(model)).parts
                             for model in (folder, tmp_path / "lcq"))
    parts = {"phi3": 6, "granite4": 4, "glm": 4, "glm4": 4}.get(arch, 3)  # fused matrices count as their parts
    assert over_folder.keys() == over_lcq.keys() and len(over_folder) == 2 * parts
    for name, (a, b) in over_folder.items():
        assert torch.equal(a, over_lcq[name][0]) and torch.equal(b, over_lcq[name][1])


def test_lora_adapters_that_would_be_served_wrongly_are_refused(tiny, tmp_path):
    import json

    adapter = make_tiny_adapter(tmp_path / "dora", tiny)
    settings = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**settings, "use_dora": True}))
    with pytest.raises(UserError, match="use_dora True is not supported"):
        LLM(str(tiny), lora_modules=f"d={adapter}")
    with pytest.raises(ValueError, match="holds no adapter_config.json"):
        LLM(str(tiny), lora_modules=f"x={tmp_path}")
    with pytest.raises(ValueError, match="name=folder entries"):
        LLM(str(tiny), lora_modules="just-a-folder")
    wide = make_tiny_adapter(tmp_path / "wide", make_tiny_hf(tmp_path / "wider", "llama", hidden_size=128))
    with pytest.raises(UserError, match="do not fit"):
        LLM(str(tiny), lora_modules=f"w={wide}")


def test_malformed_lora_folders_are_one_line_and_alpha_defaults_as_peft(tiny, tmp_path):
    """What a hand-made or damaged adapter folder holds is refused as UserError (a 400 when loaded at run
    time), never a TypeError or IndexError from inside; without lora_alpha the scale is PEFT's 8 / r."""
    from safetensors.torch import load_file, save_file

    from lcq.models.config import ModelConfig
    from lcq.models.lora import load_adapter

    config = ModelConfig.from_folder(tiny)
    good = make_tiny_adapter(tmp_path / "good", tiny, rank=4, alpha=8.0)
    settings = json.loads((good / "adapter_config.json").read_text())
    tensors = load_file(str(good / "adapter_model.safetensors"))
    first_a = next(name for name in tensors if name.endswith(".lora_A.weight"))

    def variant(name: str, config_text: str | None = None, changed: dict | None = None) -> Path:
        folder = Path(shutil.copytree(good, tmp_path / name))
        if config_text is not None:
            (folder / "adapter_config.json").write_text(config_text)
        if changed is not None:
            save_file({k: v for k, v in {**tensors, **changed}.items() if v is not None},
                      str(folder / "adapter_model.safetensors"))
        return folder

    cases = [(variant("listed", "[1, 2]"), "not an object of settings"),
             (variant("text-alpha", json.dumps({**settings, "lora_alpha": "16"})), "lora_alpha must be a positive"),
             (variant("infinite-alpha", json.dumps({**settings, "lora_alpha": float("inf")})),  # (JSON's Infinity)
              "lora_alpha must be a positive"),
             (variant("lone-b", changed={first_a: None}), "B without its A"),
             (variant("flat-a", changed={first_a: tensors[first_a].flatten()}), "not a LoRA pair")]
    for folder, message in cases:
        with pytest.raises(UserError, match=message):
            load_adapter(folder, config)
    unset = variant("no-alpha", json.dumps({k: v for k, v in settings.items() if k != "lora_alpha"}))
    explicit = load_adapter(good, config).parts
    for name, (a, b) in load_adapter(unset, config).parts.items():
        torch.testing.assert_close(b, explicit[name][1])  # alpha 8 either way


def test_gpu_dtype_follows_the_checkpoint_and_gemma_runs_in_bfloat16(tmp_path):
    """dtype auto on a GPU, as vLLM: bf16 for a bf16 checkpoint, fp16 for fp16 and fp32 ones and for LCQ
    checkpoints (their full-precision tensors are fp16, whatever the source's dtype), bf16 for Gemma
    always (its residual stream outgrows fp16); fp32 on CPU."""
    from lcq.quantizer import QuantizeOptions, quantize_model
    from tests.tiny_model import CALIBRATION_TEXT

    gemma, llama = make_tiny_hf(tmp_path / "gemma", "gemma3"), make_tiny_hf(tmp_path / "llama", "llama")
    bf16 = make_tiny_hf(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    options = QuantizeOptions(bits=4, rank=1, group_size=32, method="rtn", calib_text=CALIBRATION_TEXT)
    quantize_model(bf16, tmp_path / "lcq", options, progress=False)
    expected = {gemma: torch.bfloat16, llama: torch.float16, bf16: torch.bfloat16, tmp_path / "lcq": torch.float16}
    for folder, dtype in expected.items():
        assert EngineConfig(model=str(folder), device="cuda").resolved_dtype() == dtype, folder
    assert EngineConfig(model=str(gemma), device="cpu").resolved_dtype() == torch.float32


def test_gpu_without_bfloat16_takes_float16(tmp_path, monkeypatch):
    """On a GPU of compute capability 7.5 (a T4, as torch reports one), dtype auto takes float16 for a bf16
    checkpoint and for Gemma, as vLLM does, where bf16 arithmetic is missing; bfloat16 asked for is refused with the
    way out; float16 checkpoints stay float16."""
    gemma, llama = make_tiny_hf(tmp_path / "gemma", "gemma3"), make_tiny_hf(tmp_path / "llama", "llama")
    bf16 = make_tiny_hf(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    expected = {gemma: torch.float16, llama: torch.float16, bf16: torch.float16}
    for folder, dtype in expected.items():
        assert EngineConfig(model=str(folder), device="cuda").resolved_dtype() == dtype, folder
    with pytest.raises(UserError, match=r"compute capability 8.0 or later \(Ampere\); this Tesla T4 is 7.5: use"):
        EngineConfig(model=str(bf16), device="cuda", dtype="bfloat16").resolved_dtype()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert EngineConfig(model=str(bf16), device="cuda", dtype="bfloat16").resolved_dtype() == torch.bfloat16
    assert EngineConfig(model=str(gemma), device="cuda").resolved_dtype() == torch.bfloat16


@pytest.mark.parametrize("weights", ["fp32", "fp16"])
def test_lora_adapters_loaded_at_runtime_equal_those_given_at_start(tiny, tiny16, tmp_path, weights):
    """Adapters loaded into free slots give the tokens of the same adapters given as lora_modules, batched
    with each other and the base model; an unloaded one is refused and its slot serves the next load
    (fp16 weights: through the one-call C decode step)."""
    tiny = tiny if weights == "fp32" else tiny16
    sql = make_tiny_adapter(tmp_path / "sql", tiny)
    chat = make_tiny_adapter(tmp_path / "chat", tiny, rank=6, seed=1, targets=("self_attn.k_proj", "mlp.gate_proj"))
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, lora=lora) for lora in ("sql", None, "chat")]
    fixed = LLM(str(tiny), block_size=8, lora_modules=f"sql={sql},chat={chat}", **FP32)
    expected = [fixed.generate([prompt], p)[0].token_ids for prompt, p in zip(PROMPTS, params)]
    assert fixed.engine.runner.adapters.stack.rank == 6  # fixed adapters: their largest rank, no more
    llm = LLM(str(tiny), block_size=8, max_loras=2, **FP32)
    assert llm.engine.runner.adapters.stack.rank == 16  # vLLM's default max_lora_rank
    llm.load_lora_adapter("sql", sql)
    llm.load_lora_adapter("chat", chat)
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == expected
    assert expected[0] != llm.generate(PROMPTS[:1], GREEDY)[0].token_ids
    llm.unload_lora_adapter("sql")
    with pytest.raises(AdapterNotFoundError, match="`sql` does not exist"):
        llm.generate(PROMPTS[:1], params[:1])
    llm.load_lora_adapter("sql2", sql)  # into the slot "sql" left
    assert llm.generate(PROMPTS[:1], [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, lora="sql2")]
                        )[0].token_ids == expected[0]
    # vLLM's load_inplace: another folder under a served name (without it, refused)
    with pytest.raises(ValueError, match="'chat' has already been loaded"):
        llm.load_lora_adapter("chat", sql)
    llm.load_lora_adapter("chat", sql, load_inplace=True)
    as_chat = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, lora="chat")
    assert llm.generate(PROMPTS[:1], [as_chat])[0].token_ids == expected[0]
    assert _pool_is_full(llm.engine)


def test_lora_products_skip_the_layers_no_held_adapter_touches(tiny, tmp_path):
    """Eager steps skip the layers no held adapter has matrices in (PEFT's default targets are q and v
    only); the count follows loads and unloads. A CUDA graph's batch keeps every layer, so that adapters
    loaded after its capture take effect (an unheld layer's A, poisoned here, then reaches y)."""
    from lcq.models.lora import LoRABatch

    qv = make_tiny_adapter(tmp_path / "qv", tiny, targets=("self_attn.q_proj", "self_attn.v_proj"))
    chat = make_tiny_adapter(tmp_path / "chat", tiny, seed=1, targets=("self_attn.k_proj", "mlp.gate_proj"))
    llm = LLM(str(tiny), block_size=8, max_loras=2, **FP32)
    stack = llm.engine.runner.adapters.stack
    llm.load_lora_adapter("qv", qv)
    llm.load_lora_adapter("chat", chat)
    qkv, gate_up, down = (f"model.layers.0.{name}" for name in ("self_attn.qkv_proj", "mlp.gate_up_proj",
                                                                 "mlp.down_proj"))
    assert (stack.holders[qkv], stack.holders[gate_up], stack.holders[down]) == (2, 1, 0)
    llm.unload_lora_adapter("qv")
    assert (stack.holders[qkv], stack.holders[gate_up], stack.holders[down]) == (1, 1, 0)
    stack.layers[down][0].fill_(float("nan"))
    x, y = torch.ones(2, stack.layers[down][0].shape[1]), torch.zeros(2, stack.layers[down][1].shape[0])
    slots = torch.tensor([1, -1])
    assert torch.equal(LoRABatch(stack, slots).add(down, x, y.clone()), y)
    assert LoRABatch(stack, slots, every_layer=True).add(down, x, y.clone()).isnan().all()


@pytest.mark.parametrize("weights", ["fp32", "fp16"])
def test_lora_adapter_reloaded_under_its_name_never_reuses_the_old_weights_cache(tiny, tiny16, tmp_path, weights):
    """The prefix cache keys an adapter's blocks by its load, not its name: a different folder loaded
    under the same name recomputes the prompt (and then caches its own blocks), and its own weights
    replace the old ones in the slot (fp16 weights: in the one-call C decode step's copies too)."""
    tiny = tiny if weights == "fp32" else tiny16
    first, second = (make_tiny_adapter(tmp_path / f"a{seed}", tiny, seed=seed) for seed in (0, 1))
    tuned = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, lora="a")
    prompt = list(range(60, 80))  # two full blocks
    expected = LLM(str(tiny), block_size=8, lora_modules=f"a={second}", **FP32).generate([prompt], tuned)[0].token_ids
    llm = LLM(str(tiny), block_size=8, max_loras=1, **FP32)
    llm.load_lora_adapter("a", first)
    old = llm.generate([prompt], tuned)[0]
    assert llm.generate([prompt], tuned)[0].usage.cached_tokens == 16
    llm.unload_lora_adapter("a")
    llm.load_lora_adapter("a", second)
    new, again = (llm.generate([prompt], tuned)[0] for _ in range(2))
    assert new.usage.cached_tokens == 0 and again.usage.cached_tokens == 16
    assert new.token_ids == again.token_ids == expected != old.token_ids


def test_lora_adapter_unloaded_while_running_finishes_on_its_slot(tiny, tmp_path):
    """Unloading refuses new requests at once; the running one finishes with the adapter's tokens on its
    slot, which the next adapter loaded takes only then (its request waits), and which is zeroed once its
    adapter is unloaded and idle."""
    from lcq.runtime import LLMEngine

    folder = make_tiny_adapter(tmp_path / "sql", tiny)
    tuned, other = (SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, lora=name)
                    for name in ("sql", "other"))
    expected = LLM(str(tiny), block_size=8, lora_modules=f"sql={folder}", **FP32).generate(PROMPTS[:1], tuned)[0]
    engine = LLMEngine(EngineConfig(model=str(tiny), block_size=8, max_loras=1, **FP32))
    engine.load_lora_adapter("sql", engine.read_lora_adapter("sql", str(folder)))
    engine.add_request("running", PROMPTS[0], tuned)
    tokens = {"running": [t for _ in range(3) for out in engine.step() for t in out.token_ids], "waiting": []}
    engine.unload_lora_adapter("sql")
    with pytest.raises(AdapterNotFoundError, match="`sql` does not exist"):
        engine.add_request("late", PROMPTS[1], tuned)
    engine.load_lora_adapter("other", engine.read_lora_adapter("other", str(folder)))
    engine.add_request("waiting", PROMPTS[0], other)
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            assert not tokens["waiting"] or len(tokens["running"]) == 12  # it waited for the slot
    assert tokens["running"] == tokens["waiting"] == expected.token_ids
    stack = engine.runner.adapters.stack
    assert any(a.any() for a, _, _ in stack.layers.values())
    engine.unload_lora_adapter("other")
    assert all(not a.any() and not b.any() for a, b, _ in stack.layers.values())


@pytest.mark.parametrize("weights", ["fp32", "fp16"])
def test_lora_adapters_beyond_the_slots_take_turns(tiny, tiny16, tmp_path, weights):
    """Three adapters loaded (max_cpu_loras) over one slot (max_loras): each request gets its adapter's own
    tokens, those of the adapter alone, while no step runs two adapters; base-model requests run beside
    them from the first step. Over fp16 weights the slot's copies for the one-call C decode step are
    rewritten with the slot."""
    from lcq.runtime import LLMEngine

    tiny = tiny if weights == "fp32" else tiny16
    folders = {name: make_tiny_adapter(tmp_path / name, tiny, seed=seed, targets=targets)
               for name, seed, targets in (("a", 0, ("self_attn.q_proj", "self_attn.v_proj")),
                                           ("b", 1, ("self_attn.k_proj", "mlp.gate_proj")),
                                           ("c", 2, ("mlp.down_proj",)))}
    names = ["a", None, "b", "c", "a", None, "c"]
    params = {name: SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, lora=name) for name in names}
    alone = LLM(str(tiny), block_size=8, lora_modules=",".join(f"{n}={f}" for n, f in folders.items()), **FP32)
    expected = [alone.generate([PROMPTS[i % 3]], params[name])[0].token_ids for i, name in enumerate(names)]
    assert len({tuple(tokens) for tokens in expected[:4]}) == 4
    engine = LLMEngine(EngineConfig(model=str(tiny), block_size=8, max_loras=1, max_cpu_loras=3, **FP32))
    for name, folder in folders.items():
        engine.load_lora_adapter(name, engine.read_lora_adapter(name, str(folder)))
    for i, name in enumerate(names):
        engine.add_request(str(i), PROMPTS[i % 3], params[name])
    tokens: list[list[int]] = [[] for _ in names]
    steps = 0
    while engine.has_work():
        outputs = engine.step()
        steps += 1
        assert len({seq.adapter.name for seq in engine.scheduler.running if seq.adapter is not None}) <= 1
        for out in outputs:
            tokens[int(out.request_id)] += out.token_ids
        if steps == 1:
            assert tokens[1] and tokens[5]  # the base model's requests did not wait for the slot
    assert tokens == expected
    assert _pool_is_full(engine)
    assert engine.runner.adapters.users == [0]


def test_a_request_waiting_for_an_adapter_slot_is_not_passed_by_other_adapters(tiny, tmp_path):
    """With every slot busy, a request for another adapter waits; requests that come after it with an
    adapter, even one holding a slot, wait behind it (else that slot might never come free), and
    base-model ones go ahead."""
    from lcq.runtime import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(tiny), block_size=8, max_loras=1, max_cpu_loras=2, **FP32))
    for seed, name in enumerate("ab"):
        folder = make_tiny_adapter(tmp_path / name, tiny, seed=seed)
        engine.load_lora_adapter(name, engine.read_lora_adapter(name, str(folder)))
    for request_id, lora, max_tokens in (("a-long", "a", 20), ("b", "b", 4), ("a-later", "a", 4), ("base", None, 4)):
        engine.add_request(request_id, PROMPTS[1], SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                  ignore_eos=True, lora=lora))
    first_token_step: dict[str, int] = {}
    step = 0
    while engine.has_work():
        step += 1
        for out in engine.step():
            first_token_step.setdefault(out.request_id, step)
    assert first_token_step["a-long"] == first_token_step["base"] == 1
    assert first_token_step["a-long"] + 20 <= first_token_step["b"] < first_token_step["a-later"]


def test_lora_adapter_counts_are_checked(tiny, tmp_path):
    folder = make_tiny_adapter(tmp_path / "sql", tiny)
    modules = ",".join(f"{name}={folder}" for name in ("x", "y", "z"))
    with pytest.raises(ValueError, match=r"max_cpu_loras \(2\) must be at least max_loras \(3\)"):
        EngineConfig(model=str(tiny), max_loras=3, max_cpu_loras=2).validate()
    with pytest.raises(ValueError, match=r"and the number of lora_modules \(3\)"):
        EngineConfig(model=str(tiny), lora_modules=modules, max_loras=1, max_cpu_loras=2).validate()
    with pytest.raises(ValueError, match="max_loras must be at least 0"):
        EngineConfig(model=str(tiny), max_loras=-1).validate()
    for with_adapters in (dict(lora_modules=modules), dict(allow_runtime_lora_updating=True)):
        with pytest.raises(ValueError, match="max_loras 0 leaves no adapter slot"):
            EngineConfig(model=str(tiny), max_loras=0, **with_adapters).validate()
    llm = LLM(str(tiny), block_size=8, lora_modules=modules, max_loras=1)  # three adapters loaded, one slot
    assert llm.engine.runner.adapters.capacity == 3 and llm.engine.runner.adapters.stack.slots == 1


def test_lora_adapter_loads_that_would_fail_are_refused(tiny, tmp_path):
    from lcq.runtime import AdapterNotFoundError

    folder = make_tiny_adapter(tmp_path / "sql", tiny)
    with pytest.raises(ValueError, match="no adapter slots"):
        LLM(str(tiny)).load_lora_adapter("sql", folder)
    llm = LLM(str(tiny), lora_modules=f"sql={folder}", max_loras=2, max_lora_rank=4)
    with pytest.raises(ValueError, match="'sql' has already been loaded"):
        llm.load_lora_adapter("sql", folder)
    with pytest.raises(ValueError, match="the base model's"):
        llm.load_lora_adapter(tiny.name, folder)
    for name in ("sql\nERROR: forged", "x" * 257):  # (names are logged and listed)
        with pytest.raises(ValueError, match="at most 256 printable characters"):
            llm.load_lora_adapter(name, folder)
    with pytest.raises(UserError, match="rank 8 is above max_lora_rank 4"):
        llm.load_lora_adapter("wide", make_tiny_adapter(tmp_path / "wide", tiny, rank=8))
    with pytest.raises(UserError, match="needs adapter_config.json"):
        llm.load_lora_adapter("nothing", tmp_path)
    # tensors of another rank than the config's r (PEFT cannot load them; scaled by their own rank, they were served)
    for r in (2, "4"):
        other = make_tiny_adapter(tmp_path / f"r{r}", tiny)
        settings = json.loads((other / "adapter_config.json").read_text())
        (other / "adapter_config.json").write_text(json.dumps({**settings, "r": r}))
        with pytest.raises(UserError, match="rank 4, where adapter_config.json says r 2" if r == 2 else
                           "r must be a positive integer"):
            llm.load_lora_adapter(f"r{r}", other)
    broken = make_tiny_adapter(tmp_path / "broken", tiny)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="cannot be read"):
        llm.load_lora_adapter("broken", broken)
    llm.load_lora_adapter("second", folder)
    with pytest.raises(ValueError, match="2 LoRA adapters are loaded, as many as max_cpu_loras allows"):
        llm.load_lora_adapter("third", folder)
    with pytest.raises(AdapterNotFoundError, match="'third' is not loaded"):
        llm.unload_lora_adapter("third")
