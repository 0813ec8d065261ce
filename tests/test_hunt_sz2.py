"""Strong zeros on programs a second hunt found contaminated, float64.

``cholesky_solve(B, L)`` and ``cholesky_inverse(L)`` read one triangle of the Cholesky factor ``L``; the other
triangle is unused (``torch.empty``'s garbage where a factor is filled in place, a NaN). PyTorch's backward
formulas multiply the whole factor, so a NaN/Inf in the unused triangle made the gradient of every entry of ``L``
(and of what ``L`` was computed from) NaN. The reference is the same program with the unused triangle 0; the
control puts the NaN in the used triangle, where it must stay. ``linalg.pinv(A, hermitian=True)`` reads the lower
triangle of ``A`` and its formula the whole matrix: the reference there is the Hermitian matrix the forward read
(the lower triangle mirrored).
"""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import gradwise as gw
from test_hunt_strong_zeros import _grads  # gw.grad / gw.backward / a block around .backward(inputs=)

nan, inf = float("nan"), float("inf")
f64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _factor(batch: tuple[int, ...], n: int, upper: bool, dtype: torch.dtype = f64) -> torch.Tensor:
    a = torch.randn(*batch, n, n, generator=_gen(0), dtype=dtype)
    lower = torch.linalg.cholesky(a @ a.mH + n * torch.eye(n, dtype=dtype))
    return lower.mH.contiguous() if upper else lower


def _unused(n: int, upper: bool) -> torch.Tensor:
    """The entries of the factor its forward does not read."""
    ones = torch.ones(n, n, dtype=torch.bool)
    return ones.tril(-1) if upper else ones.triu(1)


def _sq(z: torch.Tensor) -> torch.Tensor:
    return (z * z.conj()).real.sum()


