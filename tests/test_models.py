"""Our Llama-family model against transformers, through the paged KV cache."""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lcq.errors import UserError
from lcq.kernels import cpu_half, cpu_ops, native
from lcq.kernels.cpu_matmul import amx_active, amx_tiles, cpu_products, products_available
from lcq.models import ForwardContext, ModelConfig, load_model
from lcq.models.attention import PagedAttention
from lcq.quantizer.reference import load_reference_model
from tests.tiny_model import make_tiny_hf, make_tiny_lcq, make_tiny_multimodal, phi3_longrope

BLOCK = 4


class PagedBatch:
    """Sequences with their own cache blocks (handed out in order), to drive the model by hand."""

    def __init__(self, model, num_blocks: int = 64, cache_dtype: torch.dtype | None = None):
        c = model.config
        dtype, self.device = cache_dtype or model.dtype, model.norm.weight.device
        shape = model.kv_cache_shape(num_blocks, BLOCK, dtype)
        keys = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in c.cache_layers]
        model.bind_kv_cache(keys, keys if c.values_in_keys else [torch.zeros_like(k) for k in keys])
        model.bind_states(24)  # (the recurrent mixers') one slot per sequence, by its index
        self.model, self.next_block, self.tables, self.lengths = model, 0, [], []

    def add(self) -> int:
        self.tables.append([])
        self.lengths.append(0)
        return len(self.tables) - 1

    def step(self, new_tokens: dict[int, list[int]]) -> torch.Tensor:
        """Run new tokens of some sequences; returns the logits of each one's last new token."""
        ids, positions, slots, starts, lens = [], [], [], [0], []
        for seq, tokens in new_tokens.items():
            for t in tokens:
                pos = self.lengths[seq]
                if pos % BLOCK == 0:
                    self.tables[seq].append(self.next_block)
                    self.next_block += 1
                ids.append(t)
                positions.append(pos)
                slots.append(self.tables[seq][pos // BLOCK] * BLOCK + pos % BLOCK)
                self.lengths[seq] += 1
            starts.append(len(ids))
            lens.append(self.lengths[seq])
        width = max(len(self.tables[s]) for s in new_tokens)
        tables = [self.tables[s] + [-1] * (width - len(self.tables[s])) for s in new_tokens]
        def tensor(values, dtype=torch.int64):
            return torch.tensor(values, dtype=dtype, device=self.device)

        context = ForwardContext(
            is_prefill=any(len(t) > 1 for t in new_tokens.values()), slot_mapping=tensor(slots),
            query_start=tensor(starts, torch.int32), context_lens=tensor(lens, torch.int32),
            block_tables=tensor(tables, torch.int32),
            max_query_len=max(len(t) for t in new_tokens.values()), max_context_len=max(lens),
            state_slots=tensor(list(new_tokens)))
        hidden = self.model(tensor(ids), tensor(positions), context)
        return self.model.compute_logits(hidden[tensor(starts[1:]) - 1]).cpu()


def _reference_logits(reference, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("arch, method, block", [
    ("llama", "fp8", (32, 64)), ("deepseek_v3", "fp8", (16, 16)), ("llama4", "fp8", (16, 16)),
    ("qwen3_next", "fp8", (32, 64)), ("phi3", "compressed-tensors", None)])
def test_fp8_sources_read_as_their_decoded_weights(tmp_path, arch, method, block):
    """A folder of FP8 projections reads as the same model with them decoded: per block of 128 x 128 in
    DeepSeek-V3's and the -FP8 releases' files (blocks smaller here, and partial at the edges: 48 rows in
    blocks of 32), per output row in compressed-tensors' (Phi-3's fused matrices cut into parts after
    decoding, Qwen3-Next's rows picked, Llama 4's 3-D experts one scale grid each), the scales and the
    quantization_config out of sight (and activations' scales, which lcq does not use). The quantizer makes
    the same checkpoint of both."""
    from safetensors.torch import load_file, save_file

    from lcq.format import CheckpointReader
    from lcq.quantizer import QuantizeOptions, quantize_model
    from tests.tiny_model import fp8_copy

    folder = fp8_copy(make_tiny_hf(tmp_path / "hf", arch), tmp_path / "fp8", tmp_path / "decoded", method, block)
    if method == "compressed-tensors":  # static activation scales and an FP8 KV cache's scales beside the weights
        tensors = load_file(folder / "model.safetensors")
        for name in ("model.layers.0.self_attn.q_proj.input_scale", "model.layers.0.self_attn.k_scale",
                     "model.layers.0.self_attn.v_scale"):
            tensors[name] = torch.tensor(0.5)
        save_file(tensors, folder / "model.safetensors")
    fp8, decoded = CheckpointReader(folder), CheckpointReader(tmp_path / "decoded")
    assert fp8.config == decoded.config and fp8.names() == decoded.names()
    assert all(fp8.shape(name) == decoded.shape(name) and torch.equal(fp8.tensor(name), decoded.tensor(name))
               for name in fp8.names())
    if arch != "llama":
        return
    options = QuantizeOptions(bits=3, rank=2, group_size=32, method="rtn")
    for source in ("fp8", "decoded"):
        quantize_model(tmp_path / source, tmp_path / f"lcq-{source}", options, progress=False)
    packed, expected = CheckpointReader(tmp_path / "lcq-fp8"), CheckpointReader(tmp_path / "lcq-decoded")
    assert packed.names() == expected.names()
    assert all(torch.equal(packed.tensor(name), expected.tensor(name)) for name in packed.names())


@pytest.mark.parametrize("arch", ["qwen3", "deepseek_v3"])
def test_fp8_source_serves_as_transformers_decodes_it(tmp_path, arch):
    """An FP8 folder (Qwen3-FP8's and DeepSeek-V3's form) served in full precision gives the logits of
    transformers' own model of the same folder, which decodes FP8 itself where there is no GPU; DeepSeek-V3's
    against transformers' model of the decoded weights, since transformers refuses the partial blocks of its
    kv_a_proj_with_mqa (576 rows in blocks of 128 on the Hub; 40 in blocks of 16 here)."""
    import transformers

    from tests.tiny_model import fp8_copy

    folder = fp8_copy(make_tiny_hf(tmp_path / "hf", arch), tmp_path / "fp8", tmp_path / "decoded")
    model, _ = load_model(folder)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        folder if arch == "qwen3" else tmp_path / "decoded", dtype=torch.float32).eval()
    assert reference.model.layers[0].mlp.down_proj.weight.dtype == torch.float32  # decoded, not FP8 layers
    _check_against(reference, model, PROMPTS, decode_steps=2, chunk=4)


def test_fp8_decoding_and_its_refusals(tmp_path):
    """Scales per tensor, per row and per block (partial at the edges) multiply their weights; UE8M0 scales
    stored as bytes are powers of two; scales that fit no grid, FP8 weights without scales, and folders of
    other quantization methods (GPTQ, compressed-tensors' integer formats) are refused with the file (and
    tensor) named."""
    import json

    from safetensors.torch import load_file, save_file

    from lcq.format import CheckpointReader, FormatError
    from lcq.format.fp8 import decode_fp8
    from tests.tiny_model import fp8_copy

    weight = (torch.randn(5, 7) * 100).to(torch.float8_e4m3fn)
    values = weight.float()
    assert torch.equal(decode_fp8(weight, torch.tensor(0.5), None), values * 0.5)
    rows = torch.rand(5, 1)
    assert torch.equal(decode_fp8(weight, rows, None), values * rows)
    grid = torch.rand(3, 2)  # blocks of 2 x 4
    expected = values * grid.repeat_interleave(2, 0)[:5].repeat_interleave(4, 1)[:, :7]
    assert torch.equal(decode_fp8(weight, grid, (2, 4)), expected)
    exponents = torch.tensor([[120, 127], [130, 127], [127, 140]], dtype=torch.uint8)
    assert torch.equal(decode_fp8(weight, exponents, (2, 4)), decode_fp8(weight, torch.exp2(exponents.float() - 127), (2, 4)))
    with pytest.raises(ValueError, match=r"FP8 scales \(3, 2\) do not fit weight \(5, 7\) in blocks of \[4, 4\]"):
        decode_fp8(weight, grid, (4, 4))

    folder = fp8_copy(make_tiny_hf(tmp_path / "hf"), tmp_path / "fp8", tmp_path / "decoded")
    name = "model.layers.0.mlp.down_proj.weight"
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {
        **config["quantization_config"], "weight_block_size": [32, 32]}}))
    with pytest.raises(FormatError, match=rf"model.safetensors: tensor '{name}' unreadable \(FP8 scales"):
        CheckpointReader(folder).tensor(name)
    for quant in ({"quant_method": "gptq", "bits": 4}, {"quant_method": "compressed-tensors", "format": "pack-quantized"}):
        (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
        with pytest.raises(FormatError, match=rf"quant_method '{quant['quant_method']}' is not one lcq reads .* "
                                              "give the full-precision release"):
            CheckpointReader(folder)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "model.safetensors")
    del tensors[name + "_scale_inv"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(FormatError, match=rf"tensor '{name}' is FP8 without scales"):
        CheckpointReader(folder).tensor(name)


def _check_against(reference, model, prompts: list[list[int]], decode_steps: int = 5, chunk: int | None = None,
                   atol: float = 2e-4, cache_dtype: torch.dtype | None = None):
    batch = PagedBatch(model, cache_dtype=cache_dtype)
    seqs = [batch.add() for _ in prompts]
    tokens = [list(p) for p in prompts]
    if chunk is None:
        logits = batch.step({s: p for s, p in zip(seqs, prompts)})
    else:  # chunked prefill: each sequence's prompt in pieces, interleaved across sequences
        done, last = [0] * len(prompts), {}
        while any(d < len(p) for d, p in zip(done, prompts)):
            step = {s: p[d:d + chunk] for s, p, d in zip(seqs, prompts, done) if d < len(p)}
            out = batch.step(step)
            for row, s in enumerate(step):
                done[s] += len(step[s])
                if done[s] == len(prompts[s]):
                    last[s] = out[row]
        logits = torch.stack([last[s] for s in seqs])
    for _ in range(decode_steps):
        for s in seqs:
            expected = _reference_logits(reference, tokens[s])[-1]
            torch.testing.assert_close(logits[s], expected, atol=atol, rtol=1e-4)
        next_tokens = logits.argmax(-1).tolist()
        for s, t in zip(seqs, next_tokens):
            tokens[s].append(t)
        logits = batch.step({s: [t] for s, t in zip(seqs, next_tokens)})


PROMPTS = [[5, 17, 99, 3, 250, 41, 7, 8, 9, 10, 11], [300, 2, 64], [12, 13, 14, 15, 16, 17, 18, 19, 20]]


def test_a_step_looks_its_rotary_table_up_once(tmp_path, monkeypatch):
    """Every layer of a step shares the table's rows for its positions: one lookup a step, not one a layer (on
    the H200 the layers' lookups were 64 kernels of a 7B model's token). The torch path (no C ops)."""
    from lcq.models.layers import RotaryEmbedding

    monkeypatch.setattr(cpu_ops, "ENABLED", False)
    lookups = []
    real_forward = RotaryEmbedding.forward
    monkeypatch.setattr(RotaryEmbedding, "forward", lambda self, positions: lookups.append(1) or
                        real_forward(self, positions))
    model, _ = load_model(make_tiny_hf(tmp_path / "llama", "llama", num_hidden_layers=3))
    batch = PagedBatch(model)
    seq = batch.add()
    batch.step({seq: [5, 17, 99]})
    batch.step({seq: [3]})
    assert len(lookups) == 2  # (it was 6: once per layer of each step)


def test_c_decode_step_refuses_a_table_without_a_block_it_would_read(tmp_path):
    """The one-call C decode step passes the attention's refusal up: a -1 where a step reads (a bug in
    the tables) raises instead of reading outside the cache."""
    model, _ = load_model(make_tiny_hf(tmp_path, "llama", dtype=torch.float16))
    batch = PagedBatch(model)
    if model.cpu_decoder is None:
        pytest.skip("the C decode step does not build here")
    seq = batch.add()
    batch.step({seq: [5, 17, 99, 3, 250, 41]})
    batch.tables[seq][0] = -1  # the first block, which the next step's attention reads
    with pytest.raises(RuntimeError, match="the C decode step: a block table entry the attention would read"):
        batch.step({seq: [7]})


@pytest.mark.parametrize("arch, sizes", [("llama", {}), ("llama", {"hidden_size": 100, "head_dim": 32}),
                                         ("gemma3", {}), ("stablelm", {})])
@pytest.mark.parametrize("table", [torch.float16, torch.float32])
@pytest.mark.usefixtures("both_cores")
def test_c_decode_step_looks_tokens_up_and_norms_as_the_python_layers(tmp_path, arch, sizes, table):
    """The one-call C decode step reads the embedding table itself (fp16, as an fp16 file keeps it, or fp32, as
    a table fp16 cannot hold exactly stays; rows of 96 and of 100 values, not a whole number of 8-value
    conversions; Gemma scales the rows) and ends with the final norm (StableLM's LayerNorm with its bias): the
    logits of three decode steps of two sequences equal the Python layers' bit for bit, and a token id outside
    the table is an IndexError, as torch's lookup raises."""
    model, _ = load_model(make_tiny_hf(tmp_path, arch, dtype=torch.float16, **sizes))
    model.embed_tokens.weight = torch.nn.Parameter(model.embed_tokens.weight.to(table), requires_grad=False)
    runs = []
    for one_call in (True, False):
        batch = PagedBatch(model)
        if model.cpu_decoder is None:
            pytest.skip("the C decode step does not build here")
        assert model.cpu_decoder.embeddings is not None and model.cpu_decoder.embeddings.dtype == table
        decoder = model.cpu_decoder
        if not one_call:
            model.cpu_decoder = None
        seqs = [batch.add(), batch.add()]
        logits = [batch.step({seqs[0]: [5, 17, 99], seqs[1]: [3, 250]})]
        for _ in range(3):
            logits.append(batch.step({s: [t] for s, t in zip(seqs, logits[-1].argmax(-1).tolist())}))
        runs.append(torch.stack(logits))
        model.cpu_decoder = decoder
    assert torch.equal(runs[0], runs[1])
    with pytest.raises(IndexError, match="a token id outside the embedding table"):
        batch.step({seqs[0]: [model.config.vocab_size]})


@pytest.mark.parametrize("arch", ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "smollm3",
                                  "olmo2", "olmo3", "exaone4", "seed_oss", "hunyuan", "arcee", "apertus"])
@pytest.mark.parametrize("c_ops", ["1", "0"])
def test_full_precision_matches_transformers(tmp_path, monkeypatch, arch, c_ops):
    """With the C decode ops (cpu_ops) where they build, and with the torch path. (Arcee: Llama's layer with an
    MLP of relu(x)^2 and no gate; Apertus: the same with xIELU, its two factors learned per layer, per-head q/k
    norms, llama3 rotary scaling.)"""
    monkeypatch.setattr(cpu_ops, "ENABLED", c_ops == "1")
    folder = make_tiny_hf(tmp_path / arch, arch)
    model, _ = load_model(folder)
    _check_against(load_reference_model(folder), model, PROMPTS)


