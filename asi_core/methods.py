"""The training methods, as a registry (PEFT-style): each method is a small nn.Module attached to a
wrapper layer (layers.py) that decides what the layer keeps for backward and how the weight
gradient is formed. Two autograd Functions serve all methods and both layer types:

- ``LowRankFn`` (hosvd, asi): keeps a Tucker form (core + factors) of the input; weight gradient
  from it (eq. 15, lowrank.py); input gradient exact from the weight; bias gradient exact.
- ``GradFilterFn`` (gradfilter): keeps the patch-summed input; patch-averaged output gradient.

``vanilla`` is plain autograd: it is the honest baseline.
"""
from __future__ import annotations

import abc
import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

import torch
from torch import nn

from .approx import keep_exact
from .decompose import clip_ranks, hosvd, subspace_iteration

__all__ = ["METHODS", "Method", "Option", "register_method", "get_method", "LowRankFn", "GradFilterFn",
           "PaperGradFilterFn"]

METHODS: dict[str, type["Method"]] = {}


def register_method(cls):
    """Class decorator: add a ``Method`` subclass to the registry under ``cls.name``. Everything that runs methods
    (``patch``, the accounting, the framework's command line, profile, benchmark, report and run names) asks the
    registry, so a registered method is usable everywhere at once. A name already taken is refused."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register_method decorates a subclass of asi_core.methods.Method, got {cls!r}")
    if not cls.name or not isinstance(cls.name, str):
        raise ValueError(f"{cls.__name__}: set the class attribute name (the method's registry key) before registering")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is already registered (by {METHODS[cls.name].__qualname__}); "
                         f"choose another name for {cls.__qualname__}")
    for option in cls.user_options:
        if option not in cls.option_names:
            raise ValueError(f"{cls.__qualname__}.user_options names {option!r}, which is not in its option_names "
                             f"{cls.option_names}")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type["Method"]:
    """The registered class of method ``name``; ValueError listing the valid names otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {list(METHODS)}")
    return METHODS[name]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class NamesView(Sequence):
    """A read-only, tuple-like view of names that a function gives anew on every use (a registry's keys): names
    registered later appear at once, nothing is frozen at import."""

    def __init__(self, names: Callable[[], tuple]):
        self._names = names

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __eq__(self, other) -> bool:
        return self._names() == (tuple(other) if isinstance(other, Sequence) else other)

    def __hash__(self):
        return hash(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


@dataclass(frozen=True)
class Option:
    """One option a user sets for a method (a keyword of ``patch``; ``--model.<name>`` on the framework's command
    line): its default, a check of a value and what a valid value is (said in the error when the check fails)."""
    default: Any
    check: Callable[[Any], bool]
    valid: str
    reported: bool = True  # recorded beside the method's memory and FLOPs (profile), not only in the run's settings


def _autocast_inputs(ctx, x, weight, bias):
    """Mixed precision (torch.autocast, Lightning's "16-mixed"/"bf16-mixed"): a custom Function is not
    cast by autocast, so do what autocast does to the plain conv/linear: compute in the autocast dtype.
    The original dtypes are kept so that backward hands each gradient back in its input's dtype."""
    ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return x, weight, bias


def _grads_in_input_dtypes(ctx, gx, gw, gb):
    x_dtype, w_dtype, b_dtype = ctx.dtypes
    return (None if gx is None else gx.to(x_dtype), None if gw is None else gw.to(w_dtype),
            None if gb is None else gb.to(b_dtype))


class LowRankFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, ops, compress):
        x, weight, bias = _autocast_inputs(ctx, x, weight, bias)
        y = ops.forward(x, weight, bias)
        core, factors = compress(x)
        ctx.ops, ctx.x_shape, ctx.n_factors = ops, x.shape, len(factors)
        keep_exact(core, *factors)  # the Tucker form is the method's compression already (asi_core.approx)
        ctx.save_for_backward(weight, core, *factors)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        weight, core, *factors = ctx.saved_tensors
        ops = ctx.ops
        grad_out = grad_out.to(weight.dtype).contiguous()
        gx = ops.input_grad(grad_out, weight, ctx.x_shape) if ctx.needs_input_grad[0] else None
        gw = ops.weight_grad(core, factors, grad_out, weight.shape) if ctx.needs_input_grad[1] else None
        gb = ops.bias_grad(grad_out) if ctx.needs_input_grad[2] else None
        return (*_grads_in_input_dtypes(ctx, gx, gw, gb), None, None)


class GradFilterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, ops, radius):
        x, weight, bias = _autocast_inputs(ctx, x, weight, bias)
        y = ops.forward(x, weight, bias)
        x_bar = ops.filter_input(x, radius)
        ctx.ops, ctx.radius, ctx.x_shape = ops, radius, x.shape
        keep_exact(x_bar)
        ctx.save_for_backward(weight, x_bar)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        weight, x_bar = ctx.saved_tensors
        ops = ctx.ops
        g_bar, g_tilde = ops.filter_grad(grad_out.to(weight.dtype).contiguous(), ctx.radius)
        gx = ops.input_grad(g_tilde.contiguous(), weight, ctx.x_shape) if ctx.needs_input_grad[0] else None
        gw = ops.filter_weight_grad(x_bar, g_bar, weight.shape) if ctx.needs_input_grad[1] else None
        gb = ops.bias_grad(grad_out) if ctx.needs_input_grad[2] else None
        return (*_grads_in_input_dtypes(ctx, gx, gw, gb), None, None)


class Method(nn.Module, metaclass=abc.ABCMeta):
    """Base class. Subclasses set ``name``, ``option_names`` and (when not every layer type)
    ``layer_types``, and implement ``train_forward``.

    What the rest of the code needs to know about a method lives here too, so that a method registered with
    ``@register_method`` runs everywhere without code naming it:

    - ``user_options``: the options a user sets (name -> ``Option``: default, check, what is valid), checked once
      before any network exists (``check_user_options``);
    - ``label``: its name in reports, and ``report_label(options)`` for a configuration of it;
    - ``run_name(options)``: the token a run directory name carries after ``l<num_finetune>``;
    - ``accounting``: which memory/FLOPs formulas of ``asi_core.accounting`` count it: "input" (keeps its whole
      input, plain autograd's count), "gradfilter", "gradfilter_paper", "hosvd" (eq. 5, 11) or "asi" (eq. 5, 14);
    - ``data_dependent``: its choices depend on the data (HOSVD_eps's ranks): no shape-only execution, and the
      report shows its peak over training (Sec. 4.1);
    - ``rank_selection``: its ranks can be chosen from a perplexity table under a memory budget (ASI, eq. 9);
    - ``weight_grad_closure``: its weight-gradient computation alone, on what it keeps (the per-layer benchmark).
    """

    name = ""
    option_names: tuple[str, ...] = ()
    layer_types: tuple[str, ...] = ("conv", "linear")  # the wrappers' ``layer_type`` this method is defined for
    user_options: dict[str, Option] = {}
    label = ""
    report_order = 50  # where its rows sort in a report (vanilla first)
    accounting = "input"
    data_dependent = False
    rank_selection = False
    lean_default = True  # patch's ``lean`` default: lean frozen BN/activations wherever the method compresses
    plot_style: tuple[Optional[str], str] = (None, "x")  # (colour, marker) of its points in the report's plots

    @classmethod
    def check_user_options(cls, values: dict[str, Any]) -> list[tuple[str, Any, str]]:
        """The (option, value, what is valid) of every option in ``values`` that this method takes and that is
        invalid; options it does not take are not looked at."""
        return [(k, values[k], opt.valid) for k, opt in cls.user_options.items()
                if k in values and not opt.check(values[k])]

    @classmethod
    def report_label(cls, options: dict[str, Any]) -> tuple[str, tuple]:
        """Its name in a report for a configuration (``options``: the run's settings), and a sort key among its
        configurations."""
        return cls.label or cls.name, ()

    @classmethod
    def run_name(cls, options: dict[str, Any]) -> str:
        """What a run directory name says of this method's settings, after ``l<num_finetune>`` ("" for none)."""
        return ""

    def weight_grad_closure(self, ops, x: torch.Tensor, g: torch.Tensor, shape) -> Callable[[], torch.Tensor]:
        """A function computing this method's weight gradient from the layer input ``x`` and output gradient ``g``
        the way its backward does, from what it keeps (prepared outside the function, so only the gradient is
        timed). Default: the exact gradient from the whole input."""
        return lambda: ops.weight_grad_exact(x, g, shape)

    def __init__(self, layer_name: str):
        super().__init__()
        self.layer_name = layer_name

    @classmethod
    def per_layer_options(cls, names: list[str], options: dict[str, Any]) -> list[dict[str, Any]]:
        """Validate the user's options and split them into one dict per patched layer."""
        unknown = sorted(k for k, v in options.items() if v is not None and k not in cls.option_names)
        if unknown:
            raise ValueError(f"method {cls.name!r} does not take option(s) {unknown}; "
                             f"its options are {list(cls.option_names) or 'none'}")
        return [{k: v for k, v in options.items() if k in cls.option_names and v is not None} for _ in names]

    def options(self) -> dict[str, Any]:
        return {}

    @abc.abstractmethod
    def train_forward(self, layer, x):
        """The layer's training forward, ``layer`` being the wrapper (its weight, bias and ``ops``)."""

    def _record(self, layer, x, y, ranks, stored):
        layer.last_stats = {"method": self.name, "input_shape": tuple(x.shape), "output_shape": tuple(y.shape),
                            "ranks": None if ranks is None else tuple(int(r) for r in ranks),
                            "stored_elements": int(stored)}

    def extra_repr(self):
        return ", ".join(f"{k}={v}" for k, v in self.options().items())


