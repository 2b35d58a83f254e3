"""Keep less for backward by recomputing: activation checkpointing, and recomputation around the patched layers.

Both options run chosen submodules ("segments") of the fine-tuned region through :class:`_Recompute`, an
autograd Function that keeps only the segment's *inputs* (``ctx.save_for_backward``, so
``lean.SavedTensorMeter`` counts them) and runs the segment's forward without recording a graph; in backward
it restores the random-number state of the forward (dropout, stochastic depth draw the same masks), runs the
segment again with a graph, backpropagates through it and frees that graph. Gradients are those of plain
autograd (the same kernels on the same values; the tests compare them in float64).

* ``mode="checkpointing"`` (``--model.checkpointing true``): the baseline users pick today
  (``torch.utils.checkpoint``): every *block* of the fine-tuned region is a segment, the patched layers inside it
  included. During the forward the patched layers see no graph and run as the plain layer (no compression: the
  output is exact anyway); in backward the recomputation runs them in training mode, so a compressing method
  compresses exactly once per step (asi's warm start advances once). What is kept across the step is one input per
  block; while a block's backward runs, its full (method-compressed) activations exist transiently
  (:class:`RecomputeMeter` measures the largest). Restores the CPU and CUDA random states (CUDA untested here: no
  GPU); works under DDP (checked with 2 CPU processes).
* ``mode="recompute"`` (``--model.recompute true``): only the parts *without* a patched layer are segments (the
  attention of a transformer block, ...), so the patched layers keep their compressed activations from the forward
  and are never recomputed (no second matmul, no second compression). What sits between patched layers inside a
  module that holds them (an MLP's GELU, whose backward needs its input, the output of the compressed layer before
  it) keeps what it keeps: rebuilding it would need that layer's exact input, i.e. checkpointing
  (docs/transformers.md itemises a Swin-T).

How segments are chosen (:func:`segments`), for any model, from the module tree and the first patched layer: a
module registered entirely before the first patched layer is frozen and skipped; a module that *straddles* it (has
submodules registered before it: a Swin block whose attention is frozen and whose MLP is fine-tuned), a container
(``nn.ModuleList``/``ModuleDict``, an ``nn.Sequential`` of composite modules) or, for ``recompute``, a module
holding a patched layer is descended into; any other composite module of the region is a segment. Leaves (a lone
``Linear``, ``LayerNorm``) are never segments on their own: recomputing one would keep its input, which is what it
keeps anyway. Modules are converted in place (an instance ``forward``; :func:`disable` removes it).

Limits: a segment must be a function of its inputs and parameters (no in-place change of an input, no state read
in forward and changed in between); BatchNorm in training mode inside a segment updates its running statistics
twice (as with ``torch.utils.checkpoint``; the framework keeps BatchNorm in eval mode).
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

__all__ = ["MODES", "enable", "disable", "segments", "recomputed_segments", "recompute", "RecomputeMeter"]

MODES = ("checkpointing", "recompute")
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


class RecomputeMeter:
    """Largest bytes one segment's recomputation saves for backward (the transient cost of recomputing), measured
    with ``lean.SavedTensorMeter`` while active::

        with RecomputeMeter(exclude=[model]) as rm:
            loss.backward()
        rm.peak_bytes
    """

    _active: list["RecomputeMeter"] = []

    def __init__(self, exclude=()):
        self.exclude = list(exclude)
        self.peak_bytes = 0
        self.segments = 0

    def __enter__(self):
        RecomputeMeter._active.append(self)
        return self

    def __exit__(self, *exc):
        RecomputeMeter._active.remove(self)


def _rng_state(tensors) -> tuple:
    devices = sorted({t.device for t in tensors if isinstance(t, torch.Tensor) and t.device.type == "cuda"},
                     key=str)
    return torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in devices]


class _Recompute(torch.autograd.Function):
    """``run(*inputs)`` computed without a graph; backward recomputes it with one (see the module docstring).
    Extra arguments after the inputs (an empty "anchor" leaf) only make the output require grad; the segment's
    parameter gradients are accumulated by the inner backward, as ``torch.utils.checkpoint``'s reentrant variant
    does."""

    @staticmethod
    def forward(ctx, run: Callable, n_inputs: int, *args):
        inputs = args[:n_inputs]
        ctx.run = run
        ctx.rng = _rng_state(inputs)
        ctx.is_tensor = [isinstance(a, torch.Tensor) for a in inputs]
        ctx.needs = [isinstance(a, torch.Tensor) and a.requires_grad for a in inputs]
        ctx.others = [None if t else a for a, t in zip(inputs, ctx.is_tensor)]
        ctx.n_extra = len(args) - n_inputs
        ctx.save_for_backward(*[a for a, t in zip(inputs, ctx.is_tensor) if t])
        return run(*inputs)

    @staticmethod
    def backward(ctx, *grads):
        saved = iter(ctx.saved_tensors)
        inputs = [next(saved).detach().requires_grad_(n) if t else o
                  for t, n, o in zip(ctx.is_tensor, ctx.needs, ctx.others)]
        cpu_state, cuda_states = ctx.rng
        meters = RecomputeMeter._active
        with torch.random.fork_rng(devices=[d for d, _ in cuda_states]), torch.enable_grad():
            torch.set_rng_state(cpu_state)
            for d, state in cuda_states:
                torch.cuda.set_rng_state(state, d)
            if meters:
                from .lean import SavedTensorMeter
                with SavedTensorMeter(exclude=[m for rm in meters for m in rm.exclude]) as sm:
                    out = ctx.run(*inputs)
                for rm in meters:
                    rm.peak_bytes, rm.segments = max(rm.peak_bytes, sm.bytes), rm.segments + 1
            else:
                out = ctx.run(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        input_grads = [a.grad if n else None for a, n in zip(inputs, ctx.needs)]
        return (None, None, *input_grads, *([None] * ctx.n_extra))


def recompute(fn: Callable, *inputs):
    """``fn(*inputs)``, keeping only ``inputs`` for backward and running ``fn`` again there (same kernels, same
    values, the forward's random state): what a cheap but memory-hungry tail of a network (an upsampled loss)
    is worth recomputing. Without grad, or when no input needs a gradient, it is ``fn(*inputs)`` itself."""
    if not torch.is_grad_enabled() or not any(isinstance(a, torch.Tensor) and a.requires_grad for a in inputs):
        return fn(*inputs)
    return _Recompute.apply(fn, len(inputs), *inputs)


def _recomputed_forward(module: nn.Module, *args, **kwargs):
    forward = type(module).forward.__get__(module)
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    # Tensor keyword arguments (Hugging Face blocks take ``hidden_states=...``) are inputs of the Function like the
    # positional ones: saved once, and their gradient flows back; the other keywords are passed as they are.
    keys = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    static = {k: v for k, v in kwargs.items() if k not in keys}
    inputs = (*args, *(kwargs[k] for k in keys))
    trainable = any(p.requires_grad for p in module.parameters())
    if not trainable and not any(isinstance(a, torch.Tensor) and a.requires_grad for a in inputs):
        return forward(*args, **kwargs)  # nothing to differentiate: no graph either way
    n_args = len(args)

    def run(*values):
        return forward(*values[:n_args], **static, **dict(zip(keys, values[n_args:])))

    # A fresh leaf that requires grad makes the output require grad when no input does (the first segment: its
    # input comes from the frozen part). The parameters are not inputs of the Function: the inner backward
    # accumulates their gradients once, so DDP's hooks fire once per parameter.
    anchor = torch.empty(0, requires_grad=True) if trainable else None
    return _Recompute.apply(run, len(inputs), *inputs, *([anchor] if anchor is not None else []))


def _contains(module: nn.Module, targets: set) -> bool:
    return any(m in targets for m in module.modules())


def segments(model: nn.Module, patched: list[str], mode: str) -> list[str]:
    """Names of the modules :func:`enable` recomputes (see the module docstring), in registration order."""
    if mode not in MODES:
        raise ValueError(f"unknown recompute mode {mode!r}; valid: {list(MODES)}")
    if not patched:
        raise ValueError("recompute/checkpointing needs patched layers (asi_core.patch first): the fine-tuned region "
                         "starts at the first of them")
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    first = order[patched[0]]
    modules = dict(model.named_modules())
    targets = {modules[n] for n in patched}
    out: list = []

    def subtree(name):
        prefix = name + "." if name else ""
        return [order[n] for n in modules if n == name or n.startswith(prefix)]

    def composite(m):  # a patched layer (which holds its method module) counts as a leaf
        return m not in targets and next(m.children(), None) is not None

    def walk(name: str, m: nn.Module):
        idx = subtree(name)
        if max(idx) < first:
            return  # frozen part
        below = [i for i in idx if i != order[name]]
        straddles = bool(below) and min(below) < first  # some of it is frozen, some fine-tuned
        holds_patched = mode == "recompute" and _contains(m, targets)
        is_container = isinstance(m, _CONTAINERS) or (
            isinstance(m, nn.Sequential) and any(composite(c) for c in m.children())) or name == ""
        if m in targets:
            return
        if straddles or is_container or holds_patched:
            for cname, child in m.named_children():
                walk(f"{name}.{cname}" if name else cname, child)
            return
        kids = list(m.children())
        wrapper = len(kids) == 1 and not composite(kids[0]) and next(m.parameters(recurse=False), None) is None
        if composite(m) and not wrapper:  # (a module that only wraps one leaf keeps what the leaf keeps)
            out.append(name)

    walk("", model)
    return out


def enable(model: nn.Module, patched: list[str], mode: str) -> list[str]:
    """Make the fine-tuned region of ``model`` (from ``patched[0]`` on) recompute instead of storing, per ``mode``
    ("checkpointing" or "recompute", see the module docstring). Returns the names of the segments."""
    disable(model)
    names = segments(model, patched, mode)
    for name in names:
        module = model.get_submodule(name)
        module.forward = partial(_recomputed_forward, module)
    return names


def recomputed_segments(model: nn.Module) -> list[str]:
    """Names of the modules :func:`enable` converted."""
    return [n for n, m in model.named_modules()
            if isinstance(m.__dict__.get("forward"), partial) and m.forward.func is _recomputed_forward]


def disable(model: nn.Module) -> list[str]:
    """Undo :func:`enable` (plain forwards again). Returns the names of the modules restored."""
    names = recomputed_segments(model)
    for n in names:
        del model.get_submodule(n).forward
    return names
