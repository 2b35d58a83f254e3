"""Tests for asi_core/lean.py: lean BN / bit-mask activations give plain autograd's
gradients, save (measurably) only what they claim, and convert models in place."""

import copy

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from asi_core.lean import (
    LeanBatchNorm2d,
    LeanDropout,
    LeanHardtanh,
    LeanLeakyReLU,
    LeanReLU,
    LeanReLU6,
    SavedTensorMeter,
    _pack_in_memory_order,
    _unpack_layout,
    make_lean,
    pack_mask,
    saved_tensor_bytes,
    unmake_lean,
    unpack_mask,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
F64 = torch.float64


# ------------------------------------------------------------------ helpers / blocks
class InvertedResidual(nn.Module):
    """MobileNetV2 / MCUNet block: 1x1 -> BN -> ReLU6 -> 3x3 dw -> BN -> ReLU6 -> 1x1 -> BN, + x."""

    def __init__(self, channels: int, expand: int):
        super().__init__()
        hidden = channels * expand
        self.conv = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x):
        return x + self.conv(x)


def frozen_eval(block: nn.Module, seed: int) -> nn.Module:
    """float64, BN in eval with random (non-trivial) statistics and frozen affine."""
    g = torch.Generator().manual_seed(seed)
    block = block.to(F64)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g, dtype=F64))
            m.running_var.copy_(torch.rand(c, generator=g, dtype=F64) + 0.2)
            m.weight.data.copy_(2 * torch.randn(c, generator=g, dtype=F64))
            m.bias.data.copy_(torch.randn(c, generator=g, dtype=F64))
            m.requires_grad_(False)
    return block.eval()


def grads(block, x):
    """Output, input grad and trainable-parameter grads for a random upstream gradient."""
    x = x.detach().clone().requires_grad_(True)
    out = block(x)
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    params = [p for p in block.parameters() if p.requires_grad]
    g = torch.autograd.grad(out, [x, *params], g_out.to(out.device))
    return out.detach(), g


def nbytes(shape, dtype) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def mask_bytes(shape) -> int:
    return (torch.Size(shape).numel() + 7) // 8


# ------------------------------------------------------------------------ bit masks
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (8,), (9,), (13,), (1001,), (3, 5, 7), (2, 3, 4, 5)])
def test_pack_unpack_round_trip(shape):
    g = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(shape, generator=g) < 0.5
    packed, s = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == mask_bytes(shape)
    assert torch.equal(unpack_mask(packed, s), mask)


def test_pack_bit_order_and_errors():
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 0, 1], dtype=torch.bool)
    packed, _ = pack_mask(mask)
    assert packed.tolist() == [1 + 128, 2]  # element i is bit i % 8 of byte i // 8
    with pytest.raises(TypeError):
        pack_mask(torch.zeros(3))
    with pytest.raises(ValueError):
        unpack_mask(packed, (17,))


@pytest.mark.parametrize("device", DEVICES)
def test_pack_keeps_memory_layout(device):
    mask = (torch.randn(2, 5, 3, 3, device=device) > 0).to(memory_format=torch.channels_last)
    packed, shape, perm = _pack_in_memory_order(mask)
    back = _unpack_layout(packed, shape, perm)
    assert torch.equal(back, mask) and back.stride() == mask.stride()
    assert packed.device == mask.device and packed.numel() == mask_bytes(mask.shape)


# ------------------------------------------------------- activations: exact gradients
SPECIAL = [-7.0, -1.0, -0.0, 0.0, 1e-30, 0.5, 1.0, 3.0, 6.0, 7.0,
           float("nan"), float("inf"), -float("inf")]
