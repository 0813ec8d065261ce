"""gw.trace / gw.explain: provenance, classification and kinks, checked against independent references.

References: the contamination cases' own ``genuine`` flag and `gw.grad` (strong zeros) for the classification,
float64 one-sided finite differences for kinks, and the same program with the unused values deleted for the
property test.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import itertools
import json
import math
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import case_files
import gradwise as gw
import gradwise._strong_zeros
from _memory import NaNEmpty
from _nested import checkpointed, grad_of, sin_exp_sin
from gradwise._trace import _common


def _load_cases():
    """The project's acceptance cases (tests/cases/contamination.py): EXPECTED below is written for them."""
    return {c.name: c for c in case_files.load(case_files.PROJECT / "contamination.py", "trace").CASES}


CASES = _load_cases()

# case -> (op where the NaN/Inf was born, text on its source line, op whose backward zeroed the sensitivity).
# Born "in the backward" (0/0) is reported at the line of the forward op whose backward made it.
EXPECTED = {
    "linear-rows-sliced-away": ("aten.full", "torch.full((4, 8), nan)", "aten.slice"),
    "log-then-index": ("aten.div", "a.log()[-1]", "aten.select"),
    "nan-row-masked-fill-after-linear": ("aten.fill_", "x[2] = nan", "aten.masked_fill"),
    "mse-none-masked-after": ("aten.lift_fresh", "y = torch.tensor([0.0, nan])", "aten.index"),
    "divide-by-zero-then-index": ("aten.div", "(x / div)", "aten.index"),
    "where-false-branch-divides-by-zero": ("aten.div", "a / 0", "aten.where"),
    "where-sqrt-or-half": ("aten.div", "x.sqrt() + 1", "aten.where"),
    "where-exp-overflows-in-unused-branch": ("aten.exp", "out = torch.where(x < 0, torch.exp(x)", "aten.where"),
    "where-log2-at-zero-unused": ("aten.div", "torch.log2(x)", "aten.where"),
    "where-sqrt-of-negatives-unused": ("aten.sqrt", "torch.sqrt(x)", "aten.where"),
    "overwritten-element-keeps-nan": ("aten.exp", "torch.log(torch.exp(x) + 1)", None),
    "softmax-fully-masked-row-unused": ("aten._softmax", "torch.softmax(m, 1)[0]", "aten.select"),
    "min-of-one-and-reciprocal": ("aten.reciprocal", "1.0 / x", "aten.minimum"),
    "where-x-times-sqrt-at-zero": ("aten.div", "x * x.sqrt()", "aten.where"),
    "conv-output-cropped": ("aten.lift_fresh", "inp = torch.tensor([[[[1.0, nan]]]])", "aten.select"),
    "cross-entropy-ignore-index-nan-logits": ("aten.fill_", "h[3] = nan", "aten.nll_loss_forward"),
    "sqrt-of-negative-is-used": ("aten.sqrt", "x.sqrt().sum()", None),
    "sqrt-at-zero-is-used": ("aten.div", "x.sqrt().sum()", None),
    "nan-row-is-used": ("aten.full", "torch.full((4, 8), nan)", None),
}


def _line(location: str) -> str:
    path, _, line = location.rpartition(":")
    return Path(path).read_text().splitlines()[int(line) - 1]


def _trace_case(case):
    with gw.trace() as report:
        output, inputs, _ = case.build()
        torch.autograd.grad(output, inputs, allow_unused=True)
    return report


def test_every_case_has_an_expectation():
    assert set(EXPECTED) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_case_classification_birth_and_line(name):
    case = CASES[name]
    report = _trace_case(case)
    errors = report.of_kind("contamination", "nan", "inf")
    kinds = {f.kind for f in errors}
    if case.genuine:
        assert kinds and kinds <= {"nan", "inf"}, str(report)
    else:
        assert kinds == {"contamination"}, str(report)
    born_op, born_text, discarded_op = EXPECTED[name]
    f = errors[0]
    assert f.born_op == born_op, str(report)
    assert born_text in _line(f.born_location), str(report)
    assert f.location.endswith(tuple(f":{n}" for n in range(1, 10_000))) and _line(f.location)
    if not case.genuine:
        assert "gw.strong_zeros()" in f.fix and "Local rewrite" in f.fix
        assert f.discarded_location is not None, str(report)
        if discarded_op is not None:
            assert f.discarded_op == discarded_op, str(report)
        assert f.reaches, str(report)


@pytest.mark.parametrize("name", sorted(CASES))
def test_classification_agrees_with_strong_zeros(name):
    """contamination <=> gw.grad (strong zeros) gives a finite gradient; genuine <=> it stays non-finite."""
    if (gradwise._strong_zeros.__doc__ or "").startswith("PLACEHOLDER"):
        pytest.skip("gw.grad is still the placeholder (plain torch.autograd.grad)")
    case = CASES[name]
    report = _trace_case(case)
    output, inputs, _ = case.build()
    finite = all(bool(torch.isfinite(g).all()) for g in gw.grad(output, inputs, allow_unused=True) if g is not None)
    genuine_reaches = any(f.reaches for f in report.of_kind("nan", "inf"))
    assert finite == (not genuine_reaches), str(report)
    assert finite == (not case.genuine or name == "nan-row-is-used")  # that control differentiates the bias only


def _reported_cases():
    out = []
    for path in sorted((Path(__file__).resolve().parent / "reported").glob("contamination_*.py")):
        spec = importlib.util.spec_from_file_location(f"trace_reported_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        out += [pytest.param(c, id=f"{path.stem}-{c.name}", marks=[pytest.mark.xfail(
            reason=TRACE_KNOWN[c.name], strict=True)] if c.name in TRACE_KNOWN else [])
                for c in module.CASES if not c.genuine]
    return out


# Reported cases that strong zeros clean but whose report still calls something genuine (not yet fixed)
TRACE_KNOWN = {
    "checkpoint-reentrant-block-nan-rows-sliced": "PyTorch: reentrant checkpoint is incompatible with .grad()",
}


@pytest.mark.parametrize("case", _reported_cases())
def test_reported_classification_agrees_with_strong_zeros(case):
    """On the reported cases: where strong zeros make a leaf's gradient finite, the report calls what reached it
    contamination and no genuine NaN/Inf reaches that leaf."""
    output, inputs, _ = case.build()
    grads = gw.grad(output, inputs, allow_unused=True)
    plain_bad = [i for i, g in enumerate(torch.autograd.grad(*case.build()[:2], allow_unused=True))
                 if g is not None and not bool(torch.isfinite(g).all())]
    cleaned = [i for i in plain_bad if grads[i] is not None and bool(torch.isfinite(grads[i]).all())]
    if not cleaned or len(cleaned) < len(plain_bad):
        pytest.skip("strong zeros leave this case non-finite (a known limit, see test_reported_cases.py)")
    report = _trace_case(case)
    assert report.of_kind("contamination"), str(report)
    assert not any(f.reaches for f in report.of_kind("nan", "inf")), str(report)


def _trace_grad(program, x, create_graph, again):
    """The report of one backward of ``program(x)``; ``again``: after an earlier backward and an op, which begin
    a new step whose forward met no NaN (the trace then keeps no shadow strong pass)."""
    with gw.trace() as report:
        out = program(x)
        if again:
            y = x.detach().clamp_min(1.0).requires_grad_()
            torch.autograd.grad(y.sqrt().sum(), [y])
            torch.zeros(1)
        torch.autograd.grad(out, [x], create_graph=create_graph)
    return report


_IGNORED_NAN_PROGRAMS = {
    "fmax": lambda x: torch.fmax(torch.zeros(3), x.sqrt()).sum(),
    "fmin-then-ops": lambda x: torch.fmin(torch.ones(3), 2 * x.sqrt() + 1).exp().sum(),
}


@pytest.mark.parametrize("name", sorted(_IGNORED_NAN_PROGRAMS))
@pytest.mark.parametrize(("create_graph", "again"), [(True, False), (False, True)])
def test_a_nan_that_fmax_ignores_is_contamination_without_a_shadow(name, create_graph, again):
    """fmax/fmin ignore a lone NaN operand (sqrt(-1) here), whose gradient is then a structural zero (gw.grad
    gives 0 there). torch 2.14's fmax backward passes it the whole gradient (2.13's fills a zero), and the trace
    without its shadow strong pass (create_graph; a step begun again after another backward) decided by that
    value: 'genuine NaN: the output depends on it', against gw.grad."""
    program = _IGNORED_NAN_PROGRAMS[name]
    x = torch.tensor([0.5, 3.0, -1.0], requires_grad=True)
    (g,) = gw.grad(program(x), [x])
    assert g.isfinite().all() and g[2] == 0
    report = _trace_grad(program, x, create_graph, again)
    (f,) = report.of_kind("contamination")
    assert f.reaches == ["x"] and f.op == "aten.div", str(report)
    assert not report.of_kind("nan", "inf"), str(report)


def test_a_genuine_nan_beside_a_nan_fmax_ignores_stays_genuine():
    """The same, with a second sqrt(-1) the output uses at the same element: genuine, as gw.grad keeps it."""
    x = torch.tensor([0.5, 3.0, -1.0], requires_grad=True)
    program = _IGNORED_NAN_PROGRAMS["fmax"]
    (g,) = gw.grad(program(x) + x.sqrt().sum(), [x])
    assert g[2].isnan()
    report = _trace_grad(lambda x: program(x) + x.sqrt().sum(), x, True, False)
    assert [f.reaches for f in report.of_kind("nan")] == [["x"]], str(report)


def test_square_matmul_is_no_elementwise_op():
    """A matmul whose operands and result share a shape (square matrices) mixes rows all the same: a zero
    sensitivity row meeting a NaN row is contamination, not 'genuine where the sensitivity is nonzero' (the trace
    paired elements by position whenever shapes agreed, and called hand-written attention's padding genuine)."""
    w = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(4, 4)
    x[3] = float("nan")
    with gw.trace() as report:
        (x @ w)[:3].sum().backward()
    (f,) = report.findings
    assert (f.kind, f.op, f.reaches, f.discarded_op) == ("contamination", "aten.mm", ["w"], "aten.slice"), str(report)
    (g,) = gw.grad((x @ w)[:3].sum(), [w])
    assert g.isfinite().all()  # the same verdict as strong zeros


