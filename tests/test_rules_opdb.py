"""Rules for backwards the op_db sweep and the reported cases found contaminated
(src/gradwise/_strong_zeros/_rules_opdb.py): logcumsumexp, segment_reduce, matrix_exp, float32 LSTM (oneDNN).
References: the programs with the unused values deleted."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradwise as gw
from gradwise._strong_zeros import _engine

nan = float("nan")
f64 = torch.float64


@pytest.mark.parametrize("dim", [0, 1])
def test_logcumsumexp_nan_after_the_kept_prefix(dim):
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=f64)
    x.narrow(dim, 3, x.shape[dim] - 3).fill_(nan)
    w = torch.randn(4, 6, dtype=f64).narrow(dim, 0, 3)
    leaf = x.clone().requires_grad_()
    loss = (torch.logcumsumexp(leaf, dim).narrow(dim, 0, 3) * w).sum()
    assert not torch.autograd.grad(loss, leaf, retain_graph=True)[0].isfinite().all()
    got = gw.grad(loss, leaf)[0]
    kept = x.narrow(dim, 0, 3).clone().requires_grad_()
    exp = torch.autograd.grad((torch.logcumsumexp(kept, dim) * w).sum(), kept)[0]
    torch.testing.assert_close(got.narrow(dim, 0, 3), exp, rtol=1e-12, atol=1e-12)
    assert torch.equal(got.narrow(dim, 3, x.shape[dim] - 3), torch.zeros_like(got.narrow(dim, 3, x.shape[dim] - 3)))


def test_logcumsumexp_forced_strong_pass_is_pytorch_bitwise(monkeypatch):
    torch.manual_seed(1)
    x = torch.randn(3, 7, requires_grad=True)
    g = torch.randn(3, 7)
    g[:, 5:] = 0
    loss = (torch.logcumsumexp(x, 1)[:, :5] * g[:, :5]).sum()
    exp = torch.autograd.grad(loss, x, retain_graph=True)[0]
    monkeypatch.setattr(_engine, "_plan", lambda *a: "strong")
    assert torch.equal(gw.grad(loss, x)[0], exp)


@pytest.mark.parametrize("used", [False, True])
def test_matrix_exp_nan_batch_element(used, monkeypatch):
    """A batch of matrices whose last one is NaN: sliced away after matrix_exp, the others' gradient is that of
    the batch without it (the NaN one's is 0); kept, its NaN stays. On finite data the forced strong pass is
    PyTorch's, bitwise."""
    torch.manual_seed(0)
    a = torch.randn(3, 3, 3, dtype=f64)
    a[2] = nan
    leaf = a.clone().requires_grad_()
    w = torch.randn(3, 3, 3, dtype=f64)
    keep = 3 if used else 2
    got = gw.grad((torch.linalg.matrix_exp(leaf)[:keep] * w[:keep]).sum(), leaf)[0]
    if used:
        assert got[2].isnan().all()
        return
    kept = a[:2].clone().requires_grad_()
    want = torch.autograd.grad((torch.linalg.matrix_exp(kept) * w[:2]).sum(), kept)[0]
    torch.testing.assert_close(got[:2], want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[2], torch.zeros_like(got[2]))
    monkeypatch.setattr(_engine, "_plan", lambda *a: "strong")  # finite data through the rule: PyTorch's bits
    finite = a[:2].clone().requires_grad_()
    loss = (torch.linalg.matrix_exp(finite) * w[:2]).sum()
    assert torch.equal(gw.grad(loss, finite, retain_graph=True)[0], torch.autograd.grad(loss, finite)[0])


@pytest.mark.parametrize("lower", ["structural", "zero values", "values"])
def test_matrix_exp_rule_needs_a_block_triangular_matrix(lower):
    """The rule's claim (the upper-right block of exp([[A, G], [C, B]]) is linear in G) holds when C is zero,
    structurally or in value; with C nonzero the NaN a dead G block meets stays."""
    from gradwise._strong_zeros._rules_opdb import _matrix_exp
    from gradwise._strong_zeros._supports import _Supports

    torch.manual_seed(0)
    x = torch.randn(2, 4, 4, dtype=f64)
    x[1, :2, :2] = nan  # matrix 1's A block: NaN
    x[:, 2:, :2] = 0 if lower != "values" else 0.5
    support = torch.ones(2, 4, 4, dtype=torch.bool)
    support[1, :2, 2:] = False  # matrix 1's G block: structural zeros
    if lower == "structural":
        support[:, 2:, :2] = False
    x[1, :2, 2:] = 0
    sup = _Supports()
    sup.record(x, support)
    out = _matrix_exp(torch.ops.aten.linalg_matrix_exp.default, (x,), {}, sup)
    block = out[1, :2, 2:]
    if lower == "values":
        assert block.isnan().all() and sup.of(out) is None
    else:
        assert torch.equal(block, torch.zeros_like(block)) and not sup.of(out)[1, :2, 2:].any()
        torch.testing.assert_close(out[0], torch.linalg.matrix_exp(x[0]))


@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min", "prod"])
def test_segment_reduce_dropped_segment(reduce):
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    data = torch.randn(7, 3, dtype=f64)
    data[5:] = nan  # the last segment
    lengths = torch.tensor([2, 3, 2])
    out = torch.segment_reduce(lin(data), reduce, lengths=lengths, axis=0)
    loss = out[:2].square().sum()
    params = list(lin.parameters())
    got = gw.grad(loss, params)
    ref = torch.segment_reduce(lin(data[:5]), reduce, lengths=lengths[:2], axis=0).square().sum()
    for g, e in zip(got, torch.autograd.grad(ref, params), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min", "prod"])
def test_segment_reduce_finite_data_is_pytorchs(reduce):
    """Finite data with no structural zero reaching the op (an empty segment, negative values): PyTorch's
    gradient bitwise. prod's backward weights (the product of the others) are values, not a placement's: read
    as one, its negative weights became structural zeros (found by the slow op_db sweep)."""
    torch.manual_seed(0)
    data = torch.randn(5, 3, dtype=f64, requires_grad=True)
    out = torch.segment_reduce(data, reduce, lengths=torch.tensor([0, 1, 2, 2]), axis=0, initial=1)
    seed = torch.randn_like(out)
    expected = torch.autograd.grad(out, data, seed, retain_graph=True)[0]
    assert torch.equal(gw.grad(out, data, seed)[0], expected)


@pytest.mark.parametrize("layers", [1, 2])
def test_float32_lstm_padded_steps_selected(layers):
    """oneDNN's fused LSTM backward (float32 on CPU): NaN padding steps selected away. The reference runs each
    sequence alone, in float64."""
    torch.manual_seed(11)
    lstm = nn.LSTM(3, 4, num_layers=layers, batch_first=True)
    x = torch.randn(2, 5, 3)
    x[1, 3:] = nan
    lengths = [5, 3]
    valid = torch.arange(5) < torch.tensor(lengths)[:, None]
    y, _ = lstm(x)
    loss = y[valid].square().sum()
    params = list(lstm.parameters())
    assert not all(g.isfinite().all() for g in torch.autograd.grad(loss, params, retain_graph=True))
    got = gw.grad(loss, params)
    ref_lstm = copy.deepcopy(lstm).double()
    ref = sum(ref_lstm(x[b : b + 1, :n].double())[0].square().sum() for b, n in enumerate(lengths))
    for g, e in zip(got, torch.autograd.grad(ref, list(ref_lstm.parameters())), strict=True):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5)


def test_float32_lstm_finite_strong_pass_is_pytorch_bitwise(monkeypatch):
    torch.manual_seed(3)
    lstm = nn.LSTM(3, 4, batch_first=True)
    loss = lstm(torch.randn(2, 5, 3))[0][:, :3].square().sum()
    params = list(lstm.parameters())
    exp = torch.autograd.grad(loss, params, retain_graph=True)
    monkeypatch.setattr(_engine, "_plan", lambda *a: "strong")
    for g, e in zip(gw.grad(loss, params), exp, strict=True):
        assert torch.equal(g, e)


def test_float32_lstm_nan_used_stays():
    torch.manual_seed(4)
    lstm = nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    x[1, 1] = nan  # inside the kept steps
    loss = lstm(x)[0][:, :3].square().sum()
    got = gw.grad(loss, list(lstm.parameters()))
    assert not all(g.isfinite().all() for g in got)
