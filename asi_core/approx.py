"""Approximate, opt-in compression of what exact ASI cannot drop (issue 21).

ASI compresses the inputs of the fine-tuned linears and convolutions (paper §3). What autograd keeps *between* them
stays: a GELU's or SiLU's input (4C wide in a transformer MLP), the gating product's factors, the norms' inputs,
attention's q, k, v and scores, a trainable BatchNorm's input (docs/peak_memory.md itemises it). An exact backward
needs them. Two approximations, each off by default, each usable alone or together, with any method, with
recompute/checkpointing and with LoRA:

1. **Activation derivatives in 2 bits** (:func:`approximate_activations`, Approx-BP's idea, our derivation). The
   forward stays exact; backward multiplies the gradient by a piecewise-constant derivative ``levels[k]`` on four
   intervals of the input cut at ``thresholds``, so only the interval index is kept: 2 bits per element instead of
   32. The table of a function ``f`` (:data:`GELU_2BIT`, :data:`SILU_2BIT`) minimises ``∫ (f'(z) - d(z))^2 dz``
   over the real line with the outer levels fixed at the limits 0 and 1; for fixed thresholds the inner levels
   that minimise it are the secant slopes ``(f(t_k) - f(t_{k-1})) / (t_k - t_{k-1})`` (the mean of ``f'`` over the
   interval), and the thresholds were found numerically (scipy, tests/test_approx.py re-derives them). The same
   machinery with ReLU's table (:data:`RELU_1BIT`) is exactly ReLU's backward (the test of the code path).
2. **The region's other saved tensors in 8, 4 or 2 bits** (:class:`SavedCompressor`, :func:`compress_saved`: GACT /
   Mesa style, through ``torch.autograd.graph.saved_tensors_hooks``). Every floating-point tensor autograd saves
   inside the model's forward is stored as unsigned integer codes over groups of ``group`` consecutive elements,
   each group with its own minimum and step (round to nearest, deterministic: no random state is drawn, so a resumed
   run replays the same codes). A group's two extreme values are restored exactly (a mask of 0 and the dtype's
   minimum stays exact), a constant group is exact. Not compressed: the model's parameters and buffers (and views
   of them), integer and bool tensors (bit masks, indices), tensors smaller than ``min_numel`` elements, tensors
   holding inf or NaN, and what ASI's own Functions keep (its Tucker core and factors: :func:`keep_exact`). A
   tensor saved twice is compressed once.

What is measured where: ``main.py profile`` reports ``measured_activation_mib`` (what autograd keeps, after this
compression) and the whole-step peak; docs/approximate.md has the table and the accuracy over seeds.

Nesting with other saved-tensor hooks: the compressor hands its codes to the hooks that were active when it was
entered (a memory meter, activation offloading), so an outer meter measures what is really kept; hooks entered
inside it (``torch.utils.checkpoint``'s) take precedence there, as PyTorch's stack does.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from .lean import _storage_key  # one notion of "the same memory" with the meters

__all__ = ["DerivativeTable", "GELU_2BIT", "GELU_TANH_2BIT", "SILU_2BIT", "RELU_1BIT", "step_derivative",
           "register_activation", "approximate_activations", "restore_activations", "pack_codes", "unpack_codes",
           "quantize", "dequantize", "SavedCompressor", "keep_exact", "compress_saved", "uncompress_saved",
           "SAVED_BITS"]

SAVED_BITS = (8, 4, 2)


# --------------------------------------------------------------------------- k-bit codes
def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat uint8 tensor of codes < 2**bits (``bits`` in 1, 2, 4, 8; length a multiple of 8 // bits) into
    ``len * bits / 8`` bytes: code ``i`` sits at bits ``bits * (i % per_byte)`` of byte ``i // per_byte``."""
    if bits == 8:
        return codes
    per = 8 // bits
    c = codes.view(-1, per)
    out = c[:, 0].clone()
    for i in range(1, per):
        out |= c[:, i] << (bits * i)
    return out


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the flat uint8 codes (length ``len(packed) * 8 // bits``)."""
    if bits == 8:
        return packed
    per, mask = 8 // bits, (1 << bits) - 1
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & mask).reshape(-1)