def test_an_infinite_derivative_annihilated_downstream_is_contamination():
    """sqrt's derivative at a masked probability p = exp(-inf) = 0 is infinite: a nonzero sensitivity meets it
    (genuine, seen alone), but softmax's backward multiplies it by p, a structural zero, and strong zeros
    annihilate it there. The trace follows that fate: one contamination finding at the softmax, born at sqrt's
    backward, and no genuine Inf."""
    logits = torch.randn(2, 4, requires_grad=True)
    masked = torch.tensor([[False, True, False, False], [False, False, False, True]])

    def loss():
        return torch.softmax(logits.masked_fill(masked, -math.inf), -1).sqrt().sum()

    (g,) = gw.grad(loss(), [logits])
    assert g.isfinite().all() and not torch.autograd.grad(loss(), [logits])[0].isfinite().all()
    with gw.trace() as report:
        loss().backward()
    assert not report.of_kind("nan", "inf"), str(report)
    (f,) = report.of_kind("contamination")
    assert f.op == "aten._softmax_backward_data" and f.reaches == ["logits"], str(report)
    assert "the backward of aten.sqrt" in f.message, str(report)


def test_an_infinite_derivative_stays_genuine_when_the_output_is_not_finite():
    """The same program with a NaN output: strong zeros keep softmax's zero output an ordinary value there (its
    rule reads it as structural only when the outputs are finite), and the trace keeps the genuine finding."""
    logits = torch.randn(2, 4, requires_grad=True)
    masked = torch.tensor([[False, True, False, False], [False, False, False, True]])
    bad = torch.tensor(float("nan"))

    def loss():
        return torch.softmax(logits.masked_fill(masked, -math.inf), -1).sqrt().sum() + bad

    (g,) = gw.grad(loss(), [logits])
    assert not g.isfinite().all()
    with gw.trace() as report:
        loss().backward()
    assert report.of_kind("nan", "inf"), str(report)


def test_contamination_no_gradient_receives_is_no_finding():
    """logcumsumexp's backward takes log|g| (log 0 = -inf at the sliced-away positions) and then replaces it with
    the lowest float: that -inf reaches no gradient, so it is listed with the values nothing used, not as a
    finding; the NaN that does reach x is the finding."""
    x = torch.tensor([1.0, 2.0, 0.5, math.nan, math.nan], requires_grad=True)
    with gw.trace() as report:
        torch.logcumsumexp(x, 0)[:3].sum().backward()
    (f,) = report.findings
    assert f.kind == "contamination" and f.reaches == ["x"], str(report)
    assert any("aten.log at" in u and "in the backward" in u for u in report.unused), str(report)


def test_contamination_beneath_a_genuine_nan_is_not_listed_as_unused():
    """Contamination that a mixing op (the matmul to a weight's gradient, a bias sum) takes in beside a genuine NaN
    covering each element it reaches is no finding (gw.grad's gradient is NaN there too), and no value that 'no
    gradient used' either: the gradient used it. It was listed under 'Not errors' as unused: cross_entropy's
    ignored NaN row beside a used one, and a padded training loop whose parameters are NaN from step 1 on (the
    padding's zero sensitivity meets the NaN weight in the backward of the second Linear, reading-a-report's
    example). Reference: the gradients with the discarded rows deleted, NaN at the same elements."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(4, 4)
    x[1, 0] = x[2, 0] = math.nan  # row 1 used, row 2 ignored
    y = torch.tensor([0, 1, -100, 2])
    with gw.trace() as report:
        F.cross_entropy(lin(x), y).backward()
    kept = gw.grad(F.cross_entropy(lin(x[[0, 1, 3]]), y[[0, 1, 3]]), list(lin.parameters()))
    assert all(torch.equal(p.grad.isnan(), k.isnan()) and k.isnan().all()
               for p, k in zip(lin.parameters(), kept, strict=True))
    assert [(f.kind, f.reaches) for f in report.findings] == [("nan", ["lin.bias", "lin.weight"])], str(report)
    assert report.unused == [], str(report)

    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gw.trace() as report:
        for step in range(2):
            xb = torch.cat((torch.randn(3, 6), torch.full((2, 6), math.nan)))
            loss = model(xb)[:3].square().mean()
            opt.zero_grad()
            loss.backward()
            if step:  # the parameters are NaN: without the padding, every gradient is NaN all the same
                kept = gw.grad(model(xb[:3]).square().mean(), list(model.parameters()))
                assert all(p.grad.isnan().all() and k.isnan().all()
                           for p, k in zip(model.parameters(), kept, strict=True))
            opt.step()
    (c,) = report.of_kind("contamination")
    assert c.born_op == "aten.full" and c.step == 0 and c.reaches == ["model.0.weight", "model.2.weight"], \
        str(report)
    assert report.unused == [], str(report)


def test_whole_formula_sensitivities_are_not_kept_across_steps():
    """The trace keeps g at logcumsumexp's first backward op for its last; a finite backward never reaches that
    step, and the next backward drops what it kept: held one backward at most, not one per step."""
    from gradwise._trace import _session

    x = torch.randn(5, requires_grad=True)
    with gw.trace():
        tracer = _session._TRACERS[threading.get_ident()]
        for _ in range(5):
            torch.logcumsumexp(x, 0)[:3].sum().backward()
            assert len(tracer.formula_g) <= 1


def test_backward_inputs_that_are_not_leaves_are_reached():
    """``backward(inputs=[h])`` for a non-leaf h fills h.grad without an AccumulateGrad node: the contamination
    that reaches it is a finding that names h, not a value nothing used."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3)
    x = torch.randn(6, 3)
    x[4:] = math.nan
    with gw.trace() as report:
        h = lin(x)
        h.exp()[:4].sum().backward(inputs=[h])
    (f,) = report.findings
    assert (f.kind, f.reaches) == ("contamination", ["h"]), str(report)
    assert not h.grad[4:].isfinite().any()


_COLUMNS_OUT = torch.tensor([False, True, False, False])  # a column the masked softmax below gives weight 0
# row-wise steps of the random programs (each row of the batch stays its own, but for "centre", which mixes them)
_STEPS = {
    "relu": torch.relu, "tanh": torch.tanh, "exp": torch.exp, "softmax": lambda h: torch.softmax(h, -1),
    "masked softmax": lambda h: torch.softmax(h.masked_fill(_COLUMNS_OUT, -math.inf), -1),
    "square matmul": lambda h: h @ torch.linspace(-1.0, 1.0, 16).reshape(4, 4),
}
_TAILS = {"sum": lambda h: h.sum(), "square mean": lambda h: h.square().mean(),
          "sqrt": lambda h: torch.softmax(h.masked_fill(_COLUMNS_OUT, -math.inf), -1).sqrt().sum(),
          "entropy": lambda h: torch.special.entr(torch.softmax(h.masked_fill(_COLUMNS_OUT, -math.inf), -1)).sum()}


@settings(max_examples=60, deadline=None)
@given(nan_rows=st.sets(st.integers(0, 5), max_size=2), keep=st.sets(st.integers(0, 5), min_size=1),
       steps=st.lists(st.sampled_from(sorted(_STEPS)), max_size=3), tail=st.sampled_from(sorted(_TAILS)))
def test_trace_agrees_with_strong_zeros_on_random_programs(nan_rows, keep, steps, tail):
    """One semantics, for programs drawn at random (row-wise steps, a row selection, a tail with an infinite
    derivative at masked zeros or not): a leaf's gradient under gw.grad is finite exactly when no genuine NaN/Inf
    finding of the trace reaches it."""
    torch.manual_seed(0)
    w1 = (torch.randn(4, 4) * 0.5).requires_grad_(True)
    w2 = (torch.randn(4) * 0.5).requires_grad_(True)
    x = torch.rand(6, 4)
    for r in nan_rows:
        x[r] = math.nan
    rows = sorted(keep)

    def program():
        h = x @ w1 + w2
        for name in steps:
            h = _STEPS[name](h)
        return _TAILS[tail](h[rows])

    grads = gw.grad(program(), [w1, w2])
    with gw.trace() as report:
        torch.autograd.grad(program(), [w1, w2])
    genuine = {name for f in report.of_kind("nan", "inf") for name in f.reaches}
    for name, g in zip(("w1", "w2"), grads, strict=True):
        assert bool(g.isfinite().all()) == (name not in genuine), f"{name}, {steps}, {tail}:\n{report}"


def test_a_zero_computed_by_subtraction_is_no_structural_zero():
    """h - h.mean(0) summed: the sensitivity of h is 1 - 6 / 6 = 0, a zero the program computes, below no node
    where strong zeros can start a structural zero (their own fact, may_make_structural_zeros). gw.grad keeps the
    NaN that meets it; the trace calls it genuine, reaching w."""
    w = torch.randn(4, 4, requires_grad=True)
    x = torch.rand(6, 4)
    x[0] = math.nan

    def program():
        h = x @ w
        return (h - h.mean(0)).sum()

    assert not gw.grad(program(), w)[0].isfinite().any()
    with gw.trace() as report:
        torch.autograd.grad(program(), w)
    assert not report.of_kind("contamination") and any("w" in f.reaches for f in report.of_kind("nan")), str(report)


def test_a_computed_zero_below_a_selection_that_drops_nothing():
    """An index that reads every row makes no structural zero (strong zeros' node fact): the zero the centring
    computes below it is an ordinary zero, 0 x NaN = NaN is genuine, for the trace as for gw.grad."""
    w = torch.randn(4, 4, requires_grad=True)
    x = torch.rand(6, 4)
    x[0] = math.nan

    def program():
        h = x @ w
        return (h - h.mean(0))[[0, 1, 2, 3, 4, 5]].sum()

    assert not gw.grad(program(), w)[0].isfinite().any()
    with gw.trace() as report:
        torch.autograd.grad(program(), w)
    assert not report.of_kind("contamination") and any("w" in f.reaches for f in report.of_kind("nan")), str(report)


