"""`lcq serve` settings: one table of flags, each also read from the environment as LCQ_<FLAG>.

A flag given on the command line wins over the environment, which wins over the default, so a
container image can be configured with env vars alone (LCQ_MODEL, LCQ_PORT, LCQ_API_KEY, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import MISSING, dataclass, field
from decimal import Decimal
from typing import Any, Callable, Mapping

from lcq.errors import UserError

from .content_format import CONTENT_FORMATS


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's names
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "granite", "mistral", "pythonic", "phi4_mini_json", "olmo3", "ernie45",
                     "internlm", "seed_oss", "qwen3_coder", "openai", "glm45", "glm47", "deepseek_v3",
                     "deepseek_v31", "minimax_m2", "llama_nemotron_json", "nemotron_json")  # tool_calls.PARSERS
REASONING_PARSERS = ("deepseek_r1", "qwen3", "glm45", "deepseek_v3", "minimax_m2", "nano_v3", "openai_gptoss")  # reasoning.PARSERS


@dataclass
class ServeSettings:
    """What the HTTP layer needs; the engine's own settings travel in EngineConfig."""

    host: str = "0.0.0.0"
    port: int = 8000
    api_key: str | None = None
    drain_timeout: float = 30.0  # seconds in-flight requests get to finish after SIGTERM
    max_body_bytes: int = 4 << 20
    max_input_tokens: int | None = None  # TGI's: prompts of more tokens are refused (default: the context's bound)
    # TGI's limits on its own routes' parameters (default: lcq's, MAX_N and MAX_STOP)
    max_best_of: int | None = None
    max_stop_sequences: int | None = None
    max_top_n_tokens: int | None = None
    keepalive_interval: float = 10.0  # seconds between SSE keep-alive comments while nothing else is sent
    retry_after: int = 1  # seconds, sent with 429 and 503
    log_level: str = "info"
    tool_call_parser: str | None = None  # how replies of tool_choice "auto" are read (tool_calls.PARSERS)
    enable_auto_tool_choice: bool = False  # vLLM's flag: only checked to come with tool_call_parser
    reasoning_parser: str | None = None  # how a reasoning model's thinking is split from its answer (reasoning.py)
    enable_reasoning: bool = False  # vLLM's older flag: only checked to come with reasoning_parser
    responses_store_size: int = 1000  # /v1/responses kept for previous_response_id, least recently used dropped
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:{id}" (a request may say otherwise)
    chat_template_content_format: str = "auto"  # message content as the template reads it: content_format.py
    root_path: str = ""  # the path prefix a proxy serves the API under (uvicorn's root_path, vLLM's flag)
    # Cross-origin requests from browsers (vLLM's flags and defaults: any origin, method and header; no cookies)
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    # HTTPS served directly (vLLM's flags, uvicorn's): the certificate and key files, and CAs to check clients by
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_ca_certs: str | None = None
    disable_uvicorn_access_log: bool = False  # vLLM's: no line per HTTP request in the log
    disable_fastapi_docs: bool = False  # vLLM's: no /docs, /redoc or /openapi.json (open without the API key)
    trust_remote_code: bool = False  # vLLM's flag, accepted: lcq runs no code from a model's folder
    disable_log_stats: bool = False  # vLLM's: no activity line every 10 s (metrics.ActivityLog)
    enable_log_requests: bool = False  # vLLM's: a line per request, its settings and prompt (max_log_len of it)
    max_log_len: int | None = None  # vLLM's: characters of a prompt, and token ids, a logged request shows
    enable_log_outputs: bool = False  # vLLM's: with enable_log_requests, a line per finished choice, its text
    disable_log_requests: bool = False  # vLLM's older flag, accepted: requests are logged only when asked to
    enable_force_include_usage: bool = False  # vLLM's: every stream ends with its usage, as include_usage asks
    enable_prompt_tokens_details: bool = False  # vLLM's flag, accepted: usage always has prompt_tokens_details
    tensor_parallel_size: int = 1  # vLLM's: one device per process here (more throughput: more replicas)
    pipeline_parallel_size: int = 1  # vLLM's: as tensor_parallel_size
    data_parallel_size: int = 1  # vLLM's: one engine per process (replicas behind nginx instead)
    enable_lora: bool = False  # vLLM's flag, accepted: adapters are served where lora_modules or runtime updating ask
    enable_chunked_prefill: bool = False  # vLLM's flag, accepted: prompts are always prefilled in chunks
    guided_decoding_backend: str = "auto"  # vLLM's: auto or xgrammar, the one lcq compiles grammars with
    load_format: str = "auto"  # vLLM's: auto or safetensors, the only weights lcq reads
    tokenizer_mode: str = "auto"  # vLLM's: auto, transformers' tokenizer of the folder
    swap_space: float = 0.0  # vLLM's flag (GiB of host memory for swapped sequences), accepted: lcq recomputes them
    max_seq_len_to_capture: int = 0  # vLLM's flag, accepted: decode graphs serve every context length
    json_output: bool = False  # TGI's: the log as JSON lines (log_format.py)
    disable_grammar_support: bool = False  # TGI's: requests for structured output (or a tool call forced) refused
    enable_prefill_logprobs: bool = False  # TGI's flag, accepted: prompt logprobs are computed where a request asks
    usage_stats: str = "on"  # TGI's flag (on, off, no-stack), accepted: lcq sends no usage statistics anywhere
    disable_usage_stats: bool = False  # TGI's older flag, accepted, as usage_stats
    sharded: bool = False  # TGI's: false only (one device per process)

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port <= 65535, f"port must be in 0..65535, got {self.port}"),
            (0 <= self.drain_timeout <= 86400, f"drain timeout must be 0 to 86400 seconds, got {self.drain_timeout}"),
            (self.max_body_bytes >= 1024, f"max body bytes must be at least 1024, got {self.max_body_bytes}"),
            (self.max_input_tokens is None or self.max_input_tokens >= 1,
             f"max input tokens must be >= 1, got {self.max_input_tokens}"),
            *[(limit is None or limit >= bound, f"{name} must be >= {bound}, got {limit}") for name, limit, bound in
              (("max best of", self.max_best_of, 1), ("max stop sequences", self.max_stop_sequences, 0),
               ("max top n tokens", self.max_top_n_tokens, 0))],
            (self.keepalive_interval > 0, f"keep-alive interval must be > 0, got {self.keepalive_interval}"),
            (self.retry_after >= 0, f"retry-after must be >= 0, got {self.retry_after}"),
            (self.api_key is None or self.api_key != "", "api key must not be empty"),
            (self.responses_store_size >= 0, f"responses store size must be >= 0, got {self.responses_store_size}"),
            (self.max_log_len is None or self.max_log_len >= 0, f"max log len must be >= 0, got {self.max_log_len}"),
            (not (self.enable_log_requests and self.disable_log_requests),
             "--enable-log-requests and --disable-log-requests contradict each other"),
            (not self.enable_log_outputs or self.enable_log_requests, "--enable-log-outputs needs "
             "--enable-log-requests (as vLLM's)"),
            (self.log_level in LOG_LEVELS, f"log level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level}"),
            (not self.enable_auto_tool_choice or self.tool_call_parser is not None,
             f"--enable-auto-tool-choice needs --tool-call-parser ({', '.join(TOOL_CALL_PARSERS)})"),
            (not self.enable_reasoning or self.reasoning_parser is not None,
             f"--enable-reasoning needs --reasoning-parser ({', '.join(REASONING_PARSERS)})"),
            (self.tool_call_parser in (None, *TOOL_CALL_PARSERS),
             f"tool call parser must be one of {', '.join(TOOL_CALL_PARSERS)}, got {self.tool_call_parser}"),
            *[(size == 1, f"{name} must be 1: lcq runs one device per process (for more throughput run more "
               "replicas: docs/deploy.md)")
              for name, size in (("--tensor-parallel-size (TGI's --num-shard)", self.tensor_parallel_size),
                                 ("--pipeline-parallel-size", self.pipeline_parallel_size),
                                 ("--data-parallel-size", self.data_parallel_size))],
            (not self.sharded, "--sharded must be false: lcq runs one device per process (for more throughput run "
             "more replicas: docs/deploy.md)"),
            (self.usage_stats in ("on", "off", "no-stack"), f"--usage-stats must be on, off or no-stack, got "
             f"{self.usage_stats}"),
            (self.guided_decoding_backend in ("auto", "xgrammar"), "--guided-decoding-backend must be auto or "
             f"xgrammar (lcq compiles grammars with xgrammar), got {self.guided_decoding_backend}"),
            (self.load_format in ("auto", "safetensors"), "--load-format must be auto or safetensors (lcq reads "
             f"safetensors weights only), got {self.load_format}"),
            (self.tokenizer_mode == "auto", "--tokenizer-mode must be auto (transformers' tokenizer of the folder), "
             f"got {self.tokenizer_mode}"),
            ((self.ssl_certfile is None) == (self.ssl_keyfile is None), "--ssl-certfile and --ssl-keyfile go together"),
            *[(path is None or os.path.isfile(path), f"{name} {path}: no such file")
              for name, path in (("--ssl-certfile", self.ssl_certfile), ("--ssl-keyfile", self.ssl_keyfile),
                                 ("--ssl-ca-certs", self.ssl_ca_certs))],
            (not (self.allow_credentials and "*" in self.allowed_origins), "--allow-credentials needs "
             "--allowed-origins naming the origins (browsers refuse credentials with any origin, \"*\")"),
            (self.chat_template_content_format in CONTENT_FORMATS, "chat template content format must be one of "
             f"{', '.join(CONTENT_FORMATS)}, got {self.chat_template_content_format}"),
            (self.reasoning_parser in (None, *REASONING_PARSERS),
             f"reasoning parser must be one of {', '.join(REASONING_PARSERS)}, got {self.reasoning_parser}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


@dataclass(frozen=True)
class Flag:
    name: str  # "--max-num-seqs"
    type: Callable[[str], Any]
    help: str
    target: str  # "server" (ServeSettings) or "engine" (EngineConfig)
    field: str = ""  # dataclass field; default: the flag's snake_case name
    invert: bool = False  # a --no-x switch that sets x = False
    metavar: str | None = None
    expands: bool = False  # its value is a dict of several fields (vLLM's JSON settings)
    several: bool = False  # takes one or more values (argparse's nargs="+"; in the environment, split at spaces)
    peer_envs: tuple[str, ...] = ()  # vLLM's or TGI's variables for the same setting, read after LCQ_<FLAG>

    @property
    def envs(self) -> tuple[str, ...]:
        """The variables read, first found wins: LCQ_<FLAG>, then vLLM's or TGI's (a vLLM deployment's
        VLLM_API_KEY must not leave the server open; a TGI deployment's MAX_TOTAL_TOKENS must still hold)."""
        return (self.env, *self.peer_envs)

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        return "LCQ_" + self.dest.upper()

    @property
    def switch(self) -> bool:
        return self.type is bool


# vLLM's --speculative-config keys and the engine fields they set, per method: prompt lookup ("ngram"),
# a draft model ("draft_model", also where a model is named without a method) and the model's own
# multi-token-prediction layer ("mtp", and vLLM's older per-family names for it)
SPECULATIVE_KEYS = {"num_speculative_tokens": "num_speculative_tokens",
                    "disable_by_batch_size": "speculative_disable_by_batch_size"}
METHOD_KEYS = {"ngram": {"prompt_lookup_max": "prompt_lookup_max", "prompt_lookup_min": "prompt_lookup_min"},
               "draft_model": {"model": "speculative_model"}, "mtp": {}}
MTP_METHODS = ("deepseek_mtp", "qwen3_next_mtp", "glm4_moe_mtp")


def _json_object(text: str) -> dict[str, Any]:
    """A JSON object, as vLLM's --speculative-config and --override-generation-config take one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("a JSON object is needed")
    return value


def _concurrent_requests(text: str) -> dict[str, int]:
    """TGI's --max-concurrent-requests, resolved into the batch and the queue once --max-num-seqs is known."""
    limit = int(text)
    if limit < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {limit}")
    return {"max_concurrent_requests": limit}


def _speculative_config(text: str) -> dict[str, Any]:
    """vLLM's --speculative-config JSON as engine fields: method "ngram" (prompt lookup) or "draft_model"
    and their settings; another method is refused by name."""
    settings = _json_object(text)
    if settings.get("model") in ("ngram", "[ngram]") and "method" not in settings:  # vLLM's older spelling
        settings["method"] = settings.pop("model")
    method = settings.pop("method", "draft_model" if "model" in settings else "ngram")
    method = "mtp" if method in MTP_METHODS else "ngram" if method == "[ngram]" else method  # (vLLM's older names)
    if method not in METHOD_KEYS:
        raise argparse.ArgumentTypeError(f"only methods ngram (prompt lookup), draft_model and mtp (the model's own "
                                         f"multi-token-prediction layer) are supported, not {method}")
    known = {**SPECULATIVE_KEYS, **METHOD_KEYS[method]}
    if unknown := sorted(set(settings) - set(known)):
        raise argparse.ArgumentTypeError(f"unknown keys {', '.join(unknown)} for method {method} (known: method, "
                                         f"{', '.join(known)})")
    if method == "draft_model" and "model" not in settings:
        raise argparse.ArgumentTypeError("method draft_model needs the draft's folder as model")
    for key, value in settings.items():  # (bool is an int to Python, not to JSON's readers)
        wanted = str if key == "model" else int
        if not isinstance(value, wanted) or isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"{key} must be {'a folder' if wanted is str else 'an integer'}, "
                                             f"got {json.dumps(value)}")
    if method == "ngram" and "num_speculative_tokens" not in settings:  # (it drafted nothing, silently)
        raise argparse.ArgumentTypeError("method ngram needs num_speculative_tokens")
    if method == "mtp":  # vLLM's default: as many drafts as the model has such layers, one in every family served
        settings.setdefault("num_speculative_tokens", 1)
    if method == "ngram" and len({"prompt_lookup_min", "prompt_lookup_max"} & set(settings)) == 1:
        bound = settings.get("prompt_lookup_min", settings.get("prompt_lookup_max"))  # vLLM's: the other alike
        settings = {**settings, "prompt_lookup_min": bound, "prompt_lookup_max": bound}
    # every drafter field, so that the method given wins whole over the environment's (LCQ_SPECULATIVE_MODEL)
    drafter = {"speculative_model": None, "speculative_method": "mtp" if method == "mtp" else None}
    return {**drafter, **{known[key]: value for key, value in settings.items()}}


