"""Supports: per storage, the bool mask of the elements a backward's tensor may hold nonzero (the others are
structural zeros), and the per-thread state of a strong-zero pass (``_STATE``).

May import: torch, gradwise._masks. Imports nothing else of gradwise's strong-zero package.
"""

from __future__ import annotations

import threading

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.weak import WeakTensorKeyDictionary

from gradwise._masks import mask_all

# ---------------------------------------------------------------------------------------------------------
# Supports: one bool mask per storage, so that every view of a tensor sees (and in-place ops update) the same
# mask. A storage without a mask is fully supported.
# ---------------------------------------------------------------------------------------------------------


class _Supports:
    def __init__(self) -> None:
        self._masks: dict[int, tuple[StorageWeakRef, int, torch.Tensor]] = {}
        # bool masks a backward formula computed (max's `self == result`, nansum's `~isnan(self)`) -> where the
        # mask is meaningful (None: everywhere). A comparison with NaN is False without selecting anything.
        self.selections = WeakTensorKeyDictionary()

    def _entry(self, t: torch.Tensor) -> torch.Tensor | None:
        if t.layout != torch.strided:  # sparse/nested tensors keep no mask: fully supported
            return None
        storage = t.untyped_storage()
        entry = self._masks.get(storage._cdata)
        if entry is None:
            return None
        ref, itemsize, mask = entry
        if ref.expired() or itemsize != t.element_size():
            del self._masks[storage._cdata]
            return None
        return mask

    def of(self, t: object) -> torch.Tensor | None:
        """The support of ``t`` (bool, shaped like t), or None when every element may be nonzero."""
        if not isinstance(t, torch.Tensor):
            return None
        mask = self._entry(t)
        if mask is None:
            return None
        return mask.as_strided(t.shape, t.stride(), t.storage_offset())

    def tracked(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and self._entry(t) is not None

    def record(self, t: torch.Tensor, support: torch.Tensor | None, fresh: bool = False) -> None:
        """Set the support of ``t``'s elements (None: all may be nonzero). ``fresh``: ``support`` is a new tensor
        of the rule's own that nothing else holds, kept as the mask where ``t`` fills its storage (no copy)."""
        if t.layout != torch.strided:
            return
        mask = self._entry(t)
        if support is None:
            if mask is not None:
                mask.as_strided(t.shape, t.stride(), t.storage_offset()).fill_(True)
            return
        if mask is None:
            if mask_all(support):
                return
            storage = t.untyped_storage()
            n = storage.nbytes() // t.element_size()
            whole = t.numel() == n and t.storage_offset() == 0 and t.is_contiguous()  # copy_ writes it all
            if whole and fresh and support.shape == t.shape and support.is_contiguous() and \
                    support.dtype == torch.bool and support.device == t.device:
                self._masks[storage._cdata] = (StorageWeakRef(storage), t.element_size(), support.view(-1))
                return
            mask = (torch.empty if whole else torch.ones)(n, dtype=torch.bool, device=t.device)
            self._masks[storage._cdata] = (StorageWeakRef(storage), t.element_size(), mask)
        mask.as_strided(t.shape, t.stride(), t.storage_offset()).copy_(support.expand(t.shape))



class _State(threading.local):
    depth = 0
    create_graph = False
    in_mode = False
    planned: str | None = None  # a path gw.grad/gw.backward already chose, for the engine hook to take once
    # whether every output being differentiated is finite (see _softmax_backward and _exp_result_mul)
    outputs_finite = True
    # the autograd node whose backward formula runs now, where the engine's current node cannot tell (a
    # compiled backward's graph run op by op: gradwise._strong_zeros._graph_forms._logsumexp_weights)
    formula_of: str | None = None


_STATE = _State()
