"""Session 31 review of the sz31 merge (selections ended by aliased writes, beta = 0 products, torch.func in a custom
backward) and of the engine hook kept in place from the first block on. References: plain PyTorch where the value is
the user's (no strong zero claimed), the same program with the unused values deleted, or the same custom backward
with its auxiliary values computed outside the pass.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)
from gradwise._strong_zeros._kernel_reads import ZERO_ALPHA_PRODUCTS
from test_hunt_sz31 import _AliasWritten as _Written  # its mask written by the test's write

D = torch.float64
U8 = torch.uint8
nan, inf = float("nan"), float("inf")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.nan_to_num(7.0, 8.0, 9.0), b.nan_to_num(7.0, 8.0, 9.0))


# -- selections: a write into the mask's memory through an alias PyTorch does not know as one ----------------------
# A custom backward's selection mask (x > -100: all True, made in the formula) overwritten with the user's mask (False
# at 1): the mask is the user's value after it, so g * m keeps sqrt's NaN at 1 (plain PyTorch's). A tensor over the
# same memory with a storage object of its own (from_numpy, DLPack, frombuffer), or a Tensor[] argument (the
# _foreach_ ops), wrote the mask without ending the selection: the user's False hid the NaN (0 in its place).
def _from_numpy(m):
    return torch.from_numpy(m.numpy())


def _from_dlpack(m):
    return torch.utils.dlpack.from_dlpack(m)


def _frombuffer(m):
    with warnings.catch_warnings():  # (numpy's buffer of a tensor is writable: torch warns of nothing else here)
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(m.numpy(), dtype=torch.bool)


MEMORY_ALIAS_WRITES = {
    "torch.from_numpy(m.numpy()).copy_(user)": lambda m, u: _from_numpy(m).copy_(u),
    "torch.from_numpy(m.numpy())[1:].fill_(False)": lambda m, u: _from_numpy(m)[1:2].fill_(False),
    "from_dlpack(m).copy_(user)": lambda m, u: _from_dlpack(m).copy_(u),
    "frombuffer(m.numpy()).copy_(user)": lambda m, u: _frombuffer(m).copy_(u),
    "torch.from_numpy(m.numpy()).view(uint8).mul_(user)": lambda m, u: _from_numpy(m).view(U8).mul_(u.view(U8)),
    "_foreach_copy_([m], [user])": lambda m, u: torch._foreach_copy_([m], [u]),
    "_foreach_mul_([m.view(uint8)], [user])": lambda m, u: torch._foreach_mul_([m.view(U8)], [u.view(U8)]),
    "_foreach_zero_([m[1:2]])": lambda m, u: torch._foreach_zero_([m[1:2]]),
}


def _selection_case(write):
    x = torch.tensor([1.0, -1.0, 2.0], dtype=D, requires_grad=True)
    y = _Written.apply(x, write).sqrt().sum()
    plain = torch.autograd.grad(y, x, retain_graph=True)[0]
    assert bool(plain[1].isnan()), "premise: the user's mask keeps sqrt's NaN"
    with gw.strong_zeros():
        got = torch.autograd.grad(y, x)[0]
    return got, plain


@pytest.mark.parametrize("name", list(MEMORY_ALIAS_WRITES))
def test_a_selection_written_through_a_memory_alias_or_a_tensor_list_selects_no_more(name):
    got, plain = _selection_case(MEMORY_ALIAS_WRITES[name])
    assert _same(got, plain)


@pytest.mark.xfail(strict=True, reason="a write through numpy (m.numpy()[:] = ...) is no torch op: no dispatch mode "
                   "sees it, so the selection made before it stays (the user's False hides sqrt's NaN at 1)")
def test_a_selection_written_through_numpy_selects_no_more():
    got, plain = _selection_case(lambda m, u: m.numpy().__setitem__(slice(None), u.numpy()))
    assert _same(got, plain)


def test_a_write_into_another_buffer_leaves_the_selection():
    """Control: a write into memory of its own (a from_numpy tensor of another array) leaves the selection: relu's
    discarded NaN at 1 stays a structural zero (the deleted program's 0)."""
    class Other(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * 1.0

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            m = x > 0
            torch.from_numpy(np.zeros(3, dtype=bool)).fill_(True)
            torch._foreach_zero_([torch.ones(3)])
            return g * m

    x = torch.tensor([1.0, -1.0, 4.0], dtype=D, requires_grad=True)
    got = gw.grad(Other.apply(x).sqrt().sum(), x)[0]
    kept = torch.tensor([1.0, 4.0], dtype=D, requires_grad=True)  # x[1]'s sqrt deleted: its mask is False
    ref = torch.autograd.grad(kept.sqrt().sum(), kept)[0]
    assert torch.equal(got, torch.stack([ref[0], torch.zeros((), dtype=D), ref[1]]))


# -- beta = 0: every CPU kernel leaves the input unread (the premise of _kernel_reads._zero_beta) ----------------
BETA_OPS = {  # name: (op, shapes of input, operand 1, operand 2 from (n, k, m))
    "addmm": (torch.addmm, lambda n, k, m: ((n, m), (n, k), (k, m))),
    "addmv": (torch.addmv, lambda n, k, m: ((n,), (n, k), (k,))),
    "addr": (torch.addr, lambda n, k, m: ((n, m), (n,), (m,))),
    "baddbmm": (torch.baddbmm, lambda n, k, m: ((3, n, m), (3, n, k), (3, k, m))),
    "addbmm": (torch.addbmm, lambda n, k, m: ((n, m), (3, n, k), (3, k, m))),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64])
@pytest.mark.parametrize("name", list(BETA_OPS))
def test_a_beta_zero_kernel_never_reads_its_input(name, dtype):
    """The rule gives a beta = 0 input the deleted input term's 0 from the node's saved beta alone: sound only while
    every forward kernel leaves the input unread (its NaN not propagated), whatever the size (BLAS or the small
    kernels), the input's layout (broadcast, transposed), the way beta is given, in place or out=."""
    op, shapes = BETA_OPS[name]
    for n, k, m in ((1, 1, 1), (2, 2, 2), (2, 0, 2), (40, 40, 40), (300, 3, 2)):
        s_in, s1, s2 = shapes(n, k, m)
        a, b = torch.randn(s1, dtype=D).to(dtype), torch.randn(s2, dtype=D).to(dtype)
        inputs = [torch.full(s_in, nan, dtype=dtype), torch.full(s_in[-1:], nan, dtype=dtype)]
        if len(s_in) > 1:
            inputs.append(torch.full((*s_in[:-2], s_in[-1], s_in[-2]), nan, dtype=dtype).mT)
        for inp in inputs:
            for beta in (0, 0.0, -0.0, 0j if dtype.is_complex else 0):
                assert bool(op(inp, a, b, beta=beta, alpha=1.5).isfinite().all())
                out = torch.full(op(inp, a, b, beta=beta).shape, nan, dtype=dtype)
                assert bool(op(inp, a, b, beta=beta, alpha=1.5, out=out).isfinite().all())
                if inp.shape == out.shape:
                    assert bool(getattr(inp.clone(), name + "_")(a, b, beta=beta, alpha=1.5).isfinite().all())


def test_a_beta_zero_input_of_an_in_place_addmm_gets_the_deleted_programs_zero():
    """y.addmm_(a, b, beta=0) overwrites y without reading it: its old value (x, NaN/Inf) is unused."""
    x = torch.tensor([[nan, 1.0], [inf, 2.0]], dtype=D, requires_grad=True)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D, requires_grad=True)
    b = torch.tensor([[0.0, 2.0], [3.0, 1.0]], dtype=D, requires_grad=True)
    y = (x * 1.0).addmm_(a, b, beta=0)
    got = gw.grad(y.sqrt().sum(), (x, a, b))
    deleted = torch.autograd.grad(torch.mm(a, b).sqrt().sum(), (a, b))
    assert torch.equal(got[0], torch.zeros_like(x))
    for g, d in zip(got[1:], deleted, strict=True):
        assert _same(g, d)


