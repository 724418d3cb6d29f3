"""A Llama-family decoder (Llama 2/3/4, Mistral, Ministral 3, Qwen2, Qwen3, SmolLM2/3, OLMo 2, EXAONE 4, Gemma 2/3,
Arcee) over a paged KV cache.

Tokens of all sequences in a step are flattened into one (T,) batch; the ForwardContext says
where each sequence's tokens start and where its cache lives. Linear layers come from the loader:
fused LCQ matrices (qkv and gate/up each one matrix) or dense ones, behind the same call.
Gemma 3 is this layer with a few switches (ModelConfig): its attention and MLP outputs normalised too,
GeGLU, scaled embeddings and query, and sliding-window layers with their own rotary base; Gemma 2 is
the same without q/k norms and with its attention scores soft-capped (PagedAttention.attend). SmolLM3's
NoPE layers (every fourth) rotate by the identity table. OLMo 2 normalises only the attention and MLP
outputs, and its q/k norms span the whole projections; EXAONE 4 is that layer with per-head q/k norms,
three sliding-window layers to each global one, the global ones NoPE. Ministral 3 is Mistral's layer
with its queries scaled by a temperature that grows with the position past its original context.
gpt-oss is Llama's layer with biases on every projection, attention sinks, a sliding window every other
layer and a mixture of experts whose SwiGLU is clamped. Llama 4 is Llama's layer with adjacent rotary
pairs, unweighted norms of the rotated queries and keys, NoPE layers (every fourth) whose queries take
Ministral 3's temperature, and mixtures whose router weights scale the experts' inputs, beside a shared
expert. DeepSeek-V2 and V3 (and GLM-4.7-Flash) are Llama's layer with DeepSeek's latent attention
(latent_attention.py) and mixtures after dense first layers. Qwen3.5 is Llama's layer with linear attention
(linear_attention.py) in three layers of four, the others gating their attention's output, turning a
quarter of each head, and norming q and k per head; its norms multiply by 1 + w. Nemotron-H's blocks are
layers of one part each: Mamba-2 (mamba.py), attention without rotation, or an MLP without a gate (relu(x)^2),
or a mixture of such MLPs.
"""
from __future__ import annotations

import ctypes
import math
from typing import Callable

import torch

from lcq.format import FormatError
from lcq.kernels import LCQLinear, cpu_ops
from lcq.kernels.cpu_matmul import dense_linear
from lcq.kernels.experts import ExpertRoutes, LCQExperts, PackedExperts
from lcq.kernels.linear import stream_squares

from .attention import PagedAttention
from .config import ModelConfig
from .context import ForwardContext
from .cpu_decode import CpuDecoder
from .latent_attention import LatentAttention
from .linear_attention import GatedDeltaNet
from .mamba import Mamba2
from .mtp import MultiTokenPredictor
from .short_conv import ShortConv
from .recurrent import RecurrentMixer
from .layers import (NO_ROTATION, UNGATED, LayerNorm, RMSNorm, RotaryEmbedding, head_norm_, mlp_activation,
                     query_temperatures, rotary_qkv, swiglu_factors, xielu)
from .lora import LoRABatch

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin of the step's positions

# make_linear(names) -> module computing x @ W^T (+ bias) for the named checkpoint matrices fused along N.
LinearFactory = Callable[[list[str]], torch.nn.Module]


def fitted(linear: torch.nn.Module, name: str, in_features: int | None = None,
           out_features: int | None = None) -> torch.nn.Module:
    """linear, where its weights have the sizes the layer's forward takes from config.json (None: any): a
    config changed apart from its weights would load, then fail every request."""
    for side, stored, expected in (("input", linear.in_features, in_features),
                                   ("output", linear.out_features, out_features)):
        if expected is not None and stored != expected:
            raise FormatError(f"{name}: its weights have {stored} {side} features where config.json makes "
                              f"{expected}: the config does not describe these weights")
    return linear


def project(linear: torch.nn.Module, name: str, x: torch.Tensor, lora: LoRABatch | None) -> torch.Tensor:
    """x through the fused layer `name`, plus the LoRA products of the rows whose sequences use an adapter."""
    y = linear(x)
    return y if lora is None else lora.add(name, x, y)


