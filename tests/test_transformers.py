"""Vision transformers (issue 11): torchvision Swin / ViT miniatures with the real module names, ASI on their mlp
linears (4-D and 3-D inputs), exact activation checkpointing / recomputation (asi_core.recompute), measured memory
against bounds from the shapes, and short fits on digits."""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from torch import nn

import asi_core
from asi_core import recompute as rc
from classification import backbones
from classification.backbones import create_model, imagenet_weights_path
from classification.model import ClassificationModel
from classification.resources import profile_step

F64 = torch.float64


def tiny(name: str, num_classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes, pretrained=False).to(F64)


def test_mlp_filter_picks_the_expected_names_in_order():
    swin = tiny("swin_tiny_test")
    expected = [f"features.{s}.{b}.mlp.{i}" for s in (1, 3, 5, 7) for b in (0, 1) for i in (0, 3)]
    assert asi_core.candidate_layers(swin, "linear", "mlp") == expected
    assert asi_core.patch(swin, "vanilla", 4, layer_type="linear", include="mlp") == expected[-4:]
    vit = tiny("vit_tiny_test")
    expected = [f"encoder.layers.encoder_layer_{b}.mlp.{i}" for b in (0, 1) for i in (0, 3)]
    assert asi_core.candidate_layers(vit, "linear", "mlp") == expected
    assert asi_core.patch(vit, "asi", 3, layer_type="linear", include="mlp") == expected[-3:]
    # the full-size models have the same names (24 mlp linears each)
    spec = backbones.MODELS["swin_t"]
    assert (spec.layer_type, spec.include, spec.head) == ("linear", "mlp", "head")
    assert backbones.MODELS["vit_b_32"].head == "heads.head"


def _grads(net, x, y, seed=1):
    torch.manual_seed(seed)  # same stochastic-depth / dropout draws in both runs
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,shape", [("swin_tiny_test", (3, 2, 2, 128)), ("vit_tiny_test", (3, 17, 32))])
@pytest.mark.parametrize("method,opts", [("asi", {"ranks": 10**6}), ("hosvd", {"eps": 1.0})])
def test_full_rank_methods_equal_autograd_on_4d_and_3d_inputs(name, shape, method, opts):
    base = tiny(name)
    ref = copy.deepcopy(base)
    asi_core.patch(ref, "vanilla", 4, layer_type="linear", include="mlp", lean=False)
    net = copy.deepcopy(base)
    asi_core.patch(net, method, 4, layer_type="linear", include="mlp", **opts)
    x, y = torch.randn(3, 3, 64 if name.startswith("swin") else 32, 64 if name.startswith("swin") else 32,
                       dtype=F64), torch.tensor([0, 3, 4])
    seen = {}
    first = asi_core.patched_layers(net)[0][1]
    first.register_forward_hook(lambda m, a, o: seen.update(input=tuple(a[0].shape)))
    ref.train(), net.train()
    (l1, g1), (l2, g2) = _grads(ref, x, y), _grads(net, x, y)
    assert seen["input"] == shape  # 4-D (B, H, W, C) / 3-D (B, T, D)
    assert torch.equal(l1, l2) and g1.keys() == g2.keys() and len(g1) > 4
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-9, atol=1e-11, msg=k)


@pytest.mark.parametrize("name,res,layers", [("swin_tiny_test", 64, 4), ("vit_tiny_test", 32, 3), ("mcunet", 32, 5)])
@pytest.mark.parametrize("mode", rc.MODES)
def test_checkpointing_and_recompute_are_exact(name, res, layers, mode):
    """Every method, float64: the same loss and gradients as the same method without recomputation (stochastic
    depth draws the same masks again in backward); vanilla equals plain autograd."""
    base = tiny(name)
    lt, inc = ("conv", None) if name == "mcunet" else ("linear", "mlp")
    x, y = torch.randn(2, 3, res, res, dtype=F64), torch.tensor([1, 2])
    for method, opts in (("vanilla", {}), ("asi", {"ranks": 2, "warm_start": True}), ("hosvd", {"eps": 0.7})):
        ref, net = copy.deepcopy(base), copy.deepcopy(base)
        patched = asi_core.patch(ref, method, layers, layer_type=lt, include=inc, **opts)
        asi_core.patch(net, method, layers, layer_type=lt, include=inc, **opts)
        segments = rc.enable(net, patched, mode)
        if mode == "checkpointing" or name != "mcunet":  # a CNN has no patch-free composite part to recompute
            assert segments
        ref.train(), net.train()
        for step in range(2):  # the second step uses asi's warm start: it advanced once per step in both
            (l1, g1), (l2, g2) = _grads(ref, x, y, seed=step), _grads(net, x, y, seed=step)
            torch.testing.assert_close(l2, l1, rtol=1e-12, atol=0)
            assert g1.keys() == g2.keys()
            for k in g1:
                torch.testing.assert_close(g2[k], g1[k], rtol=1e-9, atol=1e-12, msg=f"{method} {k}")
            ref.zero_grad(), net.zero_grad()
        assert rc.disable(net) == segments and not rc.recomputed_segments(net)


