"""Review of hooks34 (``Tensor.register_hook`` noting the hooks dict, wrapped only for a strong-zero pass).
References are independent of gradwise: PyTorch's own ``register_hook`` (``_hooks._ORIGINAL``) and the same program
with the rows a hook masks deleted.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)
from gradwise._strong_zeros import _hooks
from test_review_sz33 import _padded_data as _padded  # (x, x with NaN padding rows 3:, w0)

D = torch.float64


def test_a_second_hook_on_a_view_whose_base_was_modified_in_place_goes_where_pytorch_puts_it():
    """hooks34 read ``self.grad_fn`` after registering, which regenerates a stale view's node and resets its hooks
    dict to None: ``weakref.ref(None)`` raised TypeError from gradwise's wrapper (crash). PyTorch adds the hook to
    the view's old dict, which is the one to note."""
    calls = {}
    for register in (_hooks._ORIGINAL, torch.Tensor.register_hook):
        x = torch.randn(4, 3, dtype=D, requires_grad=True)
        h = x * 2
        v = h[:2]
        register(v, lambda g: g)
        first = v._backward_hooks
        h.mul_(2)
        register(v, lambda g: g * 1)
        calls[register] = (v._backward_hooks is first, len(first))
    assert calls[torch.Tensor.register_hook] == calls[_hooks._ORIGINAL]


@pytest.mark.parametrize("loss", ["sum", "column slice"])
def test_a_hooks_own_where_zeros_do_not_depend_on_zeros_elsewhere(loss):
    """The hook zeroes the NaN rows of x's gradient with ``torch.where`` (a torch op the rules follow: under the
    mode its 0 branch is structural, as the base's 'check' path for every hooked graph gave). The reference is the
    same program with those rows deleted; a column slice (zeros reaching the hook on rows the where keeps anyway)
    must not change the answer for the rows it masks."""
    x, xn, w0 = _padded()
    keep = torch.arange(5)[:, None] < 3

    def w_grad(data, cols):
        w = w0.clone().requires_grad_()
        h = data @ w
        h.register_hook(lambda g: torch.where(keep[: len(data)], g, 0.0))
        h[:, :cols].sum().backward()
        return w.grad

    cols = 4 if loss == "sum" else 2
    with gw.strong_zeros():
        got = w_grad(xn, cols)
    torch.testing.assert_close(got, w_grad(x[:3], cols), rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")  # (dynamo's)
def test_a_hook_registered_inside_a_compiled_function_left_eager_is_the_users():
    """torch.compile with a backend that leaves the backward eager (backend='eager') registers a hook on an
    intermediate as dynamo's ``RegisterHookOp`` closure (module torch._higher_order_ops), which calls the user's
    hook's traced body: taken for torch's own, the plan went 'plain' and the hook's 0/0 at a row the slice dropped
    reached w.grad on finite data (SILENT; base too). The reference: the program with the dropped rows deleted."""
    torch._dynamo.reset()
    x, _, w0 = _padded()

    def f(x, w):
        h = x @ w
        h.register_hook(lambda g: g / g.norm(dim=-1, keepdim=True))
        return h.tanh()

    compiled = torch.compile(f, backend="eager", fullgraph=True)

    def w_grad(fn, x, rows, strong):
        w = w0.clone().requires_grad_()
        loss = fn(x, w)[:rows].sum()
        with gw.strong_zeros() if strong else contextlib.nullcontext():
            loss.backward()
        return w.grad

    assert bool(w_grad(compiled, x, 3, strong=False).isnan().all()), "premise: the hook's 0/0"
    torch.testing.assert_close(w_grad(compiled, x, 3, strong=True), w_grad(f, x[:3], 3, strong=False),
                               rtol=1e-12, atol=1e-12)
    assert torch.equal(w_grad(compiled, x, 5, strong=True), w_grad(f, x, 5, strong=False))  # (no zeros: torch's bits)


def test_a_hook_given_the_zeros_of_an_exps_underflow_is_followed():
    """``exp`` of rows pushed to -1e4 is exactly 0 there: a structural zero of its own (``_ZERO_OUTPUT_TESTS``),
    which the plan's node-type reach (``_Shaped.above``) does not hold. hooks34 planned the hooked graph 'plain', and
    the hook's g / g.norm made 0/0 of those zeros into w.grad on finite data (SILENT; the base ran every hooked graph
    under the mode). The reference: the program with those rows deleted."""
    x, _, w0 = _padded()
    shift = torch.zeros(5, 1, dtype=D)
    shift[3:] = 1e4

    def w_grad(x, shift, strong):
        w = w0.clone().requires_grad_()
        h = x @ w - shift
        h.register_hook(lambda g: g / g.norm(dim=-1, keepdim=True))
        loss = torch.exp(h).sum()
        with gw.strong_zeros() if strong else contextlib.nullcontext():
            loss.backward()
        return w.grad

    assert bool(w_grad(x, shift, strong=False).isnan().all()), "premise: the hook's 0/0"
    torch.testing.assert_close(w_grad(x, shift, strong=True), w_grad(x[:3], shift[:3], strong=False),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(w_grad(x, 0 * shift, strong=True), w_grad(x, 0 * shift, strong=False),
                               rtol=0, atol=0)  # (no exact zero: PyTorch's bits)
