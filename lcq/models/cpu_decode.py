"""A decode step of every decoder layer in one C call, for any number of sequences on a CPU.

What CUDA graphs do on a GPU: at batch 1 a small model's matrix products take about half of a
CPU decode step, and the rest was Python calling a dozen operations per layer. The C loop
(lcq_decode_layers in lcq/kernels/cpu_decode_step.c) runs the same kernels in the same order as the
Python layers on this path (fp16 weight copies, the C norms, rotary, activations, cache writes and
attention), so both give the same numbers; the Python layers remain the path for prefill, GPUs and any
model this one cannot take. Gemma's differences are entries of the layer table (norms of the
attention and MLP outputs, each layer's rotary table) and two switches (GeGLU, Gemma 2's score cap);
OLMo 2 and EXAONE 4 leave their input norms out (NULL entries: the stream itself goes in), and OLMo 2
has a switch for q/k norms over whole projections; Cohere's and StableLM's LayerNorms (their biases as entries too)
and parallel blocks (attention and MLP side by side on one norm's output) are two more switches. Hybrids'
recurrent mixers (Mamba-2, Qwen3.5's gated delta rule, LFM2's short convolution) are a layer's entries too, run
by the function their Python decode step calls (cpu_ops.recurrent_step), alone, beside attention (Falcon-H1), or
as a block of one part (Nemotron-H, whose MLP blocks have no mixer and whose mixer blocks no MLP); Qwen3.5's
attention gates its output and turns part of each head. A mixture of experts is the function the Python layers
call on CPU (cpu_ops.mixture_step). Steps with LoRA adapters pass the adapter stack's matrices (a second table,
built once per stack) and each row's slot; the C step adds each row's adapter product after each fused product,
as LoRABatch.add does (the attention's and dense MLPs' products: the only ones adapters reach).
"""
from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from lcq.kernels import cpu_ops

from .context import ForwardContext
from .latent_attention import LatentAttention
from .layers import query_temperatures, swiglu_factors
from .lora import FUSED, AdapterStack, fused_place
from .recurrent import RecurrentMixer


