"""Review of session 26's merges (d830260..67a0ade): each test failed before its fix.

References are independent of gradwise: the same program with the unused values deleted, run by PyTorch alone.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch

import gradwise as gw

nan = float("nan")
f64 = torch.float64


def _spd_factor(n: int, upper: bool, dtype: torch.dtype) -> torch.Tensor:
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return torch.linalg.cholesky(a @ a.mH + n * torch.eye(n, dtype=dtype), upper=upper).contiguous()


def _unused(n: int, upper: bool) -> torch.Tensor:
    """The triangle a Cholesky factor's forward never reads."""
    ones = torch.ones(n, n, dtype=torch.bool)
    return ones.tril(-1) if upper else ones.triu(1)


def _second_order(program: Callable, leaves: list[torch.Tensor], strong: bool) -> list[torch.Tensor]:
    """The gradients of |first-order gradients|^2 (create_graph=True), under strong zeros or plain PyTorch."""
    leaves = [t.clone().requires_grad_() for t in leaves]
    with gw.strong_zeros() if strong else contextlib.nullcontext():
        first = torch.autograd.grad(program(*leaves), leaves, create_graph=True)
        return list(torch.autograd.grad(sum((g.abs() ** 2).sum() for g in first), leaves, materialize_grads=True))


def _sq(t: torch.Tensor) -> torch.Tensor:
    return (t.abs() ** 2).sum()


# name -> (program(b, factor), upper); cholesky_inverse reads b only in a term of its own
_TRIANGLE_PROGRAMS: dict[str, tuple[Callable, bool]] = {
    "cholesky_solve": (lambda b, f: _sq(torch.cholesky_solve(b, f * 1.5)), False),
    "cholesky_solve upper": (lambda b, f: _sq(torch.cholesky_solve(b, f, upper=True)), True),
    "cholesky_inverse": (lambda b, f: _sq(torch.cholesky_inverse(f)) + _sq(b), False),
    "cholesky_inverse upper": (lambda b, f: _sq(torch.cholesky_inverse(f, upper=True)) + _sq(b), True),
}


@pytest.mark.parametrize("dtype", [f64, torch.complex128])
@pytest.mark.parametrize("name", list(_TRIANGLE_PROGRAMS))
def test_double_backward_through_a_cleaned_factor(name, dtype):
    """create_graph=True through a factor with NaN in its unused triangle: the first-order gradient was recomputed
    on ``factor.tril()``, whose derivative is 0 on the unused triangle, so the second-order gradient of that
    triangle was a finite wrong number (0.2343 where the program with the triangle 0 gives 0.2916): SILENT. The
    cleaned factor now passes the gradient of every entry on, as the factor of the program without the NaN does."""
    program, upper = _TRIANGLE_PROGRAMS[name]
    factor = _spd_factor(4, upper, dtype)
    b = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=dtype)
    poisoned = factor.masked_fill(_unused(4, upper), nan)
    got = _second_order(program, [b, poisoned], strong=True)
    expected = _second_order(program, [b, factor], strong=False)  # the unused triangle 0: the program without it
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [f64, torch.complex128])
def test_double_backward_through_pinv_hermitian(dtype):
    """pinv(A, hermitian=True) with NaN in the upper triangle, create_graph=True: the recomputed gradient read
    ``A.tril() + A.tril(-1).mH``, whose derivative moved the upper triangle's second-order gradient onto the lower
    one (SILENT, finite). The reference: the Hermitian matrix the forward read, as a leaf."""
    a = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=dtype)
    hermitian = a + a.mH
    poisoned = hermitian.masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), nan)
    program = lambda m: _sq(torch.linalg.pinv(m * 2, hermitian=True))
    got = _second_order(program, [poisoned], strong=True)
    expected = _second_order(program, [hermitian], strong=False)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=1e-12)


_PLAIN_F = "def f(x):\n    return x * 2\n"
_GRAD_F = """
def f(x):
    y = (x * x).sum()
    g = torch.autograd.grad([y], [x])[0]
    assert g is not None
    return g
"""


