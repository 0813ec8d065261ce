"""Strong zeros through fused backwards that a hunt over real programs found without a rule, float64.

Every case compares gw.grad (and gw.backward, and loss.backward() under gw.strong_zeros()) with the gradient of
the same program with the unused values deleted (the discarded sample, channel or unit removed before the op),
checks that plain PyTorch is contaminated there, and has a control whose NaN is used (it must stay NaN):

- the margin losses (multi_margin_loss, multilabel_margin_loss) with reduction='none': a NaN sample's loss
  dropped by indexing (pytorch/pytorch#64305 / #121416: losses per element, missing samples masked after);
- weight normalisation (nn.utils.parametrizations.weight_norm) with a pruned, all-zero unit: its norm 0 makes
  0/0 in its normalised weight, whose output the loss never reads (a pruned filter or a sliced-off class);
- a convolution whose weight is not a leaf (weight_norm, a hand-written filter normalisation), an output channel
  discarded: its filters' gradient is a structural zero that meets the upstream NaN;
- F.interpolate(mode="lanczos", antialias=True) over a batch with a NaN image, sliced away;
- a 2-norm of an all-zero slice (linalg.vector_norm, torch.norm, norm_except_dim and weight_norm over dim 1, dist):
  discarded, the deleted program's gradient; read, PyTorch's NaN (the norm's masked_fill fills a value).
"""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwise as gw
from gradwise._strong_zeros import _engine

nan = float("nan")
f64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grads(how: str, loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    if how == "grad":
        return list(gw.grad(loss, inputs))
    for t in inputs:
        t.grad = None
    if how == "backward":
        gw.backward(loss, inputs=inputs)
    else:
        with gw.strong_zeros():
            loss.backward(inputs=inputs)
    return [t.grad for t in inputs]


def _contaminated(loss: torch.Tensor, inputs: list[torch.Tensor]) -> bool:
    plain = torch.autograd.grad(loss, inputs, retain_graph=True)
    return any(not g.isfinite().all() for g in plain)


def _check(loss: torch.Tensor, inputs: list[torch.Tensor], expected: list[torch.Tensor], how: str) -> None:
    assert loss.isfinite()
    assert _contaminated(loss, inputs), "plain PyTorch is contaminated"
    for g, e in zip(_grads(how, loss, inputs), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


HOWS = ["grad", "backward", "context"]


# ---- margin losses, reduction='none', a NaN sample dropped ------------------------------------------------

def _margin(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=f64)
    return {
        "multi_margin": lambda z, t: F.multi_margin_loss(z, t, reduction="none"),
        "multi_margin_p2_weight": lambda z, t: F.multi_margin_loss(z, t, p=2, margin=0.5, weight=weight,
                                                                  reduction="none"),
        "multilabel_margin": lambda z, t: F.multilabel_margin_loss(z, t, reduction="none"),
    }[kind]


def _margin_case(kind: str, keep_nan: bool = False, bad: float = nan):
    x = torch.randn(3, 4, generator=_gen(0), dtype=f64)
    x[1] = bad  # a missing sample
    x.requires_grad_()
    scale = torch.tensor([0.7, 0.6], dtype=f64, requires_grad=True)  # a shared parameter the NaN row meets
    multi = kind.startswith("multi_margin")
    target = torch.tensor([0, 1, 2]) if multi else torch.tensor([[0, 2, -1, 0], [1, -1, 0, 0], [3, 0, -1, 0]])
    loss_fn = _margin(kind)
    rows = [0, 1, 2] if keep_nan else [0, 2]
    loss = loss_fn(x * scale.sum(), target)[rows].square().sum()
    x0 = x.detach()[rows].clone().requires_grad_()
    ref = loss_fn(x0 * scale.sum(), target[rows]).square().sum()
    gx, gs = torch.autograd.grad(ref, (x0, scale))
    expected_x = torch.zeros_like(x)
    expected_x[rows] = gx
    return loss, [x, scale], [expected_x, gs]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("kind", ["multi_margin", "multi_margin_p2_weight", "multilabel_margin"])
def test_margin_loss_nan_sample_dropped(kind, how):
    loss, inputs, expected = _margin_case(kind, keep_nan=False)
    _check(loss, inputs, expected, how)


@pytest.mark.parametrize("kind", ["multi_margin", "multilabel_margin"])
def test_margin_loss_nan_sample_used_stays(kind):
    """Control: the NaN sample's loss is kept, so the shared parameter's gradient is NaN."""
    loss, inputs, _ = _margin_case(kind, keep_nan=True)
    assert not gw.grad(loss, inputs)[1].isfinite().all()


# ---- weight normalisation with a pruned unit, and convolutions whose weight is not a leaf ------------------

def _pruned_linear(bad: float = 0.0):
    torch.manual_seed(0)
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(3, 4).double())
    with torch.no_grad():
        layer.parametrizations.weight.original1[2] = bad  # a pruned unit: w = g * 0 / 0
    x = torch.randn(5, 3, generator=_gen(1), dtype=f64)
    keep = [0, 1, 3]
    params = [layer.parametrizations.weight.original0, layer.parametrizations.weight.original1, layer.bias]
    loss = layer(x)[:, keep].square().sum()
    g, v, b = (p.detach()[keep].clone().requires_grad_() for p in params)
    ref = F.linear(x, torch._weight_norm(v, g, 0), b).square().sum()
    return loss, params, _scatter_rows(torch.autograd.grad(ref, (g, v, b)), params, keep)


def _pruned_conv1d(bad: float = 0.0):
    torch.manual_seed(0)
    conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(2, 3, 3).double())
    with torch.no_grad():
        conv.parametrizations.weight.original1[1] = bad  # a pruned filter
    x = torch.randn(2, 2, 8, generator=_gen(2), dtype=f64)
    keep = [0, 2]
    params = [conv.parametrizations.weight.original0, conv.parametrizations.weight.original1, conv.bias]
    used = torch.tensor([True, False, True])[:, None]
    loss = torch.where(used, conv(x), 0.0).square().sum()  # the pruned channel masked out
    g, v, b = (p.detach()[keep].clone().requires_grad_() for p in params)
    ref = F.conv1d(x, torch._weight_norm(v, g, 0), b).square().sum()
    return loss, params, _scatter_rows(torch.autograd.grad(ref, (g, v, b)), params, keep)


