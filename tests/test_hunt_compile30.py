"""Hunt (session 30): strong zeros in compiled backwards run op by op (``backend="aot_eager"``).

References are independent of gradwise's rules: the same program with the unused values deleted, run eagerly in
plain PyTorch; where the forward kernel itself read the NaN (its output is NaN), plain PyTorch's gradients.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import gradwise as gw

nan = float("nan")


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64)


# op, (input, a, b): beta * input + alpha * (a @ b)-like, with alpha = 0; whether CPU's kernel reads the product
ZERO_ALPHA = {
    "addmm": (torch.addmm, (_r(3, 4), _r(3, 5), _r(5, 4)), False),
    "addmv": (torch.addmv, (_r(3), _r(3, 5), _r(5)), False),
    "addbmm": (torch.addbmm, (_r(3, 4), _r(2, 3, 5), _r(2, 5, 4)), False),
    "baddbmm": (torch.baddbmm, (_r(2, 30, 40), _r(2, 30, 50), _r(2, 50, 40)), False),
    "baddbmm_small": (torch.baddbmm, (_r(2, 3, 4), _r(2, 3, 5), _r(2, 5, 4)), True),  # naive kernel: 0 x NaN
    "addr": (torch.addr, (_r(3, 4), _r(3), _r(4)), True),
}


@pytest.mark.parametrize("beta", [1.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(ZERO_ALPHA))
def test_zero_alpha_product_compiled_op_by_op(name, dtype, beta):
    """addmm & co. with alpha = 0 and a NaN in an operand the kernel never reads: the compiled backward, run op by
    op, kept the formula's 0 x NaN in the other operand's gradient, with a CompiledBackwardWarning (the graph's
    mul by a literal 0 has no autograd node to read alpha from). Eager strong zeros gave the deleted program's
    zeros. Now the graph's mul runs as in the op's node. Where the forward kernel read the NaN (its output is NaN)
    the NaN is genuine and stays (a compiled NaN warns)."""
    op, operands, reads = ZERO_ALPHA[name]
    m, a, b = (t.to(dtype) for t in operands)
    a = a.clone()
    a.view(-1)[0] = nan

    def f(m, a, b):
        return op(m, a, b, beta=beta, alpha=0).sum()

    xs = [t.clone().requires_grad_(True) for t in (m, a, b)]
    fn = torch.compile(f, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gw.strong_zeros():
            got = torch.autograd.grad(fn(*xs), xs)
    if reads:
        ref = [t.clone().requires_grad_(True) for t in (m, a, b)]
        want = torch.autograd.grad(f(*ref), ref)  # plain PyTorch, eager: the forward read the NaN
        assert [w.category for w in caught] == [gw.CompiledBackwardWarning]
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, equal_nan=True)
        return
    assert not caught
    mr = m.clone().requires_grad_(True)  # the program with the product term deleted
    out = op(m, a, b, beta=beta, alpha=0)
    (gm,) = torch.autograd.grad((beta * mr).expand(out.shape).sum(), mr)
    assert torch.equal(got[0], gm)
    assert torch.equal(got[1], torch.zeros_like(a)) and torch.equal(got[2], torch.zeros_like(b))


@pytest.mark.parametrize("name", ["addmm", "baddbmm"])
def test_zero_alpha_product_compiled_finite_is_pytorchs(name):
    """Finite data: PyTorch's compiled gradients, bitwise."""
    op, operands, _ = ZERO_ALPHA[name]

    def f(m, a, b):
        return (op(m, a, b, beta=0.5, alpha=0) * 3).sum()

    fn = torch.compile(f, backend="aot_eager")
    xs = [t.clone().requires_grad_(True) for t in operands]
    want = torch.autograd.grad(fn(*xs), xs)
    with gw.strong_zeros():
        got = torch.autograd.grad(fn(*xs), xs)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


ninf = float("-inf")


@pytest.mark.parametrize("call", [torch.exp, torch.Tensor.exp], ids=["torch.exp", "method"])
def test_exp_of_log_space_zeros_compiled_op_by_op(call):
    """exp(logaddexp(log 0, log 0)): exp's output 0 is a structural zero of exp's backward, which makes
    logaddexp's weights 0 / (1 + exp(-inf - -inf)) = 0 / NaN structural too. The partitioner saved exp's result
    as the formula's detach (a graph input named ``detach_1``, not an exp), so the compiled backward run op by op
    read it as a value: NaN with a CompiledBackwardWarning where eager strong zeros give 0. Reference: the same
    program with the log(0) entries deleted."""
    a = torch.tensor([ninf, 0.5, ninf, -1.0], dtype=torch.float64)
    b = torch.tensor([ninf, ninf, 0.2, 0.3], dtype=torch.float64)

    def f(a, b):
        return call(torch.logaddexp(a, b)).sum()

    xs = [t.clone().requires_grad_(True) for t in (a, b)]
    with gw.strong_zeros():
        got = torch.autograd.grad(torch.compile(f, backend="aot_eager")(*xs), xs)
    ref = [t[1:].clone().requires_grad_(True) for t in (a, b)]
    want = [torch.cat([torch.zeros(1, dtype=torch.float64), w]) for w in torch.autograd.grad(f(*ref), ref)]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_exp_of_a_nan_log_space_value_compiled_stays_nan():
    """Control: a NaN the output reads stays (a compiled NaN warns)."""
    a = torch.tensor([nan, 0.5], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([ninf, 0.2], dtype=torch.float64, requires_grad=True)
    fn = torch.compile(lambda a, b: torch.logaddexp(a, b).exp().sum(), backend="aot_eager")
    with pytest.warns(gw.CompiledBackwardWarning), gw.strong_zeros():
        got = torch.autograd.grad(fn(a, b), (a, b))
    assert got[0][0].isnan() and got[0][1].isfinite()
