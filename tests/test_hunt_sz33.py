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
    want = [torch.zeros_like(p) for p in params]
    for b in range(2):
        n = int(lens[b])
        for acc, g in zip(want, torch.autograd.grad(loss_of(x[b:b + 1, :n], lens[b:b + 1], slice(b, b + 1)), params),
                          strict=True):
            acc += g
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    # controls: finite data is PyTorch's bits; a dropped weight of a kept key is a value (its NaN stays)
    x[-1, 3:] = 1.0
    for g, p in zip(gw.grad(loss_of(x, lens), params), torch.autograd.grad(loss_of(x, lens), params), strict=True):
        assert torch.equal(g, p)
