"""Users' run directories outlive our code: the same command keeps its run name and its "done" settings (golden
values recorded from main before the redesign, tests/fixtures/run_names.json, made by
tests/fixtures/make_run_names.py), and an option added later and left at its default changes neither."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest

from classification import rundir

REPO = Path(__file__).resolve().parent.parent
GOLDEN = json.loads((REPO / "tests" / "fixtures" / "run_names.json").read_text())


@pytest.fixture
def in_repo(monkeypatch, ckpts):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["main.py"])


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_a_command_keeps_its_run_name_and_done_settings(case, in_repo):
    from classification.cli import ASICLI

    golden = GOLDEN[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = ASICLI(args=golden["args"] + ["--run_root", "runs", "--trainer.enable_progress_bar", "false"], run=False)
    assert str(cli.run_dir) == golden["run_dir"]
    assert cli.lifecycle.settings() == golden["settings"]  # what "done" (--resume on a finished run) compares


def _with_dummy(section: str, value):
    """The golden settings of one run as run_settings sees them, with an option ``dummy_option`` that did not exist
    when the run was named (default 0) set to ``value``."""
    golden = GOLDEN["mcunet_asi"]["settings"]
    defaults = rundir.option_defaults()
    defaults[section] = {**defaults[section], "dummy_option": 0}
    model, data = dict(golden["model"]), dict(golden["data"])
    (model if section == "model" else data)["dummy_option"] = value
    return rundir.run_settings(model, data, golden["seed"], golden["trainer"], defaults=defaults), golden


@pytest.mark.parametrize("section", ["model", "data"])
def test_an_option_added_later_at_its_default_changes_no_name_and_no_done_status(section):
    at_default, golden = _with_dummy(section, 0)
    assert at_default == golden
    named = {k: at_default[k] for k in ("model", "data", "seed")}
    assert rundir.settings_hash(named) == GOLDEN["mcunet_asi"]["run_dir"].rsplit("_", 1)[1]
    changed, _ = _with_dummy(section, 3)  # set away from its default, it does name a new run
    assert changed[section]["dummy_option"] == 3 and changed != golden


def test_every_option_known_when_the_names_were_frozen_still_enters_the_name():
    """The frozen key sets are options of ClassificationModel/ClassificationData: an option renamed or dropped would
    silently change names, so it fails here first (an option added is fine: it enters names only when set)."""
    defaults = rundir.option_defaults()
    assert rundir.NAMED_MODEL_KEYS <= set(defaults["model"])
    assert rundir.NAMED_DATA_KEYS <= set(defaults["data"])