def _padded(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-flat.numel()) % multiple
    return torch.cat([flat, flat.new_zeros(pad)]) if pad else flat


# --------------------------------------------------------------------------- 1. activation derivatives
@dataclass(frozen=True)
class DerivativeTable:
    """A piecewise-constant derivative: ``levels[k]`` where ``thresholds[k-1] < x <= thresholds[k]`` (``levels``
    has one more entry than ``thresholds``); kept as ``bits`` per element."""
    name: str
    thresholds: tuple[float, ...]
    levels: tuple[float, ...]

    def __post_init__(self):
        if len(self.levels) != len(self.thresholds) + 1 or list(self.thresholds) != sorted(self.thresholds):
            raise ValueError(f"{self.name}: need increasing thresholds and one level more than thresholds")

    @property
    def bits(self) -> int:
        need = max(1, math.ceil(math.log2(len(self.levels))))
        return next(b for b in (1, 2, 4, 8) if b >= need)

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """The table's derivative at ``x`` (float32): what backward multiplies the gradient by."""
        codes = torch.bucketize(x, torch.tensor(self.thresholds, dtype=x.dtype, device=x.device))
        return torch.tensor(self.levels, dtype=torch.float32, device=x.device)[codes]


# Minimisers of ∫ (f'(z) - d(z))^2 dz (module docstring); f'(z) - 1/2 is odd for all three, hence the symmetry.
GELU_2BIT = DerivativeTable("gelu", (-0.45201281, 0.0, 0.45201281), (0.0, 0.32562987, 0.67437012, 1.0))
GELU_TANH_2BIT = DerivativeTable("gelu_tanh", (-0.45219365, 0.0, 0.45219365), (0.0, 0.32559108, 0.67440892, 1.0))
SILU_2BIT = DerivativeTable("silu", (-0.73883504, 0.0, 0.73883504), (0.0, 0.32325894, 0.67674106, 1.0))
RELU_1BIT = DerivativeTable("relu", (0.0,), (0.0, 1.0))  # exactly ReLU's backward (zero gradient at x <= 0)


CHUNK = 1 << 22  # elements per chunk of the code and quantisation loops: their temporaries stay a few MiB


def _interval_codes(x: torch.Tensor, thresholds: tuple[float, ...]) -> torch.Tensor:
    """uint8 index of the interval of each element (the number of thresholds below it), from bool comparisons: one
    byte per element of temporaries (``torch.bucketize`` would make int64 ones, twice a float32 input's size)."""
    codes = (x > thresholds[0]).to(torch.uint8)
    for t in thresholds[1:]:
        codes += x > t
    return codes


