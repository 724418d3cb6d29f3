"""The packed linear layer and its reference dequantization.

A weight W (N x K) is cut into groups of g inputs per row. Group j of row n has the codebook
c[n, j, :] = S[n, j, :] @ V - B[n, j] of L = 2^b entries; each weight is the b-bit index of
its entry. S (N, G, r) and B (N, G) are stored as int8 with per-row fp16 scales (dual
quantization), V (r, L) in fp16. This module is the definition every kernel is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .packing import PACK_BLOCK, pack_indices, unpack_indices

INT8_MAX = 127


def padded_in_features(in_features: int, group_size: int) -> int:
    """K rounded up to whole groups; padded indices are zero and must meet zero activations."""
    return -(-in_features // group_size) * group_size


@dataclass
class PackedLinear:
    """One LCQ matrix in memory, or several concatenated along N (fused QKV, gate/up).

    qweight  int32 (K_pad / 32 * bits, N)   packed indices (see packing.py)
    s_q      int8  (G, r, N)                S, quantized
    s_scale  fp16  (r, N)                   S[n, j, k] = s_q[j, k, n] * s_scale[k, n]
    b_q      int8  (G, N)                   B, quantized
    b_scale  fp16  (N,)                     B[n, j] = b_q[j, n] * b_scale[n]
    v        fp16  (P, r, L)                one V table per concatenated part
    v_index  int32 (N,)                     which V table row n uses
    """

    qweight: torch.Tensor
    s_q: torch.Tensor
    s_scale: torch.Tensor
    b_q: torch.Tensor
    b_scale: torch.Tensor
    v: torch.Tensor
    v_index: torch.Tensor
    in_features: int
    bits: int
    group_size: int
    bias: torch.Tensor | None = None

    # Shapes read from the last dimensions, so that a mixture's experts stacked along a leading dimension
    # (lcq.kernels.experts) read alike.
    @property
    def out_features(self) -> int:
        return self.qweight.shape[-1]

    @property
    def rank(self) -> int:
        return self.s_q.shape[-2]

    @property
    def num_groups(self) -> int:
        return self.s_q.shape[-3]

    @property
    def padded_in_features(self) -> int:
        return self.num_groups * self.group_size

    def to(self, device: torch.device | str) -> "PackedLinear":
        moved = {name: getattr(self, name).to(device) for name in _TENSOR_FIELDS}
        bias = None if self.bias is None else self.bias.to(device)
        return replace(self, bias=bias, **moved)

    def nbytes(self) -> int:
        """Bytes a kernel streams for this layer (bias excluded)."""
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in _TENSOR_FIELDS)

    def bits_per_weight(self) -> float:
        """Stored bits per weight, as on disk (docs/format.md): packed tensors plus the 8-byte shape."""
        stored = stored_bytes(self.out_features, self.in_features, self.bits, self.rank, self.group_size,
                              self.v.shape[0])
        return 8 * stored / (self.out_features * self.in_features)

    @staticmethod
    def concat(parts: list["PackedLinear"]) -> "PackedLinear":
        """Concatenate layers that share K, bits, rank and group size along N."""
        first = parts[0]
        for part in parts[1:]:
            if (part.in_features, part.bits, part.rank, part.group_size) != (
                    first.in_features, first.bits, first.rank, first.group_size):
                raise ValueError("only layers of equal in_features, bits, rank and group size can be fused")
        offsets, v_index = 0, []
        for part in parts:
            v_index.append(part.v_index + offsets)
            offsets += part.v.shape[0]
        biases = [p.bias for p in parts]
        if any(b is not None for b in biases):
            biases = [torch.zeros(p.out_features, dtype=torch.float16, device=p.qweight.device)
                      if b is None else b for p, b in zip(parts, biases)]
            bias = torch.cat(biases)
        else:
            bias = None
        return PackedLinear(
            qweight=torch.cat([p.qweight for p in parts], dim=1),
            s_q=torch.cat([p.s_q for p in parts], dim=2),
            s_scale=torch.cat([p.s_scale for p in parts], dim=1),
            b_q=torch.cat([p.b_q for p in parts], dim=1),
            b_scale=torch.cat([p.b_scale for p in parts]),
            v=torch.cat([p.v for p in parts], dim=0),
            v_index=torch.cat(v_index).to(torch.int32),
            in_features=first.in_features, bits=first.bits, group_size=first.group_size, bias=bias,
        )


_TENSOR_FIELDS = ("qweight", "s_q", "s_scale", "b_q", "b_scale", "v", "v_index")


def stored_bytes(out_features: int, in_features: int, bits: int, rank: int, group_size: int, parts: int = 1) -> int:
    """Bytes on disk of an (out_features, in_features) layer of `parts` concatenated matrices (docs/format.md):
    the packed indices, S and B in int8 with their fp16 scales, each part's fp16 V and its 8-byte shape.
    From the shape alone, so that widths can be budgeted before anything is packed (quantizer/allocation.py)."""
    groups = padded_in_features(in_features, group_size) // group_size
    indices = groups * group_size * bits // 8 * out_features
    codebook_factors = (groups * rank + 2 * rank + groups + 2) * out_features
    return indices + codebook_factors + parts * (2 * rank * (1 << bits) + 8)


def codebooks(s: torch.Tensor, v: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c[n, j, l] = sum_k s[n, j, k] * v[k, l] - b[n, j]  for s (N, G, r), v (r, L), b (N, G)."""
    return torch.einsum("ngr,rl->ngl", s, v) - b.unsqueeze(-1)


