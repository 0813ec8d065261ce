"""Review of misc36 (review_misc36): breaks found in its logcumsumexp saved-value reads, the trace's pack-hook
node claim and the torch 2.14 custom-forward marks. Ground truth: plain PyTorch on the program with the unused
values deleted, plain PyTorch's count of a user's unpack hook, and the trace's node records without the hook."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import gradwise as gw
from test_review_misc36 import _Counting


def _complex_lcse_w_grad(where: str, rows: int = 6, hooks: _Counting | None = None) -> torch.Tensor:
    """w.grad of |logcumsumexp(x * w, 1)[:4, -1]|^2 summed, complex128, x's rows 4: NaN padding (dropped by the
    [:4]); ``rows`` = 4: the same program with those rows deleted."""
    torch.manual_seed(0)
    w = torch.randn(6, 4, dtype=torch.complex128)[:rows].requires_grad_()
    x = torch.randn(6, 4, dtype=torch.complex128)
    x[4:] = complex(float("nan"), 0.0)
    x = x[:rows]

    def lcse(y):
        return y.logcumsumexp(1)[:4, -1]

    if where == "checkpoint":
        out = checkpoint(lambda y: lcse(y * w), x.clone(), use_reentrant=False)
    else:
        with hooks() if hooks is not None else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            out = lcse(x.clone() * w)
    out.abs().pow(2).sum().backward()
    return w.grad


@pytest.mark.parametrize("where", ["saved_tensors_hooks", "checkpoint"])
def test_complex_logcumsumexp_padding_nan_removed_behind_hooks(where):
    """SILENT (a NaN kept, no warning): misc36's complex rule gave PyTorch's value (NaN in every used row beside
    the padding) wherever logcumsumexp's saved values unpack through a hook; the base removed it under
    saved_tensors_hooks. The complex formula's own ops now give self and result as for real inputs."""
    reference = _complex_lcse_w_grad("saved_tensors_hooks", rows=4)
    with gw.strong_zeros():
        got = _complex_lcse_w_grad(where)
    assert bool(got.isfinite().all())
    torch.testing.assert_close(got[:4], reference)
    assert bool((got[4:] == 0).all())


def test_complex_logcumsumexp_unpacks_as_often_as_plain_pytorch():
    """The complex rule reads no saved value again (a user's unpack hook ran more often than in plain PyTorch)."""
    plain, hooks = _Counting(), _Counting()
    _complex_lcse_w_grad("saved_tensors_hooks", hooks=plain)
    with gw.strong_zeros():
        _complex_lcse_w_grad("saved_tensors_hooks", hooks=hooks)
    assert hooks.unpacks == plain.unpacks
