"""The whole-step peak (asi_core/peak.py): two independent measures agree on real steps, the breakdown is
consistent, a method that keeps less peaks lower, shape-only execution gives the real run's tensor peak, and
profile and every fit report it for every model family."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import asi_core
from asi_core.peak import CATEGORIES, StepMemory, peak_of, step_peak, training_peak

PEAK_KEYS = ("peak_step_mib", "peak_step_breakdown", "training_overhead_mib", "inference_peak_mib",
             "peak_step_source", "peak_step_tensor_mib", "peak_step_allocator_mib")


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.LayerNorm(256),
                         nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 10))


def patched_mlp_step(method, **options):
    net = mlp()
    asi_core.patch(net, method, num_finetune=3, layer_type="linear", **options)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    x, y = torch.randn(32, 16, 64), torch.randint(0, 10, (32,))

    def loss_fn(out, y):
        return nn.functional.cross_entropy(out.mean(1), y)
    training_peak(net, x, y, loss_fn, opt)  # warm-up: the optimiser state exists from here on
    return net, opt, x, y, loss_fn


@pytest.mark.parametrize("method,options", [("vanilla", {}), ("asi", {"ranks": 2}), ("gradfilter", {"radius": 2})])
def test_the_tensor_level_and_the_allocator_peak_agree_on_a_small_model(method, options):
    """StepMemory (dispatch-level storages) against the c10 allocator's own events (torch.profiler): the same
    bytes, measured independently, within 5 % (linear layers keep no hidden kernel workspace)."""
    net, opt, x, y, loss_fn = patched_mlp_step(method, **options)
    out = training_peak(net, x, y, loss_fn, opt)
    assert out["peak_step_source"] == "cpu allocator"
    tensor, allocator = out["peak_step_tensor_mib"], out["peak_step_allocator_mib"]
    assert tensor > 1.0 and abs(allocator - tensor) <= 0.05 * tensor, (tensor, allocator)


def test_the_breakdown_is_consistent_and_sums_to_the_peak():
    net, opt, x, y, loss_fn = patched_mlp_step("vanilla")
    out = training_peak(net, x, y, loss_fn, opt)
    b = out["peak_step_breakdown"]
    assert set(b) == {*CATEGORIES, "workspace"} and all(v >= 0 for v in b.values())
    assert math.isclose(sum(b.values()), out["peak_step_mib"], rel_tol=1e-9)
    params = sum(p.numel() * p.element_size() for p in net.parameters()) / 2 ** 20
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor)) / 2 ** 20
    assert math.isclose(b["parameters"], params, rel_tol=1e-9) and math.isclose(b["optimizer_state"], state,
                                                                                 rel_tol=1e-9)
    assert b["batch"] == pytest.approx((x.numel() * 4 + y.numel() * 8) / 2 ** 20)
    assert out["peak_step_mib"] >= b["parameters"] + b["gradients"] + b["saved"]
    assert out["training_overhead_mib"] > 0 and out["inference_peak_mib"] >= b["parameters"] + b["batch"]


def test_a_method_that_keeps_less_peaks_lower():
    vanilla = training_peak(*(lambda n, o, x, y, f: (n, x, y, f, o))(*patched_mlp_step("vanilla")))
    asi = training_peak(*(lambda n, o, x, y, f: (n, x, y, f, o))(*patched_mlp_step("asi", ranks=2)))
    assert asi["peak_step_breakdown"]["saved"] < vanilla["peak_step_breakdown"]["saved"]
    assert asi["peak_step_mib"] < vanilla["peak_step_mib"]


def test_saved_tensors_and_gradients_are_itemised_as_such():
    """One linear layer, hand-counted: at the end of the forward the saved input is the batch itself (already
    counted as batch), the output and the loss are transient; after backward the weight gradient is a gradient."""
    lin = nn.Linear(8, 4, bias=False)
    x = torch.randn(16, 8)
    with StepMemory(lin, batch=(x,)) as meter:
        h = torch.tanh(lin(x))  # tanh saves its output: 16 x 4 floats become "saved"
        assert meter.totals["saved"] == 16 * 4 * 4 and meter.totals["batch"] == 16 * 8 * 4
        h.sum().backward()
        del h
        assert meter.totals["gradients"] == 8 * 4 * 4 and meter.totals["saved"] == 0
    assert meter.peak >= (16 * 8 + 8 * 4 + 2 * 16 * 4) * 4


def test_peak_of_runs_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        lin = nn.Linear(512, 512)
        x = torch.randn(1024, 512)
        out = step_peak(lin, lambda: lin(x).square().sum().backward(), batch=(x,))
    assert mode is not None and out["peak_step_source"] == "tensors (shape-only)"
    assert out["peak_step_allocator_mib"] is None and out["peak_step_mib"] >= 2 * (1024 * 512 * 4) / 2 ** 20


PROFILES = {
    "cnn": ["--config", "configs/models/mcunet.yaml", "--data.resolution", "32"],
    "vit": ["--model.backbone", "swin_tiny_test", "--data.resolution", "32", "--model.num_finetune", "4"],
    "llm": ["--config", "configs/models/llama_tiny.yaml", "--config", "configs/data/digits_tokens.yaml"],
    "segmentation": ["--config", "configs/segmentation/pspnet_r18.yaml", "--config", "configs/data/digit_scenes.yaml",
                     "--data.resolution", "64", "--model.num_finetune", "5"],
}


@pytest.mark.parametrize("family", sorted(PROFILES))
def test_profile_reports_the_whole_step_peak_for_every_family(family, run_cli):
    out = run_cli("profile", *PROFILES[family], "--model.method", "asi", "--data.batch_size", "2",
                  "--trainer.logger", "false", tiny=False).profile_result
    for key in PEAK_KEYS:
        assert key in out, key
    b = out["peak_step_breakdown"]
    assert out["peak_step_mib"] >= b["parameters"] + b["gradients"] + b["saved"] > 0
    assert out["peak_step_mib"] >= out["measured_activation_mib"] * 0.999 or family == "llm"
    assert out["training_overhead_mib"] == pytest.approx(out["peak_step_mib"] - out["inference_peak_mib"])


def test_shape_only_gives_the_tensor_peak_of_a_real_run(run_cli):
    """The LLM profile runs shape-only (FakeTensorMode); on a model that fits, a real run's tensor-level peak is the
    same (its allocator measure too, within 5 %)."""
    args = ["profile", *PROFILES["llm"], "--model.method", "asi", "--model.num_finetune", "2", "--data.batch_size",
            "2", "--trainer.logger", "false"]
    fake = run_cli(*args, tiny=False).profile_result
    real = run_cli(*args, "--model.shape_only", "false", tiny=False).profile_result
    assert fake["peak_step_source"] == "tensors (shape-only)" and real["peak_step_source"] == "cpu allocator"
    assert fake["peak_step_mib"] == pytest.approx(real["peak_step_tensor_mib"], rel=1e-6)
    assert real["peak_step_allocator_mib"] == pytest.approx(real["peak_step_tensor_mib"], rel=0.05)


def test_a_fit_records_the_whole_step_peak_in_metrics_json(run_cli):
    cli = run_cli("fit", "--config", "configs/methods/asi.yaml")
    res = json.loads((cli.run_dir / "metrics.json").read_text())["resources"]
    assert res["peak_step_mib"] > 0 and res["peak_step_source"] == "cpu allocator"
    b = res["peak_step_breakdown"]
    assert b["optimizer_state"] >= 0 and res["peak_step_mib"] >= b["parameters"] + b["gradients"] + b["saved"]
    assert res["training_overhead_mib"] == pytest.approx(res["peak_step_mib"] - res["inference_peak_mib"])


def test_peak_of_restores_every_hook_and_mode():
    net = mlp()
    x = torch.randn(4, 16, 64)
    with peak_of(net, batch=(x,)):
        assert all(p._post_accumulate_grad_hooks for p in net.parameters())  # the gradients' relabelling hooks
        net(x).sum().backward()
    assert not any(p._post_accumulate_grad_hooks for p in net.parameters())
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    assert _get_current_dispatch_mode() is None


def test_report_shows_the_memory_it_is_asked_for(run_cli, tmp_path):
    from classification.report import collect, format_table

    cli = run_cli("fit", "--config", "configs/methods/asi.yaml")
    res = json.loads((cli.run_dir / "metrics.json").read_text())["resources"]
    for mem, key, says in (("paper", "activation_mib", "the paper's count"),
                           ("saved", "measured_activation_mib", "what autograd keeps"),
                           ("peak", "peak_step_mib", "the whole-step peak")):
        rows = collect(tmp_path / "runs", mem=mem, warn=lambda msg: None)
        assert rows[0]["mem_mib"] == pytest.approx(res[key]) and rows[0]["mem_source"] == mem
        assert says in format_table(rows, "md")
    assert rows[0]["peak_step_mib"] == pytest.approx(res["peak_step_mib"])


def test_the_peak_table_script_prints_every_setting_and_the_committed_table():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    dry = subprocess.run(["bash", "scripts/peak_table.sh"], cwd=repo, env={"DRY_RUN": "1", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr[-1000:]
    commands = [line for line in dry.stdout.splitlines() if "main.py profile" in line]
    # 12 settings x 5 variants, 7 with the frozen prefix in micro-batches (x 2), 6 with the approximations (x 3: issue
    # 21), 3 with both (asi_approx_micro), MCUNet's 4 layers with saved tensors in 2 bits
    assert len(commands) == 12 * 5 + 7 * 2 + 6 * 3 + 3 + 1 and all("--model.method" in c for c in commands)
    assert sum("--model.frozen_micro_batch" in c for c in commands) == 7 * 2 + 3
    assert sum("--model.saved_bits" in c for c in commands) == 6 * 3 + 3 + 1
    table = subprocess.run([sys.executable, "scripts/peak_table.py", "docs/benchmarks/peak"], cwd=repo,
                           capture_output=True, text=True, timeout=60).stdout
    rows = [line for line in table.splitlines() if line.startswith("| ") and "variant" not in line]
    assert len(rows) == 96
    doc = (repo / "docs" / "peak_memory.md").read_text()
    assert all(row in doc for row in rows)  # the docs show the committed measurements, unedited
    mcunet_all_asi = next(r for r in rows if r.startswith("| MCUNet, all 42 layers") and "| asi |" in r)
    assert "| 0.21 |" in mcunet_all_asi
    swin_micro = next(r for r in rows if r.startswith("| Swin-T") and "| asi, frozen prefix in micro-batches |" in r)
    assert float(swin_micro.split("|")[8]) < 0.5  # the frozen forward's peak, in micro-batches: under half