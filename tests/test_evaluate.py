"""Evaluation: the reference model a folder stands for, and perplexity over non-overlapping windows."""
from __future__ import annotations

import math

import pytest
import torch

from lcq.errors import UserError
from lcq.format import CheckpointReader, dequantize
from lcq.quantizer.evaluate import load_reference_model, perplexity
from tests.tiny_model import CALIBRATION_TEXT, make_tiny_lcq

CTX = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama (folder/hf) and its W4 g32 quantization (folder/lcq; RTN: cheap, same format)."""
    folder = tmp_path_factory.mktemp("tiny")
    lcq = make_tiny_lcq(folder, "llama", bits=4, rank=1, group_size=32, method="rtn")
    return folder / "hf", lcq


def _transformers_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _tokens(folder, text: str) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@torch.inference_mode()
def _direct_perplexity(model, ids: torch.Tensor, ctx: int) -> float:
    """exp(mean NLL), written out with log_softmax and gather."""
    nlls = []
    for w in range(ids.numel() // ctx):
        chunk = ids[w * ctx:(w + 1) * ctx]
        logp = torch.log_softmax(model(chunk.unsqueeze(0)).logits[0, :-1].double(), dim=-1)
        nlls.append(-logp.gather(1, chunk[1:].unsqueeze(1)).squeeze(1))
    return math.exp(torch.cat(nlls).mean().item())


@torch.inference_mode()
def test_full_precision_folder_matches_transformers(tiny):
    hf, _ = tiny
    ids = _tokens(hf, CALIBRATION_TEXT)[:CTX].unsqueeze(0)
    expected = _transformers_model(hf)(ids).logits
    got = load_reference_model(hf)(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_lcq_folder_matches_dequantized_reference(tiny):
    """Built independently: the source model with every packed linear replaced by its dequantized
    weight and every other tensor rounded to fp16 as stored."""
    hf, lcq = tiny
    expected_model = _transformers_model(hf)
    reader = CheckpointReader(lcq)
    prefixes = reader.quantized_prefixes()
    assert len(prefixes) == 7 * expected_model.config.num_hidden_layers
    for name, param in expected_model.named_parameters():
        prefix = name.rsplit(".", 1)[0]
        if prefix in prefixes:
            param.copy_(dequantize(reader.linear(prefix)))
        else:
            param.copy_(param.half().float())
    ids = _tokens(hf, CALIBRATION_TEXT)[:CTX].unsqueeze(0)
    model = load_reference_model(lcq)
    for prefix in prefixes:
        torch.testing.assert_close(model.get_submodule(prefix).weight, dequantize(reader.linear(prefix)),
                                   rtol=0, atol=0)
    torch.testing.assert_close(model(ids).logits, expected_model(ids).logits, rtol=1e-4, atol=1e-4)
    full = _transformers_model(hf)(ids).logits
    assert (model(ids).logits - full).abs().max() > 1e-3  # the weights really are the quantized ones


@pytest.mark.parametrize("which", ["hf", "lcq"])
def test_perplexity_is_exp_mean_nll_over_windows(tiny, which):
    hf, lcq = tiny
    folder = hf if which == "hf" else lcq
    ids = _tokens(folder, CALIBRATION_TEXT)
    assert ids.numel() >= 3 * CTX
    got = perplexity(folder, CALIBRATION_TEXT, ctx=CTX)
    assert math.isfinite(got) and got > 1.0
    assert got == pytest.approx(_direct_perplexity(load_reference_model(folder), ids, CTX), rel=1e-5)
    capped = perplexity(folder, CALIBRATION_TEXT, ctx=CTX, max_tokens=2 * CTX + 5)
    assert capped == pytest.approx(_direct_perplexity(load_reference_model(folder), ids[:2 * CTX], CTX), rel=1e-5)
    changed = load_reference_model(folder)  # a model passed in is the one evaluated: zero logits, every token 1/V
    torch.nn.init.zeros_(changed.lm_head.weight)
    assert perplexity(folder, CALIBRATION_TEXT, ctx=CTX, model=changed) == pytest.approx(changed.config.vocab_size)


def test_perplexity_rejects_text_too_short_or_empty(tiny):
    hf, _ = tiny
    with pytest.raises(UserError, match="empty"):
        perplexity(hf, "  \n", ctx=CTX)
    with pytest.raises(UserError, match="fewer than one window"):
        perplexity(hf, "a few words", ctx=CTX)
