"""The six segmentation networks of the paper's Table 3, built as the authors built them with MMSegmentation 0.x.

The authors' configs (``segmentation/configs/*/full_*.py``, inherited from mmseg's ``_base_/models/
{pspnet_r50-d8,deeplabv3_r50-d8,fcn_r50-d8,upernet_r50}.py``) give:

=============  =============================================  ===================================================
name           backbone                                        decode head (``channels``, no auxiliary head)
=============  =============================================  ===================================================
pspnet_r18     ResNetV1c-18, strides 1,2,1,1, dilations 1,1,2,4  PSPHead on layer4 (512 ch), pool scales 1,2,3,6, 128
deeplabv3_r18  same                                            ASPPHead on layer4, dilations 1,12,24,36, 128
fcn_r18        same                                            FCNHead on layer4, 2 convs 3x3 + concat_input, 128
upernet_r18    ResNetV1c-18, strides 1,2,2,2, no dilation      UPerHead on layers 1-4 (64,128,256,512), 512
pspnet_mv2     MobileNetV2, strides 1,2,2,1,1,1,1, dil. 1,1,1,2,2,4,4  PSPHead on layer7 (320 ch), 128
deeplabv3_mv2  same                                            ASPPHead on layer7, 128
=============  =============================================  ===================================================

Every decode head ends in ``conv_seg`` (1x1 conv with bias, ``channels -> num_classes``); dropout_ratio is 0 and
``auxiliary_head=None`` in every config the authors ran, so there is no auxiliary head. The logits (1/8 or 1/4
of the input) are resized bilinearly (align_corners=False) to the input size, as mmseg's EncoderDecoder does.

Module names are mmseg's (``backbone.stem.0``, ``backbone.layer4.0.conv1``, ``decode_head.bottleneck.conv``,
``decode_head.psp_modules.0.1.bn`` ...), so an mmseg checkpoint's ``state_dict`` loads key for key: the key
map is the identity (segmentation/checkpoints.py strips a ``model.``/``module.`` prefix and reports what differs).

Why written here rather than taken from a library: torchvision's BasicBlock refuses dilation; timm's dilated
ResNet dilates conv2 as well (mmseg's BasicBlock dilates conv1 only, with the first block of a dilated stage at
half the dilation: ``contract_dilation``) and names its deep stem differently; neither torchvision nor timm has
mmseg's dilated MobileNetV2 (dilation on the first block of a stage only); segmentation-models-pytorch has no
PSP/ASPP/FCN/UPer head with mmseg's layout (its PSPNet pools to 1,2,3,6 but with a different bottleneck and no
conv_seg). Each block below follows mmseg 0.x line for line in structure, not in code.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from classification.registry import register_model

from .layer_sets import layer_set

ALIGN_CORNERS = False


def resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=ALIGN_CORNERS)


class ConvModule(nn.Sequential):
    """mmcv's ConvModule with BN: ``conv`` (no bias) -> ``bn`` -> ``activate`` (ReLU, ReLU6 or none)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, dilation: int = 1,
                 groups: int = 1, act: Optional[str] = "relu"):
        layers = [("conv", nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=False)),
                  ("bn", nn.BatchNorm2d(cout))]
        if act == "relu":
            layers.append(("activate", nn.ReLU(inplace=True)))
        elif act == "relu6":
            layers.append(("activate", nn.ReLU6(inplace=True)))
        super().__init__(OrderedDict(layers))


