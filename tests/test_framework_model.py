"""Model zoo, pretrained-weight resolution, checkpoint loading, BatchNorm policy and LR recipe."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from classification import backbones
from classification.backbones import MCUNet, create_model, imagenet_weights_path
from classification.model import ClassificationModel, load_checkpoint_weights
from conftest import REPO


def test_mcunet_matches_the_reference_architecture():
    ref = json.loads((REPO.parent / "shared" / "reference" / "mcunet-in1.json").read_text()) \
        if (REPO.parent / "shared" / "reference" / "mcunet-in1.json").is_file() else None
    net = MCUNet()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 42
    assert net(torch.zeros(2, 3, 96, 96)).shape == (2, 1000)
    feats = net.first_conv(torch.zeros(1, 3, 96, 96))
    for b in net.blocks:
        feats = b(feats)
    assert feats.shape == (1, 160, 3, 3)  # total stride 32
    if ref is not None:
        for block, spec in zip(net.blocks, ref["blocks"]):
            mb = block.mobile_inverted_conv
            assert mb.depth_conv.conv.kernel_size == (spec["kernel_size"],) * 2
            assert mb.depth_conv.conv.stride == (spec["stride"],) * 2
            assert mb.point_linear.conv.out_channels == spec["out_channels"]
            assert (mb.inverted_bottleneck is None) == (spec["expand_ratio"] == 1)
            assert block.identity_shortcut == spec["identity_shortcut"]


def test_pretrained_weights_missing_offline_stops_and_names_the_file(ckpts, monkeypatch):
    def offline(url, dst):
        raise OSError("network unreachable")

    monkeypatch.setattr(backbones, "_download", offline)
    for name in ["mcunet", "resnet18"]:
        with pytest.raises(FileNotFoundError) as e:
            create_model(name, 10, pretrained=True)
        msg = str(e.value)
        assert str(imagenet_weights_path(name)) in msg and backbones.MODELS[name].weights_url in msg
        assert "--model.pretrained false" in msg
        assert not imagenet_weights_path(name).exists()
    with pytest.raises(FileNotFoundError):  # the LightningModule never falls back to random weights
        ClassificationModel("mcunet", 10, pretrained=True)


def test_pretrained_weights_from_local_file_then_from_download(ckpts, monkeypatch):
    torch.manual_seed(1)
    published = MCUNet()
    path = imagenet_weights_path("mcunet")
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": published.state_dict()}, path)  # the MCUNet release's format
    monkeypatch.setattr(backbones, "_download", lambda url, dst: pytest.fail("must not download"))
    model = create_model("mcunet", 7, pretrained=True)
    assert torch.equal(model.first_conv.conv.weight, published.first_conv.conv.weight)
    assert model.classifier.linear.out_features == 7

    # "online": nothing local, the download lands in ckpts/imagenet/ and is used
    path.unlink()
    monkeypatch.setattr(backbones, "_download",
                        lambda url, dst: torch.save({"state_dict": published.state_dict()}, dst))
    model = create_model("mcunet", 7, pretrained=True)
    assert path.is_file() and torch.equal(model.blocks[5].mobile_inverted_conv.depth_conv.conv.weight,
                                          published.blocks[5].mobile_inverted_conv.depth_conv.conv.weight)


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="mcunet, mobilenet_v2, resnet18, resnet34"):
        create_model("vgg", 10, pretrained=False)


def test_checkpoint_loading_keeps_backbone_and_skips_a_head_of_another_size(tmp_path):
    torch.manual_seed(0)
    src = ClassificationModel("mcunet", num_classes=10, pretrained=False, method="vanilla", num_finetune="all")
    lightning_style = tmp_path / "a.ckpt"
    torch.save({"state_dict": src.state_dict(), "global_step": 5}, lightning_style)  # keys "net.*"

    dst = ClassificationModel("mcunet", num_classes=10, pretrained=False, checkpoint=str(lightning_style))
    assert torch.equal(dst.net.classifier.linear.weight, src.net.classifier.linear.weight)
    assert torch.equal(dst.net.first_conv.bn.running_var, src.net.first_conv.bn.running_var)

    other_head = create_model("mcunet", 10, pretrained=False)
    skipped = load_checkpoint_weights(other_head, lightning_style, "classifier.linear")
    assert skipped == []
    five = create_model("mcunet", 5, pretrained=False)
    assert load_checkpoint_weights(five, lightning_style, "classifier.linear") == [
        "classifier.linear.weight", "classifier.linear.bias"]
    assert torch.equal(five.first_conv.conv.weight, src.net.first_conv.conv.weight)

    # another code base's prefix (e.g. the paper's released checkpoints): detected and stripped
    foreign = tmp_path / "b.ckpt"
    torch.save({"state_dict": {"model.backbone." + k: v for k, v in src.net.state_dict().items()}}, foreign)
    assert load_checkpoint_weights(five, foreign, "classifier.linear") == [
        "classifier.linear.weight", "classifier.linear.bias"]
    assert torch.equal(five.blocks[3].mobile_inverted_conv.depth_conv.conv.weight,
                       src.net.blocks[3].mobile_inverted_conv.depth_conv.conv.weight)

    with pytest.raises(ValueError, match="same --model.backbone"):
        load_checkpoint_weights(create_model("resnet18", 10, pretrained=False), lightning_style, "fc")
    with pytest.raises(FileNotFoundError, match="setupB_pretrain"):
        load_checkpoint_weights(five, tmp_path / "missing.ckpt", "classifier.linear")


@pytest.mark.parametrize("set_bn_eval", [True, False])
def test_batchnorm_policy(set_bn_eval):
    m = ClassificationModel("mcunet", 10, pretrained=False, method="vanilla", num_finetune=3,
                            set_bn_eval=set_bn_eval).train()
    bns = [b for b in m.net.modules() if isinstance(b, nn.BatchNorm2d)]
    assert all(b.training != set_bn_eval for b in bns)
    tuned_bn = m.net.blocks[13].mobile_inverted_conv.point_linear.bn  # after the first fine-tuned conv
    assert tuned_bn.weight.requires_grad != set_bn_eval
    assert not m.net.first_conv.bn.weight.requires_grad  # before the fine-tuned region: frozen anyway
    assert m.net.classifier.linear.weight.requires_grad  # the head always trains


def _lrs(model, steps):
    model.trainer = SimpleNamespace(estimated_stepping_batches=steps, max_epochs=10)
    cfg = model.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return opt, lrs


def test_paper_recipe_warmup_then_cosine():
    m = ClassificationModel("mcunet", 10, pretrained=False, lr=0.005, momentum=0.9, warmup_epochs=4)
    opt, lrs = _lrs(m, 100)  # 10 epochs of 10 steps, 4 warm-up epochs
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 1e-4
    assert lrs[0] == pytest.approx(0.005 / 40) and lrs[39] == pytest.approx(0.005)
    assert all(a < b for a, b in zip(lrs[:39], lrs[1:40]))  # linear warm-up
    assert all(a >= b for a, b in zip(lrs[40:], lrs[41:]))  # cosine annealing
    assert lrs[40 + 30] == pytest.approx(0.005 * 0.5 * (1 + math.cos(math.pi * 30 / 60)))
    params = {id(p) for p in opt.param_groups[0]["params"]}
    assert params == {id(p) for p in m.parameters() if p.requires_grad}  # frozen layers not optimised
    adam = ClassificationModel("mcunet", 10, pretrained=False, optimizer="adam", scheduler="constant")
    adam.trainer = SimpleNamespace(estimated_stepping_batches=10, max_epochs=1)
    assert isinstance(adam.configure_optimizers(), torch.optim.Adam)


def test_a_layer_named_twice_is_refused_not_dropped():
    """--model.layers a,a used to train one layer while messages counted two."""
    from classification.model import ClassificationModel

    with pytest.raises(ValueError, match=r"--model.layers names \['layer4.1.conv2'\] more than once"):
        ClassificationModel("resnet18", 10, pretrained=False, method="asi", num_finetune=2,
                            layers=["layer4.1.conv1", "layer4.1.conv2", "layer4.1.conv2"])
