"""Strong zeros under torch.func transforms and batched gradients (``_strong_zeros/_transforms.py``).

Table-driven: programs (each ``f(params, x) -> scalar`` for one sample, NaN/-inf-making values only where the output
discards them) x transforms (grad, vjp, vmap(grad) per-sample gradients, vmap(vjp), jacrev, is_grads_batched).
References, each independent of the transform path:
- per sample, ``gw.grad`` in eager mode of the same program, itself checked against plain PyTorch on the program
  whose discarded values are replaced by finite ones (the same program with the unused values deleted);
- plain torch.func, bitwise, on finite data;
- controls: a NaN the output uses stays NaN (the eager gw.grad's NaN pattern), and the other samples of its batch
  keep their strong zeros.
Transforms the strong pass cannot follow (hessian, nested grad, jvp over a backward) keep PyTorch's gradient with
a PlainBackwardWarning.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)
from gradwise._strong_zeros import _contract

nan, inf = float("nan"), float("inf")
# functorch's fallback for a batching rule it lacks: torch 2.14 runs sdpa on CPU as its flash kernel, which has none
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
D = torch.float64
B = 3  # samples: 0 clean, 1 with bad values in discarded places, 2 the same plus a used NaN (controls only)


class _Square(torch.autograd.Function):
    """A custom Function with a torch-op backward (g * 2x), usable under transforms."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 2 * x


def _gen(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


_MLP = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).to(D)
_MASK = torch.tensor([True, True, False, True, False, True])
_KEYS = torch.tensor([False, False, False, False, True, True])  # padded keys/rows
_V = _gen(1, 6, 3)


def _attn(p, x):
    logits = x[:2] @ x.T
    return (logits.masked_fill(_KEYS, -inf).softmax(-1) @ _V).sum()


def _sdpa(p, x):
    q = x.unsqueeze(0)  # (1, 6, 3): rows 4, 5 padded queries (discarded)
    out = F.scaled_dot_product_attention(q, p["k"][None], p["v"][None], attn_mask=~_KEYS.expand(6, 6))
    return out[0, :4].sum()


def _nll(p, x):
    target = torch.tensor([0, 2, -1, 1, -1, 0])  # rows 2, 4 ignored
    return F.nll_loss((x @ p["w"]).log_softmax(-1), target, ignore_index=-1)


def _ctc(p, x):
    lp = (x @ p["w"]).log_softmax(-1)[:, None]  # (T=6, N=1, C=3); frames 4, 5 past the input length
    return F.ctc_loss(lp, torch.tensor([[1, 2]]), torch.tensor([4]), torch.tensor([2]))


def _layer_norm(p, x):
    return (F.layer_norm(x, (3,), p["w"], p["b"])[:4] * _V[:4]).sum()


def _linear(p, x):
    return (x @ p["w"] + p["b"])[:4].pow(2).sum()


def _module(p, x):
    return functional_call(_MLP, p, (x,))[:4].pow(2).sum()


# name -> (program, params, x of one sample (6, 3) or (6,), discarded positions, bad value there, clean value)
_ROWS = torch.tensor([False, False, False, False, True, True])
PROGRAMS = {
    "slice": (lambda p, x: x.sin()[:4].sum(), {}, (6,), _ROWS, nan, 0.5),
    "where_sqrt": (lambda p, x: torch.where(_MASK, x.abs().sqrt() * x, 0.0).sum(), {}, (6,), ~_MASK, nan, 0.5),
    "where_singular": (lambda p, x: torch.where(_MASK, x.sqrt(), 0.0).sum(), {}, (6,), ~_MASK, -1.0, 0.5),
    "masked_fill": (lambda p, x: (2 * x.log()).masked_fill(~_MASK, 0.0).sum(), {}, (6,), ~_MASK, 0.0, 0.5),
    "index": (lambda p, x: x.exp()[[0, 1, 3]].sum(), {}, (6,), torch.tensor([0, 0, 1, 0, 1, 1]).bool(), nan, 0.5),
    "gather": (lambda p, x: x.exp().gather(0, torch.tensor([3, 0, 0])).sum(), {}, (6,),
               torch.tensor([0, 1, 1, 0, 1, 1]).bool(), nan, 0.5),
    "relu_log": (lambda p, x: torch.relu(x.log()).sum(), {}, (6,), ~_MASK, 0.0, 0.5),
    "max_pool": (lambda p, x: F.max_pool1d(x.log()[None], 2).sum(), {}, (6,), torch.tensor([1, 0, 1, 0, 1, 0]).bool(),
                 0.0, 0.5),
    "softmax_mask": (_attn, {}, (6, 3), _KEYS[:, None].expand(6, 3), nan, 0.5),
    "sdpa_rows": (_sdpa, {"k": _gen(2, 6, 3), "v": _gen(3, 6, 3)}, (6, 3), _ROWS[:, None].expand(6, 3), nan, 0.5),
    "nll_ignore": (_nll, {"w": _gen(4, 3, 3)}, (6, 3), torch.tensor([0, 0, 1, 0, 1, 0]).bool()[:, None].expand(6, 3),
                   nan, 0.5),
    "ctc": (_ctc, {"w": _gen(5, 3, 3)}, (6, 3), _ROWS[:, None].expand(6, 3), nan, 0.5),
    "layer_norm": (_layer_norm, {"w": _gen(6, 3), "b": _gen(7, 3)}, (6, 3), _ROWS[:, None].expand(6, 3), nan, 0.5),
    "linear": (_linear, {"w": _gen(8, 3, 2), "b": _gen(9, 2)}, (6, 3), _ROWS[:, None].expand(6, 3), nan, 0.5),
    "custom_function": (lambda p, x: _Square.apply(x)[:4].sum(), {}, (6,), _ROWS, nan, 0.5),
    "module": (_module, {k: v.detach() for k, v in _MLP.named_parameters()}, (6, 3), _ROWS[:, None].expand(6, 3),
               nan, 0.5),
}


