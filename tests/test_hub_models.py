"""Backbones by name from timm and pretrainedmodels (classification/hub_models.py): built, patched and trained one
step (random init, small inputs) through the framework's model; the layers --model.num_finetune counts are
asi_core.candidate_layers'; weights resolved as the built-in models' (local file, else the published ones, else a
message naming the file and the option); the package's preprocessing reaches the data."""
from __future__ import annotations

import warnings

import pytest
import torch

timm = pytest.importorskip("timm")
pretrainedmodels = pytest.importorskip("pretrainedmodels")

import asi_core  # noqa: E402
from classification import families  # noqa: E402,F401
from classification import hub_models  # noqa: E402
from classification.model import ClassificationModel  # noqa: E402
from classification.registry import MODELS, create_model, get_spec, is_model  # noqa: E402

# (name, resolution, layer type expected, include expected)
ARCHS = [("timm:resnet18", 32, "conv", None), ("timm:mobilenetv3_small_050", 32, "conv", None),
         ("timm:convnext_atto", 32, "conv", None), ("timm:vit_tiny_patch16_224", 224, "linear", "mlp"),
         ("pretrainedmodels:resnet18", 32, "conv", None), ("pretrainedmodels:se_resnet50", 224, "conv", None),
         ("pretrainedmodels:bninception", 224, "conv", None)]


@pytest.mark.parametrize("name,resolution,layer_type,include", ARCHS)
def test_build_patch_and_train_one_step(name, resolution, layer_type, include):
    spec = get_spec(name)
    assert (spec.layer_type, spec.include) == (layer_type, include)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ranks clipped on tiny feature maps
        model = ClassificationModel(name, num_classes=7, pretrained=False, method="asi", num_finetune=2, ranks=2)
        net = model.net
        assert model.patched == asi_core.candidate_layers(net, layer_type, include)[-2:]
        head = net.get_submodule(spec.head)
        assert isinstance(head, torch.nn.Linear) and head.out_features == 7
        x, y = torch.randn(2, 3, resolution, resolution), torch.tensor([0, 6])
        net.train()
        before = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    for name in model.patched:  # the patched layers got their gradient (timm zero-inits some residual branches'
        assert net.get_submodule(name).weight.grad is not None  # last BN, so the values may not move yet)
    assert not torch.equal(before[f"{spec.head}.weight"], head.weight)  # the new head learned
    names = [n for n, _ in net.named_parameters()]
    first = next(i for i, n in enumerate(names) if n.startswith(model.patched[0] + "."))
    params = dict(net.named_parameters())
    assert first > 0 and not any(params[n].requires_grad for n in names[:first])  # frozen before the first


def test_names_resolve_once_and_unknown_names_say_what_exists():
    assert is_model("timm:resnet18") and get_spec("timm:resnet18") is MODELS["timm:resnet18"]
    with pytest.raises(ValueError, match=r"timm has no model 'resnet181'.*close names: .*resnet18"):
        get_spec("timm:resnet181")
    with pytest.raises(ValueError, match=r"pretrainedmodels has no model 'se_resnet5'.*se_resnet50"):
        get_spec("pretrainedmodels:se_resnet5")
    with pytest.raises(ValueError, match=r"Unknown model 'nohub:x'.*timm:<name>"):
        get_spec("nohub:x")
    assert not is_model("timm:resnet181")


@pytest.mark.parametrize("name,why", [
    ("timm:dla34", r"classifier 'fc' is not one nn.Linear \(Conv2d\)"),
    ("timm:deit_tiny_distilled_patch16_224", r"2 classifier heads \(head, head_dist\).*non-distilled"),
    ("pretrainedmodels:dpn68", r"not one nn.Linear named last_linear \(Conv2d\)"),
    ("pretrainedmodels:squeezenet1_0", r"not one nn.Linear named last_linear")])
def test_models_whose_head_is_not_one_linear_are_refused_when_named(name, why):
    with pytest.raises(ValueError, match=why):
        get_spec(name)
    assert not is_model(name)


