"""Random-weight checkpoints with real model shapes, for speed and memory benchmarks (no download).

    python bench/random_model.py FOLDER [--shapes llama2-7b] [--fp16 | --bits 2 --rank 2 --group-size 128]

writes one to FOLDER, e.g. the model bench/gpu_session.sh serves (bench/serve.py --launch FOLDER).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lcq.format import (PackedLinear, linear_tensors, padded_in_features, quantization_config,  # noqa: E402
                        write_index, write_shard)

# Llama 3.2 1B's shapes (its head tied to the embedding table)
LLAMA32_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=4096,
                  tie_word_embeddings=True)
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
# Qwen3-30B-A3B's shapes: 128 experts of 768 columns, 8 chosen per token, per-head q/k norms
QWEN3_30B_A3B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                     num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936, max_position_embeddings=4096)
# Qwen3-Next-80B-A3B's shapes, written as Qwen3.5's mixture (the same layer, its projections stored apart): linear
# attention in three layers of four (16 key heads serving 32 value heads of 128), 512 experts of 512 columns, 10
# chosen per token, beside a gated shared expert
QWEN3_NEXT_80B_A3B = dict(hidden_size=2048, intermediate_size=5120, moe_intermediate_size=512,
                          shared_expert_intermediate_size=512, num_hidden_layers=48, num_attention_heads=16,
                          num_key_value_heads=2, head_dim=256, num_experts=512, num_experts_per_tok=10,
                          linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                          linear_value_head_dim=128, linear_conv_kernel_dim=4, full_attention_interval=4,
                          rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0,
                                           "partial_rotary_factor": 0.25},
                          vocab_size=151936, max_position_embeddings=4096)
# DeepSeek-V2-Lite's shapes: latent attention (one 576-wide cache row per token), 64 experts of 1408 columns, 6
# chosen per token, beside 2 shared ones; its first layer dense
DEEPSEEK_V2_LITE = dict(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
                        num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
                        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, topk_method="greedy",
                        routed_scaling_factor=1.0, vocab_size=102400, max_position_embeddings=4096)


def random_weight(*shape: int) -> torch.Tensor:
    """fp16 values of N(0, 0.02^2) on the CPU, drawn on the GPU where there is one: a 7B checkpoint's 13.5 GB
    took over 2 minutes to draw on an H200 machine's CPU (bench/gpu_session.sh's fp16 step)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return (torch.randn(*shape, dtype=torch.float16, device=device) * 0.02).cpu()


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


def write_vocabulary_tokenizer(folder: Path, vocab_size: int) -> None:
    """The tests' byte-level BPE tokenizer (tests/tiny_model.py, a few hundred tokens), its vocabulary filled up to
    the model's with tokens "w<id>": every id a random model samples then streams text (without them a served
    32000-id model's clients saw one text delta in ~80 tokens), and text still encodes to varied ids (calibration)."""
    from tests.tiny_model import make_tokenizer

    tokenizer = make_tokenizer(folder)
    tokenizer.add_tokens([f"w{i}" for i in range(len(tokenizer), vocab_size)])
    tokenizer.save_pretrained(folder)


