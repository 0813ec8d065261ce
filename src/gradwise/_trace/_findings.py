"""The findings of a report as the tracer's ``_Assembly`` gathers them (``Findings``: one per key, with the birth
that explains each), and how each kind of finding is worded (contamination, genuine NaN/Inf, a sparse gradient).

May import: torch, gradwise._trace._common, _advice, _facts, _report, _store.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gradwise._trace._advice import (
    _BACKWARD_OVERFLOW_FIX,
    _GENUINE_FIX,
    _GRADIENT_FIX,
    _INPUT_FIX,
    _NUMBER_FIX,
    _OVERFLOW_FIX,
    _SEED_FIX,
    _SOFTMAX_INF,
    _SOFTMAX_INF_FIX,
    _STALE_GRADIENT_FIX,
    _UNDECIDED,
    _UNEXPLAINED_FIX,
    FULLY_MASKED,
    NUMBER,
    OVERFLOW,
)
from gradwise._trace._common import _fmt, _source
from gradwise._trace._facts import (
    _DISCARDS,
    _NOT_DATA,
    _OVERFLOW_NAMES,
    _ZERO_OUTPUTS,
    BACKWARD_OVERFLOW,
    STALE,
    WRITTEN_MASK,
    _discard_key,
    aten_packet,
)
from gradwise._trace._report import Finding
from gradwise._trace._store import Birth as _Birth
from gradwise._trace._store import Incident as _Incident
from gradwise._trace._store import _order


class Findings:
    """Findings by key (a key per what the user fixes once: a line, a birth), with the birth that explains each
    (``origin``: the root causes are grouped from it). ``add`` merges an occurrence into its key's finding."""

    def __init__(self) -> None:
        self.by_key: dict[tuple, Finding] = {}
        self.origin: dict[tuple, _Birth] = {}

    def add(self, key: tuple, make: Callable[[], Finding], count: int, reaches, indices, occurrences: int = 1,
            step: int | None = None, birth: _Birth | None = None) -> None:
        f = self.by_key.get(key)
        if f is None:
            f = self.by_key[key] = make()
            f.count, f.indices, f.occurrences = 0, indices, 0
            if birth is not None:
                self.origin[key] = birth
        f.count += count
        f.occurrences += occurrences
        f.reaches = sorted(set(f.reaches) | set(reaches))
        if step is not None and (f.step is None or step < f.step):
            f.step = step


def _site(kind: str, birth: _Birth) -> tuple:
    """A genuine finding's key: where its NaN/Inf was born; a gradient used as a value (an optimizer step) also
    by the birth itself, which is one per root cause (two bugs whose gradients one line writes: two findings)."""
    return (kind, birth.op, birth.loc) + ((birth.order,) if birth.op == "gradient" else ())


def rewrite_of(inc: _Incident) -> str:
    """The local rewrite for contamination ``inc``: its discarding op's (a slice's, a masked_fill's), else the
    general one. A contamination finding is one per rewrite (``_Assembly``): what the user fixes once."""
    key = _discard_key(inc.discarded[0]) if inc.discarded else None
    return _DISCARDS.get(key) or _ZERO_OUTPUTS.get(key) or \
        "mask the value before the op that makes NaN/Inf (e.g. before the division)"


