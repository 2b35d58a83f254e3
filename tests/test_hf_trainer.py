"""ASI under transformers.Trainer, with and without peft (docs/huggingface.md), offline on a tiny LLaMA:
the documented examples run as written; the loss falls; full-rank gradients through a Trainer step equal plain
autograd's; a resumed run ends bit for bit where an uninterrupted one does; the unpatched save reloads in a process
without asi_core; ranks chosen from batches are the budget's optimum (brute force); the callback's figures are the
meter's and eq. 5's; the warnings name the fix."""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers import (LlamaConfig, LlamaForSequenceClassification, Trainer, TrainerCallback,  # noqa: E402
                          TrainingArguments, default_data_collator)

import asi_core  # noqa: E402
import asi_hf  # noqa: E402
from asi_core.accounting import tucker_elements  # noqa: E402
from asi_core.usage import ActivationMeter  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# transformers 5 renamed TrainingArguments.gradient_checkpointing (the GPU machine's older one has only that name)
CHECKPOINTING = ({"activation_checkpointing": True} if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                 else {"gradient_checkpointing": True})
VOCAB, LENGTH = 128, 12


def tiny_llama(layers: int = 2, dtype=torch.float32) -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0, num_labels=2)
    return LlamaForSequenceClassification(cfg).to(dtype)


def dataset(n: int = 64, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, LENGTH), generator=g)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": int(x[-1] >= VOCAB // 2)} for x in ids]


def training_args(out, **overrides) -> TrainingArguments:
    kw = dict(output_dir=str(out), max_steps=8, per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=1,
              report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    kw.update(overrides)
    return TrainingArguments(**kw)


def patch_mlp(model, ranks=4, n=3):
    return asi_core.patch(model, "asi", num_finetune=n, layer_type="linear", include="mlp", ranks=ranks)


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# ----------------------------------------------------------------------------- the documented examples
@pytest.mark.parametrize("index", [0, 1])
def test_the_documented_examples_run_as_written(index, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "huggingface.md").read_text(), re.S)
    assert len(blocks) == 2
    script = tmp_path / "example.py"
    script.write_text(blocks[index])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    if index == 0:
        assert "model.layers.3.mlp.down_proj" in res.stdout and "asi/measured_activation_mib" in res.stdout
    else:
        assert "12 lora_A inputs compressed" in res.stdout


# ----------------------------------------------------------------------------- training
def test_the_loss_falls_under_the_trainer(tmp_path):
    model = tiny_llama()
    patch_mlp(model)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=48, learning_rate=5e-3),
                      train_dataset=dataset(), callbacks=[asi_hf.ASICallback()])
    trainer.train()
    got = losses(trainer)
    assert sum(got[-8:]) / 8 < sum(got[:8]) / 8 - 0.05, got


