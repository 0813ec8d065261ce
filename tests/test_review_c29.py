"""Review of session 29's compiled-backward graph forms (logaddexp's weights, cholesky_solve's factor) and the
``_foreach_mul`` rule.

A compiled backward's graph tells which forward op each of its ops belongs to (``seq_nr``) and that it is a backward
formula's (``autograd_backward``), but a custom ``autograd.Function``'s backward carries both too: a user's formula
of the same shape is no logaddexp and no cholesky_solve, and keeps PyTorch's gradient, as in eager (where its node
is the custom one). References are independent: plain PyTorch on the same compiled program (its NaN stays where the
program reads the NaN), or on the program with the unused values deleted.
"""

from __future__ import annotations

import math

import pytest
import torch

import gradwise as gw
from _compiling import fresh_dynamo  # noqa: F401 (an autouse fixture: every test here)

nan, inf = math.nan, math.inf


class _HandWeights(torch.autograd.Function):
    """sigmoid(a - b) whose backward a user wrote by hand in logaddexp's shape: g / (1 + exp(b - a))."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return torch.sigmoid(a - b)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = ctx.saved_tensors
        return g / (1 + torch.exp(b - a)), g / (1 + torch.exp(a - b))


class _Preconditioned(torch.autograd.Function):
    """x @ b (reads every entry of x) whose backward preconditions with cholesky_solve(g, x) and multiplies by x."""

    @staticmethod
    def forward(ctx, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(b, x)
        return x @ b

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, x = ctx.saved_tensors
        return torch.cholesky_solve(g, x), -(g @ b.mT) @ x


def _hand_weights_case() -> tuple:
    a = torch.tensor([-inf, 0.5, 1.0], dtype=torch.float64)
    b = torch.tensor([0.0, 0.3, -2.0], dtype=torch.float64)
    w = torch.tensor([nan, 1.0, 1.0], dtype=torch.float64)  # the output at a = -inf is read: NaN * 0

    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (_HandWeights.apply(a, b) * w).sum()

    return f, (a, b)


def _preconditioned_case() -> tuple:
    g = torch.Generator().manual_seed(1)
    m = torch.randn(3, 3, generator=g, dtype=torch.float64)
    x = torch.linalg.cholesky(m @ m.mT + 3 * torch.eye(3, dtype=torch.float64))
    x[0, 2] = nan  # above the diagonal, and x @ b reads it: the output is NaN
    b = torch.randn(3, 2, generator=g, dtype=torch.float64)

    def f(b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _Preconditioned.apply(b, x).sum()

    return f, (b, x)


# dynamo instantiates torch.autograd.Function to trace any custom Function's ctx (torch 2.13), and warns about it
@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")
@pytest.mark.parametrize("case", [_hand_weights_case, _preconditioned_case], ids=["logaddexp-shape", "cholesky_solve"])
def test_a_custom_functions_backward_of_the_same_shape_keeps_pytorchs_gradient(case):
    """SILENT before the fix (main a183bcc): a custom Function's backward of logaddexp's weight shape got logaddexp's
    rule (its a-gradient at a = -inf was 0 where PyTorch's and eager gradwise's are NaN), and one calling
    cholesky_solve(g, x) had x's other uses read with a triangle as 0 (a finite gradient for an x whose NaN the
    forward reads); no warning either way. The graph rewrites now need the graph to name the user's call."""
    f, inputs = case()
    plain_in = [t.clone().requires_grad_(True) for t in inputs]
    want = torch.autograd.grad(torch.compile(f, backend="aot_eager")(*plain_in), plain_in)
    torch._dynamo.reset()
    strong_in = [t.clone().requires_grad_(True) for t in inputs]
    with pytest.warns(gw.CompiledBackwardWarning):  # the NaN is kept, and reported (silent before, cholesky_solve's)
        got = gw.grad(torch.compile(f, backend="aot_eager")(*strong_in), strong_in)
    eager_in = [t.clone().requires_grad_(True) for t in inputs]
    eager = gw.grad(f(*eager_in), eager_in)  # (no structural zero reaches the NaN: no warning)
    assert got[-1].isnan().any()
    for g, w, e in zip(got, want, eager, strict=True):
        assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.isnan(), e.isnan())
        assert torch.equal(g.nan_to_num(), w.nan_to_num())


class _ShortBuffers(torch.autograd.Function):
    """a * b whose backward writes two products into a list of one buffer (a user's bug)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = ctx.saved_tensors
        ga = torch.empty_like(a)
        torch.ops.aten._foreach_mul.List_out([g, g], [b, a], out=[ga])
        return ga, ga


def test_foreach_mul_out_of_another_length_raises_pytorchs_error():
    """Before the fix (main a183bcc): ``_into_out`` zipped one buffer with two results and raised its own
    ``ValueError: zip() argument 2 is shorter than argument 1``; PyTorch's kernel raises a RuntimeError."""
    a = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError) as plain:
        torch.autograd.grad(_ShortBuffers.apply(a, b).sum(), (a, b))
    with pytest.raises(RuntimeError) as strong:
        gw.grad(_ShortBuffers.apply(a, b).sum(), (a, b))
    assert str(strong.value) == str(plain.value)
