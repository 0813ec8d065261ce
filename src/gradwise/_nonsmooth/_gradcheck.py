"""Kink-aware gradcheck: ``torch.autograd.gradcheck`` that tells a kink from a wrong gradient.

Away from kinks it is PyTorch's gradcheck. At a kink, central differences mean nothing, so for each output
element it compares the backward result with the one-sided differences along each coordinate and with the Clarke
subdifferential (`gradwise.subdifferential`): "kink: PyTorch's value is a generalized gradient" passes, "is not"
fails. A wrong backward is still caught: the backward is also checked at random differentiable points next to x.

May import: torch, ``_contexts``, ``_errors``, ``_engine``, ``_stationarity``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.autograd.gradcheck import GradcheckError as _TorchGradcheckError

from gradwise._nonsmooth import _contexts as _ctx
from gradwise._nonsmooth._engine import (
    _as_inputs,
    _call,
    _grad_or_zero,
    _locked_grad,
    _outputs,
    directional_derivative,
    kinks_and_opaque,
    kinks_hit,
)
from gradwise._nonsmooth._errors import NonsmoothError
from gradwise._nonsmooth._stationarity import Subdifferential, _flat, stationarity, subdifferential

__all__ = ["GradcheckError", "GradcheckResult", "gradcheck"]


class GradcheckError(AssertionError):
    """Raised by `gradcheck` (when ``raise_exception``) on a gradient that is wrong."""


@dataclass
class GradcheckResult:
    """``passed``; ``kink`` (x is a kink); ``generalized`` (at a kink: is the backward's value in the Clarke
    subdifferential, None if it could not be decided, which does not pass); ``messages``, one per finding."""

    passed: bool
    kink: bool
    generalized: bool | None = None
    messages: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        return "\n".join(self.messages) or ("passed" if self.passed else "failed")


def _torch_gradcheck(f, xs, single, eps, atol, rtol) -> str | None:
    """PyTorch's gradcheck; the first line of its complaint, or None when it passes."""
    leaves = tuple(x.detach().requires_grad_(True) for x in xs)
    fn = (lambda *a: f(a[0])) if single else f
    try:
        torch.autograd.gradcheck(fn, leaves, eps=eps, atol=atol, rtol=rtol, raise_exception=True)
    except _TorchGradcheckError as exc:
        return str(exc).strip().splitlines()[0]
    return None


