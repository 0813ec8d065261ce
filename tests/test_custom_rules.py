"""gw.register_rule: strong zeros through torch.library custom ops and library (C++) ops.

The references are the same programs with the unused values replaced by two different finite values: a value
the output never uses cannot change its gradient, so both must give gradwise's answer.
"""
from __future__ import annotations

import importlib.util
import math
import warnings

import pytest
import torch
from torch import nn

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)
from gradwise._strong_zeros._rules import lookup

nan = float("nan")
f64 = torch.float64


# a custom op pair: gather rows forward, its backward a second custom op (scatter-add of the sensitivity)
@torch.library.custom_op("gwtest::gather_rows", mutates_args=())
def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, index)


@torch.library.custom_op("gwtest::gather_rows_backward", mutates_args=())
def gather_rows_backward(g: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    return g.new_zeros(rows, *g.shape[1:]).index_add(0, index, g)


@gather_rows.register_fake
def _(x, index):
    return x.new_empty(index.shape[0], *x.shape[1:])


def _gather_setup(ctx, inputs, output):
    ctx.index, ctx.rows = inputs[1], inputs[0].shape[0]


gather_rows.register_autograd(lambda ctx, g: (gather_rows_backward(g, ctx.index, ctx.rows), None),
                              setup_context=_gather_setup)


def _gather_program(fill: float):
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    x = torch.randn(6, 4, dtype=f64)
    x[[1, 4]] = fill  # rows the gather never reads
    index = torch.tensor([0, 2, 3, 5, 2])
    return lin, lambda: gather_rows(lin(x), index).square().sum()


def test_custom_op_without_a_rule_stays_contaminated():
    """Without a rule the backward op's zeros (rows the gather never read) are ordinary zeros: 0 x NaN stays."""
    lin, loss = _gather_program(nan)
    got = gw.grad(loss(), list(lin.parameters()))
    assert not got[0].isfinite().all()


@pytest.mark.parametrize("how", ["family", "packet", "name", "function"])
def test_registered_rule_removes_the_contamination(how):
    def rule(op, args, kwargs, supports):
        """A scatter-add: an output row no supported sensitivity row reaches is a structural zero."""
        out = op(*args, **kwargs)
        s = supports.of(args[0])
        rows = torch.ones(len(args[1]), dtype=torch.bool) if s is None else s.expand(args[0].shape).any(1)
        hit = torch.zeros(out.shape[0], dtype=torch.bool).index_fill(0, args[1][rows], True)
        return supports.set(out, hit[:, None])

    target = {"family": gather_rows_backward, "packet": torch.ops.gwtest.gather_rows_backward,
              "name": "gwtest::gather_rows_backward", "function": gather_rows_backward}[how]
    handle = gw.register_rule(target, rule if how == "function" else "placement")
    try:
        lin, loss = _gather_program(nan)
        got = gw.grad(loss(), list(lin.parameters()))
        for fill in (0.0, 1e3):
            lin2, loss2 = _gather_program(fill)
            exp = torch.autograd.grad(loss2(), list(lin2.parameters()))
            for g, e in zip(got, exp, strict=True):
                torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    finally:
        handle.remove()
    assert lookup(torch.ops.gwtest.gather_rows_backward.default) is None


def test_a_rule_that_declares_no_support_is_named():
    """A function rule that forgets supports.set leaves its output fully supported: the structural zeros it met
    are dropped there, and a NaN gradient that follows names the rule (as an op without a rule is named)."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    x = torch.randn(6, 4, dtype=f64)
    x[5] = nan  # gathered (4th) only into a row the slice drops: its sensitivity is a structural zero
    index = torch.tensor([0, 2, 3, 5, 2])
    handle = gw.register_rule(gather_rows_backward, lambda op, args, kwargs, supports: op(*args, **kwargs))
    try:
        with pytest.warns(gw.OpaqueBackwardWarning, match=r"gather_rows_backward.*declares no support"):
            got = gw.grad(gather_rows(lin(x), index)[:3].square().sum(), [lin.weight])
        assert not got[0].isfinite().all()
    finally:
        handle.remove()


# a weighted gather whose backward is a registered placement: out[index[i]] += g[i] * weights[i], the weights a
# value argument (a NaN/Inf there is met by whichever sensitivity element lands on it)
@torch.library.custom_op("gwtest::weighted_rows", mutates_args=())
def weighted_rows(x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, index) * weights[:, None]


@torch.library.custom_op("gwtest::weighted_rows_backward", mutates_args=())
def weighted_rows_backward(g: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, rows: int) -> torch.Tensor:
    return g.new_zeros(rows, *g.shape[1:]).index_add(0, index, g * weights[:, None])


@weighted_rows.register_fake
def _(x, index, weights):
    return x.new_empty(index.shape[0], *x.shape[1:])


def _weighted_setup(ctx, inputs, output):
    ctx.index, ctx.weights, ctx.rows = inputs[1], inputs[2], inputs[0].shape[0]


weighted_rows.register_autograd(
    lambda ctx, g: (weighted_rows_backward(g, ctx.index, ctx.weights, ctx.rows), None, None),
    setup_context=_weighted_setup)


@pytest.fixture
def weighted_placement():
    handle = gw.register_rule(weighted_rows_backward, "placement")
    torch.manual_seed(0)
    yield nn.Linear(4, 3).double(), torch.randn(6, 4, dtype=f64), torch.tensor([0, 2, 3, 2])
    handle.remove()


def test_placement_keeps_a_nan_weight_that_a_kept_row_meets(weighted_placement):
    """A NaN weight on a kept row is used (the loss is NaN): its count was NaN, and `count > 0` made the output a
    structural zero, so gw.grad returned a finite weight gradient of a NaN loss (a hidden genuine NaN)."""
    lin, x, index = weighted_placement
    loss = weighted_rows(lin(x), index, torch.tensor([0.5, nan, 1.0, 2.0], dtype=f64)).square().sum()
    assert math.isnan(loss.item())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # genuine: no structural zero met it, nothing to name
        got = gw.grad(loss, [lin.weight])[0]
    assert got.isnan().any()


def test_placement_with_an_inf_weight_only_a_discarded_row_meets(weighted_placement):
    """Row 2 of the output gathers the discarded element 1 (weight Inf) and the kept element 3. Its count was
    0 x Inf + 2 = NaN, and `count > 0` zeroed the row: a finite, wrong gradient (weight row 0 -0.83 for 6.75),
    silently. The row now keeps PyTorch's NaN, and the warning names the rule."""
    lin, x, index = weighted_placement
    weights = torch.tensor([0.5, math.inf, 1.0, 2.0], dtype=f64)
    kept = [0, 2, 3]
    with pytest.warns(gw.OpaqueBackwardWarning, match="weighted_rows_backward.*placement rule met NaN/Inf"):
        got = gw.grad(weighted_rows(lin(x), index, weights)[kept].square().sum(), [lin.weight])[0]
    assert got.isnan().any()
    # where the weights are finite the rule's answer is the program's without the discarded element
    weights[1] = 7.0
    got = gw.grad(weighted_rows(lin(x), index, weights)[kept].square().sum(), [lin.weight])[0]
    exp = torch.autograd.grad(weighted_rows(lin(x), index[kept], weights[kept]).square().sum(), [lin.weight])[0]
    torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)


