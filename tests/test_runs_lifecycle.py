"""Runs never lose or silently overwrite work (issue 13): last.ckpt is the last state, a killed fit resumes where
it stopped, a resume must match the checkpoint's settings and run, a finished run is not overwritten, test/validate
use the run's best checkpoint, run names tell settings apart, the setup-B export is protected and recorded."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from classification.cli import ASICLI, setup_b_checkpoint
from conftest import REPO, TINY
from test_framework_fit import Probe

TESTS = Path(__file__).resolve().parent
ASI = ("--config", "configs/methods/asi.yaml")


def run_path(tmp_path, exp, method="asi", setup="A"):
    return tmp_path / "runs" / f"setup{setup}" / "mcunet" / "digits" / method / exp


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def metrics(run):
    return json.loads((run / "metrics.json").read_text())


def error_of(run_cli, capsys, *args) -> str:
    with pytest.raises(SystemExit) as exc:
        run_cli(*args)
    assert exc.value.code != 0
    return capsys.readouterr().err


# ------------------------------------------------------------------------------------------ problem 1
def test_last_ckpt_holds_the_final_state_even_when_val_acc_never_improves(run_cli, tmp_path):
    # lr 1e-12: the weights barely move, val/acc stays put, so best.ckpt is written once (epoch 1) ...
    cli = run_cli("fit", *ASI, "--exp_name", "lastck", "--trainer.max_epochs", "3", "--model.lr", "1e-12")
    run = run_path(tmp_path, "lastck")
    assert metrics(run)["global_step"] == 9 and metrics(run)["status"] == "finished"
    # ... and last.ckpt is still the state at the end of the run: step 9, the final weights and ASI buffers
    last = load(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 9 and last["epoch"] == 2
    final = cli.model.state_dict()
    assert last["state_dict"].keys() == final.keys()
    for k, v in final.items():
        assert torch.equal(last["state_dict"][k], v), k


# ------------------------------------------------------------------------------------------ kill and resume
def _fit_killed(tmp_path, exp: str, step: int, sig: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ASI_CKPT_DIR": str(tmp_path / "ckpts"), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    killer = json.dumps([{"class_path": "killer.KillAt", "init_args": {"step": step, "sig": sig}}])
    cmd = [sys.executable, "main.py", "fit", *ASI, *TINY, "--trainer.max_epochs", "2", "--exp_name", exp,
           "--run_root", str(tmp_path / "runs"), "--trainer.callbacks", killer]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_sigkill_mid_epoch_then_resume_ends_with_the_uninterrupted_weights(run_cli, tmp_path):
    ref = run_path(tmp_path, "ref")
    run_cli("fit", *ASI, "--exp_name", "ref", "--trainer.max_epochs", "2")
    # killed mid-epoch 2 (before step 5): last.ckpt is the end of epoch 1, the run is not marked finished
    proc = _fit_killed(tmp_path, "killed", step=4, sig="SIGKILL")
    assert proc.returncode == -9, proc.stderr[-3000:]
    run = run_path(tmp_path, "killed")
    saved = load(run / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 3 and metrics(run)["status"] == "running"
    # the same command, told to resume (as the sweeps do): it starts at step 3 with the saved weights and
    # warm-start buffers ...
    cli = run_cli("fit", *ASI, "--exp_name", "killed", "--trainer.max_epochs", "2", "--resume", "true",
                  cli_class=Probe)
    assert cli.seen["step"] == 3
    for k, v in cli.seen["buffers"].items():
        assert torch.equal(v, saved["state_dict"][k]), k
    # ... ends at the planned step, with the weights, buffers and optimiser state of the uninterrupted run
    m = metrics(run)
    assert m["global_step"] == 6 and m["status"] == "finished" and m["resumed_from"].endswith("last.ckpt")
    a, b = load(ref / "checkpoints" / "last.ckpt"), load(run / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 6
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert m["weights_digests"] == metrics(ref)["weights_digests"]


def test_sigterm_saves_the_state_at_the_stop_and_resume_continues_from_it(run_cli, tmp_path):
    proc = _fit_killed(tmp_path, "term", step=4, sig="SIGTERM")
    assert proc.returncode == 143 and "--ckpt_path last" in proc.stderr, proc.stderr[-3000:]
    run = run_path(tmp_path, "term")
    saved = load(run / "checkpoints" / "last.ckpt")
    # Lightning finishes the batch it is in (step 4 -> 5), then stops; the checkpoint is that state
    assert saved["global_step"] == 5
    assert metrics(run)["status"] == "interrupted" and metrics(run)["global_step"] == 5
    cli = run_cli("fit", *ASI, "--exp_name", "term", "--trainer.max_epochs", "2", "--ckpt_path", "last",
                  cli_class=Probe)
    assert cli.seen["step"] == 5
    for k, v in cli.seen["buffers"].items():
        assert torch.equal(v, saved["state_dict"][k]), k
    assert metrics(run)["global_step"] == 6 and metrics(run)["status"] == "finished"


# ------------------------------------------------------------------------------------------ problems 2 and 3
def test_a_run_is_never_overwritten_and_evaluation_uses_its_best_checkpoint(run_cli, tmp_path, capsys):
    run_cli("fit", *ASI, "--exp_name", "t")
    run = run_path(tmp_path, "t")
    before = (run / "metrics.json").read_text(), (run / "checkpoints" / "last.ckpt").read_bytes()

    err = error_of(run_cli, capsys, "fit", *ASI, "--exp_name", "t")
    assert "already holds a run (finished at step 3)" in err and "--overwrite true" in err
    assert ((run / "metrics.json").read_text(), (run / "checkpoints" / "last.ckpt").read_bytes()) == before

    # resuming a run that is already at its end trains nothing and keeps its results and status
    run_cli("fit", *ASI, "--exp_name", "t", "--ckpt_path", "last")
    m = metrics(run)
    assert m["status"] == "finished" and m["global_step"] == 3 and "val/acc" in m["fit"]
    assert m["fit"] == json.loads(before[0])["fit"]

    # test without --ckpt_path: the run's best checkpoint, not the untrained model
    cli = run_cli("test", *ASI, "--exp_name", "t")
    m = metrics(run)
    assert m["test"]["ckpt_path"] == str(run / "checkpoints" / "best.ckpt") and m["global_step"] == 3
    best = load(run / "checkpoints" / "best.ckpt")["state_dict"]
    assert all(torch.equal(v, cli.model.state_dict()[k]) for k, v in best.items())

    # --resume true on the finished run: nothing to do; --overwrite true: redone from scratch
    with pytest.raises(SystemExit) as exc:
        run_cli("fit", *ASI, "--exp_name", "t", "--resume", "true")
    assert exc.value.code == 0 and "nothing to do" in capsys.readouterr().err
    run_cli("fit", *ASI, "--exp_name", "t", "--overwrite", "true", "--trainer.max_epochs", "2")
    assert metrics(run)["global_step"] == 6 and "test" not in metrics(run)
    # --resume with other settings than the finished run: refused, the differences listed
    err = error_of(run_cli, capsys, "fit", *ASI, "--exp_name", "t", "--resume", "true", "--trainer.max_epochs", "3")
    assert "trainer.max_epochs: 2 -> 3" in err


def test_resume_must_match_the_checkpoints_settings_and_run(run_cli, tmp_path, capsys):
    run_cli("fit", *ASI, "--exp_name", "a")
    last = run_path(tmp_path, "a") / "checkpoints" / "last.ckpt"
    err = error_of(run_cli, capsys, "fit", "--config", "configs/methods/hosvd.yaml", "--exp_name", "a",
                   "--ckpt_path", str(last))
    assert "model.method: 'asi' -> 'hosvd'" in err
    err = error_of(run_cli, capsys, "fit", *ASI, "--exp_name", "a", "--model.ranks", "3", "--data.batch_size", "16",
                   "--ckpt_path", str(last))
    assert "model.ranks: None -> 3" in err and "data.batch_size: 32 -> 16" in err
    # the same settings, but another run directory: refused rather than training into someone else's run
    err = error_of(run_cli, capsys, "fit", *ASI, "--exp_name", "b", "--ckpt_path", str(last))
    assert f"belongs to the run {last.parent.parent}" in err and "--model.checkpoint" in err
    assert not run_path(tmp_path, "b").exists()


def test_default_run_names_tell_every_result_setting_apart(tmp_path, ckpts, monkeypatch):
    monkeypatch.chdir(REPO)

    def name(*extra):
        return ASICLI(args=[*TINY, *ASI, "--run_root", str(tmp_path), *extra], run=False).run_dir.name

    base = name()
    assert base.startswith("l2_r4_") and base == name()  # readable prefix, stable digest
    others = [name("--data.resolution", "16"), name("--data.batch_size", "16"), name("--model.lr", "0.01"),
              name("--seed_everything", "1"), name("--model.warm_start", "false")]
    assert len({base, *others}) == 6
    assert name("--data.num_workers", "1") == base  # loading speed does not change the result
    assert name("--exp_name", "mine") == "mine"


# ------------------------------------------------------------------------------------------ problem 4
def test_setup_b_export_is_never_replaced_silently_and_finetuning_records_it(run_cli, tmp_path, ckpts, capsys):
    from classification.model import ClassificationModel

    export = setup_b_checkpoint("mcunet", "digits")
    export.parent.mkdir(parents=True)
    net = ClassificationModel(backbone="mcunet", num_classes=10, pretrained=False, num_finetune="all").net
    torch.save({"state_dict": net.state_dict(), "source_run": "/elsewhere/pretrain"}, export)
    before = export.read_bytes()
    err = error_of(run_cli, capsys, "fit", "--config", "configs/recipes/setupB_pretrain.yaml")
    assert f"{export} already exists (exported by /elsewhere/pretrain)" in err and "--overwrite true" in err
    assert export.read_bytes() == before

    ft = run_cli("fit", "--config", "configs/recipes/setupB_finetune.yaml", *ASI, "--exp_name", "ft")
    init = metrics(ft.run_dir)["init_checkpoint"]
    assert init == {"path": str(export.resolve()), "sha256": hashlib.sha256(before).hexdigest(),
                    "source_run": "/elsewhere/pretrain"}


# ------------------------------------------------------------------------------------------ problem 6
def test_sweeps_count_a_run_as_done_only_with_the_requested_settings(tmp_path):
    from test_scripts import fake_python, sh

    runs, log = tmp_path / "runs", tmp_path / "log"
    env = {"PYTHON": str(fake_python(tmp_path)), "FAKE_LOG": str(log), "MODELS": "mcunet", "DATASETS": "pets",
           "SETUPS": "A", "LAYERS": "2", "RUN_ROOT": str(runs), "DATA_ROOT": str(tmp_path / "data")}
    quick = {**env, "EXTRA_ARGS": "--trainer.max_epochs 2"}
    command = next(c for c in sh("baselines", env={**quick, "DRY_RUN": "1"}).stdout.splitlines()
                   if "--exp_name l2 " in c)
    run = runs / "setupA/mcunet/pets/vanilla/l2"
    run.mkdir(parents=True)  # the quick pass finished this run
    (run / "metrics.json").write_text(json.dumps({"status": "finished", "epochs_completed": 2}, indent=2))
    (run / "sweep_command.txt").write_text(command + "\n")
    assert "skip (done): " + str(run / "metrics.json") in sh("baselines", env={**quick, "DRY_RUN": "1"}).stderr
    # 50 epochs asked: not done; main.py is asked to --resume, which compares the resolved settings
    full = sh("baselines", env={**env, "EXTRA_ARGS": "--trainer.max_epochs 50", "DRY_RUN": "1"})
    line = next(c for c in full.stdout.splitlines() if "--exp_name l2 " in c)
    assert "--resume true" in line and line.endswith("--trainer.max_epochs 50")
    assert "skip (done): " + str(run / "metrics.json") not in full.stderr
    redo = sh("baselines", env={**env, "EXTRA_ARGS": "--trainer.max_epochs 50", "DRY_RUN": "1", "OVERWRITE": "1"})
    assert all("--overwrite true" in c and "--resume" not in c for c in redo.stdout.splitlines() if "main.py fit" in c)


# ------------------------------------------------------------------------------------------ atomic writes (issue 22)
def test_a_write_that_fails_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    import errno

    from classification.rundir import atomic_write, read_metrics, write_metrics

    path = tmp_path / "last.ckpt"
    atomic_write(path, lambda f: torch.save({"step": 1}, f))

    def full_disk(f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match=r"could not write .*last.ckpt \(No space left on device\); the previous file "
                                      r"is intact"):
        atomic_write(path, full_disk)
    assert load(path) == {"step": 1} and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]

    write_metrics(tmp_path, {"status": "running"})

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError):
        write_metrics(tmp_path, {"status": "finished"})
    monkeypatch.undo()
    assert read_metrics(tmp_path)["status"] == "running"  # the old file, and no orphan .metrics.json.<pid>.tmp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "metrics.json"]


def test_fit_writes_its_checkpoints_atomically(run_cli, tmp_path):
    from classification.callbacks import AtomicCheckpointIO

    cli = run_cli("fit", *ASI, "--exp_name", "atomic")
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    ckpts = run_path(tmp_path, "atomic") / "checkpoints"
    assert load(ckpts / "last.ckpt")["global_step"] == 3 and not list(ckpts.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------ issue 22: every mode exact
def _killed(tmp_path, exp: str, step: int, sig: str, args) -> subprocess.CompletedProcess:
    env = {**os.environ, "ASI_CKPT_DIR": str(tmp_path / "ckpts"), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    killer = json.dumps([{"class_path": "killer.KillAt", "init_args": {"step": step, "sig": sig}} if step >= 0 else
                         {"class_path": "killer.KillInValidation", "init_args": {"epoch": -step - 1, "sig": sig}}])
    cmd = [sys.executable, "main.py", "fit", *args, "--exp_name", exp, "--run_root", str(tmp_path / "runs"),
           "--trainer.callbacks", killer]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _same_as_uninterrupted(run_cli, tmp_path, args, step, sig, rc, planned):
    """The uninterrupted run, the same command killed by ``sig`` at ``step`` (a negative step -e-1: in the
    end-of-epoch validation of epoch e) and resumed with --ckpt_path last: the same final step, weights, buffers and
    optimiser state."""
    ref = run_cli("fit", *args, "--exp_name", "ref", tiny=False).run_dir
    proc = _killed(tmp_path, "killed", step, sig, args)
    assert proc.returncode == rc, proc.stderr[-3000:]
    run = run_cli("fit", *args, "--exp_name", "killed", "--ckpt_path", "last", tiny=False).run_dir
    m, r = metrics(run), metrics(ref)
    assert r["global_step"] == m["global_step"] == planned and m["status"] == "finished"
    assert m["weights_digests"] == r["weights_digests"]
    a, b = load(ref / "checkpoints" / "last.ckpt"), load(run / "checkpoints" / "last.ckpt")
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert str(a["optimizer_states"]) == str(b["optimizer_states"]) and a["lr_schedulers"] == b["lr_schedulers"]
    return r, m


CNN = [*ASI, *TINY, "--data.augment", "standard"]  # random crops and flips: the data's random state matters


@pytest.mark.parametrize("sig,step,rc", [("SIGKILL", 4, -9), ("SIGTERM", 4, 143), ("SIGTERM", -1, 143)])
def test_epochs_and_steps_bounded_cnn_resumes_exactly_after_a_kill_or_a_stop(run_cli, tmp_path, sig, step, rc):
    """max_epochs 3 + max_steps 300 + 3 batches an epoch: killed in epoch 1, the resumed run ended at step 6 instead
    of 9 (Lightning skipped an epoch); stopped mid-epoch by SIGTERM, it ended with other weights (the epoch's
    order restarted, the random state not restored)."""
    args = [*CNN, "--trainer.max_epochs", "3", "--trainer.max_steps", "300"]
    ref, resumed = _same_as_uninterrupted(run_cli, tmp_path, args, step, sig, rc, planned=9)
    assert resumed["weights_digests"] == ref["weights_digests"] and resumed["resumed_from"].endswith("last.ckpt")


def test_a_loader_with_worker_processes_resumes_exactly_mid_epoch(run_cli, tmp_path):
    """Worker processes prefetch as soon as Lightning makes the loader's iterator, before any epoch hook: the
    loader is made at the resumed epoch and position (a review found epoch 0's order replayed)."""
    args = [*CNN, "--trainer.max_epochs", "3", "--data.num_workers", "2"]
    ref, resumed = _same_as_uninterrupted(run_cli, tmp_path, args, 4, "SIGTERM", 143, planned=9)
    assert resumed["weights_digests"] == ref["weights_digests"] and resumed["resumed_from"].endswith("last.ckpt")


def test_steps_bounded_cnn_with_a_step_schedule_resumes_exactly(run_cli, tmp_path):
    args = [*CNN, "--trainer.max_epochs", "-1", "--trainer.max_steps", "7", "--model.scheduler_interval", "step"]
    ref, resumed = _same_as_uninterrupted(run_cli, tmp_path, args, 4, "SIGKILL", -9, planned=7)
    assert resumed["weights_digests"] == ref["weights_digests"] and resumed["resumed_from"].endswith("last.ckpt")


def test_llama_tiny_resumes_exactly(run_cli, tmp_path):
    args = ["--config", "configs/models/llama_tiny.yaml", "--config", "configs/data/digits_tokens.yaml",
            "--model.method", "asi", "--model.ranks", "4", "--model.num_finetune", "3", "--model.optimizer", "adam",
            "--model.lr", "1e-3", "--data.batch_size", "32", "--trainer.max_epochs", "3", "--trainer.max_steps",
            "300", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_model_summary", "false",
            "--trainer.enable_progress_bar", "false"]
    ref, resumed = _same_as_uninterrupted(run_cli, tmp_path, args, 4, "SIGTERM", 143, planned=9)
    assert resumed["weights_digests"] == ref["weights_digests"] and resumed["resumed_from"].endswith("last.ckpt")


def test_the_step_based_segmentation_recipe_killed_mid_epoch_resumes_from_its_last_validation(run_cli, tmp_path):
    """One long epoch, validation every 3 steps: last.ckpt is written after each validation too, so a run killed
    at step 5 continues from step 3 (Python's random drives the digit-scenes augmentation) and ends exactly."""
    args = ["--config", "configs/recipes/segmentation.yaml", "--config", "configs/segmentation/pspnet_mv2.yaml",
            "--config", "configs/data/digit_scenes.yaml", "--data.resolution", "32", "--data.batch_size", "16",
            "--model.method", "asi", "--trainer.max_steps", "8", "--trainer.val_check_interval", "3",
            "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_model_summary", "false", "--trainer.enable_progress_bar", "false"]
    ref, resumed = _same_as_uninterrupted(run_cli, tmp_path, args, 5, "SIGKILL", -9, planned=8)
    assert resumed["weights_digests"] == ref["weights_digests"] and resumed["resumed_from"].endswith("last.ckpt")


def test_ckpt_path_last_on_a_run_killed_before_its_first_checkpoint_starts_it_again(run_cli, tmp_path, capsys):
    args = [*CNN, "--trainer.max_epochs", "2"]
    proc = _killed(tmp_path, "early", 1, "SIGKILL", args)
    assert proc.returncode == -9
    run = run_cli("fit", *args, "--exp_name", "early", "--ckpt_path", "last", tiny=False).run_dir
    assert metrics(run)["status"] == "finished" and metrics(run)["global_step"] == 6
    # a run that has other checkpoints (best.ckpt, the user's) but no last.ckpt is never cleared by it
    (run / "checkpoints" / "last.ckpt").unlink()
    with open(run / "metrics.json") as f:
        data = json.load(f)
    (run / "metrics.json").write_text(json.dumps({**data, "status": "interrupted"}))
    with pytest.raises(SystemExit):
        run_cli("fit", *args, "--exp_name", "early", "--ckpt_path", "last", tiny=False)
    assert (run / "checkpoints" / "best.ckpt").is_file()
    assert "already holds a run" in capsys.readouterr().err


def test_evaluating_another_runs_checkpoint_never_writes_into_a_third_run(run_cli, tmp_path, capsys):
    """A checkpoint accepted for evaluation (only a training option differs) must not put its scores into the
    command's own, different run (a review found them written into it)."""
    a = run_cli("fit", *ASI, "--exp_name", "a").run_dir
    run_cli("fit", *ASI, "--exp_name", "b", "--model.lr", "0.01")
    err = error_of(run_cli, capsys, "test", *ASI, "--exp_name", "b", "--model.lr", "0.01", "--ckpt_path",
                   str(a / "checkpoints" / "best.ckpt"))
    assert f"belongs to the run {a}" in err and "would then hold another run's scores" in err


def test_a_failed_checkpoint_write_marks_the_run_with_the_first_error(run_cli, tmp_path, monkeypatch):
    """Issue 22: with a full disk the run stayed "running" and the error shown was the second failure (the
    checkpoint written again at the interruption)."""
    import errno

    import classification.callbacks as callbacks

    failures = []

    def full(self, checkpoint, path, storage_options=None):
        failures.append(path)
        raise OSError(errno.ENOSPC, f"No space left on device (write {len(failures)})", str(path))

    monkeypatch.setattr(callbacks.AtomicCheckpointIO, "save_checkpoint", full)
    with pytest.warns(UserWarning, match=r"last.ckpt could not be written at the interruption .*write 2"):
        with pytest.raises(OSError, match=r"write 1\)"):
            run_cli("fit", *ASI, "--exp_name", "full", "--trainer.max_epochs", "2")
    m = metrics(run_path(tmp_path, "full"))
    assert len(failures) == 2 and m["status"] == "interrupted" and m["interrupted_by"] == "OSError"
    assert "No space left on device (write 1)" in m["error"]
