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


def _written_into_a_view(zero: bool, inside: bool, outside: bool) -> torch.Tensor:
    """a[0].div_(b): 0 / 0 at a[0, 0] (``zero``) beside a[0, 2] = inf in the view (``inside``) and a[1, 1] = inf
    outside it (``outside``)."""
    w, a, b = torch.ones(2, 3, requires_grad=True), torch.ones(2, 3), torch.ones(3)
    if outside:
        a[1, 1] = INF
    if inside:
        a[0, 2] = INF  # (the write in the view)
    if zero:
        a[0, 0], b[0] = 0.0, 0.0
    a[0].div_(b)
    (a * w).sum().backward()
    return w


def test_an_in_place_op_on_a_view_names_the_inf_the_view_held():
    """SILENT on the base: the view's written Inf was the in-place op's prior provenance, so the 0/0's birth took
    the view's elements and the write a[0, 2] = inf, which alone leaves w's gradient Inf, was in no finding."""
    with gw.strong_zeros():
        for alone in ((True, False, False), (False, True, False), (False, False, True)):
            assert not bool(_written_into_a_view(*alone).grad.isfinite().all()), f"premise: {alone} is used"
    with gw.trace() as report:
        _written_into_a_view(True, True, True)
    with open(__file__) as source:
        line = next(n for n, text in enumerate(source, 1) if text.rstrip().endswith("# (the write in the view)"))
    found = genuine_findings(report)
    assert {f.born_op for f in found} == {"aten.div_", "aten.copy_"}, str(report)
    assert any(f"py:{line} " in f.born for f in found), str(report)


def _added_in_place(inf: bool, nan: bool) -> torch.Tensor:
    """a (2, 3) += b (3,): a[1, 1] = inf (``inf``) beside b[2] = nan (``nan``), broadcast over a's rows."""
    w, a, b = torch.ones(2, 3, requires_grad=True), torch.ones(2, 3), torch.ones(3)
    if inf:
        a[1, 1] = INF
    if nan:
        b[2] = NAN
    (a.add_(b) * w).sum().backward()
    return w


def test_an_in_place_sum_of_two_writes_tells_each_reaching_its_gradient():
    """SILENT on the base: a's Inf (prior provenance, no element mask) beside b's broadcast NaN: the Inf write's
    finding said 'reaches: no gradient', though alone it leaves w's gradient Inf."""
    with gw.strong_zeros():
        assert not bool(_added_in_place(True, False).grad.isfinite().all()), "premise: the Inf is used"
        assert not bool(_added_in_place(False, True).grad.isfinite().all()), "premise: the NaN is used"
    with gw.trace() as report:
        _added_in_place(True, True)
    found = genuine_findings(report)
    assert {f.kind for f in found} == {"nan", "inf"} and all(f.reaches == ["w"] for f in found), str(report)


def _overflow_beside_padding(pad: bool, large: bool) -> torch.Tensor:
    """exp(x)[:2]: x's rows 2: NaN padding (``pad``) the slice drops, x[0, 0] = 100 overflowing (``large``)."""
    w, x = torch.ones(4, 2, requires_grad=True), torch.ones(4, 2)
    if pad:
        x[2:] = NAN
    if large:
        x[0, 0] = 100.0
    (x.exp() * w)[:2].sum().backward()
    return w


def test_an_overflow_beside_dropped_padding_is_the_overflows():
    """SILENT on the base: exp's overflow beside the padding's NaN was told as the padding's ('inf, born
    aten.fill_'), the exp named nowhere, and the padding a genuine NaN finding, though strong zeros leave the
    padding alone unused."""
    with gw.strong_zeros():
        assert bool(_overflow_beside_padding(True, False).grad.isfinite().all()), "premise: the padding is unused"
        assert not bool(_overflow_beside_padding(False, True).grad.isfinite().all()), "premise: the overflow is used"
    with gw.trace() as report:
        _overflow_beside_padding(True, True)
    assert {f.born_op for f in genuine_findings(report)} == {"aten.exp"}, str(report)
    assert {f.born_op for f in report.findings if f.kind == "contamination"} == {"aten.fill_"}, str(report)
