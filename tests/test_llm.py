"""LLM backbones (classification/llm.py, text_data.py): the tiny LLaMA's layer rule, exact pooled logits, exact
full-rank gradients through asi_core.patch (with and without LoRA), BoolQ loading with an offline tokenizer,
the pretrained-but-missing message, few-step fits of every method, and the shape-only profile."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import asi_core
from classification import llm
from classification.data import ClassificationData
from classification.model import finetune_candidates

TINY_LLM = ["--config", "configs/models/llama_tiny.yaml", "--config", "configs/data/digits_tokens.yaml",
            "--data.batch_size", "16", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
            "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_model_summary", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.log_every_n_steps", "1"]


def tiny_net(dtype=torch.float64, seed=0, num_classes=3):
    torch.manual_seed(seed)
    return llm.create_llm("llama_tiny", num_classes, pretrained=False).to(dtype)


def batch(n=3, length=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding on one row
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}, torch.tensor([0, 2, 1][:n])


def test_layer_rule_is_the_papers_last_n_mlp_linears():
    net = tiny_net(torch.float32)
    expected = ["model.layers.3.mlp.down_proj", "model.layers.3.mlp.up_proj", "model.layers.3.mlp.gate_proj",
                "model.layers.2.mlp.down_proj", "model.layers.2.mlp.up_proj"]
    for n in range(1, 6):  # #Layers n = the last n linears named *mlp* in registration order
        assert sorted(finetune_candidates(net, n, "linear", "mlp")) == sorted(expected[:n])
    # LlamaMLP registers gate_proj, up_proj, down_proj in this order (transformers 5)
    assert finetune_candidates(net, 3, "linear", "mlp") == [f"model.layers.3.mlp.{p}_proj"
                                                            for p in ("gate", "up", "down")]


def test_pooled_head_gives_transformers_logits():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    hf = AutoModelForSequenceClassification.from_config(llm._hf_config("llama_tiny", None, 3, None)).eval()
    net = tiny_net(torch.float32).eval()
    net.load_state_dict({k.replace("model.norm.", "norm."): v for k, v in hf.state_dict().items()})
    x, _ = batch()
    x["input_ids"][2, 0] = 0  # a pad id inside the sequence: the mask, not the id, decides the pooled token
    expected = hf(**x).logits
    assert torch.allclose(net(x), expected, atol=1e-6, rtol=0)
    ids = x["input_ids"].clone()
    ids[2, 0] = 5
    assert torch.allclose(net(ids), hf(input_ids=ids, attention_mask=(ids != 0).long()).logits, atol=1e-6, rtol=0)


def _grads(net, x, y):
    net.train()
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method,options", [("asi", {}), ("hosvd", {"eps": 1.0})])
def test_full_rank_gradients_equal_autograd(method, options):
    ref = tiny_net()
    names = finetune_candidates(ref, 3, "linear", "mlp")
    net = copy.deepcopy(ref)
    asi_core.patch(ref, "vanilla", layers=names, layer_type="linear")
    ref.freeze_unpatched()
    if method == "asi":  # full rank per mode of a (3, 10, D) input: the feature unfolding has rank <= 30
        options = {"ranks": (3, 10, 30)}
    asi_core.patch(net, method, layers=names, layer_type="linear", **options)
    net.freeze_unpatched()
    x, y = batch()
    g_ref, g = _grads(ref, x, y), _grads(net, x, y)
    assert set(g) == {f"{n}.weight" for n in names} | {"score.weight"}
    for k in g_ref:
        assert torch.allclose(g[k], g_ref[k], atol=1e-10, rtol=1e-8), k
    # hosvd at eps=1 keeps factors (a real decomposition), not whole modes
    if method == "hosvd":
        assert any(f is not None for f in [asi_core.patched_layers(net)[0][1].last_stats["ranks"]])


def test_lora_with_asi_gradients_exact_at_full_rank():
    base = tiny_net()
    targets = finetune_candidates(base, 3, "linear", "mlp")
    lora_a, lora_b = llm.add_lora(base, targets, rank=4, alpha=8)
    assert lora_a == [f"{t}.lora_A.default" for t in targets]
    torch.manual_seed(3)
    for m in lora_b:  # peft starts B at zero (then A gets no gradient): make both matter
        torch.nn.init.normal_(m.weight, std=0.1)
    ref, net = base, copy.deepcopy(base)
    asi_core.patch(ref, "vanilla", layers=lora_a, layer_type="linear", lean=False)
    ref.freeze_unpatched(lora_b)
    asi_core.patch(net, "asi", layers=lora_a, layer_type="linear", ranks=(3, 10, 30))
    net.freeze_unpatched([m for n, m in net.named_modules() if n.endswith("lora_B.default")])
    x, y = batch()
    g_ref, g = _grads(ref, x, y), _grads(net, x, y)
    expected = {f"{t}.lora_{ab}.default.weight" for t in targets for ab in "AB"} | {"score.weight"}
    assert set(g) == set(g_ref) == expected
    for k in g_ref:
        assert g_ref[k].abs().max() > 0 and torch.allclose(g[k], g_ref[k], atol=1e-10, rtol=1e-8), k
    # and an unpatched peft model (plain autograd) gives the same gradients as the vanilla-patched one
    plain = tiny_net()
    llm.add_lora(plain, targets, rank=4, alpha=8)
    plain.load_state_dict(base.state_dict(), strict=False)
    for p in plain.parameters():
        p.requires_grad_(False)
    for n, p in plain.named_parameters():
        p.requires_grad_(n in expected)
    g_plain = _grads(plain, x, y)
    for k in g_ref:
        assert torch.allclose(g_plain[k], g_ref[k], atol=1e-10, rtol=1e-8), k


# ---------------------------------------------------------------------------------------------- data
BOOLQ_ROWS = [
    {"question": "is the sky blue", "passage": "the sky is blue on a clear day because of scattering", "answer": True},
    {"question": "do cats bark", "passage": "cats meow and purr; dogs are the animals that bark", "answer": False},
    {"question": "is water wet", "passage": "water makes things wet when they touch it", "answer": True},
    {"question": "can fish fly", "passage": "most fish swim in water and cannot fly at all", "answer": False},
    {"question": "is ice cold", "passage": "ice is frozen water and is cold to touch", "answer": True},
]


@pytest.fixture
def boolq_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root = tmp_path / "data" / "boolq"
    root.mkdir(parents=True)
    for split, rows in (("train", BOOLQ_ROWS * 2), ("dev", BOOLQ_ROWS[:3])):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "<unk>", "<s>", "</s>", "[SEP]"])
    tok.train_from_iterator([r["question"] + " " + r["passage"] for r in BOOLQ_ROWS], trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    return root


def test_boolq_jsonl_with_an_offline_tokenizer(boolq_dir, tmp_path):
    dm = ClassificationData(name="boolq", root=str(boolq_dir.parent), tokenizer=str(tmp_path / "tokenizer.json"),
                            max_length=16, val_fraction=0.0, batch_size=4, num_workers=0)
    dm.setup("fit")
    assert dm.num_classes == 2 and len(dm.train_set) == 10 and len(dm.val_set) == len(dm.test_set) == 3
    tok = llm.load_tokenizer(str(tmp_path / "tokenizer.json"))
    x, y = dm.val_set[1]
    ids, mask = x["input_ids"].tolist(), x["attention_mask"].tolist()
    assert len(ids) == 16 and y == 0
    n = sum(mask)
    assert mask == [1] * n + [0] * (16 - n) and ids[n:] == [tok.pad_token_id] * (16 - n)
    q = tok("do cats bark", add_special_tokens=False)["input_ids"]
    p = tok(BOOLQ_ROWS[1]["passage"], add_special_tokens=False)["input_ids"]
    expected = [tok.bos_token_id] + q + [tok.sep_token_id] + p
    assert ids[:n] == expected[:15] + [tok.eos_token_id]  # passage truncated to fit 16 with eos
    assert [dm.train_set[i][1] for i in range(5)] == [1, 0, 1, 0, 1]


def test_boolq_missing_files_say_where_and_how(tmp_path):
    dm = ClassificationData(name="boolq", root=str(tmp_path), tokenizer="unused", num_workers=0)
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert str(tmp_path / "boolq" / "train.jsonl") in msg and "storage.googleapis.com/boolq/train.jsonl" in msg


def test_pretrained_but_missing_stops_naming_the_directory(monkeypatch, ckpts):
    def offline(source, num_classes, pad_token_id):
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {source}")

    monkeypatch.setattr(llm, "_from_pretrained", offline)
    with pytest.raises(FileNotFoundError) as err:
        llm.create_llm("tinyllama", 2, pretrained=True)
    msg = str(err.value)
    assert str(ckpts / "hf" / "TinyLlama-1.1B-Chat-v1.0") in msg and "--model.pretrained false" in msg
    assert "hf download TinyLlama/TinyLlama-1.1B-Chat-v1.0" in msg
    with pytest.raises(FileNotFoundError, match="no published weights"):
        llm.create_llm("llama_tiny", 2, pretrained=True)


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("method,extra", [("vanilla", []), ("hosvd", []), ("asi", ["--model.ranks", "2"]),
                                          ("lora", []), ("asi", ["--model.lora", "true", "--model.ranks", "2"])])
def test_few_step_fit(method, extra, run_cli, tmp_path):
    cli = run_cli("fit", *TINY_LLM, "--model.method", method, "--model.num_finetune", "3", "--exp_name", "t", *extra,
                  tiny=False)
    metrics = json.loads((cli.run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and 0.0 <= metrics["val_acc"] <= 1.0
    lora = method == "lora" or "--model.lora" in extra
    targets = [f"model.layers.3.mlp.{p}_proj" for p in ("gate", "up", "down")]
    assert metrics["patched_layers"] == [t + ".lora_A.default" if lora else t for t in targets]
    # exactly the fine-tuned linears (or the LoRA adapters) and the head train
    hidden, inter, r = 64, 176, 8  # gate/up: 64 -> 176, down: 176 -> 64; LoRA: A (r x in) + B (out x r) each
    expected = 3 * r * (hidden + inter) if lora else 3 * hidden * inter
    assert metrics["trainable_params"] == expected + 10 * hidden
    res = metrics["resources"]
    assert res["measured_layers_mib"] == pytest.approx(res["activation_mib"]) or method == "hosvd"
    if method == "asi":
        assert res["activation_mib"] < 0.05 * metrics_vanilla_mib(16, 65)


def metrics_vanilla_mib(b, t, hidden=64, inter=176):
    return b * t * (hidden * 2 + inter) * 4 / 2 ** 20


def test_profile_shape_only_matches_a_real_step(run_cli, capsys):
    args = ["profile", "--config", "configs/models/llama_tiny.yaml", "--config", "configs/data/digits_tokens.yaml",
            "--model.method", "asi", "--model.ranks", "3", "--model.num_finetune", "4", "--data.batch_size", "4",
            "--data.max_length", "24"]
    fake = run_cli(*args, tiny=False).profile_result
    real = run_cli(*args, "--model.shape_only", "false", tiny=False).profile_result
    assert fake["shape_only"] and not real["shape_only"]
    keys = {"model", "method", "num_finetune", "batch_size", "max_length", "ranks", "lean", "device", "lora",
            "shape_only", "activation_mib", "measured_activation_mib", "measured_layers_mib", "measured_mask_mib",
            "forward_gflops", "backward_gflops", "overhead_gflops", "core_gflops", "input_grad_gflops",
            "train_gflops", "paper_gflops", "total_gflops", "analytic_plus_mask_mib", "layers",
            "checkpointing", "recompute", "recomputed_segments", "measured_recompute_peak_mib", "paper_flops"}
    from classification.resources import PROFILE_PEAK_KEYS  # the whole-step peak (tests/test_peak.py compares it)
    assert set(fake) == keys | set(PROFILE_PEAK_KEYS)
    for k in keys - {"shape_only", "layers"}:
        assert fake[k] == real[k], k
    assert fake["layers"] == real["layers"]
    assert fake["max_length"] == 65  # digits_tokens: 64 pixels + eos, whatever --data.max_length says
    assert [tuple(lay["input_shape"]) for lay in fake["layers"]] == [(4, 65, 176), (4, 65, 64), (4, 65, 64), (4, 65, 176)]
    assert fake["measured_activation_mib"] > fake["activation_mib"] > 0


def test_report_shows_the_table4_layout(tmp_path):
    from classification.report import collect, format_table

    def run(method, n, gflops, acc, **model_args):
        d = tmp_path / method / f"{n}{'_lora' if model_args.get('lora') else ''}"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({
            "settings": {"setup": "A", "model": "tinyllama", "dataset": "boolq", "method": method, "num_finetune": n,
                         "model_args": {"ranks": 20, "lora_rank": 8, **model_args}},
            "val_acc": acc, "epochs_completed": 1,
            "resources": {"activation_mib": 0.509, "paper_gflops": gflops, "train_gflops": gflops + 7}}))

    run("vanilla", 1, 1511.83, 0.6594)
    run("asi", 1, 803.56, 0.6469)
    run("asi", 1, 47.5, 0.6, lora=True)
    run("lora", 1, 6.0, 0.6, lora=False)
    text = format_table(collect([tmp_path], flops="paper"), "md")
    assert "| Mem (MiB) ↓ | TFLOPs ↓ |" in text and "2 FLOPs per multiply-add" in text
    assert "| Vanilla training | 1 | 65.94 | 0.51 | 3.02 |" in text  # Table 4's first row
    assert "| ASI (r = 20) | 1 | 64.69 | 0.51 | 1.61 |" in text
    assert "| LoRA r8 + ASI (r = 20) | 1 |" in text and "| LoRA (r = 8) | 1 |" in text


def test_two_process_cpu_ddp_fit_of_the_tiny_llama(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "ASI_CKPT_DIR": str(tmp_path / "ckpts"), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "main.py", "fit", *TINY_LLM, "--model.method", "asi", "--model.ranks", "2",
           "--model.num_finetune", "3", "--run_root", str(tmp_path / "runs"), "--exp_name", "ddp",
           "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs/setupA/llama_tiny/digits_tokens/asi/ddp/metrics.json").read_text())
    assert metrics["settings"]["world_size"] == 2 and metrics["global_step"] == 2
    assert len(metrics["weights_digests"]) == 2 and metrics["ranks_in_sync"]


def test_pretrained_from_a_local_directory_offline(ckpts, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    facts = {k: v for k, v in llm.LLAMA_TINY_CONFIG.items() if k != "model_type"}
    causal = LlamaForCausalLM(LlamaConfig(**facts))
    target = ckpts / "hf" / "TinyLlama-1.1B-Chat-v1.0"  # where tinyllama looks offline
    causal.save_pretrained(target)
    net = llm.create_llm("tinyllama", 2, pretrained=True)  # a causal-LM checkpoint: new 2-class head
    assert net.score.weight.shape == (2, 64) and net.score.weight.dtype == torch.float32
    for name in ("model.layers.3.mlp.down_proj.weight", "model.embed_tokens.weight"):
        assert torch.equal(net.state_dict()[name], causal.state_dict()[name])
    assert torch.equal(net.norm.weight, causal.model.norm.weight)
    other = llm.create_llm("hf", 3, pretrained=True, name_or_path=str(target))
    assert torch.equal(other.model.layers[0].mlp.up_proj.weight, causal.model.layers[0].mlp.up_proj.weight)


def test_measure_then_fit_with_ranks_from_the_table(run_cli, tmp_path):
    base = ["--config", "configs/models/llama_tiny.yaml", "--config", "configs/data/digits_tokens.yaml",
            "--data.batch_size", "8", "--trainer.enable_progress_bar", "false"]
    run_cli("measure", *base, "--measure.num_finetune", "3", "--measure.epsilons", "0.5,0.9", "--exp_name", "m",
            tiny=False)
    table_file = tmp_path / "runs/setupA/llama_tiny/digits_tokens/measure/m/perplexity.json"
    table = json.loads(table_file.read_text())
    assert table["input_shape"] == [8, 65] and list(table["layers"]) == [
        f"model.layers.3.mlp.{p}_proj" for p in ("gate", "up", "down")]
    cli = run_cli("fit", *base, "--model.method", "asi", "--model.num_finetune", "3", "--model.perplexity_file",
                  str(table_file), "--model.budget", "min", "--trainer.max_epochs", "1",
                  "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1", tiny=False)
    chosen = cli.model.rank_selection["layers"]
    for c in chosen:  # budget "min": the smallest eps of each layer, its measured ranks
        assert c["eps"] == 0.5 and c["ranks"] == table["layers"][c["name"]]["ranks"][0]
    assert [layer.method.ranks for _, layer in asi_core.patched_layers(cli.model.net)] == [tuple(c["ranks"])
                                                                                          for c in chosen]


@pytest.mark.parametrize("bad,message", [
    ('{"question": "q", "passage": "p", "answer": "maybe"}', "line 2: 'answer' is 'maybe'; expected true/false"),
    ('{"question": "q", "passage": "p", "answ', "line 2: not valid JSON"),
    ('{"question": "q", "answer": true}', "row 2: 'passage' is missing"),
    ('{"question": "q", "passage": "p"}', "line 2: no 'answer'"),
    ('[1, 2]', "line 2: expected a JSON object"),
    ('', "holds no rows"),
])
def test_boolq_rows_are_checked_and_errors_name_the_file_and_line(tmp_path, bad, message):
    from classification.text_data import read_boolq

    path = tmp_path / "train.jsonl"
    first = json.dumps(BOOLQ_ROWS[0]) + "\n" if bad else ""
    path.write_text(first + bad + "\n")
    with pytest.raises(ValueError, match=message) as err:
        read_boolq(path)
    assert str(path) in str(err.value)


def test_boolq_string_answers_are_read_as_what_they_say(tmp_path):
    """``"answer": "false"`` was label 1 (bool of a non-empty string): a file with string answers trained on
    all-positive labels."""
    from classification.text_data import read_boolq

    path = tmp_path / "dev.jsonl"
    rows = [{"question": "q", "passage": "p", "answer": a} for a in ("false", "True", "0", 1, False)]
    rows.append({"question": "q", "passage": "p", "label": 0})  # SuperGLUE's val.jsonl
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_boolq(path)[2] == [0, 1, 0, 1, 0, 0]


def test_lora_options_are_checked_with_messages_that_say_what_to_do():
    from classification.finetune import check_model_options
    from classification.model import ClassificationModel

    for option, bad in (("lora_rank", 0), ("lora_rank", 2.5), ("lora_alpha", 0), ("lora_alpha", float("nan"))):
        with pytest.raises(ValueError, match=f"--model.{option} .* is invalid"):
            check_model_options(**{option: bad})
    with pytest.raises(ValueError, match=r"--model.lora_targets 'nothing_here' matches none of llama_tiny's linear"):
        ClassificationModel("llama_tiny", 10, pretrained=False, method="lora", lora_targets="nothing_here")


def test_a_tokenizer_whose_ids_pass_the_models_vocabulary_is_refused_before_training(run_cli, monkeypatch):
    """Issue 22: a tokenizer larger than the model's vocabulary was an IndexError mid-run (run left interrupted)."""
    import classification.text_data as text_data
    from classification.text_data import TokenDataset, check_vocabulary

    ok = TokenDataset(torch.randint(0, 100, (4, 8)), torch.ones(4, 8, dtype=torch.long), [0, 1, 0, 1])
    check_vocabulary([ok], 100, "llama_tiny", None)
    bad = TokenDataset(torch.tensor([[5, 32001]]), torch.ones(1, 2, dtype=torch.long), [0])
    with pytest.raises(ValueError, match=r"token id 32001, but llama_tiny's embedding has 32000 rows .*"
                                         r"--data.tokenizer"):
        check_vocabulary([bad], 32000, "llama_tiny", "tok.json")
    real = text_data.digits_tokens
    monkeypatch.setattr(text_data, "digits_tokens", lambda: TokenDataset(
        real().input_ids + 10 ** 6, real().attention_mask, real().targets))
    with pytest.raises(ValueError, match=r"token id 100001\d, but llama_tiny's embedding"):
        run_cli("fit", "--config", "configs/models/llama_tiny.yaml", "--config", "configs/data/digits_tokens.yaml",
                "--model.method", "asi", "--model.ranks", "2", "--trainer.max_epochs", "1",
                "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
                "--trainer.num_sanity_val_steps", "0", tiny=False)