ACTIVATIONS = [
    (nn.ReLU, LeanReLU, {}),
    (nn.ReLU6, LeanReLU6, {}),
    (nn.Hardtanh, LeanHardtanh, {"min_val": -1.0, "max_val": 1.0}),
    (nn.LeakyReLU, LeanLeakyReLU, {"negative_slope": 0.1}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("plain_cls,lean_cls,kw", ACTIVATIONS)
@pytest.mark.parametrize("inplace", [False, True])
def test_activation_bitwise_equal_to_autograd(device, dtype, plain_cls, lean_cls, kw, inplace):
    # grad * slope in a half type is rounded differently by the two kernels: equal to rounding there
    bitwise = not (plain_cls is nn.LeakyReLU and dtype in (torch.float16, torch.bfloat16))
    g = torch.Generator().manual_seed(0)
    special = torch.tensor(SPECIAL)
    if issubclass(plain_cls, nn.Hardtanh):  # PyTorch's own CPU kernel disagrees with itself
        special = special[~special.isnan()]  # at NaN (vectorised part: 0, scalar tail: grad)
    x = torch.cat([special, 8 * torch.randn(50, generator=g)]).to(device, dtype)
    g_out = torch.randn(x.shape, generator=g).to(device, dtype)
    results = []
    for cls in (plain_cls, lean_cls):
        leaf = x.clone().requires_grad_(True)
        y = cls(inplace=inplace, **kw)(leaf * 1)  # * 1: in-place needs a non-leaf
        (gx,) = torch.autograd.grad(y, leaf, g_out)
        results.append((y.detach(), gx))
    (y_plain, g_plain), (y_lean, g_lean) = results
    assert torch.equal(y_plain.isnan(), y_lean.isnan())
    assert torch.equal(y_plain.nan_to_num(), y_lean.nan_to_num())
    if bitwise:
        assert torch.equal(g_plain, g_lean)  # bit for bit, boundaries 0 / 6 / ±1 / ±inf included
    else:
        assert torch.equal(g_plain == 0, g_lean == 0)  # the mask itself is exact
        torch.testing.assert_close(g_lean, g_plain, rtol=1e-2, atol=1e-2, equal_nan=True)


def test_activation_boundaries_explicit():
    x = torch.tensor([-1.0, 0.0, 3.0, 6.0, 7.0], dtype=F64, requires_grad=True)
    (g6,) = torch.autograd.grad(LeanReLU6()(x), x, torch.ones(5, dtype=F64))
    (g0,) = torch.autograd.grad(LeanReLU()(x), x, torch.ones(5, dtype=F64))
    assert g6.tolist() == [0, 0, 1, 0, 0] and g0.tolist() == [0, 0, 1, 1, 1]


def test_activation_without_grad_is_plain_inplace():
    x = torch.randn(10)
    with torch.no_grad():
        y = LeanReLU6(inplace=True)(x)
    assert y is x and bool((x >= 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_and_double_backward(device):
    x = torch.randn(2, 6, 5, 5, dtype=F64, device=device).to(memory_format=torch.channels_last) * 5
    res = []
    for act in (nn.ReLU6(), LeanReLU6()):
        leaf = x.clone().requires_grad_(True)
        y = act(leaf)
        (gx,) = torch.autograd.grad((y * y).sum(), leaf, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.sum(), leaf)
        res.append((gx.detach(), ggx))
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])
    assert res[1][0].is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------ dropout
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dropout_same_draws_output_and_gradient(device, dtype, inplace, channels_last):
    x = torch.randn(4, 6, 5, 3, dtype=dtype, device=device)
    x[0, 0] = 0.0  # kept zeros must still pass their gradient (a mask from y != 0 would not)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    g_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    g_out = g_out.to(memory_format=torch.channels_last) if channels_last else g_out
    res = []
    for cls in (nn.Dropout, LeanDropout):
        leaf = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        if device == "cuda":
            torch.cuda.manual_seed(7)
        with SavedTensorMeter() as meter:
            y = cls(0.3, inplace=inplace).train()(leaf * 1)
        (gx,) = torch.autograd.grad(y, leaf, g_out)
        after = torch.rand(3, device=device)  # the RNG advanced by the same draws
        res.append((y.detach(), gx, after, meter.bytes))
    (y0, g0, r0, b0), (y1, g1, r1, b1) = res
    assert torch.equal(y0, y1) and torch.equal(g0, g1) and torch.equal(r0, r1)
    assert bool((y1 == 0).any()) and bool((g1[0, 0] != 0).any())
    assert b1 == mask_bytes(x.shape) < b0
    assert g1.stride() == g0.stride() and y1.stride() == y0.stride()


def test_dropout_plain_paths():
    x = torch.randn(5, 4)
    assert torch.equal(LeanDropout(0.5).eval()(x.requires_grad_(True)), x)  # eval: identity
    assert torch.equal(LeanDropout(0.0)(x), x)
    with torch.no_grad():
        y = LeanDropout(0.5, inplace=True).train()(x)
    assert y is x  # no graph: nn.Dropout.forward, in place included
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))
    assert make_lean(model) == ["1"] and type(model[1]) is LeanDropout


