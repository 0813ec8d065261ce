"""Exact or refuse, wherever f is called from: hooks, compile, checkpoints, TorchScript, export, torch.func,
custom Functions and custom ops (issue #14, point 1).

References are independent of gradwise: float64 one-sided differences for directional derivatives, gradients at
random differentiable points next to x (their hull is the subdifferential) for generalized gradients. A context
either gives what the plain function gives (same seed, same branches) or raises NonsmoothError.
"""
from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradwise as gw
from gradwise._nonsmooth import NonsmoothError

sys.path.insert(0, str(Path(__file__).parent))
from test_nonsmooth import _T, flat, hull_distance, nearby_gradients, one_sided

# TorchScript is deprecated in 2.13 (it warns on use); these tests use it on purpose
pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit.*:DeprecationWarning")

ident = lambda x: torch.relu(x) - torch.relu(-x)  # the identity, with two kinks at 0 that cancel
ZERO = torch.tensor(0.0, dtype=torch.float64)


class Fn(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x)


class Ident(nn.Module):
    def forward(self, x):
        return torch.relu(x) - torch.relu(-x)


class IdentityWithJvp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g

    @staticmethod
    def jvp(ctx, t):
        return t.clone()


class IdentityNoJvp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g


@torch.library.custom_op("gradwise_test::scale2", mutates_args=())
def scale2(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def _hooked(f):
    def g(x):
        h = x * 1.0
        if h.requires_grad:  # the usual guard: the program takes another path without gradients
            h.register_hook(lambda grad: grad)
        return f(h)
    return g


def _full_backward_hook(f):
    m = Fn(f)
    m.register_full_backward_hook(lambda mod, gi, go: None)
    m.register_full_backward_pre_hook(lambda mod, go: None)
    m.register_forward_hook(lambda mod, i, o: None)
    m.register_forward_pre_hook(lambda mod, i: None)
    return m


def _called(m):
    return lambda y: m(y)  # one code object for every call: later calls carry tangents (gradwise's memo per code)


def _after_a_tie(m):
    return lambda y: m(ident(y))  # the hooked module's input comes out of ties (the identity: f's own answer)


def _traced(f, like):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(Fn(f), like + 0.37, check_trace=False)


def _exported(f, like):
    return torch.export.export(Fn(f), (like + 0.37,)).module()


def _saved_copies(f):
    def g(x):  # the graph keeps copies of what it saves (as offloading and compression hooks do)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            return f(x)
    return g


# context -> (wrapper of f given an example input, whether it may refuse instead of answering)
CONTEXTS = {
    "tensor_hook": (lambda f, x: _hooked(f), False),
    "module_hooks": (lambda f, x: _full_backward_hook(f), False),
    "module_hooks_called": (lambda f, x: _called(_full_backward_hook(f)), False),
    "module_hooks_after_a_tie": (lambda f, x: _after_a_tie(_full_backward_hook(f)), False),
    "compile_eager": (lambda f, x: torch.compile(f, backend="eager"), False),
    "compile_inductor": (lambda f, x: torch.compile(f), False),
    "compile_aot_eager": (lambda f, x: torch.compile(f, backend="aot_eager"), False),
    "saved_tensors_hooks": (lambda f, x: _saved_copies(f), False),
    "checkpoint_reentrant": (lambda f, x: lambda y: checkpoint(f, y, use_reentrant=True), False),
    "checkpoint": (lambda f, x: lambda y: checkpoint(f, y, use_reentrant=False), False),
    "export": (lambda f, x: _exported(f, x), False),
    "function_with_jvp": (lambda f, x: lambda y: f(IdentityWithJvp.apply(y)), False),
    "jit_trace": (_traced, True),
    "jit_script": (lambda f, x: torch.jit.script(Ident()) if f is ident else _traced(f, x), True),
    "function_without_jvp": (lambda f, x: lambda y: f(IdentityNoJvp.apply(y)), True),
    "custom_op_without_forward_ad": (lambda f, x: lambda y: f(scale2(y) / 2), True),
    "vmap": (lambda f, x: lambda y: torch.func.vmap(f)(y.unsqueeze(0)).squeeze(0), True),
    "func_grad": (lambda f, x: lambda y: torch.func.grad_and_value(f)(y)[1], True),
}


@pytest.mark.parametrize("name", sorted(CONTEXTS))
def test_identity_written_with_relus(name):
    """relu(x) - relu(-x) is the identity: its only generalized gradient at 0 is 1, f'(0; -1) = -1, and 0 is not
    stationary. Every context gives exactly that or refuses."""
    wrap, may_refuse = CONTEXTS[name]
    f = wrap(ident, ZERO)
    try:
        g = gw.generalized_grad(f, ZERO, seed=0)
        dd = gw.directional_derivative(f, ZERO, -torch.ones_like(ZERO))
        cert = gw.stationarity(f, ZERO)
    except NonsmoothError as e:
        assert may_refuse, f"{name} refused: {e}"
        assert "called" in str(e) or "at" in str(e)
        return
    assert float(g[0]) == 1.0
    assert float(dd) == -1.0
    assert cert.stationary is False and cert.min_norm == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["jit_trace", "jit_script", "function_without_jvp", "custom_op_without_forward_ad",
                                  "vmap", "func_grad"])
def test_refusals_name_the_way_out(name):
    wrap, _ = CONTEXTS[name]
    with pytest.raises(NonsmoothError, match=r"Call the|Define its|Register one|Call the function"):
        gw.generalized_grad(wrap(ident, ZERO), ZERO, seed=0)