@pytest.mark.parametrize("arch", ["gemma3", "llama", "mistral", "qwen2", "qwen3", "idefics3", "smolvlm", "internvl",
                                  "llama4", "qwen3_moe", "qwen3_5", "qwen3_5_moe"])
@pytest.mark.parametrize("layout", ["full", "sparse"])
def test_multimodal_checkpoint_serves_its_language_model(tmp_path, arch, layout):
    """Gemma 3 4B-style, LLaVA, Mistral Small 3.1-style, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE (its experts' 3-D
    tensors, as transformers saves them), Qwen3.5 (dense and mixture), SmolVLM (Idefics3 and SmolVLM
    classes), InternVL3 and Llama 4 (its experts' 3-D tensors under language_model) folders: our model of the
    wrapper folder is the text model it holds (config completed from transformers' defaults where
    text_config leaves them out or, Qwen2.5-VL's Hub form, has none; tensors under either prefix; the
    vision tower never read), against the wrapper's own transformers model, whose multimodal rotary
    positions for text are every component the token's position."""
    import transformers

    from lcq.format import CheckpointReader
    from tests.tiny_model import WRAPPED

    folder = make_tiny_multimodal(tmp_path, arch, layout)
    reader = CheckpointReader(folder)
    assert not [name for name in reader.names() if not name.startswith(("model.layers.", "model.embed_tokens",
                                                                       "model.norm", "lm_head"))]
    model, config = load_model(folder)
    assert config.tie_word_embeddings == reader.config["tie_word_embeddings"] == (not reader.has("lm_head.weight"))
    # transformers' Llama4ForConditionalGeneration fails on text alone (it reads image_outputs its language model
    # does not return): against the text model the wrapper was built from
    reference = transformers.Llama4ForCausalLM.from_pretrained(folder.parent / "text") if arch == "llama4" else \
        getattr(transformers, WRAPPED[arch][1]).from_pretrained(folder)
    _check_against(reference.eval(), model, PROMPTS, decode_steps=3)


@pytest.mark.parametrize("window", [None, 7])
def test_phi3_reads_as_mistral_with_its_fused_projections_split(tmp_path, window):
    """Phi-3 / Phi-4 folders (q/k/v and gate/up stored fused; Phi-3-mini's sliding window): our model
    against transformers' Phi3ForCausalLM of the same folder."""
    import transformers

    from lcq.format import CheckpointReader

    folder = make_tiny_hf(tmp_path, "phi3", sliding_window=window)
    reader = CheckpointReader(folder)
    assert reader.config["model_type"] == "mistral" and reader.config.get("sliding_window") == window
    assert reader.shape("model.layers.0.self_attn.k_proj.weight") == (2 * 24, 96)
    assert not any("qkv_proj" in name or "gate_up_proj" in name for name in reader.names())
    model, config = load_model(folder)
    assert config.layer_windows == [window or 0] * 2
    reference = transformers.Phi3ForCausalLM.from_pretrained(folder).eval()
    _check_against(reference, model, PROMPTS, decode_steps=3)


def test_internlm3_reads_as_llama(tmp_path):
    """An InternLM3 folder as the Hub has it (InternLM3ForCausalLM, qkv_bias and bias, dynamic NTK scaling,
    its own default head_dim 128 over 96-wide hidden states): our model against transformers', which runs
    it as Llama."""
    import transformers

    folder = make_tiny_hf(tmp_path, "internlm3")
    model, config = load_model(folder)
    assert config.model_type == "llama" and config.head_dim == 128 and config.rope["rope_type"] == "dynamic"
    _check_against(transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), model, PROMPTS,
                   decode_steps=3)


@pytest.mark.parametrize("arch, family", [("ernie4_5", "Ernie4_5ForCausalLM"), ("helium", "HeliumForCausalLM")])
@pytest.mark.parametrize("c_ops", ["1", "0"])
def test_interleaved_rotary_families_read_as_llama(tmp_path, monkeypatch, arch, family, c_ops):
    """ERNIE 4.5 (biases on every linear layer, its default head_dim 128 over 96-wide hidden states) and
    Helium, whose rotary embeddings turn adjacent pairs: read as Llama with each query and key head's rows
    reordered, against transformers' own classes of the same folders, with the C ops and the torch path."""
    import transformers

    from lcq.format import CheckpointReader

    monkeypatch.setattr(cpu_ops, "ENABLED", c_ops == "1")
    folder = make_tiny_hf(tmp_path, arch)
    reader = CheckpointReader(folder)
    assert reader.config["model_type"] == "llama" and reader.config["mlp_bias"] == (arch == "ernie4_5")
    stored = getattr(transformers, family).from_pretrained(folder, dtype=torch.float32).eval()
    head_dim = reader.config["head_dim"]
    first_head = stored.model.layers[0].self_attn.k_proj.weight[:head_dim]
    assert torch.equal(reader.tensor("model.layers.0.self_attn.k_proj.weight")[:head_dim],
                       first_head[[*range(0, head_dim, 2), *range(1, head_dim, 2)]])
    model, _ = load_model(folder)
    _check_against(stored, model, PROMPTS, decode_steps=3)


@pytest.mark.parametrize("bias", [True, False])
def test_glm_reads_as_qwen2_with_its_half_head_rotary_embedding(tmp_path, bias):
    """GLM-4 (glm-4-9b-chat-hf; without q/k/v biases read as Llama): gate/up stored fused, a rotary embedding
    turning adjacent pairs of each head's first half. Our model against transformers' GlmForCausalLM of
    the same folder."""
    import transformers

    from lcq.format import CheckpointReader

    folder = make_tiny_hf(tmp_path, "glm", attention_bias=bias)
    reader = CheckpointReader(folder)
    assert reader.config["model_type"] == ("qwen2" if bias else "llama")
    assert reader.config["rope_parameters"]["rope_type"] == "longrope"
    assert not any("gate_up_proj" in name for name in reader.names())
    assert reader.has("model.layers.0.self_attn.k_proj.bias") == bias
    stored = transformers.GlmForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    first_head = stored.model.layers[0].self_attn.k_proj.weight[:24]  # rotated pairs (2i, 2i + 1) of dims 0-11
    order = [*range(0, 12, 2), *range(12, 18), *range(1, 12, 2), *range(18, 24)]  # pairs first in each half
    assert torch.equal(reader.tensor("model.layers.0.self_attn.k_proj.weight")[:24], first_head[order])
    model, _ = load_model(folder)
    _check_against(stored, model, PROMPTS, decode_steps=3)


@pytest.mark.parametrize("arch, family, experts, moe_layers", [
    ("qwen3_moe", "Qwen3MoeForCausalLM", 6, [True, False]),  # its second layer dense (mlp_only_layers)
    ("mixtral", "MixtralForCausalLM", 4, [True, True]),  # its files name the mixture block_sparse_moe
    ("olmoe", "OlmoeForCausalLM", 4, [True, True]),  # q/k norms over whole projections, weights as routed
    ("qwen2_moe", "Qwen2MoeForCausalLM", 4, [True, True]),  # plus a shared expert behind a sigmoid gate
    ("ernie4_5_moe", "Ernie4_5_MoeForCausalLM", 8, [False, True]),  # a choosing bias, adjacent rotary pairs
    ("hunyuan_moe", "HunYuanMoEV1ForCausalLM", 4, [True, True]),  # q/k norms after rotation, a shared MLP
    ("minimax_m2", "MiniMaxM2ForCausalLM", 4, [True, True])])  # biased sigmoid scores, whole q/k norms, partial RoPE
@pytest.mark.parametrize("c_ops", ["1", "0"])
def test_mixtures_of_experts_follow_transformers(tmp_path, monkeypatch, arch, family, experts, moe_layers, c_ops):
    """Qwen3-MoE, Mixtral, OLMoE, Qwen2-MoE, ERNIE 4.5, Hunyuan-A13B and MiniMax-M2: a router picking 2
    gated-MLP experts for each token (their weights renormalized, but OLMoE's and Qwen2-MoE's; ERNIE's
    chosen by the weights plus a learned bias, MiniMax-M2's by sigmoid scores plus one; ERNIE's, Hunyuan's
    and MiniMax-M2's routers in fp32), Qwen2-MoE's, ERNIE's and Hunyuan's shared experts; MiniMax-M2's q/k
    norms over whole projections and a quarter of each head turning: our model against
    transformers' own class, prompts prefilled in chunks and decoded, with the C ops (fp16 weights, whose copies
    the C products read: the mixtures in C calls, decode steps in one) and the torch path."""
    import transformers

    monkeypatch.setattr(cpu_ops, "ENABLED", c_ops == "1")
    folder = make_tiny_hf(tmp_path, arch, dtype=torch.float16)
    model, config = load_model(folder)
    assert (config.num_experts, config.experts_per_token, config.moe_layers) == (experts, 2, moe_layers)
    PagedBatch(model)  # (the KV caches bound: the C decode step is built)
    assert (model.cpu_decoder is not None) == (c_ops == "1" and cpu_half.enabled())
    reference = getattr(transformers, family).from_pretrained(folder, dtype=torch.float32).eval()
    _check_against(reference, model, PROMPTS, decode_steps=3, chunk=4)
    if arch == "olmoe" and c_ops == "1":  # OLMoE's option of clamping q, k and v, unsupported: refused by name
        with pytest.raises(UserError, match="clip_qkv"):
            load_model(make_tiny_hf(tmp_path / "clipped", arch, clip_qkv=8.0))


@pytest.mark.parametrize("mxfp4", [False, True])
@pytest.mark.parametrize("c_ops", ["1", "0"])
def test_gpt_oss_follows_transformers(tmp_path, monkeypatch, mxfp4, c_ops):
    """gpt-oss: biases on q/k/v/o, the router and every expert, attention sinks, a sliding window every
    other layer, YaRN, 2 of 4 experts a token through its clamped SwiGLU (gate and up stored interleaved,
    (in, out)); from the Hub's MXFP4 experts too, decoded as read. Our model against transformers' own
    class (which decodes MXFP4 itself), prompts past the window prefilled in chunks and decoded."""
    import transformers

    from tests.tiny_model import mxfp4_copy

    monkeypatch.setattr(cpu_ops, "ENABLED", c_ops == "1")
    folder = make_tiny_hf(tmp_path / "bf16", "gpt_oss")
    if mxfp4:
        folder = mxfp4_copy(folder, tmp_path / "mxfp4")
    model, config = load_model(folder)
    assert (config.num_experts, config.experts_per_token, config.norm_topk_prob, config.router_bias) == (4, 2, True, True)
    assert config.attention_sinks and config.activation == "swiglu_oai" and config.layer_windows == [7, 0]
    assert model.cpu_decoder is None  # (fp32 weights here: the C products read fp16 copies; test_runtime.py has both)
    extra = dict(quantization_config=transformers.Mxfp4Config(dequantize=True)) if mxfp4 else {}
    reference = transformers.GptOssForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
    long_prompt = [(5 * i + 2) % 300 + 1 for i in range(20)]  # past the window
    _check_against(reference, model, [*PROMPTS, long_prompt], decode_steps=3, chunk=4)


@pytest.mark.parametrize("arch", ["qwen2_moe", "gpt_oss", "llama4", "glm4_moe", "ernie4_5_moe", "deepseek_v2",
                                  "nemotron_h_latent"])
def test_stacked_experts_follow_transformers(tmp_path, monkeypatch, arch):
    """Packed experts the kernels read as stored (no CPU cached weight, as on a GPU) are stacked and run as
    one routed product per matrix kind, with no value read back to the host (CUDA-graph capturable): the
    tokens of transformers with the dequantized weights, through chunked prefill and decode (Qwen2-MoE's
    shared expert beside them, gpt-oss's biases and clamped SwiGLU, Llama 4's weighted inputs, GLM-4.5's
    grouped, biased and scaled routing, DeepSeek-V2's groups by their best expert, beside its latent
    attention; Nemotron-H's ungated experts, up_proj alone, between its latent projections; the experts' down
    matrices at 2 bits, their gate/up at 3); and a mixture's layer through the grouped Triton kernel gives the
    torch path's outputs."""
    from lcq.quantizer import QuantizeOptions, quantize_model

    folder = tmp_path / "lcq"
    quantize_model(make_tiny_hf(tmp_path / "hf", arch), folder, QuantizeOptions(
        bits=3, rank=2, group_size=32, method="rtn", layer_bits=["down_proj=2"]), progress=False)
    stacked, _ = load_model(folder, cache_dense=False)
    mixtures = [layer.mlp for layer in stacked.layers if hasattr(layer.mlp, "router")]
    assert mixtures and all(m.gate_up_experts is not None and not len(m.experts) for m in mixtures)
    assert (mixtures[0].gate_up_experts.experts.stacked.bits, mixtures[0].down_experts.experts.stacked.bits) == (3, 2)
    assert stacked.graph_capturable and not load_model(folder)[0].graph_capturable
    _check_against(load_reference_model(folder), stacked, PROMPTS, decode_steps=3, chunk=4)
    if importlib.util.find_spec("triton") is None or arch not in ("gpt_oss", "llama4", "glm4_moe", "nemotron_h_latent"):
        return
    # The mixture through the grouped Triton kernel (under the interpreter), as a GPU runs it: the outputs of
    # the experts one at a time, for 1 and 17 tokens (one-row and 16-row blocks); with biases (gpt-oss),
    # weighted inputs (Llama 4), grouped routing (GLM-4.5), ungated experts in a latent width (Nemotron-H)
    import lcq.kernels.experts as experts_module
    from lcq.kernels.triton_linear import grouped_decode

    mixture = mixtures[0]
    for tokens in (1, 17):
        x = torch.randn(tokens, stacked.config.hidden_size, generator=torch.Generator().manual_seed(tokens))
        one_at_a_time = mixture(x, None)
        monkeypatch.setattr(experts_module, "expert_linear", lambda x, experts, routes, rows_per_input:
                            grouped_decode(x, experts, routes, rows_per_input, {"BLOCK_N": 16, "SPLIT_K": 2}))
        torch.testing.assert_close(mixture(x, None), one_at_a_time, rtol=1e-4, atol=1e-5)
        monkeypatch.undo()


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("c_ops", ["1", "0"])
def test_llama4_follows_transformers(tmp_path, monkeypatch, top_k, c_ops):
    """Llama 4 (Llama4ForCausalLM): adjacent rotary pairs with llama3 scaling, unweighted norms of the rotated
    queries and keys, rotary layers attending within chunks (of 8 here), a NoPE fourth layer attending
    over all and whose queries take the temperature (rising every 4 positions here), mixtures every other
    layer whose router's sigmoid weights scale the chosen experts' inputs (1 of 4 as Llama 4 has it, 2
    too), a shared expert beside them. Our model against transformers' own class, prompts past several
    attention chunks and temperature steps prefilled in pieces and decoded."""
    import transformers

    monkeypatch.setattr(cpu_ops, "ENABLED", c_ops == "1")
    folder = make_tiny_hf(tmp_path, "llama4", num_experts_per_tok=top_k)
    model, config = load_model(folder)
    assert (config.num_experts, config.experts_per_token, config.moe_layers) == (4, top_k, [False, True, False, True])
    assert config.rope_layers == [True, True, True, False] and config.temperature_layers == [False] * 3 + [True]
    assert config.layer_chunks == [8, 8, 8, 0] and config.max_position_embeddings == 256
    assert config.query_temperature == (0.5, 4, 1) and config.rotary_interleaved and config.mlp_name == "feed_forward"
    assert [layer.self_attn.q_norm is not None for layer in model.layers] == [True, True, True, False]
    reference = transformers.Llama4ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    long_prompt = [(5 * i + 2) % 300 + 1 for i in range(20)]
    _check_against(reference, model, [*PROMPTS, long_prompt], decode_steps=3, chunk=4)