def _data(name: str, control: bool) -> torch.Tensor:
    """B samples: 0 finite, 1 bad in discarded places, 2 too (control: plus a NaN at a used place)."""
    _, _, shape, discarded, bad, fill = PROGRAMS[name]
    x = _gen(10, B, *shape).abs() + 0.5  # positive: logs and square roots defined where used
    x[:, discarded] = fill  # sample 0 is the program's clean data (relu's flat region depends on it)
    x[1][discarded] = bad
    x[2][discarded] = bad
    if control:
        x[2].view(-1)[(~discarded).view(-1).nonzero()[0]] = nan
    return x


def _clean(name: str, x: torch.Tensor) -> torch.Tensor:
    _, _, _, discarded, _, fill = PROGRAMS[name]
    x = x.clone()
    x[:, discarded] = fill
    return x


def _eager(f, p, xs, grad) -> list[list[torch.Tensor]]:
    """Per sample, the gradient with respect to (params..., x) in eager mode (``grad``: gw.grad or torch's)."""
    out = []
    for x in xs:
        pp = {k: v.clone().requires_grad_() for k, v in p.items()}
        xx = x.clone().requires_grad_()
        out.append(list(grad(f(pp, xx), [*pp.values(), xx])))
    return out


def _flat(g) -> list[torch.Tensor]:
    params, x = g
    return [*params.values(), x]


TRANSFORMS = {
    "grad": lambda f, p, X: [_flat(torch.func.grad(f, argnums=(0, 1))(p, x)) for x in X],
    "vjp": lambda f, p, X: [_flat((r := torch.func.vjp(f, p, x))[1](torch.ones_like(r[0]))) for x in X],
    "vmap(grad)": lambda f, p, X: _unbatch(
        torch.func.vmap(torch.func.grad(f, argnums=(0, 1)), in_dims=(None, 0))(p, X)),
    "vmap(vjp)": lambda f, p, X: _unbatch(torch.func.vmap(
        lambda x: (r := torch.func.vjp(f, p, x))[1](torch.ones_like(r[0])))(X)),
    "jacrev": lambda f, p, X: [_flat(torch.func.jacrev(f, argnums=(0, 1))(p, x)) for x in X],
}


def _unbatch(g) -> list[list[torch.Tensor]]:
    flat = _flat(g)
    return [[t[i] for t in flat] for i in range(B)]


def _check_close(got, expected, what):
    for i, (gs, es) in enumerate(zip(got, expected, strict=True)):
        for g, e in zip(gs, es, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12, equal_nan=True, msg=f"{what}, sample {i}")


CASES = [(p, t) for p in PROGRAMS for t in TRANSFORMS  # ctc_loss has no batching rule: see the ctc test below
         if not (p == "ctc" and (t.startswith("vmap") or t == "jacrev"))]


@pytest.mark.parametrize(("program", "transform"), CASES)
def test_strong_zeros_hold_under_the_transform(program, transform):
    f, p, *_ = PROGRAMS[program]
    X = _data(program, control=False)
    expected = _eager(f, p, X, gw.grad)
    # the eager reference is the program with the unused values deleted (replaced by finite ones: plain PyTorch)
    _check_close(expected, _eager(f, p, _clean(program, X), lambda o, i: torch.autograd.grad(o, i)),
                 "eager gw.grad vs the program without the unused values")
    assert all(bool(t.isfinite().all()) for ts in expected for t in ts)
    plain = TRANSFORMS[transform](f, p, X)
    assert any(not bool(t.isfinite().all()) for ts in plain for t in ts), "premise: PyTorch is contaminated"
    with gw.strong_zeros():
        got = TRANSFORMS[transform](f, p, X)
    _check_close(got, expected, f"{transform} under strong zeros vs eager gw.grad")


@pytest.mark.parametrize(("program", "transform"), CASES)
def test_finite_data_is_bitwise_pytorchs(program, transform):
    f, p, *_ = PROGRAMS[program]
    X = _clean(program, _data(program, control=False))
    expected = TRANSFORMS[transform](f, p, X)
    with gw.strong_zeros():
        got = TRANSFORMS[transform](f, p, X)
    for gs, es in zip(got, expected, strict=True):
        for g, e in zip(gs, es, strict=True):
            assert torch.equal(g, e)


@pytest.mark.parametrize(("program", "transform"), CASES)
def test_a_used_nan_stays(program, transform):
    """Sample 2 holds a NaN the output uses: its gradient keeps the NaN the eager gw.grad keeps (a genuine NaN is
    never hidden), and sample 1 of the same batch keeps its strong zeros."""
    f, p, *_ = PROGRAMS[program]
    X = _data(program, control=True)
    expected = _eager(f, p, X, gw.grad)
    assert any(bool(t.isnan().any()) for t in expected[2])
    with gw.strong_zeros():
        got = TRANSFORMS[transform](f, p, X)
    _check_close(got, expected, f"{transform} with a used NaN")


