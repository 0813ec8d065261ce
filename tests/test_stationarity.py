"""Subdifferentials and stationarity certificates: enumeration, the least-norm QP, sampling, near-ties."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import gradwise as gw


def slsqp_min_norm(g: np.ndarray) -> float:
    """Least norm over conv(rows of g) by SLSQP on the simplex: an independent check of the NNLS route."""
    k = len(g)
    res = minimize(lambda lam: float(np.sum((lam @ g) ** 2)), np.full(k, 1 / k), jac=lambda lam: 2 * g @ (lam @ g),
                   method="SLSQP", bounds=[(0, 1)] * k, constraints=[{"type": "eq", "fun": lambda lam: lam.sum() - 1}],
                   options={"ftol": 1e-15, "maxiter": 1000})
    return float(np.sqrt(max(res.fun, 0)))


@pytest.mark.parametrize("seed", range(5))
def test_min_norm_agrees_with_an_independent_solver(seed):
    g = np.random.default_rng(seed).normal(size=(7, 4)) + (seed % 2) * 2.0
    sd = gw.Subdifferential([(torch.tensor(row),) for row in g], exact=True)
    ours = float(torch.linalg.vector_norm(sd.min_norm_element()[0]))
    assert ours == pytest.approx(slsqp_min_norm(g), abs=1e-6)
    lam = sd.min_norm_weights()
    assert lam.min() >= 0 and lam.sum() == pytest.approx(1.0)


def test_differentiable_point_nonzero_gradient_is_proved_not_stationary():
    cert = gw.stationarity(lambda x: (x**2).sum(), torch.tensor([1.0, 2.0]))
    assert cert.stationary is False and cert.exact and cert.kinks == []
    assert cert.min_norm == pytest.approx(np.sqrt(20.0))


def test_relu_difference_is_not_stationary_although_pytorch_says_zero():
    f = lambda x: torch.relu(x) - torch.relu(-x)
    cert = gw.stationarity(f, torch.tensor(0.0))
    assert cert.stationary is False and cert.min_norm == pytest.approx(1.0)
    assert [k.op for k in cert.kinks] == ["aten.relu", "aten.relu"]


def test_inactive_branch_combinations_are_not_pieces():
    # relu(x) - relu(x) + x is x: the branch combinations (on, off)/(off, on) are never active
    sd = gw.subdifferential(lambda x: torch.relu(x) - torch.relu(x) + x, torch.tensor(0.0))
    assert sd.exact and [float(e[0]) for e in sd.elements] == [1.0]


def test_sampling_beyond_the_enumeration_budget_claims_false_only_with_a_proof():
    x = torch.zeros(20)  # 20 kinks: more than enumerated exactly
    cert = gw.stationarity(lambda x: (x.abs() + 0.5 * x).sum(), x)
    assert not cert.exact and cert.stationary in (True, None)
    f = lambda x: (x.abs() + 2 * x).sum()  # truly not stationary: proved by the interval bound (_bound.py)
    cert = gw.stationarity(f, x)
    assert not cert.exact and cert.stationary is False and 1e-6 < cert.lower_bound <= cert.min_norm
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):  # gradients at nearby differentiable points (whose limits are generalized gradients)
        near = (1e-6 * torch.randn(20, generator=gen)).requires_grad_()
        assert cert.lower_bound <= float(torch.autograd.grad(f(near), near)[0].norm()) + 1e-5


def test_near_ties_are_reported():
    x = torch.tensor([1e-9, 1.0], dtype=torch.float64)
    cert = gw.stationarity(lambda x: x.abs().sum(), x)
    assert cert.kinks == [] and cert.near_kinks and cert.near_kinks[0].op == "aten.abs"
    # with a tolerance the near-tie counts as a tie: an epsilon-subdifferential
    cert = gw.stationarity(lambda x: x.abs().sum() - x[1], x, tie_tol=1e-6)
    assert cert.stationary is True


def test_seed_iou_certificate_and_str():
    def iou(ps, pe):
        ts, te = torch.tensor([5.0, 2.0]), torch.tensor([5.0, 4.0])
        common = (torch.minimum(pe, te) - torch.maximum(ps, ts) + 1).clamp_min(0)
        return (1 - common / ((pe - ps + 1).clamp_min(0) + (te - ts + 1) - common)).mean()

    cert = gw.stationarity(iou, (torch.tensor([5.0, 2.0]), torch.tensor([5.0, 4.0])))
    assert cert.stationary is True and cert.exact and len(cert.subdifferential.elements) == 16
    assert "stationary" in str(cert) and "aten.minimum" in str(cert)


# --- decisions at scale (issue #14, point 4) ----------------------------------------------------------------------


def _blocky_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3)).double()
    x = torch.nn.functional.interpolate(torch.randint(0, 3, (4, 2, 2, 2)).double(), scale_factor=4)  # flat patches
    y = torch.tensor([0, 1, 2, 0])
    return net, x, y


def test_many_ties_not_stationary_is_proved_by_the_shared_part():
    """Hundreds of tied max-pool windows (beyond enumeration): the gradient of the layer after the pool is the same
    in every active piece, so its norm bounds the least norm from below and proves 'not stationary'."""
    net, x, y = _blocky_net()
    params = tuple(net.parameters())
    loss = lambda *p: torch.nn.functional.cross_entropy(net(x), y)
    assert sum(k.count for k in gw._nonsmooth._engine.kinks_hit(loss, params)[0]) > 12
    cert = gw.stationarity(loss, params, samples=4)
    assert not cert.exact and cert.stationary is False
    assert cert.lower_bound > 1e-6
    assert cert.lower_bound <= cert.min_norm + 1e-12
    # independent check of the claim: gradients at random differentiable points next to x share that part
    names = [n for n, _ in net.named_parameters()]
    gen = torch.Generator().manual_seed(0)
    shared = torch.cat([cert.element[i].reshape(-1) for i in (2, 3)])
    for _ in range(5):
        ps = [(p.detach() + 1e-7 * torch.randn(p.shape, generator=gen, dtype=p.dtype)).requires_grad_(True)
              for p in params]
        out = torch.func.functional_call(net, dict(zip(names, ps, strict=True)), (x,))
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y), ps)
        near = torch.cat([grads[i].reshape(-1) for i in (2, 3)])
        assert float(near.norm()) == pytest.approx(cert.lower_bound, rel=1e-4)
        torch.testing.assert_close(near, shared, atol=1e-5, rtol=1e-4)


def test_undecided_when_no_bound_decides():
    """relu(b) - relu(-b) is b = a + flip(a): least norm 2 sqrt(2). Sampled, with no input outside the ties, and
    the interval bound blind to the two relus moving together (each [0, 1] wide; each b element reads two
    elements of a, so `_bound_split` cannot pair them): None."""

    def f(a):
        b = a + a.flip(0)
        return (torch.relu(b) - torch.relu(-b)).sum()

    cert = gw.stationarity(f, torch.zeros(2, dtype=torch.float64), samples=4)
    assert cert.stationary is None and cert.lower_bound == 0.0 and cert.min_norm >= 8**0.5 - 1e-12


def test_sampled_ties_decided_by_the_interval_bound():
    """max(a, 2a) at 0, sampled: the pieces 1 and 2 bound the derivative along any w > 0 by w: proved False."""
    cert = gw.stationarity(lambda a: torch.maximum(a, 2 * a).sum(), torch.zeros(1, dtype=torch.float64), samples=4)
    assert cert.stationary is False and cert.lower_bound == pytest.approx(1.0) and not cert.exact


def test_the_least_norm_point_of_sort_pieces():
    """(sort(x) . w) at x = (1, 1, 1, 0): six pieces, the permutations of (2, 3, 4) then 1. Their hull's least-norm
    point is (3, 3, 3, 1) (SLSQP over the sampled pieces agrees); SciPy 1.17's NNLS stops at the vertex
    (4, 2, 3, 1), so `min_norm_weights` checks the optimality condition and falls back to BVLS."""
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    f = lambda x: (x.sort().values * w).sum()
    x = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    cert = gw.stationarity(f, x)
    assert cert.exact and len(cert.subdifferential.elements) == 6
    torch.testing.assert_close(cert.element[0], torch.tensor([3.0, 3.0, 3.0, 1.0], dtype=torch.float64))
    assert abs(cert.lower_bound - 28**0.5) < 1e-9 and cert.stationary is False


def test_least_norm_weights_on_random_hulls():
    """The least-norm point of random hulls, against SciPy's SLSQP on the simplex (an independent solver)."""
    from gradwise._nonsmooth._stationarity import Subdifferential

    rng = np.random.default_rng(0)
    for _ in range(20):
        n, d = int(rng.integers(2, 9)), int(rng.integers(1, 6))
        g = rng.integers(-3, 4, size=(n, d)).astype(float) + rng.normal(0, 1e-3, size=(n, d)) * rng.integers(0, 2)
        sd = Subdifferential([(torch.from_numpy(row),) for row in g], exact=True)
        got = np.linalg.norm(sd.min_norm_weights() @ g)
        ref = minimize(lambda m, g=g: np.sum((m @ g) ** 2), np.full(n, 1 / n), method="SLSQP", bounds=[(0, 1)] * n,
                       constraints=[{"type": "eq", "fun": lambda m: m.sum() - 1}], options={"ftol": 1e-15})
        assert got <= np.linalg.norm(ref.x @ g) + 1e-6


