"""The command line: every shipped config parses and instantiates, arguments mean what they say,
bad input is answered with the valid choices, and a subcommand is one decorated method."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from conftest import REPO

CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))
BASE = ["--config", "configs/models/mcunet.yaml", "--config", "configs/data/digits.yaml"]


def instantiate(*args, tmp_path: Path):
    """Parse and instantiate model, data and trainer without running anything."""
    from classification.cli import ASICLI

    return ASICLI(args=list(args) + ["--run_root", str(tmp_path / "runs"),
                                     "--trainer.enable_progress_bar", "false"], run=False)


def compose(cfg: str) -> list[str]:
    """Put a shipped config together with what it needs to make a digits run (recipes come first)."""
    kind = cfg.split("/")[1]
    seg_model = ["--config", "configs/segmentation/pspnet_mv2.yaml"]  # (voc12aug: not loaded at instantiation)
    if kind == "segmentation" or cfg == "configs/recipes/segmentation.yaml":
        return ["--config", cfg] + (seg_model if kind == "recipes" else [])
    if kind == "data" and cfg.split("/")[-1] in ("voc12aug.yaml", "cityscapes.yaml", "digit_scenes.yaml"):
        return seg_model + ["--config", cfg]
    llm_data = ["--config", "configs/data/digits_tokens.yaml"]
    if cfg == "configs/models/tinyllama.yaml":  # 1.1B parameters: built shape-only (fake tensors), no download
        return ["--config", cfg, *llm_data, "--model.pretrained", "false", "--model.shape_only", "true"]
    if cfg in ("configs/models/llama_tiny.yaml", "configs/methods/lora.yaml"):
        return ["--config", "configs/models/llama_tiny.yaml", *llm_data] + (["--config", cfg] if kind == "methods" else [])
    if kind == "recipes":
        return ["--config", cfg] + BASE
    if kind == "models":  # ViT takes its one input size only (digits.yaml sets 32)
        fixed = ["--data.resolution", "224"] if "vit_" in cfg else []
        return ["--config", cfg, "--config", "configs/data/digits.yaml", *fixed]
    if kind == "data":  # real datasets are not loaded at instantiation; no ImageNet weights offline
        return ["--config", "configs/models/mcunet.yaml", "--config", cfg, "--model.pretrained", "false"]
    return BASE + ["--config", cfg]


def test_every_shipped_config_is_tested():
    kinds = {c.split("/")[1] for c in CONFIGS}
    assert kinds == {"models", "data", "methods", "recipes", "segmentation"}
    assert len(CONFIGS) >= 4 + 7 + 4 + 3


@pytest.mark.parametrize("cfg", CONFIGS)
def test_shipped_config_parses_and_instantiates(cfg, tmp_path, ckpts, monkeypatch):
    import yaml

    from classification.backbones import create_model
    from classification.data import num_classes_of

    monkeypatch.chdir(REPO)
    if "setupB_finetune" in cfg:  # fine-tuning starts from the half-1 export; make a stand-in
        (ckpts / "setupB").mkdir(parents=True)
        torch.save({"state_dict": create_model("mcunet", 10, pretrained=False).state_dict()},
                   ckpts / "setupB" / "mcunet_digits.ckpt")
    cli = instantiate(*compose(cfg), tmp_path=tmp_path)
    declared = yaml.safe_load((REPO / cfg).read_text())
    for key, value in declared.get("model", {}).items():
        if not (cfg.startswith("configs/recipes") and key == "pretrained"):  # digits.yaml overrides it
            assert cli.model.hparams[key] == value, key
    for key, value in declared.get("data", {}).items():
        assert cli.config.data[key] == value, key
    for key, value in declared.get("trainer", {}).items():
        assert cli.config.trainer[key] == value, key
    assert cli.model.hparams.num_classes == num_classes_of(cli.datamodule.name)
    if cli.model.task == "segmentation":  # pixel logits; "5" = the authors' 5L list (PSPNet-M: one layer)
        with torch.no_grad():
            assert cli.model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, cli.model.hparams.num_classes, 32, 32)
        assert cli.model.patched == ["decode_head.bottleneck.conv"] or cli.model.hparams.backbone != "pspnet_mv2"
        return
    net = cli.model.net
    res = cli.config.data.resolution
    with torch.no_grad(), getattr(net, "fake_mode", None) or contextlib.nullcontext():
        x = net.random_input(1, 8) if getattr(net, "is_language_model", False) else torch.zeros(1, 3, res, res)
        assert cli.model.eval()(x).shape == (1, cli.model.hparams.num_classes)
    assert len(cli.model.patched) in (cli.model.hparams.num_finetune, 42)  # 42: num_finetune "all" on MCUNet


def test_recipes_hold_the_paper_hyperparameters(tmp_path, ckpts, monkeypatch):
    monkeypatch.chdir(REPO)
    a = instantiate("--config", "configs/recipes/setupA.yaml", *BASE, tmp_path=tmp_path)
    assert (a.model.hparams.lr, a.model.hparams.momentum, a.model.hparams.weight_decay) == (0.05, 0.0, 1e-4)
    assert a.trainer.gradient_clip_val == 2.0 and a.trainer.gradient_clip_algorithm == "norm"
    p = instantiate("--config", "configs/recipes/setupB_pretrain.yaml", *BASE, tmp_path=tmp_path)
    assert p.model.hparams.method == "vanilla" and len(p.model.patched) == 42
    assert not p.model.hparams.set_bn_eval
    # the authors' recipe values (README "Differences from the authors' code")
    ha = a.model.hparams
    assert (ha.lr_min_factor, ha.scheduler_interval, ha.train_bn_affine) == (0.1, "epoch", True)
    assert a.datamodule.augment == "paper" and p.datamodule.partition_file == "auto"

def test_ranks_accept_one_int_or_a_list_of_4_tuples(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    one = instantiate(*BASE, "--model.method", "asi", "--model.ranks", "3", tmp_path=tmp_path)
    assert one.model.hparams.ranks == 3
    cli = instantiate(*BASE, "--model.method", "asi", "--model.num_finetune", "2",
                      "--model.ranks", "[[2, 3, 1, 1], [4, 5, 1, 1]]", tmp_path=tmp_path)
    assert [tuple(r) for r in cli.model.hparams.ranks] == [(2, 3, 1, 1), (4, 5, 1, 1)]
    import asi_core

    assert [w.options["ranks"] for _, w in asi_core.patched_layers(cli.model.net)] == [(2, 3, 1, 1), (4, 5, 1, 1)]


def test_num_finetune_all_and_run_dir_layout(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cli = instantiate(*BASE, "--model.method", "hosvd", "--model.num_finetune", "all", "--exp_name", "x",
                      tmp_path=tmp_path)
    assert cli.model.hparams.num_finetune == "all" and len(cli.model.patched) == 42
    assert cli.run_dir == tmp_path / "runs" / "setupA" / "mcunet" / "digits" / "hosvd" / "x"


@pytest.mark.parametrize("arg, words", [
    (["--model.backbone", "vgg"], ["vgg", "mcunet", "mobilenet_v2", "resnet18", "resnet34"]),
    (["--data.name", "mnist"], ["mnist", "digits", "cifar10", "cub200", "imagenet"]),
    (["--model.method", "dora"], ["dora", "vanilla", "gradfilter", "hosvd", "asi", "lora"]),
    (["--model.no_such_key", "1"], ["no_such_key"]),
])
def test_bad_input_lists_the_valid_choices(arg, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit):
        instantiate(*BASE, *arg, tmp_path=tmp_path)
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_num_finetune_out_of_range_reports_asi_core_message(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError, match="99"):
        instantiate(*BASE, "--model.num_finetune", "99", tmp_path=tmp_path)


def test_setup_b_finetuning_without_checkpoint_says_how_to_make_one(tmp_path, ckpts, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit):
        instantiate("--config", "configs/recipes/setupB_finetune.yaml", *BASE, tmp_path=tmp_path)
    err = capsys.readouterr().err
    assert "mcunet_digits.ckpt" in err and "--data.half 1" in err


def test_missing_dataset_says_where_and_how(tmp_path):
    from classification.data import ClassificationData

    for name, hint in [("cifar10", "cifar-10-batches-py"), ("cub200", "train_test_split"),
                       ("imagenet", "ImageFolder")]:
        dm = ClassificationData(name, root=str(tmp_path / "nodata"))
        with pytest.raises(FileNotFoundError) as e:
            dm.setup("fit")
        assert str(tmp_path / "nodata" / name) in str(e.value) and hint in str(e.value)


def test_a_subcommand_is_one_decorated_method(run_cli, tmp_path, capsys):
    from classification.cli import ASICLI, subcommand

    class CLI(ASICLI):
        @subcommand
        def count(self, model, datamodule, times: int = 1):
            """Count trainable parameters.

            Args:
                times: multiply by this.
            """
            self.counted = times * sum(p.numel() for p in model.parameters() if p.requires_grad)

    with pytest.raises(SystemExit):
        run_cli("count", "--help", tiny=False, cli_class=CLI)
    assert "multiply by this" in capsys.readouterr().out
    cli = run_cli("count", "--times", "2", cli_class=CLI)
    assert cli.counted == 2 * sum(p.numel() for p in cli.model.parameters() if p.requires_grad) > 0


def test_help_documents_the_model_arguments(run_cli, capsys):
    with pytest.raises(SystemExit):
        run_cli("fit", "--help", tiny=False)
    out = capsys.readouterr().out
    for arg in ["--model.method", "--model.num_finetune", "--model.ranks", "--model.eps", "--model.radius",
                "--model.warm_start", "--data.name", "--data.setup", "--data.batch_size", "--data.resolution"]:
        assert arg in out
    assert "explained-variance threshold" in out and "label-skewed" in out


def test_default_exp_name_says_what_differs():
    # the method's token comes from its registry class (Method.run_name), the same names as before the registry
    from classification.rundir import exp_name
    assert exp_name("asi", 4, {"ranks": 2}) == "l4_r2"
    assert exp_name("asi", 4, {"ranks": 2, "warm_start": False}) == "l4_r2_nowarm"
    assert exp_name("asi", 2, {"ranks": None, "budget": "hosvd@0.8"}) == "l2_budgethosvd@0.8"
    assert exp_name("asi", 2, {"ranks": [(2, 4, 3, 3), (1, 2, 3, 3)]}) == "l2_r2x4x3x3-1x2x3x3"
    assert exp_name("hosvd", "all", {"eps": 0.8}) == "lall_eps0.8"
    assert exp_name("gradfilter", 2, {"radius": 4}) == "l2_R4"
    assert exp_name("vanilla", 4, {"warm_start": False}) == "l4"


def test_the_cli_uses_lightnings_public_api_only():
    import inspect
    import re

    from pytorch_lightning import Trainer
    from pytorch_lightning.cli import LightningCLI

    from classification import cli, lifecycle, trainer

    # no private method of LightningCLI or Trainer overridden ...
    for ours, theirs in ((cli.ASICLI, LightningCLI), (trainer.ASITrainer, Trainer)):
        private = {n for n in dir(theirs) if n.startswith("_") and not n.startswith("__")}
        assert not private & set(vars(ours)), (ours, private & set(vars(ours)))
    # ... no private Lightning name imported or used, and the lifecycle knows nothing of the command line
    used = re.compile(r"import _|self\._parser\(|self\._get\(|_get_short_description|_subcommand_method_arguments|"
                      r"_subcommand_parsers|super\(\)\._[a-z]")
    for module in (cli, trainer, lifecycle):
        assert not used.findall(inspect.getsource(module)), module
    assert "LightningCLI" not in inspect.getsource(lifecycle) and "jsonargparse" not in inspect.getsource(lifecycle)


def test_nested_subcommand_options_come_from_a_config_section_too(run_cli, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli("benchmark", "--help", tiny=False)
    out = capsys.readouterr().out
    assert "--benchmark.steps" in out and "--benchmark.methods" in out and "Timed steps per method" in out
    cfg = tmp_path / "bench.yaml"
    cfg.write_text("benchmark:\n  steps: 0\n")
    with pytest.raises(SystemExit):
        run_cli("benchmark", "--config", str(cfg))
    assert "--benchmark.steps 0 is invalid: it must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli("measure", "--help", tiny=False)
    out = capsys.readouterr().out
    assert "--measure.epsilons" in out and "--measure.num_batches" in out and "--measure.out" in out
    with pytest.raises(SystemExit):
        run_cli("profile", "--help", tiny=False)
    assert "--device DEVICE" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for a machine without CUDA")
@pytest.mark.parametrize("args, option", [(["profile", "--config", "configs/models/mcunet.yaml", "--device", "cuda"],
                                           "--device cuda"),
                                          (["benchmark", "--config", "configs/models/mcunet.yaml",
                                            "--benchmark.device", "cuda:1"], "--benchmark.device cuda:1")])
def test_a_cuda_device_on_a_machine_without_one_is_refused_saying_what_to_use(args, option, monkeypatch, capsys):
    """Issue 22: --device cuda without a GPU gave a raw torch error mid-run."""
    from classification.cli import cli_main
    from classification.resources import resolve_device

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit):
        cli_main(args)
    err = capsys.readouterr().err
    assert f"error: {option}: this machine has no CUDA device" in err and "cpu, or auto" in err
    with pytest.raises(ValueError, match="is not a device: use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
