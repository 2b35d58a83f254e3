"""Model-level API: choose layers, wrap them with a method, freeze what comes before, undo it."""
from __future__ import annotations

import fnmatch
import re
from typing import Iterable, Optional, Sequence, Union

from torch import nn

from .layers import CompressedConv2d, CompressedLayer, CompressedLinear
from .methods import METHODS

__all__ = ["patch", "unpatch", "patched_layers", "candidate_layers", "choose_layers"]

_LAYER_TYPES = {"conv": (nn.Conv2d, CompressedConv2d), "linear": (nn.Linear, CompressedLinear)}


Include = Union[str, Sequence[str], None]


def _name_matcher(include: Include):
    r"""A predicate on qualified layer names. Each pattern is a glob when it holds ``*``, ``?`` or ``[``
    (matched against the whole name: ``"*.mlp.*"``, ``"layers.2?.mlp.down_proj"``), else a regular expression
    searched anywhere in the name (``"mlp"`` = names containing mlp, as the authors select transformer layers;
    ``r"mlp\.(0|3)$"``). A list matches a name when any of its patterns does."""
    patterns = [include] if isinstance(include, str) else list(include)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"include must be a non-empty pattern or list of patterns (glob or regex), got {include!r}")
    tests = []
    for p in patterns:
        if any(c in p for c in "*?["):
            tests.append(lambda name, p=p: fnmatch.fnmatchcase(name, p))
        else:
            try:
                rx = re.compile(p)
            except re.error as err:
                raise ValueError(f"include pattern {p!r} is not a valid regular expression ({err})") from None
            tests.append(lambda name, rx=rx: rx.search(name) is not None)
    return lambda name: any(t(name) for t in tests)


def candidate_layers(model: nn.Module, layer_type: str = "conv", include: Include = None) -> list[str]:
    """Qualified names of the layers ``patch`` can choose from, in registration order: every nn.Conv2d
    (``layer_type="conv"``) or nn.Linear (``"linear"``), restricted to the names ``include`` matches (a glob
    or a regex, or a list of them; see :func:`_name_matcher`) when given. Wrappers already patched count as
    their layer type."""
    if layer_type not in _LAYER_TYPES:
        raise ValueError(f"unknown layer_type {layer_type!r}; valid layer types: {sorted(_LAYER_TYPES)}")
    base = _LAYER_TYPES[layer_type][0]
    names = [n for n, m in model.named_modules() if isinstance(m, base)]
    if include is not None:
        keep = _name_matcher(include)
        names = [n for n in names if keep(n)]
    return names


def patched_layers(model: nn.Module) -> list[tuple[str, CompressedLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CompressedLayer)]


def patch(model: nn.Module, method: str, num_finetune: Union[int, str, None] = None,
          layers: Optional[Iterable[str]] = None, layer_type: str = "conv", lean: Optional[bool] = None,
          include: Include = None, **options) -> list[str]:
    """Replace the last ``num_finetune`` Conv2d (or Linear, ``layer_type="linear"``) modules of
    ``model`` in registration order, or the explicitly named ``layers``, by wrappers training with
    ``method``; freeze every parameter registered before the first patched layer.

    ``include`` (a glob or regex, or a list of them) restricts the candidates to matching names before the
    last ``num_finetune`` are taken: ``patch(vit, "asi", 4, layer_type="linear", include="mlp")`` trains the
    last 4 linear layers of the MLP blocks (the paper's "#Layers" for transformers).

    Options: asi -> ``ranks`` (int, one tuple, or one tuple per layer), ``warm_start``, ``seed``;
    hosvd -> ``eps``; gradfilter -> ``radius``. ``lean`` (default: on for every compressing method,
    off for vanilla) also makes frozen eval-mode BatchNorm, ReLU/ReLU6 and Dropout keep no float
    activation (lean.py; the whole model is converted, which changes nothing where no gradient flows).
    Returns the patched layers' qualified names.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {list(METHODS)}")
    if patched_layers(model):
        raise ValueError("model is already patched; call asi_core.unpatch(model) first")
    names = choose_layers(model, num_finetune, layers, layer_type, include)
    method_cls = METHODS[method]
    if layer_type not in method_cls.layer_types:
        raise ValueError(f"method {method!r} is not defined for {layer_type} layers (it supports "
                         f"{', '.join(method_cls.layer_types)}); cannot patch {names[:3]}{' ...' if len(names) > 3 else ''}")
    per_layer = method_cls.per_layer_options(names, options)
    wrapper_cls = _LAYER_TYPES[layer_type][1]
    modules = dict(model.named_modules())
    for name, opts in zip(names, per_layer):
        base = modules[name]
        ranks = opts.get("ranks")
        if isinstance(ranks, (tuple, list)) and isinstance(base, nn.Conv2d) and len(ranks) != 4:
            raise ValueError(f"layer {name!r}: asi ranks {tuple(ranks)} have {len(ranks)} entries, but a Conv2d input "
                             f"has 4 modes (B, C, H, W): give 4 ranks per conv layer, or one int for every mode")
        wrapper = wrapper_cls(base, method_cls(name, **opts), name)
        wrapper.train(base.training)
        model.set_submodule(name, wrapper)
        for p in (wrapper.weight, wrapper.bias):
            if p is not None:
                p.requires_grad_(True)
    _freeze_before(model, names[0])
    if lean is None:
        lean = method_cls.lean_default
    if lean:
        # The whole model, not "from names[0] on in registration order": a module registered before the first
        # patched layer can still be *called* inside the fine-tuned region (torchvision's BasicBlock calls its one
        # `self.relu` before and after the residual add, so with layer4.0.conv2 as first patched layer the second
        # call of layer4.0.relu would save a float tensor). Converting everything is the simplest exact rule: a
        # lean module records its light graph only when its input needs a gradient and is the plain module
        # otherwise (same kernels, bit-identical output, ~0.5 us of Python per call), so the frozen part, whose
        # inputs need no gradient, runs exactly as before. A call-order trace would need a forward pass to decide
        # what this rule gets for free.
        from .lean import make_lean
        make_lean(model)
    return names


def unpatch(model: nn.Module) -> list[str]:
    """Put the plain modules back, carrying the (trained) Parameters; undo lean replacements, recompute.enable,
    microbatch.enable and asi_core.approx's options."""
    names = []
    for name, wrapper in patched_layers(model):
        model.set_submodule(name, wrapper.to_plain())
        names.append(name)
    from . import approx, microbatch, recompute
    from .lean import unmake_lean
    unmake_lean(model)
    approx.restore_activations(model)  # approx.approximate_activations / compress_saved, if any
    approx.uncompress_saved(model)
    recompute.disable(model)  # recompute.enable's segments, if any
    microbatch.disable(model)  # microbatch.enable's converted modules, if any
    return names


