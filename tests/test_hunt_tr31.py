"""Hunt of trace31: per-element births (parts) through norms, products and scans; amax's count of ties over a NaN
row; in-place -inf mask writes; backward-born Inf counts through expand. Ground truth is plain torch with
gw.strong_zeros() (which gradient elements stay non-finite) with each write alone, never the trace itself."""

from __future__ import annotations

import pytest
import torch

import gradwise as gw
from _explaining import genuine_findings, padded_program, traced_and_strong, traced_with_each_write_kept

_REDUCTIONS = {
    "vector_norm": lambda y: torch.linalg.vector_norm(y, dim=1),
    "norm": lambda y: y.norm(dim=1),
    "prod": lambda y: y.prod(1),
    "cumsum": lambda y: y.cumsum(1)[:, -1],
    "cumprod": lambda y: y.cumprod(1)[:, -1],
    "cumsum over rows": lambda y: y.cumsum(0),
    "amax": lambda y: y.amax(1),
    "logsumexp": lambda y: y.logsumexp(1),
}


@pytest.mark.parametrize("keep", [4, 6])
@pytest.mark.parametrize("op", list(_REDUCTIONS))
def test_padding_reduced_beside_a_used_inf_is_told_as_strong_zeros_tell_it(op, keep):
    """SILENT before (vector_norm, norm, prod, cumsum, cumprod): `op(x * w)[:4]` with x's rows 4: NaN padding
    (fill_) and x[0, 0] = Inf (copy_): the padding, sliced away, was a "genuine NaN" finding. vector_norm's
    backward divides x by the norm, then masked_fill_s it in place, which dropped the per-element births (an
    in-place op is tagged no pointwise); prod's backward (an Inf input: cumprods of the others) and cumsum took
    every part's births (a scan is no reduction). The reference: strong-zero gradients with each write alone."""
    report, genuine = traced_and_strong(padded_program(lambda y: _REDUCTIONS[op](y)[:keep].pow(2).sum(), (0, 0),
                                                       float("inf")))
    assert {f.born_op for f in genuine_findings(report)} == genuine


@pytest.mark.parametrize("op", ["amax", "amin"])
@pytest.mark.parametrize("keep", [3, 4])
def test_amax_of_a_nan_row_is_that_rows_nan(op, keep):
    """Before: `(x * w).amax(1)[:k]` with x's row 3 NaN. amax's backward divides g by the count of elements equal
    to its result, 0 in the NaN row: kept (k = 4) that was a second, genuine *Inf* finding "the backward of
    aten.amax made Inf from finite values (an infinite derivative used)"; sliced away (k = 3) a contamination
    finding with no birth ("0/0 or 0 x Inf"), "unused since aten.amax" with amax's fix. Both are the NaN row's
    (aten.fill_), and sliced away it is the slice's. Reference: strong zeros keep row 3 NaN exactly when k = 4."""
    def program():
        torch.manual_seed(0)
        w = torch.randn(4, 3, requires_grad=True)
        x = torch.randn(4, 3)
        x[3] = float("nan")
        getattr(x * w, op)(1)[:keep].sum().backward()
        return w

    with gw.strong_zeros():
        strong = program().grad
    with gw.trace() as report:
        program()
    assert [(f.kind, f.born_op) for f in genuine_findings(report)] == ([("nan", "aten.fill_")] if keep == 4 else [])
    assert [f.born_op for f in report.findings] == ["aten.fill_"]
    if keep == 4:
        assert genuine_findings(report)[0].count == int((~strong.isfinite()).sum())
    else:
        assert bool(strong.isfinite().all())
        assert (report.findings[0].kind, report.findings[0].discarded_op) == ("contamination", "aten.slice")


_MASK_WRITES = {
    "masked_fill_": lambda s, m: s.masked_fill_(m, float("-inf")),
    "masked_fill_ of a 0-dim": lambda s, m: s.masked_fill_(m, torch.tensor(float("-inf"))),
    "s[m] = -inf": lambda s, m: s.__setitem__(m, float("-inf")),
    "index_fill_": lambda s, m: s.index_fill_(0, torch.tensor([1]), float("-inf")),
    "masked_fill (out of place)": lambda s, m: s.masked_fill(m, float("-inf")),
}


