"""More real reproductions of NaN/Inf gradients caused by values the output does not use.

Same format as ../shared/cases/contamination.py: each case returns ``(output, inputs, expected)``;
``expected`` is torch.autograd.grad of the same program with the unused values deleted (the padded rows /
unused branch removed before the op runs), computed in float64 where possible. ``genuine`` cases are
controls: nothing is unused, and ``expected`` is plain PyTorch's gradient of the program itself.
"""
from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn.functional as F

nan, inf = float("nan"), float("inf")


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # loaded by path: _format sits beside this file
from _format import contamination_table  # noqa: E402

CASES, case = contamination_table()


def _ref(fn, *tensors, dtype=torch.float64):
    """Gradients of ``fn`` (the program with the unused values deleted) at float64 copies of ``tensors``."""
    copies = [t.detach().to(dtype).requires_grad_(True) for t in tensors]
    grads = torch.autograd.grad(fn(*copies), copies, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g.to(t.dtype) for g, t in zip(grads, tensors, strict=False))


def _ref_module(module, fn, params, dtype=torch.float64):
    """Gradients w.r.t. ``params`` (names) of ``fn(module_copy)`` for a float64 copy of ``module``."""
    import copy
    m = copy.deepcopy(module).to(dtype)
    ps = [dict(m.named_parameters())[n] for n in params]
    grads = torch.autograd.grad(fn(m), ps, allow_unused=True)
    return tuple(torch.zeros_like(p, dtype=torch.float32) if g is None else g.float() for g, p in zip(grads, ps, strict=False))


# ------------------------------------------------------------------ where chains / unused branches


@case("where-pow-half-of-negatives-unused", "pytorch/pytorch#29518 (pow with exponent < 1 of negatives)")
def _():
    x = torch.tensor([-4.0, -1.0, 2.0, 9.0], requires_grad=True)
    out = torch.where(x > 0, x ** 0.5, x).sum()
    pos = x.detach() > 0
    exp = _ref(lambda r: (r[pos] ** 0.5).sum() + r[~pos].sum(), x)
    return out, (x,), exp


@case("where-signed-cube-root", "pytorch/pytorch#29518 comment (pow(-8, 1/3) is nan)")
def _():
    x = torch.tensor([-8.0, -0.5, 0.25, 27.0], requires_grad=True)
    out = torch.where(x >= 0, x ** (1 / 3), -((-x) ** (1 / 3))).sum()
    pos = x.detach() >= 0
    exp = _ref(lambda r: (r[pos] ** (1 / 3)).sum() - ((-r[~pos]) ** (1 / 3)).sum(), x)
    return out, (x,), exp


@case("where-pow-1.5-of-negatives-unused", "pytorch/pytorch#76483 (pow grads nan for negative bases)")
def _():
    x = torch.tensor([-2.0, 3.0], requires_grad=True)
    out = torch.where(x > 0, x.pow(1.5), torch.zeros_like(x)).sum()
    exp = _ref(lambda r: r[1:].pow(1.5).sum(), x)
    return out, (x,), exp


@case("where-acos-out-of-domain-unused", "pytorch/pytorch#8069 (acos nan), serengil/retinaface#15 (cos 1.0000000169)")
def _():
    c = torch.tensor([0.5, 1.0000001, -1.0000001, -0.25], requires_grad=True)
    inside = c.detach().abs() < 1
    out = torch.where(c.abs() < 1, torch.acos(c), torch.zeros_like(c)).sum()
    exp = _ref(lambda r: torch.acos(r[inside]).sum(), c)
    return out, (c,), exp


@case("where-reciprocal-of-tiny-unused", "pytorch/pytorch#52248 (where with 1/x guard)")
def _():
    x = torch.tensor([1e-20, 2.0, -4.0], requires_grad=True)
    big = x.detach().abs() > 1e-6
    out = torch.where(x.abs() > 1e-6, torch.reciprocal(x), torch.zeros_like(x)).sum()
    exp = _ref(lambda r: torch.reciprocal(r[big]).sum(), x)
    return out, (x,), exp


