"""An fp16 Llama folder rotated as QuaRot and SliceGPT rotate one, for the quality study to quantize.

Every RMSNorm's weight is folded into the linears that read it, then the residual stream is rotated by
a random orthogonal Q (embeddings, the readers' inputs, o_proj's and down_proj's outputs, the head's
input) and each V head by a random orthogonal R (v_proj's outputs, o_proj's inputs). The result
computes what the source computes (up to fp16 rounding) with weights spread over every input unit,
the form rotation-based quantizers (QuIP#, QuaRot) quantize. A tied head becomes an untied one, since
the final norm is folded into it. Whether LCQ's codebooks gain from it:

    python bench/rotated_residual.py ~/.cache/lcq/smollm2-135m-instruct-fp16 /tmp/smollm2-rotated
    python bench/quality.py --model /tmp/smollm2-rotated --only fp16,lcq-w2r2,lcq-w2r2-gptq \\
        --results bench/results/quality-cpu-rotated.json
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402,F401  (takes bench/ itself off sys.path: bench/__init__.py)

import torch  # noqa: E402

from lcq.format import CheckpointReader, write_json, write_shard  # noqa: E402


def random_orthogonal(size: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (float64): QR of a Gaussian matrix, signs fixed by R's diagonal."""
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def rotated_tensors(reader: CheckpointReader, seed: int) -> dict[str, torch.Tensor]:
    """The folder's tensors with norms folded and the residual stream and V heads rotated (float64)."""
    config = reader.config
    if config["model_type"] not in ("llama", "mistral") or any(".bias" in name for name in reader.names()):
        raise SystemExit("only Llama and Mistral folders without biases rotate this way")
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    generator = torch.Generator().manual_seed(seed)
    q, r = random_orthogonal(hidden, generator), random_orthogonal(head_dim, generator)

    def read(name: str) -> torch.Tensor:
        return reader.tensor(name).double()

    embed = read("model.embed_tokens.weight")
    head = embed if config.get("tie_word_embeddings") else read("lm_head.weight")
    ones = torch.ones(hidden, dtype=torch.float64)
    out = {"model.embed_tokens.weight": embed @ q.t(), "model.norm.weight": ones,
           "lm_head.weight": head * read("model.norm.weight") @ q.t()}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for norm, readers in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                              ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
            scale = read(f"{p}{norm}.weight")
            out[f"{p}{norm}.weight"] = ones
            for name in readers:
                out[f"{p}{name}.weight"] = read(f"{p}{name}.weight") * scale @ q.t()
        v = out[f"{p}self_attn.v_proj.weight"]
        out[f"{p}self_attn.v_proj.weight"] = (r @ v.reshape(-1, head_dim, hidden)).reshape(v.shape)
        o = read(f"{p}self_attn.o_proj.weight")
        out[f"{p}self_attn.o_proj.weight"] = q @ (o.reshape(hidden, -1, head_dim) @ r.t()).reshape(o.shape)
        out[f"{p}mlp.down_proj.weight"] = q @ read(f"{p}mlp.down_proj.weight")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    source, out = Path(args.source), Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists")
    reader = CheckpointReader(source)
    tensors = rotated_tensors(reader, args.seed)
    out.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copyfile(item, out / item.name)
    write_json(out / "config.json", {**reader.config, "tie_word_embeddings": False})
    write_shard(out / "model.safetensors", {k: v.to(torch.float16) for k, v in tensors.items()})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
