"""Conv2d geometry for the training ops: forward, exact input gradient, low-rank weight gradient and
the gradient-filtering pieces, behind one small interface that linear.py mirrors for nn.Linear.

Padding is normalised once: symmetric zero padding is passed to the convolution; asymmetric padding
('same' with an even effective kernel) and non-zero padding modes (reflect, replicate, circular) are
applied with F.pad *outside* the custom autograd Function, so the Function always sees a zero-padded
conv and autograd differentiates the pad exactly (F.pad saves no activation).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from .lowrank import conv2d_weight_grad

__all__ = ["ConvOps"]


class ConvOps:
    ndim = 4
    mode_names = ("B", "C", "H", "W")

    def __init__(self, conv: torch.nn.Conv2d):
        self.stride = tuple(conv.stride)
        self.dilation = tuple(conv.dilation)
        self.groups = conv.groups
        kh, kw = self.kernel_size = tuple(conv.kernel_size)
        if isinstance(conv.padding, str):
            if conv.padding == "valid":
                pads = ((0, 0), (0, 0))
            else:  # 'same' (stride 1 is enforced by nn.Conv2d)
                pads = []
                for d, k in zip(self.dilation, (kh, kw)):
                    total = d * (k - 1)
                    pads.append((total // 2, total - total // 2))
                pads = tuple(pads)
        else:
            pads = tuple((p, p) for p in conv.padding)
        symmetric = all(a == b for a, b in pads)
        if conv.padding_mode == "zeros" and symmetric:
            self.prepad = None
            self.padding = (pads[0][0], pads[1][0])
        else:
            (top, bottom), (left, right) = pads
            self.prepad = (left, right, top, bottom)
            self.pad_mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            self.padding = (0, 0)

    # -- forward / exact gradients -------------------------------------------------------------
    def prepare(self, x):
        """Padding that the Function does not see (differentiated by autograd, saves nothing)."""
        if self.prepad is None:
            return x
        return F.pad(x, self.prepad, mode=self.pad_mode)

    def forward(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def input_grad(self, grad_out, weight, input_shape):
        return conv2d_input(input_shape, weight, grad_out, self.stride, self.padding, self.dilation, self.groups)

    def weight_grad_exact(self, x, grad_out, weight_shape):
        return conv2d_weight(x, weight_shape, grad_out, self.stride, self.padding, self.dilation, self.groups)

    def weight_grad(self, core, factors, grad_out, weight_shape):
        return conv2d_weight_grad(core, factors, grad_out, weight_shape, self.stride, self.padding,
                                  self.dilation, self.groups)

    @staticmethod
    def bias_grad(grad_out):
        return grad_out.sum((0, 2, 3))

    # -- gradient filtering (Yang et al. 2023) ---------------------------------------------------
    # Output positions are grouped into R x R patches (a ceil(H'/R) x ceil(W'/R) grid). The output
    # gradient is replaced by its patch mean ḡ (g̃ = ḡ broadcast back over each patch). The weight
    # gradient of every kernel tap is approximated by the kernel-centre tap: the input is kept as
    # x̄[b, c, p] = Σ_{(h', w') ∈ patch p} x_pad[b, c, s·h' + d·⌊(k-1)/2⌋, s·w' + d·⌊(k-1)/2⌋]
    # (the patch-summed input), and dW[o, c, :, :] = Σ_{b, p} ḡ[b, o, p] · x̄[b, g(o)·C_g + c, p].
    # The input gradient is the exact conv input gradient of g̃.
    def _centre_samples(self, x, out_hw):
        if self.padding != (0, 0):
            x = F.pad(x, (self.padding[1], self.padding[1], self.padding[0], self.padding[0]))
        (sh, sw), (dh, dw) = self.stride, self.dilation
        kh, kw = self.kernel_size
        ch, cw = dh * ((kh - 1) // 2), dw * ((kw - 1) // 2)
        h, w = out_hw
        return x[:, :, ch: ch + sh * (h - 1) + 1: sh, cw: cw + sw * (w - 1) + 1: sw]

    def output_hw(self, input_hw):
        out = []
        for size, p, d, k, s in zip(input_hw, self.padding, self.dilation, self.kernel_size, self.stride):
            out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return tuple(out)

    def filter_input(self, x, radius):
        centre = self._centre_samples(x, self.output_hw(x.shape[-2:]))
        return F.avg_pool2d(centre, radius, radius, ceil_mode=True, divisor_override=1)

    @staticmethod
    def filter_grad(grad_out, radius):
        g_bar = F.avg_pool2d(grad_out, radius, radius, ceil_mode=True)
        h, w = grad_out.shape[-2:]
        g_tilde = g_bar.repeat_interleave(radius, 2).repeat_interleave(radius, 3)[:, :, :h, :w]
        return g_bar, g_tilde

    def filter_weight_grad(self, x_bar, g_bar, weight_shape):
        c_out, c_per_group, kh, kw = weight_shape
        g = self.groups
        b = x_bar.shape[0]
        xg = x_bar.reshape(b, g, c_per_group, -1)
        gg = g_bar.reshape(b, g, c_out // g, -1)
        dw = torch.einsum("bgop,bgcp->goc", gg, xg).reshape(c_out, c_per_group, 1, 1)
        return dw.expand(weight_shape).contiguous()

    def filtered_elements(self, input_shape, radius):
        h, w = self.output_hw(input_shape[-2:])
        return input_shape[0] * input_shape[1] * math.ceil(h / radius) * math.ceil(w / radius)

    # -- gradient filtering as the paper's code runs it ------------------------------------------
    # The authors' op (their classification/custom_op/conv2d/conv_avg.py, a copy of Yang et al.'s)
    # differs from the filter above in three ways, reproduced here for ``gradfilter_paper``:
    # 1. Patches are *centred*: the output grid is padded by ceil((P·R − H')/2) before being cut into
    #    P = ceil(H'/R) patches of R (on 7×7 with R = 2 the patches are rows {−1,0}, {1,2}, {3,4},
    #    {5,6}, ours {0,1}, ..., {6}); ḡ is the mean over the valid entries of each patch.
    # 2. The input is kept as the sum over the whole (R·s)×(R·s) *input* patch (zero-padded by
    #    ceil((P·R·s − H)/2) on each side), not over the kernel-centre samples: for stride s > 1 it
    #    sums s² times more samples.
    # 3. The input gradient is not the conv's: with W̄ = Σ_taps W (C' × C/g), each input pixel gets
    #    Σ_o W̄[o, c] ḡ[b, o, p] of the input patch p it falls in.
    # The weight gradient is Σ_{b,p} ḡ[b, o, p] x̄[b, c, p] on every kernel tap (filter_weight_grad).
    # Their op handles groups = 1 and depthwise convs; for other groups we apply the same rule per group.
    def paper_patch_geometry(self, input_hw, radius):
        """(patches per dim, input patch size per dim, input padding per dim, output-gradient padding
        per dim) of the paper's gradient filter, or ValueError when their pooling cannot be formed."""
        out_hw = self.output_hw(input_hw)
        patches = tuple(math.ceil(h / radius) for h in out_hw)
        size = tuple(radius * s for s in self.stride)
        x_pad = tuple(math.ceil((p * k - n) / 2) for p, k, n in zip(patches, size, input_hw))
        g_pad = tuple(math.ceil((p * radius - h) / 2) for p, h in zip(patches, out_hw))
        if any(d > 1 and d >= radius for d in self.dilation):
            raise ValueError(f"gradfilter_paper: dilation {self.dilation} >= radius {radius} is handled by a "
                             f"different op in the authors' code (Conv2dDilatedOp), not reproduced here; "
                             f"use --model.method gradfilter")
        if any(not 0 <= p <= k // 2 for p, k in zip(x_pad, size)):
            raise ValueError(f"gradfilter_paper: a {tuple(input_hw)} input with output {out_hw} cannot be cut into "
                             f"{patches} centred input patches of {size} (padding {x_pad}); "
                             f"use --model.method gradfilter for this layer")
        pooled = tuple((n + 2 * p - k) // k + 1 for n, p, k in zip(input_hw, x_pad, size))
        if pooled != patches:
            raise ValueError(f"gradfilter_paper: a {tuple(input_hw)} input pools to {pooled} input patches but its "
                             f"output {out_hw} to {patches} gradient patches (the authors' op fails here too); "
                             f"use --model.method gradfilter for this layer")
        return patches, size, x_pad, g_pad

    def paper_filter_input(self, x, radius):
        patches, size, x_pad, _ = self.paper_patch_geometry(tuple(x.shape[-2:]), radius)
        return F.avg_pool2d(x, size, size, padding=x_pad, divisor_override=1)

    @staticmethod
    def paper_filter_grad(grad_out, radius, g_pad):
        return F.avg_pool2d(grad_out, radius, radius, padding=g_pad, count_include_pad=False)

    def paper_filter_input_grad(self, g_bar, weight, input_shape, radius):
        _, size, x_pad, _ = self.paper_patch_geometry(tuple(input_shape[-2:]), radius)
        c_out, c_per_group = weight.shape[:2]
        g = self.groups
        b, _, ph, pw = g_bar.shape
        w_sum = weight.sum((2, 3)).reshape(g, c_out // g, c_per_group)
        gx_sum = torch.einsum("bgop,goc->bgcp", g_bar.reshape(b, g, c_out // g, ph * pw), w_sum)
        gx_sum = gx_sum.reshape(b, g * c_per_group, ph, pw)
        gx = gx_sum.repeat_interleave(size[0], 2).repeat_interleave(size[1], 3)
        h, w = input_shape[-2:]
        return gx[:, :, x_pad[0]: x_pad[0] + h, x_pad[1]: x_pad[1] + w]