# a custom op whose backward op returns two tensors, each pointwise in the sensitivity
@torch.library.custom_op("gwtest::times", mutates_args=())
def times(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a * b


@torch.library.custom_op("gwtest::times_backward", mutates_args=())
def times_backward(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return g * b, g * a


@times.register_fake
def _(a, b):
    return torch.empty_like(a)


def _times_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


times.register_autograd(lambda ctx, g: times_backward(g, *ctx.saved_tensors), setup_context=_times_setup)


@pytest.mark.parametrize("family", ["linear", "product"])
def test_pointwise_families_on_an_op_with_two_outputs(family):
    """Each output of g * b, g * a is pointwise and linear in g: the family applies to each. It raised
    AttributeError ('tuple' object has no attribute 'dtype') inside gradwise, on finite data too."""
    def grad(fill, backward):
        torch.manual_seed(0)
        w = torch.randn(4, 3, dtype=f64, requires_grad=True)
        x = torch.randn(6, 4, dtype=f64)
        x[4:] = fill
        h = x @ w
        return backward(times(h, h.sin())[:4].sum(), w)[0]

    handle = gw.register_rule(times_backward, family)
    try:
        assert torch.equal(grad(0.5, gw.grad), grad(0.5, torch.autograd.grad))
        got = grad(nan, gw.grad)
    finally:
        handle.remove()
    for fill in (0.0, 1e3):
        torch.testing.assert_close(got, grad(fill, torch.autograd.grad), rtol=1e-12, atol=1e-12)


def test_register_rule_refuses_bad_input():
    with pytest.raises(ValueError, match="unknown rule family"):
        gw.register_rule(gather_rows_backward, "scatter")
    with pytest.raises(TypeError, match="must be a torch op"):
        gw.register_rule(lambda x: x, "linear")
    with pytest.raises(ValueError, match="needs its namespace"):
        gw.register_rule("roi_align", "placement")
    with pytest.raises(ValueError, match="replace=True"):
        gw.register_rule(torch.ops.aten.mm, "linear")
    with pytest.raises(TypeError, match="family name or a function"):
        gw.register_rule(gather_rows_backward, 3)


# ---------------------------------------------------------------------------------------------------------
# torchvision's ROI align, reimplemented in PyTorch under torchvision's own op names and schemas (torchvision
# does not load beside torch 2.13), so gradwise's built-in name-keyed rule for it is the one that runs; where
# torchvision loads (0.29 beside torch 2.14) the same tests run its own kernel, and those of its other ROI ops.
# ---------------------------------------------------------------------------------------------------------


def _roi_align_samples(rois, scale, ph, pw, height, width, sampling, aligned):
    """Flat input positions and bilinear weights (already divided by the sample count) of every output bin."""
    offset = 0.5 if aligned else 0.0
    k = rois.shape[0]
    x1, y1, x2, y2 = (rois[:, i] * scale - offset for i in range(1, 5))
    rw, rh = x2 - x1, y2 - y1
    if not aligned:
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    bw, bh = rw / pw, rh / ph
    grid = torch.arange(sampling, dtype=rois.dtype) + 0.5
    ys = y1[:, None, None] + torch.arange(ph, dtype=rois.dtype)[None, :, None] * bh[:, None, None] \
        + grid[None, None, :] * (bh / sampling)[:, None, None]  # (K, ph, s)
    xs = x1[:, None, None] + torch.arange(pw, dtype=rois.dtype)[None, :, None] * bw[:, None, None] \
        + grid[None, None, :] * (bw / sampling)[:, None, None]  # (K, pw, s)
    y = ys[:, :, None, :, None].expand(k, ph, pw, sampling, sampling)
    x = xs[:, None, :, None, :].expand(k, ph, pw, sampling, sampling)
    inside = (y >= -1) & (y <= height) & (x >= -1) & (x <= width)
    y, x = y.clamp(min=0), x.clamp(min=0)
    y0, x0 = y.floor().long().clamp(max=height - 1), x.floor().long().clamp(max=width - 1)
    y1i, x1i = (y0 + 1).clamp(max=height - 1), (x0 + 1).clamp(max=width - 1)
    y = torch.where(y0 >= height - 1, y0.to(y.dtype), y)
    x = torch.where(x0 >= width - 1, x0.to(x.dtype), x)
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    idx = torch.stack([y0 * width + x0, y0 * width + x1i, y1i * width + x0, y1i * width + x1i], -1)
    w = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx], -1) * inside[..., None] / sampling**2
    return idx.reshape(k, ph, pw, -1), w.reshape(k, ph, pw, -1)


