"""Weight gradients computed directly from a Tucker-compressed input (eq. 15), without rebuilding
the full activation. Shared by every low-rank method (hosvd, asi) and both layer types.

For a conv with input A ≈ S ×_B U_B ×_C U_C ×_H U_H ×_W U_W and output gradient G:
  1. Z = G ×_B U_Bᵀ                       (r_B, C', H', W')     cost r_B·B·C'·H'·W'
  2. Y = S ×_H U_H ×_W U_W                (r_B, r_C, H, W)      cost r_B r_C r_H r_W·H + r_B r_C r_W·H·W
  3. dW' = wgrad(Y, Z) with groups = 1    (C', r_C, kh, kw)     cost r_B·r_C·C'·H'·W'·kh·kw
  4. dW[o, c] = Σ_j U_C[g(o)·C_g + c, j] dW'[o, j]             cost r_C·C'·(C/groups)·kh·kw
Step 4 routes each output channel's gradient back through the channel factor rows of its own group,
which makes the same path exact for groups = 1, depthwise and general grouped convs.
"""
from __future__ import annotations

import torch
from torch.nn.grad import conv2d_weight

from .tensor import mode_product

__all__ = ["conv2d_weight_grad", "linear_weight_grad"]


def conv2d_weight_grad(core, factors, grad_out, weight_shape, stride, padding, dilation, groups):
    u_b, u_c, u_h, u_w = factors
    z = grad_out if u_b is None else mode_product(grad_out, u_b, 0, transpose=True)
    y = core
    if u_h is not None:
        y = mode_product(y, u_h, 2)
    if u_w is not None:
        y = mode_product(y, u_w, 3)
    if u_c is None:
        return conv2d_weight(y, weight_shape, z, stride, padding, dilation, groups)
    c_out, c_per_group, kh, kw = weight_shape
    r_c = y.shape[1]
    dwp = conv2d_weight(y, (c_out, r_c, kh, kw), z, stride, padding, dilation, 1)
    dw = torch.einsum("gcj,gojk->gock",
                      u_c.reshape(groups, c_per_group, r_c),
                      dwp.reshape(groups, c_out // groups, r_c, kh * kw))
    return dw.reshape(weight_shape)


def linear_weight_grad(core, factors, grad_out):
    """dW (out x in) = Σ_{leading modes} G ⊗ A for A ≈ S ×_0 U_0 [×_1 U_1] ×_last U_D (2-D or 3-D
    input): project G on the leading factors, contract with the core, then expand the feature mode."""
    z = grad_out
    for m, u in enumerate(factors[:-1]):
        if u is not None:
            z = mode_product(z, u, m, transpose=True)
    dw = z.reshape(-1, z.shape[-1]).t() @ core.reshape(-1, core.shape[-1])
    u_d = factors[-1]
    return dw if u_d is None else dw @ u_d.t()
