"""Review (session 32) of sz32: a nested backward's zeros handed up by ``_engine._tied``, and the plan's read of
softmax weights in mm/bmm (``_node_facts._no_masked_weights``). References are independent of gradwise: plain
PyTorch where the value is the program's own, the program with the masked keys deleted.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)

D = torch.float64


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.nan_to_num(7.0, 8.0, 9.0), b.nan_to_num(7.0, 8.0, 9.0))


# -- a nested backward at a constant the custom node holds: a function unrelated to the pass ---------------------------
# The custom Function takes a constant c (no grad: a mask, a buffer) and keeps it (saved, or on ctx); its backward
# scales g by the gradient of h(c) = where(c > 0, sqrt(c), 0), whose strong gradient at c = -1 is h's own structural 0.
# The outer program uses w[1] = 0 (sqrt's infinite slope), so PyTorch's 0 x inf = NaN there is genuine. _tied took any
# tensor the node holds as the Function's input, handed h's zeros up, and the NaN became 0, silently.
def _h(c):
    return torch.where(c > 0, c.sqrt(), torch.zeros_like(c)).sum()


def _autograd_grad(c):
    with torch.enable_grad():
        c = c.detach().requires_grad_()
        return torch.autograd.grad(_h(c), c)[0]


AUX = {
    "torch.func.jacrev": lambda c: torch.func.jacrev(lambda c: torch.where(c > 0, c.sqrt(), torch.zeros_like(c)))(
        c).sum(0),
    "torch.autograd.grad": _autograd_grad,
    "torch.func.grad": lambda c: torch.func.grad(_h)(c),
}


def _scaled_by(aux, saved: bool):
    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, c):
            if saved:
                ctx.save_for_backward(c)
            else:
                ctx.c = c
            return x * 1.0

        @staticmethod
        def backward(ctx, g):
            c = ctx.saved_tensors[0] if saved else ctx.c
            return g * aux(c), None

    return Scaled


@pytest.mark.parametrize("saved", [True, False], ids=["saved", "on ctx"])
@pytest.mark.parametrize("name", list(AUX))
def test_a_nested_backward_at_a_held_constant_hands_no_zeros_to_the_pass(name, saved):
    def run(strong):
        w = torch.tensor([1.0, 0.0, 4.0], dtype=D, requires_grad=True)
        loss = _scaled_by(AUX[name], saved).apply(w.sqrt(), torch.tensor([1.0, -1.0, 4.0], dtype=D)).sum()
        if not strong:
            return torch.autograd.grad(loss, w)[0]
        with gw.strong_zeros(), warnings.catch_warnings():
            warnings.simplefilter("ignore", gw.OpaqueBackwardWarning)
            return torch.autograd.grad(loss, w)[0]

    ref = run(False)
    assert bool(ref[1].isnan()), "premise: the auxiliary 0 as a value meets sqrt's infinite slope"
    assert _same(run(True), ref)


# -- softmax weights holding NaN (a fully masked query's row) and exact zeros: the plan still sees the zeros -----------
def _masked_loss(x, q, keys):
    v = x.sqrt()  # (an infinite slope at the zero rows of the padded keys)
    mask = torch.zeros(5, 5, dtype=D)
    mask[:, keys:] = -math.inf
    mask[0] = -math.inf  # query 0 attends to nothing: its weights are NaN, its output is left out below
    out = (q + mask).softmax(-1) @ v
    return torch.where(torch.arange(5)[:, None] > 0, out, 0.0).square().sum()


def test_masked_weights_beside_a_fully_masked_query_give_padded_values_the_deleted_keys_zero():
    torch.manual_seed(0)
    x = torch.rand(5, 3, dtype=D)
    x[3:] = 0.0
    x.requires_grad_(True)
    q = torch.randn(5, 5, dtype=D, requires_grad=True)
    assert not bool(torch.autograd.grad(_masked_loss(x, q, 3), x)[0].isfinite().all()), "premise: 0 x inf"
    got = gw.grad(_masked_loss(x, q, 3), (x, q))
    # reference: the program with keys 3 and 4 deleted, and query 0 (left out of the loss)
    xs = x.detach()[:3].clone().requires_grad_(True)
    qs = q.detach()[1:, :3].clone().requires_grad_(True)
    want = torch.autograd.grad((qs.softmax(-1) @ xs.sqrt()).square().sum(), (xs, qs))
    torch.testing.assert_close(got[0][:3], want[0], rtol=1e-12, atol=1e-14)
    assert torch.equal(got[0][3:], torch.zeros(2, 3, dtype=D))
    torch.testing.assert_close(got[1][1:, :3], want[1], rtol=1e-12, atol=1e-14)
    assert not bool(got[1].isnan().any())