@pytest.mark.parametrize("program", [p for p in PROGRAMS if p != "ctc"])
@pytest.mark.parametrize("control", [False, True])
def test_is_grads_batched(program, control):
    """torch.autograd.grad(is_grads_batched=True) and gw.grad(is_grads_batched=True): each seed's gradient is the
    eager gw.grad with that seed; on finite data PyTorch's bits."""
    f, p, *_ = PROGRAMS[program]
    for X, clean in ((_data(program, control), False), (_clean(program, _data(program, control)), True)):
        pp = {k: v.clone().requires_grad_() for k, v in p.items()}
        xx = X.clone().requires_grad_()
        y = torch.stack([f(pp, x) for x in xx])
        inputs, seeds = [*pp.values(), xx], torch.eye(B, dtype=D)
        expected = [gw.grad(y, inputs, seeds[i], retain_graph=True) for i in range(B)]
        plain = torch.autograd.grad(y, inputs, seeds, retain_graph=True, is_grads_batched=True)
        with gw.strong_zeros():
            got = torch.autograd.grad(y, inputs, seeds, retain_graph=True, is_grads_batched=True)
        also = gw.grad(y, inputs, seeds, retain_graph=True, is_grads_batched=True)
        for result in (got, also):
            _check_close([[t[i] for t in result] for i in range(B)], expected, "is_grads_batched")
        if clean and not control:
            assert all(torch.equal(g, e) for g, e in zip(got, plain, strict=True))


# a reduction's backward selects its argmax with a bool mask (`self == result`); an infinite sensitivity (sqrt at
# 0) meets the unselected places as inf * False: a decided zero to eager gw.grad, whatever the seed
SELECTING = {
    "amax": lambda x: (x.amax(1) - 2.0).sqrt().sum(),
    "amax(keepdim)": lambda x: (x.amax(1, keepdim=True) - 2.0).sqrt().sum(),
    "vector_norm(inf)": lambda x: (torch.linalg.vector_norm(x, inf, 1) - 2.0).sqrt().sum(),
    "max()": lambda x: (x.max() - 3.0).sqrt(),
}


@pytest.mark.parametrize("name", list(SELECTING))
def test_is_grads_batched_keeps_a_formulas_selection(name):
    """is_grads_batched's legacy vmap hands amax's ``self == result`` to the product as a view (a batch dim of 1),
    which was no selection: inf * False stayed PyTorch's NaN there, without a word. Each seed's gradient is the
    eager gw.grad's with that seed."""
    f = SELECTING[name]
    X = torch.tensor([[[1.0, 2.0, 0.5], [3.0, 1.0, 0.0]], [[2.0, 1.0, 1.5], [0.0, 0.0, 3.0]],
                      [[0.5, 2.0, 2.0], [1.0, 3.0, 1.0]]], dtype=D)
    xx = X.clone().requires_grad_()
    y = torch.stack([f(x) for x in xx])
    seeds = torch.eye(B, dtype=D)
    expected = torch.stack([gw.grad(y, xx, seeds[i], retain_graph=True)[0] for i in range(B)])
    plain = torch.autograd.grad(y, xx, seeds, retain_graph=True, is_grads_batched=True)[0]
    assert int(plain.isnan().sum()) > int(expected.isnan().sum()), "premise: PyTorch is contaminated"
    with gw.strong_zeros():
        got = torch.autograd.grad(y, xx, seeds, retain_graph=True, is_grads_batched=True)[0]
    assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0))


# views of a backward's selection mask that read some place of it at several positions (an expanded mask, an
# overlapping as_strided), each the mask's own values again: the product selects as the mask does
MASK_VIEWS = {
    "expand()[1]": lambda m: m.expand(2, 3)[1],
    "expand().t()[:, 0]": lambda m: m.expand(2, 3).t()[:, 0],
    "expand().diagonal()": lambda m: m.expand(3, 3).diagonal(),
    "as_strided(stride 0)[1]": lambda m: m.as_strided((2, 3), (0, 1))[1],
    "unfold()[0]": lambda m: m.unfold(0, 3, 1)[0],
}


class _ViewedMax(torch.autograd.Function):
    """max(x) whose backward multiplies the sensitivity by a view of its selection mask ``x == max``."""

    @staticmethod
    def forward(ctx, x, view):
        ctx.save_for_backward(x)
        ctx.view = view
        return x.amax()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * ctx.view(x == x.amax()), None


@pytest.mark.parametrize("name", list(MASK_VIEWS))
def test_an_overlapping_view_of_a_selection_selects(name):
    """_select_view wrote the mask's meaningful places through the view's strides: where a place is read at several
    positions (a mask comparing a NaN, viewed expanded) copy_ refused, and the backward crashed inside gradwise.
    References, the program with the unused values deleted: sqrt(max - 3) at max 3 has slope inf at the maximum
    only (plain PyTorch: inf * False = NaN at the others), and a NaN maximum's slope is a genuine NaN there, where
    the comparison decided nothing (the others were decided unselected)."""
    for values, expected in (([1.0, 2.0, 3.0], [0.0, 0.0, inf]), ([1.0, nan, 3.0], [0.0, nan, 0.0])):
        x = torch.tensor(values, dtype=D, requires_grad=True)
        y = (_ViewedMax.apply(x, MASK_VIEWS[name]) - 3.0).sqrt()
        plain = torch.autograd.grad(y, x, retain_graph=True)[0]
        with gw.strong_zeros():
            got = torch.autograd.grad(y, x)[0]
        assert torch.equal(got.nan_to_num(7.0), torch.tensor(expected, dtype=D).nan_to_num(7.0)), (values, got)
        assert torch.equal(got[2], plain[2]) or values[1] != values[1]  # (the selected place: PyTorch's)


