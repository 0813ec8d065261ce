"""Session 31 hunt on strong zeros: silent gaps found by aliasing, by ``beta=0`` products and by torch.func inside a
custom backward. References: plain PyTorch where the mask is the user's value (no strong zero claimed), the same
program with the unused values deleted (float64) elsewhere.
"""

from __future__ import annotations

import pytest
import torch

import gradwise as gw

D = torch.float64
U8 = torch.uint8

# A custom backward's selection mask (x > -100: all True, made in the formula) written over, in place, with a mask the
# forward saved (a value, False at 1) through an alias of another dtype or of no tensor at all: the mask is the user's
# value after it, so the product keeps sqrt's NaN at 1 (plain PyTorch's). Only bool writes ended the selection: through
# a uint8/int8 view (or the untyped storage) it kept its entry, and the user's False hid the NaN (0 in its place).
ALIAS_WRITES = {
    "m.view(uint8).copy_(user)": lambda m, u: m.view(U8).copy_(u.view(U8)),
    "m[1:2].view(int8).fill_(0)": lambda m, u: m[1:2].view(torch.int8).fill_(0),
    "m.view(int8)[1].zero_()": lambda m, u: m.view(torch.int8)[1].zero_(),
    "m.view(uint8).mul_(user)": lambda m, u: m.view(U8).mul_(u.view(U8)),
    "m.data.view(uint8).copy_(user)": lambda m, u: m.data.view(U8).copy_(u.view(U8)),
    "mul(.., out=m.view(uint8))": lambda m, u: torch.mul(m.view(U8), u.view(U8), out=m.view(U8)),
    "m.view(uint8).as_strided(..).copy_": lambda m, u: m.view(U8).as_strided((3,), (1,)).copy_(u.view(U8)),
    "m.untyped_storage().copy_(user's)": lambda m, u: m.untyped_storage().copy_(u.clone().untyped_storage()),
    "m.view(uint8).index_put_": lambda m, u: m.view(U8).index_put_((torch.tensor([1]),), torch.tensor(0, dtype=U8)),
    "m.view(uint8).masked_fill_(~user, 0)": lambda m, u: m.view(U8).masked_fill_(~u, 0),
    # (bool aliases, already ended: controls)
    "m.data.copy_(user)": lambda m, u: m.data.copy_(u),
    "m.set_(user)": lambda m, u: m.set_(u.clone()),
    "m.as_strided(..).copy_(user)": lambda m, u: m.as_strided((3,), (1,)).copy_(u),
}


class _AliasWritten(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, write):
        ctx.save_for_backward(x, torch.tensor([True, False, True]))
        ctx.write = write
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        x, user = ctx.saved_tensors
        m = x > -100.0
        ctx.write(m, user)
        return g * m, None


@pytest.mark.parametrize("name", list(ALIAS_WRITES))
def test_a_selection_written_through_an_alias_of_any_dtype_selects_no_more(name):
    x = torch.tensor([1.0, -1.0, 2.0], dtype=D, requires_grad=True)
    y = _AliasWritten.apply(x, ALIAS_WRITES[name]).sqrt().sum()
    plain = torch.autograd.grad(y, x, retain_graph=True)[0]
    assert bool(plain[1].isnan()), "premise: the user's mask keeps sqrt's NaN"
    with gw.strong_zeros():
        got = torch.autograd.grad(y, x)[0]
    assert torch.equal(got.nan_to_num(7.0), plain.nan_to_num(7.0))


