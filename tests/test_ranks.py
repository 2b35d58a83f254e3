"""asi_core.ranks: exact budget-constrained rank selection (eq. 9) and the perplexity table."""
import itertools
import json
import math
import random

import pytest

from asi_core.ranks import check_table_matches, load_table, select, solve


def brute_force(perplexity, memory, budget):
    """Exhaustive search: least (perplexity, memory, indices) among feasible selections."""
    best = None
    for combo in itertools.product(*(range(len(row)) for row in memory)):
        mem = sum(memory[i][j] for i, j in enumerate(combo))
        if mem > budget:
            continue
        ppl = sum(perplexity[i][j] for i, j in enumerate(combo))
        key = (ppl, mem, combo)
        if best is None or key < best:
            best = key
    return best


def totals(perplexity, memory, choice):
    return (sum(perplexity[i][j] for i, j in enumerate(choice)),
            sum(memory[i][j] for i, j in enumerate(choice)))


def random_instance(rng, integer=False):
    n = rng.randint(1, 6)
    sizes = [rng.randint(1, 6) for _ in range(n)]
    if integer:  # many exact ties
        mem = [[float(rng.randint(0, 4)) for _ in range(k)] for k in sizes]
        ppl = [[float(rng.randint(0, 4)) for _ in range(k)] for k in sizes]
    else:  # unsorted, scales spanning several orders of magnitude like MiB
        mem = [[rng.uniform(0, 1) * 10 ** rng.uniform(-3, 0.3) for _ in range(k)] for k in sizes]
        ppl = [[rng.uniform(0, 5) for _ in range(k)] for k in sizes]
    return ppl, mem


def budgets_for(rng, mem):
    lo = sum(min(r) for r in mem)
    hi = sum(max(r) for r in mem)
    some = [rng.randrange(len(r)) for r in mem]
    tight = sum(mem[i][j] for i, j in enumerate(some))  # exactly reachable: boundary case
    return [lo, hi, tight, math.nextafter(tight, -math.inf), lo + rng.random() * (hi - lo),
            lo + 0.1 * (hi - lo), math.inf]


@pytest.mark.parametrize("integer", [False, True])
def test_matches_brute_force(integer):
    rng = random.Random(1234 + integer)
    checked = 0
    for _ in range(150):
        ppl, mem = random_instance(rng, integer)
        for budget in budgets_for(rng, mem):
            best = brute_force(ppl, mem, budget)
            if best is None:
                with pytest.raises(ValueError, match="infeasible"):
                    solve(ppl, mem, budget)
                continue
            stats = {}
            choice = solve(ppl, mem, budget, stats=stats)
            assert not stats["bound_fallback"]  # the pruning bound never emptied a front
            assert len(choice) == len(mem)
            assert all(0 <= j < len(r) for j, r in zip(choice, mem))
            p, m = totals(ppl, mem, choice)
            assert m <= budget  # feasible with the caller's own sum, bit for bit
            assert (p, m) == best[:2]  # optimum perplexity, then least memory
            if integer:  # exact sums: the tie-break is the lexicographically smallest
                assert tuple(choice) == best[2]
            checked += 1
    assert checked >= 200


def test_infeasible_budget_names_minimum():
    mem = [[0.5, 0.25, 1.0], [2.0, 0.125]]
    ppl = [[1.0, 2.0, 0.0], [0.0, 3.0]]
    with pytest.raises(ValueError) as err:
        solve(ppl, mem, 0.3)
    msg = str(err.value)
    assert "0.375" in msg and "0.3" in msg and "minimum feasible budget" in msg
    assert solve(ppl, mem, 0.375) == [1, 1]


