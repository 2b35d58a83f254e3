"""The run directory's lifecycle: never lose or silently overwrite work.

Before a command runs, ``Run`` decides from what its directory holds (``metrics.json``, ``config.yaml``,
``checkpoints/{best,last}.ckpt``) and the command's settings and flags whether it

* ``fit``: starts (a fresh directory, or one cleared by ``--overwrite true`` or holding only an interrupted run that
  never reached its first checkpoint), resumes (``--ckpt_path``, ``--ckpt_path last``, or ``--resume true`` on an
  interrupted run: from its ``last.ckpt``), does nothing (``--resume true`` on a run that finished with the same
  settings) or is refused: a run is in the way, the checkpoint was made with other settings or belongs to another
  run, or a setup-B pretraining would replace another run's export;
* ``validate`` / ``test``: evaluates the run's ``best.ckpt`` by default, and never writes the results of untrained
  weights into a trained run.

A refusal raises ``RunRefused`` with the message the user sees (the CLI shows it as a parser error). During the fit,
``Run.record_start`` / ``Run.record_end`` keep ``metrics.json`` saying how far the run got, and a setup-B pretraining
(half 1) exports its weights to ``setup_b_checkpoint(...)`` for the fine-tuning runs (half 2).

Plain Python on files: nothing here knows about the command line (classification/cli.py calls it).
"""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Union

import torch

from .finetune import load_checkpoint_file
from .weights import ckpt_dir
from .rundir import METRICS_FILE, TRAINING_ONLY_MODEL_KEYS, read_metrics, run_settings, settings_diff, settings_hash, write_metrics


class RunRefused(Exception):
    """The command would lose or overwrite work, or cannot work with what the run directory holds; the message says
    why and what to do instead."""


def setup_b_checkpoint(backbone: str, dataset: str) -> Path:
    """Where a setup-B pretraining run (half 1) exports its weights and where fine-tuning looks for them."""
    return ckpt_dir() / "setupB" / f"{backbone}_{dataset}.ckpt"


