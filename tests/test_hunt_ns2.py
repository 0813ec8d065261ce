"""Hunt for wrong answers in the nonsmooth calculus, second round: matrix factorisations at their kinks and
jumps, and NaN operands of elementwise max/min/clamp at ties elsewhere. References: float64 one-sided
differences at several steps (converging, or not: a jump) and gradients at nearby differentiable points."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gradwise as gw
from gradwise import NonsmoothError

D = torch.float64
L = torch.linalg
NAN = float("nan")
STEPS = (1e-5, 1e-6, 1e-7)


def one_sided(f, x, d):
    """Forward differences (f(x + t d) - f(x)) / t in float64 at STEPS: the reference for f'(x; d)."""
    with torch.no_grad():
        return [float((f(x + t * d) - f(x)) / t) for t in STEPS]


def nearby_gradients(f, x, n=64, radius=1e-7, seed=0):
    """Gradients at random differentiable points next to x: the active pieces' gradients."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = (x + radius * torch.randn(x.shape, generator=gen, dtype=x.dtype)).requires_grad_(True)
        out.append(torch.autograd.grad(f(y), y)[0].reshape(-1))
    return torch.stack(out)


def directions(x, n=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(x.shape, generator=gen, dtype=x.dtype) for _ in range(n)]


# -- matrix factorisations ---------------------------------------------------------------------------------

I2 = torch.eye(2, dtype=D)
LU_TIE = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=D)  # the first column's pivot: |1| against |1|
# f, x: PyTorch's formulas differentiate the branch LAPACK returned, which is no branch of f here
AT_KINK = {
    # eigenvalues of I + tE are 1 + t eig(E): f'(I; E) = max Re eig(E), not max diag(V^-1 E V) for V = I
    "eigvals at a repeated eigenvalue": (lambda a: L.eigvals(a).real.max(), I2),
    "eigvals, weighted": (lambda a: (L.eigvals(a).real * torch.tensor([1.0, 2.0], dtype=D)).sum(), I2),
    "eig's values": (lambda a: L.eig(a)[0].real.max(), torch.diag(torch.tensor([2.0, 2.0, 1.0], dtype=D))),
    # the imaginary parts leave 0 as |Im eig(E)| (a complex pair), PyTorch's formula keeps them at 0
    "eigvals' imaginary parts": (lambda a: L.eigvals(a).imag.abs().sum(), I2),
    # U[0, 0] is the first column's entry of largest magnitude: a max of the tied rows' entries
    "lu's pivot (kink)": (lambda a: L.lu(a).U[0, 0], LU_TIE),
    # U[0, 1] is the picked row's second entry: 0 or 1, a jump
    "lu's pivot row (jump)": (lambda a: L.lu(a).U[0, 1], LU_TIE),
    "lu_factor's pivot": (lambda a: L.lu_factor(a)[0][0, 0], torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=D)),
    "lu_factor_ex's pivot row": (lambda a: torch.linalg.lu_factor_ex(a).LU[0, 1], LU_TIE),
    # geqrf does not reflect a column that is 0 below the diagonal: R = I at I, R[0, 0] = -1 at any nearby matrix
    "qr at the identity": (lambda a: L.qr(a).R[0, 0], I2),
    "qr's Q at the identity": (lambda a: L.qr(a).Q[1, 1], I2),
    # a zero diagonal entry: -sign(+0) reflects one way, -sign(-t) the other
    "qr at a zero diagonal entry": (lambda a: L.qr(a).R[0, 0], torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=D)),
    "qr, batched, upper triangular": (lambda a: L.qr(a).R.diagonal(dim1=-2, dim2=-1).sum(),
                                      torch.tensor([[[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0]]] * 2,
                                                   dtype=D)),
}


@pytest.mark.parametrize("name", list(AT_KINK))
def test_factorisations_at_their_kinks_are_exact_or_refused(name):
    """torch.linalg.eig/eigvals at a repeated eigenvalue, lu/lu_factor at a tied pivot and qr where geqrf skips
    or flips a reflection ran unwatched as smooth: gradwise returned PyTorch's number for the branch LAPACK
    picked, silently wrong (eigvals at I along E = [[.3, .2], [.5, -.1]]: 0.3 for f'(I; E) = 0.474; lu's pivot:
    0.3 for 0.5) or a derivative across a jump (qr at I). Now: an exact answer or a NonsmoothError naming the
    op. Reference: float64 one-sided differences; where they do not converge, f jumps and only an error will do."""
    f, x = AT_KINK[name]
    ds = [torch.tensor([[0.3, 0.2], [0.5, -0.1]], dtype=D)] if x.shape == (2, 2) else []
    for d in ds + directions(x):
        ref = one_sided(f, x, d)
        converged = abs(ref[-1] - ref[-2]) < 1e-5 * (1 + abs(ref[-1]))
        try:
            got = float(gw.directional_derivative(f, x, d))
        except NonsmoothError as e:
            assert "aten.linalg_" in str(e)
            continue
        assert converged, f"f jumps along d, yet gradwise answered {got}"
        assert got == pytest.approx(ref[-1], abs=1e-5)
    with pytest.raises(NonsmoothError, match=r"aten\.linalg_"):
        gw.generalized_grad(f, x, seed=0)


SMOOTH = {
    "eigvals, distinct": (lambda a: L.eigvals(a).real.sum() + L.eigvals(a).imag.abs().sum(),
                          torch.tensor([[1.0, 2.0, 0.0], [-1.0, 0.5, 1.0], [0.0, 1.0, 3.0]], dtype=D)),
    "eigvals, a complex pair": (lambda a: L.eigvals(a).imag.abs().sum(), torch.tensor([[0.0, -1.0], [1.0, 0.0]],
                                                                                     dtype=D)),
    "lu, untied": (lambda a: L.lu(a).U.pow(2).sum() + L.lu(a).L.sum(),
                   torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.5, 1.0], [0.0, 1.0, 3.0]], dtype=D)),
    "lu_factor, batched": (lambda a: L.lu_factor(a)[0].pow(2).sum(),
                           torch.tensor([[[1.0, 2.0], [3.0, 0.5]], [[-2.0, 1.0], [1.0, 1.0]]], dtype=D)),
    "qr, generic": (lambda a: L.qr(a).R.sum() + L.qr(a).Q.sum(),
                    torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.5, 1.0], [0.5, 1.0, 3.0]], dtype=D)),
    "qr, one row": (lambda a: L.qr(a).R.sum(), torch.tensor([[2.0, 1.0]], dtype=D)),
    "det at a tied pivot (smooth)": (lambda a: L.det(a), LU_TIE),
    "solve at a tied pivot (smooth)": (lambda a: L.solve(a, torch.ones(2, dtype=D)).sum(), LU_TIE),
}


@pytest.mark.parametrize("name", list(SMOOTH))
def test_factorisations_away_from_their_kinks_are_pytorchs(name):
    """No needless refusal: away from those points (and for det and solve, whose LU runs inside their kernels and
    which are smooth at a tied pivot) the answers are PyTorch's, bit for bit."""
    f, x = SMOOTH[name]
    xr = x.clone().requires_grad_(True)
    assert torch.equal(gw.generalized_grad(f, x, seed=0)[0], torch.autograd.grad(f(xr), xr)[0])
    for d in directions(x, 2):
        assert float(gw.directional_derivative(f, x, d)) == pytest.approx(one_sided(f, x, d)[-1], abs=1e-5)


