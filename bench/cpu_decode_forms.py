"""Decode speed on CPU of model forms beyond Llama's (layers with recurrent mixers, mixtures of experts, latent
attention), three ways alternating in one process: the whole decode step of every layer in one C call
(one_call: cpu_decode.py), the Python layers with each recurrent mixer's step, each mixture and the latent
attention's steps around its attention in C calls (layers: cpu_ops.recurrent_step, mixture_step,
latent_queries, latent_values), and the Python layers with torch operations for those (torch: the mixtures'
routing, then each chosen expert's products one call at a time).

Random-weight fp16 folders of SmolLM2-135M's widths (hidden 576, MLP 1536, 32 layers, 9 query and 3 key/value
heads; the tiny test tokenizer, so the head is small): Bamba's form (Mamba-2 in three layers of four: 18 heads
of 64, state 128, one group), Qwen3.5's (linear attention in three layers of four: 4 key heads serving 8 value
heads of 64), LFM2's (short convolutions of 3 taps in three layers of four), Qwen3-MoE's (a mixture of 32
experts of width 384 in every layer, 4 a token, renormalized), gpt-oss's (the same mixtures with biases and its
clamped SwiGLU, attention sinks, a 128-token window every other layer, YaRN), DeepSeek-V3's (GLM-4.7-Flash's
layer: latent attention, a 256-wide latent and 384-wide queries' one, the same mixtures with sigmoid scores plus
a choosing bias and a shared expert, the first layer dense), LayerNorm models (Cohere's: attention and MLP side by
side on one norm's output; StableLM 2's: biased norms, a quarter of each head turning; both one_call and layers
only, whose norms are the same C kernel), and Llama's as a reference.
Recorded per model, path and concurrency: output tokens/s of every round (128 tokens per sequence, greedy) and
their median, and whether it gave one_call's greedy tokens (one_call and layers compute the same numbers; the
torch operations' other order of fp32 sums may turn a random model's near-ties: the tests check every path
against transformers).

    python bench/cpu_decode_forms.py [--threads 2] [--rounds 3] [--tokens 128] [--models llama,bamba,...]
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.records import cpu_arguments, cpu_record, write_record  # noqa: E402
from lcq.models import latent_attention, linear_attention, llama, mamba, recurrent  # noqa: E402
from lcq.runtime import LLM, SamplingParams  # noqa: E402
from tests.tiny_model import make_tiny_hf  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "cpu-decode-forms.json"
WIDTHS = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=32, num_attention_heads=9,
              num_key_value_heads=3, head_dim=64, max_position_embeddings=2048)
MODELS = {"llama": WIDTHS,
          "bamba": dict(WIDTHS, attn_layer_indices=list(range(3, 32, 4)), mamba_n_heads=18, mamba_d_head=64,
                        mamba_d_state=128, mamba_n_groups=1, mamba_chunk_size=64),
          "qwen3_5": dict(WIDTHS, linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64,
                          linear_value_head_dim=64),
          "lfm2": dict(WIDTHS, layer_types=["full_attention" if i % 4 == 3 else "conv" for i in range(32)],
                       block_auto_adjust_ff_dim=False),
          "qwen3_moe": dict(WIDTHS, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=384,
                            norm_topk_prob=True, mlp_only_layers=[]),
          "gpt_oss": dict(WIDTHS, num_local_experts=32, num_experts_per_tok=4, intermediate_size=384,
                          sliding_window=128),
          "deepseek_v3": dict(WIDTHS, kv_lora_rank=256, q_lora_rank=384, qk_nope_head_dim=64, qk_rope_head_dim=32,
                              v_head_dim=64, n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=384,
                              n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                              norm_topk_prob=True, routed_scaling_factor=2.5),
          "cohere": WIDTHS, "stablelm": WIDTHS}
# where the mixers, mixtures and latent attention look up the C ops
MIXER_MODULES = (recurrent, mamba, linear_attention, llama, latent_attention)


def options(parser) -> None:
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--models", default=",".join(MODELS), help="the forms to run, comma-separated")


def choose_path(llm: LLM, path: str, decoder) -> None:
    """Run the engine's decode steps by `path` (one_call, layers or torch); decoder: the model's C step."""
    from lcq.kernels import cpu_ops

    llm.engine.runner.model.cpu_decoder = decoder if path == "one_call" else None
    # the torch path: ops that say the C kernels do not run here, seen by the mixers and the mixtures (the norms,
    # attention and products keep their C kernels)
    stand_in = types.SimpleNamespace(**{**vars(cpu_ops), "usable": lambda *tensors: False}) if path == "torch" \
        else cpu_ops
    for module in MIXER_MODULES:
        module.cpu_ops = stand_in


def decode(llm: LLM, concurrency: int, tokens: int) -> tuple[float, list[list[int]]]:
    """Output tokens/s of `concurrency` sequences decoding `tokens` each, and their tokens."""
    params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0)
    prompts = [f"Hello there, number {i}" for i in range(concurrency)]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return sum(len(o.token_ids) for o in outs) / elapsed, [o.token_ids for o in outs]


def main() -> None:
    args = cpu_arguments(__doc__, RESULTS, options)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models.split(","):
            shapes = MODELS[name]
            folder = make_tiny_hf(Path(scratch) / name, name, dtype=torch.float16, **shapes)
            llm = LLM(str(folder), kv_cache_memory_gb=0.6, max_num_seqs=8)
            decode(llm, 1, 8)  # warm-up
            decoder = llm.engine.runner.model.cpu_decoder
            assert decoder is not None, "the C decode step does not build here"
            plain = name in ("llama", "cohere", "stablelm")  # (no parts that torch operations would run instead)
            kinds = ("one_call", "layers") if plain else ("one_call", "layers", "torch")
            for concurrency in (1, 8):
                rates: dict[str, list[float]] = {kind: [] for kind in kinds}
                tokens: dict[str, list[list[int]]] = {}
                for _ in range(args.rounds):
                    for kind in kinds:
                        choose_path(llm, kind, decoder)
                        rate, tokens[kind] = decode(llm, concurrency, args.tokens)
                        rates[kind].append(rate)
                choose_path(llm, "one_call", decoder)
                for kind, runs in rates.items():
                    rows.append(dict(model=name, path=kind, concurrency=concurrency, tokens=args.tokens,
                                     output_tok_s=round(statistics.median(runs), 1),
                                     runs=[round(r, 1) for r in runs],
                                     same_tokens_as_one_call=tokens[kind] == tokens["one_call"]))
                    print(f"{name:8s} {kind:8s} x{concurrency}: {rows[-1]['output_tok_s']:7.1f} tok/s  "
                          f"(rounds {rows[-1]['runs']})", flush=True)
            del llm
    write_record(args.output, cpu_record(" ".join(["python", *sys.argv]), args.threads,
                                         shapes={name: MODELS[name] for name in args.models.split(",")}, rows=rows))


if __name__ == "__main__":
    main()
