"""Activation perplexity (Sec. 3.3, eq. 7): for every candidate layer i and explained-variance
threshold ε_j, P_ij = ‖∂L/∂W_i − ∂L/∂W̃_i‖_F where W̃ uses the HOSVD_ε-compressed input, together
with the HOSVD ranks and the compressed memory M_i (eq. 5). Averaged over batches, weights frozen
(no optimiser step). The result is the table that ``asi_core.ranks.select`` turns into ranks.

Each mode's SVD is computed once per batch and truncated for every ε, so measuring E thresholds
costs one HOSVD, not E.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .accounting import tucker_elements
from .decompose import eps_rank, project_core
from .patch import candidate_layers
from .tensor import unfold

__all__ = ["SCHEMA_VERSION", "PAPER_EPSILONS", "measure_perplexity", "hosvd_all_eps", "choose_ranks", "default_loss"]

SCHEMA_VERSION = 1
PAPER_EPSILONS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # App. B.1 "Rank Selection"
MIB = 2 ** 20


def hosvd_all_eps(x: torch.Tensor, epsilons: Sequence[float]):
    """Yield ``(eps, core, factors, ranks)`` of the truncated HOSVD for every ε from one SVD per mode."""
    svds = [_mode_svd(x, m) for m in range(x.dim())]
    for eps in epsilons:
        ranks = tuple(eps_rank(s, eps) for _, s in svds)
        factors = [None if r >= d else u[:, :r].to(x.dtype).contiguous()
                   for (u, _), r, d in zip(svds, ranks, x.shape)]
        yield eps, project_core(x, factors), factors, ranks


def _mode_svd(x: torch.Tensor, mode: int):
    """Left singular vectors and values of the mode-``mode`` unfolding (a x b). For a wide unfolding
    (a < b, the usual case: a = D_m, b = the product of the others) they come from the a x a Gram
    matrix A Aᵀ in float64 (one GEMM + a small eigh: much cheaper than a thin SVD of A, and float64
    keeps the small eigenvalues that float32 squaring would lose)."""
    a = unfold(x, mode).double()
    if a.shape[0] >= a.shape[1]:
        u, s, _ = torch.linalg.svd(a, full_matrices=False)
        return u.to(x.dtype if x.dtype not in (torch.float16, torch.bfloat16) else torch.float32), s
    evals, evecs = torch.linalg.eigh(a @ a.t())
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    return evecs.to(x.dtype if x.dtype not in (torch.float16, torch.bfloat16) else torch.float32), evals.sqrt()


@torch.no_grad()
def _layer_perplexities(layer, x, grad_out, epsilons):
    from .conv import ConvOps
    from .linear import LinearOps

    ops = ConvOps(layer) if isinstance(layer, nn.Conv2d) else LinearOps(layer)
    x = ops.prepare(x)
    exact = ops.weight_grad_exact(x, grad_out, layer.weight.shape)
    out = []
    for eps, core, factors, ranks in hosvd_all_eps(x, epsilons):
        approx = ops.weight_grad(core, factors, grad_out, layer.weight.shape)
        out.append((ranks, (exact - approx).norm().item()))
    return out


def measure_perplexity(model: nn.Module, batches: Iterable, loss_fn: Callable, epsilons: Sequence[float],
                       num_finetune=None, layers: Optional[Sequence[str]] = None, layer_type: str = "conv",
                       progress: Optional[Callable[[int], None]] = None, include=None,
                       full_rank_factors: bool = False) -> dict:
    """Measure the perplexity table on ``batches`` (an iterable of ``(inputs, targets)``).

    ``loss_fn(model, inputs, targets) -> scalar loss``. Layers: the named ``layers``, or the last
    ``num_finetune`` (int or "all"; default all) of ``layer_type`` whose names match ``include`` (as in
    ``asi_core.patch``). The model's parameters and
    train/eval mode are restored afterwards; no parameter is changed.

    Returns the "layers" part of perplexity.json (schema version 1): per layer its input_shape,
    and per ε the HOSVD ranks (per mode, the largest seen over the batches, so memory is the peak),
    memory_mib (eq. 5 with those ranks, in the input's dtype) and perplexity (mean over batches).
    ``full_rank_factors``: count a mode kept whole (rank = D) as a D x D factor, as the authors' measurement does
    (what ASI really stores is no factor for such a mode: the default).
    """
    for eps in epsilons:
        if not 0 < eps <= 1:
            raise ValueError(f"epsilon {eps} is outside (0, 1]")
    names = list(layers) if layers is not None else candidate_layers(model, layer_type, include)
    if layers is None and num_finetune not in (None, "all"):
        names = names[-int(num_finetune):]
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"layer(s) {missing} not found in the model")
    odd = [n for n in names if not (isinstance(getattr(modules[n], "weight", None), torch.Tensor)
                                    and modules[n].weight.is_floating_point())]
    if odd:
        raise ValueError(f"layer(s) {odd[:3]} have no floating-point weight (quantised, e.g. 4-bit QLoRA base layers?):"
                         f" the perplexity needs their weight gradient; measure on a float copy of the model")
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    handles = []
    for n in names:
        weight = modules[n].weight
        weight.requires_grad_(True)  # gradients must reach every measured layer
        # ... but they are never used: drop each as soon as it is accumulated (an LLM's measured weights' gradients
        # would otherwise all be held at once)
        handles.append(weight.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)))

    stats = {n: {"ranks": [[0] * 4 for _ in epsilons], "perplexity": [0.0] * len(epsilons), "shape": None,
                 "dtype_bytes": 4} for n in names}
    inputs: dict[str, torch.Tensor] = {}

    def forward_hook(name):
        def hook(module, args, output):
            x = args[0].detach()
            inputs[name] = x
            stats[name]["shape"] = list(x.shape)
            stats[name]["dtype_bytes"] = x.element_size()

            def on_grad(grad_out):
                result = _layer_perplexities(module, inputs.pop(name), grad_out.detach(), epsilons)
                for j, (ranks, perp) in enumerate(result):
                    stats[name]["perplexity"][j] += perp
                    stats[name]["ranks"][j] = [max(a, b) for a, b in zip(stats[name]["ranks"][j], ranks)] \
                        if len(stats[name]["ranks"][j]) == len(ranks) else list(ranks)
            output.register_hook(on_grad)
        return hook

    handles += [modules[n].register_forward_hook(forward_hook(n)) for n in names]
    count = 0
    try:
        with torch.enable_grad():
            for inputs_, targets in batches:
                loss = loss_fn(model, inputs_, targets)
                loss.backward()
                count += 1
                if progress is not None:
                    progress(count)
    finally:
        for h in handles:
            h.remove()
        for p, flag in requires.items():
            p.grad = None
            p.requires_grad_(flag)
    if count == 0:
        raise ValueError("no batches to measure perplexity on")
    table = {}
    for n in names:
        s = stats[n]
        if s["shape"] is None:
            raise ValueError(f"layer {n!r} was never called in the forward pass")
        table[n] = {
            "input_shape": s["shape"],
            "ranks": s["ranks"],
            "memory_mib": [tucker_elements(s["shape"], r, count_whole_modes=full_rank_factors) * s["dtype_bytes"] / MIB
                           for r in s["ranks"]],
            "perplexity": [p / count for p in s["perplexity"]],
        }
    return table


def default_loss(model: nn.Module, batch) -> torch.Tensor:
    """The loss of one batch when the caller gives none: a mapping (a Hugging Face batch with ``labels``) ->
    ``model(**batch).loss``; an ``(inputs, targets)`` pair -> cross-entropy of ``model(inputs)``."""
    if isinstance(batch, Mapping):
        out = model(**batch)
        loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
        if loss is None:
            raise ValueError("the model returned no loss for a batch: give batches with 'labels' or a loss_fn")
        return loss
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
        return nn.functional.cross_entropy(model(inputs), targets)
    raise ValueError(f"cannot compute a loss for a batch of type {type(batch).__name__}: give batches as mappings "
                     f"with 'labels' (Hugging Face) or (inputs, targets) pairs, or pass loss_fn(model, batch)")


def choose_ranks(model: nn.Module, batches: Iterable, budget_mib: Union[float, str],
                 loss_fn: Optional[Callable] = None, num_finetune=None, layers: Optional[Sequence[str]] = None,
                 layer_type: str = "conv", include=None, epsilons: Sequence[float] = PAPER_EPSILONS,
                 measure_on: Optional[Mapping[str, str]] = None) -> dict:
    """ASI's ranks for the chosen layers under an activation-memory budget, from a few of the caller's own batches:
    the perplexity table (eq. 7) measured on ``batches``, then the exact budget-constrained selection (eq. 9,
    :func:`asi_core.ranks.select`). No weight changes.

    ``batches``: an iterable of batches, each handed to ``loss_fn(model, batch) -> scalar loss`` (default
    :func:`default_loss`: Hugging Face mappings with labels, or ``(inputs, targets)`` pairs). Layers as in
    :func:`asi_core.patch` (``layers``, or the last ``num_finetune`` of ``layer_type`` matching ``include``).
    ``budget_mib``: MiB, "min" or "hosvd@<eps>". ``measure_on`` maps a layer to the one measured in its place
    (same input; :func:`asi_core.patch_lora` measures LoRA's base linears).

    Returns ``{"layers": [names], "ranks": [tuple per layer], "eps": [...], "memory_mib": total (eq. 5, MiB),
    "budget_mib": the budget in MiB, "table": the perplexity table (perplexity.json's schema)}``; pass
    ``layers=out["layers"], ranks=out["ranks"]`` to :func:`asi_core.patch`.
    """
    from . import ranks as rank_selection
    from .patch import choose_layers

    names = choose_layers(model, "all" if num_finetune is None and layers is None else num_finetune, layers,
                          layer_type, include)
    proxy = {n: (measure_on or {}).get(n, n) for n in names}
    loss_fn = loss_fn or default_loss
    count = [0]

    def pairs():
        for batch in batches:
            count[0] += 1
            yield batch, None

    measured = measure_perplexity(model, pairs(), lambda m, batch, _: loss_fn(m, batch), sorted(set(epsilons)),
                                  layers=list(dict.fromkeys(proxy.values())), layer_type=layer_type)
    modules = dict(model.named_modules())
    for n in names:  # a layer measured through another: its memory in its own dtype (peft casts lora_A's input to
        if proxy[n] != n:  # lora_A's dtype, float32 under a bfloat16 base model)
            entry = dict(measured[proxy[n]])
            size = modules[n].weight.element_size()
            entry["memory_mib"] = [tucker_elements(entry["input_shape"], r) * size / MIB for r in entry["ranks"]]
            measured[n] = entry
    first = measured[names[0]]
    table = {"schema_version": SCHEMA_VERSION, "model": type(model).__name__, "dataset": "",
             "input_shape": first["input_shape"], "batch_size": first["input_shape"][0],
             "epsilons": sorted(set(epsilons)), "num_batches": count[0],
             "layers": {n: measured[n] for n in names}}
    choice = rank_selection.select(table, budget_mib)
    return {"layers": [c["name"] for c in choice["layers"]],
            "ranks": [tuple(c["ranks"]) for c in choice["layers"]],
            "eps": [c["eps"] for c in choice["layers"]],
            "memory_mib": choice["total_memory_mib"], "budget_mib": choice["budget_mib"], "table": table}
