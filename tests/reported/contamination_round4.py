"""Real reproductions of NaN/Inf gradients caused by values the output does not use.

Each case comes from a public bug report (named in `source`) and builds a small program. It returns
``(output, inputs, expected)``: ``output`` is a scalar tensor to differentiate, ``inputs`` the tensors to
differentiate with respect to, and ``expected`` the gradients of the same program with the unused values
deleted, the answer a user expects. Cases marked ``genuine`` are controls: the output really depends on a
NaN/Inf (or on an infinite derivative) and the expected gradient keeps it.

Run them against any gradient function with ``check.py``.

Round 4: whole training steps (nn.Module models, parameters as inputs). ``output`` may be a list of scalar
losses: ``torch.autograd.grad`` sums them; the whole-step runners in ``modes.py`` give each its own backward
(gradient accumulation over micro-batches, or retain_graph and a second backward on a shared graph).
``expected`` is always torch.autograd.grad of a deep copy of the model (same parameters) on the data with the
unused parts deleted, float64 unless the case says otherwise.
"""
from __future__ import annotations

import copy
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.checkpoint import checkpoint

nan, inf = float("nan"), float("inf")


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # loaded by path: _format sits beside this file
from _format import contamination_table  # noqa: E402

CASES, case = contamination_table()


f64 = torch.float64
# cases on finite data whose gradients must equal PyTorch's bitwise (checked by run_all.py)
EXACT: set[str] = set()


def _grads(loss, params):
    params = list(params)
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return tuple(torch.zeros_like(p) if g is None else g for g, p in zip(gs, params, strict=False))


def _randomise_bn(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g, dtype=mod.running_mean.dtype) * 0.3)
            mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g, dtype=mod.running_var.dtype) + 0.5)
            with torch.no_grad():
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)


# ================================ CNNs: ResNet block, segmentation =========================================

class BasicBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


def _resnet(seed):
    torch.manual_seed(seed)
    stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    body = nn.Sequential(BasicBlock(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    m = nn.ModuleDict({"stem": stem, "body": body}).double()
    _randomise_bn(m, seed)
    return m


@case("resnet-bn-eval-nan-image-sliced", "pytorch/pytorch#15131 (one corrupt NaN image in the batch; its logits are "
      "dropped before the loss); ResNet BasicBlock in eval mode, gw.backward of the whole step")
def _():
    m = _resnet(1).eval()
    ref = copy.deepcopy(m)
    x = torch.randn(3, 2, 5, 5, dtype=f64)
    x[2] = nan
    y = torch.tensor([0, 2])
    loss = F.cross_entropy(m["body"](m["stem"](x))[:2], y)
    exp = _grads(F.cross_entropy(ref["body"](ref["stem"](x[:2])), y), ref.parameters())
    return loss, list(m.parameters()), exp


@case("resnet-bn-train-stem-on-nan-image-then-sliced", "pytorch/pytorch#15131 variant: the stem conv runs on the "
      "padded batch (eval BN), the NaN image is sliced off before the train-mode residual block")
def _():
    m = _resnet(2)
    m["stem"].eval()
    m["body"].train()
    ref = copy.deepcopy(m)
    x = torch.randn(3, 2, 5, 5, dtype=f64)
    x[1] = nan
    keep = torch.tensor([0, 2])
    y = torch.tensor([1, 0])
    loss = F.cross_entropy(m["body"](m["stem"](x)[keep]), y)
    exp = _grads(F.cross_entropy(ref["body"](ref["stem"](x[keep])), y), ref.parameters())
    return loss, list(m.parameters()), exp


@case("seg-head-ignore-255-nan-padded-columns", "semantic segmentation with ignore_index=255 on padded image regions "
      "(mmsegmentation/torchvision reference: pad with 255 labels); here the padded pixels are NaN, conv3x3+BN(eval)+1x1")
def _():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1)).double().eval()
    _randomise_bn(m, 3)
    ref = copy.deepcopy(m)
    x = torch.randn(2, 3, 6, 8, dtype=f64)
    x[..., 5:] = nan
    tgt = torch.randint(0, 3, (2, 6, 8))
    tgt[..., 4:] = 255
    loss = F.cross_entropy(m(x), tgt, ignore_index=255)
    exp = _grads(F.cross_entropy(ref(x[..., :5])[..., :4], tgt[..., :4], ignore_index=255), ref.parameters())
    return loss, list(m.parameters()), exp


@case("seg-bilinear-upsample-ignore-255-nan-low-res-column", "DeepLab-style logits at 1/2 resolution, "
      "F.interpolate(bilinear) to the label size, CE ignore_index=255 over the padded region (NaN features)")
