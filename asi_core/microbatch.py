"""Run the frozen prefix of a network in micro-batches: the same result, a lower whole-step peak.

With few fine-tuned layers the peak of a training step is often the forward of the frozen, high-resolution early
layers (docs/peak_memory.md: MCUNet, ResNet-18 and Swin-T with 2-4 fine-tuned layers at batch 64 peak there, and
every method, ASI, recompute and checkpointing alike, has the same peak). Nothing in that prefix needs a gradient:
no parameter trains, its input needs none, so autograd records nothing and every sample is computed on its own
(BatchNorm in eval mode). Running it on ``micro_batch`` samples at a time and gathering its output gives the same
output, while its transient activations shrink with the micro-batch; the fine-tuned region still sees the whole
batch (its gradient, and ASI's subspace iteration, are those of the whole batch).

How the prefix is found, for any model: the module's ``forward`` is traced (``torch.fx``, every module it calls a
leaf; an ``nn.Sequential`` needs no trace) up to its first call of a module that trains, and the *prefix* is what
in there depends on the inputs through frozen modules alone: calls of modules with no trainable parameter whose
inputs come from the prefix, residual sums of such values and items of a module's tuple result. Any other
operation (a shape check, a reshape by the batch size, a batch mean) runs on the whole batch afterwards, as does
whatever uses its result; an in-place operation ends the search. The values the prefix hands to the rest (its
*frontier*: usually one tensor, several where later code reuses earlier features) are computed ``micro_batch``
samples at a time and written into whole-batch tensors; the rest of the forward then runs on them. The same is
then done inside the first module that does train (a stage that holds frozen blocks and fine-tuned ones, a block
whose attention is frozen and whose MLP trains), down to the first trainable layer. Modules are converted in place
(an instance ``forward``; :func:`disable` removes it; no new parameter, buffer or state_dict key).

When it runs whole instead (checked at every call, so the same model trains, validates and evaluates): the batch is
no larger than ``micro_batch``; an input is not a tensor with the batch first, or needs a gradient; a module of the
prefix has a trainable parameter by now or is a BatchNorm in training mode (batch statistics join the samples); a
frontier value is not a per-sample tensor (then the module is marked and warns once). Random modules in training
mode in the prefix (dropout, stochastic depth: Swin-T's) draw their masks per micro-batch: the same distribution,
other draws than a whole-batch forward. The modules of the prefix must treat samples on their own (convolutions,
linears, norms in eval mode, attention over a sample's tokens do), which no check can see inside a module. A traced ``forward`` keeps its Python control flow as traced for each
training mode (``module.training`` is read when the graph is made); a forward fx cannot trace is run whole.
"""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["enable", "disable", "micro_batched", "plan"]

_BN = nn.modules.batchnorm._BatchNorm
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def _trainable(m: nn.Module) -> bool:
    return any(p.requires_grad for p in m.parameters())


def _is_compressed(m: nn.Module) -> bool:
    from .layers import CompressedLayer
    return isinstance(m, CompressedLayer)


def _plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


class _CalledModulesAreLeaves(fx.Tracer):
    """Traces one module's own ``forward``: every module it calls is a leaf (a call node), however deep."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


@dataclass
class _Graph:
    """One traced ``forward`` (for one training mode): the graph, its prefix (node names in order, placeholders
    first) and the prefix values the rest uses (the frontier)."""
    graph: fx.Graph
    prefix: list[str]
    frontier: list[str]
    modules: list[str]  # the prefix's module calls (targets)
    next_module: Optional[str]  # the module called first after the prefix (where the descent goes on)


@dataclass
class _Plan:
    """What one converted module runs in micro-batches; data only (module references are looked up per call, so
    a deep copy of the model stays correct)."""
    micro_batch: int
    sequential: int = 0  # an nn.Sequential: its first ``sequential`` children are the prefix
    graphs: dict = field(default_factory=dict)  # training mode -> _Graph or None (not traceable / no prefix)
    failed: set = field(default_factory=set)  # training modes whose frontier was not per-sample


def _trace(module: nn.Module) -> Optional[_Graph]:
    """The prefix of ``module``'s own forward, or None where fx cannot trace it."""
    try:
        graph = _CalledModulesAreLeaves().trace(module)
    except Exception:  # noqa: BLE001 - data-dependent control flow, unsupported Python: run whole
        return None
    prefix: dict[str, fx.Node] = {}
    modules, next_module = [], None
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.args:  # a default value: the call may not pass every input
                return None
            prefix[node.name] = node
            continue
        if node.op == "output":
            break
        inputs: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), inputs.append)
        from_prefix = all(a.name in prefix for a in inputs)
        if node.op == "call_module":
            if _trainable(module.get_submodule(node.target)):
                next_module = node.target
                break
            if from_prefix:
                modules.append(node.target)
                prefix[node.name] = node
        elif _in_place(node):
            break  # it may change what the prefix read: nothing after it is taken out of order
        elif from_prefix and (_residual(node) or _item_of_module_output(node)):
            prefix[node.name] = node
        # any other operation stays in the whole-batch pass: it may join the samples (a batch mean, a reshape by
        # the batch size); so does whatever uses its result
    frontier = [n.name for n in prefix.values() if n.op != "placeholder"
                and any(u.name not in prefix for u in n.users)]
    return _Graph(graph, list(prefix), frontier, modules, next_module)