@register_method
class Vanilla(Method):
    """Exact backward through plain autograd: the patched layer keeps its whole input."""

    name = "vanilla"
    plot_style = ("#444444", "s")
    label = "Vanilla training"
    report_order = 0
    lean_default = False  # the honest baseline: plain autograd everywhere

    def train_forward(self, layer, x):
        y = layer.plain_forward(x)
        self._record(layer, x, y, None, x.numel())
        return y


@register_method
class GradFilter(Method):
    """Gradient filtering (Yang et al. 2023) with patch radius R (conv.py/linear.py give the formula)."""

    name = "gradfilter"
    plot_style = ("#2ca02c", "^")
    option_names = ("radius",)
    user_options = {"radius": Option(2, lambda r: _is_int(r) and r >= 1,
                                     "gradfilter's patch radius must be an integer >= 1")}
    label = "Gradient filtering"
    report_order = 10
    accounting = "gradfilter"

    @classmethod
    def report_label(cls, options):
        r = options.get("radius")
        if r == "authors":  # per-layer radii of an explicit layer set (Table 3's segmentation rows)
            return "Gradient filter (authors' radii)", (0.0,)
        return (f"Gradient filtering R{r}" if r is not None else "Gradient filtering"), (_number(r),)

    @classmethod
    def run_name(cls, options):
        return f"_R{options.get('radius')}"

    def weight_grad_closure(self, ops, x, g, shape):
        x_bar = ops.filter_input(x, self.radius)
        return lambda: ops.filter_weight_grad(x_bar, ops.filter_grad(g, self.radius)[0], shape)

    def __init__(self, layer_name: str, radius: int = 2):
        super().__init__(layer_name)
        if not self.user_options["radius"].check(radius):
            raise ValueError(f"layer {layer_name!r}: gradfilter radius must be an integer >= 1, got {radius!r}")
        self.radius = radius

    @classmethod
    def per_layer_options(cls, names, options):
        radius = options.get("radius")
        if not isinstance(radius, (list, tuple)):
            return super().per_layer_options(names, options)
        if len(radius) != len(names):  # one radius per layer (the authors' segmentation configs)
            raise ValueError(f"gradfilter: got {len(radius)} radii for {len(names)} patched layers ({names}); "
                             f"give one int, or one radius per layer in layer order")
        per_layer = super().per_layer_options(names, {**options, "radius": None})
        for opts, r in zip(per_layer, radius):
            opts["radius"] = r
        return per_layer

    def options(self):
        return {"radius": self.radius}

    def train_forward(self, layer, x):
        x = layer.ops.prepare(x)
        y = GradFilterFn.apply(x, layer.weight, layer.bias, layer.ops, self.radius)
        self._record(layer, x, y, None, layer.ops.filtered_elements(tuple(x.shape), self.radius))
        return y


