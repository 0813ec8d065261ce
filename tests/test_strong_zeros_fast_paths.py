"""The strong-zero fast paths (issue #15) give what the slow paths give, on inputs made to hit the skipped work:
a NaN exactly where a shortcut skips a check, a mask written after its broadcast form was kept, a genuine NaN.

- the everyday backward (plain dense tensors) skips ``plain_reason`` and ``traced``: the plans are the same;
- ``all_finite`` sums the large tensors before copying the small ones together: the same answer;
- the plan reads only the reached nodes that have something to read, test or hide: the same plans;
- ``_kept_bits`` hands the multiply a broadcast mask with size-1 dims: the same bits as ``torch.where``;
- ``_Supports.of(t, broadcast=True)`` hands out a support recorded from a broadcast (mm's rows) as that broadcast
  while its mask is unwritten: the same values as the mask, and the mask's after any write.

References are independent: plain PyTorch on the same program without the unused values (float64), torch.where,
the exact elementwise test.
"""

from __future__ import annotations

import itertools
import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradwise as gw
from gradwise import _masks
from gradwise._strong_zeros import _contract, _engine, _planning
from gradwise._strong_zeros._rules import _kept_bits
from gradwise._strong_zeros._supports import _Supports

nan, inf = float("nan"), float("inf")
f64 = torch.float64


# -- the everyday backward -----------------------------------------------------------------------------------------

def _graphs():
    """Losses whose plans differ: NaN where structural zeros reach it (strong), where they do not (plain), a
    select/slice reading everything, an unused split output, meta tensors (plain, silently)."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 4).double()
    x = torch.randn(6, 4, dtype=f64)
    x_nan = x.clone()
    x_nan[5] = nan
    out = {}
    for data, tag in ((x, "finite"), (x_nan, "NaN row 5")):
        h = lin(data)
        out[f"rows 0..4, {tag}"] = lambda h=h: h[:5].square().sum()
        out[f"all rows, {tag}"] = lambda h=h: h[:6].square().sum()
        out[f"relu, {tag}"] = lambda h=h: torch.relu(h).sum()
        out[f"split, last unused, {tag}"] = lambda h=h: h.split([5, 1])[0].square().sum()
    m = torch.randn(3, 3, device="meta", requires_grad=True)
    out["meta"] = lambda: (m * 2)[:2].sum()
    return out


@pytest.mark.parametrize("name", list(_graphs()))
def test_everyday_plan_equals_the_checked_plan(name, monkeypatch):
    """The plan chosen with the everyday test equals the one chosen through plain_reason and traced."""
    loss = _graphs()[name]()
    fast = _engine._choose([loss], (), ())
    monkeypatch.setattr(_engine, "_everyday", lambda *groups: False)
    assert _engine._choose([loss], (), ()) == fast


def test_everyday_backward_skips_the_slow_checks(monkeypatch):
    """A backward of plain dense tensors (a NaN that strong zeros remove included) asks neither plain_reason nor
    traced, and its gradient is still the program's without the NaN row."""
    calls = []
    plain_reason, traced = _contract.plain_reason, _planning.traced
    monkeypatch.setattr(_contract, "plain_reason", lambda *a: calls.append("plain_reason") or plain_reason(*a))
    monkeypatch.setattr(_planning, "traced", lambda *a: calls.append("traced") or traced(*a))
    x = torch.tensor([[1.0, 2.0], [nan, nan]], dtype=f64)
    w = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=f64, requires_grad=True)
    gw.backward((x @ w)[:1].square().sum())
    assert calls == []
    ref = w.detach().clone().requires_grad_()
    (x[:1] @ ref).square().sum().backward()
    assert torch.equal(w.grad, ref.grad)


@pytest.mark.parametrize("nan_row", [None, 5])
def test_gw_backward_of_a_scalar_loss_skips_the_argument_checks(nan_row, monkeypatch):
    """gw.backward(loss), a plain scalar that requires grad: the argument checks, which would find nothing, are
    not run; the gradient is PyTorch's bit for bit on finite data, and the program's without the NaN row (one a
    structural zero meets) otherwise."""
    calls = []
    for name in ("as_tensors", "check_differentiable", "check_scalar_or_seeded"):
        real = getattr(_engine, name)
        monkeypatch.setattr(_engine, name, lambda *a, real=real: calls.append(1) or real(*a))
    torch.manual_seed(3)
    x = torch.randn(6, 4, dtype=f64)
    if nan_row is not None:
        x[nan_row] = nan
    w = torch.randn(4, 3, dtype=f64, requires_grad=True)
    gw.backward(torch.relu(x @ w)[:5].square().sum())
    assert calls == []
    ref = w.detach().clone().requires_grad_()
    torch.relu(x[:5] @ ref).square().sum().backward()
    assert torch.equal(w.grad, ref.grad)


