"""Runs the model for a scheduled step: owns the model and the KV cache pool, builds the
flattened batch and its ForwardContext, and returns the logits of the rows to sample.
On CUDA, decode steps replay captured graphs (see cuda_graphs.py)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from lcq.errors import UserError
from lcq.kernels import cpu_ops
from lcq.kernels.cpu_half import byte_rows, pair_panel_bytes, pair_panels
from lcq.kernels.cpu_matmul import ROUNDED_MIN_ROWS, amx_active, cpu_products, products_available, shuffles_only
from lcq.kernels.linear import LCQLinear
from lcq.models import ForwardContext, load_model
from lcq.models.lora import AdapterStack, LoRABatch, load_adapter

from .adapters import AdapterRegistry
from .block_manager import BlockManager
from .config import EngineConfig, context_limit
from .cuda_graphs import DecodeGraphs
from .host_memory import available_memory_bytes, keep_freed_memory, return_freed_memory, zeroed_pages
from .kv_groups import KVGroups
from .sequence import Sequence
from .step_inputs import StepInputs, host_tensor, to_device

logger = logging.getLogger("lcq.engine")

DEFAULT_MAX_LORA_RANK = 16  # vLLM's default --max-lora-rank
GPU_ACTIVATION_RESERVE_BYTES = 1 << 30  # headroom for activations and logits beside weights and KV cache
PROMPT_LOGPROB_ROWS = 128  # rows of full-vocabulary logits at a time for prompt logprobs (25 MB at 49k)
PRODUCTS_LOGGED = {torch.bfloat16: "bf16 operands from 3-10 rows",  # cpu_matmul.cpu_products
                   torch.int8: "int8 operands for LCQ layers (decode products from 1 row where they keep int8 "
                               "books, blocked ones from 10) and the head's of 1-4 rows, else bf16 from 3"}
SHUFFLES_LOGGED = ("int8 operands in the decode products of LCQ layers at 2 and 4 bits (AVX2 shuffles) and the head's "
                   "of 1-4 rows, else fp32")
AMX_LOGGED = "; on AMX tiles: int8 from 16 rows, bf16 from 5 (kept panels) or 10, prefill attention"


@dataclass
class PromptLogprobs:
    """Prompt tokens first .. first + n - 1 of seq: each one's logprob and rank (n,), and the k best (n, k)."""
    seq: Sequence
    first: int
    logprobs: torch.Tensor
    top_values: torch.Tensor
    top_ids: torch.Tensor
    ranks: torch.Tensor  # 1 + how many tokens were likelier (vLLM's rank)


class _Prefixed(logging.LoggerAdapter):
    """The engine's logger, each line beginning with the role of the model it is about."""

    def __init__(self, prefix: str):
        super().__init__(logger, {})
        self.prefix = prefix

    def process(self, msg, kwargs):
        return self.prefix + msg, kwargs


