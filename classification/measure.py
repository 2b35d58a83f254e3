"""Perplexity measurement stage, ``python main.py measure`` (paper Sec. 3.3, App. B.2).

The model is built exactly as ``fit`` builds it (ImageNet weights in setup A, ``--model.checkpoint``
or the setup-B half-1 export in setup B, new head), but vanilla with every layer trainable; nothing
is optimised. K full training batches of the datamodule (setup/half as configured, training
transforms, BatchNorm as in training: eval mode with ``set_bn_eval``) go through
``asi_core.perplexity.measure_perplexity``, which gives per layer and ε the HOSVD ranks, the
compressed memory (eq. 5, MiB) and the activation perplexity (eq. 7, mean over the K batches).
Results:

* ``perplexity.json``: schema version 1 (``asi_core.ranks`` documents it and ``load_table``
  validates it); layer names are relative to the backbone ``net``, i.e. the names
  ``asi_core.patch(model.net, ...)`` returns. Extra keys: ``settings`` (what the measurement
  depends on, compared to decide whether a re-run can be skipped), ``device``, ``elapsed_s``.
* ``perplexity.png`` next to it: perplexity (log scale) and memory against ε, one line per layer
  coloured by depth.

Default place: ``runs/setup<A|B>/<model>/<dataset>/measure/<exp_name>/perplexity.json``, exp_name
``l<num_finetune>_bs<batch size>_res<resolution>`` (``--exp_name`` and ``--measure.out`` override it).
Training reads it with ``--model.method asi --model.perplexity_file <file> --model.budget ...``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from pytorch_lightning.utilities import rank_zero_info

import asi_core
from asi_core import perplexity
from asi_core.perplexity import SCHEMA_VERSION, measure_perplexity
from asi_core.ranks import load_table, validate_table

from .model import finetune_candidates

__all__ = ["PAPER_EPSILONS", "PERPLEXITY_FILE", "parse_epsilons", "measure_exp_name", "measurement_settings",
           "full_batches", "run_measure", "plot_table"]

PAPER_EPSILONS = ",".join(map(str, perplexity.PAPER_EPSILONS))  # App. B.1 "Rank Selection" (asi_core.perplexity)
PERPLEXITY_FILE = "perplexity.json"


def parse_epsilons(value: Union[str, float, Sequence[float]]) -> list[float]:
    """``"0.4,0.5"``, ``"[0.4, 0.5]"``, ``0.8`` or ``[0.4, 0.5]`` -> sorted list of floats in (0, 1]."""
    example = f"e.g. --measure.epsilons {PAPER_EPSILONS}"
    if isinstance(value, str):
        parts = [p.strip() for p in value.strip().strip("[]").split(",") if p.strip()]
        try:
            eps = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"--measure.epsilons {value!r}: expected comma-separated numbers in (0, 1], "
                             f"{example}") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        eps = [float(value)]
    else:
        eps = [float(e) for e in value]
    if not eps:
        raise ValueError(f"--measure.epsilons is empty; {example}")
    bad = [e for e in eps if not (math.isfinite(e) and 0 < e <= 1)]
    if bad:
        raise ValueError(f"--measure.epsilons: {bad} outside (0, 1]; explained-variance thresholds are "
                         f"fractions, {example}")
    if len(set(eps)) != len(eps):
        raise ValueError(f"--measure.epsilons {eps}: repeated values")
    return sorted(eps)


def measure_exp_name(num_finetune: Union[int, str], batch_size: int, resolution: int) -> str:
    """Default run name of a measurement: what the table depends on besides the model and dataset."""
    return f"l{num_finetune}_bs{batch_size}_res{resolution}"


def measurement_settings(model, datamodule, *, epsilons: Sequence[float], num_batches: int,
                         num_finetune: Union[int, str], seed, full_rank_factors: bool = False) -> dict:
    """Everything a perplexity table depends on; equal settings mean a re-run can be skipped."""
    hp = model.hparams
    weights = hp.checkpoint if hp.checkpoint is not None else ("imagenet" if hp.pretrained else "random")
    settings = {"model": hp.backbone, "dataset": datamodule.name, "setup": datamodule.setup_name,
                "weights": str(weights), "set_bn_eval": bool(hp.set_bn_eval),
                "batch_size": int(datamodule.batch_size), "resolution": int(datamodule.resolution),
                "split_seed": int(datamodule.split_seed), "val_fraction": float(datamodule.val_fraction),
                "seed": seed, "epsilons": list(epsilons), "num_batches": int(num_batches),
                "num_finetune": num_finetune}
    if full_rank_factors:
        settings["full_rank_factors"] = True
    if datamodule.setup_name == "B":
        settings.update(half=int(datamodule.half), num_shards=int(datamodule.num_shards),
                        partition_file=datamodule.partition_file)
    return json.loads(json.dumps(settings))  # as it reads back from the file


def full_batches(loader, k: int, batch_size: int) -> Iterator:
    """The first ``k`` batches of exactly ``batch_size`` samples (a short last batch would change the
    input shape), going through the loader again if one pass has fewer."""
    if k < 1:
        raise ValueError(f"--measure.num_batches must be >= 1, got {k}")
    n = 0
    while True:
        any_full = False
        for x, y in loader:
            if len(y) != batch_size:
                continue
            any_full = True
            yield x, y
            n += 1
            if n == k:
                return
        if not any_full:
            raise ValueError(f"the training set has fewer than --data.batch_size={batch_size} samples: no full "
                             f"batch to measure on; lower --data.batch_size")


@contextlib.contextmanager
def _progress(total: int, enabled: bool, what: str):
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn()) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.update(task, completed=n)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _dumps(table: dict) -> str:
    """JSON with one line per top-level key and per layer: readable and diffable, not one number a line."""
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in table.items() if k != "layers"]
    layers = ",\n".join(f"  {json.dumps(n)}: {json.dumps(e)}" for n, e in table["layers"].items())
    return "{\n" + ",\n".join(lines + [f' "layers": {{\n{layers}\n }}']) + "\n}\n"


def run_measure(model, datamodule, *, path: Union[str, Path], epsilons, num_batches: int,
                num_finetune: Union[int, str] = "all", overwrite: bool = False,
                device: Union[str, torch.device] = "cpu", progress: bool = True, seed=None,
                full_rank_factors: bool = False) -> dict:
    """Measure the perplexity table of ``model`` (a ClassificationModel) on ``datamodule``'s training
    batches and write ``path`` (perplexity.json) and its PNG. The model is unpatched and moved to
    ``device``; it is not trained. If ``path`` already holds a table with the same settings and not
    ``overwrite``, nothing is measured (the PNG is redrawn if missing).

    Returns ``{"path", "plot", "skipped", "table"}``.
    """
    path, eps = Path(path), parse_epsilons(epsilons)
    plot = path.with_suffix(".png")
    settings = measurement_settings(model, datamodule, epsilons=eps, num_batches=num_batches,
                                    num_finetune=num_finetune, seed=seed, full_rank_factors=full_rank_factors)
    if path.is_file() and not overwrite:
        try:
            old = load_table(path)
        except ValueError:
            old = None
        if old is not None and old.get("settings") == settings:
            rank_zero_info(f"{path} already holds a perplexity table with these settings; skipping the "
                           f"measurement (--measure.overwrite true re-measures)")
            if not plot.is_file():
                plot_table(old, plot)
            return {"path": str(path), "plot": str(plot), "skipped": True, "table": old}
        differ = sorted(k for k in set(settings) | set((old or {}).get("settings") or {})
                        if old is None or (old.get("settings") or {}).get(k) != settings.get(k))
        rank_zero_info(f"{path} exists but was measured with other settings ({', '.join(differ)}); "
                       f"re-measuring and replacing it")

    if model.patched:  # measure on the plain layers; they are the ones the names refer to
        asi_core.unpatch(model.net)
    layer_type, include = getattr(model, "layer_type", "conv"), getattr(model, "include", None)
    names = finetune_candidates(model.net, num_finetune, layer_type, include, option="--measure.num_finetune")
    device = torch.device(device)
    model.to(device)
    model.train()  # applies set_bn_eval: BatchNorm in eval mode, as in training
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    input_shape: list[int] = []

    def loss_fn(net, x, y):
        if not input_shape:  # a text batch is a dict (input_ids, attention_mask): its shape is (B, tokens)
            input_shape.extend(int(d) for d in (x["input_ids"] if isinstance(x, dict) else x).shape)
        x = {k: v.to(device, non_blocking=True) for k, v in x.items()} if isinstance(x, dict) else \
            x.to(device, non_blocking=True)
        return model.criterion(net(x), y.to(device, non_blocking=True))

    rank_zero_info(f"measuring perplexity of {settings['model']} on {settings['dataset']} "
                   f"(setup {settings['setup']}): eps {eps}, {num_batches} batch(es) of {datamodule.batch_size}, "
                   f"layers: last {num_finetune} {layer_type}, device {device}")
    start = time.perf_counter()
    with _progress(num_batches, progress, "perplexity") as bar:
        layers = measure_perplexity(model.net, full_batches(loader, num_batches, datamodule.batch_size), loss_fn,
                                    eps, layers=names, progress=bar, full_rank_factors=full_rank_factors)
    table = {"schema_version": SCHEMA_VERSION, "model": settings["model"], "dataset": settings["dataset"],
             "input_shape": input_shape, "batch_size": int(datamodule.batch_size), "epsilons": eps,
             "num_batches": int(num_batches), "layers": layers, "settings": settings, "device": str(device),
             "elapsed_s": round(time.perf_counter() - start, 3)}
    validate_table(table, source="measured table")
    _atomic_write(path, _dumps(table))
    plot_table(table, plot)
    rank_zero_info(f"wrote {path} ({len(layers)} layers) and {plot} in {table['elapsed_s']:.1f} s")
    return {"path": str(path), "plot": str(plot), "skipped": False, "table": table}


def plot_table(table: dict, path: Union[str, Path], legend_max: int = 12) -> Path:
    """Perplexity (log y) and compressed memory against ε, one line per layer coloured by its depth.
    Up to ``legend_max`` layers get a legend, more a colour bar labelled with (every few) layer names.
    Zero values (ε = 1 can give exactly 0) cannot be drawn on a log axis and are left out."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    names, eps = list(table["layers"]), table["epsilons"]
    order = np.argsort(eps)
    x = np.asarray(eps, dtype=float)[order]
    cmap, norm = colormaps["viridis"], Normalize(0, max(len(names) - 1, 1))
    fig = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_p, ax_m = fig.subplots(1, 2)
    for i, name in enumerate(names):
        entry = table["layers"][name]
        for ax, key in ((ax_p, "perplexity"), (ax_m, "memory_mib")):
            y = np.asarray(entry[key], dtype=float)[order]
            ax.plot(x, np.where(y > 0, y, np.nan), marker="o", ms=3, lw=1.2, color=cmap(norm(i)), label=name)
    for ax, label in ((ax_p, "perplexity ‖∂L/∂W − ∂L/∂W̃‖_F (eq. 7)"), (ax_m, "compressed activation memory (MiB, eq. 5)")):
        ax.set_yscale("log")
        ax.set_xlabel("explained-variance threshold ε")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{table['model']} on {table['dataset']}, input {table['input_shape']}, "
                 f"mean over {table['num_batches']} batch(es)")
    if len(names) <= legend_max:
        ax_p.legend(fontsize="small", title="layer")
    else:
        bar = fig.colorbar(ScalarMappable(norm, cmap), ax=[ax_p, ax_m], fraction=0.04, pad=0.02)
        step = max(1, math.ceil(len(names) / 15))
        ticks = list(range(0, len(names), step))
        bar.set_ticks(ticks)
        bar.set_ticklabels([f"{i}: {names[i]}" for i in ticks], fontsize="x-small")
        bar.set_label("layer (depth order)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