@pytest.mark.parametrize("loss, error", [
    (lambda w: (w * 2).sum(1), "grad can be implicitly created only for scalar outputs"),
    (lambda w: w.detach().sum(), "does not require grad"),
    (lambda w: (w * 2).sum().long(), "only floating-point tensors have gradients"),
])
def test_gw_backward_off_the_scalar_path_still_names_the_problem(loss, error):
    """A loss the scalar path does not take (not a scalar, not requiring grad, an integer dtype) gets gradwise's
    own message, as before."""
    w = torch.randn(3, 2, requires_grad=True)
    with pytest.raises(RuntimeError, match=error):
        gw.backward(loss(w))


# -- all_finite --------------------------------------------------------------------------------------------------

def _tensor_sets():
    big = torch.randn(5000)
    small = [torch.randn(7) for _ in range(6)]
    sets = {"finite": [big, *small]}
    for where, value in itertools.product(("big", "small 0", "small 5"), (nan, inf, -inf)):
        ts = [big.clone(), *(s.clone() for s in small)]
        target = ts[0] if where == "big" else ts[1 + int(where.split()[1])]
        target[3] = value
        sets[f"{value} in {where}"] = ts
    sets["nan in the second big"] = [big, big.clone().index_fill_(0, torch.tensor([4999]), nan), *small]
    sets["few small, nan"] = [small[0], small[1].clone().fill_(nan)]
    sets["complex nan imag"] = [big, *small, torch.tensor([1 + 1j, complex(0, nan)])]
    sets["few, complex nan imag"] = [small[0], torch.tensor([1 + 1j, complex(0, nan)])]
    sets["few, conjugated complex inf real"] = [torch.tensor([complex(inf, 1), 2j]).conj()]
    sets["few, conjugated complex finite"] = [small[1], torch.tensor([complex(3, 1), 2j]).conj()]
    return sets


@pytest.mark.parametrize("name", list(_tensor_sets()))
def test_all_finite_is_the_exact_test(name):
    ts = _tensor_sets()[name]
    assert _masks.all_finite(ts) == all(bool(torch.isfinite(t).all()) for t in ts)


def test_all_finite_answers_a_large_nan_before_copying_the_small_ones(monkeypatch):
    """With many small tensors (norm statistics) and a NaN in a large one (a batch's padding), the answer comes
    before the small ones are concatenated."""
    cats = []
    cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: cats.append(1) or cat(*a, **k))
    big = torch.randn(5000)
    big[10] = nan
    assert not _masks.all_finite([big, *(torch.randn(7) for _ in range(6))])
    assert cats == []


# -- the plan's reads ----------------------------------------------------------------------------------------------

def test_the_plan_lists_only_nodes_with_something_to_read(monkeypatch):
    """Reached nodes with no saved tensor to read, no singular test and nothing hidden (views, AccumulateGrad)
    are left out of the plan's reads; the plan is the one a fresh cache gives, NaN or not."""
    monkeypatch.setattr(_planning, "_SHAPED", {})
    lin1, lin2 = nn.Linear(4, 8).double(), nn.Linear(8, 3).double()
    for row in (None, 5):
        x = torch.randn(6, 4, dtype=f64)
        if row is not None:
            x[row] = nan
        loss = lin2(torch.relu(lin1(x)))[:5].square().sum()
        assert _planning._plan([loss], ()) == ("plain" if row is None else "strong")
    (shaped,) = _planning._SHAPED.values()
    types = _planning._NODE_TYPES
    order = list(_planning._walked([loss.grad_fn]).nodes)
    assert shaped.reads
    for i, read, singular, hides in shaped.reads:
        assert read or singular is not None or hides, types[type(order[i])]


