"""Review of tr36 (per-element births for elementwise ops; ``clean`` inputs make births of their own): a value
``clean`` when recorded stops being clean once an op the trace told nothing of this tensor makes one of its NaN/Inf
finite (an in-place op through another view of its storage, ``x.data``). Each case is checked against plain PyTorch
under gw.strong_zeros() with each write alone."""

from __future__ import annotations

import pytest
import torch

import gradwise as gw
from _explaining import genuine_findings

NAN, INF = float("nan"), float("inf")


def _reciprocal_elsewhere(inf: bool, nan: bool, how: str) -> torch.Tensor:
    """v = x[:2] holds x[0] = inf (``inf``) and x[1] = nan (``nan``); then x[0] becomes 1 / inf = 0 by an op that
    does not name v (``how``), and log(v)[:1] reads that 0: its -inf descends from the Inf write."""
    w, x = torch.ones(1, requires_grad=True), torch.ones(3)
    if inf:
        x[0] = INF
    if nan:
        x[1] = NAN
    v = x[:2]
    if how == "base":
        x.reciprocal_()
    elif how == "sibling view":
        x[0:1].reciprocal_()
    else:  # (.data: an alias the dispatcher never sees made, with a version counter of its own)
        v.data.reciprocal_()
    (torch.log(v)[:1] * w).sum().backward()
    return w


@pytest.mark.parametrize("how", ["base", "sibling view", "data"])
def test_a_zero_an_inf_became_through_another_view_is_no_birth_of_its_own(how):
    """SILENT on tr36 (not the base): v was recorded clean while it held the Inf, which an in-place op through x
    (or x[0:1], or v.data) then made 0, and log(v)'s -inf there was told as a log(0) of its own: a second root
    cause 'aten.log ... a domain error' whose fix (clamp the log's input) mends nothing; the Inf write alone
    leaves w's gradient -inf (strong zeros), so it is the one root cause."""
    with gw.strong_zeros():
        assert not bool(_reciprocal_elsewhere(True, False, how).grad.isfinite().all()), "premise: the Inf is used"
        assert bool(_reciprocal_elsewhere(False, True, how).grad.isfinite().all()), "premise: the NaN is unused"
    with gw.trace() as report:
        _reciprocal_elsewhere(True, True, how)
    assert {f.born_op for f in genuine_findings(report)} == {"aten.copy_"}, str(report)
    assert len(report.causes) == 1, str(report)


def _log_of_reciprocal(inf: bool, nan: bool, in_place: bool) -> torch.Tensor:
    """log(1 / x) with x[0] = inf (``inf``: 1 / inf = 0, log(0) = -inf) and x[2] = nan (``nan``)."""
    w, x = torch.ones(3, requires_grad=True), torch.ones(3)
    if inf:
        x[0] = INF  # (the Inf write)
    if nan:
        x[2] = NAN
    y = x.reciprocal_() if in_place else x.reciprocal()
    (torch.log(y) * w).sum().backward()
    return w


@pytest.mark.xfail(strict=True, reason=(
    "SILENT, open (the base too): 1 / x keeps the births of its non-finite elements only, so the 0 that x[0] = inf "
    "became is of no birth; log's -inf there falls back to every birth y holds, the NaN write's, and the Inf "
    "write, which alone leaves w's gradient -inf, is in no finding (the NaN finding says 'first at 0, 2'). Needs "
    "the births of an elementwise op's finite elements where an input was NaN/Inf (the elements _clean finds) "
    "kept as a part of the output, read by _origin_at"))
@pytest.mark.parametrize("in_place", [False, True])
def test_a_log_of_the_zero_an_inf_made_names_that_inf(in_place):
    with gw.strong_zeros():
        assert not bool(_log_of_reciprocal(True, False, in_place).grad.isfinite().all()), "premise: the Inf is used"
        assert not bool(_log_of_reciprocal(False, True, in_place).grad.isfinite().all()), "premise: the NaN is used"
    with gw.trace() as report:
        _log_of_reciprocal(True, True, in_place)
    with open(__file__) as source:
        line = next(n for n, text in enumerate(source, 1) if text.rstrip().endswith("# (the Inf write)"))
    assert any(f"py:{line} " in f.born for f in genuine_findings(report)), str(report)


def _zero_over_zero_beside_inf_over_inf(zero: bool, inf: bool) -> torch.Tensor:
    """(a / b)[:1]: 0 / 0 at 0 (``zero``, used) beside inf / inf at 1 (``inf``, dropped by the slice)."""
    w, a, b = torch.ones(1, requires_grad=True), torch.ones(3), torch.ones(3)
    if zero:
        a[0], b[0] = 0.0, 0.0
    if inf:
        a[1], b[1] = INF, INF
    ((a / b)[:1] * w).sum().backward()
    return w


