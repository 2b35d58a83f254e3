"""paper_gflops in the paper's own units for every model (issue 23): the CNNs by the paper's equations, Swin-T/ViT and
the LLMs by the authors' code (asi_core.accounting.authors_linear_flops, their get_activation_size): hand-counted
small cases, Table 4's ASI and vanilla TFLOPs from profile's JSON itself, Table 2's Swin-T vanilla cells, and the
report showing the figure as recorded (old runs' multiply-adds converted)."""
from __future__ import annotations

import json
import math

import pytest

from asi_core import accounting as acc

# Table 4 (TinyLlama-1.1B on BoolQ, rank 20): TFLOPs at #Layers 1..5
TABLE4 = {"asi": (1.68, 3.33, 4.98, 6.66, 8.31), "vanilla": (3.02, 6.04, 9.07, 12.09, 15.11)}
# the last five *mlp* linears of TinyLlama, last first: (in, out)
TINYLLAMA_LAST5 = [(5632, 2048), (2048, 5632), (2048, 5632), (5632, 2048), (2048, 5632)]


def test_hand_counted_three_mode_input():
    g = acc.LinearGeometry(4, 5, input_shape=(2, 3, 4))  # B=2, N=3, I=4, O=5; ranks clip to (1, 2, 3)
    assert acc.authors_linear_flops("vanilla", g) == {"forward": 6 * 5 * 7, "overhead": 0, "backward": 5 * 4 * 11}
    overhead = (2 * 24 * 1 + 1) + (2 * 24 * 2 + 8) + (2 * 24 * 3 + 27)
    backward = 2 * 3 * 5 * 1 + 1 * 2 * 3 * 3 + 1 * 3 * 4 * 3 + 4 * 5 * 3 * 1
    assert acc.authors_linear_flops("asi", g, (1, 2, 3)) == {"forward": 210, "overhead": overhead,
                                                             "backward": backward}
    # model_llm.py: the forward matmul written B*I*O*(2N-1), the K1*K3*I*N term charged twice
    assert acc.authors_linear_flops("asi", g, (1, 2, 3), llm=True) == {
        "forward": 2 * 4 * 5 * 5, "overhead": overhead, "backward": backward + 1 * 3 * 4 * 3}


def test_hand_counted_four_mode_input():
    g = acc.LinearGeometry(4, 5, input_shape=(2, 2, 3, 4))  # Swin's (B, H, W, C)
    out = acc.authors_linear_flops("asi", g, (1, 2, 5, 3))  # the W rank clips to 3 = W
    assert out["forward"] == 12 * 5 * 7
    assert out["overhead"] == (96 + 1) + (192 + 8) + (288 + 27) + (288 + 27)  # K = (1, 2, 3, 3)
    # Z1, Z2, Z3, Z4 and the weight gradient of linear_ASI.py, with K1..K4 = 1, 2, 3, 3
    assert out["backward"] == 2 * 1 * 2 * 3 * 5 + 2 * 1 * 2 * 3 * 3 + 3 * 1 * 2 * 3 * 5 + 4 * 1 * 2 * 3 * 3 + 1 * 2 * 3 * 4 * 5


def test_the_equations_stay_for_convolutions_and_unknown_counts_are_refused():
    conv = acc.ConvGeometry(8, 16, 3, padding=1, input_shape=(2, 8, 6, 6))
    eq = acc.paper_flops("asi", conv, 2)
    assert acc.paper_flops("asi", conv, 2, count="authors_llm") == eq  # the authors' count is for linear layers
    assert eq["forward"] == acc.paper_forward_flops(conv)
    with pytest.raises(ValueError, match="unknown paper FLOPs count"):
        acc.paper_flops("asi", conv, 2, count="mine")
    linear = acc.LinearGeometry(4, 5, input_shape=(2, 3, 4))  # the gradient filter: the authors count no linear
    assert acc.paper_flops("gradfilter", linear, radius=2, count="authors_linear") == acc.paper_flops(
        "gradfilter", linear, radius=2)
    with pytest.raises(ValueError, match="the authors' code counts vanilla, asi and hosvd"):
        acc.authors_linear_flops("gradfilter", linear)


@pytest.mark.parametrize("method", ["asi", "vanilla"])
def test_table4_from_the_authors_formulas(method):
    total = 0
    for n, (i, o) in enumerate(TINYLLAMA_LAST5):
        g = acc.LinearGeometry(i, o, input_shape=(128, 512, i))
        total += sum(acc.authors_linear_flops(method, g, 20 if method == "asi" else None, llm=True).values())
        assert total / 1e12 == pytest.approx(TABLE4[method][n], rel=0.01)
        if method == "asi":  # exact to the printed digits
            assert round(total / 1e12, 2) == TABLE4[method][n]


def test_table2_swin_t_vanilla_cells():
    """Swin-T, batch 128 at 224: the last 2 / 4 mlp linears (7x7 tokens), printed 0.11 / 0.23 TFLOPs (truncated)."""
    total, printed = 0, {2: 0.11, 4: 0.23}
    for n, (i, o) in enumerate([(3072, 768), (768, 3072)] * 2, 1):
        total += sum(acc.authors_linear_flops("vanilla", acc.LinearGeometry(i, o, input_shape=(128, 7, 7, i))).values())
        if n in printed:
            assert math.floor(total / 1e12 * 100) / 100 == printed[n]


@pytest.mark.parametrize("method,n", [("asi", 1), ("asi", 5), ("vanilla", 1), ("vanilla", 5)])
def test_profile_json_gives_table4_at_128_x_512_tokens(method, n, run_cli):
    args = ["profile", "--config", "configs/models/tinyllama.yaml", "--config", "configs/data/boolq.yaml",
            "--model.method", method, "--model.num_finetune", str(n), "--data.batch_size", "128",
            "--data.max_length", "512", "--trainer.logger", "false"]
    if method == "asi":
        args += ["--model.ranks", "20"]
    out = run_cli(*args, tiny=False).profile_result
    assert out["paper_flops"] == "authors_llm"
    assert out["paper_gflops"] / 1000 == pytest.approx(TABLE4[method][n - 1], rel=0.01)
    assert out["train_gflops"] < out["paper_gflops"]  # ours: multiply-adds, the matmul counted once


def test_the_report_shows_paper_gflops_as_recorded_and_converts_old_runs(tmp_path):
    from classification.report import collect

    for name, resources in (("new", {"paper_gflops": 1677.75, "paper_flops": "authors_llm"}),
                            ("old", {"paper_gflops": 803.56})):  # before: multiply-adds, doubled by the report
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({
            "settings": {"setup": "A", "model": "tinyllama", "dataset": "boolq", "method": "asi", "num_finetune": 1,
                         "model_args": {"ranks": 20, "warm_start": name == "new"}},
            "val_acc": 0.6, "epochs_completed": 1, "resources": {"activation_mib": 0.509, **resources}}))
    rows = {r["run_dir"].split("/")[-1]: r for r in collect([tmp_path], flops="paper")}
    assert rows["new"]["gflops"] == pytest.approx(1677.75) and rows["old"]["gflops"] == pytest.approx(1607.12)