def test_a_resolution_given_for_token_data_is_said_to_do_nothing_and_keeps_run_names():
    """Issue 22: --data.resolution changed a token-data run's name although it is ignored. Run names are a
    contract (runs made with it keep their directories), so it stays in the name, and the user is told."""
    from classification.data import ClassificationData
    from classification.rundir import run_settings

    with pytest.warns(UserWarning, match="--data.resolution 64 does nothing for the text dataset 'digits_tokens'"):
        ClassificationData(name="digits_tokens", resolution=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ClassificationData(name="digits_tokens")
    assert run_settings({}, {"name": "digits_tokens", "resolution": 64}, 0) != \
        run_settings({}, {"name": "digits_tokens", "resolution": 224}, 0)


def test_profile_of_a_language_model_takes_max_length_tokens_whatever_dataset_is_configured(run_cli):
    """With no text dataset configured (the default digits), the token count was --data.resolution's."""
    out = run_cli("profile", "--config", "configs/models/llama_tiny.yaml", "--data.max_length", "40",
                  "--data.batch_size", "2", "--trainer.logger", "false", tiny=False).profile_result
    assert out["max_length"] == 40 and tuple(out["layers"][0]["input_shape"][:2]) == (2, 40)


def test_shape_only_profile_runs_when_a_rank_reaches_a_modes_size(run_cli):
    """Issue 22: with --data.batch_size 4 and rank 4 the batch mode is full rank (no factor kept), and the shape-only
    profile stopped at buf.resize_(0) in FakeTensorMode."""
    out = run_cli("profile", "--config", "configs/models/llama_tiny.yaml", "--model.method", "asi",
                  "--model.ranks", "4", "--data.batch_size", "4", "--data.max_length", "16", "--trainer.logger",
                  "false", tiny=False).profile_result
    assert out["shape_only"] is True and out["measured_activation_mib"] > 0