@case("where-rsqrt-of-tiny-variance-unused", "pytorch/pytorch#52248 (where guarding rsqrt)")
def _():
    v = torch.tensor([1e-30, 4.0], requires_grad=True)
    out = torch.where(v > 1e-12, torch.rsqrt(v), torch.zeros_like(v)).sum()
    exp = _ref(lambda r: torch.rsqrt(r[1:]).sum(), v)
    return out, (v,), exp


@case("where-divide-by-tiny-denominator-unused", "pytorch/pytorch#4132 (division guarded by where)")
def _():
    num = torch.tensor([1.0, 3.0], requires_grad=True)
    den = torch.tensor([1e-25, 2.0], requires_grad=True)
    out = torch.where(den > 1e-6, num / den, num).sum()
    exp = _ref(lambda n, d: n[0] + (n[1:] / d[1:]).sum(), num, den)
    return out, (num, den), exp


@case("where-nested-log-and-sqrt", "pytorch/pytorch#52248 / #23395 (nested where)")
def _():
    x = torch.tensor([-3.0, 0.0, 0.5, 4.0], requires_grad=True)
    out = torch.where(x > 1, torch.log(x - 1), torch.where(x > 0, torch.sqrt(x), x * x)).sum()
    xd = x.detach()
    a, b, c = xd > 1, (xd > 0) & (xd <= 1), xd <= 0
    exp = _ref(lambda r: torch.log(r[a] - 1).sum() + torch.sqrt(r[b]).sum() + (r[c] * r[c]).sum(), x)
    return out, (x,), exp


@case("clamp-of-log-at-zero", "pytorch/pytorch#15506-style: log then clamp(min=-100) as in BCE")
def _():
    p = torch.tensor([0.0, 0.25, 1.0], requires_grad=True)
    out = torch.log(p).clamp(min=-100).sum()
    exp = _ref(lambda r: torch.log(r[1:]).sum(), p)
    return out, (p,), exp


# ------------------------------------------------------------------ indexing / selection


@case("masked-select-after-log1p", "pytorch/pytorch#152088 (log1p then mask)")
def _():
    a = torch.tensor([-1.0, 0.5, 1.0], requires_grad=True)
    out = torch.log1p(a).masked_select(a > -1).sum()
    exp = _ref(lambda r: torch.log1p(r[1:]).sum(), a)
    return out, (a,), exp


@case("index-put-into-buffer-then-slice", "pytorch/pytorch#17455 (overwritten values keep nan)")
def _():
    x = torch.tensor([0.0, 4.0, 9.0], requires_grad=True)
    buf = torch.zeros(5)
    buf = buf.index_put((torch.tensor([4, 0, 1]),), x.sqrt())
    out = buf[:2].sum()
    exp = _ref(lambda r: r[1:].sqrt().sum(), x)
    return out, (x,), exp


@case("cumsum-then-log-of-padding", "NaN loss with padding: log of a cumulative sum over left-padded zeros")
def _():
    x = torch.tensor([[0.0, 0.0, 0.5, 0.25], [0.1, 0.2, 0.3, 0.4]], requires_grad=True)
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])  # log(0) at the padding
    out = torch.log(x.cumsum(1))[valid].sum()
    exp = _ref(lambda r: torch.log(r[:1].cumsum(1)[:, 2:]).sum() + torch.log(r[1:].cumsum(1)).sum(), x)
    return out, (x,), exp


@case("cumprod-with-nan-after-prefix", "pytorch/pytorch#15131-style: cumprod then keep a prefix")
def _():
    x = torch.tensor([2.0, 0.5, 3.0, nan, 4.0], requires_grad=True)
    out = torch.cumprod(x, 0)[:3].sum()
    exp = _ref(lambda r: torch.cumprod(r[:3], 0).sum(), x)
    return out, (x,), exp


@case("sort-nan-elements-not-kept", "pytorch/pytorch#15506 (value with .max()/.sort() selection)")
def _():
    x = torch.tensor([-1.0, 4.0, 1.0, -9.0, 9.0], requires_grad=True)
    y = torch.sqrt(x)  # nan at negatives, sorted last
    out = torch.sort(y).values[:3].sum()
    exp = _ref(lambda r: torch.sqrt(r[torch.tensor([1, 2, 4])]).sum(), x)
    return out, (x,), exp


