"""Review of sz34 (session 34): breaks of the masked-weights paths through a gate or a repair. References are
plain PyTorch where the padded key's value is used (its NaN is genuine), independent of gradwise."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)
from test_hunt_sz32 import _same

D = torch.float64


# -- a replacement that needs a gradient ------------------------------------------------------------------------------
# where(keep, a, other) and a.masked_fill(pad, value) put the replacement's value at the padded keys, not the softmax's
# 0: where that replacement is a tensor that needs a gradient (a learned prior, a learned fill) its 0 is a value, and
# the padded key's value is used (other's gradient there is g . v_k): the program with the padded key deleted is a
# different program, and PyTorch's 0 x inf = NaN at the padded value's infinite slope is genuine. sz34 took the weight
# 0 there for the masked key's (the softmax's result 0 there) and gave a finite gradient, silently.
REPLACED = {
    "where(keep, a, other)": lambda a, keep, other: torch.where(keep, a, other),
    "where(pad, other, a)": lambda a, keep, other: torch.where(~keep, other, a),
    "masked_fill(pad, value)": lambda a, keep, other: a.masked_fill(~keep, other.flatten()[0]),
}


def _replaced_loss(name, params, x, lens, pooled):
    w, q_w, other = params
    keep = torch.arange(x.shape[1])[None, :] < lens[:, None]
    h = (x @ w).pow(2).sqrt()  # (an infinite slope at a zero padding row)
    bias = torch.zeros(keep.shape, dtype=D).masked_fill(~keep, -math.inf)
    if pooled:  # attention pooling: (a[..., None] * h).sum(1)
        a = REPLACED[name]((h @ q_w[:, 0] + bias).softmax(-1), keep, other[:, 0])
        return (a[..., None] * h).sum(1).pow(2).sum()
    a = REPLACED[name]((h @ q_w @ h.transpose(1, 2) + bias[:, None, :]).softmax(-1), keep[:, None, :], other)
    return torch.where(keep[..., None], torch.bmm(a, h), 0.0).pow(2).sum()


@pytest.mark.parametrize("pooled", [False, True], ids=["bmm", "pooled"])
@pytest.mark.parametrize("name", list(REPLACED))
def test_a_replacement_that_needs_a_gradient_keeps_pytorchs_nan(name, pooled):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, 4, dtype=D, generator=gen)
    params = [torch.randn(4, 4, dtype=D, generator=gen).requires_grad_(),
              torch.randn(4, 4, dtype=D, generator=gen).requires_grad_(),
              torch.zeros(2, 5, 5, dtype=D).requires_grad_()]  # (a learned prior / fill: its value 0)
    lens = torch.tensor([5, 3])
    x[-1, 3:] = 0.0  # the padded keys' values: sqrt's infinite slope
    plain = torch.autograd.grad(_replaced_loss(name, params, x, lens, pooled), params)
    assert not bool(plain[0].isfinite().all()), "premise: the used padded value's 0 x inf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gw.OpaqueBackwardWarning)
        got = gw.grad(_replaced_loss(name, params, x, lens, pooled), params)
    for g, p in zip(got, plain, strict=True):
        assert _same(g, p)


# -- exp(log_softmax(s)) of a finite score: an underflow, the key used -----------------------------------------------
# sz34 reads exp(log_softmax(s)) as a softmax and took every exact 0 of it for a masked key's. A key with a finite bias
# (-1000 here; HF-style finfo.min masks are finite too) has log weight -1000 - lse, finite, and exp's 0 of a finite
# input is a value (exp's own rule: only exp(-inf) is structural); unlike softmax's result the log tells the two
# apart. The key's value is used (its weight is a value that underflowed): PyTorch's 0 x inf at its infinite slope
# must stay. Keys and queries are linear in x, so the value's slope is the only singular one.
def _underflow_loss(pooled, params, x):
    w, q_w = params
    v = (x @ w).pow(2).sqrt()  # (an infinite slope at the zero row)
    bias = torch.zeros(x.shape[:2], dtype=D)
    bias[1, 3] = -1000.0  # finite: exp(-1000 - lse) underflows to 0 in float64
    if pooled:
        return ((x @ q_w[:, 0] + bias).log_softmax(-1).exp()[..., None] * v).sum(1).pow(2).sum()
    s = (x @ q_w) @ x.transpose(1, 2) + bias[:, None, :]
    return torch.bmm(s.log_softmax(-1).exp(), v).pow(2).sum()


@pytest.mark.parametrize("pooled", [False, True], ids=["bmm", "pooled"])
def test_exp_of_log_softmax_underflow_of_a_finite_score_keeps_pytorchs_nan(pooled):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, dtype=D, generator=gen)
    params = [torch.randn(4, 4, dtype=D, generator=gen).requires_grad_(),
              torch.randn(4, 4, dtype=D, generator=gen).requires_grad_()]
    x[1, 3] = 0.0  # the used key whose weight underflowed
    plain = torch.autograd.grad(_underflow_loss(pooled, params, x), params)
    assert not bool(plain[0].isfinite().all()), "premise: the used value's 0 x inf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gw.OpaqueBackwardWarning)
        got = gw.grad(_underflow_loss(pooled, params, x), params)
    for g, p in zip(got, plain, strict=True):
        assert _same(g, p)


# -- under vmap, one sample's NaN output ------------------------------------------------------------------------------
# sz34 names the masked-weights rules (which stand aside under torch.func) in an OpaqueBackwardWarning only while every
# output is finite (reads_softmax_weights). Under vmap the outputs are read for the whole batch: where another sample's
# output is NaN, the padded sample keeps PyTorch's 0 x inf = NaN, which its own gw.grad removes, without a word (exp's
# and softmax's rules say so with _supports._MIXED_OUTPUTS there). Naming them under _STATE.outputs_batched too makes
# test_hunt_func_transforms' test_a_used_nan_stays[softmax_mask/sdpa_rows-vmap...] warn where no sample is padded.
# sz36: named for the samples whose own outputs are finite (_transforms.per_sample_lost, name_per_sample).
def test_vmap_batch_with_a_nan_output_names_the_padded_samples_kept_nan():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 5, 4, dtype=D, generator=gen)
    w, q_w = torch.randn(4, 4, dtype=D, generator=gen), torch.randn(4, 4, dtype=D, generator=gen)
    x[1, 3:] = 0.0  # sample 1: padded keys with sqrt's infinite slope
    x[2, 0, 0] = math.nan  # sample 2: a NaN output
    keep = torch.arange(5)[None, :] < torch.tensor([5, 3, 5])[:, None]

    def loss(w, q_w, x, keep):
        h = (x @ w).pow(2).sqrt()
        s = (h @ q_w) @ h.T + torch.zeros(keep.shape, dtype=D).masked_fill(~keep, -math.inf)
        return torch.where(keep[:, None], s.softmax(-1) @ h, 0.0).pow(2).sum()

    own = gw.grad(loss(w1 := w.clone().requires_grad_(), q_w, x[1], keep[1]), w1)[0]
    assert bool(own.isfinite().all()), "premise: the padded sample's own gradient is finite"
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, None, 0, 0))
    with warnings.catch_warnings(record=True) as caught, gw.strong_zeros():
        warnings.simplefilter("always")
        got = per_sample(w, q_w, x, keep)
    assert bool(got[1].isfinite().all()) or any(issubclass(c.category, gw.OpaqueBackwardWarning) for c in caught)
