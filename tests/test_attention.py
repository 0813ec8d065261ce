"""Strong zeros through the fused attention backwards (src/gradwise/_strong_zeros/_rules_attention.py).

Every test compares gw.grad with the gradient of the same program with the unused values deleted (each
sequence alone, its padding removed), float64, and checks that plain PyTorch is contaminated there. The CUDA
backwards (flash, memory-efficient, cuDNN) cannot run on this CPU: their rule is exercised through CPU
stand-ins registered for those very aten ops, which compute the fused formulas from the saved out and
logsumexp as the kernels do (so a NaN query row meets a zero g exactly as in the kernel).
"""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradwise as gw
from gradwise._strong_zeros import _engine
from gradwise._strong_zeros._node_facts import _makes_zeros
from gradwise._strong_zeros._planning import _plan

nan, inf = float("nan"), float("inf")
f64 = torch.float64
aten = torch.ops.aten


def _padding(lengths: list[int], steps: int) -> torch.Tensor:
    return torch.arange(steps)[None, :] >= torch.tensor(lengths)[:, None]


def _qkv(batch=2, heads=4, kv_heads=4, steps=6, dim=8, dtype=f64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, steps, dim, generator=gen, dtype=dtype),
            torch.randn(batch, kv_heads, steps, dim, generator=gen, dtype=dtype),
            torch.randn(batch, kv_heads, steps, dim, generator=gen, dtype=dtype))


def _mask(kind: str | None, pad: torch.Tensor, dtype=f64) -> torch.Tensor | None:
    if kind is None:
        return None
    if kind == "bool":
        return ~pad[:, None, None, :]
    bias = torch.linspace(-1, 0, pad.shape[1], dtype=dtype).expand(pad.shape[0], 1, pad.shape[1], -1)
    return bias.masked_fill(pad[:, None, None, :], -inf)  # ALiBi-like slope plus -inf padding


def _takes_a_mask_with_causal() -> bool:
    """Whether F.scaled_dot_product_attention takes attn_mask with is_causal=True (torch 2.13 does; 2.14 refuses
    it: "Explicit attn_mask should not be set when is_causal=True")."""
    q = torch.zeros(1, 1, 2, 2)
    try:
        F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(2, 2, dtype=torch.bool), is_causal=True)
    except RuntimeError:
        return False
    return True


_MASK_WITH_CAUSAL = _takes_a_mask_with_causal()


def _sdpa(q, k, v, mask, causal, gqa):
    """A mask and causal masking at once: passed as they are where PyTorch takes both, else the causal mask
    folded into the mask (the same attention: what a model does where PyTorch refuses both)."""
    if mask is not None and causal and not _MASK_WITH_CAUSAL:
        above = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).triu(1)  # top-left aligned, as is_causal
        mask = mask & ~above if mask.dtype == torch.bool else mask.masked_fill(above, -inf)
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


def _reference(attend, tensors, lengths, mask):
    """Gradient of each sequence alone (its padding deleted), written back into padded shapes."""
    grads = [torch.zeros_like(t) for t in tensors]
    for b, n in enumerate(lengths):
        parts = [t[b : b + 1, :, :n].clone().requires_grad_() for t in tensors]
        m = None if mask is None else mask[b : b + 1, ..., :n, :n] if mask.shape[-2] > 1 else mask[b : b + 1, ..., :n]
        out = attend(*parts, m)
        for full, part in zip(grads, torch.autograd.grad(out.square().sum(), parts), strict=True):
            full[b, :, :n] = part
    return grads


def _padded_loss(out, lengths):
    return sum(out[b, :, :n].square().sum() for b, n in enumerate(lengths))


CONFIGS = [(mask, causal, gqa) for mask in (None, "bool", "float") for causal in (False, True) for gqa in (False, True)]