@pytest.mark.xfail(strict=True, reason=(
    "SILENT, open (the base's root cause too; tr36 adds the finding): the div's NaN birth is interned per op and "
    "line, so its 0/0 and its inf / inf are one birth made_of the Inf writes and own: with only the 0/0 used, the "
    "report names the unused Inf writes a genuine NaN finding and the one root cause (the base: the div's finding, "
    "the writes the root cause), the div's own 0/0 no root cause. tr36's known 'mixed NaN birth grouped under the "
    "earliest parent'; needs the birth's made_of kept per element (a part per parent), read where it is used"))
def test_a_used_zero_over_zero_beside_a_dropped_inf_over_inf_is_the_divs_alone():
    with gw.strong_zeros():
        assert not bool(_zero_over_zero_beside_inf_over_inf(True, False).grad.isfinite().all()), "premise: used"
        assert bool(_zero_over_zero_beside_inf_over_inf(False, True).grad.isfinite().all()), "premise: dropped"
    with gw.trace() as report:
        _zero_over_zero_beside_inf_over_inf(True, True)
    assert {f.born_op for f in genuine_findings(report)} == {"aten.div"}, str(report)
    assert report.causes and all("aten.div" in c for c in report.causes), str(report.causes)


def _log_of_reciprocal_sliced(inf: bool, nan: bool, later: bool) -> torch.Tensor:
    """log(1 / x)[:1] with x[0] = inf (``inf``, used), x[1] = nan (``nan``) and y[2] = inf after (``later``)."""
    w, x = torch.ones(1, requires_grad=True), torch.ones(3)
    if inf:
        x[0] = INF
    if nan:
        x[1] = NAN
    y = x.reciprocal()
    if later:
        y[2] = INF
    (torch.log(y)[:1] * w).sum().backward()
    return w


@pytest.mark.xfail(strict=True, reason=(
    "SILENT, open (the base too): the -inf of log(1 / inf) reaching w is told as the NaN write's (finding 'genuine "
    "Inf', born 'made 1 NaN value(s)'), the Inf write listed as used by no gradient, and the NaN write and y[2] = "
    "inf, which the slice drops (strong zeros: each alone leaves w's gradient finite), genuine findings that say "
    "'reaches: no gradient'. Same missing part as test_a_log_of_the_zero_an_inf_made_names_that_inf"))
def test_writes_the_slice_drops_are_no_genuine_findings():
    with gw.strong_zeros():
        assert not bool(_log_of_reciprocal_sliced(True, False, False).grad.isfinite().all()), "premise: used"
        assert bool(_log_of_reciprocal_sliced(False, True, False).grad.isfinite().all()), "premise: dropped"
        assert bool(_log_of_reciprocal_sliced(False, False, True).grad.isfinite().all()), "premise: dropped"
    with gw.trace() as report:
        _log_of_reciprocal_sliced(True, True, True)
    found = genuine_findings(report)
    assert found and all(f.reaches == ["w"] for f in found), str(report)


def _sqrt_beside_dropped_padding(pad: bool, used: bool) -> torch.Tensor:
    """(sqrt(x) * w)[:3]: x[1] = -1 (sqrt's own NaN, used) beside x[4:] = inf (``pad``) and x[5] = -inf
    (``used``: sqrt(-inf) = NaN), both in elements the slice drops."""
    w = torch.ones(6, requires_grad=True)
    x = torch.tensor([0.5, -1.0, 2.0, 0.5, -1.0, 0.0])
    if pad:
        x[4:] = INF
    if used:
        x[5] = -INF
    (x.sqrt() * w)[:3].sum().backward()
    return w


@pytest.mark.xfail(strict=True, reason=(
    "SILENT, open (tr36; the base told it right): tr36's _infinities_at gives a NaN birth with an element of its "
    "own (sqrt(-1), used) and one made of an input's infinity (sqrt(-inf) of x[5] = -inf, dropped by the slice) "
    "made_of that infinity as well as own, and the birth is one per op and line, so the used sqrt(-1) makes the "
    "write x[5] = -inf a genuine NaN finding ('then aten.sqrt made NaN of it', 'reaches: w') though strong zeros "
    "leave both writes unused. Returning None there (the base) brings back test_review_tr35b's "
    "test_inf_over_inf_names_the_write_used_alone; needs made_of per element, resolved in the backward where the "
    "birth's used elements are known (_born_reached)"))
