"""Session 33 (nonsmooth): the kink sweep's cost (subdifferential enumeration and gradcheck's message), torch.cond
under gradwise's modes, float values written into integer tensors. References: float64 one-sided differences,
PyTorch without gradwise, a pairwise deduplication written here."""
from __future__ import annotations

import pytest
import torch

import gradwise as gw
from gradwise import NonsmoothError
from gradwise._nonsmooth import _gradcheck, _stationarity

D = torch.float64


# -- enumeration cost -------------------------------------------------------------------------------------------


def test_independent_ties_enumerate_without_lps(monkeypatch):
    """sum w_i |x_i| with 8 entries at 0: each branch choice adds a row on a coordinate of its own. Every choice
    asked HiGHS for a feasible direction (510 LPs, ~80% of the time; 2^11 at the kink sweep's abs sample); the
    previous point plus the new rows is one, checked directly. The same 256 pieces."""
    import scipy.optimize

    calls = []
    real = scipy.optimize.linprog
    monkeypatch.setattr(scipy.optimize, "linprog", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=D)
    x.view(-1)[:8] = 0
    w = torch.linspace(-1, 1, 25, dtype=D) + 0.37
    sd = gw.subdifferential(lambda x: (x.abs().reshape(-1) * w).sum(), x)
    assert sd.exact and len(sd.elements) == 256
    got = {tuple(torch.cat([e.reshape(-1) for e in el]).tolist()) for el in sd.elements}
    signs = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0], dtype=D)] * 8)
    want = {tuple(torch.cat([s * w[:8], (x.reshape(-1)[8:].sign() * w[8:])]).tolist()) for s in signs}
    assert got == want
    assert not calls


def test_dependent_ties_still_ask_the_lp():
    """Rows that share coordinates (max of three affine pieces, one infeasible combination): the direct point
    fails and the LP decides; the pieces are those active at 0."""
    sd = gw.subdifferential(lambda x: torch.max(torch.stack([x[0], -x[1], x[0] + x[1]])), torch.zeros(2, dtype=D))
    assert sd.exact
    assert sorted(tuple(e[0].tolist()) for e in sd.elements) == [(0.0, -1.0), (1.0, 0.0), (1.0, 1.0)]