class _LowRank(Method):
    """Shared by hosvd and asi: the Function, the bookkeeping; subclasses implement ``compress``."""

    def train_forward(self, layer, x):
        x = layer.ops.prepare(x)
        self._last = None
        y = LowRankFn.apply(x, layer.weight, layer.bias, layer.ops, self.compress)
        ranks, stored = self._last
        self._record(layer, x, y, ranks, stored)
        return y

    def _finish(self, x, core, factors, ranks):
        self._last = (ranks, core.numel() + sum(u.numel() for u in factors if u is not None))
        return core, factors

    def weight_grad_closure(self, ops, x, g, shape):
        state = copy.deepcopy(self)  # do not advance the layer's own warm-start state
        core, factors = state.compress(x)
        return lambda: ops.weight_grad(core, factors, g, shape)


@register_method
class HOSVD(_LowRank):
    """HOSVD_ε (Nguyen et al. 2024): a truncated HOSVD of the input at every training step."""

    name = "hosvd"
    plot_style = ("#1f77b4", "D")
    option_names = ("eps",)
    user_options = {"eps": Option(0.8, lambda e: isinstance(e, (int, float)) and not isinstance(e, bool)
                                  and 0 < e <= 1, "hosvd's explained-variance threshold must be in (0, 1]")}
    label = "HOSVD"
    report_order = 20
    accounting = "hosvd"
    data_dependent = True

    @classmethod
    def report_label(cls, options):
        eps = options.get("eps")
        return (f"HOSVD (ε = {eps})" if eps is not None else "HOSVD"), (_number(eps),)

    @classmethod
    def run_name(cls, options):
        return f"_eps{options.get('eps')}"

    def __init__(self, layer_name: str, eps: float = 0.8):
        super().__init__(layer_name)
        if not self.user_options["eps"].check(eps):
            raise ValueError(f"layer {layer_name!r}: hosvd eps must be in (0, 1], got {eps!r}")
        self.eps = float(eps)

    def options(self):
        return {"eps": self.eps}

    def compress(self, x):
        try:
            core, factors, ranks = hosvd(x, self.eps)
        except torch.linalg.LinAlgError as err:
            finite = "" if torch.isfinite(x).all() else " (its input holds NaN/inf values: look upstream of it)"
            raise torch.linalg.LinAlgError(f"layer {self.layer_name!r}: hosvd's SVD of the input of shape "
                                           f"{tuple(x.shape)} failed{finite}: {err}") from err
        return self._finish(x, core, factors, ranks)


MAX_MODES = 4


