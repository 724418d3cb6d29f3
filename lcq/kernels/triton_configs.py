"""The autotuner's configs of the decode and GEMM kernels (triton_linear.py), with what each was chosen on, and
the decode autotuner's early prune, which keeps those of the launch's form (_decode_configs_for).
"""
from __future__ import annotations

import triton

from .triton_tiles import COLUMN_BOOKS, block_k

MAX_SPLIT_K = 16  # K slices of a launch of 16 rows or more, or of a mixture's blocks (workspace: slices x rows x N)


# Decode tiles, from two H200 runs of 2026-12-04 (bench/results/kernels-nvidia-h200.json, docs/kernels.md):
# - 64 columns per 2 warps and 128 per 4 (the H100's --explore: 256 per 8 warps never won).
# - Splits 8 to 64 at 1-2 rows. ncu of the 8-way split at one row (4096x11008 W2 r2, 128 columns, 167
#   registers) saw 0.65 waves, 12% achieved occupancy, issue slots 32% busy and DRAM at 8% of its peak; yet
#   with more slices the autotuner still chose 8 or 16 at W2 (32 once, W4 r1): occupancy alone was not it.
# - REDUCE_K (sum each tile over K in the loop: 93 registers instead of 167) and PREFETCH (the next tile's
#   words and codes loaded while this one is multiplied; Triton's pipeliner moves only loads that feed
#   tl.dot unless a loop asks, STAGES below) each way: REDUCE_K won 7 of the 8 one-row cases, PREFETCH 7 of them
#   and 21 of 24 tl.dot rows.
#   PREFETCH 2 loads two tiles ahead (9 registers more, sm_90): on the H200 it was not chosen and changed no
#   time. PREFETCH now loads each tile's activations ahead too: the sm_90 loop issued the tile's x load and
#   stored it to shared memory a few barriers later, so every tile waited for it (not yet timed).
# - Tiles 128 deep at 2 bits (REDUCE_K only: otherwise the products spill): each column's 4 codebook
#   entries are built once per tile, so deeper tiles spend fewer instructions per weight (sm_90, Triton
#   3.6, W2 r2, 64 columns per 2 warps: 7.0 against 10.4). The autotuner chose them for every 2-bit shape
#   at one row: 23.0-23.3 us, where the first call's best 64-deep tiles took 27.6-28.4 and its 128-deep
#   ones (without PREFETCH, 8 slices) 24.4-28.3. At 3-4 bits their gathers take 197-255 registers.
# - One stage for the tl.dot rows (16-64): with two, Triton 3.6 pipelines the V gather that feeds the dot
#   as 4-byte cp.async copies (64 LDGSTS per W4 tile in the sm_90 SASS): W4 r1 at 16 rows took 253 us,
#   with one stage 45 us. One stage won every tl.dot row of the run, 2-bit rows too.
# - ncu of the chosen one-row tile (4096x11008 W2 r2: 128 columns per 4 warps, 128 deep, REDUCE_K, PREFETCH,
#   8 slices; H200, 2026-12-04, a later session): 256 programs, 7.1 warps per SM (24 would fit), each
#   scheduler issuing every 1.8 cycles with 0.75 warps eligible, 7.3 instructions per weight (6.1 now in the
#   sm_90 SASS: _tile_inputs). More warps for the same weights cost instructions (sm_90 SASS: 64 columns per
#   4 warps, 8.9 per weight at 128 deep, 21 at 64; 128 per 8 warps, 14.6 and 237 registers), so the list
#   stays as it was.
# - BOOK (not timed yet): each column's codebook built once a tile, then a warp shuffle per weight
#   (_tile_weights), with the settings that won most of the rows above (FMA rows, 3-4 bits: REDUCE_K and
#   PREFETCH; tl.dot rows, every width: PREFETCH, one stage).
# A config's BLOCK_K is the deepest it takes, shallower where the group or the bit width asks.
FMA_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": depth, "SPLIT_K": split, "REDUCE_K": reduce_k, "PREFETCH": prefetch},
                  num_warps=warps, num_stages=2)
    for bn, warps in ((64, 2), (128, 4)) for reduce_k, depth in ((False, 64), (True, 64), (True, 128))
    for prefetch in (False, True, 2) for split in (8, 16, 32, 64)] + [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": 64, "SPLIT_K": split, "REDUCE_K": True, "PREFETCH": True, "BOOK": True},
                  num_warps=warps, num_stages=2)
    for bn, warps in ((64, 2), (128, 4)) for split in (8, 16, 32, 64)]
