"""Issue 7 end to end, through ``asi_core.patch``: the lean fine-tuned region gives plain autograd's
gradients (float64, real MCUNet / MobileNetV2 / ResNet-18 graphs), keeps no more for backward than a
bound computed from its shapes, and covers modules called inside the region but registered before it
(torchvision BasicBlock's one ``relu``, called again after the residual add)."""

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2, resnet18
from torchvision.models.resnet import BasicBlock

import asi_core
from asi_core.lean import LEAN_OF, LeanReLU, SavedTensorMeter
from classification.backbones import MCUNet

F64 = torch.float64
F64_BYTES = 8
PLAIN_TYPES = tuple(LEAN_OF)
LEAN_TYPES = tuple(LEAN_OF.values())
FULL_RANK = 10**6  # asi ranks clipped to the input shape: no compression, exact weight gradients


def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (a fresh BN is the identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(1 + 0.3 * torch.randn(c, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(c, generator=g))
    return model


def set_bn_eval(model: nn.Module) -> None:
    """The paper's default (ClassificationModel's set_bn_eval): BN in eval mode, affine frozen."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
            m.requires_grad_(False)


def patched_step(model, method, num_finetune, x, g_out, lean=None, bn_eval=True, **options):
    """Patch a copy of ``model``, run one forward/backward in training mode (dropout draws seeded);
    return the patched copy, its output and the gradients of every trainable parameter."""
    net = copy.deepcopy(model)
    asi_core.patch(net, method, num_finetune=num_finetune, lean=lean, **options)
    net.train()
    if bn_eval:
        set_bn_eval(net)
    torch.manual_seed(123)
    out = net(x)
    out.backward(g_out)
    grads = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    return net, out.detach(), grads


# ----------------------------------------------------------------- gradients
BACKBONES = {
    "mcunet": lambda: MCUNet(num_classes=10),
    "mobilenet_v2": lambda: mobilenet_v2(num_classes=10),  # Conv2dNormActivation, Dropout
    "resnet18": lambda: resnet18(num_classes=10),  # last 4 convs: layer4.0.relu called in the region
}


@pytest.mark.filterwarnings("ignore:.*clipped")
@pytest.mark.parametrize("bn_eval", [True, False], ids=["bn_eval", "bn_trainable"])
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_patched_lean_gradients_match_plain_vanilla(backbone, bn_eval):
    torch.manual_seed(0)
    model = randomize_bn(BACKBONES[backbone](), seed=1).to(F64)
    x = torch.randn(2, 3, 64, 64, dtype=F64)
    g_out = torch.randn(2, 10, dtype=F64, generator=torch.Generator().manual_seed(2))
    plain, y0, g0 = patched_step(model, "vanilla", 4, x, g_out, bn_eval=bn_eval)  # vanilla: lean off
    assert not any(isinstance(m, LEAN_TYPES) for m in plain.modules())
    runs = {"vanilla lean": dict(method="vanilla", lean=True),
            "asi full rank + lean": dict(method="asi", ranks=FULL_RANK)}
    for label, kw in runs.items():
        net, y1, g1 = patched_step(model, num_finetune=4, x=x, g_out=g_out, bn_eval=bn_eval, **kw)
        assert not any(type(m) in PLAIN_TYPES for m in net.modules()), label  # the whole model is lean
        torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12, msg=label)
        assert g1.keys() == g0.keys(), label  # patched convs, the head (+ BN affine when trainable)
        assert len(g0) >= (5 if bn_eval else 9)
        for name in g0:
            torch.testing.assert_close(g1[name], g0[name], rtol=1e-10, atol=1e-12, msg=f"{label}: {name}")
        if not bn_eval:  # trainable BN: exact plain BN, running statistics updated alike
            ours = dict(net.named_buffers())
            for key, a in plain.named_buffers():  # the BNs' (asi adds its own factor buffers)
                assert torch.equal(a, ours[key]), f"{label}: {key}"
        asi_core.unpatch(net)
        assert not any(isinstance(m, LEAN_TYPES) for m in net.modules())


# -------------------------------------------------------------- memory bound
class TinyResNet(nn.Module):
    """Stem + two torchvision BasicBlocks (the second strided, with a downsample) + pool + fc."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(width, width)
        down = nn.Sequential(nn.Conv2d(width, 2 * width, 1, 2, bias=False), nn.BatchNorm2d(2 * width))
        self.layer2 = BasicBlock(width, 2 * width, stride=2, downsample=down)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer2(self.layer1(self.stem(x)))), 1))


