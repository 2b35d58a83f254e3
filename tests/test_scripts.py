"""The sweep scripts (scripts/*.sh): valid bash, DRY_RUN=1 prints the paper's commands and runs nothing, finished
runs are skipped (a resumed sweep runs only what is missing), failures stop the sweep or are tallied."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
SWEEPS = ["asi_setupA", "asi_setupB", "baselines", "latency", "paper", "perplexity", "pretrain_setupB", "warm_start",
          "table4", "table4_profile", "swin_setupA", "segmentation"]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def sh(script: str, *args, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in ("DRY_RUN", "KEEP_GOING", "DATA_ROOT", "RUN_ROOT", "MODELS", "DATASETS", "SETUPS", "LAYERS",
                         "DEPTHS", "RANKS", "BUDGET", "ASI_CKPT_DIR", "TRANSFORMERS", "CHECKPOINTING")}
    return subprocess.run(["bash", str(SCRIPTS / f"{script}.sh"), *map(str, args)], env={**base, **(env or {})},
                          cwd=cwd or REPO, capture_output=True, text=True, timeout=60)


def test_every_script_is_valid_bash():
    scripts = sorted(SCRIPTS.glob("*.sh"))
    assert set(SWEEPS) | {"common"} <= {p.stem for p in scripts}
    for p in scripts:
        proc = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
        assert proc.returncode == 0, (p.name, proc.stderr)
        if p.stem in SWEEPS:
            text = p.read_text()
            assert "Expected runtime" in text and 'common.sh" "$@"' in text, p.name
    assert "set -euo pipefail" in (SCRIPTS / "common.sh").read_text()


# (script, number of commands with the default lists, fragments every dry run must show)
DRY = {
    "perplexity": (8, ["main.py measure --config configs/recipes/setupA.yaml --config configs/models/mcunet.yaml "
                       "--config configs/data/imagenet.yaml", "--exp_name paper",
                       "--measure.epsilons 0.4,0.5,0.6,0.7,0.8,0.9 --measure.num_batches 10",
                       "--config configs/recipes/setupB_finetune.yaml --config configs/models/resnet34.yaml"]),
    "asi_setupA": (40, ["--config configs/recipes/setupA.yaml --config configs/models/mobilenet_v2.yaml "
                        "--config configs/data/flowers102.yaml", "--exp_name l4_budgethosvd@0.8 --model.method asi "
                        "--model.num_finetune 4 --model.perplexity_file {runs}/setupA/resnet18/imagenet/measure/paper/"
                        "perplexity.json --model.budget hosvd@0.8", "configs/data/cub200.yaml", "--data.root {data}"]),
    "asi_setupB": (8, ["--config configs/recipes/setupB_finetune.yaml --config configs/models/mcunet.yaml "
                       "--config configs/data/imagenet.yaml", "--model.method asi --model.num_finetune 2 "
                       "--model.perplexity_file {runs}/setupB/mcunet/imagenet/measure/paper/perplexity.json "
                       "--model.budget hosvd@0.8"]),
    "baselines": (264, ["--exp_name lall --model.method vanilla --model.num_finetune all",
                        "--exp_name l2 --model.method vanilla --model.num_finetune 2",
                        "--exp_name l4_R7 --model.method gradfilter_paper --model.num_finetune 4 --model.radius 7",
                        "--exp_name l2_eps0.8 --model.method hosvd --model.num_finetune 2 --model.eps 0.8",
                        "setupB_finetune.yaml --config configs/models/resnet18.yaml --config configs/data/imagenet.yaml",
                        "setupA.yaml --config configs/models/mcunet.yaml --config configs/data/pets.yaml"]),
    "warm_start": (16, ["--config configs/models/mcunet.yaml --config configs/data/cifar10.yaml",
                        "--exp_name l8_budgethosvd@0.8_nowarm --model.method asi --model.num_finetune 8",
                        "--model.budget hosvd@0.8 --model.warm_start false",
                        "--model.budget hosvd@0.8 --model.warm_start true"]),
    "latency": (2, ["python main.py benchmark --config configs/models/mcunet.yaml --model.num_finetune 4 "
                    "--model.ranks 2 --data.batch_size 128 --data.resolution 224 "
                    "--benchmark.methods vanilla,gradfilter_paper,hosvd,asi | tail -n 1 > {runs}/latency/4.json"]),
    "pretrain_setupB": (4, ["main.py fit --config configs/recipes/setupB_pretrain.yaml --config "
                            "configs/models/resnet34.yaml --config configs/data/imagenet.yaml", "--exp_name pretrain"]),
    "swin_setupA": (36, ["main.py measure --config configs/recipes/setupA.yaml --config configs/models/swin_t.yaml "
                         "--config configs/data/imagenet.yaml", "--config configs/models/swin_t.yaml --config "
                         "configs/data/pets.yaml", "--exp_name lall --model.method vanilla --model.num_finetune all",
                         "--exp_name l4_eps0.8 --model.method hosvd --model.num_finetune 4 --model.eps 0.8",
                         "--exp_name l2_budgethosvd@0.8 --model.method asi --model.num_finetune 2 "
                         "--model.perplexity_file {runs}/setupA/swin_t/imagenet/measure/paper/perplexity.json "
                         "--model.budget hosvd@0.8"]),
}
DRY["paper"] = (sum(n for n, _ in DRY.values()) + 1, ["python main.py report {runs} --out {runs}/report.md"])
DRY["table4"] = (11, ["main.py fit --config configs/recipes/setupA.yaml --config configs/models/tinyllama.yaml "
                      "--config configs/data/boolq.yaml", "--exp_name l5_r20 --model.method asi --model.num_finetune 5 "
                      "--model.ranks 20", "--exp_name l1 --model.method vanilla --model.num_finetune 1",
                      "python main.py report {runs}/setupA/tinyllama/boolq --out {runs}/table4/report.md --flops paper"])
# Table 3 (not part of paper.sh: it needs VOC12 aug and the authors' segmentation checkpoints): 6 models x
# (1 perplexity table + vanilla all + 2 layer sets x 4 methods)
DRY["segmentation"] = (60, [
    "main.py measure --config configs/recipes/segmentation.yaml --config configs/segmentation/pspnet_r18.yaml "
    "--config configs/data/voc12aug.yaml --data.root {data}",
    "--exp_name l10_Rauthors --model.method gradfilter --model.checkpoint {ckpts}/segmentation/fcn_r18.pth "
    "--model.num_finetune 10",
    "--exp_name l5_budget_hosvd0.8 --model.method asi --model.checkpoint {ckpts}/segmentation/upernet_r18.pth "
    "--model.num_finetune 5 --model.perplexity_file {runs}/setupA/upernet_r18/voc12aug/measure/paper/perplexity.json "
    "--model.budget hosvd@0.8",
    "configs/segmentation/deeplabv3_mv2.yaml --config configs/data/voc12aug.yaml"])


@pytest.mark.parametrize("script", sorted(DRY))
def test_dry_run_prints_the_commands_and_runs_nothing(script, tmp_path):
    runs, data = tmp_path / "runs", tmp_path / "data"
    proc = sh(script, data, runs, env={"DRY_RUN": "1", "PYTHON": "python", "ASI_CKPT_DIR": str(tmp_path / "ckpts")})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    count, fragments = DRY[script]
    assert len(lines) == count and all(line.startswith("python main.py ") for line in lines), proc.stdout[:2000]
    for frag in fragments:
        assert frag.format(runs=runs, data=data, ckpts=tmp_path / "ckpts") in proc.stdout, frag
    assert len(set(lines)) == len(lines)  # every run its own command (and run directory)
    assert not runs.exists() and not data.exists() and not (tmp_path / "ckpts").exists()


def fake_python(tmp_path: Path) -> Path:
    """Stands in for the interpreter: logs its arguments; FAKE_FAIL=1 fails; a benchmark prints progress, then JSON."""
    fake = tmp_path / "fakepy"
    fake.write_text('#!/usr/bin/env bash\necho "$*" >> "$FAKE_LOG"\n[[ -z "${FAKE_FAIL:-}" ]] || exit 1\n'
                    '[[ "$2" != benchmark ]] || printf "[benchmark] step 1/5\\n{\\"speedup_vs_vanilla\\": {\\"asi\\": 1.5}}\\n"\n')
    fake.chmod(0o755)
    return fake


def test_finished_runs_are_skipped_and_the_rest_run(tmp_path):
    runs, log = tmp_path / "runs", tmp_path / "log"
    env = {"PYTHON": str(fake_python(tmp_path)), "FAKE_LOG": str(log), "MODELS": "mcunet", "DATASETS": "cifar10",
           "RUN_ROOT": str(runs), "DATA_ROOT": str(tmp_path / "data")}  # roots from the environment this time
    ppl = runs / "setupA/mcunet/imagenet/measure/paper/perplexity.json"
    ppl.parent.mkdir(parents=True)
    ppl.write_text("{}")
    asi = runs / "setupA/mcunet/cifar10/asi"
    commands = sh("asi_setupA", env={**env, "DRY_RUN": "1"}).stdout.splitlines()
    assert len(commands) == 2 and all("--resume true" in c for c in commands)
    (asi / "l2_budgethosvd@0.8").mkdir(parents=True)  # finished, by this very command
    (asi / "l2_budgethosvd@0.8/metrics.json").write_text(json.dumps({"status": "finished", "val_acc": 0.9}, indent=2))
    (asi / "l2_budgethosvd@0.8/sweep_command.txt").write_text(
        next(c for c in commands if "l2_budget" in c) + "\n")
    (asi / "l4_budgethosvd@0.8").mkdir(parents=True)  # an interrupted run: a callback's keys, fit never ended
    (asi / "l4_budgethosvd@0.8/metrics.json").write_text(json.dumps({"resources": {"activation_mib": 0.4}}))

    dry = sh("asi_setupA", env={**env, "DRY_RUN": "1"})
    assert dry.returncode == 0 and len(dry.stdout.splitlines()) == 1 and "--exp_name l4_budgethosvd@0.8" in dry.stdout
    assert "skip (done): " in dry.stderr and "l2_budgethosvd@0.8/metrics.json" in dry.stderr
    assert not log.exists()

    proc = sh("asi_setupA", env=env)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 1 and calls[0].startswith("main.py fit ") and "--exp_name l4_budgethosvd@0.8" in calls[0]
    assert f"--data.root {tmp_path / 'data'} --run_root {runs}" in calls[0]
    assert "1 ran, 1 skipped (done), 0 failed" in proc.stderr


def test_missing_inputs_and_failures(tmp_path):
    runs, log = tmp_path / "runs", tmp_path / "log"
    env = {"PYTHON": str(fake_python(tmp_path)), "FAKE_LOG": str(log), "MODELS": "mcunet", "DATASETS": "pets"}
    proc = sh("asi_setupA", tmp_path / "data", runs, env=env)  # no perplexity table: nothing runs, said why
    assert proc.returncode == 3 and "perplexity.json does not exist" in proc.stderr and not log.exists()
    proc = sh("asi_setupA", tmp_path / "data", runs, env={**env, "KEEP_GOING": "1"})
    assert proc.returncode == 1 and "0 ran, 0 skipped (done), 2 failed" in proc.stderr

    proc = sh("pretrain_setupB", tmp_path / "data", runs, env={**env, "FAKE_FAIL": "1"})
    assert proc.returncode == 1 and len(log.read_text().splitlines()) == 1  # stops at the first failure
    proc = sh("pretrain_setupB", tmp_path / "data", runs, env={**env, "FAKE_FAIL": "1", "KEEP_GOING": "1"})
    assert proc.returncode == 1 and "FAILED (exit 1)" in proc.stderr and len(log.read_text().splitlines()) == 2


def test_latency_writes_the_benchmark_json_once(tmp_path):
    runs, log = tmp_path / "runs", tmp_path / "log"
    env = {"PYTHON": str(fake_python(tmp_path)), "FAKE_LOG": str(log), "DEPTHS": "2"}
    proc = sh("latency", tmp_path / "data", runs, env={**env, "FAKE_FAIL": "1"})
    assert proc.returncode == 1
    assert [p.name for p in (runs / "latency").iterdir()] == ["2.json.log"]  # a failed benchmark leaves no result
    proc = sh("latency", tmp_path / "data", runs, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((runs / "latency/2.json").read_text()) == {"speedup_vs_vanilla": {"asi": 1.5}}
    assert "[benchmark] step 1/5" in proc.stderr and "[benchmark]" in (runs / "latency/2.json.log").read_text()
    proc = sh("latency", tmp_path / "data", runs, env=env)
    assert "skip (done)" in proc.stderr and len(log.read_text().splitlines()) == 2


def test_extra_args_reach_every_command(tmp_path):
    proc = sh("asi_setupB", tmp_path / "data", tmp_path / "runs",
              env={"DRY_RUN": "1", "PYTHON": "python", "EXTRA_ARGS": "--trainer.max_epochs 1  --data.resolution 64"})
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 8
    assert all(line.endswith("--model.budget hosvd@0.8 --trainer.max_epochs 1 --data.resolution 64") for line in lines)


def test_demo_seeds_and_variants_keep_seed_0_names_and_the_table_parses_them(tmp_path):
    """SEEDS / DEMO_VARIANTS add runs with a suffix and leave the plain demo's names (seed 0, the recipe) as they were;
    scripts/seeds_table.py groups them back and computes the spread."""
    import re
    import sys

    plain = sh("demo", tmp_path, env={"DRY_RUN": "1"}).stdout
    more = sh("demo", tmp_path, env={"DRY_RUN": "1", "SEEDS": "0 2", "DEMO_VARIANTS": "recipe frozen_bn",
                                     "DEMO_LAYERS": "4", "DEMO_METHODS": "asi"}).stdout
    names = lambda out: re.findall(r"--exp_name (\S+)", out)  # noqa: E731
    assert names(plain)[2:] == ["l2", "l2_R2", "l2_eps0.8", "l2_hosvd@0.8", "l4", "l4_R2", "l4_eps0.8",
                                "l4_hosvd@0.8"]  # after pretrain and the perplexity measurement
    assert names(more)[2:] == ["l4_hosvd@0.8", "l4_hosvd@0.8_frozen_bn", "l4_hosvd@0.8_s2",
                               "l4_hosvd@0.8_frozen_bn_s2"]
    frozen = [line for line in more.splitlines() if "--exp_name l4_hosvd@0.8_frozen_bn_s2" in line][0]
    assert "--model.train_bn_affine false" in frozen and "--seed_everything 2" in frozen
    assert "seeds_table.py" in more and "seeds_table.py" not in plain

    root = tmp_path / "runs"
    for run, acc in (("l4_hosvd@0.8", 0.95), ("l4_hosvd@0.8_s2", 0.97), ("l4_hosvd@0.8_frozen_bn", 0.9),
                     ("l4_hosvd@0.8_frozen_bn_s2", None)):
        (root / "asi" / run).mkdir(parents=True)
        (root / "asi" / run / "metrics.json").write_text(json.dumps(
            {"val_acc": acc, "status": "finished" if acc else "interrupted"}))
    out = subprocess.run([sys.executable, str(SCRIPTS / "seeds_table.py"), str(root)], capture_output=True, text=True,
                         timeout=60).stdout
    assert "| asi | l4_hosvd@0.8 | recipe | 2 | 96.00 | 1.41 | 95.00 - 97.00 | s0: 95.00, s2: 97.00 |" in out
    assert "| asi | l4_hosvd@0.8 | frozen_bn | 1 | 90.00 | – | 90.00 - 90.00 | s0: 90.00, s2: interrupted |" in out
