"""Supports: per storage, the bool mask of the elements a backward's tensor may hold nonzero (the others are
structural zeros), and the per-thread state of a strong-zero pass (``_STATE``).

May import: torch, gradwise._masks. Imports nothing else of gradwise's strong-zero package.
"""

from __future__ import annotations

import collections
import operator
import threading

import torch
from torch._subclasses.fake_impls import _compute_stride
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.weak import WeakTensorKeyDictionary

from gradwise._masks import mask_all, mask_any, one_slice

_expired = torch.Storage._expired  # type: ignore[attr-defined]

# ---------------------------------------------------------------------------------------------------------
# Supports: one bool mask per storage, so that every view of a tensor sees (and in-place ops update) the same
# mask. A storage without a mask is fully supported.
# ---------------------------------------------------------------------------------------------------------


class _Supports:
    def __init__(self) -> None:
        self._masks: dict[int, tuple[StorageWeakRef, int, torch.Tensor]] = {}
        self._shared: set[int] = set()  # storages whose mask another storage holds too: copied before a write
        # bool masks a backward formula computed (max's `self == result`, nansum's `~isnan(self)`) -> where the
        # mask is meaningful (None: everywhere). A comparison with NaN is False without selecting anything.
        self.selections = WeakTensorKeyDictionary()
        # ops whose registered rule dropped structural zeros (an undeclared output; a placement's NaN weight met by
        # one), or (what, fix): the mode names them
        self.unfollowed: list[str | tuple[str, str]] = []
        # storage -> (its mask, the shape it was recorded for, the support it was written from with each broadcast
        # dim of size 1): a mask written from a broadcast support (mm's rows, a batch entry's), which
        # `of(t, broadcast=True)` hands out as that support expanded until the mask is written (`_writable` drops
        # the entry: version counters do not count writes made inside a dispatch mode's handler, where rules run)
        self._broadcast: dict[int, tuple[torch.Tensor, tuple[int, ...], torch.Tensor]] = {}

    def _entry(self, t: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        """``t``'s storage mask and how many of its entries one element of ``t`` covers (1, or 2 for a complex
        view of a real storage: view_as_complex), or None. A mask is kept in the finest unit a view has used: a
        real view of a complex storage (view_as_real) first splits its mask, each entry in two."""
        if t.layout != torch.strided:  # sparse/nested tensors keep no mask: fully supported
            return None
        storage = t.untyped_storage()
        cdata = storage._cdata
        entry = self._masks.get(cdata)
        if entry is None:
            return None
        ref, itemsize, mask = entry
        size = t.element_size()
        expired = _expired(ref.cdata)  # (StorageWeakRef.expired without its Python frame: this runs per op)
        if itemsize == size and not expired:
            return mask, 1
        if expired or max(itemsize, size) % min(itemsize, size):
            del self._masks[cdata]
            return None
        if itemsize > size:
            mask = mask.repeat_interleave(itemsize // size)
            self._masks[cdata] = (ref, size, mask)
            self._shared.discard(cdata)
            return mask, 1
        return mask, size // itemsize

    @staticmethod
    def _view(t: torch.Tensor, mask: torch.Tensor, per: int) -> torch.Tensor:
        """``mask`` as ``t``'s elements see it: shaped like t, with a last dim of ``per`` entries when one
        element covers several (a view, so writes reach the mask)."""
        if per == 1:
            return mask.as_strided(t.shape, t.stride(), t.storage_offset())
        return mask.as_strided((*t.shape, per), (*(st * per for st in t.stride()), 1), t.storage_offset() * per)

    def of(self, t: object, broadcast: bool = False) -> torch.Tensor | None:
        """The support of ``t`` (bool, shaped like t), or None when every element may be nonzero. ``broadcast``:
        where the storage's mask was written from a support broadcast along some dims and not written since, and
        ``t`` reads it as recorded (or reshaped, or with its last two dims swapped), that support expanded (the same
        values as a stride-0 view, never to be written): for the products, whose masked multiply (``_kept_bits``)
        runs ~4x faster on it than on the whole mask. (Reductions and bool and/or run faster on whole masks.)"""
        if not isinstance(t, torch.Tensor):
            return None
        entry = self._entry(t)
        if entry is None:
            return None
        mask, per = entry
        if per == 1:
            if broadcast and self._broadcast:
                wide = self._broadcast.get(t.untyped_storage()._cdata)
                if wide is not None and wide[0] is mask:
                    narrow = _as_broadcast(t, wide[1], wide[2])
                    if narrow is not None:
                        return narrow
            return mask.as_strided(t.shape, t.stride(), t.storage_offset())
        return mask_any(self._view(t, mask, per), -1)

    def holds_masks(self) -> bool:
        """Whether some storage has a mask (a structural zero was recorded somewhere in this pass)."""
        return bool(self._masks)

    def tracked(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and self._entry(t) is not None

    def zeroed(self, t: object) -> bool:
        """Whether ``t`` holds a structural zero (its support is False somewhere)."""
        s = self.of(t)
        return s is not None and not mask_all(s)

    def record(self, t: torch.Tensor, support: torch.Tensor | None, fresh: bool = False,
               like: torch.Tensor | None = None) -> None:
        """Set the support of ``t``'s elements (None: all may be nonzero). ``fresh``: ``support`` is a new tensor
        of the rule's own that nothing else holds, kept as the mask where ``t`` fills its storage (no copy).
        ``like``: ``support`` is that tensor's own support (an elementwise op's output), whose mask ``t`` then
        shares where both fill their storages alike (copied on the first write to either)."""
        if t.layout != torch.strided or t.is_meta:  # (a meta tensor, from a decomposition's shape logic: no values)
            return
        stride = t.stride()
        if 0 in stride:  # an expanded view stores each element once: write its support there (any of its copies)
            dims = tuple(d for d, (n, st) in enumerate(zip(t.shape, stride, strict=True)) if st == 0 and n > 1)
            if dims:
                if support is not None:
                    support = support.expand(t.shape).any(dim=dims, keepdim=True)
                t = t.as_strided([1 if d in dims else n for d, n in enumerate(t.shape)], stride, t.storage_offset())
        entry = self._entry(t)
        if entry is not None and support is None:
            mask, per = entry
            self._view(t, self._writable(t, mask), per).fill_(True)
            return
        if support is None:
            return
        if entry is None:
            storage = t.untyped_storage()
            n = storage.nbytes() // t.element_size()
            whole = t.numel() == n and t.storage_offset() == 0 and t.is_contiguous()  # copy_ writes it all
            if whole and like is not None and self._share(t, storage, like):
                return
            if mask_all(support):
                return
            self._shared.discard(storage._cdata)
            if whole and fresh and support.shape == t.shape and support.is_contiguous() and \
                    support.dtype == torch.bool and support.device == t.device:
                self._masks[storage._cdata] = (StorageWeakRef(storage), t.element_size(), support.view(-1))
                return
            mask = (torch.empty if whole else torch.ones)(n, dtype=torch.bool, device=t.device)
            self._masks[storage._cdata] = (StorageWeakRef(storage), t.element_size(), mask)
            support = support.expand(t.shape)
            self._view(t, mask, 1).copy_(support)
            if whole and 0 in support.stride() and support.dtype == torch.bool and support.device == t.device:
                small = one_slice(support)
                if small.numel() * 4 <= support.numel():  # (copied: the caller's tensor may change later)
                    self._broadcast[storage._cdata] = (mask, tuple(t.shape), small.clone())
            return
        mask, per = entry
        mask = self._writable(t, mask)
        support = support.expand(t.shape)
        self._view(t, mask, per).copy_(support if per == 1 else support.unsqueeze(-1))

    def _share(self, t: torch.Tensor, storage: torch.UntypedStorage, like: torch.Tensor) -> bool:
        entry = self._entry(like)
        if entry is None or entry[1] != 1:
            return False
        mask = entry[0]
        if like.shape != t.shape or like.stride() != t.stride() or like.storage_offset() or \
                like.element_size() != t.element_size() or mask.numel() != t.numel():
            return False
        self._masks[storage._cdata] = (StorageWeakRef(storage), t.element_size(), mask)
        self._shared.update((storage._cdata, like.untyped_storage()._cdata))
        wide = self._broadcast.get(like.untyped_storage()._cdata) if self._broadcast else None
        if wide is not None and wide[0] is mask:  # (a write to either copies the mask first: `_writable`)
            self._broadcast[storage._cdata] = wide
        return True

    def _writable(self, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``t``'s mask, copied first if another storage shares it; its broadcast form no longer stands (the
        caller writes it)."""
        cdata = t.untyped_storage()._cdata
        self._broadcast.pop(cdata, None)
        if cdata in self._shared:
            self._shared.discard(cdata)
            ref, itemsize, _ = self._masks[cdata]
            mask = mask.clone()
            self._masks[cdata] = (ref, itemsize, mask)
        return mask


def _as_broadcast(t: torch.Tensor, shape: tuple[int, ...], small: torch.Tensor) -> torch.Tensor | None:
    """``small`` broadcast to ``shape`` (the contiguous tensor a storage's mask was recorded for) as ``t`` reads that
    storage: the same tensor, a reshape of it that is a view (mm's ``g.view(-1, n)``) or its last two dims swapped
    (``g.t()``). None for any other view (the caller reads the mask)."""
    if t.storage_offset():
        return None
    wide = small.expand(shape)
    if t.is_contiguous():
        if t.shape == shape:
            return wide
        # view's refusal is a C++ error whose backtrace costs ~30 us, and a padding mask broadcast along a middle dim
        # (B, 1, N), read as (B*T, N), is refused on every backward: PyTorch's own computeStride (the Python port
        # its fake tensors use) asks first
        if t.numel() == wide.numel() and _compute_stride(wide.shape, wide.stride(), t.shape) is not None:
            try:
                return wide.view(t.shape)
            except RuntimeError:  # (none known: _compute_stride tells the shapes view refuses)
                return None
        return None  # no view of this broadcast has that shape (a padding mask over a middle dim): read the mask
    if t.dim() >= 2 and t.dim() == len(shape) and t.shape[-2:] == (shape[-1], shape[-2]) and \
            t.shape[:-2] == shape[:-2] and t.transpose(-1, -2).is_contiguous():
        return wide.transpose(-1, -2)
    return None


# What a pass's own thread set before the engine ran (``_State.carried``): the autograd engine runs a backward's
# nodes on other threads too (CUDA's device threads run every CUDA backward; a reentrant backward deeper than 60
# runs on a pool thread), carrying the dispatch mode stack there but not this Python state, whose defaults there
# would say "strong zeros off, outputs finite, no create_graph" (a NaN output's exp(-inf) zero taken for
# structural: a genuine NaN gradient hidden). The pass's mode takes these with it (``_StrongZeroMode.state``)
# and sets them around its ops on such a thread (``_State.adopt``). What code inside the pass sets on the thread
# that runs it (formula_of, recomputing, checkpoint_forward) stays that thread's.
Carried = collections.namedtuple("Carried",
                                 "depth in_mode create_graph outputs_finite outputs_batched transform export")
_carried = operator.attrgetter(*Carried._fields)


class _Layered(_Supports):
    """The supports of a torch.func backward nested in a pass (``torch.func.grad`` in a custom backward): a table of
    its own over the outer pass's, read through (the sensitivity's structural zeros, captured or a seed: an entry met
    is copied, and copied again before a write, so the outer's mask stays the outer's), and handed up at its end
    (``hand_up``) only where it met one of them: its results then differentiate the outer program (its structural
    zeros are the pass's). A function of no tensor with the outer's entries (a gradient of an unrelated function)
    keeps its own zeros: to the outer pass its results are values (handed up, its 0 x inf hid a NaN the outer program
    has). A heuristic: one that met the outer's (a jacrev's basis, built of zeros in the custom backward) hands all
    its zeros up, and one that met none (``grad(f)(x) * g``: g applied after) hands none, as before 2026-12-07.
    Selections and unfollowed ops are the outer's own lists."""

    def __init__(self, outer: _Supports) -> None:
        super().__init__()
        self.outer = outer
        self.selections, self.unfollowed = outer.selections, outer.unfollowed
        self.met_outer = False

    def _entry(self, t: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        got = super()._entry(t)
        if got is not None or t.layout != torch.strided or self.outer._entry(t) is None:
            return got
        self.met_outer = True
        cdata = t.untyped_storage()._cdata
        self._masks[cdata] = self.outer._masks[cdata]
        self._shared.add(cdata)  # (written here: copied first)
        return super()._entry(t)

    def holds_masks(self) -> bool:
        return bool(self._masks) or self.outer.holds_masks()

    def hand_up(self) -> None:
        """The outer pass's table takes this one's entries, where it met the outer's (shared: copied before a write)."""
        if self.met_outer:
            self.outer._masks.update(self._masks)
            self.outer._shared.update(self._masks)


# _State.handing: how a backward nested in a 'check' pass hands its results' structural zeros to it (_engine._nested)
NOT_HANDING = 0  # not nested in a 'check' pass (or decided: nothing to hand, nothing to name)
SEEDED = 1  # seeded with the custom backward's sensitivity: its plan decides whether it runs strong and exports
NAMED_IF_NONFINITE = 2  # ran without exporting while zeros could reach its results: named if the pass ends NaN/Inf
UNSEEDED = 3  # as SEEDED, not seeded with that sensitivity: it exports nothing


class _State(threading.local):
    depth = 0
    create_graph = False
    in_mode = False
    # a path gw.grad/gw.backward already chose, for the engine hook to take once, with the graph's watched nodes
    # (_planning._plan)
    planned: tuple[str, list] | None = None
    # whether every output being differentiated is finite (see _softmax_backward and _exp_result_mul)
    outputs_finite = True
    # under vmap, whether outputs_finite is read for the whole batch at once (some sample's output non-finite, or
    # with batched seeds some row's, turns the rules that need finite outputs off for every one: _MIXED_OUTPUTS)
    outputs_batched = False
    # the autograd node whose backward formula runs now, where the engine's current node cannot tell (a
    # compiled backward's graph run op by op: gradwise._strong_zeros._graph_forms._logsumexp_weights)
    formula_of: str | None = None
    # that formula's node's saved arguments, for a rule that reads them (logaddexp's self and other:
    # _graph_forms._logaddexp_weights); None: read the engine's current node
    formula_saved: tuple | None = None
    # a forward op recomputed inside a compiled backward runs now (its zeros are values: `_rules._in_formula`)
    recomputing = False
    # the pass runs under torch.func transforms (_transforms): the autograd node's saved tensors are functorch
    # wrappers in the transform's logical shapes, so rules that read them (logcumsumexp's, logaddexp's, alpha = 0
    # products') fall back to their op-by-op form
    transform = False
    # depth of a non-reentrant checkpoint's recomputation of the user's forward on this thread (a trace's
    # shadow pass passes over its ops, as the strong pass runs them outside its mode: _compile_recompute)
    checkpoint_forward = 0
    # the supports of the strong pass a nested backward runs inside (a reentrant checkpoint's, a custom backward
    # calling torch.autograd.grad), set while that backward runs: its results' structural zeros go there
    # (_engine._export), as they go on into the outer pass's ops
    export: _Supports | None = None
    # a backward nested in a 'check' pass (no NaN/Inf where its zeros reach, _engine._nested): SEEDED while its plan
    # decides whether it runs strong and exports (only where the zeros of dropped or masked padding reach its
    # results: _planning._results_reach), UNSEEDED likewise where it exports nothing, NAMED_IF_NONFINITE once it
    # ran without exporting while zeros could reach them
    handing = NOT_HANDING
    # a torch.func backward nested in a pass: whether the structural zeros of PyTorch's standard basis it is seeded
    # with (jacrev's) go up to the pass; not where it differentiates at no tensor of the custom backward's node
    # (_engine._tied: a function unrelated to the pass, at a constant made in the backward)
    basis_hands_up = True
    # a backward nested in a pass whose graph, or an enclosing pass's, may make NaN/Inf from finite values
    # (_mode.makes_nonfinite): where only relu's zeros reach its results, it looks for their whole rows
    # (_engine._handing)
    rows_matter = False
    # set while a backward nested in a pass runs (_engine._nested): what its own passes could not follow and did not
    # name (their results finite), for the pass it is nested in to name if its gradients end NaN/Inf (the NaN may be
    # made after it: a custom backward's 0/0 at a zero row of a checkpoint in a checkpoint)
    unnamed: dict[str, str] | None = None

    def carried(self) -> Carried:
        """This thread's values of the fields a pass carries to the engine's other threads."""
        return Carried._make(_carried(self))

    def adopt(self, values: Carried) -> Carried:
        """Set the carried fields to ``values`` (another thread's ``carried()``); returns this thread's, to put
        back with ``adopt`` again."""
        mine = self.carried()
        for name, value in zip(Carried._fields, values, strict=True):
            setattr(self, name, value)
        return mine


_STATE = _State()

# what an OpaqueBackwardWarning says where a rule that holds only for finite outputs (exp's and softmax's zeros at
# exp(-inf)) stood aside for a whole vmap batch because one sample's output is NaN/Inf: the other samples keep
# PyTorch's NaN there, where their own eager gw.grad removes it
_MIXED_OUTPUTS = ("a structural zero at exp(-inf) = 0 (exp's, softmax's backward) under vmap, whose outputs are "
                 "read for the whole batch (per-sample gradients; jacrev's and is_grads_batched's rows): some "
                 "sample's (row's) output is NaN/Inf, so no sample's (row's) zero there was removed",
                 "take the gradients of the samples (rows) with finite outputs apart (or outside the transform: "
                 "gw.grad of each)")


def stood_aside_for_the_batch(sup: _Supports) -> None:
    """Where a rule that holds only for finite outputs would have acted but stands aside because the outputs are
    not all finite, and they are read for a whole vmap batch (``_STATE.outputs_batched``): the samples whose own
    output is finite keep PyTorch's NaN there, which the OpaqueBackwardWarning names if the gradients end non-finite."""
    if _STATE.outputs_batched:
        sup.unfollowed.append(_MIXED_OUTPUTS)