@pytest.mark.parametrize("transform", ["vmap(grad)", "vmap(vjp)", "jacrev"])
@pytest.mark.parametrize("control", [False, True])
def test_ctc_under_vmap_holds(transform, control):
    """ctc_loss's backward has no batching rule: vmap runs it sample by sample (its fallback), and the strong pass
    follows."""
    f, p, *_ = PROGRAMS["ctc"]
    X = _data("ctc", control)
    expected = _eager(f, p, X, gw.grad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # functorch's performance warning about the fallback
        with gw.strong_zeros():
            got = TRANSFORMS[transform](f, p, X)
    _check_close(got, expected, f"{transform} of ctc")


def test_the_example_of_the_docs():
    def f(x):
        return x.sin()[:2].sum() + torch.where(x > 3, x.sqrt(), 0.0).sum()

    x = torch.tensor([1.0, 2.0, nan, 4.0])
    assert bool(torch.func.grad(f)(x).isnan()[2])
    with gw.strong_zeros():
        got = torch.func.grad(f)(x)
    xx = x.clone().requires_grad_()
    assert torch.equal(got, gw.grad(f(xx), xx)[0]) and float(got[2]) == 0.0


# ---------------------------------------------------------------------------------------------------------
# Where the line is: a transform that would differentiate the backward's own formulas runs plain, with a warning
# ---------------------------------------------------------------------------------------------------------

def _contaminated(x):
    return torch.where(x > 0, x.sqrt(), 0.0).sum()


_UNFOLLOWED = {
    "hessian": lambda x: torch.func.hessian(_contaminated)(x),
    "grad(grad)": lambda x: torch.func.grad(lambda v: torch.func.grad(_contaminated)(v).sum())(x),
    "jacfwd(jacrev)": lambda x: torch.func.jacfwd(torch.func.jacrev(_contaminated))(x),
    "jvp(grad)": lambda x: torch.func.jvp(torch.func.grad(_contaminated), (x,), (torch.ones_like(x),))[1],
    "grad(vjp)": lambda x: torch.func.grad(
        lambda v: torch.func.vjp(_contaminated, v)[1](torch.ones((), dtype=D))[0].sum())(x),
    "vmap(hessian)": lambda x: torch.func.vmap(torch.func.hessian(_contaminated))(x.expand(2, 3)),
    "forward_ad dual": lambda x: _dual_backward(x),
    "functionalize": lambda x: torch.func.functionalize(torch.func.grad(_contaminated))(x),
}


def _dual_backward(x):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        xx = fwAD.make_dual(x, torch.ones_like(x))
        return torch.func.grad(_contaminated)(xx)


@pytest.mark.parametrize("name", list(_UNFOLLOWED))
def test_unfollowed_transforms_keep_pytorchs_gradient_and_say_so(name):
    x = torch.tensor([4.0, 1.0, -1.0], dtype=D)
    expected = _UNFOLLOWED[name](x)
    with pytest.warns(gw.PlainBackwardWarning, match="ran as plain PyTorch"), gw.strong_zeros():
        got = _UNFOLLOWED[name](x)
    assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0))


def test_level_zero_graph_of_a_transform_gradient_is_carried():
    """A tensor that requires grad outside the transform (here x itself) makes PyTorch's autograd record the pass:
    differentiating torch.func.grad's result again equals gw's eager create_graph double backward."""
    x = torch.tensor([4.0, 1.0, -1.0, 9.0], dtype=D, requires_grad=True)
    (g,) = gw.grad(_contaminated(x), x, create_graph=True)
    expected = gw.grad(g.sum(), x)[0]
    with gw.strong_zeros():
        got_g = torch.func.grad(_contaminated)(x)
        got = torch.autograd.grad(got_g.sum(), x)[0]
    assert torch.equal(got_g.detach(), g.detach()) and torch.equal(got, expected)
    assert bool(expected.isfinite().all())


# ---------------------------------------------------------------------------------------------------------
# Per-sample gradients of modules with per-sample auxiliary inputs (targets, masks, indices) batched by vmap too
# ---------------------------------------------------------------------------------------------------------