def _roi_align_forward(x, rois, scale, ph, pw, sampling, aligned):
    idx, w = _roi_align_samples(rois, scale, ph, pw, x.shape[2], x.shape[3], sampling, aligned)
    flat = x.flatten(2)[rois[:, 0].long()]  # (K, C, H*W)
    picked = flat.gather(2, idx.flatten(1)[:, None, :].expand(-1, x.shape[1], -1)).view(*flat.shape[:2], *idx.shape[1:])
    return (picked * w[:, None]).sum(-1)


def _roi_align_backward(grad, rois, scale, ph, pw, batch, channels, height, width, sampling, aligned):
    idx, w = _roi_align_samples(rois, scale, ph, pw, height, width, sampling, aligned)
    contrib = (grad[..., None] * w[:, None]).flatten(2)  # (K, C, ph*pw*4)
    out = grad.new_zeros(batch, channels, height * width)
    flat_idx = idx.flatten(1)[:, None, :].expand(-1, channels, -1)
    per_roi = grad.new_zeros(rois.shape[0], channels, height * width).scatter_add(2, flat_idx, contrib)
    out.index_add_(0, rois[:, 0].long(), per_roi)
    return out.view(batch, channels, height, width)


@pytest.fixture(scope="module")
def torchvision_roi_align():
    if importlib.util.find_spec("torchvision") is not None:  # its own kernel (the stand-in would clash)
        import torchvision  # noqa: F401 (defines torch.ops.torchvision)

        yield torch.ops.torchvision.roi_align
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
               "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor")
    lib.define("_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
               "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
               "int sampling_ratio, bool aligned) -> Tensor")
    lib.impl("roi_align", _roi_align_forward, "CompositeExplicitAutograd")
    lib.impl("_roi_align_backward", _roi_align_backward, "CompositeExplicitAutograd")

    def setup(ctx, inputs, output):
        x, rois, *rest = inputs
        ctx.rois, ctx.rest, ctx.shape = rois, rest, x.shape

    def backward(ctx, grad):
        scale, ph, pw, sampling, aligned = ctx.rest
        b, c, h, w = ctx.shape
        return (torch.ops.torchvision._roi_align_backward(grad, ctx.rois, scale, ph, pw, b, c, h, w, sampling,
                                                           aligned), None, None, None, None, None, None)

    torch.library.register_autograd("torchvision::roi_align", backward, setup_context=setup, lib=lib)
    yield torch.ops.torchvision.roi_align
    lib._destroy()


