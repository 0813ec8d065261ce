"""Hunt: gradwise under torch.func (session 30). Jacobians by unit seeds, Hessians vectorized, and the probes around
them. References are independent of gradwise: the same program with the unused values deleted, differentiated by
plain PyTorch (``torch.autograd.functional`` or ``torch.func``) in float64.
"""

from __future__ import annotations

import pytest
import torch

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)

D = torch.float64
nan, inf = float("nan"), float("inf")
AF = torch.autograd.functional


def _same(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal values, NaN where NaN, and the same sign bits (a structural 0 for PyTorch's -0 would differ)."""
    return torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0)) and torch.equal(got.signbit(), expected.signbit())


# ---------------------------------------------------------------------------------------------------------
# A Jacobian's row i is the gradient of output i alone. Computed with unit seeds (jacrev's standard basis,
# jacobian(vectorize=True), is_grads_batched), the seed's 0 for another output k met k's infinite slope as
# 0 x inf = NaN: a NaN in row i where the program of output i alone has 0, without a word.
# ---------------------------------------------------------------------------------------------------------

def _two(x):
    """Output 0 reads x0, x1; output 1 is sqrt(x2), whose slope at x2 = 0 is inf (genuine, in row 1 only)."""
    return torch.stack([x[0] * x[1], x[2].sqrt()])


def _two_tuple(x):
    return x[:2] * x[1], x[2].sqrt()


_X = torch.tensor([2.0, 3.0, 0.0], dtype=D)
_ROWS = [lambda x: x[0] * x[1], lambda x: x[2].sqrt()]  # the program of each output alone


def _reference() -> torch.Tensor:
    return torch.stack([AF.jacobian(row, _X) for row in _ROWS])


JACOBIANS = {  # PyTorch's standard basis (recognized by identity): each row selects its output
    "jacrev": lambda x: torch.func.jacrev(_two)(x),
    "jacrev(chunk_size=1)": lambda x: torch.func.jacrev(_two, chunk_size=1)(x),
    "jacrev(chunk_size=2)": lambda x: torch.func.jacrev(_two, chunk_size=2)(x),
    "jacobian(vectorize=True)": lambda x: AF.jacobian(_two, x, vectorize=True),
    "vmap(jacrev)": lambda x: torch.func.vmap(torch.func.jacrev(_two))(x.expand(2, 3))[1],
}
USER_SEEDS = {  # the caller's eye: cotangents, values (as the eager gw.grad(y, x, e_i) keeps them)
    "vmap(vjp)(eye)": lambda x: torch.func.vmap(torch.func.vjp(_two, x)[1])(torch.eye(2, dtype=D))[0],
    "is_grads_batched": lambda x: _batched_seeds(x, torch.autograd.grad),
    "gw.grad(is_grads_batched)": lambda x: _batched_seeds(x, gw.grad),
}


def _batched_seeds(x, grad):
    xx = x.clone().requires_grad_()
    return grad(_two(xx), xx, torch.eye(2, dtype=D), is_grads_batched=True)[0]


@pytest.mark.parametrize("name", list(JACOBIANS))
def test_a_jacobians_unit_seeds_select_their_output(name):
    expected = _reference()
    assert float(expected[0, 2]) == 0.0 and float(expected[1, 2]) == inf
    plain = JACOBIANS[name](_X)
    assert bool(plain[0, 2].isnan()), "premise: PyTorch is contaminated"
    with gw.strong_zeros():
        got = JACOBIANS[name](_X)
    assert _same(got, expected), got


@pytest.mark.parametrize("name", list(USER_SEEDS))
def test_a_callers_eye_is_a_value(name):
    """The same unit rows, passed by the caller: a cotangent, whose 0 x inf is the product asked for, row by row as
    the eager gw.grad with that seed gives it (nothing decided by a seed's values)."""
    xx = _X.clone().requires_grad_()
    y = _two(xx)
    expected = torch.stack([gw.grad(y, xx, e, retain_graph=True)[0] for e in torch.eye(2, dtype=D)])
    assert bool(expected[0, 2].isnan())
    with gw.strong_zeros():
        got = USER_SEEDS[name](_X)
    assert _same(got, expected), got