DOT_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": 64, "SPLIT_K": split, "REDUCE_K": False, "PREFETCH": prefetch},
                  num_warps=4, num_stages=stages)
    for bn in (64, 128) for prefetch in (False, True, 2) for stages in (1, 2) for split in (4, 8, 16)] + [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": 64, "SPLIT_K": split, "REDUCE_K": False, "PREFETCH": True, "BOOK": True},
                  num_warps=4, num_stages=1)
    for bn in (64, 128) for split in (4, 8, 16)]
# The pair table at one row (LUT, 2 bits): 64, 128 or 256 columns per 2, 4 or 8 warps, tiles 64 or 128 deep,
# PREFETCH none, one or two tiles ahead, split 8 to 32. H200 (bench/results/kernels-pair-table-nvidia-h200.json,
# with one tile ahead at most): with its table's kernel 0.2-2.7 us faster than the FMA form at rank 1, slower
# at ranks 2 (by 1.6-6.5 us) and 4, so decode() times both (lut_wins).
LUT_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": depth, "SPLIT_K": split, "REDUCE_K": False, "PREFETCH": prefetch},
                  num_warps=warps, num_stages=2)
    for bn, warps in ((64, 2), (128, 4), (256, 8)) for depth in (64, 128) for prefetch in (False, True, 2)
    for split in (8, 16, 32)]
# Products of bytes (INT8: 2 and 4 bits, 1-2 rows; each tile is summed in the loop, so REDUCE_K), not yet timed.
# sm_90 SASS (Triton 3.6, g128, one row, 128 deep, PREFETCH, bench/kernels.py --sass), instructions per weight:
# W2 r2 128 columns per 4 warps 3.1, 256 per 2 warps 2.2, 512 per 4 warps 2.1 (255 registers; 168 without
# PREFETCH), against 6.1 for the fp32 form's chosen tile: the wider tiles keep a column's words in one thread,
# so that the sum over them needs no shuffles, and spread the inputs' conversion over more weights. W4 r2, its
# 16-entry codebooks built once a tile: 64 columns per 2 warps 5.3, 128 per 4 warps 5.2 (168 registers), 64
# deep 6.6, against 8.2 for the fp32 form with column codebooks (BOOK); wider tiles spill there, so at 4 bits
# a thread takes one column (_decode_configs_for).
# STAGES 3 (2026-12-06, not yet timed): Triton's pipeliner copies the next two tiles' words into shared memory
# (cp.async, 16 bytes a thread a copy) while this one is multiplied, where without it a program loaded each tile
# when it came to it and waited (the H100's autotuner chose no PREFETCH for every shape of the products of bytes:
# it carries the words in registers); PREFETCH then carries only the codes and activations. sm_90 SASS (Triton 3.6):
# up to 8% fewer instructions in the loop, as many registers or fewer, 16 bytes spilled by some of the widest tiles.
INT8_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": 128, "SPLIT_K": split, "REDUCE_K": True, "PREFETCH": prefetch,
                   **({"STAGES": stages} if stages else {})}, num_warps=warps, num_stages=2)
    for bn, warps in ((64, 2), (128, 4), (256, 2), (512, 4)) for prefetch in (False, True) for stages in (None, 3)
    for split in (8, 16, 32, 64)]
# Weights from byte codebooks (BYTE_BOOK: 1-32 rows, fp16 or bf16), not yet timed. sm_90 SASS (Triton 3.6, r2 g128,
# 128 deep, PREFETCH, bench/kernels.py --sass), instructions per weight, 128 columns per 4 warps: 16 rows W2 4.3 (4.0
# without PREFETCH, 3.9 with 256 columns per 8 warps), W3 6.4, W4 6.6; 32 rows W2 5.2, W4 7.5; against 8.1 (W2)
# and 10.6 (W4) for the tl.dot form's column codebooks (BOOK) at 16 rows. 64 rows spill at 128 columns per 4 warps
# and take 7.0-8.5 (W2) otherwise, the inputs' sums and each tile's steps applied to 64 x 128 outputs.
# STAGES 3 as for the products of bytes (not yet timed; sm_90 SASS, Triton 3.6: only 16-byte copies, no gathers,
# registers within 8 of before).
BYTE_BOOK_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": 128, "SPLIT_K": split, "REDUCE_K": False, "PREFETCH": prefetch,
                   **({"STAGES": stages} if stages else {})}, num_warps=warps, num_stages=1)
    for bn, warps in ((64, 4), (128, 4), (256, 8)) for prefetch in (False, True) for stages in (None, 3)
    for split in (2, 4, 8, 16)]