@case("topk-smallest-skips-nan", "pytorch/pytorch#15506 (topk selection)")
def _():
    x = torch.tensor([[0.0, 1.0, 4.0], [9.0, -1.0, 16.0]], requires_grad=True)
    y = torch.sqrt(x) + 1  # row 1 has nan (topk treats nan as largest)
    out = torch.topk(y, 1, dim=1, largest=False).values.sum()
    exp = _ref(lambda r: torch.sqrt(r[0, 1]) + torch.sqrt(r[1, 0]) + 2, x)
    # at row 0, the smallest is sqrt(0) + 1 = 1: used, with an infinite derivative
    exp = (torch.tensor([[inf, 0.0, 0.0], [exp[0][1, 0].item(), 0.0, 0.0]]),)
    return out, (x,), exp


# ------------------------------------------------------------------ norms


@case("norm-of-zero-rows-masked-after", "pytorch/pytorch#2421 (zero norm gradient nan)")
def _():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, -1.0]], requires_grad=True)
    n = torch.linalg.norm(x, dim=1, keepdim=True)
    unit = (x / n).masked_fill(n == 0, 0.0)
    w = torch.tensor([1.0, 2.0])
    out = (unit @ w).sum()
    keep = torch.tensor([0, 2])
    exp = _ref(lambda r: ((r[keep] / torch.linalg.norm(r[keep], dim=1, keepdim=True)) @ w.double()).sum(), x)
    return out, (x,), exp


# ------------------------------------------------------------------ losses


@case("ce-zero-class-weights-loss-discarded", "pytorch/pytorch#70348 / #116349 (CE returns nan; users zero it)")
def _():
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    h = torch.randn(5, 4)
    target = torch.tensor([2, 2, 2, 2, 2])
    cw = torch.tensor([1.0, 1.0, 0.0])  # the batch holds only a class of weight 0: loss 0/0
    ce = F.cross_entropy(h @ w, target, weight=cw)
    aux = (w ** 2).sum() * 1e-2
    out = aux + torch.where(torch.isnan(ce), torch.zeros_like(ce), ce)
    exp = _ref(lambda r: (r ** 2).sum() * 1e-2, w)
    return out, (w,), exp


@case("ce-label-smoothing-ignore-index-nan-rows", "pytorch/pytorch#70348 with label_smoothing")
def _():
    torch.manual_seed(1)
    w = torch.randn(4, 3, requires_grad=True)
    h = torch.randn(5, 4)
    h[1] = nan
    target = torch.tensor([0, -100, 1, 2, 1])
    keep = target != -100
    out = F.cross_entropy(h @ w, target, ignore_index=-100, label_smoothing=0.1)
    exp = _ref(lambda r: F.cross_entropy(h[keep].double() @ r, target[keep], label_smoothing=0.1), w)
    return out, (w,), exp


@case("bce-with-logits-nan-padding-indexed", "pytorch/pytorch#121416-style (reduction none then mask)")
def _():
    torch.manual_seed(2)
    lin = torch.nn.Linear(3, 1)
    x = torch.randn(4, 3)
    x[3] = nan
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    pw = torch.tensor([2.0])
    loss = F.binary_cross_entropy_with_logits(lin(x).squeeze(1), y, pos_weight=pw, reduction="none")
    out = loss[:3].mean()
    exp = _ref_module(lin, lambda m: F.binary_cross_entropy_with_logits(
        m(x[:3].double()).squeeze(1), y[:3].double(), pos_weight=pw.double()), ["weight", "bias"])
    return out, (lin.weight, lin.bias), exp


@case("smooth-l1-nan-targets-indexed", "pytorch/pytorch#121416 (smooth_l1 variant)")
def _():
    x = torch.tensor([0.5, -2.0, 3.0, 1.0], requires_grad=True)
    y = torch.tensor([0.0, inf, 1.0, nan])
    valid = torch.isfinite(y)
    out = F.smooth_l1_loss(x, y, reduction="none", beta=0.5)[valid].mean()
    exp = _ref(lambda r: F.smooth_l1_loss(r[valid], y[valid].double(), beta=0.5), x)
    return out, (x,), exp


