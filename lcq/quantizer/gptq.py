"""GPTQ: quantize columns one at a time and push each column's error onto the columns not yet
quantized, through the inverse Hessian of the layer's inputs (H = 2 X^T X / n).

The codebook of every group is fixed before the sweep (the RTN grid through dual quantization, as
stored), so the indices GPTQ picks are exactly the ones the stored codebook decodes. Any codebook
works here, the uniform grid is just the baseline's.
"""
from __future__ import annotations

import torch

BLOCK = 128


@torch.no_grad()
def gptq_indices(weight: torch.Tensor, hessian: torch.Tensor, books: torch.Tensor, group_size: int,
                 act_order: bool = False, damp: float = 0.01) -> torch.Tensor:
    """Indices (N, G, g) for weight (N, K) given H (K, K) and per-group codebooks books (N, G, L)."""
    n_rows, k = weight.shape
    w = weight.float().clone()
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k, device=w.device)
    w, h = w[:, order], h[order][:, order]
    h += torch.eye(k, device=w.device) * damp * torch.diag(h).mean()
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    groups = books.shape[1]
    indices = torch.zeros(n_rows, groups * group_size, dtype=torch.long, device=w.device)
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        for i in range(end - start):
            column = int(order[start + i])
            levels = books[:, column // group_size, :]  # (N, L)
            idx = (block[:, i:i + 1] - levels).abs().argmin(dim=1)
            value = levels.gather(1, idx.unsqueeze(1)).squeeze(1)
            indices[:, column] = idx
            error = (block[:, i] - value) / hinv[start + i, start + i]
            block[:, i:] -= error.unsqueeze(1) * hinv[start + i, start + i:end].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ hinv[start:end, end:]
    return indices.reshape(n_rows, groups, group_size)


@torch.no_grad()
def fit_codebooks_to_indices(weight: torch.Tensor, hessian: torch.Tensor, indices: torch.Tensor, s: torch.Tensor,
                             v: torch.Tensor, b: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S and B (V kept) minimizing the layer's output error sum_n (w_n - c[q_n]) H (w_n - c[q_n])^T
    for fixed indices q: the weights GPTQ chose are compensations for each other, so the codebook
    values that serve them best come from H, not from the nearest-entry fit they started from.

    The quantized row is linear in each group's [S, B] (phi = [V[:, q], -1]), so every row is one
    least-squares problem in its G (r + 1) unknowns. Returns (S, B) shaped like s and b."""
    n_rows, groups, rank = s.shape
    k_pad = groups * group_size
    h = torch.zeros(k_pad, k_pad, device=weight.device)
    h[:weight.shape[1], :weight.shape[1]] = hessian.float()
    h = h.reshape(groups, group_size, groups, group_size)
    w = torch.nn.functional.pad(weight.float(), (0, k_pad - weight.shape[1]))
    hw = (w @ h.reshape(k_pad, k_pad)).reshape(n_rows, groups, group_size)
    unknowns = groups * (rank + 1)
    chunk = max(1, (1 << 26) // (unknowns * k_pad))  # rows per batch: bounds the (rows, G, r+1, K) product
    solution = torch.empty(n_rows, unknowns, device=weight.device)
    for start in range(0, n_rows, chunk):
        q = indices[start:start + chunk]
        phi = torch.cat([v.t()[q], -torch.ones(*q.shape, 1, device=weight.device)], dim=-1)  # (n, G, g, r+1)
        phi_h = torch.einsum("njia,jikl->njakl", phi, h)
        gram = torch.einsum("njakl,nklb->njakb", phi_h, phi).reshape(-1, unknowns, unknowns)
        rhs = torch.einsum("njia,nji->nja", phi, hw[start:start + chunk]).reshape(-1, unknowns)
        ridge = 1e-6 * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
        gram = gram + torch.eye(unknowns, device=weight.device) * ridge[:, None, None]
        solution[start:start + chunk] = torch.linalg.solve(gram, rhs.unsqueeze(-1)).squeeze(-1)
    solution = solution.reshape(n_rows, groups, rank + 1)
    return solution[..., :rank].contiguous(), solution[..., rank].contiguous()