# --------------------------------------------------------------------- BatchNorm
@pytest.mark.parametrize("device", DEVICES)
def test_frozen_bn_matches_plain_and_uses_current_buffers(device):
    plain = frozen_eval(nn.BatchNorm2d(5), seed=3).to(device)
    lean = copy.deepcopy(plain)
    make_lean(lean)
    assert type(lean) is LeanBatchNorm2d
    # statistics changed after conversion (e.g. a checkpoint loaded later) are respected
    new_stats = {k: v + 0.5 for k, v in plain.state_dict().items() if k.startswith("running")}
    plain.load_state_dict(new_stats, strict=False)
    lean.load_state_dict(new_stats, strict=False)
    x = torch.randn(3, 5, 4, 4, dtype=F64, device=device).to(memory_format=torch.channels_last)
    (y0, (g0,)), (y1, (g1,)) = grads(plain, x), grads(lean, x)
    assert torch.equal(y0, y1)  # forward is the same kernel
    torch.testing.assert_close(g1, g0, rtol=1e-13, atol=0)
    with SavedTensorMeter(exclude=[lean]) as meter:
        lean(x.requires_grad_(True))
    assert meter.bytes == nbytes((5,), F64)  # only `scale`: no activation


@pytest.mark.parametrize("mode", ["train", "eval_trainable_affine"])
def test_trainable_bn_is_exactly_plain(mode):
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(4).to(F64).train(mode == "train")
    plain.running_var.fill_(2.0)
    lean = copy.deepcopy(plain)
    make_lean(lean)
    x = torch.randn(3, 4, 5, 5, dtype=F64)
    (y0, g0), (y1, g1) = grads(plain, x), grads(lean, x)
    assert len(g0) == 3  # input, weight, bias
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert torch.equal(plain.running_mean, lean.running_mean)
    assert torch.equal(plain.num_batches_tracked, lean.num_batches_tracked)
    xr = x.clone().requires_grad_(True)
    assert saved_tensor_bytes(lean, xr) == saved_tensor_bytes(plain, xr)


# ---------------------------------------------------------------- blocks: gradients
def make_blocks():
    torch.manual_seed(0)
    ir = frozen_eval(InvertedResidual(8, 3), seed=1)
    bb = frozen_eval(BasicBlock(8, 8), seed=2)
    return {"inverted_residual": ir, "basic_block": bb}


@pytest.mark.parametrize("name", ["inverted_residual", "basic_block"])
def test_block_gradients_match_plain(name):
    plain = make_blocks()[name]
    lean = copy.deepcopy(plain)
    converted = make_lean(lean)
    assert len(converted) == (5 if name == "inverted_residual" else 3)  # BNs + activations
    x = 3 * torch.randn(2, 8, 8, 8, dtype=F64)
    # the ReLU6 masks must actually clip at both ends for the test to mean something
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(i[0]))
             for m in lean.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
    (y0, g0), (y1, g1) = grads(plain, x), grads(lean, x)
    for h in hooks:
        h.remove()
    assert all(bool((t < 0).any()) for t in seen)
    if name == "inverted_residual":
        assert all(bool((t > 6).any()) for t in seen)
    assert len(g0) == len(g1) == (4 if name == "inverted_residual" else 3)  # x + conv weights
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------ memory bounds
def expected_saved_bytes(name, x_shape, lean: bool) -> tuple[int, int]:
    """(conv inputs, everything else) autograd keeps, from shapes only (float64;
    parameters and BN buffers excluded).

    Plain nn.Conv2d saves its input; plain eval BN saves its input; plain ReLU6 (Hardtanh)
    saves its input; in-place ReLU saves its output (= the next conv's input: one storage).
    Lean BN saves `scale` (C values) and a lean activation ceil(numel / 8) bytes.
    """
    n, c, h, w = x_shape
    full = lambda ch: nbytes((n, ch, h, w), F64)  # noqa: E731
    if name == "inverted_residual":
        hid = 3 * c
        convs = full(c) + 2 * full(hid)  # inputs of 1x1, dw 3x3, 1x1
        if lean:
            return convs, 2 * mask_bytes((n, hid, h, w)) + nbytes((hid + hid + c,), F64)
        return convs, (2 * full(hid) + full(c)) + 2 * full(hid)  # BN inputs + ReLU6 inputs
    convs = 2 * full(c)  # x, relu(bn1(conv1 x)) (in place, shared with relu's saved output)
    if lean:
        return convs, 2 * mask_bytes((n, c, h, w)) + nbytes((2 * c,), F64)
    return convs, 2 * full(c) + full(c)  # bn1/bn2 inputs + in-place relu2 output


