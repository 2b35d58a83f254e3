"""The paper's "5" and "10" fine-tuned layers of each segmentation network: the authors' explicit lists.

Source: the authors' repository (stored as Le-TrungNguyen/ICML2025; public: Le-TrungNguyen/ICML2025-ASI), its
``segmentation/configs/<model>/0.8/hosvd_{5L,10L}_*_voc12aug.py`` (the Table 3 runs; ASI runs the same configs with
``--with_ASI``, scripts/<model>/ASI_*.sh) and ``hosvd_10L_*_cityscapes.py`` (perplexity measurement):
``hosvd_var.filter_install`` names the compressed modules, in this order, and ``freeze_layers`` which parameters
train. Every list and freeze rule here is theirs verbatim; the PSPNet and PSPNet-M 5L configs are not in the stored
copy (their ASI scripts name them), so those two come from the gradient-filter code base the authors' pipeline
originates in (SLDGroup/GradientFilter-CVPR23, ``filt_5L_*``), whose lists and freeze rules equal the authors' in
all ten cells the stored copy has (in another order) and give Table 3's vanilla Mem in all twelve.
An install entry of type ``cbr`` is an mmcv ConvModule (its ``.conv`` is compressed), ``resnet_basic_block`` a
BasicBlock (``.conv1`` and ``.conv2``; not its downsample), ``conv`` a bare conv. The gradient filter's radius per
entry (Table 3's gradient-filter rows) is from SLDGroup's ``filt_{5L,10L}_*`` configs: the authors' HOSVD configs
carry none and their ``filt_*`` configs are not in the stored copy.

``freeze`` is applied in order after patching (classification.finetune.apply_freeze_rules), as the authors' train.py does: a path sets ``requires_grad=False``
on every parameter under it, ``~path`` sets ``True``. So some layers train *without* compression (PSPNet 5L: the
pyramid-pooling convs and ``conv_seg``; 10L: also ``layer4.0.downsample``) and keep their input for backward:
Table 3's Mem column counts only the compressed layers.
"""
from __future__ import annotations

from typing import Iterable


_DLV3_HEAD = [("decode_head.aspp_modules.0", "cbr", 3), ("decode_head.aspp_modules.1", "cbr", 3),
              ("decode_head.aspp_modules.2", "cbr", 6), ("decode_head.aspp_modules.3", "cbr", 9),
              ("decode_head.bottleneck", "cbr", 3)]
_DLV3_FREEZE = ["backbone", "decode_head", "~decode_head.conv_seg", "~decode_head.bottleneck",
                "~decode_head.aspp_modules"]
_UPER_FREEZE = ["backbone", "decode_head", "~decode_head.conv_seg", "~decode_head.fpn_bottleneck",
                "~decode_head.fpn_convs", "~decode_head.bottleneck"]
_UPER_5L = [("decode_head.bottleneck", "cbr", 2), ("decode_head.fpn_convs.0", "cbr", 8),
            ("decode_head.fpn_convs.1", "cbr", 4), ("decode_head.fpn_convs.2", "cbr", 2),
            ("decode_head.fpn_bottleneck", "cbr", 8)]

