"""asi_core: tensor primitives, decompositions, exact gradients of every method on every conv
variant and on Linear, gradient filtering against its formula, the patching API, bad input."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asi_core
from asi_core.decompose import eps_rank, hosvd, subspace_iteration
from asi_core.lowrank import conv2d_weight_grad, linear_weight_grad
from asi_core.tensor import fold, mode_dot_other_modes, mode_product, orthonormalize, tucker_to_tensor, unfold

D = torch.float64

# Every Conv2d variant the issue lists: (in_channels, conv kwargs)
CONV_VARIANTS = {
    "1x1": (4, dict(out_channels=6, kernel_size=1)),
    "3x3": (4, dict(out_channels=6, kernel_size=3, padding=1)),
    "5x5_nobias": (4, dict(out_channels=5, kernel_size=5, padding=2, bias=False)),
    "7x7_stride2": (3, dict(out_channels=4, kernel_size=7, stride=2, padding=3)),
    "3x1": (4, dict(out_channels=6, kernel_size=(3, 1), padding=(1, 0))),
    "stride2": (4, dict(out_channels=6, kernel_size=3, stride=2, padding=1)),
    "dilation2": (4, dict(out_channels=6, kernel_size=3, dilation=2, padding=2)),
    "depthwise": (6, dict(out_channels=6, kernel_size=3, padding=1, groups=6)),
    "depthwise_x2_stride2": (4, dict(out_channels=8, kernel_size=3, stride=2, padding=1, groups=4)),
    "grouped4": (8, dict(out_channels=12, kernel_size=3, padding=1, groups=4)),
    "asym_padding": (4, dict(out_channels=6, kernel_size=3, padding=(0, 1))),
    "same": (4, dict(out_channels=6, kernel_size=3, padding="same")),
    "same_even_kernel": (4, dict(out_channels=6, kernel_size=4, padding="same")),
    "same_dilated_nonsquare": (4, dict(out_channels=6, kernel_size=(2, 3), padding="same", dilation=2)),
    "valid": (4, dict(out_channels=6, kernel_size=3, padding="valid")),
    "reflect": (4, dict(out_channels=6, kernel_size=3, padding=1, padding_mode="reflect")),
}


def _tucker_tensor(shape, ranks, gen, dtype=D):
    core = torch.randn(ranks, generator=gen, dtype=dtype)
    factors = [torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=dtype))[0] for d, r in zip(shape, ranks)]
    return tucker_to_tensor(core, factors)


def _reference_grads(conv, x, grad_out):
    ref = copy.deepcopy(conv)
    xr = x.detach().clone().requires_grad_()
    ref(xr).backward(grad_out)
    return xr.grad, ref.weight.grad, None if ref.bias is None else ref.bias.grad


def _patched_grads(conv, x, grad_out, method, **options):
    model = nn.Sequential(copy.deepcopy(conv))
    asi_core.patch(model, method, num_finetune=1, lean=False, **options)
    xi = x.detach().clone().requires_grad_()
    model.train()
    model(xi).backward(grad_out)
    layer = model[0]
    return xi.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad, layer


def _assert_close(a, b, rtol=1e-4):
    scale = b.abs().max().clamp_min(1e-12)
    assert (a - b).abs().max() / scale < rtol, f"relative error {(a - b).abs().max() / scale:.3e}"


# ---------------------------------------------------------------------------------------------
# tensor primitives
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4), (2, 3, 4, 5)])
def test_unfold_fold_and_mode_product_match_definition(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=D)
    letters = "abcd"[: len(shape)]
    for m in range(len(shape)):
        assert torch.equal(fold(unfold(x, m), m, shape), x)
        u = torch.randn(7, shape[m], generator=g, dtype=D)
        expect = torch.einsum(f"{letters},q{letters[m]}->{letters[:m]}q{letters[m + 1:]}", x, u)  # eq. 4
        torch.testing.assert_close(mode_product(x, u, m), expect)
        torch.testing.assert_close(mode_product(x, u.t(), m, transpose=True), expect)
        # unfolding identity: (x ×_m U)_(m) = U x_(m)
        torch.testing.assert_close(unfold(mode_product(x, u, m), m), u @ unfold(x, m))
        v = torch.randn(shape[:m] + (3,) + shape[m + 1:], generator=g, dtype=D)
        torch.testing.assert_close(mode_dot_other_modes(x, v, m), unfold(x, m) @ unfold(v, m).t())


def test_mode_product_works_on_non_contiguous_input():
    x = torch.randn(2, 5, 4, 3, dtype=D).to(memory_format=torch.channels_last)
    u = torch.randn(3, 5, dtype=D)
    torch.testing.assert_close(mode_product(x, u, 1), torch.einsum("abcd,qb->aqcd", x, u))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_orthonormalize(dtype):
    p = torch.randn(20, 4, dtype=torch.float32).to(dtype)
    q = orthonormalize(p)
    assert q.dtype == dtype and q.shape == (20, 4)
    tol = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5
    torch.testing.assert_close(q.double().t() @ q.double(), torch.eye(4, dtype=D), atol=tol, rtol=0)
    # same column space: the projection of p onto span(q) is p
    pd = p.double()
    qd = torch.linalg.qr(pd)[0]
    torch.testing.assert_close(qd @ (qd.t() @ q.double()), q.double(), atol=tol, rtol=0)


def test_eps_rank_hand_computed():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14: cumulative 0.643, 0.929, 1
    assert eps_rank(s, 0.5) == 1
    assert eps_rank(s, 9 / 14) == 1  # exactly reached counts
    assert eps_rank(s, 0.65) == 2
    assert eps_rank(s, 0.9) == 2
    assert eps_rank(s, 0.93) == 3
    assert eps_rank(s, 1.0) == 3


def test_hosvd_recovers_exact_low_rank_tensor_and_ranks():
    g = torch.Generator().manual_seed(1)
    x = _tucker_tensor((6, 5, 7, 8), (2, 3, 4, 3), g)
    core, factors, ranks = hosvd(x, 1.0)
    assert ranks == (2, 3, 4, 3)
    assert core.shape == (2, 3, 4, 3)
    torch.testing.assert_close(tucker_to_tensor(core, factors), x)
    # lower eps -> lower or equal ranks
    assert all(a <= b for a, b in zip(hosvd(x, 0.5)[2], ranks))


def _principal_angle(u, v):
    s = torch.linalg.svdvals(u.t() @ v).clamp(max=1.0)
    return torch.arccos(s.min()).item()


def test_warm_started_subspace_iteration_converges_to_hosvd_subspace():
    g = torch.Generator().manual_seed(2)
    shape, k = (8, 6, 7, 5), 5
    lam = torch.tensor([0.6 ** i for i in range(k)], dtype=D)  # σ_{r+1}/σ_r = 0.6 on every mode
    comps = [torch.linalg.qr(torch.randn(d, k, generator=g, dtype=D))[0] for d in shape]
    x = torch.einsum("k,ak,bk,ck,dk->abcd", lam, *comps)
    ranks = (2, 2, 2, 2)
    _, ref, _ = hosvd(x, 1.0 - 1e-12)
    targets = [unfold(x, m) for m in range(4)]
    ref = [torch.linalg.svd(t, full_matrices=False)[0][:, :2] for t in targets]

    gen = torch.Generator().manual_seed(0)
    factors, angles = None, []
    for _ in range(20):
        _, factors = subspace_iteration(x, ranks, factors, gen)
        angles.append(max(_principal_angle(f, r) for f, r in zip(factors, ref)))
    assert angles[-1] < 1e-3, angles
    assert angles[0] > 1e-2  # one cold step is not enough: warm start is what converges

    cold = []
    for _ in range(20):
        _, f = subspace_iteration(x, ranks, None, gen)
        cold.append(max(_principal_angle(a, r) for a, r in zip(f, ref)))
    # without warm start every call starts afresh: no improvement across calls
    assert min(cold) > 10 * angles[-1]
    assert sum(cold[10:]) / 10 > 0.3 * sum(cold[:10]) / 10


def test_asi_module_warm_start_converges_and_no_reuse_does_not():
    g = torch.Generator().manual_seed(3)
    shape, k = (8, 6, 7, 5), 5
    lam = torch.tensor([0.6 ** i for i in range(k)], dtype=D)
    comps = [torch.linalg.qr(torch.randn(d, k, generator=g, dtype=D))[0] for d in shape]
    x = torch.einsum("k,ak,bk,ck,dk->abcd", lam, *comps)
    ref = [torch.linalg.svd(unfold(x, m), full_matrices=False)[0][:, :2] for m in range(4)]
    conv = nn.Conv2d(6, 3, 3, padding=1).double()
    result = {}
    for warm in (True, False):
        model = nn.Sequential(copy.deepcopy(conv))
        asi_core.patch(model, "asi", num_finetune=1, ranks=2, warm_start=warm, lean=False)
        method = model[0].method
        for _ in range(20):
            model(x).sum().backward()
        result[warm] = max(_principal_angle(u, r) for u, r in zip(method.factors(), ref))
        assert int(method.step) == 20
    assert result[True] < 1e-3
    assert result[False] > 1e-2


# ---------------------------------------------------------------------------------------------
# exact gradients on every conv variant
# ---------------------------------------------------------------------------------------------
def _variant(name, seed=0):
    cin, kw = CONV_VARIANTS[name]
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, **kw).double()
    x = torch.randn(3, cin, 9, 8, dtype=D)
    y = conv(x)
    grad_out = torch.randn_like(y)
    return conv, x, grad_out


@pytest.mark.parametrize("name", list(CONV_VARIANTS))
@pytest.mark.parametrize("method,options", [("asi", dict(ranks=1000)), ("hosvd", dict(eps=1.0)),
                                            ("vanilla", {})])
def test_full_rank_gradients_equal_autograd(name, method, options):
    conv, x, grad_out = _variant(name)
    expect = _reference_grads(conv, x, grad_out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _patched_grads(conv, x, grad_out, method, **options)
    for a, b in zip(got[:3], expect):
        if b is not None:
            _assert_close(a, b)


@pytest.mark.parametrize("name", list(CONV_VARIANTS))
def test_low_rank_weight_gradient_with_square_factors_is_exact(name):
    """eq. 15 path with every mode projected by a full orthogonal factor (nothing skipped)."""
    conv, x, grad_out = _variant(name)
    model = nn.Sequential(copy.deepcopy(conv))
    asi_core.patch(model, "vanilla", num_finetune=1)
    ops = model[0].ops
    xp = ops.prepare(x)
    g = torch.Generator().manual_seed(5)
    factors = [torch.linalg.qr(torch.randn(d, d, generator=g, dtype=D))[0] for d in xp.shape]
    core = tucker_to_tensor(xp, [u.t() for u in factors])
    got = conv2d_weight_grad(core, factors, grad_out, conv.weight.shape, ops.stride, ops.padding,
                             ops.dilation, ops.groups)
    _assert_close(got, _reference_grads(conv, x, grad_out)[1])


@pytest.mark.parametrize("name", ["3x3", "depthwise", "grouped4", "stride2", "same", "7x7_stride2", "dilation2"])
@pytest.mark.parametrize("method", ["asi", "hosvd"])
def test_exactly_low_rank_input_gives_exact_gradient_with_compression(name, method):
    """An input that *is* a rank-(2,2,3,3) Tucker tensor is compressed (factors present, fewer
    stored elements) yet the weight gradient stays exact."""
    conv, _, _ = _variant(name)
    cin = conv.in_channels
    g = torch.Generator().manual_seed(4)
    x = _tucker_tensor((5, cin, 9, 8), (2, 2, 3, 3), g)
    grad_out = torch.randn_like(conv(x))
    options = dict(ranks=(2, 2, 3, 3)) if method == "asi" else dict(eps=1.0)
    gx, gw, gb, layer = _patched_grads(conv, x, grad_out, method, **options)
    ex, ew, eb = _reference_grads(conv, x, grad_out)
    assert layer.last_stats["ranks"] == (2, 2, 3, 3)
    assert layer.last_stats["stored_elements"] == 2 * 2 * 3 * 3 + 5 * 2 + cin * 2 + 9 * 3 + 8 * 3  # eq. 5
    _assert_close(gw, ew)
    _assert_close(gx, ex)
    if eb is not None:
        _assert_close(gb, eb)


def test_channels_last_input():
    conv, x, grad_out = _variant("3x3")
    x = x.to(memory_format=torch.channels_last)
    for method, opts in [("asi", dict(ranks=1000)), ("hosvd", dict(eps=1.0))]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = _patched_grads(conv, x, grad_out, method, **opts)
        for a, b in zip(got[:3], _reference_grads(conv, x, grad_out)):
            _assert_close(a, b)


def test_low_rank_asi_gradient_is_an_approximation_of_bounded_error():
    conv, x, grad_out = _variant("3x3")
    _, gw, _, layer = _patched_grads(conv, x, grad_out, "asi", ranks=2)
    _, ew, _ = _reference_grads(conv, x, grad_out)
    assert layer.last_stats["ranks"] == (2, 2, 2, 2)
    assert layer.last_stats["stored_elements"] == 16 + 2 * (3 + 4 + 9 + 8)
    err = (gw - ew).norm() / ew.norm()
    assert 0 < err < 1.5


# ---------------------------------------------------------------------------------------------
# Linear 2-D / 3-D / 4-D ((B, H, W, C) as torchvision's Swin feeds its MLPs)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 7), (3, 5, 7), (2, 3, 4, 7)])
@pytest.mark.parametrize("method,options", [("asi", dict(ranks=1000)), ("hosvd", dict(eps=1.0)),
                                            ("vanilla", {})])
def test_linear_full_rank_gradients_equal_autograd(shape, method, options):
    torch.manual_seed(0)
    lin = nn.Linear(7, 4).double()
    x = torch.randn(shape, dtype=D)
    grad_out = torch.randn(shape[:-1] + (4,), dtype=D)
    model = nn.Sequential(copy.deepcopy(lin))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        asi_core.patch(model, method, num_finetune=1, layer_type="linear", lean=False, **options)
    xi = x.clone().requires_grad_()
    model(xi).backward(grad_out)
    xr = x.clone().requires_grad_()
    lin(xr).backward(grad_out)
    _assert_close(model[0].weight.grad, lin.weight.grad)
    _assert_close(model[0].bias.grad, lin.bias.grad)
    _assert_close(xi.grad, xr.grad)


@pytest.mark.parametrize("shape,ranks", [((12, 7), (3, 3)), ((4, 6, 7), (2, 3, 2)), ((3, 4, 5, 7), (2, 3, 2, 3))])
def test_linear_low_rank_path_exact_on_low_rank_input(shape, ranks):
    g = torch.Generator().manual_seed(1)
    x = _tucker_tensor(shape, ranks, g)
    grad_out = torch.randn(shape[:-1] + (4,), generator=g, dtype=D)
    core, factors, got_ranks = hosvd(x, 1.0)
    assert got_ranks == ranks
    _assert_close(linear_weight_grad(core, factors, grad_out),
                  grad_out.reshape(-1, 4).t() @ x.reshape(-1, shape[-1]))
    lin = nn.Sequential(nn.Linear(shape[-1], 4).double())
    asi_core.patch(lin, "asi", num_finetune=1, layer_type="linear", ranks=ranks, lean=False)
    lin(x).backward(grad_out)
    _assert_close(lin[0].weight.grad, grad_out.reshape(-1, 4).t() @ x.reshape(-1, shape[-1]))


# ---------------------------------------------------------------------------------------------
# gradient filtering against a direct computation of its formula
# ---------------------------------------------------------------------------------------------
def _gradfilter_reference(conv, x, grad_out, radius):
    """Loops straight from the definition in conv.py."""
    B, C, H, W = x.shape
    _, O, Ho, Wo = grad_out.shape
    (sh, sw), (dh, dw), (kh, kw), (ph, pw) = conv.stride, conv.dilation, conv.kernel_size, conv.padding
    xp = F.pad(x, (pw, pw, ph, ph))
    Ph, Pw = math.ceil(Ho / radius), math.ceil(Wo / radius)
    g_bar = torch.zeros(B, O, Ph, Pw, dtype=x.dtype)
    x_bar = torch.zeros(B, C, Ph, Pw, dtype=x.dtype)
    g_tilde = torch.zeros_like(grad_out)
    for p in range(Ph):
        for q in range(Pw):
            rows = range(p * radius, min((p + 1) * radius, Ho))
            cols = range(q * radius, min((q + 1) * radius, Wo))
            cells = [(i, j) for i in rows for j in cols]
            g_bar[:, :, p, q] = sum(grad_out[:, :, i, j] for i, j in cells) / len(cells)
            x_bar[:, :, p, q] = sum(xp[:, :, sh * i + dh * ((kh - 1) // 2), sw * j + dw * ((kw - 1) // 2)]
                                    for i, j in cells)
            for i, j in cells:
                g_tilde[:, :, i, j] = g_bar[:, :, p, q]
    G = conv.groups
    Cg, Og = C // G, O // G
    dW = torch.zeros_like(conv.weight)
    for o in range(O):
        grp = o // Og
        for c in range(Cg):
            dW[o, c, :, :] = (g_bar[:, o] * x_bar[:, grp * Cg + c]).sum()
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(F.conv2d(xr, conv.weight, None, conv.stride, conv.padding, conv.dilation, G),
                                xr, g_tilde)
    return gx, dW, grad_out.sum((0, 2, 3)), x_bar


@pytest.mark.parametrize("name", ["3x3", "stride2", "depthwise", "grouped4", "dilation2", "1x1", "7x7_stride2"])
@pytest.mark.parametrize("radius", [1, 2, 3])
def test_gradfilter_matches_direct_formula(name, radius):
    conv, x, grad_out = _variant(name)
    gx, gw, gb, layer = _patched_grads(conv, x, grad_out, "gradfilter", radius=radius)
    ex, ew, eb, x_bar = _gradfilter_reference(conv, x, grad_out, radius)
    torch.testing.assert_close(gw, ew)
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gb, eb)
    assert layer.last_stats["stored_elements"] == x_bar.numel()


def test_gradfilter_radius1_on_1x1_conv_is_exact():
    conv, x, grad_out = _variant("1x1")
    got = _patched_grads(conv, x, grad_out, "gradfilter", radius=1)
    for a, b in zip(got[:3], _reference_grads(conv, x, grad_out)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shape", [(7, 5), (2, 7, 5)])
def test_gradfilter_linear_matches_direct_formula(shape):
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).double()
    x = torch.randn(shape, dtype=D)
    grad_out = torch.randn(shape[:-1] + (3,), dtype=D)
    model = nn.Sequential(copy.deepcopy(lin))
    asi_core.patch(model, "gradfilter", num_finetune=1, layer_type="linear", radius=3)
    xi = x.clone().requires_grad_()
    model(xi).backward(grad_out)
    xs, gs = x.reshape((-1,) + shape[-2:]), grad_out.reshape((-1,) + grad_out.shape[-2:])
    dW = torch.zeros(3, 5, dtype=D)
    g_tilde = torch.zeros_like(gs)
    for b in range(xs.shape[0]):
        for start in range(0, shape[-2], 3):
            sl = slice(start, min(start + 3, shape[-2]))
            gbar = gs[b, sl].mean(0)
            dW += torch.outer(gbar, xs[b, sl].sum(0))
            g_tilde[b, sl] = gbar
    torch.testing.assert_close(model[0].weight.grad, dW)
    torch.testing.assert_close(xi.grad, (g_tilde @ lin.weight).reshape(shape))


# ---------------------------------------------------------------------------------------------
# patching API
# ---------------------------------------------------------------------------------------------
def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def test_patch_selects_last_layers_and_freezes_before_first():
    net = _net()
    params = {n: p for n, p in net.named_parameters()}
    names = asi_core.patch(net, "asi", num_finetune=2, ranks=2)
    assert names == ["3", "6"]
    assert [n for n, _ in asi_core.patched_layers(net)] == ["3", "6"]
    assert isinstance(net[3], asi_core.CompressedConv2d) and isinstance(net[3], nn.Conv2d)
    for n, p in net.named_parameters():
        assert p is params[n]  # same Parameter objects
        assert p.requires_grad == (not n.startswith(("0.", "1.")))
    assert asi_core.patch(_net(), "vanilla", num_finetune="all") == ["0", "3", "6"]
    assert asi_core.patch(_net(), "hosvd", layers=["6", "0"], eps=0.9) == ["0", "6"]
    assert asi_core.patch(_net(), "gradfilter", num_finetune=1, layer_type="linear", radius=2) == ["11"]


def test_patch_unpatch_keeps_outputs_parameters_and_eval_equals_plain():
    net = _net().eval()
    plain = copy.deepcopy(net)
    x = torch.randn(4, 3, 8, 8)
    params = [id(p) for p in net.parameters()]
    keys = set(net.state_dict())
    asi_core.patch(net, "asi", num_finetune=3, ranks=2)
    assert keys <= set(net.state_dict())
    net.eval()
    torch.testing.assert_close(net(x), plain(x), rtol=0, atol=0)  # eval == plain layer
    net.train()
    with torch.no_grad():
        torch.testing.assert_close(net[0](x), plain[0](x), rtol=0, atol=0)  # no_grad == plain layer
    net(x).sum().backward()
    plain.train()
    plain(x)  # same BatchNorm running-statistics update as the patched model's training step
    plain.eval()
    names = asi_core.unpatch(net)
    assert names == ["0", "3", "6"]
    assert not asi_core.patched_layers(net)
    assert all(type(m) in (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.AdaptiveAvgPool2d, nn.Flatten,
                           nn.Linear, nn.Sequential) for m in net.modules())
    assert [id(p) for p in net.parameters()] == params
    assert set(net.state_dict()) == keys
    net.eval()
    torch.testing.assert_close(net(x), plain(x), rtol=0, atol=0)


def test_state_dict_round_trip_resumes_warm_start_identically():
    x = torch.randn(4, 3, 8, 8)
    a = _net()
    asi_core.patch(a, "asi", num_finetune=2, ranks=(2, 3, 2, 2))
    a.train()
    for _ in range(3):
        a(x + 0.1 * torch.randn_like(x)).sum().backward()
    state = copy.deepcopy(a.state_dict())
    b = _net()
    asi_core.patch(b, "asi", num_finetune=2, ranks=(2, 3, 2, 2))
    b.load_state_dict(state)
    b.train()
    assert int(b[6].method.step) == 3
    for fa, fb in zip(a[6].method.factors(), b[6].method.factors()):
        assert torch.equal(fa, fb)
    a.zero_grad()
    x2 = torch.randn(4, 3, 8, 8)
    a(x2).sum().backward()
    b(x2).sum().backward()
    for fa, fb in zip(a[6].method.factors(), b[6].method.factors()):
        assert torch.equal(fa, fb)
    torch.testing.assert_close(a[6].weight.grad, b[6].weight.grad, rtol=0, atol=0)
    # a plain (unpatched) checkpoint loads into a patched model: a cold start, not an error
    c = _net()
    asi_core.patch(c, "asi", num_finetune=2, ranks=2)
    c.load_state_dict(_net().state_dict())
    assert int(c[6].method.step) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs(dtype):
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).to(dtype)
    asi_core.patch(net, "asi", num_finetune=2, ranks=2)
    x = torch.randn(2, 3, 8, 8).to(dtype)
    net(x).float().sum().backward()
    assert net[2].weight.grad.dtype == dtype and torch.isfinite(net[2].weight.grad.float()).all()
    assert net[2].method.factor_1.dtype == dtype  # (batch mode 2 is kept whole)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(method="lora", num_finetune=1), "unknown method 'lora'; valid methods: ['vanilla', 'gradfilter', 'hosvd', 'asi', 'gradfilter_paper']"),
    (dict(method="asi", num_finetune=1, ranks=0), "layer '6': asi ranks must be integers >= 1, got 0"),
    (dict(method="asi", num_finetune=1, ranks=(2, 0, 2, 2)), "layer '6': asi ranks must be integers >= 1, got (2, 0, 2, 2)"),
    (dict(method="hosvd", num_finetune=1, eps=0.0), "layer '6': hosvd eps must be in (0, 1], got 0.0"),
    (dict(method="hosvd", num_finetune=1, eps=1.5), "layer '6': hosvd eps must be in (0, 1], got 1.5"),
    (dict(method="gradfilter", num_finetune=1, radius=0), "layer '6': gradfilter radius must be an integer >= 1, got 0"),
    (dict(method="asi", num_finetune=4), "num_finetune=4 is larger than the number of conv layers in the model (3)"),
    (dict(method="asi", layers=["6", "nope"]), "layer(s) ['nope'] not found"),
    (dict(method="asi", num_finetune=2, ranks=[(2, 2, 2, 2)]), "got 1 per-layer rank tuples for 2 patched layers"),
    (dict(method="asi", num_finetune=1, eps=0.8), "method 'asi' does not take option(s) ['eps']"),
])
def test_bad_input_messages(kwargs, message):
    with pytest.raises(ValueError) as err:
        asi_core.patch(_net(), **kwargs)
    assert message in str(err.value)


def test_non_4d_input_to_conv_wrapper_and_large_ranks_are_clipped():
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    asi_core.patch(net, "asi", num_finetune=1, ranks=50)
    with pytest.raises(ValueError, match=r"layer '0': expected a 4-D \(B, C, H, W\) input, got shape \(3, 8, 8\)"):
        net(torch.randn(3, 8, 8))
    with pytest.warns(UserWarning, match=r"clipped to \(2, 3, 8, 8\)"):
        net(torch.randn(2, 3, 8, 8)).sum().backward()
    assert net[0].last_stats["ranks"] == (2, 3, 8, 8)


def test_double_patch_is_refused():
    net = _net()
    asi_core.patch(net, "asi", num_finetune=1)
    with pytest.raises(ValueError, match="already patched"):
        asi_core.patch(net, "asi", num_finetune=1)


def test_core_contraction_order_is_cheapest():
    """project_core's order against brute force over all orders, with the cost model of mode_product."""
    import itertools
    import random
    from asi_core.decompose import project_core

    def cost(dims, ranks, order):
        size, total = math.prod(dims), 0
        for m in order:
            total += size // dims[m] * ranks[m] * dims[m]
            size = size // dims[m] * ranks[m]
        return total

    rng = random.Random(0)
    for _ in range(300):
        dims = [rng.choice([1, 2, 3, 7, 8, 14, 64, 128]) for _ in range(4)]
        ranks = [rng.randint(1, d) for d in dims]
        factors = [torch.zeros(d, r) if r < d else None for d, r in zip(dims, ranks)]
        modes = [m for m in range(4) if factors[m] is not None]
        calls = []  # the order project_core uses is the order of its mode products: record it
        import asi_core.decompose as dec
        orig = dec.mode_product
        dec.mode_product = lambda x, u, m, transpose=False: (calls.append(m), orig(x, u, m, transpose))[1]
        try:
            project_core(torch.zeros(dims), factors)
        finally:
            dec.mode_product = orig
        best = min(cost(dims, ranks, p) for p in itertools.permutations(modes))
        assert cost(dims, ranks, calls) == best, (dims, ranks, calls)