DECODE_CONFIGS = FMA_DECODE_CONFIGS + DOT_DECODE_CONFIGS + LUT_DECODE_CONFIGS + INT8_DECODE_CONFIGS \
    + BYTE_BOOK_DECODE_CONFIGS
FMA_MAX_SPLIT_K = 64  # its workspace: 64 slices x 2 rows x N fp32


def max_split_k(block_m: int, grouped: bool = False) -> int:
    """Most K slices a decode launch may use: its fp32 workspace holds slices x rows x N partial sums."""
    return FMA_MAX_SPLIT_K if block_m < 16 and not grouped else MAX_SPLIT_K


def _decode_configs_for(configs: list, named_args: dict, **kwargs) -> list:
    """The autotuner's early prune: the configs of products of bytes for INT8 (at 4 bits those giving a thread
    one column: INT8_DECODE_CONFIGS), the pair table's for LUT, weights from byte codebooks' for BYTE_BOOK, else
    the FMA form's for 1-2 rows and the tl.dot form's from 16, no more slices than the workspace holds, column
    codebooks (BOOK) at 2 bits only for tl.dot (at 1-2 rows the selects of 128-deep tiles cost fewer
    instructions: 6.1 against 7.3 per weight, sm_90) and on no Triton without COLUMN_BOOKS, and each tile no deeper than the group and the bit width
    allow (configs that then coincide are timed once)."""
    form = INT8_DECODE_CONFIGS if kwargs.get("INT8") else LUT_DECODE_CONFIGS if kwargs.get("LUT") \
        else BYTE_BOOK_DECODE_CONFIGS if kwargs.get("BYTE_BOOK") \
        else FMA_DECODE_CONFIGS if kwargs["BLOCK_M"] < 16 else DOT_DECODE_CONFIGS
    most = max_split_k(kwargs["BLOCK_M"], kwargs.get("GROUPED", False))
    fallback = block_k(kwargs["GROUP"])
    deepest = 128 if kwargs["SELECT"] or kwargs.get("INT8") or kwargs.get("BYTE_BOOK") else 64
    kept: dict[tuple, triton.Config] = {}
    for c in configs:
        selected_instead = c.kwargs.get("BOOK") and (
            not COLUMN_BOOKS or kwargs["SELECT"] and form is FMA_DECODE_CONFIGS)
        spills = form is INT8_DECODE_CONFIGS and not kwargs["SELECT"] and c.kwargs["BLOCK_N"] > 32 * c.num_warps
        if any(c is f for f in form) and c.kwargs["SPLIT_K"] <= most and not selected_instead and not spills:
            depth = c.kwargs["BLOCK_K"]
            depth = depth if depth <= deepest and kwargs["GROUP"] % depth == 0 else fallback
            params = {**c.kwargs, "BLOCK_K": depth}
            kept.setdefault((tuple(sorted(params.items())), c.num_warps, c.num_stages),
                            triton.Config(params, num_warps=c.num_warps, num_stages=c.num_stages))
    return list(kept.values())


GEMM_CONFIGS = [  # one stage too (not timed yet): the decode configs' gathers were slow pipelined
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3), (128, 256, 8, 3),
                         (256, 128, 8, 3), (64, 128, 4, 1), (128, 128, 8, 1)]
]
# A mixture's rows past DECODE_MAX_M (prefill, large batches): enough blocks to fill the GPU without
# splitting K, whose fp32 workspace would grow with rows x columns x slices. Not yet timed on a GPU.
GROUPED_WIDE_CONFIGS = [triton.Config({"BLOCK_N": bn, "SPLIT_K": 1}, num_warps=w, num_stages=s)
                        for bn, w, s in [(64, 4, 2), (128, 4, 2), (128, 4, 3), (128, 8, 3)]]
# Under TRITON_INTERPRET=1 (CPU tensors) autotuning cannot time anything: fixed small tiles.
INTERPRETER_DECODE_CONFIG = {"BLOCK_N": 32, "SPLIT_K": 2, "PREFETCH": True}
INTERPRETER_GEMM_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4}