@pytest.mark.parametrize(("mask_kind", "causal", "gqa"), CONFIGS)
def test_cpu_flash_padded_queries_and_keys(mask_kind, causal, gqa):
    """NaN padding tokens (their keys/values zeroed, as models do before attention or by construction) with a
    key padding mask, causal masking, GQA: the padded query rows' NaN and the unused keys never reach a gradient."""
    lengths = [4, 6]
    pad = _padding(lengths, 6)
    q, k, v = _qkv(kv_heads=2 if gqa else 4)
    q = q.masked_fill(pad[:, None, :, None], nan)
    if causal and mask_kind is None:  # right padding under a causal mask: padded keys are never attended
        k = k.masked_fill(pad[:, None, :, None], nan)
    mask = _mask(mask_kind, pad)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    loss = _padded_loss(_sdpa(*leaves, mask, causal, gqa), lengths)
    assert loss.isfinite()
    plain = torch.autograd.grad(loss, leaves, retain_graph=True)
    assert not all(g.isfinite().all() for g in plain)
    got = gw.grad(loss, leaves)
    clean = [q.nan_to_num(0.0), k.nan_to_num(0.0), v]
    if mask_kind is None and not causal:
        # no mask: every query reads the padded keys, so only the padded query rows are unused
        exp = [torch.zeros_like(t) for t in clean]
        rows = [t.clone().requires_grad_() for t in clean]
        out = _sdpa(*rows, None, False, gqa)
        exp = torch.autograd.grad(_padded_loss(out, lengths), rows)
    else:
        exp = _reference(lambda a, b, c, m: _sdpa(a, b, c, m, causal, gqa), clean, lengths, mask)
    for g, e in zip(got, exp, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_cpu_flash_whole_sequences_discarded():
    """Batch elements that are all NaN padding (a fixed batch size), sliced away after attention."""
    q, k, v = _qkv(batch=3)
    for t in (q, k, v):
        t[1] = nan
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves)
    loss = out[[0, 2]].square().sum()
    got = gw.grad(loss, leaves)
    exp_leaves = [t[[0, 2]].clone().requires_grad_() for t in (q, k, v)]
    exp = torch.autograd.grad(F.scaled_dot_product_attention(*exp_leaves).square().sum(), exp_leaves)
    for g, e in zip(got, exp, strict=True):
        assert torch.equal(g[1], torch.zeros_like(g[1]))
        torch.testing.assert_close(g[[0, 2]], e, rtol=1e-10, atol=1e-12)