def test_a_saved_view_does_not_hide_its_base():
    """Two saved tensors at one data pointer, a view of the first rows and the whole: the plan compares them
    only where pointers meet, and the whole is still read, with the NaN in its last row that a structural zero
    meets (plain PyTorch would give w2 a NaN gradient)."""
    torch.manual_seed(6)
    x = torch.randn(6, 4, dtype=f64)
    x[5] = nan
    w1, w2 = (torch.randn(4, dtype=f64, requires_grad=True) for _ in range(2))
    h = x * 1.0
    loss = (h * w2)[:4].sum() + (h[:3] * w1)[:2].sum()  # (the plan's walk meets the view first)
    assert _planning._plan([loss], ()) == "strong"
    gw.backward(loss)
    ref1, ref2 = (w.detach().clone().requires_grad_() for w in (w1, w2))
    ((x[:4] * ref2).sum() + (x[:3] * ref1)[:2].sum()).backward()
    assert torch.equal(w1.grad, ref1.grad) and torch.equal(w2.grad, ref2.grad)


def test_a_saved_parameter_is_read_as_a_plain_tensor(monkeypatch):
    """A weight saved as it is (a Parameter: mul's other) is read like a plain tensor, without the kind check that
    other classes need; its Inf, where relu's structural zero meets it in x's gradient, still takes the strong path,
    and x's gradient there is relu's flat 0 (PyTorch gives 0 x inf = NaN), the others PyTorch's."""
    checked = []
    real = _contract.check_saved
    monkeypatch.setattr(_contract, "check_saved", lambda t: checked.append(t) or real(t))
    p = nn.Parameter(torch.tensor([[inf, 2.0], [0.5, -1.0]], dtype=f64))
    x = torch.tensor([[-1.0, 3.0], [2.0, 1.5]], dtype=f64, requires_grad=True)
    loss = torch.relu(x * p).sum()
    assert _planning._plan([loss], ()) == "strong"
    assert checked == []
    gw.backward(loss)
    ref = x.detach().clone().requires_grad_()
    torch.relu(ref * p).sum().backward()
    assert ref.grad[0, 0].isnan() and x.grad[0, 0] == 0
    assert torch.equal(x.grad.flatten()[1:], ref.grad.flatten()[1:])


_PICKS = [  # (shape, take, dim, the positions along dim it reads): negative dims and indices, steps, empty, clamped
    ((3, 4, 5), lambda t: t.select(-1, -2), 2, [3]),
    ((3, 4, 5), lambda t: t.select(0, 2), 0, [2]),
    ((3, 4, 5), lambda t: t.select(-3, -3), 0, [0]),
    ((3, 4, 5), lambda t: t[..., -3:-1], 2, [2, 3]),
    ((3, 4, 5), lambda t: t[:, ::2], 1, [0, 2]),
    ((3, 4, 5), lambda t: t[1:], 0, [1, 2]),
    ((3, 4, 5), lambda t: t[:, -100:2], 1, [0, 1]),
    ((3, 4, 5), lambda t: t[..., 1:1000:3], 2, [1, 4]),
    ((6,), lambda t: t[-6:], 0, list(range(6))),
]


@pytest.mark.parametrize("case", range(len(_PICKS)))
def test_the_positions_a_select_or_slice_reads(case):
    """What the walk reads from a select/slice node (its dim, size and positions) is what the forward took: the
    positions are found independently by taking the same select/slice of arange along that dim."""
    shape, take, dim, want = _PICKS[case]
    x = torch.zeros(shape, dtype=f64, requires_grad=True)
    node = take(x * 1.0).grad_fn
    assert type(node).__name__ in ("SelectBackward0", "SliceBackward0")
    pick = _planning._node_type(node)[7](node)
    view = [1] * len(shape)
    view[dim] = shape[dim]
    index = torch.arange(shape[dim]).reshape(view).expand(shape)
    assert pick[:2] == (dim, shape[dim]) and list(pick[2]) == want
    assert sorted(set(take(index).flatten().tolist())) == want


def test_the_walk_works_out_makers_only_for_a_shape_not_planned_before(monkeypatch):
    """A graph met again is planned from its walk alone: the makers, picks and splits (_derived) are worked out
    once per shape, and the plan of the second graph still reads its values (a NaN row there takes the strong
    path)."""
    monkeypatch.setattr(_planning, "_SHAPED", {})
    derived = []
    real = _planning._derived
    monkeypatch.setattr(_planning, "_derived", lambda w: derived.append(1) or real(w))
    lin = nn.Linear(4, 4).double()
    plans = []
    for row in (None, 2, None):
        x = torch.randn(5, 4, dtype=f64)
        if row is not None:
            x[row] = nan
        h = torch.relu(lin(x))
        plans.append(_planning._plan([(h[:3].square().sum() + h.split([4, 1])[0].sum())], ()))
    assert plans == ["plain", "strong", "plain"]
    assert derived == [1]