def test_a_jacobian_of_tuple_outputs():
    expected = (torch.stack([AF.jacobian(lambda x: x[0] * x[1], _X), AF.jacobian(lambda x: x[1] * x[1], _X)]),
                AF.jacobian(lambda x: x[2].sqrt(), _X))
    for call in (lambda x: torch.func.jacrev(_two_tuple)(x), lambda x: AF.jacobian(_two_tuple, x, vectorize=True)):
        assert bool(call(_X)[0].isnan().any()), "premise: PyTorch is contaminated"
        with gw.strong_zeros():
            got = call(_X)
        assert all(_same(g, e) for g, e in zip(got, expected, strict=True)), got


def test_seeds_of_other_values_stay_values():
    """A cotangent that is not a unit seed (a 2, a 0.5) is a value: its 0 x inf is the product the caller asked
    for, as with the eager gw.grad and that seed (the rule never claims a structural zero there)."""
    seeds = torch.tensor([[2.0, 0.0], [0.5, 1.0]], dtype=D)
    xx = _X.clone().requires_grad_()
    y = _two(xx)
    expected = torch.stack([gw.grad(y, xx, s, retain_graph=True)[0] for s in seeds])
    assert bool(expected[0, 2].isnan())
    with gw.strong_zeros():
        got = torch.func.vmap(torch.func.vjp(_two, _X)[1])(seeds)[0]
    assert _same(got, expected)


@pytest.mark.parametrize("name", [*JACOBIANS, *USER_SEEDS])
def test_unit_seeds_on_finite_data_are_pytorchs_bits(name):
    call = {**JACOBIANS, **USER_SEEDS}[name]
    x = torch.tensor([2.0, -3.0, 4.0], dtype=D)
    plain = call(x)
    with gw.strong_zeros():
        got = call(x)
    assert _same(got, plain)


# Hessians by a vectorized outer Jacobian: its unit seeds meet the inner gradient's rows; the inner gradient's
# infinite row (x2^1.5 at 0: d2/dx2^2 = inf) made the other rows NaN, while the non-vectorized Hessian (one
# gradient per row) gave 0
def _hess_f(x):
    return x[0] ** 2 * x[1] + x[2].pow(1.5)


HESSIANS = {
    "hessian(vectorize=True)": lambda f, x: AF.hessian(f, x, vectorize=True),
    "jacobian(jacrev, vectorize=True)": lambda f, x: AF.jacobian(torch.func.jacrev(f), x, vectorize=True),
    "jacobian(gw.grad create_graph, vectorize=True)": lambda f, x: AF.jacobian(
        lambda v: gw.grad(f(v), v, create_graph=True)[0], x, vectorize=True),
}


@pytest.mark.parametrize("name", list(HESSIANS))
def test_a_vectorized_hessians_rows_are_their_own(name):
    x = torch.tensor([2.0, 3.0, 0.0], dtype=D)
    # rows 0, 1: the program without the x2 term; row 2: that term alone (its inf is genuine)
    kept = AF.hessian(lambda v: v[0] ** 2 * v[1] + 0.0 * v[2], x)
    expected = torch.cat([kept[:2], AF.hessian(lambda v: v[2].pow(1.5), x)[2:]])
    assert float(expected[2, 2]) == inf
    assert bool(HESSIANS[name](_hess_f, x)[0, 2].isnan()), "premise: PyTorch is contaminated"
    with gw.strong_zeros():
        got = HESSIANS[name](_hess_f, x)
        unvectorized = AF.hessian(_hess_f, x)
    assert _same(got[:2], expected[:2]) and float(got[2, 2]) == inf, got
    assert _same(got, unvectorized)


def test_a_vectorized_hessian_at_a_nan_maximum_keeps_the_unselected_rows_zero():
    """amax(x)**2 at a NaN maximum (x0): x1 and x2 are decided unselected, so their gradient is 0 (structural) and
    so is its derivative; the vectorized Hessian's unit seeds met x0's NaN row in H[1:, 0] (non-vectorized: 0)."""
    x = torch.tensor([nan, 1.0, 2.0], dtype=D)
    with gw.strong_zeros():
        got = AF.hessian(lambda v: v.amax() ** 2, x, vectorize=True)
        unvectorized = AF.hessian(lambda v: v.amax() ** 2, x)
    assert torch.equal(got[1:], torch.zeros(2, 3, dtype=D)), got
    assert _same(got, unvectorized)


