"""``python main.py report RUN_DIR... [--format md|csv] [--out FILE] [--plots DIR]``: the paper's tables and
Pareto figures from finished runs.

Every ``metrics.json`` under the given run directories (searched recursively) becomes one row; rows are grouped
by (setup, model, dataset) and laid out as the paper's Table 1/2: method (vanilla, gradient filtering R...,
HOSVD eps..., ASI) x number of fine-tuned layers, with accuracy (%), activation memory (MiB) and GFLOPs.
For HOSVD the paper reports *peak* memory and FLOPs (Sec. 4.1, "Result Logging"): the ``*_peak`` resources are
used when a run has them. One PNG per group plots accuracy against activation memory and against GFLOPs (log x
axes, as the paper's Fig. 4), one line per method, points in order of the number of fine-tuned layers.

From Python::

    rows = collect(["runs/setupB"])
    print(format_table(rows, "md"))
    pareto_plots(rows, "figures/")

What is read from a metrics.json (any of it may be missing; the table then shows "–"):
``settings`` (written by ``main.py fit``: setup, model/backbone, dataset, method, num_finetune, model_args with
ranks/eps/radius/warm_start/budget, data_args), ``val_acc`` (final) and ``best_val_acc`` (fractions),
``resources`` (activation_mib[_peak], train_gflops[_peak], paper_gflops[_peak], measured_activation_mib, ...).
Without ``settings`` the run directory layout ``setup<S>/<model>/<dataset>/<method>/<exp>/`` is used.
Setup-B pretraining runs (half 1) are not fine-tuning results and are left out. When several runs have the same
configuration, the one whose metrics.json was written last is shown (a finished training run before one without
results), and the table says so.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, List, Literal, Optional, Sequence, Union

from .finetune import LoRA, naming_options
from .rundir import TRAINER_RESULT_KEYS, run_settings

__all__ = ["collect", "format_table", "pareto_plots", "report", "CSV_COLUMNS"]

# What a run's method and model are (labels, order, peak reporting, the task and its score, the table's FLOPs unit)
# is asked of the method registry (asi_core's, and the framework's LoRA: classification.finetune.method_info) and
# of the model registry (classification.registry); runs of methods or models no longer registered still list,
# under their raw names.
# The required CSV columns first, in this order; the rest are extras for whoever reads the CSV.
CSV_COLUMNS = ("method", "num_finetune", "accuracy", "activation_mib", "gflops",
               "setup", "model", "dataset", "label", "final_accuracy", "best_accuracy", "accuracy_source",
               "gflops_source", "mem_peak", "gflops_peak", "measured_activation_mib", "train_gflops", "paper_gflops", "forward_gflops",
               "backward_gflops", "overhead_gflops", "runs", "run_dir", "status", "task", "macc", "peak_step_mib",
               "training_overhead_mib", "mem_mib", "mem_source", "seed", "seeds", "accuracy_sd", "per_seed")
MISSING = "–"
# Which memory the Mem column shows (--mem): the paper's count, what autograd keeps, or the whole-step peak
MEMORY = {"paper": ("activation_mib", "Mem: the paper's count, the fine-tuned layers' inputs as each method stores them "
                                      "(activation_mib)"),
          "saved": ("measured_activation_mib", "Mem: what autograd keeps, measured from the first fine-tuned layer "
                                               "to the loss (measured_activation_mib)"),
          "peak": ("peak_step_mib", "Mem: the whole-step peak, everything live at once in a training step "
                                    "(peak_step_mib, asi_core/peak.py)")}
PathLike = Union[str, Path]


# ------------------------------------------------------------------------------------------ collecting
def _num(value) -> Optional[float]:
    """A finite float, or None for anything else (missing, null, NaN, text)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _layers(value) -> Union[int, str, None]:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "all":
        return "all"
    try:
        return int(value)
    except (TypeError, ValueError):
        return str(value)