def greedy(perplexity, memory, budget):
    """Start from the cheapest options; repeatedly take the upgrade with the best perplexity
    drop per MiB that still fits (the obvious heuristic)."""
    choice = [min(range(len(r)), key=r.__getitem__) for r in memory]
    while True:
        used = sum(memory[i][j] for i, j in enumerate(choice))
        best = None
        for i, row in enumerate(memory):
            for j, m in enumerate(row):
                dm = m - row[choice[i]]
                dp = perplexity[i][choice[i]] - perplexity[i][j]
                if dm > 0 and dp > 0 and used + dm <= budget:
                    if best is None or dp / dm > best[0]:
                        best = (dp / dm, i, j)
        if best is None:
            return choice
        choice[best[1]] = best[2]


def test_greedy_fails_but_solve_is_optimal():
    ppl = [[10.0, 0.0], [10.0, 4.0]]
    mem = [[1.0, 3.0], [1.0, 2.0]]
    g = greedy(ppl, mem, 4.0)
    assert g == [0, 1] and totals(ppl, mem, g)[0] == 14.0
    assert solve(ppl, mem, 4.0) == [1, 0]  # perplexity 10 with memory 4


def test_input_validation():
    with pytest.raises(ValueError, match="no options"):
        solve([[1.0], []], [[1.0], []], 5.0)
    with pytest.raises(ValueError, match="2 layers but memory has 1"):
        solve([[1.0], [2.0]], [[1.0]], 5.0)
    with pytest.raises(ValueError, match="2 perplexity values but 1 memory"):
        solve([[1.0, 2.0]], [[1.0]], 5.0)
    with pytest.raises(ValueError, match="finite"):
        solve([[float("nan")]], [[1.0]], 5.0)
    with pytest.raises(ValueError, match="finite"):
        solve([[1.0]], [[float("nan")]], 5.0)
    with pytest.raises(ValueError, match="negative"):
        solve([[1.0, 2.0]], [[1.0, -0.5]], 5.0)
    with pytest.raises(ValueError, match="NaN"):
        solve([[1.0]], [[1.0]], float("nan"))
    assert solve([], [], 0.0) == []


def test_solve_scales_to_many_layers():
    # 42 layers x 6 options: exponential for backtracking, trivial for the Pareto DP.
    rng = random.Random(7)
    mem = [sorted(rng.uniform(0.001, 2.0) for _ in range(6)) for _ in range(42)]
    ppl = [sorted((rng.uniform(0, 3) for _ in range(6)), reverse=True) for _ in range(42)]
    lo, hi = sum(min(r) for r in mem), sum(max(r) for r in mem)
    budget = lo + 0.5 * (hi - lo)
    stats = {}
    choice = solve(ppl, mem, budget, stats=stats)
    p, m = totals(ppl, mem, choice)
    assert m <= budget
    assert len(stats["front_sizes"]) == 42 and stats["final_front"] >= 1
    # no single-layer change that stays within budget improves the total (a necessary condition)
    for i in range(42):
        for j in range(6):
            alt = list(choice)
            alt[i] = j
            pa, ma = totals(ppl, mem, alt)
            assert ma > budget or pa >= p


def test_bound_pruning_keeps_the_exact_answer():
    # Too many layers for brute force: the Lagrangian bound pruning in solve() must give exactly
    # the selection of the plain Pareto DP (same optimum, same tie-break).
    import numpy as np
    from asi_core import ranks

    rng = random.Random(11)
    for it in range(24):
        n = rng.randint(15, 30)
        mem = [[rng.choice([rng.random(), 0.25, 0.5]) for _ in range(rng.randint(1, 6))]
               for _ in range(n)]
        ppl = [[rng.random() if it % 2 else float(rng.randint(0, 3)) for _ in m] for m in mem]
        lo, hi = sum(min(r) for r in mem), sum(max(r) for r in mem)
        budget = rng.choice([lo, lo + rng.random() * (hi - lo),
                             sum(r[rng.randrange(len(r))] for r in mem)])
        rows_p = [np.asarray(r, dtype=float) for r in ppl]
        rows_m = [np.asarray(r, dtype=float) for r in mem]
        plain, _ = ranks._pareto_dp(rows_p, rows_m, budget, [0.0] * n, math.inf, None)
        stats = {}
        assert solve(ppl, mem, budget, stats=stats) == plain
        assert not stats["bound_fallback"]
        assert totals(ppl, mem, plain)[1] <= budget
        assert stats["incumbent_perplexity"] >= totals(ppl, mem, plain)[0]


