"""Directional derivatives and generalized gradients, checked against independent float64 references."""
from __future__ import annotations

import copy
import itertools
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

import gradwise as gw
from gradwise._nonsmooth import KINK_RULES, NonsmoothError
from gradwise._nonsmooth._ports import PORTS

sys.path.insert(0, str(Path(__file__).parent))
import case_files
from nonsmooth_cases import CASES

H = 1e-7
pytestmark = pytest.mark.filterwarnings(r"ignore:index_reduce\(\) is in beta:UserWarning")


def call(f, xs):
    return f(*xs)


def one_sided(f, xs, ds, h=H):
    """Forward difference (f(x + h d) - f(x)) / h in float64: the reference for f'(x; d)."""
    with torch.no_grad():
        return float((call(f, [x + h * d for x, d in zip(xs, ds, strict=True)]) - call(f, xs)) / h)


def nearby_gradients(f, xs, n=200, radius=1e-6, seed=0):
    """Gradients at random differentiable points next to x: their limits generate the subdifferential."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ys = [(x + radius * torch.randn(x.shape, generator=gen, dtype=x.dtype)).requires_grad_(True) for x in xs]
        out.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(call(f, ys), ys)]))
    return np.unique(torch.stack(out).numpy().round(7), axis=0)  # the distinct pieces (keeps SLSQP small)


def hull_distance(p: np.ndarray, vertices: np.ndarray) -> float:
    """Distance from p to conv(vertices) by SLSQP on the simplex (independent of gradwise's NNLS)."""
    k = len(vertices)
    obj = lambda lam: float(np.sum((lam @ vertices - p) ** 2))
    res = minimize(obj, np.full(k, 1 / k), jac=lambda lam: 2 * vertices @ (lam @ vertices - p), method="SLSQP",
                   bounds=[(0, 1)] * k, constraints=[{"type": "eq", "fun": lambda lam: lam.sum() - 1}],
                   options={"ftol": 1e-14, "maxiter": 500})
    return math.sqrt(max(res.fun, 0.0))


def flat(ts) -> np.ndarray:
    return torch.cat([x.detach().reshape(-1) for x in ts]).numpy()


# --- literature cases ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_directional_derivative_matches_one_sided_differences(case):
    xs = case.point()
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        ds = [torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in xs]
        got = float(gw.directional_derivative(case.f, xs, tuple(ds)))
        assert got == pytest.approx(one_sided(case.f, xs, ds), abs=2e-5, rel=1e-4)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_generalized_grad_is_a_limit_of_nearby_gradients(case):
    xs = case.point()
    near = nearby_gradients(case.f, xs, n=400 if case.continuum else 200)
    for seed in range(3):
        g = flat(gw.generalized_grad(case.f, xs, seed=seed))
        if case.continuum:  # a round subdifferential: g must be (close to) one of the nearby gradients
            assert np.linalg.norm(near - g, axis=1).min() < 0.1
        else:
            assert hull_distance(g, near) < 1e-4, f"seed {seed}: {g} outside the hull of nearby gradients"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_exact_subdifferential_matches_nearby_gradients(case):
    xs = case.point()
    near = nearby_gradients(case.f, xs, n=400 if case.continuum else 200)
    sd = gw.subdifferential(case.f, xs)
    elements = np.stack([flat(e) for e in sd.elements])
    tol = 1e-1 if case.continuum else 1e-4
    for e in elements:  # every piece found is active next to x
        assert np.linalg.norm(near - e, axis=1).min() < tol
    if sd.exact:  # and nothing active next to x is missing
        for g in near:
            assert hull_distance(g, elements) < 1e-4
    cert = gw.stationarity(case.f, xs)
    truth = hull_distance(np.zeros(elements.shape[1]), near[:: 8 if case.continuum else 1])
    assert cert.min_norm >= truth - 1e-4
    if cert.stationary is not None:
        assert cert.stationary == (truth <= 1e-4)


# --- the shared acceptance cases ------------------------------------------------------------------------------


def _shared_cases():
    """tests/cases/nonsmooth.py checked by tests/cases/check_nonsmooth.py (../shared/cases's too where it differs)."""
    out = []
    for origin, path in case_files.sources("nonsmooth.py"):
        checker = case_files.load(path.parent / "check_nonsmooth.py", f"nonsmooth_{origin}")
        out += [pytest.param((checker, c), id=c.name if origin == "project" else f"shared-{c.name}")
                for c in checker.load_cases(path)]
    return out


@pytest.mark.parametrize("entry", _shared_cases())
def test_shared_nonsmooth_cases(entry):
    module, case = entry
    assert module.check_case(gw, case) == []


# --- every rule over its samples, kinks and NaN/Inf included ---------------------------------------------

_X = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 3.0, 6.0], dtype=torch.float64)
_INTERPOLATIONS = ("linear", "lower", "higher", "nearest", "midpoint")


_BCE_Y = torch.tensor([1.0, 0.5, 0.0, 1.0, 0.25, 1.0, 0.0], dtype=torch.float64)


def _bce_p(x):
    return 1e-14 * torch.sigmoid(x).nan_to_num(0.5)  # (NaN: the NaN/Inf test puts one in)


def _tied_matrix(x):
    """5x5 from _X: diagonal |x0|, x5, x3 + 0.5, x4, x2 (3, 3, 1, 1, 0 at _X), x3 - 0.5 (0 at _X) coupling
    neighbouring rows (x1 and x6 stay out: the NaN/Inf test puts them there, and an SVD refuses them)."""
    return torch.diag(torch.stack([x[0].abs(), x[5], x[3] + 0.5, x[4], x[2]])) \
        + (x[3] - 0.5) * torch.eye(5, dtype=x.dtype).roll(1, 0)
_KNOTS, _KNOT_VALUES = torch.tensor([-1.0, 0.0, 1.0, 3.0]), torch.tensor([0.0, 2.0, 1.0, 3.0])
_GRID_IMAGE = torch.tensor([[[[0.0, 1.0, 4.0, 2.0, 3.0], [2.0, 5.0, 3.0, 1.0, 0.0], [1.0, 0.0, 2.0, 2.0, 1.0]]]])


def _interp_knots(x, index):
    i = (index - 1).clamp(0, 2)
    k, v = _KNOTS.to(x), _KNOT_VALUES.to(x)
    return torch.lerp(v[i], v[i + 1], (x - k[i]) / (k[i + 1] - k[i]))


