"""asi_core: activation-compression training ops (vanilla, gradient filtering, HOSVD_ε, ASI) for
Conv2d and Linear layers, applied to any PyTorch model with one call::

    import asi_core
    names = asi_core.patch(model, "asi", num_finetune=4, ranks=2)
    ...train...
    asi_core.unpatch(model)

Plain PyTorch only (no Lightning, no data, no logging). See docs/asi_core_api.md.
"""
from collections.abc import Sequence

from .layers import CompressedConv2d, CompressedLayer, CompressedLinear
from .methods import METHODS as _METHOD_REGISTRY
from .methods import Method, Option, get_method, register_method
from .patch import candidate_layers, choose_layers, patch, patched_layers, unpatch


class _MethodNames(Sequence):
    """The registered method names, in registration order, as a read-only tuple-like view of the registry: a
    method added later with ``@register_method`` appears here at once (the view is never frozen)."""

    def __getitem__(self, index):
        return tuple(_METHOD_REGISTRY)[index]

    def __len__(self) -> int:
        return len(_METHOD_REGISTRY)

    def __contains__(self, name) -> bool:
        return name in _METHOD_REGISTRY

    def __eq__(self, other) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, (Sequence, _MethodNames)) else other)

    def __hash__(self):
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))


METHODS = _MethodNames()

__all__ = ["patch", "unpatch", "patched_layers", "candidate_layers", "choose_layers", "METHODS", "register_method", "get_method",
           "Method", "Option", "CompressedConv2d", "CompressedLinear", "CompressedLayer"]
