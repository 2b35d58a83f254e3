"""mIoU, mAcc and aAcc as MMSegmentation 0.x defines them (``mmseg.core.evaluation.metrics``).

Over the whole evaluation set, per class c (pixels labelled ``ignore_index`` are dropped):
``intersect_c`` = pixels predicted c and labelled c, ``area_label_c`` = pixels labelled c,
``area_pred_c`` = pixels predicted c, ``union_c = area_pred_c + area_label_c - intersect_c``;
``IoU_c = intersect_c / union_c``, ``Acc_c = intersect_c / area_label_c``;
**mIoU** and **mAcc** are the means over classes ignoring NaN (a class absent from both the labels and the
predictions has no IoU; a class absent from the labels has no Acc), **aAcc** = sum(intersect) / sum(area_label).
Table 3's "mAcc" column is mmseg's mAcc (the mean of per-class accuracies), whatever its caption says.

The areas are read off one confusion matrix accumulated by torchmetrics' ``MulticlassConfusionMatrix``
(rows: label, columns: prediction, ``ignore_index`` pixels dropped), which is the same count.
"""
from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassConfusionMatrix

IGNORE_INDEX = 255


def scores_from_confusion(confmat: torch.Tensor) -> dict[str, float]:
    """``{"miou", "macc", "aacc"}`` in percent from a (K, K) confusion matrix (rows: label, cols: prediction)."""
    cm = confmat.double()
    intersect = cm.diagonal()
    area_label, area_pred = cm.sum(1), cm.sum(0)
    union = area_pred + area_label - intersect
    iou = intersect / union          # 0/0 -> nan: class never labelled nor predicted
    acc = intersect / area_label     # x/0 -> nan (or inf never: intersect <= area_label)
    return {"miou": 100 * float(torch.nanmean(iou)), "macc": 100 * float(torch.nanmean(acc)),
            "aacc": 100 * float(intersect.sum() / area_label.sum())}


class SegmentationScores(MulticlassConfusionMatrix):
    """Accumulates the confusion matrix of (B, K, H, W) logits or (B, H, W) predictions against (B, H, W)
    labels; ``scores()`` gives mmseg's mIoU / mAcc / aAcc."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, **kwargs):
        super().__init__(num_classes=num_classes, ignore_index=ignore_index, validate_args=False, **kwargs)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.is_floating_point():
            preds = preds.argmax(1)
        super().update(preds, target)

    def scores(self) -> dict[str, float]:
        return scores_from_confusion(self.compute())