def _in_place(node: fx.Node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and name.endswith("_") and not name.endswith("__")


def _residual(node: fx.Node) -> bool:
    """``a + b`` of two prefix values (a residual connection): per sample, as its operands are."""
    return (node.op == "call_function" and node.target in (operator.add, torch.add) and not node.kwargs
            and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args))


def _item_of_module_output(node: fx.Node) -> bool:
    """``out[i]`` of a module's output: one of the values a module returns (attention's ``(output, weights)``);
    checked when it runs (an index into a tensor would pick samples: :class:`_NotPerSample`)."""
    return (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int)
            and isinstance(node.args[0], fx.Node) and node.args[0].op == "call_module")


class _NotPerSample(Exception):
    pass


def _per_sample(value, n: int) -> bool:
    """A tensor with ``n`` samples first, or a tuple of such tensors (and None: attention's absent weights)."""
    if isinstance(value, (tuple, list)):
        return all(v is None or _per_sample(v, n) for v in value)
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n


def _graph_for(module: nn.Module, p: _Plan) -> Optional[_Graph]:
    mode = module.training
    if mode not in p.graphs:
        p.graphs[mode] = _trace(module)
    return p.graphs[mode]


def _batched(args: tuple, micro_batch: int) -> Optional[int]:
    """The batch size when every input is a tensor with the batch first, none needs a gradient and the batch is
    larger than ``micro_batch``; else None (run whole)."""
    if not args or not all(isinstance(a, torch.Tensor) and a.dim() > 0 for a in args):
        return None
    size = args[0].shape[0]
    if size <= micro_batch or any(a.shape[0] != size or a.requires_grad for a in args):
        return None
    return size


def _frozen(modules: list[nn.Module]) -> bool:
    return not any(_trainable(m) or any(isinstance(s, _BN) and s.training for s in m.modules()) for m in modules)


def _in_micro_batches(run, args: tuple, size: int, micro_batch: int) -> Optional[list]:
    """``run`` (inputs -> list of values: tensors, or tuples/lists of them such as a backbone's multi-scale
    features) on ``micro_batch`` samples at a time, gathered into whole-batch tensors (allocated once, after the
    first micro-batch); None when a value is not per-sample."""
    out: Optional[list[torch.Tensor]] = None
    spec = None
    with torch.no_grad():
        for start in range(0, size, micro_batch):
            leaves, part_spec = tree_flatten(run(*(a[start:start + micro_batch] for a in args)))
            n = min(micro_batch, size - start)
            if not all(_per_sample(v, n) for v in leaves) or (spec is not None and part_spec != spec):
                return None
            if out is None:
                out, spec = [v.new_empty((size, *v.shape[1:])) for v in leaves], part_spec
            for whole, v in zip(out, leaves):
                whole[start:start + n].copy_(v)
            del leaves
    return tree_unflatten(out, spec)


def _warn_once(module: nn.Module, p: _Plan) -> None:
    if module.training not in p.failed:
        p.failed.add(module.training)
        warnings.warn(f"asi_core.microbatch: the frozen prefix of {type(module).__name__} hands on a value that is "
                      f"not a per-sample tensor (batch first); it runs on the whole batch", stacklevel=3)


def _sequential_forward(module: nn.Sequential, p: _Plan, x):
    kids = list(module)
    head, tail = kids[:p.sequential], kids[p.sequential:]
    size = _batched((x,), p.micro_batch)
    done = None
    if size is not None and module.training not in p.failed and _frozen(head):
        def run(t):
            n = t.shape[0]
            for m in head:
                t = m(t)
                if not _per_sample(t, n):
                    raise _NotPerSample
            return [t]
        try:
            done = _in_micro_batches(run, (x,), size, p.micro_batch)
        except _NotPerSample:
            done = None
        if done is None:
            _warn_once(module, p)
    if done is not None:
        x = done[0]
    else:
        for m in head:
            x = m(x)
    for m in tail:
        x = m(x)
    return x