# -- the masked multiply -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(10, 6, 8), (4, 1, 5), (3, 7), (2, 3, 4, 5), (300, 1000)])
def test_kept_bits_with_a_broadcast_mask_is_where(shape):
    """Every broadcast of the mask (size-1 dims, stride-0 views), NaN, Inf and -0.0 in the kept and dropped
    elements alike: the bits of torch.where(keep, src, +0.0)."""
    torch.manual_seed(1)
    for dims in itertools.product(*[(1, n) for n in shape]):
        keep = torch.rand(dims) > 0.5
        for form in (keep, keep.expand(shape)):
            src = torch.randn(shape)
            for value, p in ((nan, 0.1), (-inf, 0.05), (-0.0, 0.2)):
                src[torch.rand(shape) < p] = value
            expected = torch.where(form, src, torch.zeros(()))
            out = torch.empty_like(src)
            assert _kept_bits(src, form, out)
            assert torch.equal(out.view(torch.int32), expected.view(torch.int32))
            assert _kept_bits(src, form, src)  # in place, as _annihilate runs it
            assert torch.equal(src.view(torch.int32), expected.view(torch.int32))


def test_kept_bits_multiplies_by_the_small_mask(monkeypatch):
    """A stride-0 mask reaches the multiply with its broadcast dims of size 1 (which it runs several times faster)."""
    strides = []
    mul = torch.mul
    monkeypatch.setattr(torch, "mul", lambda a, b, **k: strides.append(list(zip(b.shape, b.stride(), strict=True)))
                        or mul(a, b, **k))
    src = torch.randn(4, 6, 8)
    assert _kept_bits(src, (torch.rand(4, 6, 1) > 0.5).expand(4, 6, 8), src)
    assert strides and all(n == 1 for dims in strides for n, st in dims if st == 0)


# -- broadcast supports ------------------------------------------------------------------------------------------

def _recorded(shape=(6, 5), rows=(4, 5)):
    """A fresh output recorded with a row support (mm's): the rows in ``rows`` structural."""
    sup = _Supports()
    t = torch.randn(shape)
    row = torch.ones(shape[0], *(1,) * (len(shape) - 1), dtype=torch.bool)
    row[list(rows)] = False
    sup.record(t, row.expand(shape))
    return sup, t, row


def test_a_broadcast_support_reads_as_the_mask():
    """The tensor itself, a reshape of it and its transpose: the broadcast form has the mask's values (and is a
    stride-0 view where a broadcast is kept)."""
    sup, t, _ = _recorded((4, 3, 5), rows=(1, 3))
    for view in (t, t.view(12, 5), t.view(4, 15), t.transpose(-1, -2), t.view(2, 2, 3, 5)):
        narrow, whole = sup.of(view, broadcast=True), sup.of(view)
        assert torch.equal(narrow, whole)
        assert narrow.shape == view.shape
    assert 0 in sup.of(t, broadcast=True).stride()
    # a view that reads part of the storage (or another layout) reads the mask
    part = t[1:]
    assert torch.equal(sup.of(part, broadcast=True), sup.of(part))


