"""Review of trace30 (parts surviving reductions/views/joins, written constants as births, counts of what reaches
the gradients, the watch's loss check): programs whose ground truth is plain torch (which gradient elements are
NaN/Inf) or the same program with a NaN write deleted."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import gradwise as gw
from _explaining import genuine_findings, padded_program, traced_and_strong


def _tanh_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


@pytest.mark.parametrize("strong", [False, True])
@pytest.mark.parametrize("loss", ["pow", "mean"])
def test_padding_beside_a_genuine_nan_is_no_genuine_finding(loss, strong):
    """SILENT before: `x[4:] = nan` (padding the slice `[:4]` drops) and `x[1, 2] = nan` (a row the loss reads) in
    one step, `m(x)[:4].pow(2).sum()`: the padding's fill_ was a "genuine NaN" finding. The NaN sensitivity of
    row 1 carried the copy_'s birth into tanh's backward, which read its saved output, NaN at rows 1, 4, 5: the
    elements a nonzero sensitivity met were row 1 only, but the births named were the whole output's. Deleting
    the padding write leaves every gradient as NaN as it was (the reference below), so it is no finding."""
    m = _tanh_mlp()

    def step(pad: bool):
        m.zero_grad()
        with gw.trace() as report:
            x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
            if pad:
                x[4:] = float("nan")
            x[1, 2] = float("nan")
            with gw.strong_zeros() if strong else contextlib.nullcontext():
                y = m(x)[:4]
                (y.pow(2).sum() if loss == "pow" else y.mean()).backward()
        return report, {n: p.grad.isfinite() for n, p in m.named_parameters()}

    report, finite = step(True)
    _, without_padding = step(False)
    assert all(torch.equal(finite[n], without_padding[n]) for n in finite)  # the padding changes no gradient
    assert [(f.born_op, f.count) for f in genuine_findings(report)] == [("aten.copy_", 1)]


@pytest.mark.parametrize("written", [(float("nan"), float("inf")), (float("inf"), float("nan")),
                                     (float("nan"), float("nan"), float("inf"), float("inf"))])
def test_a_nan_and_an_inf_one_line_writes_are_both_counted(written):
    """SILENT before: a loop writing a NaN and an Inf at one line (`x[i, i % 4] = v`), each reaching a gradient
    (the Inf through tanh'(inf) = 0 x inf, which strong zeros keep): one finding for the line, as the site is one,
    but it counted only the first birth's elements (1 of 2; 2 of 4): the second birth at the same key was
    counted 0 (a regression of trace30: the base told the Inf as a finding of its own). The reference: the
    elements written, each of which strong zeros leave non-finite."""
    def program():
        torch.manual_seed(0)
        w = torch.randn(8, 4, requires_grad=True)
        x = torch.randn(8, 4)
        for i, v in enumerate(written):
            x[i, i % 4] = v
        (x * w).tanh().sum(1)[:6].pow(2).sum().backward()
        return w

    with gw.strong_zeros():
        w = program()
    kept = ~w.grad.isfinite()
    assert all(bool(kept[i, i % 4]) for i in range(len(written)))  # every write reaches the strong gradient
    with gw.trace() as report:
        program()
    assert {f.born_op for f in genuine_findings(report)} == {"aten.copy_"}
    assert sum(f.count for f in genuine_findings(report)) == len(written)


@pytest.mark.parametrize("mix", ["mask_mul", "relu"])
def test_a_nan_a_computed_zero_sensitivity_meets_is_still_used(mix):
    """SILENT before (a regression of trace30's sensitivity count): `log(x) * mask @ W`, log's NaN in a kept row and
    two in rows the mask multiplies by 0: NaN x 0 is NaN, so all three reach the output and W.grad, but the finding
    counted 1 element: log's incoming sensitivity is 0 there (the mask's derivative), a zero the program computed,
    not a structural one, and each zero was read as an element the output does not use. Reference: each NaN
    element alone, whether the output is non-finite."""
    keep = (torch.arange(6)[:, None] < 3).float()
    mixes = {"mask_mul": lambda y: y * keep, "relu": lambda y: torch.where(keep.bool(), y, y.relu())}
    at = [(0, 0), (4, 2), (5, 3)]

    def program(x, w):
        return mixes[mix](x.clone().requires_grad_().log()).matmul(w).sum()

    torch.manual_seed(0)
    x, w = torch.rand(6, 4) + 0.5, torch.randn(4, 3, requires_grad=True)
    used = 0
    for i in at:
        alone = x.clone()
        alone[i] = -1.0
        used += not bool(program(alone, w.detach()).isfinite())
    for i in at:
        x[i] = -1.0
    with gw.trace() as report:
        program(x, w).backward()
    assert [(f.born_op, f.count) for f in genuine_findings(report)] == [("aten.log", used)]


_PIECES = {"split": lambda y: y.split(4)[0], "unbind": lambda y: y.unbind(0)[0], "chunk": lambda y: y.chunk(3)[0],
           "split of a transpose": lambda y: y.t().split(2, 1)[0],
           "split, the padding's piece": lambda y: y.split(4)[1]}


@pytest.mark.parametrize("case", list(_PIECES))
def test_a_piece_of_a_split_keeps_only_its_own_births(case):
    """SILENT before: `(x * w).split(4)[0]` (or unbind, chunk) where x's rows 4: are NaN padding and x[0, 0] is
    Inf: the piece took every part's births (a view op returning several pieces was run on each part's mask, and a
    list was no piece), so the padding split away was a "genuine NaN" finding. The reference: strong-zero
    gradients with each write alone (the padding's piece, split(4)[1], uses it)."""
    report, genuine = traced_and_strong(padded_program(lambda y: _PIECES[case](y).pow(2).sum(), (0, 0), float("inf")))
    assert {f.born_op for f in genuine_findings(report)} == genuine
