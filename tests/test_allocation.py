"""--target-bits: the weighing pass, the greedy choice of widths, and quantization to a budget."""
from __future__ import annotations

import json

import pytest
import torch

from lcq.cli import main
from lcq.format import CheckpointReader
from lcq.quantizer import QuantizeOptions, quantize_model
from lcq.quantizer.allocation import (Unit, bits_per_weight_range, choose_widths, describe_widths, linear_shapes,
                                      weigh_blocks)
from lcq.quantizer.layer_bits import LayerWidths, block_linears
from lcq.quantizer.pipeline import WIDTHS_FILE, _head_weight
from lcq.quantizer.source import SourceModel
from lcq.quantizer.reference import load_reference_model
from tests.test_quantizer import _check_serves_like_its_reference
from tests.tiny_model import CALIBRATION_TEXT, make_tiny_hf


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_block_weighing_equals_the_whole_models_gradients(tmp_path, arch):
    """Block by block, forward then back down, the pass hands every block the loss gradient at its output and
    each linear layer's mean x^2 exactly as one backward pass of the whole transformers model gives them
    (summed next-token loss): a block's estimated loss increase with a weight replaced is 1/2 sum_t (g_t .
    (y'_t - y_t))^2, y' the layer's output in the whole model run with that weight."""
    folder = make_tiny_hf(tmp_path / arch, arch)
    source = SourceModel(folder, torch.device("cpu"))
    tokens = torch.randint(0, source.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    noise = torch.Generator().manual_seed(1)
    changed = {(index, name): source.reader.tensor(f"model.layers.{index}.{name}.weight").float() +
               0.05 * torch.randn(source.reader.shape(f"model.layers.{index}.{name}.weight"), generator=noise)
               for index in range(source.num_layers) for name in ("self_attn.q_proj", "mlp.down_proj")}
    estimated, importance = {}, {}

    def on_block(block):
        importance.update({(block.index, name): value for name, value in block.importance.items()})
        for (index, name), weight in changed.items():
            if index == block.index:
                estimated[index, name] = block.loss_increase({f"{name}.weight": weight})
    weigh_blocks(source, tokens, _head_weight(source, torch.device("cpu")), 2, on_block)

    model = load_reference_model(folder)
    outputs, grads, inputs = {}, {}, {}

    def keep(index):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            outputs[index] = hidden.detach()
            if hidden.requires_grad:
                hidden.register_hook(lambda g: grads.__setitem__(index, g))
        return hook
    hooks = [layer.register_forward_hook(keep(index)) for index, layer in enumerate(model.model.layers)]
    for index, layer in enumerate(model.model.layers):
        for name in block_linears(layer):
            hooks.append(layer.get_submodule(name).register_forward_hook(
                lambda m, args, out, key=(index, name): inputs.__setitem__(key, args[0].detach().flatten(0, -2))))
    logits = model(tokens).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum").backward()
    assert set(importance) == set(inputs) and len(importance) == 7 * source.num_layers
    for key, x in inputs.items():
        torch.testing.assert_close(importance[key], x.pow(2).mean(0), rtol=1e-4, atol=1e-7)
    base, gradient = dict(outputs), dict(grads)
    for (index, name), weight in changed.items():
        module = model.model.layers[index].get_submodule(name)
        original = module.weight.data.clone()
        module.weight.data = weight
        with torch.no_grad():
            model(tokens)
        module.weight.data = original
        expected = 0.5 * float((gradient[index] * (outputs[index] - base[index])).sum(-1).pow(2).sum())
        assert estimated[index, name] > 0
        assert estimated[index, name] == pytest.approx(expected, rel=1e-3), (index, name)


def test_widths_go_to_the_largest_loss_drop_per_byte_within_the_budget():
    units = [Unit(0, "qkv", {2: 0, 3: 100, 4: 200}, {2: 10.0, 3: 4.0, 4: 3.5}),  # drops 6 then 0.5 per 100 bytes
             Unit(0, "down_proj", {2: 0, 3: 300, 4: 600}, {2: 30.0, 3: 9.0, 4: 0.0}),  # 21 then 9 per 300
             Unit(1, "o_proj", {2: 0, 3: 50, 4: 100}, {2: 1.0, 3: 1.0, 4: 1.0})]  # nothing to gain
    assert choose_widths(units, 2, 99) == {(0, "qkv"): 2, (0, "down_proj"): 2, (1, "o_proj"): 2}
    assert choose_widths(units, 2, 100) == {(0, "qkv"): 3, (0, "down_proj"): 2, (1, "o_proj"): 2}
    # down_proj's first bit (7 per 100) comes first; its second (3 per 100) does not fit, qkv's first still does
    assert choose_widths(units, 2, 450) == {(0, "qkv"): 3, (0, "down_proj"): 3, (1, "o_proj"): 2}
    assert choose_widths(units, 2, 700) == {(0, "qkv"): 3, (0, "down_proj"): 4, (1, "o_proj"): 2}
    assert choose_widths(units, 2, 10_000) == {(0, "qkv"): 4, (0, "down_proj"): 4, (1, "o_proj"): 2}
    rules = [units[0].rule(3), "qkv@1=3", "qkv@2=3", "down_proj@0=4", "qkv@5=3"]
    assert describe_widths(rules, 2) == "qkv=3 in layers 0-2, 5; down_proj=4 in layers 0; the rest at 2 bits"
    assert describe_widths([], 3) == "every layer at 3 bits"


def test_target_bits_quantizes_to_the_budget_resumes_and_serves(tmp_path, tiny_hf, capsys, monkeypatch):
    """The CLI spends the budget (bits per weight at most the target, some layers wider, fused parts alike),
    records the target and the chosen widths (format version 4) and says which; an interrupted run resumes
    with the widths it chose, without weighing the layers again, to the same files; the folder serves like
    transformers with its dequantized weights."""
    import lcq.quantizer.pipeline as pipeline

    low, high = bits_per_weight_range(linear_shapes(CheckpointReader(tiny_hf), 2), 2, 2, 64)
    target = round(low + 0.3 * (high - low), 2)
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIBRATION_TEXT)
    whole = tmp_path / "whole"
    assert main(["quantize", str(tiny_hf), str(whole), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32",
                 "--epochs", "1", "--target-bits", str(target)]) == 0
    printed = capsys.readouterr().out
    reader = CheckpointReader(whole)
    quant = reader.quant
    assert quant["target_bits"] == target and quant["format_version"] == 4
    assert low < reader.decoder_bits_per_weight() <= target
    chosen = printed.split(f"--target-bits {target}: ")[1].strip()
    assert chosen.endswith("the rest at 2 bits") and "=3 in layers" in chosen
    for prefix in reader.quantized_prefixes():
        assert reader.linear(prefix).bits == quant["layer_bits"].get(prefix, 2)
    _check_serves_like_its_reference(whole)

    options = QuantizeOptions(bits=2, rank=2, group_size=64, calib_text=CALIBRATION_TEXT, nsamples=4, seqlen=32,
                              epochs=1, target_bits=target)
    original = pipeline._quantize_block

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "_quantize_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(tiny_hf, tmp_path / "resumed", options, progress=False)
    rules = json.loads((tmp_path / "resumed.partial" / WIDTHS_FILE).read_text())
    assert LayerWidths(2, rules).overrides(2) == quant["layer_bits"]

    def weighed_again(*args, **kwargs):
        raise AssertionError("the widths were chosen before the interruption")
    monkeypatch.setattr(pipeline, "_quantize_block", original)
    monkeypatch.setattr(pipeline, "weigh_blocks", weighed_again)
    summary = quantize_model(tiny_hf, tmp_path / "resumed", options, resume=True, progress=False)
    assert summary.layer_bits == rules
    resumed = CheckpointReader(tmp_path / "resumed")
    assert sorted(resumed.names()) == sorted(reader.names()) and not (tmp_path / "resumed" / WIDTHS_FILE).exists()
    for name in reader.names():
        torch.testing.assert_close(reader.tensor(name), resumed.tensor(name), rtol=0, atol=0)


