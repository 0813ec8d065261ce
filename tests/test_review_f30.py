"""Review of branch func30 (session 30): PyTorch's standard basis recognized by identity (not by a seed's values),
out= comparison buffers, the dual-level warning, the dynamo-speculated gradient. References are independent: the
eager gw.grad with the same seed, the program of one output alone (plain PyTorch, float64), plain PyTorch's bits.
"""

from __future__ import annotations

import pytest
import torch

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)

D = torch.float64
nan, inf = float("nan"), float("inf")


def _same(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0)) and torch.equal(got.signbit(), expected.signbit())


def _two(x):
    """Output 0 reads x0, x1; output 1 is sqrt(x2): its slope at x2 = 0 is inf."""
    return torch.stack([x[0] * x[1], x[2].sqrt()])


_X = torch.tensor([2.0, 3.0, 0.0], dtype=D)

# ---------------------------------------------------------------------------------------------------------
# A seed is the caller's cotangent, a value, whatever its values: a 0/1 float seed under torch.func was read as a
# selection (its values decided it), where the eager gw.grad with the same seed keeps 0 x inf = NaN.
# ---------------------------------------------------------------------------------------------------------

USER_SEEDS = {
    "vjp_fn(mask)": lambda x, s: torch.func.vjp(_two, x)[1](s)[0],
    "vmap(vjp_fn)(masks)": lambda x, s: torch.func.vmap(torch.func.vjp(_two, x)[1])(s.expand(2, 2))[0][0],
    "grad of a dot with a 0/1 weight": lambda x, s: torch.func.grad(lambda v: (_two(v) * s).sum())(x),
}


@pytest.mark.parametrize("name", list(USER_SEEDS))
def test_a_callers_01_cotangent_is_a_value_under_torch_func(name):
    seed = torch.tensor([1.0, 0.0], dtype=D)
    xx = _X.clone().requires_grad_()
    expected = gw.grad(_two(xx), xx, seed)[0]  # eager: the seed's 0 meets sqrt's inf as the caller asked
    assert bool(expected[2].isnan())
    with gw.strong_zeros():
        got = USER_SEEDS[name](_X, seed)
    assert _same(got, expected), got


def test_is_grads_batched_with_a_callers_eye_is_each_seeds_gw_grad():
    xx = _X.clone().requires_grad_()
    y = _two(xx)
    seeds = torch.eye(2, dtype=D)
    expected = torch.stack([gw.grad(y, xx, s, retain_graph=True)[0] for s in seeds])
    with gw.strong_zeros():
        got = torch.autograd.grad(y, xx, seeds, retain_graph=True, is_grads_batched=True)[0]
    assert _same(got, expected), got


def _rows_alone() -> torch.Tensor:
    af = torch.autograd.functional
    return torch.stack([af.jacobian(lambda v: v[0] * v[1], _X), af.jacobian(lambda v: v[2].sqrt(), _X)])


BASES = {  # PyTorch's own standard basis, under more wrappers than the helper's tests
    "jacrev(argnums=(0,))": lambda x: torch.func.jacrev(_two, argnums=(0,))(x)[0],
    "jacrev(has_aux)": lambda x: torch.func.jacrev(lambda v: (_two(v), v.sum()), has_aux=True)(x)[0],
    "vmap(jacrev(chunk_size=1))": lambda x: torch.func.vmap(torch.func.jacrev(_two, chunk_size=1))(x.expand(2, 3))[1],
    "grad-free jacobian(vectorize) of a tuple": lambda x: torch.stack(
        torch.autograd.functional.jacobian(lambda v: (v[0] * v[1], v[2].sqrt()), x, vectorize=True)),
    "jacrev(chunk_size=2, preallocated)": lambda x: torch.func.jacrev(_two, chunk_size=2,
                                                                       _preallocate_and_copy=True)(x),
    "jacrev in float32": lambda x: torch.func.jacrev(_two)(x.float()).double(),
}