class Grads(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_full_rank_gradients_through_a_trainer_step_equal_plain_autograd(tmp_path):
    model = tiny_llama(dtype=torch.float64)
    plain = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ranks clipped to the full dimensions
        names = patch_mlp(model, ranks=10 ** 6, n=4)
    for n, p in plain.named_parameters():  # the same parameters train in the reference
        p.requires_grad_(dict(model.named_parameters())[n].requires_grad)
    data = dataset(16)
    grads = Grads()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=1, per_device_train_batch_size=16,
                                                      max_grad_norm=0.0), train_dataset=data, callbacks=[grads])
    trainer.train()
    loss = plain(**default_data_collator(data)).loss
    loss.backward()
    expected = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert set(grads.grads) == set(expected) and any(n.startswith(names[0]) for n in expected)
    for n, g in expected.items():
        torch.testing.assert_close(grads.grads[n], g, rtol=1e-9, atol=1e-12, msg=n)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_a_resumed_trainer_run_ends_where_an_uninterrupted_one_does(tmp_path):
    data = dataset()

    def trainer(out, *callbacks):
        model = tiny_llama()
        patch_mlp(model)
        args = training_args(out, max_steps=12, save_strategy="steps", save_steps=6)
        return Trainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks))

    whole = trainer(tmp_path / "whole")
    whole.train()
    trainer(tmp_path / "cut", StopAt(6)).train()  # "killed" after its step-6 checkpoint
    assert (tmp_path / "cut" / "checkpoint-6").is_dir()
    resumed = trainer(tmp_path / "cut")
    resumed.train(resume_from_checkpoint=True)
    assert losses(resumed)[-6:] == losses(whole)[-6:]
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert any(".method.factor_" in k for k in a)  # the warm-start state went through the checkpoint
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_the_unpatched_save_reloads_without_asi_core_with_identical_outputs(tmp_path):
    model = tiny_llama()
    patch_mlp(model)
    Trainer(model=model, args=training_args(tmp_path / "run", max_steps=3), train_dataset=dataset()).train()
    asi_core.unpatch(model)
    model.save_pretrained(tmp_path / "final")
    batch = default_data_collator(dataset(4, seed=1))
    model.eval()
    with torch.no_grad():
        torch.save({"batch": batch, "logits": model(**batch).logits}, tmp_path / "expected.pt")
    code = ("import importlib.util, sys, torch\n"
            "assert importlib.util.find_spec('asi_core') is None, 'asi_core is importable'\n"
            "from transformers import AutoModelForSequenceClassification\n"
            f"m = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / 'final')!r}).eval()\n"
            f"e = torch.load({str(tmp_path / 'expected.pt')!r})\n"
            "with torch.no_grad():\n"
            "    assert torch.equal(m(**e['batch']).logits, e['logits'])\n"
            "print('identical')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "identical" in res.stdout, res.stderr[-2000:]


# ----------------------------------------------------------------------------- the callback
def test_the_callback_logs_what_the_meter_and_eq5_give(tmp_path):
    model = tiny_llama()
    names = patch_mlp(model, ranks=(2, 3, 4))
    data = dataset(8)
    callback = asi_hf.ASICallback()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=data,
                      callbacks=[callback])
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["asi/num_layers"] == 3 for h in logged)
    # eq. 5 by hand: a (B=8, T=12, C) input at ranks (2, 3, 4) keeps 8*2 + 12*3 + C*4 + 2*3*4 floats
    widths = [model.get_submodule(n).in_features for n in names]
    by_hand = sum(8 * 2 + 12 * 3 + c * 4 + 2 * 3 * 4 for c in widths) * 4 / 2 ** 20
    assert logged[0]["asi/activation_mib"] == pytest.approx(by_hand)
    assert by_hand == pytest.approx(sum(tucker_elements((8, 12, c), (2, 3, 4)) for c in widths) * 4 / 2 ** 20)
    assert logged[0]["asi/vanilla_activation_mib"] == pytest.approx(sum(8 * 12 * c for c in widths) * 4 / 2 ** 20)
    # what autograd keeps: the meter on the same step outside the Trainer (the batch's order does not change sizes)
    with ActivationMeter(model) as meter:
        loss = model(**default_data_collator(data)).loss
    loss.backward()
    assert logged[0]["asi/measured_activation_mib"] == pytest.approx(meter.summary()["measured_activation_mib"])
    assert logged[0]["asi/train_gflops"] > 0
    # the whole-step peak holds at least the parameters, the batch's saved activations and the trained gradients
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2 ** 20
    peak = logged[0]["asi/peak_step_mib"]
    assert params + logged[0]["asi/measured_activation_mib"] <= peak < 4 * (params + grads) + 50, peak
    usage = json.loads((tmp_path / "asi_usage.json").read_text())
    assert [r["name"] for r in usage["layers"]] == names
    assert usage["peak_step_breakdown_mib"]["parameters"] == pytest.approx(params, rel=0.01)


