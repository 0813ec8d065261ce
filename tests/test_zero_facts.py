"""The shared table of structural-zero facts (``gradwise._ops._zeros``) and its two consumers.

Both consumers build their rules from the table: every op in it takes its kind's rule in the eager engine unless
a named refinement replaces it, and the compiled-graph pass, run on a backward graph, is checked per kind against
an independent reference: the same graph with the NaN values replaced by finite ones, where the output does not
depend on them (two replacements agree), and NaN where it does. Cheap: graphs are traced on fake tensors with
``make_fx`` and the rewritten graph runs eagerly, no compiler. The contractions' support formulas
(``gradwise._ops._contractions``) are evaluated by both mask algebras and compared.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from gradwise._masks import EagerMasks
from gradwise._ops import _contractions
from gradwise._ops._zeros import KINDS, ZERO_FACTS, multiplying_args, zero_fact
from gradwise._strong_zeros import _compile_pass, _compile_rules
from gradwise._strong_zeros._rules import lookup

aten = torch.ops.aten
nan = math.nan


def _resolve(op):
    if isinstance(op, str):
        ns, name = op.split("::")
        return getattr(getattr(torch.ops, ns), name) if ns != "prims" or name != "fma" else None
    return op


def test_every_fact_names_an_op_and_a_kind():
    for op, fact in ZERO_FACTS.items():
        assert fact.kind in KINDS, (op, fact.kind)
        assert _resolve(op) is not None or op == "prims::fma"
        assert set(fact.multiplies) | set(fact.args) <= set(range(4)), op
        if fact.kind in ("product", "fma"):
            assert fact.args and fact.multiplies, op
        if fact.kind == "gates":
            assert fact.passes is not None, op


def test_eager_rules_come_from_the_table():
    """An op of the table takes its kind's eager rule; the only exceptions are named refinements (a rule that
    reads more than the kind) and the per-op kind (bilinear)."""
    from gradwise._strong_zeros import _rules_pointwise as rp

    refined = rp._REGISTERED_ELSEWHERE  # mul: exp's result and alpha = 0 products (_rules_bilinear._zero_alpha_mul)
    for op in refined:  # registered once, by their refinement, not first by the kind and then over it
        assert lookup(op.Tensor).__name__ == "_zero_alpha_mul", op
    for op, fact in ZERO_FACTS.items():
        if fact.kind == "bilinear" or op in refined or isinstance(op, str):
            continue
        overloads = [getattr(op, n) for n in op.overloads()] if hasattr(op, "overloads") else [op]
        for overload in overloads:
            rule = lookup(overload)
            assert rule is not None, overload
            if overload in (aten.sub.Tensor, aten.add.Tensor, aten.exp.default, aten.abs.default):
                continue  # refined for one overload in _rules_opdb, with its docstring
            if overload is aten.div.Tensor:
                continue  # logaddexp's weight of a -inf argument (_logaddexp_weight_div), with its docstring
            expected = rp._KIND_RULES[fact.kind](fact)
            assert rule is expected or rule.__qualname__ == expected.__qualname__, (overload, rule)


def test_multiplying_args_cover_products_and_contractions():
    assert multiplying_args(aten.mul.Tensor) == (0, 1)
    assert multiplying_args(aten.div.Tensor) == (0,)
    assert multiplying_args(aten.addmm.default) == (1, 2)
    assert multiplying_args(aten.relu.default) == ()
    assert zero_fact(aten.where.default) is None  # where(c) is nonzero: no fact (only the 3-argument forms)


# -- the pass, per kind, against the graph with the unused values replaced -------------------------------------
# Each case: op(s, v) -> y, where s is a sensitivity [4, 3] whose rows 2..3 are a slice's structural zeros and v a
# value holding NaN. The graph returns y * w (w: NaN at random places too), so a NaN meets a structural zero
# wherever the kind's rule must have moved, added or selected one.

def _idx():
    return torch.tensor([3, 0, 2, 0])


CASES = {
    "views: t": lambda s, v: s.t(),
    "views: reshape": lambda s, v: s.reshape(12),
    "views: unsqueeze+expand": lambda s, v: s.unsqueeze(0).expand(2, 4, 3),
    "moves: flip": lambda s, v: s.flip(0),
    "moves: roll": lambda s, v: s.roll(1, 0),
    "moves: repeat": lambda s, v: s.repeat(2, 1),
    "moves: tril": lambda s, v: s.tril(),
    "moves: index_select": lambda s, v: s.index_select(0, _idx()),
    "moves: index": lambda s, v: s[_idx()],
    "moves: gather": lambda s, v: s.gather(0, _idx()[:, None].expand(4, 3)),
    "moves: cat": lambda s, v: torch.cat([s, s.flip(0)], 1),
    "moves: stack": lambda s, v: torch.stack([s, s], 2),
    "moves: pad 0": lambda s, v: torch.nn.functional.pad(s, [1, 1]),
    "moves: pad 1 (created values are used)": lambda s, v: torch.nn.functional.pad(s, [1, 1], value=1.0),
    "adds: index_add": lambda s, v: torch.zeros(5, 3).index_add(0, _idx(), s),
    "adds: scatter_add": lambda s, v: torch.zeros(5, 3).scatter_add(0, _idx()[:, None].expand(4, 3), s),
    "adds: cumsum": lambda s, v: s.flip(0).cumsum(0),
    "adds: scatter of a negative value (written values are used)": lambda s, v: s.scatter(0, _idx()[:, None].expand(
        4, 3), -1.0),
    "adds: avg_pool backward": lambda s, v: aten.avg_pool2d_backward(s[None, None], v[None, None].repeat(1, 1, 2, 2),
                                                                     [2, 2], [2, 2], [0, 0], False, True, None),
    "union: add": lambda s, v: s + s.roll(1, 1),
    "reduces: sum": lambda s, v: s.sum(1, keepdim=True).expand(4, 3),
    "reduces: mean": lambda s, v: s.mean(1, keepdim=True).expand(4, 3),
    "product: mul": lambda s, v: s * v,
    "product: div": lambda s, v: s / v,
    "linear: sigmoid_backward": lambda s, v: aten.sigmoid_backward(s, v),
    "linear: hardsigmoid_backward": lambda s, v: aten.hardsigmoid_backward(s, v),
    "gates: threshold_backward": lambda s, v: aten.threshold_backward(s, v, 0.0),
    "gates: hardtanh_backward": lambda s, v: aten.hardtanh_backward(s, v, -1.0, 1.0),
    "where": lambda s, v: torch.where(v > 0, s, 0.0),
    # contractions (the shared formulas of gradwise._ops._contractions): v's NaN rows meet only s's zero rows
    "bilinear: mm, sensitivity left": lambda s, v: s.t() @ v,
    "bilinear: mm, sensitivity right": lambda s, v: v.t() @ s,
    "bilinear: bmm": lambda s, v: torch.bmm(s.t()[None], v[None])[0],
    "bilinear: mm reading a NaN row (used)": lambda s, v: s.t() @ v.roll(1, 0),
    "bilinear: convolution_backward 1x1": lambda s, v: _conv_grads(s, v, 1),
    "bilinear: convolution_backward reading a NaN row (used)": lambda s, v: _conv_grads(s, v.roll(1, 0), 1),
}


def _conv_grads(s, v, size):
    """grad_input and grad_weight of a convolution (padding keeps the size), as one [4, 3 + size * size] tensor.
    (A wider kernel would let a structural zero of g meet a NaN that a supported element also reads: the pass
    keeps that NaN and the runtime check re-runs the node, so the pass alone is exact for 1x1 kernels.)"""
    dx, dw, _ = aten.convolution_backward(s[None, None], v[None, None], torch.ones(1, 1, size, size), None, [1, 1],
                                          [size // 2] * 2, [1, 1], False, [0, 0], 1, [True, True, False])
    return torch.cat([dx[0, 0], dw.reshape(1, -1).expand(4, -1)], 1)


def _graph(case):
    def backward(tangents_1, v, w):
        s = aten.slice_scatter(torch.zeros(4, 3), tangents_1, 0, 0, 2)
        y = CASES[case](s, v)
        return y * w[: y.numel()].reshape(y.shape)

    return backward


def _inputs(seed: int, nan_rows: bool):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(2, 3, generator=g) + 0.5  # nonzero: a zero here would be the program's, not structure
    v = torch.randn(4, 3, generator=g)
    w = torch.randn(64, generator=g)
    if nan_rows:
        v[2:] = nan  # the rows s does not hold: values an exact rule annihilates or never reads
        w[torch.rand(64, generator=g) < 0.5] = nan
    return t, v, w


@pytest.mark.parametrize("case", sorted(CASES))
def test_pass_equals_the_graph_without_the_unused_values(case):
    fn = _graph(case)
    t, v, w = _inputs(0, nan_rows=True)
    gm = make_fx(fn, tracing_mode="fake")(t, v, w)
    assert any(n.name.startswith("tangents") for n in gm.graph.nodes if n.op == "placeholder")
    _compile_pass.rewrite_backward(gm.graph)
    gm.recompile()
    got = gm(t, v, w)
    # the reference: NaN replaced by two different finite values; where they agree, the NaN was never used
    bad_v, bad_w = v.isnan(), w.isnan()
    ref1 = fn(t, v.masked_fill(bad_v, 1.5), w.masked_fill(bad_w, 1.5))
    ref2 = fn(t, v.masked_fill(bad_v, -2.5), w.masked_fill(bad_w, -2.5))
    unused = ref1 == ref2
    assert torch.equal(got[unused], ref1[unused]), case
    assert got[~unused].isnan().all(), case  # a NaN the output uses stays
    if case.endswith("(used)") or case.startswith(("moves: pad 1", "adds: scatter of a negative")):
        assert (~unused).any()  # (the control: values the op creates are used)
    # finite data: the rewritten graph is the plain one, bitwise
    t, v, w = _inputs(1, nan_rows=False)
    assert torch.equal(gm(t, v, w), fn(t, v, w))


def test_eager_counts_keep_written_negative_values():
    """A placement that writes a negative number (scatter's value) writes a value: counted on 0/1 supports it is
    -1 there, not a structural zero (``> 0`` took it for one)."""
    from gradwise._strong_zeros._supports import _Supports

    sup = _Supports()
    g = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    sup.record(g, torch.tensor([[True, True], [False, False]]))
    func = aten.scatter.value
    out = lookup(func)(func, (g, 0, torch.tensor([[1, 1]]), -1.0), {}, sup)
    assert torch.equal(out, torch.tensor([[1.0, 2.0], [-1.0, -1.0]]))
    support = sup.of(out)
    assert support is None or support.expand(2, 2).all()  # row 1 holds the written -1: a value


# -- a contraction's formula, one writing, evaluated by both algebras ---------------------------------------------

def _formula_cases():
    g = torch.Generator().manual_seed(0)
    m = lambda *shape: torch.rand(*shape, generator=g) < 0.3  # sparse supports: structural rows and columns occur
    x, w = torch.randn(2, 3, 6, 5, generator=g), torch.ones(4, 3, 3, 3)
    conv = (None, [2, 1], [1, 1], [1, 2], False, [0, 0], 1, [True, False, False])
    allowed = torch.ones(5, 7, dtype=torch.bool).tril()
    return {
        "mm_support 0": (lambda o, s: _contractions.mm_support(o, 0, s), [m(5, 4)]),
        "mm_support 1": (lambda o, s: _contractions.mm_support(o, 1, s), [m(2, 4, 3)]),
        "mm_reads 0": (lambda o, s: _contractions.mm_reads(o, 0, s), [m(2, 5, 4)]),
        "mm_reads 1": (lambda o, s: _contractions.mm_reads(o, 1, s), [m(4, 3)]),
        "conv_input_reads": (lambda o, s, g, x, w: _contractions.conv_input_reads(o, (g, x, w, *conv), s),
                             [m(2, 4, 3, 3), torch.randn(2, 4, 3, 3, generator=g), x, w]),
        "attention_rows": (lambda o, s: _contractions.attention_rows(o, s), [m(2, 3, 5, 4)]),
        "attention_keys": (lambda o, r: _contractions.attention_keys(o, r), [m(2, 3, 5)]),
        "attention_keys masked": (lambda o, r, a: _contractions.attention_keys(o, r, a), [m(2, 3, 5), allowed]),
        "value_columns": (lambda o, s: _contractions.value_columns(o, s), [m(2, 3, 5, 4)]),
    }


@pytest.mark.parametrize("name", sorted(_formula_cases()))
def test_contraction_formulas_agree_in_both_algebras(name):
    """Each formula of ``_contractions`` is written once: the eager algebra on tensors and the graph algebra on a
    backward graph's nodes (run afterwards on the same tensors) give the same mask."""
    formula, inputs = _formula_cases()[name]
    eager = formula(EagerMasks, *[t.clone() for t in inputs])
    graph = fx.Graph()
    mode = FakeTensorMode()
    nodes = []
    for i, t in enumerate(inputs):
        node = graph.placeholder(f"in_{i}")
        node.meta["val"] = mode.from_tensor(t)
        nodes.append(node)
    rw = _compile_pass._Rewriter(graph)
    rw.mode, rw.cursor = mode, nodes[-1]
    graph.output(formula(_compile_rules._GraphMasks(rw), *nodes))
    got = fx.GraphModule(torch.nn.Module(), graph)(*inputs)
    assert got.dtype == eager.dtype == torch.bool
    assert torch.equal(got, eager), name
