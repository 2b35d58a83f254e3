"""asi_core on linear layers of any input rank (issue 11): the include name filter, gradient filtering on
(B, H, W, C) inputs against its formula, per-mode ranks, eq. 5 / eq. 14-15 counts on 3 and 4 modes, and the
messages for bad input."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

import asi_core
from asi_core import accounting
from asi_core.decompose import subspace_iteration

D = torch.float64


class Block(nn.Module):
    def __init__(self, dim=6, hidden=10):
        super().__init__()
        self.attn = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


def _tiny(depth=3):
    torch.manual_seed(0)
    return nn.Sequential(*[Block() for _ in range(depth)], nn.Linear(6, 3)).double()


def test_include_filter_picks_the_mlp_linears_from_the_end_in_order():
    net = _tiny()
    every = asi_core.candidate_layers(net, "linear")
    assert len(every) == 10
    mlp = asi_core.candidate_layers(net, "linear", include="mlp")
    assert mlp == [f"{b}.mlp.{i}" for b in range(3) for i in (0, 3)]
    assert asi_core.candidate_layers(net, "linear", include="*.mlp.3") == ["0.mlp.3", "1.mlp.3", "2.mlp.3"]
    assert asi_core.candidate_layers(net, "linear", include=[r"mlp\.0$", "attn"]) == [
        "0.attn", "0.mlp.0", "1.attn", "1.mlp.0", "2.attn", "2.mlp.0"]
    names = asi_core.patch(net, "asi", num_finetune=3, layer_type="linear", include="mlp", ranks=2)
    assert names == ["1.mlp.3", "2.mlp.0", "2.mlp.3"]
    # freezing: everything registered before the first patched layer, the rest trains
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in net.named_parameters()
                         if n.startswith(("1.mlp.3", "2.", "3."))}


def test_include_errors_say_how_many_matched_and_show_candidates():
    with pytest.raises(ValueError, match=r"include='ffn' matches 0 of the model's 10 linear layers.*'0.attn'"):
        asi_core.patch(_tiny(), "asi", num_finetune=2, layer_type="linear", include="ffn")
    with pytest.raises(ValueError, match=r"matches 6 of .* fewer than num_finetune=7.*2.mlp.3"):
        asi_core.patch(_tiny(), "vanilla", num_finetune=7, layer_type="linear", include="mlp")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        asi_core.candidate_layers(_tiny(), "linear", include="mlp(")


def test_method_not_defined_for_layer_type_names_method_and_layer():
    class ConvOnly(asi_core.methods.Vanilla):
        name = "conv_only_test"
        layer_types = ("conv",)

    asi_core.register_method(ConvOnly)
    try:
        with pytest.raises(ValueError, match=r"method 'conv_only_test' is not defined for linear layers.*cannot patch \['3'\]"):
            asi_core.patch(_tiny(), "conv_only_test", num_finetune=1, layer_type="linear")
    finally:
        del asi_core.methods.METHODS["conv_only_test"]


def test_wrong_last_dimension_names_layer_and_both_sizes():
    net = nn.Sequential(nn.Linear(6, 4))
    asi_core.patch(net, "asi", num_finetune=1, layer_type="linear", ranks=2)
    with pytest.raises(ValueError, match=r"layer '0': the input's last dimension is 5 but the layer has "
                                         r"in_features=6 \(input shape \(2, 3, 4, 5\)\)"):
        net(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"asi ranks \(2, 2, 2\) have 3 entries but the input has 4 modes"):
        asi_core.unpatch(net)
        asi_core.patch(net, "asi", num_finetune=1, layer_type="linear", ranks=(2, 2, 2))
        net(torch.randn(2, 3, 4, 6))


def test_full_rank_gradients_through_a_tiny_transformer_equal_autograd():
    """Every mlp linear of a 3-block model at full rank, 4-D input, float64: parameters and input gradient."""
    x = torch.randn(2, 3, 4, 6, dtype=D)
    for method, opts in (("asi", dict(ranks=1000)), ("hosvd", dict(eps=1.0))):
        ref, net = _tiny(), _tiny()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ranks clipped to the input's sizes
            asi_core.patch(net, method, num_finetune="all", layer_type="linear", include="mlp", lean=False, **opts)
        for p in ref.parameters():
            p.requires_grad_(True)
        xr, xi = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref(xr).square().sum().backward()
        for _ in range(2):  # twice: the second step is asi's warm-started one
            net.zero_grad()
            xi.grad = None
            net(xi).square().sum().backward()
        got = dict(net.named_parameters())
        for n, p in ref.named_parameters():
            if got[n].requires_grad:
                torch.testing.assert_close(got[n].grad, p.grad, rtol=1e-9, atol=1e-10, msg=f"{method} {n}")
        torch.testing.assert_close(xi.grad, xr.grad, rtol=1e-9, atol=1e-10)


def test_gradfilter_on_4d_input_pools_spatial_patches():
    """(B, H, W, C): R x R patches over (H, W), as for a conv, from the definition with loops."""
    torch.manual_seed(1)
    lin = nn.Linear(5, 3).double()
    B, H, W, R = 2, 5, 4, 2
    x = torch.randn(B, H, W, 5, dtype=D)
    g = torch.randn(B, H, W, 3, dtype=D)
    model = nn.Sequential(copy.deepcopy(lin))
    asi_core.patch(model, "gradfilter", num_finetune=1, layer_type="linear", radius=R)
    xi = x.clone().requires_grad_()
    model(xi).backward(g)
    dW = torch.zeros(3, 5, dtype=D)
    g_tilde = torch.zeros_like(g)
    for b in range(B):
        for p in range(0, H, R):
            for q in range(0, W, R):
                cells = [(i, j) for i in range(p, min(p + R, H)) for j in range(q, min(q + R, W))]
                gbar = sum(g[b, i, j] for i, j in cells) / len(cells)
                dW += torch.outer(gbar, sum(x[b, i, j] for i, j in cells))
                for i, j in cells:
                    g_tilde[b, i, j] = gbar
    torch.testing.assert_close(model[0].weight.grad, dW)
    torch.testing.assert_close(xi.grad, g_tilde @ lin.weight)
    stored = model[0].last_stats["stored_elements"]
    assert stored == B * math.ceil(H / R) * math.ceil(W / R) * 5
    geo = accounting.geometry_from_layer(model[0])
    assert accounting.activation_elements("gradfilter", geo, radius=R) == stored


@pytest.mark.parametrize("shape,ranks", [((4, 5, 6), (2, 3, 2)), ((3, 4, 5, 6), (2, 2, 3, 4))])
def test_accounting_of_3_and_4_mode_inputs_matches_hand_counts_and_the_stored_tensors(shape, ranks):
    geo = accounting.LinearGeometry(shape[-1], 7, shape)
    # eq. 5: prod(r) + sum(D_m r_m)
    assert accounting.tucker_elements(shape, ranks) == math.prod(ranks) + sum(d * r for d, r in zip(shape, ranks))
    # eq. 14: sum over modes of 2 * prod(D) * r_m + r_m^3
    assert accounting.asi_overhead_flops(shape, ranks) == sum(2 * math.prod(shape) * r + r ** 3 for r in ranks)
    # linear eq. 15 in the implementation's order: Z = G x_0 U0^T x_1 U1^T ..., then the core, then U_D
    z, flops = list(shape[:-1]) + [7], 0
    for m in range(len(shape) - 1):
        flops += math.prod(z) * ranks[m]
        z[m] = ranks[m]
    flops += 7 * math.prod(ranks) + 7 * ranks[-1] * shape[-1]
    assert accounting.lowrank_linear_weight_grad_flops(geo, ranks) == flops
    # the wrapper stores exactly eq. 5's elements
    net = nn.Sequential(nn.Linear(shape[-1], 7).double())
    asi_core.patch(net, "asi", num_finetune=1, layer_type="linear", ranks=ranks)
    net(torch.randn(shape, dtype=D)).sum().backward()
    rep = accounting.report_from_layer(net[0])
    assert rep["memory_elements"] == rep["stored_elements"] == accounting.tucker_elements(shape, ranks)
    assert rep["forward_flops"] == math.prod(shape[:-1]) * shape[-1] * 7


def test_warm_start_on_4d_linear_input_converges_to_the_dominant_subspace():
    """The 4-D warm path (shared with convs) on a (B, H, W, C) tensor: repeated steps find the top subspace."""
    g = torch.Generator().manual_seed(0)
    shape = (6, 5, 4, 8)
    x = torch.randn(shape, generator=g, dtype=D) * 0.01
    u = torch.linalg.qr(torch.randn(8, 2, generator=g, dtype=D))[0]
    x = x + torch.einsum("bhwr,cr->bhwc", torch.randn(6, 5, 4, 2, generator=g, dtype=D), u)
    factors = None
    for _ in range(20):
        _, factors = subspace_iteration(x, (6, 5, 4, 2), factors, g)
    angle = torch.linalg.svdvals(factors[3].t() @ u).min()
    assert angle > 1 - 1e-5  # cosine of the largest principal angle
