"""Latency benchmark (``python main.py benchmark``): times training steps of several methods on
random input in one process, interleaved (A B C D A B C D ...) after warm-up, and reports medians
and ratios to vanilla. With ``per_layer`` it also times, per fine-tuned layer, the weight-gradient
computation alone (exact for vanilla; from the kept compressed form for the others).

Everything here is measurement: no dataset, no pretrained weights.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn

import asi_core
from asi_core.methods import Vanilla

from .resources import resolve_device

__all__ = ["run_benchmark", "time_weight_gradients"]

BASELINE = Vanilla.name  # what the ratios and speed-ups are relative to (plain autograd: "ratios_to_vanilla")

VARIANTS = ("", "checkpointing", "recompute", "micro", "approx", "approx+recompute")  # METHOD or METHOD+VARIANT
MICRO_BATCH = 8  # "+micro": the frozen prefix in micro-batches of --model.frozen_micro_batch, or of this many
APPROX_BITS = 8  # "+approx": 2-bit activation derivatives, saved tensors in --model.saved_bits bits or this many


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def run_benchmark(build: Callable[[str], nn.Module], methods: Sequence[str], batch_size: int, resolution: int,
                  num_classes: int = 10, steps: int = 5, warmup: int = 1, per_layer: bool = False,
                  device: str | torch.device = "cpu", seed: int = 0,
                  progress: Optional[Callable[[str], None]] = None, loss_fn: Optional[Callable] = None,
                  make_batch: Optional[Callable[[], tuple]] = None) -> dict:
    """``build(method) -> nn.Module`` gives a patched network in training mode (BatchNorm handled
    by the caller); ``make_batch() -> (x, y)`` the random batch every method sees (after ``torch.manual_seed(seed)``;
    default: images of resolution x resolution and one of ``num_classes`` labels each). Returns {"methods": {name: {"forward_s", "backward_s", "optimizer_s", "step_s"}},
    "ratios_to_vanilla": {name: {"forward", "backward", "step"}} (time ratios; < 1 is faster),
    "speedup_vs_vanilla": {name: vanilla step / method step}, and with per_layer "per_layer"}."""
    device = torch.device(device)
    nets, opts = {}, {}
    for m in methods:
        net = build(m).to(device)
        nets[m] = net
        params = [p for p in net.parameters() if p.requires_grad]
        opts[m] = torch.optim.SGD(params, lr=1e-6, momentum=0.9)
    torch.manual_seed(seed)
    x, y = make_batch() if make_batch is not None else (torch.randn(batch_size, 3, resolution, resolution),
                                                         torch.randint(0, num_classes, (batch_size,)))
    x = {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)
    y = y.to(device)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    times = {m: {"forward_s": [], "backward_s": [], "optimizer_s": [], "step_s": []} for m in methods}
    for it in range(warmup + steps):
        for m in methods:  # interleaved: every method sees the same machine state on average
            net, opt = nets[m], opts[m]
            _sync(device)
            t0 = time.perf_counter()
            loss = loss_fn(net(x), y)
            _sync(device)
            t1 = time.perf_counter()
            loss.backward()
            _sync(device)
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            t3 = time.perf_counter()
            if it >= warmup:
                for key, val in (("forward_s", t1 - t0), ("backward_s", t2 - t1), ("optimizer_s", t3 - t2),
                                 ("step_s", t3 - t0)):
                    times[m][key].append(val)
            if progress is not None:
                progress(f"{'warm-up' if it < warmup else 'step'} {it + 1}/{warmup + steps} {m}: {t3 - t0:.3f}s")
    medians = {m: {k: _median(v) for k, v in t.items()} for m, t in times.items()}
    result = {"methods": medians}
    if BASELINE in medians:
        v = medians[BASELINE]
        result["ratios_to_vanilla"] = {m: {k: t[f"{k}_s"] / v[f"{k}_s"] for k in ("forward", "backward", "step")}
                                       for m, t in medians.items()}
        result["speedup_vs_vanilla"] = {m: v["step_s"] / t["step_s"] for m, t in medians.items()}
    if "vanilla+checkpointing" in medians:  # the baseline users pick for memory: who beats it, by how much
        c = medians["vanilla+checkpointing"]
        result["speedup_vs_checkpointing"] = {m: c["step_s"] / t["step_s"] for m, t in medians.items()}
    if per_layer:
        nets = {m: n for m, n in nets.items() if "+" not in m}  # the weight gradients do not depend on the variant
        result["per_layer"] = time_weight_gradients(nets, x, y, loss_fn, steps=steps, device=device)
    return result


def _capture(net, x, y, loss_fn):
    """Inputs and output gradients of every patched layer for one training step."""
    layers = asi_core.patched_layers(net)
    grabbed = {}
    handles = []
    for name, layer in layers:
        def hook(module, args, out, name=name):
            grabbed[name] = {"x": module.ops.prepare(args[0]).detach()}
            out.register_hook(lambda g: grabbed[name].__setitem__("g", g.detach().contiguous()))
        handles.append(layer.register_forward_hook(hook))
    loss_fn(net(x), y).backward()
    for h in handles:
        h.remove()
    net.zero_grad(set_to_none=True)
    return layers, grabbed


def _weight_grad_closure(layer, x, g) -> Callable[[], torch.Tensor]:
    """The weight-gradient computation of ``layer``'s method alone, on what the method keeps
    (``Method.weight_grad_closure``)."""
    with torch.no_grad():
        return layer.method.weight_grad_closure(layer.ops, x, g, layer.weight.shape)


def time_weight_gradients(nets: dict, x, y, loss_fn, steps: int = 5, device=torch.device("cpu")) -> dict:
    """Per fine-tuned layer and method: median seconds of the weight-gradient computation alone."""
    closures = {}
    for m, net in nets.items():
        layers, grabbed = _capture(net, x, y, loss_fn)
        closures[m] = {name: _weight_grad_closure(layer, grabbed[name]["x"], grabbed[name]["g"])
                       for name, layer in layers}
    names = list(next(iter(closures.values())))
    out = {name: {} for name in names}
    with torch.no_grad():
        for name in names:
            samples = {m: [] for m in closures}
            for it in range(steps + 1):
                for m in closures:
                    _sync(device)
                    t0 = time.perf_counter()
                    closures[m][name]()
                    _sync(device)
                    if it:
                        samples[m].append(time.perf_counter() - t0)
            out[name] = {m: {"weight_grad_s": _median(s)} for m, s in samples.items()}
            if BASELINE in samples:
                v = out[name][BASELINE]["weight_grad_s"]
                for m in samples:
                    out[name][m]["speedup_vs_vanilla"] = v / out[name][m]["weight_grad_s"]
    return out


COMPILED = "+compile"  # a method's name with this suffix: its network under torch.compile (--benchmark.compile)


def benchmark_models(model_args: dict, methods: Sequence[str], batch_size: int, resolution: int, steps: int = 5,
                     warmup: int = 1, per_layer: bool = False, device: str = "auto", progress: bool = True,
                     compile: bool = False) -> dict:
    """``main.py benchmark``: one ClassificationModel per method from the same --model arguments (random
    weights), timed by :func:`run_benchmark`. ``compile``: each method also as METHOD+compile, its network under
    ``torch.compile`` (compiled during the warm-up steps: give ``warmup`` >= 1). Returns the JSON object the
    command prints."""
    from .finetune import user_option_defaults
    from .model import MODEL_METHODS, ClassificationModel

    if compile and per_layer:
        raise ValueError("--benchmark.compile times whole steps; time the per-layer weight gradients "
                         "(--benchmark.per_layer) without it")
    if compile and warmup < 1:
        raise ValueError("--benchmark.compile needs --benchmark.warmup >= 1 (the first step compiles)")
    methods = [*methods, *(f"{m}{COMPILED}" for m in methods)] if compile else list(methods)
    base = [m[:-len(COMPILED)] if m.endswith(COMPILED) else m for m in methods]
    unknown = [m for m in base if m.partition("+")[0] not in MODEL_METHODS or m.partition("+")[2] not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown} in --benchmark.methods; valid: {list(MODEL_METHODS)}, each "
                         f"optionally with +checkpointing, +recompute, +micro, +approx or +approx+recompute (e.g. "
                         f"vanilla+checkpointing, asi+approx)")
    device = resolve_device(device, "--benchmark.device")
    args = {k: v for k, v in model_args.items() if k != "method"}
    args.update(pretrained=False, checkpoint=None)

    def build(name):
        if name.endswith(COMPILED):
            return torch.compile(build(name[:-len(COMPILED)]))
        method, _, variant = name.partition("+")  # "asi", "vanilla+checkpointing", "asi+micro", "asi+approx+recompute"
        approx = variant.startswith("approx")
        flags = {"checkpointing": variant == "checkpointing" or (not variant and bool(args.get("checkpointing"))),
                 "recompute": variant.endswith("recompute") or (not variant and bool(args.get("recompute"))),
                 "approx_activations": approx or bool(args.get("approx_activations")),
                 "saved_bits": (args.get("saved_bits") or APPROX_BITS) if approx else args.get("saved_bits"),
                 "frozen_micro_batch": (args.get("frozen_micro_batch") or MICRO_BATCH) if variant == "micro"
                 else args.get("frozen_micro_batch")}
        module = ClassificationModel(method=method, **{**args, **flags})
        module.train()  # set_bn_eval is applied by ClassificationModel.train
        first.setdefault("module", module)  # its loss (segmentation: mmseg's pixel loss) and its task's batches
        return module.net

    first: dict = {}

    say = (lambda msg: print(f"[benchmark] {msg}", flush=True)) if progress else None
    result = run_benchmark(build, list(methods), batch_size, resolution, num_classes=args.get("num_classes", 10),
                           steps=steps, warmup=warmup, per_layer=per_layer, device=device, progress=say,
                           loss_fn=lambda out, y: first["module"].criterion(out, y),
                           make_batch=lambda: first["module"].random_batch(batch_size, resolution))
    config = {"model": args.get("backbone"), "num_finetune": args.get("num_finetune"), "batch_size": batch_size,
              "resolution": resolution, "steps": steps, "warmup": warmup, "device": str(device), "compile": compile,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "options": {**{k: args.get(k) for k in user_option_defaults()}, "lean": args.get("lean")}}
    return {"config": config, **result}