RULE_SAMPLES = {
    "relu": (torch.relu, [_X]),
    "abs": (torch.abs, [_X]),
    "maximum": (torch.maximum, [_X, torch.tensor([0.0, -1.0, 0.0, 1.0, 1.0, 2.0, 6.0], dtype=torch.float64)]),
    "minimum": (torch.minimum, [_X, torch.tensor([0.0, -1.0, 0.0, 1.0, 1.0, 2.0, 6.0], dtype=torch.float64)]),
    "max": (lambda x: torch.max(x.reshape(1, -1).expand(2, -1) * torch.tensor([[1.0], [0.0]], dtype=x.dtype)),
            [_X.abs()]),
    "min": (lambda x: torch.min(x.reshape(-1, 1).abs(), dim=1).values, [_X]),
    "amax": (lambda x: x.reshape(1, -1).abs().amax(dim=1), [_X]),
    "amin": (lambda x: torch.stack([x.abs(), torch.ones_like(x)]).amin(dim=0), [_X]),
    "clamp": (lambda x: x.clamp(-1.0, 1.0), [_X]),
    "clamp_min": (lambda x: x.clamp_min(0.5), [_X]),
    "clamp_max": (lambda x: x.clamp_max(1.0), [_X]),
    "hardtanh": (F.hardtanh, [_X]),
    "relu6": (F.relu6, [_X]),
    "leaky_relu": (lambda x: F.leaky_relu(x, 0.2), [_X]),
    "prelu": (lambda x: F.prelu(x, torch.tensor([0.3], dtype=x.dtype)), [_X]),
    "hardsigmoid": (F.hardsigmoid, [_X]),
    "hardswish": (F.hardswish, [_X]),
    "threshold": (lambda x: F.threshold(x, 0.5, 0.5), [_X]),
    "softshrink": (lambda x: F.softshrink(x, 1.0), [_X]),
    "softplus": (lambda x: F.softplus(x, beta=0.5, threshold=2.5), [_X]),  # both pieces (its jump: its own test)
    "hardshrink": (lambda x: F.hardshrink(x, 0.7), [_X]),
    "l1_loss": (lambda x: F.l1_loss(x, torch.zeros_like(x), reduction="sum"), [_X]),
    "gt": (lambda x: torch.where(x > 1.0, x, 2 * x - 1.0), [_X]),
    "ge": (lambda x: torch.where(x >= 1.0, x, 2 * x - 1.0), [_X]),
    "lt": (lambda x: torch.where(x < 1.0, 2 * x - 1.0, x), [_X]),
    "le": (lambda x: torch.where(x <= 1.0, 2 * x - 1.0, x), [_X]),
    "max_pool1d": (lambda x: F.max_pool1d(x.reshape(1, 1, -1).abs(), 2, 1), [_X]),
    "max_pool2d": (lambda x: F.max_pool2d(x.reshape(1, 1, 7, 1).abs().expand(1, 1, 7, 3), (2, 2), 1, 1), [_X]),
    "max_pool3d": (lambda x: F.max_pool3d(x.reshape(1, 1, 7, 1, 1).abs(), (2, 1, 1)), [_X]),
    # fixed samples (f draws none): overlapping 2x2 windows over |x| (ties across the copied column too)
    "fractional_max_pool2d": (lambda x: F.fractional_max_pool2d(
        torch.stack([x.abs(), x.abs().flip(0)], -1).reshape(1, 1, 7, 2).expand(2, 1, 7, 2), (2, 2), (5, 1),
        _random_samples=torch.tensor([[[0.3, 0.6]], [[0.9, 0.1]]], dtype=x.dtype)).reshape(-1), [_X]),
    "fractional_max_pool2d_aten": (lambda x: torch.ops.aten.fractional_max_pool2d(
        x.abs().reshape(1, 7, 1).expand(1, 7, 3), (3, 2), (3, 2),
        torch.tensor([[[0.7, 0.2]]], dtype=x.dtype))[0].reshape(-1), [_X]),
    "sort": (lambda x: torch.sort(x.abs()).values * torch.arange(7.0, dtype=x.dtype), [_X]),
    "topk": (lambda x: torch.topk(x.abs(), 3).values, [_X]),
    "kthvalue": (lambda x: torch.kthvalue(x.abs(), 3).values, [_X]),
    "median": (lambda x: x.abs().median(), [_X]),
    "vector_norm": (lambda x: torch.linalg.vector_norm(x.reshape(7, 1) * (x.reshape(7, 1).abs() > 2), dim=1),
                    [_X]),
    "norm": (lambda x: torch.norm(x.reshape(7, 1) - x.reshape(7, 1).clamp(-1, 1), dim=1), [_X]),
    "sqrt": (lambda x: torch.sqrt(x.abs() + 1.0), [_X]),
    "pow": (lambda x: (x.abs() + 1.0) ** 0.5, [_X]),
    "nanmedian": (lambda x: torch.nanmedian(torch.cat([x.abs(), torch.full((2,), math.nan, dtype=x.dtype)])), [_X]),
    "mode": (lambda x: torch.mode(torch.cat([x, x.min().reshape(1)])).values, [_X]),  # the minimum repeated
    "cummax": (lambda x: torch.cummax(x.abs(), 0).values, [_X]),
    "cummin": (lambda x: torch.cummin(-x.abs(), 0).values, [_X]),
    "adaptive_max_pool1d": (lambda x: F.adaptive_max_pool1d(torch.cat([x.abs(), x.abs().flip(0)]).reshape(1, 1, 14),
                                                            3), [_X]),
    "adaptive_max_pool2d": (lambda x: F.adaptive_max_pool2d(torch.stack([x.abs(), x.abs().flip(0)]).reshape(1, 2, 7),
                                                            (1, 3)), [_X]),
    "adaptive_max_pool3d": (lambda x: F.adaptive_max_pool3d(torch.stack([x.abs(), x.abs().flip(0)]).reshape(
        1, 1, 2, 7), (1, 1, 3)), [_X]),
    "cdist": (lambda x: torch.cdist(x.abs().reshape(7, 1), x.reshape(7, 1)), [_X]),
    "pdist": (lambda x: F.pdist(torch.stack([x.abs(), torch.ones_like(x)], 1)), [_X]),
    "hinge_embedding_loss": (lambda x: F.hinge_embedding_loss(x, -torch.ones_like(x), reduction="none"), [_X]),
    "margin_ranking_loss": (lambda x: F.margin_ranking_loss(x, torch.zeros_like(x), torch.ones_like(x), margin=1.0,
                                                            reduction="none"), [_X]),
    "multi_margin_loss": (lambda x: F.multi_margin_loss(x.reshape(1, 7), torch.tensor([2]), reduction="none"), [_X]),
    # targets 2 and 5 (then -1: the rest ignored); margins at 0 between x[2] = 0 and x[1] = -1, x[4] = 1, ...
    "multilabel_margin_loss": (lambda x: F.multilabel_margin_loss(torch.stack([x, x.flip(0)]), torch.tensor(
        [[2, 5, -1, 0, 0, 0, 0], [4, 4, 1, -1, 3, 0, 0]]), reduction="none"), [_X]),
    "triplet_margin_loss": (lambda x: F.triplet_margin_loss(x.reshape(7, 1), torch.zeros(7, 1, dtype=x.dtype),
                                                            torch.ones(7, 1, dtype=x.dtype), eps=0.0,
                                                            reduction="none"), [_X]),
    "elu": (lambda x: F.elu(x, 0.5), [_X]),
    "selu": (F.selu, [_X]),
    "rrelu": (lambda x: F.rrelu(x, 0.1, 0.3, training=False), [_X]),
    "smooth_l1_loss": (lambda x: F.smooth_l1_loss(x, torch.zeros_like(x), beta=0.0, reduction="none"), [_X]),
    "argmax": (lambda x: (lambda a: a[a.argmax()])(x.abs()[:6]), [_X]),  # |x| ties at 3
    "argmin": (lambda x: (lambda a: a[a.argmin(0)])(-x.abs()[:6]), [_X]),
    "argsort": (lambda x: (lambda a: a[a.argsort()] * torch.arange(7.0, dtype=x.dtype))(x.abs()), [_X]),
    "aminmax": (lambda x: torch.stack(tuple(torch.aminmax(x.abs()[:6]))), [_X]),
    # norms of one coordinate at a == b: their subdifferential is a segment, which nearby gradients sample well
    "dist": (lambda x: torch.dist(x[2:3], torch.tensor([0.0], dtype=x.dtype)), [_X]),
    "pairwise_distance": (lambda x: F.pairwise_distance(x[:6].reshape(6, 1), torch.tensor(
        [-3.0, 0.0, 0.0, 0.5, 2.0, 2.0], dtype=x.dtype).reshape(6, 1), eps=0.0), [_X]),
    "std": (lambda x: torch.stack([x.abs()[[1, 4]].std(), x.std()]), [_X]),  # |x| is 1 at both: std 0
    "hypot": (lambda x: torch.hypot(x, 2 * x), [_X]),
    "matrix_norm": (lambda x: torch.stack([torch.linalg.matrix_norm(x[2:3].reshape(1, 1)),
                                           torch.linalg.matrix_norm(x[:6].reshape(2, 3))]
                                          + [torch.linalg.matrix_norm(_tied_matrix(x), o)  # tied singular values
                                             for o in (2, -2, "nuc", 1, -1, math.inf, -math.inf)]), [_X]),
    # singular values 3, 3 (|x0| = x5), 1, 1 (|x1| = x4) and 0 (x2) of a 5x5 diagonal, plus x3 coupling rows 0, 4
    "svdvals": (lambda x: torch.linalg.svdvals(_tied_matrix(x)) * torch.arange(5.0, 0.0, -1.0, dtype=x.dtype),
                [_X]),
    "std_mean": (lambda x: torch.stack(torch.std_mean(x.abs()[[1, 4]])), [_X]),
    "msort": (lambda x: torch.msort(x.abs()) * torch.arange(7.0, dtype=x.dtype), [_X]),  # |x| ties at 1 and 3
    "eq": (lambda x: torch.where(x == 1.0, 2 * x - 1.0, x), [_X]),  # both branches are 1 at the tie
    "ne": (lambda x: torch.where(x != 1.0, x, 2 * x - 1.0), [_X]),
    # piecewise constant: compositions that stay continuous (f jumps otherwise: an error, tested below)
    "sign": (lambda x: x * torch.sign(x), [_X]),
    "heaviside": (lambda x: torch.heaviside(x, torch.tensor(0.5, dtype=x.dtype)) * x, [_X]),  # relu
    "floor": (lambda x: torch.floor(x) + torch.ceil(-x) + x, [_X]),
    "ceil": (lambda x: torch.ceil(x) + torch.floor(-x) - x, [_X]),
    "round": (lambda x: torch.round(x / 2) + torch.round(-x / 2) + x, [_X]),
    "trunc": (lambda x: torch.trunc(x) + torch.trunc(-x) + 2 * x, [_X]),
    "frac": (lambda x: torch.frac(x) + torch.frac(-x) + x, [_X]),
    # trunc + frac and x * (x != 0) are x: the casts' jumps (nonzero integers; 0) cancel
    "integer_cast": (lambda x: x.long().to(x.dtype) + torch.frac(x) + x.bool().to(x.dtype) * x, [_X]),
    # |x| with a fixed sign, and x times its own sign bit (= |x|, continuous: the sign's jump at 0 meets x = 0)
    "copysign": (lambda x: torch.copysign(x, torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, 1.0, -1.0], dtype=x.dtype))
                 + torch.copysign(torch.ones_like(x), x) * x, [_X]),
    "scatter_reduce": (lambda x: torch.zeros(3, dtype=x.dtype).scatter_reduce(  # |x| ties in destination 1
        0, torch.tensor([0, 1, 0, 2, 1, 2, 2]), x.abs(), "amax", include_self=False), [_X]),
    "index_reduce": (lambda x: torch.full((3,), 0.5, dtype=x.dtype).index_reduce(  # ties with its own 0.5
        0, torch.tensor([0, 1, 0, 2, 1, 2, 2]), x.abs(), "amin"), [_X]),
    "embedding_bag": (lambda x: F.embedding_bag(torch.tensor([1, 4, 0, 2, 3, 5, 6]), x.abs().reshape(7, 1),
                                                torch.tensor([0, 2, 4]), mode="max").reshape(-1), [_X]),
    "remainder": (lambda x: torch.floor(x) + torch.remainder(x, 1.0), [_X]),  # = x: the jumps cancel
    # C++ composites run as Python ports (PORTS): |x| ties at 1 and 3, the ranks 2.4 and 4.5 fall on those ties
    "quantile": (lambda x: torch.cat([torch.quantile(x.abs(), torch.tensor([0.4, 0.75], dtype=x.dtype),
                                                     interpolation=i) for i in _INTERPOLATIONS]
                                     + [x.abs()[:6].reshape(2, 3).quantile(0.5, dim=0, keepdim=True).reshape(-1)]),
                 [_X]),
    "renorm": (lambda x: torch.renorm(x.reshape(7, 1), 1, 0, 2.0).reshape(-1)  # |x| = 0: the norm's kink
               + torch.renorm(torch.stack([x, x.flip(0)]), 3.5, 1, 5.0).sum(0), [_X]),
    # target -1 at cos == margin 0: rows 0 and 1 meet orthogonal vectors (the clamp's kink); row 2 is smooth
    "cosine_embedding_loss": (lambda x: F.cosine_embedding_loss(
        torch.stack([x[:3], x.abs()[1:4], x[4:]]),
        torch.tensor([[1.0, -3.0, 5.0], [0.0, 1.0, 0.0], [-1.0, 2.0, 0.5]], dtype=x.dtype),
        torch.tensor([-1.0, -1.0, 1.0], dtype=x.dtype), margin=0.0, reduction="none"), [_X]),
    # one eigenvalue of multiplicity 4 (= 1 at _X), split at first order along every direction: x[3] also couples
    "eigvalsh": (lambda x: torch.linalg.eigvalsh(
        torch.diag(torch.stack([x[2].abs() + 1, x[3] + 0.5, x[4], x[5] - 2]))
        + (x[3] - 0.5) * torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=x.dtype))
        * torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=x.dtype), [_X]),
    "nanquantile": (lambda x: torch.stack([torch.nanquantile(x.abs(), q, interpolation=i)
                                           for q in (0.4, 0.75) for i in _INTERPOLATIONS]), [_X]),
    "fmod": (lambda x: torch.trunc(x) + torch.fmod(x, 1.0), [_X]),
    # x again, the quotients' jumps (x a multiple of the divisor: 0, 6; -1, 1, 3 for |x| + 1) cancelled by remainder's
    "div": (lambda x: torch.div(x, 2, rounding_mode="floor") * 2 + torch.remainder(x, 2.0)
            + torch.div(x, -3.0, rounding_mode="trunc") * -3.0 + torch.fmod(x, -3.0)
            + torch.div(x, x.abs() + 1, rounding_mode="floor") * (x.abs() + 1) + torch.remainder(x, x.abs() + 1),
            [_X]),
    "floor_divide": (lambda x: x // 0.5 * 0.5 + torch.remainder(x, 0.5) + torch.floor_divide(x, 3.0) * 3.0
                     + torch.remainder(x, 3.0), [_X]),
    "logit": (lambda x: torch.logit(x / 4 + 0.5, 0.25), [_X]),  # at 0.25 (x = -1) and 0.75 (x = 1)
    "det": (lambda x: torch.linalg.det(_tied_matrix(x)), [_X]),  # singular at _X, rank 4: adj(A) != 0
    "i0e": (torch.special.i0e, [_X]),  # exp(-|x|) I0(x): a kink at x2 = 0
    # (a port) the Stirling term's mask y <= 1 at y = 1 (constant here: tests/test_hunt_ns2.py moves it)
    "poisson_nll_loss": (lambda x: F.poisson_nll_loss(x, torch.tensor([0.0, 1.0, 2.0, 1.0, 0.5, 3.0, 1.0],
                                                                      dtype=x.dtype), full=True, reduction="none"),
                         [_X]),
    # (ports) norms clamped at eps = 0.5: a zero row (x2 = 0), one inside (norm 0.32), one at eps (x3 = 0.5)
    "cosine_similarity": (lambda x: F.cosine_similarity(
        torch.stack([torch.stack([x[2], 2 * x[2], -x[2]]), x[3:6] * 0.1, torch.stack([x[3], x[2], x[2]]), x[4:]]),
        torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.1, -1.0], [2.0, 1.0, 1.0], [0.0, 1.0, 0.0]], dtype=x.dtype), eps=0.5),
                          [_X]),
    # var = |x| / 2 clamped at eps = 0.5: at eps (x = -1, 1), below (0, 0.25), above
    "gaussian_nll_loss": (lambda x: F.gaussian_nll_loss(torch.linspace(-1, 1, 7, dtype=x.dtype), torch.ones(
        7, dtype=x.dtype), x.abs() / 2, eps=0.5, reduction="none"), [_X]),
    # probabilities of 1e-14: where PyTorch's derivative (x - y) / max(x (1 - x), 1e-12) is off
    "binary_cross_entropy": (lambda x: F.binary_cross_entropy(_bce_p(x), _BCE_Y, reduction="none"), [_X]),
    # in-place variants (their rules run the out-of-place one on a copy): refused at every kink before
    "remainder_": (lambda x: torch.floor(x) + x.clone().remainder_(1.0), [_X]),
    "__imod__": (lambda x: torch.floor(x) + x.clone().__imod__(1.0), [_X]),
    "fmod_": (lambda x: torch.trunc(x) + x.clone().fmod_(1.0), [_X]),  # = x: the jumps at nonzero integers cancel
    "copysign_": (lambda x: x.clone().copysign_(torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, 1.0, -1.0], dtype=x.dtype))
                  + torch.ones_like(x).copysign_(x) * x, [_X]),
    "logit_": (lambda x: (x / 4 + 0.5).logit_(0.25), [_X]),
    # derived in-place routes (route_in_place_variants): x.gt_(0) in a where ran PyTorch's convention (silent)
    "gt_": (lambda x: torch.where(x.clone().gt_(0.0).bool(), x, -x) + torch.where(x.clone().le_(1.0).bool(), x, 2 - x),
            [_X]),
    "sgn_": (lambda x: x.clone().sgn_() * x + x.clone().absolute_(), [_X]),
    "frac_": (lambda x: x.clone().frac_() + x.clone().fix_(), [_X]),  # = x
    "hypot_": (lambda x: x.clone().hypot_(torch.zeros_like(x)), [_X]),  # |x|
    # piecewise-linear interpolation through knots -1, 0, 1, 3 (the index jumps there, f does not)
    "searchsorted": (lambda x: _interp_knots(x, torch.searchsorted(_KNOTS.to(x), x)), [_X]),
    "bucketize": (lambda x: _interp_knots(x, torch.bucketize(x, _KNOTS.to(x), right=True)), [_X]),
    # bilinear sampling along a row at ix = x + 2 of 5 columns: pixels at x = -1, 0, 1, the zero padding from
    # x = -3 and x = 3 on
    "grid_sample": (lambda x: F.grid_sample(_GRID_IMAGE.to(x), torch.stack([x / 2, torch.full_like(x, 0.3)], -1)
                                            .view(1, 1, -1, 2), align_corners=True).reshape(-1), [_X]),
}
# PyTorch has no backward for floor_divide, and a wrong one for binary_cross_entropy at 1e-14: the nearby gradients
# are those of the same function written with div (log, log1p)
NEARBY_REFERENCES = {"heaviside": lambda x: (x > 0).to(x.dtype) * x,  # (PyTorch has no derivative for heaviside)
                     "binary_cross_entropy": lambda x: -(_BCE_Y * _bce_p(x).log()
                                                         + (1 - _BCE_Y) * (-_bce_p(x)).log1p()),
                     # the documented x1 / max(||x1||, eps) . x2 / max(||x2||, eps), the clamp differentiated:
                     # PyTorch's gradient goes straight through its clamp (the ports' docstrings)
                     "cosine_similarity": lambda x: _clamped_cosine(
                         torch.stack([torch.stack([x[2], 2 * x[2], -x[2]]), x[3:6] * 0.1,
                                      torch.stack([x[3], x[2], x[2]]), x[4:]]),
                         torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.1, -1.0], [2.0, 1.0, 1.0], [0.0, 1.0, 0.0]],
                                      dtype=x.dtype), 0.5),
                     "gaussian_nll_loss": lambda x: 0.5 * ((x.abs() / 2).clamp_min(0.5).log() + (torch.linspace(
                         -1, 1, 7, dtype=x.dtype) - 1) ** 2 / (x.abs() / 2).clamp_min(0.5)),
                     "floor_divide": lambda x: torch.div(x, 0.5, rounding_mode="floor") * 0.5
                     + torch.remainder(x, 0.5) + torch.div(x, 3.0, rounding_mode="floor") * 3.0
                     + torch.remainder(x, 3.0)}


def _clamped_cosine(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    unit = lambda v: v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(eps)
    return (unit(a) * unit(b)).sum(1)


def test_every_rule_has_samples():
    names = {getattr(r, "__name__", "") for r in KINK_RULES.values()}
    names |= {p.__name__ for p in PORTS.values()}
    assert names <= set(RULE_SAMPLES), f"rules without samples: {names - set(RULE_SAMPLES)}"


def _port_calls(name: str, x: torch.Tensor, g: torch.Generator):
    """(args, kwargs) after the input for one port: every option it has."""
    dims = [None, int(torch.randint(-x.dim(), x.dim(), (), generator=g))]
    if name in ("quantile", "nanquantile"):
        q = torch.rand(3, generator=g, dtype=x.dtype)
        for qq, dim, keepdim, i in itertools.product((q, q[0], float(q[1])), dims, (False, True), _INTERPOLATIONS):
            yield (qq, dim, keepdim), {"interpolation": i}
    elif name == "renorm":
        for p, dim in itertools.product((1, 2, 3.5, math.inf), dims[1:]):
            norms = torch.linalg.vector_norm(x.float(), p, [d for d in range(x.dim()) if d != dim % x.dim()])
            # a random bound, and one equal to a slice's norm (the factor's jump)
            for bound in (float(torch.rand((), generator=g)) * 3, float(norms.nan_to_num(1.0).reshape(-1)[0])):
                yield (p, dim, bound), {}
    elif name == "cosine_embedding_loss":
        y = torch.randint(-2, 3, x.shape, generator=g).to(x.dtype)
        t = (torch.randint(0, 3, x.shape[:1], generator=g) - 1).to(x.dtype)
        for margin, reduction in itertools.product((0.0, 0.5, -0.5), (0, 1, 2)):
            if x.dim() == 2:
                yield (y, t, margin, reduction), {}
            yield (y.reshape(-1)[: x.shape[-1]], t[0], margin, reduction), {}  # 0-D target: PyTorch refuses 2-D x
    elif name == "poisson_nll_loss":
        y = torch.randint(0, 4, x.shape, generator=g).to(x.dtype)  # y = 1 (the Stirling term's mask) included
        for log_input, full, reduction in itertools.product((True, False), (True, False), (0, 1, 2)):
            yield (y, log_input, full, 1e-8, reduction), {}
    elif name == "cosine_similarity":
        other = torch.randint(-2, 3, x.shape, generator=g).to(x.dtype)
        for y, dim, eps in itertools.product((other, other[:1], x), range(-x.dim(), x.dim()), (1e-8, 2.0)):
            yield (y, dim, eps), {}
    elif name == "gaussian_nll_loss":
        y = torch.randint(-2, 3, x.shape, generator=g).to(x.dtype)
        for var, full, eps, reduction in itertools.product((x.abs(), x.abs()[..., 0], x.abs()[..., :1], 0.25),
                                                           (False, True), (1e-6, 1.0), ("none", "mean", "sum")):
            yield (y, var), {"full": full, "eps": eps, "reduction": reduction}
    elif name in ("fractional_max_pool2d", "fractional_max_pool2d_aten"):
        planes = (x.shape[0] if x.dim() == 4 else 1, x.shape[-3] if x.dim() >= 3 else 1)
        h, w = (1, *x.shape)[-2:]
        for k in range(1, 4):
            for size in ((1, 1), (2, 1), (h - k + 1, w - k + 1), 2):
                samples = torch.rand(*planes, 2, generator=g, dtype=x.dtype)
                if name == "fractional_max_pool2d_aten":
                    yield (k, size, samples), {}
                else:  # (output_ratio draws the samples: tests/test_fractional_max_pool.py)
                    for indices in (False, True):
                        yield (k,), {"output_size": size, "_random_samples": samples, "return_indices": indices}
    else:
        raise AssertionError(f"no sample calls for the port {name}")


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([torch.float32, torch.float64, torch.float16]), st.booleans())
def test_ports_give_pytorch_values_bit_for_bit(seed, dtype, nan):
    """Each port (a C++ composite rewritten in Python so its kinks reach the rules) returns exactly PyTorch's
    values, ties and NaN included, for every option; what PyTorch refuses, the port refuses."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(int(n) for n in torch.randint(1, 5, (int(torch.randint(1, 4, (), generator=g)),), generator=g))
    x = torch.randint(-2, 3, shape, generator=g).to(dtype)
    if nan:
        x[torch.rand(shape, generator=g) < 0.2] = math.nan
    for native, port in PORTS.items():
        for args, kwargs in _port_calls(port.__name__, x, g):
            try:
                want = native(x, *args, **kwargs)
            except (RuntimeError, TypeError) as e:  # refused (a float q for a Tensor overload, a 1-D renorm ...)
                with pytest.raises(type(e)):  # by the port too, with PyTorch's message
                    port(x, *args, **kwargs)
                continue
            got = port(x, *args, **kwargs)
            for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, want)), strict=True):
                assert a.shape == b.shape and a.dtype == b.dtype, (native, args, kwargs)
                assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), (native, args, kwargs)


@pytest.mark.parametrize("interpolation", ["linear", "higher", "midpoint"])
def test_quantile_port_rounds_its_ranks_as_pytorch_does(interpolation):
    """torch 2.14 computes quantile's ranks q * (n - 1) of a float32 input in double (2.13: in float32): the port
    still computed them in float32 and differed from PyTorch in the last bit (0.7 * 3 of [-2, -1, 0, 2]: 0.2 - 1
    ulp), and, where one rounding lands on an integer rank and the other does not, in which order statistics it
    interpolates. Qs where the two roundings differ, every form of the call."""
    from gradwise._nonsmooth._ports import PORTS

    x = torch.tensor([[-2.0, -1.0, 0.0, 2.0], [0.5, -1.5, 3.0, 1.0]])
    q = torch.tensor([0.7, 0.9, 0.45, 0.55, 1 / 3])
    for native in (torch.quantile, torch.nanquantile):
        for args in ((q, 1), (q, None), (0.7, 1), (torch.tensor(0.9), None)):
            want = native(x, *args, interpolation=interpolation)
            assert torch.equal(PORTS[native](x, *args, interpolation=interpolation), want), (native, args)


@pytest.mark.parametrize("name", sorted(RULE_SAMPLES))
def test_rule_one_sided_derivatives(name):
    """Along +-e_i and random directions, at kinks too: f'(x; d) equals the one-sided difference."""
    f, xs = RULE_SAMPLES[name]
    n = xs[0].numel()
    gen = torch.Generator().manual_seed(0)
    directions = [torch.eye(n, dtype=torch.float64)[i] * s for i in range(n) for s in (1.0, -1.0)]
    directions += [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(4)]
    for d in directions:
        ds = [d.reshape(xs[0].shape)] + [torch.zeros_like(x) for x in xs[1:]]
        got = gw.directional_derivative(f, tuple(xs), tuple(ds))
        with torch.no_grad():
            ref = (f(*[x + H * e for x, e in zip(xs, ds, strict=True)]) - f(*xs)) / H
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(RULE_SAMPLES))
def test_rule_keeps_nan_and_inf(name):
    """NaN/Inf inputs are refused by the public functions; inside f (NaN made by f itself) the rules keep PyTorch's
    values and only change what happens at exact ties."""
    f, xs = RULE_SAMPLES[name]
    x = xs[0].clone()
    x[1], x[-1] = math.nan, math.inf
    with torch.no_grad():
        ref = f(x, *xs[1:])
    with pytest.raises(ValueError, match=r"inputs\[0\] holds 2 NaN/Inf"):  # no derivative is invented there
        gw.directional_derivative(lambda *a: f(*a), (x, *xs[1:]), tuple(torch.zeros_like(v) for v in xs))
    # values: rerun f through gradwise's machinery with a zero direction and compare
    out = gw._nonsmooth._engine._run(f, (x, *xs[1:]), False, tuple(torch.zeros_like(v) for v in xs),
                                     gw._nonsmooth._records._Run(), False)[1][0][0]
    torch.testing.assert_close(out, ref, equal_nan=True)


