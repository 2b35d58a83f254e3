"""The run-directory lifecycle on its own (classification/lifecycle.py): no CLI, no training, fake run directories.

Every decision a command's run directory can lead to: start, refuse, --overwrite, --resume (nothing to do, other
settings, interrupted with and without a checkpoint), --ckpt_path (last, loose, another run's, other settings,
unreadable), the setup-B export, and validate/test's choice of weights. tests/test_runs_lifecycle.py runs the same
through main.py with real fits.
"""
from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from classification.lifecycle import (FitDecision, Run, RunRefused, checkpoint_provenance, checkpoint_run,
                                      export_source, file_sha256, is_launcher, setup_b_checkpoint)
from classification.rundir import read_metrics

MODEL = {"backbone": "mcunet", "method": "asi", "num_finetune": 2, "ranks": None, "lr": 0.05, "checkpoint": None,
         "num_classes": 10, "input_shape": [32, 3, 32, 32]}
DATA = {"name": "digits", "setup": "A", "half": 2, "batch_size": 32, "resolution": 32, "num_workers": 0}
TRAINER = {"max_epochs": 2, "limit_train_batches": 3}


def make_run(tmp_path, exp="t", model=None, data=None, trainer=None, launcher=True, seed=0) -> Run:
    return Run(tmp_path / "runs" / exp, {**MODEL, **(model or {})}, {**DATA, **(data or {})}, seed,
               {**TRAINER, **(trainer or {})}, launcher=launcher)


def write_ckpt(path, model=None, data=None, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"net.w": torch.ones(2)}, "hyper_parameters": {**MODEL, **(model or {})},
                "datamodule_hyper_parameters": {**DATA, **(data or {})}, **extra}, path)
    return path


def finished(run: Run, status="finished", step=6, settings=True, last=True) -> Run:
    """Make ``run.path`` hold a run that ended (``status``) with the run's own settings."""
    run.path.mkdir(parents=True, exist_ok=True)
    m = {"status": status, "global_step": step, "epochs_completed": 2}
    if settings:
        m["run_settings"] = run.settings()
    (run.path / "metrics.json").write_text(json.dumps(m))
    (run.path / "config.yaml").write_text("model: {}\n")
    if last:
        write_ckpt(run.last)
        write_ckpt(run.best)
    return run


def interrupted(run: Run, last=True) -> Run:
    run.path.mkdir(parents=True, exist_ok=True)
    (run.path / "metrics.json").write_text(json.dumps({"status": "running", "run_settings": run.settings()}))
    (run.path / "config.yaml").write_text("model: {}\n")
    if last:
        write_ckpt(run.last)
    return run


# ------------------------------------------------------------------------------------------ fit: start / refuse
def test_a_fresh_directory_starts(tmp_path):
    assert make_run(tmp_path).prepare_fit() == FitDecision("start")


def test_a_run_in_the_way_is_refused_and_kept(tmp_path):
    run = finished(make_run(tmp_path))
    before = (run.path / "metrics.json").read_text()
    with pytest.raises(RunRefused, match=r"already holds a run \(finished at step 6\); it is never overwritten "
                                         r"silently.*--ckpt_path last.*--overwrite true.*--exp_name"):
        run.prepare_fit()
    assert (run.path / "metrics.json").read_text() == before and run.last.is_file()


def test_overwrite_clears_the_run_and_starts(tmp_path, capsys):
    run = finished(make_run(tmp_path))
    (run.path / "partition.json").write_text("{}")  # what the lifecycle does not own stays
    assert run.prepare_fit(overwrite=True) == FitDecision("start")
    assert "--overwrite: discarding the run in" in capsys.readouterr().err
    assert not (run.path / "metrics.json").exists() and not (run.path / "config.yaml").exists()
    assert not (run.path / "checkpoints").exists() and (run.path / "partition.json").is_file()


def test_overwrite_and_resume_exclude_each_other(tmp_path):
    with pytest.raises(RunRefused, match=r"--overwrite true \(redo the run\) and --resume true \(continue it\) "
                                         r"exclude each other"):
        make_run(tmp_path).prepare_fit(resume=True, overwrite=True)


# ------------------------------------------------------------------------------------------ fit: --resume
def test_resume_with_nothing_there_starts(tmp_path):
    assert make_run(tmp_path).prepare_fit(resume=True) == FitDecision("start")


