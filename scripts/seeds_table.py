#!/usr/bin/env python
"""Accuracy over fine-tuning seeds: mean, spread and every seed, per method, layers and variant, from the runs a
sweep wrote with a ``_s<seed>`` suffix on the run name (seed 0: no suffix), e.g. ``SEEDS="0 1 2" bash
scripts/demo.sh`` (``l4_hosvd@0.8``, ``l4_hosvd@0.8_s1``, ``l4_hosvd@0.8_frozen_bn_s2`` ...)::

    python scripts/seeds_table.py runs/demo/setupB/mcunet/digits [--variants recipe,frozen_bn]

Reads ``<dir>/<method>/<run>/metrics.json`` (the task's monitored score at the end of the run: ``val_acc``; a run
that has not finished is listed with its status and left out of the statistics). The spread is the sample
standard deviation over seeds; one image of digits' 180 validation images is 0.56 points.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

VARIANTS = ("frozen_bn", "standard_aug", "our_warmup", "step_schedule")  # scripts/demo.sh's DEMO_VARIANTS
_SEED = re.compile(r"_s(\d+)$")


def parse(run: str) -> tuple[str, str, int]:
    """``l4_eps0.8_frozen_bn_s2`` -> ("l4_eps0.8", "frozen_bn", 2); no suffix: variant "recipe", seed 0."""
    m = _SEED.search(run)
    seed = int(m.group(1)) if m else 0
    base = run[:m.start()] if m else run
    for v in VARIANTS:
        if base.endswith("_" + v):
            return base[:-len(v) - 1], v, seed
    return base, "recipe", seed


def collect(root: Path) -> dict[tuple[str, str, str], dict[int, dict]]:
    runs: dict[tuple[str, str, str], dict[int, dict]] = defaultdict(dict)
    for path in sorted(root.glob("*/*/metrics.json")):
        method, run = path.parent.parent.name, path.parent.name
        if method in ("measure",) or run == "pretrain":
            continue
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        base, variant, seed = parse(run)
        runs[(method, base, variant)][seed] = data
    return runs


def table(runs: dict, variants=None) -> str:
    order = ["recipe", *VARIANTS]
    lines = ["| method | run | variant | seeds | val acc % mean | spread (sd) | min - max | per seed |",
             "|:--|:--|:--|--:|--:|--:|--:|:--|"]
    keys = sorted(runs, key=lambda k: (int(re.sub(r"\D.*", "", k[1][1:]) or 0), k[0], k[1],
                                       order.index(k[2]) if k[2] in order else 99))
    for method, base, variant in keys:
        if variants and variant not in variants:
            continue
        seeds = runs[(method, base, variant)]
        done = {s: 100 * d["val_acc"] for s, d in sorted(seeds.items())
                if d.get("val_acc") is not None and d.get("status", "finished") == "finished"}
        per_seed = ", ".join(f"s{s}: {done[s]:.2f}" if s in done else f"s{s}: {seeds[s].get('status', '?')}"
                             for s in sorted(seeds))
        vals = list(done.values())
        mean = f"{statistics.mean(vals):.2f}" if vals else "–"
        sd = f"{statistics.stdev(vals):.2f}" if len(vals) > 1 else "–"
        span = f"{min(vals):.2f} - {max(vals):.2f}" if vals else "–"
        lines.append(f"| {method} | {base} | {variant} | {len(vals)} | {mean} | {sd} | {span} | {per_seed} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="<run_root>/setup<S>/<model>/<dataset>")
    parser.add_argument("--variants", default=None, help="comma-separated subset of recipe," + ",".join(VARIANTS))
    args = parser.parse_args(argv)
    runs = collect(args.root)
    if not runs:
        raise SystemExit(f"no runs under {args.root}/<method>/<run>/metrics.json")
    print(table(runs, args.variants.split(",") if args.variants else None), end="")


if __name__ == "__main__":
    main()
