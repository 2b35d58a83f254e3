"""Memory-lean backward for the layers *between* compressed convolutions (issue 7).

Once the convolutions of the fine-tuned region keep only a few KiB for backward (ASI,
paper §3), what PyTorch keeps for the other layers dominates:

* ``nn.BatchNorm2d`` keeps its full float input, even in eval mode with a frozen affine,
  where the layer is just ``y = x * scale + shift`` and its input gradient is
  ``grad * scale``: nothing about ``x`` is needed.
* ``nn.ReLU`` / ``nn.ReLU6`` / ``nn.Hardtanh`` / ``nn.LeakyReLU`` keep a full float tensor
  (the output or the input), although backward only needs to know, per element, whether
  the gradient passes: one bit.

This module provides drop-in replacements that keep exactly that and no more:

=====================  ====================================  ==================================
plain module           lean module                           saved for backward
=====================  ====================================  ==================================
``nn.BatchNorm2d``     :class:`LeanBatchNorm2d`              ``scale`` (C values); nothing when
                                                             training / affine trainable ->
                                                             exact plain ``F.batch_norm``
``nn.ReLU``            :class:`LeanReLU`                     1 bit per element (packed uint8)
``nn.ReLU6``           :class:`LeanReLU6`                    1 bit per element
``nn.Hardtanh``        :class:`LeanHardtanh`                 1 bit per element
``nn.LeakyReLU``       :class:`LeanLeakyReLU`                1 bit per element
``nn.Dropout``         :class:`LeanDropout`                  1 bit per element (the kept ones);
                                                             plain keeps a float (CPU) or bool
                                                             (CUDA) mask
=====================  ====================================  ==================================

Each lean class *subclasses* its plain class and only overrides ``forward``, so
:func:`make_lean` converts modules **in place** (``module.__class__ = Lean...``): the module
object, its Parameter and buffer objects, its hooks and its ``state_dict`` keys are all
unchanged, ``isinstance(m, nn.ReLU6)`` still holds, and :func:`unmake_lean` converts back.

Gradients are those of plain autograd: bit for bit for the activations (same boundary
convention: zero gradient at ``x == 0`` for ReLU, at ``x == 0`` and ``x == 6`` for ReLU6),
and up to float rounding of ``weight * invstd`` for BatchNorm: the masks follow the rules of
PyTorch's backward kernels (``threshold_backward``: zero where x <= 0; ``hardtanh_backward``: zero
where x <= min or x >= max; NaN passes), written as bool comparisons, and backward keeps the
gradient bit for bit where the mask passes and writes exact zeros elsewhere. (At NaN inputs
PyTorch's CPU ``hardtanh_backward`` disagrees with itself, vectorised part vs scalar tail;
there only, the lean ReLU6 may differ from plain.) Forward outputs are bit-identical to
the plain modules (the same PyTorch kernels compute them); :class:`LeanDropout` draws the
same random numbers as ``nn.Dropout`` (same kernels on a tensor of ones), so under one seed
its output and gradient are the plain ones too.

Scope / limits:

* Only *modules* are converted. Functional activations called inside a ``forward``
  (``F.relu(x)``, ``x.relu()``, ``torch.clamp``) are not modules and keep plain autograd;
  torchvision's ResNet ``BasicBlock``/``Bottleneck`` (``self.relu``) and MobileNetV2 /
  MCUNet (``nn.ReLU6`` modules) use modules and are fully covered.
* Only the exact plain types are converted (``type(m) is nn.BatchNorm2d``...), not user
  subclasses with their own ``forward``, nor ``SyncBatchNorm`` / ``FrozenBatchNorm2d``.
* ``inplace=True`` activations run out of place while a graph is recorded (the mask is
  taken from the input before the op); code that relies on the side effect instead of the
  returned value is not supported. Without grad (inference) they run exactly as plain,
  in place included.
* Double backward works (the masks / ``scale`` are constants of ``x``).
* Converting a whole model is safe: where no graph is recorded (``torch.no_grad()``, or
  an input that needs no gradient, as in the frozen part of a fine-tuned network) every
  lean module runs its plain ``forward`` (bit-identical output, in-place included), at the
  cost of one Python check per call.

:class:`SavedTensorMeter` measures what autograd keeps for backward ("measured activation
memory"), used by the accounting code and by the tests to check the bounds above.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterable

import torch
from torch._subclasses.fake_tensor import FakeTensor
import torch.nn.functional as F
from torch import nn

__all__ = [
    "pack_mask",
    "unpack_mask",
    "LeanBatchNorm2d",
    "LeanReLU",
    "LeanReLU6",
    "LeanHardtanh",
    "LeanLeakyReLU",
    "LeanDropout",
    "LEAN_OF",
    "make_lean",
    "unmake_lean",
    "SavedTensorMeter",
    "saved_tensor_bytes",
]


# --------------------------------------------------------------------------- bit masks
# Packing works on 8 mask bytes at a time viewed as one little-endian int64 (byte i = bit
# 8i): three shift-or steps gather the 8 bits into the low byte. Vectorised, any device,
# ~4x faster on CPU than multiplying by [1, 2, ..., 128] and summing.
if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("asi_core.lean packs masks through int64 views: little-endian only")


def pack_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    """Pack a bool tensor into 1 bit per element: ``(uint8 tensor of ceil(numel/8), shape)``.

    Elements are taken in logical (row-major) order; element ``i`` is bit ``i % 8`` (LSB
    first) of byte ``i // 8``.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_mask expects a bool tensor, got {mask.dtype}; pass e.g. `x > 0`")
    flat = mask.reshape(-1).view(torch.uint8)  # bool -> uint8: free reinterpretation (0/1)
    pad = (-flat.numel()) % 8
    if pad or flat.storage_offset() % 8:  # int64 view needs whole, aligned words
        flat = torch.cat([flat, flat.new_zeros(pad)])
    v = flat.view(torch.int64)  # values < 2**57: shifts never touch the sign bit
    v = v | (v >> 7)  # byte j: bits 0-1 = elements 8k+j, j+1
    v = v | (v >> 14)  # bits 0-3
    v = v | (v >> 28)  # bits 0-7 in byte 0
    return (v & 0xFF).to(torch.uint8), mask.shape