def _():
    torch.manual_seed(4)
    head = nn.Conv2d(4, 3, 1).double()
    ref = copy.deepcopy(head)
    x = torch.randn(2, 4, 4, 4, dtype=f64)
    x[..., 3] = nan
    tgt = torch.randint(0, 3, (2, 8, 8))
    tgt[..., 5:] = 255
    up = F.interpolate(head(x), size=(8, 8), mode="bilinear", align_corners=False)
    loss = F.cross_entropy(up, tgt, ignore_index=255)
    up_ref = F.interpolate(ref(x[..., :3]), size=(8, 6), mode="bilinear", align_corners=False)[..., :5]
    exp = _grads(F.cross_entropy(up_ref, tgt[..., :5], ignore_index=255), ref.parameters())
    return loss, list(head.parameters()), exp


@case("unet-groupnorm-silu-nan-sample-dropped", "diffusion UNet ResBlock (GroupNorm, SiLU, time embedding); "
      "pytorch/pytorch#15131-style NaN sample dropped from the loss; `with gw.strong_zeros(): loss.backward()`")
def _():
    torch.manual_seed(5)

    class ResBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1, self.c1 = nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3, padding=1)
            self.t = nn.Linear(3, 4)
            self.n2, self.c2 = nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x, temb):
            h = self.c1(F.silu(self.n1(x))) + self.t(temb)[:, :, None, None]
            return x + self.c2(F.silu(self.n2(h)))

    m = ResBlock().double()
    ref = copy.deepcopy(m)
    x = torch.randn(3, 4, 4, 4, dtype=f64)
    temb = torch.randn(3, 3, dtype=f64)
    x[0] = nan
    noise = torch.randn(3, 4, 4, 4, dtype=f64)
    loss = F.mse_loss(m(x, temb)[1:], noise[1:])
    exp = _grads(F.mse_loss(ref(x[1:], temb[1:]), noise[1:]), ref.parameters())
    return loss, list(m.parameters()), exp


@case("conv1d-ce-weight-smoothing-ignore-nan-frames", "pytorch/pytorch#70348 (CE with class weights and "
      "label_smoothing) on (N, C, L) frame logits of a conv1d head; padded frames NaN, targets -100")
def _():
    torch.manual_seed(6)
    conv = nn.Conv1d(3, 4, 3, padding=1).double()
    ref = copy.deepcopy(conv)
    w = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=f64)
    x = torch.randn(2, 3, 8, dtype=f64)
    x[1, :, 6:] = nan
    tgt = torch.randint(0, 4, (2, 8))
    tgt[1, 5:] = -100
    loss = F.cross_entropy(conv(x), tgt, weight=w, label_smoothing=0.1, ignore_index=-100)
    l0 = ref(x[:1])[0].T
    l1 = ref(x[1:, :, :6])[0, :, :5].T
    exp = _grads(F.cross_entropy(torch.cat([l0, l1]), torch.cat([tgt[0], tgt[1, :5]]), weight=w,
                                 label_smoothing=0.1), ref.parameters())
    return loss, list(conv.parameters()), exp


# ================================ transformer LMs ==========================================================

class GPTBlockMHA(nn.Module):
    def __init__(self, d, h, need_weights):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, h, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.need_weights = need_weights

    def forward(self, x, kpm):
        T = x.shape[1]
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        h = self.ln1(x)
        a = self.attn(h, h, h, attn_mask=causal, key_padding_mask=kpm, need_weights=self.need_weights)[0]
        x = x + a
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, V, d, need_weights):
        super().__init__()
        self.emb = nn.Embedding(V, d, padding_idx=0)
        self.block = GPTBlockMHA(d, 2, need_weights)
        self.lnf = nn.LayerNorm(d)
        self.head = nn.Linear(d, V)

    def forward(self, tok, kpm):
        return self.head(self.lnf(self.block(self.emb(tok), kpm)))


def _left_padded_lm(need_weights, seed):
    torch.manual_seed(seed)
    V = 9
    m = TinyLM(V, 6, need_weights).double()
    ref = copy.deepcopy(m)
    tok = torch.tensor([[0, 0, 3, 5, 2, 7], [4, 1, 6, 2, 3, 5]])
    kpm = tok == 0
    tgt = torch.randint(1, V, tok.shape)
    tgt[kpm] = -100
    loss = F.cross_entropy(m(tok, kpm).reshape(-1, V), tgt.reshape(-1), ignore_index=-100, reduction="sum")
    refloss = 0
    for b in range(2):
        keep = ~kpm[b]
        refloss = refloss + F.cross_entropy(ref(tok[b][keep][None], None)[0], tgt[b][keep], reduction="sum")
    return m, loss, _grads(refloss, ref.parameters())


@case("gpt-mha-left-pad-causal-fully-masked-rows", "pytorch/pytorch#41508 and unslothai/unsloth PR #9848 (left-pad "
      "query rows that attend to nothing give NaN); nn.MultiheadAttention (need_weights=True) GPT block, CE ignore")