def _aux_case(name: str):
    """(module, loss(out, aux), X with NaN rows in discarded places, the same X finite, aux)."""
    g = torch.Generator().manual_seed(11)
    X = torch.randn(B, 6, 4, generator=g, dtype=D)
    target = torch.randint(0, 5, (B, 6), generator=g)
    target[1, 3:], target[2, 5] = -100, -100
    finite = X.clone()
    X[1, 3:], X[2, 5] = nan, nan
    keep = target >= 0
    lin = torch.nn.Linear(4, 5).to(D)
    if name == "cross_entropy_targets":
        return lin, lambda o, t: F.cross_entropy(o, t, ignore_index=-100), X, finite, target
    if name == "where_mask":
        return lin, lambda o, m: torch.where(m[:, None], o, 0.0).sum(), X, finite, keep
    if name == "masked_softmax":
        return lin, lambda o, m: torch.where(m[:, None], (o @ o.T).masked_fill(~m, -inf).softmax(-1), 0.0).sum(), \
            X, finite, keep
    if name == "index_select":
        return lin, lambda o, i: o.index_select(0, i).sum(), X, finite, torch.tensor([[0, 1, 2], [0, 1, 2], [0, 1, 3]])
    if name == "logsumexp_mask":
        return lin, lambda o, m: torch.logsumexp(o.masked_fill(~m[:, None], -inf), 0).sum(), X, finite, keep
    if name == "layer_norm_module":
        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2)).to(D)
        return net, lambda o, m: torch.where(m[:, None], o, 0.0).sum(), X, finite, keep
    if name == "encoder_layer":
        net = _Batched(torch.nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True).to(D).eval())
        return net, lambda o, m: torch.where(m[:, None], o, 0.0).sum(), X, finite, keep
    if name == "strided_conv_cropped":
        net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(3, 2, 1)).to(D)
        X = torch.randn(B, 2, 9, 9, generator=g, dtype=D)
        finite = X.clone()
        X[1, :, 7:, :], X[2, :, :, 7:] = nan, nan
        return net, lambda o, a: o[:, :2, :2].sum(), X, finite, torch.zeros(B)
    raise KeyError(name)


class _Batched(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x[None])[0]


AUX = ["cross_entropy_targets", "where_mask", "masked_softmax", "index_select", "logsumexp_mask",
       "layer_norm_module", "encoder_layer", "strided_conv_cropped"]


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # functorch's SDPA fallback
@pytest.mark.parametrize("name", AUX)
def test_per_sample_gradients_with_batched_targets_and_masks(name):
    net, loss, X, finite, aux = _aux_case(name)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def f(p, x, a):
        return loss(functional_call(net, p, (x,)), a)

    per_sample = torch.func.vmap(torch.func.grad(f, argnums=(0, 1)), in_dims=(None, 0, 0))
    expected = [_eager(lambda p, x, a=a: f(p, x, a), params, x[None], gw.grad)[0] for x, a in zip(X, aux, strict=True)]
    plain = per_sample(params, X, aux)
    assert any(not bool(t.isfinite().all()) for t in _flat(plain)), "premise: PyTorch is contaminated"
    with gw.strong_zeros():
        got = per_sample(params, X, aux)
        got_finite = per_sample(params, finite, aux)
    _check_close(_unbatch(got), expected, f"vmap(grad) of {name}")
    assert all(torch.equal(g, e) for g, e in zip(_flat(got_finite), _flat(per_sample(params, finite, aux)),
                                                 strict=True))



# ---------------------------------------------------------------------------------------------------------
# Compositions, and the rules that read the running node's saved tensors (op by op under transforms)
# ---------------------------------------------------------------------------------------------------------

_M4 = torch.tensor([True, True, False, True])


def _h(x):
    return (torch.where(_M4, x.sqrt(), 0.0) * x).sum()


def _vector(x):
    return torch.where(_M4, x.sqrt(), 0.0) * 2


def _eager_rows(fn, x):
    """The eager gw.grad of each output element (rows of the Jacobian)."""
    xx = x.clone().requires_grad_()
    y = fn(xx)
    return torch.stack([gw.grad(y[i], xx, retain_graph=True)[0] for i in range(y.numel())])


_X4 = torch.tensor([1.0, 4.0, -1.0, 9.0], dtype=D)
COMPOSED = {
    "vmap(vmap(grad))": (lambda x: torch.func.vmap(torch.func.vmap(torch.func.grad(_h)))(x.expand(2, 3, 4)),
                         lambda x: _eager_rows(lambda v: _h(v)[None], x)[0].expand(2, 3, 4)),
    "vmap(jacrev)": (lambda x: torch.func.vmap(torch.func.jacrev(_vector))(x.expand(2, 4)),
                     lambda x: _eager_rows(_vector, x).expand(2, 4, 4)),
    "jacrev(chunk_size=1)": (lambda x: torch.func.jacrev(_vector, chunk_size=1)(x), lambda x: _eager_rows(_vector, x)),
    "grad(has_aux)": (lambda x: torch.func.grad(lambda v: (_h(v), v.sum()), has_aux=True)(x)[0],
                      lambda x: _eager_rows(lambda v: _h(v)[None], x)[0]),
    "jacobian(vectorize)": (lambda x: torch.autograd.functional.jacobian(_vector, x, vectorize=True),
                            lambda x: _eager_rows(_vector, x)),
    # the inner gradient is an eager create_graph pass; the outer one is batched over its graph
    "hessian(vectorize)": (lambda x: torch.autograd.functional.hessian(_h, x, vectorize=True),
                           lambda x: _eager_rows(lambda v: gw.grad(_h(v), v, create_graph=True)[0], x)),
}


@pytest.mark.parametrize("name", list(COMPOSED))
def test_compositions_hold(name):
    call, reference = COMPOSED[name]
    assert not bool(call(_X4).isfinite().all()), "premise: PyTorch is contaminated"
    with gw.strong_zeros():
        got = call(_X4)
    torch.testing.assert_close(got, reference(_X4), rtol=1e-12, atol=1e-12)