def _normalised_filters(v: torch.Tensor, channel_dim: int = 0) -> torch.Tensor:
    """Each output channel's filter scaled to unit norm by hand (x / ||x||: 0/0 for an all-zero filter)."""
    dims = [d for d in range(v.dim()) if d != channel_dim]
    return v / v.square().sum(dims, keepdim=True).sqrt()


def _grouped_conv2d(bad: float = 0.0):
    v = torch.randn(4, 2, 3, 3, generator=_gen(3), dtype=f64)
    v[1] = bad  # a dead filter of group 0
    v.requires_grad_()
    x = torch.randn(2, 4, 5, 5, generator=_gen(4), dtype=f64)
    bias = torch.randn(4, generator=_gen(5), dtype=f64, requires_grad=True)
    keep = [0, 2, 3]
    loss = F.conv2d(x, _normalised_filters(v), bias, stride=2, padding=1, groups=2)[:, keep].square().sum()
    v0, b0 = v.detach()[keep].clone().requires_grad_(), bias.detach()[keep].clone().requires_grad_()
    # the same program with channel 1 deleted: group 0 keeps filter 0, group 1 both of its filters
    out0 = F.conv2d(x[:, :2], _normalised_filters(v0[:1]), b0[:1], stride=2, padding=1)
    out1 = F.conv2d(x[:, 2:], _normalised_filters(v0[1:]), b0[1:], stride=2, padding=1)
    ref = out0.square().sum() + out1.square().sum()
    return loss, [v, bias], _scatter_rows(torch.autograd.grad(ref, (v0, b0)), [v, bias], keep)


def _grouped_conv_transpose2d(bad: float = 0.0):
    v = torch.randn(4, 2, 2, 2, generator=_gen(6), dtype=f64)  # (C_in, C_out / groups, k, k), groups 2: C_out 4
    v[:, 1] = bad  # output channels 1 and 3 (position 1 of each group) dead: 0/0 in their normalisation
    v.requires_grad_()
    x = torch.randn(2, 4, 3, 3, generator=_gen(7), dtype=f64)
    keep = [0, 2]
    loss = F.conv_transpose2d(x, _normalised_filters(v, 1), stride=2, groups=2)[:, keep].square().sum()
    v0 = v.detach()[:, :1].clone().requires_grad_()
    ref = F.conv_transpose2d(x, _normalised_filters(v0, 1), stride=2, groups=2).square().sum()
    (g,) = torch.autograd.grad(ref, v0)
    expected = torch.zeros_like(v)
    expected[:, :1] = g
    return loss, [v], [expected]


