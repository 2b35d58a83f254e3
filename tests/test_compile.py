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
