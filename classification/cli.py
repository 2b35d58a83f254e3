"""The project's command line: ``python main.py {fit,validate,test,...} --config ... [--section.key value]``.

``ASICLI`` is a LightningCLI over ``ClassificationModel`` and ``ClassificationData`` that adds:

* a run directory ``runs/setup<A|B>/<model>/<dataset>/<method>/<exp_name>/`` holding TensorBoard and
  CSV logs, the resolved ``config.yaml``, ``checkpoints/{best,last}.ckpt`` and ``metrics.json``;
* setup B plumbing: a half-1 (pretraining) fit exports its weights to ``ckpts/setupB/<model>_<dataset>.ckpt``,
  which half-2 (fine-tuning) runs load by default as ``--model.checkpoint``;
* the paper's trainer defaults (L2 gradient clipping 2.0) and a Rich progress bar.

Adding a subcommand
-------------------
One method on ``ASICLI`` (or a subclass) decorated with ``@subcommand``. It receives the instantiated
``model`` and ``datamodule`` (and can use ``self.trainer`` / ``self.run_dir``); its other typed,
documented parameters become the subcommand's options::

    @subcommand
    def measure(self, model, datamodule, batches: int = 5):
        '''Measure activation memory of the fine-tuned layers.

        Args:
            batches: number of training batches to average over.
        '''

``@subcommand(nested=True)`` puts the options under the subcommand's name instead (``--measure.epsilons``: the
real ``measure`` subcommand below, classification/measure.py).

A command that needs no model (e.g. a report over finished runs) is one entry in
``STANDALONE_COMMANDS`` (name -> function); its signature becomes its options (jsonargparse.CLI), and a first
parameter typed as a list takes the words before the first option (``report runs/a runs/b --format csv``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable, List, Literal, Optional, Union

import torch
from jsonargparse import Namespace
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar, RichProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback, _get_short_description
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

import asi_core

from .backbones import MODELS, ckpt_dir
from .callbacks import ResourceAccounting, RunStatus, WeightsDigest
from .data import DATASETS, ClassificationData, check_data_options, input_shape_of, num_classes_of
from .llm import is_llm, source_of as tokenizer_source
from .measure import PAPER_EPSILONS, PERPLEXITY_FILE, measure_exp_name
from .model import (ASI_DEFAULT_RANKS, MODEL_METHODS, ClassificationModel, RandomBackboneWarning, check_model_options,
                    load_checkpoint_file)
from .report import report
from .rundir import (METRICS_FILE, default_exp_name, read_metrics, run_dir, run_settings, settings_diff,
                     settings_hash, write_metrics)

# The paper's recipe (App. B.1) where it is a Trainer setting; every key stays overridable.
TRAINER_DEFAULTS = {"gradient_clip_val": 2.0, "gradient_clip_algorithm": "norm", "max_epochs": 50,
                    "log_every_n_steps": 10}

STANDALONE_COMMANDS: dict[str, Callable] = {}
STANDALONE_COMMANDS["report"] = report


def subcommand(fn: Optional[Callable] = None, *, defaults: Optional[dict] = None, nested: bool = False) -> Callable:
    """Mark an ``ASICLI`` method as a subcommand named like the method. ``@subcommand(defaults={"model.ranks": 1})``
    also changes parser defaults for that subcommand only (a --config file or a command-line value still wins).
    ``@subcommand(nested=True)`` puts the method's options under its name: ``measure --measure.epsilons ...``
    (and a ``measure:`` section in a config file) instead of ``--epsilons``."""
    if fn is None:
        return lambda f: subcommand(f, defaults=defaults, nested=nested)
    fn._asi_subcommand = True
    fn._asi_defaults = dict(defaults or {})
    fn._asi_nested = nested
    return fn


def setup_b_checkpoint(backbone: str, dataset: str) -> Path:
    """Where a setup-B pretraining run (half 1) exports its weights and where fine-tuning looks for them."""
    return ckpt_dir() / "setupB" / f"{backbone}_{dataset}.ckpt"


def file_sha256(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _export_source(path: Path) -> Optional[str]:
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
    src = _export_source(path)
    if src is not None:
        out["source_run"] = src
    return out


class RunConfigSaver(SaveConfigCallback):
    """Writes the resolved config to ``<run_dir>/config.yaml`` (``config_<stage>.yaml`` for validate/test)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            stage = getattr(stage, "value", stage)  # TrainerFn enum or str
            name = "config.yaml" if stage == "fit" else f"config_{stage}.yaml"
            path = Path(trainer.default_root_dir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=False)
        self.already_saved = True


