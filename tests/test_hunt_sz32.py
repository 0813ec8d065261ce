"""Hunt (session 32, sz32): strong zeros of addmm & co. with alpha = beta = 0 where the kernel reads the product,
and of backwards nested in a pass. References are independent of gradwise: the same program with the unused values
deleted (float64 where the kernel allows), or plain PyTorch where the value is the user's.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)
from test_hunt_nest31 import _Sqrt

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


# -- relu's whole structural rows reaching a nested backward's results (_flat_rows) -----------------------------------
# A nested backward in a 'check' pass (a reentrant checkpoint's block, a custom backward's torch.autograd.grad) whose
# results only relu's zeros reach ran plain: at a zero row of its input (relu(0 @ w) flat in the whole row) the row of
# its result was an ordinary 0, and _Sqrt's hand-written g / (2 sqrt(x)) after it made 0/0: w.grad all NaN, with an
# OpaqueBackwardWarning. Reference: the same program with those rows deleted (rows 2: of the input).
W2 = torch.linspace(0.5, 1.5, 9, dtype=D).reshape(3, 3)


class _ReluByGrad(torch.autograd.Function):
    """relu(x @ w), its backward by a nested torch.autograd.grad seeded with the sensitivity."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return torch.relu(x @ w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        with torch.enable_grad():
            xd = x.detach().requires_grad_()
            (out,) = torch.autograd.grad(torch.relu(xd @ w), xd, g)
        return out, None


def _reentrant(f):
    return lambda h: torch.utils.checkpoint.checkpoint(f, h, use_reentrant=True)


def _mlp(bias: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3, bias=bias).double()
    if bias:  # (a bias <= 0: relu(0 @ w + b) flat in the whole row too)
        torch.nn.init.constant_(lin.bias, -0.25)
    return torch.nn.Sequential(lin, torch.nn.ReLU(), torch.nn.Linear(3, 2).double(), torch.nn.ReLU())


RELU_ROWS = {
    "custom backward, nested grad of relu(x @ w)": lambda h: _ReluByGrad.apply(h, W2),
    "reentrant checkpoint of relu(x @ w)": _reentrant(lambda t: torch.relu(t @ W2)),
    "reentrant checkpoint of Linear-ReLU-Linear-ReLU, no bias": _reentrant(_mlp(False)),
    "reentrant checkpoint of Linear-ReLU-Linear-ReLU, bias -0.25": _reentrant(_mlp(True)),
    "reentrant checkpoint of a relu first": _reentrant(lambda t: torch.relu(t) @ W2),
    "reentrant checkpoint in one": _reentrant(lambda t: _reentrant(lambda u: torch.relu(u @ W2))(t) * 2),
    "nested grad in a reentrant checkpoint": _reentrant(lambda t: _ReluByGrad.apply(t, W2) * 2),
    "reentrant checkpoint, 3-d input through a Linear": lambda h: _reentrant(_mlp(False))(h.unsqueeze(0)),
}


def _relu_w_grad(block, inp: torch.Tensor, strong: bool) -> torch.Tensor:
    w = (torch.rand(3, 3, dtype=D, generator=torch.Generator().manual_seed(0)) + 0.5).requires_grad_()
    loss = block(_Sqrt.apply(inp @ w)).sum()
    gw.backward(loss) if strong else loss.backward()
    return w.grad


