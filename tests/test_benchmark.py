"""`main.py benchmark` smoke test at tiny shapes (a schema check, not a timed test) and the
per-layer weight-gradient timing helpers."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import asi_core
from classification.benchmark import _weight_grad_closure, run_benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_command_prints_schema(tmp_path):
    cmd = [sys.executable, "main.py", "benchmark", "--config", "configs/models/mcunet.yaml",
           "--model.num_finetune", "2", "--data.batch_size", "4", "--data.resolution", "32",
           "--benchmark.methods", "vanilla,gradfilter,hosvd,asi", "--benchmark.steps", "1",
           "--benchmark.warmup", "0", "--benchmark.per_layer", "true", "--run_root", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["config"]["batch_size"] == 4 and out["config"]["resolution"] == 32
    assert out["config"]["options"]["ranks"] == 2  # the benchmark's default: rank 2 on every mode
    assert set(out["methods"]) == {"vanilla", "gradfilter", "hosvd", "asi"}
    for times in out["methods"].values():
        assert {"forward_s", "backward_s", "optimizer_s", "step_s"} <= set(times)
        assert all(v > 0 for v in times.values())
    assert out["ratios_to_vanilla"]["vanilla"] == {"forward": 1.0, "backward": 1.0, "step": 1.0}
    ratio = out["ratios_to_vanilla"]["asi"]["step"]
    assert ratio == pytest.approx(out["methods"]["asi"]["step_s"] / out["methods"]["vanilla"]["step_s"])
    assert len(out["per_layer"]) == 2
    for layer in out["per_layer"].values():
        assert set(layer) == {"vanilla", "gradfilter", "hosvd", "asi"}
    assert not list(tmp_path.iterdir())  # a benchmark writes no run directory


def test_benchmark_rejects_unknown_method():
    cmd = [sys.executable, "main.py", "benchmark", "--config", "configs/models/mcunet.yaml",
           "--data.batch_size", "2", "--data.resolution", "32", "--benchmark.methods", "vanilla,dora"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "unknown method(s) ['dora']" in proc.stderr and "lora" in proc.stderr  # lora is a method (LLMs)


def test_per_layer_closures_compute_the_methods_weight_gradients():
    """What per_layer times is the real weight gradient of each method (not some other work)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    x = torch.randn(5, 4, 8, 8, dtype=torch.float64)
    g = torch.randn(5, 6, 8, 8, dtype=torch.float64)
    for method, opts in [("vanilla", {}), ("asi", dict(ranks=100)), ("hosvd", dict(eps=1.0)),
                         ("gradfilter", dict(radius=1)), ("gradfilter_paper", dict(radius=2))]:
        net = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1).double())
        net.load_state_dict(nn.Sequential(conv).state_dict())
        asi_core.patch(net, method, num_finetune=1, **opts)
        xi = x.clone().requires_grad_()
        net(xi).backward(g)
        got = _weight_grad_closure(net[0], x, g)()
        if method in ("gradfilter", "gradfilter_paper"):  # the filtered gradient the layer itself computed
            torch.testing.assert_close(got, net[0].weight.grad)
        else:
            expect = torch.nn.grad.conv2d_weight(x, conv.weight.shape, g, padding=1)
            torch.testing.assert_close(got, expect)
            torch.testing.assert_close(net[0].weight.grad, expect)


def test_run_benchmark_interleaves_and_reports_medians():
    calls = []

    def build(method):
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(4, 10))
        asi_core.patch(net, method, num_finetune=1, **({"ranks": 1} if method == "asi" else {}))
        orig = net.forward
        net.forward = lambda x, m=method: (calls.append(m), orig(x))[1]
        return net.train()

    out = run_benchmark(build, ["vanilla", "asi"], batch_size=2, resolution=8, steps=3, warmup=1)
    assert calls == ["vanilla", "asi"] * 4  # interleaved A B A B ..., warm-up included
    assert out["speedup_vs_vanilla"]["asi"] == pytest.approx(
        out["methods"]["vanilla"]["step_s"] / out["methods"]["asi"]["step_s"])
