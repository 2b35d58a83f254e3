"""The CNN and vision-transformer family: plain ImageNet classifiers, registered in ``classification.registry``.

Architecture code and pretrained-weight loading are kept apart:

* Each network registers itself (``register_classifier`` below) with a builder returning the ImageNet-shaped
  network (1000 classes) and where its published ImageNet weights live (URL + file name); the shared wrapper
  ``classification.weights.classifier_create`` turns it into the registry's ``create(num_classes, pretrained)``.
* ``load_imagenet_weights`` resolves the weights: a local file under ``<ckpt_dir>/imagenet/``
  first, then the published URL (downloaded into that same folder), and when neither works it
  stops with a message naming the file to put where. It never continues with random weights.
* ``create_model`` (``classification.registry``) builds, optionally loads the weights, then replaces the classifier
  head with a fresh ``nn.Linear(num_features, num_classes)`` (``reset_classifier``).

``mcunet`` is MCUNet-in1 (``mcunet-5fps_imagenet``), written from the architecture facts in
the public MCUNet release; module names follow the ProxylessNAS layout of that release
(``first_conv.conv``, ``blocks.i.mobile_inverted_conv.depth_conv.bn``, ``classifier.linear``)
so its published state_dict loads unchanged.

``MODELS``, ``get_spec`` and ``create_model`` are still importable from here, as they were (see the end of this
module); new code imports them from ``classification.registry`` after ``classification.families``.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import registry
from .registry import ModelSpec, register_model
from .weights import REPO_ROOT, ckpt_dir, classifier_create, get_submodule_parent, reset_classifier

__all__ = ["MCUNet", "ModelSpec", "MODELS", "REPO_ROOT", "ckpt_dir", "create_model", "get_spec", "get_submodule_parent",
           "imagenet_weights_path", "load_imagenet_weights", "register_classifier", "reset_classifier"]


# ----------------------------------------------------------------------------- MCUNet-in1
# (in, out, kernel, stride, expand_ratio, identity_shortcut) per block, from mcunet-in1.json.
MCUNET_IN1_BLOCKS = [
    (16, 8, 3, 1, 1, False),
    (8, 16, 3, 2, 4, False),
    (16, 16, 3, 1, 3, True),
    (16, 24, 7, 2, 3, False),
    (24, 24, 3, 1, 5, True),
    (24, 40, 3, 2, 5, False),
    (40, 40, 7, 1, 4, True),
    (40, 48, 5, 1, 4, False),
    (48, 48, 3, 1, 3, True),
    (48, 48, 3, 1, 4, True),
    (48, 96, 7, 2, 5, False),
    (96, 96, 5, 1, 4, True),
    (96, 96, 5, 1, 4, True),
    (96, 160, 3, 1, 6, False),
]
MCUNET_BN = dict(momentum=0.1, eps=1e-5)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """conv (no bias) -> BN -> optional ReLU6, named like ProxylessNAS's ``conv``/``bn``/``act``."""
    ops = [("conv", nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)),
           ("bn", nn.BatchNorm2d(cout, **MCUNET_BN))]
    if act:
        ops.append(("act", nn.ReLU6(inplace=True)))
    return nn.Sequential(OrderedDict(ops))


class MBInvertedConv(nn.Module):
    """Inverted bottleneck (1x1 expand, absent when expand_ratio is 1) -> kxk depthwise -> 1x1 linear."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand_ratio: int):
        super().__init__()
        mid = cin * expand_ratio
        self.inverted_bottleneck = _conv_bn(cin, mid, 1) if expand_ratio != 1 else None
        self.depth_conv = _conv_bn(mid, mid, k, stride, groups=mid)
        self.point_linear = _conv_bn(mid, cout, 1, act=False)

    def forward(self, x):
        if self.inverted_bottleneck is not None:
            x = self.inverted_bottleneck(x)
        return self.point_linear(self.depth_conv(x))


class MBBlock(nn.Module):
    def __init__(self, cin, cout, k, stride, expand_ratio, identity_shortcut):
        super().__init__()
        self.mobile_inverted_conv = MBInvertedConv(cin, cout, k, stride, expand_ratio)
        self.identity_shortcut = identity_shortcut

    def forward(self, x):
        y = self.mobile_inverted_conv(x)
        return y + x if self.identity_shortcut else y


class _Linear(nn.Module):
    """ProxylessNAS ``LinearLayer``: keeps the ``classifier.linear.*`` state_dict keys."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.linear(x)


