"""Hunt for wrong or missing explanations in the trace (gw.trace, gw.explain, gw.watch), second round: kinks,
singular points and contamination versus genuine NaN on programs whose ground truth is computed with plain torch
(which .grad entries are NaN) or with gw.grad (what strong zeros remove)."""

from __future__ import annotations

import pytest
import torch

import gradwise as gw


def _nonfinite_grads(named) -> set[str]:
    return {name for name, p in named if p.grad is not None and not bool(p.grad.isfinite().all())}


def _padded_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1)
    x = torch.randn(4, 3)
    x[1, 0] = float("nan")  # one NaN row entry
    return lin, x


_EMPTY_SELECTIONS = {
    "empty slice": (lambda h: h[:0], "aten.slice"),
    "all-False mask": (lambda h: h[torch.zeros(4, dtype=torch.bool)], "aten.index"),
    "empty index": (lambda h: h[torch.tensor([], dtype=torch.long)], "aten.index"),
    "narrow to 0": (lambda h: h.narrow(0, 0, 0), "aten.slice"),
}


@pytest.mark.parametrize("block", [gw.trace, gw.watch])
@pytest.mark.parametrize("case", list(_EMPTY_SELECTIONS))
def test_a_sum_over_an_empty_selection_is_contamination_not_silence(case, block):
    """SILENT before: a batch where the mask selects nothing, `lin(x)[mask].sum()` with a NaN in x: the loss is 0,
    every sensitivity is a structural zero and lin.weight.grad is NaN (0 x NaN in the backward of addmm), yet the
    report said "No NaN/Inf gradients". The sensitivity of the empty selection is an empty tensor, which the trace
    did not record as a sensitivity, so the flow below it (slice_backward's zeros, the mm) was lost."""
    select, op = _EMPTY_SELECTIONS[case]
    lin, x = _padded_linear()
    with block() as report:
        select(lin(x)).sum().backward()
    bad = _nonfinite_grads(lin.named_parameters(prefix="lin"))
    assert bad == {"lin.weight"}  # the ground truth
    assert [(f.kind, f.op, f.discarded_op) for f in report.findings] == [("contamination", "aten.mm", op)], \
        str(report)
    assert set(report.findings[0].reaches) == bad
    assert report.findings[0].count == int((~lin.weight.grad.isfinite()).sum())
    lin.zero_grad()
    sz = gw.grad(select(lin(x)).sum(), lin.weight)[0]  # strong zeros remove it: contamination, as reported
    assert bool(sz.isfinite().all())


@pytest.mark.parametrize("clean", [torch.nan_to_num, lambda s: s.clone().nan_to_num_()],
                         ids=["nan_to_num", "nan_to_num_"])
def test_nan_to_num_after_the_op_that_made_the_nan_is_named_as_the_discarding_op(clean):
    """`w.sqrt().nan_to_num()`: the value is cleaned, but sqrt's backward still computes 0 / (2 sqrt(-1)) = NaN.
    nan_to_num's backward zeroes the sensitivity exactly where its input was NaN (gw.grad gives 0 there: the value
    is not used), so it is contamination discarded by nan_to_num. The report called it a zero 'no op that discards
    values made', said 'the NaN is genuine for gw.grad too' and that gw.strong_zeros() would not remove it."""
    w = torch.tensor([1.0, -1.0, 4.0], requires_grad=True)
    with gw.trace() as report:
        clean(w.sqrt()).sum().backward()
    assert w.grad.isnan().tolist() == [False, True, False]  # the ground truth
    assert gw.grad(clean(w.sqrt()).sum(), w)[0].tolist() == [0.5, 0.0, 0.25]  # strong zeros remove it
    assert len(report.findings) == 1, str(report)
    f = report.findings[0]
    assert (f.kind, f.born_op, f.discarded_op, f.count, f.reaches) == (
        "contamination", "aten.sqrt", f"aten.{'nan_to_num_' if clean is not torch.nan_to_num else 'nan_to_num'}",
        1, ["w"])
    assert "genuine for gw.grad" not in f.message and "removes it" in f.fix