def _():
    m, loss, exp = _left_padded_lm(True, 7)
    return loss, list(m.parameters()), exp


@case("gpt-mha-sdpa-path-left-pad-causal", "as above with need_weights=False (MHA routes to "
      "scaled_dot_product_attention), pytorch/pytorch#103749-style")
def _():
    m, loss, exp = _left_padded_lm(False, 8)
    return loss, list(m.parameters()), exp


def _hand_tied_lm(dtype, seed):
    torch.manual_seed(seed)
    V, d = 8, 6
    pad = V - 1
    E = torch.randn(V, d, dtype=dtype)
    E[pad] = nan  # a padding embedding the user marks with NaN (it must never be used)
    E.requires_grad_(True)
    ws = [(torch.randn(d, d, dtype=dtype) / math.sqrt(d)).requires_grad_(True) for _ in range(4)]
    ln = nn.LayerNorm(d).to(dtype)
    params = [E, *ws, *ln.parameters()]

    def fwd(E, ws, ln, tok, kpm, V_out):
        wq, wk, wv, wo = ws
        x = F.embedding(tok, E)
        h = ln(x)
        q, k, v = h @ wq, h @ wk, h @ wv
        if kpm is not None:
            v = v.masked_fill(kpm[..., None], 0.0)
        T = tok.shape[1]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        if kpm is not None:
            mask = mask | kpm[:, None, :]
        s = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(mask, -inf)
        x = x + (torch.softmax(s, -1) @ v) @ wo
        logits = x @ E[:V_out].T  # weight tying
        if V_out == V:
            logits = logits.masked_fill(torch.arange(V) == pad, -inf)  # never predict <pad>
        return logits

    tok = torch.tensor([[1, 4, 2, pad, pad], [3, 0, 5, 6, 2]])
    kpm = tok == pad
    tgt = torch.randint(0, pad, tok.shape)
    tgt[kpm] = -100
    loss = F.cross_entropy(fwd(E, ws, ln, tok, kpm, V).reshape(-1, V), tgt.reshape(-1), ignore_index=-100,
                           reduction="sum")
    E2 = E.detach().clone().requires_grad_(True)
    ws2 = [w.detach().clone().requires_grad_(True) for w in ws]
    ln2 = copy.deepcopy(ln)
    refloss = 0
    for b in range(2):
        keep = ~kpm[b]
        lg = fwd(E2, ws2, ln2, tok[b][keep][None], None, pad)[0]
        refloss = refloss + F.cross_entropy(lg, tgt[b][keep], reduction="sum")
    return loss, params, _grads(refloss, [E2, *ws2, *ln2.parameters()])


@case("hand-attn-tied-embedding-nan-pad-row-f64", "weight tying (Press & Wolf) with a NaN <pad> embedding row; "
      "logits[:, pad] masked_fill(-inf) (HF bad_words / never predict pad), right padding; float64")
def _():
    return _hand_tied_lm(f64, 9)


@case("hand-attn-tied-embedding-nan-pad-row-f32", "as above in float32 (expected also computed in float32)")
def _():
    return _hand_tied_lm(torch.float32, 9)


