"""Wrapper layers. A wrapper *is* an nn.Conv2d / nn.Linear (subclass) holding the original layer's
weight and bias Parameter objects under the same names, so optimizers, state_dict keys and
``isinstance`` checks are unchanged; its ``method`` submodule decides what is kept for backward.
In eval mode, under torch.no_grad, or when the weight is frozen, it runs exactly the plain layer.
"""
from __future__ import annotations

import torch
from torch import nn

from .conv import ConvOps
from .linear import LinearOps
from .methods import Method

__all__ = ["CompressedConv2d", "CompressedLinear", "CompressedLayer"]

_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
               "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice")


class CompressedLayer:
    """Mixin with what both wrappers share."""

    method: Method
    layer_name: str
    last_stats: dict | None

    def _adopt(self, base: nn.Module, attrs, method: Method, name: str):
        nn.Module.__init__(self)
        for attr in attrs:
            setattr(self, attr, getattr(base, attr))
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.method = method
        self.layer_name = name
        self._base = [base]  # the original module, unregistered (its parameters are ours)
        self.last_stats = None

    def to_plain(self) -> nn.Module:
        """The original module, carrying the (trained) weight and bias Parameters."""
        base = self._base[0]
        base.weight = self.weight
        base.register_parameter("bias", self.bias)
        base.train(self.training)
        return base

    @property
    def method_name(self) -> str:
        return self.method.name

    @property
    def options(self) -> dict:
        return self.method.options()

    def _compressing(self) -> bool:
        return self.training and torch.is_grad_enabled() and self.weight.requires_grad

    def forward(self, x):
        if not self._compressing():
            return self.plain_forward(x)
        return self._train_forward(x)

    # torch.compile: the method's training step runs eagerly (a graph break around each patched layer; the rest of
    # the model compiles). Its subspace iteration reads and updates the warm-start buffers, whose shapes are set by
    # the first call, and a custom autograd Function holding Python state: neither traces (a compiled first step
    # stopped at buf.copy_, inductor on the factors' shapes).
    @torch.compiler.disable
    def _train_forward(self, x):
        self.check_input(x)
        return self.method.train_forward(self, x)


class CompressedConv2d(CompressedLayer, nn.Conv2d):  # CompressedLayer first: its forward wins
    layer_type = "conv"

    def __init__(self, conv: nn.Conv2d, method: Method, name: str):
        self._adopt(conv, _CONV_ATTRS, method, name)
        self.ops = ConvOps(conv)

    def check_input(self, x):
        if x.dim() != 4:
            raise ValueError(f"layer {self.layer_name!r}: expected a 4-D (B, C, H, W) input, got shape {tuple(x.shape)}")

    def plain_forward(self, x):
        return nn.Conv2d.forward(self, x)


class CompressedLinear(CompressedLayer, nn.Linear):
    """Any input (..., D) with at least one leading mode: (N, D), (B, T, D), (B, H, W, C) (torchvision's Swin),
    ...; the method compresses every mode of the actual input (ranks are given per mode)."""

    layer_type = "linear"

    def __init__(self, linear: nn.Linear, method: Method, name: str):
        self._adopt(linear, ("in_features", "out_features"), method, name)
        self.ops = LinearOps(linear)

    def check_input(self, x):
        if x.dim() < 2:
            raise ValueError(f"layer {self.layer_name!r}: expected an input (..., {self.in_features}) with at least "
                             f"one leading mode (e.g. (N, D) or (B, T, D)), got shape {tuple(x.shape)}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"layer {self.layer_name!r}: the input's last dimension is {x.shape[-1]} but the layer "
                             f"has in_features={self.in_features} (input shape {tuple(x.shape)})")

    def plain_forward(self, x):
        return nn.Linear.forward(self, x)