@pytest.mark.parametrize("arch, family", [("glm4_moe", "Glm4MoeForCausalLM"), ("dots1", "Dots1ForCausalLM")])
@pytest.mark.parametrize("c_ops", ["1", "0"])
def test_deepseek_v3_routing_follows_transformers(tmp_path, monkeypatch, arch, family, c_ops):
    """GLM-4.5 (Glm4MoeForCausalLM: Qwen2's layer with q/k norms, half of each head turning, read as a
    whole-head rotary embedding, the rows and norm weights reordered) and dots.llm1 (Dots1ForCausalLM:
    Qwen3's layer): the first layer dense, then 2 of 8 experts chosen by sigmoid scores plus a learned
    bias within the best of 2 groups, weighted by the sigmoid scores renormalized and scaled by 2.5, beside
    shared experts; the router in fp32. Our model against transformers' own class."""
    import transformers

    monkeypatch.setattr(cpu_ops, "ENABLED", c_ops == "1")
    folder = make_tiny_hf(tmp_path, arch)
    model, config = load_model(folder)
    assert (config.num_experts, config.experts_per_token, config.moe_layers) == (8, 2, [False, True])
    assert (config.router_groups, config.routed_scale, config.router_correction, config.qk_norm) == ((2, 1), 2.5,
                                                                                                      True, True)
    assert config.rope["rope_type"] == ("longrope" if arch == "glm4_moe" else "default")
    assert model.layers[1].mlp.router.dtype == torch.float32
    reference = getattr(transformers, family).from_pretrained(folder, dtype=torch.float32).eval()
    long_prompt = [(5 * i + 2) % 300 + 1 for i in range(20)]
    _check_against(reference, model, [*PROMPTS, long_prompt], decode_steps=3, chunk=4)


@pytest.mark.parametrize("arch, family", [("deepseek_v2", "DeepseekV2ForCausalLM"),
                                          ("deepseek_v3", "DeepseekV3ForCausalLM"),
                                          ("glm4_moe_lite", "Glm4MoeLiteForCausalLM")])
@pytest.mark.parametrize("c_ops", ["1", "0"])
def test_latent_attention_follows_transformers(tmp_path, monkeypatch, arch, family, c_ops):
    """DeepSeek's multi-head latent attention, absorbed: one cache row per token (the 32-wide latent and the
    8-wide rotated key part), every head attending over it, transformers' expanded keys and values never
    formed. DeepSeek-V2's (one q_proj, YaRN whose mscale scales the scores, softmax experts within the best
    group by its best expert), DeepSeek-V3's and GLM-4.7-Flash's (query latents, sigmoid routing with a
    choosing bias). Our model against transformers' own class, prompts prefilled in pieces and decoded,
    with the C attention and the torch one."""
    import transformers

    monkeypatch.setattr(cpu_ops, "ENABLED", c_ops == "1")
    folder = make_tiny_hf(tmp_path, arch)
    model, config = load_model(folder)
    assert (config.num_kv_heads, config.head_dim, config.rotary_dim) == (1, 40, 8) and config.values_in_keys
    assert config.latent.q_rank == (0 if arch == "deepseek_v2" else 48) and config.moe_layers == [False, True]
    assert (config.router_groups, config.group_score_experts) == ((2, 1), 1 if arch == "deepseek_v2" else 2)
    mscale = 0.1 * 0.707 * math.log(4.0) + 1 if arch == "deepseek_v2" else 1.0
    assert config.query_scale == pytest.approx(24 ** -0.5 * mscale ** 2)
    assert model.kv_cache_bytes_per_block(16, torch.float32) == 2 * 16 * 40 * 4  # K only, one 40-wide row a token
    reference = getattr(transformers, family).from_pretrained(folder, dtype=torch.float32).eval()
    long_prompt = [(5 * i + 2) % 300 + 1 for i in range(20)]
    _check_against(reference, model, [*PROMPTS, long_prompt], decode_steps=3, chunk=4)


@pytest.mark.parametrize("arch, family", [("qwen3_5", "Qwen3_5ForCausalLM"), ("qwen3_5_moe", "Qwen3_5MoeForCausalLM"),
                                          ("qwen3_next", "Qwen3NextForCausalLM")])
@pytest.mark.parametrize("c_ops", ["1", "0"])
def test_linear_attention_follows_transformers(tmp_path, monkeypatch, arch, family, c_ops):
    """Qwen3.5 (dense and its mixtures) and Qwen3-Next (its linear attention's projections stored fused per
    key head, read as Qwen3.5's parts; its second layer dense here): three layers of linear attention (Gated
    DeltaNet: a causal convolution and a delta-rule state per sequence, kept in state slots), then one of
    full attention with gated outputs, per-head q/k norms and a quarter of each head turning; norms
    multiplying by 1 + w. Our model against transformers' own class: sequences prefilled in chunks (the
    state carried from chunk to chunk, long prompts through the chunkwise recurrence) and decoded together."""
    import transformers

    monkeypatch.setattr(cpu_ops, "ENABLED", c_ops == "1")
    folder = make_tiny_hf(tmp_path, arch)
    model, config = load_model(folder)
    assert config.linear_layers == [True, True, True, False] and config.cache_layers == [3]
    assert (config.rotary_dim, config.norm_offset, config.attention_output_gate) == (8, 1.0, True)
    reference = getattr(transformers, family).from_pretrained(folder, dtype=torch.float32).eval()
    long_prompt = [(5 * i + 2) % 300 + 1 for i in range(150)]  # past two chunks of the recurrence
    _check_against(reference, model, [*PROMPTS, long_prompt], decode_steps=3, chunk=70)
    _check_against(reference, model, PROMPTS, decode_steps=2, chunk=4)


# Hybrids of recurrent layers and attention: transformers' class, the recurrent layers, the mixtures' layers
HYBRIDS = {"granite4_hybrid": ("GraniteMoeHybridForCausalLM", [True, False, True, True], [False] * 4),
           "granite4_moe": ("GraniteMoeHybridForCausalLM", [True, False, True, True], [True] * 4),
           "lfm2": ("Lfm2ForCausalLM", [True, True, False, True], [False] * 4),
           "lfm2_moe": ("Lfm2MoeForCausalLM", [True, True, False, True], [False, True, True, True]),
           "bamba": ("BambaForCausalLM", [True, False, True, True], [False] * 4),
           "falcon_h1": ("FalconH1ForCausalLM", [False] * 2, [False] * 2),
           "falcon_h1_normed": ("FalconH1ForCausalLM", [False] * 2, [False] * 2),
           "nemotron_h": ("NemotronHForCausalLM", [True, False, True, False, False], [False] * 5),
           "nemotron_h_moe": ("NemotronHForCausalLM", [True, False, True, False, False],
                              [False, True, False, False, True]),
           "nemotron_h_latent": ("NemotronHForCausalLM", [True, False, True, False, False],
                                 [False, True, False, False, True])}


@pytest.mark.parametrize("arch", HYBRIDS)
@pytest.mark.parametrize("c_ops", ["1", "0"])
def test_recurrent_hybrids_follow_transformers(tmp_path, monkeypatch, arch, c_ops):
    """Granite 4.0-H (h-micro's form, and h-tiny's with experts): Mamba-2 layers (a causal convolution with a
    bias, then per head a state decayed by exp(dt A), B and C in two groups, the outputs gated and normed per
    group) around a NoPE attention layer, Granite's factors folded into weights but the embeddings', a dense
    MLP in every layer, beside 2 of 4 experts (softmax over the chosen). LFM2 (and LFM2-8B-A1B's form): short
    convolutions (C times the convolved B x, biases on its projections) around an attention layer with per-head
    q/k norms, its own names for norms and projections, the MLP two thirds of intermediate_size; mixtures past
    the first layer choosing by sigmoid scores plus a bias, scaled. Bamba: Granite's Mamba-2 around attention
    turning half of each head, Llama's MLP under its own names. Nemotron-H (Nemotron-H-8B's form, Nemotron 3
    Nano's with mixtures, Nemotron 3 Super's with latent mixtures): blocks of one part each behind one norm,
    Mamba-2, NoPE attention, or an MLP of up_proj and relu(x)^2 (a mixture of such experts, chosen by sigmoid
    scores plus a bias and scaled, beside a shared one; the routed experts between fc1 and fc2_latent_proj in
    Super's), every part under mixer and the model under backbone. Falcon-H1 (without and with its Mamba-2
    outputs' norm): Mamba-2 beside the attention in every layer, reading the same normed input, and factors on
    the embeddings, logits, the attention's input, keys and output, Mamba-2's input, in_proj parts and output,
    and the MLP's gate and down (all but the first two folded into weights). Our model against transformers' own
    class: prompts prefilled in chunks (transformers' Mamba-2 recurrence in chunks of 8, ours of 64) and
    decoded."""
    import transformers

    family, recurrent, mixtures = HYBRIDS[arch]
    monkeypatch.setattr(cpu_ops, "ENABLED", c_ops == "1")
    folder = make_tiny_hf(tmp_path, arch)
    model, config = load_model(folder)
    assert config.linear_layers == recurrent and config.moe_layers == mixtures and config.recurrent
    assert config.rope_layers == [not arch.startswith(("granite4", "nemotron_h"))] * len(recurrent)
    reference = getattr(transformers, family).from_pretrained(folder, dtype=torch.float32).eval()
    long_prompt = [(5 * i + 2) % 300 + 1 for i in range(150)]  # past two chunks of the recurrence
    _check_against(reference, model, [*PROMPTS, long_prompt], decode_steps=3, chunk=70)
    _check_against(reference, model, PROMPTS, decode_steps=2, chunk=4)


