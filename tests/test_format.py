"""The packed format: packing round trips, the reference dequantization, checkpoint validation."""
import json
import os

import pytest
import torch

from lcq.format import (CheckpointReader, FormatError, PackedLinear, dequantize, dual_quantize, encode_linear,
                        linear_tensors, pack_indices, quantization_config, unpack_indices, write_index,
                        write_json, write_shard)
from lcq.format.codebook import codebooks


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    indices = torch.randint(0, 1 << bits, (7, 96), generator=g)
    packed = pack_indices(indices, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 // 32 * bits, 7)
    assert torch.equal(unpack_indices(packed, bits), indices)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_extremes_use_every_bit(bits):
    top = torch.full((2, 32), (1 << bits) - 1)
    packed = pack_indices(top, bits)
    assert (packed == -1).all()  # every bit set: the layout wastes none
    assert torch.equal(unpack_indices(packed, bits), top)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_indices(torch.full((1, 32), 4), 2)


def random_layer(n: int = 24, k: int = 80, bits: int = 3, rank: int = 2, group: int = 32, seed: int = 0,
                 bias: bool = False) -> PackedLinear:
    """A packed layer with random indices and codebooks (seeded); the kernels' tests use it too."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // group)
    s = torch.rand(n, groups, rank, generator=g) + 0.1
    b = torch.randn(n, groups, generator=g)
    v = torch.randn(rank, 1 << bits, generator=g)
    indices = torch.randint(0, 1 << bits, (n, k), generator=g)
    return encode_linear(indices, *dual_quantize(s, b), v, in_features=k, bits=bits, group_size=group,
                         bias=torch.randn(n, generator=g) if bias else None)


def test_dequantize_matches_codebook_definition():
    layer = random_layer()
    s = (layer.s_q.float() * layer.s_scale.float()).permute(2, 0, 1)
    b = (layer.b_q.float() * layer.b_scale.float()).t()
    books = codebooks(s, layer.v[0].float(), b)
    indices = unpack_indices(layer.qweight, layer.bits)
    w = dequantize(layer)
    assert w.shape == (24, 80)
    for n, k in [(0, 0), (5, 33), (23, 79)]:
        # within a few fp32 roundings: the two sum S . V - B in their own orders, and torch's vectorized kernels
        # (FMA or not) differ by CPU (an AVX-512 Xeon's differed by 2.5 ulp); a wrong entry is off by ~1
        torch.testing.assert_close(w[n, k], books[n, k // 32, indices[n, k]], rtol=1e-6, atol=1e-6)


def test_dual_quantization_of_zero_and_tiny_scales():
    """S and B rows that are all zero (a rank component an RTN fit leaves unused) or tiny keep a nonzero fp16
    scale and codes within [-127, 127] that decode to their values (a scale under fp16's smallest subnormal
    had rounded to 0, and zeros then divided 0 by 0)."""
    s = torch.randn(5, 3, 2)
    s[1, :, 1] = 0.0
    s[2, :, 0] = 1e-9 * torch.randn(3)
    s[3, :, 1] = torch.tensor([1.84e-5, -0.4e-5, 0.9e-5])  # a subnormal scale fp16 rounds down (1.84e-5 was clipped)
    b = torch.randn(5, 3)
    b[4] = 0.0
    s_q, s_scale, b_q, b_scale = dual_quantize(s, b)
    for q, scale in ((s_q, s_scale), (b_q, b_scale)):
        assert torch.isfinite(scale).all() and (scale > 0).all() and q.abs().max() <= 127
    assert (s_q[:, 1, 1] == 0).all() and (b_q[:, 4] == 0).all()
    error = (s_q.float() * s_scale.float() - s.permute(1, 2, 0)).abs()  # (G, r, N) against (r, N) scales
    assert (error <= 0.5001 * s_scale.float() + 1e-12).all()


def test_concat_keeps_each_parts_table():
    a, b = random_layer(n=8, seed=1), random_layer(n=5, seed=2)
    fused = PackedLinear.concat([a, b])
    assert fused.v.shape[0] == 2 and fused.out_features == 13
    assert torch.equal(dequantize(fused), torch.cat([dequantize(a), dequantize(b)]))


def write_checkpoint(folder, layer, prefix="model.layers.0.mlp.up_proj"):
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "quantization_config": quantization_config(layer.bits, layer.rank, layer.group_size, "lcq", ["lm_head"])}
    write_json(folder / "config.json", config)
    write_shard(folder / "model-00001.safetensors", linear_tensors(prefix, layer))
    write_index(folder)
    return prefix


def test_checkpoint_round_trip(tmp_path):
    layer = random_layer()
    prefix = write_checkpoint(tmp_path / "ckpt", layer)
    reader = CheckpointReader(tmp_path / "ckpt")
    assert reader.quantized_prefixes() == [prefix]
    loaded = reader.linear(prefix)
    assert torch.equal(dequantize(loaded), dequantize(layer))
    assert not list((tmp_path / "ckpt").glob("*.tmp"))


def test_truncated_shard_is_refused_with_file_name(tmp_path):
    prefix = write_checkpoint(tmp_path / "ckpt", random_layer())
    shard = tmp_path / "ckpt" / "model-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(FormatError, match="model-00001.safetensors"):
        CheckpointReader(tmp_path / "ckpt").linear(prefix)


def test_mismatched_tensor_is_refused_naming_it(tmp_path):
    layer = random_layer()
    layer.s_q = layer.s_q[:, :1]  # rank 1 stored where config says rank 2
    prefix = write_checkpoint(tmp_path / "ckpt", layer)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["quantization_config"]["rank"] = 2
    write_json(tmp_path / "ckpt" / "config.json", cfg)
    with pytest.raises(FormatError, match=r"tensor 'model.layers.0.mlp.up_proj.s_q' expected int8 \[3, 2, 24\]"):
        CheckpointReader(tmp_path / "ckpt").linear(prefix)


@pytest.mark.parametrize("setting, message", [({"format_version": 99}, "format_version 99"),
                                              ({"format_version": True}, "format_version True"),
                                              ({"format_version": 4.0}, "format_version 4.0"),
                                              ({"pack_layout": "nmajor"}, "pack_layout 'nmajor'"),
                                              ({"scale_bits": 4}, "scale_bits 4 ")])
def test_unknown_format_version_is_refused(tmp_path, setting, message):
    """A format version, pack layout or width of S's and B's codes this lcq does not write (true and 4.0 were
    read as 1 and 4; scale_bits 4 as 8)."""
    write_checkpoint(tmp_path / "ckpt", random_layer())
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["quantization_config"].update(setting)
    write_json(tmp_path / "ckpt" / "config.json", cfg)
    with pytest.raises(FormatError, match=message):
        CheckpointReader(tmp_path / "ckpt")


@pytest.mark.parametrize("group_size", [0, -32, 48])
def test_bad_group_sizes_are_refused(tmp_path, group_size):
    write_checkpoint(tmp_path / "ckpt", random_layer())
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = group_size
    write_json(tmp_path / "ckpt" / "config.json", cfg)
    with pytest.raises(FormatError, match=f"unsupported bits=.* group_size={group_size}"):
        CheckpointReader(tmp_path / "ckpt")


def test_shards_are_readable_as_any_new_file(tmp_path):
    """safetensors writes owner-only files; a checkpoint quantized by one user is served by another."""
    write_checkpoint(tmp_path / "ckpt", random_layer())
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "ckpt").glob("*.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


@pytest.mark.parametrize("layer_bits", [{"model.layers.0.mlp.up_proj": 5}, ["model.layers.0.mlp.up_proj"],
                                        {"model.layers.0.mlp.up_proj": 3.0}])
def test_bad_layer_widths_are_refused(tmp_path, layer_bits):
    write_checkpoint(tmp_path / "ckpt", random_layer())
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["quantization_config"].update(format_version=4, layer_bits=layer_bits)
    write_json(tmp_path / "ckpt" / "config.json", cfg)
    with pytest.raises(FormatError, match="layer_bits must map module names to 2, 3 or 4"):
        CheckpointReader(tmp_path / "ckpt")


@pytest.mark.parametrize("key, value", [("head_bits", 3.0), ("embed_bits", 5), ("head_bits", "3")])
def test_bad_head_and_table_widths_are_refused(tmp_path, key, value):
    """3.0 equals 3 but is no bit width: refused as the file is read, not a TypeError when the model is built."""
    write_checkpoint(tmp_path / "ckpt", random_layer())
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["quantization_config"][key] = value
    write_json(tmp_path / "ckpt" / "config.json", cfg)
    with pytest.raises(FormatError, match=f"unsupported {key}="):
        CheckpointReader(tmp_path / "ckpt")


@pytest.mark.parametrize("index, config_change, message", [
    ({"weight_map": ["model.layers.0.mlp.up_proj.qweight"]}, {}, "weight_map must map tensor names to file names"),
    ({"weight_map": {"model.layers.0.mlp.up_proj.qweight": None}}, {}, "weight_map must map"),
    ({"weight_map": {"model.layers.0.mlp.up_proj.qweight": "../other/model.safetensors"}}, {},
     "a file outside the model folder"),
    (b"\xff\xfe not UTF-8", {}, "model.safetensors.index.json: not a valid safetensors index"),
    (None, {"quantization_config": "lcq"}, "quantization_config must be an object of settings")])
def test_a_malformed_index_or_quantization_config_is_one_error(tmp_path, index, config_change, message):
    write_checkpoint(tmp_path / "ckpt", random_layer())
    if index is not None:
        path = tmp_path / "ckpt" / "model.safetensors.index.json"
        path.write_bytes(index if isinstance(index, bytes) else json.dumps(index).encode())
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    write_json(tmp_path / "ckpt" / "config.json", {**cfg, **config_change})
    with pytest.raises(FormatError, match=message):
        CheckpointReader(tmp_path / "ckpt")


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FormatError, match="pickle"):
        CheckpointReader(tmp_path)


def test_bits_per_weight_matches_documented_formula():
    n, k, bits, rank, group = 48, 80, 2, 2, 32
    layer = random_layer(n=n, k=k, bits=bits, rank=rank, group=group)
    k_pad = 96
    expected = (bits + (8 * rank + 8) / group) * k_pad / k + (16 * rank + 16) / k + (64 + 16 * rank * 4) / (n * k)
    assert abs(layer.bits_per_weight() - expected) < 1e-9


def test_view_config_of_a_multimodal_wrapper():
    """The Hub's Gemma 3 4B config.json (text_config with only what differs from the defaults) becomes the
    text model's full config; a wrapper's own tie_word_embeddings wins over text_config's, as transformers
    ties a wrapper's head; plain configs pass through unchanged."""
    from lcq.format import view_config

    gemma = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "torch_dtype": "bfloat16",
             "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                             "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                             "sliding_window": 1024}, "vision_config": {"model_type": "siglip_vision_model"}}
    text = view_config(gemma)
    assert text["architectures"] == ["Gemma3ForCausalLM"] and text["model_type"] == "gemma3_text"
    assert (text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"]) == \
        (2560, 8, 4, 256)
    assert text["tie_word_embeddings"] and text["torch_dtype"] == "bfloat16" and "vision_config" not in text
    assert text["rope_parameters"]["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    mistral = {"architectures": ["Mistral3ForConditionalGeneration"],
               "text_config": {"model_type": "mistral", "tie_word_embeddings": False}}
    assert not view_config(mistral)["tie_word_embeddings"]
    assert view_config({**mistral, "tie_word_embeddings": True})["tie_word_embeddings"]
    ministral = {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
                 "text_config": {"model_type": "ministral3", "hidden_size": 3072}}  # Ministral 3: its defaults
    text = view_config(ministral)
    assert text["architectures"] == ["Ministral3ForCausalLM"]
    assert text["rope_parameters"]["llama_4_scaling_beta"] == 0.1 and text["max_position_embeddings"] == 262144
    plain = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "text_config": {"model_type": "x"}}
    assert view_config(plain) is plain