@pytest.mark.parametrize("arch, experts, dense_layers", [("qwen3_moe", 6, [1]), ("gpt_oss", 4, []), ("llama4", 4, []),
                                                         ("glm4_moe", 8, [0]), ("deepseek_v3", 8, [0])])
def test_target_bits_weighs_a_mixtures_experts_as_units(tmp_path, arch, experts, dense_layers):
    """In a mixture every expert's matrices are counted (shapes, budget) and weighed together as their layer's
    gate_up or down_proj unit: the budget is kept, each rule's width reaches every expert's matrix, and the
    folder serves like transformers with its dequantized weights. (DeepSeek-V3's latent attention reads its
    input through q_a_proj, q_b_proj and kv_a_proj_with_mqa: its qkv unit, four matrices a layer with o_proj.)"""
    # Llama 4 with 2 layers, both mixtures with a shared expert
    folder = make_tiny_hf(tmp_path / "hf", arch, **(dict(num_hidden_layers=2, interleave_moe_layer_step=1)
                                                   if arch == "llama4" else {}))
    shapes = linear_shapes(CheckpointReader(folder), 2)
    shared = 3 if arch in ("llama4", "glm4_moe", "deepseek_v3") else 0
    assert len(shapes) == 2 * 4 + sum(3 if layer in dense_layers else 3 * experts + shared for layer in range(2))
    low, high = bits_per_weight_range(shapes, 2, 2, 32)
    target = round(low + 0.7 * (high - low), 2)  # enough for attention at 4 bits and some experts wider
    summary = quantize_model(folder, tmp_path / "lcq", QuantizeOptions(
        bits=2, rank=2, group_size=32, calib_text=CALIBRATION_TEXT, nsamples=4, seqlen=32, epochs=1,
        target_bits=target), progress=False)
    reader = CheckpointReader(tmp_path / "lcq")
    assert low < reader.decoder_bits_per_weight() <= target
    mixture = 1 if 0 in dense_layers else 0
    assert any(rule.startswith((f"gate_up@{mixture}=", f"down_proj@{mixture}=")) for rule in summary.layer_bits)
    widths = LayerWidths(2, summary.layer_bits)
    for prefix in reader.quantized_prefixes():
        layer, _, name = prefix.removeprefix("model.layers.").partition(".")
        assert reader.linear(prefix).bits == widths.of(int(layer), name)
    _check_serves_like_its_reference(tmp_path / "lcq")


