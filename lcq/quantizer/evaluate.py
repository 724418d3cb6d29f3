"""Perplexity of a model folder (full precision or LCQ) on a text, with the reference model."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from lcq.errors import UserError
from lcq.inputs import load_tokenizer

from .reference import load_reference_model, read_config


@torch.inference_mode()
def perplexity(model_dir: str | Path, text: str, ctx: int = 512, device: str = "cpu",
               max_tokens: int | None = None, model: torch.nn.Module | None = None) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `ctx` tokens (the first token of each
    window is context only). max_tokens caps the evaluated text so runs stay affordable. model: the folder's
    reference model already loaded (load_reference_model), as a benchmark that changes its layers passes it."""
    if not text.strip():
        raise UserError("evaluation text is empty")
    context = read_config(model_dir).get("max_position_embeddings")
    if context is not None and ctx > context:  # past its positions: what it gives there says nothing
        raise UserError(f"--ctx {ctx} is longer than the model's context of {context} tokens")
    tokenizer = load_tokenizer(model_dir)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    windows = ids.numel() // ctx
    if windows == 0:
        raise UserError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {ctx}")
    model = (model if model is not None else load_reference_model(model_dir)).to(device)
    total_nll, count = 0.0, 0
    for w in range(windows):
        chunk = ids[w * ctx:(w + 1) * ctx].unsqueeze(0).to(device)
        logits = model(chunk).logits[0, :-1].float()
        total_nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += ctx - 1
    return math.exp(total_nll / count)
