"""Kink rules at singular points and for norms and distances: sqrt, pow, vector/matrix norms, cdist, pdist,
dist, pairwise_distance, hypot, std, argmax/argmin/argsort/aminmax, msort, elu/selu/rrelu,
smooth_l1_loss, triplet_margin_loss; eigvalsh at repeated eigenvalues; det at singular matrices (PyTorch's
derivative is 0 there).

May import: torch, gradwise._masks, ``_errors``, ``_records``, ``_rules``, ``_rules_pointwise``, ``_rules_select``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from gradwise._masks import mask_all, mask_any
from gradwise._nonsmooth._errors import NonsmoothError
from gradwise._nonsmooth._records import Kink, _user_line
from gradwise._nonsmooth._rules import _ROUTES, _finish, _is_dual, _split, _switch, kink_rule
from gradwise._nonsmooth._rules_pointwise import _clamp, _hinge, _pair, _reduce, abs, l1_loss, leaky_relu
from gradwise._nonsmooth._rules_select import _reduce_select, sort
from gradwise._ops._cuts import _complex, maybe_power_cut, on_branch_cut, on_real_axis, power_cut

aten = torch.ops.aten
Tensor = torch.Tensor


# --- singular points and norms ------------------------------------------------------------------------------


def _singular(op: str, x: Tensor, why: str):
    xp = _split(x)[0]
    at0 = xp == 0
    if at0.any():
        raise NonsmoothError(f"{op} at {_user_line()} is evaluated at 0 for {int(at0.sum())} element(s), where "
                             f"{why}; f'(x; d) does not exist or needs second-order terms. Write norms with "
                             "torch.linalg.vector_norm (exact at 0) or keep the argument away from 0.")


def _on_cut(op: str, cut: Tensor | None):
    if cut is not None and bool(cut.any()):
        raise NonsmoothError(f"{op} at {_user_line()} is evaluated on its branch cut (a complex value on the "
                             f"negative real axis, or 0) for {int(cut.sum())} element(s), where the result jumps "
                             "(its imaginary part changes sign): f'(x; d) does not exist there")


@kink_rule(aten.sqrt, torch.sqrt, Tensor.sqrt)
def sqrt(run, func, x):
    """sqrt(x): singular at 0 (infinite slope): an error naming the line instead of inf/NaN. A complex x on the
    negative real axis: an error too (the imaginary part of the result changes sign across it: a jump)."""
    _on_cut("aten.sqrt", on_branch_cut("sqrt", _split(x)[0], on_real_axis(x)))
    _singular("aten.sqrt", x, "its derivative is infinite")
    return func(x)


@kink_rule(aten.pow, torch.pow, Tensor.pow, Tensor.__pow__)
def pow(run, func, x, exponent):
    """x ** p with 0 < p < 1 (or non-integer p < 1): singular at 0, an error there. 0 ** p (a tensor p that
    depends on the inputs) jumps at p = 0 (1 there, 0 above, inf below): an error there. A complex power on its
    branch cut (`_cuts.power_cut`: a number, complex or tensor p; a p that moves even where it is an integer, as
    d/dp z ** p = z ** p log z jumps there): an error."""
    p = _split(exponent)[0] if isinstance(exponent, Tensor) else exponent
    moves = isinstance(exponent, Tensor) and (_is_dual(exponent) or exponent.requires_grad)
    if maybe_power_cut(_split(x)[0], p):  # (from dtypes alone: a real x ** 2 reads no mark)
        still = on_real_axis(x) or not (_is_dual(x) or x.requires_grad)  # (c ** p: entire in p, off c = 0)
        _on_cut("aten.pow", power_cut(_split(x)[0], p, moves, still))
    if isinstance(x, Tensor) and isinstance(exponent, (int, float)) and 0 < exponent < 1:
        _singular("aten.pow", x, f"x ** {exponent} has an infinite derivative")
    if moves:
        base = _split(x)[0] if isinstance(x, Tensor) else x
        if bool(((base == 0) & (_split(exponent)[0] == 0)).any()):
            raise NonsmoothError(f"aten.pow at {_user_line()} computes 0 ** p at p = 0, where it jumps (1 at 0, 0 "
                                 "above, inf below): f'(x; d) does not exist there")
    return func(*_complex_duals(x, exponent))


def rpow(run, func, x, other):
    """``other ** x`` for a Python number ``other`` (PyTorch's own: ``torch.pow(other, x)``): the pow rule,
    operands in order (a complex ``(-2 + 0j) ** y``'s tangent too); anything else PyTorch's own call."""
    if type(other) not in (int, float, complex):
        return func(x, other)
    return pow(run, torch.pow, other, x)


_ROUTES[Tensor.__rpow__] = rpow


def _complex_duals(x, p) -> tuple:
    """x, p for a complex x ** p, a real dual among them cast to the result's complex dtype: PyTorch's forward-mode
    formula takes the real operand's term through its backward's real part (``handle_r_to_c``), so the tangent of
    (-2 + 0j) ** y or y ** (0.5 + 0.3j) lost its imaginary part. The kernel computes in that dtype anyway: the
    same values."""
    if not (_complex(x) or _complex(p)):
        return x, p
    if not any(isinstance(a, Tensor) and not a.is_complex() and _is_dual(a) for a in (x, p)):
        return x, p
    dtype = torch.result_type(x, p)
    return tuple(a.to(dtype) if isinstance(a, Tensor) and not a.is_complex() else a for a in (x, p))


@kink_rule(aten.linalg_vector_norm, torch.linalg.vector_norm)
def vector_norm(run, func, x, ord=2, dim=None, keepdim=False, *, dtype=None):
    """p-norm (p >= 1). At a zero slice: f'(x; d) = ||x'||, locked to the linear piece <u, x> where u is the
    norm's gradient at x' (a unit dual vector, the gradient at x + t d). Ord 1 and inf use the abs / amax rules."""
    ord = float(ord)
    dims = tuple(range(x.dim())) if dim is None else ((dim,) if isinstance(dim, int) else tuple(dim))
    if ord == 1 or math.isinf(ord):
        a = abs(run, torch.abs, x)
        if ord == 1:
            return a.sum(dim=dims, keepdim=keepdim)
        return _reduce_select(run, "aten.linalg_vector_norm", a, dims, keepdim, ord > 0)[0]
    if 0 < ord < 1:
        return _quasi_norm(run, x, ord, dims, keepdim)
    if ord <= 0:
        _zero_entries(x, ord)
    out = torch.linalg.vector_norm(x, ord, dim, keepdim)
    zero = _split(out)[0] == 0
    if ord < 1 or not zero.any():
        return out
    xp, xt = _split(x)
    # a norm of 0 is the kink only where every entry is 0: nonzero entries whose squares underflow (1e-25 in
    # float32) are a smooth point, whose gradient is that of x scaled up (the p-norm's gradient is scale-free)
    m = xp.detach().abs().amax(dim=dims, keepdim=True) if xp.numel() else xp.detach()
    under = m > 0
    with torch.enable_grad():
        t = torch.where(under, xp.detach() / torch.where(under, m, 1), torch.zeros_like(xp) if xt is None else xt)
        t = t.detach().requires_grad_(True)
        (u,) = torch.autograd.grad(torch.linalg.vector_norm(t, ord, dims, True).sum(), t)
    u = u.nan_to_num()
    at0 = zero & ~(under if keepdim else under.reshape(zero.shape)) if xp.numel() else zero
    if at0.any():
        run.kinks.append(Kink("aten.linalg_vector_norm", _user_line(), "select",
                              torch.ones(int(at0.sum()), 1, dtype=torch.bool), continuum=True, ball=ord == 2))
    # <u, x> - <u, x's value>: the value stays PyTorch's 0, the tangent is <u, x'>
    return torch.where(zero, (u * x).sum(dim=dims, keepdim=keepdim) - (u * xp.detach()).sum(dim=dims, keepdim=keepdim),
                       out)


def _quasi_norm(run, x: Tensor, ord: float, dims: tuple[int, ...], keepdim: bool) -> Tensor:
    """The p-norm with 0 < p < 1. Where a slice is entirely 0: value 0 and tangent ||x'||_p, f'(x; d) exactly (the
    quasi-norm is continuous and positively homogeneous: ||t x' + o(t)||_p / t -> ||x'||_p), but no Clarke gradient
    (the slope of |x_i|^p is unbounded near 0, f is not Lipschitz there): a reverse pass that reaches such a slice
    raises, with any incoming gradient (||x||_p ** 2 gives it 0 at 0, and is still not Lipschitz near 0). Where
    some entries of a slice are 0 and others not, the slope in those entries is infinite along a direction that
    moves them (and one whose tangent there is 0 may move them at second order): an error.
    Elsewhere PyTorch's value and derivatives. A zero slice is recorded as a kink, as the norm's at 0: a tie
    downstream (max(q, sum(x)) at 0) is then ranked by a pass that carries this tangent, not by a lazy pass whose
    tangent of q would read 0."""
    xp, xt = _split(x)
    zeros = xp.detach() == 0
    whole, some = zeros.all(dim=dims, keepdim=True), zeros.any(dim=dims, keepdim=True)
    line = _user_line()
    if mask_any(some & ~whole):
        n = int((zeros & ~whole).sum())
        raise NonsmoothError(f"linalg.vector_norm at {line} with ord {ord} < 1 is evaluated where {n} "
                             f"entr{'y is' if n == 1 else 'ies are'} 0 and others of the slice are not: its slope in "
                             f"such an entry (|x_i|^{ord}) is infinite, so f'(x; d) is infinite along a direction that "
                             "moves it, and f has no generalized gradient. Keep the entries away from 0 (or use ord "
                             ">= 1)")
    if not mask_any(whole):
        return torch.linalg.vector_norm(x, ord, dims, keepdim)
    out = torch.linalg.vector_norm(torch.where(whole, 1.0, x), ord, dims, keepdim)  # (no NaN from 0 ** (p - 1))
    at0 = whole if keepdim else whole.reshape(out.shape)
    run.kinks.append(Kink("aten.linalg_vector_norm", line, "select", torch.ones(int(at0.sum()), 1, dtype=torch.bool),
                          continuum=True))
    zero = torch.zeros_like(_split(out)[0])
    if xt is not None:  # (a plain tensor: the tangent's own norm, without autograd)
        with torch.no_grad():
            zero = fwAD.make_dual(zero, torch.linalg.vector_norm(xt.detach(), ord, dims, keepdim))
    out = torch.where(at0, zero, out)
    if out.requires_grad:
        def refuse(g: Tensor) -> None:
            # a 0 reaching the slice refuses too: ||x||_p ** 2 has slope 2 q grad(q) near 0, unbounded along the
            # axes at every scale (q's gradient blows up where an entry is 0), although its incoming 0 at 0 hid it
            if mask_any(at0):
                raise NonsmoothError(f"linalg.vector_norm at {line} with ord {ord} < 1 is evaluated at a slice "
                                     "that is 0: its one-sided derivative there is ||d||_p (gw.directional_derivative"
                                     f"), but the slope of |x_i|^{ord} is unbounded near 0, so f is not Lipschitz "
                                     "there and has no generalized gradient. Use ord >= 1, or keep the slice away "
                                     "from 0")

        out.register_hook(refuse)
    return out


def _zero_entries(x: Tensor, ord: float) -> None:
    """ord 0 counts the nonzero entries: a jump where an entry is 0 and moves. A negative ord is, near a zero
    entry, min-like (|x_i| for one, a non-polyhedral cone for several): no rule, an error there. Elsewhere
    PyTorch's derivative is exact."""
    xp, xt = _split(x)
    at0 = xp == 0
    if xt is not None:  # (a zero entry that the direction does not move stays 0: no kink along it)
        at0 = at0 & (xt != 0)
    if at0.any():
        what = ("counts the nonzero entries and jumps where one leaves 0: there is no one-sided derivative"
                if ord == 0 else f"with ord {ord} < 0 behaves like min |x_i| there, a kink without a rule")
        raise NonsmoothError(f"linalg.vector_norm at {_user_line()} is evaluated at 0 for {int(at0.sum())} "
                             f"entr{'y' if int(at0.sum()) == 1 else 'ies'}, where it {what}. Use ord=-inf "
                             "(min |x_i|, which has a rule) or keep the entries away from 0.")


@kink_rule(aten.norm, torch.norm, Tensor.norm, torch.linalg.norm)
def norm(run, func, x, p=None, dim=None, keepdim=False, *args, **kwargs):
    """torch.norm / Tensor.norm / linalg.norm: vector p-norms and the Frobenius norm (the 2-norm of the entries
    over ``dim``, all by default) go to the vector_norm rule. Matrix norms (linalg.norm with a numeric or 'nuc'
    ord over two dims: singular values, maximal column sums) have no rule: an error."""
    p = kwargs.pop("ord", p)
    if p in (None, "fro"):
        return vector_norm(run, func, x, 2, dim, keepdim)
    vector = isinstance(dim, int) or x.dim() <= 1 or (not isinstance(p, str) and func is not torch.linalg.norm)
    if not vector:
        return matrix_norm(run, torch.linalg.matrix_norm, x, p, (-2, -1) if dim is None else dim, keepdim)
    return vector_norm(run, func, x, p, dim, keepdim)


@kink_rule(aten.linalg_matrix_norm, torch.linalg.matrix_norm)
def matrix_norm(run, func, x, ord="fro", dim=(-2, -1), keepdim=False, *, dtype=None):
    """Matrix norms as ATen computes them: Frobenius through the vector_norm rule; 2, -2 and 'nuc' (largest,
    smallest, sum of the singular values) through the svdvals rule; 1, -1, inf, -inf (largest or smallest 1-norm
    of the columns or rows) through the vector_norm (abs) and amax/amin rules."""
    if dtype is not None:
        x = x.to(dtype)
    d0, d1 = (d % x.dim() for d in dim)
    if ord in ("fro", None):
        return vector_norm(run, torch.linalg.vector_norm, x, 2, (d0, d1), keepdim)
    if ord in (2, -2, "nuc"):
        s = svdvals(run, torch.linalg.svdvals, x.movedim((d0, d1), (-2, -1)), summed=ord == "nuc")
        out = s.sum(-1) if ord == "nuc" else s[..., 0] if ord == 2 else s[..., -1]  # s is descending
        return out.unsqueeze(-1).unsqueeze(-1).movedim((-2, -1), (d0, d1)) if keepdim else out
    if ord not in (1, -1, math.inf, -math.inf):
        raise ValueError(f"linalg.matrix_norm: Order {ord} not supported.")
    if math.isinf(ord):  # rows: the 1-norm over the columns' dim
        d0, d1 = d1, d0
    if d0 < d1 and not keepdim:
        d1 -= 1
    sums = vector_norm(run, torch.linalg.vector_norm, x, 1, d0, keepdim)
    return _reduce_select(run, "aten.linalg_matrix_norm", sums, (d1,), keepdim, ord > 0)[0]


def _coincident_norms(run, op: str, out: Tensor, diffs: Callable, p: float, same: Tensor) -> Tensor:
    """``out`` with the entries at coincident points (``same``) recomputed by the norm rule on their differences."""
    if not mask_any(same):
        return out
    where = same.nonzero(as_tuple=True)
    values = vector_norm(run, torch.linalg.vector_norm, diffs(where), p, -1)
    return out.index_put(where, values)


def _smooth_distances(run, diff: Tensor, p: float, native: Callable, *xs) -> Tensor | None:
    """cdist / pdist where every pair's distance is smooth: PyTorch's own value and graph (its gradient, bit for
    bit), made dual with the tangent of the pairs' differences δ (PyTorch has no forward-mode cdist / pdist).
    Smooth: for 1 < p < inf where δ != 0, the tangent sum(|δ|^(p-1) sign(δ) δ') / ||δ||_p^(p-1); for p = 1 (and
    p < 1, singular there) where no coordinate of δ is 0, sum(sign(δ) δ') (and the p < 1 formula); for p = inf
    where one coordinate is the largest in size, its sign(δ_k) δ_k'. None elsewhere (a kink): the norm rule then.
    The denominators are the norms of δ, not PyTorch's values: with more than 25 rows cdist computes
    sqrt(|a|² + |b|² - 2ab), 0 or off by 2x for points 1e-8 apart; δ is scaled by its largest entry first
    (|δ|^(p-1) of a tiny δ underflows)."""
    if diff.shape[-1] == 0:  # no coordinate: every distance is 0 whatever the points (no kink), tangent 0
        out = native(*(_split(x)[0] for x in xs))
        return fwAD.make_dual(out, torch.zeros_like(out)) if _is_dual(diff) else out
    if (p <= 1 or p == math.inf) and (run.tie_tol > 0 or run.near_tol is not None):
        return None  # (ties within tie_tol, near-kinks: the abs / amax rules see each coordinate)
    dp, dt = _split(diff)
    d = dp.detach()
    size = d.abs()
    top = size.amax(-1, keepdim=True)
    if p == math.inf:
        lead = size == top
        smooth = (lead.sum(-1) == 1) & (top.squeeze(-1) > 0)
    else:
        smooth = (d != 0).all(-1) if p <= 1 else (d != 0).any(-1)
    if not mask_all(smooth):
        return None
    out = native(*(_split(x)[0] for x in xs))
    if dt is None:
        return out
    with torch.no_grad():
        if p == math.inf:
            tangent = (d.sign() * dt * lead).sum(-1)
        elif p == 1:
            tangent = (d.sign() * dt).sum(-1)
        else:
            u = d / top
            tangent = (u.abs().pow(p - 1) * u.sign() * dt).sum(-1) / torch.linalg.vector_norm(u, p, -1).pow(p - 1)
    return fwAD.make_dual(out, tangent.reshape(out.shape))


@kink_rule(aten.cdist, torch.cdist)
def cdist(run, func, x1, x2, p=2.0, compute_mode="use_mm_for_euclid_dist_if_necessary"):
    """p-norm distance of every row pair: the vector_norm rule on x1_i - x2_j. At coincident points (found exactly:
    ``cdist(p=0)``) f'(x; d) = ||d1_i - d2_j||_p, locked to a linear piece (a unit dual vector); p = 1 and inf
    also have kinks where coordinates tie (the abs / amax rules); 0 < p < 1 is singular at coincident points and
    p = 0 (a count) jumps where coordinates are equal: errors."""
    if p == 0:  # counts differing coordinates: constant, but it jumps where some coordinate of a pair is equal
        a, b = _split(x1)[0].detach(), _split(x2)[0].detach()
        if mask_any(a.unsqueeze(-2) - b.unsqueeze(-3) == 0):
            raise NonsmoothError(f"aten.cdist at {_user_line()} with p=0 counts differing coordinates: where two "
                                 "are equal it jumps, no one-sided derivative")
        return func(a, b, p, compute_mode)
    if _is_dual(x1) or _is_dual(x2) or not 1 < p < math.inf:
        # PyTorch has no forward-mode cdist; p = 1 / inf have kinks at equal coordinates, not only at coincident
        # points: PyTorch's op where no pair is at a kink, else every pair through the norm rule
        diff = x1.unsqueeze(-2) - x2.unsqueeze(-3)
        smooth = _smooth_distances(run, diff, p, lambda a, b: func(a, b, p, compute_mode), x1, x2)
        return smooth if smooth is not None else vector_norm(run, torch.linalg.vector_norm, diff, p, -1)
    out = func(x1, x2, p, compute_mode)
    with torch.no_grad():
        same = torch.cdist(_split(x1)[0].detach(), _split(x2)[0].detach(), 0.0) == 0
    if not mask_any(same):
        return out
    shape = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
    a = x1.expand(*shape, *x1.shape[-2:]).reshape(-1, *x1.shape[-2:])
    b = x2.expand(*shape, *x2.shape[-2:]).reshape(-1, *x2.shape[-2:])
    flat = _coincident_norms(run, "aten.cdist", out.reshape(-1, *out.shape[-2:]),
                             lambda w: a[w[0], w[1]] - b[w[0], w[2]], p, same.reshape(-1, *same.shape[-2:]))
    return flat.reshape(out.shape)


@kink_rule(aten._pdist_forward, F.pdist, torch.pdist)
def pdist(run, func, x, p=2.0):
    """p-norm distance of every row pair i < j, the cdist rule at coincident rows."""
    i, j = torch.triu_indices(x.shape[0], x.shape[0], 1, device=x.device)
    if p == 0:  # counts differing coordinates: it jumps where some coordinate of a pair is equal
        xp = _split(x)[0].detach()
        if mask_any(xp[i] - xp[j] == 0):
            raise NonsmoothError(f"aten.pdist at {_user_line()} with p=0 counts differing coordinates: where two are "
                                 "equal it jumps, no one-sided derivative")
        return func(xp, p)
    if _is_dual(x) or not 1 < p < math.inf:  # as cdist
        smooth = _smooth_distances(run, x[i] - x[j], p, lambda a: func(a, p), x)
        return smooth if smooth is not None else vector_norm(run, torch.linalg.vector_norm, x[i] - x[j], p, -1)
    out = func(x, p)
    with torch.no_grad():
        same = F.pdist(_split(x)[0].detach(), 0.0) == 0
    return _coincident_norms(run, "aten.pdist", out, lambda w: x[i[w[0]]] - x[j[w[0]]], p, same)


# PyTorch has no forward-mode cdist / pdist: a ranked pass runs their rules (tangents through the norm rule) even
# where the probe saw no tie, instead of PyTorch's own op (which raises NotImplementedError on a dual tensor)
cdist.no_pytorch_jvp = pdist.no_pytorch_jvp = True


@kink_rule(aten.argmax, torch.argmax, Tensor.argmax)
def argmax(run, func, x, dim=None, keepdim=False):
    """The index the max rule locks: among tied largest elements, the one largest along the direction."""
    return _reduce_select(run, "aten.argmax", x, None if dim is None else (dim,), keepdim and dim is not None,
                          True)[1]


@kink_rule(aten.argmin, torch.argmin, Tensor.argmin)
def argmin(run, func, x, dim=None, keepdim=False):
    """The index the min rule locks: among tied smallest elements, the one smallest along the direction."""
    return _reduce_select(run, "aten.argmin", x, None if dim is None else (dim,), keepdim and dim is not None,
                          False)[1]


@kink_rule(aten.argsort, torch.argsort, Tensor.argsort)
def argsort(run, func, x, dim=-1, descending=False, stable=False):
    """The permutation of the sort rule: tied values ordered by their tangents (then further directions)."""
    return sort(run, torch.sort, x, dim, descending).indices


@kink_rule(aten.aminmax, torch.aminmax, Tensor.aminmax)
def aminmax(run, func, x, *, dim=None, keepdim=False):
    """(min, max) by the amin and amax rules."""
    dims = () if dim is None else (dim,)
    lo = _reduce_select(run, "aten.aminmax", x, dims, keepdim, False)[0]
    hi = _reduce_select(run, "aten.aminmax", x, dims, keepdim, True)[0]
    return torch.return_types.aminmax((lo, hi))


def _norm_where_zero(run, out: Tensor, x: Tensor, p, dim, keepdim: bool, scale: float = 1.0) -> Tensor:
    """PyTorch's ``out`` where no norm is 0; else the vector_norm rule on ``x`` (divided by ``scale``)."""
    if not mask_any(_split(out)[0] == 0):
        return out
    return vector_norm(run, torch.linalg.vector_norm, x, p, dim, keepdim) / scale


@kink_rule(aten.dist, torch.dist, Tensor.dist)
def dist(run, func, a, b, p=2):
    """||a - b||_p: the vector_norm rule where a == b (f'(x; d) = ||a' - b'||_p); p = 1 and inf have kinks at
    single equal coordinates too (abs, amax): always the vector_norm rule."""
    if not 1 < float(p) < math.inf:
        return vector_norm(run, torch.linalg.vector_norm, a - b, p)
    return _norm_where_zero(run, func(a, b, p), a - b, p, None, False)


@kink_rule(aten.pairwise_distance, F.pairwise_distance, torch.pairwise_distance)
def pairwise_distance(run, func, x1, x2, p=2.0, eps=1e-6, keepdim=False):
    """||x1 - x2 + eps||_p over the last dim (PyTorch's definition): the vector_norm rule where it is 0, and
    always for p = 1 and inf (kinks at single coordinates)."""
    if not 1 < float(p) < math.inf:
        return vector_norm(run, torch.linalg.vector_norm, x1 - x2 + eps, p, -1, keepdim)
    return _norm_where_zero(run, func(x1, x2, p, eps, keepdim), x1 - x2 + eps, p, -1, keepdim)


@kink_rule(aten.msort, torch.msort, Tensor.msort)
def msort(run, func, x):
    """sort along dim 0: the sort rule."""
    return sort(run, torch.sort, x, 0).values


@kink_rule(aten.hypot, torch.hypot, Tensor.hypot)
def hypot(run, func, a, b):
    """sqrt(a^2 + b^2) elementwise: the 2-norm of the pair, by the vector_norm rule where both are 0."""
    return _norm_where_zero(run, func(a, b), torch.stack(torch.broadcast_tensors(a, b), -1), 2, -1, False)


@kink_rule(aten.std, torch.std, Tensor.std)
def std(run, func, x, dim=None, unbiased=None, keepdim=False, *, correction=None):
    """sqrt(sum((x - mean)^2) / (N - correction)): a norm of the centred x, singular where x is constant along
    ``dim``; there the vector_norm rule gives f'(x; d) = std(d)."""
    if isinstance(dim, bool):  # std(x, unbiased)
        dim, unbiased = None, dim
    out = func(x, dim, correction=correction, keepdim=keepdim) if unbiased is None else \
        func(x, dim, unbiased, keepdim)
    dims = tuple(range(x.dim())) if dim is None else ((dim,) if isinstance(dim, int) else tuple(dim))
    c = correction if correction is not None else (0 if unbiased is False else 1)
    n = math.prod(x.shape[d] for d in dims)
    if n - c <= 0:
        return out
    return _norm_where_zero(run, out, x - x.mean(dims, keepdim=True), 2, dims, keepdim, math.sqrt(n - c))


@kink_rule(aten.std_mean, torch.std_mean)
def std_mean(run, func, x, dim=None, unbiased=None, keepdim=False, *, correction=None):
    """(std, mean): the std rule and PyTorch's mean."""
    if isinstance(dim, bool):
        dim, unbiased = None, dim
    return std(run, torch.std, x, dim, unbiased, keepdim, correction=correction), x.mean(dim, keepdim=keepdim)


_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


def _elu(run, func, x, alpha: float, scale: float, native: Callable, inplace: bool):
    if alpha == 1.0:  # C1: both pieces have slope `scale` at 0
        return native()
    out = _switch(run, "aten.elu", x, scale * x, (scale * alpha) * torch.expm1(x), native, inplace=inplace)
    return _finish(func, x, out, inplace)


@kink_rule(aten.elu, F.elu, F.elu_)
def elu(run, func, x, alpha=1.0, inplace=False):
    """x for x > 0, alpha (e^x - 1) for x < 0: slopes 1 and alpha at 0, a kink unless alpha = 1."""
    inplace = inplace or func is F.elu_
    return _elu(run, func, x, alpha, 1.0, lambda: func(x, alpha, inplace) if func is F.elu else func(x, alpha),
                inplace)


@kink_rule(aten.selu, F.selu, F.selu_, torch.selu, torch.selu_)
def selu(run, func, x, inplace=False):
    """scale * elu(x, alpha) with SELU's constants: slopes scale and scale * alpha at 0."""
    inplace = inplace or func in (F.selu_, torch.selu_)
    return _elu(run, func, x, _SELU_ALPHA, _SELU_SCALE, lambda: func(x, inplace) if func is F.selu else func(x),
                inplace)


@kink_rule(aten.rrelu, F.rrelu, F.rrelu_, torch.rrelu)
def rrelu(run, func, x, lower=1.0 / 8, upper=1.0 / 3, training=False, inplace=False):
    """In eval mode leaky_relu with slope (lower + upper) / 2. In training the slopes are random: no rule."""
    if training:
        if mask_any(_split(x)[0] == 0):
            raise NonsmoothError(f"aten.rrelu at {_user_line()} in training mode draws a random slope for x < 0: "
                                 "at x = 0 it has no rule; use eval mode (its mean slope) or leaky_relu")
        return func(x, lower, upper, training, inplace)
    out = leaky_relu(run, F.leaky_relu, x, (lower + upper) / 2, False)
    return _finish(func, x, out, inplace or func is F.rrelu_)


@kink_rule(aten.smooth_l1_loss, F.smooth_l1_loss)
def smooth_l1_loss(run, func, input, target, size_average=None, reduce=None, reduction="mean", beta=1.0):
    """Quadratic within beta of the target, so C1 for beta > 0; with beta = 0 it is l1_loss, with its rule."""
    if beta == 0:
        return l1_loss(run, F.l1_loss, input, target, size_average, reduce, reduction)
    return func(input, target, size_average, reduce, reduction, beta)


@kink_rule(aten.triplet_margin_loss, F.triplet_margin_loss, torch.triplet_margin_loss)
def triplet_margin_loss(run, func, anchor, positive, negative, margin=1.0, p=2, eps=1e-6, swap=False,
                        size_average=None, reduce=None, reduction="mean"):
    """max(d(a, p) - d(a, n) + margin, 0), d(u, v) = ||u - v + eps||_p (with ``swap``: min of d(a, n), d(p, n)):
    the hinge rule at the margin, the minimum rule for swap, the norm rule where u - v + eps is 0."""
    dist = lambda u, v: vector_norm(run, torch.linalg.vector_norm, u - v + eps, p, -1)
    d_an = dist(anchor, negative)
    if swap:
        d_an = _pair(run, "aten.triplet_margin_loss", d_an, dist(positive, negative), False,
                     lambda: torch.minimum(d_an, dist(positive, negative)))
    loss = _hinge(run, "aten.triplet_margin_loss", dist(anchor, positive) - d_an + margin)
    return _reduce(loss, reduction, size_average, reduce)


# --- eigenvalues ---------------------------------------------------------------------------------------------


class _PieceLock(torch.autograd.Function):
    """Eigen- or singular values ``values`` (PyTorch's, kept bit for bit) locked to the unit pairs (u_i, v_i), the
    columns of ``left`` and ``right`` (the same vectors for eigenvalues): A' -> u_iᵀ A' v_i forward,
    g -> Σ g_i u_i v_iᵀ in reverse (the gradient of the piece u_iᵀ A v_i)."""

    @staticmethod
    def forward(ctx, a: Tensor, values: Tensor, left: Tensor, right: Tensor) -> Tensor:
        ctx.save_for_backward(left, right)
        ctx.save_for_forward(left, right)
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        left, right = ctx.saved_tensors
        return (left * grad.unsqueeze(-2)) @ right.mT, None, None, None

    @staticmethod
    def jvp(ctx, a_t: Tensor, values_t, left_t, right_t) -> Tensor:
        left, right = ctx.saved_tensors
        return (left.mT @ a_t @ right).diagonal(dim1=-2, dim2=-1)


def _rounding_tie(run, op: str, gap: Tensor, scale: Tensor, n: int, kind: str) -> None:
    """Refuse where two computed eigen/singular values differ by less than LAPACK's rounding (gap > tie_tol but
    <= 4 n eps max|value|, per matrix): LAPACK's values are exact for a matrix within n eps |A| of the input, so
    such a gap cannot tell an exact tie of the input's values (a scaled rotation [[3, 2], [-2, 3]]: singular
    values sqrt(13) 1 ulp apart; ones(3, 3): eigenvalues -3e-16 and 0) from distinct ones, and the two answers
    differ (the distinct pieces' gradient where the tie's cluster rule holds: -1.74 for 0.18). Exact ties are
    the cluster rule's; stationarity(tie_tol=...) treats such gaps as ties."""
    bound = 4 * n * torch.finfo(gap.dtype).eps * scale.unsqueeze(-1)
    near = (gap > run.tie_tol) & (gap <= bound)
    if mask_any(near):
        raise NonsmoothError(f"{op} at {_user_line()}: {int(near.sum())} pair(s) of {kind} differ by "
                             f"{float(gap[near].min()):.3g}, within LAPACK's rounding of an exact tie (where the "
                             "one-sided derivatives differ); gradwise cannot tell which; stationarity(tie_tol=...) "
                             "treats them as tied")


def _symmetric(a: Tensor, uplo: str) -> Tensor:
    """The symmetric matrix eigvalsh reads from a's ``uplo`` triangle."""
    t = a.tril() if uplo.upper() == "L" else a.triu()
    return t + (a.tril(-1) if uplo.upper() == "L" else a.triu(1)).mT


@kink_rule(aten.linalg_eigvalsh, torch.linalg.eigvalsh)
def eigvalsh(run, func, a, UPLO="L"):
    """Eigenvalues of a symmetric matrix, ascending. At an eigenvalue repeated exactly (a cluster with basis U of
    its eigenspace), the cluster's one-sided derivatives are the eigenvalues of Uᵀ S' U, ascending; each is locked
    to v_iᵀ S v_i with v_i = U w_i (w_i those eigenvectors), so the reverse pass gives v_i v_iᵀ, a gradient of
    the cluster's pieces. A cluster holds a continuum of pieces (like a norm at 0): stationarity samples them.
    Distinct eigenvalues keep PyTorch's derivative; complex (Hermitian) input: no rule, an error at a cluster."""
    ap, at = _split(a)
    values, vecs = torch.linalg.eigh(ap.detach(), UPLO=UPLO)
    gap = (values[..., 1:] - values[..., :-1]).abs()
    run.note_near("aten.linalg_eigvalsh", gap)
    if values.shape[-1] > 1 and not ap.is_complex():
        _rounding_tie(run, "aten.linalg_eigvalsh", gap, values.abs().amax(-1), values.shape[-1], "eigenvalues")
    links = gap <= run.tie_tol
    if not mask_any(links):
        return func(a, UPLO)
    if ap.is_complex():
        raise NonsmoothError(f"aten.linalg_eigvalsh at {_user_line()}: a repeated eigenvalue of a complex "
                             "Hermitian matrix; gradwise's rule covers real symmetric matrices")
    n = values.shape[-1]
    flat_links, flat_vecs = links.reshape(-1, n - 1), vecs.reshape(-1, n, n).clone()
    st = None if at is None else _symmetric(at.detach(), UPLO).reshape(-1, n, n)
    in_cluster = torch.zeros(flat_links.shape[0], n, dtype=torch.bool, device=ap.device)
    clusters = 0
    for b in flat_links.any(-1).nonzero().flatten().tolist():  # matrices with a cluster (few)
        tied = flat_links[b].tolist()
        i = 0
        while i < n - 1:
            if not tied[i]:
                i += 1
                continue
            j = i + 1
            while j < n - 1 and tied[j]:
                j += 1
            u = flat_vecs[b, :, i : j + 1]
            if st is not None:  # the cluster's order along the direction: eigenvalues of Uᵀ S' U
                flat_vecs[b, :, i : j + 1] = u @ torch.linalg.eigh(u.mT @ st[b] @ u).eigenvectors
            in_cluster[b, i : j + 1] = True
            clusters += 1
            i = j + 1
    run.kinks.append(Kink("aten.linalg_eigvalsh", _user_line(), "select",
                          torch.ones(clusters, 1, dtype=torch.bool, device=ap.device), continuum=True))
    native = func(a, UPLO)
    vecs = flat_vecs.reshape(vecs.shape)
    locked = _PieceLock.apply(_symmetric(a, UPLO), _split(native)[0].detach(), vecs, vecs)
    return torch.where(in_cluster.reshape(values.shape), locked, native)


def _singular_groups(s: list[float], tol: float) -> list[tuple[int, int]]:
    """Index ranges [i, j) of s (descending) that sit at a kink: runs of tied values, and the run at 0."""
    groups, i, k = [], 0, len(s)
    while i < k:
        j = i + 1
        while j < k and math.fabs(s[j - 1] - s[j]) <= tol:  # (abs here is the abs rule)
            j += 1
        if j - i > 1 or s[i] <= tol:
            groups.append((i, j if s[i] > tol else k))
            if s[i] <= tol:
                break
        i = j
    return groups


@kink_rule(aten.linalg_svdvals, torch.linalg.svdvals)
def svdvals(run, func, a, *, driver=None, summed=False):
    """Singular values, descending. Where some are repeated exactly or 0 (a cluster with singular vector bases
    U, V), the cluster's one-sided derivatives are, for a value > 0, the eigenvalues of sym(Uᵀ A' V), descending;
    at 0 (U, V spanning the left and right complements), the singular values of Uᵀ A' V. Each is locked to
    u_iᵀ A v_i for the matching unit pair, so the reverse pass gives u_i v_iᵀ; a continuum of pieces (as a norm at
    0): stationarity samples. Spectral and nuclear norms go through this rule; complex input: an error there.
    Positive values tied within LAPACK's rounding: an error (``_rounding_tie``), but for the nuclear norm
    (``summed``), whose sum over a positive cluster is smooth (the trace of Uᵀ A' V in any basis)."""
    ap, at = _split(a)
    u, s, vh = torch.linalg.svd(ap.detach(), full_matrices=True)
    k = s.shape[-1]
    gap = (s[..., :-1] - s[..., 1:]).abs()
    run.note_near("aten.linalg_svdvals", torch.cat([gap, s[..., -1:]], -1))
    if k > 1 and not summed and not ap.is_complex():  # (positive values: near 0, docs "Near a kink")
        big = 4 * max(ap.shape[-2:]) * torch.finfo(s.dtype).eps * s[..., :1]
        _rounding_tie(run, "aten.linalg_svdvals", torch.where(s[..., 1:] > big, gap, 0), s[..., 0],
                      max(ap.shape[-2:]), "singular values")
    if k == 0 or not (mask_any(gap <= run.tie_tol) or mask_any(s[..., -1] <= run.tie_tol)):
        return func(a, driver=driver)
    if ap.is_complex():
        raise NonsmoothError(f"aten.linalg_svdvals at {_user_line()}: a repeated or zero singular value of a "
                             "complex matrix; gradwise's rule covers real matrices")
    m, n = ap.shape[-2:]
    fu, fs, fv = u.reshape(-1, m, m), s.reshape(-1, k), vh.mT.reshape(-1, n, n)
    left, right = fu[..., :k].clone(), fv[..., :k].clone()
    ft = None if at is None else at.detach().reshape(-1, m, n)
    kinky = torch.zeros(fs.shape, dtype=torch.bool, device=ap.device)
    clusters = 0
    for b in range(fs.shape[0]):
        for i, j in _singular_groups(fs[b].tolist(), run.tie_tol):
            if fs[b, i] > run.tie_tol:  # a repeated positive value: eigenvalues of sym(Uᵀ A' V), descending
                uc, vc = fu[b, :, i:j], fv[b, :, i:j]
                if ft is not None:
                    mt = uc.mT @ ft[b] @ vc
                    w = torch.linalg.eigh((mt + mt.mT) / 2).eigenvectors.flip(-1)
                    uc, vc = uc @ w, vc @ w
            else:  # the values at 0: singular values of Uᵀ A' V over the complements
                uc, vc = fu[b, :, i:], fv[b, :, i:]
                if ft is not None:
                    p, _, qh = torch.linalg.svd(uc.mT @ ft[b] @ vc, full_matrices=True)
                    uc, vc = uc @ p, vc @ qh.mT
                uc, vc = uc[:, : j - i], vc[:, : j - i]
            left[b, :, i:j], right[b, :, i:j] = uc, vc
            kinky[b, i:j] = True
            clusters += 1
    run.kinks.append(Kink("aten.linalg_svdvals", _user_line(), "select",
                          torch.ones(clusters, 1, dtype=torch.bool, device=ap.device), continuum=True))
    native = func(a, driver=driver)
    locked = _PieceLock.apply(a, _split(native)[0].detach(), left.reshape(*s.shape[:-1], m, k),
                               right.reshape(*s.shape[:-1], n, k))
    return torch.where(kinky.reshape(s.shape), locked, native)


@kink_rule(aten.linalg_det, torch.linalg.det, torch.det, Tensor.det)
def det(run, func, a):
    """det(A), PyTorch's value. det is smooth, with derivative tr(adj(A) A'); PyTorch's formulas (both modes:
    det times A⁻¹) give 0 wherever det(A) == 0, though adj(A) is not 0 at rank n - 1 (det at [[1, 2], [2, 4]]
    along [[1, 2], [3, 4]]: 0 for -2; a 1 x 1 [[0]]: 0 for 1). There the derivative comes from an SVD,
    adj(A) = det(U) det(V) V adj(Σ) Uᵀ with adj(Σ) = diag(∏_{j≠i} σ_j), as det + (A - A) · adj(A)ᵀ: the value
    stays the kernel's, tangent and gradient are adj(A)ᵀ's. Not a kink; real matrices (complex: PyTorch's)."""
    out = func(a)
    ap = _split(a)[0].detach()
    value = _split(out)[0].detach()
    singular = value == 0
    if not ap.is_floating_point() or not mask_any(singular):
        return out
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(ap)
        n = s.shape[-1]
        others = torch.stack([torch.cat([s[..., :i], s[..., i + 1:]], -1).prod(-1) for i in range(n)], -1)
        sign = torch.linalg.det(u) * torch.linalg.det(vh)
        adjugate = sign[..., None, None] * (vh.mT * others.unsqueeze(-2)) @ u.mT
    exact = value + ((a - ap) * adjugate.mT).sum((-2, -1))
    return exact if bool(singular.all()) else torch.where(singular, exact, out)


_BCE_EPSILON = 1e-12  # ATen's binary_cross_entropy backward: (x - y) / max(x (1 - x), EPSILON)


def _bce_terms(run, x, y, weight):
    """-w (y max(log x, -100) + (1 - y) max(log1p(-x), -100)) elementwise, as the kernel takes the logs; where
    they are -inf (x = 0, 1) the clamp holds them at -100 with derivative 0, and the wheres keep that infinite
    slope off the tangents and the graph. The clamp rule at -100."""
    xp = _split(x)[0].detach()
    inf = torch.full_like(xp, -math.inf)
    logs = (torch.where(xp > 0, torch.log(torch.where(xp > 0, x, torch.ones_like(xp))), inf),
            torch.where(xp < 1, torch.log1p(-torch.where(xp < 1, x, torch.zeros_like(xp))), inf))
    y_log, n_log = (_clamp(run, v, -100.0, None, lambda v=v: torch.clamp(v, min=-100.0)) for v in logs)
    loss = -(y * y_log + (1 - y) * n_log)
    return loss if weight is None else loss * _split(weight)[0].detach()


def _moving(x: Tensor, tangent: bool, graph: Tensor | None) -> Tensor:
    """x's primal, with its tangent (``tangent``) and with its graph where ``graph`` (a mask; None: nowhere)."""
    p, t = _split(x)
    p = p.detach() if graph is None else torch.where(graph, p, p.detach())
    return fwAD.make_dual(p, t) if tangent and t is not None else p


@kink_rule(aten.binary_cross_entropy, F.binary_cross_entropy)
def binary_cross_entropy(run, func, input, target, weight=None, size_average=None, reduce=None, reduction="mean"):
    """-w (y max(log x, -100) + (1 - y) max(log1p(-x), -100)), the kernel's value. PyTorch's derivative in x,
    (x - y) / max(x (1 - x), 1e-12), is that of the formula only where x (1 - x) >= 1e-12: nearer 0 or 1 it is
    off by orders of magnitude (x = 1e-20, y = 1: -1e12 for -1e20; below e^-100, where the log is clamped and f
    constant: -1e12 for 0), and its forward mode is NaN as soon as one element is 0 or 1. There the gradient in
    x is the formula's (the clamp rule at -100; PyTorch's elsewhere, bit for bit, and in the target), and every
    tangent the formula's."""
    return _bce(run, lambda x, y: func(x, y, weight, size_average, reduce, reduction), input, target, weight,
                lambda loss, out: _reduce(loss, reduction, size_average, reduce))


def binary_cross_entropy_enum(run, func, input, target, weight=None, reduction=None):
    """aten.binary_cross_entropy(self, target, weight, reduction) called directly (torch.ops.aten, an exported
    graph) or torch._C._nn.binary_cross_entropy (F's kernel): the rule above, with the aten schema's reduction
    enum. Where the call passes none, the callable's own default, read from the kernel's output (a tensor shaped
    like the loss: none, as torch._C._nn's binding does; else the mean, the schema's)."""
    kernel = (lambda x, y: func(x, y, weight)) if reduction is None else lambda x, y: func(x, y, weight, reduction)
    return _bce(run, kernel, input, target, weight, lambda loss, out: _reduce(
        loss, "mean", reduction if reduction is not None else 0 if out.shape == loss.shape else 1))


def _bce(run, kernel, input, target, weight, reduced):
    """binary_cross_entropy's rule for ``kernel(x, y)`` (PyTorch's loss with its arguments bound) and ``reduced(loss,
    out)`` (its reduction of elementwise terms, given the kernel's output)."""
    xp = _split(input)[0].detach()
    if not xp.is_floating_point():
        return kernel(input, target)
    off = xp * (1 - xp) < _BCE_EPSILON
    duals = _is_dual(input) or _is_dual(target)
    if not mask_any(off) and not duals:
        return kernel(input, target)
    # the kernel's value and its graph, but in x only where PyTorch's derivative is right
    out = kernel(_moving(input, False, ~off), _moving(target, False, torch.ones_like(off)))
    if mask_any(off):  # the formula's gradient in x at those elements (no tangent)
        loss = _bce_terms(run, _moving(input, False, off), _split(target)[0].detach(), weight)
        out = out + reduced(torch.where(off, loss - loss.detach(), torch.zeros_like(xp)), out)
    if duals:  # every tangent from the formula (no graph)
        loss = _bce_terms(run, _moving(input, True, None), _moving(target, True, None), weight)
        out = out + reduced(loss - _split(loss)[0].detach(), out)
    return out
