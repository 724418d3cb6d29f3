"""Models named by a Hugging Face Hub id: read from the Hub's cache as the Hub's own tools lay it out (no network
here: the Hub is in offline mode for every test of this file, so a fetch would fail rather than reach out)."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from lcq.cli import main
from lcq.errors import UserError
from lcq.format import CheckpointReader
from lcq.hub import model_folder
from lcq.runtime import EngineConfig, LLM, SamplingParams
from tests.tiny_model import make_tiny_adapter, make_tiny_hf

REPO = "lcq-test/tiny"
ADAPTER = "lcq-test/tiny-lora"  # a PEFT LoRA adapter of REPO's main weights
MAIN, TAGGED = "1" * 40, "2" * 40  # the commits main and the tag v1 point at
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """HF_HUB_OFFLINE as the Hub's library reads it: the cache only."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """A Hub cache holding REPO at two commits of different weights: main and the tag v1."""
    root = tmp_path_factory.mktemp("hub")
    repo = root / "cache" / f"models--{REPO.replace('/', '--')}"
    for commit, seed, ref in ((MAIN, 0, "main"), (TAGGED, 1, "v1")):
        shutil.copytree(make_tiny_hf(root / f"seed{seed}", seed=seed), repo / "snapshots" / commit)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    adapter = root / "cache" / f"models--{ADAPTER.replace('/', '--')}"
    make_tiny_adapter(adapter / "snapshots" / MAIN, root / "seed0", seed=3)
    (adapter / "refs").mkdir()
    (adapter / "refs" / "main").write_text(MAIN)
    return root


def test_a_hub_id_is_the_folder_of_its_revision_in_the_cache(hub):
    cache = str(hub / "cache")
    snapshots = hub / "cache" / f"models--{REPO.replace('/', '--')}" / "snapshots"
    assert Path(model_folder(REPO, download_dir=cache)) == snapshots / MAIN
    assert Path(model_folder(REPO, "v1", download_dir=cache)) == snapshots / TAGGED
    assert model_folder(str(hub / "seed0")) == str(hub / "seed0")  # a folder is itself


def test_an_engine_serves_a_hub_id_under_that_id(hub):
    """LLM and the server's settings take the id as vLLM does: the tokens of the folder it names at the revision
    asked for, served as the id unless served_model_name says otherwise; a draft model may be an id too."""
    cache = str(hub / "cache")
    tokens = []
    for revision, folder in ((None, "seed0"), ("v1", "seed1")):
        llm = LLM(REPO, revision=revision, download_dir=cache)
        assert llm.engine.config.model_name() == REPO
        tokens.append(llm.generate(["Once upon a time"], GREEDY)[0].token_ids)
        assert tokens[-1] == LLM(str(hub / folder)).generate(["Once upon a time"], GREEDY)[0].token_ids
    assert tokens[0] != tokens[1]  # (the two revisions' weights differ)
    named = EngineConfig(model=REPO, download_dir=cache, served_model_name="mine").fetched()
    assert named.model_names() == ["mine"]
    drafting = EngineConfig(model=str(hub / "seed0"), speculative_model=REPO, num_speculative_tokens=2,
                            download_dir=cache).fetched()
    assert Path(drafting.speculative_model).name == MAIN and drafting.model_name() == "seed0"
    tokenized = EngineConfig(model=str(hub / "seed0"), tokenizer=REPO, tokenizer_revision="v1",
                             download_dir=cache).fetched()
    assert Path(tokenized.tokenizer).name == TAGGED and tokenized.model == str(hub / "seed0")