def file_sha256(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_source(path: Path) -> Optional[str]:
    """The run that exported a setup-B checkpoint (its ``source_run``), None when unknown or unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True).get("source_run")
    except Exception:
        return None


def checkpoint_provenance(path: Union[str, Path]) -> dict:
    """What metrics.json records about the weights a run started from: path, SHA-256 and, for a setup-B export,
    the run that produced it."""
    path = Path(path)
    out = {"path": str(path.resolve()), "sha256": file_sha256(path)}
    src = export_source(path)
    if src is not None:
        out["source_run"] = src
    return out


def checkpoint_run(ckpt: Path) -> Optional[Path]:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/x.ckpt``), or None for a loose file."""
    run = ckpt.parent.parent
    if ckpt.parent.name == "checkpoints" and ((run / METRICS_FILE).is_file() or (run / "config.yaml").is_file()):
        return run
    return None


def is_launcher() -> bool:
    """False in the processes a DDP launcher starts (they re-run the command): they must neither refuse nor delete
    what the first process already decided about."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


@dataclass(frozen=True)
class FitDecision:
    """What a fit does: ``start`` from the model as built, ``resume`` from ``ckpt_path``, or nothing (``done``)."""

    action: Literal["start", "resume", "done"]
    ckpt_path: Optional[str] = None


@dataclass
class Run:
    """One run directory and the settings of the command that writes to it: the --model and --data options, the
    seed and the --trainer options (their result-changing keys, ``rundir.TRAINER_RESULT_KEYS``, count)."""

    path: Path
    model: Mapping[str, Any]
    data: Mapping[str, Any]
    seed: Any = None
    trainer: Optional[Mapping[str, Any]] = None
    launcher: bool = field(default_factory=is_launcher)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.previous_status: Optional[str] = None  # metrics.json's status when this fit started

    # ------------------------------------------------------------------ what the directory holds
    @property
    def last(self) -> Path:
        return self.path / "checkpoints" / "last.ckpt"

    @property
    def best(self) -> Path:
        return self.path / "checkpoints" / "best.ckpt"

    @property
    def pretrains_setup_b(self) -> bool:
        return self.data.get("setup") == "B" and self.data.get("half") == 1

    def settings(self, full: bool = True) -> dict:
        """``run_settings`` of this command: with ``full`` the result-changing trainer keys too ("done" compares
        those; the run's name leaves them out)."""
        return run_settings(self.model, self.data, self.seed, self.trainer if full else None)

    def has_run(self) -> bool:
        return (self.path / METRICS_FILE).is_file() or any((self.path / "checkpoints").glob("*.ckpt"))

    def describe(self) -> str:
        old = read_metrics(self.path)
        status = old.get("status") or ("finished" if "epochs_completed" in old else "interrupted or running")
        step = old.get("global_step")
        return f"{status}{f' at step {step}' if step is not None else ''}"

    def clear(self) -> None:
        for name in (METRICS_FILE, "config.yaml"):
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / "checkpoints", ignore_errors=True)

    # ------------------------------------------------------------------ checkpoints given to the command
    def check_checkpoint(self, ckpt: Path, what: str = "--ckpt_path", data_too: bool = True) -> None:
        """The checkpoint's model (and data) settings must be the command's: refused listing every difference."""
        try:
            obj = load_checkpoint_file(ckpt, what)
        except (OSError, ValueError) as err:
            raise RunRefused(str(err)) from None
        if not isinstance(obj, dict) or "state_dict" not in obj:
            raise RunRefused(f"{what} {ckpt} is not a Lightning checkpoint of this project (no 'state_dict'); resume "
                             f"from a run's checkpoints/last.ckpt, or start from plain weights with --model.checkpoint")
        hp = obj.get("hyper_parameters") or {}
        dhp = obj.get("datamodule_hyper_parameters") or {}
        # options both sides know (a checkpoint older than an option says nothing about it); evaluating weights
        # (data_too=False: validate/test) compares what the network computes, not how it was trained
        model_keys = [k for k in self.model if k in hp and (data_too or k not in TRAINING_ONLY_MODEL_KEYS)]
        data_keys = [k for k in self.data if k in dhp] if data_too else []
        mine = run_settings({k: self.model[k] for k in model_keys}, {k: self.data[k] for k in data_keys}, self.seed)
        theirs = run_settings({k: hp[k] for k in model_keys}, {k: dhp[k] for k in data_keys}, self.seed)
        diff = settings_diff(theirs, mine)
        if diff:
            raise RunRefused(f"{what} {ckpt} was made with other settings than this command's ({len(diff)} "
                             f"difference(s), checkpoint -> command): " + "; ".join(diff)
                             + ". Give the checkpoint's settings (its run's config.yaml: --config <run>/config.yaml), "
                               "or start a new run without " + what)

    def _check_resume_from(self, ckpt: Path, overwrite: bool) -> None:
        """A checkpoint to resume from: made with this command's settings, and of this run (or a loose file resumed
        into an empty directory, or into one that --overwrite clears)."""
        self.check_checkpoint(ckpt, "--ckpt_path", data_too=True)
        owner = checkpoint_run(ckpt)
        if owner is not None and owner.resolve() != self.path.resolve():
            raise RunRefused(f"--ckpt_path {ckpt} belongs to the run {owner}, but this command writes to "
                             f"{self.path}. Resume a run into its own directory (same settings, --exp_name and "
                             f"--run_root), or start from its weights in a new run with --model.checkpoint {ckpt}")
        if owner is None and self.launcher and self.has_run() and not overwrite:
            raise RunRefused(f"{self.path} already holds a run ({self.describe()}); resuming the loose "
                             f"checkpoint {ckpt} would write over it. Use another --exp_name, or --overwrite true")

    # ------------------------------------------------------------------ fit
    def prepare_fit(self, ckpt_path: Optional[str] = None, resume: bool = False,
                    overwrite: bool = False) -> FitDecision:
        """Decide, before anything runs, whether this fit starts, resumes (from which checkpoint), does nothing
        (--resume on a finished run) or is refused (``RunRefused``). May clear the directory: with --overwrite, or
        an interrupted run that has no checkpoint to resume from."""
        if ckpt_path == "last":
            ckpt_path = str(self.last) if self.last.is_file() else None
            checkpoints = list((self.path / "checkpoints").glob("*.ckpt")) if ckpt_path is None else []
            if ckpt_path is None and self.has_run() and not checkpoints and not overwrite:
                resume = True  # killed before its first checkpoint: as --resume (nothing to continue from: it starts
            elif ckpt_path is None:  # again); a run with other checkpoints (best.ckpt, the user's) is refused below
                _say(f"--ckpt_path last: {self.path} has no checkpoints/last.ckpt yet; starting the run")
        if overwrite and resume:
            raise RunRefused("--overwrite true (redo the run) and --resume true (continue it) exclude each other")
        if ckpt_path is None and resume and self.has_run():
            decision = self._resume()
            if decision.action == "done":
                return decision
            ckpt_path = decision.ckpt_path
        if ckpt_path is not None:
            self._check_resume_from(Path(ckpt_path), overwrite)
            return FitDecision("resume", ckpt_path)
        if self.launcher and self.has_run():
            if not overwrite:
                raise RunRefused(
                    f"{self.path} already holds a run ({self.describe()}); it is never overwritten silently. "
                    f"Continue it with --ckpt_path last (or --resume true), redo it with --overwrite true, or "
                    f"name another run with --exp_name")
            _say(f"--overwrite: discarding the run in {self.path}")
            self.clear()
        if self.launcher and self.pretrains_setup_b:
            self._check_export(overwrite)
        return FitDecision("start")

    def _resume(self) -> FitDecision:
        """--resume true on a directory holding a run: refused with other settings, nothing to do when it finished,
        else from its last.ckpt (an interrupted run without one is cleared and started)."""
        old = read_metrics(self.path)
        old_settings, new_settings = old.get("run_settings"), self.settings()
        if old_settings is not None and old_settings != new_settings:
            if self.launcher:
                raise RunRefused(f"--resume: {self.path} holds a run ({self.describe()}) made with other settings "
                                 f"(run -> command): " + "; ".join(settings_diff(old_settings, new_settings))
                                 + ". Redo it with --overwrite true, or name another run (--exp_name / --run_root)")
        elif old_settings is None and "epochs_completed" in old:
            if self.launcher:
                raise RunRefused(f"--resume: {self.path} holds a finished run that recorded no settings (made before "
                                 f"they were kept); whether it matches this command cannot be told. Keep it (leave it "
                                 f"out of the sweep) or redo it with --overwrite true")
        elif old.get("status") in ("finished", "diverged"):
            if self.launcher:
                _say(f"done: {self.path} already ran to its end with these settings (status {old['status']}, "
                     f"metrics.json); nothing to do")
            return FitDecision("done")
        elif self.last.is_file():
            if self.launcher:
                _say(f"--resume: continuing {self.path} from {self.last}")
            return FitDecision("resume", str(self.last))
        elif self.launcher:
            self.clear()  # interrupted before its first checkpoint: nothing to keep
        return FitDecision("start")

    def _check_export(self, overwrite: bool) -> None:
        """Setup B, half 1: the export of another run is replaced only with --overwrite true."""
        dst = setup_b_checkpoint(self.model["backbone"], self.data["name"])
        if dst.is_file() and not overwrite:
            src = export_source(dst)
            if src is None or Path(src).resolve() != self.path.resolve():
                raise RunRefused(f"{dst} already exists (exported by {src or 'an unknown run'}); this pretraining "
                                 f"would replace it. Pass --overwrite true to replace it, or move it away first")

    def record_start(self, command: list, resumed_from: Optional[str]) -> None:
        """metrics.json while the fit runs: status ``running``, the settings ``--resume`` compares, what started it."""
        self.previous_status = read_metrics(self.path).get("status")
        settings = self.settings()
        out = {"status": "running", "run_settings": settings, "settings_hash": settings_hash(settings),
               "command": command, "resumed_from": resumed_from}
        if self.model.get("checkpoint"):  # which weights this run started from, by content
            out["init_checkpoint"] = checkpoint_provenance(self.model["checkpoint"])
        write_metrics(self.path, out)

    def record_end(self, out: dict, best_ckpt: Optional[str], state_dict: Callable[[], dict]) -> dict:
        """metrics.json at the end of the fit: ``out`` (the results) with the run's status and, for a setup-B
        pretraining, the export (the weights of ``best_ckpt``, else ``state_dict()``, the model's)."""
        fit = out.get("fit") or {}
        diverged = sorted(k for k, v in fit.items() if "loss" in k and not math.isfinite(v))
        if not fit:  # resumed at its end: nothing trained in this call, the recorded results and status stay
            out.pop("fit", None)
            out["status"] = self.previous_status or "finished"
        elif diverged:
            out["status"], out["diverged"] = "diverged", diverged
            _say(f"warning: the run diverged: {', '.join(diverged)} not finite "
                 f"({out.get('nonfinite_train_steps')} training step(s) had a non-finite loss); metrics.json marks "
                 f"it \"status\": \"diverged\" and the report shows it as such")
        else:
            out["status"] = "finished"
        if self.pretrains_setup_b:
            exported = self.export_pretrained(best_ckpt, state_dict)
            out["exported_ckpt"], out["exported_ckpt_sha256"] = str(exported), file_sha256(exported)
        return write_metrics(self.path, out)

    def export_pretrained(self, best_ckpt: Optional[str], state_dict: Callable[[], dict]) -> Path:
        """Setup B, half 1: save the best weights (``best_ckpt``'s, else ``state_dict()``) where half-2 fine-tuning
        runs look for them. An existing export of another run was refused before the fit started unless --overwrite
        true (``prepare_fit``)."""
        best = best_ckpt or None
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"] if best else state_dict()
        backbone, dataset = self.model["backbone"], self.data["name"]
        dst = setup_b_checkpoint(backbone, dataset)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        torch.save({"state_dict": {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")},
                    "backbone": backbone, "dataset": dataset, "num_classes": self.model.get("num_classes"),
                    "source_run": str(self.path.resolve()), "source_ckpt": best}, tmp)
        if dst.is_file():
            _say(f"--overwrite: replacing {dst} (was {export_source(dst)})")
        tmp.replace(dst)
        return dst

    # ------------------------------------------------------------------ validate / test
    def prepare_evaluation(self, stage: str, ckpt_path: Optional[str] = None) -> Optional[str]:
        """validate/test: the checkpoint to evaluate (default: the run's best); never untrained weights into a
        trained run (``RunRefused``), and a given checkpoint must have this command's model settings."""
        if ckpt_path is None:
            if self.best.is_file():
                _say(f"{stage}: using the run's best checkpoint {self.best}")
                return str(self.best)
            if self.has_run():
                raise RunRefused(f"{self.path} holds a trained run but no checkpoints/best.ckpt: give the weights to "
                                 f"{stage} with --ckpt_path (evaluating the untrained model would replace "
                                 f"the run's results)")
            _say(f"{stage}: no run with these settings in {self.path} (no checkpoints/best.ckpt): evaluating the "
                 f"model as built, untrained. To evaluate a fit, give the same settings as its fit (or its "
                 f"--exp_name), or --ckpt_path")
        elif ckpt_path not in ("best", "last"):
            self.check_checkpoint(Path(ckpt_path), "--ckpt_path", data_too=False)
            owner = checkpoint_run(Path(ckpt_path))
            if owner is not None and owner.resolve() != self.path.resolve() and self.has_run():
                raise RunRefused(f"--ckpt_path {ckpt_path} belongs to the run {owner}, but this command's results go "
                                 f"to the run {self.path}, which would then hold another run's scores. Evaluate it in "
                                 f"its own run (its settings: --config {owner}/config.yaml, or its --exp_name)")
        return ckpt_path
