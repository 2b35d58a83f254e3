"""The same tiny LLaMA (classification/llm.py's llama_tiny: 4 blocks, hidden 64, random init) on the same data
(digits_tokens, batch 64, 65 tokens), ASI on the last N MLP linears at the same ranks, trained two ways in one process,
interleaved (Lightning, Trainer, Lightning, Trainer, ...):

* this project's command line (Lightning), in-process: ``main.py fit --config configs/models/llama_tiny.yaml ...``;
  its metrics.json gives what autograd keeps and the whole-step peak;
* ``transformers.Trainer`` with ``LlamaForSequenceClassification`` built from the same config, patched with
  ``asi_core.patch``, only the patched layers and the head trainable (as the framework), Adam at the same lr and the
  same gradient clipping, ``asi_hf.ASICallback`` for the memory.

Step time, both: from the step's start hook to its end hook (Lightning ``on_train_batch_start`` ->
``on_train_batch_end``, Trainer ``on_step_begin`` -> ``on_step_end``: forward, backward, clipping, optimiser and
scheduler steps, each loop's bookkeeping), the median over a run's steps after its first (which both paths spend
measuring), then the median over the repeats. Prints a table and writes JSON (``--out``). Run on an idle machine:
``PYTHONPATH=. python scripts/hf_vs_lightning.py --steps 30 --repeats 3 --out docs/benchmarks/hf_trainer.json``.
The models differ in one place: the framework's classifier applies the final RMSNorm and the head to the pooled token
only (exact, classification/llm.py), transformers' to every position before pooling, so it keeps more.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def lightning(steps: int, num_finetune: int, ranks: int, run_root: str) -> dict:
    import pytorch_lightning as pl

    from classification.cli import ASICLI, cli_main

    times: list[float] = []

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.append(time.perf_counter() - self.start)

    class TimedCLI(ASICLI):
        def instantiate_trainer(self, **kwargs):
            trainer = super().instantiate_trainer(**kwargs)
            trainer.callbacks.append(Timer())
            return trainer

    argv = ["fit", "--config", str(REPO / "configs/models/llama_tiny.yaml"), "--config",
            str(REPO / "configs/data/digits_tokens.yaml"), "--model.method", "asi",
            "--model.num_finetune", str(num_finetune), "--model.ranks", str(ranks), "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", str(steps), "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--run_root", run_root]
    cli_main(argv, TimedCLI)
    r = json.loads(next(Path(run_root).rglob("metrics.json")).read_text())["resources"]
    return {"step_s": statistics.median(times[1:]), "measured_activation_mib": r["measured_activation_mib"],
            "activation_mib": r["activation_mib"], "peak_step_mib": r.get("peak_step_mib")}


def hf_trainer(steps: int, num_finetune: int, ranks: int, out: str) -> dict:
    from transformers import LlamaConfig, LlamaForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

    import asi_core
    import asi_hf
    from classification.data import ClassificationData
    from classification.llm import LLAMA_TINY_CONFIG

    data = ClassificationData("digits_tokens", batch_size=64, num_workers=0)
    data.setup("fit")
    train = [{"input_ids": x["input_ids"], "attention_mask": x["attention_mask"], "labels": int(y)}
             for x, y in (data.train_set[i] for i in range(len(data.train_set)))]
    cfg = LlamaConfig(**{k: v for k, v in LLAMA_TINY_CONFIG.items() if k != "model_type"}, num_labels=data.num_classes)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg)
    asi_core.patch(model, "asi", num_finetune=num_finetune, layer_type="linear", include="mlp", ranks=ranks)
    keep = {id(p) for _, layer in asi_core.patched_layers(model) for p in layer.parameters()}
    keep |= {id(p) for p in model.score.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.start)

    timer, usage = Timer(), asi_hf.ASICallback()
    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=64, learning_rate=1e-3,
                             weight_decay=0.0, lr_scheduler_type="cosine", max_grad_norm=2.0, logging_steps=steps,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=train, callbacks=[timer, usage]).train()
    return {"step_s": statistics.median(timer.times[1:]),
            "measured_activation_mib": usage.metrics["asi/measured_activation_mib"],
            "activation_mib": usage.metrics["asi/activation_mib"], "peak_step_mib": usage.metrics["asi/peak_step_mib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num_finetune", type=int, default=6)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    a = parser.parse_args()
    torch.set_num_threads(1)
    runs: dict[str, list[dict]] = {"lightning": [], "hf_trainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):  # interleaved: a slow spell of the machine hits both
            runs["lightning"].append(lightning(a.steps, a.num_finetune, a.ranks, f"{tmp}/runs{i}"))
            runs["hf_trainer"].append(hf_trainer(a.steps, a.num_finetune, a.ranks, f"{tmp}/hf{i}"))
    summary = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    summary["hf_over_lightning_step"] = summary["hf_trainer"]["step_s"] / summary["lightning"]["step_s"]
    result = {"setting": vars(a) | {"model": "llama_tiny", "data": "digits_tokens", "batch_size": 64, "threads": 1,
                                    "torch": torch.__version__},
              "median": summary, "runs": runs}
    print(f"{'':24}{'step s (median)':>16}{'measured MiB':>14}{'eq. 5 MiB':>11}{'peak MiB':>10}")
    for name, label in (("lightning", "Lightning (main.py fit)"), ("hf_trainer", "transformers.Trainer")):
        r = summary[name]
        print(f"{label:24}{r['step_s']:16.4f}{r['measured_activation_mib']:14.2f}{r['activation_mib']:11.4f}"
              f"{r['peak_step_mib']:10.2f}")
    print(f"step time, Trainer / Lightning: {summary['hf_over_lightning_step']:.2f}")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
