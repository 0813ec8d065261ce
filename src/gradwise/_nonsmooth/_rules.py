"""The kink-rule table: ``KINK_RULES`` (aten op -> rule), ``_ROUTES`` (callable -> rule), ``UNRULED``, the
registrar ``kink_rule`` / ``_registrar``, ``rule_for``, and the helpers rules share (``_split``, ``_switch``,
``_resolve_sign``, ``_finish``, ``_is_dual``, ``_needs_grad`` ...).

May import: torch, gradwise._masks, ``_errors``, ``_records``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD

from gradwise._masks import mask_any
from gradwise._nonsmooth._errors import NonsmoothError
from gradwise._nonsmooth._records import _Run, _user_line

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------------ rule table

KINK_RULES: dict[object, Callable] = {}
_ROUTES: dict[Callable, Callable] = {}
# Ops with kinks but no rule: f hitting one with a direction gets a clear error instead of a silent convention.
UNRULED: dict[Callable, str] = {}


def _registrar(table: dict, routes: dict) -> Callable:
    """A decorator factory filling ``table`` (keyed by aten op) and ``routes`` (torch-level callables)."""

    def register_for(op, *calls: Callable):
        def register(rule: Callable) -> Callable:
            table[op] = rule
            for c in calls:
                routes[c] = rule
            return rule

        return register

    return register_for


kink_rule = _registrar(KINK_RULES, _ROUTES)
kink_rule.__doc__ = "Register a rule for aten ``op``; ``calls`` are the torch-level callables that reach it."


def rule_for(op) -> Callable:
    """The kink rule for an aten op (the one lookup point)."""
    try:
        return KINK_RULES[op]
    except KeyError:
        raise NonsmoothError(f"gradwise has no kink rule for {op}; the ops with rules are: "
                             f"{', '.join(sorted(str(k) for k in KINK_RULES))}") from None


def _split(x) -> tuple[Tensor, Tensor | None]:
    if not isinstance(x, Tensor):
        return x, None
    p, t = fwAD.unpack_dual(x)
    return p, t


def _tied_rows(mask: Tensor) -> Tensor:
    return mask.reshape(-1).nonzero().squeeze(1)


class _LazyRows:
    """``_tied_rows(mask)``, computed on the first call."""

    def __init__(self, mask: Tensor):
        self.mask, self.rows = mask, None

    def __call__(self) -> Tensor:
        if self.rows is None:
            self.rows = _tied_rows(self.mask)
        return self.rows


def _near_zero(t: Tensor, tol: float) -> bool:
    """Whether some |t| <= tol: one min-reduction instead of a full-size boolean pass (the everyday path)."""
    if t.numel() == 0:
        return False
    t = t.detach()
    m = float(t.abs().amin())
    if m != m:  # amin propagates NaN: look past it
        return bool(mask_any(t.abs() <= tol))
    return m <= tol


# --- elementwise switches ----------------------------------------------------------------------------------


def _resolve_sign(run: _Run, op: str, s, tie, **kw):
    """At the tied elements of a switch on the sign of ``s``: which side (0: s > 0, 1: s < 0) wins along the
    direction, comparing the tangent of ``s`` with 0 (then further directions). Returns (rows, choice, still)."""
    sp, st = _split(s)
    rows = _tied_rows(tie)
    ds = st.reshape(-1)[rows] if st is not None else sp.new_zeros(len(rows))
    key = torch.stack([ds, torch.zeros_like(ds)], 1)
    cand = torch.ones(len(rows), 2, dtype=torch.bool, device=sp.device)
    values = lambda: torch.stack([s.reshape(-1)[rows], torch.zeros_like(s.reshape(-1)[rows])], 1)
    choice, still = run.resolve(op, "select", cand, key, values, **kw)
    return rows, choice, still


def _switch(run: _Run, op: str, s, pos, neg, native: Callable, *, jumps: bool = False, flat: bool = False,
            skip: Callable | None = None):
    """Elementwise ``pos`` where s > 0, ``neg`` where s < 0; at s == 0 the piece that wins along the direction.

    For continuous ops (relu, max, clamp ...) both pieces agree where s == 0, so the tangent there is that of
    the winning piece: the exact one-sided derivative. Ops that ``jumps`` (threshold, hardshrink) have
    different pieces at s == 0: moving to the other piece there is an error, not a derivative. ``flat``: ``neg``
    is a constant that ``pos`` never equals where s > 0 (relu), so the output equals it exactly where it is dead.
    ``skip(tie)``: the tied elements that are no kink (both sides locally constant and equal), or None.
    """
    sp = _split(s)[0]
    if run.near_tol is not None:
        run.note_near(op, sp.abs())
    tie = None
    if _near_zero(sp, run.tie_tol):  # one min-reduction: cheaper than a full-size mask where nothing ties
        tie = sp == 0 if run.tie_tol == 0 else sp.abs() <= run.tie_tol
        dead = skip(tie) if skip is not None else None
        if dead is not None:
            tie = tie & ~dead
            tie = tie if mask_any(tie) else None
    if tie is None:
        out = native() if native is not None else torch.where(sp > 0, pos, neg)
        if flat:
            run.mark_flat(out, neg, None)
        return out
    st = _split(s)[1]
    if not jumps and run.ranks_alone(st):  # the choice is the sign of s' at each tie: elementwise
        # pos where s > 0 or NaN (NaN propagates through pos, as in PyTorch's kernels), or s == 0 and s' >= 0
        # (or NaN): where s' stands in for s at the ties, pos unless the result is < 0
        lock = torch.lt(torch.where(tie, st, sp), 0).logical_not_()
        rows = _LazyRows(tie)
        ds = lambda: st.reshape(-1)[rows()]
        # as `_resolve_sign` records: two candidates per tie, the key (s', 0), s < 0's side where s' < 0
        record = run.lazy_record(op, "select", lambda: torch.ones(len(rows()), 2, dtype=torch.bool,
                                                                   device=tie.device),
                                 lambda: [torch.stack([d := ds(), torch.zeros_like(d)], 1)],
                                 lambda: (ds() < 0).to(torch.int64))
        record.write = lambda c: lock.data.view(-1).index_put_((rows(),), c == 0)
    else:
        rows, choice, _ = _resolve_sign(run, op, s, tie)
        lock = torch.le(sp, 0).logical_not_()
        lock.view(-1)[rows] = choice == 0
        run.kinks[-1].write = lambda c: lock.data.view(-1).index_put_((rows,), c == 0)
    if jumps:
        pp, nn_ = (torch.broadcast_to(torch.as_tensor(_split(v)[0], dtype=sp.dtype), sp.shape).reshape(-1)[rows]
                   for v in (pos, neg))
        if ((pp != nn_) & (choice == 0)).any():
            raise NonsmoothError(f"{op} at {_user_line()} jumps here: f is discontinuous at x along this "
                                 "direction, so the one-sided derivative does not exist")
    out = torch.where(lock, pos, neg)
    if flat and run.tie_tol == 0:  # the tied elements sit on the kink: live, whichever side is locked
        run.mark_flat(out, neg, tie)
    return out


def _finish(func, x: Tensor, out: Tensor, inplace: bool) -> Tensor:
    """In-place variants write the locked result back into x."""
    return x.copy_(out) if inplace and out is not x else out


def _is_dual(a) -> bool:
    return isinstance(a, Tensor) and fwAD.unpack_dual(a).tangent is not None


def _needs_grad(a) -> bool:
    return isinstance(a, Tensor) and a.requires_grad and torch.is_grad_enabled()
