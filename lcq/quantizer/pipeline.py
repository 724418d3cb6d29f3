"""quantize_model: a Hugging Face folder in, an LCQ folder out, one decoder block at a time.

Peak memory is about one block plus the calibration activations: block tensors are read from the
source safetensors when the block's turn comes and freed after its packed shard is written (the
optional end-to-end stage then holds every block's indices and codebooks, finetune.py, as the head
stage of a packed head tied to the embedding table does to score it). The
output grows in OUT_DIR.partial (with a progress file) and is renamed when complete, so a
half-written folder never looks valid and --resume continues after the last finished block.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import resource
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import IO

import torch

from lcq.errors import UserError
from lcq.format import (EMBED, HEAD, CheckpointReader, PackedLinear, copy_model_assets, dequantize, linear_tensors,
                        quantization_config, write_index, write_json, write_shard)
from lcq.inputs import check_output, load_tokenizer
from lcq.paths import exclusive

from .allocation import (UNITS, WEIGHING_WINDOWS, WIDEST, BlockGradient, Unit, check_target, choose_widths,
                         linear_shapes, unit_bytes, unit_of, weigh_blocks)
from .blockwise import LayerFit, block_call, optimize_block, run_block, tf32_products
from .finetune import LayerTuning, Served, StageScore, finetune, put_in_place, tune_head
from .fit import (Codebook, assign, dense_weight, grouped, grouped_importance, lcq_init, live, pack, rtn_codebook,
                  stored_codebook)
from .gptq import fit_codebooks_to_indices, gptq_indices
from .layer_bits import block_linears
from .options import QuantizeOptions, QuantizeSummary
from .reference import read_config
from .source import SourceModel, calibration_batch, source_fingerprint

PROGRESS_FILE = "lcq-progress.json"
WIDTHS_FILE = "lcq-target-widths.json"  # --target-bits: the --layer-bits rules chosen, kept for --resume
HEAD_SHARD = "lm_head.safetensors"  # a packed head's own shard, written once the blocks are done
MTP_SHARD = "mtp.safetensors"  # the multi-token-prediction layer's, written once the blocks are done



def _input_stats(call, block: torch.nn.Module, inputs: torch.Tensor, batch: int, full: bool) -> dict[str, torch.Tensor]:
    """Per linear layer: mean x x^T (full) or mean x_k^2 (diagonal) of its inputs over all tokens."""
    stats: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name in block_linears(block):
        def hook(module, args, output, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            moment = x.t() @ x if full else (x * x).sum(0)
            stats[name] = stats.get(name, 0) + moment
            counts[name] = counts.get(name, 0) + x.shape[0]
        hooks.append(block.get_submodule(name).register_forward_hook(hook))
    try:
        run_block(call, {}, inputs, batch)
    finally:
        for h in hooks:
            h.remove()
    return {name: stats[name] / counts[name] for name in stats}  # (an expert no token chose has none)


def _quantize_block(source: SourceModel, index: int, block: torch.nn.Module, options: QuantizeOptions, q_inputs,
                    targets, progress_bar) -> tuple[dict[str, PackedLinear], tuple[float, float]]:
    """Quantize the linear layers of decoder block `index` (block_linears) with the chosen method; q_inputs
    and targets hold the training windows, then the held-out ones."""
    call = block_call(block, source.block_inputs(index))
    weights = {name: block.get_submodule(name).weight.detach().float() for name in block_linears(block)}
    biases = {name: block.get_submodule(name).bias for name in weights}
    n = options.nsamples
    stats = _input_stats(call, block, q_inputs[:n], options.batch_size, full=options.gptq_indices) \
        if options.needs_data else {}
    widths = options.widths
    fits = [_initial_fit(name, w, _importance(stats.get(name), options), options, widths.of(index, name))
            for name, w in weights.items()]
    losses = (0.0, 0.0)
    if options.method == "lcq":
        def on_step(loss: float) -> None:
            progress_bar.set_postfix(loss=f"{loss:.3g}")
        held_out = (q_inputs[n:], targets[n:]) if options.held_out_windows else None
        units = source.residual_units(index) if options.block_error == "norm-weighted" else None
        steps = [options.block_lr_of(widths.of(index, f.name)) for f in fits]
        with tf32_products(options.device, options.tf32):
            losses = optimize_block(call, fits, q_inputs[:n], targets[:n], options.epochs, steps,
                                    options.batch_size, options.seed, on_step, held_out, units)
    packed = {}
    for f in fits:
        bias = None if biases[f.name] is None else biases[f.name].detach()
        packed[f.name] = _packed_fit(f, weights[f.name], stats.get(f.name), bias, options, widths.of(index, f.name))
    return packed, losses


def _importance(stat: torch.Tensor | None, options: QuantizeOptions) -> torch.Tensor | None:
    """Each input's mean x_k^2 from a layer's input statistic: mean x x^T (GPTQ sweeps) or that already."""
    return None if stat is None else stat.diagonal() if options.gptq_indices else stat


def _initial_fit(name: str, w: torch.Tensor, importance: torch.Tensor | None, options: QuantizeOptions,
                 bits: int) -> LayerFit:
    """A layer's starting codebooks: LCQ's weighted k-means (or RTN grid) fit, else the RTN grid;
    `importance`: its inputs' mean x_k^2, or None (RTN: every input alike)."""
    wg = grouped(w, options.group_size)
    h = grouped_importance(importance, w.shape[1], options.group_size, w.device)
    book = lcq_init(wg, h, bits, options.rank, options.init) if options.method == "lcq" else \
        rtn_codebook(wg, live(h), bits, options.rank)
    return LayerFit(name=name, wg=wg, in_features=w.shape[1], book=book)