def test_per_sample_penalty_through_captured_parameters_is_carried():
    """Parameters that require grad, captured by vmap(grad): PyTorch's autograd records the pass below the
    transforms; a penalty on the per-sample gradients differentiates as the eager create_graph double backward."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).to(D)
    X = _gen(12, 3, 5, 4)
    X[1, 3:], X[2, 4] = nan, nan
    params = dict(net.named_parameters())

    def f(p, x):
        return functional_call(net, p, (x,))[:3].pow(2).sum()

    penalty = sum(sum(t.pow(2).sum() for t in gw.grad(f(params, x), list(params.values()), create_graph=True))
                  for x in X)
    expected = gw.grad(penalty, list(params.values()))
    with gw.strong_zeros():
        per_sample = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0))(params, X)
        got = torch.autograd.grad(sum(t.pow(2).sum() for t in per_sample.values()), list(params.values()))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
        assert bool(g.isfinite().all())


NODE_READERS = {  # rules that read the running node's saved tensors: op by op under transforms, PyTorch's values
    "logcumsumexp": lambda x: torch.logcumsumexp(x, 0)[:3].sum(),
    "addmm(alpha=0)": lambda x: torch.addmm(torch.zeros(2, 2, dtype=D), x.reshape(2, 3), x.reshape(3, 2),
                                            alpha=0).sum() + x[:2].sum(),
    "logaddexp(-inf)": lambda x: torch.logaddexp(x, torch.logaddexp(x * 0 - inf, x * 0 - inf)).sum(),
}


def _seeds_batched(f):
    """Per-sample gradients as torch.autograd.grad(is_grads_batched=True) takes them: one eager graph of the stacked
    outputs, one seed per sample (its legacy vmap batches the seeds); (B, B, ...), PyTorch's whatever the path."""
    def call(X):
        xx = X.clone().requires_grad_()
        y = torch.stack([f(x) for x in xx])
        return torch.autograd.grad(y, xx, torch.eye(len(X), dtype=X.dtype), is_grads_batched=True)[0]
    return call


PER_SAMPLE = {"vmap(grad)": lambda f: torch.func.vmap(torch.func.grad(f)), "is_grads_batched": _seeds_batched}


@pytest.mark.parametrize("how", list(PER_SAMPLE))
@pytest.mark.parametrize("name", list(NODE_READERS))
def test_node_reading_rules_keep_pytorchs_gradient_under_transforms(name, how):
    """(is_grads_batched: the gradients are legacy batched tensors, whose values were not read: the NaN stayed
    without the warning.)"""
    f = NODE_READERS[name]
    X = _gen(14, 3, 6)
    X[1, 4], X[2, 5] = nan, inf
    per_sample = PER_SAMPLE[how](f)
    expected = per_sample(X)
    assert not bool(expected.isfinite().all())
    # PyTorch's NaN stays, and is said to be so: the rule that would remove it cannot read the node there
    with pytest.warns(gw.OpaqueBackwardWarning, match="under a torch.func transform"), gw.strong_zeros():
        got = per_sample(X)
    assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0))


@pytest.mark.parametrize("how", ["grad", "is_grads_batched"])
def test_triangle_readers_keep_pytorchs_gradient_and_are_named(how):
    """cholesky_solve's formula reads the factor's unused triangle; eager strong zeros clean it with a node hook,
    which cannot run under a transform: PyTorch's gradient there, and an OpaqueBackwardWarning names the node."""
    a = _gen(15, 3, 3)
    factor = torch.linalg.cholesky(a @ a.T + 3 * torch.eye(3, dtype=D))
    factor[0, 2] = nan  # the upper triangle cholesky_solve never reads
    rhs = _gen(16, 3, 2)

    def f(lower):
        return torch.cholesky_solve(rhs, lower).sum()

    call = torch.func.grad(f) if how == "grad" else lambda m: _seeds_batched(f)(m[None])
    expected = call(factor)
    assert bool(expected.isnan().any())
    with pytest.warns(gw.OpaqueBackwardWarning, match="CholeskySolveBackward0 under a torch.func transform"), \
            gw.strong_zeros():
        got = call(factor)
    assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0))


# ---------------------------------------------------------------------------------------------------------
# Rules that hold only for finite outputs read them for a whole vmap batch: one sample's NaN output turns them off
# for every sample, which is said (an OpaqueBackwardWarning) rather than a kept NaN without a word
# ---------------------------------------------------------------------------------------------------------

FINITE_OUTPUT_RULES = {  # exp(-inf) = 0 reached by an infinite sensitivity (sqrt's at 0): a structural zero
    "exp": lambda x: x.exp().sqrt().sum(),
    "softmax": lambda x: x.softmax(0).sqrt().sum(),
}


@pytest.mark.parametrize("name", list(FINITE_OUTPUT_RULES))
def test_a_nan_output_of_one_sample_is_said_to_keep_the_others_nan(name):
    f = FINITE_OUTPUT_RULES[name]
    X = torch.tensor([[0.5, 1.0, 2.0], [-inf, 1.0, 2.0], [0.5, nan, 2.0]], dtype=D)  # sample 2: a NaN output
    expected = torch.stack([gw.grad(f(x := v.clone().requires_grad_()), x)[0] for v in X])
    assert bool(expected[1].isfinite().all()) and not bool(expected[2].isfinite().all())
    per_sample = torch.func.vmap(torch.func.grad(f))
    with gw.strong_zeros():  # every output finite: each sample's strong zeros, no warning
        torch.testing.assert_close(per_sample(X[:2]), expected[:2], rtol=1e-12, atol=0)
    plain = per_sample(X)
    with pytest.warns(gw.OpaqueBackwardWarning, match="whose outputs are read for the whole batch"), \
            gw.strong_zeros():
        got = per_sample(X)
    assert torch.equal(got.nan_to_num(7.0), plain.nan_to_num(7.0))  # PyTorch's values, said to be so
    torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=0)