_INPLACE_KINKS = {  # in-place op, its out-of-place twin, where its kinks are (of x * 1)
    "clamp_": (lambda t: t.clamp_(0.0, 1.0), lambda t: t.clamp(0.0, 1.0), lambda x: (x == 0) | (x == 1)),
    "abs_": (lambda t: t.abs_(), lambda t: t.abs(), lambda x: x == 0),
    "hardtanh_ (ReLU6(inplace=True))": (torch.nn.ReLU6(inplace=True), torch.nn.ReLU6(), lambda x: (x == 0) | (x == 6)),
    "nn.Hardtanh(inplace=True)": (torch.nn.Hardtanh(inplace=True), torch.nn.Hardtanh(), lambda x: x.abs() == 1),
}


@pytest.mark.parametrize("used", [slice(0, 2), slice(2, 4)], ids=["first half used", "second half used"])
@pytest.mark.parametrize("case", list(_INPLACE_KINKS))
def test_an_in_place_kink_is_reported_as_its_out_of_place_twin(case, used):
    """MobileNet's ReLU6(inplace=True), x.clamp_(0, 1), x.abs_(): autograd numbers the in-place op's node, then
    clones its input (the derivative reads the original), and the trace took the clone for the op that made the
    node: no kink was ever reported for these ops (the out-of-place twins were). Count and 'reached a gradient'
    against plain torch: the kinks sit where the mask says, and a gradient reaches them where the slice reads."""
    inplace, twin, where = _INPLACE_KINKS[case]
    x = torch.tensor([0.0, 0.5, 1.0, 6.0], requires_grad=True)
    kinks = where(x.detach())
    reports = []
    for f in (inplace, twin):
        with gw.trace() as report:
            f(x * 1)[used].sum().backward()
        reports.append(report)
    got = [[(k.kind, k.count, k.reached_gradient) for k in r.findings] for r in reports]
    truth = [("kink", int(kinks.sum()), bool(kinks[used].any()))]
    assert got == [truth, truth], [str(r) for r in reports]
    assert reports[0].findings[0].op.endswith("_")
    assert reports[0].findings[0].location == reports[1].findings[0].location  # the user's line, the same one


_UNUSED_TIES = {  # x, the op, the part of its output the loss reads, whether that part reads a tied value
    "sort: the tied values' positions unread": ([0.0, 0.0, 1.0], lambda x: x.sort().values, slice(2, 3), False),
    "sort: the tied values read": ([0.0, 0.0, 1.0], lambda x: x.sort().values, slice(0, 1), True),
    "max(dim): the tied row sliced away": ([[3.0, 3.0], [1.0, 2.0]], lambda x: x.max(1).values, slice(1, 2), False),
    "max(dim): the tied row read": ([[3.0, 3.0], [1.0, 2.0]], lambda x: x.max(1).values, slice(0, 1), True),
    "amax(dim): the tied row sliced away": ([[3.0, 3.0], [1.0, 2.0]], lambda x: x.amax(1), slice(1, 2), False),
    "min(dim, keepdim): the tied row sliced away": ([[1.0, 2.0], [0.0, 0.0]],
                                                    lambda x: x.min(1, keepdim=True).values, slice(0, 1), False),
    "median(dim): the tied row sliced away": ([[1.0, 1.0, 2.0], [1.0, 2.0, 3.0]], lambda x: x.median(1).values,
                                              slice(1, 2), False),
    "topk: the edge tie unread": ([3.0, 2.0, 2.0, 1.0], lambda x: x.topk(2).values, slice(0, 1), False),
    "topk: the edge tie read": ([3.0, 2.0, 2.0, 1.0], lambda x: x.topk(2).values, slice(1, 2), True),
    "cummax: the tie's outputs unread": ([1.0, 2.0, 2.0, 0.0], lambda x: x.cummax(0).values, slice(0, 2), False),
    "cummax: the tie's outputs read": ([1.0, 2.0, 2.0, 0.0], lambda x: x.cummax(0).values, slice(3, 4), True),
    "vector_norm(dim=1): the zero row sliced away": ([[0.0, 0.0], [1.0, 0.0]],
                                                     lambda x: torch.linalg.vector_norm(x, dim=1), slice(1, 2), False),
    "vector_norm(ord=1, dim=1): a zero element read": ([[0.0, 0.0], [1.0, 0.0]],
                                                       lambda x: torch.linalg.vector_norm(x, 1, dim=1), slice(1, 2),
                                                       True),
}