def _sqrt_parametrised_conv1d(bad: float = 0.0):
    """A positive weight parametrised as sqrt(v), one filter all zero: sqrt's derivative there is infinite (no NaN
    is saved anywhere: the plan must see that the discarded channel's zeros reach it through the convolution)."""
    v = torch.rand(3, 2, 3, generator=_gen(9), dtype=f64)
    v[1] = bad
    v.requires_grad_()
    x = torch.randn(2, 2, 6, generator=_gen(10), dtype=f64)
    keep = [0, 2]
    loss = F.conv1d(x, v.sqrt())[:, keep].square().sum()
    v0 = v.detach()[keep].clone().requires_grad_()
    ref = F.conv1d(x, v0.sqrt()).square().sum()
    return loss, [v], _scatter_rows(torch.autograd.grad(ref, (v0,)), [v], keep)


def _scatter_rows(grads, params, keep) -> list[torch.Tensor]:
    out = []
    for g, p in zip(grads, params, strict=True):
        full = torch.zeros_like(p)
        full[keep] = g
        out.append(full)
    return out


CHANNELS = {"weight-norm-linear-pruned-unit": _pruned_linear, "weight-norm-conv1d-pruned-filter": _pruned_conv1d,
            "conv2d-groups-stride-dead-filter": _grouped_conv2d,
            "conv-transpose2d-groups-dead-filters": _grouped_conv_transpose2d,
            "sqrt-parametrised-conv1d-zero-filter": _sqrt_parametrised_conv1d}


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("name", sorted(CHANNELS))
def test_discarded_unit_of_a_derived_weight(name, how):
    loss, params, expected = CHANNELS[name]()
    _check(loss, params, expected, how)


def test_discarded_unit_used_stays():
    """Control: the pruned unit's output is in the loss: its NaN reaches the gradients."""
    torch.manual_seed(0)
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(3, 4).double())
    with torch.no_grad():
        layer.parametrizations.weight.original1[2] = 0.0
    params = [layer.parametrizations.weight.original0, layer.parametrizations.weight.original1]
    loss = layer(torch.randn(5, 3, generator=_gen(1), dtype=f64)).square().sum()
    assert all(not g.isfinite().all() for g in gw.grad(loss, params))


def test_gradient_penalty_through_a_discarded_filter():
    """create_graph=True (an input-gradient penalty, WGAN-GP style) through a convolution whose hand-normalised
    filter 1 is all zero and whose channel 1 is discarded: the filter's first and second order gradients are
    structural zeros, the rest equals the program without that channel."""
    v = torch.randn(3, 2, 3, generator=_gen(11), dtype=f64)
    v[1] = 0.0
    v.requires_grad_()
    x = torch.randn(2, 2, 7, generator=_gen(12), dtype=f64, requires_grad=True)
    keep = [0, 2]
    loss = F.conv1d(x, _normalised_filters(v))[:, keep].square().sum()
    gx, gv = gw.grad(loss, (x, v), create_graph=True)
    got = gw.grad(gx.square().sum(), (x, v))
    v0, x0 = v.detach()[keep].clone().requires_grad_(), x.detach().clone().requires_grad_()
    ref = F.conv1d(x0, _normalised_filters(v0)).square().sum()
    gx0, gv0 = torch.autograd.grad(ref, (x0, v0), create_graph=True)
    expected = torch.autograd.grad(gx0.square().sum(), (x0, v0))
    torch.testing.assert_close(gv.detach(), _scatter_rows([gv0.detach()], [v], keep)[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], _scatter_rows([expected[1]], [v], keep)[0], rtol=1e-12, atol=1e-12)


# ---- lanczos resampling -------------------------------------------------------------------------------------

def test_lanczos_resize_nan_image_sliced():
    x = torch.randn(3, 2, 6, 6, generator=_gen(8), dtype=f64)
    x[1] = nan
    x.requires_grad_()
    scale = torch.tensor([0.3, 0.9], dtype=f64, requires_grad=True)

    def resize(t):
        return F.interpolate(t * scale.sum(), size=4, mode="lanczos", antialias=True)

    loss = resize(x)[[0, 2]].square().sum()
    x0 = x.detach()[[0, 2]].clone().requires_grad_()
    gx, gs = torch.autograd.grad(resize(x0).square().sum(), (x0, scale))
    expected = torch.zeros_like(x)
    expected[[0, 2]] = gx
    _check(loss, [x, scale], [expected, gs], "grad")


# ---- the rules keep PyTorch's bits on finite data ---------------------------------------------------------

FINITE = {
    "multi_margin": lambda: _margin_case("multi_margin", bad=0.25),
    "multilabel_margin": lambda: _margin_case("multilabel_margin", bad=0.25),
    "weight-norm-conv1d": lambda: _pruned_conv1d(bad=0.25),
    "conv2d-groups": lambda: _grouped_conv2d(bad=0.25),
    "conv-transpose2d-groups": lambda: _grouped_conv_transpose2d(bad=0.25),
    "sqrt-parametrised-conv1d": lambda: _sqrt_parametrised_conv1d(bad=0.25),
}