# ---------------------------------------------------------------------------------------------
# select() on a perplexity table
# ---------------------------------------------------------------------------------------------

EPS = [0.4, 0.6, 0.8, 0.9]


def make_table():
    layers = {}
    mems = {"features.13.conv": [0.05, 0.125, 0.5, 1.0],
            "features.14.conv": [0.02, 0.25, 0.3, 0.75],
            "features.15.conv": [0.01, 0.0625, 0.25, 0.5]}
    ppls = {"features.13.conv": [4.0, 3.0, 1.0, 0.5],
            "features.14.conv": [6.0, 2.0, 1.5, 0.25],
            "features.15.conv": [2.0, 1.0, 0.75, 0.125]}
    for k, name in enumerate(mems):
        layers[name] = {"input_shape": [8, 32 * (k + 1), 7, 7],
                        "ranks": [[1 + j, 2 + j, 1 + j, 1 + j] for j in range(len(EPS))],
                        "memory_mib": mems[name], "perplexity": ppls[name]}
    return {"schema_version": 1, "model": "mcunet", "dataset": "cifar10",
            "input_shape": [8, 3, 128, 128], "batch_size": 8, "epsilons": list(EPS),
            "num_batches": 1, "layers": layers}


def check_result(res, table):
    for c in res["layers"]:
        entry = table["layers"][c["name"]]
        j = EPS.index(c["eps"])
        assert c["ranks"] == entry["ranks"][j]
        assert c["memory_mib"] == entry["memory_mib"][j]
        assert c["perplexity"] == entry["perplexity"][j]
    assert res["total_memory_mib"] == sum(c["memory_mib"] for c in res["layers"])
    assert res["total_memory_mib"] <= res["budget_mib"]
    assert res["total_perplexity"] == sum(c["perplexity"] for c in res["layers"])


def test_select_budgets():
    table = make_table()
    names = list(table["layers"])

    res = select(table, "hosvd@0.8")
    assert res["budget_mib"] == 0.5 + 0.3 + 0.25
    assert [c["name"] for c in res["layers"]] == names
    check_result(res, table)
    # the optimum is at least as good as HOSVD's own choice at eps=0.8 (same memory budget)
    assert res["total_perplexity"] <= 1.0 + 1.5 + 0.75
    # brute force over the table agrees
    ppl = [table["layers"][n]["perplexity"] for n in names]
    mem = [table["layers"][n]["memory_mib"] for n in names]
    assert res["total_perplexity"] == brute_force(ppl, mem, res["budget_mib"])[0]

    res = select(table, "min")
    assert res["budget_mib"] == 0.05 + 0.02 + 0.01
    assert [c["eps"] for c in res["layers"]] == [0.4, 0.4, 0.4]
    check_result(res, table)

    res = select(table, 0.6)
    assert res["budget_mib"] == 0.6
    assert res["total_perplexity"] == brute_force(ppl, mem, 0.6)[0]
    check_result(res, table)

    res = select(table, 100)  # everything fits: the most accurate option everywhere
    assert [c["eps"] for c in res["layers"]] == [0.9, 0.9, 0.9]


def test_select_layer_subset():
    table = make_table()
    res = select(table, "hosvd@0.6", layers=["features.15.conv", "features.13.conv"])
    assert [c["name"] for c in res["layers"]] == ["features.13.conv", "features.15.conv"]
    assert res["budget_mib"] == 0.125 + 0.0625
    check_result(res, table)
    assert res["total_perplexity"] == brute_force(
        [[4.0, 3.0, 1.0, 0.5], [2.0, 1.0, 0.75, 0.125]],
        [[0.05, 0.125, 0.5, 1.0], [0.01, 0.0625, 0.25, 0.5]], res["budget_mib"])[0]


