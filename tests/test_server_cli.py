"""`lcq serve`: flags and LCQ_* environment settings, usage errors, and a graceful drain on SIGTERM."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from lcq.cli import build_parser, main
from lcq.errors import UserError
from lcq.runtime.config import EngineConfig
from lcq.server.settings import REASONING_PARSERS, TOOL_CALL_PARSERS, resolve
from tests.tiny_model import make_tiny_hf


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_help_lists_flags_and_env(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--api-key", "--max-num-seqs", "--max-queue", "--max-model-len",
                 "--no-prefix-caching", "--drain-timeout", "--max-body-bytes", "LCQ_PORT"):
        assert flag in out
    words = set(re.findall(r"\w+", out))
    assert not {*TOOL_CALL_PARSERS, *REASONING_PARSERS} - words, "a parser the help does not name"


@pytest.mark.parametrize("argv", [["--port", "abc"], ["--bogus-flag"], ["--max-num-seqs"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *argv])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_bad_values_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    monkeypatch.setenv("LCQ_PORT", "eighty")
    assert main(["serve", str(tmp_path)]) == 2
    monkeypatch.setenv("LCQ_PORT", "70000")
    assert main(["serve", str(tmp_path)]) == 2
    monkeypatch.delenv("LCQ_PORT")
    assert main(["serve", str(tmp_path), "--max-num-seqs", "0"]) == 2  # EngineConfig.validate
    assert main(["serve", str(tmp_path), "--log-level", "loud"]) == 2
    assert main(["serve", str(tmp_path), "--tool-call-parser", "xml"]) == 2
    assert main(["serve", str(tmp_path), "--drain-timeout", "inf"]) == 2
    assert main(["serve", str(tmp_path), "--kv-cache-memory-gb", "inf"]) == 2
    read_only = tmp_path / "file"
    read_only.write_text("")
    monkeypatch.setenv("LCQ_CACHE", str(read_only / "cache"))  # (root may write anywhere: under a file, then)
    assert main(["serve"]) == 2  # the demo model's cache
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 9 and all(line.startswith("lcq: error: ") for line in lines)
    assert lines[3] == "lcq: error: --max-num-seqs must be at least 1"  # the flag, not EngineConfig's field
    assert "tool call parser" in lines[5] and "drain timeout" in lines[6] and "finite" in lines[7]
    assert "cannot be the cache folder" in lines[8]
    assert "missing" in lines[0] and "LCQ_PORT" in lines[1] and "port" in lines[2]


def test_an_unservable_folder_or_address_exits_2_before_loading(tmp_path, capsys):
    """A folder without readable weights, a device this machine lacks, a port already taken: one line and exit 2
    before the model loads (not a traceback from the background load, nor uvicorn's exit 3 after it)."""
    model = make_tiny_hf(tmp_path / "tiny")
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((model / "config.json").read_text())
    capsys.readouterr()  # (the model's writing)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [([str(weightless), "--port", "0"], "safetensors"),
                 ([str(model), "--device", "tpu", "--port", "0"], "device must be auto, cpu or cuda"),
                 ([str(model), "--host", "127.0.0.1", "--port", str(port)], "cannot listen on 127.0.0.1")]
        for args, reason in cases:
            assert main(["serve", *args]) == 2, args
            error = capsys.readouterr().err.strip()
            assert error.startswith("lcq: error: ") and reason in error and "\n" not in error, (args, error)


