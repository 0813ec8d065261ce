"""Hunt (session 32, sz32): strong zeros of addmm & co. with alpha = beta = 0 where the kernel reads the product,
and of backwards nested in a pass. References are independent of gradwise: the same program with the unused values
deleted (float64 where the kernel allows), or plain PyTorch where the value is the user's.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)

D = torch.float64
nan = float("nan")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.nan_to_num(7.0, 8.0, 9.0), b.nan_to_num(7.0, 8.0, 9.0))


# -- alpha = beta = 0 where the kernel reads the product ------------------------------------------------------------
# CPU's small and float16/bfloat16 addr, baddbmm, addmm kernels compute 0 x NaN for alpha = 0 (the output holds the
# operands' NaN: their gradients' NaN is genuine) but leave a beta = 0 input unread. The input's gradient is then the
# deleted input term's 0; it was PyTorch's 0 x NaN (the output's NaN sensitivity times beta), silently.
READ_PRODUCTS = {  # name: (op, shapes of input, operand 1, operand 2)
    "addr": (torch.addr, ((2, 3), (2,), (3,))),
    "baddbmm": (torch.baddbmm, ((2, 2, 3), (2, 2, 4), (2, 4, 3))),
    "addmm": (torch.addmm, ((2, 3), (2, 4), (4, 3))),
    "addmv": (torch.addmv, ((2,), (2, 4), (4,))),
    "addbmm": (torch.addbmm, ((2, 3), (5, 2, 4), (5, 4, 3))),
    "addmm, input broadcast": (torch.addmm, ((3,), (2, 4), (4, 3))),
    "addr, only the input and vec1 need grad": (torch.addr, ((2, 3), (2,), (3,))),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, D])
@pytest.mark.parametrize("name", list(READ_PRODUCTS))
def test_alpha_and_beta_zero_with_the_product_read_gives_the_input_the_deleted_terms_zero(name, dtype):
    op, shapes = READ_PRODUCTS[name]
    gen = torch.Generator().manual_seed(0)
    ts = [(torch.rand(s, dtype=D, generator=gen) + 0.5).to(dtype) for s in shapes]
    ts[1].view(-1)[0] = nan
    needs = [True, True, "only" not in name]
    ts = [t.requires_grad_(n) for t, n in zip(ts, needs, strict=True)]
    out = op(*ts, beta=0, alpha=0)
    if not bool(out.isnan().any()):
        pytest.skip(reason="this kernel left the product unread (BLAS): _kernel_skips_product's case")
    loss = out.abs().sqrt().sum()
    wrt = [t for t in ts if t.requires_grad]
    plain = torch.autograd.grad(loss, wrt, retain_graph=True)
    assert bool(plain[0].isnan().all()), "premise: the output's NaN sensitivity times beta = 0"
    got = gw.grad(loss, wrt)
    assert torch.equal(got[0], torch.zeros_like(ts[0]))  # the program without the input term: no gradient
    for g, p in zip(got[1:], plain[1:], strict=True):  # the product was read: the operands' NaN is the user's
        assert _same(g, p)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_alpha_and_beta_zero_in_a_square_addmm_keeps_pytorchs_nan(dtype):
    """Known limit: in a square addmm an operand's gradient has the output's shape too, so beta's mul is not told
    apart from alpha's: PyTorch's 0 x NaN stays for the input (never a zero for the read product)."""
    ts = [torch.full((2, 2), 0.5, dtype=dtype) for _ in range(3)]
    ts[1][0, 0] = nan
    ts = [t.requires_grad_() for t in ts]
    out = torch.addmm(*ts, beta=0, alpha=0)
    loss = out.abs().sqrt().sum()
    plain = torch.autograd.grad(loss, ts, retain_graph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gw.OpaqueBackwardWarning)
        got = gw.grad(loss, ts)
    if bool(out.isnan().any()):
        for g, p in zip(got, plain, strict=True):
            assert _same(g, p)
    else:  # (BLAS skipped the product: every term's 0 is structural)
        assert all(torch.equal(g, torch.zeros_like(g)) for g in got)