def _packed_fit(f: LayerFit, weight: torch.Tensor, stat: torch.Tensor | None, bias: torch.Tensor | None,
                options: QuantizeOptions, bits: int) -> PackedLinear:
    """The fitted layer packed: each weight's nearest entry, or GPTQ's sweep over the codebooks (with
    gptq-refit, S and B refit to the sweep's indices, then swept again); nearest entries for an expert
    that no calibration token chose (no input statistic to sweep with)."""
    indices = None
    if options.gptq_indices and stat is not None:
        hessian = 2 * stat

        def sweep() -> torch.Tensor:
            return gptq_indices(weight, hessian, stored_codebook(f.book).values(), options.group_size,
                                options.act_order)
        indices = sweep()
        if options.assign == "gptq-refit":
            s, b = fit_codebooks_to_indices(weight, hessian, indices, f.book.s, f.book.v, f.book.b,
                                            options.group_size)
            f.book = Codebook(s, f.book.v, b)
            indices = sweep()  # the refit codebook, dual-quantized, is what the indices must serve
    return pack(f.book, f.wg, f.in_features, bits, options.group_size, bias, indices)


def _head_stat(source: SourceModel, hidden: torch.Tensor, options: QuantizeOptions, batch: int) -> torch.Tensor:
    """The head's input statistic (_initial_fit) over the quantized model's last hidden states."""
    total, count = 0, 0
    for start in range(0, hidden.shape[0], batch):
        x = source.final_norm(hidden[start:start + batch]).reshape(-1, hidden.shape[-1])
        total = total + (x.t() @ x if options.gptq_indices else (x * x).sum(0))
        count += x.shape[0]
    return total / count


def _packed_head(source: SourceModel, stat: torch.Tensor | None, options: QuantizeOptions,
                 device: torch.device) -> PackedLinear:
    """lm_head (or the embedding table it is tied to) packed at head_bits, from the RTN or weighted
    k-means fit (no block-wise stage: the head's output is the logits)."""
    weight = _head_weight(source, device)
    fit = _initial_fit(HEAD, weight, _importance(stat, options), options, options.head_bits)
    return _packed_fit(fit, weight, stat, None, options, options.head_bits)


def _head_weight(source: SourceModel, device: torch.device) -> torch.Tensor:
    """The full-precision head (fp32): lm_head, or the embedding table it is tied to."""
    name = f"{EMBED}.weight" if source.config.tie_word_embeddings else f"{HEAD}.weight"
    return source.tensor(name).float().to(device)


def _packed_embedding(source: SourceModel, options: QuantizeOptions, device: torch.device) -> PackedLinear:
    """An untied embedding table packed at the head's width: the weighted k-means or RTN fit with every
    hidden unit alike (a table has no input statistic). Lookups cost no product, so this saves memory
    only, but an fp16 table is a quarter of Llama-3-8B's bytes at W2."""
    weight = source.tensor(f"{EMBED}.weight").float().to(device)
    fit = _initial_fit(EMBED, weight, None, options, options.head_bits)
    return pack(fit.book, fit.wg, fit.in_features, options.head_bits, options.group_size)


