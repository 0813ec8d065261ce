"""The check before backward: a structural zero reaches a node's output only when every consumer of it sends one
(_zero_reach). Below a residual connection nothing is read, and the plain path is still exact there."""
from __future__ import annotations

import gc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradwise as gw
from gradwise._strong_zeros._autograd_graph import _root_nodes
from gradwise._strong_zeros._node_facts import covers
from gradwise._strong_zeros._planning import _graph, _plan, _zero_reach

nan = float("nan")
f64 = torch.float64


def _reach(loss):
    """node -> whether a structural zero reaches it (its own, or from above)."""
    roots = _root_nodes([loss])
    g = _graph(roots)
    above = _zero_reach(roots, g)
    return {node: node in g.makers or node in above for node in g.nodes}


def test_residual_connection_stops_structural_zeros():
    """y = h + relu(W2 h): h's sensitivity is the residual's (fully supported) plus the relu branch's: no
    structural zero arrives at h, so lin1's addmm (below h) is not reached (its saved x is not read); its NaN row
    is used through the residual, and gradwise's gradients are PyTorch's."""
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(3, 4).double(), nn.Linear(4, 4).double()
    x = torch.randn(5, 3, dtype=f64)
    x[2] = nan
    h = lin1(x)
    loss = (h + torch.relu(lin2(h))).sum()
    nodes = _reach(loss)
    assert nodes[h.grad_fn] is False  # lin1's addmm
    assert any(r for n, r in nodes.items() if type(n).__name__ == "ReluBackward0")
    params = [*lin1.parameters(), *lin2.parameters()]
    got = gw.grad(loss, params, retain_graph=True)
    exp = torch.autograd.grad(loss, params)
    for g, e in zip(got, exp, strict=True):
        torch.testing.assert_close(g, e, equal_nan=True, rtol=0, atol=0)
    assert got[0].isnan().any()  # the NaN row is used through the residual


