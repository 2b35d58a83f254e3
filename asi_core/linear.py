"""nn.Linear geometry for the training ops (inputs (N, D) or (B, T, D)), mirroring conv.py.

Gradient filtering on a linear layer groups the rows (2-D input) or the tokens (3-D input) into
patches of R consecutive positions: the output gradient is replaced by its patch mean ḡ, the input
kept as its patch sum x̄, dW = Σ ḡ ⊗ x̄, and the input gradient is g̃ W with g̃ = ḡ broadcast back.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .lowrank import linear_weight_grad

__all__ = ["LinearOps"]


class LinearOps:
    mode_names = ("N", "D")

    def __init__(self, linear: torch.nn.Linear):
        self.in_features = linear.in_features
        self.out_features = linear.out_features

    def prepare(self, x):
        return x

    @staticmethod
    def forward(x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def input_grad(grad_out, weight, input_shape):
        return (grad_out @ weight).reshape(input_shape)

    @staticmethod
    def weight_grad_exact(x, grad_out, weight_shape):
        return grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1])

    @staticmethod
    def weight_grad(core, factors, grad_out, weight_shape):
        return linear_weight_grad(core, factors, grad_out)

    @staticmethod
    def bias_grad(grad_out):
        return grad_out.reshape(-1, grad_out.shape[-1]).sum(0)

    # -- gradient filtering along the row / token axis ----------------------------------------
    @staticmethod
    def _pool(t, radius, mean):
        """(..., L, F) -> (..., ceil(L/R), F): sums (or means) over patches of R positions."""
        length = t.shape[-2]
        n = math.ceil(length / radius)
        padded = F.pad(t, (0, 0, 0, n * radius - length))
        sums = padded.reshape(t.shape[:-2] + (n, radius, t.shape[-1])).sum(-2)
        if not mean:
            return sums
        counts = torch.full((n, 1), float(radius), dtype=t.dtype, device=t.device)
        counts[-1] = length - radius * (n - 1)
        return sums / counts

    def filter_input(self, x, radius):
        return self._pool(x, radius, mean=False)

    def filter_grad(self, grad_out, radius):
        g_bar = self._pool(grad_out, radius, mean=True)
        length = grad_out.shape[-2]
        g_tilde = g_bar.repeat_interleave(radius, -2)[..., :length, :]
        return g_bar, g_tilde

    @staticmethod
    def filter_weight_grad(x_bar, g_bar, weight_shape):
        return g_bar.reshape(-1, g_bar.shape[-1]).t() @ x_bar.reshape(-1, x_bar.shape[-1])

    @staticmethod
    def filtered_elements(input_shape, radius):
        return math.prod(input_shape[:-2]) * math.ceil(input_shape[-2] / radius) * input_shape[-1]