# -- NaN operands of maximum, minimum, fmax, fmin and clamp, with ties elsewhere ------------------------------

X = torch.tensor([1.0, 7.0, 1.0, 7.0, 1.0], dtype=D)  # x and x.flip(0) tie at elements 0, 2, 3
HOLES = torch.tensor([False, True, False, False, True])
WEIGHTS = torch.arange(1.0, 6.0, dtype=D)
holed = lambda x: x.masked_fill(HOLES, NAN)
NAN_PAIRS = {
    "maximum(x', NaN)": lambda x: torch.maximum(x.flip(0), holed(x)),
    "minimum(x', NaN)": lambda x: torch.minimum(x.flip(0), holed(x)),
    "fmax(NaN, x')": lambda x: torch.fmax(holed(x), x.flip(0)),
    "Tensor.fmin(NaN, x')": lambda x: holed(x).fmin(x.flip(0)),
    "clamp(x, min=NaN)": lambda x: torch.clamp(x, min=holed(x.flip(0))),
    "clamp(x, max=NaN)": lambda x: torch.clamp(x, max=holed(x.flip(0))),
    "clamp(x, NaN, NaN)": lambda x: torch.clamp(x, holed(x.flip(0)), holed(x)),
    "clamp_min(x, NaN)": lambda x: torch.clamp_min(x, holed(x.flip(0))),
    "Tensor.clamp_max(NaN)": lambda x: x.clamp_max(holed(x.flip(0))),
    # controls (right before): the NaN on the side that the switch takes
    "maximum(NaN, x')": lambda x: torch.maximum(holed(x), x.flip(0)),
    "fmin(x', NaN)": lambda x: torch.fmin(x.flip(0), holed(x)),
}