# --- properties -----------------------------------------------------------------------------------------------

PIECEWISE = [
    lambda x: torch.relu(x[0] - x[1]) + torch.maximum(x[1], x[2]).abs() - torch.clamp(x[0] * x[2], -1, 1),
    lambda x: torch.sort(x.round()).values @ torch.tensor([3.0, -1.0, 2.0], dtype=x.dtype) + x.abs().amax(),
    lambda x: F.hardtanh(x.round() - x[0]).sum() + torch.minimum(x.round(), x.round().flip(0)).pow(2).sum(),
]
finite = st.floats(-3, 3, allow_nan=False, width=64)


@settings(max_examples=40, deadline=None)
@given(st.lists(finite, min_size=3, max_size=3), st.lists(finite, min_size=3, max_size=3),
       st.floats(0.1, 10), st.integers(0, len(PIECEWISE) - 1))
def test_positively_homogeneous_and_one_sided(xv, dv, scale, which):
    f = PIECEWISE[which]
    x = torch.tensor(xv, dtype=torch.float64).round()  # integers: kinks and ties are common
    d = torch.tensor(dv, dtype=torch.float64)
    dd = float(gw.directional_derivative(f, x, d))
    assert float(gw.directional_derivative(f, x, scale * d)) == pytest.approx(scale * dd, abs=1e-9, rel=1e-9)
    # integer points sit at the round() jumps of f only through ops with zero derivative: one-sided still holds
    with torch.no_grad():
        ref = float((f(x + H * d) - f(x)) / H)
    if abs(ref) < 1e6:  # round() jumps make f discontinuous in some directions; skip those
        assert dd == pytest.approx(ref, abs=1e-4, rel=1e-4)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-3, 3, allow_nan=False, width=64), min_size=3, max_size=3),
       st.integers(0, len(PIECEWISE) - 1))
def test_generalized_grad_equals_autograd_where_differentiable(xv, which):
    f = PIECEWISE[which]
    x = torch.tensor(xv, dtype=torch.float64) + 0.123456789  # generic: no ties, no kinks
    if gw._nonsmooth._engine.kinks_hit(f, x)[0]:
        return
    xr = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(f(xr), xr)
    (got,) = gw.generalized_grad(f, x)
    assert torch.equal(got, expected)


# --- PyTorch's wrong conventions, modules, dtypes, errors -----------------------------------------------------


def test_differs_from_pytorch_where_pytorch_is_wrong():
    x = torch.tensor(0.0, requires_grad=True)
    f = lambda x: torch.relu(x) - torch.relu(-x)
    assert float(torch.autograd.grad(f(x), x)[0]) == 0.0
    assert float(gw.generalized_grad(f, x)[0]) == 1.0


def test_module_parameters_as_inputs_and_backward_variant():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.MaxPool1d(2), torch.nn.Flatten(0),
                                torch.nn.Linear(2, 1))
    with torch.no_grad():
        model[0].bias.copy_(-(model[0].weight @ torch.ones(3)))  # every hidden unit exactly at relu's kink
    x = torch.ones(1, 3)
    params = tuple(model.parameters())
    loss = lambda *p: model(x).sum()
    grads = gw.generalized_grad(loss, params, seed=3)
    assert [g.shape for g in grads] == [p.shape for p in params]
    model.zero_grad()
    gw.generalized_backward(loss, params, seed=3)
    for p, g in zip(params, grads, strict=True):
        torch.testing.assert_close(p.grad, g)
    near = nearby_gradients(lambda *p: torch.func.functional_call(model, dict(zip(
        [n for n, _ in model.named_parameters()], p, strict=True)), (x,)).sum(), [p.detach() for p in params], n=100)
    assert hull_distance(flat(grads), near) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_inputs_and_dtypes(dtype):
    x = torch.tensor([[0.0, 1.0, 1.0], [2.0, -1.0, 0.0]], dtype=dtype)
    f = lambda x: (torch.relu(x) * x.amax(dim=1, keepdim=True)).sum()
    (g,) = gw.generalized_grad(f, x, seed=0)
    assert g.dtype == dtype and g.shape == x.shape
    dd = gw.directional_derivative(f, x, torch.ones_like(x))
    assert dd.dtype == dtype


def test_bad_inputs_have_clear_errors():
    f = lambda x: x.abs().sum()
    with pytest.raises(TypeError, match=r"not a torch\.Tensor"):
        gw.generalized_grad(f, [1.0, 2.0])
    with pytest.raises(TypeError, match="floating dtype"):
        gw.generalized_grad(f, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="floating dtype"):
        gw.directional_derivative(f, torch.tensor([1j]), torch.tensor([1j]))
    with pytest.raises(ValueError, match="scalar"):
        gw.generalized_grad(lambda x: x.abs(), torch.zeros(3))
    with pytest.raises(TypeError, match="shape"):
        gw.directional_derivative(f, torch.zeros(3), torch.zeros(2))


def test_singular_point_names_op_and_line():
    with pytest.raises(NonsmoothError, match=r"aten\.sqrt at .*test_nonsmooth\.py:\d+"):
        gw.directional_derivative(lambda x: torch.sqrt((x**2).sum()), torch.zeros(2), torch.ones(2))
    # the norm written as a norm is exact at 0
    assert float(gw.directional_derivative(torch.linalg.vector_norm, torch.zeros(2), torch.tensor([3.0, 4.0]))) \
        == pytest.approx(5.0)


def test_unruled_kink_op_is_an_error():
    with pytest.raises(NonsmoothError, match=r"aten\.fractional_max_pool3d"):
        gw.generalized_grad(lambda x: F.fractional_max_pool3d(x, 2, output_size=(2, 2, 2)).sum(),
                            torch.zeros(1, 1, 4, 4, 4))


def test_jump_is_an_error_not_a_derivative():
    with pytest.raises(NonsmoothError, match="jumps"):
        gw.directional_derivative(lambda x: F.threshold(x, 0.0, 5.0), torch.zeros(1), torch.ones(1))
    with pytest.raises(NonsmoothError, match="jumps"):
        gw.directional_derivative(lambda x: torch.where(x > 0, x + 1, x), torch.zeros(1), torch.ones(1))


def test_lexicographic_tie_breaking_with_further_directions():
    # along d = (1, 1) the comparison ties in value and tangent; further directions decide, and the
    # result is the derivative of a piece active next to x (both pieces agree along d)
    f = lambda x: torch.where(x[0] > x[1], 2 * x[0] - x[1], x[0])
    x = torch.zeros(2)
    assert float(gw.directional_derivative(f, x, torch.ones(2))) == pytest.approx(1.0)


# --- the locked piece is the one active along the direction (networks with many exact ties) ----------------------


def _int_conv_net(pool=True):
    """conv/relu/max-pool net with integer weights and images: ties between windows with different gradients."""
    g = torch.Generator().manual_seed(0)
    layers = [torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
              torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
              torch.nn.Linear(16, 3)]
    model = torch.nn.Sequential(*layers).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-2, 3, p.shape, generator=g).double())
    x = torch.randint(0, 3, (3, 2, 8, 8), generator=g).double()
    names = [n for n, _ in model.named_parameters()]
    f = lambda *p: F.cross_entropy(torch.func.functional_call(model, dict(zip(names, p, strict=True)), (x,)),
                                   torch.tensor([0, 1, 2]))
    return f, tuple(p.detach() for p in model.parameters())


def _tied_relu_mlp():
    """2-layer ReLU MLP whose hidden units come in exact copies, several at pre-activation 0, then amax."""
    g = torch.Generator().manual_seed(1)
    w1 = torch.randint(-2, 3, (3, 4), generator=g).double()
    w1 = torch.cat([w1, w1])  # exactly tied units
    b1 = -(w1 @ torch.ones(4, dtype=torch.float64)) * (torch.arange(6) % 2 == 0)  # half of them at the kink
    w2 = torch.randint(-2, 3, (5, 6), generator=g).double()
    x = torch.ones(7, 4, dtype=torch.float64)
    return (lambda w1, b1, w2: torch.relu(torch.relu(x @ w1.T + b1) @ w2.T).amax(dim=1).sum()), (w1, b1, w2)


def _repeated_eigenvalues():
    """A batch of symmetric 3x3 matrices at multiples of I (every eigenvalue repeated), eigenvalues weighted."""
    x = torch.arange(1.0, 6.0, dtype=torch.float64).reshape(5, 1, 1) * torch.eye(3, dtype=torch.float64)
    w = torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64)
    return (lambda x: (torch.linalg.eigvalsh((x + x.mT) / 2) * w).sum()), (x,)


LOCK_CASES = {"int-conv-maxpool": _int_conv_net, "tied-relu-mlp-amax": _tied_relu_mlp,
              "repeated-eigenvalues": _repeated_eigenvalues}


@pytest.mark.parametrize("name", sorted(LOCK_CASES))
def test_locked_piece_is_active_along_its_direction(name):
    """Branch locking along d gives the gradient of the piece active on the ray x + t d: <g, d> is the one-sided
    derivative along d, and g is the gradient at a differentiable point of that ray. Checked for the two-pass
    path (first call) and the tangent-carrying first pass (second call on the same code)."""
    f, xs = LOCK_CASES[name]()
    kinks, _ = gw._nonsmooth._engine.kinks_hit(f, xs)
    assert sum(k.count for k in kinks) >= 5  # many real ties
    gw._nonsmooth._engine._LAST_TIE.pop(f.__code__, None)
    for seed in range(3):
        first = gw.generalized_grad(f, xs, seed=seed)
        again = gw.generalized_grad(f, xs, seed=seed)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
        d = gw._nonsmooth._engine._random_direction(xs, seed)[0]
        along = sum(float((g * e).sum()) for g, e in zip(first, d, strict=True))
        assert along == pytest.approx(one_sided(f, xs, d, h=1e-8), rel=1e-5, abs=1e-5)
        ys = [(x + 1e-7 * e).requires_grad_(True) for x, e in zip(xs, d, strict=True)]
        assert not gw._nonsmooth._engine.kinks_hit(f, tuple(y.detach() for y in ys))[0]  # a differentiable point
        for g, h in zip(first, torch.autograd.grad(f(*ys), ys), strict=True):
            torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-4)


def _tied_scores_topk_sort():
    """float32 integer scores through relu (ties at 0), maximum with a mirror (elementwise ties), then a topk and
    a sort of the same scores (one shared lexicographic key) read at different positions."""
    g = torch.Generator().manual_seed(2)
    w = torch.randint(-1, 2, (24, 8), generator=g).float()
    x = torch.randint(0, 3, (6, 8), generator=g).float()
    weights = torch.linspace(1.0, 0.1, 5), torch.linspace(0.5, 0.0, 9)

    def f(w, b):
        s = torch.maximum(torch.relu(x @ w.T + b), torch.relu(x @ w.flip(0).T))
        return (torch.topk(s, 5, dim=1).values @ weights[0]).sum() + \
            (torch.sort(s, dim=1, descending=True).values[:, :9] @ weights[1]).sum()

    return f, (w, torch.zeros(24))


def test_records_built_lazily_give_the_same_gradient(monkeypatch):
    """A pass that ranks ties by its own tangent alone locks them without building their records (relu, maximum,
    topk, sort, `_LazyKink`) and shares one key between the topk and the sort of one tensor: the gradients are
    bitwise those of the eager records, on the two-pass path (first call) and the tangent-carrying one."""
    f, xs = _tied_scores_topk_sort()
    kinks, _ = gw._nonsmooth._engine.kinks_hit(f, xs)
    assert {k.op for k in kinks} >= {"aten.relu", "aten.topk", "aten.sort"}
    got = []
    for seed in range(3):
        gw._nonsmooth._engine._LAST_TIE.pop(f.__code__, None)
        got.append([gw.generalized_grad(f, xs, seed=seed) for _ in range(2)])
    monkeypatch.setattr(gw._nonsmooth._records._Run, "ranks_alone", lambda self, tangent: False)
    monkeypatch.setattr(gw._nonsmooth._rules_select, "_shared_lex_key",
                        lambda run, x, dim, pm, tm: gw._nonsmooth._records._lex_key(pm, tm))
    for seed in range(3):
        gw._nonsmooth._engine._LAST_TIE.pop(f.__code__, None)
        eager = [gw.generalized_grad(f, xs, seed=seed) for _ in range(2)]
        for a, b in zip(got[seed], eager, strict=True):
            assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))



_EDGE_FLOATS = [0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, 5e-324, -5e-324, 1.4e-45, -1.4e-45, 1e-38, 3e38]


_EDGE_PAIRS = [(a, b) for a in _EDGE_FLOATS for b in _EDGE_FLOATS]


@settings(max_examples=80, deadline=None)
@example(torch.float32, _EDGE_PAIRS)
@example(torch.float64, _EDGE_PAIRS)
@given(st.sampled_from([torch.float32, torch.float64]),
       st.lists(st.tuples(st.one_of(st.sampled_from(_EDGE_FLOATS), st.floats(width=32)),
                          st.one_of(st.sampled_from(_EDGE_FLOATS), st.floats(width=32))), min_size=1, max_size=40))
