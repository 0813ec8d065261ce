"""Review of perf_sz34 (mm/bmm's masked-weights fact found once per graph shape, ``_planning._weights_facts``: not
merged, it saved ~0.8% on the SDPA row only; its review's tests stand as guards: the constant-first weights were
NaN on the base, and sz34's gated path fixed them).

References are independent of gradwise: the same program with the padded keys deleted, in plain PyTorch.
"""
from __future__ import annotations

import math

import pytest
import torch

import gradwise as gw
from gradwise._strong_zeros import _planning

D = torch.float64


def _attention(x, w, q_w, n, order, pad=True):
    """Hand-written attention over the rows of ``x`` with keys/values ``h = sqrt((x @ w)^2)`` (an infinite slope at a
    zero padding row), its weights multiplied by a constant before ``weights @ h``: ``order`` says on which side
    ("weights first": softmax(s) * c, "constant first": c * softmax(s)). ``pad``: rows n.. are zero padding whose
    keys are masked (-inf) and whose queries are dropped; else they are deleted."""
    xx = x.clone()
    if pad:
        xx[n:] = 0.0
    else:
        xx = xx[:n]
    rows = xx.shape[0]
    h = (xx @ w).pow(2).sqrt()
    bias = torch.zeros(rows, dtype=D).masked_fill(torch.arange(rows) >= n, -math.inf)
    a = ((h @ q_w) @ h.T + bias).softmax(-1)
    c = torch.full((rows, rows), 0.5, dtype=D)
    a = a * c if order == "weights first" else c * a
    return torch.where((torch.arange(rows) < n)[:, None], a @ h, 0.0).pow(2).sum()


@pytest.mark.parametrize("order", ["weights first", "constant first"])
@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_masked_weights_times_a_constant_on_either_side_give_padded_values_the_deleted_keys_zero(order, cache,
                                                                                                 monkeypatch):
    """c * softmax(s) is the same weights as softmax(s) * c: a masked key's weight is exactly 0 whatever the
    constant, so v's gradient there is the deleted key's 0. softmax_of_weights followed only a mul's first edge, so
    with the constant first the mm/bmm was not taken for one of a softmax's weights: PyTorch's 0 x inf at the zero
    padding row's sqrt, w.grad NaN, silently (weights first: finite). perf_sz34's test_plan_cache asserted that
    fact as expected (constant first: NO_MASKED_WEIGHTS). Warm: the other order's graph planned first."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 4, dtype=D, generator=gen)
    w = torch.randn(4, 4, dtype=D, generator=gen, requires_grad=True)
    q_w = torch.randn(4, 4, dtype=D, generator=gen, requires_grad=True)
    monkeypatch.setattr(_planning, "_SHAPED", {})
    assert torch.autograd.grad(_attention(x, w, q_w, 3, order), [w])[0].isnan().any(), "premise: PyTorch's 0 x inf"
    if cache == "warm":
        other = "constant first" if order == "weights first" else "weights first"
        gw.grad(_attention(x, w, q_w, 3, other), [w, q_w])
    want = torch.autograd.grad(_attention(x, w, q_w, 3, order, pad=False), [w, q_w])
    got = gw.grad(_attention(x, w, q_w, 3, order), [w, q_w])
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r)


def test_a_graph_with_a_softmaxs_weights_is_planned_once_within_the_shapes_budget(monkeypatch):
    """_weights_facts kept the positions of a graph's mm/bmm of a softmax's weights under its shape and its plan under
    a copy of that shape extended by their facts: the graph counted twice in _SHAPED_TOKENS, so one of over half of
    it cleared the cache on every backward (the positions cleared the plan, the plan the positions) and was planned
    again each time (base: once). Budget: 1.5 times the graph's shape."""
    torch.manual_seed(0)
    w = torch.randn(4, 4, dtype=D, requires_grad=True)
    x = torch.randn(5, 4, dtype=D)

    def loss():
        h = x @ w
        return ((h @ h.T).softmax(-1) @ h).square().sum()

    monkeypatch.setattr(_planning, "_SHAPED", {})
    tokens = len(_planning._walked([loss().grad_fn]).shape)
    monkeypatch.setattr(_planning, "_SHAPED", {})
    monkeypatch.setattr(_planning, "_SHAPED_TOKENS", tokens * 3 // 2)
    calls = []
    shaped = _planning._shaped
    monkeypatch.setattr(_planning, "_shaped", lambda *a: calls.append(1) or shaped(*a))
    for _ in range(4):
        assert _planning._plan([loss()], ()) == "plain"
    assert len(calls) == 1


def test_scaled_masked_weights_through_einsum_give_padded_values_the_deleted_keys_zero():
    """einsum('bqk,bkd->bqd', softmax(s) * 0.7, v) reaches the bmm through unsqueeze, two permutes (0, 1, 3, 2) and a
    view; _rules_bilinear._reorders counted any permute as reordering (the two compose to the identity), and the
    mul's result shares no storage with the softmax's, so masked_weights mapped no zero: w.grad NaN, silently (in
    base). The path's layout nodes are now replayed on the softmax's mask (_weights_layout)."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 4, dtype=D, generator=gen)
    w = torch.randn(4, 4, dtype=D, generator=gen, requires_grad=True)
    q_w = torch.randn(4, 4, dtype=D, generator=gen, requires_grad=True)
    lens = torch.tensor([5, 3])

    def loss(xx, lens):
        keep = torch.arange(xx.shape[1])[None, :] < lens[:, None]
        h = (xx @ w).pow(2).sqrt()  # (an infinite slope at a zero padding row)
        bias = torch.zeros(keep.shape, dtype=D).masked_fill(~keep, -math.inf)
        a = ((h @ q_w) @ h.transpose(1, 2) + bias[:, None, :]).softmax(-1) * 0.7
        return torch.where(keep[..., None], torch.einsum("bqk,bkd->bqd", a, h), 0.0).pow(2).sum()

    padded = x.clone()
    padded[1, 3:] = 0.0
    assert torch.autograd.grad(loss(padded, lens), [w])[0].isnan().any(), "premise: PyTorch's 0 x inf"
    want = [torch.zeros_like(p) for p in (w, q_w)]
    for b in range(2):  # each sequence with its padding deleted
        for acc, g in zip(want, torch.autograd.grad(loss(x[b:b + 1, :int(lens[b])], lens[b:b + 1]), [w, q_w]),
                          strict=True):
            acc += g
    for g, r in zip(gw.grad(loss(padded, lens), [w, q_w]), want, strict=True):
        torch.testing.assert_close(g, r)
