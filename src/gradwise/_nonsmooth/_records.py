"""What one pass records: ``Kink`` (a tie a rule resolved), ``NearKink``, the per-pass state ``_Run``; the
lexicographic ranking of tied branches (``_lex_argmax``, ``_lex_order``) and ``_user_line`` (the user's file:line).

May import: torch, ``_errors``, ``_lazy``.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from gradwise._nonsmooth._errors import NonsmoothError
from gradwise._nonsmooth._lazy import LazyTangent

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------------ records


@dataclass
class Kink:
    """One kink op call in which some elements tie.

    The tied elements form ``G`` groups of ``m`` candidate branches (``cand``: which ones tie in value).
    ``kind`` is "select" (one candidate wins: max, relu, clamp, comparisons ...) or "order" (the candidates
    are ranked: sort, topk, median ...). ``keys`` are the further ranking columns (tangents of each
    direction, or a forced choice); ``values`` the candidates' values as differentiable tensors when the
    run collects them (subdifferential enumeration).
    """

    op: str
    location: str
    kind: str
    cand: Tensor
    descending: bool = True
    keys: list[Tensor] = field(default_factory=list)
    values: Tensor | None = None
    unresolved: int = 0
    comparison: bool = False
    continuum: bool = False  # norm at 0: infinitely many pieces
    ball: bool = False  # a Euclidean norm of one slice at 0: its pieces are a + M u over unit vectors u
    call: tuple[int, int] = (0, 0)  # (mode call count, kink index within the call): the same on every pass
    choice: Tensor | None = None
    write: Callable | None = None  # writes another choice into this pass's lock tensors (graph reuse)
    site: tuple | None = None  # what a rule needs to rank this kink again in the ranked pass (max-pool)
    tangent: bool = False  # ranked by this pass's tangent (the op's arguments carried one)
    # f read the indices this call returned (argmax as a number, a gather of another tensor, max_unpool): its
    # value may then jump at the tie, as a comparison's does (checked the same way)
    indices_read: bool = False
    # a comparison whose argument's tangent along the direction is 0 at some tied element, ranked there by its
    # second-order tangent (`_rules._second_order_key`)
    second_order: bool = False

    @property
    def count(self) -> int:
        return int(self.cand.shape[0])

    def describe(self) -> str:
        return f"{self.op} at {self.location}: {self.count} tied element(s)"


class _LazyKink(Kink):
    """A Kink whose tensors are built on first read: ``cand``, ``keys`` and ``choice`` may be given as callables.
    A rule that ranks its ties by this pass's tangent alone (`_Run.ranks_alone`) locks them without these
    tensors, and most generalized-gradient passes never read them (a ranked pass's check, a later pass's
    history or an error message do). Reads give what `_Run.resolve` would have recorded."""

    def __init__(self, op: str, location: str, kind: str, cand, keys, choice, call: tuple[int, int],
                 descending: bool = True):
        self._built: dict[str, object] = {}
        self._thunks = {"cand": cand, "keys": keys, "choice": choice}
        self.op, self.location, self.kind, self.descending = op, location, kind, descending
        self.values, self.unresolved, self.comparison, self.continuum = None, 0, False, False
        self.call, self.write, self.site, self.tangent = call, None, None, False
        self.indices_read = False

    def _get(self, name: str):
        if name not in self._built:
            v = self._thunks[name]
            self._built[name] = v() if callable(v) else v
        return self._built[name]

    def _set(self, name: str, value) -> None:
        self._built[name] = value

    cand = property(lambda self: self._get("cand"), lambda self, v: self._set("cand", v))
    keys = property(lambda self: self._get("keys"), lambda self, v: self._set("keys", v))
    choice = property(lambda self: self._get("choice"), lambda self, v: self._set("choice", v))


@dataclass
class NearKink:
    """Elements within a tolerance of a kink but not exactly on it (treated as smooth)."""

    op: str
    location: str
    count: int
    gap: float


class _Run:
    """State of one pass of f: history from earlier passes, forced choices, what this pass records."""

    def __init__(self, history=None, forced=None, collect=False, tie_tol=0.0, near_tol=None, top_only=False,
                 ray=False):
        self.history: list[Kink] | None = history
        # directional_derivative's passes: a comparison's element whose argument does not move along d at first or
        # second order keeps its value (f(x + t d) is computed with it on the tie: where(x0 > 0, x1, -x1) at 0
        # along (0, 1) is -x1), where further directions would pick a side the ray never takes
        self.ray = ray
        # The records stay internal (generalized gradients): a rule may rank only the positions its op returns
        # (topk's first k), its Kink.choice covering those and Kink.unresolved counting the ties seen there.
        self.top_only = top_only
        self.forced: dict[int, Tensor] = forced or {}
        self.collect = collect
        self.tie_tol = tie_tol
        self.near_tol = near_tol
        self.kinks: list[Kink] = []
        self.near: list[NearKink] = []
        self.call = 0  # set by the mode before each rule
        # Ranked pass of `_locked_grad`: the tangent-free probe's kinks by mode call. Calls without one have no
        # tie (the primal values are the probe's), so they run natively; rules may reuse a kink's saved site.
        self.known: dict[int, list[Kink]] | None = None
        # Outputs of relu-like switches -> (c, live): the output is locally constant (relu-dead) wherever it equals
        # c, except at ``live`` (the switch's own ties, or None): ties among dead elements are no kinks.
        self.flat = WeakTensorKeyDictionary()
        # x -> ((dim, version), key): `_lex_key`s of this pass, shared by order ops on the same x
        self.lex_keys = WeakTensorKeyDictionary()
        # f's inputs in this pass: (primal, tangent, version) of each dual input (`input_view`)
        self.inputs: tuple[tuple[Tensor, Tensor, int], ...] = ()
        # (leaves, directions) of a pass that builds autograd's graph along a direction: a comparison's argument
        # whose tangent is 0 is ranked by its second-order tangent, computed on that graph (`_second_order_key`).
        # None: no graph; a comparison that needed one sets ``needs_second`` (the engine reruns with a graph)
        self.leaves: tuple[tuple[Tensor, ...], tuple[Tensor | None, ...]] | None = None
        self.needs_second = False
        # f ran a reverse pass (a gradient penalty): its other passes need inputs that require grad, and a graph
        self.reverses = False
        # a pass whose tangents are dropped after a call (`_engine._run`, lazy): no one reads the tangents of what
        # that call returns, so its rule may return none
        self.dead_from: int | None = None

    def tangent_read(self) -> bool:
        """Whether the tangent of what the current call returns may be read."""
        return self.dead_from is None or self.call < self.dead_from

    def input_view(self, primal: Tensor, tangent: Tensor | None) -> bool:
        """Whether a tensor (``primal``, ``tangent``) is one of f's inputs or a view of one, unmodified in this pass:
        its tangent is then the direction's own elements, so a tangent of 0 is an element the direction does not
        move at all (an element of another tensor with tangent 0 may still move at second order)."""
        if tangent is None or isinstance(tangent, LazyTangent):  # (a lazy tangent is computed, never an input's)
            return False
        ptr, tptr = primal.untyped_storage().data_ptr(), tangent.untyped_storage().data_ptr()
        return any(ptr == p.untyped_storage().data_ptr() and tptr == t.untyped_storage().data_ptr()
                   and primal._version == version for p, t, version in self.inputs)

    def known_here(self) -> list[Kink] | None:
        """The probe's kinks at the current call (ranked pass only), else None."""
        return None if self.known is None else self.known.get(self.call)

    def mark_flat(self, out: Tensor, c: float, live: Tensor | Callable[[], Tensor] | None) -> None:
        """Record that ``out`` is locally constant where it equals ``c``, except at the ``live`` mask (or a
        callable building it on first read)."""
        self.flat[out] = (c, live, out._version)

    def flat_source(self, x: Tensor, build: bool = True) -> tuple[float, Tensor | Callable | None] | None:
        """(c, live) recorded by `mark_flat` for x, unless x was modified in place since; ``build``: a live mask
        given as a callable is built (once)."""
        entry = self.flat.get(x)
        if entry is None or entry[2] != x._version:
            return None
        c, live, version = entry
        if build and callable(live):
            live = live()
            self.flat[x] = (c, live, version)
        return c, live

    def own_key_only(self) -> bool:
        """Whether the next kink's only ranking key (after the value) is this pass's tangent: no forced column
        and no earlier pass's keys."""
        return self.history is None and len(self.kinks) not in self.forced

    def ranks_alone(self, tangent: Tensor | None) -> bool:
        """Whether the next kink may be ranked by its own tangent alone and kept as a `_LazyKink`: records kept
        internal (``top_only``), exact ties, no other key, no values to collect."""
        return tangent is not None and self.top_only and self.tie_tol == 0 and self.near_tol is None \
            and not self.collect and self.own_key_only()

    def lazy_record(self, op: str, kind: str, cand, keys, choice, descending: bool = True) -> _LazyKink:
        """Append a `_LazyKink` (see `ranks_alone`) and return it."""
        record = _LazyKink(op, _user_line(), kind, cand, keys, choice,
                           (self.call, sum(k.call[0] == self.call for k in self.kinks)), descending)
        self.kinks.append(record)
        return record

    def resolve(self, op: str, kind: str, cand: Tensor, key: Tensor | None, values: Callable | None,
                descending: bool = True, primal: Tensor | None = None, comparison: bool = False,
                lazy: bool = False, order: Callable | None = None) -> tuple[Tensor | None, Tensor | None]:
        """Rank the tied candidates (G, m) lexicographically; return the winner (select) or order (order), and
        (comparisons only) the rows still tied after every key.

        Keys in order: the value (``primal``, order only: select candidates already tie in value), a forced
        column, the keys of earlier passes, this pass's tangent ``key``. ``lazy``: with no key at all, only
        record the kink (the caller keeps PyTorch's first-candidate choice) and return (None, None).
        ``order`` (order kinds): the caller's own ranking by (``primal``, ``key``), ``_lex_order``'s result for
        those two keys, used when ``key`` is the only key.
        """
        index = len(self.kinks)
        keys: list[Tensor] = []
        if index in self.forced:
            keys.append(self.forced[index])
        if self.history is not None:
            if index >= len(self.history) or self.history[index].op != op \
                    or self.history[index].cand.shape != cand.shape:
                raise NonsmoothError(f"f did not hit the same kinks on a second run ({op} at {_user_line()}); "
                                     "gradwise needs f to be deterministic")
            keys.extend(self.history[index].keys)
        if key is not None:
            keys.append(key.to(cand.device))
        record = Kink(op, _user_line(), kind, cand, descending, keys, comparison=comparison,
                      call=(self.call, sum(k.call[0] == self.call for k in self.kinks)))
        if self.collect and values is not None:
            record.values = values()
        self.kinks.append(record)
        if lazy and not keys:
            return None, None
        if kind == "select":
            sign = 1.0 if descending else -1.0
            result, still = _lex_argmax(cand, [sign * k for k in keys], comparison)
        elif order is not None and key is not None and len(keys) == 1:
            result, still = order()
        else:
            result, still = _lex_order(primal, keys, descending, cand)
        # internal records (generalized gradients) count the ties left only where a comparison needs them
        counted = still is not None and (comparison or not self.top_only)
        record.unresolved, record.choice = (int(still.sum()) if counted else 0), result
        return result, still

    def note_near(self, op: str, gap: Tensor) -> None:
        """Record elements whose gap to a kink is positive but within near_tol."""
        if self.near_tol is None or gap.numel() == 0:
            return
        near = (gap > 0) & (gap <= self.near_tol)
        if near.any():
            self.near.append(NearKink(op, _user_line(), int(near.sum()), float(gap[near].min())))


