"""Perplexity measurement (eq. 7): zero at ε = 1, shrinking with ε, consistent ranks and memory."""
import torch
import torch.nn.functional as F
from torch import nn

from asi_core.accounting import tucker_elements
from asi_core.perplexity import hosvd_all_eps, measure_perplexity
from asi_core.decompose import hosvd


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4),
                         nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, 4)).double()


def _batches(n=2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (4,), generator=g))
            for _ in range(n)]


def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


def test_hosvd_all_eps_matches_individual_hosvd():
    x = torch.randn(4, 5, 6, 7, dtype=torch.float64)
    for eps, core, factors, ranks in hosvd_all_eps(x, [0.3, 0.7, 1.0]):
        c2, f2, r2 = hosvd(x, eps)
        assert ranks == r2
        torch.testing.assert_close(core.abs(), c2.abs())  # singular vectors are defined up to sign


def test_perplexity_is_zero_at_eps_one_and_decreases_with_eps():
    net = _net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    epsilons = [0.3, 0.6, 0.9, 1.0]
    table = measure_perplexity(net, _batches(), _loss, epsilons)
    assert list(table) == ["0", "2", "4"]
    for name, row in table.items():
        assert row["perplexity"][-1] < 1e-9 * max(1.0, row["perplexity"][0])
        assert row["perplexity"][0] > 0
        assert row["perplexity"][0] >= row["perplexity"][2] - 1e-12
        for ranks, mem in zip(row["ranks"], row["memory_mib"]):
            assert abs(mem - tucker_elements(row["input_shape"], ranks) * 8 / 2 ** 20) < 1e-15
        assert all(a <= b for r1, r2 in zip(row["ranks"], row["ranks"][1:]) for a, b in zip(r1, r2))
    assert table["2"]["input_shape"] == [4, 8, 8, 8]
    # weights and requires_grad flags untouched, no leftover gradients
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n] and p.grad is None


def test_perplexity_equals_direct_gradient_difference():
    net = _net()
    (x, y), = _batches(1)
    table = measure_perplexity(net, [(x, y)], _loss, [0.5], layers=["4"])
    # direct: exact gradient of layer 4 vs the gradient computed with its input replaced by the
    # HOSVD_0.5 reconstruction (the conv is linear in its input for the weight gradient)
    feats = {}
    h = net[4].register_forward_hook(lambda m, a, o: feats.update(x=a[0].detach(), out=o))
    loss = _loss(net, x, y)
    (g_out,) = torch.autograd.grad(loss, feats["out"])
    h.remove()
    from asi_core.tensor import tucker_to_tensor
    core, factors, _ = hosvd(feats["x"], 0.5)
    xr = tucker_to_tensor(core, factors)
    conv = net[4]
    gw = torch.nn.grad.conv2d_weight(feats["x"], conv.weight.shape, g_out, conv.stride, conv.padding)
    gw_r = torch.nn.grad.conv2d_weight(xr, conv.weight.shape, g_out, conv.stride, conv.padding)
    assert abs(table["4"]["perplexity"][0] - (gw - gw_r).norm().item()) < 1e-9
