"""Random small programs for the compiled-pass fuzzer (tests/test_compile_fuzz.py).

``program(seed)`` returns a text, a function ``f(x, w, v) -> scalar`` and its three leaves: ``x`` data holding
NaN/Inf (some positions the program discards, some it uses), ``w`` a weight the size of ``x`` and ``v`` a square
weight. A program is a chain of random steps over a 2-d value (gates, where/masked_fill, slices/index/gather/
scatter/index_add/cumsum, pad, flip/roll/repeat/stack/cat, reductions, products with data, matmuls, softmax,
layer norm), or one of the families that need other shapes (conv2d + pooling, attention).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

NAN, INF = float("nan"), float("inf")
R, C = 4, 3


_FINITE = [False]  # program(seed, finite=True): the same kinds of programs over finite data


def data(rng: random.Random, shape, p_bad: float = 0.25) -> torch.Tensor:
    """Random values; some positions NaN/+-Inf, some 0 or negative (log, sqrt, division meet their domain)."""
    vals = []
    for _ in range(torch.Size(shape).numel()):
        u = rng.random()
        if u < p_bad:
            vals.append(rng.choice([NAN, INF, -INF]) if not _FINITE[0] else 0.5)
        elif u < p_bad + 0.1:
            vals.append(rng.choice([0.0, -1.0]))
        else:
            vals.append(round(rng.uniform(0.2, 2.0), 2) * rng.choice([1, 1, -1]))
    return torch.tensor(vals).reshape(shape)


def _mask(rng: random.Random, shape) -> torch.Tensor:
    return torch.tensor([rng.random() < 0.5 for _ in range(torch.Size(shape).numel())]).reshape(shape)


def _finite(rng: random.Random, shape) -> torch.Tensor:
    return torch.tensor([round(rng.uniform(-1.5, 1.5), 2) for _ in range(torch.Size(shape).numel())]).reshape(shape)


UNARY = {
    "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
    "square": torch.square, "recip": lambda h: 1 / h, "relu": torch.relu, "gelu": F.gelu, "silu": F.silu,
    "abs": torch.abs, "hardsigmoid": F.hardsigmoid, "softplus": F.softplus,
}
GATES = {
    "threshold": lambda h: F.threshold(h, 0.5, -1.0), "hardtanh": F.hardtanh,
    "clamp": lambda h: h.clamp(-0.5, 1.0), "clamp_min": lambda h: h.clamp_min(0.3), "leaky_relu": F.leaky_relu,
    "relu6": F.relu6, "hardswish": F.hardswish, "elu": F.elu,
}  # (not softshrink: inductor's decomposition makes softshrink(NaN) = 0 where eager PyTorch gives NaN)


def _step(rng: random.Random, shape: tuple):
    """One random op on a value of ``shape`` (2-d: rows, columns): (text, fn(h, v), new shape)."""
    r, c = shape
    kinds = [*UNARY, *GATES, "mul", "add", "div", "where", "where_nan", "masked_fill", "mse", "softmax",
             "log_softmax", "layer_norm", "flip", "roll", "repeat_rows", "cat", "stack_sum", "pad",
             "cumsum", "index_add", "scatter", "scatter_add", "sum_keep", "mean_keep", "amax_keep", "bmm", "t"]
    if r > 1:
        kinds += ["slice", "index", "select_expand", "slice_step"]
    if c > 1:
        kinds += ["slice_cols", "gather"]
    if c == C:
        kinds += ["mm", "linear", "matmul"]
    kind = rng.choice(kinds)
    if kind in UNARY:
        return kind, (lambda h, v, f=UNARY[kind]: f(h)), shape
    if kind in GATES:
        return kind, (lambda h, v, f=GATES[kind]: f(h)), shape
    if kind in ("mul", "add", "div", "mse"):
        d = data(rng, shape, p_bad=0.15)
        f = {"mul": torch.mul, "add": torch.add, "div": torch.div,
             "mse": lambda h, d: F.mse_loss(h, d, reduction="none")}[kind]
        return f"{kind}({d.tolist()})", (lambda h, v, f=f, d=d: f(h, d)), shape
    if kind in ("where", "where_nan"):
        m, d = _mask(rng, shape), data(rng, shape)
        if kind == "where_nan" and not _FINITE[0]:
            return f"where({m.tolist()}, h, nan)", (lambda h, v, m=m: torch.where(m, h, NAN)), shape
        return f"where({m.tolist()}, h, {d.tolist()})", (lambda h, v, m=m, d=d: torch.where(m, h, d)), shape
    if kind == "masked_fill":
        m, val = _mask(rng, shape), rng.choice([0.0, NAN if not _FINITE[0] else 2.0, 1.0])
        return f"masked_fill({m.tolist()}, {val})", (lambda h, v, m=m, val=val: h.masked_fill(m, val)), shape
    if kind == "softmax":
        return "softmax(-1)", (lambda h, v: h.softmax(-1)), shape
    if kind == "log_softmax":
        return "log_softmax(-1)", (lambda h, v: h.log_softmax(-1)), shape
    if kind == "layer_norm":
        return "layer_norm", (lambda h, v: F.layer_norm(h, (c,))), shape
    if kind == "flip":
        return "flip(0)", (lambda h, v: h.flip(0)), shape
    if kind == "roll":
        k = rng.randrange(1, 3)
        return f"roll({k}, 1)", (lambda h, v, k=k: h.roll(k, 1)), shape
    if kind == "repeat_rows":
        return "repeat(2, 1)", (lambda h, v: h.repeat(2, 1)), (2 * r, c)
    if kind == "cat":
        d = data(rng, (1, c))
        return f"cat([h, {d.tolist()}])", (lambda h, v, d=d: torch.cat([h, d])), (r + 1, c)
    if kind == "stack_sum":
        return "stack([h, 2h]).sum(0)", (lambda h, v: torch.stack([h, h * 2]).sum(0)), shape
    if kind == "pad":
        val = rng.choice([0.0, 1.0])
        return f"pad([1, 0], {val})", (lambda h, v, val=val: F.pad(h, [1, 0], value=val)), (r, c + 1)
    if kind == "cumsum":
        return "cumsum(0)", (lambda h, v: h.cumsum(0)), shape
    if kind == "index_add":
        idx = torch.tensor([rng.randrange(r + 1) for _ in range(r)])
        return f"zeros.index_add(0, {idx.tolist()}, h)", (
            lambda h, v, i=idx: torch.zeros(r + 1, c).index_add(0, i, h)), (r + 1, c)
    if kind in ("scatter", "scatter_add"):
        idx = torch.tensor([[rng.randrange(r + 1) for _ in range(c)] for _ in range(r)])
        if kind == "scatter":  # distinct targets per column (scatter's gradient is defined where they are)
            idx = torch.stack([torch.randperm(r + 1, generator=torch.Generator().manual_seed(rng.randrange(1000)))[:r]
                               for _ in range(c)], 1)
            return f"zeros.scatter(0, {idx.tolist()}, h)", (
                lambda h, v, i=idx: torch.zeros(r + 1, c).scatter(0, i, h)), (r + 1, c)
        return f"zeros.scatter_add(0, {idx.tolist()}, h)", (
            lambda h, v, i=idx: torch.zeros(r + 1, c).scatter_add(0, i, h)), (r + 1, c)
    if kind == "sum_keep":
        return "sum(1, keepdim).expand", (lambda h, v: h.sum(1, keepdim=True).expand(r, c)), shape
    if kind == "mean_keep":
        return "mean(0, keepdim).expand", (lambda h, v: h.mean(0, keepdim=True).expand(r, c)), shape
    if kind == "amax_keep":
        return "amax(1, keepdim).expand", (lambda h, v: h.amax(1, keepdim=True).expand(r, c)), shape
    if kind == "bmm":
        return "bmm(h[:, :, None], h[:, None, :]).sum(2)", (
            lambda h, v: torch.bmm(h[:, :, None], h[:, None, :]).sum(2)), shape
    if kind == "t":
        return "t()", (lambda h, v: h.t()), (c, r)
    if kind == "slice":
        k = rng.randrange(1, r)
        return f"[:{k}]", (lambda h, v, k=k: h[:k]), (k, c)
    if kind == "slice_step":
        return "[1::2]", (lambda h, v: h[1::2]), (len(range(1, r, 2)), c)
    if kind == "slice_cols":
        k = rng.randrange(1, c)
        return f"[:, {k}:]", (lambda h, v, k=k: h[:, k:]), (r, c - k)
    if kind == "select_expand":
        i = rng.randrange(r)
        return f"[{i}].expand", (lambda h, v, i=i: h[i].expand(2, c)), (2, c)
    if kind == "index":
        idx = [rng.randrange(r) for _ in range(rng.randrange(1, r + 1))]
        it = torch.tensor(idx)
        return f"[{idx}]", (lambda h, v, i=it: h[i]), (len(idx), c)
    if kind == "gather":
        idx = torch.tensor([[rng.randrange(c)] for _ in range(r)])
        return f"gather(1, {idx.tolist()})", (lambda h, v, i=idx: h.gather(1, i)), (r, 1)
    if kind in ("mm", "linear", "matmul"):
        f = {"mm": lambda h, v: h @ v, "linear": lambda h, v: F.linear(h, v),
             "matmul": lambda h, v: torch.matmul(h[None], v[None]).squeeze(0)}[kind]
        return f"{kind}(v)", f, shape
    raise AssertionError(kind)


def _chain(rng: random.Random):
    x = data(rng, (R, C))
    steps, text = [], [f"x = {x.tolist()}"]
    start = rng.choice(["w * x", "x + w", "w * x + x"])
    text.append(f"h = {start}")
    shape: tuple = (R, C)
    for _ in range(rng.randrange(2, 7)):
        t, f, shape = _step(rng, shape)
        steps.append(f)
        text.append(t)
    tail = rng.choice(["sum", "square_mean", "first_row"])
    text.append(tail)

    def f(x, w, v):
        h = {"w * x": lambda: w * x, "x + w": lambda: x + w, "w * x + x": lambda: w * x + x}[start]()
        for s in steps:
            h = s(h, v)
        if tail == "sum":
            return h.sum()
        if tail == "square_mean":
            return h.square().mean()
        return h[0].sum()

    return x, f, "\n  ".join(text)


def _conv(rng: random.Random):
    """conv2d + relu + pooling over a NaN-framed image, cropped (or not) before the loss."""
    img = data(rng, (1, 1, 6, 6), p_bad=0.1)
    border = rng.choice([0, 1, 2])
    if border:
        img[..., :border, :] = NAN if not _FINITE[0] else 0.5
        img[..., :, :border] = rng.choice([NAN, INF]) if not _FINITE[0] else 0.25
    pool = rng.choice(["max", "avg", "none", "adaptive"])
    crop = rng.choice([0, 1, 2, 3])
    bias = rng.random() < 0.5
    text = f"img = {img.tolist()}\n  conv2d(pad=1) relu pool={pool} crop={crop} bias={bias}"

    def f(x, w, v):
        k = torch.cat([w, v]).reshape(-1)[:9].reshape(1, 1, 3, 3)
        y = F.conv2d(x, k, bias=v[0, :1] if bias else None, padding=1)
        y = torch.relu(y)
        if pool == "max":
            y = F.max_pool2d(y, 2)
        elif pool == "avg":
            y = F.avg_pool2d(y, 2)
        elif pool == "adaptive":
            y = F.adaptive_avg_pool2d(y, 3)
        n = y.shape[-1]
        lo = min(crop, n - 1)
        return y[..., lo:, lo:].square().sum()

    return img, f, text


def _attention(rng: random.Random):
    """scaled_dot_product_attention over sequences holding NaN rows that the loss drops (or keeps)."""
    seq = data(rng, (1, 1, 4, 3), p_bad=0.05)
    drop = rng.choice([1, 2])
    seq[..., 4 - drop:, :] = rng.choice([NAN, INF]) if not _FINITE[0] else 0.5
    how = rng.choice(["plain", "causal", "mask", "manual"])
    keep = rng.choice([4 - drop, 4])
    mask = torch.ones(4, 4, dtype=torch.bool).tril() if how == "mask" else None
    text = f"seq = {seq.tolist()}\n  attention {how}, keep {keep} query rows"

    def f(x, w, v):
        q = x @ v
        k = x * w[:3].sum()
        val = x + w[0]
        if how == "manual":
            s = (q @ k.transpose(-1, -2)) / 3 ** 0.5
            o = s.softmax(-1) @ val
        else:
            o = F.scaled_dot_product_attention(q, k, val, attn_mask=mask, is_causal=how == "causal")
        return o[..., :keep, :].square().sum()

    return seq, f, text


def program(seed: int, finite: bool = False):
    """(text, f(x, w, v) -> scalar, x, w, v) for one seed; x holds the NaN/Inf. ``finite``: every number the
    program holds is finite (NaN/Inf can still come from the domains of log, sqrt and division)."""
    rng = random.Random(seed)
    family = rng.choices(["chain", "conv", "attention"], weights=[8, 1, 1])[0]
    _FINITE[0] = finite
    try:
        x, f, text = {"chain": _chain, "conv": _conv, "attention": _attention}[family](rng)
    finally:
        _FINITE[0] = False
    w = _finite(rng, (R, C))
    v = _finite(rng, (C, C))
    return f"[{family}] {text}", f, x, w, v
