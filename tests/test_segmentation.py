"""segmentation/: architectures against independent counts and mmseg key names, the authors' layer sets against
Table 3's vanilla memory, mIoU/mAcc against mmseg's definition, a few-step fit per method, bad-input messages."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from classification.model import ClassificationModel, load_checkpoint_weights
from classification.resources import profile_report
from segmentation.layer_sets import AUTHORS_LAYER_SETS, layer_set
from segmentation.loss import PixelCrossEntropy
from segmentation.metrics import SegmentationScores, scores_from_confusion
from segmentation.models import BUILDERS

MODELS = list(BUILDERS)


# ----------------------------------------------------------------------------- independent descriptions
def cbr(cin, cout, k=1, groups=1):
    """Parameters of an mmcv ConvModule with BN: conv without bias + BN weight and bias."""
    return cin * cout * k * k // groups + 2 * cout


def expected_params(name: str, num_classes: int = 21) -> int:
    import torchvision

    if name.endswith("_r18"):
        tv = torchvision.models.resnet18()  # same stages as ResNetV1c-18; V1c swaps the 7x7 stem for three 3x3
        backbone = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith(("conv1", "bn1", "fc")))
        backbone += cbr(3, 32, 3) + cbr(32, 32, 3) + cbr(32, 64, 3)
        cin = 512
    else:
        tv = torchvision.models.mobilenet_v2()  # mmseg's MobileNetV2 = torchvision's features[0:18] (no 1280 conv)
        backbone = sum(p.numel() for p in tv.features[:18].parameters())
        cin = 320
    ch = 512 if name == "upernet_r18" else 128
    seg = ch * num_classes + num_classes
    if name.startswith("pspnet"):
        head = 4 * cbr(cin, ch) + cbr(cin + 4 * ch, ch, 3)
    elif name.startswith("deeplabv3"):
        head = cbr(cin, ch) + cbr(cin, ch) + 3 * cbr(cin, ch, 3) + cbr(5 * ch, ch, 3)
    elif name == "fcn_r18":
        head = cbr(cin, ch, 3) + cbr(ch, ch, 3) + cbr(cin + ch, ch, 3)
    else:  # UPerHead on (64, 128, 256, 512)
        head = 4 * cbr(512, ch) + cbr(512 + 4 * ch, ch, 3) + sum(cbr(c, ch) for c in (64, 128, 256))
        head += 3 * cbr(ch, ch, 3) + cbr(4 * ch, ch, 3)
    return backbone + head + seg


def _bn(prefix):
    return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def _cm(prefix):
    return [f"{prefix}.conv.weight"] + _bn(f"{prefix}.bn")


def mmseg_keys(name: str) -> list[str]:
    """state_dict keys of the mmseg 0.x network, written from the architecture description."""
    keys = []
    if name.endswith("_r18"):
        for i in (0, 3, 6):
            keys += [f"backbone.stem.{i}.weight"] + _bn(f"backbone.stem.{i + 1}")
        for s in range(1, 5):
            for b in range(2):
                p = f"backbone.layer{s}.{b}"
                keys += [f"{p}.conv1.weight"] + _bn(f"{p}.bn1") + [f"{p}.conv2.weight"] + _bn(f"{p}.bn2")
                if b == 0 and s > 1:
                    keys += [f"{p}.downsample.0.weight"] + _bn(f"{p}.downsample.1")
    else:
        keys += _cm("backbone.conv1")
        for s, (t, _, n) in enumerate([(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3),
                                       (6, 320, 1)], start=1):
            for b in range(n):
                for c in range(2 if t == 1 else 3):
                    keys += _cm(f"backbone.layer{s}.{b}.conv.{c}")
    h = "decode_head"
    keys += [f"{h}.conv_seg.weight", f"{h}.conv_seg.bias"]
    if name.startswith("pspnet") or name == "upernet_r18":
        keys += [k for i in range(4) for k in _cm(f"{h}.psp_modules.{i}.1")] + _cm(f"{h}.bottleneck")
    if name.startswith("deeplabv3"):
        keys += _cm(f"{h}.image_pool.1") + [k for i in range(4) for k in _cm(f"{h}.aspp_modules.{i}")]
        keys += _cm(f"{h}.bottleneck")
    if name == "fcn_r18":
        keys += _cm(f"{h}.convs.0") + _cm(f"{h}.convs.1") + _cm(f"{h}.conv_cat")
    if name == "upernet_r18":
        keys += [k for i in range(3) for k in _cm(f"{h}.lateral_convs.{i}") + _cm(f"{h}.fpn_convs.{i}")]
        keys += _cm(f"{h}.fpn_bottleneck")
    return keys


# ----------------------------------------------------------------------------- architectures
@pytest.mark.parametrize("name", MODELS)
def test_architecture_params_keys_and_shapes(name):
    net = BUILDERS[name](21).eval()
    assert sum(p.numel() for p in net.parameters()) == expected_params(name)
    assert set(net.state_dict()) == set(mmseg_keys(name))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = net.backbone(x)
        out = net(x)
    assert out.shape == (1, 21, 64, 64)
    # output stride: 8 for the dilated backbones (d8), 4/8/16/32 for UPerNet's pyramid
    strides = [64 // f.shape[-1] for f in feats]
    assert strides == ([4, 8, 16, 32] if name == "upernet_r18" else [4, 8, 8, 8])


def test_mmseg_checkpoint_loads_and_reports_keys_that_differ(tmp_path):
    net = BUILDERS["pspnet_r18"](21)
    city = BUILDERS["pspnet_r18"](19)  # an mmseg Cityscapes checkpoint: same keys, 19-class conv_seg
    state = {k: v.clone() for k, v in city.state_dict().items()}
    assert set(state) == set(mmseg_keys("pspnet_r18"))
    torch.save({"meta": {"mmseg_version": "0.x"}, "state_dict": state}, tmp_path / "city.pth")
    skipped = load_checkpoint_weights(net, tmp_path / "city.pth", "decode_head.conv_seg")
    assert skipped == ["decode_head.conv_seg.weight", "decode_head.conv_seg.bias"]
    torch.testing.assert_close(net.backbone.layer4[1].conv2.weight, city.backbone.layer4[1].conv2.weight)
    torch.testing.assert_close(net.decode_head.bottleneck.conv.weight, city.decode_head.bottleneck.conv.weight)
    # a DeepLabV3 checkpoint does not fit PSPNet: the PSPNet keys it lacks are named
    torch.save({"state_dict": BUILDERS["deeplabv3_r18"](21).state_dict()}, tmp_path / "dlv3.pth")
    with pytest.raises(ValueError, match=r"decode_head\.(psp_modules|bottleneck).*decode_head\.(image_pool|aspp)"):
        load_checkpoint_weights(BUILDERS["pspnet_r18"](21), tmp_path / "dlv3.pth", "decode_head.conv_seg")


# ----------------------------------------------------------------------------- layer sets
# Table 3, vanilla Mem (MB) at batch 8, 512x512: the inputs of the authors' listed layers (float32)
TABLE3_VANILLA_MEM = {"pspnet_r18": (128.0, 352.0), "deeplabv3_r18": (336.0, 560.0), "fcn_r18": (288.0, 480.0),
                      "upernet_r18": (1380.0, 1436.0), "pspnet_mv2": (104.0, 604.0), "deeplabv3_mv2": (240.0, 620.0)}


@pytest.mark.parametrize("name", MODELS)
def test_authors_layer_sets_give_table3_vanilla_memory(name):
    """Batch 1 at 64x64 holds (8 * 8 * 8) = 512 times fewer input elements than batch 8 at 512x512, in every
    layer (all strides divide 64), so the analytic memory times 512 is Table 3's figure."""
    torch.manual_seed(0)
    for k, table in zip((5, 10), TABLE3_VANILLA_MEM[name]):
        model = ClassificationModel(backbone=name, num_classes=21, pretrained=False, method="vanilla", num_finetune=k)
        assert model.patched == sorted(layer_set(name, k)["layers"], key=list(model.patched).index)
        assert set(model.patched) == set(layer_set(name, k)["layers"])
        out = profile_report(model, 1, 64, "cpu")
        assert out["activation_mib"] * 512 == pytest.approx(table)


