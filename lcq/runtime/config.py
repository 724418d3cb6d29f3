"""Engine settings (the server's flags map onto these one to one)."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lcq.errors import UserError
from lcq.format import view_config
from lcq.inputs import device_problem

from .generation_config import sampling_defaults

SCHEDULING_POLICIES = ("fcfs", "priority")

if TYPE_CHECKING:
    from lcq.models import ModelConfig


@dataclass
class EngineConfig:
    model: str  # a folder, or a Hugging Face Hub id (org/name) fetched into the Hub's cache (fetched())
    revision: str | None = None  # of a Hub id: a branch, tag or commit (default main)
    download_dir: str | None = None  # where Hub ids are fetched (default: the Hub's cache, HF_HOME)
    tokenizer: str | None = None  # the tokenizer's folder or Hub id, where it is not the model's (its chat template too)
    tokenizer_revision: str | None = None  # of a tokenizer's Hub id (default main)
    # The model ids clients use (vLLM's: several answer alike; replies name the first); default: the folder's name
    served_model_name: str | list[str] | None = None
    device: str = "auto"  # cuda when available, else cpu
    dtype: str = "auto"  # float16 on cuda, float32 on cpu
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_gb: float = 1.0  # KV pool size on CPU
    # The KV pool's size set outright instead of from memory: vLLM's, in blocks, or TGI's, in tokens (whole blocks);
    # on CPU in place of kv_cache_memory_gb, on a GPU refused beyond what gpu_memory_utilization leaves
    num_gpu_blocks_override: int | None = None
    max_batch_total_tokens: int | None = None
    kv_cache_dtype: str = "auto"  # float16 for an fp32 CPU model, else the model dtype; float32 or int8 on CPU too
    cpu_matmul_dtype: str = "auto"  # int8 (LCQ layers) and bfloat16 operands where the CPU has them, else float32
    cpu_int8_weights: str = "auto"  # with int8 products, LCQ layers also keep their int8 form: auto, on or off
    enable_prefix_caching: bool = True
    # Each request's logits the same whatever else shares its steps, however its prompt is split into steps and
    # whether it comes from the prefix cache (vLLM's VLLM_BATCH_INVARIANT=1): every step's products take the forms
    # that give a row what it alone would give, and every query its prefill attention's tiles; CPU only (the C
    # kernels), models of softmax attention and dense MLPs, no speculative decoding or LoRA; slower (docs/configuration.md).
    batch_invariant: bool = False
    # Recurrent layers' (Qwen3.5's, Granite 4.0-H's, LFM2's) prefix caching: states kept at prompts' ends
    # (block_manager.py), each the size of a sequence's states, sized before the KV pool; 0: no prefix caching for
    # such models.
    state_snapshots: int = 16
    # The dtype of those layers' recurrent states (vLLM's name; their convolutions' last inputs are in the model
    # dtype): float32, or the model's (auto) or a half one, half the memory; computed in fp32 either way.
    mamba_ssm_cache_dtype: str = "float32"
    # Sliding-window layers in layer groups with their own block tables, handing back the blocks their window
    # has passed (kv_groups.py); off: every layer keeps every block of its sequence, as before.
    hybrid_kv_cache: bool = True
    max_queue: int = 256  # requests that may wait beyond the free batch slots (max_num_seqs) before QueueFullError
    # The order requests are admitted and run in (scheduler.py): fcfs, by arrival, or priority, by each
    # request's priority (lower first), then arrival.
    scheduling_policy: str = "fcfs"
    cuda_graphs: bool = True
    # The decode batch sizes CUDA graphs are captured for (larger batches run eagerly; a batch between two
    # sizes is padded to the larger); None: 1, 2, 4, 8, then multiples of 16 up to max_num_seqs (cuda_graphs.py)
    cuda_graph_sizes: list[int] | None = None
    # Decode steps launched from the last step's tokens on the device before the host reads them (engine.py),
    # so that the device does not wait on the host between steps; None: on a GPU (vLLM's --async-scheduling).
    async_scheduling: bool | None = None
    seed: int = 0
    # LoRA adapters served beside the base model: "name=folder,name2=org/id", or a list of such strings
    lora_modules: str | list[str] | None = None
    # Adapters loaded and unloaded while serving: at least one adapter slot, and the server's
    # /v1/load_lora_adapter and /v1/unload_lora_adapter routes (absent without it).
    allow_runtime_lora_updating: bool = False
    max_loras: int | None = None  # adapter slots; default: the number of lora_modules, at least 1 with runtime updating
    max_cpu_loras: int | None = None  # adapters loaded at once; default: max_loras, or len(lora_modules) if more
    max_lora_rank: int | None = None  # rank room of each slot; default: the largest rank of lora_modules, at least 16 with runtime updating
    generation_config: str = "auto"  # defaults for unset sampling fields (generation_config.py): auto, vllm, a folder
    override_generation_config: dict | None = None  # generation_config.json keys that replace its values (vLLM's)
    max_logprobs: int = 20  # the most alternatives a request's logprobs and prompt_logprobs ask for (-1: any; vLLM's)
    num_speculative_tokens: int = 0  # drafts per step (speculative.py); 0: off
    # A draft model's folder (draft_model.py): a smaller model of the same tokenizer drafts the
    # num_speculative_tokens instead of prompt lookup.
    speculative_model: str | None = None
    # "mtp": the model's own multi-token-prediction layer drafts num_speculative_tokens a step (mtp.py)
    speculative_method: str | None = None
    prompt_lookup_max: int = 4  # longest n-gram matched
    prompt_lookup_min: int = 2  # shortest n-gram matched
    # No drafts while this many sequences or more run: on CPU each draft row then costs about as much as
    # it saves (bench/speculative.py); at batch 1 they are nearly free.
    speculative_disable_by_batch_size: int = 2
    # The chat template to use instead of the tokenizer's (vLLM's --chat-template): a Jinja file, or the
    # template itself.
    chat_template: str | None = None

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_async_scheduling(self) -> bool:
        """Off on CPU by default: there the host computes the steps itself, so nothing overlaps, and a
        sequence's last step would compute one token more for nothing."""
        if self.async_scheduling is None:
            return self.resolved_device().type == "cuda"
        return self.async_scheduling

    def resolved_dtype(self) -> torch.dtype:
        """auto: float32 on CPU; on a GPU the checkpoint's own half precision as vLLM takes it: bfloat16
        for a bf16 checkpoint (models trained in bf16 may outgrow fp16's range), else float16 (fp16 and
        fp32 checkpoints, and LCQ ones, whose full-precision tensors are fp16); Gemma in bfloat16 always,
        whose residual stream outgrows fp16's range (transformers and vLLM run it so). On a GPU without bf16
        arithmetic (compute capability below 8.0: a T4), as vLLM: float16, Gemma too (float32 would not do: its
        attention at head 256 does not fit a T4's shared memory in fp32, bench/gpu_builds.py), and bfloat16 asked
        for is refused (ptxas refuses some of the kernels' bf16 conversions there)."""
        on_cuda = self.resolved_device().type == "cuda"
        if self.dtype == "auto":
            if not on_cuda:
                return torch.float32
            from lcq.models.families import GEMMA

            config = _read_config(self.model)
            stored = config.get("dtype") or config.get("torch_dtype")
            wanted = config.get("model_type") in GEMMA or stored == "bfloat16"
            return torch.bfloat16 if wanted and _bf16_arithmetic(self.resolved_device()) else torch.float16
        dtype = _named_dtype("dtype", self.dtype)
        if dtype == torch.bfloat16 and on_cuda and not _bf16_arithmetic(self.resolved_device()):
            major, minor = torch.cuda.get_device_capability(self.resolved_device())
            raise UserError(f"dtype bfloat16 needs a GPU of compute capability 8.0 or later (Ampere); this "
                            f"{torch.cuda.get_device_name(self.resolved_device())} is {major}.{minor}: use dtype "
                            "float16 (--dtype half), or float32")
        return dtype

    def kv_cache_blocks(self) -> int | None:
        """The KV pool's blocks where num_gpu_blocks_override or max_batch_total_tokens sets them, else None."""
        if self.max_batch_total_tokens is not None:
            return -(-self.max_batch_total_tokens // self.block_size)
        return self.num_gpu_blocks_override

    def resolved_kv_cache_dtype(self) -> torch.dtype:
        """auto: float16 for an fp32 model on CPU (half the memory, twice the tokens, and CPU attention
        as fast or faster, since it converts as it loads), else the model dtype. Set, it may differ from
        the model dtype only on CPU (the GPU kernels read the model dtype); float32 keeps an fp32 CPU
        model's tokens equal to transformers'. int8 (an fp32 CPU model with the C kernels): each head
        row in bytes with its fp32 scale, 1.9x fp16's tokens per GiB at head_dim 64. fp8 (vLLM's name; on a
        GPU of compute capability 8.9 or later): float8 e4m3 without scales, values clamped to +-448, twice
        an fp16 cache's tokens."""
        on_cpu = self.resolved_device().type == "cpu"
        if self.kv_cache_dtype == "auto":
            model_dtype = self.resolved_dtype()
            return torch.float16 if on_cpu and model_dtype == torch.float32 else model_dtype
        if self.kv_cache_dtype in FP8_NAMES:
            device = self.resolved_device()
            if device.type != "cuda" or not torch.cuda.is_available() or \
                    torch.cuda.get_device_capability(device) < (8, 9):
                raise ValueError("kv_cache_dtype fp8 needs a GPU of compute capability 8.9 or later (Ada, Hopper), "
                                 "where the Triton kernels store and read float8 e4m3")
            return torch.float8_e4m3fn
        if self.kv_cache_dtype == "int8":
            from lcq.kernels import cpu_ops

            if not (on_cpu and self.resolved_dtype() == torch.float32 and cpu_ops.usable()):
                raise ValueError("kv_cache_dtype int8 needs an fp32 model on a CPU and the C kernels "
                                 "(LCQ_CPU_OPS not 0)")
            return torch.int8
        dtype = _named_dtype("kv_cache_dtype", self.kv_cache_dtype, "int8", *FP8_NAMES)
        if dtype != self.resolved_dtype() and self.resolved_device().type == "cuda":
            raise ValueError("kv_cache_dtype must be auto or the model dtype on a GPU")
        return dtype

    def resolved_state_dtype(self) -> torch.dtype:
        """The recurrent states' dtype: mamba_ssm_cache_dtype, auto being the model's."""
        if self.mamba_ssm_cache_dtype == "auto":
            return self.resolved_dtype()
        return _named_dtype("mamba_ssm_cache_dtype", self.mamba_ssm_cache_dtype)

    def resolved_cpu_matmul_dtype(self) -> torch.dtype:
        """The operand dtype of an fp32 CPU model's products of several rows and of prefill attention
        (cpu_matmul.cpu_products). auto: int8 where the CPU has AVX512_VNNI, AVX512_VBMI and AVX512_BF16 (LCQ
        layers' products of 10+ rows in 8 bits, bf16 elsewhere: 1.2-1.3x bf16's throughput with many
        sequences), else bfloat16 where it has AVX512_BF16 (twice fp32's multiply-adds per
        instruction), else int8 where it has no AVX-512 (the AVX2 shuffle form of LCQ layers' decode products
        at 2 and 4 bits, cpu_matmul.shuffles_only: W4 batch-1 decode 1.4x fp32's), else float32; the demo model's
        perplexity moved by under 0.1% with either over 512-token windows, and by +0.34% with int8 over 2,048-token
        ones, every product in 8 bits (docs/kernels.md). float32 keeps tokens equal to transformers'."""
        names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
        if self.cpu_matmul_dtype not in ("auto", *names):
            raise ValueError(f"cpu_matmul_dtype must be auto, float32, bfloat16 or int8 (got {self.cpu_matmul_dtype})")
        from lcq.kernels import native
        from lcq.kernels.cpu_matmul import PRODUCT_FORMS, products_available, shuffles_only

        applies = self.resolved_device().type == "cpu" and self.resolved_dtype() == torch.float32
        if self.cpu_matmul_dtype == "auto":
            usable = [dtype for dtype in (torch.int8, torch.bfloat16) if applies and products_available(dtype)]
            if applies and not usable and shuffles_only() and not native.has_avx512("avx512f"):
                usable = [torch.int8]
            return usable[0] if usable else torch.float32
        dtype = names[self.cpu_matmul_dtype]
        if dtype == torch.int8 and applies and shuffles_only():
            return dtype
        if dtype != torch.float32 and not (applies and products_available(dtype)):
            flags = ["AVX512_" + flag.removeprefix("avx512").lstrip("_").upper() for flag in PRODUCT_FORMS[dtype][1]]
            needs = " and ".join([", ".join(flags[:-1]), flags[-1]] if len(flags) > 1 else flags)
            where = " and the C kernels" if dtype == torch.int8 else f", the C kernels and a CPU with {needs}"
            raise ValueError(f"cpu_matmul_dtype {self.cpu_matmul_dtype} needs an fp32 model{where}")
        return dtype

    def _blocked_int8_products(self) -> bool:
        """Whether int8 products are on and take the AVX-512 forms, whose blocked products read kept int8 weights
        (not the AVX2 shuffle form alone)."""
        from lcq.kernels.cpu_matmul import products_available

        return self.resolved_cpu_matmul_dtype() == torch.int8 and products_available(torch.int8)

    def keeps_int8_weights(self, size: int, available: int | None) -> bool:
        """Whether LCQ layers keep the int8 form of their weights (`size` bytes, 1.125 per weight at
        K = 576) beside their indices, for int8 products to read instead of expanding each block of
        rows at every call: memory for speed (decode steps of 64 sequences spent a tenth of their time
        expanding). auto: when int8 products are on and the form takes at most a tenth of the memory
        `available` (host_memory.available_memory_bytes: a container's limit counts; None: unknown, so
        not); on: whenever int8 products are on (validate() refuses it
        otherwise); off: never. Batch-1 decode reads the indices either way."""
        if self.cpu_int8_weights == "off" or not self._blocked_int8_products():
            return False
        return self.cpu_int8_weights == "on" or (available is not None and size <= available // 10)

    def _lora_entries(self) -> list[tuple[str, str]]:
        """lora_modules as (name, folder or Hub id) pairs; ValueError where it is malformed."""
        entries: dict[str, str] = {}
        text = ",".join(self.lora_modules) if isinstance(self.lora_modules, list) else self.lora_modules or ""
        for entry in filter(None, (part.strip() for part in text.split(","))):
            name, sep, folder = entry.partition("=")
            name, folder = name.strip(), folder.strip()
            if not sep or not name or not folder:
                raise ValueError(f"lora_modules takes name=folder entries separated by commas (got {entry!r})")
            if name in entries or name in self.model_names():
                raise ValueError(f"lora_modules: the name {name!r} is used twice")
            entries[name] = folder
        return list(entries.items())

    def lora_adapters(self) -> dict[str, str]:
        """lora_modules as {name: PEFT folder} (a Hub id is one once fetched()); ValueError where it is malformed
        or names no PEFT folder."""
        adapters: dict[str, str] = {}
        for name, folder in self._lora_entries():
            try:
                found = (Path(folder) / "adapter_config.json").is_file()
            except OSError as e:  # (a name too long, a folder not readable)
                raise ValueError(f"lora_modules: {folder} cannot be read ({e.strerror or e})") from None
            if not found:
                raise ValueError(f"lora_modules: {folder} holds no adapter_config.json (a PEFT LoRA folder)")
            adapters[name] = folder
        return adapters

    def resolved_max_loras(self) -> int:
        """Adapter slots: max_loras, else one per lora_modules entry and at least one with runtime updating.
        0: no adapter stack at all, so steps run as if LoRA did not exist."""
        if self.max_loras is not None:
            return self.max_loras
        return max(len(self.lora_adapters()), int(self.allow_runtime_lora_updating))

    def resolved_max_cpu_loras(self) -> int:
        """Adapters loaded at once, in host memory (vLLM's max_cpu_loras): at least one per slot."""
        if self.max_cpu_loras is not None:
            return self.max_cpu_loras
        return max(self.resolved_max_loras(), len(self.lora_adapters()))

    def fetched(self) -> "EngineConfig":
        """These settings with model, speculative_model, tokenizer and lora_modules as folders: a Hub id fetched
        (lcq.hub, at `revision`, the tokenizer at tokenizer_revision, the others at main), and the model served by
        its id unless served_model_name names it otherwise, as vLLM."""
        from lcq.hub import TOKENIZER_FILES, model_folder

        folder = model_folder(self.model, self.revision, self.download_dir)
        draft = None if self.speculative_model is None else model_folder(self.speculative_model,
                                                                          download_dir=self.download_dir)
        tokenizer = None if self.tokenizer is None else model_folder(self.tokenizer, self.tokenizer_revision,
                                                                     self.download_dir, "tokenizer", TOKENIZER_FILES)
        adapters = ",".join(f"{name}={model_folder(path, download_dir=self.download_dir, kind='LoRA adapter')}"
                            for name, path in self._lora_entries()) or None
        names = self.served_model_name or (self.model if folder != self.model else None)
        return replace(self, model=folder, speculative_model=draft, served_model_name=names, lora_modules=adapters,
                       tokenizer=tokenizer)

    def model_name(self) -> str:
        """The name replies give the model: the first served name."""
        return self.model_names()[0]

    def model_names(self) -> list[str]:
        """Every name the model is served under (`lcq serve .` is named after the folder)."""
        names = self.served_model_name
        return ([names] if isinstance(names, str) else list(names)) if names else [Path(self.model).resolve().name]

    def resolved_chat_template(self) -> str | None:
        """chat_template's text: the file's where it names one, else the value itself where it reads as a
        Jinja template; ValueError for anything else (a mistyped path must not become a template) and for a
        template that does not parse, which would otherwise fail every chat request as the client's mistake."""
        if self.chat_template is None:
            return None
        if _names_a_file(self.chat_template):
            text, source = Path(self.chat_template).read_text(), self.chat_template
        elif "{{" in self.chat_template or "{%" in self.chat_template:
            text, source = self.chat_template, "the template given"
        else:
            raise ValueError(f"chat_template: {self.chat_template} is neither a file nor a Jinja template")
        _check_template_syntax(text, source)
        return text

    def check_model(self) -> None:
        """The model's architecture and context, read from its folder (config.json and tensor names): for a
        command that would otherwise start serving, then fail to load in the background."""
        from lcq.models import ModelConfig

        context_limit(ModelConfig.from_folder(self.model), self.max_model_len)

    def validate(self) -> None:
        checks = [
            (self.max_num_seqs >= 1, "max_num_seqs must be at least 1"),
            (all(self.model_names()) and len(set(self.model_names())) == len(self.model_names()),
             "served_model_name must be names that are not empty, each given once"),
            (self.state_snapshots >= 0, "state_snapshots must be at least 0"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be at least 1"),
            (self.block_size in (8, 16, 32), "block_size must be 8, 16 or 32"),
            (self.max_logprobs >= -1, f"max_logprobs must be -1 (any) or at least 0, got {self.max_logprobs}"),
            (0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization must be in (0, 1]"),
            (0 < self.kv_cache_memory_gb < float("inf"), "kv_cache_memory_gb must be positive and finite"),
            (self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 1,
             "num_gpu_blocks_override must be at least 1"),
            (self.max_batch_total_tokens is None or self.max_batch_total_tokens >= 1,
             "max_batch_total_tokens must be at least 1"),
            (self.num_gpu_blocks_override is None or self.max_batch_total_tokens is None,
             "num_gpu_blocks_override and max_batch_total_tokens both size the KV cache: set one"),
            (self.max_queue >= 0, "max_queue must be >= 0"),
            (self.cuda_graph_sizes is None or (self.cuda_graph_sizes and min(self.cuda_graph_sizes) >= 1),
             f"cuda_graph_sizes must be batch sizes of at least 1, got {self.cuda_graph_sizes}"),
            (self.scheduling_policy in SCHEDULING_POLICIES,
             f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)} (got {self.scheduling_policy})"),
            (self.max_model_len is None or self.max_model_len >= 2, "max_model_len must be at least 2"),
            (0 <= self.num_speculative_tokens <= 16, "num_speculative_tokens must be between 0 and 16"),
            (1 <= self.prompt_lookup_min <= self.prompt_lookup_max <= 16,
             "prompt_lookup_min and prompt_lookup_max must satisfy 1 <= min <= max <= 16"),
            (self.speculative_disable_by_batch_size >= 2, "speculative_disable_by_batch_size must be at least 2"),
            (self.max_lora_rank is None or self.max_lora_rank >= 1, "max_lora_rank must be at least 1"),
            (self.max_loras is None or self.max_loras >= 0, "max_loras must be at least 0"),
            (-2**63 <= self.seed < 2**64,  # torch.manual_seed's range
             f"seed must be between {-2**63} and {2**64 - 1} (got {self.seed})"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if (problem := device_problem(self.device, "device", auto=True)) is not None:
            raise ValueError(problem)
        if self.speculative_model is not None:
            if not self.num_speculative_tokens:
                raise ValueError("speculative_model drafts num_speculative_tokens a step: set it (1 to 16)")
            if not (Path(self.speculative_model) / "config.json").is_file():
                raise ValueError(f"speculative_model: {self.speculative_model} holds no config.json (a model folder)")
        if self.speculative_method not in (None, "mtp"):
            raise ValueError(f"speculative_method must be mtp where set (got {self.speculative_method})")
        if self.speculative_method == "mtp" and (not self.num_speculative_tokens or self.speculative_model):
            raise ValueError("speculative_method mtp drafts num_speculative_tokens a step with the model's own "
                             "multi-token-prediction layer: set num_speculative_tokens (1 to 16), and no "
                             "speculative_model")
        sampling_defaults(self.generation_config, self.model, self.override_generation_config)
        self.resolved_chat_template()
        adapters = self.lora_adapters()
        if self.max_loras == 0 and (adapters or self.allow_runtime_lora_updating):
            raise ValueError("max_loras 0 leaves no adapter slot for lora_modules or runtime LoRA updating: set at "
                             "least 1")
        if self.resolved_max_cpu_loras() < max(self.resolved_max_loras(), len(adapters)):
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras "
                             f"({self.resolved_max_loras()}) and the number of lora_modules ({len(adapters)})")
        if self.batch_invariant and (self.num_speculative_tokens or self.lora_adapters() or
                                     self.allow_runtime_lora_updating):
            raise ValueError("batch_invariant runs without speculative decoding and LoRA adapters")
        self.resolved_dtype()
        self.resolved_kv_cache_dtype()
        self.resolved_state_dtype()
        self.resolved_cpu_matmul_dtype()
        if self.cpu_int8_weights not in ("auto", "on", "off"):
            raise ValueError(f"cpu_int8_weights must be auto, on or off (got {self.cpu_int8_weights})")
        if self.cpu_int8_weights == "on" and not self._blocked_int8_products():
            raise ValueError("cpu_int8_weights on needs int8 products (cpu_matmul_dtype int8, or auto) on a CPU "
                             "with AVX512_VNNI, AVX512_VBMI and AVX512_BF16")


def _read_config(folder: str) -> dict:
    """config.json as lcq reads it (lcq.format.views), or {} where the folder has none readable (the
    loader says why)."""
    try:
        config = view_config(json.loads((Path(folder) / "config.json").read_text()))
    except (OSError, ValueError, AttributeError):
        return {}
    return config if isinstance(config, dict) else {}


FP8_NAMES = ("fp8", "fp8_e4m3")  # kv_cache_dtype: float8 e4m3 on a GPU (vLLM's names)
DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}


def _bf16_arithmetic(device: torch.device) -> bool:
    """Whether a CUDA device computes in bf16 (compute capability 8.0 and later); true where no GPU is there to ask
    (a config resolved on a machine without one)."""
    return not torch.cuda.is_available() or torch.cuda.get_device_capability(device) >= (8, 0)


def _named_dtype(setting: str, name: str, *others: str) -> torch.dtype:
    """The dtype of a setting's name; `others`: the setting's names that DTYPES lacks, for the error."""
    if name not in DTYPES:
        raise ValueError(f"{setting} must be one of auto, {', '.join((*others, *DTYPES))} (got {name})")
    return DTYPES[name]


def context_limit(model_config: ModelConfig, max_model_len: int | None) -> int:
    """max_model_len, or the model's context (a ModelConfig's) where it is None; a UserError past the model's
    rotary tables."""
    context = model_config.max_position_embeddings
    if max_model_len is not None and max_model_len > context:
        raise UserError(f"max_model_len {max_model_len} is longer than the model's context of {context} tokens "
                        "(max_position_embeddings, or what its rope scaling extends it to)")
    return max_model_len or context


def _check_template_syntax(text: str, source: str) -> None:
    """ValueError where `text` does not parse as a chat template: Jinja with the loop controls and the
    `{% generation %}` blocks that transformers' templates may use (parsed only: not rendered here)."""
    import jinja2
    from jinja2.ext import Extension

    class GenerationBlocks(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols", GenerationBlocks]).parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template: {source} is not a valid Jinja template (line {e.lineno}: {e.message})") \
            from None


def _names_a_file(value: str) -> bool:
    """Whether a setting that takes a file or its text names a file (a template's text may hold a piece too
    long for a file name, where the system refuses to look)."""
    try:
        return len(value) < 4096 and Path(value).is_file()
    except OSError:
        return False