@pytest.mark.parametrize("status", ["finished", "diverged"])
def test_resume_on_a_run_that_ended_with_the_same_settings_does_nothing(status, tmp_path, capsys):
    run = finished(make_run(tmp_path), status=status)
    assert run.prepare_fit(resume=True) == FitDecision("done")
    err = capsys.readouterr().err
    assert f"already ran to its end with these settings (status {status}" in err and "nothing to do" in err
    assert run.last.is_file() and read_metrics(run.path)["status"] == status


def test_resume_with_other_settings_is_refused_listing_the_differences(tmp_path):
    finished(make_run(tmp_path))
    other = make_run(tmp_path, trainer={"max_epochs": 3}, model={"lr": 0.01})
    with pytest.raises(RunRefused) as err:
        other.prepare_fit(resume=True)
    msg = str(err.value)
    assert msg.startswith(f"--resume: {other.path} holds a run (finished at step 6) made with other settings "
                          f"(run -> command): ")
    assert "model.lr: 0.05 -> 0.01" in msg and "trainer.max_epochs: 2 -> 3" in msg and "--overwrite true" in msg


def test_resume_on_a_finished_run_without_recorded_settings_is_refused(tmp_path):
    run = finished(make_run(tmp_path), settings=False)
    with pytest.raises(RunRefused, match="holds a finished run that recorded no settings"):
        run.prepare_fit(resume=True)


def test_resume_continues_an_interrupted_run_from_its_last_checkpoint(tmp_path, capsys):
    run = interrupted(make_run(tmp_path))
    assert run.prepare_fit(resume=True) == FitDecision("resume", str(run.last))
    assert f"--resume: continuing {run.path} from {run.last}" in capsys.readouterr().err


def test_resume_clears_a_run_interrupted_before_its_first_checkpoint(tmp_path):
    run = interrupted(make_run(tmp_path), last=False)
    assert run.prepare_fit(resume=True) == FitDecision("start")
    assert not (run.path / "metrics.json").exists() and not (run.path / "config.yaml").exists()


def test_processes_started_by_a_ddp_launcher_neither_refuse_nor_delete(tmp_path, monkeypatch):
    finished(make_run(tmp_path))
    child = make_run(tmp_path, trainer={"max_epochs": 3}, launcher=False)
    assert child.prepare_fit(resume=True) == FitDecision("start")  # the launcher refused or decided already
    assert child.prepare_fit() == FitDecision("start") and (child.path / "metrics.json").is_file()
    empty = interrupted(make_run(tmp_path, "e", launcher=False), last=False)
    assert empty.prepare_fit(resume=True) == FitDecision("start") and (empty.path / "metrics.json").is_file()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not is_launcher() and not make_run(tmp_path, launcher=is_launcher()).launcher
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert is_launcher()


# ------------------------------------------------------------------------------------------ fit: --ckpt_path
def test_ckpt_path_last_resumes_from_last_ckpt_or_starts_without_one(tmp_path, capsys):
    run = make_run(tmp_path)
    assert run.prepare_fit("last") == FitDecision("start")
    assert f"--ckpt_path last: {run.path} has no checkpoints/last.ckpt yet; starting the run" in capsys.readouterr().err
    interrupted(run)
    assert run.prepare_fit("last") == FitDecision("resume", str(run.last))
    finished(run)  # a finished run resumed at its end: allowed (it trains nothing, its results stay)
    assert run.prepare_fit("last") == FitDecision("resume", str(run.last))


def test_a_checkpoint_made_with_other_settings_is_refused_listing_the_differences(tmp_path):
    run = make_run(tmp_path)
    ckpt = write_ckpt(tmp_path / "loose.ckpt", model={"method": "hosvd", "ranks": 3}, data={"batch_size": 16})
    with pytest.raises(RunRefused) as err:
        run.prepare_fit(str(ckpt))
    msg = str(err.value)
    assert msg.startswith(f"--ckpt_path {ckpt} was made with other settings than this command's (3 difference(s), "
                          f"checkpoint -> command): ")
    assert "model.method: 'hosvd' -> 'asi'" in msg and "model.ranks: 3 -> None" in msg
    assert "data.batch_size: 16 -> 32" in msg and "--config <run>/config.yaml" in msg


def test_a_checkpoint_knows_only_its_own_options(tmp_path):
    # an option newer than the checkpoint says nothing; ignored options (num_workers, input_shape) never count
    hp = {k: v for k, v in MODEL.items() if k != "lr"}
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {**hp, "input_shape": [1, 3, 8, 8]},
                "datamodule_hyper_parameters": {**DATA, "num_workers": 4}}, ckpt)
    assert make_run(tmp_path).prepare_fit(str(ckpt)) == FitDecision("resume", str(ckpt))