@pytest.mark.parametrize("write", list(_MASK_WRITES))
def test_an_in_place_minus_inf_mask_write_is_a_birth(write):
    """SILENT before: scores holding a NaN in row 3 (a padding row the loss drops), then row 1 fully masked in
    place (`s.masked_fill_(m, -inf)`, `s[m] = -inf`, index_fill_), then softmax: row 1's NaN (0/0) is genuine
    (the loss reads it), but the in-place write made no birth, so that NaN was told as descending from the
    padding row's NaN ("root cause aten.copy_ ...; the output uses it: genuine NaN"), and the -inf write was no
    root cause. The out-of-place masked_fill made its birth already. Reference: the write deleted leaves the
    loss finite."""
    def program(pad: bool):
        torch.manual_seed(0)
        w = torch.randn(4, 5, requires_grad=True)
        x = torch.randn(4, 5)
        if pad:
            x[3, 1] = float("nan")
        s = torch.randn(4, 5) * w + x
        mask = torch.zeros(4, 5, dtype=torch.bool)
        mask[1] = True
        got = _MASK_WRITES[write](s, mask)
        loss = (got if got is not None else s).softmax(-1)[:3].sum(1).pow(2).sum()
        loss.backward()
        return loss

    assert bool(program(False).isnan())  # the fully masked row makes the loss NaN, without the padding too
    with gw.trace() as report:
        program(True)
    genuine = genuine_findings(report)
    assert [(f.kind, f.born_op) for f in genuine] == [("nan", "aten._softmax")]
    text = str(report)
    written = [line for line in text.splitlines() if "root cause" in line and "-inf: a mask value" in line]
    assert len(written) == 1 and "genuine NaN" in written[0], text
    padding = [line for line in text.splitlines() if "root cause" in line and "aten.copy_" in line]
    assert len(padding) == 1 and "genuine" not in padding[0]


_EXPANDED = {
    "x.expand ** 0.5": (lambda x: (x.expand(4, 6) ** 0.5).sum(), (4, 1)),
    "x.expand.sqrt, columns sliced away": (lambda x: x.expand(4, 6).sqrt()[:, :3].sum(), (6,)),
    "broadcast add, sqrt, columns sliced away": (lambda x: (x + torch.zeros(4, 1)).sqrt()[:, :3].sum(), (6,)),
    "x.expand.sqrt": (lambda x: x.expand(4, 6).sqrt().sum(), (6,)),
}


@pytest.mark.parametrize("case", list(_EXPANDED))
def test_a_backward_born_inf_through_expand_counts_the_gradient_elements(case):
    """Before: `(x.expand(4, 6) ** 0.5).sum()` with x (4, 1) zeros counted 24 backward-born Inf (pow's backward
    computes self ** -0.5 of the expanded tensor: a birth counted in its coordinates), where x's gradient has 4;
    with sqrt of an expanded x and columns sliced away, 3 where strong zeros keep 2 (the contaminated column's
    NaN was counted as the genuine Inf's). Reference: the non-finite elements of the strong-zero gradient."""
    fn, shape = _EXPANDED[case]

    def program():
        x = torch.zeros(shape) if len(shape) == 2 else torch.tensor([0.0, 0.0, 1.0, 4.0, 0.0, 9.0])
        x.requires_grad_()
        fn(x).backward()
        return x

    with gw.strong_zeros():
        kept = int((~program().grad.isfinite()).sum())
    with gw.trace() as report:
        program()
    assert [(f.kind, f.count) for f in genuine_findings(report)] == [("inf", kept)]


def test_batch_norm_running_stats_a_nan_batch_wrote_are_no_arrival():
    """Before: BatchNorm1d in training mode on a batch with NaN padding rows: native_batch_norm writes NaN into
    running_mean/running_var, which the trace then read as its inputs (checked after the op): "tensor[4]
    arrived with 4 NaN value(s) (x2)", a second genuine NaN finding that reached no gradient, beside the padding's.
    Reference: the same program with the padding write deleted has no NaN at all."""
    def program(pad: bool):
        torch.manual_seed(0)
        bn = torch.nn.BatchNorm1d(4)
        x = torch.randn(6, 4)
        if pad:
            x[4:] = float("nan")
        bn(x)[:4].sum().backward()
        return bn

    assert all(bool(p.grad.isfinite().all()) for p in program(False).parameters())
    with gw.trace() as report:
        bn = program(True)
    assert [(f.kind, f.born_op) for f in genuine_findings(report)] == [("nan", "aten.fill_")]
    with gw.trace() as report:  # the NaN running stats, read in eval mode, are the padding's
        bn.eval()
        x = torch.randn(3, 4, requires_grad=True)
        bn(x).sum().backward()
    assert {f.born_op for f in genuine_findings(report)} == {"input"}