def test_nemotron_h_config_and_files_as_the_hub_has_them(tmp_path):
    """Nemotron-H's config.json as on the Hub (NVIDIA-Nemotron-Nano-9B-v2's keys: its blocks as
    hybrid_override_pattern, num_hidden_layers, time_step_limit with an Infinity, its MLP width as a list of
    one, auto_map), and its files with a multi-token-prediction layer beside the model (mtp.*, as Nemotron 3's
    keep it): read as transformers reads them, the layer not read (nor taken for Qwen3-Next's, whose names
    it shares); MLP widths that differ by block are refused."""
    import transformers
    from safetensors.torch import load_file, save_file

    folder = make_tiny_hf(tmp_path, "nemotron_h")
    reference = transformers.NemotronHForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = (folder / "config.json").read_text()
    config = json.loads(text)
    config.update(hybrid_override_pattern="M-M*-", num_hidden_layers=5, intermediate_size=[160],
                  auto_map={"AutoModelForCausalLM": "modeling_nemotron_h.NemotronHForCausalLM"})
    del config["layers_block_type"], config["time_step_limit"]
    (folder / "config.json").write_text(json.dumps(config)[:-1] + ', "time_step_limit": [0.0, Infinity]}')
    tensors = load_file(folder / "model.safetensors")
    save_file({**tensors, "mtp.fc.weight": torch.zeros(96, 192), "mtp.norm.weight": torch.ones(96)},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    model, read = load_model(folder)
    assert read.mixer_layers == [True, False, True, True, False] and read.mamba.time_step_limit == (0.0, math.inf)
    assert read.mtp is None and read.intermediate_size == 160
    _check_against(reference, model, PROMPTS, decode_steps=2, chunk=4)
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": [160, 192]}))
    with pytest.raises(UserError, match="MLP widths that differ by block"):
        load_model(folder)


def test_deepseek_v2_config_as_the_hub_writes_it(tmp_path):
    """DeepSeek-V2-Lite's config.json as on the Hub (written for its own code): YaRN under rope_scaling with
    "type" and a top-level rope_theta, q_lora_rank null, greedy routing over one group, the keys only its code
    reads (auto_map, scoring_func, moe_layer_freq, aux_loss_alpha, seq_aux); transformers' own class reads
    the same folder, and both give the same logits."""
    import transformers

    folder = make_tiny_hf(tmp_path, "deepseek_v2")
    config = json.loads((folder / "config.json").read_text())
    yarn = config.pop("rope_parameters")
    config.update(rope_theta=yarn.pop("rope_theta"), rope_scaling={"type": yarn.pop("rope_type"), **yarn},
                  topk_method="greedy", n_group=1, topk_group=1, scoring_func="softmax", moe_layer_freq=1,
                  aux_loss_alpha=0.001, seq_aux=True, norm_topk_prob=False, q_lora_rank=None,
                  auto_map={"AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    model, read = load_model(folder)
    assert read.router_groups is None and read.rope["rope_type"] == "yarn" and read.rotary_interleaved
    reference = transformers.DeepseekV2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    _check_against(reference, model, PROMPTS, decode_steps=2)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_latent_attention_through_the_triton_kernels(tmp_path, monkeypatch):
    """The latent attention's one 40-wide cache row per token (not a power of two) read by all 4 query heads, its
    V cache the K cache, through the Triton cache writes and prefill and decode attention (under the
    interpreter, as a GPU runs them): transformers' logits."""
    import transformers

    from lcq.models import attention

    folder = make_tiny_hf(tmp_path, "deepseek_v3")
    model, _ = load_model(folder)
    start = attention.PagedAttention.__init__

    def on_triton(self, *args, **kwargs):
        start(self, *args, **kwargs)
        self.use_triton, self.use_cpu_ops = True, False

    monkeypatch.setattr(attention.PagedAttention, "__init__", on_triton)
    reference = transformers.DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    _check_against(reference, model, PROMPTS[:2], decode_steps=2, chunk=4)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("arch, fused", [("llama", "1"), ("llama", "0"), ("qwen2", "1"), ("qwen3", "1")])
def test_steps_through_the_gpu_kernels_follow_transformers(tmp_path, monkeypatch, arch, fused):
    """An LCQ Llama's forward passes as a GPU runs them, in Triton's interpreter on CPU tensors: the products, the
    norms, the rotary embedding with the cache write in one kernel, paged attention, and at the decode steps' 2 rows
    the layers on the residual stream (the MLP's activation inside the down product, each norm inside the product
    reading it, each residual add inside the product making it): transformers' logits with the dequantized
    weights; Qwen2's biased QKV, Qwen3's norms of queries and keys too. LCQ_FUSED_STEPS=0: the same, each step its
    own kernel."""
    from lcq.kernels import elementwise, linear, paged_attention, triton_linear
    from lcq.models import attention

    monkeypatch.setenv("LCQ_FUSED_STEPS", fused)
    monkeypatch.setattr(cpu_ops, "ENABLED", False)
    monkeypatch.setattr(linear, "runs_triton", lambda x: True)
    start = attention.PagedAttention.__init__

    def on_triton(self, *args, **kwargs):
        start(self, *args, **kwargs)
        self.use_triton, self.use_cpu_ops = True, False

    monkeypatch.setattr(attention.PagedAttention, "__init__", on_triton)
    launches = []  # the kernels of their own that the fused steps save
    for module, name in ((paged_attention, "rotary_store_kv"), (paged_attention, "store_kv"),
                         (elementwise, "gated_activation"), (triton_linear, "gated_activation"),
                         (elementwise, "add_rms_norm")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, real=real, name=name: launches.append(name) or real(*args))
    folder = make_tiny_lcq(tmp_path, arch, bits=2, rank=2, group_size=32, method="rtn")
    model, _ = load_model(folder, cache_dense=False)
    _check_against(load_reference_model(folder), model, PROMPTS[:2], decode_steps=2)
    steps = 3 * len(model.layers)  # the prompts' step and two decode steps, each layer
    assert launches.count("rotary_store_kv") == (steps if fused == "1" else 0)
    assert launches.count("store_kv") == (0 if fused == "1" else steps)
    # at the prompts' 14 rows the down product (tl.dot rows) takes the activation kernel's output, at 2 rows not
    assert launches.count("gated_activation") == (steps // 3 if fused == "1" else steps)
    # two a layer and the final norm each step; at 2 rows the first layer's attention norm and the final norm only
    layers = len(model.layers)
    assert launches.count("add_rms_norm") == ((2 * layers + 1) + 2 * 2 if fused == "1" else 3 * (2 * layers + 1))


def test_mxfp4_experts_decode_as_transformers_does(tmp_path):
    """The Hub's MXFP4 experts read as each expert's gate, up and down matrices: exactly transformers' own
    decoding (dequantize=True) of the same codes, their biases as stored."""
    import transformers
    from safetensors.torch import load_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from lcq.format import CheckpointReader
    from lcq.format.mxfp4 import decode_mxfp4
    from tests.tiny_model import mxfp4_copy

    codes = torch.randint(0, 256, (3, 10, 4, 16), dtype=torch.uint8)
    scales = torch.randint(110, 135, (3, 10, 4), dtype=torch.uint8)
    assert torch.equal(decode_mxfp4(codes, scales).transpose(1, 2), convert_moe_packed_tensors(codes, scales))
    folder = mxfp4_copy(make_tiny_hf(tmp_path / "bf16", "gpt_oss"), tmp_path / "mxfp4")
    reader, stored = CheckpointReader(folder), load_file(folder / "model.safetensors")
    experts = transformers.GptOssForCausalLM.from_pretrained(
        folder, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32
    ).model.layers[1].mlp.experts
    prefix = "model.layers.1.mlp.experts"
    for e in range(4):
        gate_up, bias = experts.gate_up_proj[e].t(), stored[f"{prefix}.gate_up_proj_bias"][e]
        parts = {"gate_proj": (gate_up[0::2], bias[0::2]), "up_proj": (gate_up[1::2], bias[1::2]),
                 "down_proj": (experts.down_proj[e].t(), stored[f"{prefix}.down_proj_bias"][e])}
        for part, (weight, part_bias) in parts.items():
            assert reader.shape(f"{prefix}.{e}.{part}.weight") == tuple(weight.shape)
            assert torch.equal(reader.tensor(f"{prefix}.{e}.{part}.weight").float(), weight)
            assert torch.equal(reader.tensor(f"{prefix}.{e}.{part}.bias"), part_bias)
    assert not any(name.endswith(("_blocks", "_scales")) for name in reader.names())
    assert "quantization_config" not in reader.config  # read as a full-precision folder


@pytest.mark.parametrize("arch, family, overrides", [
    ("cohere", "CohereForCausalLM", {}), ("cohere_qk", "CohereForCausalLM", {}),
    ("cohere2", "Cohere2ForCausalLM", {"sliding_window": 7})])  # three 7-token windows (rotary), a NoPE full layer
@pytest.mark.parametrize("c_ops", ["1", "0"])
def test_cohere_follows_transformers(tmp_path, monkeypatch, arch, family, overrides, c_ops):
    """Cohere (Command R, Aya Expanse) and Cohere 2 (Command R7B, Command A): LayerNorms without bias,
    attention and the MLP side by side on one norm's output, adjacent rotary pairs, logits scaled (folded
    into the final norm), the head tied; Cohere 2's sliding-window layers turn, its full ones do not; Command R+'s
    LayerNorms of each query and key head, each with its own weights (use_qk_norm). Our model against
    transformers' own class."""
    import transformers

    monkeypatch.setattr(cpu_ops, "ENABLED", c_ops == "1")
    folder = make_tiny_hf(tmp_path, arch, **overrides)
    model, config = load_model(folder)
    assert config.layer_norm and config.parallel_block and config.rotary_interleaved and config.logit_scale == 0.5
    assert config.qk_norm == config.qk_norm_weights_per_head == (arch == "cohere_qk")
    if arch == "cohere2":
        assert config.layer_windows == [7, 7, 7, 0] and config.rope_layers == [True, True, True, False]
    reference = getattr(transformers, family).from_pretrained(folder, dtype=torch.float32).eval()
    long_prompt = [(5 * i + 2) % 300 + 1 for i in range(20)]  # past the window
    _check_against(reference, model, [*PROMPTS, long_prompt], decode_steps=3, chunk=4)


@pytest.mark.parametrize("arch", ["stablelm", "stablelm_parallel"])
@pytest.mark.parametrize("c_ops", ["1", "0"])
def test_stablelm_follows_transformers(tmp_path, monkeypatch, arch, c_ops):
    """StableLM 2 (LayerNorms with biases, q/k/v biases, a rotary embedding over a quarter of each head,
    read as a whole-head one with its rows reordered), with sequential residual blocks (1.6B's form), and
    parallel ones with a LayerNorm of each query and key head, each head's module its own weights, reordered as
    the head's rows are (12B's form): our model against transformers' StableLmForCausalLM of the same folder."""
    import transformers

    monkeypatch.setattr(cpu_ops, "ENABLED", c_ops == "1")
    folder = make_tiny_hf(tmp_path, arch)
    model, config = load_model(folder)
    parallel = arch == "stablelm_parallel"
    assert config.layer_norm and config.norm_bias and config.qkv_bias and config.parallel_block == parallel
    assert config.qk_norm == config.qk_norm_weights_per_head == parallel
    assert config.rope["rope_type"] == "longrope"
    reference = transformers.StableLmForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    _check_against(reference, model, PROMPTS, decode_steps=3, chunk=4)


@pytest.mark.parametrize("c_ops", ["1", "0"])
def test_glm4_0414_runs_its_adjacent_pair_rotary_natively(tmp_path, monkeypatch, c_ops):
    """GLM-4-0414 (norms on the attention's and MLP's outputs too, gate/up stored fused, a rotary embedding
    turning adjacent pairs of each head's first half): read as itself with that embedding over whole heads,
    run with adjacent pairs by the C ops and the torch path, against transformers' Glm4ForCausalLM."""
    import transformers

    from lcq.format import CheckpointReader

    monkeypatch.setattr(cpu_ops, "ENABLED", c_ops == "1")
    folder = make_tiny_hf(tmp_path, "glm4")
    reader = CheckpointReader(folder)
    assert reader.config["model_type"] == "glm4" and reader.config["rope_parameters"]["rope_type"] == "longrope"
    mlp = "model.layers.0.mlp"
    assert reader.has(f"{mlp}.gate_proj.weight") and not reader.has(f"{mlp}.gate_up_proj.weight")
    model, config = load_model(folder)
    assert config.rotary_interleaved and config.sandwich_norms and config.pre_norms
    _check_against(transformers.Glm4ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), model, PROMPTS,
                   decode_steps=3)


@pytest.mark.parametrize("arch, family", [("granite", "GraniteForCausalLM"),
                                          ("granite4", "GraniteMoeHybridForCausalLM")])
def test_granite_reads_as_llama_with_its_factors_folded(tmp_path, arch, family):
    """Granite 3's embedding, residual, attention and logits factors folded into weights and the norms'
    epsilon, and Granite 4.0's dense form (granite-4.0-micro) the same with its shared MLP as Llama's:
    our model against transformers' own class of the same folder, in fp32."""
    import transformers

    from lcq.format import CheckpointReader

    folder = make_tiny_hf(tmp_path, arch)
    reader = CheckpointReader(folder)
    assert reader.config["model_type"] == "llama" and reader.config["rms_norm_eps"] == pytest.approx(1e-5 / 144)
    stored = getattr(transformers, family).from_pretrained(folder)
    assert torch.allclose(reader.tensor("model.layers.0.self_attn.q_proj.weight"),
                          stored.model.layers[0].self_attn.q_proj.weight * 0.0078125 * 24 ** 0.5)
    if arch == "granite4":
        mlp = stored.model.layers[0].shared_mlp
        assert reader.config["intermediate_size"] == 128
        assert torch.equal(reader.tensor("model.layers.0.mlp.up_proj.weight"), mlp.input_linear.weight[128:])
        assert torch.allclose(reader.tensor("model.layers.0.mlp.down_proj.weight"),
                              mlp.output_linear.weight * 0.22 / 12)
    model, _ = load_model(folder)
    _check_against(stored.eval(), model, PROMPTS, decode_steps=3)


@pytest.mark.parametrize("arch, family", [("granitemoe", "GraniteMoeForCausalLM"),
                                          ("granitemoeshared", "GraniteMoeSharedForCausalLM")])
@pytest.mark.parametrize("c_ops", ["1", "0"])
def test_granite_mixtures_follow_transformers(tmp_path, monkeypatch, arch, family, c_ops):
    """Granite 3's mixtures (granite-3.1-1b-a400m, 3b-a800m) and GraniteMoeShared's dense MLP beside them: read as
    themselves with Granite's residual, attention and logits factors folded into weights (neutral in the config
    read) and its embeddings' kept, the experts' 3-D input_linear and output_linear as each expert's matrices,
    the softmax over the chosen 2 of 4 experts: our model against transformers' own class, with the C ops and the
    torch path."""
    import transformers

    monkeypatch.setattr(cpu_ops, "ENABLED", c_ops == "1")
    folder = make_tiny_hf(tmp_path, arch)
    model, config = load_model(folder)
    assert (config.num_experts, config.experts_per_token, config.shared_expert) == (4, 2, arch == "granitemoeshared")
    assert config.embed_scale == 12.0 and not config.recurrent and all(config.moe_layers)
    reference = getattr(transformers, family).from_pretrained(folder, dtype=torch.float32).eval()
    _check_against(reference, model, PROMPTS, decode_steps=3, chunk=4)


@pytest.mark.parametrize("c_ops", ["1", "0"])
@pytest.mark.parametrize("partial", [1.0, 0.75])
def test_phi3_longrope_factors_follow_the_context_served(tmp_path, monkeypatch, c_ops, partial):
    """Phi-3.5's LongRoPE (original context 16 here), and with Phi-4-mini's partial rotary embedding (18
    of 24 dimensions here, read as a whole-head one): the tables of a model served past the original
    context use the long factors, as transformers' Phi3ForCausalLM does on sequences past it; fitted to a
    context within it, the short ones, as transformers on sequences within it. With the C ops and the
    torch path."""
    import transformers

    monkeypatch.setattr(cpu_ops, "ENABLED", c_ops == "1")
    folder = make_tiny_hf(tmp_path, "phi3", **phi3_longrope(16, partial))
    reference = transformers.Phi3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model, config = load_model(folder)
    assert config.rope["rope_type"] == "longrope" and config.max_position_embeddings == 256
    _check_against(reference, model, [[(7 * i + 3) % 300 + 1 for i in range(n)] for n in (20, 33)], decode_steps=3)
    short_tables = load_model(folder)[0]
    short_tables.fit_rotary(16)
    assert not torch.equal(short_tables.rotary.cos, model.rotary.cos)
    _check_against(reference, short_tables, PROMPTS, decode_steps=3)  # at most 14 tokens
    model.fit_rotary(16)  # in place: the tensors the C decode step holds
    assert torch.equal(short_tables.rotary.cos, model.rotary.cos)


@pytest.mark.parametrize("packed", [False, True], ids=["fp32", "lcq"])
def test_weights_config_json_does_not_describe_are_one_error(tmp_path, packed):
    """A config.json changed apart from its weights loaded and then failed every request (or served a model
    without its last layers): each is one FormatError at load, naming what does not fit."""
    from safetensors.torch import load_file, save_file

    from lcq.format import FormatError

    folder = make_tiny_lcq(tmp_path) if packed else make_tiny_hf(tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    for changes, message in (({"num_hidden_layers": 1}, "holds layers up to 1, beyond the 1 of config.json"),
                             ({"num_key_value_heads": 1}, r"q_proj/k_proj/v_proj: its weights have 192 output "
                                                          r"features where config.json makes 144")):
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
        with pytest.raises(FormatError, match=message):
            load_model(folder)
    (folder / "config.json").write_text(json.dumps(config))
    index = folder / "model.safetensors.index.json"
    shard = folder / (json.loads(index.read_text())["weight_map"]["model.norm.weight"] if index.is_file() else
                      "model.safetensors")
    tensors = load_file(shard)
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1]
    save_file(tensors, shard)
    with pytest.raises(FormatError, match="model.norm: a tensor's size is not what config.json makes"):
        load_model(folder)
    if packed:
        return
    tensors["model.norm.weight"] = torch.ones(config["hidden_size"])
    del tensors["model.layers.1.input_layernorm.weight"]
    save_file(tensors, shard)
    with pytest.raises(FormatError, match="'model.layers.1.input_layernorm.weight' missing"):  # (not a per-head name)
        load_model(folder)


@pytest.mark.parametrize("packed", [False, True], ids=["fp32", "lcq"])
def test_a_matrix_of_another_size_than_the_model_makes_is_one_error(tmp_path, packed):
    """Weights cut by one input or output feature, each matrix consistent in itself: fused parts of unequal
    input features were a bare ValueError, and q/k/v all narrower, or o_proj or down_proj shorter, loaded and
    then failed every request (found by an audit of the format)."""
    from safetensors.torch import load_file, save_file

    from lcq.format import FormatError

    folder = make_tiny_lcq(tmp_path) if packed else make_tiny_hf(tmp_path / "hf")
    shards = sorted(folder.glob("*.safetensors"))
    original = {shard: load_file(shard) for shard in shards}
    layer = "model.layers.1"

    def cut(tensors: dict[str, torch.Tensor], module: str, side: str) -> None:
        """module's matrix one input (side "in") or output ("out") feature smaller, in the stored form."""
        prefix = f"{layer}.{module}"
        if not packed:
            weight = tensors[f"{prefix}.weight"]
            tensors[f"{prefix}.weight"] = (weight[:, :-1] if side == "in" else weight[:-1]).contiguous()
            return
        shape = tensors[f"{prefix}.shape"].clone()
        shape[0 if side == "out" else 1] -= 1
        tensors[f"{prefix}.shape"] = shape
        if side == "out":  # per output row: the last dimension of every packed tensor
            for name in ("qweight", "s_q", "s_scale", "b_q", "b_scale"):
                tensors[f"{prefix}.{name}"] = tensors[f"{prefix}.{name}"][..., :-1].contiguous()

    for modules, side, message in (
            (["mlp.gate_proj"], "in", r"mlp.gate_proj, .*mlp.up_proj have different input features \(95, 96\)"),
            (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "in",
             "q_proj/k_proj/v_proj: its weights have 95 input features where config.json makes 96"),
            (["mlp.gate_proj", "mlp.up_proj"], "in", "gate_proj/.*up_proj: its weights have 95 input features"),
            (["self_attn.o_proj"], "out", "o_proj: its weights have 95 output features where config.json makes 96"),
            (["mlp.down_proj"], "out", "down_proj: its weights have 95 output features")):
        for shard, tensors in original.items():
            tensors = dict(tensors)
            for module in modules:
                if any(name.startswith(f"{layer}.{module}.") for name in tensors):
                    cut(tensors, module, side)
            save_file(tensors, shard)
        with pytest.raises(FormatError, match=message):
            load_model(folder)
    for shard, tensors in original.items():
        save_file(tensors, shard)
    load_model(folder)


def test_phi3_errors_are_one_line(tmp_path):
    """Rope types Phi-3 does not have, partial rotary embeddings that leave an odd number of dimensions and
    wrong numbers of LongRoPE factors are refused by name, and a fused matrix shorter than config.json says
    is caught where it is read."""
    from lcq.format import CheckpointReader, FormatError

    folder = make_tiny_hf(tmp_path, "phi3")
    config = json.loads((folder / "config.json").read_text())
    for changes, message in (({"partial_rotary_factor": 0.55}, "rotates 13 of a head's 24 dimensions"),
                             ({"partial_rotary_factor": 0.5, "rope_scaling": {"type": "longrope", "short_factor": [
                                 1.0] * 12}}, "longrope needs 6 short_factor values"),
                             ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
                             ({"rope_scaling": {"type": "su", "short_factor": [1.0] * 12, "long_factor": [1.0] * 11}},
                              "longrope needs 12 long_factor values .* gives 11")):
        (folder / "config.json").write_text(json.dumps({**config, **changes, "rope_parameters": None}))
        with pytest.raises(UserError, match=message):
            load_model(folder)
    (folder / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 4}))
    with pytest.raises(FormatError, match="qkv_proj.weight' has 192 rows, config.json gives .*v_proj.weight rows"):
        CheckpointReader(folder).tensor("model.layers.0.self_attn.v_proj.weight")


def test_granite4_position_embeddings_lcq_does_not_run_are_refused(tmp_path):
    """Granite 4.0's attention-only form without a rotary embedding, and a hybrid with a position embedding
    other than RoPE or none, get one line each."""
    folder = make_tiny_hf(tmp_path, "granite4")
    config = json.loads((folder / "config.json").read_text())
    for changes, message in (({"position_embedding_type": "nope"}, "'nope' is not supported without Mamba layers"),
                             ({"layer_types": ["mamba", "attention"], "position_embedding_type": "alibi"},
                              r"'alibi' is not supported \(nope or rope\)")):
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
        with pytest.raises(UserError, match=message):
            load_model(folder)


def test_multimodal_checkpoint_errors_are_one_line(tmp_path):
    folder = make_tiny_multimodal(tmp_path, "gemma3")
    config = json.loads((folder / "config.json").read_text())
    del config["text_config"]["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="text_config has no model_type"):
        load_model(folder)
    config["text_config"] = {"model_type": "gpt2"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="GPT2LMHeadModel is not supported"):
        load_model(folder)


@pytest.mark.skipif(not cpu_half.enabled(), reason="fp16 CPU kernel unavailable here")
@pytest.mark.parametrize("tied", [True, False])
def test_fp16_checkpoint_keeps_no_fp32_copies(tmp_path, tied):
    """An fp16 checkpoint loaded as an fp32 CPU model: every weight, the head and the embedding table
    stay exact fp16 copies (a tied table is the head's copy), and the tokens match transformers."""
    folder = make_tiny_hf(tmp_path, "llama", dtype=torch.float16, tie_word_embeddings=tied)
    model, _ = load_model(folder)
    assert model.dtype == torch.float32 and model.lm_head is None
    assert model.embed_tokens.weight.dtype == torch.float16
    assert (model.embed_tokens.weight.data_ptr() == model.lm_head_half.data_ptr()) == tied
    assert all(p.dtype != torch.float32 for n, p in model.named_parameters() if "norm" not in n), "an fp32 weight"
    _check_against(load_reference_model(folder), model, PROMPTS, decode_steps=3)


class _LargeTensorsMade(TorchDispatchMode):
    """Records (dtype, layout) of each tensor of at least `numel` elements that an op makes on a real device
    (not meta): what a load allocates, whatever it frees before returning."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.made = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and not t.is_meta and t.numel() >= self.numel:
                self.made.append((t.dtype, t.layout))
        return out


@pytest.mark.skipif(not cpu_half.enabled(), reason="fp16 CPU kernel unavailable here")
@pytest.mark.parametrize("tied", [True, False])
def test_fp16_checkpoint_loads_without_an_fp32_table(tmp_path, tied):
    """An fp16 checkpoint loaded as an fp32 CPU model makes no fp32 tensor of its embedding table's size at any
    point: the table and the head are read in fp16 and kept as read (their fp16 copies are exact by
    construction). Their fp32 round trip, its exactness check and the model's unfilled fp32 tables peaked at
    4.8x a Gemma-3-270M-shaped checkpoint (262144 x 640 table), 1.6 GiB above what loading began with."""
    from safetensors.torch import load_file

    folder = make_tiny_hf(tmp_path, "llama", dtype=torch.float16, tie_word_embeddings=tied)
    config = json.loads((folder / "config.json").read_text())
    with _LargeTensorsMade(config["vocab_size"] * config["hidden_size"]) as seen:
        model, _ = load_model(folder)
    made = seen.made
    assert (torch.float16, torch.strided) in made and all(dtype != torch.float32 for dtype, _ in made), made
    stored = load_file(folder / "model.safetensors")
    assert model.lm_head is None and torch.equal(model.lm_head_half, stored["model.embed_tokens.weight" if tied
                                                                            else "lm_head.weight"])
    assert torch.equal(model.embed_tokens.weight, stored["model.embed_tokens.weight"])
    assert (model.embed_tokens.weight.data_ptr() == model.lm_head_half.data_ptr()) == tied


@pytest.mark.skipif(not cpu_half.enabled(), reason="fp16 CPU kernel unavailable here")
def test_a_bf16_table_is_checked_for_fp16_a_few_rows_at_a_time(tmp_path, monkeypatch):
    """A bf16 table loaded as an fp32 CPU model is kept as an fp16 copy where fp16 holds each of its values,
    which is checked a few rows at a time: one value fp16 cannot hold, in the head's last row, keeps the head
    in fp32 as read (packed for oneDNN where it can be), and that is the only fp32 table the load makes. A
    table of another size than config.json makes is one error."""
    from safetensors.torch import load_file, save_file

    from lcq.format import FormatError
    from lcq.kernels import cpu_matmul

    folder = make_tiny_hf(tmp_path, "llama", dtype=torch.bfloat16)
    tensors = load_file(folder / "model.safetensors")
    embed, head = tensors["model.embed_tokens.weight"], tensors["lm_head.weight"]
    for table in (embed, head):
        table[table.float().abs() < 2 ** -14] = 0  # (bf16 values fp16 holds, but for its subnormals)
    head[-1, -1] = 2 ** -20 * (1 + 2 ** -7)  # (a bf16 value whose last bit is below fp16's smallest step)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    vocab, hidden = embed.shape
    monkeypatch.setattr(cpu_matmul, "EXACT_CHECK_BYTES", 8 * hidden * 4)  # 8 rows at a time
    with _LargeTensorsMade(vocab * hidden) as seen:
        model, _ = load_model(folder)
    made = seen.made
    assert model.lm_head_half is None and model.embed_tokens.weight.dtype == torch.float16
    assert torch.equal(model.embed_tokens.weight, embed.half())
    kept = model.lm_head.to_dense() if model.lm_head.is_mkldnn else model.lm_head
    assert kept.dtype == torch.float32 and torch.equal(kept, head.float())
    assert made.count((torch.float32, torch.strided)) == 1, made
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": vocab + 1}))
    with pytest.raises(FormatError, match=r"the embeddings and the head: a tensor's size is not what config.json "
                                          r"makes \(model.embed_tokens.weight is \(384, 96\)"):
        load_model(folder)


def test_chunked_prefill_matches_transformers(tmp_path):
    folder = make_tiny_hf(tmp_path / "llama", "llama", tie_word_embeddings=True)
    model, _ = load_model(folder)
    _check_against(load_reference_model(folder), model, PROMPTS, decode_steps=2, chunk=3)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "smollm3", "olmo2", "exaone4",
                                  "seed_oss", "arcee", "apertus"])
@pytest.mark.parametrize("cpu_weights", ["index", "half", "fp32"])
def test_lcq_matches_transformers_with_dequantized_weights(tmp_path, monkeypatch, arch, cpu_weights):
    """fp32 products and the index kernel (cpu_index) are exact up to summation order; the fp16
    kernel (cpu_half) rounds each weight to fp16 (relative 2^-11), which moves this tiny model's
    logits by about 1e-3."""
    monkeypatch.setenv("LCQ_CPU_INDEX", "1" if cpu_weights == "index" else "0")
    monkeypatch.setenv("LCQ_CPU_HALF", "0" if cpu_weights == "fp32" else "1")
    folder = make_tiny_lcq(tmp_path, arch, bits=3, rank=2, group_size=32, method="rtn")
    model, _ = load_model(folder)
    down = model.layers[0].mlp.down_proj
    kernels = cpu_half.enabled()
    assert (down.uses_index_weights, down.uses_half_weights) == (cpu_weights == "index" and kernels,
                                                                  cpu_weights == "half" and kernels)
    _check_against(load_reference_model(folder), model, PROMPTS, decode_steps=3,
                   atol=5e-3 if cpu_weights == "half" else 2e-4)


def test_lcq_without_dense_cache_matches(tmp_path):
    folder = make_tiny_lcq(tmp_path, "llama", bits=2, rank=1, group_size=32, method="rtn")
    model, _ = load_model(folder, cache_dense=False)
    _check_against(load_reference_model(folder), model, PROMPTS[:2], decode_steps=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_follows_full_precision(tmp_path, dtype):
    folder = make_tiny_hf(tmp_path, "qwen2")
    model, _ = load_model(folder, dtype=dtype)
    assert model.embed_tokens.weight.dtype == dtype and model.layers[0].mlp.down_proj.weight.dtype == dtype
    batch = PagedBatch(model)
    seqs = [batch.add() for _ in PROMPTS]
    logits = batch.step(dict(zip(seqs, PROMPTS)))
    assert logits.dtype == torch.float32
    reference = load_reference_model(folder)
    expected = torch.stack([_reference_logits(reference, p)[-1] for p in PROMPTS])
    torch.testing.assert_close(logits, expected, atol=0.05 if dtype == torch.float16 else 0.2, rtol=0)


# The later families at one dtype each, within the GPU session's time limit (bench/gpu_session.sh).
@pytest.mark.gpu
@pytest.mark.parametrize("arch, dtype", [
    *((arch, dtype) for arch in ("qwen2", "qwen3") for dtype in (torch.float16, torch.bfloat16)),
    ("glm4", torch.float16), ("qwen3_moe", torch.bfloat16), ("mixtral", torch.float16), ("olmoe", torch.bfloat16),
    ("qwen2_moe", torch.float16), ("cohere", torch.float16), ("cohere2", torch.bfloat16), ("stablelm", torch.float16),
    ("gpt_oss", torch.bfloat16), ("llama4", torch.float16), ("glm4_moe", torch.bfloat16),
    # Qwen3.5-MoE in fp16: its tiny random router has near ties (0.002-0.003 between the k-th expert's score
    # and the next), which the Triton path's bf16 rounding flipped in 9 of 16 routings (its kernels run on
    # CPU in the interpreter), while each of its products stayed within bf16 rounding of the exact one
    ("deepseek_v2", torch.float16), ("deepseek_v3", torch.bfloat16), ("qwen3_5_moe", torch.float16),
    ("granite4_moe", torch.bfloat16), ("minimax_m2", torch.float16)])
def test_cuda_model_follows_transformers(tmp_path, arch, dtype, exact_products):
    """Triton attention and LCQ kernels end to end: prefill, then ragged decode steps (GLM-4-0414: its
    adjacent rotary pairs and output norms on the GPU path; Qwen3-MoE: each expert's LCQ layers)."""
    folder = make_tiny_lcq(tmp_path, arch, bits=2, rank=2, group_size=32, method="rtn")
    model, _ = load_model(folder, device="cuda", dtype=dtype)
    _check_against(load_reference_model(folder), model, PROMPTS, decode_steps=3, chunk=4,
                   atol=0.1 if dtype == torch.float16 else 0.25)


@pytest.mark.parametrize("arch, overrides", [
    ("mistral", {"sliding_window": 7}),  # every layer
    ("qwen2", {"use_sliding_window": True, "sliding_window": 7, "max_window_layers": 1}),  # layers from 1 on
    ("gemma3", {"sliding_window": 7}),  # layer 0, with its own rotary base
    ("gemma2", {"sliding_window": 7}),  # layer 0, scores soft-capped
    ("exaone4", {"sliding_window": 7}),  # layers 0-2; layer 3 global and NoPE
    ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 7, "max_window_layers": 1})])  # every layer
@pytest.mark.parametrize("c_ops", ["1", "0"])
def test_sliding_window_layers_match_transformers_past_the_window(tmp_path, monkeypatch, arch, overrides, c_ops):
    """Prompts of 11 and 20 tokens against a 7-token window, prefilled in chunks of 4 after their
    cached part, then decoded (from fp16 weights: the one-call CPU decode step where it runs): the
    context is not capped."""
    monkeypatch.setattr(cpu_ops, "ENABLED", c_ops == "1")
    folder = make_tiny_hf(tmp_path, arch, dtype=torch.float16, **overrides)
    model, config = load_model(folder)
    windows = {"mistral": [7, 7], "qwen2": [0, 7], "gemma3": [7, 0], "gemma2": [7, 0], "exaone4": [7, 7, 7, 0],
               "qwen3_moe": [7, 7]}[arch]
    assert config.layer_windows == windows and config.max_position_embeddings == 256
    long_prompt = [(5 * i + 2) % 300 + 1 for i in range(20)]
    _check_against(load_reference_model(folder), model, [PROMPTS[0], long_prompt], decode_steps=4, chunk=4)
    assert (model.cpu_decoder is None) == (c_ops == "0" or not cpu_half.enabled())


@pytest.mark.gpu
def test_cuda_model_with_an_fp8_cache_follows_transformers(tmp_path, exact_products):
    """kv_cache_dtype fp8 on a GPU (compute capability 8.9+): an fp16 model over a float8 e4m3 cache stays
    within fp8's rounding of transformers' logits through prefill and ragged decode steps."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 e4m3 needs compute capability 8.9 or later")
    folder = make_tiny_lcq(tmp_path, "qwen3", bits=2, rank=2, group_size=32, method="rtn")
    model, _ = load_model(folder, device="cuda", dtype=torch.float16)
    _check_against(load_reference_model(folder), model, PROMPTS, decode_steps=3, chunk=4, atol=0.3,
                   cache_dtype=torch.float8_e4m3fn)


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("c_ops", ["1", "0"])
def test_ministral3_queries_cool_past_the_original_context(tmp_path, monkeypatch, c_ops):
    """Ministral 3 (YaRN over an original context of 32 here): queries at position p are multiplied by
    1 + 0.5 log(1 + floor(p / 32)), which an 80-token prompt (prefilled in chunks of 16) and its decode
    steps reach; against transformers, from fp16 weights (the one-call C decode step where it builds)."""
    monkeypatch.setattr(cpu_ops, "ENABLED", c_ops == "1")
    folder = make_tiny_hf(tmp_path, "ministral3", dtype=torch.float16)
    model, config = load_model(folder)
    assert config.query_temperature == (0.5, 32, 0) and config.rope["rope_type"] == "yarn"
    long_prompt = [(5 * i + 2) % 300 + 1 for i in range(80)]
    _check_against(load_reference_model(folder), model, [PROMPTS[0], long_prompt], decode_steps=3, chunk=16)
    assert (model.cpu_decoder is None) == (c_ops == "0" or not cpu_half.enabled())


@pytest.mark.parametrize("c_ops", ["1", "0"])
def test_yarn_matches_transformers_past_the_original_context(tmp_path, monkeypatch, c_ops):
    """Qwen2 with YaRN (as its model card extends the context): frequencies ramped between kept and
    interpolated, cos and sin scaled; a 100-token prompt runs past the original 64 positions."""
    monkeypatch.setattr(cpu_ops, "ENABLED", c_ops == "1")
    folder = make_tiny_hf(tmp_path, "qwen2", max_position_embeddings=64, rope_scaling=YARN)
    model, config = load_model(folder)
    assert config.max_position_embeddings == 256  # 4 x the original, where transformers' config says 64
    long_prompt = [(7 * i + 3) % 300 + 1 for i in range(100)]
    _check_against(load_reference_model(folder), model, PROMPTS + [long_prompt], decode_steps=3)


@pytest.mark.parametrize("arch, hidden_act", [("llama", "gelu_pytorch_tanh"), ("qwen2", "gelu_new"),
                                              ("mistral", "swish")])
@pytest.mark.parametrize("c_ops", ["1", "0"])
def test_the_mlp_runs_the_activation_config_names(tmp_path, monkeypatch, arch, hidden_act, c_ops):
    """A gated family's hidden_act is its MLP's activation (it ran SiLU whatever config.json said); one the
    kernels lack is refused rather than served as another."""
    monkeypatch.setattr(cpu_ops, "ENABLED", c_ops == "1")
    folder = make_tiny_hf(tmp_path, arch, hidden_act=hidden_act)
    model, config = load_model(folder)
    assert config.activation == ("silu" if hidden_act == "swish" else "gelu_tanh")
    _check_against(load_reference_model(folder), model, PROMPTS, decode_steps=3)
    other = make_tiny_hf(tmp_path / "relu", arch, hidden_act="relu")
    with pytest.raises(UserError, match="hidden_act 'relu' is not supported"):
        ModelConfig.from_folder(other)


def test_rotary_tables_are_the_rounded_cos_and_sin_in_every_process():
    """The tables are cos and sin of each position's angles rounded to fp32, in every fresh process where building
    them is the first work of torch's threads: with torch's cos, about one process in four (2 threads, torch
    2.13) had its second thread's half off by up to 7e-9, so tables, and batch-invariant logits, changed between
    starts. Eight processes, each against math.cos and math.sin."""
    code = """if True:
        import math, torch
        torch.set_num_threads(2)
        from lcq.models.layers import RotaryEmbedding, rotary_frequencies
        rope = {"rope_type": "default", "rope_theta": 10000.0}
        table = RotaryEmbedding(24, 256, rope)
        inv_freq = rotary_frequencies(24, rope, 256)[0].tolist()
        angles = [[p * f for f in inv_freq] for p in range(256)]
        cos = torch.tensor([[math.cos(a) for a in row] for row in angles]).float()
        sin = torch.tensor([[math.sin(a) for a in row] for row in angles]).float()
        print(int((table.cos != cos).sum() + (table.sin != sin).sum()))"""
    for _ in range(8):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                                cwd=Path(__file__).resolve().parents[1])
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.split()[-1] == "0"


def test_dynamic_ntk_rope_is_transformers_within_the_models_context(tmp_path):
    """Dynamic NTK scaling (InternLM3, Llama 2 fine-tunes) changes transformers' base only past
    max_position_embeddings, which is the context we serve: up to it, our model is transformers'."""
    folder = make_tiny_hf(tmp_path, "llama", rope_scaling={"rope_type": "dynamic", "factor": 4.0},
                          max_position_embeddings=64)
    model, config = load_model(folder)
    assert config.rope["rope_type"] == "dynamic" and config.max_position_embeddings == 64
    _check_against(load_reference_model(folder), model, PROMPTS + [[(3 * i + 1) % 300 + 1 for i in range(60)]],
                   decode_steps=3)


@pytest.mark.parametrize("settings", [
    {}, {"attention_factor": 0.8}, {"mscale": 0.707, "mscale_all_dim": 1.0}, {"beta_fast": 16, "beta_slow": 2},
    {"truncate": False}, {"factor": None, "original_max_position_embeddings": 32},
])
def test_yarn_frequencies_are_transformers(settings):
    from transformers import Qwen2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from lcq.models.layers import rope_settings, rotary_frequencies
    sizes = dict(hidden_size=128, num_attention_heads=2, max_position_embeddings=128, rope_theta=10000.0)
    rope = {**YARN, **settings}
    inv_freq, scale = rotary_frequencies(64, rope_settings({**sizes, "rope_scaling": rope}), 128)
    expected, expected_scale = ROPE_INIT_FUNCTIONS["yarn"](Qwen2Config(**sizes, rope_scaling=rope), "cpu")
    torch.testing.assert_close(inv_freq.float(), expected, rtol=1e-6, atol=0)
    assert scale == pytest.approx(expected_scale, rel=1e-12)
    assert settings.get("attention_factor") or scale != 1.0


def test_unsupported_rope_type_is_one_clear_error(tmp_path):
    folder = make_tiny_hf(tmp_path, "llama")
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"rope_type": "mrope", "mrope_section": [4, 4, 4]}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="rope type 'mrope' is not supported"):
        load_model(folder)


