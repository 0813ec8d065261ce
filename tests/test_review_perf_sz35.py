"""Review of perf_sz35 (merged with sz35): the plan's walk reads mm/bmm's masked-weights facts only in a graph holding a
node that may end a weights path (``_node_facts.WEIGHTS_END``), and ``all_finite`` reads a one-element CPU tensor's
value. The walk's skip is sound only while every node at which ``_rules_bilinear._path_from`` ends a path is named in
``WEIGHTS_ENDS``: these tests hold that link (an end added to the rules' table is read by the walk), and the walk's
facts equal each node's own reader in graph forms the author's tests did not build (a checkpoint, a custom Function
around the softmax, a second-order graph, retain_graph reuse, MultiheadAttention, SDPA's math backend).

References: each node's own fact reader (the unskipped read), the same program with the padded keys deleted in plain
PyTorch, and ``Tensor.isfinite`` for all_finite.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import gradwise as gw
from gradwise._masks import all_finite
from gradwise._strong_zeros import _node_facts, _planning, _rules_bilinear
from gradwise._strong_zeros._node_facts import WEIGHTS_READER, node_info

D = torch.float64


def _mm_facts_are_the_readers(roots) -> list[bool]:
    """The walk's fact of each mm/bmm equals its own reader's (the read the walk may skip); their 'makes zeros'."""
    walk = _planning._walked(roots)
    mm = [(n, f) for n, f in walk.facts if node_info(n)[11] is WEIGHTS_READER]
    for node, fact in mm:
        assert fact == node_info(node)[10](node), type(node).__name__
    return [fact[0] for _, fact in mm]


def _padded(x: torch.Tensor, n: int) -> torch.Tensor:
    """Rows n.. of ``x`` zeroed (zero padding: sqrt's infinite slope there)."""
    xx = x.clone()
    xx[n:] = 0.0
    return xx


def _data():
    gen = torch.Generator().manual_seed(35)
    x = torch.randn(5, 4, dtype=D, generator=gen)
    w = torch.randn(4, 4, dtype=D, generator=gen, requires_grad=True)
    s = torch.randn(3, 5, dtype=D, generator=gen, requires_grad=True)  # (weights of a constant are values)
    return x, w, s


def _bias(rows: int, n: int) -> torch.Tensor:
    return torch.zeros(rows, dtype=D).masked_fill(torch.arange(rows) >= n, -math.inf)


# -- one table for the rules' path ends and the walk's gate ------------------------------------------------------------
@pytest.fixture
def fresh_types(monkeypatch):
    """Node types looked up anew (a test that changes the ends' table), and the table restored after."""
    kept = dict(_node_facts._NODE_TYPES)
    _node_facts._NODE_TYPES.clear()
    monkeypatch.setattr(_planning, "_SHAPED", {})
    yield
    _node_facts._NODE_TYPES.clear()
    _node_facts._NODE_TYPES.update(kept)


def _sigmoid_attention(x, w, s, n, pad=True):
    rows = x.shape[0] if pad else n
    h = (_padded(x, n)[:rows] @ w).pow(2).sqrt()
    a = torch.sigmoid(s[:, :rows] + _bias(rows, n))  # (a masked key's weight: sigmoid(-inf), exactly 0)
    return (a @ h).pow(2).sum()


def test_an_end_added_to_the_rules_table_is_read_by_the_walk(fresh_types, monkeypatch):
    """A new end of a weights path (here sigmoid, as if a rule took its exact 0 for a masked key's) is one entry of
    _rules_bilinear's table, and the walk's gate follows it: the mm's fact is read ('makes zeros') and the padded
    value's gradient is the deleted key's. With the gate's names a list of their own (perf_sz35's
    ``WEIGHTS_ENDS = _SOFTMAXES | {"ExpBackward0"}`` beside ``_path_from``'s own test) the rules followed the path and
    the walk did not: fact (False, False), the backward plain, w.grad NaN (SILENT)."""
    monkeypatch.setitem(_rules_bilinear._WEIGHTS_END_TESTS, "SigmoidBackward0", lambda node: True)
    x, w, s = _data()
    assert torch.autograd.grad(_sigmoid_attention(x, w, s, 3), [w])[0].isnan().any(), "premise: PyTorch's 0 x inf"
    assert any(_mm_facts_are_the_readers([_sigmoid_attention(x, w, s, 3).grad_fn]))
    want = torch.autograd.grad(_sigmoid_attention(x, w, s, 3, pad=False), [w])[0]
    got = gw.grad(_sigmoid_attention(x, w, s, 3), [w])[0]
    torch.testing.assert_close(got, want)


def test_every_end_of_the_rules_is_a_weights_end():
    """The names the gate reads are the table's keys (a view, not a copy taken at import)."""
    assert set(_rules_bilinear.WEIGHTS_ENDS) == set(_rules_bilinear._WEIGHTS_END_TESTS)
    assert set(_rules_bilinear.WEIGHTS_ENDS) >= {"SoftmaxBackward0", "SafeSoftmaxBackward0", "ExpBackward0"}


# -- graph forms: the walk's facts are each node's own -----------------------------------------------------------------
class _Softmax(torch.autograd.Function):
    """A softmax the graph does not show (a custom Function's node): its weights are values to the rules."""

    @staticmethod
    def forward(ctx, s):
        out = s.softmax(-1)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return out * (g - (g * out).sum(-1, keepdim=True))


def _attention(weights, x, w, s, n, pad=True):
    rows = x.shape[0] if pad else n
    h = (_padded(x, n)[:rows] @ w).pow(2).sqrt()
    a = weights(s[:, :rows] + _bias(rows, n))
    return (a @ h).pow(2).sum() + torch.bmm(a[None], h[None]).sum()


FORMS = {
    "checkpointed softmax": lambda t: _checkpointed(t),
    "softmax in a custom Function": _Softmax.apply,
    "softmax of a float32 copy": lambda t: t.float().softmax(-1).double(),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_graph_forms_walk_facts_are_each_nodes_own(form):
    x, w, s = _data()
    made = _mm_facts_are_the_readers([_attention(FORMS[form], x, w, s, 3).grad_fn])
    assert any(made) == (form != "softmax in a custom Function"), made


def _checkpointed(t):
    return checkpoint(lambda u: u.softmax(-1), t, use_reentrant=False)


@pytest.mark.parametrize("which", ["mm", "bmm"])  # (bmm(a[None], h[None]) kept the padded NaN until sz36)
def test_checkpointed_softmax_gives_padded_values_the_deleted_keys_zero(which):
    x, w, s = _data()
    rows, n = x.shape[0], 3

    def loss(pad):
        r = rows if pad else n
        h = (_padded(x, n)[:r] @ w).pow(2).sqrt()
        a = _checkpointed(s[:, :r] + _bias(r, n))
        return (a @ h).pow(2).sum() if which == "mm" else torch.bmm(a[None], h[None]).pow(2).sum()

    want = torch.autograd.grad(loss(False), [w])[0]
    torch.testing.assert_close(gw.grad(loss(True), [w])[0], want)


def test_retain_graph_reuse_reads_the_same_facts(monkeypatch):
    """One graph planned twice (retain_graph) from a warm cache, then a graph of the same ops without padding: each
    walk's mm facts are its nodes' own, and the gradients the deleted program's."""
    monkeypatch.setattr(_planning, "_SHAPED", {})
    x, w, s = _data()
    want = torch.autograd.grad(_attention(lambda t: t.softmax(-1), x, w, s, 3, pad=False), [w])[0]
    loss = _attention(lambda t: t.softmax(-1), x, w, s, 3)
    for _ in range(2):
        assert any(_mm_facts_are_the_readers([loss.grad_fn]))
        torch.testing.assert_close(gw.grad(loss, [w], retain_graph=True)[0], want)
    assert not any(_mm_facts_are_the_readers([_attention(lambda t: t.softmax(-1), x, w, s, 5).grad_fn]))


def test_second_order_graph_walk_facts_are_each_nodes_own():
    """The gradient of a first backward (create_graph) holds the forward's softmax and the backward's mm: a walk from
    it reads the mm facts as their readers do."""
    x, w, s = _data()
    loss = _attention(lambda t: t.softmax(-1), x, w, s, 5, pad=False)
    (gw_,) = torch.autograd.grad(loss, [w], create_graph=True)
    _mm_facts_are_the_readers([gw_.pow(2).sum().grad_fn])


def test_multihead_attention_and_sdpa_math_walk_facts_are_each_nodes_own():
    gen = torch.Generator().manual_seed(7)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True, dtype=D)
    q = torch.randn(2, 3, 8, dtype=D, generator=gen)
    pad = torch.tensor([[False, False, True], [False, False, False]])
    out, _ = mha(q, q, q, key_padding_mask=pad, need_weights=True)
    assert any(_mm_facts_are_the_readers([out.sum().grad_fn]))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qq = torch.randn(1, 2, 3, 4, dtype=D, generator=gen, requires_grad=True)
    with sdpa_kernel(SDPBackend.MATH):
        o = torch.nn.functional.scaled_dot_product_attention(qq, qq, qq, attn_mask=torch.ones(3, 3).tril().bool())
    _mm_facts_are_the_readers([o.sum().grad_fn])


# -- all_finite's one-element read -------------------------------------------------------------------------------------
ONE = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128]