def test_opaque_code_away_from_kinks_is_pytorchs():
    """TorchScript is refused only at a kink: elsewhere its ops are PyTorch's own and exact."""
    f = CONTEXTS["jit_trace"][0](ident, ZERO)
    x = torch.tensor(0.5, dtype=torch.float64)
    assert float(gw.generalized_grad(f, x)[0]) == 1.0
    assert float(gw.directional_derivative(f, x, torch.tensor(-2.0, dtype=torch.float64))) == -2.0


@pytest.mark.parametrize("decimals", [0, 1])
def test_opaque_round_jumps_at_halves_not_at_its_values(decimals):
    """round (half to even) is flat at the numbers it rounds to and jumps halfway between them: in TorchScript
    a call at a half is refused (it used to give round's 0 silently), a call at a whole number is exact."""
    f = _traced(lambda x: torch.round(x, decimals=decimals) + x, torch.tensor(0.0, dtype=torch.float64))
    scale = 10.0**-decimals
    at_value, at_half = torch.tensor(2.0 * scale, dtype=torch.float64), torch.tensor(2.5 * scale, dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    assert float(gw.directional_derivative(f, at_value, one)) == 1.0
    with pytest.raises(NonsmoothError, match=r"aten\.round"):
        gw.directional_derivative(f, at_half, one)


# (f, a point where no call is at its kink though values repeat, a point at a kink): the kink facts are per window,
# slice or running extreme, not "two equal values anywhere"
OPAQUE_TIES = {
    "max_pool2d": (lambda x: F.max_pool2d(x.view(1, 1, 2, 4), 2).sum(), _T(1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0),
                   _T(1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)),
    "sort_rows": (lambda x: torch.sort(x.view(2, 2), 1).values[:, 0].sum() * 1, _T(1.0, 2.0, 1.0, 3.0),
                  _T(1.0, 1.0, 2.0, 3.0)),
    "cummax": (lambda x: torch.cummax(x, 0).values.sum(), _T(0.0, 2.0, 0.0), _T(2.0, 0.0, 2.0)),
    "hardswish": (lambda x: F.hardswish(x).sum(), _T(2.0, 2.0), _T(3.0, 2.0)),
}


@pytest.mark.parametrize("name", sorted(OPAQUE_TIES))
def test_opaque_code_is_refused_exactly_at_its_kinks(name):
    """In TorchScript a call is refused where it sits at its kink, and only there (repeated values elsewhere are
    PyTorch's own exact derivative)."""
    f, repeated, tied = OPAQUE_TIES[name]
    g = _traced(f, repeated)
    d = torch.linspace(-1.0, 1.0, repeated.numel(), dtype=torch.float64)
    assert float(gw.directional_derivative(g, repeated, d)) == pytest.approx(one_sided(f, [repeated], [d]), abs=1e-5)
    with pytest.raises(NonsmoothError, match=r"runs at its kink .* in code that gradwise cannot see"):
        gw.directional_derivative(g, tied, d)


# Forward-mode formulas of these ops compare x with their own result (``x == x.max()``: a tie by construction)
SMOOTH_REDUCTIONS = {
    "max": lambda x: x.max() * 1,
    "min": lambda x: x.min() * 1,
    "amax": lambda x: x.view(2, 3).amax(1).sum() * 1,
    "median": lambda x: x.median() * 1,
    "inf_norm": lambda x: torch.linalg.vector_norm(x, float("inf")) * 1,
}


@pytest.mark.parametrize("name", sorted(SMOOTH_REDUCTIONS))
def test_opaque_reductions_at_smooth_points_are_exact(name):
    """A comparison that only feeds a tangent (an op's forward-mode formula) is no kink of f: at a point where the
    reduction picks one element, TorchScript's derivative is PyTorch's exact one (it was refused as 'aten.eq at its
    kink'); where it picks a tie it is still refused."""
    f = SMOOTH_REDUCTIONS[name]
    x = _T(0.3, -2.0, 1.2, 2.5, -0.7, 0.1)
    g = _traced(f, x)
    d = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64)
    assert float(gw.directional_derivative(g, x, d)) == pytest.approx(one_sided(f, [x], [d]), abs=1e-5)
    assert torch.equal(gw.generalized_grad(g, x)[0], gw.generalized_grad(f, x)[0])
    assert gw.stationarity(g, x).stationary is False
    tied = _T(-2.0, 0.3, 0.3, 2.5, -2.0, 2.5)  # the extremes tie (in each row too) and so do the middle two
    with pytest.raises(NonsmoothError, match=r"runs at its kink .* in code that gradwise cannot see"):
        gw.directional_derivative(g, tied, d)


def test_an_opaque_kink_counts_where_f_uses_it():
    """An unseen kink op refuses the call when f's value depends on it, through Python code after the TorchScript
    call and through an in-place write into a view; one whose result f drops does not."""
    x = _T(0.0, -2.0, 1.0)
    both = _traced(lambda v: (torch.relu(v), v * 3), x)
    d = torch.ones(3, dtype=torch.float64)
    assert float(gw.directional_derivative(lambda v: both(v)[1].sum(), x, d)) == 9.0
    with pytest.raises(NonsmoothError, match=r"aten\.relu"):
        gw.directional_derivative(lambda v: (both(v)[0] * 2).sum(), x, d)

    def written(v):
        buf = torch.zeros(2, 3, dtype=v.dtype)
        row = buf[0]
        buf[0].copy_(both(v)[0])  # the kink reaches row through the storage they share
        return (row * v).sum()
    with pytest.raises(NonsmoothError, match=r"aten\.relu"):
        gw.directional_derivative(written, x, d)
    with pytest.raises(NonsmoothError, match=r"aten\.relu"):  # read by Python: followed no further, so it counts
        gw.directional_derivative(lambda v: v.sum() * 2 if both(v)[0][2] > 0.5 else v.sum(), x, d)


