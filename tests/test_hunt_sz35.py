"""Hunt (session 35, sz35): strong zeros where masked attention weights reach the values' product through layout ops
that reorder, copy, cut or repeat them (einsum's permutes, a copy between two transposes, mT, swapaxes, movedim, a
4-d matmul's broadcast, a head's select or slice, a reshape that merges heads, einsum's sum over heads), as the
product's second operand, inside addmm/baddbmm, and in attention pooling's elementwise product. References
are independent of gradwise: the same program with the padded keys deleted (each sequence on its own rows, float64),
or plain PyTorch where the NaN is genuine.
"""

from __future__ import annotations

import math

import pytest
import torch

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)
from test_hunt_sz32 import keeps_the_controls, matches_the_deleted_program

D = torch.float64
HEADS = torch.tensor([1.0, 2.0], dtype=D)[:, None, None]


# -- masked attention weights through layout ops on their way to the values' bmm ------------------------------------
# softmax(s + mask) gives a padded key the weight exp(-inf) = 0, and v's gradient a^T @ g is then the deleted key's 0
# (_rules_bilinear._masked_weights_mm), also where the padded value's formula is singular (sqrt of a zero padding row:
# PyTorch's 0 x inf = NaN). Weights that are not the softmax's storage were mapped to it only where every node on the
# way kept the elements' order: these layouts kept PyTorch's NaN in the projection's gradient, silently (base).
# Each takes 3-d weights a (b, q, k), or 4-d ones a4 (b, heads, q, k), and the values h (b, k, d).
LAYOUTS = {
    "copy between two transposes": lambda a, a4, h: a.transpose(1, 2).contiguous().transpose(1, 2) @ h,
    "mT, scaled, mT": lambda a, a4, h: (a.mT * 0.5).mT @ h,
    "swapaxes, scaled, swapaxes": lambda a, a4, h: (a.swapaxes(1, 2) * 0.5).swapaxes(1, 2) @ h,
    "movedim, scaled, movedim": lambda a, a4, h: (a.movedim(0, 2) * 0.5).movedim(2, 0) @ h,
    "einsum of scaled weights": lambda a, a4, h: torch.einsum("bqk,bkd->bqd", a * 0.7, h),
    "einsum summing heads": lambda a, a4, h: torch.einsum("bhqk,bkd->bqd", a4 * 0.5, h),
    "matmul 3-d x 4-d": lambda a, a4, h: (a @ torch.stack([h, 2 * h])).sum(0),
    "scaled matmul 3-d x 4-d": lambda a, a4, h: ((a * 0.5) @ torch.stack([h, 2 * h])).sum(0),
    "expand": lambda a, a4, h: ((a * 0.5)[None].expand(2, *a.shape) @ torch.stack([h, 2 * h])).sum(0),
    "one head (select)": lambda a, a4, h: a4[:, 1] @ h,
    "heads sliced, matmul 4-d x 4-d": lambda a, a4, h: (a4[:, 1:] @ h[:, None]).sum(1),
    "heads merged by a reshape": lambda a, a4, h: a4.transpose(1, 2).reshape(a.shape[0], a.shape[1], -1)
    @ torch.cat([h, 2 * h], 1),
    "t() of a scaled t()": lambda a, a4, h: torch.stack([(a[i].t() * 0.5).t() @ h[i] for i in range(a.shape[0])]),
    "heads chunked": lambda a, a4, h: sum(c.squeeze(1) @ h for c in a4.chunk(2, 1)),
    "heads unbound": lambda a, a4, h: sum(c @ h for c in a4.unbind(1)),
    "repeated": lambda a, a4, h: (a.repeat(2, 1, 1) @ torch.cat([h, 2 * h])).view(2, *a.shape[:2], -1).sum(0),
    # the weights as the product's second operand (SAGAN's and non-local blocks' bmm(v, attention.permute(0, 2, 1)))
    "weights second: (v^T @ a^T)^T": lambda a, a4, h: torch.bmm(h.transpose(1, 2), a.permute(0, 2, 1)).transpose(1, 2),
    "weights second, scaled, mm": lambda a, a4, h: torch.stack([(h[i].t() @ (a[i] * 0.5).t()).t()
                                                                for i in range(a.shape[0])]),
    # attention pooling: the weights times the values elementwise (MulBackward0's g * a: _softmax_factor), the factor
    # reached through the same layout ops (base: only views of the softmax's result, or order-keeping nodes)
    "pooling, copy between two transposes": lambda a, a4, h: (a.transpose(1, 2).contiguous().transpose(1, 2)[..., None]
                                                              * h[:, None]).sum(2),
    "pooling, mT, scaled, mT": lambda a, a4, h: ((a.mT * 0.5).mT[..., None] * h[:, None]).sum(2),
    "pooling, einsum of scaled weights": lambda a, a4, h: torch.einsum("bqk,bkd->bqkd", a * 0.5, h).sum(2),
    "pooling, keys first": lambda a, a4, h: ((a * 0.5).permute(0, 2, 1)[..., None] * h[:, :, None]).sum(1),
    # the values' product inside an op with a bias: its node (BaddbmmBackward0, AddmmBackward0) saves the weights as
    # batch1/mat1, its formula scales a^T @ g by alpha; until sz35 only MmBackward0/BmmBackward0 were read
    "baddbmm": lambda a, a4, h: torch.baddbmm(torch.ones(*a.shape[:2], h.shape[-1], dtype=D), a, h),
    "baddbmm, alpha 0.5": lambda a, a4, h: torch.baddbmm(torch.ones(*a.shape[:2], h.shape[-1], dtype=D), a, h,
                                                         alpha=0.5),
    "addmm per sequence": lambda a, a4, h: torch.stack([torch.addmm(torch.ones(h.shape[-1], dtype=D), a[i], h[i],
                                                                    alpha=0.5) for i in range(a.shape[0])]),
}