@pytest.mark.parametrize("name", sorted(FINITE))
def test_strong_pass_on_finite_data_is_pytorch_bitwise(name, monkeypatch):
    """The same programs with finite values where the NaN or the pruned zeros were, forced through the strong
    pass (a channel or sample still discarded): every gradient is PyTorch's, bit for bit."""
    loss, inputs, _ = FINITE[name]()
    plain = torch.autograd.grad(loss, inputs)
    monkeypatch.setattr(_engine, "_plan", lambda *a: "strong")
    loss, inputs, _ = FINITE[name]()
    for g, e in zip(gw.grad(loss, inputs), plain, strict=True):
        assert torch.equal(g, e)


# ---- a 2-norm of an all-zero slice: its backward's masked_fill is PyTorch's subgradient 0, a value -----------
# g / ||v|| over slices of v along dim 1, slice 0 all zero: the norm is 0 there, g / 0 = inf. Read, the gradient at
# that slice is a genuine singular point (PyTorch: NaN, and gw gave 0 for v, or inf where v also multiplies, as in
# weight_norm's v * g / ||v||); discarded, it is the gradient of the program with the slice deleted.

def _zero_slice_norms() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    zeros = torch.zeros(2, 2, dtype=f64)
    return {  # v (2, 3, 2) -> the norm of each slice v[:, i], shape (3,)
        "linalg.vector_norm": lambda v: torch.linalg.vector_norm(v, dim=(0, 2)),
        "torch.norm": lambda v: torch.norm(v, dim=(0, 2)),
        "Tensor.norm(p=2)": lambda v: v.norm(p=2, dim=(0, 2)),
        "norm_except_dim": lambda v: torch.norm_except_dim(v, 2, 1).flatten(),
        "linalg.norm fro": lambda v: torch.linalg.norm(v.transpose(0, 1), dim=(1, 2)),
        "dist": lambda v: torch.stack([torch.dist(v[:, i], zeros) for i in range(v.shape[1])]),
    }


def _zero_slice_programs() -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    # (v, g) -> one value per slice of v along dim 1, shape (3,)
    def over(norm):
        return lambda v, g: g / norm(v)

    progs = {f"g / {name}": over(norm) for name, norm in _zero_slice_norms().items()}
    progs["_weight_norm(dim=1)"] = lambda v, g: torch._weight_norm(v, g.view(1, -1, 1), 1).sum((0, 2))
    progs["v * g / torch.norm"] = lambda v, g: (v * (g.view(1, -1, 1) / torch.norm(v, dim=(0, 2), keepdim=True))
                                                ).sum((0, 2))
    return progs


def _zero_slice_case(seed: int = 11):
    v = torch.randn(2, 3, 2, generator=_gen(seed), dtype=f64)
    v[:, 0] = 0.0
    g = torch.tensor([1.5, 2.0, 0.5], dtype=f64)
    return v, g


