"""Hunt (session 33, sz33): strong zeros through gradient hooks that compute outside torch ops, and through what
real training code discards. References are independent of gradwise: the same program with the unused values
deleted (float64), or plain PyTorch where the value is the user's.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)

D = torch.float64
nan = float("nan")


# -- gradient hooks outside torch ops --------------------------------------------------------------------------------
# A hook through NumPy or Python lists returned a tensor no op under the mode made: it counted as fully supported, the
# padding row's zeros met the padding's NaN in the weight gradient's mm, and w.grad was NaN with no warning.
TENSOR_HOOKS = {
    "numpy, scaled": lambda g: torch.from_numpy(g.numpy() * 2),
    "tolist": lambda g: torch.tensor(g.tolist(), dtype=g.dtype),
    "numpy, a copy then a torch op": lambda g: torch.from_numpy(g.numpy().copy()).clamp(-1, 1),
    "torch ops (control)": lambda g: g * 2,
}


def _padded(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(5, 3, dtype=D, generator=gen)
    w = torch.randn(3, 4, dtype=D, generator=gen)
    return x, w


def _tensor_hook_program(x, w, hook):
    w = w.clone().requires_grad_()
    h = x @ w
    h.register_hook(hook)
    h[:3].tanh().sum().backward()  # (rows past 3: padding)
    return w.grad


@pytest.mark.parametrize("name", list(TENSOR_HOOKS))
def test_a_tensor_hook_outside_torch_ops_keeps_the_paddings_zeros(name):
    gen = torch.Generator().manual_seed(0)
    x, w = _padded(gen)
    xn = x.clone()
    xn[3:] = nan
    with gw.strong_zeros():
        got = _tensor_hook_program(xn, w, TENSOR_HOOKS[name])
    ref = _tensor_hook_program(x[:3], w, TENSOR_HOOKS[name])  # the padding rows deleted
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(TENSOR_HOOKS))
def test_a_tensor_hook_outside_torch_ops_on_finite_data_is_pytorchs_bits(name):
    gen = torch.Generator().manual_seed(1)
    x, w = _padded(gen)
    with gw.strong_zeros():
        got = _tensor_hook_program(x, w, TENSOR_HOOKS[name])
    assert torch.equal(got, _tensor_hook_program(x, w, TENSOR_HOOKS[name]))


def test_a_tensor_hook_that_puts_values_in_the_padding_is_named_and_its_nan_kept():
    """``g + 1`` through NumPy makes the padding rows values of the hook's own (as torch's ``g + 1`` does): the
    padding's NaN is used, and the OpaqueBackwardWarning names the hook."""
    gen = torch.Generator().manual_seed(2)
    x, w = _padded(gen)
    x[3:] = nan

    def adds_one(g):
        return torch.from_numpy(g.numpy() + 1)

    with gw.strong_zeros(), pytest.warns(gw.OpaqueBackwardWarning, match="tensor hook .*adds_one"):
        got = _tensor_hook_program(x, w, adds_one)
    assert bool(got.isnan().all())


def test_a_tensor_hook_removed_or_on_a_leaf_runs_as_before():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(3, dtype=D, generator=gen, requires_grad=True)
    seen = []
    handle = w.register_hook(lambda g: seen.append(g.clone()))
    with gw.strong_zeros():
        (w * 2)[:2].sum().backward()
    assert torch.equal(seen[0], torch.tensor([2.0, 2.0, 0.0], dtype=D))
    handle.remove()
    with gw.strong_zeros():
        (w * 2).sum().backward()
    assert len(seen) == 1 and torch.equal(w.grad, torch.tensor([4.0, 4.0, 2.0], dtype=D))


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 4, bias=False, dtype=D)

    def forward(self, x):
        return self.lin(x)


MODULE_HOOKS = {
    "numpy, scaled": lambda m, gi, go: (torch.from_numpy(gi[0].numpy() * 0.5),),
    "tolist": lambda m, gi, go: (torch.tensor(gi[0].tolist(), dtype=gi[0].dtype),),
    "torch ops (control)": lambda m, gi, go: (gi[0] * 0.5,),
}


def _module_hook_program(x, w0, hook):
    torch.manual_seed(0)
    block = _Block()
    block.register_full_backward_hook(hook)
    w0 = w0.clone().requires_grad_()
    out = block(x @ w0)
    out[:3].tanh().sum().backward()
    return w0.grad, block.lin.weight.grad


