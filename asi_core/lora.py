"""ASI on the LoRA adapters of a ``peft`` model, in one call (plain PyTorch: peft's module names are read, peft itself
is never imported).

LoRA keeps, per adapted linear, the input of its ``lora_A`` linear for backward (x, or dropout(x)): the activation
ASI compresses. peft names those linears ``<target>.lora_A.<adapter>`` (an ``nn.Linear`` in a ``ModuleDict``) and
the frozen original ``<target>.base_layer``; :func:`lora_layers` finds them and :func:`patch_lora` wraps them::

    model = peft.get_peft_model(model, LoraConfig(task_type="SEQ_CLS", target_modules=["gate_proj", "up_proj",
                                                                                       "down_proj"]))
    asi_core.patch_lora(model, "asi", ranks=8)              # every lora_A input, rank 8 on every mode
    asi_core.patch_lora(model, "asi", num_finetune=6, budget_mib=2.0, batches=few_batches)   # ranks under a budget

Unlike :func:`asi_core.patch`, nothing is frozen or unfrozen: peft already decided what trains (the adapters, the
``modules_to_save``), and an adapter that is not patched trains as before, keeping its input whole.

Ranks under a budget (``budget_mib``) come from the perplexity of the **base** linears (``base_layer``), measured on
the user's ``batches``: a fresh adapter's ``lora_B`` is zero, so the gradient of every ``lora_A`` is zero and its
perplexity says nothing, while the base linear reads the same input (before LoRA's dropout), whose HOSVD ranks and
memory (eq. 5) are the same, and whose weight gradient shows what compressing that input loses.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Optional, Sequence, Union

from torch import nn

from .patch import patch, patched_layers
from .perplexity import PAPER_EPSILONS, choose_ranks

__all__ = ["lora_layers", "lora_base_layer", "patch_lora"]

_LORA_A = re.compile(r"^(?P<target>.+)\.lora_A\.(?P<adapter>[^.]+)$")


def lora_layers(model: nn.Module, adapter: Optional[str] = None) -> list[str]:
    """Qualified names of the ``lora_A`` linears of ``model`` (of ``adapter`` only, when given), in registration
    order. ValueError when there are none, saying how to add them."""
    found, adapters, other = [], set(), []
    for name, module in model.named_modules():
        m = _LORA_A.match(name)
        if m and isinstance(module, nn.Linear):
            adapters.add(m["adapter"])
            if adapter is None or m["adapter"] == adapter:
                found.append(name)
        elif m and not isinstance(module, nn.ModuleDict):
            other.append(f"{name} ({type(module).__name__})")
    if not found and other:
        raise ValueError(f"the model's LoRA adapters are not on linear layers ({', '.join(other[:3])}): ASI compresses "
                         f"the inputs of lora_A linears; target linear layers in the LoraConfig")
    if not found:
        if adapters:
            raise ValueError(f"the model has no LoRA adapter named {adapter!r}; its adapters: {sorted(adapters)}")
        raise ValueError("the model has no LoRA adapters (no nn.Linear named '<layer>.lora_A.<adapter>'): add them "
                         "first, e.g. model = peft.get_peft_model(model, peft.LoraConfig(target_modules=[...]))")
    if adapter is None and len(adapters) > 1:
        raise ValueError(f"the model has several LoRA adapters {sorted(adapters)}: name the one to compress "
                         f"(adapter=...)")
    return found


def lora_base_layer(model: nn.Module, lora_a: str) -> str:
    """The frozen linear that reads the same input as the ``lora_A`` linear ``lora_a`` (peft's ``base_layer``)."""
    m = _LORA_A.match(lora_a)
    if m is None:
        raise ValueError(f"{lora_a!r} is not a lora_A linear name ('<layer>.lora_A.<adapter>')")
    modules = dict(model.named_modules())
    for base in (f"{m['target']}.base_layer", m["target"]):
        if isinstance(modules.get(base), nn.Linear):
            return base
    raise ValueError(f"no base linear found for {lora_a!r} (expected {m['target']}.base_layer)")


def patch_lora(model: nn.Module, method: str = "asi", num_finetune: Union[int, str] = "all",
               adapter: Optional[str] = None, budget_mib: Union[float, str, None] = None,
               batches: Optional[Iterable] = None, loss_fn: Optional[Callable] = None,
               epsilons: Sequence[float] = PAPER_EPSILONS, lean: Optional[bool] = None,
               **options) -> list[str]:
    """Compress the inputs of the last ``num_finetune`` (an int or "all") ``lora_A`` linears of ``model`` with
    ``method`` (:func:`asi_core.patch`'s methods and options, e.g. ``ranks=8``). With ``budget_mib`` (MiB, "min", or
    "hosvd@<eps>") the ranks are chosen under that activation budget from the perplexity measured on ``batches``
    (see :func:`asi_core.choose_ranks` for ``batches`` and ``loss_fn``; the base linears are measured, module
    docstring). Trainable flags are left as peft set them. Returns the patched names."""
    if patched_layers(model):
        raise ValueError("model is already patched; call asi_core.unpatch(model) first")
    names = lora_layers(model, adapter)
    if num_finetune != "all":
        if isinstance(num_finetune, bool) or not isinstance(num_finetune, int) or num_finetune < 1:
            raise ValueError(f"num_finetune must be an integer >= 1 or 'all', got {num_finetune!r}")
        if num_finetune > len(names):
            raise ValueError(f"num_finetune={num_finetune} is larger than the number of lora_A linears ({len(names)})")
        names = names[-num_finetune:]
    if budget_mib is not None:
        if "ranks" in options:
            raise ValueError("give ranks or budget_mib, not both")
        if batches is None:
            raise ValueError("budget_mib needs batches: a few of your training batches to measure the perplexity on")
        choice = choose_ranks(model, batches, budget_mib, loss_fn=loss_fn, layers=names, layer_type="linear",
                              epsilons=epsilons, measure_on={n: lora_base_layer(model, n) for n in names})
        options["ranks"] = choice["ranks"]
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    out = patch(model, method, layers=names, layer_type="linear", lean=lean, **options)
    for p in model.parameters():  # peft's choice of what trains, untouched (patch froze what precedes the first)
        p.requires_grad_(trainable.get(id(p), p.requires_grad))
    return out
