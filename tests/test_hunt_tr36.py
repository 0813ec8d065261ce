"""Session 36 (tr36): the NaN/Inf an elementwise op makes of finite operands beside the NaN/Inf its inputs carry,
out of place and in place, with broadcast operands, are the op's own births at their elements; the carried ones
keep their inputs' births. Each case is checked against plain PyTorch under gw.strong_zeros() with each cause
alone (the op's own NaN/Inf, the written NaN/Inf): both leave the gradient non-finite, so the trace must name
both (never the trace itself)."""

from __future__ import annotations

import pytest
import torch

import gradwise as gw
from _explaining import genuine_findings

NAN, INF = float("nan"), float("inf")


def _exp(made: bool, written: bool) -> torch.Tensor:
    """exp overflows at x[1] = 100 (``made``) beside x[0] = nan (``written``)."""
    w, x = torch.ones(4, requires_grad=True), torch.ones(4)
    if written:
        x[0] = NAN
    if made:
        x[1] = 100.0
    (x.exp() * w).sum().backward()
    return w


def _div(made: bool, written: bool, in_place: bool = False) -> torch.Tensor:
    """a / b: 0 / 0 at 0 (``made``) beside a[1] = nan (``written``)."""
    w, a, b = torch.ones(4, requires_grad=True), torch.ones(4), torch.ones(4)
    if written:
        a[1] = NAN
    if made:
        a[0], b[0] = 0.0, 0.0
    ((a.div_(b) if in_place else a / b) * w).sum().backward()
    return w


def _pow_broadcast(made: bool, written: bool) -> torch.Tensor:
    """a (3, 4) ** p (4,) in place: 0 ** -1 at (0, 0) (``made``) beside a[1, 2] = inf (``written``)."""
    w, a = torch.ones(3, 4, requires_grad=True), torch.ones(3, 4)
    p = torch.tensor([-1.0, 1.0, 1.0, 1.0])
    if written:
        a[1, 2] = INF
    if made:
        a[0, 0] = 0.0
    (a.pow_(p) * w).sum().backward()
    return w


CASES = {
    "exp overflow beside a carried NaN": (_exp, "aten.exp"),
    "0/0 beside a carried NaN": (_div, "aten.div"),
    "in-place 0/0 beside a carried NaN": (lambda made, written: _div(made, written, in_place=True), "aten.div_"),
    "in-place broadcast 0 ** -1 beside a carried Inf": (_pow_broadcast, "aten.pow_"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_nonfinite_made_beside_one_carried_names_both(case):
    """SILENT on the base: the op's own NaN/Inf (a finite write made it: exp(100), 0/0, 0 ** -1) was told as the
    carried NaN/Inf's birth ('nan, born aten.copy_, first at 0, 1'), the op named nowhere; in place, with the
    carried Inf the op's prior provenance, the whole output was the op's birth and the write in no finding."""
    program, op = CASES[case]
    with gw.strong_zeros():
        assert not bool(program(True, False).grad.isfinite().all()), "premise: the op's own NaN/Inf is used"
        assert not bool(program(False, True).grad.isfinite().all()), "premise: the write is used"
    with gw.trace() as report:
        program(True, True)
    assert {f.born_op for f in genuine_findings(report)} == {op, "aten.copy_"}, str(report)


def test_a_log_of_the_zero_an_inf_made_is_no_birth_of_its_own():
    """The guard (``_clean``): y = e / e.sum() with e[0] overflowing holds inf / inf = NaN at 0 and x / inf = 0
    elsewhere; log(y)'s -inf descend from the overflow (strong zeros: without it y holds no 0), so they are no
    log(0) birth of their own: exp's overflow is the one root cause."""
    w = torch.ones(4, requires_grad=True)
    with gw.trace() as report:
        x = torch.tensor([100.0, 1.0, 2.0, 3.0])
        e = x.exp()
        (torch.log(e / e.sum()) * w).sum().backward()
    assert "aten.log" not in {f.born_op for f in genuine_findings(report)}, str(report)
    assert len(report.causes) == 1 and "aten.exp" in report.causes[0], str(report)
