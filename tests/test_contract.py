"""PyTorch's autograd contract under strong zeros (issue 13): every root cause found by running PyTorch's own
test_autograd.py under ``gw.strong_zeros()`` (../shared/peer) gets a test here; the peer files are too slow for CI.

Each test compares against plain torch.autograd on the same program (the reference), never a hand-derived value.

Intended differences from plain PyTorch under ``gw.strong_zeros()`` (the peer suite lists them as failures):
- A ``PlainBackwardWarning`` (once per process and reason) where a backward runs as plain PyTorch because
  strong zeros cannot read or follow its tensors: torch.func transforms that differentiate a backward (hessian,
  nested grad, jvp over a backward), complex, sparse,
  mkldnn, nested tensors, tensor subclasses with their own ``__torch_dispatch__``. A test that asserts that
  no warning at all is raised sees it (only the first such backward of a process).
- Where a NaN/Inf meets a structural zero, the gradient is the strong-zero one (that is the point of gradwise):
  a test asserting PyTorch's contaminated NaN differs.
- Backwards that run under the strong-zero dispatch mode (NaN data, or graphs with custom Functions/rare ops)
  go through Python dispatch, which holds extra references to intermediate gradients: the engine's zero-copy
  reuse of a *sparse* gradient buffer for ``.grad`` (a use-count check) may copy instead. Values are equal;
  test_autograd's ``test_no_grad_copy_sparse`` checks the buffer's ``data_ptr`` and fails.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from typing import ClassVar

import pytest
import torch
from torch.autograd import Function

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)
from _nested import checkpointed, grad_of, sin_exp_sin

nan = float("nan")


def _contaminated(x: torch.Tensor) -> torch.Tensor:
    """sqrt of a negative entry that where() discards: plain PyTorch gives NaN there, strong zeros 0. (The clamp's
    bound -2 is away from the entries: at its bound torch 2.14 passes no gradient, 2.13 passes it.)"""
    return torch.where(x > 0, x.clamp_min(-2).sqrt(), 0.0).sum()


class _Double(Function):
    """A custom Function: gradwise knows nothing about its backward (the graph takes the one-pass strong path)."""

    keep_graph: ClassVar[list[bool]] = []

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 2

    @staticmethod
    def backward(ctx, g):
        _Double.keep_graph.append(torch._C._autograd._get_current_graph_task_keep_graph())
        (x,) = ctx.saved_tensors
        return g * 2 + 0 * x


# ---------------------------------------------------------------------------------------------------------
# 1. Transforms and batched gradients: strong zeros hold where the pass can follow them (one pass under the mode,
#    no plan: _strong_zeros/_transforms.py), plain PyTorch with one warning where not; never an internal error
# ---------------------------------------------------------------------------------------------------------

_TRANSFORMS = {
    "func.grad": lambda x: torch.func.grad(lambda v: v.sin().sum())(x),
    "func.vjp": lambda x: torch.func.vjp(torch.sin, x)[1](torch.ones_like(x))[0],
    "vmap(grad)": lambda x: torch.func.vmap(torch.func.grad(lambda v: v.sin().sum()))(x.reshape(2, 2)),
    "jacrev": lambda x: torch.func.jacrev(torch.sin)(x),
    "is_grads_batched": lambda x: torch.autograd.grad(x.sin(), x, torch.eye(4, dtype=x.dtype),
                                                      is_grads_batched=True)[0],
    "jacobian(vectorize)": lambda x: torch.autograd.functional.jacobian(torch.sin, x, vectorize=True),
    "hessian(vectorize)": lambda x: torch.autograd.functional.hessian(lambda v: v.sin().sum(), x, vectorize=True),
}

# a transform that differentiates the backward's own formulas (the pass's annihilation runs below it)
_UNFOLLOWED = {
    "func.hessian": lambda x: torch.func.hessian(lambda v: v.sin().sum())(x),
    "grad(grad)": lambda x: torch.func.grad(lambda v: torch.func.grad(lambda w: w.sin().sum())(v).sum())(x),
}


@pytest.mark.parametrize("name", list(_TRANSFORMS))
def test_transforms_hold_strong_zeros_with_pytorchs_bits(name):
    """Finite data: PyTorch's gradient bit for bit, and no warning."""
    call = _TRANSFORMS[name]
    x = torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    expected = call(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gw.strong_zeros():
            got = call(x)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", list(_UNFOLLOWED))
def test_unfollowed_transforms_run_plain_with_one_warning(name):
    call = _UNFOLLOWED[name]
    x = torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    expected = call(x)
    with pytest.warns(gw.PlainBackwardWarning, match="ran as plain PyTorch") as record, gw.strong_zeros():
        first = call(x)
        second = call(x)  # once per process and reason
    assert len(record) == 1
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_transform_warning_is_a_gradwise_warning_and_filterable():
    x = torch.ones(3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", gw.GradwiseWarning)
        with gw.strong_zeros():
            torch.func.hessian(lambda v: v.sin().sum())(x)


def test_gradcheck_batched_check_under_strong_zeros():
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gw.strong_zeros():
            assert torch.autograd.gradcheck(torch.sin, (x,), check_batched_grad=True)
            assert torch.autograd.gradgradcheck(torch.sin, (x,), check_batched_grad=True)


def test_gw_grad_is_grads_batched_matches_torch():
    x = torch.tensor([1.0, 4.0, 9.0], requires_grad=True)
    seeds = torch.eye(3)
    expected = torch.autograd.grad(x.sqrt(), x, seeds, is_grads_batched=True)
    got = gw.grad(x.sqrt(), x, seeds, is_grads_batched=True)
    assert torch.equal(got[0], expected[0])


def test_transform_result_is_the_strong_one():
    """Under torch.func.grad the contaminated NaN is gone: the gradient is gw.grad's in eager mode."""
    x = torch.tensor([-1.0, 4.0])
    assert bool(torch.func.grad(_contaminated)(x).isnan().any())  # PyTorch's
    with gw.strong_zeros():
        got = torch.func.grad(_contaminated)(x)
    xx = x.clone().requires_grad_()
    assert torch.equal(got, gw.grad(_contaminated(xx), xx)[0]) and bool(got.isfinite().all())


def test_unfollowed_transform_keeps_pytorchs_nan_intended():
    """Under a hessian, strong zeros cannot run: the NaN PyTorch computes stays (and the warning says so)."""
    x = torch.tensor([-1.0, 4.0])
    expected = torch.func.hessian(_contaminated)(x)
    with pytest.warns(gw.PlainBackwardWarning), gw.strong_zeros():
        got = torch.func.hessian(_contaminated)(x)
    assert torch.equal(got.isnan(), expected.isnan()) and bool(got.isnan().any())


# ---------------------------------------------------------------------------------------------------------
# 2. retain_graph / create_graph exactly PyTorch's
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("program", ["finite", "custom_function", "contaminated"])
def test_grad_in_two_steps_through_an_intermediate(program):
    """grad(out, tmp) then grad(tmp, x, g) works as in plain PyTorch: only the part that ran is released."""
    def build(x):
        tmp = _Double.apply(x) if program == "custom_function" else x * 3
        if program == "contaminated":
            return tmp, _contaminated(tmp - 1.5)
        return tmp, (tmp.sin() * tmp).sum()

    x = torch.tensor([-1.0, 0.5, 2.0], requires_grad=True)
    tmp, out = build(x)
    (g,) = torch.autograd.grad(out, tmp)
    (expected,) = torch.autograd.grad(tmp, x, g)
    tmp, out = build(x)
    with gw.strong_zeros():
        (g_sz,) = torch.autograd.grad(out, tmp)
        (got,) = torch.autograd.grad(tmp, x, g_sz)
        with pytest.raises(RuntimeError, match="second time"):  # the part that ran is released, as in plain
            torch.autograd.grad(out, tmp)
    if program == "contaminated":
        assert bool(expected.isnan().any()) and bool(got.isfinite().all())
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("path", ["backward", "gw.backward", "gw.grad"])
@pytest.mark.parametrize("nan_input", [False, True])
def test_retain_graph_seen_inside_backward_is_what_was_asked(path, nan_input):
    x = torch.tensor([1.0, nan if nan_input else 2.0], requires_grad=True)
    for retain in (True, False):
        _Double.keep_graph.clear()
        loss = _Double.apply(x)[0]
        if path == "backward":
            with gw.strong_zeros():
                loss.backward(retain_graph=retain)
        elif path == "gw.backward":
            gw.backward(loss, retain_graph=retain)
        else:
            gw.grad(loss, x, retain_graph=retain)
        assert _Double.keep_graph == [retain]  # and the backward ran once


def test_custom_function_saved_tensors_released_as_in_plain():
    class Save(Function):
        @staticmethod
        def forward(ctx, x):
            y = x.exp()
            ctx.save_for_backward(y)
            return y.detach() * 1

        @staticmethod
        def backward(ctx, g):
            (y,) = ctx.saved_tensors
            return g * y

    def released(strong: bool) -> bool:
        x = torch.ones(3, requires_grad=True)
        out = Save.apply(x)
        ref = weakref.ref(out.grad_fn.saved_tensors[0])
        with gw.strong_zeros() if strong else torch.enable_grad():
            out.sum().backward()
        gc.collect()
        return ref() is None

    assert released(False)
    assert released(True)


def test_create_graph_double_backward_through_custom_function_matches_plain():
    class Cube(Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x ** 3

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * 3 * x ** 2

    x = torch.tensor([0.5, 2.0], requires_grad=True)
    (g,) = torch.autograd.grad(Cube.apply(x).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    with gw.strong_zeros():
        (g2,) = torch.autograd.grad(Cube.apply(x).sum(), x, create_graph=True)
        (gg2,) = torch.autograd.grad(g2.sum(), x)
    assert torch.equal(g, g2) and torch.equal(gg, gg2)


# ---------------------------------------------------------------------------------------------------------
# 2. Every argument of torch.autograd.grad/backward
# ---------------------------------------------------------------------------------------------------------

def test_gw_grad_positional_arguments_in_torchs_order():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    out = (x ** 2).sum()
    expected = torch.autograd.grad(out, x, None, True, False, True, None, False, False)
    got = gw.grad(out, x, None, True, False, True, None, False, False)
    assert torch.equal(got[0], expected[0])


def test_gw_grad_materialize_grads_and_allow_unused():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    unused = torch.ones(2, requires_grad=True)
    out = torch.where(x > 1, x.log(), 0.0).sum()
    got = gw.grad(out, (x, unused), retain_graph=True, allow_unused=True)
    assert got[1] is None
    got = gw.grad(out, (x, unused), materialize_grads=True)
    expected = torch.autograd.grad(torch.where(x > 1, x.log(), 0.0).sum(), (x, unused), materialize_grads=True)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_gw_grad_generator_and_dict_inputs():
    x = torch.tensor([-1.0, 4.0], requires_grad=True)
    w = torch.tensor([2.0, 3.0], requires_grad=True)
    got = gw.grad(_contaminated(x * w), (t for t in (x, w)))
    assert len(got) == 2 and all(bool(g.isfinite().all()) for g in got)
    got_dict = gw.grad(_contaminated(x * w), {"x": x, "w": w})
    assert list(got_dict) == ["x", "w"] and torch.equal(got_dict["x"], got[0]) and torch.equal(got_dict["w"], got[1])
    with pytest.raises(TypeError, match="must be a dict"):
        from collections import OrderedDict

        gw.grad(_contaminated(x), OrderedDict(x=x))


def test_gradient_edge_outputs_and_inputs():
    x = torch.tensor([-1.0, 2.0], requires_grad=True)

    def fn():
        tmp = (x * 2).sin()
        out = torch.where(tmp > 0, tmp.clamp_min(-1).log(), 0.0).sum()
        return out, tmp, torch.autograd.graph.get_gradient_edge(tmp)

    out, tmp, edge = fn()
    (g_ref,) = torch.autograd.grad(out, tmp)
    (x_ref,) = torch.autograd.grad(tmp, x, g_ref)
    out, _, edge = fn()
    (g,) = gw.grad(out, edge)
    (got,) = gw.grad(edge, x, g)
    assert torch.equal(g, g_ref) and torch.equal(got, x_ref)
    x.grad = None
    out, _, edge = fn()
    gw.backward(out, inputs=[x])
    assert torch.equal(x.grad, x_ref)


def test_gw_backward_positional_and_grad_variables():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    gw.backward(x * 3, torch.ones(2), False, False, None, [x])
    assert torch.equal(x.grad, torch.full((2,), 3.0))


# ---------------------------------------------------------------------------------------------------------
# 2. Tensor kinds: same result as PyTorch on every path (gw.grad, .backward under the block)
# ---------------------------------------------------------------------------------------------------------

def _kinds():
    def complex_():
        z = torch.tensor([1.0 + 1.0j, 2.0 - 0.5j], requires_grad=True)
        return z, (z * z.conj()).real.sum()

    def complex_output():
        x = torch.tensor([1.0, 2.0], requires_grad=True)
        return x, torch.polar(x, x).sum().abs()

    def sparse():
        x = torch.tensor([[0.0, 2.0], [3.0, 0.0]], requires_grad=True)
        return x, torch.sparse.sum(x.to_sparse() * 2)

    def nested():
        nt = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], requires_grad=True)
        return nt, nt.sin()

    def mkldnn():
        x = torch.randn(2, 3, requires_grad=True)
        return x, x.to_mkldnn().to_dense().sin().sum()

    kinds = {"complex": complex_, "complex_output": complex_output, "sparse": sparse, "nested": nested}
    if torch.backends.mkldnn.is_available():
        kinds["mkldnn"] = mkldnn
    return kinds


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage:UserWarning")
@pytest.mark.parametrize("kind", list(_kinds()))
def test_tensor_kinds_match_pytorch_on_every_path(kind):
    build = _kinds()[kind]
    torch.manual_seed(0)
    x, out = build()
    seed = None if out.dim() == 0 and not out.is_nested else out.detach().clone()
    (expected,) = torch.autograd.grad(out, x, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gw.PlainBackwardWarning)
        torch.manual_seed(0)
        x, out = build()
        (got_grad,) = gw.grad(out, x, seed)
        torch.manual_seed(0)
        x, out = build()
        with gw.strong_zeros():
            out.backward(seed)
    for got in (got_grad, x.grad):
        if expected.is_nested:
            assert all(torch.equal(a, b) for a, b in zip(got.unbind(), expected.unbind(), strict=True))
        else:
            assert torch.equal(got, expected)


def test_meta_tensors_run_plain_silently():
    x = torch.empty(3, device="meta", requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gw.strong_zeros():
            (x.exp() * 2).sum().backward()
        (g,) = gw.grad((x.sin() / x).sum(), x)
    assert x.grad.is_meta and g.is_meta and g.shape == x.shape


def test_zero_tensor_from_forward_ad_backward():
    """A backward whose seed is an efficient ZeroTensor (gradcheck's forward-AD paths make them)."""
    import torch.autograd.forward_ad as fwad

    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    with gw.strong_zeros():
        assert torch.autograd.gradcheck(lambda v: v.exp() * 2, (x,), check_forward_ad=True)
        with fwad.dual_level():
            dual = fwad.make_dual(x, torch.ones(2, dtype=torch.float64))
            out = fwad.unpack_dual(dual.sin()).primal
        (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(g, x.detach().cos())


def test_dispatch_subclass_runs_plain_with_a_warning():
    from torch.testing._internal.logging_tensor import LoggingTensor

    x = LoggingTensor(torch.tensor([1.0, 2.0]), requires_grad=True)
    expected = torch.autograd.grad((x * x).sum(), x)[0]
    with pytest.warns(gw.PlainBackwardWarning, match="subclass"), gw.strong_zeros():
        got = torch.autograd.grad((x * x).sum(), x)[0]
    assert torch.equal(got.elem, expected.elem)


# ---------------------------------------------------------------------------------------------------------
# Root causes found by the peer suite (test_autograd.py under strong zeros)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0.3, nan])
def test_nested_checkpoint_with_grad_inside(value):
    """A checkpoint whose function calls autograd.grad, itself checkpointed: the recomputation's backward is
    planned on its own, as in the forward (it crashed with 'a different number of tensors was saved')."""
    c, grad, f = checkpointed, grad_of, sin_exp_sin
    x = torch.tensor(value, requires_grad=True)
    for fn, ref in ((grad(c(grad(c(f)))), grad(grad(f))), (c(grad(grad(c(f)))), grad(grad(f)))):
        expected = ref(x)
        with gw.strong_zeros():
            got = fn(x)
        assert torch.equal(got.isnan(), expected.isnan())
        torch.testing.assert_close(got, expected, equal_nan=True)


def test_backward_of_an_edge_whose_saved_tensors_were_freed():
    """A second backward through a node whose saved tensors an earlier backward freed, where the node's formula
    does not need them (the plan read them and raised 'backward through the graph a second time')."""
    class Clone(Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g.clone()

    inp = torch.rand(2, requires_grad=True).clone()
    out = Clone.apply(inp)
    edge = torch.autograd.graph.get_gradient_edge(out)
    with gw.strong_zeros():
        torch.autograd.backward(edge, torch.ones(2))
        torch.autograd.backward(edge, torch.ones(2))


def test_sparse_gradient_from_a_custom_function_backward():
    """A sparse sensitivity inside the one-pass strong path is PyTorch's (the rules refused sparse tensors)."""
    def run():
        a = torch.randn(5, 3, requires_grad=True)

        class Id(Function):
            @staticmethod
            def forward(ctx, x):
                return x.clone()

            @staticmethod
            def backward(ctx, g):
                return g

        idx = torch.tensor([0, 2, 2])
        torch.nn.functional.embedding_bag(idx, Id.apply(a), torch.tensor([0]), sparse=True).sum().backward()
        return a.grad

    torch.manual_seed(0)
    expected = run()
    torch.manual_seed(0)
    with gw.strong_zeros():
        got = run()
    assert got.is_sparse and torch.equal(got.to_dense(), expected.to_dense())


def test_gradwise_modes_keep_dynamo_out_of_their_handlers():
    """gradwise's dispatch modes replace PyTorch's per-call torch._disable_dynamo wrapper by their own, cheaper
    one (gradwise._modes): inside a handler dynamo's frame callback is off, as under PyTorch's wrapper, and back
    on after it; a compiled function run under the modes gives PyTorch's result."""
    from torch._C._dynamo.eval_frame import get_eval_frame_callback

    from gradwise._modes import LeanDispatchMode
    from gradwise._nonsmooth._contexts import _OpaqueWatch
    from gradwise._nonsmooth._kink_watch import _KinkWatch
    from gradwise._strong_zeros._mode import _StrongZeroMode
    from gradwise._trace._tracer import _Tracer

    for mode in (_StrongZeroMode, _Tracer, _OpaqueWatch, _KinkWatch):
        assert issubclass(mode, LeanDispatchMode)
        assert getattr(mode.__torch_dispatch__, "_gw_lean", False)  # the lean wrapper, not PyTorch's

    seen = []

    class Probe(LeanDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(get_eval_frame_callback())
            return func(*args, **(kwargs or {}))

    x = torch.randn(3)
    for _ in range(2):  # and again after dynamo forgets what it compiled
        torch._dynamo.reset()
        compiled = torch.compile(lambda t: (t * 2).sin().sum(), backend="eager")
        want = compiled(x)
        with Probe():
            got = compiled(x)
        assert seen and all(cb is None for cb in seen)
        assert torch.equal(got, want)
