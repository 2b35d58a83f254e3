"""Candidate (a) of the whole-region compression (docs/approximate.md), measured: rebuild SiLU's input
z = gate_proj(x) in backward from the Tucker form ASI keeps of x, against the 2-bit derivative table and against
storing z in 8 / 4 bits. On the demo's llama_tiny pretrained on digits_tokens (run `bash scripts/llm_demo.sh` first),
the last block's gate_proj, 64 sequences.

    python scripts/rebuild_error.py [CHECKPOINT]
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from asi_core import approx  # noqa: E402
from asi_core.decompose import subspace_iteration  # noqa: E402
from asi_core.tensor import tucker_to_tensor  # noqa: E402
from classification.model import ClassificationModel  # noqa: E402
from classification.text_data import digits_tokens  # noqa: E402


def silu_derivative(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def main(checkpoint: str = "runs/llm_demo/ckpts/setupB/llama_tiny_digits_tokens.ckpt") -> None:
    if not Path(checkpoint).is_file():
        raise SystemExit(f"error: {checkpoint} does not exist; run `bash scripts/llm_demo.sh` first (it pretrains it)")
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = ClassificationModel(backbone="llama_tiny", method="vanilla", num_finetune=3, pretrained=False,
                                num_classes=10, checkpoint=checkpoint).eval()
    gate = [m for n, m in model.net.named_modules() if n.endswith("mlp.gate_proj")][-1]
    seen = {}
    gate.register_forward_hook(lambda mod, args, out: seen.update(x=args[0].detach(), z=out.detach()))
    data = digits_tokens()
    with torch.no_grad():
        model({"input_ids": data.input_ids[:64], "attention_mask": data.attention_mask[:64]})
    x, z = seen["x"], seen["z"]
    exact = silu_derivative(z)

    def error(d: torch.Tensor) -> float:
        return ((d - exact).norm() / exact.norm()).item()

    print(f"x: {tuple(x.shape)} (the input of the last block's gate_proj); relative errors of SiLU'(z):")
    for rank in (2, 4, 8, 16, 32):
        ranks = [min(rank, s) for s in x.shape]
        gen = torch.Generator().manual_seed(0)
        core, factors = subspace_iteration(x, ranks, None, gen)
        for _ in range(5):  # warm-started iterations, as during training
            core, factors = subspace_iteration(x, ranks, factors, gen)
        x_rebuilt = tucker_to_tensor(core, factors)
        with torch.no_grad():
            z_rebuilt = gate(x_rebuilt)
        print(f"  rebuilt from ASI's x at rank {rank:2d}: error of x {((x_rebuilt - x).norm() / x.norm()).item():.3f}, "
              f"of SiLU'(z~) {error(silu_derivative(z_rebuilt)):.3f}")
    print(f"  2-bit table (--model.approx_activations): {error(approx.SILU_2BIT.derivative(z)):.3f}")
    for bits in (8, 4, 2):
        print(f"  z kept in {bits} bits (--model.saved_bits {bits}): "
              f"{error(silu_derivative(approx.dequantize(approx.quantize(z, bits)))):.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