def _from_layout(path: Path) -> dict:
    """Settings implied by ``.../setup<S>/<model>/<dataset>/<method>/<exp>/metrics.json``."""
    parts = path.parts[-6:-1]
    if len(parts) < 5 or not re.fullmatch(r"setup[A-Za-z0-9]+", parts[0]):
        return {}
    m = re.match(r"l(all|\d+)(?:_|$)", parts[4])
    return {"setup": parts[0][len("setup"):], "model": parts[1], "dataset": parts[2], "method": parts[3],
            "num_finetune": m.group(1) if m else None}


def _method(method: str):
    from .finetune import MODEL_METHODS, method_info

    return method_info(method) if method in MODEL_METHODS else None


def _model_spec(model: str):
    from . import families  # noqa: F401  every model registered
    from .registry import get_spec, is_model

    return get_spec(model) if is_model(model) else None  # (timm:/pretrainedmodels: names are built on demand)


def _task(model: str, data: dict):
    """The model spec's task; for a model no longer registered, the task whose monitored score the run recorded."""
    from . import families  # noqa: F401  every task registered
    from .tasks import TASKS, get_task

    spec = _model_spec(model)
    if spec is not None:
        return get_task(spec.task)
    recorded = [t for t in TASKS.values() if t.monitor.replace("/", "_") in data]
    return recorded[-1] if recorded else get_task("classification")


def _label(method: str, args: dict) -> tuple[str, tuple]:
    """The paper's name of a method configuration and a sort key within its method (``Method.report_label``)."""
    info = _method(method)
    return info.report_label(args) if info is not None else (method, ())


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _configuration(model_args: dict, data_args: dict, stored: dict, settings: dict) -> dict:
    """What defines a run's result except its seed, the same for runs written before and after ``run_settings``
    existed: the named model and data options (rundir.run_settings' rules) and the trainer settings that change a
    result (rundir.TRAINER_RESULT_KEYS: epochs, steps, precision, accumulation, clipping, ...), those set."""
    named = run_settings(model_args, data_args, None)
    trainer = _dict(stored.get("trainer")) or {"max_epochs": settings.get("max_epochs")}
    return {"model": named["model"], "data": named["data"],
            "trainer": {k: v for k, v in sorted(trainer.items()) if k in TRAINER_RESULT_KEYS and v is not None
                        and not (k == "max_steps" and v == -1)}}


