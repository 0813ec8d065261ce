"""The plan's walk reads an mm/bmm's weights fact (``_no_masked_weights``: masked attention weights make structural
zeros) only in a graph holding a node that may end a weights path (``_node_facts.WEIGHTS_END``); in any other graph
that fact is the reader's own answer without a read. These tests hold the walk's facts equal to each node's reader,
in graphs with each kind of softmax (softmax, _safe_softmax, exp(log_softmax)) and without one, and check that the
gradients of masked attention over padded keys stay the deleted program's, cold and warm cache.

References are independent of gradwise: each node's own fact reader, and the same program with the padded keys
deleted in plain PyTorch.
"""
from __future__ import annotations

import math

import pytest
import torch

import gradwise as gw
from gradwise._masks import all_finite
from gradwise._strong_zeros import _planning
from gradwise._strong_zeros._node_facts import WEIGHTS_END, WEIGHTS_READER, node_info

D = torch.float64


def _weights(kind: str, s: torch.Tensor) -> torch.Tensor:
    if kind == "softmax":
        return s.softmax(-1)
    if kind == "safe_softmax":
        return torch._safe_softmax(s, -1)
    if kind == "exp of log_softmax":
        return s.log_softmax(-1).exp()
    if kind == "softmax through a view":
        return s.softmax(-1).unsqueeze(0).squeeze(0)
    assert kind == "sigmoid (no softmax)"
    return torch.sigmoid(s)


KINDS = ["softmax", "safe_softmax", "exp of log_softmax", "softmax through a view", "sigmoid (no softmax)"]


def _loss(kind: str, x: torch.Tensor, w: torch.Tensor, q_w: torch.Tensor, n: int, pad: bool = True) -> torch.Tensor:
    """Attention of 3 queries over the rows of ``x`` as values, ``h = sqrt((x @ w)^2)`` (an infinite slope at a zero
    padding row), with keys of their own (finite, no gradient): the values reach the loss through the weights' mm/bmm
    only, so the masked weights' exact 0 is the one structural zero that meets a padded value's slope. Rows n.. are
    zero padding whose keys are masked (-inf) (``pad``), else deleted. Two mm of the weights (one through a view)
    and one bmm."""
    gen = torch.Generator().manual_seed(53)
    queries, keys = torch.randn(3, 4, dtype=D, generator=gen), torch.randn(5, 4, dtype=D, generator=gen)
    xx = x.clone()
    xx[n:] = 0.0
    rows = x.shape[0] if pad else n
    h = (xx[:rows] @ w).pow(2).sqrt()
    bias = torch.zeros(rows, dtype=D).masked_fill(torch.arange(rows) >= n, -math.inf)
    a = _weights(kind, (queries @ q_w) @ keys[:rows].T + bias)
    return (a @ h).pow(2).sum() + (a[None] @ h[None])[0].sum() + torch.bmm(a[None], h[None]).pow(2).sum()


def _case():
    gen = torch.Generator().manual_seed(35)
    x = torch.randn(5, 4, dtype=D, generator=gen)
    w = torch.randn(4, 4, dtype=D, generator=gen, requires_grad=True)
    q_w = torch.randn(4, 4, dtype=D, generator=gen, requires_grad=True)
    return x, w, q_w


@pytest.mark.parametrize("kind", KINDS)
def test_walks_weights_facts_are_each_nodes_own(kind):
    """Every mm/bmm fact the walk holds (read, or not read where no WEIGHTS_END node is in the graph) is what the
    node's own fact reader answers; with a softmax's masked weights that answer is 'makes zeros' (so a walk that
    skipped the read there would differ: the test can fail), without a softmax 'makes none'."""
    x, w, q_w = _case()
    loss = _loss(kind, x, w, q_w, 3)
    walk = _planning._walked([loss.grad_fn])
    mm = [(n, f) for n, f in walk.facts if node_info(n)[11] is WEIGHTS_READER]
    assert {type(n).__name__ for n, _ in mm} == {"MmBackward0", "BmmBackward0"}
    for node, fact in mm:
        assert fact == node_info(node)[10](node), type(node).__name__
    assert walk.shape.count(None) == 0  # (every deferred fact is in place)
    made = [fact[0] for _, fact in mm]
    assert any(made) == (kind != "sigmoid (no softmax)"), made


