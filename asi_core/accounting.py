"""Activation memory and FLOPs of the fine-tuned layers, per method (paper eq. 5, 11, 14-17).

Pure arithmetic over explicit layer geometry: nothing here touches a tensor. Build a geometry by
hand (:class:`ConvGeometry`, :class:`LinearGeometry`) or read it from a layer after a training
forward (:func:`geometry_from_layer`), then ask :func:`layer_report` for one layer and
:func:`summarize` for a set of layers::

    geo = ConvGeometry(512, 512, 3, stride=1, padding=1, input_shape=(64, 512, 7, 7))
    rep = layer_report("asi", geo, ranks=(4, 16, 3, 3))
    summarize([rep])["activation_mib"]

Conventions
-----------
- One multiply-add is one FLOP, as in the paper (``torch.utils.flop_counter`` counts 2 per MAC).
- Memory is in MiB (2**20 bytes); an element takes ``dtype_bytes`` bytes (float32 = 4). The paper
  writes "MB" but its numbers are MiB: ResNet-18's last two convs keep 2 x 64*512*7*7 float32
  elements = 12.25 MiB, its Table 1 entry.
- Shapes: a conv input is (B, C, H, W) and its output (B, C', H', W'); a linear input is (N, D) or
  (B, T, D) (any number of leading modes). Ranks are per input mode in that order.
- Ranks are clipped as ``asi_core.decompose.clip_ranks`` does (r_m <= min(D_m, prod(D)/D_m)); a mode
  whose rank reaches D_m is *kept whole*: it stores no factor, costs no projection and its eq. 14
  term is skipped, exactly as the implementation does (factor ``None``).
- "Backward" (``backward_flops``) is the weight gradient only. The input gradient is reported
  apart (``input_grad_flops``): it is the same for every method (all methods here back-propagate
  the exact input gradient), equal to the correct forward count, and 0 for the first fine-tuned
  layer, whose input needs no gradient. Bias gradients (B*C'*H'*W' additions) are ignored, as in
  the paper.

Per method (conv; ``P`` = B * ceil(H'/R) * ceil(W'/R) pooled positions, see gradfilter below)

============ ============================ ================================ =========================
method       activation elements          weight-gradient FLOPs            overhead FLOPs (forward)
============ ============================ ================================ =========================
vanilla      B*C*H*W                      kh*kw*(C/g)*C'*B*H'*W' (eq. 16)  0
gradfilter   C*P                          C'*(C/g)*P                       B*C*H'*W' + B*C'*H'*W'
hosvd        prod r + sum D_m r_m (eq. 5) eq. 15 with groups               eq. 11 (+ core_flops)
asi          prod r + sum D_m r_m (eq. 5) eq. 15 with groups               eq. 14 (+ core_flops)
gradfilter_  C*P (input-patch sums)       C'*(C/g)*P                       B*C*H*W + B*C'*H'*W'
paper                                                                      + C'*(C/g)*(kh*kw - 1)
============ ============================ ================================ =========================

gradfilter_paper (the authors' op, asi_core/conv.py) has its own input gradient, (C/g)*C'*P MACs
(:func:`gradfilter_paper_input_grad_flops`). The paper's count of both gradient filters (``paper_*``) is the
authors' code's (:func:`paper_gradfilter_flops`), which reproduces Table 1's gradient-filter column.

Forward FLOPs (all methods): kh*kw*(C/g)*C'*B*H'*W' (eq. 17 counted on the *output* grid and
divided by the groups; :func:`paper_forward_flops` gives eq. 17 literally).

Gradient filtering (Yang et al., 2023), as ``asi_core/conv.py`` implements it: the output grid
is cut into R x R patches, ceil(H'/R) x ceil(W'/R) of them (the last row/column may be partial),
P = B * ceil(H'/R) * ceil(W'/R) pooled positions per channel. The output gradient is averaged
over each patch (g_bar); the input is kept as x_bar = the sum, over the patch's R x R output
positions, of the kernel-centre input sample of each position (so an (R*s) x (R*s) input patch
is visited with step s). With "same" padding H' = ceil(H/s) and ceil(H'/R) = ceil(H/(R*s)).
The weight gradient is the "summed-kernel" one, dW[o, c, :, :] = sum_p g_bar[o, p] x_bar[c, p]
over the channels of o's group: C'*(C/g)*P MACs, broadcast over the kh x kw taps (not counted).
Overhead = one addition per pooled element: B*C*H'*W' centre samples + B*C'*H'*W' gradient
entries (the division of the mean, C'*P, is ignored). The input gradient is the exact conv input
gradient of the broadcast g_bar: the same count as the other methods. On a Linear layer
(``asi_core/linear.py``) the rows (2-D input), tokens (3-D input, the second-to-last mode L) or the
spatial modes H, W of a (B, H, W, C) input are pooled in patches of R per pooled mode:
P = prod(other leading modes) * prod(ceil(L/R) over pooled modes), memory D*P, weight gradient
out*D*P, overhead = input + output elements.

Why our FLOPs differ from the paper's tables
--------------------------------------------
Eq. 16 (vanilla weight gradient) and eq. 17 (forward) read D^2*C*C'*B*H'*W' and D^2*C*C'*B*H*W.
Two things make them wrong for some layers, and the paper's tables use them as written:

1. **Groups are ignored.** A depthwise conv (groups = C = C') does D^2*C*B*H'*W' MACs, not
   D^2*C^2*B*H'*W': the paper's count is g times (here C times) too large. The same holds for
   the channel term of eq. 15, r2*C'*C*D^2, which is r2*C'*(C/g)*D^2.
2. **The forward uses the input size.** Eq. 17 multiplies by H*W instead of H'*W'; for a stride-s
   conv the paper's forward is s^2 times too large (for stride 1 with "same" padding the two agree).

Worked example, batch 64 at 224 x 224 (the paper's ImageNet setting; 1 FLOP = 1 multiply-add):

| layer                             | geometry                                 | eq. 17 as written | correct      |
|-----------------------------------|------------------------------------------|-------------------|--------------|
| MobileNetV2 features.17.conv.1    | 3x3 depthwise (g = 960), 960 ch, 7x7     | 26.011 GFLOPs     | 0.027 GFLOPs |
| ResNet-18 layer4.0.downsample.0   | 1x1, 256 -> 512, stride 2, 14x14 -> 7x7  | 1.644 GFLOPs      | 0.411 GFLOPs |
| ResNet-18 layer4.0.conv1          | 3x3, 256 -> 512, stride 2, 14x14 -> 7x7  | 14.798 GFLOPs     | 3.699 GFLOPs |

(960x, 4x and 4x too large.) The weight gradient of the depthwise conv is likewise 26.011
GFLOPs in eq. 16 against 0.027 correct. Adding eq. 17 + eq. 16 over the last convs reproduces
the paper's vanilla Table 1 entries to the last digit, which is how we know the tables use the
formulas as written:

- MobileNetV2, 4 layers: paper 57.48 GFLOPs; correct 5.51 GFLOPs (the depthwise conv alone is
  52.02 of the paper's 57.48, 0.05 when counted correctly). 2 layers: 4.50 for both (1x1, stride 1).
- ResNet-18, 4 layers: paper 46.45 GFLOPs; correct 45.21 GFLOPs (the strided 1x1 downsample is
  counted at 14x14 in the forward). 2 layers: 29.60 for both (3x3, stride 1, same padding).

For ASI with ranks (r1, r2, r3, r4) = (4, 16, 3, 3) on the same depthwise conv, eq. 15 as written
gives 0.172 GFLOPs, of which the channel term r2*C'*C*D^2 is 0.133; counted per group that term is
0.00014 and the total 0.039 GFLOPs. That is *more* than the correct vanilla weight gradient of
the depthwise conv (0.027): on a depthwise conv the groups=1 conv of Y with Z pairs every output
channel with every channel rank, so eq. 15 costs about (r1*r2/B + r1/D^2) x vanilla and only
pays off when r1*r2 << B - which the paper's group-blind count (0.172 vs 26.011) hides.
:func:`worked_example` recomputes every number quoted here.

Other points where we read the paper one way rather than another
----------------------------------------------------------------
- Eq. 14 (ASI overhead) counts the two products of one warm-started subspace iteration per mode,
  2*D_m*(prod D / D_m)*r_m, plus r_m^3 for the orthogonalisation. It does **not** include the core
  S = A x_1 U1^T x_2 ... x_4 U4^T, which Alg. 1 also computes; we report that as ``core_flops``
  (cheapest order of the mode products) next to ``overhead_flops``. Eq. 11 (HOSVD) likewise leaves
  the core out. Orthogonalising a D_m x r_m matrix by QR really costs about D_m*r_m^2, not r_m^3; we
  keep the paper's r_m^3 so the overhead column stays comparable with the paper.
- ``asi_core.decompose`` computes a warm step's two spatial products from one H*W x H*W Gram matrix
  when H*W <= ``SMALL_SPATIAL`` (64; faster on CPU, same result): there the real cost of both spatial
  modes is B*C*(H*W)^2 + (H^2*r_H + W^2*r_W) multiply-adds instead of eq. 14's 2*prod(D)*(r_H + r_W).
  ``overhead_flops`` stays eq. 14, the algorithm's cost; above 64 the two agree exactly (tests).
- Eq. 11 charges max(d, P_d)^2 * min(d, P_d) per mode, the cost of a full SVD with square singular
  vectors; a thin SVD of the d x P_d unfolding (what torch computes) is closer to
  max * min^2. We report eq. 11 as written, which is what the paper's HOSVD columns use: eq. 17 +
  eq. 11 over the last 2 / 4 layers gives 1578.6 / 4044.1 GFLOPs for ResNet-18 and 3049.5 / 5894.0
  for MobileNetV2, against Table 1's 1581.42 / 4048.56 and 3049.71 / 5895.31; the small rest is
  the rank-dependent eq. 15 backward.
- The paper's per-layer "GFLOPs" in its tables is forward + weight-gradient backward + overhead
  (no input gradient); :func:`summarize` reports that sum as ``paper_gflops`` (with eq. 16/17 as
  written) and our correct counterpart, with the input gradient, as ``total_gflops``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence, Union

from .decompose import clip_ranks as _clip

__all__ = [
    "ConvGeometry", "LinearGeometry", "geometry_from_layer",
    "clip_ranks", "tucker_elements", "gradfilter_positions", "activation_elements", "to_mib",
    "forward_flops", "paper_forward_flops", "input_grad_flops",
    "weight_grad_flops", "paper_weight_grad_flops", "lowrank_conv_weight_grad_flops",
    "lowrank_linear_weight_grad_flops",
    "hosvd_overhead_flops", "asi_overhead_flops", "gradfilter_overhead_flops", "overhead_flops",
    "gradfilter_paper_overhead_flops", "gradfilter_paper_input_grad_flops", "paper_gradfilter_flops",
    "core_flops", "layer_report", "report_from_layer", "summarize", "worked_example",
    "PAPER_COUNTS", "paper_flops", "authors_linear_flops",
]

# The formulas below are kept per accounting kind; each registered method says which kind counts it
# (``Method.accounting``: vanilla "input", gradfilter, gradfilter_paper, hosvd, asi), so a method registered with
# ``@asi_core.register_method`` is accounted for without a line here naming it.
KINDS = ("input", "gradfilter", "hosvd", "asi", "gradfilter_paper")
GRADFILTERS = ("gradfilter", "gradfilter_paper")
MIB = 2 ** 20
GIGA = 1e9

RanksLike = Union[int, Sequence[Optional[int]], None]


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(x) for x in v)
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v!r}")
    return t


@dataclass(frozen=True)
class ConvGeometry:
    """Everything the counts need about one Conv2d call. ``kernel_size``/``stride``/``padding``/
    ``dilation`` take an int or a pair; ``padding`` also "same"/"valid" as in nn.Conv2d.
    ``output_shape`` is computed from the others when omitted."""
    in_channels: int
    out_channels: int
    kernel_size: Union[int, tuple[int, int]]
    stride: Union[int, tuple[int, int]] = 1
    padding: Union[int, tuple[int, int], str] = 0
    dilation: Union[int, tuple[int, int]] = 1
    groups: int = 1
    input_shape: Optional[tuple[int, int, int, int]] = None
    output_shape: Optional[tuple[int, int, int, int]] = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("kernel_size", _pair(self.kernel_size, "kernel_size"))
        set_("stride", _pair(self.stride, "stride"))
        set_("dilation", _pair(self.dilation, "dilation"))
        pad = self.padding
        if isinstance(pad, str):
            if pad not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {pad!r}")
            pad = (0, 0) if pad == "valid" else pad
        else:
            pad = _pair(pad, "padding")
        set_("padding", pad)
        if self.input_shape is None or len(self.input_shape) != 4:
            raise ValueError(f"ConvGeometry needs input_shape (B, C, H, W), got {self.input_shape!r}")
        set_("input_shape", tuple(int(d) for d in self.input_shape))
        B, C, H, W = self.input_shape
        if C != self.in_channels:
            raise ValueError(f"input_shape {self.input_shape} has {C} channels but "
                             f"in_channels={self.in_channels}")
        if self.groups < 1 or self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"groups={self.groups} must divide in_channels={self.in_channels} "
                             f"and out_channels={self.out_channels}")
        if self.output_shape is None:
            set_("output_shape", (B, self.out_channels) + self._out_hw(H, W))
        else:
            set_("output_shape", tuple(int(d) for d in self.output_shape))
        if len(self.output_shape) != 4 or self.output_shape[:2] != (B, self.out_channels):
            raise ValueError(f"output_shape {self.output_shape} does not match batch {B} and "
                             f"out_channels={self.out_channels}")

    def _out_hw(self, H: int, W: int) -> tuple[int, int]:
        if self.padding == "same":
            return (H, W)
        return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                     zip((H, W), self.padding, self.dilation, self.kernel_size, self.stride))

    @property
    def batch(self) -> int:
        return self.input_shape[0]

    @property
    def channels_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def kernel_area(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]


@dataclass(frozen=True)
class LinearGeometry:
    """One nn.Linear call on an input of shape (N, D), (B, T, D) or more leading modes."""
    in_features: int
    out_features: int
    input_shape: tuple[int, ...] = field(default=())
    output_shape: Optional[tuple[int, ...]] = None

    def __post_init__(self):
        shape = tuple(int(d) for d in self.input_shape)
        if len(shape) < 2 or shape[-1] != self.in_features:
            raise ValueError(f"LinearGeometry needs input_shape (..., {self.in_features}) with at least "
                             f"one leading mode, got {self.input_shape!r}")
        object.__setattr__(self, "input_shape", shape)
        out = shape[:-1] + (self.out_features,)
        if self.output_shape is not None and tuple(self.output_shape) != out:
            raise ValueError(f"output_shape {self.output_shape} should be {out}")
        object.__setattr__(self, "output_shape", out)

    @property
    def tokens(self) -> int:
        return math.prod(self.input_shape[:-1])


Geometry = Union[ConvGeometry, LinearGeometry]


def geometry_from_layer(layer, input_shape=None, output_shape=None) -> Geometry:
    """Geometry of a patched wrapper (``asi_core.layers.CompressedConv2d``/``CompressedLinear``) or
    of any object with the same attributes (a plain nn.Conv2d / nn.Linear works). Shapes come from
    the arguments when given, else from ``layer.last_stats`` (set by a training forward)."""
    stats = getattr(layer, "last_stats", None) or {}
    input_shape = input_shape if input_shape is not None else stats.get("input_shape")
    output_shape = output_shape if output_shape is not None else stats.get("output_shape")
    kind = type(layer).__name__
    if input_shape is None:
        raise ValueError(f"{kind} has no last_stats yet: run one training forward through it, "
                         f"or pass input_shape=")
    if hasattr(layer, "in_channels"):
        return ConvGeometry(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                            layer.padding, layer.dilation, layer.groups, tuple(input_shape),
                            None if output_shape is None else tuple(output_shape))
    if hasattr(layer, "in_features"):
        return LinearGeometry(layer.in_features, layer.out_features, tuple(input_shape),
                              None if output_shape is None else tuple(output_shape))
    raise ValueError(f"{kind} is neither conv-like (in_channels, out_channels, kernel_size, ...) nor "
                     f"linear-like (in_features, out_features)")


# --------------------------------------------------------------------------------------------
# Memory

def clip_ranks(dims: Sequence[int], ranks: RanksLike) -> tuple[int, ...]:
    """Ranks actually used for a tensor of shape ``dims``: an int applies to every mode, None
    keeps a mode whole, and each rank is clipped as ``asi_core.decompose.clip_ranks`` clips it
    (to min(D_m, prod(D)/D_m), what the mode-m unfolding can hold)."""
    if ranks is None:
        raise ValueError("ranks are required for hosvd/asi (e.g. wrapper.last_stats['ranks'])")
    if isinstance(ranks, int):
        ranks = (ranks,) * len(dims)
    ranks = tuple(ranks)
    if len(ranks) != len(dims):
        raise ValueError(f"{len(ranks)} ranks given for a {len(dims)}-mode input of shape {tuple(dims)}")
    if any(r is not None and int(r) < 1 for r in ranks):
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    return _clip(dims, [d if r is None else int(r) for r, d in zip(ranks, dims)])


def _whole(dims, ranks) -> list[bool]:
    return [r >= d for r, d in zip(ranks, dims)]


def tucker_elements(dims: Sequence[int], ranks: RanksLike, count_whole_modes: bool = False) -> int:
    """Eq. 5: core prod(r_m) + factors sum(D_m * r_m). A mode kept whole (r_m = D_m) stores no factor,
    unless ``count_whole_modes`` (eq. 5 read literally)."""
    r = clip_ranks(dims, ranks)
    return math.prod(r) + sum(d * rm for d, rm, w in zip(dims, r, _whole(dims, r))
                              if count_whole_modes or not w)


def gradfilter_positions(geometry: Geometry, radius: int) -> int:
    """Pooled positions per channel: B*ceil(H'/R)*ceil(W'/R) for a conv (R x R output patches);
    for a Linear input (..., D) the leading modes with the pooled ones (``LinearOps.pooled_modes``: L of
    (N or B, L, D), H and W of (B, H, W, C)) divided by R and rounded up (see the module docstring)."""
    if radius is None or isinstance(radius, bool) or int(radius) < 1:
        raise ValueError(f"gradfilter needs an integer radius >= 1, got {radius!r}")
    if isinstance(geometry, LinearGeometry):
        from .linear import LinearOps
        return LinearOps.filtered_elements(geometry.input_shape, int(radius)) // geometry.in_features
    B, _, Hp, Wp = geometry.output_shape
    return B * math.ceil(Hp / radius) * math.ceil(Wp / radius)


def _channels(geometry: Geometry) -> tuple[int, int, int]:
    """(C, C', C/g); a Linear is (D, out, D)."""
    if isinstance(geometry, LinearGeometry):
        return geometry.in_features, geometry.out_features, geometry.in_features
    return geometry.in_channels, geometry.out_channels, geometry.channels_per_group


def activation_elements(method: str, geometry: Geometry, ranks: RanksLike = None,
                        radius: Optional[int] = None) -> int:
    """Elements a fine-tuned layer keeps for its weight gradient (vanilla: the input; gradfilter:
    C*P pooled positions; hosvd/asi: eq. 5)."""
    kind = _check_method(method)
    dims = geometry.input_shape
    if kind == "input":
        return math.prod(dims)
    if kind in GRADFILTERS:  # gradfilter_paper: B*C*P input-patch sums (same P)
        return _channels(geometry)[0] * gradfilter_positions(geometry, radius)
    return tucker_elements(dims, ranks)


def to_mib(elements: int, dtype_bytes: int = 4) -> float:
    return elements * dtype_bytes / MIB


# --------------------------------------------------------------------------------------------
# FLOPs (one multiply-add = one FLOP)

def forward_flops(geometry: Geometry) -> int:
    """Correct forward MACs: kh*kw*(C/g)*C'*B*H'*W' (conv), N*D*out (linear)."""
    if isinstance(geometry, LinearGeometry):
        return geometry.tokens * geometry.in_features * geometry.out_features
    B, _, Hp, Wp = geometry.output_shape
    return geometry.kernel_area * geometry.channels_per_group * geometry.out_channels * B * Hp * Wp


def paper_forward_flops(geometry: Geometry) -> int:
    """Eq. 17 as written: D^2*C*C'*B*H*W (input size, groups ignored). Same as ours for Linear."""
    if isinstance(geometry, LinearGeometry):
        return forward_flops(geometry)
    B, C, H, W = geometry.input_shape
    return geometry.kernel_area * C * geometry.out_channels * B * H * W


def input_grad_flops(geometry: Geometry, input_requires_grad: bool = True) -> int:
    """MACs of the input gradient (transposed conv / G @ W): equal to the correct forward count,
    0 when the layer's input needs no gradient (the first fine-tuned layer)."""
    return forward_flops(geometry) if input_requires_grad else 0


def lowrank_conv_weight_grad_flops(geometry: ConvGeometry, ranks: RanksLike) -> int:
    """Eq. 15 with groups, in the order ``asi_core.lowrank.conv2d_weight_grad`` computes it:
    Z = G x_B U_B^T [r1*B*C'*H'*W'], Y = S x_H U_H x_W U_W [r1 r2 r3 r4*H + r1 r2 r4*H*W], a
    groups=1 weight-gradient conv of Y with Z [r1*r2*C'*H'*W'*kh*kw], then per group the channel
    factor [r2*C'*(C/g)*kh*kw]. A whole mode skips its product; a whole channel mode uses the
    grouped conv directly [r1*(C/g)*C'*H'*W'*kh*kw]."""
    dims = geometry.input_shape
    B, C, H, W = dims
    _, Cp, Hp, Wp = geometry.output_shape
    r1, r2, r3, r4 = r = clip_ranks(dims, ranks)
    wB, wC, wH, wW = _whole(dims, r)
    k = geometry.kernel_area
    flops = 0 if wB else r1 * B * Cp * Hp * Wp
    flops += 0 if wH else r1 * r2 * r3 * r4 * H
    flops += 0 if wW else r1 * r2 * r4 * H * W
    if wC:
        return flops + r1 * geometry.channels_per_group * Cp * Hp * Wp * k
    return flops + r1 * r2 * Cp * Hp * Wp * k + r2 * Cp * geometry.channels_per_group * k


def lowrank_linear_weight_grad_flops(geometry: LinearGeometry, ranks: RanksLike) -> int:
    """Linear analogue of eq. 15, in the order ``asi_core.lowrank.linear_weight_grad`` uses: project
    G on each leading factor in turn [size(Z)*r_m each], contract with the core
    [out*prod(r_leading)*r_D], expand the feature mode [out*r_D*D]. For (N, D): r1*N*out +
    out*r1*r2 + out*r2*D."""
    dims = geometry.input_shape
    r = clip_ranks(dims, ranks)
    whole = _whole(dims, r)
    out = geometry.out_features
    z = list(dims[:-1]) + [out]
    flops = 0
    for m in range(len(dims) - 1):
        if not whole[m]:
            flops += math.prod(z) * r[m]
            z[m] = r[m]
    flops += out * math.prod(r[:-1]) * r[-1]
    if not whole[-1]:
        flops += out * r[-1] * dims[-1]
    return flops


def weight_grad_flops(method: str, geometry: Geometry, ranks: RanksLike = None,
                      radius: Optional[int] = None) -> int:
    """Weight-gradient MACs of one training step (bias gradient ignored)."""
    kind = _check_method(method)
    if kind == "input":
        return forward_flops(geometry)  # eq. 16 with groups: same MACs as the forward
    if kind in GRADFILTERS:
        _, c_out, c_group = _channels(geometry)
        return c_out * c_group * gradfilter_positions(geometry, radius)
    if isinstance(geometry, LinearGeometry):
        return lowrank_linear_weight_grad_flops(geometry, ranks)
    return lowrank_conv_weight_grad_flops(geometry, ranks)


def paper_weight_grad_flops(method: str, geometry: Geometry, ranks: RanksLike = None,
                            radius: Optional[int] = None) -> int:
    """The paper's counts as written (groups ignored): vanilla eq. 16 D^2*C*C'*B*H'*W'; hosvd/asi
    eq. 15 with all five terms; gradfilter and gradfilter_paper: the authors' code's count (see
    :func:`paper_gradfilter_flops`; the paper gives no formula). For Linear
    there is nothing to ignore: same as :func:`weight_grad_flops`."""
    kind = _check_method(method)
    if isinstance(geometry, LinearGeometry):
        return weight_grad_flops(method, geometry, ranks, radius)
    B, C, H, W = geometry.input_shape
    _, Cp, Hp, Wp = geometry.output_shape
    k = geometry.kernel_area
    if kind == "input":
        return k * C * Cp * B * Hp * Wp
    if kind in GRADFILTERS:
        return paper_gradfilter_flops(geometry, radius)["backward"]
    r1, r2, r3, r4 = clip_ranks(geometry.input_shape, ranks)
    return (r1 * B * Cp * Hp * Wp + r1 * r2 * r3 * r4 * H + r1 * r2 * r4 * H * W
            + r1 * r2 * Cp * Hp * Wp * k + r2 * Cp * C * k)


def hosvd_overhead_flops(dims: Sequence[int]) -> int:
    """Eq. 11: sum over modes of max(d, P_d)^2 * min(d, P_d), P_d = prod(D)/d. Excludes the core."""
    total = math.prod(dims)
    return sum(max(d, total // d) ** 2 * min(d, total // d) for d in dims)


def asi_overhead_flops(dims: Sequence[int], ranks: RanksLike) -> int:
    """Eq. 14: sum over compressed modes of 2*d*d'*r_m + r_m^3 (d' = prod(D)/d; one warm-started
    subspace iteration: V = A_(m)^T U_prev and A_(m) V, plus r^3 for the orthogonalisation).
    Excludes the core (see :func:`core_flops`); modes kept whole are skipped."""
    r = clip_ranks(dims, ranks)
    total = math.prod(dims)
    return sum(2 * total * rm + rm ** 3 for rm, w in zip(r, _whole(dims, r)) if not w)


def gradfilter_overhead_flops(geometry: Geometry) -> int:
    """Pooling additions: one per summed input sample (conv: B*C*H'*W' kernel-centre samples;
    Linear: every input element) + one per output-gradient element (B*C'*H'*W')."""
    if isinstance(geometry, LinearGeometry):
        return math.prod(geometry.input_shape) + math.prod(geometry.output_shape)
    B, C, _, _ = geometry.input_shape
    return B * C * math.prod(geometry.output_shape[2:]) + math.prod(geometry.output_shape)


def gradfilter_paper_overhead_flops(geometry: Geometry) -> int:
    """gradfilter_paper, counted correctly: one addition per input element for the (R*s)^2 input-patch
    sums (B*C*H*W), one per output-gradient element for the patch means (B*C'*H'*W'), and the
    summed kernel W_bar = sum over taps (C'*(C/g)*(kh*kw - 1))."""
    B, C, H, W = geometry.input_shape
    return B * C * H * W + math.prod(geometry.output_shape) + (
        geometry.out_channels * geometry.channels_per_group * (geometry.kernel_area - 1))


def gradfilter_paper_input_grad_flops(geometry: Geometry, radius: int, input_requires_grad: bool = True) -> int:
    """gradfilter_paper's input gradient: W_bar^T g_bar per pooled position, (C/g)*C'*P MACs (the broadcast over
    each input patch is free); 0 when the input needs no gradient."""
    if not input_requires_grad:
        return 0
    return geometry.channels_per_group * geometry.out_channels * gradfilter_positions(geometry, radius)


def paper_gradfilter_flops(geometry: Geometry, radius: int) -> dict:
    """The authors' code's FLOPs for one gradient-filtered conv (their ``get_activation_size``; the paper
    prints no formula), with H, W the input and H', W' the output size, K = kh*kw:

    - forward: eq. 17 as written, K*C*C'*B*H*W, plus the pooling overhead (H/R)*(W/R)*(R^2-1)*C*B;
    - backward: B*C'*(H'/R)*(W'/R) (filtering the gradient) + C'*C*(K-1) (summing the kernel)
      + B*C'*(H'/R)*(W'/R) (scalar products) + K*C*C'*B*H*W (a full vanilla-size "Frobenius" term).

    The divisions are exact (H/R need not be whole); the totals are rounded to an integer here.
    Returns {"forward", "overhead", "backward"}: "overhead" is the pooling term, "forward" eq. 17.
    This is how Table 1's gradient-filter GFLOPs arise (tests reproduce MCUNet and ResNet-18)."""
    gradfilter_positions(geometry, radius)  # validates the radius
    B, C, H, W = geometry.input_shape
    _, Cp, Hp, Wp = geometry.output_shape
    K, R = geometry.kernel_area, radius
    overhead = (H * W * (R * R - 1) * C * B) / (R * R)
    backward = 2 * B * Cp * Hp * Wp / (R * R) + Cp * C * (K - 1) + K * C * Cp * B * H * W
    return {"forward": paper_forward_flops(geometry), "overhead": round(overhead), "backward": round(backward)}


def core_flops(dims: Sequence[int], ranks: RanksLike) -> int:
    """MACs of the core S = A x_1 U1^T x_2 U2^T ... over the compressed modes, in the cheapest order.
    Neither eq. 11 nor eq. 14 includes it. Each product costs size(current tensor) * r_m; swapping
    two adjacent products a, b changes the cost by the sign of (1/D_a - 1/r_a) - (1/D_b - 1/r_b),
    so sorting the modes by 1/D_m - 1/r_m gives the optimum (tests check it against every order)."""
    r = clip_ranks(dims, ranks)
    modes = sorted((m for m, w in enumerate(_whole(dims, r)) if not w),
                   key=lambda m: 1 / dims[m] - 1 / r[m])
    shape, cost = list(dims), 0
    for m in modes:
        cost += math.prod(shape) * r[m]
        shape[m] = r[m]
    return cost


def overhead_flops(method: str, geometry: Geometry, ranks: RanksLike = None,
                   radius: Optional[int] = None) -> int:
    """Compression overhead of the forward pass, the paper's formula (eq. 11 / eq. 14; core excluded)."""
    kind = _check_method(method)
    if kind == "input":
        return 0
    if kind == "gradfilter":
        return gradfilter_overhead_flops(geometry)
    if kind == "gradfilter_paper":
        return gradfilter_paper_overhead_flops(geometry)
    if kind == "hosvd":
        return hosvd_overhead_flops(geometry.input_shape)
    return asi_overhead_flops(geometry.input_shape, ranks)


def _check_method(method: str) -> str:
    """The accounting kind of a registered method (``Method.accounting``); ValueError for an unknown name."""
    from .methods import METHODS

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {tuple(METHODS)}")
    kind = METHODS[method].accounting
    if kind not in KINDS:
        raise ValueError(f"method {method!r} declares accounting {kind!r}; the formulas here are for {KINDS}")
    return kind


# --------------------------------------------------------------------------------------------
# The paper's count: its equations (Tables 1-3's CNNs), or its authors' code for linear layers (Tables 2 and 4)

# How ``paper_gflops`` is counted for a model (``ModelSpec.paper_flops``): "equations" = eq. 11-17 as written, one
# multiply-add one FLOP (Tables 1-3); "authors_linear" / "authors_llm" = the authors' code for the linear layers of
# Swin-T/ViT (model_linear.py) / TinyLlama (model_llm.py), :func:`authors_linear_flops`.
PAPER_COUNTS = ("equations", "authors_linear", "authors_llm")


def _svd_flops(a: int, b: int) -> int:
    """The authors' cost of a thin SVD of an a x b unfolding (their util.calculate_flops_SVD): max * min^2."""
    return max(a, b) * min(a, b) ** 2


def authors_linear_flops(method: str, geometry: LinearGeometry, ranks: RanksLike = None, llm: bool = False) -> dict:
    """One fine-tuned linear layer as the authors' code counts it (their ``get_activation_size``; the einsums of
    custom_op/linear/linear_ASI.py), in their units: the forward matmul in FLOPs, tokens*out*(2*in - 1); vanilla's
    weight gradient in FLOPs, out*in*(2*tokens - 1); ASI's subspace iteration as eq. 14, sum over modes of
    2*size*r + r^3; ASI's weight gradient as the multiply-adds of its contractions, in their order:

    - (B, N, I) inputs (ViT; TinyLlama with ``llm``): B*N*O*K1 + K1*K2*K3*N + K1*K3*I*N + I*O*N*K1;
    - (B, H, W, C) inputs (Swin-T): B*K1*H*W*C' + H*K1*K2*K3*K4 + W*K1*H*K3*C' + C*K1*H*K3*K4 + K1*H*K3*C*C'.

    Two quirks of model_llm.py, kept because Table 4 was computed with them: ASI's forward matmul is written
    B*I*O*(2*N - 1) (token count and input width swapped), and its K1*K3*I*N term is charged twice. HOSVD: the SVD
    of every unfolding (:func:`_svd_flops`) and the "hosvd_neurips" contraction order of model_linear.py (3-D: the
    ASI terms, its forward swapped as well); the authors count no HOSVD for TinyLlama, the same formula is used.
    Not counted, as there: the input gradient, the bias, the Tucker core. Returns {"forward", "overhead",
    "backward"}. Only vanilla, ASI and HOSVD on 3- and 4-mode inputs (:func:`paper_flops` counts the rest by the
    equations)."""
    kind = _check_method(method)
    dims = tuple(geometry.input_shape)
    if not _authors_count(kind, geometry):
        raise ValueError(f"the authors' code counts vanilla, asi and hosvd on (B, N, I) or (B, H, W, C) inputs, not "
                         f"{method} on {dims}: use paper_flops")
    O, I = geometry.out_features, geometry.in_features
    tokens = geometry.tokens
    dense = tokens * O * (2 * I - 1)
    if kind == "input":
        return {"forward": dense, "overhead": 0, "backward": O * I * (2 * tokens - 1)}
    K = clip_ranks(dims, ranks)
    size = math.prod(dims)
    if kind == "asi":
        overhead = sum(2 * size * k + k ** 3 for k in K)
    else:
        overhead = sum(_svd_flops(d, size // d) for d in dims)
    if len(dims) == 3:
        B, N, _ = dims
        K1, K2, K3 = K
        swapped = B * I * O * (2 * N - 1)
        forward = swapped if (llm or kind == "hosvd") else dense
        backward = B * N * O * K1 + K1 * K2 * K3 * N + K1 * K3 * I * N + I * O * N * K1
        if llm and kind == "asi":
            backward += K1 * K3 * I * N  # charged twice in model_llm.py
        return {"forward": forward, "overhead": overhead, "backward": backward}
    B, H, W, C = dims
    K1, K2, K3, K4 = K
    if kind == "asi":
        backward = (B * K1 * H * W * O + H * K1 * K2 * K3 * K4 + W * K1 * H * K3 * O + C * K1 * H * K3 * K4
                    + K1 * H * K3 * C * O)
    else:
        backward = (B * H * K3 * O * W + K1 * H * K3 * K4 * K2 + B * H * K3 * K4 * K1 + B * H * K3 * C * K4
                    + B * H * C * O * K3)
    return {"forward": dense, "overhead": overhead, "backward": backward}


def _authors_count(kind: str, geometry: Geometry) -> bool:
    return (isinstance(geometry, LinearGeometry) and len(geometry.input_shape) in (3, 4)
            and kind in ("input", "asi", "hosvd"))


def paper_flops(method: str, geometry: Geometry, ranks: RanksLike = None, radius: Optional[int] = None,
                count: str = "equations") -> dict:
    """The paper's FLOPs of one layer, {"forward", "overhead", "backward"}, counted as ``count`` says
    (:data:`PAPER_COUNTS`): the equations (eq. 17, eq. 15/16, eq. 11/14; the gradient filters as the authors'
    code), or for linear layers the authors' code (:func:`authors_linear_flops`)."""
    if count not in PAPER_COUNTS:
        raise ValueError(f"unknown paper FLOPs count {count!r}; valid: {PAPER_COUNTS}")
    kind = _check_method(method)
    if count != "equations" and _authors_count(kind, geometry):
        return authors_linear_flops(method, geometry, ranks, llm=count == "authors_llm")
    overhead = (paper_gradfilter_flops(geometry, radius)["overhead"]
                if kind in GRADFILTERS and isinstance(geometry, ConvGeometry)
                else overhead_flops(method, geometry, ranks, radius))
    return {"forward": paper_forward_flops(geometry), "overhead": overhead,
            "backward": paper_weight_grad_flops(method, geometry, ranks, radius)}


# --------------------------------------------------------------------------------------------
# Reports

def layer_report(method: str, geometry: Geometry, ranks: RanksLike = None, eps: Optional[float] = None,
                 radius: Optional[int] = None, dtype_bytes: int = 4,
                 input_requires_grad: bool = True, paper: str = "equations") -> dict:
    """Memory and FLOPs of one fine-tuned layer for one training step.

    hosvd ranks depend on the data: pass the ranks HOSVD_eps actually chose (``last_stats['ranks']``);
    ``eps`` is only recorded. asi takes its configured ranks (int or per mode). gradfilter needs
    ``radius``. Keys: method, eps, radius, input_shape, output_shape, ranks, memory_elements,
    memory_mib, forward_flops, backward_flops (weight gradient only), overhead_flops (eq. 11/14,
    gradfilter pooling), core_flops, input_grad_flops, paper_forward_flops, paper_backward_flops and
    paper_overhead_flops (the paper's count, ``paper``: :func:`paper_flops`; eq. 17 and eq. 15/16 as written by
    default).
    """
    kind = _check_method(method)
    if kind in ("hosvd", "asi"):
        if ranks is None:
            raise ValueError(f"{method}: pass ranks= (for hosvd the ranks eps={eps} selected, e.g. "
                             f"wrapper.last_stats['ranks']); they cannot be derived from the geometry")
        ranks = clip_ranks(geometry.input_shape, ranks)
        core = core_flops(geometry.input_shape, ranks)
    else:
        ranks, core = None, 0
    if kind in GRADFILTERS:
        gradfilter_positions(geometry, radius)  # validates radius up front
    elements = activation_elements(method, geometry, ranks, radius)
    counted = paper_flops(method, geometry, ranks, radius, paper)
    return {
        "method": method,
        "eps": eps if kind == "hosvd" else None,
        "radius": radius if kind in GRADFILTERS else None,
        "input_shape": tuple(geometry.input_shape),
        "output_shape": tuple(geometry.output_shape),
        "ranks": ranks,
        "memory_elements": elements,
        "memory_mib": to_mib(elements, dtype_bytes),
        "forward_flops": forward_flops(geometry),
        "backward_flops": weight_grad_flops(method, geometry, ranks, radius),
        "overhead_flops": overhead_flops(method, geometry, ranks, radius),
        "core_flops": core,
        "input_grad_flops": (gradfilter_paper_input_grad_flops(geometry, radius, input_requires_grad)
                             if kind == "gradfilter_paper" else input_grad_flops(geometry, input_requires_grad)),
        "paper_forward_flops": counted["forward"],
        "paper_backward_flops": counted["backward"],
        "paper_overhead_flops": counted["overhead"],
    }


def report_from_layer(layer, input_requires_grad: bool = True, dtype_bytes: Optional[int] = None,
                      paper: str = "equations") -> dict:
    """:func:`layer_report` for a patched wrapper after a training forward: method from
    ``layer.method_name`` (plain layers count as vanilla), ranks from ``last_stats`` (falling back to
    ``options['ranks']``), eps/radius from ``layer.options``, element size from the weight's dtype.
    Adds ``stored_elements`` (the wrapper's own count) when last_stats has it, for cross-checking."""
    method = getattr(layer, "method_name", "vanilla")
    options = dict(getattr(layer, "options", None) or {})
    stats = getattr(layer, "last_stats", None) or {}
    ranks = stats.get("ranks") or options.get("ranks")
    if dtype_bytes is None:
        weight = getattr(layer, "weight", None)
        dtype_bytes = weight.element_size() if hasattr(weight, "element_size") else 4
    rep = layer_report(method, geometry_from_layer(layer), ranks=ranks, eps=options.get("eps"),
                       radius=options.get("radius"), dtype_bytes=dtype_bytes,
                       input_requires_grad=input_requires_grad, paper=paper)
    if "stored_elements" in stats:
        rep["stored_elements"] = stats["stored_elements"]
    return rep


def summarize(reports: Union[Iterable[Mapping], Mapping[str, Mapping]]) -> dict:
    """Totals over layer reports (a list, or a dict name -> report). GFLOPs are 1e9 MACs.
    ``total_gflops`` = forward + backward + overhead + core + input gradient (ours);
    ``paper_gflops`` = the paper's forward + weight gradient + overhead (what the paper's tables report, counted as
    each layer report's ``paper`` says: :func:`paper_flops`)."""
    reps = list(reports.values()) if isinstance(reports, Mapping) else list(reports)
    tot = lambda key: sum(r[key] for r in reps)  # noqa: E731
    out = {
        "num_layers": len(reps),
        "activation_elements": tot("memory_elements"),
        "activation_mib": tot("memory_mib"),
        "forward_gflops": tot("forward_flops") / GIGA,
        "backward_gflops": tot("backward_flops") / GIGA,
        "overhead_gflops": tot("overhead_flops") / GIGA,
        "core_gflops": tot("core_flops") / GIGA,
        "input_grad_gflops": tot("input_grad_flops") / GIGA,
    }
    out["total_gflops"] = (out["forward_gflops"] + out["backward_gflops"] + out["overhead_gflops"]
                           + out["core_gflops"] + out["input_grad_gflops"])
    paper_overhead = sum(r.get("paper_overhead_flops", r["overhead_flops"]) for r in reps)
    out["paper_gflops"] = (tot("paper_forward_flops") + tot("paper_backward_flops") + paper_overhead) / GIGA
    return out


# --------------------------------------------------------------------------------------------
# The worked example of the module docstring

def _mbv2_last4(batch: int = 64) -> list[ConvGeometry]:
    """MobileNetV2 (224 px): features.17.conv.0 / conv.1 (depthwise) / conv.2, features.18.0."""
    return [ConvGeometry(160, 960, 1, input_shape=(batch, 160, 7, 7)),
            ConvGeometry(960, 960, 3, padding=1, groups=960, input_shape=(batch, 960, 7, 7)),
            ConvGeometry(960, 320, 1, input_shape=(batch, 960, 7, 7)),
            ConvGeometry(320, 1280, 1, input_shape=(batch, 320, 7, 7))]


def _resnet18_last4(batch: int = 64) -> list[ConvGeometry]:
    """ResNet-18 (224 px): layer4.0.conv2, layer4.0.downsample.0 (1x1 stride 2), layer4.1.conv1/2."""
    c3 = lambda: ConvGeometry(512, 512, 3, padding=1, input_shape=(batch, 512, 7, 7))  # noqa: E731
    return [c3(), ConvGeometry(256, 512, 1, stride=2, input_shape=(batch, 256, 14, 14)), c3(), c3()]


def worked_example(batch: int = 64) -> dict:
    """Recompute the numbers of "Why our FLOPs differ from the paper's tables" (GFLOPs)."""
    g = lambda x: x / GIGA  # noqa: E731
    dw = _mbv2_last4(batch)[1]
    ds = _resnet18_last4(batch)[1]
    s2 = ConvGeometry(256, 512, 3, stride=2, padding=1, input_shape=(batch, 256, 14, 14))
    out = {}
    for name, geo in (("mbv2_depthwise", dw), ("resnet18_downsample", ds), ("resnet18_conv_s2", s2)):
        out[name] = {"paper_forward": g(paper_forward_flops(geo)), "forward": g(forward_flops(geo)),
                     "paper_weight_grad": g(paper_weight_grad_flops("vanilla", geo)),
                     "weight_grad": g(weight_grad_flops("vanilla", geo))}
    for name, geos in (("mbv2", _mbv2_last4(batch)), ("resnet18", _resnet18_last4(batch))):
        for n in (2, 4):
            s = summarize([layer_report("vanilla", geo) for geo in geos[-n:]])
            out[f"{name}_vanilla_{n}"] = {"paper": s["paper_gflops"],
                                          "correct": s["forward_gflops"] + s["backward_gflops"],
                                          "activation_mib": s["activation_mib"]}
    asi = layer_report("asi", dw, ranks=(4, 16, 3, 3))
    out["mbv2_depthwise_asi"] = {"paper_weight_grad": g(asi["paper_backward_flops"]),
                                 "weight_grad": g(asi["backward_flops"]),
                                 "paper_channel_term": g(16 * 960 * 960 * 9),
                                 "channel_term": g(16 * 960 * 1 * 9)}
    return out