def test_a_computed_zero_beside_a_selections_zeros():
    """A zero the program computes (h[:, :2] - h[:, :2]) in the same tensor as a slice's structural zeros: gw.grad
    keeps NaN in columns 0-1 (genuine) and 0 in columns 2-3 (contamination). The trace kept no supports and took
    every zero of that sensitivity for the slice's; its shadow strong pass (_trace/_shadow) tells them apart."""
    w = torch.randn(4, 4, requires_grad=True)
    x = torch.rand(6, 4)
    x[0] = math.nan

    def program():
        h = x @ w
        return (h[:, :2] * 1 - h[:, :2]).sum()

    grad = gw.grad(program(), w)[0]
    assert grad[:, :2].isnan().all() and (grad[:, 2:] == 0).all()
    with gw.trace() as report:
        torch.autograd.grad(program(), w)
    assert any("w" in f.reaches for f in report.of_kind("nan")), str(report)
    assert any("w" in f.reaches for f in report.of_kind("contamination")), str(report)


def test_seed_names_and_rows():
    torch.manual_seed(137)
    lin = torch.nn.Linear(8, 1)
    x = torch.cat((torch.rand(4, 8), torch.full((4, 8), float("nan"))))  # arrives non-finite: made outside
    with gw.trace() as report:
        lin(x)[:4].sum().backward()
    (f,) = report.findings
    assert (f.kind, f.op, f.reaches, f.born_op) == ("contamination", "aten.mm", ["lin.weight"], "input")
    assert "x arrived with 32 NaN" in f.born
    assert f.discarded_op == "aten.slice" and "lin(x)[:4]" in f.source
    assert lin.weight.grad.isnan().any()  # the user's own plain backward ran, untouched



def test_a_trace_per_step_names_the_parameters_once(monkeypatch):
    """A loop that opens a trace per step: the first trace walks the stack to name the parameters, later ones
    at the same op reuse that name (the walk is most of a small step's trace cost); another place is walked
    again and gets its own name."""
    from gradwise._trace import _tracer

    walks = []
    search = _tracer._Tracer._search_names
    monkeypatch.setattr(_tracer._Tracer, "_search_names", lambda self, ts, frame: walks.append(
        sum(t is p for t in ts for p in lin.parameters())) or search(self, ts, frame))
    lin = torch.nn.Linear(8, 1)
    x = torch.cat((torch.rand(4, 8), torch.full((4, 8), float("nan"))))  # named in each step: a finding's input
    reaches, parameter_walks = [], []
    for _ in range(3):
        walks.clear()
        with gw.trace() as report:
            lin(x)[:4].sum().backward()
        reaches.append(report.findings[0].reaches)
        parameter_walks.append(sum(walks))
    assert reaches == [["lin.weight"]] * 3 and parameter_walks == [2, 0, 0]
    other = lin

    def elsewhere():
        with gw.trace() as report:
            other(x)[:4].sum().backward()
        return report

    walks.clear()
    assert elsewhere().findings[0].reaches == ["other.weight"] and sum(walks) == 2

def test_deferred_checks_match_immediate(monkeypatch):
    """Batched finiteness checks (the accelerator path) give the same report on the seed."""
    case = CASES["linear-rows-sliced-away"]
    immediate = _trace_case(case)
    monkeypatch.setattr(_common, "_DEFER_ON_CPU", True)
    with gw.trace(sync_every=64) as report:
        output, inputs, _ = case.build()
        torch.autograd.grad(output, inputs)
    assert [f.as_dict() for f in report.findings] == [f.as_dict() for f in immediate.findings]
    x = torch.tensor([0.0, 1.0], requires_grad=True)
    with gw.trace(sync_every=64) as report:
        torch.relu(x).sum().backward()
    assert [(f.kind, f.op, f.count) for f in report.findings] == [("kink", "aten.relu", 1)]


def test_repeats_are_grouped_not_flooded():
    lin = torch.nn.Linear(8, 1)
    x = torch.cat((torch.rand(4, 8), torch.full((4, 8), float("nan"))))
    with gw.trace() as report:
        for _ in range(5):
            lin(x)[:4].sum().backward()
    (f,) = report.findings
    assert f.occurrences == 5 and f.count == 5 * 8


def test_transformer_padding_masks_are_not_alarms():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0,
                                             batch_first=True)
    x = torch.randn(3, 10, 32)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[0, 6:] = True
    pad[2, 3:] = True
    with gw.trace() as report:
        out = layer(x, src_key_padding_mask=pad)
        out[~pad].square().mean().backward()
    assert not report.of_kind("contamination", "nan", "inf"), str(report)
    assert all(p.grad is not None and p.grad.isfinite().all() for p in layer.parameters())