def test_a_unit_seed_the_forward_multiplied_by_stays_a_value():
    """Supports are per storage: a 0/1 seed that is also a value the graph saved (the mask the forward multiplied
    by) keeps its zeros values there, so sqrt's inf at 0 meets that mask's 0 as PyTorch's NaN, the eager gw.grad's."""
    m = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=D)  # m.t()[1, 0] is m[0, 1]: a 0 where the seed holds 1

    def f(x):
        return x.sqrt() * m.t()

    x = torch.tensor([[4.0, 1.0], [0.0, 4.0]], dtype=D)
    seeds = m.expand(1, 2, 2)
    xx = x.clone().requires_grad_()
    expected = gw.grad(f(xx), xx, m)[0]
    assert bool(expected.isnan().any())
    with gw.strong_zeros():
        got = torch.func.vmap(torch.func.vjp(f, x)[1])(seeds)[0][0]
    assert _same(got, expected)


# ---------------------------------------------------------------------------------------------------------
# A comparison written into a buffer (torch.gt(x, t, out=m)) in a custom backward: the buffer is the selection the
# functional comparison is. The rule ran on the functional overload and the buffer took its values but not its
# selection: a fresh buffer was no selection (PyTorch's 0 x inf = NaN where the functional form gives 0), and a
# buffer that was a selection before (m = y == y.amax()) kept that one's meaning: where x is NaN, gt decided
# nothing, yet the old entry called it decided and the used NaN's gradient became 0 (SILENT).
# ---------------------------------------------------------------------------------------------------------

def _written_selection(how: str):
    def select(x, y):
        if how == "functional":
            return torch.gt(x, 1.5)
        m = {"fresh": lambda: torch.empty(x.shape, dtype=torch.bool),
             "resized": lambda: torch.empty(0, dtype=torch.bool),
             "a mask written in place": lambda: (y > 2.5).logical_not_(),
             "a selection": lambda: y == y.amax()}[how]()
        torch.gt(x, 1.5, out=m)
        return m

    class _Masked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, y):
            ctx.save_for_backward(x, y)
            return x * 1.0

        @staticmethod
        def backward(ctx, g):
            x, y = ctx.saved_tensors
            return g * select(x, y), None

    return _Masked


WRITTEN = ["functional", "fresh", "resized", "a mask written in place", "a selection"]
_Y = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D)


@pytest.mark.parametrize("how", WRITTEN)
def test_an_out_comparison_selects_as_the_functional_one(how):
    """sqrt's inf at x1 = 0 meets the mask's False there: 0 in the program without x1's sqrt (x1 = 4: a finite
    slope times False), as the functional comparison gives."""
    masked = _written_selection(how)
    x = torch.tensor([2.0, 0.0, 3.0, 1.0], dtype=D, requires_grad=True)
    deleted = torch.tensor([2.0, 4.0, 3.0, 1.0], dtype=D, requires_grad=True)
    expected = torch.autograd.grad(masked.apply(deleted, _Y).sqrt().sum(), deleted)[0]
    expected[1] = 0.0  # (x1's own slope there differs; times False it is 0 whatever it is)
    loss = masked.apply(x, _Y).sqrt().sum()
    assert bool(torch.autograd.grad(loss, x, retain_graph=True)[0][1].isnan()), "premise: PyTorch is contaminated"
    assert _same(gw.grad(loss, x)[0], expected)


@pytest.mark.parametrize("how", WRITTEN)
def test_an_out_comparison_with_a_nan_decides_nothing(how):
    """x1 is NaN and used (x * w): its gradient is NaN, gt(NaN, 1.5) selecting nothing (PyTorch's, kept)."""
    masked = _written_selection(how)
    x = torch.tensor([2.0, nan, 3.0, 1.0], dtype=D, requires_grad=True)
    loss = (masked.apply(x, _Y) * torch.tensor([1.0, inf, 1.0, 1.0], dtype=D)).sum()
    expected = torch.autograd.grad(loss, x, retain_graph=True)[0]
    assert bool(expected[1].isnan())
    assert _same(gw.grad(loss, x)[0], expected)


