"""gradfilter_paper equals a direct re-derivation of the authors' gradient-filter formula
(their classification/custom_op/conv2d/conv_avg.py, Conv2dAvgOp), written here as literal loops."""
import math

import pytest
import torch
from torch import nn

import asi_core


def reference(x, weight, grad_y, stride, radius, depthwise):
    """The authors' formula, read off their op and re-written as loops over patches:

    P = ceil(H'/R) patches per dim; input patches of (R·s) pixels, the input zero-padded by
    ceil((P·R·s − H)/2); x̄[b,c,i,j] = sum of the input patch (i, j).
    The output gradient is padded by ceil((P·R − H')/2) and ḡ[b,o,i,j] = mean of the *valid* entries of patch (i, j).
    W̄[o,c] = Σ_taps W[o,c]. dW[o,c,:,:] = Σ_{b,i,j} ḡ[b,o,i,j] x̄[b,c,i,j] (depthwise: c = o).
    dx[b,c,y,x] = Σ_o W̄[o,c] ḡ[b,o,i(y),j(x)] (depthwise: W̄[c] ḡ[b,c]) with (i(y), j(x)) the input patch
    holding (y, x). db = Σ grad_y.
    """
    B, C, H, W = x.shape
    Co = weight.shape[0]
    h, w = grad_y.shape[-2:]
    ph, pw = math.ceil(h / radius), math.ceil(w / radius)
    kh, kw = radius * stride, radius * stride
    xph, xpw = math.ceil((ph * kh - H) / 2), math.ceil((pw * kw - W) / 2)
    gph, gpw = math.ceil((ph * radius - h) / 2), math.ceil((pw * radius - w) / 2)
    x_sum = torch.zeros(B, C, ph, pw, dtype=x.dtype)
    g_avg = torch.zeros(B, Co, ph, pw, dtype=x.dtype)
    for i in range(ph):
        for j in range(pw):
            for u in range(kh):
                for v in range(kw):
                    yy, xx = i * kh + u - xph, j * kw + v - xpw
                    if 0 <= yy < H and 0 <= xx < W:
                        x_sum[:, :, i, j] += x[:, :, yy, xx]
            n = 0
            for u in range(radius):
                for v in range(radius):
                    yy, xx = i * radius + u - gph, j * radius + v - gpw
                    if 0 <= yy < h and 0 <= xx < w:
                        g_avg[:, :, i, j] += grad_y[:, :, yy, xx]
                        n += 1
            g_avg[:, :, i, j] /= n
    w_sum = weight.sum((2, 3))
    dw = torch.zeros_like(weight)
    gx_sum = torch.zeros(B, C, ph, pw, dtype=x.dtype)
    for o in range(Co):
        if depthwise:
            dw[o, 0] = (g_avg[:, o] * x_sum[:, o]).sum()
            gx_sum[:, o] = w_sum[o, 0] * g_avg[:, o]
        else:
            for c in range(C):
                dw[o, c] = (g_avg[:, o] * x_sum[:, c]).sum()
                gx_sum[:, c] += w_sum[o, c] * g_avg[:, o]
    dx = torch.zeros_like(x)
    for yy in range(H):
        for xx in range(W):
            dx[:, :, yy, xx] = gx_sum[:, :, (yy + xph) // kh, (xx + xpw) // kw]
    return dw, dx, grad_y.sum((0, 2, 3))


CASES = [  # (in_hw, kernel, stride, padding, radius, depthwise)
    (7, 3, 1, 1, 2, False),    # 7x7 output, R2
    (14, 3, 1, 1, 2, False),   # 14x14 output
    (14, 3, 1, 1, 4, False),   # R4
    (7, 3, 1, 1, 4, False),
    (14, 3, 2, 1, 2, False),   # stride 2 -> 7x7
    (28, 3, 2, 1, 2, False),   # stride 2 -> 14x14
    (28, 3, 2, 1, 4, False),
    (14, 1, 2, 0, 2, False),   # ResNet downsample: 1x1 stride 2
    (7, 3, 1, 1, 2, True),     # depthwise 7x7
    (14, 5, 2, 2, 4, True),    # depthwise 5x5 stride 2
]


@pytest.mark.parametrize("hw,k,s,p,radius,depthwise", CASES)
def test_equals_the_authors_formula(hw, k, s, p, radius, depthwise):
    torch.manual_seed(hw * 100 + k * 10 + s + radius)
    C, Co = (3, 3) if depthwise else (3, 4)
    conv = nn.Conv2d(C, Co, k, stride=s, padding=p, groups=C if depthwise else 1).double()
    x = torch.randn(2, C, hw, hw, dtype=torch.float64, requires_grad=True)
    net = nn.Sequential(conv)
    asi_core.patch(net, "gradfilter_paper", num_finetune=1, radius=radius)
    y = net(x)
    assert torch.allclose(y, nn.functional.conv2d(x, conv.weight, conv.bias, s, p, groups=conv.groups), atol=0, rtol=1e-13)
    g = torch.randn_like(y)
    y.backward(g)
    dw, dx, db = reference(x.detach(), conv.weight.detach(), g, s, radius, depthwise)
    wrapper = net[0]
    torch.testing.assert_close(wrapper.weight.grad, dw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(wrapper.bias.grad, db, rtol=1e-12, atol=1e-12)
    # what it keeps: the input-patch sums, B*C*ceil(H'/R)^2 elements
    ph = math.ceil(y.shape[-1] / radius)
    assert wrapper.last_stats["stored_elements"] == 2 * C * ph * ph


def test_differs_from_ours_on_7x7_and_stride_2():
    """The two filters are different algorithms (alignment, strided input patch, input gradient)."""
    for hw, s in ((7, 1), (14, 2)):
        torch.manual_seed(0)
        grads = {}
        for method in ("gradfilter", "gradfilter_paper"):
            net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=s, padding=1)).double()
            torch.manual_seed(1)
            nn.init.normal_(net[0].weight)
            x = torch.randn(2, 3, hw, hw, dtype=torch.float64, generator=torch.Generator().manual_seed(2),
                            requires_grad=True)
            asi_core.patch(net, method, num_finetune=1, radius=2)
            net(x).pow(2).sum().backward()
            grads[method] = (net[0].weight.grad.clone(), x.grad.clone())
        assert not torch.allclose(grads["gradfilter"][0], grads["gradfilter_paper"][0])
        assert not torch.allclose(grads["gradfilter"][1], grads["gradfilter_paper"][1])