def test_roi_align_stand_in_matches_its_gradient(torchvision_roi_align):
    """The stand-in's backward (or torchvision's) is the derivative of its forward (float64 gradcheck)."""
    x = torch.randn(2, 2, 7, 8, dtype=f64, requires_grad=True)
    rois = torch.tensor([[0, 1.2, 0.7, 5.1, 4.3], [1, 0.0, 2.0, 6.5, 6.0]], dtype=f64)
    assert torch.autograd.gradcheck(lambda t: torchvision_roi_align(t, rois, 1.0, 2, 3, 2, True), (x,))


def _box_head(roi_align, fill: float, channels: int = 4):
    """A Faster R-CNN-style box head: conv backbone, ROI align of the boxes, a linear head. The image's border
    (rows 12.., columns 14..) is NaN padding (a batch padded to a common size) that no box samples."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 1)).double()
    head = nn.Linear(4 * 2 * 2, 5).double()
    img = torch.randn(2, 3, 16, 18, dtype=f64)
    img[:, :, 12:] = fill
    img[:, :, :, 14:] = fill
    rois = torch.tensor([[0, 1.0, 1.0, 6.0, 5.0], [1, 2.5, 0.5, 9.0, 7.5], [0, 4.0, 3.0, 10.0, 8.0]], dtype=f64)
    modules = nn.ModuleList([backbone, head])

    def loss():
        pooled = roi_align(backbone(img), rois, 1.0, 2, 2, 2, True)
        return head(pooled.flatten(1)).square().sum()

    return modules, loss


def test_roi_align_box_head_with_a_nan_border(torchvision_roi_align):
    _check_box_head_with_a_nan_border(torchvision_roi_align)


_TORCHVISION_ROI_OPS = {  # each pooled to 2 x 2 bins of 4 channels (position-sensitive ones from 16)
    "roi_pool": (lambda x, rois, *_: torch.ops.torchvision.roi_pool(x, rois, 1.0, 2, 2)[0], 4),
    "ps_roi_align": (lambda x, rois, *_: torch.ops.torchvision.ps_roi_align(x, rois, 1.0, 2, 2, 2)[0], 16),
    "ps_roi_pool": (lambda x, rois, *_: torch.ops.torchvision.ps_roi_pool(x, rois, 1.0, 2, 2)[0], 16),
}


@pytest.mark.parametrize("name", sorted(_TORCHVISION_ROI_OPS))
def test_torchvision_roi_op_box_head_with_a_nan_border(name):
    """gradwise's name-keyed placement rules for torchvision's other ROI backwards, on its own kernels."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (it does not load beside torch 2.13): no kernel to run")
    import torchvision  # noqa: F401 (defines torch.ops.torchvision)

    _check_box_head_with_a_nan_border(*_TORCHVISION_ROI_OPS[name])


