"""Time asi_core.ranks.solve (Pareto-front DP for eq. 9) on random, realistic-looking tables.

Each layer has 6 options (eps values); memory grows with eps and spans ~0.001-2 MiB across
layers, perplexity decreases with eps, with noise (so neither is strictly monotone). Budgets sit
at 25%/50%/75% between the minimum and maximum total memory. The last stdout line is one JSON
object: per layer count, the median seconds over budgets x seeds, and Pareto-front sizes. For
layer counts up to --plain-max-layers it also times, at the 50% budget of seed 0, the same DP
without the Lagrangian bound pruning (dominance + budget pruning only), to show what the bound buys.

    .venv/bin/python scripts/bench_ranks.py [--sizes 10 20 42 100 200] [--seeds 3]
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from asi_core import ranks  # noqa: E402
from asi_core.ranks import solve  # noqa: E402


def random_table(num_layers: int, num_options: int, rng: np.random.Generator):
    memory, perplexity = [], []
    for _ in range(num_layers):
        top = 10 ** rng.uniform(np.log10(0.01), np.log10(2.0))  # layer's memory at eps ~ 1
        frac = np.sort(10 ** rng.uniform(-1.0, 0.0, num_options))  # eps 0.4 ... 0.9-ish
        mem = top * frac * (1 + 0.05 * rng.standard_normal(num_options))  # not quite monotone
        mem = np.clip(mem, 0.001, None)
        scale = 10 ** rng.uniform(-1, 1)
        ppl = scale * np.linspace(1.0, 0.05, num_options) ** 2
        ppl = np.abs(ppl * (1 + 0.15 * rng.standard_normal(num_options)))
        memory.append(mem.tolist())
        perplexity.append(ppl.tolist())
    return perplexity, memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 42, 100, 200])
    ap.add_argument("--options", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--plain-max-layers", type=int, default=100,
                    help="also time the DP without bound pruning up to this many layers")
    args = ap.parse_args()

    result = {"options_per_layer": args.options, "budget_fractions": args.fractions,
              "seeds": args.seeds, "sizes": {}}
    for n in args.sizes:
        times, finals, maxes = [], [], []
        for seed in range(args.seeds):
            rng = np.random.default_rng(1000 * n + seed)
            ppl, mem = random_table(n, args.options, rng)
            lo, hi = sum(min(r) for r in mem), sum(max(r) for r in mem)
            for f in args.fractions:
                budget = lo + f * (hi - lo)
                stats = {}
                t0 = time.perf_counter()
                choice = solve(ppl, mem, budget, stats=stats)
                times.append(time.perf_counter() - t0)
                assert sum(mem[i][j] for i, j in enumerate(choice)) <= budget
                finals.append(stats["final_front"])
                maxes.append(stats["max_front"])
        row = {"median_s": round(statistics.median(times), 5), "max_s": round(max(times), 5),
               "final_front_median": int(statistics.median(finals)),
               "max_front": max(maxes)}
        if n <= args.plain_max_layers:
            rng = np.random.default_rng(1000 * n)
            ppl, mem = random_table(n, args.options, rng)
            lo, hi = sum(min(r) for r in mem), sum(max(r) for r in mem)
            budget = lo + 0.5 * (hi - lo)
            P = [np.asarray(r, dtype=float) for r in ppl]
            M = [np.asarray(r, dtype=float) for r in mem]
            t0 = time.perf_counter()
            plain, fronts = ranks._pareto_dp(P, M, budget, [0.0] * n, np.inf, None)
            row["plain_dp_s"] = round(time.perf_counter() - t0, 5)
            row["plain_dp_final_front"] = fronts[-1]
            assert plain == solve(ppl, mem, budget)  # same answer with and without the bound
        result["sizes"][str(n)] = row
        print(f"{n:4d} layers: median {row['median_s']:.4f} s, max {row['max_s']:.4f} s, "
              f"final front {row['final_front_median']} states (median), "
              f"largest front {row['max_front']}"
              + (f"; without bound pruning {row['plain_dp_s']:.4f} s, "
                 f"{row['plain_dp_final_front']} states" if "plain_dp_s" in row else ""),
              file=sys.stderr, flush=True)
    if "42" in result["sizes"]:
        result["ok_42_under_1s"] = result["sizes"]["42"]["max_s"] < 1.0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
