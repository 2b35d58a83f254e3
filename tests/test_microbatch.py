"""asi_core.microbatch: the frozen prefix runs in micro-batches with the same outputs and gradients (float64, every
family's structure: a Sequential stage list, a traced root, a straddling block), falls back to the whole batch
wherever that would not be exact, survives a deep copy, and lowers the whole-step peak where the frozen forward
sets it."""
from __future__ import annotations

import copy
import warnings
from functools import partial

import pytest
import torch
from torch import nn

import asi_core
from asi_core import microbatch
from asi_core.peak import training_peak


def _networks():
    from classification import families  # noqa: F401  every family registered
    from classification.registry import create_model
    return create_model


def _frozen_mode(net: nn.Module) -> nn.Module:
    """Training mode with BatchNorm, dropout and stochastic depth deterministic (eval), as the comparison needs."""
    net.train()
    for m in net.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)) or type(m).__name__ == "StochasticDepth":
            m.eval()
    return net


MODELS = [("mcunet", "conv", None, 2, 48), ("resnet18", "conv", None, 2, 48),
          ("swin_tiny_test", "linear", "mlp", 4, 32), ("vit_tiny_test", "linear", "mlp", 4, 32)]


@pytest.mark.parametrize("method,options", [("vanilla", {}), ("asi", {"ranks": 2})])
@pytest.mark.parametrize("backbone,layer_type,include,n,res", MODELS)
def test_outputs_and_gradients_equal_the_whole_batch_in_float64(backbone, layer_type, include, n, res, method,
                                                                options):
    create_model = _networks()
    torch.manual_seed(0)
    ref = create_model(backbone, 10, pretrained=False).double()
    asi_core.patch(ref, method, num_finetune=n, layer_type=layer_type, include=include, **options)
    net = copy.deepcopy(ref)
    converted = microbatch.enable(net, 3)
    assert converted and converted[0][1], "nothing frozen was found to run in micro-batches"
    x = torch.randn(8, 3, res, res, dtype=torch.double)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for model in (ref, net):
            _frozen_mode(model)
            model(x).square().sum().backward()
    assert not [w for w in caught if "asi_core.microbatch" in str(w.message)]  # it ran in micro-batches
    y_ref, y = ref(x), net(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    grads = {k: p.grad for k, p in net.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for k, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[k], p.grad, rtol=1e-9, atol=1e-12)
    assert net.state_dict().keys() == ref.state_dict().keys()  # no new parameter, buffer or key


def _sizes(module: nn.Module) -> list[int]:
    seen: list[int] = []
    module.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    return seen


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def test_the_prefix_runs_micro_batch_samples_at_a_time_and_the_region_the_whole_batch():
    net = small_cnn()
    asi_core.patch(net, "vanilla", num_finetune=1, layer_type="conv")  # the last conv trains
    assert microbatch.enable(net, 4) == [("", ["0", "1", "2", "3", "4"])]
    first, trained = _sizes(net[0]), _sizes(net[5])
    net.eval()
    net(torch.randn(10, 3, 16, 16))
    assert first == [4, 4, 2] and trained == [10]


@pytest.mark.parametrize("case", ["batch_norm_in_training_mode", "input_needs_grad", "batch_not_larger",
                                  "unfrozen_since"])
def test_it_runs_whole_where_micro_batches_would_not_be_exact(case):
    net = small_cnn()
    asi_core.patch(net, "vanilla", num_finetune=1, layer_type="conv")
    microbatch.enable(net, 4)
    first = _sizes(net[0])
    x = torch.randn(10, 3, 16, 16)
    net.eval()
    if case == "batch_norm_in_training_mode":
        net[1].train()  # batch statistics join the samples
    elif case == "input_needs_grad":
        x.requires_grad_(True)
    elif case == "batch_not_larger":
        x = x[:4]
    else:
        net[0].weight.requires_grad_(True)
    net(x)
    assert first == [x.shape[0]]


class SharedStatistic(nn.Module):
    """A frozen stem, then a batch mean (joins the samples), then a trainable head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 4).requires_grad_(False)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.stem(x)
        return self.head(h - h.mean(0))


def test_an_operation_that_may_join_the_samples_ends_the_prefix():
    torch.manual_seed(0)
    net = SharedStatistic()
    ref = copy.deepcopy(net)
    assert microbatch.enable(net, 2) == [("", ["stem"])]  # the batch mean runs on the whole batch
    x = torch.randn(6, 4)
    torch.testing.assert_close(net(x), ref(x))


class Energy(nn.Module):
    def forward(self, x):
        return x.square().mean()  # one number for the batch


class ScaledByEnergy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.energy, self.head = nn.Linear(4, 4).requires_grad_(False), Energy(), nn.Linear(4, 2)

    def forward(self, x):
        h = self.stem(x)
        return self.head(h + self.energy(h))


def test_a_prefix_module_whose_result_is_not_per_sample_warns_and_runs_whole():
    torch.manual_seed(0)
    net = ScaledByEnergy()
    ref = copy.deepcopy(net)
    assert microbatch.enable(net, 2) == [("", ["stem", "energy"])]
    x = torch.randn(6, 4)
    with pytest.warns(UserWarning, match="not a per-sample tensor"):
        y = net(x)
    torch.testing.assert_close(y, ref(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per training mode
        torch.testing.assert_close(net(x), ref(x))


def test_a_deep_copy_runs_its_own_modules_and_disable_restores_the_plain_forward():
    net = small_cnn()
    asi_core.patch(net, "vanilla", num_finetune=1, layer_type="conv")
    microbatch.enable(net, 4)
    twin = copy.deepcopy(net)
    original, copied = _sizes(net[0]), _sizes(twin[0])
    twin.eval()
    twin(torch.randn(10, 3, 16, 16))
    assert original == [] and copied == [4, 4, 2]
    assert microbatch.micro_batched(twin) == {"": 4}
    assert microbatch.disable(twin) == [""] and microbatch.micro_batched(twin) == {}
    microbatch.enable(twin, 4)
    asi_core.unpatch(twin)  # undoes it too
    assert microbatch.micro_batched(twin) == {}
    twin(torch.randn(10, 3, 16, 16))
    assert copied[-1] == 10


def test_nothing_is_converted_where_every_layer_trains_and_bad_sizes_are_refused():
    net = small_cnn()
    assert microbatch.enable(net, 4) == []
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="micro_batch must be an integer >= 1"):
            microbatch.enable(net, bad)


def test_the_whole_step_peak_drops_where_the_frozen_forward_sets_it():
    """A wide frozen stem at full resolution, one trainable layer at the end: the step's peak is the stem's forward;
    in micro-batches of 4 out of 32 its transient activations shrink, everything else is unchanged."""
    def build():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, 10))
        asi_core.patch(net, "asi", num_finetune=1, layer_type="linear", ranks=2)
        return net
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    peaks = {}
    for micro in (None, 4):
        net = build()
        if micro:
            microbatch.enable(net, micro)
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
        training_peak(net, x, y, nn.functional.cross_entropy, opt)  # warm-up
        peaks[micro] = training_peak(net, x, y, nn.functional.cross_entropy, opt)
    whole, micro = peaks[None], peaks[4]
    activation = 32 * 32 * 32 * 32 * 4 / 2 ** 20  # one stem activation of the whole batch, MiB
    assert whole["peak_step_mib"] - micro["peak_step_mib"] > activation  # at least one whole activation less
    assert micro["peak_step_tensor_mib"] < 0.5 * whole["peak_step_tensor_mib"]


def test_the_framework_option_is_checked_named_in_profile_and_keeps_default_run_names(run_cli):
    from classification.finetune import check_model_options
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="--model.frozen_micro_batch"):
            check_model_options(frozen_micro_batch=bad)
    args = ("profile", "--config", "configs/models/mcunet.yaml", "--data.resolution", "64", "--model.method", "asi",
            "--data.batch_size", "8", "--trainer.logger", "false")
    plain = run_cli(*args, tiny=False).profile_result
    micro = run_cli(*args, "--model.frozen_micro_batch", "2", tiny=False).profile_result
    assert "frozen_micro_batch" not in plain and micro["frozen_micro_batch"] == 2
    assert micro["micro_batched"][""][:2] == ["first_conv", "blocks.0"]
    assert micro["peak_step_mib"] < plain["peak_step_mib"]
    assert micro["activation_mib"] == plain["activation_mib"]  # the region, and what it keeps, is the same

    from classification.rundir import run_settings
    base = {"backbone": "mcunet", "method": "asi"}
    assert run_settings(base, {}, 0) == run_settings({**base, "frozen_micro_batch": None}, {}, 0)
    assert run_settings(base, {}, 0) != run_settings({**base, "frozen_micro_batch": 8}, {}, 0)


def test_benchmark_times_the_micro_batched_variant_beside_the_plain_one(monkeypatch):
    from classification.benchmark import benchmark_models

    sizes = []
    enable = microbatch.enable
    monkeypatch.setattr(microbatch, "enable", lambda net, n: sizes.append(n) or enable(net, n))
    out = benchmark_models({"backbone": "mcunet", "num_finetune": 2, "num_classes": 10, "pretrained": False},
                           ["asi", "asi+micro"], 8, 64, steps=1, warmup=0, progress=False)
    assert set(out["methods"]) == {"asi", "asi+micro"} and all(v["step_s"] > 0 for v in out["methods"].values())
    assert sizes == [8]  # asi+micro alone, at the default micro-batch


def _compare(net: nn.Module, x: torch.Tensor, micro_batch: int = 2):
    """The converted copy's output and gradients against the plain model's (float64)."""
    ref = copy.deepcopy(net).double()
    net = net.double()
    converted = microbatch.enable(net, micro_batch)
    for model in (ref, net):
        model(x.double()).square().sum().backward()
    torch.testing.assert_close(net(x.double()), ref(x.double()))
    for (k, p), q in zip(net.named_parameters(), ref.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, msg=k)
    return converted


class NoRunningStats(nn.Module):
    """BatchNorm without running statistics normalises by the batch even in eval mode."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4).requires_grad_(False)
        self.bn = nn.BatchNorm1d(4, track_running_stats=False).requires_grad_(False)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.bn(self.a(x)))