def _head_stage(source: SourceModel, head: PackedLinear, train: tuple[torch.Tensor, torch.Tensor],
                held_out: tuple[torch.Tensor, torch.Tensor], options: QuantizeOptions, progress: bool,
                served: Served | None = None) -> tuple[PackedLinear, StageScore]:
    """The packed head tuned on the logits' KL (finetune.tune_head) for the block-wise stage's epochs and
    step at the head's width; train and held_out: the last hidden states of the quantized and
    full-precision models over those windows (no held-out windows: empty); served: a tied head's model
    to score it with (_served)."""
    from tqdm import tqdm

    weight = _head_weight(source, head.qweight.device)
    bar = tqdm(total=options.epochs * -(-len(train[0]) // options.batch_size), desc="head", disable=not progress,
               unit="step")

    def on_step(loss: float) -> None:
        bar.update()
        bar.set_postfix(kl=f"{loss:.3g}")
    lr = options.block_lr_of(options.head_bits)
    train, held_out = ((source.final_norm(quantized), source.final_norm(full)) for quantized, full in (train, held_out))
    with tf32_products(options.device, options.tf32):
        tuned = tune_head(head, *train, weight, options.epochs, lr, options.batch_size, options.seed, on_step,
                          held_out if len(held_out[0]) else None, served)
    bar.close()
    return tuned


def _dense_weights(packed: dict[str, PackedLinear], device: torch.device) -> dict[str, torch.Tensor]:
    weights = {}
    for name, layer in packed.items():
        weights[f"{name}.weight"] = dequantize(layer.to(device))
    return weights


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: torch's counter on CUDA; on Linux the process's peak RSS (clear_refs 5), after
    glibc hands its freed heap back so that the new peak starts from what is live; elsewhere nothing,
    so the peak read later also covers what came before."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")


def check_model(model_dir: Path, config: dict, options: QuantizeOptions) -> QuantizeOptions:
    """The settings that depend on the model: --seqlen within its context, the layers and projections
    --layer-bits names exist, --target-bits is in reach; returns the options with --seqlen chosen for it
    (QuantizeOptions.for_context)."""
    options = options.for_context(config.get("max_position_embeddings"))
    shapes = linear_shapes(CheckpointReader(model_dir), config["num_hidden_layers"])
    options.widths.check_layers(config["num_hidden_layers"], {name.rsplit(".", 1)[-1] for _, name in shapes})
    if options.target_bits is not None:
        check_target(shapes, options.target_bits, options.bits, options.rank, options.group_size)
    return options


def check_paths(model_dir: Path, out_dir: Path) -> dict:
    """The source's config (a supported architecture), and an output folder that does not exist yet and
    whose working paths (OUT_DIR.partial, which a run deletes first, and its lock file) neither are the
    source nor hold it: resolved, so that a symlink or `..` cannot hide that."""
    config = read_config(model_dir)
    if out_dir.exists() or out_dir.is_symlink():  # (a dangling link too: the last rename would fail on it)
        raise UserError(f"{out_dir} already exists; choose a new output folder")
    check_output(out_dir, "output folder")
    source = model_dir.resolve()
    partial = _partial(out_dir)
    if (partial.exists() or partial.is_symlink()) and not _unfinished_run(partial):
        raise UserError(f"{partial} exists and is no unfinished `lcq quantize` run (it has no {PROGRESS_FILE}), "
                        "which a run would delete; move it away or choose another output folder")
    lock = _lock_path(partial)
    if lock.is_symlink() or (lock.exists() and (not lock.is_file() or lock.stat().st_size)):
        raise UserError(f"{lock} exists and is no lock of `lcq quantize` (an empty file); move it away or choose "
                        "another output folder")
    for path in (out_dir, partial, _lock_path(partial)):
        resolved = path.resolve()
        if resolved == source or resolved in source.parents:
            raise UserError(f"the model folder {model_dir} is or lies inside {path}, which quantizing into {out_dir} "
                            "deletes or overwrites; choose another output folder")
    return config


