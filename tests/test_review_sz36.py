"""Review of session 36's sz36 (copies-only reads of a softmax's masked weights; per-sample naming under vmap).

References: plain PyTorch where the NaN is genuine, and the same program with the write made by a tracked constant
fill (``masked_fill(used, 0)``), whose 0 at a used key strong zeros keep as a value (``_GATED_PATH``).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)

D = torch.float64


def _written_case(product, how):
    """Attention of 3 queries over 5 keys, keys 3 and 4 masked (-inf) with zero value rows; key 1 used, its value row
    zero too (sqrt's infinite slope), and its weight set to 0 by a write to a clone of the weights: under no_grad
    (the graph's nodes stay a clone's), or by a tracked constant masked_fill (the reference: its 0 is a value)."""
    gen = torch.Generator().manual_seed(36)
    x = torch.randn(5, 4, dtype=D, generator=gen)
    x[1] = 0.0
    x[3:] = 0.0
    w = torch.randn(4, 4, dtype=D, generator=gen, requires_grad=True)
    s = torch.randn(3, 5, dtype=D, generator=gen, requires_grad=True)
    bias = torch.zeros(5, dtype=D).masked_fill(torch.arange(5) >= 3, -math.inf)
    used = torch.zeros(3, 5, dtype=torch.bool)
    used[:, 1] = True

    def loss():
        h = (x @ w).pow(2).sqrt()
        if how == "tracked":
            b = (s + bias).softmax(-1).clone().masked_fill(used, 0.0)
        else:
            soft = (lambda u: (u + bias).softmax(-1))
            b = (checkpoint(soft, s, use_reentrant=False) if how == "checkpointed" else soft(s)).clone()
            with torch.no_grad():
                b[:, 1] = 0.0  # (a used key's weight: the clone's node stays, its bits are not the softmax's)
        out = torch.bmm(b[None], h[None]) if product == "bmm" else (b[..., None] * h).sum(1)
        return out.pow(2).sum()

    return loss, w


@pytest.mark.parametrize("how", ["no_grad", "checkpointed", "tracked"])
@pytest.mark.parametrize("product", ["bmm", "mul"])
def test_a_used_keys_weight_written_under_no_grad_keeps_its_nan(product, how):
    """sz36 read a clone's zeros as the softmax's (``copies_only``) whatever was written to it since: a used key's
    weight zeroed under no_grad was taken for a masked key's, and its value's 0 x inf = NaN hidden (SILENT), where the
    tracked write (and sz36's base) keeps it. The clone's version counter tells: a written copy is read through the
    softmax's result (named where a checkpoint's hook hides that)."""
    named = _pytorchs_nan_named(*_written_case(product, how))
    assert any("a hook hides" in m for m in named) == (how == "checkpointed"), named


def _pytorchs_nan_named(loss, w):
    """gw.grad's gradient of w, checked to be PyTorch's (NaN where it is, which is there), and the
    OpaqueBackwardWarnings it gave."""
    plain = torch.autograd.grad(loss(), [w])[0]
    assert plain.isnan().any(), "premise: the used key's 0 x inf"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = gw.grad(loss(), [w])[0]
    assert torch.equal(got.isnan(), plain.isnan()) and torch.equal(got.nan_to_num(), plain.nan_to_num())
    return [str(c.message) for c in caught if issubclass(c.category, gw.OpaqueBackwardWarning)]


def _unmasked_case(product):
    """A checkpointed softmax with no key masked, scaled on the way to the product (the hook hides its result), and a
    used key's zero value row (sqrt's infinite slope): PyTorch's NaN is genuine, and no weight is 0."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, dtype=D, generator=gen)
    x[1] = 0.0
    w = torch.randn(4, 4, dtype=D, generator=gen, requires_grad=True)
    s = torch.randn(3, 5, dtype=D, generator=gen, requires_grad=True)

    def loss():
        h = (x @ w).pow(2).sqrt()
        a = checkpoint(lambda u: u.softmax(-1), s, use_reentrant=False) * 0.5
        out = torch.bmm(a[None], h[None]) if product == "bmm" else (a[..., None] * h).sum(1)
        return out.pow(2).sum()

    return loss, w


@pytest.mark.parametrize("product", ["bmm", "mul"])
def test_hidden_weights_with_no_zero_are_not_named(product):
    """sz36 named a checkpointed softmax's hidden result wherever the gradients ended NaN, also where the product's
    own weights (readable: outside the checkpoint) hold no exact 0: no key is masked there, so no structural zero can
    be lost, and the OpaqueBackwardWarning blamed a genuine NaN on masked keys that do not exist (a needless
    warning). The gradients are PyTorch's either way."""
    named = _pytorchs_nan_named(*_unmasked_case(product))
    assert not [m for m in named if "a hook hides" in m], named
