"""Tiny random Llama-family models built in code, saved as real Hugging Face folders.

No downloads: the tokenizer is a byte-level BPE trained here on a few sentences (byte-level so
any text encodes and multi-byte characters can split across tokens), with a ChatML template.
"""
from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Once upon a time there was a little model that wanted to speak.",
    "To be, or not to be, that is the question.",
    "In the beginning was the word, and the word was quantized to two bits.",
    "Numbers like 12345 and 67890 appear in text; so do symbols: #, $, %, & and @.",
    "Unicode matters: café, naïve, Straße, 東京, and emoji such as 🙂 or 🚀.",
    "Hello, world! How are you today? I am fine, thank you.",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (  # `preamble`: a template variable, as chat_template_kwargs can set; reasoning_effort as gpt-oss's
    "{% if preamble is defined %}{{ preamble }}\n{% endif %}"
    "{% if reasoning_effort is defined %}Reasoning: {{ reasoning_effort }}\n{% endif %}{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(folder: Path, vocab_size: int = 384):
    """Train and save a byte-level BPE tokenizer; returns the transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 bos_token=None, unk_token=None)
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(folder)
    return hf


def cuda_llm(folder: str | Path, **settings):
    """An engine on the GPU with 2% of it: GPU tests run in parallel processes (bench/gpu_session.sh, 14
    on a 16-core machine, up to 3 engines each) and an engine takes its whole share up front, less the
    1 GiB it keeps for activations, for its KV cache; the default 0.9 left the others none (seen on an
    H200: 2-block caches, and recurrent states that did not fit). 2% of an 80 GB card leaves a tiny
    model 0.5 GB of cache, and 42 such engines take 22 GB of cache."""
    from lcq.runtime import LLM

    return LLM(str(folder), gpu_memory_utilization=0.02, **settings)


def make_tiny_hf(folder: str | Path, arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32,
                 **overrides) -> Path:
    """Write a random tiny model of the given family to `folder` (config, safetensors, tokenizer).

    Default sizes put K off the group grid (hidden 96, intermediate 160 with g = 64) and use GQA.
    """
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(folder)
    sizes = dict(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                 tie_word_embeddings=False, rms_norm_eps=1e-5)
    if arch == "llama3":
        sizes["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        sizes["rope_theta"] = 500000.0
    if arch == "qwen3":  # as Qwen3-0.6B: heads x head_dim (128) wider than hidden (96)
        sizes["head_dim"] = 32
    if arch == "gemma3":  # a sliding-window layer (its own rotary base), then a full one; scores scaled by 1/sqrt(24)
        sizes.update(head_dim=32, query_pre_attn_scalar=24, sliding_window=256, tie_word_embeddings=True,
                     layer_types=["sliding_attention", "full_attention"],
                     rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                      "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}})
    if arch == "gemma2":  # Gemma 3's layer without q/k norms, its caps low enough to bend this tiny model's scores
        sizes.update(head_dim=32, query_pre_attn_scalar=24, sliding_window=256, tie_word_embeddings=True,
                     attn_logit_softcapping=1.5, final_logit_softcapping=3.0)
    if arch == "ministral3":  # YaRN over an original context of 32, so that prompts past it scale their queries
        sizes.update(head_dim=24, rope_parameters={
            "type": "yarn", "rope_theta": 1_000_000.0, "factor": 8.0, "original_max_position_embeddings": 32,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.5})
    if arch == "olmo3":  # as OLMo 3 7B: YaRN on the full layer only (original context 32 here)
        sizes.update(num_hidden_layers=4, sliding_window=256, rope_parameters={
            "full_attention": {"rope_type": "yarn", "rope_theta": 500_000.0, "factor": 8.0,
                               "original_max_position_embeddings": 32, "attention_factor": 1.2},
            "sliding_attention": {"rope_type": "default", "rope_theta": 500_000.0}})
    if arch == "exaone4":  # three sliding-window layers with rotary embedding, then a global NoPE one
        sizes.update(num_hidden_layers=4, sliding_window=256, sliding_window_pattern=4)
    if arch == "seed_oss":  # q/k/v biases, and here the output projection's too (attention_out_bias)
        sizes.update(head_dim=32, attention_out_bias=True)
    if arch == "ernie4_5":  # biases on every linear layer, as use_bias gives them
        sizes.update(use_bias=True)
    if arch == "glm":  # as glm-4-9b-chat-hf: q/k/v biases, the rotary embedding over half of each head
        sizes.update(head_dim=24, partial_rotary_factor=0.5, attention_bias=True)
    if arch in ("cohere", "cohere_qk"):  # as Aya Expanse / Command R: LayerNorms, parallel blocks, scaled logits,
        # tied head; cohere_qk: Command R+'s LayerNorms of each query and key head, each its own weights
        sizes.update(logit_scale=0.5, tie_word_embeddings=True, layer_norm_eps=1e-5, use_qk_norm=arch == "cohere_qk")
    if arch == "cohere2":  # as Command R7B: three sliding-window layers (rotary) to a full one (NoPE)
        sizes.update(num_hidden_layers=4, sliding_window=256, logit_scale=0.5, tie_word_embeddings=True)
    if arch.startswith("stablelm"):  # as StableLM 2 1.6B: LayerNorms with biases, q/k/v biases, a quarter of each
        # head turning; stablelm_parallel as StableLM 2 12B: attention and MLP side by side (use_parallel_residual),
        # LayerNorms of each query and key head (qk_layernorm)
        parallel = arch == "stablelm_parallel"
        sizes.update(partial_rotary_factor=0.25, use_qkv_bias=True, use_parallel_residual=parallel,
                     qk_layernorm=parallel)
    if arch == "qwen2_moe":  # as Qwen1.5-MoE-A2.7B: q/k/v biases, 2 of 4 experts plus a gated shared expert
        sizes.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                     shared_expert_intermediate_size=96)
    if arch == "olmoe":  # as OLMoE-1B-7B: q/k norms over the whole projections, 2 of 4 experts (not renormalized)
        sizes.update(num_experts=4, num_experts_per_tok=2, intermediate_size=64)
    if arch == "mixtral":  # 2 of 4 experts a token, as Mixtral 8x7B's 2 of 8
        sizes.update(head_dim=24, num_local_experts=4, num_experts_per_tok=2, intermediate_size=64)
    if arch == "qwen3_moe":  # as Qwen3-30B-A3B: 2 of 6 experts a token (renormalized); the second layer dense
        sizes.update(head_dim=32, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True,
                     mlp_only_layers=[1])
    if arch == "gpt_oss":  # as gpt-oss-20b: 2 of 4 experts, every other layer a sliding window, YaRN (original 32)
        sizes.update(head_dim=24, num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, sliding_window=7,
                     rope_parameters={"rope_type": "yarn", "rope_theta": 150_000.0, "factor": 8.0, "beta_fast": 32.0,
                                      "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 32})
    if arch == "llama4":  # as Llama 4 Maverick: experts (1 of 4 a token, and a shared one) every other layer;
        # the fourth layer NoPE (full attention), its temperature rising every 4 positions here, the others
        # attending within chunks of 8 (Scout's: 8192 both); llama3 scaling
        sizes.update(num_hidden_layers=4, head_dim=24, num_local_experts=4, num_experts_per_tok=1,
                     interleave_moe_layer_step=2, intermediate_size=64, intermediate_size_mlp=160, floor_scale=4,
                     attn_scale=0.5, attention_chunk_size=8,
                     rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 64})
    if arch == "glm4_moe":  # as GLM-4.5: half of each head turning, q/k/v biases, q/k norms; the first layer
        # dense, then 2 of 8 experts chosen within the best of 2 groups by biased sigmoid scores, scaled, beside
        # a shared expert
        sizes.update(head_dim=24, partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=True,
                     n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=48,
                     first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5)
    if arch == "minimax_m2":  # as MiniMax-M2: q/k norms over the whole projections, a quarter of each head
        # turning (its config's rotary_dim), 2 of 4 experts in every layer by biased sigmoid scores
        sizes.update(head_dim=32, rotary_dim=8, num_local_experts=4, num_experts_per_tok=2, intermediate_size=64)
    if arch == "ernie4_5_moe":  # as ERNIE-4.5-21B-A3B: adjacent rotary pairs; the first layer dense, then 2 of 8
        # experts chosen by their softmax weights plus a learned bias, beside a shared expert
        sizes.update(head_dim=24, moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, moe_intermediate_size=48,
                     moe_layer_start_index=1)
    if arch == "hunyuan_moe":  # as Hunyuan-A13B: Hunyuan's layer, 2 of 4 experts a token (per-layer lists, as its
        # config gives them) beside a shared MLP, NTK scaling with a fixed alpha
        sizes.update(head_dim=24, intermediate_size=48, num_experts=4, moe_topk=[2, 2],
                     rope_scaling={"type": "dynamic", "alpha": 1000.0, "factor": 1.0})
    if arch == "dots1":  # as dots.llm1: Qwen3's layer; the first layer dense, then 2 of 8 experts chosen within the
        # best of 2 groups by biased sigmoid scores, renormalized and scaled, beside two shared experts
        sizes.update(head_dim=24, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                     moe_intermediate_size=48, first_k_dense_replace=1, n_shared_experts=2, routed_scaling_factor=2.5,
                     norm_topk_prob=True)
    if arch in ("deepseek_v2", "deepseek_v3", "glm4_moe_lite"):  # latent attention: keys and values from a
        # 32-wide latent, 8 of each 24-wide query and key head rotated, 12-wide values; the first layer dense, then 2
        # of 8 experts beside a shared one
        sizes.update(num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                     n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, n_shared_experts=1,
                     first_k_dense_replace=1, n_group=2, topk_group=1)
    if arch == "deepseek_v2":  # as DeepSeek-V2: one q_proj, softmax weights scaled, chosen within the best group by
        # its best expert; YaRN (original context 64) whose mscale scales the scores too
        sizes.update(q_lora_rank=None, topk_method="group_limited_greedy", routed_scaling_factor=1.5,
                     rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                      "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
                                      "mscale": 0.707, "mscale_all_dim": 0.707})
    if arch in ("deepseek_v3", "glm4_moe_lite"):  # as DeepSeek-V3 and GLM-4.7-Flash: queries through a 48-wide
        # latent; biased sigmoid scores within the best group, renormalized and scaled
        sizes.update(q_lora_rank=48, routed_scaling_factor=2.5, norm_topk_prob=True)
    if arch in ("qwen3_5", "qwen3_5_moe", "qwen3_next"):  # as Qwen3.5 (and Qwen3-Next): linear attention in
        # three layers of four (2 key heads of 16 serving 4 value heads of 24), the fourth full attention with gated
        # outputs, a quarter of each head turning; the mixture: 2 of 6 experts beside a gated shared one
        sizes.update(num_hidden_layers=4, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                     linear_key_head_dim=16, linear_value_head_dim=24,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
        if arch in ("qwen3_5_moe", "qwen3_next"):  # (Qwen3-Next's second layer dense)
            sizes.update(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48,
                         shared_expert_intermediate_size=64)
        if arch == "qwen3_next":
            sizes.update(mlp_only_layers=[1])
    if arch == "glm4":  # as GLM-4-9B-0414: GLM's layer with norms on the attention's and MLP's outputs too
        sizes.update(head_dim=24, partial_rotary_factor=0.5, attention_bias=True)
    if arch == "helium":  # head_dim set, as Helium's config sets it (128 by default)
        sizes.update(head_dim=24)
    if arch == "hunyuan":  # as Hunyuan-1.8B: NTK scaling with a fixed alpha, labelled dynamic
        sizes.update(head_dim=24, rope_scaling={"type": "dynamic", "alpha": 1000.0, "factor": 1.0})
    if arch == "internlm3":  # as internlm3-8b-instruct: dynamic NTK scaling, its default head_dim (128)
        sizes.update(rope_scaling={"rope_type": "dynamic", "factor": 6.0})
    if arch == "granite":  # Granite 3's four factors, of the sizes granite-3.3-8b uses, tied as it is
        sizes.update(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
                     logits_scaling=16.0, tie_word_embeddings=True)
    if arch == "granite4":  # granite-4.0-micro's form: attention layers only, no experts, its MLP the shared one
        sizes.update(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
                     logits_scaling=16.0, tie_word_embeddings=True, layer_types=["attention"] * 2,
                     num_local_experts=0, position_embedding_type="rope", shared_intermediate_size=128,
                     mamba_n_heads=2)  # unused, but checked: it must divide 2 x hidden
    if arch in ("granite4_hybrid", "granite4_moe"):  # Granite 4.0-H's form (h-micro, and h-tiny / h-small with
        # experts): Mamba-2 layers (6 heads of 32, 2 groups of B and C, chunks of 8 in transformers) around a NoPE
        # attention layer, Granite's factors, a dense MLP in every layer, beside 2 of 4 experts in the mixtures'
        sizes.update(num_hidden_layers=4, layer_types=["mamba", "attention", "mamba", "mamba"],
                     position_embedding_type="nope", embedding_multiplier=12.0, residual_multiplier=0.22,
                     attention_multiplier=0.0078125, logits_scaling=16.0, tie_word_embeddings=True,
                     shared_intermediate_size=80, intermediate_size=64, num_experts_per_tok=2,
                     num_local_experts=4 if arch == "granite4_moe" else 0, mamba_n_heads=6, mamba_d_head=32,
                     mamba_d_state=16, mamba_n_groups=2, mamba_chunk_size=8)
    if arch in ("granitemoe", "granitemoeshared"):  # Granite 3's mixtures (granite-3.1-3b-a800m's form: 2 of 4 experts
        # here, softmax over the chosen; Granite's factors) and GraniteMoeShared's dense MLP beside them
        sizes.update(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
                     logits_scaling=16.0, tie_word_embeddings=True, intermediate_size=64, num_local_experts=4,
                     num_experts_per_tok=2, **({"shared_intermediate_size": 80} if arch == "granitemoeshared" else {}))
    if arch in ("lfm2", "lfm2_moe"):  # LFM2's form: short convolutions (3 taps; with a bias here) around an attention
        # layer with per-head q/k norms; its MLP two thirds of intermediate_size (rounded to 32s here); LFM2-8B-A1B's
        # mixtures past its first layer: 2 of 4 experts by sigmoid scores plus a choosing bias, scaled
        sizes.update(num_hidden_layers=4, layer_types=["conv", "conv", "full_attention", "conv"], conv_bias=True,
                     intermediate_size=240 if arch == "lfm2" else 160, block_multiple_of=32, num_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=64, num_dense_layers=1, routed_scaling_factor=2.0)
    if arch == "bamba":  # Bamba's form: Mamba-2 layers (6 heads of 32, 2 groups) around an attention layer turning
        # half of each head; transformers' recurrence in chunks of 8
        sizes.update(num_hidden_layers=4, attn_layer_indices=[1], mamba_n_heads=6, mamba_d_head=32, mamba_d_state=16,
                     mamba_n_groups=2, mamba_chunk_size=8)
    if arch.startswith("nemotron_h"):  # Nemotron-H's blocks of one part each: Nemotron-H-8B's form (Mamba-2 blocks of
        # 6 heads of 32 in 2 groups, MLPs of relu(x)^2, a NoPE attention block), Nemotron 3 Nano's (mixtures of 2 of
        # 4 ungated experts, scaled by 2.5, beside a shared one) and Nemotron 3 Super's (the experts in a latent width)
        kinds = ["linear_attention", "moe" if arch != "nemotron_h" else "mlp", "linear_attention", "full_attention",
                 "moe" if arch != "nemotron_h" else "mlp"]
        sizes.update(layers_block_type=kinds, head_dim=24, mamba_num_heads=6, mamba_head_dim=32, ssm_state_size=16,
                     n_groups=2, chunk_size=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                     moe_shared_expert_intermediate_size=80, routed_scaling_factor=2.5,
                     moe_latent_size=48 if arch == "nemotron_h_latent" else None)
        del sizes["num_hidden_layers"], sizes["rms_norm_eps"]  # (set by the kinds; its epsilon: layer_norm_epsilon)
    if arch.startswith("falcon_h1"):  # Falcon-H1's form: Mamba-2 (6 heads of 32, 2 groups) beside the attention in
        # every layer, each of its factors other than 1; its Mamba-2 outputs gated without a norm (its default), or
        # normed before the gate (falcon_h1_normed)
        sizes.update(mamba_d_ssm=192, mamba_n_heads=6, mamba_n_groups=2, mamba_d_state=16, mamba_chunk_size=8,
                     mamba_rms_norm=arch == "falcon_h1_normed", embedding_multiplier=2.0, lm_head_multiplier=0.5,
                     key_multiplier=0.7, attention_in_multiplier=1.3, attention_out_multiplier=0.8,
                     ssm_in_multiplier=1.2, ssm_out_multiplier=0.9, ssm_multipliers=[0.9, 1.1, 0.8, 1.25, 0.6],
                     mlp_multipliers=[1.4, 0.7])
    if arch == "smollm3":  # the second layer a NoPE layer (no rotary embedding), as every fourth of SmolLM3-3B
        sizes.update(no_rope_layers=[1, 0], tie_word_embeddings=True)
    sizes.update(overrides)
    # by name: a family the installed transformers lacks fails its own tests only
    config_name, model_name = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"), "llama3": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),  # a mixture of experts in place of the MLP
        "mixtral": ("MixtralConfig", "MixtralForCausalLM"),  # Mistral with a mixture of experts in every layer
        "cohere": ("CohereConfig", "CohereForCausalLM"),  # LayerNorms, attention and MLP side by side
        "cohere_qk": ("CohereConfig", "CohereForCausalLM"),  # the same with per-head q/k LayerNorms
        "cohere2": ("Cohere2Config", "Cohere2ForCausalLM"),  # the same with sliding-window layers, NoPE full ones
        "stablelm": ("StableLmConfig", "StableLmForCausalLM"),  # LayerNorms with biases, partial rotary embedding
        "stablelm_parallel": ("StableLmConfig", "StableLmForCausalLM"),  # the same side by side, q/k LayerNorms
        "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),  # Qwen2 with experts and a shared expert
        "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),  # Llama's norms, OLMo 2's q/k norms, experts in every layer
        "gpt_oss": ("GptOssConfig", "GptOssForCausalLM"),  # biases everywhere, attention sinks, clamped SwiGLU experts
        "llama4": ("Llama4TextConfig", "Llama4ForCausalLM"),  # experts fed by sigmoid-weighted inputs, NoPE layers
        "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM"),  # DeepSeek-V3's routing over Qwen2's layer, half-head RoPE
        "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM"),  # softmax routing with a choosing bias
        "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM"),  # OLMoE's q/k norms, GLM-4.5's routing ungrouped
        "hunyuan_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM"),  # Hunyuan's layer with experts, a shared MLP
        "dots1": ("Dots1Config", "Dots1ForCausalLM"),  # Qwen3's layer with DeepSeek-V3's routing
        "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),  # latent attention, experts in groups
        "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),  # the same with query latents, V3's routing
        "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM"),  # DeepSeek-V3's layer
        "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM"),  # linear attention, gated full attention
        "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM"),  # the same with experts
        "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM"),  # the same, its projections fused per key head
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),  # scores and logits soft-capped
        "ministral3": ("Ministral3Config", "Ministral3ForCausalLM"),  # Mistral with a query temperature past 32 tokens
        "phi3": ("Phi3Config", "Phi3ForCausalLM"),  # q/k/v and gate/up stored fused
        "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM"),
        "granite": ("GraniteConfig", "GraniteForCausalLM"),  # read as Llama with its factors folded into weights
        "granite4": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM"),  # granite-4.0-micro: Granite 3, MLP renamed
        "granite4_hybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM"),  # Mamba-2 and NoPE attention
        "granite4_moe": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM"),  # the same with experts
        "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM"),  # Granite 3's layer with experts in every layer
        "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM"),  # the same, a dense MLP beside
        "lfm2": ("Lfm2Config", "Lfm2ForCausalLM"),  # short convolutions and attention
        "bamba": ("BambaConfig", "BambaForCausalLM"),  # Mamba-2 and attention, Llama's MLP
        "lfm2_moe": ("Lfm2MoeConfig", "Lfm2MoeForCausalLM"),  # the same with experts
        "arcee": ("ArceeConfig", "ArceeForCausalLM"),  # Llama with an MLP of relu(x)^2 and no gate
        "apertus": ("ApertusConfig", "ApertusForCausalLM"),  # the same with xIELU, per-head q/k norms, its norms' names
        "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM"),  # Mamba-2 beside attention, factors everywhere
        "falcon_h1_normed": ("FalconH1Config", "FalconH1ForCausalLM"),  # the same, its Mamba-2 outputs normed
        "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM"),  # one part a block: Mamba-2, NoPE attention or MLP
        "nemotron_h_moe": ("NemotronHConfig", "NemotronHForCausalLM"),  # the same with mixtures of ungated experts
        "nemotron_h_latent": ("NemotronHConfig", "NemotronHForCausalLM"),  # the same, the experts in a latent width
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),  # norms on outputs only, q/k norms over whole projections
        "olmo3": ("Olmo3Config", "Olmo3ForCausalLM"),  # OLMo 2's layer, three sliding-window layers to a full one
        "exaone4": ("Exaone4Config", "Exaone4ForCausalLM"),  # OLMo 2's norms with per-head q/k norms, NoPE global layers
        "seed_oss": ("SeedOssConfig", "SeedOssForCausalLM"),  # Llama with biases
        "ernie4_5": ("Ernie4_5Config", "Ernie4_5ForCausalLM"),  # Llama with an interleaved rotary embedding
        "helium": ("HeliumConfig", "HeliumForCausalLM"),  # the same (its defaults not Llama's)
        "glm": ("GlmConfig", "GlmForCausalLM"),  # Qwen2 with gate/up fused, interleaved rotary over half of each head
        "glm4": ("Glm4Config", "Glm4ForCausalLM"),  # the same with sandwich norms
        "internlm3": ("InternLM3Config", "LlamaForCausalLM"),  # transformers runs it as Llama; saved as the Hub has it
        "hunyuan": ("HunYuanDenseV1Config", "HunYuanDenseV1ForCausalLM"),  # q/k norms after the rotary embedding
    }[arch]
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**sizes)).to(dtype).eval()
    with torch.no_grad():  # random init has tiny weights; widen them so logits are far from uniform
        for name, param in model.named_parameters():
            if (name.endswith("weight") and param.dim() == 2) or param.dim() == 3:  # 3-D: gpt-oss's experts
                param.normal_(0.0, 0.08)
            elif name.endswith(("act_fn.alpha_p", "act_fn.alpha_n")):  # Apertus's xIELU factors: each layer its own
                param.uniform_(-0.5, 0.5)
            elif name.endswith("sinks"):  # about the size of this model's scores, so that they matter
                param.normal_(0.0, 1.0)
            elif name.endswith("bias"):  # qwen2's qkv bias starts at zero, which would test nothing
                param.normal_(0.0, 0.05)
            elif name.endswith(("q_norm.weight", "k_norm.weight", "query_layernorm.weight",
                                "key_layernorm.weight")) or ".norms." in name or \
                    (arch in ("olmo2", "olmo3", "exaone4", "lfm2", "lfm2_moe", "cohere", "cohere2", "stablelm",
                              "stablelm_parallel") and name.endswith("norm.weight")):
                # these start at one
                param.uniform_(0.5, 1.5)
            elif arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):  # gemma stores w - 1, from 0
                param.uniform_(-0.5, 0.5)
            elif name.endswith(("mamba.D", "mamba.dt_bias", "mamba.norm.weight")) or \
                    (arch.startswith("nemotron_h") and name.endswith(("mixer.D", "mixer.dt_bias", "norm.weight"))):
                # these start at one
                param.uniform_(0.5, 1.5)
            elif arch.startswith(("qwen3_5", "qwen3_next")) and name.endswith("norm.weight"):  # w - 1, but not the
                # gated norm's w
                param.uniform_(0.5, 1.5) if "linear_attn" in name else param.uniform_(-0.5, 0.5)
        for name, buffer in model.named_buffers():  # GLM-4.5's choosing bias starts at zero, which would test nothing
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                buffer.normal_(0.0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    if arch == "hunyuan":  # as Hunyuan-1.8B: NTK scaling with a fixed alpha, labelled dynamic
        sizes.update(head_dim=24, rope_scaling={"type": "dynamic", "alpha": 1000.0, "factor": 1.0})
    if arch == "internlm3":  # the Hub's config names its own class and its bias settings
        import json

        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "architectures": ["InternLM3ForCausalLM"],
                                                        "qkv_bias": False, "bias": False}))
    return folder


def phi3_longrope(original: int, partial_rotary_factor: float = 1.0) -> dict:
    """make_tiny_hf overrides for a Phi-3.5-style Phi-3 (LongRoPE over an original context of `original`
    tokens, of make_tiny_hf's 256), or with a partial rotary embedding a Phi-4-mini-style one: a short and
    a long factor per rotary frequency of its 24-wide heads."""
    count = int(24 * partial_rotary_factor) // 2
    return dict(original_max_position_embeddings=original, partial_rotary_factor=partial_rotary_factor,
                rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                 "short_factor": [1.0 + 0.1 * i for i in range(count)],
                                 "long_factor": [1.0 + 0.7 * i for i in range(count)]})


# A multimodal wrapper per text family, with its tiny vision tower's config.
WRAPPED = {"gemma3": ("Gemma3Config", "Gemma3ForConditionalGeneration", dict(
               model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, image_size=28, patch_size=14), dict(mm_tokens_per_image=4)),
           "llama": ("LlavaConfig", "LlavaForConditionalGeneration", dict(
               model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32), {}),
           "mistral": ("Mistral3Config", "Mistral3ForConditionalGeneration", dict(
               model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               image_size=28, patch_size=14, head_dim=16), dict(spatial_merge_size=2)),
           "qwen2": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", dict(
               depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=96,
               fullatt_block_indexes=[0]), {}),
           "llama4": ("Llama4Config", "Llama4ForConditionalGeneration", dict(
               hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
               patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=96), {}),
           "qwen3": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", dict(
               depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=96,
               deepstack_visual_indexes=[0]), {}),
           "qwen3_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration", dict(
               depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=96,
               deepstack_visual_indexes=[0]), {}),
           **{arch: (f"{name}Config", f"{name}ForConditionalGeneration", dict(
               depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=96,
               deepstack_visual_indexes=[]), {})
              for arch, name in (("qwen3_5", "Qwen3_5"), ("qwen3_5_moe", "Qwen3_5Moe"))},
           "idefics3": ("Idefics3Config", "Idefics3ForConditionalGeneration", dict(
               hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
               patch_size=14), dict(scale_factor=2)),
           "smolvlm": ("SmolVLMConfig", "SmolVLMForConditionalGeneration", dict(
               hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
               patch_size=14), dict(scale_factor=2)),
           "internvl": ("InternVLConfig", "InternVLForConditionalGeneration", dict(
               hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=[28, 28],
               patch_size=[14, 14]), {})}
# Wrappers named by themselves, and the text family each holds (the others are named by it).
TEXT_FAMILY = {"idefics3": "llama", "smolvlm": "llama", "internvl": "qwen2"}
# Qwen VL text models: the multimodal rotary embedding's frequency sections (time, height, width), summing to
# head_dim / 2 of make_tiny_hf's Qwen2 (24) and Qwen3 (32).
MROPE_SECTIONS = {"qwen2": [4, 4, 4], "qwen3": [4, 6, 6], "qwen3_moe": [4, 6, 6]}


def make_tiny_multimodal(folder: str | Path, arch: str = "gemma3", layout: str = "full") -> Path:
    """A multimodal checkpoint (Gemma 3 4B-style, LLaVA over Llama, Mistral Small 3.1-style, Llama 4; by their own
    names SmolVLM's two forms over Llama and InternVL3 over Qwen2: TEXT_FAMILY) whose language model is
    make_tiny_hf's `arch` model. `layout` "full": as transformers writes it (tensors
    under language_model.*, as in the Hub's files; text_config in full); "sparse": text_config holds only
    what differs from the defaults, as in the Hub's Gemma 3 files, and tensors sit under
    model.language_model.* and model.vision_tower.*, as transformers 4.52-4.57 saved them (Qwen3-VL-MoE's
    3-D experts (in, out), as on the Hub), and the chat template is the processor's chat_template.json, as
    multimodal folders on the Hub keep it. Qwen2.5-VL
    ("qwen2") "sparse": the Hub's form, its text settings at the top level with rope_scaling of type
    mrope. Returns `folder`/wrapped; the text model it holds is also in `folder`/text."""
    import json

    import transformers
    from safetensors.torch import load_file, save_file

    text_dir = make_tiny_hf(Path(folder) / "text", TEXT_FAMILY.get(arch, arch))
    folder = Path(folder) / "wrapped"
    text = transformers.AutoModelForCausalLM.from_pretrained(text_dir)
    config_cls, model_cls, vision, extra = WRAPPED[arch]
    tokens = len(make_tokenizer(folder))
    text_config = text.config.to_dict()
    if arch in MROPE_SECTIONS:  # Qwen VL: the same rotary base, as multimodal settings
        text_config.pop("model_type")
        text_config["rope_parameters"] = {"rope_type": "default", "mrope_section": MROPE_SECTIONS[arch],
                                          "rope_theta": text.config.rope_parameters["rope_theta"]}
    image_token = "image_token_id" if arch in MROPE_SECTIONS or arch in TEXT_FAMILY else "image_token_index"
    config = getattr(transformers, config_cls)(text_config=text_config, vision_config=vision,
                                                tie_word_embeddings=text.config.tie_word_embeddings,
                                                **{image_token: tokens - 1}, **extra)
    torch.manual_seed(1)
    model = getattr(transformers, model_cls)(config).eval()
    if arch == "llama4":  # its language model is a whole CausalLM
        model.language_model.load_state_dict(text.state_dict())
    else:
        language = getattr(model.model, "text_model", None) or model.model.language_model
        language.load_state_dict(text.model.state_dict())
        model.lm_head.load_state_dict(text.lm_head.state_dict())
    model.save_pretrained(folder)
    if arch in MROPE_SECTIONS:  # as the Hub's Qwen VL folders name it
        settings = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "tokenizer_class": "Qwen2Tokenizer"}))
    # the text folder tokenizes as the wrapper does (the class transformers picks for it may normalize text)
    wrapper_class = type(transformers.AutoTokenizer.from_pretrained(folder)).__name__
    settings = json.loads((text_dir / "tokenizer_config.json").read_text())
    (text_dir / "tokenizer_config.json").write_text(json.dumps({**settings, "tokenizer_class": wrapper_class}))
    if layout == "sparse" and arch == "qwen2":
        saved = json.loads((folder / "config.json").read_text())
        settings = saved.pop("text_config")
        rope = settings.pop("rope_parameters")
        settings.update(rope_theta=rope["rope_theta"],
                        rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
        saved.update({key: value for key, value in settings.items() if key not in ("model_type", "architectures")})
        (folder / "config.json").write_text(json.dumps(saved))
    elif layout == "sparse":
        saved = json.loads((folder / "config.json").read_text())
        defaults = type(config.text_config)().to_dict()
        saved["text_config"] = {key: value for key, value in config.text_config.to_dict().items()
                                if key == "model_type" or defaults.get(key) != value}
        (folder / "config.json").write_text(json.dumps(saved))
        tensors = load_file(str(folder / "model.safetensors"))
        moved = {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
                 "vision_tower.": "model.vision_tower.", "multi_modal_projector.": "model.multi_modal_projector."}
        renamed = {next((new + name[len(old):] for old, new in moved.items() if name.startswith(old)), name): t
                   for name, t in tensors.items()}  # Qwen3-VL's names are transformers' already
        if arch == "qwen3_moe":  # the Hub's Qwen3-VL-MoE experts are (in, out), where transformers saves (out, in)
            renamed = {name: t.transpose(1, 2).contiguous() if ".mlp.experts." in name else t
                       for name, t in renamed.items()}
        save_file(renamed, str(folder / "model.safetensors"), metadata={"format": "pt"})
        template = folder / "chat_template.jinja"  # the template as a processor keeps it, as in the Hub's files
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": template.read_text()}))
        template.unlink()
    return folder


CALIBRATION_TEXT = " ".join(CORPUS * 6)


def make_tiny_lcq(folder: str | Path, arch: str = "llama", bits: int = 4, rank: int = 2, group_size: int = 32,
                  method: str = "lcq", seed: int = 0, **overrides) -> Path:
    """A tiny random model quantized by the real pipeline into `folder`/lcq; its full-precision
    source stays in `folder`/hf. Quick settings: a few short calibration windows, one epoch."""
    from lcq.quantizer import QuantizeOptions, quantize_model

    folder = Path(folder)
    hf = make_tiny_hf(folder / "hf", arch, seed=seed, **overrides)
    options = QuantizeOptions(bits=bits, rank=rank, group_size=group_size, method=method,
                              calib_text=CALIBRATION_TEXT, nsamples=4, seqlen=32, epochs=1, seed=seed)
    quantize_model(hf, folder / "lcq", options, progress=False)
    return folder / "lcq"


MTP_LAYOUTS = {**dict.fromkeys(("deepseek_v3", "glm4_moe_lite", "glm4_moe"), dict(num_hidden_layers=3)),  # the model's 2 layers, then
               # its prediction layer's
               **dict.fromkeys(("qwen3_next", "qwen3_5"),
                               dict(num_hidden_layers=5, layer_types=["linear_attention"] * 3 + ["full_attention"] * 2))}


def make_tiny_mtp(folder: str | Path, arch: str, echoing: bool = False) -> tuple[Path, Path]:
    """A tiny model with a multi-token-prediction layer as its family's checkpoints store it (DeepSeek-V3's under
    model.layers.{num_hidden_layers}, with enorm, hnorm, eh_proj and shared_head; Qwen3-Next's under mtp.,
    with pre_fc_norm_embedding, pre_fc_norm_hidden, fc and norm), and the model of one more layer whose last
    layer is that layer's decoder layer (transformers' reference of it). Returns (model, longer model).

    echoing: the head made the embedding table, so that the model often repeats a token, and the layer's
    projection made to read mostly the next token's embedding, so that it predicts such repeats: drafts
    that are accepted now and then (a third of them for DeepSeek-V3's, a twentieth for Qwen3-Next's),
    where random weights' almost never are."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    longer = make_tiny_hf(folder / "longer", arch, **MTP_LAYOUTS[arch])
    config = json.loads((longer / "config.json").read_text())
    layers = config["num_hidden_layers"] - 1
    served = folder / "model"
    shutil.copytree(longer, served)
    config["num_hidden_layers"] = layers
    if arch.startswith("qwen3"):
        config["layer_types"] = config["layer_types"][:layers]
        prefix = "mtp"
    else:
        config["num_nextn_predict_layers"] = 1
        prefix = f"model.layers.{layers}"
    (served / "config.json").write_text(json.dumps(config))
    tensors = load_file(longer / "model.safetensors")
    hidden = config["hidden_size"]
    generator = torch.Generator().manual_seed(1)
    deepseek = not arch.startswith("qwen3")  # (DeepSeek-V3's layout, GLM-4.5's too)
    offset = 0.0 if deepseek else -1.0  # (Qwen3-Next's norms store w - 1)
    mtp = {f"{prefix}.{name}.weight": torch.rand(hidden, generator=generator) + 0.5 + offset
           for name in (("enorm", "hnorm", "shared_head.norm") if deepseek else
                        ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"))}
    projection = "eh_proj" if deepseek else "fc"
    mtp[f"{prefix}.{projection}.weight"] = torch.randn(hidden, 2 * hidden, generator=generator) * 0.08
    if deepseek:  # copies of the model's, as DeepSeek-V3's checkpoint keeps them
        mtp[f"{prefix}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
        mtp[f"{prefix}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    if echoing:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        mtp[f"{prefix}.{projection}.weight"] = torch.cat([torch.eye(hidden), 0.3 * torch.eye(hidden)], dim=1)
    renamed = {name.replace(f"model.layers.{layers}.", "mtp.layers.0.") if prefix == "mtp" else name: tensor
               for name, tensor in tensors.items()}
    save_file({**renamed, **mtp}, str(served / "model.safetensors"), metadata={"format": "pt"})
    return served, longer


LORA_TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def write_lora_pair(folder: Path, module: str, in_features: int, out_features: int, rank: int = 4) -> Path:
    """A PEFT LoRA folder holding one random A/B pair, for `module` (its name under the CausalLM), as an
    adapter for a matrix lcq may refuse."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"base_model.model.{module}.lora_A.weight": torch.randn(rank, in_features),
               f"base_model.model.{module}.lora_B.weight": torch.randn(out_features, rank)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}))
    return folder


def make_tiny_adapter(folder: str | Path, model_dir: str | Path, rank: int = 4, alpha: float = 8.0, seed: int = 0,
                      targets: tuple[str, ...] = LORA_TARGETS, layers: list[int] | None = None) -> Path:
    """A random PEFT LoRA folder for the model in `model_dir` (B random too, where PEFT starts it at
    zero, so that the adapter changes the output), over `targets` of every decoder layer (or `layers`)."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    model = _meta_model(config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(config.num_hidden_layers) if layers is None else layers:
        for target in targets:
            n, k = model.get_submodule(f"model.layers.{i}.{target}").weight.shape
            prefix = f"base_model.model.model.layers.{i}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, k, generator=generator) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(n, rank, generator=generator) * 0.1
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": sorted({t.split(".")[-1] for t in targets}),
        "bias": "none", "use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "modules_to_save": None}))
    return folder


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def merge_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """A transformers model with the adapter merged into its weights (W += alpha / r * B @ A): the
    reference an adapter served over the unmerged base must match."""
    import json

    from safetensors.torch import load_file

    settings = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    with torch.no_grad():
        for name, a in tensors.items():
            if name.endswith(".lora_A.weight"):
                module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                b = tensors[name.replace("lora_A", "lora_B")]
                weight = model.get_submodule(module).weight
                weight += (settings["lora_alpha"] / settings["r"] * b.double() @ a.double()).to(weight.dtype)
    return model


def mxfp4_copy(source: str | Path, folder: str | Path) -> Path:
    """A copy of a tiny gpt-oss folder with its experts' matrices in MXFP4, as the Hub publishes gpt-oss: per
    expert, each run of 32 inputs of an output row as 4-bit E2M1 codes (two a byte, the low nibble first)
    under one power-of-two scale (a biased exponent byte), the codes (experts, out, in / 32, 16) and scales
    (experts, out, in / 32) beside the biases, and quantization_config quant_method mxfp4."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    source, folder = Path(source), Path(folder)
    shutil.copytree(source, folder)
    values = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        rows = tensors.pop(name).float().transpose(1, 2)  # (experts, out, in)
        runs = rows.reshape(*rows.shape[:2], -1, 32)
        exponents = torch.ceil(torch.log2(runs.abs().amax(-1).clamp_min(1e-30) / 6.0))  # the largest within +-6
        codes = (runs / torch.exp2(exponents).unsqueeze(-1)).unsqueeze(-1).sub(values).abs().argmin(-1)
        tensors[f"{name}_blocks"] = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
        tensors[f"{name}_scales"] = (exponents + 127).to(torch.uint8)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def fp8_copy(source: str | Path, folder: str | Path, decoded: str | Path, method: str = "fp8",
             block: tuple[int, int] | None = (16, 16)) -> Path:
    """A copy of a tiny folder with its decoder's projections in FP8 (E4M3), as DeepSeek-V3 and the -FP8
    releases publish them: method fp8 with one scale per `block` of rows and columns (partial blocks at the
    edges) under <weight>_scale_inv, or compressed-tensors (float-quantized) with one scale per output row
    under <weight>_scale; routers, norms, embeddings and head as they were. `decoded` gets the same model with
    those weights decoded (value times its block's scale, in fp32), computed block by block here."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    source, folder, decoded = Path(source), Path(folder), Path(decoded)
    shutil.copytree(source, folder)
    shutil.copytree(source, decoded)
    tensors = load_file(folder / "model.safetensors")
    plain = dict(tensors)
    largest = torch.finfo(torch.float8_e4m3fn).max
    for name in [n for n in tensors if n.startswith("model.layers.") and "proj" in n.split(".")[-2 if n.endswith(
            ".weight") else -1] and tensors[n].dim() >= 2]:
        weight = tensors[name].float()
        rows, columns = weight.shape[-2:]
        b0, b1 = block or (1, columns)
        scales = torch.zeros(*weight.shape[:-2], -(-rows // b0), -(-columns // b1))
        codes = torch.zeros(weight.shape, dtype=torch.float8_e4m3fn)
        values = torch.zeros(weight.shape)
        for i in range(scales.shape[-2]):
            for j in range(scales.shape[-1]):
                part = weight[..., i * b0:(i + 1) * b0, j * b1:(j + 1) * b1]
                scale = part.abs().amax((-2, -1)).clamp_min(1e-12) / largest
                scales[..., i, j] = scale
                code = (part / scale[..., None, None]).to(torch.float8_e4m3fn)
                codes[..., i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] = code
                values[..., i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] = code.float() * scale[..., None, None]
        tensors[name] = codes
        tensors[name + ("_scale_inv" if method == "fp8" else "_scale")] = scales
        plain[name] = values
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    save_file(plain, decoded / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": list(block) if block else None} if method == "fp8" else {
        "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"], "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder
