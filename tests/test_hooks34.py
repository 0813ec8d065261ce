"""Session 34 (hooks34): ``Tensor.register_hook`` as gradwise wraps it (``_strong_zeros._hooks``) costs nothing past a
note of the tensor's hooks dict outside a strong-zero pass; the user's hook is wrapped only for the length of a pass.
References are independent of gradwise: the same program with the padding rows deleted, and PyTorch's own
``register_hook`` (``_hooks._ORIGINAL``) for the bits on finite data.
"""

from __future__ import annotations

import sys
import threading

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)
from gradwise._strong_zeros import _hooks
from test_review_sz33 import _padded_data as _padded  # (x, x with NaN padding rows 3:, w0)

D = torch.float64


def _numpy_double(g):
    return torch.from_numpy(g.numpy() * 2)


# -- outside a pass, the tensor's hooks are the user's alone: sz33 registered two hooks of gradwise's around each one
# (~10 us a call against 2.6 us, +18% on a step hooking every activation, with gradwise merely imported) --------------
def test_outside_a_pass_a_tensor_holds_the_users_hook_alone():
    x = torch.arange(3.0, requires_grad=True)
    y = x * 2
    handle = y.register_hook(_numpy_double)
    assert list(y._backward_hooks.values()) == [_numpy_double]
    y.sum().backward()
    assert x.grad.tolist() == [4.0, 4.0, 4.0]
    handle.remove()
    assert not y._backward_hooks


def test_after_a_strong_pass_the_users_hook_is_given_back_as_registered():
    x = torch.arange(4.0, dtype=D, requires_grad=True)
    y = x * 2
    y.register_hook(_numpy_double)
    seen = []
    y.register_hook(seen.append)  # (a builtin: no module, no frame)
    with gw.strong_zeros():
        y[:2].sum().backward()
    assert list(y._backward_hooks.values()) == [_numpy_double, seen.append]
    assert x.grad.tolist() == [4.0, 4.0, 0.0, 0.0] and len(seen) == 1


# -- a hook's handle removes everything gradwise added, at any time ------------------------------------------------
def test_a_handle_removed_during_a_pass_leaves_nothing_of_gradwises():
    x = torch.arange(4.0, dtype=D, requires_grad=True)
    y = x * 2
    z = y * 3
    handles = []
    calls = []

    def removes_the_other(g):  # runs first (z is above y), while the pass is open: y's hook is wrapped then
        handles[0].remove()
        calls.append("z")

    handles.append(y.register_hook(lambda g: calls.append("y")))
    z.register_hook(removes_the_other)
    with gw.strong_zeros():
        z[:2].sum().backward()
    assert calls == ["z"]  # (y's hook was removed before its turn, as PyTorch does)
    assert not y._backward_hooks
    assert x.grad.tolist() == [6.0, 6.0, 0.0, 0.0]


def test_a_handle_removed_after_a_pass_leaves_nothing_of_gradwises():
    x = torch.arange(4.0, dtype=D, requires_grad=True)
    y = x * 2
    with y.register_hook(_numpy_double):
        with gw.strong_zeros():
            y[:2].sum().backward(retain_graph=True)
    assert not y._backward_hooks
    x.grad = None
    y[:2].sum().backward()
    assert x.grad.tolist() == [2.0, 2.0, 0.0, 0.0]


# -- soundness where the hook is registered outside the block (a model hooked at construction, trained in a block) -----
def _hooked_program(x, w0, rows=3):
    w = w0.clone().requires_grad_()
    h = x @ w
    h.register_hook(_numpy_double)
    return w, h[:rows].tanh().sum()


def test_a_hook_registered_outside_the_block_and_run_inside_keeps_the_paddings_zeros():
    x, xn, w0 = _padded()
    w, loss = _hooked_program(xn, w0)  # (registered with no block open)
    with gw.strong_zeros():
        loss.backward()
    rw, rloss = _hooked_program(x[:3], w0)
    rloss.backward()
    torch.testing.assert_close(w.grad, rw.grad, rtol=0, atol=1e-12)


def test_a_hook_registered_during_the_pass_by_a_reentrant_checkpoint_keeps_the_paddings_zeros():
    """The checkpoint's recomputation registers the hook while the pass is open (its nested backward is seeded with
    the pass's structural zeros and runs under the same mode): it is wrapped as it is registered."""
    x, xn, w0 = _padded()

    def run(x, checkpointed):
        w = w0.clone().requires_grad_()

        def block(x):
            h = x @ w
            if h.requires_grad:  # (the recomputation, not the first forward: that one runs without grad)
                h.register_hook(_numpy_double)
            return h.tanh()

        out = checkpoint(block, x, use_reentrant=True) if checkpointed else block(x)
        out[:3].sum().backward()
        return w.grad

    with gw.strong_zeros():
        got = run(xn.requires_grad_(), True)
    torch.testing.assert_close(got, run(x[:3], False), rtol=0, atol=1e-12)


def test_a_hook_no_structural_zero_reaches_keeps_pytorchs_bits_and_nan():
    """The hooked tensor is below no slice: the plan need not run the pass under the mode for the hook (it is given
    no structural zero); the genuine NaN of x's last row stays, and finite data gives PyTorch's bits."""
    x, xn, w0 = _padded()

    def run(x, register):
        w = w0.clone().requires_grad_()
        h = x @ w
        register(h, _numpy_double)
        h.tanh().sum().backward()
        return w.grad

    for data in (x, xn):
        with gw.strong_zeros():
            got = run(data, torch.Tensor.register_hook)
        ref = run(data, _hooks._ORIGINAL)
        assert torch.equal(got.isnan(), ref.isnan())
        assert torch.equal(got.nan_to_num(), ref.nan_to_num())


def test_a_hook_run_in_a_plain_thread_while_another_runs_a_pass_is_its_own():
    """While one thread's pass is open, every user's hook is wrapped; another thread's plain backward calls it
    through the wrapper, which passes straight to the hook there (no mode on that thread)."""
    x, _, w0 = _padded()
    entered, release = threading.Event(), threading.Event()
    got = {}

    def holds_the_pass_open(g):
        entered.set()
        release.wait(30)

    def strong():
        a = torch.ones(3, dtype=D, requires_grad=True)
        b = a * 2
        b.register_hook(holds_the_pass_open)
        with gw.strong_zeros():
            b[:2].sum().backward()

    t = threading.Thread(target=strong)
    t.start()
    try:
        assert entered.wait(30)
        w, loss = _hooked_program(x, w0, rows=5)
        loss.backward()
        got["w"] = w.grad
    finally:
        release.set()
        t.join(30)
    rw = w0.clone().requires_grad_()
    h = x @ rw
    _hooks._ORIGINAL(h, _numpy_double)
    h.tanh().sum().backward()
    assert torch.equal(got["w"], rw.grad)


@pytest.mark.parametrize("inside", [False, True], ids=["outside", "in strong_zeros"])
def test_a_hooks_type_error_names_the_users_hook(inside):
    x = torch.ones(3, requires_grad=True)
    y = x * 2

    def to_double(g):
        return g.double()

    y.register_hook(to_double)
    with pytest.raises(RuntimeError, match="hook 'to_double' has changed the type of value"):
        if inside:
            with gw.strong_zeros():
                y[:2].sum().backward()
        else:
            y[:2].sum().backward()


@pytest.mark.parametrize("where", ["strong_zeros", "process wide"])
def test_gradcheck_with_its_batched_check_through_a_hooked_tensor(where):
    """gradcheck's batched check seeds the backward with a legacy vmap BatchedTensor (8ef9253): the wrapped hook is
    given it during the pass and passes it straight to the user's hook."""
    from gradwise._strong_zeros import strong_zeros_process_wide

    def f(x):
        y = x * 2
        y.register_hook(lambda g: None if g is None else g * 1.0)  # (gradcheck gives it None too)
        return y[:2].sin()

    x = torch.randn(4, dtype=D, requires_grad=True)
    with gw.strong_zeros() if where == "strong_zeros" else strong_zeros_process_wide():
        assert torch.autograd.gradcheck(f, (x,), check_batched_grad=True)


def test_the_plan_of_a_hooked_graph_runs_under_the_mode_whether_or_not_zeros_reach_the_hook():
    """A hook's torch ops are followed by the rules wherever zeros come from (its own where's 0 is structural:
    test_review_hooks34), so a graph holding a user's hook takes 'check' with or without a slice's zeros reaching it;
    the same graph without the hook is 'plain'."""
    from gradwise._strong_zeros._engine import _choose

    x, _, w0 = _padded()
    w = w0.clone().requires_grad_()
    h = x @ w
    h.register_hook(_numpy_double)
    below = (h @ w0.T).tanh()  # (w0.T: 4 x 3)
    assert _choose([below.sum()], (), ()) == "check"
    assert _choose([below[:3].sum()], (), ()) == "check"  # (the slice's zeros reach h)
    unhooked = (x @ w0.clone().requires_grad_()) @ w0.T
    assert _choose([unhooked.tanh().sum()], (), ()) == "plain"


def test_gradwise_holds_no_hook_and_no_dict_past_its_graph():
    """HOOKED notes a dict weakly: a hooked graph freed frees its hooks (and what they hold), after a pass too."""
    import gc
    import weakref

    class Hook:
        def __call__(self, g):
            return g * 2

    refs = []
    for block in (False, True):
        x = torch.arange(4.0, dtype=D, requires_grad=True)
        y = x * 2
        hook = Hook()
        y.register_hook(hook)
        refs += [weakref.ref(hook), weakref.ref(y._backward_hooks)]
        if block:
            with gw.strong_zeros():
                y[:2].sum().backward()
        else:
            y[:2].sum().backward()
        del y, hook
    gc.collect()
    assert all(r() is None for r in refs)


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")  # (dynamo's)
@pytest.mark.parametrize("whole", [False, True], ids=["eager and compiled", "compiled only"])
def test_a_hook_that_makes_nan_from_zeros_made_inside_a_compiled_function_is_followed(whole):
    """The zeros come from a slice inside a torch.compile'd function, which the plan's zero reach does not see
    into: a graph with such a node and a user's hook still runs under the mode (g / g.norm at a dropped row: 0/0)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 3, dtype=D, generator=gen)
    w0 = torch.randn(3, 4, dtype=D, generator=gen)
    v = torch.randn(4, 2, dtype=D, generator=gen)
    first = torch.compile(lambda x, w: x @ w, backend="aot_eager", fullgraph=True)
    below = torch.compile(lambda h, kept: torch.tanh(h @ v)[:kept].sum(), backend="aot_eager", fullgraph=True)

    def w_grad(x, strong, kept=3):
        w = w0.clone().requires_grad_()
        h = first(x, w) if whole else x @ w
        h.register_hook(lambda g: g / g.norm(dim=-1, keepdim=True))
        loss = below(h, kept)
        if strong:
            with gw.strong_zeros():
                loss.backward()
        else:
            loss.backward()
        return w.grad

    assert bool(w_grad(x, strong=False).isnan().all()), "premise: the hook's 0/0"
    torch.testing.assert_close(w_grad(x, strong=True), w_grad(x[:3], strong=False), rtol=1e-12, atol=1e-12)


def test_a_finite_step_beside_a_live_hooked_tensor_raises_nothing_inside_gradwise():
    """A user's hook alive elsewhere (another model's tensor) makes the plan look up the hooked nodes on every
    backward; ``any`` over a generator there closed it unfinished, a GeneratorExit raised inside gradwise per
    backward (test_watch's no-error test failed after the hooks tests in CI)."""
    keep = torch.ones(2, requires_grad=True) * 2
    keep.register_hook(lambda g: g)
    lin = torch.nn.Linear(4, 4)
    raised = []

    def tracer(frame, event, arg):
        if event == "exception" and "gradwise" in frame.f_code.co_filename:
            raised.append((frame.f_code.co_name, arg[0].__name__))
        return tracer

    x = torch.randn(3, 4)
    with gw.strong_zeros():
        lin(x).sum().backward()  # (the graph's shape planned once: test_watch's finite step, warm)
        loss = lin(x).sum()
        sys.settrace(tracer)
        try:
            loss.backward()
        finally:
            sys.settrace(None)
    assert not raised, raised
