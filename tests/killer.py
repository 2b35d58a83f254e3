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
