"""Hunt tr32: per-element births through modules and in-place ops. Ground truth: plain torch under
gw.strong_zeros() with each write alone (which writes leave w's gradient non-finite), never the trace itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _explaining import genuine_findings, padded_program, traced_and_strong


def _told_as_strong_zeros_tell(loss_of, other: float = float("nan"), at: tuple = (0, 1)) -> None:
    """`loss_of(x * w).pow(2).sum()` with x's rows 4: NaN padding (fill_) and x[at] = other (copy_): the genuine
    findings' births are the writes that, alone, leave strong-zero gradients non-finite, each named reaching w."""
    report, genuine = traced_and_strong(padded_program(lambda y: loss_of(y).pow(2).sum(), at, other, seed=1))
    assert {f.born_op for f in genuine_findings(report)} == genuine, str(report)
    assert all(any("w" in f.reaches for f in genuine_findings(report) if f.born_op == op) for op in genuine), \
        str(report)
    assert not report.notes, str(report)


def _conv(y):
    return nn.Conv1d(1, 2, 3, padding=1)(y[:, None]).sum((1, 2))[:4]


def _attention(y):
    q = y[:, None]  # 6 sequences of one token
    return nn.MultiheadAttention(4, 2, batch_first=True)(q, q, q)[0].sum((1, 2))[:4]


def _attention_over_tokens(y):
    """One sequence of 6 tokens, the padding ones unmasked (so strong zeros keep them genuine too)."""
    return nn.MultiheadAttention(4, 1, batch_first=True)(y[None], y[None], y[None])[0][0, :4].sum(1)


def _gru(y):
    return nn.GRU(4, 3, batch_first=True)(y[:, None].expand(6, 3, 4))[0][:, -1].sum(1)[:4]


@pytest.mark.parametrize("other,at", [(float("nan"), (0, 1)), (float("inf"), (2, 2))], ids=["nan", "inf"])
@pytest.mark.parametrize("module", [_conv, _attention, _attention_over_tokens, _gru],
                         ids=["conv1d", "multihead_attention", "attention_over_tokens", "gru"])
def test_padding_beside_a_used_nonfinite_through_a_module(module, other, at):
    """SILENT before: padding rows 4: NaN (sliced away, removed by strong zeros) beside a used NaN/Inf, through a
    Conv1d or a multi-head attention: the padding was a second genuine finding. Conv1d: the shadow strong pass
    built the part's operands inside the strong mode, where the where() that zeroes the other parts made
    structural zeros, two tracked operands the rule runs plainly (0 x NaN). Attention: q.view(...) of a
    transposed tensor failed on a contiguous mask ("not explained"), the view lost its parts; and with an Inf,
    softmax dropped the Inf's birth though its scores were NaN (inf - inf): "reaches: no gradient". GRU: its gates'
    unsafe_split and its output's transpose_ (an in-place view op) dropped the parts. Attention over tokens: the
    used Inf made NaN scores (inf - inf), its NaN incident was named after the padding's NaN birth only, and the
    Inf's own finding said "reaches: no gradient"."""
    _told_as_strong_zeros_tell(module, other, at)


_IN_PLACE = {
    "cumsum_": lambda y: y.cumsum_(1)[:4],
    "t().cumsum_": lambda y: y.t().cumsum_(0).t()[:4],
    "t().cumprod_": lambda y: y.t().cumprod_(0).t()[:4],
    "transpose_": lambda y: y.transpose_(0, 1).cumsum(0)[:, :4],
}


@pytest.mark.parametrize("op", list(_IN_PLACE))
def test_padding_beside_a_used_nan_through_an_in_place_op(op):
    """SILENT before: an in-place scan (cumsum_, cumprod_, on a transposed view too) or in-place view op
    (transpose_) of x * w with padding rows 4: NaN beside a used NaN at x[0, 1]: the in-place op dropped the
    parts (redone only for elementwise ops), so the padding, sliced away, was a genuine finding."""
    _told_as_strong_zeros_tell(_IN_PLACE[op])


_ROW_MIXING = {
    "sum(1)": lambda y: y.sum(1),
    "mm": lambda y: y @ torch.ones(4, 3),
    "softmax": lambda y: y.softmax(1),
    "layer_norm": lambda y: F.layer_norm(y, (4,)),
    "norm": lambda y: y.norm(dim=1),
    "sum() * ones": lambda y: y.sum() * torch.ones(4),  # (a review: each birth at the sum's one element)
}