def test_the_hubs_gemma2_config_reads_as_transformers_describes_it(tmp_path):
    """Gemma-2-2B-it's config.json as published (no layer_types: every other layer slides over 4,096
    tokens, from layer 0): soft caps 50 and 30, queries scaled by 256^-0.5, tied head, and KV layer
    groups of 13 sliding and 13 full layers."""
    from lcq.models.config import ModelConfig
    from lcq.runtime.kv_groups import KVGroups

    hub = {"architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attn_logit_softcapping": 50.0,
           "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 107],
           "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
           "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "intermediate_size": 9216,
           "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8, "num_hidden_layers": 26,
           "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
           "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32", "vocab_size": 256000}
    (tmp_path / "config.json").write_text(json.dumps(hub))
    config = ModelConfig.from_folder(tmp_path)
    assert config.layer_windows == [4096, 0] * 13 and config.tie_word_embeddings and not config.qk_norm
    assert (config.attention_softcap, config.logit_softcap, config.query_scale) == (50.0, 30.0, 1 / 16)
    assert config.rope["rope_theta"] == 10000.0 and config.rope_local is None and config.max_position_embeddings == 8192
    assert (config.embed_scale, config.norm_offset, config.activation) == (2304 ** 0.5, 1.0, "gelu_tanh")
    groups = KVGroups.of(config.layer_windows)
    assert groups.windows == (0, 4096) and groups.width == 13