@pytest.mark.parametrize("case", list(_UNUSED_TIES))
def test_a_tie_whose_outputs_no_gradient_reads_did_not_reach_a_gradient(case):
    """'reached a gradient' says whether PyTorch's convention at the kink mattered. For ops whose kink mask sits
    in the input (sort, max/amax/median over a dim, topk, cummax) any nonzero sensitivity anywhere in the output
    counted, so a tie in a row the loss slices away (or sorted positions it never reads) said 'yes'."""
    x0, f, used, reads_tie = _UNUSED_TIES[case]
    x = torch.tensor(x0, requires_grad=True)
    with gw.trace() as report:
        f(x * 1)[used].sum().backward()
    assert len(report.findings) == 1 and report.findings[0].kind in ("kink", "singular"), str(report)
    assert report.findings[0].reached_gradient is reads_tie, str(report)


def _adaptive_ties_by_loops(x: torch.Tensor, out_size: tuple) -> int:
    """Reference: the windows (ATen's [floor(i L / O), ceil((i + 1) L / O)) per dim) whose maximum more than one
    element of the window attains, counted by Python loops over every window."""
    import itertools
    import math

    spatial = len(out_size)
    planes = x.reshape(-1, *x.shape[-spatial:])
    ranges = [[(i * n // o, math.ceil((i + 1) * n / o)) for i in range(o)]
              for n, o in zip(x.shape[-spatial:], out_size, strict=True)]
    tied = 0
    for plane in planes:
        for window in itertools.product(*ranges):
            w = plane[tuple(slice(a, b) for a, b in window)]
            tied += int((w == w.max()).sum() > 1)
    return tied


_ADAPTIVE = {  # input shape, output size, the pooling function
    "global 2d (AdaptiveMaxPool2d(1))": ((2, 3, 4, 4), (1, 1), torch.nn.functional.adaptive_max_pool2d),
    "2d, overlapping windows": ((1, 2, 5, 7), (3, 4), torch.nn.functional.adaptive_max_pool2d),
    "2d, no batch dim": ((2, 6, 5), (4, 2), torch.nn.functional.adaptive_max_pool2d),
    "1d": ((2, 3, 9), (4,), torch.nn.functional.adaptive_max_pool1d),
    "3d": ((1, 2, 3, 4, 5), (2, 3, 2), torch.nn.functional.adaptive_max_pool3d),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", list(_ADAPTIVE))
def test_adaptive_max_pool_ties_are_reported_window_by_window(case, seed):
    """AdaptiveMaxPool2d(1) after a ReLU (a global max-pool over a dead channel: all zeros) ties on every step,
    yet the trace reported no kink for adaptive max-pool at all (its fact was a coarse superset, which the trace
    skips). The windows with tied maxima are counted now, against loops over every window."""
    shape, out_size, pool = _ADAPTIVE[case]
    torch.manual_seed(seed)
    x = torch.randint(0, 4, shape).float().relu().requires_grad_(True)  # few values: ties in many windows
    truth = _adaptive_ties_by_loops(x.detach(), out_size)
    assert truth > 0
    with gw.trace() as report:
        pool(x * 1, out_size).sum().backward()
    assert [(f.kind, f.count, f.reached_gradient) for f in report.findings] == [("kink", truth, True)], str(report)
    distinct = torch.randperm(x.numel()).float().view(shape).requires_grad_(True)  # no tie anywhere
    with gw.trace() as report:
        pool(distinct * 1, out_size).sum().backward()
    assert report.findings == [], str(report)


def _multi_margin_terms_at_zero(x, y, margin=1.0):
    """Reference by loops: the (sample, class i != y) terms margin - x[y] + x[i] that are exactly 0."""
    return sum(int(margin - x[n, y[n]] + x[n, i] == 0) for n in range(x.shape[0]) for i in range(x.shape[1])
               if i != y[n])


def _multilabel_classes_at_zero(x, y):
    """Reference by loops: the (sample, non-target class i) with 1 - x[j] + x[i] = 0 for a listed target j."""
    hits = 0
    for n in range(x.shape[0]):
        listed = []
        for t in y[n].tolist():
            if t < 0:
                break
            listed.append(t)
        hits += sum(int(any(1 - x[n, j] + x[n, i] == 0 for j in listed)) for i in range(x.shape[1])
                    if i not in listed)
    return hits


_F = torch.nn.functional
_LOSS_KINKS = {  # x, the loss of x, the reference count of elements at the kink, the op reported
    "multi_margin_loss": ([[1.0, 0.0, -0.5], [0.2, 0.3, 0.4], [2.0, 1.0, 1.0]],
                          lambda x: _F.multi_margin_loss(x, torch.tensor([0, 2, 0])),
                          lambda x: _multi_margin_terms_at_zero(x, [0, 2, 0]), "aten.multi_margin_loss"),
    "multilabel_margin_loss": ([[1.0, 0.0, -0.5, 3.0], [0.5, 0.5, 1.5, -0.5]],
                               lambda x: _F.multilabel_margin_loss(x, torch.tensor([[0, -1, 1, 1], [2, 3, -1, 0]])),
                               lambda x: _multilabel_classes_at_zero(x, torch.tensor([[0, -1, 1, 1], [2, 3, -1, 0]])),
                               "aten.multilabel_margin_loss_forward"),
    "hinge_embedding_loss (clamp_min_ in place)": (
        [1.0, 2.0, 0.5], lambda x: _F.hinge_embedding_loss(x, torch.tensor([-1.0, -1.0, -1.0])),
        lambda x: int((1.0 - x == 0).sum()), "aten.clamp_min_"),
}


@pytest.mark.parametrize("case", list(_LOSS_KINKS))
def test_a_margin_loss_exactly_at_its_margin_is_a_kink(case):
    """multi_margin_loss / multilabel_margin_loss (native ops) had no kink fact and hinge_embedding_loss's hinge is
    an in-place clamp_min_ (the in-place node fix): a sample exactly at the margin was no kink in the report."""
    x0, loss, reference, op = _LOSS_KINKS[case]
    x = torch.tensor(x0, requires_grad=True)
    truth = reference(x.detach())
    assert truth > 0
    with gw.trace() as report:
        loss(x).backward()
    assert [(f.kind, f.op, f.count) for f in report.findings] == [("kink", op, truth)], str(report)
    torch.manual_seed(0)
    with gw.trace() as report:  # moved off the margin: no kink
        loss((x.detach() + torch.rand(x.shape) * 1e-3 + 1e-4).requires_grad_()).backward()
    assert report.findings == [], str(report)


def test_multi_margin_loss_with_p_2_is_no_kink_at_its_margin():
    """max(0, z)^2 has slope 0 on both sides of z = 0: no kink (the fact says so, not only the count)."""
    x = torch.tensor([[1.0, 0.0, -0.5]], requires_grad=True)
    with gw.trace() as report:
        _F.multi_margin_loss(x, torch.tensor([0]), p=2).backward()
    assert report.findings == [], str(report)


_POINTS = [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 2.0]]  # rows 0 and 1 coincide; rows 2, 3 share a coordinate


def _pairs_by_loops(rows, p: float, pairs) -> int:
    """Reference: pairs at a kink of ||a - b||_p, by loops: coincident rows; for p = 1 also an equal coordinate."""
    hit = 0
    for i, j in pairs:
        d = [a - b for a, b in zip(rows[i], rows[j], strict=True)]
        hit += int(all(v == 0 for v in d) or (p == 1 and any(v == 0 for v in d)))
    return hit


@pytest.mark.parametrize("p", [2.0, 1.0])
@pytest.mark.parametrize("op", ["cdist", "pdist"])
def test_distances_at_coincident_points_are_reported(op, p):
    """cdist / pdist of coincident points (a norm at 0: PyTorch's backward uses 0 there) reported nothing, though
    torch.linalg.vector_norm at 0 is a singular point in the report; for p = 1 an equal coordinate is a kink."""
    x = torch.tensor(_POINTS, requires_grad=True)
    n = len(_POINTS)
    with gw.trace() as report:
        (torch.cdist(x, x, p=p) if op == "cdist" else torch.pdist(x, p=p)).sum().backward()
    pairs = [(i, j) for i in range(n) for j in range(n)] if op == "cdist" else \
        [(i, j) for i in range(n) for j in range(i + 1, n)]
    kind = "singular" if p == 2 else "kink"
    assert [(f.kind, f.count) for f in report.findings] == [(kind, _pairs_by_loops(_POINTS, p, pairs))], \
        str(report)
    with gw.trace() as report:  # apart: nothing
        y = (x.detach() + torch.arange(2 * n, dtype=torch.float32).view(n, 2) / 7).requires_grad_()
        torch.cdist(y, y.detach() + 0.5, p=p).sum().backward()
    assert report.findings == [], str(report)


@pytest.mark.parametrize("impl", [{"foreach": False}, {"foreach": True}, {"fused": True}],
                         ids=["for-loop", "foreach", "fused"])
def test_adam_with_eps_0_divides_0_by_0_and_the_report_says_so(impl):
    """Adam(eps=0) on a parameter whose gradient is always 0 (an input column of zeros): the update divides
    0 / (sqrt(0) + 0) and writes NaN into it; the next forward's loss is NaN. The report said 'aten.addcdiv_ made
    NaN/Inf from finite inputs' with the fix 'find why the value is not finite where it is used'."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(lin.parameters(), lr=0.1, eps=0.0, **impl)
    x = torch.ones(4, 3)
    x[:, 2] = 0.0
    with gw.trace() as report:
        for _ in range(2):
            opt.zero_grad()
            loss = lin(x).sum()
            loss.backward()
            opt.step()
    assert lin.weight.isnan().tolist() == [[False, False, True]] and loss.isnan()  # the ground truth
    births = [f for f in report.findings if f.kind == "nan"]
    assert len(births) == 1 and births[0].count == 1, str(report)
    assert "division by zero" in births[0].born and "eps > 0" in births[0].fix, str(report)


def test_functional_call_parameters_are_named_by_the_dict_that_holds_them():
    """torch.func.functional_call(lin, params, x) with params a dict of plain tensors (a meta-learning inner loop):
    the NaN gradient is params['weight'].grad, and lin.weight.grad stays None. The report said it reaches
    'lin.weight' (the module held params['weight'] while the forward ran)."""
    from torch.func import functional_call

    lin, x = _padded_linear()
    params = {k: v.detach().clone().requires_grad_() for k, v in lin.named_parameters()}
    with gw.trace() as report:
        functional_call(lin, params, (x,))[2:].sum().backward()  # row 1 (the NaN) sliced away
    assert lin.weight.grad is None and _nonfinite_grads(params.items()) == {"weight"}  # the ground truth
    assert [(f.kind, f.reaches) for f in report.findings] == [("contamination", ["params['weight']"])], str(report)
    with gw.trace() as report:  # the module's own parameters passed in: named as the module's
        functional_call(lin, dict(lin.named_parameters()), (x,))[2:].sum().backward()
    assert [(f.kind, f.reaches) for f in report.findings] == [("contamination", ["lin.weight"])], str(report)


_AFTER_BACKWARD = {
    "assigned": lambda lin: setattr(lin.weight, "grad", torch.full_like(lin.weight, float("nan"))),
    "written in place": lambda lin: lin.weight.grad.__setitem__((0, 0), float("nan")),
}


@pytest.mark.parametrize("case", list(_AFTER_BACKWARD))
def test_a_gradient_made_nan_after_backward_by_the_program_is_not_silent(case):
    """SILENT before: `lin.weight.grad = torch.full_like(..., nan)` (or an in-place write into .grad) after the
    backward, in the block: the report said 'No NaN/Inf gradients' although lin.weight.grad is NaN at the end.
    A non-finite .grad that no finding reaches is now a finding, with the birth of its NaN where the trace knows
    it (else 'not observed'), never nothing."""
    lin = torch.nn.Linear(3, 1)
    with gw.trace() as report:
        lin(torch.ones(2, 3)).sum().backward()
        with torch.no_grad():
            _AFTER_BACKWARD[case](lin)
    bad = _nonfinite_grads(lin.named_parameters(prefix="lin"))
    assert bad == {"lin.weight"}  # the ground truth
    assert [(f.kind, f.reaches, f.count) for f in report.findings] == [
        ("nan", ["lin.weight"], int(lin.weight.grad.isnan().sum()))], str(report)
    line = report.findings[0].location.rsplit(":", 1)[1]
    assert report.findings[0].source.strip().startswith(f'"{case}"') and line.isdigit(), str(report)


class _NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


_NUMBERS = {  # the program, the op the NaN/Inf is born at
    "x * float('nan')": (lambda x: x * float("nan"), "aten.mul"),
    "x + math.inf": (lambda x: x + float("inf"), "aten.add"),
    "clamp(x, max=nan)": (lambda x: x.clamp(max=float("nan")), "aten.clamp"),
    "hardtanh(x, max_val=nan)": (lambda x: torch.nn.functional.hardtanh(x, 0.0, float("nan")), "aten.hardtanh"),
    "a custom backward's g * nan": (_NanGradient.apply, "aten.mul"),
}


@pytest.mark.parametrize("case", list(_NUMBERS))
def test_a_nan_or_inf_python_number_is_named_as_the_cause(case):
    """A NaN/Inf Python float passed to an op: `x * float('nan')` was explained as 'overflow: the result exceeds the
    largest float32' (mul and add are overflow ops) with the overflow's fix; `clamp(x, max=nan)` (a
    finite-preserving op, so unchecked) as 'tensor[3] arrived with 3 NaN value(s)', data that never arrived; a
    custom backward's `g * float('nan')` as 'an infinite derivative used'."""
    f, op = _NUMBERS[case]
    x = torch.ones(3, requires_grad=True)
    with gw.trace() as report:
        loss = f(x).sum()
        loss.backward()
    assert not (loss.isfinite() and x.grad.isfinite().all())  # the ground truth: the loss or the gradient
    assert len(report.findings) == 1, str(report)
    found = report.findings[0]
    assert found.born_op == op and "NaN/Inf number" in found.born and "overflow" not in found.born, str(report)
    assert "float('nan')" in found.fix and found.reaches == ([] if x.grad.isfinite().all() else ["x"]), str(report)


_CONSTANTS = {  # a NaN written on purpose, then used: the constant's birth and fix, not "a NaN/Inf number"
    "torch.full": lambda x: x * torch.full((3,), float("nan")),
    "x[1] = nan": lambda x: (x * 1).index_fill(0, torch.tensor([1]), float("nan")),
    "masked_fill": lambda x: x.masked_fill(torch.tensor([False, True, False]), float("nan")),
    "where(c, x, nan)": lambda x: torch.where(torch.tensor([True, False, True]), x, float("nan")),
    "F.pad(value=nan)": lambda x: torch.nn.functional.pad(x, (0, 1), value=float("nan")),
}


@pytest.mark.parametrize("case", list(_CONSTANTS))
def test_a_nan_constant_written_into_a_tensor_stays_a_constant_written(case):
    """The NaN/Inf-number explanation is for arithmetic given a NaN (x * nan): ops that write constants keep
    'a NaN/Inf constant written into the tensor' and its fix (torch.where's scalar, lifted by aten.scalar_tensor,
    had the generic fix 'find why the value is not finite where it is used')."""
    x = torch.ones(3, requires_grad=True)
    with gw.trace() as report:
        loss = _CONSTANTS[case](x).sum()
        loss.backward()
    assert loss.isnan()  # the ground truth
    assert len(report.findings) == 1, str(report)
    found = report.findings[0]
    assert "constant written" in found.born and "NaN/Inf number" not in found.born, str(report)
    assert "constant written here" in found.fix, str(report)



def test_a_kink_finding_names_the_leaves_its_convention_reached():
    """A kink's ``reaches`` (the api's 'leaf tensors / parameters whose gradients it reached') lists the leaves below
    it once a nonzero sensitivity went through it, as a NaN finding's does; none where none went through (it was
    [] always)."""
    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    x = torch.tensor([[1.0, -1.0, 0.0]], requires_grad=True)
    other = torch.tensor([2.0], requires_grad=True)
    with gw.trace() as report:
        (torch.relu(lin(x)).sum() + other.abs().sum()).backward()
    kinks = [f for f in report.findings if f.kind == "kink"]
    assert [(f.op, f.reaches) for f in kinks] == [("aten.relu", ["lin.bias", "lin.weight", "x"])]
    with gw.trace() as report:  # the tie sits where the loss reads nothing: no gradient went through it
        torch.relu(lin(x))[:, :0].sum().backward()
    assert [(f.reached_gradient, f.reaches) for f in report.findings if f.kind == "kink"] == [(False, [])]
