"""Budget-constrained rank selection from a perplexity table (paper Sec. 3.3, eq. 8-9).

The measurement stage writes ``perplexity.json`` (schema below): for every fine-tuned layer i and
every explained-variance threshold eps_j it records the HOSVD ranks R_{i,j}, the activation memory
M_{i,j} those ranks need (eq. 5, MiB) and the perplexity P_{i,j} (eq. 7). Rank selection then picks
one eps index per layer::

    minimise  sum_i P[i][j_i]   subject to   sum_i M[i][j_i] <= budget          (eq. 9)

The paper solves this by backtracking, which is exponential in the number of layers (App. C).
:func:`solve` returns the same optimum with a dynamic program over Pareto fronts: after layer i the
state set holds every reachable (memory, perplexity) pair of the first i layers that no other pair
beats in both, minus pairs that cannot stay within the budget even with the cheapest option of
every remaining layer. A front holds at most one state per distinct memory sum, but with float
memories that is nearly every sum: on realistic random tables it grows ~2 n^2 states (81k at 200
layers, 7 s). So states are also pruned branch-and-bound style: a Lagrangian relaxation of eq. 9
gives each state a lower bound on the total perplexity of any feasible completion, and a greedy
feasible selection gives an upper bound (the incumbent); states whose bound exceeds the incumbent
are dropped. Fronts then stay at a few hundred states (200 layers x 6 options: ~20 ms; see
``scripts/bench_ranks.py``). Worst cases remain exponential in principle (it is a knapsack).

Exactness guarantees of :func:`solve` (memories and perplexities are floats, nothing is rounded):

* Totals are defined the way a caller computes them, ``sum(memory[i][j_i] for i in range(n))``,
  i.e. left-to-right float addition in layer order; the DP accumulates states with exactly these
  additions, so the returned selection's memory sum computed that way is ``<= budget``, bit for bit.
* The returned selection minimises the total perplexity (also summed left to right) over all
  selections feasible in that sense, and among those minimisers it has the smallest total memory;
  this (perplexity, memory) pair is what exhaustive search returns. Float addition is monotone, so
  dominance pruning never discards a state whose completions could do better.
* Ties: among selections with equal (total perplexity, total memory) the lexicographically smallest
  index list is returned. This is exact whenever the sums are exact (e.g. integer-valued tables,
  or repeated values); only when float rounding makes two different sums collide can another
  optimal selection be returned, deterministically.
* The "cannot fit the remaining layers" and the lower-bound pruning use margins of a few ulps of
  the sums involved: they only drop states that cannot be optimal beyond any rounding doubt; the
  final budget test is exact. Tests compare against exhaustive search and against the DP without
  the bound.

perplexity.json, schema_version 1 (layers in model registration order)::

    {"schema_version": 1, "model": str, "dataset": str, "input_shape": [B, C, H, W],
     "batch_size": int, "epsilons": [0.4, ...], "num_batches": int,
     "layers": {"<qualified conv name>": {"input_shape": [B, C, H, W],
                                          "ranks": [[r1, r2, r3, r4], ...one per eps],
                                          "memory_mib": [float per eps],
                                          "perplexity": [float per eps]}, ...}}
"""
from __future__ import annotations

