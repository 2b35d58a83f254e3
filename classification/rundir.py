"""Run directories and their metrics.json.

Every run lives in ``runs/<setup>/<model>/<dataset>/<method>/<exp_name>/`` (``run_dir``) and
keeps its results in ``metrics.json``. ``write_metrics`` merges keys into that file, so any
subcommand or callback can add its own numbers (memory, FLOPs, timings ...) next to the
accuracy without knowing who else writes there.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

METRICS_FILE = "metrics.json"


def exp_name(method: str, num_finetune: Union[int, str], options: Mapping[str, Any]) -> str:
    """A readable name saying what differs between runs of one method: ``l<num_finetune>`` and the method's own
    token (``Method.run_name``: ``l2_r4``, ``l4_eps0.8``, ``l4_budgethosvd@0.8``, ``l4_r2_nowarm``, ``l5_Rauthors``
    ...). ``options``: the model options (``finetune.naming_options``: layer-set values read "authors")."""
    from .finetune import MODEL_METHODS, method_info

    token = method_info(method).run_name(dict(options)) if method in MODEL_METHODS else ""
    return f"l{num_finetune}{token}"


def run_dir(root: Union[str, Path], setup: str, model: str, dataset: str, method: str, exp_name: str) -> Path:
    return Path(root) / f"setup{setup}" / model / dataset / method / exp_name


# What changes a run's result but not its identity: trainer settings that say how long / how it trains.
# The run *name* (``settings_hash(.., identity)``) leaves them out, so a resumed run may extend max_epochs;
# "done" (``settings_hash(.., full)``) includes them, so a sweep with more epochs does not count a shorter run.
TRAINER_RESULT_KEYS = ("max_epochs", "min_epochs", "max_steps", "min_steps", "limit_train_batches",
                       "limit_val_batches", "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm",
                       "precision", "devices", "num_nodes", "strategy", "deterministic", "val_check_interval",
                       "check_val_every_n_epoch", "overfit_batches")
# Model options that say how a network trains, not what it computes: a checkpoint evaluated by validate/test with
# --ckpt_path is compared on everything else (a different lr is no reason to refuse scoring its weights).
TRAINING_ONLY_MODEL_KEYS = ("lr", "momentum", "weight_decay", "optimizer", "adam_betas", "scheduler",
                            "scheduler_interval", "warmup_epochs", "warmup_start_factor", "lr_min_factor", "checkpoint",
                            "pretrained", "checkpointing", "recompute", "frozen_micro_batch", "approx_activations",
                            "saved_bits", "budget", "perplexity_file", "ranks", "eps", "warm_start")
# Options that change nothing in the result (where files are, how fast they load, memory-lean backward, derived).
IGNORED_MODEL_KEYS = ("lean", "input_shape", "num_classes")
IGNORED_DATA_KEYS = ("root", "num_workers", "download")


# The model and data options that every run name and "done" check held before options had to keep names stable
# (the keys of 2026-12's main): their values always enter, so runs made then keep their directories and status.
# An option added since enters only when it is set away from its default (``option_defaults``), so adding an
# option renames no run and re-runs no finished sweep (tests/test_run_names.py checks both against golden names).
NAMED_MODEL_KEYS = frozenset((
    "adam_betas", "backbone", "budget", "checkpoint", "checkpointing", "eps", "include", "layer_type", "layers",
    "lora", "lora_alpha", "lora_rank", "lora_targets", "lr", "lr_min_factor", "method", "momentum", "name_or_path",
    "num_blocks", "num_finetune", "optimizer", "perplexity_file", "pretrained", "radius", "ranks", "recompute",
    "scheduler", "scheduler_interval", "set_bn_eval", "shape_only", "train_bn_affine", "warm_start",
    "warmup_epochs", "warmup_start_factor", "weight_decay"))
NAMED_DATA_KEYS = frozenset((
    "augment", "batch_size", "half", "max_length", "name", "num_shards", "partition_file", "resolution", "setup",
    "split_seed", "tokenizer", "val_fraction"))


def option_defaults() -> dict[str, dict[str, Any]]:
    """{"model": {option: default}, "data": {...}}: the defaults of ``ClassificationModel``'s and
    ``ClassificationData``'s options (their signatures, which the command line is built from)."""
    import inspect

    from .data import ClassificationData
    from .model import ClassificationModel

    def of(cls):
        return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {"model": of(ClassificationModel), "data": of(ClassificationData)}


def _named(section: Mapping, named: frozenset, ignored: Sequence[str], defaults: Mapping) -> dict:
    return {k: v for k, v in dict(section).items() if k not in ignored
            and (k in named or k not in defaults or _jsonable(v) != _jsonable(defaults[k]))}


def run_settings(model: Mapping, data: Mapping, seed: Any, trainer: Optional[Mapping] = None,
                 defaults: Optional[Mapping[str, Mapping]] = None) -> dict:
    """The settings that define a run's result: model and data options (less ``IGNORED_*``; an option outside
    ``NAMED_*_KEYS`` only when set away from its default in ``defaults``, default ``option_defaults()``), the seed,
    and with ``trainer`` the ``TRAINER_RESULT_KEYS`` of it. Values as JSON would write them (tuples -> lists)."""
    defaults = option_defaults() if defaults is None else defaults
    out = {"model": _named(model, NAMED_MODEL_KEYS, IGNORED_MODEL_KEYS, defaults.get("model", {})),
           "data": _named(data, NAMED_DATA_KEYS, IGNORED_DATA_KEYS, defaults.get("data", {})),
           "seed": seed}
    if trainer is not None:
        out["trainer"] = {k: dict(trainer).get(k) for k in TRAINER_RESULT_KEYS}
    return _jsonable(out)


def settings_hash(settings: Mapping) -> str:
    """A short, stable digest of ``run_settings``: 8 hex digits of SHA-256 over its sorted JSON."""
    return hashlib.sha256(json.dumps(_jsonable(settings), sort_keys=True).encode()).hexdigest()[:8]


def settings_diff(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """``["model.method: 'asi' -> 'hosvd'", ...]``: every leaf that differs between two ``run_settings``."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += settings_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf": JSON has no NaN; a reader sees a string, never a bare NaN
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # 0-d tensors / numpy scalars
        return _jsonable(value.item())
    return str(value)


def read_metrics(run_dir: Union[str, Path]) -> dict:
    path = Path(run_dir) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_metrics(run_dir: Union[str, Path], metrics: Mapping[str, Any]) -> dict:
    """Merge ``metrics`` into ``<run_dir>/metrics.json`` (top-level keys replaced, others kept); return the result.

    The file is replaced atomically, so a reader never sees half a file.
    """
    merged = {**read_metrics(run_dir), **_jsonable(dict(metrics))}
    text = json.dumps(merged, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write(Path(run_dir) / METRICS_FILE, lambda f: f.write(text.encode("utf-8")))
    return merged


def atomic_write(path: Union[str, Path], write) -> None:
    """``write(f)`` into a temporary file beside ``path`` (same directory, so the same filesystem), flushed to disk,
    then renamed over ``path``: a reader, or a resume after a crash or a full disk, sees the old file or the new
    one, never half of one. On failure the temporary file is removed and the error says which file could not be
    written (the old one, if any, is intact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            kept = "the previous file is intact" if path.exists() else "no file was written"
            raise OSError(err.errno, f"could not write {path} ({err.strerror or err}); {kept}") from err
        raise