@_ctx.same_state
def gradcheck(f: Callable, inputs, *, eps: float = 1e-6, atol: float = 1e-5, rtol: float = 1e-3,
              nearby: int = 2, nearby_radius: float = 1e-3, seed: int = 0,
              raise_exception: bool = True) -> GradcheckResult:
    """Check f's backward against finite differences, and at kinks against the subdifferential.

    Inputs should be float64 (as for ``torch.autograd.gradcheck``). ``nearby`` random points within
    ``nearby_radius`` of x are checked the ordinary way too, so a wrong backward cannot hide behind a kink.
    Returns a `GradcheckResult` (truthy when passed); raises `GradcheckError` on failure when
    ``raise_exception``.

    >>> import torch, gradwise as gw
    >>> x = torch.tensor([0.0], dtype=torch.float64)
    >>> result = gw.gradcheck(lambda x: torch.relu(x) - torch.relu(-x), x, raise_exception=False)
    >>> result.passed, result.kink, result.generalized
    (False, True, False)
    >>> print(str(result).split(";")[0])
    kink at x (aten.relu): PyTorch's value [0.0] is not a generalized gradient of output 0
    """
    _ctx.check_real("eps", eps, low=0.0, low_open=True)
    _ctx.check_real("atol", atol, low=0.0)
    _ctx.check_real("rtol", rtol, low=0.0)
    _ctx.check_int("nearby", nearby, low=0, high=10_000)
    _ctx.check_real("nearby_radius", nearby_radius, low=0.0, low_open=True)
    _ctx.check_int("seed", seed, low=0, high=2**63 - 1)
    seed = None if seed is None else int(seed)  # a NumPy integer too
    xs, single = _as_inputs(inputs)
    result = GradcheckResult(True, False)
    gen = torch.Generator().manual_seed(int(seed))
    checked = 0  # nearby points checked the ordinary way
    for _ in range(nearby):
        moved = tuple(x + nearby_radius * torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in xs)
        if kinks_hit(f, moved if not single else moved[0], tangents=False)[0]:
            continue
        checked += 1
        if (err := _torch_gradcheck(f, moved, single, eps, atol, rtol)) is not None:
            result.passed = False
            result.messages.append(f"wrong gradient at a differentiable point next to x: {err}")
    kinks, opaque = kinks_and_opaque(f, xs if not single else xs[0])
    if kinks and nearby and not checked:  # the subdifferential comes from the same backward: no independent check
        result.passed = False
        result.messages.append(f"every one of the {nearby} points near x hits a kink too (an op tied everywhere "
                               "around x): the backward could not be checked at a differentiable point, so its "
                               "value at x cannot be trusted; check f at another x, or raise nearby_radius")
    if not kinks:
        if (err := _torch_gradcheck(f, xs, single, eps, atol, rtol)) is not None:
            result.passed = False
            hidden = _unseen_kink(f, xs, single, eps, atol, rtol)
            result.messages.append(f"wrong gradient: {err}" if hidden is None else
                                   f"f is not differentiable at x ({hidden}) but no kink op gradwise sees sits at a "
                                   "kink there: the kink is in code it cannot see (a custom autograd.Function's "
                                   "forward, an extension), so the backward cannot be checked at x; check it at "
                                   f"a point nearby (PyTorch's gradcheck: {err})")
        elif (hidden := _unseen_kink(f, xs, single, eps, atol, rtol, confirm=True)) is not None:
            # central differences average the two sides of a kink: a backward that does so passes PyTorch's check
            # yet need not be a generalized gradient (max(x, y, z) at 0 with 1/2 to each tied input)
            result.passed = False
            result.messages.append(f"f is not differentiable at x ({hidden}) but no kink op gradwise sees sits at "
                                   "a kink there: the kink is in code it cannot see (a custom autograd.Function's "
                                   "forward, an extension). PyTorch's value agrees with central differences, "
                                   "which average the two sides of a kink and need not be a generalized "
                                   "gradient, so it cannot be shown to be one; check the backward at a point "
                                   "nearby")
    else:
        result.kink = True
        try:
            _check_kink(f, xs, single, kinks, eps, atol, result, opaque)
        except (NotImplementedError, NonsmoothError) as exc:  # e.g. a custom Function without jvp, a jump
            result.passed, result.generalized = False, None  # not shown to be a generalized gradient: no pass
            result.messages.append(f"kink at x: the subdifferential could not be computed ({exc})")
    if raise_exception and not result.passed:
        raise GradcheckError(str(result))
    return result


def _check_kink(f, xs, single, kinks, eps, atol, result: GradcheckResult, opaque: bool) -> None:
    leaves = tuple(x.detach().requires_grad_(True) for x in xs)
    _ctx.restore_state()
    outs = torch.cat([o.reshape(-1) for o in _outputs(_call(f, leaves, single))])
    ops = ", ".join(sorted({k.op for k in kinks}))
    verdicts = []
    for k in range(outs.numel()):
        row = _grad_or_zero(outs[k], leaves, retain_graph=True)
        row = tuple(torch.zeros_like(x) if g is None else g for x, g in zip(xs, row, strict=True))
        fk = lambda *a, k=k: torch.cat([o.reshape(-1) for o in _outputs(f(*a))])[k]
        sd = subdifferential(fk, xs)
        gap = Subdifferential([tuple(e - r for e, r in zip(el, row, strict=True)) for el in sd.elements], sd.exact)
        dist = float(_flat(gap.min_norm_element()).norm())
        inside = dist <= atol * (1 + float(_flat(row).norm()))
        verdict = True if inside else (False if sd.exact else _shifted_verdict(fk, xs, row, atol))
        if verdict is True and (disagree := _reverse_against_forward(fk, xs, k, eps, atol, opaque)) is not None:
            # the subdifferential came through the backward under test: checked against the forward mode, and
            # that against f's values (a custom Function's kink, unseen, whose backward and jvp agree but lie)
            verdict, found = disagree
            result.messages.append(f"kink at x ({ops}): {found}")
            verdicts.append(verdict)
            continue
        verdicts.append(verdict)
        if verdict is True:
            continue
        words = "is not" if verdict is False else "could not be shown to be"
        vertices = [[round(float(v), 6) for v in _flat(e)] for e in sd.elements[:8]]
        result.messages.append(
            f"kink at x ({ops}): PyTorch's value {[round(float(v), 6) for v in _flat(row)]} {words} a generalized "
            f"gradient of output {k}; the Clarke subdifferential is the hull of {vertices} (distance {dist:.3g}); "
            f"one-sided partials (left, right): {_one_sided(fk, xs, sd)}")
    result.generalized = None if None in verdicts else all(verdicts)
    if result.generalized is not True:  # undecided is no pass: a wrong backward could hide there
        result.passed = False
    elif result.generalized:
        result.messages.append(f"kink at x ({ops}): PyTorch's value is a generalized gradient")