def _argmax_last(k: Tensor) -> Tensor:
    """``k.argmax(-1)``; for two columns (every elementwise switch) elementwise, as argmax picks: the first
    maximum, a NaN counting as the largest (a reduction over a last dim of 2 is slow on CPU)."""
    if k.shape[-1] != 2:
        return k.argmax(-1)
    a, b = k[..., 0], k[..., 1]
    return ((b > a) | (b.isnan() & ~a.isnan())).to(torch.int64)


def _lex_argmax(cand: Tensor, keys: list[Tensor], still: bool = True) -> tuple[Tensor, Tensor | None]:
    """First candidate that is largest in keys[0], then among those in keys[1], ...; and (``still``) the rows
    still tied after the last key."""
    if keys and not still:  # the last key by argmax (its first maximum), unless a key is -inf or NaN there
        for k in keys[:-1]:
            km = k.masked_fill(~cand, -math.inf)
            cand = cand & (km == km.amax(-1, keepdim=True))
        choice = _argmax_last(keys[-1].masked_fill(~cand, -math.inf))
        if bool(cand.gather(-1, choice.unsqueeze(-1)).all()):
            return choice, None
    for k in keys:
        km = k.masked_fill(~cand, -math.inf)
        cand = cand & (km == km.amax(-1, keepdim=True))
    return cand.to(torch.uint8).argmax(-1), cand.sum(-1) > 1 if still else None


