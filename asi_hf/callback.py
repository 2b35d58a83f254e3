"""``ASICallback``: ASI's memory and FLOPs in a ``transformers.Trainer``'s logs, and a warning where the Trainer's
settings defeat ASI.

What it logs (once measured, on every log event, so TensorBoard/W&B/the console and ``trainer.state.log_history``
show them next to the loss), all for one micro-batch of the first training step the Trainer runs (after a resume:
the first step of that session), the model's own dtype:

* ``asi/measured_activation_mib``: what autograd really keeps for backward from the first patched layer to the loss
  (``asi_core.usage.ActivationMeter``: every saved tensor, each storage once, parameters excluded);
* ``asi/activation_mib``: the paper's count, the patched layers' compressed inputs (eq. 5); ``asi/vanilla_activation_mib``:
  the same layers' inputs kept whole (what they would keep without ASI);
* ``asi/train_gflops``: the patched layers' forward + weight-gradient + subspace-iteration FLOPs of that micro-batch
  (1 multiply-add = 1 FLOP; ``asi_core.accounting``); ``asi/num_layers``;
* ``asi/peak_step_mib``: the whole-step peak, the most memory that first step (forward, backward, optimiser step, all
  its micro-batches) held at once, parameters and optimiser state included (``asi_core.peak.peak_of``: the CUDA
  allocator's peak on a GPU, the CPU allocator's events on a CPU); its breakdown by category goes to the JSON.

The per-layer reports go to ``<output_dir>/asi_usage.json`` at the end of training (main process only).
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Optional

import torch
from torch import nn
from transformers import TrainerCallback

import asi_core
from asi_core import accounting
from asi_core.peak import peak_of
from asi_core.usage import MIB, ActivationMeter, layer_reports, totals

__all__ = ["ASICallback", "ASIWarning", "checkpointed_patched_layers"]


class ASIWarning(UserWarning):
    """A training setting that makes ASI keep as much as (or more than) it would without it."""


def checkpointed_patched_layers(model: nn.Module) -> list[str]:
    """Patched layers inside a module that Hugging Face gradient checkpointing recomputes (a module whose
    ``gradient_checkpointing`` attribute is True: transformers' ``GradientCheckpointingLayer``)."""
    modules = dict(model.named_modules())
    checkpointed = [n for n, m in modules.items() if getattr(m, "gradient_checkpointing", False) is True]
    return [name for name, _ in asi_core.patched_layers(model)
            if any(name == c or name.startswith(c + ".") or not c for c in checkpointed)]


class ASICallback(TrainerCallback):
    """Add ``callbacks=[asi_hf.ASICallback()]`` to a ``transformers.Trainer`` whose model ``asi_core.patch`` (or
    ``asi_core.patch_lora``) patched. ``measure``: measure the first step (default) or not at all; ``peak``: measure
    that step's whole-step peak too (default; it watches every allocation of that one step, which slows it)."""

    def __init__(self, measure: bool = True, peak: bool = True):
        self.measure, self.peak = measure, peak
        self.metrics: dict = {}
        self.layers: list[dict] = []
        self.peak_breakdown: Optional[dict] = None
        self._meter: Optional[ActivationMeter] = None
        self._stop_handle = None
        self._peak_cm = self._peak = None

    # ------------------------------------------------------------------ checks
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        patched = asi_core.patched_layers(model)
        if not patched:
            warnings.warn("ASICallback: the model has no ASI-patched layer, so nothing is compressed; call "
                          "asi_core.patch(model, 'asi', ...) (or asi_core.patch_lora for a peft model) before "
                          "building the Trainer", ASIWarning, stacklevel=2)
            self.measure = False
            return
        inside = checkpointed_patched_layers(model)
        # (transformers 5 names it activation_checkpointing, earlier versions gradient_checkpointing)
        if inside or getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False):
            what = (f"{len(inside)} of the {len(patched)} patched layers ({', '.join(inside[:3])}"
                    f"{' ...' if len(inside) > 3 else ''}) are inside" if inside else "the patched layers may be in")
            warnings.warn(
                f"gradient checkpointing is on and {what} the recomputed decoder layers: checkpointing already keeps "
                f"only each layer's input, and the compressed activations are made again in the recomputation, so ASI "
                f"saves nothing more and costs its subspace iteration twice per step. Fix: "
                f"TrainingArguments(gradient_checkpointing=False) (activation_checkpointing=False in transformers 5) "
                f"to let ASI keep its compressed activations instead (measure both: asi/measured_activation_mib), or "
                f"asi_core.unpatch(model) to keep checkpointing alone",
                ASIWarning, stacklevel=2)

    # ------------------------------------------------------------------ measuring one forward
    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self.measure or self.metrics or self._meter is not None or model is None:
            return
        self._model = model
        self._arm()
        if self.peak:
            self._peak_cm = peak_of(model, optimizer)
            self._peak = self._peak_cm.__enter__()

    def _arm(self) -> None:
        for _, layer in asi_core.patched_layers(self._model):
            layer.last_stats = None  # so that only this forward's training statistics are read
        self._meter = ActivationMeter(self._model).start()
        self._stop_handle = self._model.register_forward_hook(self._forward_done)

    def _forward_done(self, module, args, output) -> None:
        meter, self._meter = self._meter, None
        self._stop_handle.remove()
        if meter is None:
            return
        meter.stop()
        measured = meter.summary()
        reports = layer_reports(self._model, meter.input_requires_grad)  # the layers that compressed in this forward
        if not torch.is_grad_enabled() or not reports or measured["measured_activation_mib"] is None:
            self._arm()  # a forward without a graph (a no_grad reference or generation pass): measure the next one
            return
        tot = totals(reports)
        vanilla = sum(accounting.to_mib(accounting.activation_elements("vanilla", _geometry(self._model, r["name"])),
                                        _dtype_bytes(self._model, r["name"])) for r in reports)
        self.metrics = {"asi/measured_activation_mib": measured["measured_activation_mib"],
                        "asi/activation_mib": tot["activation_mib"], "asi/vanilla_activation_mib": vanilla,
                        "asi/train_gflops": tot["train_gflops"], "asi/num_layers": tot["num_layers"]}
        self.layers = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()}
                       | {"measured_mib": meter.layer_bytes.get(r["name"], 0) / MIB} for r in reports]
        self.measure = False

    def on_step_end(self, args, state, control, **kwargs):
        if self._peak_cm is not None:
            cm, self._peak_cm = self._peak_cm, None
            cm.__exit__(None, None, None)
            if self.metrics:
                self.metrics["asi/peak_step_mib"] = self._peak["peak_step_mib"]
                self.peak_breakdown = {"source": self._peak["peak_step_source"],
                                       **self._peak["peak_step_breakdown"]}
        if self._meter is not None:  # the step ran no forward of the model itself: give up cleanly
            self._meter.stop()
            self._meter = None
            self._stop_handle.remove()

    # ------------------------------------------------------------------ reporting
    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.metrics or logs is None or "loss" not in logs:
            return
        logs.update(self.metrics)  # the callbacks after this one (reporters added later) see them
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self.metrics)  # the Trainer copied logs into its history before on_log

    def on_train_end(self, args, state, control, **kwargs):
        if self.metrics and state.is_world_process_zero and args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "asi_usage.json"), "w") as f:
                json.dump({"totals": self.metrics, "peak_step_breakdown_mib": self.peak_breakdown,
                           "layers": self.layers}, f, indent=1, default=str)


def _geometry(model: nn.Module, name: str):
    return accounting.geometry_from_layer(model.get_submodule(name))


def _dtype_bytes(model: nn.Module, name: str) -> int:
    weight = getattr(model.get_submodule(name), "weight", None)
    return weight.element_size() if isinstance(weight, torch.Tensor) else 4