class ModelRunner:
    def __init__(self, config: EngineConfig, num_blocks: int | None = None, draft_block_bytes: int = 0,
                 draft_weight_bytes: int = 0, role: str = ""):
        """num_blocks: the pool's size where another runner set it (a draft model's runner takes its
        target's: it reads the target's block tables). draft_block_bytes, draft_weight_bytes: a draft
        model's K/V per block and its weights, which sizing the pool leaves room for. role: what its log
        lines begin with ("draft model: "), where the engine runs two models."""
        self.log = _Prefixed(role)
        self.device = config.resolved_device()
        self.dtype = config.resolved_dtype()
        self.block_size = config.block_size
        on_cuda = self.device.type == "cuda"
        if not on_cuda:
            keep_freed_memory()  # each prefill step's activations are reused, not faulted in afresh
        before = torch.cuda.memory_allocated(self.device) if on_cuda else 0
        drafts_by_mtp = config.speculative_method == "mtp"
        self.model, self.model_config = load_model(config.model, self.device, self.dtype, keep_packed=False,
                                                   mtp=drafts_by_mtp)
        if not on_cuda:
            return_freed_memory()  # the packed tensors the CPU layers dropped
        self.adapters = self._load_adapters(config)
        self.weight_bytes = torch.cuda.memory_allocated(self.device) - before if on_cuda else 0
        kv_dtype = config.resolved_kv_cache_dtype()
        self.products = config.resolved_cpu_matmul_dtype()
        self.batch_invariant = config.batch_invariant
        if self.batch_invariant:
            self._check_batch_invariant()
        self.int8_weight_bytes = self._keep_int8_weights(config)
        self.int8_book_bytes = self._keep_int8_books()
        self.head_panel_bytes = self._keep_head_panels()
        self.head_row_bytes = self._keep_head_rows()
        c = self.model_config
        windows = [c.attention_windows[i] for i in c.cache_layers]
        self.kv_groups = KVGroups.of(windows if config.hybrid_kv_cache else [0] * len(windows))
        if drafts_by_mtp and 0 not in self.kv_groups.windows:
            raise UserError("the multi-token-prediction layer attends over the blocks of the model's full-attention "
                            "layers, and every layer of this model slides over a window")
        # (the multi-token-prediction layer's K/V, one more layer, in every block)
        bytes_per_block = self.model.kv_cache_bytes_per_block(self.block_size, kv_dtype,
                                                              self.kv_groups.width + drafts_by_mtp)
        # recurrent layers' states: a slot per sequence that may run at once, a scratch one for the CUDA
        # graphs' padding rows, and those that keep prefixes' states for prefix caching (none for other models)
        self.state_slots = config.max_num_seqs if c.recurrent else 0
        kept = config.state_snapshots if self.state_slots and config.enable_prefix_caching else 0
        self.snapshot_slots = range(self.state_slots + 1, self.state_slots + 1 + kept)
        # (counted before they are allocated: too many states were a kill at load, not the refusal below)
        self.state_bytes = self.model.state_bytes(self.snapshot_slots.stop, config.resolved_state_dtype()) \
            if self.state_slots else 0
        room = self._kv_budget(config) - self.state_bytes - draft_weight_bytes * on_cuda
        if self.state_bytes and room < 2 * bytes_per_block and num_blocks is None:
            raise UserError(f"recurrent layers' states of {self.state_slots} sequences (max_num_seqs) and {kept} "
                            f"prefixes (state_snapshots) take {self.state_bytes / 2**30:.2f} GiB, more than the KV "
                            "cache's memory allows: lower max_num_seqs or state_snapshots, or give the cache more "
                            "memory")
        self.num_blocks = num_blocks or self._pool_blocks(config, room, bytes_per_block + draft_block_bytes)
        # with a draft model, its pool and (on CPU, loaded after this) its weights too: each pool checked alone, the
        # two could together take more than there is
        self._check_host_memory(self.num_blocks * (bytes_per_block + draft_block_bytes)
                                + draft_weight_bytes * (not on_cuda), self.state_bytes)
        if self.state_slots:
            self.model.bind_states(self.snapshot_slots.stop, config.resolved_state_dtype())
        shape = self.model.kv_cache_shape(self.num_blocks, self.block_size, kv_dtype)
        k_tensors = [self._zeros(shape, kv_dtype) for _ in range(self.kv_groups.width)]
        # a latent attention reads its values from its K cache
        v_tensors = k_tensors if c.values_in_keys else [self._zeros(shape, kv_dtype) for _ in k_tensors]
        self.k_caches = [k_tensors[j] for j in self.kv_groups.layer_tensor]  # one per layer, shared across groups
        self.v_caches = [v_tensors[j] for j in self.kv_groups.layer_tensor]
        self.model.bind_kv_cache(self.k_caches, self.v_caches, self.kv_groups.layer_group)
        self.last_hidden: torch.Tensor | None = None  # the last step's final hidden states, where the layer drafts
        if drafts_by_mtp:
            attention = self.model.mtp.layer.self_attn
            attention.k_cache = self._zeros(shape, kv_dtype)
            attention.v_cache = attention.k_cache if c.values_in_keys else self._zeros(shape, kv_dtype)
        self.kv_cache_bytes = self.num_blocks * bytes_per_block
        self.max_model_len = self._longest_sequence(config)
        self.model.fit_rotary(self.max_model_len)
        self.log.info("KV cache: %d blocks of %d tokens (%d tokens, %s, %.2f GiB), %d layer groups of %d layers; "
                      "context %d tokens; products: %s", self.num_blocks, self.block_size,
                      self.num_blocks * self.block_size, str(kv_dtype).removeprefix("torch."),
                      self.kv_cache_bytes / 2**30, self.kv_groups.num_groups, self.kv_groups.width, self.max_model_len,
                      (SHUFFLES_LOGGED if self.products == torch.int8 and shuffles_only() else
                       PRODUCTS_LOGGED.get(self.products, str(self.dtype).removeprefix("torch."))) +
                      (AMX_LOGGED if self.device.type == "cpu" and self.products != torch.float32 and amx_active()
                       else ""))
        self.graphs = None
        if self.device.type == "cuda" and config.cuda_graphs and not self.model.graph_capturable:
            self.log.info("decoding eagerly: this mixture of experts runs its full-precision experts one at a "
                          "time, as chosen each step, which a CUDA graph would replay as captured")
        elif self.device.type == "cuda" and config.cuda_graphs:
            try:
                self.graphs = DecodeGraphs(self.model, config.max_num_seqs,
                                           -(-self.max_model_len // self.block_size), self.block_size, self.device,
                                           self.adapters.stack, self.kv_groups.num_groups,
                                           self.state_slots if self.state_slots else None, config.cuda_graph_sizes)
            except RuntimeError:  # a model that cannot be captured still runs, eagerly
                self.log.warning("CUDA graph capture failed; decoding eagerly", exc_info=True)

    def _check_host_memory(self, cache_bytes: int, state_bytes: int = 0) -> None:
        """A CPU pool takes its memory as its blocks are first used (zeroed_pages): one larger than the memory
        left would be killed mid-request, so it is refused at start, and with it recurrent layers' states,
        allocated (and zeroed) at once after this."""
        available = available_memory_bytes() if self.device.type == "cpu" else None
        if available is not None and cache_bytes + state_bytes > available:
            states = f" and the recurrent states' {state_bytes / 2**30:.2f} GiB (max_num_seqs, state_snapshots)" \
                if state_bytes else ""
            raise UserError(f"the KV cache's {cache_bytes / 2**30:.2f} GiB (kv_cache_memory_gb){states} are more "
                            f"than the {available / 2**30:.2f} GiB of memory left after loading the model: lower "
                            "kv_cache_memory_gb" + (", max_num_seqs or state_snapshots" if state_bytes else ""))

    def _zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A cache tensor of zeros: on CPU on pages zeroed as they are first used (host_memory.zeroed_pages)."""
        if self.device.type == "cpu":
            return zeroed_pages(shape, dtype)
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def _load_adapters(self, config: EngineConfig) -> AdapterRegistry:
        """The adapter slots (none without adapters or runtime updating), holding lora_modules' adapters."""
        start = {name: load_adapter(folder, self.model_config, config.max_lora_rank)
                 for name, folder in config.lora_adapters().items()}
        slots = config.resolved_max_loras()
        # Fixed adapters need no room beyond their own ranks: a slot's width is what every step pays for.
        ranks = [adapter.rank for adapter in start.values()]
        room = [DEFAULT_MAX_LORA_RANK] if config.allow_runtime_lora_updating or not ranks else []
        rank = config.max_lora_rank or max(ranks + room)
        stack = AdapterStack(self.model_config, slots, rank, self.device, self.dtype) if slots else None
        registry = AdapterRegistry(stack, self.model_config, config.model_names(), config.resolved_max_cpu_loras())
        for name, adapter in start.items():
            registry.load(name, adapter)
        if stack is not None:
            self.log.info("LoRA: %d adapter slots of rank %d", slots, rank)
        return registry

    def _keep_int8_weights(self, config: EngineConfig) -> int:
        """LCQ layers keep their int8 form where the config says so (EngineConfig.keeps_int8_weights);
        returns the bytes kept, before the KV pool is sized."""
        layers = [m for m in self.model.modules() if isinstance(m, LCQLinear)]
        size = sum(layer.byte_rows_nbytes for layer in layers)
        if not size:
            if config.cpu_int8_weights == "on" and config.keeps_int8_weights(0, None):
                self.log.warning("cpu_int8_weights on: no layer has an int8 form to keep (no LCQ layers, or they "
                                 "keep fp16 copies: LCQ_CPU_INDEX=0)")
            return 0
        if not config.keeps_int8_weights(size, available_memory_bytes()):
            return 0
        kept = sum(layer.keep_byte_rows() for layer in layers)
        self.log.info("LCQ layers keep their int8 form (%.0f MiB), which their blocked products read instead of "
                      "expanding indices", kept / 2**20)
        return kept

    def _keep_int8_books(self) -> int:
        """With int8 products, LCQ layers keep their codebooks in bytes (LCQLinear.keep_books: 4 + 2^b bytes
        a group, a tenth to a half of their indices' bytes), from which their decode products read the weights;
        returns the bytes kept, before the KV pool is sized."""
        if self.products != torch.int8:
            return 0
        kept = sum(m.keep_books() for m in self.model.modules() if isinstance(m, LCQLinear))
        if kept:
            self.log.info("LCQ layers keep their codebooks in bytes (%.0f MiB) for int8 decode products", kept / 2**20)
        return kept

    def _keep_head_panels(self) -> int:
        """With bf16 or int8 products, the fp16 head also keeps its bf16 panels (cpu_half.pair_panels, 2
        bytes per weight: 57 MB for SmolLM2's 49152 x 576) where they take at most a tenth of the
        memory available: its products of 3 rows or more read them instead of converting its rows at
        every step (1.06-1.95x at 3-128 rows on that head, the same values from 10 rows). Returns the
        bytes kept, before the KV pool is sized."""
        head = getattr(self.model, "lm_head_half", None)
        if head is None or self.products == torch.float32 or not products_available(torch.bfloat16):
            return 0
        size = pair_panel_bytes(*head.shape)
        available = available_memory_bytes()
        if available is None or size > available // 10:
            return 0
        self.model.lm_head_panels = pair_panels(head)
        self.log.info("the head keeps its bf16 panels (%.0f MiB), which its products of several rows read", size / 2**20)
        return size

    def _keep_head_rows(self) -> int:
        """With int8 products, the fp16 head also keeps its int8 rows (cpu_half.byte_rows: 1.125 bytes per
        weight, 31 MB for SmolLM2's head, 0.28 GB for Llama 3.2 1B's), which its products of 1-4 rows read
        in place of the fp16 weight (1.4x at 1 row with AVX-512; AVX2's form where it lacks the int8 products),
        the weight rounded to 8 bits (-0.006% perplexity on the demo model): at batch 1 the head is what an LCQ
        model reads most besides its layers. Returns the bytes kept, before the KV pool is sized."""
        head = getattr(self.model, "lm_head_half", None)
        if head is None or self.products != torch.int8:
            return 0
        self.model.lm_head_rows = byte_rows(head)
        size = self.model.lm_head_rows.numel()
        self.log.info("the head keeps its int8 rows (%.0f MiB), which its decode products read", size / 2**20)
        return size

    def new_block_manager(self, enable_prefix_caching: bool) -> BlockManager:
        return BlockManager(self.num_blocks, self.block_size, enable_prefix_caching, self.kv_groups.windows,
                            self.state_slots, self.snapshot_slots)

    def keep_states(self, kept: dict[int, int], passed: dict[int, tuple[int, int]] | None = None) -> None:
        """Recurrent layers' states of the sequences that verified drafts: after the tokens they kept (slot ->
        the step's tokens kept: the accepted drafts and the token before them), and at a block's end the kept
        ones passed (slot -> (tokens, snapshot slot)), into its snapshot."""
        if kept:
            self.model.keep_states(kept, passed)

    def copy_states(self, copies: list[tuple[int | None, int]]) -> None:
        """Recurrent layers' state slots copied (from, to) in order: prefixes' states kept and taken up, and
        slots zeroed (from None) for the sequences that take them."""
        for source, target in copies:
            self.model.copy_states(source, target)

    def _longest_sequence(self, config: EngineConfig) -> int:
        """The context length: the model's, at most what one sequence alone can hold in the pool (its
        sliding-window groups hold about a window each, with a warning where that is shorter); a configured
        max_model_len the pool cannot hold is refused, as vLLM refuses it, rather than served shorter."""
        limit = context_limit(self.model_config, config.max_model_len)
        blocks = self.new_block_manager(False)
        if blocks.most_blocks_held(limit, config.max_num_batched_tokens) <= self.num_blocks:
            return limit
        low, high = 0, limit  # the most tokens that fit: held blocks grow with the tokens
        while low < high:
            middle = (low + high + 1) // 2
            fits = blocks.most_blocks_held(middle, config.max_num_batched_tokens) <= self.num_blocks
            low, high = (middle, high) if fits else (low, middle - 1)
        room = f"the KV cache ({self.num_blocks} blocks of {self.block_size} tokens) holds at most {low} tokens of " \
            "one sequence"
        if config.max_model_len is not None or low < 2:  # (under 2 tokens a server would start and refuse everything)
            if config.max_model_len is None:
                raise UserError(f"{room}; give the cache more memory (--kv-cache-memory-gb on CPU, "
                                "--gpu-memory-utilization on a GPU)")
            raise UserError(f"max_model_len {limit} is longer than {room}; give the cache more memory "
                            "(--kv-cache-memory-gb on CPU, --gpu-memory-utilization on a GPU) or lower --max-model-len")
        self.log.warning("the model's context of %d tokens is cut to %d: %s", limit, low, room)
        return low

    def _pool_blocks(self, config: EngineConfig, room: int, block_bytes: int) -> int:
        """The pool's blocks: as many as `room` bytes hold, or those the configuration sets (on a GPU no more than
        fit: past them the pool would fail to allocate, or leave the steps' activations none)."""
        fits = max(2, room // block_bytes)
        wanted = config.kv_cache_blocks()
        if wanted is None:
            return fits
        if self.device.type == "cuda" and wanted > fits:
            raise UserError(f"the KV cache's {wanted} blocks of {self.block_size} tokens (--num-gpu-blocks-override "
                            f"or --max-batch-total-tokens) take {wanted * block_bytes / 2**30:.2f} GiB; the GPU "
                            f"leaves it {room / 2**30:.2f} GiB ({fits} blocks) at --gpu-memory-utilization "
                            f"{config.gpu_memory_utilization}")
        return wanted

    def _kv_budget(self, config: EngineConfig) -> int:
        """gpu_memory_utilization is the share of the GPU this engine may use (weights, KV cache and
        activations), as in vLLM; memory held by others (processes, or engines in this process) only
        limits it through what is free."""
        if self.device.type != "cuda":
            return int(config.kv_cache_memory_gb * (1 << 30))
        free, total = torch.cuda.mem_get_info(self.device)
        allowed = int(total * config.gpu_memory_utilization) - self.weight_bytes
        return max(0, min(allowed, free) - GPU_ACTIVATION_RESERVE_BYTES)

    def _prepare(self, scheduled: list[tuple[Sequence, int]], num_groups: int | None = None, ahead: bool = False
                 ) -> tuple[StepInputs[np.ndarray], frozenset[int]]:
        """The step's inputs as host arrays (on a GPU the decode graphs take them straight into their
        buffer, other steps in one copy: _on_device), and the state slots of the sequences verifying drafts;
        num_groups: the tables each sequence has, where not one per layer group (the multi-token-prediction
        layer's views: one); ahead: a decode step of each sequence's token after its last, which the host
        does not have yet (its id is 0 here: run's next_tokens)."""
        num_groups = num_groups or self.kv_groups.num_groups
        ids, positions, starts, lengths = [], [], [0], []
        slots: list[list[int]] = [[] for _ in range(num_groups)]  # per layer group
        adapter_slots: list[int] = []  # each row's adapter slot, -1 for the base model
        bs = self.block_size
        width = max(len(seq.block_tables[0]) for seq, _ in scheduled)
        rows = sum(count if seq.num_draft_tokens else 1 for seq, count in scheduled)
        # (groups, rows, width), padded with -1, from each sequence's array of its tables, made again only when
        # they changed (from nested lists torch took 5.5 ms a step for 64 sequences of 3,000 tokens in 6 groups,
        # a GPU decode step's worth)
        tables = np.full((num_groups, rows, width), -1, dtype=np.int32)
        for seq, count in scheduled:
            begin = len(seq) if ahead else seq.num_computed_tokens
            adapter_slots += [-1 if seq.adapter_slot is None else seq.adapter_slot] * count
            ids.extend([0] * count if ahead else seq.token_ids[begin:begin + count])
            positions.extend(range(begin, begin + count))
            for group_slots, table in zip(slots, seq.block_tables):
                group_slots.extend(table[pos // bs] * bs + pos % bs for pos in range(begin, begin + count))
            # A sequence verifying drafts is one query per token, each over the cache up to itself (every
            # row's K and V are stored before attention reads them), so the step stays a decode step.
            query = 1 if seq.num_draft_tokens else count
            if seq.tables_array_version != seq.tables_version:
                seq.tables_array, seq.tables_array_version = np.array(seq.block_tables, np.int32), seq.tables_version
            for end in range(begin + query, begin + count + 1, query):
                starts.append(starts[-1] + query)
                tables[:, len(lengths), :seq.tables_array.shape[1]] = seq.tables_array
                lengths.append(end)
        step = StepInputs(
            input_ids=np.array(ids, np.int64), positions=np.array(positions, np.int64),
            slot_mapping=np.array(slots, np.int64), adapter_slots=np.array(adapter_slots, np.int64),
            query_start=np.array(starts, np.int32), context_lens=np.array(lengths, np.int32), block_tables=tables,
            state_slots=np.array([seq.state_slot for seq, count in scheduled
                                  for _ in range(count if seq.num_draft_tokens else 1)], np.int64)
            if self.state_slots else None)
        drafting_slots = frozenset(seq.state_slot for seq, _ in scheduled if seq.num_draft_tokens and self.state_slots)
        return step, drafting_slots

    def _check_batch_invariant(self) -> None:
        """UserError where batch_invariant cannot hold: the forms it takes are the C kernels' on a CPU, for softmax
        attention and dense MLPs (a mixture's, a recurrent or latent mixer's kernels group rows their own ways)."""
        c = self.model_config
        if self.device.type != "cpu" or self.dtype != torch.float32 or not cpu_ops.usable():
            raise UserError("batch_invariant runs on a CPU with the C kernels, in float32 (the GPU kernels' forms "
                            "depend on the batch)")
        if c.num_experts or c.latent or c.linear or c.mamba or c.short_conv:
            raise UserError(f"batch_invariant covers models of softmax attention and dense MLPs, not {c.model_type}'s "
                            "mixtures of experts or other token mixers")

    def _on_device(self, step: StepInputs[np.ndarray], drafting_slots: frozenset[int],
                   next_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, ForwardContext]:
        """The step's token ids (next_tokens where given), positions and context on the model's device, for an
        eager forward pass."""
        tensors = to_device(step, self.device)
        context = ForwardContext(
            is_prefill=step.num_seqs < step.num_tokens, slot_mapping=tensors.slot_mapping,
            query_start=tensors.query_start, context_lens=tensors.context_lens, block_tables=tensors.block_tables,
            max_query_len=int(np.diff(step.query_start).max()), max_context_len=int(step.context_lens.max()),
            lora=LoRABatch(self.adapters.stack, tensors.adapter_slots) if step.adapter_slots.max() >= 0 else None,
            state_slots=tensors.state_slots, drafting_slots=drafting_slots, batch_invariant=self.batch_invariant)
        return tensors.input_ids if next_tokens is None else next_tokens, tensors.positions, context

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]], next_tokens: torch.Tensor | None = None
            ) -> tuple[list[Sequence], torch.Tensor, list[PromptLogprobs], list[tuple[Sequence, torch.Tensor]]]:
        """Forward the step; returns the sequences that now need a next token, their logits (1 + its
        num_draft_tokens rows each), the prompt logprobs of this step's prompt tokens for sequences
        that asked for them, and the final hidden state of the last prompt token of embedding requests
        whose prompt this step completed. next_tokens: a decode step launched before the host has its tokens
        (async scheduling): each sequence's token after its last, as sampled on the device, one a sequence."""
        step, drafting_slots = self._prepare(scheduled, ahead=next_tokens is not None)
        drafts = sum(seq.num_draft_tokens for seq, _ in scheduled)
        # Drafts add rows; where the step's own rows are too few for rounded products, the drafts keep
        # each row as alone (fp32, and int8 decode products where plain decoding takes them), so that
        # verifying them rounds nothing plain decoding would not.
        alone = bool(drafts) and step.num_tokens - drafts < ROUNDED_MIN_ROWS
        with cpu_products(self.products, rows_alone=alone, invariant=self.batch_invariant):
            return self._forward(scheduled, step, drafting_slots, next_tokens)

    def _forward(self, scheduled: list[tuple[Sequence, int]], step: StepInputs[np.ndarray],
                 drafting_slots: frozenset[int], next_tokens: torch.Tensor | None
                 ) -> tuple[list[Sequence], torch.Tensor, list[PromptLogprobs], list[tuple[Sequence, torch.Tensor]]]:
        decode = step.num_seqs == step.num_tokens
        if self.graphs is not None and decode and not drafting_slots and step.num_seqs <= self.graphs.max_batch:
            hidden = self.graphs.run(step, next_tokens)
        else:
            hidden = self.model(*self._on_device(step, drafting_slots, next_tokens))
        if self.model.mtp is not None:
            self.last_hidden = hidden
        ahead = next_tokens is not None
        rows, to_sample, prompt_logprobs, embeddings = [], [], [], []
        end = 0
        for seq, count in scheduled:
            if seq.params.prompt_logprobs is not None and not ahead:
                prompt_logprobs += self._prompt_logprobs(seq, hidden[end:end + count])
            end += count
            if ahead or seq.num_computed_tokens + count == len(seq):
                if seq.params.embed:
                    embeddings.append((seq, hidden[end - 1].float()))
                    continue
                rows.extend(range(end - 1 - seq.num_draft_tokens, end))
                to_sample.append(seq)
        if not rows:
            return [], torch.empty(0), prompt_logprobs, embeddings
        # (rows ascend, so as many as hidden has are all of them in order)
        sampled = hidden if len(rows) == hidden.shape[0] else hidden[host_tensor(rows, hidden.device)]
        logits = self.model.compute_logits(sampled)
        return to_sample, logits, prompt_logprobs, embeddings

    @torch.inference_mode()
    def run_mtp(self, views: list[tuple[Sequence, int]], previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the multi-token-prediction layer over views of sequences (their tokens one ahead, their one
        table the full-attention blocks'), `previous` the hidden state of each row's position: (the hidden
        states a next draft reads, the logits of the tokens after next), a row per token."""
        input_ids, positions, context = self._on_device(*self._prepare(views, num_groups=1))
        with cpu_products(self.products):
            return self.model.predict_next(input_ids, previous, positions, context)

    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor) -> list[PromptLogprobs]:
        """Logprobs of the prompt tokens that this step's rows of seq predict (row i is position
        num_computed_tokens + i, which predicts the token after it), PROMPT_LOGPROB_ROWS rows of
        logits at a time."""
        first = seq.num_computed_tokens
        count = min(hidden.shape[0], seq.num_prompt_tokens - 1 - first)
        parts = []
        for start in range(0, max(count, 0), PROMPT_LOGPROB_ROWS):
            stop = min(start + PROMPT_LOGPROB_ROWS, count)
            logprobs = torch.log_softmax(self.model.compute_logits(hidden[start:stop]), dim=-1)
            targets = torch.tensor(seq.token_ids[first + start + 1:first + stop + 1], device=logprobs.device)
            top = logprobs.topk(seq.params.prompt_logprobs, dim=-1)
            chosen = logprobs.gather(1, targets[:, None])
            ranks = (logprobs > chosen).sum(dim=-1) + 1
            parts.append(PromptLogprobs(seq, first + start + 1, chosen[:, 0].cpu(), top.values.cpu(),
                                        top.indices.cpu(), ranks.cpu()))
        return parts
