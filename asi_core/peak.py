"""The whole-step peak: the most memory a training step holds at once, itemised.

The paper's "Mem" counts the fine-tuned layers' inputs; what autograd keeps (``lean.SavedTensorMeter``) adds the rest
of the fine-tuned region; neither is what decides whether a step fits on a device. That is the peak of everything
live during forward, backward and the optimiser step: parameters (and buffers), gradients, optimiser state, the
batch, the tensors saved for backward and the transient buffers of forward and backward (activations on their way,
gradients of activations, kernel outputs not yet freed).

Two measures, independent of each other:

- :class:`StepMemory`, tensor level: a ``TorchDispatchMode`` sees every op's output storage (forward, backward and
  optimiser run in this thread on the CPU), a finaliser sees it freed; storages that exist before the step are
  itemised by what holds them, ``saved_tensors_hooks`` mark what autograd saves, post-accumulate-grad hooks mark the
  gradients. It gives the peak and what was live at that moment, category by category, and works under
  ``FakeTensorMode`` too (shape-only: real shapes, no memory).
- :func:`allocator_peak`, allocator level: the CUDA caching allocator's own peak statistic on a GPU; on the CPU the
  allocation events ``torch.profiler`` records from c10's allocator (``profile_memory``), their running total's
  maximum added to the bytes live when the step started. What the dispatch level cannot see (an op's internal
  workspace freed before it returns) is in this one.

The two agree within a few per cent on real steps (tests/test_peak.py). ``step_peak`` runs one step under both.
"""
from __future__ import annotations

import contextlib
import gc
import weakref
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["CATEGORIES", "StepMemory", "allocator_peak", "peak_of", "step_peak", "inference_peak", "training_peak",
           "MIB"]

MIB = 2 ** 20
CATEGORIES = ("parameters", "gradients", "optimizer_state", "batch", "saved", "transient")
# peak_step_breakdown adds "workspace": what the allocator held beyond the tensors at its peak (kernels' internal
# buffers, e.g. a convolution backward's), so that the breakdown sums to peak_step_mib


def _tensors(obj) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # a tensor without storage (sparse, nested, ...)
        return None


class StepMemory(TorchDispatchMode):
    """Live tensor storages by category while active; ``peak`` (bytes) and ``peak_breakdown`` (bytes per
    category at that moment). ``model``'s parameters and buffers, their gradients, ``optimizer``'s state and the
    ``batch`` tensors live before the step are itemised as such; every storage created inside starts as
    "transient" and becomes "saved" when autograd saves it, "gradients" when it is accumulated into a parameter's
    ``.grad``."""

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, batch=()):
        super().__init__()
        self.model, self.optimizer, self.batch = model, optimizer, batch
        self.live: dict[int, list] = {}  # id(storage) -> [nbytes, category]
        self.totals = dict.fromkeys(CATEGORIES, 0)
        self.peak, self.peak_breakdown = 0, dict(self.totals)
        self._stack = contextlib.ExitStack()

    # ------------------------------------------------------------------ bookkeeping
    def _track(self, t: torch.Tensor, category: str) -> None:
        st = _storage(t)
        if st is None or id(st) in self.live:
            return
        key, nbytes = id(st), st.nbytes()
        self.live[key] = [nbytes, category]
        self.totals[category] += nbytes
        weakref.finalize(st, self._free, key)
        self._update_peak()

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.totals[entry[1]] -= entry[0]

    def _relabel(self, t: torch.Tensor, category: str, only_from: Iterable[str] = ("transient",)) -> None:
        st = _storage(t)
        entry = self.live.get(id(st)) if st is not None else None
        if entry is None:
            self._track(t, category)
        elif entry[1] in only_from:
            self.totals[entry[1]] -= entry[0]
            self.totals[category] += entry[0]
            entry[1] = category

    def _update_peak(self) -> None:
        current = sum(self.totals.values())
        if current > self.peak:
            self.peak, self.peak_breakdown = current, dict(self.totals)

    @property
    def current(self) -> int:
        return sum(self.totals.values())

    # ------------------------------------------------------------------ hooks
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _tensors(out):
            self._track(t, "transient")
        return out

    def _pack(self, t: torch.Tensor):
        self._relabel(t, "saved")
        return t

    def __enter__(self):
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            self._track(t, "parameters")
        for p in self.model.parameters():
            if p.grad is not None:
                self._track(p.grad, "gradients")
            if p.requires_grad:
                self._stack.callback(p.register_post_accumulate_grad_hook(
                    lambda p: self._relabel(p.grad, "gradients")).remove)
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                for t in _tensors(state):
                    self._track(t, "optimizer_state")
        for t in _tensors(self.batch):
            self._track(t, "batch")
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        self.start = self.current
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._stack.close()
        return out

    def mib(self) -> dict:
        """``peak_step_mib`` and ``peak_step_breakdown`` (MiB per category at the peak)."""
        return {"peak_step_mib": self.peak / MIB,
                "peak_step_breakdown": {k: v / MIB for k, v in self.peak_breakdown.items()}}


