"""``main.py measure`` and budgeted ASI rank selection in ``fit`` (classification/measure.py, model.py).

One measurement on digits (MCUNet, 32x32, batches of 8, last 6 convs, 2 batches) is shared by the tests.
BatchNorm runs on batch statistics (--model.set_bn_eval false): the randomly initialised network's
running statistics would make every gradient ~1e-10 and every perplexity look like 0.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BASE = ["--config", "configs/models/mcunet.yaml", "--config", "configs/data/digits.yaml",
        "--data.resolution", "32", "--data.batch_size", "8", "--model.set_bn_eval", "false",
        "--trainer.enable_progress_bar", "false"]
MEASURE = ["--measure.epsilons", "0.4,0.8,1.0", "--measure.num_batches", "2", "--measure.num_finetune", "6"]
FIT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
       "--trainer.num_sanity_val_steps", "0", "--trainer.enable_model_summary", "false",
       "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]


def main_py(root: Path, *args, run: bool = True):
    """``python main.py <args>`` in-process, runs under ``root/runs``; ``run=False``: only instantiate."""
    from classification.cli import ASICLI

    args = list(args if run else args[1:])  # without running there is no subcommand
    return ASICLI(args=args + ["--run_root", str(root / "runs")], run=run)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("measure")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        mp.setattr(sys, "argv", ["main.py"])
        mp.setenv("ASI_CKPT_DIR", str(root / "ckpts"))
        cli = main_py(root, "measure", *BASE, *MEASURE)
        yield root, cli


@pytest.fixture
def table_path(env) -> Path:
    return Path(env[1].measure_result["path"])


def test_measure_writes_a_valid_table_with_zero_perplexity_at_eps_1(env, table_path):
    import asi_core
    from asi_core.ranks import load_table

    root, cli = env
    assert table_path == root / "runs/setupA/mcunet/digits/measure/l6_bs8_res32/perplexity.json"
    table = load_table(table_path)
    assert (table["schema_version"], table["model"], table["dataset"]) == (1, "mcunet", "digits")
    assert (table["input_shape"], table["batch_size"], table["num_batches"]) == ([8, 3, 32, 32], 8, 2)
    assert table["epsilons"] == [0.4, 0.8, 1.0]
    # names relative to the backbone, as asi_core.patch returns them on model.net
    assert list(table["layers"]) == asi_core.candidate_layers(cli.model.net)[-6:]
    for name, entry in table["layers"].items():
        p, m = entry["perplexity"], entry["memory_mib"]
        assert p[0] > 0.1 and p[-1] <= 1e-5 * p[0], (name, p)  # eq. 7 vanishes without compression
        assert m[0] <= m[1] <= m[2], (name, m)  # ranks grow with eps
        assert all(a <= b <= d for a, b, d in zip(entry["ranks"][0], entry["ranks"][-1], entry["input_shape"]))
    png = Path(cli.measure_result["plot"])
    assert png == table_path.with_suffix(".png") and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (table_path.parent / "config_measure.yaml").is_file()


def test_same_settings_are_skipped_and_a_list_of_epsilons_works(env, table_path, monkeypatch):
    root, _ = env
    monkeypatch.chdir(REPO)
    before = table_path.stat().st_mtime_ns
    again = main_py(root, "measure", *BASE, *MEASURE)
    assert again.measure_result["skipped"] and table_path.stat().st_mtime_ns == before
    out = root / "elsewhere" / "p.json"
    other = main_py(root, "measure", *BASE, "--measure.epsilons", "[1.0, 0.6]", "--measure.num_batches", "1",
                    "--measure.num_finetune", "2", "--measure.out", str(out))
    assert not other.measure_result["skipped"] and json.loads(out.read_text())["epsilons"] == [0.6, 1.0]
    assert out.with_suffix(".png").is_file()


def test_measure_then_fit_under_the_hosvd_budget(env, table_path, monkeypatch):
    import asi_core
    from classification.rundir import read_metrics

    root, _ = env
    monkeypatch.chdir(REPO)
    cli = main_py(root, "fit", *BASE, *FIT, "--model.method", "asi", "--model.num_finetune", "4",
                  "--model.perplexity_file", str(table_path), "--model.budget", "hosvd@0.8")
    assert cli.run_dir.parent == root / "runs/setupA/mcunet/digits/asi"  # l4_budgethosvd@0.8_<settings digest>
    assert cli.run_dir.name.startswith("l4_budgethosvd@0.8_")
    sel = read_metrics(cli.run_dir)["rank_selection"]
    table = json.loads(table_path.read_text())
    names = list(table["layers"])[-4:]
    assert [c["name"] for c in sel["layers"]] == names == list(cli.model.patched)
    assert sel["budget"] == "hosvd@0.8"
    assert sel["budget_mib"] == sum(table["layers"][n]["memory_mib"][1] for n in names)  # eps 0.8
    assert sel["total_memory_mib"] <= sel["budget_mib"]
    assert sel["total_memory_mib"] == sum(c["memory_mib"] for c in sel["layers"])
    for c in sel["layers"]:
        j = table["epsilons"].index(c["eps"])
        assert c["ranks"] == table["layers"][c["name"]]["ranks"][j]
    used = {n: tuple(w.options["ranks"]) for n, w in asi_core.patched_layers(cli.model.net)}
    assert used == {c["name"]: tuple(c["ranks"]) for c in sel["layers"]}


@pytest.mark.parametrize("change, words", [
    (["--data.resolution", "48"], ["input shape", "[8, 3, 32, 32]", "[8, 3, 48, 48]"]),
    (["--data.batch_size", "4"], ["input shape", "[4, 3, 32, 32]"]),
    (["--model.num_finetune", "8"], ["no measurement for layer(s)"]),
    ("other model", ["mobilenet_v2", "mcunet"]),
])
def test_a_mismatched_table_is_rejected_naming_the_mismatch(env, table_path, change, words, monkeypatch):
    root, _ = env
    monkeypatch.chdir(REPO)
    path = table_path
    if change == "other model":
        path = root / "other_model.json"
        path.write_text(json.dumps({**json.loads(table_path.read_text()), "model": "mobilenet_v2"}))
        change = []
    with pytest.raises(ValueError) as err:
        main_py(root, "fit", *BASE, "--model.method", "asi", "--model.num_finetune", "4",
                "--model.perplexity_file", str(path), "--model.budget", "min", *change, run=False)
    assert str(path) in str(err.value) and all(w in str(err.value) for w in words), err.value


@pytest.mark.parametrize("args, words", [
    (["--model.ranks", "2", "--model.perplexity_file", "p.json", "--model.budget", "min"], ["choose one"]),
    (["--model.perplexity_file", "p.json"], ["--model.budget", "hosvd@0.8"]),
    (["--model.budget", "0.5"], ["--model.perplexity_file"]),
])
def test_rank_arguments_that_contradict_each_other(env, args, words, monkeypatch):
    root, _ = env
    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError) as err:
        main_py(root, "fit", *BASE, "--model.method", "asi", *args, run=False)
    assert all(w in str(err.value) for w in words), err.value


def test_parse_epsilons():
    from classification.measure import parse_epsilons

    assert parse_epsilons("0.9, 0.4,0.5") == parse_epsilons([0.4, 0.5, 0.9]) == [0.4, 0.5, 0.9]
    assert parse_epsilons(1) == [1.0]
    for bad in ("0.4,x", "0,0.5", "1.5", "", "0.4,0.4"):
        with pytest.raises(ValueError, match="epsilons"):
            parse_epsilons(bad)
