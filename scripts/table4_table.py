#!/usr/bin/env python
"""Paper Table 4's Mem and TFLOPs columns next to ours, and the measured activation memory, from the JSONs
scripts/table4_profile.sh writes (<dir>/<method>_<n>.json, the last line of ``main.py profile``)::

    python scripts/table4_table.py runs/table4/profile

Mem: the analytic activation memory of the fine-tuned linears (MiB). TFLOPs: ``paper_gflops`` / 1000, which for the
LLMs follows the authors' model_llm.py (asi_core.accounting.authors_linear_flops: forward and vanilla's weight
gradient in FLOPs, ASI's contractions and subspace iteration as they write them; ``train_gflops`` is our own count).
Measured: everything autograd saves from the first fine-tuned linear to the loss."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

PAPER = {  # Table 4: (Mem MB, TFLOPs) per #Layers
    "vanilla": {1: (1408, 3.02), 2: (1920, 6.04), 3: (2432, 9.07), 4: (3840, 12.09), 5: (4352, 15.11)},
    "asi": {1: (0.51, 1.68), 2: (0.74, 3.33), 3: (0.98, 4.98), 4: (1.49, 6.66), 5: (1.72, 8.31)},
}
LABELS = {"vanilla": "vanilla", "asi": "ASI r20", "lora": "LoRA r8", "lora_asi": "LoRA r8 + ASI r20"}


def load(root: Path) -> dict[tuple[str, int], dict]:
    runs = {}
    for path in sorted(root.glob("*_*.json")):
        method, _, n = path.stem.rpartition("_")
        if n.isdigit():
            runs[(method, int(n))] = json.loads(path.read_text())
    return runs


def tables(runs: dict[tuple[str, int], dict]) -> str:
    layers = sorted({n for _, n in runs})
    lines = ["| #Layers | vanilla Mem (paper / ours) | vanilla TFLOPs (paper / ours) | ASI Mem (paper / ours) "
             "| ASI TFLOPs (paper / ours) |", "|--:|--:|--:|--:|--:|"]
    for n in layers:
        cells = []
        for method in ("vanilla", "asi"):
            r = runs.get((method, n))
            mem, tfl = PAPER[method].get(n, (None, None))
            ours_mem = "–" if r is None else f"{r['activation_mib']:.2f}"
            # a profile from before paper_gflops followed the authors' code recorded multiply-adds (Table 4: 2 FLOPs each)
            legacy = 1 if r is None or "paper_flops" in r else 2
            ours_tfl = "–" if r is None else f"{legacy * r['paper_gflops'] / 1000:.2f}"
            cells += [f"{mem} / {ours_mem}", f"{tfl} / {ours_tfl}"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "| method | #Layers | analytic MiB | measured MiB | measured / vanilla measured |",
              "|:--|--:|--:|--:|--:|"]
    for method in LABELS:
        for n in layers:
            r, v = runs.get((method, n)), runs.get(("vanilla", n))
            if r is None:
                continue
            ratio = "–" if v is None else f"1/{v['measured_activation_mib'] / r['measured_activation_mib']:.1f}"
            lines.append(f"| {LABELS[method]} | {n} | {r['activation_mib']:.2f} | {r['measured_activation_mib']:.2f} "
                         f"| {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder with <method>_<n>.json (scripts/table4_profile.sh)")
    args = parser.parse_args(argv)
    runs = load(args.root)
    if not runs:
        raise SystemExit(f"no <method>_<n>.json under {args.root}: run scripts/table4_profile.sh first")
    print(tables(runs), end="")


if __name__ == "__main__":
    main()