@pytest.mark.parametrize("name", list(NAN_PAIRS))
def test_a_nan_operand_while_other_elements_tie(name):
    """At a tie elsewhere in the tensor the pair rule switched on the sign of a - b and took a where that is NaN,
    right only when a is the NaN: maximum / minimum / clamp with a NaN second operand (or bound) gave a's value
    and tangent there instead of NaN, fmax / fmin with a NaN first operand gave NaN instead of b's (silent:
    sum(w * nan_to_num(maximum(x.flip(0), x with NaNs))) had the generalized gradient [5, 4, 3, 2, 1] where every
    active piece has 0 at the NaN elements). Reference: one-sided differences; nearby gradients."""
    op = NAN_PAIRS[name]
    f = lambda x: (op(x).nan_to_num(0.0) * WEIGHTS).sum()
    for d in directions(X):
        assert float(gw.directional_derivative(f, X, d)) == pytest.approx(one_sided(f, X, d)[-1], abs=1e-5)
    pieces = nearby_gradients(f, X)
    for seed in (0, 1, 2):
        g = gw.generalized_grad(f, X, seed=seed)[0]
        assert bool((pieces - g).norm(dim=1).min() < 1e-9)  # one of the active pieces


# -- det at singular matrices ---------------------------------------------------------------------------------

DETS = {
    "rank 1 (2 x 2)": (torch.linalg.det, torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=D)),
    "rank 2 (3 x 3)": (torch.det, torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=D))),
    "Tensor.det, 1 x 1 zero": (lambda a: a.det(), torch.zeros(1, 1, dtype=D)),
    "rank 1 (3 x 3): adj = 0": (torch.linalg.det, torch.outer(torch.tensor([1.0, 2.0, 3.0], dtype=D),
                                                              torch.tensor([1.0, -1.0, 2.0], dtype=D))),
    "batch of a singular and a regular": (lambda a: (torch.linalg.det(a) * torch.tensor([1.0, 2.0], dtype=D)).sum(),
                                          torch.tensor([[[1.0, 2.0], [2.0, 4.0]], [[1.0, 2.0], [3.0, 5.0]]],
                                                       dtype=D)),
    "float32": (torch.linalg.det, torch.tensor([[1.0, 2.0], [2.0, 4.0]])),
    "torch.ops.aten.linalg_det": (torch.ops.aten.linalg_det, torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=D)),
}


@pytest.mark.parametrize("name", list(DETS))
def test_det_at_a_singular_matrix(name):
    """det is smooth, its derivative tr(adj(A) A'); PyTorch's formulas (both modes) give 0 wherever det(A) == 0,
    and gradwise returned that: directional derivative 0 and generalized gradient 0, so stationarity True, at
    [[1, 2], [2, 4]] where the gradient is adj(A)ᵀ = [[4, -2], [-2, 1]] (silent). Reference: one-sided float64
    differences (converging: det is a polynomial) and nearby gradients."""
    f, x = DETS[name]
    tol = 1e-3 if x.dtype == torch.float32 else 1e-6
    for d in directions(x):
        ref = one_sided(f, x.double(), d.double())[-1]
        assert float(gw.directional_derivative(f, x, d)) == pytest.approx(ref, abs=tol)
    g = gw.generalized_grad(f, x, seed=0)[0]
    xr = x.clone().requires_grad_(True)
    if float(torch.linalg.det(x).abs().min()) > 0:  # (no matrix is singular: PyTorch's, bit for bit)
        assert torch.equal(g, torch.autograd.grad(f(xr), xr)[0])
    pieces = nearby_gradients(f, x.double())
    assert float((pieces - g.double().reshape(-1)).norm(dim=1).min()) < 10 * tol
    # adj(A) = 0 at rank n - 2: the gradient is 0, stationary; elsewhere not
    assert gw.stationarity(f, x).stationary is (name == "rank 1 (3 x 3): adj = 0")