def test_a_beta_zero_input_under_vmap_keeps_the_nan_its_decomposition_reads():
    """Under vmap addmm runs as self * beta + mm (the input read: NaN x 0 = NaN in the output), and under grad its
    node is AddmmBackward0 with beta = 0: the input's gradient keeps PyTorch's NaN."""
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D)
    b = torch.tensor([[0.0, 2.0], [3.0, 1.0]], dtype=D)
    xs = torch.tensor([[[nan, 1.0], [2.0, 2.0]]] * 2, dtype=D)

    def f(x):
        return torch.addmm(x, a, b, beta=0).sqrt().sum()

    plain = torch.vmap(torch.func.grad(f))(xs)
    assert bool(plain.isnan().any()), "premise: the decomposition reads the NaN input"
    with gw.strong_zeros(), warnings.catch_warnings():
        warnings.simplefilter("ignore", gw.OpaqueBackwardWarning)
        got = torch.vmap(torch.func.grad(f))(xs)
    assert _same(got, plain)


# A kernel that reads its beta = 0 input (MPS's baddbmm did: pytorch/pytorch#194442), simulated on CPU by a kernel
# registered for aten::addmm: self * beta (+ alpha * mm where alpha != 0). Its output holds the input's NaN, so the
# input's gradient NaN is genuine. The rule took beta = 0 for an unread input from the node's saved beta alone
# (sz31), and with alpha = 0 too from a re-run of the kernel on a zero input (the base): both hid it.
def _reading_addmm(self, m1, m2, *, beta=1, alpha=1):
    with torch._C._AutoDispatchBelowAutograd():
        out = self * beta
        if alpha != 0:
            out = out + alpha * torch.mm(m1, m2)
        return out.expand(m1.shape[0], m2.shape[1]).clone()