def test_a_used_domain_error_beside_a_dropped_written_infinity_names_no_write():
    with gw.strong_zeros():
        none = _sqrt_beside_dropped_padding(False, False).grad
        for writes in ((True, False), (False, True), (True, True)):
            g = _sqrt_beside_dropped_padding(*writes).grad
            assert torch.equal(g.isfinite(), none.isfinite()), f"premise: {writes} unused"
    with gw.trace() as report:
        _sqrt_beside_dropped_padding(True, True)
    assert {f.born_op for f in genuine_findings(report)} == {"aten.sqrt"}, str(report)


def _reciprocal_twice_transposed(pad: bool, used: bool) -> torch.Tensor:
    """1 / (1 / x) with a transpose between: x[0] = 0 (1 / 0 = inf, then 0: unused), x[2] = nan (``pad``) and
    x[3] = -inf (``used``: 1 / -inf = -0, then -inf)."""
    w, x = torch.ones(6, requires_grad=True), torch.tensor([0.0, 2.0, 1.0, 0.0, 2.0, 100.0])
    if pad:
        x[2:3] = NAN
    if used:
        x[3] = -INF
    y = x.reciprocal().view(2, 3).t().reshape(6).reciprocal()
    (y * w).sum().backward()
    return w


@pytest.mark.xfail(strict=True, reason=(
    "SILENT, open (tr36; the base told it right): the first 1 / x now makes a birth of its own at 1 / 0 (_fresh "
    "of clean inputs), so its output holds parts, and the -0 that x[3] = -inf became lies in none of them; through "
    "the transpose and reshape's clone the value's births are its parts' only, the -inf write's gone, and the "
    "second reciprocal's -inf (reaching w, strong zeros: the write alone leaves it -inf) is told as the first "
    "reciprocal's Inf, a finding that 'reaches: no gradient'; the write is in no finding. Same missing part as "
    "test_a_log_of_the_zero_an_inf_made_names_that_inf, which tr36's new parts now reach"))
def test_a_transposed_reciprocal_of_a_reciprocal_names_the_written_inf():
    with gw.strong_zeros():
        assert not bool(_reciprocal_twice_transposed(False, True).grad.isfinite().all()), "premise: -inf used"
        assert not bool(_reciprocal_twice_transposed(True, False).grad.isfinite().all()), "premise: NaN used"
    with gw.trace() as report:
        _reciprocal_twice_transposed(True, True)
    assert {f.born_op for f in genuine_findings(report)} == {"aten.fill_", "aten.copy_"}, str(report)


def _reciprocal_of_scaled_exp(pad: bool, used: bool, in_place: bool) -> torch.Tensor:
    """(1 / (exp(x) * b) * w)[:3]: exp(100) at x[5] overflows (dropped by the slice) beside x[0] = -inf (``pad``)
    and x[1] = -inf (``used``): exp(-inf) = 0, then 1 / 0 = inf, both used."""
    w = torch.ones(6, requires_grad=True)
    x, b = torch.tensor([100.0, 1.0, 0.0, 2.0, 1.0, 100.0]), torch.tensor([2.0, 1.0, -1.0, 100.0, 2.0, 1.0])
    if pad:
        x[0:1] = -INF
    if used:
        x[1] = -INF
    y = x.exp().mul_(b).reciprocal_() if in_place else (x.exp() * b).reciprocal()
    (y * w)[:3].sum().backward()
    return w


@pytest.mark.xfail(strict=True, reason=(
    "SILENT, open (tr36; the base names both writes): exp's overflow beside x's -inf is now a birth of its own "
    "(_fresh of clean inputs), so exp(x) holds parts; the zeros exp made of the -inf are finite, and the product "
    "with b keeps the parts at its NaN/Inf only (_record_parts), its births those parts' (the overflow's), so "
    "1 / 0 = inf at 0 and 1 is told as the overflow's, which the slice drops: the overflow a genuine finding, both "
    "used writes in none. Needs the births of the elements an op made finite of a NaN/Inf kept (a part of the "
    "output, or the output's births beyond its parts, read by _origin_at)"))
@pytest.mark.parametrize("in_place", [False, True])
def test_an_inf_of_the_zero_exp_made_of_a_written_inf_names_the_write(in_place):
    with gw.strong_zeros():
        assert not bool(_reciprocal_of_scaled_exp(True, False, in_place).grad.isfinite().all()), "premise: used"
        assert not bool(_reciprocal_of_scaled_exp(False, True, in_place).grad.isfinite().all()), "premise: used"
        assert bool(_reciprocal_of_scaled_exp(False, False, in_place).grad.isfinite().all()), "premise: overflow unused"
    with gw.trace() as report:
        _reciprocal_of_scaled_exp(True, True, in_place)
    assert {f.born_op for f in genuine_findings(report)} == {"aten.fill_", "aten.copy_"}, str(report)