@contextlib.contextmanager
def allocator_peak(device: torch.device):
    """Yields a dict that holds, after the block, ``peak_bytes``: the allocator's peak of live bytes during the
    block (CUDA: ``max_memory_allocated`` after a reset; CPU: the profiler's c10 allocation events, the running
    total's maximum plus the bytes live at the start, which the caller gives as ``out["start_bytes"]`` before the
    block ends). None where neither applies (meta/fake tensors)."""
    out: dict = {"peak_bytes": None, "start_bytes": 0}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        out["start_bytes"] = start
        return
    if device.type != "cpu":
        yield out
        return
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # kineto prints its start/stop (and a CUDA probe) on the process's stderr
        prof.start()
    try:
        yield out
    finally:
        with _quiet_stderr():
            prof.stop()
    sizes = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)
    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    running = high = 0
    for _, size in sorted(sizes, key=lambda e: e[0]):
        running += size
        high = max(high, running)
    out["peak_bytes"] = out["start_bytes"] + high


@contextlib.contextmanager
def peak_of(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, batch=(),
            device: Optional[torch.device] = None, allocator: bool = True):
    """Measure what the block holds at its peak, by :class:`StepMemory` and, with ``allocator``,
    :func:`allocator_peak`. Yields a dict filled when the block ends: ``peak_step_mib`` (the allocator's where it
    measured, else the tensor-level one), ``peak_step_breakdown`` (MiB per category at the tensor-level peak),
    ``peak_step_tensor_mib`` and ``peak_step_allocator_mib`` (each measure alone; None where it did not run) and
    ``peak_step_source``."""
    device = device if device is not None else next((p.device for p in model.parameters()), torch.device("cpu"))
    fake = any(isinstance(p, torch._subclasses.FakeTensor) for p in model.parameters())
    use_allocator = allocator and not fake and device.type in ("cpu", "cuda")
    out: dict = {}
    # garbage of earlier work freed by the collector inside the block would lower the allocator's running total
    # (it was allocated before the block): collect it first, and let no collection run inside
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with _measured(model, optimizer, batch, device, use_allocator) as (alloc, meter):
            yield out
    finally:
        if was_enabled:
            gc.enable()
    _fill(out, alloc, meter, device, fake)


@contextlib.contextmanager
def _measured(model, optimizer, batch, device, use_allocator):
    with allocator_peak(device) if use_allocator else contextlib.nullcontext({"peak_bytes": None}) as alloc:
        with StepMemory(model, optimizer, batch) as meter:
            if use_allocator and device.type == "cpu":
                alloc["start_bytes"] = meter.start
            yield alloc, meter


def _fill(out: dict, alloc: dict, meter: StepMemory, device: torch.device, fake: bool) -> None:
    out.update(meter.mib())
    out["peak_step_tensor_mib"] = out["peak_step_mib"]
    out["peak_step_allocator_mib"] = None if alloc["peak_bytes"] is None else alloc["peak_bytes"] / MIB
    if out["peak_step_allocator_mib"] is not None:
        out["peak_step_mib"], out["peak_step_source"] = out["peak_step_allocator_mib"], f"{device.type} allocator"
    else:
        out["peak_step_source"] = "tensors (shape-only)" if fake else "tensors"
    breakdown = out["peak_step_breakdown"]
    breakdown["workspace"] = max(0.0, out["peak_step_mib"] - sum(breakdown.values()))


@contextlib.contextmanager
def _quiet_stderr():
    """The process's file descriptor 2 to /dev/null for the block (C++ libraries' own prints), restored after."""
    import os
    import sys

    try:
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:  # no file descriptor 2 (embedded interpreters): nothing to hide
        yield
        return
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def step_peak(model: nn.Module, step: Callable[[], None], optimizer: Optional[torch.optim.Optimizer] = None,
              batch=(), device: Optional[torch.device] = None, allocator: bool = True) -> dict:
    """Run ``step()`` (forward, backward, optimiser step: the caller's) once under :func:`peak_of`."""
    with peak_of(model, optimizer, batch, device, allocator) as out:
        step()
    return out


def inference_peak(model: nn.Module, x, batch=(), device: Optional[torch.device] = None) -> float:
    """MiB at the peak of an inference forward of ``x`` (``eval``, ``no_grad``); the training mode is restored."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = step_peak(model, lambda: model(x), None, batch or (x,), device)
    model.train(was_training)
    return out["peak_step_mib"]


def training_peak(model: nn.Module, x, y, loss_fn: Callable, optimizer: torch.optim.Optimizer,
                  device: Optional[torch.device] = None) -> dict:
    """The whole-step peak of one training step of ``model`` on ``(x, y)`` (forward, ``loss_fn``, backward,
    ``optimizer.step()``, ``zero_grad``; run one step first so that the optimiser state exists, as in training),
    and ``training_overhead_mib``: that peak minus the peak of an inference forward of the same batch (``eval``,
    ``no_grad``), what training adds on top of running the model; ``step_time_s``: the wall time of one more such
    step with nothing measuring it (None shape-only)."""
    def train_step():
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    was_training = model.training
    model.train()
    out = step_peak(model, train_step, optimizer, (x, y), device)
    out["step_time_s"] = None if out["peak_step_allocator_mib"] is None else _timed(train_step, device)
    model.train(was_training)
    out["inference_peak_mib"] = inference_peak(model, x, (x, y), device)
    out["training_overhead_mib"] = out["peak_step_mib"] - out["inference_peak_mib"]
    return out


def _timed(step: Callable[[], None], device: Optional[torch.device]) -> float:
    import time

    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