def test_unreadable_and_foreign_checkpoints_are_refused_naming_the_file(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(RunRefused, match=r"--ckpt_path .*nothere.ckpt does not exist"):
        run.prepare_fit(str(tmp_path / "nothere.ckpt"))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("not a checkpoint\n")
    with pytest.raises(RunRefused, match=rf"--ckpt_path {garbage} \(17 bytes\) is not a readable PyTorch checkpoint"):
        run.prepare_fit(str(garbage))
    plain = tmp_path / "plain.ckpt"
    torch.save({"net.w": torch.ones(1)}, plain)
    with pytest.raises(RunRefused, match=r"is not a Lightning checkpoint of this project \(no 'state_dict'\).*"
                                         r"--model.checkpoint"):
        run.prepare_fit(str(plain))


def test_a_loose_checkpoint_goes_into_an_empty_run_but_never_over_one(tmp_path):
    ckpt = write_ckpt(tmp_path / "loose.ckpt")
    assert checkpoint_run(ckpt) is None
    run = make_run(tmp_path)
    assert run.prepare_fit(str(ckpt)) == FitDecision("resume", str(ckpt))
    finished(run)
    with pytest.raises(RunRefused, match=r"already holds a run \(finished at step 6\); resuming the loose checkpoint "
                                         r".*would write over it.*--overwrite true"):
        run.prepare_fit(str(ckpt))
    assert run.prepare_fit(str(ckpt), overwrite=True) == FitDecision("resume", str(ckpt))


def test_another_runs_checkpoint_is_refused(tmp_path):
    a = finished(make_run(tmp_path, "a"))
    assert checkpoint_run(a.last) == a.path
    b = make_run(tmp_path, "b")
    with pytest.raises(RunRefused) as err:
        b.prepare_fit(str(a.last))
    assert f"--ckpt_path {a.last} belongs to the run {a.path}, but this command writes to {b.path}" in str(err.value)
    assert f"--model.checkpoint {a.last}" in str(err.value) and not b.path.exists()


# ------------------------------------------------------------------------------------------ setup B
def _export(ckpts, source_run):
    dst = setup_b_checkpoint("mcunet", "digits")
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.ones(1)}, "source_run": source_run}, dst)
    return dst


def test_setup_b_export_of_another_run_is_never_replaced_without_overwrite(tmp_path, ckpts):
    pre = make_run(tmp_path, "pretrain", data={"setup": "B", "half": 1})
    dst = _export(ckpts, "/elsewhere/pretrain")
    assert dst == ckpts / "setupB" / "mcunet_digits.ckpt"
    with pytest.raises(RunRefused, match=rf"{dst} already exists \(exported by /elsewhere/pretrain\); this "
                                         rf"pretraining would replace it. Pass --overwrite true"):
        pre.prepare_fit()
    assert pre.prepare_fit(overwrite=True) == FitDecision("start")
    torch.save({"state_dict": {}}, dst)  # no source recorded: an unknown run's
    with pytest.raises(RunRefused, match=r"exported by an unknown run"):
        pre.prepare_fit()
    _export(ckpts, str(pre.path.resolve()))  # its own export: redone freely
    assert pre.prepare_fit() == FitDecision("start")
    assert make_run(tmp_path, "ft", data={"setup": "B", "half": 2}).prepare_fit() == FitDecision("start")


def test_setup_b_pretraining_exports_its_best_weights_and_records_them(tmp_path, ckpts, capsys):
    pre = make_run(tmp_path, "pretrain", data={"setup": "B", "half": 1})
    best = write_ckpt(pre.best)
    pre.record_start(["fit"], None)
    m = pre.record_end({"fit": {"val/acc": 0.5}}, str(best), state_dict=lambda: pytest.fail("best.ckpt exists"))
    dst = setup_b_checkpoint("mcunet", "digits")
    saved = torch.load(dst, weights_only=True)
    assert saved["state_dict"].keys() == {"w"} and saved["source_run"] == str(pre.path.resolve())
    assert (saved["backbone"], saved["dataset"], saved["num_classes"], saved["source_ckpt"]) == \
        ("mcunet", "digits", 10, str(best))
    assert m["exported_ckpt"] == str(dst) and m["exported_ckpt_sha256"] == file_sha256(dst)
    assert export_source(dst) == str(pre.path.resolve())
    # --overwrite: another run's export replaced, saying so; without a best checkpoint the model's weights
    _export(ckpts, "/elsewhere/pretrain")
    pre.export_pretrained(None, lambda: {"net.v": torch.zeros(3), "head": torch.ones(1)})
    assert "--overwrite: replacing" in capsys.readouterr().err
    assert torch.load(dst, weights_only=True)["state_dict"].keys() == {"v"}


