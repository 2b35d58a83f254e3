"""asi_core: activation-compression training ops (vanilla, gradient filtering, HOSVD_ε, ASI) for
Conv2d and Linear layers, applied to any PyTorch model with one call::

    import asi_core
    names = asi_core.patch(model, "asi", num_finetune=4, ranks=2)
    ...train...
    asi_core.unpatch(model)

Plain PyTorch only (no Lightning, no data, no logging). See docs/asi_core_api.md.
"""
from .layers import CompressedConv2d, CompressedLayer, CompressedLinear
from .methods import METHODS as _METHOD_REGISTRY
from .methods import Method, NamesView, Option, get_method, register_method
from .lora import lora_layers, patch_lora
from .patch import candidate_layers, choose_layers, patch, patched_layers, plain_state_dict, unpatch
from .perplexity import choose_ranks


# the registered method names, a live tuple-like view: a method registered later appears at once
METHODS = NamesView(lambda: tuple(_METHOD_REGISTRY))

__all__ = ["patch", "unpatch", "plain_state_dict", "patched_layers", "candidate_layers", "choose_layers", "METHODS", "register_method", "get_method",
           "Method", "Option", "CompressedConv2d", "CompressedLinear", "CompressedLayer", "choose_ranks", "patch_lora",
           "lora_layers"]