def test_view_config_of_qwen_vision_language_models():
    """The Hub's Qwen2.5-VL-7B config.json (text settings at the top level, rotary settings of type mrope)
    reads as Qwen2 with ordinary RoPE at the same base; Qwen3-VL's text_config as Qwen3; another rotary
    type is refused by name."""
    from lcq.format import ViewError, view_config

    qwen25 = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
              "hidden_size": 3584, "intermediate_size": 18944, "max_position_embeddings": 128000,
              "max_window_layers": 28, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
              "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 152064, "image_token_id": 151655,
              "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
              "vision_config": {"depth": 32, "hidden_size": 1280, "out_hidden_size": 3584}}
    text = view_config(qwen25)
    assert text["architectures"] == ["Qwen2ForCausalLM"] and text["model_type"] == "qwen2"
    assert (text["hidden_size"], text["num_key_value_heads"], text["vocab_size"]) == (3584, 4, 152064)
    assert text["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6} and "rope_scaling" not in text
    assert not text["tie_word_embeddings"] and not text["use_sliding_window"] and "vision_config" not in text
    qwen3 = {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
             "tie_word_embeddings": True,
             "text_config": {"model_type": "qwen3_vl_text", "hidden_size": 2048, "head_dim": 128,
                             "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                              "rope_type": "default", "rope_theta": 5000000}}}
    text = view_config(qwen3)
    assert text["architectures"] == ["Qwen3ForCausalLM"] and text["model_type"] == "qwen3"
    assert text["rope_parameters"] == {"rope_type": "default", "rope_theta": 5000000} and text["tie_word_embeddings"]
    with pytest.raises(ViewError, match="rope type 'yarn'"):
        view_config({**qwen25, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


# Every multimodal wrapper lcq reads, with its text model's model_type (Qwen2-VL's and Qwen2.5-VL's also in
# the Hub's top-level form: tested apart).
WRAPPER_TEXT_TYPES = {"Gemma3ForConditionalGeneration": "gemma3_text", "Mistral3ForConditionalGeneration": "mistral",
                      "LlavaForConditionalGeneration": "llama", "Idefics3ForConditionalGeneration": "llama",
                      "SmolVLMForConditionalGeneration": "llama", "InternVLForConditionalGeneration": "qwen2",
                      "Llama4ForConditionalGeneration": "llama4_text",
                      "Qwen3_5ForConditionalGeneration": "qwen3_5_text",
                      "Qwen3_5MoeForConditionalGeneration": "qwen3_5_moe_text",
                      "Qwen2VLForConditionalGeneration": "qwen2_vl_text",
                      "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl_text",
                      "Qwen3VLForConditionalGeneration": "qwen3_vl_text",
                      "Qwen3VLMoeForConditionalGeneration": "qwen3_vl_moe_text"}
INT8_W8A8 = {"quant_method": "compressed-tensors", "format": "int-quantized", "ignore": ["lm_head"],
             "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int"}}}}


def _wrapper_folder(folder, config, tensors):
    folder.mkdir(parents=True)
    write_json(folder / "config.json", config)
    write_shard(folder / "model.safetensors", tensors)
    return folder


@pytest.mark.parametrize("architecture", sorted(WRAPPER_TEXT_TYPES))
def test_a_quantized_wrapper_is_refused_as_its_text_model_is(tmp_path, architecture):
    """A multimodal wrapper published quantized (its quantization_config at the top level: int8 W8A8, GPTQ,
    AWQ, bitsandbytes) is refused as the same plain text folder is, rather than read as full precision (its
    int8 codes served as weights); an FP8 wrapper is still decoded as read."""
    from lcq.format import view_config

    config = {"architectures": [architecture], "model_type": "x",
              "text_config": {"model_type": WRAPPER_TEXT_TYPES[architecture]}}
    assert view_config({**config, "quantization_config": INT8_W8A8})["quantization_config"] == INT8_W8A8
    assert view_config(config).get("quantization_config") is None
    codes = {"language_model.model.layers.0.self_attn.q_proj.weight": torch.ones(4, 4, dtype=torch.int8),
             "language_model.model.layers.0.self_attn.q_proj.weight_scale": torch.ones(4, 1)}
    folder = _wrapper_folder(tmp_path / "int8", {**config, "quantization_config": INT8_W8A8}, codes)
    with pytest.raises(FormatError, match="quant_method 'compressed-tensors' is not one lcq reads"):
        CheckpointReader(folder)
    weight = torch.randn(4, 4)
    fp8 = {"language_model.model.layers.0.self_attn.q_proj.weight": weight.to(torch.float8_e4m3fn),
           "language_model.model.layers.0.self_attn.q_proj.weight_scale_inv": torch.full((1, 1), 0.5)}
    folder = _wrapper_folder(tmp_path / "fp8", {**config, "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}, fp8)
    reader = CheckpointReader(folder)
    assert reader.quant is None and reader.names() == ["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(reader.tensor("model.layers.0.self_attn.q_proj.weight").float(),
                       weight.to(torch.float8_e4m3fn).float() * 0.5)


def test_a_quantized_qwen_vl_in_the_top_level_form_is_refused(tmp_path):
    """Qwen2-VL's and Qwen2.5-VL's Hub form (the text settings at the top level) keeps its quantization_config
    too (as it did before wrappers inherited theirs)."""
    config = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
              "hidden_size": 32, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
              "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}}
    folder = _wrapper_folder(tmp_path / "gptq", config, {"model.layers.0.mlp.up_proj.qweight": torch.zeros(
        4, 8, dtype=torch.int32)})
    with pytest.raises(FormatError, match="quant_method 'gptq' is not one lcq reads"):
        CheckpointReader(folder)


@pytest.mark.parametrize("width, hub_layout", [(16, False), (32, False), (24, True), (16, True)])
def test_qwen3_vl_moe_experts_read_as_transformers_reads_them(tmp_path, width, hub_layout):
    """Qwen3-VL-MoE's 3-D experts are (out, in) as transformers saves them and (in, out) in the Hub's files;
    where a matrix is square (hidden 32: gate_up_proj's at width 16, down_proj's at 32) its shape cannot tell,
    and transformers (Transpose(check_dims=True)) keeps it as stored: lcq reads each expert as transformers
    loads it (it transposed square ones, and served transformers' own saves wrongly)."""
    import transformers
    from safetensors.torch import load_file, save_file

    text = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=width, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=2, num_experts_per_tok=1,
                vocab_size=64, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                  deepstack_visual_indexes=[0])
    config = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    transformers.Qwen3VLMoeForConditionalGeneration(config).save_pretrained(tmp_path)
    if hub_layout:
        tensors = load_file(str(tmp_path / "model.safetensors"))
        save_file({name: t.transpose(1, 2).contiguous() if ".mlp.experts." in name else t
                   for name, t in tensors.items()}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    experts = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path).model.language_model \
        .layers[0].mlp.experts
    reader = CheckpointReader(tmp_path)
    for e in range(2):
        expected = {"gate_proj": experts.gate_up_proj[e, :width], "up_proj": experts.gate_up_proj[e, width:],
                    "down_proj": experts.down_proj[e]}
        for part, weight in expected.items():
            name = f"model.layers.0.mlp.experts.{e}.{part}.weight"
            assert reader.shape(name) == tuple(weight.shape) and torch.equal(reader.tensor(name), weight), name


def test_the_single_file_wins_over_a_stale_index_beside_it(tmp_path):
    """A folder saved sharded, then unsharded into the same place (transformers' save_pretrained deletes the
    old shards but leaves their index): model.safetensors is read, as transformers loads it; the stale index
    named shards that were gone, or old tensors."""
    folder = tmp_path / "model"
    folder.mkdir()
    write_json(folder / "config.json", {"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    new = torch.arange(6.0).reshape(2, 3)
    write_shard(folder / "model.safetensors", {"lm_head.weight": new})
    write_json(folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": {
        "lm_head.weight": "model-00004-of-00012.safetensors", "model.norm.weight": "model-00004-of-00012.safetensors"}})
    reader = CheckpointReader(folder)
    assert reader.names() == ["lm_head.weight"] and torch.equal(reader.tensor("lm_head.weight"), new)
    write_shard(folder / "model-00004-of-00012.safetensors", {"lm_head.weight": -new, "model.norm.weight": new[0]})
    reader = CheckpointReader(folder)
    assert reader.names() == ["lm_head.weight"] and torch.equal(reader.tensor("lm_head.weight"), new)
    (folder / "model.safetensors").unlink()  # the index alone is read
    assert torch.equal(CheckpointReader(folder).tensor("lm_head.weight"), -new)