def _sdpa_lm(dtype, seed):
    torch.manual_seed(seed)
    d = 8
    blk = nn.ModuleDict({"qkv": nn.Linear(d, 3 * d), "o": nn.Linear(d, d), "ln": nn.LayerNorm(d),
                         "head": nn.Linear(d, 5)}).to(dtype)
    ref = copy.deepcopy(blk)

    def fwd(m, x, kpm):
        B, T, _ = x.shape
        q, k, v = m["qkv"](m["ln"](x)).view(B, T, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))
        if kpm is not None:
            k = k.masked_fill(kpm[:, None, :, None], 0.0)
            v = v.masked_fill(kpm[:, None, :, None], 0.0)
            allowed = allowed & ~kpm[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return m["head"](x + m["o"](o.transpose(1, 2).reshape(B, T, d)))

    x = torch.randn(2, 5, d, dtype=dtype)
    kpm = torch.tensor([[False, False, False, True, True], [False] * 5])
    x[kpm] = nan  # padded token features
    tgt = torch.randint(0, 5, (2, 5))
    tgt[kpm] = -100
    loss = F.cross_entropy(fwd(blk, x, kpm).reshape(-1, 5), tgt.reshape(-1), ignore_index=-100, reduction="sum")
    refloss = 0
    for b in range(2):
        keep = ~kpm[b]
        refloss = refloss + F.cross_entropy(fwd(ref, x[b][keep][None], None)[0], tgt[b][keep], reduction="sum")
    return loss, list(blk.parameters()), _grads(refloss, ref.parameters())


@case("sdpa-block-nan-pad-queries-f32", "pytorch/pytorch#103963 / #41508: NaN padded tokens, keys/values of pads "
      "zeroed, bool attn_mask; the pad query rows stay NaN and their targets are -100 (float32)")
def _():
    return _sdpa_lm(torch.float32, 10)


@case("sdpa-block-nan-pad-queries-f64", "as above in float64")
def _():
    return _sdpa_lm(f64, 10)


# ================================ RNN language model ========================================================

@case("lstm-lm-f64-packed-pad-packed-nan-padding-value", "pytorch/pytorch#41508-style RNN LM: pack_padded_sequence, "
      "pad_packed_sequence(padding_value=nan) so that misuse is loud, head + CE ignore_index")
def _():
    torch.manual_seed(11)
    V = 7
    m = nn.ModuleDict({"emb": nn.Embedding(V, 4, padding_idx=0), "rnn": nn.LSTM(4, 5, batch_first=True),
                       "head": nn.Linear(5, V)}).double()
    ref = copy.deepcopy(m)
    tok = torch.tensor([[3, 1, 4, 0, 0], [2, 6, 5, 1, 3], [5, 2, 0, 0, 0]])
    lengths = torch.tensor([3, 5, 2])
    tgt = torch.randint(1, V, tok.shape)
    tgt[tok == 0] = -100
    packed = pack_padded_sequence(m["emb"](tok), lengths, batch_first=True, enforce_sorted=False)
    out, _ = m["rnn"](packed)
    out, _ = pad_packed_sequence(out, batch_first=True, padding_value=nan, total_length=5)
    loss = F.cross_entropy(m["head"](out).reshape(-1, V), tgt.reshape(-1), ignore_index=-100)
    logits = [ref["head"](ref["rnn"](ref["emb"](tok[b, :L])[None])[0][0]) for b, L in enumerate(lengths.tolist())]
    tg = torch.cat([tgt[b, :L] for b, L in enumerate(lengths.tolist())])
    exp = _grads(F.cross_entropy(torch.cat(logits), tg), ref.parameters())
    return loss, list(m.parameters()), exp


@case("gru-lm-f64-padded-nan-inputs-gather-last", "pytorch/pytorch#41508: GRU over NaN padding (no packing), hidden "
      "state of the last valid step gathered for classification; retain_graph + a second backward of an aux loss")
def _():
    torch.manual_seed(12)
    m = nn.ModuleDict({"rnn": nn.GRU(3, 4, batch_first=True), "cls": nn.Linear(4, 2),
                       "aux": nn.Linear(4, 3)}).double()
    ref = copy.deepcopy(m)
    x = torch.randn(2, 5, 3, dtype=f64)
    lengths = torch.tensor([3, 5])
    x[0, 3:] = nan
    y = torch.tensor([1, 0])
    out, _ = m["rnn"](x)
    last = out.gather(1, (lengths - 1).view(2, 1, 1).expand(2, 1, 4))[:, 0]
    loss_cls = F.cross_entropy(m["cls"](last), y)
    aux_t = torch.randn(2, 5, 3, dtype=f64)
    mask = torch.arange(5)[None] < lengths[:, None]
    loss_aux = F.mse_loss(m["aux"](out)[mask], aux_t[mask])
    refloss = 0
    lasts, auxs = [], []
    for b, L in enumerate(lengths.tolist()):
        o, _ = ref["rnn"](x[b:b + 1, :L])
        lasts.append(o[0, L - 1])
        auxs.append(ref["aux"](o[0]))
    refloss = F.cross_entropy(ref["cls"](torch.stack(lasts)), y) + F.mse_loss(torch.cat(auxs), aux_t[mask])
    return [loss_cls, loss_aux], list(m.parameters()), _grads(refloss, ref.parameters())


# ================================ GNN, MoE, CTC, detection, RL ==============================================

@case("gnn-index-add-nan-padded-nodes", "pyg-team/pytorch_geometric dense batching (padded nodes); messages "
      "gathered by index_select over real edges, summed by index_add; readout over real nodes")
def _():
    torch.manual_seed(13)
    m = nn.ModuleDict({"msg": nn.Linear(4, 5), "self": nn.Linear(4, 5), "out": nn.Linear(5, 1)}).double()
    ref = copy.deepcopy(m)
    x = torch.randn(6, 4, dtype=f64)
    x[4:] = nan
    src = torch.tensor([0, 1, 2, 3, 1])
    dst = torch.tensor([1, 2, 0, 2, 3])

    def fwd(m, x, n):
        agg = x.new_zeros(n, 5).index_add(0, dst, m["msg"](x).index_select(0, src))
        return F.relu(agg + m["self"](x))

    h = fwd(m, x, 6)
    loss = m["out"](h[:4].sum(0)).pow(2).sum()
    exp = _grads(ref["out"](fwd(ref, x[:4], 4).sum(0)).pow(2).sum(), ref.parameters())
    return loss, list(m.parameters()), exp


@case("gnn-scatter-add-mean-degree-clamp-where-readout", "pyg-team/pytorch_geometric#331 (empty segments) with "
      "scatter_add_ mean aggregation (deg.clamp(min=1)), NaN padded nodes, torch.where masked readout")
def _():
    torch.manual_seed(14)
    m = nn.ModuleDict({"lin": nn.Linear(3, 4), "out": nn.Linear(4, 2)}).double()
    ref = copy.deepcopy(m)
    x = torch.randn(7, 3, dtype=f64)
    valid = torch.tensor([True] * 5 + [False] * 2)
    x[~valid] = nan
    src = torch.tensor([0, 1, 2, 3, 4, 4])
    dst = torch.tensor([1, 2, 3, 4, 0, 2])
    y = torch.tensor([1])

    def fwd(m, x, n, valid):
        msg = m["lin"](x)[src]
        agg = torch.zeros(n, 4, dtype=f64).scatter_add_(0, dst[:, None].expand(-1, 4), msg)
        deg = torch.zeros(n, dtype=f64).index_add_(0, dst, torch.ones(len(dst), dtype=f64)).clamp(min=1)
        h = torch.tanh(agg / deg[:, None])
        if valid is not None:
            h = torch.where(valid[:, None], h, 0.0)
        return m["out"](h.sum(0, keepdim=True))

    loss = F.cross_entropy(fwd(m, x, 7, valid), y)
    exp = _grads(F.cross_entropy(fwd(ref, x[:5], 5, None), y), ref.parameters())
    return loss, list(m.parameters()), exp


@case("gnn-topk-pool-nan-padded-nodes", "SAGPool/TopKPooling over padded nodes: pad scores masked_fill(-inf), "
      "topk keeps real nodes; pad features NaN")
def _():
    torch.manual_seed(15)
    m = nn.ModuleDict({"score": nn.Linear(4, 1), "lin": nn.Linear(4, 3)}).double()
    ref = copy.deepcopy(m)
    x = torch.randn(6, 4, dtype=f64)
    valid = torch.tensor([True, True, False, True, True, False])
    x[~valid] = nan

    def fwd(m, x, valid):
        s = m["score"](x)[:, 0]
        if valid is not None:
            s = s.masked_fill(~valid, -inf)
        val, idx = s.topk(3)
        return (m["lin"](x[idx]) * torch.tanh(val)[:, None]).sum()

    loss = fwd(m, x, valid).pow(2)
    exp = _grads(fwd(ref, x[valid], None).pow(2), ref.parameters())
    return loss, list(m.parameters()), exp


@case("moe-top2-dense-experts-nan-expert-never-routed", "mixture-of-experts top-2 routing (Switch/Mixtral style) "
      "computed densely then gathered; a diverged expert holds NaN weights and the router never selects it")
def _():
    torch.manual_seed(16)
    d, E = 4, 4
    m = nn.ModuleDict({"trunk": nn.Linear(3, d), "router": nn.Linear(d, E),
                       "experts": nn.ModuleList(nn.Linear(d, d) for _ in range(E))}).double()
    with torch.no_grad():
        m["router"].bias[3] = -50.0
        m["experts"][3].weight.fill_(nan)
    ref = copy.deepcopy(m)
    inp = torch.randn(5, 3, dtype=f64)
    tgt = torch.randn(5, d, dtype=f64)

    def fwd(m, ne):
        x = torch.tanh(m["trunk"](inp))
        val, idx = m["router"](x).topk(2, dim=-1)
        outs = torch.stack([m["experts"][e](x) for e in range(ne)], 1)
        sel = outs.gather(1, idx[..., None].expand(-1, -1, d))
        return F.mse_loss((torch.softmax(val, -1)[..., None] * sel).sum(1), tgt)

    loss = fwd(m, E)
    exp = _grads(fwd(ref, E - 1), ref.parameters())
    return loss, list(m.parameters()), exp


@case("ctc-head-nan-frames-beyond-input-lengths", "pytorch/pytorch#14401 / tensorflow#41280 (frames beyond "
      "logit_length must get zero gradient); padded frames NaN; Linear + log_softmax + F.ctc_loss, float64")
def _():
    torch.manual_seed(17)
    lin = nn.Linear(3, 5).double()
    ref = copy.deepcopy(lin)
    feats = torch.randn(8, 2, 3, dtype=f64)
    feats[5:, 1] = nan
    targets = torch.tensor([1, 2, 3, 1, 2])
    il, tl = torch.tensor([8, 5]), torch.tensor([2, 3])
    loss = F.ctc_loss(lin(feats).log_softmax(-1), targets, il, tl, reduction="sum")
    lp0 = ref(feats[:, :1]).log_softmax(-1)
    lp1 = ref(feats[:5, 1:]).log_softmax(-1)
    refloss = (F.ctc_loss(lp0, targets[:2], il[:1], tl[:1], reduction="sum")
               + F.ctc_loss(lp1, targets[2:], il[1:], tl[1:], reduction="sum"))
    return loss, list(lin.parameters()), _grads(refloss, ref.parameters())


def _box_xyxy(cxcywh):
    cx, cy, w, h = cxcywh.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def _giou(a, b):
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union
    clt, crb = torch.minimum(a[:, :2], b[:, :2]), torch.maximum(a[:, 2:], b[:, 2:])
    c = (crb - clt).prod(-1)
    return iou - (c - union) / c


@case("detection-giou-ignored-anchors-nan-padded-gt", "generalized-iou/g-tensorflow-models#3, mmdetection#4486 "
      "(GIoU loss NaN): anchors matched to padded (NaN) ground-truth slots are ignored with torch.where")
def _():
    torch.manual_seed(18)
    head = nn.Linear(4, 4).double()
    ref = copy.deepcopy(head)
    feat = torch.randn(6, 4, dtype=f64)
    anchors = torch.tensor([[2.0, 2, 2, 2], [5, 5, 3, 2], [1, 6, 2, 2], [7, 1, 2, 3], [3, 3, 4, 4], [6, 6, 2, 2]],
                           dtype=f64)
    gts = torch.tensor([[1.0, 1, 3.5, 3], [3.5, 4, 6, 6], [nan, nan, nan, nan]], dtype=f64)
    match = torch.tensor([0, 1, 2, 2, 0, 1])
    pos = match != 2

    def fwd(head, feat, anchors, match):
        d = head(feat) * 0.1
        boxes = torch.cat([anchors[:, :2] + d[:, :2] * anchors[:, 2:], anchors[:, 2:] * d[:, 2:].exp()], -1)
        return 1 - _giou(_box_xyxy(boxes), gts[match])

    loss = torch.where(pos, fwd(head, feat, anchors, match), 0.0).sum() / pos.sum()
    refloss = fwd(ref, feat[pos], anchors[pos], match[pos]).sum() / pos.sum()
    return loss, list(head.parameters()), _grads(refloss, ref.parameters())


@case("trajectory-speed-heading-zero-padded-agents", "pytorch/pytorch#98276 / e3nn/e3nn#112 (atan2 at (0, 0)), "
      "HIPS/autograd#586 (norm at 0): padded agents have zero features and a bias-free velocity head, so their "
      "speed sqrt(vx^2 + vy^2) sits at 0; masked with where")
def _():
    torch.manual_seed(19)
    m = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 2, bias=False)).double()
    ref = copy.deepcopy(m)
    feats = torch.randn(5, 3, dtype=f64)
    valid = torch.tensor([True, True, True, False, False])
    feats[~valid] = 0.0
    gt = torch.rand(5, dtype=f64) * 6 - 3

    def fwd(m, feats, gt):
        v = m(feats)
        speed = (v ** 2).sum(-1).sqrt()
        return 1 - torch.cos(torch.atan2(v[:, 1], v[:, 0]) - gt) + (speed - 0.5).abs()

    loss = torch.where(valid, fwd(m, feats, gt), 0.0).sum()
    exp = _grads(fwd(ref, feats[valid], gt[valid]).sum(), ref.parameters())
    return loss, list(m.parameters()), exp


