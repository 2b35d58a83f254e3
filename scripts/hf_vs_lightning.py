"""The same tiny LLaMA (classification/llm.py's llama_tiny: 4 blocks, hidden 64, random init) on the same data
(digits_tokens, batch 64, 65 tokens), ASI on the last N MLP linears at the same ranks, trained two ways:

* this project's command line (Lightning): ``python main.py fit --config configs/models/llama_tiny.yaml ...``;
  its metrics.json gives the median forward/backward/optimizer times and what autograd keeps;
* ``transformers.Trainer`` with ``LlamaForSequenceClassification`` built from the same config, patched with
  ``asi_core.patch``, only the patched layers and the head trainable (as the framework), Adam at the same lr,
  ``asi_hf.ASICallback`` for the memory, a callback timing each step.

Prints a table and writes JSON (``--out``). Run on an idle machine:
``PYTHONPATH=. python scripts/hf_vs_lightning.py --steps 30 --out docs/benchmarks/hf_trainer.json``.
The two models differ in one place: the framework's classifier applies the final RMSNorm and the head to the pooled
token only (exact, classification/llm.py), transformers' to every position before pooling, so it keeps more.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def lightning(steps: int, num_finetune: int, ranks: int, run_root: str) -> dict:
    cmd = [sys.executable, str(REPO / "main.py"), "fit", "--config", "configs/models/llama_tiny.yaml",
           "--config", "configs/data/digits_tokens.yaml", "--model.method", "asi",
           "--model.num_finetune", str(num_finetune), "--model.ranks", str(ranks), "--trainer.max_epochs", "1",
           "--trainer.limit_train_batches", str(steps), "--trainer.limit_val_batches", "0",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
           "--run_root", run_root]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    r = json.loads(next(Path(run_root).rglob("metrics.json")).read_text())["resources"]
    t = r["timing"]
    return {"step_s": t["forward_s"] + t["backward_s"] + t["optimizer_s"], "forward_s": t["forward_s"],
            "backward_s": t["backward_s"], "measured_activation_mib": r["measured_activation_mib"],
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
        times: list = []

        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.start)

    timer, usage = Timer(), asi_hf.ASICallback()
    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=64, learning_rate=1e-3,
                             weight_decay=0.0, lr_scheduler_type="cosine", max_grad_norm=2.0, logging_steps=steps,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=train, callbacks=[timer, usage]).train()
    return {"step_s": statistics.median(timer.times[1:] or timer.times),
            "measured_activation_mib": usage.metrics["asi/measured_activation_mib"],
            "activation_mib": usage.metrics["asi/activation_mib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--num_finetune", type=int, default=6)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    a = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        light = lightning(a.steps, a.num_finetune, a.ranks, f"{tmp}/runs")
        hf = hf_trainer(a.steps, a.num_finetune, a.ranks, f"{tmp}/hf")
    result = {"setting": vars(a) | {"model": "llama_tiny", "data": "digits_tokens", "batch_size": 64,
                                    "threads": 1, "torch": torch.__version__},
              "lightning": light, "hf_trainer": hf}
    print(f"{'':24}{'step s (median)':>16}{'measured MiB':>14}{'eq. 5 MiB':>11}")
    for name, r in (("Lightning (main.py fit)", light), ("transformers.Trainer", hf)):
        print(f"{name:24}{r['step_s']:16.4f}{r['measured_activation_mib']:14.2f}{r['activation_mib']:11.4f}")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
