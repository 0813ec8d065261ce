"""The check before backward (``_plan``) reads every saved tensor a structural zero can reach, even where the
loss seems to prove it finite.

A faster check was tried and withdrawn (docs/strong-zeros-design.md, "What the check does not skip"): skip a
saved tensor lying on a "strict" path to a finite loss (add, mul, matmul, sums, layer norm... put any NaN/Inf
of their inputs into their output). Two reviews found programs where a NaN/Inf hides from the loss anyway; each
is kept here. In every one the loss is finite, x's gradient meets relu's structural zero times a saved -inf
(PyTorch: NaN), and gradwise must give the gradient of the program without that value (0).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradwise as gw
from gradwise._strong_zeros._planning import _plan

inf = float("inf")


def _relu_meets(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x * w).sum()  # the product saves w for x's gradient; relu is off where w = -inf


def _check(loss: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """x enters the loss through _relu_meets(w, x) alone: the reference is that term with w's -inf replaced by
    the dtype's lowest finite number (the unit stays off)."""
    assert loss.isfinite()
    assert _plan([loss], [None]) == "strong"
    assert torch.autograd.grad(loss, x, retain_graph=True)[0].isnan().any()
    finite = w.detach().nan_to_num(neginf=torch.finfo(w.dtype).min)
    (expected,) = torch.autograd.grad(_relu_meets(finite, x), x)
    assert torch.equal(gw.grad(loss, x)[0], expected)


def _pair(w=(-inf,)):
    return torch.tensor(w, requires_grad=True), torch.ones(len(w), requires_grad=True)


def test_relu_hides_minus_infinity():
    """relu(-inf) = 0: the unit is off and the loss finite; the weight below the relu is still read."""
    w, x = _pair()
    _check(_relu_meets(w, x), x, w)


def test_an_empty_reduction_hides_its_input():
    """(w expanded to nothing).sum() is a finite 0 whatever w holds."""
    w, x = _pair()
    s = w.expand(0).sum()
    _check(_relu_meets(w, x) + s + torch.exp(s), x, w)


@pytest.mark.parametrize("through", ["leaf", "product", "copy"])
def test_a_value_written_under_no_grad_after_a_use(through):
    """sum(a) sees a finite a; a write under no_grad (no version error: the sum saves nothing) then puts -inf
    where the product saves it."""
    w, x = _pair((1.0,))
    a = w if through == "leaf" else w * 2
    s = a.sum()
    with torch.no_grad():
        a.fill_(-inf)
    _check(_relu_meets(a.clone() if through == "copy" else a, x) + s, x, a)


def test_an_intermediate_sanitised_under_no_grad():
    """y = w * 2 is -inf when made; nan_to_num_ under no_grad makes it 0 before the loss uses it."""
    w, x = _pair()
    y = w * 2
    with torch.no_grad():
        y.nan_to_num_(posinf=0.0, neginf=0.0)
    _check(_relu_meets(w, x) + y.sum(), x, w)


@pytest.mark.parametrize("how", ["data", "numpy", "from_numpy"])
def test_writes_that_leave_no_version(how):
    """Writes through .data or a shared numpy array do not bump the version counter."""
    arr = np.array([1.0], dtype=np.float32)
    w = torch.from_numpy(arr).requires_grad_()
    x = torch.ones(1, requires_grad=True)
    s = w.sum()
    if how == "data":
        w.data.fill_(-inf)
    elif how == "numpy":
        w.detach().numpy()[:] = -inf
    else:
        arr[:] = -inf
    _check(_relu_meets(w, x) + s, x, w)


@pytest.mark.parametrize("op", ["mm", "mul"])
def test_a_sparse_factor_skips_what_it_does_not_store(op):
    """A sparse factor multiplies only its stored entries: a -inf facing an unstored one never reaches the
    output."""
    w, x = _pair((-inf, 1.0))
    used = (torch.mm(torch.tensor([[0.0, 1.0]]).to_sparse(), w.view(2, 1)) if op == "mm"
            else torch.tensor([0.0, 1.0]).to_sparse() * w)
    _check(_relu_meets(w, x) + used.sum(), x, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_factor_that_is_zero_in_the_dtype(dtype):
    """addmm's beta = 1e-320 and, in float16, x ** 1e-8 are 0 once cast to the tensor's dtype."""
    w = torch.tensor([-inf], dtype=dtype, requires_grad=True)
    x = torch.ones(1, dtype=dtype, requires_grad=True)
    one = torch.ones(1, 1, dtype=dtype)
    _check(_relu_meets(w, x) + torch.addmm(w, one, one, beta=1e-320).sum(), x, w)
    if dtype == torch.float16:
        _check(_relu_meets(w, x) + (w**1e-8).sum(), x, w)


def test_an_output_written_in_place():
    """The loss itself zeroed through a detached alias: its value no longer says anything."""
    w, x = _pair()
    loss = _relu_meets(w, x) + w.sum()
    loss.detach().zero_()
    _check(loss, x, w)