def test_sign_lock_picks_the_sides_of_the_boolean_lock(dtype, pairs):
    """`_sign_lock` (float passes) against the boolean lock it replaces: the s > 0 side exactly where not
    where(s == 0, s', s) < 0, and |key| <= 1 exactly at s == 0; NaN, inf, signed zeros and subnormals included."""
    from gradwise._nonsmooth._rules import _sign_lock

    sp = torch.tensor([a for a, _ in pairs], dtype=dtype)
    tangent = torch.tensor([b for _, b in pairs], dtype=dtype)
    key = _sign_lock(sp, tangent)
    # threshold_backward(x, key, -0.5) keeps x where not key <= -0.5 (a NaN key, from a NaN s, keeps it)
    assert torch.equal(key.le(-0.5).logical_not(), torch.where(sp == 0, tangent, sp).lt(0).logical_not())
    assert torch.equal(key.abs() <= 1, sp == 0)


def test_relu_lock_record_and_write():
    """The relu rule in a pass ranked by its own tangent: the lazy record says what an eager one does (ties at
    0, one-sided choice by the sign of x', x' == 0 on the x side), and a written choice relocks the gradient."""
    import torch.autograd.forward_ad as fwAD

    from gradwise._nonsmooth._records import _Run
    from gradwise._nonsmooth._rules_pointwise import relu

    x = torch.tensor([0.0, 0.0, 1.0, -1.0, 0.0], requires_grad=True)
    with fwAD.dual_level():
        run = _Run(top_only=True)
        out = relu(run, torch.relu, fwAD.make_dual(x, torch.tensor([1.0, -1.0, 5.0, 5.0, 0.0])))
        primal, tangent = fwAD.unpack_dual(out)
        assert torch.equal(tangent, torch.tensor([1.0, 0.0, 5.0, 0.0, 0.0]))
        (record,) = run.kinks
        assert record.cand.tolist() == [[True, True]] * 3
        assert torch.equal(record.keys[0], torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]))
        assert record.choice.tolist() == [0, 1, 0]
        assert torch.autograd.grad(primal.sum(), x, retain_graph=True)[0].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
        record.write(torch.tensor([1, 0, 1]))
        assert torch.autograd.grad(primal.sum(), x)[0].tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]


def test_relu_tangent_and_gradient_are_pytorchs_off_the_kink():
    """Without ties the relu rule computes the tangent itself (PyTorch's formula, without autograd recording
    it): value, tangent and gradient bitwise PyTorch's, in float32 and float64."""
    import torch.autograd.forward_ad as fwAD

    from gradwise._nonsmooth._rules_pointwise import _dual_relu

    for dtype in (torch.float32, torch.float64):
        x = torch.randn(64, 33, dtype=dtype, generator=torch.Generator().manual_seed(0)).requires_grad_()
        d = torch.randn(64, 33, dtype=dtype, generator=torch.Generator().manual_seed(1))
        g = torch.randn(64, 33, dtype=dtype, generator=torch.Generator().manual_seed(2))
        with fwAD.dual_level():
            ours, theirs = (fwAD.unpack_dual(r(fwAD.make_dual(x, d))) for r in (_dual_relu, F.relu))
            assert torch.equal(ours.primal, theirs.primal) and torch.equal(ours.tangent, theirs.tangent)
            assert not ours.tangent.requires_grad
            assert torch.equal(*(torch.autograd.grad(p, x, g)[0] for p in (ours.primal, theirs.primal)))


def test_tensors_after_the_last_tie_keep_their_identity():
    """A call on the same code carries tangents up to its last tie and strips them after: a tensor that has no
    tangent is passed on as itself (not an alias of it), so in-place methods return it."""
    seen = []

    def f(x):
        z = torch.relu(x) * 2  # the relu ties at 0: the last tie
        seen.append(z.mul_(1) is z)
        return z.sum()

    x = torch.tensor([0.0, 1.0])
    for _ in range(2):  # the second call carries tangents up to the relu
        assert gw.generalized_grad(f, x, seed=0)[0].tolist() in ([2.0, 2.0], [0.0, 2.0])
    assert seen == [True, True]

def test_relu_dead_pool_windows_are_not_kinks():
    # pre-activations far below 0 in whole windows: the windows tie at 0, but f is locally constant there
    x = torch.tensor([[-1.0, -2.0, 3.0, 1.0], [-1.0, -1.0, 3.0, 2.0]], dtype=torch.float64)
    f = lambda w: F.max_pool2d(torch.relu(x * w).reshape(1, 1, 2, 4), 2).sum()
    w = torch.tensor(1.0, dtype=torch.float64)
    kinks, _ = gw._nonsmooth._engine.kinks_hit(f, w)
    assert [k.op for k in kinks] == ["aten.max_pool2d"] and kinks[0].count == 1  # only the live (3, 3) window
    assert float(gw.generalized_grad(f, w)[0]) == pytest.approx(3.0)


def test_relu_tie_inside_a_dead_window_is_a_kink():
    # window (relu(a) at its kink, dead zeros): the pool ties between a live and dead elements: a real kink
    f = lambda a: F.max_pool1d(torch.relu(torch.stack([a, a - 1, a - 2, a - 3])).reshape(1, 1, 4), 4).sum()
    a = torch.tensor(0.0, dtype=torch.float64)
    for d in (1.0, -1.0):
        got = float(gw.directional_derivative(f, a, torch.tensor(d, dtype=torch.float64)))
        assert got == pytest.approx(one_sided(f, [a], [torch.tensor(d, dtype=torch.float64)]), abs=1e-6)


def test_in_place_edit_of_a_relu_output_voids_the_dead_window_shortcut():
    def f(w, v):
        h = torch.relu(v - 1)  # all relu-dead (v = 0)...
        h.add_(w)  # ... until w is added in place: now every element moves with w
        return F.max_pool1d(h.reshape(1, 1, 3), 3).sum()

    w, v = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    d = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    got = gw.directional_derivative(f, (w, v), (d, torch.zeros(3, dtype=torch.float64)))
    assert float(got) == pytest.approx(2.0)  # max over the tied window, not PyTorch's first element


@pytest.mark.parametrize("kw", [dict(kernel_size=2), dict(kernel_size=3, stride=1, padding=1),
                                dict(kernel_size=2, stride=1, dilation=2),
                                dict(kernel_size=3, stride=2, ceil_mode=True),
                                dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 1))])
def test_max_pool_variants_on_ties(kw):
    g = torch.Generator().manual_seed(3)
    img = torch.randint(0, 3, (2, 2, 6, 7), generator=g).double()
    weights = torch.randn(2, 2, 6, 7, generator=g).double()
    f = lambda s, b: (F.max_pool2d(img * s + b, **kw) * F.max_pool2d(weights, **kw)).sum()
    xs = (torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64))
    for _ in range(4):
        ds = [torch.randn((), generator=g, dtype=torch.float64) for _ in xs]
        assert float(gw.directional_derivative(f, xs, tuple(ds))) == pytest.approx(one_sided(f, xs, ds), abs=1e-5)
    near = nearby_gradients(f, list(xs), n=100)
    for seed in range(2):
        assert hull_distance(flat(gw.generalized_grad(f, xs, seed=seed)), near) < 1e-4


@pytest.mark.parametrize("conv", ["conv1d", "conv2d", "conv3d", "linear"])
def test_jvp_rules_match_pytorch_forward_ad(conv):
    g = torch.Generator().manual_seed(0)
    shapes = {"conv1d": ((2, 4, 9), (6, 2, 3)), "conv2d": ((2, 4, 7, 6), (6, 2, 3, 2)),
              "conv3d": ((4, 5, 4, 3), (6, 2, 2, 2, 2)), "linear": ((3, 5, 4), (6, 4))}[conv]
    kw = {} if conv == "linear" else {"groups": 2, "stride": 1, "padding": 1}
    fn = getattr(F, conv)
    x, w, b = (torch.randn(s, generator=g, dtype=torch.float64) for s in (*shapes, (6,)))
    f = lambda x, w, b: (fn(x, w, b, **kw) ** 2).sum()
    for mask in [(1, 1, 1), (0, 1, 0), (1, 0, 0), (0, 0, 1)]:
        ds = tuple(m * torch.randn(v.shape, generator=g, dtype=torch.float64) for m, v in zip(mask, (x, w, b),
                                                                                               strict=True))
        _, ref = torch.func.jvp(f, (x, w, b), ds)
        torch.testing.assert_close(gw.directional_derivative(f, (x, w, b), ds), ref)


# rules whose kinks hold a continuum of pieces (repeated eigen/singular values): the hull of sampled nearby
# gradients misses extreme points, so their generalized gradient is checked as the limit along its own ray
CONTINUUM_SAMPLES = {"eigvalsh", "svdvals", "matrix_norm"}


@pytest.mark.parametrize("name", sorted(RULE_SAMPLES))
def test_rule_generalized_grad_is_a_limit_of_nearby_gradients(name):
    f, xs = RULE_SAMPLES[name]
    total = lambda *a: f(*a).sum()
    if name in CONTINUUM_SAMPLES:  # the gradient at a differentiable point of the ray x + t d, t -> 0+
        for seed in range(2):
            g = flat(gw.generalized_grad(total, tuple(xs), seed=seed))
            d = gw._nonsmooth._engine._random_direction(tuple(xs), seed)[0]
            ys = [(x + 1e-7 * e).requires_grad_(True) for x, e in zip(xs, d, strict=True)]
            np.testing.assert_allclose(g, flat(torch.autograd.grad(total(*ys), ys)), atol=1e-4)
        return
    near = nearby_gradients(lambda *a: NEARBY_REFERENCES.get(name, f)(*a).sum(), xs, n=150)
    for seed in range(2):
        assert hull_distance(flat(gw.generalized_grad(total, tuple(xs), seed=seed)), near) < 1e-4


# --- the new rules' special cases -------------------------------------------------------------------------------


def test_mode_follows_the_largest_group_that_stays_tied():
    f = lambda x: torch.mode(x).values
    x = torch.tensor([1.0, 1.0, 1.0, 3.0], dtype=torch.float64)
    for d in ([0.5, 0.5, -1.0, 0.0], [0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, -1.0]):
        d = torch.tensor(d, dtype=torch.float64)
        assert float(gw.directional_derivative(f, x, d)) == pytest.approx(one_sided(f, [x], [d]), abs=1e-6)
    with pytest.raises(NonsmoothError, match=r"aten\.mode .* not the minimum"):
        gw.generalized_grad(f, torch.tensor([1.0, 3.0, 3.0], dtype=torch.float64))


@pytest.mark.parametrize("op", ["sign", "floor", "ceil", "round", "trunc"])
def test_piecewise_constant_jump_is_an_error(op):
    fn = getattr(torch, op)
    x = {"sign": 0.0, "floor": 1.0, "ceil": 1.0, "round": 2.5, "trunc": 2.0}[op]
    x = torch.tensor([x], dtype=torch.float64)
    f = lambda x: fn(x).sum() + x.sum()
    with pytest.raises(NonsmoothError, match=rf"aten\.{op} .* f's value changes"):
        gw.generalized_grad(f, x, seed=0)
    for d in (1.0, -1.0):  # along the continuous side the one-sided derivative exists (1, from x.sum())
        d = torch.tensor([d], dtype=torch.float64)
        try:
            got = float(gw.directional_derivative(f, x, d))
        except NonsmoothError:
            assert abs(one_sided(f, [x], [d])) > 1e3  # f jumps that way
        else:
            assert got == pytest.approx(one_sided(f, [x], [d]), abs=1e-6)


def test_jump_of_a_comparison_is_an_error_for_generalized_grad():
    with pytest.raises(NonsmoothError, match="jumps"):
        gw.generalized_grad(lambda x: torch.where(x > 0, x + 1, x), torch.tensor(0.0), seed=0)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
def test_cdist_at_coincident_points(p):
    a = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    f = lambda a, b: (torch.cdist(a, b, p) * torch.arange(1.0, 7.0, dtype=a.dtype).reshape(2, 3)).sum()
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        ds = [torch.randn(v.shape, generator=gen, dtype=torch.float64) for v in (a, b)]
        assert float(gw.directional_derivative(f, (a, b), tuple(ds))) == pytest.approx(one_sided(f, [a, b], ds),
                                                                                          abs=1e-5)
    near = nearby_gradients(f, [a, b], n=400)
    g = flat(gw.generalized_grad(f, (a, b), seed=0))
    if p == 2.0 or p == 3.0:  # round subdifferential: g is (close to) a nearby gradient
        assert np.linalg.norm(near - g, axis=1).min() < 0.1
    else:
        assert hull_distance(g, near) < 1e-4
    with pytest.raises(NonsmoothError, match=r"aten\.cdist"):
        gw.generalized_grad(lambda a: torch.cdist(a, a, 0.0).sum(), a)


# --- callables without a route: composites run under the mode, builtins under the kink watch --------------------

_T = lambda *v: torch.tensor(v, dtype=torch.float64)

# Python composites of torch.nn.functional: their inner ops reach the rules (one-sided differences as reference)
COMPOSITES = {
    "lp_pool1d_p1": (lambda x: F.lp_pool1d(x.reshape(1, 1, 2), 1, 2).sum(), _T(0.0, 0.0)),
    "lp_pool1d_inf": (lambda x: F.lp_pool1d(x.reshape(1, 1, 2), math.inf, 2).sum(), _T(0.0, 0.0)),
    "triplet_with_distance": (lambda x: F.triplet_margin_with_distance_loss(
        x[:2].reshape(1, 2), _T(1.0, 1.0).reshape(1, 2), _T(2.0, 1.0).reshape(1, 2),
        distance_function=lambda u, v: (u - v).abs().sum(-1)), _T(0.0, 0.0)),
}


@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_composites_reach_the_rules(name):
    f, x = COMPOSITES[name]
    for d in (_T(1.0, 0.0), _T(-1.0, 0.0), _T(0.0, -1.0), _T(0.3, -0.7)):
        assert float(gw.directional_derivative(f, x, d)) == pytest.approx(one_sided(f, [x], [d]), abs=1e-6)


# Builtins without a rule at their kink: an error naming the call, never PyTorch's convention
UNROUTED_AT_KINKS = {
    "eigh_with_vectors": (lambda x: torch.linalg.eigh(torch.diag(x)).eigenvalues[-1], _T(1.0, 1.0),
                          "eigh .* aten._linalg_eigh"),
    "aten_relu_in_place": (lambda x: torch.ops.aten.relu_(x * 1).sum(), _T(0.0, 1.0), "aten.relu_"),
    # facts the trace knew first (gradwise._ops._kinks): these gave one side's derivative, or Inf, silently
    "asin_at_minus_one": (lambda x: torch.asin(x).sum(), _T(-1.0, 0.0), "asin .* aten.asin"),
    "aten_hardswish_in_place": (lambda x: torch.ops.aten.hardswish_(x * 1).sum(), _T(3.0, 0.0), "aten.hardswish_"),
    "aten_pow_in_place": (lambda x: torch.ops.aten.pow_(x * 1, 0.5).sum(), _T(0.0, 1.0), "aten.pow_"),
}


def test_renorm_at_its_bound_jumps_outward_and_is_exact_inward():
    """PyTorch's renorm scales by maxnorm / (norm + 1e-7) where norm > maxnorm: f jumps there. Along a direction
    that shrinks the slice, f stays the identity (derivative d); outward, and tangentially (the norm grows at
    second order), there is no one-sided derivative: an error, not PyTorch's convention."""
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4]], dtype=torch.float64)
    f = lambda x: (torch.renorm(x, 2, 0, 5.0) * torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=x.dtype)).sum()
    inward = -torch.ones_like(x)
    got = float(gw.directional_derivative(f, x, inward))
    assert got == pytest.approx(one_sided(f, [x], [inward], h=1e-9), abs=1e-6) and got == -10.0
    for d in (torch.ones_like(x), torch.tensor([[4.0, -3.0], [1.0, 1.0]], dtype=torch.float64)):
        with pytest.raises(NonsmoothError, match="f jumps at x along this direction"):
            gw.directional_derivative(f, x, d)
    with pytest.raises(NonsmoothError, match="f jumps"):
        gw.generalized_grad(f, x, seed=0)