# -- i0e at 0 ------------------------------------------------------------------------------------------------

I0E = {
    "i0e, weighted": (lambda x: (torch.special.i0e(x) * torch.tensor([1.0, -2.0, 0.5], dtype=D)).sum(), True),
    "i0e alone (a maximum at 0)": (lambda x: torch.special.i0e(x).sum(), True),
    "i0e + x / 2 (slopes -1/2, 3/2)": (lambda x: (torch.special.i0e(x) + x / 2).sum(), True),
    "i0e + 2 x (slopes 1, 3)": (lambda x: (torch.special.i0e(x) + 2 * x).sum(), False),
}


@pytest.mark.parametrize("name", list(I0E))
def test_i0e_at_zero(name):
    """torch.special.i0e(x) = exp(-|x|) I0(x) kinks at 0 (slopes 1 and -1), which gradwise did not know: it
    returned PyTorch's derivative there, 0 (sgn(0) = 0), as f'(0; d) (silent: -|d| is right). Reference:
    one-sided float64 differences and nearby gradients; away from 0, PyTorch's bit for bit."""
    f, stationary = I0E[name]
    x = torch.tensor([0.0, 0.0, 0.7], dtype=D)
    for d in directions(x):
        assert float(gw.directional_derivative(f, x, d)) == pytest.approx(one_sided(f, x, d)[-1], abs=1e-5)
    pieces = nearby_gradients(f, x)
    for seed in (0, 1):
        g = gw.generalized_grad(f, x, seed=seed)[0]
        assert bool((pieces - g).norm(dim=1).min() < 1e-6)
    # in x[0] alone (the others fixed): slopes -1 and 1 (plus the linear term's) at 0
    first = lambda v: f(torch.cat([v, x[1:]]))
    assert gw.stationarity(first, torch.zeros(1, dtype=D)).stationary is stationary
    away = torch.tensor([0.5, -1.0, 0.7], dtype=D)
    xr = away.clone().requires_grad_(True)
    assert torch.equal(gw.generalized_grad(f, away, seed=0)[0], torch.autograd.grad(f(xr), xr)[0])


# -- binary_cross_entropy near 0 and 1 ----------------------------------------------------------------------

Y = torch.tensor([1.0, 0.0, 0.5, 1.0], dtype=D)
# x, a direction that stays in [0, 1], its steps (in float64 at that scale)
BCE_POINTS = {
    "x = 1e-20 (y = 1)": (torch.tensor([1e-20, 0.3, 0.5, 0.6], dtype=D), torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=D),
                          (1e-26, 1e-27)),
    "x = 1e-50 (log clamped at -100)": (torch.tensor([1e-50, 0.3, 0.5, 0.6], dtype=D),
                                        torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=D), (1e-60, 1e-70)),
    "x = 0 (y = 1)": (torch.tensor([0.0, 0.3, 0.5, 0.6], dtype=D), torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=D),
                      (1e-60, 1e-70)),
    "x = 1 (y = 0), moving another element": (torch.tensor([0.2, 1.0, 0.5, 0.6], dtype=D),
                                              torch.tensor([1.0, 0.0, -1.0, 0.5], dtype=D), (1e-7, 1e-8)),
    "x = 1 - 2^-40": (torch.tensor([0.2, 1 - 2**-40, 0.5, 0.6], dtype=D),
                      torch.tensor([0.0, -1.0, 0.0, 0.0], dtype=D), (2**-52, 2**-53)),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(BCE_POINTS))