def test_segments_of_the_real_models():
    swin = create_model("swin_t", 10, pretrained=False)
    patched = asi_core.patch(swin, "asi", 4, layer_type="linear", include="mlp")
    # block 7.0 straddles the frozen/fine-tuned boundary: only its MLP is a segment; block 7.1 is one
    assert rc.segments(swin, patched, "checkpointing") == ["features.7.0.mlp", "features.7.1"]
    assert rc.segments(swin, patched, "recompute") == ["features.7.1.attn"]
    with pytest.raises(ValueError, match="valid"):
        rc.segments(swin, patched, "offload")
    assert rc.enable(swin, patched, "checkpointing") == rc.recomputed_segments(swin) == ["features.7.0.mlp",
                                                                                         "features.7.1"]
    asi_core.unpatch(swin)  # undoes the segments too
    assert not rc.recomputed_segments(swin) and "forward" not in swin.features[7][1].__dict__


def _kept_bytes(name, method, res, batch=2, **flags):
    torch.manual_seed(0)
    model = ClassificationModel(name, num_classes=10, pretrained=False, method=method, num_finetune=4,
                                ranks=2, **flags)
    x, y = torch.randn(batch, 3, res, res), torch.randint(0, 10, (batch,))
    return profile_step(model, x, y)


def test_measured_memory_of_the_lean_region_below_shape_bounds():
    """Tiny Swin at 64x64: the last stage is (B, 2, 2, C=128), MLP hidden 4C. Bounds from those shapes."""
    B, tokens, C, f32 = 2, 4, 128, 4
    unit = B * tokens * C * f32                          # one (B, 2, 2, C) float tensor
    small = 3 * 2 * B * tokens * f32 + B * C * f32 + B * 10 * f32 + B * 8 + 64   # LN stats, head input, CE
    vanilla = _kept_bytes("swin_tiny_test", "vanilla", 64)
    asi = _kept_bytes("swin_tiny_test", "asi", 64)
    rec = _kept_bytes("swin_tiny_test", "asi", 64, recompute=True)
    ckpt = _kept_bytes("swin_tiny_test", "asi", 64, checkpointing=True)
    mib = 2 ** 20
    # checkpointing keeps the two segment inputs (block 7.0's MLP input, block 7.1's input) and the final norm's input
    assert 3 * unit <= ckpt["measured_activation_mib"] * mib <= 3 * unit + small
    assert ckpt["measured_recompute_peak_mib"] > ckpt["measured_activation_mib"]  # a block's backward is transient
    # recompute: two GELU inputs (4C), block 7.1's norm1 input and attention input, norm2 input, final norm input,
    # plus what asi keeps (its analytic figure)
    bound = (2 * 4 + 4) * unit + rec["activation_mib"] * mib + small
    assert rec["measured_activation_mib"] * mib <= bound
    assert ckpt["measured_activation_mib"] < rec["measured_activation_mib"] < asi["measured_activation_mib"] \
        < vanilla["measured_activation_mib"]
    assert vanilla["measured_recompute_peak_mib"] is None and rec["measured_recompute_peak_mib"] > 0


