"""Real reproductions of NaN/Inf gradients caused by values the output does not use.

Each case comes from a public bug report (named in `source`) and builds a small program. It returns
``(output, inputs, expected)``: ``output`` is a scalar tensor to differentiate, ``inputs`` the tensors to
differentiate with respect to, and ``expected`` the gradients of the same program with the unused values
deleted, the answer a user expects. Cases marked ``genuine`` are controls: the output really depends on a
NaN/Inf (or on an infinite derivative) and the expected gradient keeps it.

Run them against any gradient function with ``check.py``.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

nan, inf = float("nan"), float("inf")


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # loaded by path: _format sits beside this file
from _format import contamination_table  # noqa: E402
from _format import leaf as _leaf  # noqa: E402
from _format import ref as _ref  # noqa: E402

CASES, case = contamination_table()



# ---------------------------------------------------------------------------------------------------------
# Helpers. `expected` is always torch.autograd.grad of the same program with the unused values deleted (or,
# where deleting them would change what the kept outputs are, e.g. the border handling of an interpolation,
# replaced by finite values that the kept outputs provably do not read: `_same` checks that the kept outputs
# are bitwise unchanged by the replacement).
# ---------------------------------------------------------------------------------------------------------
D = torch.distributions
f64 = torch.float64




def _same(a, b):
    assert torch.equal(a.detach(), b.detach()), "the replaced values are read by the kept outputs"


def _scatter_back(g, n, keep, dim=0):
    """Gradient of the deleted-values program, placed back at the kept positions (zeros elsewhere)."""
    shape = list(g.shape)
    shape[dim] = n
    out = torch.zeros(shape, dtype=g.dtype)
    out.index_copy_(dim, torch.as_tensor(keep), g)
    return out


# ================================ selections through evenly-distributing reductions =======================

@case("max-all-reduce-skips-log-of-zero", "pytorch/pytorch#15506 ('the same should be true if [-1] is replaced "
      "with .max()')")
def _():
    a = torch.arange(4.0, requires_grad=True)
    keep = [1, 2, 3]
    (g,) = _ref(lambda r: r.log().max(), a[keep])
    return a.log().max(), (a,), (_scatter_back(g, 4, keep),)


@case("amax-per-row-skips-log-of-zero", "pytorch/pytorch PR #43519 (evenly distributed grad for amax) with "
      "pytorch#15506's log(0)")
def _():
    p = torch.tensor([[0.0, 0.2, 0.8], [0.5, 0.0, 0.5]], requires_grad=True)
    out = p.log().amax(1).sum()
    (g0,) = _ref(lambda r: r.log().amax(0), p[0, 1:])
    (g1,) = _ref(lambda r: r.log().amax(0), p[1, [0, 2]])
    exp = torch.tensor([[0.0, *g0.tolist()], [g1[0].item(), 0.0, g1[1].item()]], dtype=f64)
    return out, (p,), (exp,)


@case("median-all-reduce-skips-minus-inf", "pytorch/pytorch PR #43519 (min/max/median evenly distribute) with "
      "pytorch#15506's log(0)")
def _():
    x = torch.tensor([0.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)
    # median of [-inf, l2, l3, l4, l5] is log 3; without the unselected -inf, the (lower) median of
    # [l2, l3, l4, l5] is the same element
    keep = [1, 2, 3, 4]
    assert torch.median(x.detach()[keep].log()) == torch.median(x.detach().log())
    (g,) = _ref(lambda r: torch.median(r.log()), x[keep])
    return torch.median(x.log()), (x,), (_scatter_back(g, 5, keep),)


@case("nanmedian-ignores-nan-of-sqrt", "pytorch/pytorch PR #45084 (nanmedian), PaddlePaddle/Paddle#42385 (only "
      "the selected elements get gradient)")
def _():
    x = torch.tensor([-1.0, 4.0, 9.0, 16.0], requires_grad=True)
    keep = [1, 2, 3]
    (g,) = _ref(lambda r: torch.nanmedian(r.sqrt()), x[keep])
    return torch.nanmedian(x.sqrt()), (x,), (_scatter_back(g, 4, keep),)


# ================================ nan-ignoring reductions / guards =========================================

@case("nansum-skips-nan-product", "pytorch/pytorch#67180 (gradient of nansum wrongly produces nan)")
def _():
    a = torch.tensor([1.0, 2.0, nan])
    b = torch.tensor(1.0, requires_grad=True)
    (g,) = _ref(lambda r: torch.sum(a[:2].to(f64) * r), b)
    return torch.nansum(a * b), (b,), (g,)


@case("nanmean-skips-nan-targets", "pytorch/pytorch#67180 (nanmean), #64305 (missing outputs are NaN)")
def _():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1)
    x = torch.randn(4, 3)
    y = torch.tensor([[0.5], [nan], [1.0], [nan]])
    keep = [0, 2]
    loss = torch.nanmean((lin(x) - y) ** 2)
    (g,) = _ref(lambda w: torch.mean((x[keep].to(f64) @ w.T + lin.bias.detach().to(f64) - y[keep].to(f64)) ** 2),
                lin.weight)
    return loss, (lin.weight,), (g,)


@case("nan-to-num-as-guard", "pytorch/pytorch#94700 (NaN during backward of nan_to_num)")
def _():
    x = torch.tensor([0.7], requires_grad=True)
    w = torch.tensor(nan)
    out = ((x * w).nan_to_num(0.0) + 3 * x).sum()
    (g,) = _ref(lambda r: (3 * r).sum(), x)  # the replaced element deleted: only 3x is left
    return out, (x,), (g,)


# ================================ log-space reductions with -inf / NaN ======================================

@case("logsumexp-with-log-zero-entries", "pytorch/pytorch#31829 (logsumexp / log-space semiring at -inf), "
      "jax-ml/jax#6811")
def _():
    p = torch.tensor([[0.0, 0.3, 0.7], [0.5, 0.0, 0.5]], requires_grad=True)
    out = torch.logsumexp(p.log(), 1).sum()
    (g0,) = _ref(lambda r: torch.logsumexp(r.log(), 0), p[0, 1:])
    (g1,) = _ref(lambda r: torch.logsumexp(r.log(), 0), p[1, [0, 2]])
    exp = torch.tensor([[0.0, *g0.tolist()], [g1[0].item(), 0.0, g1[1].item()]], dtype=f64)
    return out, (p,), (exp,)


@case("logcumsumexp-nan-after-kept-prefix", "tinygrad/tinygrad#17853 (logcumsumexp on masked prefixes), "
      "pytorch/pytorch#31829")
def _():
    x = torch.tensor([1.0, 2.0, 0.5, nan, nan], requires_grad=True)
    keep = [0, 1, 2]
    (g,) = _ref(lambda r: torch.logcumsumexp(r, 0).sum(), x[keep])
    return torch.logcumsumexp(x, 0)[:3].sum(), (x,), (_scatter_back(g, 5, keep),)


# ================================ resampling with cropping ==================================================

@case("bicubic-upsample-cropped", "Theano/Theano#3609 analog (interpolate then crop; bicubic)")
def _():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 4)
    x[:, 0] = 0.0  # log(0) = -inf in a column the kept outputs never read
    x.requires_grad_(True)
    out_full = F.interpolate(x.log().view(1, 1, 4, 4), scale_factor=2, mode="bicubic")[..., 6:, 6:]
    ref = _leaf(x)
    with torch.no_grad():
        ref[:, 0] = 1.0
    out_ref = F.interpolate(ref.log().view(1, 1, 4, 4), scale_factor=2, mode="bicubic")[..., 6:, 6:]
    torch.testing.assert_close(out_full.detach().to(f64), out_ref.detach())
    (g,) = torch.autograd.grad(out_ref.sum(), ref)
    return out_full.sum(), (x,), (g,)


@case("bicubic-antialias-downsample-cropped", "Theano/Theano#3609 analog (antialiased bicubic resize then crop)")
def _():
    x = torch.tensor([[0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]], requires_grad=True)
    out_full = F.interpolate(x.log().view(1, 1, 1, 8), size=(1, 4), mode="bicubic", antialias=True)[..., 2:]
    ref = _leaf(x)
    with torch.no_grad():
        ref[0, 0] = 1.0
    out_ref = F.interpolate(ref.log().view(1, 1, 1, 8), size=(1, 4), mode="bicubic", antialias=True)[..., 2:]
    torch.testing.assert_close(out_full.detach().to(f64), out_ref.detach())
    (g,) = torch.autograd.grad(out_ref.sum(), ref)
    return out_full.sum(), (x,), (g,)


@case("grid-sample-nan-column-cropped", "spatial transformer: grid_sample of an image with a NaN border column "
      "(padding), output cropped; cf. Theano/Theano#3609")
def _():
    torch.manual_seed(0)
    img = torch.randn(1, 1, 4, 4, dtype=f64)
    img[..., 3] = nan
    theta = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=f64, requires_grad=True)
    grid = F.affine_grid(theta, (1, 1, 4, 4), align_corners=False)
    out = F.grid_sample(img, grid, align_corners=False)[..., :2].sum()
    ref_img = img.clone()
    ref_img[..., 3] = 7.0  # not read by the kept outputs
    t2 = _leaf(theta)
    o2 = F.grid_sample(ref_img, F.affine_grid(t2, (1, 1, 4, 4), align_corners=False), align_corners=False)[..., :2]
    torch.testing.assert_close(o2.sum().detach(), out.detach())
    (g,) = torch.autograd.grad(o2.sum(), t2)
    return out, (theta,), (g,)


# ================================ overwrite / fill / put / take =============================================

@case("index-copy-overwrites-nan-cache-row", "static KV cache updated with index_copy_ (ROCm/pytorch#2896, "
      "HF static cache pattern); overwritten rows are unused")
def _():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2).double()
    h = torch.randn(4, 3, dtype=f64)
    h[2] = nan  # stale slot, overwritten by the new key
    new = torch.randn(1, 2, dtype=f64)
    out = lin(h).index_copy(0, torch.tensor([2]), new).pow(2).sum()
    keep = [0, 1, 3]
    (g,) = _ref(lambda w: (F.linear(h[keep], w, lin.bias.detach()).pow(2).sum() + new.pow(2).sum()), lin.weight)
    return out, (lin.weight,), (g,)


@case("index-fill-masks-nan-positions", "pytorch/pytorch#23156-style: masked positions filled with index_fill")
def _():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2).double()
    h = torch.randn(4, 3, dtype=f64)
    h[1] = nan
    out = lin(h).index_fill(0, torch.tensor([1]), 0.0).pow(2).sum()
    keep = [0, 2, 3]
    (g,) = _ref(lambda w: F.linear(h[keep], w, lin.bias.detach()).pow(2).sum(), lin.weight)
    return out, (lin.weight,), (g,)


@case("take-skips-log-of-zero", "pytorch/pytorch#15506 with torch.take (flat gather)")
def _():
    x = torch.tensor([[0.0, 2.0], [3.0, 4.0]], requires_grad=True)
    idx = torch.tensor([1, 3])
    (g,) = _ref(lambda r: r.log().sum(), x.reshape(-1)[idx])
    exp = torch.zeros(4, dtype=f64).index_copy(0, idx, g).view(2, 2)
    return torch.take(x.log(), idx).sum(), (x,), (exp,)


# ================================ losses with reduction='none' then masking =================================

@case("soft-margin-loss-nan-targets-indexed", "pytorch/pytorch#64305 / #121416 (loss per element, NaN "
      "(missing) targets removed afterwards)")
def _():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1).double()
    x = torch.randn(4, 3, dtype=f64)
    y = torch.tensor([1.0, nan, -1.0, nan], dtype=f64)
    keep = ~torch.isnan(y)
    out = F.soft_margin_loss(lin(x).squeeze(1), y, reduction="none")[keep].sum()
    (g,) = _ref(lambda w: F.soft_margin_loss(F.linear(x[keep], w, lin.bias.detach()).squeeze(1), y[keep],
                                             reduction="sum"), lin.weight)
    return out, (lin.weight,), (g,)


# ================================ batched linear algebra / spectral ops =====================================

@case("matrix-exp-nan-batch-element-sliced", "pytorch/pytorch#82282 (matrix_exp with NaN input), "
      "pytorch#15131-style batch element sliced away")
def _():
    torch.manual_seed(0)
    A = torch.randn(3, 2, 2, dtype=f64)
    A[2] = nan
    A.requires_grad_(True)
    (g,) = _ref(lambda r: torch.linalg.matrix_exp(r).sum(), A[:2])
    return torch.linalg.matrix_exp(A)[:2].sum(), (A,), (_scatter_back(g, 3, [0, 1]),)


@case("rfft-nan-row-sliced", "pytorch/pytorch#15131-style: a NaN sample in a batch, spectrum of the others used")
def _():
    torch.manual_seed(0)
    x = torch.randn(2, 8, dtype=f64)
    x[1] = nan
    w = torch.tensor(1.5, dtype=f64, requires_grad=True)
    out = torch.fft.rfft(w * x)[0].abs().sum()
    (g,) = _ref(lambda r: torch.fft.rfft(r * x[0]).abs().sum(), w)
    return out, (w,), (g,)


@case("stft-nan-padding-frames-cropped", "espnet/espnet#283 (NaN as the padding value of audio batches); "
      "frames past the length dropped")
def _():
    torch.manual_seed(0)
    x = torch.randn(16, dtype=f64)
    x[12:] = nan  # padding, only in the last frame
    w = torch.tensor(0.8, dtype=f64, requires_grad=True)
    win = torch.hann_window(4, dtype=f64)

    def spec(s):
        return torch.stft(s, n_fft=4, hop_length=4, center=False, window=win, return_complex=True)

    out = spec(w * x)[:, :3].abs().pow(2).sum()
    (g,) = _ref(lambda r: spec(r * x[:12]).abs().pow(2).sum(), w)
    return out, (w,), (g,)


# ================================ segment reductions ========================================================

@case("segment-reduce-sum-nan-segment-dropped", "torch.segment_reduce (ragged batches); NaN segment's result "
      "dropped, cf. pytorch#15131")
def _():
    torch.manual_seed(0)
    w = torch.randn(3, dtype=f64, requires_grad=True)
    h = torch.randn(5, 3, dtype=f64)
    h[3:] = nan
    lengths = torch.tensor([3, 2])
    out = torch.segment_reduce(h @ w, "sum", lengths=lengths)[0]
    (g,) = _ref(lambda r: (h[:3] @ r).sum(), w)
    return out, (w,), (g,)


@case("segment-reduce-max-log-of-zero-dropped", "torch.segment_reduce 'max' with pytorch#15506's log(0)")
def _():
    x = torch.tensor([2.0, 3.0, 0.0, 0.0, 5.0], requires_grad=True)
    lengths = torch.tensor([2, 3])
    (g,) = _ref(lambda r: r.log().max(), x[:2])
    return torch.segment_reduce(x.log(), "max", lengths=lengths)[0], (x,), (_scatter_back(g, 5, [0, 1]),)


# ================================ batch norm in eval mode ===================================================

@case("batchnorm-eval-dead-channel-cropped", "dead BatchNorm channel (running_var 0) with eps=0 in eval mode; "
      "channel cropped afterwards (pytorch#15131-style)")
def _():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm1d(3, eps=0.0).double().eval()
    bn.running_var[2] = 0.0
    x = torch.randn(4, 3, dtype=f64)
    out = bn(x)[:, :2].sum()
    rm, rv = bn.running_mean[:2].clone(), bn.running_var[:2].clone()
    (g,) = _ref(lambda w: F.batch_norm(x[:, :2], rm, rv, w, bn.bias.detach()[:2], False, 0.0, 0.0).sum(),
                bn.weight[:2])
    return out, (bn.weight,), (_scatter_back(g, 3, [0, 1]),)


@case("double-backward-through-where-log", "WGAN-GP style create_graph with a guarded log; "
      "docs/strong-zeros-design.md known limit")
def _():
    x = torch.tensor([1.0, 0.0, 3.0], requires_grad=True)
    import gradwise
    y = torch.where(x > 0, x.log(), 0.0).sum()
    (g,) = gradwise.grad(y, x, create_graph=True)
    ref = _leaf(x[[0, 2]])
    (gr,) = torch.autograd.grad(ref.log().sum(), ref, create_graph=True)
    (g2,) = torch.autograd.grad(gr.sum(), ref)
    return g.sum(), (x,), (_scatter_back(g2, 3, [0, 2]),)


# ================================ cases plain PyTorch fails and gradwise should pass ========================

@case("gru-float32-nan-padding-steps", "pytorch/pytorch#41508-style padded steps through nn.GRU (float32)")
def _():
    torch.manual_seed(0)
    rnn = torch.nn.GRU(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    x[1, 3:] = nan
    out, _h = rnn(x)
    loss = out[0].sum() + out[1, :3].sum()
    w = _leaf(rnn.weight_hh_l0, torch.float32)
    params = {n: (w if n == "weight_hh_l0" else p.detach()) for n, p in rnn.named_parameters()}
    o0 = torch.func.functional_call(rnn, params, (x[:1],))[0]
    o1 = torch.func.functional_call(rnn, params, (x[1:, :3],))[0]
    (g,) = torch.autograd.grad(o0.sum() + o1.sum(), w)
    return loss, (rnn.weight_hh_l0,), (g,)


@case("rnn-relu-float64-nan-padding-steps", "pytorch/pytorch#41508-style padded steps through nn.RNN (relu)")
def _():
    torch.manual_seed(0)
    rnn = torch.nn.RNN(3, 4, batch_first=True, nonlinearity="relu").double()
    x = torch.randn(2, 5, 3, dtype=f64)
    x[1, 3:] = nan
    out, _h = rnn(x)
    loss = out[0].sum() + out[1, :3].sum()
    w = _leaf(rnn.weight_ih_l0)
    params = {n: (w if n == "weight_ih_l0" else p.detach()) for n, p in rnn.named_parameters()}
    o0 = torch.func.functional_call(rnn, params, (x[:1],))[0]
    o1 = torch.func.functional_call(rnn, params, (x[1:, :3],))[0]
    (g,) = torch.autograd.grad(o0.sum() + o1.sum(), w)
    return loss, (rnn.weight_ih_l0,), (g,)


@case("instance-norm-nan-channel-sliced", "pytorch/pytorch#15131-style: a NaN channel of one sample, sliced away")
def _():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=f64)
    x[1, 2] = nan
    w = torch.tensor([1.0, 2.0, 0.5], dtype=f64, requires_grad=True)
    y = F.instance_norm(x, weight=w)
    out = (y[0] ** 2 * torch.arange(5.0, dtype=f64)).sum() + (y[1, :2] ** 2 * torch.arange(5.0, dtype=f64)).sum()
    (g,) = _ref(lambda r: (F.instance_norm(x[:1], weight=r) ** 2 * torch.arange(5.0, dtype=f64)).sum()
                + (F.instance_norm(x[1:, :2], weight=r[:2]) ** 2 * torch.arange(5.0, dtype=f64)).sum(), w)
    return out, (w,), (g,)


@case("slogdet-singular-batch-element-sliced", "pytorch/pytorch#15131-style: singular matrix in a batch (slogdet)")
def _():
    torch.manual_seed(0)
    A = torch.randn(3, 3, 3, dtype=f64)
    A[2] = 0.0
    A.requires_grad_(True)
    (g,) = _ref(lambda r: torch.linalg.slogdet(r).logabsdet.sum(), A[:2])
    return torch.linalg.slogdet(A).logabsdet[:2].sum(), (A,), (_scatter_back(g, 3, [0, 1]),)


@case("svd-zero-batch-element-sliced", "pytorch/pytorch#15131-style: zero matrix (repeated singular values) "
      "in a batch, SVD")
def _():
    torch.manual_seed(0)
    A = torch.randn(3, 3, 2, dtype=f64)
    A[2] = 0.0
    A.requires_grad_(True)

    def f(r):
        U, S, _Vh = torch.linalg.svd(r, full_matrices=False)
        return (U * S.unsqueeze(-2)).abs().sum()

    U, S, _Vh = torch.linalg.svd(A, full_matrices=False)
    out = (U[:2] * S[:2].unsqueeze(-2)).abs().sum()
    (g,) = _ref(f, A[:2])
    return out, (A,), (_scatter_back(g, 3, [0, 1]),)


@case("where-erfinv-at-one-unused", "pytorch/pytorch#52248 pattern with torch.special.erfinv (probit of 1)")
def _():
    x = torch.tensor([0.5, 1.0, -0.2], requires_grad=True)
    out = torch.where(x < 1, torch.special.erfinv(x), 0.0).sum()
    keep = [0, 2]
    (g,) = _ref(lambda r: torch.special.erfinv(r).sum(), x[keep])
    return out, (x,), (_scatter_back(g, 3, keep),)


@case("where-digamma-at-zero-unused", "pytorch/pytorch#52248 pattern with digamma (Dirichlet / Beta "
      "concentration 0 masked)")
def _():
    a = torch.tensor([0.0, 1.5, 3.0], requires_grad=True)
    out = torch.where(a > 0, torch.digamma(a), 0.0).sum()
    keep = [1, 2]
    (g,) = _ref(lambda r: torch.digamma(r).sum(), a[keep])
    return out, (a,), (_scatter_back(g, 3, keep),)


@case("where-i0-overflow-unused", "pytorch/pytorch#10729 analog (overflow in the unused branch) with "
      "torch.special.i0 (von Mises normaliser)")
def _():
    k = torch.tensor([0.5, 800.0, 2.0], requires_grad=True)
    out = torch.where(k < 100, torch.special.i0(k).log(), k).sum()
    (g,) = _ref(lambda r: torch.special.i0(r[[0, 2]]).log().sum() + r[1], k)
    return out, (k,), (g,)


@case("categorical-fully-masked-row-sliced", "pytorch/pytorch#41508 analog: Categorical(logits) with an all -inf "
      "(fully masked) row, row sliced away")
def _():
    logits = torch.tensor([[0.0, 1.0, -inf], [-inf, -inf, -inf]], requires_grad=True)
    lp = D.Categorical(logits=logits, validate_args=False).log_prob(torch.tensor([1, 0]))
    (g,) = _ref(lambda r: D.Categorical(logits=r, validate_args=False).log_prob(torch.tensor([1])).sum(),
                logits[:1])
    return lp[0], (logits,), (_scatter_back(g, 2, [0]),)


@case("fmax-ignores-nan-of-sqrt", "torch.fmax as a NaN-ignoring guard (numpy fmax semantics)")
def _():
    x = torch.tensor([0.5, 3.0, -1.0], requires_grad=True)
    out = torch.fmax(torch.zeros(3), x.sqrt()).sum()
    keep = [0, 1]
    (g,) = _ref(lambda r: torch.fmax(torch.zeros(2, dtype=f64), r.sqrt()).sum(), x[keep])
    return out, (x,), (_scatter_back(g, 3, keep),)


@case("conv-transpose2d-output-padding-cropped", "Theano/Theano#3609 analog: strided conv_transpose2d with "
      "output_padding, NaN input row whose outputs are cropped")
def _():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 3, 3, dtype=f64)
    x[..., 2, :] = nan
    w = torch.randn(1, 1, 3, 3, dtype=f64, requires_grad=True)
    out = F.conv_transpose2d(x, w, stride=2, padding=1, output_padding=1)[..., :3, :].sum()
    ref_x = x.clone()
    ref_x[..., 2, :] = 0.0
    (g,) = _ref(lambda r: F.conv_transpose2d(ref_x, r, stride=2, padding=1, output_padding=1)[..., :3, :].sum(), w)
    _same(F.conv_transpose2d(ref_x, w, stride=2, padding=1, output_padding=1)[..., :3, :],
          F.conv_transpose2d(x, w, stride=2, padding=1, output_padding=1)[..., :3, :])
    return out, (w,), (g,)


@case("logsumexp-fully-masked-row-sliced", "pytorch/pytorch#31829 (logsumexp nan gradient when all inputs are "
      "-inf)")
def _():
    x = torch.tensor([[1.0, 2.0, -inf], [-inf, -inf, -inf]], requires_grad=True)
    (g,) = _ref(lambda r: torch.logsumexp(r, 1).sum(), x[:1])
    return torch.logsumexp(x, 1)[0], (x,), (_scatter_back(g, 2, [0]),)


@case("gradient-penalty-nan-row-sliced", "WGAN-GP (create_graph=True) with a NaN padding row sliced away; "
      "pytorch#15131-style")
def _():
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(3, 4).double(), torch.nn.Linear(4, 1).double()
    x = torch.randn(3, 3, dtype=f64)
    x[2] = nan
    x.requires_grad_(True)
    g, = torch.autograd.grad(lin2(torch.tanh(lin1(x)))[:2].sum(), x, create_graph=True)
    pen = (g[:2].norm(dim=1) - 1).pow(2).sum()

    def ref(w):
        xr = x.detach()[:2].clone().requires_grad_(True)
        gr, = torch.autograd.grad(lin2(torch.tanh(F.linear(xr, w, lin1.bias))).sum(), xr, create_graph=True)
        return (gr.norm(dim=1) - 1).pow(2).sum()

    (ge,) = _ref(ref, lin1.weight)
    return pen, (lin1.weight,), (ge,)


# ================================ controls ==================================================================

@case("max-selects-nan-is-used", "control: NaN is the max (torch.max propagates NaN)", genuine=True)
def _():
    x = torch.tensor([-1.0, 4.0, 9.0], requires_grad=True)
    (g,) = _ref(lambda r: r.sqrt().max(), x)
    return x.sqrt().max(), (x,), (g,)


@case("nansum-minus-inf-is-used", "control: nansum ignores NaN, not -inf (pytorch#67180)", genuine=True)
def _():
    x = torch.tensor([0.0, 2.0, 4.0], requires_grad=True)
    (g,) = _ref(lambda r: torch.nansum(r.log()), x)
    return torch.nansum(x.log()), (x,), (g,)


@case("logcumsumexp-nan-in-used-prefix", "control: the NaN is inside the kept prefix", genuine=True)
def _():
    x = torch.tensor([1.0, nan, 0.5, 2.0], requires_grad=True)
    # the program with the unused value deleted: x[3] reaches no kept output, so its gradient is 0 (computing the
    # reference on the full program made it NaN: PyTorch's formula spreads the used NaN onto it)
    (g,) = _ref(lambda r: torch.logcumsumexp(r[:3], 0).sum(), x)
    return torch.logcumsumexp(x, 0)[:3].sum(), (x,), (g,)


@case("grid-sample-reads-nan-column", "control: the kept outputs sample the NaN column", genuine=True)
def _():
    torch.manual_seed(0)
    img = torch.randn(1, 1, 4, 4, dtype=f64)
    img[..., 3] = nan
    theta = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=f64, requires_grad=True)

    def f(t):
        return F.grid_sample(img, F.affine_grid(t, (1, 1, 4, 4), align_corners=False), align_corners=False).sum()

    (g,) = _ref(f, theta)
    return f(theta), (theta,), (g,)
