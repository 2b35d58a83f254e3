"""Tensor primitives: mode-n unfolding, mode-n products, orthonormalisation.

Modes are 0-based here (the paper counts them from 1: mode 1 = batch, 2 = channels, 3 = height,
4 = width for a conv input). Every mode product is written as a (batched) matrix product over a
*view* of the tensor, ``x.reshape(left, a, right)``, so no permuted copy of a large activation is
ever made (issue 8: reading the activation through permuted copies is what makes a naive ASI slow).
"""
from __future__ import annotations

import math

import torch

__all__ = ["unfold", "fold", "mode_product", "mode_dot_other_modes", "orthonormalize", "tucker_to_tensor"]


def _split(shape: torch.Size | tuple, mode: int) -> tuple[int, int, int]:
    return math.prod(shape[:mode]), shape[mode], math.prod(shape[mode + 1:])


def unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding A_(m) in R^{a x b}, a = x.shape[mode], b = the product of the others
    (remaining modes keep their order). Sec. 3.2."""
    return x.movedim(mode, 0).reshape(x.shape[mode], -1)


def fold(mat: torch.Tensor, mode: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`unfold` for a tensor of ``shape``."""
    moved = (shape[mode],) + tuple(s for i, s in enumerate(shape) if i != mode)
    return mat.reshape(moved).movedim(0, mode)


def _contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_contiguous() else x.contiguous()


def mode_product(x: torch.Tensor, mat: torch.Tensor, mode: int, transpose: bool = False) -> torch.Tensor:
    """x ×_mode M (eq. 4): contracts mode ``mode`` of ``x`` (size P) with the columns of M (Q x P).

    With ``transpose=True`` it computes x ×_mode Mᵀ for M of shape (P x Q), i.e. the projection onto
    the columns of a factor U (P x r) without forming Uᵀ.
    """
    x = _contiguous(x)
    left, a, right = _split(x.shape, mode)
    m = mat.t() if transpose else mat  # (Q, P)
    q = m.shape[0]
    if m.shape[1] != a:
        raise ValueError(f"mode_product: mode {mode} of x has size {a} but the matrix has {m.shape[1]} columns")
    if right == 1:  # last mode: (left, a) @ (a, Q)
        y = x.reshape(left, a) @ m.t()
    elif left == 1:  # first mode: (Q, a) @ (a, right)
        y = m @ x.reshape(a, right)
    else:  # middle mode: batched (Q, a) @ (a, right)
        y = torch.matmul(m, x.reshape(left, a, right))
    return y.reshape(x.shape[:mode] + (q,) + x.shape[mode + 1:])


def mode_dot_other_modes(x: torch.Tensor, v: torch.Tensor, mode: int) -> torch.Tensor:
    """A_(m) V_(m)ᵀ: contracts every mode of ``x`` except ``mode`` with ``v`` (same shape as ``x``
    except mode ``mode``, size r). Returns (x.shape[mode], r). In Alg. 1/2 this is "A_{i,m} V" with
    V = A_(m)ᵀ U stored in tensor form."""
    x, v = _contiguous(x), _contiguous(v)
    left, a, right = _split(x.shape, mode)
    r = v.shape[mode]
    if right == 1:
        return x.reshape(left, a).t() @ v.reshape(left, r)
    if left == 1:
        return x.reshape(a, right) @ v.reshape(r, right).t()
    return torch.bmm(x.reshape(left, a, right), v.reshape(left, r, right).transpose(1, 2)).sum(0)


def orthonormalize(p: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of ``p`` (a x r, r <= a) by reduced QR. float16/bfloat16
    inputs are factorised in float32 (half-precision QR is unavailable or unstable) and cast back."""
    dtype = p.dtype
    work = p.float() if dtype in (torch.float16, torch.bfloat16) else p
    q, r = torch.linalg.qr(work, mode="reduced")
    # Fix the sign ambiguity of QR so that the basis is a deterministic function of span + order.
    sign = torch.sign(torch.diagonal(r))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (q * sign).to(dtype)


def tucker_to_tensor(core: torch.Tensor, factors) -> torch.Tensor:
    """Rebuild S ×_1 U_1 ×_2 U_2 ... (eq. 3); a factor of None leaves its mode as it is."""
    out = core
    for mode, u in enumerate(factors):
        if u is not None:
            out = mode_product(out, u, mode)
    return out