def test_binary_cross_entropy_near_0_and_1(name, reduction):
    """PyTorch's derivative of binary_cross_entropy in x, (x - y) / max(x (1 - x), 1e-12), is off where
    x (1 - x) < 1e-12, and gradwise returned it: at x = 1e-20, y = 1 the directional derivative -1e12 for -1e20
    (silent), below e^-100 (the log clamped, f constant) -3.3e11 for 0; its forward mode is NaN as soon as one
    element is 0 or 1, which gradwise returned as f'(x; d). Reference: one-sided float64 differences at steps
    that fit the point; elsewhere PyTorch's gradient, bit for bit."""
    x, d, steps = BCE_POINTS[name]
    f = lambda v: F.binary_cross_entropy(v, Y, weight=torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=D),
                                         reduction=reduction).sum()
    with torch.no_grad():
        ref = [float((f(x + t * d) - f(x)) / t) for t in steps]
    got = float(gw.directional_derivative(f, x, d))
    assert got == pytest.approx(ref[-1], rel=1e-3, abs=1e-6)
    g = gw.generalized_grad(f, x, seed=0)[0]
    assert float(g @ d) == pytest.approx(got, rel=1e-12, abs=1e-12)  # f is differentiable at these points
    xr = x.clone().requires_grad_(True)
    right = (x * (1 - x) >= 1e-12)
    assert torch.equal(g[right], torch.autograd.grad(f(xr), xr)[0][right])


# -- poisson_nll_loss(full=True): the Stirling term's mask at y = 1 --------------------------------------------

POISSON = {  # target, direction of the target, whether f jumps along it
    "y = 1 moving up (the term switches on: a jump)": (torch.tensor([1.0, 2.0, 0.5], dtype=D),
                                                      torch.tensor([1.0, 1.0, 1.0], dtype=D), True),
    "y = 1 moving down (stays masked)": (torch.tensor([1.0, 2.0, 0.5], dtype=D),
                                         torch.tensor([-1.0, 1.0, 1.0], dtype=D), False),
    "no y at 1": (torch.tensor([0.5, 2.0, 3.0], dtype=D), torch.tensor([1.0, -1.0, 1.0], dtype=D), False),
}


@pytest.mark.parametrize("log_input", [True, False])
@pytest.mark.parametrize("name", list(POISSON))
def test_poisson_nll_loss_at_the_stirling_terms_mask(name, log_input):
    """torch.poisson_nll_loss (a C++ composite) masks its Stirling term with target <= 1, a comparison the watch
    does not see (PyTorch's own code compares away from kinks): at target = 1 moving up f jumps by
    0.5 log(2 pi) - 1, yet gradwise answered the masked side's derivative (silent: -0.25 where the one-sided
    differences diverge). Now a port (gradwise._nonsmooth._ports): the comparison's rule decides, a jump is an
    error. Reference: one-sided float64 differences; away from the jump PyTorch's gradient (to rounding)."""
    y, d, jumps = POISSON[name]
    x = torch.tensor([0.5, 0.2, 1.0], dtype=D)
    f = lambda v: F.poisson_nll_loss(x, v, log_input=log_input, full=True)
    if jumps:
        with pytest.raises(NonsmoothError, match=r"jumps"):
            gw.directional_derivative(f, y, d)
        return
    assert float(gw.directional_derivative(f, y, d)) == pytest.approx(one_sided(f, y, d)[-1], abs=1e-5)
    g = lambda a, b: F.poisson_nll_loss(a, b, log_input=log_input, full=True)
    if not bool((y == 1).any()):
        ar, br = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        for got, want in zip(gw.generalized_grad(g, (x, y)), torch.autograd.grad(g(ar, br), (ar, br)), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-15, atol=1e-15)  # (the port's ops: rounding may differ)


@pytest.mark.parametrize("name", ["eigvalsh", "svdvals", "lu"])
def test_trace_names_the_factorisations_own_fix(name):
    """The trace's finding at a repeated eigenvalue or a tied pivot says what it is, not the generic texts (the kink's
    "one element of the subdifferential", false where L and U jump; the singular point's "gw.directional_derivative
    is exact there", where it raises NonsmoothError for the factors)."""
    a = (torch.eye(3, dtype=torch.float64) if name != "lu" else
         torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)).requires_grad_()
    with gw.trace() as report:
        if name == "eigvalsh":
            torch.linalg.eigvalsh(a + a.T)[-1].backward()
        elif name == "svdvals":
            torch.linalg.svdvals(a)[0].backward()
        else:
            torch.linalg.lu(a).U[0, 1].backward()
    fixes = [f.fix for f in report.findings if "linalg" in f.op]
    assert fixes, [(f.kind, f.op) for f in report.findings]
    want = "tied pivot" if name == "lu" else "repeated eigenvalue or singular value"
    assert all(want in fix for fix in fixes), fixes
