"""Corrupt files, bad numbers and diverging steps get clear answers (issue 13, problems 5, 7, 8 and 9)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import asi_core
from classification.model import ClassificationModel, RandomBackboneWarning
from classification.report import collect, format_table


def error_of(run_cli, capsys, *args) -> str:
    with pytest.raises(SystemExit) as exc:
        run_cli(*args)
    assert exc.value.code != 0
    return capsys.readouterr().err


# ------------------------------------------------------------------------------------------ problem 5
def _net(method, **options):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    asi_core.patch(net, method, num_finetune=1, **options)
    return net.train()


def _step(net, x):
    net.zero_grad()
    net(x).square().mean().backward()
    return net[2].weight.grad.clone()


def test_a_non_finite_batch_does_not_poison_asi_warm_start():
    net = _net("asi", ranks=2)
    clean = torch.randn(4, 3, 6, 6)
    bad = clean.clone()
    bad[0, 0, 0, 0] = float("nan")
    assert torch.isfinite(_step(net, clean)).all()
    method = net[2].method
    before = [u.clone() for u in method.factors()]
    with pytest.warns(RuntimeWarning, match=r"layer '2': non-finite \(NaN/inf\) input to asi.*previous step are kept"):
        g = _step(net, bad)
    assert not torch.isfinite(g).all()  # the step's own gradient is non-finite, as vanilla's would be
    assert all(torch.equal(a, b) for a, b in zip(before, method.factors()))  # the warm-start state is not
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per layer
        _step(net, bad * float("inf"))
    assert torch.isfinite(_step(net, clean)).all()  # the next clean batch trains normally
    assert all(torch.isfinite(u).all() for u in method.factors())


def test_hosvd_on_non_finite_input_names_the_layer():
    net = _net("hosvd", eps=0.8)
    x = torch.randn(4, 3, 6, 6)
    x[1, 2, 3, 3] = float("inf")
    with pytest.raises(torch.linalg.LinAlgError, match=r"layer '2': hosvd's SVD .* NaN/inf values"):
        _step(net, x)


def test_a_diverged_run_is_marked_in_metrics_json_and_the_report(run_cli, tmp_path):
    cli = run_cli("fit", "--config", "configs/methods/vanilla.yaml", "--exp_name", "boom", "--model.lr", "1e38")
    text = (cli.run_dir / "metrics.json").read_text()

    def no_bare_nan(token):
        raise AssertionError(f"metrics.json holds a bare {token}")

    m = json.loads(text, parse_constant=no_bare_nan)
    assert m["status"] == "diverged" and m["nonfinite_train_steps"] >= 1 and "val/loss" in m["diverged"]
    rows = collect([tmp_path / "runs"])
    assert [r["status"] for r in rows] == ["diverged"] and rows[0]["accuracy"] is None
    assert "| diverged |" in format_table(rows, "md")


# ------------------------------------------------------------------------------------------ problem 7
def test_truncated_imagenet_weights_name_the_file(ckpts):
    from classification.backbones import create_model, imagenet_weights_path

    path = imagenet_weights_path("mcunet")
    path.parent.mkdir(parents=True)
    buf = __import__("io").BytesIO()
    torch.save(create_model("mcunet", 1000, pretrained=False).state_dict(), buf)
    path.write_bytes(buf.getvalue()[:4096])
    with pytest.raises(ValueError, match=rf"ImageNet weights file {path} \(4096 bytes\).*truncated or corrupt.*"
                                         rf"Delete it"):
        create_model("mcunet", 10, pretrained=True)


def test_truncated_or_foreign_checkpoints_name_the_file(run_cli, capsys, tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": ClassificationModel(pretrained=False, num_finetune="all").state_dict()}, good)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ValueError, match=rf"--model.checkpoint {cut} \(2000 bytes\) is not a readable PyTorch "
                                         rf"checkpoint: it is truncated"):
        ClassificationModel(pretrained=False, checkpoint=str(cut))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("not a checkpoint\n")
    for bad in (cut, garbage):
        err = error_of(run_cli, capsys, "fit", "--exp_name", "x", "--ckpt_path", str(bad))
        assert f"--ckpt_path {bad}" in err and "not a readable PyTorch checkpoint" in err
        assert "weights_only" not in err.split("error:")[-1]  # no advice to unpickle an untrusted file


def test_patched_state_dict_into_another_model_says_which_keys_and_what_to_do():
    asi = ClassificationModel(pretrained=False, method="asi", num_finetune=2)
    plain = ClassificationModel(pretrained=False, method="vanilla", num_finetune=2)
    with pytest.raises(RuntimeError, match=r"compression buffers do not match .*--model.method vanilla.*unexpected "
                                           r"keys \['net\.blocks\..*method\.factor_0'.*--model.checkpoint"):
        plain.load_state_dict(asi.state_dict())


# ------------------------------------------------------------------------------------------ problem 8
@pytest.mark.parametrize("args, message", [
    (("fit", "--data.resolution", "0"), "--data.resolution 0 is invalid: it must be an integer >= 8"),
    (("fit", "--data.resolution", "7"), "--data.resolution 7 is invalid: it must be an integer >= 8"),
    (("fit", "--data.batch_size", "0"), "--data.batch_size 0 is invalid: it must be an integer >= 1"),
    (("fit", "--data.val_fraction", "1"), "--data.val_fraction 1.0 is invalid: it must be in [0, 1)"),
    (("profile", "--data.batch_size", "0"), "--data.batch_size 0 is invalid"),
    (("benchmark", "--benchmark.steps", "0"), "--benchmark.steps 0 is invalid: it must be an integer >= 1"),
    (("fit", "--model.method", "hosvd", "--model.eps", "5"), "--model.eps 5.0 is invalid: hosvd's"),
    (("fit", "--model.lr", "0"), "--model.lr 0.0 is invalid: it must be a finite number > 0"),
])
def test_numbers_that_cannot_work_are_refused_before_any_work(args, message, run_cli, capsys, tmp_path):
    err = error_of(run_cli, capsys, *args, "--exp_name", "x")
    assert message in err
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_a_config_section_that_is_not_a_mapping_is_refused(run_cli, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2, 3]\n")
    err = error_of(run_cli, capsys, "fit", "--config", str(bad))
    assert f"--config {bad}: section 'model' must be a mapping" in err


def test_conv_ranks_of_the_wrong_length_fail_at_patch():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    with pytest.raises(ValueError, match=r"layer '1': asi ranks \(2, 2, 2\) have 3 entries, but a Conv2d input has 4"):
        asi_core.patch(net, "asi", num_finetune=1, ranks=(2, 2, 2))


def test_options_the_method_ignores_are_named_in_a_warning():
    with pytest.warns(UserWarning, match=r"--model.eps 5 is ignored by --model.method vanilla \(it applies to hosvd\)"):
        ClassificationModel(pretrained=False, method="vanilla", num_finetune="all", eps=5)
    with pytest.warns(UserWarning, match=r"--model.warm_start False is ignored by --model.method hosvd \(it applies "
                                         r"to asi\)"):
        ClassificationModel(pretrained=False, method="hosvd", num_finetune="all", warm_start=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ClassificationModel(pretrained=False, method="hosvd", num_finetune="all", eps=0.5, set_bn_eval=False)


# ------------------------------------------------------------------------------------------ problem 9
def test_a_few_layers_on_a_random_frozen_backbone_warn_that_only_they_learn():
    with pytest.warns(RandomBackboneWarning, match=r"only the last 2 layer\(s\) and the head learn, on top of "
                                                   r"a randomly initialised and frozen backbone.*--model.num_finetune "
                                                   r"all"):
        ClassificationModel(pretrained=False, method="vanilla", num_finetune=2, set_bn_eval=False)
    with pytest.warns(RandomBackboneWarning, match=r"BatchNorm stays in eval mode with its initial statistics.*"
                                                   r"--model.set_bn_eval false"):
        ClassificationModel(pretrained=False, method="vanilla", num_finetune="all")
    with warnings.catch_warnings():  # training from scratch (the README's offline example): no warning
        warnings.simplefilter("error", RandomBackboneWarning)
        ClassificationModel(pretrained=False, method="vanilla", num_finetune="all", set_bn_eval=False)
