"""The project's command line: ``python main.py {fit,validate,test,...} --config ... [--section.key value]``.

``ASICLI`` is a LightningCLI over ``ClassificationModel`` and ``ClassificationData`` that adds:

* a run directory ``runs/setup<A|B>/<model>/<dataset>/<method>/<exp_name>/`` holding TensorBoard and
  CSV logs, the resolved ``config.yaml``, ``checkpoints/{best,last}.ckpt`` and ``metrics.json``; whether a command
  starts, resumes, does nothing or is refused is decided by classification/lifecycle.py;
* setup B plumbing: a half-1 (pretraining) fit exports its weights to ``ckpts/setupB/<model>_<dataset>.ckpt``,
  which half-2 (fine-tuning) runs load by default as ``--model.checkpoint``;
* the subcommands ``profile``, ``benchmark`` and ``measure`` (classification/trainer.py);
* the paper's trainer defaults (L2 gradient clipping 2.0) and a Rich progress bar.

Everything goes through LightningCLI's public API: the subcommands are methods of the ``trainer_class``
(``ASITrainer``) named in ``subcommands()``, the CLI's work happens in its hooks (``parse_arguments``,
``before_instantiate_classes``, ``instantiate_trainer``, ``before_<subcommand>`` / ``after_<subcommand>``).

Adding a subcommand
-------------------
A method of ``ASITrainer`` named in its ``SUBCOMMANDS`` (classification/trainer.py), or one method on ``ASICLI`` (or
a subclass) decorated with ``@subcommand``. It receives the instantiated ``model`` and ``datamodule`` (and can use
``self.trainer`` / ``self.run_dir``); its other typed, documented parameters become the subcommand's options::

    @subcommand
    def measure(self, model, datamodule, batches: int = 5):
        '''Measure activation memory of the fine-tuned layers.

        Args:
            batches: number of training batches to average over.
        '''

Options nested under the subcommand's name (``--measure.epsilons``) are one dataclass parameter of that name (the
real ``measure`` subcommand, classification/trainer.py).

A command that needs no model (e.g. a report over finished runs) is one entry in
``STANDALONE_COMMANDS`` (name -> function); its signature becomes its options (jsonargparse.CLI), and a first
parameter typed as a list takes the words before the first option (``report runs/a runs/b --format csv``).
"""
from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

from jsonargparse import ArgumentParser, Namespace
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar, RichProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_info

from . import families  # noqa: F401  every model, dataset and task registered
from .callbacks import AtomicCheckpointIO, ExactResume, LastAtValidation, LastCheckpoint, ResourceAccounting, RunStatus, WeightsDigest
from .data import ClassificationData, check_data_options, input_shape_of, num_classes_of
from .lifecycle import (Run, RunRefused, checkpoint_provenance, file_sha256,  # noqa: F401 (re-exported)
                        setup_b_checkpoint)
from asi_core.methods import Vanilla

from .finetune import naming_options
from .measure import measure_exp_name
from .model import ASI_DEFAULT_RANKS, MODEL_METHODS, ClassificationModel, RandomBackboneWarning, check_model_options
from .report import report
from .resources import resolve_device
from .rundir import exp_name, run_dir, run_settings, settings_hash, write_metrics
from .registry import DATASETS, get_spec
from .trainer import ASITrainer

# The paper's recipe (App. B.1) where it is a Trainer setting; every key stays overridable.
TRAINER_DEFAULTS = {"gradient_clip_val": 2.0, "gradient_clip_algorithm": "norm", "max_epochs": 50,
                    "log_every_n_steps": 10}

STANDALONE_COMMANDS: dict[str, Callable] = {}
STANDALONE_COMMANDS["report"] = report


def subcommand(fn: Callable) -> Callable:
    """Mark an ``ASICLI`` method as a subcommand named like the method (see the module docstring)."""
    fn.asi_subcommand = True
    return fn


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


class ASIArgumentParser(LightningArgumentParser):
    """A LightningArgumentParser that keeps the action holding its subcommand parsers (what jsonargparse's
    ``add_subcommands`` returns), so that the CLI's own errors print the subcommand's usage as jsonargparse's do."""

    subcommands_action = None

    def add_subcommands(self, *args, **kwargs):
        self.subcommands_action = super().add_subcommands(*args, **kwargs)
        return self.subcommands_action

    def subcommand_parser(self, name: Optional[str]) -> ArgumentParser:
        """The parser of subcommand ``name`` (argparse's subparsers action maps names to parsers in ``choices``);
        this parser itself for None (no subcommand: ``run=False``)."""
        return self if name is None else self.subcommands_action.choices[name]


