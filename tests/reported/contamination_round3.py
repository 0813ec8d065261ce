"""Real reproductions of NaN/Inf gradients caused by values the output does not use.

Each case comes from a public bug report (named in `source`) and builds a small program. It returns
``(output, inputs, expected)``: ``output`` is a scalar tensor to differentiate, ``inputs`` the tensors to
differentiate with respect to, and ``expected`` the gradients of the same program with the unused values
deleted, the answer a user expects. Cases marked ``genuine`` are controls: the output really depends on a
NaN/Inf (or on an infinite derivative) and the expected gradient keeps it.

Run them against any gradient function with ``check.py``.

Round 3: training-code patterns (hand-written attention, losses, RL, density models, GNN pooling, ragged
batches). ``expected`` is always torch.autograd.grad of the program with the unused values deleted, in float64.
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
from _format import ref as _ref  # noqa: E402

CASES, case = contamination_table()


f64 = torch.float64
D = torch.distributions




def _params(seed, *shapes, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(*s, generator=g, dtype=dtype) * 0.5).requires_grad_(True) for s in shapes)


def _data(seed, *shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# ================================ hand-written attention ===================================================

def _attn(x, wq, wk, wv, kpm):
    """Hand-written single-head attention: q @ k.T / sqrt(d), masked_fill(-inf), softmax, dropout(eval), @ v.

    The value vectors of padding keys are zeroed (their weight is 0, but 0 * NaN would reach the kept rows)."""
    q, k = x @ wq, x @ wk
    v = (x @ wv).masked_fill(kpm[..., None], 0.0)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(kpm[:, None, :], -inf)
    a = F.dropout(torch.softmax(s, -1), p=0.1, training=False)
    return a @ v


@case("hand-attn-nan-pad-token-outputs-selected", "pytorch/pytorch#41508 (wgale: NaN in pruned positions; "
      "0*NaN in the slicing backward), hand-written attention as in jadore801120/attention-is-all-you-need-pytorch#16")
def _():
    wq, wk, wv = _params(1, (4, 4), (4, 4), (4, 4))
    x = _data(2, 2, 4, 4)
    x[1, 3] = nan  # padding token of sequence 1 holds garbage
    kpm = torch.tensor([[False] * 4, [False, False, False, True]])
    y = _attn(x, wq, wk, wv, kpm)
    out = y[~kpm].pow(2).sum()

    def ref(a, b, c):
        return (_attn(x[:1].double(), a, b, c, kpm[:1]).pow(2).sum()
                + _attn(x[1:, :3].double(), a, b, c, kpm[1:, :3]).pow(2).sum())

    return out, (wq, wk, wv), _ref(ref, wq, wk, wv)


@case("hand-attn-inf-pad-token-where-mean-pool-f64", "pytorch/pytorch#26098 (key_padding_mask NaN), masked mean "
      "pooling with torch.where (dmlc/dgl#2657)")
def _():
    wq, wk, wv = _params(3, (3, 3), (3, 3), (3, 3), dtype=f64)
    x = _data(4, 2, 4, 3, dtype=f64)
    x[0, 2:] = inf  # overflowed padding features
    lens = torch.tensor([2, 4])
    kpm = torch.arange(4) >= lens[:, None]

    def prog(x, wq, wk, wv, kpm, lens):
        q, k, v = x @ wq, x @ wk, torch.where(kpm[..., None], 0.0, x @ wv)
        s = torch.where(kpm[:, None, :], -inf, q @ k.transpose(-1, -2) / math.sqrt(3))
        y = torch.softmax(s, -1) @ v
        pooled = torch.where(kpm[..., None], 0.0, y).sum(1) / lens[:, None]
        return pooled.tanh().sum()

    out = prog(x, wq, wk, wv, kpm, lens)

    def ref(a, b, c):
        return (prog(x[:1, :2], a, b, c, kpm[:1, :2], lens[:1]) + prog(x[1:], a, b, c, kpm[1:], lens[1:]))

    return out, (wq, wk, wv), _ref(ref, wq, wk, wv)


@case("hand-attn-causal-left-padding-fully-masked-rows", "lucidrains/nGPT-pytorch#11 (row fully masked, loss masked "
      "for the same row, still NaN grads), dmlc/dgl#2657")
def _():
    wq, wk, wv = _params(5, (4, 4), (4, 4), (4, 4))
    x = _data(6, 1, 5, 4)
    pad = torch.tensor([[True, True, False, False, False]])  # left padding
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    q, k, v = x @ wq, x @ wk, x @ wv
    s = (q @ k.transpose(-1, -2) / 2.0).masked_fill(causal | pad[:, None, :], -inf)
    y = torch.softmax(s, -1) @ v  # query rows 0 and 1 see no key: NaN
    out = y[~pad].sum()

    def ref(a, b, c):
        xr = x[:, 2:].double()
        sr = ((xr @ a) @ (xr @ b).transpose(-1, -2) / 2.0).masked_fill(causal[2:, 2:], -inf)
        return (torch.softmax(sr, -1) @ (xr @ c)).sum()

    return out, (wq, wk, wv), _ref(ref, wq, wk, wv)


@case("hand-attn-nan-values-masked-fill-before-av", "pytorch/pytorch PR #42323 (mask NaNs before the matmul); "
      "value vectors of padding tokens zeroed with masked_fill")
def _():
    wq, wk, wv = _params(7, (4, 4), (4, 4), (4, 4))
    x = _data(8, 1, 4, 4)
    x[0, 3] = nan
    pad = torch.tensor([[False, False, False, True]])
    q, k = x[:, :3] @ wq, x @ wk
    v = (x @ wv).masked_fill(pad[..., None], 0.0)
    k = k.masked_fill(pad[..., None], 0.0)
    s = (q @ k.transpose(-1, -2) / 2.0).masked_fill(pad[:, None, :], -inf)
    out = (torch.softmax(s, -1) @ v).pow(2).sum()

    def ref(a, b, c):
        xr = x[:, :3].double()
        sr = (xr @ a) @ (xr @ b).transpose(-1, -2) / 2.0
        return (torch.softmax(sr, -1) @ (xr @ c)).pow(2).sum()

    return out, (wq, wk, wv), _ref(ref, wq, wk, wv)


@case("einsum-attn-nan-batch-element-boolean-dropped", "pytorch/pytorch#15131-style: a NaN sample dropped by "
      "boolean indexing after einsum attention (dmlc/dgl#2657 uses einsum)")
def _():
    wq, wk = _params(9, (3, 3), (3, 3))
    x = _data(10, 3, 4, 3)
    x[1] = nan
    keep = ~torch.isnan(x).flatten(1).any(1)

    def prog(x, a, b):
        e = torch.einsum("bqd,bkd->bqk", x @ a, x @ b) / math.sqrt(3)
        return torch.bmm(torch.softmax(e, -1), x)

    out = prog(x, wq, wk)[keep].sum()
    return out, (wq, wk), _ref(lambda a, b: prog(x[keep].double(), a, b).sum(), wq, wk)


# ================================ classification losses ====================================================

@case("hand-label-smoothing-nll-ignore-index-nan-rows", "pytorch/pytorch#7455 (vigi30's LabelSmoothingCrossEntropy "
      "with ignore_index), pytorch/pytorch#73205 (ignored samples in label smoothing)")
def _():
    (w,) = _params(11, (4, 5))
    h = _data(12, 6, 4)
    target = torch.tensor([1, 4, -100, 0, -100, 2])
    h[target == -100] = nan  # padded tokens
    keep = target != -100

    def prog(h, w, target, keep, eps=0.1):
        lp = F.log_softmax(h @ w, -1)
        nll = F.nll_loss(lp, target, ignore_index=-100, reduction="none")
        smooth = -lp.mean(-1)
        loss = torch.where(keep, (1 - eps) * nll + eps * smooth, 0.0)
        return loss.sum() / keep.sum()

    out = prog(h, w, target, keep)
    return out, (w,), _ref(lambda a: prog(h[keep].double(), a, target[keep], keep[keep]), w)


@case("focal-loss-gather-ignore-nan-rows", "focal loss (Lin et al.) written with gather; padded rows ignored; "
      "pytorch/pytorch#121416-style reduction none then mask")
def _():
    (w,) = _params(13, (3, 4))
    h = _data(14, 5, 3)
    target = torch.tensor([0, 3, -1, 2, -1])
    h[target == -1] = nan
    keep = target >= 0

    def prog(h, w, target, keep):
        p = torch.softmax(h @ w, -1)
        pt = p.gather(1, target.clamp(min=0)[:, None]).squeeze(1)
        fl = -(1 - pt).pow(2.0) * pt.log()
        return fl[keep].mean()

    out = prog(h, w, target, keep)
    return out, (w,), _ref(lambda a: prog(h[keep].double(), a, target[keep], keep[keep]), w)


@case("binary-focal-gamma-half-saturated-pad", "torchvision sigmoid_focal_loss with gamma < 1: (1-p_t)**gamma "
      "has an infinite derivative at p_t = 1 (a saturated padded position)")
def _():
    (w,) = _params(15, (3,))
    h = _data(16, 4, 3)
    h[3] = torch.tensor([40.0, 40.0, 40.0])  # padded position: logit >> 0, p_t == 1 exactly in float32
    w.data.copy_(torch.tensor([1.0, 1.0, 1.0]))
    tgt = torch.tensor([1.0, 0.0, 1.0, 1.0])
    keep = torch.tensor([True, True, True, False])

    def prog(h, w, tgt):
        logits = h @ w
        p = torch.sigmoid(logits)
        ce = F.binary_cross_entropy_with_logits(logits, tgt, reduction="none")
        pt = p * tgt + (1 - p) * (1 - tgt)
        return ce * (1 - pt) ** 0.5

    out = prog(h, w, tgt)[keep].sum()
    return out, (w,), _ref(lambda a: prog(h[keep].double(), a, tgt[keep].double()).sum(), w)


@case("dice-loss-empty-class-dropped", "nasa/delta#115 (dice denominator 0 gives NaN), ShannonAI/dice_loss_for_NLP#24; "
      "classes absent from the batch are skipped")
def _():
    (w,) = _params(17, (2, 3))
    x = _data(18, 6, 2)
    tgt = torch.tensor([0, 0, 1, 1, 0, 1])
    ignore = torch.tensor([False, False, False, False, True, True])  # ignore region

    def prog(x, w, tgt, ignore):
        p = torch.softmax(x @ w, -1)
        p = torch.where(ignore[:, None], 0.0, p)
        oh = F.one_hot(tgt, 3).to(p.dtype)
        oh = torch.where(ignore[:, None], 0.0, oh)
        # class 2: no target pixel; predicted mass thresholded away -> union 0
        p = torch.cat([p[:, :2], torch.where(p[:, 2:] > 0.9, p[:, 2:], 0.0)], 1)
        inter = (p * oh).sum(0)
        union = p.sum(0) + oh.sum(0)
        dice = 2 * inter / union
        return dice, oh.sum(0) > 0

    dice, present = prog(x, w, tgt, ignore)
    out = (1 - dice[present]).mean()

    def ref(a):
        _d, _pr = prog(x.double(), a, tgt, ignore)
        p = torch.softmax(x.double() @ a, -1)[~ignore]
        oh = F.one_hot(tgt[~ignore], 3).double()[:, :2]
        p = p[:, :2]
        return (1 - 2 * (p * oh).sum(0) / (p.sum(0) + oh.sum(0))).mean()

    return out, (w,), _ref(ref, w)


@case("kl-div-distillation-nan-padded-tokens", "knowledge distillation with F.kl_div(reduction='none') on padded "
      "tokens, then boolean mask (pytorch/pytorch#121416 pattern)")
def _():
    (w,) = _params(19, (3, 4))
    h = _data(20, 5, 3)
    h[[1, 4]] = nan
    keep = torch.tensor([True, False, True, True, False])
    teacher = torch.softmax(_data(21, 5, 4), -1)
    teacher[1] = torch.tensor([1.0, 0.0, 0.0, 0.0])

    def prog(h, w, t):
        return F.kl_div(F.log_softmax(h @ w, -1), t, reduction="none").sum(-1)

    out = prog(h, w, teacher)[keep].mean()
    return out, (w,), _ref(lambda a: prog(h[keep].double(), a, teacher[keep].double()).mean(), w)


@case("triplet-margin-nan-padded-embeddings-masked", "metric learning with padded (NaN) embeddings; "
      "F.triplet_margin_loss(reduction='none') then mask (pytorch/pytorch#37154 context: similarity reference)")
def _():
    (w,) = _params(22, (3, 3))
    a, p, n = _data(23, 4, 3), _data(24, 4, 3), _data(25, 4, 3)
    a[2] = nan
    n[3, :] = a[3]  # a degenerate triplet: negative == anchor
    keep = torch.tensor([True, True, False, False])

    def prog(a, p, n, w):
        return F.triplet_margin_loss(a @ w, p @ w, n @ w, margin=1.0, reduction="none")

    out = prog(a, p, n, w)[keep].sum()
    return out, (w,), _ref(lambda r: prog(a[keep].double(), p[keep].double(), n[keep].double(), r).sum(), w)


# ================================ contrastive losses =======================================================

@case("infonce-zero-embedding-diag-minus-inf-logsumexp", "SimCLR NT-Xent with a manual normalise (x / ||x||, "
      "pytorch/pytorch#2421) and masked diagonal -inf; the failed (all-zero) sample is masked out")
def _():
    (w,) = _params(26, (3, 3))
    x = _data(27, 4, 3)
    x[2] = 0.0  # failed augmentation: all-zero features, z = 0/0

    valid = torch.tensor([True, True, False, True])
    pos = torch.tensor([1, 0, 2, 0])  # positive index per anchor

    def prog(x, w, valid, pos):
        z = x @ w
        z = z / z.norm(dim=1, keepdim=True)
        sim = (z @ z.T) / 0.5
        n = sim.shape[0]
        sim = sim.masked_fill(torch.eye(n, dtype=torch.bool) | ~valid[None, :], -inf)
        lse = torch.logsumexp(sim, 1)
        loss = lse - sim.gather(1, pos[:, None]).squeeze(1)
        return loss[valid].mean()

    out = prog(x, w, valid, pos)
    keep = torch.tensor([0, 1, 3])
    return out, (w,), _ref(lambda a: prog(x[keep].double(), a, valid[keep], torch.tensor([1, 0, 0])), w)


@case("supcon-anchor-without-positives-dropped", "HobbitLong/SupContrast (mask.sum(1) == 0 gives NaN mean_log_prob_pos;"
      " anchors without positives dropped)")
def _():
    (w,) = _params(28, (3, 3))
    x = _data(29, 5, 3)
    labels = torch.tensor([0, 1, 0, 1, 2])  # label 2 has a single sample: no positives

    def prog(x, w, labels):
        z = F.normalize(x @ w, dim=1)
        logits = z @ z.T / 0.3
        logits = logits - logits.max(1, keepdim=True).values.detach()
        n = logits.shape[0]
        not_self = ~torch.eye(n, dtype=torch.bool)
        mask = (labels[:, None] == labels[None, :]) & not_self
        exp_logits = torch.exp(logits) * not_self
        log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
        mlpp = (mask * log_prob).sum(1) / mask.sum(1)
        return -mlpp, mask.sum(1) > 0

    per_sample, has_pos = prog(x, w, labels)
    out = per_sample[has_pos].mean()

    def ref(a):
        _lr, hp = prog(x.double(), a, labels)
        z = F.normalize(x.double() @ a, dim=1)
        logits = z @ z.T / 0.3
        logits = logits - logits.max(1, keepdim=True).values.detach()
        not_self = ~torch.eye(5, dtype=torch.bool)
        mask = (labels[:, None] == labels[None, :]) & not_self
        log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
        rows = hp.nonzero().squeeze(1)
        return (-((mask[rows] * log_prob[rows]).sum(1) / mask[rows].sum(1))).mean()

    return out, (w,), _ref(ref, w)


# ================================ sampling / decoding ======================================================

@case("gumbel-softmax-learned-temperature-masked-categories", "pytorch/pytorch#22442 / #22586 (gumbel_softmax NaN); "
      "invalid categories masked with -inf and a learned temperature")
def _():
    (w,) = _params(30, (3, 4))
    tau = torch.tensor(0.7, requires_grad=True)
    h = _data(31, 2, 3)
    invalid = torch.tensor([[False, False, True, False], [True, False, False, False]])
    u = torch.rand(2, 4, generator=torch.Generator().manual_seed(32)).clamp(1e-6, 1 - 1e-6)
    g = -torch.log(-torch.log(u))
    vals = torch.tensor([0.3, -1.0, 2.0, 0.5])

    def prog(h, w, tau, invalid, g, vals):
        logits = (h @ w).masked_fill(invalid, -inf)
        y = torch.softmax((logits + g) / tau, -1)
        return (y * vals).sum()

    out = prog(h, w, tau, invalid, g, vals)

    def ref(a, t):
        tot = 0
        for i in range(2):
            k = ~invalid[i]
            tot = tot + (torch.softmax(((h[i].double() @ a)[k] + g[i, k]) / t, -1) * vals[k]).sum()
        return tot

    return out, (w, tau), _ref(ref, w, tau)


@case("reserved-vocab-nan-columns-masked-topk-ce", "HF generation top-k filtering (masked_fill(-inf)) with reserved "
      "vocabulary rows left uninitialised (NaN); pytorch/pytorch#23156-style")
def _():
    (h,) = _params(33, (3, 4))
    W = _data(34, 4, 6)
    W[:, 4:] = nan  # reserved, never-trained vocabulary slots
    reserved = torch.tensor([False] * 4 + [True] * 2)
    target = torch.tensor([1, 2, 0])  # targets inside the top-k

    def prog(h, W, reserved, k=2):
        logits = (h @ W).masked_fill(reserved, -inf)
        kth = logits.topk(k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -inf)
        return F.cross_entropy(logits, target)

    out = prog(h, W, reserved)
    (g,) = _ref(lambda a: prog(a, W[:, :4].double(), reserved[:4]), h)
    return out, (h,), (g,)


@case("moe-top1-routing-nan-expert-never-selected", "mixture-of-experts top-k routing (gather of the selected "
      "experts); an uninitialised expert never routed to")
def _():
    (x,) = _params(35, (3, 4))
    experts = _data(36, 3, 4, 4)
    experts[2] = nan
    route = torch.tensor([0, 1, 0])

    def prog(x, E, route):
        allout = torch.einsum("nd,edk->nek", x, E)
        sel = allout.gather(1, route[:, None, None].expand(-1, 1, allout.shape[-1])).squeeze(1)
        return sel.tanh().sum()

    out = prog(x, experts, route)
    return out, (x,), _ref(lambda a: prog(a, experts[:2].double(), route), x)


# ================================ reinforcement learning ===================================================

@case("policy-entropy-special-entr-masked-actions", "Stable-Baselines-Team/stable-baselines3-contrib#302 (MaskablePPO "
      "NaN with -inf logits; entropy over valid actions only), hill-a/stable-baselines#505")
def _():
    (w,) = _params(37, (3, 4))
    h = _data(38, 2, 3)
    invalid = torch.tensor([[False, True, False, False], [False, False, False, True]])
    act = torch.tensor([2, 0])
    adv = torch.tensor([0.5, -1.2])

    def prog(logits):
        lp = torch.log_softmax(logits, -1)
        p = lp.exp()
        ent = torch.special.entr(p).sum(-1)
        return -(lp.gather(1, act[:, None]).squeeze(1) * adv).sum() - 0.01 * ent.sum()

    out = prog((h @ w).masked_fill(invalid, -inf))

    def ref(a):
        tot = 0
        for i in range(2):
            k = ~invalid[i]
            lp = torch.log_softmax((h[i].double() @ a)[k], -1)
            j = int(k[: act[i]].sum())
            tot = tot - lp[j] * adv[i] - 0.01 * torch.special.entr(lp.exp()).sum()
        return tot

    return out, (w,), _ref(ref, w)


@case("policy-entropy-xlogy-masked-actions", "tensorforce/tensorforce#586 (NaN from -inf masked logits in the "
      "categorical entropy); entropy written with torch.xlogy(p, p)")
def _():
    (w,) = _params(39, (3, 4))
    h = _data(40, 2, 3)
    invalid = torch.tensor([[True, False, False, False], [False, False, True, True]])

    def prog(logits):
        p = torch.softmax(logits, -1)
        return -torch.xlogy(p, p).sum()

    out = prog((h @ w).masked_fill(invalid, -inf))

    def ref(a):
        tot = 0
        for i in range(2):
            k = ~invalid[i]
            p = torch.softmax((h[i].double() @ a)[k], -1)
            tot = tot - torch.xlogy(p, p).sum()
        return tot

    return out, (w,), _ref(ref, w)


@case("policy-logprob-done-steps-nan-obs-where", "RL rollouts: observations after `done` are NaN (terminated env), "
      "log-probs of those steps masked with torch.where before the policy-gradient sum")
def _():
    (w,) = _params(41, (3, 4))
    obs = _data(42, 5, 3)
    obs[3:] = nan
    act = torch.tensor([1, 3, 0, 2, 2])
    notdone = torch.tensor([True, True, True, False, False])
    ret = torch.tensor([1.0, 0.5, -0.3, 2.0, 2.0])

    def prog(obs, w, act, notdone, ret):
        dist = D.Categorical(logits=obs @ w, validate_args=False)
        lp = torch.where(notdone, dist.log_prob(act), 0.0)
        ent = torch.where(notdone, dist.entropy(), 0.0)
        return -(lp * ret).sum() - 0.01 * ent.sum()

    out = prog(obs, w, act, notdone, ret)
    k = notdone
    return out, (w,), _ref(lambda a: prog(obs[k].double(), a, act[k], k[k], ret[k].double()), w)


# ================================ density models ===========================================================

@case("mdn-dead-component-zero-sigma-where-logsumexp", "keras-team/keras#1061 (MDN loss inf then nan), "
      "tonyduan/mixture-density-network#1 (logsumexp of log pi + log N); sigma = elu(.) + 1 hits 0 in a pruned component")
def _():
    (wm, ws) = _params(43, (2, 3), (2, 3))
    x = _data(44, 4, 2)
    y = _data(45, 4, 1)
    bias = torch.tensor([0.0, 0.0, -1000.0])  # component 2 is dead: elu(-1000) + 1 == 0
    active = torch.tensor([True, True, False])
    logpi = torch.log_softmax(torch.tensor([0.2, 0.5, -1.0]), 0)

    def prog(x, wm, ws, bias, active, logpi):
        mu = x @ wm
        sigma = F.elu(x @ ws + bias) + 1
        ll = D.Normal(mu, sigma, validate_args=False).log_prob(y)
        comp = torch.where(active, logpi + ll, -inf)
        return -torch.logsumexp(comp, 1).mean()

    out = prog(x, wm, ws, bias, active, logpi)
    k = active
    logpi_r = torch.log_softmax(torch.tensor([0.2, 0.5, -1.0], dtype=f64), 0)[k]
    g = _ref(lambda a, b: prog(x.double(), a, b, bias[k].double(), active[k], logpi_r), wm[:, :2], ws[:, :2])
    exp = tuple(torch.cat([gi, torch.zeros(2, 1, dtype=f64)], 1) for gi in g)
    return out, (wm, ws), exp


@case("vae-kl-logvar-overflow-pruned-latents", "VAE KL = -0.5 * sum(1 + logvar - mu^2 - exp(logvar)); exp(logvar) "
      "overflows in latent dimensions pruned by a mask (free-bits / active-units)")
def _():
    (wm, wv) = _params(46, (3, 4), (3, 4))
    h = _data(47, 2, 3)
    shift = torch.tensor([0.0, 0.0, 0.0, 200.0])  # dim 3 collapsed: logvar ~ 200, exp overflows float32
    active = torch.tensor([True, True, True, False])

    def prog(h, wm, wv, shift, active):
        mu, logvar = h @ wm, h @ wv + shift
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
        return torch.where(active, kl, 0.0).sum(1).mean()

    out = prog(h, wm, wv, shift, active)
    g = _ref(lambda a, b: prog(h.double(), a, b, shift[:3].double(), active[:3]), wm[:, :3], wv[:, :3])
    exp = tuple(torch.cat([gi, torch.zeros(3, 1, dtype=f64)], 1) for gi in g)
    return out, (wm, wv), exp


@case("planar-flow-logdet-nan-sample-boolean-dropped", "normalising flow (planar) NLL = -(log N(z) + log|det J|) with a "
      "corrupt (NaN) sample dropped by boolean indexing; pytorch/pytorch#15131-style")
def _():
    (u, wf, b) = _params(48, (3,), (3,), (1,), dtype=f64)
    x = _data(49, 4, 3, dtype=f64)
    x[1] = nan
    keep = ~torch.isnan(x).any(1)

    def prog(x, u, wf, b):
        a = x @ wf + b
        z = x + u * torch.tanh(a)[:, None]
        psi = (1 - torch.tanh(a) ** 2)[:, None] * wf
        logdet = torch.log(torch.abs(1 + psi @ u))
        return D.Normal(0.0, 1.0, validate_args=False).log_prob(z).sum(1) + logdet

    out = -prog(x, u, wf, b)[keep].mean()
    return out, (u, wf, b), _ref(lambda a, c, d: -prog(x[keep], a, c, d).mean(), u, wf, b)


@case("gaussian-nll-zero-var-padded-rows", "F.gaussian_nll_loss(reduction='none') with variance 0 and NaN targets in "
      "padded rows, then boolean mask")
def _():
    (w,) = _params(50, (3, 2))
    h = _data(51, 5, 3)
    tgt = _data(52, 5, 2)
    var = torch.rand(5, 2, generator=torch.Generator().manual_seed(53)) + 0.1
    pad = torch.tensor([False, False, True, False, True])
    tgt[pad] = nan
    var[pad] = 0.0

    def prog(h, w, tgt, var):
        return F.gaussian_nll_loss(h @ w, tgt, var, reduction="none", eps=0.0)

    out = prog(h, w, tgt, var)[~pad].sum()
    k = ~pad
    return out, (w,), _ref(lambda a: prog(h[k].double(), a, tgt[k].double(), var[k].double()).sum(), w)


# ================================ gradient penalty =========================================================

@case("r1-penalty-dead-relu-zero-grad-norm-fake-rows", "WGAN-GP (grad.norm(2, dim=1) - 1)^2: a sample whose "
      "critic gradient is exactly 0 (dead relu) gives norm'(0) = 0/0; only the real rows enter the penalty")
def _():
    torch.manual_seed(0)
    w1 = torch.tensor([[1.0, -1.0, 0.5], [0.3, 0.8, -0.2]], dtype=f64, requires_grad=True)
    w2 = torch.tensor([[1.0], [-0.5], [0.7]], dtype=f64, requires_grad=True)
    x = torch.tensor([[1.0, 0.5], [0.2, 1.0], [-5.0, -5.0]], dtype=f64)  # row 2: every hidden unit is dead
    is_real = torch.tensor([True, True, False])

    def pen(xs, a, b, rows):
        xs = xs.clone().requires_grad_(True)
        d = (torch.relu(xs @ a) @ b).sum()
        (g,) = torch.autograd.grad(d, xs, create_graph=True)
        return (g.norm(2, dim=1) - 1).pow(2), rows

    p, rows = pen(x, w1, w2, is_real)
    out = p[rows].sum()
    exp = _ref(lambda a, b: pen(x[is_real], a, b, None)[0].sum(), w1, w2)
    return out, (w1, w2), exp


# ================================ recurrent nets on ragged batches =========================================

@case("pad-sequence-gru-f64-last-valid-step-gather", "torch.nn.utils.rnn.pad_sequence(padding_value=nan) + nn.GRU "
      "(float64); last valid step taken with gather (pytorch/pytorch#41508-style)")
def _():
    torch.manual_seed(54)
    gru = torch.nn.GRU(2, 3, batch_first=True).double()
    seqs = [torch.randn(4, 2, dtype=f64), torch.randn(2, 2, dtype=f64), torch.randn(3, 2, dtype=f64)]
    x = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=nan)
    lens = torch.tensor([4, 2, 3])
    y, _ = gru(x)
    last = y.gather(1, (lens - 1)[:, None, None].expand(-1, 1, 3)).squeeze(1)
    out = last.pow(2).sum()
    names = ["weight_ih_l0", "weight_hh_l0", "bias_hh_l0"]
    params = tuple(dict(gru.named_parameters())[n] for n in names)

    def ref(a, b, c):
        tot = 0
        for s in seqs:
            yy, _ = torch._VF.gru(s[None], torch.zeros(1, 1, 3, dtype=f64),
                                   (a, b, gru.bias_ih_l0.detach(), c), True, 1, 0.0, False, False, True)
            tot = tot + yy[0, -1].pow(2).sum()
        return tot

    return out, params, _ref(ref, *params)


@case("packed-bilstm-f64-nan-padding", "pack_padded_sequence(enforce_sorted=False) over NaN padding with a "
      "bidirectional nn.LSTM (float64); the padding is never read")
def _():
    torch.manual_seed(55)
    lstm = torch.nn.LSTM(2, 2, batch_first=True, bidirectional=True).double()
    x = torch.randn(2, 3, 2, dtype=f64)
    x[0, 2:] = nan
    lens = torch.tensor([2, 3])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lens, batch_first=True, enforce_sorted=False)
    _, (hn, _) = lstm(packed)
    out = hn.pow(2).sum()
    p = lstm.weight_ih_l0_reverse

    def ref(a):
        tot = 0
        for i, L in enumerate(lens.tolist()):
            m = torch.nn.LSTM(2, 2, batch_first=True, bidirectional=True).double()
            m.load_state_dict(lstm.state_dict())
            del m.weight_ih_l0_reverse
            m.weight_ih_l0_reverse = a
            _, (h, _) = m(x[i:i + 1, :L])
            tot = tot + h.pow(2).sum()
        return tot

    return out, (p,), _ref(ref, p)


# ================================ ragged batches, masked means =============================================

@case("masked-mean-empty-row-discarded", "sum(x * mask) / mask.sum() with an all-padding row (count 0, 0/0); only "
      "rows with a token are used (huggingface mean-pooling pattern)")
def _():
    (x,) = _params(56, (3, 4))
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)

    def prog(x, mask):
        s = (x * mask).sum(1)
        cnt = mask.sum(1)
        return s / cnt, cnt > 0

    m, nonempty = prog(x, mask)
    out = m[nonempty].pow(2).sum()
    k = torch.tensor([0, 2])

    def ref(a):
        torch.zeros(3, 4, dtype=f64)
        return prog(a, mask[k])[0].pow(2).sum()

    (g,) = _ref(ref, x[k])
    exp = torch.zeros(3, 4, dtype=f64).index_copy(0, k, g)
    return out, (x,), (exp,)


@case("masked-std-single-token-row-where", "masked variance with unbiased (n-1) normalisation: a row with one "
      "token gives 0/0; rows with n < 2 discarded with torch.where")
def _():
    (x,) = _params(57, (3, 4))
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)

    def prog(x, mask):
        n = mask.sum(1, keepdim=True)
        mu = torch.where(mask, x, 0.0).sum(1, keepdim=True) / n
        var = torch.where(mask, (x - mu) ** 2, 0.0).sum(1, keepdim=True) / (n - 1)
        return var.sqrt().squeeze(1), n.squeeze(1) > 1

    sd, ok = prog(x, mask)
    out = torch.where(ok, sd, 0.0).sum()
    k = torch.tensor([0, 2])
    (g,) = _ref(lambda a: prog(a, mask[k])[0].sum(), x[k])
    return out, (x,), (torch.zeros(3, 4, dtype=f64).index_copy(0, k, g),)


@case("log-survival-cumprod-zero-masked", "discrete-time survival / ACT halting: S_t = cumprod(1 - h); log S_t = "
      "-inf after a certain event, steps after the event are masked with torch.where")
def _():
    (z,) = _params(58, (2, 5))
    hz = torch.tensor([[0.0, 0.0, 50.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])

    def prog(z, hz, valid):
        h = torch.sigmoid(z + hz).masked_fill(hz > 0, 1.0)  # certain event: hazard exactly 1
        S = torch.cumprod(1 - h, 1)
        return torch.where(valid, S.log(), 0.0).sum()

    valid = torch.tensor([[True, True, False, False, False], [True] * 5])
    out = prog(z, hz, valid)

    def ref(a):
        r0 = torch.cumprod(1 - torch.sigmoid(a[0, :2]), 0).log().sum()
        r1 = torch.cumprod(1 - torch.sigmoid(a[1]), 0).log().sum()
        return r0 + r1

    return out, (z,), _ref(ref, z)


@case("cumprod-stick-breaking-zero-then-nan-prefix-kept", "stick-breaking weights w_k = v_k * prod_{j<k}(1 - v_j) "
      "with a v_j = 1 (zero remaining stick) and NaN after the truncation level")
def _():
    v = torch.tensor([0.3, 1.0, 0.5, 0.2, nan, nan], requires_grad=True)
    T = 4

    def prog(v, T):
        rest = torch.cumprod(torch.cat([torch.ones(1, dtype=v.dtype), 1 - v[:-1]]), 0)
        w = v * rest
        return (w[:T] * torch.arange(1.0, T + 1, dtype=v.dtype)).sum()

    out = prog(v, T)
    (g,) = _ref(lambda a: prog(torch.cat([a, torch.zeros(1, dtype=a.dtype)]), T), v[:4])
    return out, (v,), (torch.cat([g, torch.zeros(2, dtype=f64)]),)


# ================================ point sets / distances ===================================================

@case("chamfer-cdist-nan-padded-points", "chamfer distance with torch.cdist on padded point clouds (NaN padding); "
      "pytorch/pytorch#37154 (cdist nan grads)")
def _():
    (a,) = _params(59, (4, 2))
    b = _data(60, 5, 2)
    b[4] = nan
    va = torch.tensor([True, True, True, False])
    vb = torch.tensor([True, True, True, True, False])

    def prog(a, b, va, vb):
        d = torch.cdist(a[None], b[None])[0]
        d = torch.where(vb[None, :], d, inf)
        return d.min(1).values[va].sum()

    a_ = a.detach().clone()
    with torch.no_grad():
        a.data[3] = nan
    out = prog(a, b, va, vb)
    (g,) = _ref(lambda r: prog(r, b[vb].double(), va[:3], vb[vb]), a_[:3])
    return out, (a,), (torch.cat([g, torch.zeros(1, 2, dtype=f64)]),)


@case("pairwise-sqrt-duplicate-padding-points-masked", "hand-written pairwise distance sqrt(sum(diff^2)) on point "
      "sets padded by repeating the last point (distance exactly 0: sqrt'(0) = inf), padded pairs masked")
def _():
    (p,) = _params(61, (5, 2))
    with torch.no_grad():
        p[4] = p[3]
    valid = torch.tensor([True, True, True, True, False])

    def prog(p, valid):
        diff = p[:, None, :] - p[None, :, :]
        d = (diff ** 2).sum(-1).sqrt()
        pair = valid[:, None] & valid[None, :] & ~torch.eye(p.shape[0], dtype=torch.bool)
        return torch.where(pair, torch.exp(-d), 0.0).sum()

    out = prog(p, valid)
    i, j = (~torch.eye(4, dtype=torch.bool)).nonzero().T  # the used pairs only (no diagonal, no padding)
    (g,) = _ref(lambda r: torch.exp(-((r[i] - r[j]) ** 2).sum(-1).sqrt()).sum(), p[:4])
    return out, (p,), (torch.cat([g, torch.zeros(1, 2, dtype=f64)]),)


@case("cosine-similarity-nan-padded-rows-masked", "F.cosine_similarity on padded (NaN) rows, then mask; "
      "sentence-embedding training with ragged batches")
def _():
    (w,) = _params(62, (3, 3))
    a, b = _data(63, 4, 3), _data(64, 4, 3)
    a[3] = nan
    b[2] = 0.0  # empty sentence embedding (cos of zero vector is clamped by eps)
    keep = torch.tensor([True, True, False, False])

    def prog(a, b, w):
        return 1 - F.cosine_similarity(a @ w, b @ w, dim=1)

    out = prog(a, b, w)[keep].sum()
    return out, (w,), _ref(lambda r: prog(a[keep].double(), b[keep].double(), r).sum(), w)


# ================================ GNN scatter pooling ======================================================

@case("gnn-index-add-mean-empty-segment-where", "pyg-team/pytorch_geometric#331 (empty clusters in pooling); mean "
      "aggregation as index_add / bincount, isolated nodes get 0 via torch.where")
def _():
    (w, w2) = _params(65, (3, 2), (2, 2))
    xsrc = _data(66, 4, 3)
    src = torch.tensor([0, 1, 2, 3, 1])
    dst = torch.tensor([0, 0, 1, 1, 3])  # node 2 receives nothing
    n = 4

    def prog(xsrc, w, src, dst, n):
        msg = (xsrc @ w)[src]
        agg = torch.zeros(n, 2, dtype=msg.dtype).index_add(0, dst, msg)
        cnt = torch.bincount(dst, minlength=n).to(msg.dtype)[:, None]
        mean = agg / cnt
        upd = torch.tanh(mean @ w2)
        return torch.where(cnt > 0, upd, 0.0).sum()

    out = prog(xsrc, w, src, dst, n)
    # without the empty node: relabel 3 -> 2
    relabel = torch.tensor([0, 0, 1, 1, 2])

    def ref(a, b):
        nonlocal w2
        w2_, w2 = w2, b
        try:
            return prog(xsrc.double(), a, src, relabel, 3)
        finally:
            w2 = w2_

    return out, (w, w2), _ref(ref, w, w2)


@case("gnn-scatter-reduce-mean-nan-node-into-dropped-target", "scatter_reduce('mean', include_self=False) GNN "
      "aggregation; the NaN node only sends to a target node that is dropped (pytorch_geometric scatter mean)")
def _():
    (w,) = _params(67, (3, 2))
    x = _data(68, 5, 3)
    x[4] = nan
    src = torch.tensor([0, 1, 2, 3, 4, 0])
    dst = torch.tensor([1, 0, 0, 2, 3, 3])

    def prog(x, w, src, dst, n):
        msg = (x @ w)[src]
        out = torch.zeros(n, 2, dtype=msg.dtype).scatter_reduce(0, dst[:, None].expand(-1, 2), msg, "mean",
                                                               include_self=False)
        return out

    agg = prog(x, w, src, dst, 4)
    out = agg[:3].pow(2).sum()  # node 3 (the only receiver of node 4) is dropped
    return out, (w,), _ref(lambda a: prog(x[:4].double(), a, src[:4], dst[:4], 3).pow(2).sum(), w)


@case("gnn-scatter-reduce-amax-nan-messages-dropped-node", "scatter_reduce('amax') max aggregation with NaN "
      "messages into a discarded node (pytorch/pytorch#7645 NaN in max pooling context)")
def _():
    (w,) = _params(69, (3, 2))
    x = _data(70, 5, 3)
    x[4] = nan
    src = torch.tensor([0, 1, 2, 3, 4, 1])
    dst = torch.tensor([0, 0, 1, 1, 2, 2])

    def prog(x, w, src, dst, n):
        msg = torch.relu(x @ w)[src]
        return torch.full((n, 2), -1e4, dtype=msg.dtype).scatter_reduce(0, dst[:, None].expand(-1, 2), msg, "amax",
                                                                         include_self=False)

    out = prog(x, w, src, dst, 3)[:2].sum()
    return out, (w,), _ref(lambda a: prog(x[:4].double(), a, src[:4], dst[:4], 2).sum(), w)


# ================================ conv nets, boolean-dropped samples =======================================

@case("small-cnn-strided-nan-image-boolean-dropped", "pytorch/pytorch#15131-style: a corrupt (NaN) image in the "
      "batch, dropped by boolean indexing of the logits (conv stride 2, relu, max_pool, adaptive avg pool)")
def _():
    torch.manual_seed(71)
    conv = torch.nn.Conv2d(1, 2, 3, stride=2, padding=1)
    x = torch.randn(3, 1, 6, 6)
    x[1] = nan
    keep = torch.tensor([True, False, True])

    def prog(x, w, b):
        y = F.max_pool2d(torch.relu(F.conv2d(x, w, b, stride=2, padding=1)), 2)
        return F.adaptive_avg_pool2d(y, 1).flatten(1)

    out = prog(x, conv.weight, conv.bias)[keep].pow(2).sum()
    return out, (conv.weight, conv.bias), _ref(lambda a, c: prog(x[keep].double(), a, c).pow(2).sum(),
                                               conv.weight, conv.bias)


@case("hellinger-distillation-masked-vocab", "distillation with the Hellinger distance sqrt(p) on a vocabulary "
      "masked with -inf (banned tokens, HF generation-style masked_fill); sqrt'(0) = inf at the banned tokens")
def _():
    (w,) = _params(72, (3, 5))
    h = _data(73, 2, 3)
    banned = torch.tensor([False, True, False, False, True])
    q = torch.softmax(_data(74, 2, 5).masked_fill(banned, -inf), -1)

    def prog(h, w, q, banned):
        p = torch.softmax((h @ w).masked_fill(banned, -inf), -1)
        return (p.sqrt() - q.sqrt()).pow(2).sum() / 2

    out = prog(h, w, q, banned)
    k = ~banned
    (g,) = _ref(lambda a: prog(h.double(), a, q[:, k].double(), banned[k]), w[:, k])
    exp = torch.zeros(3, 5, dtype=f64)
    exp[:, k] = g
    return out, (w,), (exp,)


# ================================ controls =================================================================

@case("hand-attn-nan-pad-token-not-masked", "control: pytorch/pytorch#41508, the padding token is not masked, its "
      "NaN reaches every output", genuine=True)
def _():
    wq, wk, wv = _params(1, (4, 4), (4, 4), (4, 4))
    x = _data(2, 1, 4, 4)
    x[0, 3] = nan
    kpm = torch.zeros(1, 4, dtype=torch.bool)
    out = _attn(x, wq, wk, wv, kpm)[0, :3].sum()
    return out, (wq, wk, wv), _ref(lambda a, b, c: _attn(x.double(), a, b, c, kpm)[0, :3].sum(), wq, wk, wv)


@case("masked-mean-empty-row-used", "control: the 0/0 mean of an all-padding row is in the loss", genuine=True)
def _():
    (x,) = _params(56, (3, 4))
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)

    def prog(x):
        return ((x * mask).sum(1) / mask.sum(1)).pow(2).sum()

    return prog(x), (x,), _ref(prog, x)


@case("log-survival-after-event-used", "control: log S_t = -inf after a certain event is in the loss", genuine=True)
def _():
    z = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    hz = torch.tensor([0.0, 50.0, 0.0])

    def prog(z):
        h = torch.sigmoid(z + hz).masked_fill(hz > 0, 1.0)
        return torch.cumprod(1 - h, 0).log().sum()

    return prog(z), (z,), _ref(prog, z)


@case("chamfer-cdist-nan-point-used", "control: the NaN padding point is not masked in the chamfer distance",
      genuine=True)
def _():
    (a,) = _params(59, (3, 2))
    b = _data(60, 3, 2)
    b[2] = nan

    def prog(a):
        return torch.cdist(a[None], b.to(a.dtype)[None])[0].min(1).values.sum()

    return prog(a), (a,), _ref(prog, a)


@case("mdn-dead-component-in-logsumexp", "control: the zero-sigma component is not masked, its log-likelihood (NaN) "
      "enters the logsumexp", genuine=True)
def _():
    (ws,) = _params(43, (2, 3))
    x = _data(44, 4, 2)
    y = _data(45, 4, 1)
    bias = torch.tensor([0.0, 0.0, -1000.0])

    def prog(ws):
        sigma = F.elu(x.to(ws.dtype) @ ws + bias.to(ws.dtype)) + 1
        return -torch.logsumexp(D.Normal(torch.zeros_like(sigma), sigma, validate_args=False).log_prob(y.to(ws.dtype)), 1).mean()

    return prog(ws), (ws,), _ref(lambda a: prog(a), ws)