@pytest.mark.parametrize("name", sorted(UNROUTED_AT_KINKS))
def test_unrouted_kinks_are_errors(name):
    f, x, match = UNROUTED_AT_KINKS[name]
    d = torch.linspace(-1.0, 1.0, x.numel(), dtype=x.dtype).reshape(x.shape)
    with pytest.raises(NonsmoothError, match=match):
        gw.directional_derivative(f, x, d)
    with pytest.raises(NonsmoothError, match=match):
        gw.generalized_grad(f, x)
    away = x + 0.1 + torch.arange(x.numel(), dtype=x.dtype).reshape(x.shape) * 0.1  # no tie or bound: PyTorch
    assert float(gw.directional_derivative(f, away, d)) == pytest.approx(one_sided(f, [away], [d]), abs=1e-5)


# Smooth builtins whose implementations use kink ops as guards (amax in logsumexp, abs in nan_to_num): no error
SMOOTH_WITH_GUARDS = {
    "logsumexp_tied": (lambda x: torch.logsumexp(x, 0), _T(1.0, 1.0, 0.0)),
    "softmax_tied": (lambda x: torch.softmax(x, 0)[0], _T(1.0, 1.0, 0.0)),
    "nan_to_num_zeros": (lambda x: torch.nan_to_num(x).sum(), _T(0.0, 1.0, 0.0)),
    "normalize_zero_entry": (lambda x: F.normalize(x, dim=0)[1], _T(0.0, 1.0, 2.0)),
    "kl_div": (lambda x: F.kl_div(x.log_softmax(0), _T(0.5, 0.5, 0.0), reduction="sum"), _T(1.0, 1.0, 0.0)),
    "cross_entropy_tied": (lambda x: F.cross_entropy(x.reshape(1, 3), torch.tensor([0])), _T(1.0, 1.0, 0.0)),
}


@pytest.mark.parametrize("name", sorted(SMOOTH_WITH_GUARDS))
def test_smooth_builtins_are_not_kinks(name):
    f, x = SMOOTH_WITH_GUARDS[name]
    d = _T(0.3, -0.7, 0.2)
    assert float(gw.directional_derivative(f, x, d)) == pytest.approx(one_sided(f, [x], [d]), abs=1e-5)
    assert gw.stationarity(f, x).kinks == []


# --- fast paths of the sort / topk rule: the same answers as the general code ---------------------------------


def test_sort_rule_groups_reaching_positions_match_group_ids():
    """`_reaching` (a closed form over runs of tied neighbours) against group ids counted by scatter_add."""
    from gradwise._nonsmooth._rules_select import _reaching

    g = torch.Generator().manual_seed(0)
    for m in range(2, 10):
        for p in (0.2, 0.5, 0.8):
            links = torch.rand(200, m - 1, generator=g) < p
            gid = torch.cat([torch.zeros(200, 1, dtype=torch.int64), (~links).cumsum(-1)], -1)
            for lo in range(m - 1):
                for hi in range(lo + 1, m):
                    reach = torch.zeros_like(links)
                    reach[:, lo:hi] = links[:, lo:hi]
                    touched = torch.zeros(200, m, dtype=torch.int64).scatter_add_(1, gid[:, :-1], reach.long())
                    assert torch.equal(_reaching(links, lo, hi), touched.gather(1, gid) > 0), (m, lo, hi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("descending", [True, False])
def test_one_sort_of_the_value_tangent_key_is_the_lexicographic_order(dtype, descending):
    """One stable sort of `_lex_key` gives `_lex_order`'s permutation (signed zeros tie, infinities order)."""
    from gradwise._nonsmooth._records import _lex_key, _lex_order

    g = torch.Generator().manual_seed(1)
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, 1e-38, -1e-38])
    for _ in range(20):
        p = torch.randint(-2, 3, (16, 24), generator=g).float()
        t = torch.randint(-2, 3, (16, 24), generator=g).float()
        for v in (p, t):
            where = torch.rand(v.shape, generator=g) < 0.2
            v[where] = special[torch.randint(0, len(special), (int(where.sum()),), generator=g)]
        p, t = p.to(dtype), t.to(dtype)
        perm, _ = _lex_order(p, [t], descending, torch.ones_like(p, dtype=torch.bool))
        assert torch.equal(torch.sort(_lex_key(p, t), dim=-1, descending=descending, stable=True).indices, perm)
    assert _lex_key(p.double(), t.double()) is None
    p, t = p.float(), t.float()
    p[0, 0], t[0, 0] = 1.0, 1.0
    for nan in (math.nan, -math.nan):  # either sign, in the value or the key
        assert _lex_key(p.masked_fill(p == 1, nan), t) is None and _lex_key(p, t.masked_fill(t == 1, nan)) is None


def test_topk_ranked_from_a_top_k_plus_one_matches_the_full_sort():
    """`_top_ranked` (generalized gradients' topk path) ranks, indexes and records candidates as `_ordered`'s full
    sort does on tie-heavy rows (dead zeros, signed zeros, infinities, tied tangents), or declines."""
    import torch.autograd.forward_ad as fwAD

    from gradwise._nonsmooth._records import _Run
    from gradwise._nonsmooth._rules_select import _ordered, _top_ranked

    g = torch.Generator().manual_seed(0)
    taken = 0
    for trial in range(60):
        rows, m = int(torch.randint(1, 5, (), generator=g)), int(torch.randint(3, 20, (), generator=g))
        p = torch.randint(-2, 4, (rows, m), generator=g).float()
        t = torch.randint(-2, 3, (rows, m), generator=g).float() if trial % 3 else torch.randn(rows, m, generator=g)
        if trial % 4 == 1:
            for v, frac in ((-0.0, 0.2), (math.inf, 0.1), (-math.inf, 0.1)):
                p[torch.rand(rows, m, generator=g) < frac] = v
        if trial % 5 == 2:
            p[0] = torch.arange(m).float()  # a row without ties
        for k in range(1, m - 1):
            for largest in (True, False):
                with fwAD.dual_level():
                    x = fwAD.make_dual(p, t)
                    full, top = _Run(), _Run(top_only=True)
                    v_full, perm_full, _ = _ordered(full, "aten.topk", x, 1, largest, slice(0, k))
                    res = _top_ranked(top, "aten.topk", x, k, 1, largest)
                    if res is None:
                        continue
                    taken += 1
                    v_top, perm_top, _ = res
                    assert torch.equal(perm_full[..., :k], perm_top)
                    for a, b in zip(fwAD.unpack_dual(v_full), fwAD.unpack_dual(v_top), strict=True):
                        assert torch.equal(a[..., :k], b)
                    assert [k_.op for k_ in full.kinks] == [k_.op for k_ in top.kinks]
                    for a, b in zip(full.kinks, top.kinks, strict=True):
                        assert torch.equal(a.cand, b.cand) and torch.equal(a.choice[:, :k], b.choice)
    assert taken > 500


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_two_column_argmax_is_argmax(dtype):
    """`_argmax_last` (elementwise for switches' two candidates) picks as argmax does: first maximum, NaN largest."""
    from gradwise._nonsmooth._records import _argmax_last

    vals = torch.tensor([0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, -math.nan, 1e-45])
    a, b = torch.meshgrid(vals, vals, indexing="ij")
    k = torch.stack([a.reshape(-1), b.reshape(-1)], -1).to(dtype)
    assert torch.equal(_argmax_last(k), k.argmax(-1))
    k3 = torch.randn(50, 3, generator=torch.Generator().manual_seed(0)).round().to(dtype)
    assert torch.equal(_argmax_last(k3), k3.argmax(-1))


def test_binary_ops_with_one_dual_operand_match_pytorch():
    """The forward-mode routes for add/sub/mul/div with one dual and one plain operand (PyTorch's zero tangent for
    the plain side runs through Python references, ~0.1-0.2 ms per op): values and reverse-mode gradients bitwise
    PyTorch's, tangents equal to its formula's, for either side dual, reflected dunders, broadcasting, numbers,
    alpha, and a promoted plain operand (left to PyTorch)."""
    import torch.autograd.forward_ad as fwAD

    from gradwise._nonsmooth._rules_jvp import _JVP_ROUTES

    g = torch.Generator().manual_seed(0)
    functional = {torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.true_divide}
    checked = 0
    for call, rule in _JVP_ROUTES.items():
        if rule.__name__ in ("convolution", "linear", "weight_norm", "scaled_dot_product_attention"):  # (own tests)
            continue
        for (ys, cs), dual_first, other in itertools.product(
                (((3, 4), (3, 4)), ((3, 1), (1, 4)), ((3, 4), ()), ((), (3, 4))), (True, False),
                ("float64", "number", "float32")):
            p = torch.randn(ys, generator=g, dtype=torch.float64) + 2
            t = torch.randn(ys, generator=g, dtype=torch.float64)
            c = 1.7 if other == "number" else torch.randn(cs, generator=g, dtype=getattr(torch, other)) + 2
            if not dual_first and not isinstance(c, torch.Tensor) and call not in functional:
                continue
            for kw in ({}, {"alpha": 2.5}) if call in (torch.add, torch.sub, torch.subtract, torch.Tensor.add,
                                                        torch.Tensor.sub) else ({},):
                leaf = p.clone().requires_grad_()
                with fwAD.dual_level():
                    y = fwAD.make_dual(leaf, t)
                    args = (y, c) if dual_first else (c, y)
                    want, got = call(*args, **kw), rule(call, *args, **kw)
                    (wp, wt), (gp, gt) = fwAD.unpack_dual(want), fwAD.unpack_dual(got)
                    assert wp.dtype == gp.dtype and torch.equal(wp, gp), (call, ys, cs, dual_first, other, kw)
                    torch.testing.assert_close(gt, wt, rtol=1e-12, atol=1e-12)
                    assert torch.equal(torch.autograd.grad(wp.sum(), leaf, retain_graph=True)[0],
                                       torch.autograd.grad(gp.sum(), leaf)[0])
                    checked += 1
    assert checked > 400


@pytest.mark.parametrize("name", ["abs", "relu", "sign*x", "maximum", "clamp", "leaky_relu", "hardtanh", "where"])
def test_kinks_of_a_transposed_input(name):
    """A strided (transposed) input at its kinks gives what the same values contiguous give: the rules' locks
    are written through flat views, so they are made contiguous (a transposed mask raised a view error)."""
    op = {"abs": torch.abs, "relu": torch.relu, "sign*x": lambda x: torch.sign(x) * x,
          "maximum": lambda x: torch.maximum(x, -x), "clamp": lambda x: x.clamp(0, 1),
          "leaky_relu": torch.nn.functional.leaky_relu, "hardtanh": lambda x: torch.nn.functional.hardtanh(x, 0, 1),
          "where": lambda x: torch.where(x > 0, x, -x)}[name]
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0], [1.5, -1.0]], dtype=torch.float64)
    x = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64).t()
    f = lambda x: (op(x) * w).sum()
    d = torch.tensor([[1.0, -1.0], [2.0, 0.5], [-1.0, 1.0]], dtype=torch.float64)
    assert not x.is_contiguous()
    assert torch.equal(gw.directional_derivative(f, x, d), gw.directional_derivative(f, x.contiguous(), d))
    assert torch.equal(gw.generalized_grad(f, x, seed=3)[0], gw.generalized_grad(f, x.contiguous(), seed=3)[0])
    # f transposing a contiguous input before the kink (another input shape: another random piece, so its own run)
    (g,) = gw.generalized_grad(lambda y: (op(y.t()) * w).sum(), x.t().contiguous(), seed=3)
    assert g.shape == (2, 3) and g.isfinite().all()


@pytest.mark.parametrize("seed", range(4))
def test_indices_read_by_f_are_not_locked_after_the_fact(seed):
    """max_unpool places values by max_pool's indices: a pass that chose tied windows provisionally and locked
    them afterwards gave a gradient of no piece ([2, 0, 0, 0]). Indices f reads make the kink a full pass."""
    from gradwise._nonsmooth import _engine

    x = torch.tensor([[[1.0, 1.0, 2.0, 2.0]]], dtype=torch.float64)

    def f(x):
        return F.max_unpool1d(*F.max_pool1d(x, 2, return_indices=True), 2, output_size=(4,)).pow(2).sum()

    _engine._LAST_TIE.clear()  # the first call (a later one carries tangents into its first pass)
    (g,) = gw.generalized_grad(f, x, seed=seed)
    g = g.flatten()
    # every piece: max(window)^2 differentiated at one tied position per window
    assert sorted(g[:2].tolist()) == [0.0, 2.0] and sorted(g[2:].tolist()) == [0.0, 4.0], g


def test_softplus_jumps_at_its_threshold():
    """softplus(x, beta, threshold) is x itself where beta x > threshold: at beta x = threshold f jumps upwards
    (one-sided differences grow like 1/t: the float64 reference below), so a direction crossing it is refused;
    along the other side the smooth piece's derivative sigmoid(beta x)."""
    f = lambda x: F.softplus(x, beta=1.0, threshold=0.5).sum()
    x = torch.tensor([0.5], dtype=torch.float64)
    up = [(f(x + t) - f(x)).item() / t for t in (1e-6, 1e-7)]
    assert abs(up[1]) > 5 * abs(up[0])  # a jump: no one-sided derivative along +1
    with pytest.raises(gw.NonsmoothError, match="softplus"):
        gw.directional_derivative(f, x, torch.tensor([1.0], dtype=torch.float64))
    down = gw.directional_derivative(f, x, torch.tensor([-1.0], dtype=torch.float64))
    fd = (f(x - 1e-7) - f(x)).item() / 1e-7
    assert abs(down.item() - fd) < 1e-6 and abs(down.item() + torch.sigmoid(x).item()) < 1e-12
    away = torch.tensor([0.2, 3.0], dtype=torch.float64)  # off the switch: PyTorch's own derivative
    assert torch.equal(gw.generalized_grad(f, away)[0], torch.func.grad(f)(away))


@pytest.mark.parametrize("use", ["argmax", "max_indices", "sort_indices", "topk_indices"])
def test_an_index_used_as_a_number_jumps(use):
    """The index of a tie used as a number jumps with the branch (f(x) = 2, f(x + t d) = 3 + t along d = e_1:
    the float64 differences below grow like 1/t): refused, never a derivative. Along d = e_0 PyTorch's own
    choice stays, and the derivative is the sum's."""
    index = {"argmax": lambda x: x.argmax().double(), "max_indices": lambda x: x.max(0).indices.double(),
             "sort_indices": lambda x: x.sort(descending=True).indices[0].double(),
             "topk_indices": lambda x: x.topk(1).indices.double().sum()}[use]
    f = lambda x: index(x) + x.sum()
    x = torch.tensor([1.0, 1.0], dtype=torch.float64)
    d = torch.tensor([0.0, 1.0], dtype=torch.float64)
    diffs = [(f(x + t * d) - f(x)).item() / t for t in (1e-6, 1e-7)]
    assert diffs[1] > 5 * diffs[0]
    with pytest.raises(gw.NonsmoothError, match="jumps"):
        gw.directional_derivative(f, x, d)
    with pytest.raises(gw.NonsmoothError, match="jumps"):
        gw.generalized_grad(f, x, seed=0)
    assert gw.directional_derivative(f, x, torch.tensor([1.0, 0.0], dtype=torch.float64)).item() == 1.0


def test_an_index_read_continuously_is_no_jump():
    """x.gather(argmax) is max(x): reading the index that way is continuous, so nothing is refused."""
    x = torch.tensor([[2.0, 2.0, 1.0]], dtype=torch.float64)
    f = lambda x: x.gather(1, x.argmax(1, keepdim=True)).sum()
    assert gw.directional_derivative(f, x, torch.tensor([[0.5, -1.0, 3.0]], dtype=torch.float64)).item() == 0.5
    (g,) = gw.generalized_grad(f, x, seed=1)
    assert sorted(g.flatten().tolist()) == [0.0, 0.0, 1.0] and g[0, 2] == 0


