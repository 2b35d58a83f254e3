"""Shared fixtures of the framework tests: tiny digits runs, in-process CLI, isolated ckpts/."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# One intra-op thread: the suite shares 2 cores with other processes, and OpenMP worker threads
# spinning on a busy machine made a 32x32 MCUNet step ~20x slower than single-threaded.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# A fit that takes seconds on one CPU core: MCUNet on digits at 32x32, a few batches.
TINY = ["--config", "configs/models/mcunet.yaml", "--config", "configs/data/digits.yaml",
        "--data.resolution", "32", "--data.batch_size", "32",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_model_summary", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1"]


@pytest.fixture
def ckpts(tmp_path, monkeypatch) -> Path:
    """An empty checkpoint folder (``$ASI_CKPT_DIR``) so tests never touch the repository's ckpts/."""
    path = tmp_path / "ckpts"
    monkeypatch.setenv("ASI_CKPT_DIR", str(path))
    return path


@pytest.fixture
def run_cli(tmp_path, ckpts, monkeypatch):
    """Run ``main.py <subcommand> <args>`` in-process from the repository root, runs under ``tmp_path/runs``.

    ``--config`` files given in ``args`` (recipes, methods) go before the tiny-run settings, so that
    those settings (1 epoch, 3 batches, 32x32) win over a recipe's paper-scale values.
    """
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["main.py"])  # pytest's own argv must not reach the parser

    def run(*args, tiny: bool = True, cli_class=None):
        from classification.cli import ASICLI, cli_main

        configs, rest, it = [], [], iter(args[1:])
        for a in it:
            (configs.extend([a, next(it)]) if a == "--config" else rest.append(a))
        argv = list(args[:1]) + configs + (TINY if tiny else []) + ["--run_root", str(tmp_path / "runs")] + rest
        return cli_main(argv, cli_class or ASICLI)

    return run
