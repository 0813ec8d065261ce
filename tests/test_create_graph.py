"""Strong zeros through a second backward: the gradient of a ``create_graph=True`` pass is differentiated as the
gradient of the program without the unused values (_strong_zeros/_carry.py), checked against that program."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradwise as gw
from gradwise._strong_zeros import _carry, _engine
from gradwise._strong_zeros._planning import _graph

nan = math.nan


def _scatter(values: torch.Tensor, n: int, at: list[int]) -> torch.Tensor:
    out = torch.zeros((n, *values.shape[1:]), dtype=values.dtype)
    out[at] = values
    return out


def test_second_derivative_behind_a_guarded_log():
    """where(x > 0, log x, 0): the first pass annihilates log's 0/0 at x = 0; differentiating that gradient
    again goes through no 0/0 either (the reference: the same program on the kept entries)."""
    x = torch.tensor([1.0, 0.0, 3.0], requires_grad=True)
    (g,) = gw.grad(torch.where(x > 0, x.log(), 0.0).sum(), x, create_graph=True)
    assert torch.equal(g.detach(), torch.tensor([1.0, 0.0, 1 / 3]))
    (plain,) = torch.autograd.grad(torch.where(x > 0, x.log(), 0.0).sum(), x, create_graph=True)
    assert torch.autograd.grad(plain.sum(), x)[0].isnan().any()  # what PyTorch gives
    kept = x.detach()[[0, 2]].requires_grad_()
    (gk,) = torch.autograd.grad(kept.log().sum(), kept, create_graph=True)
    (want,) = torch.autograd.grad(gk.sum(), kept)
    (got,) = gw.grad(g.sum(), x)
    torch.testing.assert_close(got, _scatter(want, 3, [0, 2]))


@pytest.mark.parametrize("path", ["auto", "forced"])
def test_gradient_penalty_with_nan_padding_rows_sliced(path, monkeypatch):
    """A WGAN-GP style penalty on a critic whose batch holds NaN padding rows it slices away: the penalty's
    gradient with respect to the weights equals the one of the batch without the padding."""
    if path == "forced":
        monkeypatch.setattr(_engine, "_plan", lambda *args, **kwargs: "strong")
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    padded = torch.cat([x, torch.full((3, 4), nan, dtype=torch.float64)]).requires_grad_()
    params = list(critic.parameters())

    def penalty(inp, keep):
        (g,) = gw.grad(critic(inp)[:keep].sum(), inp, create_graph=True)
        return (g[:keep].norm(dim=1) - 1).pow(2).mean()

    params = params[:3]  # the last bias does not move the input gradient
    want = torch.autograd.grad(penalty(x.clone().requires_grad_(), 5), params)
    plain = torch.autograd.grad(_plain_penalty(critic, padded, 5), params)
    assert not all(p.isfinite().all() for p in plain)  # PyTorch: the padding's 0 x NaN in the second pass
    got = gw.grad(penalty(padded, 5), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def _plain_penalty(critic, inp, keep):
    (g,) = torch.autograd.grad(critic(inp)[:keep].sum(), inp, create_graph=True)
    return (g[:keep].norm(dim=1) - 1).pow(2).mean()


def test_finite_second_order_gradients_are_pytorchs():
    """On finite data the masks change nothing (a structural zero's derivative is 0 either way): Hessian-vector
    products through a forced strong first pass equal PyTorch's, up to the sign of a zero."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)

    def first(grad):
        return grad(torch.relu(x @ w)[:4].pow(3).sum(), (x, w), create_graph=True)

    want = torch.autograd.grad(sum(g.sum() for g in first(torch.autograd.grad)), (x, w))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_engine, "_plan", lambda *args, **kwargs: "strong")
        gs = first(gw.grad)
    assert _carry.CARRIED  # the first pass hooked tensors with structural zeros (x's padding rows 4, 5)
    got = gw.grad(sum(g.sum() for g in gs), (x, w))
    for g, r in zip(got, want, strict=True):
        assert torch.equal(g, r)


def test_carried_hooks_die_with_their_graph():
    """The hooks live as long as the first-order graph (its nodes hold them): once it is gone, later backwards
    plan as before."""
    import gc

    x = torch.tensor([1.0, 0.0, 3.0], requires_grad=True)
    (g,) = gw.grad(torch.where(x > 0, x.log(), 0.0).sum(), x, create_graph=True)
    total = g.sum()
    del g  # the gradient's Python object alone: its node (and hook) lives on in total's graph
    gc.collect()
    assert _carry.CARRIED and _carry.reaches(_graph([total.grad_fn]).nodes)
    del total
    gc.collect()
    assert not _carry.CARRIED


def test_an_undefined_gradient_passes_the_hook():
    """A tensor hook is called with None where the engine has no gradient for the tensor: it stays None."""
    hook = _carry._masking(torch.tensor([True, False]))
    assert hook(None) is None
    assert torch.equal(hook(torch.tensor([2.0, nan])), torch.tensor([2.0, 0.0]))


@pytest.mark.parametrize("depth", [1, 2])
def test_a_penalty_on_weight_gradients_with_padding_rows(depth):
    """sum(g^2) of the weight gradients of (tanh(x W^T) [V^T])[:4].pow(2).sum(), rows 4-5 of x NaN: the second
    backward differentiates first-pass tensors whose zeros are structural (a slice's backward), both as
    sensitivities (hooked) and as values the new graph saved (mm saves one operand for the other's gradient): it
    equals the program on the 4 kept rows (it was NaN: the tensors died before being hooked, and saved values'
    zeros were taken as computed)."""
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64)
    x[4:] = math.nan
    w0, v0 = torch.randn(3, 5, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)

    def penalty(data, grad):
        w, v = w0.clone().requires_grad_(), v0.clone().requires_grad_()
        h = torch.tanh(data @ w.T)
        out = (h @ v.T if depth == 2 else h)[:4].pow(2).sum()
        gs = grad(out, (w, v), create_graph=True, allow_unused=True)
        return grad(sum((g**2).sum() for g in gs if g is not None), (w, v), allow_unused=True)

    want = penalty(x[:4], torch.autograd.grad)
    got = penalty(x, gw.grad)
    for g, r in zip(got, want, strict=True):
        if r is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gram", ["mm", "bmm", "linear"])
def test_second_order_through_a_product_of_two_sensitivities(gram):
    """H = X W with a NaN padding row, loss over (H H^T)[:2, :2]: in the second pass the mm of the first pass's
    backward multiplies two tensors that both carry supports (a sensitivity and a carried first-pass value); the
    rule gave up ('two tracked operands') and the Hessian-vector product was all NaN. Reference: the program
    without the padding row; on finite data, PyTorch's bits."""
    torch.manual_seed(0)
    x = torch.randn(3, 2, dtype=torch.float64)
    w0 = torch.randn(2, 2, dtype=torch.float64)
    prod = {"mm": lambda h: h @ h.t(), "bmm": lambda h: torch.bmm(h[None], h.t()[None])[0],
            "linear": lambda h: torch.nn.functional.linear(h, h)}[gram]

    def run(x, grad):
        w = w0.clone().requires_grad_()
        loss = prod(x @ w)[:2, :2].pow(2).sum()
        (g,) = grad(loss, w, create_graph=True)
        return grad(g.pow(2).sum(), w)[0]

    padded = x.clone()
    padded[2] = float("nan")
    torch.testing.assert_close(run(padded, gw.grad), run(x[:2], torch.autograd.grad), rtol=1e-12, atol=1e-9)
    assert torch.equal(run(x, gw.grad), run(x, torch.autograd.grad))


@pytest.mark.parametrize("write", ["add_", "fill_", "t_"])
def test_a_gradient_written_after_its_pass_carries_no_stale_zeros(write):
    """The structural zeros of a create_graph gradient are carried to later passes (as values their graphs may
    save). Written in place afterwards (gx.add_(1) under no_grad), those zeros are gone: a later backward that
    reads gx must get PyTorch's finite gradient (it got 0 where the old zeros were), and a shape change (t_())
    crashed every later strong backward in the process."""
    lin = nn.Linear(3, 2).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    x[4:] = nan
    x.requires_grad_()
    (gx,) = gw.grad(lin(x)[:4].pow(2).sum(), x, create_graph=True)
    with torch.no_grad():
        {"add_": lambda: gx.add_(1.0), "fill_": lambda: gx.fill_(2.0), "t_": lambda: gx.t_()}[write]()
    v = torch.randn(gx.shape, dtype=torch.float64, requires_grad=True)
    loss = (gx.detach() * v).sum()
    (want,) = torch.autograd.grad(loss, v, retain_graph=True)
    assert torch.equal(gw.grad(loss, v)[0], want)
    y = torch.randn(6, 3, dtype=torch.float64)
    y[3:] = nan  # an unrelated strong backward afterwards
    (gw_,) = gw.grad(lin(y)[:3].sum(), lin.weight)
    (ref,) = torch.autograd.grad(lin(y[:3]).sum(), lin.weight)
    torch.testing.assert_close(gw_, ref)