@pytest.mark.parametrize("dtype", ONE)
@pytest.mark.parametrize("value", [-0.0, 5e-324, 6e-8, 1e-45, 65504.0, 1e300, -1e308, math.nan, -math.inf])
@pytest.mark.parametrize("view", ["0-d", "expanded", "strided"])
def test_all_finite_one_element_is_isfinite(dtype, value, view):
    """Signed zero, subnormals (of float64, float16, float32), a dtype's max and a float64 beyond float32's (rounded to
    the dtype: 1e300 is Inf in float32), NaN/-Inf; as a 0-d tensor, an expanded 1x1 view and a strided slice."""
    t = torch.tensor(value, dtype=D).to(dtype)
    t = {"0-d": t, "expanded": t.reshape(1, 1).expand(1, 1), "strided": torch.stack([t, t, t])[::2][:1]}[view]
    assert t.numel() == 1
    finite = bool(t.isfinite().all())
    if t.is_complex() and t.abs() > torch.finfo(torch.float32).max:  # (read by a float32 sum: an overflow's False,
        assert not all_finite([t]) or finite  # which all_finite allows; the caller's exact test decides)
    else:
        assert all_finite([t]) == finite


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.uint8])
def test_all_finite_one_element_integers_are_finite(dtype):
    assert all_finite([torch.ones(1, dtype=dtype), torch.zeros((), dtype=dtype)])