@pytest.mark.parametrize("write", ["record a part", "fully supported part", "record the whole", "through a view"])
@pytest.mark.parametrize("in_mode", [False, True])
def test_a_written_mask_is_read_after_the_write(write, in_mode):
    """Once a record writes the mask, the broadcast form it was recorded from is stale: the mask is read. Also
    inside a dispatch mode's handler, where rules run and version counters do not count writes."""
    sup, t, _ = _recorded()

    def write_it():
        if write == "record a part":
            sup.record(t[5], torch.ones(5, dtype=torch.bool))  # row 5 becomes supported
        elif write == "fully supported part":
            sup.record(t[4:], None)
        elif write == "record the whole":
            sup.record(t, torch.zeros(6, 5, dtype=torch.bool))
        else:  # (an in-place op's rule) through a view of the same storage
            sup.record(t.view(30)[:5], torch.zeros(5, dtype=torch.bool))

    if in_mode:
        class Handler(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten.neg.default:
                    write_it()
                return func(*args, **(kwargs or {}))

        with Handler():
            torch.ones(1).neg()
    else:
        write_it()
    assert torch.equal(sup.of(t, broadcast=True), sup.of(t))
    before, u, _ = _recorded()
    assert not torch.equal(sup.of(t), before.of(u))  # (the write changed the support)


def test_a_shared_broadcast_support_survives_a_write_to_the_other():
    """Two outputs sharing one mask (an elementwise op's, `like`): a write to one copies the mask first, so the
    other's broadcast form stays right and the written one reads its own."""
    sup, g, _ = _recorded()
    out = g * 2
    sup.record(out, sup.of(g), like=g)
    assert torch.equal(sup.of(out, broadcast=True), sup.of(g))
    sup.record(out[4], torch.ones(5, dtype=torch.bool))
    assert torch.equal(sup.of(g, broadcast=True), sup.of(g))
    assert bool(sup.of(out, broadcast=True)[4].all()) and not bool(sup.of(g, broadcast=True)[4].any())



def _raised_inside_gradwise(fn) -> list:
    """The errors raised inside gradwise while ``fn`` runs, caught or not (sys.settrace 'exception' events)."""
    raised = []

    def tracer(frame, event, arg):
        if event == "exception" and "gradwise" in frame.f_code.co_filename and \
                arg[0] not in (GeneratorExit, StopIteration):
            raised.append((frame.f_code.co_name, arg[0].__name__, str(arg[1])[:80]))
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return raised


def test_a_support_broadcast_over_a_middle_dim_read_reshaped_raises_no_error():
    """A padding mask broadcast over a middle dim ((B, 1, N) over (B, T, N)) whose gradient a product rule reads
    as (B*T, N): no view of the broadcast has that shape, and asking view raised a C++ error (~30 us, its
    backtrace) twice a backward. The shape is tested first; the mask is read, the gradient is the same."""
    B, T, N = 2, 4, 3
    unused = torch.zeros(B, 1, N, dtype=torch.bool)
    unused[0, 0, 1] = unused[1, 0, 2] = True
    z0 = torch.rand(B * T, N, dtype=torch.float64) + 0.1
    z = z0.clone()
    z.view(B, T, N).masked_fill_(unused, -1.0)  # sqrt's NaN where the output never reads
    z.requires_grad_()

    def step():
        z.grad = None
        z.sqrt().tanh().view(B, T, N).masked_fill(unused, 0.0).sum().backward()

    with gw.strong_zeros():
        step()
        step()
        raised = _raised_inside_gradwise(step)
    assert not raised, raised
    ref = z0.clone().requires_grad_()  # the same program without the unused values
    ref.sqrt().tanh().view(B, T, N).masked_fill(unused, 0.0).sum().backward()
    assert torch.equal(z.grad, ref.grad)


def test_the_broadcast_form_is_offered_exactly_where_view_succeeds():
    """The broadcast form of a middle-dim support (stride-0 dims between others) read through every reshape:
    the mask's values, and a stride-0 view exactly where view has one (the reference: asking view)."""
    sup = _Supports()
    t = torch.randn(2, 4, 3)
    small = torch.tensor([[[True, False, True]], [[False, True, True]]])
    sup.record(t, small.expand(2, 4, 3))
    wide = small.expand(2, 4, 3)
    for shape in ((24,), (8, 3), (2, 12), (2, 4, 3), (2, 2, 2, 3), (4, 2, 3), (6, 4), (2, 4, 3, 1), (1, 8, 3)):
        view = t.view(shape)
        try:
            wide.view(shape)
            viewable = True
        except RuntimeError:
            viewable = False
        narrow = sup.of(view, broadcast=True)
        assert torch.equal(narrow, sup.of(view)), shape
        assert (0 in narrow.stride()) == viewable, shape


def _mlp_program(x, w1, w2, w3):
    """A batch's rows through three bias-free layers (mm's row supports meet SiLU, a product, a residual)."""
    h = x @ w1
    a = torch.nn.functional.silu(h)
    y = (a * a.sigmoid()) @ w2 + h
    return (y @ w3)


@pytest.mark.parametrize("genuine", [False, True])
def test_padding_rows_through_matmuls(genuine):
    """NaN rows of a batch that the loss slices away, through matmuls whose gradients carry row supports: the
    gradients are those of the program without the rows (float64); a NaN in a kept row stays NaN exactly where
    that program has it."""
    torch.manual_seed(2)
    x = torch.randn(10, 6, dtype=f64)
    x[8:] = nan
    if genuine:
        x[3, 2] = nan
    ws = [torch.randn(6, 5, dtype=f64), torch.randn(5, 5, dtype=f64), torch.randn(5, 4, dtype=f64)]
    got = [w.clone().requires_grad_() for w in ws]
    gw.backward(_mlp_program(x, *got)[:8].square().sum())
    ref = [w.clone().requires_grad_() for w in ws]
    _mlp_program(x[:8], *ref)[:8].square().sum().backward()
    for g, r in zip(got, ref, strict=True):
        assert torch.equal(g.grad.isnan(), r.grad.isnan())
        if not genuine:
            torch.testing.assert_close(g.grad, r.grad, rtol=1e-12, atol=1e-12)
    assert genuine == any(bool(g.grad.isnan().any()) for g in got)


def test_accumulated_gradient_after_a_row_support(monkeypatch):
    """A value used twice whose first gradient comes with a row support (an mm's) and whose second supports a row
    the first does not: what comes after the engine's sum reads the union (row 9's gradient flows), and the unused
    NaN row 8 is annihilated."""
    torch.manual_seed(3)
    x = torch.randn(10, 6, dtype=f64)
    x[8] = nan  # unused: annihilated
    w1, w2 = torch.randn(6, 5, dtype=f64), torch.randn(5, 4, dtype=f64)

    def program(x, w1, w2, rows):
        h = torch.nn.functional.silu(x @ w1)
        return (h @ w2)[:8].square().sum() + h[rows].square().sum()

    got = [w.clone().requires_grad_() for w in (w1, w2)]
    gw.backward(program(x, *got, [9]))
    ref = [w.clone().requires_grad_() for w in (w1, w2)]
    keep = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 9])
    program(x[keep], *ref, [8]).backward()
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g.grad, r.grad, rtol=1e-12, atol=1e-12)