def _row(path: Path, data: dict, flops: str) -> Optional[dict]:
    settings = _dict(data.get("settings"))
    stored = _dict(data.get("run_settings"))  # written when the fit starts; "settings" only when it ends
    model_args = _dict(settings.get("model_args")) or _dict(stored.get("model"))
    data_args = _dict(settings.get("data_args")) or _dict(stored.get("data"))
    layout = _from_layout(path)

    def setting(*keys, sources=(settings, model_args, data_args, layout)):
        for src in sources:
            for k in keys:
                if src.get(k) is not None:
                    return src[k]
        return None

    setup = setting("setup")
    if str(setup) == "B" and data_args.get("half") == 1:
        return None  # setup-B pretraining (half 1): not a fine-tuning result
    method = setting("method")
    if method is None or (_method(method) is None and not (settings.get("method") or model_args.get("method"))):
        return None  # e.g. a measure/ or profile/ folder without settings: not a training run
    model = str(setting("model", "backbone") or MISSING)
    args = {k: setting(k, sources=(model_args, settings)) for k in {*model_args, *settings}}
    args["num_finetune"] = _layers(setting("num_finetune"))  # old runs: from the folder name (l5_...)
    args = naming_options(args, _model_spec(model))
    label, variant = _label(str(method), args)
    if args.get("lora") and _method(method) is not LoRA:  # LoRA adapters whose lora_A inputs the method compresses
        label, variant = f"LoRA r{args['lora_rank']} + {label}", (1, *variant)
    for option in ("checkpointing", "recompute"):  # the recomputation variants: rows of their own beside the method
        if setting(option, sources=(model_args, settings)) is True:
            label, variant = f"{label} + {option}", (*variant, option)
    micro = setting("frozen_micro_batch", sources=(model_args, settings))
    if micro is not None:  # the same result, a lower peak (asi_core.microbatch): a row of its own for the memory
        label, variant = f"{label}, frozen prefix in micro-batches of {micro}", (*variant, "micro", str(micro))
    if setting("approx_activations", sources=(model_args, settings)) is True:  # approximate: rows of their own
        label, variant = f"{label}, 2-bit activation derivatives", (*variant, "approx_act")
    bits = setting("saved_bits", sources=(model_args, settings))
    if bits is not None:
        label, variant = f"{label}, saved in {bits} bits", (*variant, "saved_bits", str(bits))

    res = data.get("resources") if isinstance(data.get("resources"), dict) else {}
    # Sec. 4.1: a data-dependent method's resources (HOSVD's) vary during training; the paper reports the peak
    peak = bool(getattr(_method(method), "data_dependent", False))

    def resource(*keys):
        for k in keys:
            if peak and _num(res.get(k + "_peak")) is not None:
                return _num(res[k + "_peak"]), True
            if _num(res.get(k)) is not None:
                return _num(res[k]), False
        return None, False

    mem, mem_peak = resource("activation_mib")
    train, train_peak = resource("train_gflops")
    paper, paper_peak = resource("paper_gflops")
    spec = _model_spec(model)
    if paper is not None and "paper_flops" not in res and spec is not None and spec.paper_flops == "authors_llm":
        paper *= 2  # recorded before paper_gflops followed the authors' code: multiply-adds (Table 4 counts 2 each)
    gflops, gflops_peak = (train, train_peak) if flops == "train" else (paper, paper_peak)
    task = _task(model, data)  # its monitored score (val/acc, val/miou) is the table's accuracy, as a fraction
    key, scale = task.monitor.replace("/", "_"), 100 if task.monitor_percent else 1
    final, best = (None if _num(data.get(k)) is None else _num(data[k]) / scale for k in (key, f"best_{key}"))
    return {
        "task": task.name, "macc": _num(data.get("val_macc")),
        "setup": str(setup) if setup is not None else MISSING,
        "model": model,
        "dataset": str(setting("dataset", "name") or MISSING),
        "method": str(method), "num_finetune": _layers(setting("num_finetune")),
        "label": label, "_variant": variant,
        "final_accuracy": None if final is None else 100 * final,
        "best_accuracy": None if best is None else 100 * best,
        "activation_mib": mem, "gflops": gflops, "gflops_source": flops, "mem_peak": mem_peak, "gflops_peak": gflops_peak,
        "measured_activation_mib": resource("measured_activation_mib")[0],
        "peak_step_mib": resource("peak_step_mib")[0], "training_overhead_mib": resource("training_overhead_mib")[0],
        "train_gflops": train, "paper_gflops": paper,
        "forward_gflops": _num(res.get("forward_gflops")), "backward_gflops": _num(res.get("backward_gflops")),
        "overhead_gflops": _num(res.get("overhead_gflops")),
        "run_dir": str(path.parent),
        "seed": stored.get("seed", settings.get("seed")),
        "_config": json.dumps(_configuration(model_args, data_args, stored, settings), sort_keys=True, default=str),
        # "finished", "diverged" (a non-finite loss: its accuracy is not a result), "running"/"interrupted"; old files
        # without the key: "finished" when fit ended
        "status": str(data.get("status") or ("finished" if "epochs_completed" in data else "unfinished")),
        "_status_recorded": bool(data.get("status")),  # files older than the status key: nothing to say in md
        # which of several runs of one configuration to show: a finished fit first, then the newest file
        "_recency": ("epochs_completed" in data or final is not None or best is not None, path.stat().st_mtime),
    }


