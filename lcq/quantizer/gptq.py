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
