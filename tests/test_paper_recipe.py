"""The authors' recipe as options: their learning-rate curves, Adam betas, trainable BatchNorm affine."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from classification.model import ClassificationModel


def _epoch_lrs(model, epochs):
    model.trainer = SimpleNamespace(estimated_stepping_batches=epochs * 7, max_epochs=epochs)
    cfg = model.configure_optimizers()
    assert cfg["lr_scheduler"]["interval"] == "epoch"
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_setupA_curve_is_the_authors_cosine_to_a_tenth():
    """Their setup A: CosineAnnealingLR(T_max=50 epochs, eta_min=0.1 lr), stepped per epoch."""
    m = ClassificationModel("mcunet", 10, pretrained=False, lr=0.05, lr_min_factor=0.1, scheduler_interval="epoch")
    lrs = _epoch_lrs(m, 50)
    ref_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.05)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, 50, eta_min=0.005)
    ref_lrs = []
    for _ in range(50):
        ref_lrs.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    for e in (0, 1, 10, 25, 40, 49):
        assert lrs[e] == pytest.approx(ref_lrs[e], rel=1e-9)
        assert lrs[e] == pytest.approx(0.005 + 0.045 * 0.5 * (1 + math.cos(math.pi * e / 50)), rel=1e-12)
    assert lrs[49] > 0.005  # ends near 0.1 lr, not 0


def test_setupB_curve_is_the_authors_warmup_from_a_quarter():
    """Their setup B: LambdaLR per epoch, e < 4: 0.25 + 0.75 e / 3; then 0.5 (1 + cos(pi (e - 4) / 86))."""
    m = ClassificationModel("mcunet", 10, pretrained=False, lr=0.005, momentum=0.9, warmup_epochs=4,
                            warmup_start_factor=0.25, lr_min_factor=0.0, scheduler_interval="epoch")
    lrs = _epoch_lrs(m, 90)

    def theirs(e):
        if e < 4:
            return 0.25 + (1 - 0.25) / (4 - 1) * e
        return 0.5 * (1 + math.cos(math.pi * (e - 4) / (90 - 4)))

    for e in (0, 1, 2, 3, 4, 5, 47, 89):
        assert lrs[e] == pytest.approx(0.005 * theirs(e), rel=1e-12)
    assert lrs[0] == pytest.approx(0.00125) and lrs[3] == lrs[4] == pytest.approx(0.005)


def test_default_recipe_unchanged_and_adam_betas():
    m = ClassificationModel("mcunet", 10, pretrained=False, lr=0.005, warmup_epochs=4)
    m.trainer = SimpleNamespace(estimated_stepping_batches=100, max_epochs=10)
    cfg = m.configure_optimizers()
    assert cfg["lr_scheduler"]["interval"] == "step"
    assert cfg["optimizer"].param_groups[0]["lr"] == pytest.approx(0.005 / 40)  # ours: (step+1)/warmup
    adam = ClassificationModel("mcunet", 10, pretrained=False, optimizer="adam", scheduler="constant",
                               adam_betas=(0.8, 0.9))
    adam.trainer = SimpleNamespace(estimated_stepping_batches=10, max_epochs=1)
    assert adam.configure_optimizers().param_groups[0]["betas"] == (0.8, 0.9)
    with pytest.raises(ValueError, match="max_epochs"):
        m2 = ClassificationModel("mcunet", 10, pretrained=False, scheduler_interval="epoch")
        m2.trainer = SimpleNamespace(estimated_stepping_batches=100, max_epochs=-1)
        m2.configure_optimizers()


def test_train_bn_affine_follows_the_authors_freeze_rule():
    """Every BatchNorm registered after the first fine-tuned conv trains its scale and shift (eval mode kept)."""
    m = ClassificationModel("resnet18", 10, pretrained=False, num_finetune=2, train_bn_affine=True).train()
    assert m.patched == ["layer4.1.conv1", "layer4.1.conv2"]
    assert m.bn_affine_trained == ["layer4.1.bn1", "layer4.1.bn2"]
    trainable = [n for n, p in m.net.named_parameters() if p.requires_grad]
    assert trainable == ["layer4.1.conv1.weight", "layer4.1.bn1.weight", "layer4.1.bn1.bias",
                         "layer4.1.conv2.weight", "layer4.1.bn2.weight", "layer4.1.bn2.bias", "fc.weight", "fc.bias"]
    assert all(not b.training for b in m.net.modules() if isinstance(b, nn.BatchNorm2d))
    ours = ClassificationModel("resnet18", 10, pretrained=False, num_finetune=2)
    assert [n for n, p in ours.net.named_parameters() if p.requires_grad] == [
        "layer4.1.conv1.weight", "layer4.1.conv2.weight", "fc.weight", "fc.bias"]


@pytest.mark.parametrize("backbone,method", [("resnet18", "vanilla"), ("mcunet", "gradfilter_paper")])
def test_trainable_bn_lean_gradients_equal_plain(backbone, method):
    """float64: with trainable BN affine, lean (masks, eval BN) and plain autograd give the same gradients."""
    grads = {}
    for lean in (False, True):
        torch.manual_seed(0)
        m = ClassificationModel(backbone, 10, pretrained=False, method=method, num_finetune=4, lean=lean,
                                train_bn_affine=True).double().train()
        for b in m.net.modules():  # non-trivial running statistics and affine parameters
            if isinstance(b, nn.BatchNorm2d):
                b.running_var.uniform_(0.5, 2.0)
                b.running_mean.normal_()
                b.weight.data.uniform_(0.5, 1.5)
        x = torch.randn(3, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        m(x).pow(2).sum().backward()
        grads[lean] = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    assert any(".bn" in n or "bn." in n for n in grads[True])
    assert grads[True].keys() == grads[False].keys()
    for n in grads[True]:
        assert grads[True][n].abs().sum() > 0, n
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-12, atol=1e-14)
