"""The TorchDispatchMode that applies the rule table during a backward (``_StrongZeroMode``), and the fused
backwards that run as their decomposition when a structural zero reaches them (``DECOMPOSED``).

May import: torch, gradwise._modes, _contract, _supports, _rules.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from gradwise._modes import LeanDispatchMode
from gradwise._strong_zeros import _contract
from gradwise._strong_zeros._rules import _UNRULED, _is_float, lookup
from gradwise._strong_zeros._supports import _Supports

aten = torch.ops.aten


# Fused backwards without a rule of their own that, when a structural zero reaches them, run as PyTorch's own
# decomposition (torch._decomp) under the mode, so that each primitive op of it goes through its rule: a
# normalisation's rows (or channels) that only structural zeros read no longer turn its weight gradient into
# NaN. Only then: with no structural zero in their inputs they run fused, as in plain PyTorch, and with one the
# fused result is kept wherever it is finite (see _StrongZeroMode._decomposed).
DECOMPOSED = frozenset((aten.native_layer_norm_backward, aten.native_group_norm_backward,
                        aten.native_batch_norm_backward, aten._fused_rms_norm_backward, aten.linalg_cross,
                        aten._prelu_kernel_backward))


def _decomposition(func: Any) -> Callable[..., Any] | None:
    if func.overloadpacket not in DECOMPOSED:
        return None
    from torch._decomp import decomposition_table  # imported on first use: torch._decomp loads slowly

    return decomposition_table.get(func)


class _StrongZeroMode(LeanDispatchMode):
    def __init__(self, carry: bool = False) -> None:
        super().__init__()
        self.supports = _Supports()
        # create_graph: weak references to the outputs of ruled ops, for _carry at the end of the pass
        self.made: list[weakref.ref] | None = [] if carry else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _contract.unfollowed(args):  # sparse/nested/mkldnn sensitivities: PyTorch's op, nothing recorded
            return func(*args, **kwargs)
        if func.is_view:
            out = func(*args, **kwargs)  # a view reads its storage's mask: nothing to record...
            src = args[0] if args else None
            if isinstance(out, torch.Tensor) and isinstance(src, torch.Tensor) and self.supports.tracked(src) \
                    and out.untyped_storage()._cdata != src.untyped_storage()._cdata:
                # ...unless it copied (to(dtype), reshape, contiguous met inside a decomposition)
                s = self.supports.of(src)
                self.supports.record(out, s.reshape(out.shape) if s.numel() == out.numel() else None)
            return out
        rule = lookup(func)
        if rule is not None:
            out = rule(func, args, kwargs, self.supports)
            if self.made is not None:
                self.made.extend(weakref.ref(o) for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor))
            return out
        flat, _ = tree_flatten((args, kwargs))
        tracked = any(self.supports.tracked(a) for a in flat)
        if tracked and (decomposed := _decomposition(func)) is not None:
            return self._decomposed(func, decomposed, args, kwargs)
        out = func(*args, **kwargs)
        if tracked:
            _UNRULED.add(str(func))
            for o in tree_flatten(out)[0]:
                if isinstance(o, torch.Tensor):
                    self.supports.record(o, None)
        return out


    def _decomposed(self, func, decomposed, args, kwargs):
        """Run ``func`` as its decomposition under this mode (each primitive op through its rule), and also
        fused: where the fused result is finite no structural zero met a NaN/Inf there, and it is taken as it
        is (PyTorch's bits); elsewhere the decomposition's."""
        with self:  # the decomposition's ops come back through this mode
            strong = decomposed(*args, **kwargs)
        fused = func(*args, **kwargs)
        single = isinstance(fused, torch.Tensor)
        out = []
        for f, d in zip((fused,) if single else fused, (strong,) if single else strong, strict=True):
            if isinstance(f, torch.Tensor) and isinstance(d, torch.Tensor) and _is_float(f):
                merged = torch.where(torch.isfinite(f), f, d)
                self.supports.record(merged, self.supports.of(d))
                out.append(merged)
            else:
                out.append(f)
        if single:
            return out[0]
        return tuple(out) if isinstance(fused, tuple) else out