def _lora_module(text: str) -> str:
    """A --lora-modules value as name=folder entries: itself (name=folder, several joined by commas), or from vLLM's
    JSON form {"name", "path"} (and "base_model_name", the model's: its adapters' parent is the model anyway)."""
    if not text.lstrip().startswith("{"):
        return text
    entry = _json_object(text)
    if unknown := sorted(set(entry) - {"name", "path", "base_model_name"}):
        raise argparse.ArgumentTypeError(f"unknown keys {', '.join(unknown)} (known: name, path, base_model_name)")
    if not all(isinstance(entry.get(key), str) and entry[key] for key in ("name", "path")):
        raise argparse.ArgumentTypeError('a JSON entry needs "name" and "path" strings')
    return f"{entry['name']}={entry['path']}"


def _lora_adapters(text: str) -> str:
    """TGI's --lora-adapters as --lora-modules entries: a bare id or folder is served under its own name."""
    return ",".join(entry if "=" in entry else f"{entry.strip()}={entry.strip()}" for entry in text.split(",")
                    if entry.strip())


def _graph_sizes(text: str) -> dict[str, Any]:
    """TGI's --cuda-graphs: batch sizes separated by commas to capture CUDA graphs for, or 0 for none."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not batch sizes separated by commas (or 0: none)") from None
    if sizes == [0]:
        return {"cuda_graphs": False}
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes must be at least 1 (or 0 alone: none)")
    return {"cuda_graphs": True, "cuda_graph_sizes": sizes}


def _template_of_tokenizer_config(path: str) -> str:
    """TGI's --tokenizer-config-path: the chat template of a tokenizer_config.json."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise argparse.ArgumentTypeError(f"{path}: {getattr(e, 'strerror', None) or e}") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # transformers' named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if not isinstance(template, str) or not template:
        raise argparse.ArgumentTypeError(f"{path} has no chat_template")
    return template


