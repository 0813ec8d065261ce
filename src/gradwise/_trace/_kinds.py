"""Which tensors `gw.trace()` can read, and the note it leaves for the ones it passes over.

The trace reads values (a finiteness reduction per op, masks when it digs in). Some tensors have no values to
read, or reading them would run code that is not the user's: meta and fake tensors (no data), sparse, nested
and mkldnn layouts (no dense reduction on every backend), efficient ZeroTensors (no storage), tensors under a
functorch transform (batched: reading one breaks the transform), tensor subclasses (their
``__torch_dispatch__`` would see the trace's own reductions) and forward-AD duals (a reduction would build a
tangent). Ops on them run untouched; the report says how many were passed over, per kind.

May import: torch only.
"""
from __future__ import annotations

import weakref

import torch

PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


# subclass -> whether it overrides neither dispatch nor torch_function; weak: a class made per step (a closure's)
# is freed with its last tensor, not held by the trace for the rest of a long run
_PLAIN_SUBCLASS: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()
_DISPATCH = torch.Tensor.__torch_dispatch__
_FUNCTION = torch.Tensor.__torch_function__.__func__


def _plain_subclass(cls: type) -> bool:
    """A subclass that overrides neither ``__torch_dispatch__`` nor ``__torch_function__`` (``x.as_subclass(C)``
    of ``class C(torch.Tensor): pass``, a tag type): its values are a plain tensor's, and reading them runs no
    code of its own, so it is read as one (its NaN was 'born' as '0/0 or 0 x Inf' with no name)."""
    got = _PLAIN_SUBCLASS.get(cls)
    if got is None:
        got = _PLAIN_SUBCLASS[cls] = cls.__torch_dispatch__ is _DISPATCH and \
            getattr(cls.__torch_function__, "__func__", None) is _FUNCTION
    return got


def kind(t: torch.Tensor) -> str | None:
    """None for a tensor the trace reads; else the kind it passes over (as the report names it)."""
    if type(t) not in PLAIN_TYPES and not _plain_subclass(type(t)):
        return f"tensor subclass {type(t).__name__}"
    if t.layout != torch.strided:
        return {torch._mkldnn: "mkldnn"}.get(t.layout, "nested (jagged)" if t.layout == torch.jagged else "sparse")
    if t.is_nested:
        return "nested"
    if t.is_meta:  # (not t.device.type: a device object per call, ~5 us with caches cold after a backward)
        return "meta"
    if t._is_zerotensor():
        return "ZeroTensor"
    if _is_wrapped(t):  # (batched too: functorch's maybe_get_level, which it reads, checks them first)
        return "functorch-wrapped (vmap/grad transform)"
    return None


def readable(t: torch.Tensor) -> bool:
    return kind(t) is None


def forward_ad_active() -> bool:
    """Is a forward-AD dual level open (reductions on duals would build tangents)?"""
    return torch.autograd.forward_ad._current_level >= 0
