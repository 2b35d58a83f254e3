"""Tasks: what a kind of label brings to the fine-tuning module (torchgeo's per-task loss/metrics/monitor, as an
object the model spec chooses: ``ModelSpec.task`` names a registered task).

A task owns the loss, the metrics of each stage, the metric the best checkpoint is chosen by (``monitor``), what a
step logs, what an evaluation epoch logs at its end, and the random batches of ``profile`` and ``benchmark``. The
classification task (one class per sample, top-1 accuracy) is here; segmentation registers its own
(``segmentation/task.py``: a class per pixel, mmseg's loss and mIoU).
"""
from __future__ import annotations

import abc
from typing import Callable, Optional

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

TASKS: dict[str, type["Task"]] = {}


def register_task(name: str) -> Callable[[type["Task"]], type["Task"]]:
    """Class decorator: the task a model spec names with ``task=name``. A name registered twice: ValueError."""
    def decorate(cls: type[Task]) -> type[Task]:
        if name in TASKS:
            raise ValueError(f"a task named {name!r} is already registered ({TASKS[name].__qualname__})")
        cls.name = name
        TASKS[name] = cls
        return cls
    return decorate


def get_task(name: str) -> type["Task"]:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {', '.join(TASKS)}")
    return TASKS[name]


class Task(abc.ABC):
    """Base class; subclasses set ``monitor`` and implement ``criterion``, ``metrics``, ``step`` and
    ``target_shape``."""

    name = ""
    monitor = ""  # what ModelCheckpoint keeps the best of (maximised); the report's accuracy column
    monitor_percent = False  # the monitored score is logged in percent (the report shows every score in percent)
    scores: tuple[str, ...] = ()  # the validation scores metrics.json records (val_<score>)

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    @abc.abstractmethod
    def criterion(self) -> nn.Module:
        """The loss module: ``criterion(output, labels)``."""

    @abc.abstractmethod
    def metrics(self) -> tuple[Optional[nn.Module], Optional[nn.Module], Optional[nn.Module]]:
        """(train, val, test) metric modules (None where a stage has none)."""

    @abc.abstractmethod
    def step(self, module, batch, stage: str, metric) -> torch.Tensor:
        """One batch of ``stage`` ("train", "val", "test"): the loss, with what the task logs through ``module``."""

    def epoch_end(self, module, stage: str, metric) -> None:
        """End of an evaluation epoch: scores kept over the epoch are logged here (default: nothing)."""

    @abc.abstractmethod
    def target_shape(self, batch_size: int, resolution: int) -> tuple[int, ...]:
        """The shape of a batch's labels for (batch_size, 3, resolution, resolution) inputs."""

    def random_targets(self, batch_size: int, resolution: int,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Random labels for a (batch_size, 3, resolution, resolution) input."""
        return torch.randint(0, self.num_classes, self.target_shape(batch_size, resolution), generator=generator)

    def random_batch(self, net: nn.Module, batch_size: int, size: int,
                     generator: Optional[torch.Generator] = None) -> tuple[object, torch.Tensor]:
        """A random (input, labels) batch for ``net`` (profile, benchmark): images (batch_size, 3, size, size), or
        for a language model (``net.random_input``) token ids of ``size`` tokens."""
        if getattr(net, "is_language_model", False):
            return net.random_input(batch_size, size), self.random_targets(batch_size, size, generator)
        x = torch.randn(batch_size, 3, size, size, generator=generator)
        return x, self.random_targets(batch_size, size, generator)


@register_task("classification")
class ClassificationTask(Task):
    """One class per sample: cross-entropy, top-1 accuracy over samples (as the paper reports; torchmetrics'
    default would be macro)."""

    monitor = "val/acc"
    scores = ("acc",)

    def criterion(self):
        return nn.CrossEntropyLoss()

    def metrics(self):
        return tuple(MulticlassAccuracy(self.num_classes, average="micro") for _ in range(3))

    def target_shape(self, batch_size, resolution):
        return (batch_size,)

    def step(self, module, batch, stage, metric):
        x, y = batch
        logits = module(x)
        loss = module.criterion(logits, y)
        metric(logits, y)
        on_step = stage == "train"
        module.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step,
                   batch_size=len(y))
        module.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss
