"""Strong zeros on defects left open by session 26's hunts, float64.

``addmm``, ``addmv``, ``addbmm`` and ``baddbmm`` with ``alpha=0``: a BLAS kernel never reads the product, so a
NaN/Inf in an operand leaves the output finite, while the backward formula scales ``g @ b^T`` by alpha after the
product (0 x NaN). The reference is the same program with the product term deleted (``beta * input``): the
operands' gradients are exactly 0 and the input's unchanged. Controls: kernels that do read the product at
alpha = 0 (CPU's small ``baddbmm``, ``addr``) put the NaN into the output, and the gradient keeps it.

Nonsmooth: ``torch.ops.aten.binary_cross_entropy`` called directly (and ``torch._C._nn``'s, F's kernel) missed
the rule ``F.binary_cross_entropy`` gets near 0 and 1 (its signature is F's, so the aten routes left it out).
"""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import gradwise as gw
from test_hunt_ns2 import BCE_POINTS, Y
from test_hunt_strong_zeros import HOWS, _grads  # gw.grad / gw.backward / a block around .backward(inputs=)

nan, inf = float("nan"), float("inf")
f64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape: int, seed: int = 0, bad: tuple[tuple[int, ...], float] | None = None) -> torch.Tensor:
    t = torch.randn(*shape, generator=_gen(seed), dtype=f64)
    if bad is not None:
        t[bad[0]] = bad[1]
    return t.requires_grad_()


# name -> (op with alpha=0 of (input, a, b), input shape, a shape, b shape, where a and b hold NaN/Inf, beta)
Product = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ZERO_ALPHA: dict[str, tuple[Product, tuple, tuple, tuple, tuple, float]] = {
    "addmm_nan_b": (lambda i, a, b: torch.addmm(i, a, b, alpha=0), (3, 4), (3, 5), (5, 4), (None, ((1, 2), nan)), 1),
    "addmm_nan_a": (lambda i, a, b: torch.addmm(i, a, b, alpha=0), (3, 4), (3, 5), (5, 4), (((0, 0), nan), None), 1),
    "addmm_inf_both": (lambda i, a, b: torch.addmm(i, a, b, alpha=0, beta=2), (3, 4), (3, 5), (5, 4),
                       (((0, 1), inf), ((2, 3), -inf)), 2),
    "addmm_bias_1d": (lambda i, a, b: torch.addmm(i, a, b, alpha=0.0), (4,), (3, 5), (5, 4), (None, ((0, 0), nan)), 1),
    "addmm_transposed": (lambda i, a, b: torch.addmm(i, b.t(), a.t(), alpha=0), (4, 3), (3, 5), (5, 4),
                         (((2, 4), nan), None), 1),
    "addmm_inplace": (lambda i, a, b: (i * 1).addmm_(a, b, alpha=0), (3, 4), (3, 5), (5, 4),
                      (((1, 1), nan), ((0, 0), inf)), 1),
    "addmv_nan_vec": (lambda i, a, b: torch.addmv(i, a, b, alpha=0), (3,), (3, 5), (5,), (None, ((2,), nan)), 1),
    "addmv_nan_mat": (lambda i, a, b: torch.addmv(i, a, b, alpha=0, beta=0.5), (3,), (3, 5), (5,),
                      (((1, 1), nan), None), 0.5),
    "addbmm": (lambda i, a, b: torch.addbmm(i, a, b, alpha=0), (6, 7), (2, 6, 8), (2, 8, 7),
               (((0, 1, 2), nan), ((1, 3, 3), inf)), 1),
    "baddbmm_blas": (lambda i, a, b: torch.baddbmm(i, a, b, alpha=0), (2, 8, 8), (2, 8, 8), (2, 8, 8),
                     (((1, 2, 3), nan), None), 1),
}


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("name", sorted(ZERO_ALPHA))
def test_zero_alpha_product_is_deleted(name, how):
    """The gradient of beta * input + 0 * (a @ b) is that of beta * input: exactly 0 for a and b (which hold a
    NaN/Inf the forward never read), the input's unchanged."""
    op, ishape, ashape, bshape, (a_bad, b_bad), beta = ZERO_ALPHA[name]
    i, a, b = _rand(*ishape, seed=1), _rand(*ashape, seed=2, bad=a_bad), _rand(*bshape, seed=3, bad=b_bad)
    out = op(i, a, b)
    assert out.isfinite().all(), "the kernel reads the product: not this test's case"
    weights = torch.rand(out.shape, generator=_gen(4), dtype=f64) + 0.5
    loss = (out * weights).sum()
    plain = torch.autograd.grad(loss, [i, a, b], retain_graph=True)
    assert not all(g.isfinite().all() for g in plain), "plain PyTorch is contaminated"
    reference = (beta * i.expand(out.shape) * weights).sum()  # the program with the product term deleted
    (expected_i,) = torch.autograd.grad(reference, [i])
    gi, ga, gb = _grads(how, loss, [i, a, b])
    assert torch.equal(gi, expected_i)
    assert torch.equal(ga, torch.zeros_like(a)) and torch.equal(gb, torch.zeros_like(b))