@pytest.mark.parametrize("name", sorted(_zero_slice_programs()))
def test_norm_of_a_zero_slice_read_stays_pytorchs_nan(name):
    """Read: PyTorch's NaN at the zero slice (a genuine singular point), PyTorch's bits elsewhere. gw gave 0 (g / norm)
    or inf (v * g / norm, weight_norm over dim 1) there: the masked_fill of norm's formula fills a value, not a
    discarded sensitivity."""
    prog = _zero_slice_programs()[name]
    v0, g0 = _zero_slice_case()
    weight = torch.tensor([0.3, -1.2, 0.7], dtype=f64)
    v, g = v0.clone().requires_grad_(), g0.clone().requires_grad_()
    loss = (prog(v, g) * weight).sum()
    expected = torch.autograd.grad(loss, (v, g), retain_graph=True)
    assert bool(expected[0][:, 0].isnan().all())  # the premise: PyTorch's NaN at the slice
    for got, want in zip(gw.grad(loss, (v, g)), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", sorted(_zero_slice_programs()))
def test_norm_of_a_zero_slice_discarded_is_the_deleted_program(name):
    """Discarded (only slices 1 and 2 reach the loss): 0 at the zero slice, the deleted program's gradient elsewhere."""
    prog = _zero_slice_programs()[name]
    v0, g0 = _zero_slice_case()
    weight = torch.tensor([-1.2, 0.7], dtype=f64)
    v, g = v0.clone().requires_grad_(), g0.clone().requires_grad_()
    loss = (prog(v, g)[1:] * weight).sum()
    assert _contaminated(loss, [v, g])
    vd, gd = v0[:, 1:].clone().requires_grad_(), g0[1:].clone().requires_grad_()
    ref_v, ref_g = torch.autograd.grad((prog(vd, gd) * weight).sum(), (vd, gd))
    got_v, got_g = gw.grad(loss, (v, g))
    assert torch.equal(got_v[:, 0], torch.zeros(2, 2, dtype=f64)) and got_g[0] == 0
    torch.testing.assert_close(got_v[:, 1:], ref_v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_g[1:], ref_g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("discarded", [False, True], ids=["read", "discarded"])
@pytest.mark.parametrize("name", ["g / linalg.vector_norm", "g / torch.norm", "g / dist", "v * g / torch.norm"])
def test_norm_of_a_zero_slice_compiled_is_the_eager_answer(name, discarded):
    """The same programs compiled (aot_eager): the backward runs op by op from AOTAutograd's graph, where no autograd
    node names the norm's formula; its fill is found by its form (``_graph_forms._guarded_division``). Read, gw gave
    0 at the zero slice where PyTorch gives NaN (silent); discarded, the deleted program's 0 stays."""
    import warnings

    torch._dynamo.reset()
    prog = _zero_slice_programs()[name]
    v0, g0 = _zero_slice_case()
    weight = torch.tensor([0.3, -1.2, 0.7], dtype=f64)
    keep = slice(1, None) if discarded else slice(None)

    def loss_of(v, g):
        return (prog(v, g)[keep] * weight[keep]).sum()

    v, g = v0.clone().requires_grad_(), g0.clone().requires_grad_()
    want = gw.grad(loss_of(v, g), (v, g))  # eager, checked against PyTorch and the deleted program above
    compiled = torch.compile(loss_of, backend="aot_eager", fullgraph=False)
    v, g = v0.clone().requires_grad_(), g0.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gw.GradwiseWarning)  # (what the compiled backward runs is said elsewhere)
        got = gw.grad(compiled(v, g), (v, g))
    assert bool(want[0][:, 0].isnan().all()) != discarded  # the premise: NaN where read, 0 where discarded
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_weight_norm_dim1_conv_transpose_dead_output_channel():
    """nn.utils.parametrizations.weight_norm(dim=1) of a ConvTranspose1d (dim 1: its output channels), one output
    channel's filters all zero: discarded, the deleted program's gradient; read (loss NaN), PyTorch's gradient."""
    torch.manual_seed(0)
    conv = nn.utils.parametrizations.weight_norm(nn.ConvTranspose1d(2, 3, 3).double(), dim=1)
    with torch.no_grad():
        conv.parametrizations.weight.original1[:, 1] = 0.0
    x = torch.randn(2, 2, 5, generator=_gen(12), dtype=f64)
    params = [conv.parametrizations.weight.original0, conv.parametrizations.weight.original1, conv.bias]
    keep = [0, 2]
    loss = conv(x)[:, keep].square().sum()
    g, v, b = (p.detach().clone() for p in params)
    g, v, b = g[:, keep].requires_grad_(), v[:, keep].requires_grad_(), b[keep].requires_grad_()
    ref = F.conv_transpose1d(x, torch._weight_norm(v, g, 1), b).square().sum()
    rg, rv, rb = torch.autograd.grad(ref, (g, v, b))
    got = gw.grad(loss, params)
    for t, r, index in ((got[0], rg, (slice(None), keep)), (got[1], rv, (slice(None), keep)), (got[2], rb, keep)):
        torch.testing.assert_close(t[index], r, rtol=1e-12, atol=1e-12)
    assert not got[0][:, 1].any() and not got[1][:, 1].any() and got[2][1] == 0
    read = conv(x).square().sum()  # control: the dead channel read (NaN in the forward already)
    expected = torch.autograd.grad(read, params, retain_graph=True)
    for t, e in zip(gw.grad(read, params), expected, strict=True):
        torch.testing.assert_close(t, e, rtol=0, atol=0, equal_nan=True)


def test_trace_of_a_read_zero_norm_finds_no_contamination():
    """The trace classifies through the same strong-zero pass: 1 / ||v|| of a zero row, read, was reported as
    contamination ("gw.strong_zeros() removes it") beside the genuine Inf; it is genuine only."""
    v = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=f64, requires_grad=True)
    with gw.trace() as report:
        (1.0 / torch.linalg.vector_norm(v, dim=1)).sum().backward()
    kinds = sorted(f.kind for f in report.findings)
    assert "contamination" not in kinds and "inf" in kinds, str(report)