def unpack_mask(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a contiguous bool tensor of ``shape``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_mask expects the uint8 tensor from pack_mask, got {packed.dtype}")
    shape = torch.Size(shape)
    numel = shape.numel()
    if packed.numel() != (numel + 7) // 8:
        raise ValueError(
            f"unpack_mask: {packed.numel()} bytes cannot hold shape {tuple(shape)} "
            f"({numel} elements need {(numel + 7) // 8} bytes); pass the shape pack_mask returned"
        )
    v = packed.reshape(-1).to(torch.int64)  # the three steps of pack_mask, reversed
    v = (v | (v << 28)) & 0x0000000F0000000F
    v = (v | (v << 14)) & 0x0003000300030003
    v = (v | (v << 7)) & 0x0101010101010101
    return v.view(torch.uint8).view(torch.bool)[:numel].view(shape)


def _pack_in_memory_order(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Size, list[int]]:
    """Pack ``mask`` in the order of its memory layout (no copy for channels_last etc.).

    Returns the packed bits, the permuted shape and the permutation; :func:`_unpack_layout`
    restores a mask with the same logical shape *and* the same strides, so that the
    gradient keeps the input's memory format.
    """
    perm = sorted(range(mask.dim()), key=lambda d: -mask.stride(d))
    permuted = mask.permute(perm)
    if not permuted.is_contiguous():  # overlapping / unusual strides: logical order
        perm, permuted = list(range(mask.dim())), mask
    packed, shape = pack_mask(permuted)
    return packed, shape, perm


def _unpack_layout(
    packed: torch.Tensor, shape: torch.Size, perm: list[int], dtype: torch.dtype = torch.bool
) -> torch.Tensor:
    """Inverse of :func:`_pack_in_memory_order`, as 0/1 values of ``dtype``."""
    inverse = sorted(range(len(perm)), key=lambda d: perm[d])
    mask = unpack_mask(packed, shape)
    if dtype != torch.bool:
        mask = mask.view(torch.uint8).to(dtype)  # uint8 -> float is the fast conversion
    return mask.permute(inverse)


# --------------------------------------------------------------- activations (bit mask)
# The "passes" masks are the boundary rules of PyTorch's own backward kernels written as bool
# comparisons (the tests check them bit for bit against autograd, boundaries and NaN included);
# backward is torch.where(mask, g, 0): exact zeros, g bit for bit.
_aten = torch.ops.aten


def _relu_passes(x: torch.Tensor) -> torch.Tensor:
    # threshold_backward's rule: zero where x <= 0, passed elsewhere (NaN passes). Comparisons to bool
    # directly: 3x cheaper than running the backward kernel on a ones tensor and converting.
    return (x <= 0).logical_not_()


def _hardtanh_passes(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    # hardtanh_backward's rule: zero where x <= lo or x >= hi (both boundaries), passed elsewhere.
    return (x <= lo).logical_or_(x >= hi).logical_not_()


def _masked_backward(grad: torch.Tensor, passes: torch.Tensor, _) -> torch.Tensor:
    return torch.where(passes, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


def _leaky_relu_passes(x: torch.Tensor) -> torch.Tensor:
    return x > 0


def _leaky_relu_backward(grad: torch.Tensor, passes: torch.Tensor, slope: float) -> torch.Tensor:
    return _aten.leaky_relu_backward(grad, passes.to(grad.dtype), slope, False)  # passes ? g : g * slope


class _MaskedActivation(torch.autograd.Function):
    """``y = forward_fn(x)``; saves only the packed ``passes_fn(x)`` mask (ceil(numel/8)
    bytes, via ``save_for_backward`` so :class:`SavedTensorMeter` sees it); backward
    ``backward_fn(grad, mask as bool, arg)``."""

    @staticmethod
    def forward(ctx, x, forward_fn: Callable, passes_fn: Callable, backward_fn: Callable, arg):
        y = forward_fn(x)
        ctx.backward_fn, ctx.arg = backward_fn, arg
        if ctx.needs_input_grad[0]:
            packed, ctx.mask_shape, ctx.mask_perm = _pack_in_memory_order(passes_fn(x))
            ctx.save_for_backward(packed)
        return y

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        passes = _unpack_layout(packed, ctx.mask_shape, ctx.mask_perm, torch.bool)
        return ctx.backward_fn(grad, passes, ctx.arg), None, None, None, None


def _needs_graph(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


class LeanReLU(nn.ReLU):
    """``nn.ReLU`` saving a 1-bit mask. Gradient as PyTorch's ``threshold_backward``:
    zero where ``x <= 0`` (so at ``x == 0``), passed elsewhere (NaN included)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_graph(x):
            return super().forward(x)
        return _MaskedActivation.apply(x, torch.relu, _relu_passes, _masked_backward, None)


def _lean_hardtanh_forward(self: nn.Hardtanh, x: torch.Tensor) -> torch.Tensor:
    if not _needs_graph(x):
        return nn.Hardtanh.forward(self, x)
    lo, hi = self.min_val, self.max_val
    return _MaskedActivation.apply(
        x,
        lambda t: F.hardtanh(t, lo, hi),
        lambda t: _hardtanh_passes(t, lo, hi),
        _masked_backward,
        None,
    )


class LeanHardtanh(nn.Hardtanh):
    """``nn.Hardtanh`` saving a 1-bit mask. Gradient as PyTorch's ``hardtanh_backward``:
    zero where ``x <= min_val`` or ``x >= max_val`` (both boundaries), passed elsewhere."""

    forward = _lean_hardtanh_forward


class LeanReLU6(nn.ReLU6):
    """``nn.ReLU6`` (= Hardtanh(0, 6)) saving a 1-bit mask: gradient zero at 0 and 6."""

    forward = _lean_hardtanh_forward


class LeanLeakyReLU(nn.LeakyReLU):
    """``nn.LeakyReLU`` saving a 1-bit mask: ``grad`` where ``x > 0`` else
    ``grad * negative_slope`` (PyTorch's ``leaky_relu_backward``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_graph(x):
            return super().forward(x)
        slope = self.negative_slope
        return _MaskedActivation.apply(
            x, lambda t: F.leaky_relu(t, slope), _leaky_relu_passes, _leaky_relu_backward, slope
        )


# ------------------------------------------------------------------------ dropout
def _fused_dropout(x: torch.Tensor) -> bool:
    # at::dropout's is_fused_kernel_acceptable (0 < p < 1 and numel > 0 are checked by the caller):
    # these devices run native_dropout (a bool mask), the others input * (bernoulli noise / (1 - p)).
    return x.device.type in ("cuda", "xpu", "lazy", "privateuseone")


class _Dropout(torch.autograd.Function):
    """Training-mode dropout, ``0 < p < 1``, drawing exactly what ``F.dropout(x, p, True,
    inplace)`` draws; saves only the packed "kept" mask. Where PyTorch runs ``native_dropout``
    (CUDA, not in place) this *is* ``native_dropout`` and its backward; elsewhere PyTorch computes
    ``x * noise`` with ``noise = bernoulli(1 - p) / (1 - p)``, and so does this, ``noise`` being
    ``F.dropout`` of a tensor of ones (same shape, layout and draws); backward ``grad * noise``
    with ``noise`` rebuilt from the mask and the one nonzero value of ``noise``."""

    @staticmethod
    def forward(ctx, x, p: float, inplace: bool):
        ctx.p, ctx.scale = p, None
        if not inplace and _fused_dropout(x):
            y, keep = _aten.native_dropout(x, p, True)
        else:
            noise = F.dropout(torch.ones_like(x), p, True, inplace)
            y, keep = x * noise, noise != 0
            ctx.scale = noise.amax()  # 1/(1-p) exactly as PyTorch rounded it (0 if nothing kept)
        packed, ctx.mask_shape, ctx.mask_perm = _pack_in_memory_order(keep)
        ctx.save_for_backward(packed)
        return y

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        if ctx.scale is None:
            keep = _unpack_layout(packed, ctx.mask_shape, ctx.mask_perm)
            return _aten.native_dropout_backward(grad, keep, 1.0 / (1.0 - ctx.p)), None, None
        keep = _unpack_layout(packed, ctx.mask_shape, ctx.mask_perm, grad.dtype)
        return grad * (keep * ctx.scale.to(grad.dtype)), None, None


class LeanDropout(nn.Dropout):
    """``nn.Dropout`` saving a 1-bit mask of the kept elements instead of a float (CPU) or bool
    (CUDA) one. Same random draws, output and gradient as the plain module under one seed.
    ``inplace=True`` runs out of place while a graph is recorded (as the lean activations);
    eval mode, ``p`` of 0 or 1, or no graph: exactly ``nn.Dropout.forward``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and 0 < self.p < 1 and x.numel() and _needs_graph(x)):
            return super().forward(x)
        return _Dropout.apply(x, self.p, self.inplace)


# ------------------------------------------------------------------ frozen BatchNorm
class _FrozenAffine(torch.autograd.Function):
    """Eval-mode BatchNorm with frozen affine: forward by ``F.batch_norm`` (bit-identical
    to the plain module), backward ``grad * scale`` with ``scale = weight / sqrt(var + eps)``.
    Saves only ``scale`` (C values), no activation."""

    @staticmethod
    def forward(ctx, x, scale, bn_args: tuple):
        ctx.save_for_backward(scale)
        return F.batch_norm(x, *bn_args)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        view = scale.view(1, -1, *([1] * (grad.dim() - 2)))
        return (grad * view).to(grad.dtype), None, None


class LeanBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that saves no activation when it is a frozen affine map.

    Lean path when the layer uses its running statistics (eval mode with
    ``track_running_stats``) and its ``weight``/``bias`` (if any) do not require grad:
    ``scale = weight / sqrt(running_var + eps)`` is computed from the *current* buffers at
    every forward (checkpoints loaded later are respected) and is all that is saved.
    Otherwise (train mode, batch statistics, trainable affine, or no grad recorded) this
    is exactly ``nn.BatchNorm2d.forward``.
    """

    def _is_frozen_affine(self) -> bool:
        uses_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        trainable = any(p is not None and p.requires_grad for p in (self.weight, self.bias))
        return not uses_batch_stats and not trainable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (_needs_graph(x) and self._is_frozen_affine()):
            return super().forward(x)
        self._check_input_dim(x)
        with torch.no_grad():
            scale = torch.rsqrt(self.running_var + self.eps)
            if self.weight is not None:
                scale = scale * self.weight
        bn_args = (self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return _FrozenAffine.apply(x, scale, bn_args)


# --------------------------------------------------------------- model conversion
LEAN_OF: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm2d: LeanBatchNorm2d,
    nn.ReLU: LeanReLU,
    nn.ReLU6: LeanReLU6,
    nn.Hardtanh: LeanHardtanh,
    nn.LeakyReLU: LeanLeakyReLU,
    nn.Dropout: LeanDropout,
}
_PLAIN_OF = {lean: plain for plain, lean in LEAN_OF.items()}


def make_lean(model: nn.Module, start_name: str | None = None) -> list[str]:
    """Convert, in place, every plain BatchNorm2d / ReLU / ReLU6 / Hardtanh / LeakyReLU / Dropout
    module registered at or after ``start_name`` to its lean counterpart.

    Order is ``model.named_modules()`` registration order; ``start_name`` is the first
    fine-tuned layer (it and everything registered after it, its own children included,
    are converted); ``None`` converts the whole model. Modules registered before it stay
    plain even if ``forward`` calls them later (a ResNet ``BasicBlock``'s one ``relu``, called
    after the residual add too): ``asi_core.patch`` therefore converts the whole model, which
    is safe because a lean module is the plain one wherever its input needs no gradient.
    Conversion swaps the module's class only:
    same object, same Parameters/buffers, same ``state_dict`` keys. Idempotent.

    Returns the names of the lean modules in that region (converted now or already lean).
    """
    names = [name for name, _ in model.named_modules()]
    if start_name is not None and start_name not in names:
        raise ValueError(
            f"make_lean: the model has no module named {start_name!r}; pass the name of the "
            f"first fine-tuned layer as listed by model.named_modules() "
            f"(e.g. {names[1:4]}), or None to convert the whole model"
        )
    active = start_name is None
    converted = []
    for name, module in model.named_modules():
        active = active or name == start_name
        if active and type(module) in LEAN_OF:
            module.__class__ = LEAN_OF[type(module)]
        if active and type(module) in _PLAIN_OF:
            converted.append(name)
    return converted


def unmake_lean(model: nn.Module) -> list[str]:
    """Convert every lean module of ``model`` back to its plain class (in place, same
    Parameters and buffers). Returns the names of the converted modules."""
    restored = []
    for name, module in model.named_modules():
        if type(module) in _PLAIN_OF:
            module.__class__ = _PLAIN_OF[type(module)]
            restored.append(name)
    return restored


# --------------------------------------------------------------- measurement
def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    storage = t.untyped_storage()
    if t.is_meta or isinstance(t, FakeTensor):  # shape-only execution (profile of a 1.1B LLM): no data pointer,
        return "shape-only", storage._cdata        # the storage object itself identifies the allocation
    return str(t.device), storage.data_ptr()


def _storage_nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


class SavedTensorMeter:
    """Measure the memory autograd keeps for backward: "measured activation memory".

    Usage::

        with SavedTensorMeter(exclude=[model]) as meter:
            loss = model(x).sum()          # graph recorded inside the context
        meter.bytes                        # bytes saved for backward
        loss.backward()

    Every tensor autograd saves while the context is active (built-in ops and custom
    Functions' ``ctx.save_for_backward``) goes through a
    ``torch.autograd.graph.saved_tensors_hooks`` pack hook, which records it and returns
    it unchanged (as ``t.detach()``: same storage, same values, no copy; see ``_pack``),
    so gradients and memory are untouched:

    * Memory is counted per **storage**, keyed by ``(device, untyped_storage().data_ptr())``,
      with ``untyped_storage().nbytes()`` bytes: a view (a slice, a transpose, ``x`` saved by
      two ops) is counted once, for the whole storage it keeps alive, not for its
      ``numel()``.
    * Not counted: ``nn.Parameter`` objects and views of them (weights, frozen or not), and
      every tensor sharing a storage with something in ``exclude`` (tensors, or modules
      standing for all their parameters and buffers: pass the model to exclude e.g. the
      BatchNorm running statistics plain autograd saves).
    * A storage whose saved tensors all died before its address was reused by a new saved
      storage is counted again (both were kept, at different times).

    Attributes / properties:
      ``bytes``: total bytes of distinct storages saved inside the context (the figure to
        report; equals the bytes held by the graph while it is alive).
      ``live_bytes``: bytes of those storages still held by a graph now (0 once every
        graph recorded inside was freed, e.g. by ``backward()``), whoever else holds them.
      ``records``: one dict per saved tensor (``shape``, ``dtype``, ``nbytes`` counted for
        it, 0 when excluded or already counted, ``excluded``) for debugging.

    Limits: only what goes through autograd's saved-tensor mechanism is seen; tensors a
    custom Function stores as plain ``ctx`` attributes are invisible (use
    ``save_for_backward``). Saved-tensor hooks are a thread-local stack: an inner
    ``saved_tensors_hooks`` (e.g. activation offloading) hides the tensors from the meter.
    """

    def __init__(self, exclude: Iterable[torch.Tensor | nn.Module] = ()):
        self._excluded: set[tuple[str, int]] = set()
        for item in exclude:
            tensors = (
                [*item.parameters(), *item.buffers()] if isinstance(item, nn.Module) else [item]
            )
            self._excluded.update(_storage_key(t) for t in tensors if t.numel() > 0)
        self.bytes = 0
        self.records: list[dict] = []
        self._storages: dict[tuple[str, int], tuple[int, list[weakref.ref]]] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _is_excluded(self, t: torch.Tensor, key: tuple[str, int]) -> bool:
        return (
            isinstance(t, nn.Parameter)
            or isinstance(t._base, nn.Parameter)
            or key in self._excluded
        )

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        # Hand autograd a detached alias (same storage and data, no grad_fn): keeping `t`
        # itself would, for a saved *output*, make an uncollectable cycle output -> grad_fn
        # -> SavedVariable -> output whenever the graph is not freed by a backward (PyTorch
        # docs on saved_tensors_hooks). Autograd re-attaches the grad_fn on unpack. The alias
        # is owned by the graph alone, so its weakref tells whether the graph still holds it.
        saved = t.detach()
        try:
            key, storage_nbytes = _storage_key(t), _storage_nbytes(t)
        except (RuntimeError, NotImplementedError):  # no plain storage (sparse, wrapper subclass)
            key, storage_nbytes = ("tensor", id(saved)), t.numel() * t.element_size()
        nbytes, excluded = 0, self._is_excluded(t, key)
        if not excluded:
            entry = self._storages.get(key)
            if entry is not None and any(ref() is not None for ref in entry[1]):
                entry[1].append(weakref.ref(saved))  # same storage still held: counted
            else:  # new storage (or freed memory reused by a new one)
                nbytes = storage_nbytes
                self._storages[key] = (nbytes, [weakref.ref(saved)])
                self.bytes += nbytes
        self.records.append(  # storage / storage_nbytes: to sum bytes per region, each storage once
            {"shape": tuple(t.shape), "dtype": t.dtype, "nbytes": nbytes, "excluded": excluded,
             "storage": key, "storage_nbytes": storage_nbytes}
        )
        return saved

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def live_bytes(self) -> int:
        return sum(
            nbytes
            for nbytes, refs in self._storages.values()
            if any(ref() is not None for ref in refs)
        )

    @property
    def mib(self) -> float:
        return self.bytes / 2**20

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def saved_tensor_bytes(
    fn: Callable, *args, exclude: Iterable[torch.Tensor | nn.Module] = (), **kwargs
) -> int:
    """Bytes autograd saves for backward while running ``fn(*args, **kwargs)``
    (see :class:`SavedTensorMeter`; ``fn``'s own parameters are excluded only if ``fn`` is
    an ``nn.Module`` or they are passed in ``exclude``)."""
    exclude = [*exclude, fn] if isinstance(fn, nn.Module) else list(exclude)
    with SavedTensorMeter(exclude=exclude) as meter:
        out = fn(*args, **kwargs)  # keeps the graph alive until measured
    del out
    return meter.bytes