@case("survival-lognormal-log-prob-zero-duration-padding", "pytorch/pytorch#15131 (log_prob NaN gradient on a "
      "subset) with LogNormal time-to-event heads: padded events carry duration 0.0 (log_prob -inf), masked by where")
def _():
    torch.manual_seed(20)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    ref = copy.deepcopy(net)
    obs = torch.randn(5, 3, dtype=f64)
    dur = torch.rand(5, dtype=f64) * 2 + 0.1
    real = torch.tensor([True, False, True, True, False])
    dur[~real] = 0.0

    def fwd(net, obs, dur):
        p = net(obs)
        return torch.distributions.LogNormal(p[:, 0], F.softplus(p[:, 1]) + 0.1, validate_args=False).log_prob(dur)

    loss = -torch.where(real, fwd(net, obs, dur), 0.0).sum()
    exp = _grads(-fwd(ref, obs[real], dur[real]).sum(), ref.parameters())
    return loss, list(net.parameters()), exp


@case("masked-batchnorm1d-train-index-put-nan-pads", "masked BatchNorm over real tokens only (BN on x[mask], written "
      "back with index_put into zeros), pytorch/pytorch#41508-style NaN padded tokens before it")
def _():
    torch.manual_seed(21)
    m = nn.ModuleDict({"l1": nn.Linear(3, 4), "bn": nn.BatchNorm1d(4), "l2": nn.Linear(4, 2)}).double().train()
    ref = copy.deepcopy(m)
    x = torch.randn(2, 5, 3, dtype=f64)
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, False]])
    x[~mask] = nan
    h = m["l1"](x)
    out = h.new_zeros(h.shape)
    out[mask] = m["bn"](h[mask])
    loss = m["l2"](out)[mask].pow(2).sum()
    exp = _grads(ref["l2"](ref["bn"](ref["l1"](x[mask]))).pow(2).sum(), ref.parameters())
    return loss, list(m.parameters()), exp