def test_vit_resolution_and_offline_weights_errors(ckpts, monkeypatch):
    with pytest.raises(ValueError, match="takes 32x32 inputs only.*--data.resolution 32"):
        ClassificationModel("vit_tiny_test", 10, pretrained=False, input_shape=[4, 3, 64, 64])
    with pytest.raises(ValueError, match="choose one"):
        ClassificationModel("vit_tiny_test", 10, pretrained=False, checkpointing=True, recompute=True)
    with pytest.raises(ValueError, match="no published ImageNet weights.*--model.pretrained false"):
        create_model("swin_tiny_test", 10, pretrained=True)

    def offline(url, dst):
        raise OSError("network unreachable")

    monkeypatch.setattr(backbones, "_download", offline)
    with pytest.raises(FileNotFoundError) as e:
        create_model("swin_t", 10, pretrained=True)
    assert str(imagenet_weights_path("swin_t")) in str(e.value) and "swin_t-704ceda3.pth" in str(e.value)
    # a local file is used as for the CNNs
    torch.manual_seed(0)
    published = backbones.MODELS["swin_t"].builder()
    imagenet_weights_path("swin_t").parent.mkdir(parents=True)
    torch.save(published.state_dict(), imagenet_weights_path("swin_t"))
    model = create_model("swin_t", 7, pretrained=True)
    assert torch.equal(model.features[7][1].mlp[3].weight, published.features[7][1].mlp[3].weight)
    assert model.head.out_features == 7


@pytest.mark.parametrize("name,method,extra", [
    ("swin_tiny_test", "vanilla", ["--model.checkpointing", "true"]),
    ("swin_tiny_test", "gradfilter", []),
    ("swin_tiny_test", "hosvd", []),
    ("swin_tiny_test", "asi", ["--model.recompute", "true"]),
    ("vit_tiny_test", "asi", ["--model.checkpointing", "true"]),
])
def test_fit_tiny_transformers_on_digits(name, method, extra, run_cli, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cli = run_cli("fit", "--config", "configs/models/swin_t.yaml", "--model.backbone", name, "--model.method",
                  method, "--model.num_finetune", "4", "--exp_name", "t", "--trainer.limit_train_batches", "2",
                  "--trainer.limit_val_batches", "1", *extra)
    run = tmp_path / "runs" / "setupA" / name / "digits" / method / "t"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and len(metrics["patched_layers"]) == 4
    assert all(".mlp." in n for n in metrics["patched_layers"])
    assert metrics["resources"]["measured_activation_mib"] > 0
    assert f"on the last 4 linear layers matching include='mlp': {', '.join(metrics['patched_layers'])}" in caplog.text


def test_report_keeps_checkpointing_runs_beside_the_method(tmp_path):
    from classification.report import collect, format_table

    for exp, flags in (("l4", {}), ("l4_ckpt", {"checkpointing": True})):
        path = tmp_path / "setupA" / "swin_t" / "pets" / "vanilla" / exp / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({
            "settings": {"setup": "A", "model": "swin_t", "dataset": "pets", "method": "vanilla", "num_finetune": 4,
                         "model_args": {"checkpointing": False, "recompute": False, **flags}},
            "val_acc": 0.9, "epochs_completed": 1,
            "resources": {"activation_mib": 183.75, "measured_activation_mib": 27.8 if flags else 253.2}}))
    rows = collect(tmp_path)
    assert sorted(r["label"] for r in rows) == ["Vanilla training", "Vanilla training + checkpointing"]
    assert {r["label"]: r["measured_activation_mib"] for r in rows}["Vanilla training + checkpointing"] == 27.8
    assert "Vanilla training + checkpointing" in format_table(rows, "md")


def test_benchmark_variants_are_checked():
    from classification.benchmark import benchmark_models

    with pytest.raises(ValueError, match=r"\+checkpointing, \+recompute, \+micro, \+approx or \+approx\+recompute"):
        benchmark_models({"backbone": "swin_tiny_test"}, ["vanilla+offload"], 2, 32, progress=False)


@pytest.mark.parametrize("mode,layers", [("checkpointing", 5), ("recompute", 5)])
def test_recompute_is_exact_on_a_tiny_llama_whose_blocks_take_keyword_tensors(mode, layers):
    """Hugging Face blocks get ``hidden_states=`` as a keyword: it must be a Function input (saved once, gradient
    flowing back through the recomputed attention), not a constant captured in the closure."""
    from classification.llm import create_llm

    torch.manual_seed(0)
    base = create_llm("llama_tiny", num_classes=3, pretrained=False).double()
    ids = torch.randint(3, 20, (2, 7))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    y = torch.tensor([0, 2])
    ref, net = copy.deepcopy(base), copy.deepcopy(base)
    patched = asi_core.patch(ref, "vanilla", layers, layer_type="linear", include="mlp")
    asi_core.patch(net, "vanilla", layers, layer_type="linear", include="mlp")
    segments = rc.enable(net, patched, mode)
    assert any("self_attn" in s or s.endswith(tuple("0123456789")) for s in segments), segments
    grads = []
    for model in (ref, net):
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-9, atol=1e-12, msg=k)