def test_select_errors():
    table = make_table()
    with pytest.raises(ValueError) as err:
        select(table, "hosvd@0.7")
    assert "0.7" in str(err.value) and "[0.4, 0.6, 0.8, 0.9]" in str(err.value)
    with pytest.raises(ValueError) as err:
        select(table, 1.0, layers=["features.13.conv", "classifier"])
    assert "'classifier'" in str(err.value) and "features.15.conv" in str(err.value)
    with pytest.raises(ValueError, match="minimum feasible budget"):
        select(table, 0.01)
    with pytest.raises(ValueError, match="not understood"):
        select(table, "lots")


def test_check_table_matches():
    table = make_table()
    check_table_matches(table, "mcunet", ["features.14.conv"], [8, 3, 128, 128])
    with pytest.raises(ValueError, match="'mcunet', not 'mbv2'"):
        check_table_matches(table, model_name="mbv2")
    with pytest.raises(ValueError, match="features.16.conv"):
        check_table_matches(table, layer_names=["features.15.conv", "features.16.conv"])
    with pytest.raises(ValueError, match=r"\[8, 3, 128, 128\].*\[16, 3, 128, 128\]"):
        check_table_matches(table, input_shape=[16, 3, 128, 128])


def test_load_table(tmp_path):
    table = make_table()
    path = tmp_path / "perplexity.json"
    path.write_text(json.dumps(table))
    assert load_table(path) == table

    bad = dict(table, schema_version=2)
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="schema_version 2"):
        load_table(path)
    bad = {k: v for k, v in table.items() if k != "epsilons"}
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="epsilons"):
        load_table(path)
    bad = json.loads(json.dumps(table))
    bad["layers"]["features.14.conv"]["perplexity"] = [1.0, 2.0]
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="features.14.conv.*one entry per epsilon"):
        load_table(path)
    bad["layers"]["features.14.conv"]["perplexity"] = [1.0, float("nan"), 2.0, 3.0]
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="features.14.conv.*finite"):
        load_table(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_table(path)
    with pytest.raises(FileNotFoundError, match="measurement"):
        load_table(tmp_path / "missing.json")


def _consistent_table():
    """One layer measured by this project: memory_mib is eq. 5 of its ranks on its shape, in float32."""
    from asi_core.accounting import tucker_elements
    shape, eps = [8, 32, 7, 7], [0.4, 0.8, 0.9]
    ranks = [[1, 2, 1, 1], [2, 4, 2, 2], [3, 6, 3, 3]]
    return {"schema_version": 1, "model": "mcunet", "dataset": "digits", "input_shape": [8, 3, 96, 96],
            "batch_size": 8, "epsilons": eps, "num_batches": 1,
            "layers": {"blocks.13.conv": {"input_shape": shape, "ranks": ranks,
                                          "memory_mib": [tucker_elements(shape, r) * 4 / 2 ** 20 for r in ranks],
                                          "perplexity": [3.0, 1.0, 0.5]}}}


@pytest.mark.parametrize("edit,message", [
    (lambda e, t: e["ranks"].__setitem__(2, [3, 3000, 3, 3]), "do not fit the layer's input"),
    (lambda e, t: e["ranks"].__setitem__(2, [3, 6, 3]), "do not fit the layer's input"),
    (lambda e, t: e["memory_mib"].__setitem__(2, e["memory_mib"][2] * 10), "is not what ranks"),
    (lambda e, t: e["memory_mib"].__setitem__(0, 0.0), "keeps more than nothing"),
    (lambda e, t: e["perplexity"].__setitem__(1, -1.0), "negative"),
    (lambda e, t: t.__setitem__("epsilons", [0.9, 0.8, 0.4]), "do not follow 'epsilons'"),
])
def test_a_table_that_does_not_fit_its_own_shapes_is_refused(edit, message):
    from asi_core.ranks import check_table_consistent
    table = _consistent_table()
    check_table_consistent(table)  # as measured: fine
    edit(table["layers"]["blocks.13.conv"], table)
    with pytest.raises(ValueError, match=message):
        check_table_consistent(table, "p.json")
