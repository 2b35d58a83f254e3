"""main.py report on stored metrics.json fixtures (tests/fixtures/runs: MCUNet, Table 1 on ImageNet setup B and
Table 2 / Fig. 4 on Pets setup A, with keys missing on purpose): table text, CSV, PNGs, duplicates, the CLI."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from classification.report import CSV_COLUMNS, collect, format_table, pareto_plots

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "runs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def rows():
    return collect([FIXTURES])


def find(rows, setup, method, n, label=None):
    hits = [r for r in rows if (r["setup"], r["method"], r["num_finetune"]) == (setup, method, n)
            and (label is None or r["label"] == label)]
    assert len(hits) == 1, hits
    return hits[0]


def table_lines(md: str, title: str) -> list[str]:
    block = md.split(f"### {title}\n", 1)[1].split("###", 1)[0]
    return [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| Method")]


def test_md_table_is_the_paper_layout(rows):
    md = format_table(rows, "md")
    assert md.index("### setup A · mcunet · pets") < md.index("### setup B · mcunet · imagenet")
    assert "| Method | #Layers | Acc (%) ↑ | Mem (MiB) ↓ | GFLOPs ↓ |" in md
    # Table 1, MCUNet: methods in the paper's order, "All" first, method named on its first row only;
    # HOSVD shows its peak memory and GFLOPs (0.48 MiB, not its 0.31 MiB mean).
    assert table_lines(md, "setup B · mcunet · imagenet") == [
        "| Vanilla training | All | 67.38 | 632.98 | 212.42 |",
        "|  | 2 | 62.07 | 13.78 | 19.44 |",
        "|  | 4 | 64.68 | 19.52 | 20.05 |",
        "| Gradient filtering R2 | 2 | 61.79 | 4.50 | 19.40 |",
        "|  | 4 | 64.41 | 6.38 | 19.97 |",
        "| HOSVD (ε = 0.8) | 2 | 61.68 | 0.48 | 1730.90 |",
        "|  | 4 | 63.92 | 0.88 | 2148.30 |",
        "| ASI | 2 | 61.71 | 0.38 | 11.32 |",
        "|  | 4 | 63.49 | 0.83 | 12.41 |",
    ]
    assert "HOSVD: peak activation memory and GFLOPs over training" in md
    # the setup-B pretraining run (half 1, 70.12 %) is not a fine-tuning result
    assert "70.12" not in md and all(r["run_dir"].split(os.sep)[-1] != "pretrain" for r in rows)


def test_paper_flops_and_best_accuracy(rows):
    md = format_table(collect([FIXTURES / "setupB"], accuracy="best", flops="paper"), "md")
    lines = table_lines(md, "setup B · mcunet · imagenet")
    assert lines[0] == "| Vanilla training | All | 67.45 | 632.98 | 248.84 |"  # Table 1's 248.84 GFLOPs
    assert "| HOSVD (ε = 0.8) | 2 | 61.72 | 0.48 | 1988.05 |" in lines  # peak of the paper's count
    assert "eq. 15-17 as written" in md


def test_missing_keys_show_a_dash(rows):
    md = format_table(rows, "md")
    lines = table_lines(md, "setup A · mcunet · pets")
    assert "|  | 4 | 49.06 | – | – |" in lines  # gradfilter R2, no "resources"
    assert "| HOSVD (ε = 0.8) | 2 | – | 0.14 | 3410.20 |" in lines  # no accuracy; no *_peak: the mean is used
    # no "settings" at all: setup/model/dataset/method/#layers from the folder layout
    assert "|  | 2 | 40.78 | 27.56 | 38.90 |" in lines
    assert find(rows, "A", "vanilla", 2)["measured_activation_mib"] is None
    # flat settings (backbone, ranks, warm_start at the top) name the ablation's configuration
    assert find(rows, "A", "asi", 4, "ASI (r = 4, no warm start)")["accuracy"] == pytest.approx(40.12)


def test_csv_columns_and_values(rows):
    text = format_table(rows, "csv")
    records = list(csv.DictReader(io.StringIO(text)))
    header = text.splitlines()[0].split(",")
    assert header[:5] == ["method", "num_finetune", "accuracy", "activation_mib", "gflops"]
    assert tuple(header) == CSV_COLUMNS
    assert len(records) == len(rows) == 18
    hosvd = next(r for r in records if (r["setup"], r["method"], r["num_finetune"]) == ("B", "hosvd", "4"))
    assert (float(hosvd["accuracy"]), float(hosvd["activation_mib"]), float(hosvd["gflops"])) == (63.92, 0.88, 2148.3)
    assert hosvd["mem_peak"] == hosvd["gflops_peak"] == "True" and float(hosvd["paper_gflops"]) == 2457.59
    vall = next(r for r in records if (r["setup"], r["method"], r["num_finetune"]) == ("B", "vanilla", "all"))
    assert float(vall["accuracy"]) == 67.38 and vall["measured_activation_mib"] == "641.2"
    missing = next(r for r in records if (r["setup"], r["method"], r["num_finetune"]) == ("A", "gradfilter", "4"))
    assert missing["activation_mib"] == missing["gflops"] == "" and missing["accuracy"] == "49.06"


def test_pareto_pngs(rows, tmp_path):
    paths = pareto_plots(rows, tmp_path / "figs")
    assert sorted(p.name for p in paths) == ["pareto_A_mcunet_pets.png", "pareto_B_mcunet_imagenet.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 20_000  # two panels, four lines: not an empty canvas


def test_latest_of_several_runs_is_shown_and_said(tmp_path):
    src = FIXTURES / "setupB" / "mcunet" / "imagenet" / "asi"
    root = tmp_path / "runs" / "setupB" / "mcunet" / "imagenet" / "asi"
    shutil.copytree(src, root)
    rerun = root / "l2_rerun" / "metrics.json"
    rerun.parent.mkdir()
    data = json.loads((root / "l2_budget_hosvd0.8" / "metrics.json").read_text())
    rerun.write_text(json.dumps({**data, "val_acc": 0.6250}))
    old = (root / "l2_budget_hosvd0.8" / "metrics.json").stat().st_mtime
    os.utime(rerun, (old + 60, old + 60))
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "metrics.json").write_text("{")  # half-written file: skipped, with a warning
    warnings = []
    rows = collect(tmp_path / "runs", warn=warnings.append)
    assert len(rows) == 2 and any("broken" in w for w in warnings)
    l2 = find(rows, "B", "asi", 2)
    assert l2["accuracy"] == pytest.approx(62.50) and l2["runs"] == 2
    assert l2["superseded"] == [str(root / "l2_budget_hosvd0.8")]
    md = format_table(rows, "md")
    assert "| ASI | 2<sup>1</sup> | 62.50 |" in md
    assert "2 runs of ASI, 2 layers with the same settings and seed: the latest is shown" in md
    os.utime(rerun, (old - 60, old - 60))  # now the original is the newer one
    assert find(collect(tmp_path / "runs", warn=warnings.append), "B", "asi", 2)["accuracy"] == pytest.approx(61.71)


def test_cli_report_subprocess(tmp_path):
    """The documented invocation in a fresh process: the CSV on stdout, the PNGs in --plots."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "main.py", "report", "tests/fixtures/runs", "--format", "csv",
                           "--plots", str(tmp_path / "figs")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("method,num_finetune,accuracy,activation_mib,gflops,")
    assert "asi,4,63.49,0.83,12.41,B,mcunet,imagenet,ASI," in proc.stdout
    assert len(proc.stdout.splitlines()) == 1 + 18
    assert len(list((tmp_path / "figs").glob("pareto_*.png"))) == 2