def test_scripted_gradient_is_said_when_another_unit_has_its_name(monkeypatch):
    """Two compilation units (two torch.jit.load'ed files of a `Model`, two CompilationUnits) each hold a function
    of one qualified name: the scan was cached by that name, so once the first (no gradient) was called, the second,
    which takes TorchScript's own gradient, ran plain under strong zeros without the warning. Cached per function."""
    from gradwise._strong_zeros import _contract

    monkeypatch.setattr(_contract, "_warned", set())  # the warning is once per process
    plain, grads = torch.jit.CompilationUnit(_PLAIN_F), torch.jit.CompilationUnit(_GRAD_F)
    assert plain.f.qualified_name == grads.f.qualified_name  # the premise
    x = torch.randn(3, requires_grad=True)
    with gw.strong_zeros():
        plain.f(x)
        with pytest.warns(gw.PlainBackwardWarning, match="TorchScript code f calls"):
            grads.f(x)


def _checkpointed(f: Callable) -> Callable:
    return lambda *ts: torch.utils.checkpoint.checkpoint(f, *ts, use_reentrant=False)


_CHECKPOINTED = {  # name -> program(b, factor): the triangle reader inside a non-reentrant checkpoint
    "cholesky_solve": lambda b, f: _sq(_checkpointed(torch.cholesky_solve)(b, f)),
    "cholesky_inverse": lambda b, f: _sq(_checkpointed(torch.cholesky_inverse)(f)) + _sq(b),
    "pinv hermitian": lambda b, f: _sq(_checkpointed(lambda m: torch.linalg.pinv(m, hermitian=True))(f)) + _sq(b),
}


@pytest.mark.parametrize("name", list(_CHECKPOINTED))
def test_triangle_reader_inside_a_checkpoint(name):
    """A non-reentrant checkpoint around cholesky_solve/cholesky_inverse/pinv under strong zeros crashed on every
    backward, finite ones included (the pre-hook unpacked the saved factor, and the node's own unpack then raised
    "Unpack is being triggered for a tensor that was already unpacked once"). A factor saved through a hook is not
    read: the gradients are PyTorch's, bit for bit."""
    program = _CHECKPOINTED[name]
    b = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=f64)
    factor = _spd_factor(4, False, f64)

    def grads(strong: bool) -> tuple[torch.Tensor, ...]:
        leaves = [b.clone().requires_grad_(), factor.clone().requires_grad_()]
        with gw.strong_zeros() if strong else contextlib.nullcontext():
            return torch.autograd.grad(program(*leaves), leaves)

    for got, expected in zip(grads(strong=True), grads(strong=False), strict=True):
        assert torch.equal(got, expected)


def _pinv_batch() -> tuple[torch.Tensor, Callable]:
    """Matrix 0 finite and unsymmetric (its upper triangle read by pinv's formula), matrix 1 Hermitian with NaN
    in its unused upper triangle."""
    a = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=f64)
    a[1] = (a[1] + a[1].mT).masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), nan)
    return a, lambda m: _sq(torch.linalg.pinv(m, hermitian=True))


def _cholesky_batch() -> tuple[torch.Tensor, Callable]:
    """Matrix 0 with finite garbage in its unused upper triangle (torch.empty's), matrix 1 with NaN there."""
    m = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(4), dtype=f64)
    factor = torch.linalg.cholesky(m @ m.mT + 4 * torch.eye(4, dtype=f64))
    factor[0] += torch.full((4, 4), 3.0, dtype=f64).triu(1)
    factor[1] = factor[1].masked_fill(_unused(4, False), nan)
    b = torch.randn(2, 4, 2, generator=torch.Generator().manual_seed(5), dtype=f64)
    return factor, lambda f: _sq(torch.cholesky_solve(b[: len(f)], f))


@pytest.mark.parametrize("batch", [_pinv_batch, _cholesky_batch], ids=["pinv hermitian", "cholesky_solve"])
def test_finite_matrix_of_a_batch_keeps_pytorchs_gradient(batch):
    """A batch of factors, one with NaN in its unused triangle: the hook recomputed the gradient of every matrix,
    so a finite matrix's changed with its neighbour's NaN (pinv: by 147, its finite unsymmetric upper triangle
    mirrored away; cholesky_solve: its finite garbage read as 0), against "a finite unused triangle is left as
    PyTorch computes it": SILENT. Now only the matrices holding the NaN/Inf are recomputed."""
    values, program = batch()

    def grads(m: torch.Tensor, strong: bool) -> torch.Tensor:
        m = m.clone().requires_grad_()
        with gw.strong_zeros() if strong else contextlib.nullcontext():
            return torch.autograd.grad(program(m), m)[0]

    got = grads(values, strong=True)
    assert torch.equal(got[0], grads(values[:1], strong=False)[0])  # PyTorch's, for the finite matrix alone
    assert bool(got[1].isfinite().all())


@pytest.mark.parametrize("edge", [False, True], ids=["inputs=[x]", "inputs=[GradientEdge of x]"])
def test_watch_reads_the_grad_of_a_gradient_edge_input(edge):
    """backward(inputs=[get_gradient_edge(x)]) under gw.watch(): the watch kept only the tensors among ``inputs``,
    so it checked no gradient and said "No NaN/Inf gradients" of x.grad holding a NaN. A leaf's edge now stands for
    the leaf: the same report as inputs=[x]."""
    x = torch.tensor([4.0, 1.0, -1.0], dtype=f64, requires_grad=True)
    with gw.watch() as report:
        y = (torch.where(x > 0, x.sqrt(), 0.0) * 2.0).sum()
        y.backward(inputs=[torch.autograd.graph.get_gradient_edge(x) if edge else x])
    assert bool(x.grad.isnan().any())  # the premise: the sliced-away sqrt(-1) reached x's gradient
    assert [f.kind for f in report.findings] == ["contamination"], str(report)


def test_watch_with_a_non_leaf_gradient_edge_input():
    """Control: a non-leaf's edge fills no .grad; the watch checks nothing there and does not fail."""
    x = torch.tensor([4.0, -1.0], dtype=f64, requires_grad=True)
    with gw.watch() as report:
        m = x * 2.0
        (m * 3.0).sum().backward(inputs=[torch.autograd.graph.get_gradient_edge(m)])
    assert not report.findings and x.grad is None


def test_pinv_hermitian_complex_diagonal_is_read_real():
    """pinv(A, hermitian=True) of a complex A with NaN in its upper triangle and imaginary parts on its diagonal:
    eigh reads the diagonal's real part only (the forward equals that of the Hermitian matrix with a real
    diagonal), but the recomputed gradient kept the imaginary parts, off by 4.6e4 from the program without the
    unused values: SILENT. The matrix the formula reads now is the Hermitian one the forward read."""
    a = torch.randn(4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.complex128)
    lower = a.tril(-1)
    read = lower + lower.mH + torch.diag_embed(a.diagonal().real.to(a.dtype))  # what eigh reads of a
    poisoned = (lower + torch.diag_embed(a.diagonal())).masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), nan)
    program = lambda m: _sq(torch.linalg.pinv(m, hermitian=True))
    torch.testing.assert_close(torch.linalg.pinv(poisoned.nan_to_num(), hermitian=True),
                               torch.linalg.pinv(read, hermitian=True), rtol=0, atol=0)  # the premise

    def grad(m: torch.Tensor, strong: bool) -> torch.Tensor:
        m = m.clone().requires_grad_()
        with gw.strong_zeros() if strong else contextlib.nullcontext():
            return torch.autograd.grad(program(m), m)[0]

    torch.testing.assert_close(grad(poisoned, strong=True), grad(read, strong=False), rtol=1e-10, atol=1e-10)