def _pairwise(elements, tol=1e-12):
    out, seen = [], []
    for e in elements:
        v = torch.cat([t.reshape(-1) for t in e])
        if all(float((v - s).abs().max()) > tol * (1 + float(v.abs().max())) for s in seen):
            out.append(e)
            seen.append(v)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_distinct_agrees_with_pairwise(seed):
    """`_distinct` compares only pieces whose projections are close; the kept pieces are those of the pairwise
    definition (near-duplicates within 1e-12 and just outside it, exact duplicates, NaN)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(40, 7, generator=g, dtype=D)
    rows = [base[i % 13] + (torch.randn(7, generator=g, dtype=D) * 10.0 ** -int(torch.randint(10, 15, (1,),
                                                                                             generator=g)))
            for i in range(40)]
    rows += [base[3].clone(), base[3] * (1 + 5e-12)]
    elements = [(r[:4], r[4:]) for r in rows]
    assert [id(e) for e in _stationarity._distinct(elements)] == [id(e) for e in _pairwise(elements)]
    nan = [(torch.tensor([float("nan"), 1.0], dtype=D),), (torch.tensor([0.0, 1.0], dtype=D),)]
    assert [id(e) for e in _stationarity._distinct(nan)] == [id(e) for e in _pairwise(nan)]


def test_gradcheck_message_skips_coordinates_where_pieces_agree(monkeypatch):
    """relu(x) - relu(-x) (= x) at a point with one entry at 0: PyTorch's 0 there is not a generalized gradient.
    The message's one-sided partials took two passes per coordinate (400 for 200 entries; clamp's sweep sample:
    20 s); where every exact piece agrees they are equal and skipped. The message is the same."""
    x = torch.linspace(-1, 1, 200, dtype=D)
    x[57] = 0.0
    calls = []
    real = _gradcheck.directional_derivative
    monkeypatch.setattr(_gradcheck, "directional_derivative", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = gw.gradcheck(lambda x: (torch.relu(x) - torch.relu(-x)).sum(), x, raise_exception=False)
    assert not res.passed and res.kink and res.generalized is False
    assert "one-sided partials (left, right): x[0]: (1, 1)" in str(res)
    assert len(calls) <= 10, len(calls)  # (two for x[0], the rest in _reverse_against_forward)


# -- torch.cond ---------------------------------------------------------------------------------------------------


def _cond(x):
    return torch.cond(x.sum() > 0, lambda x: (x.sqrt(),), lambda x: (x.cos(),), (x,))[0]


@pytest.mark.parametrize("value", [[4.0, 1.0], [-4.0, 1.0]])
def test_trace_runs_torch_cond(value):
    """Eager torch.cond under gw.trace() raised PyTorch's NotImplementedError (no rule for the
    HigherOrderOperator in the trace's mode). Its branches now run under the trace: the gradient is PyTorch's,
    and a NaN made in a branch is named with its op."""
    x = torch.tensor(value, requires_grad=True)
    # (the same program in eager code: PyTorch's own torch.cond fails once it has run under any dispatch mode)
    (x.sqrt() if x.sum() > 0 else x.cos()).sum().backward()
    want = x.grad.clone()
    x.grad = None
    with gw.trace() as report:
        _cond(x).sum().backward()
    assert torch.equal(x.grad, want)
    assert ("genuine NaN" in str(report)) is bool(torch.isnan(want).any())


def test_trace_torch_cond_nan_in_branch_is_named():
    x = torch.tensor([4.0, -1.0], requires_grad=True)
    with gw.trace() as report:
        _cond(x).sum().backward()
    assert torch.isnan(x.grad[1])
    assert "aten.sqrt" in str(report)


def test_trace_torch_cond_bare_branch_is_refused_clearly():
    """A branch returning a bare tensor: PyTorch's own backward of torch.cond fails under any dispatch mode
    ("object of type 'bool' has no len()"). The trace refuses at the call, naming torch.cond and the fix; under
    no_grad (no backward) it runs."""
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    with gw.trace(), pytest.raises(RuntimeError, match=r"torch\.cond.*Return a tuple from each branch"):
        torch.cond(x.sum() > 0, lambda x: x.sin(), lambda x: x.cos(), (x,))
    with gw.trace(), torch.no_grad():
        out = torch.cond(x.sum() > 0, lambda x: x.sin(), lambda x: x.cos(), (x,))
    assert torch.equal(out, x.detach().cos())


def _cond_abs(x):
    return torch.cond(x.sum() > 0, lambda x: (x.sin(),), lambda x: (x.abs(),), (x,))[0].sum()


@pytest.mark.parametrize("entry", [
    lambda x: gw.directional_derivative(_cond_abs, x, torch.ones_like(x)),
    lambda x: gw.subdifferential(_cond_abs, x),
    lambda x: gw.stationarity(_cond_abs, x),
    lambda x: gw.gradcheck(_cond_abs, x, raise_exception=False),
    lambda x: gw.generalized_grad(_cond_abs, x),
], ids=["directional_derivative", "subdifferential", "stationarity", "gradcheck", "generalized_grad"])
def test_nonsmooth_refuses_torch_cond(entry):
    """The nonsmooth entry points crashed with PyTorch's NotImplementedError from gradwise's dispatch-level watch.
    The branches run as subgraphs gradwise cannot follow (abs at 0 inside the false branch would be unseen): a
    NonsmoothError naming torch.cond and what to write instead."""
    x = torch.tensor([0.0, -1.0], dtype=D)
    with pytest.raises(NonsmoothError, match=r"torch\.cond .*choose the branch in Python"):
        entry(x)


# -- float values written into integer tensors --------------------------------------------------------------------


def _write(how):
    def f(x):
        b = torch.zeros(2, dtype=torch.int32)
        v = x[0]  # a 0-d value
        if how == "setitem":
            b[:] = v
        elif how == "fill_":
            b.fill_(v)
        elif how == "masked_fill":
            b = b.masked_fill(torch.tensor([True, False]), v)
        elif how == "index_fill_":
            b.index_fill_(0, torch.tensor([1]), v)
        return x * b.to(x.dtype).sum() + x.abs().sum()
    return f


def _one_sided(f, x, d):
    with torch.no_grad():
        f0 = f(x)
        q = [(f(x + t * d) - f0) / t for t in (1e-5, 1e-6, 1e-7)]
        jump = ((f(x + 1e-9 * d) - f0).abs() > 1e-6).any()
    return q, bool(jump)


@pytest.mark.parametrize("how", ["setitem", "fill_", "masked_fill", "index_fill_"])
@pytest.mark.parametrize("value", [1.5, 1.0, 0.0, -2.0])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_float_written_into_integer_tensor(how, value, sign):
    """``b[:] = x[0]`` into an int32 b crashed with PyTorch's forward-AD internal assert (a 0-d dual value
    written into an integer tensor; plain PyTorch under fwAD too), as did fill_, masked_fill and index_fill. The
    value is cast by the cast rule first: off the integers its slope through b is 0; at a nonzero integer the
    write jumps one way, which is refused (NonsmoothError), the other way agrees with the differences."""
    f = _write(how)
    x = torch.tensor([value, 0.5], dtype=D)
    d = torch.tensor([sign, 0.25], dtype=D)
    quotients, jump = _one_sided(f, x, d)
    if jump:
        with pytest.raises(NonsmoothError):
            gw.directional_derivative(f, x, d)
        return
    got = gw.directional_derivative(f, x, d)
    assert any(torch.allclose(got, q, atol=1e-4) for q in quotients), (got, quotients)