_ATEN_CALLS = {
    "gt": lambda x: torch.where(torch.ops.aten.gt.Scalar(x, 0.0), x, -2 * x).sum(),
    "lt": lambda x: torch.where(torch.ops.aten.lt.Tensor(x, torch.zeros_like(x)), -2 * x, x).sum(),
    "eq": lambda x: torch.where(torch.ops.aten.eq.Scalar(x, 0.0), 1.0, x.exp()).sum(),
    "sign": lambda x: (torch.ops.aten.sign.default(x) * x).sum(),
    "floor": lambda x: (torch.ops.aten.floor.default(x) + torch.ops.aten.floor.default(-x)).sum(),
    "cummax": lambda x: torch.ops.aten.cummax.default(x, 0)[0].sum(),
}


@pytest.mark.parametrize("name", sorted(_ATEN_CALLS))
def test_aten_overloads_called_directly(name):
    """torch.ops.aten.* (what torch.export's modules run) reaches the same rules as the Python calls: at a tie a
    comparison takes the direction's side (it took PyTorch's: -2 where the one-sided difference says 1), a step
    its limit, cummax a plain tuple (it raised)."""
    f = _ATEN_CALLS[name]
    x = torch.tensor([0.0, 1.0, -1.0, 0.0], dtype=torch.float64)
    for d in (torch.tensor([1.0, 0.5, -1.0, -2.0], dtype=torch.float64), -torch.ones(4, dtype=torch.float64)):
        try:
            got = gw.directional_derivative(f, x, d)
        except gw.NonsmoothError:  # a jump (floor(x) + floor(-x) at an integer): no one-sided derivative
            assert name == "floor"
            continue
        ref = (f(x + 1e-7 * d) - f(x)) / 1e-7
        assert abs(got.item() - ref.item()) < 1e-5, (name, d)


def test_numpy_seeds_and_empty_inputs():
    """A NumPy integer seed works as an int; an empty input's least norm is 0 (both raised inside gradwise)."""
    import numpy as np

    f = lambda x: torch.relu(x).sum()
    x = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert torch.equal(gw.generalized_grad(f, x, seed=np.int64(3))[0], gw.generalized_grad(f, x, seed=3)[0])
    assert gw.stationarity(f, x, seed=np.uint8(5)).stationary is False
    cert = gw.stationarity(f, torch.zeros(0, dtype=torch.float64))
    assert cert.stationary is True and cert.min_norm == 0.0


def test_input_hooks_act_as_in_autograd():
    """A gradient hook on the input (and a post-accumulate hook, for generalized_backward) acts as in
    torch.autograd.grad / .backward(): away from kinks the results are PyTorch's (the hooks were dropped)."""
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    f = lambda a: (torch.relu(a) * w).sum()
    x = torch.tensor([0.5, 1.0, -2.0], dtype=torch.float64, requires_grad=True)
    x.register_hook(lambda g: g * 10)
    seen = []
    x.register_post_accumulate_grad_hook(lambda t: seen.append(t.grad.clone()))
    want = torch.autograd.grad(f(x), x)[0]
    assert torch.equal(gw.generalized_grad(f, x, seed=0)[0], want)
    gw.generalized_backward(f, x, seed=0)
    assert torch.equal(x.grad, want) and len(seen) == 1 and torch.equal(seen[0], want)


def _fresh(src: str):
    """A function compiled from source on each call: its own code object, so no memo of an earlier call of the
    same code (gradwise remembers the last tie pattern per code object) hides what a first call does."""
    scope = {"F": F, "torch": torch}
    exec(compile(src, f"<fresh {src}>", "exec"), scope)
    return scope["f"]


@pytest.mark.parametrize("inplace", ["F.relu(F.linear(X, W), inplace=True)", "F.linear(X, W).relu_()",
                                     "F.linear(X, W).abs_()", "torch.abs_(F.linear(X, W))",
                                     "F.leaky_relu(F.linear(X, W), -0.5, inplace=True)"])
def test_an_in_place_kink_ranks_its_ties_on_the_first_call(inplace):
    """An in-place relu/abs overwrites x, and with it x' that the record of its ties reads when the ranked pass
    asks for it: the ties were all locked to one side on the first call (a gradient of 1 for the identically
    zero f below, and stationarity 'proved' at a non-stationary point). f = (in place) - (out of place) == 0."""
    X = torch.tensor([[1.0, -1.0], [2.0, 1.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    W = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)  # X @ W.T ties at 0 four times
    outplace = inplace.replace(", inplace=True", "").replace(".relu_()", ".relu()").replace(".abs_()", ".abs()") \
        .replace("torch.abs_(", "torch.abs(")
    f = _fresh(f"def f(W):\n    return {inplace}.sum() - {outplace}.sum()")
    f.__globals__["X"] = X
    (g,) = gw.generalized_grad(f, W, seed=0)
    assert torch.equal(g, torch.zeros_like(W))
    v = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64)
    h = _fresh(f"def f(W):\n    return {inplace}.sum() - {outplace}.sum() + (v * W).sum()")
    h.__globals__.update(X=X, v=v)
    cert = gw.stationarity(h, W, seed=0)
    assert cert.stationary is False


def test_every_pass_of_one_call_draws_the_same_dropout_mask():
    """gradwise runs f more than once (a probe, a ranked pass, a check for jumps): each pass starts from the random
    state the call began with, so dropout draws one mask and f is one function. The reference is that function
    (the mask drawn from the same state), and the state after the call is the one a single run of f leaves."""
    v = torch.randn(50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    f = _fresh("def f(x):\n    h = torch.where(x > 0, x, 0.1 * x)\n"
               "    return (h * F.dropout(torch.ones_like(h), 0.5, training=True) * v).sum()")
    f.__globals__["v"] = v
    x = torch.zeros(50, dtype=torch.float64)
    x[::2] = 1.0
    d = torch.randn(50, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.manual_seed(0)
    mask = F.dropout(torch.ones(50, dtype=torch.float64), 0.5, training=True)
    after = torch.rand(3)
    real = lambda y: (torch.where(y > 0, y, 0.1 * y) * mask * v).sum()
    torch.manual_seed(0)
    dd = gw.directional_derivative(f, x, d)  # a continuous where at a tie: was "f jumps" (a new mask)
    assert torch.equal(torch.rand(3), after)
    assert float(dd) == pytest.approx(one_sided(real, [x], [d]), abs=1e-6)
    torch.manual_seed(0)
    (g,) = gw.generalized_grad(f, x, seed=0)
    assert torch.equal(torch.rand(3), after)
    mv = mask * v
    assert torch.equal(g[::2], mv[::2])  # away from the ties: the realized function's gradient
    tied = g[1::2]  # at the ties: one of its two pieces' slopes (one mask: 0 stays 0 on both)
    assert bool(((tied == mv[1::2]) | (tied == 0.1 * mv[1::2])).all())


def test_an_expanded_input_is_differentiated_like_its_copy():
    """An input whose elements share memory (expand: stride 0) takes no tangent in place; gradwise's passes work
    on a copy (it crashed in every entry point), and the answers are those of the copy."""
    base = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    f = lambda x: torch.relu(x).sum() + (x * x).sum()
    x, d = base.expand(4, 3), torch.linspace(-1.0, 1.0, 12, dtype=torch.float64).view(4, 3)
    assert torch.equal(gw.directional_derivative(f, x, d), gw.directional_derivative(f, x.clone(), d))
    assert torch.equal(gw.generalized_grad(f, x, seed=0)[0], gw.generalized_grad(f, x.clone(), seed=0)[0])
    assert gw.stationarity(f, x).stationary is False


def test_generalized_backward_leaves_frozen_inputs_alone():
    """As .backward(): an input with requires_grad=False gets no .grad (an optimizer would have moved it)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)
    x = torch.randn(5, 3)
    gw.generalized_backward(lambda *p: model(x).abs().sum(), list(model.parameters()), seed=0)
    assert model[0].weight.grad is None and model[0].bias.grad is None
    ref = model[2].weight.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(torch.nn.functional.linear(torch.relu(model[0](x)), ref, model[2].bias).abs().sum(),
                                  ref)
    torch.testing.assert_close(model[2].weight.grad, want)


def test_a_tensor_made_from_an_input_outside_f_is_refused():
    """f's value reaching an input through a tensor computed outside f (features computed once): gradwise sees none
    of those ops and would drop that part of the gradient (0 for the encoder, where .backward() gives its
    gradient): refused, naming the way out."""
    torch.manual_seed(0)
    enc, head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)
    x = torch.randn(5, 3)
    feats = enc(x)
    with pytest.raises(NonsmoothError, match="computed from it outside f"):
        gw.generalized_backward(lambda *p: head(feats).abs().sum(), [*enc.parameters(), *head.parameters()])
    feats = enc(x)  # (the check ran the backward through it: its graph is spent, as after a .backward())
    with pytest.raises(NonsmoothError, match="computed from it outside f"):
        gw.generalized_grad(lambda b: (feats + b).abs().sum(), enc.bias)


def test_buffers_are_updated_as_by_one_run_of_f():
    """A train-mode BatchNorm updates its running statistics in each forward; gradwise runs f more than once per
    call (stationarity: many times). Every pass starts from the buffers the call began with, and after the call
    they are those of one run of f (the reference: one plain forward)."""
    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 1))
        with torch.no_grad():
            m[3].weight[0, :3] = 0.0  # the L1 term below sits at its kink
        return m

    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    loss = lambda m: (m(x) ** 2).mean() + 0.1 * m[3].weight.abs().sum()
    ref = make()
    loss(ref)
    for call in (lambda m: gw.generalized_backward(lambda *p: loss(m), list(m.parameters()), seed=0),
                 lambda m: gw.stationarity(lambda *p: loss(m), tuple(m.parameters()))):
        m = make()
        call(m)
        for name, b in ref[1].named_buffers():
            assert torch.equal(b, getattr(m[1], name)), name


@pytest.mark.parametrize(("inplace", "at"), [("y.clamp_(0, 1)", 1.0), ("F.hardtanh_(y)", 1.0),
                                          ("torch.nn.ReLU6(inplace=True)(y)", 6.0),
                                          ("F.hardswish(y, inplace=True)", 3.0)])
def test_an_in_place_clamp_at_one_bound_differentiates(inplace, at):
    """An in-place clamp whose input touches one bound: the pieces' graph saved y, then the result was written
    into y (PyTorch: 'modified by an inplace operation'). The answers are those of the out-of-place op."""
    x = torch.tensor([at, 0.5, 2.0], dtype=torch.float64)
    body = "    y = x * 1.0\n    {}\n    return (y * torch.tensor([1.0, 2.0, 3.0], dtype=x.dtype)).sum()"
    f = _fresh("def f(x):\n" + body.format(inplace))
    plain = inplace.replace(".clamp_(", ".clamp(").replace("F.hardtanh_(", "F.hardtanh(").replace("inplace=True", "")
    g = _fresh("def f(x):\n" + body.format("y = " + plain))
    assert torch.equal(gw.generalized_grad(f, x, seed=0)[0], gw.generalized_grad(g, x, seed=0)[0])
    d = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    assert float(gw.directional_derivative(f, x, d)) == float(gw.directional_derivative(g, x, d))


@pytest.mark.parametrize("name", ["amax", "max_dim", "argmax_gather", "max_pool", "adaptive_max_pool"])
def test_an_empty_batch_has_no_kinks(name):
    """An input with no elements (an empty batch) reduced over its other dims: nothing ties, PyTorch's own."""
    f = {"amax": lambda x: x.amax(dim=1).sum(), "max_dim": lambda x: x.max(dim=1).values.sum(),
         "argmax_gather": lambda x: x.gather(1, x.argmax(1, keepdim=True)).sum(),
         "max_pool": lambda x: F.max_pool2d(x.view(0, 1, 1, 3), (1, 2)).sum(),
         "adaptive_max_pool": lambda x: F.adaptive_max_pool1d(x[:, None], 2).sum()}[name]
    x = torch.zeros(0, 3, dtype=torch.float64)
    assert float(gw.directional_derivative(f, x, torch.zeros_like(x))) == 0.0
    assert gw.generalized_grad(f, x)[0].shape == (0, 3)
    assert gw.stationarity(f, x).stationary is True


def test_kinks_reached_through_list_arguments_are_refused():
    """An op whose inputs f depends on only through a list (nn.RNN's flat weights, torch._foreach_*) ran
    unwatched: PyTorch's relu'(0) = 0 came through silently (0 instead of 1 along +b). At the kink: refused;
    away from it: exact."""
    torch.manual_seed(0)
    rnn = torch.nn.RNN(1, 1, nonlinearity="relu").double()
    with torch.no_grad():
        rnn.weight_ih_l0.zero_()
        rnn.weight_hh_l0.zero_()
        rnn.bias_ih_l0.fill_(0.5)
        rnn.bias_hh_l0.fill_(-0.5)  # relu(b_ih + b_hh) at 0
    x = torch.ones(1, 1, 1, dtype=torch.float64)
    params = tuple(rnn.parameters())
    f = lambda *p: rnn(x)[0].sum()
    with pytest.raises(NonsmoothError, match=r"aten\.relu at its kink"):
        gw.generalized_grad(f, params, seed=0)
    with torch.no_grad():
        rnn.bias_hh_l0.fill_(-0.25)
    assert float(gw.generalized_grad(f, params, seed=0)[2]) == 1.0
    y = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(NonsmoothError, match=r"aten\.abs"):
        gw.directional_derivative(lambda v: torch._foreach_abs([v])[0].sum(), y, -torch.ones(2, dtype=torch.float64))
    z = torch.tensor([0.5, 1.0], dtype=torch.float64)
    assert float(gw.directional_derivative(lambda v: torch._foreach_abs([v])[0].sum(), z,
                                           -torch.ones(2, dtype=torch.float64))) == -2.0


def test_grid_sample_at_a_pixel_is_a_kink():
    """Bilinear grid_sample is piecewise linear in the sample point, with a kink where a coordinate is a pixel's:
    f(g) = sample(img, g) - sample(flip(img), -g) is 0 everywhere, and generalized_grad gave 4.5 there (PyTorch's
    floor-side convention); then it was refused at the kink (no forward-mode derivative, no rule); the rule
    (`_rules_grid`) takes the cell the direction enters in both samples: 0 exactly. Off the kinks, and for a
    grid that does not depend on f's inputs (only the image does, an identity grid on pixel centres), PyTorch's."""
    img = torch.arange(1.0, 11.0, dtype=torch.float64).view(1, 1, 2, 5)
    sample = lambda im, g: F.grid_sample(im, torch.stack([g, torch.full_like(g, 0.3)], -1).view(1, 1, -1, 2),
                                         align_corners=True).sum()  # (y between the two rows: no kink there)
    f = lambda g: sample(img, g) - sample(img.flip(-1), -g)
    at = torch.tensor([0.5], dtype=torch.float64)  # pixel 3 of 0..4
    for seed in range(3):
        assert float(gw.generalized_grad(f, at, seed=seed)[0]) == pytest.approx(0.0, abs=1e-12)
    for d in (1.0, -1.0):
        assert float(gw.directional_derivative(f, at, torch.tensor([d], dtype=torch.float64))) == pytest.approx(
            0.0, abs=1e-12)
    assert gw.stationarity(f, at).stationary is True
    assert float(gw.generalized_grad(f, torch.tensor([0.3], dtype=torch.float64), seed=0)[0]) == pytest.approx(0.0)
    grid = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)  # on the pixels' columns
    (g,) = gw.generalized_grad(lambda im: sample(im, grid), img, seed=0)
    im = img.clone().requires_grad_(True)
    assert torch.equal(g, torch.autograd.grad(sample(im, grid), im)[0])


def test_spectral_norms_power_iteration_is_a_constant_as_in_autograd():
    """spectral_norm's power iteration (training mode) runs under no_grad: autograd holds u, v fixed, and so does
    every gradwise entry point (it was refused: F.normalize(..., out=u) on the weight's tangent). At a point
    without ties the generalized gradient is PyTorch's and the directional derivative its inner product, both
    from the module's state before the call (gradwise leaves the state one run leaves)."""
    torch.manual_seed(0)
    lin = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(3, 2).double())
    x = torch.randn(4, 3, dtype=torch.float64)
    f = lambda *p: torch.relu(lin(x)).sum()
    params = tuple(lin.parameters())
    d = tuple(torch.randn(p.shape, dtype=torch.float64) for p in params)
    start = copy.deepcopy(lin.state_dict())
    expected = torch.autograd.grad(f(), params)
    after = copy.deepcopy(lin.state_dict())
    lin.load_state_dict(start)
    got = gw.generalized_grad(f, params, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert all(torch.equal(v, after[k]) for k, v in lin.state_dict().items())
    lin.load_state_dict(start)
    dd = gw.directional_derivative(f, params, d)
    assert float(dd) == pytest.approx(float(sum((g * v).sum() for g, v in zip(expected, d, strict=True))), rel=1e-12)


def test_no_grad_inside_f_is_a_constant_in_every_entry_point():
    """A part of f under torch.no_grad() is a constant for autograd. The directional derivative (forward mode,
    which ignores no_grad) counted it while generalized_grad (reverse mode) did not: along (1, 1) at a tie 8
    against 2. Every entry point now differentiates the same function: f with that part held at its value
    (the reference: that program, differentiated by float64 one-sided differences)."""
    x = torch.tensor([1.5, 0.0], dtype=torch.float64)

    def f(x):
        with torch.no_grad():
            c = torch.relu(x) * 3 + torch.abs(x)  # kinks under no_grad: no kinks of the derivative
        return (torch.relu(x) + c).sum()

    c = torch.relu(x) * 3 + torch.abs(x)
    held = lambda x: (torch.relu(x) + c).sum()  # the same program, that part a constant
    for d in ([1.0, 1.0], [-1.0, -1.0], [0.5, -2.0]):
        d = torch.tensor(d, dtype=torch.float64)
        assert float(gw.directional_derivative(f, x, d)) == pytest.approx(one_sided(held, [x], [d]), abs=1e-6)
    (g,) = gw.generalized_grad(f, x, seed=0)
    sub = gw.subdifferential(f, x)
    assert sorted(e[0].tolist() for e in sub.elements) == [[1.0, 0.0], [1.0, 1.0]]
    assert any(torch.equal(g, e[0]) for e in sub.elements)
    assert [k.op for k in sub.kinks] == ["aten.relu"]  # the relu outside no_grad only
    assert gw.stationarity(f, x).stationary is False


@pytest.mark.parametrize("dim", [0, 1, None])
def test_weight_norm_layers_have_a_forward_mode_derivative(dim):
    """torch._weight_norm has no forward-mode formula in PyTorch: a weight_norm layer before a kink was refused
    ('no forward-mode derivative'). Its tangent is computed here; one-sided derivatives match float64 differences
    and generalized gradients those of v g / |v| written out."""
    torch.manual_seed(0)
    lin = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(3, 2).double(), dim=dim)
    with torch.no_grad():
        lin.bias.copy_(-lin(torch.ones(1, 3, dtype=torch.float64))[0] + lin.bias)  # relu ties at x = ones
    x = torch.ones(4, 3, dtype=torch.float64)
    params = tuple(lin.parameters())
    f = lambda *p: torch.relu(lin(x)).sum()
    d = tuple(torch.randn(p.shape, dtype=torch.float64) for p in params)
    assert float(gw.directional_derivative(f, params, d)) == pytest.approx(one_sided(f, list(params), list(d)),
                                                                           abs=1e-5)
    g, v = (lin.parametrizations.weight.original0, lin.parametrizations.weight.original1)
    norm = (lambda t: t.norm() if dim is None else t.norm(dim=1 - dim, keepdim=True))  # all dims but dim
    explicit = lambda *p: torch.relu(torch.nn.functional.linear(x, v * (g / norm(v)), lin.bias)).sum()
    for got, want in zip(gw.generalized_grad(f, params, seed=0), gw.generalized_grad(explicit, params, seed=0),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_wrong_sized_forward_ad_tangent_is_refused_clearly():
    """torch._foreach_norm's forward-mode formula makes a tangent of the wrong size (PyTorch's raw RuntimeError
    from inside gradwise's pass): a NonsmoothError with the way out."""
    x = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    with pytest.raises(NonsmoothError, match="single-tensor ops"):
        gw.directional_derivative(lambda v: torch._foreach_norm([v])[0], x, torch.ones_like(x))


@pytest.mark.parametrize("ord", [0, -1, -2.5])
def test_vector_norms_of_nonpositive_order_at_a_zero_entry(ord):
    """ord 0 counts the nonzero entries (a jump where one leaves 0); a negative ord is min-like at a zero entry
    (|x_0| + 0.5 x_0 near it: stationary). Both went to PyTorch's convention: directional derivatives 0.5 / 0
    against differences 1.5 / 1e8, 'not stationary' proved. Now refused where the direction moves a zero entry,
    exact (float64 one-sided differences) where it does not and away from zeros."""
    f = lambda x: torch.linalg.vector_norm(x, ord=ord) + 0.5 * x[0]
    x = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    for call in (lambda: gw.directional_derivative(f, x, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)),
                 lambda: gw.generalized_grad(f, x), lambda: gw.stationarity(f, x)):
        with pytest.raises(NonsmoothError, match="evaluated at 0"):
            call()
    d = torch.tensor([0.0, 1.0, -0.5], dtype=torch.float64)
    assert float(gw.directional_derivative(f, x, d)) == pytest.approx(one_sided(f, [x], [d]), abs=1e-6)
    away = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    for e in (d, torch.tensor([1.0, -1.0, 0.3], dtype=torch.float64)):
        assert float(gw.directional_derivative(f, away, e)) == pytest.approx(one_sided(f, [away], [e]), abs=1e-6)


@pytest.mark.parametrize("call", [lambda A: torch.norm(A, p="nuc"), lambda A: A.norm("nuc"),
                                  lambda A: torch.norm(A, p="fro"), lambda A: torch.norm(A, p=2)])
def test_torch_norm_with_a_string_order_and_no_dim(call):
    """torch.norm(A, p='nuc') without dim crashed every entry point (the string went to the vector rule's
    float()). At a generic matrix the generalized gradient is PyTorch's."""
    A = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
    (g,) = gw.generalized_grad(call, A)
    a = A.clone().requires_grad_(True)
    assert torch.allclose(g, torch.autograd.grad(call(a), a)[0], rtol=1e-12, atol=1e-14)


def test_piecewise_constant_and_constant_f():
    """f = one_hot(argmax(x)) . w is piecewise constant and jumps at a tie of the argmax; a literal output is
    constant. subdifferential / stationarity / gradcheck crashed with PyTorch's 'does not require grad': at the
    tie every entry point now names the jump, elsewhere the gradient is 0 and x is stationary."""
    w = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    f = lambda x: (F.one_hot(x.argmax(), 4).to(x.dtype) * w).sum()
    tie = torch.tensor([2.0, 2.0, 0.0, 1.0], dtype=torch.float64)
    for call in (gw.generalized_grad, gw.subdifferential, gw.stationarity):
        with pytest.raises(NonsmoothError, match="jumps"):
            call(f, tie)
    with pytest.raises(gw.GradcheckError, match="jumps"):
        gw.gradcheck(f, tie)
    for g, x in ((f, torch.tensor([3.0, 2.0, 0.0, 1.0], dtype=torch.float64)),
                 (lambda x: torch.tensor(1.0, dtype=torch.float64), tie)):
        assert torch.equal(gw.generalized_grad(g, x)[0], torch.zeros_like(x))
        assert gw.stationarity(g, x).stationary is True
        assert gw.subdifferential(g, x).exact


def test_a_tuple_of_outputs_is_refused_where_one_scalar_is_needed():
    """f returning (s, 10 s): generalized_grad differentiated the first output only ([1, 1]; autograd.grad sums:
    [11, 11]). Refused, naming the fix; directional_derivative takes tuples (one derivative per output)."""
    f = lambda x: (x.sum(), 10 * x.sum())
    x = torch.ones(2, dtype=torch.float64)
    for call in (lambda: gw.generalized_grad(f, x), lambda: gw.subdifferential(f, x), lambda: gw.stationarity(f, x),
                 lambda: gw.generalized_backward(f, [x.clone().requires_grad_(True)])):
        with pytest.raises(ValueError, match="tuple of 2 tensors"):
            call()
    assert [float(v) for v in gw.directional_derivative(f, x, torch.ones(2, dtype=torch.float64))] == [2.0, 20.0]


def test_topk_unsorted_is_pytorchs_order_and_refused_at_ties():
    """topk(sorted=False) returns its k elements in an order of PyTorch's kernel; gradwise returned them sorted,
    so an f reading that order was another function everywhere (gradient [1,0,0,3,0,0,4,2] for PyTorch's
    [2,0,0,3,0,0,4,1], a wrong value and directional derivative). Away from ties: PyTorch's gradient bitwise and
    float64 one-sided differences; at a tie the order may change along a direction: refused."""
    torch.manual_seed(0)
    x = torch.randn(8, dtype=torch.float64)
    w = torch.arange(1.0, 5.0, dtype=torch.float64)
    f = lambda x: (x.topk(4, sorted=False).values * w).sum()
    xr = x.clone().requires_grad_(True)
    assert torch.equal(gw.generalized_grad(f, x)[0], torch.autograd.grad(f(xr), xr)[0])
    d = torch.randn(8, dtype=torch.float64)
    assert float(gw.directional_derivative(f, x, d)) == pytest.approx(one_sided(f, [x], [d]), abs=1e-6)
    tied = torch.tensor([1.0, 0.5, 1.0, 2.0, -1.0], dtype=torch.float64)
    g = lambda x: (x.topk(3, sorted=False).values * w[:3]).sum()
    with pytest.raises(NonsmoothError, match="sorted=True"):
        gw.directional_derivative(g, tied, torch.randn(5, dtype=torch.float64))


def test_generalized_backward_differentiates_the_inputs_that_require_grad():
    """A frozen input (requires_grad=False) is a constant of f, as in .backward(): its tangent broke ties, so
    for max(c, -|w|) at w = c = 0 (identically 0 in w) w.grad was -1 or 1 for some seeds. An input f does not
    use keeps .grad None (it was zeros: weight decay then moved it)."""
    f = lambda w, c: torch.maximum(c, -torch.abs(w)).sum()
    for seed in range(12):
        w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        gw.generalized_backward(f, [w, torch.zeros(1, dtype=torch.float64)], seed=seed)
        assert float(w.grad) == 0.0
    used, unused = (torch.ones(2, dtype=torch.float64, requires_grad=True) for _ in range(2))
    gw.generalized_backward(lambda a, b: torch.relu(a).sum(), [used, unused])
    assert torch.equal(used.grad, torch.ones(2, dtype=torch.float64)) and unused.grad is None


JUMPS = {  # f, a point on the jump, a direction crossing it
    "bucketize": (lambda x: (torch.bucketize(x, torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)).double() * x)
                  .sum(), [1.0], [1.0]),
    "searchsorted": (lambda x: (torch.searchsorted(torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64), x).double()
                                * x).sum(), [1.0], [1.0]),
    "histc": (lambda x: torch.histc(x, bins=2, min=0, max=2)[0] * x.sum(), [1.0], [-1.0]),
    "count_nonzero": (lambda x: torch.count_nonzero(x) * x.sum(), [0.0, 1.0], [1.0, 0.0]),
    "bool cast": (lambda x: x.bool().double().sum() * x.sum(), [0.0, 1.0], [1.0, 0.0]),
    "long cast": (lambda x: x.long().double().sum() + x.sum(), [2.0], [-1.0]),
    "signbit": (lambda x: torch.signbit(x).double().sum() * x.sum() + x.sum(), [0.0, 1.0], [-1.0, 0.0]),
    "angle": (lambda x: torch.angle(x).sum(), [0.0], [-1.0]),
    "unique": (lambda x: torch.unique(x).sum(), [1.0, 1.0], [1.0, 0.0]),
    "sgn complex": (lambda x: torch.sgn(torch.complex(x[0], x[1])).real, [0.0, 0.0], [1.0, 0.0]),
}


