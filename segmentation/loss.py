"""The loss of the authors' runs: mmseg 0.x ``CrossEntropyLoss`` (loss weight 1.0, ``ignore_index`` 255,
``avg_non_ignore=False``): per-pixel cross-entropy, ignored pixels contribute 0, averaged over *all* pixels
of the batch (torch's ``ignore_index`` mean would divide by the non-ignored count instead)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .metrics import IGNORE_INDEX


class PixelCrossEntropy(nn.Module):
    """``lean`` (default): the loss keeps only the decoder's low-resolution logits and the labels as uint8 for
    backward, and recomputes the upsampling and the log-softmax there (``asi_core.recompute.recompute``: the same
    kernels on the same values, so loss and gradients are bit for bit those of the plain loss). The plain loss
    keeps the full-resolution log-softmax, B x K x H x W floats, and int64 labels: at batch 8, 512 x 512 and 21
    classes 168 MiB + 16 MiB, more than all the fine-tuned layers of a compressed run together. Labels are class
    ids below ``num_classes`` or ``ignore_index``; uint8 holds them when both are <= 255."""

    def __init__(self, ignore_index: int = IGNORE_INDEX, num_classes: int = 256, lean: bool = True):
        super().__init__()
        self.ignore_index = ignore_index
        self.small_labels = lean and num_classes <= 256 and 0 <= ignore_index <= 255
        self.lean = lean

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[-2:] != target.shape[-2:]:  # mmseg resizes the logits to the label map
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, target.long(), ignore_index=self.ignore_index, reduction="none").mean()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not self.lean:
            return self._loss(logits, target)
        from asi_core.recompute import recompute

        return recompute(self._loss, logits, target.to(torch.uint8) if self.small_labels else target)
