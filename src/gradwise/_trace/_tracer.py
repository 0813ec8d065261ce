"""`gw.trace()` / `gw.explain()`: watch every aten op of a forward and backward pass and explain NaN/Inf and kinks.

How it works. A `TorchDispatchMode` sees every aten op below autograd, forward and backward (the backward ones
run while `torch._C._current_autograd_node()` is set). Per op it does one cheap reduction of each float output
(``sum`` is finite iff every element is) and only digs in when that is not finite, so the finite path costs a
fused reduction and a few dictionary look-ups per op. Digging in records where a NaN/Inf was *born* (the first
op whose inputs were finite, or held no NaN, and whose output was not) and carries that provenance along.

In the backward, tensors derived from the incoming gradient (sensitivities) are tracked by identity
(held weakly, `_ByIdentity`). A non-finite gradient element appears where a sensitivity first meets a non-finite
value (a saved forward value, or one a backward formula made, like 0/0): if the sensitivity is zero there the
output never used the value (**contamination**, which strong zeros remove), otherwise it is **genuine**. The
backward is the user's own: nothing is re-run. Backward nodes are tied to the forward op (and source line) that
created them through autograd sequence numbers.

Kinks are found by a table of detectors keyed by aten op, run on the forward ops that create autograd nodes.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import linecache
import math
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch._C._autograd import _get_sequence_nr
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

from gradwise import _strong_zeros, _trace_causes, _trace_kinds
from gradwise._masks import mask_any
from gradwise._report import Finding, Report
from gradwise._trace_store import Birth as _Birth
from gradwise._trace_store import Incident as _Incident
from gradwise._trace_store import Store, earliest
from gradwise._trace_store import count as _count
from gradwise._trace_store import first as _first

aten = torch.ops.aten
_ACCUMULATE_SEQ = 2**64 - 1  # the sequence number every AccumulateGrad node reports
_MAX_NODES = 100_000  # node records kept for long runs (~250 B each): the oldest half is dropped past this
_DEFER_ON_CPU = False  # batch the checks on CPU too, as on accelerators (tests use it to cover that path)

# -- where user code called an op -------------------------------------------------------------------------

_INTERNAL_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)
_INTERNAL_FILES = {"contextlib.py", "functools.py", "runpy.py"}
_internal_file: dict[str, bool] = {}  # keyed by file name: a str caches its hash, a code object rehashes its fields


def _is_internal(code) -> bool:
    name = code.co_filename
    r = _internal_file.get(name)
    if r is None:
        r = name.startswith(_INTERNAL_DIRS) or name.startswith("<frozen") or os.path.basename(name) in _INTERNAL_FILES
        _internal_file[name] = r
    return r


def _user_frame():
    """The innermost frame outside torch and gradwise (the user's line that called the op)."""
    f = sys._getframe(2)
    internal = _internal_file
    while f is not None:
        r = internal.get(f.f_code.co_filename)  # runs for every op: the cache lookup inlined
        if r is None:
            r = _is_internal(f.f_code)
        if not r:
            return f
        f = f.f_back
    return f


def _loc(frame) -> tuple:
    """(file, line) of a frame, for reports."""
    return (frame.f_code.co_filename, frame.f_lineno) if frame is not None else ("<unknown>", 0)


def _fmt(loc: tuple) -> str:
    return f"{_shown_path(loc[0], os.getcwd())}:{loc[1]}"


@functools.lru_cache(maxsize=1024)
def _shown_path(path: str, cwd: str) -> str:
    """``path`` relative to the working directory when it lies below it (os.path.relpath is slow: cached)."""
    with contextlib.suppress(ValueError):
        rel = os.path.relpath(path, cwd)
        if not rel.startswith(".."):
            return rel
    return path


def _source(loc: tuple) -> str:
    return linecache.getline(loc[0], loc[1]).strip()


def _op_name(func) -> str:
    return f"aten.{func.overloadpacket.__name__}"


# -- small tensor helpers ------------------------------------------------------------------------------------


def _tensors(args) -> list[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)) and a and not isinstance(a[0], int):  # sizes/strides hold no tensor
            out.extend(t for t in a if isinstance(t, torch.Tensor))
    return out