def _reverse_against_forward(fk, xs, k: int, eps: float, atol: float, opaque: bool,
                             directions: int = 2) -> tuple[bool | None, str] | None:
    """The subdifferential above is made of reverse passes through f's backward, the one under test. Along a
    direction d, the generalized gradient g_d (the piece active along d, through that backward) and the one-sided
    derivative f'(x; d) (forward mode, no backward involved) must agree: <g_d, d> = f'(x; d). A backward that is
    wrong only at x (where the nearby points cannot see it) fails here: (False, why). Forward mode takes a custom
    Function's jvp as its derivative, so f'(x; d) is also held against f's one-sided differences along d: a kink
    inside such a Function (unseen, its backward and jvp agreeing on a value no side has) makes them disagree at
    every step: (None, why), nothing can be shown at x. None when all agree. Only where f runs ``opaque`` code
    (`kinks_and_opaque`): elsewhere forward mode is gradwise's rules, and differences are no better a reference
    (a term whose quotients vanish slowly, |x|^1.05 at 0, reads as a gap at every step)."""
    gen = torch.Generator().manual_seed(k)
    for _ in range(directions):
        d = tuple(torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype) for x in xs)
        g = _locked_grad(fk, xs, False, None, direction=d)[0]
        reverse = float(sum((gi * di).sum() for gi, di in zip(g, d, strict=True)))
        forward = float(directional_derivative(fk, xs, d))
        if abs(reverse - forward) > atol * (1 + abs(forward)):
            return False, (f"the backward's generalized gradient along a random direction d gives <g, d> = "
                           f"{reverse:.6g}, but f'(x; d) = {forward:.6g} (forward mode): the backward (or a custom "
                           f"jvp) is wrong at x for output {k}")
        if opaque and (differences := _unseen_slope(fk, xs, d, g, forward, eps, atol)) is not None:
            return None, (f"along a random direction d, f'(x; d) = {forward:.6g} (forward mode: gradwise's rules and "
                          f"any custom Function's jvp) but f's one-sided differences give {differences:.6g} at every "
                          f"step down to eps * 1e-4: f has a kink at x that gradwise cannot see (a custom "
                          f"autograd.Function's forward, an extension) or a wrong jvp, so PyTorch's value for output "
                          f"{k} cannot be shown to be a generalized gradient; check the backward at a point nearby")
    return None


_ROUNDING_ULPS = 8  # rounding in f's value at x and at x + eps d, in ulps of |f| (a few ops' worth)


def _unseen_slope(fk, xs, d, g, forward: float, eps: float, atol: float) -> float | None:
    """f's one-sided difference quotient along d where it stays away from ``forward`` (the gap holds as the step
    shrinks, `_persists`, and is above the quotient's rounding: a few ulps of |f| over the step, and the rounding
    of x + eps d itself, |g| ulp(x) / eps for f's gradient g; relu + 100 x² at 1 in float32 at eps 1e-6 is ~50),
    else None. (1e3 ulps of |f| over the step let a slope error of 1e-3 pass at |f| = 1e5 in float64.)"""
    def at(*a) -> torch.Tensor:
        _ctx.restore_state()  # each pass from the call's random state: one dropout mask, and one run's state after
        return fk(*a).reshape(1)

    with torch.no_grad():
        base = at(*(x.detach() for x in xs))

        def quotient(h: float) -> torch.Tensor:
            return (at(*(x.detach() + h * di for x, di in zip(xs, d, strict=True))) - base) / h

        at_eps = quotient(eps)
        gap = (at_eps - forward).abs()
        rounding = (_ROUNDING_ULPS * _ulp(base) * float(base.abs().max()) + sum(
            float((gi.abs() * _ulp(x) * (x.abs() + eps * di.abs())).sum())
            for x, di, gi in zip(xs, d, g, strict=True))) / eps
        kinked = (gap > 10 * atol * (1 + abs(forward))) & (gap > rounding)
        if bool(kinked.any()):
            kinked = _persists(lambda h: (quotient(h) - forward).abs(), base, gap, kinked, eps)
        return float(at_eps) if bool(kinked.any()) else None


def _ulp(t: torch.Tensor) -> float:
    """The relative rounding unit of t's dtype (0 for an exact one)."""
    return torch.finfo(t.dtype).eps if t.is_floating_point() else 0.0


