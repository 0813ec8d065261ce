"""The strong-zero rule table: ``RULES`` (aten op -> rule), ``_register``, ``lookup``, the helpers every rule
shares, and ``unruled_ops``. The rules themselves live in the ``_rules_*`` modules, by op family.

May import: torch, gradwise._masks, _supports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_map

from gradwise._masks import one_slice
from gradwise._strong_zeros._supports import _STATE, _Supports

# ---------------------------------------------------------------------------------------------------------
# The rule table. A rule runs the op itself and records the supports of its outputs:
#     rule(func, args, kwargs, supports) -> output
# ---------------------------------------------------------------------------------------------------------

Rule = Callable[[Any, tuple, dict, _Supports], Any]
RULES: dict[Any, Rule] = {}


def _register(*ops: Any) -> Callable[[Rule], Rule]:
    def register(rule: Rule) -> Rule:
        for op in ops:
            RULES[op] = rule
        return rule

    return register


def lookup(func: Any) -> Rule | None:
    """The strong-zero rule for an op (overload first, then its packet, then its name 'ns::op' for the rules of
    libraries that may load later: gw.register_rule); None when it has none."""
    packet = func.overloadpacket
    return RULES.get(func) or RULES.get(packet) or RULES.get(packet._qualified_op_name)


def _is_float(t: object) -> bool:
    """A floating-point or complex dense tensor: what supports follow (a sparse result of a backward is not).
    Written out rather than through gradwise._masks.inexact: every rule calls it per argument."""
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.layout == torch.strided


def _in_formula() -> bool:
    """True while a backward formula runs (not a checkpoint's forward recomputation inside backward, nor a
    forward op a compiled backward recomputes)."""
    return (not torch.is_grad_enabled() or _STATE.create_graph) and not _STATE.recomputing


def _hooked(node: Any, *names: str) -> bool:
    """Whether a saved tensor of ``node`` (its ``_raw_saved_<name>`` attributes) unpacks through a hook (a
    checkpoint's recomputation, ``saved_tensors_hooks``). Reading it runs the hook: a non-reentrant checkpoint
    would run its forward once more, outside the backward (a second recomputation then crashes in PyTorch for
    some contexts), and its packed value is no tensor. Facts that need such values assume the worst."""
    for name in names:
        try:
            saved = getattr(node, name, None)
        except RuntimeError:  # freed by an earlier backward: the engine raises if it needs it
            continue
        for raw in saved if saved.__class__ is tuple or saved.__class__ is list else (saved,):
            if raw is not None and raw.unpack_hook is not None:
                return True
    return False


def _reads_nodes() -> bool:
    """Whether a rule may read the running autograd node's saved tensors: not under torch.func transforms, where
    they are functorch wrappers in the transform's logical shapes while the ops are the physical ones
    (``_strong_zeros/_transforms.py``); such a rule then runs op by op (fully supported where it cannot tell)."""
    return not _STATE.transform


# same-size integer dtypes: a float's bits times 1 (kept) or 0 (+0.0) is exact, whatever it held (NaN, Inf)
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}
_CHUNK = 1 << 17  # elements: the multiply casts its bool mask to a temporary of that many integers at most


def _kept_bits(src: torch.Tensor, keep: torch.Tensor, out: torch.Tensor) -> bool:
    """``out`` = ``src`` where ``keep``, else +0.0, on CPU as the bits' integers times the mask: ~3x faster than
    where(out=), whose bool select is not vectorised, with the same bits (kept elements untouched). The multiply
    casts the mask to a temporary as large as its operand, so it runs in slices of dim 0 of at most _CHUNK
    elements. False (nothing written) where this does not apply: the caller uses where."""
    bits = _BITS.get(src.dtype)
    if bits is None or src.device.type != "cpu" or keep.dtype != torch.bool or not src.dim():
        return False
    keep = keep.expand(src.shape)
    # a broadcast mask (a row support read along a feature dim) with each broadcast dim of size 1: the multiply
    # broadcasts that ~4x faster than it reads a stride-0 view (which it reads slower than a full mask)
    keep = one_slice(keep)
    rows = src.shape[0]
    step = _CHUNK // max(1, src.numel() // max(1, rows))
    if src.numel() > _CHUNK and step == 0:
        return False
    src, out = src.view(bits), out.view(bits)
    if src.numel() <= _CHUNK:
        torch.mul(src, keep, out=out)
        return True
    for i in range(0, rows, step):
        n = min(step, rows - i)
        torch.mul(src.narrow(0, i, n), keep.narrow(0, i, n) if keep.shape[0] > 1 else keep, out=out.narrow(0, i, n))
    return True


class _Kept:
    """The positions along one dim where a 1-D bool ``kept`` is True, read as a view where they form a range (no
    copy: a batch's padding rows at its end) and by index otherwise."""

    def __init__(self, kept: torch.Tensor) -> None:
        self.idx = kept.nonzero().squeeze(1)
        self.n = self.idx.numel()
        self.start = int(self.idx[0]) if self.n else 0
        self.is_range = self.n == 0 or int(self.idx[-1]) - self.start + 1 == self.n

    def pick(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t.narrow(dim, self.start, self.n) if self.is_range else t.index_select(dim, self.idx)

    def put(self, full: torch.Tensor, part: torch.Tensor, dim: int) -> None:
        """Write ``part`` (picked along ``dim``) back into ``full``."""
        if self.is_range:
            full.narrow(dim, self.start, self.n).copy_(part)
        else:
            full.index_copy_(dim, self.idx, part)


def _annihilate(out: torch.Tensor, support: torch.Tensor | None) -> torch.Tensor:
    """Writes 0 (+0.0) into ``out`` wherever ``support`` is False (whatever NaN/Inf was computed there)."""
    if support is not None:
        if out.requires_grad and torch.is_grad_enabled():  # create_graph: out= cannot be differentiated
            out.masked_fill_(~support.expand(out.shape), 0)
        elif not _kept_bits(out, support, out):  # one pass, where masked_fill_ needs the negated mask (1.5x slower)
            torch.where(support, out, out.new_zeros(()), out=out)
    return out


def _tracked_slots(args: tuple, sup: _Supports) -> list[int]:
    return [i for i, a in enumerate(args) if _is_float(a) and sup.tracked(a)]


def _run_unruled(func, args, kwargs, sup, why: str | None) -> Any:
    """Run the op as PyTorch does with its outputs fully supported; ``why`` (when the op met a structural
    zero it has no rule for) lists it in gw.unruled_ops()."""
    out = func(*args, **kwargs)
    if why:
        _UNRULED.add(f"{func} ({why})")
    if isinstance(out, torch.Tensor):
        sup.record(out, None)
    elif type(out) is tuple and all(isinstance(o, torch.Tensor) for o in out):  # (the attention backwards')
        for o in out:
            sup.record(o, None)
    else:
        tree_map(lambda o: sup.record(o, None) if isinstance(o, torch.Tensor) else o, out)
    return out


_UNRULED: set[str] = set()


def unruled_ops() -> set[str]:
    """Backward ops that met a structural zero but had no strong-zero rule, since the process started.

    Such an op runs as plain PyTorch (its output is treated as fully supported), so a NaN or Inf it multiplies
    by a zero may still reach a gradient; never a wrong finite number. ``unruled_ops().clear()`` resets it.

    >>> import torch, gradwise as gw
    >>> isinstance(gw.unruled_ops(), set)
    True
    """
    return _UNRULED
