"""nn.Linear geometry for the training ops (inputs (..., D): (N, D), (B, T, D), (B, H, W, C), ...),
mirroring conv.py.

Gradient filtering on a linear layer groups the rows (2-D input), the tokens (3-D input) or the spatial
positions (4-D (B, H, W, C) input, R x R patches as for a conv) into patches of R consecutive positions
per pooled mode: the output gradient is replaced by its patch mean ḡ, the input kept as its patch sum
x̄, dW = Σ ḡ ⊗ x̄, and the input gradient is g̃ W with g̃ = ḡ broadcast back.
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

    # -- gradient filtering over rows / tokens / spatial positions --------------------------------
    @staticmethod
    def pooled_modes(ndim: int) -> tuple[int, ...]:
        """The modes gradient filtering pools in patches of R: the rows of (N, D), the tokens of (B, T, D),
        the two spatial modes of (B, H, W, C) (R x R patches, as for a conv); for more modes the two before D."""
        return (ndim - 2,) if ndim <= 3 else (ndim - 3, ndim - 2)

    @classmethod
    def _pool(cls, t, radius, mean):
        """Sums (or means) over patches of R positions along each pooled mode: L -> ceil(L/R)."""
        counts = None
        for mode in cls.pooled_modes(t.dim()):
            length = t.shape[mode]
            n = math.ceil(length / radius)
            pad = [0, 0] * (t.dim() - 1 - mode) + [0, n * radius - length]
            t = F.pad(t, pad).reshape(t.shape[:mode] + (n, radius) + t.shape[mode + 1:]).sum(mode + 1)
            if mean:
                c = torch.full((n,), float(radius), dtype=t.dtype, device=t.device)
                c[-1] = length - radius * (n - 1)
                c = c.reshape((n,) + (1,) * (t.dim() - 1 - mode))
                counts = c if counts is None else counts * c
        return t / counts if mean else t

    def filter_input(self, x, radius):
        return self._pool(x, radius, mean=False)

    def filter_grad(self, grad_out, radius):
        g_bar = self._pool(grad_out, radius, mean=True)
        g_tilde = g_bar
        for mode in self.pooled_modes(grad_out.dim()):
            g_tilde = g_tilde.repeat_interleave(radius, mode).narrow(mode, 0, grad_out.shape[mode])
        return g_bar, g_tilde

    @staticmethod
    def filter_weight_grad(x_bar, g_bar, weight_shape):
        return g_bar.reshape(-1, g_bar.shape[-1]).t() @ x_bar.reshape(-1, x_bar.shape[-1])

    @classmethod
    def filtered_elements(cls, input_shape, radius):
        shape = list(input_shape)
        for mode in cls.pooled_modes(len(shape)):
            shape[mode] = math.ceil(shape[mode] / radius)
        return math.prod(shape)
