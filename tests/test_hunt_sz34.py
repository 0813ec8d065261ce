"""Hunt (session 34, sz34): strong zeros where attention weights reach the values' product through a gate, a
renormalisation or the usual repair of fully masked rows. References are independent of gradwise: the same program
with the padded keys deleted (each sequence on its own rows, float64), or plain PyTorch where the value is the user's.
"""

from __future__ import annotations

import math

import pytest
import torch

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)
from test_hunt_sz32 import keeps_the_controls, matches_the_deleted_program

D = torch.float64


# -- masked attention weights on their way to the values' bmm --------------------------------------------------------
# softmax(q k^T + mask) gives a padded key the weight exp(-inf) = 0, and v's gradient a^T @ g is then the deleted key's
# 0 (_rules_bilinear._masked_weights_mm), also where the padded value's formula is singular (sqrt of a zero padding
# row: PyTorch's 0 x inf = NaN). Only constant factors, dropout and views were followed between the softmax and the
# bmm: a gate that needs a gradient, a renormalisation p / p.sum(-1) and the repairs of a fully masked row
# (nan_to_num, masked_fill or where of the key mask) kept PyTorch's NaN in the projection's gradient, silently, and so
# did a softmax written as exp(log_softmax(s)).
WEIGHTS = {
    "gate (a * g)": lambda a, gate, pad: a * gate,
    "gate first (g * a)": lambda a, gate, pad: gate * a,
    "renormalised": lambda a, gate, pad: a / a.sum(-1, keepdim=True),
    "nan_to_num": lambda a, gate, pad: a.nan_to_num(0.0),
    "masked_fill of the key mask": lambda a, gate, pad: a.masked_fill(pad, 0.0),
    "masked_fill with a tensor value": lambda a, gate, pad: a.masked_fill(pad, torch.zeros((), dtype=D)),
    "where of the key mask": lambda a, gate, pad: torch.where(pad, 0.0, a),
    "gate, then matmul of 4-d weights": lambda a, gate, pad: a * gate,
    "exp of log_softmax": lambda a, gate, pad: a,
    "exp of log_softmax, masked_fill": lambda a, gate, pad: a.masked_fill(pad, 0.0),
}


def _loss(name, params, x, lens):
    w, q_w, g_w = (*params, None)[:3]
    keep = torch.arange(x.shape[1])[None, :] < lens[:, None]
    h = (x @ w).pow(2).sqrt()  # (an infinite slope at a zero padding row)
    bias = torch.zeros(keep.shape, dtype=D).masked_fill(~keep, -math.inf)
    s = h @ q_w @ h.transpose(1, 2) + bias[:, None, :]
    a = s.log_softmax(-1).exp() if "log_softmax" in name else s.softmax(-1)
    a = WEIGHTS[name](a, None if g_w is None else torch.sigmoid(h @ g_w), ~keep[:, None, :])
    out = (a[:, None] @ h[:, None])[:, 0] if "4-d" in name else torch.bmm(a, h)
    return torch.where(keep[..., None], out, 0.0).pow(2).sum()


def _case(name, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 4, dtype=D, generator=gen)
    params = [torch.randn(4, 4, dtype=D, generator=gen).requires_grad_(),
              torch.randn(4, 4, dtype=D, generator=gen).requires_grad_(),
              torch.randn(4, 1, dtype=D, generator=gen).requires_grad_()]
    return x, params if "gate" in name else params[:2]  # (the gate's projection)


@pytest.mark.parametrize("name", list(WEIGHTS))
def test_masked_weights_through_a_gate_or_a_repair_give_padded_values_the_deleted_keys_zero(name):
    x, params = _case(name)
    matches_the_deleted_program(lambda x, lens: _loss(name, params, x, lens), params, x, torch.tensor([5, 3]))


@pytest.mark.parametrize("name", list(WEIGHTS))
def test_masked_weights_through_a_gate_or_a_repair_controls(name):
    x, params = _case(name, 1)
    keeps_the_controls(lambda x, lens: _loss(name, params, x, lens), params, x, torch.tensor([5, 3]))


# -- the same weights multiplied elementwise (attention pooling) -------------------------------------------------------
# (softmax(s)[..., None] * h).sum(1): mul's rule took the weights' exact 0 as structural only where the factor was the
# softmax's result or a view of it; a constant scaling, a clone, a renormalisation or a repair of fully masked rows on
# the way kept PyTorch's 0 x inf = NaN at a padded value's infinite slope, silently.
POOLED = {
    "scaled": lambda a, pad: a * 2.0,
    "cloned": lambda a, pad: a.clone(),
    "renormalised": lambda a, pad: a / a.sum(1, keepdim=True),
    "nan_to_num": lambda a, pad: a.nan_to_num(0.0),
    "masked_fill of the mask": lambda a, pad: a.masked_fill(pad, 0.0),
    "where of the mask": lambda a, pad: torch.where(pad, 0.0, a),
}