def _rows(x):
    """Row 0's exp(-inf) = 0 meets sqrt's infinite slope at 0 (finite output: a structural zero, 0 per row); row 1
    is NaN."""
    return torch.stack([x[0].exp().sqrt() + x[1], x[2].log()])


JACOBIANS = {  # batched seeds: each row a gradient of its own, every output read for all rows at once
    "jacrev": lambda x: torch.func.jacrev(_rows)(x),
    "jacobian(vectorize)": lambda x: torch.autograd.functional.jacobian(_rows, x, vectorize=True),
    "vmap(vjp)": lambda x: torch.func.vmap(torch.func.vjp(_rows, x)[1])(torch.eye(2, dtype=D))[0],
}


@pytest.mark.parametrize("name", list(JACOBIANS))
def test_a_nan_output_of_one_row_is_said_to_keep_the_others_nan(name):
    """As for vmap's samples: the rows' outputs are read at once, so row 0 keeps PyTorch's NaN where its own gw.grad
    gives 0; said by an OpaqueBackwardWarning (the rule stood aside without a word). Under PyTorch's standard basis
    (jacrev, jacobian(vectorize)) row 1 is its own gw.grad (the basis's 0 for output 0 is structural: PyTorch's
    0 x NaN made it NaN at 0); the caller's eye (vmap(vjp)) is a value, PyTorch's NaN as the eager gw.grad's."""
    x = torch.tensor([-inf, 1.0, -1.0], dtype=D)
    xx = x.clone().requires_grad_()
    y = _rows(xx)
    assert float(gw.grad(y[0], xx, retain_graph=True)[0][0]) == 0.0
    plain = JACOBIANS[name](x)
    assert bool(plain[0, 0].isnan()) and bool(plain[1, 0].isnan())
    with pytest.warns(gw.OpaqueBackwardWarning, match="read for the whole batch"), gw.strong_zeros():
        got = JACOBIANS[name](x)
    assert torch.equal(got[0].nan_to_num(7.0), plain[0].nan_to_num(7.0))
    if name == "vmap(vjp)":
        assert torch.equal(got[1].nan_to_num(7.0), plain[1].nan_to_num(7.0))
    else:
        assert torch.equal(got[1], gw.grad(y[1], xx)[0])


def _penalty(inner_grad):
    def h(x):
        (gx,) = inner_grad(_contaminated(x), x, create_graph=True)
        return gx.pow(2).sum()
    return h


@pytest.mark.parametrize("inner", ["torch.autograd.grad", "gw.grad"])
def test_a_create_graph_backward_inside_grad_is_not_followed_and_says_so(inner):
    """torch.autograd.grad(create_graph=True) inside torch.func.grad (a gradient penalty): the grad level records
    the backward's formulas on its wrappers and its own backward differentiates them, NaN and all, below which the
    pass annihilated; it is grad(grad) and keeps PyTorch's gradient with a PlainBackwardWarning (it ran strong and
    kept the NaN without a word: 0.0 in the eager double backward)."""
    inner_grad = torch.autograd.grad if inner == "torch.autograd.grad" else gw.grad
    x = torch.tensor([4.0, 1.0, -1.0, 9.0], dtype=D)
    xx = x.clone().requires_grad_()
    assert float(gw.grad(_penalty(gw.grad)(xx), xx)[0][2]) == 0.0  # the eager double backward
    expected = torch.func.grad(_penalty(torch.autograd.grad))(x)
    assert bool(expected.isnan()[2])
    per_sample = torch.func.vmap(torch.func.grad(_penalty(inner_grad)))
    for call, arg in ((torch.func.grad(_penalty(inner_grad)), x), (per_sample, x.expand(2, 4))):
        _contract._warned.clear()
        with pytest.warns(gw.PlainBackwardWarning, match="ran as plain PyTorch"), gw.strong_zeros():
            got = call(arg)
        assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0).expand(got.shape))


# ---------------------------------------------------------------------------------------------------------
# vmap's own options (batch dims not in front, chunks, randomness, model ensembles): each sample's gradient is its
# eager gw.grad, and PyTorch's bits on finite data
# ---------------------------------------------------------------------------------------------------------

_ENSEMBLE = [torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).to(D) for _ in range(B)]


def _dropped(p, x):
    with torch.random.fork_rng():
        torch.manual_seed(3)  # the same mask in every call (randomness="same": one for the batch)
        return F.dropout(torch.where(_MASK, x.sqrt(), 0.0), 0.5)[:4].sum()


def _member(p, x):
    return functional_call(_ENSEMBLE[0], p, (x,))[:4].pow(2).sum()


def _flat_params(g: dict) -> torch.Tensor:
    return torch.cat([t.flatten(1) for t in g.values()], 1)


