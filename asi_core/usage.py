"""What the fine-tuned layers of a patched model cost in one training step, measured and counted, in plain PyTorch:

* :class:`ActivationMeter`: what autograd really keeps for backward from the first patched layer on (every saved
  tensor, each storage once, through ``asi_core.lean.SavedTensorMeter``; parameters and buffers excluded), in total
  and per patched layer;
* :func:`layer_reports` / :func:`totals` / :func:`resource_summary`: the analytic figures read off each patched layer's
  ``last_stats`` through ``asi_core.accounting`` (the paper's memory count, eq. 5, and FLOPs, eq. 11-17).

Used by the framework's ``ResourceAccounting`` callback and ``profile`` (classification/resources.py) and by the
Hugging Face Trainer callback (``asi_hf``); nothing here knows a training loop.
"""
from __future__ import annotations

from functools import partial
from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from . import accounting
from .lean import SavedTensorMeter
from .patch import patched_layers

__all__ = ["ActivationMeter", "layer_reports", "totals", "resource_summary", "MASK_DTYPES", "MIB"]

MIB = accounting.MIB
MASK_DTYPES = (torch.uint8, torch.bool)  # what lean.py's bit masks and dropout masks are saved as


class ActivationMeter:
    """Measured activation memory of one training forward, from the first fine-tuned layer on::

        with ActivationMeter(net) as meter:       # net: a model patched by asi_core.patch
            loss = criterion(net(x), y)           # counting starts in the first patched layer's forward
        loss.backward()
        meter.summary()["measured_activation_mib"]

    or ``meter = ActivationMeter(net).start()`` ... ``meter.stop()`` when the forward happens between two
    callback hooks. The graph must still be alive at ``stop()`` (stop before ``backward()``).
    ``exclude``: more modules/tensors whose storages are not activations (``net``'s own parameters and
    buffers always are)."""

    def __init__(self, net: nn.Module, exclude: Iterable[torch.Tensor | nn.Module] = ()):
        self.layers = patched_layers(net)
        if not self.layers:
            raise ValueError("ActivationMeter: the model has no fine-tuned layers; call asi_core.patch(model, ...) "
                             "first (the meter counts from the first patched layer on)")
        self.net = net
        self._meter = SavedTensorMeter(exclude=[net, *exclude])
        self._first_record = 0
        self._handles: list = []
        self._marks: dict[str, int] = {}
        self.running = False   # saved-tensor hooks active
        self.started = False   # the first patched layer's forward has run
        self.layer_bytes: dict[str, int] = {}
        self.input_requires_grad: dict[str, bool] = {}

    # -------------------------------------------------------------- hooks
    def start(self) -> "ActivationMeter":
        # The saved-tensor hooks are entered when the network's forward starts (first among its pre-hooks), so that
        # hooks entered inside it and left before it returns (asi_core.approx's compressor, checkpointing) nest
        # inside the meter, as the hooks' stack needs; counting starts at the first patched layer.
        self._handles.append(self.net.register_forward_pre_hook(self._enter, prepend=True))
        for name, layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(partial(self._pre, name)))
            self._handles.append(layer.register_forward_hook(partial(self._post, name)))
        return self

    def _enter(self, module: nn.Module, args) -> None:
        if not self.running and not self.started:
            self._meter.__enter__()
            self.running = True

    def _pre(self, name: str, module: nn.Module, args) -> None:
        if not self.started:
            if not self.running:  # the patched layer ran without the network's forward (called directly)
                self._meter.__enter__()
                self.running = True
            self.started = True
            # counting starts here: what the frozen prefix saved is forgotten (a storage saved there and again in
            # the region is counted once, here)
            self._first_record = len(self._meter.records)
            self._meter._storages.clear()
            self._meter.bytes = 0
        if args and isinstance(args[0], torch.Tensor) and torch.is_grad_enabled():  # (not inside a checkpointed
            self.input_requires_grad[name] = bool(args[0].requires_grad)           # forward, which runs no graph)
        if self.running:
            self._marks[name] = len(self._meter.records)

    def _post(self, name: str, module: nn.Module, args, output) -> None:
        start = self._marks.pop(name, None)
        if start is None or not self.running:
            return
        storages = {r["storage"]: r["storage_nbytes"] for r in self._meter.records[start:] if not r["excluded"]}
        self.layer_bytes[name] = self.layer_bytes.get(name, 0) + sum(storages.values())

    def stop(self) -> "ActivationMeter":
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.running:
            self._meter.__exit__(None, None, None)
            self.running = False
        return self

    def __enter__(self) -> "ActivationMeter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -------------------------------------------------------------- results
    @property
    def bytes(self) -> Optional[int]:
        """Bytes saved for backward from the first fine-tuned layer on; None if no patched layer ran."""
        return self._meter.bytes if self.started else None

    @property
    def mask_bytes(self) -> Optional[int]:
        """Of :attr:`bytes`, those in uint8/bool tensors (lean bit masks, dropout masks)."""
        if not self.started:
            return None
        return sum(r["nbytes"] for r in self._meter.records[self._first_record:] if r["dtype"] in MASK_DTYPES)

    def summary(self) -> dict:
        """``measured_activation_mib`` (None if no patched layer ran), ``measured_mask_mib`` and
        ``measured_layers_mib`` (sum of the per-layer figures: what the fine-tuned layers themselves keep)."""
        if not self.started:
            return {"measured_activation_mib": None, "measured_mask_mib": None, "measured_layers_mib": None}
        return {"measured_activation_mib": self.bytes / MIB, "measured_mask_mib": self.mask_bytes / MIB,
                "measured_layers_mib": sum(self.layer_bytes.values()) / MIB}


# ------------------------------------------------------------------ analytic
def layer_reports(net: nn.Module, input_requires_grad: Optional[Mapping[str, bool]] = None,
                  paper: str = "equations") -> list[dict]:
    """``asi_core.accounting.report_from_layer`` for every patched layer that has run a training forward,
    with its qualified ``name`` first. ``input_requires_grad`` (name -> bool, e.g. from
    :class:`ActivationMeter`) decides who pays an input gradient; unknown layers: all but the first. ``paper``: how
    the paper's FLOPs are counted for this model (``ModelSpec.paper_flops``)."""
    reports = []
    for i, (name, layer) in enumerate(patched_layers(net)):
        if layer.last_stats is None:
            continue
        needs = (input_requires_grad or {}).get(name, i > 0)
        reports.append({"name": name, **accounting.report_from_layer(layer, input_requires_grad=needs, paper=paper)})
    return reports


def totals(reports: Sequence[Mapping]) -> dict:
    """``asi_core.accounting.summarize`` plus ``train_gflops`` = forward + backward + overhead + core."""
    out = accounting.summarize(list(reports))
    out["train_gflops"] = (out["forward_gflops"] + out["backward_gflops"] + out["overhead_gflops"]
                           + out["core_gflops"])
    return out


def resource_summary(net: nn.Module, meter: Optional[ActivationMeter] = None, paper: str = "equations") -> dict:
    """Totals of :func:`totals`, the meter's summary (when given) and ``layers`` (one report per patched
    layer, with ``measured_mib`` when measured); ``paper`` as in :func:`layer_reports`."""
    reports = layer_reports(net, meter.input_requires_grad if meter is not None else None, paper)
    out = totals(reports)
    if meter is not None:
        out.update(meter.summary())
        for rep in reports:
            if rep["name"] in meter.layer_bytes:
                rep["measured_mib"] = meter.layer_bytes[rep["name"]] / MIB
    out["layers"] = reports
    return out