def test_cli_report_out_file_and_errors(tmp_path, monkeypatch, capsys):
    """Several run directories, then options; md to --out with the PNGs next to it; a wrong path is an error."""
    from classification.cli import cli_main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "report" / "table.md"
    cli_main(["report", str(FIXTURES / "setupA"), str(FIXTURES / "setupB"), "--out", str(out)])
    assert "| ASI | 2 | 61.71 | 0.38 | 11.32 |" in out.read_text() and capsys.readouterr().out == ""
    assert sorted(p.name for p in out.parent.glob("*.png")) == ["pareto_A_mcunet_pets.png",
                                                                 "pareto_B_mcunet_imagenet.png"]
    cli_main(["report", str(FIXTURES / "setupB" / "mcunet" / "imagenet" / "asi"), "--no_plots", "true"])
    assert capsys.readouterr().out.count("| ASI |") == 1 and not list(tmp_path.glob("*.png"))
    with pytest.raises(SystemExit, match="does not exist"):
        cli_main(["report", str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no metrics.json"):
        cli_main(["report", str(tmp_path / "empty")])


def test_method_labels_name_what_differs():
    from classification.report import _label

    assert _label("gradfilter", {"radius": 7})[0] == "Gradient filtering R7"
    assert _label("hosvd", {"eps": 0.9})[0] == "HOSVD (ε = 0.9)"
    assert _label("asi", {"budget": "hosvd@0.8", "ranks": [[2, 8, 3, 3]], "warm_start": True})[0] == "ASI"
    assert _label("asi", {"budget": 0.5, "warm_start": False})[0] == "ASI (no warm start)"
    assert _label("asi", {"ranks": 2})[0] == "ASI (r = 2)"
    assert _label("asi", {"ranks": None, "budget": None})[0] == "ASI (default ranks)"


def test_a_run_with_the_frozen_prefix_in_micro_batches_is_a_row_of_its_own(tmp_path):
    """--model.frozen_micro_batch changes the peak, not the result: its run is shown beside the plain one, named."""
    src = FIXTURES / "setupB" / "mcunet" / "imagenet" / "asi" / "l2_budget_hosvd0.8"
    root = tmp_path / "runs" / "setupB" / "mcunet" / "imagenet" / "asi"
    shutil.copytree(src, root / "l2_budget_hosvd0.8")
    data = json.loads((src / "metrics.json").read_text())
    data["settings"]["model_args"]["frozen_micro_batch"] = 8
    data["resources"] = {**data.get("resources", {}), "peak_step_mib": 76.7}
    (root / "l2_micro").mkdir()
    (root / "l2_micro" / "metrics.json").write_text(json.dumps(data))
    rows = collect(tmp_path / "runs", mem="peak", warn=lambda msg: None)
    labels = sorted(r["label"] for r in rows)
    assert labels == ["ASI", "ASI, frozen prefix in micro-batches of 8"] and all(r["runs"] == 1 for r in rows)
    micro = next(r for r in rows if "micro" in r["label"])
    assert micro["mem_mib"] == pytest.approx(76.7)


def test_runs_with_the_approximations_are_rows_of_their_own(tmp_path):
    """--model.approx_activations / --model.saved_bits change the result (approximate gradients): each setting is a
    row of its own, named, and --mem saved shows what autograd kept with it."""
    src = FIXTURES / "setupB" / "mcunet" / "imagenet" / "asi" / "l2_budget_hosvd0.8"
    root = tmp_path / "runs" / "setupB" / "mcunet" / "imagenet" / "asi"
    shutil.copytree(src, root / "l2_budget_hosvd0.8")
    for name, extra, saved in (("l2_act", {"approx_activations": True}, 0.5),
                               ("l2_s4", {"saved_bits": 4}, 0.25),
                               ("l2_act_s8", {"approx_activations": True, "saved_bits": 8}, 0.2)):
        data = json.loads((src / "metrics.json").read_text())
        data["settings"]["model_args"].update(extra)
        data["resources"] = {**data.get("resources", {}), "measured_activation_mib": saved}
        (root / name).mkdir()
        (root / name / "metrics.json").write_text(json.dumps(data))
    rows = collect(tmp_path / "runs", mem="saved", warn=lambda msg: None)
    labels = sorted(r["label"] for r in rows)
    assert labels == ["ASI", "ASI, 2-bit activation derivatives", "ASI, 2-bit activation derivatives, saved in 8 bits",
                      "ASI, saved in 4 bits"]
    assert all(r["runs"] == 1 for r in rows)
    assert next(r for r in rows if r["label"] == "ASI, saved in 4 bits")["mem_mib"] == pytest.approx(0.25)


def _variant_run(root, src, name, model_extra=None, **top):
    data = json.loads((src / "metrics.json").read_text())
    data["settings"]["model_args"].update(model_extra or {})
    data.update(top)
    (root / name).mkdir(parents=True)
    (root / name / "metrics.json").write_text(json.dumps(data))
    return data


def test_runs_with_other_settings_are_never_merged_and_say_what_differs(tmp_path):
    """Issue 22: runs that differ in include, layers or budget were one row ("latest shown"); each is a row now,
    its label naming what differs."""
    src = FIXTURES / "setupB" / "mcunet" / "imagenet" / "asi" / "l2_budget_hosvd0.8"
    root = tmp_path / "runs" / "setupB" / "mcunet" / "imagenet" / "asi"
    shutil.copytree(src, root / "l2_budget_hosvd0.8")
    _variant_run(root, src, "l2_budget05", {"budget": 0.5}, val_acc=0.55)
    _variant_run(root, src, "l2_include", {"include": "point_linear"}, val_acc=0.58)
    rows = collect(tmp_path / "runs", warn=lambda msg: None)
    assert len(rows) == 3 and all(r["runs"] == 1 and not r["superseded"] for r in rows)
    labels = sorted(r["label"] for r in rows)
    assert labels == ["ASI", "ASI [budget=0.5]", "ASI [include=point_linear]"]  # where each differs from the most
    assert sorted(r["accuracy"] for r in rows) == pytest.approx([55.0, 58.0, 61.71])  # common configuration
    md = format_table(rows, "md")
    assert "| ASI [budget=0.5] | 2 | 55.00 |" in md and "latest" not in md


def test_seeds_of_one_configuration_are_one_row_with_their_mean_spread_and_statuses(tmp_path):
    src = FIXTURES / "setupB" / "mcunet" / "imagenet" / "asi" / "l2_budget_hosvd0.8"
    root = tmp_path / "runs" / "setupB" / "mcunet" / "imagenet" / "asi"
    for seed, acc, status in ((0, 0.60, "finished"), (1, 0.62, "finished"), (2, 0.30, "interrupted")):
        data = json.loads((src / "metrics.json").read_text())
        data["settings"]["seed"] = seed
        data.update(val_acc=acc, status=status)
        (root / f"l2_s{seed}").mkdir(parents=True)
        (root / f"l2_s{seed}" / "metrics.json").write_text(json.dumps(data))
    (row,) = collect(tmp_path / "runs", warn=lambda msg: None)
    assert row["seeds"] == 3 and row["runs"] == 3 and not row["superseded"]
    assert row["accuracy"] == pytest.approx(61.0) and row["accuracy_sd"] == pytest.approx(1.4142, abs=1e-3)
    assert row["status"] == "finished x2, interrupted x1"
    assert row["per_seed"] == "s0: 60.00; s1: 62.00; s2: 30.00 (interrupted)"
    md = format_table([row], "md")
    assert "| ASI | 2<sup>1</sup> | 61.00 (finished x2, interrupted x1) |" in md
    assert "mean of the finished of 3 seeds (sd 1.41; s0: 60.00; s1: 62.00; s2: 30.00 (interrupted))" in md
    csv_text = format_table([row], "csv")
    header, line = csv_text.splitlines()
    assert {"status", "seeds", "accuracy_sd", "per_seed"} <= set(header.split(","))
    assert "finished x2, interrupted x1" in line


def test_a_killed_run_is_named_from_its_start_settings_and_its_status_shown(tmp_path):
    """Issue 22: a run killed before it ended has only ``run_settings`` (written at the start): it showed as "ASI
    (default ranks)" with no status in the markdown."""
    src = FIXTURES / "setupB" / "mcunet" / "imagenet" / "asi" / "l2_budget_hosvd0.8"
    full = json.loads((src / "metrics.json").read_text())
    started = {"status": "interrupted", "interrupted_at_step": 12, "run_settings": {
        "model": full["settings"]["model_args"], "data": full["settings"]["data_args"], "seed": 0,
        "trainer": {"max_epochs": 90}}}
    run = tmp_path / "runs" / "setupB" / "mcunet" / "imagenet" / "asi" / "l2_killed"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(started))
    (row,) = collect(tmp_path / "runs", warn=lambda msg: None)
    assert row["label"] == "ASI" and row["status"] == "interrupted"
    assert "| ASI | 2 | – (interrupted) |" in format_table([row], "md")
    assert "interrupted" in format_table([row], "csv").splitlines()[1]


def test_runs_that_differ_in_a_trainer_setting_are_rows_of_their_own(tmp_path):
    """A review found fp32 and bf16-mixed runs (or other accumulation, clipping ...) merged as re-runs."""
    src = FIXTURES / "setupB" / "mcunet" / "imagenet" / "asi" / "l2_budget_hosvd0.8"
    root = tmp_path / "runs" / "setupB" / "mcunet" / "imagenet" / "asi"
    base = json.loads((src / "metrics.json").read_text())
    for name, precision, acc in (("l2_fp32", None, 0.60), ("l2_bf16", "bf16-mixed", 0.58)):
        data = {**base, "val_acc": acc, "run_settings": {
            "model": base["settings"]["model_args"], "data": base["settings"]["data_args"], "seed": 0,
            "trainer": {"max_epochs": 90, "max_steps": -1, "precision": precision}}}
        (root / name).mkdir(parents=True)
        (root / name / "metrics.json").write_text(json.dumps(data))
    rows = collect(tmp_path / "runs", warn=lambda msg: None)
    assert len(rows) == 2 and not any(r["superseded"] for r in rows)
    assert sorted(r["label"] for r in rows) == ["ASI", "ASI [precision=bf16-mixed]"]