def _relu_inp() -> torch.Tensor:
    return torch.rand(4, 3, dtype=D, generator=torch.Generator().manual_seed(1)) + 0.5


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True:UserWarning")
@pytest.mark.parametrize("name", RELU_ROWS)
def test_relus_whole_structural_rows_reaching_a_nested_backward_match_the_deleted_program(name):
    block = RELU_ROWS[name]
    want = _relu_w_grad(block, _relu_inp()[:2], strong=False)  # the program with the zero rows deleted
    inp = _relu_inp()
    inp[2:] = 0.0
    assert bool(_relu_w_grad(block, inp, strong=False).isnan().all()), "premise: PyTorch's 0/0"
    with warnings.catch_warnings():
        warnings.simplefilter("error", gw.OpaqueBackwardWarning)
        got = _relu_w_grad(block, inp, strong=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True:UserWarning")
@pytest.mark.parametrize("name", RELU_ROWS)
def test_relu_rows_controls_finite_bits_and_a_genuine_nan(name):
    """Finite data: PyTorch's bits (the backward runs plain: no whole flat row). A NaN in row 0, which the block
    keeps: the loss uses it, and w.grad is NaN as in PyTorch, the zero rows aside."""
    block = RELU_ROWS[name]
    assert torch.equal(_relu_w_grad(block, _relu_inp(), True), _relu_w_grad(block, _relu_inp(), False))
    inp = _relu_inp()
    inp[2:] = 0.0
    inp[0, 1] = nan
    assert bool(_relu_w_grad(block, inp, strong=False).isnan().all())
    assert bool(_relu_w_grad(block, inp, strong=True).isnan().all())


def test_a_chain_of_checkpointed_relu_blocks_reads_no_relu_rows(monkeypatch):
    """Cost: where the pass's graph holds only reentrant checkpoints (no node that can make NaN/Inf from finite
    values after them), the nested backwards look for no whole flat rows (benchmarks/bench_nested.py's workload);
    with a custom Function in the graph they do."""
    from gradwise._strong_zeros import _engine

    calls = []
    real = _engine.flat_rows_reach
    monkeypatch.setattr(_engine, "flat_rows_reach", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    blocks = [_reentrant(_mlp(True)) for _ in range(3)]
    x = torch.randn(4, 3, dtype=D, requires_grad=True)
    h = x
    for b in blocks:
        h = b(h[:, :3] if h.shape[-1] == 3 else torch.nn.functional.pad(h, (0, 1)))
    gw.backward(h.pow(2).sum())
    assert calls == []
    h = x
    for b in blocks:
        h = b(h[:, :3] if h.shape[-1] == 3 else torch.nn.functional.pad(h, (0, 1)))
    gw.backward(_Sqrt.apply(h.pow(2) + 1.0).sum())
    assert calls


# -- attention weights from a masked softmax, multiplied by the values in a bmm/mm ------------------------------------
# nn.MultiheadAttention with need_weights=True (its default) and a key_padding_mask, and hand-written attention
# (softmax(q k^T + mask) @ v), compute v's gradient as a^T @ g with the masked keys' weights exactly 0 (exp(-inf)):
# an ordinary 0 there met the padded values' infinite slope (sqrt of a zero padding row): w.grad NaN, silently, where
# the program with the padded keys deleted is finite. Reference: that program (each sequence on its own rows).
def _padded(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x @ w).pow(2).sqrt()  # (an infinite slope at a zero padding row)


def _mha_loss(mha, w, x, lens, need_weights, average):
    keep = torch.arange(x.shape[1])[None, :] < lens[:, None]
    h = _padded(x, w)
    out, att = mha(h, h, h, key_padding_mask=~keep, need_weights=need_weights, average_attn_weights=average)
    loss = torch.where(keep[..., None], out, 0.0).pow(2).sum()
    if need_weights:  # (the weights of the kept queries on the first key)
        kept_queries = keep[:, :, None] if average else keep[:, None, :, None]
        loss = loss + torch.where(kept_queries, att, 0.0)[..., :1].pow(2).sum()
    return loss


def _hand_attention_loss(q_w, w, x, lens, batched):
    keep = torch.arange(x.shape[1])[None, :] < lens[:, None]
    h = _padded(x, w)
    q = h @ q_w
    bias = torch.zeros(keep.shape, dtype=D).masked_fill(~keep, -math.inf)
    if batched:
        a = (q @ h.transpose(1, 2) + bias[:, None, :]).softmax(-1)
        out = torch.bmm(a, h)
    else:  # one sequence, 2-d: mm
        a = (q[0] @ h[0].t() + bias[0]).softmax(-1)
        out = torch.mm(a, h[0])[None]
    return torch.where(keep[..., None], out, 0.0).pow(2).sum()


def _attention_case(name):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4, dtype=D)
    w = torch.randn(4, 4, dtype=D, requires_grad=True)
    if name.startswith("MultiheadAttention"):
        mha = torch.nn.MultiheadAttention(4, 2, batch_first=True).double()
        need, avg = "need_weights=True" in name, "average" in name
        return x, [w, *mha.parameters()], lambda x, lens: _mha_loss(mha, w, x, lens, need, avg)
    q_w = torch.randn(4, 4, dtype=D, requires_grad=True)
    batched = "bmm" in name
    if not batched:
        x = x[1:]
    return x, [w, q_w], lambda x, lens: _hand_attention_loss(q_w, w, x, lens, batched)


ATTENTION = ["MultiheadAttention need_weights=True average", "MultiheadAttention need_weights=True per head",
             "MultiheadAttention need_weights=False", "softmax then bmm", "softmax then mm (2-d)"]


def matches_the_deleted_program(loss_of, params, x, lens):
    """gw.grad of the padded batch (the last sequence's padding a zero row: PyTorch's 0 x inf) against the sum of
    each sequence's plain gradients with its padding deleted (also test_hunt_sz34's)."""
    x[-1, int(lens[-1]):] = 0.0  # padding of the last sequence
    assert not all(bool(g.isfinite().all()) for g in torch.autograd.grad(loss_of(x, lens), params)), \
        "premise: PyTorch's 0 x inf"
    with warnings.catch_warnings():
        warnings.simplefilter("error", gw.OpaqueBackwardWarning)
        got = gw.grad(loss_of(x, lens), params)
    want = [torch.zeros_like(p) for p in params]
    for b in range(x.shape[0]):
        n = int(lens[b])
        for acc, g in zip(want, torch.autograd.grad(loss_of(x[b:b + 1, :n], lens[b:b + 1]), params), strict=True):
            acc += g
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def keeps_the_controls(loss_of, params, x, lens):
    """Finite data (no padding): PyTorch's bits. A zero row at a kept key (its value's slope infinite, its weight
    not 0): PyTorch's NaN/Inf stays, bit for bit (also test_hunt_sz34's)."""
    for g, p in zip(gw.grad(loss_of(x, lens), params), torch.autograd.grad(loss_of(x, lens), params), strict=True):
        assert torch.equal(g, p)
    x[-1, int(lens[-1]):] = 0.0
    x[-1, 1] = 0.0  # a kept key
    plain = torch.autograd.grad(loss_of(x, lens), params)
    assert not bool(plain[0].isfinite().all())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gw.OpaqueBackwardWarning)
        got = gw.grad(loss_of(x, lens), params)
    assert _same(got[0], plain[0])


@pytest.mark.parametrize("name", ATTENTION)
def test_masked_attention_weights_give_padded_values_the_deleted_keys_zero(name):
    x, params, loss_of = _attention_case(name)
    matches_the_deleted_program(loss_of, params, x, torch.tensor([5, 3])[-x.shape[0]:])


@pytest.mark.parametrize("name", ATTENTION)
def test_masked_attention_weights_controls(name):
    x, params, loss_of = _attention_case(name)
    keeps_the_controls(loss_of, params, x, torch.tensor([5, 3])[-x.shape[0]:])