def test_gradwise_inside_a_transform_is_refused():
    with pytest.raises(NonsmoothError, match=r"inside a torch\.func transform"):
        torch.func.vmap(lambda y: gw.generalized_grad(ident, y)[0])(torch.zeros(2))


def test_reverse_pass_inside_f_after_a_kink_is_refused():
    f = lambda x: torch.autograd.functional.jacobian(lambda y: ident(y) ** 2 / 2, x, create_graph=True)
    with pytest.raises(NonsmoothError, match="reverse pass"):
        gw.generalized_grad(f, ZERO)
    with pytest.raises(NonsmoothError, match="reverse pass"):
        gw.generalized_grad(lambda x: torch.autograd.grad(torch.relu(x), x, create_graph=True)[0] * x, ZERO)


# --- property: random compositions of kink ops, in every context ---------------------------------------------

W = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
UNARY = [torch.relu, torch.abs, lambda v: torch.clamp(v, -1.0, 1.0), lambda v: F.leaky_relu(v, 0.1),
         lambda v: v - v.flip(0) * 0.5, lambda v: 2 * v - 1, lambda v: torch.sort(v).values,
         lambda v: torch.maximum(v, v.flip(0)), lambda v: torch.minimum(v, v.roll(1)), lambda v: v * W,
         lambda v: torch.where(v > v.roll(1), v, v.roll(1)) - torch.where(v >= 0, v, 0.5 * v)]
FINAL = [lambda v: v.sum(), lambda v: v.amax(), lambda v: v @ W, lambda v: torch.topk(v, 2).values @ W[:2],
         lambda v: F.max_pool1d(v.reshape(1, 1, 3), 2, 1).sum()]


def composition(ops: list[int], final: int):
    def f(x):
        v = x
        for i in ops:
            v = UNARY[i](v)
        return FINAL[final](v)
    return f


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, len(UNARY) - 1), min_size=1, max_size=4), st.integers(0, len(FINAL) - 1),
       st.lists(st.integers(-1, 1), min_size=3, max_size=3), st.integers(0, 2**16))
def test_contexts_agree_with_the_plain_function(ops, final, xv, seed):
    """For random compositions at integer points (kinks and ties everywhere), every context's generalized
    gradient is the plain function's (an element of the subdifferential: checked against nearby gradients) and its
    directional derivative the one-sided difference; or the context raises NonsmoothError."""
    f = composition(ops, final)
    x = torch.tensor(xv, dtype=torch.float64)
    d = torch.linspace(-1.0, 0.7, 3, dtype=torch.float64)
    (plain,) = gw.generalized_grad(f, x, seed=seed)
    assert hull_distance(flat([plain]), nearby_gradients(f, [x], n=150)) < 1e-5
    ref_dd = one_sided(f, [x], [d])
    for name, (wrap, may_refuse) in CONTEXTS.items():
        try:
            g = gw.generalized_grad(wrap(f, x), x, seed=seed)
            dd = gw.directional_derivative(wrap(f, x), x, d)
        except NonsmoothError:
            assert may_refuse, name
            continue
        torch.testing.assert_close(g[0], plain, msg=name)
        assert float(dd) == pytest.approx(ref_dd, abs=1e-5), name