def test_custom_function_and_several_backward_calls():
    class Log(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.log()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g / x

    x = torch.tensor([0.0, 1.0, 2.0], requires_grad=True)
    with gw.trace() as report:
        Log.apply(x)[1:].sum().backward()
        (g,) = torch.autograd.grad(Log.apply(x)[2], x)
    (f,) = report.of_kind("contamination")
    assert f.occurrences == 2 and f.reaches == ["x"] and f.op == "aten.div"
    assert g.isnan().any()


def test_training_steps_after_a_contaminated_gradient():
    """An optimizer step writes a contaminated gradient into a parameter; the next steps use it. The report
    traces the later NaN back to that gradient, and accumulating into a .grad that is already NaN is no finding
    of its own."""
    w1 = torch.ones(3, 3, requires_grad=True)
    w2 = torch.ones(3, requires_grad=True)
    x = torch.ones(4, 3)
    x[3] = float("nan")
    with gw.trace() as report:
        ((x @ w1) @ w2)[:3].sum().backward()  # w1.grad and w2.grad contaminated
        with torch.no_grad():
            w2 -= w2.grad  # the NaN gradient becomes the parameter
        ((torch.ones(2, 3) @ w1) @ w2).sum().backward()  # accumulates into w1.grad, already NaN
    assert {f.op for f in report.of_kind("contamination")} >= {"aten.mm", "aten.mv"}
    (genuine,) = report.of_kind("nan")
    assert genuine.op == "gradient" and "w2 -= w2.grad" in genuine.source and "earlier backward" in genuine.fix
    assert "contamination" in genuine.message


def test_a_custom_functions_own_backward_is_named():
    """The user's backward is where the Inf is made: its line and the Function's node, not the first op inside
    its forward (which ran under no_grad and is no kink of the program's)."""
    class SafeRelu(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.relu(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (x >= 0) / x.abs().sqrt()  # Inf at x == 0

    x = torch.tensor([0.0, 1.0, 4.0], requires_grad=True)
    with gw.trace() as report:
        SafeRelu.apply(x).sum().backward()
    (f,) = report.of_kind("inf")
    assert f.op == "SafeReluBackward" and "x.abs().sqrt()" in f.source and not report.of_kind("kink")


def test_genuine_overflow_in_exp():
    x = torch.tensor([1.0, 100.0], requires_grad=True)
    report = gw.explain(lambda x: x.exp().sum(), x)
    (f,) = report.of_kind("inf")
    assert f.op == "aten.exp" and "overflow" in f.message and f.reaches == ["x"]


def test_an_overflow_read_by_a_backward_beside_an_upstream_inf_is_a_cause():
    """exp overflows, e / e.sum() makes p[1] = 0 and log(0) = -inf. The division's backward reads the Inf sum
    with the -inf sensitivity of the log: the overflow reached the gradient too (it was listed as a value no
    gradient used, and the log named alone). Reference: the same program without the overflow (z[0] = 10) has a
    finite gradient and no finding."""
    def run(first):
        z = torch.tensor([first, 1.0, 2.0], requires_grad=True)
        with gw.trace() as report:
            e = torch.exp(z) * 1e3
            p = e / e.sum()
            (-(p[1].log())).backward()
        return report, z.grad

    plain, grad = run(10.0)
    assert bool(grad.isfinite().all()) and not plain.findings, str(plain)
    report, grad = run(100.0)
    assert not bool(grad.isfinite().all())
    assert any(f.born_op == "aten.exp" and f.reaches == ["z"] and not f.downstream
               for f in report.of_kind("nan", "inf")), str(report)
    assert not any(u.startswith("aten.exp") for u in report.unused), report.unused
    assert any(c.split(": ", 1)[1].startswith("aten.exp") for c in report.causes), report.causes


def test_empty_report_and_counts():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    report = gw.explain(lambda x: (x * x).sum(), x)
    assert report.findings == [] and report.forward_ops > 0 and report.backward_ops > 0
    assert str(report).count("\n") == 0 and "No NaN/Inf" in str(report)


# -- kinks: each detector at its kink and away from it; one-sided float64 finite differences are the reference --

KINK_SAMPLES = [  # (name, function of x, a point on a kink, a smooth point)
    ("relu", torch.relu, [0.0, 1.0], [0.5, 1.0]),
    ("abs", torch.abs, [0.0, -1.0], [0.5, -1.0]),
    ("leaky_relu", F.leaky_relu, [0.0, 1.0], [0.5, 1.0]),
    ("clamp", lambda x: x.clamp(-1.0, 1.0), [1.0, 0.0], [0.5, 0.0]),
    ("clamp_min", lambda x: x.clamp_min(0.5), [0.5, 2.0], [0.7, 2.0]),
    ("hardtanh", F.hardtanh, [-1.0, 0.0], [-0.5, 0.0]),
    ("threshold", lambda x: F.threshold(x, 0.5, 0.0), [0.5, 2.0], [0.7, 2.0]),
    ("hardshrink", F.hardshrink, [0.5, 2.0], [0.7, 2.0]),
    ("softshrink", F.softshrink, [-0.5, 2.0], [-0.7, 2.0]),
    ("hardsigmoid", F.hardsigmoid, [3.0, 0.0], [2.0, 0.0]),
    ("hardswish", F.hardswish, [-3.0, 0.0], [-2.0, 0.0]),
    ("maximum", lambda x: torch.maximum(x[0], x[1]), [1.0, 1.0], [1.0, 2.0]),
    ("minimum", lambda x: torch.minimum(x[0], x[1]), [1.0, 1.0], [1.0, 2.0]),
    ("fmax", lambda x: torch.fmax(x[0], x[1]), [1.0, 1.0], [1.0, 2.0]),
    ("max", lambda x: x.max(), [2.0, 2.0, 1.0], [2.0, 3.0, 1.0]),
    ("amax", lambda x: x.amax(0), [2.0, 2.0, 1.0], [2.0, 3.0, 1.0]),
    ("max.dim", lambda x: x.max(0).values, [2.0, 2.0, 1.0], [2.0, 3.0, 1.0]),
    ("min.dim", lambda x: x.view(1, 3).min(1).values, [1.0, 1.0, 2.0], [1.0, 3.0, 2.0]),
    ("median", lambda x: x.median(), [1.0, 1.0, 2.0, 3.0], [1.0, 1.5, 2.0, 3.0]),
    ("sort", lambda x: torch.sort(x).values * torch.tensor([1.0, 2.0, 3.0]), [1.0, 1.0, 2.0], [1.0, 1.5, 2.0]),
    ("topk", lambda x: torch.topk(x, 2).values * torch.tensor([1.0, 2.0]), [3.0, 1.0, 1.0], [3.0, 1.0, 1.5]),
    ("max_pool2d", lambda x: F.max_pool2d(x.view(1, 1, 2, 2), 2), [1.0, 1.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0]),
    ("where-gt", lambda x: torch.where(x[0] > x[1], x[0], x[1]), [1.0, 1.0], [1.0, 2.0]),
    ("where-le", lambda x: torch.where(x[0] <= x[1], 2 * x[0], x[1]), [0.0, 0.0], [0.0, 2.0]),
    # facts nonsmooth knew first (gradwise._ops._kinks)
    ("elu", lambda x: F.elu(x, alpha=2.0), [0.0, 1.0], [0.5, 1.0]),
    ("l1_loss", lambda x: F.l1_loss(x[0], x[1]), [1.0, 1.0], [1.0, 2.0]),
    ("smooth_l1_loss-beta0", lambda x: F.smooth_l1_loss(x[0], x[1], beta=0.0), [1.0, 1.0], [1.0, 2.0]),
    ("copysign", lambda x: torch.copysign(x[0], x[1]), [0.0, 1.0], [0.5, 1.0]),
    ("aminmax", lambda x: torch.aminmax(x).max, [2.0, 2.0, 1.0], [2.0, 3.0, 1.0]),
    ("cummax", lambda x: torch.cummax(x, 0).values, [1.0, 1.0, 0.0], [1.0, 2.0, 0.0]),
    ("scatter_reduce-amax", lambda x: x.new_zeros(1).scatter_reduce(0, torch.tensor([0, 0]), x, "amax",
                                                                    include_self=False), [1.0, 1.0], [1.0, 2.0]),
    ("renorm", lambda x: torch.renorm(x.view(1, 2), 2, 0, 5.0), [3.0, 4.0], [1.0, 1.0]),
    ("norm-1", lambda x: torch.linalg.vector_norm(x, 1), [0.0, 1.0], [0.5, 1.0]),
    ("norm-inf", lambda x: torch.linalg.vector_norm(x, math.inf), [1.0, -1.0], [1.0, -2.0]),
    # overlapping windows: hiding each window's maximum and pooling again missed the first window's tie
    ("max_pool2d-overlapping", lambda x: F.max_pool2d(x.view(1, 1, 1, 3), (1, 2), 1), [1.0, 1.0, 0.0],
     [1.0, 2.0, 0.0]),
]
SINGULAR_SAMPLES = [
    ("sqrt", torch.sqrt, [0.0, 1.0], [0.5, 1.0]),
    ("pow-half", lambda x: x**0.5, [0.0, 1.0], [0.5, 1.0]),
    ("norm", lambda x: torch.linalg.vector_norm(x), [0.0, 0.0], [0.0, 1.0]),
    ("asin", torch.asin, [1.0, 0.0], [0.5, 0.0]),
    ("hypot", lambda x: torch.hypot(x[0], x[1]), [0.0, 0.0], [0.0, 1.0]),
]
CONES = {"norm", "hypot"}  # a norm at 0: no infinite derivative, the one-sided derivatives differ (a cone)


def _one_sided(f, x, d, h=1e-6):
    x64 = torch.tensor(x, dtype=torch.float64)
    return float((f(x64 + h * d).sum() - f(x64).sum()) / h)


def _is_kink_fd(f, x):
    """Some coordinate direction where the right and left derivatives differ (float64 one-sided FD)."""
    for i in range(len(x)):
        d = torch.zeros(len(x), dtype=torch.float64)
        d[i] = 1.0
        if abs(_one_sided(f, x, d) + _one_sided(f, x, -d)) > 1e-3:
            return True
    return False


def _is_singular_fd(f, x):
    """The one-sided difference quotient blows up as h shrinks."""
    for i in range(len(x)):
        d = torch.zeros(len(x), dtype=torch.float64)
        d[i] = 1.0
        for s in (d, -d):
            try:
                a, b = abs(_one_sided(f, x, s, 1e-4)), abs(_one_sided(f, x, s, 1e-8))
            except ValueError:
                continue
            if b == b and b > 10 * a + 1:
                return True
    return False


@pytest.mark.parametrize(("name", "f", "at", "smooth"), KINK_SAMPLES + SINGULAR_SAMPLES,
                         ids=[s[0] for s in KINK_SAMPLES + SINGULAR_SAMPLES])
def test_kink_detectors(name, f, at, smooth):
    kind = "singular" if any(name == s[0] for s in SINGULAR_SAMPLES) else "kink"
    reference = _is_singular_fd if kind == "singular" and name not in CONES else _is_kink_fd
    assert reference(f, at) and not reference(f, smooth), "bad sample: not a kink / not smooth"
    for point, expect in ((at, True), (smooth, False)):
        x = torch.tensor(point, requires_grad=True)
        report = gw.explain(lambda x: f(x).sum(), x)
        found = report.of_kind(kind)
        assert bool(found) == expect, f"{name} at {point}:\n{report}"
        if expect:
            assert found[0].convention and found[0].count >= 1 and "test_trace.py" in found[0].location


def iou_minmax(ps, pe, ts, te):
    common = (torch.minimum(pe, te) - torch.maximum(ps, ts) + 1).clamp_min(0)  # KINK-LINE
    return (1 - common / ((pe - ps + 1).clamp_min(0) + (te - ts + 1) - common)).mean()


def iou_stack(ps, pe, ts, te):
    common = (torch.stack([pe, te]).min(0).values - torch.stack([ps, ts]).max(0).values + 1).clamp_min(0)  # KINK-LINE
    return (1 - common / ((pe - ps + 1).clamp_min(0) + (te - ts + 1) - common)).mean()


def iou_where(ps, pe, ts, te):
    common = (torch.where(pe < te, pe, te) - torch.where(ps > ts, ps, ts) + 1).clamp_min(0)  # KINK-LINE
    return (1 - common / ((pe - ps + 1).clamp_min(0) + (te - ts + 1) - common)).mean()


def _tied_windows(x, k, s):
    """Reference: windows of x (no padding) whose maximum occurs more than once, counted one by one."""
    windows = x.unfold(-2, k, s).unfold(-2, k, s).flatten(-2)
    return int(((windows == windows.amax(-1, keepdim=True)).sum(-1) > 1).sum())


@pytest.mark.parametrize(("shape", "k", "s"), [((2, 3, 8, 8), 2, 2), ((2, 3, 9, 7), 2, 2), ((1, 4, 9, 9), 3, 3),
                                               ((2, 3, 8, 8), 3, 2), ((3, 7, 7), 3, 1)])
def test_max_pool_tie_counts(shape, k, s):
    """Integer images tie often. Tied windows are counted exactly, whether they tile the input or overlap."""
    torch.manual_seed(0)
    x = torch.randint(0, 3, shape).float().requires_grad_()
    with gw.trace() as report:
        F.max_pool2d(x, k, s).sum().backward()
    found = sum(f.count for f in report.findings if f.kind == "kink")
    expected = _tied_windows(x.detach(), k, s)
    assert expected > 0
    assert found == expected


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "ceil_mode"),
                         [(3, 1, 1, 1, False), (2, 2, 0, 2, False), (3, 2, 1, 1, True), (2, 2, 0, 1, True)])
def test_max_pool_tie_counts_with_padding_dilation_ceil_mode(kernel, stride, padding, dilation, ceil_mode):
    """Padded, dilated and partial (ceil_mode) windows are counted exactly too: window by window as reference."""
    torch.manual_seed(1)
    x = torch.randint(0, 3, (2, 2, 7, 7)).float()
    padded = F.pad(x, [padding] * 4, value=float("-inf"))
    out = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
    expected = 0
    for i, j in itertools.product(range(out.shape[-2]), range(out.shape[-1])):
        span = (kernel - 1) * dilation + 1
        rows = [r for r in range(i * stride, i * stride + span, dilation) if r < padded.shape[-2]]
        cols = [c for c in range(j * stride, j * stride + span, dilation) if c < padded.shape[-1]]
        window = padded[..., rows, :][..., cols]
        expected += int(((window == out[..., i : i + 1, j : j + 1]).flatten(-2).sum(-1) > 1).sum())
    with gw.trace() as report:
        F.max_pool2d(x.requires_grad_(), kernel, stride, padding, dilation, ceil_mode).sum().backward()
    assert expected > 0
    assert sum(f.count for f in report.findings if f.kind == "kink") == expected


def test_jumps_are_not_reported():
    """floor, round, sign, remainder jump (kind "jump" in gradwise._ops): PyTorch's value there is the derivative
    on both sides, so the trace has nothing to explain."""
    x = torch.tensor([0.0, 1.0, 2.5, -1.0], requires_grad=True)
    report = gw.explain(lambda x: (x.floor() + x.round() + x.sign() + x.remainder(1.0) + x.frac()).sum(), x)
    assert report.findings == []


@pytest.mark.parametrize("case", ["nan", "inf", "wide", "empty", "float64", "bfloat16", "channels_last"])
def test_max_pool_tie_counts_on_every_route(case):
    """The tie count takes a subtraction route (CPU, finite maxima, contiguous 2x2 pairs or strided views) or a
    compare route (NaN/Inf maxima, 16x16 windows whose count would overflow a byte); every route must agree
    with counting window by window."""
    torch.manual_seed(0)
    shape, k, dtype = (2, 3, 8, 8), 2, torch.float32
    x = torch.randint(0, 3, shape).to(dtype)
    if case == "nan":
        x[0, 0, 0, 0] = float("nan")
    elif case == "inf":
        x[0, 0, :2, :2] = float("inf")
    elif case == "wide":
        shape, k = (1, 2, 32, 32), 16
        x = torch.zeros(shape)
        x[0, 0, 0, 0] = float("nan")
    elif case == "empty":
        x = torch.zeros(0, 3, 8, 8)
    elif case == "float64":
        x = x.double()
    elif case == "bfloat16":
        x = x.bfloat16()
    elif case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with gw.trace() as report:
        F.max_pool2d(x, k).sum().backward()
    found = sum(f.count for f in report.findings if f.kind == "kink" and f.op == "aten.max_pool2d_with_indices")
    windows = x.detach().unfold(-2, k, k).unfold(-2, k, k).flatten(-2)
    assert found == int(((windows == windows.amax(-1, keepdim=True)).sum(-1) > 1).sum())
    if case == "wide":
        assert found == 7  # a NaN window has no tie; the other seven all-zero 16x16 windows tie


def test_relu_family_probes_on_complex_and_empty_inputs():
    """The zero probe of relu/abs/sqrt reads min |x| on CPU floats; complex inputs take the counting route."""
    z = torch.tensor([0.0 + 0.0j, 1.0 + 1.0j], requires_grad=True)
    with gw.trace() as report:
        torch.abs(z).sum().backward()
    assert [(f.kind, f.op, f.count) for f in report.findings] == [("kink", "aten.abs", 1)]
    with gw.trace() as report:
        torch.relu(torch.zeros(0, 3, requires_grad=True)).sum().backward()
    assert report.findings == []


@pytest.mark.parametrize(("f", "ops"), [(iou_minmax, {"aten.minimum", "aten.maximum"}),
                                        (iou_stack, {"aten.min", "aten.max"}), (iou_where, {"aten.where"})],
                         ids=["minimum-maximum", "stack-max", "where"])
def test_seed_iou_at_optimum_has_kinks_on_the_right_line(f, ops):
    target = (torch.tensor([5.0, 2.0]), torch.tensor([5.0, 4.0]))
    lines, start = inspect.getsourcelines(f)
    line = start + next(i for i, text in enumerate(lines) if "KINK-LINE" in text)

    def loss(ps, pe):
        return f(ps, pe, *target)

    at_optimum = [t.clone().requires_grad_(True) for t in target]
    # independent check that the optimum is a kink: one-sided derivatives along ps[0] disagree
    x0 = torch.cat([t.double() for t in target])
    flat = lambda v: loss(v[:2], v[2:])
    assert _is_kink_fd(flat, x0.tolist())
    report = gw.explain(loss, *at_optimum)
    kinks = report.of_kind("kink")
    assert {k.op for k in kinks} == ops, str(report)
    assert all(k.location.endswith(f"test_trace.py:{line}") and k.reached_gradient for k in kinks)
    assert not report.of_kind("contamination", "nan", "inf")
    away = [t.clone().add_(0.25).requires_grad_(True) for t in target]
    assert not gw.explain(loss, *away).of_kind("kink")


# -- property: the classification agrees with the program rewritten without the unused values -----------------


@settings(max_examples=25, deadline=None)
@given(nan_rows=st.sets(st.integers(0, 5)), keep_rows=st.sets(st.integers(0, 5), min_size=1))
def test_row_selection_property(nan_rows, keep_rows):
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    x = torch.rand(6, 3)
    for r in nan_rows:
        x[r] = float("nan")
    keep = sorted(keep_rows)
    with gw.trace() as report:
        lin(x)[keep].sum().backward()
    # reference: the same program with the unused rows deleted
    lin.zero_grad()
    lin(x[keep]).sum().backward()
    rewritten_finite = bool(lin.weight.grad.isfinite().all())
    used, unused = nan_rows & keep_rows, nan_rows - keep_rows
    assert rewritten_finite == (not used)
    assert bool(report.of_kind("nan")) == bool(used), str(report)
    # every weight-gradient element mixes all rows: a used NaN row makes them genuinely NaN, so contamination
    # shows only when every NaN row is unused
    assert bool(report.of_kind("contamination")) == bool(unused and not used), str(report)


# -- bad input --------------------------------------------------------------------------------------------


def test_explain_bad_input():
    x = torch.ones(2, requires_grad=True)
    with pytest.raises(TypeError, match="callable"):
        gw.explain(3, x)
    with pytest.raises(TypeError, match="scalar tensor"):
        gw.explain(lambda x: 1.0, x)
    with pytest.raises(ValueError, match="not a scalar"):
        gw.explain(lambda x: x * 2, x)
    with pytest.raises(TypeError, match="floating-point"):
        gw.explain(lambda x: (x > 0).sum(), x)
    with pytest.raises(ValueError, match="requires_grad"):
        gw.explain(lambda x: x.sum(), torch.ones(2))


def test_nested_trace_shares_the_outer_recording_and_restores_autograd():
    """A script run by `gradwise run` may call gw.explain itself: the inner block's report lists what happened
    inside it, the outer one everything."""
    backward, grad = torch.autograd.backward, torch.autograd.grad
    x = torch.tensor([-1.0, 4.0], requires_grad=True)
    with gw.trace() as outer:
        torch.where(x > 0, x.sqrt(), x).sum().backward()
        inner = gw.explain(lambda x: x.relu().sum(), torch.tensor([0.0, 1.0], requires_grad=True))
    assert [f.kind for f in inner.findings] == ["kink"]
    assert {f.kind for f in outer.findings} == {"contamination", "kink"}
    with pytest.raises(ValueError, match="sync_every"), gw.trace(sync_every=0):
        pass
    assert (torch.autograd.backward, torch.autograd.grad) == (backward, grad)


def test_report_is_filled_when_the_block_raises():
    x = torch.tensor([-1.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="boom"), gw.trace() as report:
        x.sqrt().sum().backward()
        raise RuntimeError("boom")
    assert report.of_kind("nan")


def test_torch_func_transforms_run_under_trace():
    """torch.func.grad calls torch.autograd.grad with batched tensors under vmap: the trace must not read them."""
    f = lambda x: torch.where(x > 0, x.sqrt(), x).sum()
    xs = torch.tensor([[-1.0, 4.0], [9.0, 1.0]])
    expected = torch.func.vmap(torch.func.grad(f))(xs)
    with gw.trace():
        got = torch.func.vmap(torch.func.grad(f))(xs)
    assert torch.equal(got.nan_to_num(), expected.nan_to_num()) and got.isnan().sum() == 1


@pytest.mark.parametrize(("op", "values", "expected"), [
    (torch.log, [1.0, -1.0, 3.0, -0.5], "log of 2 value(s) below 0 and 0 at 0"),
    (torch.log1p, [1.0, -1.0, -3.0], "log1p of 1 value(s) below -1 and 1 at -1"),
    (torch.sqrt, [4.0, -1.0], "root of 1 negative value(s)"),
])
def test_a_birth_says_why_from_the_op_inputs(op, values, expected):
    x = torch.tensor(values, requires_grad=True)
    report = gw.explain(lambda x: op(x * 1.0).sum(), x)
    assert any(expected in f.message for f in report.findings), str(report)


@pytest.mark.parametrize("softmax", [torch.softmax, torch.log_softmax])
def test_a_softmax_nan_is_explained_by_what_its_row_holds(softmax):
    """softmax is NaN over a row that is entirely -inf (a fully masked row) and over a row holding +inf
    (exp(inf - inf): an overflow or an infinity before it), which it also called a fully masked row. Each
    message must match the row's own values."""
    def finding(row):
        z = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
        with gw.trace() as report:
            softmax(z + torch.tensor(row), 0)[1].backward()
        (f,) = report.of_kind("nan")
        return f

    inf, ninf = float("inf"), float("-inf")
    masked, overflowed = finding([ninf, ninf, ninf]), finding([inf, 0.0, 0.0])
    assert "entirely -inf" in masked.message and "+inf" not in masked.message, masked
    assert "+inf" in overflowed.message and "mask" not in overflowed.message + overflowed.fix, overflowed
    z = torch.tensor([100.0, 1.0, 2.0], requires_grad=True)
    with gw.trace() as report:  # the overflow is the root; what the softmax made of it is told after it
        softmax(torch.exp(z), 0)[1].backward()
    (f,) = report.of_kind("nan")
    assert f.born_op == "aten.exp" and "+inf" in f.born and "mask" not in f.born, f.born


def test_sort_and_topk_ties_are_reported_at_their_input_positions():
    x = torch.tensor([1.0, 5.0, 2.0, 5.0, 0.0, 7.0], requires_grad=True)
    with gw.trace() as report:
        v, _ = x.topk(3)  # 7, 5, 5: x[1] and x[3] tie
        s, _ = torch.sort(x)  # 0 1 2 5 5 7
        (v.sum() + (s * torch.arange(6.0)).sum()).backward()
    for op in ("aten.topk", "aten.sort"):
        (f,) = [f for f in report.of_kind("kink") if f.op == op]
        assert f.count == 2 and f.indices == [[1], [3]], str(report)


def test_unused_since_names_the_slice_not_a_relu_on_the_way():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 4)
    x = torch.cat([torch.randn(4, 3), torch.full((2, 3), float("nan"))])
    with gw.trace() as report:
        torch.relu(lin(x))[:4].sum().backward()
    f = report.of_kind("contamination")[0]
    assert f.discarded_op == "aten.slice" and "select first" in f.fix, str(report)


def test_a_nan_loss_made_in_the_forward_is_explained_there():
    """A mean cross-entropy over targets of total weight 0 is 0/0 in the forward: the finding says so (its
    backward also divides by 0, which is not the first cause)."""
    z = torch.randn(2, 3, requires_grad=True)
    with gw.trace() as report:
        F.cross_entropy(z, torch.tensor([2, 2]), weight=torch.tensor([1.0, 1.0, 0.0])).backward()
    (f,) = report.of_kind("nan")
    assert f.op == "aten.nll_loss_forward" and "total weight" in f.message and f.reaches == ["z"], str(report)


def test_reentrant_checkpoint_is_no_genuine_nan():
    """checkpoint(use_reentrant=True) runs a backward inside the backward on recomputed activations; NaN rows
    sliced away after it are contamination, not a NaN the output uses."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(6, 4)
    x[4:] = float("nan")
    x.requires_grad_(True)
    with gw.trace() as report:
        h = torch.utils.checkpoint.checkpoint(lambda h: torch.tanh(lin(h)), x, use_reentrant=True)
        h[:4].sum().backward()
    assert report.of_kind("contamination") and not report.of_kind("nan", "inf"), str(report)


@torch.library.custom_op("gwtrace::rowdot", mutates_args=())
def _rowdot(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w


@torch.library.custom_op("gwtrace::rowdot_backward", mutates_args=())
def _rowdot_backward(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return g[:, None] * w, (g[:, None] * x).sum(0)


def _rowdot_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


_rowdot.register_autograd(lambda ctx, g: _rowdot_backward(g, *ctx.saved_tensors), setup_context=_rowdot_setup)


def test_an_op_without_a_rule_is_not_called_genuine_without_saying_so():
    """A NaN row sliced away after a custom op whose backward (a library op) has no strong-zero rule: the zero
    meets the NaN inside it, in w's gradient; the finding says the trace cannot tell (it is contamination)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    x[3] = float("nan")
    w = torch.randn(3, requires_grad=True)
    with gw.trace() as report:
        _rowdot(x, w)[:3].sum().backward()
    assert any("no strong-zero rule" in f.message for f in report.of_kind("nan")), str(report)
    # and its title says so: not "genuine NaN: the output depends on it" above a message saying it is not known
    assert all(f.undecided for f in report.of_kind("nan")), str(report)
    assert "contamination or genuine, not known" in str(report) and "the output depends on it" not in str(report)


def test_float32_lstm_padding_is_traced_as_contamination():
    """A NaN padding row of a float32 LSTM reaches oneDNN's fused backward, which now has a rule: contamination."""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 2)
    x = torch.randn(4, 2, 3)
    x[2:, 1] = float("nan")  # the second sequence's padding steps
    with gw.trace() as report:
        out, _ = lstm(x)
        out[:2, 1].sum().backward()
    assert report.of_kind("contamination") and not report.of_kind("nan"), str(report)


