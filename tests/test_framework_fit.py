"""End-to-end fits on digits: every method trains only what it should, writes a complete run
directory, and a resumed run continues from the same step with the same warm-start buffers."""
from __future__ import annotations

import json

import pytest
import torch

import asi_core
from classification.cli import ASICLI


class Probe(ASICLI):
    """Snapshots the model right after instantiation and watches the first training batch."""

    def after_instantiate_classes(self):
        super().after_instantiate_classes()
        self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.seen = {}
        probe = self

        class _Watch(__import__("pytorch_lightning").Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if "step" in probe.seen:
                    return
                bns = [m for m in pl_module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
                probe.seen.update(step=trainer.global_step, training=pl_module.training,
                                  bn_training=any(m.training for m in bns),
                                  buffers={k: v.detach().clone() for k, v in pl_module.state_dict().items()
                                           if ".method." in k})

        self.trainer.callbacks.append(_Watch())


@pytest.mark.parametrize("method", ["vanilla", "gradfilter", "hosvd", "asi"])
def test_one_epoch_fit_per_method(method, run_cli, tmp_path):
    cli = run_cli("fit", "--config", f"configs/methods/{method}.yaml", "--exp_name", "t", cli_class=Probe)
    run = tmp_path / "runs" / "setupA" / "mcunet" / "digits" / method / "t"
    assert cli.run_dir == run
    # the run directory is complete
    for rel in ["config.yaml", "metrics.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt",
                "csv/version_0/metrics.csv"]:
        assert (run / rel).is_file(), rel
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["val_acc"] <= 1.0 and metrics["global_step"] == 3
    assert metrics["settings"]["method"] == method and metrics["settings"]["dataset"] == "digits"
    assert metrics["patched_layers"] == [n for n, _ in asi_core.patched_layers(cli.model.net)]
    assert len(metrics["patched_layers"]) == 2
    assert "method: " + method in (run / "config.yaml").read_text()
    # BatchNorm stayed in eval mode while the model trained (set_bn_eval, the paper's behaviour)
    assert cli.seen["training"] and not cli.seen["bn_training"]
    # only the fine-tuned convs and the head moved; everything else, BN statistics included, did not
    final = cli.model.state_dict()
    tuned = {f"net.{n}.weight" for n in metrics["patched_layers"]} | {"net.classifier.linear.weight",
                                                                       "net.classifier.linear.bias"}
    for k, before in cli.initial.items():
        if ".method." in k:  # compression buffers (warm start) are state, not weights
            continue
        moved = not torch.equal(before, final[k])
        assert moved == (k in tuned), k
    # val_acc is top-1 accuracy over the validated samples (2 batches of 32)
    model = cli.model.eval()
    with torch.no_grad():
        batches = [b for _, b in zip(range(2), cli.datamodule.val_dataloader())]
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in batches)
    assert metrics["val_acc"] == pytest.approx(correct / sum(len(y) for _, y in batches), abs=1e-6)


def test_resume_continues_with_same_step_and_warm_start_buffers(run_cli, tmp_path):
    common = ("--config", "configs/methods/asi.yaml", "--exp_name", "resume")
    run_cli("fit", *common)
    last = tmp_path / "runs" / "setupA" / "mcunet" / "digits" / "asi" / "resume" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    saved = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if ".method." in k}
    assert any(v.numel() > 1 for v in saved.values()), "ASI keeps its warm-start factors as buffers"

    cli = run_cli("fit", *common, "--trainer.max_epochs", "2", "--ckpt_path", str(last), cli_class=Probe)
    assert cli.seen["step"] == ckpt["global_step"] == 3
    restored = {k[len("net."):]: v for k, v in cli.seen["buffers"].items()}
    assert restored.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(restored[k], v), k
    metrics = json.loads((last.parent.parent / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and metrics["epochs_completed"] == 2

    # test from the best checkpoint: the keys merge into the same metrics.json
    run_cli("test", *common, "--ckpt_path", str(last.parent / "best.ckpt"))
    after = json.loads((last.parent.parent / "metrics.json").read_text())
    assert 0.0 <= after["test_acc"] <= 1.0 and after["global_step"] == 6
    assert (last.parent.parent / "config_test.yaml").is_file()


def test_setup_b_pretrain_exports_and_finetune_starts_from_it(run_cli, tmp_path, ckpts):
    pre = run_cli("fit", "--config", "configs/recipes/setupB_pretrain.yaml")
    pre_dir = pre.run_dir  # pretrain_<settings hash>
    export = ckpts / "setupB" / "mcunet_digits.ckpt"
    assert pre_dir.parent == tmp_path / "runs" / "setupB" / "mcunet" / "digits" / "vanilla" and export.is_file()
    assert pre_dir.name.startswith("pretrain_")
    assert json.loads((pre_dir / "metrics.json").read_text())["exported_ckpt"] == str(export)
    assert json.loads((pre_dir / "metrics.json").read_text())["exported_ckpt_sha256"] == \
        __import__("hashlib").sha256(export.read_bytes()).hexdigest()  # which file this run exported, by content
    # pretraining trains everything, BatchNorm included (its statistics left their init of 0)
    assert len(pre.model.patched) == 42 and pre.model.net.first_conv.bn.running_mean.abs().sum() > 0
    exported = torch.load(export, map_location="cpu", weights_only=True)["state_dict"]

    # Fine-tuning on half 2: the checkpoint is found by default; the partition is reloaded from file.
    ft = run_cli("fit", "--config", "configs/recipes/setupB_finetune.yaml", "--config", "configs/methods/asi.yaml",
                 "--data.partition_file", str(pre_dir / "partition.json"), cli_class=Probe)
    assert ft.model.hparams.checkpoint == str(export)
    first_conv = ft.initial["net.first_conv.conv.weight"]
    assert torch.equal(first_conv, exported["first_conv.conv.weight"])
    a = json.loads((pre_dir / "partition.json").read_text())
    b = json.loads((ft.run_dir / "partition.json").read_text())
    assert a["halves"] == b["halves"] and a["class_counts"] == b["class_counts"]
    # half 2 is what fine-tuning trains and validates on
    seen = set(ft.datamodule.train_set.indices) | set(ft.datamodule.val_set.indices)
    assert seen == set(a["halves"][1])