class _StepDerivative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn: Callable, table: DerivativeTable):
        flat = x.detach().reshape(-1)
        per = 8 // table.bits
        n = flat.numel()
        packed = flat.new_empty(((n + per - 1) // per,), dtype=torch.uint8)
        step = CHUNK - CHUNK % per
        for start in range(0, n, step):
            codes = _interval_codes(flat[start:start + step], table.thresholds)
            packed[start // per:(start + codes.numel() + per - 1) // per] = pack_codes(_padded(codes, per), table.bits)
        ctx.table, ctx.shape, ctx.numel = table, x.shape, n
        ctx.save_for_backward(packed)
        return fn(x)  # after the codes: an in-place activation may overwrite x

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        table, per = ctx.table, 8 // ctx.table.bits
        levels = torch.tensor(table.levels, dtype=grad.dtype, device=grad.device)
        if torch.is_grad_enabled():  # create_graph: a differentiable product (out= is not)
            codes = unpack_codes(packed, table.bits)[:ctx.numel].view(ctx.shape)
            return grad * levels[codes.int()], None, None
        flat = grad.contiguous().view(-1)
        out = torch.empty_like(flat)
        step = CHUNK - CHUNK % per
        for start in range(0, ctx.numel, step):
            g = flat[start:start + step]
            codes = unpack_codes(packed[start // per:(start + g.numel() + per - 1) // per], table.bits)[:g.numel()]
            torch.mul(g, levels[codes.int()], out=out[start:start + g.numel()])
        return out.view(ctx.shape), None, None


def step_derivative(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], table: DerivativeTable):
    """``fn(x)`` exactly; backward multiplies the gradient by ``table``'s derivative at ``x``, keeping only the
    interval index of each element (``table.bits`` bits). Without a graph to record it is ``fn(x)`` itself."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return fn(x)
    return _StepDerivative.apply(x, fn, table)


# activation class -> its table for a module (nn.GELU's depends on ``approximate``); register_activation adds more
_TABLES: dict[type, Callable[[nn.Module], DerivativeTable]] = {
    nn.GELU: lambda m: GELU_TANH_2BIT if getattr(m, "approximate", "none") == "tanh" else GELU_2BIT,
    nn.SiLU: lambda m: SILU_2BIT,
}
_APPROX_CLASSES: dict[type, type] = {}


def register_activation(cls: type, table: Callable[[nn.Module], DerivativeTable]) -> None:
    """Let :func:`approximate_activations` convert modules of class ``cls`` (an activation module whose
    ``forward(x)`` computes ``f(x)`` elementwise): ``table(module)`` is the derivative table of ``f``. A library's
    own activation classes (Hugging Face's ``SiLUActivation``) are registered by the code that uses them."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_activation: {cls!r} is not an nn.Module subclass")
    _TABLES[cls] = table


def _out_of_place(cls: type, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``cls.forward`` with ``inplace`` off while a graph is recorded (the input's codes are taken first, and a
    custom Function must not write over its input)."""
    inplace = getattr(module, "inplace", False)
    if inplace:
        module.inplace = False
    try:
        return cls.forward(module, x)
    finally:
        if inplace:
            module.inplace = True


def _approx_class(cls: type) -> type:
    """The subclass of ``cls`` whose forward is ``cls.forward`` with a step-derivative backward (made once)."""
    if cls not in _APPROX_CLASSES:
        def forward(self, x):
            if not (torch.is_grad_enabled() and x.requires_grad):
                return cls.forward(self, x)  # no graph: the plain forward, in place included
            return step_derivative(x, partial(_out_of_place, cls, self), _TABLES[cls](self))
        name = f"Approx{cls.__name__}"
        _APPROX_CLASSES[cls] = type(name, (cls,), {"forward": forward, "_asi_plain_class": cls,
                                                   "__module__": __name__, "__qualname__": name})
        globals().setdefault(name, _APPROX_CLASSES[cls])  # picklable by name (torch.save(model), spawn)
    return _APPROX_CLASSES[cls]


for _cls in (nn.GELU, nn.SiLU):  # made at import, so that a pickled model with them loads in a fresh process
    _approx_class(_cls)


def approximate_activations(model: nn.Module) -> list[str]:
    """Convert, in place, every activation module of a registered class (``nn.GELU``, ``nn.SiLU`` and those added
    by :func:`register_activation`; exact types, not subclasses) to its 2-bit-derivative variant: same object,
    parameters, hooks and ``state_dict``, ``isinstance`` still true; the forward output is unchanged, only the
    gradient through it is approximate. Where no graph is recorded (the frozen part, inference) it runs the plain
    forward. Returns the converted names; :func:`restore_activations` undoes it."""
    names = []
    for name, m in model.named_modules():
        if type(m) in _TABLES:
            m.__class__ = _approx_class(type(m))
            names.append(name)
    return names


def restore_activations(model: nn.Module) -> list[str]:
    """Undo :func:`approximate_activations`; returns the restored names."""
    names = []
    for name, m in model.named_modules():
        plain = type(m).__dict__.get("_asi_plain_class")
        if plain is not None:
            m.__class__ = plain
            names.append(name)
    return names


# --------------------------------------------------------------------------- 2. saved tensors in k bits
class Quantized:
    """A tensor as ``bits``-bit codes over groups of ``group`` elements (logical order), with each group's minimum
    ``lo`` and maximum ``hi`` (float32). What :class:`SavedCompressor` keeps in place of a saved tensor."""
    __slots__ = ("codes", "lo", "hi", "bits", "group", "shape", "dtype", "outer", "source", "__weakref__")

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.codes, self.lo, self.hi


def quantize(t: torch.Tensor, bits: int = 8, group: int = 256) -> Quantized:
    """``t`` as ``bits``-bit codes (``bits`` in 8, 4, 2), round to nearest within each group's [min, max]. Worked
    through in chunks of groups, so that its temporaries stay a few MiB whatever the tensor's size."""
    if bits not in SAVED_BITS:
        raise ValueError(f"quantize: bits must be one of {SAVED_BITS}, got {bits!r}")
    if group < 1 or group % (8 // bits):
        raise ValueError(f"quantize: group must be a positive multiple of {8 // bits} for {bits} bits, got {group}")
    q = Quantized()
    q.bits, q.group, q.shape, q.dtype, q.outer, q.source = bits, group, t.shape, t.dtype, None, None
    flat = t.detach().reshape(-1)
    n, levels, per = flat.numel(), (1 << bits) - 1, 8 // bits
    n_groups = max(1, -(-n // group))
    q.codes = flat.new_empty((n_groups * group // per,), dtype=torch.uint8)
    q.lo = flat.new_empty((n_groups, 1), dtype=torch.float32)
    q.hi = flat.new_empty((n_groups, 1), dtype=torch.float32)
    chunk = max(1, CHUNK // group)  # groups per chunk
    for g0 in range(0, n_groups, chunk):
        g1 = min(n_groups, g0 + chunk)
        part = flat[g0 * group:g1 * group].float()
        if part.numel() % group:  # the last group: filled with its own last value, so its min and max are its own
            part = torch.cat([part, part[-1:].expand(group - part.numel() % group)])
        part = part.view(-1, group)
        lo, hi = part.amin(1, keepdim=True), part.amax(1, keepdim=True)
        step = torch.where(hi > lo, (hi - lo) / levels, torch.ones_like(hi))
        codes = part.sub(lo).div_(step).round_().clamp_(0, levels).to(torch.uint8).view(-1)
        q.codes[g0 * group // per:g1 * group // per] = pack_codes(codes, bits)
        q.lo[g0:g1], q.hi[g0:g1] = lo, hi
    return q


def dequantize(q: Quantized, codes=None, lo=None, hi=None) -> torch.Tensor:
    """The tensor ``q`` stands for (``q.shape``, ``q.dtype``), each element within half a step of the original and
    each group's extremes exact. ``codes``, ``lo``, ``hi`` replace ``q``'s own (the compressor's unpacked ones)."""
    codes, lo, hi = (q.codes if codes is None else codes), (q.lo if lo is None else lo), (q.hi if hi is None else hi)
    levels, per, group = (1 << q.bits) - 1, 8 // q.bits, q.group
    n = math.prod(q.shape)
    out = lo.new_empty((n,), dtype=q.dtype)
    chunk = max(1, CHUNK // group)
    for g0 in range(0, lo.shape[0], chunk):
        g1 = min(lo.shape[0], g0 + chunk)
        c = unpack_codes(codes[g0 * group // per:g1 * group // per], q.bits).view(-1, group).float()
        l, h = lo[g0:g1], hi[g0:g1]
        step = torch.where(h > l, (h - l) / levels, torch.ones_like(h))
        # lo + levels * step can miss hi by rounding (|lo| ~ 1e38): the top code is hi itself
        values = torch.where(c == levels, h, c.mul_(step).add_(l)).view(-1)
        end = min(n, g1 * group)
        out[g0 * group:end] = values[:end - g0 * group]
    return out.view(q.shape)


_EXACT: dict[int, weakref.ref] = {}  # id -> weak reference of each marked tensor alive (tensors compare elementwise)


def _unmark(key: int, ref: weakref.ref) -> None:
    if _EXACT.get(key) is ref:
        del _EXACT[key]


def keep_exact(*tensors: torch.Tensor) -> None:
    """Any :class:`SavedCompressor` keeps these tensors exactly when autograd saves them (ASI's own Functions mark
    their Tucker core and factors: they are the method's compressed form already). The mark goes with the tensor
    object (autograd packs a Function's saved tensors after its forward returns, so a context could not say it)."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            key = id(t)
            _EXACT[key] = weakref.ref(t, lambda ref, key=key: _unmark(key, ref))


class _Plain:
    """A tensor kept as it is, through the outer hooks."""
    __slots__ = ("packed", "unpack")


class SavedCompressor(torch.autograd.graph.saved_tensors_hooks):
    """``with SavedCompressor(bits, group, model=...):`` every saved floating-point tensor of at least ``min_numel``
    elements is kept in ``bits`` bits (module docstring for what is not). ``model``: its parameters and buffers are
    never compressed (a frozen weight saved by a linear is the parameter itself: no memory to gain). Attributes:
    ``compressed`` and ``kept`` count the tensors each way (for tests and reports)."""

    def __init__(self, bits: int = 8, group: int = 256, min_numel: int = 1024, model: Optional[nn.Module] = None):
        if bits not in SAVED_BITS:
            raise ValueError(f"SavedCompressor: bits must be one of {SAVED_BITS}, got {bits!r}")
        if not isinstance(group, int) or group < 1 or group % (8 // bits):
            raise ValueError(f"SavedCompressor: group must be a positive multiple of {8 // bits} for {bits} bits, "
                             f"got {group!r}")
        self.bits, self.group, self.min_numel, self.model = bits, group, min_numel, model
        self.compressed = self.kept = 0
        self._outer, self._inside_checkpoint = None, False
        self._params: set = set()
        self._param_shapes: dict = {}
        self._cache: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
        super().__init__(self._pack, self._unpack)

    def __enter__(self):
        self._outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        # entered inside torch.utils.checkpoint's forward: it keeps nothing there (it recomputes), so neither do we
        self._inside_checkpoint = self._outer is not None and getattr(self._outer[0], "_checkpoint_internal", False)
        self._params, self._param_shapes = set(), {}
        if self.model is not None:
            for t in (*self.model.parameters(), *self.model.buffers()):
                if t.numel():
                    self._params.add(_storage_key(t))
            for p in self.model.parameters():  # autocast's casts of the weights (not parameters themselves)
                for shape in (tuple(p.shape), tuple(reversed(p.shape))):
                    self._param_shapes.setdefault(shape, set()).add(p.dtype)
        self._cache = weakref.WeakValueDictionary()
        super().__enter__()
        return self

    def __exit__(self, *exc):
        self._outer, self._cache = None, weakref.WeakValueDictionary()
        return super().__exit__(*exc)

    def _keep(self, t: torch.Tensor) -> bool:
        marked = _EXACT.get(id(t))
        if not t.is_floating_point() or t.numel() < self.min_numel or (marked is not None and marked() is t):
            return True
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return True
        dtypes = self._param_shapes.get(tuple(t.shape))
        if dtypes is not None and t.dtype not in dtypes:
            return True  # a parameter's shape in another dtype: a weight cast by autocast for this forward
        try:
            return _storage_key(t) in self._params
        except (RuntimeError, NotImplementedError):  # no plain storage (a wrapper subclass): leave it alone
            return True

    def _plain(self, t: torch.Tensor):
        self.kept += 1
        if self._outer is None:
            return t.detach()  # an alias: keeping t itself would make a cycle through a saved output's grad_fn
        p = _Plain()
        p.packed, p.unpack = self._outer[0](t), self._outer[1]
        return p

    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        return _storage_key(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t._version, t.dtype

    def _pack(self, t: torch.Tensor):
        if self._inside_checkpoint or self._keep(t):
            return self._plain(t)
        try:
            key = self._key(t)
        except (RuntimeError, NotImplementedError):
            return self._plain(t)
        q = self._cache.get(key)
        source = q.source() if q is not None else None
        if source is not None and self._key(source) == key:  # the same tensor, alive and still on that memory
            return q
        q = quantize(t, self.bits, self.group)
        q.source = weakref.ref(t)
        fake = isinstance(t, FakeTensor) or t.is_meta
        if not fake and not bool(torch.isfinite(q.hi - q.lo).all()):
            return self._plain(t)  # inf / NaN (a mask of -inf), a range beyond float32: no finite step
        q.codes = q.codes.view(torch.int8)  # (not a mask: meters count uint8/bool as lean's bit masks)
        keep_exact(*q.tensors())  # an enclosing compressor must not compress our codes, minima and maxima again
        if self._outer is not None:
            q.outer = (self._outer[1], [self._outer[0](x) for x in q.tensors()])
            q.codes = q.lo = q.hi = None  # held by the outer hooks' packed objects
        self._cache[key] = q
        self.compressed += 1
        return q

    @staticmethod
    def _unpack(obj):
        if isinstance(obj, torch.Tensor):
            return obj
        if isinstance(obj, _Plain):
            return obj.unpack(obj.packed)
        if obj.outer is not None:
            unpack, packed = obj.outer
            codes, lo, hi = (unpack(p) for p in packed)
        else:
            codes, lo, hi = obj.codes, obj.lo, obj.hi
        return dequantize(obj, codes.view(torch.uint8), lo, hi)


# --------------------------------------------------------------------------- the model-level switch
_STATE = "_asi_saved_compressor"


class _Settings:
    """What :func:`compress_saved` leaves on a model (plain values: a deep copy of the model copies it)."""
    __slots__ = ("bits", "group", "min_numel", "depth", "compressor")

    def __init__(self, bits, group, min_numel):
        self.bits, self.group, self.min_numel, self.depth, self.compressor = bits, group, min_numel, 0, None

    def __deepcopy__(self, memo):
        return _Settings(self.bits, self.group, self.min_numel)

    def __getstate__(self):  # pickling (torch.save(model), spawn): the settings, not a live compressor
        return self.bits, self.group, self.min_numel

    def __setstate__(self, state):
        self.__init__(*state)


def _enter(module: nn.Module, args) -> None:
    st = module.__dict__.get(_STATE)
    if st is None:
        return
    if st.depth and st.compressor is not None:
        # a forward that never returned (KeyboardInterrupt, SystemExit: the forward hook runs for exceptions only)
        # left its hooks pushed: take them off, if still on top, before this forward
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if top is not None and getattr(top[0], "__self__", None) is st.compressor:
            st.compressor.__exit__(None, None, None)
        st.depth = 0
    # one compressor per forward, for this module (a deep copy exempts its own parameters); a forward of the same
    # module inside its own forward is not supported (the stale case above)
    st.compressor = SavedCompressor(st.bits, st.group, st.min_numel, model=module)
    st.compressor.__enter__()
    st.depth = 1


def _leave(module: nn.Module, args, output) -> None:
    st = module.__dict__.get(_STATE)
    if st is None or st.depth == 0:
        return
    st.depth = 0
    st.compressor.__exit__(None, None, None)


def compress_saved(model: nn.Module, bits: int = 8, group: int = 256, min_numel: int = 1024) -> None:
    """Keep what autograd saves during ``model``'s forward in ``bits`` bits (:class:`SavedCompressor`): the hooks
    are entered when ``model``'s forward starts and left when it returns (or raises), so they cover exactly the
    saved tensors of the fine-tuned region (the frozen prefix saves nothing); what the loss saves after the forward
    is kept as it is. Calling it again replaces the settings; :func:`uncompress_saved` removes it;
    :func:`saved_compressor` is the compressor of the last forward (its counts)."""
    SavedCompressor(bits, group, min_numel)  # the settings checked now, not at the first forward
    uncompress_saved(model)
    model.__dict__[_STATE] = _Settings(bits, group, min_numel)
    model.register_forward_pre_hook(_enter)
    model.register_forward_hook(_leave, always_call=True)


def uncompress_saved(model: nn.Module) -> bool:
    """Remove :func:`compress_saved` from ``model``; True if it was there."""
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key, fn in list(hooks.items()):
            if fn is _enter or fn is _leave:
                del hooks[key]
                model._forward_hooks_always_called.pop(key, None)
    return model.__dict__.pop(_STATE, None) is not None


def saved_compressor(model: nn.Module) -> Optional[SavedCompressor]:
    """The compressor of ``model``'s last forward under :func:`compress_saved` (None before the first)."""
    st = model.__dict__.get(_STATE)
    return st.compressor if st is not None else None
