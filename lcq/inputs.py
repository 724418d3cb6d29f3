"""Checks of what a person hands the commands (devices, output paths, tokenizers), shared by `lcq quantize`,
`eval`, `serve` and `run-batch` so that each problem is one line (UserError) before any work starts, and
nothing is left half-written."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UserError


def device_problem(device: str, flag: str = "--device", auto: bool = False) -> str | None:
    """Why `device` (cpu, cuda or cuda:N; auto, the GPU where there is one, where `auto`) cannot be used
    here, or None."""
    import torch

    if not (device == "cpu" or device.split(":")[0] == "cuda" or (auto and device == "auto")):
        return f"{flag} must be {'auto, ' if auto else ''}cpu or cuda (got {device})"
    if device.startswith("cuda") and not torch.cuda.is_available():
        return f"{flag} {device} asked for, but no CUDA device is available"
    return None


def check_output(path: str | os.PathLike, what: str = "output") -> Path:
    """`path` where a new file or folder can be made: nothing is there but a file (for a file output), and
    the nearest existing folder above it can be written to."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; the {what} needs a path of its own")
    above = path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise UserError(f"{path}: {above} is not a folder")
    try:  # a file made there and removed: os.access says yes to root on /proc or a read-only mount
        tempfile.TemporaryFile(dir=above).close()
    except OSError as e:
        raise UserError(f"{path}: {above} is not writable ({e.strerror or e})") from None
    return path


def load_tokenizer(folder: str | os.PathLike):
    """transformers' tokenizer of a model folder; one line where the folder has none that loads."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises OSError, ValueError, TypeError... for missing or broken files
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{folder}: no tokenizer that loads ({reason})") from None
