"""The check before backward keeps the structural part of its plan per graph shape (_planning._SHAPED): node
types, edges and the node facts that decide where structural zeros start and spread. A graph met again costs one
walk and the reads of its values; a graph that differs in any of those gets its own plan, and values (saved
tensors, singular points) are read on every backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwise as gw
from gradwise._strong_zeros import _planning
from gradwise._strong_zeros._planning import _plan

nan = float("nan")
f64 = torch.float64


@pytest.fixture
def empty_cache(monkeypatch):
    monkeypatch.setattr(_planning, "_SHAPED", {})


def _programs():
    """(name, loss) pairs whose graphs look alike: the same layers with other slice bounds, other consumers of
    one value, a split with and without an unused output, attention with and without causal masking, NaN or not."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 4).double()
    x = torch.randn(6, 4, dtype=f64)
    x_nan = x.clone()
    x_nan[5] = nan
    q = torch.randn(2, 2, 5, 4, dtype=f64, requires_grad=True)
    q_nan = q.detach().clone()
    q_nan[1] = nan
    q_nan.requires_grad_()
    out = []
    for data, tag in ((x, "finite"), (x_nan, "nan row 5")):
        h = lin(data)
        out += [
            (f"slice all rows, {tag}", h[:6].square().sum()),
            (f"slice 5 rows, {tag}", h[:5].square().sum()),
            (f"slice 5 rows of relu, {tag}", torch.relu(h)[:5].square().sum()),
            (f"residual around relu, {tag}", (h + torch.relu(h)).sum()),
            (f"relu alone, {tag}", torch.relu(h).sum()),
            (f"split, both used, {tag}", sum(p.square().sum() for p in h.split([5, 1]))),
            (f"split, last unused, {tag}", h.split([5, 1])[0].square().sum()),
            (f"select rows 0..4, {tag}", sum(h[i].square().sum() for i in range(5))),
            (f"select rows 0..5, {tag}", sum(h[i].square().sum() for i in range(6))),
        ]
    for t, tag in ((q, "finite"), (q_nan, "nan entry 1")):
        for causal in (False, True):
            a = F.scaled_dot_product_attention(t, t, t, is_causal=causal)
            out += [(f"attention causal={causal}, {tag}", a.square().sum()),
                    (f"attention causal={causal} entry 0, {tag}", a[:1].square().sum())]
    return out


def test_structure_is_planned_once_per_shape(empty_cache, monkeypatch):
    """The second backward of a graph of the same shape reuses the structural part: _zero_reach runs once."""
    calls = []
    reach = _planning._zero_reach
    monkeypatch.setattr(_planning, "_zero_reach", lambda *a: calls.append(1) or reach(*a))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    x = torch.randn(5, 4, dtype=f64)
    for _ in range(3):
        assert _plan([net(x)[:3].sum()], ()) == "plain"
    assert len(calls) == 1


def test_cached_plan_equals_a_fresh_plan(monkeypatch):
    """Every program is planned with a cache that holds the plans of all the others (graphs of like shapes), and
    with an empty one: the plans agree."""
    programs = _programs()
    warm = {}
    for _ in range(2):
        for name, loss in programs:
            warm[name] = _plan([loss], ())
    for name, loss in programs:
        monkeypatch.setattr(_planning, "_SHAPED", {})
        assert _plan([loss], ()) == warm[name], name
    # the pairs that differ only in a fact the shape holds do get different plans
    assert warm["slice all rows, nan row 5"] == "plain"  # the NaN row is used: PyTorch's NaN is right
    assert warm["slice 5 rows, nan row 5"] == "strong"
    assert warm["split, both used, nan row 5"] == "plain"
    assert warm["split, last unused, nan row 5"] == "strong"
    assert warm["select rows 0..5, nan row 5"] == "plain"
    assert warm["select rows 0..4, nan row 5"] == "strong"
    assert warm["residual around relu, nan row 5"] == "plain"