class ASICLI(LightningCLI):
    def __init__(self, args=None, run: bool = True, **kwargs):
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)  # the recipe lives in ClassificationModel
        kwargs.setdefault("parser_class", ASIArgumentParser)
        kwargs.setdefault("trainer_class", self.trainer_with_subcommands())
        self.run_dir: Optional[Path] = None
        self.lifecycle: Optional[Run] = None  # the run directory's state machine (classification/lifecycle.py)
        self._ckpt_path: Optional[str] = None  # --ckpt_path as given, kept from LightningCLI (parse_arguments)
        super().__init__(ClassificationModel, ClassificationData, args=args, run=run, **kwargs)

    # ------------------------------------------------------------------ subcommands
    @classmethod
    def cli_subcommands(cls) -> list[str]:
        """The ``@subcommand`` methods of this class and its bases."""
        names = []
        for klass in reversed(cls.__mro__):
            names += [n for n, f in vars(klass).items() if getattr(f, "asi_subcommand", False) and n not in names]
        return names

    @classmethod
    def extra_subcommands(cls) -> list[str]:
        return list(ASITrainer.SUBCOMMANDS) + [n for n in cls.cli_subcommands() if n not in ASITrainer.SUBCOMMANDS]

    @classmethod
    def subcommands(cls) -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), **{n: {"model", "datamodule"} for n in cls.extra_subcommands()}}

    @classmethod
    def trainer_with_subcommands(cls) -> type[Trainer]:
        """``ASITrainer``, with this class's ``@subcommand`` methods added: LightningCLI builds a subcommand's parser
        from the trainer class's method of that name, and runs the CLI's own method of that name where it has one."""
        own = {n: getattr(cls, n) for n in cls.cli_subcommands()}
        return type(f"{cls.__name__}Trainer", (ASITrainer,), own) if own else ASITrainer

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse, then keep --ckpt_path away from LightningCLI until ``before_instantiate_classes``: given one, it
        would replace the command's --model options by the checkpoint's hyper-parameters, so that a resume silently
        trains other settings than the command says. Here the command's settings stay, and the run's lifecycle
        refuses a checkpoint made with other ones, listing the differences (``Run.check_checkpoint``)."""
        self._raw_args = [str(a) for a in (sys.argv[1:] if args is None else args)] if not isinstance(args, dict) \
            else []
        super().parse_arguments(parser, args)
        name = self.config.get("subcommand")
        section = self.config.get(name) if name else None
        if section is not None and section.get("ckpt_path") is not None:
            self._ckpt_path, section.ckpt_path = section.ckpt_path, None

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

    def _section(self, cfg: Optional[Namespace] = None) -> Namespace:
        """The subcommand's part of ``cfg`` (default: the parsed config), all of it without a subcommand."""
        cfg = self.config if cfg is None else cfg
        return cfg[self.subcommand] if self.subcommand else cfg

    def _subparser(self) -> ArgumentParser:
        return self.parser.subcommand_parser(self.subcommand)

    def _error(self, msg: str):
        self._subparser().error(msg)

    def _check_choices(self, cfg: Namespace) -> None:
        try:
            spec = get_spec(cfg.model.backbone)  # a timm:/pretrainedmodels: name is built here (hub_models.py)
        except ValueError as err:
            self._error(str(err))
        for what, value, choices in (("dataset", cfg.data.name, DATASETS), ("method", cfg.model.method, MODEL_METHODS)):
            if value not in choices:
                self._error(f"Unknown {what} {value!r}; valid choices: {', '.join(choices)}")
        model_task, data_task = spec.task, DATASETS[cfg.data.name].task
        if model_task != data_task:
            same = [n for n, s in DATASETS.items() if s.task == model_task]
            self._error(f"--model.backbone {cfg.model.backbone} is a {model_task} model but --data.name "
                        f"{cfg.data.name} is a {data_task} dataset; choose one of {', '.join(same)} (or a {data_task} "
                        f"model)")

    def _check_config_sections(self, cfg: Namespace) -> None:
        """A --config file whose ``model:``/``data:``/``trainer:`` is not a mapping (``model: [1, 2, 3]``) would
        silently leave every option at its default: refuse it, naming the file."""
        for path, doc in self._config_documents(cfg):
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
                resolve_device(b.device, "--benchmark.device")
            if self.subcommand == "profile" and cfg.get("device") is not None:
                resolve_device(cfg.device, "--device")
        except ValueError as err:
            self._error(str(err))

    # ------------------------------------------------------------------ before instantiation
    def before_instantiate_classes(self) -> None:
        cfg = self._section()
        if self._ckpt_path is not None:
            cfg.ckpt_path = self._ckpt_path  # (parse_arguments)
        self._check_config_sections(cfg)
        self._check_choices(cfg)
        self._subcommand_defaults(cfg)
        self._check_numbers(cfg)
        self._derived_options(cfg)
        self.run_dir = self._resolve_run_dir(cfg)
        if not cfg.trainer.default_root_dir:
            cfg.trainer.default_root_dir = str(self.run_dir)
        self._prepare_run(cfg)

    def _subcommand_defaults(self, cfg: Namespace) -> None:
        m = cfg.model
        if self.subcommand == "measure":  # the fit's weights; vanilla, every layer trainable (nothing is optimised)
            m.method, m.num_finetune, m.ranks, m.perplexity_file, m.budget = Vanilla.name, "all", None, None, None
        if self.subcommand == "profile" and m.ranks is None and m.get("perplexity_file") is None:
            m.ranks = 1  # profile's asi default (fit's: 4); given ranks or a perplexity file win
        if self.subcommand == "benchmark" and m.ranks is None and m.get("perplexity_file") is None:
            m.ranks = 2  # benchmark's asi default: rank 2 on every mode (the paper's latency setting)

    def _derived_options(self, cfg: Namespace) -> None:
        m, d = cfg.model, cfg.data
        spec = get_spec(m.backbone)
        if self.subcommand == "profile" and m.get("shape_only") is None and spec.shape_only_profile:
            m.shape_only = True  # an LLM's profile runs shape-only (FakeTensorMode): real shapes, no arithmetic
        pre = spec.preprocessing
        data_spec = DATASETS[d.name]
        if pre is not None and data_spec.kind == "image" and not data_spec.in_memory:  # (digits: ready tensors)
            # a timm/pretrainedmodels backbone's own settings
            if d.get("mean") is None and d.get("std") is None:
                d.mean, d.std = list(pre["mean"]), list(pre["std"])
            if pre["input_size"] != d.resolution and not self._given(cfg, "data", "resolution"):
                rank_zero_info(f"{m.backbone} was pretrained at {pre['input_size']}x{pre['input_size']}: "
                               f"--data.resolution {pre['input_size']} (pass another value to override)")
                d.resolution = pre["input_size"]
        if d.get("tokenizer") is None and DATASETS[d.name].kind == "text" and spec.tokenizer_source is not None:
            d.tokenizer = spec.tokenizer_source(m.get("name_or_path"))  # the model's own tokenizer
        if self.subcommand in ("profile", "benchmark"):  # random weights on random input: nothing to load or download
            m.pretrained = False
            warnings.filterwarnings("ignore", category=RandomBackboneWarning)
        elif d.setup == "B" and d.half == 2 and m.checkpoint is None:
            default = setup_b_checkpoint(m.backbone, d.name)
            if not default.is_file():
                self._error(f"setup B fine-tuning (half 2) starts from a checkpoint pretrained on half 1: pass "
                            f"--model.checkpoint, or create {default} with a pretraining run (--data.half 1 "
                            f"--model.method vanilla --model.num_finetune all, configs/recipes/setupB_pretrain.yaml)")
            m.checkpoint = str(default)

    def _given(self, cfg: Namespace, section: str, key: str) -> bool:
        """Whether the command gave ``--<section>.<key>`` itself: on the command line or in a --config file (not
        left at the parser's default)."""
        flag = f"--{section}.{key}"
        if any(a == flag or a.startswith(flag + "=") for a in getattr(self, "_raw_args", [])):
            return True
        return any(isinstance(doc, dict) and isinstance(doc.get(section), dict) and key in doc[section]
                   for _, doc in self._config_documents(cfg))

    @staticmethod
    def _config_documents(cfg: Namespace):
        """``(path, parsed YAML)`` of every --config file of ``cfg`` that reads (jsonargparse reported the others)."""
        import yaml

        for path in cfg.get("config") or []:
            path = getattr(path, "absolute", None) or getattr(path, "relative", None) or str(path)
            try:
                doc = yaml.safe_load(Path(str(path)).read_text())
            except (OSError, yaml.YAMLError):
                continue
            yield path, doc

    def _resolve_run_dir(self, cfg: Namespace) -> Path:
        """--trainer.default_root_dir, else ``<run_root>/setup<X>/<model>/<dataset>/<method>/<exp_name>``."""
        if cfg.trainer.default_root_dir:
            return Path(cfg.trainer.default_root_dir)
        m, d = cfg.model, cfg.data
        ranks = ASI_DEFAULT_RANKS if m.ranks is None else m.ranks
        # a readable prefix (what differs between runs of one method) + a digest of every setting that changes
        # the result (model, data, seed), so two runs with different settings never share a directory
        tag = settings_hash(run_settings(m.as_dict(), d.as_dict(), cfg.get("seed_everything")))
        named = naming_options({**m.as_dict(), "ranks": ranks}, get_spec(m.backbone))
        exp = cfg.exp_name or (("pretrain" if d.setup == "B" and d.half == 1 else
                                exp_name(m.method, m.num_finetune, named)) + f"_{tag}")
        kind = m.method
        if self.subcommand == "measure":
            kind, exp = "measure", cfg.exp_name or measure_exp_name(cfg.measure.num_finetune, d.batch_size,
                                                                    d.resolution)
        return run_dir(cfg.run_root, d.setup, m.backbone, d.name, kind, exp)

    def _settings_of(self, cfg: Namespace, full: bool = True) -> dict:
        return run_settings(cfg.model.as_dict(), cfg.data.as_dict(), cfg.get("seed_everything"),
                            cfg.trainer.as_dict() if full else None)

    def _prepare_run(self, cfg: Namespace) -> None:
        """Decide, before anything runs, what the command does with its run directory (classification/lifecycle.py):
        a fit starts, resumes, does nothing (exit 0) or is refused; validate/test pick the run's best checkpoint.
        (No subcommand, ``run=False``: the classes are built and nothing runs.)"""
        self.lifecycle = Run(self.run_dir, cfg.model.as_dict(), cfg.data.as_dict(), cfg.get("seed_everything"),
                             cfg.trainer.as_dict())
        try:
            if self.subcommand == "fit":
                decision = self.lifecycle.prepare_fit(cfg.ckpt_path, cfg.resume, cfg.overwrite)
                if decision.action == "done":
                    raise SystemExit(0)
                cfg.ckpt_path = decision.ckpt_path
            elif self.subcommand in ("validate", "test"):
                cfg.ckpt_path = self.lifecycle.prepare_evaluation(self.subcommand, cfg.ckpt_path)
        except RunRefused as err:
            self._error(str(err))

    # ------------------------------------------------------------------ instantiation
    def after_instantiate_classes(self) -> None:
        self.datamodule.run_dir = self.run_dir

    def instantiate_trainer(self, **kwargs) -> Trainer:
        tcfg = self._section(self.config_init).get("trainer", {})
        callbacks = list(tcfg.get("callbacks") or [])
        if tcfg.get("logger") in (None, True):
            kwargs["logger"] = [TensorBoardLogger(str(self.run_dir), name="tensorboard"),
                                CSVLogger(str(self.run_dir), name="csv")]
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        kwargs["callbacks"] = callbacks + self._standard_callbacks(tcfg, callbacks)
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default, unless a plugin set one
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # last.ckpt never half-written (a full disk, a kill)
        # what the subcommands of ASITrainer need besides the model and the data
        cfg = self._section()
        trainer.run_dir, trainer.model_args = self.run_dir, cfg.model.as_dict()
        trainer.seed = cfg.get("seed_everything")
        return trainer

    def _standard_callbacks(self, tcfg, given: list) -> list:
        """The run's checkpoints (best.ckpt, last.ckpt), progress bar and metrics.json recorders, where the command
        did not give its own."""
        out = []
        if tcfg.get("enable_checkpointing") is not False and not any(isinstance(c, ModelCheckpoint) for c in given):
            ckdir = str(self.run_dir / "checkpoints")
            monitor = getattr(self.model, "monitor", "val/acc")
            out.append(ModelCheckpoint(dirpath=ckdir, filename="best", monitor=monitor, mode="max",
                                       enable_version_counter=False))
            # last.ckpt: the state at the end of every training epoch (after the epoch is complete, so a resume
            # starts the next epoch) and at an interruption (SIGTERM, Ctrl-C, an exception), whatever val/acc did
            out.append(LastCheckpoint(dirpath=ckdir, filename="last", monitor=None, save_top_k=1,
                                      save_on_train_epoch_end=True, save_on_exception=True,
                                      enable_version_counter=False))
            # ... and after every validation, so that a step-based run (the segmentation recipe: one long epoch,
            # validation every --trainer.val_check_interval steps) killed mid-epoch loses at most that many steps;
            # it resumes exactly from there (callbacks.ExactResume)
            out.append(LastAtValidation(dirpath=ckdir, filename="last", monitor=None, save_top_k=1,
                                        save_on_train_epoch_end=False, enable_version_counter=False))
        if tcfg.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            out.append(RichProgressBar())
        out.append(WeightsDigest())
        if self.subcommand in (None, "fit"):
            out.append(RunStatus())
            out.append(ExactResume())  # random states in every checkpoint, epoch-end and mid-epoch resume exact
        if self.subcommand in (None, "fit") and not any(isinstance(c, ResourceAccounting) for c in given):
            out.append(ResourceAccounting())  # metrics.json["resources"]: memory, FLOPs, step timing
        return out

    # ------------------------------------------------------------------ subcommand results
    def after_profile(self) -> None:
        self.profile_result = self.trainer.profile_result

    def after_benchmark(self) -> None:
        self.benchmark_result = self.trainer.benchmark_result

    def after_measure(self) -> None:
        self.measure_result = self.trainer.measure_result
        if not self.measure_result["skipped"]:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._subparser().save(self._section(), str(self.run_dir / "config_measure.yaml"), skip_none=False,
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
        if self.trainer.is_global_zero:
            self.lifecycle.record_start(sys.argv[1:], self._section().ckpt_path)

    def after_fit(self) -> None:
        if not self.trainer.is_global_zero:
            return
        ck, _ = self._checkpoints()
        best = ck.best_model_path if ck is not None and ck.best_model_path else None
        self.lifecycle.record_end(self._fit_results(), best, self.model.state_dict)

    def _fit_results(self) -> dict:
        """What metrics.json records at the end of a fit (the lifecycle adds the status and the setup-B export)."""
        t, cm = self.trainer, self.trainer.callback_metrics
        ck, ck_last = self._checkpoints()
        out = {
            "run_dir": str(self.run_dir),
            "settings": self._settings(),
            "fit": self._scalars("train/") | self._scalars("val/"),
            "epochs_completed": t.current_epoch, "global_step": t.global_step,
            "patched_layers": list(self.model.patched),
            "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in self.model.parameters()),
            "nonfinite_train_steps": int(getattr(self.model, "nonfinite_steps", 0)),
        }
        monitor = getattr(self.model, "monitor", "val/acc")  # val/acc, or val/miou for segmentation
        for key in (f"val/{score}" for score in self.model.objective.scores):  # the task's (acc; miou, macc, aacc)
            if key in cm:
                out[key.replace("/", "_")] = float(cm[key])
        if ck is not None:
            out["best_ckpt"] = ck.best_model_path
            if ck.best_model_score is not None:
                out["best_" + monitor.replace("/", "_")] = float(ck.best_model_score)
        if ck_last is not None:
            out["last_ckpt"] = ck_last.best_model_path or ck_last.last_model_path
        if getattr(self.model, "rank_selection", None) is not None:  # asi ranks from --model.perplexity_file
            out["rank_selection"] = self.model.rank_selection
        return out

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


def main() -> None:
    """The ``asi-finetune`` console command (pyproject's ``[project.scripts]``): ``python main.py``'s command line,
    exiting 0 on success (cli_main returns the CLI object, which a console script would print as an error)."""
    cli_main()