class InPlaceAfterARead(nn.Module):
    """A frozen in-place ReLU on a value the forward also reads elsewhere (before, in program order)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Linear(4, 4).requires_grad_(False)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv(x)
        g = h.mean(1, keepdim=True)  # reads h before the in-place ReLU changes it
        return self.head(self.act(h)) * g


class Flagged(nn.Module):
    """Python-level state read by forward: set after enable, it must still count."""

    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Linear(4, 4).requires_grad_(False), nn.Linear(4, 2)
        self.scale = False

    def forward(self, x):
        out = self.head(self.stem(x))
        return out * 10 if self.scale else out


class ConstantTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(2, 4))

    def forward(self):
        return self.table


class UsesATable(nn.Module):
    """A frozen module of no input whose result happens to have micro-batch rows: no per-sample computation."""

    def __init__(self):
        super().__init__()
        self.stem, self.tab, self.head = nn.Linear(4, 4).requires_grad_(False), ConstantTable(), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.stem(x) * self.tab().sum(0))


@pytest.mark.parametrize("build,expected", [
    (NoRunningStats, [("", ["a", "bn"])]),  # converted, but the BatchNorm makes it run whole at every call
    (InPlaceAfterARead, [("", ["conv"])]),  # the in-place ReLU stays in the forward, after the read
    (UsesATable, [("", ["stem"])]),
])
def test_cases_a_review_found_give_the_plain_result(build, expected):
    torch.manual_seed(0)
    assert _compare(build(), torch.randn(8, 4)) == expected


def test_the_rest_of_the_forward_runs_as_written():
    torch.manual_seed(0)
    net = Flagged()
    ref = copy.deepcopy(net)
    microbatch.enable(net, 2)
    net.scale = ref.scale = True  # after enable
    x = torch.randn(8, 4)
    torch.testing.assert_close(net(x), ref(x))
    net.double()
    assert net(x.double()).dtype == torch.float64


def test_a_module_recompute_converted_is_left_to_it():
    from asi_core import recompute

    net = small_cnn()
    names = asi_core.patch(net, "vanilla", num_finetune=2, layer_type="conv")
    holder = nn.Sequential(net)  # the whole network one checkpointed segment of the holder's
    holder[0].forward = partial(recompute._recomputed_forward, holder[0])
    assert microbatch.enable(holder, 4) == [] and recompute.recomputed_segments(holder) == ["0"]


class Branching(nn.Module):
    """Python branches read after enable: one skips a prefix module, one reads a result only prefix calls read
    when traced."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4).requires_grad_(False), nn.Linear(4, 4).requires_grad_(False)
        self.head = nn.Linear(4, 2)
        self.skip, self.peek = False, False

    def forward(self, x):
        h = x if self.skip else self.a(x)
        out = self.head(self.b(h))
        return out + h.sum(1, keepdim=True) if self.peek else out


@pytest.mark.parametrize("flag", ["skip", "peek"])
def test_a_forward_that_leaves_its_trace_still_gives_the_plain_result(flag):
    torch.manual_seed(0)
    net = Branching()
    ref = copy.deepcopy(net)
    assert microbatch.enable(net, 2) == [("", ["a", "b"])]
    setattr(net, flag, True)
    setattr(ref, flag, True)
    x = torch.randn(6, 4)
    with pytest.warns(UserWarning, match="was not called as traced"):
        y = net(x)
    torch.testing.assert_close(y, ref(x))
    assert "forward" not in net.a.__dict__ and "forward" not in net.b.__dict__  # the replays are removed