def _floats(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() and out.numel() else []
    if isinstance(out, (list, tuple)):
        return [t for t in out if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    return []


def _nonfinite(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.numel() > 0 and _trace_kinds.readable(t) and not bool(
        torch.isfinite(t).all())


def _positions(mask: torch.Tensor) -> tuple[int, list[list[int]]]:
    return _count(mask), _first(mask)


def _aligned(ts: list[torch.Tensor], shape) -> bool:
    """Do these tensors broadcast elementwise onto `shape` (so positions line up)?"""
    try:
        return all(torch.broadcast_shapes(t.shape, shape) == shape for t in ts)
    except RuntimeError:
        return False


# -- why a NaN/Inf was born: one explainer per op family (keyed by aten overload packet) ----------------------

_EXPLAIN: dict = {}


def _explains(*ops):
    def register(fn):
        for op in ops:
            _EXPLAIN[op] = fn
        return fn

    return register


def _inputs_at(ins, mask):
    """The first input's values at the masked positions, when positions line up."""
    if ins and ins[0].is_floating_point() and _aligned(ins[:1], mask.shape):
        return ins[0].broadcast_to(mask.shape)[mask]
    return None


def _log_counts(ins, mask, edge: float, name: str) -> str:
    x = _inputs_at(ins, mask)
    if x is not None and x.numel():
        below, at = int((x < edge).sum()), int((x == edge).sum())
        return (f"{name} of {below} value(s) below {edge:g} and {at} at {edge:g}: a domain error (NaN below the "
                f"domain, -inf at {edge:g})")
    return f"{name} outside its domain (NaN below {edge:g}, -inf at {edge:g})"


@_explains(aten.log, aten.log2, aten.log10, aten.xlogy)
def _log_domain(ins, out, mask) -> str:
    """log is NaN below its domain and -inf at its edge, 0."""
    return _log_counts(ins, mask, 0.0, "log")


@_explains(aten.log1p)
def _log1p_domain(ins, out, mask) -> str:
    """log1p is NaN below -1 and -inf at -1."""
    return _log_counts(ins, mask, -1.0, "log1p")


@_explains(aten.nll_loss_forward, aten.nll_loss2d_forward)
def _nll_total_weight(ins, out, mask) -> str:
    """nll_loss with reduction='mean' divides by the total weight of the targets."""
    return ("the total weight of the targets is 0 (every target ignored or of class weight 0): reduction='mean' "
            "divides 0 by 0")


@_explains(aten.sqrt, aten.rsqrt)
def _sqrt_domain(ins, out, mask) -> str:
    """sqrt / rsqrt are NaN for negative inputs; rsqrt is inf at 0."""
    x = _inputs_at(ins, mask)
    if x is not None and x.numel():
        return f"root of {int((x < 0).sum())} negative value(s) (NaN) and {int((x == 0).sum())} zero(s)"
    return "a root outside its domain (NaN for negatives)"


@_explains(aten.pow)
def _root_domain(ins, out, mask) -> str:
    """fractional powers are NaN for negative bases; negative powers are inf at 0."""
    x = _inputs_at(ins, mask)
    if x is not None and x.numel():
        return f"{int((x < 0).sum())} negative and {int((x == 0).sum())} zero base(s): NaN for a negative base, " \
               "inf for a negative power of 0"
    return "a power outside its domain"


@_explains(aten.div, aten.reciprocal)
def _division(ins, out, mask) -> str:
    """x/0 is ±inf and 0/0 is NaN."""
    return "division by zero (x/0 = ±inf, 0/0 = NaN)"


@_explains(aten.exp, aten.exp2, aten.expm1, aten.sinh, aten.cosh, aten.mul, aten.mm, aten.addmm, aten.bmm,
           aten.sum, aten.add, aten.sub, aten.matmul, aten.square)
def _overflow(ins, out, mask) -> str:
    """Inf from finite inputs is an overflow; NaN from inf inputs is inf - inf or 0 x inf."""
    if out is not None and bool(mask_any(torch.isnan(out).logical_and_(mask))) and any(_nonfinite(t) for t in ins):
        return "inf - inf or 0 x inf"
    return f"overflow: the result exceeds the largest {str(out.dtype).replace('torch.', '')} (Inf)" \
        if out is not None else "overflow"


@_explains(aten._softmax, aten._log_softmax)
def _softmax_all_masked(ins, out, mask) -> str:
    """softmax of a slice that is all -inf is 0/0 = NaN."""
    return "softmax over a slice that is entirely -inf (0/0 = NaN): a fully masked row"


@_explains(aten.acos, aten.asin, aten.atanh, aten.acosh)
def _inverse_trig_domain(ins, out, mask) -> str:
    """acos/asin are NaN outside [-1, 1]; atanh is ±inf at ±1."""
    return "an inverse trigonometric/hyperbolic function outside its domain"


@_explains(aten.full, aten.fill, aten.fill_, aten.masked_fill, aten.masked_fill_, aten.lift_fresh, aten.scalar_tensor,
           aten.full_like, aten.copy_, aten.index_put_, aten.index_put)
def _written(ins, out, mask) -> str:
    """A NaN/Inf constant written into a tensor (data, padding, a mask value)."""
    return "a NaN/Inf constant written into the tensor"


_LITERALS = {aten.lift_fresh, aten.lift}


@_explains(*_LITERALS)
def _literal(ins, out, mask) -> str:
    """torch.tensor([..., nan]): a NaN/Inf written in a tensor literal."""
    return "a NaN/Inf written in a tensor literal (torch.tensor / torch.as_tensor of Python data)"


def _explain(func, ins, out, mask) -> str:
    fn = _EXPLAIN.get(func.overloadpacket)
    if fn is not None:
        return fn(ins, out, mask)
    return f"{_op_name(func)} made NaN/Inf from finite inputs"


# -- ops whose backward sends zero sensitivity to values the output does not use, and the local rewrite ------

_SELECT_FIX = "select first, then compute: apply the op to the kept elements only (e.g. lin(x[:4]), not lin(x)[:4])"
# Discarding ops whose zeros are spread elementwise through the tensor (see _discarded_by)
_ELEMENTWISE_SELECTS = [aten.minimum, aten.maximum, aten.fmin, aten.fmax, aten.clamp, aten.clamp_min, aten.clamp_max,
                        aten.relu, aten.threshold, aten.hardtanh]
_STEPS = [aten.floor, aten.round, aten.sign]
_DISCARDS: dict = {
    **dict.fromkeys([aten.slice, aten.select, aten.index, aten.index_select, aten.gather, aten.narrow,
                     aten.split, aten.split_with_sizes, aten.unbind, aten.masked_select, aten.take,
                     aten.as_strided, aten.diagonal], _SELECT_FIX),
    **dict.fromkeys([aten.where], "double where: make the unused branch's input safe too, e.g. "
                    "torch.where(c, f(torch.where(c, x, safe)), other) so f never sees the bad values"),
    **dict.fromkeys([aten.masked_fill, aten.masked_fill_, aten.masked_scatter],
                    "mask before the op that makes NaN/Inf (e.g. before the division or the matmul), not after"),
    **dict.fromkeys([aten.nll_loss_forward, aten.nll_loss2d_forward],
                    "drop the ignored targets' rows before the layers that read NaN/Inf (h[keep])"),
    **dict.fromkeys([aten.copy_, aten.fill_, aten.index_put_, aten.zero_, aten.index_copy, aten.index_copy_,
                     aten.index_fill, aten.index_fill_, aten.scatter, aten.scatter_, aten.put, aten.put_],
                    "build the tensor with torch.where instead of overwriting elements computed from bad values"),
    **dict.fromkeys([aten._softmax, aten._log_softmax],
                    "mask fully masked rows before the softmax (or drop them)"),
    **dict.fromkeys([*_ELEMENTWISE_SELECTS, aten.max, aten.min, aten.amax, aten.amin, aten.sort, aten.topk,
                     aten.median, aten.nanmedian, aten.kthvalue, aten.mode,
                     aten.max_pool2d_with_indices, aten.max_pool3d_with_indices],
                    "make the unselected argument finite (e.g. torch.minimum(one, 1 / x.clamp_min(eps)))"),
    **dict.fromkeys([*_STEPS, aten.nansum], "make the value finite before the op that zeroes its sensitivity"),
}

_ELEMENTWISE_DISCARDS = {*_ELEMENTWISE_SELECTS, *_STEPS}

_GENUINE_FIX: dict = {
    **dict.fromkeys([aten.nll_loss_forward, aten.nll_loss2d_forward],
                    "skip the batch when no target counts (weights.sum() == 0), or use reduction='sum' divided by a "
                    "count you clamp to at least 1"),
    **dict.fromkeys([aten.log, aten.log2, aten.log10, aten.log1p, aten.xlogy],
                    "keep the input inside the domain: log(x.clamp_min(eps)), or torch.special.xlogy / log_softmax"),
    **dict.fromkeys([aten.sqrt, aten.rsqrt, aten.pow],
                    "keep the base inside the domain (x.clamp_min(eps)); at 0 the derivative of sqrt is infinite: use "
                    "sqrt(x + eps) or torch.linalg.vector_norm (gradient 0 at 0)"),
    **dict.fromkeys([aten.div, aten.reciprocal],
                    "guard the denominator: x / d.clamp_min(eps) or torch.where(d != 0, ...)"),
    **dict.fromkeys([aten.exp, aten.exp2, aten.expm1, aten.sinh, aten.cosh],
                    "avoid the overflow: logsumexp / softplus / log-space arithmetic, or clamp the input"),
    **dict.fromkeys([aten._softmax, aten._log_softmax], "do not mask a whole row: keep one entry or drop the row"),
    **dict.fromkeys([aten.full, aten.fill, aten.fill_, aten.copy_, aten.masked_fill, aten.masked_fill_, aten.lift_fresh,
                     aten.full_like, aten.index_put_, aten.index_put],
                    "the output reads the NaN/Inf constant written here: mask it out before the first op that uses it"),
}
_UNDECIDED = ("it reached {op}, which has no strong-zero rule: whether the output uses it is not known (it may "
              "be contamination that gw.strong_zeros() cannot remove there; gw.unruled_ops() lists such ops)")
_GRADIENT_FIX = ("an earlier backward left NaN/Inf in this gradient and it was used as a value (an optimizer "
                 "step writes it into the parameters); fix that backward first (see its finding), e.g. with "
                 "gw.strong_zeros() where it is contamination")
_INPUT_FIX = "the data arrived with NaN/Inf: clean it (x.nan_to_num(), drop the rows) or mask it before the first op"


# -- kink detectors: one per op family, keyed by aten overload packet ---------------------------------------


@dataclass(frozen=True)
class _Detector:
    fn: Callable
    needs_out: bool


@dataclass
class _Hit:
    kind: str  # "kink" or "singular"
    mask: torch.Tensor | Callable[[], torch.Tensor]  # where the op is on its kink: bool or 0/1 (callable: on demand)
    convention: str
    aligned: bool = True  # mask has the output's shape (so the incoming sensitivity can be read there)
    found: torch.Tensor | bool | None = None  # may the mask hold a True? (a 0-dim flag, or decided; None: read it)


def _zeros_of(c, kind: str, convention: str) -> _Hit:
    """Where the op's input is exactly 0; the mask is made only when a 0 is there (a compare into bool over
    every element costs ~3x a reduction on CPU). In-place ops compare now, before x is overwritten."""
    x = c.args[0].detach()
    if c.packet.endswith("_") or x.numel() == 0:
        return _Hit(kind, x == 0, convention)
    if x.device.type == "cpu" and x.is_contiguous() and x.is_floating_point():
        least = _least_magnitude(x).item()
        return _Hit(kind, lambda: x == 0, convention, found=least == 0 or least != least)  # NaN can hide a 0
    return _Hit(kind, lambda: x == 0, convention, found=torch.count_nonzero(x) < x.numel())


_SCRATCH = threading.local()
_SCRATCH_SIZE = 1 << 20  # elements


def _least_magnitude(x: torch.Tensor) -> torch.Tensor:
    """min |x| (NaN if x holds one) of a contiguous CPU tensor, through a reused per-thread buffer of at most
    2**20 elements: a temporary as large as x would cost fresh pages on every call (the allocator hands large
    blocks back to the OS), and counting nonzeros instead is ~2x slower."""
    flat = x.view(-1)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.dtype != x.dtype or buf.numel() < min(flat.numel(), _SCRATCH_SIZE):
        buf = _SCRATCH.buf = torch.empty(min(flat.numel(), _SCRATCH_SIZE), dtype=x.dtype)
    least = [torch.abs(chunk, out=buf[: chunk.numel()]).amin() for chunk in flat.split(_SCRATCH_SIZE)]
    return least[0] if len(least) == 1 else torch.stack(least).amin()


class _ByIdentity:
    """Tensor (or module) -> value by identity, held weakly: WeakTensorKeyDictionary's semantics for a
    fraction of its cost (it builds a Python-level WeakIdRef per lookup; here a lookup is one dict get and one
    weakref call, on every op the tracer sees). Dead entries are dropped whenever the table has doubled, so a
    dead key's value lives until then: for small values (sequence numbers, provenance sets, names)."""

    __slots__ = ("_d", "_limit")

    def __init__(self) -> None:
        self._d: dict[int, tuple] = {}
        self._limit = 1024

    def get(self, t, default=None):
        e = self._d.get(id(t))
        return e[1] if e is not None and e[0]() is t else default

    def __contains__(self, t) -> bool:
        e = self._d.get(id(t))
        return e is not None and e[0]() is t

    def __getitem__(self, t):
        e = self._d.get(id(t))
        if e is None or e[0]() is not t:
            raise KeyError(t)
        return e[1]

    def __setitem__(self, t, value) -> None:
        self._d[id(t)] = (weakref.ref(t), value)
        if len(self._d) > self._limit:
            self._d = {k: e for k, e in self._d.items() if e[0]() is not None}
            self._limit = max(1024, 2 * len(self._d))

    def items(self) -> list[tuple]:
        return [(t, e[1]) for e in list(self._d.values()) if (t := e[0]()) is not None]


_KINKS: dict = {}


def _kink(*ops, needs_out: bool = False):
    """Register a detector. Detectors that need no output run before the op, so in-place variants work."""

    def register(fn):
        for op in ops:
            _KINKS[op] = _Detector(fn, needs_out)
        return fn

    return register


@dataclass
class _Call:
    """One forward op call as a detector sees it."""

    args: tuple
    kwargs: dict
    out: object
    ties: WeakTensorKeyDictionary
    packet: str

    def arg(self, i: int, name: str, default=None):
        return self.args[i] if len(self.args) > i else self.kwargs.get(name, default)


@_kink(aten.relu, aten.relu_)
def _relu_at_zero(c):
    """relu at 0: PyTorch's backward uses 0 there (x > 0 counts as the active side)."""
    return _zeros_of(c, "kink", "relu'(0) = 0")


@_kink(aten.abs, aten.abs_)
def _abs_at_zero(c):
    """abs at 0: the backward uses sign(0) = 0."""
    return _zeros_of(c, "kink", "abs'(0) = 0")


@_kink(aten.leaky_relu, aten.leaky_relu_, aten._prelu_kernel)
def _leaky_relu_at_zero(c):
    """leaky_relu / prelu at 0: the backward uses the negative slope (x > 0 counts as positive)."""
    return _zeros_of(c, "kink", "the negative slope at 0")


@_kink(aten.clamp, aten.clamp_, aten.clamp_min, aten.clamp_min_, aten.clamp_max, aten.clamp_max_)
def _clamp_at_bound(c):
    """clamp at a bound: in torch 2.13 the backward passes the gradient (1) at a scalar bound; this changes
    between releases (0 in 2.14), which is why it is worth knowing."""
    x = c.args[0]
    if c.packet.startswith("clamp_min"):
        bounds = [c.args[1]]
    elif c.packet.startswith("clamp_max"):
        bounds = [c.args[1]]
    else:
        bounds = [c.arg(1, "min"), c.arg(2, "max")]
    mask = torch.zeros((), dtype=torch.bool)
    for b in bounds:
        if b is not None:
            mask = mask | (x == b)
    mask = torch.broadcast_to(mask, x.shape)
    return _Hit("kink", mask, "gradient 1 at the bound (torch 2.13; 0 in 2.14)")


@_kink(aten.hardtanh, aten.hardtanh_)
def _hardtanh_at_bound(c):
    """hardtanh at min_val / max_val: the backward uses 0 there (strictly inside counts as active)."""
    x = c.args[0]
    return _Hit("kink", (x == c.arg(1, "min_val", -1.0)) | (x == c.arg(2, "max_val", 1.0)), "0 at the bounds")


@_kink(aten.threshold, aten.threshold_)
def _threshold_at_threshold(c):
    """threshold at its threshold: the backward uses 0 there (x <= threshold counts as below)."""
    return _Hit("kink", c.args[0] == c.args[1], "0 at the threshold")


@_kink(aten.hardshrink, aten.softshrink)
def _shrink_at_lambda(c):
    """hard/softshrink at ±lambda: the backward uses 0 there."""
    return _Hit("kink", c.args[0].abs() == c.arg(1, "lambd", 0.5), "0 at ±lambda")


@_kink(aten.hardsigmoid, aten.hardsigmoid_, aten.hardswish, aten.hardswish_)
def _hard_activation_at_3(c):
    """hardsigmoid / hardswish at ±3: the backward uses one side's slope (0 for hardsigmoid, x/3 + 1/2 for
    hardswish)."""
    return _Hit("kink", c.args[0].abs() == 3, "one side's slope at ±3")


@_kink(aten.maximum, aten.minimum)
def _max_min_tie(c):
    """maximum/minimum with equal arguments: the backward splits the gradient 1/2, 1/2."""
    a, b = c.args[0], c.args[1]
    return _Hit("kink", torch.broadcast_to(a == b, torch.broadcast_shapes(a.shape, b.shape)), "1/2 to each argument")


@_kink(aten.fmax, aten.fmin)
def _fmax_fmin_tie(c):
    """fmax/fmin with equal arguments: the backward gives all of the gradient to the first argument."""
    a, b = c.args[0], c.args[1]
    return _Hit("kink", torch.broadcast_to(a == b, torch.broadcast_shapes(a.shape, b.shape)),
                "all to the first argument")


def _reduction_ties(x, value, dim, keepdim):
    """Elements equal to their slice's selected value, in slices where more than one is (dim None: all)."""
    if dim is None or (not isinstance(dim, int) and not list(dim)):
        eq = x == value
        return eq & (eq.sum() > 1)
    dims = [dim] if isinstance(dim, int) else list(dim)
    if not keepdim:
        for d in sorted(d % x.dim() for d in dims):
            value = value.unsqueeze(d)
    eq = x == value
    return eq & (eq.sum(dims, keepdim=True) > 1)


@_kink(aten.max, aten.min, aten.amax, aten.amin, needs_out=True)
def _reduction_tie(c):
    """max/min/amax/amin with tied maxima: max(dim)/min(dim) give all of the gradient to the returned index;
    max()/amax and their min versions split it evenly among the tied elements."""
    x, out = c.args[0], c.out
    if isinstance(out, torch.Tensor):
        if len(c.args) > 1 and isinstance(c.args[1], torch.Tensor):
            return None  # binary max(x, y): see maximum
        return _Hit("kink", _reduction_ties(x, out, c.arg(1, "dim", None), c.arg(2, "keepdim", False)),
                    "split evenly among ties", aligned=False)
    return _Hit("kink", _reduction_ties(x, out[0], c.args[1], c.arg(2, "keepdim", False)),
                "all to the returned (first) index", aligned=False)


@_kink(aten.median, aten.nanmedian, aten.kthvalue, aten.mode, needs_out=True)
def _order_statistic_tie(c):
    """median/kthvalue/mode with ties at the selected value: all to the returned index (median() with no dim
    splits evenly)."""
    x, out = c.args[0], c.out
    if isinstance(out, torch.Tensor):
        return _Hit("kink", _reduction_ties(x, out, None, False), "split evenly among ties", aligned=False)
    i = 2 if c.packet == "kthvalue" else 1
    return _Hit("kink", _reduction_ties(x, out[0], c.arg(i, "dim", -1), c.arg(i + 1, "keepdim", False)),
                "all to the returned index", aligned=False)


@_kink(aten.sort, needs_out=True)
def _sort_tie(c):
    """sort with equal values: the gradient follows the positions sort returned (ties keep their order). The
    tied elements are reported where they sit in the input."""
    values, perm = c.out[0], c.out[1]
    dim = c.arg(1, "dim", -1)
    if isinstance(dim, bool):  # sort.stable(x, *, stable, dim)
        dim = c.kwargs.get("dim", -1)
    if values.dim() == 0 or values.shape[dim] < 2:
        return None
    n = values.shape[dim] - 1
    tie = (values.narrow(dim, 0, n) == values.narrow(dim, 1, n)).to(torch.uint8)
    return _Hit("kink", _in_input(values, dim, [(perm.narrow(dim, 0, n), tie), (perm.narrow(dim, 1, n), tie)]),
                "follows the returned positions", aligned=False)


def _in_input(like: torch.Tensor, dim: int, marks: list) -> torch.Tensor:
    """A bool mask shaped like the input: True at the input positions ``index`` where ``mark`` is set."""
    out = torch.zeros(like.shape, dtype=torch.uint8, device=like.device)
    for index, mark in marks:
        out.scatter_add_(dim, index, mark)
    return out > 0


@_kink(aten.topk, needs_out=True)
def _topk_tie(c):
    """topk with ties among, or at the edge of, the selected values: all to the returned indices. The tied
    elements are reported where they sit in the input."""
    x, values, idx = c.args[0], c.out[0], c.out[1]
    dim = c.arg(2, "dim", -1)
    if values.numel() == 0 or values.dim() == 0:
        return None
    k = values.shape[dim]
    last = values.narrow(dim, k - 1, 1)
    edge = (x == last).sum(dim, keepdim=True) > (values == last).sum(dim, keepdim=True)
    mask = (x == last) & edge  # every element equal to the last value kept, when not all of them are kept
    if k > 1:
        inner = (values.narrow(dim, 0, k - 1) == values.narrow(dim, 1, k - 1)).to(torch.uint8)
        mask = mask | _in_input(x, dim, [(idx.narrow(dim, 0, k - 1), inner), (idx.narrow(dim, 1, k - 1), inner)])
    return _Hit("kink", mask, "all to the returned indices", aligned=False)


def _tiling_kernel(x: torch.Tensor, spatial: int, kernel, stride, padding, dilation, ceil_mode) -> list | None:
    """The kernel size when max-pool windows tile ``x`` (stride == kernel, no padding, no dilation, no partial
    window), else None."""
    k = list(kernel) * spatial if len(kernel) == 1 else list(kernel)
    s = (list(stride) * spatial if len(stride) == 1 else list(stride)) if stride else k
    if s != k or any(padding) or any(d != 1 for d in dilation):
        return None
    if ceil_mode and any(n % kk for n, kk in zip(x.shape[-spatial:], k, strict=True)):
        return None
    return k


def _below_max_2x2(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor | None:
    """For 2x2 windows: how many of each window's 4 elements lie below its maximum, or None where the layout
    does not allow this route. Each row of a window is read as one (left, right) pair, so the four strided
    reads (2-element stride: not vectorised) become two contiguous subtractions, ~1.5x faster. The maxima are
    duplicated pairwise by viewing a complex tensor as real (complex arithmetic itself would mix in 0 x inf)."""
    if x.dtype not in (torch.float32, torch.float64) or not x.is_contiguous() or x.shape[-1] % 2:
        return None
    pairs = x.view(*x.shape[:-1], x.shape[-1] // 2, 2)
    both = torch.view_as_real(torch.complex(values, values))
    rows = 2 * values.shape[-2]
    e = torch.sub(both, pairs[..., 0:rows:2, :, :]).sign_()
    e.add_(torch.sub(both, pairs[..., 1:rows:2, :, :]).sign_())
    return e[..., 0] + e[..., 1]


@_kink(aten.max_pool2d_with_indices, aten.max_pool3d_with_indices, needs_out=True)
def _max_pool_window_tie(c):
    """max-pool windows whose maximum is not unique: all of the gradient goes to the returned (first) index.
    Windows that tile the input are counted exactly: for each position in the kernel, the strided view of the
    input at that position is compared with the maxima (one pass over the input in all; on CPU by subtraction).
    Overlapping windows: hide each window's returned maximum and pool again; a window that still reaches its
    value has a tie (a tie with a neighbour's maximum can hide another: a rare undercount)."""
    x, (values, indices) = c.args[0].detach(), c.out
    spatial = 3 if c.packet == "max_pool3d_with_indices" else 2
    k = _tiling_kernel(x, spatial, c.arg(1, "kernel_size"), c.arg(2, "stride", []), c.arg(3, "padding", [0]),
                       c.arg(4, "dilation", [1]), c.arg(5, "ceil_mode", False))
    if not values.numel():
        return None
    if k is not None:
        out_sizes = values.shape[-spatial:]
        views = [x[(..., *(slice(o, o + n * kk, kk) for o, n, kk in zip(offset, out_sizes, k, strict=True)))]
                 for offset in itertools.product(*(range(kk) for kk in k))]
        if x.device.type == "cpu" and math.isfinite(values.sum().item()):
            # On CPU float arithmetic vectorises and a compare into bool does not (~5x slower). x <= max, so
            # sign(max - x) is 0 where x ties the maximum and 1 elsewhere: fewer than len - 1 ones is a tie.
            # Maxima that are all finite keep NaN out (max - x is finite or +inf); else the compares below.
            ones = _below_max_2x2(x, values) if k == [2, 2] else None
            if ones is None:
                for at in views:
                    d = torch.sub(values, at).sign_()
                    ones = d if ones is None else ones.add_(d)
            found = ones.amin() < len(views) - 1.5
            # the mask as 0./1. in place (a compare into bool costs ~5x): 1 where at most len - 2 are below max
            mask = functools.cache(lambda: ones.neg_().add_(len(views) - 1).clamp_(0, 1))
            return _Hit("kink", mask, "all to the returned (first) index", found=found)
        count = None
        wide = len(views) > 255  # a byte count would wrap
        for at in views:
            equal = at == values
            count = equal.to(torch.int32 if wide else torch.uint8) if count is None else count.add_(equal)
        if wide:
            return _Hit("kink", count > 1, "all to the returned (first) index")
        # count > 1 as two in-place byte ops (a compare makes a new tensor, 3x slower); a NaN window counts 0
        return _Hit("kink", count.clamp_(1, 2).sub_(1).view(torch.bool), "all to the returned (first) index")
    hidden = x.flatten(-spatial).clone()
    hidden.scatter_(-1, indices.flatten(-spatial), float("-inf"))
    again, _ = getattr(aten, c.packet)(hidden.view_as(x), *c.args[1:], **c.kwargs)
    return _Hit("kink", again == values, "all to the returned (first) index")


@_kink(aten.where, needs_out=True)
def _where_on_tie(c):
    """where(a > b, ...) with a == b somewhere: the comparison picks one branch at the tie (False for > and <,
    so all of the gradient goes to the second branch; True for >= and <=)."""
    tie = c.ties.get(c.args[0]) if isinstance(c.args[0], torch.Tensor) else None
    if tie is None:
        return None
    mask, picks = tie
    return _Hit("kink", torch.broadcast_to(mask, c.out.shape), f"all to the {picks} branch at a tie")


@_kink(aten.sqrt, aten.rsqrt)
def _sqrt_at_zero(c):
    """sqrt at 0: an infinite derivative; the backward divides by 2 sqrt(0) (Inf, NaN under a zero sensitivity)."""
    return _zeros_of(c, "singular", "Inf (1 / (2 sqrt(0)))")


@_kink(aten.pow)
def _fractional_power_at_zero(c):
    """x ** p with 0 < p < 1 at x = 0: an infinite derivative (Inf from the backward)."""
    if not isinstance(c.args[0], torch.Tensor) or len(c.args) < 2 or isinstance(c.args[1], torch.Tensor):
        return None
    p = c.args[1]
    if not 0 < p < 1:
        return None
    return _Hit("singular", c.args[0] == 0, f"Inf (p x^(p-1) at 0, p = {p})")


@_kink(aten.linalg_vector_norm, needs_out=True)
def _norm_at_zero(c):
    """a vector norm of an all-zero slice: not differentiable there; PyTorch's backward uses 0."""
    x, zero = c.args[0], c.out == 0
    dim, keepdim = c.arg(2, "dim", None), c.arg(3, "keepdim", False)
    if dim is not None and not keepdim:
        for d in sorted(d % x.dim() for d in ([dim] if isinstance(dim, int) else dim)):
            zero = zero.unsqueeze(d)
    return _Hit("singular", torch.broadcast_to(zero, x.shape), "0 at 0", aligned=False)


@_kink(aten.asin, aten.acos)
def _arcsin_at_one(c):
    """asin/acos at ±1: an infinite derivative (Inf from the backward)."""
    return _Hit("singular", c.args[0].abs() == 1, "Inf (1 / sqrt(1 - x^2) at ±1)")


_COMPARISONS = {aten.gt: "second", aten.lt: "second", aten.ge: "first", aten.le: "first"}


def kink_detector(func) -> _Detector | None:
    """The kink detector for an aten op (an OpOverload or its packet), or None for an op without kinks."""
    return _KINKS.get(getattr(func, "overloadpacket", func))


# -- per-op facts, cached ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _OpInfo:
    view: bool
    mutable: bool
    detector: _Detector | None
    compare: str | None
    packet_name: str
    preserving: bool
    collective: bool = False  # a torch.distributed collective (c10d): its result holds other ranks' values
    op_name: str = ""  # "aten.<packet>", as reports name ops


# Ops whose output is finite whenever their inputs are: their check is skipped unless an input is already
# known to be non-finite (a NaN/Inf in data they are the first to touch is then found by the next op).
_FINITE_PRESERVING = {
    aten.relu, aten.relu_, aten.threshold, aten.threshold_backward, aten.hardtanh, aten.clamp, aten.clamp_min,
    aten.clamp_max, aten.abs, aten.neg, aten.max_pool2d_with_indices, aten.max_pool3d_with_indices,
    aten.max_pool2d_with_indices_backward, aten.max_pool3d_with_indices_backward, aten.max, aten.min, aten.amax,
    aten.amin, aten.cat, aten.stack, aten.clone, aten._to_copy, aten.contiguous, aten.index, aten.gather,
    aten.index_select, aten.select_backward, aten.slice_backward, aten.sort, aten.topk, aten.gelu, aten.tanh,
    aten.sigmoid, aten.silu, aten.hardsigmoid, aten.hardswish, aten.leaky_relu, aten.maximum, aten.minimum,
    aten.zeros_like, aten.ones_like, aten.zeros, aten.ones, aten.empty_like, aten.native_dropout, aten.sign,
    aten.floor, aten.round, aten.ceil, aten.trunc, aten.where, aten.sin, aten.cos, aten.erf,
}
_INFO: dict = {}


def _op_info(func) -> _OpInfo:
    info = _INFO.get(func)
    if info is None:
        packet = func.overloadpacket
        # a literal's lift_fresh aliases fresh data: checked like a new tensor (a NaN literal is born there)
        view = bool(getattr(func, "is_view", False)) and packet not in _LITERALS
        info = _INFO[func] = _OpInfo(view, func._schema.is_mutable,
                                     _KINKS.get(packet), _COMPARISONS.get(packet), packet.__name__,
                                     packet in _FINITE_PRESERVING, func.namespace in _COLLECTIVE_NAMESPACES,
                                     _op_name(func))
    return info


_COLLECTIVE_NAMESPACES = {"c10d", "_c10d_functional"}


def _dist_rank() -> int | None:
    """This process's rank in the default process group, None when torch.distributed is not in use."""
    dist = getattr(torch, "distributed", None)
    return dist.get_rank() if dist is not None and dist.is_available() and dist.is_initialized() else None


# -- what the trace records ----------------------------------------------------------------------------------


@dataclass(slots=True)  # one per autograd node: up to _MAX_NODES of them
class _Node:
    op: str
    loc: tuple
    kinks: list = field(default_factory=list)  # (key, mask or None) to check the sensitivity against


@dataclass
class _KinkGroup:
    kind: str
    op: str
    loc: tuple
    convention: str
    count: int = 0
    occurrences: int = 0
    indices: list = field(default_factory=list)
    reached: bool = False


class _Tracer(TorchDispatchMode):
    def __init__(self, sync_every: int):
        super().__init__()
        self.sync_every = sync_every
        self.prov = _ByIdentity()  # non-finite tensor -> frozenset of _Birth / _Incident
        self.as_value = _ByIdentity()  # non-finite gradient used as a forward value -> its birth there
        self.written = _ByIdentity()  # tensor an in-place op made non-finite -> (op, loc)
        self.sens = _ByIdentity()  # sensitivity-derived tensor -> seq of the node that made it
        # comparison result -> (mask of equal operands, branch picked): masks are large, so this one frees an
        # entry as soon as its tensor dies (_ByIdentity keeps dead values until its next purge)
        self.ties = WeakTensorKeyDictionary()
        self.names = _ByIdentity()
        self.module_names = _ByIdentity()  # module -> {id(param): name}
        self.nodes: dict[int, _Node] = {}
        self.parents: dict = {}  # node seq -> seqs of the nodes whose sensitivities it consumed
        self.store = Store()  # births and incidents, interned per site (bounded over long runs)
        self.kinks: dict[tuple, _KinkGroup] = {}
        self.output_births: set = set()  # births that reached an output something was differentiated from
        self.pending: list = []
        self.depth = 0
        self.backward_ended = False  # the next grad-enabled forward op starts a new step
        self.passed: dict[str, list] = {}  # kind -> [ops run without reading them, the first op] (_trace_kinds)
        self.provisional: list | None = None  # incidents of a plain pass gw.strong_zeros() may redo
        self.strong_ran = False
        self.reached_now: set = set()  # incidents that reached a gradient in this backward call (strong zeros)
        self.strong_reads: dict[tuple, int] = {}  # (birth, (node op, loc)) read in gw.strong_zeros()' passes
        self.n_fwd = self.n_bwd = 0
        self.last_seq = _get_sequence_nr()
        self.collective_bufs: dict[int, tuple] = {}  # storage -> (weak ref, op, loc) of collectives' tensors
        self.collective_sites: dict[tuple, None] = {}  # (op, loc) of the collectives seen, in order

    # -- dispatch --------------------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        info = _INFO.get(func) or _op_info(func)
        if info.collective:
            return self._collective(func, args, kwargs)
        if types and any(t.__name__ == "DTensor" for t in types):
            return func(*args, **kwargs)  # a check on a sharded DTensor would itself run collectives: not traced
        if types and (odd := [t for t in types if t not in _trace_kinds.PLAIN_TYPES]):
            # a tensor subclass (nested jagged, fake, ...): its own dispatch would see our reductions
            self._pass_over(f"tensor subclass {odd[0].__name__}", func)
            return func(*args, **kwargs)
        if _trace_kinds.forward_ad_active():  # reductions of duals would build tangents
            self._pass_over("forward-AD dual", func)
            return func(*args, **kwargs)
        if torch._C._are_functorch_transforms_active():  # vmap/grad (batched gradients): values are batched
            self._pass_over("functorch-transformed (vmap, batched gradient)", func)
            return func(*args, **kwargs)
        node = torch._C._current_autograd_node()
        if node is None and not self.depth:
            return self._forward(func, info, args, kwargs)
        out = func(*args, **kwargs)
        self._backward(func, info, node, args, out, kwargs)
        return out

    def _forward(self, func, info, args, kwargs):
        self.n_fwd += 1
        # a new step: the first aten op with grad enabled after a backward (optimizers run theirs under no_grad)
        if self.backward_ended and func.namespace == "aten" and torch.is_grad_enabled():
            self.backward_ended = False
            self.store.step += 1
        seq = _get_sequence_nr()
        # this op made autograd node seq - 1: it is differentiated. A custom Function takes its number before its
        # forward runs (under no_grad): the first op inside it did not make that node
        creates_node = seq != self.last_seq and torch.is_grad_enabled()
        self.last_seq = seq
        if not creates_node and (info.view or info.preserving) and not info.mutable and not self.pending \
                and not any(t in self.prov for t in _tensors(args)):
            return func(*args, **kwargs)  # undifferentiated, finite in and out (detach, ones_like): no record
        frame = _user_frame()
        loc = _loc(frame)
        ins = _tensors(args)
        det = info.detector
        if det is not None and not all(_trace_kinds.readable(t) for t in ins):
            det = None  # a ZeroTensor/meta/sparse input: no values to test for a kink
        hit = None
        if creates_node:
            new = [t for t in ins if t.is_leaf and t.requires_grad and t not in self.names]
            if new:  # a weight and its bias: one walk up the stack names both
                for t, name in zip(new, self._search_names(new, frame), strict=True):
                    self.names[t] = name
            if det is not None and not det.needs_out:
                hit = self._safely(func, det.fn, _Call(args, kwargs, None, self.ties, info.packet_name))
        out = func(*args, **kwargs)
        if creates_node:
            nd = self.nodes[seq - 1] = _Node(info.op_name, loc)
            if len(self.nodes) > _MAX_NODES:
                self._forget_oldest_nodes()
            if det is not None and det.needs_out:
                hit = self._safely(func, det.fn, _Call(args, kwargs, out, self.ties, info.packet_name))
            if hit is not None:
                self._safely(func, self._schedule_kink, hit, func, loc, nd)
        elif info.compare and len(ins) and any(t.requires_grad for t in ins):
            a, b = args[0], args[1]
            self.ties[out] = (a == b, info.compare)
        outs = _floats(out)
        if info.mutable and not outs:
            outs = _floats(args[0])
        if not outs or ((info.view or info.preserving) and not self.pending and not any(t in self.prov for t in ins)):
            return out  # finite in, finite out: nothing to check (provenance is up to date when nothing is pending)
        self._check(outs, lambda bad: self._dig(func, loc, ins, bad, None, info))
        return out

    def _forget_oldest_nodes(self) -> None:
        """Keep the newest half of the node records (and their sensitivity links): memory stays bounded over
        long runs; a backward reaches nodes of its own step, which are the newest."""
        keep = list(self.nodes)[_MAX_NODES // 2 :]
        self.nodes = {k: self.nodes[k] for k in keep}
        oldest = keep[0] if keep else 0
        self.parents = {k: v for k, v in self.parents.items() if k is None or k >= oldest}

    def _backward(self, func, info, node, args, out, kwargs=None):
        self.n_bwd += 1
        seq = node._sequence_nr() if node is not None else None
        ins = _tensors(args)
        sens_ins = [t for t in ins if t in self.sens]
        outs = _floats(out)
        if info.mutable and not outs:
            outs = _floats(args[0])
        if node is None or sens_ins:  # outside any node (root grads, accumulation) every tensor is a sensitivity
            for o in outs:
                self.sens[o] = seq
            if seq is not None:
                ps = self.parents.setdefault(seq, set())
                for s in sens_ins:
                    p = self.sens.get(s)
                    if p is not None and p != seq:
                        ps.add(p)
            if seq == _ACCUMULATE_SEQ:
                self._accumulate(node, sens_ins)
            elif seq is not None:
                nd = self.nodes.get(seq)
                if nd is not None and nd.kinks:
                    self._kink_reached(nd, seq, sens_ins)
            sens = True
        else:
            sens = False
        # gw.strong_zeros()' pass: a rule that reads a non-finite value handles it
        if _strong_zeros._STATE.in_mode:
            self.strong_ran = True
            if seq is not None and _strong_zeros.lookup(func) is not None:
                self._strong_read(seq, ins)
        if not outs or ((info.view or info.preserving) and not self.pending and not any(t in self.prov for t in ins)):
            return
        self._check(outs, lambda bad: self._dig(func, None, ins, bad, seq if sens else (seq, "value"), info,
                                                args=args, out=out, kwargs=kwargs))

    def drop_provisional(self) -> None:
        """Under gw.strong_zeros(), take back what strong zeros undid: the incidents of a plain pass that the
        engine hook then redid with strong zeros (the strong pass records what remains), and contamination
        the strong pass itself met but annihilated in place (a rule's masked_fill_), which reached no gradient.
        Their births are listed as removed, unless another incident names them."""
        for inc, n, nd, strong in self.provisional:
            if strong and (inc.kind != "contamination" or id(inc) in self.reached_now):
                continue
            if not strong and not self.strong_ran:
                continue
            inc.count -= n
            inc.occurrences -= 1
            if inc.occurrences <= 0:
                self.store.incidents = {k: v for k, v in self.store.incidents.items() if v is not inc}
            site = (nd.op, nd.loc) if nd is not None else (inc.node_op, inc.loc)
            for b in inc.births:
                self.strong_reads[(b, site)] = self.strong_reads.get((b, site), 0) + 1
        self.provisional = None

    def _strong_read(self, seq, ins) -> None:
        """A backward op of gw.strong_zeros()' pass reads a forward value known to be non-finite: remember the
        births and the node; the ones no incident names at the end were annihilated by strong zeros."""
        for t in ins:
            got = self.prov.get(t)
            if got and t not in self.sens:
                nd = self.nodes.get(seq)
                site = (nd.op, nd.loc) if nd is not None else ("?", ("<backward>", 0))
                for b in got:
                    if isinstance(b, _Birth):
                        key = (b, site)
                        self.strong_reads[key] = self.strong_reads.get(key, 0) + 1

    def _collective(self, func, args, kwargs):
        """A collective (DDP's gradient all-reduce, FSDP's reduce-scatter): its buffers are written by the
        other ranks, possibly later (async), so they are not checked here; they are remembered, so that a
        NaN/Inf read from them later, or a final gradient that is not finite while every local op was, is
        reported as received from another rank."""
        frame = _user_frame()
        loc = _loc(frame)
        name = f"{func.namespace}.{func.overloadpacket.__name__}"
        self.collective_sites.setdefault((name, loc))
        out = func(*args, **kwargs)
        if len(self.collective_bufs) > 4096:  # FSDP allocates new buffers every step: forget the freed ones
            self.collective_bufs = {k: v for k, v in self.collective_bufs.items() if not v[0].expired()}
        for t in _tensors([*args, *kwargs.values(), out]):
            if t.is_floating_point() and t.layout == torch.strided:
                storage = t.untyped_storage()
                self.collective_bufs[storage._cdata] = (StorageWeakRef(storage), name, loc)
        return out

    def _received_through(self, t: torch.Tensor) -> tuple | None:
        """(op, loc) of the collective whose buffer ``t`` reads, or None."""
        if not self.collective_bufs or t.layout != torch.strided:
            return None
        entry = self.collective_bufs.get(t.untyped_storage()._cdata)
        return None if entry is None or entry[0].expired() else entry[1:]

    # -- finiteness checks: one fused reduction per output, batched off the CPU -------------------------------

    def _pass_over(self, kind: str, func) -> None:
        """Note an op the trace ran without reading (a tensor kind it cannot read, or an internal error)."""
        name = _op_name(func) if hasattr(func, "overloadpacket") else func if isinstance(func, str) else None
        entry = self.passed.setdefault(kind, [0, name if name != "a value" else None])
        entry[0] += 1

    def _safely(self, func, fn, *args):
        """``fn(*args)``, or None with a note: an explanation must never break the program it explains."""
        try:
            return fn(*args)
        except Exception as exc:  # any failure inside the trace is reported as a note, never raised
            self._pass_over(f"not explained ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})", func)
            return None

    def _check(self, outs, dig) -> None:
        odd = [o for o in outs if o.layout is not torch.strided or o._is_zerotensor() or o.is_nested or o.is_meta]
        if odd:  # sparse, mkldnn, nested, meta, ZeroTensor: nothing to reduce (or no dense reduction)
            for o in odd:
                self._pass_over(_trace_kinds.kind(o) or "unreadable", "a value")
            outs = [o for o in outs if all(o is not d for d in odd)]
            if not outs:
                return
        if (outs[0].device.type == "cpu" and not _DEFER_ON_CPU) or self.sync_every <= 1:
            if self.pending:
                self.flush()
            try:
                finite = all(math.isfinite(o.sum().item()) for o in outs)  # a sum per output: no stacking on CPU
            except RuntimeError:  # a functorch-wrapped value (vmap): it cannot be read here
                self._pass_over(_trace_kinds.kind(outs[0]) or "unreadable", "a value")
                return
            if not finite:
                self._safely("a value", dig, [o for o in outs if _nonfinite(o)])
        else:
            flag = outs[0].sum() if len(outs) == 1 else torch.stack([o.sum().float() for o in outs]).sum()
            self.pending.append((flag, outs, dig))
            if len(self.pending) >= self.sync_every:
                self.flush()

    def flush(self) -> None:
        """Settle the pending finiteness checks (one host sync for the whole batch)."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        flags = torch.stack([p[0].float() for p in pending]).tolist()
        for v, (_, outs, dig) in zip(flags, pending, strict=True):
            if not math.isfinite(v):
                bad = [o for o in outs if _nonfinite(o)]
                if bad or not outs:  # no outputs: a kink check
                    self._safely("a value", dig, bad)

    # -- digging in: only when an output was not finite ------------------------------------------------------

    def _origin(self, t: torch.Tensor, loc) -> frozenset:
        """The provenance of a non-finite tensor; data that arrived non-finite becomes an "input" birth."""
        got = self.prov.get(t)
        if got and any(isinstance(p, _Incident) for p in got):
            return self._gradient_as_value(t, got, loc)
        if got is None and t._base is not None and _nonfinite(t._base):
            got = self.prov[t] = self._origin(t._base, loc)
        if got is None and (via := self._received_through(t)) is not None:
            mask, nan = ~torch.isfinite(t), bool(torch.isnan(t).any())
            b = self._birth(via[0], via[1], nan, None, mask, lambda idx: _Birth(
                via[0], via[1], "received from another rank", 0, idx, nan, received=True), received=True)
            got = self.prov[t] = frozenset([b])
        if got is None:
            mask, nan = ~torch.isfinite(t), bool(torch.isnan(t).any())
            name = self.names.get(t) or self._search_name(t, _user_frame())
            b = self._birth("input", loc, nan, name, mask,
                            lambda idx: _Birth("input", loc, "arrived non-finite", 0, idx, nan, name=name))
            got = self.prov[t] = frozenset([b])
        return got

    def _birth(self, op, loc, nan, name, mask, make, parents=(), received=False) -> _Birth:
        """The interned birth of this site: its indices and description are computed the first time only."""
        key = self.store.birth_key(op, loc, nan, name, received)
        known = self.store.known(key)
        return self.store.birth(key, _count(mask), lambda: make(_first(mask)) if known is None else None, parents)

    def _gradient_as_value(self, t: torch.Tensor, got: frozenset, loc) -> frozenset:
        """A non-finite gradient used as a forward value (an optimizer step writing it into a parameter): its
        NaN/Inf is born again there, with the incidents' births as parents, so the next step's findings point
        back to the earlier backward."""
        cached = self.as_value.get(t)
        if cached is not None:
            return cached
        incidents = [p for p in got if isinstance(p, _Incident)]
        first = min(incidents, key=lambda i: i.order)
        what = (f"a gradient with {first.kind if first.kind == 'contamination' else 'genuine ' + first.kind} from "
                f"{first.op} (the backward of {first.node_op}) at {_fmt(first.loc)}, used as a value")
        parents = frozenset(p for p in got if isinstance(p, _Birth)).union(*(i.births for i in incidents))
        nan, name = bool(torch.isnan(t).any()), self.names.get(t)
        b = self._birth("gradient", loc, nan, name, ~torch.isfinite(t),
                        lambda idx: _Birth("gradient", loc, what, 0, idx, nan, name=name), parents)
        got = self.as_value[t] = frozenset([b])
        return got

    def _dig(self, func, loc, ins, bad, seq, info, args=None, out=None, kwargs=None) -> None:
        node_seq = seq[0] if isinstance(seq, tuple) else seq
        nd = self.nodes.get(node_seq) if node_seq is not None else None
        if loc is None:  # a node the forward did not record: a custom Function's backward runs the user's code
            frame = _user_frame() if nd is None else None
            loc = nd.loc if nd is not None else _loc(frame) if frame is not None else ("<backward>", 0)
        for o in bad:
            mask = ~torch.isfinite(o)
            prior = self.prov.get(o) if info.mutable else None
            nf = [t for t in ins if t is not o and _nonfinite(t)]
            if seq is None or isinstance(seq, tuple):
                self._value(func, loc, o, mask, nf, prior, nd, ins,
                            base=o._base if info.mutable and o._base is not None else None)
                # an in-place write made it non-finite (a .grad scaled by NaN: clip_grad_norm_'s _foreach_mul_)
                if o not in self.written and not any(isinstance(p, _Incident) for p in prior or ()) and any(
                        o is t for t in ins):
                    self.written[o] = (_op_name(func), loc)
            elif prior:  # accumulating into a gradient already non-finite (a second backward): carry it
                self.prov[o] = prior.union(*(self.prov.get(t, frozenset()) for t in nf if t in self.sens))
            else:
                self._meet(func, loc, o, mask, ins, nf, nd, node_seq, args, out, kwargs)
            if info.mutable and o._base is not None and o in self.prov:
                self.prov[o._base] = self.prov[o]

    def _value(self, func, loc, o, mask, nf, prior, nd, ins=(), base=None) -> None:
        """A forward value (or one a backward formula made from saved values): propagate or record a birth."""
        # An unknown 0-dim tensor is a wrapped constant (x[2] = nan): the value is born at this op; so is the
        # data of a literal (torch.tensor([..., nan]) reaches the dispatcher as lift_fresh of a fresh tensor).
        literal = func.overloadpacket in _LITERALS
        if literal and o.numel() <= 1:
            return  # a lifted scalar (x[2] = nan): the op that writes it is where it is born
        nf = [t for t in nf if t in self.prov or ((t.dim() or t.requires_grad) and not literal)]
        births = frozenset().union(*(self._origin(t, loc) for t in nf)) if nf else frozenset()
        if prior:
            births |= prior
        has_nan = bool(mask_any(torch.isnan(o).logical_and_(mask)))  # no masked copy of o
        # an in-place op on a tensor already known non-finite (DDP's bucket.div_) carries its NaN, not makes it
        prior_nan = any(getattr(b, "nan", True) for b in prior) if prior else False
        new_nan = has_nan and not prior_nan and not any(bool(torch.isnan(t).any()) for t in nf)
        if (not nf and not prior) or new_nan:
            op = _op_name(func)

            def make(idx):
                what = _explain(func, nf or [t for t in ins if t is not o], o, mask)  # why, from its inputs
                if nd is not None and nd.op != op and (not nf or new_nan) and loc == nd.loc:
                    what = f"{what} (in the backward formula of {nd.op})"
                return _Birth(op, loc, what, 0, idx, has_nan)

            b = self._birth(op, loc, has_nan, None,
                            _in_base(torch.isnan(o) if new_nan and (nf or prior) else mask, o, base), make, births)
            births = frozenset([b])
        self.prov[o] = births

    def _meet(self, func, loc, o, mask, ins, nf, nd, seq, args, out, kwargs=None) -> None:
        """A sensitivity op made non-finite elements: propagate them, or classify where they are born."""
        sens_ins = [t for t in ins if t in self.sens]
        upstream = [t for t in nf if t in self.sens]
        if upstream:  # already non-finite upstream: carry it along
            self.prov[o] = frozenset().union(*(self.prov.get(t, frozenset()) for t in upstream))
            return
        births = frozenset().union(*(self._origin(t, loc) for t in nf)) if nf else frozenset()
        genuine = self._nonzero_sensitivity_met(func, o, mask, ins, sens_ins, nf, args, out, kwargs)
        # strong zeros' semantics: a zero sensitivity is structural only where an op that discards values
        # (slice, where, mask, ignored targets...) made it; a zero the program computes (0 * sqrt(w)) is an
        # ordinary zero, and 0 x NaN = NaN there is genuine, for the trace as for gw.grad
        discarded = self._discarded_by(sens_ins)
        computed_zero = discarded is None and self._from_a_product(sens_ins) and bool(mask_any(mask & ~genuine))
        if computed_zero:
            genuine = torch.ones_like(mask)
        undecided = False
        incidents = []
        node = torch._C._current_autograd_node() if nd is None else None
        op, node_op = _op_name(func), nd.op if nd is not None else node.name() if node is not None else "?"
        for kind_mask, contaminated in ((mask & ~genuine, True), (mask & genuine, False)):
            count, idx = _positions(kind_mask)
            if not count:
                continue
            has_nan = bool(mask_any(torch.isnan(o).logical_and_(kind_mask)))
            if contaminated:
                kind = "contamination"
                what = ("a zero sensitivity met " + ("NaN/Inf" if births else "0/0 or 0 x Inf")
                        + f" in {op} (the backward of {node_op})")
            else:
                kind = "nan" if has_nan else "inf"
                what = (f"a nonzero sensitivity met NaN/Inf in {op} (the backward of {node_op})" if births else
                        f"the backward of {node_op} made {'NaN' if has_nan else 'Inf'} from finite values in {op} "
                        "(an infinite derivative used)")
                if computed_zero:
                    what += ("; the sensitivity there is a zero the program computed (no op that discards values "
                             "made it): an ordinary zero, 0 x NaN = NaN, kept by gw.strong_zeros() too")
                undecided = bool(births) and _undecidable(func, ins, o)
                for b in births:
                    b.used = True
            inc = self.store.incident(kind, op, node_op, loc, count, idx, births, what,
                                      discarded if contaminated else None, undecided)
            incidents.append(inc)
            if self.provisional is not None:
                self.provisional.append((inc, count, nd, _strong_zeros._STATE.in_mode))
        self.prov[o] = frozenset(incidents)

    def _nonzero_sensitivity_met(self, func, o, mask, ins, sens_ins, nf, args, out, kwargs=None) -> torch.Tensor:
        """Bool mask over `o`: where a nonzero sensitivity met a non-finite value (genuine), else contamination."""
        if _aligned(ins, o.shape) and func.overloadpacket not in _ROW_MIXING:  # elementwise: positions line up
            nonzero = torch.zeros(o.shape, dtype=torch.bool)
            for s in sens_ins:
                nonzero = nonzero | (s != 0).broadcast_to(o.shape)
            return nonzero
        if func.overloadpacket in _BILINEAR and args is not None:
            # The op is linear in the sensitivity and in the saved value: evaluate it on indicators
            # (nonzero sensitivity, non-finite value) to see which outputs mix the two.
            def ind(a):
                if not isinstance(a, torch.Tensor) or not a.is_floating_point():
                    return a
                if a in self.sens:
                    return (a != 0).to(a.dtype)
                return (~torch.isfinite(a)).to(a.dtype) if any(a is t for t in nf) else torch.zeros_like(a)

            new_args = [[ind(x) for x in a] if isinstance(a, (list, tuple)) else ind(a) for a in args]
            res = func(*new_args)
            outs = res if isinstance(res, (list, tuple)) else [res]
            olist = out if isinstance(out, (list, tuple)) else [out]
            for r, oo in zip(outs, olist, strict=False):
                if oo is o and isinstance(r, torch.Tensor):
                    return r != 0
        if args is not None and out is not None:
            strong = _strong_rerun(func, args, kwargs or {}, sens_ins, o, out)
            if strong is not None:  # what strong zeros leave non-finite is genuine, what they remove contamination
                return ~torch.isfinite(strong)
        # Unknown mixing: contamination only when every sensitivity is zero throughout.
        nonzero_anywhere = any(bool((s != 0).any()) for s in sens_ins)
        return torch.full(o.shape, nonzero_anywhere, dtype=torch.bool)

    def _from_a_product(self, sens_ins) -> bool:
        """Did the zero sensitivity come straight from the backward of a product with a value (0 * x, a
        matmul with a zero weight)? Those zeros are values of the program, not structure."""
        for s in sens_ins:
            nd = self.nodes.get(self.sens.get(s))
            if nd is not None and nd.op in _PRODUCTS:
                return True
        return False

    def _discarded_by(self, sens_ins) -> tuple | None:
        """The discarding op upstream in the sensitivity flow (slice, where, ...) whose backward made the zero
        sensitivity: the nearest one that selects (slice, index, where, masks, ignored targets, overwrites) if
        any, else the nearest elementwise one (relu, clamp, max: their zeros are spread through the tensor and
        rarely line up with discarded rows)."""
        frontier = [self.sens.get(s) for s in sens_ins]
        seen: set = set()
        fallback = None
        while frontier:
            nxt = []
            for seq in frontier:
                if seq is None or seq in seen:
                    continue
                seen.add(seq)
                nd = self.nodes.get(seq)
                op = getattr(aten, nd.op[5:], None) if nd is not None else None
                if op in _DISCARDS:
                    if op not in _ELEMENTWISE_DISCARDS:
                        return nd.op, nd.loc
                    fallback = fallback or (nd.op, nd.loc)
                nxt.extend(self.parents.get(seq, ()))
            frontier = nxt
        return fallback

    # -- leaves and their names ------------------------------------------------------------------------------

    def _accumulate(self, node, sens_ins) -> None:
        var = node.variable
        for s in sens_ins:
            for inc in self.prov.get(s, ()):
                if isinstance(inc, _Incident):
                    inc.reaches.add(self.leaf_name(var))
                    self.reached_now.add(id(inc))

    def reached(self, grad: torch.Tensor, leaf: torch.Tensor) -> None:
        """A final gradient (from torch.autograd.grad) for `leaf`: record which findings reach it."""
        incs = [i for i in self.prov.get(grad, ()) if isinstance(i, _Incident)]
        for inc in incs:
            inc.reaches.add(self.leaf_name(leaf))
            self.reached_now.add(id(inc))
        if not incs and _nonfinite(grad):
            self.store.orphan(self.leaf_name(leaf), int((~torch.isfinite(grad)).sum()))

    def leaf_name(self, t: torch.Tensor) -> str:
        name = self.names.get(t)
        if name is None:
            name = self.names[t] = self._search_name(t, _user_frame())
        return name

    def _search_name(self, t: torch.Tensor, frame) -> str:
        return self._search_names([t], frame)[0]

    def _search_names(self, ts: list[torch.Tensor], frame) -> list[str]:
        """The names the user knows ``ts`` by: a variable, or `module.param` for a module's parameter; the
        outermost user frame that has one wins (the script's `model.fc.weight` over a method's
        `self.fc.weight`)."""
        best: dict[int, str] = {}
        wanted = {id(t) for t in ts}
        f = frame
        while f is not None:
            if not _is_internal(f.f_code):
                for k, v in list(f.f_locals.items()):
                    if id(v) in wanted:
                        best[id(v)] = k
                    elif isinstance(v, torch.nn.Module):
                        names = self._param_names(v)
                        for i in wanted:
                            p = names.get(i)
                            if p is not None and not (i in best and k == "self"):
                                best[i] = f"{k}.{p}"
            f = f.f_back
        return [best.get(id(t)) or f"tensor{list(t.shape)}" for t in ts]

    def _param_names(self, module) -> dict:
        names = self.module_names.get(module)
        if names is None:
            names = self.module_names[module] = {id(p): n for n, p in module.named_parameters()}
        return names

    # -- kinks ----------------------------------------------------------------------------------------------

    def _schedule_kink(self, hit: _Hit, func, loc, nd: _Node) -> None:
        key = (hit.kind, _op_name(func), loc)

        def settle(mask):
            count = _count(mask)
            if count <= 0:
                return
            g = self.kinks.get(key)
            if g is None:
                g = self.kinks[key] = _KinkGroup(hit.kind, key[1], loc, hit.convention)
                g.indices = _first(mask)
            g.count += count
            g.occurrences += 1
            nd.kinks.append((key, mask if hit.aligned else None))

        mask = hit.mask
        found = hit.found if hit.found is not None else mask_any(mask)  # cheaper than counting
        decided = isinstance(found, bool)  # on the host already
        now = decided or (found.device.type == "cpu" and not _DEFER_ON_CPU) or self.sync_every <= 1
        if now and not (found if decided else found.item()):
            return
        if callable(mask):
            mask = mask()  # made only when it may hold a kink; deferred: now, before x can change
        if now:
            settle(mask)
        else:
            flag = torch.where(found, float("inf"), 0.0)  # non-finite flags are the ones flush settles
            self.pending.append((flag, [], lambda _bad: settle(mask)))

    def _kink_reached(self, nd: _Node, seq, sens_ins) -> None:
        for s in sens_ins:
            if self.sens.get(s) == seq:
                continue  # made inside this node: not its incoming gradient
            for key, mask in nd.kinks:
                g = self.kinks[key]
                if g.reached:
                    continue
                if mask is not None and mask.shape == s.shape:
                    # a sensitivity nonzero everywhere reaches any kink; else compare where the mask holds
                    g.reached = bool(s.abs().amin() > 0) or bool(mask_any((s != 0).logical_and_(mask)))
                else:
                    g.reached = bool(mask_any(s != 0))
            nd.kinks = []
            return

    # -- the report -------------------------------------------------------------------------------------------

    def fill(self, report: Report, since: int = 0) -> None:
        """Fill ``report`` (linear in the records kept); ``since`` (the store's event counter when a nested block
        began) leaves out what was last seen before it."""
        self.flush()
        report.forward_ops, report.backward_ops = self.n_fwd, self.n_bwd
        findings: dict[tuple, Finding] = {}

        origin: dict[tuple, _Birth] = {}  # finding key -> the birth that explains it (root causes)

        def add(key, make, count, reaches, indices, occurrences=1, step=None, birth=None):
            f = findings.get(key)
            if f is None:
                f = findings[key] = make()
                f.count, f.indices, f.occurrences = 0, indices, 0
                if birth is not None:
                    origin[key] = birth
            f.count += count
            f.occurrences += occurrences
            f.reaches = sorted(set(f.reaches) | set(reaches))
            if step is not None and (f.step is None or step < f.step):
                f.step = step

        birthless: set = set()
        for inc in sorted(self.store.incidents.values(), key=lambda i: i.order):
            if inc.serial <= since:
                continue
            birth = earliest(inc.births)
            if inc.kind == "contamination":
                key = ("contamination", inc.op, inc.loc, birth.op if birth else None, birth.loc if birth else None)
                add(key, lambda inc=inc, birth=birth: self._contamination(inc, birth), inc.count, inc.reaches,
                    inc.indices, inc.occurrences, inc.step, birth)
            elif birth is not None:  # named by where it was born: count and elements are the born tensor's
                key = (inc.kind, birth.op, birth.loc)
                new = key not in findings
                add(key, lambda inc=inc, birth=birth: self._genuine(inc.kind, inc, birth),
                    birth.count if new else 0, inc.reaches, birth.indices, birth.occurrences if new else 0,
                    birth.step, birth)
            else:
                key = (inc.kind, inc.node_op, inc.loc)
                add(key, lambda inc=inc: self._genuine(inc.kind, inc, None), inc.count, inc.reaches, inc.indices,
                    inc.occurrences, inc.step)
                birthless.add(key)
        for birth in sorted(self.output_births, key=lambda b: b.order):
            kind = "nan" if birth.nan else "inf"
            key = (kind, birth.op, birth.loc)
            if key in birthless:  # the output itself is NaN/Inf from the forward: that is the explanation
                old = findings[key]
                findings[key] = self._genuine(kind, None, birth)
                findings[key].count, findings[key].indices = birth.count, birth.indices
                findings[key].occurrences, findings[key].reaches = old.occurrences, old.reaches
                findings[key].step, origin[key] = old.step, birth
            elif key not in findings:
                add(key, lambda birth=birth, kind=kind: self._genuine(kind, None, birth), birth.count, [],
                    birth.indices, birth.occurrences, birth.step, birth)
        self._grads_made_nonfinite_after_backward(findings, add)
        for name, (count, occurrences, serial) in self.store.orphans.items():
            if serial > since:
                add(("nan", "unknown", name), lambda name=name: Finding(
                    "nan", "unknown", "<unknown>", 0, message=f"the gradient of {name} is not finite; its birth was "
                    "not observed (made outside the traced block?)"), count, [name], [], occurrences)
        if self.collective_sites:
            self._add_received(findings)
        for g in self.kinks.values():
            findings[(g.kind, g.op, g.loc)] = Finding(
                g.kind, g.op, _fmt(g.loc), g.count, fix=_KINK_FIX if g.kind == "kink" else _SINGULAR_FIX,
                message=f"{g.count} element(s) at a {'kink' if g.kind == 'kink' else 'singular point'}",
                source=_source(g.loc), indices=g.indices, convention=g.convention, reached_gradient=g.reached,
                occurrences=g.occurrences)
        order = {k: i for i, k in enumerate(("contamination", "nan", "inf", "singular", "kink"))}
        report.findings = sorted(findings.values(), key=lambda f: (order[f.kind], f.location))
        report.causes = _trace_causes.group(report.findings, {id(f): origin[k] for k, f in findings.items()
                                                              if k in origin}, _fmt, self.store.step)
        report.notes = [f"{kind} tensors: {n} op(s) or value(s) passed over" + (f" (first: {op})" if op else "")
                        if not kind.startswith("not explained") else f"{op or 'a value'}: {kind} ({n}x)"
                        for kind, (n, op) in self.passed.items()]
        report.removed = _trace_causes.removed(self.strong_reads, self.store.incidents.values(), _fmt)
        report.unused = self._unused(removed={b for b, _ in self.strong_reads})
        rank = _dist_rank()
        for f in report.findings:
            f.rank = rank

    def _add_received(self, findings: dict) -> None:
        """Under data parallelism a rank whose own ops were all finite can still end with NaN/Inf gradients:
        another rank's, averaged in by the all-reduce. Those gradients no local finding reaches."""
        local = {name for f in findings.values() for name in f.reaches}
        counts, has_nan = {}, False
        for leaf, name in list(self.names.items()):
            g = leaf.grad
            if name not in local and isinstance(g, torch.Tensor) and _nonfinite(g):
                counts[name] = int((~torch.isfinite(g)).sum())
                has_nan |= bool(torch.isnan(g).any())
        if not counts:
            return
        op, loc = next(iter(self.collective_sites))
        kind = "nan" if has_nan else "inf"
        findings[("received", op, loc)] = Finding(
            kind, op, _fmt(loc), sum(counts.values()), reaches=sorted(counts), source=_source(loc),
            message=f"received through {op}: this rank's own ops were finite, its gradients after the collective "
                    "are not",
            born_op=op, born_location=_fmt(loc), born=f"another rank's {'NaN' if has_nan else 'Inf'}, received "
            f"through {op}", fix="gw.gather_reports(report) on every rank names the rank that introduced it; "
            "gw.ddp_nonfinite_hook stops or skips such a step on every rank")

    def _contamination(self, inc: _Incident, birth: _Birth | None) -> Finding:
        disc_op, disc_loc = inc.discarded if inc.discarded else (None, None)
        rewrite = _DISCARDS.get(getattr(aten, disc_op[5:], None)) if disc_op else None
        if rewrite is None:
            rewrite = "mask the value before the op that makes NaN/Inf (e.g. before the division)"
        if disc_op is None:  # no op upstream discards values: the zero may be one the program computes
            return Finding(
                "contamination", inc.op, _fmt(inc.loc), inc.count,
                message=f"{inc.what}; the sensitivity there is 0, but no op that discards values (slice, where, "
                "mask...) made it: if the program computes that 0 (0 * x), it is an ordinary zero and the NaN is "
                "genuine for gw.grad too", source=_source(inc.loc), born_op=birth.op if birth else inc.op,
                born_location=_fmt(birth.loc) if birth else _fmt(inc.loc),
                born=birth.describe() if birth else f"0/0 or 0 x Inf in {inc.op}, the backward of {inc.node_op}",
                fix=f"if the zero stands for 'not used', gw.strong_zeros() removes it only where a discarding op "
                    f"made it; otherwise {rewrite}")
        born = birth.describe() if birth else \
            f"0/0 or 0 x Inf in {inc.op}, the backward of {inc.node_op} at {_fmt(inc.loc)}"
        return Finding(
            "contamination", inc.op, _fmt(inc.loc), inc.count, message=f"{inc.what}; the output never used it",
            source=_source(inc.loc), born_op=birth.op if birth else inc.op,
            born_location=_fmt(birth.loc) if birth else _fmt(inc.loc), born=born,
            discarded_op=disc_op, discarded_location=_fmt(disc_loc) if disc_loc else None,
            fix=f"gw.strong_zeros() (or gw.grad / gw.backward) removes it. Local rewrite: {rewrite}.")

    def _genuine(self, kind: str, inc: _Incident | None, birth: _Birth | None) -> Finding:
        if birth is not None:
            op, loc = birth.op, birth.loc
            fix = _INPUT_FIX if birth.op == "input" else _GRADIENT_FIX if birth.op == "gradient" else \
                _GENUINE_FIX.get(getattr(aten, birth.op[5:], None), "")
            message = f"{birth.what}; " + (_UNDECIDED.format(op=inc.op) if inc is not None and inc.undecided
                                           else "the output depends on it")
        else:
            op, loc = inc.node_op, inc.loc
            fix = _GENUINE_FIX.get(getattr(aten, op[5:], None), "")
            message = inc.what
        return Finding(kind, op, _fmt(loc), 0, fix=fix or "find why the value is not finite where it is used",
                       message=message, source=_source(loc), born_op=birth.op if birth else (inc.op if inc else None),
                       born_location=_fmt(birth.loc) if birth else (_fmt(inc.loc) if inc else None),
                       born=birth.describe() if birth else (inc.what if inc else None))

    def _grads_made_nonfinite_after_backward(self, findings: dict, add: Callable) -> None:
        """A parameter's .grad that is not finite at the end of the block although no backward finding reaches
        it: something after the backward wrote NaN/Inf into it (clip_grad_norm_ with a NaN total norm scales
        every gradient by NaN). Reported with the op that did it, from the gradient's provenance."""
        reached = {r for f in findings.values() for r in f.reaches}
        for leaf, name in self.names.items():
            g = getattr(leaf, "grad", None) if isinstance(leaf, torch.Tensor) else None
            if g is None or name in reached or not _nonfinite(g):
                continue
            births = [b for b in self.prov.get(g, ()) if isinstance(b, _Birth)]
            if not births or g not in self.written or all(b.received for b in births):
                continue  # a collective's write (DDP copying the averaged bucket back): _add_received says so
            b = births[0]
            op, loc = self.written[g]
            kind = "nan" if bool(torch.isnan(g).any()) else "inf"
            count, idx = _positions(~torch.isfinite(g))
            add((kind, op, loc, "grad", name), lambda b=b, kind=kind, name=name, op=op, loc=loc: Finding(
                kind, op, _fmt(loc), 0, source=_source(loc), born_op=b.op, born_location=_fmt(b.loc),
                born=b.describe(), message=f"the gradient of {name} was finite after backward; {op} wrote "
                f"{'NaN' if kind == 'nan' else 'Inf'} into it afterwards, from {b.describe()}",
                fix="a step after backward mixes gradients (clip_grad_norm_'s total norm, a NaN guard): fix the "
                    "non-finite gradient it read (see the other findings), or skip the step when the total norm "
                    "is not finite (clip_grad_norm_(..., error_if_nonfinite=True))"), count, [name], idx)

    def _unused(self, removed=frozenset()) -> list[str]:
        explained: set = set(removed)
        stack = [b for inc in self.store.incidents.values() for b in inc.births] + list(self.output_births)
        while stack:
            b = stack.pop()
            if b not in explained:
                explained.add(b)
                stack.extend(b.parents)
        groups: dict = {}
        for b in self.store.births.values():
            if b not in explained and not b.received and b.op not in _NOT_DATA:
                key = (b.op if b.op != "input" else f"input {b.name}", _fmt(b.loc))
                groups[key] = groups.get(key, 0) + b.count
        return [f"{op} at {loc} ({n} value{'s' if n != 1 else ''})" for (op, loc), n in groups.items()]

    # -- autograd entry points -------------------------------------------------------------------------------

    def roots(self, outputs, grads):
        """Check the outputs being differentiated and make their gradients, marked as sensitivities."""
        self.flush()
        single = isinstance(outputs, (torch.Tensor, torch.autograd.graph.GradientEdge))
        outputs = (outputs,) if single else tuple(outputs)
        if grads is None or isinstance(grads, torch.Tensor):
            grads = [grads] * len(outputs) if grads is None else [grads]
        grads = list(grads)
        # a backward inside a backward (checkpoint(use_reentrant=True)) differentiates recomputed activations
        # with the outer sensitivities: they are not outputs the user's result depends on as such
        reentrant = self.depth > 0
        for i, (o, g) in enumerate(zip(outputs, grads, strict=False)):
            births = [] if reentrant else [b for b in self.prov.get(o, ()) if isinstance(b, _Birth)]
            # a parameter made NaN by an earlier backward makes the whole output NaN: it explains the others
            inherited = [b for b in births if b.op == "gradient"]
            for b in inherited or births:
                b.used = True
                self.output_births.add(b)
            if g is None and isinstance(o, torch.Tensor) and o.numel() == 1 and o.requires_grad:
                grads[i] = g = torch.ones_like(o, memory_format=torch.preserve_format)
            if isinstance(g, torch.Tensor):
                self.sens[g] = None
        return outputs, grads


# births that are no data of the program: uninitialised memory (overwritten before use) and NaN gradients used
# as values (consequences of findings, reported there)
_NOT_DATA = {"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided",
             "gradient"}
_KINK_FIX = ("not an error: the gradient here is PyTorch's convention, one element of the subdifferential. To test "
             "optimality use gw.stationarity(f, x); for an exact one-sided derivative gw.directional_derivative.")
_SINGULAR_FIX = ("an infinite derivative (a norm or root at 0): if the gradient must be finite here, smooth the op "
                 "(sqrt(x + eps), vector_norm(x + eps)), or use gw.directional_derivative / gw.generalized_grad, "
                 "which are exact there")
# forward ops whose backward multiplies the incoming sensitivity by a forward value: a zero they send is the
# value's zero (computed by the program), not a structural one
_PRODUCTS = {"aten.mul", "aten.div", "aten.mm", "aten.bmm", "aten.addmm", "aten.matmul", "aten.mv", "aten.dot",
             "aten.outer", "aten.linear", "aten.einsum", "aten.baddbmm"}
# Backward ops whose inputs and output share a shape but that mix a whole row (softmax's sum over the row).
_ROW_MIXING = {aten._softmax_backward_data, aten._log_softmax_backward_data}


def _undecidable(func, ins, o) -> bool:
    """A backward op the trace cannot split into contamination and genuine: not elementwise, not bilinear, and
    without a strong-zero rule or decomposition to run again."""
    return not (_aligned(ins, o.shape) and func.overloadpacket not in _ROW_MIXING) and \
        func.overloadpacket not in _BILINEAR and not _reruns(func)


def _reruns(func) -> bool:
    """Whether `_strong_rerun` can run ``func`` under the strong-zero rules (a rule or a decomposition, and no
    in-place write)."""
    return not func._schema.is_mutable and (
        _strong_zeros.lookup(func) is not None or _strong_zeros._decomposition(func) is not None)


def _in_base(mask: torch.Tensor, view: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """``mask`` over an in-place write's target (``x[5:] = nan``) moved to the tensor it views, so the elements
    are reported where the user sees them."""
    if base is None:
        return mask
    try:
        full = torch.zeros_like(base, dtype=torch.bool)
        full.as_strided(view.shape, view.stride(), view.storage_offset() - base.storage_offset()).copy_(mask)
        return full
    except RuntimeError:  # a view whose layout does not map onto its base's (rare): its own coordinates
        return mask


def _strong_rerun(func, args, kwargs, sens_ins, o, out) -> torch.Tensor | None:
    """``func`` run again under the strong-zero rules, every zero of its sensitivities taken as structural: the
    counterpart of ``o`` (what strong zeros leave non-finite), or None where no rule nor decomposition covers the
    op (or it writes in place)."""
    if not _reruns(func):
        return None
    outs = out if isinstance(out, (list, tuple)) else [out]
    at = next((i for i, t in enumerate(outs) if t is o), None)
    if at is None:
        return None
    mode = _strong_zeros._StrongZeroMode()
    for s in sens_ins:
        mode.supports.record(s, s != 0)
    try:
        with torch.no_grad(), mode:
            res = func(*args, **kwargs)
    except Exception:  # an explanation must never break the program it explains
        return None
    r = (res if isinstance(res, (list, tuple)) else [res])[at]
    return r if isinstance(r, torch.Tensor) and r.shape == o.shape else None


_BILINEAR = {aten.mm, aten.bmm, aten.addmm, aten.baddbmm, aten.addbmm, aten.mv, aten.dot, aten.convolution_backward,
             aten.convolution, aten._convolution, aten.matmul, aten.linear, aten.einsum, aten.addmv, aten.outer,
             aten.tensordot}

# -- public API ------------------------------------------------------------------------------------------------

# Per-thread tracers: torch.autograd.backward/grad are wrapped once (reference-counted, under a lock) and the
# wrappers look up the calling thread's tracer; a thread without one runs PyTorch's functions untouched. The
# dispatch mode itself is thread-local (PyTorch's mode stack is).
_LOCK = threading.Lock()
_TRACERS: dict[int, _Tracer] = {}  # thread id -> its outermost active tracer
_WATCHERS: dict = {}  # thread id -> its gw.watch() state (_watch._Watcher), while no tracer runs there
_ORIGINAL: list = []  # [torch.autograd.backward, torch.autograd.grad] while wrapped
_installed = 0


def _current() -> _Tracer | None:
    return _TRACERS.get(threading.get_ident())


@contextlib.contextmanager
def _backward_call(tracer: _Tracer) -> Iterator[None]:
    """Around one backward/grad call. Under gw.strong_zeros() the engine hook may run a plain pass, then redo
    it with strong zeros when a gradient came out non-finite: what the plain pass recorded is provisional and
    is dropped when the strong pass ran (the strong pass records what remains, and what it removed)."""
    outer = tracer.depth == 0
    if outer:
        tracer.provisional = [] if _strong_zeros._STATE.depth else None
        tracer.strong_ran = False
    tracer.depth += 1
    try:
        yield
    finally:
        tracer.depth -= 1
        tracer.flush()
        tracer.backward_ended = not tracer.depth
        if outer:
            if tracer.provisional:
                tracer.drop_provisional()
            tracer.provisional = None
            tracer.reached_now = set()


def _traced_backward(tensors, grad_tensors=None, *args, **kwargs):
    tracer = _current()
    if tracer is not None and torch._C._are_functorch_transforms_active():
        tracer._pass_over("functorch-transformed (vmap, batched gradient)", "torch.autograd.backward")
        tracer = None
    if tracer is None:
        watcher = _WATCHERS.get(threading.get_ident())
        if watcher is not None:
            return watcher.backward(_ORIGINAL[0], tensors, grad_tensors, *args, **kwargs)
        return _ORIGINAL[0](tensors, grad_tensors, *args, **kwargs)
    tensors, grad_tensors = tracer.roots(tensors, grad_tensors)
    with _backward_call(tracer):
        return _ORIGINAL[0](tensors, grad_tensors, *args, **kwargs)


def _traced_grad(outputs, inputs, grad_outputs=None, *args, **kwargs):
    tracer = _current()
    if tracer is not None and (kwargs.get("is_grads_batched") or torch._C._are_functorch_transforms_active()
                               or not all(_trace_kinds.readable(g) for g in _tensors(
                                   [grad_outputs] if isinstance(grad_outputs, torch.Tensor) else grad_outputs or ()))):
        tracer._pass_over("functorch-transformed (vmap, batched gradient)", "torch.autograd.grad")
        tracer = None  # batched gradients: their values cannot be read here
    if tracer is None:
        watcher = _WATCHERS.get(threading.get_ident())
        if watcher is not None:
            return watcher.grad(_ORIGINAL[1], outputs, inputs, grad_outputs, *args, **kwargs)
        return _ORIGINAL[1](outputs, inputs, grad_outputs, *args, **kwargs)
    outputs, grad_outputs = tracer.roots(outputs, grad_outputs)
    with _backward_call(tracer):
        result = _ORIGINAL[1](outputs, inputs, grad_outputs, *args, **kwargs)
        tracer.flush()
        if isinstance(inputs, (torch.Tensor, torch.autograd.graph.GradientEdge)) or not isinstance(
                inputs, (list, tuple)):
            leaves = (inputs,)
        else:
            leaves = tuple(inputs)
        for g, leaf in zip(result, leaves, strict=False):
            # torch.func.grad calls this too; under vmap its gradients are batched and cannot be read here
            if isinstance(g, torch.Tensor) and isinstance(leaf, torch.Tensor) and _trace_kinds.readable(g):
                tracer._safely("torch.autograd.grad", tracer.reached, g, leaf)  # a legacy-vmap batched g
    return result


def _install() -> None:
    global _installed
    with _LOCK:
        if _installed == 0:
            _ORIGINAL[:] = [torch.autograd.backward, torch.autograd.grad]
            torch.autograd.backward, torch.autograd.grad = _traced_backward, _traced_grad
        _installed += 1


def _uninstall() -> None:
    global _installed
    with _LOCK:
        _installed -= 1
        if _installed == 0:
            torch.autograd.backward, torch.autograd.grad = _ORIGINAL
            _ORIGINAL.clear()


@contextlib.contextmanager
def trace(*, sync_every: int = 256) -> Iterator[Report]:
    """Record the forward and backward passes run in the block and explain every NaN/Inf and every kink.

    Works with any number of ``.backward()`` / ``torch.autograd.grad`` calls, modules and custom Functions.
    The report is filled in when the block exits (also when it raises, e.g. on KeyboardInterrupt).
    ``sync_every``: on accelerators, finiteness checks are batched and settled every this many ops (one host
    sync per batch); on CPU every op is checked at once. The trace belongs to the thread that opened it: other
    threads' backward passes are not traced and pay nothing. Memory stays bounded over long runs (repeats of a
    finding are counted, not stored).

    Example::

        >>> import torch, gradwise as gw
        >>> x = torch.tensor([-1.0, 4.0], requires_grad=True)
        >>> with gw.trace() as report:
        ...     torch.where(x > 0, x.sqrt(), x).sum().backward()
        >>> [f.kind for f in report.findings]
        ['contamination']
        >>> report.findings[0].reaches
        ['x']
    """
    if not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every must be a positive int, got {sync_every!r}")
    report = Report()
    outer = _current()
    if outer is not None:  # nested (a script using gw.explain run by `gradwise run`): the outer block records
        since = outer.store.serial
        try:
            yield report
        finally:
            outer.fill(report, since)
        return
    tracer = _Tracer(sync_every)
    me = threading.get_ident()
    _install()
    _TRACERS[me] = tracer
    try:
        with tracer:
            yield report
    finally:
        _TRACERS.pop(me, None)
        _uninstall()
        _SCRATCH.buf = None
        tracer.fill(report)


def snapshot(thread: int | None = None) -> Report | None:
    """The report so far of the `gw.trace()` block running in ``thread`` (a ``threading.get_ident()``; default:
    the main thread), without ending it; None when that thread traces nothing. Safe to call from a signal
    handler (the CLI prints it on SIGTERM): the trace's dispatch mode is switched off while the report is built,
    and recording goes on afterwards."""
    tracer = _TRACERS.get(threading.main_thread().ident if thread is None else thread)
    if tracer is None:
        return None
    report = Report()
    with torch.utils._python_dispatch._disable_current_modes():
        tracer.fill(report)
    return report


def explain(fn: Callable[..., torch.Tensor], *args, **kwargs) -> Report:
    """Call ``fn(*args, **kwargs)``, back-propagate its scalar result and explain every NaN/Inf and kink.

    The gradients are taken with ``torch.autograd.grad`` with respect to every leaf the result depends on, so
    no ``.grad`` is changed.

    Example::

        >>> import torch, gradwise as gw
        >>> x = torch.tensor([0.0, 2.0], requires_grad=True)
        >>> report = gw.explain(lambda x: torch.relu(x).sum(), x)
        >>> [(f.kind, f.op, f.count) for f in report.findings]
        [('kink', 'aten.relu', 1)]
    """
    if not callable(fn):
        raise TypeError(f"gw.explain(fn, *args): fn must be callable, got {type(fn).__name__}")
    with trace() as report:
        out = fn(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"gw.explain: fn must return a scalar tensor to back-propagate, got {type(out).__name__}; "
                            "return the loss (e.g. out.sum())")
        if not out.is_floating_point():
            raise TypeError(f"gw.explain: fn returned a {out.dtype} tensor; gradients need a floating-point result")
        if out.numel() != 1:
            raise ValueError(f"gw.explain: fn returned shape {tuple(out.shape)}, not a scalar; return a scalar "
                             "(e.g. out.sum()), or use `with gw.trace():` and call backward(grad_outputs) yourself")
        if not out.requires_grad:
            raise ValueError("gw.explain: fn's result does not require grad: no input it uses has "
                             "requires_grad=True; call x.requires_grad_() on the tensors to differentiate")
        leaves = _leaves(out)
        torch.autograd.grad(out, leaves, allow_unused=True)
    return report


def _leaves(out: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors requiring grad that `out` depends on (from its autograd graph)."""
    leaves, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(n for n, _ in node.next_functions)
    return leaves