def _pooled_loss(name, params, x, lens):
    w, u = params
    keep = torch.arange(x.shape[1])[None, :] < lens[:, None]
    h = (x @ w).pow(2).sqrt()  # (an infinite slope at a zero padding row)
    a = POOLED[name]((h @ u).squeeze(-1).masked_fill(~keep, -math.inf).softmax(-1), ~keep)
    return (a[..., None] * h).sum(1).pow(2).sum()


def _pooled_case(seed, cols=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 4, dtype=D, generator=gen)
    return x, [torch.randn(4, 4, dtype=D, generator=gen).requires_grad_(),
               torch.randn(4, cols, dtype=D, generator=gen).requires_grad_()]


@pytest.mark.parametrize("name", list(POOLED))
def test_pooling_weights_through_a_scaling_or_a_repair_give_padded_values_the_deleted_entries_zero(name):
    x, params = _pooled_case(2)
    matches_the_deleted_program(lambda x, lens: _pooled_loss(name, params, x, lens), params, x, torch.tensor([5, 3]))


@pytest.mark.parametrize("name", list(POOLED))
def test_pooling_weights_through_a_scaling_or_a_repair_controls(name):
    x, params = _pooled_case(3)
    keeps_the_controls(lambda x, lens: _pooled_loss(name, params, x, lens), params, x, torch.tensor([5, 3]))


# -- SDPA's math backend: _safe_softmax --------------------------------------------------------------------------------
# The math backend (torch.nn.attention.sdpa_kernel(SDPBackend.MATH); the one with a double backward, for gradient
# penalties) computes the weights with _safe_softmax, whose node is SafeSoftmaxBackward0: the bmm with v did not know
# them for a softmax's, and a padded value's infinite slope made the projection's gradient NaN, silently.
def _math_sdpa_loss(mask, params, x, lens):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    w, q_w = params
    keep = torch.arange(x.shape[1])[None, :] < lens[:, None]
    h = (x @ w).pow(2).sqrt()  # (an infinite slope at a zero padding row)
    m = keep[:, None, None, :] if mask == "bool" else \
        torch.zeros(keep.shape, dtype=D).masked_fill(~keep, -math.inf)[:, None, None, :]
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention((h @ q_w)[:, None], h[:, None], h[:, None], m)[:, 0]
    return torch.where(keep[..., None], out, 0.0).pow(2).sum()


@pytest.mark.parametrize("mask", ["bool", "float"])
def test_sdpa_math_backend_gives_padded_values_the_deleted_keys_zero(mask):
    x, params = _pooled_case(4, cols=4)
    matches_the_deleted_program(lambda x, lens: _math_sdpa_loss(mask, params, x, lens), params, x,
                                torch.tensor([5, 3]))


@pytest.mark.parametrize("mask", ["bool", "float"])
def test_sdpa_math_backend_controls(mask):
    x, params = _pooled_case(5, cols=4)
    keeps_the_controls(lambda x, lens: _math_sdpa_loss(mask, params, x, lens), params, x, torch.tensor([5, 3]))


# -- under torch.func transforms ---------------------------------------------------------------------------------------
# The masked-weights rules read the running node's saved tensors, which are the transform's wrappers under torch.func:
# they stand aside there (PyTorch's values), and the rules that do so are named by an OpaqueBackwardWarning when the
# gradients end up non-finite (_transforms._node_readers). mm/bmm's and mul's were not named: per-sample gradients
# (vmap(grad)) of masked attention over a padded batch kept the padded value's 0 x inf = NaN without a word.
def _one_sequence_attention(pooled):
    def loss(w, q_w, x, keep):
        h = (x @ w).pow(2).sqrt()  # (an infinite slope at a zero padding row)
        s = (h @ q_w) @ h.T + torch.zeros(keep.shape, dtype=D).masked_fill(~keep, -math.inf)
        out = (s.softmax(-1)[..., None] * h).sum(1) if pooled else s.softmax(-1) @ h
        return torch.where(keep[:, None], out, 0.0).pow(2).sum()
    return loss


@pytest.mark.parametrize("how", ["grad", "vmap(grad)"])
@pytest.mark.parametrize("pooled", [False, True], ids=["bmm", "pooled"])
def test_masked_weights_under_a_transform_keep_pytorchs_gradient_and_are_named(how, pooled):
    x, params = _pooled_case(6, cols=4)
    w, q_w = (p.detach() for p in params)
    x[1, 3:] = 0.0
    keep = torch.arange(5)[None, :] < torch.tensor([5, 3])[:, None]
    per_sample = torch.func.grad(_one_sequence_attention(pooled), argnums=(0, 1))
    if how == "grad":
        call = lambda: per_sample(w, q_w, x[1], keep[1])
    else:
        call = lambda: torch.func.vmap(per_sample, in_dims=(None, None, 0, 0))(w, q_w, x, keep)
    expected = call()
    assert not bool(expected[0].isfinite().all())
    with pytest.warns(gw.OpaqueBackwardWarning, match="under a torch.func transform"), gw.strong_zeros():
        got = call()
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g.nan_to_num(7.0), e.nan_to_num(7.0))