@case("ctc-infeasible-sample-dropped", "pytorch/pytorch#14335, PR #16199 (inf CTC loss, nan grads)")
def _():
    torch.manual_seed(5)
    T, C = 4, 3
    logits = torch.randn(T, 2, C, requires_grad=True)
    targets = torch.tensor([[1, 2, 0, 0], [1, 1, 1, 1]])
    in_len = torch.tensor([4, 4])
    tg_len = torch.tensor([2, 4])  # sample 1 cannot be aligned: loss inf
    losses = F.ctc_loss(logits.log_softmax(2), targets, in_len, tg_len, reduction="none")
    out = losses[torch.isfinite(losses)].sum()
    exp = _ref(lambda r: F.ctc_loss(r[:, :1].log_softmax(2), targets[:1], in_len[:1], tg_len[:1],
                                    reduction="sum"), logits)
    return out, (logits,), exp


# ------------------------------------------------------------------ layers


@case("layernorm-nan-padded-rows-masked-fill", "pytorch/pytorch#41508-style: padded tokens through LayerNorm")
def _():
    torch.manual_seed(7)
    ln = torch.nn.LayerNorm(4)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 4)
    x[1] = nan
    pad = torch.tensor([False, True, False])
    out = ln(x).masked_fill(pad[:, None], 0.0).pow(2).sum()
    exp = _ref_module(ln, lambda m: m(x[~pad].double()).pow(2).sum(), ["weight", "bias"])
    return out, (ln.weight, ln.bias), exp


@case("groupnorm-nan-batch-element-sliced", "pytorch/pytorch#15131-style: nan sample in a batch, sliced away")
def _():
    torch.manual_seed(8)
    gn = torch.nn.GroupNorm(2, 4)
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 4, 3)
    x[1, 0, 0] = inf
    out = gn(x)[0].pow(2).sum()
    exp = _ref_module(gn, lambda m: m(x[:1].double()).pow(2).sum(), ["weight", "bias"])
    return out, (gn.weight, gn.bias), exp


@case("batchnorm-nan-channel-dropped", "pytorch/pytorch#15131-style: a channel of nans cropped after BN")
def _():
    torch.manual_seed(9)
    bn = torch.nn.BatchNorm1d(3)
    x = torch.randn(4, 3)
    x[:, 2] = nan
    out = bn(x)[:, :2].pow(2).sum()
    ref = torch.nn.BatchNorm1d(2).double()
    with torch.no_grad():
        ref.weight.copy_(bn.weight[:2])
        ref.bias.copy_(bn.bias[:2])
    (gw, gb) = torch.autograd.grad(ref(x[:, :2].double()).pow(2).sum(), (ref.weight, ref.bias))
    exp = (torch.cat([gw.float(), torch.zeros(1)]), torch.cat([gb.float(), torch.zeros(1)]))
    return out, (bn.weight, bn.bias), exp


@case("embedding-nan-padding-row-masked", "pytorch/pytorch#23156-style: padding embedding row then Linear")
def _():
    torch.manual_seed(10)
    emb = torch.nn.Embedding(5, 3, padding_idx=0)
    with torch.no_grad():
        emb.weight[0] = nan  # a padding row never meant to be read
    lin = torch.nn.Linear(3, 2)
    tokens = torch.tensor([[1, 2, 0], [3, 0, 0]])
    pad = tokens == 0
    h = lin(emb(tokens)).masked_fill(pad[..., None], 0.0)
    out = h.sum() / (~pad).sum()
    keep = tokens[~pad]
    w64 = lin.weight.detach().double().requires_grad_(True)
    b64 = lin.bias.detach().double().requires_grad_(True)
    ref = F.linear(emb.weight[keep].detach().double(), w64, b64).sum() / keep.numel()
    gw, gb = torch.autograd.grad(ref, (w64, b64))
    return out, (lin.weight, lin.bias), (gw.float(), gb.float())


@case("lstm-nan-padding-steps-selected", "pytorch/pytorch#41508-style: padded steps through nn.LSTM (float64)")
def _():
    torch.manual_seed(11)
    lstm = torch.nn.LSTM(2, 3, batch_first=True).double()
    x = torch.randn(2, 4, 2, dtype=torch.float64)
    x[1, 2:] = nan  # sequence 1 has length 2; its padding is garbage
    lens = torch.tensor([4, 2])
    valid = torch.arange(4) < lens[:, None]
    y, _ = lstm(x)
    out = y[valid].sum()
    ref = lambda m: m(x[:1])[0].sum() + m(x[1:, :2])[0].sum()
    names = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0"]
    exp = tuple(g.double() for g in _ref_module(lstm, ref, names))
    return out, tuple(dict(lstm.named_parameters())[n] for n in names), exp