# model -> num_finetune -> {"install": [(path, type, radius)], "freeze": [rules]}. Install order = the authors'
# hosvd_{5L,10L} configs (forward order, the head last), so every 5L list is the tail of the 10L one: their ASI takes
# the last N layers of the 10L perplexity file. Nothing here depends on it (patch sorts into registration order).
AUTHORS_LAYER_SETS: dict[str, dict[int, dict]] = {
    "pspnet_r18": {
        5: {"install": [("decode_head.bottleneck", "cbr", 4)], "freeze": ["backbone"]},
        10: {"install": [("backbone.layer4.0", "resnet_basic_block", 4), ("backbone.layer4.1", "resnet_basic_block", 4),
                         ("decode_head.bottleneck", "cbr", 4)],
             "freeze": ["backbone", "~backbone.layer4"]},
    },
    "deeplabv3_r18": {
        5: {"install": _DLV3_HEAD, "freeze": _DLV3_FREEZE},
        10: {"install": [("backbone.layer4.0", "resnet_basic_block", 2),
                         ("backbone.layer4.1", "resnet_basic_block", 2)] + _DLV3_HEAD,
             "freeze": _DLV3_FREEZE + ["~backbone.layer4.1.conv2", "~backbone.layer4.1.conv1",
                                       "~backbone.layer4.0.conv2", "~backbone.layer4.0.conv1"]},
    },
    "fcn_r18": {
        5: {"install": [("backbone.layer4.1", "resnet_basic_block", 4), ("decode_head.convs.0", "cbr", 4),
                        ("decode_head.convs.1", "cbr", 4), ("decode_head.conv_cat", "cbr", 4)],
            "freeze": ["backbone", "~backbone.layer4.1"]},
        10: {"install": [("backbone.layer3.1", "resnet_basic_block", 2), ("backbone.layer4.0", "resnet_basic_block", 2),
                         ("backbone.layer4.0.downsample.0", "conv", 2), ("backbone.layer4.1", "resnet_basic_block", 2),
                         ("decode_head.convs.0", "cbr", 2), ("decode_head.convs.1", "cbr", 2),
                         ("decode_head.conv_cat", "cbr", 2)],
             "freeze": ["backbone", "~backbone.layer4", "~backbone.layer3.1"]},
    },
    "upernet_r18": {
        5: {"install": _UPER_5L, "freeze": _UPER_FREEZE},
        10: {"install": [("decode_head.lateral_convs.0", "cbr", 8), ("decode_head.lateral_convs.1", "cbr", 4),
                         ("decode_head.lateral_convs.2", "cbr", 2)] + _UPER_5L,
             "freeze": _UPER_FREEZE + ["~decode_head.lateral_convs", "~decode_head.psp_modules.0",
                                       "~decode_head.psp_modules.1"]},
    },
    "pspnet_mv2": {
        5: {"install": [("decode_head.bottleneck", "cbr", 4)], "freeze": ["backbone"]},
        10: {"install": [("backbone.layer6.2.conv.1", "cbr", 4), ("backbone.layer6.2.conv.2", "cbr", 4),
                         ("backbone.layer7.0.conv.0", "cbr", 4), ("backbone.layer7.0.conv.1", "cbr", 4),
                         ("backbone.layer7.0.conv.2", "cbr", 4), ("decode_head.bottleneck", "cbr", 4)],
             "freeze": ["backbone", "~backbone.layer7", "~backbone.layer6.2.conv.2", "~backbone.layer6.2.conv.1"]},
    },
    "deeplabv3_mv2": {
        5: {"install": _DLV3_HEAD, "freeze": _DLV3_FREEZE},
        10: {"install": [("backbone.layer6.2.conv.2", "cbr", 3), ("backbone.layer7.0.conv.0", "cbr", 3),
                         ("backbone.layer7.0.conv.1", "cbr", 3), ("backbone.layer7.0.conv.2", "cbr", 3)] + _DLV3_HEAD,
             "freeze": ["backbone", "~backbone.layer7", "~backbone.layer6.2.conv.2"]},
    },
}
# The deeplabv3_mv2 10L freeze list is the authors' verbatim: it does not unfreeze the decode head (their 5L list
# freezes "decode_head" and unfreezes parts; the 10L one never freezes it), so the whole ASPP head trains.

_INSTALL_CONVS = {"cbr": (".conv",), "resnet_basic_block": (".conv1", ".conv2"), "conv": ("",)}


def expand_install(install: Iterable[tuple[str, str, int]]) -> tuple[list[str], list[int]]:
    """Conv layer names and per-layer gradient-filter radii of a ``filter_install`` list, in its order."""
    names, radii = [], []
    for path, kind, radius in install:
        for suffix in _INSTALL_CONVS[kind]:
            names.append(path + suffix)
            radii.append(radius)
    return names, radii


def layer_set(model: str, num_finetune) -> dict | None:
    """``{"layers": [...], "radii": [...], "freeze": [...], "options": {"radius": radii}}`` of the authors' 5L/10L
    set, or None. ``options``: per-layer values of method options, one per layer of ``layers`` (the gradient
    filter's radii); the fine-tuning core hands them to the method that takes them."""
    sets = AUTHORS_LAYER_SETS.get(model, {})
    if isinstance(num_finetune, bool) or num_finetune not in sets:
        return None
    entry = sets[num_finetune]
    names, radii = expand_install(entry["install"])
    return {"layers": names, "radii": radii, "freeze": list(entry["freeze"]), "options": {"radius": radii}}