class MCUNet(nn.Module):
    """MCUNet-in1: first conv (3->16, s2) + 14 MB blocks + global average pool + linear (42 Conv2d)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.first_conv = _conv_bn(3, 16, 3, stride=2)
        self.blocks = nn.ModuleList(MBBlock(*cfg) for cfg in MCUNET_IN1_BLOCKS)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = _Linear(MCUNET_IN1_BLOCKS[-1][1], num_classes)

    def forward(self, x):
        x = self.first_conv(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(torch.flatten(self.pool(x), 1))


# ----------------------------------------------------------------------------- registration
def register_classifier(name: str, builder: Callable[[], nn.Module], head: str, weights_url: str = "",
                        weights_file: str = "", resolution: int = 224, **spec_fields) -> None:
    """Register a plain ImageNet classifier: ``builder()`` -> 1000-class network with its final ``nn.Linear`` at
    ``head``; ``pretrained`` loads ``weights_url`` (``load_imagenet_weights``), then the head is reset."""
    create = classifier_create(name, builder, head, lambda n, model: load_imagenet_weights(n, model))
    register_model(name, builder=builder, head=head, weights_url=weights_url, weights_file=weights_file,
                   resolution=resolution, **spec_fields)(create)


def _swin(**kw) -> Callable[[], nn.Module]:
    def build():
        from torchvision.models.swin_transformer import SwinTransformer
        return SwinTransformer(**kw)
    return build


def _vit(**kw) -> Callable[[], nn.Module]:
    def build():
        from torchvision.models.vision_transformer import VisionTransformer
        return VisionTransformer(**kw)
    return build


def _tv(fn_name: str) -> Callable[[], nn.Module]:
    def build():
        import torchvision.models as tvm
        return getattr(tvm, fn_name)(weights=None)
    return build


register_classifier("mcunet", MCUNet, "classifier.linear",
                    "https://hanlab18.mit.edu/projects/tinyml/mcunet/release/mcunet-5fps_imagenet.pth",
                    "mcunet-5fps_imagenet.pth", 96)
register_classifier("mobilenet_v2", _tv("mobilenet_v2"), "classifier.1",
                    "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth", "mobilenet_v2-b0353104.pth", 224)
register_classifier("resnet18", _tv("resnet18"), "fc",
                    "https://download.pytorch.org/models/resnet18-f37072fd.pth", "resnet18-f37072fd.pth", 224)
register_classifier("resnet34", _tv("resnet34"), "fc",
                    "https://download.pytorch.org/models/resnet34-b627a593.pth", "resnet34-b627a593.pth", 224)
# Vision transformers (torchvision architectures and IMAGENET1K_V1 weights). "#Layers" counts, from the end, the
# nn.Linear layers whose name contains "mlp" (the authors' selection): Swin's features.<stage>.<block>.mlp.0/.3
# and ViT's encoder.layers.encoder_layer_<i>.mlp.0/.3; Swin feeds them (B, H, W, C), ViT (B, T, D).
register_classifier("swin_t", _tv("swin_t"), "head", "https://download.pytorch.org/models/swin_t-704ceda3.pth",
                    "swin_t-704ceda3.pth", 224, layer_type="linear", include="mlp", paper_flops="authors_linear")
register_classifier("vit_b_32", _tv("vit_b_32"), "heads.head",
                    "https://download.pytorch.org/models/vit_b_32-d86f8d99.pth", "vit_b_32-d86f8d99.pth", 224,
                    layer_type="linear", include="mlp", fixed_resolution=224, paper_flops="authors_linear")
# Test-only miniatures (random weights only, no published file): the same torchvision classes and module names
# at a few hundred kFLOPs, so tests and the CPU demo can fit transformers in seconds at resolution 32.
register_classifier("swin_tiny_test", _swin(patch_size=[4, 4], embed_dim=16, depths=[2, 2, 2, 2],
                                            num_heads=[1, 2, 2, 4], window_size=[4, 4], stochastic_depth_prob=0.2),
                    "head", "", "", 32, layer_type="linear", include="mlp", paper_flops="authors_linear")
register_classifier("vit_tiny_test", _vit(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                          mlp_dim=64), "heads.head", "", "", 32, layer_type="linear", include="mlp",
                    fixed_resolution=32, paper_flops="authors_linear")


# ----------------------------------------------------------------------------- ImageNet weights
def imagenet_weights_path(name: str) -> Path:
    return ckpt_dir() / "imagenet" / registry.get_spec(name).weights_file


def _download(url: str, dst: Path) -> None:
    """Fetch ``url`` to ``dst`` (separate function so tests can simulate being offline)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(dst), progress=False)


def load_imagenet_weights(name: str, model: nn.Module) -> Path:
    """Load the published ImageNet weights of ``name`` into ``model``; return the file used.

    Order: ``<ckpt_dir>/imagenet/<file>`` if present, else download the published file there.
    If both fail, raise ``FileNotFoundError`` naming the file to put where.
    """
    spec = registry.get_spec(name)
    if not spec.weights_url:
        raise ValueError(f"model {name!r} has no published ImageNet weights (a test-only miniature); "
                         f"pass --model.pretrained false")
    path = imagenet_weights_path(name)
    if not path.is_file():
        try:
            _download(spec.weights_url, path)
        except Exception as err:  # offline, proxy, HTTP error ...
            if path.exists():
                path.unlink()
            raise FileNotFoundError(
                f"ImageNet weights for model {name!r} are not available: no local file {path} and the download "
                f"of {spec.weights_url} failed ({type(err).__name__}: {err}).\n"
                f"Fix: on a machine with internet, download {spec.weights_url} and put it at {path} "
                f"(or set ASI_CKPT_DIR to the folder holding imagenet/{spec.weights_file}); "
                f"or pass --model.pretrained false to train from random weights on purpose."
            ) from err
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"ImageNet weights file {path} ({path.stat().st_size} bytes) for model {name!r} is unreadable: truncated "
            f"or corrupt ({type(err).__name__}: {first}). Delete it and run again to download it anew, or put a good "
            f"copy of {spec.weights_url} there (ckpts/README.md)") from None
    if isinstance(sd, dict) and "state_dict" in sd:  # MCUNet release wraps the weights
        sd = sd["state_dict"]
    if spec.weights_rename is not None:
        sd = spec.weights_rename(sd, model)
    model.load_state_dict(sd, strict=True)
    return path


# ----------------------------------------------------------------------------- names kept from before the registry
# ``MODELS``, ``get_spec`` and ``create_model`` were this module's: they are the registry's (every family registered
# on first use, through ``classification.families``, which imports this module).
def __getattr__(attr: str):
    if attr in ("MODELS", "get_spec", "create_model"):
        from . import families  # noqa: F401
        return getattr(registry, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
