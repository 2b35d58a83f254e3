"""What one training step costs in the fine-tuned layers: activation memory (analytic and measured) and
FLOPs. Shared by the ``ResourceAccounting`` callback (every fit, callbacks.py) and ``main.py profile``. The meter and
the analytic totals themselves live in ``asi_core.usage`` (plain PyTorch); this module runs them on the framework's
steps.

* **Analytic** figures are read off each patched layer's ``last_stats`` (set by its last training
  forward) through ``asi_core.accounting``: the paper's formulas (eq. 5, 11, 14-17), counted with
  groups and on the output grid of strided convs; see that module's docstring. Nothing is recomputed
  and no second pass runs: a few integer products per layer.
* **Measured** activation memory (:class:`ActivationMeter`) is what autograd really keeps for backward,
  through ``asi_core.lean.SavedTensorMeter``: every saved tensor, each storage once, parameters and the
  model's buffers excluded. The meter starts in the forward-pre-hook of the first fine-tuned layer that
  runs and stops when the loss is formed, so it covers the fine-tuned region *and* what follows it
  (BatchNorm, activation masks, pooling, the head, the loss); the frozen part before the first
  fine-tuned layer is never counted (it records no graph anyway: its parameters are frozen and its
  input needs no gradient). Per fine-tuned layer it also records the bytes saved inside that layer's
  forward (``measured_mib``, comparable with the analytic ``memory_mib``) and whether the layer's input
  needed a gradient (which decides its input-gradient FLOPs: a ResNet downsample conv fed by a frozen
  block input has none). The meter hands autograd the same storage (``t.detach()``), so the step it
  watches computes exactly what it would without it.

Totals (:func:`totals`) add ``train_gflops`` = forward + weight-gradient backward + overhead + core:
the per-step cost of a method in the sense of the paper's Table 1 (which has no input gradient), but
counted correctly; ``paper_gflops`` is the same sum with eq. 16/17 as written (``asi_core.accounting``).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import nn

import asi_core
from asi_core import accounting
from asi_core.peak import training_peak
from asi_core.recompute import RecomputeMeter
# the meter and the analytic summary are plain PyTorch (asi_core.usage: the Hugging Face callback uses them too);
# importable from here, as they were
from asi_core.usage import MASK_DTYPES, ActivationMeter, layer_reports, resource_summary, totals

from .finetune import LoRA, make_optimizer, method_info

__all__ = ["ActivationMeter", "layer_reports", "totals", "resource_summary", "profile_step", "profile_report",
           "MASK_DTYPES"]

MIB = accounting.MIB


# ------------------------------------------------------------------ one step
def profile_step(model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor] = None,
                 loss_fn: Optional[Callable] = None, optimizer: Optional[torch.optim.Optimizer] = None,
                 net: Optional[nn.Module] = None) -> dict:
    """Run one training step of ``model`` on ``x`` (forward, ``loss_fn(output, y)``, backward, and an
    optimizer step when given) with an :class:`ActivationMeter` around the forward; return
    :func:`resource_summary`. ``net`` is the patched network (default ``model.net`` or ``model``);
    ``loss_fn`` defaults to ``model.criterion`` or cross-entropy. The model is left in training mode."""
    net = net if net is not None else getattr(model, "net", model)
    loss_fn = loss_fn or getattr(model, "criterion", None) or nn.CrossEntropyLoss()
    model.train()
    with ActivationMeter(net, exclude=[model]) as meter:
        loss = loss_fn(model(x), y)
    with RecomputeMeter(exclude=[model]) as recomputed:  # what a recomputed segment holds while its backward runs
        loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    out = resource_summary(net, meter, getattr(model, "paper_flops", "equations"))
    out["measured_recompute_peak_mib"] = recomputed.peak_bytes / MIB if recomputed.segments else None
    return out


# The whole-step peak (asi_core/peak.py): everything live at once in a training step, itemised, and what training
# adds to an inference forward of the same batch; the two measures beside the one reported (see its docstring).
PEAK_KEYS = ("peak_step_mib", "peak_step_breakdown", "training_overhead_mib", "inference_peak_mib",
             "peak_step_source", "peak_step_tensor_mib", "peak_step_allocator_mib")
PROFILE_PEAK_KEYS = (*PEAK_KEYS, "step_time_s")  # profile times one more step, unmeasured


def reported_options(net: nn.Module, hp) -> dict:
    """The method's own options as ``profile`` reports them (``Option.reported``): as set, or the patched layers'
    values where those differ per layer (the gradient filter's radii of the segmentation layer sets, Table 3)."""
    layers = [layer for _, layer in asi_core.patched_layers(net)]
    out = {}
    for k, opt in method_info(hp.method).user_options.items():
        if not opt.reported:
            continue
        values = [(layer.options or {}).get(k) for layer in layers]
        if k not in hp:  # an option with no --model flag (a method registered from outside): what the layers use
            out[k] = values[0] if values and len({repr(v) for v in values}) == 1 else (values or opt.default)
            continue
        differ = hp.get(k) is not None and len({repr(v) for v in values}) > 1
        out[k] = values if differ else hp.get(k)
    return out


def resolve_device(device, option: str = "--device", fake: bool = False) -> torch.device:
    """The torch device a ``--device``-style option names ("auto": CUDA when available and the run is not
    shape-only, else the CPU); ValueError saying what to use instead for a device this machine does not have."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and not fake else "cpu")
    try:
        out = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{option} {device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if out.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {device}: this machine has no CUDA device (torch {torch.__version__}: "
                             f"torch.cuda.is_available() is False); use {option} cpu, or auto")
        if out.index is not None and out.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {device}: there are {torch.cuda.device_count()} CUDA device(s) here "
                             f"(cuda:0 ... cuda:{torch.cuda.device_count() - 1})")
    elif out.type not in ("cpu",):
        raise ValueError(f"{option} {device!r}: only auto, cpu, cuda and cuda:N are supported")
    return out


def profile_report(model: nn.Module, batch_size: int, resolution: int, device: str = "auto",
                   seed: int = 0, max_length: Optional[int] = None) -> dict:
    """``main.py profile``: one training step of a ``ClassificationModel`` (its hparams name the backbone,
    method and options) on random input (batch_size, 3, resolution, resolution), or for a language model
    (``model.net.is_language_model``) random token ids (batch_size, max_length), and random labels, with a step of
    the run's optimiser (--model.optimizer ...); then a second step measured whole (``peak_step_mib``, its
    breakdown, ``training_overhead_mib``: asi_core/peak.py). Returns the JSON object the command prints (schema in
    docs/resources.md). A network built shape-only (``model.net.fake_mode``, classification/llm.py) runs the whole
    step under its FakeTensorMode: real shapes, saved tensors and FLOP counts, no arithmetic and no memory (its
    peak is the tensor-level one)."""
    hp = model.hparams
    net = getattr(model, "net", model)
    text = getattr(net, "is_language_model", False)
    fake_mode = getattr(net, "fake_mode", None)
    device = resolve_device(device, fake=fake_mode is not None)
    gen = torch.Generator().manual_seed(seed)
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        x, y = model.random_batch(batch_size, (max_length or resolution) if text else resolution, gen)
        x = {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)
        y = y.to(device)  # (B,), or (B, H, W) for segmentation (the task's labels)
        if fake_mode is None:
            model.to(device)
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], hp)  # the run's (its state)
        res = profile_step(model, x, y, optimizer=optimizer)  # also the warm-up of the whole-step peak below
        peak = training_peak(model, x, y, model.criterion, optimizer, device)
    options = reported_options(net, hp)
    shape = {"max_length": max_length or resolution} if text else {"resolution": resolution}
    out = {"model": hp.backbone, "method": hp.method, "num_finetune": hp.num_finetune,
           "batch_size": batch_size, **shape, **options,
           "lean": method_info(hp.method).lean_default if hp.lean is None else bool(hp.lean), "device": str(device),
           "checkpointing": bool(hp.get("checkpointing")), "recompute": bool(hp.get("recompute")),
           "recomputed_segments": list(getattr(model, "recomputed", []))}
    if getattr(hp, "train_bn_affine", False):
        out["train_bn_affine"] = True
    if hp.get("frozen_micro_batch") is not None:  # asi_core.microbatch: what ran in micro-batches of that size
        out["frozen_micro_batch"] = hp.frozen_micro_batch
        out["micro_batched"] = {name: prefix for name, prefix in getattr(model, "micro_batched", [])}
    if hp.get("approx_activations"):  # asi_core.approx: the approximations of what exact ASI keeps
        out["approx_activations"] = True
        out["approximated_activations"] = len(getattr(model, "approximated", {}).get("approximated_activations", []))
    if hp.get("saved_bits") is not None:
        out["saved_bits"] = hp.saved_bits
    if text:
        out.update(lora=bool(hp.get("lora")) or hp.method == LoRA.name, shape_only=fake_mode is not None)
    keys = ("activation_mib", "measured_activation_mib", "measured_layers_mib", "measured_mask_mib",
            "forward_gflops", "backward_gflops", "overhead_gflops", "core_gflops", "input_grad_gflops",
            "train_gflops", "paper_gflops", "total_gflops", "measured_recompute_peak_mib")
    out.update({k: res[k] for k in keys})
    out["paper_flops"] = getattr(model, "paper_flops", "equations")  # how paper_gflops counted (ModelSpec)
    out["analytic_plus_mask_mib"] = res["activation_mib"] + res["measured_mask_mib"]
    out.update({k: peak[k] for k in PROFILE_PEAK_KEYS})
    layer_keys = ("name", "input_shape", "output_shape", "ranks", "memory_mib", "measured_mib", "forward_flops",
                  "backward_flops", "overhead_flops", "core_flops", "input_grad_flops", "paper_forward_flops",
                  "paper_backward_flops")
    out["layers"] = [{k: rep.get(k) for k in layer_keys} for rep in res["layers"]]
    return out