@pytest.mark.parametrize("name", ["inverted_residual", "basic_block"])
def test_block_saved_memory(name):
    plain = make_blocks()[name]
    lean = copy.deepcopy(plain)
    make_lean(lean)
    x = torch.randn(2, 8, 8, 8, dtype=F64, requires_grad=True)
    measured = {}
    for label, block in (("plain", plain), ("lean", lean)):
        with SavedTensorMeter(exclude=[block]) as meter:
            out = block(x)
        measured[label] = meter.bytes
        assert meter.live_bytes == meter.bytes
        out.sum().backward()
        assert meter.live_bytes == 0  # graph freed by backward
    convs, plain_rest = expected_saved_bytes(name, x.shape, lean=False)
    _, lean_rest = expected_saved_bytes(name, x.shape, lean=True)
    assert measured["plain"] == convs + plain_rest
    assert measured["lean"] == convs + lean_rest
    # everything but the (plain) convs' inputs shrinks > 50x: a mask is 1/64 of a float64
    assert lean_rest * 50 < plain_rest
    print(f"{name}: plain {measured['plain']} B, lean {measured['lean']} B "
          f"(non-conv {plain_rest} -> {lean_rest} B)")


def test_meter_counts_storages_not_views():
    a = torch.randn(100, dtype=F64, requires_grad=True)
    b = torch.randn(10, dtype=F64, requires_grad=True)
    w = nn.Parameter(torch.randn(12, dtype=F64))
    frozen = torch.randn(10, dtype=F64)
    with SavedTensorMeter(exclude=[frozen]) as meter:
        y = a[:10] * b  # saves a view of a (counted as its whole storage: 800 B) and b (80 B)
        z = b * b  # b twice more: counted once
        u = b * w[2:]  # w[2:] is a view of a Parameter: not counted
        v = b * frozen  # saves only `frozen`, excluded
    assert meter.bytes == 800 + 80
    assert [r["excluded"] for r in meter.records].count(True) == 2
    (y.sum() + z.sum() + u.sum() + v.sum()).backward()


# ------------------------------------------------------------ model conversion
def test_make_lean_keeps_state_and_unmake_restores():
    model = make_blocks()["inverted_residual"]
    keys = list(model.state_dict().keys())
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    converted = make_lean(model)
    assert converted == ["conv.1", "conv.2", "conv.4", "conv.5", "conv.7"]
    assert type(model.conv[2]) is LeanReLU6 and isinstance(model.conv[2], nn.ReLU6)
    assert list(model.state_dict().keys()) == keys
    assert all(p is params[k] for k, p in model.named_parameters())
    assert all(b is buffers[k] for k, b in model.named_buffers())
    assert make_lean(model) == converted  # idempotent
    assert unmake_lean(model) == converted
    assert [type(model.conv[i]) for i in (1, 2)] == [nn.BatchNorm2d, nn.ReLU6]
    assert all(p is params[k] for k, p in model.named_parameters())
    assert list(model.state_dict().keys()) == keys


def test_make_lean_start_name():
    block = make_blocks()["basic_block"]
    # registration order: conv1, bn1, relu, conv2, bn2; relu (used after conv2 too) stays plain
    assert make_lean(block, "conv2") == ["bn2"]
    assert type(block.relu) is nn.ReLU and type(block.bn1) is nn.BatchNorm2d
    model = make_blocks()["inverted_residual"]
    assert make_lean(model, "conv.3") == ["conv.4", "conv.5", "conv.7"]
    assert make_lean(copy.deepcopy(model), "conv.4") == ["conv.4", "conv.5", "conv.7"]
    with pytest.raises(ValueError, match="no module named"):
        make_lean(model, "conv.99")


def test_meter_does_not_keep_unfreed_graphs_alive():
    x = torch.randn(1000, dtype=F64, requires_grad=True)
    with SavedTensorMeter() as meter:
        y = torch.relu(x * 2).exp()  # relu and exp save their *outputs*
    assert meter.bytes == 2 * 8000 and meter.live_bytes == 2 * 8000
    del y  # no backward: the graph must still be freed (no saved-output ref cycle)
    assert meter.live_bytes == 0