def _method_rank(method: str) -> int:
    info = _method(method)
    return info.report_order if info is not None else 1000


def _layers_key(n, all_first: bool = True):
    if n == "all":
        return (0 if all_first else 2, 0, "")
    return (1, n, "") if isinstance(n, int) else (1, math.inf, str(n))


def _sort_key(row: dict):
    return (row["setup"], row["model"], row["dataset"], _method_rank(row["method"]), row["method"],
            row["_variant"], row["label"], _layers_key(row["num_finetune"]))


def collect(run_dirs: Union[PathLike, Sequence[PathLike]], accuracy: Literal["final", "best"] = "final",
            flops: Literal["train", "paper"] = "train", warn=None,
            mem: Literal["paper", "saved", "peak"] = "paper") -> list[dict]:
    """One row per run configuration found under ``run_dirs`` (each a directory searched recursively for
    metrics.json, or a metrics.json itself), sorted as the paper's tables.

    ``accuracy``: "final" (``val_acc``, falling back to ``best_val_acc``) or "best" (the other way round), in
    percent. ``flops``: "train" (our count, ``train_gflops``: forward + weight gradient + compression overhead,
    groups and strides counted) or "paper" (``paper_gflops``: the paper's eq. 15-17 as written, comparable with
    its tables). ``mem``: which memory ``mem_mib`` (the tables' Mem column and the plots) is, ``MEMORY``: "paper"
    (activation_mib), "saved" (measured_activation_mib) or "peak" (peak_step_mib). Columns ``mem_peak``/``gflops_peak`` say where a ``*_peak`` resource was used (HOSVD). Several runs of one configuration: the latest metrics.json is kept (runs with an accuracy before runs
    without); its row has ``runs`` > 1 and
    ``superseded`` lists the others. ``warn`` (default: print to stderr) receives a line per skipped file.
    """
    warn = warn or (lambda msg: print(f"report: {msg}", file=sys.stderr))
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    files: list[Path] = []
    for d in map(Path, run_dirs):
        if not d.exists():
            raise FileNotFoundError(f"{d} does not exist: give run directories (e.g. runs/ or runs/setupB/mcunet)")
        files += [d] if d.is_file() else sorted(d.rglob("metrics.json"))
    best: dict[tuple, dict] = {}
    superseded: dict[tuple, list[str]] = defaultdict(list)
    for path in {p.resolve(): p for p in files}.values():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            warn(f"skipping {path}: not readable JSON ({e})")
            continue
        row = _row(path, data, flops) if isinstance(data, dict) else None
        if row is None:
            continue
        order = ("final_accuracy", "best_accuracy") if accuracy == "final" else ("best_accuracy", "final_accuracy")
        source = next((k for k in order if row[k] is not None), None)
        row["accuracy"] = row[source] if source and row["status"] != "diverged" else None
        row["accuracy_source"] = {"final_accuracy": "val_acc", "best_accuracy": "best_val_acc"}.get(source)
        row["mem_mib"], row["mem_source"] = row[MEMORY[mem][0]], mem
        # one configuration and seed: several runs are re-runs, the latest is shown
        key = (*_label_key(row), row["_config"], json.dumps(row["seed"]))
        old = best.get(key)
        if old is None or row["_recency"] >= old["_recency"]:
            if old is not None:
                superseded[key].append(old["run_dir"])
            best[key] = row
        else:
            superseded[key].append(row["run_dir"])
    configs: dict[tuple, list[dict]] = defaultdict(list)
    for key, row in best.items():
        row["superseded"] = superseded.get(key, [])
        row["runs"] = 1 + len(row["superseded"])
        configs[key[:-1]].append(row)
    rows = [_over_seeds(group) for group in configs.values()]
    _name_differences(rows)
    return sorted(rows, key=_sort_key)


