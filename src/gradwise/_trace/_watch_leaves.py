"""What a watched backward checks (`gw.watch()`, ``_watching``): its gradients, at once (`_finite`), and the
``.grad`` its leaves held before it first added to them (``_StaleGrads``: a NaN left there from before the block,
not zeroed, is no NaN of the block's steps, and a backward inside the running one brings leaves of its own).

May import: torch, gradwise._masks, gradwise._native, gradwise._strong_zeros, gradwise._trace._common,
_fsdp_watching, _kinds.
"""
from __future__ import annotations

import functools
import math
import weakref

import torch

from gradwise import _native, _strong_zeros
from gradwise._masks import all_finite
from gradwise._trace import _common, _fsdp_watching, _kinds

_SEEN_MAX = 1 << 16


class _StaleGrads:
    """The leaves' ``.grad`` from before a watched backward first added to them (a part of ``_Watcher``)."""

    def __init__(self) -> None:
        self.stale: set[int] = set()  # ids of the leaves whose .grad held NaN/Inf before a backward first added to it
        self.stale_counts: dict[int, int] = {}  # ... how many elements (NaN stays NaN, Inf stays NaN/Inf: never fewer)
        # ... those a backward of the block brought a NaN/Inf gradient (a new NaN where the old one was: not stale),
        # seen by a hook of the watch's on them for that backward only (`_incoming`)
        self.stale_fresh: set[int] = set()
        self._stale_hooks: list = []
        self.seen: set[int] = set()  # ids of the leaves a backward of the block reached (their .grad checked once)
        self.nested: list[weakref.ref] | None = None  # the leaves of backwards run inside the running one
        self.fsdp = _fsdp_watching.FSDPParams()  # the graph leaves that are FSDP2's unsharded parameters

    def note_nested(self, outs, inputs, here: bool = True) -> None:
        """The leaves of a backward run inside the running one (this thread's, or one its backward started on
        another thread: ``here`` False), checked with it; their .grad before the inner backward adds to it (held
        before?)."""
        nested = _input_tensors(inputs) if inputs is not None else \
            _strong_zeros._graph_parts(_strong_zeros._root_nodes(_as_tuple(outs)))[0]
        nested = [t for t in nested if t.is_leaf]
        self.nested = (self.nested or []) + [weakref.ref(t) for t in nested]  # (one rebinding: another thread's)
        if self.tracer is None:
            self._note_stale(nested, hook=here)

    def _note_stale(self, leaves, fsdp: bool = False, hook: bool = True) -> None:
        """The .grad a backward adds to, once per leaf and block (a later step may reach a parameter the first one
        did not: its NaN .grad from before the block was told as no NaN at all; a nested backward's leaves too)."""
        new = [t for t in leaves if id(t) not in self.seen]
        if not new:
            return
        counts = _nonfinite_grads(new)
        self.stale |= counts.keys()
        self.stale_counts.update(counts)
        for t in new:
            if id(t) in counts:  # (rare: a .grad not zeroed): what this backward adds to it, read as it comes
                try:  # (not on another thread's leaves: removed from here while that thread's backward may run)
                    if not hook:
                        raise RuntimeError
                    self._stale_hooks.append(t.register_hook(functools.partial(self._incoming, id(t))))
                except RuntimeError:  # (no hook on it: what it adds is not known, so not told as only stale)
                    self.stale_fresh.add(id(t))
        if fsdp and _fsdp_watching.loaded():  # FSDP2's sharded gradients, which the leaves' .grad do not show
            self.stale |= _fsdp_watching.stale(self.fsdp.of(new))
        if len(self.seen) > _SEEN_MAX:  # fresh leaves every step (inputs with requires_grad): bounded
            self.seen = set()
        self.seen.update(id(t) for t in new)

    def _incoming(self, key: int, g) -> None:
        """A stale leaf's gradient as the backward brings it (before it is added to the .grad): a NaN/Inf in it is
        this step's, which the .grad's count of NaN/Inf elements cannot tell where it lands on an old one."""
        if not (isinstance(g, torch.Tensor) and g.layout is _STRIDED and _kinds.readable(g) and _finite([g])):
            self.stale_fresh.add(key)

    def _unhook_stale(self) -> None:
        hooks, self._stale_hooks = self._stale_hooks, []
        for h in hooks:
            h.remove()


