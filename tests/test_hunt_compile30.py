"""Hunt (session 30): strong zeros in compiled backwards run op by op (``backend="aot_eager"``).

References are independent of gradwise's rules: the same program with the unused values deleted, run eagerly in
plain PyTorch; where the forward kernel itself read the NaN (its output is NaN), plain PyTorch's gradients.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import gradwise as gw
from _compiling import fresh_dynamo  # noqa: F401 (an autouse fixture: every test here)

nan = float("nan")


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


# the entropy of a masked distribution, the rows past 3 unused (NaN: padding) and the masked columns NaN
def _entropy(xlog, mask=(1, 1, 1, 0, 0)):
    mask = torch.tensor(mask).bool()

    def f(s):
        p = s.masked_fill(~mask, ninf).log_softmax(-1).exp()
        return -xlog(p, p).sum(-1)[:3].sum()

    return f


@pytest.mark.parametrize("xlog", [torch.special.xlogy, torch.xlogy], ids=["special.xlogy", "xlogy"])
def test_masked_entropy_under_inductors_decompositions(xlog):
    """xlogy's backward is ``xlogy(g, other)``, which inductor's decompositions write as ``where(isnan(other), nan,
    where(g == 0, 0, g * log(other)))``: a NaN ``other`` (a padding row's probabilities) became the literal NaN of
    the outer where, whatever g, so the rows the slice dropped held NaN (with a CompiledBackwardWarning) where eager
    strong zeros give 0. The op-by-op run puts xlogy back together. ``aot_eager_decomp_partition`` runs inductor's
    decompositions and partitioner without its code generation. Reference: the program with the unused rows and
    the masked columns deleted."""
    s = torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s[3:] = nan
    s[:, 3:] = nan
    x = s.clone().requires_grad_(True)
    fn = torch.compile(_entropy(xlog), backend="aot_eager_decomp_partition")
    with gw.strong_zeros():
        (got,) = torch.autograd.grad(fn(x), x)
    kept = s[:3, :3].clone().requires_grad_(True)
    p = kept.log_softmax(-1).exp()
    (want,) = torch.autograd.grad(-xlog(p, p).sum(), kept)
    torch.testing.assert_close(got[:3, :3], want, rtol=1e-12, atol=1e-15)
    assert torch.equal(got[3:], torch.zeros(2, 5, dtype=torch.float64))
    assert torch.equal(got[:, 3:], torch.zeros(5, 2, dtype=torch.float64))


def test_xlogy_decomposed_finite_is_pytorchs():
    """Finite data, nothing masked (finite gradients): PyTorch's compiled gradients, bitwise."""
    x = torch.randn(5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    fn = torch.compile(_entropy(torch.special.xlogy, (1,) * 5), backend="aot_eager_decomp_partition")
    (want,) = torch.autograd.grad(fn(x), x)
    with gw.strong_zeros():
        (got,) = torch.autograd.grad(fn(x), x)
    assert want.isfinite().all() and torch.equal(got, want)


def test_xlogy_of_a_used_nan_stays_nan():
    """Control: xlogy(x, NaN) with x read by the output: NaN, as in plain PyTorch (a compiled NaN warns)."""
    y = torch.tensor([0.5, nan], dtype=torch.float64, requires_grad=True)
    fn = torch.compile(lambda y: torch.xlogy(torch.ones(2, dtype=torch.float64), y).sum(),
                       backend="aot_eager_decomp_partition")
    with pytest.warns(gw.CompiledBackwardWarning), gw.strong_zeros():
        (got,) = torch.autograd.grad(fn(y), y)
    assert got[1].isnan() and got[0] == 2.0


@pytest.mark.slow(reason="compiles with inductor (~60 s on a 2-core machine)")
def test_masked_entropy_under_inductor():
    """The same under inductor: its graphs write xlogy's constants as ``full([], nan)``; the pass leaves the NaN,
    the node runs op by op, and that run puts xlogy back together."""
    s = torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s[3:] = nan
    s[:, 3:] = nan
    x = s.clone().requires_grad_(True)
    with gw.strong_zeros():
        (got,) = torch.autograd.grad(torch.compile(_entropy(torch.special.xlogy))(x), x)
    kept = s[:3, :3].clone().requires_grad_(True)
    p = kept.log_softmax(-1).exp()
    (want,) = torch.autograd.grad(-torch.special.xlogy(p, p).sum(), kept)
    torch.testing.assert_close(got[:3, :3], want, rtol=1e-12, atol=1e-15)
    assert torch.equal(got[3:], torch.zeros(2, 5, dtype=torch.float64))


def _watched_training(make_x):
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(lin.parameters(), lr=0.01)
    fn = torch.compile(lambda x: torch.tanh(lin(x))[:4].sum(), backend="aot_eager")
    with gw.watch() as report:
        for step in range(4):
            opt.zero_grad()
            fn(make_x(step)).backward()  # the line the findings name
            opt.step()
    return report


def _padded_from_step_2(step: int) -> torch.Tensor:
    x = torch.randn(6, 4)
    if step >= 2:
        x[4:] = nan  # padding rows, sliced away
    return x


def test_watch_names_the_users_line_in_a_replayed_compiled_backward(functorch_config):
    """A compiled backward that keeps its graph (``donated_buffer=False``; AOTAutograd donates by default, and the
    watch then cannot replay the step) is replayed op by op, in torch.fx's generated code: the contamination was
    located at ``<eval_with_key>.5:12``, no file a user can open. It is named at the line that ran the backward."""
    functorch_config(donated_buffer=False)
    report = _watched_training(_padded_from_step_2)
    roots = [f for f in report.findings if f.kind == "contamination"]
    assert len(roots) == 1 and roots[0].op == "aten.tanh_backward" and roots[0].step == 2
    assert roots[0].location.endswith("test_hunt_compile30.py:" + str(_line_of("fn(make_x(step)).backward()")))
    assert sorted(roots[0].reaches) == ["lin.bias", "lin.weight"]


def _line_of(text: str) -> int:
    with open(__file__) as src:
        return next(i for i, line in enumerate(src, 1) if text in line and "_line_of" not in line)


@pytest.mark.slow(reason="compiles with inductor (~40 s on a 2-core machine)")
def test_watch_does_not_blame_the_program_for_an_inductor_backwards_nan(functorch_config):
    """Inductor's backward keeping its graph (``donated_buffer=False``): the watch's replay ran it again (under the
    shadow pass, whose strong variant is finite here) and saw none of its kernels' ops, so lin.bias's NaN .grad
    was told as "the program wrote it between backwards" (it did not: the slice's zeros met the NaN padding inside
    the compiled backward). It is now one finding not explained, saying why."""
    functorch_config(donated_buffer=False)
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(lin.parameters(), lr=0.01)
    fn = torch.compile(lambda x: torch.tanh(lin(x))[:4].sum())
    with gw.watch() as report:
        for step in range(4):
            opt.zero_grad()
            fn(_padded_from_step_2(step)).backward()
            opt.step()
    text = str(report)
    assert "between backwards" not in text, text
    assert "generated kernels, whose ops the replay does not see" in text, text
