"""Review (session 33) of sz33: ``Tensor.register_hook`` wrapped from gradwise's import on (``_strong_zeros._hooks``).
References are independent of gradwise: the same program with torch's own ``register_hook`` (``_hooks._ORIGINAL``
put back for the reference run), and the program with the padding rows deleted.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)
from gradwise._strong_zeros import _hooks

D = torch.float64


class _Counting(TorchFunctionMode):
    """Notes each register_hook call it is given (the hook passed), as a user's mode or a subclass would."""

    def __init__(self) -> None:
        super().__init__()
        self.hooks: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "register_hook":
            self.hooks.append(args[1])
        return func(*args, **(kwargs or {}))


class _Sub(torch.Tensor):
    hooks: ClassVar[list] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "register_hook":
            cls.hooks.append(args[1])
        return super().__torch_function__(func, types, args, kwargs)


def _triple(g):
    return g * 3


# -- a TorchFunctionMode or a tensor subclass saw three register_hook calls (gradwise's pair and the user's hook), and
# the user's hook was wrapped a second time (five hooks on the tensor): the wrapper registered the pair through the
# torch-function dispatch. Now the mode gets the one call, with the user's hook, and the pair is registered inside it.
def test_a_torch_function_mode_sees_the_users_one_register_hook_call():
    x = torch.arange(3.0, requires_grad=True)
    mode = _Counting()
    with mode:
        y = x * 2
        handle = y.register_hook(_triple)
        y.sum().backward()
    assert mode.hooks == [_triple]
    assert list(y._backward_hooks.values()) == [_triple]  # (gradwise's wrapper only during a strong pass: hooks34)
    assert x.grad.tolist() == [6.0, 6.0, 6.0]
    handle.remove()
    assert not y._backward_hooks


def test_a_tensor_subclass_sees_the_users_one_register_hook_call():
    _Sub.hooks = []
    x = torch.arange(3.0).as_subclass(_Sub).requires_grad_()
    y = x * 2
    handle = y.register_hook(_triple)
    y.sum().backward()
    assert _Sub.hooks == [_triple]
    assert list(y._backward_hooks.values()) == [_triple]
    handle.remove()
    assert not y._backward_hooks


def test_a_numpy_hook_under_a_torch_function_mode_keeps_the_paddings_zeros():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, dtype=D, generator=gen)
    w0 = torch.randn(3, 4, dtype=D, generator=gen)

    def program(x):
        w = w0.clone().requires_grad_()
        h = x @ w
        h.register_hook(lambda g: torch.from_numpy(g.numpy() * 2))
        h[:3].tanh().sum().backward()
        return w.grad

    xn = x.clone()
    xn[3:] = float("nan")
    with _Counting(), gw.strong_zeros():
        got = program(xn)
    torch.testing.assert_close(got, program(x[:3]), rtol=0, atol=1e-12)


# -- transparency: the same program with torch's own register_hook gives the same bits -----------------------------
def _save(store):
    def hook(g):
        store.append(g.clone())
    return hook


def _handles(x):
    y = x.sin()
    with y.register_hook(lambda g: g + 100):
        pass  # (removed on exit)
    h = y.register_hook(lambda g: g * 3)
    h.remove()
    h.remove()
    y.register_hook(lambda g: g * 5)
    return (y * y).sum()


def _leaf_and_retain(x):
    x.register_hook(lambda g: g * 5)
    y = x.sin()
    y.register_hook(lambda g: g * 7)
    y.retain_grad()
    return (y * y).sum()


def _in_place(x):
    y = x * 2
    y.register_hook(lambda g: g.mul_(2))
    return y.exp().sum()


def _numpy(x):
    y = x.tanh()
    y.register_hook(lambda g: torch.from_numpy(g.numpy() * 2))
    return y.sum()


def _checkpointed(x):
    def block(x):
        y = x.tanh()
        y.register_hook(lambda g: g * 3)
        return y * x
    return checkpoint(block, x, use_reentrant=False).sum()


def _module_hook(x):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3, dtype=D), torch.nn.ReLU(), torch.nn.Linear(3, 2, dtype=D))
    m[1].register_full_backward_hook(lambda mod, gi, go: (gi[0] * 2,))
    h = m(x.reshape(1, 4))
    h.register_hook(lambda g: g * 3)
    return h.sum()


def _func_grad(x):
    def f(x):
        y = x.sin()
        y.register_hook(lambda g: g * 2)
        return y.sum()
    return (torch.func.grad(f)(x) * x).sum()


PROGRAMS = {"handles (with, remove twice)": _handles, "a leaf's hook, retain_grad": _leaf_and_retain,
            "a hook in place": _in_place, "numpy": _numpy, "non-reentrant checkpoint": _checkpointed,
            "module full backward hook": _module_hook, "torch.func.grad": _func_grad}


def _run(program, block):
    x = torch.linspace(-1, 1, 4, dtype=D, requires_grad=True)
    loss = program(x)
    if block:
        with gw.strong_zeros():
            loss.backward()
    else:
        loss.backward()
    return x.grad


@pytest.mark.parametrize("block", [False, True], ids=["outside a block", "in strong_zeros"])
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_a_hooked_program_is_bitwise_torchs_own(name, block, monkeypatch):
    got = _run(PROGRAMS[name], block)
    monkeypatch.setattr(torch.Tensor, "register_hook", _hooks._ORIGINAL)
    ref = _run(PROGRAMS[name], False)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_hook_registered_in_a_compiled_function_is_torchs_own(backend, monkeypatch):
    def f(x):
        y = x.sin()
        y.register_hook(_triple)
        return (y * y).sum()

    def run():
        torch._dynamo.reset()
        x = torch.linspace(-1, 1, 5, requires_grad=True)
        torch.compile(f, backend=backend, fullgraph=True)(x).backward()
        return x.grad

    got = run()
    monkeypatch.setattr(torch.Tensor, "register_hook", _hooks._ORIGINAL)
    assert torch.equal(got, run())


def test_a_hook_error_reads_as_torchs():
    x = torch.ones(3, requires_grad=True)
    y = x * 2
    y.register_hook(lambda g: g.double())
    with pytest.raises(RuntimeError, match="has changed the type of value"):
        y.sum().backward()
    assert np.isfinite(x.detach().numpy()).all()


# -- a hook that writes through NumPy in place: g.numpy()[3:] = 5 put the hook's values at the padding rows' structural
# zeros past the mode; the support still said structural, the 5s never met the padding's NaN, and w.grad was finite
# where the same hook returning NumPy's copy keeps PyTorch's NaN and names the hook. SILENT on sz33 (and the base).
def _writes_padding(g):
    g.numpy()[3:] = 5.0


def _scales_rows_in_place(g):
    g.numpy()[:3] *= 2.0  # (the kept rows only: the padding's zeros stay)


def _padded_program(x, w0, hook, rows=3):
    w = w0.clone().requires_grad_()
    h = x @ w
    h.register_hook(hook)
    h[:rows].tanh().sum().backward()
    return w.grad


def _padded_data():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, dtype=D, generator=gen)
    w0 = torch.randn(3, 4, dtype=D, generator=gen)
    xn = x.clone()
    xn[3:] = float("nan")
    return x, xn, w0


def test_a_hook_writing_the_paddings_zeros_through_numpy_in_place_keeps_torchs_nan():
    _, xn, w0 = _padded_data()
    ref = _padded_program(xn, w0, _writes_padding)
    assert ref.isnan().all()
    with pytest.warns(gw.OpaqueBackwardWarning, match="_writes_padding"), gw.strong_zeros():
        got = _padded_program(xn, w0, _writes_padding)
    assert torch.equal(got.isnan(), ref.isnan())


def test_a_hook_scaling_the_kept_rows_through_numpy_in_place_keeps_the_paddings_zeros():
    x, xn, w0 = _padded_data()
    with gw.strong_zeros():
        got = _padded_program(xn, w0, _scales_rows_in_place)
    torch.testing.assert_close(got, _padded_program(x[:3], w0, _scales_rows_in_place, rows=3), rtol=0, atol=1e-12)
    with gw.strong_zeros():
        finite = _padded_program(x, w0, _scales_rows_in_place)
    assert torch.equal(finite, _padded_program(x, w0, _scales_rows_in_place))


def _module_writes_padding(module, grad_input, grad_output):
    grad_input[0].numpy()[3:] = 5.0


def test_a_module_hook_writing_the_paddings_zeros_through_numpy_in_place_keeps_torchs_nan():
    _, xn, _ = _padded_data()

    def run():
        torch.manual_seed(1)
        lin = torch.nn.Linear(3, 4, dtype=D)
        act = torch.nn.Tanh()
        act.register_full_backward_hook(_module_writes_padding)
        act(lin(xn))[:3].sum().backward()
        return lin.weight.grad

    ref = run()
    assert ref.isnan().any()
    with pytest.warns(gw.OpaqueBackwardWarning, match="module's full backward hook"), gw.strong_zeros():
        got = run()
    assert torch.equal(got.isnan(), ref.isnan())


def test_a_hook_reached_by_a_batched_seed_is_passed_over():
    """Before: a user's tensor hook reached by a batched seed (``torch.autograd.grad(..., is_grads_batched=True)``,
    gradcheck's batched check: a legacy vmap BatchedTensor) made gradwise's hook before it read the seed's storage:
    NotImplementedError from gradwise internals (peer test_autograd's test_gradcheck_undefined_grad and
    test_gradcheck_backward_mul_by_grad_output under strong zeros)."""
    x = torch.randn(3, dtype=torch.double, requires_grad=True)
    with gw.strong_zeros():
        y = x.clone()
        y.register_hook(lambda g: g * 2)
        (g,) = torch.autograd.grad(y, x, torch.eye(3, dtype=torch.double), is_grads_batched=True)
    assert torch.equal(g, 2 * torch.eye(3, dtype=torch.double))
