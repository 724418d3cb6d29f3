"""LCQ checkpoint folders: a Hugging Face folder whose linear layers are packed.

Reading never unpickles: tensors come from safetensors only, one at a time, so a loader can
stream them. Every problem is a FormatError whose one-line message names the file and tensor.
Writing is atomic: each file goes to a temporary name and is renamed into place.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .codebook import PackedLinear, padded_in_features
from .fp8 import block_size, decode_fp8, is_auxiliary, is_fp8, scale_names
from .mxfp4 import BLOCK as MXFP4_BLOCK
from .mxfp4 import decode_mxfp4
from .views import StoredTensor, ViewError, view_config, view_tensors
from .packing import SUPPORTED_BITS

QUANT_METHOD = "lcq"
FORMAT_VERSION = 1
# Version 2: lm_head may be packed too, with its own bit width (head_bits); written only by
# checkpoints that pack it, so that readers of version 1 refuse them rather than miss the head.
HEAD_FORMAT_VERSION = 2
# Version 3: an untied embedding table may be packed too, at the head's width (embed_bits); readers of
# version 2 would look its tokens up in the packed head instead.
EMBED_FORMAT_VERSION = 3
# Version 4: decoder linear layers may have their own width (layer_bits: module name -> bits); readers of
# version 3 would read those at `bits`.
LAYER_BITS_FORMAT_VERSION = 4
READABLE_VERSIONS = (FORMAT_VERSION, HEAD_FORMAT_VERSION, EMBED_FORMAT_VERSION, LAYER_BITS_FORMAT_VERSION)
HEAD = "lm_head"
EMBED = "model.embed_tokens"
PACK_LAYOUT = "kmajor-planes"
SCALE_BITS = 8  # the width of S's and B's codes (dual quantization)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files a tokenizer or generation needs, copied from the source model as they are.
MODEL_ASSETS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
    "chat_template.json",
)
LINEAR_SUFFIXES = ("qweight", "s_q", "s_scale", "b_q", "b_scale", "v", "shape")
# Rotary embeddings' buffers that some folders store beside the weights (older Llama-family conversions'
# rotary_emb.inv_freq, as in Llama-2's files; ColossalAI's cos_cached and sin_cached): computed from
# config.json, so never read, and left out of a folder's tensors, as transformers and vLLM skip them.
ROTARY_BUFFERS = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


class FormatError(ValueError):
    """A checkpoint that cannot be read: missing, corrupted, truncated or mismatched."""


def quantization_config(bits: int, rank: int, group_size: int, method: str,
                        modules_not_quantized: list[str], **extra: Any) -> dict[str, Any]:
    """The `quantization_config` block of config.json (a packed lm_head: head_bits among `extra`; a packed
    untied embedding table: embed_bits; layers at their own width: layer_bits). Each is written with the
    lowest version that reads it."""
    version = LAYER_BITS_FORMAT_VERSION if extra.get("layer_bits") else EMBED_FORMAT_VERSION if extra.get("embed_bits") \
        else HEAD_FORMAT_VERSION if extra.get("head_bits") else FORMAT_VERSION
    return {
        "quant_method": QUANT_METHOD, "format_version": version, "pack_layout": PACK_LAYOUT,
        "bits": bits, "rank": rank, "group_size": group_size, "method": method,
        "scale_bits": SCALE_BITS, "modules_not_quantized": modules_not_quantized, **extra,
    }


def linear_tensors(prefix: str, layer: PackedLinear) -> dict[str, torch.Tensor]:
    """The tensors stored for one packed linear layer named `prefix` (e.g. model.layers.0.mlp.up_proj)."""
    if layer.v.shape[0] != 1:
        raise ValueError("fused layers are an in-memory form; store each part under its own name")
    tensors = {
        f"{prefix}.qweight": layer.qweight, f"{prefix}.s_q": layer.s_q, f"{prefix}.s_scale": layer.s_scale,
        f"{prefix}.b_q": layer.b_q, f"{prefix}.b_scale": layer.b_scale, f"{prefix}.v": layer.v[0],
        f"{prefix}.shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int32),
    }
    if layer.bias is not None:
        tensors[f"{prefix}.bias"] = layer.bias
    return tensors


class WriteError(Exception):
    """A checkpoint file that could not be written (the disk full, the folder gone or read-only): one line
    naming the file; its temporary file is removed and the file it would have replaced is left as it was."""


@contextmanager
def _writing(path: Path, tmp: Path) -> Iterator[None]:
    """WriteError for what fails while tmp is written and renamed to path."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        code = re.search(r"os error (\d+)|code: (\d+)", str(e))  # the OS error in safetensors' wordings of it
        reason = (e.strerror if isinstance(e, OSError) and e.strerror else
                  os.strerror(int(code.group(1) or code.group(2))) if code else str(e))
        raise WriteError(f"{path}: cannot be written ({reason})") from None


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with _writing(path, tmp):
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
        _synced(tmp)
        os.replace(tmp, path)