# ================================ training-step mechanics ====================================================

def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 2)).double()


@case("grad-accum-first-microbatch-nan-rows-sliced", "gradient accumulation (allenai/OLMo PR #313 checks NaN once "
      "per batch): micro-batch 1 has NaN padding rows sliced off before the loss, micro-batch 2 is clean")
def _():
    m = _mlp(22)
    ref = copy.deepcopy(m)
    x1 = torch.randn(4, 4, dtype=f64)
    x1[2:] = nan
    y1 = torch.randn(4, 2, dtype=f64)
    x2, y2 = torch.randn(3, 4, dtype=f64), torch.randn(3, 2, dtype=f64)
    l1 = F.mse_loss(m(x1)[:2], y1[:2]) / 2
    l2 = F.mse_loss(m(x2), y2) / 2
    refloss = F.mse_loss(ref(x1[:2]), y1[:2]) / 2 + F.mse_loss(ref(x2), y2) / 2
    return [l1, l2], list(m.parameters()), _grads(refloss, ref.parameters())


@case("grad-accum-second-microbatch-masked-fill-nan-rows", "pytorch/pytorch#23156 (masked_fill of NaN outputs) in "
      "the second micro-batch, accumulated onto the clean first micro-batch's .grad")
def _():
    m = _mlp(23)
    ref = copy.deepcopy(m)
    x1, y1 = torch.randn(3, 4, dtype=f64), torch.randn(3, 2, dtype=f64)
    x2 = torch.randn(4, 4, dtype=f64)
    pad = torch.tensor([False, True, False, True])
    x2[pad] = nan
    l1 = F.mse_loss(m(x1), y1, reduction="sum")
    out = m(x2)
    l2 = out.masked_fill(torch.isnan(out), 0.0).pow(2).sum()
    refloss = F.mse_loss(ref(x1), y1, reduction="sum") + ref(x2[~pad]).pow(2).sum()
    return [l1, l2], list(m.parameters()), _grads(refloss, ref.parameters())