class TinyMobileNet(nn.Module):
    """MobileNetV2-like: stem, one inverted residual (1x1 -> dw 3x3 -> 1x1, + x), 1x1 head conv with
    BN + ReLU6, pool, flatten, dropout, linear."""

    def __init__(self, width: int = 8, expand: int = 3, head: int = 32, classes: int = 10):
        super().__init__()
        hid = width * expand

        def cbr(cin, cout, k=1, groups=1, act=True):
            ops = [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
            return ops + [nn.ReLU6(inplace=True)] if act else ops

        self.stem = nn.Sequential(*cbr(3, width, 3))
        self.block = nn.Sequential(*cbr(width, hid), *cbr(hid, hid, 3, groups=hid), *cbr(hid, width, act=False))
        self.head = nn.Sequential(*cbr(width, head))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(head, classes))

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.head(x), 1), 1))


def tucker_bytes(shape, rank: int) -> int:
    """ASI's stored Tucker form of an input of ``shape`` at one rank per mode (modes with rank >= size
    are kept whole: no factor), float64."""
    ranks = [min(rank, d) for d in shape]
    core = 1
    for r in ranks:
        core *= r
    return F64_BYTES * (core + sum(d * r for d, r in zip(shape, ranks) if r < d))


def mask(numel: int) -> int:
    return (numel + 7) // 8


def lean_region_bound(name: str, b: int, hw: int, rank: int) -> tuple[int, int]:
    """(bound on what the lean region keeps, what plain vanilla keeps in its conv inputs alone), from
    shapes only, for the last 2 convs of the tiny nets at input (b, 3, hw, hw), width 8.

    Lean region = the two Tucker forms + per BN its ``scale`` (C values) + per ReLU/ReLU6/Dropout call
    1 bit per element + the classifier's pooled input; residual adds, pooling and flatten keep nothing."""
    if name == "resnet":  # layer2.conv2 (input b,16,h/2,w/2) and layer2.downsample.0 (input b,8,h,w)
        h = hw // 2
        convs = tucker_bytes((b, 16, h, h), rank) + tucker_bytes((b, 8, hw, hw), rank)
        rest = F64_BYTES * (16 + 16) + mask(b * 16 * h * h) + F64_BYTES * b * 16  # bn2, down BN; relu; fc
        vanilla_convs = F64_BYTES * (b * 16 * h * h + b * 8 * hw * hw)
    else:  # block.6 (input b,24,h,w) and head.0 (input b,8,h,w)
        convs = tucker_bytes((b, 24, hw, hw), rank) + tucker_bytes((b, 8, hw, hw), rank)
        rest = (F64_BYTES * (8 + 32) + mask(b * 32 * hw * hw)  # 2 BN; head ReLU6
                + mask(b * 32) + F64_BYTES * b * 32)  # dropout; linear input
        vanilla_convs = F64_BYTES * (b * 24 * hw * hw + b * 8 * hw * hw)
    return convs + rest, vanilla_convs


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_patched_lean_region_memory_below_shape_bound(name):
    torch.manual_seed(0)
    model = randomize_bn(TinyResNet() if name == "resnet" else TinyMobileNet(), seed=3).to(F64)
    b, hw, rank = 4, 16, 2
    x = torch.randn(b, 3, hw, hw, dtype=F64)
    measured = {}
    for method, opts in (("vanilla", {}), ("asi", {"ranks": rank})):
        net = copy.deepcopy(model)
        asi_core.patch(net, method, num_finetune=2, **opts)
        net.train()
        set_bn_eval(net)
        # the frozen part records no graph (its input needs no gradient): the meter sees the region only
        with SavedTensorMeter(exclude=[net]) as meter:
            out = net(x)
        measured[method] = meter.bytes
        records = meter.records
        out.sum().backward()
    bound, vanilla_convs = lean_region_bound(name, b, hw, rank)
    assert measured["asi"] <= bound, records
    assert measured["vanilla"] > vanilla_convs  # plain also keeps BN inputs and ReLU outputs
    assert measured["vanilla"] > 20 * measured["asi"]
    # no float tensor of a full activation's size is kept by the lean region
    biggest_float = max(r["shape"] for r in records if r["dtype"] == F64 and r["nbytes"])
    assert torch.Size(biggest_float).numel() <= b * 32


