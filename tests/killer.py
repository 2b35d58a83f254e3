"""A callback the lifecycle tests put into a `main.py fit` subprocess: it sends the process a real signal at a chosen
training step (``--trainer.callbacks '[{"class_path": "killer.KillAt", ...}]'`` with tests/ on PYTHONPATH)."""
from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class KillAt(pl.Callback):
    def __init__(self, step: int, sig: str = "SIGKILL"):
        self.step, self.sig = step, sig

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.sig))


class KillInValidation(pl.Callback):
    """The signal while the end-of-epoch validation of ``epoch`` runs (its first batch): every training batch of the
    epoch is done, the epoch is not."""

    def __init__(self, epoch: int = 0, sig: str = "SIGTERM"):
        self.epoch, self.sig = epoch, sig

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.current_epoch == self.epoch and batch_idx == 0 and not trainer.sanity_checking:
            os.kill(os.getpid(), getattr(signal, self.sig))
