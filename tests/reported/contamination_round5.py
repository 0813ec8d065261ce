"""Real reproductions of NaN/Inf gradients caused by values the output does not use.

Each case comes from a public bug report (named in `source`) and builds a small program. It returns
``(output, inputs, expected)``: ``output`` is a scalar tensor to differentiate, ``inputs`` the tensors to
differentiate with respect to, and ``expected`` the gradients of the same program with the unused values
deleted, the answer a user expects. Cases marked ``genuine`` are controls: the output really depends on a
NaN/Inf (or on an infinite derivative) and the expected gradient keeps it.

Run them against any gradient function with ``check.py``.

Round 5: log-space recursions (logaddexp over unreachable states), NaN-padded static shapes with nan-reductions,
distributions at the edge of their support behind a mask, spectral losses on silent padding, angular losses
with self-pairs, weight normalisation of a pruned filter, degenerate eigenproblems in a batch. ``expected`` is
always torch.autograd.grad of the program with the unused values deleted, in float64.
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

f64 = torch.float64
TD = torch.distributions


def _data(seed, *shape, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# ================================ log-space recursions ======================================================

_LOG_A = torch.tensor([[0.0, -inf, -inf], [-0.5, -1.0, -inf], [-inf, -inf, -inf]], dtype=f64)


def _hmm_forward(em, op=torch.logaddexp):
    """Forward algorithm over 3 states written with pairwise logaddexp; state 1 is unreachable from state 0 (its
    scores stay -inf) and state 2 has no incoming transition."""
    a = torch.tensor([0.0, -inf, -inf], dtype=em.dtype) + em[0]
    for t in range(1, em.shape[0]):
        nxt = []
        for j in range(3):
            v = a[0] + _LOG_A[0, j].to(em)
            for i in (1, 2):
                v = op(v, a[i] + _LOG_A[i, j].to(em))
            nxt.append(v)
        a = torch.stack(nxt) + em[t]
    return a[0]


@case("hmm-forward-logaddexp-unreachable-states", "pytorch/pytorch#49724 ((-inf (+) -inf) (+) 2 gives NaN "
      "gradients where logsumexp gives 0; log-space semirings in HMM/CRF coursework): a forward algorithm with "
      "pairwise torch.logaddexp whose unreachable states stay -inf")
def _():
    em = _leaf(_data(1, 5, 3) * 0.3)
    return _hmm_forward(em), (em,), _ref(lambda e: e[:, 0].sum(), em)


@case("log2-forward-logaddexp2-unreachable-states", "as pytorch/pytorch#49724 with torch.logaddexp2 (base-2 "
      "log-space scores)")
def _():
    em = _leaf(_data(2, 4, 3) * 0.3)
    return _hmm_forward(em, torch.logaddexp2), (em,), _ref(lambda e: e[:, 0].sum(), em)


@case("ctc-style-alpha-logaddexp-padded-label-positions", "jax-ml/jax#6811 (gradients of logsumexp([-inf, -inf]) "
      "in CTC-like dynamic programs): alpha recursion over an extended label sequence with pairwise logaddexp; "
      "states not yet reachable and two padded label positions stay -inf, the loss reads the real end states. "
      "Reference: the same recursion in probability space (a -inf state is a 0 there) over the real positions")
def _():
    lp = _leaf(torch.log_softmax(_data(3, 5, 4), -1))
    ext = torch.tensor([0, 1, 0, 2, 0, 3, 0])  # blank-interleaved labels; positions 5, 6 are padding
    real = 5

    def alphas(lp):
        em = torch.cat([lp[:, ext[:real]], torch.full((lp.shape[0], 2), -inf, dtype=lp.dtype)], 1)
        a = torch.cat([em[0, :2], torch.full((5,), -inf, dtype=lp.dtype)])
        for t in range(1, lp.shape[0]):
            a = torch.logaddexp(a, torch.cat([torch.full((1,), -inf, dtype=lp.dtype), a[:-1]])) + em[t]
        return a

    def in_probabilities(lp):
        em = lp[:, ext[:real]].exp()
        a = torch.cat([em[0, :2], torch.zeros(real - 2, dtype=lp.dtype)])
        for t in range(1, lp.shape[0]):
            a = (a + torch.cat([torch.zeros(1, dtype=lp.dtype), a[:-1]])) * em[t]
        return torch.log(a[real - 2] + a[real - 1])

    return torch.logaddexp(*alphas(lp)[real - 2:real]), (lp,), _ref(in_probabilities, lp)


# ================================ NaN-padded static shapes ==================================================

@case("nanquantile-log-of-nan-padded-draws", "jax-ml/jax#12952 (PSIS-LOO port: truncations replaced by NaN for "
      "static shapes, then nan-reductions; NaN gradients): torch.nanquantile of log-weights whose padding is NaN")
def _():
    w = torch.rand(2, 6, generator=torch.Generator().manual_seed(4), dtype=f64) + 0.1
    w[0, 4:] = 0.0  # padding weights 0; their log -inf is replaced by NaN
    valid = w > 0
    w = _leaf(w)
    out = torch.nanquantile(w.log().masked_fill(~valid, nan), 0.8, dim=1).sum()
    return out, (w,), _ref(lambda w: torch.quantile(w[0, :4].log(), 0.8) + torch.quantile(w[1].log(), 0.8), w)


# ================================ distributions at the edge of their support =================================

@case("poisson-log-prob-zero-rate-padding-where", "pytorch/pytorch#53485 and PR #61511 (Poisson with zero rates; "
      "xlogy's gradient at 0/0): padded rows of a count model have zero features and a bias-free squared head, "
      "so rate 0 and count 0; masked with torch.where")
def _():
    feats = _data(5, 6, 3)
    feats[4:] = 0.0
    counts = torch.tensor([2.0, 0.0, 1.0, 3.0, 0.0, 0.0], dtype=f64)
    real = torch.tensor([True, True, True, True, False, False])
    w = _leaf(_data(6, 3))

    def lp(w, f, c):
        return TD.Poisson((f @ w) ** 2, validate_args=False).log_prob(c)

    out = -torch.where(real, lp(w, feats, counts), 0.0).sum()
    return out, (w,), _ref(lambda w: -lp(w, feats[real], counts[real]).sum(), w)


@case("sac-tanh-normal-saturated-padding-actions", "philtabor/Actor-Critic-Methods-Paper-To-Code#7, "
      "cpnota/autonomous-learning-library#139 (SAC tanh-squashed log-probs NaN): TransformedDistribution(Normal, "
      "TanhTransform) log_prob of replayed actions; padded transitions hold action 1.0 (atanh = inf), masked")
def _():
    mu, log_std = _leaf(_data(7, 5) * 0.5), _leaf(_data(8, 5) * 0.1)
    act = torch.tensor([0.3, 1.0, -0.5, -1.0, 0.9], dtype=f64)
    done = torch.tensor([False, True, False, True, False])

    def lp(mu, ls, a):
        d = TD.TransformedDistribution(TD.Normal(mu, ls.exp()), [TD.TanhTransform()], validate_args=False)
        return d.log_prob(a)

    out = -torch.where(done, 0.0, lp(mu, log_std, act)).sum()
    return out, (mu, log_std), _ref(lambda m, s: -lp(m[~done], s[~done], act[~done]).sum(), mu, log_std)


# ================================ spectral losses on silent padding =========================================

_WIN = torch.hann_window(16, dtype=f64)


def _spec(sig):
    return torch.stft(sig, 16, hop_length=8, window=_WIN, return_complex=True, center=False)


@case("stft-magnitude-power-half-silent-padding-cropped", "speechbrain/speechbrain#181 (spectral magnitude with "
      "power=0.5 gives NaN: sqrt at 0) and pytorch/audio#993: a zero-padded utterance, its silent frames cropped "
      "before an L1 spectral loss")
def _():
    sig = _data(9, 2, 64)
    sig[1, 32:] = 0.0
    sig = _leaf(sig)
    tgt = _data(10, 2, 9, 7).abs()

    def mag(s):
        return torch.view_as_real(_spec(s)).pow(2).sum(-1).pow(0.5)

    out = F.l1_loss(mag(sig)[0], tgt[0], reduction="sum") + F.l1_loss(mag(sig)[1, :, :3], tgt[1, :, :3],
                                                                        reduction="sum")

    def ref(s):
        return (F.l1_loss(mag(s[:1])[0], tgt[0], reduction="sum")
                + F.l1_loss(mag(s[1:, :32])[0], tgt[1, :, :3], reduction="sum"))

    return out, (sig,), _ref(ref, sig)


@case("stft-log-magnitude-silent-padding-masked-fill", "csteinmetz1/auraloss#63 (STFTMagnitudeLoss log without "
      "eps: NaN gradient) on a zero-padded batch: log |STFT| of silent frames is -inf, masked_fill(0) by a frame mask")
def _():
    sig = _data(11, 2, 64)
    sig[0, 40:] = 0.0
    sig = _leaf(sig)
    keep = torch.ones(2, 9, 7, dtype=torch.bool)
    keep[0, :, 4:] = False  # frames 4.. of utterance 0 start at sample 32 and reach into the silence from 5 on
    out = torch.log(_spec(sig).abs()).masked_fill(~keep, 0.0).sum()

    def ref(s):
        return torch.log(_spec(s[:1, :40]).abs()).sum() + torch.log(_spec(s[1:]).abs()).sum()

    return out, (sig,), _ref(ref, sig)


# ================================ angular losses, weight norm, eigenproblems ================================

def _angles(e):
    u = F.normalize(e, dim=1)
    return torch.acos((u @ u.T).clamp(-1.0, 1.0))


@case("angular-distance-acos-self-pairs-masked", "msxiaojin/MDLCC#4 (arccos angular loss: infinite derivative at "
      "cos = 1): a pairwise angle matrix whose diagonal (self-pairs, cos = 1 up to rounding) is masked out")
def _():
    e = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8], [0.8, 0.0, 0.6]], dtype=f64)
    e = _leaf(e * 2.0)  # exact unit directions: u @ u.T is exactly 1 on the diagonal
    off = ~torch.eye(4, dtype=torch.bool)
    out = _angles(e)[off].pow(2).sum()
    i, j = off.nonzero(as_tuple=True)

    def ref(e):
        u = F.normalize(e, dim=1)
        return torch.acos((u[i] * u[j]).sum(-1).clamp(-1.0, 1.0)).pow(2).sum()

    return out, (e,), _ref(ref, e)


@case("weight-norm-zero-filter-pruned-output", "pytorch/pytorch#19126 (torch._weight_norm of an all-zero weight "
      "row: NaN gradients): a linear layer with a pruned (zeroed) output filter whose output is dropped")
def _():
    v = _data(12, 4, 3)
    v[2] = 0.0
    v, g = _leaf(v), _leaf(_data(13, 4, 1).abs() + 0.5)
    x = _data(14, 5, 3)
    keep = torch.tensor([0, 1, 3])
    out = (x @ torch._weight_norm(v, g, 0).T)[:, keep].pow(2).sum()
    return out, (v, g), _ref(lambda v, g: (x @ torch._weight_norm(v[keep], g[keep], 0).T).pow(2).sum(), v, g)


@case("eigh-degenerate-matrix-batch-element-dropped", "pytorch/pytorch#76531 (NaNs in linalg.eigh backward) and "
      "PythonOT/POT#773 (eigh of the identity): a batch of symmetric matrices in which one is the identity "
      "(repeated eigenvalues); its eigenvectors are not used")
def _():
    a = _data(15, 3, 3, 3)
    a = a + a.transpose(-1, -2)
    a[1] = torch.eye(3, dtype=f64)
    a = _leaf(a)
    keep = torch.tensor([0, 2])

    def loss(a):
        w, v = torch.linalg.eigh(a)
        return (v[..., 0] ** 4).sum() + w.sum()

    w, vec = torch.linalg.eigh(a)
    out = (vec[keep][..., 0] ** 4).sum() + w[keep].sum()
    return out, (a,), _ref(lambda a: loss(a[keep]), a)


# ================================ masked categorical policies, log-space targets, singular solves ============

_ACTION_MASK = torch.tensor([[True, True, False, True], [True, False, False, True]])


@case("ppo-kl-categorical-invalid-actions-masked", "ray-project/ray#27527 and hill-a/stable-baselines#505 (invalid "
      "action masking with -inf logits): kl_divergence between the old and new masked Categorical policies; "
      "torch's KL writes 0 over the masked terms in place (p * (p.logits - q.logits) is 0 x (-inf + inf) there)")
def _():
    new, old = _leaf(_data(18, 2, 4)), _leaf(_data(19, 2, 4))

    def kl(a, b):
        p = TD.Categorical(logits=a.masked_fill(~_ACTION_MASK, -inf))
        q = TD.Categorical(logits=b.masked_fill(~_ACTION_MASK, -inf))
        return TD.kl_divergence(p, q).sum()

    def ref(a, b):
        return sum(TD.kl_divergence(TD.Categorical(logits=a[i][m]), TD.Categorical(logits=b[i][m]))
                   for i, m in enumerate(_ACTION_MASK))

    return kl(new, old), (new, old), _ref(ref, new, old)


@case("kl-div-log-target-masked-vocabulary", "google-deepmind/optax#1786 (kl_divergence_with_log_targets: "
      "exp(-inf) * (-inf - log p) is NaN for a masked vocabulary entry): F.kl_div(log_target=True) elementwise, "
      "the masked entries removed with torch.where")
def _():
    x = _leaf(torch.log_softmax(_data(20, 2, 4), -1))
    tl = _leaf(torch.log_softmax(_data(21, 2, 4).masked_fill(~_ACTION_MASK, -inf), -1))
    out = torch.where(_ACTION_MASK, F.kl_div(x, tl, reduction="none", log_target=True), 0.0).sum()

    def ref(x, tl):
        return sum(F.kl_div(x[i][m], tl[i][m], reduction="sum", log_target=True) for i, m in enumerate(_ACTION_MASK))

    return out, (x, tl), _ref(ref, x, tl)


@case("solve-ex-singular-padded-system-dropped", "pytorch/pytorch#31546 (torch.solve on singular matrices in "
      "kornia's batched quadratic peak refinement; wanted NaN instead of an error): linalg.solve_ex over a batch "
      "whose padded system is all zero (its solution NaN/Inf), dropped before the loss")
def _():
    a = _data(22, 3, 3, 3) + 3 * torch.eye(3, dtype=f64)
    a[2] = 0.0
    a, b = _leaf(a), _leaf(_data(23, 3, 3, 1))
    keep = torch.tensor([0, 1])
    out = torch.linalg.solve_ex(a, b)[0][keep].pow(2).sum()
    return out, (a, b), _ref(lambda a, b: torch.linalg.solve(a[keep], b[keep]).pow(2).sum(), a, b)


# ================================ controls ==================================================================

@case("angular-distance-acos-self-pair-used", "control: msxiaojin/MDLCC#4, the self-pair angle acos(1) is in the "
      "loss (its derivative is infinite; PyTorch's NaN is the program's own)", genuine=True)
def _():
    e = _leaf(torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.5]], dtype=f64))
    out = _angles(e).sum()
    return out, (e,), _ref(lambda e: _angles(e).sum(), e)


@case("hmm-forward-unreachable-state-score-used", "control: pytorch/pytorch#49724, the loss reads the unreachable "
      "state's score logaddexp(-inf, -inf) itself", genuine=True)
def _():
    em = _leaf(_data(16, 4, 3) * 0.3)

    def f(em):
        a = torch.tensor([0.0, -inf, -inf], dtype=f64) + em[0]
        return torch.logaddexp(a[1], a[2]) + a[0]

    return f(em), (em,), _ref(f, em)


@case("stft-log-magnitude-silent-frame-used", "control: csteinmetz1/auraloss#63, the silent frame's log "
      "magnitude (-inf) is in the loss", genuine=True)
def _():
    sig = _data(17, 1, 48)
    sig[0, 24:] = 0.0
    sig = _leaf(sig)
    out = torch.log(_spec(sig).abs()).sum()
    return out, (sig,), _ref(lambda s: torch.log(_spec(s).abs()).sum(), sig)