@pytest.mark.parametrize("op", list(_ROW_MIXING))
def test_two_used_nan_writes_in_one_row_each_reach_w(op):
    """Before: x[0, 2:3] = NaN (fill_) and x[0, 1] = NaN (copy_), both used, in one row that `op` mixes: the NaN
    sensitivity carries both births into w's gradient (either write alone leaves it NaN under strong zeros), but
    the incident was named after the earliest birth only: the other write was a finding "reaches: no gradient"."""
    def program(first: bool, second: bool):
        torch.manual_seed(0)
        w = torch.randn(6, 4, requires_grad=True)
        x = torch.randn(6, 4)
        if first:
            x[0, 2:3] = float("nan")
        if second:
            x[0, 1] = float("nan")
        _ROW_MIXING[op](x.clone() * w).pow(2).sum().backward()
        return w

    report, genuine = traced_and_strong(program)
    assert genuine == {"aten.fill_", "aten.copy_"}
    assert {f.born_op for f in genuine_findings(report) if "w" in f.reaches} == genuine, str(report)


_PARTS_LOST = {  # ops whose output loses its input's parts (every birth at every element: Incident.vague)
    "index_add": lambda y: torch.zeros(6, 4).index_add(0, torch.arange(6), y)[:4].sum(1),
    "group_norm": lambda y: F.group_norm(y[:, :, None], 2)[:4].sum((1, 2)),
    "interpolate": lambda y: F.interpolate(y[None], scale_factor=2)[0, :4].sum(1),
}


@pytest.mark.parametrize("op", list(_PARTS_LOST))
def test_a_write_strong_zeros_drop_reaches_no_gradient_where_parts_were_lost(op):
    """SILENT on tr32 (a review): x[0, 1] = NaN (used) then padding rows 4: NaN, through an op that loses the parts:
    the incidents met the tensor's whole provenance, and "a genuine incident names every birth it met" named the
    padding (removed by strong zeros) a genuine NaN reaching w (x.copy_(x.flip(0)) too: test_hunt_explain's
    moved NaN reaching every parameter). Births not told apart name the explaining one only, as before tr32."""
    def program(pad: bool, used: bool):
        torch.manual_seed(0)
        w = torch.randn(6, 4, requires_grad=True)
        x = torch.randn(6, 4)
        if used:
            x[0, 1] = float("nan")
        if pad:
            x[4:] = float("nan")
        _PARTS_LOST[op](x.clone() * w).pow(2).sum().backward()
        return w

    report, genuine = traced_and_strong(program)
    assert genuine == {"aten.copy_"}
    assert {f.born_op for f in genuine_findings(report) if "w" in f.reaches} == genuine, str(report)


def _transpose_a_view(h):
    h[:, :].transpose_(0, 1)  # (a view of h, transposed in place: h's elements stay where they were)
    return h[:4].sum(1)


def _scan_a_view(h):
    h.t().cumsum_(1)  # (rows 0, 1's NaN carried down h's columns: into the used rows 2:)
    return h[2:].sum(1)


@pytest.mark.parametrize(("op", "pad", "used"), [
    (_transpose_a_view, (slice(4, None),), (0, 1)), (_scan_a_view, (slice(0, 2),), (3, 1))],
    ids=["transpose_ of a view", "cumsum_ of a transposed view"])
def test_an_in_place_op_on_a_view_keeps_its_base_parts(op, pad, used):
    """SILENT before (a review of tr32): padding rows NaN (fill_) and a used NaN (copy_) in h = x * w, then an
    in-place op on a view of h, then h read. transpose_ of a view was a write of every element of h with the
    view's whole provenance: the padding was a genuine finding reaching w (before tr32: the used NaN "reaching no
    gradient"). An in-place scan of h.t() wrote h with the view's whole provenance: both births, genuine, were
    named by the earliest only (the used write "reaching no gradient"). An in-place view op writes nothing into
    its base; an in-place op on a view writes the view's parts into its base."""
    def program(pad_: bool, used_: bool):
        torch.manual_seed(0)
        w = torch.randn(6, 4, requires_grad=True)
        x = torch.randn(6, 4)
        if pad_:
            x[pad] = float("nan")
        if used_:
            x[used] = float("nan")
        op(x.clone() * w).pow(2).sum().backward()
        return w

    report, genuine = traced_and_strong(program)
    assert {f.born_op for f in genuine_findings(report)} == genuine, str(report)
    assert {f.born_op for f in genuine_findings(report) if "w" in f.reaches} == genuine, str(report)
