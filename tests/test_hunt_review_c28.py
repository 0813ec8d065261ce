"""Review of round 28: the trace and gw.grad on contamination a log-space sum discards (logaddexp's and logsumexp's
weight of a -inf argument, the shared fact ``gradwise._ops._zeros.LOG_SPACE_SUMS``).

gw.grad removes a NaN that meets that weight; the trace called it contamination too, but its report said that no
op discarding values had made the zero, so the NaN was "genuine for gw.grad too" (and advised gw.mark_unused).
References: gw.grad itself (which elements it makes finite where PyTorch's are not), and a control where the NaN is
used (both arguments -inf: logaddexp(-inf, -inf) = -inf depends on both).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gradwise as gw

NINF = float("-inf")


def _log_of_zero(p, q):
    return torch.logaddexp(torch.log(p), torch.log(q)).sum()  # log(0) = -inf: its backward makes 0/0


CASES = {
    # (f, inputs, the discarding op the report names or None for no contamination)
    "logaddexp of a -inf logaddexp": (lambda x, z0, z1: torch.logaddexp(x, torch.logaddexp(z0, z1)).sum(),
                                      ([0.5, 1.0], [NINF, NINF], [NINF, 0.0]), "aten.logaddexp"),
    "logaddexp2 of a -inf logaddexp2": (lambda x, z0, z1: torch.logaddexp2(x, torch.logaddexp2(z0, z1)).sum(),
                                        ([0.5, 1.0], [NINF, NINF], [NINF, 0.0]), "aten.logaddexp2"),
    "logaddexp of log(0)": (_log_of_zero, ([0.5, 0.0], [0.2, 0.3]), "aten.logaddexp"),
    "logsumexp of log(0)": (lambda p: torch.logsumexp(torch.log(p), 0), ([0.5, 0.0, 0.25],), "aten.logsumexp"),
    "logsumexp rows of log(0)": (lambda p: torch.logsumexp(torch.log(p), 1).sum(),
                                 ([[0.5, 0.0], [0.0, 1.0]],), "aten.logsumexp"),
    # an infinite sensitivity (sqrt at 0) meets the weight of a -inf argument: the trace called it a genuine NaN
    # of the input (the saved +inf denominator defeated its rerun), gw.grad removes it
    "sqrt of logaddexp with -inf": (lambda a, b: torch.sqrt(torch.logaddexp(a, b) - 1.0).sum(),
                                    ([NINF, 0.5], [1.0, 2.0]), "aten.logaddexp"),
    "sqrt of logaddexp2 with -inf": (lambda a, b: torch.sqrt(torch.logaddexp2(b, a) - 1.0).sum(),
                                     ([NINF, 0.5], [1.0, 2.0]), "aten.logaddexp2"),
    "sqrt of logsumexp with -inf": (lambda a, b: torch.sqrt(torch.logsumexp(torch.stack([a, b]), 0) - 1.0).sum(),
                                    ([NINF, 0.5], [1.0, 2.0]), "aten.logsumexp"),
    # controls: the -inf is the output's (both arguments -inf), or a NaN argument the output is: genuine for both
    "control: both -inf": (_log_of_zero, ([0.0], [0.0]), None),
    "control: a NaN argument": (_log_of_zero, ([-1.0, 0.5], [0.5, 0.5]), None),  # log(-1): the output is NaN
}


@pytest.mark.parametrize("name", CASES)
def test_trace_names_the_log_space_sum_that_discards_as_gw_grad(name):
    f, values, discarding = CASES[name]
    xs = [torch.tensor(v, requires_grad=True) for v in values]
    plain = torch.autograd.grad(f(*xs), xs)
    strong = gw.grad(f(*xs), xs)
    removed = any(bool((~p.isfinite() & s.isfinite()).any()) for p, s in zip(plain, strong, strict=True))
    with gw.trace() as report:
        f(*xs).backward()
    contamination = [x for x in report.findings if x.kind == "contamination"]
    assert bool(contamination) == removed == (discarding is not None), str(report)
    for finding in contamination:  # the report says gw.grad removes it, and which op discarded the value
        assert "genuine for gw.grad too" not in finding.message, str(report)
        assert finding.discarded_op == discarding and "removes it" in finding.fix, str(report)
    if discarding is None:  # the NaN gw.grad keeps is a genuine finding
        assert any(x.kind == "nan" for x in report.findings), str(report)
        assert not all(bool(s.isfinite().all()) for s in strong)


# --- bilinear grid_sample at pixel lines (gradwise._nonsmooth._rules_grid) ---------------------------------------


def _one_sided(f, xs, ds):
    """float64 one-sided difference quotients with a Richardson step, at two step sizes."""
    with torch.no_grad():
        f0 = f(*xs)
        q = lambda h: (f(*[x + h * d for x, d in zip(xs, ds, strict=True)]) - f0) / h
        return [float(2 * q(h / 2) - q(h)) for h in (1e-5, 1e-6)]


def _pixel(size, k, align):
    """The grid coordinate of pixel k (exact in binary for the sizes below: 5 and 3 columns with align_corners,
    4 without)."""
    return 2 * k / (size - 1) - 1 if align else (2 * k + 1) / size - 1


@pytest.mark.parametrize("align", [True, False])
@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("seed", range(4))
def test_grid_sample_at_a_pixel_line_is_continuous_for_every_image(align, padding, seed):
    """A grid point on a pixel line (x on column 0, y inside a cell): the sampling rounds its four terms otherwise
    than the kernel, so f's value in the direction's pass differed from f(x) by an ulp for some images (1 in 4),
    and gradwise said f jumps (NonsmoothError) where it is continuous. The one-sided derivatives are the cells'."""
    h, w = (3, 5) if align else (4, 4)
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(1, 2, h, w, generator=gen, dtype=torch.float64)
    f = lambda g: F.grid_sample(img, g, padding_mode=padding, align_corners=align).sum()
    for x in (_pixel(w, 0, align), _pixel(w, 2, align), _pixel(w, w - 1, align), -1.0, 1.0):
        grid = torch.tensor([x, 0.2], dtype=torch.float64).view(1, 1, 1, 2)
        for d in ((1.0, 0.0), (-1.0, 0.0), (0.7, -0.4)):
            dg = torch.tensor(d, dtype=torch.float64).view(1, 1, 1, 2)
            ref = _one_sided(f, [grid], [dg])
            got = float(gw.directional_derivative(f, (grid,), (dg,)))
            assert got == pytest.approx(ref[1], abs=1e-7), (x, d, got, ref)


# --- logaddexp's -inf weight rule (_strong_zeros._rules_pointwise._logaddexp_weight_div) -------------------------


@pytest.mark.parametrize("values", [[NINF, 0.5], [0.25, 0.5]])
def test_logaddexp_in_a_non_reentrant_checkpoint(values):
    """The rule read logaddexp's saved inputs again through the node: in a non-reentrant checkpoint that is a
    second unpack, which PyTorch refuses, so gw.grad of any checkpointed logaddexp raised CheckpointError (finite
    data too). It now leaves the quotient as PyTorch's there (the NaN of a -inf argument met by an infinite
    sensitivity stays, as without the rule)."""
    from torch.utils.checkpoint import checkpoint

    f = lambda a, b: torch.sqrt(torch.logaddexp(a, b) - 1.0).sum()
    a = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    got = gw.grad(checkpoint(f, a, b, use_reentrant=False), (a, b))
    want = torch.autograd.grad(f(a, b), (a, b))
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.nan_to_num(7.0), w.nan_to_num(7.0)), (got, want)