@pytest.fixture
def input_reading_addmm():
    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (overriding a kernel is announced)
        lib.impl("addmm", _reading_addmm, "CPU")
    try:
        yield
    finally:
        lib._destroy()


@pytest.mark.parametrize("alpha", [1.5, 0])
def test_a_beta_zero_input_that_the_kernel_reads_keeps_its_nan(input_reading_addmm, alpha):
    x = torch.tensor([[nan, 1.0], [2.0, 2.0]], dtype=D, requires_grad=True)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D, requires_grad=True)
    b = torch.tensor([[0.0, 2.0], [3.0, 1.0]], dtype=D, requires_grad=True)
    out = torch.addmm(x, a, b, beta=0, alpha=alpha)
    assert bool(out[0, 0].isnan()), "premise: the kernel read the input"
    loss = out.sqrt().sum()
    plain = torch.autograd.grad(loss, x, retain_graph=True)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gw.OpaqueBackwardWarning)
        got = gw.grad(loss, x)[0]
    assert bool(plain[0, 0].isnan()) and _same(got, plain)


@pytest.mark.parametrize("name", list(BETA_OPS))
def test_a_beta_zero_input_gets_its_zero_with_an_operand_unsaved(name):
    """The kernel's re-run builds an operand the node did not save (the constant data operand: only the weight
    requires grad) from the other's and the output's shapes: the input still gets the deleted term's 0 under sqrt's
    infinite slope, the weight its gradient of the program without the input term."""
    op, shapes = BETA_OPS[name]
    s_in, s1, s2 = shapes(2, 3, 2)
    data = torch.ones(s1, dtype=D)
    weight = torch.arange(1.0, 1.0 + torch.Size(s2).numel(), dtype=D).reshape(s2)
    weight[..., 0] = 0.0  # (output entries at 0: sqrt's infinite slope; addmv's output is one column)
    weight = (weight * (name != "addmv")).requires_grad_()
    inp = torch.full(s_in, nan, dtype=D, requires_grad=True)
    out = op(inp, data, weight, beta=0)
    names = ZERO_ALPHA_PRODUCTS[type(out.grad_fn).__name__][1]
    assert [getattr(out.grad_fn, n) is None for n in names] == [False, True], "premise: the data operand unsaved"
    plain = torch.autograd.grad(out.abs().sqrt().sum(), inp, retain_graph=True)[0]
    assert bool(plain.isnan().any()), "premise: an infinite slope meets the input's beta = 0"
    got = gw.grad(out.abs().sqrt().sum(), (inp, weight))
    assert torch.equal(got[0], torch.zeros_like(inp))
    ref = torch.autograd.grad(op(torch.zeros(s_in, dtype=D), data, weight, beta=0).abs().sqrt().sum(), weight)[0]
    assert _same(got[1], ref)