def test_zero_alpha_product_below_another_op():
    """The operand is made by an op (a * 1.5) from a NaN leaf: the structural zero reaches that op's saved tensors
    too, and the leaf's gradient is 0, as without the term."""
    i, a, b = _rand(3, 4, seed=1), _rand(3, 5, seed=2, bad=((0, 0), nan)), _rand(5, 4, seed=3)
    loss = torch.addmm(i, a * 1.5, b.exp(), alpha=0).sum()
    assert loss.isfinite() and not torch.autograd.grad(loss, [b], retain_graph=True)[0].isfinite().all()
    gi, ga, gb = gw.grad(loss, [i, a, b])
    assert torch.equal(gi, torch.ones_like(i)) and not ga.any() and not gb.any()


def test_zero_alpha_infinite_sensitivity():
    """sqrt of beta * input + 0 * (a @ b) at an input of 0: an infinite sensitivity from above meets alpha = 0 inside
    the node (inf x 0 = NaN for a and b). Without the term, a and b get 0; the input's infinite derivative stays."""
    i = torch.tensor([[0.0, 1.0], [4.0, 9.0]], dtype=f64, requires_grad=True)
    a, b = _rand(2, 3, seed=2), _rand(3, 2, seed=3)
    loss = torch.addmm(i, a, b, alpha=0).sqrt().sum()
    plain = torch.autograd.grad(loss, [a, b], retain_graph=True)
    assert loss.isfinite() and not plain[0].isfinite().all()
    gi, ga, gb = gw.grad(loss, [i, a, b])
    (expected_i,) = torch.autograd.grad(i.sqrt().sum(), [i])
    assert torch.equal(gi, expected_i) and gi[0, 0] == inf
    assert not ga.any() and not gb.any()


@pytest.mark.parametrize("name", ["baddbmm_small", "addr", "addmm_nonzero_alpha"])
def test_product_the_forward_read_keeps_its_nan(name):
    """Controls: where the kernel computes 0 x NaN (CPU's baddbmm below its BLAS size, addr) the output holds the
    NaN, and so does the gradient; with alpha != 0 the product is used."""
    i = _rand(2, 2, 2, seed=1) if name == "baddbmm_small" else _rand(2, 2, seed=1)
    if name == "baddbmm_small":
        a, b = _rand(2, 2, 2, seed=2, bad=((0, 0, 0), nan)), _rand(2, 2, 2, seed=3)
        out = torch.baddbmm(i, a, b, alpha=0)
    elif name == "addr":
        a, b = _rand(2, seed=2, bad=((0,), nan)), _rand(2, seed=3)
        out = torch.addr(i, a, b, alpha=0)
    else:
        a, b = _rand(2, 3, seed=2, bad=((0, 0), nan)), _rand(3, 2, seed=3)
        out = torch.addmm(i, a, b, alpha=1e-300)
    loss = out[0].sum()
    assert not loss.isfinite()
    plain = torch.autograd.grad(loss, [i, a, b], retain_graph=True)
    got = gw.grad(loss, [i, a, b])
    for g, p in zip(got, plain, strict=True):
        assert torch.equal(g.isnan(), p.isnan()) and torch.equal(g.nan_to_num(), p.nan_to_num())