def quantize_over_groups_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 for x shaped (G, ..., N), one fp16 scale per (..., N) shared by all groups. The scale is
    at least fp16's smallest subnormal, 2^-24: a smaller one rounds to 0 in fp16, and all-zero values (a rank
    component an RTN fit leaves unused) then divided 0 by 0 into codes from a NaN cast."""
    exact = (x.abs().amax(dim=0) / INT8_MAX).clamp_min(2.0 ** -24)
    scale = exact.to(torch.float16)
    # A scale fp16 rounded down leaves the largest value a code above 127, clipped: by up to a quarter of it
    # where the scale is subnormal (rows of values below ~1e-4). The next fp16 up keeps it within the codes.
    below = scale.float() < exact
    scale[below] = (scale[below].view(torch.int16) + 1).view(torch.float16)
    q = torch.round(x / scale.float()).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dual_quantize(s: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize S (N, G, r) and B (N, G) to int8 with per-row (and per-rank) fp16 scales.

    Returns s_q (G, r, N), s_scale (r, N), b_q (G, N), b_scale (N,) in the stored layout.
    """
    s_q, s_scale = quantize_over_groups_int8(s.permute(1, 2, 0).float())
    b_q, b_scale = quantize_over_groups_int8(b.t().float())
    return s_q.contiguous(), s_scale.contiguous(), b_q.contiguous(), b_scale.contiguous()


def decoded_s(layer: PackedLinear) -> torch.Tensor:
    """S as float32 (N, G, r)."""
    return (layer.s_q.float() * layer.s_scale.float().unsqueeze(0)).permute(2, 0, 1)


def decoded_b(layer: PackedLinear) -> torch.Tensor:
    """B as float32 (N, G)."""
    return (layer.b_q.float() * layer.b_scale.float().unsqueeze(0)).t()


def layer_codebooks(layer: PackedLinear) -> torch.Tensor:
    """Every group's codebook, float32 (N, G, L), with each row's own V table."""
    s, b = decoded_s(layer), decoded_b(layer)
    v = layer.v.float()[layer.v_index.long()]  # (N, r, L)
    return torch.einsum("ngr,nrl->ngl", s, v) - b.unsqueeze(-1)


def output_rows(layer: PackedLinear, rows: torch.Tensor) -> PackedLinear:
    """The layer restricted to output rows `rows` (int64), in that order: dequantize() of it gives
    those rows of W, which is how a packed head shared with the embeddings looks tokens up."""
    return replace(layer, qweight=layer.qweight[:, rows], s_q=layer.s_q[:, :, rows], s_scale=layer.s_scale[:, rows],
                   b_q=layer.b_q[:, rows], b_scale=layer.b_scale[rows], v_index=layer.v_index[rows],
                   bias=None if layer.bias is None else layer.bias[rows])


def dequantize(layer: PackedLinear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference: the dense (N, K) weight the packed layer stands for."""
    indices = unpack_indices(layer.qweight, layer.bits)  # (N, K_pad)
    books = layer_codebooks(layer)  # (N, G, L)
    n_rows, k_pad = indices.shape
    grouped = indices.reshape(n_rows, layer.num_groups, layer.group_size)
    weight = torch.gather(books, 2, grouped).reshape(n_rows, k_pad)
    return weight[:, :layer.in_features].to(dtype)


def encode_linear(indices: torch.Tensor, s_q: torch.Tensor, s_scale: torch.Tensor, b_q: torch.Tensor,
                  b_scale: torch.Tensor, v: torch.Tensor, in_features: int, bits: int, group_size: int,
                  bias: torch.Tensor | None = None) -> PackedLinear:
    """Build a PackedLinear from (N, K) indices and already dual-quantized S and B.

    Indices beyond K (the last partial group) are padded with zeros.
    """
    n_rows, k = indices.shape
    k_pad = padded_in_features(in_features, group_size)
    if k != in_features or k_pad % PACK_BLOCK:
        raise ValueError(f"indices have K={k}, expected {in_features} (group size a multiple of {PACK_BLOCK})")
    padded = torch.zeros(n_rows, k_pad, dtype=torch.int64, device=indices.device)
    padded[:, :k] = indices
    return PackedLinear(
        qweight=pack_indices(padded, bits), s_q=s_q, s_scale=s_scale, b_q=b_q, b_scale=b_scale,
        v=v.to(torch.float16).reshape(1, *v.shape[-2:]),
        v_index=torch.zeros(n_rows, dtype=torch.int32, device=indices.device),
        in_features=in_features, bits=bits, group_size=group_size,
        bias=None if bias is None else bias.to(torch.float16),
    )