def test_zeros_arriving_through_every_consumer_are_followed():
    """Both consumers of h slice it: the zeros arrive, and the NaN row below is read (strong pass, exact)."""
    torch.manual_seed(0)
    lin1 = nn.Linear(3, 4).double()
    x = torch.randn(5, 3, dtype=f64)
    x[4] = nan
    h = lin1(x)
    loss = h[:4].sum() + h[:3].square().sum()
    assert _plan([loss], ()) == "strong"
    got = gw.grad(loss, list(lin1.parameters()))
    h2 = lin1(x[:4])
    exp = torch.autograd.grad(h2.sum() + h2[:3].square().sum(), list(lin1.parameters()))
    for g, e in zip(got, exp, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_one_output_of_a_multi_output_node_can_be_reached_alone():
    """unbind's outputs have separate consumers: zeros through output 0 only still reach the node."""
    x = torch.randn(2, 3, dtype=f64, requires_grad=True)
    a, b = x.exp().unbind(0)
    loss = a[:2].sum() + b.sum()
    nodes = _reach(loss)
    unbind = next(n for n in nodes if type(n).__name__ == "UnbindBackward0")
    assert nodes[unbind]


def test_transformer_layer_reads_only_below_its_feed_forward_relu():
    """nn.TransformerEncoderLayer on finite data: the residual around the feed-forward block stops the relu's
    zeros at the first layer norm, so attention and the projections below it are not read."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    loss = layer(torch.randn(2, 5, 16)).square().mean()
    nodes = _reach(loss)
    names = {type(n).__name__ for n, r in nodes.items() if r}
    assert "ReluBackward0" in names
    assert "ScaledDotProductFlashAttentionForCpuBackward0" not in names
    assert _plan([loss], ()) == "plain"


def _reached(loss, name):
    return [r for n, r in _reach(loss).items() if type(n).__name__ == name]


@pytest.mark.parametrize("split", [lambda h: h.chunk(2, -1), lambda h: h.unbind(-1), lambda h: h.split([1, 3], -1)])
def test_a_split_whose_every_output_is_used_makes_no_zeros(split):
    """split/unbind fill only unused outputs' sensitivities with zeros: with every piece used, the projection below
    is not reached (nothing read); with one piece unused, it is, and a NaN weight row feeding only that piece is
    annihilated as in the program without it."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 4).double()
    x = torch.randn(5, 3, dtype=f64)
    parts = split(lin(x))
    loss = sum(p.tanh().sum() for p in parts)
    assert _reached(loss, "AddmmBackward0") == [False]
    assert _plan([loss], ()) == "plain"
    with torch.no_grad():
        lin.weight[-1] = nan  # feeds only the last piece
    parts = split(lin(x))
    loss = sum(p.tanh().sum() for p in parts[:-1])
    assert _reached(loss, "AddmmBackward0") == [True]
    got = gw.grad(loss, [lin.bias])[0]
    assert got[:-1].isfinite().all() and got[-1] == 0


@pytest.mark.parametrize(("picks", "covered"), [
    (lambda p: (p[0], p[1], p[2]), True),  # nn.MultiheadAttention's packed in-projection
    (lambda p: (p[:2], p[1:]), True),  # overlapping slices
    (lambda p: (p[::2], p[1::2]), True),  # strided slices
    (lambda p: (p[-1], p[:-1]), True),  # negative index and end
    (lambda p: (p[0], p[2]), False),  # position 1 unused
    (lambda p: (p[:1], p[2:]), False),
    (lambda p: (p[::2],), False),
    (lambda p: (p[0], p[1], p[2][:1]), False),  # the third pick receives zeros from above
    (lambda p: (p[0], p[1], p[:, 1]), False),  # picks along different dims
])
def test_selects_that_read_every_position_send_no_zeros(picks, covered):
    """Sibling selects/slices of one tensor whose picks cover its dim: the sum of their backwards has no
    structural zero, so the node below is not reached (and the plan runs PyTorch's backward, bitwise). Picks
    that leave a position unread, or receive zeros from above, reach it."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 6).double()
    x = torch.randn(5, 3, dtype=f64)
    p = lin(x).t().reshape(3, 2, 5).clone()
    loss = sum(q.tanh().sum() for q in picks(p))
    assert _reached(loss, "CloneBackward0") == [not covered]
    if covered:
        assert _plan([loss], ()) == "plain"


def test_unread_positions_keep_their_annihilation():
    """Against the program without the unused values: q, k from a packed projection whose third part (v) is
    unused and NaN, the weights' gradients are those of the projection without it."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 6).double()
    x = torch.randn(5, 3, dtype=f64)
    with torch.no_grad():
        lin.weight[4:] = nan
    p = lin(x).t().reshape(3, 2, 5).clone()
    loss = p[0].tanh().sum() + p[1].square().sum()
    got = gw.grad(loss, [lin.weight])[0]
    sub = nn.Linear(3, 4).double()
    with torch.no_grad():
        sub.weight.copy_(lin.weight[:4])
        sub.bias.copy_(lin.bias[:4])
    q = sub(x).t().reshape(2, 2, 5)
    exp = torch.autograd.grad(q[0].tanh().sum() + q[1].square().sum(), [sub.weight])[0]
    # the reference's mm has 4 rows, gradwise's 6 (two zero): the BLAS may pick another kernel, and so another
    # summation order, by shape (1.8e-15 apart on this machine's CPU)
    torch.testing.assert_close(got[:4], exp, rtol=0, atol=1e-13)
    assert (got[4:] == 0).all()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.lists(st.tuples(st.integers(-45, 45), st.integers(-45, 45), st.integers(1, 4)),
                                    min_size=1, max_size=4))
def test_covers_is_the_union_of_the_picked_positions(size, slices):
    picks = [(0, size, range(*slice(a, b, c).indices(size))) for a, b, c in slices]
    union = set().union(*(set(r) for _, _, r in picks))
    assert covers(picks) == (union == set(range(size)))


def test_the_plan_leaves_no_reference_cycle():
    """The plan's bookkeeping dies with it: a cycle (a nested function that calls itself holds its closure) would
    keep every node it saw, and their Python objects, until the cyclic collector runs."""
    lin = nn.Linear(4, 6)
    x = torch.randn(5, 4)

    def step():
        p = torch.relu(lin(x)).view(5, 3, 2)
        loss = p[:, 0].sum() + p[:, 1:].square().sum() + p[:2, 2].tanh().sum()
        gw.backward(loss)

    for _ in range(2):  # (after torch._dynamo.reset() in an earlier test, PyTorch frees its compiled state's
        step()         # cycles during the next call or two: garbage that is not gradwise's)
        gc.collect()
    gc.disable()
    try:
        step()
        assert gc.collect() == 0
    finally:
        gc.enable()
