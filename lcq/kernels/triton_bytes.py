"""Products with 8-bit operands in a Triton program, for the decode kernel (triton_linear.py): each column's
codebook rounded to bytes once a tile (_int8_book), and PTX prmt picking 4 weights' codebook bytes at once
(_picked_bytes); then either dp4a against the inputs rounded to bytes (products of bytes, 1-2 rows:
_int8_products), or the picked codes made fp16 or bf16 values for tl.dot (weights from byte codebooks, 16-32
rows: _book_weights). Without PTX (the interpreter) the same arithmetic in shifts and masks. docs/kernels.md has
the instruction counts and the quality.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lcq.format import PackedLinear

from .dependent_launch import dependent_launch, wait_for_earlier_kernels
from .elementwise import GATED_CODES, load_inputs, rms_normed
from .triton_tiles import _rank_scale, _table_entries, stream_scales

INPUT_BYTES_RUNS = 64  # runs of inputs a program of _input_bytes_kernel rounds
_byte_slots: dict[torch.device, torch.Tensor] = {}


@triton.jit
def _byte_permute(low, high, selector, ASM: tl.constexpr):
    """Byte i of the result is byte (nibble i of selector) of the 8 bytes of low (0-3) and high (4-7), for nibbles
    0-7 (int32 tensors): one PTX prmt on a GPU (ASM), shifts and masks in the interpreter."""
    if ASM:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [low, high, selector],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        picked = tl.zeros_like(selector)
        for i in tl.static_range(4):
            pick = (selector >> (4 * i)) & 7
            picked |= ((tl.where(pick < 4, low, high) >> (8 * (pick & 3))) & 0xFF) << (8 * i)
        return picked


@triton.jit
def _dot4(a, b, acc, ASM: tl.constexpr):
    """acc + the dot product of the 4 signed bytes of a and of b (int32 tensors): one PTX dp4a on a GPU (ASM)."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, acc], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        for i in tl.static_range(4):
            acc += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
        return acc


@triton.jit
def _to_bytes(values, scale_inverse, offset: tl.constexpr = 0):
    """values * scale_inverse (within +-127) rounded to the nearest integer (ties to even, as byte_products.to_int8),
    plus offset, in the low byte of an int32: adding 1.5 * 2^23 leaves the integer in the float's low mantissa bits,
    one FMA where a rounding conversion took five instructions (sm_90)."""
    return (values * scale_inverse + (12582912.0 + offset)).to(tl.int32, bitcast=True) & 0xFF