class CpuDecoder:
    """The pointer table of a model's layers (weights, norms, KV caches), built once after the caches
    are bound; `runs` says whether a step can take it. It keeps no reference to the model (the model
    holds it), so a dropped engine's weights are freed at once, not by a later garbage collection."""

    def __init__(self, model: torch.nn.Module, entries: list[torch.Tensor | int | None]):
        """entries: the table in lcq_decode_layers' order: tensors (their addresses), weight kinds, recurrent mixers
        and mixtures of experts (cpu_ops.RecurrentLayer, cpu_ops.Mixture: their addresses), addresses (the layers
        keep what they point to), sliding windows and layer groups (ints), or None."""
        c = model.config
        attention = next((layer.self_attn for layer in model.layers if layer.self_attn is not None and
                          not isinstance(layer.self_attn, RecurrentMixer)), None)  # (or a latent attention)
        self.num_layers, self.eps = len(model.layers), model.norm.eps
        self.whole_qk_norms, self.qk_norms_after_rotary = int(not c.qk_norm_per_head), int(c.qk_norm_after_rotary)
        self.interleaved_rotary, self.rotated, self.output_gate = \
            int(c.rotary_interleaved), c.rotary_dim, int(c.attention_output_gate)
        self.layer_norms, self.parallel_blocks = int(c.layer_norm), int(c.parallel_block)
        self.per_head_qk_weights = int(c.qk_norm_weights_per_head)
        self.num_groups = max(model.layer_groups) + 1
        self.query_temperature = c.query_temperature if any(c.temperature_layers) else None
        self.block_size = model.block_size
        self.scale = attention.scale if attention is not None else 1.0
        self.softcap = getattr(attention, "softcap", 0.0)
        self.activation = (cpu_ops.ACTIVATIONS + cpu_ops.UNGATED).index(c.activation)
        self.table_positions = model.rotary.cos.shape[0]
        self.cache_form = cpu_ops.cache_form(attention.k_cache, attention.v_cache) if attention is not None else 0
        self.tensors = [e for e in entries if isinstance(e, torch.Tensor)]  # kept alive: the table holds addresses
        self.table = (ctypes.c_void_p * len(entries))(
            *[e.data_ptr() if isinstance(e, torch.Tensor) else ctypes.addressof(e)
              if isinstance(e, ctypes.Structure) else e for e in entries])
        self.structures = [e for e in entries if isinstance(e, ctypes.Structure)]  # kept alive as the tensors
        self.sizes = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size)
        mixers = model.recurrent_mixers()
        self.recurrent_widths = (mixers[0].in_width(), mixers[0].out_width()) if mixers else (0, 0)
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.work_per_row = 3 * c.hidden_size + 2 * q + 2 * kv + 3 * c.intermediate_size + sum(self.recurrent_widths) \
            + 2 * q * self.output_gate
        self.adapter_tables: dict[int, tuple[AdapterStack, ctypes.Array]] = {}  # id(stack) -> its matrices' table
        # The step looks tokens up itself in an fp16 or fp32 table (others, a packed one, take `embed`) and ends with
        # the final norm: torch's lookup and the norm's Python call took ~170 us of a ~5 ms batch-1 token.
        table = getattr(model.embed_tokens, "weight", None)
        self.embeddings = table if isinstance(model.embed_tokens, torch.nn.Embedding) and table.is_contiguous() and \
            table.dtype in (torch.float16, torch.float32) else None
        self.embed_scale = c.embed_scale
        self.final_norm = (model.norm.weight, getattr(model.norm, "bias", None))

    @classmethod
    def build(cls, model: torch.nn.Module) -> CpuDecoder | None:
        """None unless the model is fp32 on CPU, the C kernels run here, every linear layer keeps a
        weight the C step reads (indices or an fp16 copy: LCQ layers on CPU; full-precision ones read
        from fp16 files) and every recurrent mixer's states are fp32."""
        c = model.config
        if model.dtype != torch.float32 or not model.norm.weight.is_cpu:
            return None
        if c.activation not in cpu_ops.ACTIVATIONS + cpu_ops.UNGATED or not cpu_ops.usable():
            return None
        entries: list[torch.Tensor | int | ctypes.Structure | None] = []
        for index, layer in enumerate(model.layers):
            latent_attention = layer.self_attn if isinstance(layer.self_attn, LatentAttention) else None
            attention = layer.self_attn if not isinstance(layer.self_attn, (RecurrentMixer, LatentAttention)) else None
            mixer = layer.self_attn if isinstance(layer.self_attn, RecurrentMixer) else layer.mamba
            recurrent = None if mixer is None else mixer.c_layer()
            latent = None if latent_attention is None else latent_attention.c_layer()
            cached = attention if attention is not None else latent_attention  # the layer's KV caches, if any
            mixture = layer.mlp.c_mixture() if hasattr(layer.mlp, "c_mixture") else None
            mlp = None if hasattr(layer.mlp, "c_mixture") else layer.mlp
            if (mixer is not None and recurrent is None) or (latent_attention is not None and latent is None) or \
                    (mlp is None and layer.mlp is not None and mixture is None) or \
                    (cached is not None and cached.k_cache.dtype not in cpu_ops.CACHE_DTYPES):
                return None
            linears = []  # (kind, address, bias) of each linear layer, placeholders for the parts the layer lacks
            for part, names in ((attention, ("qkv_proj", "o_proj")), (mixer, ("in_proj", "out_proj")),
                                (mlp, ("gate_up_proj", "down_proj"))):
                for name in names:
                    weight = (cpu_ops.HALF_WEIGHT, None, None) if part is None else getattr(part, name).decode_weights()
                    if weight is None:
                        return None
                    linears.append(list(weight))
            if latent_attention is not None:  # its output projection in the attention's place
                linears[1] = latent_attention.o_proj.decode_weights()
                if linears[1] is None:
                    return None
            qkv, o, in_proj, out_proj, gate_up, down = linears
            head_norms = [None, None] if attention is None or attention.q_norm is None else \
                [attention.q_norm.weight, attention.k_norm.weight]
            rotary = model.layer_rotary(index)
            output_norms = [None if norm is None else norm.weight
                            for norm in (layer.attention_output_norm, layer.mlp_output_norm)]
            input_norms = [[None, None] if norm is None else [norm.weight, getattr(norm, "bias", None)]
                           for norm in (layer.attention_norm, layer.mlp_norm)]  # (weight, bias: StableLM's)
            caches = [cached.k_cache, cached.v_cache, cached.window] if cached is not None else [None, None, 0]
            entries += [*input_norms[0], *qkv, *head_norms, rotary.cos, rotary.sin, *o, recurrent, *in_proj,
                        *out_proj, output_norms[0], *input_norms[1], *gate_up, *down, output_norms[1],
                        _factors(mlp), mixture, *caches, model.layer_groups[index],
                        None if attention is None else attention.sinks, latent, int(c.temperature_layers[index])]
        if not all(e.is_contiguous() and e.is_cpu for e in entries if isinstance(e, torch.Tensor)):
            return None
        return cls(model, entries)

    def runs(self, context: ForwardContext) -> bool:
        """A decode step whose context has the block tables of every layer group (and whose adapters, if
        any, are those of the layers they touch: a CUDA graph's every_layer is not for this step)."""
        return not context.is_prefill and context.num_seqs >= 1 and cpu_ops.ENABLED and not context.drafting_slots \
            and (context.lora is None or not context.lora.every_layer) and \
            context.num_groups == self.num_groups

    def _adapter_table(self, stack: AdapterStack) -> ctypes.Array:
        """The stack's A and B's transpose of every fused layer, layer by layer in FUSED's order, NULL where a
        layer has none (a mixture's, a recurrent mixer's, DeepSeek's attention: the stack's active entry is 0
        there); the stack keeps them, in place, for the engine's life."""
        if id(stack) not in self.adapter_tables:
            pointers: list[int | None] = [None] * (self.num_layers * len(FUSED) * 2)
            for name, (a, _, _) in stack.layers.items():
                if not (a.is_contiguous() and a.dtype == torch.float32 and stack.b_rows[name].is_contiguous()):
                    raise ValueError("the C decode step takes an fp32 adapter stack on CPU")
                layer, kind = fused_place(name)
                place = (layer * len(FUSED) + kind) * 2
                pointers[place:place + 2] = a.data_ptr(), stack.b_rows[name].data_ptr()
            table = (ctypes.c_void_p * len(pointers))(*pointers)
            self.adapter_tables[id(stack)] = (stack, table)
        return self.adapter_tables[id(stack)][1]

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, context: ForwardContext,
                 embed: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Tokens (rows,) at positions (rows,) -> the final norm of the residual stream after the last layer.
        embed: the model's lookup (scaled), for tables the step does not read itself. Each layer reads its
        rotary table's rows itself (no per-step lookup)."""
        rows, hidden = input_ids.shape[0], self.sizes[0]
        if self.embeddings is None:
            token_ids, x = None, embed(input_ids).contiguous()  # the lookup's own tensor: updated in place
        else:
            token_ids, x = input_ids.to(torch.int64).contiguous(), torch.empty(rows, hidden)
        out = torch.empty(rows, hidden)
        positions = positions.to(torch.int64).contiguous()
        tables, lengths = context.block_tables.contiguous(), context.context_lens.contiguous()
        slots = context.slot_mapping.contiguous()
        work = torch.empty(rows * self.work_per_row)
        scales = None if self.query_temperature is None else \
            query_temperatures(positions, *self.query_temperature).contiguous()  # kept alive through the call
        scales_at = None if scales is None else scales.data_ptr()
        _, heads, kv_heads, head_dim, intermediate = self.sizes
        table = self.embeddings
        final_weight, final_bias = self.final_norm
        lora = context.lora
        adapters = (None, None, None, 0, 0) if lora is None else (
            self._adapter_table(lora.stack), lora.stack.active.data_ptr(), lora.slots.contiguous(), lora.stack.slots,
            lora.stack.rank)
        row_slots = adapters[2]  # kept alive through the call
        state_slots = None if context.state_slots is None else context.state_slots.to(torch.int64).contiguous()
        status = cpu_ops.library().lcq_decode_layers(
            self.table, self.num_layers, None if token_ids is None else token_ids.data_ptr(),
            None if table is None else table.data_ptr(), 0 if table is None else table.shape[0],
            int(table is not None and table.dtype == torch.float16), self.embed_scale, x.data_ptr(),
            final_weight.data_ptr(), None if final_bias is None else final_bias.data_ptr(), out.data_ptr(), rows,
            hidden, heads, kv_heads, head_dim, intermediate,
            self.eps, positions.data_ptr(), self.table_positions, slots.data_ptr(), tables.data_ptr(), tables.shape[-1],
            lengths.data_ptr(), self.block_size, self.scale, self.softcap, scales_at, self.whole_qk_norms,
            self.qk_norms_after_rotary, self.interleaved_rotary, self.rotated, self.output_gate, self.layer_norms,
            self.parallel_blocks, self.per_head_qk_weights, self.activation,
            self.cache_form, None if state_slots is None else state_slots.data_ptr(), *self.recurrent_widths,
            work.data_ptr(), adapters[0], adapters[1],
            None if row_slots is None else row_slots.data_ptr(), adapters[3], adapters[4])
        if status == -2:
            raise IndexError(f"a position past the rotary tables' {self.table_positions}")
        if status == -4:
            raise IndexError(f"a token id outside the embedding table's {table.shape[0]} rows")
        cpu_ops.check_blocks(status, "the C decode step")
        if status != 0:
            raise MemoryError("the C decode step could not allocate its attention buffers")
        return out


def _factors(mlp: torch.nn.Module | None) -> torch.Tensor | None:
    """A dense MLP's activation factors for the C step: xIELU's (loaded), the clamped SwiGLU's, or None."""
    if mlp is None or mlp.xielu is not None:
        return None if mlp is None else mlp.xielu
    return swiglu_factors(mlp.activation, *mlp.swiglu)
