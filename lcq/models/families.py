"""The families lcq runs from their config.json: their architectures, and the groups of them whose layers
differ from Llama's alike (the settings each group reads are in family_fields.py)."""
from __future__ import annotations

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                           "Qwen3ForCausalLM": "qwen3", "Gemma3ForCausalLM": "gemma3_text",
                           "SmolLM3ForCausalLM": "smollm3", "Olmo2ForCausalLM": "olmo2", "Gemma2ForCausalLM": "gemma2",
                           "Ministral3ForCausalLM": "ministral3", "Exaone4ForCausalLM": "exaone4",
                           "SeedOssForCausalLM": "seed_oss", "Olmo3ForCausalLM": "olmo3",
                           "HunYuanDenseV1ForCausalLM": "hunyuan_v1_dense", "Glm4ForCausalLM": "glm4",
                           "Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral",
                           "OlmoeForCausalLM": "olmoe", "Qwen2MoeForCausalLM": "qwen2_moe",
                           "CohereForCausalLM": "cohere", "Cohere2ForCausalLM": "cohere2",
                           "StableLmForCausalLM": "stablelm", "GptOssForCausalLM": "gpt_oss",
                           "Llama4ForCausalLM": "llama4_text", "Glm4MoeForCausalLM": "glm4_moe",
                           "Ernie4_5_MoeForCausalLM": "ernie4_5_moe", "HunYuanMoEV1ForCausalLM": "hunyuan_v1_moe",
                           "Dots1ForCausalLM": "dots1", "DeepseekV2ForCausalLM": "deepseek_v2",
                           "DeepseekV3ForCausalLM": "deepseek_v3", "Glm4MoeLiteForCausalLM": "glm4_moe_lite",
                           "Qwen3_5ForCausalLM": "qwen3_5_text", "Qwen3_5MoeForCausalLM": "qwen3_5_moe_text",
                           "Qwen3NextForCausalLM": "qwen3_next", "MiniMaxM2ForCausalLM": "minimax_m2",
                           "GraniteMoeHybridForCausalLM": "granitemoehybrid", "Lfm2ForCausalLM": "lfm2",
                           "Lfm2MoeForCausalLM": "lfm2_moe", "BambaForCausalLM": "bamba",
                           "NemotronHForCausalLM": "nemotron_h", "FalconH1ForCausalLM": "falcon_h1",
                           "ArceeForCausalLM": "arcee", "ApertusForCausalLM": "apertus",
                           "GraniteMoeForCausalLM": "granitemoe", "GraniteMoeSharedForCausalLM": "granitemoeshared"}
GRANITE_EXPERTS = ("granitemoehybrid", "granitemoe", "granitemoeshared")  # Granite's layers read as themselves
# OLMo 3's rotary base: its full layers' where config.json gives none, its sliding layers' always unless
# rope_parameters gives theirs (transformers' Olmo3Config takes rope_theta for the full layers only).
OLMO3_THETA = 500_000.0
GEMMA = ("gemma3_text", "gemma2")  # Gemma's layer: norms around attention and MLP, weights stored as w - 1
HUNYUAN = ("hunyuan_v1_dense", "hunyuan_v1_moe")  # Hunyuan's layer: q/k norms after the rotary embedding
LATENT = ("deepseek_v2", "deepseek_v3", "glm4_moe_lite")  # multi-head latent attention (LatentDims)
# Llama's layer with an MLP of up_proj, an activation and down_proj, no gate: Arcee's relu(x)^2, Apertus's xIELU
# (whose two learned factors each MLP keeps beside it)
UNGATED_FAMILIES = {"arcee": "relu2", "apertus": "xielu"}
QWEN3_5 = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")  # linear attention (LinearDims) in most layers
# Layers whose norms (and rotary pairs) are not Llama's. OLMo 2's: norms on the attention's and the MLP's
# outputs only, q/k norms over the whole projections (OLMo 3's too, with sliding-window layers); EXAONE 4's
# the same with q/k norms per head; GLM-4-0414's: norms on inputs and outputs, adjacent rotary pairs;
# OLMoE's and MiniMax-M2's: Llama's norms, q/k norms over the whole projections; Cohere's (and Cohere 2's): one
# LayerNorm before attention and the MLP side by side, adjacent rotary pairs; StableLM's: LayerNorms with biases.
LAYER_NORMS = {"olmo2": dict(sandwich_norms=True, pre_norms=False, qk_norm_per_head=False),
               "olmo3": dict(sandwich_norms=True, pre_norms=False, qk_norm_per_head=False),
               "exaone4": dict(sandwich_norms=True, pre_norms=False),
               "glm4": dict(sandwich_norms=True, rotary_interleaved=True),
               "olmoe": dict(qk_norm_per_head=False), "minimax_m2": dict(qk_norm_per_head=False),
               "cohere": dict(layer_norm=True, parallel_block=True, rotary_interleaved=True),
               "cohere2": dict(layer_norm=True, parallel_block=True, rotary_interleaved=True),
               "stablelm": dict(layer_norm=True, norm_bias=True),
               "ernie4_5_moe": dict(rotary_interleaved=True)}  # ERNIE 4.5's mixtures: adjacent rotary pairs
