"""Callbacks that record facts about a run into its metrics.json (see rundir.write_metrics).

Others add memory / FLOPs / timing recorders here; each writes its own keys.
"""
from __future__ import annotations

import hashlib

import pytorch_lightning as pl
import torch

from .rundir import write_metrics


def weights_digest(module: torch.nn.Module) -> bytes:
    """SHA-256 over every parameter (name, dtype, shape, bytes) in registration order."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        t = p.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.digest()


class WeightsDigest(pl.Callback):
    """At the end of training every process hashes its weights; the hashes are gathered and rank 0
    writes ``weights_digests`` (one hex string per rank) and ``ranks_in_sync`` to metrics.json.

    Under DDP all ranks must end with identical weights; a mismatch is a bug worth seeing.
    (Compression buffers such as ASI's warm-start factors are per-rank state and are not hashed.)
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mine = torch.tensor(list(weights_digest(pl_module)), dtype=torch.uint8, device=pl_module.device)
        gathered = trainer.strategy.all_gather(mine.to(torch.int32))  # gloo has no uint8 all_gather everywhere
        gathered = gathered.reshape(-1, mine.numel()).cpu()
        digests = [bytes(row.to(torch.uint8).tolist()).hex() for row in gathered]
        if trainer.is_global_zero:
            write_metrics(trainer.default_root_dir, {"weights_digests": digests,
                                                     "ranks_in_sync": len(set(digests)) == 1})