def _unfinished_run(partial: Path) -> bool:
    """Whether OUT_DIR.partial is a run's: it has the progress file, or a run stopped before it wrote it (a folder
    holding nothing but that file's temporary: it was refused, and neither --resume nor a new run could go on)."""
    return (partial / PROGRESS_FILE).is_file() or (partial.is_dir() and not partial.is_symlink() and
                                                   {p.name for p in partial.iterdir()} <= {PROGRESS_FILE + ".tmp"})


def _partial(out_dir: Path) -> Path:
    """OUT_DIR.partial: where the output grows until it is complete."""
    return out_dir.with_name(out_dir.name + ".partial")


def _lock_path(partial: Path) -> Path:
    """OUT_DIR.partial.lock (_exclusive)."""
    return partial.with_name(partial.name + ".lock")


def quantize_model(model_dir: str | Path, out_dir: str | Path, options: QuantizeOptions, resume: bool = False,
                   progress: bool = True) -> QuantizeSummary:
    """Quantize every decoder block's linear layers of a Llama-family folder into an LCQ folder."""
    from tqdm import tqdm

    started = time.time()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    options.validate()
    config_dict = check_paths(model_dir, out_dir)
    options = check_model(model_dir, config_dict, options)
    source_config = json.loads((model_dir / "config.json").read_text())  # read as another architecture: kept
    partial = _partial(out_dir)
    recorded = options.recorded()
    device = torch.device(options.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # The inputs are read (a folder without readable weights, tokenizer or calibration windows fails) before
    # anything is written.
    source = SourceModel(model_dir, device)
    first_block = source.block(0)  # (weights that config.json misdescribes fail here)
    tokens = calibration_batch(load_tokenizer(model_dir), options.calib_text, options.nsamples, options.seqlen,
                               options.seed, options.held_out_windows, options.extra_windows) \
        if options.needs_data else None
    started_as = {"options": recorded, "source": source_fingerprint(model_dir, options.calib_text)}
    lock = _exclusive(partial)  # held until this function returns
    done = _prepare_partial(partial, started_as, resume)
    torch.manual_seed(options.seed)
    # With a packed head, an untied table is packed too; the quantized stream starts from its lookups.
    embedding = _packed_embedding(source, options, device) \
        if options.head_bits and not source.config.tie_word_embeddings else None

    fp_stream = q_stream = None
    train, held, end_to_end = options.window_rows()
    # The quantized stream carries the block-wise stage's windows (training, then held-out); the
    # full-precision one the end-to-end stage's extra windows after them too, for their teacher.
    quantized_rows = slice(0, held.stop)
    if tokens is not None:
        fp_stream = source.embed(tokens)
        q_stream = fp_stream[quantized_rows].clone() if embedding is None else \
            source.embed(tokens[quantized_rows], dequantize(embedding))
        if options.target_bits is not None:
            options = replace(options, layer_bits=_target_widths(source, tokens[train], options, partial, progress))

    losses: list[tuple[float, float]] = []
    bar = tqdm(range(source.num_layers), desc="quantizing blocks", disable=not progress, unit="block")
    for index in bar:
        block, first_block = (first_block, None) if index == 0 else (source.block(index), None)
        shard = _block_shard(partial, index)
        targets = None
        if options.needs_data:
            call = block_call(block, source.block_inputs(index))
            targets = run_block(call, {}, fp_stream, options.batch_size)
        if index < done:
            packed = _read_block(shard, index, options)
            block_losses = (float("nan"), float("nan"))
        else:
            packed, block_losses = _quantize_block(source, index, block, options, q_stream,
                                                   None if targets is None else targets[quantized_rows], bar)
            tensors = {}
            for name, layer in packed.items():
                tensors.update(linear_tensors(f"model.layers.{index}.{name}", layer))
            for name, tensor in block.state_dict().items():
                if not any(name.startswith(linear + ".") for linear in packed):
                    tensors[f"model.layers.{index}.{name}"] = tensor.to(torch.float16)
            write_shard(shard, tensors)
            write_json(partial / PROGRESS_FILE, {**started_as, "done": index + 1})
        losses.append(block_losses)
        if options.needs_data:
            bar.set_postfix(loss="resumed" if index < done else f"{block_losses[1]:.3g}")  # not a nan to alarm
            q_stream = run_block(block_call(block, source.block_inputs(index)), _dense_weights(packed, device),
                                 q_stream, options.batch_size)
            fp_stream = targets
        del block

    if source.mtp is not None and not json.loads((partial / PROGRESS_FILE).read_text()).get("mtp"):
        _mtp_stage(source, partial, options, (fp_stream, q_stream, tokens) if options.needs_data else None, bar)
    head_kl = None
    if options.head_bits and not json.loads((partial / PROGRESS_FILE).read_text()).get("head"):
        head_stat = _head_stat(source, q_stream[train], options, options.batch_size) if options.needs_data else None
        head = _packed_head(source, head_stat, options, device)
        if options.needs_data and options.epochs:
            served = _served(source, partial, options, tokens[train], tokens[held]) \
                if source.config.tie_word_embeddings else None
            head, head_kl = _head_stage(source, head, (q_stream[train], fp_stream[train]),
                                        (q_stream[held], fp_stream[held]), options, progress, served)
            del served
        write_shard(partial / HEAD_SHARD, linear_tensors(HEAD, head.to("cpu")))
        _mark_done(partial, "head")
        del head
    finetune_kl = finetune_peak = None
    peak = _peak_memory(device)
    if options.finetune_epochs:
        teacher = source.final_norm(fp_stream)
        fp_stream = q_stream = targets = None  # the block pass's activations, on the device, not needed now
        _reset_peak_memory(device)
        tokens = tokens.to(device)
        finetune_kl = _finetune_stage(source, partial, (tokens[end_to_end], teacher[end_to_end]),
                                      (tokens[held], teacher[held]), embedding, options, progress)
        finetune_peak = _peak_memory(device)
    extra = {name: t.to(torch.float16) if t.is_floating_point() else t for name, t in source.non_block_tensors().items()}
    kept = [EMBED, source.final_norm_name, HEAD]
    if options.head_bits:  # a tied table is not stored: the packed head serves its lookups
        del extra[f"{EMBED}.weight"]
        extra.pop(f"{HEAD}.weight", None)
        kept = [source.final_norm_name]
        if embedding is not None:
            extra.update(linear_tensors(EMBED, embedding.to("cpu")))
    write_shard(partial / "model-extra.safetensors", extra)
    layer_bits = options.widths.overrides(
        source.num_layers, lambda index: _packed_names(_block_shard(partial, index), f"model.layers.{index}"))
    if source.mtp is not None:  # the multi-token-prediction layer, packed as block num_layers under its own names
        layer_bits.update({f"{source.mtp.layer}.{name}": bits
                           for name in _packed_names(partial / MTP_SHARD, source.mtp.layer)
                           if (bits := options.widths.of(source.num_layers, name)) != options.bits})
    config_dict["quantization_config"] = quantization_config(
        options.bits, options.rank, options.group_size, options.method, modules_not_quantized=kept,
        **{k: recorded[k] for k in ("nsamples", "seqlen", "epochs", "lr", "init", "assign", "act_order", "calib_chars",
                                   "finetune_epochs", "finetune_lr", "finetune_samples", "finetune_index_updates",
                                   "head_bits", "val_samples", "block_error")},
        tf32=options.tf32 and device.type == "cuda",  # whether the tuning stages' products ran in TF32
        **({"embed_bits": options.head_bits} if embedding is not None else {}),
        **({"layer_bits": layer_bits} if layer_bits else {}),
        **({"layer_lr": {str(b): options.block_lr_of(b) for b in sorted(set(layer_bits.values()))}}
           if layer_bits and options.method == "lcq" and options.epochs else {}),
        **({"layer_finetune_lr": {str(b): options.end_to_end_lr_of(b) for b in sorted(set(layer_bits.values()))}}
           if layer_bits and options.finetune_epochs else {}),
        **({"target_bits": options.target_bits} if options.target_bits is not None else {}),
        **({"source_config": source_config} if source_config != config_dict else {}))
    config_dict["torch_dtype"] = config_dict["dtype"] = "float16"  # its full-precision tensors (both names' readers)
    write_json(partial / "config.json", config_dict)
    copy_model_assets(model_dir, partial)
    write_index(partial)
    # Renamed before its progress is dropped: a crash in between leaves the finished output (with a stray
    # progress file), where the other order left a finished .partial that --resume would quantize again.
    partial.rename(out_dir)
    (out_dir / PROGRESS_FILE).unlink()
    (out_dir / WIDTHS_FILE).unlink(missing_ok=True)
    Path(lock.name).unlink()
    lock.close()

    reader = CheckpointReader(out_dir)
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    return QuantizeSummary(seconds=time.time() - started, bits_per_weight=reader.decoder_bits_per_weight(),
                           size_bytes=size, peak_memory_bytes=max(peak, _peak_memory(device)), block_losses=losses,
                           head_kl=head_kl, finetune_kl=finetune_kl, finetune_peak_memory_bytes=finetune_peak,
                           layer_bits=options.layer_bits, resumed_blocks=min(done, source.num_layers))


def _mtp_stage(source: SourceModel, partial: Path, options: QuantizeOptions,
               streams: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, progress_bar) -> None:
    """Pack the multi-token-prediction layer's decoder layer as one more block: its inputs over the calibration
    windows made from the last block's outputs and the next tokens (mtp_inputs), the full-precision model's
    for its targets and the quantized model's for its own. Its projection and norms stay in full precision."""
    index, block = source.num_layers, source.mtp_block()
    q_inputs = targets = None
    if streams is not None:
        fp_stream, q_stream, tokens = streams
        rows = q_stream.shape[0]
        q_inputs = source.mtp_inputs(q_stream, tokens[:rows])
        targets = run_block(block_call(block, source.block_inputs(index)), {}, source.mtp_inputs(fp_stream[:rows],
                            tokens[:rows]), options.batch_size)
    packed, _ = _quantize_block(source, index, block, options, q_inputs, targets, progress_bar)
    prefix = source.mtp.layer
    tensors = {name: t.to(torch.float16) for name, t in source.mtp_tensors().items()}
    for name, layer in packed.items():
        tensors.update(linear_tensors(f"{prefix}.{name}", layer))
    for name, tensor in block.state_dict().items():
        if not any(name.startswith(linear + ".") for linear in packed):
            tensors[f"{prefix}.{name}"] = tensor.to(torch.float16)
    write_shard(partial / MTP_SHARD, tensors)
    _mark_done(partial, "mtp")


def _mark_done(partial: Path, stage: str) -> None:
    """Record in the progress file that a stage after the blocks is written (--resume skips it)."""
    state = json.loads((partial / PROGRESS_FILE).read_text())
    write_json(partial / PROGRESS_FILE, {**state, stage: True})


def _finetune_stage(source: SourceModel, partial: Path, train: tuple[torch.Tensor, torch.Tensor],
                    held_out: tuple[torch.Tensor, torch.Tensor], embedding: PackedLinear | None,
                    options: QuantizeOptions, progress: bool) -> StageScore | None:
    """The end-to-end stage (finetune.py) over the packed blocks in `partial`, and a packed head with
    them; train and held_out: windows' tokens and the full-precision model's final hidden states
    (after its last norm), the teacher (no held-out windows: empty). The
    tuned shards are written beside them (*.tuned) and the progress file marked before any replaces
    its shard, so an interrupted run resumes by finishing the renames, or, if it stopped earlier, by
    tuning again from the untouched shards. `embedding`: a packed untied table, looked up as served."""
    from safetensors.torch import load_file
    from tqdm import tqdm

    shards = [_block_shard(partial, index) for index in range(source.num_layers)]
    shards += [partial / HEAD_SHARD] if options.head_bits else []
    tuned_files = [shard.with_suffix(".tuned") for shard in shards]
    state = json.loads((partial / PROGRESS_FILE).read_text())
    kl = None
    if not state.get("tuned"):
        for stale in tuned_files:
            stale.unlink(missing_ok=True)
        contents = [load_file(str(shard)) for shard in shards]
        model, packed, norms = _quantized_lm(source, shards, contents, options, embedding)
        head = model.lm_head.weight.detach()
        steps = options.finetune_epochs * -(-len(train[0]) // options.batch_size)
        bar = tqdm(total=steps, desc="end-to-end", disable=not progress, unit="step")

        def on_step(loss: float) -> None:
            bar.update()
            bar.set_postfix(kl=f"{loss:.3g}")
        with tf32_products(options.device, options.tf32):
            tuned, tuned_norms, kl = finetune(model, packed, norms, *train, head, options.finetune_epochs,
                                              options.end_to_end_lr, options.batch_size, options.seed, on_step,
                                              held_out if len(held_out[0]) else None, options.end_to_end_lr_of,
                                              options.finetune_index_updates,
                                              tied=bool(options.head_bits) and source.config.tie_word_embeddings)
        bar.close()
        for tensors, target in zip(contents, tuned_files):
            for name, layer in tuned.items():
                if f"{name}.qweight" in tensors:
                    tensors.update(linear_tensors(name, layer))
            tensors.update({name: w.to(torch.float16) for name, w in tuned_norms.items() if name in tensors})
            write_shard(target, tensors)
        write_json(partial / PROGRESS_FILE, {**state, "tuned": True})
    for tuned_file, shard in zip(tuned_files, shards):
        if tuned_file.is_file():
            tuned_file.replace(shard)
    return kl


def _quantized_lm(source: SourceModel, shards: list[Path], contents: list[dict[str, torch.Tensor]],
                  options: QuantizeOptions, embedding: PackedLinear | None,
                  ) -> tuple[torch.nn.Module, dict[str, PackedLinear], list[str]]:
    """The quantized model's transformers CausalLM (source.causal_lm) from the written shards (`contents`: each
    of `shards` read; the blocks', then the packed head's where there is one), with its packed layers
    by name, which it leaves on the meta device for the caller to put in place (finetune.put_in_place), and
    its blocks' norm weights by name. `embedding`: a packed untied table, looked up as served."""
    from lcq.format.checkpoint import linear_from_tensors

    packed = {f"model.layers.{index}.{name}": layer for index, (shard, tensors) in enumerate(zip(shards, contents))
              if index < source.num_layers for name, layer in _read_block(shard, index, options, tensors).items()}
    if len(shards) > source.num_layers:
        packed[HEAD] = linear_from_tensors(contents[-1], HEAD, options.head_bits, options.rank, options.group_size,
                                           lambda _: str(shards[-1]))
    # the blocks' tensors outside the packed layers: norms (Qwen3's q/k norms too), tuned; a mixture's router,
    # gpt-oss's sinks, held as they are
    unpacked = {name: tensor for tensors in contents for name, tensor in tensors.items()
                if name.rpartition(".")[0] not in packed}
    norms = [name for name in unpacked if name.endswith("norm.weight")]
    looked_up = {} if embedding is None else {f"{EMBED}.weight": dequantize(embedding)}  # as it is served
    return source.causal_lm({**source.non_block_tensors(), **unpacked, **looked_up}), packed, norms


def _served(source: SourceModel, partial: Path, options: QuantizeOptions, tokens: torch.Tensor,
            held_out_tokens: torch.Tensor) -> Served:
    """For the head stage of a head tied to the embedding table: the quantized model with its packed blocks in
    place (their codebooks fixed), which the stage completes with the head under tuning and its lookups, and
    the windows' tokens. It holds every block's indices and codebooks, as the end-to-end stage does."""
    from safetensors.torch import load_file

    shards = [_block_shard(partial, index) for index in range(source.num_layers)]
    model, packed, _ = _quantized_lm(source, shards, [load_file(str(shard)) for shard in shards], options, None)
    model.requires_grad_(False)
    put_in_place(model, [LayerTuning.start(prefix, layer, source.device) for prefix, layer in packed.items()])
    return Served(model, tokens.to(source.device), held_out_tokens.to(source.device))


def _target_widths(source: SourceModel, tokens: torch.Tensor, options: QuantizeOptions, partial: Path,
                   progress: bool) -> list[str]:
    """The --layer-bits rules that --target-bits buys (allocation.py), chosen once: a resumed run reads
    them back. Each unit's loss at each width is estimated with its starting fit at that width."""
    from tqdm import tqdm

    saved = partial / WIDTHS_FILE
    if saved.is_file():
        return json.loads(saved.read_text())
    shapes = linear_shapes(source.reader, source.num_layers)
    widths = range(options.bits, WIDEST + 1)
    units = {}
    for layer in range(source.num_layers):
        for name in UNITS:
            stored = {b: unit_bytes(shapes, layer, name, b, options.rank, options.group_size) for b in widths}
            if stored[options.bits]:  # (a Nemotron-H block holds some units only)
                units[layer, name] = Unit(layer, name, stored, {})
    bar = tqdm(total=source.num_layers, desc="weighing layers", disable=not progress, unit="block")

    def on_block(block: BlockGradient) -> None:
        for name in (name for index, name in units if index == block.index):
            linears = [linear for linear in block_linears(block.block) if unit_of(linear) == name]
            for b in widths:
                fitted = {}
                for linear in linears:  # (an expert no weighing token chose has no importance: unweighted)
                    w = block.block.get_submodule(linear).weight.detach().float()
                    fit = _initial_fit(linear, w, block.importance.get(linear), options, b)
                    book = stored_codebook(fit.book).values()
                    fitted[f"{linear}.weight"] = dense_weight(book, assign(grouped(w, options.group_size), book),
                                                              w.shape[1])
                units[block.index, name].loss[b] = block.loss_increase(fitted)
        bar.update()
    weigh_blocks(source, tokens[:WEIGHING_WINDOWS], _head_weight(source, source.device), options.batch_size, on_block)
    bar.close()
    weights = sum(n * k for n, k in shapes.values())
    base = sum(u.stored[options.bits] for u in units.values())
    chosen = choose_widths(list(units.values()), options.bits, options.target_bits * weights / 8 - base)
    rules = [units[key].rule(b) for key, b in chosen.items() if b != options.bits]
    write_json(saved, rules)
    return rules


def _exclusive(partial: Path) -> IO[str]:
    """OUT_DIR.partial.lock, locked for this run while the returned file is open (the system lets go of it if
    the process dies): a second run into the same output would start over, deleting this one's partial
    folder under it."""
    return exclusive(_lock_path(partial), busy=f"another lcq quantize is writing {partial}; let it finish, or stop "
                     "it first")


def _prepare_partial(partial: Path, started_as: dict, resume: bool) -> int:
    """Create or reuse OUT_DIR.partial; returns how many blocks are already done. `started_as`: the recorded
    options and the source's fingerprint, which a resumed run must match."""
    progress_file = partial / PROGRESS_FILE
    if resume and progress_file.is_file():
        try:
            state = json.loads(progress_file.read_text())
            done, options_then = int(state["done"]), state["options"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{progress_file} is damaged; run without --resume to start over") from None
        if options_then != started_as["options"]:
            raise UserError(f"{partial} was started with different options; run without --resume to start over")
        if state.get("source") != started_as["source"]:
            raise UserError(f"{partial} was started from another source model or calibration text; run without "
                            "--resume to start over")
        return done
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"{partial}: cannot be created ({e.strerror})") from None
    write_json(progress_file, {**started_as, "done": 0})
    return 0


def _block_shard(partial: Path, index: int) -> Path:
    return partial / f"block-{index:05d}.safetensors"


def _packed_names(shard_path: Path, layer: str) -> list[str]:
    """The packed linears of decoder layer `layer` ("model.layers.3") as written in a shard, by name within the
    layer (a mixture's: each expert's)."""
    from safetensors import safe_open

    prefix = f"{layer}."
    with safe_open(str(shard_path), "pt") as shard:
        return [key[len(prefix):-len(".qweight")] for key in shard.keys() if key.endswith(".qweight")]


def _read_block(shard: Path, index: int, options: QuantizeOptions,
                tensors: dict[str, torch.Tensor] | None = None) -> dict[str, PackedLinear]:
    """The packed layers of a finished block, from its shard's tensors (read here unless given)."""
    from safetensors.torch import load_file

    from lcq.format.checkpoint import linear_from_tensors

    if tensors is None:
        try:
            tensors = load_file(str(shard))
        except Exception as e:  # (safetensors raises its own errors for a damaged file)
            raise UserError(f"{shard}: a finished block cannot be read ({e}); run without --resume to start "
                            "over") from None
    widths = options.widths
    prefix = f"model.layers.{index}."
    return {name: linear_from_tensors(tensors, f"model.layers.{index}.{name}", widths.of(index, name), options.rank,
                                      options.group_size, lambda _: str(shard))
            for name in (key[len(prefix):-len(".qweight")] for key in tensors
                         if key.startswith(prefix) and key.endswith(".qweight"))}