def test_finetuning_records_the_weights_it_started_from(tmp_path, ckpts):
    dst = _export(ckpts, "/elsewhere/pretrain")
    ft = make_run(tmp_path, "ft", model={"checkpoint": str(dst)}, data={"setup": "B", "half": 2})
    ft.record_start(["fit", "--x"], None)
    m = read_metrics(ft.path)
    assert m["init_checkpoint"] == checkpoint_provenance(dst) == {
        "path": str(dst.resolve()), "sha256": hashlib.sha256(dst.read_bytes()).hexdigest(),
        "source_run": "/elsewhere/pretrain"}
    assert m["status"] == "running" and m["command"] == ["fit", "--x"] and m["run_settings"] == ft.settings()


# ------------------------------------------------------------------------------------------ metrics.json
def test_the_status_recorded_at_the_end_of_a_fit(tmp_path, capsys):
    run = make_run(tmp_path)
    run.record_start(["fit"], None)
    assert read_metrics(run.path)["resumed_from"] is None
    assert run.record_end({"fit": {"train/loss": 0.1}}, None, dict)["status"] == "finished"
    run.record_start(["fit"], str(run.last))  # resumed at its end: nothing trained, the status stays
    assert read_metrics(run.path)["status"] == "running"
    m = run.record_end({"fit": {}}, None, dict)
    assert m["status"] == "finished" and m["fit"] == {"train/loss": 0.1}  # the earlier results are kept
    run.record_start(["fit"], None)
    m = run.record_end({"fit": {"train/loss": math.nan, "val/loss": 1.0}, "nonfinite_train_steps": 2}, None, dict)
    assert m["status"] == "diverged" and m["diverged"] == ["train/loss"]
    assert "warning: the run diverged: train/loss not finite (2 training step(s)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ validate / test
def test_evaluation_uses_the_runs_best_checkpoint(tmp_path, capsys):
    run = finished(make_run(tmp_path))
    assert run.prepare_evaluation("test") == str(run.best)
    assert f"test: using the run's best checkpoint {run.best}" in capsys.readouterr().err
    assert run.prepare_evaluation("validate", "last") == "last"


def test_untrained_weights_are_never_evaluated_into_a_trained_run(tmp_path, capsys):
    run = finished(make_run(tmp_path), last=False)
    with pytest.raises(RunRefused, match=r"holds a trained run but no checkpoints/best.ckpt: give the weights to "
                                         r"validate with --ckpt_path"):
        run.prepare_evaluation("validate")
    empty = make_run(tmp_path, "none")
    assert empty.prepare_evaluation("test") is None
    assert "test: no run with these settings in" in capsys.readouterr().err


def test_an_evaluated_checkpoint_must_have_the_commands_model_settings(tmp_path):
    run = make_run(tmp_path)
    other_data = write_ckpt(tmp_path / "a.ckpt", data={"batch_size": 8})  # data may differ for an evaluation
    assert run.prepare_evaluation("test", str(other_data)) == str(other_data)
    other_model = write_ckpt(tmp_path / "b.ckpt", model={"num_finetune": 4})
    with pytest.raises(RunRefused, match=r"model.num_finetune: 4 -> 2"):
        run.prepare_evaluation("test", str(other_model))


def test_evaluating_a_checkpoint_ignores_training_only_options_but_not_the_network(tmp_path):
    """Issue 22: `test --ckpt_path <run>/checkpoints/best.ckpt` was refused when only a training option (lr)
    differed; the network's own settings are still compared."""
    ckpt = write_ckpt(tmp_path / "trained.ckpt", model={"lr": 0.5, "momentum": 0.5, "ranks": 7})
    run = make_run(tmp_path)
    assert run.prepare_evaluation("test", str(ckpt)) == str(ckpt)
    with pytest.raises(RunRefused, match="model.lr: 0.5"):
        run.prepare_fit(str(ckpt))  # resuming training does compare them
    other = write_ckpt(tmp_path / "other.ckpt", model={"lr": 0.5, "method": "hosvd"})
    with pytest.raises(RunRefused, match=r"\(1 difference\(s\), checkpoint -> command\): model.method: 'hosvd' -> 'asi'"):
        run.prepare_evaluation("test", str(other))