def test_a_vit_refuses_another_resolution_before_any_work():
    assert get_spec("timm:vit_tiny_patch16_224").fixed_resolution == 224
    assert get_spec("timm:resnet18").fixed_resolution is None
    with pytest.raises(ValueError, match=r"takes 224x224 inputs only.*--data.resolution 224"):
        ClassificationModel("timm:vit_tiny_patch16_224", num_classes=3, pretrained=False, method="asi",
                            num_finetune=2, input_shape=[2, 3, 32, 32])


def test_a_model_published_without_classifier_gets_a_fresh_linear_head():
    spec = get_spec("timm:vit_small_patch14_dinov2")  # DINOv2: num_classes 0, an Identity head
    assert spec.head == "head" and spec.preprocessing["input_size"] == 518
    net = create_model("timm:vit_small_patch14_dinov2", 3, pretrained=False)
    assert isinstance(net.head, torch.nn.Linear) and (net.head.in_features, net.head.out_features) == (384, 3)


def test_a_1001_class_file_loses_its_background_row_as_pretrainedmodels_does():
    net = hub_models._pm_build("inceptionv4")
    state = dict(net.state_dict())
    state["last_linear.weight"] = torch.randn(1001, state["last_linear.weight"].shape[1])
    state["last_linear.bias"] = torch.randn(1001)
    net.load_state_dict(hub_models._pm_rename(state, net), strict=True)
    assert torch.equal(net.last_linear.bias, state["last_linear.bias"][1:])


def test_preprocessing_is_the_packages_own():
    t = get_spec("timm:vit_tiny_patch16_224").preprocessing
    assert t == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "input_size": 224}
    p = get_spec("pretrainedmodels:polynet").preprocessing
    assert p["input_size"] == 331 and p["mean"] == pytest.approx([0.485, 0.456, 0.406])
    # Caffe-style: [0, 255] inputs, BGR: the means become RGB-ordered fractions, and the network flips the channels
    b = get_spec("pretrainedmodels:bninception").preprocessing
    assert b["mean"] == pytest.approx([128 / 255, 117 / 255, 104 / 255]) and b["std"] == pytest.approx([1 / 255] * 3)
    net = create_model("pretrainedmodels:bninception", 5, pretrained=False).eval()
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        flipped = net(x)
        net._forward_pre_hooks.clear()
        assert torch.allclose(flipped, net(x.flip(1)))


def test_the_command_line_hands_the_preprocessing_to_the_data(tmp_path):
    from classification.cli import ASICLI

    def cli(*args):
        return ASICLI(args=["--data.name", "digits", "--model.pretrained", "false",
                            "--run_root", str(tmp_path / "runs"), *args], run=False)

    c = cli("--model.backbone", "timm:vit_tiny_patch16_224", "--data.resolution", "224", "--data.name", "cifar10")
    assert c.datamodule.stats == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    c = cli("--model.backbone", "pretrainedmodels:nasnetamobile", "--data.mean", "[0.1,0.2,0.3]",
            "--data.std", "[1,1,1]", "--data.resolution", "32", "--data.name", "cifar10")
    assert c.datamodule.stats == ((0.1, 0.2, 0.3), (1, 1, 1)) and c.datamodule.resolution == 32  # the user's win
    from classification.data import image_transforms
    norm = image_transforms(32, False, stats=c.datamodule.stats).transforms[-1]
    assert list(norm.mean) == [0.1, 0.2, 0.3]
    # --data.resolution left at its default takes the model's input size (polynet: 331); given, even as 224, it stays
    assert cli("--model.backbone", "pretrainedmodels:polynet", "--data.name", "cifar10").datamodule.resolution == 331
    given = cli("--model.backbone", "pretrainedmodels:polynet", "--data.name", "cifar10", "--data.resolution=224")
    assert given.datamodule.resolution == 224
    config = tmp_path / "data.yaml"
    config.write_text("data:\n  name: cifar10\n  resolution: 224\n")
    assert cli("--model.backbone", "pretrainedmodels:polynet", "--config", str(config)).datamodule.resolution == 224
    # digits is built as ready tensors: nothing to normalise, nothing derived
    assert cli("--model.backbone", "timm:vit_tiny_patch16_224", "--data.resolution", "224").datamodule.stats is None
    with pytest.warns(UserWarning, match="do nothing for 'digits'"):
        cli("--model.backbone", "timm:resnet18", "--data.mean", "[0.1,0.2,0.3]", "--data.std", "[1,1,1]",
            "--data.resolution", "32")