@triton.jit
def _int8_book(s_codes, b_codes, ss_ptr, bs_ptr, v_ptr, v_base, offs_n, n_mask, N, BITS: tl.constexpr,
               RANK: tl.constexpr, RANKS: tl.constexpr, BLOCK_N: tl.constexpr, OFFSET: tl.constexpr = 0):
    """A tile's column codebooks in bytes: entry e of column n in byte e % 4 of int32 e // 4 of row n, each
    column's 2^BITS entries S . V - B less their midrange, scaled by 127 / half their range, rounded, plus
    OFFSET. Returns (books (BLOCK_N, 2^BITS / 4), steps, midranges): entry e is midrange + step * (byte e as a
    signed byte, or less OFFSET). (Scaled by their largest magnitude instead, a codebook off zero, as B makes many,
    was rounded up to twice as coarsely, and the error, the same for every weight of the group that takes the
    entry, added up along the product: SmolLM2 W2 r2 g128 perplexity +0.6% with only the codebooks in bytes,
    bench/byte_products_quality.py.)"""
    ENTRIES: tl.constexpr = 1 << BITS
    book = -(b_codes.to(tl.float32) * tl.load(bs_ptr + offs_n, mask=n_mask, other=0).to(tl.float32))[:, None] \
        + tl.zeros((1, ENTRIES), dtype=tl.float32)
    for k in tl.static_range(RANK):
        s = _rank_scale(s_codes, ss_ptr, k, offs_n, n_mask, N)
        book += s[:, None] * _table_entries(v_ptr, v_base, k, BITS, RANKS)
    highest = tl.max(book, axis=1)
    lowest = tl.min(book, axis=1)
    midrange = (highest + lowest) * 0.5
    half_range = (highest - lowest) * 0.5
    scale = tl.math.div_rn(tl.full((BLOCK_N,), 127.0, tl.float32), tl.maximum(half_range, 1e-30))  # as torch's
    codes = _to_bytes(book - midrange[:, None], scale[:, None], OFFSET)
    bytes_in_words = tl.reshape(codes, (BLOCK_N, ENTRIES // 4, 4)) << (8 * tl.arange(0, 4))[None, None, :]
    books = tl.sum(bytes_in_words, axis=2)  # disjoint bytes: the sum is their or
    return books, half_range / 127.0, midrange


@triton.jit
def _picked_bytes(words, tops, books, SHIFT: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    """The codebook bytes (_int8_book's books, (1, BLOCK_N, 2^BITS / 4)) of 4 of each word's indices, one int32
    per word (_int8_products). 2 bits: (word >> SHIFT) & 0x3333 holds the indices SHIFT / 2 + 2i in its
    nibbles, a prmt selector over the 4 entries. 3 bits: the same low bits, and the indices' top bits (tops,
    _tile_words' TOPS_PER_ROW: bit j for index j) spread from bits 2i to 4i + 2 in two shift-or-mask steps,
    select among 8 entries. 4 bits: the indices SHIFT / 4 + i, each 3 low bits selecting among entries 0-7 and,
    by a second prmt, 8-15; a third takes byte i from the second where index i's top bit is set
    ((word >> (SHIFT + 1)) & 0x4444 adds 4 to nibble i of the selector 0x3210)."""
    if BITS == 2:
        book = tl.reshape(books, books.shape[:2])
        return _byte_permute(book, book, (words >> SHIFT) & 0x3333, ASM)
    elif BITS == 3:
        entries_0_3, entries_4_7 = tl.split(books)
        top = (tops >> (SHIFT // 2)) & 0x55
        top = (top | (top << 4)) & 0x0F0F
        top = (top | (top << 2)) & 0x3333
        return _byte_permute(entries_0_3, entries_4_7, ((words >> SHIFT) & 0x3333) | (top << 2), ASM)
    else:
        first, second = tl.split(tl.reshape(books, (1, books.shape[1], 2, 2)))  # words (0, 2), (1, 3)
        entries_0_3, entries_8_11 = tl.split(first)
        entries_4_7, entries_12_15 = tl.split(second)
        selector = (words >> SHIFT) & 0x7777
        low = _byte_permute(entries_0_3, entries_4_7, selector, ASM)
        high = _byte_permute(entries_8_11, entries_12_15, selector, ASM)
        return _byte_permute(low, high, ((words >> (SHIFT + 1)) & 0x4444) | 0x3210, ASM)


@triton.jit
def _row(values, m: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row m of values (BLOCK_M, ...), without its first dimension."""
    if BLOCK_M == 1:
        return tl.reshape(values, values.shape[1:])
    else:
        rows = tl.arange(0, BLOCK_M).expand_dims(1)
        return tl.sum(tl.where(rows == m, values, 0), axis=0)


@triton.jit
def _prepared_fields(inputs, BITS: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr):
    """The fields of a tile's prepared inputs (int32 (BLOCK_M, BLOCK_K / 2), input_bytes()): per run of an index
    word's inputs its 4 input bytes per int32 (4 of them at 2 and 3 bits, 2 at 4: x_c and x_d are then
    unused), their scale and their sum as fp32 bits. Returns x_a, x_b, x_c, x_d, scales (BLOCK_M, ROWS) and the
    tile's input sums (BLOCK_M,)."""
    if BITS == 4:  # fields q0 q1 scale sum: f[a, b] = 2a + b
        low, high = tl.split(tl.reshape(inputs, (BLOCK_M, ROWS, 2, 2)))
        x_a, scales = tl.split(low)
        x_b, sums = tl.split(high)
        x_c, x_d = x_a, x_b
    else:  # fields q0 q1 q2 q3 scale sum - -: f[h, a, b] = 4h + 2a + b
        b0, b1 = tl.split(tl.reshape(inputs, (BLOCK_M, ROWS, 2, 2, 2)))
        b0a0, b0a1 = tl.split(b0)
        b1a0, b1a1 = tl.split(b1)
        x_a, scales = tl.split(b0a0)
        x_c, _ = tl.split(b0a1)
        x_b, sums = tl.split(b1a0)
        x_d, _ = tl.split(b1a1)
    return x_a, x_b, x_c, x_d, scales.to(tl.float32, bitcast=True), tl.sum(sums.to(tl.float32, bitcast=True), axis=1)


@triton.jit
def _int8_products(words, tops, books, steps, midranges, inputs, BITS: tl.constexpr, ASM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PREPARED: tl.constexpr = False):
    """A tile's products with 8-bit operands, fp32 (BLOCK_M, BLOCK_N): the inputs of each index word of a row (16
    at 2 and 3 bits, where the word is the 2-bit plane's, 8 at 4) scaled to bytes by their largest magnitude,
    each weight its column's codebook byte (_int8_book). Word r of a column holds the indices from r times that
    count, index i in its bits from 2i (4i at 4 bits); prmt picks the codebook bytes of 4 of them into one int32
    (_picked_bytes), and dp4a multiplies it by the matching 4 input bytes and sums: per 16 weights at 2 bits 4
    selectors (7 instructions), 4 prmt and 4 dp4a, at 3 bits about 16 more for the selectors, at 4 bits about
    10, 12 and 4; then per word a conversion and an FMA. Each column's step scales those sums and its
    midrange multiplies the sum of the tile's inputs (exact, fp32). The products stay in the words' layout (a
    3-d tensor of rows, words and columns moved every weight through shared memory in the sm_90 build).
    inputs: the tile's (BLOCK_M, BLOCK_K) activations, at 2 and 3 bits in the order of the selectors
    (_tile_inputs)."""
    PER_WORD: tl.constexpr = 8 if BITS == 4 else 16
    ROWS: tl.constexpr = BLOCK_K // PER_WORD
    if PREPARED:
        x_a, x_b, x_c, x_d, scales, input_sums = _prepared_fields(inputs, BITS, BLOCK_M, ROWS)
    else:
        x = tl.reshape(inputs, (BLOCK_M, ROWS, PER_WORD))
        largest = tl.max(tl.abs(x), axis=2)
        scales = largest / 127.0
        input_sums = tl.sum(inputs, axis=1)
        codes = _to_bytes(x, (127.0 / tl.maximum(largest, 1e-30))[:, :, None])
        quads = tl.sum(tl.reshape(codes, (BLOCK_M, ROWS, PER_WORD // 4, 4))
                       << (8 * tl.arange(0, 4))[None, None, None, :], axis=3)  # 4 input bytes each, in selector order
        if BITS == 4:
            x_a, x_b = tl.split(quads)
        else:
            even, odd = tl.split(tl.reshape(quads, (BLOCK_M, ROWS, 2, 2)))
            x_a, x_c = tl.split(even)
            x_b, x_d = tl.split(odd)
    books = books[None, :, :]
    if BITS == 4:
        w_a = _picked_bytes(words, tops, books, 0, BITS, ASM)
        w_b = _picked_bytes(words, tops, books, 16, BITS, ASM)
    else:
        w_a = _picked_bytes(words, tops, books, 0, BITS, ASM)
        w_b = _picked_bytes(words, tops, books, 2, BITS, ASM)
        w_c = _picked_bytes(words, tops, books, 16, BITS, ASM)
        w_d = _picked_bytes(words, tops, books, 18, BITS, ASM)
    products = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m in tl.static_range(BLOCK_M):
        dots = _dot4(w_a, _row(x_a, m, BLOCK_M)[:, None] + tl.zeros_like(words), tl.zeros_like(words), ASM)
        dots = _dot4(w_b, _row(x_b, m, BLOCK_M)[:, None] + tl.zeros_like(words), dots, ASM)
        if BITS != 4:
            dots = _dot4(w_c, _row(x_c, m, BLOCK_M)[:, None] + tl.zeros_like(words), dots, ASM)
            dots = _dot4(w_d, _row(x_d, m, BLOCK_M)[:, None] + tl.zeros_like(words), dots, ASM)
        sums = tl.sum(dots.to(tl.float32) * _row(scales, m, BLOCK_M)[:, None], axis=0)
        products += tl.where(tl.arange(0, BLOCK_M)[:, None] == m, sums[None, :], 0.0)
    return products * steps[None, :] + input_sums[:, None] * midranges[None, :]


@triton.jit
def _book_weights(words, tops, books, slots, BITS: tl.constexpr, DTYPE: tl.constexpr, ASM: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """A tile's weights' codes (_int8_book's, stored plus 128) as DTYPE values, transposed
    (BLOCK_N, BLOCK_K), k in the order of the selectors (_in_selector_order at 2 and 3 bits): in fp16 the code plus
    the kernel's RAW (1152), in bf16 the code, exact either way, so that the product of a tile with them is
    step * (that product - RAW * the inputs' sum) + midrange * the inputs' sum, per column.
    prmt picks 4 weights' codes into an int32 (_picked_bytes), broadcast to the 4 k it holds; then per 2 weights
    one inline assembly instance (3 instructions in fp16, 5 in bf16). Which byte of its word a weight takes comes
    with it, from slots (byte_slots(), loaded: with positions from tl.arange, Triton 3.6 no longer built the
    weights where the tensor cores read them but stored each through shared memory, sm_90), so that any 2
    weights Triton's layout hands an instance are right: slot k % 4 has the prmt selector of byte k % 4 for a
    pair's first weight in its low byte and for its second in its next. (The steps and midranges are applied
    after the product for the same reason: as operands here, they too took the weights through shared memory.)
    Codes of 63 levels, 128 + the code under bf16's own exponent byte, cost SmolLM2's perplexity 0.6% at W3 and
    1.0% at W4 against fp16's 8-bit ones (docs/kernels.md), hence the fp32 exponent for bf16."""
    books = books[None, :, :]
    if BITS == 4:
        picks = tl.join(_picked_bytes(words, tops, books, 0, BITS, ASM), _picked_bytes(words, tops, books, 16, BITS, ASM))
    else:  # shifts 0, 2, 16 and 18 pick the indices (0 2 4 6), (1 3 5 7), (8 ...) and (9 ...) of each word
        a = _picked_bytes(words, tops, books, 0, BITS, ASM)
        b = _picked_bytes(words, tops, books, 2, BITS, ASM)
        c = _picked_bytes(words, tops, books, 16, BITS, ASM)
        d = _picked_bytes(words, tops, books, 18, BITS, ASM)
        picks = tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), (words.shape[0], BLOCK_N, 4))
    copies = tl.reshape(tl.permute(picks[:, :, :, None] + tl.zeros((1, 1, 1, 4), dtype=tl.int32), (1, 0, 2, 3)),
                        (BLOCK_N, BLOCK_K))  # each pick once for each of its 4 weights
    slot = tl.reshape(tl.permute(tl.zeros_like(picks)[:, :, :, None] + slots[None, None, None, :], (1, 0, 2, 3)),
                      (BLOCK_N, BLOCK_K))
    if ASM and DTYPE == tl.float16:  # a lop3 joins the pair's slots, a prmt takes their codes, a lop3 sets the
        # exponent byte 0x64 above each: 1024 + the stored code, the code + 1152
        return tl.inline_asm_elementwise(
            "{ .reg .b32 s, t; lop3.b32 s, $3, $4, 0xFF, 0xE4; prmt.b32 t, $1, $2, s;"
            " lop3.b32 $0, t, 0x00FF00FF, 0x64006400, 0xEA; }",
            "=r,r,r,r,r", [copies, slot], dtype=tl.float16, is_pure=True, pack=2)
    elif ASM:  # bf16, whose 8-bit significand holds no 1024 + a byte: a prmt per weight puts its code under the fp32
        # exponent 0x4B (2^23 + the stored code), a subtraction leaves the code and one cvt rounds both (exactly)
        return tl.inline_asm_elementwise(
            "{ .reg .b32 a, b; prmt.b32 a, $1, 0x4B000000, $3; prmt.b32 b, $2, 0x4B000000, $4;"
            " sub.f32 a, a, 0f4B000080; sub.f32 b, b, 0f4B000080; cvt.rn.bf16x2.f32 $0, b, a; }",
            "=r,r,r,r,r", [copies, (slot & 3) | 0x7540], dtype=tl.bfloat16, is_pure=True, pack=2)
    else:  # the same values: the code plus 1152 (fp16) or the code (bf16)
        raw = ((copies >> (8 * (slot & 3))) & 0xFF) - (128 if DTYPE == tl.bfloat16 else -1024)
        return raw.to(tl.float32).to(DTYPE)  # through fp32: the interpreter takes integers to bf16 wrongly


@triton.jit
def _in_selector_order(inputs, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """A tile's inputs (BLOCK_M, BLOCK_K) in the order of _book_weights' k: at 2 and 3 bits input 16 r + 8 h +
    2 i + l in place 16 r + 8 h + 4 l + i (_tile_inputs' SELECTOR_ORDER), permuted where they are, not gathered in
    that order (a gather's elements took one store each on their way to the tensor cores, sm_90)."""
    if BITS == 4:
        return inputs
    else:
        runs = tl.reshape(inputs, (BLOCK_M, BLOCK_K // 8, 4, 2))
        return tl.reshape(tl.permute(runs, (0, 1, 3, 2)), (BLOCK_M, BLOCK_K))


@triton.jit
def _input_bytes_kernel(x_ptr, out_ptr, norm_ptr, partials_ptr, eps, PARTIALS, K, RUNS, stride_xm, stride_om,
                        BITS: tl.constexpr, BLOCK_RUNS: tl.constexpr, GATED: tl.constexpr = 0,
                        NORMED: tl.constexpr = False, NORM_PARTS: tl.constexpr = 1, PDL: tl.constexpr = False):
    """Row program_id(0)'s inputs as products of bytes take them (PREPARED, _prepared_fields): per run of an index
    word's inputs (16 at 2 and 3 bits, in the selectors' order, _tile_inputs; 8 at 4) FIELDS int32: the run's
    bytes 4 to an int32 (_int8_products' rounding), its scale (largest magnitude / 127) and its sum, fp32 bits, and
    zeros to FIELDS. RUNS runs a row, past K zeros. GATED (elementwise.GATED_CODES): x's rows are [gate, up], the inputs
    act(gate) * up (elementwise.load_inputs). NORMED: x's rows are the residual stream, the inputs its RMSNorm by the
    weight at norm_ptr and eps, the row's scale from its sums of squares at partials_ptr
    (triton_tiles.stream_scales)."""
    PER_WORD: tl.constexpr = 8 if BITS == 4 else 16
    QUADS: tl.constexpr = PER_WORD // 4
    FIELDS: tl.constexpr = PER_WORD // 2
    row = tl.program_id(0)
    runs = tl.program_id(1) * BLOCK_RUNS + tl.arange(0, BLOCK_RUNS)
    slot = tl.arange(0, PER_WORD)
    if BITS == 4:
        k = runs[:, None] * PER_WORD + slot[None, :]
    else:
        k = runs[:, None] * PER_WORD + ((slot // 4) % 2 + 8 * (slot // 8) + 2 * (slot % 4))[None, :]
    wait_for_earlier_kernels(PDL)  # x is an earlier kernel's output
    x = load_inputs(x_ptr + row * stride_xm, k, k < K, K, GATED)
    if NORMED:
        rows = tl.full((1,), row, tl.int32)
        scale = tl.sum(stream_scales(partials_ptr, rows, rows >= 0, PARTIALS, K, eps, NORM_PARTS))
        x = rms_normed(x.to(tl.float32), scale, tl.load(norm_ptr + k, mask=k < K, other=0.0).to(tl.float32), x.dtype)
    x = x.to(tl.float32)
    largest = tl.max(tl.abs(x), axis=1)
    codes = _to_bytes(x, (127.0 / tl.maximum(largest, 1e-30))[:, None])
    quads = tl.sum(tl.reshape(codes, (BLOCK_RUNS, QUADS, 4)) << (8 * tl.arange(0, 4))[None, None, :], axis=2)
    after = tl.arange(0, QUADS)[None, :]  # the fields after the quads: scale, sum, zeros
    after = tl.where(after == 0, (largest / 127.0).to(tl.int32, bitcast=True)[:, None],
                     tl.where(after == 1, tl.sum(x, axis=1).to(tl.int32, bitcast=True)[:, None], 0))
    values = tl.reshape(tl.permute(tl.join(quads, after), (0, 2, 1)), (BLOCK_RUNS, FIELDS))
    field = tl.arange(0, FIELDS)[None, :]
    tl.store(out_ptr + row * stride_om + runs[:, None] * FIELDS + field, values, mask=(runs < RUNS)[:, None])


def byte_slots(device: torch.device) -> torch.Tensor:
    """The slots of _book_weights, int32 (4,) on device, once per device: slot j's low byte holds the prmt
    selector nibbles (j, j), its next byte (j + 4, j + 4)."""
    slots = _byte_slots.get(device)
    if slots is None:
        position = torch.arange(4, dtype=torch.int32, device=device)  # a kernel, not a host copy: capturable
        slots = _byte_slots[device] = position * 0x11 | (position + 4) * 0x1100
    return slots


def input_bytes(x: torch.Tensor, layer: PackedLinear, gated: str | None = None,
                norm: tuple[torch.Tensor, float, torch.Tensor] | None = None) -> torch.Tensor:
    """x (M, K) as products of bytes of layer take it prepared (_input_bytes_kernel): int32 (M, K_pad / 2), K_pad
    the layer's groups' width; with gated (elementwise.GATED), act(gate) * up of x (M, 2 K) = [gate, up]; with norm
    (its weight, eps and the stream's sums of squares: triton_linear.decode's), the RMSNorm of the stream x."""
    m, k = x.shape[0], layer.in_features
    weight, eps, squares = norm if norm is not None else (x, 0.0, x)
    padded = layer.num_groups * layer.group_size
    runs = padded // (8 if layer.bits == 4 else 16)
    out = torch.empty(m, padded // 2, dtype=torch.int32, device=x.device)
    _input_bytes_kernel[(m, triton.cdiv(runs, INPUT_BYTES_RUNS))](
        x, out, weight, squares, eps, squares.shape[1], k, runs, x.stride(0), out.stride(0), BITS=layer.bits,
        BLOCK_RUNS=INPUT_BYTES_RUNS, GATED=GATED_CODES[gated], NORMED=norm is not None,
        NORM_PARTS=triton.next_power_of_2(squares.shape[1]) if norm is not None else 1, **dependent_launch(x))
    return out