def test_export_graph_of_a_pooling_net_is_exact():
    """An exported module calls aten overloads directly (max_pool2d, relu): they reach the rules."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 1))
    x = torch.randint(0, 3, (1, 1, 4, 4)).double()
    net = net.double()
    plain = lambda y: net(y).sum()
    exported = torch.export.export(Fn(plain), (x,)).module()
    g0 = gw.generalized_grad(plain, x, seed=1)
    g1 = gw.generalized_grad(exported, x, seed=1)
    torch.testing.assert_close(g1, g0)
    assert hull_distance(flat(g0), nearby_gradients(plain, [x], n=100)) < 1e-5


def test_saved_tensor_hooks_that_copy_keep_the_locked_branch():
    """A generalized gradient writes each tie's ranked branch into the index or mask the first pass's backward reads;
    saved_tensors_hooks whose pack copies (offloading, compression) made the graph keep the provisional copy:
    relu(x) - relu(-x) got 2.0 at 0 and max(x, -x) + min(x, -x) (which is 0) got 2.0 (seed 0), silently; a
    max-pool window took PyTorch's first index. The rules' own ops save their tensors without the hooks now."""
    f = _saved_copies(lambda x: torch.maximum(x, -x) + torch.sort(torch.stack([x, -x])).values[0])
    pool = lambda v: F.max_pool1d(v.abs().reshape(1, 1, 3), 2, 1).sum()
    x3 = torch.zeros(3, dtype=torch.float64)
    for seed in range(3):
        assert float(gw.generalized_grad(_saved_copies(ident), ZERO, seed=seed)[0]) == 1.0
        assert float(gw.generalized_grad(f, ZERO, seed=seed)[0]) == 0.0
        assert torch.equal(gw.generalized_grad(_saved_copies(pool), x3, seed=seed)[0],
                           gw.generalized_grad(pool, x3, seed=seed)[0])


@pytest.mark.parametrize("outer", ["no_grad", "inference_mode"])
def test_an_outer_no_grad_is_ignored_as_by_torch_func(outer):
    """Called inside torch.no_grad() (an eval loop) every entry point crashed ('element 0 of tensors does not
    require grad'; inference_mode: 'Inference tensors do not track version counter'). An outer grad mode is
    ignored as torch.func.grad ignores it; inputs made in inference mode are refused with the way out."""
    x = ZERO.clone()
    with getattr(torch, outer)():
        assert float(gw.generalized_grad(ident, x, seed=0)[0]) == 1.0
        assert float(gw.directional_derivative(ident, x, -torch.ones_like(x))) == -1.0
        assert gw.stationarity(ident, x).stationary is False
        assert [float(e[0]) for e in gw.subdifferential(ident, x).elements] == [1.0]
        assert gw.gradcheck(lambda v: v.abs(), x)
        if outer == "inference_mode":
            with pytest.raises(TypeError, match="made in inference mode"):
                gw.generalized_grad(ident, torch.zeros(()))


@pytest.mark.parametrize("name", ["module_hooks", "function_with_jvp"])
def test_a_comparison_behind_code_that_runs_with_tangents_only(name):
    """A comparison tie takes one pass with tangents that drops them after the tangent-free pass's last tie, found
    by counting calls. A full backward hook's wrapper (its jvp: a view) and a custom Function's jvp run only with
    tangents: the count shifted, the comparison lost its tangent and took PyTorch's tie value. ident(where(v > 0,
    v, 2 v)) at 0 got the gradient 0 (slopes 1 and 2 only), silently. The pass now follows the tangent-free
    pass's calls or keeps every tangent; the hook's view is not counted."""
    f = lambda v: ident(torch.where(v > 0, v, 2 * v)).sum()
    x = torch.zeros(2, dtype=torch.float64)
    near = nearby_gradients(f, [x], n=100)
    for seed in range(3):
        g = gw.generalized_grad(CONTEXTS[name][0](f, x), x, seed=seed)
        torch.testing.assert_close(g, gw.generalized_grad(f, x, seed=seed))
        assert hull_distance(flat(g), near) < 1e-9


def test_reentrant_checkpoint_at_a_comparison_tie_warns_nothing():
    """At a comparison tie gradwise checks f's plain value for a jump; that call ran outside its passes, so a
    reentrant checkpoint saw inputs without requires_grad and PyTorch warned 'None of the inputs have
    requires_grad=True' on every call (an error under pytest's warnings-as-errors). It runs plainly now."""
    f = lambda v: (torch.where(v > v.roll(1), v, v.roll(1)) - torch.where(v >= 0, v, 0.5 * v)).sum()
    x = torch.zeros(3, dtype=torch.float64)
    wrapped = CONTEXTS["checkpoint_reentrant"][0](f, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(gw.generalized_grad(wrapped, x, seed=0), gw.generalized_grad(f, x, seed=0))
        d = torch.ones(3, dtype=torch.float64)
        assert float(gw.directional_derivative(wrapped, x, d)) == pytest.approx(one_sided(f, [x], [d]), abs=1e-6)


@pytest.mark.filterwarnings("ignore:index_reduce\\(\\) is in beta:UserWarning")
@pytest.mark.parametrize("name", ["relu6", "softshrink", "remainder", "scatter_reduce", "index_reduce"])
def test_exported_kink_ops_reach_their_rules(name):
    """An exported graph calls aten overloads; relu6 (MobileNets), softshrink, remainder/fmod and the scatter
    max/min reductions had rules for their Python calls only and were refused at every tie there. Now their aten
    schema reaches the same rule: the plain function's answer."""
    w = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    index = torch.tensor([0, 1, 0, 1])
    f = {"relu6": lambda v: (F.relu6(v * 6) * w).sum(),
         "softshrink": lambda v: (F.softshrink(v, 1.0) * w).sum(),
         "remainder": lambda v: (torch.remainder(v, 1.0) + torch.floor(v)).sum() + (torch.fmod(v, 0.3) * w).sum(),
         "scatter_reduce": lambda v: (v.new_zeros(2).scatter_reduce(0, index, v, "amax", include_self=False)
                                      * w[:2]).sum(),
         "index_reduce": lambda v: (v.new_zeros(2).index_reduce(0, index, v, "amin", include_self=False)
                                    * w[:2]).sum()}[name]
    x = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    exported = _exported(f, x)
    near = nearby_gradients(f, [x], n=150)
    for seed in range(3):
        g = gw.generalized_grad(exported, x, seed=seed)
        torch.testing.assert_close(g, gw.generalized_grad(f, x, seed=seed))
        assert hull_distance(flat(g), near) < 1e-6
    d = torch.linspace(-1.0, 0.7, 4, dtype=torch.float64)
    assert float(gw.directional_derivative(exported, x, d)) == pytest.approx(one_sided(f, [x], [d]), abs=1e-5)


def test_many_calls_with_hooks_stay_exact():
    """The second and later calls on the same code carry tangents in their first pass (a memo per code object):
    a hook that changes the path must not break them either."""
    f = _hooked(ident)
    for _ in range(3):
        assert float(gw.generalized_grad(f, ZERO, seed=0)[0]) == 1.0
    assert math.isfinite(float(gw.generalized_grad(f, ZERO + 1.0, seed=0)[0]))
    assert np.isfinite(float(gw.directional_derivative(f, ZERO, ZERO + 1.0)))


def _pooling_net(hooked: int | None, pre: bool) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 3, padding=1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)).double()
    if hooked is not None:
        if pre:
            net[hooked].register_full_backward_pre_hook(lambda mod, go: None)
        else:
            net[hooked].register_full_backward_hook(lambda mod, gi, go: None)
    return net