# -- torch.func in a custom backward: the nested pass's own zeros stay its own ---------------------------------------
# A custom backward that scales its sensitivity by an auxiliary gradient of a function unrelated to the outer pass
# (h(c) = where(c > 0, sqrt(c), 0), whose strong gradient at c = -1 is h's own structural 0). Reference: the same
# custom backward with that auxiliary gradient computed before the pass (the same values, a constant there). The
# outer program uses w[1] (sqrt at 0: an infinite slope), so PyTorch's 0 x inf = NaN there is genuine; with the nested
# pass's zeros handed to the outer pass it became 0.
_C = [1.0, -1.0, 4.0]


def _h(c):
    return torch.where(c > 0, c.sqrt(), torch.zeros_like(c)).sum()


def _aux_autograd():
    with torch.enable_grad():
        c = torch.tensor(_C, dtype=D, requires_grad=True)
        return torch.autograd.grad(_h(c), c)[0]


AUX = {
    "torch.func.grad": lambda: torch.func.grad(_h)(torch.tensor(_C, dtype=D)),
    "vmap(torch.func.grad)": lambda: torch.vmap(torch.func.grad(_h))(torch.tensor([_C, _C], dtype=D))[0],
    "torch.func.jacrev": lambda: torch.func.jacrev(
        lambda c: torch.where(c > 0, c.sqrt(), torch.zeros_like(c)))(torch.tensor(_C, dtype=D)).sum(0),
    "torch.autograd.grad": _aux_autograd,
}


def _scaled_by(aux):
    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 1.0

        @staticmethod
        def backward(ctx, g):
            return g * aux()

    return Scaled


def _unrelated_case(aux):
    def run(fn):
        w = torch.tensor([1.0, 0.0, 4.0], dtype=D, requires_grad=True)
        with gw.strong_zeros(), warnings.catch_warnings():
            warnings.simplefilter("ignore", gw.OpaqueBackwardWarning)
            return torch.autograd.grad(fn.apply(w.sqrt()).sum(), w)[0]

    with gw.strong_zeros():
        value = aux()  # the auxiliary gradient computed before the pass: strong too, its values the same
    assert torch.equal(value, torch.tensor([0.5, 0.0, 0.25], dtype=D))
    return run(_scaled_by(aux)), run(_scaled_by(lambda: value))


# (until sz32 jacrev and torch.autograd.grad handed their zeros up whatever they differentiated: _engine._tied)
@pytest.mark.parametrize("name", list(AUX))
def test_a_nested_backward_of_an_unrelated_function_hands_no_zeros_to_the_pass(name):
    got, ref = _unrelated_case(AUX[name])
    assert bool(ref[1].isnan()), "premise: the auxiliary 0 as a value keeps PyTorch's 0 x inf"
    assert _same(got, ref)


# -- the engine hook in place from the first block on: outside any block, PyTorch's -----------------------------------
def _contaminated():
    x = torch.tensor([1.0, -1.0, 4.0], dtype=D, requires_grad=True)
    return x, torch.where(x > 0, x.sqrt(), x).sum()


def _plain_grad():
    x, y = _contaminated()
    return torch.autograd.grad(y, x)[0]


def test_outside_blocks_after_the_first_a_backward_is_pytorchs_in_every_thread():
    with gw.strong_zeros():
        x, y = _contaminated()
        assert not bool(torch.autograd.grad(y, x)[0].isnan().any())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        here = _plain_grad()
        x, y = _contaminated()
        y.backward()
        got: dict = {}
        ready, done = threading.Event(), threading.Event()

        def other():  # a backward outside any block while the main thread holds one open
            ready.wait()
            got["other"] = _plain_grad()
            done.set()

        thread = threading.Thread(target=other)
        thread.start()
        with gw.strong_zeros():
            ready.set()
            done.wait()
            inside = _plain_grad()
        thread.join()
    assert bool(here[1].isnan()) and _same(x.grad, here) and _same(got["other"], here)
    assert not bool(inside.isnan().any())


def test_a_scripted_gradient_outside_blocks_after_the_first_warns_nothing():
    def scripted(x: torch.Tensor):  # (grad's results are Optional[Tensor] to TorchScript)
        y = torch.where(x > 0, x.sqrt(), x).sum()
        return torch.autograd.grad([y], [x])[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (torch.jit.script is deprecated)
        fn = torch.jit.script(scripted)
    with gw.strong_zeros():
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fn(torch.tensor([1.0, -1.0, 4.0], dtype=D, requires_grad=True))
    assert _same(got, _plain_grad())