def test_a_model_the_settings_cannot_serve_exits_2_with_its_reason(tmp_path, capsys):
    """Settings the engine refuses only once it reads the model (a context past the model's, a drafting method
    the folder has no layer for) end the command with that reason in one line, not "see the log"."""
    model = make_tiny_hf(tmp_path / "tiny")
    for flags, reason in ((["--max-model-len", "100000"], "--max-model-len 100000 is longer than the model's context"),
                          (["--speculative-config", '{"method": "mtp", "num_speculative_tokens": 1}'],
                           "no multi-token-prediction layer to draft with")):
        assert main(["serve", str(model), "--host", "127.0.0.1", "--port", "0", "--kv-cache-memory-gb", "0.05",
                     *flags]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("lcq: error: ") and reason in last
    # the architecture and the context are read before the server starts: one line, no server log
    other = tmp_path / "bert"
    shutil.copytree(model, other)
    (other / "config.json").write_text(json.dumps({**json.loads((model / "config.json").read_text()),
                                                   "architectures": ["BertModel"], "model_type": "bert"}))
    for folder, flags, reason in ((other, [], "architecture BertModel is not supported"),
                                  (model, ["--max-model-len", "100000"], "--max-model-len 100000 is longer")):
        assert main(["serve", str(folder), "--host", "127.0.0.1", "--port", "0", *flags]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and reason in lines[0]


def test_flags_win_over_environment():
    env = {"LCQ_MODEL": "/models/a", "LCQ_PORT": "9000", "LCQ_API_KEY": "k", "LCQ_MAX_NUM_SEQS": "4",
           "LCQ_NO_PREFIX_CACHING": "true", "LCQ_KEEPALIVE_INTERVAL": "2.5"}
    from_env = resolve(parse(), env)
    assert from_env.model == "/models/a"
    assert (from_env.settings.port, from_env.settings.api_key, from_env.settings.keepalive_interval) == (9000, "k", 2.5)
    assert from_env.engine_fields == {"max_num_seqs": 4, "enable_prefix_caching": False}
    from_flags = resolve(parse("/models/b", "--port", "1234", "--max-num-seqs", "2", "--no-cuda-graphs",
                               "--kv-cache-dtype", "float16"), env)
    assert from_flags.model == "/models/b" and from_flags.settings.port == 1234
    assert from_flags.engine_fields == {"max_num_seqs": 2, "enable_prefix_caching": False, "cuda_graphs": False,
                                        "kv_cache_dtype": "float16"}
    defaults = resolve(parse(), {})
    assert defaults.model is None and defaults.engine_fields == {} and defaults.settings.port == 8000
    # where two flags set one field, the command line's wins over the other's environment variable too
    assert resolve(parse("--no-cuda-graphs"), {"LCQ_ENFORCE_EAGER": "false"}).engine_fields == {"cuda_graphs": False}
    assert resolve(parse("--enforce-eager"), {"LCQ_NO_CUDA_GRAPHS": "0"}).engine_fields == {"cuda_graphs": False}
    # async scheduling: on by default on a GPU only; either flag sets it
    assert resolve(parse("--async-scheduling"), {"LCQ_NO_ASYNC_SCHEDULING": "1"}).engine_fields == \
        {"async_scheduling": True}
    assert resolve(parse(), {"LCQ_NO_ASYNC_SCHEDULING": "1"}).engine_fields == {"async_scheduling": False}
    assert resolve(parse("--batch-invariant"), {}).engine_fields == {"batch_invariant": True}
    assert resolve(parse(), {"LCQ_BATCH_INVARIANT": "1"}).engine_fields == {"batch_invariant": True}
    assert [EngineConfig(model="m", device=device).resolved_async_scheduling() for device in ("cpu", "cuda")] == \
        [False, True]
    assert not EngineConfig(model="m", device="cuda", async_scheduling=False).resolved_async_scheduling()
    speculative = {"LCQ_SPECULATIVE_CONFIG": '{"method": "ngram", "num_speculative_tokens": 7}'}
    assert resolve(parse("--num-speculative-tokens", "2"), speculative).engine_fields == {
        "num_speculative_tokens": 2, "speculative_model": None, "speculative_method": None}


def test_vllm_flags_chat_template_enforce_eager_and_auto_tool_choice(tmp_path, capsys):
    """vLLM's --chat-template (a file or the template itself), --enforce-eager (--no-cuda-graphs) and
    --enable-auto-tool-choice (which needs --tool-call-parser, as in vLLM)."""
    from lcq.runtime import LLM, EngineConfig

    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    command = resolve(parse("--chat-template", str(template), "--enforce-eager", "--enable-auto-tool-choice",
                            "--tool-call-parser", "hermes"), {})
    assert command.engine_fields == {"chat_template": str(template), "cuda_graphs": False}
    assert command.settings.enable_auto_tool_choice and command.settings.tool_call_parser == "hermes"
    assert main(["serve", str(tmp_path), "--enable-auto-tool-choice"]) == 2
    assert main(["serve", str(tmp_path), "--chat-template", str(tmp_path / "missing.jinja")]) == 2
    broken = tmp_path / "broken.jinja"  # it parses not: refused at start, not as every chat request's 400
    broken.write_text("{% for m in messages %}{{ m['content'] }}")
    assert main(["serve", str(tmp_path), "--chat-template", str(broken)]) == 2
    assert main(["serve", str(tmp_path), "--chat-template", "{% if %}"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert "needs --tool-call-parser" in errors[0] and "neither a file nor a Jinja template" in errors[1]
    assert f"{broken} is not a valid Jinja template (line 1: " in errors[2]
    assert "the template given is not a valid Jinja template (line 1: " in errors[3]
    assert len(errors) == 4
    model = make_tiny_hf(tmp_path / "tiny")
    messages = [{"role": "user", "content": "Hi"}]
    generation = ("{% for m in messages %}{% generation %}<{{ m['role'] }}>{% endgeneration %}{{ m['content'] }}"
                  "{% if loop.last %}{% break %}{% endif %}{% endfor %}")  # transformers' tags and loop controls
    for chat_template in (str(template), template.read_text(), generation):
        tokenizer = LLM(str(model), chat_template=chat_template).tokenizer
        assert tokenizer.apply_chat_template(messages, tokenize=False) == "<user>Hi"
    # a template's text with a stretch longer than a file name may be: no file to look for (it raised OSError)
    long = "{{ '" + "x" * 300 + "' }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert EngineConfig(model=str(model), chat_template=long).resolved_chat_template() == long


def test_vllm_flags_of_caching_tokenizer_and_logging(tmp_path):
    """vLLM's --enable-prefix-caching / --no-enable-prefix-caching, --block-size, --tokenizer (its chat template too)
    and the logging and usage flags, as settings; --disable-log-requests and --enable-prompt-tokens-details are
    accepted (what they ask is the default), and contradicting logging flags are refused."""
    from lcq.runtime import LLM

    assert resolve(parse("--no-enable-prefix-caching", "--block-size", "32"), {}).engine_fields == {
        "enable_prefix_caching": False, "block_size": 32}
    assert resolve(parse("--enable-prefix-caching"), {}).engine_fields == {"enable_prefix_caching": True}
    assert resolve(parse("--override-generation-config", '{"temperature": 0.5}'), {}).engine_fields == {
        "override_generation_config": {"temperature": 0.5}}
    with pytest.raises(UserError, match="LCQ_OVERRIDE_GENERATION_CONFIG: a JSON object is needed"):
        resolve(parse(), {"LCQ_OVERRIDE_GENERATION_CONFIG": "[1]"})
    command = resolve(parse("--tokenizer", "org/tok", "--tokenizer-revision", "v2", "--disable-log-stats",
                            "--enable-log-requests", "--max-log-len", "100", "--enable-force-include-usage",
                            "--enable-prompt-tokens-details"), {})
    assert command.engine_fields == {"tokenizer": "org/tok", "tokenizer_revision": "v2"}
    settings = command.settings
    assert settings.disable_log_stats and settings.enable_log_requests and settings.max_log_len == 100
    assert settings.enable_force_include_usage and settings.enable_prompt_tokens_details
    assert resolve(parse("--disable-log-requests"), {}).settings.disable_log_requests
    with pytest.raises(UserError, match="contradict"):
        resolve(parse("--disable-log-requests", "--enable-log-requests"), {})
    assert resolve(parse("--enable-reasoning", "--reasoning-parser", "qwen3"), {}).settings.enable_reasoning
    with pytest.raises(UserError, match="--enable-reasoning needs --reasoning-parser"):
        resolve(parse("--enable-reasoning"), {})
    with pytest.raises(UserError, match="--enable-log-outputs needs --enable-log-requests"):
        resolve(parse("--enable-log-outputs"), {})
    with pytest.raises(UserError, match="max log len"):
        resolve(parse("--max-log-len", "-1"), {})
    assert resolve(parse("--model", "org/name"), {}).model == "org/name"  # (vLLM's image takes it so)
    # a vLLM deployment's variables for the API key and runtime LoRA updating, where lcq's own are not set
    vllm = resolve(parse(), {"VLLM_API_KEY": "k", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    assert vllm.settings.api_key == "k" and vllm.engine_fields == {"allow_runtime_lora_updating": True}
    assert resolve(parse(), {"VLLM_API_KEY": "k", "LCQ_API_KEY": "mine"}).settings.api_key == "mine"
    assert resolve(parse("--api-key", "flag"), {"VLLM_API_KEY": "k"}).settings.api_key == "flag"
    with pytest.raises(UserError, match="api key must not be empty"):
        resolve(parse(), {"VLLM_API_KEY": ""})
    with pytest.raises(UserError, match="two models given: a and --model b"):
        resolve(parse("a", "--model", "b"), {})
    accepted = resolve(parse("--enable-lora", "--enable-chunked-prefill", "--guided-decoding-backend", "xgrammar",
                             "--load-format", "safetensors", "--tokenizer-mode", "auto", "--pipeline-parallel-size",
                             "1", "--data-parallel-size", "1"), {})
    assert accepted.engine_fields == {} and accepted.settings.enable_lora
    # a vLLM deployment's command line of the kind its guides give, whole
    vllm_line = ("org/model --host 0.0.0.0 --port 8000 --dtype auto --max-model-len 8192 --gpu-memory-utilization 0.9 "
                 "--enable-prefix-caching --enable-chunked-prefill --max-num-seqs 64 --max-num-batched-tokens 4096 "
                 "--served-model-name qwen --api-key X --disable-log-requests --enable-auto-tool-choice "
                 "--tool-call-parser hermes --trust-remote-code --tensor-parallel-size 1 --swap-space 4 "
                 "--max-seq-len-to-capture 8192 --uvicorn-log-level warning --block-size 16 --seed 0")
    command = resolve(parse(*vllm_line.split()), {})
    assert command.model == "org/model" and command.settings.api_key == "X" and command.engine_fields["max_num_seqs"] == 64
    # a TGI launcher's: its names of the model, the host, the context, the prefill budget and the batch
    tgi_line = "--model-id org/model --hostname 0.0.0.0 --port 80 --max-input-length 2048 --max-total-tokens 4096 " \
               "--max-batch-prefill-tokens 2048 --max-batch-size 32 --max-concurrent-requests 128 --num-shard 1"
    command = resolve(parse(*tgi_line.split()), {})
    assert command.model == "org/model" and (command.settings.host, command.settings.port) == ("0.0.0.0", 80)
    assert command.engine_fields == {"max_model_len": 4096, "max_num_batched_tokens": 2048, "max_num_seqs": 32,
                                     "max_queue": 96}
    assert command.settings.max_input_tokens == 2048
    limits = resolve(parse("--max-best-of", "2", "--max-stop-sequences", "4"), {"MAX_TOP_N_TOKENS": "5"}).settings
    assert (limits.max_best_of, limits.max_stop_sequences, limits.max_top_n_tokens) == (2, 4, 5)
    with pytest.raises(UserError, match="max best of must be >= 1"):
        resolve(parse("--max-best-of", "0"), {})
    assert resolve(parse("--max-input-length", "1000"), {}).settings.max_input_tokens == 1000
    # requests in flight: the batch, then the queue (as /info's max_concurrent_requests reads them back)
    fields = resolve(parse("--max-concurrent-requests", "128", "--max-batch-size", "32"), {}).engine_fields
    assert (fields["max_num_seqs"], fields["max_queue"]) == (32, 96)
    fields = resolve(parse(), {"MAX_CONCURRENT_REQUESTS": "16"}).engine_fields
    assert (fields["max_num_seqs"], fields["max_queue"]) == (16, 0)
    with pytest.raises(UserError, match="MAX_CONCURRENT_REQUESTS: must be >= 1"):
        resolve(parse(), {"MAX_CONCURRENT_REQUESTS": "0"})
    with pytest.raises(UserError, match="not both"):
        resolve(parse("--max-concurrent-requests", "8", "--max-queue", "4"), {})
    assert resolve(parse("--max-input-tokens", "900"), {"MAX_INPUT_LENGTH": "1000"}).settings.max_input_tokens == 900
    with pytest.raises(UserError, match="max input tokens must be >= 1"):
        resolve(parse("--max-input-tokens", "0"), {})
    command = resolve(parse("--cuda-memory-fraction", "0.8", "--cors-allow-origin", "https://a.example,https://b.example",
                            "--lora-adapters", "org/support,local=/adapters/local"), {})
    assert command.engine_fields == {"gpu_memory_utilization": 0.8,
                                     "lora_modules": "org/support=org/support,local=/adapters/local"}
    assert command.settings.allowed_origins == ["https://a.example", "https://b.example"]
    # and the variables TGI's image reads, beneath lcq's own and the command line (not HOSTNAME, which docker sets)
    tgi_env = {"MODEL_ID": "org/model", "MAX_TOTAL_TOKENS": "4096", "MAX_INPUT_TOKENS": "2048", "MAX_BATCH_PREFILL_TOKENS": "2048",
               "MAX_BATCH_SIZE": "32", "NUM_SHARD": "1", "CUDA_MEMORY_FRACTION": "0.8", "LORA_ADAPTERS": "org/support",
               "CORS_ALLOW_ORIGIN": "https://a.example", "HOSTNAME": "4f2a9c0d1e7b"}
    command = resolve(parse(), tgi_env)
    assert command.model == "org/model" and command.settings.host == "0.0.0.0"
    assert command.settings.max_input_tokens == 2048
    assert command.engine_fields == {"max_model_len": 4096, "max_num_batched_tokens": 2048, "max_num_seqs": 32,
                                     "gpu_memory_utilization": 0.8, "lora_modules": "org/support=org/support"}
    assert command.settings.allowed_origins == ["https://a.example"]
    command = resolve(parse("--max-model-len", "1024"), {**tgi_env, "LCQ_MODEL": "mine", "LCQ_MAX_BATCH_SIZE": "8"})
    assert (command.model, command.engine_fields["max_model_len"], command.engine_fields["max_num_seqs"]) == \
        ("mine", 1024, 8)
    assert resolve(parse(), {**tgi_env, "LCQ_MAX_MODEL_LEN": "2048"}).engine_fields["max_model_len"] == 2048
    with pytest.raises(UserError, match="NUM_SHARD"):
        resolve(parse(), {"NUM_SHARD": "two"})
    for argv, message in ((("--guided-decoding-backend", "outlines"), "must be auto or xgrammar"),
                          (("--load-format", "pt"), "safetensors weights only"),
                          (("--tokenizer-mode", "mistral"), "must be auto"),
                          (("--data-parallel-size", "2"), "--data-parallel-size must be 1"),
                          (("--num-shard", "2"), "TGI's --num-shard\\) must be 1")):
        with pytest.raises(UserError, match=message):
            resolve(parse(*argv), {})
    model = make_tiny_hf(tmp_path / "tiny")
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(model, tokenizer)
    (tokenizer / "chat_template.jinja").write_text("{{ 'theirs' }}")
    assert LLM(str(model), tokenizer=str(tokenizer)).tokenizer.chat_template == "{{ 'theirs' }}"
    assert LLM(str(model)).tokenizer.chat_template != "{{ 'theirs' }}"


def test_more_of_tgis_launcher_flags_and_variables(tmp_path, capsys):
    """TGI's launcher's flags for lcq's settings (--speculate, --payload-limit, --graceful-termination-timeout,
    --huggingface-hub-cache, --cuda-graphs, --tokenizer-config-path's chat_template), its own (--json-output,
    --disable-grammar-support, --max-batch-total-tokens, beside vLLM's --num-gpu-blocks-override), those accepted with the one value that holds here, and vLLM's and TGI's names of
    fp8 in --kv-cache-dtype; then the variables TGI's image reads for them; then what they refuse."""
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": "{{ 'mine' }}", "eos_token": "</s>"}))
    line = (f"--speculate 3 --payload-limit 2000000 --graceful-termination-timeout 90 --huggingface-hub-cache /data "
            f"--json-output --disable-grammar-support --cuda-graphs 1,2,4,8 --tokenizer-config-path {config} "
            "--sharded false --enable-prefill-logprobs --usage-stats off --disable-usage-stats --dtype bfloat16 "
            "--kv-cache-dtype fp8_e4m3fn")
    command = resolve(parse(*line.split()), {})
    assert command.engine_fields == {"num_speculative_tokens": 3, "download_dir": "/data", "cuda_graphs": True,
                                     "cuda_graph_sizes": [1, 2, 4, 8], "chat_template": "{{ 'mine' }}",
                                     "dtype": "bfloat16", "kv_cache_dtype": "fp8"}
    settings = command.settings
    assert (settings.max_body_bytes, settings.drain_timeout) == (2000000, 90.0)
    assert settings.json_output and settings.disable_grammar_support and not settings.sharded
    assert resolve(parse("--cuda-graph-sizes", "1", "8", "32"), {}).engine_fields == {"cuda_graph_sizes": [1, 8, 32]}
    assert resolve(parse("--max-batch-total-tokens", "16000"), {}).engine_fields == {"max_batch_total_tokens": 16000}
    assert resolve(parse(), {"MAX_BATCH_TOTAL_TOKENS": "8000"}).engine_fields == {"max_batch_total_tokens": 8000}
    assert resolve(parse("--num-gpu-blocks-override", "512"), {}).engine_fields == {"num_gpu_blocks_override": 512}
    with pytest.raises(ValueError, match="max_batch_total_tokens must be at least 1"):
        EngineConfig(model="m", **resolve(parse("--max-batch-total-tokens", "0"), {}).engine_fields).validate()
    assert resolve(parse("--cuda-graphs", "0"), {}).engine_fields == {"cuda_graphs": False}
    assert resolve(parse("--kv-cache-dtype", "fp8_e4m3"), {}).engine_fields == {"kv_cache_dtype": "fp8"}
    env = {"SPECULATE": "2", "PAYLOAD_LIMIT": "4096", "GRACEFUL_TERMINATION_TIMEOUT": "5", "JSON_OUTPUT": "true",
           "DISABLE_GRAMMAR_SUPPORT": "1", "CUDA_GRAPHS": "0", "SHARDED": "false", "API_KEY": "k", "REVISION": "v1",
           "DTYPE": "float16", "KV_CACHE_DTYPE": "fp8_e4m3fn", "TOKENIZER_CONFIG_PATH": str(config),
           "HUGGINGFACE_HUB_CACHE": "/data", "USAGE_STATS": "no-stack", "ENABLE_PREFILL_LOGPROBS": "true"}
    command = resolve(parse(), env)
    assert command.engine_fields == {"num_speculative_tokens": 2, "cuda_graphs": False, "revision": "v1",
                                     "dtype": "float16", "kv_cache_dtype": "fp8", "chat_template": "{{ 'mine' }}",
                                     "download_dir": "/data"}
    settings = command.settings
    assert (settings.max_body_bytes, settings.drain_timeout, settings.api_key) == (4096, 5.0, "k")
    assert settings.json_output and settings.disable_grammar_support and settings.usage_stats == "no-stack"
    assert resolve(parse(), {**env, "LCQ_API_KEY": "mine"}).settings.api_key == "mine"
    no_template = tmp_path / "plain.json"
    no_template.write_text("{}")
    for argv, message in ((("--sharded", "true"), "--sharded must be false"),
                          (("--usage-stats", "sometimes"), "on, off or no-stack")):
        with pytest.raises(UserError, match=message):
            resolve(parse(*argv), {})
    with pytest.raises(ValueError, match="cuda_graph_sizes must be batch sizes of at least 1"):
        EngineConfig(model="m", **resolve(parse("--cuda-graph-sizes", "0"), {}).engine_fields).validate()
    for argv, message in ((("--cuda-graphs", "0,4"), "must be at least 1"), (("--cuda-graphs", "all"), "not batch sizes"),
                          (("--kv-cache-dtype", "fp8_e5m2"), "fp8 (float8 e4m3) is"),
                          (("--tokenizer-config-path", str(no_template)), "has no chat_template"),
                          (("--tokenizer-config-path", str(tmp_path / "none.json")), "No such file")):
        with pytest.raises(SystemExit) as exit_info:
            parse(*argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(UserError, match="SHARDED"):
        resolve(parse(), {"SHARDED": "maybe"})


def test_lora_modules_in_vllms_forms(tmp_path, capsys):
    """--lora-modules as vLLM's documentation gives it: several values, each name=path or a JSON object of name and
    path (base_model_name too), beside lcq's comma-separated form; a JSON entry without them is refused."""
    from lcq.runtime import LLM
    from tests.tiny_model import make_tiny_adapter

    model = make_tiny_hf(tmp_path / "tiny")
    first, second = (make_tiny_adapter(tmp_path / name, model, seed=seed) for seed, name in enumerate(("a", "b")))
    command = resolve(parse("--lora-modules", f'{{"name": "sql", "path": "{first}", "base_model_name": "tiny"}}',
                            f"chat={second}"), {})
    modules = command.engine_fields["lora_modules"]
    assert modules == [f"sql={first}", f"chat={second}"]
    assert EngineConfig(model=str(model), lora_modules=modules).lora_adapters() == {"sql": str(first),
                                                                                    "chat": str(second)}
    assert LLM(str(model), lora_modules=modules).engine.config.lora_adapters() == {"sql": str(first),
                                                                                   "chat": str(second)}
    assert resolve(parse("--lora-modules", f"sql={first},chat={second}"), {}).engine_fields == {
        "lora_modules": f"sql={first},chat={second}"}
    for entry, message in (('{"name": "sql"}', '"name" and "path"'), ('{"name": "x", "path": "y", "rank": 8}',
                                                                     "unknown keys rank")):
        with pytest.raises(SystemExit):
            parse("--lora-modules", entry)
        assert message in capsys.readouterr().err


def test_vllm_speculative_config(capsys):
    """vLLM's --speculative-config JSON for prompt lookup, a draft model or the model's multi-token-prediction
    layer sets the same fields as lcq's own flags (from the environment too); another method, unknown keys or bad JSON are one line and exit 2."""
    settings = '{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3, "prompt_lookup_min": 2}'
    lookup = {"speculative_model": None, "speculative_method": None}  # (the method given owns the drafter whole)
    expected = {**lookup, "num_speculative_tokens": 5, "prompt_lookup_max": 3, "prompt_lookup_min": 2}
    assert resolve(parse("--speculative-config", settings), {}).engine_fields == expected
    assert resolve(parse(), {"LCQ_SPECULATIVE_CONFIG": settings}).engine_fields == expected
    assert resolve(parse("--speculative-config", '{"num_speculative_tokens": 3, "disable_by_batch_size": 4}'),
                   {}).engine_fields == {**lookup, "num_speculative_tokens": 3, "speculative_disable_by_batch_size": 4}
    # ngram on the command line is prompt lookup, whatever draft model the environment names (it drafted with it)
    assert resolve(parse("--speculative-config", settings), {"LCQ_SPECULATIVE_MODEL": "/models/draft"}
                   ).engine_fields == expected
    # one bound given: the other alike, as vLLM's (they were filled from lcq's defaults, 2 and 4, and refused);
    # vLLM's older method name "[ngram]"
    # vLLM's older method name "[ngram]", and its "model": "ngram" spelling (a draft folder named ngram before)
    for value, bound in (('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5}', 5),
                         ('{"method": "[ngram]", "num_speculative_tokens": 2, "prompt_lookup_max": 1}', 1),
                         ('{"model": "[ngram]", "num_speculative_tokens": 2, "prompt_lookup_max": 1}', 1)):
        assert resolve(parse("--speculative-config", value), {}).engine_fields == {
            **lookup, "num_speculative_tokens": 2, "prompt_lookup_min": bound, "prompt_lookup_max": bound}
    draft = {"speculative_model": "/models/draft", "speculative_method": None, "num_speculative_tokens": 5}
    for value in ('{"model": "/models/draft", "num_speculative_tokens": 5}',
                  '{"method": "draft_model", "model": "/models/draft", "num_speculative_tokens": 5}'):
        assert resolve(parse("--speculative-config", value), {}).engine_fields == draft
    mtp = {"speculative_model": None, "speculative_method": "mtp", "num_speculative_tokens": 2}
    for method in ("mtp", "deepseek_mtp", "qwen3_next_mtp"):  # (vLLM's older per-family names)
        value = f'{{"method": "{method}", "num_speculative_tokens": 2}}'
        assert resolve(parse("--speculative-config", value), {}).engine_fields == mtp
    # without a count, one draft a step, as vLLM drafts as many as the model's layers (docs/quantize.md's example)
    assert resolve(parse("--speculative-config", '{"method": "mtp"}'), {}).engine_fields == {
        **mtp, "num_speculative_tokens": 1}
    refused = ('{"method": "eagle"}', '{"method": "ngram", "lookahead": 2}', "{method: ngram}",
               '{"method": "ngram"}',  # (no num_speculative_tokens: it drafted nothing, silently)
               '{"model": "/models/draft", "prompt_lookup_max": 3}', '{"method": "draft_model"}',
               '{"num_speculative_tokens": "x"}', '{"prompt_lookup_max": true}')
    for value in refused:
        with pytest.raises(SystemExit) as usage:
            main(["serve", "--speculative-config", value])
        assert usage.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 8 and "not eagle" in errors[0] and "unknown keys lookahead for method ngram" in errors[1]
    assert "not JSON" in errors[2] and "method ngram needs num_speculative_tokens" in errors[3]
    assert "unknown keys prompt_lookup_max for method draft_model" in errors[4]
    assert "needs the draft's folder as model" in errors[5]
    assert 'num_speculative_tokens must be an integer, got "x"' in errors[6] and "got true" in errors[7]
    with pytest.raises(UserError, match="LCQ_SPECULATIVE_CONFIG: only methods ngram"):
        resolve(parse(), {"LCQ_SPECULATIVE_CONFIG": '{"method": "medusa"}'})


def test_switches_set_off_in_the_environment_are_unset():
    """A switch's "0" in the environment leaves it unset: LCQ_ENFORCE_EAGER=0 turned CUDA graphs back on over
    LCQ_NO_CUDA_GRAPHS=1, which sets the same field."""
    env = {"LCQ_NO_CUDA_GRAPHS": "1", "LCQ_ENFORCE_EAGER": "0"}
    assert resolve(parse(), env).engine_fields == {"cuda_graphs": False}
    assert resolve(parse(), {"LCQ_NO_PREFIX_CACHING": "false"}).engine_fields == {}


def test_messages_name_flags_but_not_files(tmp_path):
    """Engine settings' messages name the flag (max_num_seqs -> --max-num-seqs), but not inside a path or a
    file name (generation_config.json became --generation-config.json)."""
    from lcq.server.settings import in_flag_terms

    assert in_flag_terms("max_num_seqs must be at least 1") == "--max-num-seqs must be at least 1"
    message = f"{tmp_path}/generation_config.json: invalid JSON; see generation_config"
    assert in_flag_terms(message) == f"{tmp_path}/generation_config.json: invalid JSON; see --generation-config"


def test_a_model_served_from_its_own_folder_is_named_after_it(tmp_path, monkeypatch):
    """`lcq serve .` names the model after the folder (it was named "")."""
    from lcq.runtime.config import EngineConfig

    folder = tmp_path / "tiny"
    folder.mkdir()
    monkeypatch.chdir(folder)
    assert EngineConfig(model=".").model_name() == "tiny"


def test_vllm_forms_of_context_length_and_log_level(capsys):
    """vLLM's --max-model-len with a suffix (k, m, g: powers of 1,000; K, M, G: of 1,024), --uvicorn-log-level,
    --root-path and the CORS lists; a count that is not whole is one line and exit 2."""
    for text, tokens in (("4096", 4096), ("4k", 4000), ("4K", 4096), ("25.6k", 25600), ("1M", 2**20)):
        assert resolve(parse("--max-model-len", text), {}).engine_fields == {"max_model_len": tokens}
    assert resolve(parse(), {"LCQ_MAX_MODEL_LEN": "8k"}).engine_fields == {"max_model_len": 8000}
    for text in ("auto", "-1"):  # vLLM's spellings of the default: what the cache holds of the model's context
        assert resolve(parse("--max-model-len", text), {}).engine_fields.get("max_model_len") is None
    assert resolve(parse("--uvicorn-log-level", "debug"), {}).settings.log_level == "debug"
    cors = resolve(parse("--root-path", "/api", "--allowed-origins", '["http://a.example"]', "--allowed-methods",
                         "GET"), {"LCQ_ALLOWED_HEADERS": '["authorization"]'}).settings
    assert (cors.root_path, cors.allowed_origins, cors.allowed_methods, cors.allowed_headers) == (
        "/api", ["http://a.example"], ["GET"], ["authorization"])
    for text in ("4.5", "1.0001k", "4x"):
        with pytest.raises(SystemExit) as usage:
            main(["serve", "--max-model-len", text])
        assert usage.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 3


def test_runtime_lora_flags_from_the_command_line_or_environment():
    env = {"LCQ_ALLOW_RUNTIME_LORA_UPDATING": "true", "LCQ_MAX_LORAS": "4"}
    assert resolve(parse("--max-lora-rank", "8", "--max-cpu-loras", "16"), env).engine_fields == {
        "allow_runtime_lora_updating": True, "max_loras": 4, "max_lora_rank": 8, "max_cpu_loras": 16}
    assert resolve(parse("--allow-runtime-lora-updating"), {}).engine_fields == {"allow_runtime_lora_updating": True}


@contextlib.contextmanager
def _serving(tmp_path: Path, *flags: str, context: int = 4096):
    """`lcq serve` of a tiny model in a process of its own: (the process, its URL, its log), killed at the end
    if it is still running."""
    model = make_tiny_hf(tmp_path / "tiny", max_position_embeddings=context)
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "lcq.cli", "serve", str(model), "--host", "127.0.0.1", "--port", "0",
           "--served-model-name", "tiny", *flags]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LCQ_")}
    with open(log, "w") as log_file:
        process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                   cwd=Path(__file__).resolve().parents[1])
    try:
        yield process, _wait_until_ready(process, log), log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _long_stream(url: str, max_tokens: int) -> tuple[list[str], threading.Thread]:
    """A greedy completion streamed on a thread: (its SSE data lines so far, the thread), once the first came."""
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    events: list[str] = []
    first = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(30)
    return events, reader


def test_sigterm_drains_then_exits(tmp_path):
    """After SIGTERM: /health says 503, new requests 503, the running stream ends cleanly, exit code 0."""
    with _serving(tmp_path, "--drain-timeout", "1", "--kv-cache-memory-gb", "0.05", "--kv-cache-dtype",
                  "float16") as (process, url, log):
        startup = log.read_text()
        frozen = re.search(r"froze (\d+) objects out of the garbage collector", startup)
        assert frozen and int(frozen.group(1)) > 10_000  # model and libraries out of the collector's walks
        assert re.search(r"KV cache: \d+ blocks of 16 tokens \(\d+ tokens, float16, 0\.05 GiB\)", startup)
        events, reader = _long_stream(url, 4000)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert httpx.get(url + "/health").status_code == 503
        refused = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable_error"
        reader.join(30)
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])["choices"][0]
        assert last["finish_reason"] in ("abort", "length")
        assert process.wait(30) == 0


def test_a_second_signal_aborts_the_drain(tmp_path):
    """A second SIGTERM/SIGINT stops at once: the requests still running are aborted (their streams end with
    "abort" and [DONE]) rather than run to their end within the drain timeout (a minute here), which they did
    while the server, no longer listening, waited for them."""
    with _serving(tmp_path, "--drain-timeout", "60", context=8192) as (process, url, _):
        events, reader = _long_stream(url, 8000)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert process.wait(30) == 0 and time.monotonic() - started < 15
        reader.join(5)
        assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"


def test_json_log_lines_and_grammar_support_off(tmp_path):
    """TGI's --json-output: every line of the log, lcq's and uvicorn's (its access log too), is a JSON object with
    TGI's keys. TGI's --disable-grammar-support: structured output is refused, a 400 on OpenAI's routes (a JSON
    schema, a choice, a tool call that tool_choice forces) and TGI's 422 on /generate (a grammar), while free
    text is served."""
    with _serving(tmp_path, "--json-output", "--disable-grammar-support") as (_, url, log):
        messages = [{"role": "user", "content": "Hi"}]
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        refused = [httpx.post(url + route, json=body, timeout=60) for route, body in (
            ("/v1/chat/completions", {"messages": messages, "max_tokens": 4, "response_format": {
                "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}),
            ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "structured_outputs": {"choice": ["a", "b"]}}),
            ("/v1/chat/completions", {"messages": messages, "max_tokens": 4, "tools": [tool],
                                      "tool_choice": "required"}))]
        assert [r.status_code for r in refused] == [400] * 3
        assert all("--disable-grammar-support" in r.json()["error"]["message"] for r in refused)
        tgi = httpx.post(url + "/generate", timeout=60, json={"inputs": "Hi", "parameters": {
            "max_new_tokens": 4, "grammar": {"type": "regex", "value": "a+"}}})
        assert tgi.status_code == 422 and "--disable-grammar-support" in tgi.json()["error"]
        assert httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60).status_code == 200
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert all(set(line) == {"timestamp", "level", "fields", "target"} and line["fields"]["message"] for line in lines)
    targets = {line["target"] for line in lines}
    assert {"lcq.engine", "uvicorn.error", "uvicorn.access"} <= targets, targets
    assert any('"POST /v1/completions HTTP/1.1" 200' in line["fields"]["message"] for line in lines)


def test_https_served_directly(tmp_path):
    """vLLM's --ssl-certfile/--ssl-keyfile: the API over TLS (a self-signed certificate here); one of the two
    alone, or a missing file, is one line and exit 2."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"], check=True,
                   capture_output=True)
    with _serving(tmp_path, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)) as (_, url, _):
        assert url.startswith("https://")
        reply = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                           verify=ssl.create_default_context(cafile=str(cert)))
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
    assert main(["serve", "--ssl-certfile", str(cert)]) == 2
    assert main(["serve", "--tensor-parallel-size", "2"]) == 2


def test_sigterm_while_the_model_loads_exits_at_once(tmp_path):
    """The load runs on a thread that cannot be stopped; a server stopped meanwhile does not wait for it (a
    large model's load could outlast an orchestrator's grace period). The load is made to take a minute."""
    model = make_tiny_hf(tmp_path / "tiny")
    slow_load = ("import sys, time\n"
                 "import lcq.runtime.async_engine as a\n"
                 "class Slow(a.LLMEngine):\n"
                 "    def __init__(self, config):\n"
                 "        time.sleep(60)\n"
                 "        super().__init__(config)\n"
                 "a.LLMEngine = Slow\n"
                 "from lcq.cli import main\n"
                 "sys.exit(main())\n")
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LCQ_")}
    with open(log, "w") as log_file:
        process = subprocess.Popen([sys.executable, "-c", slow_load, "serve", str(model), "--host", "127.0.0.1",
                                    "--port", "0"], stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                   cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.time() + 60
        while not re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text()):
            assert process.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.1)
        url = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text()).group(1)
        assert httpx.get(url + "/health").status_code == 503  # loading
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        assert "stopped while the model was loading" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _wait_until_ready(process: subprocess.Popen, log: Path) -> str:
    deadline = time.time() + 90
    url = None
    while time.time() < deadline:
        assert process.poll() is None, log.read_text()
        if url is None:
            match = re.search(r"Uvicorn running on (https?://127\.0\.0\.1:\d+)", log.read_text())
            url = match.group(1) if match else None
        if url is not None and httpx.get(url + "/health", verify=False).status_code == 200:  # (self-signed)
            return url
        time.sleep(0.1)
    raise AssertionError("server did not become ready:\n" + log.read_text())


def test_run_batch_waits_for_a_full_queue_and_keeps_the_others_when_one_fails(tmp_path, capsys, monkeypatch):
    """Requests of many engine requests (embedding inputs) on a queue of one wait rather than take a 429, each
    admitted whole; a request the app fails (a fault made here) is a 500 line and the others are answered."""
    import lcq.server.completions as completions

    tokenize = completions.tokenize_prompts

    def failing_on_boom(state, prompt, *args, **kwargs):
        if prompt == "boom":
            raise RuntimeError("a bug")
        return tokenize(state, prompt, *args, **kwargs)

    monkeypatch.setattr(completions, "tokenize_prompts", failing_on_boom)
    model = make_tiny_hf(tmp_path / "tiny")
    lines = [_batch_line(f"emb{i}", "/v1/embeddings", {"input": [f"text {i} {j}" for j in range(5)]})
             for i in range(6)] + [_batch_line("boom", "/v1/completions", {"prompt": "boom"})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(out), str(model),
                 "--kv-cache-memory-gb", "0.05", "--max-num-seqs", "1", "--max-queue", "1"]) == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["response"]["status_code"] for r in results] == [200] * 6 + [500]
    assert all(len(r["response"]["body"]["data"]) == 5 for r in results[:6])
    assert results[6]["response"]["body"]["error"]["message"] == "internal error: RuntimeError"


def _batch_line(custom_id: str, url: str, body: dict, **dumps) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}, **dumps)


def test_run_batch_answers_every_line_in_order(tmp_path, capsys):
    """`lcq run-batch`: chat, completions, Responses and embeddings requests through the server's endpoints in-process;
    each output line carries its request's status and body (OpenAI's types parse them), refusals keep the
    error envelope, and a greedy completion is the offline engine's."""
    from openai.types import Completion, CreateEmbeddingResponse
    from openai.types.chat import ChatCompletion
    from openai.types.responses import Response

    from lcq.runtime import LLM, SamplingParams

    model = make_tiny_hf(tmp_path / "tiny")
    greedy = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    lines = [_batch_line("chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}],
                                                          **greedy}),
             _batch_line("text", "/v1/completions", {"prompt": "Once upon a time", **greedy}),
             _batch_line("resp", "/v1/responses", {"input": "Hi", "max_output_tokens": 4}),
             _batch_line("emb", "/v1/embeddings", {"input": ["Hi", "there"]}),
             _batch_line("bad", "/v1/completions", {"prompt": "x", "temperature": 5}),
             _batch_line("stream", "/v1/completions", {"prompt": "x", "stream": True}),
             _batch_line("later", "/v1/responses", {"input": "x", "background": True})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(out), str(model),
                 "--kv-cache-memory-gb", "0.05"]) == 0
    assert "7 requests: 4 answered, 3 refused" in capsys.readouterr().out
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == ["chat", "text", "resp", "emb", "bad", "stream", "later"]
    assert [r["response"]["status_code"] for r in results] == [200, 200, 200, 200, 400, 400, 400]
    assert all(r["id"].startswith("batch_req_") and r["error"] is None for r in results)
    chat, text, resp = (r["response"]["body"] for r in results[:3])
    ChatCompletion.model_validate(chat), Response.model_validate(resp)
    assert results[1]["response"]["request_id"] == text["id"]
    expected = LLM(str(model), kv_cache_memory_gb=0.05).generate(["Once upon a time"], SamplingParams(
        max_tokens=6, temperature=0, ignore_eos=True))[0].text
    assert Completion.model_validate(text).choices[0].text == expected
    assert len(CreateEmbeddingResponse.model_validate(results[3]["response"]["body"]).data) == 2
    assert results[4]["response"]["body"]["error"]["param"] == "temperature"
    assert results[5]["response"]["body"]["error"]["param"] == "stream"
    assert results[6]["response"]["body"]["error"]["param"] == "background"