def test_unsupported_architecture_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(UserError, match="GPT2LMHeadModel is not supported"):
        load_model(tmp_path)


def _random_paged_context(new: list[int], cached: list[int], num_kv_heads: int, head_dim: int,
                          dtype: torch.dtype, block_size: int = BLOCK):
    """Caches filled at random, each sequence's blocks scattered over the pool (tables padded with -1)."""
    torch.manual_seed(0)
    lengths = [c + n for c, n in zip(cached, new)]
    blocks_needed = [-(-length // block_size) for length in lengths]
    pool = torch.randperm(sum(blocks_needed) + 3).tolist()
    tables, slots = [], []
    for length, count, n in zip(lengths, blocks_needed, new):
        table, pool = pool[:count], pool[count:]
        tables.append(table + [-1] * (max(blocks_needed) - count))
        slots += [table[p // block_size] * block_size + p % block_size for p in range(length - n, length)] \
            if length else [-1]
    shape = (sum(blocks_needed) + 3, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    context = ForwardContext(
        is_prefill=max(new) > 1, slot_mapping=torch.tensor(slots),
        query_start=torch.tensor([0] + list(itertools.accumulate(new)), dtype=torch.int32),
        context_lens=torch.tensor(lengths, dtype=torch.int32), block_tables=torch.tensor(tables, dtype=torch.int32),
        max_query_len=max(new), max_context_len=max(lengths))
    return k_cache, v_cache, context


PAGED_CASES = pytest.mark.parametrize("new, cached", [
    ([7, 1, 3], [0, 5, 9]),  # chunked prefill with prefixes
    ([40], [3]),  # more new tokens than one tile
    ([50, 2, 1], [70, 100, 0]),  # several query tiles and key chunks, a short chunk, one new token
    ([1, 1, 1], [0, 6, 36]),  # decode, one length past a tile
    ([1], [20]),  # decode of one sequence (no padding)
    ([1, 1], [200, 100]),  # decode over 7 partitions of a context: combined 4 at a time, the last run partial
    ([1, 1], [4, -1]),  # decode with a padding sequence (context length 0, slot -1), as in a CUDA graph
    ([1] * 9, [0, 3, 16, 17, 31, 2, 5, 40, -1]),  # 8+ sequences: C attention takes whole cache rows
])


def _check_triton_paged_attention(new, cached, heads, kv_heads, dtype, device, cache_dtype=None):
    """The kernels on `device` against the torch path on CPU (cpu_ops switched off by the caller):
    same cache writes, same attention. cache_dtype: a narrower cache (fp8), whose writes clamp (two values
    here lie past fp8's 448) and round, and whose reads convert."""
    from lcq.kernels.paged_attention import decode_attention, prefill_attention, store_kv

    head_dim = 24  # not a power of two: the kernels mask the padding
    k_cache, v_cache, context = _random_paged_context(new, cached, kv_heads, head_dim, dtype)
    k_cache, v_cache = (cache.to(cache_dtype or dtype) for cache in (k_cache, v_cache))
    q, k, v = (torch.randn(sum(new), h, head_dim, dtype=dtype) for h in (heads, kv_heads, kv_heads))
    if cache_dtype == torch.float8_e4m3fn and device == "cpu":
        # the interpreter's own fp8 rounding is wrong (rounding up past a power of two loses the carry:
        # 1.95 -> 1.0; ties not to even), unlike the GPU's cvt.rn: values already on fp8's grid here
        k, v = (t.to(cache_dtype).to(dtype) for t in (k, v))
    k[-1, 0, 0], v[-1, 0, 1] = 1000.0, -1000.0
    slots = context.slot_mapping.clone()
    slots[0] = -1  # a padding token: written by neither path
    context = dataclasses.replace(context, slot_mapping=slots)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    torch_path = PagedAttention(context, BLOCK, torch.device("cpu"), dtype, cache_dtype)
    assert not torch_path.use_cpu_ops
    torch_path.write(k, v, expected_k, expected_v)
    scale = head_dim ** -0.5
    expected = torch_path.attend(q, expected_k, expected_v, scale)
    for i, length in enumerate(context.context_lens.tolist()):
        if length == 0:  # padding: the kernels promise zeros
            expected[context.query_start[i]:context.query_start[i + 1]] = 0

    on = {name: getattr(context, name).to(device) for name in ("slot_mapping", "query_start", "context_lens",
                                                               "block_tables")}
    q, k, v, k_cache, v_cache = (t.to(device) for t in (q, k, v, k_cache, v_cache))
    store_kv(k, v, k_cache, v_cache, on["slot_mapping"])
    torch.testing.assert_close(k_cache.cpu().float(), expected_k.float(), atol=0, rtol=0)
    torch.testing.assert_close(v_cache.cpu().float(), expected_v.float(), atol=0, rtol=0)
    if context.is_prefill:
        out = prefill_attention(q, k_cache, v_cache, on["block_tables"], on["context_lens"], on["query_start"],
                                context.max_query_len, scale)
    else:
        out = decode_attention(q, k_cache, v_cache, on["block_tables"], on["context_lens"], scale)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.cpu(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("groups, max_context, partitions, length", [
    (1, 40, 2, 32), (6, 100, 4, 32), (32, 2048, 2, 1024), (24, 1000, 2, 512), (64, 2048, 1, 2048), (500, 4096, 1, 4096)])
def test_decode_attention_partitions_cover_the_context_in_whole_tiles(groups, max_context, partitions, length):
    """Decode attention splits each context into partitions of whole tiles (32 positions) covering the longest
    context the step's tables hold, as many as give the interpreter's 64 programs work over `groups`
    (sequence, kv head) pairs, and none where the pairs alone are that many."""
    from lcq.kernels.paged_attention import BLOCK_N, INTERPRETER_PROGRAMS, context_partitions

    assert (BLOCK_N, INTERPRETER_PROGRAMS) == (32, 64)
    assert context_partitions(groups, max_context, torch.device("cpu")) == (partitions, length)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # the interpreter's bf16 tl.dot is wrong
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (3, 3)])
@PAGED_CASES
def test_triton_paged_attention_matches_torch_path(monkeypatch, new, cached, heads, kv_heads, dtype):
    monkeypatch.setattr(cpu_ops, "ENABLED", False)
    _check_triton_paged_attention(new, cached, heads, kv_heads, dtype, "cpu")


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (3, 3)])
@PAGED_CASES
def test_triton_paged_attention_with_an_fp8_cache_matches_torch_path(monkeypatch, new, cached, heads, kv_heads):
    """fp16 activations over a float8 e4m3 cache (kv_cache_dtype fp8): the kernels' writes equal torch's
    clamp-and-round bit for bit, and their attention the torch path's over the same fp8 values."""
    monkeypatch.setattr(cpu_ops, "ENABLED", False)
    _check_triton_paged_attention(new, cached, heads, kv_heads, torch.float16, "cpu", torch.float8_e4m3fn)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, cache_dtype", [(torch.float16, None), (torch.bfloat16, None),
                                                (torch.float16, torch.float8_e4m3fn)])