def _lex_order(primal: Tensor, keys: list[Tensor], descending: bool, cand: Tensor) -> tuple[Tensor, Tensor]:
    """Permutation sorting each row by (primal, keys...) lexicographically (stable); the rows with ties left."""
    perm = torch.arange(primal.shape[-1], device=primal.device).expand_as(primal)
    for k in reversed([primal, *keys]):
        perm = perm.gather(-1, torch.sort(k.gather(-1, perm), dim=-1, descending=descending, stable=True).indices)
    full = torch.stack([primal, *keys], -1).gather(-2, perm.unsqueeze(-1).expand(*perm.shape, len(keys) + 1))
    still = (full[..., 1:, :] == full[..., :-1, :]).all(-1) & cand.gather(-1, perm)[..., 1:]
    return perm, still.any(-1)


_LEX_KEY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_INF_BITS = 0x7F800000  # float32 infinity's magnitude bits; a NaN's are larger


def _lex_key(primal: Tensor, key: Tensor) -> Tensor | None:
    """One int64 per element that orders like the pair (primal, key) lexicographically, as ``_lex_order``'s
    stable sorts compare them (-0.0 == 0.0): one sort of it is their two. None where no such key exists here
    (a dtype wider than 32 bits, a NaN, which sorts apart from every number).

    The high word is the primal's float32 sign-magnitude bits as a two's complement number (ordered as the
    floats are, -0.0 and 0.0 both 0), the low word the key's, as an unsigned word; both words are made in
    one pass over the int32 view of the stacked pair."""
    if primal.dtype not in _LEX_KEY_DTYPES or key.dtype not in _LEX_KEY_DTYPES or primal.shape != key.shape \
            or primal.numel() == 0:
        return None
    low_first = sys.byteorder == "little"  # the int64's words in memory order
    both = torch.empty(*primal.shape, 2, dtype=torch.float32, device=primal.device)
    both[..., 1 - low_first].copy_(key.detach())  # (two strided copies: ~3x faster than torch.stack here)
    both[..., int(low_first)].copy_(primal.detach())
    words = both.view(torch.int32)
    sign = words >> 31  # 0 or -1
    words.bitwise_and_(0x7FFFFFFF).bitwise_xor_(sign).sub_(sign)
    least, most = torch.aminmax(words)
    if not (-_INF_BITS <= int(least) and int(most) <= _INF_BITS):  # a NaN's magnitude bits exceed infinity's
        return None
    # the key's order as an unsigned word: flip its sign bit, bit 31 of the int64 (contiguous, unlike the words)
    return words.view(torch.int64).bitwise_xor_(2**31).squeeze(-1)


_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.dirname(__file__))  # gradwise/, as before the package


@functools.lru_cache(maxsize=1024)
def _shown_as(name: str, cwd: str) -> str | None:
    """How a code object's file is shown in a location (relative to ``cwd``), or None for torch's, gradwise's
    and contextlib's files (cached: every recorded kink walks these frames; relpath costs more than the walk)."""
    if name.startswith(_TORCH_DIR) or name.startswith(_OWN_DIR) or "contextlib" in name:
        return None
    return name if name.startswith("<") else os.path.relpath(name, cwd)


def _user_line() -> str:
    """file:line of the innermost frame outside torch and gradwise (the user's call)."""
    frame, cwd = sys._getframe(1), os.getcwd()
    while frame is not None:
        shown = _shown_as(frame.f_code.co_filename, cwd)
        if shown is not None:
            return f"{shown}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"