def contamination(inc: _Incident, birth: _Birth | None, via: _Birth | None = None) -> Finding:
    disc_op, disc_loc = inc.discarded if inc.discarded else (None, None)
    rewrite = rewrite_of(inc)
    if disc_op is None:  # no op upstream discards values: the zero may be one the program computes
        return Finding(
            "contamination", inc.op, _fmt(inc.loc), inc.count,
            message=f"{inc.what}; the sensitivity there is 0, but no op that discards values (slice, where, "
            "mask...) made it: if the program computes that 0 (0 * x), it is an ordinary zero and the NaN is "
            f"genuine for gw.grad too{_unsure(inc)}", source=_source(inc.loc), born_op=birth.op if birth else inc.op,
            born_location=_fmt(birth.loc) if birth else _fmt(inc.loc),
            born=_born(birth, via) if birth else f"0/0 or 0 x Inf in {inc.op}, the backward of {inc.node_op}",
            fix=f"if the zero stands for 'not used', gw.strong_zeros() removes it only where a discarding op "
                f"made it: a kernel that skipped these elements (an RNN-T loss past the lengths) can declare "
                f"them with gw.mark_unused(x, unused) before it; otherwise {rewrite}", undecided=bool(inc.unsure))
    born = _born(birth, via) if birth else \
        f"a NaN/Inf in a sparse (non-strided) operand of the backward of {inc.node_op}, whose values the trace " \
        "does not read" if inc.unfollowed else \
        f"0/0 or 0 x Inf in {inc.op}, the backward of {inc.node_op} at {_fmt(inc.loc)}"
    fix = (f"gw.strong_zeros() cannot remove it: a sparse (or mkldnn, nested) tensor takes part in this "
           f"backward, which it runs as plain PyTorch. Rewrite: {rewrite}." if inc.unfollowed else
           f"gw.strong_zeros() (or gw.grad / gw.backward) removes it. Local rewrite: {rewrite}.")
    return Finding(
        "contamination", inc.op, _fmt(inc.loc), inc.count,
        message=f"{inc.what}; the output never used it{_unsure(inc)}",
        source=_source(inc.loc), born_op=birth.op if birth else inc.op,
        born_location=_fmt(birth.loc) if birth else _fmt(inc.loc), born=born,
        discarded_op=disc_op, discarded_location=_fmt(disc_loc) if disc_loc else None, fix=fix,
        undecided=bool(inc.unsure))


def _unsure(inc: _Incident) -> str:
    """Where the contamination reached gradients beside a genuine NaN/Inf that may cover it (``_Flow._covered``
    could not tell: no shadow strong pass), the message says so instead of claiming it there."""
    if not inc.unsure:
        return ""
    return (f"; at {', '.join(sorted(inc.unsure))} a genuine NaN/Inf reached the same gradient, and whether "
            "gw.strong_zeros() leaves those elements NaN/Inf too (no contamination there) is not known: the trace "
            "could not run the strong-zero pass beside this backward (create_graph, or grad enabled in a hook)")


def _genuine_fix(birth: _Birth) -> str:
    """The fix for a NaN/Inf an op made: the op's own (a domain, exp's overflow), or the overflow's where the op's
    is about something else or there is none."""
    if birth.what.startswith(NUMBER):
        return _NUMBER_FIX
    fix = _GENUINE_FIX.get(aten_packet(birth.op), "")
    if birth.what.startswith(OVERFLOW) and (not fix or birth.op == "aten.pow"):
        return _OVERFLOW_FIX
    return fix


def genuine(kind: str, inc: _Incident | None, birth: _Birth | None, via: _Birth | None = None) -> Finding:
    if birth is not None:
        op, loc = birth.op, birth.loc
        arrived = _STALE_GRADIENT_FIX if birth.what == STALE else _INPUT_FIX
        # (an infinity that an op made NaN of, named for that NaN: infinities_of; what the op made is told too)
        made = via if via is not None and via is not birth and birth in infinities_of(via) else None
        fix = arrived if birth.op == "input" else _GRADIENT_FIX if birth.op == "gradient" else \
            _SEED_FIX if birth.op == "seed" else _UNEXPLAINED_FIX if birth.op == "backward" else \
            _SOFTMAX_INF_FIX if (made or birth).what.startswith(_SOFTMAX_INF) else _genuine_fix(birth)
        what = birth.what if made is None else f"{birth.what}, then {made.op} made NaN of it: {made.what}"
        message = f"{what}; " + (_UNDECIDED.format(op=inc.op) if inc is not None and inc.undecided
                                       else "every gradient it reaches uses it" if birth.op == "seed"
                                       else "every backward adds to it" if birth.what == STALE
                                       else "whether the output used it (genuine) or not (contamination) is "
                                       "not known" if birth.op == "backward"
                                       else "the output depends on it")
    else:
        op, loc = inc.node_op, inc.loc
        fix = _BACKWARD_OVERFLOW_FIX if BACKWARD_OVERFLOW in inc.what else _NUMBER_FIX if NUMBER in inc.what else \
            _GENUINE_FIX.get(aten_packet(op), "")
        message = inc.what
    born = _born(birth, via) if birth else (inc.what if inc else None)
    return Finding(kind, op, _fmt(loc), 0, fix=fix or "find why the value is not finite where it is used",
                   message=message, source=_source(loc), born_op=birth.op if birth else (inc.op if inc else None),
                   born_location=_fmt(birth.loc) if birth else (_fmt(inc.loc) if inc else None), born=born,
                   undecided=birth is not None and inc is not None and inc.undecided)