def test_all_finite_one_element_under_vmap_reads_no_value_silently():
    """A per-sample scalar under vmap: its value cannot be read; PyTorch refuses (as the sum's read did), never a
    silent True."""
    def f(t):
        return torch.tensor(all_finite([t]))

    with pytest.raises(RuntimeError):
        torch.vmap(f)(torch.tensor([1.0, math.nan]))


# -- addmm/baddbmm (sz35's weights readers) under the same gate -------------------------------------------------------
def _addmm_graph(weights, alpha, beta):
    """addmm and baddbmm of ``weights(s)`` (masked keys 3, 4) with values, beside a Linear's addmm of the input."""
    x, _, s = _data()
    lin = torch.nn.Linear(4, 4, dtype=D)
    h = lin(_padded(x, 3)).pow(2).sqrt()
    a = weights(s + _bias(5, 3))
    bias = torch.randn(3, 4, dtype=D, requires_grad=True)
    out = torch.addmm(bias, a, h, alpha=alpha, beta=beta).sum()
    return out + torch.baddbmm(bias[None], a[None], h[None], alpha=alpha, beta=beta).sum()


@pytest.mark.parametrize("weights", ["softmax", "sigmoid"])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (0.5, 1.0), (0.0, 1.0), (1.0, 0.0)])
def test_addmm_walk_facts_are_each_nodes_own(weights, alpha, beta):
    """addmm/baddbmm make zeros where alpha or beta is 0 (the deleted term's gradient) whether or not a softmax is in
    the graph, and where their weights are a softmax's masked ones: the walk's facts (read, or the alpha/beta part
    alone where no softmax can feed them) are each node's reader's."""
    f = {"softmax": lambda t: t.softmax(-1), "sigmoid": torch.sigmoid}[weights]
    walk = _planning._walked([_addmm_graph(f, alpha, beta).grad_fn])
    mm = [(n, fact) for n, fact in walk.facts if node_info(n)[11] is WEIGHTS_READER]
    assert {type(n).__name__ for n, _ in mm} == {"AddmmBackward0", "BaddbmmBackward0"}
    for node, fact in mm:
        assert fact == node_info(node)[10](node), type(node).__name__
    attention = [fact[0] for n, fact in mm if n.name() == "BaddbmmBackward0" or n._saved_mat1.shape[0] == 3]
    assert len(attention) == 2
    assert all(attention) == (weights == "softmax" or alpha == 0 or beta == 0), attention


def test_without_a_weights_end_the_walk_follows_no_weights_path(monkeypatch):
    """In a graph with no softmax/exp (a Linear's addmm, an mm, a bmm), the walk reads no mm/addmm's weights path: the
    producers' walk that cost ~3 us per Linear per backward (the facts stay the readers', above)."""
    def refuse(node):
        raise AssertionError(f"weights path read for {node.name()}")

    loss = _addmm_graph(torch.sigmoid, 1.0, 1.0)
    monkeypatch.setattr(_node_facts, "weights_paths", refuse)
    _planning._walked([loss.grad_fn])
    with pytest.raises(AssertionError, match="weights path read"):
        _planning._walked([_addmm_graph(lambda t: t.softmax(-1), 1.0, 1.0).grad_fn])
