"""Review of trace31 (per-element births through scans, row-wise ops, amax's ties, nll_loss, in-place mask
writes). Ground truth: plain torch under gw.strong_zeros() with each NaN write alone (which writes leave a
non-finite gradient), never the trace itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gradwise as gw
from _explaining import genuine_findings, masked_key_attention, padded_program, traced_and_strong


def _told_as_strong_zeros_tell(loss_of, linear: bool = True) -> None:
    """`loss_of(x * w)` with x's rows 4: NaN padding (fill_) and x[0, 1] = NaN (copy_): the genuine findings'
    births are the writes that, alone, leave strong-zero gradients non-finite, and each reaches w."""
    def loss(y):
        return loss_of(y).sum() if linear else loss_of(y).pow(2).sum()

    report, genuine = traced_and_strong(padded_program(loss))
    assert {f.born_op for f in genuine_findings(report)} == genuine, str(report)
    assert all(f.reaches == ["w"] for f in genuine_findings(report)), str(report)


_ROW_BACKWARDS = {
    "softmax": lambda y: y.softmax(1)[:4],
    "log_softmax": lambda y: y.log_softmax(1)[:4, 2],
    "layer_norm": lambda y: F.layer_norm(y, (4,))[:4, 3],
    "layer_norm over 2 dims": lambda y: F.layer_norm(y.view(3, 2, 4), (2, 4))[:2],
    "cross_entropy per row": lambda y: F.cross_entropy(y, torch.arange(6) % 4, reduction="none")[:4],
    "amax": lambda y: y.amax(1)[:4],
    "amax keepdim": lambda y: y.amax(1, keepdim=True)[:4],
    "amin": lambda y: y.amin(1)[:4],
    "amax over 2 dims": lambda y: y.view(3, 2, 4).amax((1, 2))[:2],
}


@pytest.mark.parametrize("op", list(_ROW_BACKWARDS))
def test_a_row_wise_backward_names_each_rows_births(op):
    """SILENT for the used NaN before: `op(x * w)[:4].sum()` (a loss linear in op's output, so the sensitivity
    reaching op's backward is finite and the NaN first meets it there) with padding rows 4: NaN beside a used NaN
    at x[0, 1]. The backward (softmax's, layer norm's, amax's g / count of ties) is no elementwise op, so its
    genuine incident took every birth of its saved values: the padding, sliced away and removed by strong zeros,
    was a genuine finding with the used row's elements "reaching w", and the used NaN "reaches: no gradient".
    (The tr31 hunt's `.pow(2).sum()` makes that sensitivity NaN already, carried, which hid it.)"""
    _told_as_strong_zeros_tell(_ROW_BACKWARDS[op])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_over_ignored_padding_rows_is_no_genuine_finding(reduction):
    """Before: `F.cross_entropy(x * w, target)` with target -100 (ignore_index) at the padding rows 4: NaN, and
    a used NaN at x[0, 1]: the NaN loss took every part's births (a reduced nll_loss had no rows), so the
    padding, whose rows the loss skips and strong zeros remove, was a genuine finding of 8 elements reaching w."""
    target = torch.tensor([0, 1, 2, 3, -100, -100])
    _told_as_strong_zeros_tell(lambda y: F.cross_entropy(y, target, reduction=reduction), linear=False)


@pytest.mark.parametrize("fn", [
    pytest.param(lambda y: y.logcumsumexp(1)[:4, -1], id="logcumsumexp"),
    pytest.param(lambda y: F.max_pool2d(y[None, None], 2)[0, 0, :2], id="max_pool2d windows over rows"),
    pytest.param(lambda y: F.avg_pool2d(y[None, None], 2, 1)[0, 0, :3], id="avg_pool2d windows over rows"),
    pytest.param(lambda y: F.max_pool1d(y.t()[None], 2)[0, :, :2], id="max_pool1d windows over columns"),
])
def test_row_wise_births_not_yet_told(fn):
    """The padding rows 4: (NaN), dropped, beside a used NaN at x[0, 1], were a genuine finding. A pooling's row
    was its whole plane, not its windows (tr32: the pooling run on each part's mask). logcumsumexp's backward is
    composite (log|g| - result, a reversed logcumsumexp, exp): its first sub met the padding rows' NaN with
    log|0|, no zero (a genuine incident), which its last op's whole-formula rule annihilated, but the used row's
    elements carried it on to w (tr35b: the formula's own incidents kept only in the kept elements' rows)."""
    _told_as_strong_zeros_tell(fn, linear=False)


def test_an_inf_in_a_row_already_nan_is_named_too():
    """Before (SILENT; fixed in tests/test_hunt_tr31b.py, which has the sigmoid/prod form): x[0, 0] = inf and
    x[0, 1] = nan in one row, `tanh(x * w).sum(1).pow(2)`: w's gradient at (0, 0) is NaN with either write alone
    (0 x inf; NaN x ...), but only the NaN write was named there."""
    def program(inf: bool, nan: bool):
        torch.manual_seed(0)
        w = torch.randn(6, 4, requires_grad=True)
        x = torch.randn(6, 4)
        if inf:
            x[0, 0] = float("inf")
        if nan:
            x[0, 1] = float("nan")
        (x.clone() * w).tanh().sum(1).pow(2).sum().backward()
        return w

    for writes in ((True, False), (False, True)):
        with gw.strong_zeros():
            assert not bool(program(*writes).grad[0].isfinite().all())
    with gw.trace() as report:
        program(True, True)
    assert len({f.born_location for f in genuine_findings(report)}) == 2, str(report)


@pytest.mark.parametrize("in_place", [True, False])
def test_padding_keys_masked_in_attention_are_no_genuine_finding(in_place):
    """Before: attention whose padding keys (k[1, 3:]) are NaN and masked to -inf, beside a used NaN query
    element (q[0, 2, 1]): `q @ w @ k^T` (bmm of two non-finite operands, then matmul's _unsafe_view, no view by
    schema) took both births for every element, so the used row's softmax NaN named the padding keys too: a
    genuine finding for padding that strong zeros remove (alone, the gradient is finite), and the used NaN
    "reaches: no gradient"."""
    def program(pad: bool, nan: bool):
        return masked_key_attention(pad, False, nan, in_place)

    with gw.strong_zeros():
        assert bool(program(True, False).grad.isfinite().all())
        assert not bool(program(False, True).grad.isfinite().all())
    with gw.trace() as report:
        program(True, True)
    assert [(f.born_op, f.reaches) for f in genuine_findings(report)] == [("aten.copy_", ["w"])], str(report)


_PAD = (torch.arange(6) >= 4)[:, None].expand(6, 4)
_ZEROED = {
    "s[pad] = 0": lambda s: s.__setitem__(_PAD, 0.0),
    "index_fill_(0, pad rows, 0)": lambda s: s.index_fill_(0, torch.tensor([4, 5]), 0.0),
    "masked_fill_(pad, 0)": lambda s: s.masked_fill_(_PAD, 0.0),
}


@pytest.mark.parametrize("write", list(_ZEROED))
def test_padding_zeroed_in_place_is_no_genuine_finding(write):
    """Before (s[pad] = 0, index_fill_): `s = x * w; s[pad] = 0; s.sum()` with the padding rows 4: NaN beside a
    used NaN at x[0, 1]: an in-place selected write is no elementwise op, so s's parts were dropped and the NaN
    loss named the padding it had zeroed a genuine finding (masked_fill_, elementwise, kept them)."""
    def zeroed(y):
        s = y + 0
        _ZEROED[write](s)
        return s

    _told_as_strong_zeros_tell(zeroed)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_a_fully_masked_row_beside_padding_keeps_the_rows_births(op):
    """Before: scores with padding rows 4: NaN, a used NaN at x[0, 1] and row 1 fully masked in place (-inf), then
    softmax(1)[:4]: the fully masked row was born at softmax (right), but the other NaN rows took every birth, so
    the padding, sliced away, was a genuine finding at row 0's elements reaching w and the used NaN "reaches: no
    gradient". Reference: strong zeros with the padding write alone leave the gradient finite."""
    def program(pad: bool, nan: bool):
        torch.manual_seed(0)
        w = torch.randn(6, 4, requires_grad=True)
        x = torch.randn(6, 4)
        if pad:
            x[4:] = float("nan")
        if nan:
            x[0, 1] = float("nan")
        s = x.clone() * w
        s[1] = float("-inf")
        getattr(s, op)(1)[:4].pow(2).sum().backward()
        return w

    with gw.strong_zeros():
        assert bool(program(True, False).grad.isfinite().all())
        assert not bool(program(False, True).grad.isfinite().all())
    with gw.trace() as report:
        program(True, True)
    assert {(f.born_op, tuple(f.reaches)) for f in genuine_findings(report)} == {
        ("aten.copy_", ("w",)), (f"aten._{op}", ("w",))}, str(report)