def _unseen_kink(f, xs, single, eps: float, atol: float, rtol: float, confirm: bool = False) -> str | None:
    """A coordinate along which f's one-sided difference quotients disagree (f has a kink there), or None.
    ``confirm``: the gap must also stay at a step ten times smaller (at a smooth point it shrinks with the step:
    curvature, 2000 x² at 0, is no kink)."""
    def at(i: int, j: int, step: float) -> torch.Tensor:
        moved = [v.detach().clone() for v in xs]
        moved[i].view(-1)[j] += step
        return torch.cat([o.reshape(-1) for o in _outputs(_call(f, tuple(moved), single))])

    with torch.no_grad():
        base = torch.cat([o.reshape(-1) for o in _outputs(_call(f, tuple(x.detach() for x in xs), single))])
        for i, x in enumerate(xs):
            for j in range(x.numel()):
                right, left = (at(i, j, eps) - base) / eps, (base - at(i, j, -eps)) / eps
                gap = (right - left).abs()
                kinked = gap > 10 * (atol + rtol * torch.maximum(right.abs(), left.abs()))
                if confirm and bool(kinked.any()):
                    kinked = _persists(lambda h, i=i, j=j: ((at(i, j, h) - base) - (base - at(i, j, -h))).abs() / h,
                                       base, gap, kinked, eps)
                if bool(kinked.any()):
                    return f"x{'' if len(xs) == 1 else i}[{j}]: one-sided differences {float(gap.max()):.3g} apart"
    return None


def _persists(gap_at: Callable, base: torch.Tensor, gap: torch.Tensor, kinked: torch.Tensor,
              eps: float) -> torch.Tensor:
    """``kinked`` where the one-sided gap (``gap_at(h)``) stays above half its size at ``eps`` and at the step
    before, at the steps eps/10, eps/100 ...: a kink at x keeps its gap as the step shrinks; curvature's shrinks
    with the step (10x at each, once the step is below its scale: cos(1e8 x) at 0), and a kink a distance r from x
    leaves once the step is below r (|x - 1e-8| + |x + 1e-8| at 0 is flat there, PyTorch's 0 is its gradient;
    sqrt(x² + 1e-16) is smooth). eps/10 always; smaller steps down to eps * 1e-4, while rounding in f's values
    (~1e3 ulps of its size over the step) stays well under the gap."""
    h, ulp = eps / 10, torch.finfo(base.dtype).eps if base.is_floating_point() else 0.0
    size, last = float(base.abs().max()) if base.numel() else 0.0, gap
    while True:
        now = gap_at(h)
        kinked, last = kinked & (now > gap / 2) & (now > last / 2), now  # (curvature: 10x less each step)
        h /= 10
        if not bool(kinked.any()) or h < eps * 1e-4 or h < 1e3 * ulp * size / float(gap[kinked].min()):
            return kinked


def _shifted_verdict(fk, xs, row, atol: float) -> bool | None:
    """With sampled pieces: g is in the Clarke subdifferential of f at x iff 0 is in that of f - <g, .> (a linear
    term shifts it exactly), which `stationarity` decides with its proved bound (True, False, or None)."""
    g = tuple(r.detach() for r in row)

    def shifted(*a):
        return fk(*a) - sum((gi * ai).sum() for gi, ai in zip(g, a, strict=True))

    return stationarity(shifted, xs, atol=atol * (1 + float(_flat(row).norm()))).stationary


def _one_sided(fk, xs, sd: Subdifferential | None = None) -> str:
    """Exact left and right partial derivatives along each coordinate where they differ (the first eight). With an
    exact subdifferential (every active piece), a coordinate where all pieces share their entry has equal sides
    (f'(x; d) is <g, d> for a piece g active along d) and is skipped: two passes per coordinate, 750 coordinates of
    clamp's three 5x10x5 operands took 20 s for the message alone."""
    parts = []
    same = None
    if sd is not None and sd.exact and sd.elements:
        flat = torch.stack([_flat(e) for e in sd.elements])
        same = (flat == flat[:1]).all(0).tolist()
    at = 0
    for i, x in enumerate(xs):
        for j in range(x.numel()):
            at += 1
            if len(parts) >= 8:
                return "; ".join(parts)
            if same is not None and parts and same[at - 1]:
                continue
            e = [torch.zeros_like(v) for v in xs]
            e[i].view(-1)[j] = 1.0
            right = float(directional_derivative(fk, xs, tuple(e)))
            left = -float(directional_derivative(fk, xs, tuple(-v for v in e)))
            if left != right or len(parts) == 0:
                parts.append(f"x{'' if len(xs) == 1 else i}[{j}]: ({left:.6g}, {right:.6g})")
    return "; ".join(parts[:8])