@pytest.mark.parametrize("name", list(BASES))
def test_pytorchs_basis_is_recognized_under_wrappers(name):
    expected = _rows_alone()
    assert bool(BASES[name](_X)[0, 2].isnan()), "premise: PyTorch is contaminated"
    with gw.strong_zeros():
        got = BASES[name](_X)
    assert _same(got, expected), got


def test_a_jacobian_with_create_graph_carries_the_bases_zeros():
    """Row 0 of jacobian(vectorize=True, create_graph=True) is output 0's gradient [x1, x0, 0]: its derivative
    summed is [1, 1, 0] (the program of output 0 alone), where the basis's 0 x inf made NaN."""
    xx = _X.clone().requires_grad_()
    with gw.strong_zeros():
        jac = torch.autograd.functional.jacobian(_two, xx, vectorize=True, create_graph=True)
        got = gw.grad(jac[0].sum(), xx)[0]
    alone = torch.autograd.functional.hessian(lambda v: v[0] * v[1], _X).sum(0)
    assert _same(got, alone), got


@pytest.fixture
def fresh_dynamo(monkeypatch):
    import torch._dynamo

    from gradwise._strong_zeros import _engine

    torch._dynamo.reset()
    monkeypatch.setattr(_engine, "_known_sites", set())
    monkeypatch.setattr(_engine, "_pending_sites", [])
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_dynamo")
def test_a_compiled_jacrev_reads_no_seed_and_keeps_its_graph():
    """Dynamo inlines jacrev and the wrapped basis constructor: nothing recorded from fake tensors, no graph break
    (fullgraph), PyTorch's compiled bits; compiled first without the wrappers, then recompiled with them."""
    import torch._dynamo

    from gradwise._strong_zeros import _transforms

    compiled = torch.compile(torch.func.jacrev(_two), backend="aot_eager", fullgraph=True)
    x = torch.tensor([2.0, -3.0, 4.0], dtype=D)
    plain = compiled(x)
    before = len(_transforms._BASES)
    with pytest.warns(gw.PlainBackwardWarning), gw.strong_zeros():
        got = compiled(x)
        again = torch.compile(torch.func.jacrev(_two, chunk_size=1), backend="aot_eager", fullgraph=True)(x)
    assert all(not isinstance(t, torch._subclasses.FakeTensor) for t in list(_transforms._BASES.keys()))
    assert len(_transforms._BASES) <= before
    assert _same(got, plain) and _same(again, plain)


# ---------------------------------------------------------------------------------------------------------
# out= comparisons in a custom backward (8f83e20), into buffers of every kind: a buffer that selects as the
# functional comparison does has the deleted program's gradient; a float/uint8 buffer, an in-place comparison and
# a view of a buffer written through another view are values (PyTorch's gradient).
# ---------------------------------------------------------------------------------------------------------

def _into_view(x):
    m = torch.zeros(2, 4, dtype=torch.bool)[1]
    return torch.gt(x, 1.5, out=m)


def _into_strided(x):
    return torch.gt(x, 1.5, out=torch.zeros(4, 2, dtype=torch.bool)[:, 1])


def _into_a_view_of_a_selection(x):
    y2 = torch.arange(8.0, dtype=D).view(2, 4)
    return torch.gt(x, 1.5, out=(y2 == y2.amax())[1])


def _logical_into(x):
    return torch.logical_and(x > 1.5, x > -1.0, out=torch.empty(4, dtype=torch.bool))


def _into_float(x):
    return torch.gt(x, 1.5, out=torch.empty(4, dtype=D))


def _into_uint8(x):
    return torch.gt(x, 1.5, out=torch.empty(4, dtype=torch.uint8))


def _in_place(x):
    return x.clone().gt_(1.5)


def _read_through_another_view(x):
    sel = torch.ones(2, 4, dtype=D) > 0
    torch.gt(x, 1.5, out=sel[1])
    return sel[1]