def test_conv_only_and_geometry_errors():
    net = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="gradfilter_paper"):  # layer_types = ("conv",): refused by patch
        asi_core.patch(net, "gradfilter_paper", num_finetune=1, layer_type="linear", radius=2)
    # a valid 7x7 kernel on a 7x7 input: 1 output pixel, the authors' input padding would be negative
    net = nn.Sequential(nn.Conv2d(2, 2, 7))
    asi_core.patch(net, "gradfilter_paper", num_finetune=1, radius=2)
    with pytest.raises(ValueError, match="use --model.method gradfilter"):
        net(torch.randn(1, 2, 7, 7))


def _authors_gflops(geos, radius=2):
    """Their get_activation_size for a Conv2dAvg layer, re-written from its terms (H, W input; h, w output)."""
    total = 0.0
    for g in geos:
        B, C, H, W = g.input_shape
        _, Cp, h, w = g.output_shape
        KH, KW = g.kernel_size
        R = radius
        fw = (H / R) * (W / R) * (R ** 2 - 1) * C * B + KH * KW * C * Cp * B * H * W
        bw = B * Cp * (h / R) * (w / R) + Cp * C * (KH * KW - 1) + B * Cp * (h / R) * (w / R) + KH * KW * C * Cp * B * H * W
        total += fw + bw
    return total / 1e9


def _last4_geometries(backbone):
    """The last 4 convs of our model-zoo network at batch 64, 224 px (all at 7x7 or 14x14 -> 7x7)."""
    from classification.backbones import create_model
    from asi_core.accounting import ConvGeometry

    net = create_model(backbone, 1000, pretrained=False)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)][-4:]
    geos = []
    for m in convs:
        hw = 14 if m.stride == (2, 2) else 7
        geos.append(ConvGeometry(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                                 m.groups, input_shape=(64, m.in_channels, hw, hw)))
    return geos


@pytest.mark.parametrize("backbone,table", [("mcunet", (19.31, 19.89)), ("resnet18", (29.60, 47.70)),
                                             ("mobilenet_v2", (4.50, 57.50))])
def test_paper_gflops_reproduce_table1_gradient_filter_column(backbone, table):
    """Table 1 (ImageNet, batch 64, 224 px, R2): paper_gflops of both gradient filters = the printed digits,
    and = the authors' formula; train_gflops stays the correct (much smaller) count."""
    from asi_core import accounting as acc

    geos = _last4_geometries(backbone)
    for n, printed in zip((2, 4), table):
        authors = _authors_gflops(geos[-n:])
        assert round(authors, 2) == printed
        for method in ("gradfilter_paper", "gradfilter"):
            s = acc.summarize([acc.layer_report(method, g, radius=2) for g in geos[-n:]])
            assert round(s["paper_gflops"], 2) == printed
            assert s["paper_gflops"] == pytest.approx(authors, abs=1e-8)
            assert s["forward_gflops"] + s["backward_gflops"] + s["overhead_gflops"] < printed
