"""Quality at the same bits against llama.cpp: its quantization types on the quality study's model,
scored by the study's own evaluation.

The model's full-precision folder is converted to an F16 GGUF with llama.cpp's converter, quantized
with `llama-quantize` to each type (with and without an importance matrix from `llama-imatrix` over
the study's calibration windows), turned back into F32 by `llama-quantize` itself (llama.cpp's own
dequantization, so every type reads as llama.cpp reads it) and evaluated exactly as the study
evaluates its rows: the same tokens, windows and reference model. Embeddings and the output head
stay F16, as LCQ keeps them, so only the decoder's linear layers differ, and bits per weight count
those layers alone, like the study's figure. A control row (the F16 GGUF read back) must reproduce
the study's fp16 perplexity.

llama.cpp comes from the sdist of llama-cpp-python (pinned below), which vendors the llama.cpp
sources; the two tools are built once into the cache with cmake (about 6 minutes on 2 cores).

    python bench/quality_llama_cpp.py                  # SmolLM2-135M, 4 windows (quality-cpu.json's rows)
    python bench/quality_llama_cpp.py --windows 16 --model /path/to/fp16-folder --output ...
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.records import cpu_name, write_record  # noqa: E402
from lcq.paths import cache_dir  # noqa: E402
from lcq.quantizer.downloads import pypi_file  # noqa: E402

LLAMA_CPP = "llama-cpp-python==0.3.36"
TOOLS = ("llama-quantize", "llama-imatrix")
# (type, with an importance matrix): llama.cpp's 2-, 3- and 4-bit choices; the IQ types need the matrix. Q4_1 and
# Q4_K_M are the types the demo model's and Gemma-3-270M's fp16 folders were dequantized from (PyPI GGUFs).
TYPES = (("Q2_0", False), ("Q2_K", False), ("Q2_K", True), ("IQ2_XS", True), ("IQ2_M", True),
         ("Q3_K_M", False), ("Q3_K_M", True), ("IQ3_XXS", True), ("Q4_0", False), ("Q4_0", True),
         ("IQ4_NL", True), ("Q4_1", False), ("Q4_K_M", False), ("Q4_K_M", True))
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
CTX = 512


def run(command: list[str], log: Path) -> str:
    """Run a tool, its output kept in `log`; a failure stops the study with the log's tail."""
    result = subprocess.run(command, capture_output=True, text=True)
    output = result.stdout + result.stderr
    log.write_text(output)
    if result.returncode != 0:
        raise SystemExit(f"{command[0]} failed ({log}):\n" + "\n".join(output.splitlines()[-15:]))
    return output


