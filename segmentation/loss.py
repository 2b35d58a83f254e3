"""The loss of the authors' runs: mmseg 0.x ``CrossEntropyLoss`` (loss weight 1.0, ``ignore_index`` 255,
``avg_non_ignore=False``): per-pixel cross-entropy, ignored pixels contribute 0, averaged over *all* pixels
of the batch (torch's ``ignore_index`` mean would divide by the non-ignored count instead)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .metrics import IGNORE_INDEX


class PixelCrossEntropy(nn.Module):
    def __init__(self, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[-2:] != target.shape[-2:]:  # mmseg resizes the logits to the label map
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="none").mean()