@case("retain-graph-two-losses-shared-trunk-nan-row", "retain_graph=True and a second backward on a shared trunk "
      "(multi-task heads, pytorch/pytorch docs); a NaN padding row is used by neither loss")
def _():
    m = _mlp(24)
    heads = nn.ModuleList([nn.Linear(2, 1), nn.Linear(2, 3)]).double()
    ref, refh = copy.deepcopy(m), copy.deepcopy(heads)
    x = torch.randn(5, 4, dtype=f64)
    x[4] = nan
    t = m(x)
    la = heads[0](t[:2]).pow(2).sum()
    lb = F.cross_entropy(heads[1](t[2:4]), torch.tensor([0, 2]))
    tr = ref(x[:4])
    refloss = refh[0](tr[:2]).pow(2).sum() + F.cross_entropy(refh[1](tr[2:4]), torch.tensor([0, 2]))
    return [la, lb], [*m.parameters(), *heads.parameters()], _grads(refloss, [*ref.parameters(), *refh.parameters()])


def _ckpt_case(reentrant, seed):
    torch.manual_seed(seed)
    m = nn.ModuleDict({"stem": nn.Linear(3, 4), "block": nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(),
                                                                       nn.Linear(8, 4)),
                       "head": nn.Linear(4, 1)}).double()
    ref = copy.deepcopy(m)
    x = torch.randn(5, 3, dtype=f64)
    x[3:] = nan
    h = checkpoint(m["block"], m["stem"](x), use_reentrant=reentrant)
    loss = m["head"](h)[:3].pow(2).sum()
    refloss = ref["head"](ref["block"](ref["stem"](x[:3]))).pow(2).sum()
    return loss, list(m.parameters()), _grads(refloss, ref.parameters())


@case("checkpoint-nonreentrant-block-nan-rows-sliced", "pytorch/pytorch#42212 (gradients with/without "
      "torch.utils.checkpoint); use_reentrant=False, NaN padding rows sliced after the block")
def _():
    return _ckpt_case(False, 25)


