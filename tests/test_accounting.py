"""asi_core.accounting: every formula on a small case computed by hand, FlopCounterMode agreement,
and the paper's Table 1 vanilla/gradfilter numbers reproduced from geometry alone."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from asi_core import accounting as acc
from asi_core.accounting import ConvGeometry, LinearGeometry

# Hand case: B=2, C=3, H=W=4, C'=5, 3x3 kernel. Input 2*3*4*4 = 96 elements.
S1 = ConvGeometry(3, 5, 3, stride=1, padding=1, input_shape=(2, 3, 4, 4))   # -> (2, 5, 4, 4)
S2 = ConvGeometry(3, 5, 3, stride=2, padding=1, input_shape=(2, 3, 4, 4))   # -> (2, 5, 2, 2)
DW = ConvGeometry(3, 3, 3, padding=1, groups=3, input_shape=(2, 3, 4, 4))   # depthwise -> (2, 3, 4, 4)
RANKS = (1, 2, 2, 3)


def test_geometry_output_shapes():
    assert S1.output_shape == (2, 5, 4, 4)
    assert S2.output_shape == (2, 5, 2, 2)  # floor((4 + 2 - 2 - 1) / 2) + 1
    assert ConvGeometry(3, 5, 3, padding="valid", input_shape=(2, 3, 4, 4)).output_shape == (2, 5, 2, 2)
    assert ConvGeometry(3, 5, 3, padding="same", input_shape=(2, 3, 4, 4)).output_shape == (2, 5, 4, 4)
    assert ConvGeometry(3, 5, 3, dilation=2, padding=1, input_shape=(2, 3, 6, 6)).output_shape == (2, 5, 4, 4)
    with pytest.raises(ValueError, match="groups"):
        ConvGeometry(3, 5, 3, groups=3, input_shape=(2, 3, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        ConvGeometry(4, 5, 3, input_shape=(2, 3, 4, 4))


def test_geometry_from_plain_and_wrapper_like_layers():
    conv = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1)
    assert acc.geometry_from_layer(conv, input_shape=(2, 3, 4, 4)) == S2
    with pytest.raises(ValueError, match="last_stats"):
        acc.geometry_from_layer(conv)

    class Wrapper(torch.nn.Conv2d):  # duck-typed stand-in for asi_core.layers.CompressedConv2d
        method_name = "asi"
        options = {"ranks": 2}
        last_stats = {"method": "asi", "input_shape": (2, 3, 4, 4), "output_shape": (2, 5, 4, 4),
                      "ranks": RANKS, "stored_elements": 40}

    w = Wrapper(3, 5, 3, padding=1)
    assert acc.geometry_from_layer(w) == S1
    rep = acc.report_from_layer(w, input_requires_grad=False)
    assert rep["ranks"] == RANKS and rep["memory_elements"] == rep["stored_elements"] == 40
    assert rep["input_grad_flops"] == 0 and rep["backward_flops"] == 2014

    lin = torch.nn.Linear(4, 3)
    assert acc.geometry_from_layer(lin, input_shape=(2, 6, 4)).output_shape == (2, 6, 3)


def test_vanilla_memory_and_flops_by_hand():
    r = acc.layer_report("vanilla", S1)
    assert r["memory_elements"] == 96 and r["memory_mib"] == 96 * 4 / 2 ** 20
    assert r["forward_flops"] == 9 * 3 * 5 * 2 * 16 == 4320
    assert r["backward_flops"] == 4320 and r["input_grad_flops"] == 4320
    assert r["paper_forward_flops"] == 4320  # stride 1, same padding: eq. 17 is right here
    assert r["overhead_flops"] == r["core_flops"] == 0 and r["ranks"] is None
    assert acc.layer_report("vanilla", S1, dtype_bytes=2)["memory_mib"] == 96 * 2 / 2 ** 20


def test_strided_conv_forward_uses_output_size():
    r = acc.layer_report("vanilla", S2)
    assert r["forward_flops"] == 9 * 3 * 5 * 2 * 4 == 1080
    assert r["paper_forward_flops"] == 9 * 3 * 5 * 2 * 16 == 4320  # eq. 17: input H*W, 4x too many
    assert r["backward_flops"] == r["paper_backward_flops"] == 1080  # eq. 16 uses H'*W' already


def test_depthwise_conv_divides_by_groups():
    r = acc.layer_report("vanilla", DW)
    assert r["forward_flops"] == 9 * 1 * 3 * 2 * 16 == 864
    assert r["paper_forward_flops"] == r["paper_backward_flops"] == 9 * 3 * 3 * 2 * 16 == 2592
    assert r["backward_flops"] == 864


def test_gradfilter_by_hand():
    r = acc.layer_report("gradfilter", S1, radius=2)  # 2x2 patches of the 4x4 output grid: P = 2*4
    assert r["memory_elements"] == 3 * 2 * 4 == 24
    assert r["backward_flops"] == 5 * 3 * 2 * 4 == 120
    assert r["overhead_flops"] == 2 * 3 * 16 + 2 * 5 * 16 == 256  # centre samples + gradient entries
    r = acc.layer_report("gradfilter", S2, radius=2)  # 2x2 output grid: 1 patch (= ceil(4 / (2*2))^2)
    assert r["memory_elements"] == 6 and r["backward_flops"] == 30
    assert r["overhead_flops"] == 2 * 3 * 4 + 2 * 5 * 4 == 64  # stride 2: only H'*W' centre samples
    r = acc.layer_report("gradfilter", S1, radius=3)  # ceil(4/3) = 2 per side, last patch partial
    assert r["memory_elements"] == 24
    r = acc.layer_report("gradfilter", DW, radius=2)
    assert r["backward_flops"] == 3 * 1 * 8 == 24
    # the authors' count: 2 B C' H'W'/R^2 + C' C (K-1) + K C C' B H W (input size, groups ignored)
    assert r["paper_backward_flops"] == 2 * 2 * 3 * 16 // 4 + 3 * 3 * 8 + 9 * 3 * 3 * 2 * 16
    for bad in (None, 0, True):
        with pytest.raises(ValueError, match="radius"):
            acc.layer_report("gradfilter", S1, radius=bad)
    # Linear: rows (2-D) or tokens (3-D) pooled in patches of R
    r = acc.layer_report("gradfilter", LinearGeometry(4, 3, (6, 4)), radius=2)  # P = ceil(6/2)
    assert (r["memory_elements"], r["backward_flops"], r["overhead_flops"]) == (4 * 3, 3 * 4 * 3, 24 + 18)
    r = acc.layer_report("gradfilter", LinearGeometry(4, 5, (2, 3, 4)), radius=2)  # P = 2*ceil(3/2)
    assert (r["memory_elements"], r["backward_flops"], r["overhead_flops"]) == (4 * 4, 5 * 4 * 4, 24 + 30)


def test_eq5_memory():
    assert acc.tucker_elements(S1.input_shape, RANKS) == 1 * 2 * 2 * 3 + (2 * 1 + 3 * 2 + 4 * 2 + 4 * 3) == 40
    # batch mode kept whole (r = B = 2): no factor stored; eq. 5 read literally would add 2*2
    assert acc.tucker_elements(S1.input_shape, (2, 2, 2, 3)) == 24 + 6 + 8 + 12 == 50
    assert acc.tucker_elements(S1.input_shape, (2, 2, 2, 3), count_whole_modes=True) == 54
    assert acc.clip_ranks(S1.input_shape, 7) == (2, 3, 4, 4)  # int -> every mode, clipped to D_m
    assert acc.clip_ranks((2, 100), (2, 50)) == (2, 2)  # r <= prod(D) / D_m
    assert acc.layer_report("asi", S1, ranks=RANKS)["memory_elements"] == 40


def test_eq11_hosvd_overhead():
    # prod = 96; d=2: 48^2*2; d=3: 32^2*3; d=4 (twice): 24^2*4
    assert acc.hosvd_overhead_flops((2, 3, 4, 4)) == 4608 + 3072 + 2 * 2304 == 12288
    r = acc.layer_report("hosvd", S1, ranks=RANKS, eps=0.8)
    assert r["overhead_flops"] == 12288 and r["eps"] == 0.8
    with pytest.raises(ValueError, match="ranks"):
        acc.layer_report("hosvd", S1, eps=0.8)


def test_eq14_asi_overhead_and_core():
    assert acc.asi_overhead_flops((2, 3, 4, 4), RANKS) == 2 * 96 * (1 + 2 + 2 + 3) + (1 + 8 + 8 + 27) == 1580
    assert acc.asi_overhead_flops((2, 3, 4, 4), (2, 2, 2, 3)) == 2 * 96 * 7 + 8 + 8 + 27  # B kept whole
    # cheapest core order B, H, C, W: 96*1 + 48*2 + 24*2 + 16*3 (B, C, H, W would be 304)
    assert acc.core_flops((2, 3, 4, 4), RANKS) == 96 + 96 + 48 + 48 == 288
    assert acc.core_flops((2, 3, 4, 4), (2, 3, 4, 4)) == 0
    r = acc.layer_report("asi", S1, ranks=RANKS)
    assert r["overhead_flops"] == 1580 and r["core_flops"] == 288


def test_eq15_lowrank_weight_grad():
    # Z 1*2*5*16 + Y 1*2*2*3*4 + 1*2*3*4*4 + conv 1*2*5*16*9 + channel 2*5*3*9
    assert acc.weight_grad_flops("asi", S1, RANKS) == 160 + 48 + 96 + 1440 + 270 == 2014
    assert acc.paper_weight_grad_flops("asi", S1, RANKS) == 2014
    # strided: Z and the conv on the 2x2 output grid, Y on the 4x4 input grid
    assert acc.weight_grad_flops("hosvd", S2, RANKS) == 40 + 48 + 96 + 360 + 270 == 814
    # depthwise: channel term per group 2*3*(3/3)*9; the paper's 2*3*3*9
    assert acc.weight_grad_flops("asi", DW, RANKS) == 96 + 48 + 96 + 864 + 54 == 1158
    assert acc.paper_weight_grad_flops("asi", DW, RANKS) == 96 + 48 + 96 + 864 + 162 == 1266
    # channel mode kept whole: grouped conv of Y (r1, C, H, W) with Z, no channel product
    assert acc.weight_grad_flops("asi", DW, (1, 3, 2, 3)) == 96 + 72 + 144 + 1 * 1 * 3 * 16 * 9
    # every mode whole: exactly vanilla
    assert acc.weight_grad_flops("asi", DW, (2, 3, 4, 4)) == acc.weight_grad_flops("vanilla", DW)


def test_linear_by_hand():
    g2 = LinearGeometry(4, 3, (6, 4))
    r = acc.layer_report("asi", g2, ranks=(2, 3))
    assert r["forward_flops"] == r["paper_forward_flops"] == 6 * 4 * 3 == 72
    assert acc.layer_report("vanilla", g2)["memory_elements"] == 24
    assert r["memory_elements"] == 6 + 6 * 2 + 4 * 3 == 30
    assert r["backward_flops"] == 2 * 6 * 3 + 3 * 2 * 3 + 3 * 3 * 4 == 90
    assert r["overhead_flops"] == 2 * 24 * (2 + 3) + 8 + 27
    g3 = LinearGeometry(4, 5, (2, 3, 4))
    r = acc.layer_report("asi", g3, ranks=(1, 2, 3), input_requires_grad=False)
    assert r["memory_elements"] == 6 + 2 + 6 + 12 == 26
    # G (2,3,5) x_0 U0^T: 30*1; (1,3,5) x_1 U1^T: 15*2; contract 5*(1*2)*3; expand 5*3*4
    assert r["backward_flops"] == 30 + 30 + 30 + 60 == 150
    assert r["input_grad_flops"] == 0 and r["output_shape"] == (2, 3, 5)


CONV_VARIANTS = [  # (C, C', k, stride, padding, dilation, groups, H)
    (3, 5, 3, 1, 1, 1, 1, 6), (3, 5, 3, 2, 1, 1, 1, 7), (4, 6, 3, 1, 2, 2, 1, 6),
    (4, 6, (3, 1), (2, 1), (1, 0), 1, 2, 5), (6, 6, 3, 1, 1, 1, 6, 6), (6, 12, 5, 2, 0, 1, 3, 9),
]


def _addmm_inplace(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]  # FlopCounterMode counts addmm but not in-place addmm_


def _flops(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_inplace}) as fc:
        fn()
    return fc.get_total_flops() // 2  # FlopCounterMode counts 2 FLOPs per multiply-add


@pytest.mark.parametrize("c,cp,k,s,p,d,g,h", CONV_VARIANTS)
def test_conv_counts_match_flop_counter(c, cp, k, s, p, d, g, h):
    x = torch.randn(2, c, h, h + 1)
    conv = torch.nn.Conv2d(c, cp, k, stride=s, padding=p, dilation=d, groups=g)
    geo = acc.geometry_from_layer(conv, input_shape=tuple(x.shape))
    with torch.no_grad():
        assert tuple(conv(x).shape) == geo.output_shape
        assert _flops(lambda: conv(x)) == acc.forward_flops(geo)

    y = conv(x)  # input needs no grad: the backward is the weight gradient only
    gy = torch.randn_like(y)
    wgrad = _flops(lambda: y.backward(gy))
    if g == 1:
        assert wgrad == acc.weight_grad_flops("vanilla", geo)
    else:
        # torch's formula ignores groups for the weight gradient; count it group by group instead
        cg, cpg = c // g, cp // g
        per_group = sum(_flops(lambda i=i: torch.ops.aten.convolution_backward(
            gy[:, i * cpg:(i + 1) * cpg], x[:, i * cg:(i + 1) * cg], conv.weight[i * cpg:(i + 1) * cpg],
            None, conv.stride, conv.padding, conv.dilation, False, (0, 0), 1, (False, True, False)))
            for i in range(g))
        assert per_group == acc.weight_grad_flops("vanilla", geo)

    xr = x.clone().requires_grad_(True)
    yr = conv(xr)
    both = _flops(lambda: yr.backward(gy))
    assert both - wgrad == acc.input_grad_flops(geo)  # grad_input counted with groups by torch


def test_eq15_count_matches_lowrank_implementation():
    lowrank = pytest.importorskip("asi_core.lowrank")
    for geo, ranks in ((S1, RANKS), (S2, RANKS), (DW, RANKS), (S1, (1, 3, 2, 3)), (S2, (2, 3, 4, 4))):
        dims = geo.input_shape
        r = acc.clip_ranks(dims, ranks)
        core = torch.randn(r)
        factors = [None if rm >= dm else torch.randn(dm, rm) for dm, rm in zip(dims, r)]
        gy = torch.randn(geo.output_shape)
        wshape = (geo.out_channels, geo.channels_per_group) + geo.kernel_size
        n = _flops(lambda: lowrank.conv2d_weight_grad(core, factors, gy, wshape, geo.stride, geo.padding,
                                                      geo.dilation, geo.groups))
        # (a whole channel mode on a grouped conv is left out: torch's weight-gradient formula
        # ignores groups, see test_conv_counts_match_flop_counter)
        assert n == acc.weight_grad_flops("asi", geo, ranks), (geo, ranks)
    for geo, ranks in ((LinearGeometry(4, 3, (6, 4)), (2, 3)), (LinearGeometry(4, 5, (2, 3, 4)), (1, 2, 3))):
        r = acc.clip_ranks(geo.input_shape, ranks)
        factors = [torch.randn(dm, rm) for dm, rm in zip(geo.input_shape, r)]
        core, gy = torch.randn(r), torch.randn(geo.output_shape)
        n = _flops(lambda: lowrank.linear_weight_grad(core, factors, gy))
        assert n == acc.weight_grad_flops("asi", geo, ranks)


def test_core_flops_is_the_cheapest_order():
    """Measure every order of the mode products with FlopCounterMode: the minimum is ours."""
    from itertools import permutations
    dims, ranks = (8, 6, 5, 7), (2, 5, 1, 3)
    x = torch.randn(dims)
    us = [torch.randn(d, r) for d, r in zip(dims, ranks)]

    def project(order):
        y = x
        for m in order:
            y = torch.tensordot(y, us[m], dims=([m], [0])).movedim(-1, m)
        return y

    costs = {order: _flops(lambda order=order: project(order)) for order in permutations(range(4))}
    assert acc.core_flops(dims, ranks) == min(costs.values())
    assert len(set(costs.values())) > 1  # the order matters here


def test_paper_table1_vanilla_and_gradfilter_from_geometry():
    """MobileNetV2 / ResNet-18 at batch 64, 224 px: Table 1's memory (MiB) and vanilla GFLOPs are
    eq. 5-style counts and eq. 17 + eq. 16 as written."""
    for geos, mem, gf_mem, gflops in ((acc._mbv2_last4(), (15.31, 28.71), (5.00, 9.38), (4.50, 57.48)),
                                      (acc._resnet18_last4(), (12.25, 30.63), (4.00, 7.00), (29.60, 46.45))):
        for i, n in enumerate((2, 4)):
            v = acc.summarize([acc.layer_report("vanilla", geo) for geo in geos[-n:]])
            f = acc.summarize({str(j): acc.layer_report("gradfilter", geo, radius=2)
                               for j, geo in enumerate(geos[-n:])})
            assert v["activation_mib"] == pytest.approx(mem[i], abs=0.0051)  # table rounds to 2 places
            assert f["activation_mib"] == pytest.approx(gf_mem[i], abs=0.0051)
            assert v["paper_gflops"] == pytest.approx(gflops[i], abs=0.0051)
    ex = acc.worked_example()
    assert round(ex["mbv2_vanilla_4"]["correct"], 2) == 5.51
    assert round(ex["resnet18_vanilla_4"]["correct"], 2) == 45.21
    assert round(ex["mbv2_depthwise"]["paper_forward"], 3) == 26.011
    assert round(ex["mbv2_depthwise"]["forward"], 3) == 0.027
    assert round(ex["resnet18_downsample"]["paper_forward"], 3) == 1.644
    assert round(ex["resnet18_downsample"]["forward"], 3) == 0.411
    assert round(ex["resnet18_conv_s2"]["paper_forward"], 3) == 14.798
    assert round(ex["resnet18_conv_s2"]["forward"], 3) == 3.699
    assert round(ex["mbv2_depthwise_asi"]["paper_weight_grad"], 3) == 0.172
    assert round(ex["mbv2_depthwise_asi"]["weight_grad"], 3) == 0.039
    # HOSVD columns = eq. 17 + eq. 11 + a small rank-dependent eq. 15 backward
    assert round(acc.hosvd_overhead_flops((64, 512, 7, 7)) / 1e9, 1) == 781.9
    for geos, n, table in ((acc._resnet18_last4(), 2, 1581.42), (acc._resnet18_last4(), 4, 4048.56),
                           (acc._mbv2_last4(), 2, 3049.71), (acc._mbv2_last4(), 4, 5895.31)):
        fixed = sum(acc.paper_forward_flops(g) + acc.hosvd_overhead_flops(g.input_shape) for g in geos[-n:])
        assert 0 < table - fixed / 1e9 < 5


def test_summarize_totals():
    reps = [acc.layer_report("asi", S1, ranks=RANKS, input_requires_grad=False),
            acc.layer_report("vanilla", S2)]
    s = acc.summarize(reps)
    assert s["num_layers"] == 2 and s["activation_elements"] == 40 + 96
    assert math.isclose(s["activation_mib"], 136 * 4 / 2 ** 20)
    assert math.isclose(s["forward_gflops"], (4320 + 1080) / 1e9)
    assert math.isclose(s["backward_gflops"], (2014 + 1080) / 1e9)
    assert math.isclose(s["overhead_gflops"], 1580 / 1e9)
    assert math.isclose(s["core_gflops"], 288 / 1e9)
    assert math.isclose(s["input_grad_gflops"], 1080 / 1e9)
    assert math.isclose(s["total_gflops"], (5400 + 3094 + 1580 + 288 + 1080) / 1e9)
    assert math.isclose(s["paper_gflops"], (4320 + 4320 + 2014 + 1080 + 1580) / 1e9)
    with pytest.raises(ValueError, match="unknown method"):
        acc.layer_report("lora", S1)


@pytest.mark.parametrize("method,opts", [("vanilla", {}), ("gradfilter", {"radius": 2}),
                                         ("hosvd", {"eps": 0.8}), ("asi", {"ranks": (1, 2, 3, 3)})])
def test_reports_match_patched_layers(method, opts):
    """On real wrappers: our memory is the wrapper's stored_elements, and the measured backward is
    exactly weight-gradient + input-gradient MACs (first layer: no input gradient)."""
    asi_core = pytest.importorskip("asi_core")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1),
                                torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False))
    asi_core.patch(model, method, num_finetune="all", **opts)
    model.train()
    # H*W > asi_core.decompose.SMALL_SPATIAL (64): ASI's warm step takes the per-mode products of Alg. 1
    # (eq. 14), not the H*W Gram matrix it uses for small spatial modes (another count, same math)
    x = torch.randn(2, 3, 9, 9)
    model(x).sum().backward()  # ASI: the next step is warm-started, as eq. 14 assumes
    out = {}
    fwd = _flops(lambda: out.setdefault("y", model(x)))
    bwd = _flops(lambda: out["y"].backward(torch.ones_like(out["y"])))
    reps = [acc.report_from_layer(w, input_requires_grad=i > 0)
            for i, (_, w) in enumerate(asi_core.patched_layers(model))]
    for r in reps:
        assert r["memory_elements"] == r["stored_elements"]
    assert bwd == sum(r["backward_flops"] + r["input_grad_flops"] for r in reps)
    forward = sum(r["forward_flops"] for r in reps)
    if method in ("vanilla", "gradfilter"):  # pooling is not a FlopCounterMode op
        assert fwd == forward
    if method == "asi":  # QR is not counted: eq. 14 without r^3, plus the core in the cheapest order
        eq14_products = sum(r["overhead_flops"] - sum(k ** 3 for k in r["ranks"]) for r in reps)
        assert fwd - forward - eq14_products == sum(r["core_flops"] for r in reps)