@pytest.mark.parametrize("line, message", [
    ("{not json", "in.jsonl:2: not valid JSON"),
    (_batch_line("a", "/v1/completions", {"prompt": "x"}), "in.jsonl:2: custom_id 'a' is used twice"),
    (_batch_line("b", "/v1/images/generations", {"prompt": "x"}), "in.jsonl:2: url must be one of"),
    (json.dumps({"custom_id": "c", "method": "GET", "url": "/v1/completions", "body": {}}), "method must be POST"),
    # a raw U+2028 inside a string (json.dumps(ensure_ascii=False)) ends no line: the bad line after it is line 3
    (_batch_line("d", "/v1/completions", {"prompt": "a\u2028b"}, ensure_ascii=False) + "\n{not json",
     "in.jsonl:3: not valid JSON"),
])
def test_run_batch_refuses_a_bad_file_before_loading(tmp_path, capsys, line, message):
    (tmp_path / "in.jsonl").write_text(_batch_line("a", "/v1/completions", {"prompt": "x"}) + "\n" + line + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(out), str(tmp_path / "no-model")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("lcq: error: ") and message in error and "\n" not in error
    assert not out.exists() and not (tmp_path / "out.jsonl.tmp").exists()


def test_run_batch_refuses_an_unwritable_output_or_a_binary_file_before_loading(tmp_path, capsys):
    good = tmp_path / "in.jsonl"
    good.write_text(_batch_line("a", "/v1/completions", {"prompt": "x"}) + "\n")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage\n")
    (tmp_path / "a-folder").mkdir()
    for source, output, message in ((good, tmp_path / "a-folder", "is a folder"),
                                    (binary, tmp_path / "out.jsonl", "not UTF-8 text")):
        assert main(["run-batch", "-i", str(source), "-o", str(output), str(tmp_path / "no-model")]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("lcq: error: ") and message in error and "\n" not in error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-folder", "binary.jsonl", "in.jsonl"]
    # /proc's files cannot be made, whatever os.access tells root: refused before loading, not after every request
    assert main(["run-batch", "-i", str(good), "-o", "/proc/lcq-test.jsonl", str(tmp_path / "no-model")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("lcq: error: /proc/lcq-test.jsonl: /proc is not writable") and "\n" not in error


def test_run_batch_output_the_disk_refuses_is_one_line_and_keeps_the_file_there(tmp_path):
    """Output the file system refuses once the requests have run (here the process's file size limit, which binds
    root too, as a full disk would): one line (UserError), the file there before as it was, no temporary file."""
    import resource

    from lcq.server.batch import _umask, output_target, write_lines

    out = tmp_path / "out.jsonl"
    out.write_text("the last run's output\n")
    theirs = tmp_path / "out.jsonl.tmp"  # a file of the user's that a temporary name of ours must not be
    theirs.write_text("someone's notes\n")
    lines = [{"id": f"batch_req_{i}", "custom_id": str(i), "response": {"status_code": 200, "body": "x" * 500},
              "error": None} for i in range(8)]
    target = output_target(str(out))
    previous_signal = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (EFBIG from write, not the signal's kill)
    previous_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, previous_limit[1]))
    try:
        with pytest.raises(UserError, match=r"out.jsonl: cannot be written \(File too large\)$"):
            write_lines(target, lines)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous_limit)
        signal.signal(signal.SIGXFSZ, previous_signal)
    assert out.read_text() == "the last run's output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.tmp"]
    write_lines(target, lines)
    assert [json.loads(line) for line in out.read_text().splitlines()] == lines
    assert theirs.read_text() == "someone's notes\n" and len(list(tmp_path.iterdir())) == 2
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()


# --seed beyond torch's seeds (torch.manual_seed takes -2**63 to 2**64 - 1): one line and exit 2 from `lcq serve`
# and `lcq quantize` (which adds up to 2 to it), not a traceback (an audit of the CLI found both)
def test_a_seed_torch_cannot_take_is_one_line_and_exit_2(tmp_path, capsys):
    from lcq.quantizer.options import QuantizeOptions
    from lcq.runtime import EngineConfig

    model = make_tiny_hf(tmp_path / "tiny")
    for seed in (-2**63, 2**64 - 1):
        EngineConfig(model=str(model), seed=seed).validate()
    for seed in (-2**63 - 1, 2**64):
        with pytest.raises(ValueError, match="seed must be between"):
            EngineConfig(model=str(model), seed=seed).validate()
    QuantizeOptions(seed=2**64 - 3).validate_settings()
    with pytest.raises(UserError, match="--seed must be between"):
        QuantizeOptions(seed=2**64 - 2).validate_settings()
    calib = tmp_path / "calib.txt"
    calib.write_text("The capital of France is Paris. Once upon a time there was a little model. " * 20)
    capsys.readouterr()  # (the model's writing)
    big = str(10**20)
    for argv, reason in ((["serve", str(model), "--host", "127.0.0.1", "--port", "0", "--seed", big],
                          "seed must be between"),
                         (["quantize", str(model), str(tmp_path / "out"), "--seed", big, "--calib", str(calib),
                           "--nsamples", "2", "--seqlen", "16", "--epochs", "0"], "--seed must be between")):
        assert main(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lcq: error: ") and reason in lines[0], (argv, lines)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# `lcq run-batch` reads JSONL as OpenAI's Batch API and vLLM do: lines end at "\n" only (str.splitlines cut
# strings holding a raw U+2028, U+2029 or U+0085), a UTF-8 BOM and "\r\n" are fine, and "stream": "false" is
# false as the server reads it (it was refused as truthy) (an audit of run-batch found these)
def test_run_batch_reads_lines_as_json_does(tmp_path, capsys):
    model = make_tiny_hf(tmp_path / "tiny")
    raw = {"ensure_ascii": False}
    lines = [_batch_line("chat", "/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "line one\u2028line two"}], "max_tokens": 2}, **raw),
             _batch_line("emb", "/v1/embeddings", {"input": ["a\u0085b", "c\u2029d"]}, **raw),
             _batch_line("text", "/v1/completions", {"prompt": "x", "max_tokens": 2, "stream": "false"}),
             _batch_line("resp", "/v1/responses", {"input": "x", "max_output_tokens": 2, "background": "false"}),
             _batch_line("stream", "/v1/completions", {"prompt": "x", "stream": "true"})]
    (tmp_path / "in.jsonl").write_text("\ufeff" + "\r\n".join(lines) + "\r\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(out), str(model),
                 "--kv-cache-memory-gb", "0.05"]) == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == ["chat", "emb", "text", "resp", "stream"]
    assert [r["response"]["status_code"] for r in results] == [200, 200, 200, 200, 400]
    assert len(results[1]["response"]["body"]["data"]) == 2
    assert results[4]["response"]["body"]["error"]["param"] == "stream"


# -o is where the output goes: a symlink's target (the link was replaced by a file, its target left as it was),
# stdout for "-", a FIFO written directly (renamed over, as /dev/stdout would have been as root) (an audit of
# run-batch found these)
def test_run_batch_writes_through_a_symlink_to_stdout_or_to_a_fifo(tmp_path, capsys, monkeypatch):
    model = make_tiny_hf(tmp_path / "tiny")
    (tmp_path / "in.jsonl").write_text(_batch_line("emb", "/v1/embeddings", {"input": "Hi"}) + "\n")
    monkeypatch.chdir(tmp_path)  # (the old code wrote `-o -` as a file named "-" here)
    (tmp_path / "vol").mkdir()
    (tmp_path / "vol" / "results.jsonl").write_text("old\n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "vol" / "results.jsonl")
    os.mkfifo(tmp_path / "fifo")
    reader = os.open(tmp_path / "fifo", os.O_RDONLY | os.O_NONBLOCK)  # (so that the writer's open does not wait)
    capsys.readouterr()
    written = {}
    try:
        for output in ("link.jsonl", "-", "fifo"):
            assert main(["run-batch", "-i", "in.jsonl", "-o", output, str(model), "--kv-cache-memory-gb", "0.05"]) == 0
            out, err = capsys.readouterr()
            written[output] = out if output == "-" else None
            assert ("wrote link.jsonl" in out) if output == "link.jsonl" else ("wrote " in err), (output, out, err)
        written["fifo"] = os.read(reader, 1 << 16).decode()
    finally:
        os.close(reader)
    written["link.jsonl"] = (tmp_path / "link.jsonl").read_text()
    assert (tmp_path / "link.jsonl").is_symlink() and (tmp_path / "fifo").is_fifo()
    for output, text in written.items():
        assert [json.loads(line)["custom_id"] for line in text.splitlines()] == ["emb"], output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fifo", "in.jsonl", "link.jsonl", "tiny", "vol"]
    assert [path.name for path in (tmp_path / "vol").iterdir()] == ["results.jsonl"]


def test_env_reports_the_machine_as_lcq_sees_it():
    """`lcq env` (vLLM's collect-env): versions, the CPU and the C kernels' state as the kernels decide it, no GPU
    here, the settings with secrets masked; as JSON and as text. Importing it loads no torch (bench/records.py
    takes the machine's name from it where torch is not installed)."""
    import torch

    from lcq.kernels import native

    env = {**os.environ, "LCQ_API_KEY": "sk-very-secret", "LCQ_MAX_NUM_SEQS": "8", "HF_TOKEN": "hf_secret"}
    done = subprocess.run([sys.executable, "-m", "lcq.cli", "env", "--json"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["packages"]["torch"] == torch.__version__ and info["lcq"]["version"]
    cpu = info["cpu"]
    assert cpu["c_kernels"] == ("available" if native.unsupported() is None else f"not used: {native.unsupported()}")
    assert set(cpu["flags"]) <= native.cpu_flags() and cpu["cores"] == os.cpu_count()
    assert info["gpus"] == ([] if not torch.cuda.is_available() else info["gpus"])
    assert info["settings"]["LCQ_API_KEY"] == "(set)" and info["settings"]["LCQ_MAX_NUM_SEQS"] == "8"
    assert "sk-very-secret" not in done.stdout and "hf_secret" not in done.stdout
    text = subprocess.run([sys.executable, "-m", "lcq.cli", "env"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert text.returncode == 0 and text.stdout.startswith(f"lcq {info['lcq']['version']} (")
    assert f"C kernels: {cpu['c_kernels']}" in text.stdout and "LCQ_API_KEY=(set)" in text.stdout
    light = subprocess.run([sys.executable, "-c", "import sys, lcq.environment; print('torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=60)
    assert light.stdout.strip() == "False"
    no_git = subprocess.run([sys.executable, "-m", "lcq.cli", "env", "--json"], capture_output=True, text=True,
                            env={**env, "PATH": "/nonexistent"}, timeout=300)
    assert no_git.returncode == 0, no_git.stderr
    assert json.loads(no_git.stdout)["lcq"]["commit"] is None
