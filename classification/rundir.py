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


def default_exp_name(method: str, num_finetune: Union[int, str], ranks: Any = None, eps: Any = None,
                     radius: Any = None, budget: Any = None, warm_start: bool = True) -> str:
    """A readable name saying what differs between runs of one method: ``l2_r4``, ``l4_eps0.8``,
    ``l4_budgethosvd@0.8`` (asi ranks chosen from a perplexity table under a budget), ``l4_r2_nowarm``
    (asi without warm start, the paper's Fig. 3 ablation) ..."""
    name = f"l{num_finetune}"
    if method == "asi" and budget is not None:
        name += f"_budget{budget}"
    elif method == "asi":
        if isinstance(ranks, int):
            name += f"_r{ranks}"
        elif all(isinstance(r, int) for r in ranks):  # one per-mode tuple for every layer
            name += "_r" + "x".join(map(str, ranks))
        else:
            name += "_r" + "-".join("x".join(map(str, r)) for r in ranks)
    if method == "asi" and warm_start is False:
        name += "_nowarm"
    elif method == "hosvd":
        name += f"_eps{eps}"
    elif method in ("gradfilter", "gradfilter_paper"):
        name += f"_R{radius}"
    return name


def run_dir(root: Union[str, Path], setup: str, model: str, dataset: str, method: str, exp_name: str) -> Path:
    return Path(root) / f"setup{setup}" / model / dataset / method / exp_name


# What changes a run's result but not its identity: trainer settings that say how long / how it trains.
# The run *name* (``settings_hash(.., identity)``) leaves them out, so a resumed run may extend max_epochs;
# "done" (``settings_hash(.., full)``) includes them, so a sweep with more epochs does not count a shorter run.
TRAINER_RESULT_KEYS = ("max_epochs", "min_epochs", "max_steps", "min_steps", "limit_train_batches",
                       "limit_val_batches", "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm",
                       "precision", "devices", "num_nodes", "strategy", "deterministic", "val_check_interval",
                       "check_val_every_n_epoch", "overfit_batches")
# Options that change nothing in the result (where files are, how fast they load, memory-lean backward, derived).
IGNORED_MODEL_KEYS = ("lean", "input_shape", "num_classes")
IGNORED_DATA_KEYS = ("root", "num_workers", "download")


def run_settings(model: Mapping, data: Mapping, seed: Any, trainer: Optional[Mapping] = None) -> dict:
    """The settings that define a run's result: model and data options (less ``IGNORED_*``), the seed, and with
    ``trainer`` the ``TRAINER_RESULT_KEYS`` of it. Values as JSON would write them (tuples -> lists)."""
    out = {"model": {k: v for k, v in dict(model).items() if k not in IGNORED_MODEL_KEYS},
           "data": {k: v for k, v in dict(data).items() if k not in IGNORED_DATA_KEYS},
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
    path = Path(run_dir) / METRICS_FILE
    merged = {**read_metrics(run_dir), **_jsonable(dict(metrics))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{METRICS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged, indent=2, sort_keys=True, allow_nan=False) + "\n")
    tmp.replace(path)
    return merged