@pytest.mark.parametrize("name", list(MODULE_HOOKS))
def test_a_module_backward_hook_outside_torch_ops_keeps_the_paddings_zeros(name):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, dtype=D, generator=gen)
    w0 = torch.randn(3, 3, dtype=D, generator=gen)
    xn = x.clone()
    xn[3:] = nan
    with gw.strong_zeros():
        got = _module_hook_program(xn, w0, MODULE_HOOKS[name])
    ref = _module_hook_program(x[:3], w0, MODULE_HOOKS[name])
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)
    with gw.strong_zeros():  # finite data: PyTorch's bits
        fin = _module_hook_program(x, w0, MODULE_HOOKS[name])
    for g, r in zip(fin, _module_hook_program(x, w0, MODULE_HOOKS[name]), strict=True):
        assert torch.equal(g, r)


def test_a_module_backward_hook_that_puts_values_in_the_padding_is_named():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 3, dtype=D, generator=gen)
    x[3:] = nan
    w0 = torch.randn(3, 3, dtype=D, generator=gen)
    with gw.strong_zeros(), pytest.warns(gw.OpaqueBackwardWarning, match="module's full backward hook"):
        got, _ = _module_hook_program(x, w0, lambda m, gi, go: (torch.from_numpy(gi[0].numpy() + 1),))
    assert bool(got.isnan().all())


def test_register_hook_is_still_pytorchs_to_the_user():
    t = torch.ones(2, requires_grad=True) * 1
    assert torch.Tensor.register_hook.__doc__ and "hook" in torch.Tensor.register_hook.__doc__
    handle = t.register_hook(lambda g: None)
    handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t.sum().backward()


# -- masked attention weights through dropout and views ---------------------------------------------------------------
# bmm(dropout(softmax(s)), v) (nn.MultiheadAttention in train mode with need_weights=True; hand-written) and
# bmm(a[None].reshape(...), v): the rule found the softmax only as the bmm's first edge, so a masked key's value met
# its infinite slope (sqrt of a zero padding row) with PyTorch's 0 x inf and w.grad was NaN, silently. Only the
# softmax's zeros are structural: a dropped weight is a value (`_ops/_zeros.py`, native_dropout_backward).
def _keys_padded(x, w):
    return (x @ w).pow(2).sqrt()


def _per_sequence(params, lens, loss_of_sequence) -> list:
    """The reference: each sequence's gradients with its padding deleted (``loss_of_sequence(b, its length)``),
    summed over the batch."""
    want = [torch.zeros_like(p) for p in params]
    for b in range(len(lens)):
        for acc, g in zip(want, torch.autograd.grad(loss_of_sequence(b, int(lens[b])), params), strict=True):
            acc += g
    return want


def _hand_attention(q_w, w, x, lens, drop, how):
    keep = torch.arange(x.shape[1])[None, :] < lens[:, None]
    h = _keys_padded(x, w)
    q = h @ q_w
    bias = torch.zeros(keep.shape, dtype=D).masked_fill(~keep, float("-inf"))
    a = (q @ h.transpose(1, 2) + bias[:, None, :]).softmax(-1)
    drop = drop[..., : x.shape[1], : x.shape[1]]
    if how == "dropout mask":
        a = a * drop
    elif how == "dropout mask, scaled after":
        a = (a * (drop > 0)) / 0.7
    if how == "a[None] reshaped":
        out = torch.bmm(a[:, None].reshape(-1, *a.shape[1:]), h)
    elif how == "matmul of 4-d weights":
        out = (a[:, None] @ h[:, None])[:, 0]
    else:
        out = torch.bmm(a, h)
    return torch.where(keep[..., None], out, 0.0).pow(2).sum()


def _fixed_dropout(masks: list):
    """F.dropout with the mask of the full batch (cut to the call's shape): the program and the deleted one drop
    the same weights."""
    def dropout(t, p=0.5, training=True, inplace=False):
        m = masks[0][masks[1]][..., : t.shape[-2], : t.shape[-1]]
        return t * m.reshape(t.shape) / (1 - p)
    return dropout


def _mha(mha, w, x, lens):
    keep = torch.arange(x.shape[1])[None, :] < lens[:, None]
    h = _keys_padded(x, w)
    out, _ = mha(h, h, h, key_padding_mask=~keep, need_weights=True)
    return torch.where(keep[..., None], out, 0.0).pow(2).sum()