@PAGED_CASES
def test_triton_paged_attention_on_cuda(monkeypatch, new, cached, dtype, cache_dtype):
    """Compiled; an fp8 cache (compute capability 8.9+) rounds its writes on the GPU as torch does."""
    if cache_dtype is not None and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 e4m3 needs compute capability 8.9 or later")
    monkeypatch.setattr(cpu_ops, "ENABLED", False)
    _check_triton_paged_attention(new, cached, 8, 2, dtype, "cuda", cache_dtype)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp8_cache_writes_keep_nan_and_clamp_the_rest(device):
    """The Triton write into an fp8 cache clamps to fp8's range but keeps NaN, as the torch path and the CPU
    caches do (compiled, the clamp's fmax took NaN to -448: a model gone NaN would generate plausible tokens)."""
    from lcq.kernels.paged_attention import store_kv

    if device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 e4m3 needs compute capability 8.9 or later")
    row = torch.tensor([[[float("nan"), 1000.0, -1000.0, 1.0]]], dtype=torch.float16, device=device)
    k_cache, v_cache = (torch.zeros(4, 1, 4, dtype=torch.float8_e4m3fn, device=device) for _ in range(2))
    store_kv(row, -row, k_cache, v_cache, torch.tensor([2], device=device))
    for cache, sign in ((k_cache, 1), (v_cache, -1)):
        written = cache[2, 0].float().cpu()
        assert written[1:].tolist() == [sign * 448.0, -sign * 448.0, sign * 1.0]
        assert written[0].isnan() or device == "cpu"  # (the interpreter's own fp8 conversion takes NaN to 384)


def test_fp8_cache_write_compiles_for_hopper():
    """The fp8 write's sm_90 build (by the installed Triton, in a process without the interpreter; no GPU) clamps
    with NaN-propagating min and max. The interpreter runs the kernel as Python, so a form only the compiler
    refuses (the NaN mode held in a variable) passed the CPU tests and failed every fp8 cache on the H100."""
    code = """if True:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from lcq.kernels.paged_attention import _store_kv_kernel as fn
        types = dict(k_ptr="*fp16", v_ptr="*fp16", k_cache_ptr="*fp8e4nv", v_cache_ptr="*fp8e4nv", slot_ptr="*i32",
                     stride_k="i32", stride_v="i32")
        constants = dict(ROW=128, BLOCK=128, LIMIT=448.0, PDL=True)
        source = ASTSource(fn=fn, signature={n: types.get(n, "constexpr") for n in fn.arg_names},
                           constexprs={(fn.arg_names.index(n),): v for n, v in constants.items()})
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"launch_pdl": True}).asm["ptx"]
        print(ptx.count("max.NaN"), ptx.count("min.NaN"))"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    maxima, minima = map(int, result.stdout.split()[-2:])
    assert maxima > 0 and minima > 0


needs_cpu_ops = pytest.mark.skipif(not cpu_ops.usable(), reason="C decode ops unavailable here (see lcq/kernels/native.py)")


@needs_cpu_ops
@pytest.mark.parametrize("heads, kv_heads, cache_dtype, head_dim", [
    (4, 2, torch.float32, 24), (3, 3, torch.float32, 24), (9, 3, torch.float32, 24), (9, 3, torch.float16, 24),
    (9, 3, torch.float32, 20), (9, 3, torch.float16, 64), (9, 3, torch.float32, 136)])
@PAGED_CASES
@pytest.mark.parametrize("block_size", [BLOCK, 16])
def test_cpu_ops_paged_attention_matches_torch_path(monkeypatch, new, cached, heads, kv_heads, cache_dtype, head_dim,
                                                    block_size):
    """The C cache writes are copies, or round to fp16 as torch does (exact either way); C decode
    and prefill attention sum in another order than SDPA. Head sizes: 20 leaves values past the last
    vector of 8, 64 is one piece of 8 vectors in registers, 136 two pieces and one vector (and, in
    prefill, 20/24/136 leave padded columns in the 16-wide output tiles). Blocks of 4 are scored a
    row at a time, blocks of 16 8 rows at a time, a sequence's last block too."""
    _check_cpu_attention_against_torch(monkeypatch, new, cached, heads, kv_heads, cache_dtype, head_dim, block_size)


@needs_cpu_ops
@pytest.mark.parametrize("heads, kv_heads, cache_dtype, head_dim", [
    (9, 3, torch.float32, 24), (9, 3, torch.float16, 64), (4, 2, torch.float32, 20)])
@pytest.mark.parametrize("cached", [[300, 128, 127, 0], [700], [200, 30]])
@pytest.mark.parametrize("window, sinks", [(0, False), (150, True)])
@pytest.mark.usefixtures("both_cores")
def test_cpu_decode_attention_in_parts_matches_torch_path(monkeypatch, cached, heads, kv_heads, cache_dtype, head_dim,
                                                          window, sinks):
    """Fewer than 8 sequences decode each context in parts, each part softmax-normalized on its own and
    the parts combined after (sinks added once, at the combination). With 64 blocks or more in all
    (blocks of 4 tokens here: the first two cases) each task reads whole rows over parts sized for about
    4 tasks a thread: 301 tokens are several parts, 129 and 128 one or more, 701 more; below 64 blocks a
    task reads one kv head's slices in parts of 32 blocks: 201 tokens are 2 parts, 31 one. A padding
    sequence (context 0) stays zeros; a window of 150 begins inside a block (the parts then cover it)."""
    new = [1] * len(cached)
    _check_cpu_attention_against_torch(monkeypatch, new, [c if c else -1 for c in cached], heads, kv_heads,
                                       cache_dtype, head_dim, BLOCK, window,
                                       torch.randn(heads) if sinks else None)


def _check_cpu_attention_against_torch(monkeypatch, new, cached, heads, kv_heads, cache_dtype, head_dim, block_size,
                                       window=0, sinks=None):
    k_cache, v_cache, context = _random_paged_context(new, cached, kv_heads, head_dim, cache_dtype, block_size)
    q, k, v = (torch.randn(sum(new), h, head_dim) for h in (heads, kv_heads, kv_heads))
    scale = head_dim ** -0.5
    results = {}
    for c_ops in ("0", "1"):
        monkeypatch.setattr(cpu_ops, "ENABLED", c_ops == "1")
        paged = PagedAttention(context, block_size, torch.device("cpu"), torch.float32, cache_dtype)
        assert paged.use_cpu_ops == (c_ops == "1")
        caches = k_cache.clone(), v_cache.clone()
        paged.write(k, v, *caches)
        out = paged.attend(q, *caches, scale, window=window, sinks=sinks)
        for i, length in enumerate(context.context_lens.tolist()):
            if length == 0:  # padding sequences: zeros from C, undefined from SDPA
                out[context.query_start[i]:context.query_start[i + 1]] = 0
        results[c_ops] = (*caches, out)
    for expected, got in zip(results["0"], results["1"]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@needs_cpu_ops
@pytest.mark.skipif(not native.has_avx512("avx512vl"), reason="heads three at a time need AVX-512")
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize("group, head_dim", [(1, 64), (2, 20), (3, 64), (4, 24), (5, 136), (7, 64)])
# tasks of one kv head (3 short contexts), of all of them (from WHOLE_ROW_MIN_SEQS sequences, or 3 long ones in parts)
@pytest.mark.parametrize("lengths", [[5, 42, 79], [5 + 37 * i % 90 for i in range(9)], [400, 363, 326]],
                         ids=["3-short", "9", "3-long"])
@pytest.mark.parametrize("block_size", [BLOCK, 16])
def test_cpu_decode_attention_in_passes_of_heads_equals_one_at_a_time(cache_dtype, group, head_dim, lengths,
                                                                      block_size):
    """With AVX-512 decode attention scores and weighs the heads of a GQA group in passes of up to
    three (each cache row loaded once per pass): the same sums in the same order, for groups that
    split into passes of 3, 2 and 1 and head sizes with and without a tail (where the compiler may
    contract the scalar tail's products into FMAs in one build and not the other: 1e-7 apart)."""
    seqs = len(lengths)
    _, _, context = _random_paged_context([1] * seqs, [n - 1 for n in lengths], 2, head_dim, torch.float32,
                                          block_size)
    shape = cpu_ops.cache_shape(context.block_tables.max().item() + 1, block_size, 2, head_dim, cache_dtype)
    if cache_dtype == torch.int8:
        caches = [torch.randint(-127, 128, shape, dtype=torch.int8) for _ in range(2)]
        for cache in caches:
            cache[..., head_dim:] = (torch.rand(*shape[:3], 1) * 0.02).view(torch.int8)
    else:
        caches = [torch.randn(shape).to(cache_dtype) for _ in range(2)]
    q = torch.randn(seqs, 2 * group, head_dim)
    library = cpu_ops.library()
    try:
        outputs = []
        for wide in (0, 1):
            assert library.lcq_use_wide_attention(wide) == wide
            outputs.append(cpu_ops.decode_attention(q, *caches, context.block_tables, context.context_lens, 0.2))
    finally:
        library.lcq_use_wide_attention(1)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-6, rtol=1e-6)