@pytest.mark.parametrize("shape,ranks", [((6, 5, 4, 3), (2, 2, 2, 2)),      # H·W small: Gram path
                                         ((5, 3, 9, 10), (2, 3, 2, 4)),     # H·W large: per-mode path
                                         ((7, 4, 6, 6), (7, 2, 1, 6)),      # some modes kept whole
                                         ((9, 3, 12, 11), (3, 1, 2, 2))])
def test_warm_step_equals_algorithm_1_on_unfoldings(shape, ranks, monkeypatch):
    """The fused warm-start products equal Alg. 1 computed literally: U = orth(A_m (A_mᵀ U_prev))."""
    import asi_core.decompose as dec
    monkeypatch.setattr(dec, "CPU_CHUNK_BYTES", 8 * 5 * 4 * 3)  # several chunks, last one partial
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g, dtype=D)
    prev = [torch.linalg.qr(torch.randn(d, r, generator=g, dtype=D))[0] if r < d else None
            for d, r in zip(shape, ranks)]
    core, factors = subspace_iteration(x.to(memory_format=torch.channels_last), ranks, prev)
    for m, (u_prev, u) in enumerate(zip(prev, factors)):
        if u_prev is None:
            assert u is None
            continue
        a = unfold(x, m)
        expect = orthonormalize(a @ (a.t() @ u_prev))
        torch.testing.assert_close(u, expect)
    full = [u if u is not None else torch.eye(d, dtype=D) for u, d in zip(factors, shape)]
    torch.testing.assert_close(core, tucker_to_tensor(x, [u.t() for u in full]))