def sparse_gradient(g: torch.Tensor, name: str, add: Callable) -> None:
    """A sparse gradient that holds NaN/Inf: the trace reads no sparse values, so it cannot say where it came
    from, but says that it is there (the report said 'No NaN/Inf gradients')."""
    values = g.coalesce()._values()
    if bool(torch.isfinite(values).all()):
        return
    kind = "nan" if bool(torch.isnan(values).any()) else "inf"
    add((kind, "sparse", name), lambda: Finding(
        kind, "sparse gradient", name, 0, source="", born_op=None, born_location=None,
        born="not observed: it came through sparse ops, whose values the trace does not read",
        message=f"the sparse gradient of {name} holds {'NaN' if kind == 'nan' else 'Inf'}; the trace cannot "
        "follow sparse ops, so it cannot tell where it was born nor whether strong zeros remove it",
        fix="trace the step with a dense gradient (nn.Embedding(sparse=False)) to see its birth; "
            "gw.grad / gw.strong_zeros() remove contamination that dense ops make before the sparse one"),
        int((~torch.isfinite(values)).sum()), [name], [])


def _born(birth: _Birth, via: _Birth | None) -> str:
    """The birth in words; when it is an overflow's infinity that a later op turned into NaN, that op too."""
    text = birth.describe()
    if via is not None and via is not birth:
        text += f"; then {via.op} at {_fmt(via.loc)} made NaN of it: {via.what}"
    return text


def overflow_root(b: _Birth | None) -> _Birth | None:
    """A NaN an op made from infinities alone, all born of an overflow (inf / inf in a naive softmax after exp
    overflowed, inf - inf) is explained by where the overflow happened, not by the op that met it. An infinity
    written on purpose (a -inf mask) is no root: the op that made NaN of it is (a fully masked softmax row)."""
    while b is not None and b.nan and b.parents and b.op not in _NOT_DATA and b.op != "input" \
            and all(not p.nan and p.op in _OVERFLOW_NAMES for p in b.parents):
        b = min(b.parents, key=_order)
    return b


def infinities_of(b: _Birth) -> list:
    """The infinities a NaN birth was made of (inf - inf of a written +inf and -inf, softmax over a row holding
    +inf), each a root of its own that the NaN's finding names (then that op made NaN of it): [] where the NaN
    is its own root (made of NaN, of a mask's -inf alone: a fully masked row; of overflows: ``overflow_root``).
    Named as a finding of its own, the NaN was a second (or third) finding of each used Inf, "genuine" twice."""
    if not (b.nan and b.made_of) or b.op in _NOT_DATA or b.op == "input" or b.formula or \
            b.what.startswith(FULLY_MASKED) or any(p.nan or p.op in _NOT_DATA or p.op in ("seed", "input") or
                                                   p.formula for p in b.parents):
        # (of a gradient used as a value, a backward's: downstream of that story, _causes.group; of data that
        # arrived Inf: born at the op, its cause the arrival, as before)
        return []
    return sorted((p for p in b.made_of if p.what != WRITTEN_MASK), key=_order)


def _line_order(location: str) -> tuple[str, int, str]:
    """A location's sort key: file, then line as a number ("f.py:9" before "f.py:10")."""
    file, _, line = location.rpartition(":")
    return (file, int(line), location) if line.isdigit() else (location, 0, location)
