"""Scale-out with Lightning itself: the same command as a 2-process CPU DDP (gloo) fit."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from classification.callbacks import weights_digest
from classification.model import ClassificationModel
from conftest import REPO, TINY


def test_two_process_cpu_ddp_fit_ends_with_identical_weights(tmp_path):
    env = {**os.environ, "ASI_CKPT_DIR": str(tmp_path / "ckpts"), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "main.py", "fit", *TINY, "--config", "configs/methods/asi.yaml",
           "--data.resolution", "16", "--run_root", str(tmp_path / "runs"), "--exp_name", "ddp",
           "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run = tmp_path / "runs" / "setupA" / "mcunet" / "digits" / "asi" / "ddp"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["settings"]["world_size"] == 2 and metrics["global_step"] == 3
    # each process hashed its own weights at the end; the hashes were gathered to rank 0
    digests = metrics["weights_digests"]
    assert len(digests) == 2 and digests[0] == digests[1] and metrics["ranks_in_sync"]

    # ... and they are the weights in the saved checkpoint, which training did change
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    torch.manual_seed(0)  # the CLI's seed_everything(0): the same initial weights as the run's
    model = ClassificationModel(**{k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")})
    initial = weights_digest(model).hex()
    model.load_state_dict(ckpt["state_dict"])
    assert weights_digest(model).hex() == digests[0] != initial