# ------------------------------------------------- BasicBlock's shared relu
def test_basic_block_relu_called_in_region_is_lean_and_unpatch_restores():
    torch.manual_seed(0)
    model = randomize_bn(TinyResNet(), seed=4).to(F64)
    types = OrderedDict((n, type(m)) for n, m in model.named_modules())
    keys = list(model.state_dict())
    # last 2 convs: layer2.conv2, layer2.downsample.0; layer2.relu is registered before conv2 but its
    # second call (after the residual add) is in the fine-tuned region
    assert asi_core.patch(model, "asi", num_finetune=2, ranks=1) == ["layer2.conv2", "layer2.downsample.0"]
    assert type(model.layer2.relu) is LeanReLU
    model.train()
    set_bn_eval(model)
    x = torch.randn(4, 3, 16, 16, dtype=F64)
    with SavedTensorMeter(exclude=[model]) as meter:
        out = model(x)
    calls = [r for r in meter.records if r["dtype"] == torch.uint8]
    assert [r["shape"] for r in calls] == [(mask(4 * 16 * 8 * 8),)]  # the relu after the add: 1 bit
    assert not any(r["dtype"] == F64 and len(r["shape"]) == 4 and r["nbytes"] > F64_BYTES * 16 * 8
                   for r in meter.records)  # no float activation (only Tucker forms, scales, fc input)
    out.sum().backward()
    asi_core.unpatch(model)
    assert OrderedDict((n, type(m)) for n, m in model.named_modules()) == types
    assert list(model.state_dict()) == keys


# ------------------------------------------------------- scripts/memory_table.{sh,py}
def test_memory_table_script_dry_run_and_formatting(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("MODELS", "DEPTHS", "METHODS", "EXTRA_ARGS")}
    runs = tmp_path / "runs"
    done = runs / "memory" / "resnet18" / "asi_4.json"
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps({"activation_mib": 0.02, "measured_mask_mib": 0.5, "measured_activation_mib": 0.65}))
    proc = subprocess.run(["bash", "scripts/memory_table.sh", "data", str(runs)], cwd=repo, text=True,
                          capture_output=True, env={**env, "DRY_RUN": "1"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    cmds = proc.stdout.splitlines()
    assert len(cmds) == 39 + 1 and "skip (done)" in proc.stderr  # 4 models x 2 depths x 5 methods, one done
    assert ("main.py profile --config configs/models/mcunet.yaml --model.method vanilla --model.lean true "
            "--model.num_finetune 2 --data.batch_size 64 --data.resolution 224") in cmds[1]
    assert "--model.method asi --model.ranks 2 --model.num_finetune 4" in cmds[-2]
    assert cmds[-1].endswith(f"scripts/memory_table.py {runs}/memory") and not (runs / "memory" / "mcunet").exists()

    (runs / "memory" / "resnet18" / "vanilla_4.json").write_text(
        json.dumps({"activation_mib": 30.0, "measured_mask_mib": 0.0, "measured_activation_mib": 65.0}))
    sys.path.insert(0, str(repo / "scripts"))
    try:
        import memory_table
    finally:
        sys.path.remove(str(repo / "scripts"))
    text = memory_table.table(memory_table.load(runs / "memory"))
    assert "| resnet18 | 4 | vanilla | 30.000 | 0.000 | 65.000 | 2.17 |" in text
    assert "| resnet18 | 4 | asi r2 | 0.020 | 0.500 | 0.650 | 1.25 |" in text
    assert text.index("| vanilla |") < text.index("| asi r2 |") and "resnet18 4 layers: 100x" in text