@pytest.mark.parametrize("pre", [False, True])
@pytest.mark.parametrize("hooked", [1, 2, 3])
def test_module_full_backward_hooks_after_ties_on_repeated_calls(hooked, pre):
    """A later call of the same code carries tangents up to its previous call's last tie and strips them after.
    Every call the mode saw past that point got the stripped primal, a new view with a node of its own: a full
    backward hook on a module whose input came out of ties read that view's grad_fn and PyTorch raised "Error
    while setting up backward hooks" from the second call on (a conv/relu/max-pool net on blocky images). Calls
    on the tensor object (attribute reads, hook registration) now see the tensor f holds: hooks that return None
    leave the generalized gradient bitwise the unhooked net's, call after call, in the subdifferential."""
    x = F.interpolate(torch.randint(0, 3, (2, 2, 2, 2), generator=torch.Generator().manual_seed(13)).double(),
                      scale_factor=4, mode="nearest")  # blocky: relu and max-pool ties everywhere
    loss = lambda net: gw.generalized_grad(lambda *p: net(x).logsumexp(1).sum(), tuple(net.parameters()), seed=14)
    plain = loss(_pooling_net(None, pre))
    for _ in range(3):  # fresh nets, the same code: the second call on carries tangents
        got = loss(_pooling_net(hooked, pre))
        assert all(torch.equal(a, b) for a, b in zip(got, plain, strict=True))
    net = _pooling_net(hooked, pre)
    names = [n for n, _ in net.named_parameters()]
    f = lambda *p: torch.func.functional_call(net, dict(zip(names, p, strict=True)), (x,)).logsumexp(1).sum()
    ps = [p.detach() for p in net.parameters()]
    assert hull_distance(flat(plain), nearby_gradients(f, ps, n=30)) < 1e-5
    ds = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype) for i, p in enumerate(ps)]
    for _ in range(2):
        assert float(gw.directional_derivative(f, tuple(ps), tuple(ds))) == pytest.approx(one_sided(f, ps, ds),
                                                                                          abs=1e-5)


def test_tensor_hooks_registered_after_ties_act_on_every_call():
    """A hook that scales the gradient, registered on a tensor out of a tie: from the second call on (tangents
    stripped after the previous call's last tie) it went on the stripped primal's view, which the backward never
    reaches, and was dropped: the gradient of relu(x) * x came out 2 x instead of PyTorch's 4 x, silently, even at
    points without ties. Every call now agrees with PyTorch's gradients next to x."""
    def f(x):
        y = torch.relu(x)
        y.register_hook(lambda g: 3 * g)
        return (y * x).sum()
    for x in (_T(0.0, 1.0, 2.0), _T(0.5, 1.0, 2.0), _T(0.0, -1.0, 2.0)):
        near = nearby_gradients(f, [x], n=40)
        for _ in range(3):
            assert hull_distance(flat(gw.generalized_grad(f, x, seed=0)), near) < 1e-5


def test_attribute_reads_after_ties_see_the_tensor_f_holds():
    """Past the last tie a tensor's grad_fn, _base and _is_view() were read off a new view of its primal (a node
    no backward reaches, one per read); they are the tensor's own now, as in a plain run."""
    seen = []

    def f(x):
        y = torch.relu(x) * 2
        z = torch.relu(x)  # the last tie: its result carries the tangent past it
        seen.append((z.grad_fn is z.grad_fn, z._is_view() == (z._base is not None)))
        node = z.grad_fn
        z.register_hook(lambda g: g)
        return (y + z).sum() if node is z.grad_fn else x.sum() * 0
    x = _T(0.0, 1.0)
    near = nearby_gradients(f, [x], n=20)
    for _ in range(3):
        assert hull_distance(flat(gw.generalized_grad(f, x, seed=0)), near) < 1e-6
    assert all(a and b for a, b in seen)


# --- inputs and options (point 2) ------------------------------------------------------------------------------

ABS = lambda x: x.abs().sum()
X2 = torch.zeros(2, dtype=torch.float64)
BAD_OPTIONS = {
    "atol_negative": (lambda: gw.stationarity(ABS, X2, atol=-1), r"atol=-1 is out of range: valid range is \[0"),
    "atol_nan": (lambda: gw.stationarity(ABS, X2, atol=math.nan), r"atol=nan: must be a finite real number"),
    "samples_negative": (lambda: gw.subdifferential(ABS, X2, samples=-1), r"samples=-1 is out of range"),
    "samples_zero": (lambda: gw.stationarity(ABS, X2, samples=0), r"samples=0 is out of range: valid range is \[1"),
    "samples_float": (lambda: gw.subdifferential(ABS, X2, samples=2.5), r"samples=2.5: must be an integer"),
    "tie_tol_negative": (lambda: gw.subdifferential(ABS, X2, tie_tol=-1), r"tie_tol=-1 is out of range"),
    "tie_tol_inf": (lambda: gw.stationarity(ABS, X2, tie_tol=math.inf), r"tie_tol=inf: must be a finite"),
    "near_tol_negative": (lambda: gw.stationarity(ABS, X2, near_tol=-1e-3), r"near_tol=-0.001 is out of range"),
    "seed_negative": (lambda: gw.generalized_grad(ABS, X2, seed=-3), r"seed=-3 is out of range"),
    "seed_float": (lambda: gw.generalized_backward(ABS, [X2], seed=0.5), r"seed=0.5: must be an integer"),
    "eps_zero": (lambda: gw.gradcheck(ABS, X2, eps=0), r"eps=0 is out of range: valid range is \(0"),
    "gradcheck_atol": (lambda: gw.gradcheck(ABS, X2, atol=-1), r"atol=-1 is out of range"),
    "nearby_negative": (lambda: gw.gradcheck(ABS, X2, nearby=-1), r"nearby=-1 is out of range"),
    "nearby_radius_inf": (lambda: gw.gradcheck(ABS, X2, nearby_radius=math.inf), r"nearby_radius=inf: must be"),
    "kinks_hit_tie_tol": (lambda: gw._nonsmooth._engine.kinks_hit(ABS, X2, tie_tol=math.nan), r"tie_tol=nan"),
}