def plain_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` without what the patched layers' methods keep for training (ASI's warm-start factors
    and step count): the keys and tensors of the plain model, so that it loads strictly into the unpatched
    architecture (``plain.load_state_dict(asi_core.plain_state_dict(model))``) while ``model`` stays patched."""
    state = model.state_dict()
    prefixes = tuple(f"{name}.method." if name else "method." for name, _ in patched_layers(model))
    return type(state)((k, v) for k, v in state.items() if not k.startswith(prefixes))


def choose_layers(model: nn.Module, num_finetune: Union[int, str, None] = None, layers: Optional[Iterable[str]] = None,
                  layer_type: str = "conv", include: Include = None) -> list[str]:
    """The layers ``patch`` with the same arguments wraps, in registration order: the named ``layers`` (checked),
    or the last ``num_finetune`` (an int or "all") of ``candidate_layers(model, layer_type, include)``.
    ValueError saying what does not fit."""
    candidates = candidate_layers(model, layer_type, include)
    if include is not None and layers is None:
        _check_include(model, candidates, num_finetune, layer_type, include)
    return _choose(candidates, num_finetune, layers, layer_type)


def _check_include(model, candidates, num_finetune, layer_type, include):
    wanted = None if num_finetune in (None, "all") or isinstance(num_finetune, bool) else num_finetune
    if candidates and (not isinstance(wanted, int) or wanted <= len(candidates)):
        return
    every = candidate_layers(model, layer_type)
    raise ValueError(f"include={include!r} matches {len(candidates)} of the model's {len(every)} {layer_type} layers"
                     + (f", fewer than num_finetune={wanted}" if candidates else "")
                     + f"; matched: {candidates[-5:]}; some {layer_type} layer names: {every[:3]} ... {every[-3:]}")


def _choose(candidates, num_finetune, layers, layer_type):
    if layers is not None:
        layers = list(layers)
        missing = [n for n in layers if n not in candidates]
        if missing:
            raise ValueError(f"layer(s) {missing} not found among the model's {len(candidates)} {layer_type} layers "
                             f"(first/last: {candidates[:3]} ... {candidates[-3:]})")
        if not layers:
            raise ValueError("layers is empty: name at least one layer")
        order = {n: i for i, n in enumerate(candidates)}
        return sorted(set(layers), key=order.__getitem__)
    if num_finetune is None:
        raise ValueError("give num_finetune (an int or 'all') or layers (a list of names)")
    if not candidates:
        raise ValueError(f"the model has no {layer_type} layers to patch")
    if num_finetune == "all":
        return list(candidates)
    if isinstance(num_finetune, bool) or not isinstance(num_finetune, int) or num_finetune < 1:
        raise ValueError(f"num_finetune must be an integer >= 1 or 'all', got {num_finetune!r}")
    if num_finetune > len(candidates):
        raise ValueError(f"num_finetune={num_finetune} is larger than the number of {layer_type} layers "
                         f"in the model ({len(candidates)})")
    return candidates[-num_finetune:]


def _freeze_before(model: nn.Module, first: str):
    prefix = first + "."
    for name, p in model.named_parameters():
        if name.startswith(prefix):
            break
        p.requires_grad_(False)