def test_target_bits_over_blocks_of_one_part(tmp_path):
    """Nemotron 3's blocks hold one part each (Mamba-2, attention, or a mixture of ungated experts): each block
    is weighed for the units it has only (Mamba-2's in_proj as qkv, out_proj as o_proj; a mixture's up_proj as
    gate_up, down_proj), the budget is kept, and the folder serves like transformers with its weights."""
    folder = make_tiny_hf(tmp_path / "hf", "nemotron_h_moe")
    shapes = linear_shapes(CheckpointReader(folder), 5)
    low, high = bits_per_weight_range(shapes, 2, 2, 32)
    summary = quantize_model(folder, tmp_path / "lcq", QuantizeOptions(
        bits=2, rank=2, group_size=32, calib_text=CALIBRATION_TEXT, nsamples=4, seqlen=32, epochs=1,
        target_bits=round(low + 0.6 * (high - low), 2)), progress=False)
    reader = CheckpointReader(tmp_path / "lcq")
    assert low < reader.decoder_bits_per_weight() <= round(low + 0.6 * (high - low), 2) and summary.layer_bits
    held = {0: ("qkv", "o_proj"), 1: ("gate_up", "down_proj"), 2: ("qkv", "o_proj"), 3: ("qkv", "o_proj"),
            4: ("gate_up", "down_proj")}  # Mamba-2, mixture, Mamba-2, attention, mixture
    for rule in summary.layer_bits:
        unit, layer = rule.split("=")[0].split("@")
        assert unit in held[int(layer)], rule
    _check_serves_like_its_reference(tmp_path / "lcq")
