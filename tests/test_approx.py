"""asi_core.approx (issue 21): the approximate, opt-in compression of what exact ASI cannot drop.

Exact where it must be (codes, grid values, the extremes of a group, ReLU's table through the same code path, ASI's
own Tucker form, parameters), within the quantisation step elsewhere, optimal as derived (the derivative tables
against a numerical re-derivation), measured by the meters that nest with it, composed with recompute,
checkpointing and LoRA, and off by default in the framework without renaming any run."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import asi_core
from asi_core import approx
from asi_core.lean import SavedTensorMeter


def _top_hooks():
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


# ------------------------------------------------------------------ codes and quantisation
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_codes_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (8 * 37,), dtype=torch.uint8)
    packed = approx.pack_codes(codes, bits)
    assert packed.numel() == codes.numel() * bits // 8
    assert torch.equal(approx.unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantize_is_exact_on_the_grid_and_within_half_a_step_elsewhere(bits):
    levels = 2 ** bits - 1
    lo = torch.randn(10, 1)
    step = torch.rand(10, 1) + 0.1
    grid = lo + torch.randint(0, levels + 1, (10, 64)).float() * step
    grid[:, 0], grid[:, 1] = lo[:, 0], (lo + levels * step)[:, 0]  # each group spans its whole range
    q = approx.quantize(grid, bits, 64)
    assert torch.allclose(approx.dequantize(q), grid, rtol=0, atol=1e-5)

    x = torch.randn(33, 77) * 5
    q = approx.quantize(x, bits, 32)
    y = approx.dequantize(q)
    assert y.shape == x.shape and y.dtype == x.dtype
    step = (q.hi - q.lo) / levels  # per group of 32
    err = torch.nn.functional.pad((y - x).reshape(-1), (0, (-x.numel()) % 32)).view(-1, 32).abs()
    assert (err <= step / 2 + 1e-5).all()
    assert q.codes.numel() == (x.numel() + (-x.numel()) % 32) * bits // 8


def test_quantize_keeps_extremes_and_constant_groups_exact_and_the_dtype():
    mask = torch.tensor([0.0, torch.finfo(torch.float32).min] * 300)  # an additive attention mask
    assert torch.equal(approx.dequantize(approx.quantize(mask, 8, 256)), mask)
    const = torch.full((3, 100), 2.5)
    assert torch.equal(approx.dequantize(approx.quantize(const, 2, 64)), const)
    half = torch.randn(50, 8, dtype=torch.bfloat16)
    assert approx.dequantize(approx.quantize(half, 8, 16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="bits must be one of"):
        approx.quantize(half, 3)
    with pytest.raises(ValueError, match="group must be a positive multiple of 4"):
        approx.quantize(half, 2, 6)
    with pytest.raises(ValueError, match="bits must be one of"):
        approx.SavedCompressor(bits=16)


# ------------------------------------------------------------------ derivative tables
def _objective(table, f, df):
    from scipy import integrate
    edges = [-np.inf, *table.thresholds, np.inf]
    return sum(integrate.quad(lambda z: (df(z) - c) ** 2, a, b, limit=200)[0]
               for a, b, c in zip(edges[:-1], edges[1:], table.levels))


def _functions():
    from scipy import special
    gelu = lambda z: z * 0.5 * (1 + special.erf(z / np.sqrt(2)))  # noqa: E731
    dgelu = lambda z: 0.5 * (1 + special.erf(z / np.sqrt(2))) + z * np.exp(-z * z / 2) / np.sqrt(2 * np.pi)  # noqa
    k = np.sqrt(2 / np.pi)
    gelu_t = lambda z: 0.5 * z * (1 + np.tanh(k * (z + 0.044715 * z ** 3)))  # noqa: E731
    dgelu_t = lambda z: (0.5 * (1 + np.tanh(k * (z + 0.044715 * z ** 3))) + 0.5 * z  # noqa: E731
                         * (1 - np.tanh(k * (z + 0.044715 * z ** 3)) ** 2) * k * (1 + 3 * 0.044715 * z * z))
    silu = lambda z: z * special.expit(z)  # noqa: E731
    dsilu = lambda z: special.expit(z) * (1 + z * (1 - special.expit(z)))  # noqa: E731
    return [(approx.GELU_2BIT, gelu, dgelu, torch.nn.functional.gelu),
            (approx.GELU_TANH_2BIT, gelu_t, dgelu_t, lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
            (approx.SILU_2BIT, silu, dsilu, torch.nn.functional.silu)]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_the_derivative_tables_are_the_derived_optimum(index):
    table, f, df, _ = _functions()[index]
    t = table.thresholds
    inner = [(f(b) - f(a)) / (b - a) for a, b in zip(t[:-1], t[1:])]  # the mean of f' over each inner interval
    assert np.allclose(table.levels[1:-1], inner, atol=1e-6) and table.levels[0] == 0 and table.levels[-1] == 1
    best = _objective(table, f, df)
    for i in range(3):  # no move of one threshold (levels re-derived) does better: a local optimum
        for d in (-0.02, 0.02):
            moved = list(t)
            moved[i] += d
            lv = [0.0] + [(f(b) - f(a)) / (b - a) for a, b in zip(moved[:-1], moved[1:])] + [1.0]
            other = approx.DerivativeTable("moved", tuple(moved), tuple(lv))
            assert _objective(other, f, df) > best
    assert table.bits == 2


@pytest.mark.parametrize("index", [0, 1, 2])
def test_activation_forward_is_exact_and_its_gradient_is_the_tables(index):
    table, _, _, fn = _functions()[index]
    x = torch.randn(6, 50, requires_grad=True)
    g = torch.randn(6, 50)
    y = approx.step_derivative(x, fn, table)
    assert torch.equal(y, fn(x.detach()))
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(gx, g * table.derivative(x.detach()))
    exact = torch.autograd.grad(fn(x), x, g)[0]
    assert (gx - exact).norm() < 0.35 * exact.norm()  # an approximation, not noise


def test_relus_table_through_the_same_code_path_is_relus_gradient_bit_for_bit():
    x = torch.randn(1000)
    x[::7] = 0.0  # the boundary: ReLU's gradient is zero at 0
    x.requires_grad_(True)
    g = torch.randn(1000)
    (approx_grad,) = torch.autograd.grad(approx.step_derivative(x, torch.relu, approx.RELU_1BIT), x, g)
    (exact,) = torch.autograd.grad(torch.relu(x), x, g)
    assert torch.equal(approx_grad, exact)


def test_approximate_activations_converts_in_place_keeps_1_bit_in_8_and_is_undone():
    net = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 4))
    keys = list(net.state_dict())
    x = torch.randn(32, 16)
    plain = net(x)
    assert approx.approximate_activations(net) == ["1", "3"]
    assert isinstance(net[1], nn.GELU) and type(net[1]).__name__ == "ApproxGELU"
    assert list(net.state_dict()) == keys and torch.equal(net(x), plain)
    with SavedTensorMeter(exclude=[net]) as meter:
        net[1](torch.randn(8, 64, requires_grad=True))
    assert meter.bytes == 8 * 64 // 4  # 2 bits per element
    with torch.no_grad():
        assert torch.equal(net(x), plain)
    assert approx.restore_activations(net) == ["1", "3"] and type(net[1]) is nn.GELU


def test_register_activation_adds_a_library_class():
    class MySiLU(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    with pytest.raises(TypeError, match="not an nn.Module subclass"):
        approx.register_activation(int, lambda m: approx.SILU_2BIT)
    approx.register_activation(MySiLU, lambda m: approx.SILU_2BIT)
    net = nn.Sequential(nn.Linear(4, 8), MySiLU())
    assert approx.approximate_activations(net) == ["1"]
    x = torch.randn(3, 8, requires_grad=True)
    (g,) = torch.autograd.grad(net[1](x).sum(), x)
    assert torch.equal(g, approx.SILU_2BIT.derivative(x.detach()))


# ------------------------------------------------------------------ saved tensors in k bits
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.LayerNorm(256), nn.Linear(256, 256), nn.Tanh(),
                         nn.Linear(256, 10))


def _grads(net, x):
    net.zero_grad()
    net(x).square().sum().backward()
    return [p.grad.clone() for p in net.parameters() if p.requires_grad]


@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.25)])
def test_compressed_saves_keep_the_gradient_close_and_the_memory_small(bits, tol):
    net, x = _mlp(), torch.randn(128, 64)
    exact = _grads(net, x)
    with SavedTensorMeter(exclude=[net]) as meter:
        net(x)
    plain_bytes = meter.bytes
    approx.compress_saved(net, bits)
    with SavedTensorMeter(exclude=[net]) as meter:  # an outer meter sees the codes the compressor hands it
        net(x)
    assert approx.saved_compressor(net).compressed >= 4
    assert meter.bytes < plain_bytes * (bits / 32 + 0.05)
    for a, b in zip(exact, _grads(net, x)):
        assert (a - b).norm() <= tol * a.norm()
    assert approx.uncompress_saved(net) and not approx.uncompress_saved(net)
    assert all(torch.equal(a, b) for a, b in zip(exact, _grads(net, x)))


def test_parameters_integer_tensors_and_small_tensors_stay_exact_and_a_tensor_saved_twice_is_compressed_once():
    lin = nn.Linear(2048, 2048, bias=False).requires_grad_(False)  # frozen: autograd saves the weight only
    x = torch.randn(4, 2048, requires_grad=True)
    with approx.SavedCompressor(8, model=lin) as c:
        y = lin(x)
    assert c.compressed == 0  # the weight is the parameter itself
    assert y.grad_fn is not None
    with approx.SavedCompressor(8, min_numel=10) as c:
        a = torch.randn(100, requires_grad=True)
        b = a * 2
        (b * b).sum()  # b saved twice by one op
        torch.randint(0, 5, (100,)) + a  # nothing saved; integer tensors are never compressed
    assert c.compressed == 1
    with approx.SavedCompressor(8, min_numel=10) as c:
        z = torch.randn(100, requires_grad=True) * float("inf")
        (z * z)  # inf: no finite step represents it, kept as it is
    assert c.compressed == 0 and c.kept >= 1


@pytest.mark.parametrize("n", [1, 2])
def test_asi_keeps_its_tucker_form_exact_under_the_compressor(n):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    asi_core.patch(net, "asi", num_finetune=n, layer_type="linear", ranks=2)
    x = torch.randn(4, 8, 32)
    for layer in (m for _, m in asi_core.patched_layers(net)):
        layer.train()
    torch.manual_seed(2)  # (ASI's first subspace iteration starts from random factors)
    exact = _grads(copy.deepcopy(net), x)
    approx.compress_saved(net, 2, min_numel=1)
    torch.manual_seed(2)
    got = _grads(net, x)  # the region holds ASI's factors and ReLU's bit masks only: nothing to approximate
    assert len(got) == 2 * n and all(torch.equal(a, b) for a, b in zip(exact, got))


def test_the_hooks_are_left_when_the_forward_raises_and_a_deep_copy_exempts_its_own_parameters():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    net = nn.Sequential(nn.Linear(4, 4), Boom())
    approx.compress_saved(net)
    before = _top_hooks()
    with pytest.raises(RuntimeError, match="boom"):
        net(torch.randn(2, 4))
    assert _top_hooks() == before

    frozen = nn.Sequential(nn.Linear(64, 64).requires_grad_(False))
    approx.compress_saved(frozen, min_numel=1)
    twin = copy.deepcopy(frozen)
    twin(torch.randn(8, 64, requires_grad=True))  # saves the twin's own frozen weight: a parameter, kept as it is
    assert approx.saved_compressor(twin).compressed == 0 and approx.saved_compressor(frozen) is None
    assert approx.uncompress_saved(twin) and not twin._forward_pre_hooks and not twin._forward_hooks
    assert len(frozen._forward_pre_hooks) == 1  # the original keeps its own

# ------------------------------------------------------------------ composition
def _region_grads(net, x):
    net.zero_grad()
    net(x).logsumexp(-1).sum().backward()
    return torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.grad is not None])


@pytest.mark.parametrize("mode", ["recompute", "checkpointing"])
def test_composes_with_recompute_and_checkpointing(mode):
    from asi_core import recompute
    from classification import families  # noqa: F401
    from classification.registry import create_model

    torch.manual_seed(0)
    net = create_model("swin_tiny_test", num_classes=10, pretrained=False)
    patched = asi_core.patch(net, "asi", num_finetune=4, layer_type="linear", include="mlp", ranks=64)  # full rank
    net.train()
    for m in net.modules():  # stochastic depth and dropout off: the comparison needs one function
        if type(m).__name__ in ("StochasticDepth", "Dropout"):
            m.eval()
    x = torch.randn(4, 3, 32, 32)
    exact = _region_grads(net, x)
    approx.compress_saved(net, 8, min_numel=10 ** 9)  # nothing large enough: the machinery alone is exact
    assert torch.allclose(_region_grads(net, x), exact, rtol=1e-4, atol=1e-6)
    approx.compress_saved(net, 8)
    saved8 = _region_grads(net, x)
    assert (saved8 - exact).norm() < 0.01 * exact.norm()
    approx.approximate_activations(net)
    alone = _region_grads(net, x)
    assert 0.01 * exact.norm() < (alone - exact).norm() < 0.2 * exact.norm()  # the 2-bit derivatives dominate
    recompute.enable(net, patched, mode)
    both = _region_grads(net, x)
    assert (both - exact).norm() < 0.2 * exact.norm()
    assert _top_hooks() is None


def test_framework_lora_and_asi_with_the_approximations_train_on_llama_tiny():
    from classification.model import ClassificationModel

    torch.manual_seed(0)
    kw = dict(backbone="llama_tiny", method="asi", num_finetune=3, ranks=64, lora=True, pretrained=False,
              num_classes=10, optimizer="adam", lr=1e-3, weight_decay=0.0)
    exact = ClassificationModel(**kw)
    model = ClassificationModel(**kw, approx_activations=True, saved_bits=8)
    model.load_state_dict(exact.state_dict())
    assert model.approximated["approximated_activations"] and model.approximated["saved_bits"] == 8
    ids = torch.randint(3, 100, (4, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    y = torch.randint(0, 10, (4,))
    grads = []
    for m in (exact, model):
        m.train()
        m.zero_grad()
        m.criterion(m(batch), y).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in m.parameters() if p.grad is not None]))
    assert grads[0].numel() == grads[1].numel() > 0
    assert (grads[0] - grads[1]).norm() < 0.3 * grads[0].norm()


def test_profile_measures_less_with_the_options_and_they_keep_default_run_names(run_cli):
    from classification.finetune import check_model_options
    from classification.rundir import run_settings

    for option, bad in (("saved_bits", 3), ("saved_bits", "8"), ("approx_activations", "yes")):
        with pytest.raises(ValueError, match=f"--model.{option}"):
            check_model_options(**{option: bad})
    args = ("profile", "--config", "configs/models/swin_t.yaml", "--model.backbone", "swin_tiny_test",
            "--model.method", "asi", "--model.num_finetune", "4", "--model.ranks", "2", "--data.batch_size", "8",
            "--data.resolution", "32", "--trainer.logger", "false")
    plain = run_cli(*args, tiny=False).profile_result
    act = run_cli(*args, "--model.approx_activations", "true", tiny=False).profile_result
    both = run_cli(*args, "--model.approx_activations", "true", "--model.saved_bits", "8", tiny=False).profile_result
    assert "saved_bits" not in plain and "approx_activations" not in plain
    assert act["approx_activations"] is True and act["approximated_activations"] == 8  # 2 blocks x 4 stages
    assert both["saved_bits"] == 8
    assert both["measured_activation_mib"] < act["measured_activation_mib"] < plain["measured_activation_mib"]
    assert both["activation_mib"] == plain["activation_mib"]  # the paper's count: the method's own storage
    base = {"backbone": "mcunet", "method": "asi"}
    assert run_settings(base, {}, 0) == run_settings({**base, "saved_bits": None, "approx_activations": False}, {}, 0)
    assert run_settings(base, {}, 0) != run_settings({**base, "saved_bits": 8}, {}, 0)
    assert run_settings(base, {}, 0) != run_settings({**base, "approx_activations": True}, {}, 0)


def test_shape_only_llm_profile_runs_with_the_options(run_cli):
    out = run_cli("profile", "--config", "configs/models/llama_tiny.yaml", "--model.method", "asi",
                  "--model.shape_only", "true", "--model.ranks", "4", "--model.approx_activations", "true",
                  "--model.saved_bits", "4", "--data.batch_size", "4", "--data.max_length", "32",
                  "--trainer.logger", "false", tiny=False).profile_result
    assert out["shape_only"] is True and out["saved_bits"] == 4 and out["approximated_activations"] > 0
    assert out["measured_activation_mib"] > 0


def test_report_rows_and_benchmark_variants_name_the_approximations():
    from classification.benchmark import benchmark_models

    out = benchmark_models({"backbone": "swin_tiny_test", "layer_type": "linear", "include": "mlp",
                            "num_finetune": 4, "num_classes": 10, "pretrained": False, "ranks": 2},
                           ["asi", "asi+approx", "asi+approx+recompute"], 4, 32, steps=1, warmup=0, progress=False)
    assert set(out["methods"]) == {"asi", "asi+approx", "asi+approx+recompute"}
    with pytest.raises(ValueError, match=r"\+approx"):
        benchmark_models({"backbone": "mcunet"}, ["asi+approximately"], 4, 32, steps=1, warmup=0, progress=False)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_chunked_work_gives_the_same_codes_values_and_gradients(bits, monkeypatch):
    """quantize, dequantize and the 2-bit derivative work in chunks (bounded temporaries): the chunk size changes
    nothing, tails included."""
    x = torch.randn(1000, 37) * 3
    whole = approx.quantize(x, bits, 32)
    w = torch.randn(999, requires_grad=True)
    g = torch.randn(999)
    (whole_grad,) = torch.autograd.grad(approx.step_derivative(w, torch.nn.functional.gelu, approx.GELU_2BIT), w, g)
    monkeypatch.setattr(approx, "CHUNK", 96)  # 3 groups of 32, 24 bytes of 2-bit codes: many chunks and a tail
    part = approx.quantize(x, bits, 32)
    assert torch.equal(part.codes, whole.codes) and torch.equal(part.lo, whole.lo) and torch.equal(part.hi, whole.hi)
    assert torch.equal(approx.dequantize(part), approx.dequantize(whole))
    (part_grad,) = torch.autograd.grad(approx.step_derivative(w, torch.nn.functional.gelu, approx.GELU_2BIT), w, g)
    assert torch.equal(part_grad, whole_grad)


def test_a_patched_models_plain_state_dict_loads_strictly_into_the_plain_model_and_unpatch_undoes_the_options():
    """Issue 22: a patched model's state_dict has the methods' training state (*.method.factor_*, step) and did not
    load strictly into a plain model, while the docs said the keys were the same."""
    from classification import families  # noqa: F401
    from classification.registry import create_model

    torch.manual_seed(0)
    net = create_model("swin_tiny_test", num_classes=10, pretrained=False)
    plain = copy.deepcopy(net)
    asi_core.patch(net, "asi", num_finetune=4, layer_type="linear", include="mlp", ranks=2)
    net.train()
    net(torch.randn(2, 3, 32, 32)).sum().backward()  # the factors exist now
    assert any(".method.factor_" in k for k in net.state_dict())
    with pytest.raises(RuntimeError, match="Unexpected key"):
        copy.deepcopy(plain).load_state_dict(net.state_dict())
    plain.load_state_dict(asi_core.plain_state_dict(net))  # strict
    net.eval(), plain.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(net(x), plain(x))
    approx.approximate_activations(net)
    approx.compress_saved(net)
    asi_core.unpatch(net)
    assert not any(type(m).__name__.startswith("Approx") for m in net.modules())
    assert approx.saved_compressor(net) is None and not approx.uncompress_saved(net)


# ------------------------------------------------------------------ the review's cases (each failed before its fix)
def test_inside_a_checkpointed_forward_a_tensor_saved_twice_still_backpropagates():
    from torch.utils.checkpoint import checkpoint

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 64)

        def forward(self, x):
            h = self.lin(x)
            return (h * h).sum()

    m = Twice()
    approx.compress_saved(m, 8, min_numel=1)
    x = torch.randn(32, 64, requires_grad=True)
    checkpoint(m, x, use_reentrant=False).backward()
    plain = Twice()
    plain.load_state_dict(m.state_dict())
    x2 = x.detach().clone().requires_grad_(True)
    plain(x2).backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)  # checkpointing keeps nothing: nothing approximated


def test_a_forward_interrupted_by_keyboardinterrupt_leaves_no_compressor_behind():
    class Stop(nn.Module):
        def forward(self, x):
            raise KeyboardInterrupt

    net = nn.Sequential(nn.Linear(64, 64), Stop())
    approx.compress_saved(net, 2, min_numel=1)
    with pytest.raises(KeyboardInterrupt):
        net(torch.randn(4, 64, requires_grad=True))
    net[1] = nn.Identity()
    net(torch.randn(4, 64, requires_grad=True))  # the next forward takes the stale hooks off first
    assert _top_hooks() is None
    y = torch.randn(2048, requires_grad=True)
    (g,) = torch.autograd.grad(y.exp().sum(), y)  # outside the model: exact again
    assert torch.equal(g, y.detach().exp())


def test_autocast_weight_casts_in_place_activations_and_odd_sizes_are_handled():
    lin = nn.Linear(256, 256)
    x = torch.randn(64, 256, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with approx.SavedCompressor(2, min_numel=1, model=lin) as c:
            lin(x).float().sum().backward()
    exact_gx = torch.ones(64, 256) @ lin.weight.to(torch.bfloat16).float()
    assert torch.allclose(x.grad, exact_gx, rtol=2e-2, atol=2e-2)  # the weight's bf16 cast was kept as it is
    assert c.kept >= 1

    act = nn.SiLU(inplace=True)
    approx.approximate_activations(nn.Sequential(act))
    z = torch.randn(1000, requires_grad=True)
    (g,) = torch.autograd.grad(act(z * 1.0).sum(), z)
    assert torch.equal(g, approx.SILU_2BIT.derivative(z.detach()))  # the codes of the input, not of silu(input)
    assert act.inplace is True

    tail = torch.linspace(100, 101, 300)  # 300 = one group of 256 and a tail of 44
    q = approx.quantize(tail, 2, 256)
    assert approx.dequantize(q)[-1] == tail[-1] and (approx.dequantize(q) - tail).abs().max() < 0.2
    huge = torch.tensor([-3e38, 3e38] * 1000, requires_grad=True)
    with approx.SavedCompressor(8, min_numel=1) as c:
        (huge * huge).sum()
    assert c.compressed == 0  # a range beyond float32: kept as it is


def test_stale_cache_entries_pickling_double_backward_codes_and_nesting():
    import pickle

    from classification.resources import MASK_DTYPES

    with approx.SavedCompressor(8, min_numel=1) as c:
        h = torch.randn(64, 64, requires_grad=True).exp()
        a = h * h
        h.data = torch.zeros(64, 64)  # same object, other memory: a new save is a new tensor
        h2 = torch.randn(64, 64, requires_grad=True).exp()
        b = h2 * h2
    assert c.compressed == 2
    (g,) = torch.autograd.grad(b.sum(), h2)
    assert (g - 2 * h2.detach()).abs().max() < 0.4  # within the 8-bit steps of its own values, not the old ones

    net = nn.Sequential(nn.Linear(4, 8), nn.GELU())
    approx.approximate_activations(net)
    approx.compress_saved(net)
    net(torch.randn(2, 4))
    twin = pickle.loads(pickle.dumps(net))
    assert type(twin[1]).__name__ == "ApproxGELU" and approx.saved_compressor(twin) is None

    x = torch.randn(50, requires_grad=True)
    (g,) = torch.autograd.grad(approx.step_derivative(x, torch.nn.functional.gelu, approx.GELU_2BIT).sum(), x,
                               create_graph=True)
    assert g.shape == x.shape

    with SavedTensorMeter() as meter:
        with approx.SavedCompressor(8, min_numel=1):
            (torch.randn(4096, requires_grad=True) * 2).exp()
    assert all(r["dtype"] not in MASK_DTYPES for r in meter.records)  # codes are not lean's bit masks
    with approx.SavedCompressor(8, min_numel=1) as outer:
        with approx.SavedCompressor(8, min_numel=1) as inner:
            y = torch.randn(1024 * 300, requires_grad=True)
            z = y.exp()
        (gz,) = torch.autograd.grad(z.sum(), y)
    assert inner.compressed == 1 and outer.compressed == 0  # the inner codes, minima and maxima are not recompressed
    assert (gz - y.detach().exp()).abs().max() <= y.detach().exp().max() / 255  # half a step of the widest group
