"""Hunt tr34: the trace's classification defects of issue #16 point 3 (one semantics: genuine where strong zeros
keep the NaN/Inf). References: plain torch under gw.strong_zeros() with each NaN write alone (which writes leave
a non-finite gradient), never the trace itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gradwise as gw
from _explaining import (
    genuine_findings,
    masked_key_attention,
    padded_program,
    traced_and_strong,
    traced_with_each_write_kept,
)


@pytest.mark.parametrize("in_place", [False, True])
def test_masked_key_padding_beside_a_used_nan_key_is_no_genuine_finding(in_place):
    """Before (SILENT-adjacent, a false genuine finding): attention whose padding keys k[1, 3:] are NaN and masked
    out of place with ``masked_fill(m, -inf)``, beside a used NaN key element k[1, 1, 0] (unmasked) and a used NaN
    query element q[0, 2, 1]: the -inf written over the padding NaN kept the padding's birth, so softmax's rows in
    batch 1 (NaN through k[1, 1, 0]) named the padding a genuine finding reaching w (three genuine findings).
    Strong zeros with the padding write alone leave w's gradient finite: two genuine findings, the used writes."""
    def program(pad: bool, key: bool, query: bool):
        return masked_key_attention(pad, key, query, in_place)

    with gw.strong_zeros():
        kept = [not bool(program(*(i == j for j in range(3))).grad.isfinite().all()) for i in range(3)]
    assert kept == [False, True, True]
    with gw.trace() as report:
        program(True, True, True)
    got = genuine_findings(report)
    assert [(f.kind, f.born_op, f.reaches) for f in got] == [("nan", "aten.copy_", ["w"])] * 2, str(report)
    assert len({f.born_location for f in got}) == 2, str(report)


def _line(text: str) -> int:
    """The number of the line of this file that holds ``text`` (a write's birth line)."""
    return next(i for i, s in enumerate(Path(__file__).read_text().splitlines(), 1) if text in s)


def test_softmax_of_a_masked_row_turned_inf_is_one_finding():
    """Before: a row written -inf (a mask), then one element of it +inf, under softmax(1).pow(2).sum(): softmax's
    NaN (inf - inf) took the row-wise parts of its input (the two writes) though it was born there, so the one NaN
    the output uses was three findings: a genuine NaN named after the +inf write and two genuine Infs (the -inf
    and the +inf writes, "reaches: no gradient"). Reference: the loss is NaN (the output uses it) and strong zeros
    leave w's gradient finite (the rows written over send w zeros): one genuine NaN, the +inf write's (a mask's
    -inf is no root), then softmax's, reaching no gradient."""
    def program():
        torch.manual_seed(0)
        w = torch.randn(6, 4, requires_grad=True)
        y = (torch.randn(6, 4) * w).clone()
        y[1] = float("-inf")
        y[1, 2] = float("inf")  # (turned +inf)
        loss = y.softmax(1).pow(2).sum()
        loss.backward()
        return loss, w

    with gw.strong_zeros():
        loss, w = program()
    assert loss.isnan() and bool(w.grad.isfinite().all())
    with gw.trace() as report:
        program()
    (f,) = report.findings
    assert (f.kind, f.born_op, f.reaches) == ("nan", "aten.copy_", []), str(report)
    assert f.born_location.endswith(f"test_hunt_tr34.py:{_line('# (turned +inf)')}"), str(report)
    assert "then aten._softmax" in f.born, f.born


def test_cross_entropy_per_row_of_a_used_inf_logit_is_one_genuine_finding():
    """Before: `F.cross_entropy(x * w, target, reduction='none')[:4].sum()` with padding rows 4: NaN and x[0, 1] =
    -inf (w[0, 1] < 0: a +inf logit): log_softmax's NaN of the used row (inf - inf, born there) kept its input's
    row-wise parts, and the used Inf was two genuine NaN findings (the write's, and log_softmax's). Reference:
    strong zeros with each write alone (the used write alone leaves w's gradient NaN, the padding's does not)."""
    program = padded_program(lambda y: F.cross_entropy(y, torch.arange(6) % 4, reduction="none")[:4].sum(),
                             value=float("-inf"))
    report, genuine = traced_and_strong(program)
    assert genuine == {"aten.copy_"}
    (f,) = genuine_findings(report)
    assert (f.kind, f.born_op, f.reaches) == ("nan", "aten.copy_", ["w"]), str(report)
    assert "then aten._log_softmax" in f.born, f.born
    assert [(c.kind, c.born_op) for c in report.of_kind("contamination")] == [("contamination", "aten.fill_")]


@pytest.mark.parametrize("how", ["two tensors added", "one sum"])
def test_inf_plus_minus_inf_squared_is_a_finding_per_write(how):
    """Before: `(a + b).pow(2)` with a holding a written +inf and b a written -inf (or the sum of one tensor
    holding both): the NaN (born at the add/sum) was a finding of its own beside each write's, which met it again
    in the backward of the products that made a and b (three findings, or two, for two root causes). Reference:
    strong zeros with each write alone leave w's gradient non-finite: a genuine NaN finding per write, each
    telling that the add/sum made NaN of it, none born at the add/sum."""
    def program(plus: bool, minus: bool):
        torch.manual_seed(0)
        w = torch.randn(6, 4, requires_grad=True)
        x, x2 = torch.randn(6, 4), torch.randn(6, 4)
        if plus:
            x[0, 1] = float("inf")  # (+inf)
        if minus and how == "one sum":
            x[0, 2] = float("-inf")  # (-inf, one sum)
        elif minus:
            x2[0, 1] = float("-inf")  # (-inf, two tensors)
        if how == "one sum":
            (x.clone() * w).sum(1).pow(2).sum().backward()
        else:
            ((x2.clone() * w).sum(1) + (x.clone() * w).sum(1)).pow(2).sum().backward()
        return w

    report = traced_with_each_write_kept(program)
    made = "aten.sum" if how == "one sum" else "aten.add"
    assert [(f.kind, f.born_op, f.reaches) for f in report.findings] == [("nan", "aten.copy_", ["w"])] * 2, \
        str(report)
    lines = {_line("# (+inf)"), _line("# (-inf, one sum)" if how == "one sum" else "# (-inf, two tensors)")}
    assert {int(f.born_location.rpartition(":")[2]) for f in report.findings} == lines, str(report)
    assert all(f"then {made}" in f.born for f in report.findings), str(report)


def test_a_nan_born_in_a_mapped_body_is_named_where_it_was_born():
    """Before: torch's map HOP calls its body as a functools.partial, which the trace did not run under itself
    (only functions and modules): the NaN sqrt made inside the body was never observed, and the stacked output
    (made outside the mode) was told as data arriving non-finite. Reference: the same body run eagerly makes the
    NaN at its sqrt (the program's own rows 0 and 2 are negative there)."""
    from torch._higher_order_ops.map import map as hop_map

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4)
    assert torch.sqrt(lin(x)).isnan().any()
    with gw.trace() as report:
        ys = hop_map(lambda r: (torch.sqrt(r) * 2,), lin(x))  # (the sqrt)
        ys[0].sum().backward()
    births = [(f.kind, f.born_op, f.born_location) for f in genuine_findings(report)]
    assert [(kind, op, loc.rpartition(":")[2]) for kind, op, loc in births] == [
        ("nan", "aten.sqrt", str(_line("# (the sqrt)")))], str(report)
    assert not any(f.born_op == "input" for f in report.findings), str(report)