def _synced(path: Path) -> None:
    """A written file flushed to the disk before it is renamed into place: after a power loss (not only a
    crash) a renamed file is whole, not empty."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write one safetensors file atomically (tensors may live on any device)."""
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with _writing(path, tmp):
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # as any new file (safetensors writes its files owner-only): others may serve it
        _synced(tmp)
        os.replace(tmp, path)


def copy_model_assets(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer, chat template and generation config files that exist in `src`."""
    copied = []
    for name in MODEL_ASSETS:
        if (src / name).is_file():
            with _writing(dst / name, dst / name):  # (a copy cut short is removed)
                shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def write_index(folder: Path) -> None:
    """Write model.safetensors.index.json mapping every tensor of the folder's shards to its file."""
    weight_map, total = {}, 0
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                weight_map[name] = shard.name
                sl = f.get_slice(name)
                total += _numel(sl.get_shape()) * _DTYPE_BYTES.get(sl.get_dtype(), 4)
    write_json(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I8": 1, "U8": 1, "I64": 8, "BOOL": 1}


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def is_rotary_buffer(name: str) -> bool:
    """A stored rotary embedding's buffer (ROTARY_BUFFERS), which no reader reads."""
    return any(name == buffer or name.endswith("." + buffer) for buffer in ROTARY_BUFFERS)


def tensor_files(folder: Path) -> dict[str, Path]:
    """Every stored tensor's name and file (from the single file's header, or the index), but rotary
    embeddings' buffers (ROTARY_BUFFERS). The single file wins over an index beside it, as transformers
    loads it: saving a model unsharded into a folder that held its shards leaves their index behind."""
    index = folder / INDEX_FILE
    if (folder / SINGLE_FILE).is_file():
        files = {name: folder / SINGLE_FILE for name in _keys(folder / SINGLE_FILE)}
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise FormatError(f"{index}: not a valid safetensors index ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) and isinstance(fname, str)
                                                       for name, fname in weight_map.items()):
            raise FormatError(f"{index}: weight_map must map tensor names to file names")
        files = {name: folder / fname for name, fname in weight_map.items()}
        outside = next((fname for fname in weight_map.values() if Path(fname).is_absolute()
                        or ".." in Path(fname).parts), None)
        if outside is not None:  # (a model folder's tensors are its own files)
            raise FormatError(f"{index}: weight_map names {outside!r}, a file outside the model folder")
    else:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise FormatError(f"{folder}: only pickle weights found; lcq reads safetensors only")
        raise FormatError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}")
    for path in set(files.values()):
        if not path.is_file():
            raise FormatError(f"{path}: listed in {INDEX_FILE} but missing")
    return {name: path for name, path in files.items() if not is_rotary_buffer(name)}


def stored_tensor_names(folder: str | os.PathLike) -> list[str] | None:
    """The folder's stored tensor names, or None where they cannot be read (the reader says why)."""
    try:
        return list(tensor_files(Path(folder)))
    except FormatError:
        return None


def _keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise FormatError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


class CheckpointReader:
    """Reads a Hugging Face folder (full precision or LCQ) tensor by tensor, validating as it goes. A folder
    of another architecture reads as the one lcq runs for it (lcq.format.views): `config` and the tensor names
    are that architecture's."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FormatError(f"{self.folder}: not a folder")
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise FormatError(f"{config_path}: missing (not a Hugging Face model folder)")
        try:
            stored = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{config_path}: not valid JSON ({e})") from None
        if not isinstance(stored, dict):
            raise FormatError(f"{config_path}: a JSON {type(stored).__name__}, not an object of settings")
        if not isinstance(stored.get("quantization_config", {}), (dict, type(None))):
            raise FormatError(f"{config_path}: quantization_config must be an object of settings")
        files = tensor_files(self.folder)
        # An FP8 source's weights are decoded as read, with their scales (which the view does not see).
        self._fp8_scales, self._fp8_block, self._scale_files = {}, None, files
        if is_fp8(stored.get("quantization_config")):
            self._fp8_scales = scale_names(list(files))
            files = {name: path for name, path in files.items() if not is_auxiliary(name, self._fp8_scales)}
            try:
                self._fp8_block = block_size(stored["quantization_config"])
            except ValueError as e:
                raise FormatError(f"{config_path}: {e}") from None
        try:
            self.config: dict[str, Any] = view_config(stored, list(files))
        except ViewError as e:
            raise FormatError(f"{config_path}: {e}") from None
        self.quant: dict[str, Any] | None = self._validated_quant_config(config_path)
        self._stored = view_tensors(stored, list(files)) or {name: StoredTensor(name) for name in files}
        self._stored_files = files
        self._files = {name: files[where.name] for name, where in self._stored.items()}

    def _validated_quant_config(self, path: Path) -> dict[str, Any] | None:
        quant = self.config.get("quantization_config")
        if quant is None:
            return None
        if quant.get("quant_method") != QUANT_METHOD:
            raise FormatError(f"{path}: quant_method {quant.get('quant_method')!r} is not one lcq reads (its own "
                              f"{QUANT_METHOD!r}, FP8's 'fp8' or compressed-tensors float-quantized, gpt-oss's "
                              "'mxfp4'): give the full-precision release of this model")
        if type(quant.get("format_version")) is not int or quant["format_version"] not in READABLE_VERSIONS:
            raise FormatError(f"{path}: format_version {quant.get('format_version')!r} is not supported "
                              f"(this lcq reads versions {', '.join(map(str, READABLE_VERSIONS))})")  # (true, 4.0)
        if quant.get("pack_layout", PACK_LAYOUT) != PACK_LAYOUT:
            raise FormatError(f"{path}: pack_layout {quant['pack_layout']!r} is not one this lcq reads "
                              f"({PACK_LAYOUT!r})")
        if quant.get("scale_bits", SCALE_BITS) != SCALE_BITS:  # S and B as codes of another width
            raise FormatError(f"{path}: scale_bits {quant['scale_bits']!r} is not one this lcq reads ({SCALE_BITS})")
        for key in ("bits", "rank", "group_size"):
            if not isinstance(quant.get(key), int):
                raise FormatError(f"{path}: quantization_config.{key} missing or not an integer")
        if quant["bits"] not in SUPPORTED_BITS or quant["rank"] < 1 or quant["group_size"] < 32 or \
                quant["group_size"] % 32:
            raise FormatError(f"{path}: unsupported bits={quant['bits']} rank={quant['rank']} "
                              f"group_size={quant['group_size']}")
        for key in ("head_bits", "embed_bits"):  # (integers: 3.0 equals 3, but is no bit width)
            if quant.get(key) is not None and (type(quant[key]) is not int or quant[key] not in (0, *SUPPORTED_BITS)):
                raise FormatError(f"{path}: unsupported {key}={quant[key]}")  # 0: kept in full precision
        layer_bits = quant.get("layer_bits", {})
        if not isinstance(layer_bits, dict) or any(not isinstance(name, str) or type(bits) is not int
                                                   or bits not in SUPPORTED_BITS for name, bits in layer_bits.items()):
            raise FormatError(f"{path}: quantization_config.layer_bits must map module names to 2, 3 or 4")
        return quant


    def names(self) -> list[str]:
        return list(self._files)

    def has(self, name: str) -> bool:
        return name in self._files

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from its file's header (nothing is read)."""
        path = self._files.get(name)
        if path is None:
            raise FormatError(f"{self.folder}: tensor '{name}' missing")
        where = self._stored[name]
        with safe_open(str(path), framework="pt") as f:
            shape = tuple(f.get_slice(where.name).get_shape())
        if where.expert is not None:
            shape = shape[1:]
        if where.mxfp4:  # (rows, blocks, 16 bytes) of 32 weights each
            shape = (*shape[:-2], shape[-2] * MXFP4_BLOCK)
        if where.is_transposed(shape):
            shape = shape[::-1]
        if where.order is not None:
            return len(where.order), *shape[1:]
        return shape if where.rows is None else (_row_count(where), *shape[1:])

    def tensor(self, name: str) -> torch.Tensor:
        path = self._files.get(name)
        if path is None:
            raise FormatError(f"{self.folder}: tensor '{name}' missing")
        where = self._stored[name]
        try:
            tensor = self._read(path, where)
        except FormatError:
            raise
        except Exception as e:
            raise FormatError(f"{path}: tensor '{where.name}' unreadable ({_first_line(e)})") from None
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise FormatError(f"{path}: tensor '{where.name}' is FP8 without scales (no '{where.name}_scale_inv' "
                              "or quantization_config of an FP8 method in config.json)")
        if where.rows is not None and tensor.shape[0] != _row_count(where):
            stored = f"expert {where.expert} of '{where.name}' has fewer rows" if where.expert is not None else \
                f"tensor '{where.name}' has {tensor.shape[0] + where.rows[0]} rows"
            step = f" in steps of {where.row_step}" if where.row_step > 1 else ""
            raise FormatError(f"{path}: {stored}, config.json gives {name} rows {where.rows[0]} to {where.rows[1]}{step}")
        try:
            return where.rearranged(tensor)
        except ValueError as e:
            raise FormatError(f"{path}: {e} (config.json)") from None

    def _read(self, path: Path, where: StoredTensor) -> torch.Tensor:
        """The stored tensor, or the part of it `where` names, as the view's tensor before rearranged()."""
        scales = self._fp8_scales.get(where.name)
        with safe_open(str(path), framework="pt") as f:
            if where.expert is None and scales is None:
                return f.get_tensor(where.name) if where.rows is None else \
                    f.get_slice(where.name)[where.rows[0]:where.rows[1]][::where.row_step]
            tensor = f.get_tensor(where.name) if where.expert is None else \
                f.get_slice(where.name)[where.expert:where.expert + 1][0]
        if scales is not None:
            with safe_open(str(self._scale_files[scales]), framework="pt") as f:
                scale = f.get_tensor(scales)  # small: one per block at most
            tensor = decode_fp8(tensor, scale[where.expert] if where.expert is not None and scale.numel() > 1
                                else scale, self._fp8_block)
        if where.mxfp4:
            scales = where.name.removesuffix("_blocks") + "_scales"
            if scales not in self._stored_files:
                raise FormatError(f"{self.folder}: tensor '{scales}' missing (the MXFP4 scales of '{where.name}')")
            with safe_open(str(self._stored_files[scales]), framework="pt") as f:
                tensor = decode_mxfp4(tensor, f.get_slice(scales)[where.expert:where.expert + 1][0])
        if where.is_transposed(tuple(tensor.shape)):
            tensor = tensor.t()
        if where.rows is not None:
            tensor = tensor[where.rows[0]:where.rows[1]:where.row_step]
        return tensor.contiguous()

    def quantized_prefixes(self) -> list[str]:
        """Names of the packed linear layers, in file order."""
        return [name[: -len(".qweight")] for name in self._files if name.endswith(".qweight")]

    def decoder_bits_per_weight(self) -> float:
        """Stored bits per weight of the decoder's packed layers, weighted by their sizes (a packed head
        or embedding table, which only some checkpoints have, is left out so that rows compare)."""
        layers = [self.linear(p) for p in self.quantized_prefixes() if p not in (HEAD, EMBED)]
        weights = [layer.out_features * layer.in_features for layer in layers]
        return sum(layer.bits_per_weight() * n for layer, n in zip(layers, weights)) / sum(weights)

    def bits_of(self, prefix: str) -> int:
        """The width of the packed layer `prefix`: the head's, the table's, its own, or `bits`."""
        bits = {HEAD: self.quant.get("head_bits"), EMBED: self.quant.get("embed_bits")}.get(prefix)
        return bits or self.quant.get("layer_bits", {}).get(prefix, self.quant["bits"])

    def linear(self, prefix: str) -> PackedLinear:
        """Load and validate one packed linear layer."""
        if self.quant is None:
            raise FormatError(f"{self.folder / 'config.json'}: no quantization_config (not an LCQ checkpoint)")
        return linear_from_tensors(_LazyTensors(self), prefix, self.bits_of(prefix), self.quant["rank"],
                                   self.quant["group_size"], lambda name: str(self._files.get(name, self.folder)))


class _LazyTensors:
    """A reader seen as a mapping, so tensors load only when a layer asks for them."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader

    def __contains__(self, name: str) -> bool:
        return self.reader.has(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.reader.tensor(name)


def linear_from_tensors(tensors, prefix: str, bits: int, rank: int, group_size: int,
                        where=lambda name: "checkpoint") -> PackedLinear:
    """Build one PackedLinear from stored tensors (a mapping name -> tensor), checking every dtype and
    shape; `where(name)` names the file in the error message."""

    def checked(suffix: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        name = f"{prefix}.{suffix}"
        if name not in tensors:
            raise FormatError(f"{where(name)}: tensor '{name}' missing")
        tensor = tensors[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise FormatError(f"{where(name)}: tensor '{name}' expected {_describe(dtype, shape)}, "
                              f"found {_describe(tensor.dtype, tuple(tensor.shape))}")
        return tensor

    n_out, k_in = (int(d) for d in checked("shape", torch.int32, (2,)))
    groups = padded_in_features(k_in, group_size) // group_size
    t = {
        "qweight": checked("qweight", torch.int32, (groups * group_size // 32 * bits, n_out)),
        "s_q": checked("s_q", torch.int8, (groups, rank, n_out)),
        "s_scale": checked("s_scale", torch.float16, (rank, n_out)),
        "b_q": checked("b_q", torch.int8, (groups, n_out)),
        "b_scale": checked("b_scale", torch.float16, (n_out,)),
        "v": checked("v", torch.float16, (rank, 1 << bits)).unsqueeze(0),
    }
    bias = checked("bias", torch.float16, (n_out,)) if f"{prefix}.bias" in tensors else None
    return PackedLinear(**t, v_index=torch.zeros(n_out, dtype=torch.int32), in_features=k_in,
                        bits=bits, group_size=group_size, bias=bias)


def _row_count(where: StoredTensor) -> int:
    """How many rows of the stored tensor (or of its expert's slice) the view's tensor has."""
    return len(range(where.rows[0], where.rows[1], where.row_step))


def _describe(dtype: torch.dtype, shape: tuple[int, ...]) -> str:
    return f"{str(dtype).replace('torch.', '')} {list(shape)}"


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