@pytest.mark.parametrize("name", sorted(BAD_OPTIONS))
def test_options_out_of_range_are_refused(name):
    call, match = BAD_OPTIONS[name]
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("api", ["generalized_grad", "directional_derivative", "subdifferential", "stationarity",
                                 "gradcheck"])
@pytest.mark.parametrize("bad", ["nan", "inf", "sparse", "meta", "complex"])
def test_bad_inputs_are_refused(api, bad):
    x = {"nan": torch.tensor([math.nan, 0.0], dtype=torch.float64),
         "inf": torch.tensor([0.0, -math.inf], dtype=torch.float64),
         "sparse": X2.to_sparse(), "meta": torch.zeros(2, device="meta"),
         "complex": torch.zeros(2, dtype=torch.complex128)}[bad]
    call = {"generalized_grad": lambda: gw.generalized_grad(ABS, x),
            "directional_derivative": lambda: gw.directional_derivative(ABS, x, torch.ones(2, dtype=x.dtype)),
            "subdifferential": lambda: gw.subdifferential(ABS, x), "stationarity": lambda: gw.stationarity(ABS, x),
            "gradcheck": lambda: gw.gradcheck(ABS, x)}[api]
    match = {"nan": "1 NaN/Inf value", "inf": "1 NaN/Inf value", "sparse": "dense", "meta": "meta tensor",
             "complex": "real floating dtype"}[bad]
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_directions_as_nested_sequences():
    """Directions may be given as (nested) sequences of numbers shaped like the inputs."""
    f = lambda a, b: (a - b).abs().sum()
    x = (X2, X2.clone())
    assert float(gw.directional_derivative(f, x, ((1, 0), (0, -2)))) == 3.0
    assert float(gw.directional_derivative(ABS, X2, [-1.0, 0.5])) == 1.5
    with pytest.raises(ValueError, match="a direction must be finite"):
        gw.directional_derivative(ABS, X2, (math.nan, 0.0))
    with pytest.raises(TypeError, match="shape"):
        gw.directional_derivative(ABS, X2, (1.0, 0.0, 0.0))


# --- speed-related rules must stay exact ------------------------------------------------------------------------


@pytest.mark.parametrize("xv", [[-1.0, 0.0, -2.0], [-1.0, 2.0, -1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0],
                                [0.0, -1.0, -3.0], [2.0, 0.0, 2.0], [-1.0, -2.0, -3.0]])
def test_maximum_of_relu_dead_elements_is_no_kink(xv):
    """maximum(h, h.flip(0)) with h = relu(.): ties between two relu-dead elements are locally constant (no kink,
    not ranked); ties touching relu's own kink or live values are ranked. Both agree with nearby gradients."""
    f = lambda v: (torch.maximum(torch.relu(v), torch.relu(v).flip(0)) * W).sum()
    x = torch.tensor(xv, dtype=torch.float64)
    g = gw.generalized_grad(f, x, seed=0)
    assert hull_distance(flat(g), nearby_gradients(f, [x], n=200)) < 1e-6
    for d in (torch.tensor([1.0, -0.5, 0.25]), torch.tensor([-1.0, 0.3, 2.0])):
        d = d.double()
        assert float(gw.directional_derivative(f, x, d)) == pytest.approx(one_sided(f, [x], [d]), abs=1e-5)
    dead = [i for i in range(3) if xv[i] < 0 and xv[2 - i] < 0]
    kinks = gw._nonsmooth._engine.kinks_hit(f, x)[0]
    if dead and all(v != 0 for v in xv) and xv[0] != xv[2]:
        assert not kinks


def test_sort_candidates_are_the_tied_groups():
    """Ties of sort/topk in large rows: the ranked order follows the tangents within each tied group only."""
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 1.0, 3.0]], dtype=torch.float64)
    d = torch.tensor([[0.5, -1.0, 2.0, 7.0, 1.0, -3.0]], dtype=torch.float64)
    f = lambda v: torch.sort(v, dim=1, descending=True).values @ torch.arange(6.0, 0.0, -1.0, dtype=v.dtype)
    assert float(gw.directional_derivative(f, x, d)) == pytest.approx(one_sided(f, [x], [d]), abs=1e-5)
    g = lambda v: torch.topk(v, 2, dim=1).values.sum()
    assert float(gw.directional_derivative(g, x, d)) == pytest.approx(one_sided(g, [x], [d]), abs=1e-5)


# --- kink rules: scatter_reduce / index_reduce with amax / amin (point 3) ----------------------------------------

SCATTER_INDEX = torch.tensor([0, 0, 1, 2, 2, 2])


