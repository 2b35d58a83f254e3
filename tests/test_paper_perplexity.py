"""The authors' perplexity protocol as options: their memory counting, their perplexity.pkl, the budget message."""
from __future__ import annotations

import itertools
import math
import pickle

import pytest
import torch
from torch import nn

import asi_core
from asi_core.perplexity import measure_perplexity
from asi_core.ranks import solve


def test_full_rank_factors_count_like_the_authors():
    """Their layer_mem: (S.numel() + sum of the four factors' numel) * 4 / 2^20, a whole mode a D x D factor."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1))
    x, y = torch.randn(6, 3, 3, 3), torch.randn(6, 5, 3, 3)
    loss = lambda m, a, b: (m(a) - b).pow(2).sum()  # noqa: E731
    ours = measure_perplexity(net, [(x, y)], loss, [0.5, 0.999])
    theirs = measure_perplexity(net, [(x, y)], loss, [0.5, 0.999], full_rank_factors=True)
    some_whole = False
    for name in ours:
        shape = ours[name]["input_shape"]
        for j, ranks in enumerate(theirs[name]["ranks"]):
            core = math.prod(ranks)
            expect = (core + sum(d * r for d, r in zip(shape, ranks))) * 4 / 2 ** 20
            assert theirs[name]["memory_mib"][j] == pytest.approx(expect, rel=1e-12)
            whole = sum(d * d for d, r in zip(shape, ranks) if r == d)
            some_whole |= whole > 0
            assert theirs[name]["memory_mib"][j] - ours[name]["memory_mib"][j] == pytest.approx(whole * 4 / 2 ** 20)
        assert theirs[name]["perplexity"] == ours[name]["perplexity"]
    assert some_whole  # the case that differs was exercised


def _authors_pickle(path, convs, eps, seed=0):
    """A file in the authors' format: perplexity values as torch scalars (their th.norm), ranks lists, MiB floats."""
    g = torch.Generator().manual_seed(seed)
    data = {"set_of_epsilons": list(eps),
            "perplexity": [[torch.rand((), generator=g) * (1 - e) for e in eps] for _ in convs],
            "ranks": [[[1 + j, 2 + j, 1, 1] for j, _ in enumerate(eps)] for _ in convs],
            "layer_mems": [[float(torch.rand((), generator=g)) * (1 + j) for j, _ in enumerate(eps)] for _ in convs]}
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return data


def test_authors_pickle_selects_their_best_combination(tmp_path):
    from classification.backbones import create_model
    from classification.model import ClassificationModel

    convs = asi_core.candidate_layers(create_model("mcunet", 10, pretrained=False))
    eps = [0.4, 0.6, 0.8, 0.9]
    data = _authors_pickle(tmp_path / "perplexity.pkl", convs, eps)
    budget = 1.2
    # their find_best_combination over the last 2 layers: least summed perplexity with summed memory <= budget
    P = [[float(p) for p in data["perplexity"][i]] for i in (-2, -1)]
    M = [data["layer_mems"][i] for i in (-2, -1)]
    feasible = [c for c in itertools.product(range(4), repeat=2) if M[0][c[0]] + M[1][c[1]] <= budget]
    best = min(feasible, key=lambda c: P[0][c[0]] + P[1][c[1]])
    m = ClassificationModel("mcunet", 10, pretrained=False, method="asi", num_finetune=2,
                            perplexity_file=str(tmp_path / "perplexity.pkl"), budget=budget)
    assert [tuple(c["ranks"]) for c in m.rank_selection["layers"]] == [(1 + j, 2 + j, 1, 1) for j in best]
    assert solve(P, M, budget) == list(best)
    with open(tmp_path / "short.pkl", "wb") as f:
        pickle.dump({**data, "perplexity": data["perplexity"][:3]}, f)
    with pytest.raises(ValueError, match="3 layers but the model has 42"):
        ClassificationModel("mcunet", 10, pretrained=False, method="asi", num_finetune=2,
                            perplexity_file=str(tmp_path / "short.pkl"), budget=budget)


def test_infeasible_budget_points_to_min():
    with pytest.raises(ValueError, match=r"--model.budget min.*falls back"):
        solve([[1.0, 2.0]], [[3.0, 1.0]], 0.5)
