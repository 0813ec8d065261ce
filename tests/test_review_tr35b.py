"""Review of tr35b (session 35): breaks of its changes, each checked against plain PyTorch under
gw.strong_zeros() with each NaN write alone (which writes leave a gradient non-finite), never the trace itself."""

from __future__ import annotations

import pytest
import torch

import gradwise as gw
from _explaining import genuine_findings


def _transposed(pad: bool, used: bool):
    """x (4, 4) read as ``x.t()``, whose rows 3: a slice drops: x's column 3 is NaN padding (``pad``), x[3, 0] a
    used NaN (``used``, x.t()[0, 3]). Returns (w, x) with x made before any block (data that arrived)."""
    torch.manual_seed(0)
    w, x = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4)
    if pad:
        x[:, 3] = float("nan")
    if used:
        x[3, 0] = float("nan")
    return w, x


def _transposed_loss(w, x) -> None:
    (x.t() * w).tanh()[:3].pow(2).sum().backward()


@pytest.mark.parametrize("block", [gw.trace, gw.watch], ids=["trace", "watch"])
def test_a_used_element_read_through_a_transpose_is_named(block):
    """SILENT on tr35b (b51d7aa): the contamination met in x.t()'s coordinates (its row 3) was taken as x's own
    elements (x's row 3), so the used NaN x[3, 0] was called padding and the padding x[0:3, 3] told as the used
    elements: 'nan, elements 3, at [0, 3], [1, 3], [2, 3]'. The used element must be named."""
    with gw.strong_zeros():
        w, x = _transposed(True, False)
        _transposed_loss(w, x)
        assert bool(w.grad.isfinite().all()), "premise: the padding alone is unused"
        w, x = _transposed(False, True)
        _transposed_loss(w, x)
        assert not bool(w.grad.isfinite().all()), "premise: x[3, 0] is used"
    w, x = _transposed(True, True)
    with block() as report:
        _transposed_loss(w, x)
    [g] = genuine_findings(report)
    assert [3, 0] in g.indices and g.reaches == ["w"], str(report)


def _padding_read_beside_another_nan(pad: bool, used: bool, other: bool):
    """x (6, 4) whose rows 4: are NaN padding (``pad``) and x[0, 1] a used NaN (``used``), y a NaN (``other``);
    returns (w, v, x, y), made before any block."""
    torch.manual_seed(0)
    w, v = torch.randn(6, 4, requires_grad=True), torch.randn((), requires_grad=True)
    y, x = torch.randn(3), torch.randn(6, 4)
    if other:
        y[0] = float("nan")
    if pad:
        x[4:] = float("nan")
    if used:
        x[0, 1] = float("nan")
    return w, v, x, y


def _padding_read_loss(w, v, x, y) -> None:
    """The slice drops x's padding rows from w's use, ``(y.sum() + x[4:].sum()) * v`` reads them."""
    ((y.sum() + x[4:].sum()) * v + (x * w).tanh()[:4].pow(2).sum()).backward()


@pytest.mark.parametrize("block", [gw.trace, gw.watch], ids=["trace", "watch"])
def test_padding_another_use_reads_beside_an_earlier_nan_is_counted(block):
    """SILENT on tr35b (b51d7aa): the genuine incident of v's gradient (x's padding with y's NaN) was explained by
    y's birth (the earliest), so x's genuine count left it out, the guard 'genuine incidents count no more' held,
    and x's finding said 'elements: 2, at [0, 1]' (x's one used element and y's), though x's 8 padding elements
    alone leave v's gradient NaN: an under-count hiding a genuine use (on the base: 10, x's 9 and y's 1)."""
    with gw.strong_zeros():
        w, v, x, y = _padding_read_beside_another_nan(True, False, False)
        _padding_read_loss(w, v, x, y)
        assert bool(w.grad.isfinite().all()) and not bool(v.grad.isfinite().all()), "premise: padding reaches v"
    w, v, x, y = _padding_read_beside_another_nan(True, True, True)
    with block() as report:
        _padding_read_loss(w, v, x, y)
    told = sum(f.count for f in genuine_findings(report))
    assert told >= 9 + 1 and any([4, 0] in f.indices for f in genuine_findings(report)), str(report)


def _scan_with_an_infinite_seed(pad: bool, seed: bool) -> torch.Tensor:
    """``(x * w).logcumsumexp(1)[:4, -1]`` differentiated with an Inf in its sensitivity's row 2 (``seed``, a
    copy_) beside x's NaN padding rows 4: (``pad``, a fill_) the slice drops; returns w's gradient."""
    torch.manual_seed(0)
    w, x = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4)
    if pad:
        x[4:] = float("nan")
    grad_out = torch.ones(4)
    if seed:
        grad_out[2] = float("inf")
    return torch.autograd.grad((x.clone() * w).logcumsumexp(1)[:4, -1], w, grad_outputs=grad_out)[0]