class ASICLI(LightningCLI):
    def __init__(self, args=None, run: bool = True, **kwargs):
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)  # the recipe lives in ClassificationModel
        self.run_dir: Optional[Path] = None
        super().__init__(ClassificationModel, ClassificationData, args=args, run=run, **kwargs)

    def _parse_ckpt_path(self) -> None:
        """Lightning's CLI would replace the command's --model options by the checkpoint's hyper-parameters, so that a
        resume silently trains other settings than the command says. Here the command's settings stay, and
        ``_check_checkpoint_settings`` refuses a checkpoint made with other ones, listing the differences."""

    # ------------------------------------------------------------------ subcommand registry
    @classmethod
    def extra_subcommands(cls) -> list[str]:
        names = []
        for klass in reversed(cls.__mro__):
            names += [n for n, f in vars(klass).items() if getattr(f, "_asi_subcommand", False) and n not in names]
        return names

    @classmethod
    def subcommands(cls) -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), **{n: {"model", "datamodule"} for n in cls.extra_subcommands()}}

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        # As LightningCLI's, except that a subcommand may be a method of this class instead of the Trainer's.
        self._subcommand_parsers = {}
        parser_subcommands = parser.add_subcommands()
        extra = self.extra_subcommands()
        for name in self.subcommands():
            owner = type(self) if name in extra else self.trainer_class
            description = _get_short_description(getattr(owner, name))
            sub_kwargs = dict(kwargs.get(name, {}))
            sub_kwargs.setdefault("description", description)
            self._subcommand_parsers[name] = self._prepare_subcommand_parser(owner, name, **sub_kwargs)
            self._subcommand_parsers[name].set_defaults(getattr(getattr(owner, name), "_asi_defaults", {}))
            parser_subcommands.add_subcommand(name, self._subcommand_parsers[name], help=description)

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand not in self.extra_subcommands():
            return super()._run_subcommand(subcommand)
        for hook in (f"before_{subcommand}", subcommand, f"after_{subcommand}"):
            fn = getattr(self, hook, None)
            if callable(fn):
                fn(**self._prepare_subcommand_kwargs(subcommand)) if hook == subcommand else fn()

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs) -> LightningArgumentParser:
        if not getattr(getattr(klass, subcommand), "_asi_nested", False):
            return super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser = self.init_parser(**kwargs)  # as LightningCLI's, with the options nested under the name
        self._add_arguments(parser)
        self._subcommand_method_arguments[subcommand] = parser.add_method_arguments(
            klass, subcommand, nested_key=subcommand, skip=set(self.subcommands()[subcommand]))
        return parser

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        if not getattr(getattr(type(self), subcommand, None), "_asi_nested", False):
            return super()._prepare_subcommand_kwargs(subcommand)
        cfg = self.config_init[subcommand]
        return {"model": self.model, "datamodule": self.datamodule,
                **{k.split(".", 1)[1]: cfg[k] for k in self._subcommand_method_arguments[subcommand]}}

    # ------------------------------------------------------------------ parser
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--exp_name", type=Optional[str], default=None,
                            help="Last component of the run directory; default: derived from the method's settings.")
        parser.add_argument("--run_root", type=str, default="runs",
                            help="Root of the run directories (runs/<setup>/<model>/<dataset>/<method>/<exp_name>/).")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit: discard what the run directory already holds (checkpoints, metrics.json, "
                                 "config) and redo the run; a setup-B pretraining also replaces the exported "
                                 "checkpoint. Without it a fit into a directory holding a run is refused.")
        parser.add_argument("--resume", type=bool, default=False,
                            help="fit: continue the run in this directory: resume an interrupted run from its "
                                 "last.ckpt, do nothing when it finished with the same settings, refuse (listing "
                                 "the differences) when it ran with other settings; start it when there is none.")
        parser.link_arguments("data.name", "model.num_classes", compute_fn=num_classes_of)
        # the model checks a --model.perplexity_file against the input shape at construction, before any data loads
        parser.link_arguments(("data.batch_size", "data.resolution", "data.name", "data.max_length"), "model.input_shape",
                              compute_fn=input_shape_of)

    def _section(self) -> Namespace:
        return self.config[self.subcommand] if self.subcommand else self.config

    def _check_choices(self, cfg: Namespace) -> None:
        for what, value, choices in (("model", cfg.model.backbone, MODELS), ("dataset", cfg.data.name, DATASETS),
                                     ("method", cfg.model.method, MODEL_METHODS)):
            if value not in choices:
                self._parser(self.subcommand).error(
                    f"Unknown {what} {value!r}; valid choices: {', '.join(choices)}")
        model_task, data_task = MODELS[cfg.model.backbone].task, DATASETS[cfg.data.name].task
        if model_task != data_task:
            same = [n for n, s in DATASETS.items() if s.task == model_task]
            self._parser(self.subcommand).error(
                f"--model.backbone {cfg.model.backbone} is a {model_task} model but --data.name {cfg.data.name} is a "
                f"{data_task} dataset; choose one of {', '.join(same)} (or a {data_task} model)")

    def before_instantiate_classes(self) -> None:
        cfg = self._section()
        self._check_config_sections(cfg)
        self._check_choices(cfg)
        m, d = cfg.model, cfg.data
        if self.subcommand == "measure":  # the fit's weights; vanilla, every layer trainable (nothing is optimised)
            m.method, m.num_finetune, m.ranks, m.perplexity_file, m.budget = "vanilla", "all", None, None, None
        if self.subcommand == "profile" and m.ranks is None and m.get("perplexity_file") is None:
            m.ranks = 1  # profile's asi default (fit's: 4); given ranks or a perplexity file win
        if self.subcommand == "benchmark" and m.ranks is None and m.get("perplexity_file") is None:
            m.ranks = 2  # benchmark's asi default: rank 2 on every mode (the paper's latency setting)
        self._check_numbers(cfg)
        if self.subcommand == "profile" and m.get("shape_only") is None and is_llm(m.backbone):
            m.shape_only = True  # an LLM's profile runs shape-only (FakeTensorMode): real shapes, no arithmetic
        if d.get("tokenizer") is None and DATASETS[d.name].kind == "text" and is_llm(m.backbone):
            d.tokenizer = tokenizer_source(m.backbone, m.get("name_or_path"))  # the model's own tokenizer
        if self.subcommand in ("profile", "benchmark"):  # random weights on random input: nothing to load or download
            m.pretrained = False
            warnings.filterwarnings("ignore", category=RandomBackboneWarning)
        elif d.setup == "B" and d.half == 2 and m.checkpoint is None:
            default = setup_b_checkpoint(m.backbone, d.name)
            if not default.is_file():
                self._parser(self.subcommand).error(
                    f"setup B fine-tuning (half 2) starts from a checkpoint pretrained on half 1: pass "
                    f"--model.checkpoint, or create {default} with a pretraining run (--data.half 1 "
                    f"--model.method vanilla --model.num_finetune all, configs/recipes/setupB_pretrain.yaml)")
            m.checkpoint = str(default)
        if cfg.trainer.default_root_dir:
            self.run_dir = Path(cfg.trainer.default_root_dir)
        else:
            ranks = ASI_DEFAULT_RANKS if m.ranks is None else m.ranks
            # a readable prefix (what differs between runs of one method) + a digest of every setting that changes
            # the result (model, data, seed), so two runs with different settings never share a directory
            tag = settings_hash(run_settings(m.as_dict(), d.as_dict(), cfg.get("seed_everything")))
            exp = cfg.exp_name or (("pretrain" if d.setup == "B" and d.half == 1 else
                                    default_exp_name(m.method, m.num_finetune, ranks, m.eps, self._radius_name(m),
                                                     m.budget, m.warm_start)) + f"_{tag}")
            kind = m.method
            if self.subcommand == "measure":
                kind, exp = "measure", cfg.exp_name or measure_exp_name(cfg.measure.num_finetune, d.batch_size,
                                                                        d.resolution)
            self.run_dir = run_dir(cfg.run_root, d.setup, m.backbone, d.name, kind, exp)
            cfg.trainer.default_root_dir = str(self.run_dir)
        if self.subcommand == "fit":  # (None: run=False, the classes are built and nothing runs)
            self._prepare_fit(cfg)
        elif self.subcommand in ("validate", "test"):
            self._prepare_evaluation(cfg)

    # ------------------------------------------------------------------ run lifecycle
    def _error(self, msg: str):
        self._parser(self.subcommand).error(msg)

    def _check_config_sections(self, cfg: Namespace) -> None:
        """A --config file whose ``model:``/``data:``/``trainer:`` is not a mapping (``model: [1, 2, 3]``) would
        silently leave every option at its default: refuse it, naming the file."""
        import yaml

        for path in cfg.get("config") or []:
            path = getattr(path, "absolute", None) or getattr(path, "relative", None) or str(path)
            try:
                doc = yaml.safe_load(Path(str(path)).read_text())
            except (OSError, yaml.YAMLError):
                continue  # jsonargparse already reported an unreadable file
            if not isinstance(doc, dict):
                self._error(f"--config {path}: expected a mapping of sections (model:, data:, trainer: ...), "
                            f"got {type(doc).__name__}")
            for key, value in doc.items():
                if key in ("model", "data", "trainer", self.subcommand) and value is not None \
                        and not isinstance(value, dict):
                    self._error(f"--config {path}: section {key!r} must be a mapping of options (e.g. "
                                f"'{key}:\\n  name: value'), got {type(value).__name__} {value!r}")

    def _check_numbers(self, cfg: Namespace) -> None:
        """Numbers that cannot work, refused before any work starts with the option, the value and the range;
        options the method ignores, set away from their defaults, are named in a warning."""
        try:
            check_data_options(**cfg.data.as_dict())
            check_model_options(**cfg.model.as_dict())  # its warnings come from the model's constructor
            if self.subcommand == "benchmark":
                b = cfg.benchmark
                if not (isinstance(b.steps, int) and b.steps >= 1):
                    raise ValueError(f"--benchmark.steps {b.steps!r} is invalid: it must be an integer >= 1 (timed "
                                     f"steps per method)")
                if not (isinstance(b.warmup, int) and b.warmup >= 0):
                    raise ValueError(f"--benchmark.warmup {b.warmup!r} is invalid: it must be an integer >= 0")
        except ValueError as err:
            self._error(str(err))

    def _settings_of(self, cfg: Namespace, full: bool = True) -> dict:
        return run_settings(cfg.model.as_dict(), cfg.data.as_dict(), cfg.get("seed_everything"),
                            cfg.trainer.as_dict() if full else None)

    def _is_launcher(self) -> bool:
        """False in the processes a DDP launcher starts (they re-run this command): they must neither refuse nor
        delete what the first process already decided about."""
        return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"

    def _checkpoint_run(self, ckpt: Path) -> Optional[Path]:
        """The run directory a checkpoint belongs to (``<run>/checkpoints/x.ckpt``), or None for a loose file."""
        run = ckpt.parent.parent
        if ckpt.parent.name == "checkpoints" and ((run / METRICS_FILE).is_file() or (run / "config.yaml").is_file()):
            return run
        return None

    def _check_checkpoint_settings(self, cfg: Namespace, ckpt: Path, what: str, data_too: bool) -> None:
        """The checkpoint's model (and data) settings must be the command's: an error lists every difference."""
        try:
            obj = load_checkpoint_file(ckpt, what)
        except (OSError, ValueError) as err:
            self._error(str(err))
        if not isinstance(obj, dict) or "state_dict" not in obj:
            self._error(f"{what} {ckpt} is not a Lightning checkpoint of this project (no 'state_dict'); resume from "
                        f"a run's checkpoints/last.ckpt, or start from plain weights with --model.checkpoint")
        hp = obj.get("hyper_parameters") or {}
        dhp = obj.get("datamodule_hyper_parameters") or {}
        seed = cfg.get("seed_everything")
        # options both sides know (a checkpoint older than an option says nothing about it)
        model_keys = [k for k in cfg.model.as_dict() if k in hp]
        data_keys = [k for k in cfg.data.as_dict() if k in dhp] if data_too else []
        mine = run_settings({k: cfg.model[k] for k in model_keys}, {k: cfg.data[k] for k in data_keys}, seed)
        theirs = run_settings({k: hp[k] for k in model_keys}, {k: dhp[k] for k in data_keys}, seed)
        diff = settings_diff(theirs, mine)
        if diff:
            self._error(f"{what} {ckpt} was made with other settings than this command's ({len(diff)} "
                        f"difference(s), checkpoint -> command): " + "; ".join(diff)
                        + ". Give the checkpoint's settings (its run's config.yaml: --config <run>/config.yaml), or "
                          "start a new run without " + what)

    def _has_run(self) -> bool:
        return (self.run_dir / METRICS_FILE).is_file() or any((self.run_dir / "checkpoints").glob("*.ckpt"))

    def _describe_run(self) -> str:
        old = read_metrics(self.run_dir)
        status = old.get("status") or ("finished" if "epochs_completed" in old else "interrupted or running")
        step = old.get("global_step")
        return f"{status}{f' at step {step}' if step is not None else ''}"

    def _clear_run(self) -> None:
        for name in (METRICS_FILE, "config.yaml"):
            (self.run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.run_dir / "checkpoints", ignore_errors=True)

    def _prepare_fit(self, cfg: Namespace) -> None:
        """Never lose or silently overwrite work: decide, before anything runs, whether this fit starts, resumes
        (from which checkpoint), does nothing (--resume on a finished run) or is refused."""
        launcher = self._is_launcher()
        last = self.run_dir / "checkpoints" / "last.ckpt"
        if cfg.ckpt_path == "last":
            cfg.ckpt_path = str(last) if last.is_file() else None
            if cfg.ckpt_path is None:
                print(f"--ckpt_path last: {self.run_dir} has no checkpoints/last.ckpt yet; starting the run",
                      file=sys.stderr)
        if cfg.overwrite and cfg.resume:
            self._error("--overwrite true (redo the run) and --resume true (continue it) exclude each other")
        if cfg.ckpt_path is None and cfg.resume and self._has_run():
            old = read_metrics(self.run_dir)
            old_settings, new_settings = old.get("run_settings"), self._settings_of(cfg)
            if old_settings is not None and old_settings != new_settings:
                if launcher:
                    self._error(f"--resume: {self.run_dir} holds a run ({self._describe_run()}) made with other "
                                f"settings (run -> command): " + "; ".join(settings_diff(old_settings, new_settings))
                                + ". Redo it with --overwrite true, or name another run (--exp_name / --run_root)")
            elif old_settings is None and "epochs_completed" in old:
                if launcher:
                    self._error(f"--resume: {self.run_dir} holds a finished run that recorded no settings (made "
                                f"before they were kept); whether it matches this command cannot be told. Keep it "
                                f"(leave it out of the sweep) or redo it with --overwrite true")
            elif old.get("status") in ("finished", "diverged"):
                if launcher:
                    print(f"done: {self.run_dir} already ran to its end with these settings (status "
                          f"{old['status']}, metrics.json); nothing to do", file=sys.stderr)
                raise SystemExit(0)
            elif last.is_file():
                cfg.ckpt_path = str(last)
                if launcher:
                    print(f"--resume: continuing {self.run_dir} from {last}", file=sys.stderr)
            elif launcher:
                self._clear_run()  # interrupted before its first checkpoint: nothing to keep
        if cfg.ckpt_path is not None:
            ckpt = Path(cfg.ckpt_path)
            self._check_checkpoint_settings(cfg, ckpt, "--ckpt_path", data_too=True)
            owner = self._checkpoint_run(ckpt)
            if owner is not None and owner.resolve() != self.run_dir.resolve():
                self._error(f"--ckpt_path {ckpt} belongs to the run {owner}, but this command writes to "
                            f"{self.run_dir}. Resume a run into its own directory (same settings, --exp_name and "
                            f"--run_root), or start from its weights in a new run with --model.checkpoint {ckpt}")
            if owner is None and launcher and self._has_run() and not cfg.overwrite:
                self._error(f"{self.run_dir} already holds a run ({self._describe_run()}); resuming the loose "
                            f"checkpoint {ckpt} would write over it. Use another --exp_name, or --overwrite true")
            return
        if launcher and self._has_run():
            if not cfg.overwrite:
                self._error(
                    f"{self.run_dir} already holds a run ({self._describe_run()}); it is never overwritten silently. "
                    f"Continue it with --ckpt_path last (or --resume true), redo it with --overwrite true, or "
                    f"name another run with --exp_name")
            print(f"--overwrite: discarding the run in {self.run_dir}", file=sys.stderr)
            self._clear_run()
        d = cfg.data
        if launcher and d.setup == "B" and d.half == 1:
            dst = setup_b_checkpoint(cfg.model.backbone, d.name)
            if dst.is_file() and not cfg.overwrite:
                src = _export_source(dst)
                if src is None or Path(src).resolve() != self.run_dir.resolve():
                    self._error(f"{dst} already exists (exported by {src or 'an unknown run'}); this pretraining "
                                f"would replace it. Pass --overwrite true to replace it, or move it away first")

    def _prepare_evaluation(self, cfg: Namespace) -> None:
        """validate/test: default to the run's best checkpoint; never evaluate untrained weights into a trained run."""
        best = self.run_dir / "checkpoints" / "best.ckpt"
        if cfg.ckpt_path is None:
            if best.is_file():
                cfg.ckpt_path = str(best)
                print(f"{self.subcommand}: using the run's best checkpoint {best}", file=sys.stderr)
            elif self._has_run():
                self._error(f"{self.run_dir} holds a trained run but no checkpoints/best.ckpt: give the weights to "
                            f"{self.subcommand} with --ckpt_path (evaluating the untrained model would replace "
                            f"the run's results)")
            else:
                print(f"{self.subcommand}: no run with these settings in {self.run_dir} (no checkpoints/best.ckpt): "
                      f"evaluating the model as built, untrained. To evaluate a fit, give the same settings as "
                      f"its fit (or its --exp_name), or --ckpt_path", file=sys.stderr)
        elif cfg.ckpt_path not in ("best", "last"):
            self._check_checkpoint_settings(cfg, Path(cfg.ckpt_path), "--ckpt_path", data_too=False)

    @staticmethod
    def _radius_name(m) -> Union[int, str]:
        """``authors`` where the segmentation layer sets give the gradient filter its per-layer radii."""
        from segmentation.layer_sets import layer_set

        return "authors" if m.get("layers") is None and layer_set(m.backbone, m.num_finetune) else m.radius

    def after_instantiate_classes(self) -> None:
        self.datamodule.run_dir = self.run_dir

    def instantiate_trainer(self, **kwargs) -> Trainer:
        tcfg = self._get(self.config_init, "trainer", default={})
        callbacks = list(tcfg.get("callbacks") or [])
        loggers_on = tcfg.get("logger") in (None, True)
        if loggers_on:
            kwargs["logger"] = [TensorBoardLogger(str(self.run_dir), name="tensorboard"),
                                CSVLogger(str(self.run_dir), name="csv")]
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        if tcfg.get("enable_checkpointing") is not False and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            ckdir = str(self.run_dir / "checkpoints")
            callbacks.append(ModelCheckpoint(dirpath=ckdir, filename="best", monitor=getattr(self.model, "monitor", "val/acc"),
                                             mode="max",
                                             enable_version_counter=False))
            # last.ckpt: the state at the end of every training epoch (after the epoch is complete, so a resume
            # starts the next epoch) and at an interruption (SIGTERM, Ctrl-C, an exception), whatever val/acc did
            callbacks.append(ModelCheckpoint(dirpath=ckdir, filename="last", monitor=None, save_top_k=1,
                                             save_on_train_epoch_end=True, save_on_exception=True,
                                             enable_version_counter=False))
        if tcfg.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(RichProgressBar())
        callbacks.append(WeightsDigest())
        if self.subcommand in (None, "fit"):
            callbacks.append(RunStatus())
        if self.subcommand in (None, "fit") and not any(isinstance(c, ResourceAccounting) for c in callbacks):
            callbacks.append(ResourceAccounting())  # metrics.json["resources"]: memory, FLOPs, step timing
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    # ------------------------------------------------------------------ profile
    @subcommand
    def profile(self, model, datamodule, device: str = "auto"):
        """One training step on random input: activation memory (analytic and measured) and FLOPs of the
        fine-tuned layers, printed as one JSON object on the last line of stdout.

        Random weights (--model.pretrained is forced to false, no setup-B checkpoint is looked for) and a random
        batch of shape (--data.batch_size, 3, --data.resolution, --data.resolution), for an LLM backbone random token
        ids (--data.batch_size, tokens: --data.max_length, 65 for digits_tokens): no dataset, no download. LLMs run
        shape-only (--model.shape_only, fake tensors: real shapes and saved tensors, no arithmetic, no memory).
        asi uses --model.ranks, whose default is 1 here (4 for fit); ranks given on the command line or in a
        --config file, or chosen from --model.perplexity_file, win. classification/resources.py documents the figures.

        Args:
            device: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
        """
        from .resources import profile_report

        shape = input_shape_of(datamodule.batch_size, datamodule.resolution, datamodule.name, datamodule.max_length)
        out = profile_report(model, datamodule.batch_size, datamodule.resolution, device,
                             max_length=shape[1] if len(shape) == 2 else None)  # text: (batch, tokens)
        print(json.dumps(out), flush=True)
        self.profile_result = out

    # ------------------------------------------------------------------ benchmark
    @subcommand(nested=True)
    def benchmark(self, model, datamodule, methods: Union[List[str], str] = "vanilla,gradfilter,hosvd,asi",
                  steps: int = 5, warmup: int = 1, per_layer: bool = False, device: str = "auto"):
        """Latency of training steps per method on random input, interleaved in one process (paper Fig. 5).

        Builds one network per method from the --model arguments (random weights, --model.pretrained forced to
        false) and times forward, backward and optimiser step on a random batch of shape (--data.batch_size, 3,
        --data.resolution, --data.resolution), methods interleaved (A B C D A B C D ...) after warm-up. Prints one
        JSON object as the last stdout line: {"config", "methods": {name: {forward_s, backward_s, optimizer_s,
        step_s}} (medians), "ratios_to_vanilla" (time ratios, < 1 is faster), "speedup_vs_vanilla"}, and with
        per_layer the weight-gradient computation of each fine-tuned layer timed alone. asi uses --model.ranks
        (default 2 here: rank 2 on every mode of every layer), hosvd --model.eps, gradfilter --model.radius.

        Args:
            methods: Comma-separated (or a list) subset of vanilla,gradfilter,hosvd,asi; each may carry
                +checkpointing or +recompute (e.g. vanilla,vanilla+checkpointing,asi) to time that variant beside it.
            steps: Timed steps per method (medians are reported).
            warmup: Untimed steps per method first.
            per_layer: Also time each fine-tuned layer's weight-gradient computation alone.
            device: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
        """
        from .benchmark import benchmark_models

        names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
        shape = input_shape_of(datamodule.batch_size, datamodule.resolution, datamodule.name, datamodule.max_length)
        size = shape[1] if len(shape) == 2 else datamodule.resolution  # text: tokens per sample
        out = benchmark_models(self._section().model.as_dict(), names, datamodule.batch_size,
                               size, steps=steps, warmup=warmup, per_layer=per_layer, device=device)
        print(json.dumps(out), flush=True)
        self.benchmark_result = out

    # ------------------------------------------------------------------ measure
    @subcommand(nested=True)
    def measure(self, model, datamodule, epsilons: Union[List[float], str] = PAPER_EPSILONS, num_batches: int = 1,
                num_finetune: Union[int, Literal["all"]] = "all", out: Optional[str] = None, overwrite: bool = False,
                full_rank_factors: bool = False):
        """Measure the activation perplexity table that --model.perplexity_file/--model.budget select ASI ranks from.

        Per conv layer and eps (paper Sec. 3.3): the HOSVD ranks, the compressed memory (eq. 5, MiB) and the
        activation perplexity (eq. 7) on training batches, written to perplexity.json and a PNG. The model is built
        as fit builds it (weights, --model.checkpoint, setup B) but vanilla and never optimised: --model.method,
        ranks and num_finetune are ignored. See classification/measure.py.

        Args:
            epsilons: Explained-variance thresholds, comma-separated ("0.4,0.5") or a list (paper: 0.4,...,0.9).
            num_batches: K: full training batches to average the perplexity over (ranks: the largest seen).
            num_finetune: Measure the last N conv layers, or "all"; fine-tuning may use any subset of them.
            out: Output JSON path; default runs/setup<A|B>/<model>/<dataset>/measure/<exp_name>/perplexity.json
                with exp_name l<num_finetune>_bs<batch_size>_res<resolution>. The PNG goes next to it.
            overwrite: Re-measure even if the output already holds a table with the same settings.
            full_rank_factors: Count a mode kept whole (rank = D) as a D x D factor in memory_mib, as the authors'
                measurement does (to reproduce their rank choices; with --measure.num_batches 1 and
                --data.batch_size 128, their protocol). Default: no factor, what ASI stores.
        """
        from .measure import run_measure

        cfg = self._section()
        path = Path(out) if out else self.run_dir / PERPLEXITY_FILE
        self.measure_result = run_measure(
            model, datamodule, path=path, epsilons=epsilons, num_batches=num_batches, num_finetune=num_finetune,
            overwrite=overwrite, device=self.trainer.strategy.root_device, seed=cfg.get("seed_everything"),
            progress=cfg.trainer.enable_progress_bar is not False, full_rank_factors=full_rank_factors)
        if not self.measure_result["skipped"]:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._parser(self.subcommand).save(cfg, str(self.run_dir / "config_measure.yaml"), skip_none=False,
                                               overwrite=True, multifile=False)

    # ------------------------------------------------------------------ results
    def _settings(self) -> dict:
        cfg = self._section()
        return {"setup": cfg.data.setup, "model": cfg.model.backbone, "dataset": cfg.data.name,
                "method": cfg.model.method, "num_finetune": cfg.model.num_finetune,
                "exp_name": self.run_dir.name, "seed": cfg.get("seed_everything"),
                "max_epochs": cfg.trainer.max_epochs, "world_size": self.trainer.world_size,
                "model_args": cfg.model.as_dict(), "data_args": cfg.data.as_dict()}

    def _scalars(self, prefix: str) -> dict:
        return {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(prefix)}

    def _checkpoints(self) -> tuple[Optional[ModelCheckpoint], Optional[ModelCheckpoint]]:
        cks = [c for c in self.trainer.callbacks if isinstance(c, ModelCheckpoint)]
        best = next((c for c in cks if c.monitor is not None), None)
        last = next((c for c in cks if c.monitor is None), None)
        return best, last

    def before_fit(self) -> None:
        if not self.trainer.is_global_zero:
            return
        cfg = self._section()
        self._previous_status = read_metrics(self.run_dir).get("status")
        out = {"status": "running", "run_settings": self._settings_of(cfg),
               "settings_hash": settings_hash(self._settings_of(cfg)), "command": sys.argv[1:],
               "resumed_from": cfg.ckpt_path}
        if cfg.model.checkpoint:  # which weights this run started from, by content
            out["init_checkpoint"] = checkpoint_provenance(cfg.model.checkpoint)
        write_metrics(self.run_dir, out)

    def after_fit(self) -> None:
        if not self.trainer.is_global_zero:
            return
        t, cm = self.trainer, self.trainer.callback_metrics
        ck, ck_last = self._checkpoints()
        fit = self._scalars("train/") | self._scalars("val/")
        out = {
            "run_dir": str(self.run_dir),
            "settings": self._settings(),
            "fit": fit,
            "epochs_completed": t.current_epoch, "global_step": t.global_step,
            "patched_layers": list(self.model.patched),
            "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in self.model.parameters()),
            "nonfinite_train_steps": int(getattr(self.model, "nonfinite_steps", 0)),
        }
        monitor = getattr(self.model, "monitor", "val/acc")  # val/acc, or val/miou for segmentation
        for key in ("val/acc", "val/miou", "val/macc", "val/aacc"):
            if key in cm:
                out[key.replace("/", "_")] = float(cm[key])
        if ck is not None:
            out["best_ckpt"] = ck.best_model_path
            if ck.best_model_score is not None:
                out["best_" + monitor.replace("/", "_")] = float(ck.best_model_score)
        if ck_last is not None:
            out["last_ckpt"] = ck_last.best_model_path or ck_last.last_model_path
        diverged = sorted(k for k, v in fit.items() if "loss" in k and not math.isfinite(v))
        if not fit:  # resumed at its end: nothing trained in this call, the recorded results and status stay
            del out["fit"]
            out["status"] = getattr(self, "_previous_status", None) or "finished"
        elif diverged:
            out["status"], out["diverged"] = "diverged", diverged
            print(f"warning: the run diverged: {', '.join(diverged)} not finite "
                  f"({out['nonfinite_train_steps']} training step(s) had a non-finite loss); metrics.json marks it "
                  f"\"status\": \"diverged\" and the report shows it as such", file=sys.stderr)
        else:
            out["status"] = "finished"
        cfg = self._section()
        if cfg.data.setup == "B" and cfg.data.half == 1:
            exported = self._export_pretrained(ck)
            out["exported_ckpt"], out["exported_ckpt_sha256"] = str(exported), file_sha256(exported)
        if getattr(self.model, "rank_selection", None) is not None:  # asi ranks from --model.perplexity_file
            out["rank_selection"] = self.model.rank_selection
        write_metrics(self.run_dir, out)

    def _export_pretrained(self, ck: Optional[ModelCheckpoint]) -> Path:
        """Setup B, half 1: save the best weights where half-2 fine-tuning runs look for them. An existing export of
        another run was refused before the fit started unless --overwrite true (see ``_prepare_fit``)."""
        cfg = self._section()
        best = ck.best_model_path if ck is not None and ck.best_model_path else None
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"] if best \
            else self.model.state_dict()
        dst = setup_b_checkpoint(cfg.model.backbone, cfg.data.name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        torch.save({"state_dict": {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")},
                    "backbone": cfg.model.backbone, "dataset": cfg.data.name, "num_classes": cfg.model.num_classes,
                    "source_run": str(self.run_dir.resolve()), "source_ckpt": best}, tmp)
        if dst.is_file():
            print(f"--overwrite: replacing {dst} (was {_export_source(dst)})", file=sys.stderr)
        tmp.replace(dst)
        return dst

    def after_validate(self) -> None:
        if self.trainer.is_global_zero:
            write_metrics(self.run_dir, {"validate": {**self._scalars("val/"), "ckpt_path": self._section().ckpt_path}})

    def after_test(self) -> None:
        if self.trainer.is_global_zero:
            res = self._scalars("test/")
            write_metrics(self.run_dir, {"test": {**res, "ckpt_path": self._section().ckpt_path},
                                         **({"test_acc": res["test/acc"]} if "test/acc" in res else {})})


def _leading_words_as_list(fn: Callable, args: list[str]) -> list[str]:
    """jsonargparse has no ``nargs='+'``: give the words before the first option, as one JSON list, to a
    first parameter typed as a list."""
    import json
    import typing

    n = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
    hints = typing.get_type_hints(fn)
    first = next((p for p in hints if p != "return"), None)
    if n and first and typing.get_origin(hints[first]) is list:
        return [json.dumps(args[:n])] + args[n:]
    return args


class _DropNoise(logging.Filter):
    """Lightning 2.6 advertises a cloud logger at every fit; the console is for the run's own messages."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def _quiet_third_party() -> None:
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropNoise())
    # torch 2.14 deprecates an isinstance check that Lightning 2.6's _pytree still makes (harmless)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def cli_main(args: Optional[list[str]] = None, cli_class: type[ASICLI] = ASICLI):
    """Entry point of main.py; ``args`` lets tests run the CLI in-process."""
    _quiet_third_party()
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in STANDALONE_COMMANDS:
        from jsonargparse import CLI

        fn = STANDALONE_COMMANDS[argv[0]]
        return CLI(fn, args=_leading_words_as_list(fn, argv[1:]))
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    try:
        return cli_class(args=args)
    except SIGTERMException:
        # Lightning stops after the current batch on SIGTERM and exits 0; a stopped run did not succeed
        print("fit stopped by SIGTERM; the state at the stop is in the run's checkpoints/last.ckpt: continue with "
              "the same command and --ckpt_path last (or --resume true)", file=sys.stderr)
        raise SystemExit(143)