def _case(layout, factor=None, softmax=lambda t: t.softmax(-1), seed=35):
    """Attention over the rows of x: scores from x (q_w), values h = sqrt((x @ w)^2) (an infinite slope at a zero
    row), the weights ``softmax``'s through ``layout``; ``factor`` multiplies the weights first (a constant). Padded
    queries are dropped by a where."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 4, dtype=D, generator=gen)
    w = torch.randn(4, 4, dtype=D, generator=gen, requires_grad=True)
    q_w = torch.randn(4, 4, dtype=D, generator=gen, requires_grad=True)

    def loss_of(xx, lens):
        keep = torch.arange(xx.shape[1])[None, :] < lens[:, None]
        h = (xx @ w).pow(2).sqrt()
        bias = torch.zeros(keep.shape, dtype=D).masked_fill(~keep, -math.inf)
        s = (xx @ q_w) @ xx.transpose(1, 2) + bias[:, None, :]
        a, a4 = softmax(s), softmax(s[:, None] * HEADS)
        if factor is not None:
            a = a * factor(a)
        return torch.where(keep[..., None], LAYOUTS[layout](a, a4, h), 0.0).pow(2).sum()

    return x, [w, q_w], loss_of


@pytest.mark.parametrize("layout", LAYOUTS)
def test_masked_weights_through_layout_ops_give_padded_values_the_deleted_keys_zero(layout):
    x, params, loss_of = _case(layout)
    matches_the_deleted_program(loss_of, params, x, torch.tensor([5, 3]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_masked_weights_through_layout_ops_controls(layout):
    """Finite data: PyTorch's bits; a kept key's zero row (its weight not 0): PyTorch's NaN stays."""
    x, params, loss_of = _case(layout)
    keeps_the_controls(loss_of, params, x, torch.tensor([5, 3]))


def _kept_key_zeroed(a):
    """A constant that zeroes every weight of key 1 (a kept key): a factor's 0, a value (as dropout's)."""
    c = torch.ones_like(a)
    c[..., 1] = 0.0
    return c


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if "head" not in k])
def test_a_factors_zero_at_a_kept_keys_singular_value_stays_nan_through_layout_ops(layout):
    """Key 1 is kept (not masked) and its row is zero (its value's slope infinite); a constant zeroes its weights.
    That 0 is no masked entry's: 0 x inf = NaN is the program's own and stays (the softmax's mask, carried through
    the layout, marks only the padded keys)."""
    x, params, loss_of = _case(layout, _kept_key_zeroed)
    lens = torch.tensor([5, 3])
    x[-1, 3:] = 0.0
    x[:, 1] = 0.0
    plain = torch.autograd.grad(loss_of(x, lens), params)[0]
    assert plain.isnan().any(), "premise: the kept key's 0 x inf"
    assert gw.grad(loss_of(x, lens), params)[0].isnan().any()


