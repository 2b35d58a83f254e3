"""Tucker decompositions of activations: truncated HOSVD by explained variance (HOSVD_ε, Nguyen et
al. 2024) and one warm-started subspace iteration per mode (ASI, Alg. 1; PowerSGD's Alg. 2).

A decomposition is returned as ``(core, factors)``: ``factors[m]`` is an orthonormal (D_m x r_m)
matrix, or ``None`` when mode m is kept whole (r_m = D_m: projecting it would cost time and memory
and change nothing), so ``x ≈ core ×_0 U_0 ×_1 U_1 ...`` (eq. 3).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .tensor import mode_dot_other_modes, mode_product, orthonormalize, unfold

__all__ = ["eps_rank", "hosvd", "project_core", "subspace_iteration", "clip_ranks"]

Factors = list  # list[Optional[torch.Tensor]]


def clip_ranks(shape: Sequence[int], ranks: Sequence[int]) -> tuple[int, ...]:
    """Clip each requested rank to what the mode-m unfolding (D_m x Π_{j≠m} D_j) can hold."""
    total = math.prod(shape)
    return tuple(max(1, min(int(r), d, total // d)) for r, d in zip(ranks, shape))


def eps_rank(singular_values: torch.Tensor, eps: float) -> int:
    """Smallest rank whose cumulative squared singular values reach a fraction ``eps`` of the total
    (the explained-variance threshold of HOSVD_ε), clipped to the number of singular values."""
    energy = singular_values.double().pow(2)
    cum = torch.cumsum(energy, 0)
    total = cum[-1]
    if total <= 0:
        return 1
    k = int((cum < eps * total).sum().item()) + 1
    return min(k, singular_values.numel())


def project_core(x: torch.Tensor, factors: Factors) -> torch.Tensor:
    """Core S = x ×_0 U_0ᵀ ×_1 U_1ᵀ ... in the cheapest contraction order. Contracting mode m costs
    (current size)·r_m and multiplies the size by r_m/D_m; an exchange argument shows that sorting
    by 1/D_m − 1/r_m (ascending) minimises the total (checked against brute force in the tests)."""
    order = sorted((m for m, u in enumerate(factors) if u is not None),
                   key=lambda m: 1.0 / factors[m].shape[0] - 1.0 / factors[m].shape[1])
    core = x
    for m in order:
        core = mode_product(core, factors[m], m, transpose=True)
    return core


def hosvd(x: torch.Tensor, eps: float):
    """Truncated HOSVD_ε: per mode, the leading left singular vectors of the unfolding that explain
    a fraction ``eps`` of its energy. Returns ``(core, factors, ranks)``. Cost: eq. 11."""
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    factors: Factors = []
    ranks = []
    for m, d in enumerate(work.shape):
        u, s, _ = torch.linalg.svd(unfold(work, m), full_matrices=False)
        r = eps_rank(s, eps)
        ranks.append(r)
        factors.append(None if r >= d else u[:, :r].to(x.dtype).contiguous())
    return project_core(x, factors), factors, tuple(ranks)


def subspace_iteration(x: torch.Tensor, ranks: Sequence[int], previous: Optional[Factors] = None,
                       generator: Optional[torch.Generator] = None):
    """One subspace iteration per mode (Alg. 1). For mode m with target rank r:

    - cold start (no usable previous factor): V ~ N(0, 1) of shape b_m x r (Alg. 2, t = 0), drawn
      from ``generator`` on x's device;
    - warm start: V = A_(m)ᵀ U_prev, i.e. x ×_m U_prevᵀ (kept in tensor form, never unfolded);
    - U = orthonormalize(A_(m) V).

    ``ranks`` must already be clipped (:func:`clip_ranks`). A mode with r = D_m is kept whole
    (factor None). Returns ``(core, factors)``; cost per mode is eq. 12/14 (2·a·b·r + r³).
    """
    factors: Factors = []
    for m, (d, r) in enumerate(zip(x.shape, ranks)):
        if r >= d:
            factors.append(None)
            continue
        prev = previous[m] if previous is not None else None
        if prev is not None and prev.shape == (d, r):
            v = mode_product(x, prev.to(dtype=x.dtype, device=x.device), m, transpose=True)
        else:
            shape = x.shape[:m] + (r,) + x.shape[m + 1:]
            v = torch.randn(shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)
        factors.append(orthonormalize(mode_dot_other_modes(x, v, m)))
    return project_core(x, factors), factors