import json
import math
import numbers
import os
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["solve", "select", "load_table", "validate_table", "check_table_matches",
           "table_from_authors_pickle", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
_UNIT_ROUNDOFF = 2.0 ** -53  # float64


# --------------------------------------------------------------------------------------------
# The solver
# --------------------------------------------------------------------------------------------

def _as_rows(values: Sequence[Sequence[float]], what: str) -> list[np.ndarray]:
    try:
        n = len(values)
    except TypeError:
        raise ValueError(f"{what} must be a list with one list of option values per layer, "
                         f"got {type(values).__name__}") from None
    rows = []
    for i in range(n):
        try:
            row = np.asarray(values[i], dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{what}[{i}] must be a list of numbers: {err}") from None
        if row.ndim != 1:
            raise ValueError(f"{what}[{i}] must be a flat list of numbers (one per option), "
                             f"got shape {row.shape}")
        if row.size == 0:
            raise ValueError(f"layer {i} has no options ({what}[{i}] is empty); every layer "
                             f"needs at least one option")
        bad = ~np.isfinite(row)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{what}[{i}][{j}] is {row[j]!r}; all values must be finite numbers")
        rows.append(row)
    return rows


def _chain_sum(values: Iterable[float]) -> float:
    """Left-to-right float sum, the same additions as the built-in ``sum`` (start 0)."""
    total = 0.0
    for v in values:
        total += float(v)
    return total


def _lagrangian_prune_data(P: list[np.ndarray], M: list[np.ndarray], budget: float):
    """Multiplier, lower-bound constants and incumbent for branch-and-bound pruning.

    For any lam >= 0 and any completion of a state (s, p) after layer i that fits the budget,
    total perplexity >= p + sum_{l>i} min_j (P[l][j] + lam*M[l][j]) - lam*(budget - s)
    (Lagrangian relaxation of eq. 9). lam is the smallest breakpoint at which the per-layer
    minimisers of P + lam*M fit the budget (it maximises the bound at the root); that selection,
    greedily upgraded with the leftover budget, is a feasible incumbent. A state whose bound exceeds the incumbent's
    perplexity cannot be optimal. Returns (lam, suffix_constants, incumbent_perplexity, scale)
    or None when no finite multiplier is found (then only dominance and budget pruning apply).
    """
    n = len(M)
    kmax = max(m.size for m in M)
    Pm = np.full((n, kmax), np.inf)
    Mm = np.full((n, kmax), np.inf)
    for i in range(n):
        Pm[i, :P[i].size] = P[i]
        Mm[i, :M[i].size] = M[i]
    rows = np.arange(n)

    def argmin_at(lam: float) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            val = Pm + lam * Mm if lam > 0 else Pm
        best = val.min(axis=1, keepdims=True)
        return np.where(val == best, Mm, np.inf).argmin(axis=1)  # ties: least memory

    def fits(sel: np.ndarray) -> bool:
        return _chain_sum(Mm[rows, sel]) <= budget

    lam = 0.0
    sel = argmin_at(0.0)
    if not fits(sel):
        # The least-memory minimiser of P + lam*M changes only at lam = a slope between two
        # options of a layer, and its memory does not increase with lam: binary-search the
        # smallest such slope at which it fits (the maximiser of the Lagrangian dual).
        slopes = []
        for p, m in zip(P, M):
            dm = m[None, :] - m[:, None]
            dp = p[:, None] - p[None, :]
            mask = (dm > 0) & (dp > 0)
            with np.errstate(over="ignore"):
                slopes.append(dp[mask] / dm[mask])
        cand = np.unique(np.concatenate(slopes))
        cand = cand[np.isfinite(cand) & (cand > 0)]
        if cand.size and fits(argmin_at(float(cand[-1]))):
            lo, hi = -1, cand.size - 1  # cand[lo] does not fit (lo = -1: lam = 0), cand[hi] fits
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if fits(argmin_at(float(cand[mid]))):
                    hi = mid
                else:
                    lo = mid
            lam = float(cand[hi])
        else:  # rounding in the slopes: fall back to doubling
            lam = float(cand[-1]) if cand.size else 1.0
            while not fits(argmin_at(lam)):
                lam *= 2.0
                if not math.isfinite(lam):
                    return None
        sel = argmin_at(lam)
    # greedy fill: repeatedly take the largest perplexity drop that still fits
    sel = sel.copy()
    improved = True
    while improved:
        improved = False
        cur_p, cur_m = Pm[rows, sel], Mm[rows, sel]
        used = _chain_sum(cur_m)
        drop = cur_p[:, None] - Pm
        ok = (drop > 0) & (used + (Mm - cur_m[:, None]) <= budget)
        for f in np.flatnonzero(ok.ravel())[np.argsort(-drop.ravel()[ok.ravel()],
                                                      kind="stable")]:
            i, j = divmod(int(f), kmax)
            old, sel[i] = sel[i], j
            if fits(sel):  # exact check; the estimate above can be off by rounding
                improved = True
                break
            sel[i] = old
    incumbent = _chain_sum(Pm[rows, sel])
    with np.errstate(over="ignore", invalid="ignore"):
        g = (Pm + lam * Mm).min(axis=1) if lam > 0 else Pm.min(axis=1)
    if not (np.isfinite(g).all() and math.isfinite(incumbent)):
        return None
    lam_budget = lam * budget if lam > 0 else 0.0  # lam = 0 with budget = inf is fine
    const = [math.fsum(g[i + 1:].tolist()) - lam_budget for i in range(n)]
    max_mem = float(np.where(np.isfinite(Mm), Mm, 0).max(axis=1).sum())
    scale = (float(np.abs(np.where(np.isfinite(Pm), Pm, 0)).max(axis=1).sum())
             + (lam * (max_mem + abs(budget)) if lam > 0 else 0.0)
             + abs(incumbent) + float(np.abs(g).sum()))
    if not all(math.isfinite(c) for c in const) or not math.isfinite(scale):
        return None
    return lam, const, incumbent, scale


def solve(perplexity: Sequence[Sequence[float]], memory: Sequence[Sequence[float]],
          budget: float, *, stats: dict | None = None) -> list[int]:
    """Pick one option per layer minimising total perplexity with total memory <= budget (eq. 9).

    Args:
        perplexity: ``perplexity[i][j]`` is the perplexity of option j of layer i (finite floats;
            options need not be sorted; layers may have different numbers of options).
        memory: ``memory[i][j]``, same shape as ``perplexity``, finite and >= 0 (e.g. MiB).
            Values are read as float64 (Python floats are unchanged).
        budget: upper bound on ``sum(memory[i][j_i])`` (same unit); ``math.inf`` = unconstrained.
        stats: if a dict is given, it is filled with ``front_sizes`` (Pareto states kept after
            each layer), ``final_front``, ``max_front``, ``lagrange_multiplier`` and
            ``incumbent_perplexity`` (the pruning bound's data, None if unused) and
            ``bound_fallback`` (True if the bound emptied a front and the DP was re-run without
            it; never observed, kept as a safety net).

    Returns:
        ``[j_0, ..., j_{n-1}]``, the exact optimum (see the module docstring for the guarantees
        and the tie-break: least perplexity, then least memory, then lexicographically smallest).

    Raises:
        ValueError: malformed input, or a budget below the minimum feasible budget (the sum of
            the per-layer minimum memories), with both numbers in the message.
    """
    P = _as_rows(perplexity, "perplexity")
    M = _as_rows(memory, "memory")
    if len(P) != len(M):
        raise ValueError(f"perplexity has {len(P)} layers but memory has {len(M)}; "
                         f"give one row per layer in both")
    for i, (p, m) in enumerate(zip(P, M)):
        if p.size != m.size:
            raise ValueError(f"layer {i}: {p.size} perplexity values but {m.size} memory values; "
                             f"each option needs both")
        if (m < 0).any():
            j = int(np.flatnonzero(m < 0)[0])
            raise ValueError(f"memory[{i}][{j}] = {m[j]!r} is negative; memory must be >= 0")
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise ValueError(f"budget must be a real number, got {budget!r}")
    budget = float(budget)
    if math.isnan(budget):
        raise ValueError("budget is NaN; give a number (math.inf for no constraint)")

    n = len(M)
    mins = [float(m.min()) for m in M]
    min_budget = _chain_sum(mins)  # memory of the all-cheapest selection, summed as reported
    if not min_budget <= budget:
        raise ValueError(f"infeasible budget: {budget!r} is below the minimum feasible budget "
                         f"{min_budget!r} (sum of each layer's smallest memory over {n} layers); "
                         f"raise the budget to at least {min_budget!r}, or give the budget 'min' "
                         f"(--model.budget min: that smallest-memory selection, which the authors' code falls "
                         f"back to with a warning when the budget is infeasible)")
    if n == 0:
        if stats is not None:
            stats.update(front_sizes=[], final_front=1, max_front=1, lagrange_multiplier=None,
                         incumbent_perplexity=None, bound_fallback=False)
        return []

    # rest[i]: least memory the layers after i still need. A state of layer i with memory s is
    # pruned when s + rest[i] exceeds the budget by more than any rounding of the float sums can
    # explain (slack: a few ulps of the largest sum involved). The last layer's test is exact.
    rest = [math.fsum(mins[i + 1:]) for i in range(n)]
    total_max = math.fsum(float(m.max()) for m in M)
    threshold = budget + 4.0 * (n + 4) * _UNIT_ROUNDOFF * max(total_max, abs(budget))

    bound = _lagrangian_prune_data(P, M, budget)
    result = _pareto_dp(P, M, budget, rest, threshold, bound)
    fallback = result is None
    if fallback:  # cannot happen if the rounding margins hold; stay exact regardless
        result = _pareto_dp(P, M, budget, rest, threshold, None)
    choice, front_sizes = result
    if stats is not None:
        stats.update(front_sizes=front_sizes, final_front=front_sizes[-1],
                     max_front=max(front_sizes),
                     lagrange_multiplier=None if bound is None else bound[0],
                     incumbent_perplexity=None if bound is None else bound[2],
                     bound_fallback=fallback)
    return choice


def _pareto_dp(P: list[np.ndarray], M: list[np.ndarray], budget: float, rest: list[float],
               threshold: float, bound) -> tuple[list[int], list[int]] | None:
    """Layer-by-layer Pareto fronts of (memory, perplexity) with back-pointers; see solve()."""
    n = len(M)
    if bound is not None:
        lam, const, incumbent, scale = bound
        # a state is dropped only if its lower bound beats the incumbent by more than rounding
        cutoff = incumbent + 8.0 * (n + 4) * _UNIT_ROUNDOFF * scale
    s = np.zeros(1)  # memory of each state (float chain sums, as in sum())
    p = np.zeros(1)  # perplexity of each state
    lex = np.zeros(1, dtype=np.int64)  # rank of each state's index prefix in lexicographic order
    parents: list[np.ndarray] = []
    options: list[np.ndarray] = []
    front_sizes: list[int] = []
    for i in range(n):
        k = M[i].size
        cs = (s[:, None] + M[i][None, :]).ravel()
        cp = (p[:, None] + P[i][None, :]).ravel()
        ckey = (lex[:, None] * k + np.arange(k, dtype=np.int64)[None, :]).ravel()
        if i == n - 1:
            ok = cs <= budget
        else:
            ok = (cs <= budget) & (cs + rest[i] <= threshold)
        if bound is not None:  # Lagrangian lower bound (see _lagrangian_prune_data)
            ok &= cp + lam * cs + const[i] <= cutoff
        idx = np.flatnonzero(ok)
        if idx.size == 0:
            return None
        cs, cp, ckey = cs[idx], cp[idx], ckey[idx]
        order = np.lexsort((ckey, cp, cs))  # by memory, then perplexity, then index prefix
        cs, cp, ckey, idx = cs[order], cp[order], ckey[order], idx[order]
        # Pareto filter: keep a state iff its perplexity is below that of every state with
        # less-or-equal memory sorted before it (ties keep the lexicographically smallest prefix).
        keep = np.empty(cs.size, dtype=bool)
        keep[0] = True
        if cs.size > 1:
            keep[1:] = cp[1:] < np.minimum.accumulate(cp)[:-1]
        s, p, ckey, idx = cs[keep], cp[keep], ckey[keep], idx[keep]
        lex = np.empty(s.size, dtype=np.int64)
        lex[np.argsort(ckey, kind="stable")] = np.arange(s.size, dtype=np.int64)
        parents.append(idx // k)
        options.append(idx % k)
        front_sizes.append(int(s.size))

    # The front is sorted by memory with strictly decreasing perplexity: the last state is the
    # unique one with least perplexity, and the least memory among those.
    e = s.size - 1
    choice = [0] * n
    for i in range(n - 1, -1, -1):
        choice[i] = int(options[i][e])
        e = int(parents[i][e])
    return choice, front_sizes


# --------------------------------------------------------------------------------------------
# The perplexity table
# --------------------------------------------------------------------------------------------

_TOP_KEYS = ("schema_version", "model", "dataset", "input_shape", "batch_size", "epsilons",
             "num_batches", "layers")
_LAYER_KEYS = ("input_shape", "ranks", "memory_mib", "perplexity")


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _shape_ok(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(_is_int(d) and d > 0 for d in x)


def validate_table(table: Any, source: str = "perplexity table") -> dict:
    """Check a parsed perplexity.json against schema version 1; return it unchanged.

    Raises ValueError saying which key is missing or malformed, prefixed by ``source``.
    """
    def fail(msg: str) -> None:
        raise ValueError(f"{source}: {msg}")

    if not isinstance(table, dict):
        fail(f"expected a JSON object, got {type(table).__name__}")
    if "schema_version" not in table:
        fail("no 'schema_version' key; this is not a perplexity.json written by the "
             "measurement stage (expected schema_version 1)")
    if table["schema_version"] != SCHEMA_VERSION:
        fail(f"unsupported schema_version {table['schema_version']!r}; this code reads version "
             f"{SCHEMA_VERSION}, re-run the measurement stage to regenerate the file")
    missing = [k for k in _TOP_KEYS if k not in table]
    if missing:
        fail(f"missing required key(s) {missing}; required: {list(_TOP_KEYS)}")
    for key in ("model", "dataset"):
        if not isinstance(table[key], str):
            fail(f"'{key}' must be a string, got {table[key]!r}")
    if not _shape_ok(table["input_shape"]):
        fail(f"'input_shape' must be a list of positive ints, got {table['input_shape']!r}")
    for key in ("batch_size", "num_batches"):
        if not _is_int(table[key]) or table[key] < 1:
            fail(f"'{key}' must be a positive int, got {table[key]!r}")
    eps = table["epsilons"]
    if (not isinstance(eps, list) or not eps
            or not all(_is_real(e) and 0 < e <= 1 for e in eps)):
        fail(f"'epsilons' must be a non-empty list of numbers in (0, 1], got {eps!r}")
    if len(set(eps)) != len(eps):
        fail(f"'epsilons' has repeated values: {eps!r}")
    layers = table["layers"]
    if not isinstance(layers, dict) or not layers:
        fail("'layers' must be a non-empty object mapping layer names to measurements")
    E = len(eps)
    for name, entry in layers.items():
        where = f"layer {name!r}"
        if not isinstance(entry, dict):
            fail(f"{where}: expected an object, got {type(entry).__name__}")
        missing = [k for k in _LAYER_KEYS if k not in entry]
        if missing:
            fail(f"{where}: missing key(s) {missing}; required: {list(_LAYER_KEYS)}")
        if not _shape_ok(entry["input_shape"]):
            fail(f"{where}: 'input_shape' must be a list of positive ints, "
                 f"got {entry['input_shape']!r}")
        for key in ("ranks", "memory_mib", "perplexity"):
            if not isinstance(entry[key], list) or len(entry[key]) != E:
                got = len(entry[key]) if isinstance(entry[key], list) else entry[key]
                fail(f"{where}: '{key}' must be a list with one entry per epsilon "
                     f"({E}: {eps}), got {got!r}")
        for j, r in enumerate(entry["ranks"]):
            if (not isinstance(r, list) or not r
                    or not all(_is_int(x) and x >= 0 for x in r)):
                fail(f"{where}: ranks[{j}] (eps={eps[j]}) must be a list of non-negative ints, "
                     f"got {r!r}")
        for key in ("memory_mib", "perplexity"):
            for j, v in enumerate(entry[key]):
                if not _is_real(v) or not math.isfinite(v):
                    fail(f"{where}: {key}[{j}] (eps={eps[j]}) must be a finite number, "
                         f"got {v!r}")
                if key == "memory_mib" and v <= 0:
                    fail(f"{where}: memory_mib[{j}] (eps={eps[j]}) is {v!r}; a compressed layer keeps more than "
                         f"nothing: re-measure the table")
                if key == "perplexity" and v < 0:
                    fail(f"{where}: perplexity[{j}] (eps={eps[j]}) is negative ({v!r}); a perplexity is a squared "
                         f"error, >= 0: re-measure the table")
        if not str(table.get("source", "")).startswith("authors'"):  # their pickle: no layer shapes, eps and
            for j, r in enumerate(entry["ranks"]):                      # columns written together by their code
                shape = entry["input_shape"]
                if len(r) != len(shape) or any(x > d for x, d in zip(r, shape)):
                    fail(f"{where}: ranks[{j}] (eps={eps[j]}) = {r} do not fit the layer's input {shape} (one rank "
                         f"per mode, none larger than its mode); training would keep more than the table says: "
                         f"re-measure the table")
            _check_columns(entry, eps, fail, where)
    return table


def _check_columns(entry: dict, eps: Sequence[float], fail, where: str) -> None:
    """A larger eps keeps more: ranks (mode by mode) and memory never fall as eps rises. A table whose
    ``epsilons`` were reordered without its columns (or edited by hand) breaks this, and ``hosvd@<eps>`` would
    then read another eps's column."""
    order = sorted(range(len(eps)), key=lambda j: eps[j])
    for a, b in zip(order, order[1:]):
        ra, rb = entry["ranks"][a], entry["ranks"][b]
        if any(x > y for x, y in zip(ra, rb)) or entry["memory_mib"][a] > entry["memory_mib"][b]:
            fail(f"{where}: eps {eps[a]} keeps ranks {ra} ({entry['memory_mib'][a]!r} MiB) but the larger eps {eps[b]} "
                 f"keeps {rb} ({entry['memory_mib'][b]!r} MiB); the columns do not follow 'epsilons' {list(eps)} "
                 f"(reordered or edited?): re-measure the table")


def check_table_consistent(table: dict, source: str = "perplexity table") -> None:
    """What a table measured by this project (not converted from the authors' pickle, which records no layer
    shapes) must satisfy before its ranks train a model, beyond :func:`validate_table` (one rank per mode of the
    layer's recorded input, none larger than that mode; columns that grow with eps): ``memory_mib`` is eq. 5 of the
    ranks on that shape (at 2, 4 or 8 bytes an element, whole modes counted or not), so the budget a selection
    reports is the memory training uses. Hand-made tables for experiments may skip it (``select`` does not call
    it); the framework does. ValueError naming the layer, the eps and what does not fit."""
    from .accounting import MIB as _MIB, tucker_elements

    validate_table(table, source)
    if str(table.get("source", "")).startswith("authors'"):
        return
    for name, entry in table["layers"].items():
        shape = list(entry["input_shape"])
        for j, (r, mem) in enumerate(zip(entry["ranks"], entry["memory_mib"])):
            where = f"{source}: layer {name!r}, eps {table['epsilons'][j]}"
            expected = {tucker_elements(shape, r, whole) * b / _MIB for whole in (False, True) for b in (2, 4, 8)}
            if not any(math.isclose(mem, e, rel_tol=1e-6) for e in expected):
                raise ValueError(f"{where}: memory_mib {mem!r} is not what ranks {r} keep on input {shape} (eq. 5: "
                                 f"{tucker_elements(shape, r) * 4 / _MIB:.6g} MiB in float32); re-measure the table")


def load_table(path: str | os.PathLike) -> dict:
    """Read and validate a perplexity.json (schema version 1)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"perplexity table {path!r} not found; produce it with the "
                                f"perplexity measurement stage first") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    return validate_table(table, source=path)


def check_table_matches(table: dict, model_name: str | None = None,
                        layer_names: Sequence[str] | None = None,
                        input_shape: Sequence[int] | None = None) -> None:
    """Raise ValueError if ``table`` was measured for another model, layer set or input shape.

    ``layer_names`` must all be in the table (a table may cover more layers than are fine-tuned).
    ``input_shape`` is compared in full, batch size included: memory scales with it.
    Arguments left as None are not checked.
    """
    validate_table(table)
    if model_name is not None and table["model"] != model_name:
        raise ValueError(f"perplexity table was measured for model {table['model']!r}, not "
                         f"{model_name!r}; measure the perplexity of {model_name!r} first")
    if layer_names is not None:
        missing = [n for n in layer_names if n not in table["layers"]]
        if missing:
            raise ValueError(f"perplexity table (model {table['model']!r}) has no measurement "
                             f"for layer(s) {missing}; it covers {list(table['layers'])}; "
                             f"re-measure with these layers")
    if input_shape is not None and list(table["input_shape"]) != list(input_shape):
        raise ValueError(f"perplexity table was measured with input shape "
                         f"{list(table['input_shape'])}, but the input shape is "
                         f"{list(input_shape)}; memory and perplexity depend on it (batch size "
                         f"included), re-measure with this shape")


def _match_eps(eps: float, epsilons: Sequence[float]) -> int | None:
    for j, e in enumerate(epsilons):
        if e == eps:
            return j
    for j, e in enumerate(epsilons):
        if math.isclose(e, eps, rel_tol=1e-9, abs_tol=1e-12):
            return j
    return None


def _resolve_budget(budget_mib: Any, table: dict, names: list[str],
                    memory: list[list[float]]) -> float:
    forms = "a number of MiB, 'min', or 'hosvd@<eps>' (e.g. 'hosvd@0.8')"
    if isinstance(budget_mib, str):
        text = budget_mib.strip()
        if text.lower() == "min":
            return _chain_sum(min(m) for m in memory)
        if text.lower().startswith("hosvd@"):
            try:
                eps = float(text[len("hosvd@"):])
            except ValueError:
                raise ValueError(f"budget {budget_mib!r}: cannot read the epsilon after "
                                 f"'hosvd@'; expected e.g. 'hosvd@0.8'") from None
            j = _match_eps(eps, table["epsilons"])
            if j is None:
                raise ValueError(f"budget {budget_mib!r}: eps={eps} was not measured in this "
                                 f"table; available epsilons: {table['epsilons']}")
            return _chain_sum(table["layers"][n]["memory_mib"][j] for n in names)
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"budget {budget_mib!r} not understood; give {forms}") from None
    elif _is_real(budget_mib):
        value = float(budget_mib)
    else:
        raise ValueError(f"budget {budget_mib!r} not understood; give {forms}")
    if math.isnan(value):
        raise ValueError(f"budget is NaN; give {forms}")
    return value


def select(table: dict | str | os.PathLike, budget_mib: float | str,
           layers: Sequence[str] | None = None) -> dict:
    """Choose one eps (hence ranks) per layer under an activation-memory budget (eq. 8-9).

    Args:
        table: a parsed perplexity.json (or a path to one).
        budget_mib: MiB as a number; ``"min"`` for the smallest feasible budget; or
            ``"hosvd@<eps>"`` for the memory HOSVD with that eps needs on the selected layers
            (the summed ``memory_mib`` at that eps; it must be one of the table's epsilons).
        layers: names of the layers to select for (default: all layers in the table). They are
            returned in the table's (model registration) order.

    Returns:
        ``{"budget_mib": float, "layers": [{"name", "eps", "ranks", "memory_mib",
        "perplexity"}, ...], "total_memory_mib": float, "total_perplexity": float}``,
        with totals summed in the returned layer order (``total_memory_mib <= budget_mib``).
    """
    if isinstance(table, (str, os.PathLike)):
        table = load_table(table)
    else:
        validate_table(table)
    available = list(table["layers"])
    if layers is None:
        names = available
    else:
        if isinstance(layers, str):
            layers = [layers]
        layers = list(layers)
        if not layers:
            raise ValueError("layers is empty; name at least one layer, or pass None for all "
                             f"layers in the table: {available}")
        dup = sorted({n for n in layers if layers.count(n) > 1})
        if dup:
            raise ValueError(f"layer(s) {dup} named more than once in layers")
        missing = [n for n in layers if n not in table["layers"]]
        if missing:
            raise ValueError(f"layer(s) {missing} not in the perplexity table (model "
                             f"{table['model']!r}); available layers: {available}")
        wanted = set(layers)
        names = [n for n in available if n in wanted]

    perplexity = [table["layers"][n]["perplexity"] for n in names]
    memory = [table["layers"][n]["memory_mib"] for n in names]
    budget = _resolve_budget(budget_mib, table, names, memory)
    choice = solve(perplexity, memory, budget)

    chosen = []
    for n, j in zip(names, choice):
        entry = table["layers"][n]
        chosen.append({"name": n, "eps": float(table["epsilons"][j]),
                       "ranks": [int(r) for r in entry["ranks"][j]],
                       "memory_mib": float(entry["memory_mib"][j]),
                       "perplexity": float(entry["perplexity"][j])})
    return {"budget_mib": budget,
            "layers": chosen,
            "total_memory_mib": _chain_sum(c["memory_mib"] for c in chosen),
            "total_perplexity": _chain_sum(c["perplexity"] for c in chosen)}


# --------------------------------------------------------------------------------------------
# The authors' perplexity.pkl
# --------------------------------------------------------------------------------------------

def _read_authors_pickle(path: str) -> dict:
    """Unpickle the authors' file (``pickle.dump`` of a dict of lists; its values may be torch tensors saved on
    a GPU, which are mapped to the CPU here). Pickle runs code: only load files you trust."""
    import io
    import pickle

    import torch

    def cpu_tensor(data: bytes):
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module == "torch.storage" and name == "_load_from_bytes":
                return cpu_tensor
            return super().find_class(module, name)

    with open(path, "rb") as f:
        return _Unpickler(f).load()


def table_from_authors_pickle(path: str | os.PathLike, layer_names: Sequence[str], model: str = "",
                              input_shape: Sequence[int] | None = None) -> dict:
    """A perplexity table (schema version 1) from the authors' ``perplexity.pkl`` (their utils/perplexity.py:
    ``set_of_epsilons``, and per conv layer of the whole model, in model order, per epsilon, ``perplexity``,
    ``ranks`` and ``layer_mems``). Their classification file names no layers: ``layer_names`` (every conv of the
    model, in registration order) names them, and must have as many entries. Their segmentation file (its
    tools/perplexity.py) holds only the layers of a ``filter_install`` list, in that order, and names them in its own
    ``layer_names``: those names are used, each checked against ``layer_names`` (their bare ``conv`` entries are
    named ``<path>.conv``, which is read as ``<path>``). Memory is theirs as measured (MiB, a
    full-rank mode counted as a full D x D factor), perplexity their one-batch measurement; the file holds no
    input shape, so ``input_shape`` (when given) is recorded unchecked."""
    path = os.fspath(path)
    try:
        data = _read_authors_pickle(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"perplexity table {path!r} not found") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ValueError(f"{path}: not a readable authors' perplexity.pkl ({type(err).__name__}: {err})") from None
    keys = ("set_of_epsilons", "perplexity", "ranks", "layer_mems")
    if not isinstance(data, dict) or any(k not in data for k in keys):
        raise ValueError(f"{path}: expected the authors' perplexity.pkl, a dict with keys {list(keys)}")
    names = list(layer_names)
    stored = data.get("layer_names")
    if stored:  # the segmentation file: its own names, in its filter_install order
        if len(stored) != len(data["perplexity"]):
            raise ValueError(f"{path}: names {len(stored)} layers but holds {len(data['perplexity'])}; the file is "
                             f"damaged: measure it again")
        known, own = set(names), []
        for name in map(str, stored):
            bare = name[:-len(".conv")] if name.endswith(".conv") else None  # their `conv`-type entries
            if name not in known and bare not in known:
                raise ValueError(f"{path}: names layer {name!r}, which is not a conv layer of this model; was it "
                                 f"measured for another model?")
            own.append(name if name in known else bare)
        names = own
    elif len(data["perplexity"]) != len(names):
        raise ValueError(f"{path}: holds {len(data['perplexity'])} layers but the model has {len(names)} conv layers; "
                         f"was it measured for another model?")

    def num(v) -> float:
        return float(v.item() if hasattr(v, "item") else v)

    eps = [num(e) for e in data["set_of_epsilons"]]
    shape = [int(d) for d in input_shape] if input_shape is not None else [1]
    layers = {}
    for i, name in enumerate(names):
        layers[name] = {"input_shape": shape,
                        "ranks": [[int(num(r)) for r in ranks] for ranks in data["ranks"][i]],
                        "memory_mib": [num(m) for m in data["layer_mems"][i]],
                        "perplexity": [num(p) for p in data["perplexity"][i]]}
    table = {"schema_version": SCHEMA_VERSION, "model": model, "dataset": "(authors' perplexity.pkl)",
             "input_shape": shape, "batch_size": shape[0], "epsilons": eps, "num_batches": 1, "layers": layers,
             "source": f"authors' perplexity.pkl {path}", "memory_counting": "full_rank_factors"}
    return validate_table(table, source=path)