def test_cpu_flash_fully_masked_rows_discarded():
    """pytorch#41508 with SDPA: query rows that may attend to nothing (their mask row all False) hold NaN and are
    discarded; the other rows' gradients are those of the program without them."""
    q, k, v = _qkv(batch=1, heads=2, kv_heads=2, steps=5)
    allowed = torch.rand(5, 5, generator=torch.Generator().manual_seed(3)) > 0.3
    allowed[:, 0] = True
    allowed[[1, 3]] = False  # rows 1 and 3 attend to nothing
    q[:, :, [1, 3]] = nan
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    kept = [0, 2, 4]
    loss = F.scaled_dot_product_attention(*leaves, attn_mask=allowed)[:, :, kept].square().sum()
    got = gw.grad(loss, leaves)
    ref = [q[:, :, kept].clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_()]
    exp = torch.autograd.grad(F.scaled_dot_product_attention(*ref, attn_mask=allowed[kept]).square().sum(), ref)
    torch.testing.assert_close(got[0][:, :, kept], exp[0], rtol=1e-10, atol=1e-12)
    assert torch.equal(got[0][:, :, [1, 3]], torch.zeros_like(got[0][:, :, [1, 3]]))
    for g, e in zip(got[1:], exp[1:], strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_a_nan_query_the_output_uses_stays():
    """Control: a NaN query row that the loss reads keeps its NaN gradients."""
    q, k, v = _qkv()
    q[0, :, 2] = nan
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    loss = F.scaled_dot_product_attention(*leaves, is_causal=True)[:, :, :4].square().sum()
    got = gw.grad(loss, leaves)
    assert got[0][0, :, 2].isnan().all() and not got[1][0].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_strong_pass_on_finite_data_is_pytorch_bitwise(dtype, monkeypatch):
    """The rule replaces discarded rows by values whose contributions are exact zeros: forced through the strong
    pass on finite data, every gradient is PyTorch's bit for bit."""
    lengths = [3, 6]
    pad = _padding(lengths, 6)
    q, k, v = _qkv(kv_heads=2, dtype=dtype)
    mask = _mask("float", pad, dtype)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        return fn(_padded_loss(_sdpa(*leaves, mask, True, True), lengths), leaves)

    plain = grads(torch.autograd.grad)
    monkeypatch.setattr(_engine, "_plan", lambda *a: "strong")
    strong = grads(gw.grad)
    for g, e in zip(strong, plain, strict=True):
        assert torch.equal(g, e)


@pytest.mark.parametrize("kept", [[0, 1], [0, 2], [1, 3]])
@pytest.mark.parametrize(("mask_kind", "causal"), [(None, True), (None, False), ("float", True)])
def test_discarded_batch_entries_leave_the_kernel_pytorch_bitwise(kept, mask_kind, causal, monkeypatch):
    """Whole batch entries the loss discards (a range or not) are left out of the kernel's run (the others are
    computed alone, with their own padding where they have some): forced through the strong pass on finite data,
    every gradient is still PyTorch's bit for bit, the discarded entries' exact zeros included."""
    lengths = [6, 4, 6, 5]
    pad = _padding(lengths, 6)
    q, k, v = _qkv(batch=4, kv_heads=2, dtype=torch.float32)
    mask = _mask(mask_kind, pad, torch.float32)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = _sdpa(*leaves, mask, causal, True)
        return fn(_padded_loss(out[kept], [lengths[b] for b in kept]), leaves)

    plain = grads(torch.autograd.grad)
    monkeypatch.setattr(_engine, "_plan", lambda *a: "strong")
    strong = grads(gw.grad)
    for g, e in zip(strong, plain, strict=True):
        assert torch.equal(g, e)


def test_discarded_nan_batch_entries_with_padded_kept_ones():
    """NaN batch entries sliced away while the kept ones have padding under a key mask: the kept entries' rule
    (their padded rows and keys) runs on them alone; equal to each sequence alone, padding deleted."""
    lengths = [4, 6, 6]
    pad = _padding(lengths, 6)
    q, k, v = _qkv(batch=3, kv_heads=2)
    q = q.masked_fill(pad[:, None, :, None], nan)
    for t in (q, k, v):
        t[2] = nan
    mask = _mask("float", pad)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    loss = _padded_loss(_sdpa(*leaves, mask, True, True)[:2], lengths[:2])
    got = gw.grad(loss, leaves)
    clean = [t[:2].nan_to_num(0.0) for t in (q, k, v)]
    exp = _reference(lambda a, b, c, m: _sdpa(a, b, c, m, True, True), clean, lengths[:2], mask[:2])
    for g, e in zip(got, exp, strict=True):
        assert torch.equal(g[2], torch.zeros_like(g[2]))
        torch.testing.assert_close(g[:2], e, rtol=1e-10, atol=1e-12)


def _plan_of(loss):
    return _plan([loss], ())


def test_plan_reads_attention_but_not_its_mask():
    """The path check: a finite program with a -inf mask takes the plain path; a NaN query row a slice discards
    and a NaN in the mask send it to the strong pass."""
    lengths = [4, 6]
    pad = _padding(lengths, 6)
    q, k, v = _qkv()
    mask = _mask("float", pad)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    assert _plan_of(_padded_loss(_sdpa(*leaves, mask, False, False), lengths)) == "plain"
    nan_q = q.masked_fill(pad[:, None, :, None], nan).requires_grad_()
    assert _plan_of(_padded_loss(_sdpa(nan_q, *leaves[1:], mask, False, False), lengths)) == "strong"
    bad = mask.clone()
    bad[0, 0, 0, 5] = nan
    assert _plan_of(_padded_loss(_sdpa(*leaves, bad, False, False), lengths)) == "strong"


def test_attention_counts_as_making_zeros_only_with_a_mask():
    q = torch.randn(1, 1, 3, 4, requires_grad=True)
    assert not _makes_zeros(F.scaled_dot_product_attention(q, q, q).grad_fn)
    assert _makes_zeros(F.scaled_dot_product_attention(q, q, q, is_causal=True).grad_fn)
    assert _makes_zeros(F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(3, 3).bool()).grad_fn)


