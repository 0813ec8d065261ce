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
}


@pytest.mark.parametrize("name", list(BASES))
def test_pytorchs_basis_is_recognized_under_wrappers(name):
    expected = _rows_alone()
    assert bool(BASES[name](_X)[0, 2].isnan()), "premise: PyTorch is contaminated"
    with gw.strong_zeros():
        got = BASES[name](_X)
    assert _same(got, expected), got


def test_a_compiled_jacrev_reads_no_seed_and_keeps_its_graph():
    """Dynamo inlines jacrev and the wrapped basis constructor: nothing recorded from fake tensors, no graph break
    (fullgraph), PyTorch's compiled bits; compiled first without the wrappers, then recompiled with them."""
    import torch._dynamo

    from gradwise._strong_zeros import _transforms

    torch._dynamo.reset()
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
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------------
# The traced gradient's PlainBackwardWarning, given from dynamo's end-of-compile callback (8588c38): dynamo runs
# those callbacks in a ``finally`` before counting the compile done, so a warning filtered into an error left
# its pending-compile count at 1: no start/end callback (anyone's) ran for any later compile, gradwise's own
# candidates were never settled, and every torch._dynamo.reset() raised AssertionError.
# ---------------------------------------------------------------------------------------------------------

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