def _solve(upper: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def program(factor: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _sq(torch.cholesky_solve(b, factor * 1.5, upper=upper))
    return program


def _inverse(upper: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def program(factor: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _sq(torch.cholesky_inverse(factor * 1.5, upper=upper) @ b)
    return program


# name -> (program, factor batch, rhs shape, upper, dtype)
CASES = {
    "solve_lower": (_solve(False), (), (4, 2), False, f64),
    "solve_upper": (_solve(True), (), (4, 2), True, f64),
    "solve_batched": (_solve(False), (3,), (3, 4, 2), False, f64),
    "solve_broadcast_factor": (_solve(True), (), (3, 4, 2), True, f64),
    "solve_complex": (_solve(False), (2,), (2, 4, 1), False, torch.complex128),
    "inverse_lower": (_inverse(False), (), (4, 2), False, f64),
    "inverse_upper_batched": (_inverse(True), (2,), (2, 4, 2), True, f64),
}


def _case(name: str, bad: float, where: str = "unused"):
    program, batch, b_shape, upper, dtype = CASES[name]
    clean = _factor(batch, 4, upper, dtype)
    mask = _unused(4, upper)
    if where == "used":
        mask = ~mask
    factor = clean.masked_fill(mask, bad).requires_grad_()
    b = torch.randn(*b_shape, generator=_gen(1), dtype=dtype).requires_grad_()
    return program, factor, b, clean.masked_fill(_unused(4, upper), 0)


@pytest.mark.parametrize("how", ["grad", "backward", "context"])
@pytest.mark.parametrize("bad", [nan, inf])
@pytest.mark.parametrize("name", list(CASES))
def test_cholesky_unused_triangle(name, bad, how):
    program, factor, b, zeroed = _case(name, bad)
    loss = program(factor, b)
    assert loss.isfinite()
    plain = torch.autograd.grad(loss, factor, retain_graph=True)[0]
    assert not plain.isfinite().all(), "plain PyTorch is contaminated"
    ref_factor, ref_b = zeroed.clone().requires_grad_(), b.detach().clone().requires_grad_()
    expected = torch.autograd.grad(program(ref_factor, ref_b), (ref_factor, ref_b))
    for g, e in zip(_grads(how, loss, [factor, b]), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_cholesky_used_triangle_nan_stays(name):
    """Control: a NaN in the triangle the forward reads is used; its gradient stays NaN."""
    program, factor, b, _ = _case(name, nan, where="used")
    assert not gw.grad(program(factor, b), factor)[0].isfinite().all()


@pytest.mark.parametrize("name", list(CASES))
def test_cholesky_finite_unused_triangle_is_pytorchs(name):
    """A finite unused triangle (garbage) is left as PyTorch computes it, bit for bit (the finite path)."""
    program, factor, b, _ = _case(name, 5.0)
    loss = program(factor, b)
    expected = torch.autograd.grad(loss, (factor, b), retain_graph=True)
    for g, e in zip(gw.grad(loss, (factor, b)), expected, strict=True):
        assert torch.equal(g, e)


def test_cholesky_factor_filled_in_place():
    """A factor built the way hand-written Gaussian-process code does: ``torch.empty`` filled below the diagonal
    from a parameter, the rest left as it was (here NaN). The parameter's gradient is that of the clean program."""
    n = 4
    rows, cols = torch.tril_indices(n, n)
    theta = torch.randn(rows.numel(), generator=_gen(2), dtype=f64).requires_grad_()
    y = torch.randn(n, 1, generator=_gen(3), dtype=f64)

    def nll(theta: torch.Tensor, fill: float) -> torch.Tensor:
        factor = torch.full((n, n), fill, dtype=f64)
        factor[rows, cols] = theta.exp() * (rows == cols) + theta * (rows != cols)  # a positive diagonal
        return (y.mT @ torch.cholesky_solve(y, factor)).sum() + torch.cholesky_inverse(factor).trace()

    loss = nll(theta, nan)
    assert not torch.autograd.grad(loss, theta, retain_graph=True)[0].isfinite().all()
    expected = torch.autograd.grad(nll(theta, 0.0), theta)[0]
    torch.testing.assert_close(gw.grad(loss, theta)[0], expected, rtol=1e-12, atol=1e-12)


def test_cholesky_nodes_never_take_the_plain_path():
    """The hooks are installed by the strong pass only: the plan must never run these nodes' backward plain."""
    from gradwise._strong_zeros._node_facts import NODE_FACTS
    from gradwise._strong_zeros._triangles import TRIANGLE_READERS

    assert not set(TRIANGLE_READERS) & set(NODE_FACTS)


@pytest.mark.parametrize("bad", [nan, inf])
@pytest.mark.parametrize(("batch", "dtype"), [((), f64), ((2,), f64), ((2,), torch.complex128)])
def test_pinv_hermitian_unused_upper_triangle(batch, dtype, bad):
    a = torch.randn(*batch, 4, 4, generator=_gen(4), dtype=dtype)
    hermitian = a + a.mH
    x = hermitian.masked_fill(_unused(4, False), bad).requires_grad_()

    def program(m: torch.Tensor) -> torch.Tensor:
        return _sq(torch.linalg.pinv(m * 2, hermitian=True))

    loss = program(x)
    assert loss.isfinite()
    assert not torch.autograd.grad(loss, x, retain_graph=True)[0].isfinite().all()
    ref = hermitian.clone().requires_grad_()
    assert torch.equal(gw.grad(loss, x)[0], torch.autograd.grad(program(ref), ref)[0])


def test_pinv_used_nan_stays():
    """Control: a NaN the loss really reads (a weight on the result) stays in the gradient, while the unused
    upper triangle's NaN is dropped."""
    a = torch.randn(4, 4, generator=_gen(5), dtype=f64)
    x = (a + a.mT).masked_fill(_unused(4, False), nan).requires_grad_()
    w = torch.ones(4, 4, dtype=f64)
    w[1, 2] = nan
    g = gw.grad((torch.linalg.pinv(x, hermitian=True) * w).sum(), x)[0]
    assert not g.isfinite().all()