@case("lstm-float32-nan-padding-steps-selected", "pytorch/pytorch#41508-style: padded steps through nn.LSTM (float32)")
def _():
    torch.manual_seed(11)
    lstm = torch.nn.LSTM(2, 3, batch_first=True)
    x = torch.randn(2, 4, 2)
    x[1, 2:] = nan
    lens = torch.tensor([4, 2])
    valid = torch.arange(4) < lens[:, None]
    y, _ = lstm(x)
    out = y[valid].sum()
    ref = lambda m: m(x[:1].double())[0].sum() + m(x[1:, :2].double())[0].sum()
    names = ["weight_ih_l0", "bias_hh_l0"]
    exp = _ref_module(lstm, ref, names)
    return out, tuple(dict(lstm.named_parameters())[n] for n in names), exp


@case("mha-fully-masked-query-rows-sliced", "pytorch/pytorch#41508 (MHA nan grads, fully masked rows)")
def _():
    torch.manual_seed(13)
    mha = torch.nn.MultiheadAttention(4, 1, batch_first=True)
    x = torch.randn(2, 3, 4)
    kpm = torch.tensor([[False, False, False], [True, True, True]])  # batch element 1 is all padding
    y, _ = mha(x, x, x, key_padding_mask=kpm, need_weights=True)
    out = y[0].sum()
    ref = lambda m: m(x[:1].double(), x[:1].double(), x[:1].double())[0].sum()
    names = ["in_proj_weight", "out_proj.weight"]
    exp = _ref_module(mha, ref, names)
    return out, tuple(dict(mha.named_parameters())[n] for n in names), exp


@case("mha-nan-batch-element-sliced", "pytorch/pytorch#101967 (nan in masked-out positions)")
def _():
    torch.manual_seed(14)
    mha = torch.nn.MultiheadAttention(4, 2, batch_first=True)
    x = torch.randn(2, 3, 4)
    x[1] = nan
    y, _ = mha(x, x, x, need_weights=False)
    out = y[0].pow(2).sum()
    ref = lambda m: m(x[:1].double(), x[:1].double(), x[:1].double(), need_weights=False)[0].pow(2).sum()
    names = ["in_proj_weight", "in_proj_bias", "out_proj.weight"]
    exp = _ref_module(mha, ref, names)
    return out, tuple(dict(mha.named_parameters())[n] for n in names), exp