def test_values_are_read_on_every_backward(empty_cache):
    """A graph whose shape was planned finite gets the strong pass when its values hold NaN where it discards
    them, with the gradient of the program without them; and plain PyTorch again when they are finite."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2)).double()
    x = torch.randn(6, 4, dtype=f64)
    padded = torch.cat((x, torch.full((2, 4), nan, dtype=f64)))
    clean = torch.cat((x, torch.zeros(2, 4, dtype=f64)))
    params = list(net.parameters())
    for data in (clean, padded, clean, padded):
        loss = net(data)[:6].square().sum()
        assert _plan([loss], ()) == ("strong" if data is padded else "plain")
        got = gw.grad(loss, params)
        expected = torch.autograd.grad(net(x).square().sum(), params)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_a_weight_turned_nan_is_seen(empty_cache):
    """The same graph shape after a parameter update that made a weight NaN: the plan reads it again (a cache of
    values would keep the old finite answer)."""
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(3, 4).double(), nn.Linear(4, 1).double()
    x = torch.randn(5, 3, dtype=f64, requires_grad=True)  # (so that lin1's backward reads its weight)

    def loss():
        return lin2(torch.relu(lin1(x))).sum()

    assert _plan([loss()], ()) == "plain"
    with torch.no_grad():
        lin2.weight[0, 1] = nan
    assert _plan([loss()], ()) == "plain"  # relu's zeros are below lin2: its NaN weight is used, PyTorch is right
    with torch.no_grad():
        lin2.weight.fill_(1.0)
        lin1.weight[2, 0] = nan
    assert _plan([loss()], ()) == "strong"  # read again: relu's zeros may meet lin1's weight in x's gradient
    got = gw.grad(loss(), [x])[0]
    expected = torch.autograd.grad(loss(), [x])[0]  # the NaN is used (relu(NaN) passes its gradient): it stays
    torch.testing.assert_close(got, expected, equal_nan=True, rtol=0, atol=0)


def test_the_shapes_kept_are_bounded(empty_cache, monkeypatch):
    """Graphs whose shape changes every step (here a slice's bound) do not grow the cache past its bounds, in
    shapes or in entries; a shape larger than the whole bound is not kept. The plans stay right throughout."""
    monkeypatch.setattr(_planning, "_SHAPED_MAX", 4)
    torch.manual_seed(0)
    lin = nn.Linear(3, 3).double()
    x = torch.randn(12, 3, dtype=f64)
    x[11] = nan
    for k in range(1, 13):
        assert _plan([lin(x)[:k].sum()], ()) == ("plain" if k == 12 else "strong")
        assert len(_planning._SHAPED) <= 4
    monkeypatch.setattr(_planning, "_SHAPED_TOKENS", 30)
    _planning._SHAPED.clear()
    for k in range(1, 13):
        assert _plan([lin(x)[:k].sum()], ()) == ("plain" if k == 12 else "strong")
        assert sum(map(len, _planning._SHAPED)) <= 30
    deep = x[:11]
    for _ in range(20):
        deep = deep * 1.0
    assert _plan([lin(deep).sum()], ()) == "plain"
    assert all(len(shape) <= 30 for shape in _planning._SHAPED)


@pytest.mark.parametrize("op", ["index", "index_select", "causal attention", "masked attention"])
def test_a_freed_trunk_is_planned(op):
    """A trunk whose saved tensors an earlier backward freed, below the inputs asked for (the engine never runs
    it): the plan's node tests that read saved tensors (an index's positions, attention's own zeros) took the
    freed tensor's RuntimeError for the caller's, where PyTorch's own backward runs. The gradient is PyTorch's;
    toward an input below the trunk both raise."""
    torch.manual_seed(0)
    q = torch.randn(1, 1, 4, 3, requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    if op == "index":
        h = q[:, :, torch.tensor([0, 1, 2, 3])]
    elif op == "index_select":
        h = q.index_select(2, torch.tensor([3, 2, 1, 0]))
    elif op == "causal attention":
        h = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    else:
        h = F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool))
    h.sum().backward()  # frees h's node
    expected = torch.autograd.grad((h * w).sum(), [w])[0]
    got = gw.grad((h * w).sum(), [w])[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        gw.grad((h * w).sum(), [q])


def _more_programs():
    """Look-alike graphs that differ in a fact read from one node: which positions an index, index_select or
    padding keeps, which output of an unbind goes unused, a same-named custom Function whose backward differs,
    pow's exponent, a convolution's stride and dilation, attention's mask and causal masking (also with fewer
    queries than keys). Each input holds NaN where some of them discard it."""
    torch.manual_seed(1)
    w = torch.randn(4, 4, dtype=f64, requires_grad=True)
    x = torch.randn(6, 4, dtype=f64)
    x[5] = nan
    kv = torch.randn(1, 2, 5, 4)
    q = torch.randn(1, 2, 5, 4)
    q[0, 0, 4] = nan  # a query row: the programs below discard its output

    def twin(drops):
        class Twin(torch.autograd.Function):  # the same name, another class
            @staticmethod
            def forward(ctx, t):
                return t * 2

            @staticmethod
            def backward(ctx, g):
                return g * 2 if not drops else torch.cat((g[:5] * 2, g[5:] * 0))
        return Twin

    progs = {}
    for idx in ([5, 4, 3, 2, 1, 0], [0, 0, 1, 2, 3, 4]):
        t = torch.tensor(idx)
        progs[f"index {idx}"] = lambda t=t: ((x @ w)[t].square().sum(), [w])
        progs[f"index_select {idx}"] = lambda t=t: ((x @ w).index_select(0, t).square().sum(), [w])
    for pad in ((0, 0, 1, 1), (0, 0, 0, -1)):
        progs[f"pad {pad}"] = lambda pad=pad: (F.pad(x @ w, pad).square().sum(), [w])
    for k in (0, 5, None):
        progs[f"unbind without {k}"] = lambda k=k: (sum(p.sum() for j, p in enumerate((x @ w).unbind(0)) if j != k),
                                                   [w])
    for drops in (False, True):
        fn = twin(drops)
        progs[f"custom drops={drops}"] = lambda fn=fn: (fn.apply(x @ w).sum(), [w])
    for e in (0, 0.0, 1, 2, 0.5):  # pow's exponent decides whether it makes zeros (x ** 0: a constant)
        progs[f"pow {e!r}"] = lambda e=e: (((x @ w) ** e).sum(), [w])
    kernel = torch.randn(3, 4, 1, dtype=f64)
    for stride, dilation in ((1, 1), (2, 1), (5, 1)):  # a stride wider than the kernel skips positions (row 5)
        progs[f"conv1d stride={stride}"] = lambda s=stride, d=dilation: (
            F.conv1d((x @ w).T.unsqueeze(0), kernel, stride=s, dilation=d).sum(), [w])
    kernel2 = torch.randn(3, 4, 2, dtype=f64)
    for dilation in (1, 5):  # a dilation as wide as the input skips the positions between its taps
        progs[f"conv1d dilation={dilation}"] = lambda d=dilation: (
            F.conv1d((x @ w).T.unsqueeze(0), kernel2, dilation=d).sum(), [w])
    wf = w.detach().float().requires_grad_()
    short_q, last_key_nan = q[..., :3, :].clone(), kv.clone()
    # causal masking aligned to the top left: 3 queries never score key 4 (the forward still weighs its NaN value
    # row by 0: a NaN loss, genuine either way; the plans differ)
    last_key_nan[0, 0, 4] = nan
    for causal in (False, True):
        progs[f"attention 3 queries causal={causal}"] = lambda c=causal: (
            F.scaled_dot_product_attention(short_q @ wf, last_key_nan @ wf, last_key_nan @ wf, is_causal=c).sum(),
            [wf])
    keys = (torch.arange(5) < 4).expand(5, 5)
    for m, causal in ((None, False), (None, True), (keys, False)):
        progs[f"attention mask={m is not None} causal={causal}"] = lambda m=m, c=causal: (
            F.scaled_dot_product_attention(q @ wf, kv @ wf, kv @ wf, attn_mask=m, is_causal=c)
            [..., :4, :].sum(), [wf])
    return progs


def test_look_alike_graphs_get_the_plan_and_gradient_of_an_empty_cache(monkeypatch):
    """Each program run after all the others (a warm cache) is planned as with an empty cache and gets the same
    gradient, bit for bit (NaN where it is)."""
    progs = _more_programs()
    cold = {}
    for name, make in progs.items():
        monkeypatch.setattr(_planning, "_SHAPED", {})
        cold[name] = (_plan([make()[0]], ()), gw.grad(*make())[0])
    monkeypatch.setattr(_planning, "_SHAPED", {})
    for _ in range(2):
        for name, make in [*progs.items()][::-1]:
            assert _plan([make()[0]], ()) == cold[name][0], name
            got = gw.grad(*make())[0]
            torch.testing.assert_close(got, cold[name][1], rtol=0, atol=0, equal_nan=True, msg=name)
