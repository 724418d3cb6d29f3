"""Random-weight checkpoints with real model shapes, for speed and memory benchmarks (no download)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lcq.format import (PackedLinear, linear_tensors, padded_in_features, quantization_config,  # noqa: E402
                        write_index, write_shard)

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
# Qwen3-30B-A3B's shapes: 128 experts of 768 columns, 8 chosen per token, per-head q/k norms
QWEN3_30B_A3B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                     num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936, max_position_embeddings=4096)
# DeepSeek-V2-Lite's shapes: latent attention (one 576-wide cache row per token), 64 experts of 1408 columns, 6
# chosen per token, beside 2 shared ones; its first layer dense
DEEPSEEK_V2_LITE = dict(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
                        num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
                        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, topk_method="greedy",
                        routed_scaling_factor=1.0, vocab_size=102400, max_position_embeddings=4096)


def random_packed(n: int, k: int, bits: int, rank: int, group_size: int) -> PackedLinear:
    groups = padded_in_features(k, group_size) // group_size
    return PackedLinear(
        qweight=torch.randint(-2**31, 2**31 - 1, (groups * group_size // 32 * bits, n), dtype=torch.int32),
        s_q=torch.randint(-127, 128, (groups, rank, n), dtype=torch.int8),
        s_scale=torch.full((rank, n), 1e-4, dtype=torch.float16),
        b_q=torch.randint(-127, 128, (groups, n), dtype=torch.int8),
        b_scale=torch.full((n,), 1e-4, dtype=torch.float16),
        v=torch.randn(1, rank, 1 << bits, dtype=torch.float16),
        v_index=torch.zeros(n, dtype=torch.int32), in_features=k, bits=bits, group_size=group_size)


def write_random_llama(folder: Path, quantized: bool, bits: int = 2, rank: int = 2, group_size: int = 128,
                       shapes: dict = LLAMA2_7B) -> Path:
    """A Llama folder with random weights (LCQ or fp16), one shard per layer, and a small tokenizer; with
    num_experts in the shapes a Qwen3-MoE one (every layer a mixture), with kv_lora_rank a DeepSeek-V2 one
    (latent attention; its first first_k_dense_replace layers dense, then mixtures beside shared experts)."""
    from tests.tiny_model import make_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(folder)
    h, i, vocab = shapes["hidden_size"], shapes["intermediate_size"], shapes["vocab_size"]
    experts = shapes.get("num_experts") or shapes.get("n_routed_experts", 0)
    latent = "kv_lora_rank" in shapes
    heads, kv_heads = shapes["num_attention_heads"], shapes["num_key_value_heads"]
    head_dim = shapes.get("head_dim", h // heads)
    family = dict(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2") if latent else \
        dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", decoder_sparse_step=1,
             mlp_only_layers=[]) if experts else dict(architectures=["LlamaForCausalLM"], model_type="llama")
    config = dict(**family, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="float16",
                  **shapes)
    if quantized:
        config["quantization_config"] = quantization_config(bits, rank, group_size, "random",
                                                            ["model.embed_tokens", "model.norm", "lm_head"])
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_shard(folder / "extra.safetensors", {
        "model.embed_tokens.weight": torch.randn(vocab, h, dtype=torch.float16) * 0.02,
        "lm_head.weight": torch.randn(vocab, h, dtype=torch.float16) * 0.02,
        "model.norm.weight": torch.ones(h, dtype=torch.float16)})
    if latent:  # q_proj, the latent's and the shared rotated key's projection, o_proj
        rope, kv_rank = shapes["qk_rope_head_dim"], shapes["kv_lora_rank"]
        attention = {"self_attn.q_proj": (heads * (shapes["qk_nope_head_dim"] + rope), h),
                     "self_attn.kv_a_proj_with_mqa": (kv_rank + rope, h),
                     "self_attn.o_proj": (h, heads * shapes["v_head_dim"])}
    else:
        attention = {"self_attn.q_proj": (heads * head_dim, h), "self_attn.k_proj": (kv_heads * head_dim, h),
                     "self_attn.v_proj": (kv_heads * head_dim, h), "self_attn.o_proj": (h, heads * head_dim)}
    width, shared = shapes.get("moe_intermediate_size", i), shapes.get("n_shared_experts", 0)
    mixture = {f"mlp.experts.{e}": width for e in range(experts)} | ({"mlp.shared_experts": width * shared}
                                                                     if shared else {})
    for layer in range(shapes["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        tensors = {f"{prefix}.input_layernorm.weight": torch.ones(h, dtype=torch.float16),
                   f"{prefix}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.float16)}
        routed = experts and layer >= shapes.get("first_k_dense_replace", 0)
        if routed:  # the router, in full precision
            tensors[f"{prefix}.mlp.gate.weight"] = torch.randn(experts, h, dtype=torch.float16) * 0.02
        if latent:  # kv_b_proj in full precision, the latent's norm
            nope_value = shapes["qk_nope_head_dim"] + shapes["v_head_dim"]
            tensors.update({f"{prefix}.self_attn.kv_b_proj.weight":
                            torch.randn(heads * nope_value, kv_rank, dtype=torch.float16) * 0.02,
                            f"{prefix}.self_attn.kv_a_layernorm.weight": torch.ones(kv_rank, dtype=torch.float16)})
        elif experts:  # Qwen3-MoE's per-head q/k norms
            tensors.update({f"{prefix}.self_attn.q_norm.weight": torch.ones(head_dim, dtype=torch.float16),
                            f"{prefix}.self_attn.k_norm.weight": torch.ones(head_dim, dtype=torch.float16)})
        linears = dict(attention)
        for mlp, columns in (mixture if routed else {"mlp": i}).items():
            linears.update({f"{mlp}.gate_proj": (columns, h), f"{mlp}.up_proj": (columns, h),
                            f"{mlp}.down_proj": (h, columns)})
        for name, (n, k) in linears.items():
            if quantized:
                tensors.update(linear_tensors(f"{prefix}.{name}", random_packed(n, k, bits, rank, group_size)))
            else:
                tensors[f"{prefix}.{name}.weight"] = torch.randn(n, k, dtype=torch.float16) * 0.02
        write_shard(folder / f"layer-{layer:03d}.safetensors", tensors)
    write_index(folder)
    return folder
