"""Subdifferentials and stationarity certificates at kinks.

The Clarke subdifferential of a piecewise-smooth f at x is the convex hull of the gradients of the smooth pieces
active at x (those that agree with f on an open cone at x). `subdifferential` finds them exactly while few
kinks are hit: a depth-first search over the kink calls in program order, forcing branch choices (the replay
mechanism of `_engine`), where a choice is kept only if some direction d makes it the winner, i.e. the
strict linear inequalities on d it implies are feasible (a linear program, ``scipy.optimize.linprog``). Each
leaf is an active piece; its gradient is one reverse pass. Beyond the budget it samples generalized gradients
along random directions (then it cannot prove that nothing is missing).

The least-norm point of the hull comes from non-negative least squares (``scipy.optimize.nnls``):
min_{mu >= 0} ||G^T mu||^2 + (1 - 1^T mu)^2 has solution mu = lambda / (1 + r^2), lambda the least-norm
weights and r the least norm, so lambda = mu / sum(mu) exactly. The result is checked against the optimality
condition (`_least_norm_optimal`) and solved again by BVLS (``lsq_linear``) where NNLS stopped short of it.

May import: torch, numpy, scipy, gradwise._modes, ``_contexts``, ``_records``, ``_rules``, ``_engine``, ``_bound``.
scipy is imported where it is first used, not with gradwise: it costs ~0.4 s, and with scipy loaded a 2-rank gloo
FSDP2 run aborts at exit ("terminate called without an active exception") about 1 time in 12 on torch 2.13 CPU (without
gradwise too).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from gradwise._modes import dynamo_off
from gradwise._nonsmooth import _contexts as _ctx
from gradwise._nonsmooth._bound import lower_bound
from gradwise._nonsmooth._engine import (
    _as_inputs,
    _check_no_jump,
    _grad_or_zero,
    _locked_grad,
    _probe,
    _random_direction,
    _run,
    _scalar,
)
from gradwise._nonsmooth._norm_ball import ball_pieces
from gradwise._nonsmooth._records import Kink, NearKink, _Run
from gradwise._nonsmooth._rules import _cut_backwards, _delayed_error

__all__ = ["Stationarity", "Subdifferential", "stationarity", "subdifferential"]

MAX_KINKS = 12  # enumerate exactly up to this many tied elements
MAX_LPS = 4096  # ... and up to this many feasibility checks
MAX_GROUP = 5  # largest tied group of a sort/topk whose orders are enumerated


@dataclass
class Subdifferential:
    """Generalized gradients at a point: ``elements`` (each shaped like ``generalized_grad``'s result).

    ``exact`` is True when they are the gradients of all active pieces (their hull is the Clarke
    subdifferential), False when sampled (their hull is inside it).
    """

    elements: list[tuple[torch.Tensor, ...]]
    exact: bool
    kinks: list[Kink] = field(default_factory=list)
    near_kinks: list[NearKink] = field(default_factory=list)
    # inputs that f uses only after its last tie: every element of the subdifferential has the same part there
    fixed: tuple[int, ...] = ()

    def matrix(self) -> torch.Tensor:
        """(number of elements, number of input entries) float64 matrix of the flattened elements."""
        return torch.stack([_flat(e) for e in self.elements])

    @dynamo_off  # NumPy and SciPy on the elements' values: eager inside a compiled function, as they are outside
    def min_norm_weights(self) -> np.ndarray:
        """Convex weights of the least-norm point of the elements' hull (SciPy NNLS, see module doc)."""
        g = self.matrix().cpu().numpy()
        if not np.isfinite(g).all():  # a NaN/Inf gradient (a singular point without a rule): no hull to solve
            return np.full(len(g), np.nan)
        if len(g) == 1:
            return np.ones(1)
        # the weights do not change with the scale; NNLS's tolerances do: gradients of 1e19 (binary cross-entropy
        # near 0) left it at mu = 0
        scale = np.abs(g).max()
        g = g / scale if scale > 0 else g
        a = np.vstack([g.T, np.ones((1, len(g)))])
        b = np.zeros(a.shape[0])
        b[-1] = 1.0
        from scipy.optimize import lsq_linear, nnls  # on first use: see the module docstring

        mu, _ = nnls(a, b, maxiter=50 * a.shape[1] + 100)
        lam = mu / mu.sum()
        if not _least_norm_optimal(g, lam):  # SciPy's NNLS can stop at a vertex (1.17: sort's 6 pieces): BVLS
            mu = lsq_linear(a, b, bounds=(0, np.inf), method="bvls").x
            other = mu / mu.sum()
            if np.linalg.norm(other @ g) < np.linalg.norm(lam @ g):
                lam = other
        return lam

    @dynamo_off
    def min_norm_element(self) -> tuple[torch.Tensor, ...]:
        """The least-norm point of the convex hull of the elements, shaped like an element."""
        lam = torch.from_numpy(self.min_norm_weights())
        point = lam @ self.matrix()
        return _unflat(point, self.elements[0])


@dataclass
class Stationarity:
    """Certificate: ``stationary`` True (0 is in the Clarke subdifferential up to ``atol``), False (proved
    not: all active pieces known, f differentiable with a nonzero gradient, or ``lower_bound`` > atol), None
    (undecided). ``lower_bound``: a proved lower bound on the least norm (the least norm itself when exact; with
    sampled pieces, the larger of the norm of the gradient part that every piece shares (inputs used only after
    the last tie) and the interval-tangent bounds along the least-norm points of the pieces' bounding box and of
    the pieces, ``_bound.py``)."""

    stationary: bool | None
    min_norm: float
    kinks: list[Kink]
    near_kinks: list[NearKink]
    exact: bool
    element: tuple[torch.Tensor, ...]
    subdifferential: Subdifferential
    # a proved lower bound on the least norm over the whole subdifferential (0.0 where nothing is known)
    lower_bound: float = 0.0

    def __str__(self) -> str:
        verdict = {True: "stationary", False: "not stationary", None: "undecided"}[self.stationary]
        how = "all active pieces" if self.exact else "sampled pieces"
        lines = [f"{verdict}: least-norm generalized gradient {self.min_norm:.3g} over "
                 f"{len(self.subdifferential.elements)} {how}"]
        lines += [f"  kink: {k.describe()}" for k in self.kinks]
        lines += [f"  near kink: {n.op} at {n.location}: {n.count} element(s) within {n.gap:.2g}"
                  for n in self.near_kinks]
        return "\n".join(lines)


def _derived(seed: int, k: int) -> int:
    """The k-th seed drawn from ``seed`` (wrapping within generalized_grad's range [0, 2^63 - 1])."""
    return (seed + k) % 2**63


def _least_norm_optimal(g: np.ndarray, lam: np.ndarray) -> bool:
    """Whether p = lam @ g is the least-norm point of the hull of g's rows: its optimality condition, every row
    g_i with g_i . p >= |p|^2 (the hull lies beyond the plane through p normal to it), up to rounding."""
    if g.size == 0:  # no entries (an empty input): the least norm is 0
        return True
    p = lam @ g
    scale = max(float(np.abs(g).max()), 1.0) ** 2 * g.shape[1]
    return bool(np.all(np.isfinite(lam))) and float((g @ p).min() - p @ p) >= -1e-9 * scale


def _flat(t) -> torch.Tensor:
    return torch.cat([x.detach().reshape(-1).to(torch.float64).cpu() for x in t])


def _unflat(v: torch.Tensor, like: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    out, i = [], 0
    for x in like:
        out.append(v[i : i + x.numel()].reshape(x.shape).to(x.dtype))
        i += x.numel()
    return tuple(out)


class _Budget(Exception):
    """Too many pieces to enumerate: fall back to sampling."""


def _feasible(rows: list[np.ndarray], n: int, counter: list[int], start: np.ndarray | None = None,
              new: int = 0) -> np.ndarray | None:
    """A direction d with r . d > 0 for every row r (scaled: r . d >= 1), or None where there is none. ``start``:
    a point that satisfies all rows but the last ``new``; where it plus the sum of the new (normalized) rows, or
    the sum of all rows, satisfies every row, that point is the answer without an LP (independent ties, sum|x_i|
    at 0: each choice adds rows on coordinates of its own, and 2^k choices asked HiGHS 2^k times). Either way it
    counts as one check against `MAX_LPS`, so the budget and what is enumerated do not change."""
    if not rows:
        return np.zeros(n)
    counter[0] += 1
    if counter[0] > MAX_LPS:
        raise _Budget
    a = np.stack([r / np.linalg.norm(r) for r in rows])
    tries = [a.sum(0)] if start is None or not new else [start + a[len(a) - new :].sum(0), a.sum(0)]
    for p in tries:
        lowest = float((a @ p).min())
        if lowest > 1e-9 * (1.0 + float(np.abs(p).sum())):  # (far above the rounding of a @ p)
            return p / lowest
    from scipy.optimize import linprog  # on first use: see the module docstring

    res = linprog(np.zeros(n), A_ub=-a, b_ub=-np.ones(len(a)), bounds=[(None, None)] * n, method="highs")
    return res.x if res.status == 0 else None


def _jacobian(values: torch.Tensor, cand: torch.Tensor, leaves) -> np.ndarray:
    """Gradients (G, m, n) of the candidate values w.r.t. the inputs (zero rows for non-candidates)."""
    n = sum(x.numel() for x in leaves)
    jac = np.zeros((*cand.shape, n))
    for g, i in cand.nonzero().tolist():
        v = values[g, i]
        if v.requires_grad:
            grads = torch.autograd.grad(v, leaves, retain_graph=True, allow_unused=True)
            jac[g, i] = _flat([torch.zeros_like(x) if d is None else d for x, d in zip(leaves, grads, strict=True)])
    return jac


def _options(rec: Kink, jac: np.ndarray, tol: float, sides: dict[int, int]):
    """For each tied group of a kink: the (constraint rows, forced key row) of each distinct branch (``sides``:
    groups where one branch alone is active, `_second_order_sides`)."""
    g_count, m = rec.cand.shape
    sign = 1.0 if rec.descending else -1.0
    per_group = []
    for g in range(g_count):
        tied = rec.cand[g].nonzero().flatten().tolist()
        same = lambda i, k: np.linalg.norm(jac[g, i] - jac[g, k]) <= tol  # noqa: B023
        opts = []
        if g in sides:
            key = torch.zeros(m, dtype=torch.float64)
            key[sides[g]] = sign
            opts.append(([], key))
        elif rec.kind == "select":
            for i in tied:
                if any(same(i, k) for k in tied if k < i):
                    continue  # same gradient as an earlier candidate: the same piece to first order
                rows = [sign * (jac[g, i] - jac[g, k]) for k in tied if k != i and not same(i, k)]
                key = torch.zeros(m, dtype=torch.float64)
                key[i] = sign
                opts.append((rows, key))
        else:
            values = rec.values[g].detach()
            blocks = [[i for i in tied if values[i] == v] for v in sorted({float(values[i]) for i in tied})]
            if max(len(b) for b in blocks) > MAX_GROUP:
                raise _Budget
            for perms in itertools.product(*[itertools.permutations(b) for b in blocks]):
                if any(same(a, b) and p.index(a) > p.index(b) for p in perms for a in p for b in p if a < b):
                    continue
                rows, key = [], torch.zeros(m, dtype=torch.float64)
                for p in perms:
                    for r, i in enumerate(p):
                        key[i] = -r if rec.descending else r
                    rows += [sign * (jac[g, p[r]] - jac[g, p[r + 1]]) for r in range(len(p) - 1)
                             if not same(p[r], p[r + 1])]
                opts.append((rows, key))
        per_group.append(opts)
    return per_group


def _enumerate(f, xs, single, tie_tol: float, tol: float = 1e-9) -> list[tuple[torch.Tensor, ...]]:
    """Gradients of all active pieces, by depth-first search over forced branch choices."""
    zeros = tuple(torch.zeros_like(x) for x in xs)
    n = sum(x.numel() for x in xs)
    counter, found = [0], []

    def explore(c: int, forced: dict, rows: list, d: np.ndarray):
        # the ties not forced yet are ranked along a direction the forced choices allow (the LP's point): a run
        # whose later ties took PyTorch's sides could contradict them (y[x > 0] = x[x > 0]: two masks of one
        # comparison, one forced, made shapes that do not match)
        run = _Run(forced=dict(forced), collect=True, tie_tol=tie_tol)
        along = zeros if not d.any() else _unflat(torch.from_numpy(d), zeros)
        _, primals, leaves, _ = _run(f, xs, single, along, run, True)
        if c == len(run.kinks):
            y = _scalar(primals)
            _check_no_jump(f, xs, single, run, [y])  # a branch of a jump is no piece active at x
            grads = _grad_or_zero(y, leaves)
            found.append(tuple(torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads, strict=True)))
            if len(found) > MAX_LPS:
                raise _Budget
            return
        rec = run.kinks[c]
        if rec.continuum or rec.values is None:
            raise _Budget
        jac = _jacobian(rec.values, rec.cand, leaves)
        options = _options(rec, jac, tol, _second_order_sides(rec, jac, leaves, tol) if rec.comparison else {})

        def choose(g: int, acc_rows: list, keys: list, d: np.ndarray):
            if g == len(options):
                explore(c + 1, {**forced, c: torch.stack(keys).to(rec.cand.device)}, acc_rows, d)
                return
            for opt_rows, key in options[g]:
                new = acc_rows + opt_rows
                point = d if not opt_rows else _feasible(new, n, counter, d if acc_rows else None, len(opt_rows))
                if point is not None:
                    choose(g + 1, new, [*keys, key.to(_dtype_of(rec))], point)

        choose(0, rows, [], d)

    explore(0, {}, [], np.zeros(n))
    return found


def _second_order_sides(rec: Kink, jac: np.ndarray, leaves, tol: float) -> dict[int, int]:
    """The tied groups of a comparison whose argument s has gradient 0 (its candidates s and 0 have the same row):
    which side alone is active near x (0: s > 0, 1: s < 0), where the Hessian of s is definite (x*x + y*y > 0 at 0:
    s > 0 in a punctured neighbourhood). Elsewhere, or where it cannot be told, `_Budget`: sides on the cones
    {d: dᵀ(∇²s)d > 0} and {< 0} (indefinite: `where(x*x > y*y, |x|, |y|)` at 0 has four active pieces, of which
    the LP's half-spaces kept two), or decided at third order and beyond (semidefinite or 0: x³ > y³ is x > y) are
    not half-spaces, which the linear feasibility checks cannot enumerate; sampled generalized gradients rank them
    by s'' (`_rules._second_order_key`). The Hessian takes one reverse pass per input entry (at most
    `MAX_HESSIAN`)."""
    norms = [np.linalg.norm(jac[g, 0] - jac[g, 1]) if rec.cand[g, 0] and rec.cand[g, 1] else np.inf
             for g in range(rec.cand.shape[0])]
    if any(0 < v <= tol for v in norms):
        # a gradient below tol but not 0 (1e-12 x + x² + y² > 0 at 0): both half-spaces are active, not the side
        # the Hessian picks (exact=True kept one, stationary=False where both make 0); rounding noise or a real
        # slope, it cannot be told: sampled
        raise _Budget
    flat = [g for g, v in enumerate(norms) if v == 0]
    if not flat:
        return {}
    if not rec.values.requires_grad or sum(x.numel() for x in leaves) > MAX_HESSIAN:
        raise _Budget
    s = rec.values[:, 0] - rec.values[:, 1]
    sides = {}
    for g in flat:
        h = _hessian(s[g], leaves)
        if h is None:
            raise _Budget
        eig = np.linalg.eigvalsh((h + h.T) / 2)
        margin = np.sqrt(np.finfo(np.float64).eps) * np.abs(eig).max()
        if eig.min() > margin:
            sides[g] = 0
        elif eig.max() < -margin:
            sides[g] = 1
        else:
            raise _Budget
    return sides


MAX_HESSIAN = 64  # input entries up to which a comparison's Hessian is formed (one reverse pass each)


def _hessian(y: torch.Tensor, leaves) -> np.ndarray | None:
    """The Hessian of scalar y w.r.t. the leaves (flattened), or None where a backward on the way builds no graph
    for it (a custom Function's: `_rules._cut_backwards`; its rows would read 0)."""
    with torch._C.DisableTorchFunction(), torch.enable_grad(), _cut_backwards(y) as cut:
        grads = torch.autograd.grad(y, leaves, create_graph=True, allow_unused=True)
    g = torch.cat([(torch.zeros_like(x) if d is None else d).reshape(-1) for x, d in zip(leaves, grads, strict=True)])
    if cut or any(d is not None and d.requires_grad and _delayed_error(d) for d in grads):
        return None
    n = g.numel()
    if not g.requires_grad:
        return np.zeros((n, n))
    rows = []
    with torch._C.DisableTorchFunction():
        for i in range(n):
            r = torch.autograd.grad(g[i], leaves, retain_graph=True, allow_unused=True) if g[i].requires_grad \
                else (None,) * len(leaves)
            rows.append(_flat([torch.zeros_like(x) if d is None else d for x, d in zip(leaves, r, strict=True)]))
    return torch.stack(rows).numpy()


def _dtype_of(rec: Kink) -> torch.dtype:
    return rec.values.dtype if rec.values is not None else torch.float64


def _distinct(elements: list[tuple[torch.Tensor, ...]], tol: float = 1e-12) -> list[tuple[torch.Tensor, ...]]:
    """``elements`` without those within ``tol`` (relative to their own max norm) of an earlier kept one. Pairs
    are compared only where their projections on one fixed vector w are that close (|w.(u - v)| <= sum(w) max|u -
    v|): 2^11 distinct pieces of sum|x_i| took a minute compared pairwise."""
    if len(elements) < 2:
        return list(elements)
    v = torch.stack([_flat(e).to(torch.float64) for e in elements]).cpu().numpy()
    if not np.isfinite(v).all():  # (NaN compares as no duplicate nor distinct: pairwise, as written)
        out, seen = [], []
        for e, u in zip(elements, v, strict=True):
            if all(np.abs(u - s).max() > tol * (1 + np.abs(u).max()) for s in seen):
                out.append(e)
                seen.append(u)
        return out
    scale = tol * (1 + np.abs(v).max(1))
    w = 1.0 + np.arange(v.shape[1]) % 7 / 7.0
    proj = v @ w
    order = np.argsort(proj, kind="stable")
    ordered = proj[order]
    # the window: the bound, plus the rounding of the projections (n terms, each within eps of w_k |v_k|)
    reach = w.sum() * scale + 4 * v.shape[1] * np.finfo(np.float64).eps * (np.abs(v) @ w).max()
    keep = np.ones(len(v), dtype=bool)
    for i in range(1, len(v)):
        near = order[np.searchsorted(ordered, proj[i] - reach[i], "left"):
                     np.searchsorted(ordered, proj[i] + reach[i], "right")]
        near = near[(near < i) & keep[near]]
        keep[i] = not near.size or bool((np.abs(v[near] - v[i]).max(1) > scale[i]).all())
    return [e for e, k in zip(elements, keep, strict=True) if k]


@_ctx.same_state
def subdifferential(f: Callable, inputs, *, samples: int | None = None, seed: int | None = None,
                    tie_tol: float = 0.0, near_tol: float | None = 1e-6) -> Subdifferential:
    """Generalized gradients of scalar f at ``inputs``: all active pieces when few kinks are hit, else samples.

    ``samples`` forces sampling with that many random directions. ``tie_tol`` > 0 treats values within it as
    tied (an epsilon-subdifferential); ``near_tol`` reports elements that close to a kink without touching it.

    >>> import torch, gradwise as gw
    >>> sd = gw.subdifferential(lambda x: x.abs().sum(), torch.zeros(2))
    >>> len(sd.elements), sd.exact
    (4, True)
    >>> bool(sd.min_norm_element()[0].abs().max() < 1e-12)
    True
    """
    _ctx.check_int("samples", samples, low=1, high=1_000_000, allow_none=True)
    _ctx.check_int("seed", seed, low=0, high=2**63 - 1, allow_none=True)
    seed = None if seed is None else int(seed)  # a NumPy integer too
    _ctx.check_real("tie_tol", tie_tol, low=0.0)
    _ctx.check_real("near_tol", near_tol, low=0.0, allow_none=True)
    xs, single = _as_inputs(inputs)
    d, _ = _random_direction(xs, 0 if seed is None else seed)
    probe, mode = _probe(f, xs, single, d, tie_tol=tie_tol, near_tol=near_tol)
    kinks = probe.kinks
    fixed = tuple(i for i in range(len(xs)) if i not in mode.used_at_tie)
    tied = sum(k.count for k in kinks)
    if not kinks:
        grads = _locked_grad(f, xs, single, seed, {"tie_tol": tie_tol})[0]
        return Subdifferential([grads], True, [], probe.near)
    if samples is None and tied <= MAX_KINKS:
        try:
            return Subdifferential(_distinct(_enumerate(f, xs, single, tie_tol)), True, kinks, probe.near)
        except _Budget:
            pass
    base = 0 if seed is None else seed
    found = [_locked_grad(f, xs, single, _derived(base, i), {"tie_tol": tie_tol})[0] for i in range(samples or 32)]
    return Subdifferential(_distinct(found), False, kinks, probe.near, fixed)


@_ctx.same_state
def stationarity(f: Callable, inputs, *, atol: float = 1e-6, samples: int | None = None, seed: int | None = None,
                 tie_tol: float = 0.0, near_tol: float | None = 1e-6) -> Stationarity:
    """Is 0 a Clarke generalized gradient of scalar f at ``inputs``? A certificate, see `Stationarity`.

    ``stationary`` is True when the least-norm point of the generalized gradients found is within ``atol`` of
    0 (with sampled pieces, `_certify` first adds the pieces that mix to 0 where the subdifferential is a box of
    independent entries); None when it is within the rounding of the inputs' dtype but not ``atol`` (8 ulps of the
    largest generalized gradient: in half precision a hull that holds 0 misses it by rounding, and one that does
    not can come that close: rounding decides, nothing is proved); False when every active piece was enumerated
    (or f is differentiable there), or when a proved lower bound on the least norm exceeds ``atol`` and the
    rounding (with sampled pieces: the part every piece shares, or
    interval tangents along the least-norm point of the pieces' bounding box, then of the pieces, refined by
    Frank-Wolfe steps; exact for elements that read one input element; docs/nonsmooth.md); None otherwise.
    Exact ties only count as kinks; ``near_kinks`` lists elements within ``near_tol`` of one, where a tiny
    move changes the answer (pass ``tie_tol`` to treat them as ties).

    >>> import torch, gradwise as gw
    >>> cert = gw.stationarity(lambda x: torch.maximum(x, -2 * x), torch.tensor(0.0))
    >>> cert.stationary, cert.min_norm
    (True, 0.0)
    """
    _ctx.check_real("atol", atol, low=0.0)
    sd = subdifferential(f, inputs, samples=samples, seed=seed, tie_tol=tie_tol, near_tol=near_tol)
    element = sd.min_norm_element()
    norm = float(_flat(element).norm())
    asked, atol = atol, max(atol, _rounding(sd))
    bound = norm if sd.exact else _fixed_part_norm(sd)
    if not sd.exact and tie_tol == 0 and bound <= atol < norm < math.inf and _one_ball(sd):
        sd, element, norm, bound = _ball(f, inputs, sd, element, norm, bound, seed)
    if not sd.exact and tie_tol == 0 and bound <= atol < norm < math.inf:
        bound = max(bound, _box_bound(f, inputs, sd, norm))  # (one pass, none where the pieces' box holds 0)
        if bound <= atol:
            sd, element, norm = _certify(f, inputs, sd, element, norm, seed)
        if bound <= atol < norm:
            sd, element, norm, bound = _refine(f, inputs, sd, element, norm, bound, atol, seed)
    if not math.isfinite(norm):
        verdict = None
    elif norm <= asked:
        verdict = True
    elif norm <= atol:  # within rounding of 0, not within what was asked: rounding decides
        verdict = None
    else:
        verdict = False if sd.exact or bound > atol else None
    return Stationarity(verdict, norm, sd.kinks, sd.near_kinks, sd.exact, element, sd, bound)


def _one_ball(sd: Subdifferential) -> bool:
    """Whether the only kink is one Euclidean norm of one slice at 0 (`_norm_ball`)."""
    return len(sd.kinks) == 1 and sd.kinks[0].ball and sd.kinks[0].count == 1


def _ball(f, inputs, sd: Subdifferential, element, norm: float, bound: float, seed):
    """The ellipsoid's least-norm pieces joined to the hull, and its least norm as the bound (`_norm_ball`).
    Returns (subdifferential, element, least norm found, lower bound)."""
    xs, single = _as_inputs(inputs)
    got = ball_pieces(f, xs, single, sd.elements[0], 0 if seed is None else seed)
    if got is None:
        return sd, element, norm, bound
    pieces, least = got
    sd, element, norm = _with(sd, [*sd.elements, *pieces], element, norm)
    return sd, element, norm, max(bound, min(norm, least * (1 - 1e-9)))


def _rounding(sd: Subdifferential) -> float:
    """How far rounding alone can move the least norm: the generalized gradients are computed in the inputs'
    dtype, each to within a few ulps of its norm (float16's 1/3 is 0.33325: a hull that holds 0 exactly misses it
    by 6e-5). 8 eps of the largest element: 0 for float64 in practice, the tolerance below which half precision
    proves nothing."""
    if not sd.elements:
        return 0.0
    eps = max(torch.finfo(e.dtype).eps for el in sd.elements for e in el)
    largest = max(float(_flat(el).norm()) for el in sd.elements)
    return 8 * eps * largest if math.isfinite(largest) else 0.0


MAX_THRESHOLDS = 16  # distinct per-entry mixing weights that `_certify` builds pieces for


def _box(sd: Subdifferential) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-entry least and largest values of the elements (flattened, float64)."""
    g = sd.matrix()
    return g.amin(0), g.amax(0)


def _box_bound(f, inputs, sd: Subdifferential, norm: float) -> float:
    """A proved lower bound on the least norm: the interval bound (``_bound.lower_bound``) along the least-norm
    point of the elements' bounding box. That direction keeps only the entries where every element found has one
    sign (sum |x| + 2 x[0] at 0: x[0] alone, whose pieces lie in [1, 3]), where the least-norm point of the hull
    mixes every entry and the interval pass then adds up every tied entry's slack. 0.0 where it proves nothing."""
    lo, hi = _box(sd)
    w = torch.where(lo > 0, lo, torch.where(hi < 0, hi, torch.zeros_like(lo)))
    if not bool(w.any()) or not bool(torch.isfinite(w).all()):
        return 0.0
    xs, single = _as_inputs(inputs)
    got = lower_bound(f, xs, single, _unflat(w, sd.elements[0]))
    return 0.0 if got is None else min(got, norm)  # (a sub-hull's least norm is at least the true one)


def _certify(f, inputs, sd: Subdifferential, element, norm: float, seed):
    """Pieces that make 0 a convex combination where the subdifferential is a box of independent entries.

    If each entry i of the pieces takes a low value lo_i <= 0 or a high one hi_i >= 0 depending on the side d_i
    moves to (sum |x|, relu layers), 0 is the mixture with weight l_i = hi_i / (hi_i - lo_i) on lo_i in entry i:
    for each threshold t among the distinct l_i, the piece that is low where l_i > t and high elsewhere, weighted
    by the gap to the next threshold. A direction with the matching signs asks for each such piece (the side that
    gives the high value: from the pieces along +1 and -1). Every piece found is a generalized gradient whatever
    f is, so the least-norm point of the enlarged hull is still proved; if f is not like that, nothing is lost but
    the passes. Returns (subdifferential, element, least norm)."""
    xs, single = _as_inputs(inputs)
    like = sd.elements[0]
    gen = torch.Generator().manual_seed(0 if seed is None else seed)
    jitter = 1 + 0.1 * torch.rand(sum(x.numel() for x in xs), generator=gen, dtype=torch.float64)
    base = 0 if seed is None else seed

    def piece(d: torch.Tensor, k: int):
        return _locked_grad(f, xs, single, _derived(base, 2_000_003 + k), {}, direction=_unflat(d, like))[0]

    up, down = piece(jitter, 0), piece(-jitter, 1)
    elements = [*sd.elements, up, down]
    lo, hi = _box(Subdifferential(elements, False))
    if not bool(((lo <= 0) & (hi >= 0)).all()):  # some entry keeps one sign: no mixture is 0
        return _with(sd, elements, element, norm)
    high_side = torch.where(_flat(up) >= _flat(down), 1.0, -1.0)
    weight = torch.where(hi > lo, hi / (hi - lo), torch.zeros_like(lo))
    thresholds = torch.unique(weight)
    if len(thresholds) > MAX_THRESHOLDS:
        return _with(sd, elements, element, norm)
    for k, t in enumerate([0.0, *thresholds.tolist()]):
        elements.append(piece(torch.where(weight > t, -high_side, high_side) * jitter, 2 + k))
    return _with(sd, elements, element, norm)


def _with(sd: Subdifferential, elements: list, element, norm: float):
    """(subdifferential, element, norm) with ``elements`` where their hull comes nearer to 0."""
    grown = Subdifferential(_distinct(elements), False, sd.kinks, sd.near_kinks, sd.fixed)
    point = grown.min_norm_element()
    value = float(_flat(point).norm())
    return (grown, point, value) if value < norm else (sd, element, norm)


MAX_REFINE = 8  # interval bounds tried along successive least-norm points of the sampled pieces


def _refine(f, inputs, sd: Subdifferential, element, norm: float, bound: float, atol: float, seed):
    """Sampled pieces left the answer open: bound every piece's derivative along the least-norm point w of the
    pieces found (``_bound.lower_bound``, interval tangents). While that proves nothing, add the piece that the
    branches with the least tangent along w make (a generalized gradient along -w: a Frank-Wolfe step of the
    least-norm problem) and try again along the new least-norm point. Returns (subdifferential, element, least
    norm found, lower bound)."""
    xs, single = _as_inputs(inputs)
    elements = list(sd.elements)
    base = 0 if seed is None else seed
    for step in range(MAX_REFINE):
        interval = lower_bound(f, xs, single, element)
        if interval is None:
            break
        bound = max(bound, min(interval, norm))  # (a sub-hull's least norm is at least the true one)
        if bound > atol:
            break
        w = _flat(element)
        piece = _locked_grad(f, xs, single, _derived(base, 1_000_003 + step), {},
                             direction=tuple(-e.detach() for e in element))[0]
        if float(_flat(piece) @ w) >= float(w @ w) * (1 - 1e-12):  # no piece below the current point along w
            break
        elements.append(piece)
        sd = Subdifferential(elements, False, sd.kinks, sd.near_kinks, sd.fixed)
        element = sd.min_norm_element()
        norm = float(_flat(element).norm())
        if norm <= atol:  # the pieces found now hold a point within atol of 0: stationary, proved
            break
    return sd, element, norm, bound


def _fixed_part_norm(sd: Subdifferential) -> float:
    """A lower bound on the least norm of the Clarke subdifferential when its pieces were only sampled.

    An input that f uses only after its last tie is no ancestor of any tied op: backpropagating to it crosses only
    ops evaluated at the same values whatever branch each tie takes, so its part of the gradient is the same in
    every piece active at x, hence in every element of the subdifferential (the hull of their limits). The norm of
    that common part bounds the least norm from below, however many ties there are.
    """
    if not sd.fixed or not sd.elements:
        return 0.0
    part = torch.cat([sd.elements[0][i].detach().reshape(-1).to(torch.float64).cpu() for i in sd.fixed])
    value = float(part.norm())
    return value if math.isfinite(value) else 0.0