@case("sdpa-fully-masked-rows-sliced-f64", "pytorch/pytorch#103963 (float64)")
def _():
    torch.manual_seed(15)
    q = torch.randn(1, 1, 4, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 4, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 4, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    mask[2:] = False
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = o[..., :2, :].pow(2).sum()
    exp = _ref(lambda a, b, c: F.scaled_dot_product_attention(a[..., :2, :], b, c, attn_mask=mask[:2])
               .pow(2).sum(), q, k, v)
    return out, (q, k, v), exp


# ------------------------------------------------------------------ pooling / conv / resampling


@case("maxpool-nan-border-cropped", "Theano/Theano#3609 analog (pool then crop)")
def _():
    x = torch.tensor([[[1.0, 4.0, 9.0, 16.0, -1.0, -4.0]]], requires_grad=True)
    y = F.max_pool1d(x.sqrt(), 2)  # last window is nan
    out = y[..., :2].sum()
    exp = _ref(lambda r: F.max_pool1d(r[..., :4].sqrt(), 2).sum(), x)
    return out, (x,), exp


@case("interpolate-nearest-cropped", "Theano/Theano#3609 analog (upsample then crop)")
def _():
    x = torch.tensor([[[4.0, 9.0, -1.0]]], requires_grad=True)
    y = F.interpolate(x.sqrt(), scale_factor=2, mode="nearest")
    out = y[..., :4].sum()
    exp = _ref(lambda r: F.interpolate(r[..., :2].sqrt(), scale_factor=2, mode="nearest").sum(), x)
    return out, (x,), exp


@case("conv-transpose1d-nan-tail-cropped", "Theano/Theano#3609 analog (conv_transpose then crop)")
def _():
    torch.manual_seed(19)
    ct = torch.nn.ConvTranspose1d(1, 1, 2, stride=2)
    x = torch.tensor([[[1.0, 2.0, nan]]])
    out = ct(x)[..., :4].sum()
    exp = _ref_module(ct, lambda m: m(x[..., :2].double()).sum(), ["weight", "bias"])
    return out, (ct.weight, ct.bias), exp


# ------------------------------------------------------------------ matrices / einsum


@case("inverse-of-singular-batch-element-sliced", "pytorch/pytorch#15131-style: singular matrix in a batch")
def _():
    a = torch.tensor([[[2.0, 1.0], [1.0, 3.0]], [[1.0, 2.0], [2.0, 4.0]]], requires_grad=True)
    inv = torch.linalg.inv_ex(a).inverse  # batch element 1 is singular: inf/nan
    out = inv[0].sum()
    exp = _ref(lambda r: torch.linalg.inv(r[0]).sum(), a)
    return out, (a,), exp


# ------------------------------------------------------------------ distributions


@case("normal-log-prob-nan-loc-subset", "pytorch/pytorch#15131 (Normal.log_prob nan with subset)")
def _():
    x = torch.tensor([1.0, 2, 3, nan])
    y = torch.tensor([1.0, 2, 3, 4])
    k = torch.tensor([0.3], requires_grad=True)
    lp = torch.distributions.Normal(loc=k * x, scale=1.0, validate_args=False).log_prob(y)
    out = -lp[:-1].mean()
    exp = _ref(lambda r: -torch.distributions.Normal(r * x[:-1].double(), 1.0).log_prob(y[:-1].double()).mean(), k)
    return out, (k,), exp


# ------------------------------------------------------------------ controls


@case("log-of-softmax-underflow-is-used", "control: log(softmax) with an underflowed class (use log_softmax)",
      genuine=True)
def _():
    s = torch.tensor([[0.0, -200.0, 1.0]], requires_grad=True)
    out = -torch.log(torch.softmax(s, 1))[0, 1]  # exp(-200) underflows to 0 in float32: loss inf
    (g,) = torch.autograd.grad(-torch.log(torch.softmax(s, 1))[0, 1], s)
    return out, (s,), (g,)


@case("ce-zero-class-weights-loss-used", "control: pytorch/pytorch#116349, the nan loss is used", genuine=True)
def _():
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    h = torch.randn(5, 4)
    target = torch.tensor([2, 2, 2, 2, 2])
    cw = torch.tensor([1.0, 1.0, 0.0])
    ce = F.cross_entropy(h @ w, target, weight=cw)
    return ce, (w,), (torch.full((4, 3), nan),)


@case("acos-out-of-domain-is-used", "control: pytorch/pytorch#8069", genuine=True)
def _():
    c = torch.tensor([0.5, 1.0000001], requires_grad=True)
    return torch.acos(c).sum(), (c,), (torch.tensor([-1 / math.sqrt(0.75), nan]),)


@case("pow-half-of-negative-is-used", "control: pytorch/pytorch#29518", genuine=True)
def _():
    x = torch.tensor([-4.0, 4.0], requires_grad=True)
    return (x ** 0.5).sum(), (x,), (torch.tensor([nan, 0.25]),)


@case("mha-fully-masked-row-is-used", "control: pytorch/pytorch#41508, the nan row is in the loss", genuine=True)
def _():
    torch.manual_seed(13)
    mha = torch.nn.MultiheadAttention(4, 1, batch_first=True)
    x = torch.randn(2, 3, 4)
    kpm = torch.tensor([[False, False, False], [True, True, True]])
    y, _ = mha(x, x, x, key_padding_mask=kpm, need_weights=True)
    out = y.sum()
    (g,) = torch.autograd.grad(mha(x, x, x, key_padding_mask=kpm, need_weights=True)[0].sum(), mha.out_proj.bias)
    return out, (mha.out_proj.bias,), (g,)