# -- weights computed without grad ------------------------------------------------------------------------------------
# with torch.no_grad(): a = softmax(s + mask); then a @ v with v needing a gradient. The graph holds no softmax, only
# the bmm's saved constant; a constant's exact 0 is a value (as a literal mul_(0)'s: docs/strong-zeros-design.md,
# Known limits), so the padded key's 0 x inf stays PyTorch's. Masking the values is the way to the deleted program.
def _constant_weights_case(mask_values):
    gen = torch.Generator().manual_seed(35)
    x = torch.randn(2, 5, 4, dtype=D, generator=gen)
    w = torch.randn(4, 4, dtype=D, generator=gen, requires_grad=True)

    def loss_of(xx, lens):
        keep = torch.arange(xx.shape[1])[None, :] < lens[:, None]
        bias = torch.zeros(keep.shape, dtype=D).masked_fill(~keep, -math.inf)
        with torch.no_grad():
            a = ((xx @ xx.transpose(1, 2)) + bias[:, None, :]).softmax(-1)
        h = (xx @ w).pow(2).sqrt()
        if mask_values:
            h = h.masked_fill(~keep[..., None], 0.0)
        return torch.where(keep[..., None], a @ h, 0.0).pow(2).sum()

    return x, [w], loss_of


def test_weights_computed_without_grad_are_a_constant_whose_zeros_are_values():
    x, params, loss_of = _constant_weights_case(mask_values=False)
    lens = torch.tensor([5, 3])
    x[-1, 3:] = 0.0
    plain = torch.autograd.grad(loss_of(x, lens), params)[0]
    assert plain.isnan().any(), "premise: PyTorch's 0 x inf"
    torch.testing.assert_close(gw.grad(loss_of(x, lens), params)[0], plain, equal_nan=True, rtol=0, atol=0)


def test_constant_weights_over_masked_values_give_the_deleted_keys_zero():
    x, params, loss_of = _constant_weights_case(mask_values=True)
    matches_the_deleted_program(loss_of, params, x, torch.tensor([5, 3]))


# -- the layout map itself -------------------------------------------------------------------------------------------
CHAINS = {
    "negative slice, step": lambda a: a[:, -3:, ::2] * 1.0,
    "negative select": lambda a: a.select(-1, -2).unsqueeze(0).expand(3, -1, -1),
    "movedim, reshape": lambda a: (a.movedim(-1, 0) * 1.0).reshape(-1, 2),
    "permute, mT, contiguous": lambda a: a.permute(2, 0, 1).mT.contiguous().view(-1),
    "chunk piece 1": lambda a: a.chunk(2, 1)[1].transpose(0, 2),
    "unbind piece 2": lambda a: a.unbind(-1)[2].t(),
    "split with sizes": lambda a: a.split([1, 3], 1)[1].flatten(),
    "repeat, squeeze": lambda a: a[:, :1].repeat(2, 1, 2).squeeze(1),
    "broadcast by a product": lambda a: a * torch.ones(2, 1, 1, 1, dtype=D),
}


@pytest.mark.parametrize("chain", CHAINS)
def test_the_layout_map_is_the_forward_layout(chain):
    """mapped_mask replays a weights path's layout nodes on a tensor shaped like the softmax's result: on the elements'
    ids it gives what the forward gave (each weight the id of the softmax element it is a copy of)."""
    from gradwise._strong_zeros._rules_bilinear import _PATH_BUDGET, _path_from
    from gradwise._strong_zeros._weights_layout import mapped_mask

    s = torch.randn(2, 4, 5, dtype=D, requires_grad=True)
    a = s.softmax(-1)
    consumer = (CHAINS[chain](a) * 0.5).grad_fn
    path = _path_from(consumer.next_functions[0][0], _PATH_BUDGET)
    assert path is not None and path[-1].name() == "SoftmaxBackward0"
    ids = torch.arange(a.numel(), dtype=D).view(a.shape)
    assert torch.equal(mapped_mask(consumer, path, ids), CHAINS[chain](ids))