def write_random_llama(folder: Path, quantized: bool, bits: int = 2, rank: int = 2, group_size: int = 128,
                       shapes: dict = LLAMA2_7B, head_bits: int = 0) -> Path:
    """A Llama folder with random weights (LCQ or fp16), one shard per layer, and a tokenizer of its vocabulary
    (write_vocabulary_tokenizer); its head untied unless the shapes tie it, fp16, or packed at head_bits (the tied
    table then looked up from it); with num_experts in the shapes a Qwen3-MoE one (every layer a mixture), with
    kv_lora_rank a DeepSeek-V2 one (latent attention; its first first_k_dense_replace layers dense, then mixtures
    beside shared experts), with linear_num_value_heads a Qwen3.5 mixture (linear attention in three layers of
    four, beside a gated shared expert)."""
    folder.mkdir(parents=True, exist_ok=True)
    h, i, vocab = shapes["hidden_size"], shapes["intermediate_size"], shapes["vocab_size"]
    write_vocabulary_tokenizer(folder, vocab)
    experts = shapes.get("num_experts") or shapes.get("n_routed_experts", 0)
    family = FAMILY["deepseek_v2" if "kv_lora_rank" in shapes else "qwen3_5_moe_text" if "linear_num_value_heads"
                    in shapes else "qwen3_moe" if experts else "llama"]
    config = {**family, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "torch_dtype": "float16", **shapes}
    tied = config["tie_word_embeddings"]
    if quantized:
        kept = ["model.embed_tokens", "model.norm"] + ([] if head_bits else ["lm_head"])
        config["quantization_config"] = quantization_config(bits, rank, group_size, "random", kept,
                                                            **({"head_bits": head_bits} if head_bits else {}))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    kind = family["model_type"]
    norm = torch.zeros if kind == "qwen3_5_moe_text" else torch.ones  # (Qwen3.5's norms multiply by 1 + w)
    head = linear_tensors("lm_head", random_packed(vocab, h, head_bits, rank, group_size)) if head_bits else \
        {} if tied else {"lm_head.weight": random_weight(vocab, h)}
    table = {} if tied and head_bits else \
        {"model.embed_tokens.weight": random_weight(vocab, h)}
    write_shard(folder / "extra.safetensors", {**table, **head, "model.norm.weight": norm(h, dtype=torch.float16)})
    width, shared = shapes.get("moe_intermediate_size", i), shapes.get("n_shared_experts", 0)
    shared_width = shapes.get("shared_expert_intermediate_size", width * shared)
    shared_name = "mlp.shared_experts" if kind == "deepseek_v2" else "mlp.shared_expert"
    mixture = {f"mlp.experts.{e}": width for e in range(experts)}
    mixture |= {shared_name: shared_width} if shared_width else {}
    for layer in range(shapes["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        tensors = {f"{prefix}.{name}.weight": norm(h, dtype=torch.float16)
                   for name in ("input_layernorm", "post_attention_layernorm")}
        linears, kept = _token_mixer(shapes, kind, layer)
        routed = experts and layer >= shapes.get("first_k_dense_replace", 0)
        if routed:  # the router, in full precision (and Qwen3.5's shared expert's gate)
            kept["mlp.gate.weight"] = random_weight(experts, h)
            if kind == "qwen3_5_moe_text":
                kept["mlp.shared_expert_gate.weight"] = random_weight(1, h)
        for mlp, columns in (mixture if routed else {"mlp": i}).items():
            linears.update({f"{mlp}.gate_proj": (columns, h), f"{mlp}.up_proj": (columns, h),
                            f"{mlp}.down_proj": (h, columns)})
        tensors.update({f"{prefix}.{name}": tensor for name, tensor in kept.items()})
        for name, (n, k) in linears.items():
            if quantized:
                tensors.update(linear_tensors(f"{prefix}.{name}", random_packed(n, k, bits, rank, group_size)))
            else:
                tensors[f"{prefix}.{name}.weight"] = random_weight(n, k)
        write_shard(folder / f"layer-{layer:03d}.safetensors", tensors)
    write_index(folder)
    return folder


FAMILY = {"llama": dict(architectures=["LlamaForCausalLM"], model_type="llama"),
          "qwen3_moe": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", decoder_sparse_step=1,
                            mlp_only_layers=[]),
          "deepseek_v2": dict(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2"),
          "qwen3_5_moe_text": dict(architectures=["Qwen3_5MoeForCausalLM"], model_type="qwen3_5_moe_text")}


def _token_mixer(shapes: dict, kind: str, layer: int) -> tuple[dict[str, tuple[int, int]], dict[str, torch.Tensor]]:
    """A layer's attention (or linear attention): its packed matrices' (N, K) and its full-precision tensors,
    by name within the layer."""
    h, heads, kv_heads = shapes["hidden_size"], shapes["num_attention_heads"], shapes["num_key_value_heads"]
    head_dim = shapes.get("head_dim", h // heads)

    if kind == "deepseek_v2":  # q_proj, the latent's and the shared rotated key's projection, o_proj; kv_b_proj kept
        rope, kv_rank = shapes["qk_rope_head_dim"], shapes["kv_lora_rank"]
        nope_value = shapes["qk_nope_head_dim"] + shapes["v_head_dim"]
        return ({"self_attn.q_proj": (heads * (shapes["qk_nope_head_dim"] + rope), h),
                 "self_attn.kv_a_proj_with_mqa": (kv_rank + rope, h),
                 "self_attn.o_proj": (h, heads * shapes["v_head_dim"])},
                {"self_attn.kv_b_proj.weight": random_weight(heads * nope_value, kv_rank),
                 "self_attn.kv_a_layernorm.weight": torch.ones(kv_rank, dtype=torch.float16)})
    if kind == "qwen3_5_moe_text" and (layer + 1) % shapes.get("full_attention_interval", 4):  # linear attention
        k_width = shapes["linear_num_key_heads"] * shapes["linear_key_head_dim"]
        v_heads = shapes["linear_num_value_heads"]
        v_width = v_heads * shapes["linear_value_head_dim"]
        conv = 2 * k_width + v_width
        return ({"linear_attn.in_proj_qkv": (conv, h), "linear_attn.in_proj_z": (v_width, h),
                 "linear_attn.in_proj_b": (v_heads, h), "linear_attn.in_proj_a": (v_heads, h),
                 "linear_attn.out_proj": (h, v_width)},
                {"linear_attn.conv1d.weight": random_weight(conv, 1, shapes.get("linear_conv_kernel_dim", 4)) * 10,
                 "linear_attn.A_log": torch.zeros(v_heads), "linear_attn.dt_bias": torch.ones(v_heads),
                 "linear_attn.norm.weight": torch.ones(shapes["linear_value_head_dim"], dtype=torch.float16)})
    gated = 2 if kind == "qwen3_5_moe_text" else 1  # Qwen3.5's q_proj: each head's query and gate
    norm = torch.zeros if gated == 2 else torch.ones  # per-head q/k norms (Qwen3.5's multiply by 1 + w)
    norms = {} if kind == "llama" else {f"self_attn.{name}.weight": norm(head_dim, dtype=torch.float16)
                                        for name in ("q_norm", "k_norm")}
    return ({"self_attn.q_proj": (gated * heads * head_dim, h), "self_attn.k_proj": (kv_heads * head_dim, h),
             "self_attn.v_proj": (kv_heads * head_dim, h), "self_attn.o_proj": (h, heads * head_dim)}, norms)


SHAPES = {"llama2-7b": LLAMA2_7B, "llama3.2-1b": LLAMA32_1B, "qwen3-30b-a3b": QWEN3_30B_A3B,
          "qwen3-next-80b-a3b": QWEN3_NEXT_80B_A3B, "deepseek-v2-lite": DEEPSEEK_V2_LITE}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--shapes", choices=SHAPES, default="llama2-7b")
    parser.add_argument("--layers", type=int, help="fewer layers than the model has (a smaller file, same widths)")
    parser.add_argument("--fp16", action="store_true", help="full-precision weights instead of LCQ")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args(argv)
    shapes = SHAPES[args.shapes] | ({"num_hidden_layers": args.layers} if args.layers else {})
    write_random_llama(args.folder, quantized=not args.fp16, bits=args.bits, rank=args.rank,
                       group_size=args.group_size, shapes=shapes)
    print(f"written {args.folder}")


if __name__ == "__main__":
    main()