def _label_key(row: dict) -> tuple:
    return row["setup"], row["model"], row["dataset"], row["method"], row["label"], str(row["num_finetune"])


def _over_seeds(group: list[dict]) -> dict:
    """One configuration run with several seeds: one row, the mean accuracy of its finished seeds (``seeds``,
    ``accuracy_sd``, ``per_seed``), the statuses of all of them (``status``: "finished" when every seed finished)."""
    group = sorted(group, key=lambda r: (str(r["seed"]), r["_recency"]))
    if len(group) == 1:
        row = group[0]
        row["seeds"] = 1
        return row
    done = [r for r in group if r["status"] == "finished" and r["accuracy"] is not None]
    row = dict(max(done or group, key=lambda r: r["_recency"]))
    values = [r["accuracy"] for r in done]
    row["seeds"] = len(group)
    row["accuracy"] = sum(values) / len(values) if values else None
    row["accuracy_sd"] = (statistics.stdev(values) if len(values) > 1 else 0.0) if values else None
    row["per_seed"] = "; ".join(f"s{r['seed']}: {_fmt(r['accuracy'])}"
                                + ("" if r["status"] == "finished" else f" ({r['status']})") for r in group)
    statuses = Counter(r["status"] for r in group)
    row["status"] = "finished" if set(statuses) == {"finished"} else ", ".join(
        f"{status} x{n}" for status, n in sorted(statuses.items()))
    row["runs"] = sum(r["runs"] for r in group)
    row["_status_recorded"] = any(r["_status_recorded"] for r in group)
    row["superseded"] = [d for r in group for d in r["superseded"]]
    row["seed_runs"] = [r["run_dir"] for r in group]
    return row


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _name_differences(rows: list[dict]) -> None:
    """Rows of one label and #layers that are different configurations (other layers, include, budget, epochs,
    data, trainer settings...) are never merged: each says where it differs from the most common configuration of
    the group (ties: an unset option's default, else the first run directory's), e.g. ``ASI`` and
    ``ASI [budget=0.5]``."""
    by_label: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by_label[_label_key(r)].append(r)
    for group in by_label.values():
        if len(group) < 2:
            continue
        group.sort(key=lambda r: r["run_dir"])
        flats = [_flat(json.loads(r["_config"])) for r in group]
        as_text = [{k: json.dumps(v, default=str) for k, v in f.items()} for f in flats]
        keys = sorted({k for f in as_text for k in f})
        common = {}
        for k in keys:  # the most common value; among equally common ones, unset (the default) if one is, else
            counts = Counter(f.get(k) for f in as_text)  # the first run directory's
            best = max(counts.values())
            tied = [f.get(k) for f in as_text if counts[f.get(k)] == best]
            common[k] = next((v for v in tied if v in (None, "null")), tied[0])
        for r, f, t in zip(group, flats, as_text):
            shown = ", ".join(f"{k.split('.', 1)[-1]}={f.get(k)}" for k in keys if t.get(k) != common[k])
            if shown:
                r["label"] = f"{r['label']} [{shown}]"
                r["_variant"] = (*r["_variant"], shown)


# ------------------------------------------------------------------------------------------ tables
def _fmt(x: Optional[float]) -> str:
    if x is None:
        return MISSING
    if x != 0 and abs(x) < 0.01:
        return f"{x:.2g}"
    return f"{x:.2f}"