@pytest.mark.filterwarnings("ignore:index_reduce\\(\\) is in beta:UserWarning")
@pytest.mark.parametrize("op", ["scatter_reduce", "index_reduce"])
@pytest.mark.parametrize("reduce", ["amax", "amin"])
@pytest.mark.parametrize("include_self", [True, False])
def test_scatter_max_min_reductions(op, reduce, include_self):
    """Ties between scattered elements and the destination's own value: the one-sided derivative along random
    directions equals float64 one-sided differences; the generalized gradient lies in the hull of nearby gradients
    (PyTorch splits the gradient among ties: not a generalized gradient in general)."""
    w = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    if op == "scatter_reduce":
        f = lambda s, d: (torch.scatter_reduce(d, 0, SCATTER_INDEX, s, reduce, include_self=include_self) * w).sum()
    else:
        f = lambda s, d: (d.index_reduce(0, SCATTER_INDEX, s, reduce, include_self=include_self) * w).sum()
    sign = 1.0 if reduce == "amax" else -1.0
    s = sign * torch.tensor([1.0, 1.0, 2.0, 0.0, 3.0, 3.0], dtype=torch.float64)
    d = sign * torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        dirs = (torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64))
        assert float(gw.directional_derivative(f, (s, d), dirs)) == pytest.approx(
            one_sided(f, [s, d], list(dirs)), abs=1e-5)
    g = gw.generalized_grad(f, (s, d), seed=1)
    assert hull_distance(flat(g), nearby_gradients(f, [s, d], n=300)) < 1e-6
    assert gw.stationarity(f, (s, d)).exact


@pytest.mark.filterwarnings("ignore:index_reduce\\(\\) is in beta:UserWarning")
@pytest.mark.parametrize("op", ["scatter_reduce_", "index_reduce_"])
def test_scatter_max_in_place_with_a_tie_in_one_destination(op):
    """scatter_reduce_ / index_reduce_ with amax, one destination tied and one not: the rule ran PyTorch's
    out-of-place op on the destination (which saves it for its backward) and then wrote the result into it, so
    generalized_grad and stationarity crashed ('modified by an inplace operation'). Now exact as the out-of-place
    form: in the hull of nearby gradients, the same answer."""
    index = torch.tensor([0, 1, 0, 1, 1, 0])
    w = torch.tensor([1.0, -2.0], dtype=torch.float64)
    if op == "scatter_reduce_":
        f = lambda s: (torch.zeros(2, dtype=s.dtype).scatter_reduce_(0, index, s, "amax") * w).sum()
        plain = lambda s: (torch.zeros(2, dtype=s.dtype).scatter_reduce(0, index, s, "amax") * w).sum()
    else:
        f = lambda s: (torch.zeros(2, dtype=s.dtype).index_reduce_(0, index, s, "amax") * w).sum()
        plain = lambda s: (torch.zeros(2, dtype=s.dtype).index_reduce(0, index, s, "amax") * w).sum()
    s = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 2.0], dtype=torch.float64)  # destination 0 tied, 1 not
    for seed in range(3):
        g = gw.generalized_grad(f, s, seed=seed)
        torch.testing.assert_close(g, gw.generalized_grad(plain, s, seed=seed))
        assert hull_distance(flat(g), nearby_gradients(plain, [s], n=200)) < 1e-6
    assert gw.stationarity(f, s).stationary is False