def test_forward_over_reverse_hessian_vector_products():
    """A forward-mode dual through a strong backward (PyTorch's forward-over-reverse HVP): the forward-AD
    formulas run torch._refs code that makes meta tensors inside the backward, and a support recorded for one
    crashed the pass ('item() on meta tensors'), on finite data too. Finite: PyTorch's, bitwise; log only on the
    kept entries: the reference is the same program on those entries."""
    import torch.autograd.forward_ad as fwAD

    x = torch.tensor([1.5, 0.3, -1.0, 0.0, 2.0], dtype=torch.float64)
    v = torch.ones(5, dtype=torch.float64)

    def hvp(ctx, f):
        with ctx, fwAD.dual_level():
            xd = fwAD.make_dual(x.clone().requires_grad_(), v)
            (g,) = torch.autograd.grad(f(xd), xd)
            return fwAD.unpack_dual(g)

    finite = lambda xd: (xd.sin() * xd)[torch.tensor([0, 1, 4])].sum()
    plain, strong = hvp(torch.enable_grad(), finite), hvp(gw.strong_zeros(), finite)
    assert torch.equal(plain.primal, strong.primal) and torch.equal(plain.tangent, strong.tangent)
    got = hvp(gw.strong_zeros(), lambda xd: (xd * xd.log())[xd > 0].sum())
    kept = x[x > 0]
    with fwAD.dual_level():
        kd = fwAD.make_dual(kept.clone().requires_grad_(), torch.ones_like(kept))
        (gk,) = torch.autograd.grad((kd * kd.log()).sum(), kd)
        want = fwAD.unpack_dual(gk)
    torch.testing.assert_close(got.primal[x > 0], want.primal)
    torch.testing.assert_close(got.tangent[x > 0], want.tangent)
    assert torch.equal(got.tangent[x <= 0], torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("act", ["tanh", "relu", "identity"])
@pytest.mark.parametrize("second", ["hvp", "weight-penalty"])
def test_second_order_through_two_convolutions_over_a_cropped_nan_border(act, second):
    """Two conv layers, rows 6.. of the image NaN and the output cropped to rows that read rows 0..3 only. The
    double backward of a convolution runs aten.convolution on a sensitivity and a value, which had no rule: the
    first layer's Hessian-vector product and weight-gradient penalty were all NaN (with an OpaqueBackwardWarning).
    The reference: the same program on rows 0..3. Finite images: PyTorch's, bitwise; a used NaN stays."""
    torch.manual_seed(1)
    c1 = nn.Conv2d(2, 3, 3, padding=1).double()
    c2 = nn.Conv2d(3, 2, 3, padding=1).double()
    a = {"tanh": torch.tanh, "relu": torch.relu, "identity": lambda t: t}[act]
    f = lambda x: c2(a(c1(x)))[..., :2, :].pow(2).sum()
    params = [c1.weight, c1.bias, c2.weight]

    def run(x, strong):
        with gw.strong_zeros() if strong else torch.enable_grad():
            gs = torch.autograd.grad(f(x), params, create_graph=True)
            total = sum(g.pow(2).sum() if second == "weight-penalty" else g.sum() for g in gs)
            return torch.autograd.grad(total, params)

    img = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    bad = img.clone()
    bad[..., 6:, :] = nan
    for got, want in zip(run(bad, True), run(img[..., :4, :], False), strict=True):
        torch.testing.assert_close(got, want)
    for got, want in zip(run(img, True), run(img, False), strict=True):
        assert torch.equal(got, want)
    used = img.clone()
    used[..., 1, 1] = nan  # read by the kept rows
    assert run(used, True)[0].isnan().any()