def _check_box_head_with_a_nan_border(roi_align, channels: int = 4):
    """The NaN border no box samples: the gradients equal those of the same image with a finite border."""
    modules, loss = _box_head(roi_align, nan, channels)
    params = list(modules.parameters())
    value = loss()
    assert value.isfinite()
    assert not all(g.isfinite().all() for g in torch.autograd.grad(value, params, retain_graph=True))
    got = gw.grad(value, params)
    for fill in (0.0, -3.0):
        modules2, loss2 = _box_head(roi_align, fill, channels)
        exp = torch.autograd.grad(loss2(), list(modules2.parameters()))
        for g, e in zip(got, exp, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_roi_align_box_head_control_nan_sampled(torchvision_roi_align):
    """Control: a NaN pixel inside a box is used; it stays in the gradients."""
    modules, _ = _box_head(torchvision_roi_align, 0.0)
    torch.manual_seed(0)
    img = torch.randn(2, 3, 16, 18, dtype=f64)
    img[0, :, 3, 3] = nan
    rois = torch.tensor([[0, 1.0, 1.0, 6.0, 5.0]], dtype=f64)
    backbone, head = modules
    value = head(torchvision_roi_align(backbone(img), rois, 1.0, 2, 2, 2, True).flatten(1)).square().sum()
    got = gw.grad(value, list(modules.parameters()))
    assert not all(g.isfinite().all() for g in got)
    assert math.isnan(value.item())


@pytest.mark.parametrize("op", [torch.ops.aten.mm.default, torch.ops.aten.mm, "aten::mm", "aten::mm.default"])
def test_a_built_in_rule_is_replaced_only_with_replace(op):
    """Every way to name an op with a built-in rule is refused without replace=True: an overload of a packet with a
    rule was accepted and silently beat the built-in (an all-zero weight gradient with 'placement' for mm), and the
    name string was accepted and ignored (lookup finds the packet's rule first)."""
    built_in = lookup(torch.ops.aten.mm.default)
    with pytest.raises(ValueError, match="already has a strong-zero rule"):
        gw.register_rule(op, "placement")
    handle = gw.register_rule(op, "placement", replace=True)
    try:
        assert lookup(torch.ops.aten.mm.default).__name__ == "_placement"
    finally:
        handle.remove()
    assert lookup(torch.ops.aten.mm.default) is built_in
