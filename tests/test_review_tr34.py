"""Review of tr34 (the trace's ``infinities_of``, out-of-place selected writes, map bodies): breaks found.
References: plain torch under gw.strong_zeros() with each write alone (a write is genuine where its NaN/Inf stays
in the gradient), and the values the program computes (what is NaN, what is Inf), never the trace itself."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import gradwise as gw
from _explaining import genuine_findings


def _div_program(inf_write: bool, zero: bool):
    """z = a / b: a[0] is a written +inf (z[0] unused), a[1] = b[1] = 0 (0/0 born at the div, z[1] used)."""
    torch.manual_seed(0)
    w = torch.randn(4, requires_grad=True)
    x = torch.randn(4)
    if inf_write:
        x[0] = float("inf")
    a = x.clone() * w
    b = torch.randn(4)
    if zero:
        a = a * torch.tensor([1.0, 0.0, 1.0, 1.0])
        b[1] = 0.0
    (a / b)[1:].sum().backward()
    return w


def test_a_nan_made_of_finite_values_beside_an_unused_inf_keeps_its_birth():
    """tr34 (SILENT): the used 0/0 NaN born at the div was told as the unused +inf write ("then aten.div made NaN
    of it", genuine) -- the write the output never reads told genuine, the div's NaN no longer named there:
    infinities_of took the NaN birth's parents (every birth of its inputs) as what it was made of. Now only a NaN
    each of whose elements had a non-finite input is (Birth.of_infinities)."""
    with gw.strong_zeros():
        assert bool(_div_program(True, False).grad.isfinite().all())  # the +inf write alone: not genuine
        assert not bool(_div_program(False, True).grad.isfinite().all())  # the 0/0 alone: genuine
    with gw.trace() as report:
        _div_program(True, True)
    got = genuine_findings(report)
    assert not any(f.born_op == "aten.copy_" for f in got), str(report)
    assert any(f.kind == "nan" and f.born_op == "aten.div" for f in got), str(report)


def _masked_program(inf_write: bool, masked: bool):
    """softmax(1) of rows: row 0 holds a written +inf (row 0 unused), row 1 is fully masked -inf (used)."""
    torch.manual_seed(0)
    w = torch.randn(3, 4).abs().requires_grad_()
    x = torch.randn(3, 4)
    if inf_write:
        x[0, 1] = float("inf")
    s = x.clone() * w
    if masked:
        m = torch.zeros(3, 4, dtype=torch.bool)
        m[1] = True
        s = s.masked_fill(m, float("-inf"))
    out = s.softmax(1)[1:]
    out.sum().backward()
    return out


def test_a_fully_masked_rows_nan_beside_an_unused_inf_row_is_not_the_infs():
    """tr34 (SILENT): softmax's one NaN birth (row 0: inf - inf, row 1: fully masked) was replaced by the +inf
    write of row 0, which the output never reads: the used fully masked row's NaN (the genuine one) vanished and
    the unused write was told genuine. Base named the masked row's write. Now row 1 (no +inf) keeps the NaN
    softmax's own (Birth.of_infinities False)."""
    assert bool(_masked_program(False, True).isnan().any())  # the masked row alone: the output NaN
    assert not bool(_masked_program(True, False).isnan().any())  # the +inf row alone: the output finite
    with gw.trace() as report:
        _masked_program(True, True)
    got = genuine_findings(report)
    assert not any(f.born_op == "aten.copy_" for f in got), str(report)
    assert any(f.kind == "nan" and f.born_op in ("aten.masked_fill", "aten._softmax") for f in got), str(report)


def test_a_nan_a_mapped_body_discards_is_no_finding_of_its_output():
    """tr34 (a false genuine finding): a map body that computes a NaN it discards (log(r - 100)) and returns
    r * 2, over data holding an Inf: the output holds the Inf only, yet the log's NaN was a genuine NaN finding
    ("the output depends on it"): every birth seen during the call was given to the stacked output; now the
    births of what the body returned."""
    from torch._higher_order_ops.map import map as hop_map

    def body(r):
        torch.log(r - 100)  # (discarded)
        return (r * 2,)

    torch.manual_seed(0)
    w = torch.randn(4, requires_grad=True)
    x = torch.randn(3, 4)
    x[1, 0] = float("inf")
    with gw.trace() as report:
        ys = hop_map(body, x.clone() * w)
        ys[0].sum().backward()
    assert not bool(ys[0].isnan().any())
    assert not any(f.kind == "nan" for f in genuine_findings(report)), str(report)


def _sum_program(a: bool, b: bool, c: bool, product: bool = False):
    """z = x * w + x2 * w (or x * x2 * w): x[0] = +inf (a), x2[0] = -inf (b; or 0 for the product), and x[3] = +inf
    (c, z[3] unused, or x2[3] for the product); the output reads z[:3]."""
    torch.manual_seed(0)
    w = torch.randn(4).abs().requires_grad_()
    x, x2 = torch.randn(4), torch.randn(4)
    if a:
        x[0] = float("inf")
    if b:
        x2[0] = 0.0 if product else float("-inf")
    if c and product:
        x2[3] = float("inf")
    elif c:
        x[3] = float("inf")
    z = x.clone() * x2.clone() * w if product else x.clone() * w + x2.clone() * w
    z[:3].pow(2).sum().backward()
    return w


@pytest.mark.parametrize("product", [False, True])
def test_an_unused_inf_in_an_operand_is_not_what_its_nan_was_made_of(product):
    """tr34 (a false genuine finding): inf + -inf (or inf * 0) at z[0] beside an unused +inf at z[3] in an operand:
    infinities_of named every birth of the operands (the NaN birth's parents), so the unused write was a genuine
    NaN finding reaching w beside its contamination. Reference: strong zeros with that write alone keep w's
    gradient finite; now only the births at the NaN's elements (Birth.made_of) are named."""
    program = functools.partial(_sum_program, product=product)
    with gw.strong_zeros():
        assert bool(program(False, False, True).grad.isfinite().all())
        assert not bool(program(True, False, False).grad.isfinite().all())
    with gw.trace() as report:
        program(True, True, True)
    lines = {int(f.born_location.rpartition(":")[2]) for f in genuine_findings(report)}
    c_lines = {i for i, s in enumerate(Path(__file__).read_text().splitlines(), 1)
               if s.strip() in ('x2[3] = float("inf")', 'x[3] = float("inf")')}
    assert not lines & c_lines, str(report)
    assert lines, str(report)


def _log_program(neg: bool, inf: bool):
    """softmax(log(x * w)) whose row 0 holds a -1 (log's domain error: NaN) and a written +inf, both used."""
    torch.manual_seed(0)
    w = torch.rand(3, 4).add(0.5).requires_grad_()
    x = torch.rand(3, 4).add(0.5)
    if neg:
        x[0, 1] = -1.0
    if inf:
        x[0, 2] = float("inf")  # (the +inf write)
    torch.log(x.clone() * w).softmax(1).pow(2).sum().backward()  # (the log)
    return w


def test_a_nan_an_op_made_beside_a_used_inf_in_its_row_names_both_causes():
    """tr34 (SILENT): log's NaN (of the -1) beside a used +inf in the same row: infinities_of renamed log's NaN
    after the +inf (its parent, though log(inf) is inf), so the domain error vanished from the report; with the
    NaN kept at the log, _saved_met's walk of the NaN's parents (``descended``) took the +inf as already told
    and dropped it. Reference: strong zeros with each alone leave w's gradient non-finite: two genuine causes."""
    with gw.strong_zeros():
        assert not bool(_log_program(True, False).grad.isfinite().all())
        assert not bool(_log_program(False, True).grad.isfinite().all())
    with gw.trace() as report:
        _log_program(True, True)
    text = Path(__file__).read_text().splitlines()
    want = {i for i, s in enumerate(text, 1) if s.endswith(("# (the +inf write)", "# (the log)"))}
    got = {int(f.born_location.rpartition(":")[2]) for f in genuine_findings(report)}
    assert got == want, str(report)


def _two_steps(w: torch.Tensor, i: int) -> None:
    """Step 0: inf / inf at the div (a written +inf over a written +inf); step 1: 0 / 0 there (finite data)."""
    x, b = torch.randn(4), torch.randn(4)
    a = x.clone() * w
    if i == 0:
        x2 = torch.zeros(4)
        x2[1] = float("inf")
        a, b[1] = a + x2.clone(), float("inf")
    else:
        a, b[1] = a * torch.tensor([1.0, 0.0, 1.0, 1.0]), 0.0
    (a / b)[1:].sum().backward()  # (the div)


def test_a_later_steps_nan_of_finite_values_at_a_site_keeps_its_birth():
    """Step 0's NaN at the div is made of two written +inf (named after them); step 1's, at the same div, is 0/0:
    the div must still be named for it (the program with the step-0 writes deleted: a NaN born at the div).
    Birth.made_of was set at the first occurrence only (interned per op and line); now each occurrence records
    its own, one made of none marking the birth ``own`` (named itself beside its infinities)."""
    torch.manual_seed(0)
    w = torch.randn(4, requires_grad=True)
    with gw.trace() as report:
        for i in range(2):
            _two_steps(w, i)
    assert any(f.kind == "nan" and f.born_op == "aten.div" for f in genuine_findings(report)), str(report)