def test_lora_adapters_may_be_hub_ids(hub):
    """As vLLM's --lora-modules and lora_path: an adapter named by its Hub id, at start or loaded at run time, serves
    the tokens of the folder it names; one neither a folder nor in the cache is one line naming it an adapter."""
    cache = str(hub / "cache")
    folder = hub / "cache" / f"models--{ADAPTER.replace('/', '--')}" / "snapshots" / MAIN
    with_folder = LLM(str(hub / "seed0"), lora_modules=f"sql={folder}")
    expected = with_folder.generate(["Once upon a time"], replace(GREEDY, lora="sql"))
    assert expected[0].token_ids != with_folder.generate(["Once upon a time"], GREEDY)[0].token_ids

    at_start = LLM(str(hub / "seed0"), lora_modules=f"sql={ADAPTER}", download_dir=cache)
    assert at_start.engine.config.lora_adapters() == {"sql": str(folder)}
    later = LLM(str(hub / "seed0"), max_loras=1, download_dir=cache)
    later.load_lora_adapter("sql", ADAPTER)
    for llm in (at_start, later):
        params = replace(GREEDY, lora="sql")
        assert llm.generate(["Once upon a time"], params)[0].token_ids == expected[0].token_ids
    with pytest.raises(UserError, match="lcq-test/absent: no such LoRA adapter folder, and not in the Hub's cache"):
        later.load_lora_adapter("other", "lcq-test/absent")
    with pytest.raises(UserError, match="no such LoRA adapter folder"):
        LLM(str(hub / "seed0"), lora_modules="sql=lcq-test/absent", download_dir=cache)
    with pytest.raises(UserError, match="cannot be read"):
        later.load_lora_adapter("long", "a" * 300)


def test_quantize_and_eval_take_a_hub_id(hub, tmp_path, capsys):
    cache = str(hub / "cache")
    out = tmp_path / "rtn"
    assert main(["quantize", REPO, str(out), "--method", "rtn", "--bits", "4", "--download-dir", cache]) == 0
    assert CheckpointReader(out).config["num_hidden_layers"] > 0
    assert main(["eval", REPO, "--revision", "v1", "--ctx", "16", "--max-tokens", "32", "--download-dir", cache]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_what_is_neither_a_folder_nor_in_the_cache_is_one_line(hub, tmp_path, capsys):
    cache = str(hub / "cache")
    cases = [(["serve", "lcq-test/absent", "--download-dir", cache], "not in the Hub's cache (HF_HUB_OFFLINE is set)"),
             (["quantize", "lcq-test/absent", str(tmp_path / "out"), "--download-dir", cache], "not in the Hub's cache"),
             (["eval", str(tmp_path / "no" / "such" / "folder")], "no such model folder"),
             (["serve", REPO, "--revision", "v2", "--download-dir", cache], "not in the Hub's cache")]
    for argv, reason in cases:
        assert main(argv) == 2, argv
        error = capsys.readouterr().err.strip()
        assert error.startswith("lcq: error: ") and reason in error and "\n" not in error, (argv, error)
    with pytest.raises(UserError, match="no such model folder"):
        model_folder("../relative/path")


def test_what_is_fetched_of_a_repository():
    """Of a repository as the Hub lists it (Llama 3's and Mistral's layouts), by the Hub library's own matching:
    the configs, safetensors shards and tokenizer files; not the original or consolidated checkpoints, pickle or
    GGUF weights, nor the rest."""
    from huggingface_hub.utils import filter_repo_objects

    from lcq.hub import HUB_FILES, NOT_FETCHED, TOKENIZER_FILES

    listed = ["config.json", "generation_config.json", "model-00001-of-00004.safetensors",
              "model.safetensors.index.json", "original/consolidated.00.pth", "original/params.json",
              "original/tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "LICENSE", "README.md", ".gitattributes", "consolidated.safetensors", "pytorch_model.bin", "model.gguf",
              "chat_template.jinja", "tokenizer.model", "merges.txt", "vocab.json"]
    assert sorted(filter_repo_objects(listed, allow_patterns=HUB_FILES, ignore_patterns=NOT_FETCHED)) == [
        "chat_template.jinja", "config.json", "generation_config.json", "merges.txt",
        "model-00001-of-00004.safetensors", "model.safetensors.index.json", "special_tokens_map.json",
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json"]
    tokenizer = sorted(filter_repo_objects(listed, allow_patterns=TOKENIZER_FILES, ignore_patterns=NOT_FETCHED))
    assert [name for name in tokenizer if "safetensors" in name or name.endswith((".bin", ".gguf"))] == [
        "model.safetensors.index.json"]  # (a tokenizer given by a model's id: its configs, not its weights)
