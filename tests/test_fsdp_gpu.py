"""Lightning's FSDP strategy with ASI, and with LoRA + ASI, on the tiny LLaMA (docs/llm.md, FSDP), on two GPUs where there are two (sharded), else one. FSDP needs a GPU in
Lightning 2.6 (its FSDPStrategy refuses the CPU accelerator), so these run only where CUDA is: skipped in CI,
run on a GPU machine with ``python -m pytest -q tests/test_fsdp_gpu.py``."""
from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP in Lightning 2.6 needs a GPU")


@pytest.mark.parametrize("extra", [[], ["--model.lora", "true"]], ids=["asi", "lora+asi"])
def test_fsdp_fits_the_tiny_llama_with_asi(run_cli, tmp_path, extra):
    from test_llm import TINY_LLM

    run_cli("fit", *TINY_LLM, "--model.method", "asi", "--model.num_finetune", "4", "--model.ranks", "4",
            "--trainer.accelerator", "gpu", "--trainer.devices", str(min(2, torch.cuda.device_count())),
            "--trainer.strategy", "fsdp", *extra,
            tiny=False)
    (metrics,) = (tmp_path / "runs").rglob("metrics.json")
    m = json.loads(metrics.read_text())
    assert m["status"] == "finished" and m["global_step"] > 0 and len(m["patched_layers"]) == 4