def test_bad_mean_or_std_is_refused_naming_the_option(tmp_path):
    from classification.data import check_data_options

    with pytest.raises(ValueError, match=r"--data.std \[0.5, 0.0, 0.5\] is invalid.*each > 0"):
        check_data_options(mean=[0.5] * 3, std=[0.5, 0.0, 0.5])
    with pytest.raises(ValueError, match=r"--data.mean \[0.5\] is invalid: it must be three"):
        check_data_options(mean=[0.5], std=[0.5] * 3)
    with pytest.raises(ValueError, match="go together"):
        check_data_options(mean=[0.5] * 3)


# ----------------------------------------------------------------------------- weights
def test_timm_weights_from_a_local_file(ckpts):
    source = timm.create_model("resnet18", pretrained=False)
    torch.nn.init.normal_(source.conv1.weight)
    (ckpts / "timm").mkdir(parents=True)
    torch.save(source.state_dict(), ckpts / "timm" / "resnet18.pth")
    net = create_model("timm:resnet18", 4, pretrained=True)
    assert torch.equal(net.conv1.weight, source.conv1.weight)
    assert net.fc.out_features == 4


def test_timm_weights_missing_offline_name_the_file_and_the_option(ckpts, monkeypatch):
    real = hub_models._timm_create

    def offline(name, pretrained, **kw):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained, **kw)

    monkeypatch.setattr(hub_models, "_timm_create", offline)
    with pytest.raises(FileNotFoundError) as err:
        create_model("timm:resnet18", 4, pretrained=True)
    msg = str(err.value)
    assert str(ckpts / "timm" / "resnet18.safetensors") in msg and "--model.pretrained false" in msg
    assert "timm/resnet18.a1_in1k" in msg


def test_a_timm_model_without_published_weights_says_so(ckpts, monkeypatch):
    real = timm.create_model("botnet50ts_256", pretrained=False)
    monkeypatch.setattr(hub_models, "_timm_create",  # a download would fail the test: only random builds here
                        lambda name, pretrained, **kw: pytest.fail("no download") if pretrained else real)
    assert not (real.pretrained_cfg.get("hf_hub_id") or real.pretrained_cfg.get("url"))
    with pytest.raises(FileNotFoundError, match=r"timm publishes no pretrained weights for botnet50ts_256.*"
                                                r"--model.pretrained false"):
        hub_models._timm_pretrained("botnet50ts_256")


def test_pretrainedmodels_weights_from_a_local_torchvision_file_get_its_head_renamed(ckpts):
    import torchvision

    source = torchvision.models.resnet18(weights=None)
    spec = get_spec("pretrainedmodels:resnet18")
    assert spec.weights_url.endswith("resnet18-5c106cde.pth")
    (ckpts / "imagenet").mkdir(parents=True)
    torch.save(source.state_dict(), ckpts / "imagenet" / spec.weights_file)  # torchvision's keys: fc.*
    net = create_model("pretrainedmodels:resnet18", 3, pretrained=True)
    assert torch.equal(net.conv1.weight, source.conv1.weight)
    assert torch.equal(net.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert net.last_linear.out_features == 3


def test_pretrainedmodels_weights_missing_offline_name_the_file(ckpts, monkeypatch):
    from classification import backbones

    def offline(url, dst):
        raise OSError("offline")

    monkeypatch.setattr(backbones, "_download", offline)
    with pytest.raises(FileNotFoundError) as err:
        create_model("pretrainedmodels:se_resnet50", 3, pretrained=True)
    msg = str(err.value)
    assert str(ckpts / "imagenet" / "se_resnet50-ce0d4300.pth") in msg and "--model.pretrained false" in msg


def test_the_documented_command_runs_as_written(run_cli, tmp_path):
    import re
    import shlex

    from conftest import REPO

    block = re.findall(r"```bash\n(.*?)```", (REPO / "docs" / "backbones.md").read_text(), re.S)[0]
    command = next(line for line in block.splitlines() if line.startswith("python main.py fit"))
    run_cli(*shlex.split(command)[2:], tiny=False)
    runs = list((tmp_path / "runs" / "setupA" / "timm:resnet18" / "digits" / "asi").glob("*/metrics.json"))
    assert len(runs) == 1