@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_fully_masked_rows(need_weights):
    """nn.MultiheadAttention with rows that attend to nothing (pytorch#41508), those rows discarded: the math path
    (need_weights=True) and the SDPA path (need_weights=False) both give the gradient without those rows."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()
    x = torch.randn(2, 5, 8, dtype=f64)
    masked = torch.zeros(5, 5, dtype=torch.bool)
    masked[[1, 3]] = True  # True = not allowed: rows 1 and 3 attend to nothing
    kept = [0, 2, 4]
    out, _ = mha(x, x, x, attn_mask=masked, need_weights=need_weights)
    loss = out[:, kept].square().sum()
    params = list(mha.parameters())
    plain = torch.autograd.grad(loss, params, retain_graph=True)
    if need_weights:  # the math path's softmax rows are NaN (CPU flash gives those rows 0 and stays finite)
        assert not all(g.isfinite().all() for g in plain)
    got = gw.grad(loss, params)
    ref, _ = mha(x[:, kept], x, x, attn_mask=masked[kept], need_weights=need_weights)
    exp = torch.autograd.grad(ref.square().sum(), params)
    for g, e in zip(got, exp, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# The CUDA backwards through CPU stand-ins: the same rule code, the ops' own schemas and layouts.
# ---------------------------------------------------------------------------------------------------------


_SAVED_LAYOUT: list = []  # the strides of q, k, v, out, lse as saved by the forward (the kernels read them)


def _fused_backward(g, q, k, v, out, lse, bias, causal, scale, blhe):
    """The formulas every fused backward evaluates, from the saved out and logsumexp (as the kernels do):
    P = exp(s q k^T + bias - lse), D = rowsum(g * out), dS = P (g v^T - D). (B, H, L, E) inside."""
    if _SAVED_LAYOUT:  # a CUDA kernel reads the strides of what it is given: a rule must keep them
        assert [t.stride() for t in (q, k, v, out, lse)] == _SAVED_LAYOUT[-1], "the rule changed a tensor's layout"
    if lse.dim() == q.dim():  # cuDNN's logsumexp: (B, H, Lq, 1)
        lse = lse.squeeze(-1)
    if blhe:
        g, q, k, v, out = (t.transpose(1, 2) for t in (g, q, k, v, out))
    group = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    lq, lk = q.shape[2], k.shape[2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = scale * q @ ke.transpose(-1, -2)
    if bias is not None:
        logits = logits + bias
    if causal:
        logits = logits.masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(1), -inf)
    p = torch.exp(logits - lse[..., :lq, None])
    d = (g * out).sum(-1, keepdim=True)
    ds = p * (g @ ve.transpose(-1, -2) - d)
    dq = scale * ds @ ke
    dk = (scale * ds.transpose(-1, -2) @ q).unflatten(1, (k.shape[1], group)).sum(2)
    dv = (p.transpose(-1, -2) @ g).unflatten(1, (k.shape[1], group)).sum(2)
    if blhe:
        dq, dk, dv = (t.transpose(1, 2) for t in (dq, dk, dv))
    return dq, dk, dv, ds


def _forward(q, k, v, bias, causal, blhe, lse_pad=0):
    if blhe:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    logits = q @ ke.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    if causal:
        logits = logits.masked_fill(torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).triu(1), -inf)
    lse = logits.logsumexp(-1)
    out = torch.softmax(logits, -1) @ ve
    if lse_pad:
        lse = F.pad(lse, (0, lse_pad))
    return (out.transpose(1, 2) if blhe else out).contiguous(), lse


# op -> (CPU stand-in with the op's schema, how the test's autograd.Function calls it, layout, lse padding)
def _cpu_stand_ins():
    def efficient_sdpa(g, q, k, v, bias, out, lse, seed, offset, p, mask, causal=False, *, scale=None):
        return _fused_backward(g, q, k, v, out, lse, bias, causal, scale, False)

    def flash_sdpa(g, q, k, v, out, lse, cq, ck, mq, mk, p, causal, seed, offset, *, scale=None):
        return _fused_backward(g, q, k, v, out, lse, None, causal, scale, False)[:3]

    def cudnn(g, q, k, v, out, lse, seed, offset, bias, cq, ck, mq, mk, p, causal, *, scale=None):
        return _fused_backward(g, q, k, v, out, lse, bias, causal, scale, False)[:3]

    def flash(g, q, k, v, out, lse, cq, ck, mq, mk, p, causal, rng, unused, *, scale=None, window_size_left=None,
              window_size_right=None):
        return _fused_backward(g, q, k, v, out, lse, None, causal, scale, True)[:3]

    def efficient(g, q, k, v, bias, out, cq, ck, mq, mk, lse, p, seed, offset, mask_type, bias_rg, *, scale=None,
                  num_splits_key=None, window_size=None, shared_storage_dqdkdv=False):
        return _fused_backward(g, q, k, v, out, lse, bias, mask_type == 1, scale, True)

    none, z = None, torch.zeros(())
    return {
        "_scaled_dot_product_efficient_attention_backward": (efficient_sdpa, lambda g, q, k, v, o, lse, bias, c: (
            g, q, k, v, bias, o, lse, z, z, 0.0, [True, True, True, False], c), False, 32),
        "_scaled_dot_product_flash_attention_backward": (flash_sdpa, lambda g, q, k, v, o, lse, bias, c: (
            g, q, k, v, o, lse, none, none, q.shape[2], k.shape[2], 0.0, c, z, z), False, 0),
        "_scaled_dot_product_cudnn_attention_backward": (cudnn, lambda g, q, k, v, o, lse, bias, c: (
            g, q, k, v, o, lse, z, z, bias, none, none, q.shape[2], k.shape[2], 0.0, c), False, 0),
        "_flash_attention_backward": (flash, lambda g, q, k, v, o, lse, bias, c: (
            g, q, k, v, o, lse, none, none, q.shape[1], k.shape[1], 0.0, c, z, z), True, 0),
        "_efficient_attention_backward": (efficient, lambda g, q, k, v, o, lse, bias, c: (
            g, q, k, v, bias, o, none, none, q.shape[1], k.shape[1], lse, 0.0, z, z, int(c), False), True, 32),
    }


STAND_INS = _cpu_stand_ins()


@pytest.fixture(scope="module")
def cpu_attention_kernels():
    lib = torch.library.Library("aten", "IMPL")
    for name, (impl, *_rest) in STAND_INS.items():
        lib.impl(name, impl, "CPU")
    yield
    lib._destroy()


def _fused_attention(name, causal, bias):
    _, call, blhe, lse_pad = STAND_INS[name]
    op = getattr(aten, name).default

    class Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse = _forward(q, k, v, bias, causal, blhe, lse_pad)
            # the kernels' own layouts: the memory-efficient one writes out in (B, L, H, E) memory, cuDNN's
            # logsumexp is (B, H, Lq, 1)
            out = out.transpose(1, 2).contiguous().transpose(1, 2)
            if name == "_scaled_dot_product_cudnn_attention_backward":
                lse = lse.unsqueeze(-1)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, g):
            q, k, v, out, lse = ctx.saved_tensors
            _SAVED_LAYOUT.append([t.stride() for t in (q, k, v, out, lse)])
            try:
                return tuple(op(*call(g, q, k, v, out, lse, bias, causal))[:3])
            finally:
                _SAVED_LAYOUT.pop()

    return Attention.apply


@pytest.mark.usefixtures("cpu_attention_kernels")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", sorted(STAND_INS))
def test_cuda_backwards_share_the_rule(name, causal):
    """NaN padded query rows (and, under a top-left causal mask, NaN padded keys) discarded: the rule of each
    CUDA backward, run on CPU through a stand-in with the op's schema, gives the gradient of each sequence alone."""
    blhe = STAND_INS[name][2]
    lengths = [4, 6]
    pad = _padding(lengths, 6)
    uses_bias = name in ("_scaled_dot_product_efficient_attention_backward", "_efficient_attention_backward",
                         "_scaled_dot_product_cudnn_attention_backward")
    bias = _mask("float", pad).expand(2, 4, 6, 6).contiguous() if uses_bias else None
    q, k, v = _qkv(kv_heads=2 if not blhe else 4)
    q = q.masked_fill(pad[:, None, :, None], nan)
    if causal and bias is None:
        k = k.masked_fill(pad[:, None, :, None], nan)
    tensors = [t.transpose(1, 2).contiguous() if blhe else t for t in (q, k, v)]
    leaves = [t.clone().requires_grad_() for t in tensors]
    attend = _fused_attention(name, causal, bias)
    out = attend(*leaves)
    loss = sum((out[b, :n] if blhe else out[b, :, :n]).square().sum() for b, n in enumerate(lengths))
    plain = torch.autograd.grad(loss, leaves, retain_graph=True)
    assert not all(g.isfinite().all() for g in plain)
    got = [g.transpose(1, 2) if blhe else g for g in gw.grad(loss, leaves)]
    if bias is None and not causal:
        rows = [t.clone().requires_grad_() for t in (q.nan_to_num(0.0), k, v)]
        exp = torch.autograd.grad(_padded_loss(_sdpa(*rows, None, False, True), lengths), rows)
    else:
        exp = _reference(lambda a, b, c, m: _sdpa(a, b, c, m, causal, True), [q.nan_to_num(0.0), k.nan_to_num(0.0), v],
                         lengths, None if bias is None else bias[:, :1])
    for g, e in zip(got, exp, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert not any(name in op for op in gw.unruled_ops())


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("value", [nan, math.inf, -math.inf])
def test_causal_attention_no_zero_reaches_reads_nothing_and_changes_nothing(which, value, gqa):
    """Causal attention without a mask keeps its structural zeros inside (the last query reads every key) and,
    with no zero arriving from above, its rule runs the kernel as PyTorch does. So the plan reads nothing of it
    and runs plain, and the gradients equal the strong pass forced, NaN for NaN, whatever q, k or v hold."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 8, 16, dtype=torch.float64)
    k, v = (torch.randn(2, 2 if gqa else 4, 8, 16, dtype=torch.float64) for _ in range(2))
    t = {"q": q, "k": k, "v": v}[which]
    t[0, 1, 5, 2] = value
    lin = nn.Linear(16, 16).double()
    leaves = [x.requires_grad_() for x in (q, k, v)]
    loss = lin(F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=gqa)).tanh().sum()
    assert _plan([loss], ()) == "plain"
    inputs = [*leaves, *lin.parameters()]
    got = gw.grad(loss, inputs, retain_graph=True)
    with mock.patch.object(_engine, "_plan", lambda *args, **kwargs: "strong"):
        forced = gw.grad(loss, inputs)
    for a, b in zip(got, forced, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(st.integers(1, 7), st.integers(1, 7), st.booleans(), st.data())
def test_causal_keys_used_equal_the_dense_product(lq, lk, bottom_right, data):
    """The keys kept query rows read under causal masking, from a suffix any of the rows, equal the any over the
    (B, H, Lq, Lk) product of the rows and the causal triangle (top-left and bottom-right alignment)."""
    from gradwise._strong_zeros._rules_attention import _causal_used

    rows = torch.tensor(data.draw(st.lists(st.booleans(), min_size=2 * lq, max_size=2 * lq))).view(1, 2, lq)
    offset = lk - lq if bottom_right else 0
    tri = torch.arange(lk).unsqueeze(0) <= torch.arange(lq).unsqueeze(1) + offset
    dense = (tri & rows.unsqueeze(-1)).any(-2)
    assert torch.equal(_causal_used(rows, offset, lk), dense)
