"""Run the frozen prefix of a network in micro-batches: the same result, a lower whole-step peak.

With few fine-tuned layers the peak of a training step is often the forward of the frozen, high-resolution early
layers (docs/peak_memory.md: MCUNet, ResNet-18 and Swin-T with 2-4 fine-tuned layers at batch 64 peak there, and
every method, ASI, recompute and checkpointing alike, has the same peak). Nothing in that prefix needs a gradient:
no parameter trains, its input needs none, so autograd records nothing and every sample is computed on its own
(BatchNorm in eval mode). Running it on ``micro_batch`` samples at a time and gathering its output gives the same
output, while its transient activations shrink with the micro-batch; the fine-tuned region still sees the whole
batch (its gradient, and ASI's subspace iteration, are those of the whole batch).

How the prefix is found, for any model: the module's ``forward`` is traced (``torch.fx``, on a shallow copy, every
module it calls a leaf; an ``nn.Sequential`` needs no trace) up to its first call of a module that trains, and the
*prefix* is the calls in there of modules with no trainable parameter whose arguments are the inputs or earlier
prefix results. Any other operation (a shape check, a reshape by the batch size, a batch mean, a residual sum) is
left where it is, and so is any module that uses its result; an in-place operation ends the search, and an
in-place module (``nn.ReLU(inplace=True)``) joins the prefix only where nothing else reads what it changes. At each
call the prefix modules run ``micro_batch`` samples at a time; the results the rest of the forward uses (the
*frontier*: usually one tensor, several where later code reuses earlier features, or a backbone's multi-scale
tuple) are written into whole-batch tensors. Then the module's own ``forward`` runs as written, on the whole
batch, each prefix call answered with its gathered result when its arguments are exactly the objects the traced
call had (otherwise, e.g. the same module called again later, it computes as usual): the module's Python logic,
flags set after :func:`enable`, ``no_grad`` blocks, checkpointing and dtype changes all keep working. The same is
then done inside the first module that does train (a stage that holds frozen blocks and fine-tuned ones, a block
whose attention is frozen and whose MLP trains), down to the first trainable layer. Modules are converted in place
(an instance ``forward``; :func:`disable` removes it; no new parameter, buffer or state_dict key); a module that
already has an instance ``forward`` (``asi_core.recompute``'s segments) is left alone.

When it runs whole instead (checked at every call, so the same model trains, validates and evaluates): the batch is
no larger than ``micro_batch``; an input is not a tensor, or needs a gradient; a module of the prefix has a
trainable parameter by now or a norm that joins the samples (BatchNorm in training mode or without running
statistics, a norm updating running statistics); a prefix result is not a per-sample tensor, or the forward no
longer calls the prefix as traced (both warned once). Assumptions no check can see: inputs have the batch first,
and a prefix module treats samples on their own (convolutions, linears, norms in eval mode and attention over a
sample's tokens do). Random modules in training mode in the prefix (dropout, stochastic depth: Swin-T's) draw
their masks per micro-batch: the same distribution, other draws. Forward hooks of prefix modules fire once per
micro-batch. Results equal the whole batch's up to float rounding (kernels round differently at other batch
sizes: about 1e-7 in float32, 1e-15 in float64).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["enable", "disable", "micro_batched", "plan"]

_BN = nn.modules.batchnorm._BatchNorm
_NORM = nn.modules.batchnorm._NormBase  # BatchNorm and InstanceNorm
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


@dataclass(frozen=True)
class _Ref:
    """An argument of a prefix call that is the value of node ``name`` (an input, or a prefix module's result)."""
    name: str


@dataclass
class _Call:
    """One prefix module call: the node's name, the module (its path under the traced module) and its arguments
    (:class:`_Ref` for values, constants as they are)."""
    name: str
    target: str
    args: tuple
    kwargs: dict


@dataclass
class _Graph:
    """The prefix of one traced ``forward`` (for one training mode): its inputs, its module calls in order, the
    results the rest of the forward uses (the frontier) and the first trainable module called after it."""
    inputs: list[str]
    calls: list[_Call]
    frontier: list[str]
    next_module: Optional[str]

    @property
    def modules(self) -> list[str]:
        return [c.target for c in self.calls]


@dataclass
class _Plan:
    """What one converted module runs in micro-batches; data only (module references are looked up per call, so
    a deep copy of the model stays correct)."""
    micro_batch: int
    sequential: int = 0  # an nn.Sequential: its first ``sequential`` children are the prefix
    graphs: dict = field(default_factory=dict)  # training mode -> _Graph or None (not traceable)
    failed: set = field(default_factory=set)  # training modes that ran whole after a mismatch (warned once)


def _traced(module: nn.Module) -> fx.Graph:
    """fx's graph of ``module``'s own forward, traced on a shallow copy with dictionaries of its own, so that
    what the forward writes to ``self`` while traced (a proxy, a counter) never reaches the module."""
    clone = copy.copy(module)
    for key in ("_modules", "_parameters", "_buffers"):
        clone.__dict__[key] = dict(module.__dict__[key])
    return _CalledModulesAreLeaves().trace(clone)


def _trace(module: nn.Module) -> Optional[_Graph]:
    """The prefix of ``module``'s own forward, or None where fx cannot trace it."""
    try:
        graph = _traced(module)
    except Exception:  # noqa: BLE001 - data-dependent control flow, unsupported Python: run whole
        return None
    inputs: list[str] = []
    calls: dict[str, _Call] = {}
    nodes: list[fx.Node] = []  # the nodes of ``calls``
    next_module = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.args:  # a default value: the call may not pass every input
                return None
            inputs.append(node.name)
            continue
        if node.op == "output":
            break
        if node.op == "call_module" and _trainable(module.get_submodule(node.target)):
            next_module = node.target
            break
        if _in_place(node, module):
            if _private_in_place(node, calls):
                calls[node.name] = _call(node)
                nodes.append(node)
                continue
            break  # it may change a value something else reads: nothing after it is taken out of order
        if node.op == "call_module" and _takes_prefix_values(node, inputs, calls):
            calls[node.name] = _call(node)
            nodes.append(node)
        # any other operation runs in the forward itself, on the whole batch (a reshape by the batch size, a batch
        # mean, a residual sum), and so does any module that uses its result
    frontier = [n.name for n in nodes if any(u.name not in calls for u in n.users)]
    return _Graph(inputs, list(calls.values()), frontier, next_module)


def _call(node: fx.Node) -> _Call:
    ref = lambda n: _Ref(n.name)  # noqa: E731
    return _Call(node.name, node.target, fx.node.map_arg(node.args, ref), fx.node.map_arg(node.kwargs, ref))


def _takes_prefix_values(node: fx.Node, inputs: list[str], calls: dict) -> bool:
    """Every argument a value of the prefix (an input or a prefix call's result) or a plain constant, at least one
    a value (a module of constants alone is no per-sample computation)."""
    values = 0
    for a in (*node.args, *node.kwargs.values()):
        if isinstance(a, fx.Node):
            if a.name not in inputs and a.name not in calls:
                return False
            values += 1
        elif isinstance(a, (tuple, list, dict, slice, torch.Tensor)):
            return False  # nested arguments: not followed
    return values > 0


def _in_place(node: fx.Node, module: nn.Module) -> bool:
    """An operation that may change its input: a method or function named ``..._``, ``inplace=True``, or a module
    built with ``inplace=True`` (nn.ReLU(inplace=True))."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_module":
        return getattr(module.get_submodule(node.target), "inplace", False) is True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and name.endswith("_") and not name.endswith("__")


def _private_in_place(node: fx.Node, calls: dict) -> bool:
    """An in-place module whose one argument is a prefix call's result that nothing else reads: no one can see the
    change (torchvision ResNet's ``relu`` after ``bn1``)."""
    return (node.op == "call_module" and len(node.args) == 1 and not node.kwargs
            and isinstance(node.args[0], fx.Node) and node.args[0].name in calls and len(node.args[0].users) == 1)


class _NotPerSample(Exception):
    """A prefix call gave a value that is not per-sample: the micro-batches stop and the module runs whole."""


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


def _joins_samples(m: nn.Module) -> bool:
    """A norm whose result or state depends on the other samples: BatchNorm in training mode or without running
    statistics (it then normalises by the batch in eval mode too), a norm updating running statistics."""
    if isinstance(m, _BN):
        return m.training or m.running_mean is None
    return isinstance(m, _NORM) and m.training and m.track_running_stats


def _frozen(modules: list[nn.Module]) -> bool:
    return not any(_trainable(m) or any(_joins_samples(s) for s in m.modules()) for m in modules)


def _in_micro_batches(run, args: tuple, size: int, micro_batch: int) -> Optional[list]:
    """``run`` (inputs -> list of values: tensors, or tuples/lists of them such as a backbone's multi-scale
    features or attention's (output, None)) on ``micro_batch`` samples at a time, gathered into whole-batch
    tensors (allocated once, after the first micro-batch); None when a value is not per-sample."""
    out: Optional[list] = None
    spec = None
    with torch.no_grad():
        for start in range(0, size, micro_batch):
            leaves, part_spec = tree_flatten(run(*(a[start:start + micro_batch] for a in args)))
            n = min(micro_batch, size - start)
            if not all(v is None or _per_sample(v, n) for v in leaves) or (spec is not None and part_spec != spec):
                return None
            if out is None:
                out, spec = [None if v is None else v.new_empty((size, *v.shape[1:])) for v in leaves], part_spec
            for whole, v in zip(out, leaves):
                if (whole is None) != (v is None):
                    return None
                if v is not None:
                    whole[start:start + n].copy_(v)
            del leaves
    return tree_unflatten(out, spec)


def _gathered(module: nn.Module, p: _Plan, run, args: tuple, size: int) -> Optional[list]:
    """:func:`_in_micro_batches`, or None (warned once) when a value on the way is not per-sample."""
    try:
        done = _in_micro_batches(run, args, size, p.micro_batch)
    except _NotPerSample:
        done = None
    if done is None:
        _warn_once(module, p, "hands on a value that is not a per-sample tensor (batch first)")
    return done


def _warn_once(module: nn.Module, p: _Plan, why: str) -> None:
    if module.training not in p.failed:
        p.failed.add(module.training)
        warnings.warn(f"asi_core.microbatch: {type(module).__name__}'s frozen prefix {why}; it runs on the whole "
                      f"batch", stacklevel=3)


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
        done = _gathered(module, p, run, (x,), size)
    if done is not None:
        x = done[0]
    else:
        for m in head:
            x = m(x)
    for m in tail:
        x = m(x)
    return x


_SKIPPED = object()  # what a replayed call returns where only another prefix call reads its result


def _replay(module: nn.Module, queue: list, *args, **kwargs):
    """A prefix module's call during the whole-batch forward: its result from the micro-batches when its arguments
    are exactly the objects the traced call had (the inputs, earlier replayed results, constants); any other call
    (the same module used again later, as Swin's stochastic depth is) computes as usual."""
    if queue:
        expected_args, expected_kwargs, value = queue[0]
        if (len(args) == len(expected_args) and kwargs.keys() == expected_kwargs.keys()
                and all(_same(a, e) for a, e in zip(args, expected_args))
                and all(_same(kwargs[k], e) for k, e in expected_kwargs.items())):
            queue.pop(0)
            return value
    return type(module).forward(module, *args, **kwargs)


def _same(actual, expected) -> bool:
    if isinstance(expected, torch.Tensor) or expected is _SKIPPED or isinstance(actual, torch.Tensor):
        return actual is expected
    try:
        return type(actual) is type(expected) and bool(actual == expected)
    except Exception:  # noqa: BLE001 - an object without a plain equality
        return actual is expected


def _graph_forward(module: nn.Module, p: _Plan, *args, **kwargs):
    """Run the prefix calls in micro-batches, then the module's own forward on the whole batch, its prefix calls
    answered with their gathered results (checked: the same arguments as traced), everything else as written."""
    def whole():
        return type(module).forward(module, *args, **kwargs)

    g = None if kwargs or module.training in p.failed else _graph_for(module, p)
    if g is None or not g.calls or len(args) != len(g.inputs):
        return whole()
    size = _batched(args, p.micro_batch)
    targets = {c.target: module.get_submodule(c.target) for c in g.calls}
    if size is None or not _frozen(list(targets.values())) or any("forward" in m.__dict__ for m in targets.values()):
        return whole()

    def resolve(value, env):
        return env[value.name] if isinstance(value, _Ref) else value

    def run(*chunk):
        n = chunk[0].shape[0]
        env = dict(zip(g.inputs, chunk))
        for c in g.calls:
            out = targets[c.target](*(resolve(a, env) for a in c.args),
                                    **{k: resolve(v, env) for k, v in c.kwargs.items()})
            if not _per_sample(out, n):  # a batch statistic would spread into what uses it
                raise _NotPerSample
            env[c.name] = out
        return [env[name] for name in g.frontier]

    done = _gathered(module, p, run, args, size)
    if done is None:
        return whole()
    results = dict(zip(g.frontier, done))
    del done
    env = dict(zip(g.inputs, args))
    queues: dict[str, list] = {t: [] for t in targets}
    for c in g.calls:
        env[c.name] = results.get(c.name, _SKIPPED)
        queues[c.target].append((tuple(resolve(a, env) for a in c.args),
                                 {k: resolve(v, env) for k, v in c.kwargs.items()}, env[c.name]))
    stale = "was not called as traced (its forward takes another branch now)"  # whole from then on, this mode
    for target, m in targets.items():
        m.forward = partial(_replay, m, queues[target])
    try:
        try:
            out = whole()
        finally:
            for m in targets.values():
                del m.forward
    except Exception:  # noqa: BLE001 - a skipped result reached other code: the trace is stale
        _warn_once(module, p, stale)
        return whole()
    if any(queues.values()):  # some prefix calls were not made: the result holds, the work was wasted
        _warn_once(module, p, stale)
    return out


def plan(model: nn.Module) -> list[tuple[str, list[str]]]:
    """``(module name, the names of the modules its forward runs in micro-batches)`` for every module
    :func:`enable` converts, outermost first (see the module docstring)."""
    out = []
    name, m = "", model
    while (m is not None and _trainable(m) and not _is_compressed(m) and next(m.children(), None) is not None
           and "forward" not in m.__dict__):  # a forward of its own already (asi_core.recompute's): left as it is
        prefix = ""
        if name:
            prefix = name + "."
        if _plain_sequential(m):
            kids = list(m.named_children())
            k = next(i for i, (_, c) in enumerate(kids) if _trainable(c))
            if k and getattr(kids[0][1], "inplace", False) is not True:  # it would change the caller's input
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
