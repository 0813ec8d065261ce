"""``_KinkReads``, the part of `_kink_mode._KinkMode` that watches what f reads out of its values: values read
into Python (``.item()``, ``.tolist()``, ``if t:``) and the indices a tied kink call returned (``_flat_tensors``,
``_ties``).

May import: torch, ``_errors``, ``_records``, ``_rules``, ``_kink_watch``.
"""

from __future__ import annotations

import torch

from gradwise._nonsmooth._errors import NonsmoothError
from gradwise._nonsmooth._kink_watch import _callable_name
from gradwise._nonsmooth._records import Kink, _user_line
from gradwise._nonsmooth._rules import _unpack

Tensor = torch.Tensor


def _flat_tensors(values) -> list[Tensor]:
    out = []
    for v in values:
        if isinstance(v, Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):  # (torch.return_types are tuples)
            out.extend(_flat_tensors(v))
    return out


def _ties(read: list[tuple], before: list[tuple]) -> bool:
    """Whether (value, tangent) pairs read into Python tie: a moving value at 0, or two equal values whose
    tangents differ (None: unknown, so they may)."""
    seen: dict[float, set] = {}
    for v, tv in before:
        seen.setdefault(v, set()).add(tv)
    for v, tv in read:
        if v == 0 and tv != 0:
            return True
        known = seen.setdefault(v, set())
        if known and (tv is None or None in known or known != {tv}):
            return True
        known.add(tv)
    return False


class _KinkReads:
    """Methods of `_KinkMode` for what f reads: a possible jump a tangent-free pass defers, values read into
    Python, indices of tied kink calls. They use the mode's ``run``, ``count``, ``used``, ``last_tie``,
    ``used_at_tie``, ``read_values`` and ``exposed``."""

    def _defer(self, op: str) -> None:
        """A possible jump this tangent-free pass cannot decide: a comparison kink without a lock, so the caller
        runs f along a direction (a full pass), where the watch and `_check_no_jump` decide."""
        self.run.kinks.append(Kink(op, _user_line(), "select", torch.ones(1, 1, dtype=torch.bool), comparison=True,
                                   call=(self.count, 0)))
        self.last_tie, self.used_at_tie = self.count, set(self.used)

    def _python_read(self, t: Tensor, func) -> None:
        """f reads values that depend on its inputs into Python (``.tolist()``, ``.item()``, ``if t:``), where
        its code may compare them: gradwise follows torch's comparisons, not Python's. Two values read (here or
        before) that are equal but move apart along the direction (different tangents), or a moving value at 0
        (the common threshold), may take another branch: an error there. Equal values moving alike (the same
        value read twice) keep their order, as untied ones do. Without tangents nothing tells: such a read is a
        kink that a pass along a direction decides (as `DeferredJump`)."""
        p, tangent = _unpack(t)
        if not (p.is_floating_point() or p.is_complex()) or p.numel() == 0:
            return
        values = p.detach().reshape(-1)
        if p.is_complex():
            values = torch.view_as_real(values).reshape(-1)
            tangent = None if tangent is None else torch.view_as_real(tangent)
        if values.numel() > 1 << 12:  # (a large read: ties within it only, by value)
            _, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
            tied = bool((values == 0).any()) or bool((counts[inverse] > 1).any())
        else:
            read = dict.fromkeys(zip(values.tolist(), [None] * values.numel() if tangent is None else
                                     tangent.reshape(-1).tolist(), strict=True))
            before = [pair for _, pairs in self.read_values.values() for pair in pairs]
            tied = _ties(list(read), before)
            base = t._base if t._base is not None else t
            self.read_values.setdefault(id(base), (base, []))[1].extend(read)  # (base held: its id stays its own)
        if not tied:
            return
        if tangent is None:
            self._defer(str(func))
            return
        raise NonsmoothError(f"f reads values that depend on its inputs into Python ({_callable_name(func)} at "
                             f"{_user_line()}) where they tie (with each other, with values read before, or with "
                             "0) and move apart along the direction: Python code comparing them may take another "
                             "branch, which gradwise cannot follow. Compare with torch ops instead (torch.where, "
                             "argmax, maximum), which it follows")

    def _read_indices(self, args, kwargs) -> None:
        """f reads the indices a tied kink call returned. Its value may jump there (argmax used as a number, a
        gather of another tensor): the kink is checked like a comparison (`_engine._check_no_jump`). Where this
        pass chose the ties provisionally (max_unpool placing values by them), writing the ranked choice
        afterwards would leave the forward inconsistent with the graph: not lockable (one full pass instead)."""
        for t in _flat_tensors((*args, *kwargs.values())):
            entry = self.exposed.get(id(t))
            if entry is not None and entry[0] is t:
                for k in entry[1]:
                    k.indices_read = True
                    if not k.tangent:
                        k.write = None