class NoGradFirst(Trainer):
    """A loss preceded by a forward without a graph (as TRL's reference and generation passes)."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        with torch.no_grad():
            model(**inputs)
        return super().compute_loss(model, inputs, *args, **kwargs)


def test_the_callback_measures_the_training_forward_not_a_no_grad_one_before_it(tmp_path):
    figures = []
    for cls in (Trainer, NoGradFirst):
        model = tiny_llama()
        patch_mlp(model)
        callback = asi_hf.ASICallback(peak=False)
        cls(model=model, args=training_args(tmp_path / cls.__name__, max_steps=1), train_dataset=dataset(8),
            callbacks=[callback]).train()
        figures.append(callback.metrics)
    assert figures[1]["asi/measured_activation_mib"] > 0
    assert figures[1] == pytest.approx(figures[0])


def test_gradient_checkpointing_warns_naming_the_fix(tmp_path):
    model = tiny_llama()
    patch_mlp(model)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=1, **CHECKPOINTING),
                      train_dataset=dataset(8), callbacks=[asi_hf.ASICallback()])
    with pytest.warns(asi_hf.ASIWarning, match=r"gradient_checkpointing=False") as record:
        trainer.train()
    assert any("model.layers.1.mlp.gate_proj" in str(w.message) for w in record)
    assert asi_hf.checkpointed_patched_layers(model)[:1] == ["model.layers.1.mlp.gate_proj"]


def test_an_unpatched_model_warns_that_nothing_is_compressed(tmp_path):
    callback = asi_hf.ASICallback()
    trainer = Trainer(model=tiny_llama(), args=training_args(tmp_path, max_steps=1), train_dataset=dataset(8),
                      callbacks=[callback])
    with pytest.warns(asi_hf.ASIWarning, match=r"asi_core.patch\(model") as record:
        trainer.train()
    assert len([w for w in record if issubclass(w.category, asi_hf.ASIWarning)]) == 1
    assert callback.metrics == {} and not (tmp_path / "asi_usage.json").exists()  # nothing measured, nothing written


def test_attach_puts_the_callback_before_the_reporters(tmp_path):
    trainer = Trainer(model=tiny_llama(), args=training_args(tmp_path, report_to=["tensorboard"]),
                      train_dataset=dataset(8))
    callback = asi_hf.attach(trainer)
    kinds = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert kinds.index("ASICallback") < kinds.index("TensorBoardCallback"), kinds


# ----------------------------------------------------------------------------- ranks from the user's batches
def test_choose_ranks_is_the_budget_optimum_of_the_measured_table():
    model = tiny_llama()
    batches = [default_data_collator(dataset(8, seed=s)) for s in (1, 2)]
    eps = (0.5, 0.7, 0.9)
    table = asi_core.choose_ranks(model, batches, "min", num_finetune=3, layer_type="linear", include="mlp",
                                  epsilons=eps)["table"]
    names = list(table["layers"])
    mem = [table["layers"][n]["memory_mib"] for n in names]
    per = [table["layers"][n]["perplexity"] for n in names]
    budget = (sum(min(m) for m in mem) + sum(max(m) for m in mem)) / 2
    choice = asi_core.choose_ranks(model, batches, budget, num_finetune=3, layer_type="linear", include="mlp",
                                   epsilons=eps)
    best = min((sum(per[i][j] for i, j in enumerate(js)), sum(mem[i][j] for i, j in enumerate(js)), js)
               for js in itertools.product(range(len(eps)), repeat=len(names))
               if sum(mem[i][j] for i, j in enumerate(js)) <= budget)
    assert choice["layers"] == names
    assert choice["ranks"] == [tuple(table["layers"][n]["ranks"][j]) for n, j in zip(names, best[2])]
    assert choice["memory_mib"] <= budget and math.isclose(choice["memory_mib"], best[1])
    # and the ranks are usable as they are
    asi_core.patch(model, "asi", layers=choice["layers"], ranks=choice["ranks"], layer_type="linear")
    model(**batches[0]).loss.backward()


def test_choose_ranks_holds_no_weight_gradient_between_batches():
    model = tiny_llama()
    names = asi_core.choose_layers(model, 3, layer_type="linear", include="mlp")
    seen = []

    def loss_fn(m, batch):
        seen.append([m.get_submodule(n).weight.grad is None for n in names])
        return m(**batch).loss

    batches = [default_data_collator(dataset(8, seed=s)) for s in (1, 2, 3)]
    asi_core.choose_ranks(model, batches, "min", loss_fn=loss_fn, layers=names, layer_type="linear")
    assert seen == [[True] * 3] * 3  # each measured weight's gradient was dropped as soon as it was made


def test_choose_ranks_refuses_batches_it_cannot_score():
    with pytest.raises(ValueError, match="labels"):
        asi_core.choose_ranks(tiny_llama(), [{"input_ids": torch.ones(2, 4, dtype=torch.long)}], "min",
                              num_finetune=1, layer_type="linear")


# ----------------------------------------------------------------------------- LoRA + ASI in one call
def lora_model(targets=("gate_proj", "up_proj", "down_proj"), dtype=torch.float32):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(dtype=dtype), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=list(targets)))
    for name, p in model.named_parameters():  # a trained-looking adapter: lora_B away from its zero init
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_(0, 0.1)
    return model


def test_patch_lora_compresses_every_lora_a_and_keeps_what_trains(tmp_path):
    model = lora_model()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    names = asi_core.patch_lora(model, "asi", ranks=2)
    assert names == asi_core.lora_layers(model) and len(names) == 6
    assert all(n.endswith(".lora_A.default") for n in names)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=dataset(16),
                      callbacks=[asi_hf.ASICallback()])
    trainer.train()
    assert [h for h in trainer.state.log_history if "loss" in h][-1]["asi/num_layers"] == 6
    asi_core.unpatch(model)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_patch_lora_at_full_rank_gives_plain_lora_gradients():
    model = lora_model(dtype=torch.float64)
    plain = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        asi_core.patch_lora(model, "asi", num_finetune=4, ranks=10 ** 6)
        batch = default_data_collator(dataset(8))
        model(**batch).loss.backward()
    plain(**batch).loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    want = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_lora_chooses_ranks_under_a_budget_on_the_base_layers(dtype):
    model = lora_model(dtype=dtype)  # bfloat16: peft keeps the adapters (and lora_A's input) in float32
    batches = [default_data_collator(dataset(8, seed=s)) for s in (1, 2)]
    names = asi_core.lora_layers(model)
    measured = asi_core.choose_ranks(model, batches, "min", layers=names, layer_type="linear",
                                     measure_on={n: asi_core.lora.lora_base_layer(model, n) for n in names})
    assert all(max(p) > 0 for p in (e["perplexity"] for e in measured["table"]["layers"].values()))
    memory = [e["memory_mib"] for e in measured["table"]["layers"].values()]
    budget = sum(min(m) for m in memory) * 1.5
    asi_core.patch_lora(model, "asi", budget_mib=budget, batches=batches)
    model(**batches[0]).loss.backward()
    kept = sum(layer.last_stats["stored_elements"] * layer.weight.element_size()
               for _, layer in asi_core.patched_layers(model)) / 2 ** 20
    assert all(layer.weight.dtype == torch.float32 for _, layer in asi_core.patched_layers(model))
    assert budget * 0.5 < kept <= budget + 1e-12


def test_patch_lora_says_what_is_missing():
    with pytest.raises(ValueError, match=r"get_peft_model"):
        asi_core.patch_lora(tiny_llama(), "asi", ranks=2)
    model = lora_model()
    with pytest.raises(ValueError, match="batches"):
        asi_core.patch_lora(model, "asi", budget_mib=1.0)
    with pytest.raises(ValueError, match="ranks or budget_mib"):
        asi_core.patch_lora(model, "asi", budget_mib=1.0, ranks=2, batches=[])
    with pytest.raises(ValueError, match="no LoRA adapter named 'other'"):
        asi_core.patch_lora(model, "asi", ranks=2, adapter="other")
    asi_core.patch_lora(model, "asi", ranks=2)
    with pytest.raises(ValueError, match="already patched"):  # refused before any measurement
        asi_core.patch_lora(model, "asi", budget_mib=1.0, batches=iter(()))
    from peft import LoraConfig, inject_adapter_in_model
    convs = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3))
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "1"]), convs)
    with pytest.raises(ValueError, match=r"not on linear layers \(0.lora_A.default \(Conv2d\)"):
        asi_core.lora_layers(convs)