def _int8_rows(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 values (..., head_dim) and fp32 scales (...) of an int8 cache's head rows."""
    values, scale_bytes = cache[..., :-cpu_ops.INT8_SCALE_BYTES], cache[..., -cpu_ops.INT8_SCALE_BYTES:]
    return values, scale_bytes.contiguous().view(torch.float32).squeeze(-1)


@needs_cpu_ops
@pytest.mark.parametrize("kv_heads, head_dim", [(3, 24), (3, 20), (3, 64), (2, 136)])
@PAGED_CASES
def test_int8_cache_is_the_quantized_fp32_cache(new, cached, kv_heads, head_dim):
    """An int8 cache stores each new head row as q = round(v * 127 / max |v|) (half to even) with the
    scale max |v| / 127, exactly; decode and prefill attention over it equal the C attention over the
    fp32 cache of q * scale within 1e-5 (the scales apply after K's dot products and to V's weights),
    with fp32 and, where the CPU has them, bf16 products."""
    _, _, context = _random_paged_context(new, cached, kv_heads, head_dim, torch.float32)
    shape = cpu_ops.cache_shape(context.block_tables.max().item() + 4, BLOCK, kv_heads, head_dim, torch.int8)
    caches = []
    for _ in range(2):  # random rows and scales for the cached tokens
        cache = torch.empty(shape, dtype=torch.int8)
        cache[..., :head_dim] = torch.randint(-127, 128, (*shape[:3], head_dim), dtype=torch.int8)
        cache[..., head_dim:] = (torch.rand(*shape[:3], 1) * 0.02).view(torch.int8)  # values up to 2.5
        caches.append(cache)
    q, k, v = (torch.randn(sum(new), h, head_dim) for h in (3 * kv_heads, kv_heads, kv_heads))
    k[0, 0] *= 100  # an outlier row
    paged = PagedAttention(context, BLOCK, torch.device("cpu"), torch.float32, torch.int8)
    assert paged.use_cpu_ops
    paged.write(k, v, *caches)
    written = context.slot_mapping >= 0
    for cache, rows in zip(caches, (k[written], v[written])):
        values, scales = _int8_rows(cache.view(-1, kv_heads, shape[3])[context.slot_mapping[written]])
        top = rows.abs().amax(-1)
        most = torch.full_like(top, 127.0)
        assert torch.equal(values, torch.round(rows * (most / top).unsqueeze(-1)).to(torch.int8))
        assert torch.equal(scales, top / most)
    dequantized = [values.float() * scales.unsqueeze(-1) for values, scales in map(_int8_rows, caches)]
    exact = PagedAttention(context, BLOCK, torch.device("cpu"), torch.float32, torch.float32)
    for products in [torch.float32] + ([torch.bfloat16] if products_available(torch.bfloat16) else []):
        with cpu_products(products):
            got, expected = paged.attend(q, *caches, 0.3), exact.attend(q, *dequantized, 0.3)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_int8_cache_needs_the_c_attention(monkeypatch):
    monkeypatch.setattr(cpu_ops, "ENABLED", False)
    _, _, context = _random_paged_context([3], [2], 2, 16, torch.float32)
    with pytest.raises(ValueError, match="an int8 KV cache needs the C attention"):
        PagedAttention(context, BLOCK, torch.device("cpu"), torch.float32, torch.int8)


@pytest.mark.parametrize("c_ops", ["0", "1"] if cpu_ops.usable() else ["0"])
def test_fp16_cache_saturates_values_past_its_range(monkeypatch, c_ops):
    """K/V values past +-65504 are stored as +-65504 by both write paths, not as inf, so that the
    attention of the sequence stays finite."""
    monkeypatch.setattr(cpu_ops, "ENABLED", c_ops == "1")
    k_cache, v_cache, context = _random_paged_context([5], [0], 2, 16, torch.float16)
    k, v = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    k[0, 0, :3] = torch.tensor([1e6, -1e6, 7e4])
    v[2, 1, 5] = -3e5
    paged = PagedAttention(context, BLOCK, torch.device("cpu"), torch.float32, torch.float16)
    paged.write(k, v, k_cache, v_cache)
    slots = context.slot_mapping
    stored_k, stored_v = k_cache.view(-1, 2, 16)[slots], v_cache.view(-1, 2, 16)[slots]
    assert stored_k[0, 0, :3].tolist() == [65504.0, -65504.0, 65504.0] and stored_v[2, 1, 5].item() == -65504.0
    assert torch.equal(stored_k[1:], k[1:].half()) and torch.isfinite(stored_v).all()
    out = paged.attend(torch.randn(5, 4, 16), k_cache, v_cache, 0.25)
    assert torch.isfinite(out).all()


@needs_cpu_ops
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bf16", [False, True] if products_available(torch.bfloat16) else [False])
@pytest.mark.usefixtures("both_cores")
def test_cpu_prefill_attention_in_groups_equals_one_call(cache_dtype, bf16):
    """Staged in groups under a small limit (every sequence alone, or two by two) the C prefill gives
    the same numbers as staged all at once: the groups only bound its buffer."""
    new, cached = [7, 1, 30, 2, 5], [0, 5, 40, 100, 3]
    k_cache, v_cache, context = _random_paged_context(new, cached, 3, 24, cache_dtype)
    q = torch.randn(sum(new), 9, 24)
    args = (q, k_cache, v_cache, context.block_tables, context.context_lens, context.query_start, 24 ** -0.5)
    with cpu_products(torch.bfloat16 if bf16 else torch.float32):
        whole = cpu_ops.prefill_attention(*args)
        chunk_floats = 3 * (24 * 32 + 32 * 32)  # per chunk of 32 keys, all kv heads: K, and V padded to 32
        for limit in (1, 12 * chunk_floats):
            assert torch.equal(cpu_ops.prefill_attention(*args, stage_limit_floats=limit), whole)


@needs_cpu_ops
@pytest.mark.skipif(not products_available(torch.bfloat16), reason="bf16 products need AVX512_BF16 and the C kernels")
@pytest.mark.parametrize("cache_dtype, head_dim", [(torch.float32, 24), (torch.float16, 64), (torch.float32, 136)])
@pytest.mark.parametrize("new, cached", [([7, 1, 3], [0, 5, 9]), ([40], [3]), ([50, 2, 1], [70, 100, 0]),
                                         ([1, 1, 1], [0, 6, 36]),
                                         ([130, 2, 1], [500, 40, 9]), ([600], [0])])  # chunks of 128 keys
@pytest.mark.parametrize("amx", [False, True] if amx_active() else [False])
def test_cpu_prefill_attention_with_bf16_products(new, cached, cache_dtype, head_dim, amx):
    """With bf16 products, prefill tiles take bf16 queries, keys, values and softmax weights, scores,
    softmax and sums staying fp32: within bf16's rounding of the fp32 result (2e-2) and, where a
    sequence has several new tokens, not equal to it; one-token sequences keep the fp32 decode form.
    On AMX tiles too (tiles of 16 query rows, 16 pairs deep: 3 and 9 rows of a tile (1 and 3 positions)
    up to 48, heads of 12 pairs (short blocks alone), 32 (whole) and 68 (both); V in 2, 4 and 9 vectors),
    whose sums part from the register tiles' and, through the softmax weights' rounding, by up to ~1e-3.
    Where a sequence of several new tokens reaches 512 tokens of context, the whole call stages chunks of
    128 keys and runs tiles of 96 query rows (the last two cases: a long and two short sequences, one
    prompt alone), which the fp32 tiles do not."""
    k_cache, v_cache, context = _random_paged_context(new, cached, 3, head_dim, cache_dtype)
    q = torch.randn(sum(new), 9, head_dim)
    args = (q, k_cache, v_cache, context.block_tables, context.context_lens, context.query_start, head_dim ** -0.5)
    exact = cpu_ops.prefill_attention(*args)
    with cpu_products(torch.bfloat16), amx_tiles(amx) as on:
        assert on == amx
        rounded = cpu_ops.prefill_attention(*args)
        if amx:
            with amx_tiles(False):
                registers = cpu_ops.prefill_attention(*args)
            torch.testing.assert_close(rounded, registers, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(rounded, exact, atol=2e-2, rtol=2e-2)
    assert torch.equal(rounded, exact) == all(n == 1 for n in new)


@needs_cpu_ops
def test_cpu_prefill_attention_refuses_more_new_tokens_than_context():
    k_cache, v_cache, context = _random_paged_context([4], [0], 2, 16, torch.float32)
    with pytest.raises(ValueError, match="more new tokens than tokens in its context"):
        cpu_ops.prefill_attention(torch.randn(4, 4, 16), k_cache, v_cache, context.block_tables,
                                  context.context_lens - 1, context.query_start, 0.25)


@needs_cpu_ops
@pytest.mark.skipif(not cpu_half.enabled(), reason="fp16 CPU kernel unavailable here")
@pytest.mark.parametrize("arch, cache_dtype", [("llama", torch.float32), ("qwen2", torch.float32),  # qwen2: qkv bias
                                               ("qwen3", torch.float32),  # qwen3: head norms
                                               ("gemma3", torch.float32), ("gemma3", torch.float16),
                                               ("gemma2", torch.float16),  # gemma2: scores soft-capped
                                               ("olmo2", torch.float32), ("exaone4", torch.float16),  # output norms
                                               ("seed_oss", torch.float32),  # q/k/v and o_proj biases
                                               ("llama", torch.float16), ("llama", torch.int8),
                                               ("bamba", torch.float32), ("granite4_hybrid", torch.float16),
                                               ("nemotron_h", torch.float32), ("falcon_h1_normed", torch.float32),
                                               ("falcon_h1", torch.float16), ("lfm2", torch.float32),
                                               ("qwen3_5", torch.float32), ("arcee", torch.float32),
                                               ("apertus", torch.float32), ("qwen3_moe", torch.float32),
                                               ("qwen2_moe", torch.float16), ("glm4_moe", torch.float32),
                                               ("nemotron_h_latent", torch.float32), ("lfm2_moe", torch.float32),
                                               ("gpt_oss", torch.float16), ("deepseek_v3", torch.float32),
                                               ("deepseek_v2", torch.float16), ("glm4_moe_lite", torch.float32),
                                               ("llama4", torch.float32), ("cohere", torch.float32),
                                               ("cohere2", torch.float16), ("stablelm", torch.float32),
                                               ("stablelm_parallel", torch.float16),
                                               ("granitemoeshared", torch.float32), ("cohere_qk", torch.float32)])
def test_one_call_cpu_decode_equals_the_layers(tmp_path, arch, cache_dtype):
    """The C decode step (CpuDecoder) runs the layers' kernels in the layers' order: bit-identical
    logits to the Python layers, over decode steps of sequences of different lengths: 3, and 18 (from
    16 rows the products take cpu_gemm.c's form); fp32, fp16 and int8 caches. Gemma 3: norms of the
    attention and MLP outputs, GeGLU, scaled embeddings and queries, and a 7-token sliding-window layer
    with its own rotary base that the prompts of 9 and 11 tokens run past; Gemma 2's soft-capped scores.
    OLMo 2 and EXAONE 4 (three 7-token sliding layers, a NoPE global one): no input norms, OLMo 2's q/k
    norms over whole projections. Cohere and StableLM: LayerNorms (StableLM's with biases), Cohere's and
    stablelm_parallel's attention and MLP side by side."""
    overrides = {"sliding_window": 7} if arch.startswith(("gemma", "exaone", "cohere2")) else {}
    folder = make_tiny_lcq(tmp_path, arch, bits=3, rank=2, group_size=32, method="rtn", **overrides)
    model, _ = load_model(folder)
    runs = []
    for one_call, prompts in ((True, PROMPTS), (False, PROMPTS), (True, PROMPTS * 6), (False, PROMPTS * 6)):
        batch = PagedBatch(model, cache_dtype=cache_dtype)
        assert model.cpu_decoder is not None
        if not one_call:
            model.cpu_decoder = None
        seqs = [batch.add() for _ in prompts]
        logits = [batch.step({s: p for s, p in zip(seqs, prompts)})]
        for _ in range(4):
            logits.append(batch.step({s: [t] for s, t in zip(seqs, logits[-1].argmax(-1).tolist())}))
        runs.append(torch.stack(logits))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[2], runs[3])


@needs_cpu_ops
@pytest.mark.parametrize("arch", ["granite4_hybrid", "falcon_h1", "falcon_h1_normed", "qwen3_5", "lfm2"])
@pytest.mark.parametrize("seqs", [1, 3])
def test_recurrent_mixers_decode_step_in_c_matches_torch(tmp_path, monkeypatch, arch, seqs):
    """A recurrent mixer's decode step in one C call (cpu_ops.recurrent_step) against its torch path, from random
    states in slots 4, 1 and 2 of 6: the outputs and every slot's states within fp32 rounding (relative 1e-5),
    the slots not stepped untouched. Mamba-2 with its output normed after the gate per group (Granite 4.0-H: 2
    groups of 3 heads), before it (Falcon-H1 normed), or only gated (Falcon-H1), Qwen3.5's gated delta rule
    (key heads serving two value heads each), LFM2's short convolution."""
    from lcq.models.recurrent import RecurrentMixer

    model, _ = load_model(make_tiny_hf(tmp_path, arch))
    mixer = next(m for m in model.recurrent_mixers() if isinstance(m, RecurrentMixer))
    generator = torch.Generator().manual_seed(seqs)
    mixer.bind_states(6, torch.device("cpu"))
    initial = [torch.randn(t.shape, generator=generator) for t in (mixer.conv_states, mixer.recurrent_states)]
    slots = torch.tensor([4, 1, 2][:seqs])
    hidden = torch.randn(seqs, model.config.hidden_size, generator=generator)
    context = types.SimpleNamespace(context=ForwardContext(
        is_prefill=False, slot_mapping=slots, query_start=torch.arange(seqs + 1, dtype=torch.int32),
        context_lens=torch.full((seqs,), 9, dtype=torch.int32), block_tables=torch.zeros(seqs, 1, dtype=torch.int32),
        max_query_len=1, max_context_len=9, state_slots=slots))
    results = []
    for c_ops in (True, False):
        monkeypatch.setattr(cpu_ops, "ENABLED", c_ops)
        mixer.conv_states.copy_(initial[0])
        mixer.recurrent_states.copy_(initial[1])
        assert (mixer.c_layer() is not None) == c_ops
        results.append((mixer(hidden, None, context), mixer.conv_states.clone(), mixer.recurrent_states.clone()))
    for in_c, in_torch in zip(*results):
        torch.testing.assert_close(in_c, in_torch, rtol=1e-5, atol=1e-5)
    others = [s for s in range(6) if s not in slots.tolist()]
    assert torch.equal(results[0][1][others], initial[0][others]) and \
        torch.equal(results[0][2][others], initial[1][others])
    assert not torch.equal(results[0][2][slots], initial[1][slots]) or arch == "lfm2"


@needs_cpu_ops
@pytest.mark.skipif(not cpu_half.enabled(), reason="fp16 CPU kernel unavailable here")
@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3", "glm4_moe_lite"])
def test_latent_attention_and_mixtures_in_c_follow_transformers(tmp_path, monkeypatch, arch):
    """DeepSeek's latent attention and its mixtures through their C calls (fp16 weights, whose fp16 copies the C
    products read): prompts in chunks of 4 (the Python layers with cpu_ops.latent_queries, latent_values and
    mixture_step) and decode steps in one C call give transformers' logits. DeepSeek-V2 (one q_proj, softmax
    routing within the best group), DeepSeek-V3 and GLM-4.7-Flash (query latents, sigmoid routing plus a choosing
    bias)."""
    from transformers import AutoModelForCausalLM

    from lcq.models.cpu_decode import CpuDecoder

    steps = []
    decode = CpuDecoder.__call__
    monkeypatch.setattr(CpuDecoder, "__call__", lambda self, *args: steps.append(1) or decode(self, *args))
    folder = make_tiny_hf(tmp_path, arch, dtype=torch.float16)
    model, _ = load_model(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    _check_against(reference, model, PROMPTS, decode_steps=3, chunk=4)
    assert all(layer.self_attn.c_layer() is not None for layer in model.layers) and len(steps) == 3


@needs_cpu_ops
@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "deepseek_v3", "llama4", "nemotron_h_latent", "gpt_oss"])
def test_mixture_of_experts_in_c_matches_torch(tmp_path, monkeypatch, arch):
    """A mixture of experts in one C call (cpu_ops.mixture_step: routing, each chosen expert over the rows that
    chose it, the shared expert) against its torch path on LCQ experts, 1 and 7 rows: within fp32 rounding
    (relative 1e-4), the same experts chosen. Qwen3-MoE (softmax, renormalized), Qwen2-MoE (a shared expert scaled
    by its sigmoid gate), DeepSeek-V3 (sigmoid scores plus a choosing bias, within the best groups, scaled),
    Llama 4 (sigmoid of the chosen scores scaling the inputs), Nemotron 3 Super (relu(x)^2 experts between latent
    projections), gpt-oss (a router bias, experts with biases and a clamped SwiGLU)."""
    from lcq.models.llama import MixtureOfExperts

    model, _ = load_model(make_tiny_lcq(tmp_path, arch, bits=3, rank=2, group_size=32, method="rtn"))
    mixture = next(layer.mlp for layer in model.layers if isinstance(layer.mlp, MixtureOfExperts))
    assert mixture.c_mixture() is not None
    generator = torch.Generator().manual_seed(0)
    for rows in (1, 7):
        x = torch.randn(rows, model.config.hidden_size, generator=generator)
        in_c = mixture(x, None)
        monkeypatch.setattr(cpu_ops, "ENABLED", False)
        assert mixture.c_mixture() is None
        in_torch = mixture(x, None)
        monkeypatch.setattr(cpu_ops, "ENABLED", True)
        torch.testing.assert_close(in_c, in_torch, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["deepseek_v3", "glm4_moe_lite", "glm4_moe", "qwen3_next", "qwen3_5"])
def test_multi_token_prediction_layer_follows_its_reference(tmp_path, arch):
    """The multi-token-prediction layer (DeepSeek-V3's layout, GLM-4.7-Flash's and GLM-4.5's; Qwen3-Next's and
    Qwen3.5's) over a prompt: at each position, from the model's final hidden state there and the next
    token, the logits of the token after next equal those of the layer computed with transformers' own
    decoder layer (the last of a model one layer longer), norms and head, as vLLM runs it (DeepSeek's first
    embedding zeroed). Folders without the layer's tensors are refused by name."""
    from transformers import AutoModelForCausalLM

    from tests.tiny_model import make_tiny_mtp

    served, longer = make_tiny_mtp(tmp_path, arch)
    model, config = load_model(served, mtp=True)
    tokens = [(7 * i + 3) % 300 + 1 for i in range(19)]
    length = len(tokens)
    shape = model.kv_cache_shape(-(-length // BLOCK), BLOCK, torch.float32)
    caches = [torch.zeros(shape) for _ in config.cache_layers]
    model.bind_kv_cache(caches, caches if config.values_in_keys else [torch.zeros(shape) for _ in caches])
    model.bind_states(1)
    model.mtp.layer.self_attn.k_cache = torch.zeros(shape)
    model.mtp.layer.self_attn.v_cache = model.mtp.layer.self_attn.k_cache if config.values_in_keys else \
        torch.zeros(shape)

    def context(rows: int) -> ForwardContext:
        return ForwardContext(is_prefill=True, slot_mapping=torch.arange(rows),
                              query_start=torch.tensor([0, rows], dtype=torch.int32),
                              context_lens=torch.tensor([rows], dtype=torch.int32),
                              block_tables=torch.arange(shape[0], dtype=torch.int32)[None], max_query_len=rows,
                              max_context_len=rows, state_slots=torch.tensor([0]))

    hidden = model(torch.tensor(tokens), torch.arange(length), context(length))
    _, logits = model.predict_next(torch.tensor(tokens[1:]), hidden[:-1], torch.arange(length - 1),
                                   context(length - 1))

    reference = AutoModelForCausalLM.from_pretrained(served).eval()
    layer = AutoModelForCausalLM.from_pretrained(longer).eval().model.layers[-1]
    stored = {name: tensor for name, tensor in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        served / "model.safetensors").items() if name.startswith(config.mtp.prefix + ".")}
    names = config.mtp

    def norm(name: str) -> torch.nn.Module:
        module = type(reference.model.norm)(config.hidden_size, eps=config.rms_norm_eps)
        module.weight.data = stored[f"{names.prefix}.{name}.weight"]
        return module

    with torch.no_grad():
        model_hidden = reference.model(torch.tensor([tokens])).last_hidden_state[0]
        embeddings = reference.model.embed_tokens(torch.tensor(tokens[1:]))
        if config.mtp.zero_first_embedding:
            embeddings[0] = 0.0
        joined = torch.cat([norm(names.embed_norm)(embeddings), norm(names.hidden_norm)(model_hidden[:-1])], dim=-1)
        x = (joined @ stored[f"{names.prefix}.{names.projection}.weight"].T)[None]
        positions = torch.arange(length - 1)[None]
        out = layer(x, position_embeddings=reference.model.rotary_emb(x, positions), position_ids=positions)
        out = out[0] if isinstance(out, tuple) else out
        expected = reference.lm_head(norm(names.final_norm)(out[0]))
    torch.testing.assert_close(hidden, model_hidden, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="no multi-token-prediction layer to draft with"):
        load_model(longer, mtp=True)