def test_a_selection_written_through_an_alias_of_its_own_storage_stays_where_unwritten():
    """Control: a write into another tensor's storage (a uint8 buffer of the backward's own) leaves the selection
    alone: relu's discarded NaN at 1 stays a structural zero (the deleted program's 0)."""
    class Other(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * 1.0

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            m = x > 0
            torch.zeros(3, dtype=torch.bool).view(U8).fill_(1)
            return g * m

    x = torch.tensor([1.0, -1.0, 4.0], dtype=D, requires_grad=True)
    y = Other.apply(x).sqrt().sum()
    got = gw.grad(y, x)[0]
    deleted = torch.tensor([1.0, 1.0, 4.0], dtype=D, requires_grad=True)  # x[1]'s sqrt deleted: its mask is False
    ref = torch.autograd.grad(Other.apply(deleted).sqrt().sum(), deleted)[0] * torch.tensor([1.0, 0.0, 1.0], dtype=D)
    assert torch.equal(got, ref)


# beta * input + alpha * product with beta = 0 and alpha != 0: PyTorch documents that the input is ignored (its
# NaN/Inf not propagated), so the program is the one without the input term, where the input gets no gradient. The
# input's formula is grad * beta: under sqrt of an output at 0 (an infinite sensitivity) that was inf x 0 = NaN, kept
# by the eager strong pass (its rule took beta's 0 as structural only with alpha = 0). The operands: an output with a
# 0 where sqrt's slope is infinite, and an input holding NaN/Inf.
nan, inf = float("nan"), float("inf")
_A = [[1.0, 0.0], [0.0, 1.0]]
_B = [[0.0, 2.0], [3.0, 1.0]]
BETA_ZERO_OPS = {  # name: (op, input, operand 1, operand 2)
    "addmm": (torch.addmm, [[nan, 1.0], [inf, 2.0]], _A, _B),
    "addmv": (torch.addmv, [nan, -inf], _B, [1.0, 0.0]),
    "addr": (torch.addr, [[nan, 1.0], [inf, 2.0]], [1.0, 0.0], [0.0, 2.0]),
    "baddbmm": (torch.baddbmm, [[[nan, 1.0], [inf, 2.0]]], [_A], [_B]),
    "addbmm": (torch.addbmm, [[nan, 1.0], [inf, 2.0]], [_A, _A], [_B, _B]),
    "addmm, a broadcast input": (torch.addmm, [nan, inf], _A, _B),
}


def _beta_zero_leaves(name):
    op, m, a, b = BETA_ZERO_OPS[name]
    return op, *(torch.tensor(t, dtype=D, requires_grad=True) for t in (m, a, b))


@pytest.mark.parametrize("alpha", [1, 2.5])
@pytest.mark.parametrize("name", list(BETA_ZERO_OPS))
def test_a_beta_zero_input_gets_the_deleted_programs_zero_gradient(name, alpha):
    op, m, a, b = _beta_zero_leaves(name)
    out = op(m, a, b, beta=0, alpha=alpha)
    assert bool((out == 0).any()) and bool(out.isfinite().all()), "premise: an infinite slope of sqrt, no NaN used"
    plain = torch.autograd.grad(out.sqrt().sum(), (m, a, b), retain_graph=True)
    assert not bool(plain[0].isfinite().all()), "premise: PyTorch's inf x 0"
    got = gw.grad(out.sqrt().sum(), (m, a, b))
    # the program with the input term deleted: the same op on a constant input, which gets no gradient
    op, _, a2, b2 = _beta_zero_leaves(name)
    deleted = torch.autograd.grad(op(torch.zeros_like(m), a2, b2, beta=0, alpha=alpha).sqrt().sum(), (a2, b2))
    assert torch.equal(got[0], torch.zeros_like(m))
    for g, d in zip(got[1:], deleted, strict=True):
        assert torch.equal(g.nan_to_num(7.0, 8.0, 9.0), d.nan_to_num(7.0, 8.0, 9.0))


@pytest.mark.parametrize("name", list(BETA_ZERO_OPS))
def test_a_nonzero_beta_keeps_the_inputs_used_nan(name):
    """Control: beta = 0.5 uses the input: its NaN/Inf reaches the output and the gradient (plain PyTorch's)."""
    op, m, a, b = _beta_zero_leaves(name)
    y = op(m, a, b, beta=0.5).sqrt().sum()
    plain = torch.autograd.grad(y, (m, a, b), retain_graph=True)
    assert bool(plain[0].isnan().any())
    got = gw.grad(y, (m, a, b))
    for g, p in zip(got, plain, strict=True):
        assert torch.equal(g.nan_to_num(7.0, 8.0, 9.0), p.nan_to_num(7.0, 8.0, 9.0))


@pytest.mark.parametrize("name", list(BETA_ZERO_OPS))
def test_a_beta_zero_input_under_a_finite_sensitivity_is_unchanged(name):
    """Control: a finite sensitivity (a sum): the input's 0 * g = 0 in PyTorch already; every gradient bitwise."""
    op, m, a, b = _beta_zero_leaves(name)
    y = op(m, a, b, beta=0, alpha=1.5).sum()
    plain = torch.autograd.grad(y, (m, a, b), retain_graph=True)
    got = gw.grad(y, (m, a, b))
    assert torch.equal(plain[0], torch.zeros_like(m))
    for g, p in zip(got, plain, strict=True):
        assert torch.equal(g, p)


# A custom backward that differentiates its forward with torch.func (grad of a function capturing the sensitivity,
# vmap of vjp): that nested backward ran the transform path with a table of its own, so the sensitivity's structural
# zeros (the padding row the loss slices away) were values there: sqrt's infinite slope at the padding row, and a
# saved NaN there, made NaN gradients, silent wherever the custom backward computed on (``* 1.0``) after the call.
# Now it shares the pass's supports. Reference: the program with the padding row deleted.
nan_ = float("nan")
FUNC_BACKWARDS = {
    "func.grad of <f(t), g>": lambda f, x, g: torch.func.grad(lambda t: (f(t) * g).sum())(x),
    "func.grad of <f(t), g> * 1": lambda f, x, g: torch.func.grad(lambda t: (f(t) * g).sum())(x) * 1.0,
    "func.grad(..).clone()": lambda f, x, g: torch.func.grad(lambda t: (f(t) * g).sum())(x).clone(),
    "vmap(vjp)": lambda f, x, g: torch.vmap(lambda xi, gi: torch.func.vjp(f, xi)[1](gi)[0])(x, g),
    "vmap(vjp) * 1": lambda f, x, g: torch.vmap(lambda xi, gi: torch.func.vjp(f, xi)[1](gi)[0])(x, g) * 1.0,
    "jacrev(f) contracted with g": lambda f, x, g: (torch.func.jacrev(f)(x) * g[:, :, None, None]).sum((0, 1)),
    # a legacy-vmap backward: its batched seeds were read as the pass's (NotImplementedError: 'Cannot access storage
    # of BatchedTensorImpl' from inside gradwise, _engine._seeded_with_zeros)
    "autograd.functional.jacobian(vectorize=True)": lambda f, x, g: (
        torch.autograd.functional.jacobian(f, x, vectorize=True) * g[:, :, None, None]).sum((0, 1)),
    # (controls: no transform at the call)
    "autograd.functional.jacobian": lambda f, x, g: (
        torch.autograd.functional.jacobian(f, x) * g[:, :, None, None]).sum((0, 1)),
    "func.vjp": lambda f, x, g: torch.func.vjp(f, x)[1](g)[0] * 1.0,
}
FORWARDS = {
    "sqrt": lambda t: t.sqrt(),  # infinite slope at the zero padding row
    "t log t": lambda t: t * t.log(),  # a saved -inf and an infinite slope there
}


def _func_backward(f, body):
    class ByFunc(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return f(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return body(f, x, g)

    return ByFunc


_W = [[1.0, 2.0], [3.0, 4.0]]


@pytest.mark.parametrize("how", ["gw.backward", "strong_zeros"])
@pytest.mark.parametrize("pad", [0.0, nan_])
@pytest.mark.parametrize("forward", list(FORWARDS))
@pytest.mark.parametrize("name", list(FUNC_BACKWARDS))
def test_torch_func_in_a_custom_backward_keeps_the_passes_structural_zeros(name, forward, pad, how):
    fn = _func_backward(FORWARDS[forward], FUNC_BACKWARDS[name])
    x = torch.tensor([[1.0, 4.0], [pad, 0.0]], dtype=D)  # row 1: padding, sliced away after the custom Function
    w = torch.tensor(_W, dtype=D, requires_grad=True)
    if how == "gw.backward":
        gw.backward((fn.apply(x @ w)[:1] * 2).sum())
    else:
        with gw.strong_zeros():
            (fn.apply(x @ w)[:1] * 2).sum().backward()
    deleted = torch.tensor(_W, dtype=D, requires_grad=True)
    (fn.apply(x[:1] @ deleted) * 2).sum().backward()
    assert bool(deleted.grad.isfinite().all())
    assert torch.equal(w.grad, deleted.grad)


@pytest.mark.parametrize("name", list(FUNC_BACKWARDS))
def test_torch_func_in_a_custom_backward_keeps_a_used_nan_and_finite_bits(name):
    """Controls: the padding row used by the loss (no slice) keeps PyTorch's NaN/Inf (bitwise elsewhere); on finite
    data every gradient is PyTorch's, bitwise."""
    fn = _func_backward(FORWARDS["sqrt"], FUNC_BACKWARDS[name])
    for x in (torch.tensor([[1.0, 4.0], [0.0, 0.0]], dtype=D), torch.tensor([[1.0, 4.0], [2.0, 0.5]], dtype=D)):
        w = torch.tensor(_W, dtype=D, requires_grad=True)
        plain = torch.autograd.grad((fn.apply(x @ w) * 2).sum(), w)[0]
        got = gw.grad((fn.apply(x @ w) * 2).sum(), w)[0]
        assert torch.equal(got.nan_to_num(7.0, 8.0, 9.0), plain.nan_to_num(7.0, 8.0, 9.0))