def _groups(rows: Iterable[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[(r["setup"], r["model"], r["dataset"])].append(r)
    return out


def _md(rows: Sequence[dict]) -> str:
    if not rows:
        return "No runs found (no metrics.json with settings under the given directories).\n"
    blocks = []
    for (setup, model, dataset), group in _groups(rows).items():
        layout = _TASK_TABLES.get(group[0].get("task"))
        if layout is not None:  # a task with a table of its own (segmentation: Table 3's mIoU/mAcc)
            blocks.append(layout(model, dataset, group))
            continue
        spec = _model_spec(model)  # the unit of the paper's table for this model (Table 4: TFLOPs)
        unit = spec.paper_flops_unit if spec is not None else "GFLOPs"
        lines = [f"### setup {setup} · {model} · {dataset}", "",
                 f"| Method | #Layers | Acc (%) ↑ | Mem (MiB) ↓ | {unit} ↓ |",
                 "|:--|--:|--:|--:|--:|"]
        notes, prev = [], None
        for r in group:
            mark = ""
            if r["superseded"]:
                notes.append(f"{len(r['superseded']) + 1} runs of {r['label']}, {r['num_finetune']} layers with the "
                             f"same settings and seed: the latest is shown ({r['run_dir']}).")
                mark = f"<sup>{len(notes)}</sup>"
            if r.get("seeds", 1) > 1:
                notes.append(f"{r['label']}, {r['num_finetune']} layers: mean of the finished of {r['seeds']} seeds "
                             f"(sd {_fmt(r['accuracy_sd'])}; {r['per_seed']}).")
                mark += f"<sup>{len(notes)}</sup>"
            n = "All" if r["num_finetune"] == "all" else MISSING if r["num_finetune"] is None else r["num_finetune"]
            name = r["label"] if r["label"] != prev else ""
            prev = r["label"]
            acc = _fmt(r["accuracy"]) if r.get("status") != "diverged" else "diverged"
            if r["_status_recorded"] and r.get("status") not in ("finished", "diverged"):  # running, interrupted
                acc += f" ({r['status']})"
            if r.get("status") == "diverged":
                notes.append(f"{r['label']}, {r['num_finetune']} layers diverged (non-finite loss; {r['run_dir']}): "
                             f"no accuracy to report.")
                mark += f"<sup>{len(notes)}</sup>"
            flops = r["gflops"] if unit == "GFLOPs" or r["gflops"] is None else r["gflops"] / 1000
            lines.append(f"| {name} | {n}{mark} | {acc} | {_fmt(r.get('mem_mib', r['activation_mib']))} | {_fmt(flops)} |")
        lines.append("")
        lines.append(f"{MEMORY[group[0].get('mem_source', 'paper')][1]}.  ")
        peaks = [what for what, key in (("activation memory", "mem_peak"), ("GFLOPs", "gflops_peak"))
                 if any(r[key] for r in group) and (key != "mem_peak" or group[0].get("mem_source", "paper") == "paper")]
        if peaks:
            lines.append(f"HOSVD: peak {' and '.join(peaks)} over training (paper Sec. 4.1).  ")
        if any(r["gflops_source"] == "train" for r in group):
            lines.append(f"{unit} per training step: forward + weight gradient + "
                         "compression overhead, with "
                         "groups and strides counted (our count).  ")
        if any(r["gflops_source"] == "paper" for r in group):
            lines.append(f"{unit}: the paper's eq. 15-17 as written (comparable with its tables).  "
                         if spec is None or spec.paper_flops == "equations" else
                         f"{unit} as the authors' code counts this model's linear layers (the forward matmul and "
                         f"vanilla's weight gradient 2 FLOPs per multiply-add, ASI's contractions one; "
                         f"docs/resources.md).  ")
        lines += [f"<sup>{i}</sup> {note}  " for i, note in enumerate(notes, 1)]
        blocks.append("\n".join(lines).rstrip() + "\n")
    return "\n".join(blocks)


def _md_segmentation(model: str, dataset: str, group: Sequence[dict]) -> str:
    """The paper's Table 3 layout: mIoU and mAcc (%, mmseg's definitions), Mem (MiB), TFLOPs."""
    lines = [f"### {model} · {dataset}", "", "| Method | #Layers | mIoU ↑ | mAcc ↑ | Mem (MiB) ↓ | TFLOPs ↓ |",
             "|:--|--:|--:|--:|--:|--:|"]
    prev = None
    for r in group:
        n = "All" if r["num_finetune"] == "all" else MISSING if r["num_finetune"] is None else r["num_finetune"]
        name = r["label"] if r["label"] != prev else ""
        prev = r["label"]
        tflops = None if r["gflops"] is None else r["gflops"] / 1000
        status = "" if r.get("status") == "finished" or not r["_status_recorded"] else f" ({r.get('status')})"
        lines.append(f"| {name} | {n} | {_fmt(r['accuracy'])}{status} | {_fmt(r['macc'])} | {_fmt(r.get('mem_mib', r['activation_mib']))} | "
                     f"{_fmt(tflops)} |")
    mem = ("Mem: activation memory of the compressed layers" if group[0].get("mem_source", "paper") == "paper"
           else MEMORY[group[0].get("mem_source", "paper")][1])
    lines += ["", f"mIoU/mAcc on the validation set (mmseg's definitions); {mem}; TFLOPs per training step (see the "
                  f"GFLOPs note of the classification tables).  "]
    return "\n".join(lines).rstrip() + "\n"



_TASK_TABLES = {"segmentation": _md_segmentation}  # task -> its own table layout (others: _md's)

def _csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else float(f"{r[k]:.6g}") if isinstance(r[k], float) else r[k])
                    for k in CSV_COLUMNS})
    return buf.getvalue()