def llama_cpp_tree(cache: Path) -> Path:
    """The llama.cpp sources vendored by the pinned llama-cpp-python sdist, with TOOLS built in build/bin."""
    version = LLAMA_CPP.split("==")[1]
    tree = cache / f"llama.cpp-{version}"
    if all((tree / "build" / "bin" / tool).is_file() for tool in TOOLS):
        return tree
    sdist = pypi_file(LLAMA_CPP, f"llama_cpp_python-{version}.tar.gz", cache)
    if not (tree / "CMakeLists.txt").is_file():
        partial = tree.with_name(tree.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            archive.extractall(partial, members=members, filter="data")
        shutil.rmtree(tree, ignore_errors=True)
        partial.rename(tree)
    build = tree / "build"
    print(f"building {', '.join(TOOLS)} in {build} (a few minutes)", flush=True)
    run(["cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
         "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
         "-DBUILD_SHARED_LIBS=OFF"], cache / "llama.cpp-cmake.log")
    run(["cmake", "--build", str(build), "-j", str(os.cpu_count()), "--target", *TOOLS], cache / "llama.cpp-build.log")
    return tree


def decoder_bits(gguf_path: Path) -> tuple[float, dict[str, int]]:
    """Stored bits per weight of the decoder's linear layers and how many of them take each type."""
    from gguf import GGUFReader

    stored = weights = 0
    types: Counter = Counter()
    for tensor in GGUFReader(str(gguf_path)).tensors:
        if tensor.name.startswith("blk.") and tensor.name.split(".")[2] in LINEARS:
            stored += int(tensor.n_bytes) * 8
            weights += int(tensor.n_elements)
            types[tensor.tensor_type.name] += 1
    return stored / weights, dict(sorted(types.items()))


def fallbacks(log: str) -> int:
    """Tensors llama-quantize gave another type because their rows do not split into its blocks."""
    found = re.search(r"WARNING: (\d+) of \d+ tensor\(s\) required fallback", log)
    return int(found.group(1)) if found else 0


def dequantized_folder(tree: Path, gguf_path: Path, source: Path, folder: Path) -> Path:
    """A Hugging Face folder (fp32) of the weights llama.cpp reads from `gguf_path`, with `source`'s tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    f32 = gguf_path.with_suffix(".f32.gguf")
    run([str(tree / "build" / "bin" / "llama-quantize"), "--allow-requantize", str(gguf_path), str(f32), "F32"],
        gguf_path.with_suffix(".f32.log"))
    model = AutoModelForCausalLM.from_pretrained(str(f32.parent), gguf_file=f32.name, dtype=torch.float32)
    f32.unlink()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    state = {name: t.contiguous() for name, t in model.state_dict().items()
             if not (name == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "float32", "torch_dtype": "float32"}, indent=2))
    for name in os.listdir(source):
        if name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(source / name, folder / name)
    return folder


def converter_view(source: Path, folder: Path) -> Path:
    """`source` as llama.cpp's converter reads it: links to its files and a config that names the
    architecture (folders saved from a GGUF by transformers leave `architectures` out)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in os.listdir(source):
        if name != "config.json":
            (folder / name).symlink_to(source.resolve() / name)
    config = json.loads((source / "config.json").read_text())
    config.setdefault("architectures", [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]])
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def calibration_file(source: Path, nsamples: int, seqlen: int, path: Path) -> Path:
    """The study's calibration windows (the quantizer's calibration_batch, seed 0) as text for llama-imatrix."""
    from transformers import AutoTokenizer

    from lcq.quantizer.source import calibration_batch
    from lcq.quantizer.texts import book_text

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    windows = calibration_batch(tokenizer, book_text(), nsamples, seqlen, seed=0)
    path.write_text("\n".join(tokenizer.decode(w) for w in windows))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="fp16 folder (default: the demo model's)")
    parser.add_argument("--windows", type=int, default=4, help=f"evaluation windows of {CTX} tokens")
    parser.add_argument("--nsamples", type=int, default=16, help="calibration windows for the importance matrix")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--only", default="", help="comma-separated types (a trailing +imatrix picks that variant)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "quality-llama-cpp-cpu.json")
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()

    cache = cache_dir()
    tree = llama_cpp_tree(cache)
    sys.path.insert(0, str(tree / "gguf-py"))  # the gguf package of the same llama.cpp, which knows its types
    import torch
    import transformers

    from lcq.quantizer.demo import fetch_demo
    from lcq.quantizer.evaluate import perplexity
    from lcq.quantizer.texts import evaluation_text

    source = args.model or fetch_demo()
    work = args.work_dir or cache / "llama-cpp-quality" / source.name
    work.mkdir(parents=True, exist_ok=True)
    text, tokens = evaluation_text(), args.windows * CTX
    bin_dir = tree / "build" / "bin"

    def evaluate(folder: Path) -> tuple[float, float]:
        started = time.time()
        return round(perplexity(folder, text, ctx=CTX, max_tokens=tokens), 4), round(time.time() - started, 1)

    f16 = work / "model.f16.gguf"
    if not f16.is_file():
        env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
        result = subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"),
                                 str(converter_view(source, work / "source")), "--outtype", "f16",
                                 "--outfile", str(f16)], capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise SystemExit("convert_hf_to_gguf.py failed:\n" + result.stderr[-3000:])
    imatrix = work / f"imatrix-n{args.nsamples}s{args.seqlen}.gguf"
    if not imatrix.is_file():
        calib = calibration_file(source, args.nsamples, args.seqlen, work / "calibration.txt")
        run([str(bin_dir / "llama-imatrix"), "-m", str(f16), "-f", str(calib), "-c", str(args.seqlen),
             "-t", str(os.cpu_count()), "-o", str(imatrix)], work / "imatrix.log")

    fp16_ppl, _ = evaluate(source)
    control_ppl, _ = evaluate(dequantized_folder(tree, f16, source, work / "dequantized"))
    rows = [dict(type="F16", imatrix=False, bits_per_weight=16.0, tensor_types=decoder_bits(f16)[1], fallbacks=0,
                 perplexity=control_ppl, vs_fp16=round(control_ppl / fp16_ppl, 4), command=None)]
    print(f"fp16 folder {fp16_ppl:.4f}, F16 GGUF read back {control_ppl:.4f}", flush=True)
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}
    known = {name for name, _ in TYPES} | {f"{name}+imatrix" for name, with_imatrix in TYPES if with_imatrix}
    if wanted - known:
        raise SystemExit(f"unknown types {sorted(wanted - known)}; known: {', '.join(sorted(known))}")
    for name, with_imatrix in TYPES:
        label = name + ("+imatrix" if with_imatrix else "")
        if wanted and label not in wanted and name not in wanted:
            continue
        out = work / f"model.{label}.gguf"
        command = [str(bin_dir / "llama-quantize"), "--token-embedding-type", "f16", "--output-tensor-type", "f16"]
        command += ["--imatrix", str(imatrix)] if with_imatrix else []
        command += [str(f16), str(out), name]
        log = run(command, out.with_suffix(".log"))
        bits, types = decoder_bits(out)
        ppl, seconds = evaluate(dequantized_folder(tree, out, source, work / "dequantized"))
        shown = " ".join(["llama-quantize", "--token-embedding-type f16 --output-tensor-type f16"]
                         + (["--imatrix imatrix.gguf"] if with_imatrix else []) + ["model.f16.gguf", "out.gguf", name])
        rows.append(dict(type=name, imatrix=with_imatrix, bits_per_weight=round(bits, 4), tensor_types=types,
                         fallbacks=fallbacks(log), perplexity=ppl, vs_fp16=round(ppl / fp16_ppl, 4),
                         eval_seconds=seconds, command=shown,
                         date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")))
        out.unlink()
        print(f"{label:16s} {bits:6.3f} bpw  {ppl:10.3f}  {ppl / fp16_ppl:6.3f}x  {types}", flush=True)
    shutil.rmtree(work / "dequantized", ignore_errors=True)

    settings = {"ctx": CTX, "eval_tokens": tokens, "nsamples": args.nsamples, "seqlen": args.seqlen}
    command = "python bench/quality_llama_cpp.py " + " ".join(sys.argv[1:])
    previous = json.loads(args.output.read_text()) if args.output.is_file() else {}
    commands = [command]
    if previous.get("model") == source.name and previous.get("settings") == settings:  # --only adds to a study
        commands = previous["commands"] + commands
        measured = {(r["type"], r["imatrix"]) for r in rows}
        order = [("F16", False), *TYPES]
        rows = sorted([r for r in previous["rows"] if (r["type"], r["imatrix"]) not in measured] + rows,
                      key=lambda r: order.index((r["type"], r["imatrix"])))
    record = {"device": f"cpu: {cpu_name()}, {os.cpu_count()} cores",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                           "transformers": transformers.__version__, "llama.cpp": f"vendored by {LLAMA_CPP}"},
              "commands": commands,
              "model": source.name, "settings": settings, "fp16_perplexity": fp16_ppl, "rows": rows}
    write_record(args.output, record)
    print("\n| llama.cpp type | decoder bits/weight | perplexity | vs fp16 | fallback tensors |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        label = row["type"] + (" + imatrix" if row["imatrix"] else "")
        print(f"| {label} | {row['bits_per_weight']:.3f} | {row['perplexity']:.3f} | {row['vs_fp16']:.3f}x "
              f"| {row['fallbacks']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