@register_method
class ASI(_LowRank):
    """Activation Subspace Iteration (Alg. 1): fixed ranks, one subspace iteration per mode and step,
    warm-started from the previous step's factors, which live in buffers (``factor_<m>``) so that a
    state_dict save/load resumes the same subspace. ``step`` counts training forwards."""

    name = "asi"
    plot_style = ("#d62728", "o")
    option_names = ("ranks", "warm_start", "seed")
    user_options = {"ranks": Option(None, lambda r: r is None or _valid_ranks(r),
                                    "asi ranks must be one integer >= 1, one list of per-mode ranks for every layer, "
                                    "or one such list per fine-tuned layer, of integers >= 1"),
                    "warm_start": Option(True, lambda w: isinstance(w, bool), "it must be true or false", reported=False)}
    label = "ASI"
    report_order = 30
    accounting = "asi"
    rank_selection = True

    @classmethod
    def report_label(cls, options):
        budget, ranks, warm = options.get("budget"), options.get("ranks"), options.get("warm_start")
        quals = []
        if not budget:  # with a budget the ranks are chosen per layer (the paper's ASI); say which otherwise
            if isinstance(ranks, (int, float, str)) and not isinstance(ranks, bool):
                quals.append(f"r = {ranks}")
            else:
                quals.append("per-layer ranks" if ranks else "default ranks")
        if warm is False:
            quals.append("no warm start")
        fixed = "" if budget or not isinstance(ranks, (int, float, str)) else str(ranks)
        return "ASI" + (f" ({', '.join(quals)})" if quals else ""), (bool(quals), warm is False, fixed)

    @classmethod
    def run_name(cls, options):
        """``_r4``, ``_r2x3x1x1`` (per mode), ``_r2x3x1x1-1x2x1x1`` (per layer), ``_budgethosvd@0.8`` (ranks chosen
        under a budget); ``_nowarm`` without warm start (the paper's Fig. 3 ablation)."""
        ranks, budget = options.get("ranks"), options.get("budget")
        if budget is not None:
            name = f"_budget{budget}"
        elif isinstance(ranks, int):
            name = f"_r{ranks}"
        elif all(isinstance(r, int) for r in ranks):  # one per-mode tuple for every layer
            name = "_r" + "x".join(map(str, ranks))
        else:
            name = "_r" + "-".join("x".join(map(str, r)) for r in ranks)
        return name + ("_nowarm" if options.get("warm_start") is False else "")

    def __init__(self, layer_name: str, ranks=1, warm_start: bool = True, seed: int = 0):
        super().__init__(layer_name)
        self.ranks = _check_ranks(layer_name, ranks)
        self.warm_start = bool(warm_start)
        self.seed = int(seed)
        for m in range(MAX_MODES):
            self.register_buffer(f"factor_{m}", torch.empty(0))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._warned_clip = False

    @classmethod
    def per_layer_options(cls, names, options):
        per_layer = super().per_layer_options(names, options)
        ranks = options.get("ranks")
        if isinstance(ranks, (list, tuple)) and ranks and all(isinstance(r, (list, tuple)) for r in ranks):
            if len(ranks) != len(names):
                raise ValueError(f"asi: got {len(ranks)} per-layer rank tuples for {len(names)} patched layers "
                                 f"({names}); give one tuple per layer, one tuple, or one int")
            for opts, r in zip(per_layer, ranks):
                opts["ranks"] = tuple(r)
        for i, opts in enumerate(per_layer):
            opts.setdefault("seed", 0)
            opts["seed"] = int(opts["seed"]) * 1000 + i  # distinct, reproducible stream per layer
        return per_layer

    def options(self):
        return {"ranks": self.ranks, "warm_start": self.warm_start}

    def factors(self):
        return [getattr(self, f"factor_{m}") for m in range(MAX_MODES)]

    def target_ranks(self, shape) -> tuple[int, ...]:
        if len(shape) > MAX_MODES:
            raise ValueError(f"layer {self.layer_name!r}: asi keeps warm-start factors for inputs of up to {MAX_MODES} "
                             f"modes, got shape {tuple(shape)}; reshape the leading modes together first")
        wanted = (self.ranks,) * len(shape) if isinstance(self.ranks, int) else self.ranks
        if len(wanted) != len(shape):
            raise ValueError(f"layer {self.layer_name!r}: asi ranks {self.ranks} have {len(wanted)} entries but the "
                             f"input has {len(shape)} modes (shape {tuple(shape)})")
        clipped = clip_ranks(shape, wanted)
        if clipped != tuple(wanted) and not self._warned_clip:
            self._warned_clip = True
            warnings.warn(f"layer {self.layer_name!r}: asi ranks {tuple(wanted)} clipped to {clipped} "
                          f"for input shape {tuple(shape)}", stacklevel=3)
        return clipped

    def compress(self, x):
        ranks = self.target_ranks(x.shape)
        step = int(self.step)
        previous = None
        if self.warm_start and step > 0:
            previous = [u if u.numel() else None for u in self.factors()]
        gen = torch.Generator(device=x.device)
        gen.manual_seed(self.seed * 100003 + step)
        core, factors = subspace_iteration(x, ranks, previous, gen)
        if not _keep_finite_state(self, factors):  # this step's gradient is non-finite, as vanilla's; state kept
            self.step += 1
            return self._finish(x, core, factors, ranks)
        for m, u in enumerate(factors):
            buf = getattr(self, f"factor_{m}")
            if u is None:  # a full-rank mode keeps no factor (a new empty tensor: resize_ of a real buffer is
                if buf.numel():  # refused under FakeTensorMode, the shape-only profile's)
                    buf.data = torch.empty(0, dtype=buf.dtype, device=buf.device)
            else:
                if buf.shape != u.shape or buf.dtype != u.dtype or buf.device != u.device:
                    # contiguous, whatever u's strides: a factor loaded from a checkpoint (safetensors stores every
                    # tensor contiguous) must give the next step bit for bit what the kept one gives
                    buf.data = torch.empty(u.shape, dtype=u.dtype, device=u.device)
                buf.copy_(u)
        self.step += 1
        return self._finish(x, core, factors, ranks)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Factor shapes are only known after the first forward: adopt the stored shapes.
        for m in range(MAX_MODES):
            key = f"{prefix}factor_{m}"
            if key in state_dict:
                buf = getattr(self, f"factor_{m}")
                stored = state_dict[key]
                buf.data = torch.empty(stored.shape, dtype=stored.dtype, device=buf.device)
        before = set(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # A checkpoint without warm-start state (e.g. from an unpatched model) means a cold start.
        ours = {f"{prefix}factor_{m}" for m in range(MAX_MODES)} | {f"{prefix}step"}
        missing_keys[:] = [k for k in missing_keys if k in before or k not in ours]


def _keep_finite_state(method: Method, factors) -> bool:
    """False (and one warning per layer) when the new factors hold NaN/inf, i.e. the input did (a NaN/inf entry of
    the input reaches every factor through the products A_(m) V): such factors would poison every later warm step,
    so the caller keeps its previous ones instead. Checks the small factors, not the activation (no extra pass over
    it); shape-only tensors (FakeTensorMode, meta) have no values and pass."""
    factors = [u for u in factors if u is not None]
    if not factors or any(u.device.type == "meta" or isinstance(u, torch._subclasses.FakeTensor) for u in factors):
        return True
    if all(bool(torch.isfinite(u).all()) for u in factors):
        return True
    if not getattr(method, "_warned_nonfinite", False):
        method._warned_nonfinite = True
        warnings.warn(f"layer {method.layer_name!r}: non-finite (NaN/inf) input to {method.name}; this step's gradient "
                      f"is non-finite and the warm-start factors of the previous step are kept (warned once per "
                      f"layer)", RuntimeWarning, stacklevel=4)
    return False


def _valid_ranks(ranks) -> bool:
    """One int >= 1, one list of per-mode ints >= 1, or one such non-empty list per layer."""
    if _is_int(ranks):
        flat = [ranks]
    elif isinstance(ranks, (list, tuple)) and ranks and all(_is_int(r) for r in ranks):
        flat = list(ranks)
    elif isinstance(ranks, (list, tuple)) and ranks and all(isinstance(t, (list, tuple)) and t for t in ranks):
        flat = [r for t in ranks for r in t]
    else:
        return False
    return all(_is_int(r) and r >= 1 for r in flat)


def _number(value) -> float:
    """A sort key from a numeric option (0 when missing or not a number)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _check_ranks(layer_name, ranks):
    def bad(value):
        return ValueError(f"layer {layer_name!r}: asi ranks must be integers >= 1, got {value!r}")

    if isinstance(ranks, bool):
        raise bad(ranks)
    if isinstance(ranks, int):
        if ranks < 1:
            raise bad(ranks)
        return ranks
    if isinstance(ranks, (list, tuple)) and ranks and all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
        if any(r < 1 for r in ranks):
            raise bad(tuple(ranks))
        return tuple(ranks)
    raise bad(ranks)


class PaperGradFilterFn(torch.autograd.Function):
    """Gradient filtering as the paper's code computes it (conv.py, "as the paper's code runs it"):
    keeps the (R·s)² input-patch sums; weight and input gradients from the centred patch-mean gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, ops, radius):
        x, weight, bias = _autocast_inputs(ctx, x, weight, bias)
        y = ops.forward(x, weight, bias)
        x_sum = ops.paper_filter_input(x, radius)
        ctx.ops, ctx.radius, ctx.x_shape = ops, radius, x.shape
        keep_exact(x_sum)
        ctx.save_for_backward(weight, x_sum)  # the weight is a parameter: no activation memory
        return y

    @staticmethod
    def backward(ctx, grad_out):
        weight, x_sum = ctx.saved_tensors
        ops, radius = ctx.ops, ctx.radius
        grad_out = grad_out.to(weight.dtype).contiguous()
        _, _, _, g_pad = ops.paper_patch_geometry(tuple(ctx.x_shape[-2:]), radius)
        g_bar = ops.paper_filter_grad(grad_out, radius, g_pad)
        gx = ops.paper_filter_input_grad(g_bar, weight, ctx.x_shape, radius) if ctx.needs_input_grad[0] else None
        gw = ops.filter_weight_grad(x_sum, g_bar, weight.shape) if ctx.needs_input_grad[1] else None
        gb = ops.bias_grad(grad_out) if ctx.needs_input_grad[2] else None
        return (*_grads_in_input_dtypes(ctx, gx, gw, gb), None, None)