def test_freeze_rules_and_radii_follow_the_authors():
    m = ClassificationModel(backbone="pspnet_r18", num_classes=21, pretrained=False, method="gradfilter",
                            num_finetune=10)
    trainable = {n.rsplit(".", 1)[0] for n, p in m.net.named_parameters() if p.requires_grad}
    # layer4 (with its downsample: uncompressed) and the whole head train; BN is frozen (set_bn_eval)
    assert "backbone.layer4.0.downsample.0" in trainable and "decode_head.psp_modules.0.1.conv" in trainable
    assert "decode_head.conv_seg" in trainable and not any(n.startswith("backbone.layer3") for n in trainable)
    assert not any(".bn" in n or "downsample.1" in n for n in trainable)
    assert {n: l.method.radius for n, l in m.net.named_modules() if hasattr(l, "method")} == {
        n: 4 for n in layer_set("pspnet_r18", 10)["layers"]}
    d = ClassificationModel(backbone="deeplabv3_r18", num_classes=21, pretrained=False, method="gradfilter",
                            num_finetune=5)
    radii = {n: l.method.radius for n, l in d.net.named_modules() if hasattr(l, "method")}
    assert radii == {"decode_head.bottleneck.conv": 3, "decode_head.aspp_modules.0.conv": 3,
                     "decode_head.aspp_modules.1.conv": 3, "decode_head.aspp_modules.2.conv": 6,
                     "decode_head.aspp_modules.3.conv": 9}
    assert not d.net.decode_head.image_pool[1].conv.weight.requires_grad  # frozen by the 5L rules
    p5 = ClassificationModel(backbone="pspnet_r18", num_classes=21, pretrained=False, method="vanilla", num_finetune=5)
    assert p5.net.decode_head.psp_modules[0][1].conv.weight.requires_grad  # registered before the first patched
    assert not any(p.requires_grad for p in p5.net.backbone.parameters())  # layer, yet trained, as the authors
    assert all(len(AUTHORS_LAYER_SETS[n]) == 2 for n in MODELS)
    # the authors' install order (forward, head last): their ASI picks a 5L set's ranks as the last N layers of the
    # 10L perplexity file, which holds only when every 5L list is the tail of the 10L one
    for n in MODELS:
        five, ten = layer_set(n, 5)["layers"], layer_set(n, 10)["layers"]
        assert ten[-len(five):] == five, n
    # the authors' BN: scale and shift train where their freeze rules leave the module trainable (PSPNet 5L: the head)
    b = ClassificationModel(backbone="pspnet_r18", num_classes=21, pretrained=False, method="gradfilter_paper",
                            num_finetune=5, train_bn_affine=True)
    assert set(b.bn_affine_trained) == {"decode_head.bottleneck.bn"} | {f"decode_head.psp_modules.{i}.1.bn"
                                                                         for i in range(4)}
    assert {n: l.method.radius for n, l in b.net.named_modules() if hasattr(l, "method")} == {
        "decode_head.bottleneck.conv": 4}