@pytest.mark.parametrize("op", ["addmm", "addmv", "addbmm", "baddbmm"])
def test_zero_beta_nan_input_is_already_unread(op):
    """beta = 0: the input is not read (documented) and the backward never multiplies it: PyTorch's gradients are
    finite already, and gradwise's are PyTorch's bit for bit."""
    shapes = {"addmm": ((3, 4), (3, 5), (5, 4)), "addmv": ((3,), (3, 5), (5,)),
              "addbmm": ((3, 4), (2, 3, 5), (2, 5, 4)), "baddbmm": ((2, 3, 4), (2, 3, 5), (2, 5, 4))}[op]
    i = _rand(*shapes[0], seed=1, bad=((0,) * len(shapes[0]), nan))
    a, b = _rand(*shapes[1], seed=2), _rand(*shapes[2], seed=3)
    loss = getattr(torch, op)(i, a, b, beta=0).square().sum()
    assert loss.isfinite()
    plain = torch.autograd.grad(loss, [i, a, b], retain_graph=True)
    assert all(p.isfinite().all() for p in plain)
    for g, p in zip(gw.grad(loss, [i, a, b]), plain, strict=True):
        assert torch.equal(g, p)


# -- binary_cross_entropy through its aten schema ------------------------------------------------------------

_W = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=f64)
BCE_CALLS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "aten packet, mean by default": lambda v: torch.ops.aten.binary_cross_entropy(v, Y, _W),
    "aten.default, reduction=none": lambda v: torch.ops.aten.binary_cross_entropy.default(v, Y, _W, 0).sum(),
    "aten.default, reduction=sum as a keyword": lambda v: torch.ops.aten.binary_cross_entropy.default(
        v, Y, reduction=2),
    "torch._C._nn, its default": lambda v: torch._C._nn.binary_cross_entropy(v, Y, _W).sum(),
    "torch._C._nn, mean": lambda v: torch._C._nn.binary_cross_entropy(v, Y, None, 1) * 3,
}


@pytest.mark.parametrize("call", list(BCE_CALLS))
@pytest.mark.parametrize("point", list(BCE_POINTS))
def test_binary_cross_entropy_called_through_its_aten_schema(point, call):
    """The directional derivative near 0 and 1 is the formula's for every route to the kernel, as for
    F.binary_cross_entropy (PyTorch's (x - y) / max(x (1 - x), 1e-12) was returned: -1e12 for -1e20 at x = 1e-20,
    NaN at 0 and 1). Reference: one-sided float64 differences; elsewhere PyTorch's gradient, bit for bit."""
    x, d, steps = BCE_POINTS[point]
    f = BCE_CALLS[call]
    with torch.no_grad():
        ref = [float((f(x + t * d) - f(x)) / t) for t in steps]
    got = float(gw.directional_derivative(f, x, d))
    assert got == pytest.approx(ref[-1], rel=1e-3, abs=1e-6)
    g = gw.generalized_grad(f, x, seed=0)[0]
    assert float(g @ d) == pytest.approx(got, rel=1e-12, abs=1e-12)
    xr = x.clone().requires_grad_(True)
    right = x * (1 - x) >= 1e-12
    assert torch.equal(g[right], torch.autograd.grad(f(xr), xr)[0][right])


# -- norms and variances PyTorch clamps under no_grad ---------------------------------------------------------

_X2 = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.1, -1.0]], dtype=f64)
# name -> (x1, x2): a row of x1 at 0, inside the clamp (0 < norm < eps = 1e-8), at it, or away
COSINE_POINTS = {
    "x1 = 0": (torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], dtype=f64), _X2),
    "x2 = 0": (_X2, torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], dtype=f64)),
    "both 0": (torch.zeros(2, 3, dtype=f64), torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], dtype=f64)),
    "0 < |x1| < eps": (torch.tensor([[3e-9, -1e-9, 2e-9], [1.0, 2.0, 3.0]], dtype=f64), _X2),
    "|x1| = eps": (torch.tensor([[1e-8, 0.0, 0.0], [1.0, 2.0, 3.0]], dtype=f64), _X2),
}


def _cosine_routes() -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    return {"F": lambda a, b: F.cosine_similarity(a, b).sum(),
            "module, dim -1": lambda a, b: torch.nn.CosineSimilarity(dim=-1)(a, b).sum(),
            "aten": lambda a, b: torch.ops.aten.cosine_similarity.default(a, b, 1, 1e-8).sum()}