DROPPED_ATTENTION = ["dropout mask", "dropout mask, scaled after", "a[None] reshaped", "matmul of 4-d weights",
                     "MultiheadAttention, train mode, dropout 0.3"]


@pytest.mark.parametrize("name", DROPPED_ATTENTION)
def test_masked_weights_through_dropout_and_views_give_padded_values_the_deleted_keys_zero(name, monkeypatch):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 4, dtype=D, generator=gen)
    w = torch.randn(4, 4, dtype=D, generator=gen, requires_grad=True)
    drop = (torch.rand(2, 5, 5, generator=gen) > 0.3).to(D) / 0.7
    lens = torch.tensor([5, 3])
    if name.startswith("MultiheadAttention"):
        torch.manual_seed(0)
        mha = torch.nn.MultiheadAttention(4, 2, batch_first=True, dropout=0.3).double().train()
        masks = [(torch.rand(2, 2, 5, 5, generator=gen) > 0.3).to(D), slice(None)]  # (batch, heads, L, S)
        monkeypatch.setattr(torch.nn.functional, "dropout", _fixed_dropout(masks))
        params = [w, *mha.parameters()]

        def loss_of(x, lens, b=slice(None)):
            masks[1] = b
            return _mha(mha, w, x, lens)
    else:
        q_w = torch.randn(4, 4, dtype=D, generator=gen, requires_grad=True)
        params = [w, q_w]

        def loss_of(x, lens, b=slice(None)):
            return _hand_attention(q_w, w, x, lens, drop[b], name)
    x[-1, 3:] = 0.0  # the last sequence's padding: sqrt's infinite slope there
    assert not all(bool(g.isfinite().all()) for g in torch.autograd.grad(loss_of(x, lens), params)), \
        "premise: PyTorch's 0 x inf"
    with warnings.catch_warnings():
        warnings.simplefilter("error", gw.OpaqueBackwardWarning)
        got = gw.grad(loss_of(x, lens), params)
    want = _per_sequence(params, lens, lambda b, n: loss_of(x[b:b + 1, :n], lens[b:b + 1], slice(b, b + 1)))
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    # controls: finite data is PyTorch's bits; a dropped weight of a kept key is a value (its NaN stays)
    x[-1, 3:] = 1.0
    for g, p in zip(gw.grad(loss_of(x, lens), params), torch.autograd.grad(loss_of(x, lens), params), strict=True):
        assert torch.equal(g, p)


# -- flat rows of clamp, hardtanh, threshold, max pooling and maxout reaching a nested backward ---------------------
# As relu's whole rows (tests/test_hunt_sz32.py): a reentrant checkpoint's block whose zero padding rows fall in a
# flat region ran plain, its results' rows ordinary zeros, and _Sqrt's g / (2 sqrt(x)) after it made 0/0: w.grad all
# NaN. Reference: the program with those rows deleted.
from test_hunt_sz32 import W2, _reentrant  # noqa: E402
from test_hunt_sz32 import _relu_inp as _flat_inp  # noqa: E402 (w's gradient through a block, 0/0 below it)
from test_hunt_sz32 import _relu_w_grad as _flat_w_grad  # noqa: E402

W6 = torch.linspace(0.5, 1.5, 18, dtype=D).reshape(3, 6)
F = torch.nn.functional