def test_a_hook_that_writes_a_row_support_in_place():
    """A gradient hook writing into the gradient an mm made (its mask recorded from a row support) makes the
    rows it fills values: the ops after the hook read the written support, so row 9's 1.0s reach w1's gradient
    (a stale broadcast form would annihilate them). Reference: plain PyTorch with the unused NaN row 8 made finite
    (its gradient is 0 either way)."""
    torch.manual_seed(4)
    x = torch.randn(10, 6, dtype=f64)
    w1, w2 = torch.randn(6, 5, dtype=f64), torch.randn(5, 4, dtype=f64)

    def program(x, w1, w2):
        h = x @ w1
        h.register_hook(lambda g: g.index_fill_(0, torch.tensor([9]), 1.0))
        return (torch.nn.functional.silu(h) @ w2)[:8].square().sum()

    ref = [w.clone().requires_grad_() for w in (w1, w2)]
    program(x, *ref).backward()
    x[8] = nan
    got = [w.clone().requires_grad_() for w in (w1, w2)]
    gw.backward(program(x, *got))
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g.grad, r.grad, rtol=1e-12, atol=1e-12)


def test_a_backward_under_inference_mode():
    """A strong pass run under torch.inference_mode() (its masks are inference tensors): the gradient is the
    program's without the NaN rows."""
    torch.manual_seed(5)
    x = torch.randn(10, 6, dtype=f64)
    w1, w2 = torch.randn(6, 5, dtype=f64), torch.randn(5, 4, dtype=f64)
    ref = [w.clone().requires_grad_() for w in (w1, w2)]
    (torch.nn.functional.silu(x[:8] @ ref[0]) @ ref[1]).square().sum().backward()
    x[8:] = nan
    got = [w.clone().requires_grad_() for w in (w1, w2)]
    loss = (torch.nn.functional.silu(x @ got[0]) @ got[1])[:8].square().sum()
    with torch.inference_mode():
        gw.backward(loss)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g.grad, r.grad, rtol=1e-12, atol=1e-12)


