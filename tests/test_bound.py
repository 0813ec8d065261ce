"""The interval-tangent lower bound on the least norm of the Clarke subdifferential (``_nonsmooth/_bound.py``),
checked against independent references: the exact least norm of enumerated pieces (small cases), a box-
constrained least squares over a max layer's per-element weights (SciPy's lsq_linear, thousands of ties), and
gradients at nearby differentiable points. A bound may be loose (0.0) or absent (None); it is never above the
least norm."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import lsq_linear

import gradwise as gw
from gradwise._nonsmooth._bound import lower_bound

f64 = torch.float64


def _flat(t) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in t])


def _random_composition(seed: int):
    """A random small f at a point where every hidden unit ties: relu, abs, a maximum of two or three units, an
    amax, overlapping max-pool windows, a relu after a layer norm (of a symmetric vector: its middle element is
    0), a sort or a topk at 0, then a linear layer, plus a smooth term of x (few enough tied elements to
    enumerate exactly)."""
    gen = torch.Generator().manual_seed(seed)
    k, h = 3, int(torch.randint(2, 5, (), generator=gen))
    a = torch.randn(h, k, generator=gen, dtype=f64)
    b = torch.randn(h, k, generator=gen, dtype=f64)
    v = torch.randn(h, generator=gen, dtype=f64)
    c = torch.randn(k, generator=gen, dtype=f64)
    kind = int(torch.randint(0, 8, (), generator=gen))
    base = torch.linspace(-1.0, 1.0, h, dtype=f64)  # symmetric: its layer norm has an exact 0 when h is odd

    def f(x):
        y = a @ x
        if kind == 0:
            act = torch.relu(y)
        elif kind == 1:
            act = y.abs()
        elif kind == 2:
            act = torch.maximum(y, b @ x)
        elif kind == 3:
            act = torch.stack([y, b @ x, -y]).amax(0)
        elif kind == 5:
            act = torch.relu(torch.nn.functional.layer_norm(base + y, (h,), 1 + b[:, 0], b[:, 1]))
        elif kind == 6:  # two units of y and of b x, all at 0: one tied group of 4 (enumerated exactly)
            act = torch.sort(torch.stack([y[:2], (b @ x)[:2]]).reshape(-1), descending=True).values[:h]
            return (v[: act.numel()] * act).sum() + (c * x).sum() + 0.5 * (x * x).sum()
        elif kind == 7:
            act = torch.topk(torch.stack([y[:2], -(b @ x)[:2]]).reshape(-1), 2).values
            return (v[:2] * act).sum() + (c * x).sum() + 0.5 * (x * x).sum()
        else:  # overlapping windows of 2 along the units
            act = torch.nn.functional.max_pool2d(torch.stack([y, b @ x]).view(1, 1, 2, h), (2, 2), 1).reshape(-1)
            return (v[: h - 1] * act).sum() + (c * x).sum() + 0.5 * (x * x).sum()
        return (v * act).sum() + (c * x).sum() + 0.5 * (x * x).sum()

    return f, torch.zeros(k, dtype=f64)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_never_above_the_exact_least_norm(seed):
    f, x = _random_composition(seed)
    sd = gw.subdifferential(f, x)
    assert sd.exact
    element = sd.min_norm_element()
    exact = float(_flat(element).norm())
    gen = torch.Generator().manual_seed(seed)
    for w in (element, (torch.randn(x.shape, generator=gen, dtype=f64),)):
        bound = lower_bound(f, (x,), True, w)
        assert bound is not None
        assert bound <= exact + 1e-9


def _tied_max_layer(n: int = 40, m: int = 30, seed: int = 0):
    """f(W1, W2) = sum(max(x W1, x W2)) + c . W1 at W1 == W2 on integer data: every one of the n*m outputs ties.
    Its subdifferential is exactly {(x^T L + c, x^T (1 - L)) : L in [0, 1]^(n x m)} (a sum of maxima of linear
    functions), so the least norm is a box-constrained least squares in L."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (n, 5), generator=gen).to(f64)
    w = torch.randn(5, m, generator=gen, dtype=f64)
    c = torch.randn(5, m, generator=gen, dtype=f64)

    def f(w1, w2):
        return torch.maximum(x @ w1, x @ w2).sum() + (c * w1).sum()

    # the least norm: min over L in [0, 1] of |x^T L + c|^2 + |x^T (1 - L)|^2, linear least squares in vec(L)
    eye = np.eye(m)
    xt = x.numpy().T
    a = np.vstack([np.kron(xt, eye), -np.kron(xt, eye)])  # rows: vec(x^T L) and vec(-x^T L), row-major
    rhs = np.concatenate([-c.numpy().reshape(-1), -(xt @ np.ones((n, m))).reshape(-1)])
    res = lsq_linear(a, rhs, bounds=(0, 1), method="bvls")
    least = float(np.linalg.norm(a @ res.x - rhs))
    return f, (w, w.clone()), least