# ---------------------------------------------------------------------------------------------------------
# A forward-mode outer Jacobian over a reverse gradient (hessian's outer_jacobian_strategy='forward-mode'): the
# inner create_graph backward runs strong under a dual level, and the tangents of its results are forward-mode
# derivatives of the forward's formulas (amax's jvp at a NaN maximum: NaN in every direction) and the backward's.
# No backward runs for the outer Jacobian, so the NaN it kept went without a word. Now the inner backward reads its
# results' tangents and names it where they hold NaN/Inf after a pass that held structural zeros.
# ---------------------------------------------------------------------------------------------------------

def _forward_over_reverse(f, x):
    return AF.hessian(f, x, vectorize=True, outer_jacobian_strategy="forward-mode")


def test_a_forward_mode_outer_hessians_nan_is_named():
    x = torch.tensor([nan, 1.0, 2.0], dtype=D)
    with gw.strong_zeros():
        reverse = AF.hessian(lambda v: v.amax() ** 2, x, vectorize=True)
    assert torch.equal(reverse[1:], torch.zeros(2, 3, dtype=D))  # (x1, x2 unselected: rows 0)
    with pytest.warns(gw.OpaqueBackwardWarning, match="forward-AD dual level"), gw.strong_zeros():
        got = _forward_over_reverse(lambda v: v.amax() ** 2, x)
    assert bool(got[0, 1:].isnan().all())  # (PyTorch's forward formula: kept, and said)


@pytest.mark.parametrize("where", ["sqrt", "log"])
def test_a_forward_mode_outer_hessian_that_holds_says_nothing(where):
    """The tangents through the strong pass's ops meet its rules too: exact here, and no warning."""
    def f(v):
        return torch.where(v > 1, (v.sqrt() if where == "sqrt" else v.log()) * v, 0.0).sum()

    def deleted(v):
        kept = torch.stack([v[0], v[2]])
        return ((kept.sqrt() if where == "sqrt" else kept.log()) * kept).sum() + 0.0 * v[1]

    x = torch.tensor([2.0, 0.0, 3.0], dtype=D)
    assert bool(_forward_over_reverse(f, x).isnan().any()), "premise: PyTorch is contaminated"
    with gw.strong_zeros():
        got = _forward_over_reverse(f, x)
    torch.testing.assert_close(got, AF.hessian(deleted, x), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# torch.compile(vmap(f)) where f takes a gradient and then graph-breaks: dynamo runs the gradient on fake tensors
# while speculating the vmap, gives the transform up at the break and runs it eagerly, with strong zeros. The
# PlainBackwardWarning for a gradient compiled into a graph was given at the fake run, and said the (strong)
# gradients were PyTorch's. It is now given when the compile ends, for gradient nodes of a compiled graph only.
# ---------------------------------------------------------------------------------------------------------

_M4 = torch.tensor([True, True, False, True])


def _guarded(x):
    return (torch.where(_M4, x.sqrt(), 0.0) * x).sum()


def _then_break(x):
    g = torch.func.grad(_guarded)(x)
    torch._dynamo.graph_break()
    return g


_X4 = torch.tensor([[1.0, 4.0, -1.0, 9.0], [4.0, 1.0, -2.0, 1.0]], dtype=D)


def _per_sample_reference() -> torch.Tensor:
    """Each sample's gradient with x2's sqrt deleted (x2 set to 1: its term is discarded either way)."""
    kept = _X4.clone()
    kept[:, 2] = 1.0
    return torch.func.vmap(torch.func.grad(_guarded))(kept)


@pytest.fixture
def fresh_dynamo():
    from gradwise._strong_zeros import _engine

    torch._dynamo.reset()
    _engine._known_sites.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_dynamo")
def test_a_gradient_dynamo_only_speculated_is_not_called_compiled():
    with gw.strong_zeros():  # (warnings are errors: a PlainBackwardWarning fails the test)
        got = torch.compile(torch.func.vmap(_then_break), backend="aot_eager")(_X4)
    assert _same(got, _per_sample_reference())


@pytest.mark.usefixtures("fresh_dynamo")
def test_a_gradient_in_a_compiled_graph_is_still_named():
    with pytest.warns(gw.PlainBackwardWarning, match="computes a gradient inside its compiled graph"), \
            gw.strong_zeros():
        got = torch.compile(torch.func.vmap(torch.func.grad(_guarded)), backend="aot_eager")(_X4)
    assert bool(got[:, 2].isnan().all())  # (PyTorch's, as said)


# ---------------------------------------------------------------------------------------------------------
# Probes that held (session 30), kept against the deleted program: per-sample gradients over a padded batch in
# chunks, jacrev with argnums tuples, buffers with NaN padding through functional_call, model ensembles
# ---------------------------------------------------------------------------------------------------------

def _padded():
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(3, 2).to(D)
    params = {k: v.detach() for k, v in lin.named_parameters()}
    X = torch.randn(5, 4, 3, generator=g, dtype=D)
    X[1, 2:], X[3, 1:] = nan, nan
    lens = torch.tensor([4, 2, 4, 1, 4])

    def loss(p, x, n):
        out = torch.func.functional_call(lin, p, (x,))
        return torch.where((torch.arange(4) < n)[:, None], out, 0.0).pow(2).sum()

    rows = []
    for x, n in zip(X, lens, strict=True):
        pp = {k: v.clone().requires_grad_() for k, v in params.items()}
        kept = torch.func.functional_call(lin, pp, (x[:n],)).pow(2).sum()
        rows.append(torch.cat([t.flatten() for t in torch.autograd.grad(kept, list(pp.values()))]))
    return loss, params, X, lens, torch.stack(rows)


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3])
def test_per_sample_gradients_of_a_padded_batch_in_chunks(chunk_size):
    loss, params, X, lens, expected = _padded()
    with gw.strong_zeros():
        got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, X, lens)
    torch.testing.assert_close(torch.cat([t.flatten(1) for t in got.values()], 1), expected, rtol=1e-12, atol=1e-12)