def _kv_cache_dtype(text: str) -> str:
    """--kv-cache-dtype, with vLLM's and TGI's names of the fp8 lcq stores (float8 e4m3) read as fp8; e5m2 refused."""
    if text in ("fp8_e4m3", "fp8_e4m3fn"):
        return "fp8"
    if text == "fp8_e5m2":
        raise argparse.ArgumentTypeError("fp8_e5m2 is not stored here: fp8 (float8 e4m3) is")
    return text


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _json_strings(text: str) -> list[str]:
    """A JSON list of strings, as vLLM's CORS flags take them (a bare value: a list of that one)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = [text]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON list of strings")
    return value


def _context_length(text: str) -> int | None:
    """--max-model-len as vLLM reads it: a count of tokens, or auto or -1 for what the KV cache holds of the
    model's context (the default, None)."""
    return None if text.strip().lower() in ("auto", "-1") else _token_count(text)


def _token_count(text: str) -> int:
    """A count of tokens as vLLM's --max-model-len reads it: a whole number, or one with a suffix, k/m/g for
    powers of 1,000 (25.6k: 25,600) and K/M/G for powers of 1,024 (4K: 4,096)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgKMG]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count of tokens (e.g. 4096, 4k, 4K)")
    number, suffix = match.groups()
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}[suffix]
    value = Decimal(number) * scale  # (exact: 25.6k is 25,600)
    if value != int(value) or (not suffix and "." in number):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of tokens")
    return int(value)


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(text)


FLAGS = (
    Flag("--host", str, "address to listen on", "server"),
    Flag("--port", int, "port to listen on (0: any free port)", "server"),
    Flag("--api-key", str, "require `Authorization: Bearer KEY` on /v1 and tokenizer routes", "server",
         peer_envs=("VLLM_API_KEY", "API_KEY")),
    Flag("--served-model-name", str, "model ids clients use (default: the folder name, or the Hub id); as vLLM's, "
         "several names all answer, and replies name the first", "engine", several=True),
    Flag("--revision", str, "of a model named by its Hugging Face Hub id: the branch, tag or commit fetched "
         "(default main)", "engine", peer_envs=("REVISION",)),
    Flag("--download-dir", str, "where models named by a Hub id are fetched (default: the Hub's cache, HF_HOME)",
         "engine"),
    Flag("--max-num-seqs", int, "sequences decoded together", "engine"),
    Flag("--max-queue", int, "requests that may wait beyond the free batch slots before answering 429 (0: none "
         "wait)", "engine"),
    Flag("--scheduling-policy", str, "fcfs (requests run in order of arrival) or priority (in order of each "
         "request's `priority`, lower first, then arrival; the least urgent running request is the one preempted "
         "when the KV cache is full)", "engine"),
    Flag("--max-model-len", _context_length, "context length (default: the model's); as vLLM's, also 4k (4,000), 4K "
         "(4,096), 25.6k, 1m/1M, and auto or -1 for the default", "engine"),
    Flag("--max-num-batched-tokens", int, "tokens per engine step (prefill chunk budget)", "engine"),
    Flag("--kv-cache-memory-gb", float, "KV cache pool size on CPU", "engine"),
    Flag("--num-gpu-blocks-override", int, "the KV cache's blocks (of --block-size tokens), instead of what memory "
         "gives it: on CPU in place of --kv-cache-memory-gb, on a GPU refused beyond what --gpu-memory-utilization "
         "leaves", "engine"),
    Flag("--kv-cache-dtype", _kv_cache_dtype, "auto (float16 for an fp32 CPU model, else the model dtype), "
         "float16, or on CPU float32 or int8 (each head row in bytes with its scale: 1.9x fp16's tokens), or on a GPU "
         "of compute capability 8.9+ fp8 (float8 e4m3, values clamped to +-448: 2x fp16's tokens; also vLLM's and "
         "TGI's names fp8_e4m3 and fp8_e4m3fn)", "engine", peer_envs=("KV_CACHE_DTYPE",)),
    Flag("--cpu-matmul-dtype", str, "auto (int8 where the CPU has AVX512_VNNI, AVX512_VBMI and AVX512_BF16, else "
         "bfloat16 where it has AVX512_BF16, else int8 without AVX-512, else float32), float32, bfloat16 or int8 "
         "(LCQ layers' products of 10+ rows and decode products in 8 bits, bf16 elsewhere; without those "
         "instructions, LCQ layers' 2- and 4-bit decode products only, fp32 elsewhere): operands of an fp32 CPU "
         "model's products", "engine"),
    Flag("--cpu-int8-weights", str, "auto (when int8 products are on and it takes at most a tenth of the available "
         "memory, a container's limit included), on or off: LCQ layers also keep their weights in the int8 form (1.125 bytes per weight) so that "
         "int8 products read them instead of expanding indices at every step", "engine"),
    Flag("--gpu-memory-utilization", float, "fraction of GPU memory the engine may use", "engine"),
    Flag("--device", str, "auto, cpu or cuda[:N]", "engine"),
    Flag("--dtype", str, "auto, float16, bfloat16 or float32", "engine", peer_envs=("DTYPE",)),
    Flag("--seed", int, "engine seed for requests without their own", "engine"),
    Flag("--lora-modules", _lora_module, "LoRA adapters (PEFT folders or Hub ids) served beside the model, each "
         "under its own model name: name=folder[,name=folder...], or as vLLM takes them, several such values or JSON "
         "objects '{\"name\": ..., \"path\": ...}'", "engine", several=True),
    Flag("--allow-runtime-lora-updating", bool, "serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter "
         "(vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING) to load and unload LoRA adapters while serving: any client "
         "holding the API key may then make the server read a folder of its choosing; without it those routes "
         "answer 404", "engine", peer_envs=("VLLM_ALLOW_RUNTIME_LORA_UPDATING",)),
    Flag("--max-loras", int, "LoRA adapter slots, the adapters one step may run, whose products every step with "
         "an adapter computes; default: the number of --lora-modules, at least 1 with "
         "--allow-runtime-lora-updating", "engine"),
    Flag("--max-cpu-loras", int, "LoRA adapters loaded at once, kept in host memory and copied into a free slot "
         "when a request needs one; default: --max-loras, or the number of --lora-modules if more", "engine"),
    Flag("--max-lora-rank", int, "largest LoRA rank a slot holds; LoRA products cost max-loras x this on every "
         "layer; default: the largest rank of --lora-modules, at least 16 with --allow-runtime-lora-updating", "engine"),
    Flag("--generation-config", str, "sampling defaults for fields a request leaves unset: auto (the model's "
         "generation_config.json, as vLLM), vllm (the built-in OpenAI defaults) or a folder holding one", "engine"),
    Flag("--max-logprobs", int, "the most alternatives a request's logprobs, top_logprobs or prompt_logprobs may ask for "
         "(-1: any; vLLM's)", "engine"),
    Flag("--override-generation-config", _json_object, "generation_config.json values that replace those --generation-"
         "config reads, e.g. '{\"temperature\": 0.5}' (vLLM's; with --generation-config vllm, only these): "
         "temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens", "engine", metavar="JSON"),
    Flag("--no-prefix-caching", bool, "do not reuse KV blocks of shared prompt prefixes", "engine",
         field="enable_prefix_caching", invert=True),
    Flag("--no-enable-prefix-caching", bool, "vLLM's name for --no-prefix-caching", "engine",
         field="enable_prefix_caching", invert=True),
    Flag("--enable-prefix-caching", bool, "vLLM's: reuse KV blocks of shared prompt prefixes (the default)", "engine"),
    Flag("--block-size", int, "tokens per KV cache block: 8, 16 or 32 (vLLM's)", "engine"),
    Flag("--tokenizer", str, "the tokenizer's folder or Hub id, where it is not the model's (vLLM's); its chat "
         "template too", "engine"),
    Flag("--tokenizer-revision", str, "of a tokenizer named by its Hub id: the branch, tag or commit fetched "
         "(default main)", "engine"),
    Flag("--batch-invariant", bool, "a request's logits the same whatever else shares its steps, however its prompt "
         "is split and whether it comes from the prefix cache, so that temperature 0 and a request's seed repeat "
         "its tokens (vLLM's VLLM_BATCH_INVARIANT=1): every row's products in the forms that give what it alone "
         "would, every query through the prefill attention's tiles; CPU only, models of softmax attention and "
         "dense MLPs, no speculative decoding or LoRA; slower (docs/configuration.md)", "engine"),
    Flag("--mamba-ssm-cache-dtype", str, "float32 (default), auto (the model dtype), bfloat16 or float16: the "
         "recurrent states of linear attention and Mamba-2 layers (Qwen3.5, Qwen3-Next, Granite 4.0-H, Bamba, "
         "Nemotron-H, Falcon-H1), computed in fp32 and stored so; a half dtype halves their memory", "engine"),
    Flag("--state-snapshots", int, "recurrent layers' (Qwen3.5's, Qwen3-Next's, Granite 4.0-H's, Bamba's, "
         "Nemotron-H's, Falcon-H1's, LFM2's) prefix caching: how many prompts' states are kept for reuse, each as "
         "large as a sequence's states (0: no prefix caching for these models)", "engine"),
    Flag("--disable-hybrid-kv-cache-manager", bool, "keep every KV block of a sequence in sliding-window layers "
         "too, rather than handing back the blocks their window has passed (vLLM's name)", "engine",
         field="hybrid_kv_cache", invert=True),
    Flag("--no-cuda-graphs", bool, "run decode steps eagerly on CUDA", "engine", field="cuda_graphs", invert=True),
    Flag("--cuda-graph-sizes", int, "the decode batch sizes CUDA graphs are captured for (vLLM's; default 1, 2, 4, "
         "8, then multiples of 16 up to --max-num-seqs): a batch between two is padded to the larger, a larger one "
         "runs eagerly", "engine", several=True),
    Flag("--enforce-eager", bool, "vLLM's name for --no-cuda-graphs", "engine", field="cuda_graphs", invert=True),
    Flag("--async-scheduling", bool, "launch each decode step from the last one's tokens on the device before the "
         "host reads them, so that the GPU does not wait while the host detokenizes and schedules (default on a "
         "GPU; on CPU nothing overlaps)", "engine"),
    Flag("--no-async-scheduling", bool, "wait for each step's tokens before launching the next", "engine",
         field="async_scheduling", invert=True),
    Flag("--chat-template", str, "the chat template to use instead of the model's: a Jinja file, or the template "
         "itself (vLLM's --chat-template)", "engine"),
    Flag("--chat-template-content-format", str, "auto (default: a template that loops over a message's content "
         "gets it as a list of {\"type\": \"text\", \"text\": ...} parts, any other as a string), string or openai "
         "(always parts): how messages reach the chat template (vLLM's flag)", "server"),
    Flag("--num-speculative-tokens", int, "speculative decoding: up to this many drafts verified per step (0: off), "
         "copied from earlier in each sequence (prompt lookup: for outputs that repeat their context) or proposed "
         "by --speculative-model", "engine"),
    Flag("--prompt-lookup-max", int, "longest n-gram that prompt lookup matches", "engine"),
    Flag("--prompt-lookup-min", int, "shortest n-gram that prompt lookup matches", "engine"),
    Flag("--speculative-disable-by-batch-size", int, "no drafts while this many sequences or more run (the "
         "default 2 drafts at batch 1 only: on CPU, draft rows of several sequences cost what they save)", "engine"),
    Flag("--speculative-model", str, "a draft model's folder or Hub id: a smaller model of the same tokenizer drafts "
         "--num-speculative-tokens tokens a step instead of prompt lookup (vLLM's older name)", "engine"),
    Flag("--speculative-config", _speculative_config, "vLLM's JSON form of the flags above: "
         '\'{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2}\' '
         'or \'{"model": "/models/draft", "num_speculative_tokens": 4}\' or \'{"method": "mtp", '
         '"num_speculative_tokens": 1}\' (the model\'s own multi-token-prediction layer: DeepSeek-V3, GLM-4.5, '
         'GLM-4.7-Flash, Qwen3-Next, Qwen3.5) (disable_by_batch_size too)', "engine",
         expands=True, metavar="JSON"),
    Flag("--drain-timeout", float, "seconds in-flight requests get to finish on SIGTERM", "server"),
    Flag("--max-body-bytes", int, "largest request body accepted (413 above)", "server"),
    Flag("--keepalive-interval", float, "seconds between SSE keep-alive comments", "server"),
    Flag("--log-level", str, "uvicorn log level", "server"),
    Flag("--ssl-certfile", str, "serve HTTPS with this certificate (PEM; vLLM's, uvicorn's)", "server"),
    Flag("--ssl-keyfile", str, "the certificate's private key (PEM)", "server"),
    Flag("--ssl-ca-certs", str, "CA certificates (PEM) to check client certificates by", "server"),
    Flag("--disable-uvicorn-access-log", bool, "no line per HTTP request in the log (vLLM's)", "server"),
    Flag("--disable-fastapi-docs", bool, "serve no /openapi.json schema and no /docs or /redoc pages, which stay "
         "open when --api-key is set (vLLM's)", "server"),
    Flag("--trust-remote-code", bool, "accepted for vLLM's command lines: lcq runs no code from a model's folder "
         "(its own model code reads every supported family)", "server"),
    Flag("--tensor-parallel-size", int, "accepted for vLLM's command lines: 1 only (one device per process)",
         "server"),
    Flag("--pipeline-parallel-size", int, "accepted for vLLM's command lines: 1 only", "server"),
    # TGI's launcher's names, and the variables its image reads (not HOSTNAME or PORT, which every container or
    # platform sets for itself)
    Flag("--num-shard", int, "accepted for TGI's launcher command lines: 1 only (one device per process)", "server",
         field="tensor_parallel_size", peer_envs=("NUM_SHARD",)),
    Flag("--hostname", str, "TGI's launcher's name of --host", "server", field="host"),
    Flag("--max-total-tokens", int, "TGI's launcher's name of --max-model-len: prompt and reply tokens together",
         "engine", field="max_model_len", peer_envs=("MAX_TOTAL_TOKENS",)),
    Flag("--max-batch-prefill-tokens", int, "TGI's launcher's name of --max-num-batched-tokens", "engine",
         field="max_num_batched_tokens", peer_envs=("MAX_BATCH_PREFILL_TOKENS",)),
    Flag("--max-batch-size", int, "TGI's launcher's name of --max-num-seqs", "engine", field="max_num_seqs",
         peer_envs=("MAX_BATCH_SIZE",)),
    Flag("--max-input-tokens", int, "TGI's launcher's: the most tokens a prompt may have, after any truncation "
         "(longer ones are a 400, on TGI's routes its 422); default: only the context bounds it", "server",
         peer_envs=("MAX_INPUT_TOKENS",)),
    Flag("--max-input-length", int, "TGI's launcher's older name of --max-input-tokens", "server",
         field="max_input_tokens", peer_envs=("MAX_INPUT_LENGTH",)),
    Flag("--max-best-of", int, "TGI's launcher's: the largest best_of TGI's routes take (422 above)", "server",
         peer_envs=("MAX_BEST_OF",)),
    Flag("--max-stop-sequences", int, "TGI's launcher's: the most stop sequences TGI's routes take", "server",
         peer_envs=("MAX_STOP_SEQUENCES",)),
    Flag("--max-top-n-tokens", int, "TGI's launcher's: the largest top_n_tokens TGI's routes take", "server",
         peer_envs=("MAX_TOP_N_TOKENS",)),
    Flag("--max-concurrent-requests", _concurrent_requests, "TGI's launcher's: requests running and waiting "
         "together, 429 beyond: --max-queue becomes this less --max-num-seqs (and --max-num-seqs this, if smaller)",
         "engine", expands=True, metavar="N", peer_envs=("MAX_CONCURRENT_REQUESTS",)),
    Flag("--max-batch-total-tokens", int, "TGI's launcher's: the tokens the KV cache holds, prompts' and "
         "generated, of all running sequences together (whole blocks; as --num-gpu-blocks-override)", "engine",
         peer_envs=("MAX_BATCH_TOTAL_TOKENS",)),
    Flag("--cuda-memory-fraction", float, "TGI's launcher's name of --gpu-memory-utilization", "engine",
         field="gpu_memory_utilization", peer_envs=("CUDA_MEMORY_FRACTION",)),
    Flag("--cors-allow-origin", _comma_list, "TGI's launcher's form of --allowed-origins: origins separated by "
         "commas", "server", field="allowed_origins", peer_envs=("CORS_ALLOW_ORIGIN",)),
    Flag("--speculate", int, "TGI's launcher's name of --num-speculative-tokens: drafts by n-gram prompt lookup",
         "engine", field="num_speculative_tokens", peer_envs=("SPECULATE",)),
    Flag("--payload-limit", int, "TGI's launcher's name of --max-body-bytes", "server", field="max_body_bytes",
         peer_envs=("PAYLOAD_LIMIT",)),
    Flag("--graceful-termination-timeout", float, "TGI's launcher's name of --drain-timeout", "server",
         field="drain_timeout", peer_envs=("GRACEFUL_TERMINATION_TIMEOUT",)),
    Flag("--huggingface-hub-cache", str, "TGI's launcher's name of --download-dir", "engine", field="download_dir",
         peer_envs=("HUGGINGFACE_HUB_CACHE",)),
    Flag("--json-output", bool, "TGI's launcher's: the log as JSON lines, {\"timestamp\", \"level\", \"fields\": "
         "{\"message\"}, \"target\"} as TGI writes them, uvicorn's lines too", "server", peer_envs=("JSON_OUTPUT",)),
    Flag("--disable-grammar-support", bool, "TGI's launcher's: refuse requests for structured output (JSON schemas, "
         "regexes, grammars, choices; tool calls forced by tool_choice) with a 400 (TGI's routes: 422)", "server",
         peer_envs=("DISABLE_GRAMMAR_SUPPORT",)),
    Flag("--cuda-graphs", _graph_sizes, "TGI's launcher's form of --cuda-graph-sizes: batch sizes separated by "
         "commas, or 0 for none (--no-cuda-graphs)", "engine", expands=True, metavar="SIZES",
         peer_envs=("CUDA_GRAPHS",)),
    Flag("--tokenizer-config-path", _template_of_tokenizer_config, "TGI's launcher's: a tokenizer_config.json whose "
         "chat_template is used instead of the model's (as --chat-template)", "engine", field="chat_template",
         metavar="FILE", peer_envs=("TOKENIZER_CONFIG_PATH",)),
    Flag("--sharded", _bool, "accepted for TGI's launcher command lines: false only (one device per process)",
         "server", metavar="BOOL", peer_envs=("SHARDED",)),
    Flag("--enable-prefill-logprobs", bool, "accepted for TGI's launcher command lines: prompt logprobs "
         "(decoder_input_details) are computed wherever a request asks", "server",
         peer_envs=("ENABLE_PREFILL_LOGPROBS",)),
    Flag("--usage-stats", str, "accepted for TGI's launcher command lines (on, off or no-stack): lcq sends no usage "
         "statistics", "server", peer_envs=("USAGE_STATS",)),
    Flag("--disable-usage-stats", bool, "accepted for TGI's launcher command lines: lcq sends no usage statistics",
         "server"),
    Flag("--lora-adapters", _lora_adapters, "TGI's launcher's form of --lora-modules: Hub ids or folders separated "
         "by commas, each served under its own name (a Hub id's name is the id), or name=folder entries", "engine",
         field="lora_modules", peer_envs=("LORA_ADAPTERS",)),
    Flag("--data-parallel-size", int, "accepted for vLLM's command lines: 1 only (run replicas instead)", "server"),
    Flag("--enable-lora", bool, "accepted for vLLM's command lines: LoRA adapters are served where --lora-modules or "
         "--allow-runtime-lora-updating asks", "server"),
    Flag("--enable-chunked-prefill", bool, "accepted for vLLM's command lines: prompts are always prefilled in "
         "chunks of --max-num-batched-tokens", "server"),
    Flag("--guided-decoding-backend", str, "accepted for vLLM's command lines: auto or xgrammar, which compiles "
         "every grammar here", "server"),
    Flag("--load-format", str, "accepted for vLLM's command lines: auto or safetensors, the weights lcq reads",
         "server"),
    Flag("--tokenizer-mode", str, "accepted for vLLM's command lines: auto only (transformers' tokenizer)",
         "server"),
    Flag("--swap-space", float, "accepted for vLLM's command lines: preempted sequences are recomputed, not swapped "
         "to host memory", "server"),
    Flag("--max-seq-len-to-capture", int, "accepted for vLLM's command lines: the decode steps' CUDA graphs serve "
         "every context length", "server"),
    Flag("--disable-log-stats", bool, "no line of throughput, requests and KV cache usage every 10 s while there is "
         "work (vLLM's)", "server"),
    Flag("--enable-log-requests", bool, "log each request: its id, model, sampling settings and prompt (vLLM's)",
         "server"),
    Flag("--enable-log-outputs", bool, "with --enable-log-requests, log each finished choice too: its finish reason, "
         "text and token ids (vLLM's)", "server"),
    Flag("--max-log-len", int, "with --enable-log-requests, at most this many characters of a prompt and token ids "
         "of it (vLLM's; default: all)", "server"),
    Flag("--disable-log-requests", bool, "accepted for vLLM's command lines: requests are logged only with "
         "--enable-log-requests", "server"),
    Flag("--enable-force-include-usage", bool, "every stream ends with a usage chunk, as stream_options "
         "include_usage asks (vLLM's)", "server"),
    Flag("--enable-prompt-tokens-details", bool, "accepted for vLLM's command lines: usage always has "
         "prompt_tokens_details (cached tokens)", "server"),
    Flag("--root-path", str, "the path prefix under which a proxy serves the API (vLLM's; uvicorn's root_path)",
         "server"),
    Flag("--allowed-origins", _json_strings, "browser origins allowed to call the API, a JSON list (vLLM's)", "server",
         metavar="JSON"),
    Flag("--allowed-methods", _json_strings, "HTTP methods allowed across origins, a JSON list", "server",
         metavar="JSON"),
    Flag("--allowed-headers", _json_strings, "request headers allowed across origins, a JSON list", "server",
         metavar="JSON"),
    Flag("--allow-credentials", bool, "let browsers send cookies and credentials across origins (needs "
         "--allowed-origins naming the origins: not with \"*\")", "server"),
    Flag("--uvicorn-log-level", str, "vLLM's name for --log-level", "server", field="log_level"),
    Flag("--tool-call-parser", str, "hermes (<tool_call>{...}</tool_call> blocks: Qwen2.5, Hermes), llama3_json "
         "(replies that are JSON calls: Llama 3.1-3.3), granite (replies that are a JSON array of calls: Granite 3), "
         "mistral ([TOOL_CALLS] calls: Mistral 7B v0.3, Mistral Small 3.x), pythonic ([f(x=1)]: Llama 3.2 1B/3B, "
         "Llama 4), phi4_mini_json (functools[...]: Phi-4-mini), olmo3 (<function_calls> of pythonic lines), "
         "ernie45 (hermes's blocks: ERNIE 4.5), internlm (<|action_start|><|plugin|> calls: InternLM2/3), seed_oss "
         "or qwen3_coder (XML calls: Seed-OSS, Qwen3-Coder), openai (harmony calls: gpt-oss, with --reasoning-parser "
         "openai_gptoss), glm45 or glm47 (<tool_call>NAME<arg_key>..: GLM-4.5 to 4.7), deepseek_v3 or deepseek_v31 "
         "(<｜tool▁calls▁begin｜> calls: DeepSeek-V3, R1, V3.1), minimax_m2 (<minimax:tool_call> XML calls: "
         "MiniMax-M2), llama_nemotron_json or nemotron_json (<TOOLCALL>[...]</TOOLCALL>: Llama-Nemotron, "
         "Nemotron-Nano v2): how replies are read so that tool_choice auto works",
         "server"),
    Flag("--enable-auto-tool-choice", bool, "accepted for vLLM's command lines: tool_choice auto works whenever "
         "--tool-call-parser is set, which this flag then requires", "server"),
    Flag("--reasoning-parser", str, "deepseek_r1, qwen3, glm45, deepseek_v3, minimax_m2 or nano_v3 (all read "
         "<think>...</think>: DeepSeek-R1 and its distills, QwQ, Qwen3, GLM-4.5 to 4.7, DeepSeek-V3.1, MiniMax-M2, "
         "Nemotron 3), or openai_gptoss (gpt-oss's harmony channels: analysis is the thinking): the thinking goes "
         "to `reasoning` (chat) or a reasoning item (Responses), the answer to the content, and response_format "
         "applies after <think>'s thinking", "server"),
    Flag("--enable-reasoning", bool, "accepted for vLLM's older command lines: thinking is split from the answer "
         "whenever --reasoning-parser is set, which this flag then requires", "server"),
    Flag("--responses-store-size", int, "responses of /v1/responses kept in memory for GET and previous_response_id, "
         "the least recently used dropped beyond it (0: none kept)", "server"),
    Flag("--return-tokens-as-token-ids", bool, "logprobs name each token \"token_id:{id}\" rather than by its text "
         "(vLLM's), unless a request's return_tokens_as_token_ids says otherwise", "server"),
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL plus every flag; defaults stay None so the environment can fill what the command line left out."""
    parser.add_argument("model", nargs="?", default=None,
                        help="LCQ or fp16 Hugging Face folder, or a Hugging Face Hub id (org/name) fetched into the "
                             "Hub's cache (env LCQ_MODEL, or TGI's MODEL_ID; default: the demo model)")
    parser.add_argument("--model", "--model-id", dest="model_flag", default=None, metavar="MODEL",
                        help="the model as a flag, as vLLM's OpenAI server image (--model) and TGI's launcher "
                             "(--model-id) take it (instead of MODEL)")
    from lcq.runtime.config import EngineConfig

    defaults = {"server": ServeSettings.__dataclass_fields__, "engine": EngineConfig.__dataclass_fields__}
    for flag in FLAGS:
        spec = None if flag.switch or flag.expands else defaults[flag.target][flag.field or flag.dest]
        default = None if spec is None else \
            json.dumps(spec.default_factory()) if spec.default_factory is not MISSING else spec.default
        shown = f" (env {' or '.join(flag.envs)}" + (f"; default {default})" if default not in (None, "") else ")")
        if flag.switch:
            parser.add_argument(flag.name, action="store_true", default=None, help=flag.help + shown)
        else:
            parser.add_argument(flag.name, type=flag.type, default=None, help=flag.help + shown,
                                metavar=flag.metavar or flag.dest.upper(), nargs="+" if flag.several else None)


