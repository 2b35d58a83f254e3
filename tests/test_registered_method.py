"""A method registered from outside the packages with ``@asi_core.register_method`` runs through ``fit``,
``profile``, ``benchmark`` and ``report`` with no line of framework code naming it: everything asks the registry.

The method here keeps its input in bfloat16 (a real, if simple, compression: half the bytes) and forms the exact
weight gradient from that copy; its gradient is checked against autograd's within bfloat16's rounding."""
from __future__ import annotations

import math

import pytest
import torch

import asi_core
from asi_core.methods import METHODS, Method, register_method


class _Bf16Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, ops):
        ctx.ops, ctx.x_shape = ops, x.shape
        ctx.save_for_backward(weight, x.to(torch.bfloat16))
        return ops.forward(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        weight, x16 = ctx.saved_tensors
        ops, g = ctx.ops, g.contiguous()
        gx = ops.input_grad(g, weight, ctx.x_shape) if ctx.needs_input_grad[0] else None
        gw = ops.weight_grad_exact(x16.to(g.dtype), g, weight.shape) if ctx.needs_input_grad[1] else None
        gb = ops.bias_grad(g) if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


class Bf16Input(Method):
    """Keeps its input in bfloat16; exact backward otherwise."""

    name = "bf16_input"
    label = "bf16 input"
    report_order = 40

    @classmethod
    def run_name(cls, options):
        return "_bf16"

    def train_forward(self, layer, x):
        x = layer.ops.prepare(x)
        y = _Bf16Fn.apply(x, layer.weight, layer.bias, layer.ops)
        self._record(layer, x, y, None, x.numel())
        return y


@pytest.fixture
def bf16_method():
    register_method(Bf16Input)
    yield Bf16Input
    METHODS.pop(Bf16Input.name)


def test_register_method_refuses_a_taken_name_and_a_non_method(bf16_method):
    class Other(Bf16Input):
        pass

    with pytest.raises(ValueError, match="'bf16_input' is already registered"):
        register_method(Other)
    with pytest.raises(TypeError, match="subclass of asi_core.methods.Method"):
        register_method(int)
    assert "bf16_input" in asi_core.METHODS  # the public view is live, not frozen at import
    assert asi_core.METHODS[-1] == "bf16_input"


def test_registered_method_gradient_is_autograd_s_within_bfloat16(bf16_method):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3))
    ref = torch.nn.Sequential(*[m for m in __import__("copy").deepcopy(net)])
    x = torch.randn(2, 3, 8, 8)
    asi_core.patch(net, "bf16_input", num_finetune=1)
    net(x).square().sum().backward()
    ref(x).square().sum().backward()
    gw, gref = net[2].weight.grad, ref[2].weight.grad
    assert not torch.equal(gw, gref)  # the bfloat16 copy is really used
    assert torch.allclose(gw, gref, rtol=2e-2, atol=2e-2 * gref.abs().max().item())


def test_fit_profile_benchmark_report_run_a_method_registered_outside(bf16_method, run_cli, tmp_path, capsys):
    from classification.report import collect

    cli = run_cli("fit", "--model.method", "bf16_input", "--model.num_finetune", "2")
    assert cli.run_dir.parent.name == "bf16_input" and cli.run_dir.name.startswith("l2_bf16_")
    assert [layer.method_name for _, layer in asi_core.patched_layers(cli.model.net)] == ["bf16_input"] * 2
    with pytest.raises(SystemExit):  # the options of the other methods: it takes none of them (a warning), and
        run_cli("fit", "--model.method", "bf16_input", "--model.lr", "-1")  # the shared ones are still checked
    assert "--model.lr -1" in capsys.readouterr().err

    prof = run_cli("profile", "--model.method", "bf16_input", "--model.num_finetune", "2", "--data.batch_size", "2",
                   tiny=False).profile_result
    assert prof["method"] == "bf16_input" and len(prof["layers"]) == 2
    assert math.isclose(prof["activation_mib"], sum(layer["memory_mib"] for layer in prof["layers"]))

    bench = run_cli("benchmark", "--model.num_finetune", "2", "--data.batch_size", "2", "--data.resolution", "32",
                    "--benchmark.methods", "vanilla,bf16_input", "--benchmark.steps", "1", "--benchmark.warmup", "0",
                    "--benchmark.per_layer", "true", tiny=False).benchmark_result
    assert set(bench["methods"]) == {"vanilla", "bf16_input"} and bench["methods"]["bf16_input"]["step_s"] > 0

    rows = collect(tmp_path / "runs", warn=lambda msg: None)
    row = next(r for r in rows if r["method"] == "bf16_input")
    assert row["label"] == "bf16 input" and row["num_finetune"] == 2 and row["activation_mib"] > 0
