"""What the CPU defaults cost in quality: perplexity of the demo model (SmolLM2-135M-Instruct, LCQ W4)
run by our model code on CPU with the KV cache in fp32, fp16 and int8 (a scale per head row), and
with the large products' operands in fp32 and, where the CPU has them, bf16 (AVX512_BF16) and int8
(AVX512_VNNI).

Each window of held-out Shakespeare is prefilled in chunks, so that every chunk after the first
attends to the earlier ones through the paged cache, as a served sequence does; the cache's rounding
of K and V is then in every logit (a chunk reads its own K and V from the cache too). Chunks of 128 tokens take the blocked
product (the form under test) in every layer and the head, where a served sequence's decode steps of
fewer than 10 sequences take the decode forms: an upper bound on the cost. One more setting takes the
head's logits one row at a time from its int8 rows (cpu_half.byte_rows, what the engine's int8 decode
products read at batch 1), the rest in fp32; and one every row of every product in its int8 decode form
(the LCQ layers' books, and the head's int8 rows where the CPU has AVX512_VNNI; without it, the AVX2 shuffle
form of cpu_index_shuffles.c, which LCQ_CPU_AVX512=0 measures on a CPU with AVX-512): what a batch-1
sequence's decode steps take.

With --window, windows of that many tokens (a multiple of the chunk) instead of 512: the caches' rounding read
over longer contexts (bench/results/cpu-precision-quality-window<N>.json); with --chunk, chunks of that many
tokens instead of 128 (from 256, CPUs with AMX take LCQ layers' int8 products on bf16 tiles, as served prompts'
chunks do; -chunk<N> in the file's name).

With --fp8, what a GPU's kv_cache_dtype fp8 (float8 e4m3, no scales, values clamped to +-448) costs
instead: the model in bf16 (this CPU's half-precision products; the torch attention path, which writes
and reads such a cache as the Triton kernels do) with a bf16 cache, then an fp8 one
(bench/results/cpu-precision-quality-fp8.json).

    python bench/cpu_precision_quality.py [--threads 2] [--windows 8] [--window 512] [--chunk 128] [--fp8]
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.records import cpu_arguments, cpu_record, write_record  # noqa: E402
from lcq.kernels import LCQLinear  # noqa: E402
from lcq.kernels.cpu_half import byte_rows  # noqa: E402
from lcq.kernels.cpu_matmul import cpu_products, products_available  # noqa: E402
from lcq.models import ForwardContext, load_model  # noqa: E402
from lcq.quantizer.demo import ensure_demo_model  # noqa: E402
from lcq.quantizer.texts import evaluation_text  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "cpu-precision-quality.json"
FP8_RESULTS = Path(__file__).parent / "results" / "cpu-precision-quality-fp8.json"
WINDOW, CHUNK, BLOCK = 512, 128, 16


@torch.inference_mode()
def perplexity(folder: str, ids: list[int], windows: int, cache_dtype: torch.dtype,
               model_dtype: torch.dtype = torch.float32, head_rows: bool = False, window: int = WINDOW,
               chunk: int = CHUNK, decode_rows: bool = False) -> float:
    """Over `windows` windows of `window` tokens, prefilled `chunk` at a time. head_rows: logits from the head's
    int8 rows, a row at a time in int8 products (as decode steps take them). decode_rows: LCQ layers keep their
    int8 books (and the head its int8 rows where int8 products read them), for products in their int8 decode
    forms (the caller's cpu_products(torch.int8, rows_alone=True))."""
    model, config = load_model(folder, torch.device("cpu"), model_dtype)
    if head_rows or decode_rows and products_available(torch.int8):
        model.lm_head_rows = byte_rows(model.lm_head_half)
    if decode_rows:
        assert sum(layer.keep_books() for layer in model.modules() if isinstance(layer, LCQLinear)), "no int8 books"
    blocks = window // BLOCK
    shape = model.kv_cache_shape(blocks, BLOCK, cache_dtype)
    model.bind_kv_cache([torch.zeros(shape, dtype=cache_dtype) for _ in range(config.num_layers)],
                        [torch.zeros(shape, dtype=cache_dtype) for _ in range(config.num_layers)])
    table = torch.arange(blocks, dtype=torch.int32)[None]
    nll, count = 0.0, 0
    for w in range(windows):
        tokens = torch.tensor(ids[w * window:(w + 1) * window])
        logits = []
        for start in range(0, window, chunk):
            positions = torch.arange(start, start + chunk)
            context = ForwardContext(
                is_prefill=True, slot_mapping=positions, query_start=torch.tensor([0, chunk], dtype=torch.int32),
                context_lens=torch.tensor([start + chunk], dtype=torch.int32), block_tables=table,
                max_query_len=chunk, max_context_len=start + chunk)
            hidden = model(tokens[start:start + chunk], positions, context)
            if head_rows:
                with cpu_products(torch.int8):
                    logits += [model.compute_logits(row).float() for row in hidden.split(1)]
            else:
                logits.append(model.compute_logits(hidden).float())
        nll += torch.nn.functional.cross_entropy(torch.cat(logits)[:-1], tokens[1:], reduction="sum").item()
        count += window - 1
    return math.exp(nll / count)


def main() -> None:
    def options(parser) -> None:
        parser.add_argument("--windows", type=int, default=8, help="windows to evaluate")
        parser.add_argument("--window", type=int, default=WINDOW, help="tokens per window (a multiple of the chunk)")
        parser.add_argument("--chunk", type=int, default=CHUNK, help="tokens per prefill chunk")
        parser.add_argument("--fp8", action="store_true", help="a bf16 model with a bf16, then an fp8 cache")

    args = cpu_arguments(__doc__, RESULTS, options)
    if args.chunk < 1 or args.window % args.chunk:
        raise SystemExit(f"--window must be a multiple of --chunk ({args.chunk})")
    if args.output == RESULTS and (args.window, args.chunk) != (WINDOW, CHUNK):
        suffix = (f"-window{args.window}" if args.window != WINDOW else "") + \
            (f"-chunk{args.chunk}" if args.chunk != CHUNK else "")
        args.output = RESULTS.with_name(f"cpu-precision-quality{suffix}.json")
    if args.fp8 and args.output == RESULTS:
        args.output = FP8_RESULTS
    from transformers import AutoTokenizer

    folder = str(ensure_demo_model())
    ids = AutoTokenizer.from_pretrained(folder)(evaluation_text(), add_special_tokens=False)["input_ids"]
    windows = min(args.windows, len(ids) // args.window)
    settings = [(torch.float32, torch.float32), (torch.float16, torch.float32), (torch.int8, torch.float32)] + [
        (cache, dtype) for dtype in (torch.bfloat16, torch.int8) if products_available(dtype)
        for cache in (torch.float16, torch.int8)] + [(torch.float32, "head rows")] * products_available(torch.int8) + [
        (torch.float32, "decode rows")]
    model_dtype = torch.float32
    if args.fp8:
        settings, model_dtype = [(torch.bfloat16, torch.float32), (torch.float8_e4m3fn, torch.float32)], torch.bfloat16
    rows = []
    for cache_dtype, products in settings:
        head_rows = products == "head rows"  # fp32 products, the head's logits from its int8 rows
        decode_rows = products == "decode rows"  # every row in the int8 decode forms
        with cpu_products({"head rows": torch.float32, "decode rows": torch.int8}.get(products, products),
                          rows_alone=decode_rows):
            value = perplexity(folder, ids, windows, cache_dtype, model_dtype, head_rows, args.window, args.chunk,
                               decode_rows)
        rows.append({"model_dtype": str(model_dtype).removeprefix("torch."),
                     "kv_cache_dtype": str(cache_dtype).removeprefix("torch."),
                     "cpu_matmul_dtype": "float32" if head_rows else "int8" if decode_rows else
                     str(products).removeprefix("torch."),
                     "head": "int8 rows, one row at a time" if head_rows else
                     "int8 rows" if decode_rows and products_available(torch.int8) else "full precision",
                     **({"int8_decode_form": "avx512" if products_available(torch.int8) else "avx2 shuffles"}
                        if decode_rows else {}),
                     "perplexity": round(value, 4),
                     "relative_change": round(value / rows[0]["perplexity"] - 1, 6) if rows else 0.0})
        print(f"model {rows[-1]['model_dtype']}, KV cache {rows[-1]['kv_cache_dtype']}, products "
              f"{rows[-1]['cpu_matmul_dtype']}{' (decode forms)' if decode_rows else ''}, head {rows[-1]['head']}: "
              f"perplexity {value:.4f} "
              f"({rows[-1]['relative_change']:+.4%})", flush=True)
    write_record(args.output, cpu_record(f"python bench/cpu_precision_quality.py --threads {args.threads} --windows {windows}"
                                         f"{f' --window {args.window}' if args.window != WINDOW else ''}"
                                         f"{f' --chunk {args.chunk}' if args.chunk != CHUNK else ''}"
                                         f"{' --fp8' if args.fp8 else ''}",
                                         args.threads, model=Path(folder).name, text="held-out Shakespeare",
                                         window=args.window, chunk=args.chunk, windows=windows,
                                         predicted_tokens=windows * (args.window - 1),
                                         load_average_1m=os.getloadavg()[0], rows=rows))


if __name__ == "__main__":
    main()
