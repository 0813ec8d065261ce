"""Review of session 33 (ns33): the enumeration's direct feasibility check against HiGHS alone, float values
written into integer/bool tensors against the same program with an explicit cast, and the quasi-norm's refusal
at a zero slice that f does not use. References: the LP-only enumeration (the base's), the explicit ``.to``
program, the same program with the unused slice deleted."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gradwise as gw
from gradwise._nonsmooth import _stationarity

D = torch.float64


def _lp_only(rows, n, counter, start=None, new=0):
    """The base's check: HiGHS on every choice (no direct point)."""
    if not rows:
        return np.zeros(n)
    counter[0] += 1
    if counter[0] > _stationarity.MAX_LPS:
        raise _stationarity._Budget
    from scipy.optimize import linprog

    a = np.stack([r / np.linalg.norm(r) for r in rows])
    res = linprog(np.zeros(n), A_ub=-a, b_ub=-np.ones(len(a)), bounds=[(None, None)] * n, method="highs")
    return res.x if res.status == 0 else None


def _pieces(sd):
    return sorted(tuple(round(float(v), 9) for v in _stationarity._flat(e)) for e in sd.elements)


_TIES = [
    (lambda x: torch.maximum(x, x.roll(1)).abs().sum(), [0.0, 0.0, 1.0, 0.0]),
    (lambda x: (x.sort().values * torch.arange(1.0, 5.0, dtype=D)).abs().sum() + x.max(), [0.0, 0.0, 1.0, 1.0]),
    (lambda x: torch.relu(torch.minimum(x, -x) + x.flip(0)).sum() + x.abs().max(), [0.0, 0.0, 0.0, 1.0]),
    (lambda x: torch.nn.functional.max_pool1d(x[None, None], 2, 1)[0, 0].abs().sum() - x.min(),
     [0.0, 0.0, 0.0, 0.0, 1.0]),
    (lambda x: (x - x.mean()).abs().sum() + torch.clamp(x, -1, 1).topk(2).values.sum(), [1.0, 1.0, 0.0, -1.0]),
    (lambda x: (x[:3].abs() - x[3:].abs()).abs().sum(), [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
]


@pytest.mark.parametrize(("f", "value"), _TIES, ids=range(len(_TIES)))
def test_direct_feasibility_enumerates_what_highs_alone_does(monkeypatch, f, value):
    """ns33's `_feasible` returns the previous point plus the new rows where it satisfies every row: the same
    pieces, exact, and the same stationarity as the LP-only enumeration (a seeded loop of 350 random
    max/min/abs/relu/sort/maxpool compositions with ties agreed too)."""
    x = torch.tensor(value, dtype=D)
    sd, st = gw.subdifferential(f, x), gw.stationarity(f, x)
    monkeypatch.setattr(_stationarity, "_feasible", _lp_only)
    ref, ref_st = gw.subdifferential(f, x), gw.stationarity(f, x)
    assert sd.exact and ref.exact
    assert _pieces(sd) == _pieces(ref)
    assert st.stationary == ref_st.stationary


def _write(kind: str, dtype: torch.dtype):
    def f(x):
        b = torch.zeros(2, dtype=dtype)
        if kind == "explicit":
            b = b + x[0].to(dtype)
        elif kind == "setitem":
            b[:] = x[0]
        elif kind == "fill_":
            b.fill_(x[0])
        elif kind == "masked_fill":
            b = b.masked_fill(torch.tensor([True, True]), x[0])
        elif kind == "index_fill":
            b = b.index_fill(0, torch.tensor([0, 1]), x[0])
        return (b.to(D) * x[1]).sum() + x[0] * x[1]
    return f


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
@pytest.mark.parametrize("value", [2.0, -2.0, 0.0, 0.5, -0.5])
@pytest.mark.parametrize("kind", ["setitem", "fill_", "masked_fill", "index_fill"])
def test_float_written_into_integer_tensor_is_the_explicit_cast(kind, value, dtype):
    """The write casts as ``.to(dtype)`` does: trunc's jump at a nonzero integer (one side), none at 0 (trunc is
    flat there), bool's jump at 0 (both sides); every one-sided derivative (or refusal) equals the explicit
    cast's."""
    x = torch.tensor([value, 1.5], dtype=D)

    def answers(f):
        out = []
        for d in ([1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]):
            try:
                out.append(float(gw.directional_derivative(f, x, torch.tensor(d, dtype=D))))
            except gw.NonsmoothError:
                out.append("refused")
        return out

    assert answers(_write(kind, dtype)) == answers(_write("explicit", dtype))


def _unused_row(X):
    return torch.linalg.vector_norm(X, 0.5, dim=1)[1]


def _masked_row(X):
    return torch.where(torch.tensor([False, True]), torch.linalg.vector_norm(X, 0.5, dim=1), 0.0).sum()


@pytest.mark.xfail(strict=True, reason="ns33 (f7391b8) refuses a reverse pass reaching ANY zero slice of a "
                   "p < 1 norm, also one f does not use (an index or a where drops it, incoming gradient a "
                   "structural 0): exact on the base. Telling that 0 from ||x||_p ** 2's (2 q = 0 at 0, not "
                   "Lipschitz nearby) needs the strong-zero structure in the rule")
@pytest.mark.parametrize("f", [_unused_row, _masked_row], ids=["index", "where"])
def test_quasi_norm_zero_slice_unused_is_not_refused(f):
    X = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=D)
    row = X[1].clone().requires_grad_(True)
    want = torch.autograd.grad(torch.linalg.vector_norm(row, 0.5), row)[0]  # the unused row deleted
    (g,) = gw.generalized_grad(f, X)
    assert torch.equal(g[0], torch.zeros(2, dtype=D))
    torch.testing.assert_close(g[1], want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("value", [[4.0, 1.0], [-4.0, -1.0]])
def test_trace_torch_cond_branch_not_taken_is_not_reported(value):
    """Only the chosen branch runs under the trace: the other (log of a negative here, sqrt of one) makes no
    NaN finding, and the gradient is the chosen branch's, bitwise."""
    x = torch.tensor(value, requires_grad=True)
    chosen = x.sin() if value[0] > 0 else x.cos()
    (want,) = torch.autograd.grad(chosen.sum(), x)
    with gw.trace() as report:
        # the branch not taken: log of a negative (true taken), sqrt of a negative (false taken)
        out = torch.cond(x.sum() > 0, lambda x: ((x.sin(),) if value[0] > 0 else ((x.sqrt(),))),
                         lambda x: ((x - 10).log(),) if value[0] > 0 else (x.cos(),), (x,))[0]
        (got,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(got, want)
    assert "genuine NaN" not in str(report)