@register_method
class GradFilterPaper(GradFilter):
    """Gradient filtering exactly as the paper's experiments ran it (the authors' ``Conv2dAvgOp``):
    centred patches, whole (R·s)² input patches summed, the patch-summed weight's input gradient.
    Conv2d only. ``gradfilter`` is our reading of Yang et al. (kernel-centre samples, exact input
    gradient of the filtered output gradient); docs/reproducing.md lists the differences."""

    name = "gradfilter_paper"
    plot_style = ("#8c564b", "v")
    layer_types = ("conv",)
    report_order = 15
    accounting = "gradfilter_paper"

    @classmethod
    def report_label(cls, options):
        label, key = super().report_label(options)
        return (label if options.get("radius") == "authors" else f"{label} (authors' op)"), key  # the paper's row

    def weight_grad_closure(self, ops, x, g, shape):
        x_sum = ops.paper_filter_input(x, self.radius)
        g_pad = ops.paper_patch_geometry(tuple(x.shape[-2:]), self.radius)[3]
        return lambda: ops.filter_weight_grad(x_sum, ops.paper_filter_grad(g, self.radius, g_pad), shape)

    def train_forward(self, layer, x):
        from .conv import ConvOps

        if not isinstance(layer.ops, ConvOps):
            raise ValueError(f"layer {self.layer_name!r}: method 'gradfilter_paper' supports Conv2d layers only "
                             f"(the authors' op is conv-only); use 'gradfilter' for Linear layers")
        x = layer.ops.prepare(x)
        layer.ops.paper_patch_geometry(tuple(x.shape[-2:]), self.radius)  # a clear error before the conv
        y = PaperGradFilterFn.apply(x, layer.weight, layer.bias, layer.ops, self.radius)
        patches, *_ = layer.ops.paper_patch_geometry(tuple(x.shape[-2:]), self.radius)
        self._record(layer, x, y, None, x.shape[0] * x.shape[1] * patches[0] * patches[1])
        return y
