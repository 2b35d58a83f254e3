#!/usr/bin/env python
"""Markdown table of the whole-step peak from the JSONs scripts/peak_table.sh writes (<dir>/<setting>/<variant>.json,
the last line of ``main.py profile``)::

    python scripts/peak_table.py runs/peak

Per setting and variant: the paper's Mem (``activation_mib``: the fine-tuned layers' inputs as the method stores
them), what autograd saves (``measured_activation_mib``), the whole-step peak (``peak_step_mib``, where it was
measured: the CPU allocator, or the tensors shape-only) with its largest parts at that moment, the training
overhead (peak minus an inference forward's peak) and one unmeasured step's wall time. After each setting: the
peak of every variant relative to vanilla's."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

SETTINGS = {"mcunet": "MCUNet, 2 layers, frozen BN, batch 64, 224",
            "mcunet_bn": "MCUNet, 2 layers, the authors' trainable BN affine, batch 64, 224",
            "mcunet_bn4": "MCUNet, 4 layers, the authors' trainable BN affine, batch 64, 224",
            "mcunet_all": "MCUNet, all 42 layers, frozen BN, batch 64, 224",
            "resnet18": "ResNet-18, 2 layers, frozen BN, batch 64, 224",
            "resnet18_bn": "ResNet-18, 2 layers, the authors' trainable BN affine, batch 64, 224",
            "resnet18_all": "ResNet-18, all 20 layers, frozen BN, batch 64, 224",
            "swin_t": "Swin-T, 4 mlp layers, batch 64, 224",
            "vit_b_32": "ViT-B/32, 4 mlp layers, batch 64, 224",
            "tinyllama_blocks": "TinyLlama width, last 2 blocks, 5 layers, 8 x 512 tokens",
            "tinyllama": "TinyLlama-1.1B, 5 layers, 128 x 512 tokens (shape-only)",
            "pspnet_r18": "PSPNet-R18, the authors' 5L, batch 8, 512"}
VARIANTS = {"vanilla": "vanilla", "vanilla_ckpt": "vanilla + checkpointing", "asi": "asi",
            "asi_recompute": "asi + recompute", "asi_ckpt": "asi + checkpointing",
            "vanilla_micro": "vanilla, frozen prefix in micro-batches", "asi_micro": "asi, frozen prefix in micro-batches",
            "asi_approx": "asi, approximate: 2-bit activation derivatives, saved in 8 bits",
            "asi_approx4": "asi, approximate: 2-bit activation derivatives, saved in 4 bits",
            "asi_approx2": "asi, approximate: 2-bit activation derivatives, saved in 2 bits",
            "asi_approx_recompute": "asi + recompute, approximate (2-bit derivatives, saved in 8 bits)",
            "asi_approx_micro": "asi, approximate (8 bits), frozen prefix in micro-batches"}
PARTS = ("saved", "transient", "parameters", "gradients", "optimizer_state", "batch", "workspace")


def load(root: Path) -> dict[tuple[str, str], dict]:
    runs = {}
    for path in sorted(root.glob("*/*.json")):
        if path.stem in VARIANTS:
            try:
                runs[(path.parent.name, path.stem)] = json.loads(path.read_text().strip().splitlines()[-1])
            except (ValueError, IndexError):
                pass  # an interrupted profile: its line is missing
    return runs


def _f(x, digits: int = 1) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}f}" if abs(x) >= 0.1 or x == 0 else f"{x:.3g}"


def _parts(breakdown: dict) -> str:
    """The three largest parts of the peak, in MiB."""
    top = sorted(((breakdown.get(k) or 0.0, k) for k in PARTS), reverse=True)[:3]
    return ", ".join(f"{k.replace('_', ' ')} {_f(v)}" for v, k in top if v > 0)


def table(runs: dict[tuple[str, str], dict]) -> str:
    lines = ["| setting | variant | paper Mem MiB | saved MiB | peak MiB | largest parts at the peak (MiB) | "
             "training overhead MiB | peak / vanilla | step s |", "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for setting in [s for s in SETTINGS if any(k[0] == s for k in runs)] + sorted({k[0] for k in runs} - set(SETTINGS)):
        base = runs.get((setting, "vanilla"), {}).get("peak_step_mib")
        for variant, label in VARIANTS.items():
            r = runs.get((setting, variant))
            if r is None:
                continue
            peak = r.get("peak_step_mib")
            ratio = f"{peak / base:.2f}" if peak and base else "–"
            lines.append(f"| {SETTINGS.get(setting, setting)} | {label} | {_f(r.get('activation_mib'), 2)} | "
                         f"{_f(r.get('measured_activation_mib'))} | {_f(peak)} | "
                         f"{_parts(r.get('peak_step_breakdown') or {})} | {_f(r.get('training_overhead_mib'))} | "
                         f"{ratio} | {_f(r.get('step_time_s'), 2)} |")
    sources = sorted({r.get("peak_step_source") for r in runs.values() if r.get("peak_step_source")})
    lines += ["", f"Peak measured by: {', '.join(sources) or '–'} (asi_core/peak.py). Paper Mem: the fine-tuned "
              "layers' inputs as stored (activation_mib); saved: what autograd keeps from the first fine-tuned layer "
              "to the loss (measured_activation_mib); peak: everything live at once in the step."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the folder scripts/peak_table.sh wrote (<RUN_ROOT>/peak)")
    args = parser.parse_args()
    runs = load(args.root)
    if not runs:
        raise SystemExit(f"no profile JSON under {args.root}/<setting>/<variant>.json: run scripts/peak_table.sh")
    print(table(runs), end="")


if __name__ == "__main__":
    main()
