"""The segmentation task (a class per pixel): mmseg's pixel cross-entropy and mIoU/mAcc/aAcc over the evaluation
set, the best checkpoint chosen by val/miou. Registered as ``task="segmentation"``, which the segmentation
networks' model specs name (segmentation/models.py)."""
from __future__ import annotations

import torch

from classification.tasks import Task, register_task

from .loss import PixelCrossEntropy
from .metrics import SegmentationScores


@register_task("segmentation")
class SegmentationTask(Task):
    monitor = "val/miou"
    scores = ("miou", "macc", "aacc")
    monitor_percent = True  # mIoU/mAcc/aAcc in percent, as mmseg (segmentation/metrics.py)

    def criterion(self):
        return PixelCrossEntropy(num_classes=self.num_classes)

    def metrics(self):
        return None, SegmentationScores(self.num_classes), SegmentationScores(self.num_classes)

    def target_shape(self, batch_size, resolution):
        return (batch_size, resolution, resolution)

    def step(self, module, batch, stage, scores):
        x, y = batch
        logits = module(x)
        loss = module.criterion(logits, y)  # resizes the logits to the label map when they differ (VOC val)
        if scores is not None:
            if logits.shape[-2:] != y.shape[-2:]:
                logits = torch.nn.functional.interpolate(logits, size=y.shape[-2:], mode="bilinear",
                                                         align_corners=False)
            scores.update(logits.argmax(1), y)
        on_step = stage == "train"
        module.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step,
                   batch_size=len(y))
        return loss

    def epoch_end(self, module, stage, scores):
        if scores is None or scores.update_count == 0:
            return
        for k, v in scores.scores().items():  # mIoU, mAcc, aAcc in percent, over the whole evaluation set
            module.log(f"{stage}/{k}", v, prog_bar=k == "miou", sync_dist=False)
        scores.reset()
