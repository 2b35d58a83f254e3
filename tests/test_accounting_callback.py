"""Resource accounting in use (classification/resources.py, callbacks.ResourceAccounting, ``main.py profile``):
measured activation memory equals the analytic count where nothing else keeps memory, measuring changes
no gradient, the profile command's JSON, and the resources a fit writes to metrics.json."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import asi_core
from classification.resources import ActivationMeter, profile_step
from conftest import REPO

MIB = 2 ** 20


def conv_stack() -> nn.Sequential:
    """Conv -> Conv (stride 2) -> Conv (depthwise), nothing in between."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, padding=1),
                         nn.Conv2d(6, 6, 3, padding=1, groups=6))


def test_measured_equals_analytic_for_vanilla_on_a_conv_stack():
    net = conv_stack()
    asi_core.patch(net, "vanilla", num_finetune=2)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)  # the frozen first conv now saves x: must not count
    res = profile_step(net, x, loss_fn=lambda out, y: out.sum())
    inputs = [2 * 4 * 8 * 8, 2 * 6 * 4 * 4]  # what the two fine-tuned convs keep, float32
    assert res["activation_mib"] * MIB == 4 * sum(inputs)
    assert res["measured_activation_mib"] * MIB == 4 * sum(inputs)
    assert [r["measured_mib"] * MIB for r in res["layers"]] == [4 * n for n in inputs]
    assert res["measured_mask_mib"] == 0
    assert [r["input_grad_flops"] > 0 for r in res["layers"]] == [True, True]  # x needs a gradient here
    assert res["train_gflops"] == pytest.approx(res["forward_gflops"] + res["backward_gflops"])


@pytest.mark.parametrize("method,opts", [("gradfilter", {"radius": 2}), ("hosvd", {"eps": 0.8}),
                                         ("asi", {"ranks": (1, 2, 2, 2)})])
def test_measured_equals_analytic_per_layer_for_every_method(method, opts):
    net = conv_stack()
    asi_core.patch(net, method, num_finetune=2, **opts)
    res = profile_step(net, torch.randn(2, 3, 8, 8), loss_fn=lambda out, y: out.sum())
    for rep in res["layers"]:
        assert rep["measured_mib"] == rep["memory_mib"] > 0, rep["name"]
    # the first fine-tuned conv's input (frozen conv output) needs no gradient, the second's does
    assert [r["input_grad_flops"] > 0 for r in res["layers"]] == [False, True]
    assert res["measured_activation_mib"] == pytest.approx(res["activation_mib"])


def test_measuring_changes_no_gradient():
    net = conv_stack()
    asi_core.patch(net, "asi", num_finetune=2, ranks=2)
    twin = copy.deepcopy(net)
    x = torch.randn(2, 3, 8, 8)
    with ActivationMeter(net) as meter:
        loss = net(x).square().sum()
    loss.backward()
    twin(x).square().sum().backward()
    assert meter.bytes > 0
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name


def test_meter_needs_a_patched_model():
    with pytest.raises(ValueError, match="asi_core.patch"):
        ActivationMeter(conv_stack())


PROFILE = ["profile", "--config", "configs/models/mcunet.yaml", "--model.num_finetune", "2",
           "--data.batch_size", "2", "--data.resolution", "32", "--trainer.logger", "false"]
LAYER_KEYS = {"name": str, "input_shape": list, "memory_mib": float, "forward_flops": int, "backward_flops": int}
TOP_KEYS = {"model": str, "method": str, "num_finetune": int, "batch_size": int, "resolution": int, "layers": list,
            "activation_mib": float, "measured_activation_mib": float, "forward_gflops": float,
            "backward_gflops": float, "overhead_gflops": float, "input_grad_gflops": float}


def test_profile_prints_one_json_object_last(tmp_path, run_cli, capsys):
    proc = subprocess.run([sys.executable, "main.py", *PROFILE, "--model.method", "asi",
                           "--run_root", str(tmp_path / "runs")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ASI_CKPT_DIR": str(tmp_path / "no_ckpts")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    asi = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, kind in TOP_KEYS.items():
        assert isinstance(asi[key], kind), key
    assert (asi["model"], asi["method"], asi["num_finetune"], asi["batch_size"], asi["resolution"]) == \
        ("mcunet", "asi", 2, 2, 32)
    assert len(asi["layers"]) == 2
    for layer in asi["layers"]:
        for key, kind in LAYER_KEYS.items():
            assert isinstance(layer[key], kind), key
        assert layer["ranks"][0] == 1  # profile's default asi rank (clipped per mode)
    assert asi["lean"] is True and asi["measured_mask_mib"] > 0
    assert not (tmp_path / "runs").exists()  # nothing written

    # in-process from here on (cheaper): vanilla keeps more; a given --model.ranks wins; pretrained is forced off
    vanilla = run_cli(*PROFILE, "--model.method", "vanilla", tiny=False).profile_result
    assert capsys.readouterr().out.strip().splitlines()[-1] == json.dumps(vanilla)
    assert asi["activation_mib"] < vanilla["activation_mib"]
    assert asi["measured_activation_mib"] < vanilla["measured_activation_mib"]
    assert vanilla["lean"] is False and vanilla["measured_mask_mib"] == 0
    assert vanilla["forward_gflops"] == asi["forward_gflops"] and vanilla["overhead_gflops"] == 0
    r2 = run_cli(*PROFILE, "--model.method", "asi", "--model.ranks", "2", "--model.lean", "false",
                 "--model.pretrained", "true", tiny=False).profile_result
    assert [layer["ranks"][0] for layer in r2["layers"]] == [2, 2] and r2["measured_mask_mib"] == 0


RESOURCE_KEYS = {"activation_mib", "activation_mib_peak", "measured_activation_mib", "forward_gflops",
                 "backward_gflops", "overhead_gflops", "core_gflops", "input_grad_gflops", "train_gflops",
                 "paper_gflops", "timing", "layers"}


def test_fit_writes_resources_to_metrics_json(run_cli):
    import csv

    cli = run_cli("fit", "--model.method", "hosvd")
    res = json.loads((cli.run_dir / "metrics.json").read_text())["resources"]
    assert RESOURCE_KEYS <= set(res)
    assert res["activation_mib_peak"] >= res["activation_mib"] > 0
    assert res["train_gflops_peak"] >= res["train_gflops"] > 0  # hosvd: ranks, hence costs, vary per batch
    assert res["measured_activation_mib"] > 0 and res["batch_size"] == 32 and res["batches"] == 3
    assert set(res["timing"]) >= {"forward_s", "backward_s", "optimizer_s"}
    assert all(res["timing"][k] > 0 for k in ("forward_s", "backward_s", "optimizer_s"))
    assert res["train_gflops"] == pytest.approx(res["forward_gflops"] + res["backward_gflops"]
                                                + res["overhead_gflops"] + res["core_gflops"])
    assert [layer["name"] for layer in res["layers"]] == list(cli.model.patched)
    for layer in res["layers"]:
        assert layer["memory_mib_peak"] >= layer["memory_mib_mean"] > 0 and layer["measured_mib"] > 0
    with open(next((cli.run_dir / "csv").rglob("metrics.csv"))) as f:
        assert "resources/activation_mib" in next(csv.reader(f))
