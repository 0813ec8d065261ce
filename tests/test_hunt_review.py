"""An adversarial review of the day's strong-zero and trace changes: each case compares with an independent
reference (plain PyTorch on finite data, the same program with the unused values deleted).

- a backward under torch.inference_mode() whose Python code calls a CompositeImplicitAutograd op (matmul of a
  vector by a batch in a custom Function's backward): the strong-zero mode ran it as ``func.decompose``, which
  prefers torch._decomp's Python decomposition, and matmul's folds the product differently from the C++ one that
  autograd's keys run: the finite gradient differed from PyTorch's in its last bit.
- gw.trace() around ``grad`` imported with ``from torch.autograd import grad`` before the block (the common
  gradient-penalty idiom): the trace's wrappers replace torch.autograd.grad, not a name bound earlier, and its note
  said the backward was "started by TorchScript or C++", sending the user looking for TorchScript in a plain
  Python program. (Since then the engine hook hands such a backward to the trace: it is read, not untraced.)
"""
from __future__ import annotations

import pytest
import torch
from torch.autograd import grad as bound_early

import gradwise as gw

f32 = torch.float32


def _matmul_in_backward():
    gen = torch.Generator().manual_seed(0)
    big, w = torch.randn(2, 5, 4, generator=gen, dtype=f32), torch.randn(5, generator=gen, dtype=f32)

    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * torch.matmul(w, big)  # (5,) @ (2, 5, 4): matmul folds it, C++ and Python differently

    return Scaled, torch.randn(2, 4, generator=gen, dtype=f32, requires_grad=True)


@pytest.mark.parametrize("how", ["grad", "strong_zeros"])
def test_a_composite_op_in_an_inference_mode_backward_is_pytorchs_bitwise(how):
    scaled, x = _matmul_in_backward()
    out = scaled.apply(x).sum()
    (reference,) = torch.autograd.grad(out, x, retain_graph=True)
    with torch.inference_mode():
        if how == "grad":
            (got,) = gw.grad(out, x)
        else:
            with gw.strong_zeros():
                (got,) = torch.autograd.grad(out, x)
    assert torch.equal(got, reference)


def test_a_composite_op_in_an_inference_mode_backward_with_contamination():
    """The strong pass (an unused NaN branch) equals the program with the NaN branch deleted, bit for bit."""
    scaled, x = _matmul_in_backward()
    y = scaled.apply(x)
    keep = torch.ones(2, 4, dtype=torch.bool)
    out = torch.where(keep, y, torch.sqrt(-torch.ones(2, 4)) * y).sum()
    (reference,) = torch.autograd.grad(scaled.apply(x).sum(), x)
    with torch.inference_mode():
        (got,) = gw.grad(out, x)
    assert torch.equal(got, reference)


def test_a_backward_of_a_name_bound_early_is_read():
    x = torch.tensor([1.0, -1.0, 4.0], requires_grad=True)
    with gw.trace() as report:
        (g,) = bound_early(x.sqrt().sum(), x)
    assert g.isnan().any() and report.untraced_backwards == 0  # read: the genuine NaN is found, not called clean
    assert [f.kind for f in report.findings] == ["nan"], str(report)
    assert "started by TorchScript or C++" not in str(report)