@pytest.mark.parametrize("layout", ["offsets", "2d", "last_offset"])
def test_embedding_bag_max(layout):
    """embedding_bag(mode='max') with tied rows in a column: exact one-sided derivatives (PyTorch has no forward
    mode for it) and a generalized gradient in the hull of nearby gradients."""
    w = torch.tensor([[1.0, 2.0], [1.0, 0.0], [3.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    c = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    kw = {"offsets": dict(input=torch.tensor([0, 1, 2, 3]), offsets=torch.tensor([0, 2])),
          "2d": dict(input=torch.tensor([[0, 1], [2, 3]])),
          "last_offset": dict(input=torch.tensor([0, 1, 2, 1]), offsets=torch.tensor([0, 3, 4]),
                              include_last_offset=True)}[layout]
    f = lambda v: (F.embedding_bag(weight=v, mode="max", **kw) * c).sum()
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        d = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        assert float(gw.directional_derivative(f, w, d)) == pytest.approx(one_sided(f, [w], [d]), abs=1e-5)
    assert hull_distance(flat(gw.generalized_grad(f, w, seed=0)), nearby_gradients(f, [w], n=300)) < 1e-6


# ------------------------------------------------------------------------------------------------ threads


def test_a_pass_is_per_thread():
    """The checkpoint and hook switches act in the thread inside a pass only: a plain checkpoint in another
    thread stays PyTorch's (the patches were process-wide). Passes in two threads take turns (forward-mode
    AD has one dual level per process), and the patches are gone when the last one ends."""
    import threading

    import torch.utils.checkpoint as torch_checkpoint

    from gradwise._nonsmooth import _contexts

    original = torch_checkpoint.CheckpointFunction

    def node(use_reentrant: bool) -> str:
        x = torch.ones(2, requires_grad=True)
        return type(checkpoint(torch.sin, x, use_reentrant=use_reentrant).grad_fn).__name__

    inside, release, entered, seen = threading.Event(), threading.Event(), threading.Event(), {}

    def first() -> None:
        with _contexts.pass_context():
            inside.set()
            release.wait(30)
            seen["first"] = node(True)

    def second() -> None:
        with _contexts.pass_context():
            entered.set()
            seen["second"] = node(True)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert inside.wait(30)
    here = node(True)
    threads[1].start()
    waited = not entered.wait(0.5)  # the second pass waits for the first
    release.set()
    for t in threads:
        t.join(30)
    assert here == "CheckpointFunctionBackward"  # PyTorch's checkpoint outside a pass
    assert waited and entered.is_set()
    assert seen["first"] == seen["second"] == "SinBackward0"  # plain inside a pass
    assert torch_checkpoint.CheckpointFunction is original


def test_generalized_grads_in_two_threads_at_once():
    """Two threads taking generalized gradients through checkpoints and module hooks: each exact."""
    from concurrent.futures import ThreadPoolExecutor

    def ident(x):
        return torch.relu(x) - torch.relu(-x)

    def run(use_reentrant: bool) -> list[float]:
        return [float(gw.generalized_grad(lambda y: checkpoint(ident, y, use_reentrant=use_reentrant).sum(),
                                          torch.zeros(3))[0].sum()) for _ in range(10)]

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, [True, False]))
    assert all(v == 3.0 for r in results for v in r)


def test_torch_func_inside_f_refuses_directional_derivatives_too():
    """torch.func.grad / jacrev inside f hide the direction's tangent (its level sits inside the transform): a kink
    op there is refused for directional_derivative as for generalized_grad (it returned PyTorch's convention:
    -4 where the one-sided difference of 2 sum|x| is -2; 0 at the jump of sum sign(x))."""
    from torch.func import grad, jacrev

    x = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    d = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    for f in (lambda x: grad(lambda z: (z * z.abs()).sum())(x).sum(), lambda x: jacrev(torch.relu)(x).sum()):
        with pytest.raises(gw.NonsmoothError, match=r"torch\.func"):
            gw.directional_derivative(f, x, d)
    # a transform over a constant, beside a kink of x: nothing refused, PyTorch's gradient away from the kink
    f = lambda x: torch.relu(x).sum() + torch.func.vmap(torch.exp)(torch.zeros(3, 1)).sum()
    assert torch.equal(gw.generalized_grad(f, x + 3, seed=0)[0], torch.ones(3, dtype=torch.float64))


def test_out_arguments_and_nested_forward_ad_are_refused_clearly():
    """out= on a kink op, and forward-mode AD of f's own (torch.func.jvp), get a NonsmoothError naming the way
    out (a TypeError from gradwise's rule call, and PyTorch's bare nesting error, before)."""
    x = torch.tensor([0.5, -1.0], dtype=torch.float64)
    d = torch.ones(2, dtype=torch.float64)

    def with_out(x):
        o = torch.empty_like(x)
        torch.abs(x, out=o)
        return o.sum()

    with pytest.raises(gw.NonsmoothError, match="out="):
        gw.directional_derivative(with_out, x, d)
    jvp = lambda x: torch.func.jvp(torch.sin, (x,), (torch.ones_like(x),))[1].sum()
    with pytest.raises(gw.NonsmoothError, match="forward-mode AD of its own"):
        gw.directional_derivative(jvp, x, d)


def test_opaque_fmod_where_its_quotient_rounds_is_refused():
    """fmod(1, y) at float 0.1: 1 / 0.1 rounds to 10, the real quotient is 9.99... (float 0.1 is above 0.1), so the
    slope in y is -9 (float64 one-sided differences), no kink near. gradwise's rule gives -9; PyTorch's backward
    takes trunc of the rounded quotient, -10, and inside TorchScript gradwise returned that (silent). It refuses
    there now, and answers PyTorch's exact slope where the quotient does not round."""
    f = lambda y: torch.fmod(torch.ones(()), y) * 1
    y = torch.tensor(0.1)
    ref = one_sided(f, [y.double()], [torch.ones((), dtype=torch.float64)], h=1e-12)
    assert ref == pytest.approx(-9.0, abs=1e-3)
    assert float(gw.generalized_grad(f, y)[0]) == pytest.approx(ref, abs=1e-3)
    g = _traced(f, y)
    with pytest.raises(NonsmoothError, match=r"aten.fmod runs at its kink .* in code that gradwise cannot see"):
        gw.generalized_grad(g, y)
    away = torch.tensor(0.3)
    assert float(gw.generalized_grad(g, away)[0]) == pytest.approx(
        one_sided(f, [away.double()], [torch.ones((), dtype=torch.float64)], h=1e-12), abs=1e-3)


def test_a_reverse_pass_inside_f_on_repeated_calls():
    """f takes a gradient inside (torch.autograd.grad with create_graph, as a gradient penalty does). A call of
    the same code after a tied call carries tangents and strips them past the last tie: the inner reverse pass was
    handed a stripped tensor in no graph (PyTorch's 'not used in the graph' from inside gradwise), then replayed on
    disconnected copies. Now every call equals PyTorch's gradient away from kinks, and a pass that builds no graph
    (directional_derivative) refuses with NonsmoothError instead of PyTorch's 'does not require grad'."""
    cube = [False]

    def f(x):
        y = torch.relu(x)
        if cube[0]:
            (g,) = torch.autograd.grad((y**3).sum(), y, create_graph=True)
            return (g * x).sum()
        return (y * x).sum()

    tied = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    smooth = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    gw.generalized_grad(f, tied, seed=0)  # ties: the next call of f's code carries tangents
    cube[0] = True
    x = smooth.clone().requires_grad_()
    f(x).backward()
    for _ in range(3):
        assert torch.equal(gw.generalized_grad(f, smooth, seed=0)[0], x.grad)
    with pytest.raises(NonsmoothError, match="reverse pass"):
        gw.directional_derivative(f, smooth, torch.ones(3, dtype=torch.float64))
