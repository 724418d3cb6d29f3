"""Bit-packing of b-bit codebook indices into int32 words.

Layout ("kmajor-planes", format version 1): indices run along K in blocks of 32. A b-bit
index is split into bit planes of width 1, 2 or 4 (2 -> [2], 3 -> [2, 1], 4 -> [4]); a plane
of width w packs 32 / w indices per int32 word, lowest bits first, so each block of 32
indices takes exactly b words. The packed tensor has shape (K_pad / 32 * b, N): row
t * b + p holds word p of K-block t for every output column, N contiguous, so a GPU tile
of BLOCK_K x BLOCK_N indices is a coalesced load of BLOCK_K / 32 * b rows.
"""
from __future__ import annotations

import torch

PACK_BLOCK = 32
SUPPORTED_BITS = (2, 3, 4)


def plane_layout(bits: int) -> list[tuple[int, int, int]]:
    """(width, bit_offset, word_offset) of each plane of a `bits`-bit index."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    widths = {2: (2,), 3: (2, 1), 4: (4,)}[bits]
    layout, bit_offset, word_offset = [], 0, 0
    for width in widths:
        layout.append((width, bit_offset, word_offset))
        bit_offset += width
        word_offset += width  # a plane of width w spans w words per block of 32
    return layout


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (N, K_pad) integer indices (K_pad a multiple of 32) into int32 (K_pad / 32 * bits, N)."""
    n_rows, k_pad = indices.shape
    if k_pad % PACK_BLOCK:
        raise ValueError(f"K ({k_pad}) must be a multiple of {PACK_BLOCK} to pack")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= 1 << bits):
        raise ValueError(f"indices out of range for {bits} bits")
    blocks = indices.to(torch.int64).reshape(n_rows, k_pad // PACK_BLOCK, PACK_BLOCK)
    words = []
    for width, bit_offset, _ in plane_layout(bits):
        per_word = PACK_BLOCK // width
        values = (blocks >> bit_offset) & ((1 << width) - 1)
        values = values.reshape(n_rows, -1, width, per_word)
        shifts = torch.arange(per_word, device=indices.device, dtype=torch.int64) * width
        words.append((values << shifts).sum(-1))
    packed = torch.cat(words, dim=-1).reshape(n_rows, -1)  # (N, K_pad / 32 * bits)
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed)
    return packed.to(torch.int32).t().contiguous()


def unpack_indices(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_indices: int32 (K_pad / 32 * bits, N) -> int64 (N, K_pad)."""
    n_words, n_rows = qweight.shape
    n_blocks = n_words // bits
    words = qweight.t().reshape(n_rows, n_blocks, bits).to(torch.int64) & 0xFFFFFFFF
    indices = torch.zeros(n_rows, n_blocks, PACK_BLOCK, dtype=torch.int64, device=qweight.device)
    for width, bit_offset, word_offset in plane_layout(bits):
        per_word = PACK_BLOCK // width
        plane = words[..., word_offset:word_offset + width].unsqueeze(-1)
        shifts = torch.arange(per_word, device=qweight.device, dtype=torch.int64) * width
        values = (plane >> shifts) & ((1 << width) - 1)
        indices |= values.reshape(n_rows, n_blocks, PACK_BLOCK) << bit_offset
    return indices.reshape(n_rows, n_blocks * PACK_BLOCK)