class SharedType:
    """A stand-in for a C++ node shown through a Python type it shares with others: its name() is not its type's."""

    next_functions = ()

    def name(self):
        return "torch::autograd::SomethingElse"


def test_a_node_named_other_than_its_type_may_end_weights_paths():
    """The walk cannot tell from its type what such a node is: it counts as a possible end of a weights path (the
    mm facts are read). Nodes named by their type (qualified: AccumulateGrad, CopySlices) are ends only by name."""
    x = torch.randn(3, 3, dtype=D, requires_grad=True)
    y = x * 1.0
    y[0] = 2.0
    assert y.grad_fn.name() == "torch::autograd::CopySlices", "premise"
    assert node_info(SharedType())[11] is WEIGHTS_END
    for t in (torch.softmax(x, -1), torch._safe_softmax(x, -1), x.exp()):
        assert node_info(t.grad_fn)[11] is WEIGHTS_END
    assert node_info((x @ x).grad_fn)[11] is WEIGHTS_READER
    for node in (y.grad_fn, (x * 1).grad_fn.next_functions[0][0], torch.relu(x).grad_fn):
        assert node_info(node)[11] is None, type(node).__name__


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "sigmoid (no softmax)"])
@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_masked_weights_give_padded_values_the_deleted_keys_zero(kind, cache, monkeypatch):
    """A padded value's infinite slope meets its masked key's exact-0 weight: PyTorch's 0 x inf (NaN), gradwise's
    the deleted program's gradient. Warm: the same graph without a softmax (sigmoid weights) planned first."""
    x, w, q_w = _case()
    monkeypatch.setattr(_planning, "_SHAPED", {})
    assert torch.autograd.grad(_loss(kind, x, w, q_w, 3), [w])[0].isnan().any(), "premise: PyTorch's 0 x inf"
    if cache == "warm":
        gw.grad(_loss("sigmoid (no softmax)", x, w, q_w, 3), [w, q_w])
        gw.grad(_loss(kind, x, w, q_w, 3), [w, q_w])
    want = torch.autograd.grad(_loss(kind, x, w, q_w, 3, pad=False), [w, q_w])
    got = gw.grad(_loss(kind, x, w, q_w, 3), [w, q_w])
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r)


def test_finite_attention_gradients_are_torchs_bit_for_bit():
    """Finite data (no padding: the deleted programs), with and without a softmax: gradwise's gradients are
    PyTorch's, bit for bit."""
    x, w, q_w = _case()
    for kind in KINDS:
        for n in (3, 5):
            want = torch.autograd.grad(_loss(kind, x, w, q_w, n, pad=False), [w, q_w])
            got = gw.grad(_loss(kind, x, w, q_w, n, pad=False), [w, q_w])
            for g, r in zip(got, want, strict=True):
                assert torch.equal(g, r), kind


# -- one-element tensors in all_finite (a loss's seed) -----------------------------------------------------------------
# all_finite reads a one-element CPU tensor's value instead of summing it (the engine's seed in a strong_zeros() block):
# a NaN/Inf seed must still send the backward to the strong pass where a structural zero can meet it.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64])
@pytest.mark.parametrize("value", [0.5, math.nan, math.inf, -math.inf])
def test_all_finite_reads_a_one_element_tensor_exactly(dtype, value):
    t = torch.tensor([value], dtype=dtype)
    assert all_finite([t]) == bool(t.isfinite().all())
    assert all_finite([torch.ones(5000), t.reshape(())]) == bool(t.isfinite().all())
    assert all_finite([torch.tensor([1e300], dtype=D)])  # (finite: a float32 sum took it for Inf)


@pytest.mark.parametrize("seed", [1.0, math.nan, math.inf])
def test_a_scalar_seeds_nan_or_inf_chooses_the_strong_pass(seed):
    """x[:2] makes structural zeros that reach the mm, whose saved tensors are read: the seed is read with them."""
    w = torch.randn(3, 3, dtype=D, requires_grad=True)
    loss = (torch.randn(3, 3, dtype=D) @ w)[:2].sum()
    want = "plain" if math.isfinite(seed) else "strong"
    assert _planning._plan([loss], (torch.tensor(seed, dtype=D),)) == want
    with gw.strong_zeros():
        loss.backward(torch.tensor(seed, dtype=D))
    assert w.grad.isfinite().all() == math.isfinite(seed)