def format_table(rows: Sequence[dict], fmt: Literal["md", "csv"] = "md") -> str:
    """The rows of :func:`collect` as Markdown tables (one per setup/model/dataset) or as one CSV."""
    if fmt == "md":
        return _md(rows)
    if fmt == "csv":
        return _csv(rows)
    raise ValueError(f"unknown format {fmt!r}; use 'md' or 'csv'")


# ------------------------------------------------------------------------------------------ figures
def _style(method: str) -> tuple[Optional[str], str]:
    """(colour, marker) of a method's points: its ``plot_style`` (None, "x" for a method no longer registered)."""
    return getattr(_method(method), "plot_style", (None, "x"))

_STYLES = ("-", "--", ":", "-.")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def pareto_plots(rows: Sequence[dict], out_dir: PathLike) -> list[Path]:
    """One PNG per (setup, model, dataset): accuracy vs activation memory and vs GFLOPs (log x), a line per
    method configuration through its numbers of fine-tuned layers. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    out_dir = Path(out_dir)
    written = []
    for (setup, model, dataset), group in _groups(rows).items():
        lines: dict[str, list[dict]] = defaultdict(list)
        for r in group:
            lines[r["label"]].append(r)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        styles_used: dict[str, int] = defaultdict(int)
        plotted = False
        for label, pts in lines.items():
            method = pts[0]["method"]
            k = styles_used[method]  # second, third ... configuration of a method: other dashes, hollow markers
            style, face = _STYLES[k % len(_STYLES)], (None if k == 0 else "white")
            styles_used[method] += 1
            pts = sorted(pts, key=lambda r: _layers_key(r["num_finetune"], all_first=False))
            for ax, key in zip(axes, ("mem_mib", "gflops")):
                xy = [(r.get(key, r["activation_mib"]), r["accuracy"], r["num_finetune"]) for r in pts
                      if r.get(key, r["activation_mib"]) is not None and r.get(key, r["activation_mib"]) > 0
                      and r["accuracy"] is not None]
                if not xy:
                    continue
                plotted = True
                xs, ys, ns = zip(*xy)
                ax.plot(xs, ys, style, marker=_style(method)[1], color=_style(method)[0],
                        markerfacecolor=face, label=label, markersize=6, linewidth=1.6)
                for x, y, n in xy:
                    ax.annotate("All" if n == "all" else str(n), (x, y), textcoords="offset points",
                                xytext=(4, 4), fontsize=7, color=_style(method)[0] or "black")
        memory = {"paper": "Activation memory (MiB)", "saved": "Saved by autograd (MiB)",
                  "peak": "Whole-step peak (MiB)"}[group[0].get("mem_source", "paper")]
        for ax, xlabel in zip(axes, (memory, "GFLOPs per training step" +
                                     (" (paper's count)" if group[0]["gflops_source"] == "paper" else ""))):
            if plotted:
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                lo, hi = ax.get_xlim()
                if hi / lo < 100:  # less than two decades: label 2x and 5x too, or there may be one label only
                    ax.xaxis.set_minor_formatter(FuncFormatter(
                        lambda v, _: f"{v:g}" if round(v / 10 ** math.floor(math.log10(v)), 6) in (2, 5) else ""))
                else:
                    ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(xlabel)
            ax.grid(True, which="major", alpha=0.35)
            ax.grid(True, which="minor", alpha=0.12)
        axes[0].set_ylabel("Accuracy (%)")
        handles, labels = axes[0].get_legend_handles_labels()
        if not handles:
            handles, labels = axes[1].get_legend_handles_labels()
        ncol = min(4, max(1, len(handles)))
        if handles:  # below the panels, where it hides no point
            fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=ncol, frameon=False)
        fig.suptitle(f"{model} on {dataset} (setup {setup}); numbers: fine-tuned layers")
        fig.tight_layout(rect=(0, 0.06 * math.ceil(len(handles) / ncol), 1, 1))
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"pareto_{_slug(setup)}_{_slug(model)}_{_slug(dataset)}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------ command
def report(run_dirs: List[str], format: Literal["md", "csv"] = "md", out: Optional[str] = None,
           plots: Optional[str] = None, no_plots: bool = False, accuracy: Literal["final", "best"] = "final",
           flops: Literal["train", "paper"] = "train", mem: Literal["paper", "saved", "peak"] = "paper") -> None:
    """Paper-style tables (Table 1/2) and Pareto figures from the metrics.json files of finished runs.

    Usage: main.py report RUN_DIR... [--format md|csv] [--out FILE] [--plots DIR] (run directories first).

    Args:
        run_dirs: Run directories (searched recursively for metrics.json), e.g. runs/ or runs/setupB/mcunet.
        format: md (one table per setup/model/dataset: method x #layers, accuracy %, memory MiB, GFLOPs) or csv.
        out: Write the table to this file instead of printing it.
        plots: Folder for the Pareto PNGs (accuracy vs memory and vs GFLOPs); default: next to --out, else the
            current folder.
        no_plots: Write no figures.
        accuracy: final (val_acc at the end of training) or best (best_val_acc); the other is the fallback.
        flops: train (our count of a training step) or paper (the paper's eq. 15-17 as written).
        mem: Which memory the Mem column and the plots show: paper (the fine-tuned layers' inputs as stored, the
            paper's Mem), saved (what autograd keeps, measured) or peak (the whole-step peak of a training step).
    """
    try:
        rows = collect(run_dirs, accuracy=accuracy, flops=flops, mem=mem)
    except FileNotFoundError as e:
        raise SystemExit(f"report: {e}") from None
    if not rows:
        raise SystemExit(f"report: no metrics.json with run settings under {', '.join(map(str, run_dirs))}; "
                         f"give the run root (default runs/) or a run directory of `main.py fit`")
    for r in rows:
        if r["superseded"]:
            print(f"report: {len(r['superseded']) + 1} runs of {r['setup']}/{r['model']}/{r['dataset']} {r['label']} "
                  f"{r['num_finetune']} layers with the same settings and seed; using the latest, {r['run_dir']}",
                  file=sys.stderr)
    text = format_table(rows, format)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"report: wrote {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if not no_plots:
        plot_dir = Path(plots) if plots else (Path(out).parent if out else Path.cwd())
        for p in pareto_plots(rows, plot_dir):
            print(f"report: wrote {p}", file=sys.stderr)