def test_enumeration_follows_a_direction_the_forced_choices_allow():
    """y[x > 0] = x[x > 0] evaluates one comparison twice: forcing the first mask's tie while the second took
    PyTorch's side made masks of different sizes (an index error inside gradwise). The ties not forced yet are
    ranked along the LP's point, so every run follows a real direction: the four pieces of sum w relu(x)."""
    x = torch.tensor([0.0, 1.0, -2.0, 0.0], dtype=torch.float64)
    w = torch.arange(1.0, 5.0, dtype=torch.float64)

    def f(x):
        y = torch.zeros_like(x)
        y[x > 0] = x[x > 0]
        return (y * w).sum()

    sd = gw.subdifferential(f, x)
    got = sorted(tuple(e[0].tolist()) for e in sd.elements)
    assert sd.exact and got == [(0.0, 2.0, 0.0, 0.0), (0.0, 2.0, 0.0, 4.0), (1.0, 2.0, 0.0, 0.0), (1.0, 2.0, 0.0, 4.0)]
    assert gw.stationarity(f, x).stationary is False


def test_seeds_span_the_same_range_everywhere():
    """subdifferential and stationarity take every seed generalized_grad takes (up to 2^63 - 1; the seeds they
    derive wrap), as the docs say (the top `samples` seeds were refused)."""
    f = lambda x: torch.relu(x).sum()
    x = torch.zeros(7, dtype=torch.float64)
    assert len(gw.subdifferential(f, x, seed=2**63 - 1, samples=4).elements) >= 1
    assert gw.stationarity(f, x, seed=2**63 - 1).stationary is True
    with pytest.raises(ValueError, match="out of range"):
        gw.subdifferential(f, x, seed=2**63)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rounding_proves_nothing(dtype):
    """max(x0 + x1/3, -3 x0 - x1) is stationary at 0 (float64 says so). In half precision the pieces' gradients
    are rounded (1/3 -> 0.33325) and their hull misses 0 by 6e-5 (float16) or 5e-4 (bfloat16): within rounding,
    neither a proof of False nor of True (undecided; True within an atol that covers the rounding). A descent of
    several ulps is still found."""
    f = lambda x: torch.maximum(x[0] + x[1] / 3, -3 * x[0] - x[1])
    assert gw.stationarity(f, torch.zeros(2, dtype=torch.float64)).stationary is True
    assert gw.stationarity(f, torch.zeros(2, dtype=dtype)).stationary is None
    assert gw.stationarity(f, torch.zeros(2, dtype=dtype), atol=1e-3).stationary is True
    g = lambda x: torch.maximum(x[0] + x[1], -3 * x[0] + x[1])  # x1 descends: least norm 1
    assert gw.stationarity(g, torch.zeros(2, dtype=dtype)).stationary is False


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rounding_never_proves_a_point_stationary(dtype):
    """sum|x| + 1.1 sum(x) at 0 is not stationary: every generalized gradient has entries in [0.1, 2.1] (least norm
    0.1 sqrt(3), exactly representable in bfloat16). Its least norm is within 8 ulps of the largest gradient in
    bfloat16, which once read as stationary=True; rounding can leave a verdict undecided, never prove it."""
    f = lambda x: x.abs().sum() + 1.1 * x.sum()
    x = torch.zeros(3, dtype=dtype)
    cert = gw.stationarity(f, x)
    assert cert.stationary is not True
    assert cert.min_norm > 0.15
    assert gw.stationarity(f, x.double()).stationary is False


def test_no_grad_part_of_f_proves_nothing_in_the_bound():
    """|x|_1 at 0 (40 ties, too many pieces to enumerate) plus 5 sum(x) computed under no_grad: a constant for
    autograd and for every gradwise entry point. The interval bound that decides such calls carried tangents
    through the no_grad part and "proved" False (as for |x|_1 + 5 sum(x)). The verdict is that of the program with
    the part detached."""
    x = torch.zeros(40, dtype=torch.float64)

    def f(x):
        with torch.no_grad():
            c = 5 * x.sum()
        return x.abs().sum() + c

    detached = gw.stationarity(lambda x: x.abs().sum() + 5 * x.sum().detach(), x)
    got = gw.stationarity(f, x)
    assert got.stationary is not False and got.stationary is detached.stationary
    assert gw.stationarity(lambda x: x.abs().sum() + 5 * x.sum(), x).stationary is False  # the bound itself works