_COMPUTED_ZEROS = {"tanh": lambda y: y.tanh().sum(1), "sigmoid prod": lambda y: y.sigmoid().prod(1)}


@pytest.mark.parametrize("op", list(_COMPUTED_ZEROS))
def test_two_used_infinities_of_two_writes_are_both_named(op):
    """SILENT before: x[2, 2] = inf and x[5, 0] = -inf (two lines), `tanh(x * w).sum(1)`: each makes w's gradient
    NaN there (tanh'(inf) = 0, 0 x inf, which strong zeros keep), but the mul's backward met both in one incident,
    named after its earliest birth: the -inf write was in no finding. The reference: strong-zero gradients with
    each write alone."""
    def program(inf: bool, minus_inf: bool):
        torch.manual_seed(0)
        w = torch.randn(6, 4, requires_grad=True)
        x = torch.randn(6, 4)
        if inf:
            x[2, 2] = float("inf")
        if minus_inf:
            x[5, 0] = float("-inf")
        _COMPUTED_ZEROS[op](x.clone() * w).pow(2).sum().backward()
        return w

    report = traced_with_each_write_kept(program)
    assert len({f.born_location for f in genuine_findings(report)}) == 2
    assert {f.born_op for f in genuine_findings(report)} == {"aten.copy_"}


_ROWWISE = {
    "sort": lambda y: y.sort(1).values[:, 0],
    "topk": lambda y: y.topk(2, 1).values.sum(1),
    "median": lambda y: y.median(1).values,
    "layer_norm": lambda y: torch.nn.functional.layer_norm(y, (4,)).sum(1),
    "softmax": lambda y: y.softmax(1)[:, 0],
    "max_pool1d": lambda y: torch.nn.functional.max_pool1d(y[:, None], 2).sum((1, 2)),
    "repeat": lambda y: y.repeat(1, 2).sum(1),
    "cross_entropy per row": lambda y: torch.nn.functional.cross_entropy(y, torch.arange(6) % 4, reduction="none"),
}


@pytest.mark.parametrize("keep", [4, 6])
@pytest.mark.parametrize("op", list(_ROWWISE))
def test_padding_through_a_row_wise_op_keeps_its_rows(op, keep):
    """SILENT before: `op(x * w)[:keep]` with x's rows 4: NaN padding beside a used NaN at x[0, 1] (sort, topk,
    median(dim), layer_norm, softmax, max_pool, repeat, nll_loss per row): the op's output took every part's
    births, so the padding sliced away was a "genuine NaN" finding. Fix: the parts of a row-wise op are its
    input's parts per row (and repeat is run on the masks). The reference: strong-zero gradients with each write
    alone."""
    report, genuine = traced_and_strong(padded_program(lambda y: _ROWWISE[op](y)[:keep].pow(2).sum()))
    assert {f.born_op for f in genuine_findings(report)} == genuine


_WHERE_OPS = {"tanh": lambda y: y.tanh().sum(1), "logsumexp": lambda y: y.logsumexp(1),
              "vector_norm": lambda y: torch.linalg.vector_norm(y, dim=1), "std": lambda y: y.std(1),
              "layer_norm": lambda y: torch.nn.functional.layer_norm(y, (4,)).sum(1), "amax": lambda y: y.amax(1)}


@pytest.mark.parametrize("op", list(_WHERE_OPS))
def test_padding_a_where_replaces_is_no_genuine_finding(op):
    """SILENT before: `torch.where(keep, op(x * w), 0)` with x's rows 4: NaN padding (keep False there) beside a
    used NaN at x[0, 1]: the where's output took the padding's births too (an elementwise op's parts were kept
    where its output was finite), so the NaN loss named the padding a genuine finding ("reaches: no gradient").
    The reference: strong-zero gradients with each write alone."""
    keep = torch.arange(6) < 4

    def loss(y):
        return torch.where(keep, _WHERE_OPS[op](y), 0.0).pow(2).sum()

    report, genuine = traced_and_strong(padded_program(loss))
    assert {f.born_op for f in genuine_findings(report)} == genuine == {"aten.copy_"}