# ----------------------------------------------------------------------------- ResNetV1c
class BasicBlock(nn.Module):
    """mmseg BasicBlock: conv1 3x3 (stride, dilation) -> bn1 -> relu -> conv2 3x3 (no dilation) -> bn2 (+ identity)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetV1c(nn.Module):
    """mmseg ``ResNetV1c`` depth 18: deep stem (3x3 convs 3->32 s2, 32->32, 32->64) + max pool, 4 stages of 2
    BasicBlocks; ``contract_dilation``: the first block of a dilated stage uses half its dilation. Returns the
    four stage outputs."""

    def __init__(self, strides: Sequence[int] = (1, 2, 2, 2), dilations: Sequence[int] = (1, 1, 1, 1),
                 contract_dilation: bool = True, blocks: Sequence[int] = (2, 2, 2, 2)):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (n, stride, dilation) in enumerate(zip(blocks, strides, dilations)):
            planes = 64 * 2 ** i
            downsample = None
            if stride != 1 or inplanes != planes:
                downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            first = dilation // 2 if contract_dilation and dilation > 1 else dilation
            layer = [BasicBlock(inplanes, planes, stride, first, downsample)]
            layer += [BasicBlock(planes, planes, 1, dilation) for _ in range(1, n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
            inplanes = planes
        self.out_channels = [64, 128, 256, 512]

    def forward(self, x):
        x = self.maxpool(self.stem(x))
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            outs.append(x)
        return outs


# ----------------------------------------------------------------------------- MobileNetV2
class InvertedResidual(nn.Module):
    """mmseg InvertedResidual: ``conv`` = [1x1 expand (absent when ratio 1)] -> 3x3 depthwise (stride,
    dilation) -> 1x1 linear; residual when stride 1 and in == out."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int, dilation: int = 1):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers = [ConvModule(cin, hidden, 1, act="relu6")] if expand_ratio != 1 else []
        layers += [ConvModule(hidden, hidden, 3, stride, padding=dilation, dilation=dilation, groups=hidden,
                              act="relu6"),
                   ConvModule(hidden, cout, 1, act=None)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """mmseg ``MobileNetV2`` (widen 1.0): ``conv1`` 3->32 s2 + ``layer1..layer7``; a stage's stride and dilation
    apply to its first block only (mmseg's make_layer). Returns the outputs of ``out_indices``."""

    ARCH = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]

    def __init__(self, strides=(1, 2, 2, 1, 1, 1, 1), dilations=(1, 1, 1, 2, 2, 4, 4), out_indices=(1, 2, 4, 6)):
        super().__init__()
        self.conv1 = ConvModule(3, 32, 3, 2, 1, act="relu6")
        cin = 32
        for i, ((t, c, n), s, d) in enumerate(zip(self.ARCH, strides, dilations)):
            blocks = [InvertedResidual(cin if j == 0 else c, c, s if j == 0 else 1, t, d if j == 0 else 1)
                      for j in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = c
        self.out_indices = tuple(out_indices)
        self.out_channels = [self.ARCH[i][1] for i in self.out_indices]

    def forward(self, x):
        x = self.conv1(x)
        outs = []
        for i in range(7):
            x = getattr(self, f"layer{i + 1}")(x)
            if i in self.out_indices:
                outs.append(x)
        return outs


# ----------------------------------------------------------------------------- heads
class DecodeHead(nn.Module):
    """mmseg BaseDecodeHead: picks ``inputs[in_index]`` and ends in ``conv_seg`` (dropout_ratio 0: none)."""

    def __init__(self, channels: int, num_classes: int, in_index):
        super().__init__()
        self.in_index = in_index
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def cls_seg(self, x):
        return self.conv_seg(x)


class PPM(nn.ModuleList):
    """Pyramid pooling: per scale ``Sequential(AdaptiveAvgPool2d(scale), ConvModule(in, channels, 1))``."""

    def __init__(self, pool_scales, cin: int, channels: int):
        super().__init__([nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(cin, channels, 1)) for s in pool_scales])

    def forward(self, x):
        return [resize(m(x), x.shape[2:]) for m in self]


class PSPHead(DecodeHead):
    def __init__(self, cin: int, channels: int, num_classes: int, in_index: int = -1, pool_scales=(1, 2, 3, 6)):
        super().__init__(channels, num_classes, in_index)
        self.psp_modules = PPM(pool_scales, cin, channels)
        self.bottleneck = ConvModule(cin + len(pool_scales) * channels, channels, 3, padding=1)

    def forward(self, inputs):
        x = inputs[self.in_index]
        return self.cls_seg(self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1)))


class ASPPHead(DecodeHead):
    def __init__(self, cin: int, channels: int, num_classes: int, in_index: int = -1, dilations=(1, 12, 24, 36)):
        super().__init__(channels, num_classes, in_index)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(cin, channels, 1))
        self.aspp_modules = nn.ModuleList(
            ConvModule(cin, channels, 1 if d == 1 else 3, padding=0 if d == 1 else d, dilation=d) for d in dilations)
        self.bottleneck = ConvModule((len(dilations) + 1) * channels, channels, 3, padding=1)

    def forward(self, inputs):
        x = inputs[self.in_index]
        outs = [resize(self.image_pool(x), x.shape[2:])] + [m(x) for m in self.aspp_modules]
        return self.cls_seg(self.bottleneck(torch.cat(outs, dim=1)))


