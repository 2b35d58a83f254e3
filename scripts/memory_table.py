#!/usr/bin/env python
"""Markdown table of measured vs analytic activation memory from the JSONs scripts/memory_table.sh writes
(<dir>/<model>/<method>_<n>.json, the last line of ``main.py profile``)::

    python scripts/memory_table.py runs/memory

Columns: analytic MiB (the fine-tuned convs' stored inputs, asi_core.accounting), mask MiB (measured uint8/bool:
lean 1-bit masks), measured MiB (everything autograd saves from the first fine-tuned layer to the loss), and
measured / (analytic + mask). After the table, per model and depth: measured vanilla / measured asi."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

MODELS = ["mcunet", "mobilenet_v2", "resnet18", "resnet34"]
METHODS = {"vanilla": "vanilla", "vanilla_lean": "vanilla (lean)", "gradfilter": "gradfilter R2",
           "hosvd": "hosvd ε0.8", "asi": "asi r2", "vanilla_lean_bn": "vanilla (lean) + BN affine",
           "asi_bn": "asi r2 + BN affine"}


def load(root: Path) -> dict[tuple[str, int, str], dict]:
    runs = {}
    for path in sorted(root.glob("*/*_*.json")):
        method, _, n = path.stem.rpartition("_")
        if method in METHODS and n.isdigit():
            runs[(path.parent.name, int(n), method)] = json.loads(path.read_text())
    return runs


def table(runs: dict[tuple[str, int, str], dict]) -> str:
    models = [m for m in MODELS if any(k[0] == m for k in runs)] + sorted({k[0] for k in runs} - set(MODELS))
    lines = ["| model | layers | method | analytic MiB | mask MiB | measured MiB | measured / (analytic + mask) |",
             "|---|---:|---|---:|---:|---:|---:|"]
    ratios = []
    for model in models:
        for n in sorted({k[1] for k in runs if k[0] == model}):
            for method, label in METHODS.items():
                r = runs.get((model, n, method))
                if r is None:
                    continue
                analytic, mask, measured = r["activation_mib"], r["measured_mask_mib"], r["measured_activation_mib"]
                lines.append(f"| {model} | {n} | {label} | {analytic:.3f} | {mask:.3f} | {measured:.3f} | "
                             f"{measured / (analytic + mask):.2f} |")
            van, asi = runs.get((model, n, "vanilla")), runs.get((model, n, "asi"))
            if van and asi:
                ratios.append(f"{model} {n} layers: {van['measured_activation_mib'] / asi['measured_activation_mib']:.0f}x")
    out = "\n".join(lines)
    if ratios:
        out += "\n\nmeasured vanilla / measured asi r2: " + ", ".join(ratios)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, nargs="?", default=Path("runs/memory"),
                        help="folder of <model>/<method>_<n>.json (default: runs/memory)")
    root = parser.parse_args(argv).root
    runs = load(root)
    if not runs:
        raise SystemExit(f"no <model>/<method>_<n>.json under {root}; run scripts/memory_table.sh first")
    print(table(runs))


if __name__ == "__main__":
    main()
