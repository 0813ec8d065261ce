"""The check before backward: a structural zero reaches a node's output only when every consumer of it sends one
(_zero_reach). Below a residual connection nothing is read, and the plain path is still exact there."""
from __future__ import annotations

import torch
from torch import nn

import gradwise as gw
from gradwise._strong_zeros._autograd_graph import _root_nodes
from gradwise._strong_zeros._planning import _graph, _plan, _zero_reach

nan = float("nan")
f64 = torch.float64


def _reach(loss):
    roots = _root_nodes([loss])
    return _zero_reach(roots, *_graph(roots))


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
