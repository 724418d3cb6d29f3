"""A model named by its Hugging Face Hub id (`org/name`, as vLLM and transformers take one) in place of a folder:
its files fetched once into the Hub's cache, then read as the folder they make there. The Hub's own settings
apply: HF_TOKEN (private and gated repositories), HF_HOME or HF_HUB_CACHE (where), HF_HUB_OFFLINE (the cache
only), HF_ENDPOINT (a mirror)."""
from __future__ import annotations

import re
from pathlib import Path

from .errors import UserError

# What lcq reads of a model folder: configs (config.json, generation_config.json, the tokenizer's), safetensors
# weights (an LCQ checkpoint's too) and the tokenizer in each of its forms. Not fetched: pickle and GGUF weights,
# and the consolidated or original checkpoints some repositories hold beside the Hugging Face one.
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.tiktoken", "tokenizer.model", "merges.txt", "vocab.txt"]
NOT_FETCHED = ["original/*", "consolidated*"]
TOKENIZER_FILES = [pattern for pattern in HUB_FILES if pattern != "*.safetensors"]  # a tokenizer's, not its weights
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def model_folder(name: str, revision: str | None = None, download_dir: str | None = None, kind: str = "model",
                 files: list[str] = HUB_FILES) -> str:
    """`name` where it is a folder; else, where it has the form of a Hub id, the folder of that repository at
    `revision` (a branch, tag or commit; default main) in the Hub's cache (or in download_dir), fetched where the
    cache lacks it (those of its files that `files` matches). UserError, one line naming what was asked for (`kind`:
    a model, a LoRA adapter, a tokenizer), where it is neither."""
    try:  # (both raise for some paths: a name too long, a folder not readable)
        if Path(name).is_dir():
            return name
        if not REPO_ID.fullmatch(name) or Path(name).exists():
            raise UserError(f"{name}: no such {kind} folder")
    except OSError as e:
        raise UserError(f"{name}: cannot be read ({e.strerror or e})") from None
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise UserError(f"{name}: no such {kind} folder (huggingface_hub, which fetches Hub ids, is not installed)") \
            from None
    try:
        return snapshot_download(name, revision=revision, cache_dir=download_dir, allow_patterns=files,
                                 ignore_patterns=NOT_FETCHED)
    except GatedRepoError:
        raise UserError(f"{name}: a gated repository on the Hub: accept its terms there and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise UserError(f"{name}: no such {kind} folder, nor a Hub repository that HF_TOKEN can read") from None
    except RevisionNotFoundError:
        raise UserError(f"{name}: the Hub repository has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise UserError(f"{name}: no such {kind} folder, and not in the Hub's cache ({why})") from None
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"{name}: fetching it from the Hub failed ({str(e).splitlines()[0] if str(e) else e!r})") \
            from None
