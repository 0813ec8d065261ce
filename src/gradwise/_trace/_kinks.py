"""The trace's kink detectors (``kink_detector``, ``_Detector``, ``_Hit``, ``_Call``): the shared op facts of
``gradwise._ops._kinks`` as the tracer reads them, plus the one detector that needs the tracer's own records
(``where`` on a comparison's tie).

The trace reports kinks and singular points; it skips the facts of kind "jump" (PyTorch's value there is the
derivative on both sides: nothing to explain) and the ``coarse`` ones (too coarse to name elements).

May import: torch, gradwise._ops, gradwise._trace._common.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from gradwise._ops._kinks import OpCall, Site, kink_fact
from gradwise._trace._common import aten

_Hit = Site  # what a detector returns: mask, aligned, found, kind ("kink" or "singular"), convention


@dataclass(frozen=True)
class _Detector:
    fn: Callable
    needs_out: bool  # else it runs before the op, so in-place variants work


@dataclass
class _Call(OpCall):
    """One forward op call as a detector sees it: with the tracer's comparison ties."""

    ties: WeakTensorKeyDictionary | None = None


def _where_on_tie(c: _Call) -> _Hit | None:
    """where(a > b, ...) with a == b somewhere: the comparison picks one branch at the tie (False for > and <,
    so all of the gradient goes to the second branch; True for >= and <=)."""
    tie = c.ties.get(c.args[0]) if isinstance(c.args[0], torch.Tensor) else None
    if tie is None:
        return None
    mask, picks = tie
    return _Hit(torch.broadcast_to(mask, c.out.shape), kind="kink", convention=f"all to the {picks} branch at a tie")


_WHERE = _Detector(_where_on_tie, needs_out=True)


def kink_detector(func) -> _Detector | None:
    """The kink detector for an aten op (an OpOverload or its packet), or None for an op without kinks the trace
    reports. An in-place variant has one when its fact needs no output (the input is read before the op)."""
    packet = getattr(func, "overloadpacket", func)
    if packet is aten.where:
        return _WHERE
    fact = kink_fact(packet)
    if fact is None or fact.kind == "jump" or fact.coarse:
        return None
    if fact.needs_out and packet.__name__.endswith("_"):
        return None
    return _Detector(_without_jumps(fact.site), fact.needs_out)


def _without_jumps(site_of: Callable) -> Callable:
    """A fact's location with its jump sites dropped: the trace skips jumps, of a whole fact (above) or of one
    site of a kink fact (pow's 0 ** p at p = 0)."""

    def located(call: OpCall) -> _Hit | None:
        site = site_of(call)
        return None if site is None or site.kind == "jump" else site

    return located
