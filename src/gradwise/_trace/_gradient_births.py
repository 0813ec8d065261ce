"""``_GradientBirths``: the part of the tracer that gives a NaN/Inf gradient used as a forward value (an optimizer
step writing it into a parameter) a birth of its own, whose parents are the incidents' births: the next step's
findings point back to the earlier backward.

May import: torch, gradwise._masks, gradwise._trace._common, _facts, _kinds, _store.
"""

from __future__ import annotations

import torch

from gradwise._trace._common import (
    _fmt,
    _has_nan,
    _nonfinite_mask,
)
from gradwise._trace._store import Birth as _Birth
from gradwise._trace._store import Incident as _Incident
from gradwise._trace._store import root as _root_birth


class _GradientBirths:
    """Births of gradients used as values (a part of _Tracer)."""

    def _backward_birth(self, inc: _Incident, t: torch.Tensor, nan: bool) -> _Birth:
        """The birth standing for an incident born in the backward (a formula made NaN/Inf from finite values:
        sqrt's at 0), once its gradient is used as a value: the root of what that value leads to."""
        known = self.backward_births.get(id(inc))
        if known is not None:
            return known[1]
        b = self._birth(inc.op, inc.loc, nan, None, _nonfinite_mask(t),
                        lambda idx: _Birth(inc.op, inc.loc, inc.what, 0, idx, nan))
        self.backward_births[id(inc)] = (inc, b)
        return b

    def _gradient_as_value(self, t: torch.Tensor, got: frozenset, loc) -> frozenset:
        """A non-finite gradient used as a forward value (an optimizer step writing it into a parameter): its
        NaN/Inf is born again there, with the incidents' births as parents, so the next step's findings point
        back to the earlier backward. Born once per line that uses it: a line that only reads the gradients
        (logging their norm) is not the one that writes them into the parameters."""
        per_line = self.as_value.get(t)
        if per_line is None:
            per_line = self.as_value[t] = {}
        cached = per_line.get(loc)
        if cached is not None:
            return cached
        incidents = [p for p in got if isinstance(p, _Incident)]
        first = min(incidents, key=lambda i: i.order)
        what = (f"a gradient with {first.kind if first.kind == 'contamination' else 'genuine ' + first.kind} from "
                f"{first.op} (the backward of {first.node_op}) at {_fmt(first.loc)}, used as a value"
                if first.op != "backward" else  # (Checks.unexplained_gradient)
                f"a NaN/Inf gradient of the backward at {_fmt(first.loc)} (not explained), used as a value")
        nan, name = _has_nan(t), self.names.get(t)
        parents = frozenset(p for p in got if isinstance(p, _Birth)).union(
            *(i.births or {self._backward_birth(i, t, nan)} for i in incidents))
        # one birth per root cause (the earliest birth it descends from): two bugs' gradients written at one line
        # are two downstream findings, and a later step's gradient, which mixes in that step's births, is the same
        first_root = min(map(_root_birth, parents), key=lambda b: b.order, default=None)
        cause = None if first_root is None else (first_root.op, first_root.loc)
        b = self._birth("gradient", loc, nan, name, _nonfinite_mask(t),
                        lambda idx: _Birth("gradient", loc, what, 0, idx, nan, name=name), parents, cause=cause)
        got = per_line[loc] = frozenset([b])
        return got