@pytest.mark.parametrize("name", sorted(JUMPS))
def test_ops_that_read_floats_into_integers_refuse_at_their_jumps(name):
    """Ops whose outputs are integers or bools (or Python values) carry no derivative: at a point where they
    change (f(x + 1e-9 d) - f(x) is O(1) below: a jump) gradwise returned a directional derivative of 0 or 1 and
    'stationary' proofs. Refused there; away from their jumps exact (float64 one-sided differences)."""
    f, x, d = JUMPS[name]
    x, d = torch.tensor(x, dtype=torch.float64), torch.tensor(d, dtype=torch.float64)
    with torch.no_grad():
        assert abs(float(f(x + 1e-9 * d) - f(x))) > 0.1  # the reference: f jumps here
    for call in (lambda: gw.directional_derivative(f, x, d), lambda: gw.stationarity(f, x)):
        with pytest.raises(NonsmoothError):
            call()
    away = x + torch.tensor([0.25, 0.375][: x.numel()], dtype=torch.float64)
    if name == "histc":
        away = torch.tensor([0.75], dtype=torch.float64)
    if name == "unique":  # PyTorch's unique has no forward-mode derivative: refused anywhere, clearly
        with pytest.raises(NonsmoothError, match="no forward-mode derivative"):
            gw.directional_derivative(f, away, d)
        return
    assert float(gw.directional_derivative(f, away, d)) == pytest.approx(one_sided(f, [away], [d]), abs=1e-6)


@pytest.mark.parametrize("read", ["tolist", "item"])
def test_python_branches_on_tied_values_are_refused(read):
    """max(x0, x1) - mean(x) written with Python's max over x.tolist() (or an if on .item() values): gradwise
    follows torch's comparisons, not Python's, so at x0 == x1 the branch was x's own (a directional derivative
    of -0.5 against +0.5 by differences, 'not stationary' proved at the minimum). Refused at the tie; exact
    (float64 one-sided differences) where the values differ."""
    f = {"tolist": lambda x: x[(v := x.tolist()).index(max(v))] - x.mean(),
         "item": lambda x: (x[0] if x[0].item() >= x[1].item() else x[1]) - x.mean()}[read]
    tie = torch.tensor([1.0, 1.0], dtype=torch.float64)
    d = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for call in (lambda: gw.directional_derivative(f, tie, d), lambda: gw.stationarity(f, tie)):
        with pytest.raises(NonsmoothError, match="into Python"):
            call()
    away = torch.tensor([1.0, 1.5], dtype=torch.float64)
    for e in (d, -d, torch.tensor([0.3, -0.7], dtype=torch.float64)):
        assert float(gw.directional_derivative(f, away, e)) == pytest.approx(one_sided(f, [away], [e]), abs=1e-6)


@pytest.mark.parametrize("config", ["plain", "bool-mask", "float-mask", "causal", "gqa"])
def test_attention_has_a_forward_mode_derivative(config):
    """F.scaled_dot_product_attention (the CPU flash kernel has no forward-mode formula) was refused by every
    entry point, attention layers with it. The value is PyTorch's kernel's, the tangent forward mode through the
    math form: directional derivatives equal float64 differences; relu(a) - relu(-a) of an attention output a
    that is exactly 0 at x (ties everywhere) is a, so its generalized gradient is PyTorch's gradient of a."""
    torch.manual_seed(0)
    heads_kv = 1 if config == "gqa" else 2
    q = torch.randn(2, 2, 4, 8, dtype=torch.float64)
    k, v = (torch.randn(2, heads_kv, 5, 8, dtype=torch.float64) for _ in range(2))
    kw = {"bool-mask": {"attn_mask": torch.tensor([True, True, True, False, False]).expand(4, 5)},
          "float-mask": {"attn_mask": torch.randn(4, 5, dtype=torch.float64)},
          "causal": {"is_causal": True}, "gqa": {"enable_gqa": True}}.get(config, {})
    attn = lambda q: F.scaled_dot_product_attention(q, k, v, **kw)
    w = torch.randn(2, 2, 4, 8, dtype=torch.float64)
    f = lambda q: torch.relu(attn(q) * w).sum()
    d = torch.randn_like(q)
    assert float(gw.directional_derivative(f, q, d)) == pytest.approx(one_sided(f, [q], [d]), abs=1e-5)
    c = attn(q)
    a = lambda q: attn(q) - c  # exactly 0 at q: relu ties everywhere
    g = lambda q: (torch.relu(a(q)) - torch.relu(-a(q))).mul(w).sum()
    qr = q.clone().requires_grad_(True)
    want = torch.autograd.grad((attn(qr) * w).sum(), qr)[0]
    torch.testing.assert_close(gw.generalized_grad(g, q, seed=0)[0], want, rtol=1e-10, atol=1e-12)