# name -> (program, f(p, x), argnums, batched call of grad(f) over p and X (B, ...) -> (B, n), p of sample i)
VMAPPED = {
    "in_dims=1,out_dims=1": ("where_sqrt", PROGRAMS["where_sqrt"][0], 1, lambda g, p, X: torch.func.vmap(
        g, in_dims=(None, 1), out_dims=1)(p, X.T).T, lambda p, i: p),
    "chunk_size=2": ("softmax_mask", PROGRAMS["softmax_mask"][0], 1, lambda g, p, X: torch.func.vmap(
        g, in_dims=(None, 0), chunk_size=2)(p, X).flatten(1), lambda p, i: p),
    "randomness=same": ("where_sqrt", _dropped, 1, lambda g, p, X: torch.func.vmap(
        g, in_dims=(None, 0), randomness="same")(p, X), lambda p, i: p),
    "stack_module_state": ("module", _member, 0, lambda g, p, X: _flat_params(torch.func.vmap(g, in_dims=(0, 0))(p, X)),
                           lambda p, i: {k: v[i] for k, v in p.items()}),
}


@pytest.mark.parametrize("name", list(VMAPPED))
def test_vmap_options_hold(name):
    program, f, argnums, call, of_sample = VMAPPED[name]
    params = {k: v.detach() for k, v in torch.func.stack_module_state(_ENSEMBLE)[0].items()} if argnums == 0 else {}
    X = _data(program, control=False)
    per_sample = torch.func.grad(f, argnums=argnums)
    expected = []
    for i in range(B):
        p = {k: v.clone().requires_grad_() for k, v in of_sample(params, i).items()}
        x = X[i].clone().requires_grad_()
        g = gw.grad(f(p, x), [*p.values()] if argnums == 0 else [x])
        expected.append(torch.cat([t.flatten() for t in g]))
    assert not bool(call(per_sample, params, X).isfinite().all()), "premise: PyTorch is contaminated"
    clean = _clean(program, X)
    with gw.strong_zeros():
        got = call(per_sample, params, X)
        got_clean = call(per_sample, params, clean)
    _check_close([[g.flatten()] for g in got], [[e] for e in expected], name)
    assert torch.equal(got_clean, call(per_sample, params, clean))


def test_a_compiled_backward_under_batched_seeds_is_named():
    """is_grads_batched over a torch.compile'd forward: its CompiledFunctionBackward runs as compiled under the
    transform path (no strong variant: that is a node hook), so its saved mask is a value and PyTorch's NaN stays
    where each seed's eager gw.grad has a 0. Each seed's gw.grad of the compiled graph says so
    (CompiledBackwardWarning); the batched seeds kept the NaN without a word. Now an OpaqueBackwardWarning names it,
    and the gradient is PyTorch's."""
    def f(x):
        return (x.amax() - 2.0).sqrt()

    X = torch.tensor([[1.0, 2.0, 0.5], [3.0, -1.0, 0.0]], dtype=D)
    xx = X.clone().requires_grad_()
    y = torch.compile(lambda xs: torch.stack([f(x) for x in xs]), backend="aot_eager", fullgraph=True)(xx)
    seeds = torch.eye(2, dtype=D)
    expected = torch.stack([gw.grad(f(x), x)[0] for x in X.clone().requires_grad_()])  # eager: 0 off the max
    plain = torch.autograd.grad(y, xx, seeds, retain_graph=True, is_grads_batched=True)[0]
    assert int(plain.isnan().sum()) > int(expected.isnan().sum()), "premise: PyTorch is contaminated"
    with pytest.warns(gw.OpaqueBackwardWarning, match="torch.compile'd backward under a torch.func transform"), \
            gw.strong_zeros():
        got = torch.autograd.grad(y, xx, seeds, is_grads_batched=True)[0]
    assert torch.equal(got.nan_to_num(7.0), plain.nan_to_num(7.0))


# a custom backward's selection mask (x > -100: all True) combined, in place, with a mask the forward made (a value,
# False at 1): `m & user` out of place is no selection (the design: a bool input the formula did not make), so the
# product keeps sqrt's NaN at 1; in place the mask kept its selection entry and its new False hid that NaN
OVERWRITES = {
    "m & user": lambda m, u: m & u,
    "m &= user": lambda m, u: m.__iand__(u),
    "m.view(-1).logical_and_(user)": lambda m, u: (m.view(-1).logical_and_(u), m)[1],
    "m.view(-1).copy_(user)": lambda m, u: (m.view(-1).copy_(u), m)[1],
    "m[1:].copy_(user[1:])": lambda m, u: (m[1:].copy_(u[1:]), m)[1],
}


class _UsersMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, combine):
        ctx.save_for_backward(x, torch.tensor([True, False, True]))
        ctx.combine = combine
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        x, user = ctx.saved_tensors
        return g * ctx.combine(x > -100.0, user), None


@pytest.mark.parametrize("name", list(OVERWRITES))
def test_a_selection_overwritten_by_a_users_mask_selects_no_more(name):
    """Reference: plain PyTorch (no strong zero is claimed on a value mask: the NaN of sqrt(-1) stays at 1)."""
    x = torch.tensor([1.0, -1.0, 2.0], dtype=D, requires_grad=True)
    y = _UsersMask.apply(x, OVERWRITES[name]).sqrt().sum()
    plain = torch.autograd.grad(y, x, retain_graph=True)[0]
    assert bool(plain[1].isnan())
    with gw.strong_zeros():
        got = torch.autograd.grad(y, x)[0]
    assert torch.equal(got.nan_to_num(7.0), plain.nan_to_num(7.0))
