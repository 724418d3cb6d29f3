"""Fitting one layer's codebooks: c[n, j, :] = S[n, j, :] @ V - B[n, j].

Everything here is data-aware through `importance`, the diagonal of the layer's input second
moment (mean of x_k^2 over calibration tokens): a weight whose input is large costs more output
error when it is off, so every fit minimizes sum_k importance_k * (w_k - c[q_k])^2. Without data
the importance is 1 for every real column. Padding columns (K not a multiple of g) weigh 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lcq.format import PackedLinear, codebooks, dual_quantize, encode_linear, padded_in_features

@dataclass
class Codebook:
    """The float (trainable) form of a layer's codebooks: s (N, G, r), v (r, L), b (N, G)."""

    s: torch.Tensor
    v: torch.Tensor
    b: torch.Tensor

    def values(self) -> torch.Tensor:
        return codebooks(self.s, self.v, self.b)

    def copy(self) -> "Codebook":
        """A detached copy, which training this one in place leaves as it is."""
        return Codebook(self.s.detach().clone(), self.v.detach().clone(), self.b.detach().clone())


def dense_weight(values: torch.Tensor, indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """The (N, K) weight of codebook values (N, G, L) at indices (N, G, g), padding columns dropped."""
    return torch.gather(values, 2, indices.long()).reshape(indices.shape[0], -1)[:, :in_features]


def grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) -> (N, G, g), zero-padded to whole groups."""
    n_rows, k = weight.shape
    k_pad = padded_in_features(k, group_size)
    padded = torch.nn.functional.pad(weight.float(), (0, k_pad - k))
    return padded.reshape(n_rows, k_pad // group_size, group_size)


IMPORTANCE_FLOOR = 1e-12  # an input's least weight in the fit (a group of dead inputs still has a solution)


def grouped_importance(importance: torch.Tensor | None, in_features: int, group_size: int,
                       device: torch.device) -> torch.Tensor:
    """(G, g) weights for the fit: importance per input column, at least IMPORTANCE_FLOOR, 0 on padding."""
    k_pad = padded_in_features(in_features, group_size)
    h = torch.zeros(k_pad, device=device)
    h[:in_features] = 1.0 if importance is None else importance.float().to(device).clamp_min(IMPORTANCE_FLOOR)
    return h.reshape(-1, group_size)


def live(h: torch.Tensor) -> torch.Tensor:
    """The inputs a grid is fitted to (grouped_importance's h): those calibration reached. A dead input (no
    calibration token made it other than 0: a dead ReLU neuron, an expert's column never routed to) adds nothing
    to the layer's output, so its weight must not widen the group's min-max, as reference GPTQ zeroes it first
    (with it, a grid step 2.3x as wide, 2.3x the output error)."""
    return h > IMPORTANCE_FLOOR


def assign(wg: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook entry for every weight: wg (N, G, g), books (N, G, L) -> (N, G, g):
    its place among the midpoints of its sorted codebook (midpoints_below), no (g x L) table."""
    ordered, order = books.sort(dim=-1)
    return order.gather(-1, midpoints_below(wg, (ordered[..., 1:] + ordered[..., :-1]) / 2))


def midpoints_below(wg: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    """How many of its group's sorted midpoints (N, G, L - 1) lie below each weight of wg (N, G, g), int64. On
    CPU counted one midpoint at a time into bytes: torch.searchsorted, a binary search per row, took 1.7-3.8x as
    long on these batches of short rows (2 cores, L 4-16; a quarter of a W2 quantization's time). On a GPU
    searchsorted still, which reads each weight once where the count reads them L - 1 times (not timed there)."""
    if wg.is_cuda:
        return torch.searchsorted(midpoints.contiguous(), wg.contiguous())
    place = torch.zeros(wg.shape, dtype=torch.uint8, device=wg.device)
    for j in range(midpoints.shape[-1]):
        place += midpoints[..., j:j + 1] < wg
    return place.long()


def uniform_levels(levels: int, rank: int, device: torch.device) -> torch.Tensor:
    """V for a uniform grid: row 0 is 0..L-1, further rows are centred polynomials of the level
    (quadratic, cubic, ...), scaled alike, so extra ranks can bend the grid."""
    x = torch.arange(levels, dtype=torch.float32, device=device)
    t = (x - x.mean()) / x.max().clamp_min(1) * 2  # in [-1, 1]
    rows = [x] + [(t ** (p + 2)) * (levels - 1) / 2 for p in range(rank - 1)]
    rows = [r - r.mean() if i else r for i, r in enumerate(rows)]
    return torch.stack(rows)


def rtn_codebook(wg: torch.Tensor, mask: torch.Tensor, bits: int, rank: int) -> Codebook:
    """Asymmetric min-max grid per group with an integer zero point: c[l] = scale * l - scale * zero.

    With rank > 1 the extra ranks start at zero, so the codebook is still exactly the RTN grid."""
    levels = 1 << bits
    big = torch.finfo(torch.float32).max
    lo = torch.where(mask, wg, big).amin(-1).clamp_max(0)
    hi = torch.where(mask, wg, -big).amax(-1).clamp_min(0)
    scale = ((hi - lo) / (levels - 1)).clamp_min(1e-8)
    zero = torch.round(-lo / scale).clamp(0, levels - 1)
    s = torch.zeros(*scale.shape, rank, device=wg.device)
    s[..., 0] = scale
    return Codebook(s=s, v=uniform_levels(levels, rank, wg.device), b=scale * zero)


def kmeans_values(wg: torch.Tensor, h: torch.Tensor, bits: int, iterations: int = 20) -> torch.Tensor:
    """Per-group weighted 1-D Lloyd codebooks (N, G, L), sorted, started from quantiles of the group. Once no
    weight changes entry, no center moves again (an empty entry keeps its center either way), so the loop stops
    there with what every later iteration would give: SmolLM2's layers settle in 8-11 of the 20."""
    levels = 1 << bits
    probs = (torch.arange(levels, device=wg.device, dtype=torch.float32) + 0.5) / levels
    centers = torch.quantile(wg, probs, dim=-1).permute(1, 2, 0).contiguous()
    weights = h.unsqueeze(0).expand_as(wg)
    last = None
    for _ in range(iterations):
        idx = assign(wg, centers)
        if last is not None and torch.equal(idx, last):
            break
        last = idx
        num = torch.zeros_like(centers).scatter_add_(-1, idx, weights * wg)
        den = torch.zeros_like(centers).scatter_add_(-1, idx, weights)
        centers = torch.where(den > 0, num / den.clamp_min(1e-30), centers)
    return centers.sort(dim=-1).values


def low_rank(values: torch.Tensor, rank: int) -> Codebook:
    """Best rank-r form S @ V - B of full codebooks (N, G, L): B removes each group's mean, the SVD of
    the centred codebooks gives S and the shared V."""
    n_rows, groups, levels = values.shape
    mean = values.mean(-1)
    u, sigma, vt = torch.linalg.svd((values - mean.unsqueeze(-1)).reshape(-1, levels), full_matrices=False)
    found = sigma.shape[0]  # fewer than the rank where the layer has fewer codebooks: the rest start at zero
    s = torch.nn.functional.pad(u[:, :rank] * sigma[:rank], (0, max(0, rank - found))).reshape(n_rows, groups, rank)
    v = torch.nn.functional.pad(vt[:rank], (0, 0, 0, max(0, rank - found)))
    return Codebook(s=s.contiguous(), v=v.contiguous(), b=-mean)


def _solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Batched solve of gram @ x = rhs with a tiny ridge, so groups whose weights all share one level
    (a singular system) keep a finite answer."""
    eye = torch.eye(gram.shape[-1], device=gram.device)
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    return torch.linalg.solve(gram + eye * (1e-6 * scale + 1e-12), rhs.unsqueeze(-1)).squeeze(-1)


def _outer(x: torch.Tensor) -> torch.Tensor:
    """x (..., a) -> (..., a, a): x x^T per row (plain matmuls below beat 3-operand einsums on CPU)."""
    return x.unsqueeze(-1) * x.unsqueeze(-2)


def refine(wg: torch.Tensor, h: torch.Tensor, book: Codebook, rounds: int = 4) -> Codebook:
    """Alternate: assign, then weighted least squares for (S, B) per group, then for V per level.

    Both solves only need, per group and level, the summed importance of the weights assigned
    there and their importance-weighted sum, so nothing per weight is materialized beyond those."""
    s, v, b = book.s, book.v, book.b
    rank, levels = v.shape
    weights = h.unsqueeze(0).expand_as(wg)
    for _ in range(rounds):
        idx = assign(wg, codebooks(s, v, b))
        mass = torch.zeros(*wg.shape[:2], levels, device=wg.device).scatter_add_(-1, idx, weights)
        moment = torch.zeros_like(mass).scatter_add_(-1, idx, weights * wg)
        # (S, B) per group: w ~ phi_l . [s, b] with phi_l = [V[:, l], -1] for the weight's level l.
        phi = torch.cat([v.t(), -torch.ones(levels, 1, device=wg.device)], dim=1)  # (L, r+1)
        gram = (mass @ _outer(phi).flatten(1)).unflatten(-1, (rank + 1, rank + 1))
        solution = _solve(gram, moment @ phi)
        s, b = solution[..., :rank], solution[..., rank]
        # V per level: w + B ~ S . V[:, l] over the weights at level l.
        gram_v = (mass.flatten(0, 1).t() @ _outer(s).flatten(2).flatten(0, 1)).unflatten(-1, (rank, rank))
        rhs_v = (moment + mass * b.unsqueeze(-1)).flatten(0, 1).t() @ s.flatten(0, 1)
        used = mass.sum(dim=(0, 1)) > 0
        v = torch.where(used.unsqueeze(0), _solve(gram_v, rhs_v).t(), v)
    return Codebook(s=s, v=v, b=b)


def weighted_error(wg: torch.Tensor, h: torch.Tensor, book: Codebook) -> float:
    values = book.values()
    wq = torch.gather(values, 2, assign(wg, values))
    return float((h * (wg - wq) ** 2).sum())


def lcq_init(wg: torch.Tensor, h: torch.Tensor, bits: int, rank: int, init: str) -> Codebook:
    """The starting codebooks of LCQ: 'kmeans' (weighted Lloyd, reduced to rank r by SVD) or 'rtn'
    (the RTN grid), each refined by alternating least squares; the better of the two is kept when
    'kmeans' is asked for, since SVD of k-means codebooks can lose to the grid at rank 1."""
    grid = refine(wg, h, rtn_codebook(wg, live(h), bits, rank))
    if init == "rtn":
        return grid
    learned = refine(wg, h, low_rank(kmeans_values(wg, h, bits), rank))
    return learned if weighted_error(wg, h, learned) <= weighted_error(wg, h, grid) else grid


def stored_codebook(book: Codebook, quantized: tuple[torch.Tensor, ...] | None = None) -> Codebook:
    """The codebook as it will be stored: S and B through int8 (dual quantization, or the given dual_quantize
    output), V through fp16."""
    s_q, s_scale, b_q, b_scale = quantized or dual_quantize(book.s.detach(), book.b.detach())
    s = (s_q.float() * s_scale.float().unsqueeze(0)).permute(2, 0, 1)
    b = (b_q.float() * b_scale.float().unsqueeze(0)).t()
    return Codebook(s=s, v=book.v.detach().to(torch.float16).float(), b=b)


def pack(book: Codebook, wg: torch.Tensor, in_features: int, bits: int, group_size: int,
         bias: torch.Tensor | None = None, indices: torch.Tensor | None = None) -> PackedLinear:
    """Dual-quantize S and B, then store each weight's nearest entry of the stored codebook (or the
    given indices (N, G, g), when GPTQ already chose them against the stored codebook)."""
    s_q, s_scale, b_q, b_scale = dual_quantize(book.s.detach(), book.b.detach())
    if indices is None:
        indices = assign(wg, stored_codebook(book).values())
    flat = indices.reshape(wg.shape[0], -1)[:, :in_features]
    return encode_linear(flat, s_q, s_scale, b_q, b_scale, book.v.detach(), in_features, bits, group_size, bias)