def _graph_forward(module: nn.Module, p: _Plan, *args, **kwargs):
    g = None if kwargs or module.training in p.failed else _graph_for(module, p)
    size = None
    if g is not None and g.modules and len(args) == sum(1 for n in g.graph.nodes if n.op == "placeholder"):
        size = _batched(args, p.micro_batch)
    if size is None or not _frozen([module.get_submodule(t) for t in g.modules]):
        return type(module).forward(module, *args, **kwargs)
    nodes = {n.name: n for n in g.graph.nodes}
    interp = fx.Interpreter(module, garbage_collect_values=False, graph=g.graph)
    placeholders = [nodes[n] for n in g.prefix if nodes[n].op == "placeholder"]
    body = [nodes[n] for n in g.prefix if nodes[n].op != "placeholder"]

    def run(*values):
        n = values[0].shape[0]
        interp.env = dict(zip(placeholders, values))
        for node in body:
            if node.target is operator.getitem and isinstance(interp.env[node.args[0]], torch.Tensor):
                raise _NotPerSample  # an index into a tensor, not into a tuple of results
            value = interp.run_node(node)
            if not _per_sample(value, n):  # a batch statistic would spread into what uses it
                raise _NotPerSample
            interp.env[node] = value
        values = [interp.env[nodes[n]] for n in g.frontier]
        interp.env = {}
        return values

    try:
        done = _in_micro_batches(run, args, size, p.micro_batch)
    except _NotPerSample:
        done = None
    if done is None:
        _warn_once(module, p)
        return type(module).forward(module, *args, **kwargs)
    env: dict[fx.Node, Any] = {node: None for node in body}  # not needed after the prefix: never computed again
    env.update({nodes[n]: v for n, v in zip(g.frontier, done)})
    del done
    return fx.Interpreter(module, graph=g.graph).run(*args, initial_env=env)


def plan(model: nn.Module) -> list[tuple[str, list[str]]]:
    """``(module name, the names of the modules its forward runs in micro-batches)`` for every module
    :func:`enable` converts, outermost first (see the module docstring)."""
    out = []
    name, m = "", model
    while m is not None and _trainable(m) and not _is_compressed(m) and next(m.children(), None) is not None:
        prefix = ""
        if name:
            prefix = name + "."
        if _plain_sequential(m):
            kids = list(m.named_children())
            k = next(i for i, (_, c) in enumerate(kids) if _trainable(c))
            if k:
                out.append((name, [prefix + n for n, _ in kids[:k]]))
            child = kids[k][0]
        elif isinstance(m, _CONTAINERS):
            break  # no forward of its own: its user (traced above) calls its elements
        else:
            g = _trace(m)
            if g is not None:
                if g.modules:
                    out.append((name, [prefix + t for t in g.modules]))
                child = g.next_module
            else:  # not traceable (or nothing frozen first): go on into its first trainable child as registered
                child = next((n for n, c in m.named_children() if _trainable(c)), None)
            if child is None:
                break
        name, m = prefix + child, m.get_submodule(child)
    return out


def enable(model: nn.Module, micro_batch: int) -> list[tuple[str, list[str]]]:
    """Run the frozen prefix of ``model`` (everything before its first trainable parameter, found as the module
    docstring says) ``micro_batch`` samples at a time. Call it once the trainable parameters are set
    (``requires_grad``: after ``asi_core.patch`` and any freezing). Returns :func:`plan`'s list; empty when
    nothing is frozen first (every layer trains) or no forward could be traced."""
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
        raise ValueError(f"micro_batch must be an integer >= 1 (samples per micro-batch of the frozen prefix), got "
                         f"{micro_batch!r}")
    disable(model)
    converted = plan(model)
    for name, prefix in converted:
        module = model.get_submodule(name)
        p = _Plan(micro_batch)
        if _plain_sequential(module):
            p.sequential = len(prefix)
            module.forward = partial(_sequential_forward, module, p)
        else:
            p.graphs[module.training] = _trace(module)
            module.forward = partial(_graph_forward, module, p)
    return converted


def micro_batched(model: nn.Module) -> dict[str, int]:
    """``{module name: micro_batch}`` of the modules :func:`enable` converted."""
    return {n: m.forward.args[1].micro_batch for n, m in model.named_modules()
            if isinstance(m.__dict__.get("forward"), partial)
            and m.forward.func in (_sequential_forward, _graph_forward)}


def disable(model: nn.Module) -> list[str]:
    """Undo :func:`enable` (plain forwards again). Returns the names of the modules restored."""
    names = list(micro_batched(model))
    for n in names:
        del model.get_submodule(n).forward
    return names
