"""Run directories and their metrics.json.

Every run lives in ``runs/<setup>/<model>/<dataset>/<method>/<exp_name>/`` (``run_dir``) and
keeps its results in ``metrics.json``. ``write_metrics`` merges keys into that file, so any
subcommand or callback can add its own numbers (memory, FLOPs, timings ...) next to the
accuracy without knowing who else writes there.
"""
from __future__ import annotations

import json
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # 0-d tensors / numpy scalars
        return value.item()
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
    tmp.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return merged