def test_a_broadcast_record_overwritten_by_a_copy():
    """stft's backward (tests/reported: stft-nan-padding-frames-cropped): a zeros buffer recorded as one broadcast
    structural zero, then written by copy_ from the frames' gradient inside the pass (where version counters do
    not move): the ops after read the copied support, so w's gradient is the program's without the padding."""
    torch.manual_seed(0)
    x = torch.randn(16, dtype=f64)
    x[12:] = nan
    win = torch.hann_window(4, dtype=f64)

    def spec(s):
        return torch.stft(s, n_fft=4, hop_length=4, center=False, window=win, return_complex=True)

    w = torch.tensor(0.8, dtype=f64, requires_grad=True)
    (got,) = gw.grad(spec(w * x)[:, :3].abs().pow(2).sum(), (w,))
    ref = torch.tensor(0.8, dtype=f64, requires_grad=True)
    spec(ref * x[:12]).abs().pow(2).sum().backward()
    torch.testing.assert_close(got, ref.grad, rtol=1e-12, atol=1e-12)


# -- the convolution rule's one-channel convolutions ---------------------------------------------------------------

# (spatial dims, kernel, stride, padding, dilation, transposed, output_padding)
_ONE_CHANNEL = [(1, 3, 1, 1, 1, False, 0), (2, 3, 1, 1, 1, False, 0), (2, 3, 2, 0, 1, False, 0),
                (2, 2, 1, 2, 2, False, 0), (2, 3, 2, 1, 1, True, 1), (3, 2, 1, 0, 1, False, 0),
                (3, 3, 2, 1, 2, True, 0)]


@pytest.mark.parametrize("dims, kernel, stride, padding, dilation, transposed, output_padding", _ONE_CHANNEL)
def test_one_channel_backward_is_the_unfolded_call(dims, kernel, stride, padding, dilation, transposed,
                                                   output_padding):
    """The batch folded into groups: grad_input equal to the one-channel call's, grad_weight per sample summing
    to it (0/1 numbers: exact sums), for strided, dilated, transposed and 1-d/3-d convolutions."""
    from gradwise._strong_zeros._rules_bilinear import one_channel_backward

    torch.manual_seed(0)
    func = torch.ops.aten.convolution_backward.default
    x = (torch.rand(5, 1, *(7,) * dims) > 0.5).double()
    w = torch.ones(1, 1, *(kernel,) * dims, dtype=f64)
    sizes = ([stride] * dims, [padding] * dims, [dilation] * dims, transposed, [output_padding] * dims)
    out_shape = torch.ops.aten.convolution(x, w, None, *sizes, 1).shape[2:]
    g = (torch.rand(5, 1, *out_shape) > 0.4).double()
    args = (g, x, w, None, *sizes, 1)
    expected = func(*args, [True, True, False])
    assert torch.equal(one_channel_backward(func, args, 0), expected[0])
    assert torch.equal(one_channel_backward(func, args, 1).sum(0, keepdim=True), expected[1])


def test_a_cropped_nan_border_runs_no_one_channel_batch(monkeypatch):
    """A NaN border cropped after a convolution: the rule's one-channel convolutions (the reads of grad_input, the
    test whether a kept output meets the border) run with the batch folded into groups, never as a one-channel
    batch (~15x slower on CPU); the gradients are the clean program's."""
    from torch.nn import functional as F

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1)).double()
    img = torch.randn(3, 3, 8, 8, dtype=f64)
    params = list(net.parameters())

    def loss(frame):
        return net(F.pad(img, (2, 2, 2, 2), value=frame))[..., 4:8, 4:8].square().sum()

    calls = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution_backward.default:
                calls.append((args[0].shape[:2], args[9]))
            return func(*args, **(kwargs or {}))

    with Spy():
        got = gw.grad(loss(nan), params)
    for g, e in zip(got, torch.autograd.grad(loss(0.25), params), strict=True):
        torch.testing.assert_close(g, e)
    assert calls and not [c for c in calls if c[0][1] == 1 and c[0][0] > 1 and c[1] == 1]


def test_overflowing_channel_sums_are_not_taken_for_nan():
    """Finite inputs whose sum over channels overflows (3e38 + 3e38) where kept outputs read them, beside a NaN
    border they never read: the test whether a kept output meets a NaN/Inf asks the exact elementwise test, so
    the gradients are those of the same program with a finite border, bit for bit."""
    from torch.nn import functional as F

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 1, 3, padding=1, bias=False)
    img = torch.randn(2, 2, 6, 6)
    img[:, :, 2:4, 2:4] = 3e38

    def loss(frame):
        return conv(F.pad(img, (2, 2, 2, 2), value=frame))[..., 4:6, 4:6].sum()

    (got,) = gw.grad(loss(nan), [conv.weight])
    (expected,) = torch.autograd.grad(loss(0.25), [conv.weight])
    assert torch.equal(got, expected)