def in_flag_terms(message: str) -> str:
    """An engine setting's message (EngineConfig names its fields) as `lcq serve` says it: each field a flag
    sets under its own name, as that flag (max_num_seqs -> --max-num-seqs). Only names with an underscore,
    which no English word has (not `device`, `seed`)."""
    for flag in FLAGS:
        name = flag.field or flag.dest
        if flag.target == "engine" and not flag.invert and not flag.expands and "_" in name:  # (not in a path
            message = re.sub(rf"(?<![\w/.-]){name}\b(?!\.\w)", flag.name, message)  # or file name: x/name.json)
    return message


def _value(flag: Flag, args: argparse.Namespace, env: Mapping[str, str]) -> tuple[Any, int]:
    """The flag's value from the command line, else the environment, else None (the dataclass default), and
    how strongly it holds where several flags set one field: 3 from the command line, 2 from LCQ_<FLAG>, 1 from
    vLLM's or TGI's variable."""
    value = getattr(args, flag.dest, None)
    name = next((name for name in flag.envs if name in env), None)
    strength = 3 if value is not None else 2 if name == flag.env else 1
    if value is None and name is not None:
        try:
            read = _bool if flag.switch else flag.type
            value = [read(part) for part in env[name].split()] if flag.several else read(env[name])
        except ValueError:
            raise UserError(f"{name}={env[name]!r} is not a valid {flag.type.__name__}") from None
        except argparse.ArgumentTypeError as e:
            raise UserError(f"{name}: {e}") from None
    if flag.several and isinstance(value, list) and len(value) <= 1:  # (one name: as a plain value)
        value = value[0] if value else None
    if flag.switch and value is False:  # an environment's "0" for a switch: not set (LCQ_ENFORCE_EAGER=0 must not
        value = None                    # undo LCQ_NO_CUDA_GRAPHS=1, which sets the same field)
    if value is not None and flag.invert:
        value = not value
    return value, strength


