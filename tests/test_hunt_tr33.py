"""Hunt tr33: the trace's births per element (parts) through ops no table describes, told by running the op again
with one part's NaN/Inf alone (``_trace/_probes.py``). Ground truth: plain torch under gw.strong_zeros() with
each write alone (which writes leave w's gradient non-finite), never the trace itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwise as gw
from _explaining import genuine_findings, padded_program, traced_and_strong


def _program(loss_of, other: float, at: tuple, linear: bool, used_first: bool = False):
    """x * w with x's rows 4: NaN padding (fill_) and x[at] = other (copy_), through ``loss_of``, its result
    summed (``linear``) or squared then summed."""
    def loss(y):
        return loss_of(y).sum() if linear else loss_of(y).pow(2).sum()

    return padded_program(loss, at, other, seed=1, used_first=used_first)


def _told_as_strong_zeros_tell(program) -> None:
    """The genuine findings' births are the writes that, alone, leave strong-zero gradients non-finite, each
    named reaching w; no note."""
    report, genuine = traced_and_strong(program)
    assert {f.born_op for f in genuine_findings(report)} == genuine, str(report)
    assert all(any("w" in f.reaches for f in genuine_findings(report) if f.born_op == op) for op in genuine), \
        str(report)
    assert not report.notes, str(report)


def _lstm(y):
    return nn.LSTM(4, 3, batch_first=True)(y[:, None].expand(6, 3, 4))[0][:, -1].sum(1)[:4]


def _encoder(y):
    layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
    return layer(y[:, None].expand(6, 2, 4).contiguous())[:4].sum((1, 2))


_UNDESCRIBED = {  # ops whose parts no table of _Parts describes (each sequence/sample a row of x)
    "group_norm": lambda y: F.group_norm(y[:, :, None], 2)[:4].sum((1, 2)),
    "interpolate": lambda y: F.interpolate(y[None], scale_factor=2)[0, :4].sum(1),
    "adaptive_avg_pool1d": lambda y: F.adaptive_avg_pool1d(y[None], 3)[0, :4].sum(1),
    "index_add": lambda y: torch.zeros(6, 4).index_add(0, torch.arange(6), y)[:4].sum(1),
    "scatter_add": lambda y: torch.zeros(6, 4).scatter_add(0, torch.arange(6)[:, None].expand(6, 4), y)[:4].sum(1),
    "copy_ of a flip": lambda y: y.copy_(y.flip(1))[:4].sum(1),
    "lstm": _lstm,
    "transformer_encoder_layer": _encoder,
}
_LSTM_OVER = ("oneDNN's LSTM layer (forward and backward, sharing a workspace that holds every part's NaN) is not "
              "probed (_facts.UNPROBED: probed, it named the birth the workspace kept and dropped a used NaN: "
              "SILENT, review_tr33), so every birth is named there, the padding too (over-reported, as on the base)")


def _op_params(ops):
    return [pytest.param(op, marks=pytest.mark.xfail(strict=True, reason=_LSTM_OVER)) if "lstm" in op else op
            for op in ops]
_USED = {"nan": (float("nan"), (0, 1)), "inf": (float("inf"), (2, 2)), "-inf": (float("-inf"), (1, 3))}


@pytest.mark.parametrize("used", list(_USED))
@pytest.mark.parametrize("op", _op_params(_UNDESCRIBED))
def test_padding_beside_a_used_nonfinite_through_an_undescribed_op(op, used):
    """Before: padding rows 4: NaN (fill_, sliced away: strong zeros remove it) beside a used NaN/Inf (copy_),
    through an op whose output lost the parts (every birth at every element): the padding, the earliest birth,
    was a genuine finding reaching w, and the used write "reaches: no gradient" (-inf: SILENT through
    group_norm and the encoder layer, the used write was in no finding at all, its -inf taken for a mask's).
    The op run again with each part's NaN/Inf alone tells which elements each birth makes non-finite (forward),
    and in the backward which parts strong zeros keep (the shadow pass). LSTM: oneDNN's layer backward reads a
    workspace holding the padding's NaN, so where the used NaN reaches is read under its strong-zero rule."""
    other, at = _USED[used]
    _told_as_strong_zeros_tell(_program(_UNDESCRIBED[op], other, at, linear=False))


@pytest.mark.parametrize("op", _op_params(["group_norm", "index_add", "lstm", "transformer_encoder_layer"]))
@pytest.mark.parametrize("used_first", [False, True], ids=["padding first", "used first"])
def test_a_loss_linear_in_an_undescribed_op_names_each_birth(op, used_first):
    """`op(x * w)[:4].sum()`: the sensitivity reaching op's backward is finite, so the NaN first meets it there
    (a backward no table describes). Before: the genuine incident named every birth of the saved input (the
    padding's too), or only the earliest where the parts were lost."""
    _told_as_strong_zeros_tell(_program(_UNDESCRIBED[op], float("nan"), (0, 1), linear=True, used_first=used_first))


def test_more_births_than_parts_kept_are_told_together_not_all_at_every_element():
    """Before: padding rows 10: NaN (fill_) beside nine used NaN writes (nine births, one a line): past 8 parts the
    tensor kept none, every birth was named at every element, and the padding (sliced away, removed by strong
    zeros) was a genuine finding reaching w. Now the smallest parts are told together, and a note says so."""
    def program(pad: bool, used: bool):
        torch.manual_seed(0)
        w = torch.randn(12, 4, requires_grad=True)
        x = torch.randn(12, 4)
        if pad:
            x[10:] = float("nan")
        if used:
            x[0, 0] = float("nan")
            x[1, 0] = float("nan")
            x[2, 0] = float("nan")
            x[3, 0] = float("nan")
            x[4, 0] = float("nan")
            x[5, 0] = float("nan")
            x[6, 0] = float("nan")
            x[7, 0] = float("nan")
            x[8, 0] = float("nan")
        (x.clone() * w).sum(1)[:10].pow(2).sum().backward()
        return w

    report, genuine = traced_and_strong(program)
    assert genuine == {"aten.copy_"}
    told = genuine_findings(report)
    assert {f.born_op for f in told} == genuine and len(told) == 9, str(report)
    assert all(f.reaches == ["w"] for f in told), str(report)
    assert any(n.startswith("births told together") for n in report.notes), report.notes


@pytest.mark.parametrize("linear", [False, True], ids=["squared", "linear"])
def test_a_minus_inf_copied_in_is_data_not_a_mask(linear):
    """SILENT before: x[1, 3] = -inf (copy_: data, made +inf by a negative w) beside NaN padding rows, through
    softmax(0) (each column reads the padding: both writes used). The write was told "(-inf: a mask value)",
    which explains no NaN: it was in no finding though strong zeros keep it alone."""
    _told_as_strong_zeros_tell(_program(lambda y: y.softmax(0)[:4], float("-inf"), (1, 3), linear=linear))


def test_an_inf_and_a_copied_minus_inf_summed_in_a_used_row_each_reach_w():
    """Before: x[0, 0:1] = inf (fill_) and x[0, 1] = -inf (copy_) in one row, summed (inf - inf = NaN), the loss
    squared: either write alone leaves w's gradient non-finite, but the -inf, taken for a mask's, "reaches: no
    gradient"."""
    def program(first: bool, second: bool):
        torch.manual_seed(0)
        w = torch.randn(6, 4, requires_grad=True)
        x = torch.randn(6, 4)
        if first:
            x[0, 0:1] = float("inf")
        if second:
            x[0, 1] = float("-inf")
        (x.clone() * w).sum(1).pow(2).sum().backward()
        return w

    report, genuine = traced_and_strong(program)
    assert genuine == {"aten.fill_", "aten.copy_"}
    assert {f.born_op for f in genuine_findings(report) if "w" in f.reaches} == genuine, str(report)


_SAVED_TOGETHER = {  # backwards whose NaN needs one birth's NaN/Inf in several operands at once
    "cdist": lambda y: torch.cdist(y[:, None], torch.ones(6, 2, 4))[:4].flatten(1),
    "lstm of 2 layers": lambda y: nn.LSTM(4, 3, 2, batch_first=True)(y[:, None].expand(6, 3, 4))[0][:4, -1],
}


@pytest.mark.parametrize("linear", [False, True], ids=["squared", "linear"])
@pytest.mark.parametrize("op", _op_params(_SAVED_TOGETHER))
def test_one_births_nonfinite_in_several_operands_is_probed_together(op, linear):
    """Before: a used Inf at x[2, 2] beside NaN padding rows. cdist's backward makes NaN of the upstream Inf and
    the saved inf distance together (inf / inf), neither alone: each part probed by itself made nothing, and every
    birth (the padding's too) was named (the base too). A 2-layer LSTM (a regression of the first probes, not the
    base's): the first layer's weight gradient met the used Inf through a nonzero sensitivity (no classified
    incident), named with every birth of the saved input. Each birth is now probed with its NaN/Inf in every
    operand (the saved ones' parts, a sensitivity whose genuine NaN/Inf descends from it)."""
    _told_as_strong_zeros_tell(_program(_SAVED_TOGETHER[op], float("inf"), (2, 2), linear=linear))


@pytest.mark.parametrize("module", ["BatchNorm1d", "_batch_norm_impl_index"])
def test_a_probe_never_moves_a_batch_norms_running_statistics(module):
    """SILENT on tr33 (not the base): a training BatchNorm1d on x * w whose channel 0 holds NaN padding rows
    beside a used Inf (two births). The probes ran native_batch_norm again once per part, whose schema writes
    nothing though it updates running_mean/var in place: under the trace the module's running statistics moved
    several times (running_mean[1] 0.0222 -> 0.1159), a silent change of the model. The probe now gives a
    training batch norm fresh running statistics (``UNDECLARED_WRITES``)."""
    def run(traced: bool):
        torch.manual_seed(0)
        bn = nn.BatchNorm1d(4)
        w = torch.randn(6, 4, requires_grad=True)
        x = torch.randn(6, 4)
        x[4:, 0] = float("nan")
        x[1, 0] = float("inf")

        def program():
            y = x.clone() * w
            if module == "BatchNorm1d":
                out = bn(y)
            else:  # (the composite the module's batch_norm dispatches through)
                out = torch.ops.aten._batch_norm_impl_index(y, bn.weight, bn.bias, bn.running_mean,
                                                            bn.running_var, True, 0.1, 1e-5, False)[0]
            out[:4].pow(2).sum().backward()

        if traced:
            with gw.trace():
                program()
        else:
            program()
        return bn.running_mean, bn.running_var, torch.get_rng_state()

    for plain, traced in zip(run(False), run(True), strict=True):
        assert torch.equal(plain, traced) or torch.equal(plain.nan_to_num(7.0), traced.nan_to_num(7.0)), \
            (plain, traced)


def _lstm_on_a_constant_input(pad: bool, used: bool):
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 4, batch_first=True)
    x = torch.randn(8, 5, 4)
    if pad:
        x[4:] = float("nan")
    if used:
        x[0, 3, 0] = float("nan")
    lstm(x)[0][:4].pow(2).sum().backward()
    return lstm.weight_ih_l0


def test_an_lstm_on_a_constant_input_names_its_used_nan():
    """SILENT on tr33 (review_tr33): the probes of oneDNN's LSTM layer backward named only the padding (its
    workspace keeps the padding's NaN in every probe), and the used NaN x[0, 3, 0] was in no finding."""
    report, genuine = traced_and_strong(_lstm_on_a_constant_input)
    assert genuine == {"aten.copy_"}
    assert "aten.copy_" in {f.born_op for f in genuine_findings(report)}, str(report)


@pytest.mark.xfail(strict=True, reason=_LSTM_OVER)
def test_an_lstm_on_a_constant_input_names_its_used_nan_not_its_padding():
    """Truth (gw.strong_zeros, each write alone): the used NaN x[0, 3, 0] (copy_) leaves every weight gradient
    NaN, the padding rows 4: (fill_) none; the trace names both (the padding over-reported)."""
    report, genuine = traced_and_strong(_lstm_on_a_constant_input)
    assert {f.born_op for f in genuine_findings(report)} == genuine, str(report)
