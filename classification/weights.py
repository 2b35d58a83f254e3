"""Where checkpoints live and the head handling shared by the model families (imports no family).

* :func:`ckpt_dir`: ``$ASI_CKPT_DIR`` or ``<repo>/ckpts`` (ImageNet weights, setup-B checkpoints, ``hf/`` LLMs).
* :func:`reset_classifier`: replace a network's final ``nn.Linear`` by a fresh ``num_classes`` one.
* :func:`classifier_create`: the shared wrapper that turns a plain ImageNet classifier (``builder()`` -> a
  1000-class network) into the registry's one builder signature ``create(num_classes, pretrained, **options)``:
  build, load the published weights when asked, reset the head.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent


def ckpt_dir() -> Path:
    """Where checkpoints live: ``$ASI_CKPT_DIR`` if set, else ``<repo>/ckpts``."""
    return Path(os.environ.get("ASI_CKPT_DIR", REPO_ROOT / "ckpts"))


def get_submodule_parent(model: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = dotted.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def reset_classifier(model: nn.Module, head: str, num_classes: int) -> nn.Linear:
    """Replace the final ``nn.Linear`` at dotted path ``head`` by a fresh one with ``num_classes`` outputs."""
    parent, attr = get_submodule_parent(model, head)
    old = getattr(parent, attr)
    new = nn.Linear(old.in_features, num_classes)
    setattr(parent, attr, new)
    return new


def classifier_create(name: str, builder: Callable[[], nn.Module], head: str,
                      load_weights: Optional[Callable[[str, nn.Module], object]] = None) -> Callable[..., nn.Module]:
    """``create(num_classes, pretrained, **options)`` of a plain classifier: ``builder()``, then (``pretrained``)
    ``load_weights(name, model)`` (e.g. ``classification.backbones.load_imagenet_weights``), then a fresh
    ``num_classes`` head at ``head``. Without ``load_weights``, ``pretrained=True`` raises: there are none."""

    def create(num_classes: int, pretrained: bool, **options) -> nn.Module:
        if options:
            raise ValueError(f"model {name!r} takes no options {sorted(options)} (they are for the LLM backbones)")
        model = builder()
        if pretrained:
            if load_weights is None:
                raise ValueError(f"model {name!r} has no published weights to load; pass --model.pretrained false")
            load_weights(name, model)
        reset_classifier(model, head, num_classes)
        return model

    return create
