"""The fast path of a whole training step compiled (gradwise._strong_zeros._compile.compiled_step): a backward
whose graph holds only torch.compile'd backwards and leaves is recognised in one walk, without the general plan
(``_engine._choose``) or ``compiled_run``, and each compiled function's per-thread switch is made once.

References: the same compiled function's plain PyTorch gradients (bitwise, finite data) and the program with the
padding rows deleted, run eagerly (NaN padding). Compiles use aot_eager (fast on small CI machines).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import gradwise as gw
from gradwise._strong_zeros import _compile, _engine


@pytest.fixture(autouse=True)
def _fresh_compiles():
    with torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


def _setup():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x = torch.randn(6, 4)
    padded = x.clone()
    padded[4:] = math.nan
    whole = torch.compile(lambda t: lin(t)[:4].square().sum(), backend="aot_eager")
    return lin, x, padded, whole


def _count(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_a_whole_compiled_step_takes_one_walk(monkeypatch):
    """After the first backward under strong zeros (which compiles the variant on the general path), a compiled
    whole step is planned by one walk: no general plan, no compiled_run. Its gradients are PyTorch's bit for bit
    on finite data, and those of the program without the padding rows where NaN rows are sliced away."""
    lin, x, padded, whole = _setup()
    params = list(lin.parameters())
    want = torch.autograd.grad(whole(x), params)
    with gw.strong_zeros():
        whole(x).backward()  # general path: compiles the strong variant
    lin.zero_grad(set_to_none=True)
    chosen = _count(monkeypatch, _engine, "_choose")
    wrapped = _count(monkeypatch, _engine, "compiled_run")
    with gw.strong_zeros():
        got = torch.autograd.grad(whole(x), params)
        whole(padded).backward()
    assert not chosen and not wrapped
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    kept = x[:4].clone()
    ref = torch.autograd.grad(lin(kept).square().sum(), params)
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-6)


def test_a_step_with_eager_nodes_still_takes_the_general_plan(monkeypatch):
    """A compiled model under an eager loss (eager nodes in the graph) takes the general plan: the fast path
    serves only graphs of compiled nodes and leaves."""
    lin, x, padded, _ = _setup()
    params = list(lin.parameters())
    model = torch.compile(lambda t: lin(t), backend="aot_eager")
    with gw.strong_zeros():
        model(x)[:4].square().sum().backward()
    chosen = _count(monkeypatch, _engine, "_choose")
    with gw.strong_zeros():
        got = torch.autograd.grad(model(padded)[:4].square().sum(), params)
    assert chosen
    ref = torch.autograd.grad(lin(x[:4]).square().sum(), params)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_the_per_thread_switch_is_made_once_per_compiled_function(monkeypatch):
    """The switch that runs a compiled node's strong variant on one thread (``_PerThread``: a thread-local) is
    made on the first backward and reused (making it cost ~5 us of every compiled backward); between backwards
    the compiled function's backward is PyTorch's own again, with its donated buffers."""
    _, x, _, whole = _setup()
    with gw.strong_zeros():
        whole(x).backward()
    made = _count(monkeypatch, _compile._PerThread, "__init__")
    bc = _compile._backward_compiler(whole(x).grad_fn)
    original, donated = bc.compiled_bw, [list(i) for _, i in _compile._donated(bc)]
    for _ in range(4):
        with gw.strong_zeros():
            whole(x).backward()
        assert bc.compiled_bw is original
        assert [list(i) for _, i in _compile._donated(bc)] == donated
    assert len(made) <= 1


def test_strong_zeros_is_still_a_decorator_and_nests():
    """``strong_zeros()`` (a class-based context manager now) decorates a function and nests; once the
    outermost block ends, a backward is PyTorch's again (its hook stays in place and passes straight through:
    the padding's NaN reaches the gradient, as in plain PyTorch)."""
    lin, _, padded, whole = _setup()

    @gw.strong_zeros()
    def step(t: torch.Tensor) -> None:
        with gw.strong_zeros():
            whole(t).backward()
        whole(t).backward()

    step(padded)
    assert all(p.grad.isfinite().all() for p in lin.parameters())
    lin.zero_grad()
    whole(padded).backward()
    assert lin.weight.grad.isnan().any()


def test_the_fast_checks_are_stricter_than_the_general_ones():
    """``_engine._everyday`` lets a tensor through only where ``_contract.plain_reason`` and ``traced`` (the
    general path's checks) find nothing: meta, sparse, nested, functional, fake, subclass and vmap-batched
    tensors all go to the general path."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gradwise._strong_zeros._contract import plain_reason
    from gradwise._strong_zeros._traced import traced

    class Sub(torch.Tensor):
        pass

    dense = torch.randn(3, 2)
    kinds = [dense, nn.Parameter(dense.clone()), dense.to("meta"), dense.to_sparse(),
             torch.nested.nested_tensor([dense, dense], layout=torch.jagged), torch._to_functional_tensor(dense),
             dense.as_subclass(Sub)]
    with warnings.catch_warnings():  # (the strided layout is a prototype: PyTorch warns)
        warnings.simplefilter("ignore", UserWarning)
        kinds.append(torch.nested.nested_tensor([dense, dense]))
    with FakeTensorMode() as mode:
        kinds.append(mode.from_tensor(dense))
    batched = []
    torch.vmap(lambda t: batched.append(t) or t)(dense)
    kinds += batched
    for t in kinds:
        for groups in (([t], (), ()), ((), [t], ()), ((), (), [t])):
            if _engine._everyday(*groups):
                assert plain_reason(groups[0], groups[2], groups[1]) is None and not traced((*groups[0], *groups[1]))
    assert _engine._everyday([dense], [], [nn.Parameter(dense.clone())])
    assert sum(_engine._everyday([t]) for t in kinds) == 2  # the plain tensor and the parameter


def test_a_plain_retained_backward_beside_a_strong_one_keeps_pytorchs_donated_buffer_check():
    """While a strong-zero backward of a compiled function runs on one thread, the switch clears the donated-buffer
    indices (both its backwards may run with the graph retained). A plain ``backward(retain_graph=True)`` of the
    same function on another thread then skipped PyTorch's check and ran PyTorch's buffer-reusing kernel: its
    second backward read overwritten saved tensors (a silently wrong gradient). It raises PyTorch's error now."""
    import threading

    with warnings.catch_warnings():  # inductor's first import warns from torch.jit (torch's own deprecation)
        warnings.simplefilter("ignore", DeprecationWarning)
        import torch._inductor.compile_fx

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    f = torch.compile(lambda t: torch.tanh(lin(t)).exp().sum())
    x = torch.randn(3, 4)
    f(x).backward()  # PyTorch's backward, compiled with donated buffers
    bc = _compile._backward_compiler(f(x).grad_fn)
    assert any(idxs for _, idxs in _compile._donated(bc))
    with pytest.raises(RuntimeError, match="donated buffers"):
        f(x).backward(retain_graph=True)
    errors: list[Exception] = []

    def plain() -> None:
        try:
            f(x).backward(retain_graph=True)
        except RuntimeError as exc:
            errors.append(exc)

    prior = _compile._PerThread.enter(bc, lambda args: None)  # as a strong backward on this thread does
    try:
        thread = threading.Thread(target=plain)
        thread.start()
        thread.join()
    finally:
        _compile._PerThread.leave(bc, prior)
    assert len(errors) == 1 and "donated buffers" in str(errors[0])