@case("checkpoint-reentrant-block-nan-rows-sliced", "as above with use_reentrant=True (the recompute runs its own "
      "torch.autograd.backward inside the outer backward)")
def _():
    return _ckpt_case(True, 26)


def _gp_case(inner, seed):
    torch.manual_seed(seed)
    D = nn.Sequential(nn.Linear(3, 8), nn.LeakyReLU(0.2), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    ref = copy.deepcopy(D)
    real, fake = torch.randn(4, 3, dtype=f64), torch.randn(4, 3, dtype=f64)
    eps = torch.rand(4, 1, dtype=f64)

    def fwd(D, gradfn):
        xi = (eps * real + (1 - eps) * fake).requires_grad_(True)
        (g,) = gradfn(D(xi).sum(), xi, create_graph=True)
        gp = ((g.norm(2, dim=1) - 1) ** 2).mean()
        return D(fake).mean() - D(real).mean() + 10 * gp

    loss = fwd(D, inner)
    return loss, list(D.parameters()), _grads(fwd(ref, torch.autograd.grad), ref.parameters())


@case("wgan-gp-create-graph-finite-torch-inner", "WGAN-GP (Gulrajani et al.) create_graph=True gradient penalty on "
      "finite data, inner torch.autograd.grad; must equal PyTorch exactly")
def _():
    return _gp_case(torch.autograd.grad, 27)


@case("wgan-gp-create-graph-finite-gw-inner", "as above with the inner gradient from gradwise.grad(create_graph=True)")
def _():
    import gradwise

    return _gp_case(gradwise.grad, 27)


EXACT.update({"wgan-gp-create-graph-finite-torch-inner", "wgan-gp-create-graph-finite-gw-inner"})


@case("finite-gpt-mha-right-pad-exact", "control for bitwise equality: the MHA LM step on finite right-padded data")
def _():
    torch.manual_seed(28)
    V = 9
    m = TinyLM(V, 6, True).double()
    tok = torch.tensor([[3, 5, 2, 7, 0, 0], [4, 1, 6, 2, 3, 5]])
    kpm = tok == 0
    tgt = torch.randint(1, V, tok.shape)
    tgt[kpm] = -100
    loss = F.cross_entropy(m(tok, kpm).reshape(-1, V), tgt.reshape(-1), ignore_index=-100)
    ref = copy.deepcopy(m)
    exp = _grads(F.cross_entropy(ref(tok, kpm).reshape(-1, V), tgt.reshape(-1), ignore_index=-100), ref.parameters())
    return loss, list(m.parameters()), exp


EXACT.add("finite-gpt-mha-right-pad-exact")


# ================================ controls ==================================================================

@case("grad-accum-second-microbatch-nan-used", "control: the NaN row of micro-batch 2 is in its loss", genuine=True)
def _():
    m = _mlp(29)
    ref = copy.deepcopy(m)
    x1, y1 = torch.randn(3, 4, dtype=f64), torch.randn(3, 2, dtype=f64)
    x2 = torch.randn(3, 4, dtype=f64)
    x2[1] = nan
    l1 = F.mse_loss(m(x1), y1)
    l2 = m(x2).pow(2).mean()
    refloss = F.mse_loss(ref(x1), y1) + ref(x2).pow(2).mean()
    return [l1, l2], list(m.parameters()), _grads(refloss, ref.parameters())


@case("gpt-mha-left-pad-rows-in-loss", "control: pytorch/pytorch#41508, the fully masked (NaN) rows are not ignored",
      genuine=True)
def _():
    torch.manual_seed(30)
    V = 9
    m = TinyLM(V, 6, True).double()
    ref = copy.deepcopy(m)
    tok = torch.tensor([[0, 0, 3, 5, 2, 7], [4, 1, 6, 2, 3, 5]])
    kpm = tok == 0
    tgt = torch.randint(1, V, tok.shape)
    loss = F.cross_entropy(m(tok, kpm).reshape(-1, V), tgt.reshape(-1))
    exp = _grads(F.cross_entropy(ref(tok, kpm).reshape(-1, V), tgt.reshape(-1)), ref.parameters())
    return loss, list(m.parameters()), exp


@case("resnet-bn-train-nan-image-in-batch-stats", "control: pytorch/pytorch#15131, a NaN image enters train-mode "
      "BatchNorm statistics, so the kept images are NaN too", genuine=True)
def _():
    m = _resnet(31).train()
    ref = copy.deepcopy(m)
    x = torch.randn(3, 2, 5, 5, dtype=f64)
    x[2] = nan
    y = torch.tensor([0, 2])
    loss = F.cross_entropy(m["body"](m["stem"](x))[:2], y)
    exp = _grads(F.cross_entropy(ref["body"](ref["stem"](x))[:2], y), ref.parameters())
    return loss, list(m.parameters()), exp