class FCNHead(DecodeHead):
    def __init__(self, cin: int, channels: int, num_classes: int, in_index: int = -1, num_convs: int = 2):
        super().__init__(channels, num_classes, in_index)
        self.convs = nn.Sequential(*[ConvModule(cin if i == 0 else channels, channels, 3, padding=1)
                                     for i in range(num_convs)])
        self.conv_cat = ConvModule(cin + channels, channels, 3, padding=1)

    def forward(self, inputs):
        x = inputs[self.in_index]
        return self.cls_seg(self.conv_cat(torch.cat([x, self.convs(x)], dim=1)))


class UPerHead(DecodeHead):
    """UPerNet: PPM on the last input (``psp_modules`` + ``bottleneck``), 1x1 ``lateral_convs`` and 3x3
    ``fpn_convs`` on the others, top-down sums, everything resized to the finest map and fused by
    ``fpn_bottleneck``."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int, pool_scales=(1, 2, 3, 6)):
        super().__init__(channels, num_classes, in_index=None)
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)

    def forward(self, inputs):
        x = inputs[-1]
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)] + [laterals[-1]]
        outs = [outs[0]] + [resize(o, outs[0].shape[2:]) for o in outs[1:]]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class EncoderDecoder(nn.Module):
    """mmseg EncoderDecoder (no auxiliary head): backbone -> decode_head -> logits resized to the input size.

    While a training graph is recorded the decoder's logits are returned at their own (1/8) resolution, as mmseg's
    ``forward_train`` hands them to its loss, which resizes them to the label map: ``PixelCrossEntropy`` does that
    resize inside its recomputed (lean) part, so the full-resolution logits are never kept for backward."""

    def __init__(self, backbone: nn.Module, decode_head: DecodeHead):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head

    def forward(self, img):
        logits = self.decode_head(self.backbone(img))
        if self.training and torch.is_grad_enabled():
            return logits
        return resize(logits, img.shape[2:])


# ----------------------------------------------------------------------------- builders
R18_D8 = dict(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))


def pspnet_r18(num_classes: int = 21) -> EncoderDecoder:
    return EncoderDecoder(ResNetV1c(**R18_D8), PSPHead(512, 128, num_classes, in_index=3))


def deeplabv3_r18(num_classes: int = 21) -> EncoderDecoder:
    return EncoderDecoder(ResNetV1c(**R18_D8), ASPPHead(512, 128, num_classes, in_index=3))


def fcn_r18(num_classes: int = 21) -> EncoderDecoder:
    return EncoderDecoder(ResNetV1c(**R18_D8), FCNHead(512, 128, num_classes, in_index=3))


def upernet_r18(num_classes: int = 21) -> EncoderDecoder:
    return EncoderDecoder(ResNetV1c(), UPerHead([64, 128, 256, 512], 512, num_classes))


def pspnet_mv2(num_classes: int = 21) -> EncoderDecoder:
    # out_indices (1, 2, 4, 6) -> 4 outputs; the head reads in_index 3 = layer7 (320 ch)
    return EncoderDecoder(MobileNetV2(), PSPHead(320, 128, num_classes, in_index=3))


def deeplabv3_mv2(num_classes: int = 21) -> EncoderDecoder:
    return EncoderDecoder(MobileNetV2(), ASPPHead(320, 128, num_classes, in_index=3))


BUILDERS = {f.__name__: f for f in (pspnet_r18, deeplabv3_r18, fcn_r18, upernet_r18, pspnet_mv2, deeplabv3_mv2)}


# ----------------------------------------------------------------------------- registration
def _creator(name: str, build: Callable[[int], nn.Module]) -> Callable[..., nn.Module]:
    """The registry's ``create``: no ImageNet head to replace; the networks start from an mmseg checkpoint
    (--model.checkpoint) or random weights."""
    def create(num_classes: int, pretrained: bool, **options) -> nn.Module:
        if options:
            raise ValueError(f"model {name!r} takes no options {sorted(options)} (they are for the LLM backbones)")
        if pretrained:
            raise FileNotFoundError(
                f"model {name!r} has no published ImageNet weights to load: start it from the authors' "
                f"Cityscapes-calibrated checkpoint with --model.checkpoint (scripts/download_ckpts.sh seg, "
                f"docs/segmentation.md), or pass --model.pretrained false to train from random weights on purpose")
        return build(num_classes)
    return create


for _name, _build in BUILDERS.items():  # the paper's Table 3 networks; --model.num_finetune 5/10: the authors' lists
    register_model(_name, builder=None, head="decode_head.conv_seg", weights_url="", weights_file="", resolution=512,
                   task="segmentation", layer_sets=partial(layer_set, _name))(_creator(_name, _build))