def _three(a, b, c):
    return torch.stack([(a * b).sum(), c.sqrt().sum(), torch.where(c > 0, c.log(), 0.0).sum()])


@pytest.mark.parametrize("argnums", [(0,), (0, 2), (2,), (1, 2), (0, 1, 2)])
def test_jacrev_with_argnums_tuples(argnums):
    args = (torch.tensor([1.0, 2.0], dtype=D), torch.tensor([3.0, 4.0], dtype=D), torch.tensor([0.0, 4.0], dtype=D))
    rows = [lambda a, b, c: (a * b).sum(), lambda a, b, c: c.sqrt().sum(), lambda a, b, c: c[1:].log().sum()]
    expected = []
    for row in rows:  # each output alone, log's discarded branch deleted
        ins = [t.clone().requires_grad_() for t in args]
        expected.append(torch.autograd.grad(row(*ins), [ins[k] for k in argnums], allow_unused=True,
                                            materialize_grads=True))
    with gw.strong_zeros():
        got = torch.func.jacrev(_three, argnums=argnums)(*args)
    for k, g in enumerate(got):
        assert _same(g, torch.stack([e[k] for e in expected])), (argnums, k, g)


def test_functional_call_with_nan_padded_buffers():
    """BatchNorm's running stats NaN in a channel the loss discards (eval mode): per sample, the gradients of the
    program whose buffers hold finite values there."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3, padding=1), torch.nn.BatchNorm1d(3), torch.nn.ReLU())
    net = net.to(D).eval()
    net[1].running_mean[2], net[1].running_var[2] = nan, nan
    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = dict(net.named_buffers())
    clean = {k: v.clone() for k, v in buffers.items()}
    clean["1.running_mean"][2], clean["1.running_var"][2] = 0.0, 1.0
    X = torch.randn(4, 2, 6, dtype=D)

    def loss(p, b, x):
        return torch.func.functional_call(net, (p, b), (x[None],))[0, :2].pow(2).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(0, 2)), in_dims=(None, None, 0))
    expected = per_sample(params, clean, X)
    with gw.strong_zeros():
        got = per_sample(params, buffers, X)
    for g, e in zip([*got[0].values(), got[1]], [*expected[0].values(), expected[1]], strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