def _nonfinite_grads(leaves) -> dict[int, int]:
    """The ids of the leaves whose .grad holds NaN/Inf, each with how many elements (one check of them all, then
    each where it fails)."""
    held = [(t, g) for t in leaves if (g := t.grad) is not None]
    if not held or _finite([g for _, g in held]):
        return {}
    return {id(t): _common._count(_common._nonfinite_mask(g)) for t, g in held if not _finite([g])}


def _as_tuple(ts) -> tuple:
    if isinstance(ts, (torch.Tensor, torch.autograd.graph.GradientEdge)):
        return (ts,)
    return tuple(ts)


def _input_tensors(inputs) -> list[torch.Tensor]:
    """The tensors whose ``.grad`` a ``backward(inputs=...)`` fills: a GradientEdge of a leaf (its AccumulateGrad
    node's) stands for the leaf; a non-leaf's edge fills no ``.grad``."""
    out = []
    for t in _as_tuple(inputs):
        if isinstance(t, torch.autograd.graph.GradientEdge):
            t = getattr(t.node, "variable", None)
        if isinstance(t, torch.Tensor):
            out.append(t)
    return out


_STRIDED, _TENSOR = torch.strided, torch.Tensor
_is_wrapped, _isfinite = _kinds._is_wrapped, math.isfinite
_F32, _F64, _WIDENED = torch.float32, torch.float64, (torch.float16, torch.bfloat16)
_SMALL_VECTOR = 1 << 12  # elements: a float32 vector this small is cheaper copied into one sum than summed alone


def _finite(grads: list[torch.Tensor]) -> bool:
    """Whether every gradient is finite (`_all_finite`), with grad mode off as torch.no_grad() without its
    Python context manager: gradients made with ``create_graph=True`` require grad, and the check is no op of
    the program's graph."""
    mode = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)
    try:
        return _all_finite(grads)
    finally:
        torch._C._set_grad_enabled(mode)


def _all_finite(grads: list[torch.Tensor]) -> bool:
    """One check of all gradients, run after every watched backward. The common gradient (a plain dense float
    tensor on the CPU) is summed and read at once: a sum is finite iff no NaN/Inf went in, or it overflowed
    (then the exact test below decides); half types sum in float32, which their values cannot overflow (a
    ZeroTensor sums to 0 like any tensor of zeros). Small float32 vectors (biases, norm weights) are
    concatenated into one sum: one op instead of one each. Every other gradient goes through strong zeros'
    check (`all_finite`: one host sync for all off the CPU) after `_kinds`' test of what can be read (a
    subclass's dispatch must not see the check; a sparse COO gradient, nn.Embedding(sparse=True), through its
    values)."""
    rest, vectors = [], []
    transformed = torch._C._are_functorch_transforms_active()  # (the rest: `_kinds`' rules for what is read)
    native = None if transformed else _native.module()
    if native is not None:  # the C++ helper scans the plain CPU float tensors' memory; the rest as below
        grads = native.finite_or_rest(grads)
        if grads is False:
            return False
    for g in grads:
        # (`_is_wrapped` answers for batched tensors too: functorch's maybe_get_level, which it reads, checks them
        # first. Per gradient, after a backward: each C call here costs ~0.3-0.5 us with the caches cold)
        if transformed or g.__class__ is not _TENSOR or g.layout is not _STRIDED or not g.is_cpu or g.is_nested \
                or _is_wrapped(g):
            rest.append(g)
            continue
        dtype, dim = g.dtype, g.dim()
        if dtype is _F32 and dim < 2:
            if dim == 0:  # (a loss, `_losses`)
                vectors.append(g.reshape(1))
                continue
            if g.shape[0] <= _SMALL_VECTOR:
                vectors.append(g)
                continue
        if dtype is _F32 or dtype is _F64:
            total = g.sum()
        elif dtype in _WIDENED:
            total = g.sum(dtype=_F32)
        else:
            rest.append(g)
            continue
        if not _isfinite(total.item()) and not bool(torch.isfinite(g).all()):  # (rare: a sum overflowed)
            return False
    if vectors:
        total = (torch.cat(vectors) if len(vectors) > 1 else vectors[0]).sum()
        if not _isfinite(total.item()) and not all(bool(torch.isfinite(v).all()) for v in vectors):
            return False
    if not rest:
        return True
    dense = [v for g in rest if _common._inexact(g)
             for v in ((g.coalesce()._values() if g.layout is torch.sparse_coo else g),) if v.numel()
             and _kinds.readable(v)]
    if all_finite(dense):
        return True
    return all(bool(torch.isfinite(g).all()) for g in dense)  # rare: confirm (finite values can overflow a sum)