class Attention(torch.nn.Module):
    def __init__(self, config: ModelConfig, prefix: str, make_linear: LinearFactory, dtype: torch.dtype,
                 index: int):
        """index: the decoder layer's, which says its sliding window or attention chunks, whether it rotates
        and whether its queries take the temperature."""
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        query_heads = self.num_heads * (2 if config.attention_output_gate else 1)  # (with each head's gate)
        self.qkv_proj = fitted(make_linear([f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"]),
                               f"{prefix}.q_proj/k_proj/v_proj", in_features=config.hidden_size,
                               out_features=(query_heads + 2 * self.num_kv_heads) * self.head_dim)
        self.output_name = f"{prefix}.{config.attention_output_name}"
        self.o_proj = fitted(make_linear([self.output_name]), self.output_name,
                             in_features=self.num_heads * self.head_dim, out_features=config.hidden_size)
        # q/k norms over each head, or (OLMo 2) over the whole projection: one "head" as wide as all of them
        self.norm_heads = (self.num_heads, self.num_kv_heads) if config.qk_norm_per_head else (1, 1)
        q_width, k_width = (self.head_dim, self.head_dim) if config.qk_norm_per_head else \
            (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim)
        self.norm_widths, self.norm_weights_per_head = (q_width, k_width), config.qk_norm_weights_per_head
        self.norm_centred = config.layer_norm  # (Command R+'s: LayerNorms, as its model's norms)
        unweighted = config.qk_l2_norm and config.rope_layers[index]  # Llama 4's: its weights stay 1
        weights = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim) if self.norm_weights_per_head \
            else (q_width, k_width)
        self.q_norm = RMSNorm(weights[0], config.rms_norm_eps, dtype) if config.qk_norm or unweighted else None
        self.k_norm = RMSNorm(weights[1], config.rms_norm_eps, dtype) if config.qk_norm or unweighted else None
        self.norm_after_rotary = config.qk_norm_after_rotary
        self.interleaved_rotary = config.rotary_interleaved
        self.scale = config.query_scale or self.head_dim ** -0.5
        self.window = config.attention_windows[index]  # a sliding window (> 0) or attention chunks (< 0)
        self.softcap = config.attention_softcap
        self.temperature = config.temperature_layers[index]
        self.sinks = torch.nn.Parameter(torch.empty(self.num_heads), requires_grad=False) \
            if config.attention_sinks else None  # fp32, as the attention kernels read them
        self.output_gate = config.attention_output_gate
        self.k_cache = self.v_cache = torch.empty(0)
        self.prefix = prefix

    def forward(self, hidden: torch.Tensor, rope: Rope, attention: PagedAttention) -> torch.Tensor:
        lora = attention.context.lora
        qkv = project(self.qkv_proj, f"{self.prefix}.qkv_proj", hidden, lora)
        return project(self.o_proj, self.output_name, self.heads_output(qkv, rope, attention), lora)

    def heads_output(self, qkv: torch.Tensor, rope: Rope, attention: PagedAttention) -> torch.Tensor:
        """What o_proj reads, (T, heads * head_dim), from the step's fused projection qkv: the queries and keys
        normed and rotated, the keys and values written to the cache, the heads attended (and gated)."""
        gate = None
        if self.output_gate:  # (Qwen3.5) each head's rows of q_proj: its query, then its gate
            widths = [2 * self.num_heads * self.head_dim, 2 * self.num_kv_heads * self.head_dim]
            queries, keys_values = qkv.split(widths, dim=-1)
            queries, gate = queries.unflatten(-1, (self.num_heads, 2, self.head_dim)).unbind(-2)
            qkv = torch.cat([queries.flatten(1), keys_values], dim=-1)
        if self.q_norm is not None and not self.norm_after_rotary:
            self._norm_queries_keys(qkv[:, :self.num_heads * self.head_dim], qkv[:, self.num_heads * self.head_dim:])
        heads = (self.num_heads, self.num_kv_heads, self.head_dim)
        if (self.q_norm is None or not self.norm_after_rotary) and attention.rotate_and_write(
                qkv, *heads, *rope, self.interleaved_rotary, self.k_cache, self.v_cache):
            q = qkv[:, :self.num_heads * self.head_dim].view(-1, self.num_heads, self.head_dim)
        else:
            q, k, v = rotary_qkv(qkv, *heads, *rope, self.interleaved_rotary)
            if self.q_norm is not None and self.norm_after_rotary:  # Hunyuan
                self._norm_queries_keys(q.view(q.shape[0], -1), k.view(k.shape[0], -1))
            attention.write(k, v, self.k_cache, self.v_cache)
        out = attention.attend(q, self.k_cache, self.v_cache, self.scale, self.window, self.softcap, self.sinks,
                               self.temperature)
        if gate is not None and cpu_ops.usable(out, gate) and out.is_contiguous():  # the C step's own kernel
            cpu_ops.sigmoid_gate_(out, gate)
        elif gate is not None:
            out = out * torch.sigmoid(gate)
        return out.reshape(-1, self.num_heads * self.head_dim)

    def _norm_queries_keys(self, queries: torch.Tensor, keys: torch.Tensor) -> None:
        """q_norm and k_norm, in place, on rows (tokens, width) whose first heads are the queries' or keys'."""
        (q_heads, k_heads), (q_size, k_size) = self.norm_heads, self.norm_widths
        for rows, heads, size, norm in ((queries, q_heads, q_size, self.q_norm), (keys, k_heads, k_size, self.k_norm)):
            head_norm_(rows, heads, size, norm.weight, norm.eps, self.norm_weights_per_head, self.norm_centred)


class MLP(torch.nn.Module):
    """down(act(gate(x)) * up(x)), or without a gate (Nemotron-H) down(act(up(x))): gate_up_proj is up_proj alone."""

    def __init__(self, config: ModelConfig, prefix: str, make_linear: LinearFactory, width: int):
        """width: of what it reads and writes (the residual stream's, or a latent mixture's)."""
        super().__init__()
        inputs = ["up_proj"] if config.activation in UNGATED else ["gate_proj", "up_proj"]
        self.gate_up_proj = fitted(make_linear([f"{prefix}.{name}" for name in inputs]),
                                   "/".join(f"{prefix}.{name}" for name in inputs), in_features=width)
        self.down_proj = fitted(make_linear([f"{prefix}.down_proj"]), f"{prefix}.down_proj",
                                in_features=self.gate_up_proj.out_features // len(inputs), out_features=width)
        self.activation, self.swiglu = config.activation, (config.swiglu_alpha, config.swiglu_limit)
        self.prefix = prefix
        # Apertus's xIELU factors (layers.xielu), fp32: its alphas through their softplus, its beta and eps
        self.xielu = torch.nn.Parameter(torch.empty(4), requires_grad=False) if config.activation == "xielu" else None

    def forward(self, x: torch.Tensor, lora: LoRABatch | None) -> torch.Tensor:
        activated = None  # on CPU, SwiGLU is finished inside the product where it can be
        if lora is None and self.activation == "silu":
            activated = self.gate_up_proj.fused_swiglu(x)
        if self.xielu is not None:
            activated = xielu(project(self.gate_up_proj, f"{self.prefix}.gate_up_proj", x, lora), self.xielu)
        if activated is None:
            gate_up = project(self.gate_up_proj, f"{self.prefix}.gate_up_proj", x, lora)
            if lora is None:  # on CUDA, LCQ layers' kernels compute the activation as they load their inputs
                out = self.down_proj.gated_product(gate_up, self.activation)
                if out is not None:
                    return out
            activated = mlp_activation(gate_up, self.activation, *self.swiglu)
        return project(self.down_proj, f"{self.prefix}.down_proj", activated, lora)


def model_norm(config: ModelConfig, dtype: torch.dtype) -> RMSNorm:
    """A norm of the residual stream: an RMSNorm, or (Cohere, StableLM) a LayerNorm."""
    if config.layer_norm:
        return LayerNorm(config.hidden_size, config.rms_norm_eps, dtype, bias=config.norm_bias)
    return RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)


class MixtureOfExperts(torch.nn.Module):
    """A mixture of experts (Qwen3-MoE, Mixtral, OLMoE, Qwen2-MoE, gpt-oss, Llama 4, GLM-4.5): a full-precision
    router (gpt-oss's with a bias) scores the experts (route: softmax in fp32, or sigmoid), each token runs
    through its experts_per_token best (their weights renormalized to sum to 1 where norm_topk_prob:
    gpt-oss's softmax over the chosen scores), and their outputs are summed by those weights; Llama 4's
    weights scale the experts' inputs instead (expert_input_weights). With a shared expert (Qwen2-MoE,
    Llama 4, GLM-4.5), plus that one's output, times sigmoid(shared_expert_gate . x) where it has a gate
    (Qwen2-MoE). Nemotron-H's latent mixtures run the routed experts in a narrower width: their inputs through
    fc1_latent_proj, their sum through fc2_latent_proj. Each expert is an MLP of LCQ (or dense) layers (gated, or
    Nemotron-H's ungated); only the experts some
    token chose run, each over its tokens, or, once stack_experts() has stacked packed experts, all of
    them in one grouped product per matrix kind, routed on the device."""

    def __init__(self, config: ModelConfig, prefix: str, shared_prefix: str, make_linear: LinearFactory,
                 dtype: torch.dtype):
        """prefix: the mixture's module; shared_prefix: its shared expert's (where config has one)."""
        super().__init__()
        router_dtype = torch.float32 if config.router_in_fp32 else dtype
        self.router = torch.nn.Parameter(torch.empty(config.num_experts, config.hidden_size, dtype=router_dtype),
                                         requires_grad=False)
        self.router_bias = torch.nn.Parameter(torch.empty(config.num_experts, dtype=router_dtype),
                                              requires_grad=False) if config.router_bias else None
        self.correction = torch.nn.Parameter(torch.empty(config.num_experts, dtype=torch.float32),
                                             requires_grad=False) if config.router_correction else None
        self.sigmoid, self.groups, self.routed_scale = config.router_sigmoid, config.router_groups, config.routed_scale
        self.group_score_experts = config.group_score_experts
        # Nemotron-H's latent mixtures: the routed experts' inputs and outputs through these
        self.latent_in = make_linear([f"{prefix}.fc1_latent_proj"]) if config.expert_latent else None
        self.latent_out = make_linear([f"{prefix}.fc2_latent_proj"]) if config.expert_latent else None
        width = config.hidden_size if self.latent_in is None else self.latent_in.out_features
        self.experts = torch.nn.ModuleList(MLP(config, f"{prefix}.experts.{e}", make_linear, width)
                                           for e in range(config.num_experts))
        self.top_k, self.norm_topk_prob = config.experts_per_token, config.norm_topk_prob
        self.shared_expert = MLP(config, shared_prefix, make_linear, config.hidden_size) \
            if config.shared_expert else None
        gated_shared = config.shared_expert and config.shared_expert_gated
        self.shared_expert_gate = torch.nn.Parameter(torch.empty(1, config.hidden_size, dtype=dtype),
                                                     requires_grad=False) if gated_shared else None
        self.input_weights = config.expert_input_weights
        self.gate_up_experts: LCQExperts | None = None
        self.down_experts: LCQExperts | None = None
        self.activation, self.swiglu = config.activation, (config.swiglu_alpha, config.swiglu_limit)
        self._c_mixture = cpu_ops.BuiltOnce(self._build_c_mixture)

    def c_mixture(self) -> cpu_ops.Mixture | None:
        """This mixture for the C kernels (cpu_ops.mixture_step), where they run it: fp32 on CPU, every linear
        layer of its experts (the shared one's, the latent projections) keeping indices or an fp16 copy; built at
        its first call."""
        return self._c_mixture.get()

    def _build_c_mixture(self) -> tuple[cpu_ops.Mixture, list] | None:
        activations = cpu_ops.ACTIVATIONS + cpu_ops.UNGATED
        parameters = [self.router, self.router_bias, self.correction, self.shared_expert_gate]
        if self.activation not in activations or self.activation == "xielu" or not self.experts or \
                not cpu_ops.usable(*parameters) or not all(p is None or p.is_contiguous() for p in parameters):
            return None
        factors = swiglu_factors(self.activation, *self.swiglu)
        kept: list = [p for p in [*parameters, factors] if p is not None]  # what the struct's addresses point to
        tables = [cpu_ops.linear_table(linears) for linears in (
            [linear for expert in self.experts for linear in (expert.gate_up_proj, expert.down_proj)],
            [] if self.shared_expert is None else [self.shared_expert.gate_up_proj, self.shared_expert.down_proj],
            [] if self.latent_in is None else [self.latent_in, self.latent_out])]
        if any(t is None for t in tables):
            return None
        kept += [item for table, tensors in tables for item in (table, *tensors)]
        (experts, _), (shared, _), (latent, _) = tables
        parts = 1 if self.activation in UNGATED else 2
        mixture = cpu_ops.Mixture(
            num_experts=len(self.experts), top_k=self.top_k, hidden=self.router.shape[1],
            width=self.experts[0].gate_up_proj.out_features // parts,
            shared_width=0 if self.shared_expert is None else self.shared_expert.gate_up_proj.out_features // parts,
            activation=activations.index(self.activation), sigmoid=int(self.sigmoid),
            norm_topk_prob=int(self.norm_topk_prob), input_weights=int(self.input_weights),
            groups=self.groups[0] if self.groups else 0, kept_groups=self.groups[1] if self.groups else 0,
            group_score_experts=self.group_score_experts,
            latent=0 if self.latent_in is None else self.latent_in.out_features, routed_scale=self.routed_scale,
            router=self.router.data_ptr(), router_bias=_address(self.router_bias),
            correction=_address(self.correction), shared_gate=_address(self.shared_expert_gate),
            factors=_address(factors),
            experts=ctypes.addressof(experts),
            shared=ctypes.addressof(shared) if self.shared_expert is not None else None,
            latent_projections=ctypes.addressof(latent) if self.latent_in is not None else None)
        return mixture, kept

    def stack_experts(self) -> bool:
        """Stack the experts' packed gate/up and down matrices for the grouped product (kernels/experts.py),
        where every expert is an LCQ layer the kernels read as packed (no CPU cached weight): no host
        sync per layer and one launch per matrix kind, so that the mixture decodes in CUDA graphs."""
        layers = [(expert.gate_up_proj, expert.down_proj) for expert in self.experts]
        if not all(isinstance(linear, LCQLinear) and not linear.cache_dense for pair in layers for linear in pair):
            return False
        self.gate_up_experts = LCQExperts(PackedExperts.stack([gate_up.layer for gate_up, _ in layers]))
        self.down_experts = LCQExperts(PackedExperts.stack([down.layer for _, down in layers]))
        self.experts = torch.nn.ModuleList()
        return True

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's experts_per_token experts (T, k) and their weights, in x's dtype: the softmax (or
        sigmoid) of the router's scores, chosen by them, or (GLM-4.5, ERNIE 4.5) by them plus a learned bias,
        GLM-4.5's within the token's best groups of experts; renormalized where norm_topk_prob, times
        routed_scale."""
        scores = torch.nn.functional.linear(x.to(self.router.dtype), self.router, self.router_bias)
        probs = torch.sigmoid(scores.float()) if self.sigmoid else torch.softmax(scores, dim=-1, dtype=torch.float32)
        choice = probs if self.correction is None else probs + self.correction
        if self.sigmoid and self.correction is None:  # Llama 4 chooses by the scores themselves
            choice = scores
        if self.groups is not None:
            choice = _within_best_groups(choice, *self.groups, self.group_score_experts)
        chosen = choice.topk(self.top_k, dim=-1).indices
        weights = probs.gather(-1, chosen)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights * self.routed_scale).to(x.dtype), chosen

    def forward(self, x: torch.Tensor, lora: LoRABatch | None) -> torch.Tensor:
        if (mixture := self.c_mixture()) is not None and cpu_ops.usable(x):  # on CPU, in one C call
            return cpu_ops.mixture_step(mixture, x)
        weights, chosen = self.route(x)
        routed_in = x if self.latent_in is None else self.latent_in(x)
        out = self._grouped(routed_in, weights, chosen) if self.gate_up_experts is not None else \
            self._each_expert(routed_in, weights, chosen)
        if self.latent_out is not None:
            out = self.latent_out(out)
        if self.shared_expert is not None:
            shared = self.shared_expert(x, None)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(torch.nn.functional.linear(x, self.shared_expert_gate)) * shared
            out = out + shared
        return out

    def _each_expert(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """The chosen experts one at a time, each over the tokens that chose it (reading the choice on the
        host: the CPU path, and full-precision experts on a GPU); one token (decode at batch 1) takes its
        experts in turn without gathering or scattering rows."""
        out = torch.zeros_like(x)
        if x.shape[0] == 1:
            for slot, expert in enumerate(chosen[0].tolist()):
                out += self._expert(expert, x, weights[:, slot, None])
            return out
        for expert in chosen.unique().tolist():  # in increasing order, as transformers adds them
            rows, slots = (chosen == expert).nonzero(as_tuple=True)
            out.index_add_(0, rows, self._expert(expert, x[rows], weights[rows, slots, None]))
        return out

    def _expert(self, expert: int, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """One expert's output for rows x, by the router's weight (T, 1): on its output, or (Llama 4) its input."""
        if self.input_weights:
            return self.experts[expert](x * weight, None)
        return self.experts[expert](x, None) * weight

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Every token's chosen experts through the stacked experts: its input once per choice (gate/up),
        each choice's activation through the same expert's down, then the choices summed by weight."""
        if x.shape[0] == 0:
            return torch.zeros_like(x)
        routes = ExpertRoutes.of(chosen, self.gate_up_experts.experts.num_experts)
        if self.input_weights:  # each choice's own input: the token's scaled by its weight
            hidden = self.gate_up_experts((x.unsqueeze(1) * weights.unsqueeze(-1)).flatten(0, 1), routes, 1)
        else:
            hidden = self.gate_up_experts(x, routes, self.top_k)
        activated = mlp_activation(hidden, self.activation, *self.swiglu)
        down = self.down_experts(activated, routes, 1).view(*chosen.shape, -1)
        return down.sum(dim=1) if self.input_weights else (down * weights.unsqueeze(-1)).sum(dim=1)


def _address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _within_best_groups(choice: torch.Tensor, groups: int, kept: int, scored_by: int) -> torch.Tensor:
    """choice (T, experts) with every expert outside the token's `kept` best of `groups` equal groups at
    -inf, a group's score the sum of its `scored_by` best experts' (DeepSeek-V3's and GLM-4.5's routing: two;
    DeepSeek-V2's: one)."""
    grouped = choice.view(choice.shape[0], groups, -1)
    best = grouped.topk(scored_by, dim=-1).values.sum(dim=-1).topk(kept, dim=-1).indices
    keep = torch.zeros(grouped.shape[:2], dtype=torch.bool, device=choice.device).scatter_(1, best, True)
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(choice)


class DecoderLayer(torch.nn.Module):
    """Norms by role: before attention, before the MLP, and (Gemma, OLMo 2) on the attention and MLP outputs;
    OLMo 2 has only the latter, Cohere only the first (its attention and MLP read the same normed input).
    A Nemotron-H block is a layer of one part, a token mixer (self_attn) or an MLP, after one norm
    (attention_norm, the layer's input norm)."""

    def __init__(self, config: ModelConfig, index: int, make_linear: LinearFactory, dtype: torch.dtype,
                 prefix: str | None = None):
        """prefix: the layer's checkpoint names, where not model.layers.{index} (a multi-token-prediction layer's)."""
        super().__init__()
        prefix = prefix or f"model.layers.{index}"
        self.prefix = prefix

        def norm() -> RMSNorm:
            return model_norm(config, dtype)

        self.attention_norm = norm() if config.pre_norms else None
        self.self_attn = self.mlp = None  # (Nemotron-H: one of them)
        self.mixer_name: str | None = None  # the token mixer's checkpoint module
        if config.mixer_layers[index] and config.linear_layers[index]:  # a recurrent mixer: Qwen3.5's linear
            # attention, Granite 4.0-H's Mamba-2, LFM2's short convolution
            mixer = GatedDeltaNet if config.linear is not None else Mamba2 if config.mamba is not None else ShortConv
            self.mixer_name = config.mixer_name or mixer.CHECKPOINT_NAME
            self.self_attn = mixer(config, f"{prefix}.{self.mixer_name}", make_linear, dtype)
        elif config.mixer_layers[index]:
            attention = Attention if config.latent is None else LatentAttention
            self.mixer_name = config.mixer_name or "self_attn"
            self.self_attn = attention(config, f"{prefix}.{self.mixer_name}", make_linear, dtype, index)
        # Falcon-H1: Mamba-2 beside the attention, reading the same normed input
        self.mamba = Mamba2(config, f"{prefix}.{Mamba2.CHECKPOINT_NAME}", make_linear, dtype) \
            if config.parallel_mamba else None
        self.single_part = not (config.mixer_layers[index] and config.mlp_layers[index])
        self.mlp_norm = norm() if config.pre_norms and not config.parallel_block and not self.single_part else None
        mlp = f"{prefix}.{config.mlp_name}"
        shared = f"{prefix if config.shared_expert_in_layer else mlp}.{config.shared_expert_name}"
        if config.mlp_layers[index]:
            self.mlp = MixtureOfExperts(config, mlp, shared, make_linear, dtype) if config.moe_layers[index] else \
                MLP(config, mlp, make_linear, config.hidden_size)
        self.attention_output_norm = norm() if config.sandwich_norms else None
        self.mlp_output_norm = norm() if config.sandwich_norms else None

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, rope: Rope, attention: PagedAttention
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is carried beside the layer's output and added by the next norm:
        (mlp output, residual) here, their sum is the transformers layer's output."""
        if self.single_part:  # Nemotron-H: the block's norm, then its mixer or its MLP
            hidden, residual = self.attention_norm(hidden, residual)
            if self.mlp is None:
                return self.self_attn(hidden, rope, attention), residual
            return self.mlp(hidden, attention.context.lora), residual
        if self.attention_norm is None:  # OLMo 2: the stream itself goes into attention and the MLP
            stream = hidden if residual is None else residual + hidden
            stream = stream + self.attention_output_norm(self.self_attn(stream, rope, attention))[0]
            return self.mlp_output_norm(self.mlp(stream, attention.context.lora))[0], stream
        hidden, residual = self.attention_norm(hidden, residual)
        if self.mlp_norm is None:  # Cohere: attention and the MLP side by side on the same normed input
            return self.self_attn(hidden, rope, attention) + self.mlp(hidden, attention.context.lora), residual
        mixed = self.self_attn(hidden, rope, attention)
        hidden = mixed if self.mamba is None else mixed + self.mamba(hidden, rope, attention)
        if self.attention_output_norm is not None:
            hidden = self.attention_output_norm(hidden)[0]
        hidden, residual = self.mlp_norm(hidden, residual)
        hidden = self.mlp(hidden, attention.context.lora)
        if self.mlp_output_norm is not None:
            hidden = self.mlp_output_norm(hidden)[0]
        return hidden, residual

    def takes_stream(self, hidden: torch.Tensor) -> bool:
        """Whether the layer can run on the residual stream for hidden's rows (stream_forward): RMSNorms before its
        attention and its gated MLP, nothing else in its path, and four LCQ products that take the stream there
        (LCQLinear.takes_stream: on a GPU, a decode step of 1-2 rows)."""
        attn, mlp = self.self_attn, self.mlp
        if not (type(self.attention_norm) is RMSNorm and type(self.mlp_norm) is RMSNorm and type(attn) is Attention
                and type(mlp) is MLP and self.mamba is None and self.attention_output_norm is None
                and self.mlp_output_norm is None):
            return False
        products = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj)
        return all(isinstance(p, LCQLinear) and p.takes_stream(hidden) for p in products) and \
            isinstance(mlp.down_proj, LCQLinear) and mlp.down_proj.takes_stream(hidden, gated=mlp.activation)

    def stream_forward(self, stream: torch.Tensor, squares: torch.Tensor, first: bool, rope: Rope,
                       attention: PagedAttention) -> torch.Tensor:
        """forward on the residual stream itself (where takes_stream): the stream after the layer. Its norms are
        computed by the products that read them, from the rows' sums of squares in squares, which the products
        adding to the stream write (two norm kernels a layer fewer); first: the stream is the embeddings, whose
        sums nothing wrote, so the attention's norm runs as its own kernel."""
        attn, mlp, norm = self.self_attn, self.mlp, self.attention_norm
        qkv = attn.qkv_proj(norm(stream)[0]) if first else \
            attn.qkv_proj.normed_product(stream, norm.weight, norm.eps, squares)
        stream = attn.o_proj.residual_product(attn.heads_output(qkv, rope, attention), stream, squares)
        gate_up = mlp.gate_up_proj.normed_product(stream, self.mlp_norm.weight, self.mlp_norm.eps, squares)
        return mlp.down_proj.residual_product(gate_up, stream, squares, gated=mlp.activation)