def test_thousands_of_ties_proved_not_stationary_below_the_true_least_norm():
    f, params, least = _tied_max_layer()
    cert = gw.stationarity(f, params, samples=8)
    assert sum(k.count for k in cert.kinks) == 40 * 30
    assert not cert.exact and cert.stationary is False
    assert 1e-6 < cert.lower_bound <= least + 1e-9 <= cert.min_norm + 1e-9


def test_refinement_tightens_the_bound_to_decide_a_larger_tolerance():
    """With atol between the first bound (along the least-norm point of the 8 random pieces' bounding box) and the
    true least norm, the Frank-Wolfe pieces (generalized gradients along -w) move w toward the true least-norm
    point until the bound decides; the pieces found are genuine, so the least norm found stays above the true
    one."""
    f, params, least = _tied_max_layer()
    first = gw.stationarity(f, params, samples=8)
    atol = (first.lower_bound + least) / 2
    assert first.lower_bound < atol
    cert = gw.stationarity(f, params, samples=8, atol=atol)
    assert cert.stationary is False
    assert atol < cert.lower_bound <= least + 1e-9 <= cert.min_norm + 1e-9
    assert len(cert.subdifferential.elements) > len(first.subdifferential.elements)


def test_last_layer_max_pool_ties_bounded_by_nearby_gradients():
    """A 1x1 convolution, batch norm (eval), relu and 2x2 max-pool on blocky integer images (every window ties, the
    pool last: no input is used after the ties): proved not stationary, and the bound is below the gradients at
    nearby points (limits of which are in the subdifferential)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 1), torch.nn.BatchNorm2d(4)).double().eval()
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    img = torch.randint(0, 3, (2, 1, 4, 4)).double().repeat_interleave(2, -1).repeat_interleave(2, -2)
    names = [n for n, _ in net.named_parameters()]

    def f(*ps):
        y = torch.func.functional_call(net, dict(zip(names, ps, strict=True)), (img,))
        return torch.nn.functional.max_pool2d(torch.relu(y + 0.5), 2).sum()

    params = tuple(p.detach() for p in net.parameters())
    cert = gw.stationarity(f, params, samples=8)
    assert sum(k.count for k in cert.kinks) > 12 and not cert.exact
    assert cert.stationary is False and cert.lower_bound > 1e-6
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        near = [(p + 1e-8 * torch.randn(p.shape, generator=gen, dtype=f64)).requires_grad_() for p in params]
        g = torch.autograd.grad(f(*near), near)
        assert cert.lower_bound <= float(_flat(g).norm()) + 1e-6


def test_loose_or_absent_never_false():
    """relu(y) - relu(-y) is y: with y = x + flip(x) (each element reads two input elements) the intervals of the
    two relus (each [0, 1] wide) do not know they move together: the bound is 0 and sampling decides nothing. An
    op without an interval rule at its kink (median at a tie) and a view read after an in-place write to its base
    give no bound at all."""
    x = torch.zeros(4, dtype=f64)
    ones = (torch.ones(4, dtype=f64),)

    def mixed(x):
        y = x + x.flip(0)
        return (torch.relu(y) - torch.relu(-y)).sum()

    assert lower_bound(mixed, (x,), True, ones) == 0.0
    cert = gw.stationarity(mixed, torch.zeros(20, dtype=f64))
    assert cert.stationary is None
    x = torch.zeros(3, dtype=f64)
    ones = (torch.ones(3, dtype=f64),)
    assert lower_bound(lambda x: (x.median() + x).sum(), (x,), True, ones) is None

    def stale(x):  # a view taken before an in-place write: its interval is stale
        y = x * 2
        v = y[:2]
        y.relu_()
        return v.sum()

    assert lower_bound(stale, (x,), True, ones) is None


def test_in_place_ops_bound_as_their_out_of_place_forms():
    """nn.ReLU(inplace=True) and a residual ``out += identity`` (resnets): the same bound as written out of place."""
    x = torch.zeros(3, dtype=f64)
    w = (torch.tensor([1.0, 2.0, -0.5], dtype=f64),)

    def in_place(x):
        y = torch.maximum(x, 2 * x)
        y.relu_()
        y += x
        return y.mul_(3).sum()

    def out_of_place(x):
        return ((torch.maximum(x, 2 * x).relu() + x) * 3).sum()

    bound = lower_bound(in_place, (x,), True, w)
    assert bound is not None and bound > 0
    assert bound == lower_bound(out_of_place, (x,), True, w)


@pytest.mark.parametrize("f", [
    lambda a: torch.maximum(a, 2 * a).sum(),  # each coordinate's pieces are independent of the others'
    lambda a: (a.abs() + 3 * a).sum(),
])
def test_tight_where_the_pieces_are_independent(f):
    """Where every tie is its own coordinate's, the box of intervals is the subdifferential itself: the bound along
    the least-norm element equals the least norm of the enumerated pieces."""
    x = torch.zeros(3, dtype=f64)
    sd = gw.subdifferential(f, x)
    assert sd.exact
    element = sd.min_norm_element()
    assert lower_bound(f, (x,), True, element) == pytest.approx(float(_flat(element).norm()), rel=1e-12)


def _graph_size(t: torch.Tensor) -> int:
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions)
    return len(seen)


def test_the_pass_records_no_autograd_graph():
    """The bound pass ran f with grad on (to see f's own no_grad parts), so autograd recorded the graph of
    everything f's modules' parameters feed (an MLP: 36 nodes and their saved activations, about twice the
    pass's peak memory), dropped unread. Grad is now off around each call f makes: no node, the same bound."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                              torch.nn.Linear(8, 1)).double()
    sizes = []

    def f(x):
        out = mlp(x).abs().sum()
        sizes.append(_graph_size(out))
        return out

    x, w = torch.randn(5, 4, dtype=f64), (torch.randn(5, 4, dtype=f64),)
    bound = lower_bound(f, (x,), True, w)
    assert sizes == [0]
    assert torch.is_grad_enabled()
    g = torch.autograd.grad(f(x.requires_grad_(True)), x)[0]  # no tie: the bound is |g . w| / |w|
    assert bound == pytest.approx(abs(float((g * w[0]).sum())) / float(w[0].norm()), rel=1e-9)


def test_no_grad_parts_stay_constants_without_a_graph():
    """With grad off around each call, f's own no_grad block (here a module's forward) is still told apart per
    op: a constant, as for autograd, while the same module outside it moves. Along w = 1 at 0, |x|_1 spans
    [-3, 3] and 0.5 lin(x) adds 4.5: the bound is 1.5 / sqrt(3) (the no_grad part moving would make it 10.5 /
    sqrt(3), the live part held fixed 0)."""
    lin = torch.nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.fill_(3.0)
    x, ones = torch.zeros(3, dtype=f64), (torch.ones(3, dtype=f64),)

    def f(x):
        with torch.no_grad():
            c = lin(x).sum()
        return x.abs().sum() + c + 0.5 * lin(x).sum()

    bound = lower_bound(f, (x,), True, ones)
    assert bound == lower_bound(lambda x: x.abs().sum() + 0.5 * lin(x).sum(), (x,), True, ones)
    assert bound == pytest.approx(1.5 / 3**0.5, rel=1e-12)


class _Double(torch.autograd.Function):
    """2x, with its derivative given by its own jvp/backward."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g

    @staticmethod
    def jvp(ctx, t):
        return 2 * t


def test_a_custom_function_proves_nothing():
    """PyTorch runs a custom autograd.Function's forward with grad off, so the bound took its ops for f's no_grad
    part (a constant): for Double(x) - 2x + relu(x), which is relu(x) with its minimum 0 at 0, it 'proved' a least
    norm of sqrt(n) and stationarity said False. Its derivative is its own (jvp/backward): no bound now."""
    f = lambda x: (_Double.apply(x) - 2 * x + torch.relu(x)).sum()
    x = torch.zeros(40, dtype=f64)
    assert lower_bound(f, (x,), True, (torch.ones(40, dtype=f64),)) is None
    assert gw.stationarity(f, x).stationary is not False
    assert gw.stationarity(lambda x: torch.relu(x).sum(), x).stationary is not False


class _DoubleSetup(_Double):
    """2x with a separate ``setup_context``: its forward takes no ctx."""

    @staticmethod
    def forward(x):
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass


class _DoubleAmp(_Double):
    """2x with its forward behind ``torch.amp.custom_fwd`` (a wrapper: the class's forward is not its body)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x):
        return 2 * x


def _double_defined_late():
    """A Function class made after a bound pass has already run (its forward must still be found)."""
    lower_bound(lambda x: x.abs().sum(), (torch.zeros(2, dtype=f64),), True, (torch.ones(2, dtype=f64),))
    return type("Late", (torch.autograd.Function,), {"forward": staticmethod(lambda ctx, x: 2 * x),
                                                      "backward": staticmethod(lambda ctx, g: 2 * g),
                                                      "jvp": staticmethod(lambda ctx, t: 2 * t)})


@pytest.mark.parametrize("function", [_DoubleSetup, _DoubleAmp, "late"], ids=["setup_context", "custom_fwd", "late"])
def test_every_kind_of_custom_function_proves_nothing(function):
    """From torch 2.14 ``Function.apply`` is a builtin: no frame of it marks a custom forward (the import
    crashed reading its ``__func__``). The forward's own frame marks it now, whatever its form: a forward with
    ``setup_context``, one behind a decorator, a class defined after the first bound. Each is Double(x) - 2x +
    relu(x), relu(x) with its minimum 0 at 0: never a positive bound."""
    function = _double_defined_late() if function == "late" else function
    f = lambda x: (function.apply(x) - 2 * x + torch.relu(x)).sum()
    x = torch.zeros(40, dtype=f64)
    assert lower_bound(f, (x,), True, (torch.ones(40, dtype=f64),)) is None
    assert gw.stationarity(f, x).stationary is not False