def test_authors_segmentation_perplexity_pickle_names_its_layers(tmp_path):
    """Their segmentation perplexity.pkl (tools/perplexity.py) holds the 10L install list's convs, in that order,
    with their names (a bare `conv` entry named `<path>.conv`); a 5L run takes the ranks of its last 5 layers
    (train.py: `perplexity.layer_names[-N:]`, find_best_combination over those) -> same choice as a brute force."""
    import itertools
    import pickle

    names = layer_set("fcn_r18", 10)["layers"]
    theirs = [n + ".conv" if n.endswith("downsample.0") else n for n in names]
    g = torch.Generator().manual_seed(0)
    eps = [0.5, 0.8, 0.9]
    data = {"layer_names": theirs, "set_of_epsilons": eps,
            "perplexity": [[float(torch.rand((), generator=g)) * (1 - e) for e in eps] for _ in names],
            "ranks": [[[1 + j, 2 + j, 1 + i % 3, 1] for j, _ in enumerate(eps)] for i, _ in enumerate(names)],
            "layer_mems": [[float(torch.rand((), generator=g)) * (1 + j) for j, _ in enumerate(eps)] for _ in names]}
    with open(tmp_path / "perplexity_combined.pkl", "wb") as f:
        pickle.dump(data, f)
    budget = 3.0
    P, M = data["perplexity"][-5:], data["layer_mems"][-5:]
    best = min((c for c in itertools.product(range(3), repeat=5) if sum(M[i][c[i]] for i in range(5)) <= budget),
               key=lambda c: sum(P[i][c[i]] for i in range(5)))
    m = ClassificationModel(backbone="fcn_r18", num_classes=21, pretrained=False, method="asi", num_finetune=5,
                            perplexity_file=str(tmp_path / "perplexity_combined.pkl"), budget=budget)
    chosen = {c["name"]: tuple(c["ranks"]) for c in m.rank_selection["layers"]}
    assert chosen == {n: tuple(data["ranks"][5 + i][best[i]]) for i, n in enumerate(names[-5:])}
    data["layer_names"] = theirs[:-1] + ["auxiliary_head.conv_seg"]
    with open(tmp_path / "other.pkl", "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(ValueError, match="names layer .auxiliary_head.conv_seg., which is not a conv layer"):
        ClassificationModel(backbone="fcn_r18", num_classes=21, pretrained=False, method="asi", num_finetune=5,
                            perplexity_file=str(tmp_path / "other.pkl"), budget=budget)


def test_layer_name_not_in_model_names_the_nearest():
    with pytest.raises(ValueError, match=r"decode_head\.bottleneck\.conv"):
        ClassificationModel(backbone="pspnet_r18", num_classes=21, pretrained=False, method="vanilla",
                            layers=["decode_head.botleneck.conv"])
    m = ClassificationModel(backbone="fcn_r18", num_classes=21, pretrained=False, method="asi",
                            layers=["decode_head.conv_seg", "decode_head.conv_cat.conv"])
    assert m.patched == ["decode_head.conv_seg", "decode_head.conv_cat.conv"]  # registration order, as mmseg


# ----------------------------------------------------------------------------- metrics and loss
def mmseg_areas(pred: np.ndarray, label: np.ndarray, k: int, ignore: int = 255):
    """mmseg.core.evaluation.metrics.intersect_and_union, with numpy histograms."""
    mask = label != ignore
    pred, label = pred[mask], label[mask]
    inter = pred[pred == label]
    bins = dict(bins=k, range=(0, k - 1))
    return (np.histogram(inter, **bins)[0], np.histogram(pred, **bins)[0], np.histogram(label, **bins)[0])


def test_miou_macc_match_hand_counts_and_mmseg_definition():
    # hand example: class 0 IoU 1 acc 1; class 1 IoU 1/2 acc 1/2; class 2 predicted once, never labelled (IoU 0,
    # acc undefined -> left out of mAcc); one ignored pixel
    m = SegmentationScores(3)
    m.update(torch.tensor([[[0, 1], [2, 2]]]), torch.tensor([[[0, 1], [255, 1]]]))
    s = m.scores()
    assert s["miou"] == pytest.approx(50.0) and s["macc"] == pytest.approx(75.0)
    assert s["aacc"] == pytest.approx(200 / 3)
    # random maps, 2 batches accumulated, against mmseg's histogram formulation
    g = torch.Generator().manual_seed(0)
    k, m = 5, SegmentationScores(5)
    preds, labels = [], []
    for _ in range(2):
        logits = torch.randn(2, k, 9, 7, generator=g)
        label = torch.randint(0, k - 1, (2, 9, 7), generator=g)  # class 4 never labelled
        label[:, 0, :] = 255
        m.update(logits, label)
        preds.append(logits.argmax(1).numpy()), labels.append(label.numpy())
    inter, area_pred, area_label = mmseg_areas(np.concatenate(preds), np.concatenate(labels), k)
    iou = inter / (area_pred + area_label - inter)
    acc = inter / np.where(area_label > 0, area_label, np.nan)
    s = m.scores()
    assert s["miou"] == pytest.approx(100 * np.nanmean(iou))
    assert s["macc"] == pytest.approx(100 * np.nanmean(acc))
    cm = torch.zeros(3, 3, dtype=torch.long)
    cm[0, 0] = 5
    assert scores_from_confusion(cm)["miou"] == 100.0  # classes never seen do not count


def test_pixel_cross_entropy_averages_over_all_pixels_like_mmseg():
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(2, 4, 3, 5, generator=g), torch.randint(0, 4, (2, 3, 5), generator=g)
    y[0, 0] = 255
    per_pixel = -torch.log_softmax(logits, 1).gather(1, y.clamp(max=3)[:, None])[:, 0]
    expected = per_pixel[y != 255].sum() / y.numel()
    torch.testing.assert_close(PixelCrossEntropy()(logits, y), expected)


def test_lean_pixel_loss_equals_the_plain_loss_and_keeps_only_low_res_logits_and_uint8_labels():
    """The lean loss recomputes the upsampling and log-softmax in backward: loss and gradient bit for bit those of
    the plain loss; what autograd keeps is the low-resolution logits and one byte per label."""
    from asi_core.lean import SavedTensorMeter

    g = torch.Generator().manual_seed(2)
    low = torch.randn(2, 5, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (2, 32, 32), generator=g)
    y[:, :3] = 255
    out = {}
    for lean in (False, True):
        x = low.clone().requires_grad_()
        with SavedTensorMeter() as meter:
            loss = PixelCrossEntropy(num_classes=5, lean=lean)(x, y)
        loss.backward()
        out[lean] = (loss.detach(), x.grad, meter.bytes)
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
    assert out[True][2] == low.numel() * 8 + y.numel()  # float64 logits + uint8 labels
    assert out[False][2] >= 2 * 5 * 32 * 32 * 8  # the full-resolution log-softmax


# ----------------------------------------------------------------------------- CLI: fit, bad input
TINY_SEG = ["--config", "configs/recipes/segmentation.yaml", "--config", "configs/segmentation/pspnet_mv2.yaml",
            "--config", "configs/data/digit_scenes.yaml", "--data.resolution", "32", "--trainer.max_steps", "3",
            "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_model_summary", "false",
            "--trainer.enable_progress_bar", "false"]


@pytest.mark.parametrize("method", ["vanilla", "gradfilter", "hosvd", "asi"])
def test_fit_on_digit_scenes(run_cli, tmp_path, method):
    cli = run_cli("fit", *TINY_SEG, "--model.method", method, tiny=False)
    metrics = json.loads((cli.run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 3
    assert 0.0 <= metrics["val_miou"] <= 100.0 and 0.0 <= metrics["val_macc"] <= 100.0
    assert set(metrics["patched_layers"]) == {"decode_head.bottleneck.conv"}
    vanilla_mib = 8 * (320 + 4 * 128) * 4 * 4 * 4 / 2 ** 20  # bottleneck input: batch 8, 832 ch, 4x4 at 32x32
    mem = metrics["resources"]["activation_mib"]
    assert mem == pytest.approx(vanilla_mib) if method == "vanilla" else mem < vanilla_mib


def test_bad_inputs(run_cli, tmp_path):
    from segmentation.data import cityscapes_sets, voc12aug_sets

    with pytest.raises(FileNotFoundError, match=r"voc12aug.*SegmentationClassAug.*voc_aug\.py"):
        voc12aug_sets(tmp_path, 512)
    with pytest.raises(FileNotFoundError, match=r"cityscapes.*leftImg8bit.*labelTrainIds"):
        cityscapes_sets(tmp_path, 512)
    with pytest.raises(SystemExit):  # a classification model on a segmentation dataset: the parser says so
        run_cli("fit", "--config", "configs/data/digit_scenes.yaml", "--model.backbone", "mcunet", tiny=False)
    with pytest.raises(FileNotFoundError, match="--model.checkpoint"):
        ClassificationModel(backbone="fcn_r18", num_classes=21, pretrained=True)


def test_benchmark_and_report_take_segmentation(tmp_path):
    from classification.benchmark import benchmark_models
    from classification.report import collect, format_table

    out = benchmark_models({"backbone": "pspnet_mv2", "num_classes": 11, "num_finetune": 5}, ["vanilla", "asi"], 1,
                           32, steps=1, warmup=0, device="cpu", progress=False)
    assert set(out["methods"]) == {"vanilla", "asi"}
    run = tmp_path / "setupA" / "pspnet_r18" / "voc12aug" / "gradfilter" / "l5_Rauthors"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({
        "settings": {"setup": "A", "model": "pspnet_r18", "dataset": "voc12aug", "method": "gradfilter",
                     "num_finetune": 5, "model_args": {"radius": 2}},
        "val_miou": 39.34, "val_macc": 51.59, "epochs_completed": 1,
        "resources": {"activation_mib": 8.0, "train_gflops": 38.65}}))
    table = format_table(collect([tmp_path]))
    assert "| Method | #Layers | mIoU ↑ | mAcc ↑ | Mem (MiB) ↓ | TFLOPs ↓ |" in table
    assert "| Gradient filter (authors' radii) | 5 | 39.34 | 51.59 | 8.00 | 0.04 |" in table


def test_voc12aug_pipeline_on_a_tiny_folder(tmp_path):
    """mmseg's layout read back: training crops of resolution x resolution (padded with label 255 when the rescaled
    image is smaller), evaluation images rescaled to (4 * resolution, resolution) with labels at their own size."""
    from PIL import Image

    from segmentation.data import voc12aug_sets

    d = tmp_path / "voc12aug"
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (d / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, folder in (("a", "SegmentationClass"), ("b", "SegmentationClassAug"), ("c", "SegmentationClass")):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(d / "JPEGImages" / f"{name}.jpg")
        label = np.zeros((30, 40), np.uint8)
        label[5:20, 10:30] = 7
        label[0] = 255
        Image.fromarray(label).save(d / folder / f"{name}.png")
    for split, names in (("train", "a"), ("aug", "b"), ("val", "c")):
        (d / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    train, val, test = voc12aug_sets(tmp_path, 32)
    assert len(train) == 2 and len(val) == 1 and test is val
    for i in range(2):
        x, y = train[i]
        assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.int64
        assert set(y.unique().tolist()) <= {0, 7, 255}
    x, y = val[0]
    assert y.shape == (30, 40) and x.shape == (3, 32, 43)  # short side 30 -> 32 (scale (128, 32)), ratio kept


def _voc(tmp_path, label, size=(8, 6), names=("a",)):
    """A voc12aug folder of one image and label in mmseg's layout."""
    from PIL import Image

    d = tmp_path / "voc12aug"
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.new("RGB", size).save(d / "JPEGImages" / f"{n}.jpg")
        label.save(d / "SegmentationClass" / f"{n}.png")
    for lst in ("train", "val"):
        (d / "ImageSets/Segmentation" / f"{lst}.txt").write_text("".join(f"{n}\n" for n in names))
    (d / "ImageSets/Segmentation" / "aug.txt").write_text("")
    return d


@pytest.mark.parametrize("case,message", [
    ("rgb", "is a RGB image; expected one class index per pixel"),
    ("class", r"holds class value\(s\) \[40\]; this dataset has classes 0-20 and 255"),
    ("size", "is 4x4 but its image"),
])
def test_voc_labels_are_checked_before_they_train_or_score(tmp_path, case, message):
    from PIL import Image

    from segmentation.data import voc12aug_sets

    if case == "rgb":
        label = Image.new("RGB", (8, 6), (128, 0, 0))
    else:
        arr = np.zeros((6, 8), dtype=np.uint8)
        arr[0, 0] = 40 if case == "class" else 255
        label = Image.fromarray(arr if case != "size" else arr[:4, :4], mode="L")
    _voc(tmp_path, label)
    train, val, _ = voc12aug_sets(tmp_path, 8)
    for ds in (train, val):
        with pytest.raises(ValueError, match=message) as err:
            ds[0]
        assert "SegmentationClass" in str(err.value)


def test_voc_a_valid_label_with_ignored_pixels_loads_and_an_empty_list_is_refused(tmp_path):
    from PIL import Image

    from segmentation.data import voc12aug_sets

    arr = np.full((6, 8), 255, dtype=np.uint8)
    arr[:3] = 20
    _voc(tmp_path, Image.fromarray(arr, mode="L"))
    _, val, _ = voc12aug_sets(tmp_path, 8)
    assert set(np.unique(val[0][1].numpy())) == {20, 255}
    (tmp_path / "voc12aug/ImageSets/Segmentation/val.txt").write_text("")
    with pytest.raises(ValueError, match="val.txt list no images"):
        voc12aug_sets(tmp_path, 8)