@pytest.mark.parametrize("route", list(_cosine_routes()))
@pytest.mark.parametrize("point", list(COSINE_POINTS))
def test_cosine_similarity_at_and_inside_its_clamp(point, route):
    """cosine_similarity divides by max(||x||, eps): near a zero vector it is x / eps . x2 / ||x2||, linear. gradwise
    raised at x = 0 (the norm's kink, which the clamp makes irrelevant), and inside the clamp (0 < ||x|| < eps) it
    returned PyTorch's gradient, which goes straight through the clamp (2.26e7 for 4.36e7: SILENT). Reference:
    one-sided float64 differences of F.cosine_similarity itself, along every coordinate of each input."""
    f = _cosine_routes()[route]
    xs = COSINE_POINTS[point]
    for k in range(2):
        for i in range(xs[k].numel()):
            for sign in (1.0, -1.0):
                ds = [torch.zeros_like(xs[0]), torch.zeros_like(xs[1])]
                ds[k].view(-1)[i] = sign
                # a step inside the clamp's region (1e-8 wide) for a row inside it, a rounding-safe one elsewhere
                step = 1e-15 if float(xs[k][i // 3].norm()) < 1e-6 else 1e-7
                with torch.no_grad():
                    ref = float((f(*(x + step * d for x, d in zip(xs, ds, strict=True))) - f(*xs)) / step)
                got = float(gw.directional_derivative(f, xs, tuple(ds)))
                assert got == pytest.approx(ref, rel=1e-5, abs=1e-6), (k, i, sign)
    if point != "|x1| = eps":  # differentiable there: the gradient is the derivative's
        g = gw.generalized_grad(f, xs, seed=0)
        for k in range(2):
            for i in range(xs[k].numel()):
                ds = [torch.zeros_like(xs[0]), torch.zeros_like(xs[1])]
                ds[k].view(-1)[i] = 1.0
                want = float(gw.directional_derivative(f, xs, tuple(ds)))
                assert float(g[k].view(-1)[i]) == pytest.approx(want, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_cosine_similarity_away_from_its_clamp_is_pytorchs(dtype):
    """Norms above eps: gradwise's generalized gradient is PyTorch's, bit for bit (broadcast rows included)."""
    a = torch.randn(4, 5, generator=_gen(0), dtype=dtype)
    b = torch.randn(1, 5, generator=_gen(1), dtype=dtype)
    f = lambda x, y: (F.cosine_similarity(x, y) * torch.arange(4, dtype=dtype)).sum()
    xr, yr = a.clone().requires_grad_(), b.clone().requires_grad_()
    for got, want in zip(gw.generalized_grad(f, (a, b)), torch.autograd.grad(f(xr, yr), (xr, yr)), strict=True):
        assert torch.equal(got, want)


_IN, _TARGET = torch.tensor([0.5, 1.0, -0.3, 2.0], dtype=f64), torch.tensor([0.2, 1.5, 0.1, 2.5], dtype=f64)
# var (eps = 1e-6): below eps, at eps, above
GAUSSIAN_VARS = {"below eps": torch.tensor([1e-8, 0.5, 2.0, 0.0], dtype=f64),
                 "at eps": torch.tensor([1e-6, 0.5, 2.0, 1e-6], dtype=f64),
                 "above": torch.tensor([0.1, 0.5, 2.0, 3.0], dtype=f64)}


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("point", list(GAUSSIAN_VARS))
def test_gaussian_nll_loss_differentiates_its_clamp(point, reduction, full):
    """F.gaussian_nll_loss clamps var at eps in place under no_grad (PyTorch's gradient ignores the clamp). gradwise
    returned that unclamped slope as f'(x; d): -4.5e10 along a var of 1e-8 where f is constant, +8e10 moving a var
    at eps down (SILENT). The nonsmooth functions differentiate the loss computed (docs/nonsmooth.md). Reference:
    one-sided float64 differences of F.gaussian_nll_loss itself; above eps PyTorch's gradient, bit for bit."""
    var = GAUSSIAN_VARS[point]
    f = lambda i, v: F.gaussian_nll_loss(i, _TARGET, v, full=full, reduction=reduction).sum()
    xs = (_IN, var)
    for k in range(2):
        for j in range(4):
            for sign in (1.0, -1.0):
                if k == 1 and sign < 0 and var[j] == 0:
                    continue  # a negative var: refused
                ds = [torch.zeros(4, dtype=f64), torch.zeros(4, dtype=f64)]
                ds[k][j] = sign
                with torch.no_grad():
                    if k == 0:  # a quadratic in the input: central differences are exact but for rounding
                        ref = float((f(_IN + 1e-4 * ds[0], var) - f(_IN - 1e-4 * ds[0], var)) / 2e-4)
                    else:  # one-sided, inside the clamp's region (1e-6 wide) where var is in it
                        step = 1e-16 if var[j] <= 1e-6 else 1e-7
                        ref = float((f(_IN, var + step * ds[1]) - f(*xs)) / step)
                got = float(gw.directional_derivative(f, xs, tuple(ds)))
                assert got == pytest.approx(ref, rel=1e-4, abs=1e-3), (k, j, sign)
    if point == "above":
        xr = [x.clone().requires_grad_() for x in xs]
        for got, want in zip(gw.generalized_grad(f, xs), torch.autograd.grad(f(*xr), xr), strict=True):
            assert torch.equal(got, want)


def test_gaussian_nll_loss_float_and_homoscedastic_var():
    """A var of one dim less (unsqueezed) and a float var take PyTorch's own broadcasting: one-sided float64
    differences in var (0 along the var below eps) and central ones in the input."""
    i = torch.randn(3, 2, generator=_gen(0), dtype=f64)
    t = torch.randn(3, 2, generator=_gen(1), dtype=f64)
    v = torch.tensor([1e-9, 0.5, 2.0], dtype=f64)
    f = lambda x, w: F.gaussian_nll_loss(x, t, w)
    for d, step in ((torch.tensor([1.0, 0.0, 0.0], dtype=f64), 1e-16),
                    (torch.tensor([0.0, 1.0, -1.0], dtype=f64), 1e-6)):
        with torch.no_grad():  # (one-sided below eps; central where f is smooth)
            ref = float((f(i, v + step * d) - f(i, v)) / step) if step < 1e-8 else \
                float((f(i, v + step * d) - f(i, v - step * d)) / (2 * step))
        got = float(gw.directional_derivative(f, (i, v), (torch.zeros_like(i), d)))
        assert got == pytest.approx(ref, rel=1e-5, abs=1e-9)
    d = torch.randn(3, 2, generator=_gen(2), dtype=f64)
    g = lambda x: F.gaussian_nll_loss(x, t, 1e-7)
    with torch.no_grad():
        ref = float((g(i + 1e-4 * d) - g(i - 1e-4 * d)) / 2e-4)
    assert float(gw.directional_derivative(g, i, d)) == pytest.approx(ref, rel=1e-9)


# -- mm.out / bmm.out with both operands carrying supports (peer test_modules, nn.LinearCrossEntropyLoss) ------------


class _OutMM(torch.autograd.Function):
    """A backward that multiplies two tensors that both carry supports into a preallocated buffer (mm.out)."""

    @staticmethod
    def forward(ctx, a):
        return a * 1.0

    @staticmethod
    def backward(ctx, g):
        buf = torch.empty(g.shape[1], g.shape[1], dtype=g.dtype)
        torch.mm(g.t(), g * 2.0, out=buf)
        return g * buf.sum()


def test_mm_out_with_two_tracked_operands_is_the_deleted_programs():
    """mm.out in a backward whose operands both carry structural zeros raised inside gradwise ("aten::mm() is
    missing value for argument 'out'", the rule's pieces called the out= overload); it runs on the functional form
    and writes into out. Reference: the same program on the kept rows only."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64)
    x[4:] = float("nan")
    x.requires_grad_()
    with gw.strong_zeros():
        (g,) = torch.autograd.grad(_OutMM.apply(torch.tanh(x))[:4].sum(), x)
    kept = x.detach()[:4].clone().requires_grad_()
    (ref,) = torch.autograd.grad(_OutMM.apply(torch.tanh(kept)).sum(), kept)
    torch.testing.assert_close(g[:4], ref, rtol=0, atol=0)
    assert (g[4:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_loss_finite_is_pytorchs(dtype):
    """nn.LinearCrossEntropyLoss's chunked backward (mm into out= buffers) under gw.strong_zeros() on finite
    data: PyTorch's gradients bit for bit (it raised inside gradwise: peer test_modules' non_contiguous test)."""
    if not hasattr(torch.nn, "LinearCrossEntropyLoss"):
        pytest.skip("torch.nn.LinearCrossEntropyLoss is not in this torch")
    torch.manual_seed(0)
    loss_fn = torch.nn.LinearCrossEntropyLoss(8, 5, dtype=dtype)
    x = torch.randn(4, 8, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 5, (4,))
    wrt = (x, *loss_fn.parameters())
    plain = torch.autograd.grad(loss_fn(x, t), wrt)
    with gw.strong_zeros():
        got = torch.autograd.grad(loss_fn(x, t), wrt)
    for a, b in zip(got, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
