"""torch.compile of a patched model (issue 22; issue 24 part 3): compiled before any eager step, it trains with the
gradients of the eager model. The methods' training step runs eagerly inside the compiled model (a graph break
around each patched layer: asi_core.layers.CompressedLayer._train_forward)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import asi_core


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_patched_model_compiled_before_its_first_step_trains_as_the_eager_one(kind):
    torch.manual_seed(0)
    if kind == "linear":
        net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8))
        x = torch.randn(4, 5, 16)
    else:
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(8, 4, 3, padding=1))
        x = torch.randn(4, 3, 8, 8)
    asi_core.patch(net, "asi", num_finetune=2, layer_type=kind, ranks=2)
    net.train()
    eager = copy.deepcopy(net)
    compiled = torch.compile(net)
    for step in range(2):  # the first step sets the warm-start buffers' shapes; the second uses them
        for model in (compiled, eager):
            model.zero_grad()
            model(x).square().sum().backward()
        for (name, a), b in zip(net.named_parameters(), eager.parameters()):
            if a.grad is not None:
                assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5), (step, name)
    for a, b in zip(net.buffers(), eager.buffers()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_benchmark_times_each_method_compiled_beside_eager():
    from classification.benchmark import benchmark_models

    args = {"backbone": "mcunet", "num_finetune": 2, "num_classes": 10, "pretrained": False, "ranks": 2}
    out = benchmark_models(args, ["asi"], 4, 32, steps=1, warmup=1, progress=False, compile=True)
    assert set(out["methods"]) == {"asi", "asi+compile"} and out["config"]["compile"] is True
    assert all(v["step_s"] > 0 for v in out["methods"].values())
    with pytest.raises(ValueError, match="--benchmark.warmup >= 1"):
        benchmark_models(args, ["asi"], 4, 32, steps=1, warmup=0, progress=False, compile=True)