class _ClampByGrad(torch.autograd.Function):
    """clamp(x @ w, min=0.1), its backward by a nested torch.autograd.grad seeded with the sensitivity."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return (x @ w).clamp(min=0.1)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        with torch.enable_grad():
            xd = x.detach().requires_grad_()
            (out,) = torch.autograd.grad((xd @ w).clamp(min=0.1), xd, g)
        return out, None


FLAT_ROWS = {
    "clamp(min=0.1)": _reentrant(lambda t: (t @ W2).clamp(min=0.1)),
    "clamp_min(0.1)": _reentrant(lambda t: (t @ W2).clamp_min(0.1)),
    "clamp(0.1, 6)": _reentrant(lambda t: (t @ W2).clamp(0.1, 6)),
    "clamp, tensor min": _reentrant(lambda t: (t @ W2).clamp(min=torch.full((3,), 0.1, dtype=D))),
    "clamp(max=-0.1)": _reentrant(lambda t: (t @ W2).clamp(max=-0.1) * -1),
    "hardtanh(0, 1)": _reentrant(lambda t: F.hardtanh(t @ W2, 0.0, 1.0)),
    "relu6": _reentrant(lambda t: F.relu6(t @ W2)),
    "threshold(0.1)": _reentrant(lambda t: F.threshold(t @ W2, 0.1, 0.0)),
    "max_pool1d then relu": _reentrant(lambda t: F.relu(F.max_pool1d((t @ W2)[:, None], 1)[:, 0])),
    "max_pool2d then relu": _reentrant(lambda t: F.relu(F.max_pool2d((t @ W2)[:, None, None], (1, 1))[:, 0, 0])),
    "maxout (amax) then relu": _reentrant(lambda t: F.relu((t @ W6).view(-1, 3, 2).amax(-1))),
    "max(dim) then relu": _reentrant(lambda t: F.relu((t @ W6).view(-1, 2, 3).max(1)[0])),
    "custom backward, nested grad of clamp": lambda h: _ClampByGrad.apply(h, W2),
}


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True:UserWarning")
@pytest.mark.parametrize("name", FLAT_ROWS)
def test_flat_rows_of_clamp_and_pooling_reaching_a_nested_backward_match_the_deleted_program(name):
    block = FLAT_ROWS[name]
    want = _flat_w_grad(block, _flat_inp()[:2], strong=False)
    inp = _flat_inp()
    inp[2:] = 0.0
    assert bool(_flat_w_grad(block, inp, strong=False).isnan().all()), "premise: PyTorch's 0/0"
    with warnings.catch_warnings():
        warnings.simplefilter("error", gw.OpaqueBackwardWarning)
        got = _flat_w_grad(block, inp, strong=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True:UserWarning")
@pytest.mark.parametrize("name", FLAT_ROWS)
def test_flat_rows_controls_finite_bits_and_a_genuine_nan(name):
    block = FLAT_ROWS[name]
    assert torch.equal(_flat_w_grad(block, _flat_inp(), True), _flat_w_grad(block, _flat_inp(), False))
    inp = _flat_inp()
    inp[2:] = 0.0
    inp[0, 1] = nan
    assert bool(_flat_w_grad(block, inp, strong=False).isnan().all())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gw.OpaqueBackwardWarning)
        assert bool(_flat_w_grad(block, inp, strong=True).isnan().all())


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True:UserWarning")
@pytest.mark.parametrize("block", [_reentrant(lambda t: (t @ W2).clamp(min=0.0)),
                                   _reentrant(lambda t: (t @ W2).clamp(0.0, 6.0))], ids=["clamp(min=0)", "clamp(0, 6)"])
def test_clamp_at_its_bound_passes_the_gradient_and_keeps_pytorchs_nan(block):
    """clamp's gradient passes at the bound (x >= min): a zero row at min=0 is used, its 0/0 the program's own."""
    inp = _flat_inp()
    inp[2:] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gw.OpaqueBackwardWarning)
        got = _flat_w_grad(block, inp, strong=True)
    assert bool(got.isnan().all())


# -- attention pooling: softmax weights times values outside a bmm ----------------------------------------------------
# (softmax(s)[..., None] * h).sum(1) and einsum("bt,btd->bd", a, h) (a bmm behind permutes): h's gradient g * a met
# a masked entry's exact 0 weight with sqrt's infinite slope at a zero padding row: w.grad NaN, silently.
def _pooling(how: str, r: torch.Tensor, lens: torch.Tensor, q_w, h_w, scores_from_h: bool) -> torch.Tensor:
    keep = torch.arange(r.shape[1])[None] < lens[:, None]
    h = (r @ h_w).pow(2).sqrt()
    s = ((torch.tanh(h) if scores_from_h else r) @ q_w)[..., 0]
    s = s.masked_fill(~keep, float("-inf")) if scores_from_h else \
        s + torch.zeros(keep.shape, dtype=D).masked_fill(~keep, float("-inf"))  # (an additive bias: no maker)
    a = s.softmax(-1)
    if how == "mul then sum":
        p = (a[..., None] * h).sum(1)
    elif how == "einsum":
        p = torch.einsum("bt,btd->bd", a, h)
    else:
        p = (a[:, None] @ h)[:, 0]
    return p.pow(2).sum()


@pytest.mark.parametrize("scores_from_h", [True, False], ids=["scores from h, masked_fill", "additive bias"])
@pytest.mark.parametrize("how", ["mul then sum", "einsum", "a[:, None] @ h"])
def test_attention_pooling_gives_padded_values_the_deleted_entries_zero(how, scores_from_h):
    gen = torch.Generator().manual_seed(7)
    r = torch.randn(2, 5, 4, dtype=D, generator=gen)
    q_w = torch.randn(4, 1, dtype=D, generator=gen, requires_grad=True)
    h_w = torch.randn(4, 4, dtype=D, generator=gen, requires_grad=True)
    lens = torch.tensor([5, 3])
    params = [q_w, h_w]
    rp = r.clone()
    rp[1, 3:] = 0.0  # padding: sqrt's infinite slope there

    def loss_of(x, ls):
        return _pooling(how, x, ls, q_w, h_w, scores_from_h)

    assert not bool(torch.autograd.grad(loss_of(rp, lens), params)[1].isfinite().all()), "premise: 0 x inf"
    with warnings.catch_warnings():
        warnings.simplefilter("error", gw.OpaqueBackwardWarning)
        got = gw.grad(loss_of(rp, lens), params)
    want = _per_sequence(params, lens, lambda b, n: loss_of(r[b:b + 1, :n], lens[b:b + 1]))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    for g, p in zip(gw.grad(loss_of(r, lens), params), torch.autograd.grad(loss_of(r, lens), params), strict=True):
        assert torch.equal(g, p)  # finite data: PyTorch's bits
    rp[1, 1] = 0.0  # a kept entry's zero row: its infinite slope is used (PyTorch's NaN/Inf stays)
    plain = torch.autograd.grad(loss_of(rp, lens), params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gw.OpaqueBackwardWarning)
        got = gw.grad(loss_of(rp, lens), params)
    assert torch.equal(got[1].nan_to_num(7.0, 8.0, 9.0), plain[1].nan_to_num(7.0, 8.0, 9.0))


def test_a_tensor_hook_that_makes_nan_from_the_paddings_zeros_is_followed_on_finite_data():
    """g / g.norm(dim=-1) at a row the slice dropped is 0/0 in the hook, met by x's row in w's gradient: the data
    finite, the plan was 'plain' (it cannot see tensor hooks) and w.grad NaN, silently. A graph holding a user's
    hook on a non-leaf tensor now runs under the mode, where the division of a structural zero is one."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(5, 3, dtype=D, generator=gen)
    w0 = torch.randn(3, 4, dtype=D, generator=gen)
    v = torch.randn(4, 2, dtype=D, generator=gen)

    def w_grad(x, strong, kept=3):
        w = w0.clone().requires_grad_()
        h = x @ w
        h.register_hook(lambda g: g / g.norm(dim=-1, keepdim=True))
        loss = torch.tanh(h @ v)[:kept].sum()
        gw.backward(loss) if strong else loss.backward()
        return w.grad

    assert torch.equal(w_grad(x, True, kept=5), w_grad(x, False, kept=5))  # no zero: PyTorch's bits
    assert bool(w_grad(x, strong=False).isnan().all()), "premise: the hook's 0/0"
    torch.testing.assert_close(w_grad(x, strong=True), w_grad(x[:3], strong=False), rtol=1e-12, atol=1e-12)


def test_a_module_backward_pre_hook_outside_torch_ops_keeps_the_paddings_zeros():
    """register_full_backward_pre_hook's grad_output through NumPy (the output side's BackwardHookFunctionBackward)."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(5, 3, dtype=D, generator=gen)
    w0 = torch.randn(3, 3, dtype=D, generator=gen)

    def grads(x, strong):
        torch.manual_seed(1)
        lin = torch.nn.Linear(3, 4, dtype=D)
        lin.register_full_backward_pre_hook(lambda m, go: (torch.from_numpy(go[0].numpy() * 3),))
        w = w0.clone().requires_grad_()
        loss = lin(x @ w)[:3].tanh().sum()
        gw.backward(loss) if strong else loss.backward()
        return w.grad, lin.weight.grad, lin.bias.grad

    want = grads(x[:3], strong=False)
    x[3:] = nan
    assert bool(grads(x, strong=False)[0].isnan().all()), "premise: 0 x NaN in w's gradient"
    for g, r in zip(grads(x, strong=True), want, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)