class LlamaModel(torch.nn.Module):
    """Parameters are created uninitialised in `dtype` (the loader fills them), rotary tables in fp32; the
    embedding table and an untied head only as placeholders on the meta device, which the loader replaces
    whole with what it reads (on the device, Gemma 3 27B's fp32 table alone would take 5.6 GB never used).
    The embedding table may be kept in fp16 where that is exact (the loader): rows are converted to
    `dtype` as they are looked up."""

    def __init__(self, config: ModelConfig, make_linear: LinearFactory, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.dtype = dtype
        table_shape = (config.vocab_size, config.hidden_size)
        self.embed_tokens = torch.nn.Embedding(*table_shape, _freeze=True,
                                               _weight=torch.empty(table_shape, dtype=dtype, device="meta"))
        self.rotary = RotaryEmbedding(config.rotary_dim, config.max_position_embeddings, config.rope)
        self.rotary_local = None if config.rope_local is None else \
            RotaryEmbedding(config.rotary_dim, config.max_position_embeddings, config.rope_local)
        self.rotary_none = None if all(config.rope_layers) else \
            RotaryEmbedding(config.rotary_dim, config.max_position_embeddings, NO_ROTATION)
        self.layers = torch.nn.ModuleList(DecoderLayer(config, i, make_linear, dtype)
                                          for i in range(config.num_layers))
        self.norm = model_norm(config, dtype)
        self.block_size: int | None = None  # set by bind_kv_cache
        self.cache_dtype: torch.dtype | None = None  # the KV cache's (bind_kv_cache)
        self.lm_head = self.embed_tokens.weight if config.tie_word_embeddings else \
            torch.nn.Parameter(torch.empty(table_shape, dtype=dtype, device="meta"), requires_grad=False)
        self.lm_head_half: torch.Tensor | None = None  # an exact fp16 copy for CPU products, then lm_head is None
        self.packed_head: torch.nn.Module | None = None  # an LCQ layer (quantize --head-bits), then lm_head is None
        self.lm_head_panels: torch.Tensor | None = None  # its bf16 panels, where the engine keeps them
        self.lm_head_rows: torch.Tensor | None = None  # its int8 rows, where the engine keeps them
        self.cpu_decoder: CpuDecoder | None = None  # all layers of a CPU decode step in one call (bind_kv_cache)
        self.layer_groups: tuple[int, ...] = (0,) * config.num_layers  # each layer's group (bind_kv_cache)
        self.mtp: MultiTokenPredictor | None = None  # the multi-token-prediction layer, where it drafts (add_mtp)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        if self.block_size is None:
            raise RuntimeError("bind_kv_cache before the first forward pass")
        if self.cpu_decoder is not None and self.cpu_decoder.runs(context):
            return self.cpu_decoder(input_ids, positions, context, self.embed)
        hidden = self.embed(input_ids)
        tables = [self.layer_rotary(i) for i in range(len(self.layers))]
        distinct = {id(table): table for table in tables}
        ropes = {key: table(positions) for key, table in distinct.items()}  # each table's rows looked up once a step
        temperature = self.config.query_temperature
        scales = None if temperature is None else query_temperatures(positions, *temperature)
        attentions = [PagedAttention(context.group(g), self.block_size, hidden.device, hidden.dtype,
                                     self.cache_dtype, scales) for g in range(context.num_groups)]
        groups = self.layer_groups if len(attentions) > 1 else (0,) * len(self.layers)
        if context.lora is None and all(layer.takes_stream(hidden) for layer in self.layers):
            squares = stream_squares(hidden)  # a decode step of 1-2 rows on a GPU: each layer on the stream itself
            for index, (layer, table, group) in enumerate(zip(self.layers, tables, groups)):
                hidden = layer.stream_forward(hidden, squares, index == 0, ropes[id(table)], attentions[group])
            return self.norm(hidden)[0]
        residual = None
        for layer, table, group in zip(self.layers, tables, groups):
            hidden, residual = layer(hidden, residual, ropes[id(table)], attentions[group])
        return self.norm(hidden, residual)[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The tokens' embeddings in the model dtype, scaled where the model scales them (Gemma)."""
        hidden = self.embed_tokens(input_ids).to(self.dtype)
        if self.config.embed_scale != 1.0:  # rounded to the model dtype first, as transformers does
            hidden = hidden * torch.tensor(self.config.embed_scale, dtype=self.dtype)
        return hidden

    def add_mtp(self, make_linear: LinearFactory) -> None:
        """Build the checkpoint's multi-token-prediction layer (config.mtp), to be loaded and given a KV cache."""
        names, layer_config = self.config.mtp, self.config.mtp_layer_config()
        layer = DecoderLayer(layer_config, 0, make_linear, self.dtype, prefix=names.layer)
        self.mtp = MultiTokenPredictor(names, make_linear, layer, lambda: model_norm(self.config, self.dtype))

    @torch.inference_mode()
    def predict_next(self, input_ids: torch.Tensor, previous: torch.Tensor, positions: torch.Tensor,
                     context: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The multi-token-prediction layer over rows of (the token after each position, the hidden state at it):
        (the hidden states a next draft reads, the logits of the token after next). context: one layer group,
        the full-attention blocks' table."""
        embeddings = self.embed(input_ids)
        attention = PagedAttention(context.group(0), self.block_size, embeddings.device, embeddings.dtype,
                                   self.cache_dtype, None)
        chained, normed = self.mtp(embeddings, previous.to(self.dtype), positions, self.rotary(positions), attention)
        return chained, self.compute_logits(normed)

    @property
    def graph_capturable(self) -> bool:
        """Whether a step runs without reading device values back to the host, as a CUDA graph replays it:
        not where a mixture runs its experts one at a time (it asks which ones were chosen)."""
        return all(not isinstance(layer.mlp, MixtureOfExperts) or layer.mlp.gate_up_experts is not None
                   for layer in self.layers)

    def fit_rotary(self, context: int) -> None:
        """Rotary tables for the context an engine serves (LongRoPE picks its factors by it), in place."""
        for table in (self.rotary, self.rotary_local):
            if table is not None:
                table.fit(context)

    def layer_rotary(self, index: int) -> RotaryEmbedding:
        """The rotary table layer `index` applies: the identity for a NoPE layer, a sliding-window layer's own
        where the model has one (Gemma 3), else the model's."""
        if not self.config.rope_layers[index]:
            return self.rotary_none
        if self.config.attention_windows[index] and self.rotary_local is not None:
            return self.rotary_local
        return self.rotary

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed_head is not None:
            logits = self.packed_head(hidden).float()
        else:
            logits = dense_linear(hidden, self.lm_head, half=self.lm_head_half, panels=self.lm_head_panels,
                                  byte_rows=self.lm_head_rows).float()
        cap = self.config.logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def bind_kv_cache(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                      layer_groups: tuple[int, ...] | None = None) -> None:
        """One pair of kv_cache_shape per layer with a KV cache (config.cache_layers; layers of different
        groups may share one; a latent attention's V cache is its K cache: config.values_in_keys);
        layer_groups: each such layer's group, whose block tables it reads when a step's context has
        several (KVGroups)."""
        cached = self.config.cache_layers
        if len(k_caches) != len(cached) or len(v_caches) != len(cached):
            raise ValueError(f"need {len(cached)} K and V caches, got {len(k_caches)} and {len(v_caches)}")
        groups = dict(zip(cached, layer_groups or [0] * len(cached)))
        self.layer_groups = tuple(groups.get(i, 0) for i in range(len(self.layers)))
        for index, k, v in zip(cached, k_caches, v_caches):
            self.layers[index].self_attn.k_cache, self.layers[index].self_attn.v_cache = k, v
        self.block_size, self.cache_dtype = k_caches[0].shape[1], k_caches[0].dtype
        self.cpu_decoder = CpuDecoder.build(self)

    def kv_cache_shape(self, num_blocks: int, block_size: int, dtype: torch.dtype) -> tuple[int, ...]:
        """The shape of one layer's K (or V) cache: (num_blocks, block_size, num_kv_heads, head_dim), and
        for an int8 cache each head row's scale after its values (cpu_ops.cache_shape)."""
        return cpu_ops.cache_shape(num_blocks, block_size, self.config.num_kv_heads, self.config.head_dim, dtype)

    def kv_cache_bytes_per_block(self, block_size: int, dtype: torch.dtype, layers: int | None = None) -> int:
        """K and V bytes of one block in `layers` layers (default: all with a KV cache); K only where values are
        the keys' rows."""
        elements = math.prod(self.kv_cache_shape(1, block_size, dtype))
        tensors = 1 if self.config.values_in_keys else 2
        layers = layers or len(self.config.cache_layers)
        return tensors * layers * elements * torch.empty(0, dtype=dtype).element_size()

    def recurrent_mixers(self) -> list[RecurrentMixer]:
        """The token mixers that keep a state per sequence: recurrent layers', and Falcon-H1's beside attention."""
        return [mixer for layer in self.layers for mixer in (layer.self_attn, layer.mamba)
                if isinstance(mixer, RecurrentMixer)]

    def state_bytes(self, slots: int, dtype: torch.dtype = torch.float32) -> int:
        """What bind_states(slots, dtype) will allocate, so that it can be refused before it is."""
        return sum(mixer.state_bytes(slots, dtype) for mixer in self.recurrent_mixers())

    def bind_states(self, slots: int, dtype: torch.dtype = torch.float32) -> int:
        """State tensors of `slots` sequences in every recurrent mixer, the recurrent states in `dtype`; returns
        their bytes. (The C decode step, which reads the states, is built again where the KV caches are bound.)"""
        nbytes = sum(mixer.bind_states(slots, self.norm.weight.device, dtype) for mixer in self.recurrent_mixers())
        if self.block_size is not None:
            self.cpu_decoder = CpuDecoder.build(self)
        return nbytes

    def keep_states(self, kept: dict[int, int], passed: dict[int, tuple[int, int]] | None = None) -> None:
        """Every recurrent mixer's states of each slot in `kept` after its first kept[slot] tokens of the last
        step, and those at the block ends `passed` names (RecurrentMixer.keep_states)."""
        for mixer in self.recurrent_mixers():
            mixer.keep_states(kept, passed)

    def copy_states(self, source: int | None, target: int) -> None:
        """Every recurrent mixer's states of slot `source` (None: zeros) copied into slot `target`."""
        for mixer in self.recurrent_mixers():
            mixer.copy_state(source, target)