def test_a_scans_padding_is_no_genuine_finding_beside_an_infinite_seed():
    """Over-report on tr35b (and the base): the padding rows' NaN met by log|0| in logcumsumexp's composite backward
    is annihilated at its last op; the elements left non-finite there (row 2, the seed's Inf) carried the padding's
    incident too, as x had no parts (one write) so the rows were "not known": 'nan, elements 8, born aten.fill_'
    reaching w, though strong zeros leave the padding alone unused."""
    with gw.strong_zeros():
        assert bool(_scan_with_an_infinite_seed(True, False).isfinite().all()), "premise: the padding is unused"
        assert not bool(_scan_with_an_infinite_seed(False, True).isfinite().all()), "premise: the seed is used"
    with gw.trace() as report:
        _scan_with_an_infinite_seed(True, True)
    assert {f.born_op for f in genuine_findings(report)} == {"aten.copy_"}, str(report)
    assert {f.born_op for f in report.findings if f.kind == "contamination"} == {"aten.fill_"}, str(report)


INF = float("inf")


def _division(a_at: dict, b_at: dict, in_place: bool = False) -> torch.Tensor:
    """``(a / b * w).sum()`` (``a.div_(b)`` where ``in_place``) of a = [1, 1, 1, 2], b = [1, 1, 1, 2] with the
    writes ``a[i] = v`` of ``a_at`` and ``b[i] = v`` of ``b_at`` (one write a line); returns w."""
    w = torch.ones(4, requires_grad=True)
    a, b = torch.tensor([1.0, 1.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 1.0, 2.0])
    for i, v in a_at.items():
        a[i] = v
    for i, v in b_at.items():
        b[i] = v
    ((a.div_(b) if in_place else a / b) * w).sum().backward()
    return w


def test_an_inf_the_division_makes_beside_its_nan_and_an_input_inf_is_its_own():
    """Wrong element on tr35b (fcb7fbe): a / b with 0/0 at 0, a's written Inf at 1 and 1/0 at 2. The Inf
    elements were all taken as the inputs' (``beside``), so the div's own 1/0 got no part: the write's finding
    said 'elements: 1, first at 2' (the 1/0) and no finding named element 1, the write's own Inf."""
    with gw.strong_zeros():
        assert not bool(_division({1: INF}, {}).grad.isfinite().all()), "premise: the write is used"
    with gw.trace() as report:
        _division({0: 0.0, 1: INF}, {0: 0.0, 2: 0.0})
    found = {f.born_op: f for f in genuine_findings(report)}
    assert set(found) == {"aten.div", "aten.copy_"}, str(report)
    assert found["aten.copy_"].indices == [[1]] and [2] in found["aten.div"].indices, str(report)


def test_an_inf_the_division_makes_beside_inf_over_inf_reaches_its_gradient():
    """tr35b (fcb7fbe): a = [1, 1, inf], b = [0, 1, inf]: 1/0 at 0 beside inf/inf at 2 was told as two genuine Inf
    findings of the writes 'reaching no gradient' (the div's own Inf given the writes' births), though w's
    gradient is Inf there."""
    w = torch.ones(3, requires_grad=True)
    with gw.trace() as report:
        a, b = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 1.0])
        a[2] = float("inf")
        b[2] = float("inf")
        (a / b * w).sum().backward()
    assert genuine_findings(report) and all(f.reaches == ["w"] for f in genuine_findings(report)), str(report)


def test_an_in_place_division_names_the_inf_its_input_held():
    """a.div_(b) with 0/0 at element 0 beside a's written Inf at 1: the write alone leaves w's gradient Inf."""
    with gw.strong_zeros():
        assert not bool(_division({1: INF}, {}, in_place=True).grad.isfinite().all()), "premise: the write is used"
    with gw.trace() as report:
        _division({0: 0.0, 1: INF}, {0: 0.0}, in_place=True)
    assert {f.born_op for f in genuine_findings(report)} == {"aten.div_", "aten.copy_"}, str(report)


def test_inf_over_inf_names_the_write_used_alone():
    def program(inf: bool) -> torch.Tensor:
        w = torch.ones(3, 4, requires_grad=True)
        a = torch.tensor([[0.0, 1, 1, 2], [1, 1, 1, 1], [1, 1, 1, 1]])
        b = torch.tensor([0.0, 1, 2, 3])
        b[2] = float("inf")
        if inf:
            a[1, 2] = float("inf")  # (the write used alone)
        (a / b * w).sum().backward()
        return w

    with gw.strong_zeros():
        w = program(True)
    assert not bool(w.grad[1, 2].isfinite()), "premise: the write a[1, 2] = inf is used"
    with open(__file__) as source:
        line = next(n for n, text in enumerate(source, 1) if text.rstrip().endswith("# (the write used alone)"))
    with gw.trace() as report:
        program(True)
    named = [f.born for f in genuine_findings(report)] + [str(c) for c in report.causes]
    assert any(f"py:{line} " in n for n in named), str(report) + str(report.causes)


def test_an_inf_made_beside_an_inf_carried_is_named():
    def program(zero: bool, inf: bool) -> torch.Tensor:
        w = torch.ones(3, requires_grad=True)
        a = torch.tensor([1.0, 1.0, 2.0])
        if zero:
            a[0] = 0.0
        if inf:
            a[1] = INF
        (a.pow(torch.tensor([-1.0, 1.0, 0.5])) * w).sum().backward()
        return w

    with gw.strong_zeros():
        assert not bool(program(True, False).grad.isfinite().all()), "premise: 0 ** -1 alone is used"
    with gw.trace() as report:
        program(True, True)
    assert {f.born_op for f in genuine_findings(report)} == {"aten.pow", "aten.copy_"}, str(report)