@dataclass
class ServeCommand:
    """Everything `lcq serve` resolved: the model folder (None: the demo), engine fields, server settings."""

    model: str | None
    engine_fields: dict[str, Any] = field(default_factory=dict)
    settings: ServeSettings = field(default_factory=ServeSettings)


def resolve(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServeCommand:
    env = os.environ if env is None else env
    engine_fields: dict[str, Any] = {}
    server_fields: dict[str, Any] = {}
    values = [(flag, *_value(flag, args, env)) for flag in FLAGS]
    # the weakest values first, so that the command line's win where several flags set one field (--no-cuda-graphs
    # and --enforce-eager; --speculative-config and the speculative flags), and lcq's variables over vLLM's or TGI's
    for flag, value, _ in sorted(values, key=lambda item: item[2]):
        fields = server_fields if flag.target == "server" else engine_fields
        if value is not None and flag.expands:
            fields.update(value)
        elif value is not None:
            fields[flag.field or flag.dest] = value
    if (limit := engine_fields.pop("max_concurrent_requests", None)) is not None:
        if "max_queue" in engine_fields:
            raise UserError("give --max-queue or TGI's --max-concurrent-requests, not both")
        from lcq.runtime.config import EngineConfig

        seqs = min(engine_fields.get("max_num_seqs", EngineConfig.max_num_seqs), limit)
        engine_fields.update(max_num_seqs=seqs, max_queue=limit - seqs)
    flag_model = getattr(args, "model_flag", None)
    if args.model is not None and flag_model is not None and args.model != flag_model:
        raise UserError(f"two models given: {args.model} and --model {flag_model}")
    given = args.model if args.model is not None else flag_model
    model = given if given is not None else (env.get("LCQ_MODEL") or env.get("MODEL_ID") or None)  # (TGI's image's)
    return ServeCommand(model=model, engine_fields=engine_fields, settings=ServeSettings(**server_fields))