OUT_BUFFERS = {_into_view: True, _into_strided: True, _into_a_view_of_a_selection: True, _logical_into: True,
               _into_float: False, _into_uint8: False, _in_place: False, _read_through_another_view: False}


def _masked_by(select):
    class Masked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * 1.0

        @staticmethod
        def backward(ctx, g):
            return g * select(ctx.saved_tensors[0])

    return Masked


@pytest.mark.parametrize("select", list(OUT_BUFFERS), ids=lambda f: f.__name__)
def test_out_comparison_buffers(select):
    masked = _masked_by(select)
    x = torch.tensor([2.0, 0.0, 3.0, 1.0], dtype=D, requires_grad=True)
    plain = torch.autograd.grad(masked.apply(x).sqrt().sum(), x)[0]
    assert bool(plain[1].isnan()), "premise: PyTorch is contaminated"
    if OUT_BUFFERS[select]:  # x1's sqrt deleted (x1 = 4: its slope times False is 0)
        kept = torch.tensor([2.0, 4.0, 3.0, 1.0], dtype=D, requires_grad=True)
        expected = torch.autograd.grad(masked.apply(kept).sqrt().sum(), kept)[0]
        expected[1] = 0.0
    else:
        expected = plain
    assert _same(gw.grad(masked.apply(x).sqrt().sum(), x)[0], expected)
    finite = torch.tensor([2.0, 0.5, 3.0, 1.0], dtype=D, requires_grad=True)  # finite: PyTorch's bits
    assert _same(gw.grad(masked.apply(finite).sqrt().sum(), finite)[0],
                 torch.autograd.grad(masked.apply(finite).sqrt().sum(), finite)[0])
    nan_x = torch.tensor([2.0, nan, 3.0, 1.0], dtype=D, requires_grad=True)  # a used NaN stays (gt decides nothing)
    w = torch.tensor([1.0, inf, 1.0, 1.0], dtype=D)
    assert _same(gw.grad((masked.apply(nan_x) * w).sum(), nan_x)[0],
                 torch.autograd.grad((masked.apply(nan_x) * w).sum(), nan_x)[0])


# ---------------------------------------------------------------------------------------------------------
# The traced gradient's PlainBackwardWarning, given from dynamo's end-of-compile callback (8588c38): dynamo runs
# those callbacks in a ``finally`` before counting the compile done, so a warning filtered into an error left
# its pending-compile count at 1: no start/end callback (anyone's) ran for any later compile, gradwise's own
# candidates were never settled, and every torch._dynamo.reset() raised AssertionError.
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("fresh_dynamo")
def test_a_traced_gradient_warning_as_an_error_leaves_dynamo_working():
    import warnings

    import torch._dynamo

    ends = []
    torch._dynamo.callback_handler.register_end_callback(ends.append)
    x = torch.tensor([1.0, 4.0], dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gw.PlainBackwardWarning)
        with pytest.raises(gw.PlainBackwardWarning, match="computes a gradient inside"), gw.strong_zeros():
            got = torch.compile(torch.func.grad(lambda t: t.sqrt().sum()), backend="aot_eager")(x)
    assert torch.equal(got, 0.5 / x.sqrt())  # the compiled call itself completed
    n = len(ends)
    torch.compile(lambda t: t * 2, backend="aot_eager")(x)
    assert len(ends) == n + 1  # later compiles run their end callbacks
    torch._dynamo.reset()  # (raised AssertionError: "Cannot clear callbacks while 1 are pending")


@pytest.mark.usefixtures("fresh_dynamo")
def test_a_traced_gradient_is_named_once_and_at_once_inside_the_block():
    import warnings

    x = torch.tensor([1.0, 4.0], dtype=D)
    compiled = torch.compile(torch.func.grad(lambda t: t.sqrt().sum()), backend="aot_eager")
    with gw.strong_zeros(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(x)
        compiled(x)
    assert sum("computes a gradient inside" in str(w.message) for w in caught) == 1