def test_batch_mode_cold_restart_when_batch_size_changes():
    """The last, smaller batch of an epoch cannot reuse the batch factor: that mode restarts cold,
    the others stay warm."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(8, 5, 4, 4, generator=g, dtype=D)
    _, f = subspace_iteration(x, (2, 2, 2, 2), None, g)
    small = x[:5]
    _, f2 = subspace_iteration(small, (2, 2, 2, 2), f, torch.Generator().manual_seed(0))
    assert f2[0].shape == (5, 2)
    a = unfold(small, 1)
    torch.testing.assert_close(f2[1], orthonormalize(a @ (a.t() @ f[1])))


@pytest.mark.parametrize("method,options", [("asi", dict(ranks=1000)), ("hosvd", dict(eps=1.0)),
                                            ("gradfilter", dict(radius=1)), ("vanilla", {})])
def test_mixed_precision_autocast_matches_plain_autocast(method, options):
    """Under torch.autocast (Lightning's bf16-mixed) a patched layer computes in the autocast dtype,
    as the plain conv does, and returns gradients in the parameters' own dtype (float32)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 1)
    x = torch.randn(3, 4, 5, 5)
    plain, patched = nn.Sequential(copy.deepcopy(conv)), nn.Sequential(copy.deepcopy(conv))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        asi_core.patch(patched, method, num_finetune=1, lean=False, **options)
    grads = []
    for net in (plain, patched):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(xi)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        assert net[0].weight.grad.dtype == torch.float32 and xi.grad.dtype == torch.float32
        grads.append((xi.grad, net[0].weight.grad, net[0].bias.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
