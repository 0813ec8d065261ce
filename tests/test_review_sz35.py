"""Review of sz35 (session 35): breaks of the masked attention weights' map (_weights_layout, _rules_bilinear's
weights paths). References are independent of gradwise: plain PyTorch where the NaN is genuine.
"""

from __future__ import annotations

import math
import warnings

import torch

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)

D = torch.float64


def test_two_heads_of_one_weights_buffer_keep_the_other_heads_value_zero():
    """bmm(buf[:, 0], buf[:, 1]): both operands are views of one buffer of weights (buf = softmax(s) * c). Head 1's
    weight at key 1 is a constant's 0 (a value) and meets sqrt's infinite slope: head 0's gradient g @ head1^T holds
    PyTorch's genuine 0 x inf = NaN at every kept entry. sz35 followed the select to the softmax and took head 1 (the
    formula's other operand, sharing head 0's storage) for head 0, whose zeros are all masked: every zero of head 1
    was structural, head 0's gradient finite (SILENT)."""
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(1, 2, 4, 4, dtype=D, generator=gen)
    s[..., 3] = -math.inf  # key 3 masked in both heads
    s.requires_grad_(True)
    c = torch.ones(1, 2, 1, 4, dtype=D)
    c[0, 1, 0, 1] = 0.0  # head 1: key 1 (kept) zeroed by a constant

    def loss() -> torch.Tensor:
        buf = s.softmax(-1) * c
        return torch.bmm(buf[:, 0], buf[:, 1]).sqrt().sum()  # columns 1 and 3 of the product are 0: slope inf

    plain = torch.autograd.grad(loss(), [s])[0]
    assert bool(plain[0, 0, :, :3].isnan().all()), "premise: head 1's value zero x inf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gw.OpaqueBackwardWarning)
        got = gw.grad(loss(), [s])[0]
    assert bool(got[0, 0, :, :3].isnan().all())


def test_weights_scaled_by_their_sum_over_every_dim_do_not_crash_the_backward():
    """a.sum(dim=None, keepdim=True) * a on the way to the values: SumBackward1 saves dim None, which sz35's layout map
    iterated (TypeError from gradwise's rule, crash). The kept keys' gradients are the deleted program's; a padded
    key's value may keep PyTorch's 0 x inf (the gated mul follows its first edge, the sum, whose map marks nothing:
    a needless refusal, not a silent number) or get the deleted key's 0."""
    s = torch.randn(2, 5, 5, dtype=D, generator=torch.Generator().manual_seed(1))
    s[..., 3:] = -math.inf  # keys 3 and 4 masked
    s.requires_grad_(True)
    x = torch.rand(2, 5, 4, dtype=D, generator=torch.Generator().manual_seed(2)) + 0.5
    x[:, 3:] = 0.0
    x.requires_grad_(True)

    def loss(keys: int) -> torch.Tensor:
        a = s[:, :, :keys].softmax(-1)
        return ((a.sum(dim=None, keepdim=True) * a) @ x[:, :keys].sqrt()).sum()

    plain_x = torch.autograd.grad(loss(5), [x])[0]
    assert not bool(plain_x.isfinite().all()), "premise: PyTorch's 0 x inf"
    got_s, got_x = gw.grad(loss(5), [s, x])
    want_s, want_x = torch.autograd.grad(loss(3), [s, x])  # the program with the padded keys deleted
    torch.testing.assert_close(got_x[:, :3], want_x[:, :3], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_s[..., :3], want_s[..., :3], rtol=1e-12, atol=1e-14)
    padded = got_x[:, 3:]
    assert torch.equal(padded, torch.zeros_like(padded)) \
        or torch.equal(padded.nan_to_num(7.0), plain_x[:, 3:].nan_to_num(7.0))


def _no_heads_beside_a_masked_attention(weights_of):
    """``weights_of(s)`` (s has no heads: 0-size dim 1) multiplies the values (sqrt of rows, zero at keys 3 and 4),
    beside a masked attention over the same values (whose padded keys make the plan run the rules). Returns
    PyTorch's gradient of the values, which must hold the premise's 0 x inf, and gw's."""
    s = torch.randn(2, 0, 5, 5, dtype=D, requires_grad=True)
    masked = torch.randn(2, 5, 5, dtype=D, generator=torch.Generator().manual_seed(4))
    masked[..., 3:] = -math.inf
    masked.requires_grad_(True)
    x = torch.rand(2, 5, 4, dtype=D, generator=torch.Generator().manual_seed(3)) + 0.5
    x[:, 3:] = 0.0
    x.requires_grad_(True)

    def loss() -> torch.Tensor:
        v = x.sqrt()
        return ((weights_of(s) * 0.5) @ v).sum() + (masked.softmax(-1) @ v).sum()

    plain = torch.autograd.grad(loss(), [x])[0]
    assert bool(plain[:, 3:].isnan().all()), "premise: PyTorch's 0 x inf"
    return plain, gw.grad(loss(), [x])[0]


def test_a_sum_over_no_heads_is_a_value_zero_and_does_not_crash_the_backward():
    """softmax(s).sum(1) over a heads dim of size 0 (a configuration with no heads of a kind) gives weights that are
    all 0, a sum of no terms: sz35's layout map took amin over the empty dim (IndexError from gradwise's rule, crash).
    No softmax masked that 0: it is a value, and a zero value row's 0 x inf stays PyTorch's NaN."""
    plain, got = _no_heads_beside_a_masked_attention(lambda s: s.softmax(-1).sum(1))
    assert torch.equal(got.nan_to_num(7.0), plain.nan_to_num(7.0))


def test_a_total_of_no_weights_is_a_value_zero():
    """softmax(s).sum() of an empty s (no heads), expanded into weights, is a 0 no softmax masked: a value. sz35's
    layout map gave SumBackward0 mask.all(), True for no terms: every weight 'masked', a zero value row's genuine
    0 x inf = NaN hidden (SILENT)."""
    plain, got = _no_heads_beside_a_masked_attention(lambda s: s.softmax(-1).sum().expand(2, 5, 5))
    assert torch.equal(got.nan_to_num(7.0), plain.nan_to_num(7.0))