def test_attention_mask_that_depends_on_the_inputs():
    """An attention bias computed from f's inputs (an ALiBi slope): its tangent was dropped (directional
    derivative 0). Reference: float64 one-sided differences."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64) for _ in range(3))
    dist = (torch.arange(4)[:, None] - torch.arange(4)[None]).abs().double()
    f = lambda s: F.scaled_dot_product_attention(q, k, v, attn_mask=-s * dist).sum()
    s, d = torch.tensor(0.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    assert float(gw.directional_derivative(f, s, d)) == pytest.approx(one_sided(f, [s], [d]), abs=1e-6)


@pytest.mark.parametrize("name", ["floor-gather", "count-dead", "bool-dead", "long-at-0"])
def test_discrete_reads_of_values_that_do_not_move_are_exact(name):
    """Integer/bool reads whose values do not move around x are constants: a floor's output cast to an index
    (table interpolation), count_nonzero or a bool cast of relu-dead zeros, an integer cast at 0 (trunc is 0 on
    both sides). The first jump facts refused them; every entry point now answers, equal to float64 one-sided
    differences and to PyTorch's gradient (f is differentiable there)."""
    tbl = torch.tensor([1.0, 3.0, 7.0, 2.0], dtype=torch.float64)
    f, x = {"floor-gather": (lambda x: (tbl[x.floor().long()] * 10 + x).sum(), [0.3, 1.7]),
            "count-dead": (lambda x: torch.count_nonzero(torch.relu(x)) * x.sum() / 3, [-0.5, 1.7, 2.0]),
            "bool-dead": (lambda x: (torch.relu(x).bool().double() * x).sum(), [-0.5, 1.7, 2.0]),
            "long-at-0": (lambda x: x.long().double().sum() + 2 * x.sum(), [0.0])}[name]
    x = torch.tensor(x, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    want = torch.autograd.grad(f(xr), xr)[0]
    assert torch.equal(gw.generalized_grad(f, x)[0], want)
    for d in (torch.ones_like(x), -torch.ones_like(x)):
        assert float(gw.directional_derivative(f, x, d)) == pytest.approx(one_sided(f, [x], [d]), abs=1e-6)
    assert gw.stationarity(f, x).stationary is False


CONTINUOUS_CASTS = {  # f with an integer or bool cast at its jump whose jumps cancel (each f is x or 2x)
    "long + frac": lambda x: (x.long().double() + torch.frac(x)).sum(),
    "to(int32) + frac": lambda x: (x.to(torch.int32).to(x.dtype) + torch.frac(x)).sum(),
    "type_as + frac": lambda x: (x.type_as(torch.tensor([1])).double() + torch.frac(x)).sum(),
    "as_tensor + frac": lambda x: (torch.as_tensor(x, dtype=torch.int16).double() + torch.frac(x)).sum(),
    "bool * x": lambda x: (x.bool().double() * x).sum() + x.sum(),
}


@pytest.mark.parametrize("name", sorted(CONTINUOUS_CASTS))
def test_integer_casts_whose_jumps_cancel_are_exact(name):
    """x.long() + frac(x) is x, but the cast had no rule: refused at every nonzero integer. The cast now takes
    its one-sided limit (trunc's, or x != 0 for bool) and f's value is checked: exact where f is continuous
    (float64 one-sided differences), an error where it jumps."""
    f = CONTINUOUS_CASTS[name]
    x = torch.tensor([-2.0, 0.0, 3.0, 1.5], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for d in [torch.ones_like(x), -torch.ones_like(x), *(torch.randn(4, generator=gen, dtype=torch.float64)
                                                          for _ in range(3))]:
        assert float(gw.directional_derivative(f, x, d)) == pytest.approx(one_sided(f, [x], [d]), abs=1e-6)
    near = nearby_gradients(f, [x], n=50)
    for seed in range(2):
        assert hull_distance(flat(gw.generalized_grad(f, x, seed=seed)), near) < 1e-6
    assert gw.stationarity(f, x).stationary is False


@pytest.mark.parametrize("first", ["to float64", "float_power 2"])
def test_a_call_smooth_for_some_arguments_is_not_remembered_as_smooth(first):
    """A callable the watch saw reach no kink op runs unwatched afterwards. Tensor.to(torch.float64) on a float64
    tensor reaches no op at all, float_power(x, 2) no singular pow: afterwards Tensor.to(torch.long) at an
    integer and float_power(x, 0.5) at 0 ran unwatched, a silent derivative across a jump (-1 where f jumps by
    -1) and inf where the derivative is singular. Both refuse now."""
    x = torch.tensor([2.0, 0.0], dtype=torch.float64)
    d = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    smooth, kinked = {
        "to float64": (lambda x: x.to(torch.float64).sum(), lambda x: x.to(torch.long).double().sum() + x.sum()),
        "float_power 2": (lambda x: torch.float_power(x, 2).sum(), lambda x: torch.float_power(x, 0.5).sum()),
    }[first]
    gw.directional_derivative(smooth, x, d)
    with torch.no_grad():  # the reference: f jumps (or is singular) along d, a difference quotient beyond 1e3
        assert abs(float(kinked(x + 1e-9 * d) - kinked(x))) > 1e-6
    with pytest.raises(NonsmoothError):
        gw.directional_derivative(kinked, x, d)


@pytest.mark.parametrize("name", ["threshold", "hardshrink", "threshold along its level set", "threshold(x * x)"])
def test_a_jump_the_direction_does_not_move_says_so(name):
    """threshold / hardshrink at their jumps, along a direction whose tangent there is 0, were refused with 'f is
    discontinuous at x along this direction', which is false where the element stays put (d = 0 on it: f is
    continuous along d). Where the op reads f's input itself, a tangent of 0 is d = 0 there: exact now (float64
    differences). Elsewhere first-order tangents cannot tell staying from crossing at second order (x * x at 0
    jumps; so does renorm along a tangent of its bound): refused, and the refusal says that. Directions that move
    the element are decided: the side where f is continuous exactly, the other as a jump."""
    f, x, still, inward, outward = {
        "threshold": (lambda x: F.threshold(x, 1.0, 5.0).sum(), [1.0, 2.0], [0.0, 1.0], [-1.0, 1.0], [1.0, 1.0]),
        "hardshrink": (lambda x: F.hardshrink(x, 0.5).sum(), [0.5, 2.0], [0.0, 1.0], [-1.0, 1.0], [1.0, 0.0]),
        "threshold along its level set": (lambda x: F.threshold(x[0] - x[1], 0.0, 5.0) + x[0], [1.0, 1.0],
                                          [1.0, 1.0], [-1.0, 0.0], [1.0, 0.0]),
        "threshold(x * x)": (lambda x: F.threshold(x * x, 0.0, 5.0).sum(), [0.0], [1.0], None, None),
    }[name]
    x, still = torch.tensor(x, dtype=torch.float64), torch.tensor(still, dtype=torch.float64)
    if name in ("threshold", "hardshrink"):  # the input itself: d = 0 on the element at the jump
        assert float(gw.directional_derivative(f, x, still)) == pytest.approx(one_sided(f, [x], [still]), abs=1e-6)
    else:
        with pytest.raises(NonsmoothError, match="does not move to first order"):
            gw.directional_derivative(f, x, still)
    if inward is not None:
        inward = torch.tensor(inward, dtype=torch.float64)
        assert float(gw.directional_derivative(f, x, inward)) == pytest.approx(one_sided(f, [x], [inward]), abs=1e-6)
    if outward is None:  # (x * x moves only at second order: no direction crosses at first)
        return
    outward = torch.tensor(outward, dtype=torch.float64)
    with torch.no_grad():
        assert abs(float(f(x + 1e-9 * outward) - f(x))) > 0.1  # the reference: f jumps along outward
    with pytest.raises(NonsmoothError, match="jumps here"):
        gw.directional_derivative(f, x, outward)


@pytest.mark.parametrize("which", ["angle", "atan2"])
def test_angles_jump_across_their_cut(which):
    """angle(z) at z = -1 and atan2(y, x) at (0, -1) jump from pi to -pi as the imaginary part (y) goes below 0:
    gradwise returned a derivative of 1 there. Refused; exact away from the cut."""
    f = (lambda v: torch.angle(torch.complex(v[0], v[1]))) if which == "angle" else \
        (lambda v: torch.atan2(v[1], v[0]))
    on = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    d = torch.tensor([0.0, -1.0], dtype=torch.float64)
    with pytest.raises(NonsmoothError):
        gw.directional_derivative(f, on, d)
    off = torch.tensor([-1.0, 0.5], dtype=torch.float64)
    assert float(gw.directional_derivative(f, off, d)) == pytest.approx(one_sided(f, [off], [d]), abs=1e-6)


@pytest.mark.parametrize("read", ["item-twice", "tolist-then-item", "zero-loss-logged", "complex"])
def test_python_reads_that_do_not_tie_are_exact(read):
    """Values read into Python that do not move apart are no tie: the same value read twice (two reads of one
    sum, a list and then one of its elements), a logged loss that is 0 and stays 0 (relu-dead), a complex value.
    The first check refused them all (or crashed on complex); exact (float64 one-sided differences), no warning."""
    f = {"item-twice": lambda x: x.sum() * (1 + 0 * (x.sum().item() + float(x.sum()))),
         "tolist-then-item": lambda x: x.sum() + 0 * (x.tolist()[0] + x[0].item()),
         "zero-loss-logged": lambda x: torch.relu(-x).sum() + 0 * torch.relu(-x).sum().item() + x[1],
         "complex": lambda x: torch.complex(x[0], x[1]).abs() + 0 * complex(torch.complex(x[0], x[1])).real}[read]
    x = torch.tensor([1.0, 2.5], dtype=torch.float64)
    for d in (torch.ones(2, dtype=torch.float64), torch.tensor([-1.0, 0.5], dtype=torch.float64)):
        assert float(gw.directional_derivative(f, x, d)) == pytest.approx(one_sided(f, [x], [d]), abs=1e-6)
    xr = x.clone().requires_grad_(True)
    with warnings.catch_warnings():  # (PyTorch's own, for float() of a tensor that requires grad)
        warnings.simplefilter("ignore", UserWarning)
        want = torch.autograd.grad(f(xr), xr)[0]
    assert torch.allclose(gw.generalized_grad(f, x)[0], want)
    assert gw.stationarity(f, x).stationary is False


def _into(dtype, how):
    def f(x):
        b = torch.zeros(x.shape, dtype=dtype)
        b.copy_(x) if how == "copy_" else b.__setitem__(slice(None), x)
        return b.double().sum() + x.sum()
    return f


ARGUMENT_KINKS = {  # f; a point at the op's jump (singular point, kink); a direction across it; a point away from it
    "div floor": (lambda x: torch.div(x, 2, rounding_mode="floor").sum() + x.sum(), 2.0, -1.0, 2.5),
    "div trunc": (lambda x: torch.div(x, -2.0, rounding_mode="trunc").sum() + x.sum(), 2.0, -1.0, 0.0),
    "div floor of 3 / x": (lambda x: torch.div(torch.full_like(x, 3.0), x, rounding_mode="floor").sum() + x.sum(),
                           1.5, 1.0, 1.25),
    "copy_ long": (_into(torch.long, "copy_"), 2.0, -1.0, 2.5),
    "setitem int": (_into(torch.int32, "setitem"), -3.0, 1.0, -2.5),
    "copy_ bool": (_into(torch.bool, "copy_"), 0.0, 1.0, 2.0),
    "0 ** x": (lambda x: (0.0 ** x).sum() + x.sum(), 0.0, 1.0, 0.5),
    "pow(0, x)": (lambda x: torch.pow(0.0, x).sum() + x.sum(), 0.0, -1.0, 1.5),
    "xlogy": (lambda x: torch.xlogy(x, x).sum(), 0.0, 1.0, 0.5),
    "xlog1py": (lambda x: torch.special.xlog1py(x, x - 1).sum(), 0.0, 1.0, 0.5),
    "entr": (lambda x: torch.special.entr(x).sum(), 0.0, -1.0, 0.5),
}


@pytest.mark.parametrize("name", sorted(ARGUMENT_KINKS))
def test_ops_that_jump_or_kink_by_their_arguments_are_refused_there(name):
    """Ops that had no kink fact gave a silent number across a jump or at a kink: div with rounding_mode floor /
    trunc (0 and [1, 1] where f jumps: floor or trunc of x / y), copy_ and b[:] = x into an integer or bool tensor
    (a cast), 0 ** x at 0 (2: 1 at 0, 0 above, inf below), xlogy(x, x) at 0 (NaN; t log t has slope -inf). Refused
    now (every entry point), and exact away from those points (float64 one-sided differences). (logit with eps has a
    rule now: tests/test_nonsmooth_steps.py.)"""
    f, at, d, away = ARGUMENT_KINKS[name]
    x, d = torch.tensor([at], dtype=torch.float64), torch.tensor([d], dtype=torch.float64)
    # the reference: along d the difference quotient is not finite, beyond 1e3, or does not settle (t log t), or
    # it is not minus the one along -d (a kink)
    ahead, back, coarse = (one_sided(f, [x], [s * d], h=h) for s, h in ((1, 1e-9), (-1, 1e-9), (1, 1e-6)))
    assert not math.isfinite(ahead) or abs(ahead) > 1e3 or abs(ahead - coarse) > 1 or not abs(ahead + back) < 0.1
    for call in (lambda: gw.directional_derivative(f, x, d), lambda: gw.generalized_grad(f, x),
                 lambda: gw.stationarity(f, x)):
        with pytest.raises(NonsmoothError):
            call()
    x = torch.tensor([away], dtype=torch.float64)
    for d in (torch.ones(1, dtype=torch.float64), -torch.ones(1, dtype=torch.float64)):
        assert float(gw.directional_derivative(f, x, d)) == pytest.approx(one_sided(f, [x], [d]), abs=1e-5)


@pytest.mark.parametrize("first", ["div", "copy_", "pow"])
def test_a_call_remembered_smooth_for_its_arguments_is_watched_for_others(first, monkeypatch):
    """A callable that reached only ops which cannot kink for its arguments (true division, a float copy_,
    x ** 2) is remembered as smooth for calls like it (same dtypes, strings, keywords; numbers where a fact reads
    them): it runs unwatched then (x / 2 in f was watched on every call of f), and watched for other arguments
    (a rounding mode, an integer destination, x ** 0.5), which refuse at their kinks."""
    from gradwise._nonsmooth import _kink_mode

    smooth, kinked, at = {
        "div": (lambda x: torch.div(x, 2, rounding_mode=None).sum(),
                lambda x: torch.div(x, 2, rounding_mode="floor").sum() + x.sum(), 2.0),
        "copy_": (_into(torch.float32, "copy_"), _into(torch.long, "copy_"), 2.0),
        "pow": (lambda x: x.__rpow__(2.0).sum() + torch.Tensor.__rpow__(x, 3).sum(),
                lambda x: torch.Tensor.__rpow__(x, 0.0).sum() + x.sum(), 0.0),
    }[first]
    watched = []
    real = _kink_mode._watched
    monkeypatch.setattr(_kink_mode, "_watched", lambda func, *a: watched.append(func) or real(func, *a))
    x = torch.tensor([1.5], dtype=torch.float64)
    gw.generalized_grad(smooth, x)
    watched.clear()
    for _ in range(2):
        gw.generalized_grad(smooth, x)
        gw.directional_derivative(smooth, x, torch.ones(1, dtype=torch.float64))
    assert watched == []
    x, d = torch.tensor([at], dtype=torch.float64), -torch.ones(1, dtype=torch.float64)
    for call in (lambda: gw.directional_derivative(kinked, x, d), lambda: gw.generalized_grad(kinked, x)):
        with pytest.raises(NonsmoothError):
            call()