def test_the_json_path_is_fixed_before_the_script_runs(tmp_path):
    import subprocess
    import sys
    script = tmp_path / "moves.py"
    (tmp_path / "sub").mkdir()
    script.write_text("import os\nos.chdir('sub')\n")
    out = subprocess.run([sys.executable, "-m", "gradwise", "run", "--json", "r.json", str(script)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0 and (tmp_path / "r.json").exists() and not (tmp_path / "sub" / "r.json").exists()
    bad = subprocess.run([sys.executable, "-m", "gradwise", "run", "--json", "no/such/dir/r.json", str(script)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "cannot write the JSON report" in bad.stderr


def test_a_nan_written_into_a_view_is_reported_where_the_user_sees_it():
    x = torch.randn(8, 3)
    w = torch.randn(3, requires_grad=True)
    with gw.trace() as report:
        x[5:] = float("nan")
        (x @ w).sum().backward()
    (f,) = report.of_kind("nan")
    assert f.count == 9 and f.indices[:2] == [[5, 0], [5, 1]], str(report)


def test_clip_grad_norm_spreading_a_nan_is_explained():
    """A contaminated weight gradient makes clip_grad_norm_'s total norm NaN, and its scaling writes NaN into
    the bias gradient, which backward left finite: a finding names the write and reaches the bias."""
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 1)
    x = torch.ones(4, 3)
    x[3] = float("nan")
    with gw.trace() as report:
        m(x)[:3].sum().backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    (f,) = [f for f in report.of_kind("nan") if f.reaches == ["m.bias"]]
    assert "clip_grad_norm_" in f.source and "finite after backward" in f.message, str(report)


def test_the_root_cause_tells_a_clip_from_the_update_that_writes_the_parameters():
    """NaN padding (sliced away) makes the weight gradient NaN; clip_grad_norm_ scales every gradient by the
    NaN total norm and the optimizer writes them into the parameters. The root cause said that the clip's line
    'wrote the non-finite gradient into the parameters': it writes into the other gradients; the update
    does. Reference: the same loop without the clip (only the update line, which writes the parameters)."""

    def run(clip):
        torch.manual_seed(0)
        m = torch.nn.Linear(3, 1)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        with gw.trace() as report:
            for step in range(3):
                x = torch.ones(4, 3)
                if step == 0:
                    x[3] = float("nan")
                opt.zero_grad()
                m(x)[:3].sum().backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)  # the clip
                opt.step()  # the update
        (cause,) = report.causes
        return cause, report

    lines = {n: f"test_trace.py:{i}" for i, line in enumerate(Path(__file__).read_text().splitlines(), 1)
             for n in ("the clip", "the update") if line.endswith(f"# {n}")}
    plain, _ = run(False)
    assert f"{lines['the update']} wrote the non-finite gradient into the parameters" in plain, plain
    clipped, _ = run(True)
    assert f"{lines['the clip']} wrote the non-finite gradient into the parameters" not in clipped, clipped
    assert f"{lines['the clip']} read it and wrote NaN/Inf into the other gradients" in clipped, clipped
    assert f"{lines['the update']} wrote the non-finite gradient into the parameters" in clipped.split(", then ")[1]



def test_uninitialised_memory_is_never_a_birth():
    """empty's output is whatever the memory held: CopySlices' backward writes a new_empty_strided buffer
    before reading it, and a NaN that was in that memory is no finding (it used to be a 'genuine NaN')."""
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    with NaNEmpty(), gw.trace() as report:
        y = x * 2
        y[1] = 0.0
        torch.empty(4)  # never read
        (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, torch.tensor([2.0, 0.0, 2.0]))
    assert not report.findings, str(report)


def test_checkpoint_early_stop_is_not_swallowed():
    """Non-reentrant checkpoint stops its recomputation with an exception (no message): the trace lets it through
    (it is the program's control flow) and the nested second derivative is PyTorch's."""
    grad, ckpt, f = grad_of, checkpointed, sin_exp_sin
    x = torch.tensor(0.3, requires_grad=True)
    want = grad(grad(f))(x)
    with torch.utils.checkpoint.set_checkpoint_early_stop(True), gw.trace():
        got = grad(ckpt(grad(ckpt(f))))(x)
    torch.testing.assert_close(got, want)



def test_pytorchs_implicit_gradient_error_is_not_swallowed():
    """backward()/grad() of a complex scalar without a gradient is PyTorch's error: the trace makes the implicit
    gradient only where PyTorch makes one (a real floating-point scalar), so the error still raises."""
    a = torch.zeros(1, requires_grad=True)
    with gw.trace():
        b = a * 0.5j
        with pytest.raises(RuntimeError, match="implicitly created only for real scalar outputs"):
            b.backward()
        with pytest.raises(RuntimeError, match="implicitly created only for real scalar outputs"):
            torch.autograd.grad(b, a)


def _inference_views():
    a = torch.ones(2, 3, requires_grad=True).clone()
    b = torch.ones(2, 3)
    with torch.inference_mode():
        outs = [a.view_as(a), a.reshape(3, 2), a.flatten(), a.unflatten(1, (3, 1))]
        b.arctan_()  # a composite in-place op on a normal tensor: bumps its version
    meta = [(o._is_view(), torch._C._autograd._get_creation_meta(o) if o._is_view() else None, o.is_inference())
            for o in outs]
    errors = []
    for o in outs:
        try:
            o.add_(1)
            errors.append(None)
        except RuntimeError as e:
            errors.append(str(e).split("\n")[0])
    return meta, errors, b._version


def test_composite_views_in_inference_mode_keep_pytorchs_view_metadata():
    """In inference mode a composite op (view_as, reshape, flatten) reaches the dispatch mode undecomposed, and
    its decomposition ran below ADInplaceOrView: its views lost their creation meta, and modifying one in place
    outside inference mode no longer raised PyTorch's error. The trace runs such ops as plain PyTorch does."""
    want = _inference_views()
    with gw.trace():
        got = _inference_views()
    assert got == want
    assert all(e and "inference mode" in e for e in want[1])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_scripted_autograd_grad_compiles_under_the_trace():
    """torch.jit.script resolves torch.autograd.grad/backward by identity to its builtins: the trace's wrappers
    are registered as those builtins, so scripted code calling them compiles (it did not) and matches plain."""
    def fn(x):
        y = x * x
        return torch.autograd.grad([y.sum()], [x])

    x = torch.tensor([1.0, 2.0], requires_grad=True)
    with gw.trace():
        scripted = torch.jit.script(fn)
        (got,) = scripted(x)
    torch.testing.assert_close(got, 2 * x.detach())


class _Reentrant(torch.Tensor):
    """A subclass whose __torch_dispatch__ runs autograd again inside (PyTorch's enable_reentrant_dispatch)."""

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        with torch.overrides.enable_reentrant_dispatch():
            inner = torch.ones(1, requires_grad=True)
            assert inner.exp().grad_fn is not None
        with torch.utils._mode_utils.no_dispatch():
            return func(*args, **(kwargs or {}))


def test_a_subclass_dispatching_reentrantly_runs_as_plain():
    """Ops on a tensor subclass are the subclass's: the trace defers to its __torch_dispatch__ (NotImplemented)
    with the mode stack as PyTorch has it; calling the op itself from the mode's handler broke the subclass's
    reentrant dispatch (PyTorch's internal assert 'Hit Python dispatch key but no arguments had PyInterpreter')."""
    s = torch.Tensor._make_subclass(_Reentrant, torch.tensor([1.0, 2.0]))
    want = (s * 2).as_subclass(torch.Tensor)
    with gw.trace() as report:
        got = (s * 2).as_subclass(torch.Tensor)
    assert torch.equal(got, want)
    assert "subclass _Reentrant" in str(report), str(report)


class _Passthrough(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _profiled_events(mode):
    x = torch.tensor([1.0, -1.0, 4.0], requires_grad=True)
    with mode, torch.autograd.profiler.profile() as prof:
        y = x.sqrt()  # a NaN: the trace digs in (reductions, masks, a re-run)
        (x * 2 + y).sum().backward()
    base = min(e.sequence_nr for e in prof.function_events if e.sequence_nr >= 0)  # autograd's counter is global
    return [(e.name, e.sequence_nr - base if e.sequence_nr >= 0 else -1) for e in prof.function_events]


def test_the_traces_own_ops_are_not_in_profiler_output():
    """The trace's reductions and re-runs are no ops of the program: profiler output under the trace is the one
    under any dispatch mode (which nests each op under PyTorch's "PythonDispatchMode" record), and the trace
    still explains the NaN."""
    want = _profiled_events(_Passthrough())
    with gw.trace() as report:
        got = _profiled_events(contextlib.nullcontext())
    assert got == want
    assert report.findings, str(report)


def test_nested_jagged_tensor_ops_run_under_the_trace():
    """A nested jagged tensor's ops go through its __torch_dispatch__, which calls ops (sym_size.default) the
    dispatcher has no entry for: the trace's per-op facts must not fail on them (it aborted the process)."""
    with gw.trace():
        nt = torch.nested.nested_tensor([torch.randn(3, 2), torch.randn(2, 2)], layout=torch.jagged,
                                        requires_grad=True)
        c = nt.clone()
    assert c.grad_fn is not None and c.grad_fn._input_metadata[0].is_nested_tensor


def test_a_lazy_module_initialises_under_the_trace():
    """UninitializedParameter is a tensor subclass with PyTorch's disabled __torch_dispatch__: the trace must run
    its ops itself, not defer to it (deferring left materialize's detach with no handler: a TypeError)."""
    lazy = torch.nn.LazyLinear(3)
    with gw.trace() as report:
        lazy(torch.randn(2, 4)).sum().backward()
    assert lazy.weight.shape == (3, 4) and lazy.weight.grad is not None
    assert not report.findings


def test_an_overwritten_nan_behind_a_product_is_contamination():
    """y = sqrt(x) * 1; y[0] = 0: the product passes on the overwrite's structural zero (a maker lies above it),
    so the NaN sqrt made at x[0] = -1 is contamination, as gw.grad removes it (it was genuine: 'a zero from a
    product'). The overwrite (an in-place copy through a view: a CopySlices node numbered after the op's own) is
    named with its line."""
    x = torch.tensor([-1.0, 4.0], requires_grad=True)

    def program():
        y = x.sqrt() * 1
        y[0] = 0.0
        return y.sum()

    assert torch.equal(gw.grad(program(), x)[0], torch.tensor([0.0, 0.25]))
    with gw.trace() as report:
        program().backward()
    (f,) = report.findings
    assert f.kind == "contamination" and f.discarded_op == "aten.copy_" and "x" in f.reaches, str(report)


def test_an_in_place_op_through_a_view_is_located_at_its_line():
    """y[:2].sqrt_() makes the NaN; its backward runs in CopySlices: the finding names sqrt_'s forward line (it
    named the backward call), and strong zeros remove it as the report says."""
    w = torch.tensor([-1.0, 4.0, 1.0], requires_grad=True)

    def program():
        y = w * 1
        y[:2].sqrt_()
        return y[1:].sum()

    line = program.__code__.co_firstlineno + 2
    with gw.trace() as report:
        program().backward()
    (f,) = report.findings
    assert f.kind == "contamination" and f.op == "aten.div" and f.location.endswith(f":{line}"), str(report)
    assert torch.equal(gw.grad(program(), w)[0], torch.tensor([0.0, 0.25, 1.0]))


@pytest.mark.parametrize("call", ["backward", "grad"])
def test_a_nan_seed_is_a_finding(call):
    """A seed the caller passes (y.backward(seed), autograd.grad(..., grad_outputs)) holding NaN: a genuine
    finding born at the backward call, reaching the leaves (the gradient was NaN with nothing reported)."""
    x = torch.tensor([1.0, 4.0], requires_grad=True)
    seed = torch.tensor([math.nan, 1.0])
    with gw.trace() as report:
        y = x.sqrt()
        if call == "backward":
            y.backward(seed)
        else:
            torch.autograd.grad(y, x, seed)
    (f,) = report.findings
    assert f.kind == "nan" and f.born_op == "seed" and f.reaches == ["x"] and "grad_tensors" in f.fix, str(report)


def test_a_finding_steps_where_it_reaches_a_gradient():
    """A NaN written before the loop and first used at step 2: the finding's step is 2 (it was the birth's, 0);
    the root cause keeps the birth's step and says when the output used it."""
    lin = torch.nn.Linear(3, 1)
    with gw.trace() as report:
        data = torch.randn(4, 3)
        data[2, 0] = math.nan
        for step in range(4):
            lin.zero_grad()
            lin(data[step : step + 1]).sum().backward()
    (f,) = report.findings
    assert f.kind == "nan" and f.step == 2, str(report)
    assert report.causes[0].startswith("root cause at step 0") and "uses it at step 2" in report.causes[0]


def test_contamination_through_a_sparse_operand_says_strong_zeros_cannot_remove_it():
    """A sparse operand's NaN sliced away: contamination, but strong zeros run a backward with sparse tensors as
    plain PyTorch (gw.grad keeps the NaN, with a PlainBackwardWarning), so the fix must not promise they remove it
    (it did), and the birth names the sparse operand, not '0/0 or 0 x Inf'."""
    s = torch.sparse_coo_tensor(torch.tensor([[0, 1], [1, 0]]), torch.tensor([1.0, math.nan]), (2, 2),
                                check_invariants=True)
    w = torch.randn(2, 2, requires_grad=True)
    with gw.trace() as report:
        torch.sparse.mm(s, w)[0].sum().backward()
    (f,) = report.of_kind("contamination")
    assert "cannot remove it" in f.fix and "sparse" in f.born, str(report)
    with warnings.catch_warnings():  # (a PlainBackwardWarning, once per process)
        warnings.simplefilter("ignore", gw.PlainBackwardWarning)
        assert gw.grad(torch.sparse.mm(s, w)[0].sum(), w)[0].isnan().any()


def test_a_leftover_loop_variable_does_not_name_a_parameter():
    """`for p in model.parameters(): init(p)` leaves p bound to the last parameter: within a frame the module's
    path names it (the report said 'p' for model.2.bias)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(5, 4)
    x[0, 0] = math.nan
    with gw.trace() as report:
        model(x).square().mean().backward()
    (f,) = report.findings
    assert f.reaches == ["model.0.bias", "model.0.weight", "model.2.bias", "model.2.weight"], str(report)
    assert p is model[2].bias


def test_the_line_that_writes_a_nan_gradient_into_the_parameters_is_named():
    """A line that only reads the NaN gradients (their norm, for logging) before opt.step(): the downstream part
    names opt.step()'s line as the one that wrote them into the parameters (the first reader's line was named)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    step_line = None
    with gw.trace() as report:
        for step in range(3):
            x = torch.randn(4, 3)
            if step == 0:
                x[0, 0] = math.nan
            opt.zero_grad()
            lin(x).square().sum().backward()
            torch.cat([p.grad.flatten() for p in lin.parameters()]).norm()  # logging: reads only
            step_line = inspect.currentframe().f_lineno + 1
            opt.step()
    # (and the logging line starts no step: the gradients are read between a backward and the next forward)
    assert f"py:{step_line} wrote the non-finite gradient into the parameters at step 0" in report.causes[0], \
        report.causes


def test_every_parameter_that_arrives_non_finite_is_named():
    """All parameters NaN on entry: the finding named only the first one read; it names every input that arrived
    non-finite at that line."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    with torch.no_grad():
        for q in model.parameters():
            q.fill_(math.nan)
    with gw.trace() as report:
        model(torch.randn(3, 4)).sum().backward()
    born = " ".join(f.born for f in report.findings)
    # (model.2.bias's gradient, sum(g), stays finite: it reaches no gradient, and the other three are named)
    assert all(n in born for n in ("model.0.weight", "model.0.bias", "model.2.weight")), str(report)


def test_a_narrowing_cast_that_overflows_is_a_birth():
    """float32 -> float16 is no finite-preserving op (65504 is float16's largest): an overflow there is born at the
    cast, in the forward and in the backward (the gradient of w.float() cast back to float16), where the trace
    skipped every cast and reported no NaN/Inf at all."""
    w = torch.full((4,), 1e3, requires_grad=True)
    with gw.trace() as report:
        (w * 1e5).half().float().sum().backward()
    assert [f.born_op for f in report.findings] == ["aten._to_copy"]
    assert report.findings[0].location.rsplit(":", 1)[0].endswith("test_trace.py")
    assert "overflow" in report.findings[0].message
    h = torch.full((4,), 1.0, dtype=torch.float16, requires_grad=True)
    with gw.trace() as report:
        (h.float() * 1e6).sum().backward()
    assert not h.grad.isfinite().any()
    assert [f.born_op for f in report.findings] == ["aten._to_copy"]


@pytest.mark.parametrize("make", ["literal", "full"])
def test_a_nan_seed_made_in_the_block_is_a_finding(make):
    """A seed made inside the block has a birth already (torch.tensor / torch.full): the backward that takes it is
    still a finding (the report was empty beside a NaN gradient)."""
    w = torch.nn.Parameter(torch.ones(3))
    with gw.trace() as report:
        y = w * 2
        seed = torch.tensor([1.0, float("nan"), 0.0]) if make == "literal" else torch.full((3,), float("nan"))
        y.backward(seed)
    assert not w.grad.isfinite().all()
    assert [f.kind for f in report.findings] == ["nan"]


def test_findings_are_ordered_by_line_number():
    """Line numbers sort as numbers ("f.py:9" before "f.py:10"; root cause A is the first finding)."""
    from gradwise._trace._assembly import _line_order

    got = sorted(["f.py:10", "<unknown>", "f.py:9", "e.py:100"], key=_line_order)
    assert got == ["<unknown>", "e.py:100", "f.py:9", "f.py:10"]


@pytest.mark.parametrize("case", ["genuine", "contamination"])
def test_a_nan_born_in_a_backward_is_the_root_of_what_the_optimizer_writes(case):
    """sqrt's backward at 0 makes Inf (genuine) or, under a where that drops it, 0/0 (contamination); the optimizer
    writes that gradient into the parameter. The root cause is the backward op at the sqrt's line and the
    optimizer's write is downstream of it (it was a root cause of its own: 'gradient ... used as a value')."""
    w = torch.nn.Parameter(torch.tensor([0.5, 2.0]))
    opt = torch.optim.SGD([w], lr=0.1)
    with gw.trace() as report:
        for step in range(3):
            opt.zero_grad()
            z = w - w.detach()  # 0, with a gradient
            if step != 1:
                loss = w.sum()
            elif case == "genuine":
                loss = torch.sqrt(z).sum()
            else:
                loss = torch.where(z > 0, torch.sqrt(z), z).sum()
            loss.backward()
            opt.step()
    assert len(report.causes) == 1 and "aten.div" in report.causes[0] and "downstream" in report.causes[0]
    written = [f for f in report.findings if f.op == "gradient"]
    assert written and all(f.downstream for f in written)


def test_a_kink_finding_has_the_step_it_first_happened_at():
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    with gw.trace() as report:
        for step in range(4):
            x = w * (0.0 if step == 2 else 1.0)  # relu at its kink from step 2 on
            torch.relu(x).sum().backward()
    kinks = [f for f in report.findings if f.kind == "kink"]
    assert [f.step for f in kinks] == [2]
    assert json.loads(report.to_json())["findings"][0]["step"] == 2


def test_a_nan_made_in_a_tensor_hook_is_born_at_the_hooks_line():
    """A hook runs the user's code inside the backward: its ops are born at their own line, not at the forward
    line of the op whose node runs the hook (backward formulas, called from the backward's line, still are)."""
    lin = torch.nn.Linear(3, 2)

    def hook(g):
        return g * torch.tensor([0.0, float("inf")])  # the hook's line

    with gw.trace() as report:
        h = lin(torch.randn(2, 3))
        h.register_hook(hook)
        h.sum().backward()
    line = inspect.getsourcelines(hook)[1] + 1
    assert [f.born_location.rsplit(":", 1)[1] for f in report.findings] == [str(line)]


@pytest.mark.parametrize("how", ["trace", "watch"])
def test_a_non_finite_sparse_gradient_is_named(how):
    """nn.Embedding(sparse=True) whose gradient holds NaN (0/0 of an untaken sqrt branch before it): the trace
    reads no sparse values, but it names that gradient instead of reporting 'No NaN/Inf gradients' (and
    gw.watch() noticed nothing at all)."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(5, 3, sparse=True)
    with gw.trace() if how == "trace" else gw.watch() as report:
        e = emb(torch.tensor([0, 2, 4]))
        z = e - e.detach()
        torch.where(z > 0, torch.sqrt(z), z).sum().backward()
    assert not emb.weight.grad.coalesce()._values().isfinite().all()
    assert any(f.op == "sparse gradient" and "weight" in f.location for f in report.findings)


def test_adams_inf_over_inf_is_downstream_of_the_inf_gradient():
    """An Inf gradient into Adam: its update computes inf / inf = NaN into the parameter. That NaN follows from
    the Inf gradient (downstream of its root cause); it was a separate genuine NaN 'made from finite inputs'."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = torch.optim.Adam([w], lr=0.1, foreach=False)
    big = torch.tensor([1e30, 1e30])
    with gw.trace() as report:
        for _ in range(2):
            opt.zero_grad()
            (w * big * big).sum().backward()
            opt.step()
    update = [f for f in report.findings if f.op == "aten.addcdiv_"]
    assert update and all(f.downstream and "infinite inputs" in f.born for f in update)
    assert len(report.causes) == 1


def test_data_moved_by_ops_nobody_reads_is_named_after_the_users_tensor():
    """NaN data first read through ops the trace passes over unread (GRU's internal transpose and copy of a
    batch_first input; a relu on a line before the linear layer) was born as "tensor[5, 2, 4] arrived" (GRU's
    own tensor) or as "h arrived" at the linear's line. The birth is the user's tensor, with its own count and
    coordinates, first used where it first was."""
    torch.manual_seed(0)
    gru = torch.nn.GRU(4, 3, batch_first=True)
    x = torch.randn(2, 5, 4)
    x[1, 3:] = float("nan")
    with gw.trace() as report:
        out, _ = gru(x)  # the GRU line
        (out[0].sum() + out[1, :3].sum()).backward()
    [f] = report.findings
    assert f.born.startswith("x arrived with 8 NaN value(s)") and "(x2)" not in f.born, str(report)
    assert "gru(x)" in _line(f.born_location)
    lin = torch.nn.Linear(4, 3)
    y = torch.randn(5, 4)
    y[3:] = float("nan")
    with gw.trace() as report:
        h = torch.relu(y)  # the first use
        lin(h)[:3].sum().backward()
    [f] = report.findings
    assert f.born.startswith("y arrived with 8 NaN value(s)"), str(report)
    assert "torch.relu(y)" in _line(f.born_location)


def test_two_bugs_whose_gradients_one_optimizer_step_writes_are_two_downstream_findings():
    """A genuine NaN in head a at step 3 and NaN padding sliced away in head b from step 6, one SGD step per
    iteration: the gradients written into the parameters by opt.step were one downstream finding, credited to
    the first root cause (with b's parameters among its elements). Each root cause now has its own, as in the
    reports of the two programs with one bug each."""

    def run(bug_a: bool, bug_b: bool):
        torch.manual_seed(0)
        a, b = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
        opt = torch.optim.SGD([*a.parameters(), *b.parameters()], lr=0.1)
        with gw.trace() as report:
            for step in range(8):
                x = torch.randn(6, 4)
                xa, xb = x.clone(), x.clone()
                if bug_a and step == 3:
                    xa[0, 0] = float("nan")
                if bug_b and step >= 6:
                    xb[4:] = float("nan")
                opt.zero_grad()
                (a(xa).sum() + b(xb)[:4].sum()).backward()
                opt.step()
        return [(f.step, f.count, f.occurrences) for f in report.findings if f.downstream], report

    both, report = run(True, True)
    alone = sorted(run(True, False)[0] + run(False, True)[0])
    assert sorted(both) == alone and len(both) == 2, str(report)
    assert "1 later step inherits it" in str(report)


def test_a_gradient_taken_for_an_intermediate_reads_no_grad_of_it():
    """torch.autograd.grad with respect to a non-leaf holding NaN names it; the trace then read the .grad of every
    named tensor (at the next step's first op, and when the block ended), and PyTorch warns on a non-leaf's .grad
    ("is not a leaf Tensor is being accessed"): the block's exit raised under -W error."""
    x = torch.tensor([1.0, float("nan"), 2.0], requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gw.trace() as report:
            h = x * 2
            (g,) = torch.autograd.grad((h * h).sum(), [h])
            (x * 3).sum()  # a new step's first op (its gradients are looked up)
    assert g.isnan().tolist() == [False, True, False]  # PyTorch's: the one NaN element of h
    assert [(f.kind, f.count, f.reaches) for f in report.findings] == [("nan", 1, ["h"])]


def test_a_finding_reaches_only_gradients_that_hold_its_nan():
    """maximum(0, w) * sqrt(-1) at w = -1: w is not selected, its gradient is 0 (PyTorch and gw.grad); maximum's
    backward (a where, then masked_fill_ in place) left the NaN's provenance on values made finite, and the trace
    said the genuine NaN reaches w. A finding reaches a gradient only where that gradient is non-finite."""
    w = torch.tensor([-1.0], requires_grad=True)
    with gw.trace() as report:
        loss = (torch.maximum(torch.zeros(1), w) * torch.sqrt(torch.tensor([-1.0]))).sum()
        loss.backward()
    assert torch.equal(w.grad, torch.zeros(1)) and torch.equal(gw.grad(
        (torch.maximum(torch.zeros(1), w) * torch.sqrt(torch.tensor([-1.0]))).sum(), w)[0], torch.zeros(1))
    assert all(not f.reaches for f in report.findings), str(report)


@pytest.mark.parametrize("guard", ["relu", "where"])
def test_an_inf_made_in_the_backward_and_dropped_is_no_finding(guard):
    """sqrt(relu(x)) at x = 0: sqrt's backward makes Inf (1 / (2 sqrt(0))), which relu's (or where's) backward
    drops: every gradient is finite, in PyTorch and with gw.grad. It was a genuine Inf reaching nothing; it is
    listed among the values that no gradient used (with the singular point and the kink, which stay)."""
    x = torch.tensor([0.0], requires_grad=True)
    g = torch.relu if guard == "relu" else (lambda t: torch.where(t > 0, t, 0.0))
    with gw.trace() as report:
        torch.sqrt(g(x)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert not [f for f in report.findings if f.kind in ("nan", "inf")], str(report)
    assert any("aten.div" in u for u in report.unused), str(report)


def test_a_jump_site_of_a_kink_fact_is_not_reported():
    """pow's fact is singular, but its 0 ** p site at p = 0 is a jump: the trace skips jumps (their convention is
    the derivative on both sides), and the report was a KeyError on a 'jump' finding (PyTorch's own
    test_pow_zero_tensor_gradient under the trace)."""
    x = torch.zeros(3, requires_grad=True)
    with gw.trace() as report:
        torch.pow(0.0, x).sum().backward()
    assert all(f.kind != "jump" for f in report.findings)
    assert torch.equal(x.grad, torch.zeros(3))
